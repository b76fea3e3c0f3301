//! Running containers survive a daemon restart (issue 15): a container (real containerd 1.6 +
//! runc) keeps reading files from a lazily pulled image and checking their hashes while our
//! daemon is (a) stopped with SIGTERM and started again, (b) killed with -9 and started again,
//! (c) replaced by another binary file. Its loop must see no error and no wrong byte; files it
//! never read before a restart are read correctly after it; the layer mounts are the same mounts
//! throughout (same devices: served again, not re-mounted); page caches are dropped while the
//! daemon is down so that reads need it. A file held open across all restarts exercises the
//! passthrough ids a new daemon has to take over.
//!
//! Needs root (containerd, FUSE). Every process and mount is cleaned up on drop.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    layer_tar, push_image, sha256_digest, tools_layer, wait_until, Layer, LayerEntry, StargzBed,
};

const SETS: [&str; 4] = ["a", "b1", "b2", "b3"];

/// `entries` as an eStargz layer.
fn lazy_layer(entries: &[LayerEntry]) -> Layer {
    common::estargz_layer(&layer_tar(entries))
}

/// Sets of files under `data/<set>/`, each with a `SUMS` file for `sha256sum -c`.
fn data_layer() -> Vec<LayerEntry> {
    let mut entries = Vec::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for set in SETS {
        let mut sums = String::new();
        for i in 0..24 {
            let len = 20_000 + (i * 37_000) % 300_000;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let name = format!("f{i:02}");
            let hex = sha256_digest(&data);
            sums.push_str(&format!("{}  {name}\n", hex.trim_start_matches("sha256:")));
            entries.push(LayerEntry::file(&format!("data/{set}/{name}"), data));
        }
        entries.push(LayerEntry::file(&format!("data/{set}/SUMS"), sums));
    }
    entries
}

/// The container's loop: set `a` every round, set `bN` once `/out/go_bN` exists; failures go
/// to `/out/errors`, finished rounds to `/out/passes`. `data/a/f00` stays open throughout (it
/// was opened before it was cached: a page-cached open), `data/a/f02` from when `/out/hold`
/// appears on (after rounds that read it whole, so cached: an open through passthrough, whose
/// backing id every later daemon must reuse for the file's other opens; 94 KB, so it has a
/// cache file of its own before the layer is fully cached, as small files have only after).
const SCRIPT: &str = r#"
exec 3</data/a/f00
n=0
while [ ! -e /out/stop ]; do
  if [ -e /out/hold ] && [ ! -e /out/held ]; then exec 4</data/a/f02; echo >/out/held; fi
  for set in a b1 b2 b3; do
    if [ "$set" = a ] || [ -e /out/go_$set ]; then
      cd /data/$set && sha256sum -c --quiet SUMS >>/out/errors 2>&1 || echo "FAILED $set" >>/out/errors
    fi
  done
  n=$((n+1))
  echo $n >/out/passes
done
echo finished >/out/finished
"#;

fn passes(out: &Path) -> u64 {
    std::fs::read_to_string(out.join("passes"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn errors(out: &Path) -> String {
    std::fs::read_to_string(out.join("errors")).unwrap_or_default()
}

/// `mountpoint → major:minor` of the FUSE mounts under `root`.
fn fuse_devices(root: &Path) -> BTreeMap<PathBuf, String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let f: Vec<&str> = pre.split(' ').collect();
            let mp = PathBuf::from(f.get(4)?);
            (post.starts_with("fuse") && mp.starts_with(root)).then(|| (mp, f[2].to_string()))
        })
        .collect()
}

fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

#[test]
fn a_running_container_reads_on_through_daemon_restarts() {
    let reg = common::Registry::start();
    let tools = tools_layer(&["/bin/sh", "/usr/bin/sha256sum"]);
    let image = push_image(
        &reg,
        "test/live",
        "v1",
        &[lazy_layer(&tools), lazy_layer(&data_layer())],
    );
    let mut bed = StargzBed::start();
    let root = bed.root();
    let stderr = bed.rpull(&image);
    assert!(stderr.contains("2/2 layers remote"), "{stderr}");

    let out = tempfile::tempdir().expect("tempdir");
    let bind = format!(
        "type=bind,src={},dst=/out,options=rbind:rw",
        out.path().display()
    );
    bed.ctrd.ctr_ok(&[
        "run",
        "-d",
        "--snapshotter",
        "stargz",
        "--mount",
        &bind,
        &image,
        "reader",
        "/bin/sh",
        "-c",
        SCRIPT,
    ]);
    let progressed = |from: u64, bed: &StargzBed| {
        let ok = wait_until(Duration::from_secs(90), || passes(out.path()) >= from + 3);
        assert!(
            ok,
            "the container's loop stalled at round {} (errors: {})\ndaemon log tail:\n{}",
            passes(out.path()),
            errors(out.path()),
            tail(&bed.daemon.log())
        );
        let errs = errors(out.path());
        let _ = std::fs::write("/tmp/live.log", bed.daemon.log());
        assert!(
            errs.is_empty(),
            "the container saw errors: {errs}\ndaemon warnings:\n{}",
            warnings(&bed.daemon.log())
        );
    };
    progressed(0, &bed);
    // The loop runs the tools layer's programs over and over; a small one (`sha256sum`) opens
    // through passthrough once the layer is fully cached and the daemon moved its small files
    // into cache files of their own.
    let tools = bed
        .daemon
        .log()
        .lines()
        .find(|l| l.contains("\"layer mounted\""))
        .and_then(|l| l.split("\"layer\":\"").nth(1))
        .and_then(|l| l.split('"').next())
        .map(str::to_string)
        .expect("the tools layer's mount in the log");
    assert!(
        wait_until(Duration::from_secs(60), || bed.daemon.log().lines().any(
            |l| l.contains("small files moved into cache files of their own") && l.contains(&tools)
        )),
        "the tools layer was not settled"
    );
    // Every file of set `a` was read whole (so cached) by now: this open is a passthrough one.
    std::fs::write(out.path().join("hold"), "").expect("hold flag");
    assert!(
        wait_until(Duration::from_secs(30), || out.path().join("held").exists()),
        "the loop did not open the held file"
    );
    progressed(passes(out.path()), &bed);
    let devices = fuse_devices(&root);
    assert_eq!(devices.len(), 2, "two layer mounts: {devices:?}");

    // A copy of the binary at another path stands for an upgrade (a new file, same code).
    let upgraded = out.path().join("containerd-stargz-grpc.new");
    std::fs::copy(common::daemon_bin(), &upgraded).expect("copy the daemon binary");

    for (how, set) in [("SIGTERM", "b1"), ("kill -9", "b2"), ("upgrade", "b3")] {
        let before = passes(out.path());
        let resumed_before = bed
            .daemon
            .log()
            .matches("layer resumed on its running mount")
            .count();
        match how {
            "kill -9" => {
                bed.daemon.kill9();
            }
            _ => {
                let status = bed.daemon.sigterm().expect("daemon was running");
                assert!(status.success(), "{how}: exit {status}");
            }
        }
        // While no daemon serves, reads need it: nothing is left in the page cache.
        drop_caches();
        std::fs::write(out.path().join(format!("go_{set}")), "").expect("flag");
        // Meanwhile the container waits: its requests are queued, not failed.
        std::thread::sleep(Duration::from_millis(300));
        let waiting = passes(out.path());
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(
            passes(out.path()),
            waiting,
            "{how}: reads went on without a daemon"
        );
        assert_eq!(
            errors(out.path()),
            "",
            "{how}: the container saw errors while waiting"
        );
        if how == "upgrade" {
            bed.daemon.restart_with(&upgraded);
        } else {
            bed.daemon.restart();
        }
        progressed(before, &bed);
        assert_eq!(
            fuse_devices(&root),
            devices,
            "{how}: the layers were re-mounted instead of served again"
        );
        let log = bed.daemon.log();
        let resumed: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("layer resumed on its running mount"))
            .skip(resumed_before)
            .collect();
        assert_eq!(resumed.len(), 2, "{how}: both layers resumed");
        // The held passthrough open's id (and the shell's) are taken over.
        assert!(
            resumed.iter().all(|l| !l.contains("\"backing_ids\":0")),
            "{how}: no backing id adopted: {resumed:#?}"
        );
        eprintln!(
            "{how}: the container went on (round {})",
            passes(out.path())
        );
    }

    std::fs::write(out.path().join("stop"), "").expect("stop flag");
    assert!(
        wait_until(Duration::from_secs(60), || out
            .path()
            .join("finished")
            .exists()),
        "the loop did not finish"
    );
    assert_eq!(errors(out.path()), "", "the container saw errors");
    let _ = bed.ctrd.ctr(&["tasks", "kill", "-s", "SIGKILL", "reader"]);
    wait_until(Duration::from_secs(10), || {
        bed.ctrd
            .ctr(&["tasks", "rm", "-f", "reader"])
            .status
            .success()
    });
    let _ = bed.ctrd.ctr(&["containers", "rm", "reader"]);

    // SIGINT unmounts; the keeper then holds nothing and exits (its socket goes with it).
    let keeper_socket = root.join("stargz/fuse-keeper.sock");
    assert!(keeper_socket.exists(), "the keeper runs while mounts live");
    let status = bed.daemon.sigint().expect("daemon was running");
    assert!(status.success(), "SIGINT exit: {status}");
    assert!(
        wait_until(Duration::from_secs(20), || !keeper_socket.exists()),
        "the keeper outlived the mounts"
    );
}

fn warnings(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"WARN\"") || l.contains("\"ERROR\""))
        .collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
