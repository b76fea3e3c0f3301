//! Benchmark (not a test): stream a large blob from a local `docker-registry` through
//! `remote::Blob::fetch_range_into` (the daemon's read path, nothing cached): in one range, in
//! sequential 1 MiB ranges and in random 64 KiB ranges, for a 256 MiB and a 1 GiB blob in the
//! same run. Each scenario runs in a fresh child process (this binary with
//! `--child`) so its peak RSS (VmHWM) is its own. Baseline: `curl` fetching the same blob.
//! Writes `bench-results/remote_read.txt`.
//!
//! Run: `cargo bench --bench remote_read` (or `scripts/bench-remote.sh`). Needs docker-registry
//! and curl, ~1 GiB of free space under `$BENCH_TMP` (default: the system temp dir) for the
//! generated blob before it is pushed.

#[path = "../tests/remote_support/mod.rs"]
mod remote_support;

use std::io::Write;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use stargz::{Blob, ClientConfig, Reference, RegistryClient};

const MIB: u64 = 1 << 20;
const REPO: &str = "bench/blob";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        return child(&args[2..]);
    }
    orchestrate()
}

/// Writes `size` pseudo-random bytes to `path`; returns the digest.
fn generate(path: &std::path::Path, size: u64, seed: u64) -> Result<String> {
    let mut f = std::io::BufWriter::with_capacity(MIB as usize, std::fs::File::create(path)?);
    let mut h = Sha256::new();
    let mut x = seed | 1;
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(MIB) as usize;
        h.update(&buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

async fn push_file(base: &str, path: &std::path::Path, digest: &str) -> Result<()> {
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{base}/v2/{REPO}/blobs/uploads/"))
        .send()
        .await?;
    let loc = resp
        .headers()
        .get("location")
        .context("no Location")?
        .to_str()?
        .to_owned();
    let url = if loc.starts_with("http") {
        loc
    } else {
        format!("{base}{loc}")
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let len = std::fs::metadata(path)?.len();
    let file = tokio::fs::File::open(path).await?;
    let resp = http
        .put(format!("{url}{sep}digest={digest}"))
        .header("content-length", len)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::from(file))
        .send()
        .await?;
    if resp.status() != 201 {
        bail!("push failed: {}", resp.status());
    }
    Ok(())
}

struct Run {
    bytes: u64,
    secs: f64,
    hwm_kib: u64,
}

fn run_child(addr: &str, digest: &str, mode: &str) -> Result<Run> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--child", addr, digest, mode])
        .output()?;
    if !out.status.success() {
        bail!(
            "child {mode} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .context("no RESULT line")?;
    let v: Vec<&str> = line.split_whitespace().collect();
    Ok(Run {
        bytes: v[1].parse()?,
        secs: v[2].parse()?,
        hwm_kib: v[3].parse()?,
    })
}

fn curl(addr: &str, digest: &str) -> Result<f64> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{time_total}",
        ])
        .arg(format!("http://{addr}/v2/{REPO}/blobs/{digest}"))
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    let mut it = text.split_whitespace();
    let bytes: f64 = it.next().context("curl output")?.parse()?;
    let secs: f64 = it.next().context("curl output")?.parse()?;
    Ok(bytes / secs / MIB as f64)
}

fn orchestrate() -> Result<()> {
    remote_support::which("curl")?;
    let tmp_root = std::env::var_os("BENCH_TMP")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(&tmp_root)?;
    let reg = remote_support::Registry::start(None)?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut report = String::new();
    report.push_str("# remote_read: streamed blob reader (remote::Blob::fetch_range_into, nothing cached) vs curl, same run\n");
    report.push_str("# each reader scenario is a fresh process; RSS = VmHWM of that process\n");
    report.push_str(&format!(
        "# machine: {} cpus, loadavg {}\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    ));
    report.push_str("size_mib mode        MiB/s   curl_MiB/s  ratio  peak_rss_MiB\n");
    let mut hwm = Vec::new();
    for (i, size) in [256 * MIB, 1024 * MIB].into_iter().enumerate() {
        let file = tmp.path().join("blob");
        let digest = generate(&file, size, 100 + i as u64)?;
        rt.block_on(push_file(&reg.base(), &file, &digest))?;
        std::fs::remove_file(&file)?;
        let curl_speed = curl(&reg.addr, &digest)?;
        for mode in ["whole", "sequential", "random"] {
            let r = run_child(&reg.addr, &digest, mode)?;
            let speed = r.bytes as f64 / r.secs / MIB as f64;
            let line = format!(
                "{:>8} {:<10} {:>8.1} {:>11.1} {:>6.2} {:>13.1}\n",
                size / MIB,
                mode,
                speed,
                curl_speed,
                speed / curl_speed,
                r.hwm_kib as f64 / 1024.0
            );
            eprint!("{line}");
            report.push_str(&line);
            hwm.push((size, mode, r.hwm_kib));
        }
    }
    let max = hwm.iter().map(|h| h.2).max().unwrap_or(0);
    let flat = |mode: &str| {
        let small = hwm
            .iter()
            .find(|h| h.0 == 256 * MIB && h.1 == mode)
            .map_or(1, |h| h.2);
        let big = hwm
            .iter()
            .find(|h| h.0 == 1024 * MIB && h.1 == mode)
            .map_or(0, |h| h.2);
        big as f64 / small as f64
    };
    report.push_str(&format!(
        "peak RSS 1GiB/256MiB: whole {:.2}x, sequential {:.2}x, random {:.2}x (flat = ~1.0)\nmax peak RSS {:.1} MiB (< 64 MiB: {})\n",
        flat("whole"),
        flat("sequential"),
        flat("random"),
        max as f64 / 1024.0,
        if max < 64 * 1024 { "yes" } else { "NO" }
    ));
    std::fs::create_dir_all("bench-results")?;
    std::fs::write("bench-results/remote_read.txt", &report)?;
    print!("{report}");
    Ok(())
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Counts the bytes it is given and keeps none, as the daemon's cache writer keeps none in
/// memory.
struct Discard(u64);

impl Write for Discard {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `--child ADDR DIGEST MODE`: one measured scenario.
fn child(args: &[String]) -> Result<()> {
    let [addr, digest, mode] = args else {
        bail!("usage: --child ADDR DIGEST MODE")
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (bytes, secs) = rt.block_on(async {
        let client = RegistryClient::new(ClientConfig::default())?;
        let r: Reference = format!("{addr}/{REPO}:latest").parse()?;
        let blob = Blob::open(&client, &r, digest).await?;
        let size = blob.size();
        let started = Instant::now();
        let mut sink = Discard(0);
        match mode.as_str() {
            "whole" => {
                blob.fetch_range_into(0..size, &mut sink).await?;
            }
            "sequential" => {
                let mut off = 0;
                while off < size {
                    let end = (off + MIB).min(size);
                    blob.fetch_range_into(off..end, &mut sink).await?;
                    off = end;
                }
            }
            _ => {
                // 64 KiB ranges at random offsets; as many bytes as a quarter of the blob.
                let len = 64 * 1024;
                let mut x = 0x2545f4914f6cdd1du64;
                while sink.0 < size / 4 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = x % (size - len);
                    blob.fetch_range_into(off..off + len, &mut sink).await?;
                }
            }
        }
        if mode == "whole" || mode == "sequential" {
            anyhow::ensure!(sink.0 == size, "{mode}: got {} of {size} bytes", sink.0);
        }
        anyhow::Ok((sink.0, started.elapsed().as_secs_f64()))
    })?;
    println!("RESULT {bytes} {secs} {}", vm_hwm_kib());
    Ok(())
}
