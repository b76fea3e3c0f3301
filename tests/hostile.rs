//! Hostile images and registries against the real daemon (needs root, /dev/fuse and
//! docker-registry; CI runs as root).
//!
//! Every layer here is built by the test and is a few KB to a few MB; each is handed to one
//! daemon through a Prepare with the stargz labels, as containerd would. For each: the daemon
//! stays up, its peak RSS (`VmHWM` in /proc) stays under [`MAX_PEAK_RSS`], the layer is either
//! refused with a clear reason (Prepare falls back to an ordinary snapshot and says why in the
//! log) or served correctly, and a good layer mounted first keeps serving throughout.

mod common;
mod fs_support;
mod remote_support;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    gzip, layer_tar, snapshots_client, snapshots_pb, Daemon, Layer, LayerEntry, Registry,
};
use remote_support::{Action, Fault, Hostile, Proxy, ProxyRequest, Reply};

/// The bound this suite holds the daemon to, whatever the layers say.
const MAX_PEAK_RSS: u64 = 64 << 20;
/// No log line may carry more than this (untrusted strings are clipped).
const MAX_LOG_LINE: usize = 16 << 10;

const TOC_LABEL: &str = "containerd.io/snapshot/stargz/toc.digest";

/// Timeouts short enough for a test, with the same shape as the defaults.
const CONFIG: &str = r#"
[blob]
fetching_timeout_sec = 2
max_retries = 1
min_wait_msec = 10
max_wait_msec = 100
stall_timeout_msec = 1500
"#;

type Client = snapshots_pb::snapshots_client::SnapshotsClient<tonic::transport::Channel>;

fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    kb.expect("VmHWM of the daemon") << 10
}

/// A blob whose TOC member is `member` (no payload before it), and a footer.
fn blob_with_toc_member(member: &[u8]) -> Vec<u8> {
    let mut blob = member.to_vec();
    blob.extend_from_slice(&stargz::estargz::footer_bytes(0));
    blob
}

/// A TOC member holding `json` behind `extension` (raw tar blocks before the file's header).
fn toc_member(extension: &[u8], json: &[u8]) -> Vec<u8> {
    let mut tar = extension.to_vec();
    let mut h = tar::Header::new_ustar();
    h.set_path("stargz.index.json").expect("name");
    h.set_size(json.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    tar.extend_from_slice(json);
    tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
    gzip(&tar)
}

/// A gzip'ed tar extension record of `kind` (`L` long name, `x` PAX) claiming `size` bytes, all
/// of them streamed (zeros compress ~1000:1, so the member stays small).
fn oversized_extension_member(kind: tar::EntryType, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_path("././@LongLink").expect("name");
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_cksum();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(h.as_bytes()).expect("gz");
    let zeros = vec![b'a'; 1 << 20];
    let mut left = size.div_ceil(512) * 512;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        gz.write_all(&zeros[..n]).expect("gz");
        left -= n as u64;
    }
    gz.finish().expect("gz")
}

fn toc_json(entries: &[serde_json::Value]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"version": 1, "entries": entries})).expect("json")
}

fn estargz_layer(entries: &[LayerEntry]) -> (Vec<u8>, String) {
    let tar = layer_tar(entries);
    let mut blob = Vec::new();
    let opts = stargz::estargz::BuildOptions {
        chunk_size: 1 << 20,
        threads: 1,
        ..Default::default()
    };
    let toc = stargz::estargz::build(tar.as_slice(), &mut blob, &opts)
        .expect("estargz")
        .toc_digest;
    (blob, toc)
}

struct Case {
    name: &'static str,
    blob: Vec<u8>,
    toc_digest: String,
    /// What the reason the daemon logs for refusing the layer must say.
    refused: &'static str,
}

fn hostile_layers() -> Vec<Case> {
    let dir = |name: String| serde_json::json!({"name": name, "type": "dir"});
    let reg0 = |name: &str| serde_json::json!({"name": name, "type": "reg"});
    let mut cases = Vec::new();
    // Tar extension records in the TOC member far beyond any real one.
    let long = oversized_extension_member(tar::EntryType::GNULongName, 256 << 20);
    cases.push(Case {
        name: "gnu-long-name",
        blob: blob_with_toc_member(&long),
        toc_digest: stargz::estargz::sha256_digest(b"any"),
        refused: ("tar extension record 'L' of 268435456 bytes"),
    });
    let pax = oversized_extension_member(tar::EntryType::XHeader, 256 << 20);
    cases.push(Case {
        name: "pax-record",
        blob: blob_with_toc_member(&pax),
        toc_digest: stargz::estargz::sha256_digest(b"any"),
        refused: ("tar extension record 'x' of 268435456 bytes"),
    });
    // Deep chains of implicit directories: 300 names of ~4 KB, each implying 2,000 directories
    // (4 MB of their paths): the reviewed case, a layer of a few KB that implied over 1 GB.
    let deep: Vec<_> = (0..300)
        .map(|i| dir(format!("x{i}/{}e", "d/".repeat(2000))))
        .collect();
    let json = toc_json(&deep);
    cases.push(Case {
        name: "deep-implicit-dirs",
        toc_digest: stargz::estargz::sha256_digest(&json),
        blob: blob_with_toc_member(&toc_member(&[], &json)),
        refused: ("implies more parent directories"),
    });
    // Whiteout and hardlink edge cases.
    let edge: [(&str, Vec<serde_json::Value>, &str); 4] = [
        (
            "empty-whiteout",
            vec![reg0(".wh.")],
            "whiteout of an empty name",
        ),
        (
            "state-dir-whiteout",
            vec![reg0(".wh..stargz-snapshotter")],
            "shadows the daemon's state directory",
        ),
        (
            "state-dir",
            vec![
                dir(".stargz-snapshotter".into()),
                reg0(".stargz-snapshotter/x"),
            ],
            "shadows the daemon's state directory",
        ),
        (
            "hardlink-over-dir",
            vec![
                reg0("f"),
                dir("d".into()),
                reg0("d/x"),
                serde_json::json!({"name": "d", "type": "hardlink", "linkName": "f"}),
            ],
            "parent \"d\" is not a directory",
        ),
    ];
    for (name, entries, reason) in edge {
        let json = toc_json(&entries);
        cases.push(Case {
            name,
            toc_digest: stargz::estargz::sha256_digest(&json),
            blob: blob_with_toc_member(&toc_member(&[], &json)),
            refused: (reason),
        });
    }
    cases
}

/// The stargz labels containerd's unpacker (through `ctr-remote rpull`) sets on a layer.
fn labels(reference: &str, digest: &str, toc: &str, target: &str) -> HashMap<String, String> {
    HashMap::from([
        ("containerd.io/snapshot.ref".into(), target.into()),
        (
            "containerd.io/snapshot/remote/stargz.reference".into(),
            reference.into(),
        ),
        (
            "containerd.io/snapshot/remote/stargz.digest".into(),
            digest.into(),
        ),
        (
            "containerd.io/snapshot/remote/stargz.layers".into(),
            digest.into(),
        ),
        (TOC_LABEL.into(), toc.into()),
    ])
}

/// Prepare as containerd does for a layer: true when it became a remote snapshot, false when
/// the daemon fell back to an ordinary one (the active snapshot is removed again).
async fn prepare(c: &mut Client, key: &str, labels: HashMap<String, String>) -> bool {
    let req = snapshots_pb::PrepareSnapshotRequest {
        snapshotter: String::new(),
        key: key.into(),
        parent: String::new(),
        labels,
    };
    let res = tokio::time::timeout(Duration::from_secs(120), c.prepare(req))
        .await
        .expect("Prepare answered within 120 s");
    match res {
        Err(s) if s.code() == tonic::Code::AlreadyExists => true,
        Ok(_) => {
            let rm = snapshots_pb::RemoveSnapshotRequest {
                snapshotter: String::new(),
                key: key.into(),
            };
            c.remove(rm).await.expect("remove the fallback snapshot");
            false
        }
        Err(s) => panic!("Prepare {key}: {s}"),
    }
}

/// Where a committed remote snapshot's layer is mounted: a View of it is a bind of that dir.
async fn layer_dir(c: &mut Client, target: &str) -> PathBuf {
    let key = format!("view-{target}");
    let req = snapshots_pb::ViewSnapshotRequest {
        snapshotter: String::new(),
        key,
        parent: target.into(),
        labels: HashMap::new(),
    };
    let mounts = c.view(req).await.expect("View").into_inner().mounts;
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    PathBuf::from(&mounts[0].source)
}

fn read_all(dir: &Path, names: &[&str]) -> Vec<Vec<u8>> {
    names
        .iter()
        .map(|n| std::fs::read(dir.join(n)).unwrap_or_else(|e| panic!("read {n}: {e}")))
        .collect()
}

/// The reason the daemon logged for not mounting the layer of Prepare `key` lazily.
fn fallback_error(daemon: &Daemon, key: &str) -> String {
    let log = daemon.log();
    let mut event = log
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["fields"]["remote-snapshot-prepared"] == serde_json::Value::Bool(false)
                && v["fields"]["key"] == key
        });
    let error = event
        .next()
        .and_then(|v| v["fields"]["error"].as_str().map(str::to_owned));
    error.unwrap_or_else(|| panic!("{key}: no fallback with a reason logged"))
}

/// Our daemon under `dir` with [`CONFIG`]; returns it and its socket.
fn start_daemon(dir: &Path) -> (Daemon, PathBuf) {
    let config = dir.join("config.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let socket = dir.join("stargz.sock");
    let args = ["--config", config.to_str().expect("utf8")];
    (Daemon::start(&dir.join("root"), &socket, &args), socket)
}

fn assert_log_lines_bounded(daemon: &Daemon) {
    let log = daemon.log();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(
        longest <= MAX_LOG_LINE,
        "a daemon log line has {longest} bytes"
    );
}

#[test]
fn hostile_layers_and_registries_cannot_take_the_daemon_down() {
    fs_support::require_root();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let registry = Registry::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (daemon, socket) = start_daemon(tmp.path());
    let pid = daemon.pid().expect("daemon pid");

    // A good layer, mounted first and read again after every hostile case.
    let good_files = [
        ("etc/good.txt", b"good layer\n".to_vec()),
        ("bin/tool", fs_support::noise(300_000, 5)),
    ];
    let entries: Vec<_> = good_files
        .iter()
        .map(|(p, d)| LayerEntry::file(p, d.clone()))
        .collect();
    let (good_blob, good_toc) = estargz_layer(&entries);
    // A layer whose registry will stall: 24 files of one chunk each.
    let stall_entries: Vec<_> = (0..24)
        .map(|i| {
            LayerEntry::file(
                &format!("data/f{i:02}"),
                fs_support::noise(64 << 10, i + 10),
            )
        })
        .collect();
    let (stall_blob, stall_toc) = estargz_layer(&stall_entries);
    // Hand-made: garbage after the chunk's gzip member, and a deflate stream far past the chunk.
    let content = fs_support::noise(100_000, 3);
    let (garbage_blob, garbage_toc) =
        fs_support::hand_made_blob(&content, &[0u8; 32 << 20], &fs_support::noise(10_000, 4))
            .expect("blob");
    // A huge directory, served (readdir is linear in its size).
    let huge: Vec<_> = (0..50_000)
        .map(|i| serde_json::json!({"name": format!("big/f{i}"), "type": "reg"}))
        .collect();
    let huge_json = toc_json(&huge);
    let huge_blob = blob_with_toc_member(&toc_member(&[], &huge_json));

    let cases = hostile_layers();
    let mut layers: Vec<Layer> = vec![
        Layer::from_blob(good_blob, common::MEDIA_TYPE_LAYER_GZIP, "sha256:00"),
        Layer::from_blob(stall_blob, common::MEDIA_TYPE_LAYER_GZIP, "sha256:00"),
        Layer::from_blob(garbage_blob, common::MEDIA_TYPE_LAYER_GZIP, "sha256:00"),
        Layer::from_blob(huge_blob, common::MEDIA_TYPE_LAYER_GZIP, "sha256:00"),
    ];
    layers.extend(
        cases
            .iter()
            .map(|c| Layer::from_blob(c.blob.clone(), common::MEDIA_TYPE_LAYER_GZIP, "sha256:00")),
    );
    let digests: Vec<String> = layers.iter().map(Layer::digest).collect();
    let reference = common::push_image(&registry, "hostile", "v1", &layers);

    // The stall layer is reached through a proxy that can freeze before response headers.
    let frozen = Arc::new(AtomicBool::new(false));
    let policy_frozen = frozen.clone();
    let proxy = rt
        .block_on(Proxy::start(
            registry.addr(),
            Arc::new(move |_req: &ProxyRequest| {
                Action::Forward(if policy_frozen.load(Ordering::SeqCst) {
                    Fault::Silent
                } else {
                    Fault::None
                })
            }),
        ))
        .expect("proxy");
    let stall_reference = reference.replacen(registry.addr(), &proxy.addr, 1);

    rt.block_on(async {
        let mut c = snapshots_client(&socket).await.expect("connect");
        assert!(prepare(&mut c, "k-good", labels(&reference, &digests[0], &good_toc, "good")).await, "good layer not mounted");
        let good_dir = layer_dir(&mut c, "good").await;
        let good_names: Vec<&str> = good_files.iter().map(|(p, _)| *p).collect();
        let want: Vec<Vec<u8>> = good_files.iter().map(|(_, d)| d.clone()).collect();
        assert_eq!(read_all(&good_dir, &good_names), want);

        for (case, digest) in cases.iter().zip(&digests[4..]) {
            let start = Instant::now();
            let remote = prepare(&mut c, &format!("k-{}", case.name), labels(&reference, digest, &case.toc_digest, case.name)).await;
            let reason = case.refused;
            assert!(!remote, "{}: hostile layer was mounted", case.name);
            let error = fallback_error(&daemon, &format!("k-{}", case.name));
            eprintln!("{}: {error}", case.name);
            assert!(error.contains(reason), "{}: fallback reason lacks {reason:?}: {error}", case.name);
            assert!(error.len() < 2048, "{}: unclipped error of {} B", case.name, error.len());
            assert_eq!(read_all(&good_dir, &good_names), want, "good layer after {}", case.name);
            let rss = peak_rss(pid);
            assert!(rss < MAX_PEAK_RSS, "{}: daemon peak RSS {} MiB", case.name, rss >> 20);
            eprintln!("{} ({} B): refused in {:?}, daemon peak RSS {} MiB", case.name, case.blob.len(), start.elapsed(), rss >> 20);
        }

        // Served correctly: bytes past the chunk are ignored; a huge directory lists whole.
        assert!(prepare(&mut c, "k-garbage", labels(&reference, &digests[2], &garbage_toc, "garbage")).await);
        let dir = layer_dir(&mut c, "garbage").await;
        assert!(std::fs::read(dir.join("f")).expect("read f") == content, "wrong bytes past a chunk");
        assert!(prepare(&mut c, "k-huge", labels(&reference, &digests[3], &stargz::estargz::sha256_digest(&huge_json), "huge")).await);
        let dir = layer_dir(&mut c, "huge").await;
        let start = Instant::now();
        assert_eq!(std::fs::read_dir(dir.join("big")).expect("readdir").count(), 50_000);
        eprintln!("listed 50,000 entries in {:?}", start.elapsed());
        let rss = peak_rss(pid);
        assert!(rss < MAX_PEAK_RSS, "huge directory: daemon peak RSS {} MiB", rss >> 20);

        // A registry that stalls before its response headers, with more readers than threads.
        assert!(prepare(&mut c, "k-stall", labels(&stall_reference, &digests[1], &stall_toc, "stall")).await);
        let stall_dir = layer_dir(&mut c, "stall").await;
        // The last file: read-ahead goes forward in blob order, so the files read during the
        // stall are still missing.
        std::fs::read(stall_dir.join("data/f23")).expect("read before the stall");
        frozen.store(true, Ordering::SeqCst);
        let readers: Vec<_> = (1..13)
            .map(|i| {
                let p = stall_dir.join(format!("data/f{i:02}"));
                std::thread::spawn(move || std::fs::read(p).map(|_| ()))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let start = Instant::now();
        assert_eq!(std::fs::read_dir(stall_dir.join("data")).expect("ls").count(), 24);
        std::fs::symlink_metadata(stall_dir.join("data/f05")).expect("stat");
        assert_eq!(std::fs::read(stall_dir.join("data/f23")).expect("cached read").len(), 64 << 10);
        assert_eq!(read_all(&good_dir, &good_names), want, "good layer while another registry stalls");
        let took = start.elapsed();
        // containerd's calls for the mounted layer answer within the check bound, not the stall.
        let mounts = snapshots_pb::MountsRequest { snapshotter: String::new(), key: "view-stall".into() };
        let asked = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(30), c.mounts(mounts)).await;
        let mounts_took = asked.elapsed();
        assert!(answer.is_ok() && mounts_took < Duration::from_secs(10), "Mounts took {mounts_took:?} on a stalled registry");
        let results: Vec<_> = readers.into_iter().map(|r| r.join().expect("reader thread")).collect();
        let waited = start.elapsed();
        assert!(took < Duration::from_secs(3), "metadata and cached reads waited {took:?} behind a stalled registry");
        assert!(results.iter().all(|r| r.as_ref().is_err_and(|e| e.raw_os_error() == Some(libc::EIO))), "stalled reads: {results:?}");
        eprintln!("12 reads on a stalled registry failed with EIO after {waited:?}; metadata answered in {took:?}, Mounts in {mounts_took:?}");
        frozen.store(false, Ordering::SeqCst);
        let again = std::fs::read(stall_dir.join("data/f05")).expect("a later read tries again");
        assert_eq!(again.len(), 64 << 10);

        let rss = peak_rss(pid);
        assert!(rss < MAX_PEAK_RSS, "daemon peak RSS {} MiB", rss >> 20);
        eprintln!("daemon peak RSS over the whole suite: {} MiB", rss >> 20);
    });
    assert_log_lines_bounded(&daemon);
    drop(daemon);
    drop(proxy);
}

/// Registries whose token endpoint or error responses never end: the layer falls back with a
/// clear reason, promptly, in bounded memory.
#[test]
fn endless_token_and_error_bodies_fall_back_in_bounded_memory() {
    fs_support::require_root();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (daemon, socket) = start_daemon(tmp.path());
    let pid = daemon.pid().expect("daemon pid");
    let endless = |status: u16, headers: Vec<(String, String)>| Reply::Endless {
        status,
        headers,
        prefix: b"{\"token\":\"".to_vec(),
        piece: vec![b'x'; 64 << 10],
        cap: 1 << 30,
    };
    let token_server = rt
        .block_on(Hostile::start(Arc::new(move |_req: &ProxyRequest| {
            endless(
                200,
                vec![("content-type".into(), "application/json".into())],
            )
        })))
        .expect("token server");
    let realm = format!(
        "Bearer realm=\"http://{}/token\",service=\"hostile\"",
        token_server.addr
    );
    let auth_server = rt
        .block_on(Hostile::start(Arc::new(move |_req: &ProxyRequest| {
            Reply::Fixed {
                status: 401,
                headers: vec![("www-authenticate".into(), realm.clone())],
                body: b"{}".to_vec(),
            }
        })))
        .expect("registry");
    let error_server = rt
        .block_on(Hostile::start(Arc::new(
            move |req: &ProxyRequest| match req.path.as_str() {
                "/v2/" => Reply::Fixed {
                    status: 200,
                    headers: vec![],
                    body: b"{}".to_vec(),
                },
                _ => Reply::Endless {
                    status: 500,
                    headers: vec![],
                    prefix: b"{\"errors\":[{\"message\":\"".to_vec(),
                    piece: vec![b'e'; 64 << 10],
                    cap: 1 << 30,
                },
            },
        )))
        .expect("registry");
    let digest = format!("sha256:{}", "ab".repeat(32));
    let toc = format!("sha256:{}", "cd".repeat(32));
    rt.block_on(async {
        let mut c = snapshots_client(&socket).await.expect("connect");
        for (name, addr, reason) in [
            ("token", &auth_server.addr, "token"),
            ("error", &error_server.addr, "500"),
        ] {
            let start = Instant::now();
            let reference = format!("{addr}/hostile:{name}");
            assert!(
                !prepare(
                    &mut c,
                    &format!("k-{name}"),
                    labels(&reference, &digest, &toc, name)
                )
                .await,
                "{name}: mounted"
            );
            let error = fallback_error(&daemon, &format!("k-{name}"));
            eprintln!("endless {name} body: {error}");
            assert!(
                error.contains(reason),
                "{name}: fallback reason lacks {reason:?}: {error}"
            );
            assert!(
                error.len() < 2048,
                "{name}: unclipped error of {} B",
                error.len()
            );
            let rss = peak_rss(pid);
            assert!(
                rss < MAX_PEAK_RSS,
                "{name}: daemon peak RSS {} MiB",
                rss >> 20
            );
            eprintln!(
                "endless {name} body: fell back in {:?}, daemon peak RSS {} MiB",
                start.elapsed(),
                rss >> 20
            );
        }
    });
    assert!(
        token_server.sent() < 256 << 20,
        "the daemon read {} B of an endless token",
        token_server.sent()
    );
    assert_log_lines_bounded(&daemon);
}
