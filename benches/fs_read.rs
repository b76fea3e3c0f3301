//! Read benchmark of a mounted eStargz layer (needs root and /dev/fuse). Not a timed test.
//!
//! 1. Sequential read of a 1 GiB file once fully cached, as a ratio to reading the same bytes
//!    from a plain local file in the same run (page cache dropped before each pass), with and
//!    without FUSE passthrough.
//! 2. Cold random 4 KiB reads (empty cache, no prefetch or background fetch): p50/p99 latency of
//!    the same 100 offsets with the blob on local disk (the baseline), then with the blob in a
//!    `docker-registry` behind the project's slow link (`scripts/netlink.sh`: network namespace,
//!    veth limited to 100 Mbit by `tbf`, 20 ms RTT from `examples/delay-proxy.rs`), read through
//!    the daemon's own path (`fs::RegistryResolver` over `remote::RegistryClient`, the registry
//!    configured as an insecure mirror), with the bytes the registry served through the link.
//!
//! 3. The cost of metrics on the hot path: the cached layer without passthrough (every read
//!    goes through the daemon) with and without the daemon's metrics, alternating, as ratios
//!    (metrics on ÷ off) of a sequential pass and of random 4 KiB reads, medians of 6 pairs.
//!
//! Writes `bench-results/fs_read.txt`. Size can be lowered with `FS_BENCH_MIB` (default 1024).
//! Needs root, /dev/fuse, `ip`, `tc`, `curl` and `docker-registry`. Mounts and the link are
//! removed by Drop guards, also when a step fails.

#[path = "../tests/testbed/mod.rs"]
mod testbed;

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest, Sha256};
use stargz::estargz::{EntryType, Toc, TocEntry};
use stargz::{
    mount_layer, open_layer, BackgroundFetcher, BlobResolver, FileSource, LayerOptions,
    LayerSource, LayerSpec, Metrics, Priority, RegistryResolver,
};
use stargz::{ClientConfig, HostConfig, MirrorConfig, RegistryClient, ResolverConfig};
use testbed::SlowLink;

const CHUNK: u64 = 4 << 20;
/// Link of the cold-read measurement: 100 Mbit each way, 10 ms each way (20 ms RTT).
const LINK_RATE: &str = "100mbit";
const LINK_DELAY_MS: u64 = 10;
const REPO: &str = "bench/fs";

/// Deterministic data, every other byte random: `Compression::fast()` (zlib-rs) barely shrinks it,
/// so a chunk's gzip member is about as large as the chunk (the header line prints the blob size).
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for (i, b) in buf.iter_mut().enumerate() {
        if i % 2 == 0 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        } else {
            *b = (i / 512) as u8;
        }
    }
}

/// Digests of the built layer.
struct Built {
    toc: String,
    blob: String,
    /// Compressed size of each 4 MiB chunk in the blob, by chunk index.
    gz_sizes: Vec<u64>,
}

/// Writes `data.bin` (plain) and `blob` (eStargz with one big file `big`), streaming.
fn build(dir: &Path, size: u64) -> Result<Built> {
    let mut plain = BufWriter::new(File::create(dir.join("data.bin"))?);
    let mut blob = CountingFile {
        f: BufWriter::new(File::create(dir.join("blob"))?),
        n: 0,
        hash: Sha256::new(),
    };
    let mut toc = Toc {
        version: 1,
        entries: Vec::new(),
    };
    let mut whole = Sha256::new();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut gz_sizes = Vec::new();
    let mut off = 0;
    while off < size {
        let n = CHUNK.min(size - off);
        fill(&mut buf[..n as usize], off / CHUNK + 1);
        let data = &buf[..n as usize];
        plain.write_all(data)?;
        whole.update(data);
        let mut e = if off == 0 {
            TocEntry {
                name: "big".into(),
                kind: EntryType::Reg,
                size: size as i64,
                mode: 0o644,
                ..Default::default()
            }
        } else {
            TocEntry {
                name: "big".into(),
                kind: EntryType::Chunk,
                ..Default::default()
            }
        };
        e.offset = blob.n as i64;
        e.chunk_offset = off as i64;
        if n == CHUNK {
            e.chunk_size = n as i64;
        }
        e.chunk_digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(data)?;
        let member = gz.finish()?;
        gz_sizes.push(member.len() as u64);
        blob.write(&member)?;
        toc.entries.push(e);
        off += n;
    }
    toc.entries[0].digest = format!("sha256:{}", hex::encode(whole.finalize()));
    let toc_offset = blob.n;
    let json = serde_json::to_vec(&toc)?;
    let mut th = tar::Header::new_gnu();
    th.set_path("stargz.index.json")?;
    th.set_size(json.len() as u64);
    th.set_mode(0o644);
    th.set_cksum();
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(th.as_bytes())?;
    gz.write_all(&json)?;
    gz.write_all(&vec![0u8; (512 - json.len() % 512) % 512 + 1024])?;
    blob.write(&gz.finish()?)?;
    let mut footer = vec![
        0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
    ];
    footer.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    footer.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    blob.write(&footer)?;
    blob.f.flush()?;
    plain.flush()?;
    Ok(Built {
        toc: format!("sha256:{}", hex::encode(Sha256::digest(&json))),
        blob: format!("sha256:{}", hex::encode(blob.hash.finalize())),
        gz_sizes,
    })
}

/// The blob being written: its length so far (for TOC offsets) and its running digest.
struct CountingFile {
    f: BufWriter<File>,
    n: u64,
    hash: Sha256,
}

impl CountingFile {
    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.f.write_all(b)?;
        self.hash.update(b);
        self.n += b.len() as u64;
        Ok(())
    }
}

/// Evicts the page cache so both sides of a ratio read from disk: without the `sync`, freshly
/// written (dirty) pages stay cached and one side may be read from memory.
fn drop_caches() -> Result<()> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", b"1").context("drop_caches (root needed)")
}

/// What a pass starts without.
#[derive(Clone, Copy)]
enum Cold {
    /// The whole page cache: every read goes to disk (through the daemon for a FUSE file).
    Disk,
    /// No page cache for the file read (`O_DIRECT`): each read of a FUSE file reaches the
    /// daemon, which finds its cache files in memory, so the pass times the daemon's read path
    /// alone (with the disk in it, pairs varied by 2× and drowned what metrics cost).
    Direct,
}

/// Opens `path` for a pass that starts `cold`.
fn open_cold(path: &Path, cold: Cold) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    match cold {
        Cold::Disk => drop_caches()?,
        Cold::Direct => {
            o.custom_flags(nix::fcntl::OFlag::O_DIRECT.bits());
        }
    }
    o.open(path)
        .with_context(|| format!("open {}", path.display()))
}

/// MiB/s of one sequential pass over `path` with 1 MiB reads, starting `cold`.
fn seq_read(path: &Path, cold: Cold) -> Result<f64> {
    let mut f = open_cold(path, cold)?;
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64())
}

fn mount(
    dir: &Path,
    name: &str,
    source: Arc<dyn LayerSource>,
    toc: &str,
    opts: &LayerOptions,
    fetcher: Option<Arc<BackgroundFetcher>>,
) -> Result<stargz::MountedLayer> {
    let mnt = dir.join(name);
    std::fs::create_dir_all(&mnt)?;
    let spec = LayerSpec {
        digest: format!("sha256:{name}"),
        source,
        toc_digest: Some(toc.to_string()),
    };
    let reader = open_layer(
        spec,
        &dir.join(format!("{name}-cache")),
        &opts.read,
        Arc::new(Priority::default()),
    )?;
    Ok(mount_layer(reader, &mnt, opts, fetcher)?)
}

/// Mounts the local blob as layer `name` and waits until its background fetch has cached all of
/// it; returns the layer and how long the fill took.
fn mount_filled(
    dir: &Path,
    name: &str,
    toc: &str,
    opts: &LayerOptions,
) -> Result<(stargz::MountedLayer, Duration)> {
    let fetcher = Arc::new(BackgroundFetcher::new(
        2,
        Arc::new(Priority::default()),
        16 << 20,
    ));
    let src: Arc<dyn LayerSource> = Arc::new(FileSource::open(&dir.join("blob"))?);
    let layer = mount(dir, name, src, toc, opts, Some(fetcher))?;
    let start = Instant::now();
    while !layer.reader().fully_cached() {
        ensure!(
            start.elapsed() < Duration::from_secs(900),
            "background fetch did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((layer, start.elapsed()))
}

fn cached_throughput(dir: &Path, toc: &str, passthrough: bool, out: &mut String) -> Result<()> {
    let name = if passthrough { "pt" } else { "nopt" };
    let opts = LayerOptions {
        passthrough,
        ..Default::default()
    };
    let (layer, fill) = mount_filled(dir, name, toc, &opts)?;
    let fill_s = fill.as_secs_f64();
    let reads_before = layer.reader().userspace_reads();
    let mut ratios = Vec::new();
    for _ in 0..3 {
        let local = seq_read(&dir.join("data.bin"), Cold::Disk)?;
        let fuse = seq_read(&layer.mountpoint().join("big"), Cold::Disk)?;
        ratios.push((fuse / local, fuse, local));
    }
    ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, fuse, local) = ratios[1];
    let userspace = layer.reader().userspace_reads() - reads_before;
    let line = format!(
        "seq_read_cached passthrough={passthrough}: {fuse:.0} MiB/s vs local {local:.0} MiB/s, ratio {ratio:.2} (median of 3; background fill took {fill_s:.1}s; {userspace} reads served in userspace)\n"
    );
    print!("{line}");
    out.push_str(&line);
    layer.unmount()?;
    std::fs::remove_dir_all(dir.join(format!("{name}-cache")))?;
    Ok(())
}

/// 4 KiB reads per second at `n` pseudo-random offsets of `path`, starting `cold`: with
/// readahead mostly defeated, each is about one FUSE read, so per-read overheads show.
fn random_small_reads(path: &Path, size: u64, n: usize, cold: Cold) -> Result<f64> {
    let f = open_cold(path, cold)?;
    let mut buf = [0u8; 4096];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let start = Instant::now();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (size / 4096)) * 4096;
        f.read_exact_at(&mut buf, off)?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Item 3: the same cached layer mounted twice without passthrough, one with metrics, read in
/// alternation so both see the same machine.
fn metrics_cost(dir: &Path, toc: &str, size: u64, out: &mut String) -> Result<()> {
    const PAIRS: usize = 10;
    let mut layers = Vec::new();
    for (name, metrics) in [("m-off", None), ("m-on", Some(Arc::new(Metrics::new())))] {
        let mut opts = LayerOptions {
            passthrough: false,
            ..Default::default()
        };
        opts.read.metrics = metrics;
        layers.push(mount_filled(dir, name, toc, &opts)?.0);
    }
    let (off, on) = (
        layers[0].mountpoint().join("big"),
        layers[1].mountpoint().join("big"),
    );
    let (mut seq, mut small) = (Vec::new(), Vec::new());
    // One pass each first, so both layers' cache files are in memory for the timed passes.
    seq_read(&off, Cold::Direct)?;
    seq_read(&on, Cold::Direct)?;
    // Which side goes first alternates, so a trend over the run (another process, the disk's
    // own caches) does not favour one side.
    for round in 0..PAIRS {
        let (a, b) = if round % 2 == 0 {
            let a = seq_read(&off, Cold::Direct)?;
            (a, seq_read(&on, Cold::Direct)?)
        } else {
            let b = seq_read(&on, Cold::Direct)?;
            (seq_read(&off, Cold::Direct)?, b)
        };
        seq.push((b / a, b, a));
        let (a, b) = if round % 2 == 0 {
            let a = random_small_reads(&off, size, 20_000, Cold::Direct)?;
            (a, random_small_reads(&on, size, 20_000, Cold::Direct)?)
        } else {
            let b = random_small_reads(&on, size, 20_000, Cold::Direct)?;
            (random_small_reads(&off, size, 20_000, Cold::Direct)?, b)
        };
        small.push((b / a, b, a));
    }
    for v in [&mut seq, &mut small] {
        v.sort_by(|x, y| x.0.total_cmp(&y.0));
    }
    let ratios = |v: &[(f64, f64, f64)]| {
        v.iter()
            .map(|r| format!("{:.3}", r.0))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let m = PAIRS / 2 - 1;
    let line = format!(
        "metrics_cost passthrough=false, daemon's cache files in memory: sequential {:.0} MiB/s with metrics vs {:.0} without, ratio {:.3}; random 4 KiB {:.0} reads/s vs {:.0}, ratio {:.3} (lower medians of {PAIRS} pairs, each side first in turn; all pairs: sequential {}, random {})\n",
        seq[m].1, seq[m].2, seq[m].0, small[m].1, small[m].2, small[m].0, ratios(&seq), ratios(&small)
    );
    print!("{line}");
    out.push_str(&line);
    for (layer, name) in layers.into_iter().zip(["m-off", "m-on"]) {
        layer.unmount()?;
        std::fs::remove_dir_all(dir.join(format!("{name}-cache")))?;
    }
    Ok(())
}

/// The 100 pseudo-random 4 KiB-aligned offsets below `size` of the cold runs (the same in every
/// call, so the local and link runs read the same chunks).
fn random_offsets(size: u64) -> Vec<u64> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..100)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (size / 4096)) * 4096
        })
        .collect()
}

/// Compressed bytes of the distinct chunks the cold reads touch: what an ideal fetcher (one
/// chunk per miss, nothing more) would pull from the registry, and how many chunks that is.
fn ideal_fetch(built: &Built, size: u64) -> (u64, usize) {
    let chunks: std::collections::BTreeSet<u64> =
        random_offsets(size).iter().map(|o| o / CHUNK).collect();
    let bytes = chunks
        .iter()
        .filter_map(|&c| built.gz_sizes.get(c as usize))
        .sum();
    (bytes, chunks.len())
}

/// Latencies of the cold 4 KiB reads of `file` at [`random_offsets`], sorted.
fn random_reads(file: &Path, size: u64) -> Result<Vec<Duration>> {
    let f = File::open(file)?;
    let mut lat = Vec::new();
    let mut buf = [0u8; 4096];
    for off in random_offsets(size) {
        let start = Instant::now();
        f.read_exact_at(&mut buf, off)?;
        lat.push(start.elapsed());
    }
    lat.sort();
    Ok(lat)
}

/// Milliseconds at quantile `q` of sorted latencies.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Layer options of the cold runs: nothing read ahead of the measured reads.
fn cold_options() -> LayerOptions {
    LayerOptions {
        passthrough: false,
        no_prefetch: true,
        ..Default::default()
    }
}

/// Baseline: cold reads with the blob on local disk. Returns the p50 in ms.
fn cold_random_local(dir: &Path, toc: &str, size: u64, out: &mut String) -> Result<f64> {
    let src: Arc<dyn LayerSource> = Arc::new(FileSource::open(&dir.join("blob"))?);
    let layer = mount(dir, "coldlocal", src, toc, &cold_options(), None)?;
    let lat = random_reads(&layer.mountpoint().join("big"), size)?;
    let p50 = quantile_ms(&lat, 0.5);
    let line = format!(
        "cold_random_4k local disk: p50 {p50:.1} ms, p99 {:.1} ms (100 reads; each miss fetches and verifies one 4 MiB chunk)\n",
        quantile_ms(&lat, 0.99)
    );
    print!("{line}");
    out.push_str(&line);
    layer.unmount()?;
    Ok(p50)
}

/// Uploads `file` (digest `digest`) to the link's registry from inside its namespace, where the
/// registry answers on 127.0.0.1 without delay or rate limit (monolithic upload, streamed by curl).
fn push_blob(link: &SlowLink, file: &Path, digest: &str) -> Result<()> {
    let port = link
        .addr()
        .rsplit(':')
        .next()
        .context("link address has no port")?;
    let script = r#"set -euo pipefail
loc=$(curl -sS --fail -i -X POST "$1" | tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
[ -n "$loc" ] || { echo "no upload location" >&2; exit 1; }
case $loc in *\?*) sep='&';; *) sep='?';; esac
curl -sS --fail -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' -T "$2" "$loc${sep}digest=$3""#;
    let start_url = format!("http://127.0.0.1:{port}/v2/{REPO}/blobs/uploads/");
    let file = file.to_str().context("blob path is not UTF-8")?;
    link.exec(&["bash", "-c", script, "push", &start_url, file, digest])?;
    Ok(())
}

/// The registry client the daemon would build for a config naming `addr` as an insecure mirror
/// of itself (`[[resolver.host."ADDR".mirrors]] host = "ADDR" insecure = true`).
fn link_client(addr: &str) -> Result<RegistryClient> {
    let mirror = MirrorConfig {
        host: addr.to_string(),
        insecure: true,
        ..Default::default()
    };
    let mut resolver = ResolverConfig::default();
    resolver.host.insert(
        addr.to_string(),
        HostConfig {
            mirrors: vec![mirror],
        },
    );
    Ok(RegistryClient::new(ClientConfig {
        resolver,
        ..ClientConfig::default()
    })?)
}

/// Bytes the registry has served through the link, read after the proxy's counters flushed.
fn served_settled(link: &SlowLink) -> Result<u64> {
    std::thread::sleep(Duration::from_millis(300));
    link.served_bytes()
}

/// Cold reads with the blob in a registry behind the slow link, through the daemon's read path.
fn cold_random_link(
    dir: &Path,
    built: &Built,
    size: u64,
    local_p50: f64,
    rt: &tokio::runtime::Runtime,
    out: &mut String,
) -> Result<()> {
    // Declared first so it is dropped last: the layer is unmounted before the link goes down.
    let link = SlowLink::up(LINK_RATE, LINK_DELAY_MS)?;
    let push_start = Instant::now();
    push_blob(&link, &dir.join("blob"), &built.blob)?;
    let push_s = push_start.elapsed().as_secs_f64();
    let resolver = RegistryResolver::new(link_client(link.addr())?, rt.handle().clone());
    let reference = format!("{}/{REPO}:latest", link.addr());
    let mount_start = Instant::now();
    let src = resolver.resolve(&reference, &built.blob)?;
    let layer = mount(dir, "coldlink", src, &built.toc, &cold_options(), None)?;
    let mount_s = mount_start.elapsed().as_secs_f64();
    let before = served_settled(&link)?;
    let lat = random_reads(&layer.mountpoint().join("big"), size)?;
    let served = served_settled(&link)?.saturating_sub(before);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let p50 = quantile_ms(&lat, 0.5);
    let (ideal, chunks) = ideal_fetch(built, size);
    let line = format!(
        "cold_random_4k link={LINK_RATE}/{}ms: p50 {p50:.1} ms ({:.1}x local disk), p99 {:.1} ms, served {:.1} MiB \
         (100 reads; registry behind scripts/netlink.sh, read through fs::RegistryResolver)\n  \
         served / compressed size of the {chunks} distinct chunks read ({:.1} MiB): {:.2}x; \
         mount incl. TOC {mount_s:.2}s, {:.0} KiB served; push inside the namespace {push_s:.1}s\n",
        2 * LINK_DELAY_MS,
        p50 / local_p50,
        quantile_ms(&lat, 0.99),
        mib(served),
        mib(ideal),
        served as f64 / ideal.max(1) as f64,
        before as f64 / 1024.0,
    );
    print!("{line}");
    out.push_str(&line);
    layer.unmount()?;
    drop(link);
    Ok(())
}

fn main() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "fs_read bench needs root and /dev/fuse"
    );
    let mib: u64 = std::env::var("FS_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let size = mib << 20;
    let tmp = tempfile::Builder::new()
        .prefix("fs-bench")
        .tempdir_in("/var/tmp")?;
    let built = build(tmp.path(), size)?;
    // The registry client and resolver run on this runtime; the fs parts call in from plain threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let blob_mib = std::fs::metadata(tmp.path().join("blob"))?.len() as f64 / (1 << 20) as f64;
    let mut out = format!(
        "# fs_read benchmark: one {mib} MiB file in an eStargz layer ({blob_mib:.0} MiB blob), 4 MiB chunks\n"
    );
    cached_throughput(tmp.path(), &built.toc, true, &mut out)?;
    cached_throughput(tmp.path(), &built.toc, false, &mut out)?;
    metrics_cost(tmp.path(), &built.toc, size, &mut out)?;
    let local_p50 = cold_random_local(tmp.path(), &built.toc, size, &mut out)?;
    cold_random_link(tmp.path(), &built, size, local_p50, &rt, &mut out)?;
    rt.shutdown_background();
    std::fs::create_dir_all("bench-results")?;
    std::fs::write("bench-results/fs_read.txt", &out)?;
    Ok(())
}
