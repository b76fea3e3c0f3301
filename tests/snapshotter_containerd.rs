//! containerd 1.6 + registry + our daemon as the `stargz` proxy snapshotter: pull a
//! multi-layer image with whiteouts, run it, restart the daemon (SIGTERM, SIGINT, kill -9 mid-pull)
//! and check that every snapshot and label survived. Needs root, containerd, runc,
//! docker-registry and skopeo (`make deps`).
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const READY: Duration = Duration::from_secs(30);

struct Bed {
    // Drop order: containerd first (it holds mounts of our dirs), then the daemon, then the
    // registry, and the daemon's root last.
    ctrd: Containerd,
    daemon: Daemon,
    reg: Registry,
    _tmp: tempfile::TempDir,
}

fn bed() -> Bed {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root");
    let sock = tmp.path().join("run/stargz.sock");
    let reg = Registry::start();
    let daemon = Daemon::start(&root, &sock, &[]);
    let ctrd = Containerd::start(ContainerdOpts {
        stargz_socket: Some(sock.clone()),
        stargz_root: Some(root.clone()),
        ..Default::default()
    });
    ctrd.wait_stargz_ready(READY);
    Bed {
        _tmp: tmp,
        ctrd,
        daemon,
        reg,
    }
}

/// tools + data + deletions (whiteout, opaque dir) + one more file.
fn test_image_layers() -> Vec<Layer> {
    vec![
        Layer::from_entries(&tools_layer(&["/bin/sh", "/bin/cat", "/bin/ls"])),
        Layer::from_entries(&[
            LayerEntry::file("data/keep.txt", "kept"),
            LayerEntry::file("data/gone.txt", "should be deleted"),
            LayerEntry::file("opq/old.txt", "hidden by opaque"),
            LayerEntry::file("opq/sub/old2.txt", "hidden too"),
        ]),
        Layer::from_entries(&[
            LayerEntry::whiteout("data/gone.txt"),
            LayerEntry::opaque("opq"),
            LayerEntry::file("opq/new.txt", "new"),
        ]),
        Layer::from_entries(&[LayerEntry::file("etc/top.txt", "top")]),
    ]
}

const SCRIPT: &str = "cat /data/keep.txt /etc/top.txt; echo; ls /data; ls -R /opq; \
                      if [ -e /data/gone.txt ]; then echo GONE-PRESENT; else echo GONE-ABSENT; fi";
const EXPECTED: &[&str] = &["kepttop", "keep.txt", "/opq:", "new.txt", "GONE-ABSENT"];

fn run_checks(ctrd: &Containerd, image: &str, id: &str) {
    let out = ctrd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "stargz",
        image,
        id,
        "/bin/sh",
        "-c",
        SCRIPT,
    ]);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        EXPECTED,
        "container output:\n{out}"
    );
}

/// Committed snapshots of the daemon, straight from its socket.
type Listed = (i32, String, std::collections::BTreeMap<String, String>);

fn committed(sock: &Path) -> Vec<(String, Listed)> {
    daemon_snapshots(sock)
        .into_iter()
        .filter(|(_, v)| v.0 == snapshots_pb::Kind::Committed as i32)
        .collect()
}

/// `ctr snapshots ls` rows (KEY PARENT KIND), header dropped, sorted.
fn ctr_ls(ctrd: &Containerd) -> Vec<String> {
    let out = ctrd.ctr_ok(&["snapshots", "--snapshotter", "stargz", "ls"]);
    let mut rows: Vec<String> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    rows.sort();
    rows
}

/// `ctr snapshots info` of every snapshot containerd lists (labels, kind, parent; answered
/// through our daemon's Stat).
fn ctr_infos(ctrd: &Containerd) -> Vec<serde_json::Value> {
    ctr_ls(ctrd)
        .iter()
        .map(|row| {
            let key = row.split(' ').next().expect("key column");
            let out = ctrd.ctr_ok(&["snapshots", "--snapshotter", "stargz", "info", key]);
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("info {key}: {e}: {out}"))
        })
        .collect()
}

fn upperdir_of(ctrd: &Containerd, key: &str) -> PathBuf {
    let out = ctrd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "stargz",
        "mounts",
        "/mnt/unused",
        key,
    ]);
    let opt = out
        .split([',', ' ', '\n'])
        .find_map(|t| t.strip_prefix("upperdir="))
        .unwrap_or_else(|| panic!("no upperdir in mounts of {key}: {out}"));
    PathBuf::from(opt)
}

#[test]
fn pull_run_and_restart_keep_state() {
    let mut b = bed();
    let image = push_image(&b.reg, "test/layers", "v1", &test_image_layers());
    b.ctrd.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "stargz",
        &image,
    ]);

    let snaps = committed(b.daemon.socket());
    assert_eq!(
        snaps.len(),
        4,
        "one committed snapshot per layer: {snaps:?}"
    );
    let parents = snaps.iter().filter(|(_, v)| !v.1.is_empty()).count();
    assert_eq!(parents, 3, "layers are stacked");
    run_checks(&b.ctrd, &image, "run1");

    // A file written at run time lands in the container's upper dir, under our root.
    b.ctrd.ctr_ok(&[
        "run",
        "--snapshotter",
        "stargz",
        &image,
        "writer",
        "/bin/sh",
        "-c",
        "echo hello > /written.txt",
    ]);
    let upper = upperdir_of(&b.ctrd, "writer");
    assert!(
        upper.starts_with(b.daemon.root()),
        "upperdir {} outside our root",
        upper.display()
    );
    assert_eq!(
        std::fs::read_to_string(upper.join("written.txt")).expect("written file in upperdir"),
        "hello\n"
    );
    assert!(
        !upper.join("data/keep.txt").exists(),
        "lower layers are not copied up"
    );
    b.ctrd.ctr_ok(&["containers", "rm", "writer"]);
    // containerd's garbage collector removes the snapshot from us shortly after.
    assert!(
        wait_until(Duration::from_secs(15), || !upper.exists()),
        "removing the container removes its snapshot directory"
    );

    // SIGTERM keeps state.
    let before = committed(b.daemon.socket());
    let ls_before = ctr_ls(&b.ctrd);
    let infos_before = ctr_infos(&b.ctrd);
    assert!(
        infos_before.iter().all(|i| i["Kind"] == "Committed"),
        "{infos_before:?}"
    );
    b.daemon.sigterm();
    b.daemon.restart();
    b.ctrd.wait_stargz_ready(READY);
    assert_eq!(
        committed(b.daemon.socket()),
        before,
        "snapshots and labels survive SIGTERM"
    );
    assert_eq!(ctr_ls(&b.ctrd), ls_before);
    assert_eq!(
        ctr_infos(&b.ctrd),
        infos_before,
        "ctr snapshots info unchanged"
    );
    run_checks(&b.ctrd, &image, "run2");

    // SIGINT cleans up (unmounts) but keeps the metadata too.
    let status = b.daemon.sigint().expect("daemon was running");
    assert!(status.success(), "SIGINT exit: {status}");
    b.daemon.restart();
    b.ctrd.wait_stargz_ready(READY);
    assert_eq!(
        committed(b.daemon.socket()),
        before,
        "snapshots and labels survive SIGINT"
    );

    // kill -9 in the middle of a pull of a second image (big layers so it takes a while).
    let big: Vec<Layer> = (0..3u8)
        .map(|i| {
            let mut data = vec![0u8; 6 << 20];
            let mut x: u64 = 0x9e3779b97f4a7c15 ^ i as u64;
            for c in data.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
            }
            Layer::from_entries(&[LayerEntry::file(&format!("big/{i}.bin"), data)])
        })
        .collect();
    let mut layers = test_image_layers();
    layers.extend(big);
    let image2 = push_image(&b.reg, "test/big", "v1", &layers);
    let log_len = b.daemon.log().len();
    let mut pull = Command::new("ctr")
        .arg("--address")
        .arg(b.ctrd.socket())
        .args([
            "-n",
            "default",
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "stargz",
            &image2,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ctr pull");
    // Wait until at least one new layer has been prepared, then kill.
    let started = wait_until(Duration::from_secs(60), || {
        b.daemon.log()[log_len..].matches("\"prepare\"").count() >= 2
    });
    assert!(
        started,
        "pull never reached the daemon:\n{}",
        &b.daemon.log()[log_len..]
    );
    b.daemon.kill9();
    let status = pull.wait().expect("wait for ctr pull");
    assert!(
        !status.success(),
        "the pull finished before kill -9; the test did not interrupt it"
    );
    b.daemon.restart();
    b.ctrd.wait_stargz_ready(READY);
    let after = committed(b.daemon.socket());
    for (name, v) in &before {
        assert_eq!(
            after.iter().find(|(n, _)| n == name).map(|(_, v)| v),
            Some(v),
            "{name} survived kill -9"
        );
    }
    // Every committed snapshot still has a complete chain and a directory.
    for (name, v) in &after {
        assert!(
            v.1.is_empty() || after.iter().any(|(n, _)| *n == v.1),
            "{name}: parent {} missing",
            v.1
        );
    }
    run_checks(&b.ctrd, &image, "run3");
    // The interrupted pull can be completed.
    b.ctrd.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "stargz",
        &image2,
    ]);
    let out = b.ctrd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "stargz",
        &image2,
        "run4",
        "/bin/ls",
        "/big",
    ]);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0.bin", "1.bin", "2.bin"]
    );
    // No orphan directories remain after Cleanup.
    let ids: Vec<String> = std::fs::read_dir(b.daemon.root().join("snapshotter/snapshots"))
        .expect("snapshots dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        ids.iter().all(|n| n.parse::<u64>().is_ok()),
        "temporary dirs left: {ids:?}"
    );
}
