//! The blob cache: `add(key) -> Writer {write, commit, abort}`, `get(key) -> Reader {read_at}`.
//!
//! Invariant shared by every store: an entry becomes visible to `get` only through
//! [`CacheWriter::commit`]; an aborted or dropped writer leaves nothing behind, so a partial or
//! failed chunk is never served.
//!
//! Keys are opaque strings chosen by the caller. They must be non-empty, at most 200 bytes, and
//! contain no `/`, no NUL and no `..` (they become file names). Callers namespace keys with a
//! prefix (the remote reader uses `"<blob digest hex>-<offset>-<len>"`), so
//! [`BlobCache::remove_prefix`] frees everything one layer put in the cache.
//!
//! Two stores: [`DirectoryCache`] (files under a directory, a byte budget with LRU eviction,
//! survives restarts) and [`MemoryCache`] (a map of byte vectors, for `http_cache_type = "memory"`
//! and tests).

mod dir;
mod memory;

pub use dir::{DirectoryCache, DirectoryCacheConfig};
pub use memory::MemoryCache;

use std::sync::Arc;

/// Errors of the cache stores.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache entry {0:?} not found")]
    NotFound(String),
    #[error("invalid cache key {0:?}")]
    InvalidKey(String),
    #[error("cache I/O on {key:?}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
}

impl CacheError {
    fn io(key: &str, source: std::io::Error) -> Self {
        CacheError::Io {
            key: key.to_owned(),
            source,
        }
    }
}

/// A store of immutable blobs keyed by string (a hex digest of what they hold).
pub trait BlobCache: Send + Sync {
    /// Starts writing a new entry. Nothing is visible until the writer commits.
    fn add(&self, key: &str) -> Result<Box<dyn CacheWriter>, CacheError>;
    /// Opens a committed entry; [`CacheError::NotFound`] on a miss. An open reader keeps its
    /// entry from being evicted.
    fn get(&self, key: &str) -> Result<Arc<dyn CacheReader>, CacheError>;
    /// Whether a committed entry exists (does not count as an access for LRU).
    fn contains(&self, key: &str) -> bool;
    /// Deletes one entry (no error when missing). Open readers keep reading their data.
    fn remove(&self, key: &str) -> Result<(), CacheError>;
    /// Deletes every entry whose key starts with `prefix` (e.g. one layer's blob digest);
    /// returns how many bytes were freed.
    fn remove_prefix(&self, prefix: &str) -> Result<u64, CacheError>;
    /// Bytes held by committed entries.
    fn usage(&self) -> u64;
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

/// Opens the store `http_cache_type` names: `"memory"` → [`MemoryCache`], anything else
/// (Go's default `""`/`"directory"`) → [`DirectoryCache`] under `dir`.
pub fn open_store(
    kind: &str,
    dir: &std::path::Path,
    config: DirectoryCacheConfig,
) -> Result<Arc<dyn BlobCache>, CacheError> {
    Ok(match kind {
        "memory" => Arc::new(MemoryCache::new()),
        _ => Arc::new(DirectoryCache::open(dir, config)?),
    })
}

/// Rejects keys that could escape the cache directory or collide with its layout.
pub(crate) fn validate_key(key: &str) -> Result<(), CacheError> {
    let bad = key.is_empty()
        || key.len() > 200
        || key.contains('/')
        || key.contains('\0')
        || key.contains("..")
        || key.starts_with('.')
        || key.len() < 2;
    if bad {
        return Err(CacheError::InvalidKey(key.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        for bad in ["", "a", "a/b", "..", "x..y", ".hidden", "a\0b"] {
            assert!(
                matches!(validate_key(bad), Err(CacheError::InvalidKey(_))),
                "{bad:?}"
            );
        }
        validate_key("ab").unwrap();
        validate_key("0123abcd-100-200").unwrap();
    }
}
