//! Decoding one chunk: gunzip its member range, skip `inner_offset`, take `chunk_size` bytes,
//! check them against `chunkDigest`, and only then hand them out. Corrupt input is an error,
//! never a panic and never wrong bytes.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use super::index::ChunkInfo;
use super::{EstargzError, Result};

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
pub fn decode_chunk_into<R: Read>(
    compressed: R,
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
    let mut gz = flate2::read::MultiGzDecoder::new(compressed);
    let skipped = io::copy(&mut (&mut gz).take(chunk.inner_offset), &mut io::sink())
        .map_err(|e| chunk_err(layer, file, chunk, format!("gunzip: {e}")))?;
    if skipped != chunk.inner_offset {
        return Err(chunk_err(
            layer,
            file,
            chunk,
            format!(
                "member ends at {skipped}, before inner offset {}",
                chunk.inner_offset
            ),
        ));
    }
    gz.read_exact(buf)
        .map_err(|e| chunk_err(layer, file, chunk, format!("gunzip: {e}")))?;
    verify(chunk, layer, file, buf)
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
