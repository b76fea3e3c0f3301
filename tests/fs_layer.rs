//! A real eStargz layer mounted through FUSE (needs root and /dev/fuse; CI runs as root).

mod fs_support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use fs_support::*;
use stargz::estargz::Format;
use stargz::{
    mount_layer, open_layer, BackgroundFetcher, LayerOptions, LayerSpec, MountedLayer, Priority,
    ReadOptions,
};

struct Fixture {
    _tmp: tempfile::TempDir,
    src: std::path::PathBuf,
    blob: Vec<u8>,
    toc_digest: String,
}

fn fixture(
    build: impl FnOnce(&Path) -> Result<()>,
    landmark_after: Option<usize>,
) -> Result<Fixture> {
    fixture_as(build, landmark_after, Format::Gzip)
}

fn fixture_as(
    build: impl FnOnce(&Path) -> Result<()>,
    landmark_after: Option<usize>,
    format: Format,
) -> Result<Fixture> {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("stargz=debug")
        .try_init();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    std::fs::create_dir(&src)?;
    build(&src)?;
    let tar = tar_dir(&src)?;
    let mut blob = Vec::new();
    let toc_digest = blob_from_tar(&tar, 1 << 20, landmark_after, format, &mut blob)?;
    Ok(Fixture {
        _tmp: tmp,
        src,
        blob,
        toc_digest,
    })
}

fn mount(
    f: &Fixture,
    source: Arc<FaultySource>,
    dir: &Path,
    opts: &LayerOptions,
    fetcher: Option<Arc<BackgroundFetcher>>,
) -> Result<MountedLayer> {
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let spec = LayerSpec {
        digest: "sha256:feedbeef".into(),
        source,
        toc_digest: Some(f.toc_digest.clone()),
    };
    let reader = open_layer(
        spec,
        &dir.join("cache"),
        &opts.read,
        Arc::new(Priority::default()),
    )?;
    Ok(mount_layer(reader, &mnt, opts, fetcher)?)
}

fn as_nobody(args: &[&str]) -> Result<std::process::Output> {
    Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .args(args)
        .output()
        .context("setpriv (util-linux) is required")
}

#[test]
fn mounted_rootfs_matches_source() -> Result<()> {
    require_root();
    let f = fixture(make_rootfs, None)?;
    let work = tempfile::tempdir()?;
    let source = FaultySource::new(f.blob.clone());
    let layer = mount(
        &f,
        source.clone(),
        work.path(),
        &LayerOptions::default(),
        None,
    )?;
    let mnt = layer.mountpoint().to_path_buf();

    let n = compare_trees(&f.src, &mnt)?;
    assert!(n > 100, "compared only {n} paths");
    // Each compressed byte was fetched at most once although big.bin was read in 128 KiB reads.
    assert!(
        source.bytes.load(Ordering::SeqCst) <= f.blob.len() as u64,
        "bytes refetched"
    );

    // The kernel enforces modes for other users (allow_other + default_permissions).
    let out = as_nobody(&["cat", mnt.join("secret").to_str().unwrap_or_default()])?;
    assert!(!out.status.success(), "uid 65534 read a 0600 root file");
    let out = as_nobody(&["cat", mnt.join("public").to_str().unwrap_or_default()])?;
    assert!(
        out.status.success(),
        "uid 65534 cannot read a 0644 file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"everyone\n");

    // Absent names are ENOENT, also when asked again (the kernel caches the negative entry),
    // inside a directory and below a file alike.
    for _ in 0..2 {
        for p in ["no-such-file", "etc/no-such-file", "public/child"] {
            let err = std::fs::symlink_metadata(mnt.join(p)).expect_err("absent name found");
            assert!(
                matches!(err.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)),
                "{p}: {err}"
            );
        }
    }

    // Read-only.
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("public"))
        .expect_err("write open must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert!(std::fs::create_dir(mnt.join("newdir")).is_err());

    // The state file is hidden from readdir but readable, with Go's fields.
    let names: Vec<_> = std::fs::read_dir(&mnt)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(!names.iter().any(|n| n == ".stargz-snapshotter"));
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(
        mnt.join(".stargz-snapshotter/sha256:feedbeef.json"),
    )?)?;
    assert_eq!(state["digest"], "sha256:feedbeef");
    assert_eq!(state["size"], f.blob.len() as u64);
    assert!(state["fetchedSize"].as_u64().unwrap_or(0) > 0);
    assert!(state["fetchedPercent"].as_f64().is_some());
    let sm = std::fs::metadata(mnt.join(".stargz-snapshotter"))?;
    assert_eq!(sm.mode() & 0o7777, 0o500);
    layer.unmount()?;
    Ok(())
}

fn lower_tree(root: &Path) -> Result<()> {
    for d in ["a", "d", "keep"] {
        std::fs::create_dir(root.join(d))?;
    }
    std::fs::write(root.join("a/x"), b"x from lower")?;
    std::fs::write(root.join("a/y"), b"y from lower")?;
    std::fs::write(root.join("d/p"), b"p from lower")?;
    std::fs::write(root.join("d/q"), b"q from lower")?;
    std::fs::write(root.join("keep/k"), b"k")?;
    Ok(())
}

fn upper_tree(root: &Path) -> Result<()> {
    std::fs::create_dir(root.join("a"))?;
    std::fs::create_dir(root.join("d"))?;
    std::fs::write(root.join("a/.wh.x"), b"")?;
    std::fs::write(root.join(".wh.keep"), b"")?;
    std::fs::write(root.join("d/.wh..wh..opq"), b"")?;
    std::fs::write(root.join("d/new"), b"new in upper")?;
    Ok(())
}

#[test]
fn overlay_of_two_layers_honours_whiteouts_and_opaque_dirs() -> Result<()> {
    require_root();
    let lower = fixture(lower_tree, None)?;
    let upper = fixture(upper_tree, None)?;
    let work = tempfile::tempdir()?;
    let l = mount(
        &lower,
        FaultySource::new(lower.blob.clone()),
        &work.path().join("l"),
        &LayerOptions::default(),
        None,
    )?;
    let u = mount(
        &upper,
        FaultySource::new(upper.blob.clone()),
        &work.path().join("u"),
        &LayerOptions::default(),
        None,
    )?;

    // The upper layer itself shows overlayfs conventions.
    let wh = std::fs::symlink_metadata(u.mountpoint().join("a/x"))?;
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(&wh.file_type()) && wh.rdev() == 0);
    assert!(!u.mountpoint().join("d/.wh..wh..opq").exists());
    assert_eq!(
        xattrs(&u.mountpoint().join("d"))?
            .get("trusted.overlay.opaque")
            .map(Vec::as_slice),
        Some(&b"y"[..])
    );

    let merged = work.path().join("merged");
    std::fs::create_dir(&merged)?;
    let opts = format!(
        "lowerdir={}:{}",
        u.mountpoint().display(),
        l.mountpoint().display()
    );
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&merged)
        .status()?;
    ensure!(st.success(), "overlay mount failed");
    let _g = UmountGuard(merged.clone());
    assert!(!merged.join("a/x").exists(), "whiteout did not hide a/x");
    assert_eq!(std::fs::read(merged.join("a/y"))?, b"y from lower");
    assert!(
        !merged.join("keep").exists(),
        "whiteout did not hide dir keep"
    );
    assert!(
        !merged.join("d/p").exists() && !merged.join("d/q").exists(),
        "opaque dir leaked lower entries"
    );
    assert_eq!(std::fs::read(merged.join("d/new"))?, b"new in upper");
    drop(_g);
    u.unmount()?;
    l.unmount()?;
    Ok(())
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !cond() {
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[test]
fn fully_fetched_layer_survives_registry_going_down() -> Result<()> {
    require_root();
    let f = fixture(make_rootfs, None)?;
    let work = tempfile::tempdir()?;
    let source = FaultySource::new(f.blob.clone());
    let priority = Arc::new(Priority::default());
    let fetcher = Arc::new(BackgroundFetcher::new(2, priority, 1 << 20));
    let layer = mount(
        &f,
        source.clone(),
        work.path(),
        &LayerOptions::default(),
        Some(fetcher),
    )?;
    wait_until("background fetch", || layer.reader().fully_cached())?;
    // What the daemon's materializer does with a fully cached layer: its small files get cache
    // files of their own (and it gets its native tree).
    layer.reader().materialize();
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(
        layer
            .mountpoint()
            .join(".stargz-snapshotter/sha256:feedbeef.json"),
    )?)?;
    assert!(
        state["fetchedPercent"].as_f64().unwrap_or(0.0) > 99.0,
        "{state}"
    );
    source.set(DOWN);
    drop_page_cache()?;
    let before = layer.reader().userspace_reads();
    compare_trees(&f.src, layer.mountpoint())?;
    // Fully cached files are handed to the kernel (FUSE passthrough): no read comes to us.
    assert_eq!(
        layer.reader().userspace_reads(),
        before,
        "reads of cached files went through userspace"
    );
    layer.unmount()?;
    Ok(())
}

#[test]
fn faulty_source_gives_eio_never_wrong_bytes() -> Result<()> {
    require_root();
    let f = fixture(make_rootfs, None)?;
    let work = tempfile::tempdir()?;
    let source = FaultySource::new(f.blob.clone());
    let layer = mount(
        &f,
        source.clone(),
        work.path(),
        &LayerOptions::default(),
        None,
    )?;
    let mnt = layer.mountpoint();
    let files = [
        "usr/lib/app/big.bin",
        "usr/lib/app/small.txt",
        "owned",
        "etc/passwd",
    ];
    for mode in [CORRUPT, DOWN] {
        source.set(mode);
        for p in files {
            match std::fs::read(mnt.join(p)) {
                Ok(got) => assert_eq!(
                    got,
                    std::fs::read(f.src.join(p))?,
                    "{p}: wrong bytes in mode {mode}"
                ),
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{p}: {e}"),
            }
        }
    }
    // A corrupt source must have been caught (not served), and recovery works.
    source.set(CORRUPT);
    let err =
        std::fs::read(mnt.join("usr/lib/app/mod07.py")).expect_err("corrupt bytes were served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    source.set(HEALTHY);
    drop_page_cache()?;
    for p in files {
        assert_eq!(
            std::fs::read(mnt.join(p))?,
            std::fs::read(f.src.join(p))?,
            "{p} after recovery"
        );
    }
    layer.unmount()?;
    Ok(())
}

/// A zstd:chunked layer (each chunk a zstd frame, the TOC in a skippable frame) mounts like an
/// eStargz one: the same tree, each byte fetched once, and a corrupt registry gets EIO, never
/// wrong bytes, then recovers.
#[test]
fn zstd_chunked_layer_matches_source_and_never_serves_corrupt_bytes() -> Result<()> {
    require_root();
    let f = fixture_as(make_rootfs, None, Format::ZstdChunked)?;
    let work = tempfile::tempdir()?;
    let source = FaultySource::new(f.blob.clone());
    let layer = mount(
        &f,
        source.clone(),
        work.path(),
        &LayerOptions::default(),
        None,
    )?;
    let mnt = layer.mountpoint().to_path_buf();
    let n = compare_trees(&f.src, &mnt)?;
    assert!(n > 100, "compared only {n} paths");
    assert!(
        source.bytes.load(Ordering::SeqCst) <= f.blob.len() as u64,
        "bytes refetched"
    );
    layer.unmount()?;

    let work = tempfile::tempdir()?;
    let source = FaultySource::new(f.blob.clone());
    let layer = mount(
        &f,
        source.clone(),
        work.path(),
        &LayerOptions::default(),
        None,
    )?;
    let mnt = layer.mountpoint();
    source.set(CORRUPT);
    // The corruption flips a byte every 4 KiB of a response: a small file's frame may escape it
    // (then its bytes must be right), a 1 MiB chunk cannot.
    let mut refused = 0;
    for p in ["usr/lib/app/big.bin", "usr/lib/app/mod07.py", "etc/passwd"] {
        match std::fs::read(mnt.join(p)) {
            Ok(got) => assert_eq!(got, std::fs::read(f.src.join(p))?, "{p}: wrong bytes"),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{p}: {e}");
                refused += 1;
            }
        }
    }
    assert!(refused >= 1, "big.bin was served from a corrupt registry");
    source.set(HEALTHY);
    drop_page_cache()?;
    for p in ["usr/lib/app/big.bin", "usr/lib/app/mod07.py", "etc/passwd"] {
        assert_eq!(
            std::fs::read(mnt.join(p))?,
            std::fs::read(f.src.join(p))?,
            "{p} after recovery"
        );
    }
    layer.unmount()?;
    Ok(())
}

#[test]
fn prefetch_up_to_landmark_in_one_request_and_readahead_batches_small_files() -> Result<()> {
    require_root();
    let f = fixture(make_rootfs, Some(30))?;
    let work = tempfile::tempdir()?;
    let source = FaultySource::new(f.blob.clone());
    let before = source.fetches.load(Ordering::SeqCst);
    // A fixed read-ahead (the default follows the measured link), to check what it does.
    let opts = LayerOptions {
        read: ReadOptions {
            readahead_bytes: Some(64 << 10),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut layer = mount(&f, source.clone(), work.path(), &opts, None)?;
    layer.wait_prefetch();
    // Footer, TOC, then the whole prefetch in one range request.
    assert_eq!(
        source.fetches.load(Ordering::SeqCst) - before,
        3,
        "prefetch must be one range request"
    );
    assert!(!layer.mountpoint().join(".prefetch.landmark").exists());
    // Files before the landmark (tar order, sorted by name) are served with the source down.
    source.set(DOWN);
    let mut first_etc = Vec::new();
    for e in std::fs::read_dir(f.src.join("etc"))? {
        let p = e?.path();
        if p.is_file() && !p.is_symlink() {
            first_etc.push(p.file_name().map(|n| n.to_os_string()).unwrap_or_default());
        }
    }
    first_etc.sort();
    let name = first_etc.first().context("no file in etc")?;
    assert_eq!(
        std::fs::read(layer.mountpoint().join("etc").join(name))?,
        std::fs::read(f.src.join("etc").join(name))?
    );
    source.set(HEALTHY);

    // Forty small modules read one after another cost far fewer than forty requests.
    let start = source.fetches.load(Ordering::SeqCst);
    for i in 0..40 {
        let p = format!("usr/lib/app/mod{i:02}.py");
        assert_eq!(
            std::fs::read(layer.mountpoint().join(&p))?,
            std::fs::read(f.src.join(&p))?
        );
    }
    let used = source.fetches.load(Ordering::SeqCst) - start;
    assert!(used <= 3, "{used} requests for 40 small files");
    layer.unmount()?;
    Ok(())
}

struct MapResolver(std::collections::HashMap<String, Arc<FaultySource>>);

impl stargz::BlobResolver for MapResolver {
    fn resolve(
        &self,
        _reference: &str,
        digest: &str,
    ) -> Result<Arc<dyn stargz::LayerSource>, stargz::FsError> {
        let s = self
            .0
            .get(digest)
            .ok_or_else(|| stargz::FsError::Labels(format!("unknown blob {digest}")))?;
        Ok(s.clone())
    }
}

#[test]
fn layer_manager_mounts_from_labels_and_verifies_toc() -> Result<()> {
    use stargz::RemoteLayers;
    require_root();
    let f = fixture(lower_tree, None)?;
    let work = tempfile::tempdir()?;
    let source = FaultySource::new(f.blob.clone());
    let resolver = MapResolver(
        [("sha256:11".to_string(), source.clone())]
            .into_iter()
            .collect(),
    );
    let mut cfg = stargz::FsConfig::new(work.path());
    cfg.max_concurrency = 1;
    let mgr = stargz::LayerManager::new(cfg, Arc::new(resolver))?;
    let mnt = work.path().join("m");
    std::fs::create_dir(&mnt)?;
    let mut labels = stargz_labels("127.0.0.1:5000/img:v1", "sha256:11", "sha256:0000");
    let err = mgr
        .mount(&mnt, &labels, &[])
        .expect_err("a wrong TOC digest must fail the mount");
    assert!(err.to_string().contains("TOC"), "{err}");
    labels.insert(
        "containerd.io/snapshot/stargz/toc.digest".into(),
        f.toc_digest.clone(),
    );
    mgr.mount(&mnt, &labels, &[])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let guard = UmountGuard(mnt.clone());
    assert_eq!(std::fs::read(mnt.join("a/y"))?, b"y from lower");
    mgr.check(&mnt, &labels)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let cache_dirs = || {
        std::fs::read_dir(work.path().join("stargz/fscache"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert_eq!(cache_dirs(), 1);
    mgr.unmount(&mnt).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(!mnt.join("a").exists(), "still mounted");
    // Deleted in the background (renamed aside first); the manager's drop waits for it.
    drop(mgr);
    assert_eq!(cache_dirs(), 0, "unmount must free the layer's cache");
    drop(guard);
    Ok(())
}

/// Layers written by the crate's own eStargz builder (Go's layout, prioritized files and
/// landmark) mount and match their source too.
#[test]
fn layer_from_estargz_builder_matches_source_and_prefetches_prioritized_files() -> Result<()> {
    require_root();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    std::fs::create_dir(&src)?;
    make_rootfs(&src)?;
    // The builder rounds sub-second mtimes to the second, as Go does; compare whole seconds.
    truncate_mtimes(&src)?;
    let tar = tar_dir(&src)?;
    let opts = stargz::estargz::BuildOptions {
        chunk_size: 1 << 20,
        compression_level: 1,
        prioritized_files: vec!["etc/passwd".into(), "usr/lib/app/big.bin".into()],
        ..Default::default()
    };
    let mut blob = Vec::new();
    let res = stargz::estargz::build(tar.as_slice(), &mut blob, &opts)?;
    let f = Fixture {
        _tmp: tmp,
        src,
        blob,
        toc_digest: res.toc_digest,
    };
    let work = tempfile::tempdir()?;
    let source = FaultySource::new(f.blob.clone());
    let mut layer = mount(
        &f,
        source.clone(),
        work.path(),
        &LayerOptions::default(),
        None,
    )?;
    layer.wait_prefetch();
    source.set(DOWN);
    for p in ["etc/passwd", "usr/lib/app/big.bin"] {
        assert_eq!(
            std::fs::read(layer.mountpoint().join(p))?,
            std::fs::read(f.src.join(p))?,
            "{p} not prefetched"
        );
    }
    source.set(HEALTHY);
    compare_trees(&f.src, layer.mountpoint())?;
    layer.unmount()?;
    Ok(())
}

/// A read waiting on a stalled registry does not hold up reads of cached files.
#[test]
fn stalled_registry_does_not_block_cached_reads() -> Result<()> {
    require_root();
    let f = fixture(make_rootfs, None)?;
    let work = tempfile::tempdir()?;
    let source = FaultySource::new(f.blob.clone());
    let layer = mount(
        &f,
        source.clone(),
        work.path(),
        &LayerOptions::default(),
        None,
    )?;
    let mnt = layer.mountpoint().to_path_buf();
    let cached = ["usr/lib/app/small.txt", "public", "etc/hostname"];
    for p in cached {
        std::fs::read(mnt.join(p))?;
    }
    source.set(SLOW);
    let big = mnt.join("usr/lib/app/big.bin");
    let slow_reader = std::thread::spawn(move || std::fs::read(big).map(|b| b.len()));
    std::thread::sleep(Duration::from_millis(300));
    drop_page_cache()?;
    let start = Instant::now();
    for p in cached {
        assert_eq!(std::fs::read(mnt.join(p))?, std::fs::read(f.src.join(p))?);
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "cached reads waited {took:?} behind a stalled fetch"
    );
    source.set(HEALTHY);
    let n = slow_reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    assert_eq!(
        n as u64,
        std::fs::metadata(f.src.join("usr/lib/app/big.bin"))?.len()
    );
    layer.unmount()?;
    Ok(())
}

/// Opens the layer over `dir/cache` with the source healthy (the TOC must be fetched), then
/// switches the source to `mode` before the mount is served.
fn remount(f: &Fixture, source: &Arc<FaultySource>, dir: &Path, mode: u8) -> Result<MountedLayer> {
    source.set(HEALTHY);
    let spec = LayerSpec {
        digest: "sha256:feedbeef".into(),
        source: source.clone(),
        toc_digest: Some(f.toc_digest.clone()),
    };
    let reader = open_layer(
        spec,
        &dir.join("cache"),
        &ReadOptions::default(),
        Arc::new(Priority::default()),
    )?;
    source.set(mode);
    Ok(mount_layer(
        reader,
        &dir.join("mnt"),
        &LayerOptions::default(),
        None,
    )?)
}

/// A daemon restart: the cache directory a layer filled is reused by the next mount, only for
/// chunks whose bytes on disk still match the TOC; a corrupted one is fetched again.
#[test]
fn cache_dir_is_reused_after_remount_only_where_verified() -> Result<()> {
    require_root();
    let f = fixture(make_rootfs, None)?;
    let work = tempfile::tempdir()?;
    let source = FaultySource::new(f.blob.clone());
    let layer = mount(
        &f,
        source.clone(),
        work.path(),
        &LayerOptions::default(),
        None,
    )?;
    let read = [
        "usr/lib/app/big.bin",
        "usr/lib/app/small.txt",
        "etc/passwd",
        "owned",
    ];
    let unread = ["usr/lib/app/mod05.py", "public", "secret"];
    let mut inos = std::collections::HashMap::new();
    for p in read {
        assert_eq!(
            std::fs::read(layer.mountpoint().join(p))?,
            std::fs::read(f.src.join(p))?,
            "{p}"
        );
        inos.insert(p, std::fs::metadata(layer.mountpoint().join(p))?.ino());
    }
    let fetched_before = layer.reader().fetched_size();
    // MountedLayer::unmount leaves the cache directory (only the manager's release frees it).
    layer.unmount()?;

    // Registry down: only what was read before is served, from the re-verified cache.
    let fetches = source.fetches.load(Ordering::SeqCst);
    let layer = remount(&f, &source, work.path(), DOWN)?;
    assert_eq!(
        source.fetches.load(Ordering::SeqCst) - fetches,
        2,
        "remount fetched more than footer and TOC"
    );
    assert_eq!(
        layer.reader().fetched_size(),
        fetched_before,
        "fetched bytes of cached chunks not counted"
    );
    assert!(!layer.reader().fully_cached());
    for p in read {
        assert!(
            layer.reader().file_cached(inos[p]),
            "{p} not trusted from disk"
        );
    }
    drop_page_cache()?;
    for p in read {
        assert_eq!(
            std::fs::read(layer.mountpoint().join(p))?,
            std::fs::read(f.src.join(p))?,
            "{p} after remount"
        );
    }
    for p in unread {
        let err = std::fs::read(layer.mountpoint().join(p))
            .expect_err("unread file served with the source down");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{p}: {err}");
    }
    layer.unmount()?;

    // One byte of big.bin's second chunk flipped on disk: that chunk alone is fetched again.
    let big = inos["usr/lib/app/big.bin"];
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(work.path().join("cache").join(big.to_string()))?;
    let at = (1 << 20) + 4321;
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut b, at)?;
    std::os::unix::fs::FileExt::write_all_at(&file, &[b[0] ^ 0x40], at)?;
    drop(file);
    let layer = remount(&f, &source, work.path(), HEALTHY)?;
    assert!(
        !layer.reader().file_cached(big),
        "a corrupted chunk was trusted"
    );
    assert!(layer.reader().file_cached(inos["usr/lib/app/small.txt"]));
    let fetches = source.fetches.load(Ordering::SeqCst);
    let bytes = source.bytes.load(Ordering::SeqCst);
    drop_page_cache()?;
    assert_eq!(
        std::fs::read(layer.mountpoint().join("usr/lib/app/big.bin"))?,
        std::fs::read(f.src.join("usr/lib/app/big.bin"))?
    );
    assert_eq!(
        source.fetches.load(Ordering::SeqCst) - fetches,
        1,
        "exactly the corrupted chunk is re-fetched"
    );
    assert!(
        source.bytes.load(Ordering::SeqCst) - bytes < 2 << 20,
        "more than one chunk re-fetched"
    );
    assert!(layer.reader().file_cached(big));
    source.set(DOWN);
    for p in read {
        assert_eq!(
            std::fs::read(layer.mountpoint().join(p))?,
            std::fs::read(f.src.join(p))?,
            "{p} after repair"
        );
    }
    layer.unmount()?;
    Ok(())
}

/// A fully fetched layer remounts fully cached: complete, accounted as fully fetched, and
/// served entirely with the registry down.
#[test]
fn fully_fetched_cache_is_complete_after_remount() -> Result<()> {
    require_root();
    let f = fixture(make_rootfs, None)?;
    let work = tempfile::tempdir()?;
    let source = FaultySource::new(f.blob.clone());
    let fetcher = Arc::new(BackgroundFetcher::new(
        2,
        Arc::new(Priority::default()),
        1 << 20,
    ));
    let layer = mount(
        &f,
        source.clone(),
        work.path(),
        &LayerOptions::default(),
        Some(fetcher),
    )?;
    wait_until("background fetch", || layer.reader().fully_cached())?;
    layer.unmount()?;
    let layer = remount(&f, &source, work.path(), DOWN)?;
    assert!(
        layer.reader().fully_cached(),
        "a complete cache was not fully trusted"
    );
    assert_eq!(layer.reader().fetched_size(), f.blob.len() as u64);
    drop_page_cache()?;
    compare_trees(&f.src, layer.mountpoint())?;
    layer.unmount()?;
    Ok(())
}

/// The manager names a layer's cache after its mountpoint, keeps it across a restart (a new
/// manager over the same root), and deletes caches no mounted layer claims.
#[test]
fn layer_manager_reuses_claimed_caches_and_removes_orphans() -> Result<()> {
    use stargz::RemoteLayers;
    require_root();
    let f = fixture(lower_tree, None)?;
    let work = tempfile::tempdir()?;
    let source = FaultySource::new(f.blob.clone());
    let manager = || -> Result<stargz::LayerManager> {
        let resolver = MapResolver(
            [("sha256:11".to_string(), source.clone())]
                .into_iter()
                .collect(),
        );
        let mut cfg = stargz::FsConfig::new(work.path());
        cfg.no_background_fetch = true;
        Ok(stargz::LayerManager::new(cfg, Arc::new(resolver))?)
    };
    let labels = stargz_labels("127.0.0.1:5000/img:v1", "sha256:11", &f.toc_digest);
    let (kept, gone) = (work.path().join("kept"), work.path().join("gone"));
    let _guards = [UmountGuard(kept.clone()), UmountGuard(gone.clone())];
    let mgr = manager()?;
    for m in [&kept, &gone] {
        std::fs::create_dir(m)?;
        mgr.mount(m, &labels, &[])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(std::fs::read(m.join("a/y"))?, b"y from lower");
    }
    let (kept_cache, gone_cache) = (mgr.cache_dir_for(&kept), mgr.cache_dir_for(&gone));
    assert_ne!(
        kept_cache, gone_cache,
        "two snapshots of one blob share a cache"
    );
    assert!(kept_cache.is_dir() && gone_cache.is_dir());
    // Leftovers of a run whose snapshot was removed while the daemon was down.
    let fscache = work.path().join("stargz/fscache");
    std::fs::create_dir(fscache.join("0123456789abcdef0123456789abcdef"))?;
    std::fs::write(fscache.join("0123456789abcdef0123456789abcdef/7"), b"old")?;
    std::fs::write(fscache.join("stray"), b"x")?;
    assert_eq!(mgr.remove_unclaimed_caches(&[]), 2);
    assert!(
        kept_cache.is_dir() && gone_cache.is_dir(),
        "a mounted layer's cache was removed"
    );
    assert_eq!(std::fs::read(kept.join("a/y"))?, b"y from lower");

    // Restart (SIGTERM keeps caches): only `kept` is restored; `gone` lost its snapshot.
    drop(mgr);
    let mgr = manager()?;
    assert!(
        kept_cache.is_dir() && gone_cache.is_dir(),
        "start-up wiped the caches"
    );
    mgr.mount(&kept, &labels, &[])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // A snapshot that still exists but could not be re-mounted (registry down) keeps its cache.
    let failed = work.path().join("failed/fs");
    let failed_cache = mgr.cache_dir_for(&failed);
    std::fs::create_dir_all(&failed_cache)?;
    std::fs::write(failed_cache.join("9"), b"cached")?;
    mgr.restored(&[kept.clone(), failed.clone()]);
    assert!(kept_cache.is_dir(), "restored layer's cache removed");
    assert!(
        failed_cache.join("9").is_file(),
        "cache of a snapshot that failed to restore removed"
    );
    assert!(!gone_cache.exists(), "orphan cache kept after restore");
    let fetches = source.fetches.load(Ordering::SeqCst);
    assert_eq!(std::fs::read(kept.join("a/y"))?, b"y from lower");
    assert_eq!(
        source.fetches.load(Ordering::SeqCst),
        fetches,
        "a cached file was fetched again after restart"
    );
    mgr.unmount(&kept).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(!kept_cache.exists(), "unmount must free the layer's cache");
    Ok(())
}

/// A tree of `n` files of 64 KiB each (one chunk and one range request per file) plus a small
/// file read before the registry stalls.
fn many_files(n: usize) -> impl FnOnce(&Path) -> Result<()> {
    move |root: &Path| {
        std::fs::create_dir_all(root.join("data"))?;
        for i in 0..n {
            std::fs::write(
                root.join(format!("data/f{i:03}")),
                noise(64 << 10, i as u64 + 1),
            )?;
        }
        std::fs::write(root.join("cached.txt"), b"already here\n")?;
        Ok(())
    }
}

/// More reads waiting on a stalled registry than the mount has FUSE threads: lookups, stats,
/// directory listings and reads of cached files on the same mount still answer at once, and
/// every stalled read completes with the right bytes once the registry is back.
#[test]
fn stalled_reads_beyond_the_thread_pool_leave_metadata_and_cached_reads_alone() -> Result<()> {
    require_root();
    let f = fixture(many_files(24), None)?;
    let work = tempfile::tempdir()?;
    let source = FaultySource::new(f.blob.clone());
    let opts = LayerOptions::default();
    let layer = mount(&f, source.clone(), work.path(), &opts, None)?;
    let mnt = layer.mountpoint().to_path_buf();
    std::fs::read(mnt.join("cached.txt"))?;
    source.set(SLOW);
    let stalled = 2 * opts.threads + 4;
    let readers: Vec<_> = (0..stalled)
        .map(|i| {
            let path = mnt.join(format!("data/f{i:03}"));
            std::thread::spawn(move || std::fs::read(path))
        })
        .collect();
    // Past the kernel's 1 s attribute and entry timeouts, so the stats below reach the daemon.
    std::thread::sleep(Duration::from_millis(1200));
    drop_page_cache()?;
    let start = Instant::now();
    let listed = std::fs::read_dir(mnt.join("data"))?.count();
    for i in 0..24 {
        std::fs::symlink_metadata(mnt.join(format!("data/f{i:03}")))?;
    }
    assert_eq!(std::fs::read(mnt.join("cached.txt"))?, b"already here\n");
    let took = start.elapsed();
    // Readers blocked on this process's own mount must finish before any assertion can fail:
    // a panicking test would otherwise never exit.
    source.set(HEALTHY);
    let got: Vec<_> = readers.into_iter().map(|r| r.join()).collect();
    assert_eq!(listed, 24);
    assert!(
        took < Duration::from_secs(2),
        "metadata and cached reads waited {took:?} behind {stalled} stalled reads"
    );
    for (i, r) in got.into_iter().enumerate() {
        let got = r.map_err(|_| anyhow::anyhow!("reader panicked"))??;
        assert_eq!(
            got,
            std::fs::read(f.src.join(format!("data/f{i:03}")))?,
            "data/f{i:03}"
        );
    }
    layer.unmount()?;
    Ok(())
}

/// Bytes after a chunk inside its compressed range (garbage after the gzip member, or more
/// deflate output than the chunk holds) are never served and never make the read fail.
#[test]
fn bytes_past_a_chunk_in_its_range_are_ignored() -> Result<()> {
    require_root();
    let content = noise(100_000, 3);
    for (tail, garbage) in [
        (vec![], noise(10_000, 9)),
        (vec![0u8; 64 << 20], vec![]),
        (noise(5000, 4), vec![0xff; 333]),
    ] {
        let (blob, toc_digest) = hand_made_blob(&content, &tail, &garbage)?;
        let work = tempfile::tempdir()?;
        let f = Fixture {
            _tmp: tempfile::tempdir()?,
            src: work.path().join("unused"),
            blob,
            toc_digest,
        };
        let layer = mount(
            &f,
            FaultySource::new(f.blob.clone()),
            work.path(),
            &LayerOptions::default(),
            None,
        )?;
        let got = std::fs::read(layer.mountpoint().join("f"))?;
        assert!(
            got == content,
            "tail {} B, garbage {} B: wrong bytes served",
            tail.len(),
            garbage.len()
        );
        layer.unmount()?;
    }
    Ok(())
}

/// A fetch that panics fails its own read and every read waiting for the same chunk at once
/// (nobody waits for a fetch that will never report), and the next read fetches again.
#[test]
fn a_panicking_fetch_wakes_its_waiters_and_the_next_read_retries() -> Result<()> {
    require_root();
    let f = fixture(many_files(2), None)?;
    let work = tempfile::tempdir()?;
    let source = FaultySource::new(f.blob.clone());
    let layer = mount(
        &f,
        source.clone(),
        work.path(),
        &LayerOptions::default(),
        None,
    )?;
    let path = layer.mountpoint().join("data/f000");
    source.set(PANIC);
    let start = Instant::now();
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                std::fs::File::open(&path)
                    .and_then(|mut fh| std::io::Read::read_to_end(&mut fh, &mut Vec::new()))
            })
        })
        .collect();
    let results: Vec<_> = readers.into_iter().map(|r| r.join()).collect();
    let took = start.elapsed();
    source.set(HEALTHY);
    for r in results {
        let err = r
            .map_err(|_| anyhow::anyhow!("reader panicked"))?
            .expect_err("a read through a panicking fetch");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    }
    assert!(
        took < Duration::from_secs(30),
        "waiters of a panicked fetch waited {took:?}"
    );
    assert_eq!(
        std::fs::read(&path)?,
        std::fs::read(f.src.join("data/f000"))?
    );
    layer.unmount()?;
    Ok(())
}

/// `filesystem_cache_type = "memory"`: the same tree, served from chunks kept in memory (no
/// cache files, so no passthrough), and nothing written to the cache directory.
#[test]
fn memory_cache_serves_the_same_tree_and_writes_no_files() -> Result<()> {
    require_root();
    let f = fixture(make_rootfs, None)?;
    let work = tempfile::tempdir()?;
    let source = FaultySource::new(f.blob.clone());
    let read = ReadOptions {
        cache_kind: stargz::CacheKind::Memory,
        ..Default::default()
    };
    let opts = LayerOptions {
        read,
        ..Default::default()
    };
    let layer = mount(&f, source, work.path(), &opts, None)?;
    for _ in 0..2 {
        let n = compare_trees(&f.src, layer.mountpoint())?;
        assert!(n > 100, "compared only {n} paths");
        drop_page_cache()?;
    }
    let files = std::fs::read_dir(work.path().join("cache")).map_or(0, |d| d.count());
    assert_eq!(files, 0, "the memory cache wrote files");
    layer.unmount()?;
    Ok(())
}
