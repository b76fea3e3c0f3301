//! The `process_*` series every Prometheus client exports (Go's daemon has them from
//! client_golang's default registry), read from `/proc/self` at scrape time: dashboards that
//! chart the daemon's memory, CPU and file descriptors keep working.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

#[derive(Debug)]
pub(super) struct ProcessCollector;

/// What `/proc/self/stat` and friends say; a field that cannot be read is left out.
#[derive(Debug, Default, PartialEq)]
struct Sample {
    cpu_seconds: Option<f64>,
    start_time_seconds: Option<f64>,
    virtual_bytes: Option<u64>,
    resident_bytes: Option<u64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
}

/// The fields of a `/proc/PID/stat` line after the command name (which may hold spaces and
/// parentheses, so the split is at the last `)`), numbered as in proc(5) from field 3.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

fn sample() -> Sample {
    // SAFETY: sysconf only reads a system constant.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let mut s = Sample::default();
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        let f = stat_fields(&stat);
        // proc(5): utime 14, stime 15, starttime 22, vsize 23, rss 24; f[0] is field 3.
        let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        if ticks > 0 {
            if let (Some(u), Some(st)) = (field(14), field(15)) {
                s.cpu_seconds = Some((u + st) as f64 / ticks as f64);
            }
            let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("btime "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            });
            if let (Some(boot), Some(start)) = (boot, field(22)) {
                s.start_time_seconds = Some(boot as f64 + start as f64 / ticks as f64);
            }
        }
        s.virtual_bytes = field(23);
        s.resident_bytes = field(24).map(|p| p.saturating_mul(u64::try_from(page).unwrap_or(4096)));
    }
    s.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    s.max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft);
    s
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = sample();
        if let Some(v) = s.cpu_seconds {
            let e = encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent in seconds.",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            ConstCounter::new(v).encode(e)?;
        }
        let gauges = [
            (
                "process_start_time",
                "Start time of the process since unix epoch in seconds.",
                Some(Unit::Seconds),
                s.start_time_seconds,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size in bytes.",
                Some(Unit::Bytes),
                s.virtual_bytes.map(|v| v as f64),
            ),
            (
                "process_resident_memory",
                "Resident memory size in bytes.",
                Some(Unit::Bytes),
                s.resident_bytes.map(|v| v as f64),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                None,
                s.open_fds.map(|v| v as f64),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                None,
                s.max_fds.map(|v| v as f64),
            ),
        ];
        for (name, help, unit, value) in gauges {
            if let Some(v) = value {
                let e = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
                ConstGauge::new(v).encode(e)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_a_command_name_with_spaces_and_parens() {
        let line = "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 555 1000 25";
        let f = stat_fields(line);
        assert_eq!(f[0], "S", "field 3 is the state");
        assert_eq!((f[14 - 3], f[15 - 3]), ("7", "3"), "utime, stime");
        assert_eq!((f[22 - 3], f[23 - 3], f[24 - 3]), ("555", "1000", "25"));
    }

    #[test]
    fn this_process_has_memory_fds_and_a_start_time() {
        let s = sample();
        assert!(s.resident_bytes.is_some_and(|b| b > 1 << 20), "{s:?}");
        assert!(s.open_fds.is_some_and(|n| n >= 3), "{s:?}");
        assert!(s.start_time_seconds.is_some_and(|t| t > 1.6e9), "{s:?}");
        assert!(s.cpu_seconds.is_some(), "{s:?}");
    }
}
