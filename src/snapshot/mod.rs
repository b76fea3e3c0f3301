//! The snapshotter: metadata store, overlay mounts and remote (lazily mounted) snapshots.
//!
//! The domain types mirror containerd's `snapshots` package; the gRPC adapter in
//! [`crate::service`] converts them to and from the wire types.

pub(crate) mod check;
pub mod filter;
pub mod mounts;
pub mod snapshotter;
pub mod store;

pub use check::CheckPolicy;
pub use mounts::SysMounter;
pub use snapshotter::SnapshotterImpl;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The label names this module reads and writes, defined in [`crate::labels`] and kept here
/// under the names the snapshotter's code and tests use.
pub use crate::labels::{
    REMOTE as REMOTE_LABEL, REMOTE_VALUE as REMOTE_LABEL_VALUE,
    SNAPSHOT_REF as TARGET_SNAPSHOT_LABEL,
};

/// The kind of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// What `Stat`/`List` report about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    /// Empty when the snapshot has no parent.
    pub parent: String,
    pub kind: Kind,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
}

/// Disk usage of a snapshot's own layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// A mount as containerd expects it (`type`, `source`, `options`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Errors, each mapped to the gRPC code containerd expects (see `service`).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0} not found")]
    NotFound(String),
    #[error("snapshot {0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// Internal too, with its cause (disk, database, mount table) kept for the chain: the gRPC
    /// message prints it with [`crate::untrusted::chain`].
    #[error("{what}")]
    System {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The snapshotter, with containerd's semantics. Calls may block (disk, mounts, a remote
/// mount fetching a TOC); the gRPC adapter runs them on blocking threads.
pub trait Snapshotter: Send + Sync + 'static {
    fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError>;
    fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError>;
    fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError>;
    fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), SnapshotError>;
    fn remove(&self, key: &str) -> Result<(), SnapshotError>;
    fn stat(&self, key: &str) -> Result<Info, SnapshotError>;
    /// Updates the fields named by `field_paths` (`labels`, `labels.<key>`); all labels when empty.
    fn update(&self, info: Info, field_paths: &[String]) -> Result<Info, SnapshotError>;
    fn usage(&self, key: &str) -> Result<Usage, SnapshotError>;
    /// Lists snapshots matching any of containerd's `filters` (all when empty).
    fn list(&self, filters: &[String]) -> Result<Vec<Info>, SnapshotError>;
    /// Removes directories no snapshot owns any more (and unmounts their remote layers).
    fn cleanup(&self) -> Result<(), SnapshotError>;
}

/// Error type of the remote-layer seam: shown to the user with its causes (`untrusted::chain`).
pub type LayerError = Box<dyn std::error::Error + Send + Sync>;

/// Mounts remote layers (eStargz through FUSE) for the snapshotter. Implemented by `fs`;
/// the snapshotter only decides *when* to call it.
pub trait RemoteLayers: Send + Sync {
    /// Mounts the layer described by `labels` at `mountpoint`; `lowers` are the mountpoints
    /// of the snapshot's parents, nearest first (the layers below it in a container), as far
    /// as known. An error means "fall back to a normal snapshot" and is logged with
    /// `remote-snapshot-prepared=false`.
    fn mount(
        &self,
        mountpoint: &Path,
        labels: &BTreeMap<String, String>,
        lowers: &[PathBuf],
    ) -> Result<(), LayerError>;
    /// Checks that the layer mounted at `mountpoint` can still reach its blob.
    fn check(&self, mountpoint: &Path, labels: &BTreeMap<String, String>)
        -> Result<(), LayerError>;
    /// Unmounts the layer and releases what it holds (including its cache).
    fn unmount(&self, mountpoint: &Path) -> Result<(), LayerError>;
    /// Called once restore has re-mounted what it could, with the mountpoints of every remote
    /// snapshot the metadata still holds (mounted or not): state kept for any other layer (its
    /// snapshot was removed while the daemon was down) can be dropped now. A snapshot whose
    /// re-mount failed (registry down) keeps its state for a later mount.
    fn restored(&self, _remote_mountpoints: &[PathBuf]) {}
    /// A plain directory holding the same tree as the layer mounted at `mountpoint`, for the
    /// mounts made from now on instead of the mount itself (a fully fetched layer's native
    /// form); None: use the mount.
    fn native(&self, _mountpoint: &Path) -> Option<PathBuf> {
        None
    }
    /// Mountpoints whose mounts outlived the previous daemon and are to be served again by
    /// [`RemoteLayers::mount`] (running containers use them): restore must not detach them.
    fn resumable(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}
