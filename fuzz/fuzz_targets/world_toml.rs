//! Fuzz target `world_toml`: see `spectral_fuzz::world_toml` for what it feeds and what it asserts.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spectral_fuzz::world_toml(data));
