//! `agent-runtime bench ...`: whole-subsystem benchmarks printing JSON.

use std::process::ExitCode;

use clap::Subcommand;

use crate::common::GlobalArgs;

/// Which subsystem to measure.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// The event log: durable appends, verify and export, against plain batched SQLite.
    Store(crate::audit::StoreBenchArgs),
    /// The scheduler and runs: simulator cost per task, live agents, scaling.
    Workforce(crate::workforce::BenchArgs),
    /// The tool gateway: pipeline latency, MCP overhead, sandbox overhead, throughput.
    Gateway(crate::gateway::BenchArgs),
}

pub fn run(cmd: BenchCommand, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Store(args) => crate::audit::bench(args, global),
        BenchCommand::Workforce(args) => crate::workforce::bench(args, global),
        BenchCommand::Gateway(args) => crate::gateway::bench(args, global),
    }
}
