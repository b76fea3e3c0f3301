//! Smoke test of the slow-link test bed that the benchmarks and end-to-end tests use
//! (`scripts/netlink.sh` + `examples/delay-proxy.rs`). Needs root (network namespaces, tc), as CI has.
//!
//! It brings a link up with a known delay and rate, checks that requests through it pay at least the
//! configured round trip, that a new connection pays one more (the emulated handshake), that a
//! download is held to the rate, and that `down` (run by a Drop guard, so also on panic) leaves no
//! namespace, veth or state behind. Only lower bounds are asserted: a loaded machine can only make
//! the link slower, never faster.
mod testbed;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use testbed::{run, SlowLink};

const DELAY_MS: u64 = 15;
const RATE_MBIT: u64 = 20;

/// Seconds to the first response byte of each of `urls`, fetched over one connection.
fn ttfb(urls: &[String]) -> Result<Vec<f64>> {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--fail", "-w", "%{time_starttransfer}\\n"]);
    for url in urls {
        cmd.args(["-o", "/dev/null", url]);
    }
    let out = run(&mut cmd)?;
    let times = String::from_utf8(out.stdout)?
        .lines()
        .map(|l| {
            l.parse::<f64>()
                .with_context(|| format!("curl output {l:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    ensure!(times.len() == urls.len(), "curl printed {times:?}");
    Ok(times)
}

/// Uploads `data` to the namespace's registry directly (127.0.0.1 inside it) and returns its digest.
fn push_blob(link: &SlowLink, data: &[u8], dir: &Path) -> Result<String> {
    use sha2::Digest;
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)));
    let file = dir.join("blob");
    std::fs::write(&file, data)?;
    let script = format!(
        "loc=$(curl -s -i -X POST http://127.0.0.1:5000/v2/smoke/blobs/uploads/ | tr -d '\\r' \
         | awk '/^Location:/{{print $2}}'); case $loc in *\\?*) s='&';; *) s='?';; esac; \
         curl -s --fail -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' \
         --data-binary @{} \"$loc${{s}}digest={digest}\"",
        file.display()
    );
    link.exec(&["bash", "-c", &script])?;
    Ok(digest)
}

fn leftovers(name: &str) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let netns = String::from_utf8(run(Command::new("ip").args(["netns", "list"]))?.stdout)?;
    if netns.split_whitespace().any(|n| n == format!("sgz-{name}")) {
        found.push(format!("netns sgz-{name}"));
    }
    if Path::new("/run/stargz-testbed/netlink").join(name).exists() {
        found.push("state directory".into());
    }
    Ok(found)
}

#[test]
fn slow_link_delays_limits_and_cleans_up() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let veth;
    let name;
    {
        let link = SlowLink::up(&format!("{RATE_MBIT}mbit"), DELAY_MS)?;
        name = link.name().to_string();
        let idx = link
            .addr()
            .split('.')
            .nth(2)
            .context("address has no X")?
            .to_string();
        veth = format!("sgz{idx}-h");

        let v2 = format!("http://{}/v2/", link.addr());
        let times = ttfb(&[v2.clone(), v2])?;
        let rtt = 2.0 * DELAY_MS as f64 / 1000.0;
        ensure!(
            times[1] >= rtt,
            "request on an open connection took {}s < RTT {rtt}s",
            times[1]
        );
        ensure!(
            times[0] >= 2.0 * rtt,
            "first request took {}s < 2 RTT (handshake + request)",
            times[0]
        );
        ensure!(
            times[1] < 1.0,
            "a /v2/ round trip took {}s: the proxy stalls",
            times[1]
        );

        // 2.5 MB at 20 Mbit/s needs at least 1 s: the link must not be faster than its rate.
        let size = 2_500_000usize;
        let data: Vec<u8> = (0..size)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let digest = push_blob(&link, &data, tmp.path())?;
        let before = stats(&link)?;
        let started = Instant::now();
        let out = run(Command::new("curl").args([
            "-s",
            "--fail",
            &format!("http://{}/v2/smoke/blobs/{digest}", link.addr()),
        ]))?;
        let took = started.elapsed().as_secs_f64();
        ensure!(
            out.stdout == data,
            "blob through the link differs ({} bytes)",
            out.stdout.len()
        );
        let min = size as f64 * 8.0 / (RATE_MBIT as f64 * 1e6) * 0.9;
        ensure!(
            took >= min,
            "{size} bytes took {took:.2}s, faster than {RATE_MBIT} Mbit/s allows"
        );
        // The counters are flushed every 100 ms.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let served = stats(&link)? - before;
        ensure!(
            served >= size as u64,
            "proxy counted {served} bytes served, want >= {size}"
        );
    }
    let left = leftovers(&name)?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    let links = Command::new("ip").args(["link", "show", &veth]).output()?;
    if links.status.success() {
        bail!("veth {veth} left behind");
    }
    Ok(())
}

/// Bytes the registry has served through the proxy so far.
fn stats(link: &SlowLink) -> Result<u64> {
    link.served_bytes()
}

/// The emulated link also costs what TCP's slow start costs on a real one: 1 MB on a fresh
/// connection needs the handshake plus several window-doubling round trips, while the same
/// request on a warmed-up connection needs about one (the rate is high enough not to matter;
/// measured here: about 0.25 s fresh, 0.04 s warm with 30 ms RTT).
#[test]
fn fresh_connections_pay_slow_start() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let link = SlowLink::up("1gbit", DELAY_MS)?;
    let data: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let digest = push_blob(&link, &data, tmp.path())?;
    let url = format!("http://{}/v2/smoke/blobs/{digest}", link.addr());
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--fail", "-w", "%{time_total}\\n"]);
    for _ in 0..3 {
        cmd.args(["-o", "/dev/null", &url]);
    }
    let out = run(&mut cmd)?;
    let times = String::from_utf8(out.stdout)?
        .lines()
        .map(|l| {
            l.parse::<f64>()
                .with_context(|| format!("curl output {l:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    ensure!(times.len() == 3, "curl printed {times:?}");
    let rtt = 2.0 * DELAY_MS as f64 / 1000.0;
    // Handshake (1) + request (1) + windows of 10, 20, 40, 80, 160, 320 segments before 1 MB is out.
    ensure!(
        times[0] >= 6.0 * rtt,
        "1 MB on a fresh connection took {}s < 6 RTT",
        times[0]
    );
    // Only lower bounds: a loaded machine slows the warm request too, so no upper bound is safe.
    ensure!(
        times[2] >= rtt,
        "1 MB on a warm connection took {}s < 1 RTT",
        times[2]
    );
    eprintln!("1 MB fetch times (fresh, warm, warm): {times:?}");
    Ok(())
}
