//! Test helpers for the `fs` tests: tar → eStargz through `estargz::builder`, directory trees with every file kind, metadata comparison, fault-injecting sources and
//! mount guards.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use stargz::LayerSource;

/// Writes an eStargz blob from a tar stream with the crate's builder (Go's layout). With
/// `landmark_after = Some(n)`, the regular files among the first `n` tar entries are
/// prioritized, so a `.prefetch.landmark` follows them; otherwise Go's `.no.prefetch.landmark`
/// is written. Returns the TOC JSON digest.
pub fn estargz_from_tar(
    tar_bytes: &[u8],
    chunk_size: u64,
    landmark_after: Option<usize>,
    out: &mut Vec<u8>,
) -> Result<String> {
    blob_from_tar(
        tar_bytes,
        chunk_size,
        landmark_after,
        stargz::estargz::Format::Gzip,
        out,
    )
}

/// [`estargz_from_tar`] in either format (zstd:chunked at zstd level 3, Go's default).
pub fn blob_from_tar(
    tar_bytes: &[u8],
    chunk_size: u64,
    landmark_after: Option<usize>,
    format: stargz::estargz::Format,
    out: &mut Vec<u8>,
) -> Result<String> {
    let mut prioritized_files = Vec::new();
    if let Some(n) = landmark_after {
        for ent in tar::Archive::new(tar_bytes).entries()?.take(n) {
            let ent = ent?;
            if ent.header().entry_type() == tar::EntryType::Regular {
                prioritized_files.push(String::from_utf8(ent.path_bytes().into_owned())?);
            }
        }
    }
    let opts = stargz::estargz::BuildOptions {
        chunk_size,
        format,
        compression_level: if format == stargz::estargz::Format::Gzip {
            6
        } else {
            3
        },
        prioritized_files,
        threads: 1,
        ..Default::default()
    };
    Ok(stargz::estargz::build(tar_bytes, &mut *out, &opts)?.toc_digest)
}

/// `tar` of a directory with GNU tar (hardlinks, devices, fifos, xattrs, numeric owners).
/// Truncates the tree's mtimes to whole seconds first (see [`truncate_mtimes`]), so the
/// mounted layer and the source compare equal.
pub fn tar_dir(dir: &Path) -> Result<Vec<u8>> {
    truncate_mtimes(dir)?;
    let out = Command::new("tar")
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--sort=name",
            "-C",
        ])
        .arg(dir)
        .args(["-cf", "-", "."])
        .output()
        .context("running tar (GNU tar is required)")?;
    ensure!(
        out.status.success(),
        "tar failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let n = CString::new(name)?;
    // SAFETY: valid C strings and a valid buffer for the call's duration.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    ensure!(
        r == 0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// All xattrs of a path (not following symlinks).
pub fn xattrs(path: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: buffer pointer/len are valid.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    ensure!(
        n >= 0,
        "listxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let mut out = BTreeMap::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
    {
        let cname = CString::new(name)?;
        let mut val = vec![0u8; 64 << 10];
        // SAFETY: as above.
        let m = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                cname.as_ptr(),
                val.as_mut_ptr().cast(),
                val.len(),
            )
        };
        ensure!(
            m >= 0,
            "getxattr {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        val.truncate(m as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), val);
    }
    Ok(out)
}

pub fn mknod(path: &Path, kind: libc::mode_t, major: u32, minor: u32) -> Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: valid C string.
    let r = unsafe { libc::mknod(p.as_ptr(), kind | 0o640, libc::makedev(major, minor)) };
    ensure!(
        r == 0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(())
}

pub fn lchown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("lchown {}", path.display()))
}

pub fn set_mtime(path: &Path, secs: i64) -> Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let ts = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    ];
    // SAFETY: valid C string and timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
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
    let st = Command::new("cp")
        .arg("-a")
        .arg("/etc")
        .arg(root.join("etc"))
        .status()?;
    ensure!(st.success(), "cp -a /etc");
    let d = root.join("usr/lib/app");
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("big.bin"), noise(9 * (1 << 20) + 12345, 7))?;
    std::fs::write(d.join("empty"), b"")?;
    std::fs::write(d.join("small.txt"), b"hello stargz\n")?;
    for i in 0..40 {
        std::fs::write(
            d.join(format!("mod{i:02}.py")),
            format!("# module {i}\n").repeat(50 + i),
        )?;
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
    let mut a: Vec<_> = std::fs::read_dir(src)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    let mut b: Vec<_> = std::fs::read_dir(mnt)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("readdir {}", mnt.display()))?;
    a.sort();
    b.sort();
    ensure!(
        a == b,
        "entries of {} differ:\n src {a:?}\n mnt {b:?}",
        mnt.display()
    );
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
    ensure!(
        sm.mode() == mm.mode(),
        "{}: mode {:o} != {:o}",
        ctx(),
        mm.mode(),
        sm.mode()
    );
    ensure!(
        (sm.uid(), sm.gid()) == (mm.uid(), mm.gid()),
        "{}: owner",
        ctx()
    );
    ensure!(
        sm.mtime() == mm.mtime(),
        "{}: mtime {} != {}",
        ctx(),
        mm.mtime(),
        sm.mtime()
    );
    ensure!(
        xattrs(s)? == xattrs(m)?,
        "{}: xattrs {:?} != {:?}",
        ctx(),
        xattrs(m)?,
        xattrs(s)?
    );
    let ft = sm.file_type();
    if ft.is_symlink() {
        ensure!(
            std::fs::read_link(s)? == std::fs::read_link(m)?,
            "{}: link target",
            ctx()
        );
        ensure!(sm.size() == mm.size(), "{}: symlink size", ctx());
    } else if ft.is_file() {
        ensure!(
            sm.size() == mm.size(),
            "{}: size {} != {}",
            ctx(),
            mm.size(),
            sm.size()
        );
        ensure!(
            sm.nlink() == mm.nlink(),
            "{}: nlink {} != {}",
            ctx(),
            mm.nlink(),
            sm.nlink()
        );
        ensure!(
            mm.blocks() == sm.size().div_ceil(4096) * 8,
            "{}: st_blocks {}",
            ctx(),
            mm.blocks()
        );
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
/// Every fetch sleeps 0.5 s, then panics (a bug in the fetch path).
pub const PANIC: u8 = 4;

impl FaultySource {
    pub fn new(blob: Vec<u8>) -> Arc<Self> {
        Arc::new(FaultySource {
            blob,
            mode: AtomicU8::new(HEALTHY),
            fetches: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        })
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
        if self.mode.load(Ordering::SeqCst) == PANIC {
            std::thread::sleep(std::time::Duration::from_millis(500));
            panic!("injected fetch panic");
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
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root and /dev/fuse (CI runs as root)"
    );
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

/// A blob written by hand: one file whose gzip member is followed, inside the file's
/// compressed range, by `garbage`; `tail` is appended to the file's bytes inside the same
/// deflate stream (past the chunk, so never part of the file). Returns (blob, TOC digest).
pub fn hand_made_blob(content: &[u8], tail: &[u8], garbage: &[u8]) -> Result<(Vec<u8>, String)> {
    use std::io::Write as _;
    let gzip = |data: &[u8]| -> Result<Vec<u8>> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(data)?;
        Ok(gz.finish()?)
    };
    let mut blob = gzip(&[content, tail].concat())?;
    blob.extend_from_slice(garbage);
    let toc_offset = blob.len() as u64;
    let digest = stargz::estargz::sha256_digest(content);
    let json = serde_json::to_vec(&serde_json::json!({"version": 1, "entries": [
        {"name": "f", "type": "reg", "size": content.len(), "mode": 420, "offset": 0, "digest": digest, "chunkDigest": digest}
    ]}))?;
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(json.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "stargz.index.json", json.as_slice())?;
    blob.extend_from_slice(&gzip(&tar.into_inner()?)?);
    blob.extend_from_slice(&stargz::estargz::footer_bytes(toc_offset));
    Ok((blob, stargz::estargz::sha256_digest(&json)))
}

/// [`make_rootfs`] under `dir/src` as an eStargz blob with `chunk_size` chunks: returns the
/// source tree, the blob, its TOC digest and its diff id (sha256 of the uncompressed tar).
pub fn rootfs_estargz(dir: &Path, chunk_size: u64) -> Result<(PathBuf, Vec<u8>, String, String)> {
    use sha2::Digest as _;
    use std::io::Read as _;
    let src = dir.join("src");
    std::fs::create_dir(&src)?;
    make_rootfs(&src)?;
    let mut blob = Vec::new();
    let toc_digest = estargz_from_tar(&tar_dir(&src)?, chunk_size, None, &mut blob)?;
    let mut diff = Vec::new();
    flate2::read::MultiGzDecoder::new(blob.as_slice()).read_to_end(&mut diff)?;
    let diff_id = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&diff)));
    Ok((src, blob, toc_digest, diff_id))
}

/// Drops the kernel's page cache, so the next reads reach the FUSE daemon.
pub fn drop_page_cache() -> Result<()> {
    std::fs::write("/proc/sys/vm/drop_caches", b"1").context("drop_caches")
}

/// The labels the snapshotter hands `LayerManager::mount` for a stargz layer.
pub fn stargz_labels(
    reference: &str,
    digest: &str,
    toc_digest: &str,
) -> std::collections::BTreeMap<String, String> {
    [
        ("containerd.io/snapshot/remote/stargz.reference", reference),
        ("containerd.io/snapshot/remote/stargz.digest", digest),
        ("containerd.io/snapshot/stargz/toc.digest", toc_digest),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}
