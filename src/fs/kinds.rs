//! Which kinds of file a layer's readers read: read-ahead's ledger per file name extension.
//!
//! Read-ahead brings the files that follow a miss in blob order, and in most layers some kinds
//! of file there are never read: Python reads `__pycache__/*.pyc` and only stats the `.py`
//! beside it, a program loads its `.so` libraries and not their neighbours' headers. A kind
//! whose files read-ahead brought but nobody read is left out of later read-ahead (when the
//! source can skip bytes within one request, see [`super::LayerSource::multi_range`]); a file
//! left out that is read after all counts for its kind, so a kind comes back as soon as its
//! files are read. Only what is fetched early changes, never what is served.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::bits::Bits;
use super::inode::{InodeTable, NodeKind};
use super::reader::unpaid;

/// Distinct extensions a layer keeps a ledger for; the rest share the ledger of files with none.
pub(crate) const MAX_KINDS: usize = 64;

/// Round trips' worth of a kind's bytes read-ahead brings before the kind's reads must pay for
/// them.
const PROBATION: u64 = 2;

/// A kind's ledger: compressed bytes read-ahead brought, and reads that found them (or found a
/// file read-ahead had left out).
#[derive(Default)]
struct Ledger {
    spent: AtomicU64,
    hits: AtomicU64,
}

pub(crate) struct FileKinds {
    /// Per node (table order): its kind.
    kind_of: Vec<u8>,
    ledgers: Vec<Ledger>,
    /// Per chunk (bit per chunk, blob order): left out of a read-ahead for its kind and not
    /// read since.
    left_out: Bits,
}

impl FileKinds {
    pub(crate) fn new(table: &InodeTable) -> Self {
        let nodes = table.nodes();
        let mut kind_of = vec![0u8; nodes.len()];
        // Kind 0: no extension, or past MAX_KINDS.
        let mut ids: HashMap<&str, u8> = HashMap::new();
        for dir in nodes.iter().filter(|n| n.kind == NodeKind::Dir) {
            for (name, ino) in table.children_from(dir, 0) {
                let Some(ext) = extension(name) else { continue };
                let next = ids.len() + 1;
                let id = match ids.get(ext) {
                    Some(&id) => id,
                    None if next < MAX_KINDS => {
                        let id = next as u8;
                        ids.insert(ext, id);
                        id
                    }
                    None => 0,
                };
                if let Some(k) = table.index(ino).and_then(|i| kind_of.get_mut(i)) {
                    *k = id;
                }
            }
        }
        FileKinds {
            kind_of,
            ledgers: (0..=ids.len()).map(|_| Ledger::default()).collect(),
            left_out: Bits::new(table.blob_order.len()),
        }
    }

    /// The kind of the node at `index` in the table.
    pub(crate) fn kind(&self, index: usize) -> usize {
        self.kind_of.get(index).map_or(0, |&k| usize::from(k))
    }

    fn ledger(&self, kind: usize) -> Option<&Ledger> {
        self.ledgers.get(kind)
    }

    /// Read-ahead brought `bytes` of a file of `kind`.
    pub(crate) fn brought(&self, kind: usize, bytes: u64) {
        if let Some(l) = self.ledger(kind) {
            l.spent.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// A read found a file of `kind` that read-ahead brought or left out.
    pub(crate) fn read(&self, kind: usize) {
        if let Some(l) = self.ledger(kind) {
            l.hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether read-ahead leaves out files of `kind`, `one` being a round trip's worth of bytes
    /// and `pending` the bytes of that kind the read-ahead being planned already takes: once
    /// [`PROBATION`] round trips' worth of them were brought, while their reads do not pay for
    /// the bytes (the layer's own rule, [`unpaid`]). Counting `pending` judges a kind within one
    /// long read-ahead: the first that reaches the sources of a package tree would otherwise
    /// bring all of them.
    pub(crate) fn left_out(&self, kind: usize, one: u64, pending: u64) -> bool {
        self.ledger(kind).is_some_and(|l| {
            let spent = l.spent.load(Ordering::Relaxed).saturating_add(pending);
            let hits = l.hits.load(Ordering::Relaxed);
            one > 0 && unpaid(spent, hits, one, PROBATION)
        })
    }

    /// Notes that read-ahead left chunk `seq` out.
    pub(crate) fn leave_out(&self, seq: usize) {
        self.left_out.set(seq);
    }

    /// True (once) when chunk `seq` was left out by read-ahead and not read since.
    pub(crate) fn take_left_out(&self, seq: usize) -> bool {
        self.left_out.take(seq)
    }
}

/// A file name's kind: its last extension that is not a version number (`libc.so.6` is a
/// `so`), at most 8 bytes; `None` for names without one (and dot files).
fn extension(name: &str) -> Option<&str> {
    let mut parts = name.trim_start_matches('.').rsplit('.');
    let _ = parts.next_back();
    parts
        .find(|p| !p.bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| p.len() <= 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_extensions_without_version_numbers() {
        assert_eq!(extension("decoder.cpython-311.pyc"), Some("pyc"));
        assert_eq!(extension("decoder.py"), Some("py"));
        assert_eq!(extension("libc.so.6"), Some("so"));
        assert_eq!(extension("libstdc++.so.6.0.30"), Some("so"));
        assert_eq!(extension("python3.11"), None);
        assert_eq!(extension("bash"), None);
        assert_eq!(extension(".bashrc"), None);
        assert_eq!(extension("x.verylongext"), None);
    }

    #[test]
    fn a_kind_is_left_out_once_its_bytes_go_unread_and_back_once_read() {
        let k = FileKinds {
            kind_of: Vec::new(),
            ledgers: (0..2).map(|_| Ledger::default()).collect(),
            left_out: Bits::new(64),
        };
        let one = 1000;
        k.brought(1, one);
        assert!(!k.left_out(1, one, one), "on probation");
        assert!(k.left_out(1, one, 2 * one), "within a read-ahead too");
        k.brought(1, 2 * one);
        assert!(k.left_out(1, one, 0), "3 round trips' worth, never read");
        assert!(!k.left_out(0, one, 0), "other kinds are judged apart");
        assert!(!k.left_out(1, 0, 0), "no read-ahead, nothing to leave out");
        k.leave_out(5);
        assert!(k.take_left_out(5) && !k.take_left_out(5), "taken once");
        k.read(1);
        k.read(1);
        assert!(!k.left_out(1, one, 0), "its files are read after all");
        k.brought(1, 2 * super::super::reader::HIT_WORTH * one);
        assert!(k.left_out(1, one, 0), "but rarely");
    }
}
