//! Fuzz target `decide_body`: see `spectral_fuzz::decide_body` for what it feeds and what it asserts.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spectral_fuzz::decide_body(data));
