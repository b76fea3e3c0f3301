//! Keeps the FUSE connections of mounted layers open while no daemon serves them.
//!
//! A FUSE mount lives as long as some process holds its `/dev/fuse` file open. When the daemon
//! stops, crashes or is replaced by a newer binary, a small keeper process (the daemon's binary
//! run with `--fuse-keeper`, in its own session so that a signal to the daemon's process group
//! does not reach it) still holds a duplicate of every layer's connection: the kernel queues
//! the requests of running containers instead of failing them with ENOTCONN, and the next daemon
//! takes the connections back ([`Keeper::take_all`]) and serves them again (`layer::resume_layer`).
//!
//! The keeper also remembers which FUSE passthrough backing ids each connection has open
//! (a new daemon must reuse them: the kernel refuses a second backing file for an inode that
//! is still open through the first), and gives up a connection as soon as its mount is gone
//! (it watches the mount table and the connection itself), so it never keeps alive a mount the
//! snapshotter removed. It exits once it holds nothing and no daemon is connected.
//!
//! Protocol: `SOCK_SEQPACKET` messages of NUL-separated fields, at most [`MAX_MESSAGE`] bytes,
//! on a socket in the daemon's private root; peers must run as the keeper's user. A client
//! starts with `hello <version>`; a keeper of another version is asked to `quit` (its sessions
//! are given up and re-mounted as before keepers existed) and a new one is started.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::snapshot::mounts::mount_entries;
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

/// Version of the keeper protocol; a keeper that answers another one is replaced.
const PROTOCOL: &str = "1";
/// Largest message either side sends or accepts.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024;
/// Connections one keeper holds at most (one per mounted layer).
const MAX_SESSIONS: usize = 16 * 1024;
/// Backing ids remembered per connection at most (one per inode open through passthrough).
const MAX_BACKING_IDS: usize = 1 << 20;
/// Clients connected at once at most (one daemon, plus one starting while another stops).
const MAX_CLIENTS: usize = 8;
/// How long an idle keeper (nothing held, nobody connected) waits before it exits.
const IDLE_EXIT: Duration = Duration::from_secs(5);
/// Deadline of every wait for the keeper's answer or for a new keeper to listen.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// `(ino, backing id)` pairs per `ids` message of a listing.
const IDS_PER_MESSAGE: usize = 2048;

/// The command-line flag that turns the daemon's binary into a keeper.
pub const KEEPER_FLAG: &str = "--fuse-keeper";

/// One connection handed back by the keeper.
#[derive(Debug)]
pub(crate) struct Kept {
    pub mountpoint: PathBuf,
    /// `major:minor` of the mount when it was handed over (as in `/proc/self/mountinfo`).
    pub dev: String,
    pub fd: OwnedFd,
    /// Passthrough backing ids still open on the connection, by inode.
    pub backing: Vec<(u64, u32)>,
}

/// The daemon's side: hands connections to the keeper (starting it when needed) and takes
/// them back at start-up. Failures are logged by the caller; without a keeper mounts work as
/// before, they just do not outlive the daemon.
#[derive(Debug)]
pub struct Keeper {
    socket: PathBuf,
    /// The binary to start as keeper (the daemon's own).
    exe: PathBuf,
    conn: Mutex<Option<OwnedFd>>,
    /// Mountpoints whose backing-id record may be wrong (a message was lost): the keeper is
    /// told to let go of them as soon as it answers again, so that no daemon adopts a stale id.
    unsure: Mutex<Vec<PathBuf>>,
}

impl Keeper {
    pub fn new(socket: PathBuf, exe: PathBuf) -> Self {
        Keeper {
            socket,
            exe,
            conn: Mutex::new(None),
            unsure: Mutex::new(Vec::new()),
        }
    }

    /// Hands the connection of the layer mounted at `mountpoint` (device `dev`) to the keeper.
    pub(crate) fn put(&self, mountpoint: &Path, dev: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        let msg = encode(&[b"put", mountpoint.as_os_str().as_bytes(), dev.as_bytes()]);
        self.send(&msg, Some(fd), true)
    }

    /// Records that passthrough backing id `id` was opened (`open`) or closed for `ino`.
    pub(crate) fn backing(&self, mountpoint: &Path, ino: u64, id: u32, open: bool) {
        let verb: &[u8] = if open { b"open" } else { b"close" };
        let (ino, id) = (ino.to_string(), id.to_string());
        let msg = encode(&[
            verb,
            mountpoint.as_os_str().as_bytes(),
            ino.as_bytes(),
            id.as_bytes(),
        ]);
        if let Err(e) = self.send(&msg, None, false) {
            let mut unsure = self.unsure.lock().unwrap_or_else(|e| e.into_inner());
            if !unsure.iter().any(|m| m == mountpoint) {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "fuse keeper: a backing id was not recorded; this mount will not outlive the daemon");
                unsure.push(mountpoint.to_path_buf());
            }
        }
    }

    /// The keeper lets go of the layer at `mountpoint` (it is being unmounted).
    pub(crate) fn del(&self, mountpoint: &Path) {
        let msg = encode(&[b"del", mountpoint.as_os_str().as_bytes()]);
        if let Err(e) = self.send(&msg, None, false) {
            tracing::debug!(error = %e, "fuse keeper: nothing to release");
        }
    }

    /// Every connection a running keeper holds (it keeps holding them until told `del`).
    /// No keeper running: none.
    pub(crate) fn take_all(&self) -> io::Result<Vec<Kept>> {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = self.connect(false)?;
        }
        let Some(conn) = guard.as_ref() else {
            return Ok(Vec::new());
        };
        send_msg(conn.as_fd(), &encode(&[b"list"]), None)?;
        let mut out: Vec<Kept> = Vec::new();
        loop {
            let (msg, fd) = recv_msg(conn.as_fd())?;
            let fields = decode(&msg);
            match (fields.first().copied(), fd) {
                (Some(b"end"), _) => return Ok(out),
                (Some(b"ent"), Some(fd)) if fields.len() == 3 => out.push(Kept {
                    mountpoint: PathBuf::from(OsStr::from_bytes(fields[1])),
                    dev: String::from_utf8_lossy(fields[2]).into_owned(),
                    fd,
                    backing: Vec::new(),
                }),
                (Some(b"ids"), None) if fields.len() >= 2 => {
                    let mp = Path::new(OsStr::from_bytes(fields[1]));
                    let Some(k) = out.iter_mut().rev().find(|k| k.mountpoint == mp) else {
                        return Err(bad("ids of an unknown connection"));
                    };
                    for pair in &fields[2..] {
                        k.backing
                            .push(parse_pair(pair).ok_or_else(|| bad("bad backing id"))?);
                    }
                }
                _ => return Err(bad("unexpected answer to list")),
            }
        }
    }

    fn send(&self, msg: &[u8], fd: Option<BorrowedFd<'_>>, spawn: bool) -> io::Result<()> {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        // A keeper that went away (killed, or exited idle) is replaced once.
        for attempt in 0..2 {
            if guard.is_none() {
                *guard = self.connect(spawn)?;
            }
            let Some(conn) = guard.as_ref() else {
                return Err(io::Error::new(io::ErrorKind::NotFound, "no fuse keeper"));
            };
            let mut unsure = self.unsure.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(mp) = unsure.last() {
                let del = encode(&[b"del", mp.as_os_str().as_bytes()]);
                if send_msg(conn.as_fd(), &del, None).is_err() {
                    break;
                }
                unsure.pop();
            }
            drop(unsure);
            match send_msg(conn.as_fd(), msg, fd) {
                Ok(()) => return Ok(()),
                Err(e) if attempt == 0 => {
                    tracing::debug!(error = %e, "fuse keeper connection lost; reconnecting");
                    *guard = None;
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("fuse keeper unreachable"))
    }

    /// Connects and greets; with `spawn`, starts a keeper when none answers (or replaces one
    /// that speaks another protocol). `Ok(None)`: no keeper and `spawn` is false.
    fn connect(&self, spawn: bool) -> io::Result<Option<OwnedFd>> {
        if let Some(conn) = self.greet()? {
            return Ok(Some(conn));
        }
        if !spawn {
            return Ok(None);
        }
        self.start()?;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            match self.greet() {
                Ok(Some(conn)) => return Ok(Some(conn)),
                Ok(None) | Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => return Err(io::Error::other("the fuse keeper did not start")),
                Err(e) => return Err(e),
            }
        }
    }

    /// A greeted connection to a keeper of our protocol, or None when nobody listens (or the
    /// one listening was of another protocol and has been told to quit).
    fn greet(&self) -> io::Result<Option<OwnedFd>> {
        let Some(conn) = dial(&self.socket)? else {
            return Ok(None);
        };
        send_msg(
            conn.as_fd(),
            &encode(&[b"hello", PROTOCOL.as_bytes()]),
            None,
        )?;
        let (msg, _) = recv_msg(conn.as_fd())?;
        match decode(&msg).as_slice() {
            [b"hello", v] if *v == PROTOCOL.as_bytes() => Ok(Some(conn)),
            other => {
                let theirs = other
                    .get(1)
                    .map(|v| String::from_utf8_lossy(v).into_owned());
                tracing::warn!(
                    theirs = %crate::untrusted::clip(theirs.as_deref().unwrap_or("?")),
                    ours = PROTOCOL,
                    "the running fuse keeper speaks another protocol; its mounts are re-mounted, not resumed"
                );
                send_msg(conn.as_fd(), &encode(&[b"quit"]), None)?;
                // It unlinks its socket before it exits; wait for that (bounded).
                let deadline = Instant::now() + ANSWER_TIMEOUT;
                while self.socket.exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(None)
            }
        }
    }

    fn start(&self) -> io::Result<()> {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(&self.exe);
        // Named as the daemon in `ps`, not as /proc/self/exe.
        cmd.arg0("containerd-stargz-grpc")
            .arg(KEEPER_FLAG)
            .arg(&self.socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
        }
        let mut child = cmd.spawn()?;
        // The keeper detaches at once (it forks no further): reap it when it exits, so the
        // daemon never collects zombies. A thread per keeper start, and keepers start rarely.
        let _ = std::thread::Builder::new()
            .name("stargz-keeper-reap".into())
            .spawn(move || {
                let _ = child.wait();
            });
        tracing::info!(socket = %self.socket.display(), "started the fuse keeper");
        Ok(())
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("fuse keeper: {what}"))
}

fn encode(fields: &[&[u8]]) -> Vec<u8> {
    fields.join(&0u8)
}

fn decode(msg: &[u8]) -> Vec<&[u8]> {
    msg.split(|&b| b == 0).collect()
}

fn parse_pair(pair: &[u8]) -> Option<(u64, u32)> {
    let colon = pair.iter().position(|&b| b == b':')?;
    Some((parse_num(&pair[..colon])?, parse_num(&pair[colon + 1..])?))
}

fn parse_num<T: std::str::FromStr>(field: &[u8]) -> Option<T> {
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn unix_addr(path: &Path) -> io::Result<UnixAddr> {
    UnixAddr::new(path).map_err(io::Error::from)
}

fn seqpacket() -> io::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

/// Connects to `path`; None when nobody listens there.
fn dial(path: &Path) -> io::Result<Option<OwnedFd>> {
    let fd = seqpacket()?;
    let timeout = nix::sys::time::TimeVal::new(ANSWER_TIMEOUT.as_secs() as _, 0);
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
    socket::setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
    match socket::connect(fd.as_raw_fd(), &unix_addr(path)?) {
        Ok(()) => Ok(Some(fd)),
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn send_msg(sock: BorrowedFd<'_>, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    if msg.len() > MAX_MESSAGE {
        return Err(bad("message too long"));
    }
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = raw
        .as_ref()
        .map(|r| ControlMessage::ScmRights(r))
        .into_iter()
        .collect();
    let iov = [IoSlice::new(msg)];
    socket::sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// One message and the descriptor it carried, if any. A closed peer is an error.
fn recv_msg(sock: BorrowedFd<'_>) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (len, fds, truncated) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(r) = c {
                // SAFETY: the kernel just installed these descriptors in our table for us.
                fds.extend(r.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        let truncated = msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (msg.bytes, fds, truncated)
    };
    if len == 0 && fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "fuse keeper peer closed",
        ));
    }
    if truncated || fds.len() > 1 {
        return Err(bad("oversized message"));
    }
    buf.truncate(len);
    Ok((buf, fds.into_iter().next()))
}

/// `major:minor` of the mount at `mountpoint`, read from the mount table (not by `stat`: an
/// unserved FUSE mount would block it).
pub(crate) fn mount_dev(mountpoint: &Path) -> io::Result<Option<String>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(find_mount(&info, mountpoint).map(str::to_string))
}

/// `major:minor` of the topmost mount at `mountpoint` in `mountinfo`.
pub(crate) fn find_mount<'a>(mountinfo: &'a str, mountpoint: &Path) -> Option<&'a str> {
    mount_entries(mountinfo)
        .filter(|(_, mp)| mp == mountpoint)
        .map(|(dev, _)| dev)
        .last()
}

// ---------------------------------------------------------------------------------------------
// The keeper process
// ---------------------------------------------------------------------------------------------

struct Session {
    mountpoint: PathBuf,
    dev: String,
    fd: OwnedFd,
    backing: HashMap<u64, u32>,
}

struct KeeperState {
    sessions: Vec<Session>,
    clients: Vec<OwnedFd>,
}

/// Runs the keeper on `socket` until it holds nothing and nobody is connected. Returns at once
/// when another keeper already answers there.
pub fn run_keeper(socket_path: &Path) -> io::Result<()> {
    if dial(socket_path)?.is_some() {
        return Ok(());
    }
    // Nobody listens: whatever file is there is a leftover of a dead keeper.
    let _ = std::fs::remove_file(socket_path);
    let listener = seqpacket()?;
    {
        // The socket is the keeper's alone, whatever the umask it was started with.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let bound = socket::bind(listener.as_raw_fd(), &unix_addr(socket_path)?);
        nix::sys::stat::umask(old);
        bound?;
    }
    socket::listen(
        &listener,
        Backlog::new(MAX_CLIENTS as i32).map_err(io::Error::from)?,
    )?;
    let mountinfo = std::fs::File::open("/proc/self/mountinfo")?;
    let uid = nix::unistd::geteuid();
    let mut st = KeeperState {
        sessions: Vec::new(),
        clients: Vec::new(),
    };
    tracing::info!(socket = %socket_path.display(), "fuse keeper started");
    let result = loop {
        let idle = st.sessions.is_empty() && st.clients.is_empty();
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let pfd = |fd: RawFd, events: i16| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        fds.push(pfd(listener.as_raw_fd(), libc::POLLIN));
        fds.push(pfd(mountinfo.as_raw_fd(), libc::POLLPRI));
        fds.extend(st.clients.iter().map(|c| pfd(c.as_raw_fd(), libc::POLLIN)));
        // No events asked: only an error (the connection was aborted or unmounted) wakes us.
        fds.extend(st.sessions.iter().map(|s| pfd(s.fd.as_raw_fd(), 0)));
        let timeout = if idle {
            IDLE_EXIT.as_millis() as i32
        } else {
            -1
        };
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break Err(e);
        }
        if n == 0 && idle {
            break Ok(());
        }
        let nc = st.clients.len();
        // Dead connections first (positions refer to the vectors polled).
        let dead: Vec<usize> = fds[2 + nc..]
            .iter()
            .enumerate()
            .filter(|(_, p)| p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0)
            .map(|(i, _)| i)
            .collect();
        for i in dead.into_iter().rev() {
            let s = st.sessions.remove(i);
            tracing::info!(mountpoint = %s.mountpoint.display(), "fuse keeper: connection ended");
        }
        if fds[1].revents != 0 {
            prune_unmounted(&mut st.sessions);
        }
        let mut quit = false;
        let mut gone = Vec::new();
        for (i, p) in fds[2..2 + nc].iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            match serve_client(&mut st, i) {
                Ok(true) => {}
                Ok(false) => gone.push(i),
                Err(Quit) => {
                    quit = true;
                    break;
                }
            }
        }
        if quit {
            tracing::info!("fuse keeper: told to quit by a daemon of another protocol");
            break Ok(());
        }
        for i in gone.into_iter().rev() {
            st.clients.remove(i);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            accept_client(&listener, &mut st, uid);
        }
    };
    let _ = std::fs::remove_file(socket_path);
    tracing::info!(held = st.sessions.len(), "fuse keeper exits");
    result
}

struct Quit;

fn accept_client(listener: &OwnedFd, st: &mut KeeperState, uid: nix::unistd::Uid) {
    let fd = match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
        Err(e) => {
            tracing::warn!(error = %e, "fuse keeper: accept failed");
            return;
        }
    };
    let peer = socket::getsockopt(&fd, sockopt::PeerCredentials);
    match peer {
        Ok(c) if c.uid() == uid.as_raw() => {}
        _ => {
            tracing::warn!("fuse keeper: refused a client of another user");
            return;
        }
    }
    // A daemon that stops reading must not stall the keeper in a listing.
    let timeout = nix::sys::time::TimeVal::new(ANSWER_TIMEOUT.as_secs() as _, 0);
    if socket::setsockopt(&fd, sockopt::SendTimeout, &timeout).is_err() {
        return;
    }
    if st.clients.len() >= MAX_CLIENTS {
        tracing::warn!("fuse keeper: too many clients; refused one");
        return;
    }
    st.clients.push(fd);
}

/// Serves one message of client `i`. Ok(false): the client is gone (or misbehaved).
fn serve_client(st: &mut KeeperState, i: usize) -> Result<bool, Quit> {
    let client = st.clients[i].as_fd();
    let (msg, fd) = match recv_msg(client) {
        Ok(m) => m,
        Err(e) => {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                tracing::warn!(error = %e, "fuse keeper: dropped a client");
            }
            return Ok(false);
        }
    };
    let f = decode(&msg);
    let path = |b: &[u8]| PathBuf::from(OsStr::from_bytes(b));
    let find = |sessions: &mut Vec<Session>, mp: &[u8]| {
        let mp = path(mp);
        sessions.iter_mut().position(|s| s.mountpoint == mp)
    };
    let ok = match (f.as_slice(), fd) {
        ([b"hello", _], None) => {
            send_msg(client, &encode(&[b"hello", PROTOCOL.as_bytes()]), None).is_ok()
        }
        ([b"quit"], None) => return Err(Quit),
        ([b"put", mp, dev], Some(fd)) => {
            if let Some(j) = find(&mut st.sessions, mp) {
                st.sessions.remove(j);
            }
            if st.sessions.len() >= MAX_SESSIONS {
                tracing::warn!("fuse keeper: too many connections; not keeping another");
            } else {
                st.sessions.push(Session {
                    mountpoint: path(mp),
                    dev: String::from_utf8_lossy(dev).into_owned(),
                    fd,
                    backing: HashMap::new(),
                });
            }
            true
        }
        ([b"del", mp], None) => {
            if let Some(j) = find(&mut st.sessions, mp) {
                st.sessions.remove(j);
            }
            true
        }
        ([verb @ (b"open" | b"close"), mp, ino, id], None) => {
            match (find(&mut st.sessions, mp), parse_num(ino), parse_num(id)) {
                (Some(j), Some(ino), Some(id)) => {
                    let b = &mut st.sessions[j].backing;
                    if *verb == b"open" {
                        if b.len() < MAX_BACKING_IDS {
                            b.insert(ino, id);
                        }
                    } else if b.get(&ino) == Some(&id) {
                        b.remove(&ino);
                    }
                    true
                }
                (None, ..) => true,
                _ => false,
            }
        }
        ([b"list"], None) => list(client, &st.sessions).is_ok(),
        _ => false,
    };
    if !ok {
        tracing::warn!("fuse keeper: dropped a client that sent a bad message");
    }
    Ok(ok)
}

fn list(client: BorrowedFd<'_>, sessions: &[Session]) -> io::Result<()> {
    for s in sessions {
        let mp = s.mountpoint.as_os_str().as_bytes();
        send_msg(
            client,
            &encode(&[b"ent", mp, s.dev.as_bytes()]),
            Some(s.fd.as_fd()),
        )?;
        let pairs: Vec<String> = s
            .backing
            .iter()
            .map(|(i, id)| format!("{i}:{id}"))
            .collect();
        for part in pairs.chunks(IDS_PER_MESSAGE) {
            let mut fields: Vec<&[u8]> = vec![b"ids", mp];
            fields.extend(part.iter().map(|p| p.as_bytes()));
            send_msg(client, &encode(&fields), None)?;
        }
    }
    send_msg(client, &encode(&[b"end"]), None)
}

/// Lets go of the connections whose mount is no longer in the table (or is another mount now).
fn prune_unmounted(sessions: &mut Vec<Session>) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    sessions.retain(|s| {
        let mounted = mount_entries(&info).any(|(dev, mp)| dev == s.dev && mp == s.mountpoint);
        if !mounted {
            tracing::info!(mountpoint = %s.mountpoint.display(), "fuse keeper: mount gone");
        }
        mounted
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keeper in a thread of this process, a tmpfs standing for a layer mount, a pipe for
    /// its connection: handed over, listed with its backing ids, dropped once unmounted, and
    /// the keeper exits when idle. Needs root (mount).
    #[test]
    fn keeper_holds_lists_and_lets_go_of_unmounted_connections() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("keeper.sock");
        let mnt = dir.path().join("layer");
        std::fs::create_dir(&mnt).expect("mkdir");
        nix::mount::mount(
            Some("tmpfs"),
            &mnt,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount tmpfs");
        let keeper_sock = sock.clone();
        let keeper = std::thread::spawn(move || run_keeper(&keeper_sock));
        let client = Keeper::new(sock.clone(), "/nonexistent".into());
        assert!(
            (0..500).any(|_| {
                std::thread::sleep(Duration::from_millis(10));
                sock.exists()
            }),
            "the keeper listens"
        );
        let (rd, _wr) = nix::unistd::pipe().expect("pipe");
        let dev = mount_dev(&mnt).expect("mountinfo").expect("mounted");
        client.put(&mnt, &dev, rd.as_fd()).expect("put");
        client.backing(&mnt, 12, 3, true);
        client.backing(&mnt, 13, 4, true);
        client.backing(&mnt, 13, 4, false);
        let all = client.take_all().expect("list");
        assert_eq!(all.len(), 1);
        assert_eq!(
            (all[0].mountpoint.as_path(), all[0].dev.as_str()),
            (mnt.as_path(), dev.as_str())
        );
        assert_eq!(all[0].backing, vec![(12, 3)]);
        // A second client of another protocol version is answered with ours.
        let raw = dial(&sock).expect("dial").expect("listening");
        send_msg(raw.as_fd(), &encode(&[b"hello", b"0"]), None).expect("hello");
        let (msg, _) = recv_msg(raw.as_fd()).expect("answer");
        assert_eq!(decode(&msg), vec![&b"hello"[..], PROTOCOL.as_bytes()]);
        // A bad message costs its sender the connection, nobody else anything.
        send_msg(raw.as_fd(), b"put\0only-two", None).expect("send");
        assert!(recv_msg(raw.as_fd()).is_err(), "dropped");
        assert_eq!(client.take_all().expect("list").len(), 1);
        // Unmounted: the keeper lets go by itself.
        nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).expect("umount");
        assert!(
            (0..500).any(|_| {
                std::thread::sleep(Duration::from_millis(10));
                client.take_all().map(|a| a.is_empty()).unwrap_or(false)
            }),
            "the keeper still holds an unmounted connection"
        );
        drop(client);
        let started = Instant::now();
        keeper.join().expect("keeper thread").expect("keeper ran");
        assert!(started.elapsed() < IDLE_EXIT + Duration::from_secs(5));
        assert!(!sock.exists(), "the keeper removed its socket");
    }

    #[test]
    fn a_keeper_of_another_protocol_is_told_to_quit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("keeper.sock");
        // A stand-in for an older keeper: answers hello with version 0, then expects quit.
        let listener = seqpacket().expect("socket");
        socket::bind(listener.as_raw_fd(), &unix_addr(&sock).expect("addr")).expect("bind");
        socket::listen(&listener, Backlog::new(1).expect("backlog")).expect("listen");
        let old = std::thread::spawn(move || {
            // SAFETY: accept returned a new descriptor nothing else owns.
            let c = unsafe {
                OwnedFd::from_raw_fd(socket::accept(listener.as_raw_fd()).expect("accept"))
            };
            let (hello, _) = recv_msg(c.as_fd()).expect("hello");
            assert_eq!(decode(&hello)[0], b"hello");
            send_msg(c.as_fd(), &encode(&[b"hello", b"0"]), None).expect("answer");
            let (quit, _) = recv_msg(c.as_fd()).expect("quit");
            quit
        });
        let client = Keeper::new(sock.clone(), "/nonexistent".into());
        // No keeper of ours: nothing to take, and the old one was told to quit.
        let sock2 = sock.clone();
        let remover = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let _ = std::fs::remove_file(sock2);
        });
        assert!(client.take_all().expect("take").is_empty());
        assert_eq!(old.join().expect("old keeper"), b"quit");
        remover.join().expect("remover");
    }

    #[test]
    fn finds_the_device_of_a_mountpoint_with_escapes() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
                    90 22 0:77 / /r/snap\\0401/fs ro - fuse.stargz stargz ro\n";
        assert_eq!(find_mount(info, Path::new("/r/snap 1/fs")), Some("0:77"));
        assert_eq!(find_mount(info, Path::new("/r/snap")), None);
    }

    #[test]
    fn messages_round_trip_and_pairs_parse() {
        let m = encode(&[b"put", b"/a b", b"0:5"]);
        assert_eq!(decode(&m), vec![&b"put"[..], b"/a b", b"0:5"]);
        assert_eq!(parse_pair(b"12:3"), Some((12, 3)));
        assert_eq!(parse_pair(b"12"), None);
        assert_eq!(parse_pair(b"x:3"), None);
    }
}
