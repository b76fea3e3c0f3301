//! Mounting one layer: TOC → inode table → FUSE session, then prefetch and background fetch.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};

use super::background::BackgroundFetcher;
use super::fuse::LayerFs;
use super::inode::{InodeTable, Landmark};
use super::link::Measured;
use super::open::open_toc;
use super::reader::{LayerReader, Priority, ReadOptions};
use super::source::LayerSource;
use super::FsError;
use crate::cache::CacheKind;

/// How a layer is mounted and read.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// Attribute and entry cache timeout handed to the kernel (`[fuse] attr_timeout`).
    pub attr_timeout: Duration,
    /// Serve fully cached files through FUSE passthrough (`[fuse] passthrough`).
    pub passthrough: bool,
    /// FUSE dispatch threads (they never wait for the registry), and the most threads serving
    /// reads that do.
    pub threads: usize,
    pub read: ReadOptions,
    /// Prefetch this many blob bytes at mount unless a landmark says otherwise (0 = none).
    pub prefetch_size: u64,
    /// Never prefetch (`noprefetch`).
    pub no_prefetch: bool,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            attr_timeout: Duration::from_secs(1),
            passthrough: true,
            threads: 8,
            read: ReadOptions::default(),
            prefetch_size: 0,
            no_prefetch: false,
        }
    }
}

/// What to mount: a blob, its name, and the TOC digest it must have (None = unverified).
pub struct LayerSpec {
    pub digest: String,
    pub source: Arc<dyn LayerSource>,
    pub toc_digest: Option<String>,
}

/// A mounted layer; dropping it unmounts and stops its background work (the cache stays).
pub struct MountedLayer {
    session: Option<BackgroundSession>,
    reader: Arc<LayerReader>,
    mountpoint: PathBuf,
    prefetch: Option<JoinHandle<()>>,
    /// Keeps the shared fetcher alive while a layer uses it.
    _fetcher: Option<Arc<BackgroundFetcher>>,
}

impl std::fmt::Debug for MountedLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountedLayer")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

/// Opens the layer's TOC and builds its reader (no mount yet). Chunks already in `cache_dir`
/// are trusted only after [`LayerReader::revalidate_cache`] re-hashed them.
pub fn open_layer(
    spec: LayerSpec,
    cache_dir: &Path,
    opts: &ReadOptions,
    priority: Arc<Priority>,
) -> Result<Arc<LayerReader>, FsError> {
    // Every fetch of the layer, from its TOC on, teaches the daemon its link (read-ahead).
    let toc_source = Measured {
        inner: spec.source.clone(),
        link: opts.link.clone(),
        bandwidth: false,
    };
    let source: Arc<dyn LayerSource> = Arc::new(Measured {
        inner: spec.source,
        link: opts.link.clone(),
        bandwidth: true,
    });
    let index = {
        let _urgent = priority.urgent();
        // One round trip's worth of the link past the footer: the TOC is often within.
        let guess = opts.link.get().readahead(1);
        open_toc(&toc_source, spec.toc_digest.as_deref(), guess)?
    };
    let table = InodeTable::build(&index)?;
    drop(index);
    crate::alloc::trim();
    // A cache directory with files was left by an earlier mount of this snapshot (a daemon
    // restart): its chunks are re-hashed below before anything is served from it.
    let reused = opts.cache_kind == CacheKind::Disk
        && std::fs::read_dir(cache_dir).is_ok_and(|mut d| d.next().is_some());
    let cache = opts
        .cache_kind
        .open(cache_dir, opts.max_open_files)
        .map_err(FsError::Cache)?;
    let mut opts = opts.clone();
    if spec.toc_digest.is_none() {
        // Without a trusted TOC the chunk digests prove nothing either; accept entries without one.
        opts.allow_unverified = true;
    }
    let budget = opts.budget.clone();
    let reader = LayerReader::new(spec.digest, table, source, cache, opts, priority);
    if reused {
        let started = std::time::Instant::now();
        let trusted = reader.revalidate_cache();
        tracing::info!(
            layer = %reader.digest(),
            chunks = trusted,
            of = reader.table().blob_order.len(),
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "reused verified chunks of an earlier mount"
        );
    }
    let reader = Arc::new(reader);
    if let Some(budget) = budget {
        budget.register(&reader);
    }
    Ok(reader)
}

/// Mounts `reader` at `mountpoint` (allow_other, default_permissions, read-only), then starts
/// prefetch and, if `fetcher` is given, queues the layer for background fetch.
pub fn mount_layer(
    reader: Arc<LayerReader>,
    mountpoint: &Path,
    opts: &LayerOptions,
    fetcher: Option<Arc<BackgroundFetcher>>,
) -> Result<MountedLayer, FsError> {
    let fs = LayerFs::new(
        reader.clone(),
        opts.attr_timeout,
        opts.passthrough,
        opts.threads,
    );
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("stargz".into()),
        MountOption::Subtype("stargz".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let mount_err = |e| FsError::Mount {
        path: mountpoint.to_path_buf(),
        source: e,
    };
    let session = Session::new(fs, mountpoint, &config)
        .map_err(mount_err)?
        .spawn()
        .map_err(mount_err)?;
    let limit = prefetch_limit(&reader, opts);
    let bg_reader = reader.clone();
    let keep = fetcher.clone();
    let prefetch = std::thread::Builder::new()
        .name("stargz-prefetch".into())
        .spawn(move || {
            if limit > 0 {
                if let Err(e) = bg_reader.prefetch(limit) {
                    tracing::warn!(layer = %bg_reader.digest(), error = %crate::untrusted::chain(&e), "prefetch failed");
                }
            }
            match fetcher {
                Some(f) => f.add(&bg_reader),
                None => bg_reader.stop_background(),
            }
        })
        .ok();
    tracing::info!(layer = %reader.digest(), mountpoint = %mountpoint.display(), prefetch = limit, "layer mounted");
    Ok(MountedLayer {
        session: Some(session),
        reader,
        mountpoint: mountpoint.to_path_buf(),
        prefetch,
        _fetcher: keep,
    })
}

/// Go's rule: `.no.prefetch.landmark` → none; `.prefetch.landmark` → up to it; else the size.
fn prefetch_limit(reader: &LayerReader, opts: &LayerOptions) -> u64 {
    if opts.no_prefetch {
        return 0;
    }
    match reader.table.landmark {
        Some(Landmark::NoPrefetch) => 0,
        Some(Landmark::PrefetchBefore(off)) => off,
        None => opts.prefetch_size.min(reader.blob_size()),
    }
}

impl MountedLayer {
    pub fn reader(&self) -> &Arc<LayerReader> {
        &self.reader
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Waits for the mount-time prefetch to end (it runs in the background).
    pub fn wait_prefetch(&mut self) {
        if let Some(h) = self.prefetch.take() {
            let _ = h.join();
        }
    }

    /// Unmounts (lazily if busy) and stops background work. The cache stays for the caller.
    pub fn unmount(mut self) -> Result<(), FsError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), FsError> {
        self.reader.stop_background();
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if let Err(e) = session.umount_and_join() {
            tracing::warn!(mountpoint = %self.mountpoint.display(), error = %crate::untrusted::chain(&e), "unmount failed; detaching");
            nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH).map_err(
                |e| FsError::Mount {
                    path: self.mountpoint.clone(),
                    source: e.into(),
                },
            )?;
        }
        Ok(())
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %crate::untrusted::chain(&e), "unmount on drop failed");
        }
    }
}
