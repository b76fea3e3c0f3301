//! Opening a blob from any [`ReadAt`]: footer → TOC → verified index; and reading file ranges.

use super::footer::{read_toc_member, TocLocation};
use super::index::{EntryId, LayerIndex};
use super::toc::{parse_toc_member, verify_toc_digest, EntryType, Toc};
use super::{chunk, EstargzError, ReadAt, Result};

/// Everything learned from a blob's tail.
#[derive(Debug, Clone)]
pub struct OpenedBlob {
    pub location: TocLocation,
    pub toc: Toc,
    /// `sha256:` of the uncompressed TOC JSON.
    pub toc_digest: String,
    pub index: LayerIndex,
}

/// Opens a blob of `blob_size` bytes: finds and reads the TOC member
/// ([`read_toc_member`]), parses it, checks its digest against `expected_toc_digest` when
/// given (mismatch is an error), and builds the index.
pub fn open_blob<R: ReadAt + ?Sized>(
    blob: &R,
    blob_size: u64,
    expected_toc_digest: Option<&str>,
) -> Result<OpenedBlob> {
    let (location, member) = read_toc_member(blob_size, |offset, len| {
        // `len` is the footer's or a TOC member bounded by `MAX_TOC_COMPRESSED_SIZE`.
        let mut buf = vec![0u8; len as usize];
        blob.read_exact_at(&mut buf, offset)?;
        Ok::<_, EstargzError>(buf)
    })?;
    open_from_toc_member(&member, location, expected_toc_digest)
}

/// Second half of [`open_blob`] for callers that fetched the TOC member themselves.
pub fn open_from_toc_member(
    member: &[u8],
    location: TocLocation,
    expected_toc_digest: Option<&str>,
) -> Result<OpenedBlob> {
    let (toc, toc_digest) = parse_toc_member(member, location.format)?;
    if let Some(want) = expected_toc_digest {
        verify_toc_digest(&toc_digest, want)?;
    }
    let mut index = LayerIndex::build(&toc, location.payload_end())?;
    index.set_format(location.format);
    Ok(OpenedBlob {
        location,
        toc,
        toc_digest,
        index,
    })
}

/// [`open_from_toc_member`] for callers that need only the index (the filesystem): the TOC is
/// streamed into the index and never held whole. Returns the index and the TOC digest.
pub fn open_index_from_toc_member(
    member: &[u8],
    location: TocLocation,
    expected_toc_digest: Option<&str>,
) -> Result<(LayerIndex, String)> {
    let (index, toc_digest) = LayerIndex::from_toc_member(member, &location)?;
    if let Some(want) = expected_toc_digest {
        verify_toc_digest(&toc_digest, want)?;
    }
    Ok((index, toc_digest))
}

/// Reads `buf.len()` bytes (fewer at end of file) of file `id` at `offset`, fetching each
/// needed compressed range from `blob` and verifying every chunk. Returns bytes read.
/// A plain, synchronous reader: the filesystem adds caching and prefetching on top.
pub fn read_file_range<R: ReadAt + ?Sized>(
    blob: &R,
    index: &LayerIndex,
    id: EntryId,
    offset: u64,
    buf: &mut [u8],
) -> Result<usize> {
    let e = index.entry(id).ok_or(EstargzError::NoSuchEntry(id))?;
    if e.kind != EntryType::Reg {
        return Err(EstargzError::NotRegular(crate::untrusted::clip(&e.name)));
    }
    if offset >= e.size || buf.is_empty() {
        return Ok(0);
    }
    let want = (buf.len() as u64).min(e.size - offset);
    let mut done = 0u64;
    let mut plain = Vec::new();
    for c in index.chunks_for_range(id, offset, want) {
        let range = c.compressed_range();
        let section = std::io::BufReader::with_capacity(
            64 << 10,
            Section {
                blob,
                pos: range.start,
                end: range.end,
            },
        );
        plain.resize(c.chunk_size as usize, 0);
        chunk::decode_chunk_into(
            section,
            index.format(),
            c,
            index.layer_label(),
            &e.name,
            &mut plain,
        )?;
        let from = offset + done - c.chunk_offset;
        let n = (c.chunk_size - from).min(want - done);
        buf[done as usize..(done + n) as usize]
            .copy_from_slice(&plain[from as usize..(from + n) as usize]);
        done += n;
    }
    if done != want {
        return Err(EstargzError::OutOfFile {
            file: crate::untrusted::clip(&e.name),
            offset,
            len: want,
            size: e.size,
        });
    }
    Ok(done as usize)
}

/// `Read` over `[pos, end)` of a [`ReadAt`]: the decoder pulls only the compressed bytes it
/// needs, so a lying TOC with a huge member range costs no memory.
pub struct Section<'a, R: ReadAt + ?Sized> {
    pub blob: &'a R,
    pub pos: u64,
    pub end: u64,
}

impl<R: ReadAt + ?Sized> std::io::Read for Section<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.blob.read_at(&mut buf[..n], self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}
