//! Fuzz target `predicate`: see `spectral_fuzz::predicate` for what it feeds and what it asserts.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spectral_fuzz::predicate(data));
