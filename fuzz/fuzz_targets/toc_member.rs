#![no_main]
//! Fuzz target: see `stargz::estargz::fuzzing::fuzz_toc_member`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    stargz::estargz::fuzzing::fuzz_toc_member(data);
});
