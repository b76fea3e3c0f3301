//! Issue 13: a real Prometheus server (Debian's `prometheus`) scrapes our daemon's
//! `metrics_address` during a lazy pull and run, and its HTTP API then holds Go's series under
//! Go's names, and ours, with values that match what happened: a remote Prepare and a mount per
//! eStargz layer, bytes served from each layer the container read, a fallback (with its reason)
//! for the plain gzip image. The daemon is started with Go's single-dash flags (`-config ...`),
//! as units written for Go's daemon start it. Loopback only; needs root, containerd, runc,
//! docker-registry and prometheus.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// Our `ctr-remote ARGS...` against `ctrd` in namespace `ns`.
fn ctr_remote(ctrd: &Containerd, ns: &str, args: &[&str]) -> Output {
    ctrd.ctr_remote_cmd(env!("CARGO_BIN_EXE_ctr-remote"), ns, args)
        .output()
        .expect("run ctr-remote")
}

/// A Prometheus server on loopback scraping `target` every second; killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
    log: std::path::PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, target: &str) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n\
                 scrape_configs:\n  - job_name: stargz\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("prometheus config");
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("prometheus log"))
            .spawn()
            .expect("spawn prometheus");
        let p = Prometheus { child, addr, log };
        let ready = wait_until(Duration::from_secs(60), || {
            http_get(&p.addr, "/-/ready").is_ok_and(|r| r.starts_with("HTTP/1.0 200"))
        });
        assert!(ready, "prometheus not ready; log:\n{}", p.log());
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The result vector of an instant query: each series' labels and value.
    fn query(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let q: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let resp = http_get(&self.addr, &format!("/api/v1/query?query={q}")).expect("query");
        let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("prometheus answered {resp:?}: {e}"));
        assert_eq!(v["status"], "success", "{promql}: {v}");
        v["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|s| {
                let value = s["value"][1]
                    .as_str()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(f64::NAN);
                (s["metric"].clone(), value)
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_go_and_our_series_during_a_lazy_pull_and_run() {
    require_tool("prometheus");
    let tmp = tempfile::tempdir().expect("tempdir");
    let reg = Registry::start();
    let tools = Layer::from_entries(&tools_layer(&["/bin/sh", "/bin/cat"]));
    let data = Layer::from_entries(&[
        LayerEntry::dir("data"),
        LayerEntry::file("data/hello.txt", "hello from the metrics test\n"),
        LayerEntry::file("data/big.bin", vec![7u8; 300_000]),
    ]);
    let plain = push_image(&reg, "test/metrics", "plain", &[tools, data]);

    // Every read goes through the daemon (no passthrough, no background fetch), so the bytes
    // the container reads are the bytes the daemon reports served.
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let cfg = tmp.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "metrics_address = \"{metrics_addr}\"\nno_background_fetch = true\n\
             [fuse]\npassthrough = false\n"
        ),
    )
    .expect("config");
    let root = tmp.path().join("root");
    let sock = tmp.path().join("stargz.sock");
    // Go's flag syntax: one dash, `=` or a separate value (the harness adds `-root`, ...).
    let cfg_flag = format!("-config={}", cfg.display());
    let daemon = Daemon::start(&root, &sock, &[&cfg_flag]);
    let ctrd = Containerd::start(ContainerdOpts {
        stargz_socket: Some(sock.clone()),
        stargz_root: Some(root.clone()),
        ..Default::default()
    });
    ctrd.wait_stargz_ready(Duration::from_secs(30));
    let prom = Prometheus::start(tmp.path(), &metrics_addr);

    // A plain gzip image through the stargz snapshotter: both layers fall back.
    // (Go's flag syntax again: urfave/cli takes `-plain-http` as well.)
    let out = ctr_remote(&ctrd, "plain", &["image", "rpull", "-plain-http", &plain]);
    assert_success(out, "rpull of the plain image");
    // The same image converted to eStargz: both layers mount lazily, then a container reads
    // a file of each (`cat` from the tools layer, hello.txt from the data layer).
    ctrd.ctr_ok(&["images", "pull", "--plain-http", &plain]);
    let esgz = format!("{}/test/metrics:esgz", reg.addr());
    let out = ctr_remote(
        &ctrd,
        "default",
        &["image", "convert", "--estargz", "--oci", &plain, &esgz],
    );
    assert_success(out, "convert");
    ctrd.ctr_ok(&["images", "push", "--plain-http", &esgz]);
    let out = ctr_remote(&ctrd, "lazy", &["image", "rpull", "--plain-http", &esgz]);
    let rpull = assert_success(out, "rpull of the eStargz image");
    let mounted = mounts_under(&root).len();
    assert_eq!(mounted, 2, "both layers mounted lazily: {rpull}");
    let run = ctrd.ctr_ns_ok(
        "lazy",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "stargz",
            &esgz,
            "metrics-1",
            "/bin/cat",
            "/data/hello.txt",
        ],
    );
    assert_eq!(run.trim(), "hello from the metrics test");

    // Wait for a scrape taken after the run: every mounted layer has served bytes.
    let served = r#"stargz_fs_bytes_served{operation_type="on_demand_bytes_served"}"#;
    let scraped = wait_until(Duration::from_secs(30), || {
        let s = prom.query(served);
        s.len() == 2 && s.iter().all(|(_, v)| *v > 0.0)
    });
    assert!(
        scraped,
        "bytes served per layer: {:?}\nup: {:?}\nprometheus log:\n{}\ndaemon log:\n{}",
        prom.query(served),
        prom.query("up"),
        prom.log(),
        daemon.log()
    );

    let layers_of = |promql: &str| -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = prom
            .query(promql)
            .into_iter()
            .map(|(m, v)| {
                let layer = m["layer"].as_str().or(m["digest"].as_str()).unwrap_or("");
                (layer.to_string(), v)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    // Go's series, Go's names and labels.
    let sizes = prom.query("stargz_fs_layer_size_bytes");
    assert_eq!(sizes.len(), 2, "one per mounted layer: {sizes:?}");
    for (m, v) in &sizes {
        assert!(
            m["digest"]
                .as_str()
                .is_some_and(|d| d.starts_with("sha256:")),
            "{m}"
        );
        assert!(
            m["mountpoint"]
                .as_str()
                .is_some_and(|p| p.starts_with(root.to_str().unwrap_or("?"))),
            "{m}"
        );
        assert!(*v > 0.0, "{m}: {v}");
    }
    let fetched = layers_of("stargz_fs_layer_fetched_size_bytes");
    assert!(
        fetched.len() == 2 && fetched.iter().all(|(_, v)| *v > 0.0),
        "{fetched:?}"
    );
    let mounts =
        layers_of(r#"stargz_fs_operation_duration_milliseconds_count{operation_type="mount"}"#);
    assert_eq!(
        mounts.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
        [1.0, 1.0],
        "{mounts:?}"
    );
    let reads =
        layers_of(r#"stargz_fs_operation_count{operation_type="on_demand_read_access_count"}"#);
    assert!(
        reads.len() == 2 && reads.iter().all(|(_, v)| *v >= 1.0),
        "{reads:?}"
    );
    let read_latency = prom.query(
        r#"stargz_fs_operation_duration_microseconds_count{operation_type="read_on_demand"}"#,
    );
    assert_eq!(read_latency.len(), 2, "{read_latency:?}");
    let fetches = layers_of(
        r#"stargz_fs_operation_count{operation_type="on_demand_remote_registry_fetch_count"}"#,
    );
    assert!(fetches.iter().all(|(_, v)| *v >= 1.0), "{fetches:?}");

    // Ours: Prepares by outcome, reads by cache result, bytes by purpose, process metrics.
    let remote = prom.query(r#"stargz_snapshotter_prepares_total{snapshot="remote"}"#);
    assert_eq!(
        remote.iter().map(|(_, v)| *v).sum::<f64>(),
        2.0,
        "one remote Prepare per eStargz layer: {remote:?}"
    );
    let fallback = prom.query(r#"stargz_snapshotter_prepares_total{snapshot="fallback"}"#);
    assert_eq!(
        fallback.iter().map(|(_, v)| *v).sum::<f64>(),
        2.0,
        "one fallback per plain layer: {fallback:?}"
    );
    assert!(
        fallback
            .iter()
            .all(|(m, _)| m["reason"].as_str().is_some_and(|r| !r.is_empty())),
        "a fallback says why: {fallback:?}"
    );
    eprintln!("fallbacks: {fallback:?}\nfetched per layer: {fetched:?}\nreads: {reads:?}");
    let misses = prom.query(r#"sum(stargz_fs_reads_total{cache="miss"})"#);
    assert!(misses.first().is_some_and(|(_, v)| *v >= 2.0), "{misses:?}");
    let on_demand = prom.query(r#"sum(stargz_fs_fetched_bytes_total{purpose="on_demand"})"#);
    assert!(
        on_demand.first().is_some_and(|(_, v)| *v > 0.0),
        "{on_demand:?}"
    );
    let waits = prom.query("sum(stargz_fs_on_demand_fetch_wait_seconds_count)");
    assert!(waits.first().is_some_and(|(_, v)| *v >= 2.0), "{waits:?}");
    let budget = prom.query("stargz_fs_cache_budget_bytes");
    assert!(budget.first().is_some_and(|(_, v)| *v > 0.0), "{budget:?}");
    let rss = prom.query(r#"process_resident_memory_bytes{job="stargz"}"#);
    assert!(rss.first().is_some_and(|(_, v)| *v > 1e6), "{rss:?}");

    // The daemon logged at debug level: `-log-level debug` was taken.
    assert!(
        daemon.log().contains(r#""level":"DEBUG""#),
        "debug logging is on"
    );
    drop(prom);
    drop(ctrd);
    drop(daemon);
    let left = mounts_under(&root);
    assert!(left.is_empty(), "mounts left: {left:?}");
}
