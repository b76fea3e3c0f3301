//! Conversion throughput: our `estargz::build` vs Go's `ctr-remote image convert --estargz --oci`
//! on the same generated layer (text + binary mix), same gzip level (9), same machine, same run;
//! then the same for zstd:chunked (`--zstdchunked`, zstd level 3 = Go's default), the time to
//! read every file of each blob through the verifying reader (decompression + digest checks), and
//! each blob mounted as a layer from local disk: how long its background fetch takes to cache all
//! of it, then reading every file through the mount (page cache dropped).
//! Writes `bench-results/estargz_convert.txt`. Needs root (containerd) and the test tools.
//!
//! Go's number is the wall time of the whole `ctr-remote image convert` command (it reads the
//! layer from containerd's content store and writes the result back; nothing is subtracted).
//! Ours is `estargz::build` from the same tar.gz file to a file on the same disk.
//! `ESTARGZ_BENCH_MB` sets the layer size (default 128 MiB uncompressed).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write as _;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use common::*;
use stargz::estargz::{self, BuildOptions, EntryType, Format};
use stargz::{
    mount_layer, open_layer, BackgroundFetcher, FileSource, LayerOptions, LayerSource, LayerSpec,
    Priority,
};

/// xorshift64*: deterministic content without a rand dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

const WORDS: &[&str] = &[
    "the",
    "container",
    "layer",
    "snapshot",
    "registry",
    "fn",
    "let",
    "mut",
    "return",
    "import",
    "package",
    "struct",
    "impl",
    "error",
    "config",
    "value",
    "{",
    "}",
    "(",
    ")",
    ";",
    "if",
    "else",
    "for",
    "while",
    "0x1f",
    "lib",
    "usr",
    "share",
    "doc",
    "README",
    "license",
    "copyright",
    "GNU",
    "version",
    "main",
    "print",
    "self",
    "string",
    "buffer",
];

fn text_file(rng: &mut Rng, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 16);
    while out.len() < size {
        let w = WORDS[(rng.next() % WORDS.len() as u64) as usize];
        out.extend_from_slice(w.as_bytes());
        out.push(if rng.next() % 9 == 0 { b'\n' } else { b' ' });
    }
    out.truncate(size);
    out
}

/// Binary-ish: runs of random bytes mixed with repeated structures (like ELF/.so data).
fn binary_file(rng: &mut Rng, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 64);
    while out.len() < size {
        let run = 16 + (rng.next() % 512) as usize;
        if rng.next() % 3 == 0 {
            for _ in 0..run {
                out.push(rng.next() as u8);
            }
        } else {
            let b = rng.next().to_le_bytes();
            for i in 0..run {
                out.push(b[i % 8] & 0x3f);
            }
        }
    }
    out.truncate(size);
    out
}

fn make_layer(total: usize) -> Vec<u8> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut b = tar::Builder::new(Vec::with_capacity(total + total / 8));
    let mut written = 0usize;
    let mut i = 0;
    while written < total {
        let dir = format!("usr/lib/pkg{}", i / 50);
        if i % 50 == 0 {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_mtime(1_700_000_000);
            h.set_size(0);
            h.set_cksum();
            b.append_data(&mut h, format!("{dir}/"), &[][..])
                .expect("dir");
        }
        let size = match rng.next() % 10 {
            0 => (rng.next() % (8 << 20)) as usize,
            1..=3 => (rng.next() % (256 << 10)) as usize,
            _ => (rng.next() % (16 << 10)) as usize,
        };
        let data = if rng.next() % 2 == 0 {
            text_file(&mut rng, size)
        } else {
            binary_file(&mut rng, size)
        };
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append_data(&mut h, format!("{dir}/f{i}"), &data[..])
            .expect("file");
        written += data.len();
        i += 1;
    }
    b.into_inner().expect("tar")
}

/// Our build of `tgz_path` in `format` to `out_path`: (seconds, result).
fn build_ours(
    tgz_path: &std::path::Path,
    out_path: &std::path::Path,
    format: Format,
    level: u32,
) -> (f64, estargz::BuildResult) {
    let t = Instant::now();
    let input = std::fs::File::open(tgz_path).expect("open layer");
    let mut out = std::io::BufWriter::new(std::fs::File::create(out_path).expect("create out"));
    let opts = BuildOptions {
        format,
        compression_level: level,
        ..BuildOptions::default()
    };
    let r = estargz::build(input, &mut out, &opts).expect("build");
    out.flush().expect("flush");
    (t.elapsed().as_secs_f64(), r)
}

/// Seconds to read every regular file of the blob at `path` through the verifying reader.
fn read_all(path: &std::path::Path) -> f64 {
    let blob = std::fs::read(path).expect("read blob");
    let t = Instant::now();
    let opened = estargz::open_blob(&blob[..], blob.len() as u64, None).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    for (id, e) in opened.index.entries() {
        if e.kind != EntryType::Reg {
            continue;
        }
        let mut off = 0;
        while off < e.size {
            let n = estargz::read_file_range(&blob[..], &opened.index, id, off, &mut buf)
                .expect("read");
            off += n as u64;
        }
    }
    t.elapsed().as_secs_f64()
}

/// Mounts the blob at `blob` (TOC digest `toc`) from local disk with a background fetcher:
/// (seconds until every chunk is cached, seconds to then read every file through the mount
/// with the page cache dropped, bytes read).
fn mount_fill_and_read(
    dir: &std::path::Path,
    blob: &std::path::Path,
    toc: &str,
) -> (f64, f64, u64) {
    let name = blob.file_name().and_then(|n| n.to_str()).expect("name");
    let mnt = dir.join(format!("{name}-mnt"));
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let source: Arc<dyn LayerSource> = Arc::new(FileSource::open(blob).expect("blob"));
    let spec = LayerSpec {
        digest: format!("sha256:{name}"),
        source,
        toc_digest: Some(toc.to_string()),
    };
    let opts = LayerOptions::default();
    let fetcher = Arc::new(BackgroundFetcher::new(
        2,
        Arc::new(Priority::default()),
        16 << 20,
    ));
    let t = Instant::now();
    let reader = open_layer(
        spec,
        &dir.join(format!("{name}-cache")),
        &opts.read,
        Arc::new(Priority::default()),
    )
    .expect("open layer");
    let layer = mount_layer(reader, &mnt, &opts, Some(fetcher)).expect("mount");
    while !layer.reader().fully_cached() {
        assert!(
            t.elapsed().as_secs() < 600,
            "background fetch did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let fill = t.elapsed().as_secs_f64();
    std::fs::write("/proc/sys/vm/drop_caches", b"3").expect("drop caches");
    let t = Instant::now();
    let mut bytes = 0u64;
    let mut stack = vec![mnt.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("readdir") {
            let e = e.expect("entry");
            let ty = e.file_type().expect("type");
            if ty.is_dir() {
                stack.push(e.path());
            } else if ty.is_file() {
                bytes += std::fs::read(e.path()).expect("read").len() as u64;
            }
        }
    }
    let read = t.elapsed().as_secs_f64();
    layer.unmount().expect("unmount");
    (fill, read, bytes)
}

/// Wall time of Go's `ctr-remote image convert` with `flags` from `src` to `dst`.
fn convert_go(ctrd: &Containerd, src: &str, dst: &str, flags: &[&str]) -> f64 {
    let t = Instant::now();
    let out = Command::new("ctr-remote")
        .arg("--address")
        .arg(ctrd.socket())
        .args(["-n", "default", "image", "convert"])
        .args(flags)
        .args([src, dst])
        .output()
        .expect("run ctr-remote");
    let s = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "ctr-remote convert {flags:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    s
}

fn main() {
    let mb: usize = std::env::var("ESTARGZ_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let tar = make_layer(mb << 20);
    let tgz = gzip(&tar);
    let diff_id = sha256_digest(&tar);
    let input_mb = tar.len() as f64 / (1 << 20) as f64;
    let work = tempfile::tempdir().expect("tempdir");
    let tgz_path = work.path().join("layer.tar.gz");
    std::fs::write(&tgz_path, &tgz).expect("write layer");

    // Ours.
    let out_path = work.path().join("ours.esgz");
    let (ours_s, res) = build_ours(&tgz_path, &out_path, Format::Gzip, 9);
    let zstd_path = work.path().join("ours.zstd");
    let (ours_z_s, res_z) = build_ours(&tgz_path, &zstd_path, Format::ZstdChunked, 3);
    let read_gz = read_all(&out_path);
    let read_z = read_all(&zstd_path);
    let (fill_gz, mnt_gz, bytes_gz) = mount_fill_and_read(work.path(), &out_path, &res.toc_digest);
    let (fill_z, mnt_z, bytes_z) = mount_fill_and_read(work.path(), &zstd_path, &res_z.toc_digest);
    assert_eq!(bytes_gz, bytes_z, "both mounts hold the same files");

    // Go, through containerd (the way users run it).
    require_tool("ctr-remote");
    let reg = Registry::start();
    let ctrd = Containerd::start(ContainerdOpts::default());
    let src = push_image(
        &reg,
        "bench/src",
        "v1",
        &[Layer::from_blob(
            tgz.clone(),
            MEDIA_TYPE_LAYER_GZIP,
            &diff_id,
        )],
    );
    ctrd.ctr_ok(&["image", "pull", "--plain-http", &src]);
    let dst = format!("{}/bench/esgz:v1", reg.addr());
    let go_s = convert_go(
        &ctrd,
        &src,
        &dst,
        &["--estargz", "--oci", "--estargz-compression-level", "9"],
    );
    let dst_z = format!("{}/bench/zstd:v1", reg.addr());
    let go_z_s = convert_go(&ctrd, &src, &dst_z, &["--zstdchunked", "--oci"]);

    let ours = input_mb / ours_s;
    let go = input_mb / go_s;
    let (ours_z, go_z) = (input_mb / ours_z_s, input_mb / go_z_s);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let report = format!(
        "estargz_convert: tar.gz layer -> eStargz, gzip level 9, chunk 4 MiB, same input, same run\n\
         input: {input_mb:.1} MiB uncompressed ({} MiB gzip), cpus: {cpus}, loadavg: {}\n\
         ours (estargz::build, {} threads):        {ours_s:.2} s  {ours:.1} MiB/s  (blob {:.1} MiB)\n\
         go   (ctr-remote image convert --estargz): {go_s:.2} s  {go:.1} MiB/s  (wall time of the command, nothing subtracted)\n\
         ratio ours/go throughput: {:.2}x\n\
         zstd:chunked, zstd level 3 (Go's default), same input:\n\
         ours (estargz::build):                       {ours_z_s:.2} s  {ours_z:.1} MiB/s  (blob {:.1} MiB)\n\
         go   (ctr-remote image convert --zstdchunked): {go_z_s:.2} s  {go_z:.1} MiB/s\n\
         ratio ours/go throughput: {:.2}x\n\
         reading every file of our blob through the verifying reader (one thread):\n\
         eStargz {read_gz:.2} s ({:.0} MiB/s), zstd:chunked {read_z:.2} s ({:.0} MiB/s): zstd {:.2}x faster\n\
         mounted from local disk, background fetch until all is cached, then every file read through the mount:\n\
         eStargz fill {fill_gz:.2} s + read {mnt_gz:.2} s, zstd:chunked fill {fill_z:.2} s + read {mnt_z:.2} s: fill {:.2}x, read {:.2}x (zstd over eStargz)\n",
        tgz.len() >> 20,
        load.trim(),
        cpus,
        res.blob_size as f64 / (1 << 20) as f64,
        ours / go,
        res_z.blob_size as f64 / (1 << 20) as f64,
        ours_z / go_z,
        input_mb / read_gz,
        input_mb / read_z,
        read_gz / read_z,
        fill_z / fill_gz,
        mnt_z / mnt_gz,
    );
    print!("{report}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results");
    std::fs::create_dir_all(&dir).expect("mkdir bench-results");
    std::fs::write(dir.join("estargz_convert.txt"), report).expect("write results");
}
