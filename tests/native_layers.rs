//! Fully fetched layers in their native form (issue 16), with real containerd 1.6, runc and a
//! registry: once the daemon has fetched a lazily pulled image whole, each layer gets a plain
//! directory tree, and
//! - the tree equals the layer's FUSE mount entry for entry: type, mode (setuid included),
//!   owner, size, times, device numbers, symlink targets, xattrs, bytes and hardlink groups;
//! - overlayfs sees the same merged tree on the trees as on the FUSE mounts (whiteouts and
//!   opaque directories of the upper layer hide the lower layer's entries in both), and as on
//!   containerd's own overlayfs unpack of the same layers as gzip;
//! - a container started from then on has the trees, not the FUSE mounts, as its `lowerdir`s
//!   (checked in the mount table) and reads the right bytes;
//! - removing the image removes the trees with the caches.
//!
//! Needs root (containerd, FUSE, overlayfs). Every process and mount is cleaned up on drop.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{estargz_layer, gzip, layer_tar, push_image, sha256_digest, tools_layer, wait_until};
use common::{Layer, LayerEntry, StargzBed, MEDIA_TYPE_LAYER_GZIP};
use sha2::{Digest, Sha256};

/// A tar entry header with the given type, mode and owner.
fn header(kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_size(size);
    h.set_mtime(1_650_000_000);
    h
}

fn pseudo_random(len: usize, mut x: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The upper layer: every kind of entry a layer can hold, and the whiteout and opaque markers
/// that hide parts of the lower layer.
fn upper_tar() -> Vec<u8> {
    use tar::EntryType as T;
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, p: &str, mode, uid| {
        let mut h = header(T::Directory, mode, uid, 0);
        b.append_data(&mut h, p, std::io::empty()).expect("dir");
    };
    dir(&mut b, "srv/", 0o750, 0);
    dir(&mut b, "srv/deep/", 0o755, 0);
    dir(&mut b, "srv/deep/a/", 0o700, 1000);
    dir(&mut b, "srv/deep/a/b/", 0o1777, 0);
    dir(&mut b, "opq/", 0o755, 0);
    let file = |b: &mut tar::Builder<Vec<u8>>, p: &str, mode, uid, data: &[u8]| {
        let mut h = header(T::Regular, mode, uid, data.len() as u64);
        b.append_data(&mut h, p, data).expect("file");
    };
    file(&mut b, "srv/owned", 0o640, 1000, b"owned by 1000\n");
    file(&mut b, "srv/suid", 0o4755, 0, b"#!/bin/sh\necho suid\n");
    file(&mut b, "srv/empty", 0o600, 0, b"");
    // Several chunks (the builder's chunks are 4 MiB).
    file(&mut b, "srv/big", 0o644, 0, &pseudo_random(9 << 20, 7));
    file(&mut b, "srv/deep/a/b/leaf", 0o444, 0, b"leaf\n");
    file(&mut b, "opq/new", 0o644, 0, b"only in the upper layer\n");
    file(&mut b, "opq/.wh..wh..opq", 0o644, 0, b"");
    file(&mut b, ".wh.gone", 0o644, 0, b"");
    let mut h = header(T::Regular, 0o644, 0, 6);
    b.append_pax_extensions([("SCHILY.xattr.user.note", &b"hello"[..])])
        .expect("pax");
    b.append_data(&mut h, "srv/xattr", &b"xattr\n"[..])
        .expect("xattr file");
    let mut h = header(T::Link, 0o640, 1000, 0);
    b.append_link(&mut h, "srv/hard", "srv/owned")
        .expect("hardlink");
    let mut h = header(T::Symlink, 0o777, 0, 0);
    b.append_link(&mut h, "srv/link", "owned").expect("symlink");
    let mut h = header(T::Symlink, 0o777, 0, 0);
    b.append_link(&mut h, "srv/dangling", "/nowhere/at/all")
        .expect("symlink");
    let mut h = header(T::Fifo, 0o620, 0, 0);
    b.append_data(&mut h, "srv/fifo", std::io::empty())
        .expect("fifo");
    let mut h = header(T::Char, 0o666, 0, 0);
    h.set_device_major(1).expect("major");
    h.set_device_minor(3).expect("minor");
    b.append_data(&mut h, "srv/null", std::io::empty())
        .expect("char device");
    b.into_inner().expect("tar")
}

/// The lower layer: what the upper one hides, and files it leaves alone.
fn lower_entries() -> Vec<LayerEntry> {
    vec![
        LayerEntry::file("gone", "deleted by the upper layer's whiteout\n"),
        LayerEntry::file("opq/old", "hidden by the upper layer's opaque marker\n"),
        LayerEntry::file("kept/file", "still here\n"),
    ]
}

/// What one path looks like, everything but its inode number and link count.
#[derive(Debug, PartialEq, Eq)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    rdev: u64,
    target: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
    sha: Option<String>,
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).expect("path");
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: `c` is NUL-terminated, `names` is a writable buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", p.display());
    let mut out = BTreeMap::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let cn = CString::new(name).expect("name");
        let mut v = vec![0u8; 64 << 10];
        // SAFETY: as above; `cn` is NUL-terminated.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(m >= 0, "lgetxattr {}", p.display());
        v.truncate(m as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    out
}

/// Every path below `root` (relative) with its metadata, inode and link count.
fn walk(root: &Path) -> BTreeMap<PathBuf, (Meta, u64, u64)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let p = root.join(&rel);
        let md = std::fs::symlink_metadata(&p).expect("lstat");
        let ft = md.file_type();
        let sha = ft.is_file().then(|| {
            let data = std::fs::read(&p).expect("read");
            hex::encode(Sha256::digest(&data))
        });
        let meta = Meta {
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            size: if ft.is_dir() { 0 } else { md.size() },
            mtime: (md.mtime(), md.mtime_nsec()),
            rdev: md.rdev(),
            target: ft
                .is_symlink()
                .then(|| std::fs::read_link(&p).expect("readlink")),
            xattrs: xattrs(&p),
            sha,
        };
        if ft.is_dir() {
            for e in std::fs::read_dir(&p).expect("readdir") {
                todo.push(rel.join(e.expect("entry").file_name()));
            }
        }
        out.insert(rel, (meta, md.ino(), md.nlink()));
    }
    out
}

/// Paths sharing an inode, as sets (hardlink groups of more than one name).
fn link_groups(tree: &BTreeMap<PathBuf, (Meta, u64, u64)>) -> BTreeSet<Vec<PathBuf>> {
    let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    for (p, (_, ino, _)) in tree {
        by_ino.entry(*ino).or_default().push(p.clone());
    }
    by_ino.into_values().filter(|g| g.len() > 1).collect()
}

fn assert_same_tree(fuse: &Path, native: &Path) {
    let a = walk(fuse);
    let b = walk(native);
    let paths_a: BTreeSet<_> = a.keys().collect();
    let paths_b: BTreeSet<_> = b.keys().collect();
    assert_eq!(
        paths_a,
        paths_b,
        "{} vs {}",
        fuse.display(),
        native.display()
    );
    for (p, (ma, _, nla)) in &a {
        let (mb, _, nlb) = &b[p];
        assert_eq!(ma, mb, "{} differs", p.display());
        // A regular file of the tree is also its cache file: one link more. (Directories:
        // the FUSE mount does not count subdirectories, a plain tree does.)
        let kind = ma.mode & libc::S_IFMT;
        let extra = u64::from(kind == libc::S_IFREG && ma.size > 0);
        if kind != libc::S_IFDIR {
            assert_eq!(nla + extra, *nlb, "link count of {}", p.display());
        }
    }
    assert_eq!(link_groups(&a), link_groups(&b), "hardlink groups");
}

/// A read-only overlay of `lowers` (topmost first) at `target`.
fn overlay(lowers: &[PathBuf], target: &Path) {
    std::fs::create_dir_all(target).expect("mkdir");
    let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let out = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={}", lower.join(":")))
        .arg(target)
        .output()
        .expect("mount");
    assert!(
        out.status.success(),
        "mount overlay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Unmounts what it was given when dropped (also when an assertion fails).
struct Unmount(Vec<PathBuf>);
impl Drop for Unmount {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The FUSE layer mounts under `root`, bottom layer first (snapshot ids grow upwards).
fn layer_mounts(root: &Path) -> Vec<PathBuf> {
    let mut m: Vec<(u64, PathBuf)> = common::mounts_under(root)
        .into_iter()
        .filter_map(|p| {
            let id = p.parent()?.file_name()?.to_str()?.parse().ok()?;
            (p.file_name()? == "fs").then_some((id, p))
        })
        .collect();
    m.sort();
    m.into_iter().map(|(_, p)| p).collect()
}

/// The native tree of the layer mounted at `mountpoint` (its cache directory is named after
/// the mountpoint).
fn native_of(root: &Path, mountpoint: &Path) -> PathBuf {
    let h = hex::encode(Sha256::digest(mountpoint.as_os_str().as_bytes()));
    root.join("stargz/fscache").join(&h[..32]).join("native")
}

#[test]
fn fully_fetched_layers_are_handed_to_new_containers_as_plain_trees() {
    let reg = common::Registry::start();
    let tools = tools_layer(&["/bin/sh", "/usr/bin/sha256sum", "/bin/sleep", "/bin/cat"]);
    let tars = [layer_tar(&tools), layer_tar(&lower_entries()), upper_tar()];
    let esgz: Vec<Layer> = tars.iter().map(|t| estargz_layer(t)).collect();
    let image = push_image(&reg, "test/native", "v1", &esgz);
    // The same layers as plain gzip, for containerd's own overlayfs snapshotter: the source.
    let gz: Vec<Layer> = tars
        .iter()
        .map(|t| Layer::from_blob(gzip(t), MEDIA_TYPE_LAYER_GZIP, &sha256_digest(t)))
        .collect();
    let source = push_image(&reg, "test/native", "gzip", &gz);
    let mut bed = StargzBed::start();
    let root = bed.root();
    let stderr = bed.rpull(&image);
    assert!(stderr.contains("3/3 layers remote"), "{stderr}");

    // The background fetch completes each layer, then its tree is built.
    let ready = || bed.daemon.log().matches("native layer ready").count();
    assert!(
        wait_until(Duration::from_secs(60), || ready() >= 3),
        "{} of 3 layers got a native tree; daemon log:\n{}",
        ready(),
        bed.daemon.log()
    );
    let mounts = layer_mounts(&root);
    assert_eq!(mounts.len(), 3, "{mounts:?}");
    let natives: Vec<PathBuf> = mounts.iter().map(|m| native_of(&root, m)).collect();
    for (m, n) in mounts.iter().zip(&natives) {
        assert_same_tree(m, n);
        // The layer's state file says so.
        let state_dir = m.join(".stargz-snapshotter");
        let state = std::fs::read_dir(&state_dir)
            .expect("state dir")
            .next()
            .expect("a state file")
            .expect("entry");
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(state.path()).expect("state file"))
                .expect("state json");
        assert_eq!(state["native"], true, "{state}");
    }

    // Merged by overlayfs, the trees show what the FUSE mounts show.
    let work = tempfile::tempdir().expect("tempdir");
    let (on_fuse, on_native) = (work.path().join("fuse"), work.path().join("native"));
    let rev = |v: &[PathBuf]| v.iter().rev().cloned().collect::<Vec<_>>();
    overlay(&rev(&mounts), &on_fuse);
    let _u1 = Unmount(vec![on_fuse.clone()]);
    overlay(&rev(&natives), &on_native);
    let _u2 = Unmount(vec![on_native.clone()]);
    let (a, b) = (walk(&on_fuse), walk(&on_native));
    assert_eq!(
        a.iter().map(|(p, (m, _, _))| (p, m)).collect::<Vec<_>>(),
        b.iter().map(|(p, (m, _, _))| (p, m)).collect::<Vec<_>>()
    );
    assert!(
        !on_native.join("gone").exists(),
        "the whiteout hides the lower file"
    );
    assert!(
        !on_native.join("opq/old").exists(),
        "the opaque dir hides the lower files"
    );
    assert!(on_native.join("opq/new").exists() && on_native.join("kept/file").exists());
    drop(_u1);

    // And what containerd's overlayfs snapshotter unpacks from the gzip image (but for the
    // root directory, which the layers do not describe).
    bed.ctrd.ctr_ok(&["image", "pull", "--plain-http", &source]);
    let diff_ids: Vec<String> = tars.iter().map(|t| sha256_digest(t)).collect();
    let top = stargz::chain_ids(&diff_ids).pop().expect("chain id");
    // The view's mounts are printed at once: ctr's lease on the view ends with the command.
    let mounts_out = bed.ctrd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "overlayfs",
        "view",
        "--mounts",
        "native-src",
        &top,
    ]);
    let lowers: Vec<PathBuf> = mounts_out
        .split([',', ' ', '\n', '"'])
        .find_map(|t| t.strip_prefix("lowerdir="))
        .unwrap_or_else(|| panic!("no lowerdir in {mounts_out}"))
        .split(':')
        .map(PathBuf::from)
        .collect();
    assert_eq!(lowers.len(), 3, "{mounts_out}");
    let on_source = work.path().join("source");
    overlay(&lowers, &on_source);
    let _u3 = Unmount(vec![on_source.clone()]);
    let c = walk(&on_source);
    let metas = |t: &BTreeMap<PathBuf, (Meta, u64, u64)>| {
        t.iter()
            .filter(|(p, _)| !p.as_os_str().is_empty())
            .map(|(p, (m, _, _))| (p.clone(), format!("{m:?}")))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        metas(&b),
        metas(&c),
        "the trees differ from containerd's unpack"
    );
    drop(_u2);
    drop(_u3);

    // A new container gets the trees as its lower layers and reads the right bytes.
    let big = sha256_digest(&pseudo_random(9 << 20, 7));
    bed.ctrd.ctr_ok(&[
        "run",
        "-d",
        "--snapshotter",
        "stargz",
        &image,
        "native-c",
        "sh",
        "-c",
        "sha256sum /srv/big > /tmp/sum; sleep 120",
    ]);
    let lowerdir = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .expect("mountinfo")
            .lines()
            .filter(|l| l.contains(" - overlay ") && l.contains("native-c"))
            .find_map(|l| {
                l.split(',')
                    .find_map(|o| o.strip_prefix("lowerdir=").map(str::to_string))
            })
    };
    assert!(
        wait_until(Duration::from_secs(20), || lowerdir().is_some()),
        "no overlay mount for the container"
    );
    let lower = lowerdir().expect("lowerdir");
    for n in &natives {
        let tail = n
            .strip_prefix(&root)
            .expect("under root")
            .display()
            .to_string();
        assert!(lower.contains(&tail), "{tail} not in lowerdir={lower}");
    }
    assert!(
        lower.split(':').all(|l| !l.ends_with("/fs")),
        "a FUSE mount in lowerdir={lower}"
    );
    let sum = || {
        let out = bed.ctrd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "s",
            "native-c",
            "cat",
            "/tmp/sum",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        wait_until(Duration::from_secs(20), || sum()
            .contains(big.trim_start_matches("sha256:"))),
        "sha256sum in the container: {}",
        sum()
    );

    // Killed and started again, the daemon adopts the trees (same blobs, caches re-verified)
    // and hands them out again; the container on them never noticed.
    bed.daemon.restart();
    let adopted = || bed.daemon.log().matches(r#""adopted":true"#).count();
    assert!(
        wait_until(Duration::from_secs(60), || adopted() >= 3),
        "{} of 3 trees adopted after a restart; daemon log:\n{}",
        adopted(),
        bed.daemon.log()
    );
    bed.ctrd.wait_stargz_ready(Duration::from_secs(30));
    let out = bed.ctrd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "stargz",
        &image,
        "native-d",
        "sha256sum",
        "/srv/big",
    ]);
    assert!(out.contains(big.trim_start_matches("sha256:")), "{out}");
    bed.ctrd.remove_all_containers();

    // Removing the image removes the snapshots, their caches and trees.
    bed.ctrd.ctr_ok(&["image", "rm", "--sync", &image]);
    assert!(
        wait_until(Duration::from_secs(30), || natives
            .iter()
            .all(|n| !n.exists())),
        "native trees left after the image was removed: {:?}",
        natives.iter().filter(|n| n.exists()).collect::<Vec<_>>()
    );
}
