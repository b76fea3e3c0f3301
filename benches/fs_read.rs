//! Read benchmark of a mounted eStargz layer (needs root and /dev/fuse). Not a timed test.
//!
//! 1. Sequential read of a 1 GiB file once fully cached, as a ratio to reading the same bytes
//!    from a plain local file in the same run (page cache dropped before each pass), with and
//!    without FUSE passthrough.
//! 2. Cold random 4 KiB reads (empty cache, no prefetch or background fetch): p50/p99 latency
//!    with the blob on local disk, and behind a source that adds 20 ms per range request
//!    (an in-process stand-in for a 20 ms RTT registry link).
//!
//! Writes `bench-results/fs_read.txt`. Size can be lowered with `FS_BENCH_MIB` (default 1024).

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
use stargz::fs::{
    mount_layer, open_layer, BackgroundFetcher, FileSource, LayerOptions, LayerSource, LayerSpec, Priority,
};

const CHUNK: u64 = 4 << 20;

/// Deterministic data that gzip shrinks to roughly half (like binaries).
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

/// Writes `data.bin` (plain) and `blob` (eStargz with one big file `big`), streaming.
fn build(dir: &Path, size: u64) -> Result<String> {
    let mut plain = BufWriter::new(File::create(dir.join("data.bin"))?);
    let mut blob = CountingFile { f: BufWriter::new(File::create(dir.join("blob"))?), n: 0 };
    let mut toc = Toc { version: 1, entries: Vec::new() };
    let mut whole = Sha256::new();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < size {
        let n = CHUNK.min(size - off);
        fill(&mut buf[..n as usize], off / CHUNK + 1);
        let data = &buf[..n as usize];
        plain.write_all(data)?;
        whole.update(data);
        let mut e = if off == 0 {
            TocEntry { name: "big".into(), kind: EntryType::Reg, size: size as i64, mode: 0o644, ..Default::default() }
        } else {
            TocEntry { name: "big".into(), kind: EntryType::Chunk, ..Default::default() }
        };
        e.offset = blob.n as i64;
        e.chunk_offset = off as i64;
        if n == CHUNK {
            e.chunk_size = n as i64;
        }
        e.chunk_digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(data)?;
        blob.write(&gz.finish()?)?;
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
    let mut footer = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0];
    footer.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    footer.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    blob.write(&footer)?;
    blob.f.flush()?;
    plain.flush()?;
    Ok(format!("sha256:{}", hex::encode(Sha256::digest(&json))))
}

struct CountingFile {
    f: BufWriter<File>,
    n: u64,
}

impl CountingFile {
    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.f.write_all(b)?;
        self.n += b.len() as u64;
        Ok(())
    }
}

/// Adds a fixed delay to every range request (stand-in for a registry round trip).
struct Delayed {
    inner: FileSource,
    delay: Duration,
}

impl LayerSource for Delayed {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn fetch(&self, offset: u64, len: u64, sink: &mut (dyn Write + Send)) -> std::io::Result<()> {
        std::thread::sleep(self.delay);
        self.inner.fetch(offset, len, sink)
    }
}

fn drop_caches() -> Result<()> {
    std::fs::write("/proc/sys/vm/drop_caches", b"1").context("drop_caches (root needed)")
}

/// MiB/s of one sequential pass over `path` with 1 MiB reads, page cache dropped first.
fn seq_read(path: &Path) -> Result<f64> {
    drop_caches()?;
    let mut f = File::open(path)?;
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
) -> Result<stargz::fs::MountedLayer> {
    let mnt = dir.join(name);
    std::fs::create_dir_all(&mnt)?;
    let spec = LayerSpec { digest: format!("sha256:{name}"), source, toc_digest: Some(toc.to_string()) };
    let reader = open_layer(spec, &dir.join(format!("{name}-cache")), &opts.read, Arc::new(Priority::default()))?;
    Ok(mount_layer(reader, &mnt, opts, fetcher)?)
}

fn cached_throughput(dir: &Path, toc: &str, passthrough: bool, out: &mut String) -> Result<()> {
    let name = if passthrough { "pt" } else { "nopt" };
    let fetcher = Arc::new(BackgroundFetcher::new(2, Arc::new(Priority::default()), 16 << 20));
    let opts = LayerOptions { passthrough, ..Default::default() };
    let src: Arc<dyn LayerSource> = Arc::new(FileSource::open(&dir.join("blob"))?);
    let layer = mount(dir, name, src, toc, &opts, Some(fetcher))?;
    let start = Instant::now();
    while !layer.reader().fully_cached() {
        ensure!(start.elapsed() < Duration::from_secs(900), "background fetch did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let fill_s = start.elapsed().as_secs_f64();
    let mut ratios = Vec::new();
    for _ in 0..3 {
        let local = seq_read(&dir.join("data.bin"))?;
        let fuse = seq_read(&layer.mountpoint().join("big"))?;
        ratios.push((fuse / local, fuse, local));
    }
    ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, fuse, local) = ratios[1];
    let line = format!(
        "seq_read_cached passthrough={passthrough}: {fuse:.0} MiB/s vs local {local:.0} MiB/s, ratio {ratio:.2} (median of 3; background fill took {fill_s:.1}s)\n"
    );
    print!("{line}");
    out.push_str(&line);
    layer.unmount()?;
    std::fs::remove_dir_all(dir.join(format!("{name}-cache")))?;
    Ok(())
}

fn cold_random(dir: &Path, toc: &str, size: u64, delay: Duration, out: &mut String) -> Result<()> {
    let name = format!("cold{}", delay.as_millis());
    let opts = LayerOptions { passthrough: false, ..Default::default() };
    let src: Arc<dyn LayerSource> = Arc::new(Delayed { inner: FileSource::open(&dir.join("blob"))?, delay });
    let layer = mount(dir, &name, src, toc, &opts, None)?;
    let f = File::open(layer.mountpoint().join("big"))?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut lat = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..100 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (size / 4096)) * 4096;
        let start = Instant::now();
        f.read_exact_at(&mut buf, off)?;
        lat.push(start.elapsed());
    }
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)].as_secs_f64() * 1000.0;
    let line = format!(
        "cold_random_4k added_rtt={}ms: p50 {:.1} ms, p99 {:.1} ms (100 reads; each miss fetches and verifies one 4 MiB chunk)\n",
        delay.as_millis(),
        p(0.5),
        p(0.99)
    );
    print!("{line}");
    out.push_str(&line);
    drop(f);
    layer.unmount()?;
    Ok(())
}

fn main() -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "fs_read bench needs root and /dev/fuse");
    let mib: u64 = std::env::var("FS_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let size = mib << 20;
    let tmp = tempfile::Builder::new().prefix("fs-bench").tempdir_in("/var/tmp")?;
    let toc = build(tmp.path(), size)?;
    let mut out = format!("# fs_read benchmark: one {mib} MiB file in an eStargz layer, 4 MiB chunks\n");
    cached_throughput(tmp.path(), &toc, true, &mut out)?;
    cached_throughput(tmp.path(), &toc, false, &mut out)?;
    cold_random(tmp.path(), &toc, size, Duration::ZERO, &mut out)?;
    cold_random(tmp.path(), &toc, size, Duration::from_millis(20), &mut out)?;
    std::fs::create_dir_all("bench-results")?;
    std::fs::write("bench-results/fs_read.txt", &out)?;
    Ok(())
}
