//! `agent-runtime demo`: the first main job. Writes a small run's worth of events, verifies the
//! chain and exports it, and says where everything is.

use std::path::PathBuf;
use std::process::ExitCode;

use agent_runtime_core::{Actor, Clock, EventKind, EventQuery, IdGenerator, NewEvent, SystemClock};
use agent_runtime_store::ExportFormat;
use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::common::GlobalArgs;

#[derive(Args)]
pub struct DemoArgs {
    /// Where to write the jsonl export (default: beside the database).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
}

pub fn run(args: DemoArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let store = global.open_store()?;
    let clock = std::sync::Arc::new(SystemClock);
    let ids = IdGenerator::random(clock.clone());
    let run_id = ids.run_id();
    let (fetch, summarize) = (ids.task_id(), ids.task_id());
    let ev = |task, actor: Actor, kind, payload| NewEvent {
        run_id,
        task_id: task,
        actor,
        kind,
        time: clock.now(),
        payload,
    };
    let researcher = Actor::Agent("researcher".into());
    let writer = Actor::Agent("writer".into());
    let events = vec![
        ev(
            None,
            Actor::System,
            EventKind::RunCreated,
            json!({"graph": "demo", "tasks": ["fetch", "summarize"]}),
        ),
        ev(None, Actor::System, EventKind::RunStarted, json!({})),
        ev(
            Some(fetch),
            Actor::System,
            EventKind::TaskSpawned,
            json!({"name": "fetch", "agent": "researcher"}),
        ),
        ev(
            Some(fetch),
            researcher.clone(),
            EventKind::TaskStarted,
            json!({"attempt": 1}),
        ),
        ev(
            Some(fetch),
            researcher.clone(),
            EventKind::ToolRequested,
            json!({"tool": "read_file", "arguments": {"path": "notes.md"}}),
        ),
        ev(
            Some(fetch),
            Actor::System,
            EventKind::PolicyDecided,
            json!({"rule": "default", "effect": "allow", "reason": "read tools are allowed"}),
        ),
        ev(
            Some(fetch),
            Actor::Tool("read_file".into()),
            EventKind::ToolCompleted,
            json!({"output": {"text": "Agents work on a task graph."}}),
        ),
        ev(
            Some(fetch),
            researcher,
            EventKind::TaskCompleted,
            json!({"output": {"text": "Agents work on a task graph."}}),
        ),
        ev(
            Some(summarize),
            Actor::System,
            EventKind::TaskSpawned,
            json!({"name": "summarize", "agent": "writer", "needs": ["fetch"]}),
        ),
        ev(
            Some(summarize),
            writer.clone(),
            EventKind::TaskStarted,
            json!({"attempt": 1}),
        ),
        ev(
            Some(summarize),
            writer.clone(),
            EventKind::ModelRequested,
            json!({"route": "local", "messages": 2}),
        ),
        ev(
            Some(summarize),
            writer.clone(),
            EventKind::ModelCompleted,
            json!({"text": "A graph of tasks, run by agents.", "usage": {"input_tokens": 21, "output_tokens": 8}}),
        ),
        ev(
            Some(summarize),
            writer,
            EventKind::TaskCompleted,
            json!({"output": {"text": "A graph of tasks, run by agents."}}),
        ),
        ev(
            None,
            Actor::System,
            EventKind::RunCompleted,
            json!({"tasks_done": 2}),
        ),
    ];
    let n = events.len();
    let landed = store.append_blocking(events)?;
    let report = store.verify()?;
    let output = args
        .output
        .unwrap_or_else(|| store.path().with_file_name(format!("demo-{run_id}.jsonl")));
    let file = std::fs::File::create(&output)
        .with_context(|| format!("cannot create {}", output.display()))?;
    let query = EventQuery {
        run_id: Some(run_id),
        ..Default::default()
    };
    let summary = store.export(&query, ExportFormat::Jsonl, file)?;
    outln!("run        {run_id}");
    outln!(
        "database   {} ({})",
        store.path().display(),
        if store.is_encrypted() {
            "encrypted"
        } else {
            "plaintext"
        }
    );
    outln!(
        "appended   {n} events, sequence {}..{}",
        landed[0].seq,
        landed[n - 1].seq
    );
    match &report.problem {
        None => outln!(
            "verified   {} events, chain head {}",
            report.events,
            report.head
        ),
        Some(p) => {
            outln!("verify FAILED: {p}");
            return Ok(ExitCode::from(1));
        }
    }
    outln!(
        "exported   {} events to {}",
        summary.events,
        output.display()
    );
    outln!(
        "next       agent-runtime audit tail --db {} --run {run_id}",
        store.path().display()
    );
    Ok(ExitCode::SUCCESS)
}
