//! `agent-runtime demo`: the first main job. Runs a small task graph for real (the scheduler,
//! the gateway's policy in front of every tool call, the event log), replays it from the log,
//! verifies the chain, exports the run, and says where everything is.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use agent_runtime_core::{EventQuery, EventSink, SystemClock};
use agent_runtime_gateway::{GatewayBuilder, Policy, Registry};
use agent_runtime_store::ExportFormat;
use agent_runtime_workforce::driver::{self, NoModels, RunOptions};
use agent_runtime_workforce::tools::ToolRegistry;
use clap::Args;

use crate::common::{CliError, GlobalArgs};

#[derive(Args)]
pub struct DemoArgs {
    /// Where to write the jsonl export (default: beside the database).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// The demo's graph: native tools only (no file, no program, no network), a retried failure and
/// a failure policy, a template from upstream outputs.
const DEMO_GRAPH: &str = r#"name: demo
tasks:
  - id: fetch
    tool: echo
    args: { text: "Agents work on a task graph." }
  - id: flaky
    tool: fail
    args: { class: tool_error, message: "upstream is down" }
    retry: { max_attempts: 2, backoff: 10ms, on: [tool_error] }
    on_failure: { continue_with: { text: "a cached answer" } }
  - id: summarize
    tool: concat
    needs: [fetch, flaky]
    args:
      sep: " / "
      parts: ["{{ tasks.fetch.output.text }}", "{{ tasks.flaky.output.text }}"]
"#;

pub fn run(args: DemoArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let graph = agent_runtime_workforce::graph::parse_graph(DEMO_GRAPH, Path::new("<demo>"))
        .map_err(|e| CliError::Failed(format!("the demo's own graph: {e}")))?;
    let store = global.open_store()?;
    // An output the export would refuse (the database itself) is refused before the run.
    if let Some(path) = &args.output {
        crate::audit::check_export_target(&store, path)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (outcome, replayed) = rt.block_on(async {
        // Hermetic: the native tools and the default policy, whatever gateway configuration
        // the folder has (the demo's tools touch no file, run no program and open no socket).
        let sink: Arc<dyn EventSink> = Arc::new(store.clone());
        let registry = Arc::new(Registry::new());
        for tool in agent_runtime_workforce::tools::native_tools() {
            registry.register(tool)?;
        }
        let gateway = GatewayBuilder::new(registry, sink.clone())
            .policy(Policy::defaults(vec![std::env::current_dir()?])?)
            .build()?;
        let opts = RunOptions {
            // As `run` draws one: a fixed seed would give two demos started in the same
            // millisecond the same run id.
            seed: agent_runtime_core::os_random_u64() >> 11,
            sink,
            clock: Arc::new(SystemClock),
            tools: Arc::new(ToolRegistry::from_tools(gateway.tool_handles())),
            models: Arc::new(NoModels),
            observer: None,
            secrets: Arc::new(agent_runtime_core::secret::NoSecrets),
            labels: Default::default(),
        };
        let outcome = driver::run_graph(graph, opts).await?;
        let replayed = driver::replay(&store, outcome.run_id).await?;
        anyhow::Ok((outcome, replayed))
    })?;
    let run_id = outcome.run_id;
    let report = store.verify()?;
    let output = args
        .output
        .unwrap_or_else(|| store.path().with_file_name(format!("demo-{run_id}.jsonl")));
    let query = EventQuery {
        run_id: Some(run_id),
        ..Default::default()
    };
    // Written as `audit export -o` writes: a file whole or not at all, `0600` when new (it
    // holds the payloads in clear), a device or pipe in place, never the database itself.
    let (summary, _) = crate::audit::export_to(&store, &query, ExportFormat::Jsonl, &output)?;
    let status = format!("{:?}", outcome.status).to_lowercase();
    outln!(
        "run        {run_id} ({status}: {} tasks)",
        outcome.tasks.len()
    );
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
        "outputs    {}",
        serde_json::to_string(&outcome.outputs).unwrap_or_default()
    );
    outln!(
        "replayed   {} events match, log hash {}",
        replayed.events,
        replayed.log_hash
    );
    if replayed.log_hash != outcome.log_hash {
        outln!("replay FAILED: the run's log hash was {}", outcome.log_hash);
        return Ok(ExitCode::from(1));
    }
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
    let db = store.path().display();
    outln!("next       agent-runtime runs show --db {db} {run_id}");
    outln!("           agent-runtime audit tail --db {db} --run {run_id}");
    Ok(ExitCode::SUCCESS)
}
