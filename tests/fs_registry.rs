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
    mgr.mount(&mnt, &labels, &[])
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

    // The first mount knows nothing of the link: the footer with the size, then the TOC.
    let (first, second) = (tmp.path().join("mnt1"), tmp.path().join("mnt2"));
    std::fs::create_dir(&first)?;
    std::fs::create_dir(&second)?;
    let before = registry.blob_gets();
    mgr.mount(&first, &labels, &[])
        .map_err(|e| anyhow!("mount: {e}"))?;
    let _g1 = UmountGuard(first.clone());
    let cold = registry.blob_gets() - before;
    // The second asks for the blob's tail with its size: footer and TOC come with it.
    let before = registry.blob_gets();
    mgr.mount(&second, &labels, &[])
        .map_err(|e| anyhow!("mount: {e}"))?;
    let _g2 = UmountGuard(second.clone());
    let warm = registry.blob_gets() - before;
    ensure!(
        cold == 2 && warm == 1,
        "blob requests to mount: {cold} cold, {warm} once the link was measured"
    );
    let n = compare_trees(&src, &second)?;
    ensure!(n > 100, "compared only {n} paths");
    mgr.unmount(&first).map_err(|e| anyhow!("unmount: {e}"))?;
    mgr.unmount(&second).map_err(|e| anyhow!("unmount: {e}"))?;
    Ok(())
}

/// One layer of a test image: its source tree, blob digest and TOC digest.
type ImageLayer = (std::path::PathBuf, String, String);

/// Three eStargz layers of one image in a fresh registry, with the image reference.
fn three_layer_image(
    dir: &std::path::Path,
    name: &str,
) -> Result<(common::Registry, String, Vec<ImageLayer>)> {
    let mut layers = Vec::new();
    let mut described = Vec::new();
    // Different chunk sizes make three different blobs of the same tree.
    for (i, chunk) in [1u64 << 20, 1 << 18, 1 << 16].into_iter().enumerate() {
        let sub = dir.join(format!("layer{i}"));
        std::fs::create_dir(&sub)?;
        let (src, blob, toc_digest, diff_id) = rootfs_estargz(&sub, chunk)?;
        let layer = common::Layer::from_blob(blob, common::MEDIA_TYPE_LAYER_GZIP, &diff_id);
        described.push((src, layer.digest(), toc_digest));
        layers.push(layer);
    }
    let registry = common::Registry::start();
    let reference = common::push_image(&registry, name, "v1", &layers);
    Ok((registry, reference, described))
}

/// The labels `ctr-remote rpull` gives layer `i`: its own, and the digests of it and the
/// layers above it (`stargz.layers`).
fn rpull_labels(
    reference: &str,
    layers: &[ImageLayer],
    i: usize,
) -> std::collections::BTreeMap<String, String> {
    let mut labels = stargz_labels(reference, &layers[i].1, &layers[i].2);
    let later: Vec<&str> = layers[i..].iter().map(|l| l.1.as_str()).collect();
    labels.insert(
        "containerd.io/snapshot/remote/stargz.layers".into(),
        later.join(","),
    );
    labels
}

/// Mounting the first layer of an image starts locating the layers its labels list after it
/// and fetching their TOCs, so their mounts send no request at all; what was fetched ahead is
/// still checked against each mount's own TOC digest, and an entry no mount claims within
/// `resolve_result_entry_ttl_sec` is dropped.
#[test]
fn layers_listed_after_a_mount_are_resolved_ahead_and_mount_without_a_request() -> Result<()> {
    require_root();
    let tmp = tempfile::tempdir()?;
    let (registry, reference, layers) = three_layer_image(tmp.path(), "fs/ahead")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let manager = |root: &str, ttl: Duration| -> Result<LayerManager> {
        let client = stargz::RegistryClient::new(stargz::ClientConfig::default())?;
        let mut cfg = FsConfig::new(&tmp.path().join(root));
        cfg.no_background_fetch = true;
        let resolver = RegistryResolver::new(client, rt.handle().clone())
            .with_link(cfg.layer.read.link.clone())
            .with_ahead_ttl(ttl);
        Ok(LayerManager::new(cfg, Arc::new(resolver))?)
    };
    let mount = |mgr: &LayerManager,
                 name: &str,
                 labels: &std::collections::BTreeMap<String, String>|
     -> Result<UmountGuard> {
        let mnt = tmp.path().join(name);
        std::fs::create_dir(&mnt)?;
        mgr.mount(&mnt, labels, &[])
            .map_err(|e| anyhow!("mount {name}: {e}"))?;
        Ok(UmountGuard(mnt))
    };

    let mgr = manager("root", Duration::from_secs(120))?;
    let before = registry.blob_gets();
    let _m0 = mount(&mgr, "m0", &rpull_labels(&reference, &layers, 0))?;
    // Each layer, layer 0 for its mount and layers 1 and 2 ahead: its footer with its size,
    // then its TOC.
    let settled = common::wait_until(Duration::from_secs(20), || {
        registry.blob_gets() - before >= 3 * 2
    });
    ensure!(
        settled,
        "layers 1 and 2 were not resolved ahead: {} blob requests",
        registry.blob_gets() - before
    );
    std::thread::sleep(Duration::from_millis(200));
    ensure!(
        registry.blob_gets() - before == 6,
        "{} blob requests",
        registry.blob_gets() - before
    );

    // A mount whose TOC digest does not match what was fetched ahead fails as it would
    // without: layer 1's blob claimed with layer 2's TOC digest.
    let mut wrong = rpull_labels(&reference, &layers, 1);
    wrong.insert(
        "containerd.io/snapshot/stargz/toc.digest".into(),
        layers[2].2.clone(),
    );
    std::fs::create_dir(tmp.path().join("wrong"))?;
    ensure!(
        mgr.mount(&tmp.path().join("wrong"), &wrong, &[]).is_err(),
        "a TOC fetched ahead was served without its digest checked"
    );
    // The claim used it up: layer 1 mounts afresh, layer 2 from what is held.
    let before = registry.blob_gets();
    let m1 = mount(&mgr, "m1", &rpull_labels(&reference, &layers, 1))?;
    let after_m1 = registry.blob_gets() - before;
    let m2 = mount(&mgr, "m2", &rpull_labels(&reference, &layers, 2))?;
    let after_m2 = registry.blob_gets() - before - after_m1;
    ensure!(
        after_m2 == 0 && after_m1 >= 1,
        "blob requests to mount: layer 1 {after_m1} (claimed, then afresh), layer 2 {after_m2}"
    );
    for (guard, (src, _, _)) in [(&m1, &layers[1]), (&m2, &layers[2])] {
        let n = compare_trees(src, &guard.0)?;
        ensure!(n > 100, "compared only {n} paths");
    }

    // Mounted in another order (a restore mounts in parallel, in no order): a layer mounted
    // already is not resolved ahead again. Layer 2, then layer 0 (listing 0, 1, 2): only layer 1
    // is resolved ahead.
    let mgr = manager("root-order", Duration::from_secs(120))?;
    let gets_of = |layer: usize| registry.blob_gets_of(&layers[layer].1);
    let _o2 = mount(&mgr, "o2", &rpull_labels(&reference, &layers, 2))?;
    let (layer1, layer2) = (gets_of(1), gets_of(2));
    let _o0 = mount(&mgr, "o0", &rpull_labels(&reference, &layers, 0))?;
    let ahead = common::wait_until(Duration::from_secs(20), || gets_of(1) > layer1);
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        ahead && gets_of(2) == layer2,
        "after layer 2's mount, layer 0's: {} more requests for layer 1, {} for layer 2",
        gets_of(1) - layer1,
        gets_of(2) - layer2
    );

    // Unclaimed past the TTL: dropped, and the mount asks the registry itself.
    let mgr = manager("root-ttl", Duration::from_secs(1))?;
    let _t0 = mount(&mgr, "t0", &rpull_labels(&reference, &layers, 0))?;
    std::thread::sleep(Duration::from_secs(3));
    let before = registry.blob_gets();
    let _t1 = mount(&mgr, "t1", &rpull_labels(&reference, &layers, 1))?;
    ensure!(
        registry.blob_gets() > before,
        "an entry past its TTL was still used"
    );
    Ok(())
}
