//! Decoding one chunk: decompress its member (gzip) or frame (zstd:chunked) range, skip
//! `inner_offset`, take `chunk_size` bytes, check them against `chunkDigest`, and only then
//! hand them out. Corrupt input is an error, never a panic and never wrong bytes.

use std::io::{self, BufRead, Read, Write};

use sha2::{Digest as _, Sha256};

use super::footer::Format;
use super::index::ChunkInfo;
use super::{EstargzError, Result};

/// The largest zstd window (log2) a frame may ask for: 16 MiB. The decoder allocates the
/// window the frame header names, so a hostile frame could otherwise make each decode take
/// up to libzstd's default limit of 128 MiB. Go's and libzstd's encoders use at most 8 MiB at
/// the levels layers are built with (klauspost's default window; libzstd up to level 19).
pub const MAX_ZSTD_WINDOW_LOG: u32 = 24;

/// The magic of a (non-skippable) zstd frame.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// A zstd decoder over `r` that refuses frames needing more than [`MAX_ZSTD_WINDOW_LOG`].
pub fn zstd_reader<R: BufRead>(r: R) -> io::Result<zstd::stream::read::Decoder<'static, R>> {
    let mut d = zstd::stream::read::Decoder::with_buffer(r)?;
    d.window_log_max(MAX_ZSTD_WINDOW_LOG)?;
    Ok(d)
}

/// A zstd decoder into `w` that refuses frames needing more than [`MAX_ZSTD_WINDOW_LOG`].
pub fn zstd_writer<W: Write>(w: W) -> io::Result<zstd::stream::write::Decoder<'static, W>> {
    let mut d = zstd::stream::write::Decoder::new(w)?;
    d.window_log_max(MAX_ZSTD_WINDOW_LOG)?;
    Ok(d)
}

fn chunk_err(layer: &str, file: &str, c: &ChunkInfo, reason: impl Into<String>) -> EstargzError {
    EstargzError::Chunk {
        layer: crate::untrusted::clip(layer),
        file: crate::untrusted::clip(file),
        chunk_offset: c.chunk_offset,
        reason: reason.into(),
    }
}

/// Decompresses `chunk` from `compressed` (a reader positioned at `chunk.compressed_offset`,
/// typically over `chunk.compressed_range()`) into `buf`, which must be `chunk_size` long.
/// On error `buf` holds unspecified bytes and must not be used.
pub fn decode_chunk_into<R: BufRead>(
    compressed: R,
    format: Format,
    chunk: &ChunkInfo,
    layer: &str,
    file: &str,
    buf: &mut [u8],
) -> Result<()> {
    if buf.len() as u64 != chunk.chunk_size {
        return Err(chunk_err(
            layer,
            file,
            chunk,
            format!(
                "buffer of {} bytes for a chunk of {}",
                buf.len(),
                chunk.chunk_size
            ),
        ));
    }
    let err = |what: &str, e: io::Error| chunk_err(layer, file, chunk, format!("{what}: {e}"));
    match format {
        Format::Gzip => fill(flate2::bufread::MultiGzDecoder::new(compressed), chunk, buf)
            .map_err(|e| err("gunzip", e))?,
        Format::ZstdChunked => {
            let plain = zstd_reader(compressed).map_err(|e| err("zstd", e))?;
            fill(plain, chunk, buf).map_err(|e| err("zstd", e))?
        }
    }
    verify(chunk, layer, file, buf)
}

/// Skips the chunk's inner offset in the decompressed stream `plain` and fills `buf`.
fn fill<D: Read>(mut plain: D, chunk: &ChunkInfo, buf: &mut [u8]) -> io::Result<()> {
    let skipped = io::copy(&mut (&mut plain).take(chunk.inner_offset), &mut io::sink())?;
    if skipped != chunk.inner_offset {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "member ends at {skipped}, before inner offset {}",
                chunk.inner_offset
            ),
        ));
    }
    plain.read_exact(buf)
}

/// Checks `data` against the chunk's digest (no digest: accepted, see
/// [`super::LayerIndex::require_chunk_digests`]).
pub fn verify(chunk: &ChunkInfo, layer: &str, file: &str, data: &[u8]) -> Result<()> {
    check_digest(chunk, layer, file, Sha256::digest(data).into())
}

/// [`verify`] for callers that hash the chunk as it streams by (no whole-chunk buffer):
/// compares the finished sha256 `got` with the chunk's digest (none: accepted).
pub fn check_digest(chunk: &ChunkInfo, layer: &str, file: &str, got: [u8; 32]) -> Result<()> {
    let Some(want) = chunk.digest else {
        return Ok(());
    };
    if got != want {
        return Err(EstargzError::ChunkDigestMismatch {
            layer: crate::untrusted::clip(layer),
            file: crate::untrusted::clip(file),
            chunk_offset: chunk.chunk_offset,
            expected: format!("sha256:{}", hex::encode(want)),
            actual: format!("sha256:{}", hex::encode(got)),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame that asks for a 64 MiB window (no content size: the window is what it says).
    fn wide_frame(data: &[u8]) -> Vec<u8> {
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd");
        enc.window_log(26).expect("window");
        enc.include_contentsize(false).expect("no size");
        enc.write_all(data).expect("zstd");
        enc.finish().expect("zstd")
    }

    fn chunk_of(data: &[u8], frame: &[u8]) -> ChunkInfo {
        ChunkInfo {
            chunk_offset: 0,
            chunk_size: data.len() as u64,
            compressed_offset: 0,
            compressed_end: frame.len() as u64,
            inner_offset: 0,
            digest: Some(Sha256::digest(data).into()),
        }
    }

    #[test]
    fn zstd_chunks_decode_and_wide_windows_are_refused_both_ways() {
        let data = b"chunk data ".repeat(1000);
        let ok = zstd::bulk::compress(&data, 3).expect("zstd");
        let mut buf = vec![0u8; data.len()];
        let c = chunk_of(&data, &ok);
        decode_chunk_into(&ok[..], Format::ZstdChunked, &c, "l", "f", &mut buf).expect("decode");
        assert_eq!(buf, data);

        let wide = wide_frame(&data);
        let e = decode_chunk_into(&wide[..], Format::ZstdChunked, &c, "l", "f", &mut buf)
            .expect_err("a 64 MiB window is refused");
        assert!(e.to_string().contains("too much memory"), "{e}");
        // The streaming decoder the filesystem uses refuses it too.
        let mut w = zstd_writer(Vec::new()).expect("decoder");
        let refused = w.write_all(&wide).and_then(|()| w.flush());
        assert!(refused.is_err(), "{:?}", w.get_ref().len());
        let mut w = zstd_writer(Vec::new()).expect("decoder");
        w.write_all(&ok)
            .and_then(|()| w.flush())
            .expect("a small frame decodes");
        assert_eq!(w.get_ref(), &data);
    }

    #[test]
    fn a_gzip_chunk_is_not_a_zstd_chunk() {
        let data = b"x".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).expect("gz");
        let member = gz.finish().expect("gz");
        let c = chunk_of(&data, &member);
        let mut buf = vec![0u8; 100];
        assert!(
            decode_chunk_into(&member[..], Format::ZstdChunked, &c, "l", "f", &mut buf).is_err()
        );
        decode_chunk_into(&member[..], Format::Gzip, &c, "l", "f", &mut buf).expect("gzip");
        assert_eq!(buf, data);
    }
}
