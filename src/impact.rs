//! Impact before publishing (docs/impact.md): what a candidate version would change, seen two
//! ways that give the same report.
//!
//! - **Shadow**: a sampled share of live decisions is also evaluated against a world's shadow
//!   version, on a thread of its own after the decision is answered and queued for the log.
//!   The shadow's answer is never returned and never recorded; a full queue skips (counted)
//!   rather than wait. Each instance counts what it saw and stores its report; a read merges
//!   every instance's.
//! - **Replay**: a version or the draft evaluated against the contexts a world kept
//!   (`record_context = "full"`), on the workers runtime, bounded in rows and time, with its
//!   progress stored as it goes.
//!
//! Both compare two answers to one request the same way ([`compare`]) and count the
//! differences per (status before, status after, rule that made the difference), keeping a
//! few example decision ids ([`Tally`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::sandbox::Sandbox;
use crate::store::{MatchedRule, RecordedContext, ReplayRecord, Store, StoreError};
use crate::worlds::context::SystemValues;
use crate::worlds::{self, ContextJson, Decision, Request, WorldModel};

/// Example decision ids kept per difference.
pub const EXAMPLES: usize = 5;
/// Differences kept per report; the rest are counted in `other`.
pub const MAX_DIFFERENCES: usize = 100;
/// What stands in for a status when the compared version has no such action.
pub const NO_ACTION: &str = "NO_ACTION";

/// One kind of difference and how often it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    /// The status answered (shadow) or recorded (replay).
    pub from: String,
    /// The status the compared version gives.
    pub to: String,
    /// The first rule, by id, that matched in one answer and not the other (or matched
    /// with another outcome); `null` when the same rules matched.
    pub rule: Option<String>,
    pub count: u64,
    /// The smallest decision ids among those that differed this way.
    pub examples: Vec<String>,
}

/// What comparing a version with the answers of a run of decisions found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Decisions compared.
    pub evaluated: u64,
    /// Those whose answers differ (in status or in the rules that matched).
    pub differing: u64,
    /// Sampled decisions not compared because the shadow's queue was full.
    #[serde(default)]
    pub skipped: u64,
    /// Differing decisions beyond the [`MAX_DIFFERENCES`] kinds listed.
    #[serde(default)]
    pub other: u64,
    /// The kinds of difference, most frequent first.
    pub differences: Vec<Difference>,
}

impl Report {
    /// One sentence for a reviewer: "would have changed 3.1% of decisions (212 of 6,800): 212
    /// GREEN → YELLOW via rule X".
    pub fn summary(&self) -> String {
        if self.evaluated == 0 {
            return "no recorded decisions to compare".into();
        }
        if self.differing == 0 {
            return format!("would have changed none of {} decisions", self.evaluated);
        }
        let share = self.differing as f64 * 100.0 / self.evaluated as f64;
        let top: Vec<String> = self
            .differences
            .iter()
            .take(3)
            .map(|d| match &d.rule {
                Some(rule) => format!("{} {} → {} via rule {rule}", d.count, d.from, d.to),
                None => format!("{} {} → {}", d.count, d.from, d.to),
            })
            .collect();
        format!(
            "would have changed {share:.1}% of decisions ({} of {}): {}",
            self.differing,
            self.evaluated,
            top.join("; ")
        )
    }
}

/// An answer as compared: its status and the rules that matched with their outcomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: String,
    pub rules: Vec<(String, String)>,
}

impl Answer {
    pub fn of(decision: &Decision) -> Self {
        Self {
            status: decision.status.as_str().to_owned(),
            rules: decision
                .decision_metadata
                .matched_rules
                .iter()
                .map(|r| (r.id.clone(), r.outcome.as_str().to_owned()))
                .collect(),
        }
    }

    pub fn recorded(status: &str, rules: &[MatchedRule]) -> Self {
        Self {
            status: status.to_owned(),
            rules: rules
                .iter()
                .map(|r| (r.id.clone(), r.outcome.clone()))
                .collect(),
        }
    }

    fn missing() -> Self {
        Self {
            status: NO_ACTION.to_owned(),
            rules: Vec::new(),
        }
    }
}

/// How `after` differs from `before`: `None` when they agree, else the rule that made the
/// difference (the smallest id matched in one and not the other, or with another outcome).
pub fn compare(before: &Answer, after: &Answer) -> Option<Option<String>> {
    let mut a: Vec<&(String, String)> = before.rules.iter().collect();
    let mut b: Vec<&(String, String)> = after.rules.iter().collect();
    a.sort();
    b.sort();
    if before.status == after.status && a == b {
        return None;
    }
    let rule = a
        .iter()
        .filter(|r| !b.contains(r))
        .chain(b.iter().filter(|r| !a.contains(r)))
        .map(|(id, _)| id.clone())
        .min();
    Some(rule)
}

/// A kind of difference: (status before, status after, rule that made the difference).
type Kind = (String, String, Option<String>);

/// Differences counted so far.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    evaluated: u64,
    differing: u64,
    skipped: u64,
    /// Per kind: how many, and the smallest example ids.
    kinds: BTreeMap<Kind, (u64, Vec<String>)>,
}

impl Tally {
    /// Count one compared decision.
    pub fn add(&mut self, decision_id: &str, before: &Answer, after: &Answer) {
        self.evaluated += 1;
        let Some(rule) = compare(before, after) else {
            return;
        };
        self.differing += 1;
        let key = (before.status.clone(), after.status.clone(), rule);
        let (count, examples) = self.kinds.entry(key).or_default();
        *count += 1;
        keep_example(examples, decision_id);
    }

    /// Add a report counted elsewhere (another instance's).
    pub fn merge(&mut self, report: &Report) {
        self.evaluated += report.evaluated;
        self.differing += report.differing;
        self.skipped += report.skipped;
        for d in &report.differences {
            let key = (d.from.clone(), d.to.clone(), d.rule.clone());
            let (count, examples) = self.kinds.entry(key).or_default();
            *count += d.count;
            for id in &d.examples {
                keep_example(examples, id);
            }
        }
    }

    pub fn report(&self) -> Report {
        let mut differences: Vec<Difference> = self
            .kinds
            .iter()
            .map(|((from, to, rule), (count, examples))| Difference {
                from: from.clone(),
                to: to.clone(),
                rule: rule.clone(),
                count: *count,
                examples: examples.clone(),
            })
            .collect();
        differences.sort_by_key(|d| std::cmp::Reverse(d.count));
        let other = differences
            .iter()
            .skip(MAX_DIFFERENCES)
            .map(|d| d.count)
            .sum();
        differences.truncate(MAX_DIFFERENCES);
        Report {
            evaluated: self.evaluated,
            differing: self.differing,
            skipped: self.skipped,
            other,
            differences,
        }
    }
}

/// Keep the [`EXAMPLES`] smallest ids: the same set whatever order they arrive in.
fn keep_example(examples: &mut Vec<String>, id: &str) {
    if examples.iter().any(|e| e == id) {
        return;
    }
    if examples.len() < EXAMPLES {
        examples.push(id.to_owned());
    } else if examples.last().is_some_and(|last| id < last.as_str()) {
        examples.pop();
        examples.push(id.to_owned());
    } else {
        return;
    }
    examples.sort();
}

/// Evaluate one request against `module` (or stand in for an action the version lacks).
fn answer_of(
    sandbox: &Sandbox,
    module: Option<&worlds::Module>,
    context: &str,
    system: SystemValues,
) -> Answer {
    evaluate_answer(sandbox, module, context, system).0
}

/// The answer, and whether a rule ran past its wall-clock deadline.
fn evaluate_answer(
    sandbox: &Sandbox,
    module: Option<&worlds::Module>,
    context: &str,
    system: SystemValues,
) -> (Answer, bool) {
    let Some(module) = module else {
        return (Answer::missing(), false);
    };
    let request = Request {
        context: ContextJson::Text(context),
        system,
        correlation_id: None,
        explain: false,
    };
    match worlds::evaluate(sandbox, module, &request) {
        Ok(decision) => {
            let late = decision
                .decision_metadata
                .errors
                .iter()
                .any(|e| e.kind == crate::sandbox::ErrorKind::DeadlineExceeded.as_str());
            (Answer::of(&decision), late)
        }
        // The deployed version answered this context, so it is an object; a version that
        // cannot read it counts as refusing it.
        Err(_) => (
            Answer {
                status: "RED".into(),
                rules: Vec::new(),
            },
            false,
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Shadow.

/// A sampled decision to evaluate against a shadow.
pub struct ShadowJob {
    /// The shadow's id, which names its report.
    pub shadow: String,
    pub world: String,
    /// The shadow version's module of the decision's action; `None` when it has no such
    /// action.
    pub module: Option<Arc<worlds::Module>>,
    pub context: Box<str>,
    pub system: SystemValues,
    pub answered: Answer,
}

/// The shadow evaluator of one instance: a bounded queue, the thread that drains it, and
/// what it has counted per shadow.
///
/// The thread runs at a low priority (nice 19 by default) and within a share of one CPU, so a
/// request thread may preempt it anywhere; nothing a request thread does may then wait for it,
/// not even for a moment. The queue is a ring twice as large as the bound a counter keeps, so
/// the slot a request thread writes is never one the thread is still reading (a full ring
/// would have it wait for that read); the thread sleeps without a lock and is woken when a job
/// arrives; it publishes its counts through an [`ArcSwap`] that readers load without a lock;
/// and skips are counted where only normal threads look.
pub struct Shadows {
    queue: Arc<Queue>,
    /// What the thread has counted per shadow id, as of its last publication.
    evaluated: Arc<ArcSwap<HashMap<String, Counted>>>,
    /// The shadows still evaluated, as of the last flush, and when that list was read: the
    /// thread forgets the others.
    live: Arc<ArcSwap<Live>>,
    /// Decisions skipped per shadow id: (world, count). Request threads and the flusher
    /// only.
    skipped: Mutex<HashMap<String, (String, u64)>>,
    /// What was last written to the store per shadow id: (evaluated, skipped). Held for a
    /// whole flush, so that two flushes (the periodic one and a read's) cannot write one
    /// shadow's report out of order.
    written: tokio::sync::Mutex<HashMap<String, (u64, u64)>>,
    thread: std::thread::Thread,
    /// Names this instance's reports.
    pub instance: String,
    /// Jobs queued, or evaluated and not yet published.
    pending: Arc<AtomicU64>,
}

struct Queue {
    /// Holds at most `capacity` jobs in a ring of twice that.
    jobs: mpsc::SyncSender<ShadowJob>,
    /// Jobs sent and not yet received.
    queued: AtomicUsize,
    capacity: usize,
    closed: AtomicBool,
}

#[derive(Debug, Clone)]
struct Counted {
    world: String,
    tally: Tally,
    /// When the thread last counted a decision of this shadow.
    last: Instant,
}

/// The shadows an instance evaluates, read at `at`.
#[derive(Debug)]
struct Live {
    at: Instant,
    ids: Vec<String>,
}

impl Live {
    /// Whether the thread may forget `counted`: its shadow has ended, which this list shows
    /// only for decisions counted before it was read (a later one may be of a shadow that
    /// started after).
    fn ended(&self, id: &str, counted: &Counted) -> bool {
        counted.last < self.at && !self.ids.iter().any(|l| l == id)
    }
}

/// The longest the thread keeps evaluated counts unpublished while it has work queued.
const PUBLISH_EVERY: Duration = Duration::from_millis(20);

impl Shadows {
    /// Start the evaluator thread `nice` steps below the API, with room for `queue` jobs,
    /// using at most `cpu_percent` of one CPU.
    pub fn start(
        sandbox: Arc<Sandbox>,
        queue: usize,
        cpu_percent: u8,
        nice: u8,
    ) -> std::io::Result<Self> {
        let capacity = queue.max(1);
        let (jobs, received) = mpsc::sync_channel(capacity.saturating_mul(2));
        let queue = Arc::new(Queue {
            jobs,
            queued: AtomicUsize::new(0),
            capacity,
            closed: AtomicBool::new(false),
        });
        let evaluated: Arc<ArcSwap<HashMap<String, Counted>>> = Default::default();
        let live = Arc::new(ArcSwap::from_pointee(Live {
            at: Instant::now(),
            ids: Vec::new(),
        }));
        let pending = Arc::new(AtomicU64::new(0));
        let (q, e, l, p) = (
            queue.clone(),
            evaluated.clone(),
            live.clone(),
            pending.clone(),
        );
        let handle = crate::background::spawn("spectral-shadow", nice, move || {
            let mut budget = CpuBudget::new(cpu_percent);
            evaluate_queued(&sandbox, &q, &received, &e, &l, &p, &mut budget);
        })?;
        Ok(Self {
            queue,
            evaluated,
            live,
            skipped: Mutex::default(),
            written: tokio::sync::Mutex::default(),
            thread: handle.thread().clone(),
            instance: format!("{}-{}", std::process::id(), uuid::Uuid::now_v7().simple()),
            pending,
        })
    }

    /// Queue a sampled decision for `shadow` of `world`, the job built by `job` only when
    /// the queue has room for it; never waits. A full queue counts the decision as skipped
    /// (`false`).
    pub fn offer(&self, shadow: &str, world: &str, job: impl FnOnce() -> ShadowJob) -> bool {
        let queued = self.queue.queued.fetch_add(1, Ordering::AcqRel);
        if queued < self.queue.capacity {
            self.pending.fetch_add(1, Ordering::AcqRel);
            // The ring has room for twice the bound: this never finds it full.
            if self.queue.jobs.try_send(job()).is_ok() {
                // A system call only when the thread sleeps, an atomic swap otherwise.
                self.thread.unpark();
                return true;
            }
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
        self.queue.queued.fetch_sub(1, Ordering::AcqRel);
        let mut skipped = self
            .skipped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match skipped.get_mut(shadow) {
            Some((_, n)) => *n += 1,
            None => {
                skipped.insert(shadow.to_owned(), (world.to_owned(), 1));
            }
        }
        false
    }

    /// Jobs queued, or evaluated and not yet counted in a report.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Acquire)
    }

    /// Write what changed since the last write to the store, one report per shadow; forget
    /// shadows no longer in `live` (the shadows still evaluated, read when called).
    pub async fn flush(
        &self,
        store: &Store,
        live: impl FnOnce() -> Vec<String>,
    ) -> Result<(), StoreError> {
        let mut written = self.written.lock().await;
        let at = Instant::now();
        let live = live();
        self.live.store(Arc::new(Live {
            at,
            ids: live.clone(),
        }));
        let evaluated = self.evaluated.load_full();
        let skipped: HashMap<String, (String, u64)> = {
            let mut skipped = self
                .skipped
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            skipped.retain(|id, _| live.contains(id));
            skipped.clone()
        };
        written.retain(|id, _| live.contains(id));
        let changed: Vec<(String, String, Report, (u64, u64))> = live
            .iter()
            .filter_map(|id| {
                let counted = evaluated.get(id);
                let skip = skipped.get(id);
                let world = counted.map(|c| &c.world).or(skip.map(|(w, _)| w))?;
                let mut tally = counted.map(|c| c.tally.clone()).unwrap_or_default();
                tally.skipped += skip.map_or(0, |(_, n)| *n);
                let mark = (tally.evaluated, tally.skipped);
                (written.get(id) != Some(&mark))
                    .then(|| (id.clone(), world.clone(), tally.report(), mark))
            })
            .collect();
        for (id, world, report, mark) in changed {
            let text = serde_json::to_string(&report)
                .map_err(|e| StoreError::Corrupt(format!("shadow report: {e}")))?;
            store
                .put_shadow_report(&id, &self.instance, &world, &text)
                .await?;
            written.insert(id, mark);
        }
        Ok(())
    }

    /// Flush every `interval` until `stop`, and once more at the end; `live` names the
    /// shadows still evaluated.
    pub async fn run_flusher(
        self: Arc<Self>,
        store: Store,
        live: impl Fn() -> Vec<String>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(interval) => false,
            };
            if let Err(e) = self.flush(&store, &live).await {
                tracing::warn!(error = %e, "writing shadow reports failed; trying again later");
            }
            if stopping {
                return;
            }
        }
    }
}

impl Drop for Shadows {
    /// The thread ends once it has drained the queue.
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// The share of one CPU a thread may use, kept per window of [`CpuBudget::WINDOW`]: a thread
/// that used more than its share of the window so far pauses until it is back within it.
struct CpuBudget {
    share: f64,
    window_start: Instant,
    cpu_at_start: Duration,
}

impl CpuBudget {
    const WINDOW: Duration = Duration::from_millis(100);

    fn new(percent: u8) -> Self {
        Self {
            share: f64::from(percent.clamp(1, 100)) / 100.0,
            window_start: Instant::now(),
            cpu_at_start: thread_cpu_time(),
        }
    }

    /// After a piece of work: how long to pause to be back within the share, if at all.
    fn pause(&mut self) -> Option<Duration> {
        if self.share >= 1.0 {
            return None;
        }
        let cpu = thread_cpu_time();
        let used = cpu.saturating_sub(self.cpu_at_start);
        let allowed = self.window_start.elapsed().mul_f64(self.share);
        let pause = (used > allowed).then(|| (used - allowed).div_f64(self.share));
        let ends = self.window_start.elapsed() + pause.unwrap_or_default();
        if ends >= Self::WINDOW {
            // The next window starts when the pause ends, with nothing used yet.
            self.window_start = Instant::now() + pause.unwrap_or_default();
            self.cpu_at_start = cpu;
        }
        pause
    }
}

/// The CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// The evaluator thread: take jobs until the queue is closed and empty, count each answer
/// against the one given, and publish the counts whenever the queue runs dry (and at least
/// every [`PUBLISH_EVERY`] while it does not).
fn evaluate_queued(
    sandbox: &Sandbox,
    queue: &Queue,
    received: &mpsc::Receiver<ShadowJob>,
    evaluated: &ArcSwap<HashMap<String, Counted>>,
    live: &ArcSwap<Live>,
    pending: &AtomicU64,
    budget: &mut CpuBudget,
) {
    let mut counted: HashMap<String, Counted> = HashMap::new();
    let mut seen_live = live.load_full();
    let mut unpublished = 0u64;
    let mut published_at = Instant::now();
    loop {
        let job = received.try_recv().ok();
        let dry = job.is_none();
        if let Some(job) = job {
            queue.queued.fetch_sub(1, Ordering::AcqRel);
            let (wall, cpu) = (Instant::now(), thread_cpu_time());
            let (after, late) = evaluate_answer(
                sandbox,
                job.module.as_deref(),
                &job.context,
                job.system.clone(),
            );
            let now = Instant::now();
            let entry = counted.entry(job.shadow).or_insert_with(|| Counted {
                world: job.world,
                tally: Tally::default(),
                last: now,
            });
            entry.last = now;
            // A deadline that passed while the thread waited for the CPU more than it ran
            // says nothing of the version: the decision was not evaluated as it would be.
            if late && thread_cpu_time().saturating_sub(cpu) < wall.elapsed() / 2 {
                entry.tally.skipped += 1;
            } else {
                entry
                    .tally
                    .add(&job.system.request_id, &job.answered, &after);
            }
            unpublished += 1;
        }
        let now_live = live.load_full();
        if !Arc::ptr_eq(&now_live, &seen_live) {
            counted.retain(|id, c| !now_live.ended(id, c));
            seen_live = now_live;
        }
        let pause = if dry { None } else { budget.pause() };
        // Published before any pause, so that a reader does not wait for it.
        if unpublished > 0 && (dry || pause.is_some() || published_at.elapsed() >= PUBLISH_EVERY) {
            evaluated.store(Arc::new(counted.clone()));
            pending.fetch_sub(unpublished, Ordering::AcqRel);
            unpublished = 0;
            published_at = Instant::now();
        }
        if dry {
            if queue.closed.load(Ordering::Acquire) {
                return;
            }
            std::thread::park();
        } else if let Some(pause) = pause {
            std::thread::sleep(pause);
        }
    }
}

/// Every instance's reports of a shadow, merged.
pub fn merge(reports: &[String]) -> Result<Report, StoreError> {
    let mut tally = Tally::default();
    for text in reports {
        let report: Report = serde_json::from_str(text)
            .map_err(|e| StoreError::Corrupt(format!("shadow report: {e}")))?;
        tally.merge(&report);
    }
    Ok(tally.report())
}

// ---------------------------------------------------------------------------------------------
// Replay.

/// How a replay is bounded and how often it reports.
#[derive(Debug, Clone)]
pub struct ReplayLimits {
    /// The most recorded decisions one replay may evaluate.
    pub max_rows: u64,
    /// The longest one replay may run; it then ends with what it has.
    pub deadline: Duration,
    /// Rows read and evaluated between two progress writes.
    pub page: u32,
}

/// Why a replay stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoppedBy {
    /// Every recorded context in range was evaluated.
    End,
    /// It reached its row limit.
    Rows,
    /// It ran out of time.
    Time,
}

/// A replay's report as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayReport {
    #[serde(flatten)]
    pub report: Report,
    pub summary: String,
    /// `null` while it runs.
    pub stopped_by: Option<StoppedBy>,
}

/// Which recorded decisions a replay evaluates: the newest of `world`'s, decided at or after
/// `since`, at most `limit`.
#[derive(Debug, Clone)]
pub struct Recorded<'a> {
    pub world: &'a str,
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub limit: u64,
}

/// Evaluate `compiled` against the `recorded` decisions (newest first), calling `progress`
/// after every page with the count so far. Blocking work runs on tokio's blocking threads, a
/// page at a time.
pub async fn replay_contexts<F, Fut>(
    store: &Store,
    sandbox: &Arc<Sandbox>,
    compiled: Arc<worlds::CompiledWorld>,
    recorded: Recorded<'_>,
    limits: &ReplayLimits,
    mut progress: F,
) -> Result<(Tally, StoppedBy), StoreError>
where
    F: FnMut(u64, &Tally) -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    let started = Instant::now();
    let Recorded {
        world,
        since,
        limit,
    } = recorded;
    let limit = limit.min(limits.max_rows);
    let mut tally = Tally::default();
    let mut before = u64::MAX;
    let mut done = 0u64;
    loop {
        if done >= limit {
            return Ok((tally, StoppedBy::Rows));
        }
        if started.elapsed() >= limits.deadline {
            return Ok((tally, StoppedBy::Time));
        }
        let want = u32::try_from((limit - done).min(u64::from(limits.page))).unwrap_or(limits.page);
        let rows = store.recorded_contexts(world, before, since, want).await?;
        let Some(last) = rows.last() else {
            return Ok((tally, StoppedBy::End));
        };
        before = last.seq;
        let n = rows.len() as u64;
        let (sandbox, compiled) = (sandbox.clone(), compiled.clone());
        let page = tokio::task::spawn_blocking(move || replay_page(&sandbox, &compiled, &rows))
            .await
            .map_err(|e| StoreError::Corrupt(format!("replay task failed: {e}")))?;
        for (id, before_answer, after_answer) in &page {
            tally.add(id, before_answer, after_answer);
        }
        done += n;
        progress(done, &tally).await?;
        if n < u64::from(want) {
            return Ok((tally, StoppedBy::End));
        }
    }
}

fn replay_page(
    sandbox: &Sandbox,
    compiled: &worlds::CompiledWorld,
    rows: &[RecordedContext],
) -> Vec<(String, Answer, Answer)> {
    rows.iter()
        .map(|r| {
            let system = SystemValues {
                request_time: r.decided_at.timestamp(),
                request_id: r.decision_id.clone(),
                caller: r.caller.clone(),
            };
            let after = answer_of(sandbox, compiled.module(&r.action), &r.context, system);
            (
                r.decision_id.clone(),
                Answer::recorded(&r.status, &r.matched_rules),
                after,
            )
        })
        .collect()
}

/// The worker that runs replays on the workers runtime: it takes the oldest queued replay
/// (or one whose worker stopped writing), runs it to its bounds, and looks again; woken by
/// `wake`, and every `poll` otherwise. Beside that, on `prune_interval`, it removes contexts
/// and finished replays older than `retention`.
pub struct ReplayRunner {
    pub store: Store,
    pub sandbox: Arc<Sandbox>,
    pub limits: ReplayLimits,
    pub poll: Duration,
    pub retention: Duration,
    pub prune_interval: Duration,
    pub prune_batch: u32,
    pub worker: String,
    pub metrics: Arc<crate::telemetry::Metrics>,
}

impl ReplayRunner {
    pub async fn run(self, stop: CancellationToken) {
        let mut next_prune = Instant::now();
        while !stop.is_cancelled() {
            if Instant::now() >= next_prune {
                self.prune(&stop).await;
                next_prune = Instant::now() + self.prune_interval;
            }
            let stale = chrono::Duration::from_std(self.limits.deadline * 2)
                .ok()
                .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
                .unwrap_or_default();
            match self.store.claim_replay(&self.worker, stale).await {
                Ok(Some(id)) => {
                    self.run_one(&id, &stop).await;
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "looking for replays failed"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
    }

    async fn prune(&self, stop: &CancellationToken) {
        let Some(before) = chrono::Duration::from_std(self.retention)
            .ok()
            .and_then(|keep| chrono::Utc::now().checked_sub_signed(keep))
        else {
            return;
        };
        let mut total = 0;
        while !stop.is_cancelled() {
            match self.store.prune_contexts(before, self.prune_batch).await {
                Ok(n) => {
                    total += n;
                    self.metrics.impact.contexts_pruned.inc_by(n);
                    if n < u64::from(self.prune_batch) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruning decision contexts failed; trying again later");
                    break;
                }
            }
            tokio::task::yield_now().await;
        }
        if total > 0 {
            tracing::info!(rows = total, before = %before, "context retention removed decision contexts");
        }
        if let Err(e) = self.store.prune_replays(before).await {
            tracing::warn!(error = %e, "pruning finished replays failed");
        }
    }

    async fn run_one(&self, id: &str, stop: &CancellationToken) {
        let record = match self.store.replay_record(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(replay = id, error = %e, "reading a replay failed");
                return;
            }
        };
        tracing::info!(replay = id, world = record.world, version = ?record.version, "replay started");
        let outcome = self.replay(&record, stop).await;
        let (status, processed, report, error) = match outcome {
            Ok((processed, report)) => ("done", processed, Some(report), None),
            Err(e) => ("failed", record.processed, None, Some(e)),
        };
        match self
            .store
            .finish_replay(
                id,
                &self.worker,
                status,
                processed,
                report.as_deref(),
                error.as_deref(),
            )
            .await
        {
            Ok(()) => {
                self.metrics
                    .impact
                    .replays
                    .with_label_values(&[status])
                    .inc();
                tracing::info!(replay = id, status, processed, "replay finished");
            }
            Err(e) => tracing::warn!(replay = id, error = %e, "finishing a replay failed"),
        }
    }

    async fn replay(
        &self,
        record: &ReplayRecord,
        stop: &CancellationToken,
    ) -> Result<(u64, String), String> {
        let model: WorldModel = serde_json::from_str(&record.model)
            .map_err(|e| format!("the replayed model does not decode: {e}"))?;
        let sandbox = self.sandbox.clone();
        let version = record.version.unwrap_or(0);
        let compiled =
            tokio::task::spawn_blocking(move || worlds::compile(&model, version, &sandbox))
                .await
                .map_err(|e| format!("compile task failed: {e}"))?
                .map_err(|problems| {
                    format!(
                        "the replayed model does not compile: {}",
                        problems
                            .iter()
                            .take(3)
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                })?;
        let mut limits = self.limits.clone();
        // Asked to stop: end the replay at the next page with what it has.
        if stop.is_cancelled() {
            limits.deadline = Duration::ZERO;
        }
        let (tally, stopped_by) = replay_contexts(
            &self.store,
            &self.sandbox,
            Arc::new(compiled),
            Recorded {
                world: &record.world,
                since: record.since,
                limit: record.limit,
            },
            &limits,
            |done, tally| {
                let text = replay_report(tally, None);
                let (store, id, worker) = (&self.store, &record.id, &self.worker);
                async move { store.replay_progress(id, worker, done, &text).await }
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        let processed = tally.report().evaluated;
        Ok((processed, replay_report(&tally, Some(stopped_by))))
    }
}

/// A replay's report as stored: JSON of [`ReplayReport`].
fn replay_report(tally: &Tally, stopped_by: Option<StoppedBy>) -> String {
    let report = tally.report();
    let shown = ReplayReport {
        summary: report.summary(),
        report,
        stopped_by,
    };
    serde_json::to_string(&shown).unwrap_or_else(|_| "{}".into())
}

// ---------------------------------------------------------------------------------------------
// The impact of a World Agent candidate.

/// The most recent kept decisions a candidate's impact is measured on.
pub const CANDIDATE_ROWS: u64 = 1_000;
/// The longest the measure may take; it then reports what it has.
pub const CANDIDATE_DEADLINE: Duration = Duration::from_secs(10);

/// What `rule`, added to `action` of `base` (the model the rule was authored against), would
/// have changed over `world`'s most recent kept decisions; `None` when the world keeps no
/// contexts or the model with the rule does not compile.
pub async fn candidate_impact(
    store: &Store,
    sandbox: &Arc<Sandbox>,
    base: &WorldModel,
    action: &str,
    rule: &worlds::model::Rule,
) -> Result<Option<ReplayReport>, StoreError> {
    if store.context_count(&base.world).await? == 0 {
        return Ok(None);
    }
    let mut model = base.clone();
    let Some(target) = model.actions.iter_mut().find(|a| a.name == action) else {
        return Ok(None);
    };
    target.rules.retain(|r| r.id != rule.id);
    target.rules.push(rule.clone());
    let world = model.world.clone();
    let s = sandbox.clone();
    let compiled = tokio::task::spawn_blocking(move || worlds::compile(&model, 0, &s))
        .await
        .map_err(|e| StoreError::Corrupt(format!("compile task failed: {e}")))?;
    let Ok(compiled) = compiled else {
        return Ok(None);
    };
    let limits = ReplayLimits {
        max_rows: CANDIDATE_ROWS,
        deadline: CANDIDATE_DEADLINE,
        page: 500,
    };
    let (tally, stopped_by) = replay_contexts(
        store,
        sandbox,
        Arc::new(compiled),
        Recorded {
            world: &world,
            since: None,
            limit: CANDIDATE_ROWS,
        },
        &limits,
        |_, _| async { Ok(()) },
    )
    .await?;
    let report = tally.report();
    Ok(Some(ReplayReport {
        summary: report.summary(),
        report,
        stopped_by: Some(stopped_by),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: &str, rules: &[(&str, &str)]) -> Answer {
        Answer {
            status: status.into(),
            rules: rules
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn answers_that_agree_are_no_difference_whatever_the_rule_order() {
        let a = answer("RED", &[("x", "RED"), ("y", "YELLOW")]);
        let b = answer("RED", &[("y", "YELLOW"), ("x", "RED")]);
        assert_eq!(compare(&a, &b), None);
    }

    #[test]
    fn the_difference_is_named_by_the_smallest_rule_that_differs() {
        let a = answer("GREEN", &[]);
        let b = answer("YELLOW", &[("z", "YELLOW"), ("m", "YELLOW")]);
        assert_eq!(compare(&a, &b), Some(Some("m".into())));
        // The same rule with another outcome differs too.
        let c = answer("RED", &[("m", "RED")]);
        let d = answer("YELLOW", &[("m", "YELLOW")]);
        assert_eq!(compare(&c, &d), Some(Some("m".into())));
        // A status that differs with the same rules has no rule to name.
        assert_eq!(
            compare(&answer("RED", &[]), &answer("GREEN", &[])),
            Some(None)
        );
    }

    #[test]
    fn a_tally_merged_from_parts_reports_what_one_tally_of_the_whole_does() {
        let green = answer("GREEN", &[]);
        let yellow = answer("YELLOW", &[("r", "YELLOW")]);
        let mut whole = Tally::default();
        let mut parts = [Tally::default(), Tally::default()];
        for i in 0..40 {
            let id = format!("d{i:03}");
            let after = if i % 3 == 0 { &yellow } else { &green };
            whole.add(&id, &green, after);
            parts[i % 2].add(&id, &green, after);
        }
        let mut merged = Tally::default();
        for p in &parts {
            merged.merge(&p.report());
        }
        assert_eq!(merged.report(), whole.report());
        let report = whole.report();
        assert_eq!((report.evaluated, report.differing), (40, 14));
        assert_eq!(
            report.differences[0].examples,
            ["d000", "d003", "d006", "d009", "d012"]
        );
        assert_eq!(
            report.summary(),
            "would have changed 35.0% of decisions (14 of 40): 14 GREEN → YELLOW via rule r"
        );
    }
}
