//! `ctr-remote`: the containerd client side of lazy pulling — `image rpull`,
//! `image convert --estargz`, `image optimize` and `image get-toc-digest`, with Go
//! `ctr-remote`'s command and flag names.
//!
//! containerd 1.6 has no transfer service, so everything a Go client does in-process is
//! done here: content is written through the content service, layers are unpacked by
//! driving the snapshots and diff services.

pub mod cli;
pub mod client;
pub mod convert;
pub mod labels;
pub mod optimize;
mod progress;
pub(crate) mod recorder;
pub mod registry;
pub mod rpull;
pub mod toc;

/// Errors of the `ctr-remote` commands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to containerd at {address}")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// Printed in the message, not as a source: a `Status` prints itself with its own source
    /// (as `Debug`), so a chain through it would say the cause twice.
    #[error("containerd {op}: {}: {}", .status.code(), .status.message())]
    Grpc {
        op: &'static str,
        status: tonic::Status,
    },
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
    #[error("digest mismatch: expected {expected}, got {got}")]
    DigestMismatch { expected: String, got: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("incomplete: {0}")]
    Incomplete(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("layer format: {0}")]
    Format(String),
    #[error("layer format")]
    Estargz(#[from] crate::estargz::EstargzError),
    #[error("json")]
    Json(#[from] serde_json::Error),
    #[error("i/o")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Optimize(#[from] optimize::OptimizeError),
}
