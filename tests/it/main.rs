//! The integration-test binary: everything that drives the library's public API end to end
//! or runs the `spectral` binary as a process.

mod cli;
mod hostile;
mod properties;
mod support;
mod worlds;
