//! The inode table of one layer, built once from the validated [`LayerIndex`].
//!
//! `estargz` owns the format rules (names, hardlinks, chunk ranges, landmarks); this adds what
//! only a FUSE mount needs: inode numbers, overlay whiteout/opaque conventions, the hidden
//! state directory, and the blob-order chunk sequence the reader fetches by.
//!
//! The daemon keeps one table per mounted layer for its whole life, so the table is a handful
//! of flat vectors (nodes, directory entries, chunks, one name arena) instead of a map, a
//! string and a vector per inode: a few large blocks can be given back to the kernel, tens of
//! thousands of small ones interleaved with the index's freed memory cannot.
//!
//! Invariants: inode numbers are dense (`1` is the root, [`STATE_DIR_INO`] and
//! [`STATE_FILE_INO`] are reserved), every directory's entries are sorted by name (byte order),
//! hardlinks share the inode of their target (whose `nlink` counts them), and every regular
//! file's chunks cover `[0, size)` in file order with their compressed range in the blob.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::estargz::index::{OPAQUE_WHITEOUT as OPAQUE_MARKER, WHITEOUT_PREFIX};
use crate::estargz::{ChunkInfo, Entry, EntryId, EntryType, EstargzError, Format, LayerIndex};

use super::FsError;

/// The root directory.
pub const ROOT_INO: u64 = 1;
/// `/.stargz-snapshotter`, the state directory (hidden from readdir).
pub const STATE_DIR_INO: u64 = 2;
/// `/.stargz-snapshotter/<digest>.json`.
pub const STATE_FILE_INO: u64 = 3;
const FIRST_INO: u64 = 4;

/// The xattr by which overlayfs knows an opaque directory (its lower layers' entries hidden).
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Name of the hidden state directory in the layer root (as Go's `fs/layer`). A layer entry
/// at this name, its whiteout, or anything below it would shadow the daemon's own files, so
/// such a layer is refused ([`InodeTable::build`]).
pub const STATE_DIR_NAME: &str = ".stargz-snapshotter";

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

/// One chunk of a regular file as the index describes it, plus its place in blob order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub info: ChunkInfo,
    /// Position in [`InodeTable::blob_order`]: chunk `seq + 1` is the next one in the blob.
    pub seq: usize,
}

/// A range of one of the table's flat vectors. `u32` halves its cost per node; the TOC size
/// limit (256 MiB of JSON) keeps every vector far below 4 Gi elements, and [`Span::new`]
/// refuses anything larger rather than wrap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn new(start: usize, end: usize) -> Result<Self, FsError> {
        let too_large = || FsError::TooLarge(end);
        let start = u32::try_from(start).map_err(|_| too_large())?;
        let len = u32::try_from(end - start as usize).map_err(|_| too_large())?;
        start.checked_add(len).ok_or_else(too_large)?;
        Ok(Span { start, len })
    }

    fn range(self) -> Range<usize> {
        self.start as usize..self.start as usize + self.len as usize
    }
}

/// One visible name in a directory: its bytes in the name arena and the inode it names.
#[derive(Debug, Clone, Copy)]
struct Dirent {
    name: Span,
    ino: u64,
}

/// One inode. Its names, chunks, link target and xattrs live in the [`InodeTable`]; ask the
/// table for them ([`InodeTable::children`], [`InodeTable::chunks`], ...).
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
    /// The directory holds `.wh..wh..opq`: overlayfs must not look below it.
    pub opaque: bool,
    /// Visible children (whiteouts already converted, markers and landmarks hidden), by name.
    children: Span,
    chunks: Span,
    link_name: Span,
    /// Index into the table's side vector of xattr maps (rare in images).
    xattrs: Option<u32>,
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
            opaque: false,
            children: Span::default(),
            chunks: Span::default(),
            link_name: Span::default(),
            xattrs: None,
        }
    }

    /// `st_blocks`: 512-byte blocks of the 4 KiB-rounded size, as Go reports it.
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(4096) * 8
    }

    /// Number of visible directory entries (0 for non-directories).
    pub fn child_count(&self) -> usize {
        self.children.len as usize
    }
}

/// Identifies one chunk of the layer: `(inode, index in its chunk list)`.
pub type ChunkId = (u64, usize);

/// All inodes of a layer plus the chunks in blob order.
#[derive(Debug)]
pub struct InodeTable {
    nodes: Vec<Node>,
    /// Every directory's entries, one directory after another, each sorted by name.
    dirents: Vec<Dirent>,
    /// Entry names and symlink targets, back to back.
    names: String,
    /// Every file's chunks, one file after another, each in file order.
    chunks: Vec<Chunk>,
    xattrs: Vec<BTreeMap<String, Vec<u8>>>,
    /// Every chunk of every file, sorted by compressed offset (what a sequential blob read yields).
    pub blob_order: Vec<ChunkId>,
    /// Offset of the `.prefetch.landmark` payload, if any; `Some(0)` means "no prefetch".
    pub landmark: Option<Landmark>,
    /// How the chunks are compressed (gzip eStargz or zstd:chunked).
    pub format: Format,
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
    /// Builds the table from the validated index: entry ids map 1:1 to inodes (see [`ino_of`]),
    /// so names, hardlinks and chunk ranges are exactly what `estargz` checked. Every vector is
    /// sized from the index up front and trimmed after, so the index can be dropped right away
    /// and leaves no small allocations of the table among its freed memory.
    pub fn build(index: &LayerIndex) -> Result<Self, FsError> {
        check_state_dir_free(index)?;
        let mut t = InodeTable::with_capacity(index);
        for (id, e) in index.entries() {
            let node = t.node_from(id, e)?;
            t.nodes.push(node);
        }
        let mut scratch = Vec::new();
        for (id, e) in index.entries() {
            if e.kind == EntryType::Dir {
                t.link_children(index, id, &mut scratch)?;
            }
        }
        for (id, e) in index.entries() {
            t.add_payload(index, id, e)?;
        }
        t.blob_order = blob_order(&t.nodes, &t.chunks);
        for (seq, &(ino, i)) in t.blob_order.iter().enumerate() {
            let flat = Self::index_of(ino)
                .and_then(|k| t.nodes.get(k))
                .map(|n| n.chunks.start as usize + i);
            if let Some(c) = flat.and_then(|k| t.chunks.get_mut(k)) {
                c.seq = seq;
            }
        }
        t.format = index.format();
        t.landmark = if index.no_prefetch() {
            Some(Landmark::NoPrefetch)
        } else {
            index.prefetch_end_offset().map(Landmark::PrefetchBefore)
        };
        t.shrink_to_fit();
        Ok(t)
    }

    /// Empty vectors with room for everything the index holds (an upper bound: hidden names
    /// and whiteout prefixes only shrink it).
    fn with_capacity(index: &LayerIndex) -> Self {
        let (mut dirents, mut names, mut chunks) = (0, 0, 0);
        for (id, e) in index.entries() {
            for (name, _) in index.children(id) {
                dirents += 1;
                names += name.len();
            }
            names += e.link_name.len();
            chunks += index.chunks(id).len();
        }
        InodeTable {
            nodes: Vec::with_capacity(index.len()),
            dirents: Vec::with_capacity(dirents),
            names: String::with_capacity(names),
            chunks: Vec::with_capacity(chunks),
            xattrs: Vec::new(),
            blob_order: Vec::new(),
            landmark: None,
            format: Format::Gzip,
        }
    }

    fn shrink_to_fit(&mut self) {
        self.nodes.shrink_to_fit();
        self.dirents.shrink_to_fit();
        self.names.shrink_to_fit();
        self.chunks.shrink_to_fit();
        self.xattrs.shrink_to_fit();
        self.blob_order.shrink_to_fit();
    }

    fn index_of(ino: u64) -> Option<usize> {
        match ino {
            ROOT_INO => Some(0),
            i if i >= FIRST_INO => usize::try_from(i - (FIRST_INO - 1)).ok(),
            _ => None,
        }
    }

    /// Position of `ino` in [`Self::nodes`].
    pub(crate) fn index(&self, ino: u64) -> Option<usize> {
        Self::index_of(ino).filter(|&i| i < self.nodes.len())
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(Self::index_of(ino)?)
    }

    pub fn chunk(&self, id: ChunkId) -> Option<&Chunk> {
        self.chunks(self.get(id.0)?).get(id.1)
    }

    /// The child `name` of directory `parent` (binary search over its sorted entries).
    pub fn lookup(&self, parent: u64, name: &str) -> Option<&Node> {
        let dirents = self.dirents.get(self.get(parent)?.children.range())?;
        let i = dirents
            .binary_search_by(|d| self.name(d.name).cmp(name))
            .ok()?;
        self.get(dirents[i].ino)
    }

    /// A directory's visible entries `(name, ino)` in name (byte) order from the `skip`-th on,
    /// without walking the ones before (readdir resumes at an offset, so listing a directory
    /// stays linear in its size); empty for other nodes.
    pub fn children_from(&self, dir: &Node, skip: usize) -> impl Iterator<Item = (&str, u64)> + '_ {
        let range = dir.children.range();
        let start = range.start.saturating_add(skip).min(range.end);
        self.dirents
            .get(start..range.end)
            .unwrap_or_default()
            .iter()
            .map(|d| (self.name(d.name), d.ino))
    }

    /// A regular file's chunks in file order; empty for other nodes.
    pub fn chunks(&self, node: &Node) -> &[Chunk] {
        self.chunks.get(node.chunks.range()).unwrap_or_default()
    }

    /// Index (in [`Self::chunks`]) of the first chunk of `node` that holds `offset`.
    pub fn chunk_index(&self, node: &Node, offset: u64) -> usize {
        self.chunks(node)
            .partition_point(|c| c.info.chunk_offset + c.info.chunk_size <= offset)
    }

    /// A symlink's target, verbatim; empty for other nodes.
    pub fn link_name(&self, node: &Node) -> &str {
        self.name(node.link_name)
    }

    /// A node's extended attributes by name.
    pub fn xattrs(&self, node: &Node) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        node.xattrs
            .and_then(|i| self.xattrs.get(i as usize))
            .into_iter()
            .flat_map(|m| m.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    }

    /// The extended attributes a node shows (through FUSE and in its native tree): overlayfs'
    /// opaque marker on an opaque directory, then the TOC's own (an opaque marker of the TOC's
    /// is not shown twice).
    pub fn shown_xattrs(&self, node: &Node) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        let marker = node.opaque.then_some((OPAQUE_XATTR, &b"y"[..]));
        marker
            .into_iter()
            .chain(self.xattrs(node).filter(|&(k, _)| k != OPAQUE_XATTR))
    }

    /// Every inode, the root first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Bytes held by the table's vectors (their capacity), for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        self.nodes.capacity() * size_of::<Node>()
            + self.dirents.capacity() * size_of::<Dirent>()
            + self.names.capacity()
            + self.chunks.capacity() * size_of::<Chunk>()
            + self.xattrs.capacity() * size_of::<BTreeMap<String, Vec<u8>>>()
            + self.blob_order.capacity() * size_of::<ChunkId>()
    }

    fn name(&self, span: Span) -> &str {
        self.names.get(span.range()).unwrap_or_default()
    }

    /// Appends `s` to the name arena.
    fn push_name(&mut self, s: &str) -> Result<Span, FsError> {
        let start = self.names.len();
        self.names.push_str(s);
        Span::new(start, self.names.len())
    }

    /// A node for index entry `id` with the entry's attributes; entries, chunks and xattrs are
    /// added later, once whiteouts are known.
    fn node_from(&mut self, id: EntryId, e: &Entry) -> Result<Node, FsError> {
        let kind = match e.kind {
            EntryType::Dir => NodeKind::Dir,
            EntryType::Symlink => NodeKind::Symlink,
            EntryType::Char => NodeKind::Char,
            EntryType::Block => NodeKind::Block,
            EntryType::Fifo => NodeKind::Fifo,
            EntryType::Reg | EntryType::Hardlink | EntryType::Chunk => NodeKind::Reg,
        };
        let mut node = Node::new(ino_of(id), ino_of(e.parent), kind);
        node.perm = e.mode;
        node.uid = e.uid;
        node.gid = e.gid;
        node.size = if kind == NodeKind::Symlink {
            e.link_name.len() as u64
        } else {
            e.size
        };
        node.mtime = mtime(e.mtime_secs, e.mtime_nanos);
        node.rdev = e.rdev() as u32;
        node.nlink = e.nlink;
        if !e.link_name.is_empty() {
            node.link_name = self.push_name(&e.link_name)?;
        }
        Ok(node)
    }

    /// Fills the visible entries of directory `dir`: overlay whiteouts `.wh.x` become 0:0
    /// character devices named `x` (unless the layer also has a real `x`), `.wh..wh..opq` marks
    /// the directory opaque. (`estargz` refuses `.wh.` alone; the state directory name is
    /// free, see [`check_state_dir_free`].)
    /// `scratch` is reused across directories so that building allocates nothing per directory.
    fn link_children<'i>(
        &mut self,
        index: &'i LayerIndex,
        dir: EntryId,
        scratch: &mut Vec<(&'i str, EntryId)>,
    ) -> Result<(), FsError> {
        scratch.clear();
        let mut opaque = false;
        for (name, child) in index.children(dir) {
            if name == OPAQUE_MARKER {
                opaque = true;
            } else if name.starts_with(WHITEOUT_PREFIX) {
                // Whiteouts are converted below.
            } else {
                scratch.push((name, child));
            }
        }
        // The index yields names sorted, so the real entries are too.
        let real = scratch.len();
        for (name, child) in index.children(dir) {
            let Some(target) = name
                .strip_prefix(WHITEOUT_PREFIX)
                .filter(|_| name != OPAQUE_MARKER)
            else {
                continue;
            };
            if scratch[..real]
                .binary_search_by(|(n, _)| (*n).cmp(target))
                .is_err()
            {
                scratch.push((target, child));
                if let Some(node) = self.nodes.get_mut(child as usize) {
                    make_whiteout(node);
                }
            }
        }
        scratch.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let start = self.dirents.len();
        for &(name, child) in scratch.iter() {
            let name = self.push_name(name)?;
            self.dirents.push(Dirent {
                name,
                ino: ino_of(child),
            });
        }
        let span = Span::new(start, self.dirents.len())?;
        if let Some(node) = self.nodes.get_mut(dir as usize) {
            node.children = span;
            node.opaque = opaque;
        }
        Ok(())
    }

    /// Adds the chunks and xattrs of entry `id` unless it became a whiteout (which has neither).
    fn add_payload(&mut self, index: &LayerIndex, id: EntryId, e: &Entry) -> Result<(), FsError> {
        let Some(kind) = self.nodes.get(id as usize).map(|n| n.kind) else {
            return Ok(());
        };
        if kind == NodeKind::Whiteout {
            return Ok(());
        }
        let start = self.chunks.len();
        self.chunks
            .extend(index.chunks(id).iter().map(|&info| Chunk { info, seq: 0 }));
        let chunks = Span::new(start, self.chunks.len())?;
        let xattrs = if e.xattrs.is_empty() {
            None
        } else {
            self.xattrs.push(e.xattrs.clone());
            Some(
                u32::try_from(self.xattrs.len() - 1)
                    .map_err(|_| FsError::TooLarge(self.xattrs.len()))?,
            )
        };
        if let Some(node) = self.nodes.get_mut(id as usize) {
            node.chunks = chunks;
            node.xattrs = xattrs;
        }
        Ok(())
    }
}

/// Refuses a layer with a root entry named [`STATE_DIR_NAME`] (which anything below that name
/// implies) or its whiteout: either would shadow the state directory the daemon serves there.
fn check_state_dir_free(index: &LayerIndex) -> Result<(), FsError> {
    let whiteout = format!("{WHITEOUT_PREFIX}{STATE_DIR_NAME}");
    for name in [STATE_DIR_NAME, whiteout.as_str()] {
        if index.lookup_child(index.root(), name).is_some() {
            let reason = "shadows the daemon's state directory in the layer root".to_owned();
            let err = EstargzError::InvalidEntry {
                name: name.to_owned(),
                reason,
            };
            return Err(FsError::Toc(err));
        }
    }
    Ok(())
}

/// Serves `node` as an overlay whiteout: a 0:0 character device with no payload.
fn make_whiteout(node: &mut Node) {
    node.kind = NodeKind::Whiteout;
    node.perm = 0;
    node.uid = 0;
    node.gid = 0;
    node.size = 0;
    node.rdev = 0;
    node.nlink = 1;
}

/// Maps index entry `id` to its inode: the root is [`ROOT_INO`], the rest follow the reserved ones.
fn ino_of(id: EntryId) -> u64 {
    if id == 0 {
        ROOT_INO
    } else {
        FIRST_INO - 1 + u64::from(id)
    }
}

fn mtime(secs: i64, nanos: u32) -> SystemTime {
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs.unsigned_abs(), nanos))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .and_then(|t| t.checked_add(Duration::from_nanos(nanos.into())))
    };
    t.unwrap_or(UNIX_EPOCH)
}

/// Every chunk of every file, sorted by compressed offset; hardlinks share their target's
/// node, so each chunk appears once.
fn blob_order(nodes: &[Node], chunks: &[Chunk]) -> Vec<ChunkId> {
    let mut ids: Vec<(u64, ChunkId)> = Vec::with_capacity(chunks.len());
    for n in nodes {
        let mine = chunks.get(n.chunks.range()).unwrap_or_default();
        ids.extend(
            mine.iter()
                .enumerate()
                .map(|(i, c)| (c.info.compressed_offset, (n.ino, i))),
        );
    }
    ids.sort_unstable();
    ids.into_iter().map(|(_, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estargz::{Toc, TocEntry};

    fn ent(name: &str, kind: EntryType) -> TocEntry {
        TocEntry {
            name: name.into(),
            kind,
            mode: 0o644,
            ..Default::default()
        }
    }

    #[test]
    fn table_links_whiteouts_and_chunks() {
        let (da, db) = (
            format!("sha256:{}", "a".repeat(64)),
            format!("sha256:{}", "b".repeat(64)),
        );
        let mut big = ent("d/big", EntryType::Reg);
        big.size = 10;
        big.offset = 100;
        big.chunk_size = 4;
        big.chunk_digest = da;
        big.mod_time = "2020-01-02T03:04:05Z".into();
        let mut c2 = ent("d/big", EntryType::Chunk);
        c2.offset = 150;
        c2.chunk_offset = 4;
        c2.chunk_digest = db;
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
        let t = InodeTable::build(&LayerIndex::build(&toc, 300).expect("index")).expect("table");
        let big = t
            .lookup(ROOT_INO, "d")
            .and_then(|d| t.lookup(d.ino, "big"))
            .expect("big");
        assert_eq!(big.nlink, 2);
        assert_eq!(
            big.mtime
                .duration_since(UNIX_EPOCH)
                .expect("after")
                .as_secs(),
            1_577_934_245
        );
        let chunks = t.chunks(big);
        assert_eq!(chunks.len(), 2);
        assert_eq!(
            (
                chunks[0].info.compressed_end,
                chunks[1].info.compressed_end,
                chunks[1].info.chunk_size
            ),
            (150, 300, 6)
        );
        assert_eq!(chunks[1].info.digest, Some([0xbb; 32]));
        assert_eq!(t.chunk_index(big, 3), 0);
        assert_eq!(t.chunk_index(big, 4), 1);
        let d = t.lookup(ROOT_INO, "d").expect("d");
        assert_eq!(t.lookup(d.ino, "hl").expect("hl").ino, big.ino);
        assert_eq!(
            t.lookup(d.ino, "gone").expect("wh").kind,
            NodeKind::Whiteout
        );
        assert!(t.lookup(d.ino, ".wh.gone").is_none());
        let e = t.lookup(ROOT_INO, "e").expect("e");
        assert!(e.opaque && t.children_from(e, 0).next().is_none());
        assert!(t.lookup(ROOT_INO, ".no.prefetch.landmark").is_none());
        assert!(
            t.lookup(ROOT_INO, STATE_DIR_NAME).is_none(),
            "the table has no state dir"
        );
        assert_eq!(t.landmark, Some(Landmark::NoPrefetch));
        assert_eq!(t.blob_order, vec![(big.ino, 0), (big.ino, 1)]);
        for n in t.nodes() {
            assert_eq!(
                t.get(n.ino).map(|m| m.ino),
                Some(n.ino),
                "inode numbers index the table"
            );
        }
    }

    /// Lookup and readdir over large directories: entries come back in the byte order the old
    /// `BTreeMap<String, _>` gave (`"F" < "f10" < "f2" < "~" < "é"`), whiteouts sorted under
    /// their converted name, and one directory's names never answer for another's.
    #[test]
    fn lookup_and_readdir_order_in_big_directories() {
        let mut entries = vec![ent("./", EntryType::Dir)];
        let mut expected: BTreeMap<String, bool> = BTreeMap::new();
        let odd = [
            "F", "Zed", "_x", "0", "a b", "~", "é", "Ä", "日本", "ab", "a", "m0", "wh.y",
        ];
        let names = (0..400)
            .map(|i| format!("f{i}"))
            .chain(odd.iter().map(|s| s.to_string()));
        for name in names {
            entries.push(ent(&format!("many/{name}"), EntryType::Reg));
            entries.push(ent(&format!("other/o-{name}"), EntryType::Reg));
            expected.insert(name, false);
        }
        for wh in ["m", "f5", "ζ"] {
            entries.push(ent(&format!("many/.wh.{wh}"), EntryType::Reg));
            expected.entry(wh.to_string()).or_insert(true);
        }
        let mut link = ent("many/link", EntryType::Symlink);
        link.link_name = "../other/o-f1".into();
        entries.push(link);
        expected.insert("link".into(), false);
        let mut xa = ent("other/xa", EntryType::Reg);
        xa.xattrs.insert("user.k".into(), b"v".to_vec());
        entries.push(xa);
        let t = InodeTable::build(
            &LayerIndex::build(
                &Toc {
                    version: 1,
                    entries,
                },
                300,
            )
            .expect("index"),
        )
        .expect("table");

        let many = t.lookup(ROOT_INO, "many").expect("many");
        let listed: Vec<(&str, u64)> = t.children_from(many, 0).collect();
        assert_eq!(
            listed.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            expected.keys().map(String::as_str).collect::<Vec<_>>()
        );
        assert_eq!(many.child_count(), expected.len());
        for (name, ino) in &listed {
            let node = t.lookup(many.ino, name).expect(name);
            assert_eq!(node.ino, *ino, "{name}");
            assert_eq!(node.kind == NodeKind::Whiteout, expected[*name], "{name}");
        }
        for absent in ["", "f", "f400", "zzz", ".wh.m", "o-f1", "xa", "\u{10ffff}"] {
            assert!(t.lookup(many.ino, absent).is_none(), "{absent:?}");
        }
        let link = t.lookup(many.ino, "link").expect("link");
        assert_eq!((t.link_name(link), link.size), ("../other/o-f1", 13));
        assert_eq!(t.link_name(many), "");

        let other = t.lookup(ROOT_INO, "other").expect("other");
        assert_eq!(t.children_from(other, 0).count(), 414);
        assert!(t.lookup(other.ino, "o-é").is_some() && t.lookup(other.ino, "f1").is_none());
        let xa = t.lookup(other.ino, "xa").expect("xa");
        assert_eq!(
            t.xattrs(xa).collect::<Vec<_>>(),
            vec![("user.k", &b"v"[..])]
        );
        assert_eq!(t.xattrs(link).count(), 0);
        assert_eq!(t.children_from(xa, 0).count(), 0, "files have no entries");
        assert!(t.heap_bytes() >= std::mem::size_of_val(t.nodes()));
    }

    #[test]
    fn entries_shadowing_the_state_directory_are_refused() {
        let long = format!("{}/{}", STATE_DIR_NAME, "x".repeat(1000));
        for name in [
            STATE_DIR_NAME,
            "./.stargz-snapshotter/",
            ".stargz-snapshotter/x",
            ".wh..stargz-snapshotter",
            &long,
        ] {
            for kind in [EntryType::Dir, EntryType::Reg, EntryType::Symlink] {
                let toc = Toc {
                    version: 1,
                    entries: vec![ent("./", EntryType::Dir), ent(name, kind)],
                };
                let index = LayerIndex::build(&toc, 300).expect("the format allows the name");
                let err = InodeTable::build(&index).expect_err(name);
                let err = crate::untrusted::chain(&err).to_string();
                assert!(
                    err.contains("state directory") && err.len() < 300,
                    "{name}: {err}"
                );
            }
        }
        // A hardlink at the name is refused too.
        let mut hl = ent(STATE_DIR_NAME, EntryType::Hardlink);
        hl.link_name = "f".into();
        let toc = Toc {
            version: 1,
            entries: vec![ent("f", EntryType::Reg), hl],
        };
        assert!(InodeTable::build(&LayerIndex::build(&toc, 300).expect("index")).is_err());
        // Only the root is reserved: the name elsewhere, or a longer one, is an ordinary entry.
        let toc = Toc {
            version: 1,
            entries: vec![
                ent("d/.stargz-snapshotter/x", EntryType::Reg),
                ent("d/.wh..stargz-snapshotter", EntryType::Reg),
                ent(".stargz-snapshotter2", EntryType::Reg),
            ],
        };
        let t = InodeTable::build(&LayerIndex::build(&toc, 300).expect("index")).expect("table");
        let d = t.lookup(ROOT_INO, "d").expect("d");
        assert_eq!(
            t.lookup(d.ino, STATE_DIR_NAME).map(|n| n.kind),
            Some(NodeKind::Dir)
        );
        assert!(t.lookup(ROOT_INO, ".stargz-snapshotter2").is_some());
    }

    #[test]
    fn whiteouts_drop_payload_and_xattrs() {
        let mut wh = ent("d/.wh.x", EntryType::Reg);
        wh.size = 3;
        wh.offset = 10;
        wh.chunk_digest = format!("sha256:{}", "c".repeat(64));
        wh.xattrs.insert("user.a".into(), b"1".to_vec());
        let toc = Toc {
            version: 1,
            entries: vec![ent("./", EntryType::Dir), wh],
        };
        let t = InodeTable::build(&LayerIndex::build(&toc, 300).expect("index")).expect("table");
        let d = t.lookup(ROOT_INO, "d").expect("d");
        let x = t.lookup(d.ino, "x").expect("x");
        assert_eq!(
            (x.kind, x.size, x.perm, x.nlink),
            (NodeKind::Whiteout, 0, 0, 1)
        );
        assert!(t.chunks(x).is_empty() && t.xattrs(x).next().is_none());
        assert!(
            t.blob_order.is_empty() && t.chunks.iter().map(|c| c.info.chunk_size).sum::<u64>() == 0
        );
    }

    #[test]
    fn pre_epoch_mtime_does_not_panic() {
        assert_eq!(mtime(-1, 500).duration_since(UNIX_EPOCH).ok(), None);
        assert_eq!(
            mtime(i64::MAX, 0),
            UNIX_EPOCH
                .checked_add(Duration::from_secs(i64::MAX as u64))
                .unwrap_or(UNIX_EPOCH)
        );
    }
}
