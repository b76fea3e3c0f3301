//! `ctr-remote` against a real containerd 1.6 and a local registry (needs root, like CI).
//!
//! Go's `ctr-remote` 0.12 (Debian `stargz-snapshotter`) is the reference: our `rpull` must
//! leave the same snapshot chain and labels, our `get-toc-digest` must print the same digest.

mod common;

use std::collections::BTreeMap;
use std::process::Output;

use common::{
    assert_success as ok, push_image, require_tool, tools_layer, Containerd, ContainerdOpts, Layer,
    LayerEntry, Registry, StargzBed,
};

const GO_CTR_REMOTE: &str = "/usr/bin/ctr-remote";

fn ours() -> &'static str {
    env!("CARGO_BIN_EXE_ctr-remote")
}

/// Runs a `ctr-remote` binary against `ctrd` in namespace `ns`.
fn ctr_remote(bin: &str, ctrd: &Containerd, ns: &str, args: &[&str]) -> Output {
    ctrd.ctr_remote_cmd(bin, ns, args)
        .output()
        .expect("run ctr-remote")
}

/// A two-layer gzip image: host `sh`/`cat` with their libraries, then a data file.
fn two_layer_image(reg: &Registry, tag: &str) -> String {
    let tools = Layer::from_entries(&tools_layer(&["/bin/sh", "/bin/cat"]));
    let data = Layer::from_entries(&[
        LayerEntry::dir("data"),
        LayerEntry::file("data/hello.txt", "hello from ctr-remote\n"),
        LayerEntry::file("data/big.bin", vec![7u8; 300_000]),
    ]);
    push_image(reg, "test/ctr-remote", tag, &[tools, data])
}

/// `snapshot name -> (parent, labels)` from `ctr snapshots info` of each name, following
/// parents from `top` down.
fn snapshot_chain(
    ctrd: &Containerd,
    ns: &str,
    snapshotter: &str,
    top: &str,
) -> Vec<(String, String, BTreeMap<String, String>)> {
    let mut out = Vec::new();
    let mut name = top.to_string();
    while !name.is_empty() {
        let info = ctrd.ctr_ns_ok(
            ns,
            &["snapshots", "--snapshotter", snapshotter, "info", &name],
        );
        let v: serde_json::Value = serde_json::from_str(&info).expect("snapshot info json");
        assert_eq!(v["Kind"], "Committed", "{name} should be committed: {info}");
        let parent = v["Parent"].as_str().unwrap_or_default().to_string();
        let labels: BTreeMap<String, String> = v["Labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        out.push((name.clone(), parent.clone(), labels));
        name = parent;
    }
    out
}

/// The image's config digest and its chain IDs, read back through `ctr`.
fn config_of(
    ctrd: &Containerd,
    ns: &str,
    image: &str,
) -> (String, Vec<String>, BTreeMap<String, String>) {
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
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config digest")
        .to_string();
    let config: serde_json::Value =
        serde_json::from_str(&ctrd.ctr_ns_ok(ns, &["content", "get", &config_digest]))
            .expect("config json");
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .expect("diff_ids")
        .iter()
        .map(|d| d.as_str().unwrap_or_default().to_string())
        .collect();
    let chain = stargz::chain_ids(&diff_ids);
    let labels_line = ctrd.ctr_ns_ok(ns, &["content", "ls"]);
    let cfg_labels: BTreeMap<String, String> = labels_line
        .lines()
        .find(|l| l.starts_with(&config_digest))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    (config_digest, chain, cfg_labels)
}

/// rpull through containerd's own overlayfs snapshotter exercises the whole client side
/// (content writes, labels, Prepare/Apply/Commit, image record) and must match Go's
/// `ctr-remote image rpull` snapshot for snapshot, label for label.
#[test]
fn rpull_matches_go_ctr_remote_chain_and_labels() {
    require_tool("skopeo");
    let reg = Registry::start();
    let image = two_layer_image(&reg, "v1");
    let ctrd = Containerd::start(ContainerdOpts::default());

    let stdout = ok(
        ctr_remote(
            ours(),
            &ctrd,
            "ours",
            &[
                "image",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "overlayfs",
                &image,
            ],
        ),
        "our rpull",
    );
    assert!(
        stdout.contains("fetching sha256:"),
        "Go-style progress expected: {stdout}"
    );
    ok(
        ctr_remote(
            GO_CTR_REMOTE,
            &ctrd,
            "go",
            &[
                "image",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "overlayfs",
                &image,
            ],
        ),
        "Go rpull",
    );

    let (cfg_ours, chain_ours, cfg_labels_ours) = config_of(&ctrd, "ours", &image);
    let (cfg_go, chain_go, cfg_labels_go) = config_of(&ctrd, "go", &image);
    assert_eq!(cfg_ours, cfg_go);
    assert_eq!(chain_ours.len(), 2);
    let top = chain_ours.last().cloned().unwrap_or_default();
    assert_eq!(
        cfg_labels_ours.get("containerd.io/gc.ref.snapshot.overlayfs"),
        Some(&top)
    );
    assert_eq!(
        cfg_labels_ours, cfg_labels_go,
        "config content labels differ"
    );

    let ours_chain = snapshot_chain(&ctrd, "ours", "overlayfs", &top);
    let go = snapshot_chain(&ctrd, "go", "overlayfs", &chain_go[1]);
    assert_eq!(ours_chain.len(), 2);
    for ((n1, p1, l1), (n2, p2, l2)) in ours_chain.iter().zip(&go) {
        assert_eq!((n1, p1), (n2, p2));
        assert_eq!(l1, l2, "labels of snapshot {n1} differ");
    }
    let (_, _, bottom_labels) = &ours_chain[1];
    let layers = bottom_labels
        .get("containerd.io/snapshot/remote/stargz.layers")
        .expect("layers label");
    assert_eq!(
        layers.split(',').count(),
        2,
        "bottom layer lists itself and the next: {layers}"
    );
    assert_eq!(
        bottom_labels.get("containerd.io/snapshot/remote/stargz.reference"),
        Some(&image)
    );
    assert_eq!(
        bottom_labels.get("containerd.io/snapshot.ref"),
        Some(&chain_ours[0])
    );

    // The pulled image runs.
    let out = ctrd.ctr_ns_ok(
        "ours",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "overlayfs",
            &image,
            "ctr-remote-run-1",
            "/bin/cat",
            "/data/hello.txt",
        ],
    );
    assert_eq!(out.trim(), "hello from ctr-remote");

    // A second rpull finds every layer unpacked already.
    let again = ctr_remote(
        ours(),
        &ctrd,
        "ours",
        &[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "overlayfs",
            &image,
        ],
    );
    let stderr = String::from_utf8_lossy(&again.stderr).into_owned();
    ok(again, "second rpull");
    assert_eq!(stderr.matches("already unpacked").count(), 2, "{stderr}");
}

/// Go converts an image to eStargz; our `get-toc-digest` must print what Go's prints and
/// what the layer's `toc.digest` annotation says.
#[test]
fn get_toc_digest_agrees_with_go() {
    let reg = Registry::start();
    let image = two_layer_image(&reg, "plain");
    let ctrd = Containerd::start(ContainerdOpts::default());
    ctrd.ctr_ok(&["images", "pull", "--plain-http", &image]);
    let esgz = format!("{image}-esgz");
    ok(
        ctr_remote(
            GO_CTR_REMOTE,
            &ctrd,
            "default",
            &["image", "convert", "--estargz", "--oci", &image, &esgz],
        ),
        "Go convert",
    );

    let ls = ctrd.ctr_ok(&["images", "ls"]);
    let line = ls
        .lines()
        .find(|l| l.starts_with(&esgz))
        .expect("converted image listed");
    let manifest_digest = line.split_whitespace().nth(2).expect("digest");
    let manifest: serde_json::Value =
        serde_json::from_str(&ctrd.ctr_ok(&["content", "get", manifest_digest])).expect("json");
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 2);
    for l in layers {
        let digest = l["digest"].as_str().expect("digest");
        let annotated = l["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
            .as_str()
            .expect("toc annotation");
        let go = ok(
            ctr_remote(
                GO_CTR_REMOTE,
                &ctrd,
                "default",
                &["image", "get-toc-digest", digest],
            ),
            "Go get-toc-digest",
        );
        let our = ok(
            ctr_remote(
                ours(),
                &ctrd,
                "default",
                &["image", "get-toc-digest", digest],
            ),
            "our get-toc-digest",
        );
        assert_eq!(our, go);
        assert_eq!(our.trim(), annotated);
        let dump = ok(
            ctr_remote(
                ours(),
                &ctrd,
                "default",
                &["image", "get-toc-digest", "--dump-toc", digest],
            ),
            "dump",
        );
        let toc: serde_json::Value = serde_json::from_str(&dump).expect("dumped TOC is JSON");
        assert_eq!(toc["version"], 1);
    }
    // A plain gzip layer has no footer: a clear error, not a digest.
    let plain: serde_json::Value = {
        let line = ls
            .lines()
            .find(|l| l.starts_with(&format!("{image} ")))
            .expect("plain listed");
        let d = line.split_whitespace().nth(2).expect("digest");
        serde_json::from_str(&ctrd.ctr_ok(&["content", "get", d])).expect("json")
    };
    let plain_layer = plain["layers"][1]["digest"].as_str().expect("digest");
    let out = ctr_remote(
        ours(),
        &ctrd,
        "default",
        &["image", "get-toc-digest", plain_layer],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("footer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Our `convert --estargz --oci` gives OCI eStargz layers whose `toc.digest` annotation is
/// what Go's `get-toc-digest` reads from the blob, whose `uncompressed` annotation is the
/// config's diff ID; the result runs, and survives a push + our rpull.
#[test]
fn convert_estargz_matches_go_toc_digest_and_runs() {
    let reg = Registry::start();
    let image = two_layer_image(&reg, "src");
    let ctrd = Containerd::start(ContainerdOpts::default());
    ctrd.ctr_ok(&["images", "pull", "--plain-http", &image]);
    let esgz = format!("{}/test/ctr-remote:esgz", reg.addr());
    let printed = ok(
        ctr_remote(
            ours(),
            &ctrd,
            "default",
            &["image", "convert", "--estargz", "--oci", &image, &esgz],
        ),
        "our convert",
    );

    let ls = ctrd.ctr_ok(&["images", "ls"]);
    let line = ls
        .lines()
        .find(|l| l.starts_with(&esgz))
        .expect("converted image listed");
    let manifest_digest = line.split_whitespace().nth(2).expect("digest");
    assert_eq!(printed.trim(), manifest_digest);
    let manifest: serde_json::Value =
        serde_json::from_str(&ctrd.ctr_ok(&["content", "get", manifest_digest])).expect("json");
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config: serde_json::Value = serde_json::from_str(&ctrd.ctr_ok(&[
        "content",
        "get",
        manifest["config"]["digest"].as_str().expect("cfg"),
    ]))
    .expect("json");
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 2);
    for (i, l) in layers.iter().enumerate() {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let digest = l["digest"].as_str().expect("digest");
        let annotated = l["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
            .as_str()
            .expect("toc annotation");
        let go = ok(
            ctr_remote(
                GO_CTR_REMOTE,
                &ctrd,
                "default",
                &["image", "get-toc-digest", digest],
            ),
            "Go get-toc-digest",
        );
        assert_eq!(go.trim(), annotated, "layer {i}");
        assert_eq!(
            l["annotations"]["containerd.io/uncompressed"],
            config["rootfs"]["diff_ids"][i]
        );
    }

    let out = ctrd.ctr_ok(&[
        "run",
        "--rm",
        &esgz,
        "ctr-remote-conv-1",
        "/bin/cat",
        "/data/hello.txt",
    ]);
    assert_eq!(out.trim(), "hello from ctr-remote");

    ctrd.ctr_ok(&["images", "push", "--plain-http", &esgz]);
    ok(
        ctr_remote(
            ours(),
            &ctrd,
            "pulled",
            &[
                "image",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "overlayfs",
                &esgz,
            ],
        ),
        "rpull of converted image",
    );
    let out = ctrd.ctr_ns_ok(
        "pulled",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "overlayfs",
            &esgz,
            "ctr-remote-conv-2",
            "/bin/cat",
            "/data/hello.txt",
        ],
    );
    assert_eq!(out.trim(), "hello from ctr-remote");
}

/// A plain gzip image cannot be mounted lazily: rpull through `stargz` (the default
/// snapshotter) falls back to downloading every layer, says so, and the image runs; Go's
/// rpull of the same image gives the same snapshot chain.
#[test]
fn rpull_plain_image_with_stargz_falls_back_and_runs() {
    let reg = Registry::start();
    let image = two_layer_image(&reg, "plain");
    let bed = StargzBed::start();
    let ctrd = &bed.ctrd;

    let out = ctr_remote(
        ours(),
        ctrd,
        "ours",
        &["image", "rpull", "--plain-http", &image],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out, "our rpull");
    assert_eq!(stderr.matches("not lazy: fallback").count(), 2, "{stderr}");
    assert!(stderr.contains("done: 0/2 layers remote"), "{stderr}");
    // (Whether the daemon logs `remote-snapshot-prepared=false` is the daemon's tests' business.)

    let run = ctrd.ctr_ns_ok(
        "ours",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "stargz",
            &image,
            "ctr-remote-sgz-1",
            "/bin/cat",
            "/data/hello.txt",
        ],
    );
    assert_eq!(run.trim(), "hello from ctr-remote");

    ok(
        ctr_remote(
            GO_CTR_REMOTE,
            ctrd,
            "go",
            &["image", "rpull", "--plain-http", &image],
        ),
        "Go rpull",
    );
    let (_, chain_ours, labels_ours) = config_of(ctrd, "ours", &image);
    let (_, chain_go, labels_go) = config_of(ctrd, "go", &image);
    assert_eq!(chain_ours, chain_go);
    assert_eq!(labels_ours, labels_go);
    let top = chain_ours.last().cloned().unwrap_or_default();
    assert_eq!(
        labels_ours.get("containerd.io/gc.ref.snapshot.stargz"),
        Some(&top)
    );
    let a = snapshot_chain(ctrd, "ours", "stargz", &top);
    let b = snapshot_chain(ctrd, "go", "stargz", &top);
    assert_eq!(a, b);
}

/// An eStargz image (converted by us) rpulled through our daemon runs, and the per-layer
/// report adds up: every layer is either remote or downloaded in full.
#[test]
fn rpull_estargz_image_with_stargz_runs() {
    let reg = Registry::start();
    let image = two_layer_image(&reg, "src");
    let bed = StargzBed::start();
    let ctrd = &bed.ctrd;
    ctrd.ctr_ok(&["images", "pull", "--plain-http", &image]);
    let esgz = format!("{}/test/ctr-remote:esgz", reg.addr());
    ok(
        ctr_remote(
            ours(),
            ctrd,
            "default",
            &["image", "convert", "--estargz", "--oci", &image, &esgz],
        ),
        "convert",
    );
    ctrd.ctr_ok(&["images", "push", "--plain-http", &esgz]);

    let out = ctr_remote(
        ours(),
        ctrd,
        "pulled",
        &["image", "rpull", "--plain-http", &esgz],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out, "rpull");
    let remote = stderr.matches(": remote (lazy)").count();
    let fallback = stderr.matches("not lazy: fallback").count();
    assert_eq!(remote + fallback, 2, "{stderr}");
    assert!(
        stderr.contains(&format!("done: {remote}/2 layers remote")),
        "{stderr}"
    );

    let run = ctrd.ctr_ns_ok(
        "pulled",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "stargz",
            &esgz,
            "ctr-remote-sgz-2",
            "/bin/cat",
            "/data/hello.txt",
        ],
    );
    assert_eq!(run.trim(), "hello from ctr-remote");
}
