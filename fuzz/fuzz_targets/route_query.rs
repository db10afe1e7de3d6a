#![no_main]

// The check is edgewise_core::fuzzing::route_query, which tests/fuzz_corpus.rs replays on the corpus.
libfuzzer_sys::fuzz_target!(|data: &[u8]| edgewise_core::fuzzing::route_query(data));
