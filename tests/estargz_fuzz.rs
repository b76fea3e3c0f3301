//! Stable-Rust stand-in for the `cargo fuzz` targets in `fuzz/`: drives the same entry
//! functions (`stargz::estargz::fuzzing`) with the seed corpus, random bytes, and mutations
//! of valid blobs/TOCs/footers/TOC members. Passing means: no panic, no hang, bounded memory
//! (measured: this binary counts what each thread holds).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use stargz::estargz::{self, fuzzing, BuildOptions};

/// The system allocator, counting the bytes each thread holds and the most it held.
struct Counting;

thread_local! {
    static HELD: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = HELD.try_with(|h| {
        let now = h.get() + size;
        h.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

fn note_free(size: usize) {
    let _ = HELD.try_with(|h| h.set(h.get().saturating_sub(size)));
}

// SAFETY: every call is forwarded to `System` unchanged; the counters are plain thread-locals
// with const initializers (no allocation, no destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc`/`realloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) };
        note_free(layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's pointer, layout and size.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note_free(layout.size());
            note_alloc(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns the most bytes this thread held during it beyond what it held before.
fn peak_during(f: impl FnOnce()) -> usize {
    let base = HELD.with(Cell::get);
    PEAK.with(|p| p.set(base));
    f();
    PEAK.with(Cell::get) - base
}

/// A TOC location far beyond any payload: the index checks nothing against it.
fn far_toc(format: estargz::Format) -> estargz::TocLocation {
    estargz::TocLocation {
        toc_offset: 1 << 40,
        footer_size: 0,
        legacy: false,
        format,
        toc_size: None,
    }
}

fn valid_blob() -> Vec<u8> {
    valid_blob_as(estargz::Format::Gzip)
}

fn valid_blob_as(format: estargz::Format) -> Vec<u8> {
    let mut tar = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar);
        for (name, data) in [
            ("a/x", vec![1u8; 3000]),
            ("a/y", b"hello".to_vec()),
            ("z", Vec::new()),
        ] {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, &data[..]).expect("append");
        }
        b.finish().expect("finish");
    }
    let mut blob = Vec::new();
    estargz::build(
        &tar[..],
        &mut blob,
        &BuildOptions {
            chunk_size: 1000,
            format,
            compression_level: 3,
            threads: 1,
            ..Default::default()
        },
    )
    .expect("build");
    blob
}

/// An error and its causes, as the daemon logs them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 3).expect("zstd")
}

/// zstd:chunked TOCs that lie: each is refused quickly, with a short error and without
/// holding much (the zstd decoder's own window is bounded by `MAX_ZSTD_WINDOW_LOG`).
#[test]
fn hostile_zstd_chunked_tocs_are_refused() {
    // 300 MiB of spaces before the JSON: over MAX_TOC_JSON_SIZE once decompressed.
    let bomb = {
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).expect("zstd");
        let spaces = vec![b' '; 1 << 20];
        for _ in 0..300 {
            enc.write_all(&spaces).expect("zstd");
        }
        enc.write_all(JSON).expect("zstd");
        enc.finish().expect("zstd")
    };
    // A frame that asks for a 64 MiB window (no content size, so the window is what it says).
    let wide = {
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd");
        enc.window_log(26).expect("window");
        enc.include_contentsize(false).expect("no size");
        enc.write_all(JSON).expect("zstd");
        enc.finish().expect("zstd")
    };
    let whole = zstd(JSON);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("decompresses past the JSON limit", bomb),
        ("needs a 64 MiB window", wide),
        ("cut short", whole[..whole.len() - 3].to_vec()),
        ("not zstd", JSON.to_vec()),
        ("a gzip member", gzip(&file(TOC_NAME, JSON))),
        ("JSON then garbage", zstd(&[JSON, b"}{"].concat())),
    ];
    assert!(estargz::parse_toc_member(&whole, estargz::Format::ZstdChunked).is_ok());
    for (what, member) in cases {
        assert!(member.len() < 200 << 10, "{what}: {} bytes", member.len());
        let started = Instant::now();
        let mut result = None;
        let peak = peak_during(|| {
            result = Some(
                estargz::LayerIndex::from_toc_member(
                    &member,
                    &far_toc(estargz::Format::ZstdChunked),
                )
                .map(|_| ()),
            )
        });
        let err = chain(&result.expect("ran").expect_err(what));
        assert!(err.len() < 1024, "{what}: error of {} bytes", err.len());
        assert!(peak < 8 << 20, "{what}: held {peak} bytes");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: {:?}",
            started.elapsed()
        );
        if what == "decompresses past the JSON limit" {
            assert!(err.contains("TOC too large"), "{what}: {err}");
        }
        if what == "needs a 64 MiB window" {
            assert!(err.contains("too much memory"), "{what}: {err}");
        }
        fuzzing::fuzz_toc_member(&member);
    }
}

/// A zstd:chunked blob whose footer lies about the TOC's size or place, or whose chunk frames
/// need a wider window than allowed: open or read fails, nothing wrong is returned.
#[test]
fn zstd_chunked_blobs_that_lie_fail_cleanly() {
    let blob = valid_blob_as(estargz::Format::ZstdChunked);
    let n = blob.len();
    let opened = estargz::open_blob(&blob[..], n as u64, None).expect("valid blob opens");
    assert_eq!(opened.location.format, estargz::Format::ZstdChunked);
    let field = |b: &mut Vec<u8>, i: usize, v: u64| {
        b[n - 40 + i * 8..n - 40 + i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    };
    let toc_offset = opened.location.toc_offset;
    let toc_size = opened.location.toc_size.expect("zstd footer has a size");
    for (what, i, v) in [
        ("TOC size past the footer", 1, toc_size + 9),
        ("TOC size of 4 GiB", 1, 4 << 30),
        ("TOC offset past the end", 0, n as u64),
        ("TOC offset into the chunks", 0, toc_offset - 100),
        ("TOC cut short", 1, toc_size - 5),
        ("manifest type 2", 3, 2),
    ] {
        let mut b = blob.clone();
        field(&mut b, i, v);
        let e = estargz::open_blob(&b[..], n as u64, None).expect_err(what);
        assert!(e.to_string().len() < 1024, "{what}: {e}");
    }
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out = Vec::new();
    for e in
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
    {
        out.push(std::fs::read(e.expect("entry").path()).expect("read seed"));
    }
    assert!(!out.is_empty(), "empty corpus {}", dir.display());
    out
}

#[test]
fn seed_corpus_does_not_panic() {
    for s in corpus("footer") {
        fuzzing::fuzz_footer(&s);
    }
    for s in corpus("toc") {
        fuzzing::fuzz_toc(&s);
    }
    for s in corpus("open_blob") {
        fuzzing::fuzz_open_blob(&s);
    }
    for s in corpus("toc_member") {
        fuzzing::fuzz_toc_member(&s);
    }
}

/// The member seeds mean what their names say: the valid spellings of the TOC header parse,
/// the hostile ones are refused.
#[test]
fn toc_member_seeds_parse_or_fail_as_named() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/toc_member");
    for (name, ok) in [
        ("builder", true),
        ("ustar", true),
        ("pax_path", true),
        ("gnu_long_name", true),
        ("oversized_long_name", false),
        ("wrong_pax_name", false),
        ("bad_checksum", false),
        ("deep_names", false),
    ] {
        let seed = std::fs::read(dir.join(name)).expect("seed");
        let parsed = estargz::LayerIndex::from_toc_member(&seed, &far_toc(estargz::Format::Gzip));
        assert_eq!(parsed.is_ok(), ok, "{name}: {:?}", parsed.err());
        if let Err(e) = parsed {
            assert!(
                e.to_string().len() < 1024,
                "{name}: error of {} bytes",
                e.to_string().len()
            );
        }
    }
}

// ---- TOC members written by hand: tar headers the `tar` crate's writer would not produce ----

const TOC_NAME: &[u8] = b"stargz.index.json";
const JSON: &[u8] =
    br#"{"version":1,"entries":[{"name":"a/","type":"dir"},{"name":"a/f","type":"reg"}]}"#;

fn set_checksum(b: &mut [u8]) {
    b[148..156].copy_from_slice(b"        ");
    let sum: u64 = b[..512].iter().map(|&c| u64::from(c)).sum();
    b[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
}

/// A ustar (or GNU) header block with a valid checksum; `size` is written in octal.
fn header(name: &[u8], typeflag: u8, size: u64, gnu: bool) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    let n = name.len().min(100);
    b[..n].copy_from_slice(&name[..n]);
    b[100..107].copy_from_slice(b"0000644");
    b[124..135].copy_from_slice(format!("{:011o}", size.min(0o777_7777_7777)).as_bytes());
    b[156] = typeflag;
    if gnu {
        b[257..265].copy_from_slice(b"ustar  \0");
    } else {
        b[257..265].copy_from_slice(b"ustar\x0000");
    }
    set_checksum(&mut b);
    b
}

fn padded(mut d: Vec<u8>) -> Vec<u8> {
    d.resize(d.len().div_ceil(512) * 512, 0);
    d
}

/// An extension record (`x`, `g`, `L`, `K`) whose header declares `declared` bytes and which
/// carries `data` (so the two may disagree).
fn extension(typeflag: u8, declared: u64, data: &[u8]) -> Vec<u8> {
    let mut out = header(b"././@LongLink", typeflag, declared, true);
    out.extend(padded(data.to_vec()));
    out
}

fn pax(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

fn file(name: &[u8], json: &[u8]) -> Vec<u8> {
    let mut out = header(name, b'0', json.len() as u64, false);
    out.extend(padded(json.to_vec()));
    out.extend([0u8; 1024]);
    out
}

fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(tar).expect("gz");
    gz.finish().expect("gz")
}

/// Uncompressed TOC members that must parse, with the offsets of their header blocks.
fn valid_members() -> Vec<(Vec<u8>, Vec<usize>)> {
    let plain = file(TOC_NAME, JSON);
    let records = [pax("path", TOC_NAME), pax("mtime", b"1.25")].concat();
    let mut with_pax = extension(b'x', records.len() as u64, &records);
    let pax_len = with_pax.len();
    with_pax.extend(file(b"ignored", JSON));
    let mut gnu = extension(b'L', TOC_NAME.len() as u64 + 1, &[TOC_NAME, b"\0"].concat());
    let gnu_len = gnu.len();
    gnu.extend(file(b"short", JSON));
    vec![
        (plain, vec![0]),
        (with_pax, vec![0, pax_len]),
        (gnu, vec![0, gnu_len]),
    ]
}

#[test]
fn hand_written_valid_members_parse() {
    for (tar, _) in valid_members() {
        let (toc, digest) =
            estargz::parse_toc_member(&gzip(&tar), estargz::Format::Gzip).expect("valid member");
        assert_eq!(toc.entries.len(), 2);
        assert_eq!(digest, estargz::sha256_digest(JSON));
    }
}

/// Each hostile member is refused, fast, holding little: a few KiB of compressed input once
/// made the daemon log 50 MB lines and peak at 4 GB.
#[test]
fn hostile_members_are_refused_quickly_in_bounded_memory() {
    let huge_name = vec![b'n'; 16 << 20];
    let deep = vec!["d"; 2000].join("/");
    let deep_json = format!(
        r#"{{"version":1,"entries":[{}]}}"#,
        (0..300)
            .map(|i| format!(r#"{{"name":"x{i}/{deep}/f","type":"reg"}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut bad_sum = file(TOC_NAME, JSON);
    bad_sum[0] ^= 1;
    let mut many = Vec::new();
    for _ in 0..100 {
        many.extend(extension(b'x', 12, &pax("a", b"b")));
    }
    many.extend(file(TOC_NAME, JSON));
    let cases: Vec<(&str, Vec<u8>, usize)> = vec![
        (
            "16 MiB GNU long name",
            [
                extension(b'L', huge_name.len() as u64, &huge_name),
                file(TOC_NAME, JSON),
            ]
            .concat(),
            1 << 20,
        ),
        (
            "16 MiB GNU long link",
            [
                extension(b'K', huge_name.len() as u64, &huge_name),
                file(TOC_NAME, JSON),
            ]
            .concat(),
            1 << 20,
        ),
        (
            "8 GiB long name, no data",
            [extension(b'L', 0o777_7777_7777, b""), file(TOC_NAME, JSON)].concat(),
            1 << 20,
        ),
        (
            "16 MiB PAX path",
            [
                extension(b'x', huge_name.len() as u64 + 20, &pax("path", &huge_name)),
                file(TOC_NAME, JSON),
            ]
            .concat(),
            1 << 20,
        ),
        (
            "16 MiB PAX global",
            [
                extension(
                    b'g',
                    huge_name.len() as u64 + 20,
                    &pax("comment", &huge_name),
                ),
                file(TOC_NAME, JSON),
            ]
            .concat(),
            1 << 20,
        ),
        ("100 PAX records", many, 1 << 20),
        ("bad checksum", bad_sum, 1 << 20),
        ("4 KiB wrong name", file(&[b'w'; 4096], JSON), 1 << 20),
        (
            "PAX size of 1 TiB",
            [
                extension(b'x', 20, &pax("size", b"1099511627776")),
                file(TOC_NAME, JSON),
            ]
            .concat(),
            1 << 20,
        ),
        (
            "PAX size past the data",
            [
                extension(b'x', 20, &pax("size", b"100000")),
                file(TOC_NAME, JSON),
            ]
            .concat(),
            1 << 20,
        ),
        (
            "directory",
            [header(TOC_NAME, b'5', 0, false), JSON.to_vec()].concat(),
            1 << 20,
        ),
        (
            "300 deep names",
            file(TOC_NAME, deep_json.as_bytes()),
            96 << 20,
        ),
    ];
    for (what, tar, limit) in cases {
        let member = gzip(&tar);
        assert!(
            member.len() < 200 << 10,
            "{what}: {} bytes compressed",
            member.len()
        );
        let started = Instant::now();
        let mut result = None;
        let peak = peak_during(|| {
            result = Some(
                estargz::LayerIndex::from_toc_member(&member, &far_toc(estargz::Format::Gzip))
                    .map(|_| ()),
            )
        });
        let err = result.expect("ran").expect_err(what).to_string();
        assert!(err.len() < 1024, "{what}: error of {} bytes", err.len());
        assert!(peak < limit, "{what}: held {peak} bytes");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: {:?}",
            started.elapsed()
        );
        // The deep names are valid JSON: only the index refuses them.
        assert_eq!(
            estargz::parse_toc_member(&member, estargz::Format::Gzip).is_err(),
            what != "300 deep names",
            "{what}"
        );
        fuzzing::fuzz_toc_member(&member);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        fuzzing::fuzz_footer(&data);
        fuzzing::fuzz_toc(&data);
        fuzzing::fuzz_open_blob(&data);
    }

    #[test]
    fn mutated_blobs(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in 0usize..64) {
        let mut blob = valid_blob();
        for (i, v) in edits {
            let i = i.index(blob.len());
            blob[i] = v;
        }
        blob.truncate(blob.len() - cut.min(blob.len()));
        fuzzing::fuzz_open_blob(&blob);
        let tail = &blob[blob.len().saturating_sub(51)..];
        fuzzing::fuzz_footer(tail);
    }

    #[test]
    fn mutated_toc_members(
        which in 0usize..3,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        in_header in any::<bool>(),
        fix_checksums in any::<bool>(),
    ) {
        let (mut tar, headers) = valid_members().swap_remove(which);
        for (i, v) in edits {
            // Aim at the header blocks half of the time: that is where the new reader is.
            let i = if in_header { headers[i.index(headers.len())] + i.index(512) } else { i.index(tar.len()) };
            tar[i] = v;
        }
        if fix_checksums {
            for &h in &headers {
                set_checksum(&mut tar[h..h + 512]);
            }
        }
        let member = gzip(&tar);
        let peak = peak_during(|| fuzzing::fuzz_toc_member(&member));
        prop_assert!(peak < 8 << 20, "held {} bytes", peak);
    }

    #[test]
    fn mutated_zstd_chunked_blobs(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in 0usize..64) {
        let mut blob = valid_blob_as(estargz::Format::ZstdChunked);
        for (i, v) in edits {
            let i = i.index(blob.len());
            blob[i] = v;
        }
        blob.truncate(blob.len() - cut.min(blob.len()));
        fuzzing::fuzz_open_blob(&blob);
        fuzzing::fuzz_footer(&blob[blob.len().saturating_sub(51)..]);
    }

    #[test]
    fn mutated_zstd_chunked_tocs(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let mut member = zstd(JSON);
        for (i, v) in edits {
            let i = i.index(member.len());
            member[i] = v;
        }
        let peak = peak_during(|| fuzzing::fuzz_toc_member(&member));
        prop_assert!(peak < 8 << 20, "held {} bytes", peak);
    }

    #[test]
    fn mutated_toc_json(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let blob = valid_blob();
        let opened = estargz::open_blob(&blob[..], blob.len() as u64, None).expect("open");
        let mut json = estargz::to_go_json(&opened.toc).expect("json");
        for (i, v) in edits {
            let i = i.index(json.len());
            json[i] = v;
        }
        fuzzing::fuzz_toc(&json);
    }
}
