//! Blobs located, and their TOCs fetched, before containerd asks to mount them.
//!
//! containerd prepares an image's layers one after another, and every lazy mount starts with
//! round trips to the registry: locating the blob, then its footer and TOC. On a link with a
//! long round trip and TCP slow start on each new connection these dominate a start with an
//! optimized image (1 Gbit / 50 ms: 0.3–0.5 s per layer, one layer after the other). The labels
//! of the first layer name the layers that follow (`stargz.layers`, or CRI's
//! `cri.image-layers`), so their round trips can run while the first layer mounts, and the
//! later mounts find everything they need at hand — as Go's daemon pre-resolves the same
//! neighbours.
//!
//! What is held is unverified registry data: the mount that claims it checks the TOC against
//! its own label's digest before anything is served. Holding is bounded three ways: entries
//! ([`MAX_ENTRIES`]), bytes of all entries together ([`MAX_HELD_BYTES`]; past it an entry keeps
//! the blob's location and drops its bytes) and time (`resolve_result_entry_ttl_sec`, after which
//! an unclaimed entry is dropped).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::estargz::TocLocator;
use crate::remote::{Blob, BlobTail, Reference, RegistryClient, RemoteError};

/// The most blobs resolved ahead and not yet claimed, all images together.
pub(crate) const MAX_ENTRIES: usize = 16;
/// The most bytes (tails and TOCs) held by unclaimed entries together.
pub(crate) const MAX_HELD_BYTES: u64 = 16 << 20;
/// Go's default for `resolve_result_entry_ttl_sec`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(120);
/// A resolution ahead that takes longer is abandoned (its mount resolves afresh). Locating and
/// fetching have their own request timeouts; this bounds the whole.
const DEADLINE: Duration = Duration::from_secs(60);

/// A blob located ahead of its mount, with the blob's tail from its TOC member on when that fit.
pub(crate) struct Resolved {
    pub(crate) blob: Blob,
    pub(crate) tail: Option<BlobTail>,
    _held: Held,
}

/// Bytes counted against [`MAX_HELD_BYTES`] until dropped.
struct Held {
    bytes: u64,
    total: Arc<AtomicU64>,
}

impl Held {
    /// Reserves `bytes` if they fit under [`MAX_HELD_BYTES`].
    fn reserve(total: &Arc<AtomicU64>, bytes: u64) -> Option<Held> {
        total
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                held.checked_add(bytes).filter(|&t| t <= MAX_HELD_BYTES)
            })
            .ok()?;
        Some(Held {
            bytes,
            total: total.clone(),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

type Key = (String, String);

#[derive(Default)]
struct State {
    entries: HashMap<Key, Entry>,
    /// Blobs a mount resolved (or claimed) within the TTL: not resolved ahead again, as when a
    /// restore mounts an image's layers in parallel and in no particular order.
    mounted: HashMap<Key, Instant>,
}

impl State {
    fn forget_mounts_older_than(&mut self, ttl: Duration) {
        self.mounted.retain(|_, at| at.elapsed() < ttl);
    }
}

struct Entry {
    id: u64,
    result: oneshot::Receiver<Resolved>,
}

/// The blobs being resolved, or resolved, ahead of their mounts.
pub(crate) struct Ahead {
    ttl: Duration,
    state: Mutex<State>,
    held: Arc<AtomicU64>,
    next_id: AtomicU64,
}

impl Ahead {
    pub(crate) fn new(ttl: Duration) -> Arc<Self> {
        Arc::new(Ahead {
            ttl,
            state: Mutex::new(State::default()),
            held: Arc::new(AtomicU64::new(0)),
            next_id: AtomicU64::new(0),
        })
    }

    /// Starts resolving `digests` of `reference` on `handle`, each unless already under way or
    /// held, while there is room. `tail` is how many bytes from the blob's end the locating
    /// request asks for (see [`RegistryClient::locate_blob_with_tail`]).
    pub(crate) fn start(
        self: &Arc<Self>,
        handle: &tokio::runtime::Handle,
        client: &RegistryClient,
        reference: &Reference,
        digests: &[&str],
        tail: u64,
    ) {
        let key_ref = reference.to_string();
        for &digest in digests {
            let key = (key_ref.clone(), digest.to_owned());
            let (id, tx) = {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                state.forget_mounts_older_than(self.ttl);
                if state.entries.len() >= MAX_ENTRIES
                    || state.entries.contains_key(&key)
                    || state.mounted.contains_key(&key)
                {
                    continue;
                }
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                state.entries.insert(key.clone(), Entry { id, result: rx });
                (id, tx)
            };
            let (ahead, client, reference) = (self.clone(), client.clone(), reference.clone());
            handle.spawn(async move {
                let work = resolve(&client, &reference, &key.1, tail, &ahead.held);
                match tokio::time::timeout(DEADLINE, work).await {
                    Ok(Ok(resolved)) => {
                        tracing::debug!(layer = %key.1, tail = resolved.tail.as_ref().map_or(0, |t| t.bytes.len()), "blob resolved ahead of its mount");
                        // A receiver gone (claimed and abandoned) just drops the result.
                        let _ = tx.send(resolved);
                    }
                    // The mount that claims it resolves afresh and reports the error itself.
                    Ok(Err(e)) => {
                        tracing::debug!(layer = %key.1, error = %crate::untrusted::chain(&e), "resolving ahead failed")
                    }
                    Err(_) => tracing::debug!(layer = %key.1, "resolving ahead timed out"),
                }
                tokio::time::sleep(ahead.ttl).await;
                ahead.expire(&key, id);
            });
        }
    }

    /// The resolution of `digest` under way or done, removed from the table: the caller, its
    /// mount, waits on it (an error from the receiver when it failed). Either way the blob is
    /// noted as mounted, so that it is not resolved ahead again within the TTL.
    pub(crate) fn take(
        &self,
        reference: &Reference,
        digest: &str,
    ) -> Option<oneshot::Receiver<Resolved>> {
        let key = (reference.to_string(), digest.to_owned());
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.forget_mounts_older_than(self.ttl);
        let entry = state.entries.remove(&key);
        state.mounted.insert(key, Instant::now());
        entry.map(|e| e.result)
    }

    /// Drops entry `id` of `key` if no mount claimed it in time.
    fn expire(&self, key: &Key, id: u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.entries.get(key).is_some_and(|e| e.id == id) {
            state.entries.remove(key);
            tracing::debug!(layer = %key.1, "blob resolved ahead was not mounted in time; dropped");
        }
    }
}

/// Locates the blob with its last `tail` bytes, then extends the tail back to the start of the
/// TOC member the footer points at, so that the mount needs no request to open the layer. A
/// footer that does not parse is left for the mount to report (only the location is kept);
/// bytes that do not fit under [`MAX_HELD_BYTES`] are not fetched (or dropped), and the mount
/// fetches them itself.
async fn resolve(
    client: &RegistryClient,
    reference: &Reference,
    digest: &str,
    tail: u64,
    held: &Arc<AtomicU64>,
) -> Result<Resolved, RemoteError> {
    let (blob, tail) = Blob::open_with_tail(client, reference, digest, tail).await?;
    let none = |blob| Resolved {
        blob,
        tail: None,
        _held: Held {
            bytes: 0,
            total: held.clone(),
        },
    };
    let Some(tail) = tail else {
        return Ok(none(blob));
    };
    let locator = TocLocator::new(blob.size());
    let footer = locator.footer_range();
    let toc_start = footer
        .start
        .checked_sub(tail.offset)
        .and_then(|from| tail.bytes.get(usize::try_from(from).ok()?..))
        .and_then(|f| locator.locate(f).ok())
        .map(|(_, range)| range.start);
    // Not an eStargz footer: the mount will say so; nothing is worth holding for it.
    let Some(start) = toc_start else {
        return Ok(none(blob));
    };
    // From the TOC member on: what the mount reads, and no chunk data it would not.
    let Some(reserved) = Held::reserve(held, blob.size().saturating_sub(start)) else {
        return Ok(none(blob));
    };
    let mut tail = tail;
    if let Some(skip) = start.checked_sub(tail.offset) {
        let skip = usize::try_from(skip)
            .unwrap_or(usize::MAX)
            .min(tail.bytes.len());
        tail.bytes.drain(..skip);
        tail.offset = start;
        return Ok(Resolved {
            blob,
            tail: Some(tail),
            _held: reserved,
        });
    }
    let missing = usize::try_from(tail.offset - start)
        .map_err(|_| RemoteError::Protocol("TOC member too large".into()))?;
    let mut bytes = Vec::with_capacity(missing + tail.bytes.len());
    blob.fetch_range_into(start..tail.offset, &mut bytes)
        .await?;
    bytes.extend_from_slice(&tail.bytes);
    Ok(Resolved {
        blob,
        tail: Some(BlobTail {
            offset: start,
            bytes,
        }),
        _held: reserved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_bytes_stay_under_the_limit_and_are_given_back() {
        let total = Arc::new(AtomicU64::new(0));
        let a = Held::reserve(&total, MAX_HELD_BYTES - 10).expect("fits");
        assert!(Held::reserve(&total, 11).is_none(), "over the limit");
        assert!(Held::reserve(&total, u64::MAX).is_none(), "no overflow");
        let b = Held::reserve(&total, 10).expect("exactly the limit");
        assert_eq!(total.load(Ordering::SeqCst), MAX_HELD_BYTES);
        drop(a);
        drop(b);
        assert_eq!(total.load(Ordering::SeqCst), 0);
        assert!(Held::reserve(&total, MAX_HELD_BYTES).is_some());
    }
}
