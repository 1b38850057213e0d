//! The World Agent's side of the model: the provider that talks to an OpenAI-compatible
//! endpoint (`provider`), the tools it offers the model and the proposals parsed from their
//! calls (`tools`), and the versioned prompts (`prompt`). `docs/agent.md` is the contract.

pub mod prompt;
pub mod provider;
pub mod tools;
