//! Compiling a whole world model: checking its structure, names, schema, rules and cases, and
//! compiling every action into a module, each predicate with its static checks. Every
//! problem is reported, not only the first.

use std::collections::BTreeSet;

use super::model::{AttrType, Attribute, Source, WorldModel, SYSTEM_ATTRIBUTES};
use super::module::{Module, ModuleSource};
use super::problem::{Locus, Problem};
use crate::sandbox::Sandbox;

/// A checked world model with every action compiled.
#[derive(Debug)]
pub struct CompiledWorld {
    pub model: WorldModel,
    pub version: u64,
    /// One module per action, in the model's action order.
    pub modules: Vec<Module>,
}

impl CompiledWorld {
    /// The module of an action.
    pub fn module(&self, action: &str) -> Option<&Module> {
        self.modules.iter().find(|m| m.manifest.action == action)
    }
}

fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_ident(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && s.len() <= 64
}

fn is_action_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.split('.').all(is_ident)
}

fn is_rule_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Check a world model and compile every action as `version`.
pub fn compile(
    model: &WorldModel,
    version: u64,
    sandbox: &Sandbox,
) -> Result<CompiledWorld, Vec<Problem>> {
    let mut problems = Vec::new();
    if !is_slug(&model.world) {
        problems.push(Problem::new(
            Locus::World { field: "world" },
            format!(
                "'{}' is not a world slug (lowercase letters, digits and '-', at most 63)",
                model.world
            ),
        ));
    }
    for (name, attr) in &model.context {
        check_attribute(name, attr, &mut problems);
    }
    for name in model.config.keys() {
        if !is_ident(name) {
            problems.push(Problem::new(
                Locus::Config { name: name.clone() },
                "config names are lowercase identifiers (letters, digits, '_')",
            ));
        }
    }
    if model.actions.is_empty() {
        problems.push(Problem::new(
            Locus::World { field: "actions" },
            "a world needs at least one action",
        ));
    }
    let mut action_names = BTreeSet::new();
    for action in &model.actions {
        let at = || Locus::Action {
            action: action.name.clone(),
        };
        if !is_action_name(&action.name) {
            problems.push(Problem::new(
                at(),
                "action names are dot-separated lowercase identifiers, e.g. wire_transfer.release",
            ));
        }
        if !action_names.insert(action.name.as_str()) {
            problems.push(Problem::new(at(), "duplicate action name"));
        }
        if action.rules.is_empty() {
            problems.push(Problem::new(at(), "an action needs at least one rule"));
        }
        let mut ids = BTreeSet::new();
        for rule in &action.rules {
            let field = |field| Locus::Rule {
                action: action.name.clone(),
                rule: rule.id.clone(),
                field,
            };
            if !is_rule_id(&rule.id) {
                problems.push(Problem::new(
                    field("id"),
                    "rule ids are lowercase letters, digits, '-' and '_'",
                ));
            }
            if !ids.insert(rule.id.as_str()) {
                problems.push(Problem::new(
                    field("id"),
                    "duplicate rule id in this action",
                ));
            }
            if rule.text.trim().is_empty() {
                problems.push(Problem::new(field("text"), "a rule needs its text"));
            }
            let mut seen = BTreeSet::new();
            for input in &rule.inputs {
                if !model.context.contains_key(input) {
                    problems.push(Problem::new(
                        field("inputs"),
                        format!("input '{input}' is not an attribute of the context schema"),
                    ));
                }
                if !seen.insert(input) {
                    problems.push(Problem::new(
                        field("inputs"),
                        format!("input '{input}' is listed twice"),
                    ));
                }
            }
            if rule.cases.is_empty() {
                problems.push(Problem::new(
                    field("cases"),
                    "a rule needs at least one case showing when it matches or not",
                ));
            }
            for (i, case) in rule.cases.iter().enumerate() {
                for key in case.context.keys() {
                    if !rule.inputs.contains(key) {
                        problems.push(Problem::new(
                            Locus::Case {
                                action: action.name.clone(),
                                rule: rule.id.clone(),
                                case: i,
                            },
                            format!("case names '{key}', which is not an input of the rule"),
                        ));
                    }
                }
            }
        }
    }
    // Compile even when structure problems exist, so that one run reports predicate errors
    // too; modules are only returned when everything is clean.
    let mut modules = Vec::with_capacity(model.actions.len());
    for index in 0..model.actions.len() {
        let Some(source) = ModuleSource::of(model, index) else {
            continue;
        };
        match Module::compile(source, version, sandbox) {
            Ok(m) => modules.push(m),
            Err(mut p) => problems.append(&mut p),
        }
    }
    if problems.is_empty() {
        Ok(CompiledWorld {
            model: model.clone(),
            version,
            modules,
        })
    } else {
        Err(problems)
    }
}

fn check_attribute(name: &str, attr: &Attribute, problems: &mut Vec<Problem>) {
    let at = || Locus::Attribute {
        name: name.to_string(),
    };
    if !is_ident(name) {
        problems.push(Problem::new(
            at(),
            "attribute names are lowercase identifiers (letters, digits, '_')",
        ));
    }
    if attr.source == Source::System {
        match SYSTEM_ATTRIBUTES.iter().find(|(n, _)| *n == name) {
            None => problems.push(Problem::new(
                at(),
                format!(
                    "only {} can have source \"system\"",
                    SYSTEM_ATTRIBUTES.map(|(n, _)| n).join(", ")
                ),
            )),
            Some((_, ty)) if *ty != attr.ty => problems.push(Problem::new(
                at(),
                format!("system attribute '{name}' has type {}", ty.as_str()),
            )),
            Some(_) => {}
        }
    }
    check_constraints(attr, &at, problems, 0);
}

fn check_constraints(
    attr: &Attribute,
    at: &dyn Fn() -> Locus,
    problems: &mut Vec<Problem>,
    depth: usize,
) {
    let ty = attr.ty;
    let numeric = matches!(ty, AttrType::Number | AttrType::Integer);
    if (attr.min.is_some() || attr.max.is_some()) && !numeric {
        problems.push(Problem::new(
            at(),
            "min and max apply to number and integer only",
        ));
    }
    if let (Some(min), Some(max)) = (attr.min, attr.max) {
        if min > max {
            problems.push(Problem::new(at(), format!("min {min} is above max {max}")));
        }
    }
    if ty == AttrType::Enum && attr.values.is_empty() {
        problems.push(Problem::new(at(), "an enum needs its values"));
    }
    if ty != AttrType::Enum && !attr.values.is_empty() {
        problems.push(Problem::new(at(), "values apply to enum only"));
    }
    if attr.max_length.is_some() && !matches!(ty, AttrType::String | AttrType::Enum) {
        problems.push(Problem::new(
            at(),
            "max_length applies to string and enum only",
        ));
    }
    if (attr.items.is_some() || attr.max_items.is_some()) && ty != AttrType::List {
        problems.push(Problem::new(at(), "items and max_items apply to list only"));
    }
    if let Some(item) = attr.items {
        if matches!(
            item,
            AttrType::List | AttrType::Object | AttrType::Timestamp | AttrType::Enum
        ) {
            problems.push(Problem::new(
                at(),
                format!(
                    "list items may be number, integer, string or bool, not {}",
                    item.as_str()
                ),
            ));
        }
    }
    if !attr.fields.is_empty() && ty != AttrType::Object {
        problems.push(Problem::new(at(), "fields apply to object only"));
    }
    if depth > 4 {
        problems.push(Problem::new(at(), "objects nest at most 4 levels deep"));
        return;
    }
    for (field, sub) in &attr.fields {
        if sub.ty == AttrType::Timestamp {
            problems.push(Problem::new(
                at(),
                format!("field '{field}': timestamps must be top-level attributes"),
            ));
        }
        if sub.source == Source::System {
            problems.push(Problem::new(
                at(),
                format!("field '{field}': only top-level attributes can be system attributes"),
            ));
        }
        check_constraints(sub, at, problems, depth + 1);
    }
}
