//! The deterministic scheduler: a state machine folded over a run's events.
//!
//! The [`Engine`] never calls a tool, a model or a clock. It consumes **input events** (the
//! run's creation, tool and model results, clock readings, cancellation requests, a resume) and
//! answers each with **derived events** (task started, completed, failed, retry scheduled, ...)
//! and **effects** (call this tool, call this model, cancel that call) for a driver to perform.
//! Because the derived events and effects depend only on the inputs, feeding the recorded inputs
//! of a run to a fresh engine gives back the same events: that is replay, and resume is replay
//! followed by live driving.
//!
//! Input events are those of the kinds in [`is_input`]; a driver records each one in the log
//! (together with the events it derives, as one batch) *before* it performs the effects.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agent_runtime_core::{
    Actor, EncodedEvent, ErrorClass, EventKind, IdGenerator, ManualClock, Message, ModelResponse,
    NewEvent, ObjectWriter, Role, RunId, SeededRng, TaskId, Timestamp,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::graph::{OnFailure, RetryPolicy, TaskGraph, TaskLists, TaskSpec};
use crate::hashing::FastMap;
use crate::template;

/// The pseudo-tool an agent calls to add a sub-task to the running graph.
pub const SPAWN_TOOL: &str = "spawn_task";

/// Whether an event is an input of the engine (recorded from the outside world) rather than one
/// the engine derives.
pub fn is_input(e: &NewEvent) -> bool {
    match e.kind {
        EventKind::RunCreated
        | EventKind::RunResumed
        | EventKind::ToolCompleted
        | EventKind::ToolFailed
        | EventKind::ModelCompleted
        | EventKind::ModelFailed
        | EventKind::ClockObserved
        | EventKind::TaskPaused
        | EventKind::TaskUnpaused => true,
        // Cancellation requests come from a person; the engine's own are by the system.
        EventKind::RunCancelled | EventKind::TaskCancelled => matches!(e.actor, Actor::Person(_)),
        _ => false,
    }
}

/// An engine that cannot go on: the log does not describe a run it understands.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// An input event is malformed.
    #[error("event {kind}: {message}")]
    BadEvent {
        /// Its kind.
        kind: EventKind,
        /// What is wrong.
        message: String,
    },
    /// The run's graph is invalid.
    #[error("invalid graph in run.created: {0}")]
    Graph(String),
}

fn bad(kind: EventKind, message: impl Into<String>) -> EngineError {
    EngineError::BadEvent {
        kind,
        message: message.into(),
    }
}

/// What a driver must do for the engine.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Call a tool and report the result as `tool.completed` / `tool.failed` with `call`.
    CallTool {
        /// The engine's number for the call.
        call: u64,
        /// The task making the call.
        task_id: TaskId,
        /// The task's graph id.
        task: Arc<str>,
        /// Who calls (the agent, or the system for a tool step).
        actor: Actor,
        /// Registry name.
        tool: String,
        /// Rendered arguments, as recorded.
        args: Value,
        /// The graph's own arguments of this tool step, when they name secrets
        /// (`{{ secrets.NAME }}`): whoever makes the call fills those in, and only those (see
        /// [`crate::template::fill_secrets`]). `None` for agents' calls.
        secret_args: Option<Arc<Value>>,
        /// The task's attempt timeout, for the tool's information.
        timeout: Option<Duration>,
    },
    /// Call a model and report `model.completed` / `model.failed` with `call`.
    CallModel {
        /// The engine's number for the call.
        call: u64,
        /// The task making the call.
        task_id: TaskId,
        /// The task's graph id.
        task: Arc<str>,
        /// The agent's name.
        agent: Arc<str>,
        /// The provider part of the route.
        provider: Arc<str>,
        /// The model part of the route.
        model: Arc<str>,
        /// The conversation, shared with the engine (which copies it only if it must add to it
        /// while the effect is still held).
        messages: Arc<Vec<Message>>,
        /// Tools offered to the model (registry names, and `spawn_task` when allowed).
        tools: Arc<[String]>,
        /// The task's attempt timeout.
        timeout: Option<Duration>,
    },
    /// Stop a call: its result is no longer wanted.
    Cancel {
        /// The call.
        call: u64,
    },
}

impl Effect {
    /// The call a tool or model effect makes; `None` for a cancellation.
    pub fn call(&self) -> Option<u64> {
        match self {
            Effect::CallTool { call, .. } | Effect::CallModel { call, .. } => Some(*call),
            Effect::Cancel { .. } => None,
        }
    }
}

/// Where a task is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting for upstream tasks.
    Pending,
    /// A fallback task not (yet) needed.
    Held,
    /// Ready, waiting for a slot.
    Ready,
    /// Ready but held back by a per-agent or per-tool limit.
    Blocked,
    /// An attempt is running.
    Running,
    /// Waiting for its retry backoff.
    WaitingRetry,
    /// Failed for good; waiting for its fallback task.
    AwaitingFallback,
    /// Done, with an output.
    Completed,
    /// Failed for good.
    Failed,
    /// Skipped.
    Skipped,
    /// Cancelled.
    Cancelled,
}

impl TaskStatus {
    /// Whether the task will not change any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed
                | TaskStatus::Failed
                | TaskStatus::Skipped
                | TaskStatus::Cancelled
        )
    }
}

/// Where the run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Tasks remain.
    Running,
    /// Every task finished (done, skipped or cancelled).
    Completed,
    /// A task failed with `fail_run`, or the budget ran out.
    Failed,
    /// The run was cancelled.
    Cancelled,
}

/// The order of the ready set: priority (higher first), topological rank, task id.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    prio: i32,
    rank: u32,
    /// The first 8 bytes of the id, big-endian, zero-padded, then its length: when both ids
    /// are at most 8 bytes long, or their first 8 bytes differ, these order them as the strings
    /// do (a shorter id with the same prefix is a prefix of the longer one).
    id_prefix: u64,
    id_len: u32,
    /// The id, when longer than 8 bytes: for the other cases. Short ids (a simulation's) carry
    /// no string, so that a task's state need not hold one for its keys.
    long_id: Option<Arc<str>>,
    idx: u32,
}

impl Key {
    fn new(prio: i32, rank: u32, id: &str, idx: u32) -> Key {
        let mut prefix = [0u8; 8];
        let n = id.len().min(8);
        prefix[..n].copy_from_slice(&id.as_bytes()[..n]);
        Key {
            prio,
            rank,
            id_prefix: u64::from_be_bytes(prefix),
            id_len: id.len() as u32,
            long_id: (id.len() > 8).then(|| Arc::from(id)),
            idx,
        }
    }

    /// The order of the ids (see [`Key::id_prefix`]).
    fn id_order(&self, o: &Key) -> Ordering {
        self.id_prefix
            .cmp(&o.id_prefix)
            .then_with(|| match (&self.long_id, &o.long_id) {
                (Some(a), Some(b)) => a.cmp(b),
                _ => self.id_len.cmp(&o.id_len),
            })
    }
}

impl Ord for Key {
    fn cmp(&self, o: &Self) -> Ordering {
        o.prio
            .cmp(&self.prio)
            .then(self.rank.cmp(&o.rank))
            .then_with(|| self.id_order(o))
            .then(self.idx.cmp(&o.idx))
    }
}
impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum WaiterRef {
    Task(u32),
    Call(u64),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Waiter {
    key: Key,
    what: WaiterRef,
}

/// A limited resource (an agent, a tool, a provider) and who waits for it.
#[derive(Debug, Default)]
struct Slot {
    limit: u32,
    used: u32,
    waiting: BinaryHeap<Reverse<Waiter>>,
}

impl Slot {
    fn new(limit: u32) -> Self {
        Slot {
            limit,
            used: 0,
            waiting: BinaryHeap::new(),
        }
    }
    fn full(&self) -> bool {
        self.used >= self.limit
    }
}

/// An agent task's conversation during an attempt.
#[derive(Debug)]
struct AgentRun {
    messages: Arc<Vec<Message>>,
    turns: u32,
}

/// What a running attempt holds, in a slot of [`Engine::attempts`] that its task points to
/// while it runs: idle tasks carry none of it, and a slot's call list keeps its capacity from
/// one attempt to the next.
#[derive(Debug, Default)]
struct Attempt {
    /// Its calls, queued or started, in the order made. An agent asks its model again once
    /// they are all answered.
    calls: Vec<u64>,
    /// For an agent task: its conversation.
    agent: Option<AgentRun>,
    /// The conversation buffer of an earlier attempt in this slot, emptied, kept when no call
    /// held it any more: the next agent attempt here fills it instead of allocating one.
    spare_messages: Option<Arc<Vec<Message>>>,
    /// When its `timeout` ends it, pushed back by the time its calls waited for a person.
    deadline: Option<Timestamp>,
    /// Since when its clock stands still: set when the first of its calls starts waiting for
    /// a person (`task.paused`); it stands still while any does ([`Engine::attempt_waits`]).
    waiting_since: Timestamp,
    /// Since when its clock runs: its start, or the end of its last wait. A wait recorded
    /// with an earlier `since` counts from here, so no stretch is counted twice.
    clock_from: Timestamp,
}

/// One task of the run. Kept small, as a run may hold a hundred thousand: what only some tasks
/// need (spawning, fallbacks, a running attempt) lives in the engine's side tables, and its
/// graph id in its spec.
#[derive(Debug)]
struct TaskState {
    task_id: TaskId,
    waiting_on: u32,
    /// The topological rank (the longest chain of dependencies above the task), which orders
    /// the ready set: each dependency raises it as it completes, so it is whole once the task
    /// is ready, without a pass over the graph at the start.
    rank: u32,
    attempt: u32,
    agent: Option<u32>,
    /// Its slot in [`Engine::attempts`] while an attempt runs.
    running: Option<u32>,
    status: TaskStatus,
    /// Whether the output is kept for templates, fallbacks and the run's final outputs.
    keeps_output: bool,
}

/// A task's output as the engine keeps it, for templates, fallbacks and the run's final outputs.
#[derive(Clone, Debug)]
enum Output {
    /// An agent's final answer, kept as its parts: as JSON (`{"text": ..., "turns": ...}`) it
    /// is an object, whose map allocates room for eleven entries, some 700 bytes a task.
    Answer { text: String, turns: u32 },
    /// Anything else: a tool's result, a substitute.
    Value(Value),
}

impl Output {
    /// Writes the output as `task.completed` and `run.completed` record it (the JSON of
    /// [`Output::into_value`]).
    fn write(&self, slot: agent_runtime_core::Slot<'_>) {
        match self {
            Output::Answer { text, turns } => slot.object(|o| {
                o.str("text", text).u64("turns", u64::from(*turns));
            }),
            Output::Value(v) => slot.value(v),
        }
    }

    /// The output as JSON: what `task.completed` records.
    fn into_value(self, shapes: &Shapes) -> Value {
        match self {
            Output::Answer { text, turns } => shapes
                .agent_output
                .fill([Value::String(text), turns.into()]),
            Output::Value(v) => v,
        }
    }
}

/// The kept outputs, as templates read them.
struct KeptOutputs<'a>(&'a Engine);

impl template::Outputs for KeptOutputs<'_> {
    fn output(&self, id: &str) -> Option<std::borrow::Cow<'_, Value>> {
        let engine = self.0;
        let idx = engine.index_of(id)?;
        engine.output_value(idx)
    }
}

/// What spawning adds to a task (the spawned and the spawning ones).
#[derive(Debug, Default)]
struct Lineage {
    /// How many spawns deep the task is (0 for a declared task).
    depth: u32,
    /// Sub-tasks it spawned, in order (their ids are numbered by it).
    children: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallKind {
    Tool,
    Model,
}

#[derive(Debug)]
struct CallInfo {
    task: u32,
    kind: CallKind,
    started: bool,
    /// The slot it holds or waits for: tool or provider name, if limited.
    resource: Option<String>,
    /// For a tool call (boxed: model calls, the most, need none of it).
    request: Option<Box<ToolRequest>>,
    /// Whether it waits for a person (between its `task.paused` and `task.unpaused`).
    waiting: bool,
}

/// What a tool call sends, and the model's id for it.
#[derive(Debug)]
struct ToolRequest {
    /// Taken when the call starts.
    tool: String,
    /// Taken when the call starts.
    args: Value,
    tool_call_id: Option<String>,
}

/// The engine's calls in flight or queued, by number.
type Calls = FastMap<u64, CallInfo>;

/// The keys of an object the engine builds as a `Value` for every task (an agent's output, as
/// templates and final outputs read it), built once: each is a clone with its values written in
/// by position. Cloning a map copies its keys without the
/// comparisons that inserting them one by one makes, which showed in profiles.
#[derive(Debug)]
struct Shape(Value);

impl Shape {
    /// `keys` in byte order: the order a map iterates them in, with or without serde_json's
    /// `preserve_order` (which keeps the insertion order, the same here).
    fn new(keys: &[&str]) -> Shape {
        debug_assert!(keys.windows(2).all(|w| w[0] < w[1]), "sorted keys");
        Shape(Value::Object(
            keys.iter().map(|k| (k.to_string(), Value::Null)).collect(),
        ))
    }
    /// The payload with `values` for the keys, in the order given to [`Shape::new`].
    fn fill<const N: usize>(&self, values: [Value; N]) -> Value {
        let mut v = self.0.clone();
        if let Value::Object(m) = &mut v {
            debug_assert_eq!(m.len(), N);
            for (slot, x) in m.values_mut().zip(values) {
                *slot = x;
            }
        }
        v
    }
}

/// The shapes of the per-task values.
#[derive(Debug)]
struct Shapes {
    /// An agent's output.
    agent_output: Shape,
}

impl Shapes {
    fn new() -> Shapes {
        Shapes {
            agent_output: Shape::new(&["text", "turns"]),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Retry { task: u32, attempt: u32 },
    Timeout { task: u32, attempt: u32 },
}

#[derive(Debug)]
struct AgentInfo {
    name: Arc<str>,
    provider: Arc<str>,
    model: Arc<str>,
    instructions: String,
    tools: Arc<[String]>,
    max_turns: u32,
    slot: Slot,
}

/// The deterministic scheduler of one run. See the module docs.
#[derive(Debug)]
pub struct Engine {
    run_id: RunId,
    /// The graph as it stands: its specs (declared, then spawned) are indexed like `tasks`.
    graph: TaskGraph,
    seed: u64,
    now: Timestamp,
    clock: Arc<ManualClock>,
    ids: IdGenerator,
    rng: SeededRng,
    tasks: Vec<TaskState>,
    /// For each declared task, the tasks that need it (spawned tasks are needed by none).
    dependents: TaskLists,
    /// Lineage of the tasks that spawned or were spawned.
    lineage: BTreeMap<u32, Lineage>,
    /// For a fallback task, the failed tasks waiting for its output.
    fallback_owners: BTreeMap<u32, Vec<u32>>,
    /// Running attempts' slots; `free_attempts` are those not in use.
    attempts: Vec<Attempt>,
    free_attempts: Vec<u32>,
    /// Graph id to task, built on first use: a run that never looks a task up by name (a
    /// simulation) never pays for it.
    by_id: OnceLock<FastMap<String, u32>>,
    /// Task id to task, built on first use like `by_id`.
    by_task_id: OnceLock<FastMap<TaskId, u32>>,
    agents: Vec<AgentInfo>,
    agent_index: BTreeMap<String, u32>,
    ready: BinaryHeap<Reverse<Key>>,
    running: u32,
    tool_slots: BTreeMap<String, Slot>,
    provider_slots: BTreeMap<String, Slot>,
    timers: BinaryHeap<Reverse<(Timestamp, u64, Timer)>>,
    timer_seq: u64,
    calls: Calls,
    next_call: u64,
    /// Kept outputs (see [`TaskState::keeps_output`]), by task.
    outputs: BTreeMap<u32, Output>,
    open: u32,
    status: RunStatus,
    tokens: u64,
    model_calls: u64,
    events: Vec<EncodedEvent>,
    effects: Vec<Effect>,
    /// For each effect, how many of the events in `events` were derived before it: the events
    /// that must be durable before it may be performed (its request among them).
    effect_marks: Vec<usize>,
    decisions: u64,
    /// Why the run failed, as `run.failed` says it (`task `T` failed: CLASS: MESSAGE`), or
    /// why it was cancelled.
    failure: Option<String>,
    shapes: Shapes,
    /// Most attempts one pump starts before it stops (see [`Engine::set_pump_step`]); `None`:
    /// no limit.
    pump_step: Option<u32>,
    /// A pump stopped at its step with tasks left to start: it goes on before anything else
    /// (see [`Engine::pump_more`]), so the events come out as from one pump.
    pump_unfinished: bool,
}

/// A compact view of one task, for reports.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TaskView {
    /// Graph id.
    pub id: String,
    /// Status.
    pub status: TaskStatus,
    /// Attempts started.
    pub attempts: u32,
}

/// The most bytes a tool step's arguments may have once rendered (as compact JSON): a call's
/// ([`agent_runtime_core::MAX_ARGUMENT_BYTES`]). Its `tool.requested` event records them, and an
/// event the log refuses would stop the run where it stands, again at each `resume`: over this,
/// the attempt fails as `invalid_arguments` instead, and the task's failure policy decides.
pub const MAX_RENDERED_ARGS_BYTES: usize = agent_runtime_core::MAX_ARGUMENT_BYTES;

/// How many tasks of a run are in each state (see [`Engine::tally`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskTally {
    /// Completed (with an output, or its `continue_with` substitute).
    pub completed: u64,
    /// With an attempt running.
    pub running: u64,
    /// Failed for good (some waiting for their fallback task).
    pub failed: u64,
    /// Skipped.
    pub skipped: u64,
    /// Cancelled.
    pub cancelled: u64,
    /// Not started yet, or waiting for a slot or a retry.
    pub waiting: u64,
    /// Attempts after the first, over every task (an attempt a crash interrupted counts).
    pub retried: u64,
}

impl TaskTally {
    /// Counts a task in `status` that started `attempts` attempts.
    pub fn add(&mut self, status: TaskStatus, attempts: u32) {
        *self.of(status) += 1;
        self.retried += u64::from(attempts.saturating_sub(1));
    }
    /// Takes back what [`TaskTally::add`] counted.
    pub fn remove(&mut self, status: TaskStatus, attempts: u32) {
        let count = self.of(status);
        *count = count.saturating_sub(1);
        self.retried = self
            .retried
            .saturating_sub(u64::from(attempts.saturating_sub(1)));
    }
    fn of(&mut self, status: TaskStatus) -> &mut u64 {
        match status {
            TaskStatus::Completed => &mut self.completed,
            TaskStatus::Running => &mut self.running,
            TaskStatus::Failed | TaskStatus::AwaitingFallback => &mut self.failed,
            TaskStatus::Skipped => &mut self.skipped,
            TaskStatus::Cancelled => &mut self.cancelled,
            TaskStatus::Pending
            | TaskStatus::Held
            | TaskStatus::Ready
            | TaskStatus::Blocked
            | TaskStatus::WaitingRetry => &mut self.waiting,
        }
    }
}

impl Engine {
    /// The `run.created` event that starts a run of `graph` with `seed` at `time`.
    pub fn created_event(run_id: RunId, graph: &TaskGraph, seed: u64, time: Timestamp) -> NewEvent {
        decoded(Engine::created_event_encoded(run_id, graph, seed, time))
    }

    /// [`Engine::created_event`], encoded: the graph is serialized and made canonical once,
    /// and its digest taken of the same bytes the event carries.
    pub fn created_event_encoded(
        run_id: RunId,
        graph: &TaskGraph,
        seed: u64,
        time: Timestamp,
    ) -> EncodedEvent {
        Engine::created_event_labelled_encoded(run_id, graph, seed, time, &BTreeMap::new())
    }

    /// [`Engine::created_event`] with the run's labels (see
    /// [`crate::driver::RunOptions::labels`]), recorded as `labels` when there are any.
    pub fn created_event_labelled(
        run_id: RunId,
        graph: &TaskGraph,
        seed: u64,
        time: Timestamp,
        labels: &BTreeMap<String, String>,
    ) -> NewEvent {
        decoded(Engine::created_event_labelled_encoded(
            run_id, graph, seed, time, labels,
        ))
    }

    /// [`Engine::created_event_labelled`], encoded.
    pub fn created_event_labelled_encoded(
        run_id: RunId,
        graph: &TaskGraph,
        seed: u64,
        time: Timestamp,
        labels: &BTreeMap<String, String>,
    ) -> EncodedEvent {
        // Written straight from the graph, without a `Value` of it (a large graph's start was
        // mostly building one); a graph always has a JSON form, so the fallback is never used.
        let mut graph_json = Vec::with_capacity(256 * graph.tasks.len().max(1));
        if agent_runtime_core::write_canonical(graph, &mut graph_json).is_err() {
            graph_json = b"null".to_vec();
        }
        let digest = crate::graph::digest_of_canonical(&graph_json);
        EncodedEvent::with_object(
            run_id,
            None,
            Actor::System,
            EventKind::RunCreated,
            time,
            |o| {
                o.str("digest", &digest).canonical("graph", &graph_json);
                if !labels.is_empty() {
                    o.value("labels", &json!(labels));
                }
                match &graph.name {
                    Some(name) => o.str("name", name),
                    None => o.value("name", &Value::Null),
                };
                o.u64("seed", seed);
            },
        )
    }

    /// The `run.created` event of a simulation: the configuration instead of the graph (the
    /// graph is rebuilt from it), so that huge synthetic graphs stay small in the log.
    pub fn created_sim_event(
        run_id: RunId,
        cfg: &crate::sim::SimConfig,
        graph: &TaskGraph,
        time: Timestamp,
    ) -> NewEvent {
        NewEvent {
            run_id,
            task_id: None,
            actor: Actor::System,
            kind: EventKind::RunCreated,
            time,
            payload: json!({ "name": graph.name, "seed": cfg.seed, "simulation": cfg }),
        }
    }

    /// Starts an engine from a `run.created` event; the derived events (`run.started`, first
    /// dispatches) and effects wait in [`Engine::drain_events`] and [`Engine::drain_effects`].
    pub fn create(event: &NewEvent) -> Result<Engine, EngineError> {
        if event.kind != EventKind::RunCreated {
            return Err(bad(event.kind, "a run's first event must be run.created"));
        }
        let seed = event
            .payload
            .get("seed")
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                // What older `agent-runtime demo`s wrote, or another program: events of a run
                // that this scheduler never drove, which there is nothing to re-execute against.
                bad(
                    event.kind,
                    "no seed: this run was not made by the scheduler (an older \
                     `agent-runtime demo` wrote such runs), so it cannot be replayed or resumed",
                )
            })?;
        let graph = graph_of_created(&event.payload)?;
        Ok(Self::build(event.run_id, graph, seed, event.time, None))
    }

    /// Starts an engine for a graph already validated (as [`Engine::create`] would from its
    /// `run.created` event, without the round trip through JSON).
    pub fn start(run_id: RunId, graph: TaskGraph, seed: u64, time: Timestamp) -> Engine {
        Self::build(run_id, graph, seed, time, None)
    }

    /// [`Engine::start`] with pumps of at most `step` attempts each (see
    /// [`Engine::set_pump_step`]): a run that starts thousands of tasks at once derives its
    /// first events in steps, which its driver can hand to the log while the engine derives the
    /// rest.
    pub fn start_in_steps(
        run_id: RunId,
        graph: TaskGraph,
        seed: u64,
        time: Timestamp,
        step: u32,
    ) -> Engine {
        Self::build(run_id, graph, seed, time, Some(step.max(1)))
    }

    fn build(
        run_id: RunId,
        graph: TaskGraph,
        seed: u64,
        now: Timestamp,
        pump_step: Option<u32>,
    ) -> Engine {
        let (clock, ids) = run_ids(seed, now);
        let deps = graph.dependency_lists();
        let dependents = deps.inverse();
        let held = graph.fallback_targets();
        let mut referenced: std::collections::HashSet<String> = std::collections::HashSet::new();
        for t in &graph.tasks {
            t.for_each_template_ref(&mut |r| {
                referenced.insert(r.to_string());
            });
        }
        let mut agents = Vec::new();
        let mut agent_index = BTreeMap::new();
        for (name, a) in &graph.agents {
            let (provider, model) = split_route(&a.model);
            agent_index.insert(name.clone(), agents.len() as u32);
            agents.push(AgentInfo {
                name: name.as_str().into(),
                provider: provider.into(),
                model: model.into(),
                instructions: a.instructions.clone(),
                tools: {
                    let mut t = a.tools.clone();
                    t.sort();
                    t.dedup();
                    t.into()
                },
                max_turns: a.max_turns,
                slot: Slot::new(a.concurrency),
            });
        }
        let tool_slots = graph
            .limits
            .tools
            .iter()
            .map(|(k, &v)| (k.clone(), Slot::new(v)))
            .collect();
        let provider_slots = graph
            .limits
            .providers
            .iter()
            .map(|(k, &v)| (k.clone(), Slot::new(v)))
            .collect();
        // The specs stay where they are, in the graph, indexed like the task states: copying
        // them into the states made each state twice as large, and a hundred thousand of them
        // were a cost of fresh memory to fault in.
        let specs = &graph.tasks;
        // Hashed for the lookup of every task's agent; the ordered index stays for spawns.
        let agent_of: FastMap<&str, u32> =
            agent_index.iter().map(|(k, &v)| (k.as_str(), v)).collect();
        let mut tasks: Vec<TaskState> = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let is_held = held.contains(&i);
            let keeps_output = is_held
                || dependents.get(i).is_empty()
                || (!referenced.is_empty() && referenced.contains(&spec.id));
            tasks.push(TaskState {
                task_id: ids.task_id(),
                waiting_on: deps.get(i).len() as u32,
                rank: 0,
                attempt: 0,
                agent: spec.agent.as_deref().and_then(|a| agent_of.get(a).copied()),
                running: None,
                status: if is_held {
                    TaskStatus::Held
                } else {
                    TaskStatus::Pending
                },
                keeps_output,
            });
        }
        drop(deps);
        let open = tasks
            .iter()
            .filter(|t| t.status != TaskStatus::Held)
            .count() as u32;
        let mut e = Engine {
            run_id,
            seed,
            now,
            clock,
            ids,
            rng: SeededRng::new(seed),
            dependents,
            lineage: BTreeMap::new(),
            fallback_owners: BTreeMap::new(),
            attempts: Vec::new(),
            free_attempts: Vec::new(),
            by_id: OnceLock::new(),
            by_task_id: OnceLock::new(),
            agents,
            agent_index,
            ready: BinaryHeap::new(),
            running: 0,
            tool_slots,
            provider_slots,
            timers: BinaryHeap::new(),
            timer_seq: 0,
            calls: Calls::default(),
            next_call: 1,
            outputs: BTreeMap::new(),
            open,
            status: RunStatus::Running,
            tokens: 0,
            model_calls: 0,
            events: Vec::new(),
            effects: Vec::new(),
            effect_marks: Vec::new(),
            decisions: 0,
            failure: None,
            shapes: Shapes::new(),
            pump_step,
            pump_unfinished: false,
            tasks,
            graph,
        };
        e.emit(
            None,
            Actor::System,
            EventKind::RunStarted,
            json!({"tasks": e.tasks.len()}),
        );
        for i in 0..e.tasks.len() as u32 {
            if e.tasks[i as usize].status == TaskStatus::Pending
                && e.tasks[i as usize].waiting_on == 0
            {
                e.make_ready(i);
            }
        }
        // The first dispatches come at once, two events and an effect each: room for them now,
        // as growing the buffers by doubling would touch twice the memory, fresh pages all.
        let first = e
            .ready
            .len()
            .min(e.graph.limits.concurrency as usize)
            .min(e.pump_step.map_or(usize::MAX, |s| s as usize));
        e.events.reserve(2 * first);
        e.effects.reserve(first);
        e.effect_marks.reserve(first);
        e.settle();
        e
    }

    /// Limits each pump (starting the ready tasks that slots allow) to `step` attempts, or lifts
    /// the limit (`None`). A pump that stops at its step leaves [`Engine::is_pumping`] true;
    /// [`Engine::pump_more`] goes on. The events are the same as with no limit: a pump left
    /// unfinished is finished before any input is applied, whoever applies it.
    pub fn set_pump_step(&mut self, step: Option<u32>) {
        self.pump_step = step.map(|s| s.max(1));
    }

    /// Whether the last pump stopped at its step with tasks left to start.
    pub fn is_pumping(&self) -> bool {
        self.pump_unfinished
    }

    /// Goes on with an unfinished pump for one more step; a no-op when there is none.
    pub fn pump_more(&mut self) {
        if self.pump_unfinished {
            self.settle();
        }
    }

    /// Finishes an unfinished pump at once. Every input does this first, so that it meets the
    /// state one whole pump would have left; but the events it then derives are the pump's and
    /// belong before the input's in the log, so a caller that records inputs finishes the pump
    /// and takes its events (and effects) before it applies an input.
    pub fn finish_pump(&mut self) {
        while self.pump_unfinished {
            self.settle();
        }
    }

    /// The run's id.
    pub fn run_id(&self) -> RunId {
        self.run_id
    }
    /// The run's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// The run's graph as it stands: declared tasks, then spawned ones.
    pub fn graph(&self) -> TaskGraph {
        self.graph.clone()
    }
    /// [`Engine::graph`], borrowed.
    pub(crate) fn graph_ref(&self) -> &TaskGraph {
        &self.graph
    }
    /// The engine's time: that of the last input.
    pub fn now(&self) -> Timestamp {
        self.now
    }
    /// Where the run is.
    pub fn status(&self) -> RunStatus {
        self.status
    }
    /// Whether the run has ended.
    pub fn is_finished(&self) -> bool {
        self.status != RunStatus::Running
    }
    /// Why the run failed (`task `T` failed: CLASS: MESSAGE`) or was cancelled (`REASON
    /// (ACTOR)`), once it has.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }
    /// Dispatch decisions made so far (tasks started, calls issued, retries scheduled).
    pub fn decisions(&self) -> u64 {
        self.decisions
    }
    /// Outputs of completed tasks, by task id (those kept for templates, fallbacks and the
    /// run's final outputs).
    pub fn outputs(&self) -> BTreeMap<String, Value> {
        self.outputs
            .keys()
            .filter_map(|&i| Some((self.name(i).to_string(), self.output_value(i)?.into_owned())))
            .collect()
    }

    /// The kept output of a task as JSON.
    fn output_value(&self, idx: u32) -> Option<std::borrow::Cow<'_, Value>> {
        Some(match self.outputs.get(&idx)? {
            Output::Value(v) => std::borrow::Cow::Borrowed(v),
            answer => std::borrow::Cow::Owned(answer.clone().into_value(&self.shapes)),
        })
    }
    /// How many tasks the run has: declared and spawned.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }
    /// Every task, in declaration then spawn order.
    pub fn task_views(&self) -> Vec<TaskView> {
        self.tasks
            .iter()
            .zip(&self.graph.tasks)
            .map(|(t, spec)| TaskView {
                id: spec.id.clone(),
                status: t.status,
                attempts: t.attempt,
            })
            .collect()
    }
    /// How many tasks are in each state now: what a progress display shows. One pass over the
    /// tasks, allocating nothing. A display that redraws per event takes
    /// [`Engine::task_states`] once and follows events with [`Engine::task_state`].
    pub fn tally(&self) -> TaskTally {
        let mut tally = TaskTally::default();
        for t in &self.tasks {
            tally.add(t.status, t.attempt);
        }
        tally
    }
    /// A task's state and the attempts it started, by its id: with [`TaskTally::add`] and
    /// [`TaskTally::remove`], a display keeps a tally up to date per event.
    pub fn task_state(&self, task_id: TaskId) -> Option<(TaskStatus, u32)> {
        self.index_of_task_id(task_id).map(|i| {
            let t = &self.tasks[i as usize];
            (t.status, t.attempt)
        })
    }
    /// Every task's id, state and attempts started, in declaration then spawn order.
    pub fn task_states(&self) -> impl Iterator<Item = (TaskId, TaskStatus, u32)> + '_ {
        self.tasks.iter().map(|t| (t.task_id, t.status, t.attempt))
    }
    /// The graph id of a task.
    pub fn task_name(&self, task_id: TaskId) -> Option<&str> {
        self.index_of_task_id(task_id).map(|i| self.name(i))
    }
    /// The `on_failure` policy of a task, declared or spawned.
    pub fn on_failure_of(&self, task_id: TaskId) -> Option<&crate::graph::OnFailure> {
        self.index_of_task_id(task_id)
            .map(|i| &self.graph.tasks[i as usize].on_failure)
    }
    fn index_of_task_id(&self, task_id: TaskId) -> Option<u32> {
        let by_task_id = self.by_task_id.get_or_init(|| {
            let mut m = FastMap::with_capacity_and_hasher(self.tasks.len(), Default::default());
            for (i, t) in self.tasks.iter().enumerate() {
                m.insert(t.task_id, i as u32);
            }
            m
        });
        by_task_id.get(&task_id).copied()
    }

    /// The graph id of a task.
    fn name(&self, idx: u32) -> &str {
        &self.graph.tasks[idx as usize].id
    }

    /// The task of a graph id.
    fn index_of(&self, name: &str) -> Option<u32> {
        let by_id = self.by_id.get_or_init(|| {
            let mut m = FastMap::with_capacity_and_hasher(self.tasks.len(), Default::default());
            // In task order, so that a repeated id (in a graph not validated) means its last task.
            for (i, spec) in self.graph.tasks.iter().enumerate() {
                m.insert(spec.id.clone(), i as u32);
            }
            m
        });
        by_id.get(name).copied()
    }
    /// Outputs of the tasks nothing depends on (the run's results).
    pub fn final_outputs(&self) -> BTreeMap<String, Value> {
        self.final_outputs_by_id().collect()
    }

    /// [`Engine::final_outputs`], in id order: what a map collects from without sorting.
    fn final_outputs_by_id(&self) -> impl Iterator<Item = (String, Value)> + '_ {
        self.final_tasks_by_id().filter_map(|i| {
            let v = self.output_value(i)?;
            Some((self.name(i).to_string(), v.into_owned()))
        })
    }

    /// The tasks whose outputs are the run's final outputs, in byte order of their ids.
    fn final_tasks_by_id(&self) -> impl Iterator<Item = u32> + '_ {
        let mut finals: Vec<u32> = (0..self.tasks.len() as u32)
            .filter(|&i| {
                self.dependents.get(i as usize).is_empty()
                    && self.tasks[i as usize].status == TaskStatus::Completed
                    && self.outputs.contains_key(&i)
            })
            .collect();
        finals.sort_by(|&a, &b| self.name(a).cmp(self.name(b)));
        finals.into_iter()
    }

    /// Derived events since the last call, drained: the engine keeps its buffer for the next
    /// input instead of growing a new one each time.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, EncodedEvent> {
        self.events.drain(..)
    }
    /// Effects since the last call, drained (see [`Engine::drain_events`]).
    pub fn drain_effects(&mut self) -> std::vec::Drain<'_, Effect> {
        self.effect_marks.clear();
        self.effects.drain(..)
    }

    /// [`Engine::drain_effects`], each effect with how many of the events that
    /// [`Engine::drain_events`] hands out (or just handed out, if called first) must be durable
    /// before it may be performed. A driver that drains both together can record a long burst
    /// of events in pieces and start each effect once its own piece is durable.
    pub fn drain_marked_effects(&mut self) -> impl Iterator<Item = (usize, Effect)> + '_ {
        self.effect_marks.drain(..).zip(self.effects.drain(..))
    }

    fn push_effect(&mut self, effect: Effect) {
        self.effect_marks.push(self.events.len());
        self.effects.push(effect);
    }

    /// When the engine next needs a `clock.observed` input (a retry is due or an attempt times
    /// out); `None` when it only waits for results.
    pub fn next_deadline(&mut self) -> Option<Timestamp> {
        while let Some(Reverse((at, _, timer))) = self.timers.peek() {
            let live = match *timer {
                Timer::Retry { task, attempt } => {
                    let t = &self.tasks[task as usize];
                    t.status == TaskStatus::WaitingRetry && t.attempt == attempt
                }
                Timer::Timeout { task, attempt } => self.timeout_due_at(task, attempt) == Some(*at),
            };
            if live && self.status == RunStatus::Running {
                return Some(*at);
            }
            self.timers.pop();
        }
        None
    }

    /// When the running attempt `attempt` of `task` times out: `None` if it no longer runs,
    /// has no timeout, or its clock stands still (a call waits for a person).
    fn timeout_due_at(&self, task: u32, attempt: u32) -> Option<Timestamp> {
        let t = &self.tasks[task as usize];
        if t.status != TaskStatus::Running || t.attempt != attempt {
            return None;
        }
        if self.attempt_waits(task) {
            return None;
        }
        self.attempts[t.running? as usize].deadline
    }

    /// Whether `call` is started and not answered.
    pub fn is_in_flight(&self, call: u64) -> bool {
        self.calls.get(&call).is_some_and(|c| c.started)
    }

    /// Calls started and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.calls.values().filter(|c| c.started).count()
    }

    // ---- inputs -------------------------------------------------------------------------

    /// The `clock.observed` input for `time`.
    pub fn clock_event(&self, time: Timestamp) -> NewEvent {
        self.input(
            None,
            Actor::System,
            EventKind::ClockObserved,
            time,
            json!({"reason": "timer"}),
        )
    }

    /// The `task.paused` input (`waiting`) or `task.unpaused` one for `call`, which began or
    /// stopped waiting for a person's answer to an approval question; `None` when the call is
    /// not in flight (answered or cancelled meanwhile: nothing to record).
    pub fn wait_event(&self, call: u64, waiting: bool, time: Timestamp) -> Option<NewEvent> {
        self.wait_event_since(call, waiting, time, time)
    }

    /// [`Engine::wait_event`] of a wait that began at `since` (read when the call reported
    /// it), before the event is recorded at `time`: a `task.paused` says so (`since`), and the
    /// attempt's clock stands still from then. Without it, a question asked just before the
    /// attempt's deadline and recorded just after it had the attempt time out right after the
    /// person answered.
    pub fn wait_event_since(
        &self,
        call: u64,
        waiting: bool,
        time: Timestamp,
        since: Timestamp,
    ) -> Option<NewEvent> {
        let info = self.calls.get(&call).filter(|c| c.started)?;
        // Only a change is recorded: a second "began" for a waiting call, or an "ended" for
        // one that does not wait, says nothing.
        if info.waiting == waiting {
            return None;
        }
        let (kind, payload) = if waiting {
            let mut payload = json!({"call": call, "for": "approval"});
            if since < time {
                payload["since"] = json!(since);
            }
            (EventKind::TaskPaused, payload)
        } else {
            (EventKind::TaskUnpaused, json!({"call": call}))
        };
        let task_id = self.tasks[info.task as usize].task_id;
        Some(self.input(Some(task_id), Actor::System, kind, time, payload))
    }

    /// The `run.resumed` input.
    pub fn resumed_event(&self, time: Timestamp) -> NewEvent {
        self.resumed_event_unstarted(time, &[])
    }

    /// [`Engine::resumed_event`] naming calls that were requested but certainly never made: the
    /// driver makes a call only once its request is durable, so the calls requested in events
    /// past the log's end (see `refold` in the driver) were not. Their attempts are kept, not
    /// failed as interrupted, and the resuming driver makes the calls.
    pub fn resumed_event_unstarted(&self, time: Timestamp, unstarted: &[u64]) -> NewEvent {
        self.resumed_event_since(time, unstarted, None)
    }

    /// [`Engine::resumed_event_unstarted`], saying `since` when the run's log last knew the
    /// time before its process stopped: the attempts that go on do not count the time since
    /// against their `timeout` (without it, the time of the input before `run.resumed`).
    pub fn resumed_event_since(
        &self,
        time: Timestamp,
        unstarted: &[u64],
        since: Option<Timestamp>,
    ) -> NewEvent {
        let mut payload = json!({"in_flight": self.in_flight()});
        if let Some(since) = since {
            payload["since"] = json!(since);
        }
        if !unstarted.is_empty() {
            let mut calls = unstarted.to_vec();
            calls.sort_unstable();
            calls.dedup();
            payload["unstarted_calls"] = json!(calls);
        }
        self.input(None, Actor::System, EventKind::RunResumed, time, payload)
    }

    /// A request to cancel the run.
    pub fn cancel_run_event(&self, time: Timestamp, by: &str, reason: &str) -> NewEvent {
        self.input(
            None,
            Actor::Person(by.into()),
            EventKind::RunCancelled,
            time,
            json!({"request": true, "reason": reason}),
        )
    }

    /// A request to cancel a task and everything downstream of it, and why if said; `None` for
    /// an unknown task.
    pub fn cancel_task_event(
        &self,
        time: Timestamp,
        by: &str,
        task: &str,
        reason: Option<&str>,
    ) -> Option<NewEvent> {
        let idx = self.index_of(task)?;
        let payload = match reason {
            Some(reason) => json!({"request": true, "task": task, "reason": reason}),
            None => json!({"request": true, "task": task}),
        };
        Some(self.input(
            Some(self.tasks[idx as usize].task_id),
            Actor::Person(by.into()),
            EventKind::TaskCancelled,
            time,
            payload,
        ))
    }

    /// Records a tool call's result and applies it, in one step: the input event comes back
    /// encoded, for the caller to log before acting on what the engine derived from it. The
    /// same as [`Engine::apply`] on [`Engine::tool_result_event`], without building the event
    /// as a `Value` and reading it back.
    pub fn apply_tool_result(
        &mut self,
        call: u64,
        tool: &str,
        time: Timestamp,
        result: Result<Value, (ErrorClass, String)>,
    ) -> EncodedEvent {
        self.finish_pump();
        let event = self.tool_result_input(call, tool, time, &result);
        if self.enter_input(event.time()) {
            self.on_tool_result(call, result);
            self.settle();
        }
        event
    }

    /// [`Engine::apply_tool_result`] for a model call's result.
    pub fn apply_model_result(
        &mut self,
        call: u64,
        time: Timestamp,
        result: Result<ModelResponse, (ErrorClass, String)>,
    ) -> EncodedEvent {
        self.finish_pump();
        let event = self.model_result_input(call, time, result.as_ref());
        if self.enter_input(event.time()) {
            self.on_model_result(call, result);
            self.settle();
        }
        event
    }

    /// The task a call belongs to, if the call is known.
    fn task_of_call(&self, call: u64) -> Option<TaskId> {
        self.calls
            .get(&call)
            .map(|c| self.tasks[c.task as usize].task_id)
    }

    /// The input event recording a tool call's result, encoded: what both
    /// [`Engine::apply_tool_result`] and [`Engine::tool_result_event`] record. An input never
    /// goes back in time: it takes the engine's time if it is earlier.
    fn tool_result_input(
        &self,
        call: u64,
        tool: &str,
        time: Timestamp,
        result: &Result<Value, (ErrorClass, String)>,
    ) -> EncodedEvent {
        let (task_id, actor) = (self.task_of_call(call), Actor::Tool(tool.into()));
        let time = time.max(self.now);
        match result {
            Ok(output) => self.input_object(task_id, actor, EventKind::ToolCompleted, time, |o| {
                o.u64("call", call).value("output", output);
            }),
            Err((class, message)) => {
                self.input_object(task_id, actor, EventKind::ToolFailed, time, |o| {
                    write_failure(o, call, *class, message)
                })
            }
        }
    }

    /// [`Engine::tool_result_input`] for a model call's result.
    fn model_result_input(
        &self,
        call: u64,
        time: Timestamp,
        result: Result<&ModelResponse, &(ErrorClass, String)>,
    ) -> EncodedEvent {
        let (task_id, actor) = (self.task_of_call(call), Actor::System);
        let time = time.max(self.now);
        match result {
            Ok(response) => {
                self.input_object(task_id, actor, EventKind::ModelCompleted, time, |o| {
                    o.u64("call", call)
                        .object("response", |o| response.write_canonical(o));
                })
            }
            Err((class, message)) => {
                self.input_object(task_id, actor, EventKind::ModelFailed, time, |o| {
                    write_failure(o, call, *class, message)
                })
            }
        }
    }

    fn input_object(
        &self,
        task_id: Option<TaskId>,
        actor: Actor,
        kind: EventKind,
        time: Timestamp,
        write: impl FnOnce(&mut ObjectWriter<'_>),
    ) -> EncodedEvent {
        EncodedEvent::with_object(self.run_id, task_id, actor, kind, time, write)
    }

    /// What every input does first: time moves on to the input's; whether the run still takes
    /// inputs (after it ended they change nothing).
    fn enter_input(&mut self, time: Timestamp) -> bool {
        if time > self.now {
            self.now = time;
            self.clock.set(self.now);
        }
        self.status == RunStatus::Running
    }

    /// The input recording a tool call's result.
    pub fn tool_result_event(
        &self,
        call: u64,
        tool: &str,
        time: Timestamp,
        result: Result<Value, (ErrorClass, String)>,
    ) -> NewEvent {
        decoded(self.tool_result_input(call, tool, time, &result))
    }

    /// The input recording a model call's result.
    pub fn model_result_event(
        &self,
        call: u64,
        time: Timestamp,
        result: Result<&ModelResponse, (ErrorClass, String)>,
    ) -> NewEvent {
        decoded(self.model_result_input(call, time, result.as_ref().copied()))
    }

    fn input(
        &self,
        task_id: Option<TaskId>,
        actor: Actor,
        kind: EventKind,
        time: Timestamp,
        payload: Value,
    ) -> NewEvent {
        NewEvent {
            run_id: self.run_id,
            task_id,
            actor,
            kind,
            time: time.max(self.now),
            payload,
        }
    }

    /// Applies one input event. Derived events and effects accumulate for the take methods.
    /// Inputs after the run ended are accepted and change nothing.
    pub fn apply(&mut self, event: &NewEvent) -> Result<(), EngineError> {
        if !is_input(event) || event.kind == EventKind::RunCreated {
            return Err(bad(event.kind, "not an input event of a running engine"));
        }
        self.finish_pump();
        let before = self.now;
        if !self.enter_input(event.time) {
            return Ok(());
        }
        let call = || {
            event
                .payload
                .get("call")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad(event.kind, "no call number"))
        };
        let failure = || -> (ErrorClass, String) {
            let class = event
                .payload
                .get("class")
                .and_then(|c| serde_json::from_value(c.clone()).ok())
                .unwrap_or(ErrorClass::Internal);
            let message = event
                .payload
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            (class, message)
        };
        match event.kind {
            EventKind::ToolCompleted => {
                let output = event.payload.get("output").cloned().unwrap_or(Value::Null);
                self.on_tool_result(call()?, Ok(output));
            }
            EventKind::ToolFailed => self.on_tool_result(call()?, Err(failure())),
            EventKind::ModelCompleted => {
                let response = ModelResponse::deserialize(
                    event.payload.get("response").unwrap_or(&Value::Null),
                )
                .map_err(|e| bad(event.kind, format!("bad response: {e}")))?;
                self.on_model_result(call()?, Ok(response));
            }
            EventKind::ModelFailed => self.on_model_result(call()?, Err(failure())),
            EventKind::ClockObserved => self.on_tick(),
            EventKind::TaskPaused => {
                // From when the call began to wait, if that was before this event (and not
                // before the attempt's clock last started: see `call_waits`).
                let since = event
                    .payload
                    .get("since")
                    .and_then(|v| Timestamp::deserialize(v).ok())
                    .map_or(self.now, |since| since.min(self.now));
                self.call_waits(call()?, since);
            }
            EventKind::TaskUnpaused => {
                let call = call()?;
                if let Some(info) = self.calls.get_mut(&call)
                    && std::mem::take(&mut info.waiting)
                {
                    let task = info.task;
                    self.wait_ended(task);
                }
            }
            EventKind::RunResumed => {
                let unstarted: std::collections::BTreeSet<u64> = event
                    .payload
                    .get("unstarted_calls")
                    .and_then(Value::as_array)
                    .map(|calls| calls.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default();
                // Which attempts were in flight is decided for all before any fails: failing
                // one frees its slots, which starts calls of attempts that were waiting.
                let (in_flight, kept): (Vec<u32>, Vec<u32>) = (0..self.tasks.len() as u32)
                    .filter(|&i| self.tasks[i as usize].status == TaskStatus::Running)
                    .partition(|&i| !self.only_unstarted_calls(i, &unstarted));
                // The others go on, their calls made now: the time the process was gone (since
                // the last input it recorded) does not count against their timeouts.
                // From the last time the log knew of before the process stopped: `since`, as
                // the resume recorded it (requests it applied first moved the clock on), else
                // the input before this one.
                let since = event
                    .payload
                    .get("since")
                    .and_then(|v| Timestamp::deserialize(v).ok())
                    .unwrap_or(before);
                let gone = self.now.saturating_duration_since(since);
                for i in kept {
                    self.move_deadline(i, gone);
                }
                for i in in_flight {
                    self.attempt_failed(
                        i,
                        ErrorClass::Interrupted,
                        "the process stopped while this attempt was in flight".into(),
                    );
                }
            }
            EventKind::RunCancelled => {
                let reason = event
                    .payload
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("cancelled")
                    .to_string();
                self.failure = Some(crate::state::run_cancelled_text(&reason, &event.actor));
                self.end_run(RunStatus::Cancelled, &reason);
            }
            EventKind::TaskCancelled => {
                let task = event
                    .payload
                    .get("task")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let idx = self
                    .index_of(task)
                    .ok_or_else(|| bad(event.kind, format!("unknown task {task}")))?;
                let reason = event.payload.get("reason").and_then(Value::as_str);
                self.cancel_subtree(idx, reason);
            }
            _ => {}
        }
        self.settle();
        Ok(())
    }

    /// Whether every call the running attempt of `task` has started is one of `unstarted`, or
    /// it has started none (its call waits for a slot): then nothing of the attempt is in
    /// flight, whatever its earlier calls did (their results are in the log).
    fn only_unstarted_calls(&self, task: u32, unstarted: &std::collections::BTreeSet<u64>) -> bool {
        self.tasks[task as usize].running.is_some()
            && self
                .running_calls(task)
                .filter(|(_, info)| info.started)
                .all(|(c, _)| unstarted.contains(&c))
    }

    /// The calls of the running attempt of `task` that the engine still tracks, with what it
    /// knows of each; none when no attempt runs.
    fn running_calls(&self, task: u32) -> impl Iterator<Item = (u64, &CallInfo)> + '_ {
        self.tasks[task as usize]
            .running
            .into_iter()
            .flat_map(move |slot| &self.attempts[slot as usize].calls)
            .filter_map(move |&c| self.calls.get(&c).map(|info| (c, info)))
    }

    /// What every applied input does last: start what can start, end the run if it is done.
    fn settle(&mut self) {
        self.pump();
        if !self.pump_unfinished {
            self.check_done();
        }
    }

    // ---- dispatch ----------------------------------------------------------------------

    fn key(&self, idx: u32) -> Key {
        let spec = &self.graph.tasks[idx as usize];
        Key::new(spec.priority, self.tasks[idx as usize].rank, &spec.id, idx)
    }

    fn make_ready(&mut self, idx: u32) {
        self.tasks[idx as usize].status = TaskStatus::Ready;
        let k = self.key(idx);
        self.ready.push(Reverse(k));
    }

    /// Starts ready tasks while slots allow, in ready-set order.
    fn pump(&mut self) {
        self.pump_unfinished = false;
        let mut budget = self.pump_step.unwrap_or(u32::MAX);
        while self.status == RunStatus::Running && self.running < self.graph.limits.concurrency {
            if budget == 0 {
                // Only if something is left to look at: a pump that ends exactly at its step
                // is finished.
                self.pump_unfinished = !self.ready.is_empty();
                break;
            }
            let Some(Reverse(key)) = self.ready.pop() else {
                break;
            };
            let idx = key.idx;
            if self.tasks[idx as usize].status != TaskStatus::Ready {
                continue;
            }
            // An agent task needs a place with its agent; a tool step, with its tool if limited.
            let slot = match self.tasks[idx as usize].agent {
                Some(a) => Some(&mut self.agents[a as usize].slot),
                None => self.graph.tasks[idx as usize]
                    .tool
                    .as_deref()
                    .and_then(|tool| self.tool_slots.get_mut(tool)),
            };
            if let Some(slot) = slot
                && slot.full()
            {
                self.tasks[idx as usize].status = TaskStatus::Blocked;
                slot.waiting.push(Reverse(Waiter {
                    key,
                    what: WaiterRef::Task(idx),
                }));
                continue;
            }
            self.start_attempt(idx);
            budget -= 1;
        }
    }

    fn start_attempt(&mut self, idx: u32) {
        self.decisions += 1;
        self.running += 1;
        let slot = match self.free_attempts.pop() {
            Some(slot) => slot,
            None => {
                self.attempts.push(Attempt::default());
                self.attempts.len() as u32 - 1
            }
        };
        let t = &mut self.tasks[idx as usize];
        t.running = Some(slot);
        t.status = TaskStatus::Running;
        t.attempt += 1;
        let attempt = t.attempt;
        let timeout = self.graph.tasks[idx as usize].timeout;
        let (task_id, agent) = (t.task_id, t.agent);
        let actor = self.actor_of(agent);
        if let Some(a) = agent {
            self.agents[a as usize].slot.used += 1;
        }
        self.emit_object(Some(task_id), actor, EventKind::TaskStarted, |o| {
            o.u64("attempt", attempt.into());
        });
        let deadline = timeout.map(|d| self.now.saturating_add(d));
        let a = &mut self.attempts[slot as usize];
        a.deadline = deadline;
        a.clock_from = self.now;
        if let Some(at) = deadline {
            self.push_timer(at, Timer::Timeout { task: idx, attempt });
        }
        let t = &self.tasks[idx as usize];
        if let Some(a) = t.agent {
            let agent = &self.agents[a as usize];
            let spec = &self.graph.tasks[idx as usize];
            let prompt =
                template::render_text(spec.prompt.as_deref().unwrap_or(""), &KeptOutputs(self));
            let system = (!agent.instructions.is_empty())
                .then(|| Message::new(Role::System, agent.instructions.clone()));
            let attempt = &mut self.attempts[slot as usize];
            let mut messages = attempt.spare_messages.take().unwrap_or_default();
            // The spare is empty and not shared: `make_mut` copies nothing.
            let conversation = Arc::make_mut(&mut messages);
            conversation.extend(system);
            conversation.push(Message::new(Role::User, prompt));
            attempt.agent = Some(AgentRun { messages, turns: 0 });
            self.request_model(idx);
        } else {
            let spec = &self.graph.tasks[idx as usize];
            let tool = spec.tool.clone().unwrap_or_default();
            let args = template::render(
                spec.args.as_ref().unwrap_or(&Value::Null),
                &KeptOutputs(self),
            );
            let size = agent_runtime_core::canonical::json_size(&args);
            if size > MAX_RENDERED_ARGS_BYTES {
                let message = format!(
                    "its arguments, rendered from upstream outputs, are {size} bytes of JSON, \
                     over the {MAX_RENDERED_ARGS_BYTES} a call's arguments may have"
                );
                self.attempt_failed(idx, ErrorClass::InvalidArguments, message);
                return;
            }
            let call = self.new_call(
                idx,
                CallKind::Tool,
                Some(tool.clone()).filter(|k| self.tool_slots.contains_key(k)),
                Some(ToolRequest {
                    tool,
                    args,
                    tool_call_id: None,
                }),
            );
            // The slot was checked in pump.
            self.start_call(call);
        }
    }

    /// Who acts for a task: its agent, or the system for a direct tool step.
    fn actor_of(&self, agent: Option<u32>) -> Actor {
        agent.map_or(Actor::System, |a| {
            Actor::Agent(String::from(&*self.agents[a as usize].name))
        })
    }

    fn new_call(
        &mut self,
        task: u32,
        kind: CallKind,
        resource: Option<String>,
        request: Option<ToolRequest>,
    ) -> u64 {
        let call = self.next_call;
        self.next_call += 1;
        self.calls.insert(
            call,
            CallInfo {
                task,
                kind,
                started: false,
                resource,
                request: request.map(Box::new),
                waiting: false,
            },
        );
        if let Some(attempt) = self.attempt_mut(task) {
            attempt.calls.push(call);
        }
        call
    }

    /// `task.paused` for `call`: its attempt's clock stands still from now until every call
    /// of it that waits for a person has stopped. A call not in flight (answered meanwhile)
    /// changes nothing.
    fn call_waits(&mut self, call: u64, since: Timestamp) {
        let Some(task) = self
            .calls
            .get(&call)
            .filter(|c| c.started && !c.waiting)
            .map(|c| c.task)
        else {
            return;
        };
        let first = !self.attempt_waits(task);
        if let Some(info) = self.calls.get_mut(&call) {
            info.waiting = true;
        }
        if first && let Some(a) = self.attempt_mut(task) {
            a.waiting_since = since.max(a.clock_from);
        }
    }

    /// Whether a call of the running attempt of `task` waits for a person: its clock stands
    /// still then. Counted from the calls (an attempt has few) rather than kept in step.
    fn attempt_waits(&self, task: u32) -> bool {
        self.running_calls(task).any(|(_, info)| info.waiting)
    }

    /// Moves the deadline of the running attempt of `task` (if it has one) `by` later.
    fn move_deadline(&mut self, task: u32, by: Duration) {
        let attempt = self.tasks[task as usize].attempt;
        let Some(a) = self.attempt_mut(task) else {
            return;
        };
        let Some(deadline) = a.deadline else {
            return;
        };
        let at = deadline.saturating_add(by);
        a.deadline = Some(at);
        self.push_timer(at, Timer::Timeout { task, attempt });
    }

    /// One call of `task`'s attempt stopped waiting for a person (its `waiting` is cleared,
    /// or it is gone); when none waits any more, the attempt's deadline moves back by the time
    /// its clock stood still.
    fn wait_ended(&mut self, task: u32) {
        let now = self.now;
        if self.attempt_waits(task) {
            return;
        }
        let Some(a) = self.attempt_mut(task) else {
            return;
        };
        let waited = now.saturating_duration_since(a.waiting_since);
        a.clock_from = now;
        self.move_deadline(task, waited);
    }

    /// The running attempt of a task.
    fn attempt_mut(&mut self, task: u32) -> Option<&mut Attempt> {
        let slot = self.tasks[task as usize].running?;
        Some(&mut self.attempts[slot as usize])
    }

    /// The conversation of a running agent task.
    fn agent_run(&self, task: u32) -> Option<&AgentRun> {
        let slot = self.tasks[task as usize].running?;
        self.attempts[slot as usize].agent.as_ref()
    }

    /// [`Engine::agent_run`], to add to.
    fn agent_run_mut(&mut self, task: u32) -> Option<&mut AgentRun> {
        self.attempt_mut(task)?.agent.as_mut()
    }

    fn slot_of(&mut self, kind: CallKind, resource: &str) -> Option<&mut Slot> {
        match kind {
            CallKind::Tool => self.tool_slots.get_mut(resource),
            CallKind::Model => self.provider_slots.get_mut(resource),
        }
    }

    /// Starts `call` now if its resource has room, or queues it.
    fn start_or_queue(&mut self, call: u64) {
        let Some(info) = self.calls.get(&call) else {
            return;
        };
        let (kind, task) = (info.kind, info.task);
        if let Some(res) = info.resource.clone() {
            let key = self.key(task);
            if let Some(slot) = self.slot_of(kind, &res)
                && slot.full()
            {
                slot.waiting.push(Reverse(Waiter {
                    key,
                    what: WaiterRef::Call(call),
                }));
                return;
            }
        }
        self.start_call(call);
    }

    fn start_call(&mut self, call: u64) {
        let Some(info) = self.calls.get_mut(&call) else {
            return;
        };
        info.started = true;
        let (kind, task, resource) = (info.kind, info.task, info.resource.clone());
        let (tool, args) = match info.request.as_deref_mut() {
            Some(r) => (std::mem::take(&mut r.tool), std::mem::take(&mut r.args)),
            None => (String::new(), Value::Null),
        };
        if let Some(res) = resource
            && let Some(slot) = self.slot_of(kind, &res)
        {
            slot.used += 1;
        }
        self.decisions += 1;
        let t = &self.tasks[task as usize];
        let timeout = self.graph.tasks[task as usize].timeout;
        // Made for the effect: most tasks make one call, and a task's state holds no string.
        let (task_id, name) = (t.task_id, Arc::<str>::from(self.name(task)));
        match kind {
            CallKind::Tool => {
                // Only a tool step the graph declares may name secrets: an agent's call takes
                // its arguments from the model.
                let secret_args = match (t.agent, &self.graph.tasks[task as usize].args) {
                    (None, Some(declared)) if crate::template::names_secrets(declared) => {
                        Some(Arc::new(declared.clone()))
                    }
                    _ => None,
                };
                let actor = self.actor_of(t.agent);
                self.emit_object(
                    Some(task_id),
                    actor.clone(),
                    EventKind::ToolRequested,
                    |o| {
                        o.value("args", &args).u64("call", call).str("tool", &tool);
                    },
                );
                self.push_effect(Effect::CallTool {
                    call,
                    task_id,
                    task: name,
                    actor,
                    tool,
                    args,
                    secret_args,
                    timeout,
                });
            }
            CallKind::Model => {
                let Some(a) = t.agent else { return };
                let Some(live) = self.agent_run(task) else {
                    return;
                };
                let agent = &self.agents[a as usize];
                let tools = agent.tools.clone();
                let (messages, turn) = (live.messages.len() as u64, u64::from(live.turns) + 1);
                let effect = Effect::CallModel {
                    call,
                    task_id,
                    task: name,
                    agent: agent.name.clone(),
                    provider: agent.provider.clone(),
                    model: agent.model.clone(),
                    messages: Arc::clone(&live.messages),
                    tools,
                    timeout,
                };
                let actor = Actor::Agent(String::from(&*agent.name));
                let (model, provider) = (Arc::clone(&agent.model), Arc::clone(&agent.provider));
                self.emit_object(Some(task_id), actor, EventKind::ModelRequested, |o| {
                    o.u64("call", call)
                        .u64("messages", messages)
                        .str("model", &model)
                        .str("provider", &provider)
                        .u64("turn", turn);
                });
                self.push_effect(effect);
            }
        }
    }

    /// Ends a call: frees its slot and lets the best waiter in.
    fn end_call(&mut self, call: u64, cancel: bool) -> Option<CallInfo> {
        let info = self.calls.remove(&call)?;
        // Its `task.unpaused`, if it comes, finds no call: its wait ends here.
        if info.waiting {
            self.wait_ended(info.task);
        }
        if let Some(attempt) = self.attempt_mut(info.task) {
            attempt.calls.retain(|&c| c != call);
        }
        if cancel && info.started {
            self.push_effect(Effect::Cancel { call });
        }
        if info.started
            && let Some(res) = info.resource.clone()
        {
            self.release(info.kind, &res);
        }
        Some(info)
    }

    fn release(&mut self, kind: CallKind, res: &str) {
        let Some(slot) = self.slot_of(kind, res) else {
            return;
        };
        slot.used = slot.used.saturating_sub(1);
        self.admit(kind, res);
    }

    /// Lets waiters of a slot in while it has room.
    fn admit(&mut self, kind: CallKind, res: &str) {
        loop {
            let Some(slot) = self.slot_of(kind, res) else {
                return;
            };
            if slot.full() {
                return;
            }
            let Some(Reverse(w)) = slot.waiting.pop() else {
                return;
            };
            match w.what {
                WaiterRef::Task(idx) => {
                    if self.tasks[idx as usize].status == TaskStatus::Blocked {
                        self.make_ready(idx);
                        return;
                    }
                }
                WaiterRef::Call(call) => {
                    if self.calls.get(&call).is_some_and(|c| !c.started) {
                        self.start_call(call);
                    }
                }
            }
        }
    }

    /// A ready task leaves without starting (cancelled, skipped): a slot that [`Engine::admit`]
    /// or [`Engine::admit_agent`] let it in for goes to the next waiter. (Nobody else would
    /// offer it: slots are offered when they are released, and the run stalled with tasks
    /// blocked behind a free slot.)
    fn pass_on_slots(&mut self, idx: u32) {
        match self.tasks[idx as usize].agent {
            Some(a) => self.admit_agent(a),
            None => {
                if let Some(tool) = self.graph.tasks[idx as usize].tool.clone() {
                    self.admit(CallKind::Tool, &tool);
                }
            }
        }
    }

    fn admit_agent(&mut self, a: u32) {
        loop {
            let slot = &mut self.agents[a as usize].slot;
            if slot.full() {
                return;
            }
            let Some(Reverse(w)) = slot.waiting.pop() else {
                return;
            };
            if let WaiterRef::Task(idx) = w.what
                && self.tasks[idx as usize].status == TaskStatus::Blocked
            {
                self.make_ready(idx);
                return;
            }
        }
    }

    fn request_model(&mut self, idx: u32) {
        let Some(a) = self.tasks[idx as usize].agent else {
            return;
        };
        let budget = &self.graph.limits.budget;
        let spent = if let Some(max) = budget.model_calls
            && self.model_calls >= max
        {
            Some(format!("the run's budget of {max} model calls is spent"))
        } else if let Some(max) = budget.tokens
            && self.tokens >= max
        {
            // Checked before the call too, not only after: once spent, no further (paid) call
            // is made by tasks whose failure policy lets the run go on.
            Some(format!("the run's budget of {max} tokens is spent"))
        } else {
            None
        };
        if let Some(why) = spent {
            self.attempt_failed(idx, ErrorClass::BudgetExceeded, why);
            return;
        }
        self.model_calls += 1;
        let provider = &self.agents[a as usize].provider;
        let res = self
            .provider_slots
            .contains_key(&**provider)
            .then(|| String::from(&**provider));
        let call = self.new_call(idx, CallKind::Model, res, None);
        self.start_or_queue(call);
    }

    /// Ends the running attempt of a task: frees its slots and abandons its calls.
    fn end_attempt(&mut self, idx: u32) {
        if let Some(slot) = self.tasks[idx as usize].running {
            let mut calls = std::mem::take(&mut self.attempts[slot as usize].calls);
            // The slot stays the task's until its calls are ended: ending one can start another
            // call waiting for the same resource, and that call reads the conversation. Its own
            // calls not yet started end first (they hold no slot): a started one's slot would
            // otherwise start one of them, recorded as requested, made and cancelled at once.
            calls.sort_by_key(|c| self.calls.get(c).is_some_and(|info| info.started));
            for &c in &calls {
                self.end_call(c, true);
            }
            calls.clear();
            let attempt = &mut self.attempts[slot as usize];
            attempt.calls = calls;
            if let Some(mut run) = attempt.agent.take()
                && let Some(conversation) = Arc::get_mut(&mut run.messages)
            {
                conversation.clear();
                attempt.spare_messages = Some(run.messages);
            }
            self.tasks[idx as usize].running = None;
            self.free_attempts.push(slot);
        }
        if self.tasks[idx as usize].status == TaskStatus::Running {
            // A transitional state: the caller sets where the task goes next.
            self.tasks[idx as usize].status = TaskStatus::Pending;
            self.running = self.running.saturating_sub(1);
            if let Some(a) = self.tasks[idx as usize].agent {
                let slot = &mut self.agents[a as usize].slot;
                slot.used = slot.used.saturating_sub(1);
                self.admit_agent(a);
            }
        }
    }

    // ---- results -----------------------------------------------------------------------

    /// Ends `call` and returns it if its task is still running (a result for a call that was
    /// cancelled, or whose task moved on, is dropped).
    fn end_live_call(&mut self, call: u64) -> Option<CallInfo> {
        let info = self.end_call(call, false)?;
        (self.tasks[info.task as usize].status == TaskStatus::Running).then_some(info)
    }

    fn on_tool_result(&mut self, call: u64, result: Result<Value, (ErrorClass, String)>) {
        let Some(info) = self.end_live_call(call) else {
            return;
        };
        let idx = info.task;
        if self.tasks[idx as usize].agent.is_none() {
            match result {
                Ok(v) => self.complete(idx, Output::Value(v), false),
                Err((class, message)) => self.attempt_failed(idx, class, message),
            }
            return;
        }
        let content = match &result {
            Ok(Value::String(s)) => s.clone(),
            // What `Display` writes, through a byte writer instead of the formatting machinery
            // (a tenth of the driver's work per tool result went to it).
            Ok(v) => serde_json::to_string(v).unwrap_or_default(),
            Err((class, message)) => format!("error ({class}): {message}"),
        };
        let mut msg = Message::new(Role::Tool, content);
        msg.tool_call_id = info.request.and_then(|r| r.tool_call_id);
        if let Some(attempt) = self.attempt_mut(idx)
            && let Some(live) = attempt.agent.as_mut()
        {
            Arc::make_mut(&mut live.messages).push(msg);
            // The call left `calls` as it ended: the model is asked again once none is left.
            if attempt.calls.is_empty() {
                self.request_model(idx);
            }
        }
    }

    fn on_model_result(&mut self, call: u64, result: Result<ModelResponse, (ErrorClass, String)>) {
        let Some(info) = self.end_live_call(call) else {
            return;
        };
        let idx = info.task;
        let response = match result {
            Ok(r) => r,
            Err((class, message)) => return self.attempt_failed(idx, class, message),
        };
        self.tokens = self
            .tokens
            .saturating_add(response.usage.input_tokens)
            .saturating_add(response.usage.output_tokens);
        if let Some(max) = self.graph.limits.budget.tokens
            && self.tokens > max
        {
            return self.attempt_failed(
                idx,
                ErrorClass::BudgetExceeded,
                format!("the run's budget of {max} tokens is spent"),
            );
        }
        let Some(a) = self.tasks[idx as usize].agent else {
            return;
        };
        let max_turns = self.agents[a as usize].max_turns;
        let message = response.message;
        let turns = {
            let Some(live) = self.agent_run_mut(idx) else {
                return;
            };
            live.turns += 1;
            live.turns
        };
        if message.tool_calls.is_empty() {
            // A final answer ends the attempt and its conversation: the message need not join
            // it, and its text moves into the output.
            let output = Output::Answer {
                text: message.content,
                turns,
            };
            return self.complete(idx, output, false);
        }
        let calls = message.tool_calls.clone();
        if let Some(live) = self.agent_run_mut(idx) {
            Arc::make_mut(&mut live.messages).push(message);
        }
        let allowed = self.agents[a as usize].tools.clone();
        if turns >= max_turns {
            return self.attempt_failed(
                idx,
                ErrorClass::BudgetExceeded,
                format!("the agent used its {max_turns} turns without a final answer"),
            );
        }
        for tc in calls {
            if !allowed.iter().any(|t| t == &tc.name) {
                let mut m = Message::new(
                    Role::Tool,
                    format!(
                        "error (policy_denied): tool `{}` is not allowed for this agent",
                        tc.name
                    ),
                );
                m.tool_call_id = Some(tc.id);
                if let Some(live) = self.agent_run_mut(idx) {
                    Arc::make_mut(&mut live.messages).push(m);
                }
                continue;
            }
            if tc.name == SPAWN_TOOL {
                let reply = match self.spawn(idx, &tc.arguments) {
                    Ok(id) => json!({"spawned": id}).to_string(),
                    Err(e) => format!("error (invalid_arguments): {e}"),
                };
                let mut m = Message::new(Role::Tool, reply);
                m.tool_call_id = Some(tc.id);
                if let Some(live) = self.agent_run_mut(idx) {
                    Arc::make_mut(&mut live.messages).push(m);
                }
                continue;
            }
            let res = Some(tc.name.clone()).filter(|k| self.tool_slots.contains_key(k));
            let request = ToolRequest {
                tool: tc.name,
                args: tc.arguments,
                tool_call_id: Some(tc.id),
            };
            let call = self.new_call(idx, CallKind::Tool, res, Some(request));
            self.start_or_queue(call);
        }
        // Every tool call refused (or a spawn): nothing to wait for.
        if self.tasks[idx as usize].status == TaskStatus::Running
            && self
                .attempt_mut(idx)
                .is_some_and(|a| a.agent.is_some() && a.calls.is_empty())
        {
            self.request_model(idx);
        }
    }

    /// Adds a sub-task spawned by the agent task `parent`.
    fn spawn(&mut self, parent: u32, args: &Value) -> Result<String, String> {
        let limits = &self.graph.limits;
        if self.tasks.len() as u64 >= u64::from(limits.max_tasks) {
            return Err(format!(
                "the run already has max_tasks = {} tasks",
                limits.max_tasks
            ));
        }
        let depth = self.lineage.get(&parent).map_or(0, |l| l.depth) + 1;
        if depth > limits.max_spawn_depth {
            return Err(format!(
                "spawn depth {depth} exceeds max_spawn_depth = {}",
                limits.max_spawn_depth
            ));
        }
        let prompt = args
            .get("prompt")
            .and_then(Value::as_str)
            .ok_or("spawn_task needs a `prompt` string")?;
        let agent = match args.get("agent").and_then(Value::as_str) {
            Some(a) => a.to_string(),
            None => self.graph.tasks[parent as usize]
                .agent
                .clone()
                .unwrap_or_default(),
        };
        let Some(&ai) = self.agent_index.get(&agent) else {
            return Err(format!(
                "unknown agent `{agent}`{}",
                crate::graph::suggestion(&agent, self.agent_index.keys().map(String::as_str))
            ));
        };
        let p = &self.tasks[parent as usize];
        let siblings = self.lineage.get(&parent).map_or(0, |l| l.children.len());
        let id = format!("{}.{}", self.name(parent), siblings + 1);
        let rank = p.rank + 1;
        let ps = &self.graph.tasks[parent as usize];
        let spec = TaskSpec {
            id: id.clone(),
            agent: Some(agent.clone()),
            prompt: Some(prompt.to_string()),
            tool: None,
            args: None,
            needs: Vec::new(),
            priority: ps.priority,
            timeout: ps.timeout,
            retry: ps.retry.clone(),
            on_failure: OnFailure::Skip,
        };
        self.clock.set(self.now);
        let task_id = self.ids.task_id();
        let idx = self.tasks.len() as u32;
        // The indexes, when built, take the task in; otherwise they will find it when built.
        if let Some(by_id) = self.by_id.get_mut() {
            by_id.insert(id.clone(), idx);
        }
        if let Some(by_task_id) = self.by_task_id.get_mut() {
            by_task_id.insert(task_id, idx);
        }
        self.lineage.entry(parent).or_default().children.push(idx);
        self.lineage.insert(
            idx,
            Lineage {
                depth,
                children: Vec::new(),
            },
        );
        self.graph.tasks.push(spec);
        self.tasks.push(TaskState {
            task_id,
            waiting_on: 0,
            rank,
            attempt: 0,
            agent: Some(ai),
            running: None,
            status: TaskStatus::Pending,
            keeps_output: true,
        });
        self.open += 1;
        let parent_id = self.name(parent).to_string();
        self.emit(
            Some(task_id),
            Actor::Agent(agent.clone()),
            EventKind::TaskSpawned,
            json!({"task": id, "parent": parent_id, "agent": agent, "prompt": prompt, "depth": depth}),
        );
        self.make_ready(idx);
        Ok(id)
    }

    fn on_tick(&mut self) {
        while let Some(Reverse((at, _, timer))) = self.timers.peek().cloned() {
            if at > self.now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Retry { task, attempt } => {
                    let t = &self.tasks[task as usize];
                    if t.status == TaskStatus::WaitingRetry && t.attempt == attempt {
                        self.make_ready(task);
                    }
                }
                Timer::Timeout { task, attempt } => {
                    // A deadline pushed back by a wait for a person has a timer of its own.
                    if self
                        .timeout_due_at(task, attempt)
                        .is_some_and(|due| due <= self.now)
                    {
                        let d = self.graph.tasks[task as usize].timeout.unwrap_or_default();
                        self.attempt_failed(
                            task,
                            ErrorClass::Timeout,
                            format!(
                                "attempt {attempt} timed out after {}",
                                humantime::format_duration(d)
                            ),
                        );
                    }
                }
            }
        }
    }

    fn push_timer(&mut self, at: Timestamp, timer: Timer) {
        self.timer_seq += 1;
        self.timers.push(Reverse((at, self.timer_seq, timer)));
    }

    // ---- outcomes ----------------------------------------------------------------------

    /// Completes `idx`, then each task waiting for it as its fallback, depth first (an owner's
    /// own owners before the next owner). Iterative: a chain of twenty thousand fallbacks
    /// overflowed the stack when this recursed.
    fn complete(&mut self, idx: u32, output: Output, substituted: bool) {
        let owners = self.complete_one(idx, output, substituted);
        // Most tasks stand in for none: no stack for them.
        if owners.is_empty() {
            return;
        }
        let mut stack = vec![(idx, owners.into_iter())];
        while let Some((source, owners)) = stack.last_mut() {
            let source = *source;
            let Some(o) = owners.next() else {
                stack.pop();
                continue;
            };
            if self.tasks[o as usize].status == TaskStatus::AwaitingFallback {
                // Kept by `complete_one`: a task with fallback owners keeps its output.
                let out = self.outputs.get(&source).cloned();
                let next = self.complete_one(o, out.unwrap_or(Output::Value(Value::Null)), true);
                stack.push((o, next.into_iter()));
            }
        }
    }

    /// Completes `idx` alone; returns the tasks waiting for it as their fallback.
    fn complete_one(&mut self, idx: u32, output: Output, substituted: bool) -> Vec<u32> {
        self.end_attempt(idx);
        let t = &mut self.tasks[idx as usize];
        let was_open = !t.status.is_terminal() && t.status != TaskStatus::Held;
        t.status = TaskStatus::Completed;
        let (task_id, attempt) = (t.task_id, t.attempt);
        let owners = self.fallback_owners.remove(&idx).unwrap_or_default();
        let keep = t.keeps_output || !owners.is_empty();
        self.emit_object(
            Some(task_id),
            Actor::System,
            EventKind::TaskCompleted,
            |o| {
                o.u64("attempt", attempt.into());
                output.write(o.member("output"));
                if substituted {
                    o.bool("substituted", true);
                }
            },
        );
        if keep {
            self.outputs.insert(idx, output);
        }
        if was_open {
            self.open = self.open.saturating_sub(1);
        }
        // `make_ready` leaves `dependents` alone: walk it in place rather than copy it.
        let rank = self.tasks[idx as usize].rank;
        for j in 0..self.dependents.get(idx as usize).len() {
            let d = self.dependents.get(idx as usize)[j];
            let t = &mut self.tasks[d as usize];
            t.rank = t.rank.max(rank + 1);
            t.waiting_on = t.waiting_on.saturating_sub(1);
            if t.waiting_on == 0 && t.status == TaskStatus::Pending {
                self.make_ready(d);
            }
        }
        owners
    }

    fn attempt_failed(&mut self, idx: u32, class: ErrorClass, message: String) {
        self.end_attempt(idx);
        let t = &self.tasks[idx as usize];
        let (task_id, attempt) = (t.task_id, t.attempt);
        self.emit(
            Some(task_id),
            Actor::System,
            EventKind::TaskFailed,
            json!({"attempt": attempt, "class": class, "message": message}),
        );
        let policy = self.graph.tasks[idx as usize].retry.clone();
        if let Some(p) = policy
            && p.on.contains(&class)
            && attempt < p.max_attempts
        {
            let delay = self.backoff(&p, attempt, task_id);
            let at = self.now.saturating_add(delay);
            self.tasks[idx as usize].status = TaskStatus::WaitingRetry;
            self.decisions += 1;
            self.emit(
                Some(task_id),
                Actor::System,
                EventKind::TaskRetryScheduled,
                json!({"attempt": attempt + 1,
                       "delay_ms": u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                       "class": class}),
            );
            self.push_timer(at, Timer::Retry { task: idx, attempt });
            return;
        }
        self.failed_for_good(idx, class, message);
    }

    /// `min(backoff * 2^(attempt-1), max_backoff) * (1 + jitter * u)`, `u` uniform in
    /// `[-1, 1)`, drawn from the run's random source and recorded.
    fn backoff(&mut self, p: &RetryPolicy, attempt: u32, task_id: TaskId) -> Duration {
        // Doubled `attempt - 1` times, or until it reaches `max_backoff` (or `Duration::MAX`,
        // within 94 doublings of a nanosecond).
        let mut base = p.backoff;
        for _ in 1..attempt {
            if base >= p.max_backoff || base.is_zero() {
                break;
            }
            base = base.saturating_mul(2);
        }
        let base = base.min(p.max_backoff);
        if p.jitter <= 0.0 || base.is_zero() {
            return base;
        }
        let draw = self.rng.next_u64();
        self.emit(
            Some(task_id),
            Actor::System,
            EventKind::RandomDrawn,
            json!({"purpose": "retry_jitter", "value": draw}),
        );
        let u = (draw >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
        // `mul_f64` panics past `Duration::MAX`, which a huge backoff with jitter reaches.
        Duration::try_from_secs_f64(base.as_secs_f64() * (1.0 + p.jitter * u).max(0.0))
            .unwrap_or(Duration::MAX)
    }

    fn failed_for_good(&mut self, idx: u32, class: ErrorClass, message: String) {
        let policy = self.graph.tasks[idx as usize].on_failure.clone();
        match policy {
            OnFailure::FailRun => {
                self.tasks[idx as usize].status = TaskStatus::Failed;
                self.open = self.open.saturating_sub(1);
                let id = self.name(idx).to_string();
                self.fail_run(&id, class, &message);
            }
            OnFailure::Skip => self.skip(idx, "failed; on_failure: skip".into()),
            OnFailure::ContinueWith(v) => self.complete(idx, Output::Value(v), true),
            OnFailure::Fallback(f) => {
                let Some(fi) = self.index_of(&f) else {
                    return self.fail_run(&f, ErrorClass::Internal, "fallback task vanished");
                };
                self.tasks[idx as usize].status = TaskStatus::AwaitingFallback;
                let ft = &self.tasks[fi as usize];
                match ft.status {
                    TaskStatus::Completed => {
                        let out = self.outputs.get(&fi).cloned();
                        self.complete(idx, out.unwrap_or(Output::Value(Value::Null)), true);
                    }
                    TaskStatus::Skipped | TaskStatus::Cancelled | TaskStatus::Failed => {
                        self.skip(
                            idx,
                            format!("failed and its fallback `{f}` did not complete"),
                        );
                    }
                    TaskStatus::Held => {
                        self.fallback_owners.entry(fi).or_default().push(idx);
                        self.tasks[fi as usize].status = TaskStatus::Pending;
                        self.open += 1;
                        if self.tasks[fi as usize].waiting_on == 0 {
                            self.make_ready(fi);
                        }
                    }
                    _ => self.fallback_owners.entry(fi).or_default().push(idx),
                }
            }
        }
    }

    fn skip(&mut self, idx: u32, reason: String) {
        let mut stack = vec![(idx, reason)];
        while let Some((i, reason)) = stack.pop() {
            let t = &mut self.tasks[i as usize];
            if t.status.is_terminal() {
                continue;
            }
            let was_open = t.status != TaskStatus::Held;
            let was_ready = t.status == TaskStatus::Ready;
            if t.status == TaskStatus::Running {
                self.end_attempt(i);
            }
            self.tasks[i as usize].status = TaskStatus::Skipped;
            let task_id = self.tasks[i as usize].task_id;
            let name = self.graph.tasks[i as usize].id.clone();
            if was_open {
                self.open = self.open.saturating_sub(1);
            }
            self.emit(
                Some(task_id),
                Actor::System,
                EventKind::TaskSkipped,
                json!({"reason": reason}),
            );
            if was_ready {
                self.pass_on_slots(i);
            }
            let mut next: Vec<u32> = self.dependents.get(i as usize).to_vec();
            next.extend(self.fallback_owners.remove(&i).unwrap_or_default());
            // Reverse so that the stack visits them in declaration order.
            for d in next.into_iter().rev() {
                stack.push((d, format!("upstream task `{name}` was skipped")));
            }
        }
    }

    fn cancel_subtree(&mut self, root: u32, reason: Option<&str>) {
        let mut seen = std::collections::BTreeSet::new();
        let mut stack = vec![root];
        while let Some(i) = stack.pop() {
            if !seen.insert(i) {
                continue;
            }
            let children = self.lineage.get(&i).map_or(&[][..], |l| &l.children);
            let owners = self.fallback_owners.get(&i).map_or(&[][..], Vec::as_slice);
            for &d in self
                .dependents
                .get(i as usize)
                .iter()
                .chain(children)
                .chain(owners)
            {
                stack.push(d);
            }
        }
        let mut why = format!("cancelled with `{}` and its subtree", self.name(root));
        if let Some(reason) = reason {
            why = format!("{why}: {reason}");
        }
        for i in seen {
            self.cancel_task(i, &why);
        }
    }

    fn cancel_task(&mut self, i: u32, reason: &str) {
        let t = &self.tasks[i as usize];
        if t.status.is_terminal() {
            return;
        }
        let was_open = t.status != TaskStatus::Held;
        let was_ready = t.status == TaskStatus::Ready;
        self.end_attempt(i);
        self.tasks[i as usize].status = TaskStatus::Cancelled;
        let task_id = self.tasks[i as usize].task_id;
        if was_open {
            self.open = self.open.saturating_sub(1);
        }
        self.emit(
            Some(task_id),
            Actor::System,
            EventKind::TaskCancelled,
            json!({"reason": reason}),
        );
        if was_ready {
            self.pass_on_slots(i);
        }
    }

    fn fail_run(&mut self, task: &str, class: ErrorClass, message: &str) {
        self.failure = Some(crate::state::run_failed_text(task, class.as_str(), message));
        self.end_run(RunStatus::Failed, &format!("task `{task}` failed"));
        self.emit(
            None,
            Actor::System,
            EventKind::RunFailed,
            json!({"task": task, "class": class, "message": message}),
        );
    }

    /// Cancels everything still open; for failure and cancellation.
    fn end_run(&mut self, status: RunStatus, reason: &str) {
        for i in 0..self.tasks.len() as u32 {
            if matches!(self.tasks[i as usize].status, TaskStatus::Running) {
                self.cancel_task(i, reason);
            }
        }
        for i in 0..self.tasks.len() as u32 {
            let t = &mut self.tasks[i as usize];
            // A task waiting for its fallback has failed for good, as its last event says; the
            // run's end only means no fallback will stand in for it.
            if t.status == TaskStatus::AwaitingFallback {
                t.status = TaskStatus::Failed;
            } else if !t.status.is_terminal() {
                t.status = TaskStatus::Cancelled;
            }
        }
        self.status = status;
        self.timers.clear();
        self.ready.clear();
    }

    fn check_done(&mut self) {
        if self.status != RunStatus::Running || self.open > 0 {
            return;
        }
        for i in 0..self.tasks.len() as u32 {
            if self.tasks[i as usize].status == TaskStatus::Held {
                self.tasks[i as usize].status = TaskStatus::Skipped;
                let task_id = self.tasks[i as usize].task_id;
                self.emit(
                    Some(task_id),
                    Actor::System,
                    EventKind::TaskSkipped,
                    json!({"reason": "fallback not needed"}),
                );
            }
        }
        self.status = RunStatus::Completed;
        // In byte order of the names, as the payload lists them; a count of zero is left out.
        let mut counts = [
            ("cancelled", 0u64),
            ("completed", 0),
            ("other", 0),
            ("skipped", 0),
        ];
        for t in &self.tasks {
            let k = match t.status {
                TaskStatus::Cancelled => 0,
                TaskStatus::Completed => 1,
                TaskStatus::Skipped => 3,
                _ => 2,
            };
            counts[k].1 += 1;
        }
        // Written straight from the kept outputs: a run's final outputs can be thousands.
        let finals: Vec<u32> = self.final_tasks_by_id().collect();
        let event = EncodedEvent::with_object(
            self.run_id,
            None,
            Actor::System,
            EventKind::RunCompleted,
            self.now,
            |o| {
                o.entries(
                    "outputs",
                    finals
                        .iter()
                        .filter_map(|&i| Some((self.name(i), self.outputs.get(&i)?))),
                    |slot, output| output.write(slot),
                )
                .entries(
                    "tasks",
                    counts.iter().filter(|(_, n)| *n > 0).map(|&(k, n)| (k, n)),
                    |slot, n| slot.u64(n),
                );
            },
        );
        self.events.push(event);
    }

    fn emit(&mut self, task_id: Option<TaskId>, actor: Actor, kind: EventKind, payload: Value) {
        self.events.push(EncodedEvent::new(NewEvent {
            run_id: self.run_id,
            task_id,
            actor,
            kind,
            time: self.now,
            payload,
        }));
    }

    /// [`Engine::emit`] for the events of every task: the payload is written as canonical
    /// JSON bytes as it is built (keys in byte order), with no `Value` to build, encode and drop
    /// (which was a third of the scheduler's instructions per task).
    fn emit_object(
        &mut self,
        task_id: Option<TaskId>,
        actor: Actor,
        kind: EventKind,
        write: impl FnOnce(&mut ObjectWriter<'_>),
    ) {
        let event = self.input_object(task_id, actor, kind, self.now, write);
        self.events.push(event);
    }
}

/// An event the engine encoded itself, as a `NewEvent` (for callers that apply or keep
/// values). Its payload is canonical JSON the engine just wrote, so it parses; should that ever
/// fail, the payload is `null` rather than a panic.
fn decoded(event: EncodedEvent) -> NewEvent {
    event.to_new_event().unwrap_or_else(|_| NewEvent {
        run_id: event.run_id(),
        task_id: event.task_id(),
        actor: event.actor().clone(),
        kind: event.kind(),
        time: event.time(),
        payload: Value::Null,
    })
}

/// The payload of `tool.failed` and `model.failed`: the call, the error class and the message.
fn write_failure(o: &mut ObjectWriter<'_>, call: u64, class: ErrorClass, message: &str) {
    o.u64("call", call)
        .str("class", class.as_str())
        .str("message", message);
}

/// The ChaCha stream run ids are drawn from; task ids come from the default stream 0.
const RUN_ID_STREAM: u64 = 1;

/// The id of a run created at `created` with `seed`: reproducible, and drawn apart from the
/// run's task ids, which the same seed and instant would otherwise repeat.
pub fn run_id_for(seed: u64, created: Timestamp) -> RunId {
    IdGenerator::seeded_stream(seed, RUN_ID_STREAM, Arc::new(ManualClock::new(created))).run_id()
}

/// A run's clock and id generator, from its seed and its `run.created` time: the declared
/// tasks take the first task ids, in graph order, then spawned tasks the next ones. Whoever
/// needs a run's task ids (the engine, [`crate::state::RunSummary`]) starts here.
pub(crate) fn run_ids(seed: u64, created: Timestamp) -> (Arc<ManualClock>, IdGenerator) {
    let clock = Arc::new(ManualClock::new(created));
    let ids = IdGenerator::seeded(seed, clock.clone());
    (clock, ids)
}

/// The graph a `run.created` payload describes: `graph` (the graph itself) or `simulation` (the
/// configuration of a synthetic graph, rebuilt with [`crate::sim::synth_graph`]).
pub fn graph_of_created(payload: &Value) -> Result<TaskGraph, EngineError> {
    let graph: TaskGraph = if let Some(g) = payload.get("graph") {
        TaskGraph::deserialize(g).map_err(|e| EngineError::Graph(e.to_string()))?
    } else if let Some(cfg) = payload.get("simulation") {
        let cfg = crate::sim::SimConfig::deserialize(cfg)
            .map_err(|e| EngineError::Graph(e.to_string()))?;
        cfg.check()
            .map_err(|e| EngineError::Graph(format!("run.created's simulation: {e}")))?;
        crate::sim::synth_graph(&cfg)
    } else {
        return Err(EngineError::Graph(
            "run.created has neither `graph` nor `simulation`".into(),
        ));
    };
    graph
        .validate_recorded()
        .map_err(|e| EngineError::Graph(e.to_string()))?;
    Ok(graph)
}

/// Splits a model route `provider/model`; a route without `/` is both.
pub fn split_route(route: &str) -> (String, String) {
    match route.split_once('/') {
        Some((p, m)) => (p.to_string(), m.to_string()),
        None => (route.to_string(), route.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run another program wrote (an older `demo`: a `run.created` without a seed) is named
    /// as such, not as a bare missing field.
    #[test]
    fn a_run_the_scheduler_did_not_make_says_so() {
        let created = NewEvent {
            run_id: RunId::from_bytes([7; 16]),
            task_id: None,
            actor: Actor::System,
            kind: EventKind::RunCreated,
            time: Timestamp::from_unix_nanos(0),
            payload: json!({"graph": "demo", "tasks": ["fetch", "summarize"]}),
        };
        let e = Engine::create(&created).err().unwrap().to_string();
        assert!(
            e.contains("no seed: this run was not made by the scheduler"),
            "{e}"
        );
    }

    /// A wait for a person counts from when the call reported it, not from when the driver
    /// recorded it: asked at 90 ms of a 100 ms budget and recorded at 110 ms, the attempt has
    /// 10 ms left once answered (it timed out at once when the wait counted from 110 ms).
    #[test]
    fn a_wait_counts_from_when_it_began_not_when_it_was_recorded() {
        let graph = crate::graph::parse_graph(
            "tasks:\n  - { id: a, tool: slow, args: {}, timeout: 100ms }\n",
            std::path::Path::new("g.yaml"),
        )
        .unwrap();
        let t0 = Timestamp::from_unix_nanos(1_000_000_000_000);
        let ms = |n: u64| t0.saturating_add(Duration::from_millis(n));
        let mut engine = Engine::start(RunId::from_bytes([1; 16]), graph, 1, t0);
        let call = engine
            .drain_effects()
            .find_map(|e| match e {
                Effect::CallTool { call, .. } => Some(call),
                _ => None,
            })
            .unwrap();
        engine.drain_events().for_each(drop);
        assert_eq!(engine.next_deadline(), Some(ms(100)));
        let paused = engine
            .wait_event_since(call, true, ms(110), ms(90))
            .unwrap();
        assert_eq!(paused.payload["since"], json!(ms(90)));
        engine.apply(&paused).unwrap();
        assert_eq!(engine.next_deadline(), None, "the clock stands still");
        let unpaused = engine.wait_event(call, false, ms(500)).unwrap();
        engine.apply(&unpaused).unwrap();
        assert_eq!(engine.next_deadline(), Some(ms(510)));
        // A second wait whose `since` is before the first one ended counts from that end:
        // no stretch counts twice.
        let paused = engine
            .wait_event_since(call, true, ms(505), ms(450))
            .unwrap();
        engine.apply(&paused).unwrap();
        let unpaused = engine.wait_event(call, false, ms(600)).unwrap();
        engine.apply(&unpaused).unwrap();
        assert_eq!(engine.next_deadline(), Some(ms(610)));
        // Recorded when it began: no `since`, as before.
        let mut engine = Engine::start(
            RunId::from_bytes([2; 16]),
            crate::graph::parse_graph(
                "tasks:\n  - { id: a, tool: slow, args: {}, timeout: 100ms }\n",
                std::path::Path::new("g.yaml"),
            )
            .unwrap(),
            1,
            t0,
        );
        engine.drain_effects().for_each(drop);
        let paused = engine.wait_event(call, true, ms(50)).unwrap();
        assert!(paused.payload.get("since").is_none());
    }

    #[test]
    fn key_order_is_the_id_order() {
        let ids = [
            "",
            "a",
            "a-",
            "a.1",
            "a.10",
            "a.2",
            "ab",
            "abcdefgh",
            "abcdefgh.1",
            "abcdefgi",
            "b",
            "t000001",
            "t000010",
            "t00001",
            "t0000100",
            "t00001000",
            "Z",
            "_x",
            "é",
        ];
        for x in ids {
            for y in ids {
                let key = |id: &str| Key::new(0, 0, id, 0);
                assert_eq!(key(x).cmp(&key(y)), x.cmp(y), "{x} vs {y}");
            }
        }
    }
}
