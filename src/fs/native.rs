//! Fully fetched layers as plain directory trees (the layer's *native form*), so that new
//! containers read them through overlayfs alone and never through FUSE.
//!
//! Once every chunk of a layer is in its disk cache, verified, the layer's tree is built in the
//! cache directory: directories, symlinks, devices, fifos and whiteouts (0:0 character devices,
//! and opaque directories marked `trusted.overlay.opaque`, as the FUSE mount shows them) are
//! created with the TOC's owners, modes, times and xattrs, and every regular file is a hard
//! link of its cache file, which holds exactly the file's content (see `cache::disk`). So the
//! tree costs inodes, not data bytes, and the cache's byte budget still counts each byte once.
//! From then on the snapshotter names the tree instead of the FUSE mount in the mounts it is
//! asked for (`RemoteLayers::native`); containers already running keep their FUSE mount.
//!
//! Invariants:
//! - Only verified bytes: a tree is built from a fully cached layer, and from the build on every
//!   chunk of the layer stays pinned (`LayerReader::materialize`), so neither eviction nor a
//!   fetch punches or rewrites a cache file the tree shares, until the tree is gone.
//! - Only complete trees are used: a tree is built under [`TMP_NAME`] and renamed to
//!   [`TREE_NAME`], after the digest of its blob was written to [`DIGEST_NAME`]; a restart
//!   adopts a tree only for the same blob, only once the cache was re-verified complete, and
//!   only while each of its regular files is still its cache file (else it is rebuilt).
//! - A tree is never removed under a container: while a mount names it (an overlay's
//!   `lowerdir` in the mount table) or within [`HANDOUT_GRACE`] of the last time it was handed
//!   out, it stays. Removing the snapshot removes the cache directory, tree included.
//!
//! A hard-linked cache file has the owner and mode of its file in the image and one more link
//! than the image gives it (its name in the cache): the cache directory (0700) keeps it
//! private, and `cache::disk` leaves the mode of such files alone.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant, UNIX_EPOCH};

use super::inode::{InodeTable, Node, NodeKind, ROOT_INO};
use super::reader::LayerReader;
use crate::cache::LayerCache;

/// The tree, in the layer's cache directory.
pub(crate) const TREE_NAME: &str = "native";
/// Where a tree is built before it is complete.
pub(crate) const TMP_NAME: &str = "native.tmp";
/// The digest of the blob the tree was built from.
pub(crate) const DIGEST_NAME: &str = "native.layer";
/// How long after the snapshotter last handed a tree out it may still be mounted (containerd
/// mounts what `Prepare`/`Mounts` returned a moment later, or a user much later from
/// `ctr snapshots mounts`): the budget does not retire it before.
pub(crate) const HANDOUT_GRACE: Duration = Duration::from_secs(600);
/// How often the materializer looks for layers that became fully cached.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Why a tree could not be built; the layer stays on FUSE (logged, never fatal).
#[derive(Debug, thiserror::Error)]
pub(crate) enum NativeError {
    #[error("the cache is not on disk")]
    NoDiskCache,
    #[error("inode {0} is missing from the layer's table")]
    MissingInode(u64),
    #[error("the cache file of {path} is not complete")]
    Incomplete { path: PathBuf },
    #[error("{path} has no cache file of its own (still in the layer's small-file store)")]
    Packed { path: PathBuf },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> NativeError + 'a {
    move |source| NativeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A built (or adopted) tree.
#[derive(Debug)]
pub(crate) struct Built {
    pub dir: PathBuf,
    /// Names in the tree (hard links counted once per name).
    pub entries: usize,
    /// Left by an earlier run for the same blob, not built now.
    pub adopted: bool,
}

/// Builds the native tree of the layer `table` describes from its fully cached `cache`, or
/// adopts the one an earlier run built for the same blob `digest`. The caller guarantees that
/// every chunk is cached, verified and pinned.
pub(crate) fn build(
    table: &InodeTable,
    cache: &dyn LayerCache,
    digest: &str,
) -> Result<Built, NativeError> {
    let dir = cache.dir().ok_or(NativeError::NoDiskCache)?;
    let tree = dir.join(TREE_NAME);
    let tmp = dir.join(TMP_NAME);
    let digest_file = dir.join(DIGEST_NAME);
    remove_tree(&tmp)?;
    if tree.is_dir()
        && std::fs::read(&digest_file).is_ok_and(|d| d == digest.as_bytes())
        && links_the_cache(table, cache, &tree)
    {
        return Ok(Built {
            dir: tree,
            entries: 0,
            adopted: true,
        });
    }
    remove_file(&digest_file)?;
    remove_tree(&tree)?;
    let entries = match fill(table, cache, &tmp) {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    std::fs::write(&digest_file, digest).map_err(io_err("writing", &digest_file))?;
    std::fs::rename(&tmp, &tree).map_err(io_err("renaming into place", &tmp))?;
    Ok(Built {
        dir: tree,
        entries,
        adopted: false,
    })
}

fn remove_tree(p: &Path) -> Result<(), NativeError> {
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("removing", p)(e)),
        _ => Ok(()),
    }
}

fn remove_file(p: &Path) -> Result<(), NativeError> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("removing", p)(e)),
        _ => Ok(()),
    }
}

/// Calls `f(path, node)` for every name of the layer, as a path below `root`, each directory
/// before what it holds. No recursion: the depth of a tree comes from the image.
fn walk<'t>(
    table: &'t InodeTable,
    root: &Path,
    mut f: impl FnMut(&Path, &'t Node) -> Result<(), NativeError>,
) -> Result<(), NativeError> {
    let root_node = table
        .get(ROOT_INO)
        .ok_or(NativeError::MissingInode(ROOT_INO))?;
    let mut todo = vec![(root.to_path_buf(), root_node)];
    while let Some((dir, dir_node)) = todo.pop() {
        for (name, ino) in table.children_from(dir_node, 0) {
            let node = table.get(ino).ok_or(NativeError::MissingInode(ino))?;
            let p = dir.join(name);
            f(&p, node)?;
            if node.kind == NodeKind::Dir {
                todo.push((p, node));
            }
        }
    }
    Ok(())
}

/// Whether every regular file of the tree at `tree` is still its cache file (the same inode):
/// a cache file written anew (it went missing) would leave the tree with the old bytes.
fn links_the_cache(table: &InodeTable, cache: &dyn LayerCache, tree: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let same =
        |a: &Path, b: &Path| match (std::fs::symlink_metadata(a), std::fs::symlink_metadata(b)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
    walk(table, tree, |p, node| {
        if node.kind != NodeKind::Reg || node.size == 0 {
            return Ok(());
        }
        match cache.file_path(node.ino) {
            Some(c) if same(p, &c) => Ok(()),
            _ => Err(NativeError::Incomplete { path: p.into() }),
        }
    })
    .is_ok()
}

/// Creates the layer's tree at `root` (absent); returns how many names it made. Directories
/// get their own attributes last, deepest first, so that creating their entries does not
/// move their times.
fn fill(table: &InodeTable, cache: &dyn LayerCache, root: &Path) -> Result<usize, NativeError> {
    let root_node = table
        .get(ROOT_INO)
        .ok_or(NativeError::MissingInode(ROOT_INO))?;
    let new_dir = |p: &Path| {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(p)
            .map_err(io_err("creating directory", p))
    };
    new_dir(root)?;
    let mut dirs: Vec<(PathBuf, &Node)> = vec![(root.to_path_buf(), root_node)];
    // First name of each multiply linked non-directory: its other names link to it.
    let mut first: HashMap<u64, PathBuf> = HashMap::new();
    let mut entries = 0;
    walk(table, root, |p, node| {
        entries += 1;
        if node.kind == NodeKind::Dir {
            new_dir(p)?;
            dirs.push((p.to_path_buf(), node));
            return Ok(());
        }
        if node.nlink > 1 {
            if let Some(f) = first.get(&node.ino) {
                return std::fs::hard_link(f, p).map_err(io_err("linking", p));
            }
            first.insert(node.ino, p.to_path_buf());
        }
        create(table, cache, node, p)?;
        set_attrs(table, node, p)
    })?;
    for (p, node) in dirs.iter().rev() {
        set_attrs(table, node, p)?;
    }
    Ok(entries)
}

/// Creates the non-directory `node` at `p`.
fn create(
    table: &InodeTable,
    cache: &dyn LayerCache,
    node: &Node,
    p: &Path,
) -> Result<(), NativeError> {
    match node.kind {
        NodeKind::Dir => Ok(()),
        NodeKind::Reg if node.size == 0 => std::fs::File::create_new(p)
            .map(drop)
            .map_err(io_err("creating", p)),
        NodeKind::Reg => {
            let src = cache
                .file_path(node.ino)
                .ok_or_else(|| NativeError::Packed { path: p.into() })?;
            let complete =
                std::fs::symlink_metadata(&src).is_ok_and(|m| m.is_file() && m.len() == node.size);
            if !complete {
                return Err(NativeError::Incomplete { path: p.into() });
            }
            std::fs::hard_link(&src, p).map_err(io_err("linking the cache file to", p))
        }
        NodeKind::Symlink => std::os::unix::fs::symlink(table.link_name(node), p)
            .map_err(io_err("creating symlink", p)),
        NodeKind::Char | NodeKind::Block | NodeKind::Fifo | NodeKind::Whiteout => {
            let (kind, rdev) = match node.kind {
                NodeKind::Char => (libc::S_IFCHR, node.rdev),
                NodeKind::Block => (libc::S_IFBLK, node.rdev),
                NodeKind::Fifo => (libc::S_IFIFO, 0),
                _ => (libc::S_IFCHR, 0),
            };
            let c = crate::xattr::cstring(p).map_err(io_err("naming", p))?;
            // SAFETY: `c` is NUL-terminated and outlives the call.
            let r = unsafe { libc::mknod(c.as_ptr(), kind | 0o600, libc::dev_t::from(rdev)) };
            if r != 0 {
                return Err(io_err("creating node", p)(std::io::Error::last_os_error()));
            }
            Ok(())
        }
    }
}

/// Owner, mode, xattrs and times of `node` on `p`, in that order: a change of owner clears
/// setuid/setgid bits and file capabilities, so those come after it.
fn set_attrs(table: &InodeTable, node: &Node, p: &Path) -> Result<(), NativeError> {
    std::os::unix::fs::lchown(p, Some(node.uid), Some(node.gid)).map_err(io_err("chown", p))?;
    if node.kind != NodeKind::Symlink {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(node.perm & 0o7777))
            .map_err(io_err("chmod", p))?;
    }
    for (k, v) in table.shown_xattrs(node) {
        crate::xattr::set(p, k, v).map_err(io_err("setting xattr on", p))?;
    }
    let t = match node.mtime.duration_since(UNIX_EPOCH) {
        Ok(d) => libc::timespec {
            tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(d.subsec_nanos()),
        },
        Err(e) => libc::timespec {
            tv_sec: -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
            tv_nsec: 0,
        },
    };
    let c = crate::xattr::cstring(p).map_err(io_err("naming", p))?;
    let times = [t, t];
    // SAFETY: `c` is NUL-terminated and `times` holds two timespecs; both outlive the call.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io_err("setting times of", p)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Whether a mount names `tree`: overlays show their `lowerdir`s in the mount table, as given
/// (containerd passes paths relative to a common parent when the options are long), so the
/// tree's last two components are looked for. Unreadable table: assumed named.
fn referenced(tree: &Path) -> bool {
    let Some(cache) = tree
        .parent()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
    else {
        return true;
    };
    let needle = format!("{cache}/{TREE_NAME}");
    std::fs::read_to_string("/proc/self/mountinfo").map_or(true, |t| t.contains(&needle))
}

#[derive(Debug)]
enum State {
    /// No tree yet: one is built once the layer is fully cached.
    Idle,
    Building,
    Ready {
        dir: PathBuf,
        handed_out: Option<Instant>,
    },
    /// Off by configuration, on a memory cache, after a failed build, or retired for the
    /// budget: the layer stays on FUSE for the rest of this mount.
    Off,
}

/// One layer's native form: its state, in the layer's reader.
#[derive(Debug)]
pub(crate) struct Native(Mutex<State>);

impl Native {
    pub(crate) fn new(enabled: bool) -> Self {
        Native(Mutex::new(if enabled { State::Idle } else { State::Off }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the build (true) unless there is nothing to build or another thread builds.
    pub(crate) fn begin(&self) -> bool {
        let mut s = self.state();
        if matches!(*s, State::Idle) {
            *s = State::Building;
            return true;
        }
        false
    }

    /// Ends a build: the tree is ready, or none was built (`again`: try later, e.g. the layer
    /// was not complete yet; otherwise never for this mount).
    pub(crate) fn finish(&self, dir: Option<PathBuf>, again: bool) {
        *self.state() = match dir {
            Some(dir) => State::Ready {
                dir,
                handed_out: None,
            },
            None if again => State::Idle,
            None => State::Off,
        };
    }

    pub(crate) fn is_ready(&self) -> bool {
        matches!(*self.state(), State::Ready { .. })
    }

    /// The tree, for a mount that is about to be made (stamped: see [`HANDOUT_GRACE`]).
    pub(crate) fn hand_out(&self) -> Option<PathBuf> {
        match &mut *self.state() {
            State::Ready { dir, handed_out } => {
                *handed_out = Some(Instant::now());
                Some(dir.clone())
            }
            _ => None,
        }
    }

    /// Gives the tree up if no mount names it and it was not handed out within `grace`:
    /// returns true when it did (the caller unpins the layer's chunks), after deleting the
    /// tree's names (the cache files stay).
    pub(crate) fn retire(&self, grace: Duration) -> bool {
        let dir = {
            let mut s = self.state();
            let State::Ready { dir, handed_out } = &*s else {
                return false;
            };
            if handed_out.is_some_and(|t| t.elapsed() < grace) || referenced(dir) {
                return false;
            }
            let dir = dir.clone();
            *s = State::Off;
            dir
        };
        if let Some(cache) = dir.parent() {
            let _ = std::fs::remove_file(cache.join(DIGEST_NAME));
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a retired native tree");
        }
        true
    }
}

/// Settles layers as they become fully cached ([`LayerReader::materialize`]: small files moved
/// out of the small-file store, then the tree built), one at a time, on a thread of its own (a
/// build is metadata work: about 1 s per 10,000 files), looking every second.
#[derive(Debug)]
pub(crate) struct Materializer {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    layers: Mutex<Vec<Weak<LayerReader>>>,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Materializer {
    pub(crate) fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("stargz-native".into())
            .spawn(move || s.run())?;
        Ok(Materializer {
            shared,
            thread: Some(thread),
        })
    }

    /// Watches `layer` until it is gone.
    pub(crate) fn add(&self, layer: &Arc<LayerReader>) {
        let mut l = self.shared.layers.lock().unwrap_or_else(|e| e.into_inner());
        l.retain(|w| w.strong_count() > 0);
        l.push(Arc::downgrade(layer));
        self.shared.wake.notify_all();
    }
}

impl Shared {
    fn stopped(&self) -> bool {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        loop {
            let layers: Vec<Arc<LayerReader>> = {
                let mut l = self.layers.lock().unwrap_or_else(|e| e.into_inner());
                l.retain(|w| w.strong_count() > 0);
                l.iter().filter_map(Weak::upgrade).collect()
            };
            for layer in layers {
                if self.stopped() {
                    return;
                }
                layer.materialize();
            }
            let stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
            if *stop {
                return;
            }
            let _ = self.wake.wait_timeout(stop, SCAN_INTERVAL);
        }
    }
}

impl Drop for Materializer {
    fn drop(&mut self) {
        *self.shared.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree some mount names (here a bind mount of it, as an overlay's `lowerdir` would) is
    /// in use; once unmounted it is not.
    #[test]
    fn a_tree_a_mount_names_is_in_use() {
        let d = tempfile::tempdir().expect("tempdir");
        let tree = d.path().join("0123456789abcdef").join(TREE_NAME);
        std::fs::create_dir_all(&tree).expect("mkdir");
        assert!(!referenced(&tree));
        let target = d.path().join("mnt");
        std::fs::create_dir(&target).expect("mkdir");
        nix::mount::mount(
            Some(&tree),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind mount (tests run as root)");
        let named = referenced(&tree);
        nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).expect("umount");
        assert!(named, "a bind mount of the tree is not seen");
        assert!(!referenced(&tree));
    }

    #[test]
    fn a_tree_handed_out_lately_is_not_retired() {
        let d = tempfile::tempdir().expect("tempdir");
        let tree = d.path().join("fedcba9876543210").join(TREE_NAME);
        std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
        let n = Native::new(true);
        assert!(n.begin() && !n.begin(), "one build at a time");
        n.finish(Some(tree.clone()), false);
        assert_eq!(n.hand_out(), Some(tree.clone()));
        assert!(
            !n.retire(Duration::from_secs(60)),
            "retired within its grace"
        );
        assert!(n.retire(Duration::ZERO));
        assert!(!tree.exists() && n.hand_out().is_none() && !n.begin());
        let off = Native::new(false);
        assert!(!off.begin(), "built while off");
    }
}
