//! The simulator: the real [`Engine`] on a virtual clock, with synthetic model calls whose
//! durations and failures come from a seeded random source.
//!
//! Every synthetic result is recorded as an input event exactly as a live run records a real
//! one, so the simulated log replays like any other (`agent-runtime replay` works on it) and the
//! same seed gives the same log hash.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_runtime_core::{
    AppendStream, EncodedEvent, ErrorClass, EventSink, FinishReason, ManualClock, Message,
    ModelResponse, PendingAppend, Role, SeededRng, Timestamp, Usage, thread_cpu_ns,
};

use crate::engine::{Effect, Engine, RunStatus, TaskStatus};
use crate::graph::{AgentSpec, OnFailure, RetryPolicy, RunLimits, TaskGraph, TaskSpec};
use crate::state::LogHasher;

/// The shape of a synthetic graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// Each task needs the one before.
    Chain,
    /// One root; every other task needs it.
    Fanout,
    /// Layers as wide as there are agents (at least √tasks); each task needs up to two tasks of
    /// the layer above.
    Layered,
    /// Each task needs up to three random tasks among the hundred before it.
    Random,
}

impl Shape {
    /// Every shape, in the order `--help` lists them.
    pub const ALL: [Shape; 4] = [Shape::Chain, Shape::Fanout, Shape::Layered, Shape::Random];

    /// The name the command line takes (`chain`, `fanout`, `layered`, `random`).
    pub fn name(self) -> &'static str {
        match self {
            Shape::Chain => "chain",
            Shape::Fanout => "fanout",
            Shape::Layered => "layered",
            Shape::Random => "random",
        }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Shape::ALL
            .into_iter()
            .find(|shape| shape.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Shape::ALL.iter().map(|shape| shape.name()).collect();
                format!("unknown shape `{s}` ({})", names.join(", "))
            })
    }
}

/// What to simulate.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SimConfig {
    /// Agents.
    pub agents: u32,
    /// Tasks.
    pub tasks: u32,
    /// Graph shape.
    pub shape: Shape,
    /// Probability that a synthetic model call fails (retried up to 3 attempts, then skipped).
    pub failure_rate: f64,
    /// Seed of the graph, the durations, the failures and the run.
    pub seed: u64,
    /// Tasks of one agent at once.
    pub agent_concurrency: u32,
    /// Tasks at once across the run (default: agents × agent_concurrency).
    pub concurrency: Option<u32>,
    /// Shortest synthetic call, in virtual milliseconds.
    pub min_ms: u64,
    /// Longest synthetic call, in virtual milliseconds.
    pub max_ms: u64,
    /// Events per append to the sink.
    pub batch: usize,
}

impl SimConfig {
    /// A configuration with the defaults for everything but the essentials.
    pub fn new(agents: u32, tasks: u32, shape: Shape, failure_rate: f64, seed: u64) -> Self {
        SimConfig {
            agents,
            tasks,
            shape,
            // -0 is 0, and is recorded as 0: the same simulation gets the same log hash.
            failure_rate: if failure_rate == 0.0 {
                0.0
            } else {
                failure_rate
            },
            seed,
            agent_concurrency: 4,
            concurrency: None,
            min_ms: 50,
            max_ms: 1000,
            batch: 4096,
        }
    }

    /// Most tasks a simulation builds: each costs about a kilobyte while the run lasts.
    pub const MAX_TASKS: u32 = 10_000_000;
    /// Most agents.
    pub const MAX_AGENTS: u32 = 1_000_000;
    /// Longest synthetic call, in virtual milliseconds (about 11.6 days).
    pub const MAX_CALL_MS: u64 = 1_000_000_000;
    /// Most events per append.
    pub const MAX_BATCH: usize = 1 << 20;

    /// Checks that the configuration can run: counts within bounds, a failure rate in [0, 1],
    /// call durations in order. The configuration also arrives from a recorded `run.created`
    /// (replay and resume rebuild the graph from it), where a forged or damaged one must not
    /// make the process build billions of tasks.
    ///
    /// ```
    /// use agent_runtime_workforce::sim::{Shape, SimConfig};
    /// assert!(SimConfig::new(10, 100, Shape::Layered, 0.1, 1).check().is_ok());
    /// let err = SimConfig::new(10, u32::MAX, Shape::Layered, 0.1, 1).check().unwrap_err();
    /// assert!(err.contains("tasks"), "{err}");
    /// // -0 is 0, recorded as 0.
    /// assert!(SimConfig::new(10, 100, Shape::Chain, -0.0, 1).failure_rate.is_sign_positive());
    /// ```
    pub fn check(&self) -> Result<(), String> {
        let count = |name: &str, value: u64, max: u64| {
            if (1..=max).contains(&value) {
                Ok(())
            } else {
                Err(format!("{name} is {value}; it must be between 1 and {max}"))
            }
        };
        count("tasks", self.tasks.into(), Self::MAX_TASKS.into())?;
        count("agents", self.agents.into(), Self::MAX_AGENTS.into())?;
        count("batch", self.batch as u64, Self::MAX_BATCH as u64)?;
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err(format!(
                "failure_rate is {}; it must be between 0 and 1",
                self.failure_rate
            ));
        }
        if self.agent_concurrency == 0 {
            return Err("agent_concurrency is 0; it must be at least 1".into());
        }
        if self.concurrency == Some(0) {
            return Err("concurrency is 0; it must be at least 1".into());
        }
        if self.min_ms > self.max_ms || self.max_ms > Self::MAX_CALL_MS {
            return Err(format!(
                "min_ms {} and max_ms {} must be in order and at most {}",
                self.min_ms,
                self.max_ms,
                Self::MAX_CALL_MS
            ));
        }
        Ok(())
    }
}

/// What a simulation measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SimReport {
    /// The configuration.
    pub config: SimConfig,
    /// The run id.
    pub run_id: String,
    /// How the run ended.
    pub status: RunStatus,
    /// Tasks completed.
    pub tasks_done: u64,
    /// Tasks skipped after their retries were spent.
    pub tasks_skipped: u64,
    /// Retries scheduled.
    pub retries: u64,
    /// Virtual time from start to end, ms.
    pub virtual_makespan_ms: u64,
    /// Wall time of the whole simulation (graph building excluded), ms.
    pub wall_ms: f64,
    /// Scheduling decisions (dispatches, calls, retries).
    pub decisions: u64,
    /// Decisions per wall second.
    pub decisions_per_sec: f64,
    /// Wall nanoseconds per task, until every event is in the log.
    pub ns_per_task: f64,
    /// CPU nanoseconds per task of the scheduler's own thread (the engine loop: deciding,
    /// building events, handing batches on), while hashing and the log run on other threads.
    /// `None` where the platform has no per-thread CPU clock.
    pub scheduler_cpu_ns_per_task: Option<f64>,
    /// Peak resident memory of the process (Linux `VmHWM`: since it started, or since
    /// [`reset_peak_memory`]), bytes.
    pub peak_memory_bytes: Option<u64>,
    /// Events written.
    pub events: u64,
    /// The per-run log hash.
    pub log_hash: String,
}

/// Builds the synthetic graph of a configuration (deterministic in the seed).
pub fn synth_graph(cfg: &SimConfig) -> TaskGraph {
    let n = cfg.tasks.max(1) as usize;
    let agents = cfg.agents.max(1);
    let mut rng = SeededRng::new(cfg.seed ^ 0x6A09_E667_F3BC_C909);
    let width = (n as f64).sqrt().ceil() as usize;
    let digits = n.to_string().len();
    let id = |i: usize| format!("t{i:0digits$}");
    let mut tasks = Vec::with_capacity(n);
    let retry = RetryPolicy {
        max_attempts: 3,
        backoff: Duration::from_millis(100),
        ..RetryPolicy::default()
    };
    for i in 0..n {
        let needs: BTreeSet<usize> = match cfg.shape {
            Shape::Chain => (i > 0).then(|| i - 1).into_iter().collect(),
            Shape::Fanout => (i > 0).then_some(0).into_iter().collect(),
            Shape::Layered => {
                let w = width.max(agents as usize);
                let layer = i / w;
                if layer == 0 {
                    BTreeSet::new()
                } else {
                    let start = (layer - 1) * w;
                    (0..2)
                        .map(|_| start + rng.below(w as u64) as usize)
                        .collect()
                }
            }
            Shape::Random => {
                if i == 0 {
                    BTreeSet::new()
                } else {
                    let lo = i.saturating_sub(100);
                    let k = rng.below(4) as usize;
                    (0..k)
                        .map(|_| lo + rng.below((i - lo) as u64) as usize)
                        .collect()
                }
            }
        };
        tasks.push(TaskSpec {
            id: id(i),
            agent: Some(format!("a{}", i as u32 % agents)),
            prompt: Some("work".into()),
            tool: None,
            args: None,
            needs: needs.into_iter().map(id).collect(),
            priority: 0,
            timeout: None,
            retry: Some(retry.clone()),
            on_failure: OnFailure::Skip,
        });
    }
    let agent_specs: BTreeMap<String, AgentSpec> = (0..agents)
        .map(|a| {
            (
                format!("a{a}"),
                AgentSpec {
                    instructions: String::new(),
                    model: "sim/model".into(),
                    tools: Vec::new(),
                    max_turns: 1,
                    concurrency: cfg.agent_concurrency.max(1),
                },
            )
        })
        .collect();
    TaskGraph {
        name: Some(format!("sim-{}-{}x{}", cfg.shape, cfg.agents, cfg.tasks)),
        limits: RunLimits {
            concurrency: cfg
                .concurrency
                .unwrap_or(agents.saturating_mul(cfg.agent_concurrency.max(1)))
                .max(1),
            max_tasks: cfg.tasks.max(1),
            max_spawn_depth: 0,
            ..RunLimits::default()
        },
        agents: agent_specs,
        tasks,
    }
}

/// A simulation that could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The engine refused the graph or an event.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// The sink refused an append.
    #[error("event log: {0}")]
    Log(String),
    /// The configuration cannot run (see [`SimConfig::check`]).
    #[error("simulation: {0}")]
    Config(String),
    /// Nothing can happen any more, yet the run has not ended (a bug).
    #[error("the simulation stalled with {0} tasks open and nothing in flight")]
    Stalled(usize),
}

/// The start of virtual time: 2026-01-01T00:00:00Z.
pub const SIM_EPOCH: Timestamp = Timestamp::from_unix_nanos(1_767_225_600_000_000_000);

/// Batches a simulation lets its sink hold before it waits for the oldest to be durable: enough
/// to cover a store's fsync of the earliest while it writes the next ones (measured against 1,
/// 8 and 16 in `docs/benchmarks.md`), few enough to bound the events held (about 1.2 MB a
/// batch of 4,096).
const SINK_DEPTH: usize = 4;

/// Runs a simulation, writing its events to `sink`.
pub async fn simulate(cfg: &SimConfig, sink: Arc<dyn EventSink>) -> Result<SimReport, SimError> {
    cfg.check().map_err(SimError::Config)?;
    // A configuration's run id is fixed (see `run_id_of`): two processes simulating the same
    // one into a shared log would interleave their events, so the run is claimed first, and a
    // log that already holds it (the same configuration simulated before) is refused.
    let run_id = run_id_of(cfg);
    let _claim = crate::driver::claim(&sink, run_id, true)
        .await
        .map_err(|e| SimError::Log(e.message))?;
    let graph = synth_graph(cfg);
    let started = Instant::now();
    // The engine's own CPU time, summed over the stretches between awaits (the task may move
    // between threads at an await; within a stretch it stays on one).
    let mut engine_cpu = CpuMeter::start();
    let clock = Arc::new(ManualClock::new(SIM_EPOCH));
    let created = Engine::created_sim_event(run_id, cfg, &graph, SIM_EPOCH);
    let mut engine = Engine::start(run_id, graph, cfg.seed, SIM_EPOCH);
    let mut rng = SeededRng::new(cfg.seed ^ 0x9E37_79B9_7F4A_7C15);
    let mut pending: BinaryHeap<Reverse<(Timestamp, u64, u64, bool)>> = BinaryHeap::new();
    let mut cancelled: BTreeSet<u64> = BTreeSet::new();
    let mut tool_calls: BTreeMap<u64, String> = BTreeMap::new();
    let mut seq = 0u64;
    // Events are encoded as they leave the engine, while their payloads are still in this
    // thread's cache; the stages after it hash and store those bytes as they are.
    let mut buffer: Vec<EncodedEvent> = Vec::with_capacity(cfg.batch.max(1) + 64);
    // Batches go through two tasks, so that the log writes while the engine computes: the first
    // folds the log hash, the second appends to the sink; the hash of a batch is thus computed
    // while the sink still writes the batch before it. Each stage keeps the batches in order,
    // and the bounded queues keep memory bounded: one batch waits per stage, which keeps the
    // stages busy (measured) and holds fewer events at once than two.
    // Every synthetic answer is the same response.
    let response = ModelResponse {
        message: Message::new(Role::Assistant, "done"),
        finish: FinishReason::Stop,
        usage: Usage {
            input_tokens: 12,
            output_tokens: 4,
        },
    };
    let (writer, mut batches) = tokio::sync::mpsc::channel::<Vec<EncodedEvent>>(1);
    let (to_sink, mut hashed) = tokio::sync::mpsc::channel::<Vec<EncodedEvent>>(1);
    let hash_task = tokio::spawn(async move {
        let mut hasher = LogHasher::new();
        while let Some(batch) = batches.recv().await {
            for e in &batch {
                hasher.update_encoded(e);
            }
            if to_sink.send(batch).await.is_err() {
                break;
            }
        }
        hasher
    });
    // Batches are queued behind the one the sink writes (see `EventSink::submit_encoded`), so
    // a store's writer goes from one to the next without waiting for this task, and up to
    // `SINK_DEPTH` of them may be waiting to be durable: a store answers a batch only after
    // its fsync, and waiting for each batch in turn left the scheduler idle for as long as the
    // disk took.
    let write_task = tokio::spawn(async move {
        let stream = AppendStream::new();
        let mut in_flight: std::collections::VecDeque<PendingAppend> =
            std::collections::VecDeque::with_capacity(SINK_DEPTH + 1);
        while let Some(batch) = hashed.recv().await {
            // A refusal after a failed batch names that batch's failure (see
            // `AppendStream::check`).
            let pending = sink
                .submit_encoded(batch, &stream)
                .await
                .map_err(|e| SimError::Log(e.message))?;
            in_flight.push_back(pending);
            while in_flight.len() > SINK_DEPTH {
                if let Some(before) = in_flight.pop_front() {
                    before.await.map_err(|e| SimError::Log(e.message))?;
                }
            }
        }
        for last in in_flight {
            last.await.map_err(|e| SimError::Log(e.message))?;
        }
        Ok::<(), SimError>(())
    });
    let mut retries = 0u64;
    let span = cfg.max_ms.saturating_sub(cfg.min_ms) + 1;
    buffer.push(EncodedEvent::new(created));
    loop {
        for e in engine.drain_events() {
            if e.kind() == agent_runtime_core::EventKind::TaskRetryScheduled {
                retries += 1;
            }
            buffer.push(e);
        }
        let now = engine.now();
        for effect in engine.drain_effects() {
            match effect {
                Effect::CallModel { call, .. } | Effect::CallTool { call, .. } => {
                    // Synthetic agents have no tools, but a tool call gets a tool's result.
                    if let Effect::CallTool { tool, .. } = &effect {
                        tool_calls.insert(call, tool.clone());
                    }
                    let ms = cfg.min_ms + rng.below(span);
                    let fail = rng.next_f64() < cfg.failure_rate;
                    seq += 1;
                    pending.push(Reverse((
                        now.saturating_add(Duration::from_millis(ms)),
                        seq,
                        call,
                        fail,
                    )));
                }
                Effect::Cancel { call } => {
                    cancelled.insert(call);
                }
            }
        }
        if buffer.len() >= cfg.batch.max(1) {
            let full = std::mem::replace(&mut buffer, Vec::with_capacity(cfg.batch.max(1) + 64));
            engine_cpu.pause();
            let sent = writer.send(full).await;
            engine_cpu.resume();
            if sent.is_err() {
                break;
            }
        }
        if engine.is_finished() {
            break;
        }
        let deadline = engine.next_deadline();
        let next_done = pending.peek().map(|Reverse((t, ..))| *t);
        let completion_first = match (next_done, deadline) {
            (Some(t), Some(d)) => t <= d,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => {
                let open = engine
                    .task_views()
                    .iter()
                    .filter(|t| !t.status.is_terminal())
                    .count();
                return Err(SimError::Stalled(open));
            }
        };
        // Results go in through the engine's typed inputs, which encode the recorded event as
        // they apply it; the clock goes in as an event.
        let input = match (completion_first, deadline) {
            (true, _) => {
                let Some(Reverse((t, _, call, fail))) = pending.pop() else {
                    break;
                };
                if cancelled.remove(&call) {
                    tool_calls.remove(&call);
                    continue;
                }
                clock.set(t);
                if let Some(tool) = tool_calls.remove(&call) {
                    let result = if fail {
                        Err((ErrorClass::ToolError, "simulated failure".to_string()))
                    } else {
                        Ok(serde_json::Value::Null)
                    };
                    engine.apply_tool_result(call, &tool, t, result)
                } else if fail {
                    engine.apply_model_result(
                        call,
                        t,
                        Err((ErrorClass::ModelError, "simulated failure".to_string())),
                    )
                } else {
                    engine.apply_model_result(call, t, Ok(response.clone()))
                }
            }
            (false, Some(d)) => {
                clock.set(d);
                let tick = engine.clock_event(d);
                engine.apply(&tick)?;
                EncodedEvent::new(tick)
            }
            (false, None) => break,
        };
        buffer.push(input);
    }
    engine_cpu.pause();
    if !buffer.is_empty() {
        let _ = writer.send(buffer).await;
    }
    drop(writer);
    let hasher = hash_task.await;
    match write_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e) => return Err(SimError::Log(format!("event writer stopped: {e}"))),
    }
    let hasher = hasher.map_err(|e| SimError::Log(format!("log hasher stopped: {e}")))?;
    let wall = started.elapsed();
    let views = engine.task_views();
    let done = views
        .iter()
        .filter(|t| t.status == TaskStatus::Completed)
        .count() as u64;
    let skipped = views
        .iter()
        .filter(|t| t.status == TaskStatus::Skipped)
        .count() as u64;
    let secs = wall.as_secs_f64().max(1e-9);
    Ok(SimReport {
        config: cfg.clone(),
        run_id: run_id.to_string(),
        status: engine.status(),
        tasks_done: done,
        tasks_skipped: skipped,
        retries,
        virtual_makespan_ms: engine
            .now()
            .saturating_duration_since(SIM_EPOCH)
            .as_millis() as u64,
        wall_ms: secs * 1000.0,
        decisions: engine.decisions(),
        decisions_per_sec: engine.decisions() as f64 / secs,
        ns_per_task: secs * 1e9 / f64::from(cfg.tasks.max(1)),
        scheduler_cpu_ns_per_task: engine_cpu
            .total_ns()
            .map(|ns| ns as f64 / f64::from(cfg.tasks.max(1))),
        peak_memory_bytes: peak_memory_bytes(),
        events: hasher.count(),
        log_hash: hasher.hex(),
    })
}

/// The run id a simulation gets: a function of its seed alone (the virtual clock always starts
/// at [`SIM_EPOCH`]), so the same configuration writes the same events.
pub fn run_id_of(cfg: &SimConfig) -> agent_runtime_core::RunId {
    crate::engine::run_id_for(cfg.seed, SIM_EPOCH)
}

/// Starts the process's peak resident memory over from what it holds now (Linux: `5` to
/// `/proc/self/clear_refs`), so that [`peak_memory_bytes`] measures what comes after: a
/// benchmark's sections one by one, not the largest of all so far. Whether it could (not
/// where `/proc` is missing or read-only: other systems, some sandboxes).
pub fn reset_peak_memory() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak resident memory (Linux `VmHWM`, since the process started or the last
/// [`reset_peak_memory`]), when known.
pub fn peak_memory_bytes() -> Option<u64> {
    proc_status_kb("VmHWM:").map(|kb| kb * 1024)
}

/// The process's current resident memory (Linux `VmRSS`), when known.
pub fn current_memory_bytes() -> Option<u64> {
    proc_status_kb("VmRSS:").map(|kb| kb * 1024)
}

fn proc_status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Sums the calling thread's CPU time over stretches of work.
struct CpuMeter {
    total: Option<u64>,
    since: Option<u64>,
}

impl CpuMeter {
    fn start() -> Self {
        let since = thread_cpu_ns();
        CpuMeter {
            total: since.map(|_| 0),
            since,
        }
    }
    fn pause(&mut self) {
        if let (Some(total), Some(since), Some(now)) = (self.total, self.since, thread_cpu_ns()) {
            self.total = Some(total + now.saturating_sub(since));
        }
        self.since = None;
    }
    fn resume(&mut self) {
        self.since = thread_cpu_ns();
    }
    fn total_ns(&self) -> Option<u64> {
        self.total
    }
}
