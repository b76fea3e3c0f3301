//! The blob cache: `add(key) -> Writer {write, commit, abort}`, `get(key) -> Reader {read_at}`.
//!
//! Invariant shared by every store: an entry becomes visible to `get` only through
//! [`CacheWriter::commit`]; an aborted or dropped writer leaves nothing behind, so a partial or
//! failed chunk is never served.

use std::sync::Arc;

/// Errors of the cache stores.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache entry {0:?} not found")]
    NotFound(String),
    #[error("invalid cache key {0:?}")]
    InvalidKey(String),
    #[error("cache I/O on {key:?}: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
}

/// A store of immutable blobs keyed by string (a hex digest of what they hold).
pub trait BlobCache: Send + Sync {
    /// Starts writing a new entry. Nothing is visible until the writer commits.
    fn add(&self, key: &str) -> Result<Box<dyn CacheWriter>, CacheError>;
    /// Opens a committed entry; [`CacheError::NotFound`] on a miss.
    fn get(&self, key: &str) -> Result<Arc<dyn CacheReader>, CacheError>;
}

/// A pending cache entry. Dropping it without `commit` is the same as `abort`.
pub trait CacheWriter: std::io::Write + Send {
    /// Makes the written bytes visible under the key, atomically.
    fn commit(self: Box<Self>) -> Result<(), CacheError>;
    /// Discards everything written.
    fn abort(self: Box<Self>);
}

/// A committed cache entry.
pub trait CacheReader: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;
    fn size(&self) -> u64;
    /// The backing file, when the store has one (FUSE passthrough opens it).
    fn file(&self) -> Option<&std::fs::File> {
        None
    }
}
