//! Background fetch of whole layers after mount, shared by every layer of the daemon.
//!
//! A fixed pool of `max_concurrency` threads takes turns over the registered layers, one
//! bounded span at a time, so memory and threads stay constant however many layers are
//! mounted (Go spawned unbounded work here). Workers hold back while any on-demand read waits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use super::reader::{BgStep, LayerReader, Priority};

/// Compressed bytes fetched per background step: an on-demand miss that arrives mid-step
/// shares the link with at most this much (~80 ms at 100 Mbit).
pub const DEFAULT_SPAN_BYTES: u64 = 1 << 20;

struct Shared {
    layers: Mutex<(Vec<Weak<LayerReader>>, usize)>,
    wake: Condvar,
    stop: AtomicBool,
    priority: Arc<Priority>,
    span_bytes: u64,
}

/// The daemon-wide background fetcher; dropping it stops its workers.
pub struct BackgroundFetcher {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for BackgroundFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundFetcher")
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl BackgroundFetcher {
    /// Starts `max_concurrency` (at least 1) workers.
    pub fn new(max_concurrency: usize, priority: Arc<Priority>, span_bytes: u64) -> Self {
        let shared = Arc::new(Shared {
            layers: Mutex::new((Vec::new(), 0)),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            priority,
            span_bytes: span_bytes.max(1),
        });
        let workers = (0..max_concurrency.max(1))
            .filter_map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("stargz-bg-{i}"))
                    .spawn(move || worker(&s))
                    .ok()
            })
            .collect();
        BackgroundFetcher { shared, workers }
    }

    /// Queues a layer; it is dropped from the queue when done or when the layer goes away.
    pub fn add(&self, layer: &Arc<LayerReader>) {
        let mut l = self.shared.layers.lock().unwrap_or_else(|e| e.into_inner());
        l.0.push(Arc::downgrade(layer));
        self.shared.wake.notify_all();
    }
}

impl Drop for BackgroundFetcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Next layer with work, round robin; forgets finished and dropped layers.
fn next_layer(s: &Shared) -> Option<Arc<LayerReader>> {
    let mut guard = s.layers.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if s.stop.load(Ordering::SeqCst) {
            return None;
        }
        let (layers, next) = &mut *guard;
        layers.retain(|w| w.upgrade().is_some_and(|l| !l.background_finished()));
        if !layers.is_empty() {
            *next %= layers.len();
            let l = layers[*next].upgrade();
            *next += 1;
            if l.is_some() {
                return l;
            }
            continue;
        }
        guard = s
            .wake
            .wait_timeout(guard, Duration::from_secs(1))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn worker(s: &Shared) {
    while let Some(layer) = next_layer(s) {
        while s.priority.busy() && !s.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if layer.background_step(s.span_bytes) == BgStep::Failed {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
