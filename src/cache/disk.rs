//! The disk store: one sparse cache file per regular file of a layer, holding its decompressed
//! bytes at their file offsets, filled chunk by chunk.
//!
//! Which chunks are readable is tracked by the layer's chunk map (set only with a
//! [`Committed`](super::Committed) proof), so a crash mid-write leaves bytes that are simply
//! never served; an aborted chunk's bytes are punched out. The directory outlives the daemon (it
//! is named after the snapshot's mountpoint); the next mount re-hashes what it finds
//! ([`LayerCache::reuse`]). A fully filled file is exactly the file's content, which is what
//! FUSE passthrough hands to the kernel.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{ChunkKey, ChunkSink, Committed, LayerCache, Writer};

/// Mode of every cache directory: the decompressed files of every image (including files
/// that are 0600 inside the image) must not be readable by other local users.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every cache file, for the same reason.
pub const FILE_MODE: u32 = 0o600;

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
}

impl DiskCache {
    /// Uses (and creates) `dir`; the layer manager deletes it when the snapshot goes. A
    /// directory reused from an earlier run is made private, its files too.
    pub fn new(dir: &Path, max_open: usize) -> io::Result<Self> {
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
        Ok(DiskCache {
            dir: dir.to_path_buf(),
            open: Mutex::new(HashMap::new()),
            max_open: max_open.max(1),
        })
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(self.path(ino))?;
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

/// The store side of one chunk's [`Writer`]: positional writes into the cache file; an aborted
/// chunk's bytes are punched out again.
struct DiskSink {
    file: Arc<File>,
    range: Range<u64>,
    written: bool,
}

impl ChunkSink for DiskSink {
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        self.written = true;
        self.file.write_all_at(data, offset)
    }

    fn commit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn abort(&mut self) {
        if self.written {
            if let Err(e) = punch(&self.file, self.range.clone()) {
                tracing::warn!(error = %e, "cannot discard an aborted chunk's bytes");
            }
        }
    }
}

impl LayerCache for DiskCache {
    fn add(&self, key: &ChunkKey) -> io::Result<Writer> {
        let file = self.open(key.ino, key.size)?;
        let sink = DiskSink {
            file,
            range: key.range.clone(),
            written: false,
        };
        Ok(Writer::new(Box::new(sink), key.range.clone()))
    }

    fn read_at(&self, ino: u64, size: u64, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.open(ino, size)?.read_exact_at(buf, offset)
    }

    fn reuse(
        &self,
        key: &ChunkKey,
        verify: &mut dyn FnMut(&mut dyn io::Read) -> bool,
    ) -> Option<Committed> {
        let file = File::open(self.path(key.ino)).ok()?;
        if !file.metadata().is_ok_and(|m| m.len() == key.size) || has_hole(&file, key.range.clone())
        {
            return None;
        }
        let mut bytes = RangeReader {
            file: &file,
            pos: key.range.start,
            end: key.range.end,
        };
        verify(&mut bytes).then_some(Committed(()))
    }

    fn backing_file(&self, ino: u64) -> Option<File> {
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
        Some(self.path(ino))
    }
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
        let c = DiskCache::new(&dir, 8).unwrap();
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
        let c = DiskCache::new(&dir, 8).unwrap();
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
        let c = DiskCache::new(&d.path().join("layer"), 8).unwrap();
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
