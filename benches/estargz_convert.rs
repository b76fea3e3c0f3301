//! Conversion throughput: our `estargz::build` vs Go's `ctr-remote image convert --estargz --oci`
//! on the same generated layer (text + binary mix), same gzip level (9), same machine, same run.
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
use std::time::Instant;

use common::*;
use stargz::estargz::{self, BuildOptions};

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
    let t = Instant::now();
    let res = {
        let input = std::fs::File::open(&tgz_path).expect("open layer");
        let mut out =
            std::io::BufWriter::new(std::fs::File::create(&out_path).expect("create out"));
        let r = estargz::build(input, &mut out, &BuildOptions::default()).expect("build");
        out.flush().expect("flush");
        r
    };
    let ours_s = t.elapsed().as_secs_f64();

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
    let t = Instant::now();
    let out = Command::new("ctr-remote")
        .arg("--address")
        .arg(ctrd.socket())
        .args([
            "-n",
            "default",
            "image",
            "convert",
            "--estargz",
            "--oci",
            "--estargz-compression-level",
            "9",
            &src,
            &dst,
        ])
        .output()
        .expect("run ctr-remote");
    let go_s = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "ctr-remote convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ours = input_mb / ours_s;
    let go = input_mb / go_s;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let report = format!(
        "estargz_convert: tar.gz layer -> eStargz, gzip level 9, chunk 4 MiB, same input, same run\n\
         input: {input_mb:.1} MiB uncompressed ({} MiB gzip), cpus: {cpus}, loadavg: {}\n\
         ours (estargz::build, {} threads):        {ours_s:.2} s  {ours:.1} MiB/s  (blob {:.1} MiB)\n\
         go   (ctr-remote image convert --estargz): {go_s:.2} s  {go:.1} MiB/s  (wall time of the command, nothing subtracted)\n\
         ratio ours/go throughput: {:.2}x\n",
        tgz.len() >> 20,
        load.trim(),
        cpus,
        res.blob_size as f64 / (1 << 20) as f64,
        ours / go,
    );
    print!("{report}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results");
    std::fs::create_dir_all(&dir).expect("mkdir bench-results");
    std::fs::write(dir.join("estargz_convert.txt"), report).expect("write results");
}
