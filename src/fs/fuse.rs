//! The FUSE face of a layer: answers the kernel from the inode table and the reader.
//! Read-only: every mutating call is EROFS. Errors become errno here and only here.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request,
};

use super::inode::{Node, NodeKind, ROOT_INO, STATE_DIR_INO, STATE_DIR_NAME, STATE_FILE_INO};
use super::keeper::Keeper;
use super::reader::LayerReader;
use super::FsError;

/// Directory listings are left in the kernel's cache from this attribute timeout on (see
/// `opendir`).
const MIN_TTL_TO_CACHE_DIRS: Duration = Duration::from_secs(60);
const BLOCK_SIZE: u32 = 4096;

/// FUSE filesystem of one layer.
pub struct LayerFs {
    reader: Arc<LayerReader>,
    ttl: Duration,
    passthrough: AtomicBool,
    next_fh: AtomicU64,
    handles: Mutex<Handles>,
    misses: MissWorkers,
    /// Where passthrough backing ids are recorded so that the next daemon can reuse them.
    keep: Option<Arc<KeepLink>>,
}

/// The keeper holding this layer's connection, and the layer's mountpoint (its key there).
struct KeepLink {
    keeper: Arc<Keeper>,
    mountpoint: PathBuf,
}

/// A passthrough backing id of this connection. While a keeper holds the connection, the id
/// is recorded there from just after it is opened until just before it is closed (this Drop
/// runs before the BackingId's, which closes it): the keeper never lists a closed id, whose
/// number the kernel could have given to another file since.
struct Backing {
    id: BackingId,
    raw: u32,
    ino: u64,
    keep: Option<Arc<KeepLink>>,
}

impl Drop for Backing {
    fn drop(&mut self) {
        if let Some(k) = &self.keep {
            k.keeper.backing(&k.mountpoint, self.ino, self.raw, false);
        }
    }
}

/// A backing id the previous daemon opened on this connection and a live open may still use.
enum Adopted {
    Raw(u32),
    Live(Arc<Backing>),
}

impl Adopted {
    fn live(&mut self, ino: u64, reply: &ReplyOpen) -> Arc<Backing> {
        match self {
            Adopted::Live(b) => b.clone(),
            Adopted::Raw(raw) => {
                // SAFETY: the id was opened on this connection by the previous daemon and is
                // recorded by the keeper as still open; an adopted id is never closed while
                // this session lives (this Arc stays here), so it cannot be closed under us.
                let b = Arc::new(Backing {
                    id: unsafe { reply.wrap_backing(*raw) },
                    raw: *raw,
                    ino,
                    // Stays recorded: a later daemon adopts it again.
                    keep: None,
                });
                *self = Adopted::Live(b.clone());
                b
            }
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads that serve reads which must wait for the registry.
///
/// FUSE has a fixed pool of dispatch threads per mount; a read that waits for a stalled
/// registry on one of them takes it out of service, and a handful of such reads used to hang
/// every lookup, stat and cached read of the mount. So the dispatch threads only ever answer
/// from memory or the cache, and hand misses over here. Workers are started as misses need them,
/// up to `max`; past that, misses queue (each is a few bytes: the request and its reply) and the
/// registry client's deadlines bound how long any of them waits. Dropping this ends the workers
/// once their current job is done.
struct MissWorkers {
    tx: mpsc::Sender<Job>,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    /// Jobs submitted and not yet finished.
    pending: Arc<AtomicUsize>,
    spawned: Mutex<usize>,
    max: usize,
}

impl MissWorkers {
    fn new(max: usize) -> Self {
        let (tx, rx) = mpsc::channel();
        MissWorkers {
            tx,
            rx: Arc::new(Mutex::new(rx)),
            pending: Arc::new(AtomicUsize::new(0)),
            spawned: Mutex::new(0),
            max: max.max(1),
        }
    }

    fn submit(&self, job: Job) {
        let pending = self.pending.fetch_add(1, Ordering::SeqCst) + 1;
        let mut spawned = self.spawned.lock().unwrap_or_else(|e| e.into_inner());
        if *spawned < pending.min(self.max) {
            let (rx, count) = (self.rx.clone(), self.pending.clone());
            let started = std::thread::Builder::new()
                .name("stargz-miss".into())
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(job) = job else { return };
                    // A panicking read drops its reply (the kernel gets EIO) and its fetch claim
                    // (waiters get an error); the worker itself stays in service.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        tracing::error!("a read panicked; answered EIO");
                    }
                    count.fetch_sub(1, Ordering::SeqCst);
                });
            match started {
                Ok(_) => *spawned += 1,
                Err(e) if *spawned == 0 => {
                    // No worker at all: serve it here rather than leave it queued forever.
                    tracing::warn!(error = %e, "cannot start a read worker; serving the read inline");
                    drop(spawned);
                    job();
                    self.pending.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "cannot start another read worker"),
            }
        }
        drop(spawned);
        // Cannot fail: `self.rx` keeps the channel open.
        let _ = self.tx.send(job);
    }
}

/// Open file handles. The kernel refuses (EIO) a passthrough open of an inode that still has
/// a page-cached open and vice versa, so the mode of each inode's opens is tracked here.
#[derive(Default)]
struct Handles {
    /// Passthrough handles keep their inode's backing id alive; cached ones name their inode.
    by_fh: HashMap<u64, Result<Arc<Backing>, u64>>,
    /// Each inode's backing id while passthrough opens of it live.
    backing: HashMap<u64, Weak<Backing>>,
    cached_opens: HashMap<u64, usize>,
    /// Backing ids of the previous daemon (a resumed session), by inode: reused for every
    /// passthrough open of that inode and kept until the session ends.
    adopted: HashMap<u64, Adopted>,
}

impl LayerFs {
    /// `miss_workers` bounds the threads that serve reads waiting for the registry.
    pub fn new(
        reader: Arc<LayerReader>,
        ttl: Duration,
        passthrough: bool,
        miss_workers: usize,
    ) -> Self {
        // File handles of a previous daemon may still be open on a resumed connection: each
        // daemon numbers its own from its start time (in the high half), so a release of an
        // old handle does not name one of ours.
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        LayerFs {
            reader,
            ttl,
            passthrough: AtomicBool::new(passthrough),
            next_fh: AtomicU64::new((epoch << 32) | 1),
            handles: Mutex::new(Handles::default()),
            misses: MissWorkers::new(miss_workers),
            keep: None,
        }
    }

    /// Records passthrough backing ids with `keeper` under `mountpoint`.
    pub(crate) fn keep_with(mut self, keeper: Arc<Keeper>, mountpoint: &Path) -> Self {
        self.keep = Some(Arc::new(KeepLink {
            keeper,
            mountpoint: mountpoint.to_path_buf(),
        }));
        self
    }

    /// Takes over the backing ids the previous daemon left open (`(inode, id)`); their inodes
    /// stay pinned in the cache, as the kernel may read their files directly at any time.
    pub(crate) fn adopt(self, backing: &[(u64, u32)]) -> Self {
        {
            let mut h = self.handles.lock().unwrap_or_else(|e| e.into_inner());
            for &(ino, id) in backing {
                if self.reader.table.get(ino).is_some() && !h.adopted.contains_key(&ino) {
                    self.reader.pin_open(ino);
                    h.adopted.insert(ino, Adopted::Raw(id));
                }
            }
        }
        self
    }

    fn state_file_name(&self) -> String {
        format!("{}.json", self.reader.digest())
    }

    /// Go's `node_readdir` latency.
    fn readdir_done(&self, started: std::time::Instant) {
        if let Some(m) = self.reader.metrics() {
            m.readdir(started.elapsed());
        }
    }

    /// The state file's JSON, with Go's field names.
    fn state_json(&self) -> Vec<u8> {
        let size = self.reader.blob_size();
        let fetched = self.reader.fetched_size();
        let percent = if size == 0 {
            100.0
        } else {
            fetched as f64 / size as f64 * 100.0
        };
        let mut v = serde_json::json!({
            "digest": self.reader.digest(),
            "size": size,
            "fetchedSize": fetched,
            "fetchedPercent": percent,
        });
        // Our extension: on-disk bytes of verified data in the cache, and evicted so far.
        let (cached, evicted) = self.reader.cache_usage();
        v["cachedSize"] = cached.into();
        v["evictedSize"] = evicted.into();
        // New containers get the layer's plain tree instead of this mount (`fs::native`).
        v["native"] = self.reader.has_native().into();
        if let Some(e) = self.reader.last_error() {
            v["error"] = serde_json::Value::String(e);
        }
        let mut out = serde_json::to_vec(&v).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// How long the kernel may keep what it is told about `ino`: the layer's own entries
    /// never change; the state file's size grows with the fetch, so it is never cached.
    fn ttl_of(&self, ino: INodeNo) -> Duration {
        if ino.0 == STATE_FILE_INO || ino.0 == STATE_DIR_INO {
            Duration::ZERO
        } else {
            self.ttl
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        match ino {
            STATE_DIR_INO => Some(special_attr(ino, FileType::Directory, 0o500, 0)),
            STATE_FILE_INO => Some(special_attr(
                ino,
                FileType::RegularFile,
                0o400,
                self.state_json().len() as u64,
            )),
            _ => self.reader.table.get(ino).map(node_attr),
        }
    }

    fn lookup_name(&self, parent: u64, name: &OsStr) -> Option<FileAttr> {
        let name = name.to_str()?;
        match parent {
            ROOT_INO if name == STATE_DIR_NAME => self.attr(STATE_DIR_INO),
            STATE_DIR_INO if name == self.state_file_name() => self.attr(STATE_FILE_INO),
            STATE_DIR_INO => None,
            _ => self.reader.table.lookup(parent, name).map(node_attr),
        }
    }

    /// Hands `add(ino, next offset, kind, name)` the entries of directory `ino` from position
    /// `offset` on (`.` and `..` are 0 and 1) until it returns true (the reply is full). Starts
    /// at the offset without walking what came before, so listing a directory of n entries in
    /// pieces costs O(n) in all. False when `ino` is not a directory.
    fn list_dir(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, FileType, &str) -> bool,
    ) -> bool {
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        if ino == STATE_DIR_INO {
            let file = self.state_file_name();
            let fixed = [
                (STATE_DIR_INO, FileType::Directory, "."),
                (ROOT_INO, FileType::Directory, ".."),
                (STATE_FILE_INO, FileType::RegularFile, file.as_str()),
            ];
            for (i, (child, kind, name)) in fixed.into_iter().enumerate().skip(offset) {
                if add(child, i as u64 + 1, kind, name) {
                    break;
                }
            }
            return true;
        }
        let table = &self.reader.table;
        let Some(node) = table.get(ino).filter(|n| n.kind == NodeKind::Dir) else {
            return false;
        };
        for (i, (child, name)) in [(ino, "."), (node.parent, "..")]
            .into_iter()
            .enumerate()
            .skip(offset)
        {
            if add(child, i as u64 + 1, FileType::Directory, name) {
                return true;
            }
        }
        let skip = offset.saturating_sub(2);
        for (i, (name, child)) in table.children_from(node, skip).enumerate() {
            let kind = table
                .get(child)
                .map_or(FileType::RegularFile, |n| file_type(n.kind));
            if add(child, (2 + skip + i + 1) as u64, kind, name) {
                break;
            }
        }
        true
    }

    fn xattrs(&self, ino: u64) -> Option<Vec<(String, Vec<u8>)>> {
        let table = &self.reader.table;
        let node = table.get(ino)?;
        Some(
            table
                .shown_xattrs(node)
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
        )
    }

    /// Opens `ino` through passthrough when it is fully cached and no page-cached open of it
    /// is live; otherwise registers a normal open. Returns the handle and its backing id.
    fn open_file(&self, ino: u64, reply: &ReplyOpen) -> (u64, Option<Arc<Backing>>) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let mut h = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        // Pinned before the check: a file the kernel reads directly must not be evicted from
        // the cache between the check and the open, nor while it stays open.
        self.reader.pin_open(ino);
        let live = match h.adopted.get_mut(&ino) {
            Some(a) => Some(a.live(ino, reply)),
            None => h.backing.get(&ino).and_then(Weak::upgrade),
        };
        let can_pass = live.is_some()
            || (self.passthrough.load(Ordering::Relaxed)
                && h.cached_opens.get(&ino).copied().unwrap_or(0) == 0
                && self.reader.file_cached(ino));
        if can_pass {
            let id = match live {
                Some(id) => Some(id),
                None => self.new_backing(ino, reply).inspect(|b| {
                    h.backing.insert(ino, Arc::downgrade(b));
                }),
            };
            if let Some(id) = id {
                h.by_fh.insert(fh, Ok(id.clone()));
                return (fh, Some(id));
            }
        }
        self.reader.unpin(ino);
        *h.cached_opens.entry(ino).or_default() += 1;
        h.by_fh.insert(fh, Err(ino));
        (fh, None)
    }

    /// A new backing id for `ino`'s cache file.
    fn new_backing(&self, ino: u64, reply: &ReplyOpen) -> Option<Arc<Backing>> {
        let file = self.reader.cache().backing_file(ino)?;
        match reply.open_backing(&file) {
            Ok(id) => {
                let raw = id.into_raw();
                // Recorded after it is open and before any open uses it: a daemon killed in
                // between leaks an id at worst, and never adopts one that is not open.
                if let Some(k) = &self.keep {
                    k.keeper.backing(&k.mountpoint, ino, raw, true);
                }
                // SAFETY: `raw` was just opened on this connection and is closed only when
                // this BackingId drops.
                Some(Arc::new(Backing {
                    id: unsafe { reply.wrap_backing(raw) },
                    raw,
                    ino,
                    keep: self.keep.clone(),
                }))
            }
            Err(e) => {
                tracing::warn!(error = %e, "FUSE passthrough unavailable; serving reads in userspace");
                self.passthrough.store(false, Ordering::Relaxed);
                None
            }
        }
    }

    fn release_file(&self, ino: u64, fh: u64) {
        let mut h = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        match h.by_fh.remove(&fh) {
            Some(Err(ino)) => {
                if let Some(n) = h.cached_opens.get_mut(&ino) {
                    *n -= 1;
                    if *n == 0 {
                        h.cached_opens.remove(&ino);
                    }
                }
            }
            Some(Ok(_)) => self.reader.unpin(ino),
            None => {}
        }
    }
}

fn special_attr(ino: u64, kind: FileType, perm: u16, size: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(u64::from(BLOCK_SIZE)) * 8,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::Dir => FileType::Directory,
        NodeKind::Reg => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Char | NodeKind::Whiteout => FileType::CharDevice,
        NodeKind::Block => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
    }
}

fn node_attr(n: &Node) -> FileAttr {
    FileAttr {
        ino: INodeNo(n.ino),
        size: n.size,
        blocks: n.blocks(),
        atime: n.mtime,
        mtime: n.mtime,
        ctime: n.mtime,
        crtime: n.mtime,
        kind: file_type(n.kind),
        perm: (n.perm & 0o7777) as u16,
        nlink: n.nlink,
        uid: n.uid,
        gid: n.gid,
        rdev: n.rdev,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

fn errno(e: &FsError) -> Errno {
    match e {
        FsError::NotFound(_) => Errno::ENOENT,
        _ => Errno::EIO,
    }
}

fn serve_read(reader: &Arc<LayerReader>, ino: u64, offset: u64, size: u32, reply: ReplyData) {
    match reader.read(ino, offset, size) {
        Ok(data) => reply.data(&data),
        Err(e) => {
            tracing::warn!(layer = %reader.digest(), ino, offset, error = %crate::untrusted::chain(&e), "read failed");
            reply.error(errno(&e));
        }
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        let _ = config
            .add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS | InitFlags::FUSE_PARALLEL_DIROPS);
        if self.passthrough.load(Ordering::Relaxed) {
            // Depth 1: our backing files sit on a plain fs, and overlayfs may still stack on us.
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::warn!("kernel lacks FUSE passthrough; serving reads in userspace");
                self.passthrough.store(false, Ordering::Relaxed);
            }
        }
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if let Some(attr) = self.lookup_name(parent.0, name) {
            return reply.entry(&self.ttl_of(attr.ino), &attr, Generation(0));
        }
        // A layer never changes, so a miss is as cacheable as a hit: node id 0 is a negative
        // entry the kernel keeps for `ttl`. Absent names are most lookups at start-up (every
        // PATH and sys.path probe, repeated by overlayfs in each lower layer).
        match self.attr(parent.0) {
            Some(mut dir) if dir.kind == FileType::Directory => {
                dir.ino = INodeNo(0);
                reply.entry(&self.ttl, &dir, Generation(0));
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(attr) => reply.attr(&self.ttl_of(ino), &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.reader.table.get(ino.0) {
            Some(n) if n.kind == NodeKind::Symlink => {
                reply.data(self.reader.table.link_name(n).as_bytes())
            }
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if ino.0 == STATE_FILE_INO {
            return reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        }
        match self.reader.table.get(ino.0) {
            Some(n) if n.kind == NodeKind::Reg => {}
            Some(_) => return reply.error(Errno::EINVAL),
            None => return reply.error(Errno::ENOENT),
        }
        self.reader.opened(ino.0);
        match self.open_file(ino.0, &reply) {
            // The kernel accepts no caching flags with passthrough.
            (fh, Some(b)) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b.id),
            // Content never changes: let the page cache keep it across opens.
            (fh, None) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 == STATE_FILE_INO {
            let json = self.state_json();
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(json.len());
            let end = start.saturating_add(size as usize).min(json.len());
            return reply.data(&json[start..end]);
        }
        if self.reader.range_cached(ino.0, offset, size) {
            return serve_read(&self.reader, ino.0, offset, size, reply);
        }
        let reader = self.reader.clone();
        self.misses.submit(Box::new(move || {
            serve_read(&reader, ino.0, offset, size, reply)
        }));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh.0 != 0 {
            self.release_file(ino.0, fh.0);
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let started = std::time::Instant::now();
        let listed = self.list_dir(ino.0, offset, |child, next, kind, name| {
            reply.add(INodeNo(child), next, kind, name)
        });
        self.readdir_done(started);
        if !listed {
            return reply.error(Errno::ENOTDIR);
        }
        reply.ok();
    }

    /// A layer's directories never change: the kernel may keep a listing (its readdir cache)
    /// instead of asking again at every open, but only where it also keeps the entries'
    /// attributes long: a cached listing carries no attributes, so with short timeouts each
    /// entry would cost a lookup of its own where one `READDIRPLUS` brought them all (measured:
    /// a second `stat` walk of the python image 0.54 s with a cached listing, 0.26 s without
    /// at 1 s; at a day, 0.13 s with it, 0.21 s without).
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let flags = if self.ttl >= MIN_TTL_TO_CACHE_DIRS {
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(0), flags);
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let started = std::time::Instant::now();
        let listed = self.list_dir(ino.0, offset, |child, next, _, name| {
            match self.attr(child) {
                Some(attr) => {
                    reply.add(INodeNo(child), next, name, &self.ttl, &attr, Generation(0))
                }
                None => false,
            }
        });
        self.readdir_done(started);
        if !listed {
            return reply.error(Errno::ENOTDIR);
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, BLOCK_SIZE, 255, BLOCK_SIZE);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(xattrs) = self.xattrs(ino.0) else {
            return reply.error(Errno::NO_XATTR);
        };
        match xattrs.iter().find(|(k, _)| OsStr::new(k) == name) {
            Some((_, v)) => reply_xattr(reply, size, v),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let mut list = Vec::new();
        for (k, _) in self.xattrs(ino.0).unwrap_or_default() {
            list.extend_from_slice(k.as_bytes());
            list.push(0);
        }
        reply_xattr(reply, size, &list);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    // Everything below would change the layer: it is read-only.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _r: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _t: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _req: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _wf: fuser::WriteFlags,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _i: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }
}
