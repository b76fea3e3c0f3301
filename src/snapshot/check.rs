//! [`CheckGate`]: how often, and for how long, the snapshotter asks whether mounted remote
//! layers can still reach their registry.
//!
//! containerd calls Mounts/Prepare/View on mounted layers often and expects quick answers, so a
//! frozen registry must not freeze those calls:
//! - a layer whose last check succeeded within `valid_interval` is not asked again (Go's
//!   `[blob] valid_interval` / `check_always`; a successful mount counts as a check);
//! - a check runs on its own thread, at most one per layer at a time: a caller that finds one
//!   running waits for that one instead of starting another, so retries cannot pile up threads;
//! - a caller waits at most `timeout` and then reports the layer unavailable; the check goes on
//!   and, if it succeeds, the next call finds the layer fresh.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Go's default `valid_interval`, also what 0 means.
pub const DEFAULT_VALID_INTERVAL: Duration = Duration::from_secs(60);
/// How long a gRPC call waits for an availability check by default (our extension,
/// `[snapshotter] check_timeout_sec`).
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// When and how long to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckPolicy {
    /// A successful check is trusted this long; zero means every call checks.
    pub valid_interval: Duration,
    /// The longest a caller waits for the checks of one call.
    pub timeout: Duration,
}

impl Default for CheckPolicy {
    fn default() -> Self {
        CheckPolicy {
            valid_interval: DEFAULT_VALID_INTERVAL,
            timeout: DEFAULT_CHECK_TIMEOUT,
        }
    }
}

impl CheckPolicy {
    /// Go's meaning of `[blob] valid_interval` (seconds, 0 = the default) and `check_always`
    /// (check on every call); a zero `timeout` means [`DEFAULT_CHECK_TIMEOUT`].
    pub fn from_config(valid_interval_sec: u64, check_always: bool, timeout: Duration) -> Self {
        let valid_interval = match (check_always, valid_interval_sec) {
            (true, _) => Duration::ZERO,
            (false, 0) => DEFAULT_VALID_INTERVAL,
            (false, s) => Duration::from_secs(s),
        };
        let timeout = if timeout.is_zero() {
            DEFAULT_CHECK_TIMEOUT
        } else {
            timeout
        };
        CheckPolicy {
            valid_interval,
            timeout,
        }
    }
}

/// Why a layer counts as unavailable.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub(crate) enum CheckError {
    #[error("the registry did not answer the availability check within {0:?}; it goes on in the background")]
    Timeout(Duration),
    /// The check's own error, already clipped (it may quote the registry).
    #[error("{0}")]
    Failed(String),
    #[error("cannot start the availability check: {0}")]
    Spawn(String),
}

/// A check of one layer: `Err` holds a message safe to show (bounded).
pub(crate) type CheckFn = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// The time source for `valid_interval` (a test clock in unit tests).
type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// Per-layer check state, keyed by mountpoint. See the module doc.
pub(crate) struct CheckGate {
    policy: CheckPolicy,
    clock: Clock,
    layers: Arc<Mutex<HashMap<PathBuf, LayerState>>>,
}

impl std::fmt::Debug for CheckGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckGate")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct LayerState {
    /// Start time of the last check that succeeded (or of the mount).
    last_ok: Option<Instant>,
    running: Option<Arc<Running>>,
}

/// One check in progress; every caller waiting for the layer waits on it.
#[derive(Default)]
struct Running {
    result: Mutex<Option<Result<(), String>>>,
    done: Condvar,
}

/// What a caller waits for.
enum Pending {
    Fresh,
    Failed(CheckError),
    Running(Arc<Running>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CheckGate {
    pub fn new(policy: CheckPolicy) -> Self {
        Self::with_clock(policy, Arc::new(Instant::now))
    }

    fn with_clock(policy: CheckPolicy, clock: Clock) -> Self {
        CheckGate {
            policy,
            clock,
            layers: Arc::default(),
        }
    }

    /// The layer at `mountpoint` was just mounted: its registry answered.
    pub fn record_ok(&self, mountpoint: &Path) {
        let now = (self.clock)();
        lock(&self.layers)
            .entry(mountpoint.to_path_buf())
            .or_default()
            .last_ok = Some(now);
    }

    /// The layer is gone; a check still running for it records nothing.
    pub fn forget(&self, mountpoint: &Path) {
        lock(&self.layers).remove(mountpoint);
    }

    /// Checks every layer (concurrently, each at most once at a time), waiting at most the
    /// policy's timeout in all; returns the first failure with the key it was given under.
    pub fn check_all<K>(&self, layers: Vec<(K, PathBuf, CheckFn)>) -> Result<(), (K, CheckError)> {
        let pending: Vec<(K, Pending)> = layers
            .into_iter()
            .map(|(k, mp, f)| (k, self.start(mp, f)))
            .collect();
        let deadline = Instant::now() + self.policy.timeout;
        for (k, p) in pending {
            self.wait(p, deadline).map_err(|e| (k, e))?;
        }
        Ok(())
    }

    fn start(&self, mountpoint: PathBuf, check: CheckFn) -> Pending {
        let started = (self.clock)();
        let mut layers = lock(&self.layers);
        let state = layers.entry(mountpoint.clone()).or_default();
        let interval = self.policy.valid_interval;
        if state
            .last_ok
            .is_some_and(|t| started.saturating_duration_since(t) < interval)
        {
            return Pending::Fresh;
        }
        if let Some(r) = &state.running {
            return Pending::Running(r.clone());
        }
        let running = Arc::new(Running::default());
        state.running = Some(running.clone());
        drop(layers);
        let table = self.layers.clone();
        let mine = running.clone();
        let mp = mountpoint.clone();
        let spawned = std::thread::Builder::new()
            .name("layer-check".into())
            .spawn(move || {
                let res = check();
                if let Err(e) = &res {
                    tracing::warn!(mountpoint = %mp.display(), error = %e, "layer is unavailable");
                }
                {
                    let mut layers = lock(&table);
                    // Only if the layer is still the one this check was started for.
                    if let Some(state) = layers
                        .get_mut(&mp)
                        .filter(|s| s.running.as_ref().is_some_and(|r| Arc::ptr_eq(r, &mine)))
                    {
                        state.running = None;
                        if res.is_ok() {
                            state.last_ok = Some(started);
                        }
                    }
                }
                *lock(&mine.result) = Some(res);
                mine.done.notify_all();
            });
        match spawned {
            Ok(_) => Pending::Running(running),
            Err(e) => {
                if let Some(state) = lock(&self.layers).get_mut(&mountpoint) {
                    state.running = None;
                }
                Pending::Failed(CheckError::Spawn(e.to_string()))
            }
        }
    }

    fn wait(&self, p: Pending, deadline: Instant) -> Result<(), CheckError> {
        let running = match p {
            Pending::Fresh => return Ok(()),
            Pending::Failed(e) => return Err(e),
            Pending::Running(r) => r,
        };
        let mut result = lock(&running.result);
        loop {
            if let Some(r) = result.as_ref() {
                return r.clone().map_err(CheckError::Failed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CheckError::Timeout(self.policy.timeout));
            }
            result = running
                .done
                .wait_timeout(result, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    /// A clock the test moves by hand.
    fn test_clock() -> (Clock, Arc<Mutex<Instant>>) {
        let now = Arc::new(Mutex::new(Instant::now()));
        let n = now.clone();
        (Arc::new(move || *lock(&n)), now)
    }

    fn counting(calls: &Arc<AtomicUsize>, res: Result<(), String>) -> CheckFn {
        let calls = calls.clone();
        Box::new(move || {
            calls.fetch_add(1, Ordering::SeqCst);
            res
        })
    }

    fn one(gate: &CheckGate, mp: &str, f: CheckFn) -> Result<(), CheckError> {
        gate.check_all(vec![((), PathBuf::from(mp), f)])
            .map_err(|(_, e)| e)
    }

    #[test]
    fn policy_follows_go_meaning() {
        let p = CheckPolicy::from_config(0, false, Duration::ZERO);
        assert_eq!(p, CheckPolicy::default());
        assert_eq!(
            CheckPolicy::from_config(7, false, Duration::from_secs(1)).valid_interval,
            Duration::from_secs(7)
        );
        assert_eq!(
            CheckPolicy::from_config(7, true, Duration::from_secs(1)).valid_interval,
            Duration::ZERO
        );
    }

    #[test]
    fn success_is_trusted_for_the_interval_and_failure_is_not() {
        let (clock, now) = test_clock();
        let policy = CheckPolicy {
            valid_interval: Duration::from_secs(60),
            timeout: Duration::from_secs(5),
        };
        let gate = CheckGate::with_clock(policy, clock);
        let calls = Arc::new(AtomicUsize::new(0));

        // Mounted just now: no check at all.
        gate.record_ok(Path::new("/a"));
        one(&gate, "/a", counting(&calls, Err("down".into()))).expect("fresh after mount");
        assert_eq!(calls.load(Ordering::SeqCst), 0);

        // Past the interval the registry is asked again; a failure is reported and not cached.
        *lock(&now) += Duration::from_secs(61);
        let e = one(
            &gate,
            "/a",
            counting(&calls, Err("connection refused".into())),
        )
        .unwrap_err();
        assert_eq!(e, CheckError::Failed("connection refused".into()));
        one(&gate, "/a", counting(&calls, Ok(()))).expect("asked again after a failure");
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        // The success is trusted until the interval passes.
        *lock(&now) += Duration::from_secs(59);
        one(&gate, "/a", counting(&calls, Err("down".into()))).expect("still fresh");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        *lock(&now) += Duration::from_secs(2);
        assert!(one(&gate, "/a", counting(&calls, Err("down".into()))).is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn check_always_checks_every_call() {
        let (clock, _now) = test_clock();
        let gate = CheckGate::with_clock(
            CheckPolicy::from_config(60, true, Duration::from_secs(5)),
            clock,
        );
        let calls = Arc::new(AtomicUsize::new(0));
        gate.record_ok(Path::new("/a"));
        for _ in 0..3 {
            one(&gate, "/a", counting(&calls, Ok(()))).expect("ok");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_hung_check_fails_fast_and_is_never_duplicated() {
        let policy = CheckPolicy {
            valid_interval: Duration::from_secs(60),
            timeout: Duration::from_millis(100),
        };
        let gate = CheckGate::new(policy);
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, hold) = mpsc::channel::<()>();
        let c = calls.clone();
        let hung: CheckFn = Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
            let _ = hold.recv();
            Ok(())
        });
        let t = Instant::now();
        assert_eq!(
            one(&gate, "/a", hung),
            Err(CheckError::Timeout(Duration::from_millis(100)))
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "bounded: {:?}",
            t.elapsed()
        );

        // Retries while it hangs join it: no second check starts, each retry is bounded.
        for _ in 0..5 {
            let r = one(&gate, "/a", counting(&calls, Ok(())));
            assert!(matches!(r, Err(CheckError::Timeout(_))), "{r:?}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // Once it answers, its success counts: the next call is fresh without a new check.
        release.send(()).expect("release");
        let deadline = Instant::now() + Duration::from_secs(5);
        while one(&gate, "/a", counting(&calls, Err("down".into()))).is_err() {
            assert!(
                Instant::now() < deadline,
                "the background check never completed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Calls that raced the completion may have started one more check; none pile up.
        assert!(calls.load(Ordering::SeqCst) <= 2);
    }

    #[test]
    fn layers_are_checked_concurrently_within_one_bound() {
        let policy = CheckPolicy {
            valid_interval: Duration::ZERO,
            timeout: Duration::from_secs(2),
        };
        let gate = CheckGate::new(policy);
        let slow = |ms| -> CheckFn {
            Box::new(move || {
                std::thread::sleep(Duration::from_millis(ms));
                Ok(())
            })
        };
        let t = Instant::now();
        let layers = (0..4)
            .map(|i| (i, PathBuf::from(format!("/l{i}")), slow(300)))
            .collect();
        gate.check_all(layers).expect("all answer");
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "ran in parallel: {:?}",
            t.elapsed()
        );

        let layers = vec![
            (1, PathBuf::from("/ok"), slow(0)),
            (
                2,
                PathBuf::from("/bad"),
                Box::new(|| Err("gone".to_string())) as CheckFn,
            ),
        ];
        let (k, e) = gate.check_all(layers).unwrap_err();
        assert_eq!((k, e), (2, CheckError::Failed("gone".into())));
    }

    #[test]
    fn a_forgotten_layer_is_not_revived_by_its_late_check() {
        let policy = CheckPolicy {
            valid_interval: Duration::from_secs(60),
            timeout: Duration::from_millis(50),
        };
        let gate = CheckGate::new(policy);
        let (release, hold) = mpsc::channel::<()>();
        let (finished, done) = mpsc::channel::<()>();
        let hung: CheckFn = Box::new(move || {
            let _ = hold.recv();
            let _ = finished.send(());
            Ok(())
        });
        assert!(one(&gate, "/a", hung).is_err());
        gate.forget(Path::new("/a"));
        release.send(()).expect("release");
        done.recv_timeout(Duration::from_secs(5))
            .expect("check finished");
        std::thread::sleep(Duration::from_millis(50));
        let calls = Arc::new(AtomicUsize::new(0));
        assert!(
            one(&gate, "/a", counting(&calls, Err("down".into()))).is_err(),
            "checked anew, not fresh"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
