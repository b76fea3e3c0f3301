//! Chunk state of one layer: which chunks are in the cache, which are being fetched, and who
//! waits for them. Kept apart from the reader that uses it (as nydus keeps its chunk map apart
//! from its cache), so its rules are tested without FUSE, a registry or root.
//!
//! Rules:
//! - a chunk is *present* once its bytes are in the cache file and verified; the bit clears
//!   only when the chunk is evicted ([`ChunkMap::evict`]), never while it is being fetched;
//! - a missing chunk is fetched by at most one claim at a time; a claim covers a run of chunks
//!   (one range request), and a reader of any of them waits on the claim's [`Flight`] only until
//!   its own chunk is present (a claim reports each chunk as it lands), not for the whole run;
//! - every wait has a deadline, every claim ends with an outcome that all its waiters see (a
//!   failure fails them at once; the next read claims again), and a claim dropped without one —
//!   a fetch that panicked — wakes its waiters with an error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::bits::Bits;
use super::FsError;
use crate::cache::Committed;

/// Present bits and in-flight claims of a layer's chunks (numbered `0..len`, in blob order).
pub(crate) struct ChunkMap {
    present: Bits,
    present_count: AtomicUsize,
    len: usize,
    inflight: Mutex<HashMap<usize, Arc<Flight>>>,
}

/// What a claim's rule says of the next chunk in blob order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Claim it (a missing chunk) and go on.
    Join,
    /// Leave it out and go on (the claim's request skips its bytes).
    Skip,
    /// The claim ends before it.
    Stop,
}

/// What a reader finds for a chunk it needs.
pub(crate) enum Found {
    Present,
    /// Someone else fetches it: wait on this.
    InFlight(Arc<Flight>),
    /// Ours to fetch.
    Claimed(Claim),
}

impl ChunkMap {
    pub(crate) fn new(len: usize) -> Self {
        ChunkMap {
            present: Bits::new(len),
            present_count: AtomicUsize::new(0),
            len,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn is_present(&self, seq: usize) -> bool {
        self.present.get(seq)
    }

    /// Marks `seq` present; true when it was not before. The proof that its bytes were
    /// verified and committed to the cache is the only way in.
    pub(crate) fn set_present(&self, seq: usize, _proof: Committed) -> bool {
        let new = self.present.set(seq);
        if new {
            self.present_count.fetch_add(1, Ordering::SeqCst);
        }
        new
    }

    /// Evicts the present chunks among `seqs` that are not being fetched: clears each one's bit
    /// and runs `drop_bytes(seq)` (which removes its bytes from the cache) while no claim can
    /// start. Returns the chunks evicted. Readers must be kept off these chunks by the caller
    /// (a reader that checked a bit before it cleared would read the dropped bytes).
    pub(crate) fn evict(&self, seqs: &[usize], mut drop_bytes: impl FnMut(usize)) -> Vec<usize> {
        let inflight = self.lock();
        let mut evicted = Vec::new();
        for &seq in seqs {
            if !inflight.contains_key(&seq) && self.clear_present(seq) {
                drop_bytes(seq);
                evicted.push(seq);
            }
        }
        evicted
    }

    fn clear_present(&self, seq: usize) -> bool {
        let was = self.present.take(seq);
        if was {
            self.present_count.fetch_sub(1, Ordering::SeqCst);
        }
        was
    }

    pub(crate) fn present_count(&self) -> usize {
        self.present_count.load(Ordering::SeqCst)
    }

    pub(crate) fn all_present(&self) -> bool {
        self.present_count() == self.len
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<usize, Arc<Flight>>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// For a reader that needs `seq`: present, someone's flight to wait on, or a new claim of
    /// `seq` extended by `extend` (see [`ChunkMap::claim_locked`]).
    pub(crate) fn find(
        self: &Arc<Self>,
        seq: usize,
        extend: impl FnMut(usize, bool) -> Step,
    ) -> Found {
        let mut inflight = self.lock();
        if self.is_present(seq) {
            return Found::Present;
        }
        if let Some(f) = inflight.get(&seq) {
            return Found::InFlight(f.clone());
        }
        Found::Claimed(self.claim_locked(&mut inflight, seq, extend))
    }

    /// For background work: a claim of `seq` (extended as in [`ChunkMap::find`]) unless it is
    /// present or being fetched.
    pub(crate) fn try_claim(
        self: &Arc<Self>,
        seq: usize,
        extend: impl FnMut(usize, bool) -> Step,
    ) -> Option<Claim> {
        let mut inflight = self.lock();
        if seq >= self.len || self.is_present(seq) || inflight.contains_key(&seq) {
            return None;
        }
        Some(self.claim_locked(&mut inflight, seq, extend))
    }

    /// True when `seq` is neither present nor claimed (a background scan skips the others).
    pub(crate) fn is_missing(&self, seq: usize) -> bool {
        !self.is_present(seq) && !self.lock().contains_key(&seq)
    }

    /// Claims `seq` and then, in blob order, the following chunks `extend(next, present)` joins,
    /// passing over those it skips, up to the first it stops at or one claimed by someone else.
    /// A present chunk is never claimed: the rule may skip it or stop there.
    fn claim_locked(
        self: &Arc<Self>,
        inflight: &mut HashMap<usize, Arc<Flight>>,
        seq: usize,
        mut extend: impl FnMut(usize, bool) -> Step,
    ) -> Claim {
        let flight = Arc::new(Flight::default());
        let mut seqs = vec![seq];
        for next in seq + 1..self.len {
            if inflight.contains_key(&next) {
                break;
            }
            let present = self.is_present(next);
            match extend(next, present) {
                Step::Stop => break,
                Step::Join if !present => seqs.push(next),
                Step::Join | Step::Skip => {}
            }
        }
        for &s in &seqs {
            inflight.insert(s, flight.clone());
        }
        Claim {
            map: self.clone(),
            seqs,
            flight,
            outcome: None,
        }
    }
}

/// One fetch in flight: its outcome, once known, for every reader waiting on it.
#[derive(Default)]
pub(crate) struct Flight {
    outcome: Mutex<Option<Result<(), String>>>,
    cv: Condvar,
}

impl Flight {
    /// Waits up to `timeout` until `ready()` holds (checked again each time the fetch reports a
    /// chunk) or the fetch ends; a failed or abandoned fetch is an error here unless `ready()`.
    pub(crate) fn wait_for(
        &self,
        ready: impl Fn() -> bool,
        timeout: Duration,
    ) -> Result<(), FsError> {
        let outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        let (outcome, _) = self
            .cv
            .wait_timeout_while(outcome, timeout, |o| o.is_none() && !ready())
            .unwrap_or_else(|e| e.into_inner());
        if ready() {
            return Ok(());
        }
        match &*outcome {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(FsError::Chunk(format!(
                "fetch by another reader failed: {e}"
            ))),
            None => Err(FsError::Chunk(format!(
                "no fetch result after {} s",
                timeout.as_secs()
            ))),
        }
    }

    /// Wakes the waiters to look again: a chunk of the fetch is present. (Taking the lock
    /// orders this after a waiter's check, so a wake-up is never lost.)
    pub(crate) fn progress(&self) {
        drop(self.outcome.lock().unwrap_or_else(|e| e.into_inner()));
        self.cv.notify_all();
    }

    fn finish(&self, res: Result<(), String>) {
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(res);
        self.cv.notify_all();
    }
}

/// Chunks claimed for one fetch. Dropping it releases the claims and wakes the waiters, with
/// an error unless [`Claim::finish`] reported the outcome first: a fetch that unwinds can never
/// leave readers waiting for it.
pub(crate) struct Claim {
    map: Arc<ChunkMap>,
    seqs: Vec<usize>,
    flight: Arc<Flight>,
    outcome: Option<Result<(), String>>,
}

impl Claim {
    /// The claimed chunks, in blob order (not always neighbours: a rule may skip some).
    pub(crate) fn seqs(&self) -> &[usize] {
        &self.seqs
    }

    /// What readers of the claimed chunks wait on.
    pub(crate) fn flight(&self) -> &Arc<Flight> {
        &self.flight
    }

    /// Releases the claim with the fetch's outcome.
    pub(crate) fn finish(mut self, res: &Result<(), FsError>) {
        self.outcome = Some(
            res.as_ref()
                .map(|_| ())
                .map_err(|e| crate::untrusted::chain(e).to_string()),
        );
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        {
            let mut inflight = self.map.lock();
            for s in &self.seqs {
                inflight.remove(s);
            }
        }
        let outcome = self
            .outcome
            .take()
            .unwrap_or_else(|| Err("fetch abandoned".into()));
        self.flight.finish(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contiguous rule: every missing chunk up to the first present one.
    fn run(_: usize, present: bool) -> Step {
        if present {
            Step::Stop
        } else {
            Step::Join
        }
    }

    #[test]
    fn present_bits_count_once() {
        let m = Arc::new(ChunkMap::new(130));
        assert!(!m.is_present(129) && !m.all_present());
        assert!(m.set_present(129, Committed::for_tests()));
        assert!(
            !m.set_present(129, Committed::for_tests()),
            "second set is not new"
        );
        assert!(
            !m.set_present(130, Committed::for_tests()),
            "out of range is ignored"
        );
        assert!(m.is_present(129) && !m.is_present(128));
        assert_eq!(m.present_count(), 1);
        (0..129).for_each(|s| {
            m.set_present(s, Committed::for_tests());
        });
        assert!(m.all_present());
    }

    #[test]
    fn claims_extend_over_missing_chunks_only_and_are_exclusive() {
        let m = Arc::new(ChunkMap::new(10));
        m.set_present(4, Committed::for_tests());
        let Found::Claimed(a) = m.find(1, run) else {
            panic!("claim")
        };
        assert_eq!(a.seqs(), &[1, 2, 3], "stops at the present chunk 4");
        let Found::InFlight(_) = m.find(2, run) else {
            panic!("2 is in flight")
        };
        assert!(
            m.try_claim(3, run).is_none(),
            "background skips claimed chunks"
        );
        assert!(!m.is_missing(3) && !m.is_missing(4) && m.is_missing(5));
        let Found::Present = m.find(4, run) else {
            panic!("4 is present")
        };
        let b = m
            .try_claim(5, |next, _| if next < 7 { Step::Join } else { Step::Stop })
            .expect("5 is free");
        assert_eq!(b.seqs(), &[5, 6], "the caller's rule stops the run");
        let c = m.try_claim(0, run).expect("0 is free");
        assert_eq!(c.seqs(), &[0], "stops at the claimed chunk 1");
        drop((a, b, c));
        assert!(
            m.is_missing(1) && m.is_missing(5),
            "claims are released on drop"
        );
    }

    #[test]
    fn a_rule_may_pass_over_chunks_but_never_claims_present_or_claimed_ones() {
        let m = Arc::new(ChunkMap::new(10));
        m.set_present(3, Committed::for_tests());
        let held = m.try_claim(8, run).expect("8 is free");
        let Found::Claimed(a) = m.find(1, |next, _| match next {
            2 | 5 => Step::Skip,
            _ => Step::Join,
        }) else {
            panic!("claim")
        };
        assert_eq!(
            a.seqs(),
            &[1, 4, 6, 7],
            "2 and 5 skipped, 3 present, 8 claimed by another"
        );
        assert!(
            m.is_missing(2) && m.is_missing(5),
            "skipped chunks stay free"
        );
        drop((a, held));
    }

    #[test]
    fn eviction_clears_present_chunks_but_not_those_in_flight() {
        let m = Arc::new(ChunkMap::new(8));
        for s in [0, 1, 3] {
            m.set_present(s, Committed::for_tests());
        }
        let Found::Claimed(claim) = m.find(2, |_, _| Step::Stop) else {
            panic!("claim")
        };
        let mut dropped = Vec::new();
        assert_eq!(m.evict(&[1, 2, 3], |s| dropped.push(s)), vec![1, 3]);
        assert_eq!(dropped, vec![1, 3], "2 is being fetched: not evicted");
        assert!(!m.is_present(1) && !m.is_present(3) && m.is_present(0));
        assert_eq!(m.present_count(), 1);
        drop(claim);
        let Found::Claimed(again) = m.find(1, |_, _| Step::Stop) else {
            panic!("evicted chunks are fetched again")
        };
        assert_eq!(again.seqs(), &[1]);
    }

    #[test]
    fn waiters_share_the_outcome_and_an_abandoned_claim_fails_them() {
        let m = Arc::new(ChunkMap::new(4));
        // A failed fetch fails its waiters with its reason.
        let Found::Claimed(claim) = m.find(0, run) else {
            panic!("claim")
        };
        let Found::InFlight(flight) = m.find(0, run) else {
            panic!("in flight")
        };
        let waiter = std::thread::spawn(move || flight.wait_for(|| false, Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(20));
        claim.finish(&Err(FsError::Chunk("registry said no".into())));
        let err = waiter.join().expect("join").expect_err("failed fetch");
        assert!(err.to_string().contains("registry said no"), "{err}");
        // A claim that unwinds (dropped without an outcome) wakes its waiters with an error.
        let Found::Claimed(claim) = m.find(1, |_, _| Step::Stop) else {
            panic!("claim")
        };
        let Found::InFlight(flight) = m.find(1, |_, _| Step::Stop) else {
            panic!("in flight")
        };
        std::thread::scope(|s| {
            let fetch = s.spawn(move || {
                let _claim = claim;
                panic!("fetch bug");
            });
            assert!(fetch.join().is_err());
        });
        let err = flight
            .wait_for(|| false, Duration::from_secs(60))
            .expect_err("abandoned");
        assert!(err.to_string().contains("abandoned"), "{err}");
        assert!(m.is_missing(1), "the next read may claim it again");
        // A wait has a deadline.
        let Found::Claimed(_held) = m.find(2, |_, _| Step::Stop) else {
            panic!("claim")
        };
        let Found::InFlight(flight) = m.find(2, |_, _| Step::Stop) else {
            panic!("in flight")
        };
        let err = flight
            .wait_for(|| false, Duration::from_millis(30))
            .expect_err("no outcome yet");
        assert!(err.to_string().contains("no fetch result"), "{err}");
    }

    #[test]
    fn a_waiter_returns_once_its_chunk_lands_not_when_the_run_ends() {
        let m = Arc::new(ChunkMap::new(4));
        let Found::Claimed(claim) = m.find(0, run) else {
            panic!("claim")
        };
        assert_eq!(claim.seqs(), &[0, 1, 2, 3]);
        let Found::InFlight(flight) = m.find(1, run) else {
            panic!("in flight")
        };
        let waiter = {
            let m = m.clone();
            std::thread::spawn(move || flight.wait_for(|| m.is_present(1), Duration::from_secs(60)))
        };
        std::thread::sleep(Duration::from_millis(20));
        m.set_present(0, Committed::for_tests());
        m.set_present(1, Committed::for_tests());
        claim.flight().progress();
        waiter.join().expect("join").expect("chunk 1 landed");
        assert!(!m.is_missing(3), "the rest of the run is still claimed");
        drop(claim);
    }
}
