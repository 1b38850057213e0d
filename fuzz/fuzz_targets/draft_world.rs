//! Fuzz target `draft_world`: see `spectral_fuzz::draft_world` for what it feeds and what it asserts.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spectral_fuzz::draft_world(data));
