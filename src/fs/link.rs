//! What the daemon learns about the link to its registry from its own transfers, and how much
//! read-ahead that buys.
//!
//! A miss on an unoptimized image costs one round trip before its first byte arrives; the bytes
//! that follow it in blob order (the neighbouring files of the same directory, in tar order) cost
//! only their transfer time once the request is under way. So a miss may take up to about one
//! round trip's worth of bandwidth past its chunk — the bandwidth-delay product — for less than a
//! second request would cost: on 100 Mbit / 20 ms that is ~250 KB, ~6 MB on 1 Gbit / 50 ms, and on
//! a thin link (20 Mbit / 10 ms: 25 KB) too little to be worth anything. Both figures are measured
//! from the daemon's own range requests (no config number to get wrong): the round trip as the
//! time to a response's first byte, the bandwidth from the rest of chunk responses large enough
//! for it to show (small ones fit in the link's burst). Chunk responses only: their bytes are
//! decompressed, hashed and written to the cache as they arrive, which on a fast link is the
//! slower part — a TOC read into memory would make a local registry look many times faster than
//! read-ahead can go.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::source::LayerSource;

/// Read-ahead below this is not worth a request's share of the link: none at all.
pub(crate) const MIN_READAHEAD: u64 = 32 << 10;
/// The most read-ahead on one miss, whatever the link: bounds what one wrong guess costs.
pub(crate) const MAX_READAHEAD: u64 = 8 << 20;
/// Responses shorter than this tell the round trip but not the bandwidth.
const MIN_BANDWIDTH_SAMPLE: u64 = 64 << 10;
/// Weight of a new sample in the running estimates (an exponential moving average).
const NEW_SAMPLE_WEIGHT: f64 = 0.25;

/// Running estimates of the registry link, shared by every layer of a daemon.
#[derive(Debug, Default)]
pub struct LinkEstimate {
    state: Mutex<Estimate>,
}

/// A snapshot of [`LinkEstimate`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Estimate {
    /// Time from a request to the first byte of its response.
    pub rtt: Option<Duration>,
    /// Bytes per second once a response flows.
    pub bandwidth: Option<f64>,
}

impl Estimate {
    /// Compressed bytes worth fetching past a miss: `window` round trips' worth of bandwidth
    /// (the reader widens it while its reads land in read-ahead), none when one round trip's
    /// worth is below [`MIN_READAHEAD`], at most [`MAX_READAHEAD`]. While only the round trip
    /// is known (small TOCs, small files: no response was long enough to time the bandwidth),
    /// a probe whatever the window: enough read-ahead for the next response to measure it.
    pub fn readahead(&self, window: u32) -> u64 {
        let (Some(rtt), bw) = (self.rtt, self.bandwidth) else {
            return 0;
        };
        let Some(bw) = bw else {
            return 2 * MIN_BANDWIDTH_SAMPLE;
        };
        let bdp = bw * rtt.as_secs_f64();
        if !bdp.is_finite() || bdp < MIN_READAHEAD as f64 {
            return 0;
        }
        // Saturating casts: a huge estimate is clamped, not wrapped.
        ((bdp * f64::from(window.max(1))) as u64).min(MAX_READAHEAD)
    }
}

impl LinkEstimate {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self) -> Estimate {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes in one completed response: `first_byte` after the request, then `bytes` more in
    /// `streaming`.
    pub fn observe(&self, first_byte: Duration, bytes: u64, streaming: Duration) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.rtt = Some(match s.rtt {
            None => first_byte,
            Some(old) => {
                old.mul_f64(1.0 - NEW_SAMPLE_WEIGHT) + first_byte.mul_f64(NEW_SAMPLE_WEIGHT)
            }
        });
        if bytes >= MIN_BANDWIDTH_SAMPLE && !streaming.is_zero() {
            let sample = bytes as f64 / streaming.as_secs_f64();
            s.bandwidth = Some(match s.bandwidth {
                None => sample,
                Some(old) => old * (1.0 - NEW_SAMPLE_WEIGHT) + sample * NEW_SAMPLE_WEIGHT,
            });
        }
    }
}

/// A [`LayerSource`] whose successful fetches feed a [`LinkEstimate`]: every layer's TOC,
/// prefetch, misses and background fetch teach the daemon its link.
pub(crate) struct Measured {
    pub(crate) inner: Arc<dyn LayerSource>,
    pub(crate) link: Arc<LinkEstimate>,
    /// Whether responses also time the bandwidth (chunk data), or only the round trip (TOC).
    pub(crate) bandwidth: bool,
}

impl LayerSource for Measured {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn fetch(&self, offset: u64, len: u64, sink: &mut (dyn Write + Send)) -> io::Result<()> {
        self.timed(sink, |inner, timed| inner.fetch(offset, len, timed))
    }

    /// One multi-range request is one response to learn from, like one range.
    fn fetch_ranges(
        &self,
        ranges: &[std::ops::Range<u64>],
        sink: &mut (dyn Write + Send),
    ) -> io::Result<()> {
        self.timed(sink, |inner, timed| inner.fetch_ranges(ranges, timed))
    }

    fn multi_range(&self) -> bool {
        self.inner.multi_range()
    }

    fn check(&self) -> io::Result<()> {
        self.inner.check()
    }

    fn take_tail(&self) -> Option<(u64, Vec<u8>)> {
        self.inner.take_tail()
    }
}

impl Measured {
    /// Runs one fetch of `inner` into `sink`, timing its response if it succeeds.
    fn timed(
        &self,
        sink: &mut (dyn Write + Send),
        fetch: impl FnOnce(&dyn LayerSource, &mut Timed<'_>) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut timed = Timed {
            sink,
            started: Instant::now(),
            first: None,
            bytes: 0,
        };
        fetch(&*self.inner, &mut timed)?;
        if let Some((first_at, first_len)) = timed.first {
            let (bytes, streaming) = match self.bandwidth {
                true => (timed.bytes - first_len, first_at.elapsed()),
                false => (0, Duration::ZERO),
            };
            self.link
                .observe(first_at.duration_since(timed.started), bytes, streaming);
        }
        Ok(())
    }
}

/// Notes when the first bytes of a response arrive and how many follow.
struct Timed<'a> {
    sink: &'a mut (dyn Write + Send),
    started: Instant,
    /// When the first bytes came, and how many there were.
    first: Option<(Instant, u64)>,
    bytes: u64,
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.first.is_none() && !buf.is_empty() {
            self.first = Some((Instant::now(), buf.len() as u64));
        }
        let n = self.sink.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(rtt_ms: u64, mbit: f64) -> Estimate {
        Estimate {
            rtt: Some(Duration::from_millis(rtt_ms)),
            bandwidth: Some(mbit * 1e6 / 8.0),
        }
    }

    #[test]
    fn readahead_is_one_round_trip_of_bandwidth() {
        assert_eq!(est(20, 100.0).readahead(1), 250_000, "100 Mbit / 20 ms");
        assert_eq!(est(50, 1000.0).readahead(1), 6_250_000, "1 Gbit / 50 ms");
        assert_eq!(est(10, 20.0).readahead(1), 0, "a thin link gets none");
        assert_eq!(est(500, 10_000.0).readahead(1), MAX_READAHEAD, "clamped");
        assert_eq!(
            est(20, 100.0).readahead(4),
            1_000_000,
            "a window of 4 round trips"
        );
        assert_eq!(est(10, 20.0).readahead(8), 0, "a thin link stays at none");
        assert_eq!(Estimate::default().readahead(1), 0, "unknown link: none");
        let half = Estimate {
            rtt: Some(Duration::from_millis(20)),
            bandwidth: None,
        };
        for window in [1, 8] {
            assert_eq!(
                half.readahead(window),
                2 * MIN_BANDWIDTH_SAMPLE,
                "bandwidth unknown: enough to measure it"
            );
        }
    }

    #[test]
    fn estimates_follow_the_transfers() {
        let link = LinkEstimate::new();
        // Small responses tell the round trip only.
        link.observe(Duration::from_millis(20), 4096, Duration::from_micros(300));
        let e = link.get();
        assert_eq!(e.rtt, Some(Duration::from_millis(20)));
        assert_eq!(e.bandwidth, None);
        // A 1.25 MB response in 100 ms: 12.5 MB/s.
        link.observe(
            Duration::from_millis(20),
            1_250_000,
            Duration::from_millis(100),
        );
        let e = link.get();
        assert!((e.bandwidth.unwrap_or(0.0) - 12.5e6).abs() < 1.0, "{e:?}");
        assert_eq!(e.readahead(1), 250_000);
        // A slower round trip moves the estimate by a quarter of the difference.
        link.observe(Duration::from_millis(60), 0, Duration::ZERO);
        assert_eq!(link.get().rtt, Some(Duration::from_millis(30)));
    }

    #[test]
    fn measured_source_times_its_fetches() -> io::Result<()> {
        struct Slow;
        impl LayerSource for Slow {
            fn size(&self) -> u64 {
                1 << 20
            }
            fn fetch(&self, _: u64, len: u64, sink: &mut (dyn Write + Send)) -> io::Result<()> {
                std::thread::sleep(Duration::from_millis(30));
                let block = vec![7u8; 64 << 10];
                let mut left = len;
                while left > 0 {
                    let n = left.min(block.len() as u64) as usize;
                    sink.write_all(&block[..n])?;
                    left -= n as u64;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(())
            }
        }
        let link = Arc::new(LinkEstimate::new());
        let toc = Measured {
            inner: Arc::new(Slow),
            link: link.clone(),
            bandwidth: false,
        };
        let mut out = Vec::new();
        toc.fetch(0, 512 << 10, &mut out)?;
        assert_eq!(out.len(), 512 << 10);
        let e = link.get();
        let rtt = e.rtt.unwrap_or_default();
        assert!(
            rtt >= Duration::from_millis(30) && rtt < Duration::from_secs(2),
            "{e:?}"
        );
        assert!(
            e.bandwidth.is_none(),
            "a TOC read times the round trip only: {e:?}"
        );
        let chunks = Measured {
            bandwidth: true,
            ..toc
        };
        out.clear();
        chunks.fetch(0, 512 << 10, &mut out)?;
        let e = link.get();
        assert!(
            e.bandwidth.is_some(),
            "448 KiB after the first block: {e:?}"
        );
        Ok(())
    }
}
