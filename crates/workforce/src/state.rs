//! Run state as a fold over events: summaries for `runs list` / `runs show`, the per-run log
//! hash, and a checker that a run never exceeded its limits.

use std::collections::BTreeMap;

use agent_runtime_core::{Envelope, EventKind, NewEvent, RunId, TaskId, Timestamp};
use serde_json::Value;

use crate::graph::{OnFailure, TaskGraph};

/// The per-run log hash: BLAKE3 over, for each of the run's events in order, its index (`u64`
/// big-endian, from 0), the length of its canonical body (`u64` big-endian) and the body
/// ([`NewEvent::canonical_body`]). Independent of where the run sits in the store's global chain.
///
/// [`LogHasher::update`] writes the canonical body straight into a pending buffer, without the
/// intermediate allocations of [`NewEvent::canonical_body`]; the bytes are the same (a test
/// checks them against `canonical_body`). The buffer goes to BLAKE3 in large pieces: fed whole
/// chunks at once, BLAKE3 hashes many of them in parallel SIMD lanes, where event-sized updates
/// would compress one block at a time. The hash of a stream does not depend on how it is cut.
#[derive(Debug, Default)]
pub struct LogHasher {
    hasher: blake3::Hasher,
    count: u64,
    pending: Vec<u8>,
    /// Where full blocks go instead of `hasher` while it is away (see [`LogHasher::offload`]).
    blocks: Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>,
}

/// A clone hashes on its own: while the original's blocks are away (see [`LogHasher::offload`]),
/// the clone does not send to the original's task, and it does not see those blocks.
impl Clone for LogHasher {
    fn clone(&self) -> Self {
        LogHasher {
            hasher: self.hasher.clone(),
            count: self.count,
            pending: self.pending.clone(),
            blocks: None,
        }
    }
}

/// BLAKE3 folding a [`LogHasher`]'s blocks on a task of its own; see [`LogHasher::offload`].
pub struct OffloadedHash(tokio::task::JoinHandle<blake3::Hasher>);

/// Bytes gathered before they go to BLAKE3: 64 chunks, enough for its widest SIMD batches.
const FLUSH_AT: usize = 64 * 1024;

impl LogHasher {
    /// An empty hash.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds the next event.
    pub fn update(&mut self, e: &NewEvent) {
        let out = &mut self.pending;
        out.extend_from_slice(&self.count.to_be_bytes());
        let at = out.len();
        out.extend_from_slice(&[0; 8]);
        e.write_canonical_body(out);
        let len = (out.len() - at - 8) as u64;
        out[at..at + 8].copy_from_slice(&len.to_be_bytes());
        self.count += 1;
        self.maybe_flush();
    }
    /// Adds the next event, already encoded: the same bytes as [`LogHasher::update`].
    pub fn update_encoded(&mut self, e: &agent_runtime_core::EncodedEvent) {
        self.update_body(e.body());
    }
    /// Adds the next event's canonical body: the definition [`LogHasher::update`] is tested
    /// against.
    fn update_body(&mut self, body: &[u8]) {
        self.pending.extend_from_slice(&self.count.to_be_bytes());
        self.pending
            .extend_from_slice(&(body.len() as u64).to_be_bytes());
        self.pending.extend_from_slice(body);
        self.count += 1;
        self.maybe_flush();
    }
    fn maybe_flush(&mut self) {
        if self.pending.len() >= FLUSH_AT {
            match &self.blocks {
                Some(blocks) => {
                    let full =
                        std::mem::replace(&mut self.pending, Vec::with_capacity(FLUSH_AT + 4096));
                    // A closed channel means the task is gone; `reclaim` reports that.
                    let _ = blocks.send(full);
                }
                None => {
                    self.hasher.update(&self.pending);
                    self.pending.clear();
                }
            }
        }
    }

    /// Hands BLAKE3 to a task of its own (call inside a tokio runtime): from now on the caller
    /// only frames events into 64 KiB blocks (a copy) and the task hashes them, in order. The
    /// driver does this so that a run's scheduler thread does not spend a tenth of its time on
    /// the log hash. [`LogHasher::reclaim`] brings the hash back; until then [`LogHasher::hex`]
    /// (and a clone) does not see the blocks sent away.
    pub fn offload(&mut self) -> OffloadedHash {
        let (blocks, mut incoming) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let mut hasher = std::mem::take(&mut self.hasher);
        self.blocks = Some(blocks);
        OffloadedHash(tokio::spawn(async move {
            while let Some(block) = incoming.recv().await {
                hasher.update(&block);
            }
            hasher
        }))
    }

    /// Waits for the offloaded task to hash every block sent to it and takes the hash back.
    /// Errors if the task was lost (the runtime shut down under it).
    pub async fn reclaim(&mut self, away: OffloadedHash) -> Result<(), String> {
        drop(self.blocks.take());
        self.hasher = away
            .0
            .await
            .map_err(|e| format!("the log hash task stopped: {e}"))?;
        Ok(())
    }
    /// Events hashed.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// The hash so far, 64 hex digits.
    pub fn hex(&self) -> String {
        let mut h = self.hasher.clone();
        h.update(&self.pending);
        h.finalize().to_hex().to_string()
    }
}

/// The log hash of a run's events.
pub fn log_hash(events: &[Envelope]) -> String {
    let mut h = LogHasher::new();
    for e in events {
        h.update(&e.to_new_event());
    }
    h.hex()
}

/// One task's line in `runs show`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TaskRow {
    /// Graph id.
    pub id: String,
    /// Last known status.
    pub status: String,
    /// Attempts started.
    pub attempts: u32,
    /// When the first attempt started.
    pub started: Option<Timestamp>,
    /// When the task ended.
    pub ended: Option<Timestamp>,
    /// The last error, `class: message`, or why it was cancelled.
    pub error: Option<String>,
    /// Set when the task failed for good and completed with another output, saying where it
    /// came from (see [`substitution_note`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub substituted: Option<String>,
    /// How many of its running attempt's calls wait for a person's approval now (`task.paused`
    /// without its `task.unpaused`); its `status` is then `waiting for approval`.
    #[serde(skip_serializing_if = "is_zero")]
    pub waiting_calls: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The status of a task whose attempt waits for a person's answer (see [`TaskRow::waiting_calls`]).
pub const WAITING_FOR_APPROVAL: &str = "waiting for approval";

/// Where the output of a task that failed for good and still completed came from: its
/// `on_failure` policy, as `runs show` and the progress lines say it. `None` when the policy is
/// not known (a spawned task, in a fold over the log alone).
pub fn substitution_note(policy: Option<&OnFailure>) -> String {
    match policy {
        Some(OnFailure::Fallback(task)) => format!("output from fallback `{task}`"),
        Some(OnFailure::ContinueWith(_)) => "output from continue_with".into(),
        _ => "output substituted".into(),
    }
}

/// A run as its events tell it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RunSummary {
    /// The run.
    pub run_id: RunId,
    /// The graph's name.
    pub name: Option<String>,
    /// The seed.
    pub seed: u64,
    /// `completed`, `failed`, `cancelled`, or `interrupted` (no end in the events; `stopped`
    /// for a simulation, which is not resumed). Whether an unended run is still being driven is
    /// not in its events: the command line asks the
    /// store whether the run is claimed (`Store::run_is_claimed`) and shows `running` then.
    pub status: String,
    /// When it was created.
    pub created: Timestamp,
    /// When it ended.
    pub ended: Option<Timestamp>,
    /// Events.
    pub events: u64,
    /// Retries scheduled.
    pub retries: u32,
    /// Tasks, in graph then spawn order.
    pub tasks: Vec<TaskRow>,
    /// Outputs of the final tasks (those nothing depends on) that completed: all of them for a
    /// completed run, those that got that far for a failed or cancelled one; `null` while the
    /// run has not ended.
    pub outputs: Value,
    /// Why it failed (`task `T` failed: CLASS: MESSAGE`), or why it was cancelled and by whom
    /// (`REASON (person:NAME)`).
    pub error: Option<String>,
}

impl RunSummary {
    /// Folds one run's events (the first must be `run.created`); `None` otherwise. See
    /// [`RunFold`] to fold events as they are read.
    pub fn fold(events: &[Envelope]) -> Option<RunSummary> {
        let mut fold = RunFold::new(events.first()?)?;
        for e in events {
            fold.push(e);
        }
        Some(fold.finish())
    }
}

/// A [`RunSummary`] folded one event at a time, so that a run's events can be read a page at
/// a time: memory follows the run's tasks, not the length of its log.
///
/// ```
/// # use agent_runtime_workforce::state::{RunFold, RunSummary};
/// # fn summarize(events: &[agent_runtime_core::Envelope]) -> Option<RunSummary> {
/// let mut fold = RunFold::new(events.first()?)?;
/// for e in events {
///     fold.push(e);
/// }
/// Some(fold.finish())
/// # }
/// ```
#[derive(Debug)]
pub struct RunFold {
    summary: RunSummary,
    /// Whether tasks are folded (see [`RunFold::run_only`]).
    tasks: bool,
    /// Whether the run is a simulation's (which `resume` does not take up).
    simulation: bool,
    /// The declared tasks' `on_failure`, by row.
    policies: Vec<OnFailure>,
    /// Whether a task (by row) has tasks depending on it: the others' outputs are the run's
    /// final outputs. Spawned tasks have none.
    depended_on: Vec<bool>,
    /// The outputs of the final tasks that completed, by row: the outputs of a run that
    /// failed or was cancelled (a completed run's `run.completed` carries its own).
    final_outputs: BTreeMap<usize, Value>,
    /// Lookups only (never iterated): hashed, as a `BTreeMap` of 16-byte ids was 14 % of
    /// `runs show` of a million tasks.
    rows: crate::hashing::FastMap<TaskId, usize>,
    order: Vec<TaskRow>,
}

impl RunFold {
    /// Starts a fold at a run's first event, its `run.created` (`None` for any other); push
    /// that event too.
    pub fn new(first: &Envelope) -> Option<RunFold> {
        Self::start(first, true)
    }

    /// [`RunFold::new`] for the run alone: status, times, counts and error, but no task rows
    /// and no outputs, so the graph in `run.created` is not rebuilt (a simulation's is
    /// synthesized again from its configuration) and nothing large is kept. What `runs list`
    /// needs of each run.
    pub fn run_only(first: &Envelope) -> Option<RunFold> {
        Self::start(first, false)
    }

    fn start(first: &Envelope, tasks: bool) -> Option<RunFold> {
        if first.kind != EventKind::RunCreated {
            return None;
        }
        let p = &first.payload;
        let graph: Option<TaskGraph> = if tasks {
            crate::engine::graph_of_created(p).ok()
        } else {
            None
        };
        let summary = RunSummary {
            run_id: first.run_id,
            name: p.get("name").and_then(Value::as_str).map(String::from),
            seed: p.get("seed").and_then(Value::as_u64).unwrap_or(0),
            status: "running".into(),
            created: first.time,
            ended: None,
            events: 0,
            retries: 0,
            tasks: Vec::new(),
            outputs: Value::Null,
            error: None,
        };
        let mut rows = crate::hashing::FastMap::<TaskId, usize>::default();
        let mut order: Vec<TaskRow> = Vec::new();
        let mut policies = Vec::new();
        let mut depended_on = Vec::new();
        if let Some(g) = graph {
            rows.reserve(g.tasks.len());
            order.reserve(g.tasks.len());
            depended_on = vec![false; g.tasks.len()];
            for deps in g.dependencies() {
                for d in deps {
                    if let Some(flag) = depended_on.get_mut(d) {
                        *flag = true;
                    }
                }
            }
            // Declared tasks' ids are a pure function of run.created: regenerate them.
            let ids = declared_task_ids(first, &g);
            for (t, tid) in g.tasks.into_iter().zip(ids) {
                rows.insert(tid, order.len());
                order.push(TaskRow {
                    id: t.id,
                    status: "pending".into(),
                    ..TaskRow::default()
                });
                policies.push(t.on_failure);
            }
        }
        Some(RunFold {
            summary,
            tasks,
            simulation: p.get("simulation").is_some(),
            policies,
            depended_on,
            final_outputs: BTreeMap::new(),
            rows,
            order,
        })
    }

    /// Folds the run's next event (its `run.created` first).
    pub fn push(&mut self, e: &Envelope) {
        let s = &mut self.summary;
        s.events += 1;
        let row = e.task_id.filter(|_| self.tasks).and_then(|tid| {
            if let Some(&i) = self.rows.get(&tid) {
                return Some(i);
            }
            if e.kind == EventKind::TaskSpawned {
                let id = e
                    .payload
                    .get("task")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string();
                self.order.push(TaskRow {
                    id,
                    status: "pending".into(),
                    ..TaskRow::default()
                });
                self.rows.insert(tid, self.order.len() - 1);
                return Some(self.order.len() - 1);
            }
            None
        });
        match e.kind {
            EventKind::RunCompleted => {
                s.status = "completed".into();
                s.ended = Some(e.time);
                if self.tasks {
                    s.outputs = e.payload.get("outputs").cloned().unwrap_or(Value::Null);
                }
            }
            EventKind::RunFailed => {
                s.status = "failed".into();
                s.ended = Some(e.time);
                let field = |k: &str| e.payload.get(k).and_then(Value::as_str);
                s.error = Some(run_failed_text(
                    field("task").unwrap_or("?"),
                    field("class").unwrap_or("?"),
                    field("message").unwrap_or(""),
                ));
            }
            EventKind::RunCancelled => {
                s.status = "cancelled".into();
                s.ended = Some(e.time);
                let reason = e.payload.get("reason").and_then(Value::as_str);
                s.error = Some(run_cancelled_text(reason.unwrap_or("cancelled"), &e.actor));
            }
            EventKind::TaskRetryScheduled => s.retries += 1,
            _ => {}
        }
        if let Some(r) = row {
            apply_task_event(&mut self.order[r], e, self.policies.get(r));
            if e.kind == EventKind::TaskCompleted
                && !self.depended_on.get(r).copied().unwrap_or(false)
                && let Some(output) = e.payload.get("output")
            {
                self.final_outputs.insert(r, output.clone());
            }
        }
    }

    /// The summary of the events pushed.
    pub fn finish(self) -> RunSummary {
        let mut s = self.summary;
        if s.status == "running" && s.ended.is_none() {
            // A simulation is not resumed: one without an end was stopped.
            s.status = if self.simulation {
                "stopped"
            } else {
                "interrupted"
            }
            .into();
        }
        // A run that failed or was cancelled has the outputs of its final tasks that completed,
        // as `run` prints them.
        if self.tasks && matches!(s.status.as_str(), "failed" | "cancelled") {
            let outputs: serde_json::Map<String, Value> = self
                .final_outputs
                .into_iter()
                .filter(|(r, _)| self.order[*r].status == "completed")
                .map(|(r, v)| (self.order[r].id.clone(), v))
                .collect();
            s.outputs = Value::Object(outputs);
        }
        s.tasks = self.order;
        // The tasks an ended run left open were cancelled with it, as the engine's outcome says,
        // though no event names them: those it never started, and those waiting for a retry.
        if s.ended.is_some() {
            let why = match s.status.as_str() {
                "failed" => "the run failed first",
                "cancelled" => "the run was cancelled first",
                _ => "the run ended first",
            };
            for t in &mut s.tasks {
                if matches!(t.status.as_str(), "pending" | "retrying") {
                    t.status = "cancelled".into();
                    t.error.get_or_insert_with(|| why.to_string());
                }
            }
        }
        s
    }
}

/// The task ids the engine gives the declared tasks of a run (a pure function of `run.created`).
fn declared_task_ids(created: &Envelope, graph: &TaskGraph) -> Vec<TaskId> {
    let seed = created
        .payload
        .get("seed")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let (_, ids) = crate::engine::run_ids(seed, created.time);
    graph.tasks.iter().map(|_| ids.task_id()).collect()
}

/// Why a run failed, as the engine's outcome and `runs show` say it:
/// `task `T` failed: CLASS: MESSAGE`.
pub(crate) fn run_failed_text(task: &str, class: &str, message: &str) -> String {
    format!("task `{task}` failed: {class}: {message}")
}

/// Why a run was cancelled, as the engine's outcome and `runs show` say it: `REASON (ACTOR)`.
pub(crate) fn run_cancelled_text(reason: &str, by: &agent_runtime_core::Actor) -> String {
    format!("{reason} ({by})")
}

/// `CLASS: MESSAGE` of a failure's payload (`task.failed`, `run.failed`).
fn failure_text(payload: &Value) -> String {
    let field = |k: &str| payload.get(k).and_then(Value::as_str);
    format!(
        "{}: {}",
        field("class").unwrap_or("?"),
        field("message").unwrap_or("")
    )
}

fn apply_task_event(row: &mut TaskRow, e: &Envelope, policy: Option<&OnFailure>) {
    // Whatever ends or restarts an attempt ends its waits.
    if !matches!(e.kind, EventKind::TaskPaused | EventKind::TaskUnpaused)
        && e.kind.as_str().starts_with("task.")
    {
        row.waiting_calls = 0;
    }
    match e.kind {
        EventKind::TaskPaused => {
            row.waiting_calls += 1;
            row.status = WAITING_FOR_APPROVAL.into();
        }
        EventKind::TaskUnpaused => {
            row.waiting_calls = row.waiting_calls.saturating_sub(1);
            if row.waiting_calls == 0 && row.status == WAITING_FOR_APPROVAL {
                row.status = "running".into();
            }
        }
        EventKind::TaskStarted => {
            row.status = "running".into();
            row.attempts += 1;
            row.started.get_or_insert(e.time);
        }
        EventKind::TaskCompleted => {
            row.status = "completed".into();
            row.ended = Some(e.time);
            if e.payload.get("substituted").and_then(Value::as_bool) == Some(true) {
                row.substituted = Some(substitution_note(policy));
            }
        }
        EventKind::TaskFailed => {
            row.status = "failed".into();
            row.ended = Some(e.time);
            row.error = Some(failure_text(&e.payload));
        }
        EventKind::TaskRetryScheduled => {
            row.status = "retrying".into();
            row.ended = None;
        }
        EventKind::TaskSkipped => {
            row.status = "skipped".into();
            row.ended = Some(e.time);
            // A task skipped after failing keeps its failure; one skipped because of an upstream
            // task says which.
            if let Some(reason) = e.payload.get("reason").and_then(Value::as_str) {
                row.error.get_or_insert_with(|| reason.to_string());
            }
        }
        EventKind::TaskCancelled if e.payload.get("request").is_none() => {
            row.status = "cancelled".into();
            row.ended = Some(e.time);
            if let Some(reason) = e.payload.get("reason").and_then(Value::as_str) {
                row.error = Some(reason.to_string());
            }
        }
        _ => {}
    }
}

/// Peak concurrency seen in a run's log, by scope (`global`, `agent:NAME`, `tool:NAME`,
/// `provider:NAME`).
pub type Peaks = BTreeMap<String, u32>;

/// Checks from the log alone that a run never had more tasks or calls running at once than its
/// limits allow, and returns the peaks seen. Errors name the first event that broke a limit.
pub fn check_limits(events: &[Envelope]) -> Result<Peaks, String> {
    let first = events.first().ok_or("no events")?;
    let graph = crate::engine::graph_of_created(&first.payload).map_err(|e| e.to_string())?;
    let l = &graph.limits;
    let mut limit_of: BTreeMap<String, u32> = BTreeMap::new();
    limit_of.insert("global".into(), l.concurrency);
    for (n, a) in &graph.agents {
        limit_of.insert(format!("agent:{n}"), a.concurrency);
    }
    for (n, &v) in &l.tools {
        limit_of.insert(format!("tool:{n}"), v);
    }
    for (n, &v) in &l.providers {
        limit_of.insert(format!("provider:{n}"), v);
    }
    let mut now: BTreeMap<String, u32> = BTreeMap::new();
    let mut peaks: Peaks = BTreeMap::new();
    // Running attempts: task -> scopes held; running calls: call -> (task, scope).
    let mut tasks: BTreeMap<TaskId, Vec<String>> = BTreeMap::new();
    let mut calls: BTreeMap<u64, (Option<TaskId>, String)> = BTreeMap::new();
    let call_of = |e: &Envelope| e.payload.get("call").and_then(Value::as_u64);
    let dec = |now: &mut BTreeMap<String, u32>, scope: &str| {
        if let Some(v) = now.get_mut(scope) {
            *v = v.saturating_sub(1);
        }
    };
    for e in events {
        let mut inc: Vec<String> = Vec::new();
        match e.kind {
            EventKind::TaskStarted => {
                let mut scopes = vec!["global".to_string()];
                if let agent_runtime_core::Actor::Agent(a) = &e.actor {
                    scopes.push(format!("agent:{a}"));
                }
                if let Some(tid) = e.task_id {
                    tasks.insert(tid, scopes.clone());
                }
                inc.extend(scopes);
            }
            EventKind::ToolRequested | EventKind::ModelRequested => {
                let scope = if e.kind == EventKind::ToolRequested {
                    format!(
                        "tool:{}",
                        e.payload.get("tool").and_then(Value::as_str).unwrap_or("")
                    )
                } else {
                    format!(
                        "provider:{}",
                        e.payload
                            .get("provider")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                    )
                };
                if let Some(c) = call_of(e) {
                    calls.insert(c, (e.task_id, scope.clone()));
                }
                inc.push(scope);
            }
            EventKind::ToolCompleted
            | EventKind::ToolFailed
            | EventKind::ModelCompleted
            | EventKind::ModelFailed => {
                if let Some((_, scope)) = call_of(e).and_then(|c| calls.remove(&c)) {
                    dec(&mut now, &scope);
                }
            }
            EventKind::TaskCompleted
            | EventKind::TaskFailed
            | EventKind::TaskCancelled
            | EventKind::TaskSkipped
            | EventKind::RunResumed => {
                let ended: Vec<TaskId> = if e.kind == EventKind::RunResumed {
                    tasks.keys().copied().collect()
                } else {
                    e.task_id.into_iter().collect()
                };
                for tid in ended {
                    if let Some(scopes) = tasks.remove(&tid) {
                        for s in scopes {
                            dec(&mut now, &s);
                        }
                    }
                    let gone: Vec<u64> = calls
                        .iter()
                        .filter(|(_, (t, _))| *t == Some(tid))
                        .map(|(c, _)| *c)
                        .collect();
                    for c in gone {
                        if let Some((_, s)) = calls.remove(&c) {
                            dec(&mut now, &s);
                        }
                    }
                }
            }
            _ => {}
        }
        for s in inc {
            let v = now.entry(s.clone()).or_default();
            *v += 1;
            let peak = peaks.entry(s.clone()).or_default();
            *peak = (*peak).max(*v);
            if let Some(&lim) = limit_of.get(&s)
                && *v > lim
            {
                return Err(format!(
                    "event seq {} ({}): {s} has {} running, limit {lim}",
                    e.seq, e.kind, *v
                ));
            }
        }
    }
    Ok(peaks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_runtime_core::{Actor, TaskId};
    use serde_json::json;

    fn events() -> Vec<NewEvent> {
        let payloads = [
            json!(null),
            json!({}),
            json!({"b": 1, "a": [true, null, "x\"\n\u{1}é"], "c": {"z": 1.5, "y": -3, "x": 18446744073709551615u64}}),
            json!({"output": {"text": "hi", "turns": 1}, "attempt": 1}),
            json!([{"k": "v"}, [], "s", 0.1]),
            json!("just a string"),
        ];
        let actors = [
            Actor::System,
            Actor::Agent("writer".into()),
            Actor::Tool("sleep".into()),
            Actor::Person("ann".into()),
        ];
        let mut out = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            for (j, a) in actors.iter().enumerate() {
                out.push(NewEvent {
                    run_id: RunId::from_bytes([i as u8; 16]),
                    task_id: (j % 2 == 1).then(|| TaskId::from_bytes([j as u8; 16])),
                    actor: a.clone(),
                    kind: EventKind::TaskCompleted,
                    time: Timestamp::from_unix_nanos(1_767_225_600_000_000_000 + i as u64),
                    payload: p.clone(),
                });
            }
        }
        out
    }

    #[test]
    fn log_hash_is_over_canonical_bodies() {
        let mut fast = LogHasher::new();
        let mut reference = LogHasher::new();
        for e in events() {
            fast.update(&e);
            reference.update_body(&e.canonical_body());
        }
        assert_eq!(fast.hex(), reference.hex());
        assert_eq!(fast.count(), reference.count());
    }

    /// Hashing offloaded to a task gives the same hash as hashing in place, across many blocks,
    /// and a clone taken meanwhile neither disturbs it nor sends to its task.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn offloaded_hashing_gives_the_same_hash() {
        let mut inline = LogHasher::new();
        let mut offloaded = LogHasher::new();
        let away = offloaded.offload();
        let mut clone = None;
        for round in 0..400 {
            for e in events() {
                inline.update(&e);
                offloaded.update(&e);
            }
            if round == 200 {
                clone = Some(offloaded.clone());
            }
        }
        let mut clone = clone.unwrap();
        for e in events() {
            clone.update(&e);
        }
        // A clone that kept a line to the task would keep it waiting: fail rather than hang.
        tokio::time::timeout(std::time::Duration::from_secs(60), offloaded.reclaim(away))
            .await
            .expect("the hashing task ended")
            .unwrap();
        drop(clone);
        assert_eq!(offloaded.count(), inline.count());
        assert_eq!(offloaded.hex(), inline.hex());
        assert!(
            offloaded.count() * 60 > 4 * 64 * 1024,
            "too few blocks to send any away"
        );
    }

    /// The buffered hasher gives the hash of the definition, across several flushes.
    #[test]
    fn log_hash_is_the_documented_blake3() {
        let mut fast = LogHasher::new();
        let mut direct = blake3::Hasher::new();
        let mut i = 0u64;
        for _ in 0..100 {
            for e in events() {
                fast.update(&e);
                let body = e.canonical_body();
                direct.update(&i.to_be_bytes());
                direct.update(&(body.len() as u64).to_be_bytes());
                direct.update(&body);
                i += 1;
                if i.is_multiple_of(997) {
                    assert_eq!(fast.hex(), direct.finalize().to_hex().to_string());
                }
            }
        }
        assert!(i as usize * 60 > 2 * FLUSH_AT, "the test crosses flushes");
        assert_eq!(fast.hex(), direct.finalize().to_hex().to_string());
        assert_eq!(fast.count(), i);
    }
}
