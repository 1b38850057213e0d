//! Static checks over a parsed predicate: what it reads, and what it may not use.

use std::collections::{BTreeMap, BTreeSet};

use rhai::{ASTNode, Expr, Stmt};

use super::{source_position, ErrorKind, SandboxError};

/// Names a predicate may not call or mention even though the parser accepts them. `Fn`,
/// `call` and `curry` build function pointers, the one way to reach a function by a computed
/// name; the rest reflect on the engine or produce output.
const FORBIDDEN_CALLS: &[&str] = &[
    "Fn",
    "call",
    "curry",
    "eval",
    "is_def_var",
    "is_def_fn",
    "is_shared",
    "print",
    "debug",
    "type_of",
    "get_fn_metadata_list",
];

/// What a predicate reads: context attributes and config constants, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reads {
    pub context: BTreeSet<String>,
    pub config: BTreeSet<String>,
}

impl Reads {
    /// Merge another expression's reads into these.
    pub fn extend(&mut self, other: &Reads) {
        self.context.extend(other.context.iter().cloned());
        self.config.extend(other.config.iter().cloned());
    }
}

/// What the checks found in a predicate.
pub(super) struct Checked {
    pub reads: Reads,
    /// Bytes the config constants it reads will take once folded, every reference counted.
    pub folded_bytes: usize,
}

/// Walk the unoptimized AST; return what it reads or the first violation.
pub(super) fn check(
    ast: &rhai::AST,
    config: &BTreeMap<String, serde_json::Value>,
) -> Result<Checked, SandboxError> {
    let mut reads = Reads::default();
    let mut folded_bytes = 0usize;
    let mut error: Option<SandboxError> = None;
    ast.walk(
        &mut |path: &[ASTNode]| match visit(path, config, &mut reads, &mut folded_bytes) {
            Ok(()) => true,
            Err(e) => {
                error = Some(e);
                false
            }
        },
    );
    match error {
        Some(e) => Err(e),
        None => Ok(Checked {
            reads,
            folded_bytes,
        }),
    }
}

/// Bytes a JSON value takes once it is a Rhai value, roughly: a fixed cost per value (a
/// `Dynamic` is 16 bytes) plus the bytes of its strings and keys.
pub(super) fn value_bytes(value: &serde_json::Value) -> usize {
    const SLOT: usize = 16;
    match value {
        serde_json::Value::String(s) => SLOT + s.len(),
        serde_json::Value::Array(items) => SLOT + items.iter().map(value_bytes).sum::<usize>(),
        serde_json::Value::Object(map) => {
            SLOT + map
                .iter()
                .map(|(k, v)| k.len() + value_bytes(v))
                .sum::<usize>()
        }
        _ => SLOT,
    }
}

fn visit(
    path: &[ASTNode],
    config: &BTreeMap<String, serde_json::Value>,
    reads: &mut Reads,
    folded_bytes: &mut usize,
) -> Result<(), SandboxError> {
    let Some(node) = path.last() else {
        return Ok(());
    };
    match node {
        ASTNode::Stmt(Stmt::Expr(expr)) if path.len() == 1 => not_obviously_non_bool(expr),
        ASTNode::Stmt(Stmt::FnCall(call, pos)) => forbidden_call(call.name.as_str(), *pos),
        ASTNode::Expr(Expr::FnCall(call, pos) | Expr::MethodCall(call, pos)) => {
            forbidden_call(call.name.as_str(), *pos)
        }
        // `Fn("name")` with a literal name may already be a function-pointer constant.
        ASTNode::Expr(Expr::DynamicConstant(value, pos)) if value.is_fnptr() => {
            Err(SandboxError::new(
                ErrorKind::ForbiddenSymbol,
                "function pointers are not available in predicates",
                *pos,
            ))
        }
        ASTNode::Expr(Expr::ThisPtr(pos)) => Err(SandboxError::new(
            ErrorKind::ForbiddenSymbol,
            "'this' is not available in predicates",
            *pos,
        )),
        ASTNode::Expr(expr @ Expr::Variable(var, _, pos)) => {
            let parent = path.len().checked_sub(2).and_then(|i| path.get(i));
            match var.1.as_str() {
                "context" => {
                    let attribute = context_attribute(expr, parent).ok_or_else(|| {
                        SandboxError::new(
                            ErrorKind::UndeclaredInput,
                            "context can only be read as context.<attribute>, \
                             context[\"<attribute>\"] or \"<attribute>\" in context",
                            *pos,
                        )
                    })?;
                    reads.context.insert(attribute);
                    Ok(())
                }
                "config" => {
                    let name = config_name(expr, parent).ok_or_else(|| {
                        SandboxError::new(
                            ErrorKind::UnknownConfig,
                            "config can only be read as config.<name>, not through a method \
                             call or index; compare or test membership instead (x in config.<name>)",
                            *pos,
                        )
                    })?;
                    let Some(value) = config.get(&name) else {
                        return Err(SandboxError::new(
                            ErrorKind::UnknownConfig,
                            format!("config.{name} is not a constant of this world version"),
                            *pos,
                        ));
                    };
                    *folded_bytes = folded_bytes.saturating_add(value_bytes(value));
                    reads.config.insert(name);
                    Ok(())
                }
                // Strict variables reject every other name at parse time; this is a second
                // line of defence.
                other => Err(SandboxError::new(
                    ErrorKind::ForbiddenSymbol,
                    format!("unknown variable '{other}'"),
                    *pos,
                )),
            }
        }
        _ => Ok(()),
    }
}

fn forbidden_call(name: &str, pos: rhai::Position) -> Result<(), SandboxError> {
    if FORBIDDEN_CALLS.contains(&name) {
        return Err(SandboxError::new(
            ErrorKind::ForbiddenSymbol,
            format!("'{name}' is not available in predicates"),
            pos,
        ));
    }
    Ok(())
}

/// The attribute named where `var` (the `context` variable) is the head of `parent`.
fn context_attribute(var: &Expr, parent: Option<&ASTNode>) -> Option<String> {
    match parent? {
        ASTNode::Expr(Expr::Dot(bin, ..)) if std::ptr::eq(&bin.lhs, var) => {
            match chain_head(&bin.rhs) {
                Expr::Property(prop, _) => Some(prop.2.to_string()),
                _ => None,
            }
        }
        ASTNode::Expr(Expr::Index(bin, ..)) if std::ptr::eq(&bin.lhs, var) => {
            match chain_head(&bin.rhs) {
                Expr::StringConstant(s, _) => Some(s.to_string()),
                _ => None,
            }
        }
        // `"x" in context` is parsed as `contains(context, "x")`.
        ASTNode::Expr(Expr::FnCall(call, _))
            if call.name == "contains"
                && call.args.len() == 2
                && std::ptr::eq(&call.args[0], var) =>
        {
            match &call.args[1] {
                Expr::StringConstant(s, _) => Some(s.to_string()),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The constant named where `var` (the `config` variable) is read as `config.NAME`, and
/// nothing more, so that the optimizer folds it into a literal.
fn config_name(var: &Expr, parent: Option<&ASTNode>) -> Option<String> {
    match parent? {
        ASTNode::Expr(Expr::Dot(bin, ..)) if std::ptr::eq(&bin.lhs, var) => match &bin.rhs {
            Expr::Property(prop, _) => Some(prop.2.to_string()),
            _ => None,
        },
        _ => None,
    }
}

/// The first link of a property chain: `a` in `a.b.c` or `a[0].b`.
fn chain_head(expr: &Expr) -> &Expr {
    match expr {
        Expr::Dot(bin, ..) | Expr::Index(bin, ..) => chain_head(&bin.lhs),
        other => other,
    }
}

fn not_obviously_non_bool(expr: &Expr) -> Result<(), SandboxError> {
    let what = match expr {
        Expr::IntegerConstant(..) => "an integer",
        Expr::FloatConstant(..) => "a float",
        Expr::StringConstant(..) | Expr::InterpolatedString(..) => "a string",
        Expr::CharConstant(..) => "a character",
        Expr::Array(..) => "an array",
        Expr::Map(..) => "a map",
        Expr::Unit(..) => "()",
        _ => return Ok(()),
    };
    Err(SandboxError::new(
        ErrorKind::NotBool,
        format!("a predicate must evaluate to a bool, but this one is {what}"),
        expr.position(),
    ))
}

/// The declared inputs must equal the attributes read: an undeclared read is a hidden
/// dependency, and an unread declaration is a rule that cannot react to what it says it checks.
pub(crate) fn inputs_match(reads: &Reads, inputs: &[String]) -> Result<(), SandboxError> {
    let declared: BTreeSet<&str> = inputs.iter().map(String::as_str).collect();
    let read: BTreeSet<&str> = reads.context.iter().map(String::as_str).collect();
    let undeclared: Vec<&str> = read.difference(&declared).copied().collect();
    let unread: Vec<&str> = declared.difference(&read).copied().collect();
    if undeclared.is_empty() && unread.is_empty() {
        return Ok(());
    }
    let mut parts = Vec::new();
    if !undeclared.is_empty() {
        parts.push(format!(
            "reads undeclared input(s) {}",
            list(&undeclared, "context.")
        ));
    }
    if !unread.is_empty() {
        parts.push(format!(
            "declares input(s) {} but never reads them",
            list(&unread, "")
        ));
    }
    Err(SandboxError {
        kind: ErrorKind::UndeclaredInput,
        message: parts.join("; "),
        position: None,
    })
}

fn list(names: &[&str], prefix: &str) -> String {
    names
        .iter()
        .map(|n| format!("'{prefix}{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// After optimization every `config.NAME` is a literal; a `config` left in the tree would
/// fail at evaluation, where `config` is not bound.
pub(super) fn no_free_config(ast: &rhai::AST) -> Result<(), SandboxError> {
    let mut found = None;
    ast.walk(&mut |path: &[ASTNode]| {
        if let Some(ASTNode::Expr(Expr::Variable(var, _, pos))) = path.last() {
            if var.1.as_str() == "config" {
                found = Some(*pos);
                return false;
            }
        }
        true
    });
    match found {
        Some(pos) => Err(SandboxError {
            kind: ErrorKind::UnknownConfig,
            message: "config can only be read as config.<name>".into(),
            position: source_position(pos),
        }),
        None => Ok(()),
    }
}
