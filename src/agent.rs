//! The World Agent: turns a rule stated in words into a verified candidate rule for a world,
//! off the request path. The provider talks to an OpenAI-compatible endpoint (`provider`); the
//! tools are what it offers the model, with the proposals parsed from their calls (`tools`);
//! the prompts are versioned templates (`prompt`); the graph runs the authoring nodes
//! (`graph`), of which `verify` is the deterministic one. `docs/agent.md` is the contract.

pub mod chat;
pub mod graph;
pub mod prompt;
pub mod provider;
pub mod runner;
pub mod tools;
pub mod verify;
