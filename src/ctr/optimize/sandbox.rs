//! The run of `image optimize`: overlayfs over the unpacked layers, the workload under `runc`
//! on a generated bundle, and fanotify recording what it opens (see the parent module's doc for
//! why this design).

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{NetOptions, OptimizeError, OptimizeOptions, Process, DEFAULT_PERIOD};
use crate::ctr::recorder::ImageRecorder;
use crate::ctr::Error;
use crate::untrusted::clip;
use crate::xattr::cstring;

/// How long a killed workload may take to be reaped before we give up waiting.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// The overlay over the unpacked layers; detached on drop.
struct OverlayMount {
    target: PathBuf,
}

impl OverlayMount {
    fn mount(work: &Path, layers: usize) -> Result<Self, Error> {
        let target = work.join("rootfs");
        let upper = work.join("upper");
        let wd = work.join("work");
        for d in [&target, &upper, &wd] {
            std::fs::create_dir_all(d)?;
        }
        let lower: Vec<String> = (0..layers)
            .rev()
            .map(|i| work.join("l").join(i.to_string()).display().to_string())
            .collect();
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            upper.display(),
            wd.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &target,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|source| OptimizeError::Mount {
            target: target.clone(),
            source,
        })?;
        Ok(Self { target })
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(target = %self.target.display(), error = %e, "failed to unmount the optimize rootfs");
        }
    }
}

/// A runc container under our own runc root; force-deleted on drop (which kills it).
struct Container {
    runc_root: PathBuf,
    id: String,
}

impl Container {
    fn runc(&self) -> std::process::Command {
        let mut c = std::process::Command::new("runc");
        c.arg("--root").arg(&self.runc_root);
        c
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let out = self
            .runc()
            .args(["delete", "--force", &self.id])
            .stdin(std::process::Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                tracing::warn!(id = %self.id, stderr = %clip(&String::from_utf8_lossy(&o.stderr)), "runc delete failed")
            }
            Err(e) => tracing::warn!(id = %self.id, error = %e, "runc delete failed"),
        }
    }
}

/// Runs runc `args` to completion; its error text (from `--log`) goes into the error.
async fn runc_step(
    runc_root: &Path,
    log: &Path,
    op: &'static str,
    args: &[&str],
    stdin: bool,
) -> Result<(), OptimizeError> {
    use std::os::fd::AsFd;
    let stderr = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| OptimizeError::Runc {
            op,
            detail: e.to_string(),
        })?;
    let status = tokio::process::Command::new("runc")
        .arg("--root")
        .arg(runc_root)
        .arg("--log")
        .arg(log)
        .args(args)
        .stdin(if stdin {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::from(stderr.try_clone().map_err(
            |e| OptimizeError::Runc {
                op,
                detail: e.to_string(),
            },
        )?))
        .stderr(std::process::Stdio::from(stderr))
        .status()
        .await
        .map_err(|e| OptimizeError::Runc {
            op,
            detail: format!("cannot run runc: {e}"),
        })?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(2)..].join(" | ");
        return Err(OptimizeError::Runc {
            op,
            detail: format!("{status}: {}", clip(&tail)),
        });
    }
    Ok(())
}

/// How the workload ended.
#[derive(Debug)]
enum Ended {
    Exited(i32),
    Signaled(String),
    TimedOut,
}

/// Mounts the layers, runs the workload for at most `opts.period` while fanotify records what
/// it opens, and returns the recorder; the container and the mount are gone when it returns.
pub(super) async fn run_and_record(
    work: &Path,
    layers: usize,
    process: &Process,
    recorder: ImageRecorder,
    opts: &OptimizeOptions,
    progress: &mut (dyn Write + Send),
) -> Result<ImageRecorder, Error> {
    let mount = OverlayMount::mount(work, layers)?;
    let (uid, gid) = resolve_user(&mount.target, &process.user)?;
    let bundle = work.join("bundle");
    std::fs::create_dir_all(&bundle)?;
    write_etc_files(&bundle, &opts.net)?;
    let spec = runtime_spec(&mount.target, &bundle, process, uid, gid, opts);
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec)?,
    )?;

    // The container's init is orphaned when `runc create` exits; as subreaper we inherit it,
    // so waitpid gives us its exit status.
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let runc_root = work.join("runc");
    let log = work.join("runc.log");
    let id = format!("ctr-remote-optimize-{}", std::process::id());
    let pid_file = work.join("pid");
    let bundle_s = bundle.display().to_string();
    let pid_s = pid_file.display().to_string();
    let container = Container {
        runc_root: runc_root.clone(),
        id: id.clone(),
    };
    runc_step(
        &runc_root,
        &log,
        "create",
        &["create", "--bundle", &bundle_s, "--pid-file", &pid_s, &id],
        opts.stdin,
    )
    .await?;
    let pid: i32 = std::fs::read_to_string(&pid_file)?
        .trim()
        .parse()
        .map_err(|_| OptimizeError::Runc {
            op: "create",
            detail: "no pid file".into(),
        })?;

    let fan = Fanotify::mark(&mount.target)?;
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let reader = {
        let stop = stop.0.clone();
        let rootfs = mount.target.clone();
        std::thread::spawn(move || fan.read_until(stop, recorder, &rootfs))
    };
    let period = if opts.period.is_zero() {
        DEFAULT_PERIOD
    } else {
        opts.period
    };
    let how_long = if opts.wait_on_signal.is_some() {
        "until SIGINT (Ctrl+C)".to_string()
    } else {
        format!(
            "for up to {}s{}",
            period.as_secs_f64(),
            if opts.period.is_zero() {
                " (--period 0: Go's default)"
            } else {
                ""
            }
        )
    };
    writeln!(
        progress,
        "running {} {how_long} ({}), recording opened files",
        clip(&format!("{:?}", process.args)),
        if opts.net.host {
            "host network"
        } else {
            "no network"
        }
    )?;
    let started = Instant::now();
    let ended: Result<Ended, Error> = match runc_step(
        &runc_root,
        &log,
        "start",
        &["start", &id],
        false,
    )
    .await
    {
        Err(e) => Err(e.into()),
        Ok(()) => {
            let mut wait = tokio::task::spawn_blocking(move || wait_pid(pid));
            let stop_signal = async {
                match &opts.wait_on_signal {
                    Some(stop) => {
                        stop.waiting.store(true, Ordering::SeqCst);
                        stop.notify.notified().await
                    }
                    None => tokio::time::sleep(period).await,
                }
            };
            let ended = tokio::select! {
                r = &mut wait => r.map_err(|e| Error::Incomplete(format!("wait task: {e}"))).and_then(|r| r),
                _ = stop_signal => {
                    let _ = container.runc().args(["kill", "--all", &id, "KILL"]).output();
                    match tokio::time::timeout(KILL_GRACE, wait).await {
                        Ok(_) => Ok(Ended::TimedOut),
                        Err(_) => Err(OptimizeError::Runc { op: "kill", detail: "the workload did not die".into() }.into()),
                    }
                }
            };
            if let Some(stop) = &opts.wait_on_signal {
                stop.waiting.store(false, Ordering::SeqCst);
            }
            ended
        }
    };
    // Container gone first, then the last events are drained, then the mount goes.
    drop(container);
    drop(stop);
    let recorder = reader
        .join()
        .map_err(|_| Error::Incomplete("fanotify reader panicked".into()))?;
    drop(mount);
    let ended = ended?;
    let secs = started.elapsed().as_secs_f64();
    match &ended {
        Ended::Exited(0) => writeln!(progress, "workload exited with code 0 after {secs:.1}s")?,
        Ended::Exited(c) => writeln!(
            progress,
            "warning: workload exited with code {c} after {secs:.1}s; using what it opened"
        )?,
        Ended::Signaled(s) => writeln!(
            progress,
            "warning: workload killed by {s} after {secs:.1}s; using what it opened"
        )?,
        Ended::TimedOut if opts.wait_on_signal.is_some() => {
            writeln!(progress, "SIGINT: workload killed after {secs:.1}s")?
        }
        Ended::TimedOut => writeln!(
            progress,
            "period of {}s over: workload killed",
            period.as_secs_f64()
        )?,
    }
    Ok(recorder)
}

/// Tells the fanotify reader to drain and end, also when the future is dropped on a signal.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn wait_pid(pid: i32) -> Result<Ended, Error> {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(Ended::Exited(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(Ended::Signaled(sig.to_string())),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::Io(e.into())),
        }
    }
}

/// A fanotify group marking one filesystem for opens.
struct Fanotify {
    fd: OwnedFd,
}

impl Fanotify {
    fn mark(rootfs: &Path) -> Result<Self, OptimizeError> {
        let err = |op| move |source| OptimizeError::Fanotify { op, source };
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLOEXEC
                    | libc::FAN_NONBLOCK
                    | libc::FAN_CLASS_NOTIF
                    | libc::FAN_UNLIMITED_QUEUE,
                (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(err("init")(std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just returned by fanotify_init and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = cstring(rootfs).map_err(err("mark"))?;
        // SAFETY: valid fd and NUL-terminated path.
        let r = unsafe {
            libc::fanotify_mark(
                fd.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                libc::FAN_OPEN | libc::FAN_OPEN_EXEC,
                libc::AT_FDCWD,
                path.as_ptr(),
            )
        };
        if r != 0 {
            return Err(err("mark")(std::io::Error::last_os_error()));
        }
        Ok(Self { fd })
    }

    /// Reads events until `stop` is set and the queue is empty, recording each opened path.
    fn read_until(
        self,
        stop: Arc<AtomicBool>,
        mut recorder: ImageRecorder,
        rootfs: &Path,
    ) -> ImageRecorder {
        const META: usize = std::mem::size_of::<libc::fanotify_event_metadata>();
        let me = std::process::id() as i32;
        let mut buf = vec![0u8; 64 * 1024];
        let (mut events, mut overflows) = (0u64, 0u64);
        loop {
            let stopping = stop.load(Ordering::SeqCst);
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                let e = std::io::Error::last_os_error();
                if n < 0
                    && e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::Interrupted
                {
                    tracing::warn!(error = %e, "reading fanotify events");
                    break;
                }
                if stopping {
                    break;
                }
                let mut pfd = libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 50) };
                continue;
            }
            let n = n as usize;
            let mut off = 0;
            while off + META <= n {
                // SAFETY: at least META bytes remain at `off`; read_unaligned copes with alignment.
                let m: libc::fanotify_event_metadata =
                    unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                let len = m.event_len as usize;
                if len < META || off + len > n || m.vers != libc::FANOTIFY_METADATA_VERSION {
                    tracing::warn!(len, vers = m.vers, "malformed fanotify event; stopping");
                    return recorder;
                }
                off += len;
                if m.fd < 0 {
                    overflows += 1;
                    continue;
                }
                // SAFETY: the kernel gave us this fd; we own and close it.
                let efd = unsafe { OwnedFd::from_raw_fd(m.fd) };
                events += 1;
                if m.pid == me {
                    continue;
                }
                let Ok(link) = std::fs::read_link(format!("/proc/self/fd/{}", efd.as_raw_fd()))
                else {
                    continue;
                };
                if let Some(p) = container_path(&link, rootfs) {
                    if let Err(why) = recorder.record(&p) {
                        tracing::debug!(path = %clip(&p), ?why, "not recorded");
                    }
                }
            }
        }
        if overflows > 0 {
            tracing::warn!(
                overflows,
                "fanotify queue overflowed; the record may miss files"
            );
        }
        tracing::debug!(events, "fanotify events read");
        recorder
    }
}

/// The path inside the container of an event's file: the kernel prints it from the
/// container's root when the mount is in the container's namespace, or under our mount point
/// when it was opened through it; `None` for deleted or non-UTF-8 names.
fn container_path(link: &Path, rootfs: &Path) -> Option<String> {
    let s = link.to_str()?;
    if s.ends_with(" (deleted)") {
        return None;
    }
    let root = rootfs.to_str()?;
    match s.strip_prefix(root) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => Some(rest.to_string()),
        _ if s.starts_with('/') => Some(s.to_string()),
        _ => None,
    }
}

/// `/etc/resolv.conf` and `/etc/hosts` for the container, as Go's optimize writes them
/// (`--net-host` binds the host's instead).
fn write_etc_files(bundle: &Path, net: &NetOptions) -> Result<(), Error> {
    let mut resolv = String::new();
    for n in &net.nameservers {
        resolv.push_str(&format!("nameserver {n}\n"));
    }
    if !net.search.is_empty() {
        resolv.push_str(&format!("search {}\n", net.search.join(" ")));
    }
    if !net.options.is_empty() {
        resolv.push_str(&format!("options {}\n", net.options.join(" ")));
    }
    std::fs::write(bundle.join("resolv.conf"), resolv)?;
    let mut hosts = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    );
    for h in &net.extra_hosts {
        let (host, ip) = h.split_once(':').ok_or_else(|| OptimizeError::Flag {
            flag: "--add-hosts",
            reason: format!("{} is not host:IP", clip(h)),
        })?;
        hosts.push_str(&format!("{ip}\t{host}\n"));
    }
    std::fs::write(bundle.join("hosts"), hosts)?;
    Ok(())
}

/// Go's `parseMountFlag`: `type=foo,source=/path,destination=/target,options=rbind:rw`.
pub(crate) fn parse_mount_flag(m: &str) -> Result<serde_json::Value, OptimizeError> {
    let bad = |reason: String| OptimizeError::Flag {
        flag: "--mount",
        reason,
    };
    let mut mount = serde_json::json!({});
    for field in m.split(',') {
        let (k, v) = field
            .split_once('=')
            .filter(|(_, v)| !v.contains('='))
            .ok_or_else(|| bad(format!("{}: expected key=val", clip(field))))?;
        match k {
            "type" => mount["type"] = v.into(),
            "source" | "src" => mount["source"] = v.into(),
            "destination" | "dst" => mount["destination"] = v.into(),
            "options" => mount["options"] = v.split(':').collect::<Vec<_>>().into(),
            _ => return Err(bad(format!("mount option {} not supported", clip(k)))),
        }
    }
    if mount["destination"].as_str().is_none_or(str::is_empty) {
        return Err(bad(format!("{}: no destination", clip(m))));
    }
    Ok(mount)
}

/// containerd's default Linux spec (`oci.WithDefaultSpec`) with the image's process.
fn runtime_spec(
    rootfs: &Path,
    bundle: &Path,
    p: &Process,
    uid: u32,
    gid: u32,
    opts: &OptimizeOptions,
) -> serde_json::Value {
    let caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];
    let (resolv, hosts) = if opts.net.host {
        (
            PathBuf::from("/etc/resolv.conf"),
            PathBuf::from("/etc/hosts"),
        )
    } else {
        (bundle.join("resolv.conf"), bundle.join("hosts"))
    };
    let mut mounts = serde_json::json!([
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/etc/resolv.conf", "type": "bind", "source": resolv, "options": ["bind"]},
        {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["bind"]}
    ]);
    if let Some(m) = mounts.as_array_mut() {
        m.extend(opts.mounts.iter().cloned());
    }
    let mut namespaces = vec![
        serde_json::json!({"type": "pid"}),
        serde_json::json!({"type": "ipc"}),
        serde_json::json!({"type": "uts"}),
        serde_json::json!({"type": "mount"}),
    ];
    if !opts.net.host {
        namespaces.push(serde_json::json!({"type": "network"}));
    }
    serde_json::json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": p.args,
            "env": p.env,
            "cwd": p.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": "optimize",
        "mounts": mounts,
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": namespaces,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

/// containerd's `WithUser` on the image's `/etc/passwd` and `/etc/group` (read before the
/// fanotify mark, so they are not recorded — as in Go, where the spec is built first).
fn resolve_user(rootfs: &Path, user: &str) -> Result<(u32, u32), OptimizeError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let read = |rel: &str| -> String {
        let p = rootfs.join(rel);
        // Never follow a symlink out of the image.
        match p.symlink_metadata() {
            Ok(m) if m.is_file() => std::fs::read_to_string(&p).unwrap_or_default(),
            _ => String::new(),
        }
    };
    let passwd = read("etc/passwd");
    let lookup = |db: &str, name: &str, field: usize| -> Option<u32> {
        db.lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&name))
            .and_then(|f| f.get(field).and_then(|s| s.parse().ok()))
    };
    let (uid, primary) = match u.parse::<u32>() {
        Ok(n) => (
            n,
            passwd
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.get(2).and_then(|s| s.parse::<u32>().ok()) == Some(n))
                .and_then(|f| f.get(3).and_then(|s| s.parse().ok()))
                .unwrap_or(0),
        ),
        Err(_) => (
            lookup(&passwd, u, 2).ok_or_else(|| OptimizeError::User(clip(user)))?,
            lookup(&passwd, u, 3).unwrap_or(0),
        ),
    };
    let gid = match g {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                lookup(&read("etc/group"), g, 2).ok_or_else(|| OptimizeError::User(clip(user)))?
            }
        },
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_flags_as_go_parses_them() {
        let m = parse_mount_flag("type=bind,src=/a,dst=/b,options=rbind:ro").unwrap();
        assert_eq!(
            m,
            serde_json::json!({"type": "bind", "source": "/a", "destination": "/b", "options": ["rbind", "ro"]})
        );
        assert!(parse_mount_flag("type=bind,source=/a").is_err());
        assert!(parse_mount_flag("type=bind,foo=1,destination=/b").is_err());
        assert!(parse_mount_flag("destination").is_err());
    }

    #[test]
    fn container_paths() {
        let root = Path::new("/tmp/w/rootfs");
        assert_eq!(
            container_path(Path::new("/usr/bin/dash"), root).as_deref(),
            Some("/usr/bin/dash")
        );
        assert_eq!(
            container_path(Path::new("/tmp/w/rootfs/etc/os-release"), root).as_deref(),
            Some("/etc/os-release")
        );
        assert_eq!(container_path(Path::new("/x (deleted)"), root), None);
    }

    #[test]
    fn users_resolve_from_the_image() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(d.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user(d.path(), "").unwrap(), (0, 0));
        assert_eq!(resolve_user(d.path(), "app").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(d.path(), "1000").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(d.path(), "app:staff").unwrap(), (1000, 50));
        assert_eq!(resolve_user(d.path(), "42:7").unwrap(), (42, 7));
        assert!(resolve_user(d.path(), "nobody-here").is_err());
    }
}
