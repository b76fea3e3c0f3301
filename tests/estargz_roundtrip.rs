//! Property tests of the eStargz format (gzip, and zstd:chunked): random trees round-trip
//! through build → open → read with equal bytes and metadata; random ranges through the index
//! match the source; corrupt blobs and hostile TOCs give errors, never panics.

use std::collections::BTreeMap;
use std::io::Read as _;

use proptest::prelude::*;
use sha2::Digest as _;
use stargz::estargz::{self, BuildOptions, EntryType, Format, ReadAt as _};

#[derive(Debug, Clone)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    Hardlink(String),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

#[derive(Debug, Clone)]
struct Node {
    path: String,
    kind: Kind,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: BTreeMap<String, Vec<u8>>,
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

/// Writes `nodes` as a plain tar (PAX headers for xattrs).
fn make_tar(nodes: &[Node]) -> Vec<u8> {
    let mut out = Vec::new();
    for n in nodes {
        if !n.xattrs.is_empty() {
            out.extend_from_slice(&pax_block(&n.path, &n.xattrs));
        }
        let mut h = tar::Header::new_ustar();
        let name = if matches!(n.kind, Kind::Dir) {
            format!("{}/", n.path)
        } else {
            n.path.clone()
        };
        h.set_path(&name).expect("path");
        h.set_mode(n.mode);
        h.set_uid(n.uid);
        h.set_gid(n.gid);
        h.set_mtime(n.mtime);
        h.set_username(&format!("u{}", n.uid)).expect("uname");
        h.set_groupname(&format!("g{}", n.gid)).expect("gname");
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
            Kind::Char(a, b) | Kind::Block(a, b) => {
                h.set_entry_type(if matches!(n.kind, Kind::Char(..)) {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                });
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

fn content() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        proptest::collection::vec(any::<u8>(), 1..200),
        // compressible, multi-chunk with small chunk sizes
        (1usize..5000, any::<u8>())
            .prop_map(|(n, b)| (0..n).map(|i| b.wrapping_add((i % 7) as u8)).collect()),
        proptest::collection::vec(any::<u8>(), 1000..3000),
    ]
}

fn xattrs() -> impl Strategy<Value = BTreeMap<String, Vec<u8>>> {
    prop_oneof![
        3 => Just(BTreeMap::new()),
        1 => proptest::collection::btree_map("user\\.[a-z]{1,6}", proptest::collection::vec(any::<u8>(), 0..20), 1..3),
    ]
}

/// A random tree: directories first, then files and specials inside them, hardlinks last.
fn tree() -> impl Strategy<Value = Vec<Node>> {
    let dirs = proptest::collection::vec("[a-z]{1,3}", 1..4);
    let leaves = proptest::collection::vec(
        (
            0u8..7,
            "[a-z]{1,8}",
            content(),
            0u32..0o7777,
            0u64..3,
            0u64..3,
            0u64..2_000_000_000,
            xattrs(),
        ),
        1..25,
    );
    (dirs, leaves).prop_map(|(dirs, leaves)| {
        let mut nodes = Vec::new();
        let mut dir_paths = vec![String::new()];
        for (i, d) in dirs.iter().enumerate() {
            let parent = dir_paths[i % dir_paths.len()].clone();
            let p = if parent.is_empty() {
                d.clone()
            } else {
                format!("{parent}/{d}")
            };
            if dir_paths.contains(&p) {
                continue;
            }
            dir_paths.push(p.clone());
            nodes.push(Node {
                path: p,
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 1_600_000_000,
                xattrs: BTreeMap::new(),
            });
        }
        let mut files: Vec<String> = Vec::new();
        let mut used: std::collections::HashSet<String> = dir_paths.iter().cloned().collect();
        for (i, (k, name, data, mode, uid, gid, mtime, xattrs)) in leaves.into_iter().enumerate() {
            let dir = &dir_paths[i % dir_paths.len()];
            let path = if dir.is_empty() {
                format!("f{i}{name}")
            } else {
                format!("{dir}/f{i}{name}")
            };
            if !used.insert(path.clone()) {
                continue;
            }
            let kind = match k {
                0..=2 => Kind::File(data),
                3 => Kind::Symlink(format!("../{name}")),
                4 => match files.first() {
                    Some(t) => Kind::Hardlink(t.clone()),
                    None => Kind::Fifo,
                },
                5 => {
                    if mode % 2 == 0 {
                        Kind::Char(mode % 256, uid as u32 + 1)
                    } else {
                        Kind::Block(mode % 256, gid as u32)
                    }
                }
                _ => Kind::Fifo,
            };
            if matches!(kind, Kind::File(_)) {
                files.push(path.clone());
            }
            nodes.push(Node {
                path,
                kind,
                mode,
                uid,
                gid,
                mtime,
                xattrs,
            });
        }
        nodes
    })
}

fn read_all(blob: &[u8], opened: &estargz::OpenedBlob, id: u32, size: u64) -> Vec<u8> {
    let mut buf = vec![0u8; size as usize];
    let n = estargz::read_file_range(blob, &opened.index, id, 0, &mut buf).expect("read file");
    assert_eq!(n as u64, size);
    buf
}

/// The whole blob decompressed as any gzip or zstd reader would (zstd skips the skippable
/// frames of the TOC and footer).
fn decompress_all(blob: &[u8], format: Format) -> Vec<u8> {
    let mut out = Vec::new();
    match format {
        Format::Gzip => flate2::read::MultiGzDecoder::new(blob)
            .read_to_end(&mut out)
            .expect("gunzip blob"),
        Format::ZstdChunked => zstd::stream::read::Decoder::new(blob)
            .expect("zstd")
            .read_to_end(&mut out)
            .expect("unzstd blob"),
    };
    out
}

fn format_of(zstd: bool) -> Format {
    if zstd {
        Format::ZstdChunked
    } else {
        Format::Gzip
    }
}

fn check_round_trip(
    nodes: &[Node],
    chunk_size: u64,
    threads: usize,
    gzip_input: bool,
    format: Format,
) -> Result<(), TestCaseError> {
    let tar = make_tar(nodes);
    let input = if gzip_input {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).expect("gz");
        gz.finish().expect("gz")
    } else {
        tar.clone()
    };
    let opts = BuildOptions {
        chunk_size,
        format,
        compression_level: 1,
        threads,
        ..Default::default()
    };
    let mut blob = Vec::new();
    let res = estargz::build(&input[..], &mut blob, &opts).expect("build");
    prop_assert_eq!(res.blob_size, blob.len() as u64);
    prop_assert_eq!(&res.blob_digest, &estargz::sha256_digest(&blob));
    let plain = decompress_all(&blob, format);
    prop_assert_eq!(&res.diff_id, &estargz::sha256_digest(&plain));
    prop_assert_eq!(res.uncompressed_size, plain.len() as u64);

    let opened =
        estargz::open_blob(&blob[..], blob.len() as u64, Some(&res.toc_digest)).expect("open");
    prop_assert_eq!(opened.location.format, format);
    prop_assert_eq!(opened.index.format(), format);
    prop_assert!(opened.index.no_prefetch());
    if let Some(m) = &res.zstd_chunked {
        // containers/storage's annotations name the compressed TOC exactly.
        let parts: Vec<u64> = m
            .position
            .split(':')
            .map(|p| p.parse().expect("number"))
            .collect();
        let (off, len) = (parts[0] as usize, parts[1] as usize);
        prop_assert_eq!(off as u64, opened.location.toc_offset);
        prop_assert_eq!(&m.checksum, &estargz::sha256_digest(&blob[off..off + len]));
        prop_assert_eq!(parts[3], 1);
    }
    prop_assert_eq!(res.zstd_chunked.is_some(), format == Format::ZstdChunked);
    let idx = &opened.index;
    for n in nodes {
        let id = idx
            .lookup(&n.path)
            .ok_or_else(|| TestCaseError::fail(format!("missing {}", n.path)))?;
        let e = idx.entry(id).expect("entry");
        match &n.kind {
            Kind::Hardlink(t) => {
                prop_assert_eq!(Some(id), idx.lookup(t));
                prop_assert!(e.nlink >= 2);
                continue;
            }
            Kind::File(d) => {
                prop_assert_eq!(e.kind, EntryType::Reg);
                prop_assert_eq!(e.size, d.len() as u64);
                prop_assert_eq!(&read_all(&blob, &opened, id, e.size), d);
                prop_assert_eq!(&e.digest, &estargz::sha256_digest(d));
            }
            Kind::Dir => prop_assert_eq!(e.kind, EntryType::Dir),
            Kind::Symlink(t) => {
                prop_assert_eq!(e.kind, EntryType::Symlink);
                prop_assert_eq!(&e.link_name, t);
            }
            Kind::Char(a, b) | Kind::Block(a, b) => {
                let want = if matches!(n.kind, Kind::Char(..)) {
                    EntryType::Char
                } else {
                    EntryType::Block
                };
                prop_assert_eq!(e.kind, want);
                prop_assert_eq!((e.dev_major, e.dev_minor), (*a, *b));
            }
            Kind::Fifo => prop_assert_eq!(e.kind, EntryType::Fifo),
        }
        prop_assert_eq!(e.mode, n.mode);
        prop_assert_eq!((u64::from(e.uid), u64::from(e.gid)), (n.uid, n.gid));
        prop_assert_eq!(e.mtime_secs, n.mtime as i64);
        prop_assert_eq!(&e.user_name, &format!("u{}", n.uid));
        prop_assert_eq!(&e.group_name, &format!("g{}", n.gid));
        prop_assert_eq!(&e.xattrs, &n.xattrs);
        let parent = idx.parent(id).expect("parent");
        prop_assert_eq!(idx.lookup_child(parent, e.base_name()), Some(id));
    }
    // The decompressed blob is itself a tar with the same entries and payloads.
    let mut ar = tar::Archive::new(&plain[..]);
    let mut seen = BTreeMap::new();
    for ent in ar.entries().expect("tar") {
        let mut ent = ent.expect("tar entry");
        let name = String::from_utf8_lossy(&ent.path_bytes())
            .trim_end_matches('/')
            .to_owned();
        let mut data = Vec::new();
        ent.read_to_end(&mut data).expect("tar data");
        let xattrs: BTreeMap<String, Vec<u8>> = match ent.pax_extensions().expect("pax") {
            Some(exts) => exts
                .filter_map(|x| x.ok())
                .filter_map(|x| {
                    Some((
                        x.key().ok()?.strip_prefix("SCHILY.xattr.")?.to_owned(),
                        x.value_bytes().to_vec(),
                    ))
                })
                .collect(),
            None => BTreeMap::new(),
        };
        seen.insert(name, (data, xattrs));
    }
    // zstd:chunked keeps the TOC out of the tar (in a skippable frame).
    prop_assert_eq!(
        seen.contains_key("stargz.index.json"),
        format == Format::Gzip
    );
    prop_assert!(seen.contains_key(".no.prefetch.landmark"));
    for n in nodes {
        let (data, xattrs) = seen
            .get(&n.path)
            .ok_or_else(|| TestCaseError::fail(format!("tar lacks {}", n.path)))?;
        if let Kind::File(d) = &n.kind {
            prop_assert_eq!(data, d);
        }
        // The tar crate's own PAX parser splits at newlines; compare only what it can read.
        if !n.xattrs.values().any(|v| v.contains(&b'\n')) {
            prop_assert_eq!(xattrs, &n.xattrs);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_round_trip(nodes in tree(), chunk in prop_oneof![Just(64u64), Just(1000), Just(4 << 20)], threads in 1usize..3, gz in any::<bool>(), zstd in any::<bool>()) {
        check_round_trip(&nodes, chunk, threads, gz, format_of(zstd))?;
    }

    #[test]
    fn random_ranges_match_source(data in proptest::collection::vec(any::<u8>(), 1..20_000), chunk in 1u64..3000,
                                  ranges in proptest::collection::vec((any::<u64>(), 0u64..5000), 1..20), zstd in any::<bool>()) {
        let nodes = vec![Node { path: "big".into(), kind: Kind::File(data.clone()), mode: 0o644, uid: 0, gid: 0, mtime: 1, xattrs: BTreeMap::new() }];
        let mut blob = Vec::new();
        let opts = BuildOptions { chunk_size: chunk, format: format_of(zstd), compression_level: 1, threads: 1, ..Default::default() };
        estargz::build(&make_tar(&nodes)[..], &mut blob, &opts).expect("build");
        let opened = estargz::open_blob(&blob[..], blob.len() as u64, None).expect("open");
        let id = opened.index.lookup("/big").expect("lookup");
        let size = data.len() as u64;
        prop_assert_eq!(opened.index.chunks(id).len() as u64, size.div_ceil(chunk));
        for (off, len) in ranges {
            let off = off % (size + 10);
            let mut buf = vec![0u8; len as usize];
            let n = estargz::read_file_range(&blob[..], &opened.index, id, off, &mut buf).expect("read");
            let want: &[u8] = if off >= size { &[] } else { &data[off as usize..(off + len).min(size) as usize] };
            prop_assert_eq!(&buf[..n], want);
            // The chunks the index names cover exactly the range asked for.
            let cs = opened.index.chunks_for_range(id, off, len);
            if !want.is_empty() {
                prop_assert!(cs[0].chunk_offset <= off);
                let last = cs[cs.len() - 1];
                prop_assert!(last.chunk_offset + last.chunk_size >= off + want.len() as u64);
            }
        }
    }

    /// Any single corrupted byte: open and read either fail cleanly or return verified bytes.
    #[test]
    fn corrupt_blobs_never_panic_or_lie(pos in any::<prop::sample::Index>(), val in any::<u8>(), zstd in any::<bool>()) {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let nodes = vec![Node { path: "a/f".into(), kind: Kind::File(data.clone()), mode: 0o644, uid: 0, gid: 0, mtime: 1, xattrs: BTreeMap::new() }];
        let mut blob = Vec::new();
        let opts = BuildOptions { chunk_size: 1024, format: format_of(zstd), compression_level: 6, threads: 1, ..Default::default() };
        let res = estargz::build(&make_tar(&nodes)[..], &mut blob, &opts).expect("build");
        let i = pos.index(blob.len());
        if blob[i] == val { return Ok(()); }
        blob[i] = val;
        let Ok(opened) = estargz::open_blob(&blob[..], blob.len() as u64, Some(&res.toc_digest)) else { return Ok(()) };
        let Some(id) = opened.index.lookup("a/f") else { return Ok(()) };
        let mut buf = vec![0u8; data.len()];
        if let Ok(n) = estargz::read_file_range(&blob[..], &opened.index, id, 0, &mut buf) {
            prop_assert_eq!(&buf[..n], &data[..n]);
        }
    }

    /// Truncated blobs fail cleanly.
    #[test]
    fn truncated_blobs_fail(cut in 1usize..2000, zstd in any::<bool>()) {
        let nodes = vec![Node { path: "f".into(), kind: Kind::File(vec![1; 3000]), mode: 0o644, uid: 0, gid: 0, mtime: 1, xattrs: BTreeMap::new() }];
        let mut blob = Vec::new();
        estargz::build(&make_tar(&nodes)[..], &mut blob, &BuildOptions { threads: 1, format: format_of(zstd), ..Default::default() }).expect("build");
        let cut = cut.min(blob.len());
        let short = &blob[..blob.len() - cut];
        prop_assert!(estargz::open_blob(short, short.len() as u64, None).is_err());
    }
}

#[test]
fn prioritized_files_come_first_with_landmark() {
    let f = |p: &str, d: &[u8]| Node {
        path: p.into(),
        kind: Kind::File(d.to_vec()),
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 5,
        xattrs: BTreeMap::new(),
    };
    let dir = |p: &str| Node {
        path: p.into(),
        kind: Kind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 5,
        xattrs: BTreeMap::new(),
    };
    let nodes = vec![
        dir("a"),
        f("a/x", b"xxxx"),
        dir("b"),
        f("b/y", b"yyyy"),
        f("b/z", b"zz"),
    ];
    let opts = BuildOptions {
        prioritized_files: vec!["/b/y".into(), "nope".into()],
        allow_prioritize_not_found: true,
        threads: 1,
        ..Default::default()
    };
    let mut blob = Vec::new();
    let res = estargz::build(&make_tar(&nodes)[..], &mut blob, &opts).expect("build");
    assert_eq!(res.missed_prioritized_files, vec!["nope".to_owned()]);
    let opened =
        estargz::open_blob(&blob[..], blob.len() as u64, Some(&res.toc_digest)).expect("open");
    let names: Vec<&str> = opened.toc.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["b/", "b/y", ".prefetch.landmark", "a/", "a/x", "b/z"]
    );
    let end = opened.index.prefetch_end_offset().expect("landmark");
    let y = opened.index.lookup("b/y").expect("y");
    assert!(opened.index.chunks(y)[0].compressed_end <= end);
    assert!(
        opened.index.lookup(".prefetch.landmark").is_none(),
        "landmarks are hidden"
    );

    let strict = BuildOptions {
        prioritized_files: vec!["nope".into()],
        threads: 1,
        ..Default::default()
    };
    assert!(estargz::build(&make_tar(&nodes)[..], &mut Vec::new(), &strict).is_err());
}

#[test]
fn wrong_toc_digest_is_refused() {
    let nodes = vec![Node {
        path: "f".into(),
        kind: Kind::File(b"hi".to_vec()),
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 1,
        xattrs: BTreeMap::new(),
    }];
    let mut blob = Vec::new();
    estargz::build(&make_tar(&nodes)[..], &mut blob, &BuildOptions::default()).expect("build");
    let bad = format!("sha256:{}", "0".repeat(64));
    let err = estargz::open_blob(&blob[..], blob.len() as u64, Some(&bad)).expect_err("must fail");
    assert!(
        matches!(err, estargz::EstargzError::TocDigestMismatch { .. }),
        "{err}"
    );
}

#[test]
fn build_is_deterministic_across_thread_counts() {
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i % 253) as u8 ^ (i >> 9) as u8)
        .collect();
    let nodes = vec![Node {
        path: "f".into(),
        kind: Kind::File(data),
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 1,
        xattrs: BTreeMap::new(),
    }];
    let tar = make_tar(&nodes);
    let run = |threads| {
        let mut blob = Vec::new();
        let opts = BuildOptions {
            chunk_size: 10_000,
            compression_level: 6,
            threads,
            ..Default::default()
        };
        let r = estargz::build(&tar[..], &mut blob, &opts).expect("build");
        (blob, r)
    };
    let (a, ra) = run(1);
    let (b, rb) = run(2);
    assert_eq!(ra, rb);
    assert_eq!(a, b);
    let _ = a.as_slice().read_at(&mut [0u8; 1], 0);
    assert_eq!(
        ra.blob_digest,
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&a)))
    );
}
