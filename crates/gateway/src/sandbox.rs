//! Command tools: programs declared in configuration, run in an OS sandbox.
//!
//! # The sandbox (Linux)
//!
//! Each call runs under [bubblewrap](https://github.com/containers/bubblewrap) (`bwrap`, the
//! Debian package `bubblewrap`), with resource limits set on the process before `bwrap` starts:
//!
//! - **Namespaces**: new user, pid, network, ipc, uts and cgroup namespaces (`--unshare-all`); the
//!   network namespace has no interface but a downed loopback, so no socket reaches anything.
//! - **Filesystem**: an empty root with `/usr` (and the `/bin`, `/lib*` links) read-only, as
//!   `/etc` a read-only copy of a few of its files (loader cache, passwd, group, hosts, ...;
//!   made once per process, one bind instead of one per file), a fresh `/proc`, a minimal
//!   `/dev`, a private `/tmp`; the workspace roots bound read-write and the tool's extra read roots
//!   bound read-only. Nothing else of the host exists inside.
//! - **Environment**: cleared; only `PATH`, `HOME=/tmp`, `LANG`, `TMPDIR` and the tool's declared
//!   variables.
//! - **System calls**: a seccomp filter refuses every way of giving a file the set-user-ID or
//!   set-group-ID bit (see `seccomp.rs`): started by root, a command's files are root's.
//! - **Limits**: `RLIMIT_CPU`, `RLIMIT_AS` (memory), `RLIMIT_FSIZE`, `RLIMIT_NOFILE`, no core
//!   files; the number of processes by a pids cgroup when one can be created, else by
//!   `RLIMIT_NPROC` (which the kernel does not apply to root, so root without a pids cgroup is
//!   refused; emptied cgroups are pooled and reused rather than made and removed per call);
//!   wall time by the gateway, which kills the whole tree: `bwrap` runs the command as the init
//!   of its pid namespace with `--die-with-parent`, so killing `bwrap` kills every process
//!   inside, and the cgroup is emptied as well.
//! - **Output**: stdout and stderr are each read up to a cap; past it the tree is killed and the
//!   output returned marked truncated.
//!
//! When `bwrap` is missing or cannot set up its namespaces, the call fails with a
//! `sandbox_error` naming the cause. It runs without the sandbox only when the policy rule that
//! allowed it says `sandbox: none`.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agent_runtime_core::{
    CallContext, ClassifiedError, ErrorClass, RiskClass, Tool, ToolDescriptor, ToolError,
    ToolOutput, ToolSource,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::GatewayError;
use crate::policy::SandboxMode;
use crate::redact::Redactor;

/// Resource limits of one command call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// CPU seconds (`RLIMIT_CPU`).
    pub cpu_secs: u64,
    /// Address space in MiB (`RLIMIT_AS`).
    pub memory_mb: u64,
    /// Processes and threads at once.
    pub processes: u64,
    /// Largest file the command may write, in MiB (`RLIMIT_FSIZE`).
    pub file_size_mb: u64,
    /// Open files (`RLIMIT_NOFILE`).
    pub open_files: u64,
    /// Bytes kept of stdout and of stderr each.
    pub output_bytes: usize,
    /// Wall time in milliseconds.
    pub wall_ms: u64,
}

impl Limits {
    /// Checks every limit is one the kernel can apply and a call can live with: at least 1
    /// (16 for `memory_mb` and `open_files`, which the loader and bubblewrap need some of), and
    /// at most what Linux takes (4,194,304 processes; open files up to this process's hard
    /// limit) or a year of time. Past these every call would fail, in misleading ways
    /// (`memory_mb: 0` reads as a crash), when it starts rather than when the file is read.
    pub fn check(&self) -> Result<(), String> {
        const YEAR_SECS: u64 = 365 * 24 * 3600;
        // A process may not raise its open files past its own hard limit: bwrap would fail
        // to start with every call.
        let open_files_max = hard_open_files_limit().unwrap_or(1 << 20).min(1 << 20);
        // The lows: the loader and bubblewrap need a few files and some address space before
        // the command runs, and below these fail with errors that point elsewhere.
        for (field, value, min, max) in [
            ("cpu_secs", self.cpu_secs, 1, YEAR_SECS),
            ("memory_mb", self.memory_mb, 16, 1 << 30),
            ("processes", self.processes, 1, 4_194_304),
            ("file_size_mb", self.file_size_mb, 1, 1 << 30),
            ("open_files", self.open_files, 16, open_files_max),
            ("output_bytes", self.output_bytes as u64, 1, 1 << 32),
            ("wall_ms", self.wall_ms, 1, YEAR_SECS * 1000),
        ] {
            if !(min..=max).contains(&value) {
                return Err(format!(
                    "limits.{field} is {value}; it must be between {min} and {max}"
                ));
            }
        }
        Ok(())
    }
}

/// This process's hard `RLIMIT_NOFILE`, which no child may exceed.
fn hard_open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some(limit.rlim_max)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu_secs: 30,
            memory_mb: 1024,
            processes: 64,
            file_size_mb: 64,
            open_files: 256,
            output_bytes: 1 << 20,
            wall_ms: 60_000,
        }
    }
}

/// A command tool as declared in the gateway configuration.
///
/// ```yaml
/// - name: grep
///   description: Search the workspace
///   risk: read
///   input_schema:
///     type: object
///     properties: { pattern: { type: string }, path: { type: string } }
///     required: [pattern]
///   command: ["grep", "-rn", "--", "{pattern}", "{path}"]
///   limits: { cpu_secs: 5, wall_ms: 10000 }
/// ```
///
/// Each element of `command` is one word: `{name}` alone is replaced by the argument (an array
/// gives several words, a missing or null argument none); `{name}` inside a longer word is
/// replaced by its text. No shell is involved, so metacharacters in arguments are just text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandToolConfig {
    /// Registry name.
    pub name: String,
    /// What it does, for the model.
    #[serde(default)]
    pub description: String,
    /// JSON Schema of the arguments (default: any object).
    #[serde(default = "any_object")]
    pub input_schema: Value,
    /// JSON Schema of the output, if promised.
    #[serde(default)]
    pub output_schema: Option<Value>,
    /// Risk class.
    pub risk: RiskClass,
    /// Program and argument templates.
    pub command: Vec<String>,
    /// A template written to the command's stdin.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Environment variables: a literal value, or `${NAME}` to pass the host's value (treated as
    /// a secret: redacted from every record).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Extra folders visible read-only inside the sandbox.
    #[serde(default)]
    pub read_roots: Vec<PathBuf>,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// The exit statuses that count as success. Absent (the default), every exit status is
    /// output for the caller to read (an agent reads a failing test run like any result).
    /// Given, any other status, or death by a signal, fails the call as `tool_error` naming
    /// the status and the last line of stderr, so that a task graph's `retry` and
    /// `on_failure` act on it. A command killed for passing `limits.output_bytes` is output
    /// either way (marked truncated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_exit_codes: Option<Vec<i32>>,
}

fn any_object() -> Value {
    json!({"type": "object"})
}

/// Where command tools may write and read: shared by every command tool of a gateway.
#[derive(Clone, Debug)]
pub struct SandboxSettings {
    /// Folders bound read-write (the workspace roots).
    pub write_roots: Vec<PathBuf>,
    /// Folders bound read-only for every command tool.
    pub read_roots: Vec<PathBuf>,
    /// The `bwrap` binary, if found.
    pub bwrap: Option<PathBuf>,
    /// Files and folders inside the workspace roots that commands may read and not change:
    /// the runtime's own configuration, policy, hooks and event log (see
    /// [`crate::config::protected_paths`]), bound read-only over the writable roots.
    pub protected: Vec<PathBuf>,
}

impl SandboxSettings {
    /// Settings with `bwrap` looked up on `PATH`.
    pub fn new(write_roots: Vec<PathBuf>, read_roots: Vec<PathBuf>) -> Self {
        SandboxSettings {
            write_roots,
            read_roots,
            bwrap: find_in_path("bwrap"),
            protected: Vec::new(),
        }
    }

    /// These settings keeping `protected` read-only to commands.
    pub fn with_protected(mut self, protected: Vec<PathBuf>) -> Self {
        self.protected = protected;
        self
    }
}

/// The seccomp programs' pipes for one start of bubblewrap, and the options naming them.
#[derive(Default)]
struct SeccompPipes {
    /// Open until bubblewrap has started (and read them).
    fds: Vec<std::os::fd::OwnedFd>,
    /// `--add-seccomp-fd N` for each, or `--seccomp N` for the one.
    args: Vec<String>,
}

impl SeccompPipes {
    /// The descriptors' numbers (-1 for none), for the child to let through without
    /// allocating.
    fn raw(&self) -> [libc::c_int; 2] {
        let mut raw = [-1; 2];
        for (slot, fd) in raw.iter_mut().zip(&self.fds) {
            *slot = fd.as_raw_fd();
        }
        raw
    }
}

/// The pipes holding the seccomp programs for the `bwrap` at `bwrap` (see [`crate::seccomp`]):
/// two (`--add-seccomp-fd`, bubblewrap 0.5 and later), or the combined one (`--seccomp`).
/// None where no program can be built (an architecture other than x86-64 and aarch64) and the
/// gateway does not run as root, whom the filter is for; root is refused there.
fn seccomp_filter(bwrap: &Path) -> Result<SeccompPipes, ToolError> {
    use crate::seccomp::{Program, program, program_fd};
    let (option, programs): (&str, &[Program]) = if bwrap_knows(bwrap, "--add-seccomp-fd") {
        ("--add-seccomp-fd", &[Program::Modes, Program::Unsupported])
    } else {
        ("--seccomp", &[Program::Combined])
    };
    let mut pipes = SeccompPipes::default();
    for &which in programs {
        match program(which) {
            Ok(bytes) => {
                let fd = program_fd(bytes).map_err(sandbox_error)?;
                pipes.args.push(option.into());
                pipes.args.push(fd.as_raw_fd().to_string());
                pipes.fds.push(fd);
            }
            // SAFETY: geteuid has no preconditions.
            Err(why) if unsafe { libc::geteuid() } == 0 => {
                return Err(sandbox_error(format!(
                    "{why}, and without it a command run as root could leave a set-user-ID \
                     file in the workspace; run the gateway as an ordinary user"
                )));
            }
            Err(_) => return Ok(SeccompPipes::default()),
        }
    }
    Ok(pipes)
}

/// Whether the `bwrap` at `path` knows `option` (`--disable-userns` from bubblewrap 0.8,
/// `--add-seccomp-fd` from 0.5), asked once per binary and option: an option an older one does
/// not know would fail every call.
fn bwrap_knows(path: &Path, option: &'static str) -> bool {
    static KNOWN: std::sync::Mutex<BTreeMap<(PathBuf, &'static str), bool>> =
        std::sync::Mutex::new(BTreeMap::new());
    let mut known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
    *known
        .entry((path.to_path_buf(), option))
        .or_insert_with(|| {
            std::process::Command::new(path)
                .arg("--help")
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .any(|w| w == option)
                })
        })
}

/// Finds `program` on `PATH`.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Checks that the sandbox works here by running `true` in it; the error names what is missing.
pub fn probe(settings: &SandboxSettings) -> Result<(), String> {
    let Some(bwrap) = &settings.bwrap else {
        return Err(
            "bubblewrap (bwrap) is not on PATH; install the Debian package `bubblewrap` \
                    (scripts/test-deps.sh does)"
                .into(),
        );
    };
    let mut cmd = std::process::Command::new(bwrap);
    // With the seccomp filter, as every call has it: a kernel without seccomp fails here.
    let filter = seccomp_filter(bwrap).map_err(|e| e.message)?;
    cmd.args(&filter.args);
    let raw = filter.raw();
    crate::child::prepare(&mut cmd);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure only calls fcntl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || crate::seccomp::inherit_all(raw));
        }
    }
    cmd.args(bwrap_args(settings, &[]))
        .args(["--chdir", "/", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start {}: {e}", bwrap.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "bubblewrap cannot create its namespaces here: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];
const ETC_FILES: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/localtime",
    "/etc/mime.types",
];

/// A private copy of the [`ETC_FILES`] that exist, made once per process in the temporary
/// folder (a fresh folder only this user can write), bound read-only as the sandbox's `/etc`.
/// `None` (then each entry is bound on its own) when it cannot be made.
fn etc_copy() -> Option<&'static Path> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = std::env::temp_dir();
        remove_stale_etc_copies(&tmp);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tmp = std::fs::canonicalize(&tmp).unwrap_or(tmp);
        let dir = tmp.join(format!("agent-runtime-etc-{}-{nanos}", std::process::id()));
        // create_dir fails if anything is there already, so the folder is ours.
        std::fs::create_dir(&dir).ok()?;
        let made = (|| -> std::io::Result<()> {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            for f in ETC_FILES {
                let src = Path::new(f);
                if std::fs::symlink_metadata(src).is_ok() {
                    copy_entry(src, &dir.join(src.strip_prefix("/etc").unwrap_or(src)))?;
                }
            }
            Ok(())
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        }
        Some(dir)
    })
    .as_deref()
}

/// Copies a file, a symlink (as a symlink) or a folder of them.
fn copy_entry(src: &Path, dst: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(src)?;
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)
    } else if meta.is_dir() {
        std::fs::create_dir(dst)?;
        for e in std::fs::read_dir(src)? {
            let e = e?;
            copy_entry(&e.path(), &dst.join(e.file_name()))?;
        }
        Ok(())
    } else if meta.is_file() {
        std::fs::copy(src, dst).map(|_| ())
    } else {
        Ok(())
    }
}

/// Removes the `/etc` copies of processes that have exited.
fn remove_stale_etc_copies(tmp: &Path) {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let Ok(dir) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("agent-runtime-etc-"))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let mine = std::fs::symlink_metadata(e.path()).is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if mine && pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn bwrap_args(settings: &SandboxSettings, extra_read: &[PathBuf]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--unshare-all",
        // Started by root, bubblewrap keeps every capability for the command (uid 0 inside is
        // root outside): it could remount the read-only binds read-write and write the host's
        // files, or raise its own cgroup limits. Nothing a tool does needs one.
        "--cap-drop",
        "ALL",
        "--die-with-parent",
        "--new-session",
        "--setenv",
        "PATH",
        "/usr/local/bin:/usr/bin:/bin",
        "--setenv",
        "HOME",
        "/tmp",
        "--setenv",
        "TMPDIR",
        "/tmp",
        "--setenv",
        "LANG",
        "C.UTF-8",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root
        && settings
            .bwrap
            .as_deref()
            .is_some_and(|b| bwrap_knows(b, "--disable-userns"))
    {
        // Root's command could make a user namespace of its own, in which it has every
        // capability again (`setcap` writes file capabilities there; only kernels from 5.12
        // refuse the mapping that would make them count outside). bubblewrap forbids new ones
        // (from 0.8) when it made the user namespace itself.
        a.extend(["--unshare-user", "--disable-userns"].map(String::from));
    }
    for dir in SYSTEM_DIRS {
        let p = Path::new(dir);
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(p) {
                    a.extend([
                        "--symlink".into(),
                        target.display().to_string(),
                        dir.to_string(),
                    ]);
                }
            }
            Ok(m) if m.is_dir() => a.extend(["--ro-bind".into(), dir.to_string(), dir.to_string()]),
            _ => {}
        }
    }
    // The copy must not be reachable through a writable root (a workspace at or above the
    // temporary folder), or a command could change the /etc of later calls.
    let under_write_root = |dir: &Path| {
        settings.write_roots.iter().any(|w| {
            let w = std::fs::canonicalize(w).unwrap_or_else(|_| w.clone());
            dir.starts_with(&w)
        })
    };
    match etc_copy().filter(|d| !under_write_root(d)) {
        // One read-only bind of a copy of the few /etc entries, rather than one per entry:
        // each read-only bind costs bubblewrap a mount, a remount and a parse of the mount table.
        Some(dir) => a.extend(["--ro-bind".into(), dir.display().to_string(), "/etc".into()]),
        None => {
            for f in ETC_FILES {
                a.extend(["--ro-bind-try".into(), f.to_string(), f.to_string()]);
            }
        }
    }
    a.extend(
        [
            "--proc",
            "/proc",
            // A fresh /proc still holds the host's sysctls and SysRq trigger, which the real
            // uid 0 a root-started sandbox runs as may write without any capability
            // (`kernel/core_pattern` runs a program as root on the next crash): read-only.
            "--ro-bind",
            "/proc/sys",
            "/proc/sys",
            "--ro-bind-try",
            "/proc/sysrq-trigger",
            "/proc/sysrq-trigger",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    for r in settings.read_roots.iter().chain(extra_read) {
        a.extend([
            "--ro-bind-try".into(),
            r.display().to_string(),
            r.display().to_string(),
        ]);
    }
    for w in &settings.write_roots {
        a.extend([
            "--bind".into(),
            w.display().to_string(),
            w.display().to_string(),
        ]);
    }
    // Mounted over the writable roots: a command that rewrote the runtime's configuration,
    // policy or hooks there would run unsandboxed at the next start (a hook runs outside the
    // sandbox, with no one asked).
    let mut pinned: Vec<&Path> = Vec::new();
    let mut read_only: Vec<&Path> = Vec::new();
    for p in &settings.protected {
        let Some(root) = settings.write_roots.iter().find(|w| p.starts_with(w)) else {
            continue;
        };
        // A workspace root's configuration folder that is not there yet is made (empty), so
        // that it can be kept read-only: a command must not create one for the next start to
        // load.
        if p.file_name() == Some(std::ffi::OsStr::new(crate::config::CONFIG_FOLDER)) && !p.exists()
        {
            let _ = std::fs::create_dir(p);
        }
        if !p.exists() {
            continue;
        }
        // Every folder between the root and the file is bound onto itself (still writable), so
        // that it is a mount point, which cannot be renamed: a read-only file in a folder that
        // can be renamed away (`mv conf conf.old && mkdir conf ...`) protects nothing.
        for folder in p.ancestors().skip(1).take_while(|a| *a != root.as_path()) {
            if !pinned.contains(&folder) && folder.is_dir() {
                pinned.push(folder);
            }
        }
        read_only.push(p);
    }
    // Folders outermost first, then the files: a later bind of a folder would hide an earlier
    // one of a file in it.
    pinned.sort_by_key(|f| f.components().count());
    for f in pinned {
        a.extend([
            "--bind".into(),
            f.display().to_string(),
            f.display().to_string(),
        ]);
    }
    for p in read_only {
        a.extend([
            "--ro-bind".into(),
            p.display().to_string(),
            p.display().to_string(),
        ]);
    }
    // The root bwrap builds is a tmpfs: make it read-only once everything is mounted, so only
    // the workspace roots and the private /tmp are writable.
    a.extend(["--remount-ro".into(), "/".into()]);
    a
}

/// A command tool: implements core's [`Tool`] (running sandboxed), and [`CommandTool::run`]
/// takes the sandbox mode the policy granted.
pub struct CommandTool {
    descriptor: ToolDescriptor,
    config: CommandToolConfig,
    settings: Arc<SandboxSettings>,
    env: Vec<(String, String)>,
    /// Where the command starts: the first workspace root.
    chdir: PathBuf,
    /// `bwrap`'s options up to `--chdir` and the command, built once: the settings never change.
    bwrap_argv: Vec<String>,
}

impl std::fmt::Debug for CommandTool {
    // By hand: the environment holds the tool's secrets; only its variable names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandTool")
            .field("name", &self.descriptor.name)
            .field("command", &self.config.command)
            .field(
                "env",
                &self.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl CommandTool {
    /// A command tool from its declaration; `${NAME}` environment values are read from the
    /// host now and registered with `redactor` as secrets.
    pub fn new(
        config: CommandToolConfig,
        settings: Arc<SandboxSettings>,
        redactor: &mut Redactor,
    ) -> Result<Self, GatewayError> {
        let bad = |message: String| GatewayError::InvalidTool {
            name: config.name.clone(),
            message,
        };
        if config.command.is_empty() {
            return Err(bad("command is empty".into()));
        }
        if config.command[0].contains('{') {
            return Err(bad(
                "the program (first word of command) cannot be a template".into(),
            ));
        }
        if config
            .success_exit_codes
            .as_ref()
            .is_some_and(Vec::is_empty)
        {
            return Err(bad(
                "success_exit_codes is empty, so no call could succeed; leave it out to have every exit status returned as output".into(),
            ));
        }
        config.limits.check().map_err(bad)?;
        if let Some(code) = config
            .success_exit_codes
            .iter()
            .flatten()
            .find(|c| !(0..=255).contains(*c))
        {
            return Err(bad(format!(
                "success_exit_codes holds {code}; an exit status is between 0 and 255"
            )));
        }
        let mut env = Vec::new();
        for (k, v) in &config.env {
            let value = crate::redact::expand_env(v, redactor)
                .map_err(|var| bad(format!("environment variable {var} is not set")))?;
            env.push((k.clone(), value));
        }
        let descriptor = ToolDescriptor {
            name: config.name.clone(),
            description: config.description.clone(),
            input_schema: config.input_schema.clone(),
            output_schema: config.output_schema.clone(),
            risk: config.risk,
            source: ToolSource::Command,
        };
        let chdir = settings
            .write_roots
            .first()
            .cloned()
            .unwrap_or_else(|| PathBuf::from("/"));
        // The tool's environment (its secrets among it) is not put on bwrap's command line,
        // which every local user can read in /proc: bwrap gets it as its own environment,
        // cleared of everything else, and passes it on.
        let bwrap_argv = bwrap_args(&settings, &config.read_roots);
        Ok(CommandTool {
            descriptor,
            config,
            settings,
            env,
            chdir,
            bwrap_argv,
        })
    }

    /// The declaration the tool was made from.
    pub fn config(&self) -> &CommandToolConfig {
        &self.config
    }

    /// The tool's wall-time limit.
    pub fn timeout(&self) -> Option<Duration> {
        Some(Duration::from_millis(self.config.limits.wall_ms))
    }

    /// The command line for `args` (program first).
    pub fn render(&self, args: &Value) -> Result<Vec<String>, ToolError> {
        let mut out = Vec::new();
        for word in &self.config.command {
            if let Some(name) = whole_placeholder(word) {
                match args.get(name) {
                    None | Some(Value::Null) => {}
                    Some(Value::Array(items)) => {
                        // A null item is no word, as a null value is.
                        for i in items.iter().filter(|i| !i.is_null()) {
                            out.push(scalar_text(name, i)?);
                        }
                    }
                    Some(v) => out.push(scalar_text(name, v)?),
                }
            } else {
                out.push(checked_word(
                    &format!("word `{word}`"),
                    substitute(word, args)?,
                )?);
            }
        }
        Ok(out)
    }

    /// Runs the command with `args`: in the sandbox, or directly when `mode` is
    /// [`SandboxMode::None`] (which only a policy rule can grant).
    pub async fn run(
        &self,
        args: Value,
        ctx: CallContext,
        mode: SandboxMode,
    ) -> Result<ToolOutput, ToolError> {
        let argv = self.render(&args)?;
        let stdin = match &self.config.stdin {
            Some(t) => Some(substitute(t, &args)?),
            None => None,
        };
        let limits = &self.config.limits;
        // Where the policy judged the call's relative paths (`CallContext::workdir`: its first
        // workspace root), when commands may write there: a policy whose workspace is not the
        // configuration's judged `protected/x` in one folder while the command wrote it in
        // another.
        let chdir: &Path = ctx
            .workdir
            .as_deref()
            .filter(|w| self.settings.write_roots.iter().any(|r| w.starts_with(r)))
            .unwrap_or(&self.chdir);
        let mut cgroup = None;
        // The seccomp programs' pipes: open until bwrap has started (and read them).
        let mut filter = SeccompPipes::default();
        let mut cmd = match mode {
            SandboxMode::Bubblewrap => {
                let Some(bwrap) = &self.settings.bwrap else {
                    return Err(sandbox_error(
                        "bubblewrap (bwrap) is not installed, so the command cannot be sandboxed; \
                         install the Debian package `bubblewrap`, or allow this tool with \
                         `sandbox: none` in the policy",
                    ));
                };
                let mut cmd = tokio::process::Command::new(bwrap);
                filter = seccomp_filter(bwrap)?;
                cmd.args(&filter.args);
                cmd.args(&self.bwrap_argv)
                    .args([std::ffi::OsStr::new("--chdir"), chdir.as_os_str()])
                    .arg("--")
                    .args(&argv)
                    .env_clear()
                    .envs(self.env.iter().cloned());
                cmd
            }
            SandboxMode::None => {
                let mut cmd = tokio::process::Command::new(&argv[0]);
                cmd.args(&argv[1..])
                    .env_clear()
                    .env("PATH", UNSANDBOXED_PATH)
                    .env("LANG", "C.UTF-8")
                    .envs(self.env.iter().cloned())
                    .current_dir(chdir)
                    .process_group(0);
                cmd
            }
        };
        let nproc = match Cgroup::create(limits.processes) {
            Ok(cg) => {
                cgroup = Some(cg);
                None
            }
            Err(why) => {
                // SAFETY: geteuid has no preconditions.
                if unsafe { libc::geteuid() } == 0 {
                    return Err(sandbox_error(format!(
                        "cannot limit the number of processes: no pids cgroup ({why}) and \
                         RLIMIT_NPROC does not apply to root"
                    )));
                }
                Some(own_process_count().saturating_add(limits.processes))
            }
        };
        let procs_fd = cgroup.as_ref().map(|c| c.procs_fd);
        let rl = RawLimits {
            cpu: limits.cpu_secs,
            memory: limits.memory_mb.saturating_mul(1 << 20),
            fsize: limits.file_size_mb.saturating_mul(1 << 20),
            nofile: limits.open_files,
            nproc,
        };
        let filter_fds = filter.raw();
        // SAFETY: the closure only calls async-signal-safe functions (fcntl, setrlimit, getpid,
        // write) and allocates nothing. After `child::prepare`'s, which closes the descriptors
        // this process inherited: the filter's pipe is let through after that.
        crate::child::prepare(cmd.as_std_mut());
        crate::child::die_with_parent(cmd.as_std_mut());
        unsafe {
            cmd.pre_exec(move || {
                crate::seccomp::inherit_all(filter_fds)?;
                rl.apply(procs_fd)
            });
        }
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| {
            if mode == SandboxMode::None {
                // Only the program's own failure is the tool's: a missing working folder or a
                // limit that could not be set fails starting it too, and is the sandbox's.
                let path = self
                    .env
                    .iter()
                    .find(|(k, _)| k == "PATH")
                    .map_or(UNSANDBOXED_PATH, |(_, v)| v.as_str());
                if e.raw_os_error() == Some(libc::ENOEXEC) || !runnable(&argv[0], path, chdir) {
                    cannot_run(&self.descriptor.name, &argv[0], &e.to_string())
                } else {
                    sandbox_error(format!(
                        "{}: cannot start the command: {e}",
                        self.descriptor.name
                    ))
                }
            } else {
                sandbox_error(format!("{}: cannot start bwrap: {e}", self.descriptor.name))
            }
        })?;
        let pid = child.id();
        drop(filter);
        if let Some(cg) = &mut cgroup {
            cg.close_procs_fd();
        }
        if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = w.write_all(text.as_bytes()).await;
            });
        }
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(sandbox_error("no output pipes"));
        };
        let cap = limits.output_bytes;
        let out_fut = read_capped(stdout, cap);
        let err_fut = read_capped(stderr, cap);
        tokio::pin!(out_fut, err_fut);
        let wall = ctx
            .timeout
            .map_or(Duration::from_millis(limits.wall_ms), |t| {
                t.min(Duration::from_millis(limits.wall_ms))
            });
        let deadline = tokio::time::sleep(wall);
        tokio::pin!(deadline);
        let (mut out, mut err) = (None, None);
        let mut overflow = false;
        let mut stop: Option<ErrorClass> = None;
        while !(overflow || out.is_some() && err.is_some()) {
            tokio::select! {
                r = &mut out_fut, if out.is_none() => { overflow |= r.1; out = Some(r.0); }
                r = &mut err_fut, if err.is_none() => { overflow |= r.1; err = Some(r.0); }
                _ = &mut deadline => { stop = Some(ErrorClass::Timeout); break; }
                _ = ctx.cancel.cancelled() => { stop = Some(ErrorClass::Cancelled); break; }
            }
        }
        let killed = overflow || stop.is_some();
        if killed {
            kill_tree(&mut child, pid, mode, cgroup.as_ref());
        }
        let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        let pids_hit = cgroup.as_ref().is_some_and(Cgroup::limit_hit);
        if let Some(cg) = cgroup.take() {
            // Kill stragglers now; removing the emptied cgroup can wait for the kernel to finish
            // tearing the pid namespace down, off the call's path.
            cg.kill_all();
            tokio::spawn(cg.release());
        }
        let name = &self.descriptor.name;
        let pids_note = if pids_hit {
            format!("; the process limit ({}) was reached", limits.processes)
        } else {
            String::new()
        };
        match stop {
            Some(ErrorClass::Timeout) => {
                return Err(ClassifiedError::new(
                    ErrorClass::Timeout,
                    format!(
                        "{name}: wall time limit of {} ms reached; process tree killed{pids_note}",
                        wall.as_millis()
                    ),
                ));
            }
            Some(_) => {
                return Err(ClassifiedError::new(
                    ErrorClass::Cancelled,
                    format!("{name}: cancelled; process tree killed"),
                ));
            }
            None => {}
        }
        let status = match status {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(sandbox_error(format!(
                    "{name}: waiting for the command: {e}"
                )));
            }
            Err(_) => {
                return Err(sandbox_error(format!(
                    "{name}: the command did not exit after being killed"
                )));
            }
        };
        let stdout = String::from_utf8_lossy(&out.unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&err.unwrap_or_default()).into_owned();
        if overflow {
            return Ok(ToolOutput {
                // Marked in the value too: a caller reading the output (a task downstream, an
                // MCP client's structured content) sees that it was cut.
                value: json!({"exit_code": null, "stdout": stdout, "stderr": stderr,
                              "truncated": true,
                              "note": format!("output limit of {cap} bytes reached; process tree killed")}),
                truncated: true,
            });
        }
        // bwrap's own failures (a root that cannot be bound, namespaces refused) exit 1 with
        // its message on stderr before the command ever ran. The last of them, executing the
        // program, fails for the tool's own reason (a missing program), not the sandbox's.
        if mode == SandboxMode::Bubblewrap
            && status.code() == Some(1)
            && let Some(why) = stderr
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("bwrap: execvp "))
                .and_then(|l| l.rsplit_once(": "))
                .map(|(_, why)| why)
        {
            return Err(cannot_run(name, &argv[0], why));
        }
        if mode == SandboxMode::Bubblewrap
            && status.code() == Some(1)
            && stderr.starts_with("bwrap: ")
        {
            return Err(sandbox_error(format!(
                "{name}: the sandbox could not be set up: {}",
                stderr.lines().next().unwrap_or_default()
            )));
        }
        // bwrap reports a signal death of the command as 128 + the signal number, which a
        // command exiting with that status (`exit 137`) looks the same as.
        let reported = status
            .code()
            .filter(|c| mode == SandboxMode::Bubblewrap && *c > 128 && *c < 160);
        // A status the tool lists as success is the command's own, whatever it looks like.
        let reported = reported.filter(|c| {
            !self
                .config
                .success_exit_codes
                .as_ref()
                .is_some_and(|ok| ok.contains(c))
        });
        let mut signal = status.signal().or(reported.map(|c| c - 128));
        // A process cannot have used more CPU time than the wall time it ran for on every core:
        // a status 152 that came sooner is the command's own, not the CPU limit's SIGXCPU.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        if signal == Some(libc::SIGXCPU)
            && reported.is_some()
            && started.elapsed().as_secs_f64() * cores < limits.cpu_secs as f64
        {
            signal = None;
        }
        let alike = match reported {
            Some(code) => format!(
                " (or the command exited with status {code}, which the sandbox reports alike)"
            ),
            None => String::new(),
        };
        match signal {
            Some(libc::SIGXCPU) => Err(sandbox_error(format!(
                "{name}: CPU time limit of {} s reached; process killed",
                limits.cpu_secs
            ))),
            Some(libc::SIGXFSZ) => Err(sandbox_error(format!(
                "{name}: file size limit of {} MiB reached; process killed{alike}",
                limits.file_size_mb
            ))),
            Some(sig) if self.config.success_exit_codes.is_some() => {
                Err(ClassifiedError::tool(format!(
                    "{name}: killed by signal {sig}{alike}{pids_note}{}",
                    last_line(&stderr)
                )))
            }
            Some(sig) => Ok(ToolOutput::new(json!({
                "exit_code": null, "signal": sig, "stdout": stdout, "stderr": stderr,
                "note": format!("killed by signal {sig}{alike}{pids_note}"),
                "duration_ms": started.elapsed().as_millis() as u64,
            }))),
            None => {
                if let (Some(ok), Some(code)) = (&self.config.success_exit_codes, status.code())
                    && !ok.contains(&code)
                {
                    let pids = if pids_hit {
                        format!(
                            " after the process limit ({}) was reached",
                            limits.processes
                        )
                    } else {
                        String::new()
                    };
                    return Err(ClassifiedError::tool(format!(
                        "{name}: exited with status {code}{pids} (success_exit_codes: {}){}",
                        ok.iter().map(i32::to_string).collect::<Vec<_>>().join(", "),
                        last_line(&stderr)
                    )));
                }
                let mut value = json!({
                    "exit_code": status.code(), "stdout": stdout, "stderr": stderr,
                    "duration_ms": started.elapsed().as_millis() as u64,
                });
                // A command whose forks were refused often ends on its own ("Cannot fork"):
                // say why, or the agent sees only an exit code.
                if pids_hit {
                    value["note"] = json!(format!(
                        "the process limit ({}) was reached; remaining processes killed",
                        limits.processes
                    ));
                }
                Ok(ToolOutput::new(value))
            }
        }
    }
}

fn kill_tree(
    child: &mut tokio::process::Child,
    pid: Option<u32>,
    mode: SandboxMode,
    cgroup: Option<&Cgroup>,
) {
    if let (SandboxMode::None, Some(pid)) = (mode, pid) {
        // SAFETY: killing our own child's process group; a stale id is harmless (ESRCH).
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
        }
    }
    let _ = child.start_kill();
    if let Some(cg) = cgroup {
        cg.kill_all();
    }
}

/// The last non-empty line of a failed command's stderr, for its error (`: LINE`, or nothing):
/// what a command says last is usually why it failed. Not cut here: the gateway cuts long
/// messages after redacting them, so no cut goes through a secret.
fn last_line(stderr: &str) -> String {
    match crate::child::last_said(stderr) {
        None => String::new(),
        Some(line) => format!(": {line}"),
    }
}

/// The `PATH` a command run without the sandbox gets, unless its `env` sets one.
const UNSANDBOXED_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Whether `program` names an executable file: a path (relative to `cwd`) when it holds a
/// `/`, else a name found in `path`'s folders, as `execvp` looks.
fn runnable(program: &str, path: &str, cwd: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        executable(&cwd.join(program))
    } else {
        path.split(':')
            .filter(|d| !d.is_empty())
            .any(|d| executable(&Path::new(d).join(program)))
    }
}

/// The tool's program could not be executed (missing, not executable): the tool's failure,
/// which a retry policy on `tool_error` and `on_failure` act on, not a broken sandbox.
fn cannot_run(tool: &str, program: &str, why: &str) -> ToolError {
    ClassifiedError::new(
        ErrorClass::ToolError,
        format!("{tool}: cannot run {program:?}: {why}"),
    )
}

fn sandbox_error(message: impl Into<String>) -> ToolError {
    ClassifiedError::new(ErrorClass::SandboxError, message)
}

fn whole_placeholder(word: &str) -> Option<&str> {
    let inner = word.strip_prefix('{')?.strip_suffix('}')?;
    (!inner.is_empty()
        && inner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    .then_some(inner)
}

/// The longest word of a command line Linux takes: `MAX_ARG_STRLEN` (32 pages) counts the
/// word's terminating NUL.
const MAX_WORD_BYTES: usize = 128 * 1024 - 1;

fn scalar_text(name: &str, v: &Value) -> Result<String, ToolError> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => {
            return Err(ClassifiedError::new(
                ErrorClass::InvalidArguments,
                format!("argument {name} must be a string, number, boolean or array of them"),
            ));
        }
    };
    checked_word(&format!("argument {name}"), text)
}

/// Refuses, as the caller's mistake, a word no command line can carry: starting the command
/// failed with a `sandbox_error` the caller could not tell from a broken sandbox.
fn checked_word(what: &str, word: String) -> Result<String, ToolError> {
    let bad = |why: String| ClassifiedError::new(ErrorClass::InvalidArguments, why);
    if word.contains('\0') {
        return Err(bad(format!(
            "{what} contains a NUL byte, which a command line cannot carry"
        )));
    }
    if word.len() > MAX_WORD_BYTES {
        return Err(bad(format!(
            "{what} makes a command-line word of {} bytes, over the system's limit of {MAX_WORD_BYTES}; pass large data on stdin",
            word.len()
        )));
    }
    Ok(word)
}

fn substitute(template: &str, args: &Value) -> Result<String, ToolError> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        match after
            .find('}')
            .and_then(|end| whole_placeholder(&after[..=end]).map(|n| (n, end)))
        {
            Some((name, end)) => {
                let v = args.get(name).filter(|v| !v.is_null()).ok_or_else(|| {
                    ClassifiedError::new(
                        ErrorClass::InvalidArguments,
                        format!("argument {name} is required"),
                    )
                })?;
                out.push_str(&scalar_text(name, v)?);
                rest = &after[end + 1..];
            }
            None => {
                out.push('{');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

async fn read_capped<R: AsyncRead + Unpin>(mut r: R, cap: usize) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return (buf, false),
            Ok(n) => {
                if buf.len() + n > cap {
                    let room = cap - buf.len();
                    buf.extend_from_slice(&chunk[..room]);
                    return (buf, true);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

#[derive(Clone, Copy)]
struct RawLimits {
    cpu: u64,
    memory: u64,
    fsize: u64,
    nofile: u64,
    nproc: Option<u64>,
}

impl RawLimits {
    fn apply(&self, procs_fd: Option<i32>) -> std::io::Result<()> {
        // Soft limit first (SIGXCPU, reported as the CPU limit), the hard one a second later.
        set_limit2(libc::RLIMIT_CPU, self.cpu, self.cpu.saturating_add(1))?;
        set_limit(libc::RLIMIT_AS, self.memory)?;
        set_limit(libc::RLIMIT_FSIZE, self.fsize)?;
        set_limit(libc::RLIMIT_NOFILE, self.nofile)?;
        set_limit(libc::RLIMIT_CORE, 0)?;
        if let Some(n) = self.nproc {
            set_limit(libc::RLIMIT_NPROC, n)?;
        }
        if let Some(fd) = procs_fd {
            // Join the pids cgroup: write our pid in decimal, without allocating.
            // SAFETY: getpid has no preconditions.
            let mut pid = unsafe { libc::getpid() } as u64;
            let mut digits = [0u8; 20];
            let mut i = digits.len();
            loop {
                i -= 1;
                digits[i] = b'0' + (pid % 10) as u8;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            let len = digits.len() - i;
            // SAFETY: fd is an open descriptor of cgroup.procs; the buffer outlives the call.
            let n = unsafe { libc::write(fd, digits[i..].as_ptr().cast(), len) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    set_limit2(resource, value, value)
}

fn set_limit2(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn own_process_count() -> u64 {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0u64;
    for e in dir.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(status) = std::fs::read_to_string(e.path().join("status")) {
            let mine = status.lines().any(|l| {
                l.strip_prefix("Uid:")
                    .and_then(|r| r.split_whitespace().next())
                    == Some(&uid.to_string())
            });
            let threads: u64 = status
                .lines()
                .find_map(|l| {
                    l.strip_prefix("Threads:")
                        .and_then(|r| r.trim().parse().ok())
                })
                .unwrap_or(1);
            if mine {
                n += threads;
            }
        }
    }
    n
}

static CGROUP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Emptied pids cgroups kept for the next calls, so that a call does not pay for `mkdir` and
/// `rmdir` on the cgroup file system (and for finding the hierarchy) on its path.
struct CgroupPool {
    /// The folder new cgroups are made in, found once.
    base: Result<PathBuf, String>,
    free: std::sync::Mutex<Vec<PooledCgroup>>,
}

/// A cgroup with no process in it, ready for a call.
struct PooledCgroup {
    dir: PathBuf,
    /// The `max` count of `pids.events` when it was emptied (the counter never goes down).
    events: u64,
}

/// At most this many emptied cgroups are kept; more are removed.
const CGROUP_POOL_MAX: usize = 4;

fn cgroup_pool() -> &'static CgroupPool {
    static POOL: std::sync::OnceLock<CgroupPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let base = find_cgroup_base();
        if let Ok(b) = &base {
            remove_stale_cgroups(b);
        }
        CgroupPool {
            base,
            free: std::sync::Mutex::new(Vec::new()),
        }
    })
}

/// The gateway's own cgroup in a hierarchy with the pids controller: the cgroup v1 `pids`
/// hierarchy, or a cgroup v2 one with `pids` delegated. The first where a child can be made wins.
fn find_cgroup_base() -> Result<PathBuf, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let mut candidates = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        if controllers.split(',').any(|c| c == "pids") {
            candidates
                .push(PathBuf::from("/sys/fs/cgroup/pids").join(path.trim_start_matches('/')));
        } else if controllers.is_empty() {
            for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                let base = PathBuf::from(root).join(path.trim_start_matches('/'));
                let ok = std::fs::read_to_string(base.join("cgroup.subtree_control"))
                    .is_ok_and(|c| c.split_whitespace().any(|c| c == "pids"));
                if ok {
                    candidates.push(base);
                }
            }
        }
    }
    let mut last = "no pids controller".to_string();
    for base in candidates {
        let probe = base.join(format!("agent-runtime-{}-probe", std::process::id()));
        match std::fs::create_dir(&probe) {
            Ok(()) => {
                let _ = std::fs::remove_dir(&probe);
                return Ok(base);
            }
            Err(e) => last = format!("{}: {e}", probe.display()),
        }
    }
    Err(last)
}

/// Removes the empty cgroups that gateways which have exited left in their pool.
fn remove_stale_cgroups(base: &Path) {
    let Ok(dir) = std::fs::read_dir(base) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("agent-runtime-"))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

fn pids_events_max(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("pids.events"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("max ").and_then(|n| n.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// A pids cgroup for one call: taken from the pool (or created) before the command starts,
/// emptied after, and returned to the pool once no process is left in it (or removed).
struct Cgroup {
    dir: PathBuf,
    procs_fd: i32,
    procs_file: Option<std::fs::File>,
    /// `pids.events` `max` count before the call.
    events: u64,
    removed: bool,
}

impl Cgroup {
    fn create(max: u64) -> Result<Cgroup, String> {
        let pool = cgroup_pool();
        let base = pool.base.as_ref().map_err(Clone::clone)?;
        let pooled = pool.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let (dir, events) = match pooled {
            Some(p) => {
                // Written for every call, even when the limit is the same: what the last call
                // left in the file is not trusted (a command with capabilities could raise it).
                if let Err(e) = std::fs::write(p.dir.join("pids.max"), max.to_string()) {
                    let _ = std::fs::remove_dir(&p.dir);
                    return Err(format!("{}: {e}", p.dir.display()));
                }
                (p.dir, p.events)
            }
            None => {
                let dir = base.join(format!(
                    "agent-runtime-{}-{}",
                    std::process::id(),
                    CGROUP_SEQ.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                if let Err(e) = std::fs::write(dir.join("pids.max"), max.to_string()) {
                    let _ = std::fs::remove_dir(&dir);
                    return Err(format!("{}: {e}", dir.display()));
                }
                (dir, 0)
            }
        };
        match std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
        {
            Ok(file) => {
                use std::os::fd::AsRawFd;
                let procs_fd = file.as_raw_fd();
                Ok(Cgroup {
                    dir,
                    procs_fd,
                    procs_file: Some(file),
                    events,
                    removed: false,
                })
            }
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(format!("{}: {e}", dir.display()))
            }
        }
    }

    /// Kills what is left and, once the cgroup is empty, returns it to the pool (or removes it
    /// when the pool is full), waiting up to a second for the processes to go.
    async fn release(mut self) {
        self.procs_file = None;
        for _ in 0..100 {
            self.kill_all();
            if self.is_empty() {
                let mut free = cgroup_pool().free.lock().unwrap_or_else(|p| p.into_inner());
                if free.len() < CGROUP_POOL_MAX {
                    free.push(PooledCgroup {
                        dir: self.dir.clone(),
                        events: pids_events_max(&self.dir),
                    });
                    self.removed = true;
                    return;
                }
                drop(free);
                if std::fs::remove_dir(&self.dir).is_ok() {
                    self.removed = true;
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn is_empty(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty())
    }

    fn close_procs_fd(&mut self) {
        self.procs_file = None;
    }

    fn limit_hit(&self) -> bool {
        pids_events_max(&self.dir) > self.events
    }

    fn kill_all(&self) {
        if std::fs::write(self.dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for _ in 0..3 {
            let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) else {
                return;
            };
            let pids: Vec<i32> = procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if pids.is_empty() {
                return;
            }
            for p in pids {
                // SAFETY: sending a signal has no memory-safety preconditions.
                unsafe {
                    libc::kill(p, libc::SIGKILL);
                }
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        self.procs_file = None;
        self.kill_all();
        if std::fs::remove_dir(&self.dir).is_err() {
            // Processes take a moment to leave after SIGKILL; retry off the caller's thread.
            let dir = self.dir.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    std::thread::sleep(Duration::from_millis(20));
                    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                        for p in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                            // SAFETY: as above.
                            unsafe {
                                libc::kill(p, libc::SIGKILL);
                            }
                        }
                    }
                    if std::fs::remove_dir(&dir).is_ok() {
                        return;
                    }
                }
            });
        }
    }
}

#[async_trait::async_trait]
impl Tool for CommandTool {
    fn descriptor(&self) -> &ToolDescriptor {
        &self.descriptor
    }

    /// Runs sandboxed (direct callers never get `sandbox: none`; the gateway passes the mode
    /// its policy granted through [`CommandTool::run`]).
    async fn call(&self, args: Value, ctx: CallContext) -> Result<ToolOutput, ToolError> {
        self.run(args, ctx, SandboxMode::Bubblewrap).await
    }

    fn time_limit(&self) -> Option<Duration> {
        self.timeout()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc_target(args: &[String]) -> Option<&str> {
        args.windows(3)
            .find(|w| w[0] == "--ro-bind" && w[2] == "/etc")
            .map(|w| w[1].as_str())
    }

    #[test]
    fn etc_is_one_read_only_copy_unless_a_writable_root_holds_it() {
        let ws = std::env::temp_dir().join("agent-runtime-etc-test-ws");
        let settings = SandboxSettings {
            write_roots: vec![ws],
            read_roots: vec![],
            bwrap: None,
            protected: vec![],
        };
        let args = bwrap_args(&settings, &[]);
        if let Some(copy) = etc_copy() {
            assert_eq!(etc_target(&args), Some(copy.to_str().unwrap()));
            assert!(!args.iter().any(|a| a == "/etc/passwd"));
        }
        // A workspace at or above the temporary folder could change the copy: bind each entry.
        let settings = SandboxSettings {
            write_roots: vec![std::env::temp_dir()],
            read_roots: vec![],
            bwrap: None,
            protected: vec![],
        };
        let args = bwrap_args(&settings, &[]);
        assert_eq!(etc_target(&args), None);
        assert!(
            args.windows(3)
                .any(|w| w[0] == "--ro-bind-try" && w[1] == "/etc/passwd")
        );
    }
}
