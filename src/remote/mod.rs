//! Registry client (manifests, auth, ranges, retries) and the streamed blob reader.
//!
//! # Using it (for `fs`, `snapshot`, `service`, `ctr`)
//!
//! ```text
//! let client = RegistryClient::new(ClientConfig { blob, resolver, .. })?;   // one per daemon
//! let reference: Reference = "127.0.0.1:5000/app:v1".parse()?;
//! let top = client.fetch_manifest(&reference, reference.object()).await?; // raw bytes; callers pick the platform
//! let config = client.fetch_blob_bytes(&reference, config_digest).await?;
//! let blob = Blob::open(&client, &reference, layer_digest).await?;  // probes size + URL
//! blob.fetch_range_into(a..b, &mut sink).await?;             // stream bytes, nothing cached
//! blob.fetch_ranges_into(&[a..b, c..d], &mut sink).await?;   // several ranges, one request
//! blob.fetch_verified_into(&mut sink).await?;               // whole blob, digest-checked
//! let sync = blob.sync(tokio::runtime::Handle::current());   // for FUSE threads
//! sync.fetch_range_into(a..b, &mut sink)?;                   // blocks on the runtime
//! ```
//!
//! ## Guarantees of [`Blob`]
//! - Nothing is cached here: each call is one request (more after a failure), streamed into the
//!   caller's sink as it arrives; no buffer ever holds a whole range. The fs layer keeps the
//!   decompressed bytes.
//! - Several ranges go in one request, answered as `multipart/byteranges` (bounded heads, each
//!   part placed by its `Content-Range` within this blob). A registry that answers otherwise
//!   (the whole blob, one range, parts out of order or missing, a refusal) is asked again for
//!   the covering range at once, and for one range at a time from then on for that blob; so is
//!   every registry with `force_single_range_mode`.
//! - A response that breaks (reset, truncation, stall) is resumed with a `Range` from the first
//!   byte the sink has not seen, so the sink sees every byte once, in order, and only the bytes
//!   asked for. A 206 must not start past the first byte wanted and must name this blob's size;
//!   a 200 (whole blob) is skipped up to the start; no byte past the last one wanted is read
//!   (of a multipart answer, at most a bounded tail while looking for its closing line).
//! - What is NOT verified here: the registry has no per-range digest, so a byte corrupted in
//!   flight with a correct length is passed on. The eStargz layer above verifies each chunk's
//!   `chunkDigest` before serving it. [`Blob::fetch_verified_into`] checks the blob's digest.
//! - Transient failures (connection reset, truncation, stall, 5xx, 429) are retried with
//!   exponential backoff (`max_retries`, `min_wait_msec`, `max_wait_msec`); an endpoint (a
//!   mirror) that still fails is left for the next one that answers; then a clear error.
//! - Every wait has a deadline: response headers and each body piece within `stall_timeout_msec`;
//!   one fetch call, retries and re-resolves included, within [`BlobConfig::fetch_deadline`];
//!   `Blob::open`/`check` within the request timeout per endpoint tried.
//! - Every body is streamed against a byte limit, never trusting Content-Length: small objects
//!   (manifests, configs, tokens) have fixed caps, range responses are read only up to the
//!   asked end, and only a short prefix of an error body is read, clipped, for the message.
//! - Redirects are followed by hand: registry credentials and mirror `header`s go only to the
//!   origin (scheme, host, port) a request was first sent to, never to a redirect target.
//! - A 401/403 from a redirected storage URL re-resolves the URL; a 401 from the registry
//!   refreshes the token once.
//! - Credentials/tokens are never logged nor put in errors: [`auth::Secret`] prints
//!   `<redacted>`, and URLs in errors lose their query (presigned signatures) and user-info.
//!
//! The sync adapter [`SyncBlob`] calls `Handle::block_on`: use it from threads that are not
//! runtime workers (FUSE threads, `spawn_blocking`), never from inside async code.

pub mod auth;
mod blob;
mod body;
pub mod config;
mod multipart;
pub mod reference;
mod registry;

pub use auth::{Credentials, DockerConfig, Secret};
pub use blob::{Blob, SyncBlob};
pub use config::{BlobConfig, ClientConfig, HostConfig, MirrorConfig, ResolverConfig};
pub(crate) use reference::valid_digest;
pub use reference::Reference;
pub(crate) use registry::BlobTail;
pub use registry::RegistryClient;

/// Errors of the registry client and the blob reader. None of them carries a credential.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("invalid image reference {0:?}")]
    InvalidReference(String),
    #[error("request to {url} failed")]
    Http {
        /// Redacted (no query, no user-info).
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered HTTP {status}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Status {
        url: String,
        status: u16,
        /// What the error body said: a clipped prefix, empty when it said nothing readable.
        detail: String,
    },
    #[error("registry {host} refused authorization: {reason}")]
    Unauthorized { host: String, reason: String },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("registry protocol error: {0}")]
    Protocol(String),
    #[error("response truncated: {0}")]
    Truncated(String),
    #[error("no data for {0:?}, connection stalled")]
    Stalled(std::time::Duration),
    /// A body longer than we ever read into memory (or than the range asked for).
    #[error("{what} is larger than {limit} bytes")]
    BodyTooLarge { what: String, limit: u64 },
    /// A whole operation, retries included, ran past its deadline.
    #[error("{what} did not finish within {after:?}")]
    TimedOut {
        what: String,
        after: std::time::Duration,
    },
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("range {start}..{end} outside blob of {size} bytes")]
    OutOfRange { start: u64, end: u64, size: u64 },
    #[error("blob {digest} changed size from {was} to {now}")]
    BlobChanged { digest: String, was: u64, now: u64 },
    #[error("writing fetched bytes")]
    Sink(#[source] std::io::Error),
}

impl RemoteError {
    pub(crate) fn http(url: &str, e: reqwest::Error) -> Self {
        RemoteError::Http {
            url: auth::redact_url(url),
            source: e.without_url(),
        }
    }

    /// A body that broke while streaming (reset, closed before its length): says why.
    pub(crate) fn body(url: &str, e: reqwest::Error) -> Self {
        // Text, not a source: `Truncated` is also what a short body without any error is.
        RemoteError::Truncated(format!(
            "body from {} broke off: {}",
            auth::redact_url(url),
            crate::untrusted::chain(&e)
        ))
    }

    /// Worth another attempt after a backoff.
    pub fn is_retryable(&self) -> bool {
        match self {
            RemoteError::Http { source, .. } => {
                source.is_connect()
                    || source.is_timeout()
                    || source.is_body()
                    || source.is_request()
                    || source.is_decode()
            }
            RemoteError::Status { status, .. } => {
                *status == 429 || (*status >= 500 && *status != 501)
            }
            RemoteError::Truncated(_) | RemoteError::Stalled(_) | RemoteError::Protocol(_) => true,
            _ => false,
        }
    }
}

impl From<RemoteError> for std::io::Error {
    fn from(e: RemoteError) -> Self {
        let kind = match &e {
            RemoteError::NotFound(_) => std::io::ErrorKind::NotFound,
            RemoteError::Unauthorized { .. } => std::io::ErrorKind::PermissionDenied,
            RemoteError::OutOfRange { .. } => std::io::ErrorKind::InvalidInput,
            RemoteError::Stalled(_) | RemoteError::TimedOut { .. } => std::io::ErrorKind::TimedOut,
            _ => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}
