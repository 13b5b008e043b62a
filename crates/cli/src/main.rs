//! `agent-runtime`: the command line of the agent runtime.
//!
//! Each capability owns one module with its subcommands; this file only parses, dispatches and
//! turns errors into one clear line and an exit code (0 ok, 1 failed, 2 usage; see
//! `docs/errors.md`).

/// `println!` for a command's output. A reader that went away (`agent-runtime runs list | head -1`)
/// ends the process quietly with exit code 141, as SIGPIPE ends C tools, where `println!` would
/// panic. SIGPIPE itself stays ignored: with its default action, a tool or MCP server that exits
/// early would kill the runtime writing to its standard input.
macro_rules! outln {
    () => {
        $crate::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod audit;
mod bench;
mod common;
mod demo;
mod gateway;
mod terminal;
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
    /// Run a small task graph (native tools), replay it, verify the chain and export the run.
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
static GLOBAL: MiMallocPlain = MiMallocPlain;

/// `mimalloc::MiMalloc`, but allocations that need no more than 8-byte alignment (nearly all)
/// go to `mi_malloc`, `mi_zalloc` and `mi_realloc`, as the system allocator's `malloc` would:
/// `MiMalloc` sends every allocation through `mi_malloc_aligned`, whose alignment checks cost
/// about 35 instructions an allocation, 3 % of the live driver's instructions under callgrind
/// (`bench workforce --quick --only live`). Every mimalloc block is aligned to at least 8
/// bytes; larger alignments keep the aligned calls.
struct MiMallocPlain;

/// Hands the memory mimalloc holds freed back to the system (`mi_collect(true)`), so that a
/// bench section's peak memory starts from what is in use, not from what an earlier section
/// left cached. Declared here: the `libmimalloc-sys` binding is behind a feature (and a
/// dependency) for this one function, which the linked mimalloc has either way.
pub(crate) fn return_freed_memory() {
    unsafe extern "C" {
        fn mi_collect(force: bool);
    }
    // SAFETY: mimalloc's own function, taking a flag; it only frees what is free already.
    unsafe { mi_collect(true) }
}

/// The alignment every mimalloc block has.
const MI_MIN_ALIGN: usize = 8;

// SAFETY: each method hands its arguments to the mimalloc function for the same job, with
// `MiMalloc`'s own methods for alignments above `MI_MIN_ALIGN`; a block from either path is
// freed by `mi_free` (which `MiMalloc::dealloc` calls) and resized by `mi_realloc` or
// `mi_realloc_aligned` with the alignment it was allocated with.
unsafe impl std::alloc::GlobalAlloc for MiMallocPlain {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.align() <= MI_MIN_ALIGN {
            // SAFETY: `mi_malloc` takes any size; see the impl's comment.
            unsafe { libmimalloc_sys::mi_malloc(layout.size()).cast() }
        } else {
            // SAFETY: the caller's promises are passed on.
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.align() <= MI_MIN_ALIGN {
            // SAFETY: as in `alloc`.
            unsafe { libmimalloc_sys::mi_zalloc(layout.size()).cast() }
        } else {
            // SAFETY: the caller's promises are passed on.
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc; `MiMalloc` frees any block.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MI_MIN_ALIGN {
            // SAFETY: `ptr` is a live mimalloc block; `mi_realloc` keeps the 8-byte alignment.
            unsafe { libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            // SAFETY: the caller's promises are passed on.
            unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
        }
    }
}

fn main() -> ExitCode {
    // SAFETY: nothing has started a thread yet.
    unsafe { common::take_secrets_from_env() };
    no_transparent_huge_pages();
    writes_past_the_file_size_limit_fail();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help and version to stdout with exit 0, usage errors to stderr with 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    // The event database is the runtime's own: no tool of this process may change it.
    crate::common::set_event_database(cli.global.store_config().path());
    let result = match cli.command {
        Command::Audit(cmd) => audit::run(cmd, &cli.global),
        Command::Demo(args) => demo::run(args, &cli.global),
        Command::Workforce(cmd) => workforce::run(cmd, &cli.global),
        Command::Gateway(cmd) => gateway::run(cmd, &cli.global),
        Command::Bench(cmd) => bench::run(cmd, &cli.global),
    };
    // After everything the command started (tools, MCP servers) has stopped.
    crate::common::end_trust_session();
    match result {
        Ok(code) => code,
        // Output written through a writer rather than `outln!` (exports, `audit tail`).
        Err(err) if is_broken_pipe(&err) => ExitCode::from(BROKEN_PIPE_EXIT),
        Err(err) => {
            let code = err
                .downcast_ref::<CliError>()
                .map_or(1, CliError::exit_code);
            eprintln!("error: {}", one_line(&err));
            ExitCode::from(code)
        }
    }
}

/// The exit code of a command whose standard output was closed by its reader: 128 + SIGPIPE,
/// what a shell reports for a tool SIGPIPE killed.
const BROKEN_PIPE_EXIT: u8 = 141;

/// Writes a command's output (see `outln!`).
fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    // The lock is let go before what follows (which prints on stderr, and ends the session).
    let written = std::io::stdout().lock().write_fmt(args);
    if let Err(e) = written {
        // The process ends here: its trust session too, or the next start would take it for
        // one that died (`... | head`).
        common::end_trust_session();
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(i32::from(BROKEN_PIPE_EXIT));
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// Whether `err` came from writing to a closed pipe.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Turns transparent huge pages off for this process (Linux; elsewhere, or on failure, nothing
/// happens: it only changes speed). mimalloc asks for huge pages on the memory it maps, and on
/// the first touch the kernel then clears 2 MiB at a time: a run with 10,000 live agents grew
/// ~30 % more resident memory and spent almost half its CPU time in `clear_page_erms`, and its
/// overhead over the agents' own waiting was about 1.5 times as high (`agent-runtime bench
/// workforce`). Linux keeps the setting through fork and exec; the gateway gives the host's
/// policy back to every process it starts (tools, MCP servers, hooks).
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes its flag as an unsigned long and touches no memory; an
    // error (an old kernel) is ignored.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1 as libc::c_ulong, 0, 0, 0) };
}

/// Makes a write past the file size limit (`ulimit -f`) fail with an error (`EFBIG`) that the
/// command reports, rather than end the process at once with SIGXFSZ, no message and no chance
/// to finish what it was writing. A handler that does nothing, not `SIG_IGN`: an ignored signal
/// stays ignored in the programs this process starts (tools, MCP servers, hooks), a handled one
/// goes back to the default there.
fn writes_past_the_file_size_limit_fail() {
    #[cfg(unix)]
    {
        extern "C" fn nothing(_: libc::c_int) {}
        // SAFETY: nothing has started a thread yet; the handler touches nothing, so it is
        // async-signal-safe; `action` is fully initialized before use.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = nothing as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGXFSZ, &action, std::ptr::null_mut());
        }
    }
}

/// The error and its causes on one line, without a backtrace, with control characters escaped
/// (a failed run's error may quote a tool's output; see `common::terminal_text`).
fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        // Typed errors often repeat their source in their own message; skip exact repeats.
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    // However long what it quotes, an error stays a line a terminal can show.
    let line = parts.join(": ");
    common::terminal_text(&agent_runtime_core::names::cut_middle(&line, 2000)).into_owned()
}
