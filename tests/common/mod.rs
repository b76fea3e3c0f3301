//! Shared integration-test harness: a local registry, containerd 1.6 in a temp dir, our daemon,
//! and OCI images built from layer tars and pushed to the registry.
//!
//! Every process started here is killed (and its mounts unmounted) on `Drop`, so a panicking
//! test leaves nothing behind. Tools missing from the machine make the test fail with a clear
//! message (the Makefile's `deps` target installs them).
//!
//! Typical use:
//! ```ignore
//! let reg = Registry::start();
//! let daemon = Daemon::start(&root, &sock, &[]);
//! let ctrd = Containerd::start(ContainerdOpts { stargz: Some(sock.clone()), ..Default::default() });
//! ctrd.wait_stargz_ready();
//! let image = push_image(&reg, "test/img", "v1", &[Layer::from_entries(&tools_layer(&["/bin/sh"]))]);
//! ctrd.ctr_ok(&["image", "pull", "--plain-http", "--snapshotter", "stargz", &image]);
//! ```
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Fails the test with a clear message when `tool` is not installed.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "required tool `{tool}` is not installed (run `make deps` as root)"
    );
}

/// A free TCP port on 127.0.0.1 (bound then released; the tiny race is acceptable in tests).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

fn stop_child(child: &mut Child) {
    // SIGTERM first so the process can release what it holds, then SIGKILL.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let ok = wait_until(Duration::from_secs(5), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !ok {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Mount points at or below `dir` from `/proc/self/mountinfo`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts everything at or below `dir` (best effort, for Drop guards).
pub fn unmount_all_under(dir: &Path) {
    for m in mounts_under(dir) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&m)
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

/// Debian's `docker-registry` serving plain HTTP on 127.0.0.1:<free port>, storage in a temp dir.
pub struct Registry {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts the registry and waits until `/v2/` answers.
    pub fn start() -> Registry {
        require_tool("docker-registry");
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("write registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");
        let mut reg = Registry { child, addr, dir };
        let ok = wait_until(Duration::from_secs(20), || reg.v2_ok());
        if !ok {
            let _ = reg.child.kill();
            panic!(
                "registry did not answer /v2/ on {}: {}",
                reg.addr,
                reg.log()
            );
        }
        reg
    }

    /// Blob GETs the registry has answered so far (from its access log).
    pub fn blob_gets(&self) -> usize {
        self.blob_gets_of("sha256:")
    }

    /// GETs of blobs whose digest starts with `digest` the registry has answered so far.
    pub fn blob_gets_of(&self, digest: &str) -> usize {
        let path = format!("/blobs/{digest}");
        self.log()
            .lines()
            .filter(|l| {
                l.contains("msg=\"response completed")
                    && l.contains("http.request.method=GET ")
                    && l.contains(&path)
            })
            .count()
    }

    fn v2_ok(&self) -> bool {
        http_get(&self.addr, "/v2/")
            .map(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
            .unwrap_or(false)
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Same as [`Registry::addr`] (the registry host as used in image references).
    pub fn host(&self) -> &str {
        &self.addr
    }

    /// The registry's log output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Minimal HTTP/1.0 GET returning the raw response (headers + body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

// ---------------------------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------------------------

/// Options for [`Containerd::start`].
#[derive(Debug, Clone, Default)]
pub struct ContainerdOpts {
    /// Socket of our daemon: adds `[proxy_plugins.stargz]` (type snapshot) pointing at it.
    pub stargz_socket: Option<PathBuf>,
    /// `exports.root` of the proxy plugin (our daemon's `--root`), optional.
    pub stargz_root: Option<PathBuf>,
    /// Extra TOML appended verbatim to the config.
    pub extra_config: String,
}

/// containerd 1.6 with its own root, state and sockets in a temp dir, CRI disabled.
pub struct Containerd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    config: PathBuf,
}

impl Containerd {
    /// Starts containerd and waits until `ctr version` answers.
    pub fn start(opts: ContainerdOpts) -> Containerd {
        require_tool("containerd");
        require_tool("ctr");
        require_tool("runc");
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("containerd.sock");
        let mut cfg = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \"io.containerd.snapshotter.v1.aufs\", \"io.containerd.snapshotter.v1.devmapper\"]\n\n[grpc]\n  address = \"{sock}\"\n\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\n[metrics]\n  address = \"\"\n",
            root = dir.path().join("root").display(),
            state = dir.path().join("state").display(),
            sock = socket.display(),
        );
        if let Some(s) = &opts.stargz_socket {
            cfg.push_str(&format!(
                "\n[proxy_plugins.stargz]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                s.display()
            ));
            if let Some(r) = &opts.stargz_root {
                cfg.push_str(&format!(
                    "[proxy_plugins.stargz.exports]\n  root = \"{}/\"\n",
                    r.display()
                ));
            }
        }
        cfg.push_str(&opts.extra_config);
        let config = dir.path().join("config.toml");
        std::fs::write(&config, cfg).expect("write containerd config");
        let mut c = Containerd {
            child: None,
            dir,
            socket,
            config,
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&self.config)
            .arg("--log-level")
            .arg("info")
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        self.child = Some(child);
        let ok = wait_until(Duration::from_secs(30), || {
            self.socket.exists() && self.ctr(&["version"]).status.success()
        });
        assert!(ok, "containerd did not start: {}", self.log());
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The temp dir holding root/, state/ and the config.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("containerd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Runs `ctr --address SOCK -n default ARGS...`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_in("default", args)
    }

    /// Runs `ctr --address SOCK -n NS ARGS...`.
    pub fn ctr_in(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .arg("-n")
            .arg(ns)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// `BIN --address <socket> --namespace NS ARGS...`, for our `ctr-remote` or Go's; not run.
    pub fn ctr_remote_cmd(&self, bin: &str, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new(bin);
        c.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", ns])
            .args(args);
        c
    }

    /// Like [`Containerd::ctr`] but panics (with stdout/stderr) on failure; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        assert_success(self.ctr(args), &format!("ctr {args:?}"))
    }

    /// Like [`Containerd::ctr_in`] but panics (with stdout/stderr) on failure; returns stdout.
    pub fn ctr_ns_ok(&self, ns: &str, args: &[&str]) -> String {
        assert_success(self.ctr_in(ns, args), &format!("ctr -n {ns} {args:?}"))
    }

    /// Waits until the `stargz` proxy snapshotter answers: retries Prepare of a scratch key
    /// (then removes it). `ctr snapshots ls`/`info` prove nothing (they hide proxy errors).
    pub fn wait_stargz_ready(&self, timeout: Duration) {
        let key = format!("readiness-probe-{}", std::process::id());
        let mut last = String::new();
        let ok = wait_until(timeout, || {
            let out = self.ctr(&["snapshots", "--snapshotter", "stargz", "prepare", &key]);
            if out.status.success() {
                let _ = self.ctr(&["snapshots", "--snapshotter", "stargz", "rm", &key]);
                return true;
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            if last.contains("already exists") {
                let _ = self.ctr(&["snapshots", "--snapshotter", "stargz", "rm", &key]);
            }
            false
        });
        assert!(
            ok,
            "stargz proxy snapshotter not ready after {timeout:?}: {last}"
        );
    }

    /// Kills and removes every task and container (best effort; used by Drop).
    pub fn remove_all_containers(&self) {
        let ids = String::from_utf8_lossy(&self.ctr(&["tasks", "ls", "-q"]).stdout).into_owned();
        for id in ids.lines().filter(|l| !l.is_empty()) {
            let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
            let _ = self.ctr(&["tasks", "rm", "-f", id]);
        }
        let ids =
            String::from_utf8_lossy(&self.ctr(&["containers", "ls", "-q"]).stdout).into_owned();
        for id in ids.lines().filter(|l| !l.is_empty()) {
            let _ = self.ctr(&["containers", "rm", id]);
        }
    }

    /// Stops containerd (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }

    /// Stops and starts containerd again with the same config.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

/// Pids of processes whose command line mentions `needle` (shims started for our containerd).
fn pids_with_cmdline(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) {
                pids.push(pid);
            }
        }
    }
    pids
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.remove_all_containers();
        }
        self.stop();
        // Shims outlive containerd; they carry our socket path in their arguments.
        for pid in pids_with_cmdline(&self.socket.display().to_string()) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        unmount_all_under(self.dir.path());
    }
}

// ---------------------------------------------------------------------------------------------
// Our daemon
// ---------------------------------------------------------------------------------------------

/// The built `containerd-stargz-grpc` binary, run as a child process.
pub struct Daemon {
    child: Option<Child>,
    /// The binary started (the one cargo built, unless a test swaps it).
    bin: PathBuf,
    root: PathBuf,
    socket: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
    _logdir: tempfile::TempDir,
}

/// Path of the daemon binary cargo built for this test.
pub fn daemon_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-stargz-grpc"))
}

impl Daemon {
    /// Starts `containerd-stargz-grpc -root ROOT -address SOCKET -log-level debug EXTRA...`
    /// (Go's single-dash spelling, as units written for Go's daemon use it) and waits for the
    /// socket to accept connections.
    pub fn start(root: &Path, socket: &Path, extra_args: &[&str]) -> Daemon {
        Daemon::start_with_env(root, socket, extra_args, &[])
    }

    /// Like [`Daemon::start`] with extra environment variables (e.g. `DOCKER_CONFIG`), kept
    /// across restarts.
    pub fn start_with_env(
        root: &Path,
        socket: &Path,
        extra_args: &[&str],
        envs: &[(&str, &str)],
    ) -> Daemon {
        let logdir = tempfile::tempdir().expect("tempdir");
        let mut d = Daemon {
            child: None,
            bin: daemon_bin(),
            root: root.to_path_buf(),
            socket: socket.to_path_buf(),
            args: extra_args.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: logdir.path().join("daemon.log"),
            _logdir: logdir,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-root")
            .arg(&self.root)
            .arg("-address")
            .arg(&self.socket)
            .arg("-log-level")
            .arg("debug");
        // Use an empty config unless the test passes its own `--config`.
        if !self.args.iter().any(|a| {
            let a = a.trim_start_matches('-');
            a == "config" || a.starts_with("config=")
        }) {
            let cfg = self.log.with_file_name("config.toml");
            if !cfg.exists() {
                std::fs::write(&cfg, "").expect("write empty daemon config");
            }
            cmd.arg("--config").arg(cfg);
        }
        let child = cmd
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd-stargz-grpc");
        self.child = Some(child);
        let sock = self.socket.clone();
        let ok = wait_until(Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        if !ok {
            let exited = self.child.as_mut().map(|c| c.try_wait().ok().flatten());
            panic!(
                "daemon socket {} not ready (exit: {exited:?}); log:\n{}",
                sock.display(),
                self.log()
            );
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the daemon logged so far (across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal_and_wait(&mut self, sig: i32) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        unsafe { libc::kill(c.id() as i32, sig) };
        let mut status = None;
        wait_until(Duration::from_secs(20), || match c.try_wait() {
            Ok(Some(s)) => {
                status = Some(s);
                true
            }
            _ => false,
        });
        if status.is_none() {
            let _ = c.kill();
            status = c.wait().ok();
        }
        status
    }

    /// SIGTERM: the daemon exits keeping its state (mounts stay for the next start).
    pub fn sigterm(&mut self) -> Option<std::process::ExitStatus> {
        self.signal_and_wait(libc::SIGTERM)
    }

    /// SIGINT: the daemon cleans up (unmounts) and exits.
    pub fn sigint(&mut self) -> Option<std::process::ExitStatus> {
        self.signal_and_wait(libc::SIGINT)
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) -> Option<std::process::ExitStatus> {
        self.signal_and_wait(libc::SIGKILL)
    }

    /// Starts the daemon again with the same arguments (kills it first if still running).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
        self.spawn();
    }

    /// Like [`Daemon::restart`], running `bin` from now on (an upgrade).
    pub fn restart_with(&mut self, bin: &Path) {
        self.bin = bin.to_path_buf();
        self.restart();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        unmount_all_under(&self.root);
    }
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// One entry of a layer tar. Paths are relative (`etc/passwd`); missing parent directories
/// are added automatically (mode 0755) before the entry.
#[derive(Debug, Clone)]
pub enum LayerEntry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// `dir/.wh.name`: deletes `dir/name` from lower layers.
    Whiteout {
        path: String,
    },
    /// `dir/.wh..wh..opq`: hides everything lower layers have in `dir`.
    Opaque {
        dir: String,
    },
}

impl LayerEntry {
    pub fn dir(path: &str) -> Self {
        LayerEntry::Dir {
            path: path.into(),
            mode: 0o755,
        }
    }
    pub fn file(path: &str, data: impl Into<Vec<u8>>) -> Self {
        LayerEntry::File {
            path: path.into(),
            data: data.into(),
            mode: 0o644,
        }
    }
    pub fn exec(path: &str, data: impl Into<Vec<u8>>) -> Self {
        LayerEntry::File {
            path: path.into(),
            data: data.into(),
            mode: 0o755,
        }
    }
    pub fn symlink(path: &str, target: &str) -> Self {
        LayerEntry::Symlink {
            path: path.into(),
            target: target.into(),
        }
    }
    pub fn whiteout(path: &str) -> Self {
        LayerEntry::Whiteout { path: path.into() }
    }
    pub fn opaque(dir: &str) -> Self {
        LayerEntry::Opaque { dir: dir.into() }
    }
}

fn split_parent(path: &str) -> (String, String) {
    let p = path.trim_matches('/');
    match p.rsplit_once('/') {
        Some((d, n)) => (d.to_string(), n.to_string()),
        None => (String::new(), p.to_string()),
    }
}

fn tar_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h
}

/// Builds an (uncompressed) layer tar from `entries`, adding parent-dir entries as needed.
pub fn layer_tar(entries: &[LayerEntry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    let ensure_dirs = |b: &mut tar::Builder<Vec<u8>>,
                       dir: &str,
                       dirs: &mut std::collections::BTreeSet<String>| {
        let mut acc = String::new();
        for part in dir.split('/').filter(|s| !s.is_empty()) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            if dirs.insert(acc.clone()) {
                let mut h = tar_header(tar::EntryType::Directory, 0o755, 0);
                b.append_data(&mut h, format!("{acc}/"), std::io::empty())
                    .expect("tar dir");
            }
        }
    };
    for e in entries {
        match e {
            LayerEntry::Dir { path, mode } => {
                let (parent, _) = split_parent(path);
                ensure_dirs(&mut b, &parent, &mut dirs);
                let p = path.trim_matches('/').to_string();
                if dirs.insert(p.clone()) {
                    let mut h = tar_header(tar::EntryType::Directory, *mode, 0);
                    b.append_data(&mut h, format!("{p}/"), std::io::empty())
                        .expect("tar dir");
                }
            }
            LayerEntry::File { path, data, mode } => {
                let (parent, _) = split_parent(path);
                ensure_dirs(&mut b, &parent, &mut dirs);
                let mut h = tar_header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, path.trim_matches('/'), data.as_slice())
                    .expect("tar file");
            }
            LayerEntry::Symlink { path, target } => {
                let (parent, _) = split_parent(path);
                ensure_dirs(&mut b, &parent, &mut dirs);
                let mut h = tar_header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, path.trim_matches('/'), target)
                    .expect("tar symlink");
            }
            LayerEntry::Whiteout { path } => {
                let (parent, name) = split_parent(path);
                ensure_dirs(&mut b, &parent, &mut dirs);
                let wh = if parent.is_empty() {
                    format!(".wh.{name}")
                } else {
                    format!("{parent}/.wh.{name}")
                };
                let mut h = tar_header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(&mut h, wh, std::io::empty())
                    .expect("tar whiteout");
            }
            LayerEntry::Opaque { dir } => {
                let d = dir.trim_matches('/');
                ensure_dirs(&mut b, d, &mut dirs);
                let mut h = tar_header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(&mut h, format!("{d}/.wh..wh..opq"), std::io::empty())
                    .expect("tar opaque");
            }
        }
    }
    b.into_inner().expect("finish tar")
}

/// gzip-compresses `data` (default level).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip finish")
}

/// "sha256:<hex>" of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A layer blob as pushed to the registry.
#[derive(Debug, Clone)]
pub struct Layer {
    pub blob: Vec<u8>,
    pub media_type: String,
    /// Digest of the uncompressed tar ("sha256:...").
    pub diff_id: String,
    /// Descriptor annotations (e.g. `containerd.io/snapshot/stargz/toc.digest`).
    pub annotations: BTreeMap<String, String>,
}

impl Layer {
    /// A gzip layer built from `entries`.
    pub fn from_entries(entries: &[LayerEntry]) -> Layer {
        let tar = layer_tar(entries);
        Layer {
            diff_id: sha256_digest(&tar),
            blob: gzip(&tar),
            media_type: MEDIA_TYPE_LAYER_GZIP.into(),
            annotations: BTreeMap::new(),
        }
    }

    /// A prebuilt blob (e.g. eStargz) with its media type and diff_id.
    pub fn from_blob(blob: Vec<u8>, media_type: &str, diff_id: &str) -> Layer {
        Layer {
            blob,
            media_type: media_type.into(),
            diff_id: diff_id.into(),
            annotations: BTreeMap::new(),
        }
    }

    pub fn with_annotation(mut self, k: &str, v: &str) -> Layer {
        self.annotations.insert(k.into(), v.into());
        self
    }

    /// "sha256:..." of the blob.
    pub fn digest(&self) -> String {
        sha256_digest(&self.blob)
    }
}

/// The uncompressed layer `tar` as an eStargz layer built by our builder, annotated with its
/// TOC digest as a converter does.
pub fn estargz_layer(tar: &[u8]) -> Layer {
    let mut blob = Vec::new();
    let built = stargz::estargz::build(tar, &mut blob, &stargz::estargz::BuildOptions::default())
        .expect("eStargz build");
    Layer::from_blob(blob, MEDIA_TYPE_LAYER_GZIP, &built.diff_id).with_annotation(
        "containerd.io/snapshot/stargz/toc.digest",
        &built.toc_digest,
    )
}

/// Entries for a "tools" layer: the given host binaries (e.g. `/bin/sh`, `/bin/cat`) at the
/// same paths plus every shared library `ldd` lists for them. Symlinks are followed, so the
/// layer holds regular files. Also adds `tmp/` (mode 1777).
pub fn tools_layer(bins: &[&str]) -> Vec<LayerEntry> {
    require_tool("ldd");
    let mut files = std::collections::BTreeSet::new();
    for bin in bins {
        let p = Path::new(bin);
        assert!(p.exists(), "host binary {bin} not found");
        files.insert(bin.to_string());
        let out = Command::new("ldd").arg(bin).output().expect("run ldd");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(path) = path.filter(|p| p.starts_with('/')) {
                files.insert(path.to_string());
            }
        }
    }
    let mut entries = vec![LayerEntry::Dir {
        path: "tmp".into(),
        mode: 0o1777,
    }];
    for f in files {
        let data = std::fs::read(&f).unwrap_or_else(|e| panic!("read {f}: {e}"));
        entries.push(LayerEntry::exec(f.trim_start_matches('/'), data));
    }
    entries
}

/// Writes an OCI image layout for `layers` (bottom first) to `dir`, tagged `tag`.
/// Returns the manifest digest.
pub fn write_oci_layout(dir: &Path, tag: &str, layers: &[Layer]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir blobs");
    let put = |data: &[u8]| -> String {
        let d = sha256_digest(data);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), data).expect("write blob");
        d
    };
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config).expect("config json");
    let config_digest = put(&config);
    let layer_descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            let mut d = serde_json::json!({"mediaType": l.media_type, "digest": put(&l.blob), "size": l.blob.len()});
            if !l.annotations.is_empty() {
                d["annotations"] = serde_json::to_value(&l.annotations).expect("annotations");
            }
            d
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": layer_descs,
    });
    let manifest = serde_json::to_vec(&manifest).expect("manifest json");
    let manifest_digest = put(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MEDIA_TYPE_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("index json"),
    )
    .expect("write index");
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("write oci-layout");
    manifest_digest
}

/// A fresh registry serving `blob` (gzip, with `diff_id`) as the only layer of `name:v1`.
/// Returns the registry, the image reference and the layer digest.
pub fn serve_layer(blob: Vec<u8>, diff_id: &str, name: &str) -> (Registry, String, String) {
    let layer = Layer::from_blob(blob, MEDIA_TYPE_LAYER_GZIP, diff_id);
    let digest = layer.digest();
    let registry = Registry::start();
    let reference = push_image(&registry, name, "v1", &[layer]);
    (registry, reference, digest)
}

/// Builds an OCI image from `layers` and pushes it to `registry` as `name:tag` with skopeo
/// (digests preserved). Returns the reference "127.0.0.1:PORT/name:tag".
pub fn push_image(registry: &Registry, name: &str, tag: &str, layers: &[Layer]) -> String {
    require_tool("skopeo");
    let dir = tempfile::tempdir().expect("tempdir");
    write_oci_layout(dir.path(), tag, layers);
    let reference = format!("{}/{name}:{tag}", registry.addr());
    let out = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:{tag}", dir.path().display()))
        .arg(format!("docker://{reference}"))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    reference
}

// ---------------------------------------------------------------------------------------------
// Direct gRPC access to a snapshotter socket
// ---------------------------------------------------------------------------------------------

pub use stargz::proto::containerd::services::snapshots::v1 as snapshots_pb;

/// A tonic client for containerd's Snapshots API on the unix socket `path` (our daemon,
/// bypassing containerd). Use inside a tokio runtime.
pub async fn snapshots_client(
    path: &Path,
) -> Result<
    snapshots_pb::snapshots_client::SnapshotsClient<tonic::transport::Channel>,
    tonic::transport::Error,
> {
    let path = path.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://[::1]:1")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await?;
    Ok(snapshots_pb::snapshots_client::SnapshotsClient::new(
        channel,
    ))
}

/// Every snapshot the daemon on `socket` lists: name → (kind, parent, labels). Blocking.
pub fn daemon_snapshots(
    socket: &Path,
) -> BTreeMap<String, (i32, String, BTreeMap<String, String>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = snapshots_client(socket).await.expect("connect to daemon");
        let mut stream = c
            .list(snapshots_pb::ListSnapshotsRequest {
                snapshotter: String::new(),
                filters: vec![],
            })
            .await
            .expect("List")
            .into_inner();
        let mut out = BTreeMap::new();
        while let Some(msg) = stream.message().await.expect("List stream") {
            for i in msg.info {
                out.insert(i.name, (i.kind, i.parent, i.labels.into_iter().collect()));
            }
        }
        out
    })
}

/// Asserts that a finished command succeeded (showing its status, stdout and stderr otherwise)
/// and returns its stdout.
pub fn assert_success(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Go's `containerd-stargz-grpc`, built by `scripts/go-daemon.sh`; stopped with SIGINT (which
/// unmounts) on drop.
pub struct GoDaemon {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl GoDaemon {
    pub fn start(config: &str) -> GoDaemon {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/go-daemon.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .expect("go-daemon.sh");
        let bin = assert_success(out, "scripts/go-daemon.sh")
            .trim()
            .to_string();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("config.toml"), config).expect("config");
        let log = std::fs::File::create(dir.path().join("daemon.log")).expect("log");
        let child = Command::new(&bin)
            .arg("--address")
            .arg(dir.path().join("stargz.sock"))
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .arg("--log-level")
            .arg("debug")
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn Go daemon");
        let sock = dir.path().join("stargz.sock");
        assert!(
            wait_until(Duration::from_secs(30), || {
                std::os::unix::net::UnixStream::connect(&sock).is_ok()
            }),
            "Go daemon did not start"
        );
        GoDaemon { child, dir }
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("stargz.sock")
    }
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
}

impl Drop for GoDaemon {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        unmount_all_under(self.dir.path());
    }
}

/// Our daemon plus a containerd using it as the `stargz` proxy snapshotter, under one temp dir
/// that holds the daemon's root and socket (fields drop in order: containerd, then the daemon,
/// then the directory).
pub struct StargzBed {
    pub ctrd: Containerd,
    pub daemon: Daemon,
    dir: tempfile::TempDir,
}

impl StargzBed {
    pub fn start() -> StargzBed {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let sock = dir.path().join("stargz.sock");
        let daemon = Daemon::start(&root, &sock, &[]);
        let ctrd = Containerd::start(ContainerdOpts {
            stargz_socket: Some(sock),
            stargz_root: Some(root),
            ..Default::default()
        });
        ctrd.wait_stargz_ready(Duration::from_secs(30));
        StargzBed { ctrd, daemon, dir }
    }

    /// The daemon's root, below which it mounts the layers.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Lazily pulls `image` (plain HTTP) with our `ctr-remote`; returns its progress output
    /// (e.g. `N/M layers remote`).
    pub fn rpull(&self, image: &str) -> String {
        let out = self
            .ctrd
            .ctr_remote_cmd(
                env!("CARGO_BIN_EXE_ctr-remote"),
                "default",
                &["image", "rpull", "--plain-http", image],
            )
            .output()
            .expect("rpull");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "rpull: {stderr}");
        stderr
    }
}
