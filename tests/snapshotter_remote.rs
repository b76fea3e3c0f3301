//! The remote-snapshot contract against real containerd 1.6 (and Go's `ctr-remote rpull`),
//! with a fake [`RemoteLayers`] that "mounts" a layer by writing its files into the
//! mountpoint. Shows: Prepare with the target label → AlreadyExists and containerd skips
//! the download; snapshots carry the remote label; Mounts reports Unavailable when a remote
//! ancestor is unreachable; restore re-mounts every remote snapshot. Needs root, containerd,
//! runc, docker-registry, skopeo and ctr-remote.
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use stargz::{CheckPolicy, LayerError, RemoteLayers, SnapshotterImpl, SysMounter, REMOTE_LABEL};

const DIGEST_LABEL: &str = "containerd.io/snapshot/remote/stargz.digest";

/// Writes a known layer's files into the mountpoint instead of mounting anything.
struct FakeRemote {
    layers: HashMap<String, Vec<LayerEntry>>,
    mounted: Mutex<Vec<PathBuf>>,
    unmounted: Mutex<Vec<PathBuf>>,
    broken: AtomicBool,
}

impl FakeRemote {
    fn new(layers: HashMap<String, Vec<LayerEntry>>) -> Arc<FakeRemote> {
        Arc::new(FakeRemote {
            layers,
            mounted: Mutex::default(),
            unmounted: Mutex::default(),
            broken: AtomicBool::new(false),
        })
    }
}

impl RemoteLayers for FakeRemote {
    fn mount(
        &self,
        mp: &Path,
        labels: &BTreeMap<String, String>,
        _lowers: &[PathBuf],
    ) -> Result<(), LayerError> {
        let digest = labels.get(DIGEST_LABEL).ok_or("no layer digest label")?;
        let entries = self
            .layers
            .get(digest)
            .ok_or_else(|| format!("unknown layer {digest}"))?;
        for e in entries {
            match e {
                LayerEntry::Dir { path, .. } => std::fs::create_dir_all(mp.join(path))?,
                LayerEntry::File { path, data, mode } => {
                    let p = mp.join(path);
                    std::fs::create_dir_all(p.parent().ok_or("no parent")?)?;
                    std::fs::write(&p, data)?;
                    std::fs::set_permissions(
                        &p,
                        std::os::unix::fs::PermissionsExt::from_mode(*mode),
                    )?;
                }
                other => return Err(format!("fake remote cannot express {other:?}").into()),
            }
        }
        self.mounted
            .lock()
            .map_err(|_| "poisoned")?
            .push(mp.to_path_buf());
        Ok(())
    }

    fn check(&self, _mp: &Path, _labels: &BTreeMap<String, String>) -> Result<(), LayerError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err("registry connection refused".into());
        }
        Ok(())
    }

    fn unmount(&self, mp: &Path) -> Result<(), LayerError> {
        self.unmounted
            .lock()
            .map_err(|_| "poisoned")?
            .push(mp.to_path_buf());
        Ok(())
    }
}

/// Our service on `sock`, in-process on its own runtime thread; stops on Drop.
struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    fn start(root: &Path, sock: &Path, remote: Arc<FakeRemote>) -> InProcess {
        // `check_always` (Go's key): the test flips reachability and expects the next call
        // to see it, instead of trusting the last answer for `valid_interval`.
        let sn = SnapshotterImpl::new(
            root,
            Some(remote as Arc<dyn RemoteLayers>),
            Arc::new(SysMounter),
        )
        .expect("snapshotter")
        .with_check_policy(CheckPolicy::from_config(0, true, Duration::from_secs(5)));
        sn.restore().expect("restore");
        let sn = Arc::new(sn);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let sock = sock.to_path_buf();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = stargz::bind_socket(&sock).expect("bind");
                let _ = ready_tx.send(());
                stargz::run(listener, sn, async {
                    let _ = rx.await;
                })
                .await
                .expect("serve");
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server bound");
        InProcess {
            stop: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|tx| tx.send(()));
        let _ = self.thread.take().map(|t| t.join());
    }
}

#[test]
fn remote_snapshots_with_containerd() {
    require_tool("ctr-remote");
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("root/snapshotter");
    let sock = tmp.path().join("run/sn.sock");
    let reg = Registry::start();
    let tools = tools_layer(&["/bin/sh", "/bin/cat"]);
    let data = vec![LayerEntry::file(
        "data/hello.txt",
        "from the remote layer\n",
    )];
    let layers = vec![Layer::from_entries(&tools), Layer::from_entries(&data)];
    let known: HashMap<String, Vec<LayerEntry>> =
        [(layers[0].digest(), tools), (layers[1].digest(), data)]
            .into_iter()
            .collect();
    let image = push_image(&reg, "test/remote", "v1", &layers);

    let remote = FakeRemote::new(known.clone());
    let mut server = Some(InProcess::start(&root, &sock, remote.clone()));
    let ctrd = Containerd::start(ContainerdOpts {
        stargz_socket: Some(sock.clone()),
        ..Default::default()
    });
    ctrd.wait_stargz_ready(Duration::from_secs(30));

    let out = std::process::Command::new("ctr-remote")
        .arg("--address")
        .arg(ctrd.socket())
        .args([
            "-n",
            "default",
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "stargz",
            &image,
        ])
        .output()
        .expect("run ctr-remote");
    assert!(
        out.status.success(),
        "rpull failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        remote.mounted.lock().expect("lock").len(),
        2,
        "both layers mounted remotely"
    );

    let snaps = daemon_snapshots(&sock);
    let remote_committed: Vec<_> = snaps
        .iter()
        .filter(|(_, v)| {
            v.0 == snapshots_pb::Kind::Committed as i32 && v.2.contains_key(REMOTE_LABEL)
        })
        .collect();
    assert_eq!(remote_committed.len(), 2, "{snaps:?}");
    // (The readiness probe's scratch key is removed by containerd's GC, maybe not yet.)
    assert!(
        snaps
            .iter()
            .filter(|(k, _)| !k.contains("readiness-probe"))
            .all(|(_, v)| v.0 == snapshots_pb::Kind::Committed as i32),
        "no leftover active snapshots: {snaps:?}"
    );

    let out = ctrd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "stargz",
        &image,
        "r1",
        "/bin/cat",
        "/data/hello.txt",
    ]);
    assert_eq!(out, "from the remote layer\n");

    // An unreachable remote ancestor: Mounts answers Unavailable, containerd refuses to run.
    remote.broken.store(true, Ordering::SeqCst);
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "stargz",
        &image,
        "r2",
        "/bin/cat",
        "/data/hello.txt",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unavailable"),
        "error should say the layer is unavailable: {err}"
    );
    remote.broken.store(false, Ordering::SeqCst);
    let _ = ctrd.ctr(&["containers", "rm", "r2"]);

    // Restart: every remote snapshot is mounted again from its stored labels.
    drop(server.take());
    let remote2 = FakeRemote::new(known);
    server = Some(InProcess::start(&root, &sock, remote2.clone()));
    ctrd.wait_stargz_ready(Duration::from_secs(30));
    assert_eq!(
        remote2.mounted.lock().expect("lock").len(),
        2,
        "restore re-mounted both layers"
    );
    let out = ctrd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "stargz",
        &image,
        "r3",
        "/bin/cat",
        "/data/hello.txt",
    ]);
    assert_eq!(out, "from the remote layer\n");

    // Removing the image lets containerd's GC remove the snapshots, which unmounts them.
    ctrd.ctr_ok(&["image", "rm", "--sync", &image]);
    let gone = wait_until(Duration::from_secs(20), || {
        remote2
            .unmounted
            .lock()
            .map(|u| u.len() >= 2)
            .unwrap_or(false)
    });
    assert!(
        gone,
        "remote layers unmounted on Remove: {:?}",
        remote2.unmounted.lock().map(|u| u.clone())
    );
    drop(ctrd);
    drop(server);
}
