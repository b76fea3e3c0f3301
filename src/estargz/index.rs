//! The layer index: built once from a TOC, validated, then answers every question the
//! filesystem asks without scanning the TOC again.
//!
//! Semantics follow Go's `estargz.Reader.initFields`, with stricter validation:
//! - names are normalized (`./`, leading `/`, `.` and empty components dropped); a `..`
//!   component or a NUL byte is an error (Go would resolve `..` lexically; we refuse);
//! - duplicate names: the last entry wins, as in Go and as when unpacking a tar;
//! - every entry's parent must be a directory: a file, link or hardlink that replaces (or is
//!   replaced by) a directory with entries below it is an error;
//! - a whiteout must name something: `.wh.` alone is an error (`.wh..wh..opq` is the opaque
//!   marker); turning whiteouts into overlay nodes is the filesystem's business;
//! - missing parent directories are created implicitly (mode 0755, like Go), within a budget;
//! - a hardlink is not an entry of its own: its name points at the target's id (one inode),
//!   which raises the target's `nlink`; a missing or directory target is an error;
//! - the landmark files are recorded (prefetch offsets) and hidden from the tree, as Go's fs does;
//! - every regular file's chunks must cover it exactly, lie inside the blob before the TOC,
//!   and have sane sizes.
//!
//! Memory. Every entry is held once: an [`Entry`] of ~250 bytes, its name at most three times
//! (in the entry, the path map, and its base name in the parent). An explicit entry's name is
//! in the TOC JSON, so explicit entries cost O(JSON bytes). Implicit directories are not paid
//! for by the JSON: one name of n components implies n directories whose full names add up to
//! O(n²) bytes, so a few KiB of compressed TOC could imply gigabytes. With E the number of TOC
//! entries and N the bytes of their names, their count is at most
//! `IMPLICIT_DIRS_PER_ENTRY·E + IMPLICIT_DIRS_SLACK` (2E + 32 Ki) and their full names at most
//! `IMPLICIT_NAME_BYTES_PER_BYTE·N + IMPLICIT_NAME_BYTES_SLACK` (2N + 8 MiB) bytes; a TOC
//! asking for more is refused as soon as it does. What implicit directories hold is then at
//! most 3·(2N + 8 MiB) of names plus (2E + 32 Ki)·~350 bytes of entries and map slots: linear
//! in the TOC plus ~35 MiB, whatever its names and depths say. Real layers list their
//! directories (Docker and BuildKit tars do) and need none; a tar without directory entries
//! implies about one or two per file at most (`locale/xx/LC_MESSAGES` is two for one `.mo`
//! file), and small layers with a few deep names fit in the slack.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use super::footer::{Format, TocLocation};
use super::landmark::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK};
use super::toc::{EntryType, Toc, TocEntry};
use super::{parse_sha256, rfc3339, EstargzError, Result};
use crate::untrusted::clip;

/// Dense entry id: `0` is the root directory, ids are `< LayerIndex::len()`.
pub type EntryId = u32;

/// Largest single chunk we accept: a chunk is buffered whole to verify it before use.
pub const MAX_CHUNK_SIZE: u64 = 256 << 20;
/// Largest file size we accept (1 PiB): anything bigger is a lying TOC.
pub const MAX_FILE_SIZE: u64 = 1 << 50;
/// Longest entry name (Linux `PATH_MAX`).
pub const MAX_NAME_LEN: usize = 4096;
/// Largest `innerOffset`: the bytes before a chunk in its member are decompressed and dropped.
pub const MAX_INNER_OFFSET: u64 = 1 << 30;
/// Implicit directories allowed per TOC entry (see the module doc on memory).
pub(crate) const IMPLICIT_DIRS_PER_ENTRY: usize = 2;
/// Implicit directories allowed whatever the TOC's size: small layers with deep names.
pub(crate) const IMPLICIT_DIRS_SLACK: usize = 32 << 10;
/// Bytes of implicit directories' full names allowed per byte of TOC entry names.
pub(crate) const IMPLICIT_NAME_BYTES_PER_BYTE: usize = 2;
/// Bytes of implicit directories' full names allowed whatever the TOC's size (one 2000-deep
/// name implies ~4 MiB of them).
pub(crate) const IMPLICIT_NAME_BYTES_SLACK: usize = 8 << 20;
/// Prefix of an overlay whiteout name (`.wh.x` deletes `x` of the layers below).
pub(crate) const WHITEOUT_PREFIX: &str = ".wh.";
/// The whiteout name that marks its directory opaque.
pub(crate) const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// One piece of a regular file's payload and where its compressed bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Offset of the chunk within the file.
    pub chunk_offset: u64,
    /// Bytes of file data in the chunk (never 0).
    pub chunk_size: u64,
    /// Blob offset of the gzip member holding the chunk.
    pub compressed_offset: u64,
    /// End of the compressed range: the next distinct member offset, or the TOC offset.
    pub compressed_end: u64,
    /// Uncompressed bytes to skip in the member before the chunk starts.
    pub inner_offset: u64,
    /// sha256 of the chunk's bytes (`chunkDigest`), when the TOC has one.
    pub digest: Option<[u8; 32]>,
}

impl ChunkInfo {
    /// Blob range to fetch to decode this chunk.
    pub fn compressed_range(&self) -> Range<u64> {
        self.compressed_offset..self.compressed_end
    }
    /// File range this chunk covers.
    pub fn file_range(&self) -> Range<u64> {
        self.chunk_offset..self.chunk_offset + self.chunk_size
    }
    /// `sha256:<hex>` of the expected digest.
    pub fn digest_string(&self) -> Option<String> {
        self.digest.map(|d| format!("sha256:{}", hex::encode(d)))
    }
}

/// A file, directory, link or device of the layer (hardlinks share their target's entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Normalized path relative to the root (`""` is the root).
    pub name: String,
    /// Never `Hardlink` or `Chunk`.
    pub kind: EntryType,
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub user_name: String,
    pub group_name: String,
    /// Modification time, Unix seconds and nanoseconds (0 when the TOC has none).
    pub mtime_secs: i64,
    pub mtime_nanos: u32,
    /// File size for regular files, 0 otherwise.
    pub size: u64,
    /// Symlink target, verbatim.
    pub link_name: String,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// `digest` of a regular file's whole payload (not verified by reads; chunks are).
    pub digest: String,
    /// Number of names: 1 + hardlinks for files, 2 + subdirectories for directories.
    pub nlink: u32,
    /// Parent directory (the root is its own parent).
    pub parent: EntryId,
    children: BTreeMap<String, EntryId>,
    chunks: Vec<ChunkInfo>,
}

impl Entry {
    /// `st_mode` as `stat(2)` reports it: file type bits plus permission bits.
    pub fn st_mode(&self) -> u32 {
        let fmt = match self.kind {
            EntryType::Dir => libc::S_IFDIR,
            EntryType::Reg | EntryType::Hardlink | EntryType::Chunk => libc::S_IFREG,
            EntryType::Symlink => libc::S_IFLNK,
            EntryType::Char => libc::S_IFCHR,
            EntryType::Block => libc::S_IFBLK,
            EntryType::Fifo => libc::S_IFIFO,
        };
        fmt | self.mode
    }

    /// `st_rdev` for devices (glibc `makedev` encoding).
    pub fn rdev(&self) -> u64 {
        libc::makedev(self.dev_major, self.dev_minor)
    }

    /// Base name (`""` for the root).
    pub fn base_name(&self) -> &str {
        self.name.rsplit('/').next().unwrap_or("")
    }
}

/// The validated, navigable index of one layer.
#[derive(Debug, Clone)]
pub struct LayerIndex {
    entries: Vec<Entry>,
    paths: HashMap<String, EntryId>,
    prefetch_landmark: Option<u64>,
    no_prefetch: bool,
    missing_chunk_digests: usize,
    layer: String,
    format: Format,
}

/// Normalizes a TOC or tar name to a root-relative path; `..` and NUL are refused.
pub fn normalize_name(name: &str) -> std::result::Result<String, String> {
    if name.contains('\0') {
        return Err("name contains NUL".into());
    }
    // Longer than PATH_MAX cannot be used by any file API, and deep names would make the
    // implicit-directory table quadratic in memory.
    if name.len() > MAX_NAME_LEN {
        return Err(format!("name longer than {MAX_NAME_LEN} bytes"));
    }
    let mut out = String::with_capacity(name.len());
    for comp in name.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err("name has a `..` component".into()),
            c => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c);
            }
        }
    }
    Ok(out)
}

fn parent_of(name: &str) -> &str {
    name.rfind('/').map_or("", |i| &name[..i])
}

/// The error for entry `name`; the name is clipped, and so must be any TOC string in `reason`.
fn invalid(name: &str, reason: impl Into<String>) -> EstargzError {
    EstargzError::InvalidEntry {
        name: clip(name),
        reason: reason.into(),
    }
}

fn non_negative(name: &str, field: &str, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| invalid(name, format!("negative {field} {v}")))
}

/// An entry seen in the TOC, before the tree is linked.
struct Pending {
    entry: Entry,
    /// Normalized hardlink target, for `hardlink` entries.
    hardlink_to: Option<String>,
}

impl LayerIndex {
    /// Builds and validates the index of a gzip blob. `toc_offset` (the end of the chunks,
    /// [`super::TocLocation::payload_end`]) bounds every compressed range; a zstd:chunked
    /// caller sets the format after ([`LayerIndex::set_format`]).
    pub fn build(toc: &Toc, toc_offset: u64) -> Result<Self> {
        let mut b = IndexBuilder {
            toc_offset,
            ..Default::default()
        };
        for e in &toc.entries {
            b.add(e)?;
        }
        b.finish()
    }

    /// Builds the index straight from the TOC the footer found at `location` (a gzip member
    /// or a zstd:chunked frame), entry by entry as the JSON is parsed
    /// ([`super::toc::parse_toc_member_with`]), so the parsed TOC is never held whole. Returns
    /// the index and the TOC digest, which the caller must check before trusting the index.
    pub fn from_toc_member(member: &[u8], location: &TocLocation) -> Result<(Self, String)> {
        let mut b = IndexBuilder {
            toc_offset: location.payload_end(),
            ..Default::default()
        };
        let (_, digest) =
            super::toc::parse_toc_member_with(member, location.format, |e| b.add(&e))?;
        let mut index = b.finish()?;
        index.format = location.format;
        Ok((index, digest))
    }

    /// How the chunks are compressed.
    pub fn format(&self) -> Format {
        self.format
    }
    pub fn set_format(&mut self, format: Format) {
        self.format = format;
    }

    /// Label used in chunk errors (e.g. the layer digest).
    pub fn set_layer_label(&mut self, layer: impl Into<String>) {
        self.layer = layer.into();
    }
    pub fn layer_label(&self) -> &str {
        &self.layer
    }

    pub fn root(&self) -> EntryId {
        0
    }
    /// Number of entries (ids are dense: `0..len()`).
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn entry(&self, id: EntryId) -> Option<&Entry> {
        self.entries.get(id as usize)
    }
    /// All entries in id order.
    pub fn entries(&self) -> impl Iterator<Item = (EntryId, &Entry)> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i as EntryId, e))
    }
    /// Id of a path (any spelling `normalize_name` accepts); hardlink names give the target's id.
    pub fn lookup(&self, path: &str) -> Option<EntryId> {
        let n = normalize_name(path).ok()?;
        self.paths.get(&n).copied()
    }
    pub fn lookup_child(&self, dir: EntryId, name: &str) -> Option<EntryId> {
        self.entry(dir)?.children.get(name).copied()
    }
    /// Directory children by base name, sorted; empty for non-directories.
    pub fn children(&self, dir: EntryId) -> impl Iterator<Item = (&str, EntryId)> {
        self.entry(dir)
            .into_iter()
            .flat_map(|e| e.children.iter().map(|(k, v)| (k.as_str(), *v)))
    }
    pub fn parent(&self, id: EntryId) -> Option<EntryId> {
        self.entry(id).map(|e| e.parent)
    }
    /// All chunks of a regular file, ordered by file offset and covering it exactly.
    pub fn chunks(&self, id: EntryId) -> &[ChunkInfo] {
        self.entry(id).map_or(&[], |e| &e.chunks)
    }
    /// The chunks holding bytes `[offset, offset+len)` of file `id` (binary search).
    pub fn chunks_for_range(&self, id: EntryId, offset: u64, len: u64) -> &[ChunkInfo] {
        let chunks = self.chunks(id);
        let end = offset.saturating_add(len);
        let lo = chunks.partition_point(|c| c.chunk_offset + c.chunk_size <= offset);
        let hi = chunks.partition_point(|c| c.chunk_offset < end);
        if lo >= hi {
            return &[];
        }
        &chunks[lo..hi]
    }
    /// True when the layer has a `.prefetch.landmark`.
    pub fn has_prefetch_landmark(&self) -> bool {
        self.prefetch_landmark.is_some()
    }
    /// Offset of the `.prefetch.landmark` payload: prefetch `[0, this)`.
    pub fn prefetch_end_offset(&self) -> Option<u64> {
        self.prefetch_landmark
    }
    /// True when the layer has a `.no.prefetch.landmark`.
    pub fn no_prefetch(&self) -> bool {
        self.no_prefetch
    }
    /// Go's `VerifyTOC` refuses layers whose data entries lack `chunkDigest`; so do we when
    /// verification is on.
    pub fn require_chunk_digests(&self) -> Result<()> {
        if self.missing_chunk_digests > 0 {
            return Err(EstargzError::MalformedToc(format!(
                "{} chunk(s) have no chunkDigest; cannot verify",
                self.missing_chunk_digests
            )));
        }
        Ok(())
    }
}

#[derive(Default)]
struct IndexBuilder {
    toc_offset: u64,
    slots: Vec<Pending>,
    by_name: HashMap<String, usize>,
    /// Slot of the regular file that following `chunk` entries continue.
    last_reg: Option<usize>,
    /// Every data offset in the TOC (including replaced duplicates and landmarks): member starts.
    data_offsets: Vec<u64>,
    prefetch_landmark: Option<u64>,
    no_prefetch: bool,
    missing_chunk_digests: usize,
    unames: HashMap<u32, String>,
    gnames: HashMap<u32, String>,
    /// Entries seen in the TOC and the bytes of their names: the implicit directory budget.
    toc_entries: usize,
    toc_name_bytes: usize,
}

impl IndexBuilder {
    fn add(&mut self, e: &TocEntry) -> Result<()> {
        self.toc_entries += 1;
        self.toc_name_bytes += e.name.len();
        if e.kind == EntryType::Chunk {
            return self.add_chunk(e);
        }
        self.last_reg = None;
        let name = normalize_name(&e.name).map_err(|r| invalid(&e.name, r))?;
        if name.rsplit('/').next() == Some(WHITEOUT_PREFIX) {
            return Err(invalid(&name, "whiteout of an empty name"));
        }
        if e.kind == EntryType::Reg && super::landmark::is_landmark(&name) {
            let off = non_negative(&name, "offset", e.offset)?;
            self.check_offset(&name, off)?;
            self.data_offsets.push(off);
            if name == PREFETCH_LANDMARK {
                self.prefetch_landmark = Some(off);
            } else if name == NO_PREFETCH_LANDMARK {
                self.no_prefetch = true;
            }
            return Ok(());
        }
        let entry = self.entry_from(e, name)?;
        let hardlink_to = if e.kind == EntryType::Hardlink {
            Some(
                normalize_name(&e.link_name)
                    .map_err(|r| invalid(&entry.name, format!("hardlink target: {r}")))?,
            )
        } else {
            None
        };
        let pending = Pending { entry, hardlink_to };
        let slot = match self.by_name.get(&pending.entry.name) {
            Some(&i) => {
                self.slots[i] = pending; // last wins (Go, tar)
                i
            }
            None => {
                self.by_name
                    .insert(pending.entry.name.clone(), self.slots.len());
                self.slots.push(pending);
                self.slots.len() - 1
            }
        };
        if e.kind == EntryType::Reg {
            self.start_reg(slot, e)?;
        }
        Ok(())
    }

    fn entry_from(&mut self, e: &TocEntry, name: String) -> Result<Entry> {
        let mode = non_negative(&name, "mode", e.mode)? as u32 & 0o7777;
        let size = if e.kind == EntryType::Reg {
            non_negative(&name, "size", e.size)?
        } else {
            0
        };
        if size > MAX_FILE_SIZE {
            return Err(invalid(&name, format!("absurd size {size}")));
        }
        let (mtime_secs, mtime_nanos) = if e.mod_time.is_empty() {
            (0, 0)
        } else {
            rfc3339::parse(&e.mod_time).unwrap_or((0, 0))
        };
        // Go writes userName/groupName only when they change for an id; fill them back in.
        let user_name = fill_name(&mut self.unames, e.uid, &e.user_name);
        let group_name = fill_name(&mut self.gnames, e.gid, &e.group_name);
        let link_name = if e.kind == EntryType::Symlink {
            e.link_name.clone()
        } else {
            String::new()
        };
        Ok(Entry {
            name,
            kind: e.kind,
            mode,
            uid: e.uid,
            gid: e.gid,
            user_name,
            group_name,
            mtime_secs,
            mtime_nanos,
            size,
            link_name,
            dev_major: e.dev_major,
            dev_minor: e.dev_minor,
            xattrs: e.xattrs.clone(),
            digest: e.digest.clone(),
            nlink: 1,
            parent: 0,
            children: BTreeMap::new(),
            chunks: Vec::new(),
        })
    }

    fn check_offset(&self, name: &str, off: u64) -> Result<()> {
        if off >= self.toc_offset {
            return Err(invalid(
                name,
                format!(
                    "payload offset {off} is not before the TOC at {}",
                    self.toc_offset
                ),
            ));
        }
        Ok(())
    }

    fn chunk_from(
        &mut self,
        name: &str,
        e: &TocEntry,
        chunk_offset: u64,
        file_size: u64,
    ) -> Result<ChunkInfo> {
        let compressed_offset = non_negative(name, "offset", e.offset)?;
        self.check_offset(name, compressed_offset)?;
        let inner_offset = non_negative(name, "innerOffset", e.inner_offset)?;
        if inner_offset > MAX_INNER_OFFSET {
            return Err(invalid(name, format!("absurd innerOffset {inner_offset}")));
        }
        let declared = non_negative(name, "chunkSize", e.chunk_size)?;
        let chunk_size = if declared == 0 {
            file_size.saturating_sub(chunk_offset)
        } else {
            declared
        };
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(invalid(
                name,
                format!("bad chunk size {chunk_size} at file offset {chunk_offset}"),
            ));
        }
        if chunk_offset
            .checked_add(chunk_size)
            .is_none_or(|end| end > file_size)
        {
            return Err(invalid(
                name,
                format!("chunk [{chunk_offset}, +{chunk_size}) exceeds file size {file_size}"),
            ));
        }
        let digest = if e.chunk_digest.is_empty() {
            self.missing_chunk_digests += 1;
            None
        } else {
            Some(parse_sha256(&e.chunk_digest).map_err(|_| {
                invalid(name, format!("bad chunkDigest {:?}", clip(&e.chunk_digest)))
            })?)
        };
        self.data_offsets.push(compressed_offset);
        Ok(ChunkInfo {
            chunk_offset,
            chunk_size,
            compressed_offset,
            compressed_end: 0,
            inner_offset,
            digest,
        })
    }

    fn start_reg(&mut self, slot: usize, e: &TocEntry) -> Result<()> {
        let size = self.slots[slot].entry.size;
        let name = self.slots[slot].entry.name.clone();
        if size == 0 {
            return Ok(());
        }
        if e.chunk_offset != 0 {
            return Err(invalid(&name, "first chunk of a file must start at 0"));
        }
        let c = self.chunk_from(&name, e, 0, size)?;
        self.slots[slot].entry.chunks.push(c);
        self.last_reg = Some(slot);
        Ok(())
    }

    fn add_chunk(&mut self, e: &TocEntry) -> Result<()> {
        let slot = self
            .last_reg
            .ok_or_else(|| invalid(&e.name, "chunk entry without a preceding regular file"))?;
        let (name, size) = (
            self.slots[slot].entry.name.clone(),
            self.slots[slot].entry.size,
        );
        let expected = self.slots[slot]
            .entry
            .chunks
            .last()
            .map_or(0, |c| c.chunk_offset + c.chunk_size);
        let chunk_offset = non_negative(&name, "chunkOffset", e.chunk_offset)?;
        if chunk_offset != expected {
            return Err(invalid(
                &name,
                format!("chunk at {chunk_offset}, expected the next one at {expected}"),
            ));
        }
        let c = self.chunk_from(&name, e, chunk_offset, size)?;
        let prev = self.slots[slot].entry.chunks.last().copied();
        if let Some(p) = prev {
            if (c.compressed_offset, c.inner_offset) <= (p.compressed_offset, p.inner_offset) {
                return Err(invalid(&name, "chunk offsets are not increasing"));
            }
        }
        self.slots[slot].entry.chunks.push(c);
        Ok(())
    }

    fn finish(mut self) -> Result<LayerIndex> {
        self.data_offsets.sort_unstable();
        self.data_offsets.dedup();
        for p in &mut self.slots {
            let covered = p
                .entry
                .chunks
                .last()
                .map_or(0, |c| c.chunk_offset + c.chunk_size);
            if covered != p.entry.size {
                return Err(invalid(
                    &p.entry.name,
                    format!("chunks cover {covered} of {} bytes", p.entry.size),
                ));
            }
            for c in &mut p.entry.chunks {
                let i = self
                    .data_offsets
                    .partition_point(|&o| o <= c.compressed_offset);
                c.compressed_end = self.data_offsets.get(i).copied().unwrap_or(self.toc_offset);
            }
        }
        // Names are about to be indexed again by the tree builder: free the first copy now,
        // so the two never peak together (mount-time memory is dominated by this build).
        drop(std::mem::take(&mut self.by_name));
        drop(std::mem::take(&mut self.data_offsets));
        let budget = self.implicit_budget();
        let mut t = TreeBuilder::new(self.slots, budget)?;
        t.link()?;
        Ok(LayerIndex {
            entries: t.entries,
            paths: t.paths,
            prefetch_landmark: self.prefetch_landmark,
            no_prefetch: self.no_prefetch,
            missing_chunk_digests: self.missing_chunk_digests,
            layer: String::new(),
            format: Format::Gzip,
        })
    }
}

impl IndexBuilder {
    /// The implicit directory budget for the entries added so far (see the module doc).
    fn implicit_budget(&self) -> ImplicitBudget {
        let dirs = self.toc_entries.saturating_mul(IMPLICIT_DIRS_PER_ENTRY);
        let bytes = self
            .toc_name_bytes
            .saturating_mul(IMPLICIT_NAME_BYTES_PER_BYTE);
        ImplicitBudget {
            max_dirs: dirs.saturating_add(IMPLICIT_DIRS_SLACK),
            max_name_bytes: bytes.saturating_add(IMPLICIT_NAME_BYTES_SLACK),
            dirs: 0,
            name_bytes: 0,
        }
    }
}

fn fill_name(map: &mut HashMap<u32, String>, id: u32, name: &str) -> String {
    if name.is_empty() {
        map.get(&id).cloned().unwrap_or_default()
    } else {
        map.insert(id, name.to_owned());
        name.to_owned()
    }
}

fn implicit_dir(name: String) -> Entry {
    Entry {
        name,
        kind: EntryType::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        user_name: String::new(),
        group_name: String::new(),
        mtime_secs: 0,
        mtime_nanos: 0,
        size: 0,
        link_name: String::new(),
        dev_major: 0,
        dev_minor: 0,
        xattrs: BTreeMap::new(),
        digest: String::new(),
        nlink: 2,
        parent: 0,
        children: BTreeMap::new(),
        chunks: Vec::new(),
    }
}

/// How many implicit directories (and bytes of their names) the tree may still create.
struct ImplicitBudget {
    max_dirs: usize,
    max_name_bytes: usize,
    dirs: usize,
    name_bytes: usize,
}

/// Links entries into the directory tree once every explicit entry has an id.
struct TreeBuilder {
    entries: Vec<Entry>,
    paths: HashMap<String, EntryId>,
    hardlinks: Vec<(String, String)>,
    implicit: ImplicitBudget,
}

impl TreeBuilder {
    fn new(slots: Vec<Pending>, implicit: ImplicitBudget) -> Result<Self> {
        let entries = Vec::with_capacity(slots.len() + 1);
        let mut t = TreeBuilder {
            entries,
            paths: HashMap::new(),
            hardlinks: Vec::new(),
            implicit,
        };
        // The root takes id 0: the TOC's own "" / "./" entry when present. The rest keep TOC
        // order, consumed in place (no second vector of pending entries).
        let mut slots = slots;
        let root_at = slots.iter().position(|p| p.entry.name.is_empty());
        let mut root = match root_at {
            Some(i) => {
                let e = std::mem::replace(&mut slots[i].entry, implicit_dir(String::new()));
                if e.kind != EntryType::Dir {
                    return Err(invalid("", "the root is not a directory"));
                }
                e
            }
            None => implicit_dir(String::new()),
        };
        root.nlink = 2;
        t.push(root)?;
        for (i, p) in slots.into_iter().enumerate() {
            if Some(i) == root_at {
                continue;
            }
            match p.hardlink_to {
                Some(target) => t.hardlinks.push((p.entry.name, target)),
                None => {
                    t.push(p.entry)?;
                }
            }
        }
        Ok(t)
    }

    fn push(&mut self, e: Entry) -> Result<EntryId> {
        let id = EntryId::try_from(self.entries.len())
            .map_err(|_| invalid(&e.name, "too many entries"))?;
        self.paths.insert(e.name.clone(), id);
        self.entries.push(e);
        Ok(id)
    }

    fn link(&mut self) -> Result<()> {
        let hardlinks = std::mem::take(&mut self.hardlinks);
        let links: HashMap<&str, &str> = hardlinks
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_str()))
            .collect();
        let explicit = self.entries.len();
        for id in 1..explicit as EntryId {
            let name = self.entries[id as usize].name.clone();
            let parent = self.dir_for(parent_of(&name), &name, &links)?;
            self.attach(parent, &name, id);
        }
        for (name, target) in &hardlinks {
            let id = self.resolve_hardlink(name, target, &links)?;
            let parent = self.dir_for(parent_of(name), name, &links)?;
            if self.paths.contains_key(name) {
                // `dir_for` refuses to create a directory at a hardlink's name, and explicit
                // names are unique, so this is only a guard that the rule holds.
                return Err(invalid(name, "hardlink would replace a directory"));
            }
            self.entries[id as usize].nlink += 1;
            self.paths.insert(name.clone(), id);
            self.attach_name(parent, name, id);
        }
        Ok(())
    }

    /// Follows hardlink-to-hardlink chains (bounded) to a real entry.
    fn resolve_hardlink(
        &self,
        name: &str,
        target: &str,
        links: &HashMap<&str, &str>,
    ) -> Result<EntryId> {
        let mut t = target;
        for _ in 0..=links.len() {
            if let Some(&id) = self.paths.get(t) {
                if self.entries[id as usize].kind == EntryType::Dir {
                    return Err(invalid(
                        name,
                        format!("hardlink to directory {:?}", clip(t)),
                    ));
                }
                return Ok(id);
            }
            match links.get(t) {
                Some(next) => t = next,
                None => {
                    return Err(invalid(
                        name,
                        format!("hardlink target {:?} not found", clip(target)),
                    ))
                }
            }
        }
        Err(invalid(name, "hardlink cycle"))
    }

    /// Id of directory `dir`, created (with its ancestors) when the TOC lacks it, within the
    /// implicit directory budget. The one place the rule "a parent is a directory" is checked:
    /// against explicit entries and against hardlink names (`links`), whatever the TOC order.
    /// Iterative: a hostile TOC may nest names very deeply.
    fn dir_for(&mut self, dir: &str, child: &str, links: &HashMap<&str, &str>) -> Result<EntryId> {
        let mut missing = Vec::new();
        let mut cur = dir;
        let not_a_dir = |cur: &str, missing: &[&str]| {
            let below = missing.last().copied().unwrap_or(child);
            invalid(below, format!("parent {:?} is not a directory", clip(cur)))
        };
        let mut top = loop {
            if let Some(&id) = self.paths.get(cur) {
                if self.entries[id as usize].kind != EntryType::Dir {
                    return Err(not_a_dir(cur, &missing));
                }
                break id;
            }
            if links.contains_key(cur) {
                return Err(not_a_dir(cur, &missing));
            }
            missing.push(cur);
            cur = parent_of(cur);
        };
        let b = &mut self.implicit;
        let bytes: usize = missing.iter().map(|m| m.len()).sum();
        if b.dirs + missing.len() > b.max_dirs || b.name_bytes + bytes > b.max_name_bytes {
            return Err(invalid(
                child,
                format!(
                    "the TOC implies more parent directories than it lists (limit {} directories, {} bytes of names)",
                    b.max_dirs, b.max_name_bytes
                ),
            ));
        }
        b.dirs += missing.len();
        b.name_bytes += bytes;
        for name in missing.into_iter().rev() {
            let id = self.push(implicit_dir(name.to_owned()))?;
            self.attach(top, name, id);
            top = id;
        }
        Ok(top)
    }

    fn attach(&mut self, parent: EntryId, name: &str, id: EntryId) {
        self.entries[id as usize].parent = parent;
        if self.entries[id as usize].kind == EntryType::Dir {
            self.entries[parent as usize].nlink += 1;
        }
        self.attach_name(parent, name, id);
    }

    fn attach_name(&mut self, parent: EntryId, name: &str, id: EntryId) {
        let base = name.rsplit('/').next().unwrap_or(name).to_owned();
        self.entries[parent as usize].children.insert(base, id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(name: &str, kind: EntryType) -> TocEntry {
        TocEntry {
            name: name.into(),
            kind,
            ..Default::default()
        }
    }
    fn reg(name: &str, size: i64, offset: i64) -> TocEntry {
        TocEntry {
            size,
            offset,
            chunk_digest: format!("sha256:{}", "a".repeat(64)),
            ..ent(name, EntryType::Reg)
        }
    }
    fn chunk(offset: i64, chunk_offset: i64, chunk_size: i64) -> TocEntry {
        TocEntry {
            offset,
            chunk_offset,
            chunk_size,
            ..ent("", EntryType::Chunk)
        }
    }
    fn build(entries: Vec<TocEntry>) -> Result<LayerIndex> {
        LayerIndex::build(
            &Toc {
                version: 1,
                entries,
            },
            10_000,
        )
    }

    #[test]
    fn implicit_parents_and_nlink() {
        let idx = build(vec![reg("./a/b/c", 3, 100), ent("a/d/", EntryType::Dir)]).expect("build");
        let c = idx.lookup("/a/b/c").expect("c");
        let b = idx.parent(c).expect("parent");
        assert_eq!(idx.entry(b).expect("b").name, "a/b");
        assert_eq!(idx.entry(b).expect("b").mode, 0o755);
        let a = idx.lookup("a").expect("a");
        assert_eq!(
            idx.entry(a).expect("a").nlink,
            4,
            "a has two subdirectories"
        );
        assert_eq!(
            idx.children(a).map(|(n, _)| n).collect::<Vec<_>>(),
            vec!["b", "d"]
        );
        assert_eq!(idx.parent(idx.root()), Some(0));
        assert_eq!(
            idx.chunks(c)[0].compressed_end,
            10_000,
            "last member ends at the TOC"
        );
    }

    #[test]
    fn duplicates_last_wins() {
        let mut second = reg("f", 5, 200);
        second.mode = 0o600;
        let idx = build(vec![reg("f", 3, 100), second]).expect("build");
        let f = idx.entry(idx.lookup("f").expect("f")).expect("entry");
        assert_eq!((f.size, f.mode), (5, 0o600));
        // But turning a directory with children into a file is refused.
        assert!(build(vec![
            ent("d", EntryType::Dir),
            reg("d/x", 1, 100),
            reg("d", 1, 200)
        ])
        .is_err());
    }

    #[test]
    fn hostile_names_and_links_are_refused() {
        assert!(build(vec![reg("../etc/passwd", 1, 100)]).is_err());
        assert!(build(vec![reg("a/../../b", 1, 100)]).is_err());
        assert!(build(vec![TocEntry {
            link_name: "nope".into(),
            ..ent("h", EntryType::Hardlink)
        }])
        .is_err());
        assert!(build(vec![
            ent("d", EntryType::Dir),
            TocEntry {
                link_name: "d".into(),
                ..ent("h", EntryType::Hardlink)
            }
        ])
        .is_err());
        assert!(
            build(vec![reg("f", 1, 100), reg("f/x", 1, 200)]).is_err(),
            "parent is a file"
        );
        assert!(build(vec![reg("", 1, 100)]).is_err(), "root must be a dir");
        // Hardlink chains resolve; cycles are refused.
        let l1 = TocEntry {
            link_name: "f".into(),
            ..ent("l1", EntryType::Hardlink)
        };
        let l2 = TocEntry {
            link_name: "l1".into(),
            ..ent("l2", EntryType::Hardlink)
        };
        let idx = build(vec![l2, reg("f", 1, 100), l1]).expect("chain");
        assert_eq!(idx.lookup("l2"), idx.lookup("f"));
        assert_eq!(idx.entry(idx.lookup("f").expect("f")).expect("f").nlink, 3);
        let c1 = TocEntry {
            link_name: "c2".into(),
            ..ent("c1", EntryType::Hardlink)
        };
        let c2 = TocEntry {
            link_name: "c1".into(),
            ..ent("c2", EntryType::Hardlink)
        };
        assert!(build(vec![c1, c2]).is_err());
    }

    #[test]
    fn lying_sizes_and_offsets_are_refused() {
        assert!(
            build(vec![reg("f", 10, 20_000)]).is_err(),
            "offset past the TOC"
        );
        assert!(build(vec![reg("f", -1, 100)]).is_err());
        assert!(build(vec![reg("f", 1 << 60, 100)]).is_err());
        let mut big = reg("f", 100, 100);
        big.chunk_size = 40;
        assert!(
            build(vec![big.clone()]).is_err(),
            "chunks do not cover the file"
        );
        assert!(build(vec![big.clone(), chunk(200, 50, 0)]).is_err(), "gap");
        assert!(
            build(vec![big.clone(), chunk(200, 40, 100)]).is_err(),
            "past the end"
        );
        assert!(
            build(vec![big.clone(), chunk(50, 40, 0)]).is_err(),
            "offsets go backwards"
        );
        assert!(build(vec![chunk(50, 0, 0)]).is_err(), "orphan chunk");
        let idx = build(vec![big, chunk(200, 40, 40), chunk(300, 80, 0)]).expect("ok");
        let f = idx.lookup("f").expect("f");
        let cs = idx.chunks(f);
        assert_eq!(
            cs.iter()
                .map(|c| (c.chunk_offset, c.chunk_size, c.compressed_end))
                .collect::<Vec<_>>(),
            vec![(0, 40, 200), (40, 40, 300), (80, 20, 10_000)]
        );
        assert_eq!(idx.chunks_for_range(f, 39, 2).len(), 2);
        assert_eq!(idx.chunks_for_range(f, 40, 40).len(), 1);
        assert_eq!(idx.chunks_for_range(f, 100, 5).len(), 0);
        let mut bad = reg("g", 1, 100);
        bad.chunk_digest = "md5:x".into();
        assert!(build(vec![bad]).is_err());
    }

    #[test]
    fn shared_members_use_inner_offsets() {
        let mut a = reg("a", 10, 100);
        a.inner_offset = 512;
        let mut b = reg("b", 10, 100);
        b.inner_offset = 1024;
        let idx = build(vec![a, b, reg("c", 1, 400)]).expect("build");
        for (n, inner) in [("a", 512), ("b", 1024)] {
            let c = idx.chunks(idx.lookup(n).expect("id"))[0];
            assert_eq!(
                (c.compressed_offset, c.compressed_end, c.inner_offset),
                (100, 400, inner)
            );
        }
    }

    #[test]
    fn deep_nesting_does_not_overflow_the_stack() {
        let deep = vec!["d"; 2000].join("/");
        let idx = build(vec![reg(&deep, 1, 100)]).expect("build");
        assert_eq!(idx.len(), 2001);
        let too_deep = vec!["d"; 3000].join("/");
        assert!(build(vec![reg(&too_deep, 1, 100)]).is_err());
    }

    /// Runs the tree builder over `entries` and returns its result with what it holds in
    /// implicit directories (count, bytes of full names) and its budget.
    fn implicit_held(entries: &[TocEntry]) -> (Result<()>, usize, usize, (usize, usize)) {
        let mut b = IndexBuilder {
            toc_offset: 10_000,
            ..Default::default()
        };
        for e in entries {
            b.add(e).expect("add");
        }
        let budget = b.implicit_budget();
        let limits = (budget.max_dirs, budget.max_name_bytes);
        let mut t = TreeBuilder::new(b.slots, budget).expect("tree");
        let explicit = t.entries.len();
        let linked = t.link();
        let implicit = &t.entries[explicit..];
        (
            linked,
            implicit.len(),
            implicit.iter().map(|e| e.name.len()).sum(),
            limits,
        )
    }

    /// `x<i>/d/d/…/d/f`, just under the name limit: each implies ~2000 directories and ~4 MiB
    /// of their names.
    fn deep_chains(n: usize) -> Vec<TocEntry> {
        let chain = vec!["d"; (MAX_NAME_LEN - 16) / 2].join("/");
        (0..n)
            .map(|i| reg(&format!("x{i}/{chain}/f"), 1, 100))
            .collect()
    }

    #[test]
    fn hostile_deep_chains_stay_within_the_implicit_budget() {
        let entries = deep_chains(3000);
        let (linked, dirs, bytes, (max_dirs, max_bytes)) = implicit_held(&entries);
        let err = linked.expect_err("refused").to_string();
        assert!(err.contains("implies more parent directories"), "{err}");
        assert!(
            err.len() < 1024,
            "the name in the error is clipped: {} bytes",
            err.len()
        );
        let names: usize = entries.iter().map(|e| e.name.len()).sum();
        assert_eq!(
            (max_dirs, max_bytes),
            (
                2 * entries.len() + IMPLICIT_DIRS_SLACK,
                2 * names + IMPLICIT_NAME_BYTES_SLACK
            )
        );
        assert!(
            dirs <= max_dirs && bytes <= max_bytes,
            "held {dirs} dirs, {bytes} name bytes"
        );
        // Unbounded, these 3000 names (12 MB of JSON) would imply 6 million directories and
        // 12 GB of names.
        assert!(bytes < 40 << 20, "{bytes}");

        // The same TOC as a compressed member (~tens of KiB) is refused just as quickly.
        let json = serde_json::to_vec(&Toc {
            version: 1,
            entries,
        })
        .expect("json");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let mut tar = super::super::tar_header::tests::header(
            b"stargz.index.json",
            b'0',
            json.len() as u64,
            false,
        )
        .to_vec();
        tar.extend_from_slice(&json);
        std::io::Write::write_all(&mut gz, &tar).expect("gz");
        let member = gz.finish().expect("gz");
        assert!(member.len() < 256 << 10, "{}", member.len());
        let started = std::time::Instant::now();
        let location = TocLocation {
            toc_offset: 10_000,
            footer_size: 51,
            legacy: false,
            format: Format::Gzip,
            toc_size: None,
        };
        assert!(LayerIndex::from_toc_member(&member, &location).is_err());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_few_deep_names_fit_in_the_slack() {
        let entries = deep_chains(2);
        let (linked, dirs, bytes, (max_dirs, max_bytes)) = implicit_held(&entries);
        linked.expect("two deep names build");
        assert!(dirs > 3000 && dirs <= max_dirs && bytes <= max_bytes);
    }

    /// A rootfs-like layer whose tar lists no directories (as some hand-rolled tools write):
    /// packages with docs, Python modules, and locale files (two implicit directories per file).
    #[test]
    fn realistic_layer_without_directory_entries_builds() {
        let mut entries = Vec::new();
        for p in 0..400 {
            entries.push(reg(&format!("usr/share/doc/pkg{p}/copyright"), 1, 100));
            entries.push(reg(
                &format!("usr/share/doc/pkg{p}/changelog.Debian.gz"),
                1,
                100,
            ));
            entries.push(reg(&format!("usr/bin/tool{p}"), 1, 100));
            for m in 0..10 {
                entries.push(reg(
                    &format!(
                        "usr/lib/python3/dist-packages/pkg{p}/sub{}/mod{m}.py",
                        m % 3
                    ),
                    1,
                    100,
                ));
            }
        }
        for lang in 0..300 {
            for pkg in ["coreutils", "tar", "apt"] {
                entries.push(reg(
                    &format!("usr/share/locale/l{lang}/LC_MESSAGES/{pkg}.mo"),
                    1,
                    100,
                ));
            }
        }
        for e in 0..70_000 {
            entries.push(reg(
                &format!("usr/share/locale-only/x{e}/LC_MESSAGES/only.mo"),
                1,
                100,
            ));
        }
        let files = entries.len();
        let (linked, dirs, bytes, (max_dirs, max_bytes)) = implicit_held(&entries);
        linked.expect("builds");
        assert!(
            dirs > files && dirs <= max_dirs && bytes <= max_bytes,
            "{dirs} dirs, {bytes} bytes for {files} files"
        );
        let idx = build(entries).expect("index");
        assert_eq!(idx.len(), 1 + files + dirs);
        let mo = idx
            .lookup("usr/share/locale/l7/LC_MESSAGES/tar.mo")
            .expect("mo");
        assert_eq!(
            idx.entry(idx.parent(mo).expect("parent"))
                .expect("dir")
                .mode,
            0o755
        );
    }

    #[test]
    fn nothing_replaces_a_directory_with_entries() {
        let hl = |name: &str, to: &str| TocEntry {
            link_name: to.into(),
            ..ent(name, EntryType::Hardlink)
        };
        let sym = |name: &str| TocEntry {
            link_name: "x".into(),
            ..ent(name, EntryType::Symlink)
        };
        // Explicit directory, children, then a non-directory of the same name; and the
        // other orders, with and without the directory entry.
        for late in [
            reg("d", 1, 200),
            hl("d", "f"),
            sym("d"),
            ent("d", EntryType::Fifo),
        ] {
            let cases = [
                vec![
                    reg("f", 1, 100),
                    ent("d", EntryType::Dir),
                    reg("d/x", 1, 300),
                    late.clone(),
                ],
                vec![reg("f", 1, 100), reg("d/x", 1, 300), late.clone()],
                vec![reg("f", 1, 100), late.clone(), reg("d/x/y", 1, 300)],
                vec![reg("f", 1, 100), late.clone(), hl("d/h", "f")],
            ];
            for entries in cases {
                let err = build(entries.clone())
                    .expect_err(&format!("{entries:?}"))
                    .to_string();
                assert!(err.contains("is not a directory"), "{err}");
            }
        }
        // Replacing an empty directory is the ordinary last-wins rule.
        let idx = build(vec![
            reg("f", 1, 100),
            ent("d", EntryType::Dir),
            hl("d", "f"),
        ])
        .expect("empty dir replaced");
        assert_eq!(idx.lookup("d"), idx.lookup("f"));
    }

    #[test]
    fn whiteouts_must_name_something() {
        for bad in [".wh.", "dir/.wh.", "./a/b/.wh./"] {
            for kind in [EntryType::Reg, EntryType::Dir, EntryType::Char] {
                let err = build(vec![ent(bad, kind)]).expect_err(bad).to_string();
                assert!(err.contains("empty name"), "{err}");
            }
        }
        let idx = build(vec![
            ent("d/.wh..wh..opq", EntryType::Reg),
            ent(".wh.x", EntryType::Reg),
            ent("d/.wh.y", EntryType::Char),
        ])
        .expect("ok");
        assert!(idx.lookup("d/.wh..wh..opq").is_some() && idx.lookup(".wh.x").is_some());
    }

    #[test]
    fn toc_strings_in_errors_are_clipped() {
        let long = "n".repeat(MAX_NAME_LEN);
        let mut bad_digest = reg(&long, 1, 100);
        bad_digest.chunk_digest = format!("sha256:{}", "z".repeat(100_000));
        let cases = [
            vec![reg(&long, -1, 100)],
            vec![bad_digest],
            vec![TocEntry {
                link_name: "t".repeat(MAX_NAME_LEN),
                ..ent(&long, EntryType::Hardlink)
            }],
            vec![reg(&long, 1, 100), reg(&format!("{long}/x"), 1, 200)],
            vec![reg(&"m".repeat(100_000), 1, 100)],
        ];
        for entries in cases {
            let err = build(entries).expect_err("invalid").to_string();
            assert!(err.len() < 1024, "{} bytes: {}", err.len(), &err[..200]);
        }
        assert!(
            std::mem::size_of::<Entry>() <= 256,
            "the module doc's ~250 bytes"
        );
    }

    #[test]
    fn landmarks_are_recorded_and_hidden() {
        let idx = build(vec![
            reg("a", 1, 100),
            reg(".prefetch.landmark", 1, 300),
            reg("b", 1, 400),
        ])
        .expect("build");
        assert_eq!(idx.prefetch_end_offset(), Some(300));
        assert!(idx.lookup(".prefetch.landmark").is_none());
        assert_eq!(
            idx.chunks(idx.lookup("a").expect("a"))[0].compressed_end,
            300
        );
        let idx = build(vec![reg(".no.prefetch.landmark", 1, 100)]).expect("build");
        assert!(idx.no_prefetch() && !idx.has_prefetch_landmark());
    }
}
