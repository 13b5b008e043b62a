//! # agent-runtime-workforce
//!
//! Turns a task graph into a run in which many agents work at once, with the guarantees of a
//! durable-execution engine: a run can be replayed from its event log to the same events, and
//! resumed after a crash without redoing finished work.
//!
//! Concepts, in the order a run meets them:
//!
//! - **Task graph** ([`graph`]): agents and tasks in YAML or JSON. A task is an agent task (a
//!   model-and-tools loop) or a direct tool step; it `needs` other tasks and templates their
//!   outputs into its inputs (`{{ tasks.fetch.output.text }}`). Errors name file, line, column
//!   and field.
//! - **Engine** ([`engine`]): the deterministic scheduler. A pure state machine: input events in
//!   (results, clock readings, cancellations), derived events and effects out. The ready set is
//!   ordered by (priority, topological rank, task id); limits apply globally, per agent, per tool
//!   and per model provider; failure policies retry with seeded jitter, then fail the run, skip,
//!   continue with a value or run a fallback task.
//! - **Driver** ([`driver`]): performs the engine's effects with real tools and models
//!   ([`ToolInvoker`](driver::ToolInvoker), [`ModelRouter`](driver::ModelRouter)), records every
//!   result in the log *before* the engine sees it, and wakes the engine when a timer is due.
//!   [`driver::replay`] feeds a recorded run back to a fresh engine and checks the events match;
//!   [`driver::resume`] does the same and then goes on live.
//! - **Simulator** ([`sim`]): the same engine on a virtual clock with synthetic durations and
//!   failures, to measure scheduling cost and prove determinism.
//! - **Benchmarks** ([`bench`](mod@bench)): the figures behind `agent-runtime bench workforce`.
//! - **Run state** ([`state`]): a fold over a run's events for `runs list` / `runs show`, the
//!   per-run log hash, and a checker that limits were never exceeded.
//!
//! ```
//! use agent_runtime_core::{ManualClock, MemoryLog, Timestamp};
//! use agent_runtime_workforce::{driver, graph, tools::ToolRegistry};
//! use std::sync::Arc;
//!
//! let g = graph::parse_graph(
//!     "tasks:\n  - { id: a, tool: echo, args: { text: hi } }\n  - { id: b, tool: echo, args: { text: '{{ tasks.a.output.text }}!' } }\n",
//!     std::path::Path::new("flow.yaml"),
//! ).unwrap();
//! let log = Arc::new(MemoryLog::default());
//! let clock = Arc::new(ManualClock::new(Timestamp::EPOCH));
//! let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
//! let outcome = rt.block_on(driver::run_graph(g, driver::RunOptions {
//!     seed: 7,
//!     sink: log.clone(),
//!     clock,
//!     tools: Arc::new(ToolRegistry::with_native_tools()),
//!     models: Arc::new(driver::NoModels),
//!     observer: None,
//!     secrets: Arc::new(agent_runtime_core::NoSecrets),
//!     labels: Default::default(),
//! })).unwrap();
//! assert_eq!(outcome.outputs["b"]["text"], "hi!");
//! ```
//!
//! What it does not do: store events (see `agent-runtime-store`), check tool arguments against
//! policy (the gateway does, behind [`driver::ToolInvoker`]), or talk to model APIs (the model
//! fabric does, behind [`driver::ModelRouter`]).

#![warn(missing_docs)]

pub mod bench;
pub mod driver;
pub mod engine;
pub mod graph;
mod hashing;
mod positions;
pub mod sim;
pub mod state;
pub mod template;
pub mod tools;

pub use engine::{Effect, Engine, EngineError, RunStatus, TaskStatus, TaskTally};
pub use graph::{
    GraphError, TaskGraph, load_graph, load_graph_source, parse_graph, read_graph_source,
};
pub use state::{LogHasher, RunSummary, log_hash};
