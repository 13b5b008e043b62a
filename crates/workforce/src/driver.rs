//! Drivers: run, replay and resume a run against an event log.
//!
//! The driver is the only part that touches the world. It loops:
//!
//! 1. append the pending batch (an input event and the events the engine derived from it) to
//!    the log, and wait until the log has it;
//! 2. only then perform the engine's effects: start tool and model calls, each in its own tokio
//!    task, or cancel them;
//! 3. wait for the next call result, the engine's next timer, or a cancellation request, and turn
//!    it into an input event (stamped by the clock) that the engine applies.
//!
//! Because every result enters the log before the engine acts on it, [`replay`] can feed the
//! recorded inputs to a fresh engine and must get the same events back, and [`resume`] can rebuild
//! the engine after a crash and go on. Calls that were in flight when the process died have no
//! recorded result: resume fails their attempts with class `interrupted`, and the
//! task's retry policy decides. **Tools must therefore tolerate being called again** for a call
//! whose result was not recorded (make repeats harmless, or use `on_failure` instead of retry).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::{
    Actor, AppendStream, CallContext, CancellationToken, Clock, EncodedEvent, Envelope, ErrorClass,
    EventQuery, EventSink, EventSource, ModelProvider, ModelRequest, NewEvent, PendingAppend,
    RunId, SecretSource, Timestamp, ToolError, ToolOutput, ToolSpec, async_trait,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::engine::{Effect, Engine, EngineError, RunStatus, SPAWN_TOOL, TaskView, is_input};
use crate::graph::{TaskGraph, TaskKind, suggestion};
use crate::hashing::FastMap;
use crate::state::LogHasher;

/// Calls tools by name: the seam the gateway fills (policy, sandbox, MCP) and that
/// [`ToolRegistry`](crate::tools::ToolRegistry) fills with native tools.
#[async_trait]
pub trait ToolInvoker: Send + Sync {
    /// Every tool's name, sorted.
    fn names(&self) -> Vec<String>;
    /// How the model sees a tool.
    fn spec(&self, name: &str) -> Option<ToolSpec>;
    /// Calls a tool once.
    async fn invoke(
        &self,
        name: &str,
        args: Value,
        ctx: CallContext,
    ) -> Result<ToolOutput, ToolError>;
    /// Checks arguments as a call of tool `name` would, without calling it (see
    /// [`Tool::check_args`](agent_runtime_core::Tool::check_args)). The default accepts
    /// everything.
    fn check_args(&self, name: &str, args: &Value) -> Result<(), ToolError> {
        let _ = (name, args);
        Ok(())
    }
    /// Why a tool not among [`ToolInvoker::names`] is missing, when that is known (a tool of an
    /// MCP server that cannot be reached now); `None`, the default: it is unknown.
    fn unavailable(&self, name: &str) -> Option<String> {
        let _ = name;
        None
    }
}

/// Finds the model provider for the provider part of a route (`openai` in `openai/gpt-4o`).
pub trait ModelRouter: Send + Sync {
    /// The provider, if configured.
    fn provider(&self, provider: &str) -> Option<Arc<dyn ModelProvider>>;
}

/// A router with no providers: agent tasks fail with `model_unavailable`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoModels;

impl ModelRouter for NoModels {
    fn provider(&self, _: &str) -> Option<Arc<dyn ModelProvider>> {
        None
    }
}

/// A router over a fixed map of providers.
#[derive(Clone, Default)]
pub struct StaticModels(pub BTreeMap<String, Arc<dyn ModelProvider>>);

impl ModelRouter for StaticModels {
    fn provider(&self, provider: &str) -> Option<Arc<dyn ModelProvider>> {
        self.0.get(provider).cloned()
    }
}

/// Sees every batch of events as it is recorded (for progress displays).
pub trait Observer: Send + Sync {
    /// Called after each batch is durable; `engine` names tasks ([`Engine::task_name`]).
    /// Each event comes as the log records it; [`EncodedEvent::payload_json`] is its payload's
    /// canonical JSON, for an observer that reads one.
    fn on_events(&self, events: &[EncodedEvent], engine: &Engine);
}

/// A request from outside the run's process (a person at another terminal, an embedding
/// application) that the driver records as an input before acting on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlRequest {
    /// Cancel the whole run.
    CancelRun {
        /// The run it is meant for; a request for another run is ignored.
        run_id: Option<RunId>,
        /// Who asks (recorded as `person:BY`).
        by: String,
        /// Why.
        reason: String,
    },
    /// Cancel a task and everything downstream of it.
    CancelTask {
        /// The run it is meant for; a request for another run is ignored.
        run_id: Option<RunId>,
        /// Who asks (recorded as `person:BY`).
        by: String,
        /// The task's graph id; an unknown or finished task is ignored.
        task: String,
        /// Why, if said: recorded, and given as each cancelled task's reason.
        reason: Option<String>,
    },
}

impl ControlRequest {
    /// The request a `run.cancel_requested` event carries (payload `task` for a subtree,
    /// `reason`), asked by the event's actor; `None` for another kind of event, or one not by a
    /// person (the run records the cancellation as the person's, so nobody else may ask).
    pub fn from_event(e: &Envelope) -> Option<ControlRequest> {
        if e.kind != agent_runtime_core::EventKind::RunCancelRequested {
            return None;
        }
        let Actor::Person(by) = &e.actor else {
            return None;
        };
        let by = by.clone();
        let text = |k: &str| e.payload.get(k).and_then(Value::as_str).map(str::to_string);
        Some(match text("task") {
            Some(task) => ControlRequest::CancelTask {
                run_id: Some(e.run_id),
                by,
                task,
                reason: text("reason"),
            },
            None => ControlRequest::CancelRun {
                run_id: Some(e.run_id),
                by,
                reason: text("reason").unwrap_or_else(|| "cancel requested".into()),
            },
        })
    }
}

/// Whether an event of a run's log is the workforce's own (what replay compares), rather than
/// a record that another part writes under the same run id: the gateway's audit trail of each
/// tool call (`policy.decided`, `approval.*`, `tool.started`, and `tool.*` events with the
/// gateway's string `call_id`), cancellation requests (`run.cancel_requested`, which the run
/// answers with its own `run.cancelled` or `task.cancelled` input), and whatever kinds other
/// parts add later. Only the kinds the scheduler derives or consumes count, and its tool and
/// model events only with its numeric `call`.
pub fn is_workforce_event(kind: agent_runtime_core::EventKind, payload: &Value) -> bool {
    use agent_runtime_core::EventKind as K;
    match kind {
        K::RunCreated
        | K::RunStarted
        | K::RunResumed
        | K::RunCompleted
        | K::RunFailed
        | K::RunCancelled
        | K::TaskSpawned
        | K::TaskStarted
        | K::TaskCompleted
        | K::TaskFailed
        | K::TaskRetryScheduled
        | K::TaskSkipped
        | K::TaskCancelled
        | K::ClockObserved
        | K::RandomDrawn => true,
        K::TaskPaused | K::TaskUnpaused => payload.get("call").is_some_and(Value::is_u64),
        K::ToolRequested
        | K::ToolCompleted
        | K::ToolFailed
        | K::ModelRequested
        | K::ModelCompleted
        | K::ModelFailed => payload.get("call").is_some_and(Value::is_u64),
        _ => false,
    }
}

/// A clock that follows tokio's clock from a starting time, so that tests with paused tokio time
/// get reproducible timestamps while timers still fire.
#[derive(Debug)]
pub struct TokioClock {
    base: Timestamp,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock showing `base` now.
    pub fn new(base: Timestamp) -> Self {
        TokioClock {
            base,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.base.saturating_add(self.start.elapsed())
    }
}

/// What a run needs from the world.
#[derive(Clone)]
pub struct RunOptions {
    /// Seeds ids, jitter and every other random draw.
    pub seed: u64,
    /// Where events go.
    pub sink: Arc<dyn EventSink>,
    /// Stamps input events.
    pub clock: Arc<dyn Clock>,
    /// Tools.
    pub tools: Arc<dyn ToolInvoker>,
    /// Models.
    pub models: Arc<dyn ModelRouter>,
    /// Progress listener.
    pub observer: Option<Arc<dyn Observer>>,
    /// Where the `{{ secrets.NAME }}` of tool steps' arguments come from (see
    /// [`agent_runtime_core::SecretSource`]); [`agent_runtime_core::NoSecrets`] for none.
    pub secrets: Arc<dyn SecretSource>,
    /// Facts about where a run was started or resumed, recorded in its `run.created` or
    /// `run.resumed` (`labels`) for the embedder to read back (see [`created_labels`]); the
    /// scheduler never reads them. The command line records the folder it ran in and the
    /// gateway files it was given, so that `resume` goes on in the same surroundings. Empty:
    /// nothing is recorded. Not secrets: they are kept in clear in the log.
    pub labels: BTreeMap<String, String>,
}

/// The labels a `run.created` or `run.resumed` payload records (see [`RunOptions::labels`]):
/// empty for a run created or resumed without any, a simulation, or a log written before
/// labels existed. The latest event's labels are where the run last went on.
///
/// ```
/// use agent_runtime_workforce::{driver::created_labels, engine::Engine, graph::parse_graph};
/// # let t = agent_runtime_core::Timestamp::from_unix_nanos(0);
/// let graph = parse_graph("tasks:\n  - {id: a, tool: echo, args: {}}\n", "g.yaml".as_ref()).unwrap();
/// let labels = [("workspace".to_string(), "/srv/ws".to_string())].into();
/// let created = Engine::created_event_labelled(agent_runtime_core::RunId::from_bytes([1; 16]), &graph, 7, t, &labels);
/// assert_eq!(created_labels(&created.payload), labels);
/// ```
pub fn created_labels(payload: &serde_json::Value) -> BTreeMap<String, String> {
    payload
        .get("labels")
        .and_then(serde_json::Value::as_object)
        .map(|labels| {
            labels
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// How a run ended.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    /// The run.
    pub run_id: RunId,
    /// Its final status.
    pub status: RunStatus,
    /// Outputs of the tasks nothing depends on.
    pub outputs: BTreeMap<String, Value>,
    /// Every task's status.
    pub tasks: Vec<TaskView>,
    /// The per-run log hash (see [`crate::state::LogHasher`]).
    pub log_hash: String,
    /// Events in the run's log.
    pub events: u64,
    /// Why the run failed or was cancelled, when it did: `task `T` failed: CLASS: MESSAGE`,
    /// or `REASON (ACTOR)`.
    pub error: Option<String>,
}

/// Why a run could not be driven.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The log refused an append or a read.
    #[error("event log: {0}")]
    Log(String),
    /// The engine rejected the log.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A graph given to [`run_graph`] (built in code, say) is invalid: a cycle, an unknown
    /// task, a bad limit. Nothing was recorded.
    #[error("invalid task graph: {0}")]
    Graph(crate::graph::GraphError),
    /// The graph names a tool or provider that is not available.
    #[error("{0}")]
    Unavailable(String),
    /// A tool step's fixed arguments are refused by its tool (see [`check_fixed_args`]).
    #[error("task `{task}`: args: {message}")]
    Arguments {
        /// The task's graph id.
        task: String,
        /// The tool's refusal.
        message: String,
    },
    /// No such run in the log.
    #[error("no run {0} in the event log")]
    NoRun(RunId),
    /// The run has already ended.
    #[error("run {run_id} already ended ({status}); nothing to resume")]
    Finished {
        /// The run.
        run_id: RunId,
        /// How it ended.
        status: String,
    },
    /// Replay produced other events than the recorded ones.
    #[error(
        "replay diverged at event {index} (seq {seq}): recorded {recorded}, replay produced {produced}"
    )]
    Diverged {
        /// Position in the run's events, from 0.
        index: usize,
        /// Sequence number of the recorded event.
        seq: u64,
        /// The recorded event, summarized.
        recorded: String,
        /// What replay produced there, summarized.
        produced: String,
    },
    /// Nothing can happen any more, yet the run has not ended (a bug).
    #[error("the run stalled with {0} tasks open and nothing in flight")]
    Stalled(usize),
    /// Someone else drives the run (see [`EventSink::claim_run`]), or a new run's id is already
    /// in the log (see [`EventSink::claim_new_run`]): the log's own message.
    #[error("{0}")]
    Claimed(String),
    /// The run holds an event of a kind this build does not know ([`EventKind::Unknown`]): a
    /// newer build wrote it, and only such a build can replay or resume the run.
    ///
    /// [`EventKind::Unknown`]: agent_runtime_core::EventKind::Unknown
    #[error(
        "run {run_id} holds an event of kind `{kind}` (seq {seq}), which this build does not \
         know: a newer build wrote it; replay or resume the run with that build"
    )]
    NewerLog {
        /// The run.
        run_id: RunId,
        /// The event's sequence number.
        seq: u64,
        /// Its kind, as written.
        kind: String,
    },
}

/// Refuses an event of a kind this build does not know ([`DriverError::NewerLog`]): the
/// scheduler cannot tell whether it was one of its inputs, so no replay or resume over it is
/// sound.
fn known_kind(e: &Envelope) -> Result<(), DriverError> {
    if e.kind.is_known() {
        return Ok(());
    }
    Err(DriverError::NewerLog {
        run_id: e.run_id,
        seq: e.seq,
        kind: e.kind.as_str().to_string(),
    })
}

/// Claims `run_id` in the log for the caller, who drives it: a new run (see
/// [`EventSink::claim_new_run`]) or one to resume ([`EventSink::claim_run`]). Off the async
/// threads: a claim may wait out another holder's probe and looks the run up in the log.
pub(crate) async fn claim(
    sink: &Arc<dyn EventSink>,
    run_id: RunId,
    new_run: bool,
) -> Result<agent_runtime_core::RunClaim, agent_runtime_core::SinkError> {
    let sink = sink.clone();
    let take = move || {
        if new_run {
            sink.claim_new_run(run_id)
        } else {
            sink.claim_run(run_id)
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => rt.spawn_blocking(take).await.unwrap_or_else(|e| {
            Err(agent_runtime_core::SinkError::new(format!(
                "claiming run {run_id} failed: {e}"
            )))
        }),
        Err(_) => take(),
    }
}

/// Checks that every tool and model provider the graph's tasks and agents use is available.
/// (A new run's `limits.tools` is checked too, by [`check_limited_tools`]; a recorded run's is
/// not, as a limit on a tool nobody calls does nothing.)
pub fn check_available(
    graph: &TaskGraph,
    tools: &dyn ToolInvoker,
    models: &dyn ModelRouter,
) -> Result<(), DriverError> {
    let names = tools.names();
    let known = |n: &str| names.iter().any(|x| x == n);
    let hint = |n: &str| suggestion(n, names.iter().map(String::as_str));
    for t in &graph.tasks {
        if let TaskKind::Tool { tool, .. } = t.kind()
            && !known(tool)
        {
            return Err(DriverError::Unavailable(format!(
                "task `{}`: {}",
                t.id,
                crate::graph::missing_tool(tool, &names, &|n| tools.unavailable(n))
            )));
        }
    }
    for (name, a) in &graph.agents {
        for tool in &a.tools {
            if tool != SPAWN_TOOL && !known(tool) {
                return Err(DriverError::Unavailable(match tools.unavailable(tool) {
                    Some(why) => {
                        format!("agent `{name}`: tool `{tool}` is not available now: {why}")
                    }
                    None => format!("agent `{name}`: unknown tool `{tool}`{}", hint(tool)),
                }));
            }
        }
        let used = graph.tasks.iter().any(|t| t.agent.as_deref() == Some(name));
        let (provider, _) = crate::engine::split_route(&a.model);
        if used && models.provider(&provider).is_none() {
            return Err(DriverError::Unavailable(format!(
                "agent `{name}`: no model provider `{provider}` is configured (route `{}`)",
                a.model
            )));
        }
    }
    Ok(())
}

/// Checks that every tool the graph's `limits.tools` names is available: a misspelt name would
/// leave the tool it meant without its limit.
pub fn check_limited_tools(graph: &TaskGraph, tools: &dyn ToolInvoker) -> Result<(), DriverError> {
    let names = tools.names();
    match graph.limits.tools.keys().find(|t| !names.contains(t)) {
        Some(tool) => Err(DriverError::Unavailable(format!(
            "limits.tools: {}",
            crate::graph::missing_tool(tool, &names, &|n| tools.unavailable(n))
        ))),
        None => Ok(()),
    }
}

/// Checks the arguments of every tool step whose arguments are fixed in the graph (see
/// [`TaskGraph::fixed_tool_args`]) as the tool would check a call, so that a graph whose step
/// the tool would refuse is refused before the run starts. `run_graph*` does this;
/// [`TaskGraph::check_args_in`] does it with a location in the graph's text.
pub fn check_fixed_args(graph: &TaskGraph, tools: &dyn ToolInvoker) -> Result<(), DriverError> {
    for (_, id, tool, args) in graph.fixed_tool_args() {
        tools
            .check_args(tool, args)
            .map_err(|e| DriverError::Arguments {
                task: id.to_string(),
                message: e.message,
            })?;
    }
    Ok(())
}

/// Runs `graph` to its end and returns the outcome.
pub async fn run_graph(graph: TaskGraph, opts: RunOptions) -> Result<Outcome, DriverError> {
    run_graph_with_cancel(graph, opts, CancellationToken::new()).await
}

/// Runs `graph`; cancelling `cancel` records a cancellation request and ends the run.
pub async fn run_graph_with_cancel(
    graph: TaskGraph,
    opts: RunOptions,
    cancel: CancellationToken,
) -> Result<Outcome, DriverError> {
    run_graph_controlled(graph, opts, cancel, None).await
}

/// Runs `graph`, acting on `controls` as they come (each recorded as an input first: a
/// cancelled subtree or run is in the log, so replay reaches the same end). Cancelling
/// `cancel` cancels the run, as from the terminal.
///
/// ```no_run
/// # async fn demo(graph: agent_runtime_workforce::graph::TaskGraph,
/// #               opts: agent_runtime_workforce::driver::RunOptions) {
/// use agent_runtime_core::CancellationToken;
/// use agent_runtime_workforce::driver::{ControlRequest, run_graph_controlled};
/// let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
/// let run = tokio::spawn(run_graph_controlled(graph, opts, CancellationToken::new(), Some(rx)));
/// // Later, from anywhere: stop `review` and everything that needs it.
/// let _ = tx.send(ControlRequest::CancelTask {
///     run_id: None, by: "ana".into(), task: "review".into(), reason: Some("out of scope".into()),
/// });
/// let outcome = run.await;
/// # }
/// ```
pub async fn run_graph_controlled(
    graph: TaskGraph,
    opts: RunOptions,
    cancel: CancellationToken,
    controls: Option<mpsc::UnboundedReceiver<ControlRequest>>,
) -> Result<Outcome, DriverError> {
    check_available(&graph, opts.tools.as_ref(), opts.models.as_ref())?;
    check_limited_tools(&graph, opts.tools.as_ref())?;
    check_fixed_args(&graph, opts.tools.as_ref())?;
    let now = opts.clock.now();
    let run_id = crate::engine::run_id_for(opts.seed, now);
    let (validated, created) = validate_and_encode(&graph, run_id, opts.seed, now, &opts.labels);
    validated.map_err(DriverError::Graph)?;
    // Held until the run is driven to its end: nobody may resume it meanwhile. Refused when
    // the id was drawn before (the same seed in the same millisecond): nothing is written.
    let _claim = claim(&opts.sink, run_id, true)
        .await
        .map_err(|e| DriverError::Claimed(e.message))?;
    // The engine starts from the graph itself rather than from the event's copy of it (as replay
    // and resume do): the same graph (a test holds every example equal to its JSON round trip)
    // without parsing it back, which was a tenth of a 10,000-task run's start.
    let mut engine = Engine::start_in_steps(run_id, graph, opts.seed, now, PUMP_STEP);
    let mut driver = Driver::new(opts, LogHasher::new(), 0);
    let outcome = driver
        .drive(&mut engine, vec![created], Vec::new(), cancel, controls)
        .await;
    drop_off_path(engine);
    outcome
}

/// Drops a finished run's engine where its caller does not wait for it: freeing ten thousand
/// tasks' state takes milliseconds, which a run's result need not include. Small engines are
/// dropped at once.
fn drop_off_path(engine: Engine) {
    if engine.task_count() >= PARALLEL_START_TASKS
        && let Ok(rt) = tokio::runtime::Handle::try_current()
    {
        drop(rt.spawn_blocking(move || drop(engine)));
    }
}

/// Tasks from which a graph's validation and its `run.created` encoding run on two threads.
const PARALLEL_START_TASKS: usize = 1000;

/// Validates `graph` and, meanwhile on a second thread when the graph is large, encodes its
/// `run.created` event: two independent reads of the graph, each a few milliseconds for ten
/// thousand tasks, on the critical path of every call of the run. The event is thrown away if
/// the graph is invalid.
fn validate_and_encode(
    graph: &TaskGraph,
    run_id: RunId,
    seed: u64,
    now: agent_runtime_core::Timestamp,
    labels: &BTreeMap<String, String>,
) -> (Result<(), crate::graph::GraphError>, EncodedEvent) {
    let encode = || Engine::created_event_labelled_encoded(run_id, graph, seed, now, labels);
    if graph.tasks.len() < PARALLEL_START_TASKS {
        return (graph.validate(), encode());
    }
    std::thread::scope(|scope| {
        match std::thread::Builder::new()
            .name("agent-runtime-run-created".into())
            .spawn_scoped(scope, encode)
        {
            Ok(encoding) => {
                let validated = graph.validate();
                match encoding.join() {
                    Ok(created) => (validated, created),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            // No thread to be had: one after the other.
            Err(_) => (graph.validate(), encode()),
        }
    })
}

/// The result of a replay.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReplayReport {
    /// The run.
    pub run_id: RunId,
    /// Events checked.
    pub events: u64,
    /// The per-run log hash of the recorded events.
    pub log_hash: String,
    /// The status replay reached.
    pub status: RunStatus,
    /// Whether the recorded run had ended.
    pub finished: bool,
}

/// Loads a run's own events from `source`, all at once (about 1.75 KB of memory per event:
/// [`replay`] and [`resume`] read a page at a time instead). Errors with
/// [`DriverError::NoRun`] when the log holds none.
pub async fn load_run(
    source: &dyn EventSource,
    run_id: RunId,
) -> Result<Vec<Envelope>, DriverError> {
    let events = source
        .query(EventQuery {
            run_id: Some(run_id),
            ..EventQuery::default()
        })
        .await
        .map_err(|e| DriverError::Log(e.message))?;
    events.iter().try_for_each(known_kind)?;
    // A run id with only other parts' records (a stray cancellation request, say) is no run.
    let events: Vec<Envelope> = events
        .into_iter()
        .filter(|e| is_workforce_event(e.kind, &e.payload))
        .collect();
    if events.is_empty() {
        return Err(DriverError::NoRun(run_id));
    }
    Ok(events)
}

fn summarize(e: &NewEvent) -> String {
    summarize_parts(
        e.kind,
        &e.actor,
        e.time,
        &agent_runtime_core::canonical_json(&e.payload),
    )
}

fn summarize_encoded(e: &EncodedEvent) -> String {
    summarize_parts(e.kind(), e.actor(), e.time(), e.payload_json())
}

fn summarize_parts(
    kind: agent_runtime_core::EventKind,
    actor: &agent_runtime_core::Actor,
    time: agent_runtime_core::Timestamp,
    payload_json: &[u8],
) -> String {
    let mut p = String::from_utf8_lossy(payload_json).into_owned();
    if p.len() > 120 {
        let mut cut = 117;
        while !p.is_char_boundary(cut) {
            cut -= 1;
        }
        p.truncate(cut);
        p.push_str("...");
    }
    format!("{kind} by {actor} at {time} {p}")
}

/// Events read per query while a run is refolded: the refold holds a page (and a burst the
/// engine derived, when larger) rather than the whole run, so replaying or resuming a run of
/// millions of events takes memory for its tasks, not for its log.
const REFOLD_PAGE: usize = 4096;

/// A run's recorded events (its workforce events only, see [`is_workforce_event`]), read
/// forward through a window: from a slice, or from a log a page at a time.
struct Recorded<'a> {
    from: RecordedFrom<'a>,
    /// Events consumed before the window: the index, among the run's events, of the window's
    /// first.
    index: usize,
}

enum RecordedFrom<'a> {
    Slice {
        events: &'a [Envelope],
        next: usize,
    },
    Log {
        source: &'a dyn EventSource,
        run_id: RunId,
        /// The last sequence number read (other parts' records included).
        after_seq: u64,
        window: std::collections::VecDeque<Envelope>,
        /// Whether the log had no more of the run's events when last asked.
        exhausted: bool,
        /// Events asked for per query (at least).
        page: usize,
    },
}

impl<'a> Recorded<'a> {
    fn slice(events: &'a [Envelope]) -> Self {
        Recorded {
            from: RecordedFrom::Slice { events, next: 0 },
            index: 0,
        }
    }
    fn log(source: &'a dyn EventSource, run_id: RunId) -> Self {
        Self::log_paged(source, run_id, REFOLD_PAGE)
    }
    fn log_paged(source: &'a dyn EventSource, run_id: RunId, page: usize) -> Self {
        Recorded {
            from: RecordedFrom::Log {
                source,
                run_id,
                after_seq: 0,
                window: std::collections::VecDeque::new(),
                exhausted: false,
                page: page.max(1),
            },
            index: 0,
        }
    }

    /// Makes at least `n` events available in the window when the run has them, reading pages
    /// as needed; returns how many are available (fewer than `n` only at the run's end).
    async fn ensure(&mut self, n: usize) -> Result<usize, DriverError> {
        match &mut self.from {
            RecordedFrom::Slice { events, next } => Ok(n.min(events.len() - *next)),
            RecordedFrom::Log {
                source,
                run_id,
                after_seq,
                window,
                exhausted,
                page,
            } => {
                while window.len() < n && !*exhausted {
                    let limit = (*page).max(n - window.len());
                    let page = source
                        .query(EventQuery {
                            run_id: Some(*run_id),
                            after_seq: Some(*after_seq),
                            limit: Some(limit),
                            ..EventQuery::default()
                        })
                        .await
                        .map_err(|e| DriverError::Log(e.message))?;
                    // A source that ignored `after_seq` would hand the same events again and
                    // this loop would never end: only later events count, and a page without
                    // one is the end.
                    let before = *after_seq;
                    page.iter().try_for_each(known_kind)?;
                    let new = page.iter().filter(|e| e.seq > before).count();
                    *exhausted = page.len() < limit || new == 0;
                    if let Some(last) = page.iter().map(|e| e.seq).max() {
                        *after_seq = last.max(before);
                    }
                    window.extend(
                        page.into_iter()
                            .filter(|e| e.seq > before && is_workforce_event(e.kind, &e.payload)),
                    );
                }
                Ok(n.min(window.len()))
            }
        }
    }

    /// The `i`th event of the window (made available by [`Recorded::ensure`]).
    fn get(&self, i: usize) -> Option<&Envelope> {
        match &self.from {
            RecordedFrom::Slice { events, next } => events.get(next + i),
            RecordedFrom::Log { window, .. } => window.get(i),
        }
    }

    /// Drops the window's first `k` events.
    fn advance(&mut self, k: usize) {
        match &mut self.from {
            RecordedFrom::Slice { events, next } => *next = (*next + k).min(events.len()),
            RecordedFrom::Log { window, .. } => {
                window.drain(..k.min(window.len()));
            }
        }
        self.index += k;
    }
}

/// Runs a future that never waits (a refold over a slice: nothing in it awaits anything that
/// is not ready) on this thread; `None` if it waited after all.
fn ready<T>(f: impl std::future::Future<Output = T>) -> Option<T> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(f).poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// A run's engine rebuilt from its log by [`refold`].
struct Refolded {
    engine: Engine,
    /// What the engine derived past the log's end: a burst goes to the log in pieces, each
    /// durable on its own, so a process that stopped can leave the log ending inside what one
    /// input derived. These events never were durable.
    unrecorded: Vec<EncodedEvent>,
    /// The calls requested in `unrecorded`: never made, since a call waits for its request to
    /// be durable.
    unperformed: Vec<Effect>,
}

/// Rebuilds a run's engine from its recorded events: every input applied as recorded, every
/// derived event compared with the recorded one. Calls no tool and no model.
async fn refold(
    rec: &mut Recorded<'_>,
    run_id: Option<RunId>,
    hasher: &mut LogHasher,
) -> Result<Refolded, DriverError> {
    if rec.ensure(1).await? == 0 {
        return Err(match run_id {
            Some(id) => DriverError::NoRun(id),
            None => DriverError::Log("no events".into()),
        });
    }
    let Some(envelope) = rec.get(0) else {
        return Err(DriverError::Log("no events".into()));
    };
    // A run whose start is not where its events begin: a log that lost events, or an index
    // that leaves some out. Named with the run and the place, for `audit verify` to pursue.
    if envelope.kind != agent_runtime_core::EventKind::RunCreated {
        return Err(DriverError::Log(format!(
            "run {}: its first event in the log is {} at sequence {}, not run.created: the log \
             lacks the run's start (`agent-runtime audit verify` checks the log)",
            envelope.run_id, envelope.kind, envelope.seq
        )));
    }
    let first = envelope.to_new_event();
    let mut engine = Engine::create(&first)?;
    hasher.update(&first);
    rec.advance(1);
    let mut rec_body = Vec::new();
    let mut derived: Vec<EncodedEvent> = Vec::new();
    loop {
        derived.extend(engine.drain_events());
        let left = rec.ensure(derived.len()).await?;
        if left < derived.len() {
            // The log ends inside what this input derived. The effects marked past its end
            // (see `Engine::drain_marked_effects`) waited for events that never were durable.
            let unperformed = engine
                .drain_marked_effects()
                .filter(|(mark, e)| *mark > left && !matches!(e, Effect::Cancel { .. }))
                .map(|(_, e)| e)
                .collect();
            let unrecorded = derived.split_off(left);
            check_derived(&derived, rec, hasher, &mut rec_body)?;
            return Ok(Refolded {
                engine,
                unrecorded,
                unperformed,
            });
        }
        check_derived(&derived, rec, hasher, &mut rec_body)?;
        derived.clear();
        engine.drain_effects();
        if rec.ensure(1).await? == 0 {
            break;
        }
        let Some(recorded) = rec.get(0) else { break };
        let next = recorded.to_new_event();
        if !is_input(&next) {
            return Err(DriverError::Diverged {
                index: rec.index,
                seq: recorded.seq,
                recorded: summarize(&next),
                produced: "nothing (the engine derives no event here)".into(),
            });
        }
        engine.apply(&next)?;
        hasher.update(&next);
        rec.advance(1);
    }
    Ok(Refolded {
        engine,
        unrecorded: Vec::new(),
        unperformed: Vec::new(),
    })
}

/// Checks `derived` against the window's first events (there are at least as many), hashing
/// them and moving the window past them.
fn check_derived(
    derived: &[EncodedEvent],
    rec: &mut Recorded<'_>,
    hasher: &mut LogHasher,
    rec_body: &mut Vec<u8>,
) -> Result<(), DriverError> {
    for (i, produced) in derived.iter().enumerate() {
        let Some(recorded) = rec.get(i) else {
            return Err(DriverError::Log(
                "the log ended inside a checked stretch".into(),
            ));
        };
        // Written from the envelope as it is: copying each payload into a `NewEvent` first
        // was a tenth of a long replay.
        rec_body.clear();
        recorded.write_canonical_body(rec_body);
        if *rec_body != produced.body() {
            return Err(DriverError::Diverged {
                index: rec.index + i,
                seq: recorded.seq,
                recorded: summarize(&recorded.to_new_event()),
                produced: summarize_encoded(produced),
            });
        }
        // The same bytes as the recorded event's.
        hasher.update_encoded(produced);
    }
    rec.advance(derived.len());
    Ok(())
}

/// Replays a recorded run: re-executes the scheduler against the recorded results and checks
/// that the same events come out. A mismatch names the first diverging event.
///
/// The run's events are read a page at a time, so the memory a replay takes follows the run's
/// tasks, not the length of its log.
pub async fn replay(source: &dyn EventSource, run_id: RunId) -> Result<ReplayReport, DriverError> {
    let mut hasher = LogHasher::new();
    let refolded = refold(
        &mut Recorded::log(source, run_id),
        Some(run_id),
        &mut hasher,
    )
    .await?;
    Ok(replay_report(run_id, refolded, &hasher))
}

fn replay_report(run_id: RunId, refolded: Refolded, hasher: &LogHasher) -> ReplayReport {
    let Refolded {
        engine, unrecorded, ..
    } = refolded;
    // A log that ends inside a burst is a run that stopped, whatever the engine reached.
    let finished = engine.is_finished() && unrecorded.is_empty();
    ReplayReport {
        run_id,
        events: hasher.count(),
        log_hash: hasher.hex(),
        status: if finished {
            engine.status()
        } else {
            RunStatus::Running
        },
        finished,
    }
}

/// [`replay`] over events already loaded (one run's, in order).
pub fn replay_events(events: &[Envelope]) -> Result<ReplayReport, DriverError> {
    events.iter().try_for_each(known_kind)?;
    // Other parts' records under the run's id (the gateway's audit trail) are not replayed.
    let owned: Vec<Envelope>;
    let events = if events
        .iter()
        .all(|e| is_workforce_event(e.kind, &e.payload))
    {
        events
    } else {
        owned = events
            .iter()
            .filter(|e| is_workforce_event(e.kind, &e.payload))
            .cloned()
            .collect();
        &owned
    };
    let Some(first) = events.first() else {
        return Err(DriverError::Log("no events".into()));
    };
    let mut hasher = LogHasher::new();
    let refolded = ready(refold(&mut Recorded::slice(events), None, &mut hasher))
        .ok_or_else(|| DriverError::Log("replaying the events waited for a read".into()))??;
    Ok(replay_report(first.run_id, refolded, &hasher))
}

/// Finishes a run whose process stopped: rebuilds the engine from the log (checking it as
/// replay does), records `run.resumed` (which fails in-flight attempts with class `interrupted`
/// so their retry policy applies), and drives the run to its end. Completed tasks are not run
/// again. `opts.seed` is ignored: the run's own seed is in the log.
pub async fn resume(
    source: &dyn EventSource,
    run_id: RunId,
    opts: RunOptions,
) -> Result<Outcome, DriverError> {
    resume_controlled(source, run_id, opts, CancellationToken::new(), None).await
}

/// [`resume`], acting on `cancel` and `controls` as [`run_graph_controlled`] does.
pub async fn resume_controlled(
    source: &dyn EventSource,
    run_id: RunId,
    opts: RunOptions,
    cancel: CancellationToken,
    controls: Option<mpsc::UnboundedReceiver<ControlRequest>>,
) -> Result<Outcome, DriverError> {
    // Claimed before the run's events are read, and held until it is driven to its end: a
    // second resume, or the process still driving it, makes this one fail instead of driving
    // the run twice.
    let _claim = claim(&opts.sink, run_id, false)
        .await
        .map_err(|e| DriverError::Claimed(e.message))?;
    let mut hasher = LogHasher::new();
    // Events the engine derived past the log's end are recorded first, as they were derived
    // (see `refold`); `run.resumed` names their calls, never made, and they are made now
    // instead of failing as interrupted.
    let Refolded {
        mut engine,
        unrecorded: mut first,
        unperformed,
    } = refold(
        &mut Recorded::log(source, run_id),
        Some(run_id),
        &mut hasher,
    )
    .await?;
    if engine.is_finished() && first.is_empty() {
        return Err(DriverError::Finished {
            run_id,
            status: format!("{:?}", engine.status()).to_lowercase(),
        });
    }
    // The last time the log knew of: the downtime counts from here (see `run.resumed`'s
    // `since`), whatever the queued requests below record first.
    let since = engine.now();
    // Requests made while no process drove the run act before `run.resumed`: a task cancelled
    // meanwhile is cancelled, not failed as interrupted (which, without a retry, failed the
    // whole run before the cancel was read).
    let mut controls = controls;
    let mut unperformed = unperformed;
    if let Some(queue) = controls.as_mut() {
        let mut effects: Vec<(usize, Effect)> = unperformed.drain(..).map(|e| (0, e)).collect();
        apply_queued_controls(
            &mut engine,
            queue,
            opts.clock.now(),
            &mut first,
            &mut effects,
        )?;
        unperformed = effects.into_iter().map(|(_, e)| e).collect();
    }
    if !engine.is_finished() {
        check_available(&engine.graph(), opts.tools.as_ref(), opts.models.as_ref())?;
        let calls: Vec<u64> = unperformed
            .iter()
            .filter_map(Effect::call)
            .filter(|c| engine.is_in_flight(*c))
            .collect();
        let mut resumed = engine.resumed_event_since(opts.clock.now(), &calls, Some(since));
        // Where this resume goes on (see `RunOptions::labels`): a later resume starts from the
        // latest labels, not the creation's.
        if !opts.labels.is_empty() {
            resumed.payload["labels"] = serde_json::json!(opts.labels);
        }
        // The recorded events were folded in whole pumps; from here on, as in a fresh run.
        engine.set_pump_step(Some(PUMP_STEP));
        engine.apply(&resumed)?;
        first.push(EncodedEvent::new(resumed));
    }
    let count = hasher.count();
    let mut driver = Driver::new(opts, hasher, count);
    let outcome = driver
        .drive(&mut engine, first, unperformed, cancel, controls)
        .await;
    drop_off_path(engine);
    outcome
}

/// Applies the control requests already queued in `controls` (for a resume: made while no
/// process drove the run), each recorded in `batch` after what came before it, as it would be
/// had it come while the run was driven; the effects of calls no longer in flight are dropped.
fn apply_queued_controls(
    engine: &mut Engine,
    controls: &mut mpsc::UnboundedReceiver<ControlRequest>,
    now: Timestamp,
    batch: &mut Vec<EncodedEvent>,
    effects: &mut Vec<(usize, Effect)>,
) -> Result<(), DriverError> {
    let mut queued = false;
    while !engine.is_finished() {
        let Ok(request) = controls.try_recv() else {
            break;
        };
        let Some(event) = control_event(engine, now, request) else {
            continue;
        };
        // A pump the engine stopped at its step is finished first, as replay derives it
        // whole before the next input.
        engine.finish_pump();
        take_derived(engine, batch, effects);
        engine.apply(&event)?;
        batch.push(EncodedEvent::new(event));
        queued = true;
    }
    if queued {
        take_derived(engine, batch, effects);
        effects.retain(|(_, e)| e.call().is_none_or(|c| engine.is_in_flight(c)));
    }
    Ok(())
}

/// The input event that carries out `request`, if it is for this run and still has something
/// to cancel.
fn control_event(engine: &Engine, now: Timestamp, request: ControlRequest) -> Option<NewEvent> {
    let mine = |id: &Option<RunId>| id.is_none_or(|id| id == engine.run_id());
    match request {
        ControlRequest::CancelRun { run_id, by, reason } if mine(&run_id) => {
            Some(engine.cancel_run_event(now, &by, &reason))
        }
        ControlRequest::CancelTask {
            run_id,
            by,
            task,
            reason,
        } if mine(&run_id) => engine.cancel_task_event(now, &by, &task, reason.as_deref()),
        _ => None,
    }
}

enum Done {
    Tool {
        call: u64,
        tool: String,
        result: Result<Value, (ErrorClass, String)>,
    },
    Model {
        call: u64,
        result: Result<agent_runtime_core::ModelResponse, (ErrorClass, String)>,
    },
}

/// Events gathered before the batch goes to the writer even though the writer is busy: bounds
/// the memory a burst of results takes.
const MAX_BATCH: usize = 4096;

/// Events per piece submitted to the log. A burst (a run starting ten thousand tasks derives
/// twenty thousand events at once) goes in pieces, each durable on its own, so the first calls
/// start once their own piece is durable instead of after the whole burst; the store's writer
/// commits the pieces that queue up behind the one it writes as one transaction, so a burst
/// still costs few commits.
const PIECE: usize = 2048;

/// Most attempts the engine starts in one step of a pump: a step derives about a piece of
/// events (two per attempt), handed to the log before the next step.
const PUMP_STEP: u32 = (PIECE / 2) as u32;

/// Moves what the engine derived into the batch being gathered, each effect marked with how
/// many of the batch's events must be durable before it may be performed. Events and effects
/// are always taken together: the engine's marks count the events it holds.
fn take_derived(
    engine: &mut Engine,
    batch: &mut Vec<EncodedEvent>,
    effects: &mut Vec<(usize, Effect)>,
) {
    let base = batch.len();
    batch.extend(engine.drain_events());
    effects.extend(
        engine
            .drain_marked_effects()
            .map(|(mark, effect)| (base + mark, effect)),
    );
}

/// A piece submitted to the log and not yet known durable, with what waits for it.
struct Pending {
    /// Resolves once the piece is durable.
    landed: PendingAppend,
    effects: Vec<Effect>,
    /// A copy for the observer, when there is one.
    observed: Option<Vec<EncodedEvent>>,
}

/// Waits until the oldest pending piece is durable and takes it off the queue. Cancel-safe (it
/// sits in a `select!`): the piece leaves the queue only once it is durable.
async fn next_durable(pending: &mut VecDeque<Pending>) -> Result<Pending, DriverError> {
    let Some(oldest) = pending.front_mut() else {
        return std::future::pending().await;
    };
    (&mut oldest.landed)
        .await
        .map_err(|e| DriverError::Log(e.message))?;
    pending
        .pop_front()
        .ok_or_else(|| DriverError::Log("a pending piece went missing".into()))
}

/// [`next_durable`] without waiting: the oldest piece, if it is durable already.
fn durable_now(pending: &mut VecDeque<Pending>) -> Option<Result<Pending, DriverError>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(next_durable(pending)).poll(&mut cx) {
        std::task::Poll::Ready(r) => Some(r),
        std::task::Poll::Pending => None,
    }
}

struct Driver {
    opts: RunOptions,
    hasher: LogHasher,
    events: u64,
    // The token of each call in flight, to cancel it; looked up by call, never iterated into
    // anything recorded (see `hashing`).
    inflight: FastMap<u64, CancellationToken>,
}

impl Driver {
    fn new(opts: RunOptions, hasher: LogHasher, events: u64) -> Self {
        Driver {
            opts,
            hasher,
            events,
            inflight: FastMap::default(),
        }
    }

    async fn drive(
        &mut self,
        engine: &mut Engine,
        first: Vec<EncodedEvent>,
        first_effects: Vec<Effect>,
        cancel: CancellationToken,
        controls: Option<mpsc::UnboundedReceiver<ControlRequest>>,
    ) -> Result<Outcome, DriverError> {
        // The run's batches land in submission order and without a gap (see `submit_encoded`).
        let stream = AppendStream::new();
        let hashing = self.hasher.offload();
        let outcome = self
            .drive_with(engine, first, first_effects, cancel, controls, &stream)
            .await;
        // Reclaimed whether the run ended well or not, so that the hashing task always ends.
        let reclaimed = self.hasher.reclaim(hashing).await;
        let outcome = outcome?;
        reclaimed.map_err(DriverError::Log)?;
        Ok(Outcome {
            log_hash: self.hasher.hex(),
            ..outcome
        })
    }

    async fn drive_with(
        &mut self,
        engine: &mut Engine,
        first: Vec<EncodedEvent>,
        first_effects: Vec<Effect>,
        cancel: CancellationToken,
        controls: Option<mpsc::UnboundedReceiver<ControlRequest>>,
        stream: &AppendStream,
    ) -> Result<Outcome, DriverError> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Done>();
        // Calls are started by a task of their own (see `CallStarter`); it ends when `launch`
        // is dropped with this function.
        let (launch, starts) =
            mpsc::unbounded_channel::<(Effect, CancellationToken, Option<Arc<str>>)>();
        let run_secrets = run_secret_values(engine.graph_ref(), self.opts.secrets.as_ref());
        let (waits_tx, mut waits) = mpsc::unbounded_channel::<(u64, bool, Timestamp)>();
        tokio::spawn(
            CallStarter {
                secrets: self.opts.secrets.clone(),
                redactor: Arc::new(agent_runtime_core::Redactor::new().with_secrets(&run_secrets)),
                run_secrets,
                run_id: engine.run_id(),
                tools: self.opts.tools.clone(),
                models: self.opts.models.clone(),
                specs: FastMap::default(),
                agent_specs: FastMap::default(),
                done: tx,
                waits: Arc::new(WaitSender {
                    to: waits_tx,
                    clock: self.opts.clock.clone(),
                }),
            }
            .run(starts),
        );
        // A closed channel stands in for "no controls": `recv` on it returns `None` at once,
        // which the select below disables.
        let mut controls = controls.unwrap_or_else(|| mpsc::unbounded_channel().1);
        let mut controls_open = true;
        // Pieces submitted and not yet durable, oldest first, each with the effects that wait
        // for it; and the batch being gathered meanwhile, with its effects.
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut batch = first;
        // The effects waiting for `batch`, each with how many of its events must be durable
        // before it may be performed.
        // `first_effects` wait for all of `first`; those whose call the engine no longer has
        // in flight (its attempt failed meanwhile) are not made.
        let mut effects: Vec<(usize, Effect)> = first_effects
            .into_iter()
            .filter(|e| e.call().is_some_and(|c| engine.is_in_flight(c)))
            .map(|e| (batch.len(), e))
            .collect();
        // Requests already queued act before any call starts, and the calls they cancel are
        // never made.
        apply_queued_controls(
            engine,
            &mut controls,
            self.opts.clock.now(),
            &mut batch,
            &mut effects,
        )?;
        let mut cancel_requested = false;
        // The outcome, once the run has finished and every event is handed to the log.
        let mut prebuilt: Option<Outcome> = None;
        loop {
            take_derived(engine, &mut batch, &mut effects);
            // The engine stopped a pump at its step (a burst: a run starting thousands of tasks
            // at once): what it derived so far goes to the log now, so that the writer works on
            // it while the engine derives the rest.
            let pumping = engine.is_pumping();
            // The next batch goes to the writer as soon as the writer is idle; while it writes,
            // results keep coming in and the engine keeps deriving (nothing it derives leaves the
            // process before its batch is durable), so the log's writing and the scheduler's
            // work overlap and the next batch groups everything that came meanwhile.
            if !batch.is_empty() && (pending.is_empty() || batch.len() >= MAX_BATCH || pumping) {
                self.events += batch.len() as u64;
                // The next batch starts with room for as many: growing a vector of events by
                // doubling copies it again and again (a few percent of the driver's work).
                let room = batch.len().min(2 * MAX_BATCH);
                let mut whole = std::mem::replace(&mut batch, Vec::with_capacity(room));
                // Pieces are cut from the back, so that the first stays in the batch's own
                // vector (a batch of one piece is not copied at all) and every other event is
                // copied once.
                let mut pieces = Vec::with_capacity(whole.len().div_ceil(PIECE));
                while whole.len() > PIECE {
                    let cut = (whole.len() - 1) / PIECE * PIECE;
                    pieces.push(whole.split_off(cut));
                }
                pieces.push(whole);
                pieces.reverse();
                // Each piece's effects: those marked at or before its end (marks are in order),
                // counted first so that each list is allocated once; marks never pass the
                // batch's end, and any left wait for the last piece. Drained, not taken: the
                // vector keeps its room for the next batch's effects.
                debug_assert!(effects.windows(2).all(|w| w[0].0 <= w[1].0));
                let mut ends = Vec::with_capacity(pieces.len());
                let mut sent = 0;
                for piece in &pieces {
                    sent += piece.len();
                    ends.push(effects.partition_point(|(mark, _)| *mark <= sent));
                }
                if let Some(last) = ends.last_mut() {
                    *last = effects.len();
                }
                let mut effects = effects.drain(..).map(|(_, effect)| effect);
                let mut taken = 0;
                for (piece, end) in pieces.into_iter().zip(ends) {
                    let waiting: Vec<Effect> = effects.by_ref().take(end - taken).collect();
                    taken = end;
                    let observed = self.opts.observer.is_some().then(|| piece.clone());
                    for e in &piece {
                        self.hasher.update_encoded(e);
                    }
                    // A refusal after a failed piece names that piece's failure (see
                    // `AppendStream::check`).
                    let landed = self
                        .opts
                        .sink
                        .submit_encoded(piece, stream)
                        .await
                        .map_err(|e| DriverError::Log(e.message))?;
                    pending.push_back(Pending {
                        landed,
                        effects: waiting,
                        observed,
                    });
                }
            } else if batch.is_empty() && pending.is_empty() {
                // Nothing new to record: effects (if any) wait for nothing.
                for (_, effect) in std::mem::take(&mut effects) {
                    self.perform(effect, engine, &launch);
                }
            }
            if pumping {
                // No input until the pump is done (the engine would finish it first anyway):
                // the events stay those of one pump. Calls whose piece is durable start now.
                while let Some(done) = durable_now(&mut pending) {
                    self.durable(done?, engine, &launch);
                }
                engine.pump_more();
                continue;
            }
            let finished = engine.is_finished();
            if finished && pending.is_empty() && batch.is_empty() {
                break;
            }
            // Once every event is handed to the log, nothing changes the run but durability:
            // its outcome (thousands of outputs take milliseconds) is built while the last
            // pieces are committed and synced, not after.
            if finished && batch.is_empty() && prebuilt.is_none() {
                prebuilt = Some(self.outcome(engine));
            }
            let deadline = if finished {
                None
            } else {
                engine.next_deadline()
            };
            if !finished && deadline.is_none() && self.inflight.is_empty() && pending.is_empty() {
                return Err(DriverError::Stalled(
                    engine
                        .task_views()
                        .iter()
                        .filter(|t| !t.status.is_terminal())
                        .count(),
                ));
            }
            let wait = deadline.map(|d| d.saturating_duration_since(self.opts.clock.now()));
            // An input event to apply and record, or a call's result (applied and encoded in
            // one step, see `record_result`).
            let input: Result<NewEvent, Done> = tokio::select! {
                biased;
                done = next_durable(&mut pending), if !pending.is_empty() => {
                    self.durable(done?, engine, &launch);
                    continue;
                }
                _ = cancel.cancelled(), if !cancel_requested && !finished => {
                    cancel_requested = true;
                    Ok(engine.cancel_run_event(self.opts.clock.now(), "cli", "cancelled by the user"))
                }
                request = controls.recv(), if controls_open && !finished => {
                    let Some(request) = request else {
                        controls_open = false;
                        continue;
                    };
                    match control_event(engine, self.opts.clock.now(), request) {
                        Some(event) => Ok(event),
                        None => continue,
                    }
                }
                // Before results: a call's wait ended before its result was sent.
                Some((call, waiting, at)) = waits.recv(), if !finished => {
                    match engine.wait_event_since(call, waiting, self.opts.clock.now(), at) {
                        Some(event) => Ok(event),
                        None => continue,
                    }
                }
                Some(done) = rx.recv(), if !finished => Err(done),
                _ = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(3600))), if wait.is_some() => {
                    let now = self.opts.clock.now();
                    match deadline {
                        // The sleep can end a hair early by the clock's reading; wait again.
                        Some(d) if now < d => continue,
                        _ => Ok(engine.clock_event(now)),
                    }
                }
            };
            batch.push(match input {
                Ok(event) => {
                    engine.apply(&event)?;
                    EncodedEvent::new(event)
                }
                Err(done) => self.record_result(engine, done)?,
            });
            // Group-record: every result already waiting goes into the same batch, each
            // followed by what the engine derived from it; effects wait for the append.
            while batch.len() < MAX_BATCH && !engine.is_finished() && !engine.is_pumping() {
                // A call's wait for a person ends before its result is sent: taken first, as
                // the select above takes it, so that `task.unpaused` comes before the result
                // (else it was dropped, the call having ended, and `runs show` kept the task
                // waiting for approval).
                if let Ok((call, waiting, at)) = waits.try_recv() {
                    let now = self.opts.clock.now();
                    if let Some(event) = engine.wait_event_since(call, waiting, now, at) {
                        take_derived(engine, &mut batch, &mut effects);
                        engine.apply(&event)?;
                        batch.push(EncodedEvent::new(event));
                    }
                    continue;
                }
                let Ok(done) = rx.try_recv() else { break };
                take_derived(engine, &mut batch, &mut effects);
                let input = self.record_result(engine, done)?;
                batch.push(input);
                // A piece that became durable meanwhile lets its calls start now rather than
                // after this stretch (thousands of results in a burst).
                if let Some(done) = durable_now(&mut pending) {
                    self.durable(done?, engine, &launch);
                }
            }
        }
        Ok(prebuilt.unwrap_or_else(|| self.outcome(engine)))
    }

    /// The run's outcome as the engine and the count of recorded events have it; `drive` fills
    /// in the log hash once the offloaded hash is back.
    fn outcome(&self, engine: &Engine) -> Outcome {
        // Set exactly when the run failed (`run.failed` comes only from a task that failed for
        // good) or was cancelled.
        let error = engine.failure().map(String::from);
        Outcome {
            run_id: engine.run_id(),
            status: engine.status(),
            outputs: engine.final_outputs(),
            tasks: engine.task_views(),
            log_hash: String::new(),
            events: self.events,
            error,
        }
    }

    /// A piece is durable: the observer sees its events and the effects that waited for it are
    /// performed.
    fn durable(&mut self, done: Pending, engine: &Engine, launch: &Launch) {
        if let (Some(o), Some(events)) = (&self.opts.observer, &done.observed) {
            o.on_events(events, engine);
        }
        for effect in done.effects {
            self.perform(effect, engine, launch);
        }
    }

    /// Applies a call's result to the engine and returns the input event recording it.
    /// Records a call's result, or stops the run when the call could not be audited: the log
    /// is failing (a full disk), and the run stops resumable, as when its own events are
    /// refused, rather than fail the task (the failure would be recorded once space came back,
    /// and the run would end failed for good).
    fn record_result(
        &mut self,
        engine: &mut Engine,
        done: Done,
    ) -> Result<EncodedEvent, DriverError> {
        if let Done::Tool {
            result: Err((ErrorClass::AuditUnavailable, message)),
            ..
        } = &done
        {
            return Err(DriverError::Log(message.clone()));
        }
        Ok(self.record_unchecked(engine, done))
    }

    fn record_unchecked(&mut self, engine: &mut Engine, done: Done) -> EncodedEvent {
        let now = self.opts.clock.now();
        match done {
            Done::Tool { call, tool, result } => {
                self.inflight.remove(&call);
                engine.apply_tool_result(call, &tool, now, result)
            }
            Done::Model { call, result } => {
                self.inflight.remove(&call);
                engine.apply_model_result(call, now, result)
            }
        }
    }

    /// Hands a call to the [`CallStarter`] with a fresh token, kept to cancel the call; a
    /// cancellation cancels that token.
    fn perform(&mut self, effect: Effect, engine: &Engine, launch: &Launch) {
        match effect {
            Effect::Cancel { call } => {
                if let Some(token) = self.inflight.remove(&call) {
                    token.cancel();
                }
            }
            Effect::CallTool { call, task_id, .. } | Effect::CallModel { call, task_id, .. } => {
                let token = CancellationToken::new();
                self.inflight.insert(call, token.clone());
                let task = engine.task_name(task_id).map(Arc::from);
                // The starter lives as long as `launch`; were it gone, the call would simply
                // never answer, as when the run ends.
                let _ = launch.send((effect, token, task));
            }
        }
    }
}

/// Where the driver hands the calls to start.
/// A call to start, its token, and its task's id in the graph (for the call's context).
type Launch = mpsc::UnboundedSender<(Effect, CancellationToken, Option<Arc<str>>)>;

/// Starts the calls the driver hands it, on a task of its own: building a call's context and
/// request and spawning its task was a sixth of the driver's instructions in a burst of 10,000
/// agents, and the driver's thread is the run's critical path. Each call runs as a task that
/// stops (its future dropped) once its token is cancelled.
struct CallStarter {
    run_id: RunId,
    tools: Arc<dyn ToolInvoker>,
    models: Arc<dyn ModelRouter>,
    specs: FastMap<String, ToolSpec>,
    agent_specs: FastMap<Arc<str>, Arc<[ToolSpec]>>,
    secrets: Arc<dyn SecretSource>,
    /// The values of every secret the run's tool steps name (see [`run_secret_values`]).
    run_secrets: Vec<String>,
    /// A redactor of `run_secrets`, built once.
    redactor: Arc<agent_runtime_core::Redactor>,
    done: mpsc::UnboundedSender<Done>,
    /// Where tool calls report their waits for a person (one shared listener: a call's
    /// context carries it and the call's number, no allocation per call).
    waits: Arc<dyn agent_runtime_core::WaitListener>,
}

/// Hands a call's waits for a person to the driver's loop, which records them as inputs
/// (`task.paused`, `task.unpaused`): the attempt's timeout does not count them.
/// Each report carries the clock's reading when it was made: the wait is recorded a moment
/// later, and counts from then.
struct WaitSender {
    to: mpsc::UnboundedSender<(u64, bool, Timestamp)>,
    clock: Arc<dyn Clock>,
}

impl agent_runtime_core::WaitListener for WaitSender {
    fn waiting(&self, call: u64, waiting: bool) {
        let _ = self.to.send((call, waiting, self.clock.now()));
    }
}

/// The values of the secrets the run's tool steps name, those its source has. Every tool
/// call's result is redacted with all of them, not only those of the call that names them: a
/// secret one call writes may come back in another's output (a file written, then read). A
/// secret that is not set, or a source that panics, is left to fail the call that names it.
fn run_secret_values(graph: &TaskGraph, source: &dyn SecretSource) -> Vec<String> {
    graph
        .secret_names()
        .into_iter()
        .filter_map(|name| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                crate::template::usable_secret(source, &name).ok()
            }))
            .ok()
            .flatten()
        })
        // Two names may share a value: once is enough.
        .collect::<std::collections::BTreeSet<String>>()
        .into_iter()
        .collect()
}

impl CallStarter {
    async fn run(
        mut self,
        mut starts: mpsc::UnboundedReceiver<(Effect, CancellationToken, Option<Arc<str>>)>,
    ) {
        while let Some((effect, token, task)) = starts.recv().await {
            // The embedder's code that runs here: `ToolInvoker::spec`, for a model call's tool
            // list, and `SecretSource::secret`, for a tool step that names secrets. A panic
            // there fails that call, as a panicking call does, instead of ending this task or
            // leaving the call unanswered: the run would wait for its result forever.
            let may_panic = match &effect {
                Effect::CallModel { call, .. } => Some((*call, None)),
                Effect::CallTool {
                    call,
                    tool,
                    secret_args: Some(_),
                    ..
                } => Some((*call, Some(tool.clone()))),
                _ => None,
            };
            let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.start(effect, token, task)
            }));
            if let (Err(panic), Some((call, tool))) = (started, may_panic) {
                let _ = self.done.send(match tool {
                    None => Done::Model {
                        call,
                        result: Err((
                            ErrorClass::Internal,
                            panicked("listing the agent's tools", panic.as_ref()),
                        )),
                    },
                    // Without the panic's message: a secret source's may quote a secret.
                    Some(tool) => Done::Tool {
                        call,
                        tool,
                        result: Err((
                            ErrorClass::Internal,
                            "reading the call's secrets panicked".into(),
                        )),
                    },
                });
            }
        }
    }

    /// The tools an agent offers its model, built once per agent and shared by every request
    /// (descriptors do not change during a run).
    fn agent_specs(&mut self, agent: &Arc<str>, tools: &[String]) -> Arc<[ToolSpec]> {
        if let Some(specs) = self.agent_specs.get(agent) {
            return specs.clone();
        }
        let specs: Arc<[ToolSpec]> = tools.iter().filter_map(|t| self.spec(t)).collect();
        self.agent_specs.insert(agent.clone(), specs.clone());
        specs
    }

    /// A tool's spec for the model, cached: descriptors do not change during a run.
    fn spec(&mut self, name: &str) -> Option<ToolSpec> {
        if let Some(s) = self.specs.get(name) {
            return Some(s.clone());
        }
        let spec = if name == SPAWN_TOOL {
            Some(spawn_spec())
        } else {
            self.tools.spec(name)
        }?;
        self.specs.insert(name.to_string(), spec.clone());
        Some(spec)
    }

    /// A call's context: the run, the task, the budget and the call's token.
    fn context(
        &self,
        actor: Actor,
        task_id: agent_runtime_core::TaskId,
        task: Option<Arc<str>>,
        timeout: Option<Duration>,
        token: &CancellationToken,
    ) -> CallContext {
        let mut ctx = CallContext::new(actor);
        ctx.cancel = token.clone();
        ctx.run_id = Some(self.run_id);
        ctx.task_id = Some(task_id);
        ctx.task_name = task;
        ctx.timeout = timeout;
        ctx
    }

    /// Runs `call` as a task of its own until it ends, or until `token` is cancelled (then it
    /// is dropped unfinished and nothing is sent); its result goes to the driver as `done_of`
    /// makes it.
    fn spawn_call<T: Send + 'static>(
        &self,
        token: CancellationToken,
        call: impl std::future::Future<Output = Result<T, (ErrorClass, String)>> + Send + 'static,
        done_of: impl FnOnce(Result<T, (ErrorClass, String)>) -> Done + Send + 'static,
    ) {
        let done = self.done.clone();
        tokio::spawn(CallTask::new(token, call, move |result| {
            let _ = done.send(done_of(result));
        }));
    }

    fn start(&mut self, effect: Effect, token: CancellationToken, task: Option<Arc<str>>) {
        match effect {
            Effect::Cancel { .. } => {}
            Effect::CallTool {
                call,
                task_id,
                actor,
                tool,
                mut args,
                secret_args,
                timeout,
                ..
            } => {
                let mut ctx = self.context(actor, task_id, task, timeout, &token);
                ctx.waits = Some(agent_runtime_core::WaitReporter {
                    listener: self.waits.clone(),
                    call,
                });
                let tools = self.tools.clone();
                let name = tool.clone();
                // The call alone gets the secrets' values; what it returns is redacted before
                // it is recorded (a tool may echo its arguments, or put them in an error).
                let filled = match &secret_args {
                    Some(declared) => crate::template::fill_secrets(
                        declared,
                        &mut args,
                        self.secrets.as_ref(),
                        &mut ctx.secrets,
                    ),
                    None => Ok(()),
                };
                // The run's redactor serves when the call's own values are all among the
                // run's; one read since the run started may differ (a rotated secret).
                let own_are_known = ctx.secrets.iter().all(|s| self.run_secrets.contains(s));
                // Every call's result is redacted with all the run's secrets, its own among
                // them; a tool behind the gateway redacts them in its own audit trail
                // (`ctx.secrets`) too.
                for s in &self.run_secrets {
                    if !ctx.secrets.contains(s) {
                        ctx.secrets.push(s.clone());
                    }
                }
                let redactor = if own_are_known {
                    self.redactor.clone()
                } else {
                    Arc::new(agent_runtime_core::Redactor::new().with_secrets(&ctx.secrets))
                };
                self.spawn_call(
                    token,
                    async move {
                        if let Err(e) = filled {
                            return Err((ErrorClass::InvalidArguments, e));
                        }
                        tools
                            .invoke(&name, args, ctx)
                            .await
                            .map(|o| o.value)
                            .map_err(|e| (e.class, e.message))
                    },
                    // Redacted once the call has ended, however it ended: a panic's message may
                    // quote the arguments too. (Here rather than in the call's future, which
                    // every waiting call holds: smaller.)
                    move |result| Done::Tool {
                        call,
                        tool,
                        result: if redactor.has_secrets() {
                            result
                                .map(|v| redactor.redact_values(&v))
                                .map_err(|(class, m)| (class, redactor.redact_str(&m)))
                        } else {
                            result
                        },
                    },
                );
            }
            Effect::CallModel {
                call,
                task_id,
                agent,
                provider,
                model,
                messages,
                tools,
                timeout,
                ..
            } => {
                let actor = Actor::Agent(String::from(&*agent));
                let ctx = self.context(actor, task_id, task, timeout, &token);
                let request = ModelRequest {
                    model: String::from(&*model),
                    messages,
                    tools: self.agent_specs(&agent, &tools),
                    max_tokens: None,
                    temperature: None,
                };
                let router = self.models.clone();
                self.spawn_call(
                    token,
                    async move {
                        match router.provider(&provider) {
                            Some(p) => p
                                .complete(request, ctx)
                                .await
                                .map_err(|e| (e.error.class, e.error.message)),
                            None => Err((
                                ErrorClass::ModelUnavailable,
                                format!("no model provider `{provider}`"),
                            )),
                        }
                    },
                    move |result| Done::Model { call, result },
                );
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A call's task: the call until it ends, then `finish` with its result; or nothing once the
    /// call's token is cancelled (checked first at every wake-up: a cancelled call's result is
    /// not wanted even if it is ready).
    ///
    /// A panic in the call becomes its result, class `internal` with the panic's message (its
    /// first 500 characters): the attempt then fails and the task's failure policy decides,
    /// instead of the run waiting forever for a result that will never come.
    ///
    /// Written out rather than as an `async` block around `select!`: such a block keeps the
    /// call future it was given as well as the one it polls, so every waiting call's task was
    /// 920 to 968 bytes where the call itself is under 300.
    struct CallTask<F, D> {
        #[pin]
        cancelled: agent_runtime_core::WaitForCancellationFutureOwned,
        #[pin]
        call: futures_util::future::CatchUnwind<std::panic::AssertUnwindSafe<F>>,
        finish: Option<D>,
    }
}

impl<F: std::future::Future, D> CallTask<F, D> {
    /// `call` until it ends, then `finish` with its result, unless `token` is cancelled first.
    fn new(token: CancellationToken, call: F, finish: D) -> Self {
        CallTask {
            cancelled: token.cancelled_owned(),
            call: futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(call)),
            finish: Some(finish),
        }
    }
}

impl<T, F, D> std::future::Future for CallTask<F, D>
where
    F: std::future::Future<Output = Result<T, (ErrorClass, String)>>,
    D: FnOnce(Result<T, (ErrorClass, String)>),
{
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::task::Poll;
        let this = self.project();
        if this.cancelled.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let Poll::Ready(ended) = this.call.poll(cx) else {
            return Poll::Pending;
        };
        let result = ended.unwrap_or_else(|panic| {
            Err((ErrorClass::Internal, panicked("the call", panic.as_ref())))
        });
        if let Some(finish) = this.finish.take() {
            finish(result);
        }
        Poll::Ready(())
    }
}

/// Most characters of a panic's message a call's error quotes.
const PANIC_MESSAGE_CHARS: usize = 500;

/// "WHAT panicked: MESSAGE", from a panic's payload.
fn panicked(what: &str, payload: &(dyn std::any::Any + Send)) -> String {
    match agent_runtime_core::error::panic_message(payload) {
        Some(m) if m.chars().count() > PANIC_MESSAGE_CHARS => format!(
            "{what} panicked: {}...",
            m.chars().take(PANIC_MESSAGE_CHARS).collect::<String>()
        ),
        Some(m) => format!("{what} panicked: {m}"),
        None => format!("{what} panicked"),
    }
}

impl Drop for Driver {
    /// Calls still in flight when the driver stops (the run ended, or driving it failed) are
    /// cancelled: nothing would record their results.
    fn drop(&mut self) {
        for (_, token) in self.inflight.drain() {
            token.cancel();
        }
    }
}

/// How the model sees the `spawn_task` pseudo-tool.
pub fn spawn_spec() -> ToolSpec {
    ToolSpec {
        name: SPAWN_TOOL.into(),
        description:
            "Add a sub-task to the running task graph; it runs on its own and the run waits for it."
                .into(),
        input_schema: json!({
            "type": "object",
            "properties": {
                "prompt": {"type": "string", "description": "What the sub-task should do"},
                "agent": {"type": "string", "description": "Which agent does it (default: yourself)"}
            },
            "required": ["prompt"]
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refolds `events` (a run's log, or a prefix of it) whole and from a log holding them, a
    /// page of each size in `pages` at a time, and checks that both give the same engine
    /// status, unrecorded rest, unperformed calls and hash, or the same error. Returns the hash.
    fn paged_refolds_match(
        rt: &tokio::runtime::Runtime,
        events: &[Envelope],
        run_id: RunId,
        pages: &[usize],
    ) -> String {
        use agent_runtime_core::{EventSink, MemoryLog};
        let summary = |r: Result<Refolded, DriverError>, hasher: &LogHasher| match r {
            Ok(r) => format!(
                "{:?} {} {} {} {}",
                r.engine.status(),
                r.unrecorded.len(),
                r.unperformed.len(),
                hasher.count(),
                hasher.hex()
            ),
            Err(e) => format!("error: {e}"),
        };
        let mut whole = LogHasher::new();
        let expected = summary(
            ready(refold(&mut Recorded::slice(events), None, &mut whole)).unwrap(),
            &whole,
        );
        let log = MemoryLog::default();
        rt.block_on(log.append(events.iter().map(Envelope::to_new_event).collect()))
            .unwrap();
        for &page in pages {
            let mut paged = LogHasher::new();
            let got = rt.block_on(refold(
                &mut Recorded::log_paged(&log, run_id, page),
                Some(run_id),
                &mut paged,
            ));
            let cut = events.len();
            assert_eq!(summary(got, &paged), expected, "cut {cut}, page {page}");
        }
        whole.hex()
    }

    /// Refolding a run from a log a few events at a time gives what refolding it whole does,
    /// for the whole log and for every prefix of it (a process that stopped anywhere): the same
    /// hash, count, status and unrecorded rest, or the same error.
    #[test]
    fn a_paged_refold_matches_a_whole_one_at_every_cut() {
        use agent_runtime_core::{MemoryLog, Timestamp};
        let yaml = "limits: { concurrency: 3 }\ntasks:\n  - { id: a, tool: echo, args: { x: 1 } }\n  - { id: b, tool: echo, args: { x: 2 } }\n  - { id: c, tool: echo, args: { x: 3 } }\n  - { id: d, tool: echo, args: { x: 4 } }\n  - { id: f, tool: fail, args: { message: no }, retry: { max_attempts: 3, backoff: 1ms, on: [tool_error] }, on_failure: { fallback: g } }\n  - { id: g, tool: echo, args: { y: 1 } }\n  - { id: h, tool: concat, needs: [a, b, f], args: { parts: ['{{ tasks.a.output.x }}', '{{ tasks.f.output.y }}'] } }\n";
        let graph = crate::graph::parse_graph(yaml, std::path::Path::new("p.yaml")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let log = Arc::new(MemoryLog::default());
        let opts = RunOptions {
            seed: 3,
            sink: log.clone(),
            clock: Arc::new(TokioClock::new(Timestamp::EPOCH)),
            tools: Arc::new(crate::tools::ToolRegistry::with_native_tools()),
            models: Arc::new(NoModels),
            observer: None,
            secrets: Arc::new(agent_runtime_core::NoSecrets),
            labels: Default::default(),
        };
        let out = rt.block_on(run_graph(graph, opts)).unwrap();
        let events = log.all();
        assert!(events.len() > 20, "{}", events.len());
        let pages = [1, 2, 3, 5, 64];
        for cut in 1..events.len() {
            paged_refolds_match(&rt, &events[..cut], out.run_id, &pages);
        }
        assert_eq!(
            paged_refolds_match(&rt, &events, out.run_id, &pages),
            out.log_hash
        );
    }

    /// The same over a simulated run with failures and retries (agents, model calls, random
    /// draws), at cuts spread over its log, with pages of several sizes.
    #[test]
    fn a_paged_refold_matches_a_whole_one_over_a_simulated_run() {
        use agent_runtime_core::MemoryLog;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cfg = crate::sim::SimConfig::new(3, 120, crate::sim::Shape::Random, 0.25, 17);
        let log = Arc::new(MemoryLog::default());
        let report = rt
            .block_on(crate::sim::simulate(&cfg, log.clone()))
            .unwrap();
        assert!(report.retries > 0);
        let events = log.all();
        let run_id = events[0].run_id;
        let pages = [1, 7, REFOLD_PAGE];
        for cut in (1..events.len()).step_by(37) {
            paged_refolds_match(&rt, &events[..cut], run_id, &pages);
        }
        assert_eq!(
            paged_refolds_match(&rt, &events, run_id, &pages),
            report.log_hash
        );
    }

    /// Every call waiting on a slow tool or model holds one `CallTask`: what it adds to the call
    /// future is memory per live agent. An `async` block around `select!` added about 650 bytes
    /// (it kept the call it was given as well as the one it polled).
    #[test]
    fn a_call_task_adds_little_to_its_call() {
        let payload = [0u8; 256];
        let call = async move {
            tokio::task::yield_now().await;
            Ok::<usize, (ErrorClass, String)>(payload.len())
        };
        let call_size = std::mem::size_of_val(&call);
        let (done, _rx) = mpsc::unbounded_channel::<usize>();
        let task = CallTask::new(
            CancellationToken::new(),
            call,
            move |r: Result<usize, (ErrorClass, String)>| {
                let _ = done.send(r.unwrap_or(0));
            },
        );
        let added = std::mem::size_of_val(&task) - call_size;
        assert!(added <= 160, "a call task adds {added} bytes to its call");
    }

    /// A cancelled call's result is not handed on, even when the call is ready; a call that
    /// panics is handed on as class `internal` with its message.
    #[tokio::test]
    async fn a_call_task_honours_cancellation_and_reports_panics() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let token = CancellationToken::new();
        token.cancel();
        let sent = tx.clone();
        let ready = async { Ok::<u8, (ErrorClass, String)>(1) };
        CallTask::new(token, ready, move |r| {
            let _ = sent.send(r);
        })
        .await;
        assert!(rx.try_recv().is_err(), "a cancelled call's result was sent");
        let buggy = async {
            if std::hint::black_box(true) {
                panic!("tool bug {}", 7);
            }
            Ok(0)
        };
        CallTask::new(
            CancellationToken::new(),
            buggy,
            move |r: Result<u8, (ErrorClass, String)>| {
                let _ = tx.send(r);
            },
        )
        .await;
        assert_eq!(
            rx.try_recv().unwrap(),
            Err((ErrorClass::Internal, "the call panicked: tool bug 7".into()))
        );
    }
}
