//! What every process the gateway starts (command tools, MCP servers, hooks) gets before it
//! runs.

/// Prepares a child before it runs (one pre-exec hook, registered first where others follow):
/// the system's transparent-huge-page policy back, and no descriptor this process inherited.
///
/// Huge pages: the `agent-runtime` binary turns them off for itself (see its `main.rs`), and
/// Linux keeps that setting through `fork` and `execve`: without this, every tool, MCP server
/// and hook it starts (a database, a JVM, a browser) would run without the huge pages the host
/// grants them.
pub(crate) fn prepare(cmd: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    // SAFETY: the closure makes prctl, close_range and fcntl calls, which are
    // async-signal-safe, and allocates nothing. A failed prctl (an old kernel) only leaves the
    // inherited setting, so it is ignored.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0);
            close_inherited_descriptors();
            Ok(())
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Makes the child die (SIGKILL) when the thread that starts it does, from before it runs.
///
/// A command tool must not outlive the process that runs it: `resume` would run it again
/// beside the orphan, and nothing would enforce its limits. bubblewrap's `--die-with-parent`
/// asks the same, but only once bwrap runs: a parent killed between `fork` and that point left
/// the sandbox running under init, finishing its side effect. Here the request is made in the
/// child before `exec`, and a parent already gone by then (the request would never fire) ends
/// the child at once. Linux ties the signal to the starting thread: the gateway starts
/// commands and hooks from the call's own task, on a runtime thread that outlives the call,
/// and MCP servers from the manager's tasks (see `McpManager`: its runtime's threads must live
/// as long as the servers). Only the child itself: what it starts (a launcher's server) is
/// not covered.
pub(crate) fn die_with_parent(cmd: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: prctl, getppid and _exit are async-signal-safe; the closure allocates
        // nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::_exit(137);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// In a child between fork and exec: marks every descriptor above stderr close-on-exec, so
/// that none this process inherited open (a shell's `exec 7</`, a parent's leaked pipe)
/// reaches the command: a descriptor of a folder outside the sandbox is a way out of it
/// (`/proc/self/fd/7/...`), and to an MCP server or a hook one it should not hold. Async-signal-
/// safe. (The sandbox's seccomp filter pipe is let through after this.)
pub(crate) fn close_inherited_descriptors() {
    #[cfg(target_os = "linux")]
    // SAFETY: close_range with integer arguments touches no memory.
    let marked = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    } == 0;
    #[cfg(not(target_os = "linux"))]
    let marked = false;
    if !marked {
        // Before Linux 5.11: one by one, up to this process's limit of open files.
        // SAFETY: sysconf and fcntl on descriptor numbers touch no memory.
        let max = match unsafe { libc::sysconf(libc::_SC_OPEN_MAX) } {
            // Unknown: as far as a usual hard limit goes.
            n if n <= 3 => 1 << 16,
            n => n.min(1 << 20),
        } as libc::c_int;
        for fd in 3..max {
            // SAFETY: as above; a number that is no descriptor fails with EBADF.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

/// The last line of a process's stderr that says something, trimmed: what a failing command
/// or hook says last is usually why it failed. Not cut: the gateway cuts long messages after
/// redacting them, so that no cut goes through a secret and leaves part of it readable.
pub(crate) fn last_said(stderr: &str) -> Option<&str> {
    stderr.lines().rev().map(str::trim).find(|l| !l.is_empty())
}

/// How long a failed process's stderr is still read after it exited, for its last words: a
/// process it left behind may hold the pipe open, and must not hold the caller up.
pub(crate) const STDERR_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
