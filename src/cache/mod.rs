//! The cache of a layer's decompressed, verified file data: `add(key) -> Writer {write,
//! commit}` to fill it (dropping an uncommitted writer aborts), `read_at` to serve it.
//!
//! The key is one chunk of one file ([`ChunkKey`]): the read path decompresses a chunk
//! straight into a [`Writer`] as its compressed bytes arrive, checks the chunk's digest, and
//! only then calls [`Writer::commit`]. Commit hands back a [`Committed`] proof, which is the
//! only way to mark a chunk present in the layer's chunk map (`fs::chunks`): so no byte is
//! served before it was verified. Dropping an uncommitted writer, as any early return does,
//! removes whatever was written, so nothing unverified stays behind.
//!
//! The API is shaped for the store the daemon needs, not for a key→blob store: a file's chunks
//! live at their file offsets in one sparse cache file ([`disk::DiskCache`]), so a fully cached
//! file *is* the file's content — handed to the kernel for FUSE passthrough
//! ([`LayerCache::backing_file`]) — and every byte is on disk once (small files share one
//! store while their layer is fetched, and get files of their own once it is complete:
//! [`LayerCache::unpack`]). The memory store
//! ([`memory::MemoryCache`], `filesystem_cache_type = "memory"`) keeps chunks in memory and
//! has no backing files (reads go through the daemon) and nothing that survives a restart.

pub mod disk;
pub mod memory;

use std::io;
use std::ops::Range;
use std::path::Path;

pub use disk::{private_dir, DiskCache};
pub use memory::MemoryCache;

/// One chunk of one file of a layer: bytes `range` of inode `ino`, a file of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkKey {
    pub ino: u64,
    pub size: u64,
    pub range: Range<u64>,
}

/// Proof that a chunk's bytes were committed after verification; see the module doc.
#[derive(Debug)]
pub struct Committed(());

impl Committed {
    /// A proof out of thin air, for unit tests of what consumes proofs.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        Committed(())
    }
}

/// Where a layer's file data is kept.
pub trait LayerCache: Send + Sync + std::fmt::Debug {
    /// Starts writing chunk `key`; its bytes become readable only through [`Writer::commit`].
    fn add(&self, key: &ChunkKey) -> io::Result<Writer>;
    /// Reads `buf.len()` committed bytes of file `ino` (of `size` bytes) at `offset`.
    fn read_at(&self, ino: u64, size: u64, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Bytes an earlier run left for chunk `key` (a daemon restart) become readable again if
    /// `verify`, reading them, says they are right. None when the store has no whole copy.
    fn reuse(
        &self,
        key: &ChunkKey,
        verify: &mut dyn FnMut(&mut dyn io::Read) -> bool,
    ) -> Option<Committed>;
    /// A read-only handle on the file's cache file, for FUSE passthrough (None: not on disk).
    fn backing_file(&self, ino: u64) -> Option<std::fs::File>;
    /// Drops the bytes of `range` of file `ino` (eviction of verified chunks).
    fn discard(&self, ino: u64, range: Range<u64>) -> io::Result<()>;
    /// Where the layer's files live on disk (None for memory).
    fn dir(&self) -> Option<&Path>;
    /// The cache file of file `ino` (None for memory, and for a file still in the disk store's
    /// small-file store): once the file is fully cached, its content exactly, which a layer's
    /// native tree links (`fs::native`).
    fn file_path(&self, ino: u64) -> Option<std::path::PathBuf>;
    /// Gives every file the store kept together while the layer was fetched (the disk store's
    /// small files) a cache file of its own, so that each can be handed to the kernel or linked
    /// into a tree; returns how many moved. Only while no chunk of the layer is being written
    /// (the layer is fully cached and pinned).
    fn unpack(&self) -> io::Result<usize>;
    /// Whether [`Self::unpack`] has files to move (false once it failed: they stay where they
    /// are for this mount, read through the daemon).
    fn packed(&self) -> bool;
}

/// Which store `filesystem_cache_type` names: `""`/`"directory"` (default) or `"memory"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheKind {
    #[default]
    Disk,
    Memory,
}

impl CacheKind {
    /// Go's key values; anything else is an error (the daemon says which values exist).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" | "directory" => Ok(CacheKind::Disk),
            "memory" => Ok(CacheKind::Memory),
            other => Err(format!(
                "unknown cache type {:?} (known: \"directory\", \"memory\")",
                crate::untrusted::clip(other)
            )),
        }
    }

    /// The cache of one layer whose regular files are `files` (inode, size), in `dir` for the
    /// disk store, keeping at most `max_open_files` cache files open.
    pub fn open(
        self,
        dir: &Path,
        max_open_files: usize,
        files: &[(u64, u64)],
    ) -> io::Result<Box<dyn LayerCache>> {
        Ok(match self {
            CacheKind::Disk => Box::new(DiskCache::new(dir, max_open_files, files)?),
            CacheKind::Memory => Box::new(MemoryCache::default()),
        })
    }
}

/// The store side of a [`Writer`].
pub(crate) trait ChunkSink: Send {
    /// Writes `data` at file offset `offset` (within the chunk's range).
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the written bytes readable.
    fn commit(&mut self) -> io::Result<()>;
    /// Removes the written bytes.
    fn abort(&mut self);
}

/// Fills one chunk, in order; see the module doc. Writing past the chunk's end is an error.
pub struct Writer {
    sink: Box<dyn ChunkSink>,
    range: Range<u64>,
    written: u64,
    done: bool,
}

impl Writer {
    pub(crate) fn new(sink: Box<dyn ChunkSink>, range: Range<u64>) -> Self {
        Writer {
            sink,
            range,
            written: 0,
            done: false,
        }
    }

    /// Bytes still missing from the chunk.
    pub fn remaining(&self) -> u64 {
        self.range.end - self.range.start - self.written
    }

    /// Makes the chunk readable; call only after its bytes were verified. A chunk not written
    /// whole is aborted instead.
    pub fn commit(mut self) -> io::Result<Committed> {
        self.done = true;
        if self.remaining() != 0 {
            self.sink.abort();
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("chunk is {} bytes short", self.remaining()),
            ));
        }
        match self.sink.commit() {
            Ok(()) => Ok(Committed(())),
            Err(e) => {
                self.sink.abort();
                Err(e)
            }
        }
    }
}

impl io::Write for Writer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.len() as u64 > self.remaining() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write past the end of the chunk",
            ));
        }
        self.sink.write_at(data, self.range.start + self.written)?;
        self.written += data.len() as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.done {
            self.sink.abort();
        }
    }
}
