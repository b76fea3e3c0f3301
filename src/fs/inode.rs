//! The inode table of one layer, built once from the validated [`LayerIndex`].
//!
//! `estargz` owns the format rules (names, hardlinks, chunk ranges, landmarks); this adds what
//! only a FUSE mount needs: inode numbers, overlay whiteout/opaque conventions, the hidden
//! state directory, and the blob-order chunk sequence the reader fetches by.
//!
//! Invariants: inode numbers are dense (`1` is the root, [`STATE_DIR_INO`] and
//! [`STATE_FILE_INO`] are reserved), every directory's `children` is sorted by name, hardlinks
//! share the inode of their target (whose `nlink` counts them), and every regular file's
//! `chunks` cover `[0, size)` in file order with their compressed range in the blob.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::estargz::{ChunkInfo, Entry, EntryId, EntryType, LayerIndex};

/// The root directory.
pub const ROOT_INO: u64 = 1;
/// `/.stargz-snapshotter`, the state directory (hidden from readdir).
pub const STATE_DIR_INO: u64 = 2;
/// `/.stargz-snapshotter/<digest>.json`.
pub const STATE_FILE_INO: u64 = 3;
const FIRST_INO: u64 = 4;

/// Name of the hidden state directory in the layer root (as Go's `fs/layer`).
pub const STATE_DIR_NAME: &str = ".stargz-snapshotter";
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

/// One chunk of a regular file as the index describes it, plus its place in blob order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub info: ChunkInfo,
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
        self.chunks.partition_point(|c| c.info.chunk_offset + c.info.chunk_size <= offset)
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
    /// Builds the table from the validated index: entry ids map 1:1 to inodes (see [`ino_of`]),
    /// so names, hardlinks and chunk ranges are exactly what `estargz` checked.
    pub fn build(index: &LayerIndex) -> Self {
        let mut nodes: Vec<Node> = index.entries().map(|(id, e)| node_from(index, id, e)).collect();
        for (id, e) in index.entries() {
            if e.kind == EntryType::Dir {
                link_children(index, &mut nodes, id);
            }
        }
        let blob_order = blob_order(&nodes);
        for (seq, &(ino, i)) in blob_order.iter().enumerate() {
            if let Some(c) = Self::index_of(ino).and_then(|k| nodes.get_mut(k)).and_then(|n| n.chunks.get_mut(i)) {
                c.seq = seq;
            }
        }
        let landmark = if index.no_prefetch() {
            Some(Landmark::NoPrefetch)
        } else {
            index.prefetch_end_offset().map(Landmark::PrefetchBefore)
        };
        InodeTable { nodes, blob_order, landmark }
    }

    fn index_of(ino: u64) -> Option<usize> {
        match ino {
            ROOT_INO => Some(0),
            i if i >= FIRST_INO => usize::try_from(i - (FIRST_INO - 1)).ok(),
            _ => None,
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(Self::index_of(ino)?)
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
        self.nodes.iter().flat_map(|n| n.chunks.iter()).map(|c| c.info.chunk_size).sum()
    }
}

/// Maps index entry `id` to its inode: the root is [`ROOT_INO`], the rest follow the reserved ones.
fn ino_of(id: EntryId) -> u64 {
    if id == 0 {
        ROOT_INO
    } else {
        FIRST_INO - 1 + u64::from(id)
    }
}

/// A node for index entry `id` with the entry's attributes; children and chunks are filled later.
fn node_from(index: &LayerIndex, id: EntryId, e: &Entry) -> Node {
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
    node.size = if kind == NodeKind::Symlink { e.link_name.len() as u64 } else { e.size };
    node.mtime = mtime(e.mtime_secs, e.mtime_nanos);
    node.rdev = e.rdev() as u32;
    node.nlink = e.nlink;
    node.link_name = e.link_name.clone();
    node.xattrs = e.xattrs.clone();
    node.chunks = index
        .chunks(id)
        .iter()
        .map(|&info| Chunk { info, seq: 0 })
        .collect();
    node
}

fn mtime(secs: i64, nanos: u32) -> SystemTime {
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs.unsigned_abs(), nanos))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs())).and_then(|t| t.checked_add(Duration::from_nanos(nanos.into())))
    };
    t.unwrap_or(UNIX_EPOCH)
}

/// Fills the visible children of directory `dir`: overlay whiteouts `.wh.x` become 0:0
/// character devices named `x` (unless the layer also has a real `x`), `.wh..wh..opq` marks
/// the directory opaque, and the state directory name is reserved in the root.
fn link_children(index: &LayerIndex, nodes: &mut [Node], dir: EntryId) {
    let mut whiteouts = Vec::new();
    let dir_idx = dir as usize;
    for (name, child) in index.children(dir) {
        if name == OPAQUE_MARKER {
            nodes[dir_idx].opaque = true;
        } else if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
            whiteouts.push((target.to_string(), child));
        } else if !(dir == index.root() && name == STATE_DIR_NAME) {
            nodes[dir_idx].children.insert(name.to_string(), ino_of(child));
        }
    }
    for (name, child) in whiteouts {
        if nodes[dir_idx].children.contains_key(&name) {
            continue;
        }
        let node = &mut nodes[child as usize];
        node.kind = NodeKind::Whiteout;
        node.perm = 0;
        node.uid = 0;
        node.gid = 0;
        node.size = 0;
        node.rdev = 0;
        node.nlink = 1;
        node.chunks.clear();
        node.xattrs.clear();
        nodes[dir_idx].children.insert(name, ino_of(child));
    }
}

/// Every chunk of every file, sorted by compressed offset; hardlinks share their target's
/// node, so each chunk appears once.
fn blob_order(nodes: &[Node]) -> Vec<ChunkId> {
    let mut ids: Vec<(u64, ChunkId)> = nodes
        .iter()
        .flat_map(|n| n.chunks.iter().enumerate().map(move |(i, c)| (c.info.compressed_offset, (n.ino, i))))
        .collect();
    ids.sort_unstable();
    ids.into_iter().map(|(_, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estargz::{Toc, TocEntry};

    fn ent(name: &str, kind: EntryType) -> TocEntry {
        TocEntry { name: name.into(), kind, mode: 0o644, ..Default::default() }
    }

    #[test]
    fn table_links_whiteouts_and_chunks() {
        let (da, db) = (format!("sha256:{}", "a".repeat(64)), format!("sha256:{}", "b".repeat(64)));
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
                ent(".stargz-snapshotter/x", EntryType::Reg),
                ent(".no.prefetch.landmark", EntryType::Reg),
            ],
        };
        let t = InodeTable::build(&LayerIndex::build(&toc, 300).expect("index"));
        let big = t.lookup(ROOT_INO, "d").and_then(|d| t.lookup(d.ino, "big")).expect("big");
        assert_eq!(big.nlink, 2);
        assert_eq!(big.mtime.duration_since(UNIX_EPOCH).expect("after").as_secs(), 1_577_934_245);
        assert_eq!(big.chunks.len(), 2);
        assert_eq!((big.chunks[0].info.compressed_end, big.chunks[1].info.compressed_end, big.chunks[1].info.chunk_size), (150, 300, 6));
        assert_eq!(big.chunks[1].info.digest, Some([0xbb; 32]));
        assert_eq!(big.chunk_index(3), 0);
        assert_eq!(big.chunk_index(4), 1);
        let d = t.lookup(ROOT_INO, "d").expect("d");
        assert_eq!(t.lookup(d.ino, "hl").expect("hl").ino, big.ino);
        assert_eq!(t.lookup(d.ino, "gone").expect("wh").kind, NodeKind::Whiteout);
        assert!(t.lookup(d.ino, ".wh.gone").is_none());
        let e = t.lookup(ROOT_INO, "e").expect("e");
        assert!(e.opaque && e.children.is_empty());
        assert!(t.lookup(ROOT_INO, ".no.prefetch.landmark").is_none());
        assert!(t.lookup(ROOT_INO, STATE_DIR_NAME).is_none(), "the state directory name is reserved");
        assert_eq!(t.landmark, Some(Landmark::NoPrefetch));
        assert_eq!(t.blob_order, vec![(big.ino, 0), (big.ino, 1)]);
        for n in t.nodes() {
            assert_eq!(t.get(n.ino).map(|m| m.ino), Some(n.ino), "inode numbers index the table");
        }
    }

    #[test]
    fn pre_epoch_mtime_does_not_panic() {
        assert_eq!(mtime(-1, 500).duration_since(UNIX_EPOCH).ok(), None);
        assert_eq!(mtime(i64::MAX, 0), UNIX_EPOCH.checked_add(Duration::from_secs(i64::MAX as u64)).unwrap_or(UNIX_EPOCH));
    }
}
