//! Workforce subcommands: run, replay, resume, runs, simulate, and `bench workforce`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use agent_runtime_core::{
    CancellationToken, EncodedEvent, EventKind, EventQuery, EventSink, EventSource, MemoryLog,
    NewEvent, RunId, SystemClock, TaskId, Timestamp,
};
use agent_runtime_workforce::driver::{self, DriverError, NoModels, Observer, Outcome, RunOptions};
use agent_runtime_workforce::engine::{Engine, RunStatus, TaskStatus};
use agent_runtime_workforce::sim::{self, Shape, SimConfig};
use agent_runtime_workforce::state::{RunFold, RunSummary};
use agent_runtime_workforce::tools::ToolRegistry;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::common::{CliError, GlobalArgs, columns_of, cut_to_columns, padded, terminal_text};
use crate::gateway::GatewayOpts;
use crate::terminal::TerminalApproval;

/// Workforce subcommands (flattened into the top level).
#[derive(Subcommand)]
pub enum WorkforceCommand {
    /// Run a task graph (YAML or JSON) and print its final outputs.
    Run(RunArgs),
    /// Re-execute a recorded run against its recorded results and check the events match.
    Replay(ReplayArgs),
    /// Finish a run whose process died, without re-running completed tasks.
    Resume(ResumeArgs),
    /// List and inspect recorded runs.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Run the real scheduler on a virtual clock with synthetic tasks and failures.
    Simulate(SimulateArgs),
    /// Ask a running run (in another process) to cancel itself, or one task and everything
    /// downstream of it.
    Cancel(CancelArgs),
}

/// Arguments of `cancel`.
#[derive(Args)]
pub struct CancelArgs {
    /// The run's id (see `runs list`), 4 or more of its first hex digits, or `last`.
    pub run_id: String,
    /// Cancel only this task (graph id) and the tasks that need it, directly or not.
    #[arg(long)]
    pub task: Option<String>,
    /// Why (recorded with the request and given as each cancelled task's reason; default for
    /// a whole run: "cancelled by the user").
    #[arg(long)]
    pub reason: Option<String>,
    /// How many seconds to wait to see the running process carry the request out (0: record
    /// it and return). The request stands either way; only what is printed differs.
    #[arg(long, value_name = "SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub wait: u64,
}

/// Arguments of `run`.
#[derive(Args)]
pub struct RunArgs {
    /// The task graph file (`.yaml`, `.yml` or `.json`), or `-` for standard input.
    pub flow: PathBuf,
    /// Seed of the run's ids, retry jitter and other random draws, at most 2^53 - 1 (default:
    /// a random one; the run records its seed, see `runs show`).
    #[arg(long, allow_negative_numbers = true, value_parser = seed_parser())]
    pub seed: Option<u64>,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub gateway: GatewayOpts,
}

/// Arguments of `replay`.
#[derive(Args)]
pub struct ReplayArgs {
    /// The run's id (see `runs list`), 4 or more of its first hex digits, or `last`.
    pub run_id: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `resume`.
#[derive(Args)]
pub struct ResumeArgs {
    /// The run's id (see `runs list`), 4 or more of its first hex digits, or `last`.
    pub run_id: String,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
    /// Go on in the current folder, not in the one the run started in (where its tools'
    /// relative paths resolve).
    #[arg(long)]
    pub here: bool,
    #[command(flatten)]
    pub gateway: GatewayOpts,
}

/// `runs list` and `runs show`.
#[derive(Subcommand)]
pub enum RunsCommand {
    /// Every run in the database: id, name, status, start, duration.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One run: status, timings and a table of its tasks.
    Show {
        /// The run's id, 4 or more of its first hex digits, or `last`.
        run_id: String,
        /// Only the tasks in these states (repeat it, or separate them with commas): pending,
        /// running, waiting-for-approval, retrying, completed, failed, skipped, cancelled,
        /// interrupted, stopped.
        #[arg(long, value_delimiter = ',', value_name = "STATUS")]
        status: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of `simulate`.
#[derive(Args)]
pub struct SimulateArgs {
    /// Agents (1 to 1,000,000).
    // Negative numbers are taken as values here too, so that `-1` is told the range rather
    // than "unexpected argument".
    #[arg(long, default_value_t = 10, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(SimConfig::MAX_AGENTS)))]
    pub agents: u32,
    /// Tasks (1 to 10,000,000).
    #[arg(long, default_value_t = 1000, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(SimConfig::MAX_TASKS)))]
    pub tasks: u32,
    /// Graph shape: chain, fanout, layered or random.
    #[arg(long, default_value = "layered")]
    pub shape: String,
    /// Probability that a synthetic call fails, in [0, 1].
    // Negative numbers are taken as values, so `-0.1` is told it is out of range rather than
    // "unexpected argument '-0'".
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub failure_rate: f64,
    /// Seed of the graph, durations, failures and run, at most 2^53 - 1.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = seed_parser())]
    pub seed: u64,
    /// Tasks of one agent at once (at least 1).
    #[arg(long, default_value_t = 4, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub agent_concurrency: u32,
    /// Where the events go: `memory` (kept until the end), `store` (the database, --db) or
    /// `none` (dropped: measures the scheduler alone).
    #[arg(long, default_value = "memory")]
    pub log: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `bench workforce`.
#[derive(Args)]
pub struct BenchArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Smaller sizes (10,000 simulated tasks, 1,000 live agents) for a quick look.
    #[arg(long)]
    pub quick: bool,
    /// Only this part (the JSON then has only its section).
    #[arg(long, value_enum)]
    pub only: Option<BenchPart>,
    /// Write to an encrypted store (a fixed bench passphrase) instead of a plaintext one:
    /// what a run costs in the default configuration, payloads sealed at rest.
    #[arg(long)]
    pub encrypted: bool,
}

/// A part of `bench workforce`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchPart {
    /// Live agents awaiting a slow tool, with the store and without a log.
    Live,
    /// The simulator with no log, an in-memory log and the store.
    Simulator,
    /// Simulator cost per task as the task count grows.
    Scaling,
}

/// The largest seed: 2^53 - 1. Runs record their seed as a JSON number, and readers that hold
/// numbers as doubles (JavaScript, `jq` before 1.7) read a larger one back changed, so that
/// the run could not be repeated from what `runs show --json` printed.
pub const MAX_SEED: u64 = (1 << 53) - 1;

fn seed_parser() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(0..=MAX_SEED)
}

pub fn run(cmd: WorkforceCommand, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    match cmd {
        WorkforceCommand::Run(args) => run_flow(args, global),
        WorkforceCommand::Replay(args) => replay(args, global),
        WorkforceCommand::Resume(args) => resume(args, global),
        WorkforceCommand::Runs(RunsCommand::List { json }) => runs_list(json, global),
        WorkforceCommand::Runs(RunsCommand::Show {
            run_id,
            status,
            json,
        }) => runs_show(&run_id, &status, json, global),
        WorkforceCommand::Simulate(args) => simulate(args, global),
        WorkforceCommand::Cancel(args) => cancel(args, global),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The run `arg` names: a whole id, `last` (the run created most recently), or a prefix of
/// one (4 or more hex digits, dashes optional) that only one run of the database starts with.
pub(crate) fn resolve_run_id(
    store: &agent_runtime_store::Store,
    arg: &str,
) -> anyhow::Result<RunId> {
    if let Ok(id) = arg.parse::<RunId>() {
        return Ok(id);
    }
    let usage = |m: String| -> anyhow::Error { CliError::Usage(m).into() };
    let hex = |id: &RunId| id.to_string().replace('-', "");
    if arg == "last" {
        // The run that began last in the log with a `run.created` (a gateway's own ids are in
        // the log too): not the newest id, since a simulation's id follows from its seed and
        // virtual clock.
        let mut ids = store.run_ids_in_log_order()?;
        ids.reverse();
        for id in ids {
            let q = EventQuery {
                run_id: Some(id),
                kinds: vec![EventKind::RunCreated],
                limit: Some(1),
                ..EventQuery::default()
            };
            if !query(store, q)?.is_empty() {
                return Ok(id);
            }
        }
        return Err(usage("no runs in the event log yet".into()));
    }
    let prefix = arg.to_ascii_lowercase().replace('-', "");
    if prefix.len() < 4 || prefix.len() > 32 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(usage(format!(
            "invalid run id {:?}: expected a run id (see `agent-runtime runs list`), 4 to 32 of \
             its first hex digits, or `last`",
            agent_runtime_core::names::shown(arg)
        )));
    }
    let matching: Vec<RunId> = store
        .run_ids()?
        .into_iter()
        .filter(|id| hex(id).starts_with(&prefix))
        .collect();
    match matching.as_slice() {
        [one] => Ok(*one),
        [] => Err(no_run(arg)),
        many => {
            let shown: Vec<String> = many.iter().take(3).map(ToString::to_string).collect();
            Err(usage(format!(
                "run id {arg} matches {} runs ({}{}); give more of it",
                many.len(),
                shown.join(", "),
                if many.len() > 3 { ", ..." } else { "" }
            )))
        }
    }
}

fn driver_error(e: DriverError) -> anyhow::Error {
    match e {
        DriverError::Unavailable(m) => CliError::Usage(m).into(),
        DriverError::Arguments { .. } | DriverError::Graph(_) => {
            CliError::Usage(e.to_string()).into()
        }
        DriverError::NoRun(id) => no_run(id),
        DriverError::Finished { .. }
        | DriverError::Diverged { .. }
        | DriverError::Claimed(_)
        | DriverError::NewerLog { .. } => CliError::Failed(e.to_string()).into(),
        other => anyhow::Error::new(other),
    }
}

/// Live progress: one rewritten line on a terminal, plain lines otherwise (on stderr).
///
/// The line's counts are the engine's own: a tally of every task's state (see [`Engine::tally`])
/// taken at the first batch, then kept up to date for each task an event touches, so they hold
/// after a resume (tasks done before the crash count) and after a subtree's cancellation (tasks
/// that never started are not taken from `running`). The line is cut to the terminal's width (a
/// wrapped line cannot be rewritten) and not redrawn while an approval prompt is open.
struct Progress {
    tty: bool,
    state: Mutex<ProgressState>,
}

/// The state and attempts each task of a run was counted with, by task.
type CountedStates = std::collections::HashMap<TaskId, (agent_runtime_workforce::TaskStatus, u32)>;

#[derive(Default)]
struct ProgressState {
    /// The tally, and the state each task was counted in.
    tally: Option<(agent_runtime_workforce::TaskTally, CountedStates)>,
    /// Plain lines held while an approval prompt is open, printed after it.
    held: Vec<String>,
    /// The run, once an event of it is durable: what a failure names for `resume`.
    run_id: Option<RunId>,
}

impl ProgressState {
    fn tally(
        &mut self,
        events: &[EncodedEvent],
        engine: &Engine,
    ) -> agent_runtime_workforce::TaskTally {
        let (tally, counted) = self.tally.get_or_insert_with(|| {
            let mut tally = agent_runtime_workforce::TaskTally::default();
            let counted = engine
                .task_states()
                .map(|(id, status, attempts)| {
                    tally.add(status, attempts);
                    (id, (status, attempts))
                })
                .collect();
            (tally, counted)
        });
        for task in events.iter().filter_map(EncodedEvent::task_id) {
            let Some(now) = engine.task_state(task) else {
                continue;
            };
            let before = counted.insert(task, now);
            if before != Some(now) {
                if let Some((status, attempts)) = before {
                    tally.remove(status, attempts);
                }
                tally.add(now.0, now.1);
            }
        }
        *tally
    }
}

impl Progress {
    fn new() -> Self {
        Progress {
            tty: crate::terminal::stderr_is_smart_terminal(),
            state: Mutex::new(ProgressState::default()),
        }
    }
    fn finish(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut err = std::io::stderr().lock();
        for line in state.held.drain(..) {
            let _ = writeln!(err, "{line}");
        }
        if self.tty {
            let _ = writeln!(err);
        }
    }
}

/// The progress line's text, cut to `columns` (less one: writing the last column makes some
/// terminals wrap).
fn progress_line(t: &agent_runtime_workforce::TaskTally, columns: Option<usize>) -> String {
    let mut line = format!(
        "done {}  running {}  failed {}  retried {}  skipped {}",
        t.completed, t.running, t.failed, t.retried, t.skipped
    );
    if t.cancelled > 0 {
        line.push_str(&format!("  cancelled {}", t.cancelled));
    }
    if let Some(columns) = columns {
        // ASCII only: bytes are columns.
        line.truncate(columns.saturating_sub(1));
    }
    line
}

impl Observer for Progress {
    fn on_events(&self, events: &[EncodedEvent], engine: &Engine) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.run_id = Some(engine.run_id());
        let mut err = std::io::stderr().lock();
        if self.tty {
            let tally = state.tally(events, engine);
            if !crate::terminal::prompt_open() {
                let line = progress_line(&tally, crate::terminal::stderr_columns());
                let _ = write!(err, "\r\x1b[2K{line}");
                let _ = err.flush();
            }
            return;
        }
        for e in events {
            if let Some(line) = plain_line(e, engine) {
                // A message or reason comes from a tool or the graph: its control characters
                // are escaped.
                state.held.push(terminal_text(&line).into_owned());
            }
        }
        if !crate::terminal::prompt_open() {
            for line in state.held.drain(..) {
                let _ = writeln!(err, "{line}");
            }
        }
    }
}

/// The plain line an event gets when stderr is not a terminal, if any.
fn plain_line(e: &EncodedEvent, engine: &Engine) -> Option<String> {
    let kind = e.kind();
    if !matches!(
        kind,
        EventKind::TaskStarted
            | EventKind::TaskCompleted
            | EventKind::TaskFailed
            | EventKind::TaskRetryScheduled
            | EventKind::TaskSkipped
            | EventKind::TaskCancelled
            | EventKind::TaskSpawned
    ) {
        return None;
    }
    // The log's bytes are canonical JSON the engine wrote; a payload that does not parse only
    // loses its details on this line.
    let payload: serde_json::Value = serde_json::from_slice(e.payload_json()).unwrap_or_default();
    let name = e.task_id().and_then(|t| engine.task_name(t)).unwrap_or("");
    match kind {
        EventKind::TaskStarted => {
            let attempt = payload["attempt"].as_u64().unwrap_or(1);
            Some(if attempt > 1 {
                format!("task {name}: started (attempt {attempt})")
            } else {
                format!("task {name}: started")
            })
        }
        EventKind::TaskCompleted => {
            if payload.get("substituted").is_none() {
                Some(format!("task {name}: completed"))
            } else {
                let policy = e.task_id().and_then(|t| engine.on_failure_of(t));
                Some(format!(
                    "task {name}: completed ({})",
                    agent_runtime_workforce::state::substitution_note(policy)
                ))
            }
        }
        EventKind::TaskFailed => Some(format!(
            "task {name}: failed ({}: {})",
            payload["class"].as_str().unwrap_or("?"),
            payload["message"].as_str().unwrap_or("")
        )),
        EventKind::TaskRetryScheduled => Some(format!(
            "task {name}: retry in {} ms",
            payload["delay_ms"].as_u64().unwrap_or(0)
        )),
        EventKind::TaskSkipped => Some(format!(
            "task {name}: skipped ({})",
            payload["reason"].as_str().unwrap_or("")
        )),
        EventKind::TaskCancelled if payload.get("request").is_none() => {
            Some(format!("task {name}: cancelled"))
        }
        EventKind::TaskSpawned => Some(format!("task {name}: spawned")),
        _ => None,
    }
}

/// CPU time of the store's writer and sync threads between two readings, per unit (task or
/// agent), ns: how near the single writer is to bounding a run.
fn store_threads(
    before: &agent_runtime_store::WriterStats,
    after: &agent_runtime_store::WriterStats,
    units: u32,
) -> serde_json::Value {
    let per = |a: Option<u64>, b: Option<u64>| {
        a.zip(b)
            .map(|(a, b)| b.saturating_sub(a) as f64 / f64::from(units.max(1)))
    };
    json!({
        "writer_cpu_ns": per(before.writer_cpu_ns, after.writer_cpu_ns),
        "sync_cpu_ns": per(before.sync_cpu_ns, after.sync_cpu_ns),
    })
}

/// What a run or resume needs: the store, and the gateway's tools (policy, sandbox, MCP,
/// audit) in front of every tool call. The gateway records its audit events in the same store
/// under the run's id; replay tells them from the run's own (see
/// `driver::is_workforce_event`).
async fn options(
    store: &agent_runtime_store::Store,
    seed: u64,
    gateway: &GatewayOpts,
    progress: Arc<Progress>,
    tools: Vec<String>,
) -> anyhow::Result<(
    RunOptions,
    agent_runtime_gateway::mcp::McpManager,
    agent_runtime_gateway::EndsInFlight,
)> {
    let sink: Arc<dyn EventSink> = Arc::new(store.clone());
    // Only the MCP servers of the tools the graph calls are started.
    let (gw, manager) = crate::gateway::build(
        gateway,
        sink.clone(),
        Arc::new(TerminalApproval),
        false,
        crate::gateway::Natives::WithWorkforce,
        crate::gateway::Servers::Owning(tools),
    )
    .await?;
    let opts = RunOptions {
        seed,
        sink,
        clock: Arc::new(SystemClock),
        tools: Arc::new(
            ToolRegistry::from_tools(gw.tool_handles()).with_unavailable({
                // A tool of an MCP server that cannot be reached is missing, not unknown.
                let registry = gw.registry().clone();
                move |tool| {
                    registry.unreachable_reason(tool).map(|(server, why)| {
                        format!("MCP server {server:?} cannot be reached: {why}")
                    })
                }
            }),
        ),
        models: Arc::new(NoModels),
        observer: Some(progress),
        // `{{ secrets.NAME }}` reads AGENT_RUNTIME_SECRET_NAME, which `main` moved out of the
        // environment into memory, and nothing else.
        secrets: crate::common::graph_secrets(),
        labels: Default::default(),
    };
    Ok((opts, manager, gw.ends_in_flight()))
}

/// Cancellation requests for any run, from `run.cancel_requested` events that `agent-runtime
/// cancel` appends after sequence number `after`; the driver keeps those for its own run.
/// A thread polls the store a few times a second (an indexed lookup by kind; polling rather
/// than following, which would wake on every commit of the run itself). Dropping the returned
/// guard stops the thread and waits for it, so that its handle on the store is gone before the
/// store closes (and checkpoints).
fn follow_cancel_requests(
    store: &agent_runtime_store::Store,
    pending: Vec<driver::ControlRequest>,
    mut after: u64,
) -> anyhow::Result<(
    tokio::sync::mpsc::UnboundedReceiver<driver::ControlRequest>,
    tokio::sync::mpsc::UnboundedSender<driver::ControlRequest>,
    StopOnDrop,
)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let also = tx.clone();
    // Older than any request after `after`: queued first.
    for request in pending {
        let _ = tx.send(request);
    }
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let store = store.clone();
    let poll = move |after: &mut u64| {
        // Everything up to the head read before the query is looked at by it: the next tick
        // starts there, so a long run's log is not read again at every tick (kinds are
        // filtered while reading, not through an index).
        let head = store.head().ok().flatten().map_or(0, |(seq, _)| seq);
        let query = EventQuery {
            kinds: vec![EventKind::RunCancelRequested],
            after_seq: Some(*after),
            ..EventQuery::default()
        };
        // A failed read is tried again at the next tick.
        let Ok(found) = store.query_blocking(&query) else {
            return;
        };
        *after = (*after).max(head);
        for e in found {
            *after = (*after).max(e.seq);
            if let Some(r) = driver::ControlRequest::from_event(&e) {
                let _ = tx.send(r);
            }
        }
    };
    // The requests already made are queued before the run is driven: a resume applies them
    // before it starts anything (see `driver::resume_controlled`).
    poll(&mut after);
    let handle = std::thread::Builder::new()
        .name("cancel-requests".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(std::time::Duration::from_millis(150))
            {
                poll(&mut after);
            }
        })?;
    Ok((
        rx,
        also,
        StopOnDrop {
            stop: Some(stop),
            handle: Some(handle),
        },
    ))
}

/// Stops a helper thread (by closing its channel) and joins it when dropped.
struct StopOnDrop {
    stop: Option<std::sync::mpsc::Sender<()>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Prints the outcome; `wall` is this process's time, which for a resumed run is only its
/// part (`runs show` has the whole).
fn report_outcome(
    out: &Outcome,
    json_out: bool,
    wall: std::time::Duration,
    resumed: bool,
) -> anyhow::Result<ExitCode> {
    if json_out {
        outln!("{}", serde_json::to_string_pretty(out)?);
    } else {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for t in &out.tasks {
            *counts
                .entry(format!("{:?}", t.status).to_lowercase())
                .or_default() += 1;
        }
        let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        outln!(
            "run {}: {} in {:.2}s{} ({} task{}: {})",
            out.run_id,
            format!("{:?}", out.status).to_lowercase(),
            wall.as_secs_f64(),
            if resumed { " of this resume" } else { "" },
            out.tasks.len(),
            if out.tasks.len() == 1 { "" } else { "s" },
            counts.join(", ")
        );
        outln!("log hash: {}", out.log_hash);
        outln!("outputs:");
        // serde_json escapes C0 controls in strings, not DEL or C1: escape those line by line.
        for line in serde_json::to_string_pretty(&out.outputs)?.lines() {
            outln!("{}", terminal_text(line));
        }
    }
    // A run whose tasks were cancelled (`cancel --task`) ends `completed` once the rest is
    // done, but without what the cancelled tasks would have given: a script must not read
    // that as success.
    let cancelled: Vec<&str> = out
        .tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Cancelled)
        .map(|t| t.id.as_str())
        .collect();
    match out.status {
        RunStatus::Completed if cancelled.is_empty() => Ok(ExitCode::SUCCESS),
        RunStatus::Completed => Err(CliError::Failed(format!(
            "run {} completed with {} cancelled ({}): {} missing",
            out.run_id,
            if cancelled.len() == 1 {
                "1 task".to_string()
            } else {
                format!("{} tasks", cancelled.len())
            },
            shown_list(&cancelled),
            if cancelled.len() == 1 {
                "its output is"
            } else {
                "their outputs are"
            }
        ))
        .into()),
        RunStatus::Failed => Err(CliError::Failed(format!(
            "run {} failed: {}",
            out.run_id,
            out.error.clone().unwrap_or_default()
        ))
        .into()),
        RunStatus::Cancelled => Err(CliError::Failed(match &out.error {
            Some(why) => format!("run {} was cancelled: {why}", out.run_id),
            None => format!("run {} was cancelled", out.run_id),
        })
        .into()),
        RunStatus::Running => {
            Err(CliError::Failed(format!("run {} did not finish", out.run_id)).into())
        }
    }
}

/// Up to five names, backquoted, and how many more.
fn shown_list(names: &[&str]) -> String {
    let mut shown: Vec<String> = names
        .iter()
        .take(5)
        .map(|n| format!("`{}`", agent_runtime_core::names::shown(n)))
        .collect();
    if names.len() > 5 {
        shown.push(format!("{} more", names.len() - 5));
    }
    shown.join(", ")
}

fn run_flow(mut args: RunArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let loaded = if args.flow.as_os_str() == "-" {
        // Errors then name `<stdin>`, as the checks below do.
        args.flow = PathBuf::from("<stdin>");
        agent_runtime_workforce::read_graph_source(std::io::stdin().lock(), &args.flow)
    } else {
        agent_runtime_workforce::load_graph_source(&args.flow)
    };
    let (graph, text) = loaded.map_err(|e| CliError::Usage(e.to_string()))?;
    for field in secret_looking_arguments(&graph) {
        eprintln!(
            "warning: {field} looks like a secret written into the graph; the run's events \
             record it as written (write `{{{{ secrets.NAME }}}}` and set \
             AGENT_RUNTIME_SECRET_NAME instead, see docs/workforce.md)"
        );
    }
    // A fixed default would give runs started in the same millisecond (a script starting
    // several at once) the same id; the one the run gets is recorded in it either way.
    // At most 53 bits: JSON readers that hold numbers as doubles (`jq` before 1.7, JavaScript)
    // read such a seed back exactly, so a run can be repeated from `runs show --json`.
    let seed = args
        .seed
        .unwrap_or_else(|| agent_runtime_core::os_random_u64() & MAX_SEED);
    let labels = origin_labels(&args.gateway);
    // The run records its graph in one event, as JSON with YAML's aliases expanded, which may
    // be far larger than the file: refused here, naming the file, rather than by the log once
    // the run has begun.
    let created_bytes = Engine::created_event_labelled_encoded(
        RunId::from_bytes([0; 16]),
        &graph,
        seed,
        Timestamp::from_unix_nanos(0),
        &labels,
    )
    .payload_json()
    .len();
    if created_bytes > agent_runtime_store::MAX_PAYLOAD_BYTES {
        return Err(CliError::Usage(format!(
            "task graph {}: the run would record it as {created_bytes} bytes of JSON (YAML \
             aliases written out), over the event log's limit of {} bytes for one event; \
             make the graph smaller (large inputs belong in files its tools read)",
            args.flow.display(),
            agent_runtime_store::MAX_PAYLOAD_BYTES
        ))
        .into());
    }
    let store = global.open_store()?;
    let head = store.head()?.map_or(0, |(seq, _)| seq);
    drive(
        &store,
        seed,
        RunGateway {
            opts: &args.gateway,
            tools: graph.tool_names().into_iter().map(String::from).collect(),
        },
        Requests {
            pending: Vec::new(),
            after: head,
        },
        args.json,
        None,
        |mut opts, token, controls| {
            opts.labels = labels;
            // Checked here, where the graph's text is at hand, so that an unknown tool is
            // named by line and column; the driver checks again, without them.
            let tools = graph
                .check_tools_in_explained(&text, &args.flow, &opts.tools.names(), &|t| {
                    opts.tools.unavailable(t)
                })
                .and_then(|()| {
                    graph.check_args_in(&text, &args.flow, |tool, a| {
                        opts.tools.check_args(tool, a).map_err(|e| e.message)
                    })
                })
                .and_then(|()| {
                    // The secrets come from this process's environment: known now.
                    graph.check_secrets_in(&text, &args.flow, |name| {
                        match agent_runtime_workforce::template::usable_secret(
                            opts.secrets.as_ref(),
                            name,
                        ) {
                            Ok(_) => Ok(()),
                            Err(e) if opts.secrets.secret(name).is_none() => {
                                Err(format!("{e}: set AGENT_RUNTIME_SECRET_{name}"))
                            }
                            Err(e) => Err(e),
                        }
                    })
                })
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    graph
                        .check_models_in(&text, &args.flow, |p| opts.models.provider(p).is_some())
                        .map_err(|e| {
                            format!(
                                "{e}; the command line has no model providers yet: run agent \
                                 tasks through the library (docs/workforce.md, Agent tasks)"
                            )
                        })
                });
            async move {
                tools.map_err(DriverError::Unavailable)?;
                driver::run_graph_controlled(graph, opts, token, Some(controls)).await
            }
        },
    )
}

/// Fields of the graph's tool arguments that look like secrets written in: a string of at least
/// eight characters under a key that names one (`api_key`, `token`, ...) and not a template.
/// The run records its arguments as written, so these end up in the event log (replay needs
/// exactly what the scheduler read); the gateway's own audit trail redacts them.
fn secret_looking_arguments(graph: &agent_runtime_workforce::TaskGraph) -> Vec<String> {
    fn walk(path: &str, value: &Value, found: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    let here = format!("{path}.{key}");
                    match v {
                        Value::String(text)
                            if agent_runtime_gateway::redact::is_secret_key(key)
                                && text.len() >= 8
                                && !text.contains("{{") =>
                        {
                            found.push(here)
                        }
                        _ => walk(&here, v, found),
                    }
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(&format!("{path}[{i}]"), v, found);
                }
            }
            _ => {}
        }
    }
    let mut found = Vec::new();
    for task in &graph.tasks {
        if let Some(args) = &task.args {
            walk(&format!("task {} args", task.id), args, &mut found);
        }
    }
    found
}

/// The labels `run` and `resume` record (see `RunOptions::labels`): the folder they run in and
/// the gateway files they were given, as absolute paths, so that a later `resume` can go on in
/// the same surroundings (see [`go_where_started`]). A path that is not UTF-8 is recorded as
/// `KEY_not_utf8`, shown with replacement characters: a resume cannot go back to it by itself.
fn origin_labels(gateway: &GatewayOpts) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut add = |key: &str, path: Option<PathBuf>| match path.as_deref().map(|p| (p, p.to_str()))
    {
        Some((_, Some(text))) => {
            labels.insert(key.to_string(), text.to_string());
        }
        Some((p, None)) => {
            labels.insert(format!("{key}_not_utf8"), p.to_string_lossy().into_owned());
        }
        None => {}
    };
    add("workspace", std::env::current_dir().ok());
    for (key, _, path) in gateway_files(gateway) {
        add(
            key,
            path.as_deref().and_then(|p| std::path::absolute(p).ok()),
        );
    }
    labels
}

/// The gateway files a run is given, each with its label and its flag.
fn gateway_files(gateway: &GatewayOpts) -> [(&'static str, &'static str, &Option<PathBuf>); 3] {
    [
        ("gateway_config", "--config", &gateway.config),
        ("policy", "--policy", &gateway.policy),
        ("mcp_config", "--mcp-config", &gateway.mcp_config),
    ]
}

/// Whether `flag` is on this process's command line (`--config PATH` or `--config=PATH`), as
/// opposed to filled in from its environment variable.
fn on_command_line(flag: &str) -> bool {
    std::env::args_os().skip(1).any(|a| {
        a == flag
            || a.to_str().is_some_and(|a| {
                a.strip_prefix(flag)
                    .is_some_and(|rest| rest.starts_with('='))
            })
    })
}

/// Makes `resume` go on where the run last went on (`labels`: of its creation, or of its last
/// resume): in that folder (tools resolve relative paths against it, unless `--here`), with the
/// gateway files used there unless others are given on the command line now (they win over
/// `AGENT_RUNTIME_GATEWAY_CONFIG`, which may name a file relative to another folder). Says so
/// on standard error when that differs from how `resume` was called.
fn go_where_started(
    run_id: RunId,
    labels: &BTreeMap<String, String>,
    args: &mut ResumeArgs,
) -> anyhow::Result<()> {
    // Each file as resume will use it, decided from the labels and the command line, then set.
    let mut chosen: Vec<Option<PathBuf>> = Vec::with_capacity(3);
    for (key, flag, given) in gateway_files(&args.gateway) {
        let file = if given.is_some() && on_command_line(flag) {
            // Given now: from where this command runs.
            given.as_deref().map(std::path::absolute).transpose()?
        } else if let Some(recorded) = labels.get(key) {
            let recorded = PathBuf::from(recorded);
            if !recorded.exists() {
                return Err(CliError::Failed(format!(
                    "run {run_id} was started with {flag} {}, which is gone; pass {flag} to \
                     resume it with another",
                    recorded.display()
                ))
                .into());
            }
            eprintln!(
                "resume: with {flag} {}, as the run ran before",
                recorded.display()
            );
            Some(recorded)
        } else if let Some(lossy) = labels.get(&format!("{key}_not_utf8")) {
            return Err(CliError::Failed(format!(
                "run {run_id} was started with {flag} {lossy}, a path that is not UTF-8, which \
                 resume cannot find again by itself; pass {flag}"
            ))
            .into());
        } else {
            // From the environment, and the run recorded no file: as `run` would read it.
            given.as_deref().map(std::path::absolute).transpose()?
        };
        chosen.push(file);
    }
    if let [config, policy, mcp_config] = &mut chosen[..] {
        args.gateway.config = config.take();
        args.gateway.policy = policy.take();
        args.gateway.mcp_config = mcp_config.take();
    }
    if args.here {
        return Ok(());
    }
    let here = std::env::current_dir().ok();
    if let Some(lossy) = labels.get("workspace_not_utf8") {
        if here
            .as_deref()
            .is_some_and(|h| h.to_string_lossy() == lossy.as_str())
        {
            return Ok(());
        }
        return Err(CliError::Failed(format!(
            "run {run_id} started in {lossy}, a folder whose name is not UTF-8, which resume \
             cannot find again by itself; resume it from there, or pass --here to go on in this \
             folder"
        ))
        .into());
    }
    let Some(folder) = labels.get("workspace").map(PathBuf::from) else {
        return Ok(());
    };
    let same = |a: &std::path::Path, b: &std::path::Path| {
        a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
    };
    if here.as_deref().is_some_and(|h| same(h, &folder)) {
        return Ok(());
    }
    if !folder.is_dir() {
        return Err(CliError::Failed(format!(
            "run {run_id} started in {}, which is gone: its tools' relative paths resolve \
             there; create it, or pass --here to go on in this folder",
            folder.display()
        ))
        .into());
    }
    std::env::set_current_dir(&folder).map_err(|e| {
        CliError::Failed(format!(
            "run {run_id} started in {}, which cannot be entered ({e}); pass --here to go on \
             in this folder",
            folder.display()
        ))
    })?;
    eprintln!(
        "resume: in {}, where the run ran before (--here: in this folder)",
        folder.display()
    );
    Ok(())
}

/// The cancellation requests a run or resume takes: `pending` first (made before `after` and
/// never carried out), then each one made after sequence number `after`.
struct Requests {
    pending: Vec<driver::ControlRequest>,
    after: u64,
}

/// The gateway a run calls its tools through, and the tools its graph calls: only their MCP
/// servers are started.
struct RunGateway<'a> {
    opts: &'a GatewayOpts,
    tools: Vec<String>,
}

/// What `run` and `resume` share: the gateway's tools, the cancellation `requests`, Ctrl-C,
/// the progress display and the final report.
fn drive<Go, Fut>(
    store: &agent_runtime_store::Store,
    seed: u64,
    gateway: RunGateway<'_>,
    requests: Requests,
    json_out: bool,
    resuming: Option<RunId>,
    go: Go,
) -> anyhow::Result<ExitCode>
where
    Go: FnOnce(
        RunOptions,
        CancellationToken,
        tokio::sync::mpsc::UnboundedReceiver<driver::ControlRequest>,
    ) -> Fut,
    Fut: std::future::Future<Output = Result<Outcome, DriverError>>,
{
    let progress = Arc::new(Progress::new());
    let (controls, requests_tx, _follower) =
        follow_cancel_requests(store, requests.pending, requests.after)?;
    let rt = runtime()?;
    let started = Instant::now();
    let out = rt.block_on(async {
        let (opts, mcp, ends) =
            options(store, seed, gateway.opts, progress.clone(), gateway.tools).await?;
        let token = CancellationToken::new();
        // Ctrl-C is a cancellation request by the person at the terminal, recorded as theirs
        // (`person:$USER`), as `cancel` from another terminal is; a second one ends the
        // process at once.
        let by = match crate::common::person() {
            agent_runtime_core::Actor::Person(name) => name,
            other => other.to_string(),
        };
        crate::terminal::on_ctrl_c(move || {
            let _ = requests_tx.send(driver::ControlRequest::CancelRun {
                run_id: None,
                by,
                reason: "interrupted (Ctrl-C)".into(),
            });
        });
        let out = go(opts, token, controls).await;
        // The ends of calls the run dropped (timed out, cancelled) are appended by tasks of
        // their own: in the log before the runtime goes.
        let _ = tokio::time::timeout(crate::gateway::ENDS_WAIT, ends.recorded()).await;
        mcp.shutdown().await;
        anyhow::Ok(out)
    })?;
    progress.finish();
    let out = out.map_err(|e| {
        // The log failed under a run that exists (its first events are durable): the run is
        // left as a crash leaves it, and the error says how to go on with it (without
        // `--json`, the run's id is printed only at its end).
        let run_id = progress
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .run_id
            .or(resuming);
        match (&e, run_id) {
            (DriverError::Log(_), Some(run_id)) => {
                // Counted from the log, on this rare path, rather than kept for every run.
                let running = run_summary(store, run_id).map_or(0, |s| {
                    s.tasks
                        .iter()
                        .filter(|t| {
                            t.status == "running"
                                || t.status == agent_runtime_workforce::state::WAITING_FOR_APPROVAL
                        })
                        .count()
                });
                // A stop says "resumable"; what the resume does with the calls in flight
                // (the log cannot hold whether they ran) is said too, since a task without
                // `retry` then fails.
                let in_flight = match running {
                    0 => String::new(),
                    1 => "; the call of the 1 task running counts as interrupted there, and \
                          goes on only as that task's `retry` allows"
                        .to_string(),
                    n => format!(
                        "; the calls of the {n} tasks running count as interrupted there, and \
                         go on only as each task's `retry` allows"
                    ),
                };
                anyhow::Error::new(e).context(format!(
                    "run {run_id} stopped (resumable: `agent-runtime resume {run_id}` once the \
                     cause is fixed{in_flight})"
                ))
            }
            _ => driver_error(e),
        }
    })?;
    report_outcome(&out, json_out, started.elapsed(), resuming.is_some())
}

fn replay(args: ReplayArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let store = global.open_store_read_only()?;
    let run_id = resolve_run_id(&store, &args.run_id)?;
    let rt = runtime()?;
    let report = rt
        .block_on(driver::replay(&store, run_id))
        .map_err(driver_error)?;
    // A run that has not ended is either still being driven, or was interrupted (a resume
    // finishes it), or is a simulation that was stopped (not resumed). Named as `runs list`
    // names them: the log alone says `running` for all three.
    let (state, why) = if report.finished {
        (format!("{:?}", report.status).to_lowercase(), "")
    } else if store.run_is_claimed(run_id)? {
        ("running".into(), "another process is driving it")
    } else if is_simulation(&store, run_id)? {
        ("stopped".into(), "the simulation was stopped")
    } else {
        ("interrupted".into(), "resume it")
    };
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["status"] = Value::from(state);
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let status = if report.finished {
            state
        } else {
            format!("{state}, not finished: {why}")
        };
        outln!(
            "replay of run {}: {} events match ({status})",
            report.run_id,
            report.events,
        );
        outln!("log hash: {}", report.log_hash);
    }
    Ok(ExitCode::SUCCESS)
}

fn resume(mut args: ResumeArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    // Paths given here name files from where this command runs, which may not be where the
    // run goes on (see `go_where_started`).
    let global = GlobalArgs {
        db: global.db.as_deref().map(std::path::absolute).transpose()?,
        ..global.clone()
    };
    let store = global.open_existing_store()?;
    let run_id = resolve_run_id(&store, &args.run_id)?;
    if let Some((_, status)) = ended_as(&store, run_id)? {
        return Err(driver_error(DriverError::Finished {
            run_id,
            status: status.into(),
        }));
    }
    // One pass over the run's events: where its last own event is (requests made after it were
    // never acted on, the process that drove it had died: they take effect now, as do those
    // made while it resumes), whether it is a simulation, and where it last went on
    // (the labels of its creation, then of each resume).
    let mut last_own = None;
    let mut simulation_seed: Option<u64> = None;
    let mut labels = BTreeMap::new();
    // The task cancellations the run carried out, by whom and of which task, where.
    let mut carried_out: Vec<(u64, String, String)> = Vec::new();
    // The tools its graph calls: only their MCP servers are started.
    let mut tools: Vec<String> = Vec::new();
    run_summary_and(&store, run_id, |e| {
        if e.kind == EventKind::RunCreated
            && let Ok(graph) = agent_runtime_workforce::engine::graph_of_created(&e.payload)
        {
            tools = graph.tool_names().into_iter().map(String::from).collect();
        }
        if e.kind == EventKind::TaskCancelled
            && let agent_runtime_core::Actor::Person(by) = &e.actor
            && let Some(task) = e.payload.get("task").and_then(Value::as_str)
        {
            carried_out.push((e.seq, by.clone(), task.to_string()));
        }
        if e.kind == EventKind::RunCreated
            && let Some(sim) = e.payload.get("simulation")
        {
            simulation_seed = Some(sim.get("seed").and_then(Value::as_u64).unwrap_or_default());
        }
        if matches!(e.kind, EventKind::RunCreated | EventKind::RunResumed) {
            let recorded = driver::created_labels(&e.payload);
            if !recorded.is_empty() {
                labels = recorded;
            }
        }
        last_own = Some(e.seq)
    })?;
    // A run that ended since `ended_as` looked (its process was finishing it) is refused by the
    // driver, which claims the run first: `DriverError::Finished`, the same words.
    if let Some(seed) = simulation_seed {
        return Err(CliError::Failed(format!(
            "run {run_id} is a simulation (seed {seed}), which is not resumed: its virtual \
             clock and synthetic calls live only in the process that ran it. `replay` checks \
             what it recorded; `simulate` it again with --db naming another database (a \
             simulation's run id follows from its seed)"
        ))
        .into());
    }
    let after = match last_own {
        Some(seq) => seq,
        None => store.head()?.map_or(0, |(seq, _)| seq),
    };
    let pending = requests_not_carried_out(&store, run_id, after, &carried_out)?;
    go_where_started(run_id, &labels, &mut args)?;
    // Recorded in `run.resumed`: a later resume goes on where this one did.
    let here = origin_labels(&args.gateway);
    drive(
        &store,
        0,
        RunGateway {
            opts: &args.gateway,
            tools,
        },
        Requests { pending, after },
        args.json,
        Some(run_id),
        |mut opts, token, controls| {
            opts.labels = here;
            driver::resume_controlled(&store, run_id, opts, token, Some(controls))
        },
    )
}

/// The cancellation requests for `run_id` made before `before` (the run's last own event)
/// that the process driving it never carried out: it polls for requests a few times a second,
/// so one made just before it died may have been acknowledged to the person (`cancel` exits 0)
/// and not seen. A whole-run request was never carried out, or the run would have ended; a
/// task's was if the run recorded that person's cancellation of that task after it.
fn requests_not_carried_out(
    store: &agent_runtime_store::Store,
    run_id: RunId,
    before: u64,
    carried_out: &[(u64, String, String)],
) -> anyhow::Result<Vec<driver::ControlRequest>> {
    let requests = query(
        store,
        EventQuery {
            run_id: Some(run_id),
            kinds: vec![EventKind::RunCancelRequested],
            ..EventQuery::default()
        },
    )?;
    let mut matched = vec![false; carried_out.len()];
    let mut pending = Vec::new();
    for e in requests.iter().filter(|e| e.seq <= before) {
        let Some(request) = driver::ControlRequest::from_event(e) else {
            continue;
        };
        if let driver::ControlRequest::CancelTask { by, task, .. } = &request {
            let done = carried_out
                .iter()
                .enumerate()
                .find(|(i, (seq, who, what))| {
                    !matched[*i] && *seq > e.seq && who == by && what == task
                });
            if let Some((i, _)) = done {
                matched[i] = true;
                continue;
            }
        }
        pending.push(request);
    }
    Ok(pending)
}

fn query(
    store: &agent_runtime_store::Store,
    q: EventQuery,
) -> anyhow::Result<Vec<agent_runtime_core::Envelope>> {
    let rt = runtime()?;
    rt.block_on(EventSource::query(store, q))
        .map_err(|e| anyhow::anyhow!(e.message))
}

fn duration(s: &RunSummary) -> String {
    match s.ended {
        Some(end) => format!(
            "{:.2}s",
            end.saturating_duration_since(s.created).as_secs_f64()
        ),
        None => "-".into(),
    }
}

fn short_time(t: Timestamp) -> String {
    let s = t.to_string();
    // 2026-11-27T14:36:53.123456789Z -> 2026-11-27 14:36:53
    s.get(..19).map_or(s.clone(), |p| p.replace('T', " "))
}

/// Calls `f` with each event `query` matches, in order, reading them a page at a time (the
/// query's `after_seq` and `limit` are the pager's): a log of millions of events is never in
/// memory at once.
fn each_event(
    store: &agent_runtime_store::Store,
    query: EventQuery,
    mut f: impl FnMut(&agent_runtime_core::Envelope),
) -> anyhow::Result<()> {
    const PAGE: usize = 4096;
    let rt = runtime()?;
    let mut after = 0;
    loop {
        let page = rt
            .block_on(EventSource::query(
                store,
                EventQuery {
                    after_seq: Some(after),
                    limit: Some(PAGE),
                    ..query.clone()
                },
            ))
            .map_err(|e| anyhow::anyhow!(e.message))?;
        page.iter().for_each(&mut f);
        match page.last() {
            Some(last) if page.len() == PAGE => after = last.seq,
            _ => return Ok(()),
        }
    }
}

/// Calls `f` with each of a run's own events (see `driver::is_workforce_event`: not the
/// gateway's records, nor requests, under its id), in order, a page at a time.
fn each_own_event(
    store: &agent_runtime_store::Store,
    run_id: RunId,
    mut f: impl FnMut(&agent_runtime_core::Envelope),
) -> anyhow::Result<()> {
    let query = EventQuery {
        run_id: Some(run_id),
        ..EventQuery::default()
    };
    each_event(store, query, |e| {
        if driver::is_workforce_event(e.kind, &e.payload) {
            f(e);
        }
    })
}

/// Whether the run is a simulation (its `run.created` holds the simulation's configuration):
/// one that stopped is not resumed.
fn is_simulation(store: &agent_runtime_store::Store, run_id: RunId) -> anyhow::Result<bool> {
    let first = query(
        store,
        EventQuery {
            run_id: Some(run_id),
            limit: Some(1),
            ..EventQuery::default()
        },
    )?;
    Ok(first
        .first()
        .is_some_and(|e| e.kind == EventKind::RunCreated && e.payload.get("simulation").is_some()))
}

/// The kinds of event that end a run.
const RUN_ENDS: [EventKind; 3] = [
    EventKind::RunCompleted,
    EventKind::RunFailed,
    EventKind::RunCancelled,
];

/// How a run that ended with an event of `kind` ended, as `runs show` says it; `None` for
/// other kinds.
fn end_status(kind: EventKind) -> Option<&'static str> {
    match kind {
        EventKind::RunCompleted => Some("completed"),
        EventKind::RunFailed => Some("failed"),
        EventKind::RunCancelled => Some("cancelled"),
        _ => None,
    }
}

/// Where and how the run ended (`completed`, `failed`, `cancelled`), if it did: from its end
/// event alone, found through the run's index without folding the run. `resume` and `cancel`
/// refuse an ended run with it before they fold the rest: for a run of a million tasks that
/// fold took 11 to 13 s and 0.7 GB, only to refuse.
fn ended_as(
    store: &agent_runtime_store::Store,
    run_id: RunId,
) -> anyhow::Result<Option<(u64, &'static str)>> {
    let end = store.query_blocking(&EventQuery {
        run_id: Some(run_id),
        kinds: RUN_ENDS.to_vec(),
        limit: Some(1),
        ..Default::default()
    })?;
    Ok(end
        .first()
        .and_then(|e| end_status(e.kind).map(|status| (e.seq, status))))
}

/// A run's summary, from its own events.
fn run_summary(store: &agent_runtime_store::Store, run_id: RunId) -> anyhow::Result<RunSummary> {
    run_summary_and(store, run_id, |_| {})
}

/// [`run_summary`], handing each of the run's own events to `also` in the same pass.
fn run_summary_and(
    store: &agent_runtime_store::Store,
    run_id: RunId,
    mut also: impl FnMut(&agent_runtime_core::Envelope),
) -> anyhow::Result<RunSummary> {
    let mut fold: Option<Option<RunFold>> = None;
    each_own_event(store, run_id, |e| {
        let fold = fold.get_or_insert_with(|| RunFold::new(e));
        if let Some(fold) = fold {
            fold.push(e);
        }
        also(e);
    })?;
    fold.flatten()
        .map(RunFold::finish)
        .ok_or_else(|| no_run(run_id))
}

/// The usage error for a run the database does not hold.
fn no_run(name: impl std::fmt::Display) -> anyhow::Error {
    CliError::Usage(format!(
        "no run {} in the event log (see `agent-runtime runs list`)",
        agent_runtime_core::names::shown(&name.to_string())
    ))
    .into()
}

fn cancel(args: CancelArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let store = global.open_existing_store()?;
    let run_id = resolve_run_id(&store, &args.run_id)?;
    let nothing_to_cancel = |status: &str| -> anyhow::Error {
        CliError::Failed(format!(
            "run {run_id} already ended ({status}); nothing to cancel"
        ))
        .into()
    };
    if let Some((_, status)) = ended_as(&store, run_id)? {
        return Err(nothing_to_cancel(status));
    }
    let summary = run_summary(&store, run_id)?;
    // It may have ended while it was folded (seconds, for a large run): no request after its end.
    if summary.ended.is_some() {
        return Err(nothing_to_cancel(&summary.status));
    }
    if is_simulation(&store, run_id)? {
        return Err(CliError::Failed(format!(
            "run {run_id} is a simulation, which takes no requests (and is not resumed); \
             nothing to cancel"
        ))
        .into());
    }
    if let Some(task) = &args.task
        && !summary.tasks.iter().any(|t| &t.id == task)
    {
        let hint = agent_runtime_workforce::graph::suggestion(
            task,
            summary.tasks.iter().map(|t| t.id.as_str()),
        );
        return Err(CliError::Usage(format!("run {run_id} has no task `{task}`{hint}")).into());
    }
    if let Some(task) = &args.task
        && summary
            .tasks
            .iter()
            .any(|t| &t.id == task && t.status == "cancelled")
    {
        return Err(CliError::Failed(format!(
            "task `{task}` of run {run_id} is already cancelled; nothing to cancel"
        ))
        .into());
    }
    let mut payload = serde_json::Map::new();
    if let Some(task) = &args.task {
        payload.insert("task".into(), Value::from(task.as_str()));
    }
    match (&args.reason, &args.task) {
        (Some(reason), _) => {
            payload.insert("reason".into(), Value::from(reason.as_str()));
        }
        (None, None) => {
            payload.insert("reason".into(), Value::from("cancelled by the user"));
        }
        // A task's cancellation says itself what was cancelled with what.
        (None, Some(_)) => {}
    }
    let request = NewEvent {
        run_id,
        task_id: None,
        actor: crate::common::person(),
        kind: EventKind::RunCancelRequested,
        time: agent_runtime_core::Clock::now(&SystemClock),
        payload: Value::Object(payload),
    };
    let appended = store.append_blocking(vec![request])?;
    let seq = appended.first().map_or(0, |a| a.seq);
    // The run may end between the checks above and the request's landing, or before its
    // process reads the request (it does a few times a second): what became of it is waited
    // for briefly, so that "asked" is not said of a request nothing will read.
    let ended = args.task.as_ref().and_then(|task| {
        summary
            .tasks
            .iter()
            .find(|t| &t.id == task && t.ended.is_some())
    });
    let what = match (&args.task, ended) {
        // Its result stands; what needs it has not run yet, and is what this cancels.
        (Some(task), Some(row)) => format!(
            "what is downstream of task `{task}` (which already ended: {})",
            row.status
        ),
        (Some(task), None) => format!("task `{task}` and everything downstream of it"),
        (None, _) => "the run".to_string(),
    };
    let claimed = store.run_is_claimed(run_id)?;
    let wait = std::time::Duration::from_secs(args.wait);
    match request_outcome(&store, run_id, seq, args.task.as_deref(), claimed, wait)? {
        RequestOutcome::CarriedOut => {
            match &args.task {
                Some(_) => outln!("cancelled {what} in run {run_id} (request: event {seq})"),
                None => outln!("cancelled run {run_id} (request: event {seq})"),
            }
            return Ok(ExitCode::SUCCESS);
        }
        RequestOutcome::EndedFirst(status) => {
            return Err(CliError::Failed(format!(
                "run {run_id} ended ({status}) before it read the request (event {seq}); \
                 nothing was cancelled"
            ))
            .into());
        }
        RequestOutcome::Pending => {}
    }
    let when = if claimed {
        "the process running it records the cancellation".to_string()
    } else {
        format!(
            "no process runs it now: the cancellation takes effect when it is resumed (`agent-runtime resume {run_id}`)"
        )
    };
    outln!("asked run {run_id} to cancel {what} (event {seq}); {when}");
    Ok(ExitCode::SUCCESS)
}

/// What became of a cancellation request (event `seq`).
enum RequestOutcome {
    /// The run recorded the cancellation after it.
    CarriedOut,
    /// The run ended (with this status) without carrying it out.
    EndedFirst(String),
    /// Neither yet (or no process drives the run).
    Pending,
}

/// Waits up to `wait` (not at all when no process drives the run) for the run to carry out the
/// request at `seq`, or to end without it. The driving process reads requests every 150 ms, so
/// only one that is stuck (or a machine that is) makes `cancel` wait its whole `--wait`.
fn request_outcome(
    store: &agent_runtime_store::Store,
    run_id: RunId,
    seq: u64,
    task: Option<&str>,
    claimed: bool,
    wait: std::time::Duration,
) -> anyhow::Result<RequestOutcome> {
    // Ended before the request: its end comes before `seq`, where the loop does not look. (An
    // end after `seq` is the loop's to read: the run may have carried out the request already,
    // and the whole run's summary then said "ended first, nothing cancelled".)
    if let Some((_, status)) = ended_as(store, run_id)?.filter(|&(end, _)| end < seq) {
        return Ok(RequestOutcome::EndedFirst(status.into()));
    }
    let deadline = Instant::now() + wait;
    let by = crate::common::person();
    loop {
        let events = query(
            store,
            EventQuery {
                run_id: Some(run_id),
                after_seq: Some(seq),
                kinds: [RUN_ENDS.as_slice(), &[EventKind::TaskCancelled]].concat(),
                ..EventQuery::default()
            },
        )?;
        for e in &events {
            let ours = e.actor == by;
            match e.kind {
                EventKind::TaskCancelled
                    if ours
                        && task.is_some()
                        && e.payload.get("task").and_then(Value::as_str) == task =>
                {
                    return Ok(RequestOutcome::CarriedOut);
                }
                EventKind::RunCancelled if ours && task.is_none() => {
                    return Ok(RequestOutcome::CarriedOut);
                }
                kind => {
                    if let Some(status) = end_status(kind) {
                        return Ok(RequestOutcome::EndedFirst(status.into()));
                    }
                }
            }
        }
        if !claimed || Instant::now() >= deadline {
            return Ok(RequestOutcome::Pending);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn runs_list(json_out: bool, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let store = global.open_store_read_only()?;
    let kinds = vec![
        EventKind::RunCreated,
        EventKind::RunCompleted,
        EventKind::RunFailed,
        EventKind::RunCancelled,
    ];
    // Folded as the events are read, a page at a time, keeping of each run only what the
    // list shows: a `run.created` holds the run's whole graph.
    let mut folds: BTreeMap<RunId, RunFold> = BTreeMap::new();
    let mut order: Vec<RunId> = Vec::new();
    each_event(
        &store,
        EventQuery {
            kinds,
            ..EventQuery::default()
        },
        |e| {
            if let Some(fold) = RunFold::run_only(e) {
                order.push(e.run_id);
                folds.insert(e.run_id, fold);
            }
            if let Some(fold) = folds.get_mut(&e.run_id) {
                fold.push(e);
            }
        },
    )?;
    let mut summaries: Vec<RunSummary> = order
        .iter()
        .filter_map(|id| folds.remove(id).map(RunFold::finish))
        .collect();
    for s in &mut summaries {
        mark_running(&store, s)?;
    }
    if json_out {
        let rows: Vec<Value> = summaries
            .iter()
            .map(|s| json!({"run_id": s.run_id, "name": s.name, "status": s.status, "created": s.created, "ended": s.ended, "seed": s.seed}))
            .collect();
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if summaries.is_empty() {
        outln!("no runs");
        return Ok(ExitCode::SUCCESS);
    }
    // The name column is as wide as the longest name, up to 40 columns (longer names are cut,
    // with `…`), so that the columns after it line up; wide characters count twice.
    const NAME_MAX: usize = 40;
    let names: Vec<String> = summaries
        .iter()
        .map(|s| {
            // Escaped first, so that the column is as wide as what is printed.
            let name = terminal_text(s.name.as_deref().unwrap_or_default());
            cut_to_columns(&name, NAME_MAX).into_owned()
        })
        .collect();
    let width = names
        .iter()
        .map(|n| columns_of(n))
        .max()
        .unwrap_or(0)
        .max(4);
    outln!(
        "{:<36}  {}  {:<11}  {:<19}  {:>9}",
        "RUN",
        padded("NAME", width),
        "STATUS",
        "CREATED (UTC)",
        "DURATION"
    );
    for (s, name) in summaries.iter().zip(&names) {
        outln!(
            "{:<36}  {}  {:<11}  {:<19}  {:>9}",
            s.run_id.to_string(),
            padded(name, width),
            s.status,
            short_time(s.created),
            duration(s)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A run without an end is `interrupted` in its events (a simulation `stopped`); it is
/// `running` while a process holds its claim (see `Store::claim_run`).
/// Unclaimed, its tasks that were running when the process stopped take the run's word:
/// nothing runs them (until `resume`, which sends them through their retry policy; a stopped
/// simulation is not resumed).
fn mark_running(store: &agent_runtime_store::Store, s: &mut RunSummary) -> anyhow::Result<()> {
    if s.status == "interrupted" || s.status == "stopped" {
        if store.run_is_claimed(s.run_id)? {
            s.status = "running".into();
        } else {
            for t in &mut s.tasks {
                if t.status == "running"
                    || t.status == agent_runtime_workforce::state::WAITING_FOR_APPROVAL
                {
                    t.status = s.status.clone();
                    t.waiting_calls = 0;
                }
            }
        }
    }
    Ok(())
}

/// The states a task of `runs show` can be in, as `--status` names them.
const TASK_STATES: [&str; 10] = [
    "pending",
    "running",
    "waiting-for-approval",
    "retrying",
    "completed",
    "failed",
    "skipped",
    "cancelled",
    "interrupted",
    "stopped",
];

/// `runs show --status` values as the table writes them (`waiting for approval`), refusing an
/// unknown one with the closest state.
fn task_states(wanted: &[String]) -> anyhow::Result<Vec<String>> {
    wanted
        .iter()
        .map(|w| {
            let w = w.trim().to_ascii_lowercase().replace(['_', ' '], "-");
            if TASK_STATES.contains(&w.as_str()) {
                Ok(w.replace('-', " "))
            } else {
                let hint = agent_runtime_workforce::graph::suggestion(&w, TASK_STATES);
                Err(CliError::Usage(format!(
                    "--status: unknown task state `{}`{hint} (one of {})",
                    agent_runtime_core::names::shown(&w),
                    TASK_STATES.join(", ")
                ))
                .into())
            }
        })
        .collect()
}

fn runs_show(
    run_id: &str,
    status: &[String],
    json_out: bool,
    global: &GlobalArgs,
) -> anyhow::Result<ExitCode> {
    let wanted = task_states(status)?;
    let store = global.open_store_read_only()?;
    let run_id = resolve_run_id(&store, run_id)?;
    let mut s = run_summary(&store, run_id)?;
    mark_running(&store, &mut s)?;
    let all_tasks = s.tasks.len();
    if !wanted.is_empty() {
        s.tasks.retain(|t| wanted.contains(&t.status));
    }
    if json_out {
        outln!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("run:      {}", s.run_id);
    outln!(
        "name:     {}",
        terminal_text(s.name.as_deref().unwrap_or_default())
    );
    outln!("status:   {}", s.status);
    outln!("seed:     {}", s.seed);
    outln!("created:  {}", s.created);
    outln!(
        "ended:    {}",
        s.ended.map_or("-".into(), |t| t.to_string())
    );
    outln!("duration: {}", duration(&s));
    outln!("events:   {}  retries: {}", s.events, s.retries);
    if let Some(e) = &s.error {
        outln!("error:    {}", terminal_text(e));
    }
    if !wanted.is_empty() {
        outln!(
            "tasks:    {} of {all_tasks} ({})",
            s.tasks.len(),
            wanted.join(", ")
        );
    }
    outln!();
    // The task column is as wide as the longest id (ids are printed escaped, as every text
    // from the log is), so that the columns after it line up.
    let ids: Vec<String> = s
        .tasks
        .iter()
        .map(|t| terminal_text(&t.id).into_owned())
        .collect();
    let width = ids.iter().map(|i| columns_of(i)).max().unwrap_or(0).max(4);
    outln!(
        "{}  {:<11}  {:>8}  {:>10}  ERROR",
        padded("TASK", width),
        "STATUS",
        "ATTEMPTS",
        "DURATION"
    );
    for (t, id) in s.tasks.iter().zip(&ids) {
        let d = match (t.started, t.ended) {
            (Some(a), Some(b)) => format!("{:.3}s", b.saturating_duration_since(a).as_secs_f64()),
            _ => "-".into(),
        };
        // A substituted output follows the error that caused it.
        let error = match (&t.error, &t.substituted) {
            (Some(e), Some(note)) => format!("{e}; {note}"),
            (e, note) => e.clone().or_else(|| note.clone()).unwrap_or_default(),
        };
        outln!(
            "{}  {:<11}  {:>8}  {:>10}  {}",
            padded(id, width),
            t.status,
            t.attempts,
            d,
            terminal_text(&error)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn simulate(args: SimulateArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let shape: Shape = args
        .shape
        .parse()
        .map_err(|e| CliError::Usage(format!("--shape: {e}")))?;
    let cfg = SimConfig {
        agent_concurrency: args.agent_concurrency,
        ..SimConfig::new(args.agents, args.tasks, shape, args.failure_rate, args.seed)
    };
    // Named as the options are: the configuration's field names are the flags' without `--`.
    cfg.check()
        .map_err(|e| CliError::Usage(format!("simulate: {}", e.replace('_', "-"))))?;
    let sink: Arc<dyn EventSink> = match args.log.as_str() {
        "memory" => Arc::new(MemoryLog::default()),
        // A database that already holds this seed's run is refused by the simulation itself.
        "store" => Arc::new(global.open_store()?),
        "none" => Arc::new(agent_runtime_workforce::bench::NullSink),
        other => {
            return Err(
                CliError::Usage(format!("unknown --log `{other}` (memory, store, none)")).into(),
            );
        }
    };
    let rt = runtime()?;
    let report = rt.block_on(sim::simulate(&cfg, sink))?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let s = |n: u32| if n == 1 { "" } else { "s" };
    outln!(
        "simulated {} task{} over {} agent{} ({}, failure rate {}, seed {})",
        cfg.tasks,
        s(cfg.tasks),
        cfg.agents,
        s(cfg.agents),
        shape,
        short_number(cfg.failure_rate),
        cfg.seed
    );
    outln!(
        "run:               {} ({})",
        report.run_id,
        format!("{:?}", report.status).to_lowercase()
    );
    outln!(
        "tasks done:        {} (skipped {})",
        report.tasks_done,
        report.tasks_skipped
    );
    outln!("retries:           {}", report.retries);
    outln!(
        "virtual makespan:  {:.3}s",
        report.virtual_makespan_ms as f64 / 1000.0
    );
    outln!(
        "wall time:         {:.1} ms ({:.0} ns per task)",
        report.wall_ms,
        report.ns_per_task
    );
    if let Some(cpu) = report.scheduler_cpu_ns_per_task {
        outln!(
            "scheduler CPU:     {cpu:.0} ns per task (its own thread; the log's work is on others)"
        );
    }
    outln!("decisions/s:       {:.0}", report.decisions_per_sec);
    outln!(
        "peak memory:       {}",
        report
            .peak_memory_bytes
            .map_or("unknown".into(), |b| format!(
                "{:.1} MiB",
                b as f64 / 1048576.0
            ))
    );
    outln!("events:            {}", report.events);
    outln!("log hash:          {}", report.log_hash);
    Ok(ExitCode::SUCCESS)
}

pub fn bench(args: BenchArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    use agent_runtime_workforce::bench::{NullSink, live_agents, scaling, sim_point};
    let (sim_tasks, live_n, sizes): (u32, u32, Vec<u32>) = if args.quick {
        (10_000, 1_000, vec![1_000, 10_000])
    } else {
        (100_000, 10_000, vec![1_000, 10_000, 100_000])
    };
    let tool_ms = 2_000;
    // A store of its own in a temporary directory unless --db names one.
    let tmp = std::env::temp_dir().join(format!(
        "agent-runtime-bench-workforce-{}",
        std::process::id()
    ));
    let store_path = global.db.clone().unwrap_or_else(|| tmp.join("events.db"));
    if global.db.is_none() {
        std::fs::create_dir_all(&tmp)?;
    }
    let config = if args.encrypted {
        // The bench's own passphrase, never a user's: the store is the bench's (or --db's).
        // A cheap key derivation: it runs once at open, which nothing here measures.
        agent_runtime_store::StoreConfig::new(&store_path)
            .passphrase(agent_runtime_store::Passphrase::new("agent-runtime-bench"))
            .kdf(agent_runtime_store::KdfParams {
                m_kib: 1024,
                t: 1,
                p: 1,
            })
            .os_keyring(false)
    } else {
        agent_runtime_store::StoreConfig::plaintext(&store_path)
    };
    let store = agent_runtime_store::Store::open(config)?;
    // What the store is, not what was asked: a database named by --db keeps the mode it was
    // created with.
    let encrypted = store.is_encrypted();
    let rt = runtime()?;
    let say = |m: &str| {
        if !args.json {
            eprintln!("{m}");
        }
    };
    let wants = |part: BenchPart| args.only.is_none_or(|only| only == part);
    let result = rt.block_on(async {
        // First, while the process is small, so that resident memory measures the live agents.
        let live = if wants(BenchPart::Live) {
            say(&format!(
                "live: {live_n} agent tasks each awaiting a {tool_ms} ms tool, writing to the store"
            ));
            let before = store.writer_stats();
            let live = live_agents(live_n, tool_ms, Arc::new(store.clone())).await?;
            let after = store.writer_stats();
            let live_store = json!({
                "commits": after.commits - before.commits,
                "threads_per_agent": store_threads(&before, &after, live_n),
            });
            // The first run pays for the process's growth (page faults on fresh memory, cold
            // caches, the database's first pages); a runtime that lives on runs warm.
            say("live: same again in the same process (warm)");
            let warm = live_agents(live_n, tool_ms, Arc::new(store.clone())).await?;
            say("live: same, events dropped (baseline: the driver and tokio alone, warm)");
            let live_no_log = live_agents(live_n, tool_ms, Arc::new(NullSink)).await?;
            Some((live, live_store, warm, live_no_log))
        } else {
            None
        };
        let sim = if wants(BenchPart::Simulator) {
            say(&format!(
                "simulator: {sim_tasks} tasks, 1000 agents, layered, no log (baseline)"
            ));
            let null = sim_point(sim_tasks, 1000, Shape::Layered, Arc::new(NullSink)).await?;
            crate::return_freed_memory();
            say("simulator: same, in-memory log");
            let memory = sim_point(
                sim_tasks,
                1000,
                Shape::Layered,
                Arc::new(MemoryLog::default()),
            )
            .await?;
            // What the in-memory log held is freed: returned, so that this point's peak is its
            // own (the allocator keeps freed memory resident otherwise).
            crate::return_freed_memory();
            say("simulator: same, writing to the store");
            let before = store.writer_stats();
            let stored =
                sim_point(sim_tasks, 1000, Shape::Layered, Arc::new(store.clone())).await?;
            let threads = store_threads(&before, &store.writer_stats(), sim_tasks);
            Some((null, memory, stored, threads))
        } else {
            None
        };
        let scale = if wants(BenchPart::Scaling) {
            say(&format!("scaling: {sizes:?} tasks, in-memory log"));
            Some(
                scaling(&sizes, || {
                    Arc::new(MemoryLog::default()) as Arc<dyn EventSink>
                })
                .await?,
            )
        } else {
            None
        };
        anyhow::Ok((live, sim, scale))
    });
    drop(store);
    if global.db.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let (live, sim, scale) = result?;
    let point = |r: &agent_runtime_workforce::sim::SimReport| {
        json!({
            "tasks": r.config.tasks, "wall_ms": r.wall_ms, "ns_per_task": r.ns_per_task,
            "scheduler_cpu_ns_per_task": r.scheduler_cpu_ns_per_task,
            "decisions_per_sec": r.decisions_per_sec, "events": r.events, "log_hash": r.log_hash,
            "peak_memory_bytes": r.peak_memory_bytes,
        })
    };
    let mut report = serde_json::Map::new();
    if let Some((null, memory, stored, threads)) = &sim {
        report.insert(
            "simulator_layered_1000_agents".into(),
            json!({
                "goal_ns_per_task": 2000,
                "baseline_no_log": point(null),
                "memory_log": point(memory),
                "store": point(stored),
                "store_over_no_log": stored.ns_per_task / null.ns_per_task.max(1e-9),
                "store_encrypted": encrypted,
                "store_threads_per_task": threads,
            }),
        );
    }
    if let Some((live, live_store, warm, live_no_log)) = &live {
        let timings = |r: &agent_runtime_workforce::bench::LiveReport| {
            json!({
                "wall_ms": r.wall_ms,
                "overhead_pct": r.overhead_pct,
                "cpu_ns_per_agent": r.cpu_ns_per_agent,
                "events": r.events,
                "first_calls_ms": r.first_calls_ms,
                "second_calls_ms": r.second_calls_ms,
                "tool_starts_ms": r.tool_starts_ms,
                "tool_ends_ms": r.tool_ends_ms,
            })
        };
        report.insert(
            "live_agents".into(),
            json!({
                "goal_bytes_per_agent": 16384,
                "goal_overhead_pct": 5.0,
                "store_encrypted": encrypted,
                "result": live,
                "store": live_store,
                "warm": timings(warm),
                "baseline_no_log": timings(live_no_log),
            }),
        );
    }
    if let Some(scale) = &scale {
        report.insert(
            "scaling".into(),
            json!({ "goal": "vs_n_log_n <= 1", "points": scale }),
        );
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some((null, memory, stored, _)) = &sim {
        outln!(
            "simulator ({} tasks, 1000 agents, layered), ns per task:",
            null.config.tasks
        );
        outln!("  no log (baseline) {:>10.0}", null.ns_per_task);
        outln!("  in-memory log     {:>10.0}", memory.ns_per_task);
        outln!(
            "  store             {:>10.0}   (goal 2000)",
            stored.ns_per_task
        );
        let cpu = |r: &agent_runtime_workforce::sim::SimReport| {
            r.scheduler_cpu_ns_per_task
                .map_or("unknown".into(), |c| format!("{c:.0}"))
        };
        outln!(
            "  scheduler thread CPU per task: {} no log, {} memory, {} store",
            cpu(null),
            cpu(memory),
            cpu(stored)
        );
    }
    if let Some((live, live_store, warm, live_no_log)) = &live {
        outln!(
            "live agents: {} each awaiting {} ms",
            live.agents,
            live.tool_ms
        );
        outln!(
            "  wall {:.0} ms, overhead {:.1}% (goal 5%)",
            live.wall_ms,
            live.overhead_pct
        );
        outln!(
            "  {} events in {} durable commits",
            live.events,
            live_store["commits"]
        );
        outln!(
            "  again, warm: wall {:.0} ms, overhead {:.1}%",
            warm.wall_ms,
            warm.overhead_pct
        );
        outln!(
            "  events dropped (baseline, warm): wall {:.0} ms, overhead {:.1}%",
            live_no_log.wall_ms,
            live_no_log.overhead_pct
        );
        outln!(
            "  memory per live agent {} (goal 16384 bytes)",
            live.bytes_per_agent
                .map_or("unknown".into(), |b| format!("{b:.0} bytes"))
        );
        let cpu = |r: &agent_runtime_workforce::bench::LiveReport| {
            r.cpu_ns_per_agent
                .map_or("unknown".into(), |ns| format!("{:.1} µs", ns / 1000.0))
        };
        outln!(
            "  process CPU per agent: {} cold, {} warm, {} without a log",
            cpu(live),
            cpu(warm),
            cpu(live_no_log)
        );
    }
    if let Some(scale) = &scale {
        outln!("scaling (ns per task; vs n log n, goal <= 1):");
        for p in scale {
            outln!(
                "  {:>7} tasks {:>10.0}   {:.2}",
                p.tasks,
                p.ns_per_task,
                p.vs_n_log_n
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `x` as Rust writes it, or in scientific notation when that is shorter (`1e-320`, not a 0
/// followed by 320 digits).
fn short_number(x: f64) -> String {
    let plain = x.to_string();
    let scientific = format!("{x:e}");
    if scientific.len() < plain.len() {
        scientific
    } else {
        plain
    }
}

#[cfg(test)]
mod number_tests {
    #[test]
    fn numbers_are_written_short() {
        assert_eq!(super::short_number(0.05), "0.05");
        assert_eq!(super::short_number(1.0), "1");
        assert_eq!(super::short_number(1e-320), "1e-320");
        assert_eq!(super::short_number(0.000001), "1e-6");
    }
}

#[cfg(test)]
mod progress_tests {
    use super::*;
    use agent_runtime_workforce::{TaskTally, parse_graph};

    /// Cancelling a subtree takes from `running` only the tasks that were running; the tally
    /// followed per event stays the engine's own.
    #[test]
    fn the_tally_follows_a_subtree_s_cancellation() {
        let graph = parse_graph(
            "tasks:
  - {id: x, tool: sleep, args: {ms: 100}}
  - {id: a, tool: sleep, args: {ms: 100}}
  - {id: b, tool: sleep, args: {ms: 100}, needs: [a]}
  - {id: c, tool: sleep, args: {ms: 100}, needs: [b]}
",
            std::path::Path::new("t.yaml"),
        )
        .unwrap();
        let t0 = Timestamp::from_unix_nanos(1_767_225_600_000_000_000);
        let mut engine = Engine::start(RunId::from_bytes([7; 16]), graph, 1, t0);
        let mut state = ProgressState::default();
        let events: Vec<EncodedEvent> = engine.drain_events().collect();
        let started = state.tally(&events, &engine);
        assert_eq!((started.running, started.waiting), (2, 2), "{started:?}");

        let cancel = engine.cancel_task_event(t0, "me", "a", None).unwrap();
        engine.apply(&cancel).unwrap();
        let mut events: Vec<EncodedEvent> = vec![EncodedEvent::new(cancel)];
        events.extend(engine.drain_events());
        let after = state.tally(&events, &engine);
        assert_eq!(after, engine.tally());
        assert_eq!(
            after,
            TaskTally {
                running: 1,
                cancelled: 3,
                ..TaskTally::default()
            }
        );
    }
}

#[cfg(test)]
mod resume_tests {
    use super::*;
    use agent_runtime_core::{Actor, NewEvent};

    /// Requests the dead process never carried out are found for the resume: a whole-run
    /// request (carried out, the run would have ended), a task's without that person's
    /// cancellation of that task after it; not one it carried out, nor one after the run's last
    /// own event (the resume's follower reads those).
    #[test]
    fn requests_acknowledged_but_not_carried_out_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = agent_runtime_store::Store::open(agent_runtime_store::StoreConfig::plaintext(
            dir.path().join("events.db"),
        ))
        .unwrap();
        let run_id = RunId::from_bytes([9; 16]);
        let other = RunId::from_bytes([8; 16]);
        let request = |run_id, by: &str, task: Option<&str>| NewEvent {
            run_id,
            task_id: None,
            actor: Actor::Person(by.into()),
            kind: EventKind::RunCancelRequested,
            time: Timestamp::from_unix_nanos(0),
            payload: match task {
                Some(t) => json!({"task": t}),
                None => json!({}),
            },
        };
        let landed = store
            .append_blocking(vec![
                request(run_id, "ann", Some("a")),    // 1: carried out at 5
                request(run_id, "ann", Some("b")),    // 2: not
                request(run_id, "bob", None),         // 3: a whole-run request
                request(other, "ann", Some("c")),     // 4: another run's
                request(run_id, "ann", Some("a")),    // 5: again, after the first was
                request(run_id, "ann", Some("late")), // 6: after the last own event
            ])
            .unwrap();
        assert_eq!(landed.last().map(|a| a.seq), Some(6));
        let carried_out = vec![(5, "ann".to_string(), "a".to_string())];
        let pending = requests_not_carried_out(&store, run_id, 5, &carried_out).unwrap();
        let shown: Vec<String> = pending
            .iter()
            .map(|r| match r {
                driver::ControlRequest::CancelTask { by, task, .. } => format!("{by}:{task}"),
                driver::ControlRequest::CancelRun { by, .. } => format!("{by}:run"),
            })
            .collect();
        assert_eq!(shown, ["ann:b", "bob:run", "ann:a"]);
    }
}
