#![no_main]
//! Fuzz target: see `stargz::estargz::fuzzing::fuzz_open_blob`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    stargz::estargz::fuzzing::fuzz_open_blob(data);
});
