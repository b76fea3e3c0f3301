//! Mounting one layer: TOC → inode table → FUSE session, then prefetch and background fetch.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};

use super::background::BackgroundFetcher;
use super::fuse::LayerFs;
use super::inode::{InodeTable, Landmark, NodeKind};
use super::keeper::{mount_dev, Keeper, Kept};
use super::link::Measured;
use super::open::open_toc;
use super::reader::{LayerReader, Priority, ReadOptions};
use super::source::LayerSource;
use super::FsError;
use crate::cache::CacheKind;

/// The kernel's default time to keep a layer's entries, attributes and negative lookups, in
/// seconds (Go's is 1). A layer never changes, so what the kernel learnt stays true for as long
/// as the mount lives; a day stands for that (the kernel drops entries under memory pressure
/// anyway).
pub const DEFAULT_ATTR_TIMEOUT_SECS: u64 = 86_400;

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
    /// Holds each mount's FUSE connection while no daemon serves it (see [`super::keeper`]).
    pub keeper: Option<Arc<Keeper>>,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            attr_timeout: Duration::from_secs(DEFAULT_ATTR_TIMEOUT_SECS),
            passthrough: true,
            threads: 8,
            read: ReadOptions::default(),
            prefetch_size: 0,
            no_prefetch: false,
            keeper: None,
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
    /// The keeper holding this mount's connection: told to let go before it is unmounted.
    keeper: Option<Arc<Keeper>>,
    /// Served on a connection taken over from a previous daemon: fuser did not mount it, so
    /// it does not unmount it either.
    resumed: bool,
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
    let files: Vec<(u64, u64)> = table
        .nodes()
        .iter()
        .filter(|n| n.kind == NodeKind::Reg)
        .map(|n| (n.ino, n.size))
        .collect();
    let cache = opts
        .cache_kind
        .open(cache_dir, opts.max_open_files, &files)
        .map_err(FsError::Cache)?;
    drop(files);
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
    let mut fs = LayerFs::new(
        reader.clone(),
        opts.attr_timeout,
        opts.passthrough,
        opts.threads,
    );
    if let Some(k) = &opts.keeper {
        fs = fs.keep_with(k.clone(), mountpoint);
    }
    let config = session_config(opts);
    let mount_err = |e| FsError::Mount {
        path: mountpoint.to_path_buf(),
        source: e,
    };
    let session = Session::new(fs, mountpoint, &config).map_err(mount_err)?;
    let kept_fd = match &opts.keeper {
        Some(_) => Some(session.as_fd().try_clone_to_owned().map_err(mount_err)?),
        None => None,
    };
    let session = session.spawn().map_err(mount_err)?;
    if let (Some(keeper), Some(fd)) = (&opts.keeper, kept_fd) {
        let kept = mount_dev(mountpoint).and_then(|dev| match dev {
            Some(dev) => keeper.put(mountpoint, &dev, fd.as_fd()),
            None => Err(std::io::Error::other("not in the mount table")),
        });
        if let Err(e) = kept {
            tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "the fuse keeper does not hold this mount; it will not survive a daemon restart");
        }
    }
    let limit = prefetch_limit(&reader, opts);
    let prefetch = start_background(&reader, limit, fetcher.clone());
    tracing::info!(layer = %reader.digest(), mountpoint = %mountpoint.display(), prefetch = limit, "layer mounted");
    Ok(MountedLayer {
        session: Some(session),
        keeper: opts.keeper.clone(),
        resumed: false,
        reader,
        mountpoint: mountpoint.to_path_buf(),
        prefetch,
        _fetcher: fetcher,
    })
}

fn session_config(opts: &LayerOptions) -> Config {
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
    // A cloned descriptor is a connection end of its own: when a daemon dies, the kernel
    // fails the requests read through it (ECONNABORTED) instead of keeping them for the next
    // daemon. With a keeper, every thread reads the one descriptor the keeper also holds.
    config.clone_fd = opts.keeper.is_none();
    config
}

/// Prefetches up to `limit` blob bytes, then queues the layer for background fetch (if
/// `fetcher` is given), in a thread of its own.
fn start_background(
    reader: &Arc<LayerReader>,
    limit: u64,
    fetcher: Option<Arc<BackgroundFetcher>>,
) -> Option<JoinHandle<()>> {
    let bg_reader = reader.clone();
    std::thread::Builder::new()
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
        .ok()
}

/// Serves `reader` again on a connection a previous daemon left to the keeper (`kept`), for
/// the mount already at `mountpoint`: running containers go on reading, and the requests the
/// previous daemon had read but not answered are asked for again (Linux 6.9's
/// `FUSE_NOTIFY_RESEND`). Inode numbers are the TOC's, the same in every daemon; file handles
/// of the previous daemon stay valid (reads are served by inode); its passthrough backing ids
/// are reused. New files are opened without passthrough on this connection: whether a
/// previous open of them is still live (with which the kernel would refuse passthrough) is
/// not known here.
pub(crate) fn resume_layer(
    reader: Arc<LayerReader>,
    mountpoint: &Path,
    opts: &LayerOptions,
    fetcher: Option<Arc<BackgroundFetcher>>,
    kept: Kept,
) -> Result<MountedLayer, FsError> {
    let mount_err = |e| FsError::Mount {
        path: mountpoint.to_path_buf(),
        source: e,
    };
    let mut fs =
        LayerFs::new(reader.clone(), opts.attr_timeout, false, opts.threads).adopt(&kept.backing);
    if let Some(k) = &opts.keeper {
        fs = fs.keep_with(k.clone(), mountpoint);
    }
    let mut config = session_config(opts);
    config.clone_fd = false;
    // The kernel negotiated this connection with the previous daemon and sends no INIT again,
    // but fuser starts every session with one: it gets a stand-in over a socket, and the
    // session's descriptor is then made the kernel connection (dup3 onto the same number).
    let (ours, theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| mount_err(e.into()))?;
    nix::unistd::write(&theirs, &stand_in_init()).map_err(|e| mount_err(e.into()))?;
    let session = Session::from_fd(fs, ours, SessionACL::All, config).map_err(mount_err)?;
    // SAFETY: both descriptors are open; dup3 atomically replaces the session's socket by the
    // kernel connection under the same number, which the session owns from now on.
    let swapped = unsafe {
        libc::dup3(
            kept.fd.as_raw_fd(),
            session.as_fd().as_raw_fd(),
            libc::O_CLOEXEC,
        )
    };
    if swapped < 0 {
        return Err(mount_err(std::io::Error::last_os_error()));
    }
    drop(theirs);
    let session = session.spawn().map_err(mount_err)?;
    if let Err(e) = ask_resend(kept.fd.as_fd()) {
        tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "the kernel cannot resend requests (Linux 6.9+ can): reads the previous daemon had taken wait until interrupted");
    }
    drop(kept.fd);
    // What the previous daemon prefetched is in the cache; the rest comes in the background.
    let prefetch = start_background(&reader, 0, fetcher.clone());
    tracing::info!(layer = %reader.digest(), mountpoint = %mountpoint.display(), backing_ids = kept.backing.len(), "layer resumed on its running mount");
    Ok(MountedLayer {
        session: Some(session),
        keeper: opts.keeper.clone(),
        resumed: true,
        reader,
        mountpoint: mountpoint.to_path_buf(),
        prefetch,
        _fetcher: fetcher,
    })
}

/// FUSE_INIT as the kernel sends it (fuse_in_header + fuse_init_in, protocol 7.40).
fn stand_in_init() -> Vec<u8> {
    const FUSE_INIT: u32 = 26;
    const LEN: u32 = 40 + 64;
    let mut b = Vec::with_capacity(LEN as usize);
    b.extend_from_slice(&LEN.to_ne_bytes());
    b.extend_from_slice(&FUSE_INIT.to_ne_bytes());
    b.extend_from_slice(&1u64.to_ne_bytes()); // unique
    b.extend_from_slice(&1u64.to_ne_bytes()); // nodeid
    b.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extlen + padding
    for word in [7u32, 40, 1 << 20, u32::MAX, 0] {
        // major, minor, max_readahead, flags (all: the kernel's were granted already), flags2
        b.extend_from_slice(&word.to_ne_bytes());
    }
    b.resize(LEN as usize, 0);
    b
}

/// Asks the kernel to queue again every request of this connection that was read and not
/// answered (`FUSE_NOTIFY_RESEND`, a notification: fuse_out_header with unique 0).
fn ask_resend(fuse: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&16u32.to_ne_bytes());
    b.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    b.extend_from_slice(&0u64.to_ne_bytes());
    nix::unistd::write(fuse, &b)?;
    Ok(())
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
        if let Some(k) = &self.keeper {
            k.del(&self.mountpoint);
        }
        if self.resumed {
            // Unmounting ends the connection and with it the session's threads; a busy mount
            // is detached and its threads are left to end with it.
            return match nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()) {
                Ok(()) => {
                    let _ = session.join();
                    Ok(())
                }
                Err(_) => nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
                    .map_err(|e| FsError::Mount {
                        path: self.mountpoint.clone(),
                        source: e.into(),
                    }),
            };
        }
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
