//! The on-disk cache's byte budget on a real FUSE mount (needs root and /dev/fuse): a budget
//! smaller than the layer, everything read twice (and raced by concurrent readers while the
//! page cache is dropped under them), the right bytes every time, and the cache's disk usage
//! never above the budget plus the one chunk a reader is fetching.

mod fs_support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use fs_support::*;
use stargz::{
    mount_layer, open_layer, CacheBudget, LayerOptions, LayerSpec, Priority, ReadOptions,
};

const CHUNK: u64 = 1 << 20;
const BUDGET: u64 = 3 << 20;
/// What the kernel may allocate beyond the 4 KiB blocks the budget counts (none seen on ext4).
const SLACK: u64 = 256 << 10;

/// Bytes the files under `dir` take on disk.
fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Regular files under `dir`, relative.
fn files(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir.join(rel))? {
        let e = e?;
        let ft = e.file_type()?;
        let p = rel.join(e.file_name());
        if ft.is_dir() {
            files(dir, &p, out)?;
        } else if ft.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

#[test]
fn a_budget_smaller_than_the_layer_holds_and_every_read_stays_right() -> Result<()> {
    require_root();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    std::fs::create_dir(&src)?;
    make_rootfs(&src)?;
    let mut blob = Vec::new();
    let toc_digest = estargz_from_tar(&tar_dir(&src)?, CHUNK, None, &mut blob)?;
    let mut all = Vec::new();
    files(&src, Path::new(""), &mut all)?;
    let total: u64 = all
        .iter()
        .map(|p| std::fs::metadata(src.join(p)).map_or(0, |m| m.len()))
        .sum();
    ensure!(
        total > 3 * BUDGET,
        "the layer ({total} B) must be much larger than the budget"
    );

    let budget = CacheBudget::new(BUDGET);
    let opts = LayerOptions {
        read: ReadOptions {
            budget: Some(budget.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    let spec = LayerSpec {
        digest: "sha256:budget".into(),
        source: FaultySource::new(blob),
        toc_digest: Some(toc_digest),
    };
    let cache_dir = tmp.path().join("cache");
    let reader = open_layer(spec, &cache_dir, &opts.read, Arc::new(Priority::default()))?;
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    let layer = mount_layer(reader, &mnt, &opts, None)?;

    // Everything, twice, one reader: right bytes, disk within the budget after every file.
    let mut peak = 0;
    for round in 0..2 {
        drop_page_cache()?;
        for p in &all {
            let got =
                std::fs::read(mnt.join(p)).with_context(|| format!("read {}", p.display()))?;
            ensure!(
                got == std::fs::read(src.join(p))?,
                "round {round}: wrong bytes in {}",
                p.display()
            );
            let du = disk_usage(&cache_dir);
            peak = peak.max(du);
        }
    }
    ensure!(
        peak <= BUDGET + CHUNK + SLACK,
        "cache took {peak} B on disk, budget {BUDGET} + one {CHUNK} B chunk (counted {} B, evicted {} B)",
        budget.used_bytes(),
        budget.evicted_bytes()
    );
    ensure!(budget.evicted_bytes() > 0, "nothing was evicted");
    let state = std::fs::read_to_string(mnt.join(".stargz-snapshotter/sha256:budget.json"))?;
    let state: serde_json::Value = serde_json::from_str(&state)?;
    ensure!(
        state["evictedSize"].as_u64().is_some_and(|e| e > 0),
        "state file: {state}"
    );
    ensure!(
        state["cachedSize"]
            .as_u64()
            .is_some_and(|c| c <= BUDGET + CHUNK),
        "state file: {state}"
    );
    eprintln!(
        "{} files, {total} B, read twice under a {BUDGET} B budget: disk peak {peak} B, evicted {} B",
        all.len(),
        budget.evicted_bytes()
    );

    // Concurrent readers while eviction runs and the page cache is dropped under them.
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let (all, src, mnt, stop) = (all.clone(), src.clone(), mnt.clone(), stop.clone());
            std::thread::spawn(move || -> Result<usize> {
                let mut n = 0;
                let mut i = t * 97;
                while !stop.load(Ordering::SeqCst) {
                    let p = &all[i % all.len()];
                    let got = std::fs::read(mnt.join(p))
                        .with_context(|| format!("read {}", p.display()))?;
                    ensure!(
                        got == std::fs::read(src.join(p))?,
                        "raced read: wrong bytes in {}",
                        p.display()
                    );
                    n += 1;
                    i += 7919;
                }
                Ok(n)
            })
        })
        .collect();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(8) {
        drop_page_cache()?;
        peak = peak.max(disk_usage(&cache_dir));
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::SeqCst);
    let mut reads = 0;
    for r in readers {
        reads += r.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    }
    ensure!(
        peak <= BUDGET + 4 * CHUNK + SLACK,
        "raced: cache took {peak} B, budget {BUDGET} + 4 readers' chunks"
    );
    eprintln!(
        "raced: {reads} reads by 4 readers all right; disk peak {peak} B, evicted {} B",
        budget.evicted_bytes()
    );
    layer.unmount()?;
    Ok(())
}
