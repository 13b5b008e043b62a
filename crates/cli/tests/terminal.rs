//! What a person at a terminal sees and types: approval prompts, the interrupt key and the
//! progress line, through a real pseudo-terminal.
//!
//! The terminal is opened with libc's `openpty` rather than `portable-pty`, which would bring a
//! third major version of `nix` into the lock file for these few calls.

#![cfg(target_os = "linux")]

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A child process whose terminal is the slave side of a pseudo-terminal; everything it
/// writes there is gathered from the master side by a thread.
struct Terminal {
    master: std::fs::File,
    child: Child,
    screen: Arc<Mutex<Vec<u8>>>,
}

impl Terminal {
    fn spawn(args: &[&str], cwd: &Path, cols: u16, env: &[(&str, &str)]) -> Terminal {
        let mut master = -1;
        let mut slave = -1;
        let size = libc::winsize {
            ws_row: 40,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two descriptors into the integers passed; the name buffer
        // and the termios are optional (null).
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and are owned here alone.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("agent-runtime"));
        cmd.args(args)
            .current_dir(cwd)
            .env_remove("AGENT_RUNTIME_DB")
            .env("TERM", "xterm")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: only async-signal-safe calls between fork and exec: a new session, whose
        // controlling terminal is the pseudo-terminal (stdin), so that Ctrl-C typed on it
        // reaches the child as SIGINT.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(cmd);
        let master = std::fs::File::from(master);
        let screen = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let gathered = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the child and every copy of the slave side are gone.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                gathered.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Terminal {
            master,
            child,
            screen,
        }
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    /// Waits until `needle` has appeared `times` times on the screen.
    fn wait_for(&self, needle: &str, times: usize) -> String {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let screen = self.screen();
            if screen.matches(needle).count() >= times {
                return screen;
            }
            assert!(
                Instant::now() < until,
                "{needle:?} did not appear {times} times; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn type_text(&mut self, text: &str) {
        self.master.write_all(text.as_bytes()).unwrap();
    }

    /// Types `text` as a person answering the question just shown: after reading it (a line
    /// typed within half a second of a question is ignored).
    fn answer(&mut self, text: &str) {
        std::thread::sleep(Duration::from_millis(700));
        self.type_text(text);
    }

    /// Waits for the child to end (it must, within a minute: a hang fails the test).
    fn wait(&mut self) -> ExitStatus {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader take the last output.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!("the process did not end; the screen:\n{}", self.screen());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A workspace folder (the run's current directory), with a graph, and a folder outside it
/// holding two files whose reading needs approval.
fn setup(graph: &str) -> (tempfile::TempDir, tempfile::TempDir) {
    let ws = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("one.txt"), "first-secret").unwrap();
    std::fs::write(outside.path().join("two.txt"), "second-secret").unwrap();
    let graph = graph.replace("OUT", outside.path().to_str().unwrap());
    std::fs::write(ws.path().join("flow.yaml"), graph).unwrap();
    (ws, outside)
}

fn run_args(ws: &Path) -> Vec<String> {
    vec![
        "--db".into(),
        ws.join("events.db").to_str().unwrap().into(),
        "--plaintext".into(),
        "run".into(),
        "flow.yaml".into(),
        "--seed".into(),
        "1".into(),
    ]
}

/// The events of `kind` in the run database of workspace `ws`, as `audit export` gives them.
fn recorded(ws: &Path, kind: &str) -> Vec<serde_json::Value> {
    let out = Command::new(assert_cmd::cargo::cargo_bin("agent-runtime"))
        .arg("--db")
        .arg(ws.join("events.db"))
        .args(["--plaintext", "audit", "export", "--format", "jsonl"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// [`spawn_run`] with `--config gateway.yaml`, the file written with `config` first.
fn spawn_run_configured(ws: &Path, config: &str, env: &[(&str, &str)]) -> Terminal {
    std::fs::write(ws.join("gateway.yaml"), config).unwrap();
    let mut args = run_args(ws);
    args.extend(["--config".to_string(), "gateway.yaml".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Terminal::spawn(&args, ws, 100, env)
}

fn spawn_run(ws: &Path, cols: u16, env: &[(&str, &str)]) -> Terminal {
    let args = run_args(ws);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Terminal::spawn(&args, ws, cols, env)
}

/// Two calls needing approval at once: one question at a time, and each answer goes to the
/// question on the screen.
#[test]
fn approvals_are_asked_one_at_a_time_and_answered_in_turn() {
    let (ws, _outside) = setup(
        "tasks:
  - {id: one, tool: read_file, args: {path: OUT/one.txt}, on_failure: skip}
  - {id: two, tool: read_file, args: {path: OUT/two.txt}, on_failure: skip}
",
    );
    let mut term = spawn_run(ws.path(), 100, &[]);
    let screen = term.wait_for("Allow? [y/N]", 1);
    // Time for a second question to appear, were they not taking turns.
    std::thread::sleep(Duration::from_millis(500));
    let screen_later = term.screen();
    assert_eq!(
        screen_later.matches("Allow? [y/N]").count(),
        1,
        "{screen_later}"
    );
    let (asked, other, asked_text, other_text) = if screen.contains("one.txt") {
        ("one.txt", "two.txt", "first-secret", "second-secret")
    } else {
        ("two.txt", "one.txt", "second-secret", "first-secret")
    };
    assert!(!screen.contains(other), "{screen}");
    // The question names the task that asks, as the graph does.
    let task = if asked == "one.txt" { "one" } else { "two" };
    assert!(
        screen.contains(&format!("(task `{task}`) wants to call read_file")),
        "{screen}"
    );
    term.answer("y\r");
    let screen = term.wait_for("Allow? [y/N]", 2);
    let second = &screen[screen.find("Allow? [y/N]").unwrap() + 1..];
    assert!(second.contains(other), "{screen}");
    assert!(!second.contains(asked), "{screen}");
    term.answer("n\r");
    let status = term.wait();
    let screen = term.screen();
    assert!(status.success(), "{status}: {screen}");
    assert!(screen.contains(asked_text), "{screen}");
    assert!(!screen.contains(other_text), "{screen}");
}

/// A question takes only an answer typed once it could be read: keys typed on after the last
/// answer (or an Enter pressed twice) decided the next question unseen. An answer is `y` or `n`
/// in any case; anything else is asked again; the decision is shown. Once the terminal's input
/// ends (Ctrl-D), a question is denied as the system's decision, not the person's.
#[test]
fn a_question_takes_only_an_answer_typed_after_it_could_be_read() {
    let (ws, _outside) = setup(
        "tasks:
  - {id: one, tool: read_file, args: {path: OUT/one.txt}, on_failure: skip}
  - {id: two, tool: read_file, args: {path: OUT/two.txt}, needs: [one], on_failure: skip}
",
    );
    let mut term = spawn_run(ws.path(), 100, &[("USER", "ana")]);
    term.wait_for("Allow? [y/N]", 1);
    term.type_text("y\r");
    term.wait_for("(typed before the question could be read: ignored)", 1);
    term.answer("maybe\r");
    term.wait_for("(answer y or n)", 1);
    term.answer("YES\r");
    term.wait_for("(approved)", 1);
    term.wait_for("two.txt", 1);
    term.answer("\x04");
    term.wait_for("(the terminal's input has ended: denied)", 1);
    let status = term.wait();
    let screen = term.screen();
    assert!(status.success(), "{status}: {screen}");
    assert!(screen.contains("1 completed, 1 skipped"), "{screen}");
    let decided = recorded(ws.path(), "approval.decided");
    assert_eq!(decided.len(), 2, "{decided:?}");
    assert_eq!(
        (&decided[0]["actor"], &decided[0]["payload"]["approved"]),
        (&serde_json::json!("person:ana"), &serde_json::json!(true))
    );
    assert_eq!(
        (&decided[1]["actor"], &decided[1]["payload"]["approved"]),
        (&serde_json::json!("system"), &serde_json::json!(false))
    );
}

/// On a `dumb` terminal (Emacs' shell, a CI log) a question sends no escape sequence either;
/// a long argument is shown by its start and end, saying how much is left out, instead of
/// scrolling the question off the screen.
#[test]
fn a_question_on_a_dumb_terminal_is_plain_and_long_arguments_are_cut() {
    let long = format!("{}MIDDLE{}", "a".repeat(3000), "z".repeat(3000));
    let (ws, _outside) = setup(&format!(
        "tasks:\n  - {{id: w, tool: show, args: {{s: {long}}}, on_failure: skip}}\n"
    ));
    // A command tool: running one asks under the default policy.
    let mut term = spawn_run_configured(
        ws.path(),
        "tools:\n  - name: show\n    risk: exec\n    input_schema: {type: object, properties: {s: {type: string}}}\n    command: [printf, '%s', '{s}']\n",
        &[("TERM", "dumb")],
    );
    let screen = term.wait_for("Allow? [y/N]", 1);
    assert!(!screen.contains('\x1b'), "{screen:?}");
    assert!(screen.contains("characters not shown"), "{screen}");
    assert!(!screen.contains("MIDDLE"), "{screen}");
    assert!(screen.len() < 5_000, "{} bytes on the screen", screen.len());
    term.answer("n\r");
    assert!(term.wait().success(), "{}", term.screen());
    assert!(!term.screen().contains('\x1b'), "{:?}", term.screen());
}

/// Ctrl-C while a question is open: the question is withdrawn and the run ends cancelled,
/// without waiting for Enter. The question shows what it asks about with its control
/// characters escaped.
#[test]
fn ctrl_c_withdraws_an_open_question_and_ends_the_run() {
    let (ws, _outside) = setup(
        "tasks:
  - {id: peek, tool: read_file, args: {path: \"OUT/x\\u009b31m\\u202ey\"}}
  - {id: nap, tool: sleep, args: {ms: 60000}}
",
    );
    let mut term = spawn_run(ws.path(), 100, &[("USER", "ana")]);
    let screen = term.wait_for("Allow? [y/N]", 1);
    assert!(screen.contains(r"x\u{9b}31m\u{202e}y"), "{screen}");
    assert!(!screen.contains('\u{9b}'), "{screen}");
    assert!(!screen.contains('\u{202e}'), "{screen}");
    term.type_text("\x03");
    let status = term.wait();
    let screen = term.screen();
    assert_eq!(status.code(), Some(1), "{screen}");
    assert!(screen.contains("withdrawn"), "{screen}");
    assert!(screen.contains("cancelled"), "{screen}");
    // The cancellation is the person's at the terminal, as `cancel`'s would be.
    let cancelled = recorded(ws.path(), "run.cancelled");
    assert_eq!(cancelled.len(), 1, "{cancelled:?}");
    assert_eq!(cancelled[0]["actor"], "person:ana");
    assert_eq!(cancelled[0]["payload"]["reason"], "interrupted (Ctrl-C)");
}

/// A question nobody answered in time (the gateway's `approval_timeout_ms`) is withdrawn; the
/// retry asks again, and the answer typed then goes to the retry's question.
#[test]
fn a_timed_out_question_does_not_take_the_retry_s_answer() {
    let (ws, _outside) = setup(
        "tasks:
  - id: peek
    tool: read_file
    args: {path: OUT/one.txt}
    retry: {max_attempts: 2, on: [approval_denied], backoff: 10ms}
",
    );
    let mut term = spawn_run_configured(ws.path(), "limits: {approval_timeout_ms: 1000}\n", &[]);
    term.wait_for("Allow? [y/N]", 1);
    term.wait_for("(nobody answered within 1 s: denied)", 1);
    term.wait_for("Allow? [y/N]", 2);
    term.answer("y\r");
    let status = term.wait();
    let screen = term.screen();
    assert!(status.success(), "{status}: {screen}");
    assert!(screen.contains("first-secret"), "{screen}");
}

/// A question has its whole `approval_timeout_ms` from when it is shown: one that waited its
/// turn behind another ran out before anyone saw it (recorded as "nobody answered").
///
/// Timings: each question is answered 2.5 s after it is shown (1.5 s inside its 4 s), and the
/// second one 5 s after both were asked, a second past the point where time counted from the
/// asking would have run out.
#[test]
fn a_question_waiting_its_turn_has_its_whole_time_once_shown() {
    let (ws, _outside) = setup(
        "tasks:
  - {id: one, tool: read_file, args: {path: OUT/one.txt}, on_failure: skip}
  - {id: two, tool: read_file, args: {path: OUT/two.txt}, on_failure: skip}
",
    );
    let mut term = spawn_run_configured(ws.path(), "limits: {approval_timeout_ms: 4000}\n", &[]);
    term.wait_for("Allow? [y/N]", 1);
    std::thread::sleep(Duration::from_millis(2500));
    term.type_text("y\r");
    term.wait_for("(approved)", 1);
    // The second question, asked at the same time as the first, is on the screen now.
    term.wait_for("Allow? [y/N]", 2);
    std::thread::sleep(Duration::from_millis(2500));
    term.type_text("y\r");
    term.wait_for("(approved)", 2);
    let status = term.wait();
    let screen = term.screen();
    assert!(status.success(), "{status}: {screen}");
    assert!(!screen.contains("nobody answered"), "{screen}");
    assert!(
        screen.contains("first-secret") && screen.contains("second-secret"),
        "{screen}"
    );
}

/// A person taking longer to answer than the task's `timeout` does not time the task out: the
/// attempt's clock stands still while the question is open.
#[test]
fn the_time_a_question_stays_open_is_not_the_task_s() {
    let (ws, _outside) = setup(
        "tasks:
  - {id: peek, tool: read_file, args: {path: OUT/one.txt}, timeout: 500ms}
",
    );
    let mut term = spawn_run(ws.path(), 100, &[]);
    term.wait_for("Allow? [y/N]", 1);
    std::thread::sleep(Duration::from_millis(1500));
    term.answer("y\r");
    let status = term.wait();
    let screen = term.screen();
    assert!(status.success(), "{status}: {screen}");
    assert!(!screen.contains("withdrawn"), "{screen}");
    assert!(screen.contains("first-secret"), "{screen}");
}

/// The progress line fits a narrow terminal (a wrapped line cannot be redrawn in place); on a
/// `dumb` terminal there are plain lines and no cursor movement.
#[test]
fn the_progress_line_fits_the_terminal_and_dumb_terminals_get_plain_lines() {
    let graph = "tasks:
  - {id: a, tool: sleep, args: {ms: 100}}
  - {id: b, tool: sleep, args: {ms: 100}, needs: [a]}
  - {id: c, tool: sleep, args: {ms: 100}, needs: [b]}
";
    let (ws, _outside) = setup(graph);
    let mut term = spawn_run(ws.path(), 20, &[]);
    assert!(term.wait().success(), "{}", term.screen());
    let screen = term.screen();
    let drawn: Vec<&str> = screen
        .split("\r\x1b[2K")
        .skip(1)
        .map(|s| s.split(['\r', '\n']).next().unwrap_or(""))
        .collect();
    assert!(drawn.len() >= 2, "{screen:?}");
    for line in &drawn {
        assert!(line.len() <= 19, "{line:?} in {screen:?}");
    }
    assert!(drawn.last().unwrap().starts_with("done 3"), "{screen:?}");

    let (ws, _outside) = setup(graph);
    let mut term = spawn_run(ws.path(), 80, &[("TERM", "dumb")]);
    assert!(term.wait().success(), "{}", term.screen());
    let screen = term.screen();
    assert!(!screen.contains('\x1b'), "{screen:?}");
    assert!(screen.contains("task c: completed"), "{screen:?}");
}

/// `tools call` on a terminal: a tool's text keeps its lines (a file read shows as a file), and
/// its controls are escaped (a tool's output cannot clear the screen); into a pipe it is as it
/// is (see `gateway_cli`).
#[test]
fn a_tool_s_text_on_a_terminal_keeps_its_lines_and_loses_its_controls() {
    let ws = tempfile::tempdir().unwrap();
    let db = ws.path().join("events.db");
    let args = [
        "--db",
        db.to_str().unwrap(),
        "--plaintext",
        "tools",
        "call",
        "builtin.echo",
        "--args",
        r#"{"text": "first line\nsecond \u001b[2J line"}"#,
    ];
    let mut term = Terminal::spawn(&args, ws.path(), 100, &[]);
    let status = term.wait();
    let screen = term.screen();
    assert!(status.success(), "{status}: {screen}");
    assert!(!screen.contains('\u{1b}'), "{screen:?}");
    let lines: Vec<&str> = screen.lines().map(|l| l.trim_end_matches('\r')).collect();
    assert!(
        lines.contains(&"first line") && lines.contains(&"second \\u{1b}[2J line"),
        "{screen:?}"
    );
}
