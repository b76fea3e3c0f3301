#![no_main]
//! Fuzz target: see `stargz::estargz::fuzzing::fuzz_toc`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    stargz::estargz::fuzzing::fuzz_toc(data);
});
