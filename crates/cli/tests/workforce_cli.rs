//! `agent-runtime run / replay / resume / runs / simulate` end to end, with a plaintext database
//! in a temporary directory.

mod common;

use std::path::{Path, PathBuf};

use common::assert_ok;
use std::time::{Duration, Instant};

use agent_runtime_core::{EventKind, EventQuery, RunId};
use agent_runtime_store::{Store, StoreConfig};
use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// `agent-runtime --db DB --plaintext`, with the user's data folder (where the trust record
/// of each command that runs tools is) beside the database, not the real user's.
fn cli(db: &Path) -> Command {
    let mut c = Command::cargo_bin("agent-runtime").unwrap();
    c.env_remove("AGENT_RUNTIME_DB")
        .env("XDG_DATA_HOME", data_home(db))
        .arg("--db")
        .arg(db)
        .arg("--plaintext");
    c
}

/// The user's data folder the tests' commands get: beside the database.
fn data_home(db: &Path) -> PathBuf {
    db.parent().unwrap_or(Path::new(".")).join("data")
}

/// `cancel`'s wait for its request to be carried out, long enough for a loaded machine (its
/// default, 5 s, was once too short in CI).
const PATIENT: [&str; 2] = ["--wait", "120"];

fn json_of(out: &[u8]) -> Value {
    serde_json::from_slice(out).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(out)))
}

fn events(db: &Path, run_id: RunId) -> Vec<agent_runtime_core::Envelope> {
    let store = Store::open(StoreConfig::plaintext(db).read_only()).unwrap();
    store
        .query_blocking(&EventQuery {
            run_id: Some(run_id),
            ..EventQuery::default()
        })
        .unwrap()
}

/// `agent-runtime run FLOW` in the background, in `cwd`, with stdout and stderr piped when `json`
/// (so that a failed run says why), both discarded otherwise.
fn spawn_run(db: &Path, flow: &Path, cwd: &Path, json: bool) -> std::process::Child {
    let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("agent-runtime"));
    c.current_dir(cwd)
        .env_remove("AGENT_RUNTIME_DB")
        .arg("--db")
        .arg(db)
        .arg("--plaintext")
        .arg("run")
        .arg(flow);
    if json {
        c.arg("--json")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
    } else {
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    }
    c.spawn().unwrap()
}

/// Waits for a run started with [`spawn_run`] to exit (a bound on waiting, not a timing
/// assertion).
fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "the run did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls the store until `what` finds something in the run's events (a bound on waiting, not
/// a timing assertion).
fn wait_for<T>(db: &Path, what: impl Fn(&[agent_runtime_core::Envelope]) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "gave up waiting for the run");
        std::thread::sleep(Duration::from_millis(50));
        let Ok(store) = Store::open(StoreConfig::plaintext(db).read_only()) else {
            continue;
        };
        let Ok(all) = store.query_blocking(&EventQuery::default()) else {
            continue;
        };
        if let Some(found) = what(&all) {
            return found;
        }
    }
}

/// The JSON a command printed, after checking it succeeded.
fn succeeded(out: &std::process::Output) -> Value {
    assert_ok(out);
    json_of(&out.stdout)
}

/// Writes the graph `yaml` to `dir/name` and returns its path.
fn write_flow(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let flow = dir.join(name);
    std::fs::write(&flow, yaml).unwrap();
    flow
}

/// A temporary directory holding the graph `yaml` as `name`, and the path of a database in it
/// (not created yet): the directory, the database, the graph.
fn flow_in_tempdir(name: &str, yaml: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ev.db");
    let flow = write_flow(dir.path(), name, yaml);
    (dir, db, flow)
}

/// A task's status in a printed outcome.
fn task_status(outcome: &Value, task: &str) -> String {
    outcome["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == task)
        .and_then(|t| t["status"].as_str())
        .unwrap_or_else(|| panic!("no task {task} in {outcome}"))
        .to_string()
}

/// `run examples/hello.yaml --seed 5 --json` into a new database in a temporary folder: the
/// folder (kept while it lives), the database, the command's output.
fn hello_run() -> (tempfile::TempDir, PathBuf, std::process::Output) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ev.db");
    let out = cli(&db)
        .arg("run")
        .arg(examples().join("hello.yaml"))
        .args(["--seed", "5", "--json"])
        .output()
        .unwrap();
    (dir, db, out)
}

#[test]
fn run_prints_outputs_and_replay_gives_the_same_hash() {
    let (_dir, db, out) = hello_run();
    let outcome = succeeded(&out);
    assert_eq!(outcome["status"], "completed");
    assert_eq!(outcome["outputs"]["sentence"]["text"], "Hello, world!");
    // Not a terminal: progress comes as plain lines on stderr.
    assert!(String::from_utf8_lossy(&out.stderr).contains("task sentence: completed"));
    let run_id = outcome["run_id"].as_str().unwrap().to_string();
    let hash = outcome["log_hash"].as_str().unwrap().to_string();
    // Every tool step went through the gateway: its policy decisions and audit trail are in
    // the run's log, beside the run's own events (which replay compares below).
    let logged = events(&db, run_id.parse().unwrap());
    let decided = logged
        .iter()
        .filter(|e| e.kind == EventKind::PolicyDecided)
        .count();
    let requested = logged
        .iter()
        .filter(|e| e.kind == EventKind::ToolRequested && e.payload.get("call").is_some())
        .count();
    assert!(requested > 0);
    assert_eq!(decided, requested, "one policy decision per tool call");

    replay_says(&db, &run_id, &hash);
    cli(&db)
        .args(["runs", "list"])
        .assert()
        .success()
        .stdout(predicate::str::contains(&run_id).and(predicate::str::contains("hello")));
    cli(&db)
        .args(["runs", "show", &run_id])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("status:   completed")
                .and(predicate::str::contains("sentence")),
        );
    cli(&db)
        .args(["resume", &run_id])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("already ended"));
}

/// `run -` reads the graph from standard input (a script that generates one pipes it in), and
/// an error in it is located in `<stdin>`.
#[test]
fn run_reads_a_graph_from_standard_input() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ev.db");
    let hello = std::fs::read_to_string(examples().join("hello.yaml")).unwrap();
    let out = cli(&db)
        .args(["run", "-", "--seed", "5", "--json"])
        .write_stdin(hello)
        .output()
        .unwrap();
    let outcome = succeeded(&out);
    assert_eq!(outcome["outputs"]["sentence"]["text"], "Hello, world!");
    cli(&db)
        .args(["run", "-"])
        .write_stdin("tasks:\n  - { id: a, tool: ecoh, args: {} }\n")
        .assert()
        .code(2)
        .stderr(predicate::str::starts_with(
            "error: <stdin>:2:14: tasks[0].tool: unknown tool `ecoh` (did you mean `echo`?",
        ));
    cli(&db)
        .args(["run", "-"])
        .write_stdin("tasks: 3\n")
        .assert()
        .code(2)
        .stderr(predicate::str::starts_with(
            "error: <stdin>:1:1: tasks: invalid type",
        ));
}

#[test]
fn human_output_lists_outputs_and_failure_policies_work() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ev.db");
    cli(&db)
        .arg("run")
        .arg(examples().join("failure-policies.yaml"))
        .assert()
        .success()
        .stdout(
            predicate::str::contains("cached answer / from the backup")
                .and(predicate::str::contains("log hash:")),
        )
        // The progress lines say where a substituted output came from.
        .stderr(
            predicate::str::contains("task primary: completed (output from fallback `backup`)")
                .and(predicate::str::contains(
                    "task flaky_then_default: completed (output from continue_with)",
                ))
                .and(predicate::str::contains("task backup: completed\n")),
        );
    // So does `runs show`, after the error that caused it; a task that completed on its own
    // has no note.
    let out = cli(&db)
        .args(["runs", "show", "last", "--json"])
        .output()
        .unwrap();
    let shown = succeeded(&out);
    let task = |id: &str| {
        shown["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(task("primary")["status"], "completed");
    assert_eq!(
        task("primary")["substituted"],
        "output from fallback `backup`"
    );
    assert_eq!(
        task("flaky_then_default")["substituted"],
        "output from continue_with"
    );
    assert!(task("backup").get("substituted").is_none());
    cli(&db)
        .args(["runs", "show", "last"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "timeout: attempt 1 timed out after 100ms; output from fallback `backup`",
        ));
    // `runs list` sizes its name column to the names, so the status column lines up.
    let out = cli(&db).args(["runs", "list"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[1].contains("failure-policies  completed"), "{text}");
    assert_eq!(
        lines[0].find("STATUS"),
        lines[1].find("completed"),
        "{text}"
    );
}

/// A secret written into a graph's tool arguments is run as written (replay needs it), with a
/// warning naming the field; short values, templates and ordinary keys are not warned about.
#[test]
fn a_secret_written_into_a_graph_is_warned_about() {
    let (_dir, db, flow) = flow_in_tempdir(
        "secret.yaml",
        "tasks:\n  - id: a\n    tool: echo\n    args: { text: hi, auth: { api_key: sk-live-0123456789 }, token: ab, max_tokens: 100 }\n  - id: b\n    tool: echo\n    needs: [a]\n    args: { password: \"{{ tasks.a.output.text }}-suffix\" }\n",
    );
    let out = cli(&db)
        .arg("run")
        .arg(&flow)
        .assert()
        .success()
        .get_output()
        .clone();
    let err = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].contains("task a args.auth.api_key") && !warnings[0].contains("sk-live"),
        "{err}"
    );
}

#[test]
fn a_failed_run_exits_1_and_bad_graphs_exit_2_with_a_location() {
    let (_dir, db, flow) = flow_in_tempdir(
        "bad.yaml",
        "tasks:\n  - { id: a, tool: fail, args: { message: boom } }\n",
    );
    cli(&db)
        .arg("run")
        .arg(&flow)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("failed").and(predicate::str::contains("a")));

    // Each refused graph: exit 2, the message (located where the graph says it), and nothing
    // recorded, since every check runs before the run starts.
    let count = || {
        Store::open(StoreConfig::plaintext(&db).read_only()).map_or(0, |s| {
            s.query_blocking(&EventQuery::default()).unwrap().len()
        })
    };
    let before = count();
    let refused = |yaml: &str, message: &str| {
        std::fs::write(&flow, yaml).unwrap();
        cli(&db)
            .arg("run")
            .arg(&flow)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(message));
        assert_eq!(count(), before, "the refused run recorded events: {yaml}");
    };
    refused(
        "tasks:\n  - id: fetch\n    tool: echo\n  - id: b\n    tool: echo\n    needs: [fetc]\n",
        "bad.yaml:6:13: tasks[1].needs: unknown task `fetc` (did you mean `fetch`?)",
    );
    refused(
        "tasks:\n  - { id: a, tool: echo, needs: [b] }\n  - { id: b, tool: echo, needs: [a] }\n",
        "dependency cycle a -> b -> a",
    );
    // An unknown tool.
    refused(
        "tasks:\n  - { id: first, tool: echo, args: {} }\n  - id: second\n    tool: ecoh\n",
        "bad.yaml:4:5: tasks[1].tool: unknown tool `ecoh` (did you mean `echo`?)",
    );
    // Arguments the tool's schema refuses, when the graph fixes them; a missing `args` that the
    // tool needs.
    refused(
        "tasks:\n  - { id: first, tool: echo, args: {} }\n  - id: nap\n    tool: sleep\n    args: { ms: soon }\n",
        "bad.yaml:5:5: tasks[1].args: arguments do not match the input schema of sleep: at /ms: \"soon\" is not of type \"integer\"",
    );
    refused(
        "tasks:\n  - id: bare\n    tool: echo\n",
        "bad.yaml:3:5: tasks[0].args: missing, and `echo` needs them:",
    );
    // The example of agent tasks: the command line has no model provider yet, and says so
    // where the graph uses one.
    let agents = std::fs::read_to_string(examples().join("agents.json")).unwrap();
    refused(
        &agents,
        "bad.yaml:16:25: tasks[1].agent: agent `researcher` routes to `openai/gpt-4o-mini`, and no model provider `openai` is configured; the command line has no model providers yet: run agent tasks through the library (docs/workforce.md, Agent tasks)",
    );

    cli(&db).args(["replay", "not-a-run"]).assert().code(2);
    cli(&db)
        .args(["runs", "show", "019b76da-a800-72cf-aefc-92e4edb9b0ae"])
        .assert()
        .code(2);
}

#[test]
fn simulate_is_deterministic_in_its_seed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ev.db");
    let sim = |seed: &str| {
        let out = cli(&db)
            .args([
                "simulate",
                "--agents",
                "4",
                "--tasks",
                "300",
                "--shape",
                "layered",
                "--failure-rate",
                "0.1",
                "--seed",
                seed,
                "--json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        json_of(&out.stdout)
    };
    let a = sim("1");
    let b = sim("1");
    let c = sim("2");
    assert_eq!(a["log_hash"], b["log_hash"]);
    assert_ne!(a["log_hash"], c["log_hash"]);
    assert_eq!(
        a["tasks_done"].as_u64().unwrap() + a["tasks_skipped"].as_u64().unwrap(),
        300
    );
    // -0 is 0: the same simulation, the same hash.
    let rate = |r: &str| {
        let out = cli(&db)
            .args(["simulate", "--tasks", "50", "--failure-rate", r, "--json"])
            .output()
            .unwrap();
        json_of(&out.stdout)["log_hash"].clone()
    };
    assert_eq!(rate("-0"), rate("0"));
    cli(&db)
        .args(["simulate", "--shape", "ring"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--shape: unknown shape `ring`"));
    // Sizes past the simulator's bounds are refused before anything is built, naming the flag
    // and its range.
    for (flag, value, says) in [
        (
            "--tasks",
            "4000000000",
            "'--tasks <TASKS>': 4000000000 is not in 1..=10000000",
        ),
        (
            "--agents",
            "0",
            "'--agents <AGENTS>': 0 is not in 1..=1000000",
        ),
        (
            "--agents",
            "-1",
            "'--agents <AGENTS>': -1 is not in 1..=1000000",
        ),
        ("--failure-rate", "1.5", "failure-rate is 1.5"),
        // A negative value is a value, not an unknown flag `-0`.
        ("--failure-rate", "-0.1", "failure-rate is -0.1"),
        ("--seed", "-1", "invalid value '-1' for '--seed <SEED>'"),
        // A JSON reader holding numbers as doubles would read it back as another seed.
        (
            "--seed",
            "9007199254740992",
            "9007199254740992 is not in 0..=9007199254740991",
        ),
        // Refused as the library refuses it, not run as 1.
        (
            "--agent-concurrency",
            "0",
            "'--agent-concurrency <AGENT_CONCURRENCY>': 0 is not in 1..=4294967295",
        ),
    ] {
        cli(&db)
            .args(["simulate", flag, value])
            .timeout(std::time::Duration::from_secs(30))
            .assert()
            .code(2)
            .stderr(predicate::str::contains(says));
    }
    cli(&db)
        .args(["run", "flow.yaml", "--seed", "9007199254740992"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "9007199254740992 is not in 0..=9007199254740991",
        ));
}

/// A simulation's run id follows from its seed, so two processes simulating one seed into one
/// database would interleave their events: the run is claimed first, and a held claim (here
/// the test's own) makes `simulate` fail, naming the holder; once simulated, the seed's run is
/// in the database, and simulating it again is refused.
#[test]
fn a_simulation_whose_run_is_claimed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ev.db");
    let store = Store::open(StoreConfig::plaintext(&db)).unwrap();
    let claim = store
        .claim_run(agent_runtime_workforce::sim::run_id_of(
            &agent_runtime_workforce::sim::SimConfig::new(
                4,
                50,
                agent_runtime_workforce::sim::Shape::Layered,
                0.0,
                9,
            ),
        ))
        .unwrap();
    let sim = || {
        let mut c = cli(&db);
        c.args([
            "simulate", "--agents", "4", "--tasks", "50", "--seed", "9", "--log", "store",
        ]);
        c
    };
    sim()
        .assert()
        .code(1)
        .stderr(predicate::str::contains(format!(
            "is being driven by process {}",
            std::process::id()
        )));
    drop(claim);
    sim().assert().success();
    // Done once, the same seed cannot be simulated into the database again.
    sim().assert().code(1).stderr(
        predicate::str::contains("is already in it")
            .and(predicate::str::contains("follows from its seed")),
    );
}

/// `last` is the run that began last in the log, a simulation's too (its id and times follow
/// from its seed and virtual clock, so the newest id was another run); a pasted id too long is
/// refused as one, and quoted short.
#[test]
fn last_is_the_run_begun_last_even_a_simulation() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ev.db");
    cli(&db)
        .arg("run")
        .arg(examples().join("hello.yaml"))
        .assert()
        .success();
    let out = cli(&db)
        .args([
            "simulate", "--agents", "2", "--tasks", "10", "--seed", "4", "--log", "store", "--json",
        ])
        .output()
        .unwrap();
    let sim = succeeded(&out)["run_id"].as_str().unwrap().to_string();
    cli(&db)
        .args(["replay", "last"])
        .assert()
        .success()
        .stdout(predicate::str::contains(format!("replay of run {sim}")));
    let long = "a".repeat(40);
    cli(&db)
        .args(["runs", "show", &long])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("invalid run id"));
    let huge = "z".repeat(100_000);
    let out = cli(&db).args(["runs", "show", &huge]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr.len() < 400,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A run whose start the log no longer shows (here the run index leaves its first frame out)
/// is named with the place, and sent to `audit verify`, which names the damage.
#[test]
fn a_run_without_its_start_is_named_with_its_place() {
    let (_dir, db, out) = hello_run();
    let id = succeeded(&out)["run_id"].as_str().unwrap().to_string();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let frames: i64 = conn
        .query_row("SELECT count(*) FROM frames", [], |r| r.get(0))
        .unwrap();
    assert!(frames > 1, "the run should span frames");
    conn.execute_batch(
        "DROP TRIGGER frame_runs_append_only_delete; \
         DELETE FROM frame_runs WHERE first_seq = (SELECT min(first_seq) FROM frames);",
    )
    .unwrap();
    drop(conn);
    cli(&db).args(["replay", &id]).assert().code(1).stderr(
        predicate::str::contains(format!("run {id}: its first event in the log is"))
            .and(predicate::str::contains("audit verify")),
    );
    cli(&db)
        .args(["audit", "verify"])
        .assert()
        .code(1)
        .stdout(predicate::str::contains("the run index lists 0 run(s)"));
}

/// `bench workforce --quick --only simulator --json [EXTRA]` against `db`: its one section.
fn bench_simulator(db: &Path, extra: &[&str]) -> Value {
    let out = cli(db)
        .args([
            "bench",
            "workforce",
            "--quick",
            "--only",
            "simulator",
            "--json",
        ])
        .args(extra)
        .output()
        .unwrap();
    let report = succeeded(&out);
    let sections: Vec<&String> = report.as_object().unwrap().keys().collect();
    assert_eq!(sections, ["simulator_layered_1000_agents"]);
    report["simulator_layered_1000_agents"].clone()
}

/// The live part's plain report: the commits line says how many (a number, not the JSON the
/// report's store section holds).
#[test]
fn bench_workforce_live_prints_its_commits() {
    let dir = tempfile::tempdir().unwrap();
    let out = cli(&dir.path().join("ev.db"))
        .args(["bench", "workforce", "--quick", "--only", "live"])
        .output()
        .unwrap();
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("durable commits"))
        .unwrap_or_else(|| panic!("{text}"));
    let commits = line
        .trim()
        .split(' ')
        .nth(3)
        .and_then(|n| n.parse::<u64>().ok());
    assert!(commits.is_some_and(|n| n > 0), "{line}");
    // The same run again in the same process, warm, beside the cold first one.
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("again, warm: wall ")),
        "{text}"
    );
    #[cfg(unix)]
    assert!(
        text.lines()
            .any(|l| l.contains("process CPU per agent: ") && l.matches(" µs").count() == 3),
        "{text}"
    );
}

/// `bench workforce --only simulator` runs that part alone: its section and no other, the same
/// simulated run's hash whatever log it went to. A part that does not exist is a usage error.
#[test]
fn bench_workforce_runs_one_part_with_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ev.db");
    let sim = bench_simulator(&db, &[]);
    for log in ["baseline_no_log", "memory_log", "store"] {
        assert_eq!(sim[log]["tasks"], 10_000, "{log}");
        assert_eq!(sim[log]["events"], 40_003, "{log}");
        assert_eq!(sim[log]["log_hash"], sim["store"]["log_hash"], "{log}");
    }
    assert_eq!(sim["store_encrypted"], false);
    assert!(
        sim["store_threads_per_task"]["writer_cpu_ns"]
            .as_f64()
            .is_some_and(|ns| ns > 0.0)
    );
    // Against an encrypted store (sealed by the store's sealer thread): the same events.
    let enc = bench_simulator(&dir.path().join("enc.db"), &["--encrypted"]);
    assert_eq!(enc["store_encrypted"], true);
    assert_eq!(enc["store"]["log_hash"], sim["store"]["log_hash"]);
    assert_eq!(enc["store"]["events"], 40_003);
    cli(&db)
        .args(["bench", "workforce", "--only", "everything"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("everything"));
}

#[test]
fn a_run_killed_with_sigkill_resumes_without_redoing_completed_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ev.db");
    let flow = dir.path().join("chain.yaml");
    let out_file = dir.path().join("out.txt");
    let mut yaml = String::from("name: chain\ntasks:\n");
    for i in 0..8 {
        let needs = if i == 0 {
            String::new()
        } else {
            format!(", needs: [s{}]", i - 1)
        };
        yaml.push_str(&format!("  - {{ id: s{i}, tool: sleep, args: {{ ms: 250 }}, retry: {{ backoff: 1ms }}{needs} }}\n"));
    }
    // A path relative to the folder the run started in, where `resume` goes on from anywhere.
    yaml.push_str(
        "  - { id: write, tool: write_file, needs: [s7], args: { path: out.txt, text: \"done\" }, retry: { backoff: 1ms } }\n",
    );
    std::fs::write(&flow, yaml).unwrap();

    // The gateway's default policy lets `write_file` write inside the workspace, which is the
    // working directory: the temporary directory here.
    let mut child = spawn_run(&db, &flow, dir.path(), false);
    // Wait until two tasks are done.
    let run_id = wait_for(&db, |all| {
        let done: Vec<_> = all
            .iter()
            .filter(|e| e.kind == EventKind::TaskCompleted)
            .collect();
        (done.len() >= 2).then(|| done[0].run_id)
    });
    // While the first process drives the run, it is listed as running, and resuming it is
    // refused, naming that process: two drivers would run its tools twice.
    cli(&db)
        .args(["runs", "show", &run_id.to_string()])
        .assert()
        .success()
        .stdout(predicate::str::contains("status:   running"));
    replay_says(
        &db,
        &run_id.to_string(),
        "(running, not finished: another process is driving it)",
    );
    cli(&db)
        .current_dir(dir.path())
        .args(["resume", &run_id.to_string()])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(format!(
            "run {run_id} is being driven by process {}",
            child.id()
        )));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = events(&db, run_id);
    assert!(
        before.iter().all(|e| e.kind != EventKind::RunCompleted),
        "killed too late"
    );
    let completed_before: Vec<_> = before
        .iter()
        .filter(|e| e.kind == EventKind::TaskCompleted)
        .map(|e| e.task_id)
        .collect();

    cli(&db)
        .args(["runs", "list"])
        .assert()
        .success()
        .stdout(predicate::str::contains("interrupted"));
    // Nothing runs the tasks that were in flight: `runs show` says they were interrupted.
    let statuses = task_statuses(&db, run_id);
    let statuses: Vec<&str> = statuses.iter().map(String::as_str).collect();
    let ended = |k: EventKind| matches!(k, EventKind::TaskCompleted | EventKind::TaskFailed);
    let in_flight = before
        .iter()
        .filter(|e| e.kind == EventKind::TaskStarted)
        .any(|s| {
            !before
                .iter()
                .any(|e| ended(e.kind) && e.task_id == s.task_id)
        });
    assert!(!statuses.contains(&"running"), "{statuses:?}");
    assert_eq!(statuses.contains(&"interrupted"), in_flight, "{statuses:?}");
    replay_says(
        &db,
        &run_id.to_string(),
        "(interrupted, not finished: resume it)",
    );
    // The run recorded the folder it started in; resumed from another, it goes on there.
    let created = &before[0];
    assert_eq!(created.kind, EventKind::RunCreated);
    assert_eq!(
        created.payload["labels"]["workspace"]
            .as_str()
            .map(PathBuf::from),
        Some(std::env::current_dir().unwrap().join(dir.path()))
    );
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let out = cli(&db)
        .current_dir(&elsewhere)
        .args(["resume", &run_id.to_string(), "--json"])
        .output()
        .unwrap();
    let outcome = succeeded(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resume: in "),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(outcome["status"], "completed");
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), "done");
    assert!(!elsewhere.join("out.txt").exists());
    // The same outcome as a run that was never interrupted.
    let db2 = dir.path().join("uninterrupted.db");
    let out2 = cli(&db2)
        .current_dir(dir.path())
        .arg("run")
        .arg(&flow)
        .arg("--json")
        .output()
        .unwrap();
    assert_eq!(succeeded(&out2)["outputs"], outcome["outputs"]);

    let after = events(&db, run_id);
    for t in completed_before {
        let starts = after
            .iter()
            .filter(|e| e.kind == EventKind::TaskStarted && e.task_id == t)
            .count();
        assert_eq!(starts, 1, "a task completed before the kill ran again");
    }
    assert!(after.iter().any(|e| e.kind == EventKind::RunResumed));
    replay_says(
        &db,
        &run_id.to_string(),
        outcome["log_hash"].as_str().unwrap(),
    );
}

#[test]
fn a_graph_too_large_for_one_event_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ev.db");
    // A 1 MB string used twenty times: a small file whose recorded graph is 20 MB.
    let flow = dir.path().join("aliases.yaml");
    let mut args = format!("s0: &s \"{}\"", "x".repeat(1 << 20));
    for i in 1..20 {
        args.push_str(&format!(", s{i}: *s"));
    }
    std::fs::write(
        &flow,
        format!("tasks:\n  - {{ id: a, tool: noop, args: {{ {args} }} }}\n"),
    )
    .unwrap();
    cli(&db)
        .arg("run")
        .arg(&flow)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(format!(
            "task graph {}: the run would record it as",
            flow.display()
        )))
        .stderr(predicate::str::contains("over the event log's limit"));
    assert!(!db.exists(), "no database for a graph that cannot run");
}

/// `resume RUN_ID` from `cwd`, which must be refused (exit 1); its standard error.
/// Replays `run_id` and checks what it prints (a log hash, or why the run cannot be replayed).
/// Each task's status in `runs show RUN_ID --json`, in its order.
fn task_statuses(db: &Path, run_id: RunId) -> Vec<String> {
    let shown = cli(db)
        .args(["runs", "show", &run_id.to_string(), "--json"])
        .output()
        .unwrap();
    json_of(&shown.stdout)["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"].as_str().unwrap().to_string())
        .collect()
}

fn replay_says(db: &Path, run_id: &str, says: &str) {
    cli(db)
        .args(["replay", run_id])
        .assert()
        .success()
        .stdout(predicate::str::contains(says));
    // An unfinished run's state, `(STATE, not finished: ...)`, is also `--json`'s `status`.
    if let Some(rest) = says.strip_prefix('(')
        && let Some((state, _)) = rest.split_once(", not finished")
    {
        let out = cli(db)
            .args(["replay", run_id, "--json"])
            .assert()
            .success();
        assert_eq!(json_of(&out.get_output().stdout)["status"], state, "{says}");
    }
}

fn resume_refused(db: &Path, cwd: &Path, run_id: RunId) -> String {
    let out = cli(db)
        .current_dir(cwd)
        .args(["resume", &run_id.to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

#[test]
fn resume_refuses_a_vanished_start_folder_and_a_stopped_simulation() {
    use agent_runtime_workforce::{engine::Engine, sim};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ev.db");
    // A run whose process died before its first task, started in a folder since removed.
    let started_in = dir.path().join("gone");
    let graph = agent_runtime_workforce::graph::parse_graph(
        "tasks:\n  - { id: a, tool: echo, args: { text: hi } }\n",
        Path::new("g.yaml"),
    )
    .unwrap();
    let config = dir.path().join("gateway.yaml");
    let labels = [
        ("workspace", started_in.to_str().unwrap()),
        ("gateway_config", config.to_str().unwrap()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let run_id = RunId::from_bytes([7; 16]);
    let t0 = agent_runtime_core::Timestamp::from_unix_nanos(1_800_000_000_000_000_000);
    let created = Engine::created_event_labelled(run_id, &graph, 1, t0, &labels);
    // A simulation stopped with its first task started.
    let cfg = sim::SimConfig::new(10, 100, sim::Shape::Chain, 0.0, 5);
    let sim_id = sim::run_id_of(&cfg);
    let sim_created =
        Engine::created_sim_event(sim_id, &cfg, &sim::synth_graph(&cfg), sim::SIM_EPOCH);
    let mut sim_engine = Engine::create(&sim_created).unwrap();
    let mut appended = vec![created, sim_created];
    appended.extend(sim_engine.drain_events().map(|e| e.to_new_event().unwrap()));
    assert!(
        appended.iter().any(|e| e.kind == EventKind::TaskStarted),
        "the simulation's first task starts with it"
    );
    let store = Store::open(StoreConfig::plaintext(&db)).unwrap();
    store.append_blocking(appended).unwrap();
    drop(store);

    // The gateway configuration it was started with is gone.
    let stderr = resume_refused(&db, dir.path(), run_id);
    assert!(
        stderr.contains(&format!(
            "run {run_id} was started with --config {}, which is gone; pass --config",
            config.display()
        )),
        "{stderr}"
    );
    // Back, it is used; the folder is still gone.
    std::fs::write(&config, "{}\n").unwrap();
    let stderr = resume_refused(&db, dir.path(), run_id);
    for says in [
        format!(
            "resume: with --config {}, as the run ran before",
            config.display()
        ),
        format!(
            "run {run_id} started in {}, which is gone",
            started_in.display()
        ),
    ] {
        assert!(stderr.contains(&says), "{stderr}");
    }
    // --here: it goes on in this folder.
    cli(&db)
        .current_dir(dir.path())
        .args(["resume", &run_id.to_string(), "--here", "--json"])
        .assert()
        .success()
        .stdout(predicate::str::contains("\"completed\""));

    replay_says(
        &db,
        &sim_id.to_string(),
        "(stopped, not finished: the simulation was stopped)",
    );
    let stderr = resume_refused(&db, dir.path(), sim_id);
    assert!(
        stderr.contains(&format!(
            "run {sim_id} is a simulation (seed 5), which is not resumed"
        )),
        "{stderr}"
    );
    // Listed as stopped, not as `interrupted` (whose meaning is "resume it").
    let listed = cli(&db).args(["runs", "list", "--json"]).output().unwrap();
    let listed = json_of(&listed.stdout);
    let sim_row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["run_id"] == sim_id.to_string())
        .unwrap();
    assert_eq!(sim_row["status"], "stopped", "{sim_row}");
    // Its task in flight is stopped with it, not `running`: nothing runs it.
    let statuses = task_statuses(&db, sim_id);
    let statuses: Vec<&str> = statuses.iter().map(String::as_str).collect();
    assert!(!statuses.contains(&"running"), "{statuses:?}");
    assert!(statuses.contains(&"stopped"), "{statuses:?}");
    cli(&db)
        .args(["cancel", &sim_id.to_string()])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "is a simulation, which takes no requests",
        ));
    // A folder whose name is not UTF-8 is recorded as such, and a resume elsewhere is refused
    // rather than going on in the wrong folder.
    use std::os::unix::ffi::OsStrExt;
    let odd = dir.path().join(std::ffi::OsStr::from_bytes(b"odd-\xff"));
    std::fs::create_dir(&odd).unwrap();
    let flow = dir.path().join("one.yaml");
    std::fs::write(&flow, "tasks:\n  - { id: a, tool: echo, args: { x: 1 } }\n").unwrap();
    // (The gateway's default workspace is the current folder, whose name its policy refuses:
    // a configuration names another.)
    std::fs::create_dir(dir.path().join("ws")).unwrap();
    let gw = dir.path().join("gw-ws.yaml");
    std::fs::write(&gw, "workspace: [ws]\n").unwrap();
    cli(&db)
        .current_dir(&odd)
        .arg("run")
        .arg(&flow)
        .arg("--config")
        .arg(&gw)
        .assert()
        .success();
    let store = Store::open(StoreConfig::plaintext(&db).read_only()).unwrap();
    let created = store
        .query_blocking(&EventQuery {
            kinds: vec![EventKind::RunCreated],
            ..EventQuery::default()
        })
        .unwrap()
        .pop()
        .unwrap();
    drop(store);
    let lossy = created.payload["labels"]["workspace_not_utf8"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(lossy.ends_with("odd-\u{fffd}"), "{lossy}");
    let labels = [("workspace_not_utf8".to_string(), lossy)].into();
    let unfinished = RunId::from_bytes([8; 16]);
    let store = Store::open(StoreConfig::plaintext(&db)).unwrap();
    store
        .append_blocking(vec![Engine::created_event_labelled(
            unfinished, &graph, 1, t0, &labels,
        )])
        .unwrap();
    drop(store);
    let stderr = resume_refused(&db, dir.path(), unfinished);
    assert!(
        stderr.contains("a folder whose name is not UTF-8"),
        "{stderr}"
    );
}

/// `--here` and files given to a resume are where the run goes on from then: a later resume
/// goes back there, not to where the run was created. A relative
/// AGENT_RUNTIME_GATEWAY_CONFIG names a file from where `run` ran: the recorded path wins.
#[test]
fn a_later_resume_goes_on_where_the_last_one_did() {
    use agent_runtime_workforce::engine::Engine;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ev.db");
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    std::fs::create_dir(&first).unwrap();
    std::fs::create_dir(&second).unwrap();
    std::fs::write(first.join("gw.yaml"), "{}\n").unwrap();
    // Created in `first` with its gateway file, given through the environment.
    let graph = agent_runtime_workforce::graph::parse_graph(
        "tasks:\n  - { id: w, tool: write_file, args: { path: out.txt, text: hi } }\n",
        Path::new("g.yaml"),
    )
    .unwrap();
    let labels = [
        ("workspace", first.to_str().unwrap().to_string()),
        (
            "gateway_config",
            first.join("gw.yaml").to_str().unwrap().to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let run_id = RunId::from_bytes([9; 16]);
    let t0 = agent_runtime_core::Timestamp::from_unix_nanos(1_800_000_000_000_000_000);
    let store = Store::open(StoreConfig::plaintext(&db)).unwrap();
    store
        .append_blocking(vec![Engine::created_event_labelled(
            run_id, &graph, 1, t0, &labels,
        )])
        .unwrap();
    drop(store);
    // Resumed from `second` with the variable naming `gw.yaml` relative to there (no such
    // file): the recorded file is used, in `first`.
    let out = cli(&db)
        .current_dir(&second)
        .env("AGENT_RUNTIME_GATEWAY_CONFIG", "gw.yaml")
        .args(["resume", &run_id.to_string(), "--here", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resume: with --config"), "{stderr}");
    // `--here`: the file is written in `second`, and `run.resumed` records that.
    assert!(second.join("out.txt").exists() && !first.join("out.txt").exists());
    let resumed = events(&db, run_id)
        .into_iter()
        .find(|e| e.kind == EventKind::RunResumed)
        .unwrap();
    assert_eq!(
        resumed.payload["labels"]["workspace"]
            .as_str()
            .map(PathBuf::from),
        Some(second.clone())
    );
    // With real processes: run in `first`, killed; resumed `--here` in `second`, killed; the
    // next resume, from a third folder, goes on in `second`.
    let db = dir.path().join("killed.db");
    let flow = dir.path().join("slow.yaml");
    std::fs::write(
        &flow,
        "tasks:\n  - { id: s, tool: sleep, args: { ms: 600000 }, retry: { max_attempts: 5, backoff: 1ms } }\n",
    )
    .unwrap();
    let mut child = spawn_run(&db, &flow, &first, false);
    let run_id = wait_for(&db, |all| {
        all.iter()
            .any(|e| e.kind == EventKind::TaskStarted)
            .then(|| all[0].run_id)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let mut resume = std::process::Command::new(assert_cmd::cargo::cargo_bin("agent-runtime"))
        .current_dir(&second)
        .env_remove("AGENT_RUNTIME_DB")
        .env_remove("AGENT_RUNTIME_GATEWAY_CONFIG")
        .arg("--db")
        .arg(&db)
        .args(["--plaintext", "resume", &run_id.to_string(), "--here"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&db, |all| {
        (all.iter()
            .filter(|e| e.kind == EventKind::TaskStarted)
            .count()
            >= 2)
            .then_some(())
    });
    resume.kill().unwrap();
    resume.wait().unwrap();
    cli(&db)
        .args(["cancel", &run_id.to_string()])
        .assert()
        .success();
    let third = dir.path().join("third");
    std::fs::create_dir(&third).unwrap();
    let out = cli(&db)
        .current_dir(&third)
        .args(["resume", &run_id.to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "resume: in {}, where the run ran before",
            second.display()
        )),
        "{stderr}"
    );
}

#[test]
fn cancel_from_another_process_stops_a_subtree_and_replay_agrees() {
    let (dir, db, flow) = flow_in_tempdir(
        "two-branches.yaml",
        "name: two-branches\ntasks:\n\
         - { id: slow, tool: sleep, args: { ms: 600000 } }\n\
         - { id: after-slow, tool: echo, needs: [slow], args: { x: 1 } }\n\
         - { id: side, tool: sleep, needs: [gate], args: { ms: 10 } }\n\
         - { id: gate, tool: sleep, args: { ms: 600000 } }\n",
    );
    let mut child = spawn_run(&db, &flow, dir.path(), true);
    let run_id = wait_for(&db, |all| {
        let started = all
            .iter()
            .filter(|e| e.kind == EventKind::TaskStarted)
            .count();
        (started >= 2).then(|| all[0].run_id)
    });
    let id = run_id.to_string();

    // Bad requests change nothing.
    cli(&db)
        .args(["cancel", &id, "--task", "slo"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no task `slo`").and(predicate::str::contains("slow")));
    cli(&db).args(["cancel", "not-a-run-id"]).assert().code(2);

    cli(&db)
        .args(["cancel", &id, "--task", "slow", "--reason", "too slow"])
        .args(PATIENT)
        .assert()
        .success()
        // `cancel` waits to see the running process carry it out.
        .stdout(predicate::str::starts_with(format!(
            "cancelled task `slow` and everything downstream of it in run {id} (request: event "
        )));
    // The run goes on with the other branch until it is cancelled too.
    wait_for(&db, |all| {
        all.iter()
            .any(|e| e.kind == EventKind::TaskCancelled && e.payload.get("request").is_none())
            .then_some(())
    });
    // Asked again: already done, nothing recorded.
    cli(&db)
        .args(["cancel", &id, "--task", "slow"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "is already cancelled; nothing to cancel",
        ));
    cli(&db)
        .args(["cancel", &id, "--reason", "enough"])
        .args(PATIENT)
        .assert()
        .success()
        .stdout(predicate::str::starts_with(format!(
            "cancelled run {id} (request: event "
        )));
    // Once it ended, a request is refused before it is recorded.
    cli(&db)
        .args(["cancel", &id])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "already ended (cancelled); nothing to cancel",
        ));
    let status = wait_exit(&mut child);
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(!status.success(), "a cancelled run exits non-zero");
    let outcome = json_of(stdout.as_bytes());
    assert_eq!(outcome["status"], "cancelled");
    // Why, and by whom, as `runs show` says it.
    assert!(
        outcome["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("enough (person:")),
        "{outcome}"
    );
    assert_eq!(task_status(&outcome, "slow"), "cancelled");
    assert_ne!(task_status(&outcome, "after-slow"), "completed");

    // Both requests and the run's answers are in the log, by a person.
    let logged = events(&db, run_id);
    assert_eq!(
        logged
            .iter()
            .filter(|e| e.kind == EventKind::RunCancelRequested)
            .count(),
        2
    );
    assert!(logged.iter().any(|e| e.kind == EventKind::TaskCancelled
        && matches!(e.actor, agent_runtime_core::Actor::Person(_))));
    // The task's reason reaches `runs show`, after what it was cancelled with.
    cli(&db)
        .args(["runs", "show", &id])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "cancelled with `slow` and its subtree: too slow",
        ));
    replay_says(&db, &id, outcome["log_hash"].as_str().unwrap());
    // An ended run cannot be cancelled.
    cli(&db)
        .args(["cancel", &id])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("already ended"));
}

#[test]
fn cancelling_below_an_ended_task_says_so_and_the_run_exits_1() {
    let (dir, db, flow) = flow_in_tempdir(
        "chain.yaml",
        "tasks:\n\
         - { id: a, tool: sleep, args: { ms: 1 } }\n\
         - { id: b, tool: sleep, needs: [a], args: { ms: 600000 } }\n\
         - { id: c, tool: echo, needs: [b], args: { x: 1 } }\n",
    );
    let mut child = spawn_run(&db, &flow, dir.path(), true);
    let run_id = wait_for(&db, |all| {
        let started = all
            .iter()
            .filter(|e| e.kind == EventKind::TaskStarted)
            .count();
        (started >= 2).then(|| all[0].run_id)
    });
    cli(&db)
        .args(["cancel", &run_id.to_string(), "--task", "a"])
        .args(PATIENT)
        .assert()
        .success()
        .stdout(predicate::str::starts_with(format!(
            "cancelled what is downstream of task `a` (which already ended: completed) in run \
             {run_id} (request: event "
        )));
    let status = wait_exit(&mut child);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    // The run completes (its every task ended), but what `b` and `c` would give is missing.
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "run {run_id} completed with 2 tasks cancelled (`b`, `c`): their outputs are missing"
        )),
        "{stderr}"
    );
}

/// A log that a newer build wrote (an event of a kind this build does not know, under a run)
/// is still listed, shown, tailed, verified and exported; replay (and resume) refuse the run
/// by naming the event, rather than replaying past what they cannot judge.
#[test]
fn a_run_with_an_event_kind_from_a_newer_build_is_read_and_not_replayed() {
    let (_dir, db, out) = hello_run();
    let run_id: RunId = succeeded(&out)["run_id"].as_str().unwrap().parse().unwrap();
    let id = run_id.to_string();
    let newer = EventKind::read("task.handed_over").unwrap();
    let store = Store::open(StoreConfig::plaintext(&db)).unwrap();
    let appended = store
        .append_blocking(vec![agent_runtime_core::NewEvent {
            run_id,
            task_id: None,
            actor: agent_runtime_core::Actor::System,
            kind: newer,
            time: agent_runtime_core::Timestamp::from_unix_nanos(1_900_000_000_000_000_000),
            payload: serde_json::json!({ "to": "agent:other" }),
        }])
        .unwrap();
    let seq = appended[0].seq;
    drop(store);

    cli(&db)
        .args(["runs", "list"])
        .assert()
        .success()
        .stdout(predicate::str::contains(&id));
    cli(&db)
        .args(["runs", "show", &id])
        .assert()
        .success()
        .stdout(predicate::str::contains("sentence"));
    cli(&db)
        .args(["audit", "tail", "--run", &id])
        .assert()
        .success()
        .stdout(predicate::str::contains("task.handed_over"));
    cli(&db).args(["audit", "verify"]).assert().success();
    let exported = cli(&db)
        .args(["audit", "export", "--format", "jsonl", "--run", &id])
        .output()
        .unwrap();
    assert!(exported.status.success());
    assert!(String::from_utf8_lossy(&exported.stdout).contains("\"task.handed_over\""));
    // (Resume reads the run through the same reader, after it checked that the run goes on.)
    cli(&db)
        .args(["replay", &id])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(format!(
            "holds an event of kind `task.handed_over` (seq {seq}), which this build does not know"
        )));
    // What people type is still checked strictly.
    cli(&db)
        .args(["audit", "tail", "--kind", "task.handed_over"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("unknown event kind"));
}

#[test]
fn cancel_with_wait_0_records_the_request_and_returns_at_once() {
    let (dir, db, flow) = flow_in_tempdir(
        "slow.yaml",
        "tasks:\n- { id: slow, tool: sleep, args: { ms: 600000 } }\n",
    );
    let mut child = spawn_run(&db, &flow, dir.path(), true);
    let run_id = wait_for(&db, |all| {
        all.iter()
            .any(|e| e.kind == EventKind::TaskStarted)
            .then(|| all[0].run_id)
    });
    let id = run_id.to_string();
    // Out of range: refused before anything is recorded.
    cli(&db)
        .args(["cancel", &id, "--wait", "3601"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--wait"));
    cli(&db)
        .args(["cancel", &id, "--wait", "0"])
        .assert()
        .success()
        .stdout(predicate::str::starts_with(format!(
            "asked run {id} to cancel the run (event "
        )))
        .stdout(predicate::str::contains(
            "the process running it records the cancellation",
        ));
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(1));
    let requests = events(&db, run_id)
        .into_iter()
        .filter(|e| e.kind == EventKind::RunCancelRequested)
        .count();
    assert_eq!(requests, 1, "the refused --wait recorded nothing");
    assert!(
        events(&db, run_id)
            .iter()
            .any(|e| e.kind == EventKind::RunCancelled)
    );
}

#[test]
fn a_cancel_requested_while_no_process_drives_the_run_takes_effect_on_resume() {
    let (dir, db, flow) = flow_in_tempdir(
        "stuck.yaml",
        "name: stuck\ntasks:\n\
         - { id: forever, tool: sleep, args: { ms: 600000 }, retry: { backoff: 1ms } }\n\
         - { id: after, tool: echo, needs: [forever], args: {} }\n\
         - { id: other, tool: echo, args: { done: true } }\n",
    );
    let mut child = spawn_run(&db, &flow, dir.path(), false);
    let run_id = wait_for(&db, |all| {
        all.iter()
            .any(|e| e.kind == EventKind::TaskCompleted)
            .then(|| all[0].run_id)
    });
    child.kill().unwrap(); // SIGKILL: nobody drives the run now
    child.wait().unwrap();
    let id = run_id.to_string();
    cli(&db)
        .args(["cancel", &id, "--task", "forever"])
        .assert()
        .success()
        .stdout(predicate::str::contains(format!(
            "no process runs it now: the cancellation takes effect when it is resumed (`agent-runtime resume {id}`)"
        )));
    // Without the request, resume would retry `forever` and wait ten minutes.
    // It completes, without the cancelled tasks' outputs: exit 1.
    let out = cli(&db).args(["resume", &id, "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let outcome = json_of(&out.stdout);
    assert_eq!(outcome["status"], "completed");
    assert_eq!(task_status(&outcome, "forever"), "cancelled");
    assert_eq!(task_status(&outcome, "after"), "cancelled");
    assert_eq!(task_status(&outcome, "other"), "completed");
    // The request acted as the run resumed, before anything started and before the attempts in
    // flight were interrupted: `forever`, in flight when the process died, was not started
    // again (its retry policy would have), and no tool call began after the resume.
    let all = events(&db, run_id);
    let resumed = all
        .iter()
        .position(|e| e.kind == EventKind::RunResumed)
        .unwrap_or(all.len());
    let started_after: Vec<_> = all[resumed..]
        .iter()
        .filter(|e| matches!(e.kind, EventKind::TaskStarted | EventKind::ToolStarted))
        .map(|e| (e.kind, e.payload.clone()))
        .collect();
    assert!(
        started_after
            .iter()
            .all(|(k, _)| *k != EventKind::ToolStarted),
        "{started_after:?}"
    );
    let cancelled = all
        .iter()
        .position(|e| e.kind == EventKind::TaskCancelled && e.payload.get("request").is_some())
        .unwrap();
    assert!(
        cancelled < resumed,
        "the request is recorded before run.resumed, which would have interrupted `forever`"
    );
    assert!(
        started_after
            .iter()
            .all(|(k, _)| *k != EventKind::TaskStarted),
        "{started_after:?}"
    );
    replay_says(&db, &id, outcome["log_hash"].as_str().unwrap());
}

/// `{{ secrets.NAME }}` end to end: `run` reads AGENT_RUNTIME_SECRET_NAME, the tool gets the
/// value, and neither the run's events nor the gateway's audit trail nor the printed outputs
/// hold it; `replay` needs no secret. Without the variable the run is refused, naming it.
#[test]
fn run_fills_secrets_for_the_call_and_records_none() {
    const VALUE: &str = "cli-s3cr3t-9f8e7d";
    let (_dir, db, flow) = flow_in_tempdir(
        "secret.yaml",
        "tasks:\n  - { id: a, tool: echo, args: { text: \"Bearer {{ secrets.TOKEN }}\" } }\n",
    );
    let out = cli(&db)
        .env("AGENT_RUNTIME_SECRET_TOKEN", VALUE)
        .arg("run")
        .arg(&flow)
        .arg("--json")
        .output()
        .unwrap();
    let outcome = succeeded(&out);
    assert_eq!(
        outcome["outputs"]["a"]["text"], "Bearer [REDACTED]",
        "{outcome}"
    );
    let run_id = outcome["run_id"].as_str().unwrap().to_string();
    // Every event of the database: the run's and the gateway's audit trail.
    let store = Store::open(StoreConfig::plaintext(&db).read_only()).unwrap();
    let logged = store.query_blocking(&EventQuery::default()).unwrap();
    drop(store);
    assert!(logged.iter().any(|e| e.kind == EventKind::PolicyDecided));
    // The gateway recorded the arguments the call was made with, masked.
    assert!(
        logged.iter().any(|e| e.kind == EventKind::ToolRequested
            && e.payload["arguments"]["text"] == "Bearer [REDACTED]"),
        "{logged:?}"
    );
    let text = serde_json::to_string(&logged).unwrap();
    assert!(!text.contains(VALUE), "{text}");
    assert!(text.contains("Bearer {{ secrets.TOKEN }}"), "{text}");
    // Nor a digest of the arguments that would confirm a guess of the secret.
    let filled = agent_runtime_core::PolicyEnvelope::digest_arguments(
        &serde_json::json!({ "text": format!("Bearer {VALUE}") }),
    );
    assert!(!text.contains(&filled.to_string()), "{text}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains(VALUE));
    cli(&db)
        .env_remove("AGENT_RUNTIME_SECRET_TOKEN")
        .args(["replay", &run_id])
        .assert()
        .success();
    // Unset, or too short to redact: the run is refused before it starts, at the step that
    // names the secret, and the short value is not printed.
    let before = logged.len();
    cli(&db)
        .env_remove("AGENT_RUNTIME_SECRET_TOKEN")
        .arg("run")
        .arg(&flow)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "tasks[0].args: secret `TOKEN` is not set: set AGENT_RUNTIME_SECRET_TOKEN",
        ));
    cli(&db)
        .env("AGENT_RUNTIME_SECRET_TOKEN", "q7z")
        .arg("run")
        .arg(&flow)
        .assert()
        .code(2)
        .stderr(
            predicate::str::contains("secret `TOKEN` is shorter than 4 bytes")
                .and(predicate::str::contains("q7z").not()),
        );
    let store = Store::open(StoreConfig::plaintext(&db).read_only()).unwrap();
    assert_eq!(
        store.query_blocking(&EventQuery::default()).unwrap().len(),
        before,
        "a refused run recorded events"
    );
}

/// A run whose claim is held elsewhere is refused after the claim's short wait, and that wait
/// happens off the async threads: a task on the same single-threaded runtime keeps running
/// through it.
#[test]
fn a_claim_waits_off_the_async_threads() {
    use agent_runtime_workforce::driver::{self, NoModels, RunOptions};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ev.db");
    let store = Store::open(StoreConfig::plaintext(&db)).unwrap();
    let at = agent_runtime_core::Timestamp::from_unix_nanos(1_767_225_600_000_000_000);
    let held = Store::open(StoreConfig::plaintext(&db))
        .unwrap()
        .claim_run(agent_runtime_workforce::engine::run_id_for(7, at))
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let err = rt.block_on(async {
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(2)).await;
                t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let graph = agent_runtime_workforce::graph::parse_graph(
            "tasks:\n  - { id: a, tool: echo, args: {} }\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        let opts = RunOptions {
            seed: 7,
            sink: std::sync::Arc::new(store.clone()),
            clock: std::sync::Arc::new(agent_runtime_core::ManualClock::new(at)),
            tools: std::sync::Arc::new(
                agent_runtime_workforce::tools::ToolRegistry::with_native_tools(),
            ),
            models: std::sync::Arc::new(NoModels),
            observer: None,
            secrets: std::sync::Arc::new(agent_runtime_core::NoSecrets),
            labels: Default::default(),
        };
        let err = driver::run_graph(graph, opts).await.unwrap_err();
        ticker.abort();
        err
    });
    drop(held);
    assert!(err.to_string().contains("is being driven by"), "{err}");
    // The claim waits about 100 ms before it gives up: the ticker ran meanwhile. On this
    // one-thread runtime a claim that blocked the thread would leave it no tick at all; asking
    // for one, not for the ~50 the wait allows, keeps the test clear of a busy machine's timing.
    let n = ticks.load(std::sync::atomic::Ordering::Relaxed);
    assert!(n >= 1, "the runtime was blocked: {n} ticks");
}

/// A run can be named by its whole id, by `last`, or by a prefix only it has; an ambiguous or
/// unknown prefix is a usage error that says so.
#[test]
fn runs_are_named_by_last_or_a_unique_prefix() {
    let (_dir, db, flow) =
        flow_in_tempdir("p.yaml", "tasks:\n  - { id: a, tool: echo, args: {} }\n");
    let mut ids = Vec::new();
    for seed in ["1", "2"] {
        let out = cli(&db)
            .arg("run")
            .arg(&flow)
            .args(["--seed", seed, "--json"])
            .output()
            .unwrap();
        ids.push(succeeded(&out)["run_id"].as_str().unwrap().to_string());
        // Another millisecond, so that the ids sort in creation order.
        std::thread::sleep(Duration::from_millis(2));
    }
    let show = |name: &str| {
        let out = cli(&db)
            .args(["runs", "show", name, "--json"])
            .output()
            .unwrap();
        succeeded(&out)["run_id"].as_str().unwrap().to_string()
    };
    assert_eq!(show("last"), ids[1]);
    // The random tail tells the two apart: the whole id less its last character is unique.
    let whole = &ids[0];
    assert_eq!(show(&whole[..whole.len() - 1]), ids[0]);
    assert_eq!(show(&whole.replace('-', "")[..30].to_uppercase()), ids[0]);
    // What both ids start with (at least the first several digits: the creation time).
    let common: String = ids[0]
        .chars()
        .zip(ids[1].chars())
        .take_while(|(a, b)| a == b)
        .map(|(a, _)| a)
        .collect();
    assert!(common.len() >= 4, "{ids:?}");
    cli(&db)
        .args(["runs", "show", &common])
        .assert()
        .code(2)
        .stderr(
            predicate::str::contains("matches 2 runs")
                .and(predicate::str::contains("give more of it")),
        );
    cli(&db)
        .args(["replay", "ffffffff"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no run ffffffff in the event log"));
    cli(&db)
        .args(["runs", "show", "abc"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "4 to 32 of its first hex digits, or `last`",
        ));
    cli(&db).args(["replay", "last"]).assert().success();
    // The audit commands' `--run` takes the same names.
    let exported_runs = |run: &str| {
        let out = cli(&db)
            .args(["audit", "export", "--format", "jsonl", "--run", run])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let runs: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let e: Value = serde_json::from_str(l).unwrap();
                e["run_id"].as_str().unwrap().to_string()
            })
            .collect();
        runs.into_iter().collect::<Vec<_>>()
    };
    assert_eq!(exported_runs("last"), [ids[1].clone()]);
    assert_eq!(exported_runs(&whole[..13]), [ids[0].clone()]);
    cli(&db)
        .args(["audit", "tail", "--run", &common])
        .assert()
        .code(2)
        .stderr(
            predicate::str::starts_with("error: --run: run id")
                .and(predicate::str::contains("matches 2 runs")),
        );
}

/// Without `--seed` each run draws a random seed and records it: two runs started together
/// cannot draw the same id (a fixed default did, within one millisecond), and `runs show`
/// tells the seed to replay the run with.
#[test]
fn runs_without_a_seed_get_their_own_and_record_it() {
    let (dir, db, flow) =
        flow_in_tempdir("s.yaml", "tasks:\n  - { id: a, tool: echo, args: {} }\n");
    let children: Vec<_> = (0..2)
        .map(|_| spawn_run(&db, &flow, dir.path(), true))
        .collect();
    let mut seeds = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let run_id = succeeded(&out)["run_id"].as_str().unwrap().to_string();
        let shown = cli(&db)
            .args(["runs", "show", &run_id, "--json"])
            .output()
            .unwrap();
        seeds.push(succeeded(&shown)["seed"].as_u64().unwrap());
    }
    assert_ne!(seeds[0], seeds[1]);
}

/// Text from a graph, a tool or the log reaches the terminal with its control characters
/// escaped: a name or a tool's message with a newline, ESC or a C1 control neither breaks a
/// line or a table nor sends escape sequences to the terminal.
#[test]
fn control_characters_from_graphs_and_tools_are_printed_escaped() {
    const GRAPH: &str = r#"name: "line1\nline2\u001b[31mRED"
tasks:
  - id: broken
    tool: fail
    args: { message: "bad\nline\u001b[2Jend" }
    on_failure: skip
  - id: said
    tool: echo
    args: { text: "csi\u009b31m" }
"#;
    const NAME: &str = r"line1\nline2\u{1b}[31mRED";
    const MESSAGE: &str = r"bad\nline\u{1b}[2Jend";
    let (_dir, db, flow) = flow_in_tempdir("controls.yaml", GRAPH);
    // No ESC, and no C1 control (U+0080..U+009F is 0xC2 0x80..0x9F in UTF-8).
    let printable = |what: &str, bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        assert!(!bytes.contains(&0x1b), "{what} printed ESC: {text:?}");
        assert!(
            !text.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c)),
            "{what} printed a C1 control: {text:?}"
        );
        text.into_owned()
    };
    let out = cli(&db).arg("run").arg(&flow).output().unwrap();
    assert_ok(&out);
    let stdout = printable("run's stdout", &out.stdout);
    let stderr = printable("run's stderr", &out.stderr);
    assert!(stdout.contains(r"csi\u{9b}31m"), "{stdout}");
    assert!(
        stderr.contains(&format!("task broken: failed (tool_error: {MESSAGE})\n")),
        "{stderr}"
    );

    let out = cli(&db).args(["runs", "list"]).output().unwrap();
    assert_ok(&out);
    let list = printable("runs list", &out.stdout);
    assert_eq!(list.lines().count(), 2, "{list}");
    assert!(list.contains(NAME), "{list}");

    let out = cli(&db).args(["runs", "show", "last"]).output().unwrap();
    assert_ok(&out);
    let show = printable("runs show", &out.stdout);
    assert!(show.contains(&format!("name:     {NAME}\n")), "{show}");
    let row = show
        .lines()
        .find(|l| l.starts_with("broken "))
        .unwrap_or_else(|| panic!("no row for `broken`: {show}"));
    assert!(row.contains(MESSAGE), "{show}");

    // The JSON output keeps the text as it was.
    let out = cli(&db)
        .args(["runs", "show", "last", "--json"])
        .output()
        .unwrap();
    assert_eq!(succeeded(&out)["name"], "line1\nline2\u{1b}[31mRED");

    // A run that fails on the message: its `error:` line and `runs show`'s are escaped too.
    std::fs::write(&flow, GRAPH.replace("    on_failure: skip\n", "")).unwrap();
    let out = cli(&db).arg("run").arg(&flow).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    printable("failed run's stdout", &out.stdout);
    let stderr = printable("failed run's stderr", &out.stderr);
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(error.contains(MESSAGE), "{stderr}");
    let out = cli(&db).args(["runs", "show", "last"]).output().unwrap();
    assert_ok(&out);
    let show = printable("runs show of the failed run", &out.stdout);
    let error = show
        .lines()
        .find(|l| l.starts_with("error:    "))
        .unwrap_or_else(|| panic!("no error line: {show}"));
    assert!(error.contains(MESSAGE), "{show}");

    // `audit tail` prints an event a line: the payload's JSON escapes C0, the C1 is escaped.
    let out = cli(&db)
        .args(["audit", "tail", "-n", "100"])
        .output()
        .unwrap();
    assert_ok(&out);
    let tail = printable("audit tail", &out.stdout);
    assert!(tail.contains(r"csi\u{9b}31m"), "{tail}");
}

/// A run whose log fails under it (its disk is full) stops with one line that names the run and
/// how to go on with it: without `--json`, its id would otherwise be printed only at its end.
/// The disk is a small tmpfs in a mount namespace of the command's own (needs root, as CI has:
/// elsewhere the test fails saying so, rather than pass having checked nothing).
#[test]
fn a_run_stopped_by_its_log_names_itself_for_resume() {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test mounts a small tmpfs in a mount namespace of its own, which needs root (the \
         README's test command runs as root, as CI does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mut graph = String::from("name: fills\ntasks:\n");
    for i in 0..60 {
        graph.push_str(&format!(
            "  - {{ id: t{i}, tool: echo, args: {{ text: \"{}\" }} }}\n",
            "x".repeat(3000)
        ));
    }
    let flow = write_flow(dir.path(), "fills.yaml", &graph);
    let bin = assert_cmd::cargo::cargo_bin("agent-runtime");
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size=600k tmpfs "$1" && exec "$2" --db "$1/e.db" --plaintext run "$3""#)
        .arg("sh")
        .arg(&small)
        .arg(&bin)
        .arg(&flow)
        .env_remove("AGENT_RUNTIME_DB")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: run ")
            && last.contains(" stopped (resumable: `agent-runtime resume ")
            && last.contains("database or disk is full"),
        "{stderr}"
    );
}

/// A write past the file size limit (`ulimit -f`) stops the run with an error line that names
/// the limit and what the resume will do with the tasks running (it ended the process with
/// SIGXFSZ, exit 153 and no message); the resume, without the limit, finishes the run.
#[test]
fn a_run_stopped_by_the_file_size_limit_says_so_and_resumes() {
    let mut yaml = String::from("tasks:\n");
    for i in 0..300 {
        yaml.push_str(&format!(
            "  - {{id: t{i}, tool: echo, args: {{text: '{}'}}, retry: {{max_attempts: 3, backoff: 1ms}}}}\n",
            "x".repeat(300)
        ));
    }
    let (_dir, db, flow) = flow_in_tempdir("many.yaml", &yaml);
    let bin = assert_cmd::cargo::cargo_bin("agent-runtime");
    // bash: its `ulimit -f` counts KiB (a POSIX sh may count 512-byte blocks).
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(r#"ulimit -f 256 && exec "$0" --db "$1" --plaintext run "$2""#)
        .arg(&bin)
        .arg(&db)
        .arg(&flow)
        .env_remove("AGENT_RUNTIME_DB")
        .env("XDG_DATA_HOME", data_home(&db))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: run "), "{stderr}");
    for part in [
        "stopped (resumable: `agent-runtime resume",
        "count as interrupted there",
        "(this process may not write past 262144 bytes of a file (`ulimit -f`))",
    ] {
        assert!(last.contains(part), "{part:?} missing: {stderr}");
    }
    let outcome = succeeded(
        &cli(&db)
            .args(["resume", "last", "--json"])
            .output()
            .unwrap(),
    );
    assert_eq!(outcome["status"], "completed", "{outcome}");
    assert_eq!(task_status(&outcome, "t299"), "completed");
}

/// `resume` and `cancel` of a run that ended refuse it from its end event, naming how it ended.
#[test]
fn resume_and_cancel_refuse_an_ended_run() {
    let (_dir, db, out) = hello_run();
    let run_id = json_of(&out.stdout)["run_id"].as_str().unwrap().to_string();
    for (args, says) in [
        (
            vec!["resume", run_id.as_str()],
            "already ended (completed); nothing to resume",
        ),
        (
            vec!["cancel", run_id.as_str()],
            "already ended (completed); nothing to cancel",
        ),
    ] {
        cli(&db)
            .args(&args)
            .assert()
            .code(1)
            .stderr(predicate::str::contains(format!("run {run_id} {says}")));
    }
}

/// `runs show --status` keeps the table to the tasks in those states and says how many of all
/// it shows; an unknown state is refused with the closest one.
#[test]
fn runs_show_lists_only_the_tasks_in_the_states_asked_for() {
    let (dir, db, flow) = flow_in_tempdir(
        "mixed.yaml",
        "tasks:
  - {id: fine, tool: echo, args: {text: ok}}
  - {id: also_fine, tool: echo, args: {text: ok}}
  - {id: broken, tool: read_file, args: {path: missing.txt}, on_failure: skip}
",
    );
    let out = cli(&db)
        .current_dir(dir.path())
        .arg("run")
        .arg(&flow)
        .output()
        .unwrap();
    assert_ok(&out);
    let shown = cli(&db)
        .args(["runs", "show", "last", "--status", "skipped"])
        .output()
        .unwrap();
    assert_ok(&shown);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("tasks:    1 of 3 (skipped)"), "{text}");
    assert!(
        text.contains("broken") && !text.contains("also_fine"),
        "{text}"
    );
    let json = succeeded(
        &cli(&db)
            .args([
                "runs",
                "show",
                "last",
                "--status",
                "completed,failed",
                "--json",
            ])
            .output()
            .unwrap(),
    );
    let ids: Vec<&str> = json["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["fine", "also_fine"]);
    cli(&db)
        .args(["runs", "show", "last", "--status", "complete"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "--status: unknown task state `complete` (did you mean `completed`?)",
        ));
}
