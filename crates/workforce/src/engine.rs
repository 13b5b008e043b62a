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
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::{
    Actor, ErrorClass, EventKind, IdGenerator, ManualClock, Message, ModelResponse, NewEvent, Role,
    RunId, SeededRng, TaskId, Timestamp,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::graph::{OnFailure, RetryPolicy, TaskGraph, TaskSpec, topo_ranks};
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
        | EventKind::ClockObserved => true,
        // Cancellation requests come from a person; the engine's own are by the system.
        EventKind::RunCancelled | EventKind::TaskCancelled => matches!(e.actor, Actor::Person(_)),
        _ => false,
    }
}

/// An engine that cannot go on: the log does not describe a run it understands.
#[derive(Debug, thiserror::Error)]
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
        /// Rendered arguments.
        args: Value,
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
    /// The first 8 bytes of `id`, big-endian, zero-padded: comparing them orders ids as the
    /// strings do whenever they differ, so most comparisons never touch the strings.
    id_prefix: u64,
    id: Arc<str>,
    idx: u32,
}

/// See [`Key::id_prefix`].
fn id_prefix(id: &str) -> u64 {
    let mut bytes = [0u8; 8];
    let n = id.len().min(8);
    bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
    u64::from_be_bytes(bytes)
}

impl Ord for Key {
    fn cmp(&self, o: &Self) -> Ordering {
        o.prio
            .cmp(&self.prio)
            .then(self.rank.cmp(&o.rank))
            .then(self.id_prefix.cmp(&o.id_prefix))
            .then_with(|| self.id.cmp(&o.id))
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

#[derive(Debug)]
struct AgentRun {
    messages: Arc<Vec<Message>>,
    turns: u32,
    pending: Vec<u64>,
}

#[derive(Debug)]
struct TaskState {
    id: Arc<str>,
    task_id: TaskId,
    dependents: Vec<u32>,
    waiting_on: u32,
    rank: u32,
    status: TaskStatus,
    attempt: u32,
    depth: u32,
    children: Vec<u32>,
    fallback_owners: Vec<u32>,
    /// Whether the output is kept for templates, fallbacks and the run's final outputs.
    keeps_output: bool,
    agent: Option<u32>,
    live: Option<AgentRun>,
    calls: Vec<u64>,
    spawned: u32,
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
    /// The slot it holds or waits for: tool or provider name, if limited.
    resource: Option<String>,
    started: bool,
    /// For a queued call: what to send when it starts.
    tool: String,
    args: Value,
    tool_call_id: Option<String>,
}

/// Hashes keys the engine makes itself (call numbers, task UUIDs) with a multiplication per
/// word: the calls map is touched several times per call, where SipHash (built against hostile
/// keys, which these are not) showed in profiles.
#[derive(Clone, Copy, Debug, Default)]
struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: the high bits (the table's tags) mix all of `n`, the low bits (its
        // bucket) stay distinct for sequential numbers.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// The engine's calls in flight or queued, by number.
type Calls = HashMap<u64, CallInfo, BuildHasherDefault<FastHasher>>;

/// A JSON object from its entries. Cheaper than `json!`, which sends every value through
/// serde (copying strings) where these are moved in.
fn object<const N: usize>(entries: [(&str, Value); N]) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in entries {
        m.insert(k.to_string(), v);
    }
    Value::Object(m)
}

/// The keys of a payload the engine writes for every task, built once: each payload is a
/// clone with its values written in by position. Cloning a map copies its keys without the
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

/// The shapes of the per-task payloads.
#[derive(Debug)]
struct Shapes {
    /// `model.requested`.
    model_requested: Shape,
    /// `model.completed`.
    model_completed: Shape,
    /// `task.completed` without `substituted`.
    completed: Shape,
    /// An agent's output.
    agent_output: Shape,
}

impl Shapes {
    fn new() -> Shapes {
        Shapes {
            model_requested: Shape::new(&["call", "messages", "model", "provider", "turn"]),
            model_completed: Shape::new(&["call", "response"]),
            completed: Shape::new(&["attempt", "output"]),
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
    by_id: HashMap<Arc<str>, u32>,
    by_task_id: HashMap<TaskId, u32, BuildHasherDefault<FastHasher>>,
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
    outputs: BTreeMap<String, Value>,
    open: u32,
    status: RunStatus,
    tokens: u64,
    model_calls: u64,
    events: Vec<NewEvent>,
    effects: Vec<Effect>,
    decisions: u64,
    shapes: Shapes,
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

impl Engine {
    /// The `run.created` event that starts a run of `graph` with `seed` at `time`.
    pub fn created_event(run_id: RunId, graph: &TaskGraph, seed: u64, time: Timestamp) -> NewEvent {
        NewEvent {
            run_id,
            task_id: None,
            actor: Actor::System,
            kind: EventKind::RunCreated,
            time,
            payload: {
                // Serialized once: the digest is of the same JSON the event carries.
                let graph_json = serde_json::to_value(graph).unwrap_or(Value::Null);
                json!({
                    "name": graph.name,
                    "seed": seed,
                    "digest": crate::graph::digest_of_json(&graph_json),
                    "graph": graph_json,
                })
            },
        }
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
            .ok_or_else(|| bad(event.kind, "no seed"))?;
        let graph = graph_of_created(&event.payload)?;
        Ok(Self::build(event.run_id, graph, seed, event.time))
    }

    /// Starts an engine for a graph already validated (as [`Engine::create`] would from its
    /// `run.created` event, without the round trip through JSON).
    pub fn start(run_id: RunId, graph: TaskGraph, seed: u64, time: Timestamp) -> Engine {
        Self::build(run_id, graph, seed, time)
    }

    fn build(run_id: RunId, graph: TaskGraph, seed: u64, now: Timestamp) -> Engine {
        let (clock, ids) = run_ids(seed, now);
        let deps = graph.dependencies();
        let ranks = topo_ranks(&deps);
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
        let agent_of: HashMap<&str, u32> =
            agent_index.iter().map(|(k, &v)| (k.as_str(), v)).collect();
        let mut tasks: Vec<TaskState> = Vec::with_capacity(specs.len());
        let mut by_id = HashMap::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let id: Arc<str> = Arc::from(spec.id.as_str());
            let keeps_output =
                held.contains(&i) || (!referenced.is_empty() && referenced.contains(&spec.id));
            let agent = spec.agent.as_deref().and_then(|a| agent_of.get(a).copied());
            by_id.insert(id.clone(), i as u32);
            tasks.push(TaskState {
                id,
                task_id: ids.task_id(),
                dependents: Vec::new(),
                waiting_on: deps[i].len() as u32,
                rank: ranks[i],
                status: if held.contains(&i) {
                    TaskStatus::Held
                } else {
                    TaskStatus::Pending
                },
                attempt: 0,
                depth: 0,
                children: Vec::new(),
                fallback_owners: Vec::new(),
                keeps_output,
                agent,
                live: None,
                calls: Vec::new(),
                spawned: 0,
            });
        }
        for (i, d) in deps.iter().enumerate() {
            for &u in d {
                tasks[u].dependents.push(i as u32);
            }
        }
        for t in &mut tasks {
            t.keeps_output |= t.dependents.is_empty();
        }
        let open = tasks
            .iter()
            .filter(|t| t.status != TaskStatus::Held)
            .count() as u32;
        let by_task_id = tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.task_id, i as u32))
            .collect();
        let mut e = Engine {
            run_id,
            seed,
            now,
            clock,
            ids,
            rng: SeededRng::new(seed),
            by_id,
            by_task_id,
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
            decisions: 0,
            shapes: Shapes::new(),
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
        e.pump();
        e.check_done();
        e
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
    /// Dispatch decisions made so far (tasks started, calls issued, retries scheduled).
    pub fn decisions(&self) -> u64 {
        self.decisions
    }
    /// Outputs of completed tasks, by task id.
    pub fn outputs(&self) -> &BTreeMap<String, Value> {
        &self.outputs
    }
    /// Every task, in declaration then spawn order.
    pub fn task_views(&self) -> Vec<TaskView> {
        self.tasks
            .iter()
            .map(|t| TaskView {
                id: t.id.to_string(),
                status: t.status,
                attempts: t.attempt,
            })
            .collect()
    }
    /// The graph id of a task.
    pub fn task_name(&self, task_id: TaskId) -> Option<&str> {
        self.by_task_id
            .get(&task_id)
            .map(|&i| &*self.tasks[i as usize].id)
    }
    /// Outputs of the tasks nothing depends on (the run's results).
    pub fn final_outputs(&self) -> BTreeMap<String, Value> {
        self.tasks
            .iter()
            .filter(|t| t.dependents.is_empty() && t.status == TaskStatus::Completed)
            .filter_map(|t| {
                self.outputs
                    .get(&*t.id)
                    .map(|v| (t.id.to_string(), v.clone()))
            })
            .collect()
    }

    /// Derived events since the last call, drained: the engine keeps its buffer for the next
    /// input instead of growing a new one each time.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, NewEvent> {
        self.events.drain(..)
    }
    /// Effects since the last call, drained (see [`Engine::drain_events`]).
    pub fn drain_effects(&mut self) -> std::vec::Drain<'_, Effect> {
        self.effects.drain(..)
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
                Timer::Timeout { task, attempt } => {
                    let t = &self.tasks[task as usize];
                    t.status == TaskStatus::Running && t.attempt == attempt
                }
            };
            if live && self.status == RunStatus::Running {
                return Some(*at);
            }
            self.timers.pop();
        }
        None
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

    /// The `run.resumed` input.
    pub fn resumed_event(&self, time: Timestamp) -> NewEvent {
        self.input(
            None,
            Actor::System,
            EventKind::RunResumed,
            time,
            json!({"in_flight": self.in_flight()}),
        )
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

    /// A request to cancel a task and everything downstream of it; `None` for an unknown task.
    pub fn cancel_task_event(&self, time: Timestamp, by: &str, task: &str) -> Option<NewEvent> {
        let idx = *self.by_id.get(task)?;
        Some(self.input(
            Some(self.tasks[idx as usize].task_id),
            Actor::Person(by.into()),
            EventKind::TaskCancelled,
            time,
            json!({"request": true, "task": task}),
        ))
    }

    /// The input recording a tool call's result.
    pub fn tool_result_event(
        &self,
        call: u64,
        tool: &str,
        time: Timestamp,
        result: Result<Value, (ErrorClass, String)>,
    ) -> NewEvent {
        let task_id = self
            .calls
            .get(&call)
            .map(|c| self.tasks[c.task as usize].task_id);
        match result {
            Ok(output) => self.input(
                task_id,
                Actor::Tool(tool.into()),
                EventKind::ToolCompleted,
                time,
                json!({"call": call, "output": output}),
            ),
            Err((class, message)) => self.input(
                task_id,
                Actor::Tool(tool.into()),
                EventKind::ToolFailed,
                time,
                json!({"call": call, "class": class, "message": message}),
            ),
        }
    }

    /// The `model.completed` input for a response already in JSON form (as
    /// `serde_json::to_value(&ModelResponse)` gives), for callers that reuse one.
    pub fn model_response_json_event(
        &self,
        call: u64,
        time: Timestamp,
        response: Value,
    ) -> NewEvent {
        let task_id = self
            .calls
            .get(&call)
            .map(|c| self.tasks[c.task as usize].task_id);
        let payload = self.shapes.model_completed.fill([call.into(), response]);
        self.input(
            task_id,
            Actor::System,
            EventKind::ModelCompleted,
            time,
            payload,
        )
    }

    /// The input recording a model call's result.
    pub fn model_result_event(
        &self,
        call: u64,
        time: Timestamp,
        result: Result<&ModelResponse, (ErrorClass, String)>,
    ) -> NewEvent {
        let task_id = self
            .calls
            .get(&call)
            .map(|c| self.tasks[c.task as usize].task_id);
        match result {
            Ok(r) => self.input(
                task_id,
                Actor::System,
                EventKind::ModelCompleted,
                time,
                json!({"call": call, "response": r}),
            ),
            Err((class, message)) => self.input(
                task_id,
                Actor::System,
                EventKind::ModelFailed,
                time,
                json!({"call": call, "class": class, "message": message}),
            ),
        }
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
        self.apply_with(event, None)
    }

    /// [`Engine::apply`] for an input whose `model.completed` payload was built from `response`
    /// (by [`Engine::model_result_event`] or [`Engine::model_response_json_event`]): uses the
    /// typed response instead of reading it back from the payload, which gives the same value.
    pub(crate) fn apply_with(
        &mut self,
        event: &NewEvent,
        response: Option<ModelResponse>,
    ) -> Result<(), EngineError> {
        if !is_input(event) || event.kind == EventKind::RunCreated {
            return Err(bad(event.kind, "not an input event of a running engine"));
        }
        if event.time > self.now {
            self.now = event.time;
            self.clock.set(self.now);
        }
        if self.status != RunStatus::Running {
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
                let response = match response {
                    Some(r) => r,
                    None => ModelResponse::deserialize(
                        event.payload.get("response").unwrap_or(&Value::Null),
                    )
                    .map_err(|e| bad(event.kind, format!("bad response: {e}")))?,
                };
                self.on_model_result(call()?, Ok(response));
            }
            EventKind::ModelFailed => self.on_model_result(call()?, Err(failure())),
            EventKind::ClockObserved => self.on_tick(),
            EventKind::RunResumed => {
                for i in 0..self.tasks.len() as u32 {
                    if self.tasks[i as usize].status == TaskStatus::Running {
                        self.attempt_failed(
                            i,
                            ErrorClass::Interrupted,
                            "the process stopped while this attempt was in flight".into(),
                        );
                    }
                }
            }
            EventKind::RunCancelled => {
                let reason = event
                    .payload
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("cancelled")
                    .to_string();
                self.end_run(RunStatus::Cancelled, &reason);
            }
            EventKind::TaskCancelled => {
                let task = event
                    .payload
                    .get("task")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let idx = *self
                    .by_id
                    .get(task)
                    .ok_or_else(|| bad(event.kind, format!("unknown task {task}")))?;
                self.cancel_subtree(idx);
            }
            _ => {}
        }
        self.pump();
        self.check_done();
        Ok(())
    }

    // ---- dispatch ----------------------------------------------------------------------

    fn key(&self, idx: u32) -> Key {
        let t = &self.tasks[idx as usize];
        Key {
            prio: self.graph.tasks[idx as usize].priority,
            rank: t.rank,
            id_prefix: id_prefix(&t.id),
            id: t.id.clone(),
            idx,
        }
    }

    fn make_ready(&mut self, idx: u32) {
        self.tasks[idx as usize].status = TaskStatus::Ready;
        let k = self.key(idx);
        self.ready.push(Reverse(k));
    }

    /// Starts ready tasks while slots allow, in ready-set order.
    fn pump(&mut self) {
        while self.status == RunStatus::Running && self.running < self.graph.limits.concurrency {
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
        }
    }

    fn start_attempt(&mut self, idx: u32) {
        self.decisions += 1;
        self.running += 1;
        let t = &mut self.tasks[idx as usize];
        t.status = TaskStatus::Running;
        t.attempt += 1;
        let attempt = t.attempt;
        let timeout = self.graph.tasks[idx as usize].timeout;
        let (task_id, agent) = (t.task_id, t.agent);
        let actor = self.actor_of(agent);
        if let Some(a) = agent {
            self.agents[a as usize].slot.used += 1;
        }
        self.emit(
            Some(task_id),
            actor,
            EventKind::TaskStarted,
            object([("attempt", attempt.into())]),
        );
        if let Some(d) = timeout {
            let at = self.now.saturating_add(d);
            self.push_timer(at, Timer::Timeout { task: idx, attempt });
        }
        let t = &self.tasks[idx as usize];
        if let Some(a) = t.agent {
            let agent = &self.agents[a as usize];
            let spec = &self.graph.tasks[idx as usize];
            let prompt = template::render_text(spec.prompt.as_deref().unwrap_or(""), &self.outputs);
            let mut messages = Vec::with_capacity(2);
            if !agent.instructions.is_empty() {
                messages.push(Message::new(Role::System, agent.instructions.clone()));
            }
            messages.push(Message::new(Role::User, prompt));
            self.tasks[idx as usize].live = Some(AgentRun {
                messages: Arc::new(messages),
                turns: 0,
                pending: Vec::new(),
            });
            self.request_model(idx);
        } else {
            let spec = &self.graph.tasks[idx as usize];
            let tool = spec.tool.clone().unwrap_or_default();
            let args = template::render(spec.args.as_ref().unwrap_or(&Value::Null), &self.outputs);
            let call = self.new_call(
                idx,
                CallKind::Tool,
                Some(tool.clone()).filter(|k| self.tool_slots.contains_key(k)),
                tool,
                args,
                None,
            );
            // The slot was checked in pump.
            self.start_call(call);
        }
    }

    /// Who acts for a task: its agent, or the system for a direct tool step.
    fn actor_of(&self, agent: Option<u32>) -> Actor {
        agent.map_or(Actor::System, |a| {
            Actor::Agent(self.agents[a as usize].name.to_string())
        })
    }

    fn new_call(
        &mut self,
        task: u32,
        kind: CallKind,
        resource: Option<String>,
        tool: String,
        args: Value,
        tool_call_id: Option<String>,
    ) -> u64 {
        let call = self.next_call;
        self.next_call += 1;
        self.calls.insert(
            call,
            CallInfo {
                task,
                kind,
                resource,
                started: false,
                tool,
                args,
                tool_call_id,
            },
        );
        self.tasks[task as usize].calls.push(call);
        call
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
        let tool = std::mem::take(&mut info.tool);
        let args = std::mem::take(&mut info.args);
        if let Some(res) = resource
            && let Some(slot) = self.slot_of(kind, &res)
        {
            slot.used += 1;
        }
        self.decisions += 1;
        let t = &self.tasks[task as usize];
        let timeout = self.graph.tasks[task as usize].timeout;
        let (task_id, name) = (t.task_id, t.id.clone());
        match kind {
            CallKind::Tool => {
                let actor = self.actor_of(t.agent);
                self.emit(
                    Some(task_id),
                    actor.clone(),
                    EventKind::ToolRequested,
                    json!({"call": call, "tool": tool, "args": args}),
                );
                self.effects.push(Effect::CallTool {
                    call,
                    task_id,
                    task: name,
                    actor,
                    tool,
                    args,
                    timeout,
                });
            }
            CallKind::Model => {
                let Some(a) = t.agent else { return };
                let Some(live) = t.live.as_ref() else { return };
                let agent = &self.agents[a as usize];
                let tools = agent.tools.clone();
                let payload = self.shapes.model_requested.fill([
                    call.into(),
                    live.messages.len().into(),
                    Value::String(agent.model.to_string()),
                    Value::String(agent.provider.to_string()),
                    (live.turns + 1).into(),
                ]);
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
                let actor = Actor::Agent(agent.name.to_string());
                self.emit(Some(task_id), actor, EventKind::ModelRequested, payload);
                self.effects.push(effect);
            }
        }
    }

    /// Ends a call: frees its slot and lets the best waiter in.
    fn end_call(&mut self, call: u64, cancel: bool) -> Option<CallInfo> {
        let info = self.calls.remove(&call)?;
        self.tasks[info.task as usize].calls.retain(|&c| c != call);
        if cancel && info.started {
            self.effects.push(Effect::Cancel { call });
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
            .then(|| provider.to_string());
        let call = self.new_call(idx, CallKind::Model, res, String::new(), Value::Null, None);
        if let Some(live) = self.tasks[idx as usize].live.as_mut() {
            live.pending.push(call);
        }
        self.start_or_queue(call);
    }

    /// Ends the running attempt of a task: frees its slots and abandons its calls.
    fn end_attempt(&mut self, idx: u32) {
        let calls = std::mem::take(&mut self.tasks[idx as usize].calls);
        for c in calls {
            self.end_call(c, true);
        }
        self.tasks[idx as usize].live = None;
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
                Ok(v) => self.complete(idx, v, false),
                Err((class, message)) => self.attempt_failed(idx, class, message),
            }
            return;
        }
        let content = match &result {
            Ok(Value::String(s)) => s.clone(),
            Ok(v) => v.to_string(),
            Err((class, message)) => format!("error ({class}): {message}"),
        };
        let mut msg = Message::new(Role::Tool, content);
        msg.tool_call_id = info.tool_call_id;
        let t = &mut self.tasks[idx as usize];
        if let Some(live) = t.live.as_mut() {
            Arc::make_mut(&mut live.messages).push(msg);
            live.pending.retain(|&c| c != call);
            if live.pending.is_empty() {
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
            let Some(live) = self.tasks[idx as usize].live.as_mut() else {
                return;
            };
            live.pending.retain(|&c| c != call);
            live.turns += 1;
            live.turns
        };
        if message.tool_calls.is_empty() {
            // A final answer ends the attempt and its conversation: the message need not join
            // it, and its text moves into the output.
            let output = self
                .shapes
                .agent_output
                .fill([Value::String(message.content), turns.into()]);
            return self.complete(idx, output, false);
        }
        let calls = message.tool_calls.clone();
        if let Some(live) = self.tasks[idx as usize].live.as_mut() {
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
                if let Some(live) = self.tasks[idx as usize].live.as_mut() {
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
                if let Some(live) = self.tasks[idx as usize].live.as_mut() {
                    Arc::make_mut(&mut live.messages).push(m);
                }
                continue;
            }
            let res = Some(tc.name.clone()).filter(|k| self.tool_slots.contains_key(k));
            let call = self.new_call(idx, CallKind::Tool, res, tc.name, tc.arguments, Some(tc.id));
            if let Some(live) = self.tasks[idx as usize].live.as_mut() {
                live.pending.push(call);
            }
            self.start_or_queue(call);
        }
        if self.tasks[idx as usize].status == TaskStatus::Running
            && self.tasks[idx as usize]
                .live
                .as_ref()
                .is_some_and(|l| l.pending.is_empty())
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
        let depth = self.tasks[parent as usize].depth + 1;
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
        let p = &mut self.tasks[parent as usize];
        p.spawned += 1;
        let id = format!("{}.{}", p.id, p.spawned);
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
        let name: Arc<str> = Arc::from(id.as_str());
        self.by_id.insert(name.clone(), idx);
        self.by_task_id.insert(task_id, idx);
        self.tasks[parent as usize].children.push(idx);
        self.graph.tasks.push(spec);
        self.tasks.push(TaskState {
            id: name,
            task_id,
            dependents: Vec::new(),
            waiting_on: 0,
            rank,
            status: TaskStatus::Pending,
            attempt: 0,
            depth,
            children: Vec::new(),
            fallback_owners: Vec::new(),
            keeps_output: true,
            agent: Some(ai),
            live: None,
            calls: Vec::new(),
            spawned: 0,
        });
        self.open += 1;
        let parent_id = self.tasks[parent as usize].id.to_string();
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
                    let t = &self.tasks[task as usize];
                    if t.status == TaskStatus::Running && t.attempt == attempt {
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

    fn complete(&mut self, idx: u32, output: Value, substituted: bool) {
        self.end_attempt(idx);
        let t = &mut self.tasks[idx as usize];
        let was_open = !t.status.is_terminal() && t.status != TaskStatus::Held;
        t.status = TaskStatus::Completed;
        let (task_id, attempt) = (t.task_id, t.attempt);
        let keep = t.keeps_output || !t.fallback_owners.is_empty();
        let owners = std::mem::take(&mut t.fallback_owners);
        if keep {
            let id = t.id.to_string();
            self.outputs.insert(id, output.clone());
        }
        let payload = if substituted {
            object([
                ("attempt", attempt.into()),
                ("output", output),
                ("substituted", Value::Bool(true)),
            ])
        } else {
            self.shapes.completed.fill([attempt.into(), output])
        };
        self.emit(
            Some(task_id),
            Actor::System,
            EventKind::TaskCompleted,
            payload,
        );
        if was_open {
            self.open = self.open.saturating_sub(1);
        }
        // `make_ready` leaves `dependents` alone: walk it in place rather than copy it.
        for j in 0..self.tasks[idx as usize].dependents.len() {
            let d = self.tasks[idx as usize].dependents[j];
            let t = &mut self.tasks[d as usize];
            t.waiting_on = t.waiting_on.saturating_sub(1);
            if t.waiting_on == 0 && t.status == TaskStatus::Pending {
                self.make_ready(d);
            }
        }
        for o in owners {
            if self.tasks[o as usize].status == TaskStatus::AwaitingFallback {
                // Kept above: a task with fallback owners keeps its output.
                let out = self.outputs.get(&*self.tasks[idx as usize].id).cloned();
                self.complete(o, out.unwrap_or(Value::Null), true);
            }
        }
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
                json!({"attempt": attempt + 1, "delay_ms": delay.as_millis() as u64, "class": class}),
            );
            self.push_timer(at, Timer::Retry { task: idx, attempt });
            return;
        }
        self.failed_for_good(idx, class, message);
    }

    /// `min(backoff * 2^(attempt-1), max_backoff) * (1 + jitter * u)`, `u` uniform in
    /// `[-1, 1)`, drawn from the run's random source and recorded.
    fn backoff(&mut self, p: &RetryPolicy, attempt: u32, task_id: TaskId) -> Duration {
        let base = p
            .backoff
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(20))
            .min(p.max_backoff);
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
                let id = self.tasks[idx as usize].id.to_string();
                self.fail_run(&id, class, &message);
            }
            OnFailure::Skip => self.skip(idx, "failed; on_failure: skip".into()),
            OnFailure::ContinueWith(v) => self.complete(idx, v, true),
            OnFailure::Fallback(f) => {
                let Some(&fi) = self.by_id.get(f.as_str()) else {
                    return self.fail_run(&f, ErrorClass::Internal, "fallback task vanished");
                };
                self.tasks[idx as usize].status = TaskStatus::AwaitingFallback;
                let ft = &self.tasks[fi as usize];
                match ft.status {
                    TaskStatus::Completed => {
                        let out = self.outputs.get(&*ft.id).cloned().unwrap_or(Value::Null);
                        self.complete(idx, out, true);
                    }
                    TaskStatus::Skipped | TaskStatus::Cancelled | TaskStatus::Failed => {
                        self.skip(
                            idx,
                            format!("failed and its fallback `{f}` did not complete"),
                        );
                    }
                    TaskStatus::Held => {
                        self.tasks[fi as usize].fallback_owners.push(idx);
                        self.tasks[fi as usize].status = TaskStatus::Pending;
                        self.open += 1;
                        if self.tasks[fi as usize].waiting_on == 0 {
                            self.make_ready(fi);
                        }
                    }
                    _ => self.tasks[fi as usize].fallback_owners.push(idx),
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
            if t.status == TaskStatus::Running {
                self.end_attempt(i);
            }
            let t = &mut self.tasks[i as usize];
            t.status = TaskStatus::Skipped;
            let task_id = t.task_id;
            let name = t.id.to_string();
            if was_open {
                self.open = self.open.saturating_sub(1);
            }
            self.emit(
                Some(task_id),
                Actor::System,
                EventKind::TaskSkipped,
                json!({"reason": reason}),
            );
            let t = &mut self.tasks[i as usize];
            let mut next: Vec<u32> = t.dependents.clone();
            next.extend(std::mem::take(&mut t.fallback_owners));
            // Reverse so that the stack visits them in declaration order.
            for d in next.into_iter().rev() {
                stack.push((d, format!("upstream task `{name}` was skipped")));
            }
        }
    }

    fn cancel_subtree(&mut self, root: u32) {
        let mut seen = std::collections::BTreeSet::new();
        let mut stack = vec![root];
        while let Some(i) = stack.pop() {
            if !seen.insert(i) {
                continue;
            }
            let t = &self.tasks[i as usize];
            for &d in t
                .dependents
                .iter()
                .chain(t.children.iter())
                .chain(t.fallback_owners.iter())
            {
                stack.push(d);
            }
        }
        let root_name = self.tasks[root as usize].id.to_string();
        for i in seen {
            self.cancel_task(i, &format!("cancelled with `{root_name}` and its subtree"));
        }
    }

    fn cancel_task(&mut self, i: u32, reason: &str) {
        let t = &self.tasks[i as usize];
        if t.status.is_terminal() {
            return;
        }
        let was_open = t.status != TaskStatus::Held;
        self.end_attempt(i);
        let t = &mut self.tasks[i as usize];
        t.status = TaskStatus::Cancelled;
        let task_id = t.task_id;
        if was_open {
            self.open = self.open.saturating_sub(1);
        }
        self.emit(
            Some(task_id),
            Actor::System,
            EventKind::TaskCancelled,
            json!({"reason": reason}),
        );
    }

    fn fail_run(&mut self, task: &str, class: ErrorClass, message: &str) {
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
            if !t.status.is_terminal() {
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
        let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
        for t in &self.tasks {
            let k = match t.status {
                TaskStatus::Completed => "completed",
                TaskStatus::Skipped => "skipped",
                TaskStatus::Cancelled => "cancelled",
                _ => "other",
            };
            *counts.entry(k).or_default() += 1;
        }
        // Built in place: `json!` would serialize every output afresh.
        let outputs: serde_json::Map<String, Value> = self.final_outputs().into_iter().collect();
        let counts: serde_json::Map<String, Value> = counts
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::from(v)))
            .collect();
        let payload = object([
            ("outputs", Value::Object(outputs)),
            ("tasks", Value::Object(counts)),
        ]);
        self.emit(None, Actor::System, EventKind::RunCompleted, payload);
    }

    fn emit(&mut self, task_id: Option<TaskId>, actor: Actor, kind: EventKind, payload: Value) {
        self.events.push(NewEvent {
            run_id: self.run_id,
            task_id,
            actor,
            kind,
            time: self.now,
            payload,
        });
    }
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
        crate::sim::synth_graph(&cfg)
    } else {
        return Err(EngineError::Graph(
            "run.created has neither `graph` nor `simulation`".into(),
        ));
    };
    graph
        .validate()
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
                let key = |id: &str| Key {
                    prio: 0,
                    rank: 0,
                    id_prefix: id_prefix(id),
                    id: id.into(),
                    idx: 0,
                };
                assert_eq!(key(x).cmp(&key(y)), x.cmp(y), "{x} vs {y}");
            }
        }
    }
}
