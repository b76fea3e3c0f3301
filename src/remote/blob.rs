//! The lazy blob reader: chunk-aligned, cached, streamed, deduplicated reads of one blob.

use std::collections::HashMap;
use std::io::Write;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::{Method, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use super::body::{self, ByteBudget};
use super::config::BlobConfig;
use super::multipart::{self, parse_content_range, Event};
use super::reference::Reference;
use super::registry::{BlobLocation, RegistryClient};
use super::RemoteError;
use crate::cache::{BlobCache, CacheError, CacheWriter};

/// How many times a read waits for other readers' fetches before fetching on its own.
const MAX_WAIT_ROUNDS: usize = 4;

/// A registry blob read lazily through a [`BlobCache`]. Cheap to clone; clones share the
/// in-flight map, so concurrent reads of one chunk through any clone share one fetch.
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
    cache: Arc<dyn BlobCache>,
    key_prefix: String,
    location: Mutex<Arc<BlobLocation>>,
    single_range: AtomicBool,
    /// Chunk offset → (flight id, receiver that wakes when the fetching reader is done with it).
    inflight: Mutex<HashMap<u64, (u64, watch::Receiver<()>)>>,
    flight_ids: AtomicU64,
}

/// One `chunk_size`-aligned piece of the blob: `[off, off + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunk {
    off: u64,
    len: u64,
}

/// Marks a chunk as being fetched by this reader; dropping it wakes the waiters.
struct Flight {
    inner: Arc<Inner>,
    off: u64,
    id: u64,
    _tx: watch::Sender<()>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        let mut map = self.inner.lock_inflight();
        if map.get(&self.off).is_some_and(|(id, _)| *id == self.id) {
            map.remove(&self.off);
        }
        // `_tx` drops after this: waiters' `changed()` returns and they re-check the cache.
    }
}

enum WriterState {
    NotStarted,
    Open(Box<dyn CacheWriter>),
    /// The cache refused or failed: the chunk still fills the caller's buffer.
    Disabled,
}

/// A chunk this reader fetches in the current request.
struct Pending {
    chunk: Chunk,
    written: u64,
    writer: WriterState,
    done: bool,
    flight: Option<Flight>,
}

/// The caller's buffer and the blob offset of its first byte.
struct Target<'a> {
    offset: u64,
    buf: &'a mut [u8],
}

impl Blob {
    /// Probes the blob (size, final URL after redirects; mirrors first) and returns a reader.
    /// Each endpoint is given its request timeout, retries included, before the next is tried.
    pub async fn open(
        client: &RegistryClient,
        reference: &Reference,
        digest: &str,
        cache: Arc<dyn BlobCache>,
    ) -> Result<Blob, RemoteError> {
        let location = client.locate_blob(reference, digest).await?;
        let config = client.config().blob.clone();
        let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
        tracing::debug!(digest = %digest, size = location.size, redirected = location.redirected, "blob opened");
        Ok(Blob {
            inner: Arc::new(Inner {
                client: client.clone(),
                reference: reference.clone(),
                digest: digest.to_owned(),
                size: location.size,
                single_range: AtomicBool::new(config.force_single_range_mode),
                config: BlobConfig {
                    chunk_size: config.chunk_size.max(1),
                    ..config
                },
                cache,
                key_prefix: format!("{hex}-"),
                location: Mutex::new(Arc::new(location)),
                inflight: Mutex::new(HashMap::new()),
                flight_ids: AtomicU64::new(1),
            }),
        })
    }

    pub fn size(&self) -> u64 {
        self.inner.size
    }

    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    pub fn chunk_size(&self) -> u64 {
        self.inner.config.chunk_size
    }

    /// Prefix of every cache key this blob uses.
    pub fn cache_key_prefix(&self) -> &str {
        &self.inner.key_prefix
    }

    /// Deletes this blob's chunks from the cache (layer unmounted, or a chunk failed its digest
    /// check one layer up); returns the bytes freed.
    pub fn free_cache(&self) -> Result<u64, CacheError> {
        self.inner.cache.remove_prefix(&self.inner.key_prefix)
    }

    /// Whether every chunk overlapping `range` is in the cache.
    pub fn is_cached(&self, range: Range<u64>) -> bool {
        self.inner
            .chunks(range.start..range.end.min(self.inner.size))
            .all(|c| self.inner.cache.contains(&self.inner.key(c)))
    }

    /// Reads up to `buf.len()` bytes at `offset` (fewer only at the end of the blob; 0 past it).
    pub async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, RemoteError> {
        self.inner.read_at(buf, offset).await
    }

    /// Fetches every chunk overlapping `ranges` into the cache (one request), skipping chunks
    /// already cached or being fetched by someone else.
    pub async fn prefetch(&self, ranges: &[Range<u64>]) -> Result<(), RemoteError> {
        self.inner.prefetch(ranges).await
    }

    /// Streams the bytes of `range` into `sink` without caching them (the fs layer decompresses
    /// them into its own cache: no second, compressed copy). A broken connection resumes where it
    /// stopped, so `sink` sees every byte exactly once, in order. Returns the bytes written.
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
    fn lock_inflight(&self) -> MutexGuard<'_, HashMap<u64, (u64, watch::Receiver<()>)>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn location(&self) -> Arc<BlobLocation> {
        self.location
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn key(&self, c: Chunk) -> String {
        format!("{}{}-{}", self.key_prefix, c.off, c.len)
    }

    /// The chunks overlapping `range` (clamped to the blob).
    fn chunks(&self, range: Range<u64>) -> impl Iterator<Item = Chunk> + '_ {
        let cs = self.config.chunk_size;
        let end = range.end.min(self.size);
        let first = range.start / cs;
        let last = if end == 0 { 0 } else { end.div_ceil(cs) };
        (first..last)
            .filter(move |_| range.start < end)
            .map(move |i| {
                let off = i * cs;
                Chunk {
                    off,
                    len: cs.min(self.size - off),
                }
            })
    }

    async fn read_at(self: &Arc<Self>, buf: &mut [u8], offset: u64) -> Result<usize, RemoteError> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let end = self.size.min(offset.saturating_add(buf.len() as u64));
        let len = (end - offset) as usize;
        let mut target = Target {
            offset,
            buf: &mut buf[..len],
        };
        let mut todo: Vec<Chunk> = self.chunks(offset..end).collect();
        for round in 0.. {
            todo.retain(|c| !self.copy_from_cache(*c, &mut target));
            if todo.is_empty() {
                return Ok(len);
            }
            let (mine, waits) = if round >= MAX_WAIT_ROUNDS {
                // Others keep failing to get these into the cache (a cache error, or eviction):
                // fetch them ourselves so the read makes progress.
                (todo.iter().map(|c| (*c, None)).collect(), Vec::new())
            } else {
                self.claim(&todo, true)
            };
            if !mine.is_empty() {
                let fetched: Vec<Chunk> = mine.iter().map(|(c, _)| *c).collect();
                self.fetch(mine, Some(&mut target)).await?;
                todo.retain(|c| !fetched.contains(c));
            }
            for mut rx in waits {
                // Err = the fetcher is gone (done or failed): either way, look again.
                let _ = rx.changed().await;
            }
        }
        Ok(len)
    }

    /// Copies the part of a cached chunk inside `target` into it; false on a miss.
    fn copy_from_cache(&self, c: Chunk, target: &mut Target<'_>) -> bool {
        let key = self.key(c);
        let reader = match self.cache.get(&key) {
            Ok(r) => r,
            Err(CacheError::NotFound(_)) => return false,
            Err(e) => {
                tracing::warn!(key = %key, error = %crate::untrusted::chain(&e), "cache read failed, refetching");
                return false;
            }
        };
        if reader.size() != c.len {
            tracing::warn!(key = %key, size = reader.size(), want = c.len, "cache entry has wrong size, dropping it");
            let _ = self.cache.remove(&key);
            return false;
        }
        let start = target.offset.max(c.off);
        let end = (target.offset + target.buf.len() as u64).min(c.off + c.len);
        let dst = &mut target.buf[(start - target.offset) as usize..(end - target.offset) as usize];
        let mut done = 0;
        while done < dst.len() {
            match reader.read_at(&mut dst[done..], start - c.off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(key = %key, error = %crate::untrusted::chain(&e), "cache read failed, refetching");
                    return false;
                }
            }
        }
        done == dst.len()
    }

    /// Splits `chunks` into those this caller now fetches (registered in-flight) and receivers
    /// for those someone else is fetching. With `wait = false` the latter are just skipped.
    #[allow(clippy::type_complexity)]
    fn claim(
        self: &Arc<Self>,
        chunks: &[Chunk],
        wait: bool,
    ) -> (Vec<(Chunk, Option<Flight>)>, Vec<watch::Receiver<()>>) {
        let mut mine = Vec::new();
        let mut waits = Vec::new();
        let mut map = self.lock_inflight();
        for c in chunks {
            if let Some((_, rx)) = map.get(&c.off) {
                if wait {
                    waits.push(rx.clone());
                }
                continue;
            }
            let (tx, rx) = watch::channel(());
            let id = self.flight_ids.fetch_add(1, Ordering::Relaxed);
            map.insert(c.off, (id, rx));
            mine.push((
                *c,
                Some(Flight {
                    inner: self.clone(),
                    off: c.off,
                    id,
                    _tx: tx,
                }),
            ));
        }
        (mine, waits)
    }

    async fn prefetch(self: &Arc<Self>, ranges: &[Range<u64>]) -> Result<(), RemoteError> {
        let mut chunks: Vec<Chunk> = ranges
            .iter()
            .flat_map(|r| self.chunks(r.clone()).collect::<Vec<_>>())
            .filter(|c| !self.cache.contains(&self.key(*c)))
            .collect();
        chunks.sort_by_key(|c| c.off);
        chunks.dedup();
        let (mine, _) = self.claim(&chunks, false);
        if mine.is_empty() {
            return Ok(());
        }
        self.fetch(mine, None).await
    }

    /// Fetches `chunks` (sorted, distinct) into the cache and the overlapping part of `target`,
    /// retrying transient failures. Chunks completed by a failed attempt stay committed. Ends
    /// within [`BlobConfig::fetch_deadline`]; on expiry the unfinished chunks' writers are
    /// aborted and their waiters woken (dropping the fetch drops them).
    async fn fetch(
        self: &Arc<Self>,
        chunks: Vec<(Chunk, Option<Flight>)>,
        target: Option<&mut Target<'_>>,
    ) -> Result<(), RemoteError> {
        let deadline = self.config.fetch_deadline();
        tokio::time::timeout(deadline, self.fetch_retrying(chunks, target))
            .await
            .unwrap_or_else(|_| Err(self.timed_out(deadline)))
    }

    fn timed_out(&self, after: Duration) -> RemoteError {
        tracing::warn!(digest = %self.digest, after_ms = after.as_millis() as u64, "blob fetch ran past its deadline");
        RemoteError::TimedOut {
            what: format!("fetch from blob {}", self.digest),
            after,
        }
    }

    async fn fetch_retrying(
        self: &Arc<Self>,
        chunks: Vec<(Chunk, Option<Flight>)>,
        mut target: Option<&mut Target<'_>>,
    ) -> Result<(), RemoteError> {
        let mut pending: Vec<Pending> = chunks
            .into_iter()
            .map(|(chunk, flight)| Pending {
                chunk,
                written: 0,
                writer: WriterState::NotStarted,
                done: false,
                flight,
            })
            .collect();
        pending.sort_by_key(|p| p.chunk.off);
        let mut attempt = 0;
        let mut relocated = false;
        loop {
            for p in pending.iter_mut().filter(|p| !p.done) {
                // Dropping a half-written writer aborts it.
                p.written = 0;
                p.writer = WriterState::NotStarted;
            }
            let result = self.fetch_once(&mut pending, target.as_deref_mut()).await;
            let err = match result {
                Ok(()) => return Ok(()),
                Err(FetchError::SingleRange) => continue,
                Err(FetchError::Relocate) if !relocated => {
                    relocated = true;
                    self.relocate().await?;
                    continue;
                }
                Err(FetchError::Relocate) => RemoteError::Unauthorized {
                    host: self.reference.host.clone(),
                    reason: "blob storage refused the re-resolved URL".into(),
                },
                Err(FetchError::Remote(e)) => e,
            };
            if !retry_in_stream(&err) || attempt >= self.config.max_retries {
                if !relocated && err.is_retryable() && self.has_other_endpoints() {
                    // The host serving this blob (a mirror) keeps failing: probe the endpoints
                    // again in order and go on with whichever answers.
                    relocated = true;
                    if self.relocate().await.is_ok() {
                        tracing::info!(digest = %self.digest, error = %crate::untrusted::chain(&err), "blob source failing, re-resolved endpoint");
                        attempt = 0;
                        continue;
                    }
                }
                tracing::warn!(digest = %self.digest, attempt, error = %crate::untrusted::chain(&err), "blob fetch failed");
                return Err(err);
            }
            let wait = self.config.backoff(attempt);
            tracing::debug!(digest = %self.digest, attempt, wait_ms = wait.as_millis() as u64, error = %crate::untrusted::chain(&err), "retrying blob fetch");
            attempt += 1;
            tokio::time::sleep(wait).await;
        }
    }

    /// The `Range` header for the missing chunks: adjacent chunks merged; one span in
    /// single-range mode.
    fn range_header(&self, pending: &[Pending]) -> (String, bool) {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for p in pending.iter().filter(|p| !p.done) {
            let (s, e) = (p.chunk.off, p.chunk.off + p.chunk.len);
            match ranges.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => ranges.push((s, e)),
            }
        }
        let multi = ranges.len() > 1 && !self.single_range.load(Ordering::Relaxed);
        let header = if multi {
            let parts: Vec<String> = ranges
                .iter()
                .map(|(s, e)| format!("{s}-{}", e - 1))
                .collect();
            format!("bytes={}", parts.join(","))
        } else {
            let (s, e) = (
                ranges.first().map_or(0, |r| r.0),
                ranges.last().map_or(0, |r| r.1),
            );
            format!("bytes={s}-{}", e.saturating_sub(1))
        };
        (header, multi)
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

    async fn fetch_once(
        &self,
        pending: &mut [Pending],
        mut target: Option<&mut Target<'_>>,
    ) -> Result<(), FetchError> {
        let (header, multi) = self.range_header(pending);
        let timeout = Duration::from_secs(self.config.fetching_timeout_sec.max(1));
        let (mut resp, loc) = self.send_range(&header, timeout).await?;
        let status = resp.status();
        let url = loc.url.as_str();
        let stall = self.config.stall_timeout();
        let mut parser = None;
        let mut pos = 0u64;
        // The bytes of the asked span (first to last missing chunk): a response longer than
        // that plus multipart framing is refused, whatever it declares.
        let first = pending.iter().find(|p| !p.done).map_or(0, |p| p.chunk.off);
        let last = pending
            .iter()
            .rev()
            .find(|p| !p.done)
            .map_or(0, |p| p.chunk.off + p.chunk.len);
        let ranges = pending.iter().filter(|p| !p.done).count();
        let mut parts = 0usize;
        let mut budget = match status {
            StatusCode::PARTIAL_CONTENT => {
                let ct = resp
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if let Some(b) = multipart::boundary(ct) {
                    let framing = (multipart::MAX_HEADER + 2 * b.len() + 16) as u64;
                    parser = Some(multipart::Parser::new(&b));
                    ByteBudget::new(
                        (last - first).saturating_add(framing.saturating_mul(ranges as u64 + 1)),
                    )
                } else {
                    pos = self.single_range_start(&resp)?;
                    ByteBudget::new(last.saturating_sub(pos))
                }
            }
            StatusCode::OK => {
                // The whole blob from offset 0: skip to what we need.
                if let Some(l) = resp.content_length() {
                    self.check_total(Some(l))?;
                }
                ByteBudget::new(last)
            }
            StatusCode::BAD_REQUEST
            | StatusCode::RANGE_NOT_SATISFIABLE
            | StatusCode::NOT_IMPLEMENTED
                if multi =>
            {
                tracing::info!(digest = %self.digest, status = status.as_u16(), "registry refused a multi-range request; switching to single-range mode");
                self.single_range.store(true, Ordering::Relaxed);
                return Err(FetchError::SingleRange);
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if loc.redirected => {
                return Err(FetchError::Relocate)
            }
            _ => return Err(body::status_error(resp, url, stall).await.into()),
        };
        loop {
            let piece = match tokio::time::timeout(stall, resp.chunk()).await {
                Err(_) => return Err(RemoteError::Stalled(stall).into()),
                Ok(Err(e)) => return Err(RemoteError::body(url, e).into()),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(p))) => p,
            };
            match parser.as_mut() {
                Some(parser) => parser.feed(&piece, &mut |ev| match ev {
                    Event::Part { total, .. } => {
                        // Servers may merge ranges, never split them.
                        parts += 1;
                        if parts > ranges {
                            return Err(RemoteError::Protocol(format!(
                                "multipart response has more than the {ranges} part(s) asked"
                            )));
                        }
                        self.check_total(total)
                    }
                    Event::Data { offset, data } => {
                        self.accept(pending, target.as_deref_mut(), offset, data);
                        Ok(())
                    }
                })?,
                None => {
                    self.accept(pending, target.as_deref_mut(), pos, &piece);
                    pos += piece.len() as u64;
                }
            }
            if pending.iter().all(|p| p.done) {
                return Ok(());
            }
            // After routing the piece: the one completing the span may run past its end.
            budget.spend(piece.len(), || {
                format!("range response for {} ({header})", self.digest)
            })?;
        }
        if let Some(p) = &parser {
            p.finish()?;
        }
        let missing = pending.iter().filter(|p| !p.done).count();
        Err(
            RemoteError::Truncated(format!("{missing} chunk(s) of {} incomplete", self.digest))
                .into(),
        )
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

    /// Routes `data` (blob bytes at `pos`) into the caller's buffer and the chunks' writers.
    /// A chunk takes bytes only contiguously from where it stopped; a gap leaves it incomplete
    /// (it is then refetched), so a committed chunk always holds exactly its bytes.
    fn accept(
        &self,
        pending: &mut [Pending],
        target: Option<&mut Target<'_>>,
        pos: u64,
        data: &[u8],
    ) {
        let end = pos + data.len() as u64;
        if let Some(t) = target {
            let (s, e) = (pos.max(t.offset), end.min(t.offset + t.buf.len() as u64));
            if s < e {
                t.buf[(s - t.offset) as usize..(e - t.offset) as usize]
                    .copy_from_slice(&data[(s - pos) as usize..(e - pos) as usize]);
            }
        }
        let first = pending.partition_point(|p| p.chunk.off + p.chunk.len <= pos);
        for p in pending[first..].iter_mut() {
            if p.chunk.off >= end {
                break;
            }
            if p.done {
                continue;
            }
            let cur = p.chunk.off + p.written;
            if cur < pos || cur >= end {
                continue;
            }
            let stop = end.min(p.chunk.off + p.chunk.len);
            let bytes = &data[(cur - pos) as usize..(stop - pos) as usize];
            self.write_chunk(p, bytes);
        }
    }

    fn write_chunk(&self, p: &mut Pending, bytes: &[u8]) {
        if matches!(p.writer, WriterState::NotStarted) {
            let key = self.key(p.chunk);
            p.writer = match self.cache.add(&key) {
                Ok(w) => WriterState::Open(w),
                Err(e) => {
                    tracing::warn!(key = %key, error = %crate::untrusted::chain(&e), "cannot cache chunk");
                    WriterState::Disabled
                }
            };
        }
        if let WriterState::Open(w) = &mut p.writer {
            if let Err(e) = w.write_all(bytes) {
                tracing::warn!(digest = %self.digest, offset = p.chunk.off, error = %crate::untrusted::chain(&e), "cache write failed, chunk not cached");
                p.writer = WriterState::Disabled;
            }
        }
        p.written += bytes.len() as u64;
        if p.written == p.chunk.len {
            p.done = true;
            if let WriterState::Open(w) = std::mem::replace(&mut p.writer, WriterState::Disabled) {
                if let Err(e) = w.commit() {
                    tracing::warn!(digest = %self.digest, offset = p.chunk.off, error = %crate::untrusted::chain(&e), "cache commit failed");
                }
            }
            // Wake readers waiting for this chunk now, not when the whole request ends.
            p.flight.take();
        }
    }

    fn has_other_endpoints(&self) -> bool {
        self.client.endpoints(&self.reference).len() > 1
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
        let mut relocated = false;
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
                Err(_) => RemoteError::Unauthorized {
                    host: self.reference.host.clone(),
                    reason: "blob storage refused the re-resolved URL".into(),
                },
            };
            if !retry_in_stream(&err) || attempt >= self.config.max_retries {
                return Err(err);
            }
            let wait = self.config.backoff(attempt);
            tracing::debug!(digest = %self.digest, attempt, delivered, error = %crate::untrusted::chain(&err), "resuming range fetch");
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
            StatusCode::OK => 0,
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
    /// The registry refused multi-range: retry at once as one range.
    SingleRange,
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
    pub fn blob(&self) -> &Blob {
        &self.blob
    }

    pub fn size(&self) -> u64 {
        self.blob.size()
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, RemoteError> {
        self.handle.block_on(self.blob.read_at(buf, offset))
    }

    /// Re-probes the blob (the snapshotter's reachability check).
    pub fn check(&self) -> Result<(), RemoteError> {
        self.handle.block_on(self.blob.check())
    }

    pub fn prefetch(&self, ranges: &[Range<u64>]) -> Result<(), RemoteError> {
        self.handle.block_on(self.blob.prefetch(ranges))
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

impl crate::estargz::ReadAt for SyncBlob {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        SyncBlob::read_at(self, buf, offset).map_err(std::io::Error::from)
    }
}
