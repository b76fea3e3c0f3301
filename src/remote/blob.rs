//! One registry blob, streamed: ranges go straight into the caller's sink, nothing is cached
//! here (the fs layer keeps the decompressed bytes; a compressed copy would only double them).

use std::io::Write;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::{Method, Response, StatusCode};
use sha2::{Digest as _, Sha256};

use super::body::{self, parse_content_range};
use super::config::BlobConfig;
use super::multipart::{self, Parts};
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
    /// Several ranges are asked for one at a time (as one covering range): set by
    /// `force_single_range_mode`, or once the registry answered a multi-range request badly.
    single_range: AtomicBool,
}

/// Most ranges named in one request; more are asked for as one covering range.
pub(crate) const MAX_RANGES: usize = 64;

/// Bytes read after the last wanted byte of a multi-range response while looking for its end (so
/// the connection can be reused); a longer tail is not read.
const MAX_TAIL: u64 = 64 << 10;

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
                single_range: AtomicBool::new(client.config().blob.force_single_range_mode),
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

    /// Whether [`Blob::fetch_ranges_into`] asks for several ranges in one request (else it asks
    /// for the range that covers them, and the bytes between are read and dropped).
    pub fn multi_range(&self) -> bool {
        !self.inner.single_range.load(Ordering::Relaxed)
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
        self.inner.fetch_ranges_into(&[range], sink).await
    }

    /// Streams the bytes of `ranges` (ascending, apart) into `sink`, one after the
    /// other, as [`Blob::fetch_range_into`] does one range: one request names them all
    /// (`multipart/byteranges` answer) unless the registry cannot do that (see
    /// [`Blob::multi_range`]). Returns the bytes written.
    pub async fn fetch_ranges_into(
        &self,
        ranges: &[Range<u64>],
        sink: &mut (dyn Write + Send),
    ) -> Result<u64, RemoteError> {
        self.inner.fetch_ranges_into(ranges, sink).await
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
            .fetch_ranges_into(std::slice::from_ref(&(0..self.inner.size)), &mut hashing)
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

    /// Ends within [`BlobConfig::fetch_deadline`] (`sink` may have seen part of the ranges then).
    async fn fetch_ranges_into(
        &self,
        ranges: &[Range<u64>],
        sink: &mut (dyn Write + Send),
    ) -> Result<u64, RemoteError> {
        let deadline = self.config.fetch_deadline();
        tokio::time::timeout(deadline, self.fetch_ranges_retrying(ranges, sink))
            .await
            .unwrap_or_else(|_| Err(self.timed_out(deadline)))
    }

    /// The `Range` header asking for what `want` still lacks: every range, or the one covering
    /// them when the registry is not asked for several.
    fn range_header(&self, want: &Wanted<'_>) -> String {
        let left: Vec<Range<u64>> = want.left().collect();
        let covering = || {
            let (start, end) = (
                left.first().map_or(0, |r| r.start),
                left.last().map_or(0, |r| r.end),
            );
            format!("bytes={start}-{}", end - 1)
        };
        if left.len() == 1 || left.len() > MAX_RANGES || self.single_range.load(Ordering::Relaxed) {
            return covering();
        }
        let list: Vec<String> = left
            .iter()
            .map(|r| format!("{}-{}", r.start, r.end - 1))
            .collect();
        format!("bytes={}", list.join(","))
    }

    /// Asks for several ranges one at a time from now on: the registry answered a multi-range
    /// request with something other than the parts asked for.
    fn give_up_multi_range(&self, why: &str) {
        if !self.single_range.swap(true, Ordering::Relaxed) {
            tracing::info!(digest = %self.digest, why, "registry does not serve multi-range requests; asking for one range at a time");
        }
    }

    async fn fetch_ranges_retrying(
        &self,
        ranges: &[Range<u64>],
        sink: &mut (dyn Write + Send),
    ) -> Result<u64, RemoteError> {
        // Empty ranges need no request; the others must be ascending and apart.
        let mut end = 0;
        let mut asked = Vec::with_capacity(ranges.len());
        for r in ranges {
            if r.start > r.end || r.end > self.size || (r.start < end && !r.is_empty()) {
                return Err(RemoteError::OutOfRange {
                    start: r.start,
                    end: r.end,
                    size: self.size,
                });
            }
            if !r.is_empty() {
                end = r.end;
                asked.push(r.clone());
            }
        }
        let mut want = Wanted::new(&asked);
        let mut attempt = 0;
        // Each at most once per call: re-resolving a refused storage URL, and moving off an
        // endpoint (a mirror) that keeps failing.
        let mut relocated = false;
        let mut switched = false;
        while !want.done() {
            let header = self.range_header(&want);
            let multi = header.contains(',');
            let timeout = Duration::from_secs(self.config.fetching_timeout_sec.max(1));
            let result = match self.send_range(&header, timeout).await {
                Ok((resp, loc)) => self.stream_into(resp, &loc, multi, &mut want, sink).await,
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
            if multi
                && matches!(
                    err,
                    RemoteError::Protocol(_) | RemoteError::Status { status: 416, .. }
                )
            {
                // Asked again at once, as one range: not a failure of the registry's.
                self.give_up_multi_range(&crate::untrusted::chain(&err).to_string());
                continue;
            }
            if !retry_in_stream(&err) || attempt >= self.config.max_retries {
                if !switched && err.is_retryable() && self.has_other_endpoints() {
                    // The host serving this blob (a mirror) keeps failing: probe the endpoints
                    // again in order and go on, from the first missing byte, with whichever
                    // answers.
                    switched = true;
                    if self.relocate().await.is_ok() {
                        tracing::info!(digest = %self.digest, delivered = want.delivered, error = %crate::untrusted::chain(&err), "blob source failing, re-resolved endpoint");
                        attempt = 0;
                        continue;
                    }
                }
                tracing::warn!(digest = %self.digest, attempt, delivered = want.delivered, error = %crate::untrusted::chain(&err), "blob fetch failed");
                return Err(err);
            }
            let wait = self.config.backoff(attempt);
            tracing::debug!(digest = %self.digest, attempt, delivered = want.delivered, wait_ms = wait.as_millis() as u64, error = %crate::untrusted::chain(&err), "resuming range fetch");
            attempt += 1;
            tokio::time::sleep(wait).await;
        }
        Ok(want.delivered)
    }

    /// Streams one response into `sink` through `want`. `multi` says the request named several
    /// ranges: a `multipart/byteranges` answer is read part by part, and any other answer means
    /// the registry does not do that.
    async fn stream_into(
        &self,
        mut resp: Response,
        loc: &BlobLocation,
        multi: bool,
        want: &mut Wanted<'_>,
        sink: &mut (dyn Write + Send),
    ) -> Result<(), FetchError> {
        let (mut pos, mut parts) = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let boundary = resp
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(multipart::boundary);
                match boundary {
                    Some(b) => (0, Some(Parts::new(&b, self.size))),
                    None => {
                        if multi {
                            self.give_up_multi_range("a single range answered");
                        }
                        (self.single_range_start(&resp)?, None)
                    }
                }
            }
            StatusCode::OK => {
                if multi {
                    self.give_up_multi_range("the whole blob answered");
                }
                // The whole blob from offset 0 (skipped up to what is wanted): it must be this
                // blob's size.
                if let Some(l) = resp.content_length() {
                    self.check_total(Some(l))?;
                }
                (0, None)
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
        // Never reads past the last wanted byte of a single range; a multi-range answer is read
        // to its closing line (bounded), so that its connection can serve the next request.
        let stall = self.config.stall_timeout();
        let mut tail = 0u64;
        loop {
            let open = parts.as_ref().is_some_and(|p| !p.closed());
            if want.done() && (!open || tail > MAX_TAIL) {
                return Ok(());
            }
            let piece = match tokio::time::timeout(stall, resp.chunk()).await {
                Err(_) => return Err(RemoteError::Stalled(stall).into()),
                Ok(Err(e)) => return Err(RemoteError::body(&loc.url, e).into()),
                Ok(Ok(None)) if want.done() => return Ok(()),
                Ok(Ok(None)) => {
                    return Err(RemoteError::Truncated(format!(
                        "range response for {} ended before byte {}",
                        self.digest, want.next
                    ))
                    .into())
                }
                Ok(Ok(Some(p))) => p,
            };
            if want.done() {
                tail += piece.len() as u64;
            }
            match parts.as_mut() {
                Some(parts) => parts.feed(&piece, |at, bytes| want.offer(at, bytes, sink))?,
                None => {
                    want.offer(pos, &piece, sink)?;
                    pos += piece.len() as u64;
                }
            }
        }
    }
}

/// The ranges one fetch call must deliver, in order, and how far it got: bytes of a response
/// are offered with their blob offsets, and only those wanted next reach the sink.
struct Wanted<'a> {
    ranges: &'a [Range<u64>],
    /// Range being delivered, and its next byte.
    idx: usize,
    next: u64,
    delivered: u64,
}

impl<'a> Wanted<'a> {
    fn new(ranges: &'a [Range<u64>]) -> Self {
        Wanted {
            ranges,
            idx: 0,
            next: ranges.first().map_or(0, |r| r.start),
            delivered: 0,
        }
    }

    fn done(&self) -> bool {
        self.idx >= self.ranges.len()
    }

    /// What is still missing.
    fn left(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let rest = self.ranges.get(self.idx..).unwrap_or_default();
        rest.iter()
            .enumerate()
            .map(|(i, r)| if i == 0 { self.next..r.end } else { r.clone() })
    }

    /// Bytes at blob offset `pos`: writes the wanted ones to `sink` and skips the others. Bytes
    /// that start past the next wanted byte mean the response left some out: an error.
    fn offer(
        &mut self,
        mut pos: u64,
        mut bytes: &[u8],
        sink: &mut (dyn Write + Send),
    ) -> Result<(), RemoteError> {
        while let Some(r) = self.ranges.get(self.idx).filter(|_| !bytes.is_empty()) {
            if pos > self.next {
                return Err(RemoteError::Protocol(format!(
                    "range response skipped from byte {} to {pos}",
                    self.next
                )));
            }
            let skip = usize::try_from(self.next - pos)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            bytes = &bytes[skip..];
            pos += skip as u64;
            let n = usize::try_from(r.end - self.next)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            if n == 0 {
                break;
            }
            sink.write_all(&bytes[..n]).map_err(RemoteError::Sink)?;
            bytes = &bytes[n..];
            pos += n as u64;
            self.next += n as u64;
            self.delivered += n as u64;
            if self.next == r.end {
                self.idx += 1;
                self.next = self.ranges.get(self.idx).map_or(self.next, |r| r.start);
            }
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

    /// [`Blob::fetch_ranges_into`].
    pub fn fetch_ranges_into(
        &self,
        ranges: &[Range<u64>],
        sink: &mut (dyn Write + Send),
    ) -> Result<u64, RemoteError> {
        self.handle
            .block_on(self.blob.fetch_ranges_into(ranges, sink))
    }

    /// [`Blob::multi_range`].
    pub fn multi_range(&self) -> bool {
        self.blob.multi_range()
    }

    pub fn fetch_verified_into(&self, sink: &mut (dyn Write + Send)) -> Result<u64, RemoteError> {
        self.handle.block_on(self.blob.fetch_verified_into(sink))
    }
}
