//! Converts a tar or tar.gz layer into an eStargz blob, the way Go's `estargz.Build` does:
//! each regular file's payload (each `chunk_size` piece of a big file) starts a new gzip
//! member, the prioritized files come first followed by `.prefetch.landmark` (or
//! `.no.prefetch.landmark` when no list is given), then the TOC member and the footer.
//!
//! Memory does not grow with the layer: the input is spooled to an unnamed temp file, only
//! per-entry metadata is kept, and at most a few members (≈ `chunk_size` each) are in flight.
//! Members are compressed on `threads` worker threads and written in order, so the output is
//! deterministic whatever the thread count.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest as _, Sha256};

use super::footer::{footer_bytes, zstd_chunked_trailer, Format};
use super::landmark::{LANDMARK_CONTENTS, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK};
use super::toc::{to_go_json, EntryType, Toc, TocEntry, MAX_TOC_COMPRESSED_SIZE, TOC_TAR_NAME};
use super::{rfc3339, EstargzError, Result};

/// Options of [`build`]; the defaults are Go's (`estargz.Build`).
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Largest piece of a file in one gzip member or zstd frame (Go default 4 MiB).
    pub chunk_size: u64,
    /// eStargz (gzip) or zstd:chunked.
    pub format: Format,
    /// gzip level 0–9 (Go default `gzip.BestCompression` = 9), or zstd level 1–22 (Go's
    /// converter: 3).
    pub compression_level: u32,
    /// Files moved to the front, in this order, with their parents (Go `WithPrioritizedFiles`).
    pub prioritized_files: Vec<String>,
    /// Record prioritized files missing from the input instead of failing
    /// (Go `WithAllowPrioritizeNotFound`).
    pub allow_prioritize_not_found: bool,
    /// Compression threads; 0 = available parallelism.
    pub threads: usize,
    /// Where the input is spooled (an unnamed file); `None` = the system temp dir.
    pub tmp_dir: Option<PathBuf>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            chunk_size: 4 << 20,
            format: Format::Gzip,
            compression_level: 9,
            prioritized_files: Vec::new(),
            allow_prioritize_not_found: false,
            threads: 0,
            tmp_dir: None,
        }
    }
}

/// What a converter needs to write the image manifest and config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    /// `sha256:` of the uncompressed TOC JSON (the `containerd.io/snapshot/stargz/toc.digest` annotation).
    pub toc_digest: String,
    /// `sha256:` of the whole decompressed blob, which is a plain tar (the config's diff ID).
    pub diff_id: String,
    /// `sha256:` of the compressed blob (the layer descriptor digest).
    pub blob_digest: String,
    /// Compressed blob size.
    pub blob_size: u64,
    /// Size of the decompressed blob (the `io.containers.estargz.uncompressed-size` annotation).
    pub uncompressed_size: u64,
    /// Prioritized files that were not in the input (only with `allow_prioritize_not_found`).
    pub missed_prioritized_files: Vec<String>,
    /// zstd:chunked only: the containers/storage annotations that locate the TOC.
    pub zstd_chunked: Option<ZstdChunkedManifest>,
}

/// Where a zstd:chunked blob's TOC is, as containers/storage's annotations say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZstdChunkedManifest {
    /// `sha256:` of the compressed TOC (`io.containers.zstd-chunked.manifest-checksum`).
    pub checksum: String,
    /// `offset:compressed:uncompressed:1` (`io.containers.zstd-chunked.manifest-position`).
    pub position: String,
}

/// Builds an eStargz or zstd:chunked blob from `input` (tar, or a gzip or zstd compressed
/// tar, detected by magic) into `out`.
pub fn build<R: Read, W: Write>(input: R, out: W, opts: &BuildOptions) -> Result<BuildResult> {
    if opts.chunk_size == 0 || opts.chunk_size > super::index::MAX_CHUNK_SIZE {
        return Err(EstargzError::InputTar(format!(
            "chunk size {} out of range",
            opts.chunk_size
        )));
    }
    let levels = match opts.format {
        Format::Gzip => 0..=9,
        Format::ZstdChunked => 1..=22,
    };
    if !levels.contains(&opts.compression_level) {
        return Err(EstargzError::InputTar(format!(
            "compression level {} out of range {levels:?}",
            opts.compression_level
        )));
    }
    let spool = spool_input(input, opts)?;
    let mut entries = scan_tar(&spool)?;
    let missed = sort_entries(&mut entries, opts)?;
    let mut w = MemberWriter::new(out, opts);
    let res = write_blob(&spool, &entries.sorted, &mut w, opts);
    let finished = w.finish();
    let (toc_digest, zstd_chunked) = res?;
    let (blob_digest, blob_size, diff_id, uncompressed_size) = finished?;
    Ok(BuildResult {
        toc_digest,
        zstd_chunked,
        diff_id,
        blob_digest,
        blob_size,
        uncompressed_size,
        missed_prioritized_files: missed,
    })
}

/// Decompresses (if gzip) or copies the input into an unnamed temp file, so entries can be
/// re-read in any order.
fn spool_input<R: Read>(input: R, opts: &BuildOptions) -> Result<File> {
    let dir = opts.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let file = tempfile::tempfile_in(&dir)?;
    let mut br = BufReader::with_capacity(1 << 20, input);
    let (is_gzip, is_zstd) = {
        let head = fill_peek(&mut br)?;
        (
            head.len() >= 3 && head[..3] == [0x1f, 0x8b, 0x08],
            head.len() >= 4 && head[..4] == super::chunk::ZSTD_MAGIC,
        )
    };
    let mut w = BufWriter::with_capacity(1 << 20, &file);
    if is_gzip {
        let mut gz = flate2::bufread::MultiGzDecoder::new(br);
        io::copy(&mut gz, &mut w).map_err(|e| input_io("gunzip input", e))?;
    } else if is_zstd {
        // A zstd layer (zstd:chunked too: its TOC's skippable frames are skipped).
        let mut z = super::chunk::zstd_reader(br).map_err(|e| input_io("zstd input", e))?;
        io::copy(&mut z, &mut w).map_err(|e| input_io("zstd input", e))?;
    } else {
        io::copy(&mut br, &mut w)?;
    }
    w.flush()?;
    drop(w);
    io::Seek::seek(&mut &file, io::SeekFrom::Start(0))?;
    Ok(file)
}

fn input_io(what: &str, source: io::Error) -> EstargzError {
    EstargzError::InputIo {
        what: what.to_owned(),
        source,
    }
}

fn fill_peek<R: Read>(br: &mut BufReader<R>) -> io::Result<&[u8]> {
    use io::BufRead as _;
    br.fill_buf()
}

/// One input tar entry: its metadata and where its payload is in the spool file.
#[derive(Debug, Clone)]
struct InEntry {
    name: String,
    link_name: String,
    typeflag: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    uname: String,
    gname: String,
    mtime: i64,
    dev_major: u32,
    dev_minor: u32,
    /// PAX records carried into the output (all but path, linkpath and size, regenerated).
    pax: Vec<(String, Vec<u8>)>,
    xattrs: std::collections::BTreeMap<String, Vec<u8>>,
    size: u64,
    data_pos: u64,
    /// Payload not from the spool (landmarks).
    inline: Option<Vec<u8>>,
}

/// Go's `cleanEntryName`: `path.Clean("/"+name)` without the leading slash (`..` resolved).
fn go_clean(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

fn go_parent(clean: &str) -> String {
    clean
        .rfind('/')
        .map_or(String::new(), |i| clean[..i].to_owned())
}

struct Entries {
    /// Input order after Go's dedup (a later entry of the same name replaces the earlier one
    /// and takes its place at the end).
    stream: Vec<Option<InEntry>>,
    index: HashMap<String, usize>,
    sorted: Vec<InEntry>,
}

fn scan_tar(spool: &File) -> Result<Entries> {
    let mut ar = tar::Archive::new(BufReader::with_capacity(1 << 20, spool));
    let mut out = Entries {
        stream: Vec::new(),
        index: HashMap::new(),
        sorted: Vec::new(),
    };
    // Raw mode: the tar crate's own PAX parser splits records at newlines, which breaks
    // binary xattr values (e.g. security.capability); records are parsed here by length.
    let iter = ar
        .entries_with_seek()
        .map_err(|e| input_io("entries", e))?
        .raw(true);
    let mut ext = Extensions::default();
    for ent in iter {
        let mut ent = ent.map_err(|e| input_io("entry", e))?;
        match ent.header().entry_type().as_byte() {
            b'x' => {
                ext.pax = Some(parse_pax_records(&read_small(&mut ent)?)?);
                continue;
            }
            b'L' => {
                ext.long_name = Some(trim_nul(read_small(&mut ent)?));
                continue;
            }
            b'K' => {
                ext.long_link = Some(trim_nul(read_small(&mut ent)?));
                continue;
            }
            _ => {}
        }
        let ext = std::mem::take(&mut ext);
        let Some(e) = in_entry(&mut ent, ext)? else {
            continue;
        };
        let clean = go_clean(&e.name);
        if e.name == TOC_TAR_NAME || clean == PREFETCH_LANDMARK || clean == NO_PREFETCH_LANDMARK {
            continue; // an input that was converted before: drop the old TOC and landmarks, like Go
        }
        if let Some(old) = out.index.insert(clean, out.stream.len()) {
            out.stream[old] = None;
        }
        out.stream.push(Some(e));
    }
    Ok(out)
}

/// Extension headers seen before an entry (PAX local, GNU long name / long link).
#[derive(Default)]
struct Extensions {
    pax: Option<Vec<(String, Vec<u8>)>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

/// Extension payloads are metadata: cap them so a hostile header cannot exhaust memory.
fn read_small<R: Read>(ent: &mut tar::Entry<'_, R>) -> Result<Vec<u8>> {
    const MAX: u64 = 16 << 20;
    if ent.size() > MAX {
        return Err(EstargzError::InputTar(format!(
            "extension header of {} bytes",
            ent.size()
        )));
    }
    let mut v = Vec::with_capacity(ent.size() as usize);
    ent.read_to_end(&mut v)
        .map_err(|e| input_io("extension header", e))?;
    Ok(v)
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// PAX records, split by length (values may hold `\n`, e.g. binary xattrs).
fn parse_pax_records(data: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    super::tar_header::parse_pax_records(data)
        .ok_or_else(|| EstargzError::InputTar("malformed PAX record".into()))
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn in_entry<R: Read>(ent: &mut tar::Entry<'_, R>, ext: Extensions) -> Result<Option<InEntry>> {
    let h = ent.header().clone();
    let typeflag = h.entry_type().as_byte();
    let typeflag = match typeflag {
        b'\0' | b'7' => b'0',
        b'g' => return Ok(None), // PAX global header: metadata only
        b'0'..=b'6' => typeflag,
        other => {
            return Err(EstargzError::InputTar(format!(
                "unsupported tar entry type {:?}",
                other as char
            )))
        }
    };
    let name = ext.long_name.unwrap_or_else(|| h.path_bytes().into_owned());
    let link = ext
        .long_link
        .or_else(|| h.link_name_bytes().map(|b| b.into_owned()))
        .unwrap_or_default();
    let mut e = InEntry {
        name: lossy(&name),
        link_name: lossy(&link),
        typeflag,
        mode: numeric(h.mode().map(u64::from), &h.as_old().mode).map_err(|e| input_io("mode", e))?
            as u32,
        uid: numeric(h.uid(), &h.as_old().uid).map_err(|e| input_io("uid", e))?,
        gid: numeric(h.gid(), &h.as_old().gid).map_err(|e| input_io("gid", e))?,
        uname: h.username_bytes().map(lossy).unwrap_or_default(),
        gname: h.groupname_bytes().map(lossy).unwrap_or_default(),
        mtime: i64::try_from(
            numeric(h.mtime(), &h.as_old().mtime).map_err(|e| input_io("mtime", e))?,
        )
        .unwrap_or(0),
        dev_major: h.device_major().ok().flatten().unwrap_or(0),
        dev_minor: h.device_minor().ok().flatten().unwrap_or(0),
        pax: Vec::new(),
        xattrs: Default::default(),
        size: if typeflag == b'0' { ent.size() } else { 0 },
        data_pos: ent.raw_file_position(),
        inline: None,
    };
    for (key, value) in ext.pax.unwrap_or_default() {
        apply_pax(&mut e, &key, &value)?;
    }
    Ok(Some(e))
}

/// A numeric header field; an all-NUL/space field is 0, as Go's tar reader treats it.
fn numeric(parsed: io::Result<u64>, raw: &[u8]) -> io::Result<u64> {
    match parsed {
        Err(_) if raw.iter().all(|&c| c == 0 || c == b' ') => Ok(0),
        other => other,
    }
}

fn apply_pax(e: &mut InEntry, key: &str, value: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(value).unwrap_or("");
    match key {
        "path" => {
            e.name = lossy(value);
            return Ok(());
        }
        "linkpath" => {
            e.link_name = lossy(value);
            return Ok(());
        }
        "size" => {
            // The raw tar reader stepped over the header's size; a different PAX size would
            // desynchronize the archive.
            if e.typeflag == b'0' && text.parse::<u64>().ok() != Some(e.size) {
                return Err(EstargzError::InputTar(format!(
                    "{}: PAX size {text:?} differs from the header",
                    e.name
                )));
            }
            return Ok(());
        }
        "uid" => e.uid = text.parse().unwrap_or(e.uid),
        "gid" => e.gid = text.parse().unwrap_or(e.gid),
        "uname" => e.uname = text.to_owned(),
        "gname" => e.gname = text.to_owned(),
        "mtime" => e.mtime = parse_pax_time(text).unwrap_or(e.mtime),
        _ => {
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                e.xattrs.insert(name.to_owned(), value.to_vec());
            }
        }
    }
    e.pax.push((key.to_owned(), value.to_vec()));
    Ok(())
}

/// PAX `mtime` (`secs[.frac]`) rounded to the second, as Go's `Round(time.Second)` does.
fn parse_pax_time(s: &str) -> Option<i64> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let round_up = frac.as_bytes().first().is_some_and(|&d| d >= b'5');
    Some(if round_up && secs >= 0 {
        secs + 1
    } else {
        secs
    })
}

fn landmark(name: &str) -> InEntry {
    InEntry {
        name: name.to_owned(),
        link_name: String::new(),
        typeflag: b'0',
        mode: 0,
        uid: 0,
        gid: 0,
        uname: String::new(),
        gname: String::new(),
        mtime: 0,
        dev_major: 0,
        dev_minor: 0,
        pax: Vec::new(),
        xattrs: Default::default(),
        size: 1,
        data_pos: 0,
        inline: Some(vec![LANDMARK_CONTENTS]),
    }
}

/// Go's `sortEntries`: prioritized files (with their parents and hardlink targets) first,
/// then a landmark, then everything else in input order. Returns the missed files.
fn sort_entries(entries: &mut Entries, opts: &BuildOptions) -> Result<Vec<String>> {
    let mut missed = Vec::new();
    let mut moved: HashMap<String, ()> = HashMap::new();
    for f in &opts.prioritized_files {
        match move_rec(f, entries, &mut moved, 0) {
            Ok(()) => {}
            Err(EstargzError::PrioritizedNotFound(_)) if opts.allow_prioritize_not_found => {
                missed.push(f.clone())
            }
            Err(e) => return Err(e),
        }
    }
    let mark = if opts.prioritized_files.is_empty() {
        NO_PREFETCH_LANDMARK
    } else {
        PREFETCH_LANDMARK
    };
    entries.sorted.push(landmark(mark));
    let rest: Vec<InEntry> = entries.stream.drain(..).flatten().collect();
    entries.sorted.extend(rest);
    Ok(missed)
}

fn move_rec(
    name: &str,
    entries: &mut Entries,
    moved: &mut HashMap<String, ()>,
    depth: usize,
) -> Result<()> {
    let name = go_clean(name);
    if depth > 4096 {
        return Err(EstargzError::InputTar(format!(
            "hardlink chain too deep at {name:?}"
        )));
    }
    let take = |entries: &mut Entries, moved: &mut HashMap<String, ()>, n: &str| {
        if let Some(i) = entries.index.remove(n) {
            if let Some(e) = entries.stream[i].take() {
                entries.sorted.push(e);
                moved.insert(n.to_owned(), ());
            }
        }
    };
    if name.is_empty() {
        take(entries, moved, "");
        return Ok(());
    }
    if !entries.index.contains_key(&name) && !moved.contains_key(&name) {
        return Err(EstargzError::PrioritizedNotFound(name));
    }
    move_rec(&go_parent(&name), entries, moved, depth + 1)?;
    let link = entries
        .index
        .get(&name)
        .and_then(|&i| entries.stream[i].as_ref())
        .filter(|e| e.typeflag == b'1')
        .map(|e| e.link_name.clone());
    if let Some(target) = link {
        move_rec(&target, entries, moved, depth + 1)?;
    }
    take(entries, moved, &name);
    Ok(())
}

/// Writes all entries, the TOC member and the footer; returns the TOC digest.
fn write_blob<W: Write>(
    spool: &File,
    entries: &[InEntry],
    w: &mut MemberWriter<W>,
    opts: &BuildOptions,
) -> Result<(String, Option<ZstdChunkedManifest>)> {
    let mut toc_entries: Vec<(TocEntry, Option<usize>)> = Vec::with_capacity(entries.len() + 1);
    let mut names = NameCache::default();
    let mut buf = Vec::new();
    for e in entries {
        let mut ent = toc_entry(e, &mut names);
        if e.inline.is_some() {
            w.close_member()?; // Go opens a fresh member for landmarks (needsOpenGzEntries)
        }
        w.append(&tar_header(e)?)?;
        if e.typeflag != b'0' || e.size == 0 {
            if e.typeflag == b'0' {
                ent.digest = super::sha256_digest(&[]);
            }
            toc_entries.push((ent, None));
            continue;
        }
        let mut file_hash = Sha256::new();
        let mut written = 0u64;
        let first = toc_entries.len();
        while written < e.size {
            w.close_member()?;
            let remain = e.size - written;
            let this = remain.min(opts.chunk_size);
            if remain >= opts.chunk_size {
                ent.chunk_size = this as i64;
            }
            ent.chunk_offset = written as i64;
            buf.resize(this as usize, 0);
            match &e.inline {
                Some(data) => {
                    buf.copy_from_slice(&data[written as usize..(written + this) as usize])
                }
                None => spool
                    .read_exact_at(&mut buf, e.data_pos + written)
                    .map_err(|err| input_io(&format!("{}: payload", e.name), err))?,
            }
            file_hash.update(&buf);
            ent.chunk_digest = super::sha256_digest(&buf);
            let member = w.member_index();
            w.append(&buf)?;
            toc_entries.push((ent, Some(member)));
            written += this;
            ent = TocEntry {
                name: e.name.clone(),
                kind: EntryType::Chunk,
                ..Default::default()
            };
        }
        toc_entries[first].0.digest = format!("sha256:{}", hex::encode(file_hash.finalize()));
        w.append(&vec![0u8; padding(e.size)])?;
    }
    w.close_member()?;
    let offsets = w.member_offsets_so_far()?;
    let toc = Toc {
        version: 1,
        entries: toc_entries
            .into_iter()
            .map(|(mut t, m)| {
                if let Some(m) = m {
                    t.offset = offsets[m] as i64;
                }
                t
            })
            .collect(),
    };
    let json = to_go_json(&toc)?;
    let toc_offset = w.offset_so_far()?;
    let toc_digest = super::sha256_digest(&json);
    if opts.format == Format::ZstdChunked {
        // Go's zstd:chunked layout: the TOC is no tar entry and no end-of-archive follows, so
        // the decompressed blob (and the diff ID) is the entries alone.
        let z = zstd::bulk::compress(&json, zstd_level(opts.compression_level))?;
        if z.len() as u64 > MAX_TOC_COMPRESSED_SIZE {
            return Err(EstargzError::TocTooLarge {
                size: z.len() as u64,
                limit: MAX_TOC_COMPRESSED_SIZE,
            });
        }
        let (trailer, toc_at) = zstd_chunked_trailer(toc_offset, &z, json.len() as u64);
        w.write_raw(&trailer)?;
        let manifest = ZstdChunkedManifest {
            checksum: super::sha256_digest(&z),
            position: format!("{toc_at}:{}:{}:1", z.len(), json.len()),
        };
        return Ok((toc_digest, Some(manifest)));
    }
    let toc_entry = landmark_like_toc_header(json.len() as u64)?;
    w.append(&toc_entry)?;
    w.append(&json)?;
    w.append(&vec![0u8; padding(json.len() as u64) + 1024])?; // end-of-archive
    w.close_member()?;
    w.flush_inflight()?;
    w.write_raw(&footer_bytes(toc_offset))?;
    Ok((toc_digest, None))
}

fn zstd_level(level: u32) -> i32 {
    i32::try_from(level).unwrap_or(i32::MAX)
}

fn padding(size: u64) -> usize {
    ((512 - size % 512) % 512) as usize
}

fn landmark_like_toc_header(size: u64) -> Result<Vec<u8>> {
    let mut e = landmark(TOC_TAR_NAME);
    e.inline = None;
    e.size = size;
    tar_header(&e)
}

#[derive(Default)]
struct NameCache {
    users: HashMap<u64, String>,
    groups: HashMap<u64, String>,
}

/// Go's `nameIfChanged`: a name is written only when it differs from the last one for that id.
fn name_if_changed(map: &mut HashMap<u64, String>, id: u64, name: &str) -> String {
    if name.is_empty() || map.get(&id).is_some_and(|n| n == name) {
        return String::new();
    }
    map.insert(id, name.to_owned());
    name.to_owned()
}

fn toc_entry(e: &InEntry, names: &mut NameCache) -> TocEntry {
    let kind = match e.typeflag {
        b'1' => EntryType::Hardlink,
        b'2' => EntryType::Symlink,
        b'3' => EntryType::Char,
        b'4' => EntryType::Block,
        b'5' => EntryType::Dir,
        b'6' => EntryType::Fifo,
        _ => EntryType::Reg,
    };
    let is_dev = matches!(kind, EntryType::Char | EntryType::Block);
    TocEntry {
        name: e.name.clone(),
        kind,
        size: if kind == EntryType::Reg {
            e.size as i64
        } else {
            0
        },
        mod_time: if e.mtime == 0 {
            String::new()
        } else {
            rfc3339::format(e.mtime)
        },
        link_name: if matches!(kind, EntryType::Hardlink | EntryType::Symlink) {
            e.link_name.clone()
        } else {
            String::new()
        },
        mode: i64::from(e.mode),
        uid: u32::try_from(e.uid).unwrap_or(u32::MAX),
        gid: u32::try_from(e.gid).unwrap_or(u32::MAX),
        user_name: name_if_changed(&mut names.users, e.uid, &e.uname),
        group_name: name_if_changed(&mut names.groups, e.gid, &e.gname),
        dev_major: if is_dev { e.dev_major } else { 0 },
        dev_minor: if is_dev { e.dev_minor } else { 0 },
        xattrs: e.xattrs.clone(),
        ..Default::default()
    }
}

/// Encodes a tar header (USTAR, preceded by a PAX header when a field does not fit or the
/// input carried PAX records such as xattrs).
fn tar_header(e: &InEntry) -> Result<Vec<u8>> {
    let mut pax: Vec<(String, Vec<u8>)> = e.pax.clone();
    let mut h = tar::Header::new_ustar();
    let u = h
        .as_ustar_mut()
        .ok_or_else(|| EstargzError::InputTar("ustar header".into()))?;
    let name = e.name.as_bytes();
    if name.len() <= 100 && name.is_ascii() {
        u.name[..name.len()].copy_from_slice(name);
    } else if let Some((prefix, base)) = split_ustar(name) {
        u.prefix[..prefix.len()].copy_from_slice(prefix);
        u.name[..base.len()].copy_from_slice(base);
    } else {
        let cut = truncate_at_char(&e.name, 100);
        u.name[..cut.len()].copy_from_slice(cut.as_bytes());
        pax.push(("path".into(), name.to_vec()));
    }
    let link = e.link_name.as_bytes();
    if link.len() <= 100 && link.is_ascii() {
        u.linkname[..link.len()].copy_from_slice(link);
    } else {
        let cut = truncate_at_char(&e.link_name, 100);
        u.linkname[..cut.len()].copy_from_slice(cut.as_bytes());
        pax.push(("linkpath".into(), link.to_vec()));
    }
    h.set_entry_type(tar::EntryType::new(e.typeflag));
    h.set_mode(e.mode);
    h.set_uid(e.uid);
    h.set_gid(e.gid);
    h.set_mtime(u64::try_from(e.mtime).unwrap_or(0));
    if e.size > 0o777_7777_7777 {
        pax.push(("size".into(), e.size.to_string().into_bytes()));
    }
    h.set_size(e.size);
    if h.set_username(&e.uname).is_err() && !pax.iter().any(|(k, _)| k == "uname") {
        pax.push(("uname".into(), e.uname.clone().into_bytes()));
    }
    if h.set_groupname(&e.gname).is_err() && !pax.iter().any(|(k, _)| k == "gname") {
        pax.push(("gname".into(), e.gname.clone().into_bytes()));
    }
    if matches!(e.typeflag, b'3' | b'4') {
        h.set_device_major(e.dev_major).map_err(|err| {
            EstargzError::InputTar(format!("{}: {err}", crate::untrusted::clip(&e.name)))
        })?;
        h.set_device_minor(e.dev_minor).map_err(|err| {
            EstargzError::InputTar(format!("{}: {err}", crate::untrusted::clip(&e.name)))
        })?;
    }
    h.set_cksum();
    let mut out = Vec::with_capacity(1024);
    if !pax.is_empty() {
        pax.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend_from_slice(&pax_header(&e.name, &pax)?);
    }
    out.extend_from_slice(h.as_bytes());
    Ok(out)
}

fn truncate_at_char(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Splits a long ASCII name into USTAR prefix (≤155) and name (≤100) at a slash.
fn split_ustar(name: &[u8]) -> Option<(&[u8], &[u8])> {
    if !name.is_ascii() || name.len() > 256 {
        return None;
    }
    let start = name.len().saturating_sub(101);
    let i = name[start..].iter().position(|&c| c == b'/')? + start;
    let (prefix, base) = (&name[..i], &name[i + 1..]);
    (i > 0 && prefix.len() <= 155 && !base.is_empty() && base.len() <= 100)
        .then_some((prefix, base))
}

fn pax_header(name: &str, records: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    for (k, v) in records {
        let body = k.len() + v.len() + 3; // ' ', '=', '\n'
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        data.extend_from_slice(format!("{len} {k}=").as_bytes());
        data.extend_from_slice(v);
        data.push(b'\n');
    }
    let base = name.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    let pax_name = format!("PaxHeaders.0/{}", truncate_at_char(base, 80));
    let mut h = tar::Header::new_ustar();
    let u = h
        .as_ustar_mut()
        .ok_or_else(|| EstargzError::InputTar("ustar header".into()))?;
    u.name[..pax_name.len()].copy_from_slice(pax_name.as_bytes());
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(&data);
    out.resize(out.len() + padding(data.len() as u64), 0);
    Ok(out)
}

/// Collects uncompressed member bytes, compresses members on worker threads, and writes them
/// in order while hashing the compressed (blob digest) and uncompressed (diff ID) streams.
struct MemberWriter<W: Write> {
    out: W,
    cur: Vec<u8>,
    level: Level,
    diff: Sha256,
    blob: Sha256,
    written: u64,
    uncompressed: u64,
    /// Start offset of every member written so far; indexes match `member_index`.
    offsets: Vec<u64>,
    members: usize,
    pool: Option<Pool>,
    inflight: VecDeque<mpsc::Receiver<io::Result<Vec<u8>>>>,
    max_inflight: usize,
}

type Job = (Vec<u8>, mpsc::SyncSender<io::Result<Vec<u8>>>);

struct Pool {
    tx: Option<mpsc::SyncSender<Job>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

/// What each member is compressed with.
#[derive(Clone, Copy)]
enum Level {
    Gzip(Compression),
    Zstd(i32),
}

/// One gzip member or one zstd frame (which records its size, so the decoder's window is
/// no bigger than the member).
fn compress(data: &[u8], level: Level) -> io::Result<Vec<u8>> {
    match level {
        Level::Gzip(level) => {
            let mut gz = GzEncoder::new(Vec::with_capacity(data.len() / 3 + 64), level);
            gz.write_all(data)?;
            gz.finish()
        }
        Level::Zstd(level) => zstd::bulk::compress(data, level),
    }
}

impl<W: Write> MemberWriter<W> {
    fn new(out: W, opts: &BuildOptions) -> Self {
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            opts.threads
        };
        let level = match opts.format {
            Format::Gzip => Level::Gzip(Compression::new(opts.compression_level.min(9))),
            Format::ZstdChunked => Level::Zstd(zstd_level(opts.compression_level)),
        };
        let pool = (threads > 1).then(|| {
            let (tx, rx) = mpsc::sync_channel::<Job>(threads * 2);
            let rx = Arc::new(Mutex::new(rx));
            let workers = (0..threads)
                .map(|_| {
                    let rx = Arc::clone(&rx);
                    std::thread::spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(guard) => guard.recv(),
                            Err(_) => return,
                        };
                        let Ok((data, reply)) = job else { return };
                        let _ = reply.send(compress(&data, level));
                    })
                })
                .collect();
            Pool {
                tx: Some(tx),
                workers,
            }
        });
        Self {
            out,
            cur: Vec::new(),
            level,
            diff: Sha256::new(),
            blob: Sha256::new(),
            written: 0,
            uncompressed: 0,
            offsets: Vec::new(),
            members: 0,
            pool,
            inflight: VecDeque::new(),
            max_inflight: threads * 2,
        }
    }

    /// Index of the member that the next appended byte belongs to.
    fn member_index(&self) -> usize {
        self.members
    }

    fn append(&mut self, data: &[u8]) -> Result<()> {
        self.cur.extend_from_slice(data);
        Ok(())
    }

    /// Ends the current member (no-op when it is empty), like Go's `closeGz`.
    fn close_member(&mut self) -> Result<()> {
        if self.cur.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.cur);
        self.diff.update(&data);
        self.uncompressed += data.len() as u64;
        self.members += 1;
        match &self.pool {
            Some(Pool { tx: Some(tx), .. }) => {
                let (rtx, rrx) = mpsc::sync_channel(1);
                tx.send((data, rtx))
                    .map_err(|_| io::Error::other("compression worker gone"))?;
                self.inflight.push_back(rrx);
                while self.inflight.len() > self.max_inflight {
                    self.drain_one()?;
                }
            }
            _ => {
                let z = compress(&data, self.level)?;
                self.emit(&z)?;
            }
        }
        Ok(())
    }

    fn drain_one(&mut self) -> Result<()> {
        if let Some(rx) = self.inflight.pop_front() {
            let z = rx
                .recv()
                .map_err(|_| io::Error::other("compression worker gone"))??;
            self.emit(&z)?;
        }
        Ok(())
    }

    fn emit(&mut self, z: &[u8]) -> Result<()> {
        self.offsets.push(self.written);
        self.write_raw(z)
    }

    fn write_raw(&mut self, z: &[u8]) -> Result<()> {
        self.out.write_all(z)?;
        self.blob.update(z);
        self.written += z.len() as u64;
        Ok(())
    }

    fn flush_inflight(&mut self) -> Result<()> {
        while !self.inflight.is_empty() {
            self.drain_one()?;
        }
        Ok(())
    }

    fn member_offsets_so_far(&mut self) -> Result<Vec<u64>> {
        self.flush_inflight()?;
        Ok(self.offsets.clone())
    }

    fn offset_so_far(&mut self) -> Result<u64> {
        self.flush_inflight()?;
        Ok(self.written)
    }

    /// Stops the workers and returns (blob digest, blob size, diff ID, uncompressed size).
    fn finish(mut self) -> Result<(String, u64, String, u64)> {
        let r = self.flush_inflight().and_then(|()| Ok(self.out.flush()?));
        if let Some(mut pool) = self.pool.take() {
            pool.tx.take();
            for w in pool.workers.drain(..) {
                let _ = w.join();
            }
        }
        r?;
        let blob = format!("sha256:{}", hex::encode(self.blob.clone().finalize()));
        let diff = format!("sha256:{}", hex::encode(self.diff.clone().finalize()));
        Ok((blob, self.written, diff, self.uncompressed))
    }
}
