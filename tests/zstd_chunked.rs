//! zstd:chunked interop with Go (Debian `stargz-snapshotter` 0.12's `ctr-remote` and Go's
//! daemon built from Debian's library) through real containerd 1.6 and a registry, both ways:
//! - a layer converted by Go's `image convert --zstdchunked --oci` is lazily pulled by our
//!   daemon (FUSE mounts, no layer download) and every file matches the source byte for byte;
//!   our `get-toc-digest --zstdchunked` prints Go's TOC digest annotation;
//! - a layer converted by ours is accepted by Go's `get-toc-digest --zstdchunked` with our
//!   annotation's digest, carries containers/storage's annotations, unpacks in plain containerd
//!   (diff ID checked) and is lazily pulled by Go's daemon.
//!
//! And an image mixing a plain gzip, an eStargz and a zstd:chunked layer: the two lazy ones are
//! mounted, the plain one falls back to a download, and the container sees all three.
//!
//! Needs root (containerd, FUSE). Every process and mount is cleaned up on drop.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{
    assert_success as ok, layer_tar, mounts_under, push_image, sha256_digest, tools_layer,
    Containerd, ContainerdOpts, GoDaemon, Layer, LayerEntry, Registry, StargzBed,
};
use stargz::estargz::{self, BuildOptions, Format};

const GO_CTR_REMOTE: &str = "/usr/bin/ctr-remote";
const ZSTD_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";

fn ours() -> &'static str {
    env!("CARGO_BIN_EXE_ctr-remote")
}

fn ctr_remote(bin: &str, ctrd: &Containerd, ns: &str, args: &[&str]) -> Output {
    ctrd.ctr_remote_cmd(bin, ns, args)
        .output()
        .expect("run ctr-remote")
}

/// Data with a file of three 4 MiB chunks, many small files, an empty file and a symlink.
fn data_layer() -> Vec<LayerEntry> {
    let big: Vec<u8> = (0..(9u32 << 20) + 4321)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8 ^ (i % 251) as u8)
        .collect();
    let mut entries = vec![
        LayerEntry::file("data/hello.txt", "hello from zstd:chunked\n"),
        LayerEntry::file("data/big.bin", big),
        LayerEntry::file("data/empty", ""),
        LayerEntry::symlink("data/link", "hello.txt"),
    ];
    for i in 0..60 {
        entries.push(LayerEntry::file(
            &format!("data/small/f{i:02}.txt"),
            format!("small file {i}\n").repeat(i + 1),
        ));
    }
    entries
}

fn tools() -> Vec<LayerEntry> {
    tools_layer(&["/bin/sh", "/bin/cat"])
}

/// Our `rpull` of `image` into namespace `ns` of `bed`; returns its progress output.
fn rpull(bed: &StargzBed, ns: &str, image: &str) -> String {
    let out = ctr_remote(
        ours(),
        &bed.ctrd,
        ns,
        &["image", "rpull", "--plain-http", image],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out, &format!("our rpull of {image}"));
    stderr
}

/// The manifest of `reference` in `ctrd`'s default namespace.
fn manifest_of(ctrd: &Containerd, reference: &str) -> serde_json::Value {
    let ls = ctrd.ctr_ok(&["images", "ls"]);
    let digest = ls
        .lines()
        .find(|l| l.split_whitespace().next() == Some(reference))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_else(|| panic!("{reference} not listed: {ls}"))
        .to_string();
    serde_json::from_str(&ctrd.ctr_ok(&["content", "get", &digest])).expect("manifest json")
}

fn content(ctrd: &Containerd, digest: &str) -> Vec<u8> {
    let out = ctrd.ctr(&["content", "get", digest]);
    assert!(out.status.success(), "content get {digest}");
    out.stdout
}

/// Every file and symlink of `entries` is in `root` with the same bytes or target.
fn assert_holds(root: &Path, entries: &[LayerEntry]) -> usize {
    let mut n = 0;
    for e in entries {
        match e {
            LayerEntry::File { path, data, .. } => {
                let got = std::fs::read(root.join(path))
                    .unwrap_or_else(|err| panic!("{}: {err}", root.join(path).display()));
                assert!(got == *data, "{path}: bytes differ from the source");
                n += 1;
            }
            LayerEntry::Symlink { path, target } => {
                let got = std::fs::read_link(root.join(path)).expect("symlink");
                assert_eq!(got, PathBuf::from(target), "{path}");
                n += 1;
            }
            _ => {}
        }
    }
    n
}

/// The layer mounts of a daemon below `root` hold the two layers' files exactly.
fn assert_mounted_layers_match(root: &Path, data: &[LayerEntry], tools: &[LayerEntry]) {
    let mounts = mounts_under(root);
    let data_mount = mounts.iter().find(|m| m.join("data/hello.txt").exists());
    let tools_mount = mounts.iter().find(|m| m.join("bin/cat").exists());
    let (Some(d), Some(t)) = (data_mount, tools_mount) else {
        panic!("no layer mounts with the image's files below {root:?}: {mounts:?}");
    };
    assert!(assert_holds(d, data) > 60);
    assert!(assert_holds(t, tools) >= 2);
}

fn zstd_layers(manifest: &serde_json::Value) -> Vec<serde_json::Value> {
    let layers = manifest["layers"].as_array().expect("layers").clone();
    assert_eq!(layers.len(), 2);
    for l in &layers {
        assert_eq!(l["mediaType"], ZSTD_LAYER, "{l}");
        assert!(l["annotations"][TOC_DIGEST].is_string(), "{l}");
    }
    layers
}

#[test]
fn zstd_chunked_interop_with_go_both_ways() {
    let reg = Registry::start();
    let (data, tools) = (data_layer(), tools());
    let src = push_image(
        &reg,
        "test/zstd",
        "src",
        &[Layer::from_entries(&tools), Layer::from_entries(&data)],
    );
    let go_ref = format!("{}/test/zstd:go", reg.addr());
    let ours_ref = format!("{}/test/zstd:ours", reg.addr());

    // Both converters, in a containerd of their own.
    let build = Containerd::start(ContainerdOpts::default());
    build.ctr_ok(&["images", "pull", "--plain-http", &src]);
    for (bin, dst) in [(GO_CTR_REMOTE, &go_ref), (ours(), &ours_ref)] {
        ok(
            ctr_remote(
                bin,
                &build,
                "default",
                &["image", "convert", "--zstdchunked", "--oci", &src, dst],
            ),
            &format!("{bin} convert --zstdchunked"),
        );
        build.ctr_ok(&["images", "push", "--plain-http", dst]);
    }
    // Go's behaviour for the flags: --zstdchunked needs --oci.
    let out = ctr_remote(
        ours(),
        &build,
        "default",
        &["image", "convert", "--zstdchunked", &src, "x"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--oci"));

    // Go's layers: our get-toc-digest reads their footer and TOC.
    for l in zstd_layers(&manifest_of(&build, &go_ref)) {
        let digest = l["digest"].as_str().expect("digest");
        let printed = ok(
            ctr_remote(
                ours(),
                &build,
                "default",
                &["image", "get-toc-digest", "--zstdchunked", digest],
            ),
            "our get-toc-digest --zstdchunked",
        );
        assert_eq!(printed.trim(), l["annotations"][TOC_DIGEST], "{l}");
        let out = ctr_remote(
            ours(),
            &build,
            "default",
            &["image", "get-toc-digest", digest],
        );
        assert!(
            !out.status.success(),
            "a zstd:chunked layer parsed as eStargz"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("zstd:chunked"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Our layers: Go's get-toc-digest agrees, the containers/storage annotations point at the
    // compressed TOC, and the diff IDs are the decompressed layers' (checked by containerd's
    // unpack below).
    let manifest = manifest_of(&build, &ours_ref);
    let config: serde_json::Value = serde_json::from_slice(&content(
        &build,
        manifest["config"]["digest"].as_str().expect("config"),
    ))
    .expect("config json");
    for (i, l) in zstd_layers(&manifest).iter().enumerate() {
        let digest = l["digest"].as_str().expect("digest");
        let go = ok(
            ctr_remote(
                GO_CTR_REMOTE,
                &build,
                "default",
                &["image", "get-toc-digest", "--zstdchunked", digest],
            ),
            "Go get-toc-digest --zstdchunked",
        );
        assert_eq!(go.trim(), l["annotations"][TOC_DIGEST], "layer {i}");
        let blob = content(&build, digest);
        let position = l["annotations"]["io.containers.zstd-chunked.manifest-position"]
            .as_str()
            .expect("manifest-position");
        let p: Vec<usize> = position
            .split(':')
            .map(|v| v.parse().expect("number"))
            .collect();
        assert_eq!(p.len(), 4, "{position}");
        assert_eq!(
            l["annotations"]["io.containers.zstd-chunked.manifest-checksum"],
            sha256_digest(&blob[p[0]..p[0] + p[1]]),
            "layer {i}"
        );
        assert_eq!(
            l["annotations"]["containerd.io/uncompressed"],
            config["rootfs"]["diff_ids"][i]
        );
    }
    // Plain containerd unpacks our zstd:chunked layers (decompressing them, diff IDs checked).
    let out = build.ctr_ok(&[
        "run",
        "--rm",
        &ours_ref,
        "zstd-plain",
        "/bin/cat",
        "/data/hello.txt",
    ]);
    assert_eq!(out.trim(), "hello from zstd:chunked");
    drop(build);

    // Our daemon lazily pulls Go's image.
    {
        let bed = StargzBed::start();
        let ctrd = &bed.ctrd;
        let stderr = rpull(&bed, "ours", &go_ref);
        assert!(stderr.contains("done: 2/2 layers remote"), "{stderr}");
        assert_mounted_layers_match(&bed.root(), &data, &tools);
        let run = ctrd.ctr_ns_ok(
            "ours",
            &[
                "run",
                "--rm",
                "--snapshotter",
                "stargz",
                &go_ref,
                "zstd-ours",
                "/bin/cat",
                "/data/link",
            ],
        );
        assert_eq!(run.trim(), "hello from zstd:chunked");
    }

    // Go's daemon lazily pulls ours.
    let go = GoDaemon::start("");
    let ctrd = Containerd::start(ContainerdOpts {
        stargz_socket: Some(go.socket()),
        stargz_root: Some(go.root()),
        ..Default::default()
    });
    ctrd.wait_stargz_ready(Duration::from_secs(30));
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
                "stargz",
                &ours_ref,
            ],
        ),
        "Go rpull of our zstd:chunked image",
    );
    assert_mounted_layers_match(&go.root(), &data, &tools);
    let run = ctrd.ctr_ns_ok(
        "go",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "stargz",
            &ours_ref,
            "zstd-go",
            "/bin/cat",
            "/data/hello.txt",
        ],
    );
    assert_eq!(run.trim(), "hello from zstd:chunked");
}

/// `entries` built into a layer of `format` by our builder, annotated as a converter would.
fn lazy_layer(entries: &[LayerEntry], format: Format) -> Layer {
    let tar = layer_tar(entries);
    let mut blob = Vec::new();
    let opts = BuildOptions {
        format,
        compression_level: if format == Format::Gzip { 6 } else { 3 },
        ..BuildOptions::default()
    };
    let built = estargz::build(&tar[..], &mut blob, &opts).expect("build");
    let media_type = match format {
        Format::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Format::ZstdChunked => ZSTD_LAYER,
    };
    Layer::from_blob(blob, media_type, &built.diff_id)
        .with_annotation(TOC_DIGEST, &built.toc_digest)
}

#[test]
fn an_image_mixing_gzip_estargz_and_zstd_chunked_layers_runs() {
    let reg = Registry::start();
    let esgz_files = vec![LayerEntry::file(
        "data/hello.txt",
        "from the eStargz layer\n",
    )];
    let zstd_files = vec![
        LayerEntry::file("zdata/hello.txt", "from the zstd:chunked layer\n"),
        LayerEntry::file("zdata/big.bin", vec![42u8; 5 << 20]),
    ];
    let image = push_image(
        &reg,
        "test/mixed",
        "v1",
        &[
            Layer::from_entries(&tools()),
            lazy_layer(&esgz_files, Format::Gzip),
            lazy_layer(&zstd_files, Format::ZstdChunked),
        ],
    );
    let bed = StargzBed::start();
    let (ctrd, root) = (&bed.ctrd, bed.root());
    let stderr = rpull(&bed, "default", &image);
    assert!(stderr.contains("done: 2/3 layers remote"), "{stderr}");
    assert_eq!(stderr.matches("not lazy: fallback").count(), 1, "{stderr}");
    // The plain layer's fallback is logged with its reason.
    let log = bed.daemon.log();
    let fallback = log
        .lines()
        .find(|l| l.contains("layer is not lazily mounted"))
        .unwrap_or_else(|| panic!("no fallback logged: {log}"));
    // (Without a TOC digest annotation the layer is not even looked at.)
    assert!(
        fallback.contains("digest of TOC JSON must be passed"),
        "{fallback}"
    );
    let zstd_mount = mounts_under(&root)
        .into_iter()
        .find(|m| m.join("zdata/hello.txt").exists())
        .expect("the zstd:chunked layer is mounted");
    assert_eq!(assert_holds(&zstd_mount, &zstd_files), 2);
    let run = ctrd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "stargz",
        &image,
        "mixed",
        "/bin/sh",
        "-c",
        "cat /data/hello.txt /zdata/hello.txt",
    ]);
    assert_eq!(run, "from the eStargz layer\nfrom the zstd:chunked layer\n");
}
