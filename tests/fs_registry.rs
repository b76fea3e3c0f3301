//! A layer served from a real registry (Debian's docker-registry on 127.0.0.1) through
//! `remote`, mounted by the `LayerManager` the daemon uses. Needs root, /dev/fuse, skopeo.

mod common;
mod fs_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use fs_support::*;
use stargz::RemoteLayers;
use stargz::{FsConfig, LayerManager, RegistryResolver};

#[test]
fn layer_from_registry_matches_source_and_survives_registry_stop() -> Result<()> {
    require_root();
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("stargz=info")
        .try_init();
    let tmp = tempfile::tempdir()?;
    let (src, blob, toc_digest, diff_id) = rootfs_estargz(tmp.path(), 1 << 20)?;
    let (registry, reference, digest) = common::serve_layer(blob, &diff_id, "fs/rootfs");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = stargz::RegistryClient::new(stargz::ClientConfig::default())?;
    let resolver = RegistryResolver::new(client, rt.handle().clone());
    let mut cfg = FsConfig::new(&tmp.path().join("root"));
    cfg.max_concurrency = 2;
    let mgr = LayerManager::new(cfg, Arc::new(resolver))?;

    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    let labels = stargz_labels(&reference, &digest, &toc_digest);
    mgr.mount(&mnt, &labels)
        .map_err(|e| anyhow!("mount: {e}"))?;
    let _guard = UmountGuard(mnt.clone());
    let n = compare_trees(&src, &mnt)?;
    ensure!(n > 100, "compared only {n} paths");
    mgr.check(&mnt, &labels)
        .map_err(|e| anyhow!("check: {e}"))?;

    let start = Instant::now();
    while !mgr
        .with_layer(&mnt, |l| l.reader().fully_cached())
        .unwrap_or(false)
    {
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "background fetch did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(registry);
    std::fs::write("/proc/sys/vm/drop_caches", b"1")?;
    compare_trees(&src, &mnt)?;
    ensure!(
        mgr.check(&mnt, &labels).is_err(),
        "check must notice the registry is gone"
    );

    mgr.unmount(&mnt).map_err(|e| anyhow!("unmount: {e}"))?;
    rt.shutdown_background();
    Ok(())
}

#[test]
fn once_the_link_is_known_a_layer_mounts_with_one_request() -> Result<()> {
    require_root();
    let tmp = tempfile::tempdir()?;
    let (src, blob, toc_digest, diff_id) = rootfs_estargz(tmp.path(), 1 << 20)?;
    let (registry, reference, digest) = common::serve_layer(blob, &diff_id, "fs/tail");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = stargz::RegistryClient::new(stargz::ClientConfig::default())?;
    let mut cfg = FsConfig::new(&tmp.path().join("root"));
    cfg.no_background_fetch = true;
    let resolver =
        RegistryResolver::new(client, rt.handle().clone()).with_link(cfg.layer.read.link.clone());
    let mgr = LayerManager::new(cfg, Arc::new(resolver))?;
    let labels = stargz_labels(&reference, &digest, &toc_digest);

    // The first mount knows nothing of the link: size, footer, TOC.
    let (first, second) = (tmp.path().join("mnt1"), tmp.path().join("mnt2"));
    std::fs::create_dir(&first)?;
    std::fs::create_dir(&second)?;
    let before = registry.blob_gets();
    mgr.mount(&first, &labels)
        .map_err(|e| anyhow!("mount: {e}"))?;
    let _g1 = UmountGuard(first.clone());
    let cold = registry.blob_gets() - before;
    // The second asks for the blob's tail with its size: footer and TOC come with it.
    let before = registry.blob_gets();
    mgr.mount(&second, &labels)
        .map_err(|e| anyhow!("mount: {e}"))?;
    let _g2 = UmountGuard(second.clone());
    let warm = registry.blob_gets() - before;
    ensure!(
        cold == 3 && warm == 1,
        "blob requests to mount: {cold} cold, {warm} once the link was measured"
    );
    let n = compare_trees(&src, &second)?;
    ensure!(n > 100, "compared only {n} paths");
    mgr.unmount(&first).map_err(|e| anyhow!("unmount: {e}"))?;
    mgr.unmount(&second).map_err(|e| anyhow!("unmount: {e}"))?;
    Ok(())
}
