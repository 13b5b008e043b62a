//! The seccomp filter the sandbox installs (through bubblewrap) before the command runs.
//!
//! Dropping every capability is not enough when the gateway runs as root: a file's owner needs
//! no capability to set its set-user-ID or set-group-ID bit, and a file the command creates in
//! the workspace belongs to root outside the sandbox too. `cp /usr/bin/sh x; chmod 4755 x`
//! would leave a root shell for anyone who can reach the workspace. The filter refuses
//! (`EPERM`) every system call that could give a file those bits:
//!
//! - `chmod`, `fchmod`, `fchmodat`, `fchmodat2`, `creat`, `open`, `openat`, `mknod` and
//!   `mknodat` when their mode holds `S_ISUID` or `S_ISGID` (an ordinary `chmod 755` or
//!   `chmod +t` works);
//! - `openat2`, whose mode sits in a structure the filter cannot read, and io_uring, whose
//!   operations (an `openat` among them) no filter sees: with `ENOSYS`, as a kernel without
//!   them answers, so that programs fall back to `openat` and ordinary reads and writes. That
//!   takes a second program (one program has one errno), which bubblewrap takes from 0.5
//!   (`--add-seccomp-fd`, repeatable); an older one gets a single program refusing both with
//!   `EPERM` (`--seccomp`).
//!
//! The x32 numbers of the same calls (`__X32_SYSCALL_BIT`) are refused alike, and calls of any
//! other architecture (a 32-bit `int 0x80`) kill the process: both would otherwise pass a
//! filter written for x86-64's numbers.
//!
//! The BPF program is built with `seccompiler` (rust-vmm's compiler, used by Firecracker)
//! once per process, for x86-64 and aarch64; elsewhere there is none and the sandbox runs
//! without it (documented in docs/sandbox.md).

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;

/// Which of the filter's BPF programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Program {
    /// Set-ID modes refused with `EPERM`.
    Modes,
    /// `openat2` and io_uring answered with `ENOSYS`.
    Unsupported,
    /// Both in one, with `EPERM`: for a bubblewrap that takes one program only.
    Combined,
}

/// A program's bytes, as bubblewrap reads them from a descriptor, or why it cannot be built
/// (built once per process).
pub(crate) fn program(which: Program) -> Result<&'static [u8], String> {
    static PROGRAMS: OnceLock<[Result<Vec<u8>, String>; 3]> = OnceLock::new();
    let [modes, unsupported, combined] = PROGRAMS.get_or_init(|| {
        [
            build(Program::Modes),
            build(Program::Unsupported),
            build(Program::Combined),
        ]
    });
    match which {
        Program::Modes => modes,
        Program::Unsupported => unsupported,
        Program::Combined => combined,
    }
    .as_deref()
    .map_err(|e| e.clone())
}

/// A pipe's read end holding `program`, for bubblewrap to read. It is close-on-exec (as
/// `std::io::pipe` makes both ends): the child that is to read it clears that flag on its own
/// copy (see [`inherit`]), so no other child started meanwhile gets it.
pub(crate) fn program_fd(program: &[u8]) -> Result<OwnedFd, String> {
    let (read, mut write) =
        std::io::pipe().map_err(|e| format!("cannot make a pipe for the seccomp filter: {e}"))?;
    // The program is about 300 instructions (2.4 KB), within PIPE_BUF, which even a pipe the
    // system gave one page holds: the write cannot block (a test holds the size).
    write
        .write_all(program)
        .map_err(|e| format!("cannot write the seccomp filter to its pipe: {e}"))?;
    Ok(OwnedFd::from(read))
}

/// In a child between fork and exec: lets each of `fds` that is open (not -1) survive the
/// exec. Async-signal-safe.
pub(crate) fn inherit_all(fds: [libc::c_int; 2]) -> std::io::Result<()> {
    for fd in fds.into_iter().filter(|fd| *fd >= 0) {
        inherit(fd)?;
    }
    Ok(())
}

/// In a child between fork and exec: lets `fd` survive the exec. Async-signal-safe.
pub(crate) fn inherit(fd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor number has no memory-safety preconditions.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
fn build(which: Program) -> Result<Vec<u8>, String> {
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule,
    };
    use std::collections::BTreeMap;

    let fail = |e: seccompiler::BackendError| format!("cannot build the seccomp filter: {e}");
    // A rule per bit: rules of one call are alternatives, conditions of one rule all hold.
    let mode_rules = |arg: u8| -> Result<Vec<SeccompRule>, String> {
        [libc::S_ISUID, libc::S_ISGID]
            .into_iter()
            .map(|bit| {
                let bit = u64::from(bit);
                SeccompCondition::new(
                    arg,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(bit),
                    bit,
                )
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(fail)
            })
            .collect()
    };
    // (call, index of its mode argument); `None`: refused whatever its arguments.
    let mut calls: Vec<(i64, Option<u8>)> = vec![
        (libc::SYS_fchmod, Some(1)),
        (libc::SYS_fchmodat, Some(2)),
        (libc::SYS_fchmodat2, Some(2)),
        (libc::SYS_openat, Some(3)),
        (libc::SYS_mknodat, Some(2)),
        (libc::SYS_openat2, None),
        (libc::SYS_io_uring_setup, None),
        (libc::SYS_io_uring_enter, None),
        (libc::SYS_io_uring_register, None),
    ];
    #[cfg(target_arch = "x86_64")]
    {
        calls.extend([
            (libc::SYS_chmod, Some(1)),
            (libc::SYS_creat, Some(1)),
            (libc::SYS_open, Some(2)),
            (libc::SYS_mknod, Some(1)),
        ]);
        // The x32 ABI reaches the same calls with this bit set in the number; the filter's
        // architecture check (AUDIT_ARCH_X86_64) cannot tell them apart.
        const X32_SYSCALL_BIT: i64 = 0x4000_0000;
        let x32: Vec<_> = calls
            .iter()
            .map(|&(nr, arg)| (nr | X32_SYSCALL_BIT, arg))
            .collect();
        calls.extend(x32);
    }
    let mut rules = BTreeMap::new();
    for (nr, arg) in calls {
        let wanted = match which {
            Program::Modes => arg.is_some(),
            Program::Unsupported => arg.is_none(),
            Program::Combined => true,
        };
        if wanted {
            rules.insert(nr, arg.map(mode_rules).transpose()?.unwrap_or_default());
        }
    }
    let errno = match which {
        Program::Unsupported => libc::ENOSYS,
        Program::Modes | Program::Combined => libc::EPERM,
    };
    let arch = std::env::consts::ARCH.try_into().map_err(fail)?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch,
    )
    .map_err(fail)?;
    let program: BpfProgram = filter.try_into().map_err(fail)?;
    // `struct sock_filter` as the kernel (and bwrap) read it: u16 code, u8 jt, u8 jf, u32 k,
    // in this machine's byte order.
    let mut bytes = Vec::with_capacity(program.len() * 8);
    for insn in &program {
        bytes.extend_from_slice(&insn.code.to_ne_bytes());
        bytes.push(insn.jt);
        bytes.push(insn.jf);
        bytes.extend_from_slice(&insn.k.to_ne_bytes());
    }
    Ok(bytes)
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
fn build(_which: Program) -> Result<Vec<u8>, String> {
    Err(format!(
        "no seccomp filter is built for {}",
        std::env::consts::ARCH
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_programs_are_whole_instructions_and_fit_a_pipe() {
        for which in [Program::Modes, Program::Unsupported, Program::Combined] {
            let p = program(which).unwrap();
            assert!(
                !p.is_empty() && p.len().is_multiple_of(8),
                "{which:?}: {} bytes",
                p.len()
            );
            // Written whole into an empty pipe without waiting for a reader.
            assert!(p.len() <= libc::PIPE_BUF, "{which:?}: {} bytes", p.len());
        }
        // The two halves are each smaller than the whole.
        let len = |w| program(w).unwrap().len();
        assert!(len(Program::Modes) < len(Program::Combined));
        assert!(len(Program::Unsupported) < len(Program::Modes));
    }

    #[test]
    fn the_pipe_holds_the_program_and_closes_on_exec() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let program = program(Program::Modes).unwrap();
        let fd = program_fd(program).unwrap();
        // SAFETY: fcntl on an open descriptor.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        let mut read = Vec::new();
        std::fs::File::from(fd).read_to_end(&mut read).unwrap();
        assert_eq!(read, program);
    }
}
