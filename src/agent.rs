//! The World Agent: turns a rule stated in words into a verified candidate rule for a world,
//! off the request path (docs/agent.md).

pub mod verify;
