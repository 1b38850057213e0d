//! The integration-test binary: everything that drives the library's public API end to end
//! or runs the `spectral` binary as a process.

#![expect(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is how a check fails"
)]

mod agent;
mod agent_api;
mod agent_crash;
mod api;
mod app;
mod audit_export;
mod checkpoints;
mod cli;
mod cluster;
mod conn;
mod crash;
mod db;
mod differential;
mod edge;
mod fail_closed;
mod flood;
mod gate;
mod hostile;
mod image;
mod impact;
mod keys;
mod llm;
mod mcp;
mod migrations;
mod openapi;
mod outbox;
mod pooler;
mod properties;
mod provider;
mod public;
mod ratelimit;
mod receiver;
mod retention;
mod serve;
mod shutdown;
mod store;
mod support;
mod tidy;
mod tls;
mod webhooks;
mod worlds;
