//! Test helpers for the `fs` tests: a small eStargz writer (tar → eStargz, Go's layout),
//! directory trees with every file kind, metadata comparison, fault-injecting sources and
//! mount guards.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest, Sha256};
use stargz::estargz::{EntryType, Toc, TocEntry};
use stargz::fs::LayerSource;

/// Writes an eStargz blob from a tar stream, laid out as Go's writer does: every chunk of a
/// regular file starts a new gzip member; headers travel in the preceding member; the TOC is
/// the last member, followed by the 51-byte footer. Returns the TOC JSON digest.
pub fn estargz_from_tar(tar_bytes: &[u8], chunk_size: u64, landmark_after: Option<usize>, out: &mut Vec<u8>) -> Result<String> {
    let mut w = MemberWriter { out, gz: None };
    let mut toc = Toc { version: 1, entries: Vec::new() };
    let mut ar = tar::Archive::new(tar_bytes);
    for (count, ent) in ar.entries()?.enumerate() {
        let mut ent = ent?;
        if landmark_after == Some(count) {
            add_landmark(&mut w, &mut toc)?;
        }
        let h = ent.header().clone();
        let name = String::from_utf8(ent.path_bytes().into_owned())?;
        let mut xattrs = BTreeMap::new();
        if let Some(exts) = ent.pax_extensions()? {
            for e in exts {
                let e = e?;
                if let Some(k) = e.key()?.strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(k.to_string(), e.value_bytes().to_vec());
                }
            }
        }
        let kind = match h.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryType::Reg,
            tar::EntryType::Directory => EntryType::Dir,
            tar::EntryType::Symlink => EntryType::Symlink,
            tar::EntryType::Link => EntryType::Hardlink,
            tar::EntryType::Char => EntryType::Char,
            tar::EntryType::Block => EntryType::Block,
            tar::EntryType::Fifo => EntryType::Fifo,
            other => bail!("unsupported tar entry {other:?}"),
        };
        let link = ent.link_name_bytes().map(|l| String::from_utf8_lossy(&l).into_owned()).unwrap_or_default();
        let mut e = TocEntry {
            name: name.clone(),
            kind,
            mod_time: rfc3339(h.mtime()?),
            link_name: link,
            mode: h.mode()? as i64,
            uid: h.uid()? as u32,
            gid: h.gid()? as u32,
            dev_major: h.device_major()?.unwrap_or(0),
            dev_minor: h.device_minor()?.unwrap_or(0),
            xattrs,
            ..Default::default()
        };
        w.member()?.write_all(h.as_bytes())?;
        if kind != EntryType::Reg {
            toc.entries.push(e);
            continue;
        }
        let size = h.size()?;
        e.size = size as i64;
        let mut data = Vec::with_capacity(size as usize);
        ent.read_to_end(&mut data)?;
        e.digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        let mut off = 0u64;
        let mut first = true;
        while off < size {
            let n = chunk_size.min(size - off);
            w.close()?;
            let mut c = if first { e.clone() } else { TocEntry { name: name.clone(), kind: EntryType::Chunk, ..Default::default() } };
            c.offset = w.out.len() as i64;
            c.chunk_offset = off as i64;
            if n == chunk_size {
                c.chunk_size = n as i64;
            }
            let bytes = &data[off as usize..(off + n) as usize];
            c.chunk_digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
            w.member()?.write_all(bytes)?;
            toc.entries.push(c);
            off += n;
            first = false;
        }
        if size == 0 {
            toc.entries.push(e);
        }
        let pad = (512 - size % 512) % 512;
        w.member()?.write_all(&vec![0u8; pad as usize])?;
    }
    w.close()?;
    let toc_offset = w.out.len() as u64;
    let json = serde_json::to_vec(&toc)?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&json)));
    let mut th = tar::Header::new_gnu();
    th.set_path("stargz.index.json")?;
    th.set_size(json.len() as u64);
    th.set_mode(0o644);
    th.set_entry_type(tar::EntryType::Regular);
    th.set_cksum();
    {
        let m = w.member()?;
        m.write_all(th.as_bytes())?;
        m.write_all(&json)?;
        m.write_all(&vec![0u8; (512 - json.len() % 512) % 512])?;
        m.write_all(&[0u8; 1024])?;
    }
    w.close()?;
    w.out.extend_from_slice(&footer(toc_offset));
    Ok(digest)
}

fn add_landmark(w: &mut MemberWriter<'_>, toc: &mut Toc) -> Result<()> {
    w.close()?;
    let e = TocEntry {
        name: ".prefetch.landmark".into(),
        kind: EntryType::Reg,
        size: 1,
        offset: w.out.len() as i64,
        mode: 0o644,
        digest: format!("sha256:{}", hex::encode(Sha256::digest([0x0f]))),
        chunk_digest: format!("sha256:{}", hex::encode(Sha256::digest([0x0f]))),
        ..Default::default()
    };
    w.member()?.write_all(&[0x0f])?;
    toc.entries.push(e);
    Ok(())
}

struct MemberWriter<'a> {
    out: &'a mut Vec<u8>,
    gz: Option<GzEncoder<Vec<u8>>>,
}

impl MemberWriter<'_> {
    fn member(&mut self) -> Result<&mut GzEncoder<Vec<u8>>> {
        if self.gz.is_none() {
            self.gz = Some(GzEncoder::new(Vec::new(), Compression::new(6)));
        }
        self.gz.as_mut().context("member")
    }
    fn close(&mut self) -> Result<()> {
        if let Some(gz) = self.gz.take() {
            self.out.extend_from_slice(&gz.finish()?);
        }
        Ok(())
    }
}

fn footer(toc_offset: u64) -> Vec<u8> {
    let mut f = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0];
    f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(f.len(), 51);
    f
}

fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `tar` of a directory with GNU tar (hardlinks, devices, fifos, xattrs, numeric owners).
pub fn tar_dir(dir: &Path) -> Result<Vec<u8>> {
    let out = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "--sort=name", "-C"])
        .arg(dir)
        .args(["-cf", "-", "."])
        .output()
        .context("running tar (GNU tar is required)")?;
    ensure!(out.status.success(), "tar failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(out.stdout)
}

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let n = CString::new(name)?;
    // SAFETY: valid C strings and a valid buffer for the call's duration.
    let r = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    ensure!(r == 0, "setxattr {name} on {}: {}", path.display(), std::io::Error::last_os_error());
    Ok(())
}

/// All xattrs of a path (not following symlinks).
pub fn xattrs(path: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: buffer pointer/len are valid.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    ensure!(n >= 0, "listxattr {}: {}", path.display(), std::io::Error::last_os_error());
    let mut out = BTreeMap::new();
    for name in names[..n as usize].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let cname = CString::new(name)?;
        let mut val = vec![0u8; 64 << 10];
        // SAFETY: as above.
        let m = unsafe { libc::lgetxattr(p.as_ptr(), cname.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        ensure!(m >= 0, "getxattr {}: {}", path.display(), std::io::Error::last_os_error());
        val.truncate(m as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), val);
    }
    Ok(out)
}

pub fn mknod(path: &Path, kind: libc::mode_t, major: u32, minor: u32) -> Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: valid C string.
    let r = unsafe { libc::mknod(p.as_ptr(), kind | 0o640, libc::makedev(major, minor)) };
    ensure!(r == 0, "mknod {}: {}", path.display(), std::io::Error::last_os_error());
    Ok(())
}

pub fn lchown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).with_context(|| format!("lchown {}", path.display()))
}

pub fn set_mtime(path: &Path, secs: i64) -> Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let ts = [libc::timespec { tv_sec: secs, tv_nsec: 0 }, libc::timespec { tv_sec: secs, tv_nsec: 0 }];
    // SAFETY: valid C string and timespec array.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    ensure!(r == 0, "utimensat {}", path.display());
    Ok(())
}

/// Deterministic pseudo-random bytes (xorshift), compressible only a little.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A rootfs-like tree: a copy of /etc plus every file kind, odd modes, owners, xattrs,
/// hardlinks, a multi-chunk file and empty files.
pub fn make_rootfs(root: &Path) -> Result<()> {
    let st = Command::new("cp").arg("-a").arg("/etc").arg(root.join("etc")).status()?;
    ensure!(st.success(), "cp -a /etc");
    let d = root.join("usr/lib/app");
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("big.bin"), noise(9 * (1 << 20) + 12345, 7))?;
    std::fs::write(d.join("empty"), b"")?;
    std::fs::write(d.join("small.txt"), b"hello stargz\n")?;
    for i in 0..40 {
        std::fs::write(d.join(format!("mod{i:02}.py")), format!("# module {i}\n").repeat(50 + i))?;
    }
    std::fs::hard_link(d.join("small.txt"), d.join("small-link.txt"))?;
    std::fs::hard_link(d.join("big.bin"), root.join("usr/big-hardlink"))?;
    std::os::unix::fs::symlink("small.txt", d.join("rel-link"))?;
    std::os::unix::fs::symlink("/usr/lib/app/big.bin", root.join("abs-link"))?;
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling"))?;
    let dev = root.join("dev");
    std::fs::create_dir(&dev)?;
    mknod(&dev.join("null"), libc::S_IFCHR, 1, 3)?;
    mknod(&dev.join("loop0"), libc::S_IFBLK, 7, 0)?;
    mknod(&dev.join("fifo"), libc::S_IFIFO, 0, 0)?;
    std::fs::write(root.join("secret"), b"root only\n")?;
    std::fs::set_permissions(root.join("secret"), std::fs::Permissions::from_mode(0o600))?;
    std::fs::write(root.join("public"), b"everyone\n")?;
    std::fs::set_permissions(root.join("public"), std::fs::Permissions::from_mode(0o644))?;
    std::fs::write(root.join("suid"), b"#!/bin/true\n")?;
    std::fs::set_permissions(root.join("suid"), std::fs::Permissions::from_mode(0o4755))?;
    std::fs::create_dir(root.join("sticky"))?;
    std::fs::set_permissions(root.join("sticky"), std::fs::Permissions::from_mode(0o1777))?;
    std::fs::write(root.join("owned"), b"owned by 1234:5678\n")?;
    lchown(&root.join("owned"), 1234, 5678)?;
    set_xattr(&root.join("owned"), "user.color", b"blue")?;
    set_xattr(&root.join("owned"), "trusted.secret", b"\x00\x01binary")?;
    set_xattr(&d, "user.dir", b"yes")?;
    set_mtime(&root.join("owned"), 1_000_000_000)?;
    set_mtime(&root.join("dangling"), 1_234_567_890)?;
    Ok(())
}

/// Compares two trees entry by entry: kind, mode, owner, size, mtime, rdev, nlink (files),
/// xattrs, link targets and content. Returns how many paths were compared.
pub fn compare_trees(src: &Path, mnt: &Path) -> Result<usize> {
    let mut n = 0;
    compare_dir(src, mnt, &mut n)?;
    Ok(n)
}

fn compare_dir(src: &Path, mnt: &Path, n: &mut usize) -> Result<()> {
    let mut a: Vec<_> = std::fs::read_dir(src)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    let mut b: Vec<_> = std::fs::read_dir(mnt)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("readdir {}", mnt.display()))?;
    a.sort();
    b.sort();
    ensure!(a == b, "entries of {} differ:\n src {a:?}\n mnt {b:?}", mnt.display());
    for name in a {
        let (s, m) = (src.join(&name), mnt.join(&name));
        compare_one(&s, &m).with_context(|| format!("comparing {}", m.display()))?;
        *n += 1;
        if std::fs::symlink_metadata(&s)?.is_dir() {
            compare_dir(&s, &m, n)?;
        }
    }
    Ok(())
}

fn compare_one(s: &Path, m: &Path) -> Result<()> {
    let (sm, mm) = (std::fs::symlink_metadata(s)?, std::fs::symlink_metadata(m)?);
    let ctx = || m.display().to_string();
    ensure!(sm.mode() == mm.mode(), "{}: mode {:o} != {:o}", ctx(), mm.mode(), sm.mode());
    ensure!((sm.uid(), sm.gid()) == (mm.uid(), mm.gid()), "{}: owner", ctx());
    ensure!(sm.mtime() == mm.mtime(), "{}: mtime {} != {}", ctx(), mm.mtime(), sm.mtime());
    ensure!(xattrs(s)? == xattrs(m)?, "{}: xattrs {:?} != {:?}", ctx(), xattrs(m)?, xattrs(s)?);
    let ft = sm.file_type();
    if ft.is_symlink() {
        ensure!(std::fs::read_link(s)? == std::fs::read_link(m)?, "{}: link target", ctx());
        ensure!(sm.size() == mm.size(), "{}: symlink size", ctx());
    } else if ft.is_file() {
        ensure!(sm.size() == mm.size(), "{}: size {} != {}", ctx(), mm.size(), sm.size());
        ensure!(sm.nlink() == mm.nlink(), "{}: nlink {} != {}", ctx(), mm.nlink(), sm.nlink());
        ensure!(mm.blocks() == sm.size().div_ceil(4096) * 8, "{}: st_blocks {}", ctx(), mm.blocks());
        let (a, b) = (std::fs::read(s)?, std::fs::read(m)?);
        ensure!(a == b, "{}: content differs", ctx());
    } else if !ft.is_dir() {
        ensure!(sm.rdev() == mm.rdev(), "{}: rdev", ctx());
    }
    Ok(())
}

/// A blob in memory whose behaviour tests switch at run time.
pub struct FaultySource {
    pub blob: Vec<u8>,
    /// 0 = healthy, 1 = every fetch fails, 2 = flips one byte in every fetched range.
    pub mode: AtomicU8,
    pub fetches: AtomicU64,
    pub bytes: AtomicU64,
}

pub const HEALTHY: u8 = 0;
pub const DOWN: u8 = 1;
pub const CORRUPT: u8 = 2;
/// Every fetch first sleeps 3 s (a stalled registry).
pub const SLOW: u8 = 3;

impl FaultySource {
    pub fn new(blob: Vec<u8>) -> Arc<Self> {
        Arc::new(FaultySource { blob, mode: AtomicU8::new(HEALTHY), fetches: AtomicU64::new(0), bytes: AtomicU64::new(0) })
    }
    pub fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

impl LayerSource for FaultySource {
    fn size(&self) -> u64 {
        self.blob.len() as u64
    }
    fn fetch(&self, offset: u64, len: u64, sink: &mut (dyn Write + Send)) -> std::io::Result<()> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        self.bytes.fetch_add(len, Ordering::SeqCst);
        let range = self
            .blob
            .get(offset as usize..(offset + len) as usize)
            .ok_or_else(|| std::io::Error::other("range past end"))?;
        if self.mode.load(Ordering::SeqCst) == SLOW {
            std::thread::sleep(std::time::Duration::from_secs(3));
        }
        match self.mode.load(Ordering::SeqCst) {
            DOWN => Err(std::io::Error::other("registry down")),
            CORRUPT => {
                // Flip bits inside deflate data of every 4 KiB block: decoders may still succeed
                // with wrong bytes, which only the chunk digest can catch.
                let mut v = range.to_vec();
                for i in (40..v.len()).step_by(4096) {
                    v[i] ^= 0x01;
                }
                sink.write_all(&v)
            }
            _ => {
                for part in range.chunks(7919) {
                    sink.write_all(part)?;
                }
                Ok(())
            }
        }
    }
}

/// Unmounts a path lazily on drop (overlay mounts and anything else a test mounts itself).
pub struct UmountGuard(pub PathBuf);

impl Drop for UmountGuard {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

pub fn require_root() {
    assert!(nix::unistd::geteuid().is_root(), "this test needs root and /dev/fuse (CI runs as root)");
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
}

/// Sets every path's mtime to its whole second: eStargz TOCs hold whole seconds, rounded as Go's
/// `formatModtime` does, so sub-second source mtimes would differ by one.
pub fn truncate_mtimes(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let md = std::fs::symlink_metadata(&p)?;
        if md.is_dir() {
            truncate_mtimes(&p)?;
        }
        set_mtime(&p, md.mtime())?;
    }
    set_mtime(dir, std::fs::symlink_metadata(dir)?.mtime())
}
