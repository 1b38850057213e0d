//! Spectral: deterministic decisions for software agents.
//!
//! A caller asks whether an action may proceed in a *world*; the rules of that world are small
//! predicates compiled once and evaluated in a sandbox. See `ARCHITECTURE.md` for the map.

pub mod agent;
pub mod background;
pub mod cli;
pub mod config;
pub mod egress;
pub mod gate;
pub mod http;
pub mod impact;
pub mod mcp;
pub mod outbox;
pub mod sandbox;
pub mod seal;
pub mod service;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod worlds;
