//! One mounted eStargz layer served through FUSE: inode table, reads, prefetch, background fetch.
//!
//! A read goes: FUSE [`fuse::LayerFs`] → [`reader::LayerReader`] (file range → chunks via the
//! [`inode::InodeTable`]) → the layer's [`crate::cache::LayerCache`] on a hit, or one range request to the
//! [`source::LayerSource`] (the seam to `remote`) streamed through per-chunk decoders that
//! verify each chunk's digest before it becomes visible.

mod ahead;
pub mod background;
mod bits;
pub mod budget;
mod chunks;
mod deps;
pub mod fuse;
pub mod inode;
pub mod keeper;
mod kinds;
pub mod layer;
mod link;
pub mod manager;
pub(crate) mod native;
pub mod open;
pub mod reader;
pub mod remote_source;
pub mod source;

pub use ahead::DEFAULT_TTL as DEFAULT_AHEAD_TTL;
pub use background::BackgroundFetcher;
pub use budget::CacheBudget;
pub use keeper::{run_keeper, Keeper, KEEPER_FLAG};
pub use layer::{mount_layer, open_layer, LayerOptions, LayerSpec, MountedLayer};
pub use manager::{BlobResolver, FsConfig, LayerManager};
pub use reader::{Priority, ReadOptions};
pub use remote_source::RegistryResolver;
pub use source::{FileSource, LayerSource};

/// Errors of the `fs` module; the FUSE boundary maps them to errno in `fuse.rs`.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The blob's footer, TOC or index is not valid eStargz, or the TOC digest does not match.
    #[error("opening the layer's TOC")]
    Toc(#[from] crate::estargz::EstargzError),
    #[error("fetching from the blob")]
    Source(#[source] std::io::Error),
    #[error("fscache")]
    Cache(#[source] std::io::Error),
    #[error("chunk: {0}")]
    Chunk(String),
    #[error("no inode {0}")]
    NotFound(u64),
    /// The layer has more names, entries or chunks than the inode table indexes (4 Gi).
    #[error("layer too large for the inode table ({0} items)")]
    TooLarge(usize),
    #[error("mount at {path}")]
    Mount {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Labels(String),
}
