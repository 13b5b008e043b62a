//! `agent-runtime`: the command line of the agent runtime.
//!
//! Each capability owns one module with its subcommands; this file only parses, dispatches and
//! turns errors into one clear line and an exit code (0 ok, 1 failed, 2 usage; see
//! `docs/errors.md`).

mod audit;
mod bench;
mod common;
mod demo;
mod gateway;
mod workforce;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::common::{CliError, GlobalArgs};

/// A local-first runtime for teams of AI agents.
#[derive(Parser)]
#[command(name = "agent-runtime", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect, verify and export the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Write a small run's worth of events, verify the chain and export it.
    Demo(demo::DemoArgs),
    #[command(flatten)]
    Workforce(workforce::WorkforceCommand),
    #[command(flatten)]
    Gateway(gateway::GatewayCommand),
    /// Measure a subsystem and print JSON figures with a baseline from the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// mimalloc: the scheduler and the event log allocate and free many small objects across
/// threads, where it is markedly faster than the system allocator (see the Workforce section of
/// docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help and version to stdout with exit 0, usage errors to stderr with 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Audit(cmd) => audit::run(cmd, &cli.global),
        Command::Demo(args) => demo::run(args, &cli.global),
        Command::Workforce(cmd) => workforce::run(cmd, &cli.global),
        Command::Gateway(cmd) => gateway::run(cmd, &cli.global),
        Command::Bench(cmd) => bench::run(cmd, &cli.global),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            let code = err
                .downcast_ref::<CliError>()
                .map_or(1, CliError::exit_code);
            eprintln!("error: {}", one_line(&err));
            ExitCode::from(code)
        }
    }
}

/// The error and its causes on one line, without a backtrace.
fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        // Typed errors often repeat their source in their own message; skip exact repeats.
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ").replace('\n', " ")
}
