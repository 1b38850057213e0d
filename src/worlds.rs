//! Worlds: the world-model format and its loader, the compiler of a world, modules, and the evaluator that
//! turns (module, context) into a decision.
//!
//! **Boundary:** no rhai types (those stay in `sandbox`), no I/O beyond reading a world
//! folder, no HTTP or store types.

pub mod cases;
pub mod compile;
pub mod context;
pub mod evaluate;
pub mod load;
pub mod model;
pub mod module;
pub mod problem;

pub use compile::{compile, CompiledWorld};
pub use evaluate::{evaluate, ContextJson, Decision, Request};
pub use model::{Severity, Status, WorldModel};
pub use module::{Module, ModuleSource};
pub use problem::Problem;
