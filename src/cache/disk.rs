//! The disk store: one sparse cache file per regular file of a layer, holding its decompressed
//! bytes at their file offsets, filled chunk by chunk.
//!
//! Which chunks are readable is tracked by the layer's chunk map (set only with a
//! [`Committed`](super::Committed) proof), so a crash mid-write leaves bytes that are simply
//! never served; an aborted chunk's bytes are punched out. The directory outlives the daemon (it
//! is named after the snapshot's mountpoint); the next mount re-hashes what it finds
//! ([`LayerCache::reuse`]). A fully filled file is exactly the file's content, which is what
//! FUSE passthrough hands to the kernel.
//!
//! Small files (at most [`SMALL_FILE_MAX`] bytes: nine in ten files of a typical image) are
//! first written into the layer's *small-file store* instead: one sparse file ([`SMALL_NAME`])
//! with a block-aligned place for each of them, laid out by inode from the TOC, so a restart
//! finds their bytes where it left them. A cold start caches hundreds of small files a second,
//! and creating a file costs far more than writing its few KiB (an inode, a directory entry;
//! on ext4 without a journal, a scan past every recently deleted inode of the group: half the
//! daemon's CPU time in a cold start measured on such a file system). Once the layer is fully
//! cached, [`LayerCache::unpack`] moves each into a cache file of its own, off the cold path, so
//! that a warm layer is what it was without the store: one file per file, for passthrough and
//! the native tree. Until then small files are read through the daemon.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use super::{ChunkKey, ChunkSink, Committed, LayerCache, Writer};

/// Mode of every cache directory: the decompressed files of every image (including files
/// that are 0600 inside the image) must not be readable by other local users.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every cache file, for the same reason.
pub const FILE_MODE: u32 = 0o600;
/// Regular files of at most this many bytes go to the small-file store while the layer is
/// fetched (see the module doc).
const SMALL_FILE_MAX: u64 = 64 << 10;
/// The small-file store's name in a layer's cache directory (cache files are named by inode).
const SMALL_NAME: &str = "small";
/// Where each small file's bytes start in the store: on a block of their own, so that punching
/// one file's range out never touches another's and a hole there means what it does in a file
/// of its own.
const SMALL_ALIGN: u64 = 4096;

/// Creates `dir` (and missing parents) as [`DIR_MODE`] from the start, and narrows it to
/// [`DIR_MODE`] if it already existed with looser permissions (left by an older version).
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    tighten(dir, DIR_MODE)
}

/// Removes the group/other bits of `path` if it has any (never follows a symlink: a symlink
/// is left alone).
fn tighten(path: &Path, mode: u32) -> io::Result<()> {
    let md = std::fs::symlink_metadata(path)?;
    if !md.file_type().is_symlink() && md.permissions().mode() & 0o077 != 0 {
        tracing::info!(path = %path.display(), mode = format!("{:o}", md.permissions().mode() & 0o7777), "making cache private");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// The cache directory of one layer.
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    /// Open cache files kept around; past `max_open` the table is emptied (fds are cheap to
    /// reopen).
    open: Mutex<HashMap<u64, Arc<File>>>,
    max_open: usize,
    /// The small-file store until every file in it moved out (None: no small file left in it).
    /// Reads of it hold the lock for reading, so a file moves out between two reads, never
    /// during one.
    small: RwLock<Option<Small>>,
    /// Moving the small files out failed once: they stay in the store for this mount (tried
    /// again on every scan, it would only fail and log again).
    stuck: std::sync::atomic::AtomicBool,
}

/// The small-file store of a layer; see the module doc.
#[derive(Debug)]
struct Small {
    file: Arc<File>,
    /// (inode, offset of its bytes in `file`, size), sorted by inode; a file that moved out
    /// has [`MOVED`] as its offset.
    places: Vec<(u64, u64, u64)>,
    /// Files not moved out yet.
    left: usize,
}

/// The offset of a place whose file moved out of the store.
const MOVED: u64 = u64::MAX;

impl Small {
    /// Where the bytes of `ino` start in the store, unless it has no place there (any more).
    fn place(&self, ino: u64) -> Option<u64> {
        let i = self.places.binary_search_by_key(&ino, |p| p.0).ok()?;
        Some(self.places[i].1).filter(|&o| o != MOVED)
    }

    /// `ino` has a cache file of its own now.
    fn moved(&mut self, ino: u64) {
        if mark_moved(&mut self.places, ino) {
            self.left -= 1;
        }
    }
}

/// Marks the place of `ino` in `places` (sorted by inode) as given up; false if it had none
/// (any more).
fn mark_moved(places: &mut [(u64, u64, u64)], ino: u64) -> bool {
    match places.binary_search_by_key(&ino, |p| p.0) {
        Ok(i) if places[i].1 != MOVED => {
            places[i].1 = MOVED;
            true
        }
        _ => false,
    }
}

impl DiskCache {
    /// Uses (and creates) `dir`; the layer manager deletes it when the snapshot goes. A
    /// directory reused from an earlier run is made private, its files too. `files` lists the
    /// layer's regular files by (inode, size): those of at most [`SMALL_FILE_MAX`] bytes go to
    /// the small-file store, except those an earlier run already moved out of it.
    pub fn new(dir: &Path, max_open: usize, files: &[(u64, u64)]) -> io::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)?;
        // Files first, the directory last: a directory that is private already (made by this
        // version, or fixed completely before) holds only private files, so it is not listed.
        if std::fs::symlink_metadata(dir)?.permissions().mode() & 0o077 != 0 {
            for e in std::fs::read_dir(dir)? {
                let e = e?;
                if e.file_type()?.is_file() && e.metadata()?.nlink() == 1 {
                    tighten(&e.path(), FILE_MODE)?;
                }
            }
            tighten(dir, DIR_MODE)?;
        }
        let small = open_small(dir, files)?;
        Ok(DiskCache {
            dir: dir.to_path_buf(),
            open: Mutex::new(HashMap::new()),
            max_open: max_open.max(1),
            small: RwLock::new(small),
            stuck: Default::default(),
        })
    }

    fn small(&self) -> std::sync::RwLockReadGuard<'_, Option<Small>> {
        self.small.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The store and the offset of `ino`'s bytes in it, if it is there.
    fn small_place(&self, ino: u64) -> Option<(Arc<File>, u64)> {
        let small = self.small();
        let s = small.as_ref()?;
        s.place(ino).map(|base| (s.file.clone(), base))
    }

    /// Runs `f` on the file holding `ino`'s bytes and the offset of its byte 0 there: its place
    /// in the small-file store (kept locked for reading meanwhile, so the file cannot move out
    /// under `f`) or its own cache file, opened by `own`.
    fn with_file<R>(
        &self,
        ino: u64,
        own: impl FnOnce() -> io::Result<Arc<File>>,
        f: impl FnOnce(&File, u64) -> io::Result<R>,
    ) -> io::Result<R> {
        {
            let small = self.small();
            if let Some(s) = small.as_ref() {
                if let Some(base) = s.place(ino) {
                    return f(&s.file, base);
                }
            }
        }
        f(&*own()?, 0)
    }

    /// Moves the small file `ino` (`size` bytes at `base` in `store`) into a cache file of its
    /// own: copied to a temporary name, renamed into place, its place in the store given up
    /// (under the write lock: no read of it is in progress) and punched out. No chunk of it
    /// may be being written (a writer keeps writing to the store).
    fn move_out(&self, store: &File, ino: u64, base: u64, size: u64) -> io::Result<()> {
        let tmp = self.dir.join(format!("{ino}{TMP_SUFFIX}"));
        let file = private_file(&tmp, true)?;
        let mut buf = vec![0u8; usize::try_from(size).unwrap_or(usize::MAX)];
        store.read_exact_at(&mut buf, base)?;
        file.write_all_at(&buf, 0)?;
        std::fs::rename(&tmp, self.path(ino))?;
        if let Some(s) = self
            .small
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            s.moved(ino);
        }
        punch(store, base..(base + size).next_multiple_of(SMALL_ALIGN))
    }

    fn path(&self, ino: u64) -> PathBuf {
        self.dir.join(ino.to_string())
    }

    /// The cache file of inode `ino`, created sparse with the file's `size` on first use.
    fn open(&self, ino: u64, size: u64) -> io::Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = open.get(&ino) {
            return Ok(f.clone());
        }
        let file = private_file(&self.path(ino), false)?;
        let md = file.metadata()?;
        // A file linked into the layer's native tree has the mode of the image's file
        // (`fs::native`); the private directory keeps it private.
        if md.permissions().mode() & 0o077 != 0 && md.nlink() == 1 {
            file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
        }
        if md.len() != size {
            file.set_len(size)?;
        }
        let file = Arc::new(file);
        if open.len() >= self.max_open {
            open.clear();
        }
        open.insert(ino, file.clone());
        Ok(file)
    }
}

/// Suffix of a small file's copy while it moves out of the store (`<inode>.moving`, left only
/// by a crash; the next mount removes it).
const TMP_SUFFIX: &str = ".moving";

/// The small-file store of a layer whose regular files are `files` (inode, size): created, or
/// reopened with what an earlier run left in it. None when no small file is (still) in it; a
/// store left with nothing in it is removed.
fn open_small(dir: &Path, files: &[(u64, u64)]) -> io::Result<Option<Small>> {
    let mut places: Vec<(u64, u64, u64)> = Vec::new();
    let mut sorted: Vec<(u64, u64)> = files
        .iter()
        .copied()
        .filter(|&(_, size)| size > 0 && size <= SMALL_FILE_MAX)
        .collect();
    sorted.sort_unstable();
    sorted.dedup_by_key(|f| f.0);
    let mut end = 0u64;
    for (ino, size) in sorted {
        places.push((ino, end, size));
        end = (end + size).next_multiple_of(SMALL_ALIGN);
    }
    let mut left = places.len();
    // Files an earlier run moved out (they have a cache file of their own), and copies a crash
    // cut short.
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name
            .strip_suffix(TMP_SUFFIX)
            .is_some_and(|ino| ino.parse::<u64>().is_ok())
        {
            std::fs::remove_file(e.path())?;
        } else if let Ok(ino) = name.parse::<u64>() {
            if mark_moved(&mut places, ino) {
                left -= 1;
            }
        }
    }
    let path = dir.join(SMALL_NAME);
    if left == 0 {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => return Ok(None),
        }
    }
    let file = private_file(&path, false)?;
    tighten(&path, FILE_MODE)?;
    if file.metadata()?.len() != end {
        file.set_len(end)?;
    }
    Ok(Some(Small {
        file: Arc::new(file),
        places,
        left,
    }))
}

/// The store side of one chunk's [`Writer`]: positional writes into the cache file (its own,
/// or the small-file store at `base`); an aborted chunk's bytes are punched out again.
struct DiskSink {
    file: Arc<File>,
    base: u64,
    range: Range<u64>,
    written: bool,
}

impl ChunkSink for DiskSink {
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        self.written = true;
        self.file.write_all_at(data, self.base + offset)
    }

    fn commit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn abort(&mut self) {
        if self.written {
            let at = self.base + self.range.start..self.base + self.range.end;
            if let Err(e) = punch(&self.file, at) {
                tracing::warn!(error = %e, "cannot discard an aborted chunk's bytes");
            }
        }
    }
}

impl LayerCache for DiskCache {
    fn add(&self, key: &ChunkKey) -> io::Result<Writer> {
        let (file, base) = match self.small_place(key.ino) {
            Some(place) => place,
            None => (self.open(key.ino, key.size)?, 0),
        };
        let sink = DiskSink {
            file,
            base,
            range: key.range.clone(),
            written: false,
        };
        Ok(Writer::new(Box::new(sink), key.range.clone()))
    }

    fn read_at(&self, ino: u64, size: u64, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with_file(
            ino,
            || self.open(ino, size),
            |f, base| f.read_exact_at(buf, base + offset),
        )
    }

    fn reuse(
        &self,
        key: &ChunkKey,
        verify: &mut dyn FnMut(&mut dyn io::Read) -> bool,
    ) -> Option<Committed> {
        let own = || {
            let file = File::open(self.path(key.ino))?;
            if file.metadata()?.len() != key.size {
                return Err(io::Error::other("cache file of another size"));
            }
            Ok(Arc::new(file))
        };
        let whole = self.with_file(key.ino, own, |file, base| {
            let range = base + key.range.start..base + key.range.end;
            if has_hole(file, range.clone()) {
                return Ok(false);
            }
            let mut bytes = RangeReader {
                file,
                pos: range.start,
                end: range.end,
            };
            Ok(verify(&mut bytes))
        });
        whole.unwrap_or(false).then_some(Committed(()))
    }

    fn backing_file(&self, ino: u64) -> Option<File> {
        if self.small_place(ino).is_some() {
            return None;
        }
        File::open(self.path(ino)).ok()
    }

    /// Drops the bytes of `range` in the cache file of `ino` (a chunk that failed
    /// verification), so they neither stay on disk nor can be served later: the range is
    /// punched out, or overwritten with zeros where the filesystem cannot punch holes. The
    /// file keeps its size; a file that does not exist has nothing to drop.
    fn discard(&self, ino: u64, range: Range<u64>) -> io::Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        {
            let small = self.small();
            if let Some((s, base)) = small.as_ref().and_then(|s| Some((s, s.place(ino)?))) {
                return punch(&s.file, base + range.start..base + range.end);
            }
        }
        let cached = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
            .cloned();
        let file = match cached {
            Some(f) => f,
            None => match OpenOptions::new().write(true).open(self.path(ino)) {
                Ok(f) => Arc::new(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            },
        };
        punch(&file, range)
    }

    /// Deletes the layer's cache (unmount frees its disk space).
    fn dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }

    fn file_path(&self, ino: u64) -> Option<PathBuf> {
        if self.small_place(ino).is_some() {
            return None;
        }
        Some(self.path(ino))
    }

    fn unpack(&self) -> io::Result<usize> {
        let (store, files) = {
            let small = self.small();
            let Some(s) = small.as_ref() else {
                return Ok(0);
            };
            let files: Vec<(u64, u64, u64)> =
                s.places.iter().copied().filter(|p| p.1 != MOVED).collect();
            (s.file.clone(), files)
        };
        for &(ino, base, size) in &files {
            if let Err(e) = self.move_out(&store, ino, base, size) {
                self.stuck.store(true, std::sync::atomic::Ordering::SeqCst);
                return Err(e);
            }
        }
        let mut small = self.small.write().unwrap_or_else(|e| e.into_inner());
        if small.as_ref().is_some_and(|s| s.left == 0) {
            *small = None;
            std::fs::remove_file(self.dir.join(SMALL_NAME))?;
        }
        Ok(files.len())
    }

    fn packed(&self) -> bool {
        self.small().is_some() && !self.stuck.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Opens (creating it 0600 if needed) the cache file `path` for reading and writing, emptied if
/// `truncate`.
fn private_file(path: &Path, truncate: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(FILE_MODE)
        .open(path)
}

/// Reads `[pos, end)` of a file.
struct RangeReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl io::Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.end - self.pos)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// True when `range` of `file` contains a hole: bytes never written, so the chunk cannot be
/// whole (a written chunk, even all zeros, is data). Spares hashing the zeros of sparse files.
/// When the filesystem can't tell, says no and lets the hash decide.
fn has_hole(file: &File, range: Range<u64>) -> bool {
    if range.is_empty() {
        return false;
    }
    let Ok(off) = libc::off_t::try_from(range.start) else {
        return false;
    };
    // Moves only this descriptor's position, which nothing uses (all I/O here is positional).
    nix::unistd::lseek(file, off, nix::unistd::Whence::SeekHole)
        .is_ok_and(|h| u64::try_from(h).is_ok_and(|h| h < range.end))
}

/// Punches `range` out of `file` (it reads as zeros and takes no disk), or overwrites it with
/// zeros where the file system cannot punch holes. The file keeps its size.
fn punch(file: &File, range: Range<u64>) -> io::Result<()> {
    let too_big = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {range:?} out of bounds"),
        )
    };
    let off = i64::try_from(range.start).map_err(|_| too_big())?;
    let len = i64::try_from(range.end - range.start).map_err(|_| too_big())?;
    use nix::fcntl::{fallocate, FallocateFlags};
    match fallocate(
        file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    ) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) | Err(nix::errno::Errno::ENOSYS) => {
            zero_fill(file, range)
        }
        Err(e) => Err(e.into()),
    }
}

/// Overwrites `range` with zeros, within the file's current size.
fn zero_fill(file: &File, range: Range<u64>) -> io::Result<()> {
    const BLOCK: u64 = 64 << 10;
    let end = range.end.min(file.metadata()?.len());
    let zeros = vec![0u8; BLOCK as usize];
    let mut pos = range.start;
    while pos < end {
        let n = (end - pos).min(BLOCK);
        file.write_all_at(&zeros[..n as usize], pos)?;
        pos += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn new_dirs_and_files_are_private_from_the_start() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("fscache").join("layer");
        let c = DiskCache::new(&dir, 8, &[]).unwrap();
        assert_eq!(mode(&d.path().join("fscache")), DIR_MODE);
        assert_eq!(mode(&dir), DIR_MODE);
        c.open(7, 10).unwrap();
        assert_eq!(mode(&dir.join("7")), FILE_MODE);
    }

    #[test]
    fn an_old_world_readable_cache_is_fixed_on_reopen() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("layer");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for name in ["1", "2"] {
            std::fs::write(dir.join(name), b"secret").unwrap();
            std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
        let c = DiskCache::new(&dir, 8, &[]).unwrap();
        assert_eq!(mode(&dir), DIR_MODE);
        assert_eq!(mode(&dir.join("1")), FILE_MODE);
        assert_eq!(mode(&dir.join("2")), FILE_MODE);
        // And a file loosened later is fixed when opened.
        std::fs::set_permissions(dir.join("1"), std::fs::Permissions::from_mode(0o644)).unwrap();
        c.open(1, 6).unwrap();
        assert_eq!(mode(&dir.join("1")), FILE_MODE);
        assert_eq!(
            std::fs::read(dir.join("1")).unwrap(),
            b"secret",
            "contents kept"
        );
    }

    #[test]
    fn private_dir_narrows_an_existing_dir() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("x");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), DIR_MODE);
    }

    #[test]
    fn discard_punches_a_hole_that_reads_as_zeros() {
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::new(&d.path().join("layer"), 8, &[]).unwrap();
        const SIZE: u64 = 1 << 20;
        let f = c.open(3, SIZE).unwrap();
        f.write_all_at(&vec![0xAB; SIZE as usize], 0).unwrap();
        f.sync_all().unwrap();
        // Page-aligned so a filesystem that punches holes must report one.
        let hole = 256 << 10..512 << 10;
        c.discard(3, hole.clone()).unwrap();
        let mut buf = vec![0u8; SIZE as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(
            buf[..hole.start as usize].iter().all(|&b| b == 0xAB),
            "before the range kept"
        );
        assert!(
            buf[hole.start as usize..hole.end as usize]
                .iter()
                .all(|&b| b == 0),
            "range zeroed"
        );
        assert!(
            buf[hole.end as usize..].iter().all(|&b| b == 0xAB),
            "after the range kept"
        );
        assert_eq!(f.metadata().unwrap().len(), SIZE, "size kept");

        // SEEK_HOLE from the start finds the punched range (unless the fs cannot punch).
        let at = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
        assert!(at >= 0, "lseek: {}", io::Error::last_os_error());
        let punched = at as u64 == hole.start;
        let fs_supports_holes = {
            let probe = d.path().join("probe");
            let p = File::create(&probe).unwrap();
            p.write_all_at(&[1u8; 8192], 0).unwrap();
            fallocate_probe(&p)
        };
        if fs_supports_holes {
            assert!(punched, "SEEK_HOLE found {at}, want {}", hole.start);
        }

        // Discarding in a file never opened (or not there) is fine.
        c.discard(99, 0..10).unwrap();
        c.discard(3, 10..10).unwrap();
    }

    fn key(ino: u64, size: u64, range: Range<u64>) -> ChunkKey {
        ChunkKey { ino, size, range }
    }

    /// Writes and commits `bytes` as chunk `range` of `ino`.
    fn put(c: &DiskCache, ino: u64, size: u64, range: Range<u64>, bytes: &[u8]) {
        use std::io::Write;
        let mut w = c.add(&key(ino, size, range)).unwrap();
        w.write_all(bytes).unwrap();
        w.commit().unwrap();
    }

    fn read(c: &DiskCache, ino: u64, size: u64) -> Vec<u8> {
        let mut buf = vec![0u8; size as usize];
        c.read_at(ino, size, &mut buf, 0).unwrap();
        buf
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    }

    /// While a layer is fetched its small files are written into one store, creating no file
    /// of their own; read back, discarded and aborted there without touching a neighbour; then
    /// moved out, each into a cache file that holds exactly its content.
    #[test]
    fn small_files_share_one_store_until_they_move_out() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("layer");
        let big = SMALL_FILE_MAX + 1;
        let files = [(1, 100), (2, 5000), (3, big), (4, SMALL_FILE_MAX), (5, 0)];
        let c = DiskCache::new(&dir, 8, &files).unwrap();
        assert!(c.packed());
        put(&c, 1, 100, 0..100, &[1; 100]);
        put(&c, 2, 5000, 0..3000, &[2; 3000]);
        put(&c, 2, 5000, 3000..5000, &[22; 2000]);
        put(&c, 3, big, 0..big, &vec![3; big as usize]);
        put(
            &c,
            4,
            SMALL_FILE_MAX,
            0..SMALL_FILE_MAX,
            &vec![4; SMALL_FILE_MAX as usize],
        );
        assert_eq!(
            names(&dir),
            ["3", SMALL_NAME],
            "only the big file has its own"
        );
        assert_eq!(mode(&dir.join(SMALL_NAME)), FILE_MODE);
        assert_eq!(read(&c, 1, 100), [1; 100]);
        let two = read(&c, 2, 5000);
        assert!(two[..3000].iter().all(|&b| b == 2) && two[3000..].iter().all(|&b| b == 22));
        assert!(c.backing_file(1).is_none() && c.file_path(2).is_none());
        assert!(c.backing_file(3).is_some() && c.file_path(3).is_some());

        // An aborted chunk and a discarded one leave their neighbours alone.
        {
            use std::io::Write;
            let mut w = c.add(&key(1, 100, 0..100)).unwrap();
            w.write_all(&[9; 50]).unwrap();
        }
        assert_eq!(read(&c, 1, 100)[50..], [0; 50], "aborted bytes punched out");
        c.discard(2, 0..3000).unwrap();
        let two = read(&c, 2, 5000);
        assert!(two[..3000].iter().all(|&b| b == 0) && two[3000..].iter().all(|&b| b == 22));
        assert_eq!(
            read(&c, 4, SMALL_FILE_MAX),
            vec![4; SMALL_FILE_MAX as usize]
        );
        put(&c, 1, 100, 0..100, &[1; 100]);
        put(&c, 2, 5000, 0..3000, &[2; 3000]);

        assert_eq!(c.unpack().unwrap(), 3);
        assert!(!c.packed());
        assert_eq!(names(&dir), ["1", "2", "3", "4"], "the store is gone");
        assert_eq!(std::fs::read(dir.join("1")).unwrap(), [1; 100]);
        let two = std::fs::read(dir.join("2")).unwrap();
        assert!(two[..3000].iter().all(|&b| b == 2) && two[3000..].iter().all(|&b| b == 22));
        assert_eq!(mode(&dir.join("2")), FILE_MODE);
        assert_eq!(
            read(&c, 4, SMALL_FILE_MAX),
            vec![4; SMALL_FILE_MAX as usize]
        );
        assert!(c.backing_file(1).is_some());
        assert_eq!(c.file_path(2), Some(dir.join("2")));
        assert_eq!(c.unpack().unwrap(), 0, "nothing left to move");
    }

    /// A move that fails (here: the directory is gone) leaves the files readable where they
    /// are and is not tried again.
    #[test]
    fn a_failed_move_out_leaves_the_store_as_it_is() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("layer");
        let c = DiskCache::new(&dir, 8, &[(1, 100)]).unwrap();
        put(&c, 1, 100, 0..100, &[1; 100]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(c.unpack().is_err());
        assert!(!c.packed(), "not tried again");
        assert_eq!(read(&c, 1, 100), [1; 100]);
    }

    /// A restart finds each small file's bytes where the last run left them (and re-verifies
    /// them), keeps the files that moved out, and removes a copy a crash cut short.
    #[test]
    fn a_restart_finds_the_small_files_where_it_left_them() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("layer");
        let files = [(1, 100), (2, 5000), (3, 10)];
        {
            let c = DiskCache::new(&dir, 8, &files).unwrap();
            put(&c, 1, 100, 0..100, &[1; 100]);
            put(&c, 2, 5000, 0..5000, &[2; 5000]);
        }
        // File 3 was moved out (a crash before the store let it go), file 2 was being copied;
        // a native tree being built is left alone.
        std::fs::write(dir.join("3"), [3; 10]).unwrap();
        std::fs::write(dir.join(format!("2{TMP_SUFFIX}")), [2; 10]).unwrap();
        std::fs::create_dir(dir.join(format!("native{TMP_SUFFIX}"))).unwrap();
        let c = DiskCache::new(&dir, 8, &files).unwrap();
        assert_eq!(
            names(&dir),
            ["3", &format!("native{TMP_SUFFIX}"), SMALL_NAME]
        );
        let check = |ino, size, want: u8| {
            c.reuse(&key(ino, size, 0..size), &mut |r: &mut dyn io::Read| {
                let mut b = Vec::new();
                r.read_to_end(&mut b).unwrap();
                b.len() == size as usize && b.iter().all(|&x| x == want)
            })
        };
        assert!(check(1, 100, 1).is_some());
        assert!(check(2, 5000, 2).is_some());
        assert!(check(3, 10, 3).is_some(), "the moved-out file is its own");
        assert!(check(1, 100, 7).is_none(), "verification still decides");
        assert_eq!(read(&c, 3, 10), [3; 10]);
        assert_eq!(c.unpack().unwrap(), 2);
        drop(c);
        let c = DiskCache::new(&dir, 8, &files).unwrap();
        assert!(!c.packed(), "everything moved out: no store again");
        assert_eq!(names(&dir), ["1", "2", "3", &format!("native{TMP_SUFFIX}")]);

        // A never written small file is a hole: not reused, not even hashed.
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::new(d.path(), 8, &files).unwrap();
        let mut hashed = false;
        let none = c.reuse(&key(2, 5000, 0..5000), &mut |_: &mut dyn io::Read| {
            hashed = true;
            true
        });
        assert!(none.is_none() && !hashed);
    }

    #[test]
    fn zero_fill_fallback_stays_within_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, vec![7u8; 200_000]).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        zero_fill(&f, 100..150_000).unwrap();
        zero_fill(&f, 199_990..300_000).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 200_000, "never grows the file");
        assert!(data[..100].iter().all(|&b| b == 7));
        assert!(data[100..150_000].iter().all(|&b| b == 0));
        assert!(data[150_000..199_990].iter().all(|&b| b == 7));
        assert!(data[199_990..].iter().all(|&b| b == 0));
    }

    /// Whether this filesystem punches holes at all.
    fn fallocate_probe(f: &File) -> bool {
        use nix::fcntl::{fallocate, FallocateFlags};
        fallocate(
            f,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            4096,
        )
        .is_ok()
    }
}
