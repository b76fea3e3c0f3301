//! The Snapshots API over a real unix socket: the server runs in-process (`stargz::run`)
//! and a tonic client sends good and bad requests. Also checks the daemon binary's socket
//! permissions, sd_notify messages and signal handling. Needs root only for the binary part
//! (default-free temp paths are used throughout).
mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use common::snapshots_pb as pb;
use common::*;
use stargz::{SnapshotterImpl, SysMounter};
use tonic::Code;

struct Server {
    _tmp: tempfile::TempDir,
    sock: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn server() -> Server {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sock = tmp.path().join("run/sn.sock");
    let sn = Arc::new(
        SnapshotterImpl::new(
            &tmp.path().join("root/snapshotter"),
            None,
            Arc::new(SysMounter),
        )
        .expect("snapshotter"),
    );
    let listener = stargz::bind_socket(&sock).expect("bind");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        stargz::run(listener, sn, async {
            let _ = rx.await;
        })
        .await
        .expect("serve");
    });
    Server {
        _tmp: tmp,
        sock,
        stop: Some(tx),
        task,
    }
}

fn prep(key: &str, parent: &str) -> pb::PrepareSnapshotRequest {
    pb::PrepareSnapshotRequest {
        snapshotter: String::new(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    }
}

fn commit(name: &str, key: &str) -> pb::CommitSnapshotRequest {
    pb::CommitSnapshotRequest {
        snapshotter: String::new(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
    }
}

fn rm(key: &str) -> pb::RemoveSnapshotRequest {
    pb::RemoveSnapshotRequest {
        snapshotter: String::new(),
        key: key.into(),
    }
}

fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    let e = r.expect_err("request should fail");
    assert_eq!(e.code(), code, "unexpected status: {e:?}");
    assert!(
        e.message().contains(needle),
        "message {:?} should mention {needle:?}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_containerd_codes_and_the_server_keeps_serving() {
    let mut s = server().await;
    let mut c = snapshots_client(&s.sock).await.expect("connect");

    let m = c
        .prepare(prep("a", ""))
        .await
        .expect("prepare a")
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(m[0].options, ["rw", "rbind"]);
    assert_code(
        c.prepare(prep("a", "")).await,
        Code::AlreadyExists,
        "snapshot a already exists",
    );
    assert_code(
        c.prepare(prep("", "")).await,
        Code::InvalidArgument,
        "key must not be empty",
    );
    assert_code(
        c.prepare(prep("x", "no-such-parent")).await,
        Code::NotFound,
        "no-such-parent",
    );
    assert_code(
        c.prepare(prep("x", "a")).await,
        Code::InvalidArgument,
        "not a committed snapshot",
    );

    c.commit(commit("A", "a")).await.expect("commit a");
    assert_code(c.commit(commit("A2", "a")).await, Code::NotFound, "a");
    assert_code(
        c.commit(commit("", "b")).await,
        Code::InvalidArgument,
        "name must not be empty",
    );

    c.view(pb::ViewSnapshotRequest {
        snapshotter: String::new(),
        key: "v".into(),
        parent: "A".into(),
        labels: HashMap::new(),
    })
    .await
    .expect("view");
    assert_code(
        c.commit(commit("V", "v")).await,
        Code::FailedPrecondition,
        "only active snapshots can be committed",
    );
    assert_code(
        c.remove(rm("A")).await,
        Code::FailedPrecondition,
        "snapshot v is based on it",
    );
    assert_code(
        c.remove(rm("")).await,
        Code::InvalidArgument,
        "must not be empty",
    );
    assert_code(c.remove(rm("nope")).await, Code::NotFound, "nope");
    assert_code(
        c.stat(pb::StatSnapshotRequest {
            snapshotter: String::new(),
            key: "nope".into(),
        })
        .await,
        Code::NotFound,
        "snapshot nope not found",
    );
    assert_code(
        c.mounts(pb::MountsRequest {
            snapshotter: String::new(),
            key: "nope".into(),
        })
        .await,
        Code::NotFound,
        "nope",
    );

    // Update: only labels.
    let info = pb::Info {
        name: "A".into(),
        labels: [("k".to_string(), "v".to_string())].into(),
        ..Default::default()
    };
    let upd = |paths: &[&str]| pb::UpdateSnapshotRequest {
        snapshotter: String::new(),
        info: Some(info.clone()),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    };
    let got = c
        .update(upd(&["labels.k"]))
        .await
        .expect("update")
        .into_inner()
        .info
        .expect("info");
    assert_eq!(got.labels.get("k").map(String::as_str), Some("v"));
    assert_code(
        c.update(upd(&["parent"])).await,
        Code::InvalidArgument,
        "only labels are mutable",
    );

    // List: filters, invalid filter, chunking.
    assert_code(
        c.list(pb::ListSnapshotsRequest {
            snapshotter: String::new(),
            filters: vec!["name==\"open".into()],
        })
        .await,
        Code::InvalidArgument,
        "invalid filter",
    );
    for i in 0..230 {
        c.prepare(prep(&format!("many-{i:03}"), "A"))
            .await
            .expect("prepare many");
    }
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: String::new(),
            filters: vec![],
        })
        .await
        .expect("list")
        .into_inner();
    let mut sizes = Vec::new();
    while let Some(msg) = stream.message().await.expect("stream") {
        sizes.push(msg.info.len());
    }
    assert_eq!(sizes, [100, 100, 32], "232 snapshots in chunks of 100");
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: String::new(),
            filters: vec!["kind==committed".into(), "labels.k==v,name==A".into()],
        })
        .await
        .expect("list filtered")
        .into_inner();
    let msg = stream
        .message()
        .await
        .expect("stream")
        .expect("one message");
    assert_eq!(
        msg.info.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["A"]
    );

    let u = c
        .usage(pb::UsageRequest {
            snapshotter: String::new(),
            key: "A".into(),
        })
        .await
        .expect("usage")
        .into_inner();
    assert!(u.inodes >= 1);
    c.cleanup(pb::CleanupRequest {
        snapshotter: String::new(),
    })
    .await
    .expect("cleanup");
    c.remove(rm("v")).await.expect("remove view");

    // Still serving after all those errors.
    c.prepare(prep("after", "A"))
        .await
        .expect("prepare after errors");

    let _ = s.stop.take().map(|tx| tx.send(()));
    tokio::time::timeout(Duration::from_secs(10), &mut s.task)
        .await
        .expect("server stops")
        .expect("server task");
}

#[test]
fn binary_socket_mode_sd_notify_and_signals() {
    use std::os::unix::net::UnixDatagram;
    let tmp = tempfile::tempdir().expect("tempdir");
    let notify_path = tmp.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let cfg = tmp.path().join("config.toml");
    std::fs::write(&cfg, "no_such_key = 1\n[fuse]\nattr_timeout = 2\n").expect("config");
    let sock = tmp.path().join("run/d.sock");
    // A stale socket file from a previous crash is replaced.
    std::fs::create_dir_all(sock.parent().expect("parent")).expect("mkdir");
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("stale socket"));
    // Directories a crash left without a snapshot are removed at start-up.
    let snapdir = tmp.path().join("root/snapshotter/snapshots");
    std::fs::create_dir_all(snapdir.join("4242/fs/usr")).expect("orphan");
    std::fs::create_dir_all(snapdir.join("new-7/fs")).expect("orphan tmp");
    let log = tmp.path().join("log");
    let mut child = std::process::Command::new(daemon_bin())
        .arg("--root")
        .arg(tmp.path().join("root"))
        .arg("--address")
        .arg(&sock)
        .arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn daemon");
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY notification");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "socket is owner-only");
    assert!(tmp.path().join("root/snapshotter/metadata.db").exists());
    assert_eq!(
        std::fs::read_dir(&snapdir).expect("snapshots dir").count(),
        0,
        "orphans cleaned at start"
    );

    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let n = notify.recv(&mut buf).expect("STOPPING notification");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    let status = child.wait().expect("wait");
    assert!(status.success(), "SIGINT exits cleanly: {status}");
    let log = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON log line"))
        .collect();
    assert!(
        lines.iter().any(|l| l["fields"]["key"] == "no_such_key"),
        "unknown key warned: {log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "remote layers unmounted"),
        "{log}"
    );

    // A missing --config that is not the default path is an error.
    let out = std::process::Command::new(daemon_bin())
        .args(["--root", "/nonexistent-root-unused", "--config"])
        .arg(tmp.path().join("missing.toml"))
        .output()
        .expect("run daemon");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}
