//! The daemon's own read path under a faulty registry: a layer mounted through FUSE by the
//! `LayerManager`, its blob served by docker-registry behind a proxy that breaks responses —
//! resets, truncations, stalls, 503s and flipped bytes. Every range of more than 256 KiB meets a
//! fault, so no large chunk arrives in one piece. Reading every file must give the right bytes
//! and no EIO: broken transfers resume from the first missing byte, corrupted chunks are
//! fetched again. Needs root, /dev/fuse, docker-registry and skopeo.

mod common;
mod fs_support;
mod remote_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use fs_support::*;
use remote_support::{Action, Fault, Proxy, ProxyRequest};
use stargz::RemoteLayers;
use stargz::{BlobConfig, ClientConfig, RegistryClient};
use stargz::{FsConfig, LayerManager, RegistryResolver};

/// Responses larger than this always break somewhere.
const LARGE: u64 = 256 << 10;

/// Bytes asked by a `Range: bytes=a-b` header.
fn range_len(req: &ProxyRequest) -> Option<u64> {
    let spec = req.header("range")?.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    Some(b.parse::<u64>().ok()? + 1 - a.parse::<u64>().ok()?)
}

/// Which faults were injected, by kind (reset, truncate, stall, 503, corrupt).
#[derive(Default, Debug)]
struct Injected([u32; 5]);

#[test]
fn every_file_reads_right_through_a_faulty_registry() -> Result<()> {
    require_root();
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("stargz=info")
        .try_init();
    let tmp = tempfile::tempdir()?;
    // Big chunks: a 4 MiB chunk never arrives in one response.
    let (src, blob, toc_digest, diff_id) = rootfs_estargz(tmp.path(), 4 << 20)?;
    let (registry, reference, digest) = common::serve_layer(blob, &diff_id, "fs/faults");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let armed = Arc::new(AtomicBool::new(false));
    let injected = Arc::new(Mutex::new(Injected::default()));
    let rng = Mutex::new(0x9e37_79b9_7f4a_7c15u64);
    // Which fault comes next, for large and for small requests: taken in turn rather than at
    // random, so that every kind is met however many requests the tree (a copy of the host's
    // /etc among others) happens to need.
    let turns = Mutex::new((0usize, 0usize));
    let (armed2, injected2) = (armed.clone(), injected.clone());
    let policy = move |req: &ProxyRequest| {
        let Some(len) = range_len(req).filter(|_| armed2.load(Ordering::SeqCst)) else {
            return Action::Forward(Fault::None);
        };
        let roll = || {
            let mut r = rng.lock().unwrap_or_else(|e| e.into_inner());
            *r ^= *r << 13;
            *r ^= *r >> 7;
            *r ^= *r << 17;
            *r
        };
        let at = 0.1 + (roll() % 80) as f64 / 100.0;
        let mut turns = turns.lock().unwrap_or_else(|e| e.into_inner());
        let kind = if len > LARGE {
            turns.0 += 1;
            turns.0 % 3
        } else if roll() % 10 < 3 {
            turns.1 += 1;
            turns.1 % 5
        } else {
            return Action::Forward(Fault::None);
        };
        if let Ok(mut i) = injected2.lock() {
            i.0[kind] += 1;
        }
        Action::Forward(match kind {
            0 => Fault::Reset(at),
            1 => Fault::Truncate(at),
            2 => Fault::Stall(at, Duration::from_secs(2)),
            3 => Fault::Status(503),
            _ => Fault::Corrupt(at),
        })
    };
    let proxy = rt.block_on(Proxy::start(registry.addr(), Arc::new(policy)))?;
    let reference = reference.replacen(registry.addr(), &proxy.addr, 1);

    let client = RegistryClient::new(ClientConfig {
        blob: BlobConfig {
            max_retries: 30,
            min_wait_msec: 5,
            max_wait_msec: 50,
            stall_timeout_msec: 500,
            fetching_timeout_sec: 10,
            ..Default::default()
        },
        ..Default::default()
    })?;
    let resolver = RegistryResolver::new(client, rt.handle().clone());
    let mut cfg = FsConfig::new(&tmp.path().join("root"));
    cfg.no_background_fetch = true;
    cfg.layer.read.fetch_attempts = 10;
    // A small fixed read-ahead: spans of several small files, and still many small requests, so
    // every kind of fault meets both (the measured read-ahead of a local registry would fetch the
    // tree in a few large spans, which only ever get the first three kinds).
    cfg.layer.read.readahead_bytes = Some(64 << 10);
    let mgr = LayerManager::new(cfg, Arc::new(resolver))?;
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    let labels = stargz_labels(&reference, &digest, &toc_digest);
    mgr.mount(&mnt, &labels, &[])
        .map_err(|e| anyhow!("mount: {e}"))?;
    let _guard = UmountGuard(mnt.clone());
    armed.store(true, Ordering::SeqCst);

    let n = compare_trees(&src, &mnt)?;
    ensure!(n > 100, "compared only {n} paths");
    let injected = injected.lock().map_err(|_| anyhow!("poisoned"))?;
    eprintln!(
        "{n} paths read right; faults injected (reset, truncate, stall, 503, corrupt): {:?}",
        injected.0
    );
    ensure!(
        injected.0.iter().all(|&k| k > 0),
        "not every kind of fault was injected: {:?}",
        injected.0
    );
    mgr.unmount(&mnt).map_err(|e| anyhow!("unmount: {e}"))?;
    Ok(())
}

/// Once the daemon knows its link it locates a blob with a suffix range (`bytes=-N`) that also
/// brings the footer and TOC. A registry (or proxy) that ignores the range and sends the whole
/// blob, or refuses it with 416, still gets its layers mounted: the plain probe follows.
#[test]
fn registries_that_ignore_or_refuse_suffix_ranges_still_mount() -> Result<()> {
    require_root();
    let tmp = tempfile::tempdir()?;
    let (src, blob, toc_digest, diff_id) = rootfs_estargz(tmp.path(), 1 << 20)?;
    let (registry, reference, digest) = common::serve_layer(blob, &diff_id, "fs/suffix");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    for (name, fault) in [("whole-blob", Fault::FullBody), ("416", Fault::Status(416))] {
        let suffixes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = suffixes.clone();
        let policy = move |req: &ProxyRequest| {
            if req
                .header("range")
                .is_some_and(|r| r.starts_with("bytes=-"))
            {
                seen.fetch_add(1, Ordering::SeqCst);
                return Action::Forward(fault);
            }
            Action::Forward(Fault::None)
        };
        let proxy = rt.block_on(Proxy::start(registry.addr(), Arc::new(policy)))?;
        let reference = reference.replacen(registry.addr(), &proxy.addr, 1);
        let client = RegistryClient::new(ClientConfig::default())?;
        let mut cfg = FsConfig::new(&tmp.path().join(format!("root-{name}")));
        cfg.no_background_fetch = true;
        let resolver = RegistryResolver::new(client, rt.handle().clone())
            .with_link(cfg.layer.read.link.clone());
        let mgr = LayerManager::new(cfg, Arc::new(resolver))?;
        let labels = stargz_labels(&reference, &digest, &toc_digest);
        let mut guards = Vec::new();
        for i in 0..2 {
            let mnt = tmp.path().join(format!("mnt-{name}-{i}"));
            std::fs::create_dir(&mnt)?;
            mgr.mount(&mnt, &labels, &[])
                .map_err(|e| anyhow!("{name}: mount {i}: {e}"))?;
            guards.push(UmountGuard(mnt.clone()));
            let n = compare_trees(&src, &mnt)?;
            ensure!(n > 100, "{name}: compared only {n} paths");
        }
        ensure!(
            suffixes.load(Ordering::SeqCst) >= 1,
            "{name}: the second mount did not try a suffix range"
        );
        for g in &guards {
            mgr.unmount(&g.0).map_err(|e| anyhow!("unmount: {e}"))?;
        }
    }
    Ok(())
}
