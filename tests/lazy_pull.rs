//! End to end (issue 6, "How it is shown"): a real Debian rootfs with Python as a 3-layer image,
//! converted to eStargz, lazily pulled through containerd 1.6 + our daemon with our `ctr-remote`
//! and with Go's, run, measured, the daemon killed and restarted, and a plain gzip image falling
//! back to a normal pull with the reason in the log. Needs root (CI runs it as root).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    assert_success as ok, require_tool, wait_until, Containerd, ContainerdOpts, Daemon, Registry,
};

const GO_CTR_REMOTE: &str = "/usr/bin/ctr-remote";

fn ours() -> &'static str {
    env!("CARGO_BIN_EXE_ctr-remote")
}

/// Runs a `ctr-remote` binary against `ctrd` in namespace `ns`.
fn ctr_remote(bin: &str, ctrd: &Containerd, ns: &str, args: &[&str]) -> String {
    let out = ctrd
        .ctr_remote_cmd(bin, ns, args)
        .output()
        .expect("run ctr-remote");
    ok(out, &format!("{bin} {args:?}"))
}

/// The repository's `scripts/rootfs.sh` (cached debootstrap rootfs and OCI layouts).
fn rootfs_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rootfs.sh")
}

/// Pushes the cached 3-layer python image (gzip layers) to `reg` as `repo:tag`.
fn push_python_image(reg: &Registry, repo: &str, tag: &str) -> String {
    require_tool("debootstrap");
    require_tool("skopeo");
    require_tool("jq");
    let dir = tempfile::tempdir().expect("tempdir");
    let oci = dir.path().join("oci");
    let script = rootfs_script();
    let out = Command::new("bash")
        .arg(&script)
        .arg("oci")
        .arg(&oci)
        .output()
        .expect("run rootfs.sh");
    ok(out, "rootfs.sh oci");
    let reference = format!("{}/{repo}:{tag}", reg.addr());
    let out = Command::new("bash")
        .arg(&script)
        .arg("push")
        .arg(&oci)
        .arg(&reference)
        .output()
        .expect("run rootfs.sh");
    ok(out, "rootfs.sh push");
    reference
}

/// Mount points below `dir` whose file system type is FUSE, from `/proc/self/mountinfo`.
fn fuse_mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mp = pre.split(' ').nth(4)?;
            let fstype = post.split(' ').next()?;
            (fstype == "fuse" || fstype.starts_with("fuse."))
                .then(|| PathBuf::from(mp.replace("\\040", " ")))
        })
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Every JSON log line of the daemon carrying `remote-snapshot-prepared`: (value, namespace of
/// the key + "/" + target, line).
fn prepared_events(log: &str) -> Vec<(bool, String, String)> {
    let mut out = Vec::new();
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let fields = if v.get("fields").is_some() {
            &v["fields"]
        } else {
            &v
        };
        let Some(p) = fields.get("remote-snapshot-prepared") else {
            continue;
        };
        let val = p.as_bool().unwrap_or_else(|| p.as_str() == Some("true"));
        let target = fields
            .get("target")
            .and_then(|t| t.as_str())
            .unwrap_or_default();
        let ns = fields
            .get("key")
            .and_then(|t| t.as_str())
            .and_then(|k| k.split('/').next())
            .unwrap_or_default();
        out.push((val, format!("{ns}/{target}"), line.to_string()));
    }
    out
}

/// The daemon's INFO-and-above log lines (its debug output is large), last 60.
fn log_tail(daemon: &Daemon) -> String {
    let log = daemon.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains("\"level\":\"DEBUG\"") && !l.contains("\"level\":\"TRACE\""))
        .collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// The image's manifest and the (digest, size) of its layers, read back from containerd.
fn layers_of(ctrd: &Containerd, ns: &str, image: &str) -> Vec<(String, u64)> {
    let ls = ctrd.ctr_ns_ok(ns, &["images", "ls"]);
    let line = ls
        .lines()
        .find(|l| l.starts_with(image))
        .unwrap_or_else(|| panic!("{image} not listed:\n{ls}"));
    let manifest_digest = line
        .split_whitespace()
        .nth(2)
        .expect("digest column")
        .to_string();
    let manifest: serde_json::Value =
        serde_json::from_str(&ctrd.ctr_ns_ok(ns, &["content", "get", &manifest_digest]))
            .expect("manifest json");
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap_or_default().to_string(),
                l["size"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// `(fetchedSize, size)` of the layer `digest` from the state file of whichever FUSE mount
/// below `root` serves it.
fn layer_state(root: &Path, digest: &str) -> Option<(u64, u64)> {
    for m in fuse_mounts_under(root) {
        let p = m.join(".stargz-snapshotter").join(format!("{digest}.json"));
        if let Ok(s) = std::fs::read_to_string(&p) {
            let v: serde_json::Value = serde_json::from_str(&s).ok()?;
            return Some((v["fetchedSize"].as_u64()?, v["size"].as_u64()?));
        }
    }
    None
}

/// Runs `python3 -c CODE` in a fresh container of `image` with the stargz snapshotter.
fn run_python(ctrd: &Containerd, ns: &str, image: &str, id: &str, code: &str) -> String {
    ctrd.ctr_ns_ok(
        ns,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "stargz",
            image,
            id,
            "python3",
            "-c",
            code,
        ],
    )
}

/// Converts `src` to eStargz as `dst` with `bin`'s `image convert --estargz --oci` in the
/// build containerd and pushes it to the registry.
fn convert_and_push(bin: &str, ctrd: &Containerd, src: &str, dst: &str, extra: &[&str]) {
    let t = Instant::now();
    let mut args = vec!["image", "convert", "--estargz", "--oci"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[src, dst]);
    ctr_remote(bin, ctrd, "default", &args);
    ctrd.ctr_ns_ok("default", &["image", "push", "--plain-http", dst]);
    eprintln!("converted+pushed {dst} with {bin} in {:?}", t.elapsed());
}

/// Builds the images in the registry: the gzip original, our eStargz conversion, and a second
/// one at compression level 1 for Go's rpull (other blobs, so other snapshots: containerd 1.6
/// shares committed snapshots across namespaces; Go's convert takes a minute here, too slow).
/// Returns (gzip, estargz, estargz-2). The build containerd is gone afterwards, so nothing
/// local remains.
fn build_images(reg: &Registry) -> (String, String, String) {
    let t = Instant::now();
    let gzip = push_python_image(reg, "e2e/python", "gzip");
    eprintln!("pushed gzip image in {:?}", t.elapsed());
    let ours_ref = format!("{}/e2e/python:esgz", reg.addr());
    let build = Containerd::start(ContainerdOpts::default());
    build.ctr_ns_ok("default", &["image", "pull", "--plain-http", &gzip]);
    let second = format!("{}/e2e/python:esgz-l1", reg.addr());
    convert_and_push(ours(), &build, &gzip, &ours_ref, &[]);
    convert_and_push(
        ours(),
        &build,
        &gzip,
        &second,
        &["--estargz-compression-level", "1"],
    );
    drop(build);
    (gzip, ours_ref, second)
}

/// Asserts that every layer of `image` (namespace `ns`) is a FUSE mount below the daemon root
/// serving that layer, and that the daemon logged `remote-snapshot-prepared=true` for as many
/// new targets. Returns the layers.
fn assert_all_remote(
    ctrd: &Containerd,
    daemon: &Daemon,
    ns: &str,
    image: &str,
    (before, mounts_before): (usize, usize),
) -> Vec<(String, u64)> {
    let layers = layers_of(ctrd, ns, image);
    assert_eq!(layers.len(), 3, "3 layers expected: {layers:?}");
    let mounts = fuse_mounts_under(daemon.root());
    assert_eq!(
        mounts.len(),
        mounts_before + layers.len(),
        "one new FUSE mount per layer expected: {mounts:?}; events: {:#?}",
        &prepared_events(&daemon.log())[before..]
    );
    for (d, _) in &layers {
        assert!(
            layer_state(daemon.root(), d).is_some(),
            "layer {d} is not served by a FUSE mount below {}: {:?}",
            daemon.root().display(),
            fuse_mounts_under(daemon.root())
        );
    }
    let events = prepared_events(&daemon.log());
    let new: BTreeSet<&str> = events[before..]
        .iter()
        .filter(|e| e.0)
        .map(|e| e.1.as_str())
        .collect();
    assert!(
        new.len() >= layers.len() && new.iter().all(|t| t.starts_with(&format!("{ns}/"))),
        "remote-snapshot-prepared=true for each layer of {image} expected, got {new:?}; events: {:#?}",
        &events[before..]
    );
    let fallbacks: Vec<_> = events[before..].iter().filter(|e| !e.0).collect();
    assert!(
        fallbacks.is_empty(),
        "no layer of {image} may fall back: {fallbacks:?}"
    );
    layers
}

/// Whether `rel` (relative to the daemon root) is a snapshot's `fs` directory. Those are the
/// one exception to "owner-only": the overlay upper dir's mode is the mode of the container's
/// root directory (0755, as containerd's overlay snapshotter makes it) and a remote layer's is
/// the FUSE root with the image's mode. Neither is reachable by other users, because
/// `snapshots/<id>` above them is 0700 (which the walk checks), and their contents are the
/// container's and the image's own files, so the walk does not descend into them.
fn is_snapshot_fs(rel: &Path) -> bool {
    let c: Vec<_> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    c.len() == 4 && c[0] == "snapshotter" && c[1] == "snapshots" && c[3] == "fs"
}

/// Everything below the daemon root that users other than root could read or write (mode
/// bits 066 for group/other), without following symlinks or crossing into another file
/// system (FUSE and overlay mounts). Execute-only bits are fine: `work` is 0711 like
/// containerd's overlay work dirs, and holds nothing readable.
fn exposed_under(root: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(root).expect("stat root").dev();
    let (mut exposed, mut seen) = (Vec::new(), 0usize);
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        // A cache may be freed while we walk.
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let rel = p.strip_prefix(root).expect("below root");
        if md.file_type().is_symlink() || is_snapshot_fs(rel) {
            continue;
        }
        seen += 1;
        if md.mode() & 0o066 != 0 {
            exposed.push(format!("{} {:o}", p.display(), md.mode() & 0o7777));
        }
        if md.is_dir() && md.dev() == dev {
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    assert!(
        seen > 10,
        "walked only {seen} entries below {}",
        root.display()
    );
    exposed
}

/// Makes the daemon's own directories and cache files world-readable, as an older version
/// left them (not the snapshots' contents, which belong to the containers).
fn loosen_like_an_old_version(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let set = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()))
    };
    for d in [
        root.to_path_buf(),
        root.join("stargz"),
        root.join("stargz/fscache"),
        root.join("snapshotter"),
        root.join("snapshotter/snapshots"),
    ] {
        set(&d, 0o755);
    }
    set(&root.join("snapshotter/metadata.db"), 0o644);
    let mut files = 0;
    for layer in std::fs::read_dir(root.join("stargz/fscache"))
        .expect("list fscache")
        .flatten()
    {
        set(&layer.path(), 0o755);
        for f in std::fs::read_dir(layer.path())
            .expect("list layer cache")
            .flatten()
        {
            set(&f.path(), 0o644);
            files += 1;
        }
    }
    assert!(files > 0, "no cache files to loosen");
}

/// The daemon config of this test: no background fetch, so what was fetched is what the run read.
fn daemon_config(dir: &Path) -> PathBuf {
    let p = dir.join("config.toml");
    std::fs::write(&p, "no_background_fetch = true\n").expect("write daemon config");
    p
}

#[test]
fn lazy_pull_python_image_end_to_end() {
    let started = Instant::now();
    require_tool("ctr");
    assert!(
        Path::new(GO_CTR_REMOTE).is_file(),
        "Go's ctr-remote missing (apt-get install stargz-snapshotter)"
    );
    let reg = Registry::start();
    let (gzip, esgz, esgz2) = build_images(&reg);
    let built = started.elapsed();

    // Fresh containerd + our daemon.
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let sock = tmp.path().join("stargz.sock");
    let cfg = daemon_config(tmp.path());
    let mut daemon = Daemon::start(
        &root,
        &sock,
        &["--config", cfg.to_str().expect("utf-8 path")],
    );
    let ctrd = Containerd::start(ContainerdOpts {
        stargz_socket: Some(sock.clone()),
        stargz_root: Some(root.clone()),
        ..Default::default()
    });
    ctrd.wait_stargz_ready(Duration::from_secs(30));

    // 3 + 4 + 5: our rpull is lazy, python runs, little was fetched.
    let t = Instant::now();
    let before = (prepared_events(&daemon.log()).len(), 0);
    let progress = ctr_remote(
        ours(),
        &ctrd,
        "default",
        &["image", "rpull", "--plain-http", &esgz],
    );
    let layers = assert_all_remote(&ctrd, &daemon, "default", &esgz, before);
    let out = run_python(
        &ctrd,
        "default",
        &esgz,
        "py1",
        "import json, sqlite3; print('hello', json.dumps([1, 2]))",
    );
    let lazy_time = t.elapsed();
    assert_eq!(
        out.trim(),
        "hello [1, 2]",
        "python output; rpull said: {progress}"
    );
    let (mut fetched, mut size) = (0u64, 0u64);
    for (d, compressed) in &layers {
        let (f, s) = layer_state(&root, d).unwrap_or_else(|| panic!("state of {d}"));
        assert_eq!(s, *compressed, "state file size of {d}");
        eprintln!("layer {d}: fetched {f} of {s} bytes");
        fetched += f;
        size += s;
    }
    eprintln!(
        "lazy pull+run: {lazy_time:?}; fetched {fetched} of {size} compressed bytes ({:.1}%)",
        fetched as f64 * 100.0 / size as f64
    );
    assert!(fetched * 2 < size, "fetched {fetched} of {size}: not lazy");

    // Go's ctr-remote on the second image (its own layers, so its own snapshots).
    let before = (
        prepared_events(&daemon.log()).len(),
        fuse_mounts_under(&root).len(),
    );
    ctr_remote(
        GO_CTR_REMOTE,
        &ctrd,
        "go",
        &[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "stargz",
            &esgz2,
        ],
    );
    assert_all_remote(&ctrd, &daemon, "go", &esgz2, before);
    let out = run_python(&ctrd, "go", &esgz2, "py-go", "print('from go', 6 * 7)");
    assert_eq!(out.trim(), "from go 42");

    // Issue 9: the cache holds every image's files (even 0600 ones): nobody else may read it.
    let exposed = exposed_under(&root);
    assert!(
        exposed.is_empty(),
        "readable by other users after lazy pulls: {exposed:#?}"
    );

    // 6: kill -9 with a container's snapshot present, restart, re-mounted, a new container runs.
    ctrd.ctr_ns_ok(
        "default",
        &[
            "run",
            "-d",
            "--snapshotter",
            "stargz",
            &esgz,
            "sleeper",
            "python3",
            "-c",
            "import time; time.sleep(600)",
        ],
    );
    let mounts_before = fuse_mounts_under(&root).len();
    assert!(
        mounts_before >= 6,
        "6 layer mounts expected: {:?}",
        fuse_mounts_under(&root)
    );
    let fetched_before: Vec<u64> = layers
        .iter()
        .map(|(d, _)| layer_state(&root, d).map_or(0, |(f, _)| f))
        .collect();
    daemon.kill9();
    // The restarted daemon also narrows what an older version left open.
    loosen_like_an_old_version(&root);
    let t = Instant::now();
    daemon.restart();
    ctrd.wait_stargz_ready(Duration::from_secs(30));
    let remounted = wait_until(Duration::from_secs(30), || {
        layers.iter().all(|(d, _)| layer_state(&root, d).is_some())
    });
    assert!(
        remounted,
        "layers not re-mounted after restart: {:?}\n{}",
        fuse_mounts_under(&root),
        log_tail(&daemon)
    );
    // The decompressed cache survived the restart: what was fetched before still counts.
    for ((d, _), before) in layers.iter().zip(&fetched_before) {
        let after = layer_state(&root, d).map_or(0, |(f, _)| f);
        eprintln!("layer {d}: fetched {before} before kill -9, {after} after restore");
        assert!(
            after >= *before,
            "layer {d}: cache not reused after restart ({before} → {after})"
        );
    }
    let out = run_python(&ctrd, "default", &esgz, "py2", "print('after restart')");
    eprintln!("restart to second run: {:?}", t.elapsed());
    assert_eq!(out.trim(), "after restart");
    let exposed = exposed_under(&root);
    assert!(
        exposed.is_empty(),
        "readable by other users after restore: {exposed:#?}"
    );
    let _ = ctrd.ctr(&["tasks", "kill", "-s", "SIGKILL", "sleeper"]);
    wait_until(Duration::from_secs(10), || {
        ctrd.ctr(&["tasks", "rm", "-f", "sleeper"]).status.success()
    });
    let _ = ctrd.ctr(&["containers", "rm", "sleeper"]);

    // 7: a plain gzip image falls back to a normal pull, with the reason logged.
    let before = prepared_events(&daemon.log()).len();
    ctr_remote(
        ours(),
        &ctrd,
        "plain",
        &["image", "rpull", "--plain-http", &gzip],
    );
    let events = prepared_events(&daemon.log());
    let falls: BTreeMap<&str, &str> = events[before..]
        .iter()
        .filter(|e| !e.0)
        .map(|e| (e.1.as_str(), e.2.as_str()))
        .collect();
    assert!(
        falls.len() >= 3 && falls.values().all(|l| l.contains("error")),
        "remote-snapshot-prepared=false with an error for each gzip layer expected: {falls:#?}"
    );
    assert!(
        events[before..].iter().all(|e| !e.0),
        "a gzip layer was mounted remotely?"
    );
    let out = run_python(&ctrd, "plain", &gzip, "py-plain", "print('plain', 1 + 1)");
    assert_eq!(out.trim(), "plain 2");

    eprintln!(
        "images built in {built:?}; whole test {:?}",
        started.elapsed()
    );
    let t = Instant::now();
    drop(ctrd);
    eprintln!("containerd teardown {:?}", t.elapsed());
    // SIGINT: the daemon unmounts everything it mounted and exits.
    let t = Instant::now();
    let status = daemon.sigint();
    let left = fuse_mounts_under(&root);
    eprintln!("daemon SIGINT exit {status:?} in {:?}", t.elapsed());
    assert!(left.is_empty(), "FUSE mounts left after SIGINT: {left:?}");
    let du = Command::new("du")
        .args(["-s", "--apparent-size", "-k"])
        .args(["snapshotter", "stargz/httpcache", "stargz/fscache"])
        .current_dir(&root)
        .output();
    let du = du
        .map(|o| String::from_utf8_lossy(&o.stdout).replace('\n', "; "))
        .unwrap_or_default();
    let files = Command::new("find")
        .arg(&root)
        .args(["-xdev", "-type", "f"])
        .output()
        .map(|o| o.stdout.iter().filter(|&&b| b == b'\n').count())
        .unwrap_or(0);
    eprintln!("daemon root after SIGINT (KiB): {du} {files} files");
    let t = Instant::now();
    drop(daemon);
    let unmounted = t.elapsed();
    drop(tmp);
    eprintln!(
        "daemon drop {unmounted:?}, temp dir removal {:?}",
        t.elapsed() - unmounted
    );
}
