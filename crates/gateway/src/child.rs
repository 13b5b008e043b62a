//! What every process the gateway starts (command tools, MCP servers, hooks) gets before it
//! runs.

/// Gives a child process the system's transparent-huge-page policy back. The `agent-runtime`
/// binary turns huge pages off for itself (see its `main.rs`), and Linux keeps that setting
/// through `fork` and `execve`: without this, every tool, MCP server and hook it starts (a
/// database, a JVM, a browser) would run without the huge pages the host grants them.
pub(crate) fn with_default_thp(cmd: &mut tokio::process::Command) {
    #[cfg(target_os = "linux")]
    // SAFETY: the closure makes one prctl call, which is async-signal-safe, and allocates
    // nothing. A failure (an old kernel) only leaves the inherited setting, so it is ignored.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0);
            Ok(())
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}
