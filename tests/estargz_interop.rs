//! Interop with Go's eStargz (Debian `stargz-snapshotter` 0.12 `ctr-remote`) through a real
//! containerd 1.6 and registry (harness in `tests/common`), both ways:
//! - Go's `ctr-remote image convert --estargz --oci` output is read by our reader with every
//!   file's bytes and metadata equal to the source tree (and the footer byte-identical);
//! - our builder's layer is pulled and unpacked by containerd as an ordinary gzip layer
//!   (diff ID checked by containerd), mounted, and equal to the source tree; Go's
//!   `ctr-remote image get-toc-digest` reports the TOC digest we computed.
//!
//! Needs root (containerd, mounts). Every process and mount is cleaned up on drop.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use common::*;
use stargz::estargz::{self, BuildOptions, EntryType};
use stargz::TOC_DIGEST as TOC_DIGEST_ANNOTATION;

#[derive(Debug, Clone)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(&'static str),
    Hardlink(&'static str),
    Char(u32, u32),
    Fifo,
}

#[derive(Debug, Clone)]
struct Node {
    path: &'static str,
    kind: Kind,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn node(path: &'static str, kind: Kind, mode: u32) -> Node {
    Node {
        path,
        kind,
        mode,
        uid: 1000,
        gid: 1001,
        mtime: 1_650_000_000,
        xattrs: BTreeMap::new(),
    }
}

/// A tree with every entry type, an empty file, a multi-chunk file (> 4 MiB), xattrs.
fn sample_tree() -> Vec<Node> {
    let big: Vec<u8> = (0..(9u32 << 20) + 12345)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (i % 97) as u8)
        .collect();
    let text: Vec<u8> = (0..20_000)
        .flat_map(|i| format!("line {i} of some text\n").into_bytes())
        .collect();
    let mut with_x = node("etc/conf", Kind::File(b"key=value\n".to_vec()), 0o640);
    with_x
        .xattrs
        .insert("user.note".into(), b"hello\nworld".to_vec());
    with_x.xattrs.insert("user.bin".into(), vec![0, 1, 2, 255]);
    vec![
        node("etc", Kind::Dir, 0o755),
        with_x,
        node("etc/empty", Kind::File(Vec::new()), 0o600),
        node("usr", Kind::Dir, 0o755),
        node("usr/bin", Kind::Dir, 0o755),
        node("usr/bin/big", Kind::File(big), 0o755),
        node("usr/bin/text", Kind::File(text), 0o4755),
        node("usr/bin/link", Kind::Symlink("big"), 0o777),
        node("usr/bin/hard", Kind::Hardlink("usr/bin/text"), 0o4755),
        node("dev", Kind::Dir, 0o755),
        node("dev/null2", Kind::Char(1, 3), 0o666),
        node("dev/fifo", Kind::Fifo, 0o644),
        node("tmp", Kind::Dir, 0o1777),
    ]
}

fn pax_block(name: &str, records: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let mut data = Vec::new();
    for (k, v) in records {
        let key = format!("SCHILY.xattr.{k}");
        let body = key.len() + v.len() + 3;
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        data.extend_from_slice(format!("{len} {key}=").as_bytes());
        data.extend_from_slice(v);
        data.push(b'\n');
    }
    let mut h = tar::Header::new_ustar();
    h.set_path(format!(
        "PaxHeaders/{}",
        name.rsplit('/').next().unwrap_or("x")
    ))
    .expect("pax name");
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(&data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn make_tar(nodes: &[Node]) -> Vec<u8> {
    let mut out = Vec::new();
    for n in nodes {
        if !n.xattrs.is_empty() {
            out.extend_from_slice(&pax_block(n.path, &n.xattrs));
        }
        let mut h = tar::Header::new_ustar();
        let name = if matches!(n.kind, Kind::Dir) {
            format!("{}/", n.path)
        } else {
            n.path.to_owned()
        };
        h.set_path(&name).expect("path");
        h.set_mode(n.mode);
        h.set_uid(n.uid);
        h.set_gid(n.gid);
        h.set_mtime(n.mtime);
        let mut data: &[u8] = &[];
        match &n.kind {
            Kind::File(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                data = d;
            }
            Kind::Dir => h.set_entry_type(tar::EntryType::Directory),
            Kind::Symlink(t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_link_name(t).expect("link");
            }
            Kind::Hardlink(t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_link_name(t).expect("link");
            }
            Kind::Char(a, b) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_device_major(*a).expect("major");
                h.set_device_minor(*b).expect("minor");
            }
            Kind::Fifo => h.set_entry_type(tar::EntryType::Fifo),
        }
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn ctr_remote(ctrd: &Containerd, args: &[&str]) -> Vec<u8> {
    let out = ctrd
        .ctr_remote_cmd("ctr-remote", "default", args)
        .output()
        .expect("run ctr-remote");
    assert!(
        out.status.success(),
        "ctr-remote {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn content_get(ctrd: &Containerd, digest: &str) -> Vec<u8> {
    let out = ctrd.ctr(&["content", "get", digest]);
    assert!(
        out.status.success(),
        "ctr content get {digest}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Manifest digest of `reference` from `ctr image ls`.
fn image_manifest(ctrd: &Containerd, reference: &str) -> serde_json::Value {
    let ls = ctrd.ctr_ok(&["image", "ls"]);
    let line = ls
        .lines()
        .find(|l| l.split_whitespace().next() == Some(reference))
        .unwrap_or_else(|| panic!("{reference} not in {ls}"));
    let digest = line
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .expect("digest column");
    serde_json::from_slice(&content_get(ctrd, digest)).expect("manifest json")
}

/// Checks that our reader sees `nodes` in `blob`.
fn assert_blob_has_tree(blob: &[u8], toc_digest: &str, nodes: &[Node]) {
    let opened =
        estargz::open_blob(blob, blob.len() as u64, Some(toc_digest)).expect("open Go-built blob");
    let idx = &opened.index;
    for n in nodes {
        let id = idx
            .lookup(n.path)
            .unwrap_or_else(|| panic!("{} missing", n.path));
        let e = idx.entry(id).expect("entry");
        match &n.kind {
            Kind::Hardlink(t) => {
                assert_eq!(Some(id), idx.lookup(t), "{} is a hardlink of {t}", n.path);
                assert_eq!(e.nlink, 2);
                continue;
            }
            Kind::File(d) => {
                assert_eq!(e.kind, EntryType::Reg, "{}", n.path);
                let mut buf = vec![0u8; d.len()];
                let got = estargz::read_file_range(blob, idx, id, 0, &mut buf).expect("read");
                assert_eq!(got, d.len());
                assert!(buf == *d, "{} content differs", n.path);
                if d.len() > 4 << 20 {
                    assert!(idx.chunks(id).len() > 1, "big file is chunked");
                }
            }
            Kind::Dir => assert_eq!(e.kind, EntryType::Dir),
            Kind::Symlink(t) => {
                assert_eq!((e.kind, e.link_name.as_str()), (EntryType::Symlink, *t))
            }
            Kind::Char(a, b) => assert_eq!(
                (e.kind, e.dev_major, e.dev_minor),
                (EntryType::Char, *a, *b)
            ),
            Kind::Fifo => assert_eq!(e.kind, EntryType::Fifo),
        }
        assert_eq!(e.mode, n.mode, "{} mode", n.path);
        assert_eq!(
            (u64::from(e.uid), u64::from(e.gid)),
            (n.uid, n.gid),
            "{} owner",
            n.path
        );
        assert_eq!(e.mtime_secs, n.mtime as i64, "{} mtime", n.path);
        assert_eq!(e.xattrs, n.xattrs, "{} xattrs", n.path);
    }
}

/// Unmounts on drop, so a failing assertion leaves no mount behind.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// `user.*` xattrs of `p` (without following symlinks), read with `llistxattr`/`lgetxattr`.
fn getxattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path");
    let mut names = vec![0u8; 4096];
    // SAFETY: buffers are valid for the lengths passed.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", p.display());
    let mut m = BTreeMap::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| s.starts_with(b"user."))
    {
        let cname = std::ffi::CString::new(name).expect("name");
        let mut val = vec![0u8; 65536];
        // SAFETY: as above.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                val.as_mut_ptr().cast(),
                val.len(),
            )
        };
        assert!(len >= 0, "lgetxattr");
        val.truncate(len as usize);
        m.insert(String::from_utf8_lossy(name).into_owned(), val);
    }
    m
}

/// Checks the unpacked tree at `root` against `nodes`.
fn assert_dir_has_tree(root: &Path, nodes: &[Node]) {
    for n in nodes {
        let p = root.join(n.path);
        let md = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        match &n.kind {
            Kind::File(d) => assert!(std::fs::read(&p).expect("read") == *d, "{} content", n.path),
            Kind::Hardlink(t) => {
                let tm = std::fs::symlink_metadata(root.join(t)).expect("target");
                assert_eq!(md.ino(), tm.ino(), "{} shares the inode of {t}", n.path);
                continue;
            }
            Kind::Dir => assert!(md.is_dir()),
            Kind::Symlink(t) => assert_eq!(std::fs::read_link(&p).expect("readlink"), Path::new(t)),
            Kind::Char(a, b) => {
                assert!(md.file_type().is_char_device());
                assert_eq!(md.rdev(), libc::makedev(*a, *b));
            }
            Kind::Fifo => assert!(md.file_type().is_fifo()),
        }
        if !matches!(n.kind, Kind::Symlink(_)) {
            assert_eq!(md.mode() & 0o7777, n.mode, "{} mode", n.path);
        }
        assert_eq!(
            (u64::from(md.uid()), u64::from(md.gid())),
            (n.uid, n.gid),
            "{} owner",
            n.path
        );
        if !matches!(n.kind, Kind::Dir) {
            assert_eq!(md.mtime(), n.mtime as i64, "{} mtime", n.path);
        }
        if !n.xattrs.is_empty() {
            assert_eq!(getxattrs(&p), n.xattrs, "{} xattrs", n.path);
        }
    }
}

#[test]
fn estargz_interop_with_go_ctr_remote() {
    require_tool("ctr-remote");
    let reg = Registry::start();
    let ctrd = Containerd::start(ContainerdOpts::default());
    let nodes = sample_tree();
    let tar = make_tar(&nodes);

    // Go → us: convert an ordinary gzip image with Go, read the result with our reader.
    let src_layer = Layer::from_blob(gzip(&tar), MEDIA_TYPE_LAYER_GZIP, &sha256_digest(&tar));
    let src = push_image(&reg, "interop/src", "v1", &[src_layer]);
    ctrd.ctr_ok(&["image", "pull", "--plain-http", &src]);
    let dst = format!("{}/interop/go-esgz:v1", reg.addr());
    ctr_remote(
        &ctrd,
        &["image", "convert", "--estargz", "--oci", &src, &dst],
    );
    let manifest = image_manifest(&ctrd, &dst);
    let layer = &manifest["layers"][0];
    let layer_digest = layer["digest"].as_str().expect("layer digest");
    let go_toc = layer["annotations"][TOC_DIGEST_ANNOTATION]
        .as_str()
        .expect("toc digest annotation");
    let go_blob = content_get(&ctrd, layer_digest);
    assert_blob_has_tree(&go_blob, go_toc, &nodes);
    let loc = estargz::parse_footer(&go_blob[go_blob.len() - 51..]).expect("footer");
    assert_eq!(
        &go_blob[go_blob.len() - 51..],
        &estargz::footer_bytes(loc.toc_offset)[..],
        "footer bytes identical to Go's"
    );
    let opened =
        estargz::open_blob(&go_blob[..], go_blob.len() as u64, Some(go_toc)).expect("open");
    assert!(opened.index.no_prefetch(), "Go adds .no.prefetch.landmark");
    opened
        .index
        .require_chunk_digests()
        .expect("Go writes chunk digests");
    // Our TOC JSON serialization of Go's TOC reproduces Go's bytes (same digest).
    let json = stargz::estargz::to_go_json(&opened.toc).expect("json");
    assert_eq!(
        estargz::sha256_digest(&json),
        go_toc,
        "Go-compatible TOC JSON encoding"
    );

    // Us → Go and containerd: our layer is an ordinary gzip layer with the TOC digest we computed.
    let mut blob = Vec::new();
    let res = estargz::build(&tar[..], &mut blob, &BuildOptions::default()).expect("build");
    let ours = Layer::from_blob(blob.clone(), MEDIA_TYPE_LAYER_GZIP, &res.diff_id)
        .with_annotation(TOC_DIGEST_ANNOTATION, &res.toc_digest);
    let ours_ref = push_image(&reg, "interop/ours", "v1", &[ours]);
    ctrd.ctr_ok(&["image", "pull", "--plain-http", &ours_ref]); // unpacks and checks the diff ID
    let got = ctr_remote(&ctrd, &["image", "get-toc-digest", &res.blob_digest]);
    assert_eq!(
        String::from_utf8_lossy(&got).trim(),
        res.toc_digest,
        "Go's get-toc-digest agrees"
    );
    let target = tempfile::tempdir().expect("tempdir");
    ctrd.ctr_ok(&[
        "image",
        "mount",
        &ours_ref,
        target.path().to_str().expect("utf8"),
    ]);
    let guard = MountGuard(target.path().to_path_buf());
    assert_dir_has_tree(target.path(), &nodes);
    assert!(
        target.path().join(".no.prefetch.landmark").exists(),
        "the landmark is a normal file when unpacked"
    );
    let _ = ctrd.ctr(&["image", "unmount", target.path().to_str().expect("utf8")]);
    drop(guard);
    // And Go's own reading of our TOC parses (dump), with the same entry count.
    let dumped = ctr_remote(
        &ctrd,
        &["image", "get-toc-digest", "--dump-toc", &res.blob_digest],
    );
    let toc: estargz::Toc = serde_json::from_slice(&dumped).expect("Go dumps our TOC");
    let ours_opened =
        estargz::open_blob(&blob[..], blob.len() as u64, Some(&res.toc_digest)).expect("open ours");
    assert_eq!(toc.entries.len(), ours_opened.toc.entries.len());
}
