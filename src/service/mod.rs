//! gRPC adapter (containerd snapshots v1), config, daemon wiring and signals.
//!
//! Three parts, as in rust-extensions' snapshots crate: the domain [`Snapshotter`] trait
//! (in `snapshot`), the tonic adapter ([`grpc`]) and the proto↔domain conversions
//! ([`convert`]). [`run`] serves on an already-bound listener so tests run it in-process.

pub mod config;
pub mod convert;
pub mod grpc;

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tracing::info;

use crate::metrics::Metrics;
use crate::proto::containerd::services::snapshots::v1::snapshots_server::SnapshotsServer;
use crate::snapshot::{RemoteLayers, Snapshotter};
use crate::{fs, remote};

/// Errors of the service layer.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("socket {path}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("another daemon is already serving on {0}")]
    SocketInUse(String),
    #[error("gRPC server")]
    Serve(#[from] tonic::transport::Error),
    #[error("registry client")]
    Remote(#[from] remote::RemoteError),
    #[error("remote layers")]
    Layers(#[from] fs::FsError),
}

/// The single wiring point for lazy remote layers: the FUSE-backed [`fs::LayerManager`] over a
/// registry client, caching decompressed file data under `<root>/stargz`. Its calls block on
/// `handle`, so the snapshotter must call it from blocking threads (the gRPC adapter does).
/// Its layers report into `metrics`, if given.
pub fn build_remote_layers(
    config: &config::Config,
    root: &Path,
    handle: tokio::runtime::Handle,
    metrics: Option<Arc<Metrics>>,
) -> Result<Arc<dyn RemoteLayers>, ServiceError> {
    let client = remote::RegistryClient::new(remote::ClientConfig {
        resolver: config.resolver.clone(),
        blob: config.blob.clone(),
        ..remote::ClientConfig::default()
    })?;
    // Everything under `<root>/stargz` is image content: owner-only, created so (and narrowed
    // if an older version left it open) before the cache puts anything there.
    for dir in [root, &root.join("stargz")] {
        crate::cache::private_dir(dir).map_err(fs::FsError::Cache)?;
    }
    let mut fs_config = fs::FsConfig::new(root);
    let ahead_ttl = match u64::try_from(config.resolve_result_entry_ttl_sec) {
        Ok(secs) if secs > 0 => Duration::from_secs(secs),
        _ => fs::DEFAULT_AHEAD_TTL,
    };
    let resolver = fs::RegistryResolver::new(client, handle)
        .with_link(fs_config.layer.read.link.clone())
        .with_ahead_ttl(ahead_ttl);
    fs_config.layer.attr_timeout =
        Duration::from_secs(u64::try_from(config.fuse.attr_timeout).unwrap_or(0));
    fs_config.layer.passthrough = config.fuse.passthrough;
    fs_config.layer.read.native = config.snapshotter.native_layers;
    // Mounts outlive the daemon: a keeper process (this binary) holds their connections.
    // /proc/self/exe: still this binary when an upgrade has replaced the file meanwhile.
    fs_config.layer.keeper = Some(Arc::new(fs::Keeper::new(
        root.join("stargz").join("fuse-keeper.sock"),
        "/proc/self/exe".into(),
    )));
    // A chunk that arrives corrupted is fetched again as often as a failed request is retried.
    fs_config.layer.read.fetch_attempts = config.blob.max_retries.saturating_add(1);
    // A reader waiting for another's fetch gives up only after that fetch must have ended.
    fs_config.layer.read.wait_timeout = config
        .blob
        .fetch_deadline()
        .saturating_add(config.blob.stall_timeout());
    fs_config.layer.prefetch_size = u64::try_from(config.prefetch_size).unwrap_or(0);
    fs_config.layer.no_prefetch = config.noprefetch;
    fs_config.disable_verification = config.disable_verification;
    fs_config.allow_no_verification = config.allow_no_verification;
    fs_config.no_background_fetch = config.no_background_fetch;
    fs_config.max_concurrency = usize::try_from(config.max_concurrency).unwrap_or(1).max(1);
    fs_config.layer.read.cache_kind =
        match crate::cache::CacheKind::parse(&config.filesystem_cache_type) {
            Ok(kind) => kind,
            Err(e) => {
                // Go's daemon falls back to the directory cache for any other value; so do we, loudly.
                tracing::warn!(error = %e, "filesystem_cache_type: using the directory cache");
                crate::cache::CacheKind::Disk
            }
        };
    fs_config.layer.read.max_open_files = usize::try_from(config.directory_cache.max_cache_fds)
        .unwrap_or(0)
        .max(1);
    fs_config.layer.read.metrics = metrics;
    fs_config.cache_max_bytes =
        (config.directory_cache.max_bytes > 0).then_some(config.directory_cache.max_bytes);
    Ok(Arc::new(fs::LayerManager::new(
        fs_config,
        Arc::new(resolver),
    )?))
}

/// Binds the daemon socket: creates its directory (0700, only when we create it: an existing
/// directory such as /tmp is left alone), replaces a stale socket (but refuses to steal one a
/// live daemon still serves), and makes it owner-only (0600) from the start (umask during bind).
pub fn bind_socket(path: &Path) -> Result<UnixListener, ServiceError> {
    let err = |source| ServiceError::Socket {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServiceError::SocketInUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves containerd's Snapshots API for `snapshotter` on `listener` until `shutdown` resolves.
pub async fn run<S: Snapshotter>(
    listener: UnixListener,
    snapshotter: Arc<S>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServiceError> {
    let service = SnapshotsServer::new(grpc::SnapshotService::new(snapshotter));
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    info!("serving snapshots API");
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
