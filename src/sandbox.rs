//! The predicate VM: one shared, locked-down Rhai engine, compilation of predicates with
//! static checks, and bounded evaluation. This is the only module that names `rhai` types.
//!
//! Predicates are Rhai *expressions*: no statements, loops, assignment, closures or function
//! definitions, so every predicate terminates. The engine starts from `Engine::new_raw()` and
//! gets an allow-list of packages plus our helpers, so nothing that blocks, reads files, time or
//! randomness is reachable even by a computed name. Every size and depth limit is set, the
//! source size is capped before parsing, and a wall-clock deadline per evaluation is enforced
//! from `on_progress` with our own tick counter (Rhai's own count restarts inside callbacks).

mod check;
pub(crate) mod helpers;
mod value;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicMapPackage, BasicMathPackage, BasicStringPackage,
    LogicPackage, MoreStringPackage, Package,
};
use rhai::{Dynamic, Engine, EvalAltResult, OptimizationLevel, ParseErrorType, Position, Scope};
use serde::{Deserialize, Serialize};

pub(crate) use check::inputs_match;
pub use check::Reads;
pub use value::{Bindings, Input};

/// Limits of the predicate VM. Every one has a safe default; all are configurable through
/// `config` (`SPECTRAL_SANDBOX_*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Rhai operations one evaluation may use. A typical predicate uses 10–60.
    pub max_operations: u64,
    /// Depth of nested native calls an evaluation may reach.
    pub max_call_levels: usize,
    /// Nesting depth of an expression, checked while parsing (so a hostile source is rejected
    /// before it can overflow the stack) and kept small enough that evaluation recursion fits
    /// in a 2 MiB thread stack with a wide margin.
    pub max_expr_depth: usize,
    /// Bytes in one string value (summed over the strings inside one array or map).
    pub max_string_bytes: usize,
    /// Elements in one array, nested elements included.
    pub max_array_len: usize,
    /// Properties in one map, nested properties included.
    pub max_map_len: usize,
    /// Bytes of predicate source; Rhai itself has no such limit.
    pub max_source_bytes: usize,
    /// Wall-clock time one predicate evaluation may take, in microseconds.
    pub deadline_us: u64,
    /// Operations all the rules of one decision may use together. Counted exactly, so the
    /// same request against the same version gets the same answer whatever the load.
    pub decision_max_operations: u64,
    /// Wall-clock time all the rules of one decision may take together, in microseconds: a
    /// backstop behind the operation budget.
    pub decision_deadline_us: u64,
    /// Bytes of config constants one predicate may fold into its compiled form, counting
    /// every reference (a 1,000-element list read 100 times folds 100 copies).
    pub max_folded_bytes: usize,
    /// Bytes of folded constants all the rules of one module may hold together.
    pub max_module_bytes: usize,
    /// Operations above which a decision counts as expensive: the batch gives up at this
    /// many, and the module's later decisions run off the API threads.
    pub offload_operations: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_operations: 10_000,
            max_call_levels: 8,
            max_expr_depth: 64,
            max_string_bytes: 16 * 1024,
            max_array_len: 1024,
            max_map_len: 1024,
            max_source_bytes: 8 * 1024,
            deadline_us: 5_000,
            decision_max_operations: 100_000,
            decision_deadline_us: 50_000,
            max_folded_bytes: 1024 * 1024,
            max_module_bytes: 4 * 1024 * 1024,
            offload_operations: 2_000,
        }
    }
}

impl Limits {
    /// The per-evaluation deadline as a duration.
    pub fn deadline(&self) -> Duration {
        Duration::from_micros(self.deadline_us)
    }

    /// The per-decision deadline as a duration.
    pub(crate) fn decision_deadline(&self) -> Duration {
        Duration::from_micros(self.decision_deadline_us)
    }
}

/// What one decision may still spend across its rules: operations (exact) and time (a
/// backstop). Every rule of a decision draws on the same budget, so a module of many
/// expensive rules is bounded as a whole, not only rule by rule.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Operations left.
    pub operations: u64,
    /// When the decision's time runs out.
    pub deadline: Instant,
}

/// What went wrong in a predicate, as a stable kind that tests, metrics and the metadata of a
/// decision can rely on, plus a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct SandboxError {
    pub kind: ErrorKind,
    pub message: String,
    /// 1-based line and column in the predicate source, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<SourcePosition>,
}

/// 1-based line and column in a predicate's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    pub line: usize,
    pub column: usize,
}

impl std::fmt::Display for SourcePosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// The stable kinds of predicate failure. Compile-time kinds come first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The source is longer than `max_source_bytes`.
    SourceTooLarge,
    /// The source does not parse as a predicate expression (statements, loops, `let`, `fn`,
    /// closures and `eval` all land here).
    Syntax,
    /// The expression nests deeper than `max_expr_depth`.
    ExpressionTooDeep,
    /// A literal is larger than the size limits allow.
    LiteralTooLarge,
    /// A symbol that predicates may not use (`Fn`, `call`, `this`, …).
    ForbiddenSymbol,
    /// The predicate reads a context attribute it did not declare, reads context in a way
    /// that cannot be checked, or declares an input it never reads.
    UndeclaredInput,
    /// The predicate reads a config constant that does not exist.
    UnknownConfig,
    /// The predicate can be seen not to produce a bool.
    NotBool,
    /// Evaluation used more than `max_operations`.
    TooManyOperations,
    /// Evaluation ran past its wall-clock deadline.
    DeadlineExceeded,
    /// The rules of one decision used up its operation budget together.
    BudgetExceeded,
    /// The folded constants of a predicate or module are larger than the limits allow.
    ModuleTooLarge,
    /// A value grew past a size limit.
    DataTooLarge,
    /// Calls nested deeper than `max_call_levels`.
    CallTooDeep,
    /// A function that does not exist (or is not allowed) was called.
    FunctionNotFound,
    /// Integer overflow, division by zero and the like.
    Arithmetic,
    /// A context attribute or map property that is absent was read.
    PropertyNotFound,
    /// An operation on a value of the wrong type.
    TypeMismatch,
    /// The predicate evaluated to something other than a bool.
    NonBoolResult,
    /// A helper rejected its arguments (unknown time zone, …).
    Helper,
    /// Any other runtime error.
    Runtime,
}

impl ErrorKind {
    /// The snake_case name used in JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SourceTooLarge => "source_too_large",
            Self::Syntax => "syntax",
            Self::ExpressionTooDeep => "expression_too_deep",
            Self::LiteralTooLarge => "literal_too_large",
            Self::ForbiddenSymbol => "forbidden_symbol",
            Self::UndeclaredInput => "undeclared_input",
            Self::UnknownConfig => "unknown_config",
            Self::NotBool => "not_bool",
            Self::TooManyOperations => "too_many_operations",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::BudgetExceeded => "budget_exceeded",
            Self::ModuleTooLarge => "module_too_large",
            Self::DataTooLarge => "data_too_large",
            Self::CallTooDeep => "call_too_deep",
            Self::FunctionNotFound => "function_not_found",
            Self::Arithmetic => "arithmetic",
            Self::PropertyNotFound => "property_not_found",
            Self::TypeMismatch => "type_mismatch",
            Self::NonBoolResult => "non_bool_result",
            Self::Helper => "helper",
            Self::Runtime => "runtime",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl SandboxError {
    fn new(kind: ErrorKind, message: impl Into<String>, pos: Position) -> Self {
        Self {
            kind,
            message: message.into(),
            position: source_position(pos),
        }
    }
}

fn source_position(pos: Position) -> Option<SourcePosition> {
    Some(SourcePosition {
        line: pos.line()?,
        column: pos.position().unwrap_or(0),
    })
}

thread_local! {
    /// Operations seen by `on_progress` on this thread since the current evaluation began.
    /// Evaluation is synchronous on the calling thread, so a thread-local is exact.
    static TICKS: Cell<u64> = const { Cell::new(0) };
    /// The deadline of the evaluation running on this thread; `None` outside evaluation
    /// (compilation never runs predicate code, so it needs none).
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// Operations the evaluation running on this thread may use before the decision's budget
    /// is spent; `u64::MAX` outside evaluation.
    static CAP: Cell<u64> = const { Cell::new(u64::MAX) };
    /// The tick count at which the clock was last read in the running evaluation.
    static CLOCK_READ_AT: Cell<u64> = const { Cell::new(0) };
}

/// Charge work done inside one native call (a list helper's comparisons) to the running
/// evaluation, as operations: the engine counts the call as one, but the budget of the
/// decision and of the rule should see what it cost. Enforced at the next operation.
pub(crate) fn charge(operations: u64) {
    TICKS.with(|t| t.set(t.get().saturating_add(operations)));
}

/// The token `on_progress` aborts with when the deadline passes.
const DEADLINE_TOKEN: &str = "spectral:deadline";
/// The token `on_progress` aborts with when the decision's operation budget is spent.
const BUDGET_TOKEN: &str = "spectral:budget";

/// What a batch element evaluates to when its rule's `applies_when` did not hold. A value of
/// a type no predicate can construct, so "did not apply" is only ever decided by evaluating
/// the guard, never read from a predicate's result.
#[derive(Debug, Clone, Copy)]
struct NotApplied;

/// A compiled predicate: an immutable AST, shared by every evaluation.
#[derive(Debug, Clone)]
pub struct Program {
    ast: rhai::AST,
    reads: Reads,
    /// Bytes of config constants folded into the AST.
    folded_bytes: usize,
}

impl Program {
    /// The context attributes and config names this program reads.
    pub fn reads(&self) -> &Reads {
        &self.reads
    }

    /// Bytes of config constants folded into this program, every reference counted.
    pub(crate) fn folded_bytes(&self) -> usize {
        self.folded_bytes
    }
}

/// Several rules' programs joined into one, so that a decision pays the engine's per-call
/// set-up once; see [`Sandbox::batch`].
#[derive(Debug, Clone)]
pub struct Batch {
    ast: rhai::AST,
    len: usize,
}

/// What a batch evaluation gave: per rule, `None` when its guard did not hold or the
/// predicate's bool, and the operations the whole batch used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BatchOutcome {
    pub results: Vec<Option<bool>>,
    pub operations: u64,
}

/// A successful evaluation: the bool and the operations it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub value: bool,
    pub operations: u64,
}

/// A failed evaluation: the error and the operations used until it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub error: SandboxError,
    pub operations: u64,
}

/// The shared predicate VM. Build it once at start; it is immutable afterwards and is
/// `Send + Sync`, so one instance serves every thread.
pub struct Sandbox {
    engine: Engine,
    limits: Limits,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("limits", &self.limits)
            .finish()
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl Sandbox {
    /// Build the engine with the given limits.
    pub fn new(limits: Limits) -> Self {
        let mut engine = Engine::new_raw();
        // The allow-list. Not registered, so unreachable even through `Fn("name")`:
        // LanguageCorePackage (`sleep`, `parse_json`, …), time, iterators, blobs and `Fn`
        // helpers.
        for module in [
            ArithmeticPackage::new().as_shared_module(),
            LogicPackage::new().as_shared_module(),
            BasicStringPackage::new().as_shared_module(),
            MoreStringPackage::new().as_shared_module(),
            BasicArrayPackage::new().as_shared_module(),
            BasicMapPackage::new().as_shared_module(),
            BasicMathPackage::new().as_shared_module(),
        ] {
            engine.register_global_module(module);
        }
        helpers::register(&mut engine);

        engine
            .set_max_operations(limits.max_operations)
            .set_max_call_levels(limits.max_call_levels)
            .set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth)
            .set_max_string_size(limits.max_string_bytes)
            .set_max_array_size(limits.max_array_len)
            .set_max_map_size(limits.max_map_len)
            .set_max_variables(8)
            .set_max_functions(0)
            .set_strict_variables(true)
            .set_allow_looping(false)
            .set_allow_anonymous_fn(false)
            .set_allow_statement_expression(false)
            .set_allow_shadowing(false)
            .set_fail_on_invalid_map_property(true)
            // Under `sync` the interner takes a lock that stalls for milliseconds (F7).
            .set_max_strings_interned(0)
            // Parsing does not optimize, so that the static checks see the source as
            // written; `compile` then folds with `Simple`, which folds built-in operators and
            // config constants but never calls functions at compile time, where no deadline
            // runs (F6).
            .set_optimization_level(OptimizationLevel::None);
        engine.disable_symbol("eval");
        engine.on_print(|_| {});
        engine.on_debug(|_, _, _| {});
        engine.on_progress(|_| {
            let ticks = TICKS.with(|t| {
                let v = t.get().wrapping_add(1);
                t.set(v);
                v
            });
            if ticks > CAP.with(Cell::get) {
                return Some(Dynamic::from(BUDGET_TOKEN));
            }
            // Reading the clock every 16 operations keeps the overhead near zero while a single
            // expensive operation can overshoot the deadline by at most 15 others. By distance,
            // not by residue: a helper's charge moves the count by more than one.
            if ticks.wrapping_sub(CLOCK_READ_AT.with(Cell::get)) >= 16 {
                CLOCK_READ_AT.with(|c| c.set(ticks));
                if let Some(deadline) = DEADLINE.with(Cell::get) {
                    if Instant::now() >= deadline {
                        return Some(Dynamic::from(DEADLINE_TOKEN));
                    }
                }
            }
            None
        });
        Self { engine, limits }
    }

    /// The limits this sandbox enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How many strings the engine interns; always 0, because the interner's lock stalls
    /// concurrent evaluations for milliseconds under `sync` (F7).
    pub fn strings_interned_limit(&self) -> usize {
        self.engine.max_strings_interned()
    }

    /// Compile a predicate expression.
    ///
    /// `inputs` are the context attributes the rule declares; `config` the version's constants,
    /// which are folded into the AST. The static checks run here: only `context.<input>` and
    /// `config.<name>` may be read, every declared input must be read, forbidden symbols are
    /// rejected, and a result that can be seen not to be a bool is rejected.
    pub fn compile(
        &self,
        source: &str,
        inputs: &[String],
        config: &BTreeMap<String, serde_json::Value>,
    ) -> Result<Program, SandboxError> {
        let program = self.compile_reads(source, config)?;
        check::inputs_match(&program.reads, inputs)?;
        Ok(program)
    }

    /// Compile and run the static checks that do not depend on the declared inputs, returning
    /// what the expression reads. Used where the inputs are checked for several expressions
    /// together (a rule's `applies_when` and predicate).
    pub fn compile_reads(
        &self,
        source: &str,
        config: &BTreeMap<String, serde_json::Value>,
    ) -> Result<Program, SandboxError> {
        if source.len() > self.limits.max_source_bytes {
            return Err(SandboxError {
                kind: ErrorKind::SourceTooLarge,
                message: format!(
                    "predicate source is {} bytes, over the limit of {}",
                    source.len(),
                    self.limits.max_source_bytes
                ),
                position: None,
            });
        }
        let scope = self.compile_scope(config)?;
        let raw = self
            .engine
            .compile_expression_with_scope(&scope, source)
            .map_err(|e| parse_error(*e.0, e.1))?;
        let checked = check::check(&raw, config)?;
        // Folding copies a constant into every place that reads it; refuse before folding,
        // so that a small source cannot expand into a large tree even for a moment.
        if checked.folded_bytes > self.limits.max_folded_bytes {
            return Err(SandboxError {
                kind: ErrorKind::ModuleTooLarge,
                message: format!(
                    "the config constants this predicate reads fold into {} bytes, over the \
                     limit of {}; read a large constant in fewer places",
                    checked.folded_bytes, self.limits.max_folded_bytes
                ),
                position: None,
            });
        }
        let optimized = self
            .engine
            .optimize_ast(&scope, raw, OptimizationLevel::Simple);
        check::no_free_config(&optimized)?;
        Ok(Program {
            ast: optimized,
            reads: checked.reads,
            folded_bytes: checked.folded_bytes,
        })
    }

    /// The scope predicates compile in: `context` as a variable, so that strict mode accepts
    /// it but the optimizer cannot fold it, and `config` as a constant, so that its
    /// properties become literals.
    fn compile_scope(
        &self,
        config: &BTreeMap<String, serde_json::Value>,
    ) -> Result<Scope<'static>, SandboxError> {
        let mut scope = Scope::new();
        scope.push("context", ());
        let mut config_map = rhai::Map::new();
        for (name, value) in config {
            let value = value::from_json(value, &self.limits).map_err(|why| SandboxError {
                kind: ErrorKind::LiteralTooLarge,
                message: format!("config.{name}: {why}"),
                position: None,
            })?;
            config_map.insert(name.as_str().into(), value);
        }
        scope.push_constant("config", config_map);
        Ok(scope)
    }

    /// Join the rules of a module into one program that evaluates them all in a single
    /// engine call, so that a decision pays the engine's per-call set-up once rather than per
    /// rule.
    ///
    /// Each rule is `(applies_when, predicate)`, both compiled and checked one by one. The
    /// batch is built from those checked trees, never from their text, so no token of one
    /// rule can reach another: element *i* is `if guard_i { predicate_i } else { NotApplied }`
    /// (or `predicate_i` alone), evaluated in order against one scope, exactly what running
    /// the rules one by one does. `None` for an empty module or one larger than an array may
    /// be.
    pub fn batch(&self, rules: &[(Option<&Program>, &Program)]) -> Option<Batch> {
        use rhai::{Expr, FlowControl, Stmt, StmtBlock, ThinVec};
        if rules.is_empty() || rules.len() > self.limits.max_array_len {
            return None;
        }
        let block = |program: &Program| {
            StmtBlock::new(
                program.ast.statements().iter().cloned(),
                Position::NONE,
                Position::NONE,
            )
        };
        // A predicate is one expression statement; its expression goes into the array as it
        // is, without a block around it (a block costs a scope save and restore per rule).
        let expr = |program: &Program| match program.ast.statements() {
            [Stmt::Expr(e)] => (**e).clone(),
            _ => Expr::Stmt(Box::new(block(program))),
        };
        let mut elements = ThinVec::with_capacity(rules.len());
        for (guard, predicate) in rules {
            let element = match guard {
                None => expr(predicate),
                Some(guard) => {
                    let condition = expr(guard);
                    let not_applied = Stmt::Expr(Box::new(Expr::DynamicConstant(
                        Box::new(Dynamic::from(NotApplied)),
                        Position::NONE,
                    )));
                    let branch = FlowControl {
                        expr: condition,
                        body: block(predicate),
                        branch: StmtBlock::new([not_applied], Position::NONE, Position::NONE),
                    };
                    Expr::Stmt(Box::new(StmtBlock::new(
                        [Stmt::If(Box::new(branch), Position::NONE)],
                        Position::NONE,
                        Position::NONE,
                    )))
                }
            };
            elements.push(element);
        }
        let body = Stmt::Expr(Box::new(Expr::Array(elements, Position::NONE)));
        Some(Batch {
            ast: rhai::AST::new([body], rhai::Module::new()),
            len: rules.len(),
        })
    }

    /// A fresh budget for one decision.
    pub fn budget(&self) -> Budget {
        Budget {
            operations: self.limits.decision_max_operations,
            deadline: Instant::now() + self.limits.decision_deadline(),
        }
    }

    /// Evaluate a batch within `cap` operations (and the budget): the per-rule results, or
    /// `None` when anything failed (an error, a limit, a non-bool of any kind, `()`
    /// included). The caller then runs the rules one by one, which attributes the failure to
    /// its rule; the batch only ever answers where running them one by one would answer the
    /// same. It takes nothing from `budget`: the caller gives the rules run one by one a
    /// budget of their own.
    pub(crate) fn eval_batch(
        &self,
        batch: &Batch,
        bindings: &mut Bindings,
        budget: &Budget,
        cap: u64,
    ) -> Option<BatchOutcome> {
        // The per-rule limit too: the engine's own count does not see what helpers charge,
        // and the batch's total is at least any one rule's.
        let cap = cap.min(budget.operations).min(self.limits.max_operations);
        // The rule's deadline, from the budget's own reading of the clock rather than another.
        let deadline = budget
            .deadline
            .checked_sub(self.limits.decision_deadline())
            .map_or(budget.deadline, |start| start + self.limits.deadline())
            .min(budget.deadline);
        let (result, operations) = self.run(&batch.ast, bindings, cap, deadline);
        let Ok(values) = result.ok()?.into_array() else {
            return None;
        };
        if values.len() != batch.len {
            return None;
        }
        let results = values
            .into_iter()
            .map(|v| {
                if v.is::<NotApplied>() {
                    Some(None)
                } else {
                    v.as_bool().ok().map(Some)
                }
            })
            .collect::<Option<Vec<_>>>()?;
        Some(BatchOutcome {
            results,
            operations,
        })
    }

    /// Evaluate a program against an input with a budget of its own. Never panics; every
    /// failure, including a non-bool result, comes back as a [`Failure`] for the caller to
    /// fail closed.
    pub fn eval(&self, program: &Program, bindings: &mut Bindings) -> Result<Outcome, Failure> {
        self.eval_within(program, bindings, &mut self.budget())
    }

    /// Evaluate a program against an input, drawing on a decision's budget. Never panics;
    /// every failure, including a non-bool result and a spent budget, comes back as a
    /// [`Failure`] for the caller to fail closed.
    pub(crate) fn eval_within(
        &self,
        program: &Program,
        bindings: &mut Bindings,
        budget: &mut Budget,
    ) -> Result<Outcome, Failure> {
        let now = Instant::now();
        let rule_deadline = now + self.limits.deadline();
        if budget.operations == 0 || now >= budget.deadline {
            return Err(Failure {
                error: self.budget_error(budget),
                operations: 0,
            });
        }
        // The rule's own limit binds unless the decision has less left.
        let rule_capped = self.limits.max_operations < budget.operations;
        let cap = budget.operations.min(self.limits.max_operations);
        let (result, operations) = self.run(
            &program.ast,
            bindings,
            cap,
            rule_deadline.min(budget.deadline),
        );
        budget.operations = budget.operations.saturating_sub(operations);
        match result {
            Ok(value) => match value.as_bool() {
                Ok(value) => Ok(Outcome { value, operations }),
                Err(type_name) => Err(Failure {
                    error: SandboxError {
                        kind: ErrorKind::NonBoolResult,
                        message: format!("predicate returned {type_name}, not bool"),
                        position: None,
                    },
                    operations,
                }),
            },
            Err(err) => {
                let error = match eval_error(*err, &self.limits) {
                    // The cap that stopped it was the rule's own, not the decision's.
                    e if e.kind == ErrorKind::BudgetExceeded && rule_capped => SandboxError {
                        kind: ErrorKind::TooManyOperations,
                        message: format!(
                            "evaluation used more than {} operations",
                            self.limits.max_operations
                        ),
                        ..e
                    },
                    // The clock that stopped it was the decision's, not the rule's.
                    e if e.kind == ErrorKind::DeadlineExceeded
                        && rule_deadline > budget.deadline =>
                    {
                        SandboxError {
                            message: format!(
                                "the decision ran past its deadline of {} µs",
                                self.limits.decision_deadline_us
                            ),
                            ..e
                        }
                    }
                    e => e,
                };
                Err(Failure { error, operations })
            }
        }
    }

    fn budget_error(&self, budget: &Budget) -> SandboxError {
        if budget.operations == 0 {
            SandboxError {
                kind: ErrorKind::BudgetExceeded,
                message: format!(
                    "the decision used its budget of {} operations before this rule finished",
                    self.limits.decision_max_operations
                ),
                position: None,
            }
        } else {
            SandboxError {
                kind: ErrorKind::DeadlineExceeded,
                message: format!(
                    "the decision ran past its deadline of {} µs",
                    self.limits.decision_deadline_us
                ),
                position: None,
            }
        }
    }

    /// One engine call with an operation cap and a deadline; the operations it used.
    fn run(
        &self,
        ast: &rhai::AST,
        bindings: &mut Bindings,
        cap: u64,
        deadline: Instant,
    ) -> (Result<Dynamic, Box<EvalAltResult>>, u64) {
        // An expression cannot declare variables, but rewind anyway so that nothing one
        // program might leave in the scope can reach the next.
        bindings.scope.rewind(1);
        TICKS.with(|t| t.set(0));
        CLOCK_READ_AT.with(|c| c.set(0));
        CAP.with(|c| c.set(cap));
        DEADLINE.with(|d| d.set(Some(deadline)));
        let result = self
            .engine
            .eval_ast_with_scope::<Dynamic>(&mut bindings.scope, ast);
        DEADLINE.with(|d| d.set(None));
        CAP.with(|c| c.set(u64::MAX));
        let ticks = TICKS.with(Cell::get);
        // A helper's charge is enforced at the next operation; one made by the last call of
        // an evaluation is enforced here.
        let result = match result {
            Ok(_) if ticks > cap => Err(Box::new(EvalAltResult::ErrorTerminated(
                Dynamic::from(BUDGET_TOKEN),
                Position::NONE,
            ))),
            other => other,
        };
        // What was charged past the cap (a helper's whole call) is not counted: a budget is
        // never spent by more than it holds.
        (result, ticks.min(cap))
    }
}

fn parse_error(kind: ParseErrorType, pos: Position) -> SandboxError {
    let kind_of = match &kind {
        ParseErrorType::ExprTooDeep => ErrorKind::ExpressionTooDeep,
        ParseErrorType::LiteralTooLarge(..) => ErrorKind::LiteralTooLarge,
        ParseErrorType::BadInput(rhai::LexError::StringTooLong(_)) => ErrorKind::LiteralTooLarge,
        _ => ErrorKind::Syntax,
    };
    SandboxError::new(kind_of, kind.to_string(), pos)
}

fn eval_error(err: EvalAltResult, limits: &Limits) -> SandboxError {
    let pos = err.position();
    if let EvalAltResult::ErrorInFunctionCall(_, _, inner, _) = err {
        return eval_error(*inner, limits);
    }
    let (kind, message) = match &err {
        EvalAltResult::ErrorTerminated(token, _)
            if token.clone().into_string().ok().as_deref() == Some(DEADLINE_TOKEN) =>
        {
            (
                ErrorKind::DeadlineExceeded,
                format!(
                    "evaluation ran past its deadline of {} µs",
                    limits.deadline_us
                ),
            )
        }
        EvalAltResult::ErrorTerminated(token, _)
            if token.clone().into_string().ok().as_deref() == Some(BUDGET_TOKEN) =>
        {
            (
                ErrorKind::BudgetExceeded,
                format!(
                    "the decision used its budget of {} operations",
                    limits.decision_max_operations
                ),
            )
        }
        EvalAltResult::ErrorTooManyOperations(_) => (
            ErrorKind::TooManyOperations,
            format!(
                "evaluation used more than {} operations",
                limits.max_operations
            ),
        ),
        EvalAltResult::ErrorDataTooLarge(what, _) => (
            ErrorKind::DataTooLarge,
            format!("{what} exceeds the sandbox size limits"),
        ),
        EvalAltResult::ErrorStackOverflow(_) => (
            ErrorKind::CallTooDeep,
            format!("calls nested deeper than {}", limits.max_call_levels),
        ),
        EvalAltResult::ErrorFunctionNotFound(sig, _) => (
            ErrorKind::FunctionNotFound,
            format!("function not found: {sig}"),
        ),
        EvalAltResult::ErrorArithmetic(msg, _) => (ErrorKind::Arithmetic, msg.clone()),
        EvalAltResult::ErrorPropertyNotFound(prop, _) => (
            ErrorKind::PropertyNotFound,
            format!("property '{prop}' is absent"),
        ),
        EvalAltResult::ErrorIndexNotFound(idx, _) => (
            ErrorKind::PropertyNotFound,
            format!("index {idx} is absent"),
        ),
        EvalAltResult::ErrorMismatchDataType(..)
        | EvalAltResult::ErrorMismatchOutputType(..)
        | EvalAltResult::ErrorIndexingType(..) => (ErrorKind::TypeMismatch, err.to_string()),
        EvalAltResult::ErrorRuntime(value, _) => match value.clone().into_string() {
            Ok(msg) if msg.starts_with(helpers::ERROR_PREFIX) => (ErrorKind::Helper, msg),
            _ => (ErrorKind::Runtime, err.to_string()),
        },
        _ => (ErrorKind::Runtime, err.to_string()),
    };
    SandboxError::new(kind, message, pos)
}

#[cfg(test)]
mod tests;
