//! The inode table of one layer, built once from the TOC.
//!
//! Invariants: inode numbers are dense (`1` is the root, [`STATE_DIR_INO`] and
//! [`STATE_FILE_INO`] are reserved), every directory's `children` is sorted by name, hardlinks
//! share the inode of their target (whose `nlink` counts them), and every regular file's
//! `chunks` cover `[0, size)` in file order with their compressed range in the blob.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::estargz::{EntryType, Toc, TocEntry};

use super::FsError;

/// The root directory.
pub const ROOT_INO: u64 = 1;
/// `/.stargz-snapshotter`, the state directory (hidden from readdir).
pub const STATE_DIR_INO: u64 = 2;
/// `/.stargz-snapshotter/<digest>.json`.
pub const STATE_FILE_INO: u64 = 3;
const FIRST_INO: u64 = 4;

/// Name of the hidden state directory in the layer root (as Go's `fs/layer`).
pub const STATE_DIR_NAME: &str = ".stargz-snapshotter";
/// Landmark files, hidden in the root.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// What a node is. Whiteouts (`.wh.x` in the TOC) are served as 0:0 character devices named `x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    Reg,
    Symlink,
    Char,
    Block,
    Fifo,
    Whiteout,
}

/// One chunk of a regular file: `len` decompressed bytes at `file_off`, found by decompressing
/// the gzip member at `[blob_off, blob_end)` and skipping `inner_off` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub file_off: u64,
    pub len: u64,
    pub blob_off: u64,
    pub blob_end: u64,
    pub inner_off: u64,
    /// `sha256:<hex>` of the decompressed chunk; empty when the TOC has none.
    pub digest: String,
    /// Position in [`InodeTable::blob_order`]: chunk `seq + 1` is the next one in the blob.
    pub seq: usize,
}

/// One inode.
#[derive(Debug, Clone)]
pub struct Node {
    pub ino: u64,
    pub parent: u64,
    pub kind: NodeKind,
    /// Permission bits including setuid/setgid/sticky (`0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: SystemTime,
    pub rdev: u32,
    pub nlink: u32,
    pub link_name: String,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Visible children (whiteouts already converted, markers and landmarks hidden), by name.
    pub children: BTreeMap<String, u64>,
    pub chunks: Vec<Chunk>,
    /// The directory holds `.wh..wh..opq`: overlayfs must not look below it.
    pub opaque: bool,
}

impl Node {
    fn new(ino: u64, parent: u64, kind: NodeKind) -> Self {
        Node {
            ino,
            parent,
            kind,
            perm: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: UNIX_EPOCH,
            rdev: 0,
            nlink: 1,
            link_name: String::new(),
            xattrs: BTreeMap::new(),
            children: BTreeMap::new(),
            chunks: Vec::new(),
            opaque: false,
        }
    }

    /// `st_blocks`: 512-byte blocks of the 4 KiB-rounded size, as Go reports it.
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(4096) * 8
    }

    /// Index of the first chunk that holds `offset` (chunks are sorted by `file_off`).
    pub fn chunk_index(&self, offset: u64) -> usize {
        self.chunks.partition_point(|c| c.file_off + c.len <= offset)
    }
}

/// Identifies one chunk of the layer: `(inode, index in its chunk list)`.
pub type ChunkId = (u64, usize);

/// All inodes of a layer plus the chunks in blob order.
#[derive(Debug)]
pub struct InodeTable {
    nodes: Vec<Node>,
    /// Every chunk of every file, sorted by compressed offset (what a sequential blob read yields).
    pub blob_order: Vec<ChunkId>,
    /// Offset of the `.prefetch.landmark` payload, if any; `Some(0)` means "no prefetch".
    pub landmark: Option<Landmark>,
}

/// What the layer's landmark files say about prefetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landmark {
    /// Prefetch everything whose payload sits before this blob offset.
    PrefetchBefore(u64),
    /// `.no.prefetch.landmark`: prefetch nothing.
    NoPrefetch,
}

impl InodeTable {
    /// Builds the table. `toc_offset` (where the TOC member starts) ends the last payload.
    pub fn build(toc: &Toc, toc_offset: u64) -> Result<Self, FsError> {
        Builder::new(toc_offset).build(toc)
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        match ino {
            ROOT_INO => self.nodes.first(),
            i if i >= FIRST_INO => self.nodes.get(usize::try_from(i - (FIRST_INO - 1)).ok()?),
            _ => None,
        }
    }

    pub fn chunk(&self, id: ChunkId) -> Option<&Chunk> {
        self.get(id.0)?.chunks.get(id.1)
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Option<&Node> {
        let ino = *self.get(parent)?.children.get(name)?;
        self.get(ino)
    }

    /// Every inode, the root first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Total decompressed payload bytes.
    pub fn payload_size(&self) -> u64 {
        self.nodes.iter().flat_map(|n| n.chunks.iter()).map(|c| c.len).sum()
    }
}

struct Builder {
    toc_offset: u64,
    nodes: Vec<Node>,
    /// Raw TOC names (cleaned) → inode, including hidden entries (whiteouts, markers).
    by_path: HashMap<String, u64>,
    /// Whiteout nodes per directory, converted once every real child is known.
    whiteouts: Vec<(u64, String, u64)>,
    last_reg: Option<u64>,
    landmark: Option<Landmark>,
}

impl Builder {
    fn new(toc_offset: u64) -> Self {
        let mut root = Node::new(ROOT_INO, ROOT_INO, NodeKind::Dir);
        root.nlink = 2;
        let mut by_path = HashMap::new();
        by_path.insert(String::new(), ROOT_INO);
        Builder { toc_offset, nodes: vec![root], by_path, whiteouts: Vec::new(), last_reg: None, landmark: None }
    }

    fn node_mut(&mut self, ino: u64) -> &mut Node {
        let idx = if ino == ROOT_INO { 0 } else { (ino - (FIRST_INO - 1)) as usize };
        &mut self.nodes[idx]
    }

    fn alloc(&mut self, parent: u64, kind: NodeKind) -> u64 {
        let ino = FIRST_INO - 1 + self.nodes.len() as u64;
        self.nodes.push(Node::new(ino, parent, kind));
        ino
    }

    fn build(mut self, toc: &Toc) -> Result<InodeTable, FsError> {
        for e in &toc.entries {
            self.add(e)?;
        }
        self.finish_chunks(toc)?;
        self.apply_whiteouts();
        let blob_order = self.blob_order();
        for (seq, &(ino, i)) in blob_order.iter().enumerate() {
            self.node_mut(ino).chunks[i].seq = seq;
        }
        Ok(InodeTable { nodes: self.nodes, blob_order, landmark: self.landmark })
    }

    /// Directory inode for `path`, creating implicit parents (TOCs may omit them).
    fn dir(&mut self, path: &str) -> Result<u64, FsError> {
        if let Some(&ino) = self.by_path.get(path) {
            return match self.node_mut(ino).kind {
                NodeKind::Dir => Ok(ino),
                _ => Err(FsError::Toc(format!("{path:?} is used as a directory but is not one"))),
            };
        }
        let (parent_path, name) = split(path);
        let parent = self.dir(parent_path)?;
        let ino = self.alloc(parent, NodeKind::Dir);
        self.node_mut(ino).nlink = 2;
        self.link_child(parent, name, ino);
        self.by_path.insert(path.to_string(), ino);
        Ok(ino)
    }

    fn link_child(&mut self, parent: u64, name: &str, ino: u64) {
        if self.node_mut(ino).kind == NodeKind::Dir {
            self.node_mut(parent).nlink += 1;
        }
        if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
            if name == OPAQUE_MARKER {
                self.node_mut(parent).opaque = true;
            } else {
                self.whiteouts.push((parent, target.to_string(), ino));
            }
            return;
        }
        if parent == ROOT_INO && (name == PREFETCH_LANDMARK || name == NO_PREFETCH_LANDMARK || name == STATE_DIR_NAME) {
            return;
        }
        self.node_mut(parent).children.insert(name.to_string(), ino);
    }

    fn add(&mut self, e: &TocEntry) -> Result<(), FsError> {
        let path = clean(&e.name);
        match e.kind {
            EntryType::Chunk => return self.add_chunk(e, &path),
            EntryType::Hardlink => return self.add_hardlink(e, &path),
            _ => {}
        }
        if path.is_empty() {
            if e.kind != EntryType::Dir {
                return Err(FsError::Toc("root entry is not a directory".into()));
            }
            apply_attrs(self.node_mut(ROOT_INO), e);
            return Ok(());
        }
        let kind = match e.kind {
            EntryType::Dir => NodeKind::Dir,
            EntryType::Reg => NodeKind::Reg,
            EntryType::Symlink => NodeKind::Symlink,
            EntryType::Char => NodeKind::Char,
            EntryType::Block => NodeKind::Block,
            EntryType::Fifo => NodeKind::Fifo,
            EntryType::Chunk | EntryType::Hardlink => unreachable!("handled above"),
        };
        let ino = if kind == NodeKind::Dir {
            self.dir(&path)?
        } else {
            if self.by_path.contains_key(&path) {
                return Err(FsError::Toc(format!("duplicate entry {path:?}")));
            }
            let (parent_path, name) = split(&path);
            let parent = self.dir(parent_path)?;
            let ino = self.alloc(parent, kind);
            self.link_child(parent, name, ino);
            self.by_path.insert(path.clone(), ino);
            ino
        };
        let node = self.node_mut(ino);
        apply_attrs(node, e);
        if kind == NodeKind::Reg {
            node.size = u64::try_from(e.size).map_err(|_| FsError::Toc(format!("negative size of {path:?}")))?;
            let size = node.size;
            self.last_reg = Some(ino);
            if size > 0 {
                self.push_chunk(ino, e, &path)?;
            }
            if parent_is_root(&path) && path == PREFETCH_LANDMARK {
                self.landmark = Some(Landmark::PrefetchBefore(e.offset.max(0) as u64));
            } else if parent_is_root(&path) && path == NO_PREFETCH_LANDMARK {
                self.landmark = Some(Landmark::NoPrefetch);
            }
        } else {
            self.last_reg = None;
        }
        Ok(())
    }

    fn add_hardlink(&mut self, e: &TocEntry, path: &str) -> Result<(), FsError> {
        let target = clean(&e.link_name);
        let &ino = self
            .by_path
            .get(&target)
            .ok_or_else(|| FsError::Toc(format!("hardlink {path:?} to unknown {target:?}")))?;
        if self.node_mut(ino).kind == NodeKind::Dir {
            return Err(FsError::Toc(format!("hardlink {path:?} to a directory")));
        }
        let (parent_path, name) = split(path);
        let parent = self.dir(parent_path)?;
        self.node_mut(ino).nlink += 1;
        self.link_child(parent, name, ino);
        self.by_path.insert(path.to_string(), ino);
        self.last_reg = None;
        Ok(())
    }

    fn add_chunk(&mut self, e: &TocEntry, path: &str) -> Result<(), FsError> {
        let ino = self.last_reg.filter(|&ino| self.by_path.get(path) == Some(&ino));
        let ino = ino.ok_or_else(|| FsError::Toc(format!("chunk of {path:?} does not follow its file")))?;
        self.push_chunk(ino, e, path)
    }

    fn push_chunk(&mut self, ino: u64, e: &TocEntry, path: &str) -> Result<(), FsError> {
        let bad = |what: &str| FsError::Toc(format!("{what} in chunk of {path:?}"));
        let file_off = u64::try_from(e.chunk_offset).map_err(|_| bad("negative chunkOffset"))?;
        let blob_off = u64::try_from(e.offset).map_err(|_| bad("negative offset"))?;
        let inner_off = u64::try_from(e.inner_offset).map_err(|_| bad("negative innerOffset"))?;
        let node = self.node_mut(ino);
        let expected = node.chunks.last().map_or(0, |c| c.file_off + c.len);
        if file_off != expected || file_off >= node.size.max(1) {
            return Err(bad("out-of-order chunkOffset"));
        }
        let len = match e.chunk_size {
            0 => node.size - file_off,
            n => u64::try_from(n).map_err(|_| bad("negative chunkSize"))?.min(node.size - file_off),
        };
        let digest = if e.chunk_digest.is_empty() && file_off == 0 && len == node.size {
            e.digest.clone()
        } else {
            e.chunk_digest.clone()
        };
        node.chunks.push(Chunk { file_off, len, blob_off, blob_end: 0, inner_off, digest, seq: 0 });
        Ok(())
    }

    /// Sets each chunk's compressed end: the next distinct payload offset, or the TOC.
    fn finish_chunks(&mut self, _toc: &Toc) -> Result<(), FsError> {
        let mut offsets: Vec<u64> = self.nodes.iter().flat_map(|n| n.chunks.iter().map(|c| c.blob_off)).collect();
        offsets.push(self.toc_offset);
        offsets.sort_unstable();
        offsets.dedup();
        for node in &mut self.nodes {
            if node.kind == NodeKind::Reg && node.chunks.last().map_or(0, |c| c.file_off + c.len) != node.size {
                return Err(FsError::Toc(format!("chunks of inode {} do not cover its size", node.ino)));
            }
            for c in &mut node.chunks {
                let i = offsets.partition_point(|&o| o <= c.blob_off);
                c.blob_end = *offsets
                    .get(i)
                    .ok_or_else(|| FsError::Toc(format!("payload at {} lies past the TOC", c.blob_off)))?;
            }
        }
        Ok(())
    }

    /// Shows `.wh.x` as a 0:0 char device `x`, unless the layer also has a real `x`.
    fn apply_whiteouts(&mut self) {
        for (parent, name, ino) in std::mem::take(&mut self.whiteouts) {
            if self.node_mut(parent).children.contains_key(&name) {
                continue;
            }
            let node = self.node_mut(ino);
            node.kind = NodeKind::Whiteout;
            node.perm = 0;
            node.uid = 0;
            node.gid = 0;
            node.size = 0;
            node.rdev = 0;
            node.nlink = 1;
            node.chunks.clear();
            node.xattrs.clear();
            self.node_mut(parent).children.insert(name, ino);
        }
    }

    fn blob_order(&self) -> Vec<ChunkId> {
        let mut ids: Vec<(u64, ChunkId)> = self
            .nodes
            .iter()
            .flat_map(|n| n.chunks.iter().enumerate().map(move |(i, c)| (c.blob_off, (n.ino, i))))
            .collect();
        ids.sort_unstable();
        // Hardlinked or deduplicated payloads may share a member; keep each chunk once.
        ids.into_iter().map(|(_, id)| id).collect()
    }
}

fn apply_attrs(node: &mut Node, e: &TocEntry) {
    node.perm = (e.mode & 0o7777) as u32;
    node.uid = e.uid;
    node.gid = e.gid;
    node.mtime = parse_rfc3339(&e.mod_time).unwrap_or(UNIX_EPOCH);
    node.link_name = e.link_name.clone();
    node.xattrs = e.xattrs.clone();
    node.rdev = libc::makedev(e.dev_major, e.dev_minor) as u32;
    if node.kind == NodeKind::Symlink {
        node.size = e.link_name.len() as u64;
    }
}

/// Go's `cleanEntryName`: no leading `./` or `/`, no trailing `/`.
fn clean(name: &str) -> String {
    let mut parts = Vec::new();
    for p in name.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

fn parent_is_root(path: &str) -> bool {
    !path.contains('/')
}

/// Parses the RFC 3339 timestamps Go writes (`2006-01-02T15:04:05Z` or with an offset and
/// fractional seconds). Written by hand: no date crate is in the tree and this is the only use.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut nanos: u32 = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let frac = s.get(start..i.min(start + 9))?;
        nanos = format!("{frac:0<9}").parse().ok()?;
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' => 0,
        sign @ (b'+' | b'-') => {
            let v = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' {
                v
            } else {
                -v
            }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    if secs >= 0 {
        Some(UNIX_EPOCH + Duration::new(secs as u64, nanos))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))?.checked_add(Duration::from_nanos(nanos.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(name: &str, kind: EntryType) -> TocEntry {
        TocEntry { name: name.into(), kind, mode: 0o644, ..Default::default() }
    }

    #[test]
    fn rfc3339() {
        let t = parse_rfc3339("2020-01-02T03:04:05Z").expect("parse");
        assert_eq!(t.duration_since(UNIX_EPOCH).expect("after").as_secs(), 1_577_934_245);
        let t = parse_rfc3339("2020-01-02T05:04:05.5+02:00").expect("parse");
        assert_eq!(t.duration_since(UNIX_EPOCH).expect("after").as_millis(), 1_577_934_245_500);
        assert!(parse_rfc3339("garbage").is_none());
    }

    #[test]
    fn table_links_whiteouts_and_chunks() {
        let mut big = ent("d/big", EntryType::Reg);
        big.size = 10;
        big.offset = 100;
        big.chunk_size = 4;
        big.chunk_digest = "sha256:a".into();
        let mut c2 = ent("d/big", EntryType::Chunk);
        c2.offset = 150;
        c2.chunk_offset = 4;
        c2.chunk_digest = "sha256:b".into();
        let mut hl = ent("d/hl", EntryType::Hardlink);
        hl.link_name = "d/big".into();
        let toc = Toc {
            version: 1,
            entries: vec![
                ent("./", EntryType::Dir),
                big,
                c2,
                hl,
                ent("d/.wh.gone", EntryType::Reg),
                ent("e/.wh..wh..opq", EntryType::Reg),
                ent(".no.prefetch.landmark", EntryType::Reg),
            ],
        };
        let t = InodeTable::build(&toc, 300).expect("build");
        let big = t.lookup(ROOT_INO, "d").and_then(|d| t.lookup(d.ino, "big")).expect("big");
        assert_eq!(big.nlink, 2);
        assert_eq!(big.chunks.len(), 2);
        assert_eq!((big.chunks[0].blob_end, big.chunks[1].blob_end, big.chunks[1].len), (150, 300, 6));
        assert_eq!(big.chunk_index(3), 0);
        assert_eq!(big.chunk_index(4), 1);
        let d = t.lookup(ROOT_INO, "d").expect("d");
        assert_eq!(t.lookup(d.ino, "hl").expect("hl").ino, big.ino);
        assert_eq!(t.lookup(d.ino, "gone").expect("wh").kind, NodeKind::Whiteout);
        assert!(t.lookup(d.ino, ".wh.gone").is_none());
        let e = t.lookup(ROOT_INO, "e").expect("e");
        assert!(e.opaque && e.children.is_empty());
        assert!(t.lookup(ROOT_INO, ".no.prefetch.landmark").is_none());
        assert_eq!(t.landmark, Some(Landmark::NoPrefetch));
        assert_eq!(t.blob_order, vec![(big.ino, 0), (big.ino, 1)]);
    }
}
