//! Entry points shared by the `cargo fuzz` targets (`fuzz/`) and the stable-Rust no-panic
//! tests (`tests/estargz_fuzz.rs`): each feeds untrusted bytes to a parser and exercises what
//! it returns. They must never panic, loop, or allocate without bound; errors are fine.

use super::footer::{parse_footer, Format, TocLocation};
use super::index::LayerIndex;
use super::reader::{open_blob, read_file_range};
use super::toc::{parse_toc_member, EntryType, Toc};

/// Footer parsing, plus the TOC range computed for a few blob sizes.
pub fn fuzz_footer(data: &[u8]) {
    if let Ok(loc) = parse_footer(data) {
        for size in [0, data.len() as u64, u64::MAX] {
            let _ = loc.toc_range(size);
        }
    }
}

/// TOC member parsing (gzip → tar → JSON, and zstd → JSON) and, for raw JSON input, index
/// building with every lookup the filesystem makes.
pub fn fuzz_toc(data: &[u8]) {
    for format in [Format::Gzip, Format::ZstdChunked] {
        if let Ok((toc, _)) = parse_toc_member(data, format) {
            walk_index(&toc);
        }
    }
    if let Ok(toc) = serde_json::from_slice::<Toc>(data) {
        walk_index(&toc);
    }
}

fn walk_index(toc: &Toc) {
    if let Ok(idx) = LayerIndex::build(toc, 1 << 40) {
        walk(&idx);
    }
}

fn walk(idx: &LayerIndex) {
    for (id, e) in idx.entries() {
        let _ = idx.children(id).count();
        let _ = idx.parent(id);
        let _ = idx.lookup(&e.name);
        if e.kind == EntryType::Reg {
            let _ = idx.chunks_for_range(id, e.size / 2, e.size);
        }
    }
}

/// A TOC gzip member (gzip → tar headers, extension records included → JSON) or zstd:chunked
/// TOC frame (zstd → JSON), streamed into the index as the filesystem does, then every lookup;
/// and parsed whole as `ctr-remote` does.
pub fn fuzz_toc_member(data: &[u8]) {
    for format in [Format::Gzip, Format::ZstdChunked] {
        let location = TocLocation {
            toc_offset: 1 << 40,
            footer_size: 0,
            legacy: false,
            format,
            toc_size: None,
        };
        if let Ok((idx, _)) = LayerIndex::from_toc_member(data, &location) {
            walk(&idx);
        }
        if let Ok((toc, _)) = parse_toc_member(data, format) {
            walk_index(&toc);
        }
    }
}

/// A whole blob: open it, then read every regular file through the verifying reader.
pub fn fuzz_open_blob(data: &[u8]) {
    let Ok(opened) = open_blob(data, data.len() as u64, None) else {
        return;
    };
    let mut buf = vec![0u8; 4096];
    for (id, e) in opened.index.entries() {
        if e.kind == EntryType::Reg {
            let _ = read_file_range(data, &opened.index, id, 0, &mut buf);
        }
    }
}
