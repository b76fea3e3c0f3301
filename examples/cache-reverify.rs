//! Cost of reusing a layer's cache after a daemon restart: fills the cache of one eStargz blob
//! completely, then opens the layer again over the same directory and times the re-hash of
//! every chunk (what a restored mount does before it is served).
//!
//!   cargo run --release --example cache-reverify -- BLOB
use std::sync::Arc;
use std::time::Instant;

use stargz::{open_layer, FileSource, LayerSource, LayerSpec, Priority};

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: cache-reverify BLOB"))?;
    let src: Arc<dyn LayerSource> = Arc::new(FileSource::open(std::path::Path::new(&path))?);
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let cache = dir.path().join("cache");
    let spec = || LayerSpec {
        digest: "sha256:test".into(),
        source: src.clone(),
        toc_digest: None,
    };
    let prio = || Arc::new(Priority::default());

    let t = Instant::now();
    let first = open_layer(spec(), &cache, &Default::default(), prio())?;
    first.prefetch(src.size())?;
    anyhow::ensure!(first.fully_cached(), "prefetch left chunks out");
    let chunks = first.table().blob_order.len();
    let bytes: u64 = first
        .table()
        .nodes()
        .iter()
        .filter(|n| n.kind == stargz::NodeKind::Reg)
        .map(|n| n.size)
        .sum();
    println!(
        "filled cache: {chunks} chunks, {} MB decompressed, in {:?}",
        bytes / 1_000_000,
        t.elapsed()
    );
    drop(first);

    // Cold page cache as after a reboot (best effort: needs root).
    let cold = std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    for (label, drop_first) in [("cold page cache", cold), ("warm page cache", false)] {
        if drop_first {
            let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
        }
        let t = Instant::now();
        let again = open_layer(spec(), &cache, &Default::default(), prio())?;
        let took = t.elapsed();
        anyhow::ensure!(
            again.fully_cached(),
            "re-verification rejected cached chunks"
        );
        anyhow::ensure!(
            again.fetched_size() == src.size(),
            "fetched size not restored"
        );
        println!("re-open with full re-verify ({label}): {took:?}");
    }
    let t = Instant::now();
    let fresh = open_layer(
        spec(),
        &dir.path().join("empty"),
        &Default::default(),
        prio(),
    )?;
    println!(
        "open without a cache (TOC only, baseline): {:?}",
        t.elapsed()
    );
    drop(fresh);
    Ok(())
}
