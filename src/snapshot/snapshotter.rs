//! [`SnapshotterImpl`]: containerd's snapshotter semantics over overlayfs, metadata in
//! [`MetaStore`], remote layers plugged in at Prepare through [`RemoteLayers`].

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::untrusted::clip;

use super::check::{CheckFn, CheckGate, CheckPolicy};
use super::filter::Filters;
use super::mounts::{compute_mounts, Mounter};
use super::store::{Chain, MetaStore, Record, StoredKind};
use super::{
    Info, Mount, RemoteLayers, SnapshotError, Snapshotter, Usage, REMOTE_LABEL, REMOTE_LABEL_VALUE,
    TARGET_SNAPSHOT_LABEL,
};

/// How many remote snapshots are re-mounted at once on start.
const RESTORE_PARALLELISM: usize = 8;

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> SnapshotError {
    SnapshotError::System {
        what: what.to_string(),
        source: Box::new(e),
    }
}

/// The snapshotter. `root` is its own directory (the daemon passes `<--root>/snapshotter`):
/// `metadata.db` and `snapshots/<id>/{fs,work}` live there.
pub struct SnapshotterImpl {
    root: PathBuf,
    store: MetaStore,
    remote: Option<Arc<dyn RemoteLayers>>,
    mounter: Arc<dyn Mounter>,
    /// Bounds and spaces out the availability checks of mounted remote layers.
    checks: CheckGate,
    /// Counts remote vs fallback Prepares and restore outcomes (None: metrics off).
    metrics: Option<Arc<Metrics>>,
}

impl SnapshotterImpl {
    /// Opens (or creates) the store and the directory layout. Call
    /// [`SnapshotterImpl::restore`] afterwards to re-mount remote snapshots, and
    /// [`Snapshotter::cleanup`] to remove directories a crash left without a snapshot.
    pub fn new(
        root: &Path,
        remote: Option<Arc<dyn RemoteLayers>>,
        mounter: Arc<dyn Mounter>,
    ) -> Result<SnapshotterImpl, SnapshotError> {
        let snapshots = root.join("snapshots");
        // Owner-only, as containerd's own snapshotters: below are the upper dirs of every
        // container. Created so, and narrowed if an older version left them open.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&snapshots)
            .map_err(|e| io_err(format!("create {}", snapshots.display()), e))?;
        for dir in [root, snapshots.as_path()] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| io_err(format!("chmod {}", dir.display()), e))?;
        }
        let store = MetaStore::open(&root.join("metadata.db"))?;
        Ok(SnapshotterImpl {
            root: root.to_path_buf(),
            store,
            remote,
            mounter,
            checks: CheckGate::new(CheckPolicy::default()),
            metrics: None,
        })
    }

    /// Replaces the default availability-check policy ([`CheckPolicy::default`]: Go's
    /// `valid_interval`, our default bound).
    pub fn with_check_policy(mut self, policy: CheckPolicy) -> Self {
        self.checks = CheckGate::new(policy);
        self
    }

    /// Counts Prepares (remote or fallback, and why) and restores into `metrics`.
    pub fn with_metrics(mut self, metrics: Option<Arc<Metrics>>) -> Self {
        self.metrics = metrics;
        self
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// The directory a snapshot's layer lives in (its overlay upperdir, or the remote mountpoint).
    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    fn work_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    /// Unmounts stale mounts under `snapshots/` and re-mounts every remote snapshot from its
    /// stored labels, several at once, then tells the remote layers restore is over
    /// ([`RemoteLayers::restored`]: caches of snapshots removed meanwhile are freed). A failure is logged and does not stop the others:
    /// the daemon must come up even when one registry is gone.
    pub fn restore(&self) -> Result<(), SnapshotError> {
        let resumable = self
            .remote
            .as_ref()
            .map(|r| r.resumable())
            .unwrap_or_default();
        self.unmount_under(&self.snapshots_dir(), &resumable);
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let tasks: Vec<(String, Record)> = self
            .store
            .list()?
            .into_iter()
            .filter(|(_, r)| r.is_remote())
            .collect();
        let mountpoints: Vec<PathBuf> = tasks.iter().map(|(_, r)| self.fs_dir(r.id)).collect();
        if tasks.is_empty() {
            remote.restored(&mountpoints);
            return Ok(());
        }
        info!(count = tasks.len(), "restoring remote snapshots");
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..RESTORE_PARALLELISM.min(tasks.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((name, rec)) = tasks.get(i) else { break };
                    // In parallel and in no order: the parents may not be mounted yet.
                    let mounted = remote.mount(&self.fs_dir(rec.id), &rec.labels, &[]);
                    if let Some(m) = &self.metrics {
                        m.restored(mounted.is_ok());
                    }
                    match mounted {
                        Ok(()) => {
                            self.checks.record_ok(&self.fs_dir(rec.id));
                            info!(key = %name, "restored remote snapshot")
                        }
                        Err(e) => warn!(key = %name, error = %crate::untrusted::chain(&*e), "failed to restore remote snapshot; it stays unavailable"),
                    }
                });
            }
        });
        remote.restored(&mountpoints);
        Ok(())
    }

    /// Unmounts every remote layer (SIGINT: the daemon goes away cleanly).
    pub fn unmount_all_remote(&self) -> Result<(), SnapshotError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        for (name, rec) in self
            .store
            .list()?
            .into_iter()
            .filter(|(_, r)| r.is_remote())
        {
            if let Err(e) = remote.unmount(&self.fs_dir(rec.id)) {
                warn!(key = %name, error = %crate::untrusted::chain(&*e), "failed to unmount remote snapshot");
            }
        }
        Ok(())
    }

    /// Detaches everything mounted at or below `dir` but `keep`; returns false if something
    /// stayed.
    fn unmount_under(&self, dir: &Path, keep: &[PathBuf]) -> bool {
        let mounts = match self.mounter.mounts_under(dir) {
            Ok(m) => m,
            Err(e) => {
                warn!(dir = %dir.display(), error = %crate::untrusted::chain(&e), "cannot read the mount table");
                return false;
            }
        };
        let mut ok = true;
        for m in mounts.into_iter().filter(|m| !keep.contains(m)) {
            if let Err(e) = self.mounter.unmount(&m) {
                warn!(mountpoint = %m.display(), error = %crate::untrusted::chain(&e), "unmount failed");
                ok = false;
            }
        }
        ok
    }

    /// Creates the snapshot's directories under a temporary name and renames them into
    /// place, so `snapshots/<id>` is either complete or absent.
    fn make_dirs(
        &self,
        id: u64,
        kind: StoredKind,
        parent_fs: Option<&Path>,
    ) -> Result<(), SnapshotError> {
        let base = self.snapshots_dir();
        let tmp = base.join(format!("new-{id}"));
        let dst = self.dir(id);
        for stale in [&tmp, &dst] {
            // Only an orphan of a crashed, never-committed create can be here.
            if stale.exists() {
                self.remove_tree(stale)?;
            }
        }
        // Created with their mode (then chmod-ed past the umask): `<id>` is owner-only like
        // its parents; `fs` is the overlay upper dir, whose mode is that of the container's
        // root directory (0755, as containerd's overlay snapshotter makes it); `work` 0711
        // as containerd's. Both are only reachable through the 0700 `<id>`.
        let mk = |p: &Path, mode: u32| -> Result<(), SnapshotError> {
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(p)
                .map_err(|e| io_err(format!("create {}", p.display()), e))?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .map_err(|e| io_err(format!("chmod {}", p.display()), e))
        };
        mk(&tmp, 0o700)?;
        mk(&tmp.join("fs"), 0o755)?;
        if kind == StoredKind::Active {
            mk(&tmp.join("work"), 0o711)?;
        }
        if let (Some(pfs), StoredKind::Active) = (parent_fs, kind) {
            // The upper dir takes the owner of the parent's root, as overlay would show it.
            if let Ok(st) = std::fs::metadata(pfs) {
                let _ = std::os::unix::fs::lchown(tmp.join("fs"), Some(st.uid()), Some(st.gid()));
            }
        }
        std::fs::rename(&tmp, &dst).map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            io_err(format!("rename {} to {}", tmp.display(), dst.display()), e)
        })
    }

    /// Removes a directory tree after detaching whatever is mounted inside it; refuses to
    /// recurse if a mount could not be detached (that would delete a mounted layer's files).
    fn remove_tree(&self, dir: &Path) -> Result<(), SnapshotError> {
        if !self.unmount_under(dir, &[]) {
            return Err(SnapshotError::Internal(format!(
                "{} still has mounts; left for a later cleanup",
                dir.display()
            )));
        }
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("remove {}", dir.display()), e)),
        }
    }

    /// Releases the directory of a snapshot that is no longer in the store.
    fn release_dir(&self, id: u64, was_remote: bool) {
        if let (true, Some(remote)) = (was_remote, &self.remote) {
            self.checks.forget(&self.fs_dir(id));
            if let Err(e) = remote.unmount(&self.fs_dir(id)) {
                warn!(id, error = %crate::untrusted::chain(&*e), "failed to unmount remote layer");
            }
        }
        if let Err(e) = self.remove_tree(&self.dir(id)) {
            warn!(id, error = %crate::untrusted::chain(&e), "failed to remove snapshot directory; Cleanup will retry");
        }
    }

    fn create(
        &self,
        kind: StoredKind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Chain, SnapshotError> {
        let parent_fs = if parent.is_empty() {
            None
        } else {
            self.store.get(parent).ok().map(|p| self.fs_dir(p.id))
        };
        self.store.create(kind, key, parent, labels, |id| {
            self.make_dirs(id, kind, parent_fs.as_deref())
        })
    }

    /// Fails with Unavailable if a remote layer among `check` cannot reach its blob, or does
    /// not say so within the check timeout: the layers are checked concurrently through
    /// [`CheckGate`], so this never waits on a registry longer than that bound.
    fn check_remote(&self, check: &[(String, Record)]) -> Result<(), SnapshotError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let layers: Vec<((&str, u64), PathBuf, CheckFn)> = check
            .iter()
            .filter(|(_, r)| r.is_remote())
            .map(|(name, rec)| {
                let (remote, mp, labels) =
                    (remote.clone(), self.fs_dir(rec.id), rec.labels.clone());
                let f: CheckFn = Box::new(move || {
                    remote
                        .check(&mp, &labels)
                        .map_err(|e| clip(&crate::untrusted::chain(&*e).to_string()))
                });
                ((name.as_str(), rec.id), self.fs_dir(rec.id), f)
            })
            .collect();
        self.checks.check_all(layers).map_err(|((name, id), e)| {
            warn!(key = name, id, error = %crate::untrusted::chain(&e), "remote layer is unavailable");
            SnapshotError::Unavailable(format!(
                "layer {} (snapshot {id}) is unavailable: {e}",
                clip(name)
            ))
        })
    }

    /// Checks the parent chain *before* a Prepare/View creates anything, so an unreachable
    /// remote ancestor leaves no half-made snapshot behind.
    fn check_parent(&self, parent: &str) -> Result<(), SnapshotError> {
        if parent.is_empty() || self.remote.is_none() {
            return Ok(());
        }
        match self.store.chain(parent) {
            Ok(c) => {
                let mut all = vec![(parent.to_string(), c.record)];
                all.extend(c.parents);
                self.check_remote(&all)
            }
            // Missing parent etc.: let create() report it with the right code.
            Err(_) => Ok(()),
        }
    }

    /// The mounts of `chain`; a parent that is a fully fetched remote layer is named by its
    /// native tree rather than its FUSE mount (new containers then read it without FUSE).
    fn mounts_of(&self, chain: &Chain) -> Vec<Mount> {
        let parent_fs: Vec<PathBuf> = chain
            .parents
            .iter()
            .map(|(_, r)| {
                let fs = self.fs_dir(r.id);
                self.remote
                    .as_ref()
                    .and_then(|remote| remote.native(&fs))
                    .unwrap_or(fs)
            })
            .collect();
        let id = chain.record.id;
        compute_mounts(
            chain.record.kind.into(),
            &self.fs_dir(id),
            &self.work_dir(id),
            &parent_fs,
        )
    }

    /// Tries to mount the layer remotely and commit it under `target`. `Ok(true)`: done,
    /// the caller answers AlreadyExists; `Ok(false)`: fall back to a normal snapshot.
    fn try_remote(
        &self,
        remote: &dyn RemoteLayers,
        key: &str,
        target: &str,
        chain: &Chain,
        labels: &BTreeMap<String, String>,
    ) -> Result<bool, SnapshotError> {
        let fs = self.fs_dir(chain.record.id);
        let lowers: Vec<PathBuf> = chain
            .parents
            .iter()
            .map(|(_, r)| self.fs_dir(r.id))
            .collect();
        if let Err(e) = remote.mount(&fs, labels, &lowers) {
            info!(key, target, "remote-snapshot-prepared" = false, error = %crate::untrusted::chain(&*e), "layer is not lazily mounted; containerd will download it");
            if let Some(m) = &self.metrics {
                m.prepared_fallback(crate::metrics::fallback_reason(&*e));
            }
            return Ok(false);
        }
        if let Some(m) = &self.metrics {
            m.prepared_remote();
        }
        self.checks.record_ok(&fs);
        let mut committed = labels.clone();
        committed.insert(REMOTE_LABEL.into(), REMOTE_LABEL_VALUE.into());
        match self.store.commit(target, key, committed, Usage::default()) {
            Ok(_) => {
                info!(
                    key,
                    target,
                    "remote-snapshot-prepared" = true,
                    "prepared remote snapshot"
                );
                Ok(true)
            }
            Err(SnapshotError::AlreadyExists(_)) => {
                // Someone committed the same layer first; ours is redundant.
                info!(
                    key,
                    target,
                    "remote-snapshot-prepared" = true,
                    "target already exists"
                );
                if let Ok(rec) = self.store.remove(key) {
                    self.release_dir(rec.id, true);
                }
                Ok(true)
            }
            Err(e) => {
                warn!(key, target, "remote-snapshot-prepared" = false, error = %crate::untrusted::chain(&e), "failed to commit remote snapshot");
                Err(e)
            }
        }
    }
}

/// containerd's `fs.DiskUsage`: allocated bytes and distinct inodes below `dir`.
fn disk_usage(dir: &Path) -> std::io::Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p)?;
        if seen.insert((md.dev(), md.ino())) {
            usage.inodes += 1;
            usage.size += (md.blocks() * 512) as i64;
        }
        if md.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(usage)
}

impl Snapshotter for SnapshotterImpl {
    fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.check_parent(parent)?;
        let chain = self.create(StoredKind::Active, key, parent, labels.clone())?;
        if let (Some(target), Some(remote)) = (labels.get(TARGET_SNAPSHOT_LABEL), &self.remote) {
            if self.try_remote(remote.as_ref(), key, target, &chain, &labels)? {
                return Err(SnapshotError::AlreadyExists(target.clone()));
            }
        }
        debug!(key, parent, id = chain.record.id, "prepared");
        Ok(self.mounts_of(&chain))
    }

    fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.check_parent(parent)?;
        let chain = self.create(StoredKind::View, key, parent, labels)?;
        Ok(self.mounts_of(&chain))
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let chain = self.store.chain(key)?;
        let mut check = vec![(key.to_string(), chain.record.clone())];
        check.extend(chain.parents.iter().cloned());
        self.check_remote(&check)?;
        Ok(self.mounts_of(&chain))
    }

    fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), SnapshotError> {
        if name.is_empty() {
            return Err(SnapshotError::InvalidArgument(
                "snapshot name must not be empty".into(),
            ));
        }
        let rec = self.store.get(key)?;
        let usage = if rec.kind == StoredKind::Active {
            disk_usage(&self.fs_dir(rec.id)).map_err(|e| io_err(format!("usage of {key}"), e))?
        } else {
            Usage::default()
        };
        self.store.commit(name, key, labels, usage)?;
        debug!(key, name, "committed");
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let rec = self.store.remove(key)?;
        self.release_dir(rec.id, rec.is_remote());
        debug!(key, id = rec.id, "removed");
        Ok(())
    }

    fn stat(&self, key: &str) -> Result<Info, SnapshotError> {
        Ok(self.store.get(key)?.info(key))
    }

    fn update(&self, info: Info, field_paths: &[String]) -> Result<Info, SnapshotError> {
        let rec = self.store.update(&info, field_paths)?;
        Ok(rec.info(&info.name))
    }

    fn usage(&self, key: &str) -> Result<Usage, SnapshotError> {
        let rec = self.store.get(key)?;
        if rec.kind == StoredKind::Active {
            return disk_usage(&self.fs_dir(rec.id))
                .map_err(|e| io_err(format!("usage of {key}"), e));
        }
        Ok(Usage {
            size: rec.size,
            inodes: rec.inodes,
        })
    }

    fn list(&self, filters: &[String]) -> Result<Vec<Info>, SnapshotError> {
        let filters = Filters::parse(filters)?;
        Ok(self
            .store
            .list()?
            .into_iter()
            .map(|(name, rec)| rec.info(&name))
            .filter(|i| filters.matches(i))
            .collect())
    }

    fn cleanup(&self) -> Result<(), SnapshotError> {
        let base = self.snapshots_dir();
        let removed = self.store.with_ids_locked(|ids| {
            let entries = match std::fs::read_dir(&base) {
                Ok(e) => e,
                Err(e) => return Err(io_err(format!("list {}", base.display()), e)),
            };
            let mut removed = 0usize;
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.parse::<u64>().is_ok_and(|id| ids.contains(&id)) {
                    continue;
                }
                if let Some(remote) = &self.remote {
                    // An orphan may still hold a remote layer; release it (errors: not mounted).
                    self.checks.forget(&e.path().join("fs"));
                    let _ = remote.unmount(&e.path().join("fs"));
                }
                match self.remove_tree(&e.path()) {
                    Ok(()) => removed += 1,
                    Err(err) => warn!(dir = %e.path().display(), error = %crate::untrusted::chain(&err), "cannot remove orphan directory"),
                }
            }
            Ok(removed)
        })??;
        if removed > 0 {
            info!(removed, "removed orphan snapshot directories");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Kind;
    use std::sync::Mutex;

    /// Records unmounts; reports no mounts.
    #[derive(Default)]
    struct FakeMounter {
        unmounted: Mutex<Vec<PathBuf>>,
    }
    impl Mounter for FakeMounter {
        fn mounts_under(&self, _dir: &Path) -> std::io::Result<Vec<PathBuf>> {
            Ok(Vec::new())
        }
        fn unmount(&self, target: &Path) -> std::io::Result<()> {
            self.unmounted.lock().unwrap().push(target.to_path_buf());
            Ok(())
        }
    }

    /// Remote layers that "mount" by writing a marker file; fails for labels with `fail`.
    #[derive(Default)]
    struct FakeRemote {
        mounted: Mutex<Vec<PathBuf>>,
        /// The `lowers` of each mount call, in order.
        lowers: Mutex<Vec<Vec<PathBuf>>>,
        unmounted: Mutex<Vec<PathBuf>>,
        broken: Mutex<bool>,
        /// Checks block until this is false.
        frozen: Mutex<bool>,
        checks: std::sync::atomic::AtomicUsize,
        /// How many mounts had happened each time restore said it was done.
        restored: Mutex<Vec<usize>>,
    }
    impl RemoteLayers for FakeRemote {
        fn mount(
            &self,
            mp: &Path,
            labels: &BTreeMap<String, String>,
            lowers: &[PathBuf],
        ) -> Result<(), super::super::LayerError> {
            self.lowers.lock().unwrap().push(lowers.to_vec());
            if labels.contains_key("fail") {
                return Err("registry unreachable".into());
            }
            self.mounted.lock().unwrap().push(mp.to_path_buf());
            Ok(())
        }
        fn check(
            &self,
            _mp: &Path,
            _labels: &BTreeMap<String, String>,
        ) -> Result<(), super::super::LayerError> {
            self.checks
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            while *self.frozen.lock().unwrap() {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if *self.broken.lock().unwrap() {
                return Err("connection refused".into());
            }
            Ok(())
        }
        fn unmount(&self, mp: &Path) -> Result<(), super::super::LayerError> {
            self.unmounted.lock().unwrap().push(mp.to_path_buf());
            Ok(())
        }
        fn restored(&self, _remote_mountpoints: &[PathBuf]) {
            let n = self.mounted.lock().unwrap().len();
            self.restored.lock().unwrap().push(n);
        }
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn new_sn(remote: Option<Arc<FakeRemote>>) -> (tempfile::TempDir, SnapshotterImpl) {
        new_sn_with(remote, CheckPolicy::default())
    }

    fn new_sn_with(
        remote: Option<Arc<FakeRemote>>,
        policy: CheckPolicy,
    ) -> (tempfile::TempDir, SnapshotterImpl) {
        let d = tempfile::tempdir().unwrap();
        let r = remote.map(|r| r as Arc<dyn RemoteLayers>);
        let s = SnapshotterImpl::new(
            &d.path().join("snapshotter"),
            r,
            Arc::new(FakeMounter::default()),
        )
        .unwrap()
        .with_check_policy(policy);
        (d, s)
    }

    /// Every call asks the fake registry (`check_always`), waiting at most `timeout`.
    fn check_always(timeout: std::time::Duration) -> CheckPolicy {
        CheckPolicy::from_config(0, true, timeout)
    }

    #[test]
    fn layers_stack_into_overlay() {
        let (_d, s) = new_sn(None);
        let m = s.prepare("a", "", BTreeMap::new()).unwrap();
        assert_eq!(m[0].kind, "bind");
        std::fs::write(Path::new(&m[0].source).join("f"), b"hello").unwrap();
        s.commit("A", "a", BTreeMap::new()).unwrap();
        assert!(s.usage("A").unwrap().size > 0);
        s.prepare("b", "A", BTreeMap::new()).unwrap();
        s.commit("B", "b", BTreeMap::new()).unwrap();
        let m = s.prepare("c", "B", BTreeMap::new()).unwrap();
        assert_eq!(m[0].kind, "overlay");
        let a = s.store.get("A").unwrap().id;
        let b = s.store.get("B").unwrap().id;
        let lower = format!(
            "lowerdir={}:{}",
            s.fs_dir(b).display(),
            s.fs_dir(a).display()
        );
        assert!(m[0].options.contains(&lower), "{:?}", m[0].options);
        assert_eq!(s.mounts("c").unwrap(), m);
        let v = s.view("v", "A", BTreeMap::new()).unwrap();
        assert_eq!(v[0].source, s.fs_dir(a).display().to_string());
        assert!(matches!(
            s.commit("V", "v", BTreeMap::new()),
            Err(SnapshotError::FailedPrecondition(_))
        ));
        assert!(matches!(
            s.remove("B"),
            Err(SnapshotError::FailedPrecondition(_))
        ));
        s.remove("c").unwrap();
        s.remove("B").unwrap();
        assert!(!s.dir(b).exists(), "directory removed with the snapshot");
    }

    #[test]
    fn cleanup_removes_orphans_only() {
        let (_d, s) = new_sn(None);
        s.prepare("a", "", BTreeMap::new()).unwrap();
        let id = s.store.get("a").unwrap().id;
        std::fs::create_dir_all(s.snapshots_dir().join("9999/fs")).unwrap();
        std::fs::create_dir_all(s.snapshots_dir().join("new-12")).unwrap();
        s.cleanup().unwrap();
        let names: Vec<_> = std::fs::read_dir(s.snapshots_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(id.to_string())]);
    }

    #[test]
    fn remote_prepare_commits_and_reports_already_exists() {
        let remote = Arc::new(FakeRemote::default());
        // Asks on every call, so flipping `broken` shows at once.
        let (_d, s) = new_sn_with(
            Some(remote.clone()),
            check_always(std::time::Duration::from_secs(5)),
        );
        let l = labels(&[(TARGET_SNAPSHOT_LABEL, "layer1")]);
        let e = s.prepare("extract-1", "", l).unwrap_err();
        assert!(
            matches!(e, SnapshotError::AlreadyExists(ref t) if t == "layer1"),
            "{e}"
        );
        let info = s.stat("layer1").unwrap();
        assert_eq!(info.kind, Kind::Committed);
        assert_eq!(
            info.labels.get(REMOTE_LABEL).map(String::as_str),
            Some(REMOTE_LABEL_VALUE)
        );
        assert!(matches!(
            s.stat("extract-1"),
            Err(SnapshotError::NotFound(_))
        ));
        assert_eq!(remote.mounted.lock().unwrap().len(), 1);

        // A failing mount falls back to a normal active snapshot.
        let l = labels(&[(TARGET_SNAPSHOT_LABEL, "layer2"), ("fail", "1")]);
        let m = s.prepare("extract-2", "layer1", l).unwrap();
        assert_eq!(m[0].kind, "overlay");
        assert_eq!(s.stat("extract-2").unwrap().kind, Kind::Active);
        // Each mount was told the layers below it.
        let layer1 = s.fs_dir(s.store.get("layer1").unwrap().id);
        assert_eq!(*remote.lowers.lock().unwrap(), [vec![], vec![layer1]]);

        // An unreachable remote ancestor makes Mounts Unavailable.
        *remote.broken.lock().unwrap() = true;
        assert!(matches!(
            s.mounts("extract-2"),
            Err(SnapshotError::Unavailable(_))
        ));
        assert!(matches!(
            s.prepare("c", "layer1", BTreeMap::new()),
            Err(SnapshotError::Unavailable(_))
        ));
        assert!(
            matches!(s.stat("c"), Err(SnapshotError::NotFound(_))),
            "nothing created"
        );
        *remote.broken.lock().unwrap() = false;

        // Remove unmounts the remote layer.
        s.remove("extract-2").unwrap();
        s.remove("layer1").unwrap();
        assert_eq!(remote.unmounted.lock().unwrap().len(), 1);
    }

    #[test]
    fn restore_remounts_remote_snapshots_and_tolerates_failures() {
        let remote = Arc::new(FakeRemote::default());
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("snapshotter");
        {
            let s = SnapshotterImpl::new(
                &root,
                Some(remote.clone()),
                Arc::new(FakeMounter::default()),
            )
            .unwrap();
            let _ = s.prepare("x1", "", labels(&[(TARGET_SNAPSHOT_LABEL, "L1")]));
            let _ = s.prepare("x2", "L1", labels(&[(TARGET_SNAPSHOT_LABEL, "L2")]));
            // Make L2's stored labels fail on restore.
            let mut info = s.stat("L2").unwrap();
            info.labels.insert("fail".into(), "1".into());
            s.update(info, &["labels.fail".into()]).unwrap();
        }
        let remote2 = Arc::new(FakeRemote::default());
        let s = SnapshotterImpl::new(
            &root,
            Some(remote2.clone()),
            Arc::new(FakeMounter::default()),
        )
        .unwrap();
        s.restore().unwrap();
        assert_eq!(
            remote2.mounted.lock().unwrap().len(),
            1,
            "L1 restored although L2 failed"
        );
        assert_eq!(
            *remote2.restored.lock().unwrap(),
            vec![1],
            "told once, after the mounts, that restore is done"
        );
        assert_eq!(s.list(&[]).unwrap().len(), 2);
        assert_eq!(s.list(&["name==L2".into()]).unwrap().len(), 1);
    }

    #[test]
    fn checks_are_spaced_out_by_the_valid_interval() {
        let remote = Arc::new(FakeRemote::default());
        let (_d, s) = new_sn(Some(remote.clone()));
        let l = labels(&[(TARGET_SNAPSHOT_LABEL, "layer1")]);
        assert!(s.prepare("extract-1", "", l).is_err());
        s.view("v1", "layer1", BTreeMap::new()).unwrap();
        s.mounts("v1").unwrap();
        s.prepare("a1", "layer1", BTreeMap::new()).unwrap();
        assert_eq!(
            remote.checks.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "the mount just reached the registry; no check within valid_interval"
        );
    }

    #[test]
    fn a_frozen_registry_makes_mounts_fail_fast_not_hang() {
        let remote = Arc::new(FakeRemote::default());
        let timeout = std::time::Duration::from_millis(200);
        let (_d, s) = new_sn_with(Some(remote.clone()), check_always(timeout));
        let l = labels(&[(TARGET_SNAPSHOT_LABEL, "layer1")]);
        assert!(s.prepare("extract-1", "", l).is_err());
        s.view("v1", "layer1", BTreeMap::new()).unwrap();
        let before = remote.checks.load(std::sync::atomic::Ordering::SeqCst);

        *remote.frozen.lock().unwrap() = true;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let e = s.mounts("v1").unwrap_err();
            assert!(
                matches!(e, SnapshotError::Unavailable(ref m) if m.contains("did not answer")),
                "{e}"
            );
            assert!(
                t.elapsed() < std::time::Duration::from_secs(2),
                "{:?}",
                t.elapsed()
            );
        }
        assert!(matches!(
            s.view("v2", "layer1", BTreeMap::new()),
            Err(SnapshotError::Unavailable(_))
        ));
        assert_eq!(
            remote.checks.load(std::sync::atomic::Ordering::SeqCst) - before,
            1,
            "retries join the hung check instead of starting more"
        );
        // Stat answers from the metadata alone.
        s.stat("v1").unwrap();

        *remote.frozen.lock().unwrap() = false;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while s.mounts("v1").is_err() {
            assert!(std::time::Instant::now() < deadline, "never recovered");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn snapshot_dirs_are_owner_only_and_old_ones_are_narrowed() {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("snapshotter");
        let s = SnapshotterImpl::new(&root, None, Arc::new(FakeMounter::default())).unwrap();
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("snapshots")), 0o700);
        assert_eq!(mode(&root.join("metadata.db")), 0o600);
        drop(s);
        // As an older version left them.
        for (p, m) in [
            (root.clone(), 0o755),
            (root.join("snapshots"), 0o755),
            (root.join("metadata.db"), 0o644),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        let s = SnapshotterImpl::new(&root, None, Arc::new(FakeMounter::default())).unwrap();
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("snapshots")), 0o700);
        assert_eq!(mode(&root.join("metadata.db")), 0o600);
        s.prepare("a", "", BTreeMap::new()).unwrap();
        let id = s.store.get("a").unwrap().id;
        assert_eq!(mode(&s.dir(id)), 0o700);
        assert_eq!(mode(&s.fs_dir(id)), 0o755, "the container's root directory");
        assert_eq!(mode(&s.work_dir(id)), 0o711);
    }
}
