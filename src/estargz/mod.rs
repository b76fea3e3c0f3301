//! The eStargz format: footer, TOC, chunk index, builder and verification.
//! Nothing here knows about networks or FUSE: callers bring their own reads.
//!
//! zstd:chunked is the same model with zstd instead of gzip ([`Format`]): each chunk starts a
//! zstd frame instead of a gzip member, and the TOC is zstd-compressed JSON in a skippable frame
//! instead of a tar entry in the last member; the footer tells which a blob is.
//!
//! Reading a blob:
//! 1. [`footer::TocLocator`] names the tail to fetch and, from it, the TOC member's range
//!    (bounded); [`footer::read_toc_member`] does both fetches through a caller's range reader
//!    (`fs` and [`reader::open_blob`]; `ctr-remote` drives the locator over async reads);
//! 2. `fs` streams the member into a [`index::LayerIndex`] with
//!    [`reader::open_index_from_toc_member`] (digest checked, the TOC never held whole);
//!    `ctr-remote` parses it whole with [`toc::parse_toc_member`];
//! 3. per read, [`index::LayerIndex::chunks_for_range`] gives the compressed ranges; each chunk
//!    is decompressed and its digest checked ([`chunk::decode_chunk_into`], or
//!    [`chunk::check_digest`] for a caller that decompresses as it streams, like `fs`).
//!
//! [`reader::open_blob`] does 1–2 from any [`ReadAt`] and [`reader::read_file_range`] does 3;
//! [`builder::build`] writes a blob.

pub(crate) mod builder;
pub(crate) mod chunk;
pub(crate) mod footer;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod index;
pub(crate) mod landmark;
pub(crate) mod reader;
mod rfc3339;
mod tar_header;
pub(crate) mod toc;

// The format's public API: what `ctr-remote`-like tools, the fuzz targets, tests and benches
// build and parse blobs with.
pub use builder::{build, BuildOptions, BuildResult, ZstdChunkedManifest};
pub use footer::{footer_bytes, parse_footer, Format, TocLocation};
pub use index::LayerIndex;
pub use reader::{open_blob, read_file_range, OpenedBlob};
pub use toc::{parse_toc_member, to_go_json, EntryType, Toc, TocEntry};
// Used only inside the crate (`fs`, `ctr`).
pub(crate) use footer::{read_toc_member, TocLocator, MAX_FOOTER_SIZE};
pub(crate) use index::{ChunkInfo, Entry, EntryId};
pub(crate) use reader::open_index_from_toc_member;

/// Every way the format can be wrong. One enum for the module (see STYLE.md).
#[derive(Debug, thiserror::Error)]
pub enum EstargzError {
    #[error("i/o")]
    Io(#[from] std::io::Error),
    #[error("blob of {size} bytes is too small to hold a footer")]
    BlobTooSmall { size: u64 },
    #[error("invalid footer: {0}")]
    InvalidFooter(String),
    #[error(
        "TOC offset {toc_offset} is outside the blob ({blob_size} bytes, footer {footer_size})"
    )]
    TocOutOfRange {
        toc_offset: u64,
        blob_size: u64,
        footer_size: u64,
    },
    #[error("TOC too large: {size} bytes (limit {limit})")]
    TocTooLarge { size: u64, limit: u64 },
    #[error("malformed TOC member: {0}")]
    MalformedToc(String),
    /// serde quotes what it could not parse (an unknown `type`, a key): the cause is printed
    /// only through [`crate::untrusted::chain`], which clips it.
    #[error("TOC JSON")]
    TocJson(#[from] serde_json::Error),
    #[error("TOC digest mismatch: computed {actual}, expected {expected}")]
    TocDigestMismatch { expected: String, actual: String },
    #[error("invalid digest {0:?} (want sha256:<64 hex>)")]
    InvalidDigest(String),
    #[error("invalid TOC entry {name:?}: {reason}")]
    InvalidEntry { name: String, reason: String },
    #[error("layer {layer}: file {file:?}: chunk at file offset {chunk_offset}: {reason}")]
    Chunk {
        layer: String,
        file: String,
        chunk_offset: u64,
        reason: String,
    },
    #[error("layer {layer}: file {file:?}: chunk at file offset {chunk_offset}: digest mismatch (expected {expected}, got {actual})")]
    ChunkDigestMismatch {
        layer: String,
        file: String,
        chunk_offset: u64,
        expected: String,
        actual: String,
    },
    #[error("no such entry id {0}")]
    NoSuchEntry(u32),
    #[error("not a regular file: {0:?}")]
    NotRegular(String),
    #[error("read of [{offset}, +{len}) outside file {file:?} of {size} bytes")]
    OutOfFile {
        file: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("input tar: {0}")]
    InputTar(String),
    /// Reading the input failed; the cause is kept typed (the tar crate's errors wrap the
    /// i/o error that caused them).
    #[error("input tar: {what}")]
    InputIo {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("prioritized file not found in the input: {0:?}")]
    PrioritizedNotFound(String),
}

pub type Result<T, E = EstargzError> = std::result::Result<T, E>;

/// Positional reads from any byte source (a local file, a registry blob, a cache entry).
///
/// Implementations must be usable from many threads at once.
pub trait ReadAt: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 = end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;

    /// Fills `buf` completely from `offset`; a short source is `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "short read",
                    ))
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl ReadAt for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.as_slice().read_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        (**self).read_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        (**self).read_at(buf, offset)
    }
}

/// The TOC's digests are OCI digests; the one helper lives in [`crate::oci`].
pub use crate::oci::sha256_digest;

/// Parses `sha256:<64 lowercase-or-uppercase hex>` into raw bytes.
pub fn parse_sha256(s: &str) -> Result<[u8; 32]> {
    let invalid = || EstargzError::InvalidDigest(crate::untrusted::clip(s));
    let hexpart = s.strip_prefix("sha256:").ok_or_else(invalid)?;
    let mut out = [0u8; 32];
    if hexpart.len() != 64 {
        return Err(invalid());
    }
    hex::decode_to_slice(hexpart, &mut out).map_err(|_| invalid())?;
    Ok(out)
}
