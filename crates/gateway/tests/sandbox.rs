//! The sandbox of command tools: every escape attempt is contained and reported clearly.
//!
//! Needs bubblewrap (`scripts/test-deps.sh` installs it) and `/usr/bin/python3` (Debian's
//! python3, present on the project's machines); the tests fail naming what is missing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agent_runtime_core::{
    Actor, CallContext, ErrorClass, MemoryLog, RiskClass, ToolError, ToolOutput,
};
use agent_runtime_gateway::sandbox::{
    CommandTool, CommandToolConfig, Limits, SandboxSettings, probe,
};
use agent_runtime_gateway::{GatewayBuilder, Policy, Redactor, Registry, SandboxMode};
use serde_json::{Value, json};

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    ws: PathBuf,
    settings: Arc<SandboxSettings>,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let ws = root.join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::create_dir_all(root.join("outside")).unwrap();
    std::fs::write(root.join("outside/secret.txt"), "TOP-SECRET-CONTENT").unwrap();
    std::os::unix::fs::symlink(root.join("outside"), ws.join("link")).unwrap();
    let settings = Arc::new(SandboxSettings::new(vec![ws.clone()], vec![]));
    if let Err(e) = probe(&settings) {
        panic!(
            "the sandbox tests need a working bubblewrap: {e}. Run scripts/test-deps.sh as root."
        );
    }
    assert!(
        Path::new("/usr/bin/python3").exists(),
        "the sandbox tests need /usr/bin/python3 (Debian package python3)"
    );
    Env {
        _dir: dir,
        root,
        ws,
        settings,
    }
}

/// A command tool's configuration with the tests' defaults: no arguments required, risk
/// `exec`, no environment, no limits of its own.
fn exec_config(name: &str, command: Vec<String>) -> CommandToolConfig {
    CommandToolConfig {
        name: name.into(),
        description: String::new(),
        input_schema: json!({"type": "object"}),
        output_schema: None,
        risk: RiskClass::Exec,
        command,
        stdin: None,
        env: Default::default(),
        read_roots: vec![],
        limits: Limits::default(),
        success_exit_codes: None,
    }
}

fn sh_tool(env: &Env, limits: Limits) -> CommandTool {
    let config = CommandToolConfig {
        description: "run a shell script".into(),
        input_schema: json!({"type": "object", "properties": {"script": {"type": "string"}}, "required": ["script"]}),
        limits,
        ..exec_config(
            "sh.run",
            vec!["/bin/sh".into(), "-c".into(), "{script}".into()],
        )
    };
    CommandTool::new(config, env.settings.clone(), &mut Redactor::new()).unwrap()
}

async fn run(env: &Env, limits: Limits, script: &str) -> Result<ToolOutput, ToolError> {
    let tool = sh_tool(env, limits);
    tool.run(
        json!({"script": script}),
        CallContext::new(Actor::System),
        SandboxMode::Bubblewrap,
    )
    .await
}

fn ok(r: Result<ToolOutput, ToolError>) -> Value {
    match r {
        Ok(o) => o.value,
        Err(e) => panic!("expected output, got {e}"),
    }
}

#[tokio::test]
async fn writes_inside_the_workspace_work() {
    let env = env();
    let v = ok(run(&env, Limits::default(), "echo hi > out.txt && pwd").await);
    assert_eq!(v["exit_code"], 0, "{v}");
    assert_eq!(
        std::fs::read_to_string(env.ws.join("out.txt")).unwrap(),
        "hi\n"
    );
    assert_eq!(
        v["stdout"].as_str().unwrap().trim(),
        env.ws.display().to_string()
    );
}

#[tokio::test]
async fn writing_outside_the_roots_fails() {
    let env = env();
    let target = env.root.join("outside/new.txt");
    for script in [
        format!("echo x > {}", target.display()),
        "echo x > /usr/evil".into(),
        "echo x > /etc/evil".into(),
        "mkdir /evil".into(),
    ] {
        let v = ok(run(&env, Limits::default(), &script).await);
        assert_ne!(v["exit_code"], 0, "{script}: {v}");
    }
    assert!(!target.exists());
    assert!(!Path::new("/usr/evil").exists() && !Path::new("/etc/evil").exists());
}

/// Started by root (as CI runs), the command must not keep root's capabilities: with them it
/// could remount a read-only bind read-write and write the host's files, or lift its own
/// process limit.
#[tokio::test]
async fn the_command_has_no_capabilities_and_cannot_remount_or_raise_its_limits() {
    let env = env();
    let read_only = env.root.join("ro");
    std::fs::create_dir_all(&read_only).unwrap();
    std::fs::write(read_only.join("f.txt"), "orig").unwrap();
    let config = CommandToolConfig {
        input_schema: json!({"type": "object", "properties": {"script": {"type": "string"}}}),
        read_roots: vec![read_only.clone()],
        ..exec_config(
            "caps",
            vec!["/bin/sh".into(), "-c".into(), "{script}".into()],
        )
    };
    let tool = CommandTool::new(config, env.settings.clone(), &mut Redactor::new()).unwrap();
    let script = format!(
        "grep CapEff /proc/self/status; \
         mount -o remount,bind,rw {ro} && echo REMOUNTED; echo x > {ro}/f.txt; \
         mount -o remount,bind,rw /usr && echo USR_REMOUNTED; \
         mkdir -p /tmp/c && mount -t cgroup -o pids none /tmp/c && echo CGROUP_MOUNTED; \
         cat /proc/sys/vm/swappiness > /tmp/s && cat /tmp/s > /proc/sys/vm/swappiness && echo SYSCTL_WRITTEN; \
         echo h > /proc/sysrq-trigger && echo SYSRQ_WRITTEN",
        ro = read_only.display()
    );
    let v = ok(tool
        .run(
            json!({"script": script}),
            CallContext::new(Actor::System),
            SandboxMode::Bubblewrap,
        )
        .await);
    let out = v["stdout"].as_str().unwrap();
    assert!(out.contains("CapEff:\t0000000000000000"), "{v}");
    for escaped in [
        "REMOUNTED",
        "USR_REMOUNTED",
        "CGROUP_MOUNTED",
        "SYSCTL_WRITTEN",
        "SYSRQ_WRITTEN",
    ] {
        assert!(!out.contains(escaped), "{escaped}: {v}");
    }
    assert_eq!(
        std::fs::read_to_string(read_only.join("f.txt")).unwrap(),
        "orig"
    );
}

/// Started by root (as CI runs), a file the command makes in the workspace is root's outside
/// too: with its set-user-ID bit it would be a root shell for whoever reaches the workspace.
/// No way of setting that bit (or set-group-ID) works; other modes do.
#[tokio::test]
async fn no_file_gets_a_set_user_or_group_id_bit() {
    let env = env();
    // x32's numbers are x86-64's with bit 30 set; elsewhere there is no x32 to try.
    let x32 = if cfg!(target_arch = "x86_64") {
        r#"raw("x32_chmod", 0x40000000 | 90, b"sh1", 0o4755)
raw("x32_open", 0x40000000 | 2, b"o3", os.O_CREAT | os.O_WRONLY, 0o4755)"#
    } else {
        ""
    };
    let script = r#"
cp /bin/sh sh1 && chmod 4755 sh1; echo "chmod=$?"
cp /bin/sh sh2 && chmod g+s sh2; echo "chmod_g=$?"
cp /bin/sh sh3 && chmod u+s,g+s sh3; echo "chmod_ug=$?"
install -m 4755 /bin/sh sh4; echo "install=$?"
mkdir d && chmod 2775 d; echo "dir=$?"
/usr/bin/python3 - <<'PY'
import ctypes, errno, os, stat
libc = ctypes.CDLL(None, use_errno=True)
def refused(what, f):
    try:
        f()
        print(what, "ALLOWED")
    except PermissionError:
        print(what, "refused")
refused("open", lambda: os.close(os.open("o1", os.O_CREAT | os.O_WRONLY, 0o4755)))
refused("open_g", lambda: os.close(os.open("o2", os.O_CREAT | os.O_WRONLY, 0o2755)))
refused("mknod", lambda: os.mknod("n1", stat.S_IFREG | 0o4755))
refused("fchmod", lambda: os.fchmod(os.open("sh1", os.O_RDONLY), 0o6755))
refused("chmod_dirfd", lambda: os.chmod("sh1", 0o4755, dir_fd=os.open(".", os.O_RDONLY)))
def raw(what, nr, *args, want=errno.EPERM):
    r = libc.syscall(ctypes.c_long(nr), *args)
    print(what, "refused" if r == -1 and ctypes.get_errno() == want else "ALLOWED %d %d" % (r, ctypes.get_errno()))
X32
raw("fchmodat2", 452, -100, b"sh1", 0o4755, 0)
raw("openat2", 437, -100, b"o4", 0, 0, want=UNSUPPORTED)
raw("io_uring_setup", 425, 8, 0, want=UNSUPPORTED)
os.chmod("sh1", 0o755); print("plain_chmod ok")
os.chmod("d", 0o1777); print("sticky ok")
PY
for f in sh1 sh2 sh3 sh4 d o1 o2 o3 n1; do [ -e $f ] && stat -c "%n %a" $f; done
"#;
    // openat2 and io_uring are answered as a kernel without them would (ENOSYS: programs fall
    // back), where bubblewrap takes a second filter; an older one refuses them with EPERM.
    let help = std::process::Command::new(env.settings.bwrap.as_ref().unwrap())
        .arg("--help")
        .output()
        .unwrap();
    let unsupported = if String::from_utf8_lossy(&help.stdout).contains("--add-seccomp-fd") {
        "errno.ENOSYS"
    } else {
        "errno.EPERM"
    };
    let script = script
        .replace("X32", x32)
        .replace("UNSUPPORTED", unsupported);
    let v = ok(run(&env, Limits::default(), &script).await);
    let out = v["stdout"].as_str().unwrap();
    for line in ["chmod=1", "chmod_g=1", "chmod_ug=1", "dir=1"] {
        assert!(out.contains(line), "{line}: {v}");
    }
    assert!(!out.contains("install=0"), "{v}");
    assert!(!out.contains("ALLOWED"), "{v}");
    for line in ["plain_chmod ok", "sticky ok", "sh1 755", "d 1777"] {
        assert!(out.contains(line), "{line}: {v}");
    }
    // Whatever the script said, nothing in the workspace has either bit.
    for e in std::fs::read_dir(&env.ws).unwrap() {
        use std::os::unix::fs::PermissionsExt;
        let e = e.unwrap();
        let mode = e.metadata().unwrap().permissions().mode();
        assert_eq!(
            mode & 0o6000,
            0,
            "{:?} has mode {mode:o}: {v}",
            e.file_name()
        );
    }
}

/// A descriptor this process holds open without close-on-exec (as a shell's `exec 7</` leaves
/// one) does not reach the command: through `/proc/self/fd/N/...` it would be a way out.
#[tokio::test]
async fn descriptors_the_gateway_inherited_do_not_reach_the_command() {
    let env = env();
    let outside = std::ffi::CString::new(env.root.join("outside").to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe { libc::open(outside.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    assert!(fd >= 0);
    let script = format!(
        "ls /proc/self/fd; cat /proc/self/fd/{fd}/secret.txt; echo x > /proc/self/fd/{fd}/escaped.txt"
    );
    let v = ok(run(&env, Limits::default(), &script).await);
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    let out = v["stdout"].as_str().unwrap();
    assert!(!out.contains("TOP-SECRET"), "{v}");
    assert!(!env.root.join("outside/escaped.txt").exists(), "{v}");
    // Only stdin, stdout, stderr and the listing's own descriptor are open.
    let fds: Vec<&str> = out.split_whitespace().collect();
    assert!(fds.len() <= 4, "{v}");
}

/// Started by root, the command cannot make a user namespace of its own (in which it would
/// have every capability back, and could write file capabilities).
#[tokio::test]
async fn a_root_started_command_cannot_make_a_user_namespace() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // For an ordinary user a namespace of its own gives nothing the user lacks outside,
        // and the sandbox does not forbid one: nothing to check.
        eprintln!("not run as root: the sandbox allows user namespaces to ordinary users");
        return;
    }
    let env = env();
    let help = std::process::Command::new(env.settings.bwrap.as_ref().unwrap())
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("--disable-userns"),
        "this bubblewrap is older than 0.8 and cannot forbid user namespaces; the sandbox runs \
         without that (docs/sandbox.md), and this test needs a newer one"
    );
    let v = ok(run(
        &env,
        Limits::default(),
        "/usr/bin/python3 -c 'import ctypes; print(\"unshare\", ctypes.CDLL(None, use_errno=True).unshare(0x10000000), ctypes.get_errno())'",
    )
    .await);
    let out = v["stdout"].as_str().unwrap();
    // bubblewrap forbids them by allowing no more user namespaces: ENOSPC.
    assert_eq!(out.trim(), format!("unshare -1 {}", libc::ENOSPC), "{v}");
}

#[tokio::test]
async fn reading_outside_the_read_roots_fails() {
    let env = env();
    let secret = env.root.join("outside/secret.txt");
    for script in [
        format!("cat {}", secret.display()),
        "cat /etc/shadow".into(),
        "ls /root".into(),
    ] {
        let v = ok(run(&env, Limits::default(), &script).await);
        assert_ne!(v["exit_code"], 0, "{script}: {v}");
        assert!(!v["stdout"].as_str().unwrap().contains("TOP-SECRET"), "{v}");
    }
}

#[tokio::test]
async fn a_symlink_out_of_the_workspace_leads_nowhere() {
    let env = env();
    let v = ok(run(&env, Limits::default(), "cat link/secret.txt").await);
    assert_ne!(v["exit_code"], 0, "{v}");
    assert!(!v["stdout"].as_str().unwrap().contains("TOP-SECRET"));
    let v = ok(run(&env, Limits::default(), "echo x > link/planted.txt").await);
    assert_ne!(v["exit_code"], 0, "{v}");
    assert!(!env.root.join("outside/planted.txt").exists());
}

#[tokio::test]
async fn sockets_reach_nothing_not_even_the_hosts_loopback() {
    let env = env();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "/usr/bin/python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), timeout=2); print(\"CONNECTED\")'"
    );
    let v = ok(run(&env, Limits::default(), &script).await);
    assert_ne!(v["exit_code"], 0, "{v}");
    assert!(!v["stdout"].as_str().unwrap().contains("CONNECTED"));
    assert!(
        v["stderr"].as_str().unwrap().contains("Connection refused"),
        "{v}"
    );
}

#[tokio::test]
async fn the_environment_is_scrubbed() {
    let env = env();
    let v = ok(run(&env, Limits::default(), "env").await);
    let out = v["stdout"].as_str().unwrap();
    let allowed = ["PATH", "HOME", "LANG", "TMPDIR", "PWD", "SHLVL", "_"];
    for (k, _) in std::env::vars() {
        if !allowed.contains(&k.as_str()) {
            assert!(
                !out.contains(&format!("{k}=")),
                "{k} leaked into the sandbox: {out}"
            );
        }
    }
    assert!(out.contains("PATH=/usr/local/bin:/usr/bin:/bin"), "{out}");
    assert!(out.contains("HOME=/tmp"), "{out}");
}

#[tokio::test]
async fn a_fork_bomb_hits_the_process_limit_and_is_killed() {
    let env = env();
    let limits = Limits {
        processes: 32,
        wall_ms: 3000,
        ..Limits::default()
    };
    // The top shell forks once, before the bomb exists (`b &`), then `exec`s: a shell that forks
    // after the bomb has taken every process slot gets "Cannot fork" and ends on its own, before
    // the wall limit. (`b; exec ...` forked both halves of `b | b` from the top shell: a race.)
    let err = run(&env, limits, "b() { b | b & }; b & exec sleep 60")
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Timeout, "{err}");
    assert!(
        err.message.contains("process limit (32) was reached"),
        "{err}"
    );
    assert!(err.message.contains("process tree killed"), "{err}");
}

#[tokio::test]
async fn a_fork_bomb_that_ends_on_its_own_says_the_process_limit_was_reached() {
    let env = env();
    let limits = Limits {
        processes: 16,
        wall_ms: 20_000,
        ..Limits::default()
    };
    // Foreground recursion: every level waits for its children, the leaves fail to fork, and
    // the tree folds up by itself well before the wall limit.
    let v = ok(run(&env, limits, "b() { b | b; }; b").await);
    assert_ne!(v["exit_code"], 0, "{v}");
    assert_eq!(
        v["note"], "the process limit (16) was reached; remaining processes killed",
        "{v}"
    );
    // A command that stays under the limit carries no note.
    let v = ok(run(&env, Limits::default(), "true").await);
    assert!(v.get("note").is_none(), "{v}");
}

#[tokio::test]
async fn a_memory_hog_is_refused_memory() {
    let env = env();
    let limits = Limits {
        memory_mb: 256,
        ..Limits::default()
    };
    let v = ok(run(
        &env,
        limits,
        "/usr/bin/python3 -c 'b = bytearray(2 * 1024 ** 3); print(\"GOT\")'",
    )
    .await);
    assert_ne!(v["exit_code"], 0, "{v}");
    assert!(v["stderr"].as_str().unwrap().contains("MemoryError"), "{v}");
    assert!(!v["stdout"].as_str().unwrap().contains("GOT"));
}

#[tokio::test]
async fn an_endless_loop_hits_the_cpu_limit() {
    let env = env();
    let limits = Limits {
        cpu_secs: 1,
        wall_ms: 20_000,
        ..Limits::default()
    };
    let err = run(&env, limits, "while :; do :; done").await.unwrap_err();
    assert_eq!(err.class, ErrorClass::SandboxError, "{err}");
    assert!(err.message.contains("CPU time limit of 1 s"), "{err}");
}

/// A command's own exit status of 129 to 159 is what the sandbox reports for a death by
/// signal: one that came too soon to be the CPU limit's is the command's exit status, and a
/// signal's note says it may be either.
#[tokio::test]
async fn an_exit_status_above_128_is_not_taken_for_a_limit() {
    let env = env();
    let out = ok(run(&env, Limits::default(), "exit 152").await);
    assert_eq!(out["exit_code"], 152, "{out}");
    let out = ok(run(&env, Limits::default(), "exit 137").await);
    assert_eq!(out["signal"], 9, "{out}");
    assert!(
        out["note"]
            .as_str()
            .is_some_and(|n| n.contains("or the command exited with status 137")),
        "{out}"
    );
}

#[tokio::test]
async fn a_sleeper_hits_the_wall_time_limit() {
    let env = env();
    let limits = Limits {
        wall_ms: 300,
        ..Limits::default()
    };
    let err = run(&env, limits, "sleep 30").await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Timeout, "{err}");
    assert!(err.message.contains("wall time limit of 300 ms"), "{err}");
}

#[tokio::test]
async fn a_flood_of_output_is_capped() {
    let env = env();
    let limits = Limits {
        output_bytes: 10_000,
        ..Limits::default()
    };
    let out = run(&env, limits, "yes flood").await.unwrap();
    assert!(out.truncated);
    assert_eq!(out.value["truncated"], true, "the value says so too");
    assert_eq!(out.value["stdout"].as_str().unwrap().len(), 10_000);
    assert!(
        out.value["note"].as_str().unwrap().contains("output limit"),
        "{}",
        out.value
    );
}

#[tokio::test]
async fn a_big_file_hits_the_file_size_limit() {
    let env = env();
    let limits = Limits {
        file_size_mb: 1,
        ..Limits::default()
    };
    let err = run(&env, limits, "head -c 10485760 /dev/zero > big.bin")
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::SandboxError, "{err}");
    assert!(err.message.contains("file size limit of 1 MiB"), "{err}");
    assert!(std::fs::metadata(env.ws.join("big.bin")).unwrap().len() <= 1 << 20);
}

#[tokio::test]
async fn arguments_are_words_not_shell() {
    let env = env();
    let config = CommandToolConfig {
        risk: RiskClass::Read,
        ..exec_config(
            "echo",
            vec![
                "echo".into(),
                "{text}".into(),
                "n={n}".into(),
                "{many}".into(),
            ],
        )
    };
    let tool = CommandTool::new(config, env.settings.clone(), &mut Redactor::new()).unwrap();
    let args = json!({"text": "; touch pwned $(touch pwned2)", "n": 3, "many": ["a", "b"]});
    let out = tool
        .run(
            args,
            CallContext::new(Actor::System),
            SandboxMode::Bubblewrap,
        )
        .await
        .unwrap();
    assert_eq!(
        out.value["stdout"],
        "; touch pwned $(touch pwned2) n=3 a b\n"
    );
    assert!(!env.ws.join("pwned").exists() && !env.ws.join("pwned2").exists());

    // A null item is no word, as a null value is.
    let words = tool
        .render(&json!({"text": "t", "n": 1, "many": ["a", null, "b"]}))
        .unwrap();
    assert_eq!(words, ["echo", "t", "n=1", "a", "b"]);
    // A word no command line can carry is the caller's mistake, not the sandbox's.
    for (args, says) in [
        (
            json!({"text": "a\u{0}b", "n": 1}),
            "argument text contains a NUL byte",
        ),
        (
            json!({"text": "t", "n": "1\u{0}"}),
            "argument n contains a NUL byte",
        ),
        (
            json!({"text": "x".repeat(200_000), "n": 1}),
            "argument text makes a command-line word of 200000 bytes",
        ),
    ] {
        let err = tool.render(&args).unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidArguments, "{err}");
        assert!(err.message.starts_with(says), "{err}");
    }
}

#[tokio::test]
async fn without_bubblewrap_the_call_fails_unless_policy_says_sandbox_none() {
    let env = env();
    let settings = Arc::new(SandboxSettings {
        bwrap: None,
        ..(*env.settings).clone()
    });
    let mk = || {
        let config = exec_config(
            "sh.run",
            vec!["/bin/sh".into(), "-c".into(), "echo unsandboxed".into()],
        );
        CommandTool::new(config, settings.clone(), &mut Redactor::new()).unwrap()
    };
    let run_with = |policy: &str| {
        let reg = Arc::new(Registry::new());
        reg.register_command(mk()).unwrap();
        let policy = Policy::from_yaml(policy, &env.ws).unwrap();
        GatewayBuilder::new(reg, Arc::new(MemoryLog::default()))
            .policy(policy)
            .build()
            .unwrap()
    };
    let ctx = CallContext::new(Actor::Agent("a".into()));
    let gw = run_with("rules:\n  - id: allow-sh\n    tools: [sh.run]\n    effect: allow\n");
    let err = gw.call("sh.run", json!({}), ctx.clone()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::SandboxError);
    assert!(err.message.contains("bubblewrap"), "{err}");
    let gw = run_with(
        "rules:\n  - id: allow-sh\n    tools: [sh.run]\n    effect: allow\n    sandbox: none\n",
    );
    let out = gw.call("sh.run", json!({}), ctx).await.unwrap();
    assert_eq!(out.value["stdout"], "unsandboxed\n");
}

#[tokio::test]
async fn a_sandbox_that_cannot_be_built_is_a_sandbox_error() {
    let env = env();
    let missing = env.root.join("no-such-workspace");
    let settings = Arc::new(SandboxSettings {
        write_roots: vec![missing],
        ..(*env.settings).clone()
    });
    let config = exec_config("t", vec!["true".into()]);
    let tool = CommandTool::new(config, settings, &mut Redactor::new()).unwrap();
    let err = tool
        .run(
            json!({}),
            CallContext::new(Actor::System),
            SandboxMode::Bubblewrap,
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::SandboxError, "{err}");
    assert!(
        err.message.contains("could not be set up") && err.message.contains("bwrap"),
        "{err}"
    );
    // Without the sandbox, the same missing folder fails starting a program that is there:
    // the sandbox's failure too, not the program's (it would be retried as a tool_error).
    let err = tool
        .run(
            json!({}),
            CallContext::new(Actor::System),
            SandboxMode::None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::SandboxError, "{err}");
    assert!(err.message.contains("cannot start the command"), "{err}");
}

/// A program that is missing, or not executable, is the tool's failure (`tool_error`, which
/// retry and `on_failure` act on), in the sandbox and without it, never a broken sandbox.
#[tokio::test]
async fn a_program_that_cannot_run_is_a_tool_error() {
    let env = env();
    let not_executable = env.ws.join("data.txt");
    std::fs::write(&not_executable, "x").unwrap();
    let cases = [
        ("/nonexistent/prog".to_string(), "No such file or directory"),
        (
            "no-such-program-anywhere".to_string(),
            "No such file or directory",
        ),
        (not_executable.display().to_string(), "Permission denied"),
    ];
    for (program, why) in cases {
        let config = exec_config("t", vec![program.clone()]);
        let tool = CommandTool::new(config, env.settings.clone(), &mut Redactor::new()).unwrap();
        for mode in [SandboxMode::Bubblewrap, SandboxMode::None] {
            let err = tool
                .run(json!({}), CallContext::new(Actor::System), mode)
                .await
                .unwrap_err();
            assert_eq!(err.class, ErrorClass::ToolError, "{mode:?}: {err}");
            assert!(
                err.message
                    .starts_with(&format!("t: cannot run {program:?}: "))
                    && err.message.contains(why),
                "{mode:?}: {err}"
            );
        }
    }
}

#[tokio::test]
async fn the_command_sees_its_own_environment_and_nothing_of_the_host() {
    let env = env();
    let mut config_env = std::collections::BTreeMap::new();
    // `PATH` comes from the host (`${PATH}`): a secret by declaration, so it is handed to the
    // sandbox as an environment variable, never as a command-line argument.
    config_env.insert("FROM_HOST".to_string(), "${PATH}".to_string());
    config_env.insert("GREETING".to_string(), "hello".to_string());
    let config = CommandToolConfig {
        description: "print the environment".into(),
        env: config_env,
        ..exec_config("sh.env", vec!["/bin/sh".into(), "-c".into(), "env".into()])
    };
    let tool = CommandTool::new(config, env.settings.clone(), &mut Redactor::new()).unwrap();
    let v = ok(tool
        .run(
            json!({}),
            CallContext::new(Actor::System),
            SandboxMode::Bubblewrap,
        )
        .await);
    let out = v["stdout"].as_str().unwrap();
    assert!(out.contains("GREETING=hello"), "{out}");
    let host_path = std::env::var("PATH").unwrap();
    assert!(out.contains(&format!("FROM_HOST={host_path}")), "{out}");
    // The test process's own variables (cargo sets these) stay outside.
    assert!(!out.contains("CARGO_PKG_NAME"), "{out}");
    assert!(out.contains("HOME=/tmp"), "{out}");
    // And the tool's description never carries the secret values.
    assert!(!format!("{tool:?}").contains(&host_path));
}

/// A command runs with the host's huge-page policy even when the gateway's process turned huge
/// pages off for itself (as the `agent-runtime` binary does): Linux keeps that setting through
/// fork and exec, so the gateway gives it back to each child.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_command_does_not_inherit_the_gateways_huge_page_setting() {
    let env = env();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    assert!(
        status.contains("THP_enabled:\t1"),
        "this test needs a kernel with transparent huge pages (THP_enabled: 1): {status}"
    );
    // SAFETY: PR_SET_THP_DISABLE takes no pointers; it changes this test process only.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) },
        0
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    assert!(status.contains("THP_enabled:\t0"), "{status}");
    let v = ok(run(
        &env,
        Limits::default(),
        "grep THP_enabled /proc/self/status",
    )
    .await);
    assert_eq!(v["stdout"], "THP_enabled:\t1\n", "{v}");
}

/// A command may print up to its `output_bytes` (1 MiB by default), more than the gateway's
/// `max_output_bytes` (256 KiB): the call still succeeds, with its exit code, its whole stderr
/// and the start of its stdout, marked truncated.
#[tokio::test]
async fn output_over_the_gateway_limit_keeps_exit_code_and_stderr() {
    let env = env();
    let reg = Arc::new(Registry::new());
    reg.register_command(sh_tool(&env, Limits::default()))
        .unwrap();
    let gw = GatewayBuilder::new(reg, Arc::new(MemoryLog::default()))
        .policy(
            Policy::from_yaml(
                "rules:\n  - id: allow-sh\n    tools: [sh.run]\n    effect: allow\n",
                &env.ws,
            )
            .unwrap(),
        )
        .build()
        .unwrap();
    let out = gw
        .call(
            "sh.run",
            json!({"script": "head -c 600000 /dev/zero | tr '\\0' x; echo done >&2; exit 3"}),
            CallContext::new(Actor::Agent("a".into())),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.truncated);
    assert_eq!(out.value["truncated"], true);
    assert_eq!(out.value["exit_code"], 3);
    assert_eq!(out.value["stderr"], "done\n");
    let stdout = out.value["stdout"].as_str().unwrap();
    assert!(stdout.len() > 200_000 && stdout.bytes().all(|b| b == b'x'));
    assert!(serde_json::to_string(&out.value).unwrap().len() <= 256 * 1024);
}

/// The longest word Linux takes (131,071 bytes: its limit counts the terminating NUL) runs; one
/// byte more is the caller's mistake, refused before anything starts.
#[tokio::test]
async fn the_longest_word_linux_takes_runs_and_one_more_byte_is_refused() {
    let env = env();
    let script = |len: usize| format!("echo ok #{}", "x".repeat(len - 9));
    let out = ok(run(&env, Limits::default(), &script(131_071)).await);
    assert_eq!(out["stdout"], "ok\n", "{out}");
    let err = run(&env, Limits::default(), &script(131_072))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::InvalidArguments, "{err}");
    assert!(
        err.message
            .starts_with("argument script makes a command-line word of 131072 bytes, over the system's limit of 131071"),
        "{err}"
    );
}

/// A command line that cannot be made is refused before anyone is asked to approve the call
/// (a person approved a 200,000-byte word that could then never run).
#[tokio::test]
async fn a_command_that_cannot_be_made_is_refused_before_asking() {
    struct Counting(std::sync::atomic::AtomicUsize);
    #[async_trait::async_trait]
    impl agent_runtime_core::ApprovalSink for Counting {
        async fn request(
            &self,
            _r: agent_runtime_core::ApprovalRequest,
            _cancel: agent_runtime_core::CancellationToken,
        ) -> Result<agent_runtime_core::ApprovalDecision, agent_runtime_core::ApprovalError>
        {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(agent_runtime_core::ApprovalDecision {
                approved: true,
                decided_by: Actor::Person("ann".into()),
                reason: None,
            })
        }
    }
    let env = env();
    let reg = Arc::new(Registry::new());
    reg.register_command(sh_tool(&env, Limits::default()))
        .unwrap();
    let asked = Arc::new(Counting(std::sync::atomic::AtomicUsize::new(0)));
    let log = Arc::new(MemoryLog::default());
    // The default policy asks before an exec tool runs.
    let gw = GatewayBuilder::new(reg, log.clone())
        .policy(Policy::defaults(vec![env.ws.clone()]).unwrap())
        .approval(asked.clone())
        .build()
        .unwrap();
    let err = gw
        .call(
            "sh.run",
            json!({"script": "x".repeat(200_000)}),
            CallContext::new(Actor::Agent("a".into())),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::InvalidArguments, "{err}");
    assert_eq!(asked.0.load(std::sync::atomic::Ordering::SeqCst), 0);
    let kinds: Vec<_> = log.all().iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            agent_runtime_core::EventKind::ToolRequested,
            agent_runtime_core::EventKind::ToolFailed
        ]
    );
}

/// With `success_exit_codes`, another status or a signal fails the call, naming the status and
/// the last line of stderr; a listed status is output.
#[tokio::test]
async fn success_exit_codes_turn_other_statuses_into_failures() {
    let env = env();
    let mut tool = sh_tool(&env, Limits::default());
    let mut config = tool.config().clone();
    config.success_exit_codes = Some(vec![0, 2, 130]);
    tool = CommandTool::new(config, env.settings.clone(), &mut Redactor::new()).unwrap();
    let call = |script: &str| {
        tool.run(
            json!({"script": script}),
            CallContext::new(Actor::System),
            SandboxMode::Bubblewrap,
        )
    };
    assert_eq!(ok(call("exit 2").await)["exit_code"], 2);
    // Listed, a status bubblewrap would report for a signal (128 + 2) is the command's own.
    let out = ok(call("exit 130").await);
    assert_eq!(
        (&out["exit_code"], &out["signal"]),
        (&json!(130), &Value::Null)
    );
    let err = call("echo first >&2; echo 'last words  ' >&2; echo >&2; exit 5")
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::ToolError, "{err}");
    assert_eq!(
        err.message,
        "sh.run: exited with status 5 (success_exit_codes: 0, 2, 130): last words"
    );
    let err = call("kill -KILL $$").await.unwrap_err();
    assert_eq!(err.class, ErrorClass::ToolError, "{err}");
    assert!(
        err.message.starts_with("sh.run: killed by signal 9"),
        "{err}"
    );
}

/// The processes whose command line is exactly `argv`.
fn processes_running(argv: &[&str]) -> Vec<u32> {
    let wanted: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted))
        .collect()
}

/// A command does not outlive what started it: the thread that started the call goes away
/// without ending it (as when the process running a task is killed), and the command is killed,
/// in the sandbox and without one. (A process killed while bwrap was still starting once left
/// the sandbox running under init; `resume` then ran the tool a second time beside it.)
#[test]
fn a_command_dies_with_the_thread_that_started_it() {
    let env = env();
    for (mode, secs) in [
        (SandboxMode::Bubblewrap, "7771"),
        (SandboxMode::None, "7772"),
    ] {
        let tool = sh_tool(&env, Limits::default());
        let started = env.ws.join(format!("started-{secs}"));
        let script = format!("touch {}; exec sleep {secs}", started.display());
        let starter = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut call = Box::pin(tool.run(
                json!({ "script": script }),
                CallContext::new(Actor::System),
                mode,
            ));
            rt.block_on(async {
                while !started.exists() {
                    tokio::select! {
                        r = &mut call => panic!("{mode:?}: the call ended: {r:?}"),
                        _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
                    }
                }
            });
            // Neither the call nor its runtime is dropped (dropping would kill the command):
            // only the thread ends, as it would with its process.
            std::mem::forget(call);
            std::mem::forget(rt);
        });
        starter.join().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !processes_running(&["sleep", secs]).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "{mode:?}: `sleep {secs}` still runs after the thread that started it ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
