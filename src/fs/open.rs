//! Finding and reading a layer's TOC through a [`LayerSource`]: the format work (footer, TOC
//! member, digest check, validated index) is `estargz`'s; this only fetches the ranges.

use crate::estargz::{self, LayerIndex};

use super::source::{fetch_vec, LayerSource};
use super::FsError;

/// The most blob tail fetched with the footer in the hope that the TOC is in it.
const MAX_TAIL_GUESS: u64 = 1 << 20;

/// Fetches the footer, then the TOC member ([`estargz::read_toc_member`]), and builds the
/// layer's index with [`estargz::open_index_from_toc_member`] (streamed: the TOC is never
/// held whole). `expected_digest`, when given, must match the TOC JSON.
///
/// The source's [`LayerSource::take_tail`] is used first. Without one, a non-zero `tail_guess`
/// makes the first request ask for that many bytes from the blob's end instead of the footer
/// alone (at most [`MAX_TAIL_GUESS`]): when the TOC member lies within, the layer opens in one
/// round trip instead of two. The caller sizes it to what one round trip of its link carries,
/// so a wrong guess costs no more than the request it hoped to save.
pub fn open_toc(
    src: &dyn LayerSource,
    expected_digest: Option<&str>,
    tail_guess: u64,
) -> Result<LayerIndex, FsError> {
    let size = src.size();
    // The tail that came with locating the blob, if any: often footer and TOC both.
    let mut tail: Option<(u64, Vec<u8>)> = src.take_tail();
    let (location, member) = estargz::read_toc_member(size, |offset, len| {
        if let Some(bytes) = tail
            .as_ref()
            .and_then(|(start, buf)| slice_within(*start, buf, offset, len))
        {
            return Ok(bytes.to_vec());
        }
        let want = tail_guess.min(MAX_TAIL_GUESS).min(size);
        if tail.is_none() && offset + len == size && want > len {
            // The footer: take the guessed tail with it.
            let start = size - want;
            let buf = fetch_vec(src, start, want).map_err(FsError::Source)?;
            let bytes = slice_within(start, &buf, offset, len).map(<[u8]>::to_vec);
            tail = Some((start, buf));
            if let Some(bytes) = bytes {
                return Ok(bytes);
            }
        }
        fetch_vec(src, offset, len).map_err(FsError::Source)
    })?;
    Ok(estargz::open_index_from_toc_member(&member, location, expected_digest)?.0)
}

/// `buf` holds the blob's bytes from `start`: the part `[offset, offset + len)`, if all in it.
fn slice_within(start: u64, buf: &[u8], offset: u64, len: u64) -> Option<&[u8]> {
    let from = usize::try_from(offset.checked_sub(start)?).ok()?;
    let to = from.checked_add(usize::try_from(len).ok()?)?;
    buf.get(from..to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Counted(Vec<u8>, AtomicU64);

    impl LayerSource for Counted {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn fetch(
            &self,
            offset: u64,
            len: u64,
            sink: &mut (dyn Write + Send),
        ) -> std::io::Result<()> {
            self.1.fetch_add(1, Ordering::SeqCst);
            sink.write_all(&self.0[offset as usize..(offset + len) as usize])
        }
    }

    #[test]
    fn a_tail_guess_that_holds_the_toc_opens_the_layer_in_one_request() -> Result<(), FsError> {
        let mut tar = tar::Builder::new(Vec::new());
        for i in 0..50 {
            let mut h = tar::Header::new_gnu();
            h.set_size(100);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, format!("f{i}"), &[i as u8; 100][..])
                .map_err(FsError::Source)?;
        }
        let input = tar.into_inner().map_err(FsError::Source)?;
        let mut blob = Vec::new();
        let built = estargz::build(&input[..], &mut blob, &Default::default())?;
        for (guess, requests) in [(0, 2), (64, 2), (1 << 20, 1)] {
            let src = Counted(blob.clone(), AtomicU64::new(0));
            let index = open_toc(&src, Some(&built.toc_digest), guess)?;
            assert!(index.lookup("f49").is_some());
            assert_eq!(src.1.load(Ordering::SeqCst), requests, "tail guess {guess}");
        }
        Ok(())
    }
}
