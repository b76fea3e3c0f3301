//! The read path of one layer: file range → chunks → `fscache` or blob range → verify → cache.
//!
//! Invariants:
//! - a chunk is marked present (in its [`ChunkMap`]) only after all its bytes were written to
//!   the cache file and their sha256 matched the TOC, so a read never returns unverified bytes;
//! - a chunk is fetched by at most one claim at a time; other readers wait for it with a
//!   deadline and share its outcome (see `chunks`);
//! - compressed bytes are streamed straight into decoders, never buffered whole or cached; a
//!   chunk's decoder stops as soon as the chunk's bytes are out (what follows in its compressed
//!   range is tar padding or garbage, never decompressed).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use sha2::{Digest as _, Sha256};

use crate::estargz::chunk::{check_digest, zstd_writer};
use crate::estargz::Format;
use crate::metrics::{LayerMetrics, LayerStats, LayerStatsSource, Metrics, Purpose};
use crate::untrusted::chain;

use super::bits::Bits;
use super::budget::{disk_bytes, CacheBudget};
use super::chunks::{ChunkMap, Claim, Flight, Found, Step};
use super::deps::Image;
use super::inode::{Chunk, InodeTable, Node, NodeKind};
use super::kinds::{FileKinds, MAX_KINDS};
use super::link::LinkEstimate;
use super::native::{self, Native};
use super::source::LayerSource;
use super::FsError;
use crate::cache::{CacheKind, ChunkKey, Committed, LayerCache, Writer};

/// Shared between all layers of a daemon: lets background work yield to on-demand reads.
///
/// Background fetch holds back while any on-demand fetch waits *and* for a quiet period after
/// the last one ended: a container's start-up reads come in bursts with short gaps, and a
/// background span that grabs the link in such a gap delays the next miss by its whole transfer.
#[derive(Debug, Default)]
pub struct Priority {
    waiting: AtomicUsize,
    quiet: std::time::Duration,
    /// When the last urgent guard dropped (None: never, or no quiet period).
    last_urgent: Mutex<Option<std::time::Instant>>,
}

impl Priority {
    /// Background work waits `quiet` after the last on-demand fetch (zero: only while one waits).
    pub fn with_quiet_period(quiet: std::time::Duration) -> Self {
        Priority {
            quiet,
            ..Priority::default()
        }
    }

    /// Marks an on-demand fetch (or a mount) as waiting until the guard drops.
    pub fn urgent(self: &Arc<Self>) -> UrgentGuard {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        UrgentGuard(self.clone())
    }

    /// True while some on-demand fetch waits, or ended less than the quiet period ago:
    /// background fetchers hold back.
    pub fn busy(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
            || self
                .last_urgent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|t| t.elapsed() < self.quiet)
    }
}

/// See [`Priority::urgent`].
#[derive(Debug)]
pub struct UrgentGuard(Arc<Priority>);

impl Drop for UrgentGuard {
    fn drop(&mut self) {
        let p = &self.0;
        if !p.quiet.is_zero() {
            *p.last_urgent.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(std::time::Instant::now());
        }
        p.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Background fetch gives up on a layer after this many failed spans (reads still retry).
const MAX_BG_FAILURES: u32 = 16;

/// What one background step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BgStep {
    More,
    Failed,
    Done,
}

/// Why a span is fetched (for the metrics).
#[derive(Debug, Clone, Copy)]
enum Why {
    /// A read waits for it; `ahead` compressed bytes of it are read-ahead past the read.
    OnDemand {
        ahead: u64,
    },
    Prefetch,
    Background,
    /// For the library follower (see [`super::deps`]): chunks of the libraries an ELF file
    /// names, or of the file itself where its parse reads; counted as read-ahead.
    Needed,
}

/// Tuning of the read path.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// On a miss, also fetch the chunks that follow in blob order up to this many compressed
    /// bytes; None (the default): one round trip's worth of the link as measured by `link`
    /// (see [`super::link`]). The read waits only for its own chunks; the rest lands behind it.
    pub readahead_bytes: Option<u64>,
    /// The registry link as the daemon's transfers measured it, shared by its layers.
    pub link: Arc<LinkEstimate>,
    /// Serve chunks whose TOC entry carries no digest (only with verification disabled).
    pub allow_unverified: bool,
    /// How often one read fetches a chunk that arrives but fails verification before it
    /// fails with EIO (the daemon sets it from `[blob] max_retries`).
    pub fetch_attempts: u32,
    /// Longest a read waits for another reader's fetch of the same chunk before failing with
    /// EIO. The fetch itself is bounded by the registry client's timeouts; this bounds the wait
    /// even if a fetch never reports (the daemon sets it from `fetching_timeout_sec`).
    pub wait_timeout: std::time::Duration,
    /// The cache's byte budget, shared by every layer of the daemon (None: unbounded).
    pub budget: Option<Arc<CacheBudget>>,
    /// Where file data is kept (`filesystem_cache_type`).
    pub cache_kind: CacheKind,
    /// The most cache files a layer keeps open (`[directory_cache] max_cache_fds`).
    pub max_open_files: usize,
    /// The daemon's metrics (None: `no_prometheus`, or a test that does not look).
    pub metrics: Option<Arc<Metrics>>,
    /// Give the layer a native tree once it is fully cached on disk (`[snapshotter]
    /// native_layers`; see [`super::native`]); the layer manager builds it.
    pub native: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            readahead_bytes: None,
            link: Arc::new(LinkEstimate::new()),
            allow_unverified: false,
            fetch_attempts: 3,
            wait_timeout: std::time::Duration::from_secs(300),
            budget: None,
            cache_kind: CacheKind::Disk,
            max_open_files: 256,
            metrics: None,
            native: true,
        }
    }
}

/// Reads of one layer.
pub struct LayerReader {
    pub(crate) table: InodeTable,
    source: Arc<dyn LayerSource>,
    cache: Box<dyn LayerCache>,
    opts: ReadOptions,
    priority: Arc<Priority>,
    chunks: Arc<ChunkMap>,
    /// Fetches running behind the reads that started them (read-ahead), at most [`MAX_BEHIND`].
    behind: AtomicUsize,
    /// Per chunk (bit per chunk): fetched or being fetched as read-ahead and not read since.
    ahead: Bits,
    /// The read-ahead window in round trips' worth of the link, 1..=[`MAX_WINDOW`]: doubled each
    /// time a read finds its chunk already brought by read-ahead, halved on each miss that was
    /// not (see [`Self::ensure`]).
    window: AtomicU32,
    /// Compressed bytes fetched as read-ahead, and reads that found a chunk it brought: the
    /// layer's evidence that read-ahead pays (see [`Self::readahead_budget`]).
    ahead_bytes: AtomicU64,
    ahead_hits: AtomicU64,
    /// Misses without read-ahead since the last one that had some.
    held_back: AtomicU32,
    /// Which kinds of file read-ahead brings in vain, to leave them out (see [`Self::ahead_rule`]).
    kinds: FileKinds,
    fetched: AtomicU64,
    /// Reads served through this process (passthrough reads never get here).
    userspace_reads: AtomicU64,
    /// Next chunk (blob order) the background fetcher looks at, and how often it wrapped.
    bg_cursor: Mutex<(usize, u32)>,
    bg_done: AtomicBool,
    bg_failures: AtomicU32,
    last_error: Mutex<Option<String>>,
    digest: String,
    /// Per chunk (blob order): reads in progress on it plus passthrough opens of its file, and
    /// the [`EVICTING`] bit while it is being evicted. See [`Self::pin`].
    pins: Vec<AtomicU32>,
    /// Per node: when it was last read or opened ([`CacheBudget::now`]), for eviction order.
    last_read: Vec<AtomicU32>,
    /// On-disk bytes of this layer's verified chunks, as the budget counts them.
    cached_bytes: AtomicU64,
    evicted_bytes: AtomicU64,
    /// This layer's handles into the daemon's metrics.
    metrics: Option<LayerMetrics>,
    /// The layer's plain directory tree for new containers, once fully cached.
    native: Native,
    /// The mounted layers of this layer's image, where the libraries its programs need are
    /// looked for (see [`super::deps`]); unset outside the daemon's layer manager.
    image: OnceLock<Arc<Image>>,
    /// Per node (bit per node index): its ELF needs were followed, or it was found to be no
    /// ELF file.
    followed: Bits,
}

/// Read-ahead fetches of one layer that may run behind their reads at a time; a miss past that
/// fetches only what it needs, so the threads and connections one layer takes stay bounded.
const MAX_BEHIND: usize = 4;

/// The most round trips' worth of the link one miss fetches in a layer whose reads keep landing
/// in what read-ahead brought (the stdlib of an import-heavy program): a reader that needs the
/// last chunk of such a span waits at most this many round trips of transfer for it. At 8, a
/// few hits in a row in a layer of programs and libraries (a script running coreutils, perl
/// and apt tools) let single misses bring 2-3.6 MB, mostly unread, ahead of the next misses on
/// the same link: at 4 that workload took 4.60 s instead of 5.39 s on 100 Mbit / 20 ms and
/// 9.97 s instead of 10.39 s on 20 Mbit, with the other workloads and links unchanged.
const MAX_WINDOW: u32 = 4;

/// Round trips' worth of read-ahead a layer gets before its hits must pay for more: about as
/// many misses' worth, since hits often come late (Python leaves a package and returns to it a
/// few imports later) and a layer judged after two misses had not seen them yet.
const PROBATION: u64 = 8;
/// Round trips' worth of bytes one read that finds what read-ahead brought pays for: two (the
/// round trip it saved, and as much again because reads come late), in the layer's ledger and
/// in each kind's. For kinds it was measured (tools workload, 3 runs each): at 8, 100 Mbit
/// 4.82 s but 20 Mbit 11.62 s; at 4, 5.14 s and 10.74 s; at 2, 5.31 s and 10.18 s (before
/// kinds: 4.80 s and 10.49 s). A larger worth keeps kinds read now and then (binaries,
/// libraries) at the cost of more bytes; two keeps every cell clear of Go's daemon, and the
/// import-heavy start on 100 Mbit was the same at all three (2.96-3.09 s).
pub(crate) const HIT_WORTH: u64 = 2;

/// Whether `spent` bytes of read-ahead, past `probation` round trips' worth (`one` bytes each),
/// have not paid for themselves: the `hits` that found them are worth less (each
/// [`HIT_WORTH`] round trips' worth).
pub(crate) fn unpaid(spent: u64, hits: u64, one: u64, probation: u64) -> bool {
    spent > probation.saturating_mul(one)
        && hits.saturating_mul(one).saturating_mul(HIT_WORTH) < spent
}

/// A layer whose read-ahead did not pay gets another try after this many misses.
const RETRY_AFTER: u32 = 16;

/// Most ranges one read-ahead request names (a multi-range request: see [`LayerReader::ahead_rule`]).
const MAX_PARTS: usize = 32;
/// How far past a miss, in read-ahead budgets of the blob, a read-ahead passing over chunks may
/// reach.
const MAX_REACH: u64 = 8;
/// Compressed size below which a file of a kind left out of read-ahead is brought all the same:
/// leaving it out would save fewer bytes than naming one more range costs.
const MIN_LEFT_OUT: u64 = 512;

/// How an ELF file starts.
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// Set in a chunk's pin word while it is evicted: new pins wait for it to clear.
const EVICTING: u32 = 1 << 31;

/// Chunks a read is in progress on: they are not evicted until this drops.
pub(crate) struct Pins<'a>(Vec<&'a AtomicU32>);

/// Pins `words`, each waiting out an eviction running on it (see `LayerReader::pin`).
fn pin_words<'a>(words: impl Iterator<Item = &'a AtomicU32>) -> Pins<'a> {
    let mut pins = Pins(Vec::with_capacity(words.size_hint().0));
    for word in words {
        while word.fetch_add(1, Ordering::SeqCst) & EVICTING != 0 {
            word.fetch_sub(1, Ordering::SeqCst);
            std::thread::yield_now();
        }
        pins.0.push(word);
    }
    pins
}

impl Drop for Pins<'_> {
    fn drop(&mut self) {
        for p in &self.0 {
            p.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl std::fmt::Debug for LayerReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerReader")
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl LayerReader {
    pub fn new(
        digest: String,
        table: InodeTable,
        source: Arc<dyn LayerSource>,
        cache: Box<dyn LayerCache>,
        opts: ReadOptions,
        priority: Arc<Priority>,
    ) -> Self {
        // The footer and TOC (everything after the last payload) were fetched to mount.
        let payload_end = table
            .blob_order
            .last()
            .and_then(|&id| table.chunk(id))
            .map_or(0, |c| c.info.compressed_end);
        let fetched = source.size().saturating_sub(payload_end);
        let (nodes, chunks) = (table.nodes().len(), table.blob_order.len());
        let metrics = opts.metrics.as_ref().map(|m| m.layer(&digest));
        let native = Native::new(opts.native && cache.dir().is_some());
        LayerReader {
            native,
            chunks: Arc::new(ChunkMap::new(chunks)),
            behind: AtomicUsize::new(0),
            ahead: Bits::new(chunks),
            window: AtomicU32::new(1),
            ahead_bytes: AtomicU64::new(0),
            ahead_hits: AtomicU64::new(0),
            held_back: AtomicU32::new(0),
            kinds: FileKinds::new(&table),
            table,
            source,
            cache,
            opts,
            priority,
            fetched: AtomicU64::new(fetched),
            userspace_reads: AtomicU64::new(0),
            bg_cursor: Mutex::new((0, 0)),
            bg_done: AtomicBool::new(false),
            bg_failures: AtomicU32::new(0),
            last_error: Mutex::new(None),
            digest,
            pins: (0..chunks).map(|_| AtomicU32::new(0)).collect(),
            last_read: (0..nodes).map(|_| AtomicU32::new(0)).collect(),
            cached_bytes: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            metrics,
            image: OnceLock::new(),
            followed: Bits::new(nodes),
        }
    }

    /// This layer's metrics handles, if the daemon keeps metrics.
    pub(crate) fn metrics(&self) -> Option<&LayerMetrics> {
        self.metrics.as_ref()
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The layer's inodes and chunks, as built from its TOC.
    pub fn table(&self) -> &InodeTable {
        &self.table
    }

    pub fn blob_size(&self) -> u64 {
        self.source.size()
    }

    /// File reads this process served (FUSE passthrough bypasses it for fully cached files).
    pub fn userspace_reads(&self) -> u64 {
        self.userspace_reads.load(Ordering::Relaxed)
    }

    /// Compressed bytes fetched so far (TOC, footer and every cached chunk).
    pub fn fetched_size(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed).min(self.source.size())
    }

    /// True once every chunk of the layer is in the cache.
    pub fn fully_cached(&self) -> bool {
        self.chunks.all_present()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn source(&self) -> &Arc<dyn LayerSource> {
        &self.source
    }

    pub fn cache(&self) -> &dyn LayerCache {
        self.cache.as_ref()
    }

    fn chunk(&self, seq: usize) -> &Chunk {
        let (ino, i) = self.table.blob_order[seq];
        self.table
            .chunk((ino, i))
            .expect("blob_order names only existing chunks")
    }

    /// Trusts chunks a previous mount left in the cache directory, after re-hashing them.
    ///
    /// A chunk is marked present only when its cache file has the file's exact length, the
    /// chunk's range holds no hole, and the sha256 of its bytes matches the TOC digest (the
    /// rule of [`verify`]). Chunks without a digest are never trusted from disk. So a crash
    /// mid-write or a corrupted file only costs a re-fetch. Call before the layer is served:
    /// it takes no in-flight claims. Returns how many chunks were trusted.
    pub fn revalidate_cache(&self) -> usize {
        let mut buf = vec![0u8; 64 << 10];
        let mut trusted = 0;
        for node in self
            .table
            .nodes()
            .iter()
            .filter(|n| n.kind == NodeKind::Reg)
        {
            for c in self
                .table
                .chunks(node)
                .iter()
                .filter(|c| c.info.digest.is_some())
            {
                let key = ChunkKey {
                    ino: node.ino,
                    size: node.size,
                    range: c.info.file_range(),
                };
                let mut verify = |bytes: &mut dyn io::Read| self.rehash(c, bytes, &mut buf);
                if let Some(proof) = self.cache.reuse(&key, &mut verify) {
                    let _ = self.chunk_done(c.seq, Ok(proof));
                    trusted += 1;
                }
            }
        }
        trusted
    }

    /// True when `bytes` are exactly `c`'s and match its digest. Hashed in pieces of `buf`: a
    /// chunk (up to 4 MiB and more) is never held in memory whole.
    fn rehash(&self, c: &Chunk, bytes: &mut dyn io::Read, buf: &mut [u8]) -> bool {
        let mut hasher = Sha256::new();
        let mut left = c.info.chunk_size;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            if bytes.read_exact(&mut buf[..n]).is_err() {
                return false;
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        let got: [u8; 32] = hasher.finalize().into();
        check_digest(&c.info, &self.digest, "cache", got).is_ok()
    }

    /// True when every chunk of `ino` is cached (its reads can be passed through).
    pub fn file_cached(&self, ino: u64) -> bool {
        self.table.get(ino).is_some_and(|n| {
            self.table
                .chunks(n)
                .iter()
                .all(|c| self.chunks.is_present(c.seq))
        })
    }

    /// Reads up to `size` bytes of file `ino` at `offset`, fetching missing chunks.
    pub fn read(self: &Arc<Self>, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        self.userspace_reads.fetch_add(1, Ordering::Relaxed);
        let buf = self.read_by(ino, offset, size, true)?;
        if offset == 0 {
            self.follow_needs(ino, &buf);
        }
        Ok(buf)
    }

    /// Reads as [`Self::read`] for the daemon itself (the library follower of
    /// [`super::deps`]), not for a program: a missing chunk is fetched alone, and the read
    /// leaves what the layer's reads teach read-ahead, eviction and the metrics untouched.
    pub(crate) fn read_for_daemon(
        self: &Arc<Self>,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError> {
        self.read_by(ino, offset, size, false)
    }

    /// Bytes `[offset, offset+size)` of `ino`, clipped to the file, its missing chunks
    /// fetched: for a `program` with read-ahead (see [`Self::ensure`]), else each alone.
    fn read_by(
        self: &Arc<Self>,
        ino: u64,
        offset: u64,
        size: u32,
        program: bool,
    ) -> Result<Vec<u8>, FsError> {
        let node = self.table.get(ino).ok_or(FsError::NotFound(ino))?;
        if node.kind != NodeKind::Reg {
            return Err(FsError::NotFound(ino));
        }
        if offset >= node.size || size == 0 {
            return Ok(Vec::new());
        }
        let (chunks, end) = self.chunks_holding(node, offset, size).ok_or_else(|| {
            FsError::Chunk(format!(
                "no chunk holds bytes {offset}..+{size} of inode {ino}"
            ))
        })?;
        // Only measured when metrics are kept: nothing is added to the read path otherwise.
        let measure = self.metrics.as_ref().filter(|_| program).map(|m| {
            let hit = chunks.iter().all(|c| self.chunks.is_present(c.seq));
            (m, Instant::now(), hit)
        });
        if program {
            self.touch(ino);
        }
        let _pins = self.pin(chunks);
        let last = chunks.last().map_or(0, |c| c.seq);
        for c in chunks {
            match program {
                true => self.ensure(c.seq, last)?,
                false => self.fetch_alone(c.seq, Why::Needed)?,
            }
        }
        if let Some((m, started, false)) = measure {
            m.waited(started.elapsed());
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        self.cache
            .read_at(ino, node.size, &mut buf, offset)
            .map_err(FsError::Cache)?;
        if let Some((m, started, hit)) = measure {
            m.read(buf.len(), started.elapsed(), hit);
        }
        Ok(buf)
    }

    /// Makes chunk `seq` present without read-ahead, as urgent work: fetches it alone (for
    /// the metrics, as `why`), or waits for the fetch in flight, and fails unless it is then
    /// present.
    fn fetch_alone(&self, seq: usize, why: Why) -> Result<(), FsError> {
        match self.chunks.find(seq, |_, _| Step::Stop) {
            Found::Present => return Ok(()),
            Found::InFlight(flight) => self.wait_for(&flight, seq)?,
            Found::Claimed(claim) => {
                let _urgent = self.priority.urgent();
                self.fetch_claimed(claim, why)?;
            }
        }
        match self.chunks.is_present(seq) {
            true => Ok(()),
            false => Err(FsError::Chunk(format!("chunk {seq} failed verification"))),
        }
    }

    /// Joins the image whose mounted layers this one's programs find their libraries in.
    pub(crate) fn join_image(&self, image: Arc<Image>) {
        let _ = self.image.set(image);
    }

    /// When `head` (the first bytes of file `ino`) is an ELF header, fetches the libraries
    /// the file needs in the background, once per file (see [`super::deps`]).
    fn follow_needs(self: &Arc<Self>, ino: u64, head: &[u8]) {
        let Some(image) = self.image.get() else {
            return;
        };
        // Marked either way: a file that is no ELF file is not looked at again.
        if head.len() >= ELF_MAGIC.len() && self.mark_followed(ino) && head.starts_with(ELF_MAGIC) {
            image.start(self, ino);
        }
    }

    /// Whether the ELF needs of `ino` were followed.
    pub(crate) fn followed(&self, ino: u64) -> bool {
        self.table.index(ino).is_some_and(|i| self.followed.get(i))
    }

    /// Notes that the ELF needs of `ino` are being followed: true the first time only.
    pub(crate) fn mark_followed(&self, ino: u64) -> bool {
        self.table.index(ino).is_some_and(|i| self.followed.set(i))
    }

    /// The chunks of library `ino` its loading touches first: the first (the ELF headers)
    /// and the last (the data segment the loader relocates). Sorted, without repeats.
    fn needed_chunks(&self, ino: u64) -> Vec<usize> {
        let Some(node) = self.table.get(ino).filter(|n| n.kind == NodeKind::Reg) else {
            return Vec::new();
        };
        let chunks = self.table.chunks(node);
        let mut seqs: Vec<usize> = chunks
            .first()
            .into_iter()
            .chain(chunks.last())
            .map(|c| c.seq)
            .collect();
        seqs.dedup();
        seqs
    }

    /// Whether [`Self::fetch_needed`] has anything to fetch for `ino`.
    pub(crate) fn needs_fetching(&self, ino: u64) -> bool {
        self.needed_chunks(ino)
            .into_iter()
            .any(|s| !self.chunks.is_present(s))
    }

    /// Fetches the chunks of libraries `inos` their loading touches first (see
    /// [`Self::needed_chunks`]) that are neither present nor being fetched, as urgent work: in
    /// one request when the source takes several ranges (at most [`MAX_PARTS`] each), else one
    /// per chunk. They are read-ahead to the layer's ledger (see [`Self::readahead_budget`]):
    /// a library the loader then opens is a hit. Failures are the next reader's to see: this
    /// is a guess.
    pub(crate) fn fetch_needed(&self, inos: &[u64]) {
        let mut rest: Vec<usize> = inos.iter().flat_map(|&i| self.needed_chunks(i)).collect();
        rest.sort_unstable();
        rest.dedup();
        let multi = self.source.multi_range();
        while let Some(&first) = rest.first() {
            let last = rest.last().copied().unwrap_or(first);
            let mut end = self.chunk(first).info.compressed_end;
            let mut parts = 1;
            let wanted = &rest;
            let claim = self.chunks.try_claim(first, |next, present| {
                if !multi || next > last {
                    return Step::Stop;
                }
                if present || wanted.binary_search(&next).is_err() {
                    return Step::Skip;
                }
                let c = &self.chunk(next).info;
                if c.compressed_offset != end {
                    if parts == MAX_PARTS {
                        return Step::Stop;
                    }
                    parts += 1;
                }
                end = c.compressed_end;
                Step::Join
            });
            // Present or being fetched, or now fetched: done with, either way.
            let done: Vec<usize> = match claim {
                Some(claim) => {
                    let seqs = claim.seqs().to_vec();
                    // Read-ahead by another rule: its hits count as read-ahead's.
                    self.bring_ahead(seqs.iter());
                    let _urgent = self.priority.urgent();
                    let _ = self.fetch_claimed(claim, Why::Needed);
                    seqs
                }
                None => vec![first],
            };
            rest.retain(|s| !done.contains(s));
        }
    }

    /// True when every byte of `[offset, offset+size)` of `ino` is cached: the read will not
    /// wait for the registry (so the FUSE layer may serve it on its dispatch thread).
    pub fn range_cached(&self, ino: u64, offset: u64, size: u32) -> bool {
        let Some(node) = self.table.get(ino).filter(|n| n.kind == NodeKind::Reg) else {
            return true;
        };
        if offset >= node.size || size == 0 {
            return true;
        }
        self.chunks_holding(node, offset, size)
            .is_some_and(|(cs, _)| cs.iter().all(|c| self.chunks.is_present(c.seq)))
    }

    /// The chunks of file `node` holding bytes `[offset, offset+size)` clipped to the file,
    /// and the clipped end. `offset` must be inside the file and `size` not 0.
    fn chunks_holding(&self, node: &Node, offset: u64, size: u32) -> Option<(&[Chunk], u64)> {
        let end = node.size.min(offset + u64::from(size));
        let first = self.table.chunk_index(node, offset);
        let last = self.table.chunk_index(node, end - 1);
        Some((self.table.chunks(node).get(first..=last)?, end))
    }

    /// Makes chunk `seq` present: fetches it (with read-ahead), or waits, with a deadline, for
    /// the fetch already in flight and shares its outcome: a waiter gets a failure at once, and
    /// the next read starts a new fetch. Either way the wait ends as soon as `seq` itself is
    /// present: read-ahead and the rest of another reader's run land behind it. A chunk this
    /// read fetched that arrived but failed its digest (bytes flipped in transit, a broken
    /// stream) is fetched again with a fresh request, up to `fetch_attempts` in all; registry
    /// errors were already retried by the client.
    ///
    /// The read-ahead follows the layer's reads: a read that finds its chunk brought by
    /// read-ahead widens the window (programs that read many neighbouring files, like Python
    /// importing its stdlib, soon fetch a layer in a few long spans), and a miss narrows it.
    /// `last` is the last chunk the read needs (no read-ahead for the read's own chunks).
    fn ensure(self: &Arc<Self>, seq: usize, last: usize) -> Result<(), FsError> {
        let hit = self.take_ahead(seq);
        if hit {
            self.widen();
        }
        if self.kinds.take_left_out(seq) {
            self.kinds.read(self.kind_of(seq));
        }
        let mut attempts = 0;
        loop {
            if self.chunks.is_present(seq) {
                return Ok(());
            }
            let slot = BehindSlot::take(self);
            let budget = match &slot {
                Some(_) => self.readahead_budget(),
                None => 0,
            };
            let mut passed = Vec::new();
            let res = match self
                .chunks
                .find(seq, self.ahead_rule(seq, budget, &mut passed))
            {
                Found::Present => return Ok(()),
                Found::InFlight(flight) => {
                    let _urgent = self.priority.urgent();
                    self.wait_for(&flight, seq)
                }
                Found::Claimed(claim) => {
                    let _urgent = self.priority.urgent();
                    if attempts == 0 && !hit {
                        let _ = self
                            .window
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                                Some((w / 2).max(1))
                            });
                    }
                    attempts += 1;
                    let ahead = self.bring_ahead(claim.seqs().iter().filter(|&&s| s > last));
                    let end = claim.seqs().last().copied().unwrap_or(seq);
                    for &s in passed.iter().filter(|&&s| s < end) {
                        self.kinds.leave_out(s);
                    }
                    let why = Why::OnDemand { ahead };
                    match slot.filter(|_| claim.seqs().len() > 1) {
                        Some(slot) => self.fetch_behind(claim, slot, seq, why),
                        None => self.fetch_claimed(claim, why),
                    }
                }
            };
            if self.chunks.is_present(seq) {
                return Ok(());
            }
            let err = res
                .err()
                .unwrap_or_else(|| FsError::Chunk(format!("chunk {seq} failed verification")));
            if attempts == 0
                || attempts >= self.opts.fetch_attempts
                || matches!(err, FsError::Source(_))
            {
                return Err(err);
            }
            tracing::debug!(layer = %self.digest, seq, attempts, error = %chain(&err), "fetching a rejected chunk again");
        }
    }

    /// Notes chunks `seqs` as being fetched ahead of any read, in the layer's ledger and in
    /// their kinds': a read that finds one is a read-ahead hit. Returns their compressed bytes.
    fn bring_ahead<'s>(&self, seqs: impl Iterator<Item = &'s usize>) -> u64 {
        let mut ahead = 0;
        for &s in seqs {
            self.ahead.set(s);
            let c = &self.chunk(s).info;
            let bytes = c.compressed_end - c.compressed_offset;
            self.kinds.brought(self.kind_of(s), bytes);
            ahead += bytes;
        }
        self.ahead_bytes.fetch_add(ahead, Ordering::SeqCst);
        ahead
    }

    /// Compressed bytes a miss may fetch past its chunk: the fixed amount if configured, else
    /// the window's round trips of the measured link.
    ///
    /// Read-ahead must earn its keep in each layer: each read that finds a chunk it brought
    /// saves a round trip, each byte of it costs link time and a core to decompress. Once a
    /// layer has had [`PROBATION`] round trips' worth of read-ahead, it gets more only while
    /// its hits are worth at least half the bytes (hits × one round trip's bytes × 2 ≥ bytes):
    /// a program that reads a few scattered libraries (`python3 -c 'print(1)'`) stops paying
    /// for neighbours it never reads, one that imports a whole package keeps going. A layer held
    /// back tries again every [`RETRY_AFTER`] misses, in case its readers changed, on a fresh
    /// ledger: what its readers do now decides, not what they did before. (A ledger kept from
    /// the start shut read-ahead off for good in a layer whose first few misses read ahead into
    /// files nobody read, however well the retries did afterwards: on a link a little slower
    /// than expected, an import-heavy start fell back to one request per module.)
    fn readahead_budget(&self) -> u64 {
        if let Some(fixed) = self.opts.readahead_bytes {
            return fixed;
        }
        let link = self.opts.link.get();
        let one = link.readahead(1);
        let spent = self.ahead_bytes.load(Ordering::SeqCst);
        let hits = self.ahead_hits.load(Ordering::SeqCst);
        if unpaid(spent, hits, one, PROBATION) {
            if self.held_back.fetch_add(1, Ordering::SeqCst) + 1 < RETRY_AFTER {
                return 0;
            }
            self.ahead_bytes.store(0, Ordering::SeqCst);
            self.ahead_hits.store(0, Ordering::SeqCst);
        }
        self.held_back.store(0, Ordering::SeqCst);
        link.readahead(self.window.load(Ordering::SeqCst))
    }

    /// Notes that `ino` was opened: if read-ahead brought its chunks (a passthrough open then
    /// never reads through here), that is a read-ahead hit; if its first chunk is cached, an
    /// ELF file's libraries are followed now (its reads may never come here).
    pub(crate) fn opened(self: &Arc<Self>, ino: u64) {
        let Some(node) = self.table.get(ino) else {
            return;
        };
        let mut hit = false;
        for c in self.table.chunks(node) {
            hit |= self.take_ahead(c.seq);
        }
        if hit {
            self.widen();
        }
        let first = self.table.chunks(node).first();
        if self.image.get().is_some()
            && !self.followed(ino)
            && first.is_some_and(|c| self.chunks.is_present(c.seq))
        {
            let mut head = [0u8; ELF_MAGIC.len()];
            let _pins = self.pin(&self.table.chunks(node)[..1]);
            if self.cache.read_at(ino, node.size, &mut head, 0).is_ok() {
                self.follow_needs(ino, &head);
            }
        }
    }

    fn widen(&self) {
        let _ = self
            .window
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                Some(w.saturating_mul(2).min(MAX_WINDOW))
            });
    }

    /// True (once) when `seq` was brought by read-ahead and no read asked for it since.
    fn take_ahead(&self, seq: usize) -> bool {
        let hit = self.ahead.take(seq);
        if hit {
            self.ahead_hits.fetch_add(1, Ordering::SeqCst);
            self.kinds.read(self.kind_of(seq));
        }
        hit
    }

    /// The kind (see [`FileKinds`]) of the file chunk `seq` belongs to.
    fn kind_of(&self, seq: usize) -> usize {
        self.table
            .blob_order
            .get(seq)
            .and_then(|&(ino, _)| self.table.index(ino))
            .map_or(0, |i| self.kinds.kind(i))
    }

    fn wait_for(&self, flight: &Flight, seq: usize) -> Result<(), FsError> {
        flight.wait_for(|| self.chunks.is_present(seq), self.opts.wait_timeout)
    }

    /// Runs `claim` (a miss and its read-ahead) on a thread of its own and waits only for chunk
    /// `seq`; the read-ahead lands behind the read. Without a thread, fetches it here.
    fn fetch_behind(
        self: &Arc<Self>,
        claim: Claim,
        slot: BehindSlot,
        seq: usize,
        why: Why,
    ) -> Result<(), FsError> {
        let flight = claim.flight().clone();
        let me = self.clone();
        let started = std::thread::Builder::new()
            .name("stargz-fetch".into())
            .spawn(move || {
                let _slot = slot;
                let _ = me.fetch_claimed(claim, why);
            });
        match started {
            Ok(_) => self.wait_for(&flight, seq),
            Err(e) => {
                // The closure (and the claim in it) is gone with the failed spawn: its waiters
                // were told; fetch again without read-ahead.
                tracing::warn!(error = %e, "cannot start a fetch thread; fetching inline");
                self.fetch_alone(seq, Why::OnDemand { ahead: 0 })
            }
        }
    }

    /// Which chunks join a span that starts at `seq`: the following missing ones whose
    /// compressed bytes continue it without a gap, up to `budget` compressed bytes past `seq`'s
    /// end (prefetch and background fetch: one plain range).
    fn span_rule(&self, seq: usize, budget: u64) -> impl FnMut(usize, bool) -> Step + '_ {
        let mut end = self.chunk(seq).info.compressed_end;
        let limit = end.saturating_add(budget);
        move |next, present| {
            let c = &self.chunk(next).info;
            if present || c.compressed_offset != end || c.compressed_end > limit {
                return Step::Stop;
            }
            end = c.compressed_end;
            Step::Join
        }
    }

    /// Which chunks a miss at `seq` reads ahead: the following ones in blob order, up to
    /// `budget` compressed bytes of them, as [`Self::span_rule`] — except that, when the source
    /// can skip bytes within one request, it passes over chunks already present (the read-ahead
    /// goes on behind them) and files of the kinds read-ahead brings in vain (see [`FileKinds`];
    /// pushed to `passed`), as long as the request keeps to [`MAX_PARTS`] ranges and the span to
    /// [`MAX_REACH`] budgets of the blob.
    fn ahead_rule<'a>(
        &'a self,
        seq: usize,
        budget: u64,
        passed: &'a mut Vec<usize>,
    ) -> impl FnMut(usize, bool) -> Step + 'a {
        let skips = budget > 0 && self.source.multi_range();
        let one = self.opts.link.get().readahead(1);
        let start = self.chunk(seq).info.compressed_end;
        // End of the bytes asked for, and of the chunks looked at (asked for or passed over).
        let (mut end, mut cursor) = (start, start);
        let (mut spent, mut parts) = (0u64, 1);
        // Bytes of each kind this read-ahead takes so far.
        let mut pending = [0u64; MAX_KINDS];
        move |next, present| {
            let c = &self.chunk(next).info;
            let size = c.compressed_end - c.compressed_offset;
            let reach = c.compressed_end - start;
            if c.compressed_offset != cursor || reach > budget.saturating_mul(MAX_REACH) {
                return Step::Stop;
            }
            // A chunk passed over opens a gap, and the next one joined a range of its own.
            let gap_allowed = skips && parts < MAX_PARTS;
            if present && !gap_allowed {
                return Step::Stop;
            }
            let kind = self.kind_of(next);
            let taken = pending.get(kind).copied().unwrap_or(0);
            let left_out = || size >= MIN_LEFT_OUT && self.kinds.left_out(kind, one, taken);
            if present || (gap_allowed && left_out()) {
                if !present {
                    passed.push(next);
                }
                cursor = c.compressed_end;
                return Step::Skip;
            }
            if spent.saturating_add(size) > budget {
                return Step::Stop;
            }
            if cursor != end {
                if parts == MAX_PARTS {
                    return Step::Stop;
                }
                parts += 1;
            }
            spent += size;
            if let Some(p) = pending.get_mut(kind) {
                *p += size;
            }
            end = c.compressed_end;
            cursor = end;
            Step::Join
        }
    }

    /// Fetches claimed chunks; the claim is released (and its waiters woken) whatever happens.
    /// A chunk that fails (a broken transfer, a failed digest) has its cache writer aborted
    /// before the claim goes: nothing unverified stays behind.
    fn fetch_claimed(&self, claim: Claim, why: Why) -> Result<(), FsError> {
        let res = self.fetch_span(claim.seqs(), claim.flight(), why);
        if let Err(e) = &res {
            tracing::warn!(layer = %self.digest, error = %chain(e), "chunk fetch failed");
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(chain(e).to_string());
        }
        claim.finish(&res);
        res
    }

    /// One request for the claimed chunks (one range for each run of neighbours in the blob),
    /// demultiplexed into their decoders.
    fn fetch_span(&self, seqs: &[usize], flight: &Flight, why: Why) -> Result<(), FsError> {
        let Some(&first) = seqs.first() else {
            return Ok(());
        };
        let start = self.chunk(first).info.compressed_offset;
        let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
        for &s in seqs {
            let c = &self.chunk(s).info;
            match ranges.last_mut() {
                Some(r) if r.end == c.compressed_offset => r.end = c.compressed_end,
                _ => ranges.push(c.compressed_offset..c.compressed_end),
            }
        }
        let len: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        let mut sink = SpanSink {
            reader: self,
            flight,
            seqs,
            k: 0,
            pos: start,
            dec: None,
            failed: None,
        };
        sink.start_chunk();
        let started = std::time::Instant::now();
        let fetched = match &ranges[..] {
            [one] => self.source.fetch(one.start, len, &mut sink),
            more => self.source.fetch_ranges(more, &mut sink),
        };
        tracing::debug!(
            layer = %self.digest,
            offset = start,
            len,
            ranges = ?ranges,
            chunks = seqs.len(),
            why = ?why,
            elapsed_ms = started.elapsed().as_millis() as u64,
            window = self.window.load(Ordering::Relaxed),
            link = ?self.opts.link.get(),
            ok = fetched.is_ok(),
            "range fetched"
        );
        if let (Some(m), true) = (&self.metrics, fetched.is_ok()) {
            let (purpose, ahead) = match why {
                Why::OnDemand { ahead } => (Purpose::OnDemand, ahead),
                Why::Prefetch => (Purpose::Prefetch, 0),
                Why::Background => (Purpose::Background, 0),
                Why::Needed => (Purpose::OnDemand, len),
            };
            m.fetched(
                purpose,
                len.saturating_sub(ahead),
                ahead.min(len),
                started.elapsed(),
            );
        }
        let failed = sink.failed.take();
        drop(sink);
        fetched.map_err(FsError::Source)?;
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Fetches everything whose payload ends before `limit` (prefetch at mount).
    pub fn prefetch(&self, limit: u64) -> Result<(), FsError> {
        let mut seq = 0;
        let n = self.table.blob_order.len();
        while seq < n && self.chunk(seq).info.compressed_end <= limit {
            let budget = limit - self.chunk(seq).info.compressed_end;
            match self.chunks.try_claim(seq, self.span_rule(seq, budget)) {
                Some(claim) => {
                    seq = claim.seqs().last().map_or(seq, |&s| s) + 1;
                    self.fetch_claimed(claim, Why::Prefetch)?;
                }
                None => seq += 1,
            }
        }
        Ok(())
    }

    /// Claims and fetches the next background span of up to `span_bytes`.
    pub fn background_step(&self, span_bytes: u64) -> BgStep {
        if self.bg_done.load(Ordering::SeqCst) {
            return BgStep::Done;
        }
        if let Some(m) = &self.metrics {
            m.background(false);
        }
        let n = self.table.blob_order.len();
        let claim = {
            let mut cursor = self.bg_cursor.lock().unwrap_or_else(|e| e.into_inner());
            while cursor.0 < n && !self.chunks.is_missing(cursor.0) {
                cursor.0 += 1;
            }
            if cursor.0 >= n {
                if self.fully_cached() || cursor.1 >= 3 {
                    self.bg_done.store(true, Ordering::SeqCst);
                    if let Some(m) = &self.metrics {
                        m.background(true);
                    }
                    return BgStep::Done;
                }
                // Chunks in flight elsewhere or failed: look again from the start.
                *cursor = (0, cursor.1 + 1);
                return BgStep::More;
            }
            let seq = cursor.0;
            let budget = span_bytes.saturating_sub(
                self.chunk(seq).info.compressed_end - self.chunk(seq).info.compressed_offset,
            );
            let Some(claim) = self.chunks.try_claim(seq, self.span_rule(seq, budget)) else {
                // Claimed by a reader since the scan: move on.
                return BgStep::More;
            };
            cursor.0 = claim.seqs().last().map_or(seq, |&s| s) + 1;
            claim
        };
        if self.fetch_claimed(claim, Why::Background).is_ok() {
            return BgStep::More;
        }
        if self.bg_failures.fetch_add(1, Ordering::SeqCst) + 1 >= MAX_BG_FAILURES {
            tracing::warn!(layer = %self.digest, "background fetch gave up after repeated failures");
            self.bg_done.store(true, Ordering::SeqCst);
        }
        BgStep::Failed
    }

    /// Stops background work for this layer (unmount).
    pub fn stop_background(&self) {
        self.bg_done.store(true, Ordering::SeqCst);
    }

    /// True when the background fetcher has nothing left to do.
    pub fn background_finished(&self) -> bool {
        self.bg_done.load(Ordering::SeqCst)
    }

    /// Keeps `chunks` from eviction while the returned pins live (a read in progress on
    /// them); waits out an eviction already running on one (it is then fetched again). A pin
    /// and [`Self::evict_file`] share one atomic word per chunk, so a reader and the evictor
    /// never both proceed.
    fn pin<'a>(&'a self, chunks: &[Chunk]) -> Pins<'a> {
        pin_words(chunks.iter().filter_map(|c| self.pins.get(c.seq)))
    }

    /// Pins every chunk of `ino` for as long as it is open through FUSE passthrough (the
    /// kernel reads the cache file itself), until [`Self::unpin`].
    pub(crate) fn pin_open(&self, ino: u64) {
        if let Some(node) = self.table.get(ino) {
            std::mem::forget(self.pin(self.table.chunks(node)));
        }
        self.touch(ino);
    }

    pub(crate) fn unpin(&self, ino: u64) {
        if let Some(node) = self.table.get(ino) {
            drop(Pins(
                self.table
                    .chunks(node)
                    .iter()
                    .filter_map(|c| self.pins.get(c.seq))
                    .collect(),
            ));
        }
    }

    /// The pins of every chunk of the layer (one word per chunk): those a native tree holds.
    fn pin_all(&self) -> Pins<'_> {
        pin_words(self.pins.iter())
    }

    /// Settles a layer that became fully cached: moves the files its cache kept together while
    /// it was fetched into cache files of their own ([`LayerCache::unpack`]), then builds (or
    /// adopts) its native tree if it has none and may have one; see [`super::native`]. The
    /// layer's chunks are pinned meanwhile (nothing is written), and stay pinned while the tree
    /// exists: nothing may punch or rewrite the cache files it links.
    pub fn materialize(&self) {
        if !self.fully_cached() {
            return;
        }
        let unpack = self.cache.packed();
        let build = self.native.begin();
        if !unpack && !build {
            return;
        }
        let pins = self.pin_all();
        // Checked again once pinned: until then an eviction may take a chunk.
        if !self.fully_cached() {
            drop(pins);
            if build {
                self.native.finish(None, true);
            }
            return;
        }
        let started = Instant::now();
        if unpack {
            match self.cache.unpack() {
                Ok(files) => {
                    tracing::info!(layer = %self.digest, files, ms = started.elapsed().as_millis() as u64, "small files moved into cache files of their own");
                }
                Err(e) => {
                    tracing::warn!(layer = %self.digest, error = %e, "cannot move small files out of the layer's small-file store: they stay there, read through FUSE");
                }
            }
        }
        if !build {
            return;
        }
        let started = Instant::now();
        match native::build(&self.table, self.cache.as_ref(), &self.digest) {
            Ok(b) => {
                tracing::info!(layer = %self.digest, dir = %b.dir.display(), entries = b.entries, adopted = b.adopted, ms = started.elapsed().as_millis() as u64, "native layer ready");
                // Held until `retire_native` (or for good).
                std::mem::forget(pins);
                self.native.finish(Some(b.dir), false);
            }
            Err(e) => {
                tracing::warn!(layer = %self.digest, error = %chain(&e), "no native tree for the layer: new containers keep reading it through FUSE");
                drop(pins);
                self.native.finish(None, false);
            }
        }
    }

    /// The layer's native tree for a mount about to be made, if it has one.
    pub(crate) fn native_dir(&self) -> Option<std::path::PathBuf> {
        self.native.hand_out()
    }

    /// True while the layer has a native tree.
    pub(crate) fn has_native(&self) -> bool {
        self.native.is_ready()
    }

    /// Gives up the native tree (to evict the layer's files) unless it is in use or was
    /// handed out within `grace`; true when it did, its chunks then unpinned.
    pub(crate) fn retire_native(&self, grace: std::time::Duration) -> bool {
        if !self.native.retire(grace) {
            return false;
        }
        tracing::info!(layer = %self.digest, "native tree given up for the cache budget");
        // The pins `materialize` kept.
        drop(Pins(self.pins.iter().collect()));
        true
    }

    fn touch(&self, ino: u64) {
        if let (Some(b), Some(t)) = (
            &self.opts.budget,
            self.table.index(ino).and_then(|i| self.last_read.get(i)),
        ) {
            t.store(b.now(), Ordering::Relaxed);
        }
    }

    /// On-disk bytes of verified data this layer holds, and how much it had evicted.
    pub fn cache_usage(&self) -> (u64, u64) {
        (
            self.cached_bytes.load(Ordering::SeqCst),
            self.evicted_bytes.load(Ordering::SeqCst),
        )
    }

    /// Hands `f(last read, node index)` every regular file with cached chunks not in use.
    pub(crate) fn eviction_candidates(&self, mut f: impl FnMut(u32, usize)) {
        for (i, node) in self.table.nodes().iter().enumerate() {
            let evictable = |c: &Chunk| {
                self.chunks.is_present(c.seq)
                    && self
                        .pins
                        .get(c.seq)
                        .is_some_and(|p| p.load(Ordering::SeqCst) == 0)
            };
            if node.kind == NodeKind::Reg && self.table.chunks(node).iter().any(evictable) {
                f(self.last_read[i].load(Ordering::Relaxed), i);
            }
        }
    }

    /// Evicts the cached chunks of node `i` (punches their bytes out of its cache file) that no
    /// read or open pins and that are not being fetched. Returns the bytes it freed.
    pub(crate) fn evict_file(&self, i: usize) -> u64 {
        let Some(node) = self.table.nodes().get(i) else {
            return 0;
        };
        let mut held = Vec::new();
        for c in self.table.chunks(node) {
            let word = &self.pins[c.seq];
            if self.chunks.is_present(c.seq)
                && word
                    .compare_exchange(0, EVICTING, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                held.push(c.seq);
            }
        }
        let evicted = self.chunks.evict(&held, |seq| {
            let range = self.chunk(seq).info.file_range();
            if let Err(e) = self.cache.discard(node.ino, range) {
                tracing::warn!(layer = %self.digest, ino = node.ino, error = %e, "evicting a chunk failed");
            }
        });
        for &seq in &held {
            self.pins[seq].fetch_and(!EVICTING, Ordering::SeqCst);
        }
        let bytes: u64 = evicted
            .iter()
            .map(|&s| disk_bytes(self.chunk(s).info.chunk_size))
            .sum();
        let _ = self
            .cached_bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                Some(b.saturating_sub(bytes))
            });
        self.evicted_bytes.fetch_add(bytes, Ordering::SeqCst);
        bytes
    }

    fn chunk_done(&self, seq: usize, res: Result<Committed, FsError>) -> Result<(), FsError> {
        let c = self.chunk(seq);
        match res {
            Ok(proof) => {
                if self.chunks.set_present(seq, proof) {
                    let bytes = disk_bytes(c.info.chunk_size);
                    self.cached_bytes.fetch_add(bytes, Ordering::SeqCst);
                    if let Some(b) = &self.opts.budget {
                        b.charge(bytes);
                    }
                }
                self.fetched.fetch_add(
                    c.info.compressed_end - c.info.compressed_offset,
                    Ordering::Relaxed,
                );
                if self.fully_cached() {
                    // The only bytes left are tar headers before the first payload.
                    self.fetched.store(self.source.size(), Ordering::Relaxed);
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(layer = %self.digest, offset = c.info.compressed_offset, error = %chain(&e), "chunk rejected");
                Err(e)
            }
        }
    }
}

/// One of a layer's [`MAX_BEHIND`] read-ahead fetches; given back on drop.
struct BehindSlot(Arc<LayerReader>);

impl BehindSlot {
    fn take(reader: &Arc<LayerReader>) -> Option<Self> {
        if reader.behind.fetch_add(1, Ordering::SeqCst) < MAX_BEHIND {
            Some(BehindSlot(reader.clone()))
        } else {
            reader.behind.fetch_sub(1, Ordering::SeqCst);
            None
        }
    }
}

impl Drop for BehindSlot {
    fn drop(&mut self) {
        self.0.behind.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for LayerReader {
    /// A layer that goes away (unmounted; its cache removed or re-verified by the next mount)
    /// no longer counts against the budget.
    fn drop(&mut self) {
        if let Some(b) = &self.opts.budget {
            b.refund(self.cached_bytes.load(Ordering::SeqCst));
        }
    }
}

/// Decompressed bytes of one chunk on their way into its cache [`Writer`], hashed as they go.
struct ChunkWriter {
    /// The cache writer; taken when the chunk is committed (or dropped, which aborts it).
    out: Option<Writer>,
    skip: u64,
    remaining: u64,
    hasher: Sha256,
    io_error: Option<io::Error>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut d = data;
        let skip = usize::try_from(self.skip)
            .unwrap_or(usize::MAX)
            .min(d.len());
        d = &d[skip..];
        self.skip -= skip as u64;
        let take = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(d.len());
        if take > 0 {
            if let (Some(out), None) = (self.out.as_mut(), &self.io_error) {
                if let Err(e) = out.write_all(&d[..take]) {
                    self.io_error = Some(e);
                }
            }
            self.hasher.update(&d[..take]);
            self.remaining -= take as u64;
        }
        // Bytes past the chunk (tar padding, the next headers) are not the chunk's.
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One chunk's decompressor, by the layer's format: both stream into the chunk's writer.
/// There is one at a time per span being fetched, in the span's sink: the gzip variant's size
/// costs nothing there, boxing it would cost an allocation per chunk.
#[allow(clippy::large_enum_variant)]
enum ChunkDecoder {
    Gzip(flate2::write::GzDecoder<ChunkWriter>),
    Zstd(zstd::stream::write::Decoder<'static, ChunkWriter>),
}

impl ChunkDecoder {
    fn new(format: Format, w: ChunkWriter) -> io::Result<Self> {
        Ok(match format {
            Format::Gzip => ChunkDecoder::Gzip(flate2::write::GzDecoder::new(w)),
            Format::ZstdChunked => ChunkDecoder::Zstd(zstd_writer(w)?),
        })
    }

    fn write(&mut self, compressed: &[u8]) -> io::Result<usize> {
        match self {
            ChunkDecoder::Gzip(d) => d.write(compressed),
            ChunkDecoder::Zstd(d) => d.write(compressed),
        }
    }

    /// Decompresses what is buffered; an error if the member or frame is cut short.
    fn finish(&mut self) -> io::Result<()> {
        match self {
            ChunkDecoder::Gzip(d) => d.try_finish(),
            ChunkDecoder::Zstd(d) => d.do_finish(),
        }
    }

    fn writer(&self) -> &ChunkWriter {
        match self {
            ChunkDecoder::Gzip(d) => d.get_ref(),
            ChunkDecoder::Zstd(d) => d.get_ref(),
        }
    }

    fn writer_mut(&mut self) -> &mut ChunkWriter {
        match self {
            ChunkDecoder::Gzip(d) => d.get_mut(),
            ChunkDecoder::Zstd(d) => d.get_mut(),
        }
    }
}

/// Routes the compressed bytes of a span (its chunks' ranges one after the other) to one
/// decoder per chunk, in blob order.
struct SpanSink<'a> {
    reader: &'a LayerReader,
    /// Told of each chunk that lands, so its readers go on before the span ends.
    flight: &'a Flight,
    seqs: &'a [usize],
    k: usize,
    pos: u64,
    dec: Option<ChunkDecoder>,
    failed: Option<FsError>,
}

impl SpanSink<'_> {
    fn start_chunk(&mut self) {
        self.dec = None;
        let Some(&seq) = self.seqs.get(self.k) else {
            return;
        };
        let c = self.reader.chunk(seq);
        let (ino, _) = self.reader.table.blob_order[seq];
        let size = self.reader.table.get(ino).map_or(0, |n| n.size);
        let key = ChunkKey {
            ino,
            size,
            range: c.info.file_range(),
        };
        match self.reader.cache.add(&key) {
            Ok(out) => {
                let w = ChunkWriter {
                    out: Some(out),
                    skip: c.info.inner_offset,
                    remaining: c.info.chunk_size,
                    hasher: Sha256::new(),
                    io_error: None,
                };
                match ChunkDecoder::new(self.reader.table.format, w) {
                    Ok(dec) => self.dec = Some(dec),
                    Err(e) => self.fail(seq, FsError::Chunk(format!("decompress: {e}"))),
                }
            }
            Err(e) => self.fail(seq, FsError::Cache(e)),
        }
    }

    fn fail(&mut self, seq: usize, e: FsError) {
        let e = self.reader.chunk_done(seq, Err(e)).err();
        if self.failed.is_none() {
            self.failed = e;
        }
    }

    /// Ends the current chunk at the end of its compressed range: flushes its decoder (if it
    /// is still running) and verifies it, then starts the next chunk, whose bytes come next
    /// (where it starts in the blob: a request may leave bytes out between two chunks).
    fn finish_chunk(&mut self) {
        if let Some(dec) = self.dec.take() {
            self.complete(dec, true);
        }
        self.k += 1;
        if let Some(&next) = self.seqs.get(self.k) {
            self.pos = self.reader.chunk(next).info.compressed_offset;
        }
        self.start_chunk();
    }

    /// Verifies the current chunk and commits it to the cache, or aborts it. `flush` drains the
    /// decoder first; without it (the chunk's bytes are all out already) nothing more is
    /// decompressed.
    fn complete(&mut self, mut dec: ChunkDecoder, flush: bool) {
        let seq = self.seqs[self.k];
        let flushed = if flush {
            dec.finish()
                .map_err(|e| FsError::Chunk(format!("decompress: {e}")))
        } else {
            Ok(())
        };
        let res = flushed.and_then(|()| {
            let (ino, _) = self.reader.table.blob_order[seq];
            let w = dec.writer_mut();
            verify(
                w,
                self.reader.chunk(seq),
                &self.reader.digest,
                ino,
                self.reader.opts.allow_unverified,
            )?;
            // Verified: only now may the bytes become visible.
            let out = w
                .out
                .take()
                .ok_or_else(|| FsError::Chunk("chunk written twice".into()))?;
            out.commit().map_err(FsError::Cache)
        });
        match res {
            Ok(proof) => {
                let _ = self.reader.chunk_done(seq, Ok(proof));
                self.flight.progress();
            }
            // Dropping the decoder drops its cache writer, which aborts it.
            Err(e) => self.fail(seq, e),
        }
    }
}

/// Checks a streamed chunk: the writer must have seen all of it, and its running hash must
/// match (via [`check_digest`], the same rule `estargz` applies to buffered chunks).
fn verify(
    w: &mut ChunkWriter,
    c: &Chunk,
    layer: &str,
    ino: u64,
    allow_unverified: bool,
) -> Result<(), FsError> {
    if let Some(e) = w.io_error.take() {
        return Err(FsError::Cache(e));
    }
    if w.remaining != 0 {
        return Err(FsError::Chunk(format!(
            "chunk at {} is {} bytes short",
            c.info.compressed_offset, w.remaining
        )));
    }
    let got: [u8; 32] = std::mem::take(&mut w.hasher).finalize().into();
    if c.info.digest.is_none() && !allow_unverified {
        return Err(FsError::Chunk(format!(
            "chunk at {} has no digest",
            c.info.compressed_offset
        )));
    }
    check_digest(&c.info, layer, &format!("inode {ino}"), got)
        .map_err(|e| FsError::Chunk(chain(&e).to_string()))
}

impl Write for SpanSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut data = buf;
        while !data.is_empty() {
            let Some(&seq) = self.seqs.get(self.k) else {
                return Err(io::Error::other("source sent more bytes than asked"));
            };
            let end = self.reader.chunk(seq).info.compressed_end;
            let n = usize::try_from(end - self.pos)
                .unwrap_or(usize::MAX)
                .min(data.len());
            let mut part = &data[..n];
            while let Some(dec) = self.dec.as_mut().filter(|_| !part.is_empty()) {
                match dec.write(part) {
                    Ok(0) => break,
                    Ok(m) => part = &part[m..],
                    Err(e) => {
                        self.dec = None;
                        self.fail(seq, FsError::Chunk(format!("decompress: {e}")));
                    }
                }
                if let Some(done) = self.dec.take_if(|d| d.writer().remaining == 0) {
                    // All of the chunk is out: the rest of its range is not decompressed.
                    self.complete(done, false);
                }
            }
            self.pos += n as u64;
            data = &data[n..];
            if self.pos == end {
                self.finish_chunk();
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the metrics endpoint reports of a mounted layer at scrape time.
impl LayerStatsSource for LayerReader {
    fn layer_stats(&self) -> LayerStats {
        let (cached, evicted) = self.cache_usage();
        LayerStats {
            size: self.blob_size(),
            fetched: self.fetched_size(),
            prefetched: self.metrics.as_ref().map_or(0, LayerMetrics::prefetched),
            cached,
            evicted,
            background_done: self.background_finished(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::cache::CacheKind;

    #[test]
    fn background_waits_for_the_quiet_period_after_urgent_work() {
        let p = Arc::new(Priority::with_quiet_period(Duration::from_millis(200)));
        assert!(!p.busy(), "busy before any urgent work");
        let guard = p.urgent();
        assert!(p.busy());
        drop(guard);
        assert!(p.busy(), "not busy right after urgent work ended");
        std::thread::sleep(Duration::from_millis(300));
        assert!(!p.busy(), "still busy after the quiet period");

        let none = Arc::new(Priority::default());
        drop(none.urgent());
        assert!(
            !none.busy(),
            "no quiet period means busy only while urgent work waits"
        );
    }

    /// A registry behind a link: each request waits a round trip, then streams at the link's
    /// rate. With `multi`, a request may name several ranges.
    struct SimLink {
        blob: Vec<u8>,
        rtt: Duration,
        bytes_per_sec: f64,
        multi: bool,
        fetches: std::sync::atomic::AtomicU64,
        sent: std::sync::atomic::AtomicU64,
    }

    impl SimLink {
        fn send(&self, offset: u64, len: u64, sink: &mut (dyn Write + Send)) -> io::Result<()> {
            let (start, end) = (offset as usize, (offset + len) as usize);
            self.sent.fetch_add(len, Ordering::SeqCst);
            for piece in self.blob[start..end].chunks(1500) {
                std::thread::sleep(Duration::from_secs_f64(
                    piece.len() as f64 / self.bytes_per_sec,
                ));
                sink.write_all(piece)?;
            }
            Ok(())
        }
    }

    impl LayerSource for SimLink {
        fn size(&self) -> u64 {
            self.blob.len() as u64
        }
        fn fetch(&self, offset: u64, len: u64, sink: &mut (dyn Write + Send)) -> io::Result<()> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.rtt);
            self.send(offset, len, sink)
        }
        fn fetch_ranges(
            &self,
            ranges: &[std::ops::Range<u64>],
            sink: &mut (dyn Write + Send),
        ) -> io::Result<()> {
            assert!(self.multi, "several ranges asked of a source that cannot");
            self.fetches.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.rtt);
            for r in ranges {
                self.send(r.start, r.end - r.start, sink)?;
            }
            Ok(())
        }
        fn multi_range(&self) -> bool {
            self.multi
        }
    }

    /// Where module `i` is in [`modules_layer`]: `lib/modNNN.pyc`, or with sources
    /// `lib/pNN/modNNN.pyc` (packages of ten).
    fn module(i: usize, sources: bool, ext: &str) -> String {
        match sources {
            false => format!("lib/mod{i:03}.{ext}"),
            true => format!("lib/p{:02}/mod{i:03}.{ext}", i / 10),
        }
    }

    /// The inode at `path` (relative to the root) in `table`.
    fn inode_at(table: &InodeTable, path: &str) -> u64 {
        path.split('/')
            .fold(super::super::inode::ROOT_INO, |dir, name| {
                table.lookup(dir, name).expect(path).ino
            })
    }

    /// An eStargz layer of `n` small, barely compressible "modules" (see [`module`]). With
    /// `sources`, each package holds its ten compiled modules and then their ten sources, as
    /// Python's `__pycache__` directory sorts before the sources beside it.
    fn modules_layer(n: usize, sources: bool) -> (Vec<u8>, String) {
        let mut tar = tar::Builder::new(Vec::new());
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let names = (0..n.div_ceil(10)).flat_map(|p| {
            let package = (p * 10..n.min(p * 10 + 10)).map(|i| module(i, sources, "pyc"));
            let sources = (p * 10..n.min(p * 10 + 10))
                .filter(move |_| sources)
                .map(|i| module(i, true, "py"));
            package.chain(sources).collect::<Vec<_>>()
        });
        for name in names {
            let data: Vec<u8> = (0..3000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b'a' + (x % 26) as u8
                })
                .collect();
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, &data[..]).expect("tar entry");
        }
        let input = tar.into_inner().expect("tar");
        let mut blob = Vec::new();
        let built = crate::estargz::build(&input[..], &mut blob, &Default::default())
            .expect("eStargz build");
        (blob, built.toc_digest)
    }

    /// Mounts the modules layer behind `link` (no FUSE: the reader only) and reads every
    /// module in name order; returns how many range requests the reads had made after each.
    fn import_all(n: usize, rtt_ms: u64, mbit: f64) -> (Vec<u64>, Arc<LayerReader>) {
        let (blob, toc_digest) = modules_layer(n, false);
        let link = sim_link(blob, rtt_ms, mbit, false);
        import_in_order(link, toc_digest, false, &(0..n).collect::<Vec<_>>())
    }

    fn sim_link(blob: Vec<u8>, rtt_ms: u64, mbit: f64, multi: bool) -> Arc<SimLink> {
        Arc::new(SimLink {
            blob,
            rtt: Duration::from_millis(rtt_ms),
            bytes_per_sec: mbit * 1e6 / 8.0,
            multi,
            fetches: Default::default(),
            sent: Default::default(),
        })
    }

    /// As [`import_all`], reading the modules numbered in `order` of the layer behind `link`.
    fn import_in_order(
        link: Arc<SimLink>,
        toc_digest: String,
        sources: bool,
        order: &[usize],
    ) -> (Vec<u64>, Arc<LayerReader>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = ReadOptions {
            cache_kind: CacheKind::Memory,
            ..ReadOptions::default()
        };
        let spec = super::super::layer::LayerSpec {
            digest: "sha256:modules".into(),
            source: link.clone(),
            toc_digest: Some(toc_digest),
        };
        let reader = super::super::layer::open_layer(spec, dir.path(), &opts, Arc::default())
            .expect("open layer");
        let before = link.fetches.load(Ordering::SeqCst);
        let mut made = Vec::with_capacity(order.len());
        let table = reader.table();
        for &i in order {
            let ino = inode_at(table, &module(i, sources, "pyc"));
            let data = reader.read(ino, 0, 1 << 20).expect("read");
            assert_eq!(data.len(), 3000);
            made.push(link.fetches.load(Ordering::SeqCst) - before);
        }
        (made, reader)
    }

    /// A fully cached layer on disk gets a native tree made of its cache files, which pins
    /// them; when the cache is over budget and nothing else can go, a tree no mount uses and
    /// not handed out lately is given up, and the layer's files evicted.
    #[test]
    fn a_native_tree_links_the_cache_and_the_budget_takes_it_back_when_unused() {
        use std::os::unix::fs::MetadataExt;
        let (blob, toc_digest) = modules_layer(30, true);
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = CacheBudget::new(1 << 30);
        let open = |name: &str| {
            let opts = ReadOptions {
                budget: Some(budget.clone()),
                ..ReadOptions::default()
            };
            let spec = super::super::layer::LayerSpec {
                digest: "sha256:modules".into(),
                source: sim_link(blob.clone(), 0, 1e5, false),
                toc_digest: Some(toc_digest.clone()),
            };
            let cache = dir.path().join(name);
            let r = super::super::layer::open_layer(spec, &cache, &opts, Arc::default())
                .expect("open layer");
            (r, cache.join(native::TREE_NAME))
        };
        let (handed, handed_tree) = open("handed");
        let (unused, unused_tree) = open("unused");
        for r in [&handed, &unused] {
            r.materialize();
            assert!(!r.has_native(), "a tree before the layer is cached");
            while r.background_step(1 << 20) != BgStep::Done {}
            assert!(r.fully_cached());
            r.materialize();
            assert!(r.has_native());
        }
        let ino = inode_at(handed.table(), &module(7, true, "pyc"));
        let file = handed_tree.join(module(7, true, "pyc"));
        let cache_file = handed.cache().file_path(ino).expect("disk cache");
        assert_eq!(
            std::fs::read(&file).expect("read tree"),
            handed.read(ino, 0, 1 << 20).expect("read layer")
        );
        let (a, b) = (
            std::fs::metadata(&file).expect("stat"),
            std::fs::metadata(&cache_file).expect("stat"),
        );
        assert_eq!(
            (a.ino(), a.nlink()),
            (b.ino(), 2),
            "the tree's file is the cache file"
        );
        assert_eq!(a.mode() & 0o7777, 0o644, "the image's mode");
        assert_eq!(handed.native_dir(), Some(handed_tree.clone()));

        // Far over budget: only the tree nobody was handed is given up.
        budget.charge(4 << 30);
        budget.refund(4 << 30);
        assert!(
            handed.has_native() && handed_tree.is_dir(),
            "a tree just handed out went"
        );
        assert!(handed.fully_cached());
        assert!(
            !unused.has_native() && !unused_tree.exists(),
            "the unused tree stayed"
        );
        assert!(!unused.fully_cached(), "its files were not evicted");
        assert_eq!(unused.native_dir(), None);
        // Past its grace, and with no mount naming it, the other one goes too.
        assert!(handed.retire_native(Duration::ZERO));
        assert!(!handed_tree.exists());
    }

    /// A restart (a new reader on the same cache directory) adopts the tree it finds for the
    /// same blob, unless a regular file of it is no longer its cache file: then it is rebuilt.
    #[test]
    fn a_restart_adopts_the_tree_unless_it_no_longer_links_the_cache() {
        use std::os::unix::fs::MetadataExt;
        let (blob, toc_digest) = modules_layer(20, true);
        let dir = tempfile::tempdir().expect("tempdir");
        let open = || {
            let spec = super::super::layer::LayerSpec {
                digest: "sha256:modules".into(),
                source: sim_link(blob.clone(), 0, 1e5, false),
                toc_digest: Some(toc_digest.clone()),
            };
            super::super::layer::open_layer(
                spec,
                dir.path(),
                &ReadOptions::default(),
                Arc::default(),
            )
            .expect("open layer")
        };
        let first = open();
        while first.background_step(1 << 20) != BgStep::Done {}
        first.materialize();
        let tree = first.native_dir().expect("a tree");
        let ino = inode_at(first.table(), &module(3, true, "py"));
        let name = module(3, true, "py");
        let tree_ino = || std::fs::metadata(tree.join(&name)).expect("stat").ino();
        let before = tree_ino();
        drop(first);

        let second = open();
        assert!(second.fully_cached(), "the cache was not re-verified");
        second.materialize();
        assert_eq!(second.native_dir(), Some(tree.clone()));
        assert_eq!(tree_ino(), before, "adopted, not rebuilt");
        // The cache file replaced by a copy (another inode): the tree must follow.
        let cache_file = second.cache().file_path(ino).expect("disk cache");
        drop(second);
        let bytes = std::fs::read(&cache_file).expect("read");
        std::fs::remove_file(&cache_file).expect("rm");
        std::fs::write(&cache_file, bytes).expect("write");
        let third = open();
        third.materialize();
        assert_eq!(third.native_dir(), Some(tree.clone()));
        let cache_ino = std::fs::metadata(&cache_file).expect("stat").ino();
        assert_eq!(tree_ino(), cache_ino, "the tree still names the old file");
    }

    #[test]
    fn misses_read_ahead_a_round_trip_of_the_link_and_widen_as_reads_land_in_it() {
        // 100 Mbit / 20 ms: ~250 KB per round trip, ~80 modules' worth.
        let (made, reader) = import_all(200, 20, 100.0);
        let requests = made.last().copied().unwrap_or(0);
        assert!(
            requests <= 200 / 8,
            "{requests} requests for 200 modules on 100 Mbit / 20 ms"
        );
        assert!(
            reader.window.load(Ordering::SeqCst) > 1,
            "reads landing in read-ahead widen the window"
        );
    }

    #[test]
    fn read_ahead_waits_for_hits_that_come_later() {
        // Python jumps between packages and comes back: the neighbours a miss brings are
        // often read only after a few more misses elsewhere. Eight misses far apart, each
        // reading ahead (~65 modules: a round trip of 100 Mbit / 20 ms as the reader measures
        // this simulated link), then the next 29 modules of each group: a layer judged after a
        // couple of misses would have stopped reading ahead before the later groups and paid
        // another request for each of them.
        let (groups, stride, per_group) = (8, 200, 30);
        let firsts = (0..groups).map(|g| g * stride);
        let rests = (0..groups).flat_map(|g| (1..per_group).map(move |k| g * stride + k));
        let order: Vec<usize> = firsts.chain(rests).collect();
        let (blob, toc_digest) = modules_layer(groups * stride, false);
        let link = sim_link(blob, 20, 100.0, false);
        let (made, _) = import_in_order(link, toc_digest, false, &order);
        let requests = made.last().copied().unwrap_or(0);
        assert!(
            requests <= groups as u64 + 1,
            "{requests} requests for {} modules in {groups} groups: {made:?}",
            order.len()
        );
    }

    #[test]
    fn a_thin_link_gets_no_read_ahead_once_measured() {
        // 20 Mbit / 10 ms: 25 KB per round trip, below what read-ahead is worth.
        let (made, reader) = import_all(300, 10, 20.0);
        let link = reader.opts.link.get();
        assert_eq!(link.readahead(8), 0, "{link:?}");
        // Probes that measured the bandwidth read ahead (at most ~150 modules' worth); from
        // then on each module is a request of its own.
        let last = &made[199..];
        assert_eq!(
            last[last.len() - 1] - last[0],
            100,
            "requests for the last 100 modules on 20 Mbit / 10 ms: {made:?}"
        );
    }

    /// Python reads `__pycache__/*.pyc` and only stats the `.py` beside it: once read-ahead has
    /// brought a few round trips' worth of sources nobody read, a source that can skip bytes
    /// within a request is asked for the compiled modules only, in as few requests; the
    /// sources left out are still read correctly when asked for.
    #[test]
    fn read_ahead_leaves_out_kinds_of_file_nobody_reads() {
        // ~10 MB: the first round trips' worth of sources is brought before the kind is judged.
        let n = 2500;
        let (blob, toc_digest) = modules_layer(n, true);
        let order: Vec<usize> = (0..n).collect();
        let plain = sim_link(blob.clone(), 20, 100.0, false);
        let (made, _) = import_in_order(plain.clone(), toc_digest.clone(), true, &order);
        let (plain_requests, plain_sent) = (made[n - 1], plain.sent.load(Ordering::SeqCst));
        let multi = sim_link(blob, 20, 100.0, true);
        let (made, reader) = import_in_order(multi.clone(), toc_digest, true, &order);
        let (requests, sent) = (made[n - 1], multi.sent.load(Ordering::SeqCst));
        assert!(
            sent * 4 < plain_sent * 3,
            "{sent} bytes sent with sources left out, {plain_sent} without"
        );
        assert!(
            requests <= plain_requests,
            "{requests} requests with sources left out, {plain_requests} without"
        );
        // What was left out is fetched on demand, and verified like the rest.
        let table = reader.table();
        let py = |i: usize| inode_at(table, &module(i, true, "py"));
        let cached = (0..n).filter(|&i| reader.file_cached(py(i))).count();
        assert!(cached < n / 2, "{cached} of {n} sources were brought");
        let missing = (0..n)
            .find(|&i| !reader.file_cached(py(i)))
            .expect("a source left out");
        let before = multi.fetches.load(Ordering::SeqCst);
        assert_eq!(
            reader.read(py(missing), 0, 1 << 20).expect("read").len(),
            3000
        );
        assert!(multi.fetches.load(Ordering::SeqCst) > before);
        assert!(reader.file_cached(py(missing)));
    }
}
