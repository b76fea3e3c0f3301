//! The directory store: `<root>/wip/` holds entries being written, `commit` renames them into
//! `<root>/<key[:2]>/<key>`. An in-memory index (size, LRU tick, open readers) is rebuilt from the
//! directory on start, so the cache survives a daemon restart.
//!
//! Eviction: when a commit pushes [`DirectoryCache::usage`] over the budget, least recently used
//! entries are unlinked until it fits again. Entries with open readers are skipped (they are
//! "in use"); entries still being written live in `wip/`, are not in the index and so can never
//! be evicted mid-commit. An explicit [`BlobCache::remove`] does unlink an entry that has open
//! readers: on Linux an open file descriptor keeps the data readable until it is closed, so a
//! reader never sees its bytes change or vanish; the space is freed when the last reader closes.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{validate_key, BlobCache, CacheError, CacheReader, CacheWriter};

/// Settings of the directory store.
#[derive(Debug, Clone, Default)]
pub struct DirectoryCacheConfig {
    /// Byte budget for committed entries; `None` means unbounded (Go's behaviour).
    pub max_bytes: Option<u64>,
    /// `fsync` each entry before it is renamed into place (`[directory_cache] sync_add`).
    pub sync_add: bool,
}

/// A [`BlobCache`] of files under a directory.
#[derive(Clone)]
pub struct DirectoryCache {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    config: DirectoryCacheConfig,
    state: Mutex<State>,
    wip_seq: AtomicU64,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// LRU order: tick → key. The smallest tick is the least recently used entry.
    lru: BTreeMap<u64, String>,
    tick: u64,
    usage: u64,
}

struct Entry {
    size: u64,
    tick: u64,
    readers: usize,
    /// Distinguishes a re-committed key from the entry an old reader opened.
    generation: u64,
}

impl State {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn touch(&mut self, key: &str) {
        let tick = self.next_tick();
        if let Some(e) = self.entries.get_mut(key) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, key.to_owned());
        }
    }

    fn insert(&mut self, key: &str, size: u64, generation: u64) {
        self.forget(key);
        let tick = self.next_tick();
        self.entries.insert(
            key.to_owned(),
            Entry {
                size,
                tick,
                readers: 0,
                generation,
            },
        );
        self.lru.insert(tick, key.to_owned());
        self.usage += size;
    }

    /// Drops a key from the index; returns its size.
    fn forget(&mut self, key: &str) -> Option<u64> {
        let e = self.entries.remove(key)?;
        self.lru.remove(&e.tick);
        self.usage -= e.size;
        Some(e.size)
    }
}

impl DirectoryCache {
    /// Opens (creating if needed) a cache under `root`: deletes leftovers in `wip/` from a previous
    /// run and indexes the committed entries, oldest modification first in LRU order.
    pub fn open(
        root: impl Into<PathBuf>,
        config: DirectoryCacheConfig,
    ) -> Result<Self, CacheError> {
        let root = root.into();
        let wip = root.join("wip");
        let root_key = root.display().to_string();
        if wip.exists() {
            fs::remove_dir_all(&wip).map_err(|e| CacheError::io(&root_key, e))?;
        }
        fs::create_dir_all(&wip).map_err(|e| CacheError::io(&root_key, e))?;
        let mut found = scan(&root).map_err(|e| CacheError::io(&root_key, e))?;
        found.sort_by_key(|(_, _, mtime)| *mtime);
        let mut state = State::default();
        for (key, size, _) in found {
            state.insert(&key, size, 0);
        }
        tracing::debug!(root = %root.display(), entries = state.entries.len(), usage = state.usage, "cache opened");
        let cache = DirectoryCache {
            inner: Arc::new(Inner {
                root,
                config,
                state: Mutex::new(state),
                wip_seq: AtomicU64::new(1),
            }),
        };
        cache.inner.evict(&mut cache.inner.lock(), None);
        Ok(cache)
    }

    /// The directory this cache lives in.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Number of committed entries.
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Whether the cache holds no committed entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file a committed key lives in (whether or not it exists).
    pub fn entry_path(&self, key: &str) -> PathBuf {
        self.inner.entry_path(key)
    }
}

/// Lists `(key, size, mtime)` of committed entries under `<root>/<xx>/`.
fn scan(root: &Path) -> io::Result<Vec<(String, u64, std::time::SystemTime)>> {
    let mut out = Vec::new();
    for bucket in fs::read_dir(root)? {
        let bucket = bucket?;
        let name = bucket.file_name();
        let name = name.to_string_lossy();
        if name == "wip" || name.len() != 2 || !bucket.file_type()?.is_dir() {
            continue;
        }
        for f in fs::read_dir(bucket.path())? {
            let f = f?;
            let key = f.file_name().to_string_lossy().into_owned();
            let meta = f.metadata()?;
            if !meta.is_file() || validate_key(&key).is_err() || !key.starts_with(name.as_ref()) {
                continue;
            }
            out.push((key, meta.len(), meta.modified()?));
        }
    }
    Ok(out)
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the index consistent enough (worst case a stale
        // size), so recover instead of propagating the poison.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry_path(&self, key: &str) -> PathBuf {
        self.root.join(&key[..2]).join(key)
    }

    /// Unlinks least recently used entries that are not in use (and not `keep`) until usage fits.
    fn evict(&self, state: &mut State, keep: Option<&str>) {
        let Some(budget) = self.config.max_bytes else {
            return;
        };
        if state.usage <= budget {
            return;
        }
        let mut victims = Vec::new();
        let mut usage = state.usage;
        for key in state.lru.values() {
            if usage <= budget {
                break;
            }
            let Some(e) = state.entries.get(key) else {
                continue;
            };
            if e.readers > 0 || Some(key.as_str()) == keep {
                continue;
            }
            usage -= e.size;
            victims.push(key.clone());
        }
        for key in victims {
            if let Err(e) = fs::remove_file(self.entry_path(&key)) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(key = %key, error = %crate::untrusted::chain(&e), "cannot evict cache entry");
                    continue;
                }
            }
            state.forget(&key);
            tracing::trace!(key = %key, "evicted cache entry");
        }
    }
}

impl BlobCache for DirectoryCache {
    fn add(&self, key: &str) -> Result<Box<dyn CacheWriter>, CacheError> {
        validate_key(key)?;
        let seq = self.inner.wip_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.inner.root.join("wip").join(format!("{key}.{seq}"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| CacheError::io(key, e))?;
        Ok(Box::new(DirWriter {
            inner: self.inner.clone(),
            key: key.to_owned(),
            tmp,
            file: Some(file),
            written: 0,
            generation: seq,
        }))
    }

    fn get(&self, key: &str) -> Result<Arc<dyn CacheReader>, CacheError> {
        validate_key(key)?;
        let mut state = self.inner.lock();
        let Some(entry) = state.entries.get(key) else {
            return Err(CacheError::NotFound(key.to_owned()));
        };
        let (size, generation) = (entry.size, entry.generation);
        let file = match File::open(self.inner.entry_path(key)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Deleted behind our back: the index was stale.
                state.forget(key);
                return Err(CacheError::NotFound(key.to_owned()));
            }
            Err(e) => return Err(CacheError::io(key, e)),
        };
        state.touch(key);
        if let Some(e) = state.entries.get_mut(key) {
            e.readers += 1;
        }
        Ok(Arc::new(DirReader {
            inner: self.inner.clone(),
            key: key.to_owned(),
            file,
            size,
            generation,
        }))
    }

    fn contains(&self, key: &str) -> bool {
        self.inner.lock().entries.contains_key(key)
    }

    fn remove(&self, key: &str) -> Result<(), CacheError> {
        validate_key(key)?;
        let mut state = self.inner.lock();
        match fs::remove_file(self.inner.entry_path(key)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(CacheError::io(key, e)),
        }
        state.forget(key);
        Ok(())
    }

    fn remove_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        let mut state = self.inner.lock();
        let keys: Vec<String> = state
            .entries
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        let mut freed = 0;
        for key in keys {
            match fs::remove_file(self.inner.entry_path(&key)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(CacheError::io(&key, e)),
            }
            freed += state.forget(&key).unwrap_or(0);
        }
        Ok(freed)
    }

    fn usage(&self) -> u64 {
        self.inner.lock().usage
    }
}

/// A pending entry: a file in `wip/`, deleted unless committed.
struct DirWriter {
    inner: Arc<Inner>,
    key: String,
    tmp: PathBuf,
    file: Option<File>,
    written: u64,
    generation: u64,
}

impl Write for DirWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("cache writer already finished"))?;
        let n = file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl CacheWriter for DirWriter {
    fn commit(mut self: Box<Self>) -> Result<(), CacheError> {
        let Some(file) = self.file.take() else {
            return Err(CacheError::io(
                &self.key,
                io::Error::other("writer already finished"),
            ));
        };
        if self.inner.config.sync_add {
            file.sync_all().map_err(|e| CacheError::io(&self.key, e))?;
        }
        drop(file);
        let dst = self.inner.entry_path(&self.key);
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(|e| CacheError::io(&self.key, e))?;
        }
        let mut state = self.inner.lock();
        // Rename under the lock so the index and the directory never disagree.
        fs::rename(&self.tmp, &dst).map_err(|e| CacheError::io(&self.key, e))?;
        state.insert(&self.key, self.written, self.generation);
        self.inner.evict(&mut state, Some(&self.key));
        Ok(())
    }

    fn abort(self: Box<Self>) {
        // Drop does the cleanup.
    }
}

impl Drop for DirWriter {
    fn drop(&mut self) {
        // Runs after an abort, an early return or a failed commit; after a successful commit the
        // temp file has been renamed and this is a no-op.
        self.file.take();
        if let Err(e) = fs::remove_file(&self.tmp) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(key = %self.key, error = %crate::untrusted::chain(&e), "cannot delete aborted cache entry");
            }
        }
    }
}

/// A committed entry open for reading; counts as "in use" until dropped.
struct DirReader {
    inner: Arc<Inner>,
    key: String,
    file: File,
    size: u64,
    generation: u64,
}

impl CacheReader for DirReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

impl Drop for DirReader {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        if let Some(e) = state.entries.get_mut(&self.key) {
            if e.generation == self.generation {
                e.readers = e.readers.saturating_sub(1);
            }
        }
        self.inner.evict(&mut state, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(c: &DirectoryCache, key: &str, data: &[u8]) {
        let mut w = c.add(key).unwrap();
        w.write_all(data).unwrap();
        w.commit().unwrap();
    }

    fn read_all(c: &DirectoryCache, key: &str) -> Vec<u8> {
        let r = c.get(key).unwrap();
        let mut buf = vec![0; r.size() as usize];
        let n = r.read_at(&mut buf, 0).unwrap();
        buf.truncate(n);
        buf
    }

    fn wip_files(c: &DirectoryCache) -> usize {
        fs::read_dir(c.root().join("wip")).unwrap().count()
    }

    #[test]
    fn commit_makes_entry_visible() {
        let dir = tempfile::tempdir().unwrap();
        let c = DirectoryCache::open(dir.path(), Default::default()).unwrap();
        let mut w = c.add("abcdef").unwrap();
        w.write_all(b"hello").unwrap();
        assert!(matches!(c.get("abcdef"), Err(CacheError::NotFound(_))));
        assert!(!c.contains("abcdef"));
        w.commit().unwrap();
        assert_eq!(read_all(&c, "abcdef"), b"hello");
        assert!(dir.path().join("ab").join("abcdef").is_file());
        assert_eq!(c.usage(), 5);
        assert_eq!(wip_files(&c), 0);
        let r = c.get("abcdef").unwrap();
        assert!(r.file().is_some());
    }

    #[test]
    fn abort_and_drop_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = DirectoryCache::open(dir.path(), Default::default()).unwrap();
        let mut w = c.add("k1").unwrap();
        w.write_all(b"partial").unwrap();
        assert_eq!(wip_files(&c), 1);
        w.abort();
        {
            let mut w = c.add("k2").unwrap();
            w.write_all(b"partial").unwrap();
        }
        assert_eq!(wip_files(&c), 0);
        assert!(!c.contains("k1") && !c.contains("k2"));
        assert_eq!(c.usage(), 0);
    }

    #[test]
    fn invalid_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let c = DirectoryCache::open(dir.path(), Default::default()).unwrap();
        assert!(matches!(c.add("../etc"), Err(CacheError::InvalidKey(_))));
        assert!(matches!(c.get("a/b"), Err(CacheError::InvalidKey(_))));
    }

    #[test]
    fn eviction_respects_budget_lru_and_readers() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DirectoryCacheConfig {
            max_bytes: Some(30),
            sync_add: true,
        };
        let c = DirectoryCache::open(dir.path(), cfg).unwrap();
        put(&c, "aa1", &[1; 10]);
        put(&c, "aa2", &[2; 10]);
        put(&c, "aa3", &[3; 10]);
        // Touch aa1 so aa2 is the least recently used; keep aa1 open (in use).
        let held = c.get("aa1").unwrap();
        put(&c, "aa4", &[4; 10]);
        assert!(c.contains("aa1") && !c.contains("aa2") && c.contains("aa3") && c.contains("aa4"));
        assert_eq!(c.usage(), 30);
        // aa1 is the oldest but in use: aa3 goes instead.
        put(&c, "aa5", &[5; 10]);
        assert!(c.contains("aa1") && !c.contains("aa3"));
        let mut buf = [0; 10];
        assert_eq!(held.read_at(&mut buf, 0).unwrap(), 10);
        assert_eq!(buf, [1; 10]);
        drop(held);
        put(&c, "aa6", &[6; 10]);
        assert!(!c.contains("aa1"));
        assert!(c.usage() <= 30);
        // Everything on disk is in the index and vice versa.
        let on_disk = scan(dir.path()).unwrap().len();
        assert_eq!(on_disk, c.len());
    }

    #[test]
    fn remove_with_open_reader_keeps_data_readable() {
        let dir = tempfile::tempdir().unwrap();
        let c = DirectoryCache::open(dir.path(), Default::default()).unwrap();
        put(&c, "layer1-0-5", b"01234");
        put(&c, "layer1-5-5", b"56789");
        put(&c, "layer2-0-3", b"abc");
        let r = c.get("layer1-0-5").unwrap();
        assert_eq!(c.remove_prefix("layer1-").unwrap(), 10);
        assert!(!c.contains("layer1-0-5") && c.contains("layer2-0-3"));
        let mut buf = [0; 5];
        assert_eq!(r.read_at(&mut buf, 0).unwrap(), 5);
        assert_eq!(&buf, b"01234");
        // Re-adding the key while the old reader is open does not confuse the reader count.
        put(&c, "layer1-0-5", b"xxxxx");
        drop(r);
        c.remove("layer2-0-3").unwrap();
        c.remove("layer2-0-3").unwrap();
        assert_eq!(c.usage(), 5);
    }

    #[test]
    fn restart_scans_entries_and_cleans_wip() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = DirectoryCache::open(dir.path(), Default::default()).unwrap();
            put(&c, "old1", b"one");
            put(&c, "old2", b"two2");
            let mut w = c.add("pending").unwrap();
            w.write_all(b"zzz").unwrap();
            std::mem::forget(w); // simulate a crash mid-write
        }
        assert_eq!(fs::read_dir(dir.path().join("wip")).unwrap().count(), 1);
        let c = DirectoryCache::open(dir.path(), Default::default()).unwrap();
        assert_eq!(wip_files(&c), 0);
        assert_eq!(c.usage(), 7);
        assert_eq!(read_all(&c, "old2"), b"two2");
        assert!(!c.contains("pending"));
        // A budget below usage on restart evicts down to it.
        drop(c);
        let cfg = DirectoryCacheConfig {
            max_bytes: Some(4),
            sync_add: false,
        };
        let c = DirectoryCache::open(dir.path(), cfg).unwrap();
        assert!(c.usage() <= 4);
    }
}
