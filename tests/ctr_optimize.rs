//! `ctr-remote image optimize` against a real containerd 1.6, runc and a local registry (needs
//! root and overlayfs, like CI).
//!
//! Go's `ctr-remote` 0.12 (`/usr/bin/ctr-remote`) is the reference: for the same workload both
//! must record the same files per layer, and an image optimized by either must be prefetched by
//! the other's daemon.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_success as ok, push_image, require_tool, sha256_digest, tools_layer, wait_until,
    Containerd, ContainerdOpts, GoDaemon, Layer, LayerEntry, Registry,
};

const GO_CTR_REMOTE: &str = "/usr/bin/ctr-remote";

fn ours() -> &'static str {
    env!("CARGO_BIN_EXE_ctr-remote")
}

/// A `ctr-remote` command against `ctrd` in namespace `ns`, with its temp files under `tmp`
/// (so a test can see that nothing is left there).
fn ctr_remote_cmd(bin: &str, ctrd: &Containerd, ns: &str, tmp: &Path, args: &[&str]) -> Command {
    let mut c = ctrd.ctr_remote_cmd(bin, ns, args);
    c.env("TMPDIR", tmp).stdin(Stdio::null());
    c
}

fn ctr_remote(bin: &str, ctrd: &Containerd, ns: &str, tmp: &Path, args: &[&str]) -> Output {
    ctr_remote_cmd(bin, ctrd, ns, tmp, args)
        .output()
        .expect("run ctr-remote")
}

/// Record lines as `layer index -> paths in first-access order` (Go's file repeats paths).
fn read_record(path: &Path) -> BTreeMap<usize, Vec<String>> {
    let text = std::fs::read_to_string(path).expect("record file");
    let mut out: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).expect("record line is JSON");
        let layer = v["layerIndex"].as_u64().expect("layerIndex") as usize;
        let p = v["path"].as_str().expect("path").to_string();
        assert!(
            v["manifestDigest"]
                .as_str()
                .is_some_and(|d| d.starts_with("sha256:")),
            "{line}"
        );
        let files = out.entry(layer).or_default();
        if !files.contains(&p) {
            files.push(p);
        }
    }
    out
}

/// Every path of a record file, first-seen order (what Go's `convert` reads of it).
fn record_paths(path: &Path) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in std::fs::read_to_string(path).expect("record").lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        let p = v["path"].as_str().expect("path").to_string();
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

fn as_sets(r: &BTreeMap<usize, Vec<String>>) -> BTreeMap<usize, BTreeSet<String>> {
    r.iter()
        .map(|(k, v)| (*k, v.iter().cloned().collect()))
        .collect()
}

/// Asserts `tmp` is empty and nothing is mounted below it: the optimize run left nothing.
fn assert_nothing_left(tmp: &Path) {
    let left: Vec<_> = std::fs::read_dir(tmp)
        .expect("read tmp")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let tmp_s = tmp.display().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&tmp_s)),
        "mount left under {tmp_s}"
    );
}

/// `(manifest, config)` of image `name` in namespace `ns`.
fn manifest_of(ctrd: &Containerd, ns: &str, name: &str) -> (serde_json::Value, serde_json::Value) {
    let ls = ctrd.ctr_ns_ok(ns, &["images", "ls"]);
    let line = ls
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("{name} not listed in {ns}: {ls}"));
    let digest = line.split_whitespace().nth(2).expect("digest column");
    let manifest: serde_json::Value =
        serde_json::from_str(&ctrd.ctr_ns_ok(ns, &["content", "get", digest])).expect("manifest");
    let config: serde_json::Value = serde_json::from_str(
        &ctrd.ctr_ns_ok(
            ns,
            &[
                "content",
                "get",
                manifest["config"]["digest"]
                    .as_str()
                    .expect("config digest"),
            ],
        ),
    )
    .expect("config");
    (manifest, config)
}

/// Decompressed length of blob `digest` in namespace `ns`.
fn uncompressed_len(ctrd: &Containerd, ns: &str, digest: &str) -> u64 {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(ctrd.socket())
        .args(["-n", ns, "content", "get", digest])
        .output()
        .expect("ctr content get");
    assert!(out.status.success());
    let mut d = flate2::read::MultiGzDecoder::new(&out.stdout[..]);
    std::io::copy(&mut d, &mut std::io::sink()).expect("gunzip")
}

/// Names of the TOC entries of `layer` (our `get-toc-digest --dump-toc`), in blob order.
fn toc_names(ctrd: &Containerd, ns: &str, layer: &str) -> Vec<(String, String)> {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = ok(
        ctr_remote(
            ours(),
            ctrd,
            ns,
            tmp.path(),
            &["image", "get-toc-digest", "--dump-toc", layer],
        ),
        "dump toc",
    );
    let toc: serde_json::Value = serde_json::from_str(&out).expect("toc json");
    toc["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or("").to_string(),
                e["type"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Checks every layer of the optimized image `name`: Go's `get-toc-digest` agrees with the
/// `toc.digest` annotation, the `uncompressed` annotation is the config's diff ID, and the
/// landmark follows exactly the layer's recorded files (regular files in record order, with
/// their parent directories), or is `.no.prefetch.landmark` when nothing was recorded.
fn check_optimized_layers(
    ctrd: &Containerd,
    ns: &str,
    name: &str,
    record: &BTreeMap<usize, Vec<String>>,
) {
    let (manifest, config) = manifest_of(ctrd, ns, name);
    let layers = manifest["layers"].as_array().expect("layers");
    let tmp = tempfile::tempdir().expect("tmp");
    for (i, l) in layers.iter().enumerate() {
        let digest = l["digest"].as_str().expect("digest");
        let go = ok(
            ctr_remote(
                GO_CTR_REMOTE,
                ctrd,
                ns,
                tmp.path(),
                &["image", "get-toc-digest", digest],
            ),
            "Go get-toc-digest",
        );
        assert_eq!(
            Some(go.trim()),
            l["annotations"]["containerd.io/snapshot/stargz/toc.digest"].as_str(),
            "layer {i} toc digest"
        );
        // Go's converter writes only the size; ours the diff ID as well.
        if let Some(d) = l["annotations"]["containerd.io/uncompressed"].as_str() {
            assert_eq!(
                Some(d),
                config["rootfs"]["diff_ids"][i].as_str(),
                "layer {i}"
            );
        }
        let size: u64 = l["annotations"]["io.containers.estargz.uncompressed-size"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("layer {i}: no uncompressed-size annotation: {l}"));
        assert_eq!(size, uncompressed_len(ctrd, ns, digest), "layer {i} size");
        let names = toc_names(ctrd, ns, digest);
        let recorded = record.get(&i).cloned().unwrap_or_default();
        let is_landmark = |n: &str| n == ".prefetch.landmark" || n == ".no.prefetch.landmark";
        assert_eq!(
            names.iter().filter(|(n, _)| is_landmark(n)).count(),
            1,
            "layer {i}: one landmark"
        );
        assert!(
            !names.iter().any(|(n, _)| n == "stargz.index.json"),
            "layer {i}: an old TOC kept as a file"
        );
        let landmark = names
            .iter()
            .position(|(n, _)| is_landmark(n))
            .unwrap_or_else(|| panic!("layer {i} has no landmark"));
        if recorded.is_empty() {
            assert_eq!(names[landmark].0, ".no.prefetch.landmark", "layer {i}");
            continue;
        }
        assert_eq!(names[landmark].0, ".prefetch.landmark", "layer {i}");
        let before: Vec<&str> = names[..landmark]
            .iter()
            .filter(|(_, t)| t == "reg")
            .map(|(n, _)| n.as_str())
            .collect();
        let want: Vec<&str> = recorded
            .iter()
            .map(String::as_str)
            .filter(|p| names.iter().any(|(n, t)| n == p && t == "reg"))
            .collect();
        assert_eq!(before, want, "layer {i}: files before the landmark");
    }
}

// ---------------------------------------------------------------------------------------------
// A small image built here
// ---------------------------------------------------------------------------------------------

/// `data/a.txt`, `data/b.txt`, `data/gone.txt` and `data/hard`, a hardlink to `data/b.txt`.
fn data_layer_with_hardlink() -> Layer {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    b.append_data(
        &mut header(tar::EntryType::Directory, 0o755, 0),
        "data/",
        std::io::empty(),
    )
    .expect("dir");
    for (name, body) in [
        ("data/a.txt", "lower a\n"),
        ("data/b.txt", "lower b\n"),
        ("data/gone.txt", "deleted above\n"),
    ] {
        b.append_data(
            &mut header(tar::EntryType::Regular, 0o644, body.len() as u64),
            name,
            body.as_bytes(),
        )
        .expect("file");
    }
    b.append_link(
        &mut header(tar::EntryType::Link, 0o644, 0),
        "data/hard",
        "data/b.txt",
    )
    .expect("link");
    let tar = b.into_inner().expect("tar");
    Layer::from_blob(
        common::gzip(&tar),
        common::MEDIA_TYPE_LAYER_GZIP,
        &sha256_digest(&tar),
    )
}

/// Four layers: host tools; data files (one a hardlink); an upper layer that shadows `data/a.txt`, deletes
/// `data/gone.txt` and adds the symlink `data/link -> a.txt`; and a layer nothing reads.
fn small_layers() -> Vec<Layer> {
    vec![
        Layer::from_entries(&tools_layer(&["/bin/sh", "/bin/cat", "/bin/sleep"])),
        data_layer_with_hardlink(),
        Layer::from_entries(&[
            LayerEntry::file("data/a.txt", "upper a\n"),
            LayerEntry::whiteout("data/gone.txt"),
            LayerEntry::symlink("data/link", "a.txt"),
        ]),
        Layer::from_entries(&[LayerEntry::file("extra/unused.txt", "never read\n")]),
    ]
}

/// Pushes an image whose config names `arch` and runs `cmd` (none when `None`).
fn push_custom(reg: &Registry, name: &str, arch: &str, cmd: Option<&[&str]>) -> String {
    require_tool("skopeo");
    let layers = small_layers();
    let dir = tempfile::tempdir().expect("tempdir");
    let blobs = dir.path().join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let put = |data: &[u8]| -> String {
        let d = sha256_digest(data);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), data).expect("blob");
        d
    };
    let mut cfg = serde_json::json!({"Env": ["PATH=/usr/bin:/bin"]});
    if let Some(cmd) = cmd {
        cfg["Cmd"] = serde_json::json!(cmd);
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch, "os": "linux", "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    }))
    .expect("config");
    let config_digest = put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": layers.iter().map(|l| serde_json::json!({"mediaType": l.media_type, "digest": put(&l.blob), "size": l.blob.len()})).collect::<Vec<_>>(),
    }))
    .expect("manifest");
    let md = put(&manifest);
    std::fs::write(
        dir.path().join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
        .expect("index"),
    )
    .expect("write index");
    std::fs::write(
        dir.path().join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("layout");
    let reference = format!("{}/{name}:v1", reg.addr());
    let out = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:v1", dir.path().display()))
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo");
    ok(out, "skopeo copy");
    reference
}

const SMALL_WORKLOAD_ENTRYPOINT: &str = r#"["/bin/sh","-c"]"#;
const SMALL_WORKLOAD_ARGS: &str =
    r#"["cat /data/link /data/b.txt /data/hard; cat /data/gone.txt 2>/dev/null; true"]"#;

/// Ours attributes each opened file to the layer it comes from (shadowed, deleted, behind a
/// symlink, a hardlink) exactly as Go's tool does, converts with those files first, and leaves nothing.
/// Ours pulls the source itself; Go needs it pulled first.
#[test]
fn optimize_small_image_records_layers_like_go() {
    let reg = Registry::start();
    let image = push_image(&reg, "opt/small", "v1", &small_layers());
    let ctrd = Containerd::start(ContainerdOpts::default());
    let work = tempfile::tempdir().expect("tempdir");
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");

    let dst_ours = format!("{}/opt/small:ours", reg.addr());
    let rec_ours = work.path().join("ours.json");
    let rec_ours_s = rec_ours.display().to_string();
    let out = ctr_remote(
        ours(),
        &ctrd,
        "ours",
        &tmp,
        &[
            "image",
            "optimize",
            "--plain-http",
            "--oci",
            "--entrypoint",
            SMALL_WORKLOAD_ENTRYPOINT,
            "--args",
            SMALL_WORKLOAD_ARGS,
            "--record-out",
            &rec_ours_s,
            &image,
            &dst_ours,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let printed = ok(out, "our optimize");
    assert!(stderr.contains("pulling"), "{stderr}");
    assert!(stderr.contains("exited with code 0"), "{stderr}");
    assert!(
        stderr.contains("upper a") && stderr.contains("lower b"),
        "{stderr}"
    );
    assert_nothing_left(&tmp);

    let rec = read_record(&rec_ours);
    let layer_of = |p: &str| {
        rec.iter()
            .find(|(_, v)| v.iter().any(|x| x == p))
            .map(|(k, _)| *k)
    };
    assert_eq!(layer_of("bin/cat"), Some(0), "{rec:?}");
    assert_eq!(layer_of("data/a.txt"), Some(2), "{rec:?}");
    assert_eq!(layer_of("data/b.txt"), Some(1), "{rec:?}");
    // a hardlink is recorded under the name it was opened by, as by Go
    assert_eq!(layer_of("data/hard"), Some(1), "{rec:?}");
    assert_eq!(layer_of("data/gone.txt"), None, "{rec:?}");
    assert_eq!(layer_of("data/link"), None, "{rec:?}");
    assert!(!rec.contains_key(&3), "{rec:?}");
    // the binary first: exec comes before anything it opens
    assert_eq!(rec[&0][0], "bin/sh", "{rec:?}");

    let (manifest, _) = manifest_of(&ctrd, "ours", &dst_ours);
    assert!(printed.trim().starts_with("sha256:"), "{printed}");
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    check_optimized_layers(&ctrd, "ours", &dst_ours, &rec);

    // Go's tool on the same image and workload.
    ctrd.ctr_ns_ok("go", &["images", "pull", "--plain-http", &image]);
    let rec_go = work.path().join("go.json");
    let rec_go_s = rec_go.display().to_string();
    let dst_go = format!("{}/opt/small:go", reg.addr());
    let out = ctr_remote(
        GO_CTR_REMOTE,
        &ctrd,
        "go",
        &tmp,
        &[
            "image",
            "optimize",
            "--oci",
            "--entrypoint",
            SMALL_WORKLOAD_ENTRYPOINT,
            "--args",
            SMALL_WORKLOAD_ARGS,
            "--record-out",
            &rec_go_s,
            &image,
            &dst_go,
        ],
    );
    ok(out, "Go optimize");
    let go = read_record(&rec_go);
    assert_eq!(as_sets(&rec), as_sets(&go), "ours {rec:?}\nGo {go:?}");

    // Go's record read by our convert gives the same prioritisation as Go's own conversion.
    let dst_conv = format!("{}/opt/small:conv", reg.addr());
    ok(
        ctr_remote(
            ours(),
            &ctrd,
            "go",
            &tmp,
            &[
                "image",
                "convert",
                "--estargz",
                "--oci",
                "--estargz-record-in",
                &rec_go_s,
                &image,
                &dst_conv,
            ],
        ),
        "our convert with Go's record",
    );
    check_optimized_layers(&ctrd, "go", &dst_conv, &go);
    check_optimized_layers(&ctrd, "go", &dst_go, &go);

    // And our record read by Go's convert.
    let dst_go_conv = format!("{}/opt/small:goconv", reg.addr());
    ok(
        ctr_remote(
            GO_CTR_REMOTE,
            &ctrd,
            "ours",
            &tmp,
            &[
                "image",
                "convert",
                "--estargz",
                "--oci",
                "--estargz-record-in",
                &rec_ours_s,
                &image,
                &dst_go_conv,
            ],
        ),
        "Go's convert with our record",
    );
    // Go's convert puts every recorded path first in every layer that has it.
    let everywhere = |n: usize| -> BTreeMap<usize, Vec<String>> {
        let paths = record_paths(&rec_ours);
        (0..n).map(|i| (i, paths.clone())).collect()
    };
    let n = small_layers().len();
    check_optimized_layers(&ctrd, "ours", &dst_go_conv, &everywhere(n));

    // A record of another image: ours applies it as Go's convert does.
    let foreign = work.path().join("foreign.json");
    let text = std::fs::read_to_string(&rec_ours).expect("record");
    let m = text
        .split("\"manifestDigest\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("manifest digest in the record")
        .to_string();
    std::fs::write(
        &foreign,
        text.replace(
            &m,
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ),
    )
    .expect("write");
    let dst_foreign = format!("{}/opt/small:foreign", reg.addr());
    ok(
        ctr_remote(
            ours(),
            &ctrd,
            "ours",
            &tmp,
            &[
                "image",
                "convert",
                "--estargz",
                "--oci",
                "--estargz-record-in",
                foreign.to_str().expect("utf-8"),
                &image,
                &dst_foreign,
            ],
        ),
        "our convert with another image's record",
    );
    check_optimized_layers(&ctrd, "ours", &dst_foreign, &everywhere(n));

    // The optimized image runs.
    let out = ctrd.ctr_ns_ok(
        "ours",
        &[
            "run",
            "--rm",
            &dst_ours,
            "opt-small-run",
            "/bin/cat",
            "/data/link",
        ],
    );
    assert_eq!(out.trim(), "upper a");
}

/// Our `image optimize --plain-http --oci --reuse ARGS`, which must succeed and leave nothing in
/// `tmp`; returns its progress output.
fn optimize_reusing(ctrd: &Containerd, tmp: &Path, args: &[&str]) -> String {
    let mut all = vec!["image", "optimize", "--plain-http", "--oci", "--reuse"];
    all.extend_from_slice(args);
    let out = ctr_remote(ours(), ctrd, "default", tmp, &all);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert_nothing_left(tmp);
    stderr
}

/// `--reuse` keeps the eStargz layers the workload did not read exactly as they are (Go's
/// `isReusableESGZLayer`: TOC digest verified) and converts the rest; gzip layers are never kept.
#[test]
fn optimize_reuse_keeps_unread_estargz_layers() {
    let reg = Registry::start();
    let image = push_image(&reg, "opt/reuse", "v1", &small_layers());
    let ctrd = Containerd::start(ContainerdOpts::default());
    let work = tempfile::tempdir().expect("tempdir");
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");
    let first = format!("{}/opt/reuse:first", reg.addr());
    let second = format!("{}/opt/reuse:second", reg.addr());
    let run = |args: &[&str]| optimize_reusing(&ctrd, &tmp, args);
    let err = run(&[
        "--entrypoint",
        SMALL_WORKLOAD_ENTRYPOINT,
        "--args",
        SMALL_WORKLOAD_ARGS,
        &image,
        &first,
    ]);
    assert!(!err.contains("reused"), "gzip layers kept: {err}");
    let err = run(&[
        "--entrypoint",
        r#"["/bin/sleep"]"#,
        "--args",
        r#"["0"]"#,
        &first,
        &second,
    ]);
    assert_eq!(err.matches("reused without conversion").count(), 3, "{err}");
    let (m1, c1) = manifest_of(&ctrd, "default", &first);
    let (m2, c2) = manifest_of(&ctrd, "default", &second);
    for i in 1..4 {
        assert_eq!(m1["layers"][i], m2["layers"][i], "layer {i} kept");
        assert_eq!(c1["rootfs"]["diff_ids"][i], c2["rootfs"]["diff_ids"][i]);
    }
    assert_ne!(m1["layers"][0]["digest"], m2["layers"][0]["digest"]);
    let out = ctrd.ctr_ns_ok(
        "default",
        &[
            "run",
            "--rm",
            &second,
            "opt-reuse-run",
            "/bin/cat",
            "/data/link",
        ],
    );
    assert_eq!(out.trim(), "upper a");
}

/// `--zstdchunked --oci` optimizes to zstd:chunked layers, which run; optimizing that image
/// again unpacks its zstd layers, and `--reuse` keeps the unread ones (their zstd:chunked TOC
/// digest verified) while an eStargz target would not.
#[test]
fn optimize_zstdchunked_converts_reuses_and_runs() {
    let reg = Registry::start();
    let image = push_image(&reg, "opt/zstd", "v1", &small_layers());
    let ctrd = Containerd::start(ContainerdOpts::default());
    let work = tempfile::tempdir().expect("tempdir");
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");
    let first = format!("{}/opt/zstd:first", reg.addr());
    let second = format!("{}/opt/zstd:second", reg.addr());
    let run = |args: &[&str]| optimize_reusing(&ctrd, &tmp, args);
    let err = run(&[
        "--zstdchunked",
        "--entrypoint",
        SMALL_WORKLOAD_ENTRYPOINT,
        "--args",
        SMALL_WORKLOAD_ARGS,
        &image,
        &first,
    ]);
    assert!(err.contains("layers to zstd:chunked"), "{err}");
    let (m1, c1) = manifest_of(&ctrd, "default", &first);
    for l in m1["layers"].as_array().expect("layers") {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        assert!(l["annotations"]["io.containers.zstd-chunked.manifest-checksum"].is_string());
    }
    // zstd:chunked layers are no eStargz layers to keep in an eStargz image...
    let esgz = format!("{}/opt/zstd:esgz", reg.addr());
    let err = run(&[
        "--entrypoint",
        r#"["/bin/sleep"]"#,
        "--args",
        r#"["0"]"#,
        &first,
        &esgz,
    ]);
    assert!(
        !err.contains("reused"),
        "zstd layers kept as eStargz: {err}"
    );
    // ...but are kept in a zstd:chunked one.
    let err = run(&[
        "--zstdchunked",
        "--entrypoint",
        r#"["/bin/sleep"]"#,
        "--args",
        r#"["0"]"#,
        &first,
        &second,
    ]);
    assert_eq!(err.matches("reused without conversion").count(), 3, "{err}");
    let (m2, c2) = manifest_of(&ctrd, "default", &second);
    for i in 1..4 {
        assert_eq!(m1["layers"][i], m2["layers"][i], "layer {i} kept");
        assert_eq!(c1["rootfs"]["diff_ids"][i], c2["rootfs"]["diff_ids"][i]);
    }
    for image in [&first, &second] {
        let out = ctrd.ctr_ns_ok(
            "default",
            &[
                "run",
                "--rm",
                image,
                "opt-zstd-run",
                "/bin/cat",
                "/data/link",
            ],
        );
        assert_eq!(out.trim(), "upper a");
    }
}

/// Bad input gives a clear error (or a well-defined result) and leaves no temp dir, mount or
/// container behind.
#[test]
fn optimize_bad_input_is_clear_and_leaves_nothing() {
    let reg = Registry::start();
    let image = push_image(&reg, "opt/bad", "v1", &small_layers());
    let arm = push_custom(&reg, "opt/arm", "arm64", Some(&["/bin/sh"]));
    let nocmd = push_custom(&reg, "opt/nocmd", "amd64", None);
    let ctrd = Containerd::start(ContainerdOpts::default());
    let work = tempfile::tempdir().expect("tempdir");
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");
    let dst = format!("{}/opt/bad:out", reg.addr());
    let run = |args: &[&str]| -> (bool, String) {
        let mut all = vec!["image", "optimize", "--plain-http"];
        all.extend_from_slice(args);
        let out = ctr_remote(ours(), &ctrd, "default", &tmp, &all);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_nothing_left(&tmp);
        (out.status.success(), stderr)
    };

    // missing image
    let missing = format!("{}/opt/none:v1", reg.addr());
    let (okk, err) = run(&[&missing, &dst]);
    assert!(!okk);
    assert!(err.to_lowercase().contains("not found"), "{err}");

    // another platform
    let (okk, err) = run(&[&arm, &dst]);
    assert!(!okk);
    assert!(
        err.contains("linux/arm64") && err.contains("linux/amd64"),
        "{err}"
    );

    // nothing to run
    let (okk, err) = run(&[&nocmd, &dst]);
    assert!(!okk);
    assert!(err.contains("no entrypoint or cmd"), "{err}");

    // --args that is not a JSON array
    let (okk, err) = run(&["--args", "cat /data/b.txt", &image, &dst]);
    assert!(!okk);
    assert!(err.contains("invalid --args"), "{err}");

    // a record file that cannot be written: refused before anything runs
    let (okk, err) = run(&["--record-out", "/nonexistent-dir/rec.json", &image, &dst]);
    assert!(!okk);
    assert!(
        err.contains("--record-out /nonexistent-dir/rec.json"),
        "{err}"
    );
    assert!(!err.contains("running"), "{err}");

    // an entrypoint that is not in the image
    let (okk, err) = run(&["--entrypoint", r#"["/nope"]"#, &image, &dst]);
    assert!(!okk);
    assert!(err.contains("runc"), "{err}");

    // a workload that fails: converted with what it opened, the exit code said
    let (okk, err) = run(&[
        "--entrypoint",
        SMALL_WORKLOAD_ENTRYPOINT,
        "--args",
        r#"["cat /data/b.txt; exit 3"]"#,
        &image,
        &dst,
    ]);
    assert!(okk, "{err}");
    assert!(err.contains("exited with code 3"), "{err}");

    // a workload that opens nothing of the image but its own binary and libraries: the other
    // layers get the no-prefetch landmark
    let rec = work.path().join("rec.json");
    let rec_s = rec.display().to_string();
    let (okk, err) = run(&[
        "--entrypoint",
        r#"["/bin/sleep"]"#,
        "--args",
        r#"["0"]"#,
        "--record-out",
        &rec_s,
        &image,
        &dst,
    ]);
    assert!(okk, "{err}");
    let r = read_record(&rec);
    assert_eq!(r.keys().copied().collect::<Vec<_>>(), vec![0], "{r:?}");
    assert_eq!(r[&0][0], "bin/sleep", "{r:?}");
    check_optimized_layers(&ctrd, "default", &dst, &r);

    // --period 1: a workload that would run for a minute is killed after a second
    let started = Instant::now();
    let (okk, err) = run(&[
        "--period",
        "1",
        "--entrypoint",
        r#"["/bin/sleep"]"#,
        "--args",
        r#"["60"]"#,
        &image,
        &dst,
    ]);
    assert!(okk, "{err}");
    assert!(err.contains("period of 1s over"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));

    // --period 0 means Go's default of 10 s
    let started = Instant::now();
    let (okk, err) = run(&[
        "--period",
        "0",
        "--entrypoint",
        r#"["/bin/sleep"]"#,
        "--args",
        r#"["60"]"#,
        &image,
        &dst,
    ]);
    assert!(okk, "{err}");
    assert!(err.contains("period of 10s over"), "{err}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(40),
        "{took:?}"
    );
}

/// A layer whose symlink points out of the image, with a whiteout and a file below it: the
/// optimize fails, and nothing outside its temp dir is touched.
#[test]
fn optimize_hostile_layer_stays_inside() {
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("victim"), "keep me").expect("write");
    let layer_of = |second: &str| {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        b.append_link(&mut h, "esc", outside.path())
            .expect("symlink");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, second, std::io::empty())
            .expect("entry");
        let tar = b.into_inner().expect("tar");
        Layer::from_blob(
            common::gzip(&tar),
            common::MEDIA_TYPE_LAYER_GZIP,
            &sha256_digest(&tar),
        )
    };
    let reg = Registry::start();
    let tools = Layer::from_entries(&tools_layer(&["/bin/sh"]));
    let ctrd = Containerd::start(ContainerdOpts::default());
    let work = tempfile::tempdir().expect("tempdir");
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");
    for (tag, second) in [("wh", "esc/.wh.victim"), ("file", "esc/planted")] {
        let image = push_image(&reg, "opt/hostile", tag, &[tools.clone(), layer_of(second)]);
        let dst = format!("{}/opt/hostile:{tag}-out", reg.addr());
        let out = ctr_remote(
            ours(),
            &ctrd,
            "default",
            &tmp,
            &["image", "optimize", "--plain-http", &image, &dst],
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{tag}: {err}");
        assert!(err.contains("unpacking layer 1"), "{tag}: {err}");
        assert_eq!(
            std::fs::read_to_string(outside.path().join("victim")).expect("victim kept"),
            "keep me"
        );
        assert!(!outside.path().join("planted").exists(), "{tag}");
        assert_nothing_left(&tmp);
    }
}

/// SIGINT and SIGTERM while the workload runs: the command fails saying so, the workload is
/// killed, and no container, mount or temp dir is left.
#[test]
fn optimize_interrupted_cleans_up() {
    let reg = Registry::start();
    let image = push_image(&reg, "opt/int", "v1", &small_layers());
    let ctrd = Containerd::start(ContainerdOpts::default());
    ctrd.ctr_ns_ok("default", &["images", "pull", "--plain-http", &image]);
    let work = tempfile::tempdir().expect("tempdir");
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");
    let dst = format!("{}/opt/int:out", reg.addr());
    for (sig, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        let child = ctr_remote_cmd(
            ours(),
            &ctrd,
            "default",
            &tmp,
            &[
                "image",
                "optimize",
                "--period",
                "120",
                "--entrypoint",
                r#"["/bin/sleep"]"#,
                "--args",
                r#"["117"]"#,
                &image,
                &dst,
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
        // Wait until the workload runs: a `sleep 117` process exists.
        let running = wait_until(Duration::from_secs(60), || !sleepers(117).is_empty());
        assert!(running, "workload never started");
        unsafe { libc::kill(child.id() as i32, sig) };
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("interrupted by {name}")),
            "{stderr}"
        );
        assert!(
            wait_until(Duration::from_secs(10), || sleepers(117).is_empty()),
            "workload still running"
        );
        assert_nothing_left(&tmp);
    }
}

/// `--wait-on-signal`: the workload runs until SIGINT, which ends it, and the optimization goes
/// on with what it opened (Go's behaviour); a second run aborted by SIGTERM still cleans up.
#[test]
fn optimize_wait_on_signal_converts_after_sigint() {
    let reg = Registry::start();
    let image = push_image(&reg, "opt/wait", "v1", &small_layers());
    let ctrd = Containerd::start(ContainerdOpts::default());
    ctrd.ctr_ns_ok("default", &["images", "pull", "--plain-http", &image]);
    let work = tempfile::tempdir().expect("tempdir");
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");
    let rec = work.path().join("rec.json");
    let dst = format!("{}/opt/wait:out", reg.addr());
    let child = ctr_remote_cmd(
        ours(),
        &ctrd,
        "default",
        &tmp,
        &[
            "image",
            "optimize",
            "--wait-on-signal",
            "--period",
            "1",
            "--entrypoint",
            r#"["/bin/sleep"]"#,
            "--args",
            r#"["118"]"#,
            "--record-out",
            rec.to_str().expect("utf-8"),
            &image,
            &dst,
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn");
    assert!(
        wait_until(Duration::from_secs(60), || !sleepers(118).is_empty()),
        "workload never started"
    );
    // --period is ignored: still running well after it.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!sleepers(118).is_empty(), "workload ended before SIGINT");
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("SIGINT: workload killed"), "{stderr}");
    assert!(sleepers(118).is_empty());
    assert_nothing_left(&tmp);
    let r = read_record(&rec);
    assert_eq!(
        r.get(&0).and_then(|v| v.first()).map(String::as_str),
        Some("bin/sleep")
    );
    check_optimized_layers(&ctrd, "default", &dst, &r);
}

/// Pids of `sleep SECS` processes (a workload to interrupt; each test its own SECS).
fn sleepers(secs: u32) -> Vec<i32> {
    let want = format!("/bin/sleep\0{secs}\0");
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if cmd == want.as_bytes() {
                pids.push(pid);
            }
        }
    }
    pids
}

// ---------------------------------------------------------------------------------------------
// The python image, against Go's tool and Go's daemon
// ---------------------------------------------------------------------------------------------

/// Pushes the cached 3-layer python image (gzip layers; `python3 /app/main.py`) as `repo:tag`.
fn push_python_image(reg: &Registry, repo: &str, tag: &str) -> String {
    require_tool("debootstrap");
    require_tool("skopeo");
    require_tool("jq");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rootfs.sh");
    let dir = tempfile::tempdir().expect("tempdir");
    let oci = dir.path().join("oci");
    let out = Command::new("bash")
        .arg(&script)
        .arg("oci")
        .arg(&oci)
        .output()
        .expect("rootfs.sh");
    ok(out, "rootfs.sh oci");
    let reference = format!("{}/{repo}:{tag}", reg.addr());
    let out = Command::new("bash")
        .arg(&script)
        .arg("push")
        .arg(&oci)
        .arg(&reference)
        .output()
        .expect("rootfs.sh");
    ok(out, "rootfs.sh push");
    reference
}

/// How far a prefetch of layer `digest` must reach to hold every prioritized file: past the
/// start of the last data chunk before `.prefetch.landmark`, and to within one compressed tar
/// header (< 1 KiB) of the landmark's offset. (Go's daemon fetches up to the landmark itself,
/// rounded up to its 50 kB chunks; ours stops where the last prioritized file's data ends, which
/// is before the landmark's own header member.)
fn prefetch_need(ctrd: &Containerd, ns: &str, digest: &str) -> Option<u64> {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = ok(
        ctr_remote(
            ours(),
            ctrd,
            ns,
            tmp.path(),
            &["image", "get-toc-digest", "--dump-toc", digest],
        ),
        "dump toc",
    );
    let toc: serde_json::Value = serde_json::from_str(&out).expect("toc json");
    let entries = toc["entries"].as_array()?;
    let at = entries
        .iter()
        .position(|e| e["name"] == ".prefetch.landmark")?;
    let landmark = entries[at]["offset"].as_u64()?;
    let last_data = entries[..at]
        .iter()
        .filter(|e| (e["type"] == "reg" || e["type"] == "chunk") && e["size"].as_u64() > Some(0))
        .filter_map(|e| e["offset"].as_u64())
        .max()
        .unwrap_or(0);
    Some((last_data + 1).max(landmark.saturating_sub(1024)))
}

/// Bytes of each blob GET the registry answered (from its log), per digest, from log line
/// `from` on.
fn blob_gets(reg: &Registry, from: usize) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for l in reg.log().lines().skip(from) {
        if !(l.contains("msg=\"response completed\"") && l.contains("http.request.method=GET ")) {
            continue;
        }
        let field = |k: &str| {
            l.split(k)
                .nth(1)
                .map(|r| r.trim_start_matches('"'))
                .and_then(|r| r.split(['"', ' ']).next())
                .map(str::to_string)
        };
        let (Some(uri), Some(written)) =
            (field("http.request.uri="), field("http.response.written="))
        else {
            continue;
        };
        if let Some(d) = uri.split("/blobs/").nth(1) {
            out.entry(d.to_string())
                .or_default()
                .push(written.parse().unwrap_or(0));
        }
    }
    out
}

/// `rpull`s `image` (with `bin`) through the `stargz` proxy of `ctrd` and waits until every
/// layer was prefetched: one blob GET reaching what [`prefetch_need`] says.
/// Returns the layers' `(need, largest GET)`.
fn assert_prefetched(
    bin: &str,
    ctrd: &Containerd,
    reg: &Registry,
    image: &str,
    landmarks: &BTreeMap<String, u64>,
) -> Vec<(u64, u64)> {
    let mark = reg.log().lines().count();
    let tmp = tempfile::tempdir().expect("tmp");
    ok(
        ctr_remote(
            bin,
            ctrd,
            "default",
            tmp.path(),
            &["image", "rpull", "--plain-http", image],
        ),
        "rpull",
    );
    let mut got = Vec::new();
    let done = wait_until(Duration::from_secs(60), || {
        let gets = blob_gets(reg, mark);
        got = landmarks
            .iter()
            .map(|(d, off)| {
                (
                    *off,
                    gets.get(d)
                        .and_then(|v| v.iter().max().copied())
                        .unwrap_or(0),
                )
            })
            .collect();
        got.iter().all(|(off, max)| max >= off)
    });
    assert!(
        done,
        "not prefetched: (need, largest GET) per layer {got:?}"
    );
    got
}

/// The python image optimized by ours and by Go's tool for the same workload (the image's own
/// `python3 /app/main.py`): the records list the same files per layer, each image's layers put
/// them before `.prefetch.landmark` with annotations Go's `get-toc-digest` agrees with, and each
/// image is prefetched at mount by the other implementation's daemon.
#[test]
fn optimize_python_image_matches_go_and_prefetches_across_daemons() {
    assert!(
        Path::new(GO_CTR_REMOTE).is_file(),
        "Go's ctr-remote missing"
    );
    let reg = Registry::start();
    let image = push_python_image(&reg, "opt/python", "gzip");
    let work = tempfile::tempdir().expect("tempdir");
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");
    let dst_ours = format!("{}/opt/python:ours", reg.addr());
    let dst_go = format!("{}/opt/python:go", reg.addr());
    let rec_ours = work.path().join("ours.json");
    let rec_go = work.path().join("go.json");
    let mut landmarks: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    {
        let ctrd = Containerd::start(ContainerdOpts::default());
        let t = Instant::now();
        let out = ctr_remote(
            ours(),
            &ctrd,
            "ours",
            &tmp,
            &[
                "image",
                "optimize",
                "--plain-http",
                "--oci",
                "--period",
                "60",
                "--record-out",
                rec_ours.to_str().expect("utf-8"),
                &image,
                &dst_ours,
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        ok(out, "our optimize");
        eprintln!("our optimize took {:?}:\n{stderr}", t.elapsed());
        assert!(
            stderr.contains("{\"ok\": true, \"modules\": 8}"),
            "{stderr}"
        );
        assert_nothing_left(&tmp);

        ctrd.ctr_ns_ok("go", &["images", "pull", "--plain-http", &image]);
        let t = Instant::now();
        ok(
            ctr_remote(
                GO_CTR_REMOTE,
                &ctrd,
                "go",
                &tmp,
                &[
                    "image",
                    "optimize",
                    "--oci",
                    "--period",
                    "60",
                    "--record-out",
                    rec_go.to_str().expect("utf-8"),
                    &image,
                    &dst_go,
                ],
            ),
            "Go optimize",
        );
        eprintln!("Go's optimize took {:?}", t.elapsed());

        let ours_rec = read_record(&rec_ours);
        let go_rec = read_record(&rec_go);
        for (i, files) in &ours_rec {
            eprintln!(
                "layer {i}: ours {} files, Go {}",
                files.len(),
                go_rec.get(i).map_or(0, Vec::len)
            );
        }
        for (i, files) in &ours_rec {
            eprintln!(
                "layer {i}: same first-access order as Go: {}",
                go_rec.get(i) == Some(files)
            );
        }
        assert_eq!(as_sets(&ours_rec), as_sets(&go_rec));
        let in_layer = |i: usize, f: &dyn Fn(&str) -> bool| {
            ours_rec.get(&i).is_some_and(|v| v.iter().any(|p| f(p)))
        };
        assert!(in_layer(0, &|p| p == "usr/bin/python3.11"), "{ours_rec:?}");
        assert!(
            in_layer(1, &|p| p.starts_with("usr/lib/python3.11/json/")),
            "{ours_rec:?}"
        );
        assert!(in_layer(2, &|p| p == "app/main.py"), "{ours_rec:?}");

        check_optimized_layers(&ctrd, "ours", &dst_ours, &ours_rec);
        check_optimized_layers(&ctrd, "go", &dst_go, &go_rec);
        for (ns, name) in [("ours", &dst_ours), ("go", &dst_go)] {
            let (manifest, _) = manifest_of(&ctrd, ns, name);
            let mut m = BTreeMap::new();
            for l in manifest["layers"].as_array().expect("layers") {
                let d = l["digest"].as_str().expect("digest").to_string();
                let off = prefetch_need(&ctrd, ns, &d).expect("every layer was accessed");
                m.insert(d, off);
            }
            landmarks.insert(ns, m);
            ctrd.ctr_ns_ok(ns, &["images", "push", "--plain-http", name]);
        }
    }

    // Ours optimized, Go's daemon pulls lazily and prefetches the recorded files.
    let plain = format!(
        "no_background_fetch = true\n[[resolver.host.\"{a}\".mirrors]]\nhost = \"{a}\"\ninsecure = true\n",
        a = reg.addr()
    );
    {
        let go = GoDaemon::start(&plain);
        let ctrd = Containerd::start(ContainerdOpts {
            stargz_socket: Some(go.socket()),
            stargz_root: Some(go.root()),
            ..Default::default()
        });
        ctrd.wait_stargz_ready(Duration::from_secs(30));
        let got = assert_prefetched(GO_CTR_REMOTE, &ctrd, &reg, &dst_ours, &landmarks["ours"]);
        eprintln!("Go's daemon on our image: (need, largest GET) {got:?}");
        let out = ctrd.ctr_ok(&[
            "run",
            "--rm",
            "--snapshotter",
            "stargz",
            &dst_ours,
            "opt-py-go",
            "python3",
            "/app/main.py",
        ]);
        assert!(out.contains("\"ok\": true"), "{out}");
    }
    // Go's optimized, our daemon.
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, &plain).expect("config");
        let root = dir.path().join("root");
        let sock = dir.path().join("stargz.sock");
        let _daemon =
            common::Daemon::start(&root, &sock, &["--config", cfg.to_str().expect("utf-8")]);
        let ctrd = Containerd::start(ContainerdOpts {
            stargz_socket: Some(sock.clone()),
            stargz_root: Some(root.clone()),
            ..Default::default()
        });
        ctrd.wait_stargz_ready(Duration::from_secs(30));
        let got = assert_prefetched(ours(), &ctrd, &reg, &dst_go, &landmarks["go"]);
        eprintln!("our daemon on Go's image: (need, largest GET) {got:?}");
        let out = ctrd.ctr_ok(&[
            "run",
            "--rm",
            "--snapshotter",
            "stargz",
            &dst_go,
            "opt-py-ours",
            "python3",
            "/app/main.py",
        ]);
        assert!(out.contains("\"ok\": true"), "{out}");

        // Optimizing the lazily pulled (eStargz) image again: its layer blobs are not in the
        // content store and are fetched; the same files are recorded as on the gzip image.
        let rec_again = work.path().join("again.json");
        let dst_again = format!("{}/opt/python:again", reg.addr());
        let out = ctr_remote(
            ours(),
            &ctrd,
            "default",
            &tmp,
            &[
                "image",
                "optimize",
                "--plain-http",
                "--oci",
                "--record-out",
                rec_again.to_str().expect("utf-8"),
                &dst_go,
                &dst_again,
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        ok(out, "optimize of a lazily pulled image");
        assert_eq!(
            stderr.matches("(not in the content store)").count(),
            3,
            "{stderr}"
        );
        assert_nothing_left(&tmp);
        let again = read_record(&rec_again);
        assert_eq!(as_sets(&again), as_sets(&read_record(&rec_ours)));
        check_optimized_layers(&ctrd, "default", &dst_again, &again);
    }
}

/// Go's container flags shape the workload's container: `--env`/`--env-file`, `--user`,
/// `--add-hosts`/`--dns-nameservers`, `--mount`; the default network namespace has only `lo`
/// and `--net-host` has the host's; files from a bind mount or the generated `/etc` files are not
/// the image's and are not recorded; `--no-optimize` converts with no prefetch.
#[test]
fn optimize_container_flags_as_go() {
    let reg = Registry::start();
    let image = push_image(&reg, "opt/flags", "v1", &small_layers());
    let ctrd = Containerd::start(ContainerdOpts::default());
    ctrd.ctr_ns_ok("default", &["images", "pull", "--plain-http", &image]);
    let work = tempfile::tempdir().expect("tempdir");
    let tmp = work.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");
    let host_dir = work.path().join("shared");
    std::fs::create_dir(&host_dir).expect("mkdir");
    std::fs::write(host_dir.join("hello"), "from the host\n").expect("write");
    let env_file = work.path().join("env");
    std::fs::write(&env_file, "B=2\n").expect("write");
    let rec = work.path().join("rec.json");
    let dst = format!("{}/opt/flags:out", reg.addr());
    let script = "echo A=$A B=$B; \
        while read k v rest; do case $k in Uid:|Gid:) echo $k$v;; esac; done < /proc/self/status; \
        echo nets: /sys/class/net/*; cat /etc/hosts /etc/resolv.conf /mnt/x/hello /data/b.txt";
    let args = serde_json::to_string(&["-c", script]).expect("json");
    let mount = format!(
        "type=bind,src={},dst=/mnt/x,options=rbind:ro",
        host_dir.display()
    );
    let run = |extra: &[&str]| -> String {
        let mut all = vec![
            "image",
            "optimize",
            "--entrypoint",
            r#"["/bin/sh"]"#,
            "--args",
            &args,
            "--record-out",
            rec.to_str().expect("utf-8"),
        ];
        all.extend_from_slice(extra);
        all.extend_from_slice(&[&image, &dst]);
        let out = ctr_remote(ours(), &ctrd, "default", &tmp, &all);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        assert_nothing_left(&tmp);
        stderr
    };

    let env_file_s = env_file.display().to_string();
    let err = run(&[
        "--env",
        "A=1",
        "--env-file",
        &env_file_s,
        "--user",
        "1000:1001",
        "--add-hosts",
        "registry.test:10.1.2.3",
        "--dns-nameservers",
        "1.1.1.1,9.9.9.9",
        "--mount",
        &mount,
    ]);
    for want in [
        "A=1 B=2",
        "Uid:1000",
        "Gid:1001",
        "nets: /sys/class/net/lo\n",
        "10.1.2.3\tregistry.test",
        "nameserver 1.1.1.1\nnameserver 9.9.9.9",
        "from the host",
        "lower b",
    ] {
        assert!(err.contains(want), "{want:?} not in:\n{err}");
    }
    let r = read_record(&rec);
    let all: Vec<&String> = r.values().flatten().collect();
    assert!(all.iter().any(|p| *p == "data/b.txt"), "{r:?}");
    assert!(
        !all.iter()
            .any(|p| p.starts_with("etc/") || p.starts_with("mnt/")),
        "{r:?}"
    );

    // --net-host: the host's interfaces (more than `lo`)
    let err = run(&["--net-host"]);
    let nets = err
        .lines()
        .find(|l| l.starts_with("nets: "))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(nets.split_whitespace().count() > 2, "{nets}");

    // -i: the workload reads our stdin; --platform of this host is accepted
    let mut child = ctr_remote_cmd(
        ours(),
        &ctrd,
        "default",
        &tmp,
        &[
            "image",
            "optimize",
            "-i",
            "--platform",
            "linux/amd64",
            "--entrypoint",
            r#"["/bin/cat"]"#,
            "--args",
            r#"["-"]"#,
            &image,
            &dst,
        ],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"hello from stdin\n").expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(err.contains("hello from stdin"), "{err}");
    assert_nothing_left(&tmp);

    // another platform is refused before anything runs
    let out = ctr_remote(
        ours(),
        &ctrd,
        "default",
        &tmp,
        &[
            "image",
            "optimize",
            "--platform",
            "linux/arm64",
            &image,
            &dst,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains("only this host's platform (linux/amd64)"),
        "{err}"
    );

    // --no-optimize: nothing runs, every layer gets the no-prefetch landmark
    let out = ctr_remote(
        ours(),
        &ctrd,
        "default",
        &tmp,
        &["image", "optimize", "--no-optimize", "--oci", &image, &dst],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("running"), "{err}");
    check_optimized_layers(&ctrd, "default", &dst, &BTreeMap::new());
    assert_nothing_left(&tmp);
}
