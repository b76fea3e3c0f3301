//! Registry client (resolve, auth, ranges, retries) and the lazy blob reader.
//!
//! # Using it (for `fs`, `snapshot`, `service`)
//!
//! ```text
//! let client = RegistryClient::new(ClientConfig { blob, resolver, .. })?;   // one per daemon
//! let reference: Reference = "127.0.0.1:5000/app:v1".parse()?;
//! let resolved = client.resolve(&reference).await?;          // manifest (platform picked)
//! let config = client.fetch_blob_bytes(&reference, &resolved.manifest.config.digest).await?;
//! let blob = Blob::open(&client, &reference, layer_digest, cache).await?;  // probes size + URL
//! let index = client.fetch_manifest(&reference, reference.object()).await?; // raw bytes, no platform pick
//! blob.read_at(&mut buf, offset).await?;                     // cached, chunk-aligned reads
//! blob.prefetch(&[a..b]).await?;                             // fill the cache, no caller buffer
//! blob.fetch_range_into(a..b, &mut sink).await?;             // stream bytes, NOT cached
//! blob.fetch_verified_into(&mut sink).await?;               // whole blob, digest-checked, NOT cached
//! let sync = blob.sync(tokio::runtime::Handle::current());   // for FUSE threads
//! estargz::ReadAt::read_at(&sync, &mut buf, offset)?;        // blocks on the runtime
//! blob.free_cache()?;                                        // drop this blob's cache entries
//! ```
//!
//! ## Guarantees of [`Blob`]
//! - Reads are aligned to `[blob] chunk_size`; each chunk is one cache entry keyed
//!   `"<digest hex>-<chunk offset>-<chunk len>"` (so `free_cache` is a prefix removal).
//! - Missing chunks of one call go out in ONE HTTP request (multi-range, adjacent chunks merged;
//!   single range after a 400 or with `force_single_range_mode`; a 200 full body is handled by
//!   skipping). The response is streamed: each chunk's bytes go straight into its cache writer
//!   and only the bytes of the requested span into the caller's buffer; no buffer ever holds a
//!   whole chunk or response. A chunk is committed only once all of its bytes have arrived at the
//!   offsets the server declared (Content-Range / multipart part headers); any error aborts it.
//! - Concurrent reads of the same chunk share one fetch; waiters read the committed entry.
//! - What is NOT verified here: the registry has no per-range digest, so a byte corrupted in
//!   flight with a correct length is returned and cached. The eStargz layer above verifies each
//!   chunk's `chunkDigest` before serving it (and must drop the cache on mismatch, with
//!   [`Blob::free_cache`] or `BlobCache::remove`). Length, offsets and totals ARE verified.
//! - Transient failures (connection reset, truncation, stall, 5xx, 429) are retried with
//!   exponential backoff (`max_retries`, `min_wait_msec`, `max_wait_msec`); then a clear error.
//! - Every wait has a deadline: response headers and each body piece within `stall_timeout_msec`;
//!   one fetch call, retries and re-resolves included, within [`BlobConfig::fetch_deadline`];
//!   `Blob::open`/`check` within the request timeout per endpoint tried.
//! - Every body is streamed against a byte limit, never trusting Content-Length: small objects
//!   (manifests, configs, tokens) have fixed caps, range responses may not exceed what was
//!   asked, and only a short prefix of an error body is read, clipped, for the message.
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
pub mod multipart;
pub mod reference;
mod registry;

pub use auth::{Credentials, DockerConfig, Secret};
pub use blob::{Blob, SyncBlob};
pub use config::{BlobConfig, ClientConfig, HostConfig, MirrorConfig, Platform, ResolverConfig};
pub use reference::Reference;
pub use registry::{RawManifest, RegistryClient, Resolved};

use crate::cache::CacheError;

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
    #[error("invalid manifest: {0}")]
    Manifest(String),
    #[error("no manifest for platform {0}")]
    NoMatchingPlatform(String),
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("range {start}..{end} outside blob of {size} bytes")]
    OutOfRange { start: u64, end: u64, size: u64 },
    #[error("blob {digest} changed size from {was} to {now}")]
    BlobChanged { digest: String, was: u64, now: u64 },
    #[error("writing fetched bytes")]
    Sink(#[source] std::io::Error),
    #[error(transparent)]
    Cache(#[from] CacheError),
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
