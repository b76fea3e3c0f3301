//! Stable-Rust stand-in for the `cargo fuzz` targets in `fuzz/`: drives the same entry
//! functions (`stargz::estargz::fuzzing`) with the seed corpus, random bytes, and mutations
//! of valid blobs/TOCs/footers. Passing means: no panic, no hang, bounded memory.

use std::path::Path;

use proptest::prelude::*;
use stargz::estargz::{self, fuzzing, BuildOptions};

fn valid_blob() -> Vec<u8> {
    let mut tar = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar);
        for (name, data) in [("a/x", vec![1u8; 3000]), ("a/y", b"hello".to_vec()), ("z", Vec::new())] {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, &data[..]).expect("append");
        }
        b.finish().expect("finish");
    }
    let mut blob = Vec::new();
    estargz::build(&tar[..], &mut blob, &BuildOptions { chunk_size: 1000, threads: 1, ..Default::default() }).expect("build");
    blob
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display())) {
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
    fn mutated_toc_json(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let blob = valid_blob();
        let opened = estargz::open_blob(&blob[..], blob.len() as u64, None).expect("open");
        let mut json = estargz::toc::to_go_json(&opened.toc).expect("json");
        for (i, v) in edits {
            let i = i.index(json.len());
            json[i] = v;
        }
        fuzzing::fuzz_toc(&json);
    }
}
