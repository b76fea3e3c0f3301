//! `fscache`: one sparse cache file per regular file of a layer, holding its decompressed bytes
//! at their file offsets, filled chunk by chunk.
//!
//! Which chunks are valid is tracked by the reader (a bitmap set only after verification), so a
//! crash mid-write leaves bytes that are simply never served. The directory outlives the daemon
//! (it is named after the snapshot's mountpoint); the next mount re-hashes what it finds. A fully filled file is exactly the
//! file's content, which is what FUSE passthrough hands to the kernel.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Open cache files kept around; past this the table is emptied (fds are cheap to reopen).
const MAX_OPEN_FILES: usize = 256;

/// The cache directory of one layer.
#[derive(Debug)]
pub struct FileCache {
    dir: PathBuf,
    open: Mutex<HashMap<u64, Arc<File>>>,
}

impl FileCache {
    /// Uses (and creates) `dir`; the layer owns it and [`FileCache::remove`] deletes it.
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(FileCache { dir: dir.to_path_buf(), open: Mutex::new(HashMap::new()) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, ino: u64) -> PathBuf {
        self.dir.join(ino.to_string())
    }

    /// The cache file of inode `ino`, created sparse with the file's `size` on first use.
    pub fn open(&self, ino: u64, size: u64) -> io::Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = open.get(&ino) {
            return Ok(f.clone());
        }
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(self.path(ino))?;
        if file.metadata()?.len() != size {
            file.set_len(size)?;
        }
        let file = Arc::new(file);
        if open.len() >= MAX_OPEN_FILES {
            open.clear();
        }
        open.insert(ino, file.clone());
        Ok(file)
    }

    /// A read-only handle for passthrough (the kernel reads it directly).
    pub fn open_readonly(&self, ino: u64) -> io::Result<File> {
        File::open(self.path(ino))
    }

    /// Deletes the layer's cache (unmount frees its disk space).
    pub fn remove(&self) -> io::Result<()> {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).clear();
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}
