//! Smoke test of the shared harness against containerd's built-in overlayfs snapshotter:
//! a 3-layer image with whiteouts and an opaque dir is pushed, pulled and run.
//! Needs root, containerd 1.6, runc, docker-registry and skopeo.
mod common;

use common::*;

#[test]
fn harness_push_pull_run_with_builtin_overlayfs() {
    let reg = Registry::start();
    let layers = vec![
        Layer::from_entries(&tools_layer(&["/bin/sh", "/bin/cat", "/bin/ls"])),
        Layer::from_entries(&[
            LayerEntry::file("data/keep.txt", "keep"),
            LayerEntry::file("data/gone.txt", "gone"),
            LayerEntry::file("opq/old.txt", "old"),
        ]),
        Layer::from_entries(&[
            LayerEntry::whiteout("data/gone.txt"),
            LayerEntry::opaque("opq"),
            LayerEntry::file("opq/new.txt", "new"),
        ]),
    ];
    let image = push_image(&reg, "harness/smoke", "v1", &layers);
    let ctrd = Containerd::start(ContainerdOpts::default());
    ctrd.ctr_ok(&["image", "pull", "--plain-http", &image]);
    let out = ctrd.ctr_ok(&[
        "run",
        "--rm",
        &image,
        "smoke",
        "/bin/sh",
        "-c",
        "cat /data/keep.txt; echo; ls /data; ls /opq",
    ]);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["keep", "keep.txt", "new.txt"],
        "output: {out}"
    );
}
