//! The byte budget of the on-disk cache, shared by every mounted layer of a daemon.
//!
//! Each layer charges the budget for every chunk that becomes present (fetched or re-verified
//! from an earlier run) and refunds it when chunks are evicted or the layer goes away. When a
//! charge takes the total past the budget, the charging thread evicts whole cache files, least
//! recently read first, across all layers, until the total is back under 90% of the budget
//! (so eviction runs in bursts, not on every chunk). Evicted data is simply fetched again.
//!
//! What is never evicted, so that no reader can see a hole where data was (see
//! `LayerReader::evict_file`): a file a read is in progress on (it is pinned for the read), a
//! file open through FUSE passthrough (the kernel reads the cache file directly), chunks
//! being fetched, and the files of a layer with a native tree (`fs::native`; when nothing else
//! is left to evict, a tree that no mount uses is given up and its files evicted). When
//! everything over the budget is in use, the cache stays over it until it is not; in-flight
//! chunks are not counted until they are verified.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use super::native::HANDOUT_GRACE;
use super::reader::LayerReader;

/// Fraction of the budget (in percent) an eviction pass brings the total down to.
const LOW_WATER_PERCENT: u64 = 90;

/// Shared accounting of the cache's bytes; see the module doc.
#[derive(Debug)]
pub struct CacheBudget {
    max: u64,
    used: AtomicU64,
    evicted: AtomicU64,
    layers: Mutex<Vec<Weak<LayerReader>>>,
    /// Held by the one thread running an eviction pass; others do not queue behind it.
    evicting: Mutex<()>,
    start: Instant,
}

impl CacheBudget {
    /// A budget of `max_bytes` (on-disk bytes of decompressed data, all layers together).
    pub fn new(max_bytes: u64) -> Arc<Self> {
        Arc::new(CacheBudget {
            max: max_bytes,
            used: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            layers: Mutex::new(Vec::new()),
            evicting: Mutex::new(()),
            start: Instant::now(),
        })
    }

    /// The budget itself.
    pub fn max_bytes(&self) -> u64 {
        self.max
    }

    /// Bytes of verified data in the cache now.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Bytes evicted so far.
    pub fn evicted_bytes(&self) -> u64 {
        self.evicted.load(Ordering::SeqCst)
    }

    /// Seconds since the budget was made: the clock of the layers' last-read times.
    pub(crate) fn now(&self) -> u32 {
        u32::try_from(self.start.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// Makes `reader`'s files candidates for eviction.
    pub(crate) fn register(&self, reader: &Arc<LayerReader>) {
        let mut layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        layers.retain(|l| l.strong_count() > 0);
        layers.push(Arc::downgrade(reader));
    }

    /// Accounts `bytes` of newly present data; evicts when that takes the total over budget.
    pub(crate) fn charge(&self, bytes: u64) {
        let used = self
            .used
            .fetch_add(bytes, Ordering::SeqCst)
            .saturating_add(bytes);
        if used > self.max {
            self.enforce();
        }
    }

    /// Accounts `bytes` that left the cache (evicted, or their layer went away).
    pub(crate) fn refund(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    /// One eviction pass (unless another thread is running one): least recently read files
    /// first, until the total is under the low-water mark or nothing more can go.
    fn enforce(&self) {
        let Ok(_pass) = self.evicting.try_lock() else {
            return;
        };
        let layers: Vec<Arc<LayerReader>> = {
            let layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
            layers.iter().filter_map(Weak::upgrade).collect()
        };
        let mut candidates: Vec<(u32, usize, usize)> = Vec::new();
        for (l, layer) in layers.iter().enumerate() {
            layer.eviction_candidates(|atime, node| candidates.push((atime, l, node)));
        }
        candidates.sort_unstable();
        let low = self.max / 100 * LOW_WATER_PERCENT;
        let mut freed = 0;
        let mut evict = |layer: &LayerReader, node: usize| {
            let bytes = layer.evict_file(node);
            self.refund(bytes);
            self.evicted.fetch_add(bytes, Ordering::SeqCst);
            freed += bytes;
        };
        for (_, l, node) in candidates {
            if self.used_bytes() <= low {
                break;
            }
            evict(&layers[l], node);
        }
        // Still over: the layers with a native tree (all pinned) give it up, unless a mount
        // uses it, and lose their files like the others.
        for layer in &layers {
            if self.used_bytes() <= low {
                break;
            }
            if !layer.retire_native(HANDOUT_GRACE) {
                continue;
            }
            let mut files = Vec::new();
            layer.eviction_candidates(|atime, node| files.push((atime, node)));
            files.sort_unstable();
            for (_, node) in files {
                if self.used_bytes() <= low {
                    break;
                }
                evict(layer, node);
            }
        }
        if self.used_bytes() > self.max {
            tracing::warn!(
                used = self.used_bytes(),
                budget = self.max,
                "cache over its budget: the rest is in use (open or being read)"
            );
        }
        tracing::debug!(
            freed,
            used = self.used_bytes(),
            budget = self.max,
            "cache eviction pass"
        );
    }
}

/// On-disk bytes a chunk of `len` bytes takes, as the budget counts them (whole 4 KiB blocks).
pub(crate) fn disk_bytes(len: u64) -> u64 {
    len.div_ceil(4096).saturating_mul(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounting_saturates_and_rounds_to_blocks() {
        let b = CacheBudget::new(1 << 20);
        b.charge(disk_bytes(1));
        assert_eq!(b.used_bytes(), 4096);
        b.refund(10_000);
        assert_eq!(b.used_bytes(), 0, "refunds never go below zero");
        assert_eq!(disk_bytes(8192), 8192);
        assert_eq!(disk_bytes(0), 0);
    }
}
