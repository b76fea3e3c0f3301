//! [`LayerManager`]: the snapshotter's [`RemoteLayers`], mounting layers named by labels.
//!
//! Labels (CRI first, then the default set), the TOC verification policy and the prefetch
//! label follow Go's `fs` package; the blob itself comes from a [`BlobResolver`] (the registry
//! in the daemon, a local file in tests).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sha2::{Digest as _, Sha256};

use crate::labels::{
    CRI_IMAGE_LAYERS, CRI_IMAGE_REF, CRI_LAYER_DIGEST, STARGZ_DIGEST, STARGZ_LAYERS,
    STARGZ_PREFETCH, STARGZ_REFERENCE, STARGZ_SKIP_VERIFY, TOC_DIGEST,
};
use crate::metrics::{op, LayerStatsSource};
use crate::snapshot::{LayerError, RemoteLayers};

use super::background::{BackgroundFetcher, DEFAULT_SPAN_BYTES};
use super::budget::CacheBudget;
use super::deps::Images;
use super::keeper::{find_mount, Keeper, Kept};
use super::layer::{mount_layer, open_layer, resume_layer, LayerOptions, LayerSpec, MountedLayer};
use super::native::Materializer;
use super::reader::Priority;
use super::source::LayerSource;
use super::FsError;

/// Finds a layer blob from its image reference and digest.
pub trait BlobResolver: Send + Sync {
    fn resolve(&self, reference: &str, digest: &str) -> Result<Arc<dyn LayerSource>, FsError>;

    /// Starts locating `digests` of `reference` (and fetching their TOCs) in the background,
    /// for the [`BlobResolver::resolve`] calls of their mounts to come. A hint: it may do
    /// nothing, and never fails.
    fn resolve_ahead(&self, _reference: &str, _digests: &[&str]) {}
}

/// The filesystem part of `config.toml`.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// `<root>/stargz/fscache`: decompressed file caches, one directory per mounted layer,
    /// named after its mountpoint so that it survives a daemon restart.
    pub fscache_dir: PathBuf,
    pub layer: LayerOptions,
    pub disable_verification: bool,
    pub allow_no_verification: bool,
    pub no_background_fetch: bool,
    /// Background fetch workers shared by all layers (`max_concurrency`).
    pub max_concurrency: usize,
    /// Background fetch starts only this long after the last on-demand fetch (see
    /// [`Priority`]); Go's daemon likewise holds background work back behind on-demand reads.
    pub background_quiet: std::time::Duration,
    /// Byte budget of the on-disk cache, all layers together (`[directory_cache] max_bytes`);
    /// None: half the size of the file system holding `fscache_dir`.
    pub cache_max_bytes: Option<u64>,
}

impl FsConfig {
    /// Go's defaults under a daemon root (`--root`).
    pub fn new(root: &Path) -> Self {
        FsConfig {
            fscache_dir: root.join("stargz").join("fscache"),
            layer: LayerOptions::default(),
            disable_verification: false,
            allow_no_verification: false,
            no_background_fetch: false,
            max_concurrency: 2,
            background_quiet: std::time::Duration::from_secs(2),
            cache_max_bytes: None,
        }
    }
}

/// What the labels of one layer say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLabels {
    pub reference: String,
    pub digest: String,
    /// None: mount without verifying the TOC.
    pub toc_digest: Option<String>,
    pub prefetch_size: Option<u64>,
    /// The layers listed after this one (CRI's image layers, or `stargz.layers`), at most
    /// [`MAX_LATER_LAYERS`]: containerd prepares an image's layers bottom-up, so these are the
    /// mounts to come, resolved ahead ([`BlobResolver::resolve_ahead`]).
    pub later_layers: Vec<String>,
}

/// The most layers one mount resolves ahead.
pub const MAX_LATER_LAYERS: usize = 16;

/// The digests `labels` list after `digest` (all but `digest` when it is not listed).
fn later_layers(labels: &BTreeMap<String, String>, digest: &str) -> Vec<String> {
    let Some(list) = labels
        .get(CRI_IMAGE_LAYERS)
        .or_else(|| labels.get(STARGZ_LAYERS))
    else {
        return Vec::new();
    };
    let listed: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let after = listed
        .iter()
        .position(|d| *d == digest)
        .map_or(0, |i| i + 1);
    listed[after..]
        .iter()
        .filter(|d| **d != digest)
        .take(MAX_LATER_LAYERS)
        .map(|d| (*d).to_owned())
        .collect()
}

/// Reads the labels and applies the verification policy.
pub fn parse_labels(
    labels: &BTreeMap<String, String>,
    cfg: &FsConfig,
) -> Result<LayerLabels, FsError> {
    let get = |a: &str, b: &str| {
        labels
            .get(a)
            .or_else(|| labels.get(b))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let reference = get(CRI_IMAGE_REF, STARGZ_REFERENCE)
        .ok_or_else(|| FsError::Labels("no image reference label".into()))?;
    let digest = get(CRI_LAYER_DIGEST, STARGZ_DIGEST)
        .ok_or_else(|| FsError::Labels("no layer digest label".into()))?;
    let toc_digest = if cfg.disable_verification {
        None
    } else if let Some(d) = labels.get(TOC_DIGEST).filter(|v| !v.is_empty()) {
        Some(d.clone())
    } else if labels.contains_key(STARGZ_SKIP_VERIFY) && cfg.allow_no_verification {
        tracing::warn!(layer = %digest, "mounting without TOC verification (skipverify)");
        None
    } else {
        return Err(FsError::Labels("digest of TOC JSON must be passed".into()));
    };
    let prefetch_size = labels.get(STARGZ_PREFETCH).and_then(|v| v.parse().ok());
    let later_layers = later_layers(labels, &digest);
    Ok(LayerLabels {
        reference,
        digest,
        toc_digest,
        prefetch_size,
        later_layers,
    })
}

/// The connections a running keeper holds whose mount is still the one handed over (same
/// device at the same path); the others are let go.
fn take_kept(keeper: &Keeper) -> HashMap<PathBuf, Kept> {
    let listed = keeper.take_all().and_then(|all| {
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok((all, info))
    });
    let (all, info) = match listed {
        Ok(listed) => listed,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take the running mounts back from the fuse keeper; they are mounted again");
            return HashMap::new();
        }
    };
    let mut out = HashMap::new();
    for k in all {
        match find_mount(&info, &k.mountpoint) {
            Some(dev) if dev == k.dev => {
                tracing::info!(mountpoint = %k.mountpoint.display(), backing_ids = k.backing.len(), "a running mount is waiting to be resumed");
                out.insert(k.mountpoint.clone(), k);
            }
            _ => keeper.del(&k.mountpoint),
        }
    }
    out
}

/// Half the size of the file system holding `dir`: the cache shares its disk with containerd's
/// content and snapshots, and evicted data is only fetched again.
fn default_budget(dir: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let bytes = st.blocks().saturating_mul(st.fragment_size());
    Ok(bytes / 2)
}

/// Mounts and tracks remote layers for the snapshotter.
pub struct LayerManager {
    resolver: Arc<dyn BlobResolver>,
    config: FsConfig,
    priority: Arc<Priority>,
    fetcher: Option<Arc<BackgroundFetcher>>,
    mounts: Mutex<HashMap<PathBuf, MountedLayer>>,
    /// Cache directories of mounted layers and of mounts in progress, which
    /// [`LayerManager::remove_unclaimed_caches`] must leave alone.
    claimed: Mutex<HashSet<PathBuf>>,
    /// Connections of mounts the previous daemon left running (held by the keeper), by
    /// mountpoint, until restore serves them again or gives them up.
    kept: Mutex<HashMap<PathBuf, Kept>>,
    /// Cache directories being deleted in the background ([`LayerManager::discard`]).
    removals: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Settles fully cached layers: their small files into cache files of their own, then
    /// their native trees where `native_layers` is on (None: a memory cache).
    materializer: Option<Materializer>,
    /// The mounted layers of each image, where a program's libraries are looked for.
    images: Images,
}

impl Drop for LayerManager {
    /// Lets the caches being deleted finish (SIGINT's clean-up ends with nothing left behind).
    fn drop(&mut self) {
        let removals = std::mem::take(self.removals.get_mut().unwrap_or_else(|e| e.into_inner()));
        for r in removals {
            let _ = r.join();
        }
    }
}

impl std::fmt::Debug for LayerManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerManager")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl LayerManager {
    /// Starts the shared background fetcher and makes the cache directory private (0700, also
    /// when an older version left it readable). Caches left by an earlier run are kept: the
    /// restored mounts re-verify and reuse them, and [`LayerManager::remove_unclaimed_caches`]
    /// deletes the rest once restore is done.
    pub fn new(config: FsConfig, resolver: Arc<dyn BlobResolver>) -> Result<Self, FsError> {
        crate::cache::private_dir(&config.fscache_dir).map_err(FsError::Cache)?;
        let mut config = config;
        let max = match config.cache_max_bytes {
            Some(max) => max,
            None => default_budget(&config.fscache_dir).map_err(FsError::Cache)?,
        };
        tracing::info!(budget = max, dir = %config.fscache_dir.display(), "cache byte budget");
        let budget = CacheBudget::new(max);
        if let Some(m) = &config.layer.read.metrics {
            m.set_budget(budget.clone());
        }
        config.layer.read.budget = Some(budget);
        let priority = Arc::new(Priority::with_quiet_period(config.background_quiet));
        let fetcher = (!config.no_background_fetch).then(|| {
            Arc::new(BackgroundFetcher::new(
                config.max_concurrency,
                priority.clone(),
                DEFAULT_SPAN_BYTES,
            ))
        });
        let kept = config
            .layer
            .keeper
            .as_ref()
            .map(|k| take_kept(k))
            .unwrap_or_default();
        let materializer = if config.layer.read.cache_kind == crate::cache::CacheKind::Disk {
            Some(Materializer::start().map_err(FsError::Cache)?)
        } else {
            None
        };
        Ok(LayerManager {
            materializer,
            resolver,
            config,
            priority,
            fetcher,
            mounts: Mutex::new(HashMap::new()),
            claimed: Mutex::new(HashSet::new()),
            kept: Mutex::new(kept),
            removals: Mutex::new(Vec::new()),
            images: Images::default(),
        })
    }

    /// Lets go of a kept connection that will not be served again: the keeper closes it and
    /// the mount at `mountpoint` is detached (readers get ENOTCONN, as without a keeper).
    fn give_up(&self, mountpoint: &Path) {
        if let Some(k) = &self.config.layer.keeper {
            k.del(mountpoint);
        }
        match nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "cannot detach a mount left by the previous daemon")
            }
        }
    }

    /// The cache directory of the layer mounted at `mountpoint`: stable across restarts (the
    /// snapshotter mounts a snapshot at the same path again), distinct for two snapshots of
    /// the same blob.
    pub fn cache_dir_for(&self, mountpoint: &Path) -> PathBuf {
        let h = Sha256::digest(mountpoint.as_os_str().as_bytes());
        self.config.fscache_dir.join(&hex::encode(h)[..32])
    }

    /// Mounts a layer; the error says why it can't be lazy (the caller falls back). `lowers`
    /// are the mountpoints of the layers below it, nearest first, as far as known: with the
    /// other layers mounted for the same image, where its programs' libraries are looked for.
    pub fn mount_layer(
        &self,
        mountpoint: &Path,
        labels: &BTreeMap<String, String>,
        lowers: &[PathBuf],
    ) -> Result<(), FsError> {
        let started = Instant::now();
        let parsed = parse_labels(labels, &self.config)?;
        let metrics = self.config.layer.read.metrics.clone();
        let observe = |operation, since: Instant| {
            if let Some(m) = &metrics {
                m.observe_ms(operation, &parsed.digest, since.elapsed());
            }
        };
        if !parsed.later_layers.is_empty() {
            let later: Vec<&str> = parsed.later_layers.iter().map(String::as_str).collect();
            self.resolver.resolve_ahead(&parsed.reference, &later);
        }
        let source = {
            let _urgent = self.priority.urgent();
            let resolving = Instant::now();
            let source = self.resolver.resolve(&parsed.reference, &parsed.digest)?;
            observe(op::STARGZ_HEADER_GET, resolving);
            source
        };
        // A layer already at this mountpoint goes first: it shares the cache directory, whose
        // chunks the new mount re-verifies (they may belong to another blob; digests decide).
        let old = self
            .mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(mountpoint);
        if let Some(old) = old {
            if let Err(e) = old.unmount() {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %crate::untrusted::chain(&e), "unmount of the previous layer failed");
            }
        }
        let cache_dir = self.cache_dir_for(mountpoint);
        // A cache left by an earlier run survives a failed re-mount (registry down at restore):
        // the snapshot still exists and may mount later. A new one is removed with the failure.
        let reused = cache_dir.exists();
        self.claimed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cache_dir.clone());
        let spec = LayerSpec {
            digest: parsed.digest.clone(),
            source,
            toc_digest: parsed.toc_digest,
        };
        let mut opts = self.config.layer.clone();
        if let Some(p) = parsed.prefetch_size {
            opts.prefetch_size = p;
        }
        let opening = Instant::now();
        let kept = self
            .kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(mountpoint);
        let opened = open_layer(spec, &cache_dir, &opts.read, self.priority.clone());
        let mounted = match (opened, kept) {
            (Ok(reader), Some(kept)) => {
                observe(op::STARGZ_TOC_GET, opening);
                match resume_layer(
                    reader.clone(),
                    mountpoint,
                    &opts,
                    self.fetcher.clone(),
                    kept,
                ) {
                    Ok(m) => Ok(m),
                    Err(e) => {
                        // Its connection is closed with the error: mount afresh.
                        tracing::warn!(mountpoint = %mountpoint.display(), error = %crate::untrusted::chain(&e), "cannot resume the running mount; mounting it again");
                        self.give_up(mountpoint);
                        mount_layer(reader, mountpoint, &opts, self.fetcher.clone())
                    }
                }
            }
            (Ok(reader), None) => {
                observe(op::STARGZ_TOC_GET, opening);
                mount_layer(reader, mountpoint, &opts, self.fetcher.clone())
            }
            (Err(e), kept) => {
                if kept.is_some() {
                    self.give_up(mountpoint);
                }
                Err(e)
            }
        };
        let mounted = match mounted {
            Ok(m) => m,
            Err(e) => {
                if reused {
                    self.claimed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&cache_dir);
                } else {
                    self.free_cache(&cache_dir);
                }
                return Err(e);
            }
        };
        let below: Vec<_> = {
            let mounts = self.mounts.lock().unwrap_or_else(|e| e.into_inner());
            let lower = lowers.iter().filter_map(|p| mounts.get(p));
            lower.map(|m| m.reader().clone()).collect()
        };
        self.images
            .join(&parsed.reference, mounted.reader(), &below);
        if let Some(n) = &self.materializer {
            n.add(mounted.reader());
        }
        if let Some(m) = &metrics {
            let stats: Arc<dyn LayerStatsSource> = mounted.reader().clone();
            m.mounted(mountpoint, &parsed.digest, Arc::downgrade(&stats));
        }
        observe(op::MOUNT, started);
        let old = self
            .mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(mountpoint.to_path_buf(), mounted);
        if let Some(old) = old {
            // A concurrent mount at the same path won the race; both used this cache dir.
            if let Err(e) = old.unmount() {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %crate::untrusted::chain(&e), "unmount of the replaced layer failed");
            }
        }
        Ok(())
    }

    /// Deletes the cache directories that neither a mounted layer nor one of `keep` (the
    /// mountpoints of remote snapshots that still exist, mounted or not) claims: after restore,
    /// those of snapshots removed while the daemon was down, and stray files. Returns how many.
    pub fn remove_unclaimed_caches(&self, keep: &[PathBuf]) -> usize {
        let mut claimed = self
            .claimed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        claimed.extend(keep.iter().map(|m| self.cache_dir_for(m)));
        let entries = match std::fs::read_dir(&self.config.fscache_dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %self.config.fscache_dir.display(), error = %crate::untrusted::chain(&e), "cannot list the cache directory");
                return 0;
            }
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let path = e.path();
            if claimed.contains(&path) {
                continue;
            }
            let res = match e.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
            match res {
                Ok(()) => removed += 1,
                Err(err) => {
                    tracing::warn!(dir = %path.display(), error = %crate::untrusted::chain(&err), "cannot remove unclaimed cache")
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed caches of layers no longer mounted");
        }
        removed
    }

    /// Deletes a layer's cache directory and drops its claim.
    fn free_cache(&self, dir: &Path) {
        let mut claimed = self.claimed.lock().unwrap_or_else(|e| e.into_inner());
        self.discard(dir);
        claimed.remove(dir);
    }

    /// Removes a cache directory without making the caller wait for it: the directory is
    /// renamed aside at once (a new mount of the same snapshot starts from an empty cache) and
    /// deleted in the background; gigabytes of cache must not hold up containerd's Remove.
    /// What a crash leaves aside is unclaimed, so the next start deletes it.
    fn discard(&self, dir: &Path) {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let aside = self
            .config
            .fscache_dir
            .join(format!(".removing-{}-{n}", std::process::id()));
        let remove = |target: &Path| {
            if let Err(e) = std::fs::remove_dir_all(target) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %target.display(), error = %crate::untrusted::chain(&e), "cannot remove layer cache");
                }
            }
        };
        match std::fs::rename(dir, &aside) {
            Ok(()) => {
                let spawned = std::thread::Builder::new()
                    .name("stargz-rm-cache".into())
                    .spawn(move || remove(&aside));
                match spawned {
                    Ok(h) => {
                        let mut removals = self.removals.lock().unwrap_or_else(|e| e.into_inner());
                        removals.retain(|r| !r.is_finished());
                        removals.push(h);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start a thread to remove a layer cache; it stays until the next start")
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Not renamed: deleted here, so that nothing deletes it later under a new mount.
            Err(_) => remove(dir),
        }
    }

    /// Unmounts a layer and frees its cache (the snapshot is gone or the daemon cleans up).
    fn release(&self, m: MountedLayer) {
        if let Some(metrics) = &self.config.layer.read.metrics {
            metrics.unmounted(m.mountpoint());
        }
        // A memory cache goes with its reader; a disk cache's directory is deleted here.
        let dir = m.reader().cache().dir().map(Path::to_path_buf);
        if let Err(e) = m.unmount() {
            tracing::warn!(error = %crate::untrusted::chain(&e), "unmount failed");
        }
        if let Some(dir) = dir {
            self.free_cache(&dir);
        }
    }

    /// The mounted layer at `mountpoint`, for inspection (tests, metrics).
    pub fn with_layer<T>(
        &self,
        mountpoint: &Path,
        f: impl FnOnce(&MountedLayer) -> T,
    ) -> Option<T> {
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(mountpoint)
            .map(f)
    }
}

impl RemoteLayers for LayerManager {
    fn mount(
        &self,
        mountpoint: &Path,
        labels: &BTreeMap<String, String>,
        lowers: &[PathBuf],
    ) -> Result<(), LayerError> {
        Ok(self.mount_layer(mountpoint, labels, lowers)?)
    }

    /// Asks the registry outside the table lock: a slow registry must not block the mounts
    /// and unmounts of other layers.
    fn check(
        &self,
        mountpoint: &Path,
        _labels: &BTreeMap<String, String>,
    ) -> Result<(), LayerError> {
        let source = self.with_layer(mountpoint, |m| m.reader().source().clone());
        match source {
            None => Err(format!("no layer mounted at {}", mountpoint.display()).into()),
            Some(s) => Ok(s.check()?),
        }
    }

    fn restored(&self, remote_mountpoints: &[PathBuf]) {
        let left: Vec<Kept> = self
            .kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, k)| k)
            .collect();
        for kept in left {
            tracing::info!(mountpoint = %kept.mountpoint.display(), "a running mount of a snapshot that no longer exists is given up");
            drop(kept.fd);
            self.give_up(&kept.mountpoint);
        }
        self.remove_unclaimed_caches(remote_mountpoints);
    }

    fn native(&self, mountpoint: &Path) -> Option<PathBuf> {
        self.with_layer(mountpoint, |m| m.reader().native_dir())
            .flatten()
    }

    fn resumable(&self) -> Vec<PathBuf> {
        self.kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), LayerError> {
        let m = self
            .mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(mountpoint);
        if m.is_none() {
            let dir = self.cache_dir_for(mountpoint);
            if !self
                .claimed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&dir)
            {
                self.discard(&dir);
            }
        }
        match m {
            Some(m) => {
                self.release(m);
                Ok(())
            }
            // Not ours (e.g. mounted by an earlier run): drop a cache it may have left and
            // detach whatever is there, if anything.
            None => match nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
                Err(e) => Err(e.into()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    struct NoBlobs;
    impl BlobResolver for NoBlobs {
        fn resolve(
            &self,
            _reference: &str,
            _digest: &str,
        ) -> Result<Arc<dyn LayerSource>, FsError> {
            Err(FsError::Labels("no blobs here".into()))
        }
    }

    #[test]
    fn cache_dir_is_private_even_when_left_open() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        let mut cfg = FsConfig::new(d.path());
        cfg.no_background_fetch = true;
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        LayerManager::new(cfg.clone(), Arc::new(NoBlobs)).expect("new");
        assert_eq!(mode(&d.path().join("stargz")), 0o700);
        assert_eq!(mode(&cfg.fscache_dir), 0o700);
        std::fs::set_permissions(&cfg.fscache_dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        LayerManager::new(cfg.clone(), Arc::new(NoBlobs)).expect("new");
        assert_eq!(mode(&cfg.fscache_dir), 0o700, "narrowed on restart");
    }

    #[test]
    fn a_removed_snapshots_cache_leaves_its_place_at_once_and_is_deleted() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut cfg = FsConfig::new(d.path());
        cfg.no_background_fetch = true;
        let m = LayerManager::new(cfg.clone(), Arc::new(NoBlobs)).expect("new");
        let mountpoint = d.path().join("snapshots/7/fs");
        let cache = m.cache_dir_for(&mountpoint);
        std::fs::create_dir_all(cache.join("sub")).expect("mkdir");
        for i in 0..200 {
            std::fs::write(cache.join("sub").join(i.to_string()), [0u8; 512]).expect("write");
        }
        RemoteLayers::unmount(&m, &mountpoint).expect("unmount");
        // Gone from its place at once; deleted (renamed aside first) in the background.
        assert!(!cache.exists(), "the cache is still in place");
        let left = || std::fs::read_dir(&cfg.fscache_dir).expect("ls").count();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while left() > 0 && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(left(), 0, "the cache was not deleted in the background");
    }

    #[test]
    fn cri_labels_win_and_verification_policy() {
        let cfg = FsConfig::new(Path::new("/nonexistent"));
        let l = labels(&[
            (CRI_IMAGE_REF, "cri/ref"),
            (STARGZ_REFERENCE, "default/ref"),
            (STARGZ_DIGEST, "sha256:aa"),
            (TOC_DIGEST, "sha256:toc"),
            (STARGZ_PREFETCH, "1000"),
        ]);
        let p = parse_labels(&l, &cfg).expect("parse");
        assert_eq!(p.reference, "cri/ref");
        assert_eq!(p.digest, "sha256:aa");
        assert_eq!(p.toc_digest.as_deref(), Some("sha256:toc"));
        assert_eq!(p.prefetch_size, Some(1000));

        let l = labels(&[
            (STARGZ_REFERENCE, "r"),
            (STARGZ_DIGEST, "sha256:aa"),
            (STARGZ_SKIP_VERIFY, ""),
        ]);
        assert!(
            parse_labels(&l, &cfg).is_err(),
            "skipverify needs allow_no_verification"
        );
        let mut cfg2 = cfg.clone();
        cfg2.allow_no_verification = true;
        assert_eq!(parse_labels(&l, &cfg2).expect("skip").toc_digest, None);
        let mut cfg3 = cfg.clone();
        cfg3.disable_verification = true;
        let l = labels(&[
            (STARGZ_REFERENCE, "r"),
            (STARGZ_DIGEST, "sha256:aa"),
            (TOC_DIGEST, "sha256:t"),
        ]);
        assert_eq!(parse_labels(&l, &cfg3).expect("disabled").toc_digest, None);
        assert!(parse_labels(&labels(&[(STARGZ_REFERENCE, "r")]), &cfg).is_err());
    }

    /// The layers to resolve ahead are those listed after the one mounted (containerd prepares
    /// bottom-up: those below are mounted already), CRI's list first, at most
    /// [`MAX_LATER_LAYERS`].
    #[test]
    fn later_layers_are_the_ones_listed_above_the_mounted_one() {
        let cfg = FsConfig::new(Path::new("/nonexistent"));
        let later = |pairs: &[(&str, &str)]| {
            let mut l = labels(&[
                (STARGZ_REFERENCE, "r"),
                (STARGZ_DIGEST, "sha256:b"),
                (TOC_DIGEST, "sha256:t"),
            ]);
            l.extend(labels(pairs));
            parse_labels(&l, &cfg).expect("parse").later_layers
        };
        assert!(later(&[]).is_empty());
        assert_eq!(
            later(&[(STARGZ_LAYERS, "sha256:b,sha256:c, sha256:d,")]),
            ["sha256:c", "sha256:d"]
        );
        assert_eq!(
            later(&[
                (CRI_IMAGE_LAYERS, "sha256:a,sha256:b,sha256:c"),
                (STARGZ_LAYERS, "sha256:b,sha256:x"),
            ]),
            ["sha256:c"],
            "CRI's list wins; the layers below are mounted already"
        );
        assert_eq!(
            later(&[(STARGZ_LAYERS, "sha256:a,sha256:c")]),
            ["sha256:a", "sha256:c"],
            "not listed: all others"
        );
        assert!(
            later(&[(STARGZ_LAYERS, "sha256:a,sha256:b")]).is_empty(),
            "the top layer"
        );
        let many: Vec<String> = (0..100).map(|i| format!("sha256:{i:064x}")).collect();
        let got = later(&[(STARGZ_LAYERS, &many.join(","))]);
        assert_eq!(got.len(), MAX_LATER_LAYERS);
        assert_eq!(got[0], many[0]);
    }
}
