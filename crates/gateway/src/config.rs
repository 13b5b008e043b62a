//! The gateway configuration file and the assembly of a [`Gateway`] from it.
//!
//! ```yaml
//! workspace: ["."]              # read-write roots; relative to this file
//! read_roots: ["/usr/share/dict"]
//! policy: policy.yaml           # default: the safe defaults
//! mcp: mcp.json                 # MCP servers (also the `mcpServers` format of desktop hosts)
//! builtins: true                # builtin.echo and builtin.noop
//! limits: { default_timeout_ms: 120000, max_output_bytes: 262144, approval_timeout_ms: 600000 }
//! tools:                        # sandboxed command tools
//!   - name: grep
//!     risk: read
//!     command: ["grep", "-rn", "--", "{pattern}", "."]
//!     input_schema: { type: object, properties: { pattern: { type: string } }, required: [pattern] }
//! hooks:
//!   - name: audit-hook
//!     command: ["/usr/local/bin/my-hook"]
//!     phases: [pre]
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::{ApprovalSink, EventSink};
use serde::{Deserialize, Serialize};

use crate::builtin;
use crate::error::GatewayError;
use crate::gateway::{Gateway, GatewayBuilder, GatewayConfig};
use crate::hooks::{CommandHook, CommandHookConfig};
use crate::mcp::McpConfig;
use crate::policy::Policy;
use crate::redact::Redactor;
use crate::registry::Registry;
use crate::sandbox::{CommandTool, CommandToolConfig, SandboxSettings};

/// Pipeline limits as written in the file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Default time limit of a call.
    #[serde(default)]
    pub default_timeout_ms: Option<u64>,
    /// Output cap in bytes.
    #[serde(default)]
    pub max_output_bytes: Option<usize>,
    /// How long to wait for a person.
    #[serde(default)]
    pub approval_timeout_ms: Option<u64>,
}

/// The gateway configuration file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    /// Workspace roots (read-write in the sandbox; the policy's `$workspace` when the policy
    /// names none).
    #[serde(default)]
    pub workspace: Vec<PathBuf>,
    /// Extra read-only roots for every command tool, whose files read-only tools may also
    /// read without approval (the policy's `$read_roots`).
    #[serde(default)]
    pub read_roots: Vec<PathBuf>,
    /// The policy file.
    #[serde(default)]
    pub policy: Option<PathBuf>,
    /// The MCP servers file.
    #[serde(default)]
    pub mcp: Option<PathBuf>,
    /// Whether to register `builtin.echo` and `builtin.noop` (default true).
    #[serde(default)]
    pub builtins: Option<bool>,
    /// Pipeline limits.
    #[serde(default)]
    pub limits: LimitsFile,
    /// Command tools.
    #[serde(default)]
    pub tools: Vec<CommandToolConfig>,
    /// External hooks.
    #[serde(default)]
    pub hooks: Vec<CommandHookConfig>,
}

impl GatewayFile {
    /// Reads a configuration file; relative paths in it are made relative to its folder.
    pub fn load(path: &Path) -> Result<GatewayFile, GatewayError> {
        let text = crate::read_config_text(path)?;
        let mut file: GatewayFile =
            crate::yaml_from_str(&text).map_err(|message| GatewayError::Parse {
                what: path.display().to_string(),
                message,
            })?;
        // Zero would end every call at once, cap every output to nothing, or deny every ask.
        for (field, zero) in [
            (
                "default_timeout_ms",
                file.limits.default_timeout_ms == Some(0),
            ),
            ("max_output_bytes", file.limits.max_output_bytes == Some(0)),
            (
                "approval_timeout_ms",
                file.limits.approval_timeout_ms == Some(0),
            ),
        ] {
            if zero {
                return Err(GatewayError::Parse {
                    what: path.display().to_string(),
                    message: format!("limits.{field} is 0; it must be at least 1"),
                });
            }
        }
        let base = crate::policy::base_dir(path)?;
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        file.workspace.iter_mut().for_each(fix);
        file.read_roots.iter_mut().for_each(fix);
        file.policy.iter_mut().for_each(fix);
        file.mcp.iter_mut().for_each(fix);
        for t in &mut file.tools {
            t.read_roots.iter_mut().for_each(fix);
        }
        // A hook runs in the file's folder unless it says otherwise (relative to the file).
        for h in &mut file.hooks {
            let cwd = h.cwd.get_or_insert_with(|| base.clone());
            fix(cwd);
            if !cwd.is_dir() {
                return Err(GatewayError::Parse {
                    what: path.display().to_string(),
                    message: format!(
                        "hook {:?}: its cwd {} is not a folder",
                        h.name,
                        cwd.display()
                    ),
                });
            }
        }
        Ok(file)
    }
}

/// What to assemble a gateway from (the CLI's options).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The configuration file, if any.
    pub config: Option<PathBuf>,
    /// A policy file overriding the configuration's.
    pub policy: Option<PathBuf>,
    /// An MCP servers file overriding the configuration's.
    pub mcp: Option<PathBuf>,
    /// More files and folders no tool may change (the CLI's event database), besides the
    /// configuration's own (see [`protected_paths`]).
    pub protected: Vec<PathBuf>,
}

/// The name of the folder in a workspace root that holds the runtime's configuration
/// (`.agent-runtime/gateway.yaml`, `.agent-runtime/mcp.json`), which the command line loads
/// from the folder it runs in.
pub const CONFIG_FOLDER: &str = ".agent-runtime";

/// What no tool may change, resolved: `files` (the configuration file, the policy file, the MCP
/// servers file, and what [`command_files`] finds of the hooks and MCP servers), each workspace
/// root's [`CONFIG_FOLDER`] and what `git` runs from its repository ([`git_run_paths`]), and
/// `extra`. The runtime trusts these (a hook and an MCP server
/// run outside the sandbox, nobody asked): an agent that could rewrite them inside its
/// workspace would give itself anything at the next start, or at the next hook it runs.
/// The gateway denies a write to them (rule `default.protected`), and the sandbox binds them
/// read-only over the writable roots.
pub fn protected_paths(files: &[&Path], workspace: &[PathBuf], extra: &[PathBuf]) -> Vec<PathBuf> {
    let base = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let mut all: Vec<PathBuf> = files.iter().map(|f| f.to_path_buf()).collect();
    for root in workspace {
        all.push(root.join(CONFIG_FOLDER));
        all.extend(git_run_paths(root));
    }
    all.extend(extra.iter().cloned());
    resolved_once(all.iter().map(PathBuf::as_path), &base)
}

/// `paths` resolved as trusted files are ([`resolve_trusted`], against `base`), each once, in
/// order: the first entries of [`protected_paths`], and what [`Assembled::trusted`] holds.
fn resolved_once<'a>(paths: impl IntoIterator<Item = &'a Path>, base: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for p in paths {
        let resolved = resolve_trusted(p, base);
        if !out.contains(&resolved) {
            out.push(resolved);
        }
    }
    out
}

/// What a person's own `git` runs from the repository at `root`, outside any sandbox: its
/// configuration (`core.fsmonitor`, `core.pager`, a diff driver's `textconv`, `core.hooksPath`)
/// with what it includes (`include.path`, `includeIf`) and a worktree's own
/// (`config.worktree`), its hooks folder (or the one `core.hooksPath` names), its submodules'
/// repositories (`.git/modules`), and `commondir`, which sends git to another repository. For a
/// `.git` folder, or a `.git` file naming one (`gitdir:`, a worktree's or a submodule's: the
/// file too), and the shared one it names. A tool that rewrote them would run its code as the
/// person at their next `git status` or `git commit`. Nothing for a folder that is no
/// repository yet, and not a repository below the root (see docs/sandbox.md: git has ways
/// this does not close).
pub fn git_run_paths(root: &Path) -> Vec<PathBuf> {
    let Some(repo) = GitRepo::at(root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(file) = &repo.dot_git_file {
        out.push(file.clone());
    }
    for dir in &repo.dirs {
        for name in ["hooks", "modules", "commondir", "config.worktree"] {
            out.push(dir.join(name));
        }
    }
    out.extend(repo.hooks_paths.iter().cloned());
    out.extend(repo.config_files.iter().cloned());
    out
}

/// The hooks folders git uses for the repository at `root`: `core.hooksPath`'s, or the
/// shared repository's `hooks` (a worktree's own is not read).
pub fn git_hooks_folders(root: &Path) -> Vec<PathBuf> {
    let Some(repo) = GitRepo::at(root) else {
        return Vec::new();
    };
    if !repo.hooks_paths.is_empty() {
        return repo.hooks_paths;
    }
    repo.dirs
        .last()
        .map(|d| vec![d.join("hooks")])
        .unwrap_or_default()
}

/// What [`git_run_paths`] reads of a repository.
struct GitRepo {
    /// A worktree's or a submodule's `.git` file.
    dot_git_file: Option<PathBuf>,
    /// Its git folder, then the shared one (`commondir`).
    dirs: Vec<PathBuf>,
    /// Its configuration files: `config` of each folder and what they include.
    config_files: Vec<PathBuf>,
    /// The folders `core.hooksPath` names.
    hooks_paths: Vec<PathBuf>,
}

impl GitRepo {
    fn at(root: &Path) -> Option<GitRepo> {
        let dot_git = root.join(".git");
        let (git_dir, dot_git_file) = if dot_git.is_dir() {
            (dot_git, None)
        } else {
            // A worktree or a submodule: `gitdir: PATH` (relative to the root).
            let dir = std::fs::read_to_string(&dot_git).ok().and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("gitdir:"))
                    .map(|d| root.join(d.trim()))
            })?;
            (dir, Some(dot_git))
        };
        let mut dirs = vec![git_dir.clone()];
        if let Ok(common) = std::fs::read_to_string(git_dir.join("commondir")) {
            dirs.push(git_dir.join(common.trim()));
        }
        let mut repo = GitRepo {
            dot_git_file,
            dirs: dirs.clone(),
            config_files: Vec::new(),
            hooks_paths: Vec::new(),
        };
        for dir in &dirs {
            repo.read_config(root, &dir.join("config"), 0);
        }
        Some(repo)
    }

    /// Reads one configuration file: its hooks path, and the files it includes (at most 10
    /// deep, as git).
    fn read_config(&mut self, root: &Path, config: &Path, depth: usize) {
        if self.config_files.iter().any(|c| c == config) {
            return;
        }
        self.config_files.push(config.to_path_buf());
        if depth >= 10 {
            return;
        }
        for (key, value) in git_config_values(config) {
            if value.is_empty() || value.starts_with('~') {
                continue;
            }
            match key.as_str() {
                // Relative to the working tree's root.
                "hookspath" => self.hooks_paths.push(root.join(&value)),
                // Relative to the file that names it.
                "path" => {
                    let included = agent_runtime_core::fs::folder_of(config).join(&value);
                    self.read_config(root, &included, depth + 1);
                }
                _ => {}
            }
        }
    }
}

/// The `key = value` lines of a git configuration file, keys lower-cased (a `[section]`
/// written before the key on its line left out), values with their quotes, escapes and
/// trailing comments (`;`, `#` outside quotes) taken off: only as much of git's format as
/// finding `core.hooksPath` and `include.path` needs.
fn git_config_values(config: &Path) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(config) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let mut line = line.trim();
        if line.starts_with('[')
            && let Some(end) = line.find(']')
        {
            line = line[end + 1..].trim();
        }
        let Some((key, raw)) = line.split_once('=') else {
            continue;
        };
        let mut value = String::new();
        let mut quoted = false;
        let mut chars = raw.trim().chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(next) = chars.next() {
                        value.push(next);
                    }
                }
                '"' => quoted = !quoted,
                ';' | '#' if !quoted => break,
                c => value.push(c),
            }
        }
        out.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    out
}

/// Makes the hooks folder git uses for each root's repository where it is missing (git works
/// without one), when it lies inside a root, so that it can be kept read-only: a command could
/// otherwise make it, and the hooks in it, for the person's next commit.
pub fn make_git_hooks_folders(roots: &[PathBuf]) {
    for root in roots {
        for folder in git_hooks_folders(root) {
            if !folder.exists()
                && roots.iter().any(|r| folder.starts_with(r))
                && folder.parent().is_some_and(Path::is_dir)
            {
                let _ = std::fs::create_dir(&folder);
            }
        }
    }
}

/// `p` resolved as the policy resolves what tools name (a file not there yet keeps the name it
/// will have); one it cannot resolve (not UTF-8, a leading `~`) as written, made absolute.
fn resolve_trusted(p: &Path, base: &Path) -> PathBuf {
    p.to_str()
        .and_then(|text| crate::paths::resolve(text, base))
        .unwrap_or_else(|| base.join(p))
}

/// Refuses a trusted file inside a workspace root that has more than one name (hard links): a
/// tool could change it through another name, which neither the policy nor the sandbox knows
/// to protect (a link made before the run; the sandbox refuses to make new ones across its
/// mounts). Files outside the roots are left alone: tools cannot write there anyway, and
/// system programs are often linked so (`/usr/bin/perl`).
fn refuse_hard_linked(trusted: &[PathBuf], write_roots: &[PathBuf]) -> Result<(), GatewayError> {
    use std::os::unix::fs::MetadataExt;
    for f in trusted {
        if !write_roots.iter().any(|r| f.starts_with(r)) {
            continue;
        }
        if let Ok(meta) = std::fs::metadata(f)
            && meta.is_file()
            && meta.nlink() > 1
        {
            return Err(GatewayError::Parse {
                what: f.display().to_string(),
                message: format!(
                    "has {} names (hard links): a tool could change it through another one, \
                     and the runtime trusts it (a hook or an MCP server runs it, or it is \
                     configuration); give it a single name (`cp FILE FILE.new && mv FILE.new \
                     FILE`)",
                    meta.nlink()
                ),
            });
        }
    }
    Ok(())
}

/// The files a command run outside the sandbox (a hook, an MCP server) loads that its
/// configuration names: its program when given as a path (not a name looked up on `PATH`),
/// and each argument that names code there now: a file that may be run (its mode says so) or
/// whose name says it is a script (`sh hooks/check.sh`, `node mcp/server.js`; see
/// [`SCRIPT_EXTENSIONS`]). Not folders (a filesystem server's root is an argument, and must
/// stay writable), nor data files (a SQLite server's `--db-path data.db`, which it writes
/// itself). Relative ones are taken from `cwd` (the process's folder when `None`), as the
/// command will.
///
/// What it loads that its arguments do not name (a module `python3 -m` finds, a package `npx`
/// runs from `node_modules`, a script inside `sh -c '...'`) is not found: such commands are
/// as safe as what they load, which a workspace's agents may be able to write (see
/// docs/sandbox.md).
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// std::fs::write(dir.path().join("check.sh"), "exit 0").unwrap();
/// std::fs::write(dir.path().join("notes.db"), "").unwrap();
/// let command = ["sh".to_string(), "check.sh".into(), "--strict".into(), ".".into(), "notes.db".into()];
/// let files = agent_runtime_gateway::config::command_files(&command, Some(dir.path()));
/// assert_eq!(files, [dir.path().join("check.sh")]);
/// ```
pub fn command_files(command: &[String], cwd: Option<&Path>) -> Vec<PathBuf> {
    let Some((program, args)) = command.split_first() else {
        return Vec::new();
    };
    let at = |arg: &str| match cwd {
        Some(dir) => dir.join(arg),
        None => PathBuf::from(arg),
    };
    let mut out = Vec::new();
    if program.contains('/') {
        out.push(at(program));
    }
    // An interpreter's first operand is its script, whatever its name and mode (`sh
    // hooks/check`), and node finds `server` as `server.js` too.
    let name = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    let interpreter = INTERPRETERS
        .iter()
        .any(|i| name == *i || name.strip_prefix(i).is_some_and(is_version));
    let mut script_seen = false;
    let mut skip_value = false;
    for arg in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        if arg.is_empty() || arg.starts_with('-') {
            // An option whose value is the next word (`node --env-file .env server`).
            skip_value = interpreter && OPTIONS_WITH_VALUES.contains(&arg.as_str());
            continue;
        }
        // `deno run x.ts`, `bun run x.js`: the subcommand is no script.
        if interpreter && !script_seen && arg == "run" && (name == "deno" || name == "bun") {
            continue;
        }
        let path = at(arg);
        let script = interpreter && !script_seen;
        if script {
            script_seen = true;
            if name.starts_with("node") || name == "bun" || name == "deno" {
                for ext in ["js", "mjs", "cjs"] {
                    let with = at(&format!("{arg}.{ext}"));
                    if with.is_file() && !out.contains(&with) {
                        out.push(with);
                    }
                }
            }
        }
        if (is_code(&path) || (script && path.is_file())) && !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

/// Programs whose first operand is a script they run (with a version after the name:
/// `python3.12`, `ruby3.1`).
const INTERPRETERS: &[&str] = &[
    "sh",
    "bash",
    "dash",
    "zsh",
    "ksh",
    "fish",
    "python",
    "node",
    "nodejs",
    "bun",
    "deno",
    "perl",
    "ruby",
    "php",
    "lua",
    "luajit",
    "Rscript",
    "tclsh",
    "awk",
    "gawk",
    "osascript",
    "pwsh",
];

/// Interpreters' options that take the next word as their value (so it is no script).
const OPTIONS_WITH_VALUES: &[&str] = &[
    "--env-file",
    "-r",
    "--require",
    "--import",
    "--loader",
    "--experimental-loader",
    "-W",
    "-X",
    "--config",
    "--inspect-port",
    "--conditions",
    "-C",
    "--title",
    "--input-type",
];

/// Whether `s` is a version suffix (`3`, `3.12`, `-3.12`).
fn is_version(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.')
}

/// The names of scripts an interpreter loads (`node server.js`, `python3 hook.py`): what
/// [`command_files`] counts as code without the mode saying so.
pub const SCRIPT_EXTENSIONS: &[&str] = &[
    "sh", "bash", "zsh", "fish", "py", "pyc", "js", "mjs", "cjs", "ts", "mts", "cts", "rb", "pl",
    "pm", "php", "lua", "tcl", "jar", "wasm", "awk", "sed", "r", "jl", "exs", "ex", "ps1",
];

/// Whether `path` is a file that is code: runnable by its mode, or a script by its name.
fn is_code(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    meta.is_file()
        && (meta.permissions().mode() & 0o111 != 0
            || path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| SCRIPT_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())))
}

/// Everything loaded from the configuration, before MCP servers are connected.
pub struct Assembled {
    /// The registry with builtin and command tools.
    pub registry: Arc<Registry>,
    /// The policy.
    pub policy: Policy,
    /// Hooks.
    pub hooks: Vec<CommandHook>,
    /// The redactor with the secrets of command tools' environments.
    pub redactor: Redactor,
    /// Pipeline limits.
    pub config: GatewayConfig,
    /// MCP servers to connect.
    pub mcp: McpConfig,
    /// Sandbox settings.
    pub sandbox: Arc<SandboxSettings>,
    /// The files the runtime trusts, resolved: the configuration, policy and MCP servers files
    /// and what [`command_files`] finds of the hooks and MCP servers. A process that runs
    /// tools watches them for changes ([`crate::trust`]).
    pub trusted: Vec<PathBuf>,
}

impl std::fmt::Debug for Assembled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assembled")
            .field("registry", &self.registry)
            .finish()
    }
}

/// Loads configuration, policy and command tools.
pub fn assemble(opts: &Options) -> Result<Assembled, GatewayError> {
    // What the configuration file declares is wrong in that file.
    let in_config = |e: GatewayError| match &opts.config {
        Some(p) => e.in_file(p),
        None => e,
    };
    let file = match &opts.config {
        Some(p) => GatewayFile::load(p)?,
        None => GatewayFile::default(),
    };
    let workspace = if file.workspace.is_empty() {
        vec![
            std::env::current_dir().map_err(|source| GatewayError::Read {
                path: ".".into(),
                source,
            })?,
        ]
    } else {
        file.workspace.clone()
    };
    let policy_path = opts.policy.clone().or(file.policy.clone());
    let policy = match &policy_path {
        Some(p) => Policy::load_in(p, &workspace).map_err(|e| e.in_file(p))?,
        None => Policy::defaults(workspace.clone())?,
    }
    // The folders every command tool may read are ones the file tools may read too.
    .with_read_roots(&file.read_roots)
    .map_err(in_config)?;
    let write_roots: Vec<PathBuf> = workspace
        .iter()
        .map(|w| {
            std::fs::canonicalize(w).map_err(|source| {
                in_config(GatewayError::Workspace {
                    root: w.clone(),
                    source,
                })
            })
        })
        .collect::<Result<_, _>>()?;
    let mcp_path = opts.mcp.clone().or(file.mcp.clone());
    let mcp = match &mcp_path {
        Some(p) => McpConfig::load(p)?,
        None => McpConfig::default(),
    };
    // What hooks and MCP servers load: they run outside the sandbox, with no one asked.
    let loaded: Vec<PathBuf> = file
        .hooks
        .iter()
        .flat_map(CommandHookConfig::loaded_files)
        .chain(
            mcp.servers
                .values()
                .filter(|s| !s.disabled)
                .flat_map(crate::mcp::McpServerConfig::loaded_files),
        )
        .collect();
    let files: Vec<&Path> = [
        opts.config.as_deref(),
        policy_path.as_deref(),
        mcp_path.as_deref(),
    ]
    .into_iter()
    .flatten()
    .chain(loaded.iter().map(PathBuf::as_path))
    .collect();
    make_git_hooks_folders(&write_roots);
    let protected = protected_paths(&files, &write_roots, &opts.protected);
    let base = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let trusted = resolved_once(files.iter().copied(), &base);
    refuse_hard_linked(&trusted, &write_roots)?;
    let sandbox = Arc::new(
        SandboxSettings::new(write_roots, file.read_roots.clone())
            .with_protected(protected.clone()),
    );
    let registry = Arc::new(Registry::new());
    if file.builtins.unwrap_or(true) {
        for t in builtin::builtins() {
            registry.register(t)?;
        }
    }
    let mut redactor = Redactor::new();
    for t in file.tools {
        let tool = CommandTool::new(t, sandbox.clone(), &mut redactor).map_err(in_config)?;
        registry.register_command(tool).map_err(in_config)?;
    }
    let hooks = file
        .hooks
        .into_iter()
        .map(CommandHook::new)
        .collect::<Result<Vec<_>, _>>()
        .map_err(in_config)?;
    // MCP servers' `${VAR}` values, in their environment and in their HTTP headers (a bearer
    // token), are secrets of this gateway too: a tool may echo them.
    for server in mcp.servers.values() {
        for v in server.env.values().chain(server.headers.values()) {
            for value in crate::redact::referenced_env_values(v) {
                redactor.add_secret(value);
            }
        }
    }
    let mut config = GatewayConfig {
        protected,
        ..GatewayConfig::default()
    };
    if let Some(ms) = file.limits.default_timeout_ms {
        config.default_timeout = Duration::from_millis(ms);
    }
    if let Some(b) = file.limits.max_output_bytes {
        config.max_output_bytes = b;
    }
    if let Some(ms) = file.limits.approval_timeout_ms {
        config.approval_timeout = Duration::from_millis(ms);
    }
    Ok(Assembled {
        registry,
        policy,
        hooks,
        redactor,
        config,
        mcp,
        sandbox,
        trusted,
    })
}

impl Assembled {
    /// Builds the gateway (MCP servers not yet connected: see [`crate::mcp::McpManager`]).
    pub fn into_gateway(
        self,
        events: Arc<dyn EventSink>,
        approval: Arc<dyn ApprovalSink>,
    ) -> Result<(Gateway, McpConfig), GatewayError> {
        let mut b = GatewayBuilder::new(self.registry, events)
            .policy(self.policy)
            .approval(approval)
            .redactor(self.redactor)
            .config(self.config);
        for h in self.hooks {
            b = b.hook(Arc::new(h));
        }
        Ok((b.build()?, self.mcp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hook's folder is its configuration file's unless it names one, relative to the file;
    /// one that is not there is refused when the file is read, not at the first call.
    #[test]
    fn a_hook_runs_in_its_file_s_folder_and_a_missing_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(conf.join("hooks")).unwrap();
        let path = conf.join("gateway.yaml");
        std::fs::write(&path, "hooks:\n  - { name: a, command: [sh, x.sh] }\n  - { name: b, command: [sh, x.sh], cwd: hooks }\n").unwrap();
        let file = GatewayFile::load(&path).unwrap();
        let base = std::fs::canonicalize(&conf).unwrap();
        assert_eq!(file.hooks[0].cwd.as_deref(), Some(base.as_path()));
        assert_eq!(file.hooks[1].cwd, Some(base.join("hooks")));
        std::fs::write(
            &path,
            "hooks:\n  - { name: a, command: [sh, x.sh], cwd: nosuch }\n",
        )
        .unwrap();
        let err = GatewayFile::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("hook \"a\": its cwd") && err.contains("nosuch is not a folder"),
            "{err}"
        );
    }

    /// An interpreter's first operand is its script whatever its name or mode; node's
    /// `server` is `server.js` too; data files and folders stay out.
    #[test]
    fn command_files_take_an_interpreter_s_script_and_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["check", "server.js", "data.db", "notes.txt"] {
            std::fs::write(d.join(f), "x").unwrap();
        }
        let cmd = |words: &[&str]| -> Vec<String> { words.iter().map(|w| w.to_string()).collect() };
        assert_eq!(
            command_files(&cmd(&["sh", "check", "notes.txt"]), Some(d)),
            [d.join("check")]
        );
        assert_eq!(
            command_files(&cmd(&["python3.12", "-u", "check"]), Some(d)),
            [d.join("check")]
        );
        assert_eq!(
            command_files(&cmd(&["node", "--no-warnings", "server", "."]), Some(d)),
            [d.join("server.js")]
        );
        assert!(command_files(&cmd(&["mcp-sqlite", "--db-path", "data.db"]), Some(d)).is_empty());
        // An option's value is no script; `deno run`'s subcommand neither.
        assert_eq!(
            command_files(&cmd(&["node", "--env-file", "data.db", "server"]), Some(d)),
            [d.join("server.js")]
        );
        assert_eq!(
            command_files(&cmd(&["python3", "-W", "ignore", "check"]), Some(d)),
            [d.join("check")]
        );
        assert_eq!(
            command_files(&cmd(&["deno", "run", "server.js"]), Some(d)),
            [d.join("server.js")]
        );
        assert!(command_files(&cmd(&["sh", "-c", "cat check"]), Some(d)).is_empty());
    }

    /// A worktree's `.git` file names its folder, which names the shared one: the hooks and
    /// configuration of both are what `git` runs there, and a `core.hooksPath`.
    #[test]
    fn git_run_paths_follow_a_worktree_to_the_shared_repository() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("main");
        let wt = dir.path().join("wt");
        std::fs::create_dir_all(main.join(".git/worktrees/wt")).unwrap();
        std::fs::create_dir_all(&wt).unwrap();
        std::fs::write(
            main.join(".git/config"),
            "[core]\n\tfsmonitor = false ; ours\n[include]\n\tpath = ../shared.gitconfig\n",
        )
        .unwrap();
        // An included file moves the hooks (on one line with its section, quoted, escaped).
        std::fs::write(
            main.join("shared.gitconfig"),
            "[core] hooksPath = \"tools/h\\\"ooks\" # moved\n",
        )
        .unwrap();
        std::fs::write(main.join(".git/worktrees/wt/commondir"), "../..\n").unwrap();
        std::fs::write(
            wt.join(".git"),
            format!("gitdir: {}\n", main.join(".git/worktrees/wt").display()),
        )
        .unwrap();
        let own = main.join(".git/worktrees/wt");
        let shared = own.join("../..");
        let per_dir =
            |d: &Path| ["hooks", "modules", "commondir", "config.worktree"].map(|n| d.join(n));
        let mut want = vec![wt.join(".git")];
        want.extend(per_dir(&own));
        want.extend(per_dir(&shared));
        want.extend([
            wt.join("tools/h\"ooks"),
            own.join("config"),
            shared.join("config"),
            shared.join("../shared.gitconfig"),
        ]);
        assert_eq!(git_run_paths(&wt), want);
        // The hooks git uses: the moved ones; without a move, the shared repository's.
        assert_eq!(git_hooks_folders(&wt), [wt.join("tools/h\"ooks")]);
        std::fs::write(main.join("shared.gitconfig"), "").unwrap();
        assert_eq!(git_hooks_folders(&wt), [shared.join("hooks")]);
        assert!(git_run_paths(dir.path()).is_empty(), "no repository");
    }

    /// Protected paths are resolved as the policy resolves what tools name: through links,
    /// also for a file not there yet under a folder not there yet; what cannot be resolved is
    /// still protected, as written and absolute.
    #[test]
    fn protected_paths_are_resolved_like_tool_paths() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let real = std::fs::canonicalize(&real).unwrap();
        let not_yet = link.join("not-yet/policy.yaml");
        let hook = PathBuf::from("~/hooks/check");
        let out = protected_paths(&[&not_yet, &hook], std::slice::from_ref(&link), &[]);
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            out,
            vec![
                real.join("not-yet/policy.yaml"),
                cwd.join("~/hooks/check"),
                real.join(CONFIG_FOLDER),
            ]
        );
    }
}
