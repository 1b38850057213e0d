//! Problems with a world model and where they are: what the loader, the compiler of a world
//! and the compiler of a module report, each located as precisely as the source allows.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::sandbox::{ErrorKind, SandboxError, SourcePosition};

/// Which expression of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Which {
    AppliesWhen,
    Predicate,
}

/// Where in a world model a problem is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "at", rename_all = "snake_case")]
pub enum Locus {
    World {
        field: &'static str,
    },
    Attribute {
        name: String,
    },
    Config {
        name: String,
    },
    Action {
        action: String,
    },
    Rule {
        action: String,
        rule: String,
        field: &'static str,
    },
    Predicate {
        action: String,
        rule: String,
        which: Which,
    },
    Case {
        action: String,
        rule: String,
        case: usize,
    },
}

impl fmt::Display for Locus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::World { field } => write!(f, "world {field}"),
            Self::Attribute { name } => write!(f, "context attribute '{name}'"),
            Self::Config { name } => write!(f, "config '{name}'"),
            Self::Action { action } => write!(f, "action '{action}'"),
            Self::Rule {
                action,
                rule,
                field,
            } => write!(f, "action '{action}' rule '{rule}' {field}"),
            Self::Predicate {
                action,
                rule,
                which,
            } => {
                let which = match which {
                    Which::AppliesWhen => "applies_when",
                    Which::Predicate => "predicate",
                };
                write!(f, "action '{action}' rule '{rule}' {which}")
            }
            Self::Case { action, rule, case } => {
                write!(f, "action '{action}' rule '{rule}' case {}", case + 1)
            }
        }
    }
}

/// One problem with a world model, located as precisely as the source allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    #[serde(flatten)]
    pub locus: Locus,
    pub message: String,
    /// The stable kind of a predicate error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    /// Line and column inside a predicate's source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<SourcePosition>,
    /// The file the problem is in, when the model was loaded from files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// The line in `file` (for predicates, the line inside the `.rhai` file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
}

impl Problem {
    pub fn new(locus: Locus, message: impl Into<String>) -> Self {
        Self {
            locus,
            message: message.into(),
            kind: None,
            position: None,
            file: None,
            line: None,
        }
    }

    pub fn sandbox(locus: Locus, e: SandboxError) -> Self {
        Self {
            locus,
            message: e.message,
            kind: Some(e.kind),
            position: e.position,
            file: None,
            line: None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}", file.display())?;
            match (self.line, self.position) {
                (_, Some(p)) => write!(f, ":{}:{}", p.line, p.column)?,
                (Some(line), None) => write!(f, ":{line}")?,
                (None, None) => {}
            }
            f.write_str(": ")?;
        }
        write!(f, "{}", self.locus)?;
        if self.file.is_none() {
            if let Some(p) = self.position {
                write!(f, " at {p}")?;
            }
        }
        match self.kind {
            Some(kind) => write!(f, ": {kind}: {}", self.message),
            None => write!(f, ": {}", self.message),
        }
    }
}
