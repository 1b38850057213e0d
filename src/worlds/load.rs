//! Loading a world from a folder: `world.toml` (schema, config, actions, rules and cases) plus
//! one `.rhai` file per predicate. Every problem is reported with its file and line.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::compile::{compile, CompiledWorld};
use super::model::{
    Action, AttrType, Attribute, Case, Rule, Severity, Source, Status, WorkFramePatch, WorldModel,
};
use super::problem::{Locus, Problem, Which};
use crate::sandbox::Sandbox;

/// The manifest's file name inside a world folder.
pub(crate) const MANIFEST: &str = "world.toml";

/// Loading a world folder failed; every problem found is listed.
#[derive(Debug, thiserror::Error)]
#[error("{}", render(.0))]
pub struct FolderError(pub Vec<Problem>);

fn render(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorld {
    world: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    context: BTreeMap<String, Spanned<RawAttribute>>,
    #[serde(default)]
    config: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    actions: Vec<Spanned<RawAction>>,
    #[serde(default)]
    record_context: super::model::RecordContext,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttribute {
    #[serde(rename = "type")]
    ty: Spanned<String>,
    #[serde(default)]
    description: String,
    source: Option<Spanned<String>>,
    required: Option<bool>,
    min: Option<f64>,
    max: Option<f64>,
    #[serde(default)]
    values: Vec<String>,
    max_length: Option<usize>,
    items: Option<Spanned<String>>,
    max_items: Option<usize>,
    #[serde(default)]
    fields: BTreeMap<String, Spanned<RawAttribute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    aggregation: Option<Spanned<String>>,
    #[serde(default)]
    work_frames: BTreeMap<String, Spanned<WorkFramePatch>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Spanned<String>,
    #[serde(default)]
    text: String,
    severity: Spanned<String>,
    outcome: Spanned<String>,
    inputs: Spanned<Vec<String>>,
    applies_when: Option<Spanned<String>>,
    predicate: Spanned<String>,
    work_frame: Option<WorkFramePatch>,
    #[serde(default)]
    cases: Vec<Spanned<RawCase>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    #[serde(default)]
    name: String,
    context: toml::Table,
    matches: bool,
}

/// Lines of the manifest's parts, to place validation problems.
#[derive(Default)]
struct Lines {
    world: usize,
    attributes: HashMap<String, usize>,
    config: HashMap<String, usize>,
    actions: HashMap<String, usize>,
    rules: HashMap<(String, String), RuleLines>,
}

#[derive(Default, Clone)]
struct RuleLines {
    id: usize,
    inputs: usize,
    applies_when: usize,
    predicate_file: PathBuf,
    cases: Vec<usize>,
}

/// Byte offsets to 1-based line numbers.
struct LineIndex(Vec<usize>);

impl LineIndex {
    fn new(text: &str) -> Self {
        Self(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i)
                .collect(),
        )
    }

    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&nl| nl < offset) + 1
    }
}

/// Load a world folder into a model without compiling it.
pub fn load_model(dir: &Path) -> Result<WorldModel, FolderError> {
    load_with_lines(dir).map(|(model, _, _)| model)
}

/// Load, check and compile a world folder as version 1.
pub fn load(dir: &Path, sandbox: &Sandbox) -> Result<CompiledWorld, FolderError> {
    let (model, lines, manifest) = load_with_lines(dir)?;
    compile(&model, 1, sandbox).map_err(|problems| {
        FolderError(
            problems
                .into_iter()
                .map(|p| place(p, &lines, &manifest))
                .collect(),
        )
    })
}

fn place(mut p: Problem, lines: &Lines, manifest: &Path) -> Problem {
    let rule = |action: &String, rule: &String| lines.rules.get(&(action.clone(), rule.clone()));
    let (file, line) = match &p.locus {
        Locus::World { .. } => (manifest.to_path_buf(), Some(lines.world)),
        Locus::Attribute { name } => (manifest.to_path_buf(), lines.attributes.get(name).copied()),
        Locus::Config { name } => (manifest.to_path_buf(), lines.config.get(name).copied()),
        Locus::Action { action } => (manifest.to_path_buf(), lines.actions.get(action).copied()),
        Locus::Rule {
            action,
            rule: id,
            field,
        } => {
            let r = rule(action, id);
            let line = r.map(|r| match *field {
                "inputs" => r.inputs,
                _ => r.id,
            });
            (manifest.to_path_buf(), line)
        }
        Locus::Predicate {
            action,
            rule: id,
            which,
        } => match (rule(action, id), which) {
            (Some(r), Which::Predicate) => (r.predicate_file.clone(), p.position.map(|x| x.line)),
            (Some(r), Which::AppliesWhen) => {
                // The expression sits in the manifest; its own line 1 is the key's line.
                let line = r.applies_when + p.position.map_or(0, |x| x.line.saturating_sub(1));
                if let Some(pos) = p.position.as_mut() {
                    pos.line = line;
                }
                (manifest.to_path_buf(), Some(line))
            }
            (None, _) => (manifest.to_path_buf(), None),
        },
        Locus::Case {
            action,
            rule: id,
            case,
        } => (
            manifest.to_path_buf(),
            rule(action, id).and_then(|r| r.cases.get(*case).copied()),
        ),
    };
    p.file = Some(file);
    p.line = line;
    p
}

fn problem_at(file: &Path, line: usize, locus: Locus, message: impl Into<String>) -> Problem {
    let mut p = Problem::new(locus, message);
    p.file = Some(file.to_path_buf());
    p.line = Some(line);
    p
}

fn load_with_lines(dir: &Path) -> Result<(WorldModel, Lines, PathBuf), FolderError> {
    let manifest = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest).map_err(|e| {
        FolderError(vec![Problem {
            file: Some(manifest.clone()),
            ..Problem::new(
                Locus::World { field: "manifest" },
                format!("cannot read: {e}"),
            )
        }])
    })?;
    let index = LineIndex::new(&text);
    let raw: RawWorld = toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| index.line(s.start));
        FolderError(vec![Problem {
            file: Some(manifest.clone()),
            line,
            ..Problem::new(
                Locus::World { field: "manifest" },
                e.message().trim().to_string(),
            )
        }])
    })?;

    let mut problems = Vec::new();
    let mut lines = Lines {
        world: index.line(raw.world.span().start),
        ..Lines::default()
    };
    let mut context = BTreeMap::new();
    for (name, attr) in raw.context {
        let line = index.line(attr.span().start);
        lines.attributes.insert(name.clone(), line);
        let at = Locus::Attribute { name: name.clone() };
        match attribute(attr.into_inner(), &index, &manifest, &at, &mut problems) {
            Some(a) => {
                context.insert(name, a);
            }
            None => continue,
        }
    }
    let mut config = BTreeMap::new();
    for (name, value) in raw.config {
        lines
            .config
            .insert(name.clone(), index.line(value.span().start));
        config.insert(name, to_json(value.get_ref()));
    }
    let mut actions = Vec::new();
    for raw_action in raw.actions {
        let line = index.line(raw_action.span().start);
        let raw_action = raw_action.into_inner();
        let name = raw_action.name.get_ref().clone();
        lines.actions.insert(name.clone(), line);
        let mut work_frames = BTreeMap::new();
        for (status, patch) in raw_action.work_frames {
            match Status::parse(&status) {
                Some(s) => {
                    work_frames.insert(s, patch.into_inner());
                }
                None => problems.push(problem_at(
                    &manifest,
                    index.line(patch.span().start),
                    Locus::Action {
                        action: name.clone(),
                    },
                    format!("work_frames.{status}: not a status (GREEN, GREEN-SKIP, YELLOW, RED)"),
                )),
            }
        }
        if let Some(agg) = &raw_action.aggregation {
            if agg.get_ref() != "winner_takes_all" {
                problems.push(problem_at(
                    &manifest,
                    index.line(agg.span().start),
                    Locus::Action {
                        action: name.clone(),
                    },
                    format!(
                        "unknown aggregation '{}'; the one mode is winner_takes_all",
                        agg.get_ref()
                    ),
                ));
            }
        }
        let mut rules = Vec::new();
        for raw_rule in raw_action.rules {
            if let Some(rule) = rule(
                dir,
                &name,
                raw_rule,
                &index,
                &manifest,
                &mut lines,
                &mut problems,
            ) {
                rules.push(rule);
            }
        }
        actions.push(Action {
            name,
            description: raw_action.description,
            aggregation: Default::default(),
            work_frames,
            rules,
        });
    }
    if !problems.is_empty() {
        return Err(FolderError(problems));
    }
    Ok((
        WorldModel {
            record_context: raw.record_context,
            world: raw.world.into_inner(),
            description: raw.description,
            context,
            config,
            actions,
        },
        lines,
        manifest,
    ))
}

fn attribute(
    raw: RawAttribute,
    index: &LineIndex,
    manifest: &Path,
    at: &Locus,
    problems: &mut Vec<Problem>,
) -> Option<Attribute> {
    let before = problems.len();
    let ty = AttrType::parse(raw.ty.get_ref());
    if ty.is_none() {
        problems.push(problem_at(
            manifest,
            index.line(raw.ty.span().start),
            at.clone(),
            format!(
                "unknown type '{}'; expected one of {}",
                raw.ty.get_ref(),
                AttrType::ALL.map(AttrType::as_str).join(", ")
            ),
        ));
    }
    let source = match raw.source.as_ref().map(|s| s.get_ref().as_str()) {
        None | Some("supplied") => Source::Supplied,
        Some("system") => Source::System,
        Some(other) => {
            problems.push(problem_at(
                manifest,
                raw.source
                    .as_ref()
                    .map_or(0, |s| index.line(s.span().start)),
                at.clone(),
                format!("unknown source '{other}'; expected supplied or system"),
            ));
            Source::Supplied
        }
    };
    let items = match &raw.items {
        None => None,
        Some(s) => match AttrType::parse(s.get_ref()) {
            Some(t) => Some(t),
            None => {
                problems.push(problem_at(
                    manifest,
                    index.line(s.span().start),
                    at.clone(),
                    format!("unknown item type '{}'", s.get_ref()),
                ));
                None
            }
        },
    };
    let mut fields = BTreeMap::new();
    for (name, field) in raw.fields {
        if let Some(a) = attribute(field.into_inner(), index, manifest, at, problems) {
            fields.insert(name, a);
        }
    }
    if problems.len() > before {
        return None;
    }
    Some(Attribute {
        ty: ty?,
        description: raw.description,
        source,
        required: raw.required.unwrap_or(true),
        min: raw.min,
        max: raw.max,
        values: raw.values,
        max_length: raw.max_length,
        items,
        max_items: raw.max_items,
        fields,
    })
}

fn rule(
    dir: &Path,
    action: &str,
    raw: Spanned<RawRule>,
    index: &LineIndex,
    manifest: &Path,
    lines: &mut Lines,
    problems: &mut Vec<Problem>,
) -> Option<Rule> {
    let raw = raw.into_inner();
    let id = raw.id.get_ref().clone();
    let at = |field| Locus::Rule {
        action: action.to_string(),
        rule: id.clone(),
        field,
    };
    let before = problems.len();
    let severity = Severity::parse(raw.severity.get_ref());
    if severity.is_none() {
        problems.push(problem_at(
            manifest,
            index.line(raw.severity.span().start),
            at("severity"),
            format!(
                "unknown severity '{}'; expected T1, T2 or T3",
                raw.severity.get_ref()
            ),
        ));
    }
    let outcome = Status::parse(raw.outcome.get_ref());
    if outcome.is_none() {
        problems.push(problem_at(
            manifest,
            index.line(raw.outcome.span().start),
            at("outcome"),
            format!(
                "unknown outcome '{}'; expected RED, YELLOW, GREEN-SKIP or GREEN",
                raw.outcome.get_ref()
            ),
        ));
    }
    let relative = PathBuf::from(raw.predicate.get_ref());
    let predicate_line = index.line(raw.predicate.span().start);
    let inside = relative.extension().is_some_and(|e| e == "rhai")
        && relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    let predicate_file = dir.join(&relative);
    let predicate = if !inside {
        problems.push(problem_at(
            manifest,
            predicate_line,
            at("predicate"),
            format!(
                "predicate '{}' must be a relative path to a .rhai file inside the world folder",
                relative.display()
            ),
        ));
        None
    } else {
        match read_inside(dir, &predicate_file) {
            Ok(text) => Some(text.trim_end().to_string()),
            Err(e) => {
                problems.push(problem_at(
                    manifest,
                    predicate_line,
                    at("predicate"),
                    format!(
                        "predicate file '{}' cannot be read: {e}",
                        relative.display()
                    ),
                ));
                None
            }
        }
    };
    let mut cases = Vec::new();
    let mut case_lines = Vec::new();
    for case in raw.cases {
        case_lines.push(index.line(case.span().start));
        let case = case.into_inner();
        cases.push(Case {
            name: case.name,
            context: case
                .context
                .iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect(),
            matches: case.matches,
        });
    }
    lines.rules.insert(
        (action.to_string(), id.clone()),
        RuleLines {
            id: index.line(raw.id.span().start),
            inputs: index.line(raw.inputs.span().start),
            applies_when: raw
                .applies_when
                .as_ref()
                .map_or(0, |a| index.line(a.span().start)),
            predicate_file,
            cases: case_lines,
        },
    );
    if problems.len() > before {
        return None;
    }
    Some(Rule {
        id,
        text: raw.text,
        severity: severity?,
        outcome: outcome?,
        inputs: raw.inputs.into_inner(),
        applies_when: raw.applies_when.map(Spanned::into_inner),
        predicate: predicate?,
        work_frame: raw.work_frame,
        cases,
        provenance: None,
    })
}

/// TOML to JSON; TOML date-times become RFC 3339 strings, the form a caller sends.
fn to_json(value: &toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(items) => J::Array(items.iter().map(to_json).collect()),
        toml::Value::Table(t) => {
            J::Object(t.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
        }
    }
}

/// The largest predicate file read; the sandbox's source limit is far below it.
const MAX_PREDICATE_FILE_BYTES: u64 = 1 << 20;

/// Read a file that must lie inside `dir` once every link is resolved: a symlink out of the
/// world folder is refused, not followed, and so is a file too large to be a predicate.
fn read_inside(dir: &Path, file: &Path) -> std::io::Result<String> {
    let root = std::fs::canonicalize(dir)?;
    let real = std::fs::canonicalize(file)?;
    if !real.starts_with(&root) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "it leads out of the world folder (through a symbolic link)",
        ));
    }
    let meta = std::fs::metadata(&real)?;
    if !meta.is_file() || meta.len() > MAX_PREDICATE_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a regular file of at most {MAX_PREDICATE_FILE_BYTES} bytes"),
        ));
    }
    std::fs::read_to_string(real)
}
