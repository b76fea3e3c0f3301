//! Prometheus metrics: Go's series under Go's names, and the ones an operator of this daemon
//! needs that Go lacks, served on `metrics_address` ([`serve`]).
//!
//! Go's daemon exports (`fs/metrics/common`, `fs/metrics/layer`):
//! - `stargz_fs_operation_duration_milliseconds` / `_microseconds` histograms and the
//!   `stargz_fs_operation_count` counter by `operation_type` and `layer` (the layer digest), and
//!   the `stargz_fs_bytes_served` gauge by the same labels;
//! - per mounted layer, by `digest` and `mountpoint`: `stargz_fs_layer_fetched_size_bytes`,
//!   `stargz_fs_layer_prefetch_size_bytes`, `stargz_fs_layer_size_bytes`.
//!
//! Dashboards query those by name, so the names stay exact: Go's counters carry no `_total`
//! suffix, which the Prometheus client would add to a counter, so they are exposed untyped
//! (queries such as `rate(stargz_fs_operation_count[5m])` work the same).
//!
//! The hot read path touches only handles a layer got once at mount ([`LayerMetrics`]):
//! atomic counters and a per-layer histogram, never a lock shared by all layers. Per-layer
//! series are dropped when the last mount of that layer goes, so a node that pulls images for
//! months does not keep every layer it ever served.

mod http;
mod process;

pub use http::{serve, MetricsServer};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// Go's `operation_type` values (`fs/metrics/common`).
pub(crate) mod op {
    pub const MOUNT: &str = "mount";
    pub const REMOTE_REGISTRY_GET: &str = "remote_registry_get";
    pub const NODE_READDIR: &str = "node_readdir";
    pub const STARGZ_HEADER_GET: &str = "stargz_header_get";
    pub const STARGZ_TOC_GET: &str = "stargz_toc_get";
    pub const READ_ON_DEMAND: &str = "read_on_demand";
    pub const ON_DEMAND_READ_ACCESS_COUNT: &str = "on_demand_read_access_count";
    pub const ON_DEMAND_REMOTE_REGISTRY_FETCH_COUNT: &str = "on_demand_remote_registry_fetch_count";
    pub const ON_DEMAND_BYTES_SERVED: &str = "on_demand_bytes_served";
    pub const ON_DEMAND_BYTES_FETCHED: &str = "on_demand_bytes_fetched";
    pub const BACKGROUND_FETCH_DOWNLOAD: &str = "background_fetch_download";
}

/// Go's latency buckets, in milliseconds and in microseconds.
const BUCKETS_MS: [f64; 15] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0,
];
const BUCKETS_US: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

fn histogram_ms() -> Histogram {
    Histogram::new(BUCKETS_MS)
}
fn histogram_us() -> Histogram {
    Histogram::new(BUCKETS_US)
}
/// Waits for the registry: from half a millisecond (a local registry) to a minute (a fetch
/// retried through a stalling registry).
fn histogram_wait() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    operation_type: &'static str,
    layer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LayerLabel {
    layer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadLabels {
    layer: String,
    cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabels {
    layer: String,
    purpose: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrepareLabels {
    snapshot: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// A counter under a name without `_total` (Go's `stargz_fs_operation_count`): exposed
/// untyped, see the module doc.
#[derive(Clone, Debug, Default)]
struct GoCounter(Counter);

impl prometheus_client::metrics::TypedMetric for GoCounter {
    const TYPE: MetricType = MetricType::Unknown;
}

impl EncodeMetric for GoCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0.get())
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Unknown
    }
}

/// Why a bytes fetch happened, for `stargz_fs_fetched_bytes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// The chunks a read waited for.
    OnDemand,
    /// Chunks fetched past a miss because they follow it in the blob.
    ReadAhead,
    /// The mount-time prefetch (up to the landmark or `prefetch_size`).
    Prefetch,
    /// The background fetch of the rest of the layer.
    Background,
}

impl Purpose {
    fn label(self) -> &'static str {
        match self {
            Purpose::OnDemand => "on_demand",
            Purpose::ReadAhead => "read_ahead",
            Purpose::Prefetch => "prefetch",
            Purpose::Background => "background",
        }
    }
    const ALL: [Purpose; 4] = [
        Purpose::OnDemand,
        Purpose::ReadAhead,
        Purpose::Prefetch,
        Purpose::Background,
    ];
}

/// What a mounted layer reports at scrape time (read from atomics it keeps anyway).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct LayerStats {
    /// Compressed bytes of the blob.
    pub size: u64,
    /// Compressed bytes fetched so far, by any path.
    pub fetched: u64,
    /// Compressed bytes the mount-time prefetch fetched.
    pub prefetched: u64,
    /// On-disk bytes of verified chunks in the cache, and evicted so far.
    pub cached: u64,
    pub evicted: u64,
    /// Whether the background fetcher is done with the layer (all fetched, or gave up).
    pub background_done: bool,
}

/// A mounted layer, as the scrape-time collector sees it.
pub(crate) trait LayerStatsSource: Send + Sync {
    fn layer_stats(&self) -> LayerStats;
}

/// The daemon's metrics. Cheap to share (`Arc`); every method is safe from any thread.
pub struct Metrics {
    registry: Registry,
    families: Arc<Families>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// A mounted layer's digest and stats, by mountpoint.
type MountedLayer = (String, Weak<dyn LayerStatsSource>);

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Debug)]
struct Families {
    ops_ms: HistogramFamily<OpLabels>,
    ops_us: HistogramFamily<OpLabels>,
    op_count: Family<OpLabels, GoCounter>,
    bytes_served: Family<OpLabels, Gauge>,
    fetch_wait: HistogramFamily<LayerLabel>,
    reads: Family<ReadLabels, Counter>,
    fetched: Family<FetchLabels, Counter>,
    prepares: Family<PrepareLabels, Counter>,
    restores: Family<OutcomeLabels, Counter>,
    /// Mounted layers by mountpoint, for the scrape-time collector.
    mounted: Mutex<HashMap<PathBuf, MountedLayer>>,
    /// Live [`LayerMetrics`] per layer digest: its series go when the count drops to 0.
    users: Mutex<HashMap<String, usize>>,
    budget: OnceLock<Arc<crate::fs::CacheBudget>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let families = Arc::new(Families {
            ops_ms: Family::new_with_constructor(histogram_ms),
            ops_us: Family::new_with_constructor(histogram_us),
            op_count: Family::default(),
            bytes_served: Family::default(),
            fetch_wait: Family::new_with_constructor(histogram_wait),
            reads: Family::default(),
            fetched: Family::default(),
            prepares: Family::default(),
            restores: Family::default(),
            mounted: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            budget: OnceLock::new(),
        });
        let mut registry = Registry::default();
        let f = &families;
        let stargz = registry.sub_registry_with_prefix("stargz");
        {
            let fs = stargz.sub_registry_with_prefix("fs");
            fs.register(
                "operation_duration_milliseconds",
                "Latency in milliseconds of stargz snapshotter operations. Broken down by operation type and layer sha",
                f.ops_ms.clone(),
            );
            fs.register(
                "operation_duration_microseconds",
                "Latency in microseconds of stargz snapshotter operations. Broken down by operation type and layer sha",
                f.ops_us.clone(),
            );
            fs.register(
                "operation_count",
                "The count of stargz snapshotter operations. Broken down by operation type and layer sha",
                f.op_count.clone(),
            );
            fs.register(
                "bytes_served",
                "The number of bytes served per stargz snapshotter operations. Broken down by operation type and layer sha",
                f.bytes_served.clone(),
            );
            fs.register_with_unit(
                "on_demand_fetch_wait",
                "Time reads waited for the registry, per wait (a read that found its chunks cached does not wait)",
                Unit::Seconds,
                f.fetch_wait.clone(),
            );
            fs.register(
                "reads",
                "File reads served through the daemon, by whether all their bytes were in the cache (hit) or had to be fetched or waited for (miss)",
                f.reads.clone(),
            );
            fs.register_with_unit(
                "fetched",
                "Compressed bytes fetched from the registry, by purpose: on_demand (chunks a read waited for), read_ahead (fetched past a miss), prefetch (at mount), background",
                Unit::Bytes,
                f.fetched.clone(),
            );
        }
        {
            let snap = stargz.sub_registry_with_prefix("snapshotter");
            snap.register(
                "prepares",
                "Prepare calls for image layers: snapshot=remote (mounted lazily) or fallback (containerd downloads it), with why it fell back",
                f.prepares.clone(),
            );
            snap.register(
                "restores",
                "Remote snapshots re-mounted at start-up, by outcome",
                f.restores.clone(),
            );
        }
        // (`register` ends each help text with a period.)
        registry.register_collector(Box::new(LayerCollector(families.clone())));
        registry.register_collector(Box::new(process::ProcessCollector));
        Metrics { registry, families }
    }

    /// The text exposition (Prometheus format 0.0.4, as Go's daemon serves).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Handles for the hot path of one layer; its series live while any handle does.
    pub(crate) fn layer(self: &Arc<Self>, digest: &str) -> LayerMetrics {
        let f = &self.families;
        let mut users = f.users.lock().unwrap_or_else(|e| e.into_inner());
        *users.entry(digest.to_string()).or_default() += 1;
        let op = |operation_type| OpLabels {
            operation_type,
            layer: digest.to_string(),
        };
        let fetched = |p: Purpose| {
            f.fetched.get_or_create_owned(&FetchLabels {
                layer: digest.to_string(),
                purpose: p.label(),
            })
        };
        let reads = |cache| {
            f.reads.get_or_create_owned(&ReadLabels {
                layer: digest.to_string(),
                cache,
            })
        };
        LayerMetrics {
            owner: self.clone(),
            digest: digest.to_string(),
            read_us: f.ops_us.get_or_create_owned(&op(op::READ_ON_DEMAND)),
            readdir_us: f.ops_us.get_or_create_owned(&op(op::NODE_READDIR)),
            registry_get_ms: f.ops_ms.get_or_create_owned(&op(op::REMOTE_REGISTRY_GET)),
            read_count: f
                .op_count
                .get_or_create_owned(&op(op::ON_DEMAND_READ_ACCESS_COUNT)),
            registry_fetches: f
                .op_count
                .get_or_create_owned(&op(op::ON_DEMAND_REMOTE_REGISTRY_FETCH_COUNT)),
            bytes_served: f
                .bytes_served
                .get_or_create_owned(&op(op::ON_DEMAND_BYTES_SERVED)),
            bytes_fetched: f
                .bytes_served
                .get_or_create_owned(&op(op::ON_DEMAND_BYTES_FETCHED)),
            fetch_wait: f.fetch_wait.get_or_create_owned(&LayerLabel {
                layer: digest.to_string(),
            }),
            hits: reads("hit"),
            misses: reads("miss"),
            fetched: Purpose::ALL.map(fetched),
            prefetched: AtomicU64::new(0),
            background_started: OnceLock::new(),
        }
    }

    /// Drops a layer's series once its last [`LayerMetrics`] is gone.
    fn release(&self, digest: &str) {
        let f = &self.families;
        let mut users = f.users.lock().unwrap_or_else(|e| e.into_inner());
        let Some(n) = users.get_mut(digest) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        users.remove(digest);
        let layer = digest.to_string();
        for operation_type in [
            op::MOUNT,
            op::REMOTE_REGISTRY_GET,
            op::STARGZ_HEADER_GET,
            op::STARGZ_TOC_GET,
            op::BACKGROUND_FETCH_DOWNLOAD,
        ] {
            f.ops_ms.remove(&OpLabels {
                operation_type,
                layer: layer.clone(),
            });
        }
        for operation_type in [op::READ_ON_DEMAND, op::NODE_READDIR] {
            f.ops_us.remove(&OpLabels {
                operation_type,
                layer: layer.clone(),
            });
        }
        for operation_type in [
            op::ON_DEMAND_READ_ACCESS_COUNT,
            op::ON_DEMAND_REMOTE_REGISTRY_FETCH_COUNT,
        ] {
            f.op_count.remove(&OpLabels {
                operation_type,
                layer: layer.clone(),
            });
        }
        for operation_type in [op::ON_DEMAND_BYTES_SERVED, op::ON_DEMAND_BYTES_FETCHED] {
            f.bytes_served.remove(&OpLabels {
                operation_type,
                layer: layer.clone(),
            });
        }
        f.fetch_wait.remove(&LayerLabel {
            layer: layer.clone(),
        });
        for cache in ["hit", "miss"] {
            f.reads.remove(&ReadLabels {
                layer: layer.clone(),
                cache,
            });
        }
        for p in Purpose::ALL {
            f.fetched.remove(&FetchLabels {
                layer: layer.clone(),
                purpose: p.label(),
            });
        }
    }

    /// Observes a layer operation that is not on the read path, in milliseconds (Go's
    /// `MeasureLatencyInMilliseconds`).
    pub(crate) fn observe_ms(&self, operation_type: &'static str, layer: &str, took: Duration) {
        self.families
            .ops_ms
            .get_or_create(&OpLabels {
                operation_type,
                layer: layer.to_string(),
            })
            .observe(took.as_secs_f64() * 1e3);
    }

    /// A layer mounted at `mountpoint`: reported per mount at scrape time until
    /// [`Self::unmounted`] (or until it is dropped).
    pub(crate) fn mounted(
        &self,
        mountpoint: &Path,
        digest: &str,
        layer: Weak<dyn LayerStatsSource>,
    ) {
        self.families
            .mounted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(mountpoint.to_path_buf(), (digest.to_string(), layer));
    }

    pub(crate) fn unmounted(&self, mountpoint: &Path) {
        self.families
            .mounted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(mountpoint);
    }

    /// The cache's byte budget, reported as `stargz_fs_cache_budget_bytes` and
    /// `stargz_fs_cache_used_bytes`.
    pub(crate) fn set_budget(&self, budget: Arc<crate::fs::CacheBudget>) {
        let _ = self.families.budget.set(budget);
    }

    /// A Prepare of an image layer mounted lazily.
    pub(crate) fn prepared_remote(&self) {
        self.families
            .prepares
            .get_or_create(&PrepareLabels {
                snapshot: "remote",
                reason: "",
            })
            .inc();
    }

    /// A Prepare of an image layer that falls back to containerd's download, and why.
    pub(crate) fn prepared_fallback(&self, reason: &'static str) {
        self.families
            .prepares
            .get_or_create(&PrepareLabels {
                snapshot: "fallback",
                reason,
            })
            .inc();
    }

    /// A remote snapshot re-mounted at start-up (`ok`) or left unavailable.
    pub(crate) fn restored(&self, ok: bool) {
        self.families
            .restores
            .get_or_create(&OutcomeLabels {
                outcome: if ok { "remounted" } else { "failed" },
            })
            .inc();
    }
}

/// One layer's hot-path handles: each is an atomic or a histogram of this layer alone.
pub(crate) struct LayerMetrics {
    owner: Arc<Metrics>,
    digest: String,
    read_us: Histogram,
    readdir_us: Histogram,
    registry_get_ms: Histogram,
    read_count: GoCounter,
    registry_fetches: GoCounter,
    bytes_served: Gauge,
    bytes_fetched: Gauge,
    fetch_wait: Histogram,
    hits: Counter,
    misses: Counter,
    /// Indexed by [`Purpose`] (`purpose as usize`, the order of [`Purpose::ALL`]).
    fetched: [Counter; 4],
    prefetched: AtomicU64,
    background_started: OnceLock<Instant>,
}

impl std::fmt::Debug for LayerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerMetrics")
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl Drop for LayerMetrics {
    fn drop(&mut self) {
        self.owner.release(&self.digest);
    }
}

/// Saturating: a byte count never wraps a gauge negative.
fn gauge_add(g: &Gauge, bytes: u64) {
    g.inc_by(i64::try_from(bytes).unwrap_or(i64::MAX));
}

impl LayerMetrics {
    /// A file read served through the daemon: `bytes` returned after `took`, `hit` when no
    /// byte of it had to come from the registry.
    pub(crate) fn read(&self, bytes: usize, took: Duration, hit: bool) {
        self.read_count.0.inc();
        self.read_us.observe(took.as_secs_f64() * 1e6);
        gauge_add(&self.bytes_served, bytes as u64);
        if hit {
            self.hits.inc();
        } else {
            self.misses.inc();
        }
    }

    /// A read waited `took` for chunks to arrive from the registry.
    pub(crate) fn waited(&self, took: Duration) {
        self.fetch_wait.observe(took.as_secs_f64());
    }

    pub(crate) fn readdir(&self, took: Duration) {
        self.readdir_us.observe(took.as_secs_f64() * 1e6);
    }

    /// One registry request of `took` that brought `bytes` for `purpose` and `ahead` more as
    /// read-ahead (on-demand requests only).
    pub(crate) fn fetched(&self, purpose: Purpose, bytes: u64, ahead: u64, took: Duration) {
        self.registry_get_ms.observe(took.as_secs_f64() * 1e3);
        self.fetched[purpose as usize].inc_by(bytes);
        if ahead > 0 {
            self.fetched[Purpose::ReadAhead as usize].inc_by(ahead);
        }
        match purpose {
            Purpose::OnDemand => {
                self.registry_fetches.0.inc();
                gauge_add(&self.bytes_fetched, bytes + ahead);
            }
            Purpose::Prefetch => {
                self.prefetched.fetch_add(bytes, Ordering::Relaxed);
            }
            Purpose::ReadAhead | Purpose::Background => {}
        }
    }

    /// Compressed bytes the mount-time prefetch brought.
    pub(crate) fn prefetched(&self) -> u64 {
        self.prefetched.load(Ordering::Relaxed)
    }

    /// The background fetch of this layer started (first call) or ended (`done`): Go's
    /// `background_fetch_download` is the time between the two.
    pub(crate) fn background(&self, done: bool) {
        let started = *self.background_started.get_or_init(Instant::now);
        if done {
            self.owner.observe_ms(
                op::BACKGROUND_FETCH_DOWNLOAD,
                &self.digest,
                started.elapsed(),
            );
        }
    }
}

/// Go's per-mount layer metrics and ours, read from the mounted layers at scrape time.
#[derive(Debug)]
struct LayerCollector(Arc<Families>);

/// A metric whose values are computed at scrape time.
struct PerMount<'a> {
    name: &'a str,
    help: &'a str,
    unit: Option<Unit>,
    kind: MetricType,
    value: fn(&LayerStats) -> u64,
}

impl Collector for LayerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let layers: Vec<(PathBuf, String, LayerStats)> = {
            let mut mounted = self.0.mounted.lock().unwrap_or_else(|e| e.into_inner());
            mounted.retain(|_, (_, l)| l.strong_count() > 0);
            mounted
                .iter()
                .filter_map(|(mp, (digest, l))| {
                    l.upgrade()
                        .map(|l| (mp.clone(), digest.clone(), l.layer_stats()))
                })
                .collect()
        };
        // Go's three are counters without `_total`: untyped, like `operation_count`.
        let metrics = [
            PerMount {
                name: "stargz_fs_layer_fetched_size",
                help: "Total fetched size of the layer",
                unit: Some(Unit::Bytes),
                kind: MetricType::Unknown,
                value: |s| s.fetched,
            },
            PerMount {
                name: "stargz_fs_layer_prefetch_size",
                help: "Total prefetched size of the layer",
                unit: Some(Unit::Bytes),
                kind: MetricType::Unknown,
                value: |s| s.prefetched,
            },
            PerMount {
                name: "stargz_fs_layer_size",
                help: "Total size of the layer",
                unit: Some(Unit::Bytes),
                kind: MetricType::Unknown,
                value: |s| s.size,
            },
            PerMount {
                name: "stargz_fs_layer_cached",
                help: "On-disk bytes of the layer's verified file data in the cache",
                unit: Some(Unit::Bytes),
                kind: MetricType::Gauge,
                value: |s| s.cached,
            },
            PerMount {
                name: "stargz_fs_layer_evicted",
                help: "Bytes of the layer's file data evicted from the cache to stay within its byte budget",
                unit: Some(Unit::Bytes),
                kind: MetricType::Counter,
                value: |s| s.evicted,
            },
            PerMount {
                name: "stargz_fs_layer_background_fetch_done",
                help: "1 once the background fetch is done with the layer (all of it cached, or given up), else 0",
                unit: None,
                kind: MetricType::Gauge,
                value: |s| u64::from(s.background_done),
            },
        ];
        for m in &metrics {
            if layers.is_empty() {
                break;
            }
            let mut family = encoder.encode_descriptor(m.name, m.help, m.unit.as_ref(), m.kind)?;
            for (mountpoint, digest, stats) in &layers {
                let labels = [
                    ("digest", digest.as_str()),
                    ("mountpoint", mountpoint.to_str().unwrap_or("")),
                ];
                let value = (m.value)(stats);
                let e = family.encode_family(&labels)?;
                match m.kind {
                    MetricType::Counter => {
                        prometheus_client::metrics::counter::ConstCounter::new(value).encode(e)?
                    }
                    _ => ConstGauge::new(value).encode(e)?,
                }
            }
        }
        if let Some(b) = self.0.budget.get() {
            for (name, help, v) in [
                (
                    "stargz_fs_cache_budget",
                    "The cache's byte budget ([directory_cache] max_bytes)",
                    b.max_bytes(),
                ),
                (
                    "stargz_fs_cache_used",
                    "On-disk bytes of file data in the cache, all layers",
                    b.used_bytes(),
                ),
            ] {
                let e =
                    encoder.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Gauge)?;
                ConstGauge::new(v).encode(e)?;
            }
        }
        Ok(())
    }
}

/// A short, bounded reason (a label value) for a layer that could not be mounted lazily.
pub(crate) fn fallback_reason(e: &(dyn std::error::Error + 'static)) -> &'static str {
    use crate::fs::FsError;
    match e.downcast_ref::<FsError>() {
        Some(FsError::Labels(_)) => "labels",
        Some(FsError::Toc(_)) => "toc",
        Some(FsError::Source(_)) => "registry",
        Some(FsError::Cache(_)) => "cache",
        Some(FsError::Mount { .. }) => "mount",
        Some(FsError::TooLarge(_)) => "too_large",
        Some(FsError::Chunk(_) | FsError::NotFound(_)) | None => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(LayerStats);
    impl LayerStatsSource for Fixed {
        fn layer_stats(&self) -> LayerStats {
            self.0
        }
    }

    fn lines<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(name)).collect()
    }

    #[test]
    fn go_series_keep_go_names_and_labels() {
        let m = Arc::new(Metrics::new());
        let l = m.layer("sha256:aa");
        l.read(100, Duration::from_micros(3), true);
        l.read(50, Duration::from_micros(300), false);
        l.fetched(Purpose::OnDemand, 10, 90, Duration::from_millis(20));
        l.fetched(Purpose::Prefetch, 7, 0, Duration::from_millis(5));
        m.observe_ms(op::MOUNT, "sha256:aa", Duration::from_millis(30));
        let stats = Arc::new(Fixed(LayerStats {
            size: 1000,
            fetched: 117,
            prefetched: l.prefetched(),
            cached: 4096,
            evicted: 0,
            background_done: false,
        }));
        let weak: Weak<dyn LayerStatsSource> =
            Arc::downgrade(&(stats.clone() as Arc<dyn LayerStatsSource>));
        m.mounted(Path::new("/mnt/1/fs"), "sha256:aa", weak);
        m.prepared_remote();
        m.prepared_fallback("toc");
        let text = m.encode();
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        has(
            r#"stargz_fs_operation_count{operation_type="on_demand_read_access_count",layer="sha256:aa"} 2"#,
        );
        has(
            r#"stargz_fs_operation_count{operation_type="on_demand_remote_registry_fetch_count",layer="sha256:aa"} 1"#,
        );
        has(
            r#"stargz_fs_bytes_served{operation_type="on_demand_bytes_served",layer="sha256:aa"} 150"#,
        );
        has(
            r#"stargz_fs_bytes_served{operation_type="on_demand_bytes_fetched",layer="sha256:aa"} 100"#,
        );
        has(
            r#"stargz_fs_operation_duration_microseconds_count{operation_type="read_on_demand",layer="sha256:aa"} 2"#,
        );
        has(
            r#"stargz_fs_operation_duration_milliseconds_bucket{operation_type="mount",layer="sha256:aa",le="32"} 1"#,
        );
        has(r#"stargz_fs_layer_fetched_size_bytes{digest="sha256:aa",mountpoint="/mnt/1/fs"} 117"#);
        has(r#"stargz_fs_layer_prefetch_size_bytes{digest="sha256:aa",mountpoint="/mnt/1/fs"} 7"#);
        has(r#"stargz_fs_layer_size_bytes{digest="sha256:aa",mountpoint="/mnt/1/fs"} 1000"#);
        has(r#"stargz_fs_reads_total{layer="sha256:aa",cache="hit"} 1"#);
        has(r#"stargz_fs_fetched_bytes_total{layer="sha256:aa",purpose="read_ahead"} 90"#);
        has(r#"stargz_snapshotter_prepares_total{snapshot="fallback",reason="toc"} 1"#);
        has("# TYPE stargz_fs_operation_count untyped");
        has("# HELP stargz_fs_operation_count The count of stargz snapshotter operations. Broken down by operation type and layer sha.");
        assert!(!text.contains("operation_count_total"), "{text}");
        assert_eq!(
            lines(&text, "process_resident_memory_bytes ").len(),
            1,
            "{text}"
        );

        // The mount goes, then the last handle: the layer's series go with them.
        drop(stats);
        drop(l);
        let text = m.encode();
        assert!(
            !text.contains("sha256:aa\""),
            "series of a released layer stay:\n{text}"
        );
        assert!(
            text.contains(r#"stargz_snapshotter_prepares_total{snapshot="remote",reason=""} 1"#)
        );
    }

    #[test]
    fn a_layer_mounted_twice_keeps_its_series_until_both_go() {
        let m = Arc::new(Metrics::new());
        let a = m.layer("sha256:bb");
        let b = m.layer("sha256:bb");
        a.read(1, Duration::ZERO, true);
        drop(a);
        assert!(m.encode().contains(r#"cache="hit"} 1"#));
        drop(b);
        assert!(!m.encode().contains("sha256:bb"));
    }

    #[test]
    fn fallback_reasons_are_a_small_fixed_set() {
        let e = crate::fs::FsError::Labels("no TOC digest".into());
        assert_eq!(fallback_reason(&e), "labels");
        let io = std::io::Error::other("x");
        assert_eq!(fallback_reason(&io), "other");
    }
}
