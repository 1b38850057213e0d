//! Nothing but the bench: `benches/peers.rs` runs the peers' workload through Spectral,
//! regorus and Cedar in one criterion run. Run: `cd bench/peers && cargo bench`.
