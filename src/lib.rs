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
//! - [`service`]: gRPC adapter, config, daemon wiring and signals;
//! - [`ctr`]: `ctr-remote`'s commands over containerd's client API;
//! - [`untrusted`]: bounding registry-supplied strings before they reach errors and logs;
//! - [`alloc`]: the daemon's glibc allocator tuning.

pub mod alloc;
pub mod cache;
pub mod ctr;
pub mod estargz;
pub mod fs;
pub mod labels;
pub mod oci;
pub mod remote;
pub mod service;
pub mod snapshot;
pub mod untrusted;

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
