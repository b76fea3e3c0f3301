//! A lazy-pulling eStargz remote snapshotter for containerd.
//!
//! The crate is split along the domain:
//! - [`estargz`]: the on-registry format only (footer, TOC, chunk index, builder, verification);
//! - [`oci`]: the image model (descriptors, manifests, media types, digests) and
//!   [`labels`]: the label and annotation names, both shared by the daemon and `ctr-remote`;
//! - [`remote`]: the registry client and the streamed blob reader;
//! - [`cache`]: a layer's cache of verified file data (`add -> Writer{write, commit, abort}`,
//!   `read_at`), on disk (sparse per-file) or in memory;
//! - [`fs`]: one mounted layer served through FUSE;
//! - [`snapshot`]: the snapshotter (metadata store, overlay mounts, remote snapshots);
//! - [`metrics`]: the Prometheus metrics and their endpoint;
//! - [`service`]: gRPC adapter, config, daemon wiring and signals;
//! - [`ctr`]: `ctr-remote`'s commands over containerd's client API;
//! - [`goflags`]: Go's single-dash long flags, for both binaries;
//! - [`untrusted`]: bounding registry-supplied strings before they reach errors and logs;
//! - [`alloc`]: the daemon's glibc allocator tuning.

// Modules are private: the names the binaries, tests, benches and examples need are
// re-exported below, so the compiler's dead-code lint sees everything else.
mod alloc;
mod cache;
mod ctr;
pub mod estargz;
mod fs;
mod goflags;
mod labels;
mod metrics;
mod oci;
mod remote;
mod service;
mod snapshot;
mod untrusted;
mod xattr;

// The daemon (`containerd-stargz-grpc`).
pub use alloc::tune as tune_allocator;
pub use cache::{private_dir, CacheKind};
pub use goflags::go_style_args;
pub use metrics::{serve as serve_metrics, Metrics, MetricsServer};
pub use service::{bind_socket, build_remote_layers, config::Config, run};
pub use snapshot::{
    CheckPolicy, LayerError, RemoteLayers, Snapshotter, SnapshotterImpl, SysMounter, REMOTE_LABEL,
};
pub use untrusted::chain as error_chain;

// `ctr-remote`.
pub use ctr::cli::{run as run_ctr_remote, Cli as CtrRemoteCli};
pub use ctr::registry::{Fetcher, RegistryOptions, RemoteFetcher};
pub use ctr::Error as CtrError;

// The image model and label names shared by both.
pub use labels::TOC_DIGEST;
pub use oci::{chain_ids, Descriptor, Index, Manifest};

// The registry client.
pub use remote::auth::redact_url;
pub use remote::{
    Blob, BlobConfig, ClientConfig, Credentials, DockerConfig, HostConfig, MirrorConfig, Reference,
    RegistryClient, RemoteError, ResolverConfig, Secret,
};

// One mounted layer.
pub use fs::inode::{Chunk, Node, NodeKind};
pub use fs::{
    mount_layer, open_layer, BackgroundFetcher, BlobResolver, CacheBudget, FileSource, FsConfig,
    FsError, LayerManager, LayerOptions, LayerSource, LayerSpec, MountedLayer, Priority,
    ReadOptions, RegistryResolver,
};
// The process that holds FUSE connections across daemon restarts.
pub use fs::{run_keeper, Keeper, KEEPER_FLAG};

/// Code generated from `proto/` (containerd's snapshots v1 API) by `build.rs`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
}
