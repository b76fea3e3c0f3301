//! A fixed set of flags, one bit each, that threads set and clear without a lock: which chunks
//! of a layer are present, which read-ahead brought or left out, which files' libraries were
//! followed.

use std::sync::atomic::{AtomicU64, Ordering};

/// `len` flags, all clear at first. Flags past `len` read as clear and never set.
pub(crate) struct Bits {
    words: Vec<AtomicU64>,
    len: usize,
}

impl Bits {
    pub(crate) fn new(len: usize) -> Self {
        Bits {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    /// The word holding flag `i` and the flag's mask in it.
    fn word(&self, i: usize) -> Option<(&AtomicU64, u64)> {
        let w = self.words.get(i / 64).filter(|_| i < self.len)?;
        Some((w, 1 << (i % 64)))
    }

    pub(crate) fn get(&self, i: usize) -> bool {
        self.word(i)
            .is_some_and(|(w, m)| w.load(Ordering::SeqCst) & m != 0)
    }

    /// Sets flag `i`: true when it was clear.
    pub(crate) fn set(&self, i: usize) -> bool {
        self.word(i)
            .is_some_and(|(w, m)| w.fetch_or(m, Ordering::SeqCst) & m == 0)
    }

    /// Clears flag `i`: true when it was set.
    pub(crate) fn take(&self, i: usize) -> bool {
        self.word(i)
            .is_some_and(|(w, m)| w.fetch_and(!m, Ordering::SeqCst) & m != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_set_and_clear_once_and_stay_in_range() {
        let b = Bits::new(130);
        assert!(!b.get(129));
        assert!(b.set(129) && !b.set(129), "set once");
        assert!(b.get(129) && !b.get(128) && !b.get(65));
        assert!(!b.set(130) && !b.get(130), "past the end");
        assert!(b.take(129) && !b.take(129), "cleared once");
        assert!(!b.get(129));
    }
}
