//! One registry blob, streamed: ranges go straight into the caller's sink, nothing is cached
//! here (the fs layer keeps the decompressed bytes; a compressed copy would only double them).

use std::io::Write;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_RANGE, RANGE};
use reqwest::{Method, Response, StatusCode};
use sha2::{Digest as _, Sha256};

use super::body::{self, parse_content_range};
use super::config::BlobConfig;
use super::reference::Reference;
use super::registry::{BlobLocation, BlobTail, RegistryClient};
use super::RemoteError;

/// A registry blob whose size and URL (after redirects) are known. Cheap to clone; clones share
/// the location, so a re-resolve by one serves all.
#[derive(Clone)]
pub struct Blob {
    inner: Arc<Inner>,
}

struct Inner {
    client: RegistryClient,
    reference: Reference,
    digest: String,
    size: u64,
    config: BlobConfig,
    location: Mutex<Arc<BlobLocation>>,
}

impl Blob {
    /// Probes the blob (size, final URL after redirects; mirrors first) and returns a reader.
    /// Each endpoint is given its request timeout, retries included, before the next is tried.
    pub async fn open(
        client: &RegistryClient,
        reference: &Reference,
        digest: &str,
    ) -> Result<Blob, RemoteError> {
        Self::open_with_tail(client, reference, digest, 0)
            .await
            .map(|(blob, _)| blob)
    }

    /// [`Blob::open`], bringing back the blob's last `tail` bytes with the probe when the
    /// registry serves suffix ranges (see [`RegistryClient::locate_blob_with_tail`]).
    pub(crate) async fn open_with_tail(
        client: &RegistryClient,
        reference: &Reference,
        digest: &str,
        tail: u64,
    ) -> Result<(Blob, Option<BlobTail>), RemoteError> {
        let (location, tail) = client
            .locate_blob_with_tail(reference, digest, tail)
            .await?;
        tracing::debug!(digest = %digest, size = location.size, redirected = location.redirected, tail = tail.as_ref().map_or(0, |t| t.bytes.len()), "blob opened");
        let blob = Blob {
            inner: Arc::new(Inner {
                client: client.clone(),
                reference: reference.clone(),
                digest: digest.to_owned(),
                size: location.size,
                config: client.config().blob.clone(),
                location: Mutex::new(Arc::new(location)),
            }),
        };
        Ok((blob, tail))
    }

    pub fn size(&self) -> u64 {
        self.inner.size
    }

    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    /// Streams the bytes of `range` into `sink`. A broken connection resumes with a `Range` from
    /// the first byte `sink` has not seen, so `sink` sees every byte exactly once, in order, and
    /// never more than one network read's worth is held here. Returns the bytes written.
    /// A `sink` error aborts at once ([`RemoteError::Sink`]).
    pub async fn fetch_range_into(
        &self,
        range: Range<u64>,
        sink: &mut (dyn Write + Send),
    ) -> Result<u64, RemoteError> {
        self.inner.fetch_range_into(range, sink).await
    }

    /// Streams the whole blob into `sink` (resuming broken connections like
    /// [`Blob::fetch_range_into`]) and checks the bytes against the blob's digest, so a full
    /// download (`ctr-remote rpull` fallback) is verified without ever being buffered whole.
    /// On [`RemoteError::DigestMismatch`] `sink` has already seen the bad bytes: the caller
    /// must discard them.
    pub async fn fetch_verified_into(
        &self,
        sink: &mut (dyn Write + Send),
    ) -> Result<u64, RemoteError> {
        let mut hashing = HashingWriter {
            sink,
            hasher: Sha256::new(),
        };
        let n = self
            .inner
            .fetch_range_into(0..self.inner.size, &mut hashing)
            .await?;
        let actual = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
        if self.inner.digest.starts_with("sha256:") && actual != self.inner.digest {
            return Err(RemoteError::DigestMismatch {
                expected: self.inner.digest.clone(),
                actual,
            });
        }
        Ok(n)
    }

    /// Checks the blob is still reachable (re-probes size and URL). Ends within the request
    /// timeout of each endpoint tried, like [`Blob::open`].
    pub async fn check(&self) -> Result<(), RemoteError> {
        self.inner.relocate().await
    }

    /// A blocking adapter for non-runtime threads.
    pub fn sync(&self, handle: tokio::runtime::Handle) -> SyncBlob {
        SyncBlob {
            blob: self.clone(),
            handle,
        }
    }
}

impl Inner {
    fn location(&self) -> Arc<BlobLocation> {
        self.location
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn timed_out(&self, after: Duration) -> RemoteError {
        tracing::warn!(digest = %self.digest, after_ms = after.as_millis() as u64, "blob fetch ran past its deadline");
        RemoteError::TimedOut {
            what: format!("fetch from blob {}", self.digest),
            after,
        }
    }

    /// Sends a ranged GET to the blob's current location.
    async fn send_range(
        &self,
        header: &str,
        timeout: Duration,
    ) -> Result<(Response, Arc<BlobLocation>), RemoteError> {
        let loc = self.location();
        let mut headers = HeaderMap::new();
        headers.insert(
            RANGE,
            HeaderValue::from_str(header).map_err(|_| RemoteError::Protocol("bad range".into()))?,
        );
        let ep = (!loc.redirected).then_some(&loc.endpoint);
        let resp = self
            .client
            .send(
                ep,
                &self.reference.repository,
                Method::GET,
                &loc.url,
                &headers,
                timeout,
            )
            .await?;
        Ok((resp, loc))
    }

    /// Start offset of a single-range 206, after checking its Content-Range names this blob's size.
    fn single_range_start(&self, resp: &reqwest::Response) -> Result<u64, RemoteError> {
        let (start, _, total) = resp
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_content_range)
            .ok_or_else(|| RemoteError::Protocol("206 without a valid Content-Range".into()))?;
        self.check_total(total)?;
        Ok(start)
    }

    fn check_total(&self, total: Option<u64>) -> Result<(), RemoteError> {
        match total {
            Some(t) if t != self.size => Err(RemoteError::BlobChanged {
                digest: self.digest.clone(),
                was: self.size,
                now: t,
            }),
            _ => Ok(()),
        }
    }

    /// Re-probes the blob's URL (after a redirect target refused us, or as a health check).
    async fn relocate(&self) -> Result<(), RemoteError> {
        let loc = self
            .client
            .locate_blob(&self.reference, &self.digest)
            .await?;
        if loc.size != self.size {
            return Err(RemoteError::BlobChanged {
                digest: self.digest.clone(),
                was: self.size,
                now: loc.size,
            });
        }
        *self.location.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(loc);
        Ok(())
    }

    fn has_other_endpoints(&self) -> bool {
        self.client.endpoints(&self.reference).len() > 1
    }

    /// Ends within [`BlobConfig::fetch_deadline`] (`sink` may have seen part of the range then).
    async fn fetch_range_into(
        &self,
        range: Range<u64>,
        sink: &mut (dyn Write + Send),
    ) -> Result<u64, RemoteError> {
        let deadline = self.config.fetch_deadline();
        tokio::time::timeout(deadline, self.fetch_range_retrying(range, sink))
            .await
            .unwrap_or_else(|_| Err(self.timed_out(deadline)))
    }

    async fn fetch_range_retrying(
        &self,
        range: Range<u64>,
        sink: &mut (dyn Write + Send),
    ) -> Result<u64, RemoteError> {
        if range.start > range.end || range.end > self.size {
            return Err(RemoteError::OutOfRange {
                start: range.start,
                end: range.end,
                size: self.size,
            });
        }
        let total = range.end - range.start;
        let mut delivered = 0u64;
        let mut attempt = 0;
        // Each at most once per call: re-resolving a refused storage URL, and moving off an
        // endpoint (a mirror) that keeps failing.
        let mut relocated = false;
        let mut switched = false;
        while delivered < total {
            let start = range.start + delivered;
            let header = format!("bytes={start}-{}", range.end - 1);
            let timeout = Duration::from_secs(self.config.fetching_timeout_sec.max(1));
            let result = match self.send_range(&header, timeout).await {
                Ok((resp, loc)) => {
                    self.stream_into(resp, &loc, start, range.end, sink, &mut delivered)
                        .await
                }
                Err(e) => Err(FetchError::Remote(e)),
            };
            let err = match result {
                Ok(()) => continue,
                Err(FetchError::Relocate) if !relocated => {
                    relocated = true;
                    self.relocate().await?;
                    continue;
                }
                Err(FetchError::Remote(e)) => e,
                Err(FetchError::Relocate) => RemoteError::Unauthorized {
                    host: self.reference.host.clone(),
                    reason: "blob storage refused the re-resolved URL".into(),
                },
            };
            if !retry_in_stream(&err) || attempt >= self.config.max_retries {
                if !switched && err.is_retryable() && self.has_other_endpoints() {
                    // The host serving this blob (a mirror) keeps failing: probe the endpoints
                    // again in order and go on, from the first missing byte, with whichever
                    // answers.
                    switched = true;
                    if self.relocate().await.is_ok() {
                        tracing::info!(digest = %self.digest, delivered, error = %crate::untrusted::chain(&err), "blob source failing, re-resolved endpoint");
                        attempt = 0;
                        continue;
                    }
                }
                tracing::warn!(digest = %self.digest, attempt, delivered, error = %crate::untrusted::chain(&err), "blob fetch failed");
                return Err(err);
            }
            let wait = self.config.backoff(attempt);
            tracing::debug!(digest = %self.digest, attempt, delivered, wait_ms = wait.as_millis() as u64, error = %crate::untrusted::chain(&err), "resuming range fetch");
            attempt += 1;
            tokio::time::sleep(wait).await;
        }
        Ok(delivered)
    }

    /// Streams one response into `sink`, bumping `delivered` per byte written.
    async fn stream_into(
        &self,
        mut resp: Response,
        loc: &BlobLocation,
        start: u64,
        end: u64,
        sink: &mut (dyn Write + Send),
        delivered: &mut u64,
    ) -> Result<(), FetchError> {
        let mut pos = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let s = self.single_range_start(&resp)?;
                if s != start {
                    return Err(RemoteError::Protocol(format!(
                        "asked for offset {start}, got {s}"
                    ))
                    .into());
                }
                s
            }
            StatusCode::OK => {
                // The whole blob from offset 0 (skipped up to `start`): it must be this blob's size.
                if let Some(l) = resp.content_length() {
                    self.check_total(Some(l))?;
                }
                0
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if loc.redirected => {
                return Err(FetchError::Relocate)
            }
            _ => {
                return Err(
                    body::status_error(resp, &loc.url, self.config.stall_timeout())
                        .await
                        .into(),
                )
            }
        };
        // Never reads past `end`: a longer body is simply not read.
        let stall = self.config.stall_timeout();
        while pos < end {
            let piece = match tokio::time::timeout(stall, resp.chunk()).await {
                Err(_) => return Err(RemoteError::Stalled(stall).into()),
                Ok(Err(e)) => return Err(RemoteError::body(&loc.url, e).into()),
                Ok(Ok(None)) => {
                    return Err(RemoteError::Truncated(format!(
                        "range of {} ended at {pos}",
                        self.digest
                    ))
                    .into())
                }
                Ok(Ok(Some(p))) => p,
            };
            let p_end = pos + piece.len() as u64;
            let (s, e) = (pos.max(start), p_end.min(end));
            if s < e {
                sink.write_all(&piece[(s - pos) as usize..(e - pos) as usize])
                    .map_err(RemoteError::Sink)?;
                *delivered += e - s;
            }
            pos = p_end;
        }
        Ok(())
    }
}

/// Passes bytes through to `sink` while hashing them.
struct HashingWriter<'a> {
    sink: &'a mut (dyn Write + Send),
    hasher: Sha256,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.sink.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sink.flush()
    }
}

/// Whether a failed attempt is worth repeating here. Statuses and connection errors were
/// already retried with backoff by `RegistryClient::send`; what is left to retry is a response
/// that broke while streaming (reset, truncation, stall, garbled framing).
fn retry_in_stream(err: &RemoteError) -> bool {
    matches!(
        err,
        RemoteError::Truncated(_) | RemoteError::Stalled(_) | RemoteError::Protocol(_)
    )
}

/// Why one fetch attempt stopped.
enum FetchError {
    /// The redirected URL was refused: re-resolve it.
    Relocate,
    Remote(RemoteError),
}

impl From<RemoteError> for FetchError {
    fn from(e: RemoteError) -> Self {
        FetchError::Remote(e)
    }
}

/// [`Blob`] for synchronous callers (FUSE threads): each call blocks on the runtime `handle`.
/// Must not be called from a runtime worker thread (`block_on` would panic there).
#[derive(Clone)]
pub struct SyncBlob {
    blob: Blob,
    handle: tokio::runtime::Handle,
}

impl SyncBlob {
    pub fn size(&self) -> u64 {
        self.blob.size()
    }

    /// Re-probes the blob (the snapshotter's reachability check).
    pub fn check(&self) -> Result<(), RemoteError> {
        self.handle.block_on(self.blob.check())
    }

    pub fn fetch_range_into(
        &self,
        range: Range<u64>,
        sink: &mut (dyn Write + Send),
    ) -> Result<u64, RemoteError> {
        self.handle
            .block_on(self.blob.fetch_range_into(range, sink))
    }

    pub fn fetch_verified_into(&self, sink: &mut (dyn Write + Send)) -> Result<u64, RemoteError> {
        self.handle.block_on(self.blob.fetch_verified_into(sink))
    }
}
