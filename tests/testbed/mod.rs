//! Rust handle on the slow-link test bed (`scripts/netlink.sh`), for integration tests and benches:
//! a registry in a network namespace behind a `tbf` rate limit and the delay proxy
//! (`examples/delay-proxy.rs`). Needs root.
//!
//! ```ignore
//! #[path = "../tests/testbed/mod.rs"] mod testbed;   // from benches/; `mod testbed;` from tests/
//! let link = testbed::SlowLink::up("100mbit", 10)?;   // 20 ms RTT
//! let registry = link.addr();                         // "10.203.X.2:5000", plain http
//! link.exec(&["skopeo", "copy", "--dest-tls-verify=false", "oci:/d:latest",
//!             "docker://127.0.0.1:5000/img:1"])?;     // fast push from inside the namespace
//! let served = link.served_bytes()?;                  // bytes the registry sent through the link
//! // dropped: namespace, veth, registry, proxy and state are gone
//! ```
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{ensure, Context, Result};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `scripts/netlink.sh` of this checkout.
pub fn netlink_script() -> PathBuf {
    repo().join("scripts/netlink.sh")
}

/// Runs `cmd`, failing with its stderr when it does not succeed.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// Fails clearly when `name` is not on PATH.
pub fn require_tool(name: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    ensure!(
        found,
        "{name} is missing: run `make deps` (the test bed needs it)"
    );
    Ok(())
}

/// The delay proxy example built with this test binary's profile (target/<profile>/examples),
/// built on demand when a filtered `cargo test` did not build examples.
pub fn delay_proxy() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary has no target/<profile> directory")?;
    let bin = profile_dir.join("examples/delay-proxy");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .current_dir(repo())
            .args(["build", "--example", "delay-proxy"]);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        run(&mut build)?;
    }
    ensure!(bin.exists(), "delay proxy not at {}", bin.display());
    Ok(bin)
}

/// Whether a line of docker-registry's log records an answered GET of a blob.
pub fn is_blob_get(line: &str) -> bool {
    line.contains("msg=\"response completed")
        && line.contains("http.request.method=GET ")
        && line.contains("/blobs/sha256:")
}

/// A link that `netlink.sh down` removes when dropped (also on panic).
pub struct SlowLink {
    name: String,
    addr: String,
}

impl SlowLink {
    /// Brings up a link of `rate` (tc syntax, e.g. "100mbit") and `delay_ms` each way, with a
    /// registry behind it. The name is unique per process and call.
    pub fn up(rate: &str, delay_ms: u64) -> Result<Self> {
        Self::up_with(rate, delay_ms, &[])
    }

    /// Like [`SlowLink::up`] with extra environment for the script (e.g. `UPSTREAM`, `REGISTRY_DIR`).
    pub fn up_with(rate: &str, delay_ms: u64, env: &[(&str, &str)]) -> Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        for tool in ["ip", "tc", "curl", "docker-registry"] {
            require_tool(tool)?;
        }
        let proxy = delay_proxy()?;
        let name = format!(
            "t{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut cmd = Command::new("bash");
        cmd.arg(netlink_script())
            .args(["up", &name, rate, &delay_ms.to_string()])
            .env("DELAY_PROXY", &proxy)
            .envs(env.iter().copied());
        // Constructed before the script runs so that a half-made link is torn down too.
        let mut link = SlowLink {
            name,
            addr: String::new(),
        };
        let out = run(&mut cmd)?;
        link.addr = String::from_utf8(out.stdout)?.trim().to_string();
        ensure!(
            link.addr.starts_with("10.203."),
            "unexpected address {:?}",
            link.addr
        );
        Ok(link)
    }

    /// "10.203.X.2:PORT": where clients reach the registry, over plain http.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The namespace side's IP; the host side is the same with `.1`.
    pub fn host_ip(&self) -> &str {
        self.addr.split(':').next().unwrap_or_default()
    }

    /// The script's name of this link (its netns is `sgz-<name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace (the registry is at 127.0.0.1:5000 there, undelayed).
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("bash")
            .arg(netlink_script())
            .args(["exec", &self.name])
            .args(args))
    }

    /// What `netlink.sh` keeps for this link: pids, `registry.log`, `stats.json`.
    pub fn state_dir(&self) -> PathBuf {
        Path::new("/run/stargz-testbed/netlink").join(&self.name)
    }

    /// The registry's log so far: docker-registry writes one `response completed` line per
    /// request it answered (method, URI, status), through the link or from inside the namespace.
    pub fn registry_log(&self) -> Result<String> {
        let path = self.state_dir().join("registry.log");
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    }

    /// Blob GETs (range requests included) the registry has answered so far, failed ones too.
    pub fn blob_gets(&self) -> Result<usize> {
        Ok(self
            .registry_log()?
            .lines()
            .filter(|l| is_blob_get(l))
            .count())
    }

    /// Bytes the registry has sent through the proxy so far (counters flushed every 100 ms).
    pub fn served_bytes(&self) -> Result<u64> {
        let out = run(Command::new("bash")
            .arg(netlink_script())
            .args(["stats", &self.name]))?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        json["upstream_to_client"]
            .as_u64()
            .context("no upstream_to_client in stats")
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(netlink_script())
            .args(["down", &self.name])
            .status();
    }
}
