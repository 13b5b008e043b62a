//! Gateway subcommands: `tools`, `mcp`, `policy`, and `bench gateway`.
//!
//! Every command assembles the gateway from the same files: `--config` (default
//! `.agent-runtime/gateway.yaml` when it exists), `--policy` (default: the configuration's, else
//! the safe defaults) and `--mcp-config` (default: the configuration's, else
//! `.agent-runtime/mcp.json` when it exists).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::{
    Actor, ApprovalSink, CallContext, CancellationToken, ErrorClass, EventSink, MemoryLog,
};
use agent_runtime_gateway::config::{Options, assemble};
use agent_runtime_gateway::mcp::{McpConfig, McpManager, McpServerConfig, describe_server};
use agent_runtime_gateway::{Gateway, GatewayError};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::common::{CliError, GlobalArgs, terminal_text};
use crate::terminal::TerminalApproval;

/// Gateway subcommands (flattened into the top level).
#[derive(Subcommand)]
pub enum GatewayCommand {
    /// List, describe and call tools through the gateway.
    #[command(subcommand)]
    Tools(ToolsCommand),
    /// MCP servers: list and add configured servers, serve the registry over MCP.
    #[command(subcommand)]
    Mcp(McpCommand),
    /// Check what the policy decides about a call, and why.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Accept the runtime's own files (configuration, policy, MCP servers file, what hooks and
    /// MCP servers load) as they are now, after they changed while a process ran tools: until
    /// then, every command that would run tools refuses to start.
    Trust(TrustArgs),
}

/// Arguments of `trust`.
#[derive(Args, Debug)]
pub struct TrustArgs {
    /// Only list what changed; accept nothing.
    #[arg(long)]
    pub list: bool,
    /// Every change, not only those of files under the current folder.
    #[arg(long)]
    pub all: bool,
}

/// Where the gateway's configuration comes from.
#[derive(Args, Clone, Debug, Default)]
pub struct GatewayOpts {
    /// The gateway configuration (YAML): workspace, command tools, hooks, policy and MCP files.
    #[arg(long, env = "AGENT_RUNTIME_GATEWAY_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The policy file (YAML), overriding the configuration's.
    #[arg(long, value_name = "PATH")]
    pub policy: Option<PathBuf>,
    /// The MCP servers file (JSON `mcpServers` format), overriding the configuration's.
    #[arg(long = "mcp-config", value_name = "PATH")]
    pub mcp_config: Option<PathBuf>,
}

/// `tools ...`
#[derive(Subcommand)]
pub enum ToolsCommand {
    /// List every tool (native, command and MCP).
    List(ListArgs),
    /// Show a tool's descriptor: description, input schema, risk class, source.
    Describe(DescribeArgs),
    /// Call a tool through the whole pipeline (validation, policy, approval, sandbox, audit).
    Call(CallArgs),
}

/// Arguments of `tools list`.
#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    opts: GatewayOpts,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `tools describe`.
#[derive(Args)]
pub struct DescribeArgs {
    /// The tool's registry name.
    name: String,
    #[command(flatten)]
    opts: GatewayOpts,
}

/// Arguments of `tools call`.
#[derive(Args)]
pub struct CallArgs {
    /// The tool's registry name.
    name: String,
    /// The arguments, as a JSON object; `-` reads them from standard input, `@PATH` from a file.
    #[arg(long, default_value = "{}")]
    args: String,
    /// The agent the call is made for (recorded as `agent:NAME`; policy rules may match it).
    #[arg(long, default_value = "cli")]
    agent: String,
    /// Time limit in milliseconds (at least 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: Option<u64>,
    #[command(flatten)]
    opts: GatewayOpts,
}

/// `mcp ...`
#[derive(Subcommand)]
pub enum McpCommand {
    /// List configured MCP servers (with `--tools`, connect and list their tools).
    List(McpListArgs),
    /// Add a server to the MCP servers file.
    Add(McpAddArgs),
    /// Serve the gateway's registry, policy applied, to an MCP host.
    Serve(McpServeArgs),
}

/// Arguments of `mcp list`.
#[derive(Args)]
pub struct McpListArgs {
    #[command(flatten)]
    opts: GatewayOpts,
    /// Connect to each server and list its tools.
    #[arg(long)]
    tools: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `mcp add`.
#[derive(Args)]
pub struct McpAddArgs {
    /// The server's name (its tools become `NAME.tool`).
    name: String,
    /// The program of a stdio server.
    #[arg(long, conflicts_with = "url", required_unless_present = "url")]
    command: Option<String>,
    /// An argument of the program (repeat for several).
    #[arg(long = "arg", allow_hyphen_values = true)]
    args: Vec<String>,
    /// An environment variable `KEY=VALUE` (`KEY=${HOST_VAR}` passes a host variable as a secret).
    #[arg(long = "env")]
    env: Vec<String>,
    /// The URL of a streamable HTTP server.
    #[arg(long)]
    url: Option<String>,
    /// An HTTP header `NAME=VALUE` for a URL server (`Authorization=Bearer ${TOKEN}`).
    #[arg(long = "header", requires = "url")]
    headers: Vec<String>,
    /// Time limit of one call, in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    #[command(flatten)]
    opts: GatewayOpts,
}

/// Arguments of `mcp serve`.
#[derive(Args)]
#[command(group(clap::ArgGroup::new("transport").required(true).args(["stdio", "http"])))]
pub struct McpServeArgs {
    /// Speak MCP on stdin and stdout (this or `--http`).
    #[arg(long)]
    stdio: bool,
    /// Listen for streamable HTTP on this address (`127.0.0.1:8808`; port 0 picks one).
    #[arg(long, value_name = "ADDR", conflicts_with = "stdio")]
    http: Option<String>,
    /// The agent calls are recorded for.
    #[arg(long, default_value = "mcp")]
    agent: String,
    #[command(flatten)]
    opts: GatewayOpts,
}

/// `policy ...`
#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Show which rule decides about a call and why, without running it.
    Check(CheckArgs),
}

/// Arguments of `policy check`.
#[derive(Args)]
pub struct CheckArgs {
    /// The tool's registry name.
    #[arg(long)]
    tool: String,
    /// The arguments, as a JSON object; `-` reads them from standard input, `@PATH` from a file.
    #[arg(long, default_value = "{}")]
    args: String,
    /// The agent the call would be made for.
    #[arg(long, default_value = "cli")]
    agent: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    opts: GatewayOpts,
}

/// Arguments of `bench gateway`.
#[derive(Args)]
pub struct BenchArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Iterations of the native pipeline figure (1 to 200,000: the in-memory log it compares
    /// with holds every call's events).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=200_000))]
    pub iterations: u64,
}

const DEFAULT_CONFIG: &str = ".agent-runtime/gateway.yaml";

/// How long a command waits at its end for the ends of dropped calls to be appended (see
/// `Gateway::ends_in_flight`): each is one append.
pub(crate) const ENDS_WAIT: Duration = Duration::from_secs(10);
const DEFAULT_MCP: &str = ".agent-runtime/mcp.json";

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn options(opts: &GatewayOpts) -> Options {
    options_found(opts).0
}

/// [`options`], and whether the configuration was found in the current folder
/// (`.agent-runtime/`) rather than named (`--config`, `--mcp-config`): a found one is loaded
/// only as a person accepted it (see [`found_configuration`]).
fn options_found(opts: &GatewayOpts) -> (Options, bool) {
    let mut found = false;
    let config = opts.config.clone().or_else(|| {
        let default = PathBuf::from(DEFAULT_CONFIG);
        found = default.exists();
        found.then_some(default)
    });
    let mut mcp = opts.mcp_config.clone();
    if mcp.is_none() && config.is_none() {
        mcp = Some(PathBuf::from(DEFAULT_MCP)).filter(|p| p.exists());
        found = mcp.is_some();
    }
    let options = Options {
        config,
        policy: opts.policy.clone(),
        mcp,
        protected: crate::common::event_database_files(),
    };
    (options, found)
}

/// The files a configuration found in the current folder (see [`options_found`]) makes the
/// runtime trust, resolved (`None` when the configuration is named, or there is none). A
/// tool can make or change a `.agent-runtime` folder below a workspace root, which a start run
/// from there would load: such a configuration, and every file it names, is loaded only as a
/// person accepted it (`agent-runtime trust`), as `direnv` does with `.envrc`.
fn found_configuration(opts: &GatewayOpts) -> anyhow::Result<Option<Vec<PathBuf>>> {
    let (options, found) = options_found(opts);
    if !found {
        return Ok(None);
    }
    let assembled = assemble(&options).map_err(gateway_error)?;
    Ok(Some(assembled.trusted))
}

fn gateway_error(e: GatewayError) -> anyhow::Error {
    if e.is_configuration() {
        CliError::Usage(e.to_string()).into()
    } else {
        CliError::Failed(e.to_string()).into()
    }
}

/// `--args`: a JSON object, or `-` for standard input, or `@PATH` for a file (arguments longer
/// than a command line takes: Linux caps one word at 128 KiB).
fn parse_args(given: &str) -> anyhow::Result<Value> {
    let read = |what: &str, r: std::io::Result<String>| {
        r.map_err(|e| CliError::Usage(format!("--args {what}: cannot read it: {e}")))
    };
    let (text, from) = match given {
        "-" => (
            read("-", std::io::read_to_string(std::io::stdin().lock()))?,
            " (standard input)".to_string(),
        ),
        _ => match given.strip_prefix('@') {
            Some(path) => (
                read(given, std::fs::read_to_string(path))?,
                format!(" ({path})"),
            ),
            None => (given.to_string(), String::new()),
        },
    };
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| CliError::Usage(format!("--args{from} is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(CliError::Usage("--args must be a JSON object".into()).into());
    }
    Ok(v)
}

fn agent(name: &str) -> anyhow::Result<Actor> {
    // `--agent agent:reviewer` names the agent `reviewer`, as it is written in rules, not
    // `agent:agent:reviewer`, which no rule for `agent:rev*` would match.
    let name = name.strip_prefix("agent:").unwrap_or(name);
    format!("agent:{name}")
        .parse()
        .map_err(|e| CliError::Usage(format!("--agent: {e}")).into())
}

/// Builds the gateway only to look at it (nothing is called, so nothing is recorded), and shuts
/// its MCP servers down again.
async fn inspect<T>(opts: &GatewayOpts, look: impl FnOnce(&Gateway) -> T) -> anyhow::Result<T> {
    let (gw, manager) = build(
        opts,
        Arc::new(MemoryLog::default()),
        Arc::new(TerminalApproval),
        false,
        Natives::WithWorkforce,
        Servers::All,
    )
    .await?;
    let out = look(&gw);
    manager.shutdown().await;
    Ok(out)
}

/// Which tools a gateway built here offers besides the configured ones.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Natives {
    /// Also the workforce's native tools (`echo`, `concat`, `sleep`, `read_file`,
    /// `write_file`, `fail`), so that task graphs call them through policy and audit too, and
    /// `tools list/describe/call` show what a graph can call. A configured tool of the same
    /// name takes precedence.
    WithWorkforce,
    /// Only the configured tools (and the builtins): what `mcp serve` offers its clients, who
    /// have no use for the workforce's test helpers.
    ConfiguredOnly,
}

/// Which of the configured MCP servers a command starts.
#[derive(Clone, Debug)]
pub(crate) enum Servers {
    /// Every enabled one: a command that lists or serves every tool.
    All,
    /// Those owning one of these tools (`SERVER.TOOL`): a command that calls only these
    /// neither starts nor waits for any other (a server that never answers `initialize`
    /// held up every command for its startup timeout).
    Owning(Vec<String>),
}

impl Servers {
    /// Whether the server configured as `name` is started.
    fn starts(&self, name: &str) -> bool {
        match self {
            Servers::All => true,
            Servers::Owning(tools) => {
                let prefix = format!("{}.", agent_runtime_gateway::mcp::registry_name(name));
                tools.iter().any(|t| t.starts_with(&prefix))
            }
        }
    }
}

/// Builds the gateway and connects the MCP servers `servers` names; MCP failures are printed
/// as warnings unless `quiet`.
pub(crate) async fn build(
    opts: &GatewayOpts,
    events: Arc<dyn EventSink>,
    approval: Arc<dyn ApprovalSink>,
    quiet: bool,
    natives: Natives,
    servers: Servers,
) -> anyhow::Result<(Gateway, McpManager)> {
    // Files read and hashed, folders walked, the trust record's lock waited for: off the
    // async threads.
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    let assembled = if multi_thread {
        tokio::task::block_in_place(|| prepare_start(opts))?
    } else {
        prepare_start(opts)?
    };
    let registry = assembled.registry.clone();
    if natives == Natives::WithWorkforce {
        for tool in agent_runtime_workforce::tools::native_tools() {
            if registry.get(&tool.descriptor().name).is_none() {
                registry.register(tool).map_err(gateway_error)?;
            }
        }
    }
    let (gateway, mut mcp) = assembled
        .into_gateway(events, approval)
        .map_err(gateway_error)?;
    mcp.servers.retain(|name, _| servers.starts(name));
    let mut redactor = gateway.redactor().clone();
    let (manager, errors) = McpManager::start(&mcp, registry, &mut redactor)
        .await
        .map_err(gateway_error)?;
    if !quiet {
        for e in errors {
            // The error may quote a server's own words (its stderr): escaped.
            eprintln!("warning: {}", crate::common::terminal_text(&e.to_string()));
        }
    }
    Ok((gateway, manager))
}

/// What every command that may run a hook, an MCP server or a tool does first: refuses a
/// found configuration nobody accepted, loads the configuration, and begins the process's
/// trust session (see docs/gateway.md, Trusted files).
fn prepare_start(opts: &GatewayOpts) -> anyhow::Result<agent_runtime_gateway::config::Assembled> {
    // A configuration found here is loaded only as a person accepted it: its own files, as
    // `trust` accepts them (files named with --policy or --mcp-config are the person's choice).
    if options_found(opts).1
        && let Some(own) = found_configuration(&GatewayOpts::default())?
    {
        crate::common::trust_book()
            .check_found(&own)
            .map_err(|e| CliError::Usage(terminal_text(&e.to_string()).into_owned()))?;
    }
    let assembled = assemble(&options(opts)).map_err(gateway_error)?;
    // Before any hook or MCP server runs. The default configuration files count even when
    // they are not there: one that appears is loaded by the next start.
    let mut trusted = assembled.trusted.clone();
    if let Ok(cwd) = std::env::current_dir() {
        for default in [DEFAULT_CONFIG, DEFAULT_MCP] {
            let path = cwd.join(default);
            if !trusted.contains(&path) {
                trusted.push(path);
            }
        }
    }
    crate::common::begin_trust_session(&trusted)?;
    crate::common::watch_git(&assembled.sandbox.write_roots);
    Ok(assembled)
}

pub fn run(cmd: GatewayCommand, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    match cmd {
        GatewayCommand::Tools(ToolsCommand::List(a)) => list(a),
        GatewayCommand::Tools(ToolsCommand::Describe(a)) => describe(a),
        GatewayCommand::Tools(ToolsCommand::Call(a)) => call(a, global),
        GatewayCommand::Mcp(McpCommand::List(a)) => mcp_list(a),
        GatewayCommand::Mcp(McpCommand::Add(a)) => mcp_add(a),
        GatewayCommand::Mcp(McpCommand::Serve(a)) => mcp_serve(a, global),
        GatewayCommand::Policy(PolicyCommand::Check(a)) => check(a),
        GatewayCommand::Trust(a) => trust(a),
    }
}

fn trust(a: TrustArgs) -> anyhow::Result<ExitCode> {
    let book = crate::common::trust_book();
    let here = std::env::current_dir()?;
    let here = std::fs::canonicalize(&here).unwrap_or(here);
    let mine = |c: &agent_runtime_gateway::trust::Change| a.all || c.path.starts_with(&here);
    let failed = |e: agent_runtime_gateway::trust::TrustError| {
        CliError::Failed(terminal_text(&e.to_string()).into_owned())
    };
    // The configuration found here, if any, as it is now (after a person read it). One that
    // cannot be loaded is not accepted, and `trust` says so by its exit once the rest is done.
    let mut unloadable = None;
    let found = match found_configuration(&GatewayOpts::default()) {
        Ok(found) => found,
        Err(e) => {
            unloadable = Some(e.to_string());
            None
        }
    };
    // Whether something was said of the found configuration (so not "nothing to accept").
    let mut said_of_found = false;
    if a.list {
        if let Some(files) = &found
            && let Err(e) = book.check_found(files)
        {
            said_of_found = true;
            outln!("{}", terminal_text(&e.to_string()));
        }
    } else if let Some(files) = &found {
        let newly = book.accept_found(files).map_err(failed)?;
        said_of_found = !newly.is_empty();
        if said_of_found {
            outln!(
                "accepted the configuration found here as it is now: {}",
                newly
                    .iter()
                    .map(|p| terminal_text(&p.display().to_string()).into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let (changes, elsewhere) = if a.list {
        let all = book.pending().map_err(failed)?;
        let (mine, others): (Vec<_>, Vec<_>) = all.into_iter().partition(|c| mine(c));
        (mine, others.len())
    } else {
        let accepted = book.accept(mine).map_err(failed)?;
        let others = book.pending().map_err(failed)?.len();
        (accepted, others)
    };
    let others = match elsewhere {
        0 => String::new(),
        n => format!(
            " ({n} change{} to files outside {}: `agent-runtime trust --list --all` shows them)",
            if n == 1 { "" } else { "s" },
            terminal_text(&here.display().to_string())
        ),
    };
    let unloadable = unloadable.map(|why| {
        CliError::Usage(format!(
            "the configuration found here cannot be loaded, so it is not accepted: {}; fix it \
             (a servers file it names and that is not there yet: `agent-runtime mcp add`), \
             then run `agent-runtime trust` again",
            terminal_text(&why)
        ))
    });
    if changes.is_empty() {
        if !said_of_found && unloadable.is_none() {
            let scope = if a.all { "" } else { " here" };
            outln!("no trusted file{scope} changed while tools ran; nothing to accept{others}");
        }
        return match unloadable {
            Some(e) => Err(e.into()),
            None => Ok(ExitCode::SUCCESS),
        };
    }
    for c in &changes {
        outln!("{}", terminal_text(&c.to_string()));
    }
    if a.list {
        outln!("not accepted yet: read them, then `agent-runtime trust`{others}");
    } else {
        outln!(
            "accepted {} change{} as the files are now{others}",
            changes.len(),
            if changes.len() == 1 { "" } else { "s" }
        );
    }
    match unloadable {
        Some(e) => Err(e.into()),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// Text a tool or server gave (its output, JSON of it) for standard output: as it is into a
/// pipe or a file; on a terminal, line by line with its controls escaped (DEL, C1 such as
/// U+009B, which JSON leaves raw, bidirectional controls), so it can not rewrite the screen,
/// and its lines kept.
fn for_stdout(text: &str) -> String {
    if !std::io::stdout().is_terminal() {
        return text.to_string();
    }
    text.lines()
        .map(crate::common::terminal_text)
        .collect::<Vec<_>>()
        .join("\n")
}

fn list(a: ListArgs) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let descriptors = rt.block_on(inspect(&a.opts, |gw| gw.descriptors()))?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&descriptors)?);
    } else {
        let width = descriptors.iter().map(|d| d.name.len()).max().unwrap_or(4);
        for d in &descriptors {
            let risk = serde_json::to_value(d.risk)?
                .as_str()
                .unwrap_or_default()
                .to_string();
            // A description is a server's text, which may carry terminal controls.
            let first = d.description.lines().next().unwrap_or_default();
            outln!(
                "{:width$}  {:7}  {}",
                d.name,
                risk,
                crate::common::terminal_text(first)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(a: DescribeArgs) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let d = rt.block_on(inspect(&a.opts, |gw| {
        let d = gw.registry().get(&a.name).map(|e| e.descriptor().clone());
        (d, gw.registry().names())
    }))?;
    match d {
        (Some(d), _) => {
            outln!("{}", for_stdout(&serde_json::to_string_pretty(&d)?));
            Ok(ExitCode::SUCCESS)
        }
        (None, names) => Err(CliError::Usage(format!(
            "unknown tool {:?}; known tools: {}",
            a.name,
            names.join(", ")
        ))
        .into()),
    }
}

fn call(a: CallArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let args = parse_args(&a.args)?;
    let actor = agent(&a.agent)?;
    let rt = runtime()?;
    let store = global.open_store()?;
    let result = rt.block_on(async {
        let (gw, manager) = build(
            &a.opts,
            Arc::new(store),
            Arc::new(TerminalApproval),
            false,
            Natives::WithWorkforce,
            Servers::Owning(vec![a.name.clone()]),
        )
        .await?;
        let mut ctx = CallContext::new(actor);
        ctx.timeout = a.timeout_ms.map(Duration::from_millis);
        crate::terminal::cancel_on_ctrl_c(ctx.cancel.clone());
        let r = gw.call(&a.name, args, ctx).await;
        let _ = tokio::time::timeout(ENDS_WAIT, gw.ends_in_flight().recorded()).await;
        manager.shutdown().await;
        anyhow::Ok(r)
    })?;
    match result {
        Ok(out) => {
            match &out.value {
                // A file's text as it is into a pipe; on a terminal line by line, escaped.
                Value::String(s) => outln!("{}", for_stdout(s)),
                v => outln!("{}", for_stdout(&serde_json::to_string_pretty(v)?)),
            }
            if out.truncated {
                eprintln!("note: output truncated (at the tool's or the gateway's output limit)");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if e.class == ErrorClass::InvalidArguments => {
            Err(CliError::Usage(e.to_string()).into())
        }
        Err(e) => Err(CliError::Failed(e.to_string()).into()),
    }
}

fn check(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let args = parse_args(&a.args)?;
    let actor = agent(&a.agent)?;
    let rt = runtime()?;
    let report = rt.block_on(async {
        let (gw, manager) = build(
            &a.opts,
            Arc::new(MemoryLog::default()),
            Arc::new(TerminalApproval),
            true,
            Natives::WithWorkforce,
            Servers::Owning(vec![a.tool.clone()]),
        )
        .await?;
        let risk = gw.registry().get(&a.tool).map(|e| e.descriptor().risk);
        let r = gw.check(&a.tool, args, &actor).await;
        manager.shutdown().await;
        anyhow::Ok((r, risk))
    })?;
    let (report, risk) = match report {
        (Ok(r), risk) => (r, risk),
        (Err(e), _) => return Err(CliError::Usage(e.to_string()).into()),
    };
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["risk"] = serde_json::to_value(risk)?;
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let d = &report.decision;
    outln!(
        "tool:       {} ({})",
        report.tool,
        risk.map(|r| format!("{r:?}").to_lowercase())
            .unwrap_or_default()
    );
    // As the policy saw them (after the pre-call hooks), redacted, on one line.
    outln!(
        "arguments:  {}",
        terminal_text(&agent_runtime_core::names::cut_middle(
            &report.arguments.to_string(),
            500
        ))
    );
    outln!("decision:   {}", d.effect.as_str());
    outln!("rule:       {} (decided by {})", d.rule, report.decided_by);
    outln!("reason:     {}", terminal_text(&d.reason));
    // What each path argument was judged as: a path that cannot be resolved (a NUL byte, a
    // part too long, a leading `~`, a link loop) counts as outside the workspace.
    for (given, resolved) in &d.paths {
        match resolved {
            Some(p) => outln!(
                "path:       {} -> {}",
                terminal_text(given),
                terminal_text(&p.to_string_lossy())
            ),
            None => outln!(
                "path:       {} -> cannot be resolved (a NUL byte, a part too long, a leading `~` \
                 or a link loop): counts as outside",
                terminal_text(given)
            ),
        }
    }
    if let Some(first) = report.trace.iter().position(|t| t.matched) {
        outln!("rules in order (first match decides):");
        for (i, t) in report.trace.iter().enumerate() {
            let mark = if i == first {
                "=>"
            } else if t.matched {
                " +"
            } else {
                "  "
            };
            outln!(
                "  {mark} {:28} {:5} {}",
                t.rule,
                t.effect.as_str(),
                if t.matched { "matches" } else { "-" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The MCP servers file the options name: `--mcp-config`, the configuration's `mcp:`, or the
/// default. `Err(CONFIGURATION)` when a configuration names none: it has no servers then
/// (`.agent-runtime/mcp.json` is not loaded beside a configuration, which names its own).
fn mcp_path(opts: &GatewayOpts) -> anyhow::Result<Result<PathBuf, PathBuf>> {
    if let Some(p) = &opts.mcp_config {
        return Ok(Ok(p.clone()));
    }
    let o = options(opts);
    if let Some(c) = &o.config {
        let file = agent_runtime_gateway::config::GatewayFile::load(c).map_err(gateway_error)?;
        return Ok(file.mcp.ok_or_else(|| c.clone()));
    }
    Ok(Ok(PathBuf::from(DEFAULT_MCP)))
}

fn load_mcp(path: &Path) -> anyhow::Result<McpConfig> {
    if path.exists() {
        McpConfig::load(path).map_err(gateway_error)
    } else {
        Ok(McpConfig::default())
    }
}

fn mcp_list(a: McpListArgs) -> anyhow::Result<ExitCode> {
    if a.tools {
        // It starts the servers: as every command that does, with the configuration checked
        // before it is read for them.
        prepare_start(&a.opts)?;
    }
    let path = mcp_path(&a.opts)?;
    let config = match &path {
        Ok(path) => load_mcp(path)?,
        Err(_) => McpConfig::default(),
    };
    let mut servers: Vec<Value> = config
        .servers
        .iter()
        .map(|(n, s)| describe_server(n, s))
        .collect();
    if a.tools {
        let rt = runtime()?;
        let (tools, errors, unreachable) = rt.block_on(async {
            let registry = Arc::new(agent_runtime_gateway::Registry::new());
            let mut redactor = agent_runtime_gateway::Redactor::new();
            let (manager, errors) = McpManager::start(&config, registry.clone(), &mut redactor)
                .await
                .map_err(gateway_error)?;
            manager.shutdown().await;
            let unreachable: Vec<(String, Option<String>)> = config
                .servers
                .keys()
                .map(|n| (n.clone(), registry.source_unreachable(n)))
                .collect();
            anyhow::Ok((registry.descriptors(), errors, unreachable))
        })?;
        let mut errors: Vec<Option<GatewayError>> = errors.into_iter().map(Some).collect();
        for s in &mut servers {
            let name = s["name"].as_str().unwrap_or_default().to_string();
            let prefix = format!("{name}.");
            s["tools"] = json!(
                tools
                    .iter()
                    .filter(|d| d.name.starts_with(&prefix))
                    .map(|d| &d.name)
                    .collect::<Vec<_>>()
            );
            // Why the server cannot be used is its error; what it reported while its tools
            // were registered (a tool skipped, two names alike) are warnings: the rest work.
            let why = unreachable
                .iter()
                .find(|(n, _)| *n == name)
                .and_then(|(_, why)| why.clone());
            let mine: Vec<String> = errors
                .iter_mut()
                .filter(|e| e.as_ref().is_some_and(|e| error_of_server(e, &name)))
                .filter_map(Option::take)
                .map(|e| e.to_string())
                .filter(|e| Some(e) != why.as_ref())
                .collect();
            if let Some(why) = why {
                s["error"] = json!(why);
            }
            if !mine.is_empty() {
                s["warnings"] = json!(mine);
            }
        }
        // Nothing reported is dropped: what names no listed server is said on its own.
        for e in errors.into_iter().flatten() {
            eprintln!("warning: {}", crate::common::terminal_text(&e.to_string()));
        }
    }
    if a.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({"file": path.as_ref().ok(), "servers": servers}))?
        );
    } else if servers.is_empty() {
        match &path {
            Ok(path) => outln!("no MCP servers in {}", path.display()),
            Err(config) => outln!(
                "no MCP servers: {} names no servers file",
                terminal_text(&config.display().to_string())
            ),
        }
    } else {
        for s in &servers {
            let target = s["url"].as_str().map(String::from).unwrap_or_else(|| {
                let mut words = vec![s["command"].as_str().unwrap_or_default().to_string()];
                words.extend(
                    s["args"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a.as_str().map(String::from)),
                );
                words.join(" ")
            });
            outln!(
                "{}  {}  {}",
                s["name"].as_str().unwrap_or_default(),
                s["transport"].as_str().unwrap_or_default(),
                target
            );
            if let Some(tools) = s["tools"].as_array() {
                for t in tools {
                    outln!("    {}", t.as_str().unwrap_or_default());
                }
            }
            if let Some(e) = s["error"].as_str() {
                outln!("    error: {}", crate::common::terminal_text(e));
            }
            for w in s["warnings"].as_array().into_iter().flatten() {
                let w = w.as_str().unwrap_or_default();
                outln!("    warning: {}", crate::common::terminal_text(w));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether an error [`McpManager::start`] reported is about server `name`: one it names, or
/// one about a tool of it (`"NAME.TOOL"`, quoted as errors quote names).
fn error_of_server(e: &GatewayError, name: &str) -> bool {
    match e {
        GatewayError::Mcp { server, .. } => server == name,
        GatewayError::Duplicate(tool) => tool
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('.')),
        other => {
            let text = other.to_string();
            text.contains(&format!("{name:?}")) || text.contains(&format!("\"{name}."))
        }
    }
}

fn mcp_add(a: McpAddArgs) -> anyhow::Result<ExitCode> {
    // Writing `.agent-runtime/mcp.json` beside a configuration that names no servers file
    // would add a server nothing starts.
    let path = mcp_path(&a.opts)?.map_err(|c| {
        CliError::Usage(format!(
            "{} names no MCP servers file: add `mcp: mcp.json` to it, or pass --mcp-config",
            terminal_text(&c.display().to_string())
        ))
    })?;
    let pairs = |flag: &str, what: &str, items: &[String]| {
        let mut out = std::collections::BTreeMap::new();
        for kv in items {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| CliError::Usage(format!("{flag} {kv:?}: expected {what}=VALUE")))?;
            // Given twice, one value would be dropped without a word (as a key written twice
            // in the file is refused).
            if out.insert(k.to_string(), v.to_string()).is_some() {
                return Err(CliError::Usage(format!(
                    "{flag}: {what} {k:?} is given twice"
                )));
            }
        }
        Ok(out)
    };
    let server = McpServerConfig {
        command: a.command,
        args: a.args,
        env: pairs("--env", "KEY", &a.env)?,
        url: a.url,
        headers: pairs("--header", "NAME", &a.headers)?,
        timeout_ms: a.timeout_ms,
        ..McpServerConfig::default()
    };
    // A configuration found here that the person had accepted (or none yet) stays accepted
    // with the server the person adds now; one nobody accepted stays so.
    // Judged as `build` and `trust` judge it: the found configuration's own files.
    let book = crate::common::trust_book();
    let into_found = a.opts.config.is_none() && a.opts.mcp_config.is_none();
    let was_accepted = !into_found
        || match found_configuration(&GatewayOpts::default()) {
            Ok(Some(files)) => book.check_found(&files).is_ok(),
            Ok(None) => true,
            // One that cannot even be loaded was nobody's to accept (a planted configuration
            // naming a servers file not made yet).
            Err(_) => false,
        };
    McpConfig::add_server(&path, &a.name, &server).map_err(gateway_error)?;
    outln!("added {} to {}", a.name, path.display());
    // The server is added whatever follows: what follows only says so.
    if into_found {
        match found_configuration(&GatewayOpts::default()) {
            Ok(Some(files)) if was_accepted => {
                if let Err(e) = book.accept_found(&files) {
                    eprintln!(
                        "warning: the configuration found here could not be kept accepted: {}",
                        terminal_text(&e.to_string())
                    );
                }
            }
            Ok(Some(_)) => eprintln!(
                "note: the configuration found here was not accepted before this change: read \
                 it, then `agent-runtime trust`"
            ),
            Ok(None) => {}
            Err(e) => eprintln!(
                "note: the configuration found here cannot be loaded: {}",
                terminal_text(&e.to_string())
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn mcp_serve(a: McpServeArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let actor = agent(&a.agent)?;
    // A bad address is bad input (exit 2), found before anything is opened; a name
    // (`localhost:8808`) is checked once it is bound.
    if let Some(addr) = a
        .http
        .as_deref()
        .and_then(|h| h.parse::<std::net::SocketAddr>().ok())
        && !addr.ip().is_loopback()
    {
        return Err(CliError::Usage(format!(
            "--http {addr}: the MCP endpoint has no authentication, so it listens on loopback \
             addresses only (127.0.0.1, [::1]); put a proxy with authentication in front of it \
             to reach it from elsewhere"
        ))
        .into());
    }
    let rt = runtime()?;
    let store = global.open_store()?;
    let served = rt.block_on(async {
        // Nobody can be asked from here (stdin carries the protocol, or there is no terminal
        // behind an HTTP server): `ask` means deny.
        let (gw, manager) = build(
            &a.opts,
            Arc::new(store),
            Arc::new(agent_runtime_core::DenyAll),
            false,
            Natives::ConfiguredOnly,
            Servers::All,
        )
        .await?;
        let ends = gw.ends_in_flight();
        let r = match &a.http {
            Some(addr) => {
                let stop = CancellationToken::new();
                crate::terminal::cancel_on_ctrl_c_or_term(stop.clone());
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    if let Ok(bound) = rx.await {
                        eprintln!("agent-runtime: MCP over streamable HTTP at http://{bound}/mcp");
                    }
                });
                agent_runtime_gateway::mcp::server::serve_http(gw, actor, addr, stop, Some(tx))
                    .await
            }
            None => {
                let stop = CancellationToken::new();
                crate::terminal::cancel_on_ctrl_c_or_term(stop.clone());
                agent_runtime_gateway::mcp::server::serve_stdio_until(gw, actor, stop).await
            }
        };
        // Calls the clients left unfinished (a client gone mid-call) get their ends first.
        let _ = tokio::time::timeout(ENDS_WAIT, ends.recorded()).await;
        manager.shutdown().await;
        r.map_err(gateway_error)
    });
    // Stopped by a signal, the session leaves tokio's stdin reader blocked in a read on a
    // thread of the runtime's, which dropping the runtime would wait for (until the client
    // writes a line or closes its end): everything else has ended, so it is left behind.
    rt.shutdown_background();
    served?;
    Ok(ExitCode::SUCCESS)
}

pub fn bench(args: BenchArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    use agent_runtime_gateway::bench::{BenchSetup, run};
    let dir = global.bench_folder()?.join(format!(
        "agent-runtime-bench-gateway-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let ws = std::fs::canonicalize(&dir)?;
    let store_full = agent_runtime_store::Store::open(
        agent_runtime_store::StoreConfig::plaintext(ws.join("full.db")),
    )?;
    let store_normal = agent_runtime_store::Store::open(
        agent_runtime_store::StoreConfig::plaintext(ws.join("normal.db"))
            .durability(agent_runtime_store::Durability::Normal),
    )?;
    let npm = Path::new(
        ".test-deps/npm/node_modules/@modelcontextprotocol/server-everything/dist/index.js",
    );
    let mcp_server = npm.exists().then(|| McpServerConfig {
        command: Some("node".into()),
        args: vec![npm.display().to_string(), "stdio".into()],
        ..McpServerConfig::default()
    });
    let setup = BenchSetup {
        sinks: vec![
            (
                "memory_log".into(),
                Arc::new(MemoryLog::default()) as Arc<dyn EventSink>,
            ),
            (
                "store_normal".into(),
                Arc::new(store_normal) as Arc<dyn EventSink>,
            ),
            (
                "store_full".into(),
                Arc::new(store_full.clone()) as Arc<dyn EventSink>,
            ),
        ],
        concurrent_sink: ("store_full".into(), Arc::new(store_full)),
        mcp_server,
        workspace: ws.clone(),
        // Bounded by the argument's parser (no calls would report a p50 of 0 µs, which reads
        // as a goal met).
        native_iterations: usize::try_from(args.iterations).unwrap_or(usize::MAX),
        mcp_iterations: 2000,
        sandbox_iterations: 50,
        concurrent_calls: 1000,
    };
    let rt = runtime()?;
    let report = rt.block_on(run(setup));
    let _ = std::fs::remove_dir_all(&ws);
    let out = json!({"bench": "gateway", "results": report});
    if args.json {
        outln!("{}", serde_json::to_string(&out)?);
    } else {
        outln!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(ExitCode::SUCCESS)
}
