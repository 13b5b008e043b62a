//! Runs through the live driver on paused tokio time: templates, every failure policy, limits,
//! determinism, replay, resume after a crash, cancellation and the agent loop.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::{
    Actor, CancellationToken, Envelope, EventKind, MemoryLog, TaskId, Timestamp,
};
use agent_runtime_workforce::driver::{self, ControlRequest, DriverError, RunOptions, TokioClock};
use agent_runtime_workforce::engine::{Engine, RunStatus, TaskStatus};
use agent_runtime_workforce::state::{RunSummary, check_limits};
use common::*;
use serde_json::json;

/// A run's options on the paused tokio clock from `T0`, seed 1, with the scripted models.
fn opts_at_t0(
    sink: Arc<dyn agent_runtime_core::EventSink>,
    tools: Arc<dyn driver::ToolInvoker>,
) -> RunOptions {
    RunOptions {
        seed: 1,
        sink,
        clock: Arc::new(TokioClock::new(T0)),
        tools,
        models: models(),
        observer: None,
        secrets: Arc::new(agent_runtime_core::NoSecrets),
        labels: Default::default(),
    }
}

fn name_of(events: &[Envelope], tid: Option<TaskId>) -> String {
    let engine = Engine::create(&events[0].to_new_event()).unwrap();
    tid.and_then(|t| engine.task_name(t).map(String::from))
        .unwrap_or_default()
}

fn count(events: &[Envelope], kind: EventKind, task: &str) -> usize {
    events
        .iter()
        .filter(|e| e.kind == kind && name_of(events, e.task_id) == task)
        .count()
}

fn status_of(out: &driver::Outcome, task: &str) -> TaskStatus {
    out.tasks
        .iter()
        .find(|t| t.id == task)
        .map(|t| t.status)
        .unwrap()
}

#[test]
fn tool_steps_pass_outputs_through_templates() {
    let (out, log) = run(
        graph(
            r#"
tasks:
  - { id: a, tool: echo, args: { text: hello, n: [1, 2] } }
  - { id: b, tool: concat, args: { parts: ["{{ tasks.a.output.text }}", "{{ tasks.a.output.n }}"], sep: " " } }
  - { id: c, tool: echo, needs: [a], args: { whole: "{{ tasks.a.output.n }}" } }
"#,
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(out.outputs["b"], json!({"text": "hello [1,2]"}));
    assert_eq!(out.outputs["c"], json!({"whole": [1, 2]}));
    let ev = events(&log);
    assert_eq!(ev.first().unwrap().kind, EventKind::RunCreated);
    assert_eq!(ev.last().unwrap().kind, EventKind::RunCompleted);
    check_limits(&ev).unwrap();
}

#[test]
fn retries_back_off_exponentially_with_recorded_jitter() {
    let (out, log) = run(
        graph(
            r#"
tasks:
  - id: f
    tool: flaky
    args: { key: f, fail: 2 }
    retry: { max_attempts: 3, backoff: 100ms, jitter: 0.5, on: [tool_error] }
"#,
        ),
        3,
    );
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(out.outputs["f"]["calls"], 3);
    let ev = events(&log);
    let delays: Vec<u64> = ev
        .iter()
        .filter(|e| e.kind == EventKind::TaskRetryScheduled)
        .map(|e| e.payload["delay_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(delays.len(), 2);
    assert!((50..=150).contains(&delays[0]), "{delays:?}");
    assert!((100..=300).contains(&delays[1]), "{delays:?}");
    // Each jitter draw is recorded before the retry it shapes.
    let draws = ev
        .iter()
        .filter(|e| e.kind == EventKind::RandomDrawn)
        .count();
    assert_eq!(draws, 2);
    // The retry really waited: the last attempt started at least the two delays after the first.
    let starts: Vec<_> = ev
        .iter()
        .filter(|e| e.kind == EventKind::TaskStarted)
        .map(|e| e.time)
        .collect();
    let waited = starts[2].saturating_duration_since(starts[0]);
    assert!(
        waited >= Duration::from_millis(delays[0] + delays[1]),
        "{waited:?}"
    );
}

#[test]
fn retries_only_on_named_classes_then_fail_the_run() {
    let (out, log) = run(
        graph(
            r#"
tasks:
  - id: f
    tool: flaky
    args: { key: f, fail: 5, class: invalid_arguments }
    retry: { max_attempts: 3, on: [tool_error, timeout] }
  - { id: after, tool: echo, needs: [f], args: {} }
"#,
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Failed);
    let ev = events(&log);
    assert_eq!(
        count(&ev, EventKind::TaskStarted, "f"),
        1,
        "invalid_arguments is not retried"
    );
    assert_eq!(count(&ev, EventKind::TaskStarted, "after"), 0);
    let failed = ev.iter().find(|e| e.kind == EventKind::RunFailed).unwrap();
    assert_eq!(failed.payload["task"], "f");
    assert_eq!(failed.payload["class"], "invalid_arguments");
    // The outcome says why, as `run.failed` and `runs show` do.
    assert_eq!(
        out.error.unwrap(),
        format!(
            "task `f` failed: invalid_arguments: {}",
            failed.payload["message"].as_str().unwrap()
        )
    );
    assert_eq!(
        RunSummary::fold(&ev).unwrap().error.unwrap(),
        format!(
            "task `f` failed: invalid_arguments: {}",
            failed.payload["message"].as_str().unwrap()
        )
    );
}

#[test]
fn retries_stop_at_max_attempts() {
    let (out, log) = run(
        graph(
            "tasks:\n  - { id: f, tool: flaky, args: { key: f, fail: 9 }, retry: { max_attempts: 4, backoff: 1ms } }\n",
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Failed);
    assert_eq!(count(&events(&log), EventKind::TaskStarted, "f"), 4);
}

#[test]
fn skip_skips_the_subtree_and_the_run_goes_on() {
    let (out, log) = run(
        graph(
            r#"
tasks:
  - { id: bad, tool: fail, args: {}, on_failure: skip }
  - { id: down, tool: echo, needs: [bad], args: {} }
  - { id: downer, tool: echo, needs: [down], args: {} }
  - { id: other, tool: echo, args: { ok: true } }
"#,
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Completed);
    for t in ["bad", "down", "downer"] {
        assert_eq!(status_of(&out, t), TaskStatus::Skipped, "{t}");
    }
    assert_eq!(status_of(&out, "other"), TaskStatus::Completed);
    let ev = events(&log);
    let reason = ev
        .iter()
        .filter(|e| e.kind == EventKind::TaskSkipped)
        .nth(1)
        .unwrap();
    assert_eq!(reason.payload["reason"], "upstream task `bad` was skipped");
}

#[test]
fn continue_with_substitutes_the_output() {
    let (out, _) = run(
        graph(
            r#"
tasks:
  - { id: bad, tool: fail, args: {}, on_failure: { continue_with: { text: default } } }
  - { id: use, tool: echo, args: { got: "{{ tasks.bad.output.text }}" } }
"#,
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(out.outputs["use"], json!({"got": "default"}));
}

/// Arguments rendered past what a call's event may record fail the attempt as
/// `invalid_arguments` (the failure policy decides), instead of an event the log refuses, which
/// would stop the run at every resume.
#[test]
fn arguments_rendered_too_large_fail_the_attempt() {
    let mib = "x".repeat(1024 * 1024);
    let parts = vec!["{{ tasks.big.output.text }}"; 16].join("\", \"");
    let (out, log) = run(
        graph(&format!(
            r#"
tasks:
  - {{ id: big, tool: fail, args: {{}}, on_failure: {{ continue_with: {{ text: "{mib}" }} }} }}
  - {{ id: huge, tool: concat, args: {{ parts: ["{parts}"] }}, on_failure: skip }}
  - {{ id: fine, tool: echo, args: {{ n: 1 }}, needs: [big] }}
"#
        )),
        1,
    );
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(status_of(&out, "huge"), TaskStatus::Skipped);
    assert_eq!(status_of(&out, "fine"), TaskStatus::Completed);
    let failed = events(&log)
        .into_iter()
        .find(|e| e.kind == EventKind::TaskFailed && e.payload["class"] == "invalid_arguments")
        .expect("the attempt's failure");
    let message = failed.payload["message"].as_str().unwrap();
    assert!(
        message.contains("16777") && message.contains("15728640"),
        "{message}"
    );
    // Nothing recorded the arguments.
    assert_eq!(count(&events(&log), EventKind::ToolRequested, "huge"), 0);
}

#[test]
fn fallback_runs_in_place_and_unused_fallbacks_are_skipped() {
    let (out, log) = run(
        graph(
            r#"
tasks:
  - { id: primary, tool: fail, args: {}, on_failure: { fallback: backup } }
  - { id: backup, tool: echo, args: { from: backup } }
  - { id: use, tool: echo, args: { got: "{{ tasks.primary.output.from }}" } }
  - { id: fine, tool: echo, args: {}, on_failure: { fallback: spare } }
  - { id: spare, tool: echo, args: {} }
"#,
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(out.outputs["use"], json!({"got": "backup"}));
    assert_eq!(status_of(&out, "primary"), TaskStatus::Completed);
    assert_eq!(status_of(&out, "spare"), TaskStatus::Skipped);
    assert_eq!(count(&events(&log), EventKind::TaskStarted, "spare"), 0);
}

/// A long chain of fallbacks (each task's fallback fails over to the next) completes: the last
/// one's output reaches the first. Completing the chain once recursed a frame per link and
/// overflowed the stack at twenty thousand.
#[test]
fn a_long_fallback_chain_completes() {
    let n = 10_000;
    let mut yaml = format!("limits: {{ max_tasks: {} }}\ntasks:\n", n + 1);
    for i in 0..n {
        yaml.push_str(&format!(
            "  - {{ id: f{i}, tool: fail, args: {{}}, on_failure: {{ fallback: f{} }} }}\n",
            i + 1
        ));
    }
    yaml.push_str(&format!(
        "  - {{ id: f{n}, tool: echo, args: {{ end: true }} }}\n"
    ));
    let (out, _) = run(graph(&yaml), 1);
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(out.outputs["f0"], json!({"end": true}));
    assert_eq!(status_of(&out, "f0"), TaskStatus::Completed);
}

/// A tool call whose audit events the log refused (`audit_unavailable`: a full disk) stops the
/// run as a refused event of its own does, resumable, instead of failing the task: the failure
/// would be recorded once space came back, and the run would end failed for good.
#[test]
fn a_call_the_log_could_not_audit_stops_the_run_resumable() {
    let log = Arc::new(MemoryLog::default());
    let g = graph(
        "tasks:\n  - { id: a, tool: flaky, args: { key: a, fail: 1, class: audit_unavailable } }\n",
    );
    let out = rt().block_on(driver::run_graph(g, opts_at_t0(log.clone(), registry())));
    match out {
        Err(DriverError::Log(message)) => assert!(message.contains("a failure 1"), "{message}"),
        other => panic!("{other:?}"),
    }
    let ev = events(&log);
    assert!(
        !ev.iter().any(|e| e.kind == EventKind::TaskFailed),
        "{:?}",
        ev.iter().map(|e| e.kind).collect::<Vec<_>>()
    );
    assert!(ev.iter().any(|e| e.kind == EventKind::ToolRequested));
}

#[test]
fn timeouts_fail_attempts_and_are_retried_as_timeout() {
    let (out, log) = run(
        graph(
            r#"
tasks:
  - id: slow
    tool: sleep
    args: { ms: 10000 }
    timeout: 100ms
    retry: { max_attempts: 2, backoff: 10ms, on: [timeout] }
"#,
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Failed);
    let ev = events(&log);
    let fails: Vec<_> = ev
        .iter()
        .filter(|e| e.kind == EventKind::TaskFailed)
        .collect();
    assert_eq!(fails.len(), 2);
    assert_eq!(fails[0].payload["class"], "timeout");
    assert!(ev.iter().any(|e| e.kind == EventKind::ClockObserved));
}

/// The time a call waits for a person (an approval question) does not count against its
/// task's `timeout`: the attempt's clock stands still from `task.paused` to `task.unpaused`,
/// and the work after the answer gets what remained of the budget. Replay agrees.
#[test]
fn a_wait_for_a_person_does_not_count_against_the_timeout() {
    let (out, log) = run(
        graph(
            r#"
tasks:
  - { id: asked, tool: flaky, args: { key: a, ask_ms: 300, ms: 60 }, timeout: 100ms }
"#,
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.tasks);
    let ev = events(&log);
    let kinds: Vec<EventKind> = ev
        .iter()
        .filter(|e| matches!(e.kind, EventKind::TaskPaused | EventKind::TaskUnpaused))
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, [EventKind::TaskPaused, EventKind::TaskUnpaused]);
    let paused = ev.iter().find(|e| e.kind == EventKind::TaskPaused).unwrap();
    assert_eq!(paused.payload["for"], "approval");
    assert!(paused.payload["call"].is_u64(), "{:?}", paused.payload);
    // `runs show` of the run as it stood during the wait says so; once answered, running.
    let at = |kind: EventKind| ev.iter().position(|e| e.kind == kind).unwrap();
    let during = RunSummary::fold(&ev[..=at(EventKind::TaskPaused)]).unwrap();
    assert_eq!(during.tasks[0].status, "waiting for approval");
    let after = RunSummary::fold(&ev[..=at(EventKind::TaskUnpaused)]).unwrap();
    assert_eq!(after.tasks[0].status, "running");
    let report = driver::replay_events(&ev).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.status, RunStatus::Completed);

    // The same wait with more work after it than the budget left: the attempt ends 100 ms of
    // work after it began, the 300 ms of waiting not counted.
    let (out, log) = run(
        graph(
            r#"
tasks:
  - { id: asked, tool: flaky, args: { key: a, ask_ms: 300, ms: 150 }, timeout: 100ms }
"#,
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Failed);
    let ev = events(&log);
    let time_of = |k: EventKind| ev.iter().find(|e| e.kind == k).unwrap().time;
    let failed = ev.iter().find(|e| e.kind == EventKind::TaskFailed).unwrap();
    assert_eq!(failed.payload["class"], "timeout");
    assert_eq!(
        time_of(EventKind::TaskFailed).saturating_duration_since(time_of(EventKind::TaskStarted)),
        Duration::from_millis(400)
    );
    driver::replay_events(&ev).unwrap_or_else(|e| panic!("{e}"));
}

const MIXED: &str = r#"
limits: { concurrency: 3, tools: { flaky: 2 } }
agents:
  w: { model: script/m, tools: [echo], concurrency: 2 }
tasks:
  - { id: a, tool: flaky, args: { key: a, fail: 1, ms: 30 }, retry: { backoff: 20ms, max_attempts: 5 } }
  - { id: b, tool: flaky, args: { key: b, ms: 50 }, retry: { backoff: 1ms } }
  - { id: c, tool: flaky, args: { key: c, fail: 2, ms: 10 }, retry: { max_attempts: 6, backoff: 5ms } }
  - { id: d, agent: w, prompt: "use {{ tasks.a.output.key }}", retry: { backoff: 1ms } }
  - { id: e, agent: w, prompt: "plain", needs: [b], retry: { backoff: 1ms } }
  - { id: f, agent: w, prompt: "third", priority: 5, retry: { backoff: 1ms } }
  - { id: g, tool: sleep, args: { ms: 40 }, needs: [c, d], retry: { backoff: 1ms } }
  - { id: h, tool: concat, args: { parts: ["{{ tasks.d.output.text }}", "{{ tasks.e.output.text }}"] }, retry: { backoff: 1ms } }
"#;

#[test]
fn same_seed_same_log_and_other_seed_other_log() {
    let (a, _) = run(graph(MIXED), 42);
    let (b, _) = run(graph(MIXED), 42);
    let (c, _) = run(graph(MIXED), 43);
    assert_eq!(a.status, RunStatus::Completed);
    assert_eq!(a.log_hash, b.log_hash);
    assert_eq!(a.outputs, b.outputs);
    assert_ne!(a.log_hash, c.log_hash);
    assert_eq!(a.outputs, c.outputs, "outputs do not depend on the seed");
}

/// Run ids follow from the seed and the clock: a second run with the same seed at the same
/// instant draws the same id, and is refused before it writes anything, instead of mixing two
/// runs under one id in the log.
#[test]
fn a_run_whose_id_is_already_in_the_log_is_refused_before_it_writes() {
    let log = Arc::new(MemoryLog::default());
    let rt = rt();
    let first = rt
        .block_on(driver::run_graph(
            graph(MIXED),
            opts_at_t0(log.clone(), registry()),
        ))
        .unwrap();
    let written = events(&log).len();
    // A fresh runtime, so that the paused clock reads `T0` again.
    let err = common::rt()
        .block_on(driver::run_graph(
            graph(MIXED),
            opts_at_t0(log.clone(), registry()),
        ))
        .unwrap_err();
    assert!(matches!(err, DriverError::Claimed(_)), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("run {} is already in", first.run_id)),
        "{err}"
    );
    assert_eq!(events(&log).len(), written);
    // Another seed draws another id and runs.
    let other = rt
        .block_on(driver::run_graph(
            graph(MIXED),
            RunOptions {
                seed: 2,
                ..opts_at_t0(log.clone(), registry())
            },
        ))
        .unwrap();
    assert_ne!(other.run_id, first.run_id);
    assert_eq!(other.status, RunStatus::Completed);
}

/// A run's id and its tasks' ids come from one seed and one instant, on separate streams: no
/// task shares its run's id (the first task's id once did).
#[test]
fn no_task_shares_its_runs_id() {
    for seed in [1, 2, 42] {
        let (out, log) = run(graph(MIXED), seed);
        let run = out.run_id.as_bytes();
        let tasks: Vec<_> = events(&log).iter().filter_map(|e| e.task_id).collect();
        assert!(!tasks.is_empty());
        assert!(tasks.iter().all(|t| t.as_bytes() != run), "seed {seed}");
    }
}

#[test]
fn limits_are_never_exceeded_and_are_reached() {
    let (out, log) = run(graph(MIXED), 5);
    assert_eq!(out.status, RunStatus::Completed);
    let peaks = check_limits(&events(&log)).unwrap();
    assert!(peaks["global"] <= 3);
    assert!(peaks["tool:flaky"] <= 2);
    assert!(peaks["agent:w"] <= 2);
    let (_, log) = run(
        graph(
            "limits: { concurrency: 4, tools: { sleep: 2 } }\ntasks:\n  - { id: a, tool: sleep, args: { ms: 10 } }\n  - { id: b, tool: sleep, args: { ms: 10 } }\n  - { id: c, tool: sleep, args: { ms: 10 } }\n  - { id: d, tool: echo, args: {} }\n  - { id: e, tool: sleep, args: { ms: 10 } }\n",
        ),
        1,
    );
    let peaks = check_limits(&events(&log)).unwrap();
    assert_eq!(peaks["tool:sleep"], 2);
}

#[test]
fn ready_set_order_is_priority_then_rank_then_id() {
    let (_, log) = run(
        graph(
            "limits: { concurrency: 1 }\ntasks:\n  - { id: z, tool: echo, args: {} }\n  - { id: b, tool: echo, args: {} }\n  - { id: a, tool: echo, args: {}, needs: [z] }\n  - { id: y, tool: echo, args: {}, priority: 3 }\n",
        ),
        1,
    );
    let ev = events(&log);
    let order: Vec<String> = ev
        .iter()
        .filter(|e| e.kind == EventKind::TaskStarted)
        .map(|e| name_of(&ev, e.task_id))
        .collect();
    assert_eq!(order, ["y", "b", "z", "a"]);
}

#[test]
fn replay_reproduces_the_run_and_names_the_first_divergence() {
    let (out, log) = run(graph(MIXED), 9);
    let ev = events(&log);
    let report = driver::replay_events(&ev).unwrap();
    assert_eq!(report.log_hash, out.log_hash);
    assert_eq!(report.events as usize, ev.len());
    assert!(report.finished);
    // Change a recorded tool output: the events derived from it no longer match.
    let mut tampered = ev.clone();
    // (A tool step's output: an agent's tool results only feed its recorded model calls.)
    let i = tampered
        .iter()
        .position(|e| e.kind == EventKind::ToolCompleted && e.actor.to_string() == "tool:flaky")
        .unwrap();
    tampered[i].payload["output"] = json!({"key": "forged", "calls": 1});
    match driver::replay_events(&tampered) {
        Err(DriverError::Diverged {
            index, recorded, ..
        }) => {
            assert!(index > i, "{index} {i}");
            assert!(recorded.contains("task.completed"), "{recorded}");
        }
        other => panic!("{other:?}"),
    }
    // A derived event that the engine would not produce is named.
    let mut extra = ev.clone();
    let j = extra
        .iter()
        .position(|e| e.kind == EventKind::TaskStarted)
        .unwrap();
    extra[j].payload["attempt"] = json!(7);
    let err = driver::replay_events(&extra).unwrap_err().to_string();
    assert!(err.contains(&format!("event {j}")), "{err}");
}

fn resume_from(prefix: &[Envelope], seed_for_new: u64) -> (driver::Outcome, Vec<Envelope>) {
    let log = Arc::new(MemoryLog::default());
    log.append_now(prefix.iter().map(Envelope::to_new_event).collect());
    let run_id = prefix[0].run_id;
    let rt = rt();
    let out = rt
        .block_on(async {
            let opts = RunOptions {
                seed: seed_for_new,
                sink: log.clone(),
                clock: Arc::new(TokioClock::new(prefix.last().unwrap().time)),
                tools: registry(),
                models: models(),
                observer: None,
                secrets: Arc::new(agent_runtime_core::NoSecrets),
                labels: Default::default(),
            };
            driver::resume(log.as_ref(), run_id, opts).await
        })
        .unwrap_or_else(|e| panic!("{e}"));
    (out, events(&log))
}

/// A run's log as a crash before any tool call returned leaves it.
fn before_the_first_result(ev: &[Envelope]) -> &[Envelope] {
    let cut = ev
        .iter()
        .position(|e| e.kind == EventKind::ToolCompleted)
        .unwrap();
    &ev[..cut]
}

/// Resumes the run `prefix` holds with a request to cancel `task` already queued (made while
/// no process drove the run); returns the outcome and the whole log.
fn resume_with_a_queued_cancel(
    prefix: &[Envelope],
    task: &str,
) -> (driver::Outcome, Vec<Envelope>) {
    let resumed = Arc::new(MemoryLog::default());
    resumed.append_now(prefix.iter().map(Envelope::to_new_event).collect());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(ControlRequest::CancelTask {
        run_id: None,
        by: "ann".into(),
        task: task.into(),
        reason: None,
    })
    .unwrap();
    let out = rt()
        .block_on(driver::resume_controlled(
            resumed.as_ref(),
            prefix[0].run_id,
            RunOptions {
                clock: Arc::new(TokioClock::new(prefix.last().unwrap().time)),
                ..opts_at_t0(resumed.clone(), registry())
            },
            CancellationToken::new(),
            Some(rx),
        ))
        .unwrap();
    (out, events(&resumed))
}

/// A cancellation requested while no process drove the run acts when it is resumed, before
/// the resume interrupts the attempts that were in flight and before any call starts: the
/// task it frees a slot for starts in this process and is not taken for interrupted, the
/// cancelled task is cancelled (not failed as interrupted, so its retry never runs), and the
/// log replays.
#[test]
fn a_request_queued_before_resume_acts_first_and_replays() {
    let g = graph(
        "limits: { concurrency: 2 }\ntasks:\n  - { id: p0, tool: sleep, args: { ms: 5000 }, retry: { max_attempts: 2, backoff: 1ms } }\n  - { id: p1, tool: sleep, args: { ms: 5000 }, retry: { max_attempts: 2, backoff: 1ms } }\n  - { id: q, tool: sleep, args: { ms: 10 } }\n",
    );
    let (_, log) = run(g, 3);
    let ev = events(&log);
    // The crash: both sleeps in flight, `q` waiting for a slot.
    let prefix = before_the_first_result(&ev);
    assert_eq!(count(prefix, EventKind::TaskStarted, "p1"), 1);
    let (out, all) = resume_with_a_queued_cancel(prefix, "p1");
    assert_eq!(out.status, RunStatus::Completed, "{out:?}");
    assert_eq!(status_of(&out, "p0"), TaskStatus::Completed);
    assert_eq!(status_of(&out, "p1"), TaskStatus::Cancelled);
    assert_eq!(status_of(&out, "q"), TaskStatus::Completed);
    assert_eq!(
        count(&all, EventKind::TaskStarted, "p1"),
        1,
        "p1 never retried"
    );
    assert_eq!(
        count(&all, EventKind::TaskFailed, "q"),
        0,
        "q was not interrupted"
    );
    assert_eq!(
        count(&all, EventKind::TaskFailed, "p1"),
        0,
        "p1 was cancelled, not interrupted"
    );
    let report = driver::replay_events(&all).unwrap();
    assert_eq!(report.log_hash, out.log_hash);
}

/// The case that failed whole runs: a task without `retry`, in flight when the process died
/// and cancelled before the resume. Interrupted first, it failed the run (`fail_run`) before
/// the cancel was read; cancelled first, it and what needs it are cancelled and the rest of
/// the run completes.
#[test]
fn a_cancel_queued_for_an_in_flight_task_without_retry_does_not_fail_the_run() {
    let g = graph(
        "tasks:\n  - { id: a, tool: sleep, args: { ms: 5000 }, retry: { max_attempts: 2, backoff: 1ms } }\n  - { id: b, tool: sleep, args: { ms: 5000 } }\n  - { id: c, tool: sleep, args: { ms: 10 }, needs: [a, b] }\n  - { id: d, tool: sleep, args: { ms: 10 }, needs: [b] }\n  - { id: e, tool: sleep, args: { ms: 10 }, needs: [a] }\n",
    );
    let (_, log) = run(g, 5);
    let ev = events(&log);
    let prefix = before_the_first_result(&ev);
    assert_eq!(count(prefix, EventKind::TaskStarted, "b"), 1);
    let (out, all) = resume_with_a_queued_cancel(prefix, "b");
    assert_eq!(out.status, RunStatus::Completed, "{out:?}");
    assert_eq!(status_of(&out, "a"), TaskStatus::Completed);
    assert_eq!(status_of(&out, "e"), TaskStatus::Completed);
    for cancelled in ["b", "c", "d"] {
        assert_eq!(
            status_of(&out, cancelled),
            TaskStatus::Cancelled,
            "{cancelled}"
        );
    }
    assert_eq!(count(&all, EventKind::TaskFailed, "b"), 0);
    let report = driver::replay_events(&all).unwrap();
    assert_eq!(report.log_hash, out.log_hash);
}

/// As above, when the resume frees more slots than the engine starts in one step (1,024): the
/// request waits until the engine has derived every start, as replay derives them before the
/// next input. Were it applied mid-pump, the task it cancels would be cancelled before its
/// start here and after it in replay, and the log would not replay.
#[test]
fn a_request_queued_before_a_resume_that_starts_thousands_replays() {
    const WAVE: usize = 1100;
    let mut yaml = format!(
        "limits: {{ concurrency: {WAVE}, max_tasks: {} }}\ntasks:\n",
        2 * WAVE
    );
    for i in 0..2 * WAVE {
        yaml.push_str(&format!(
            "  - {{ id: t{i:04}, tool: sleep, args: {{ ms: 5000 }}, on_failure: skip }}\n"
        ));
    }
    let (_, log) = run(graph(&yaml), 5);
    let ev = events(&log);
    // The crash: the first wave in flight, the second waiting for slots.
    let prefix = before_the_first_result(&ev);
    // Among the second wave's last starts, past the engine's first step.
    let late = format!("t{:04}", 2 * WAVE - 2);
    let names = Engine::create(&prefix[0].to_new_event()).unwrap();
    let started = |e: &Envelope| {
        e.kind == EventKind::TaskStarted
            && e.task_id.and_then(|t| names.task_name(t)) == Some(late.as_str())
    };
    assert!(!prefix.iter().any(started));
    let (out, all) = resume_with_a_queued_cancel(prefix, &late);
    assert_eq!(status_of(&out, &late), TaskStatus::Cancelled);
    assert_eq!(status_of(&out, "t2199"), TaskStatus::Completed);
    let report = driver::replay_events(&all).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.log_hash, out.log_hash);
}

#[test]
fn resume_after_a_crash_at_every_batch_boundary_finishes_without_redoing_work() {
    let (full, log) = run(graph(MIXED), 11);
    let ev = events(&log);
    // Every batch boundary: just before an input event. (A crash can also leave the log inside
    // a burst's pieces: see the next test.)
    let cuts: Vec<usize> = (1..ev.len())
        .filter(|&i| agent_runtime_workforce::engine::is_input(&ev[i].to_new_event()))
        .collect();
    assert!(cuts.len() > 5);
    for &cut in &cuts {
        let prefix = &ev[..cut];
        let done_before: Vec<String> = prefix
            .iter()
            .filter(|e| e.kind == EventKind::TaskCompleted)
            .map(|e| name_of(prefix, e.task_id))
            .collect();
        let (out, after) = resume_from(prefix, 999);
        assert_eq!(out.status, RunStatus::Completed, "cut {cut}");
        assert_eq!(out.outputs["h"], full.outputs["h"], "cut {cut}");
        assert_eq!(out.run_id, full.run_id);
        for t in &done_before {
            let restarted = after[cut..]
                .iter()
                .filter(|e| e.kind == EventKind::TaskStarted && &name_of(&after, e.task_id) == t)
                .count();
            assert_eq!(restarted, 0, "cut {cut}: completed task {t} ran again");
        }
        // The resumed log is itself replayable and within limits.
        let report = driver::replay_events(&after).unwrap();
        assert_eq!(report.log_hash, out.log_hash, "cut {cut}");
        check_limits(&after).unwrap();
    }
}

/// A burst (thousands of tasks started at once) goes to the log in pieces, each durable on its
/// own, so a crash can leave only the first pieces of it: the log then ends inside what the
/// engine derived from one input. Resume records the rest before `run.resumed`, makes the
/// calls requested there (never made: a call waits for its request to be durable) and sends
/// only the attempts whose calls may have been made through their retry policy; replay accepts
/// the interrupted log, and the resumed one.
#[test]
fn resume_after_a_crash_inside_a_burst_records_the_rest_and_finishes() {
    let n = 3000;
    let mut yaml = format!("limits: {{ concurrency: {n}, max_tasks: {n} }}\ntasks:\n");
    for i in 0..n {
        yaml += &format!(
            "  - {{ id: t{i:04}, tool: echo, args: {{ n: {i} }}, retry: {{ max_attempts: 2, backoff: 1ms, on: [interrupted] }} }}\n"
        );
    }
    let (full, log) = run(graph(&yaml), 5);
    let ev = events(&log);
    // run.created, run.started, then a task.started and a tool.requested per task.
    for cut in [2, 3, 1000, 2049, 2 + 2 * n - 1] {
        let prefix = &ev[..cut];
        assert!(
            prefix[1..]
                .iter()
                .all(|e| !agent_runtime_workforce::engine::is_input(&e.to_new_event())),
            "cut {cut} is not inside the start burst"
        );
        let interrupted =
            driver::replay_events(prefix).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        assert!(!interrupted.finished, "cut {cut}");
        let (out, after) = resume_from(prefix, 999);
        assert_eq!(out.status, RunStatus::Completed, "cut {cut}");
        assert_eq!(out.outputs.len(), n, "cut {cut}");
        assert_eq!(out.outputs, full.outputs, "cut {cut}");
        // What the log had is kept as it was; the burst's rest comes before run.resumed.
        assert_eq!(&after[..cut], prefix, "cut {cut}");
        let resumed_at = after
            .iter()
            .position(|e| e.kind == EventKind::RunResumed)
            .unwrap();
        assert_eq!(resumed_at, 2 + 2 * n, "cut {cut}");
        // A call whose request was durable may have been made: its attempt is interrupted and
        // retried. The others were never made: `run.resumed` names them and they are made now,
        // in the same attempt.
        let requested: std::collections::BTreeSet<Option<TaskId>> = prefix
            .iter()
            .filter(|e| e.kind == EventKind::ToolRequested)
            .map(|e| e.task_id)
            .collect();
        let unstarted = after[resumed_at].payload["unstarted_calls"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(unstarted, n - requested.len(), "cut {cut}");
        let mut attempts: std::collections::BTreeMap<Option<TaskId>, usize> = Default::default();
        for e in after.iter().filter(|e| e.kind == EventKind::TaskStarted) {
            *attempts.entry(e.task_id).or_default() += 1;
        }
        assert_eq!(attempts.len(), n, "cut {cut}");
        for (task, made) in &attempts {
            let expected = if requested.contains(task) { 2 } else { 1 };
            assert_eq!(*made, expected, "cut {cut}: {task:?}");
        }
        let report = driver::replay_events(&after).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        assert_eq!(report.log_hash, out.log_hash, "cut {cut}");
        check_limits(&after).unwrap();
    }
    // A log that lost only its last event, `run.completed`: the run had ended in the engine
    // but not in the log; resume records the end and nothing else.
    let last = ev.len() - 1;
    assert_eq!(ev[last].kind, EventKind::RunCompleted);
    let report = driver::replay_events(&ev[..last]).unwrap();
    assert!(!report.finished);
    let (out, after) = resume_from(&ev[..last], 999);
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(out.log_hash, full.log_hash);
    assert_eq!(after, ev);
}

#[test]
fn resume_retries_in_flight_attempts_through_their_policy() {
    let g = "tasks:\n  - { id: s, tool: sleep, args: { ms: 100 }, retry: { max_attempts: 2, backoff: 1ms } }\n  - { id: t, tool: sleep, args: { ms: 100 } }\n";
    let (_, log) = run(graph(g), 1);
    let ev = events(&log);
    // Cut right after both calls were requested, before any result.
    let cut = ev
        .iter()
        .position(|e| e.kind == EventKind::ToolCompleted)
        .unwrap();
    let (out, after) = resume_from(&ev[..cut], 0);
    assert_eq!(
        out.status,
        RunStatus::Failed,
        "t has no retry policy: interrupted means failed"
    );
    let resumed = after
        .iter()
        .position(|e| e.kind == EventKind::RunResumed)
        .unwrap();
    let fails: Vec<_> = after[resumed..]
        .iter()
        .filter(|e| e.kind == EventKind::TaskFailed)
        .collect();
    assert_eq!(fails[0].payload["class"], "interrupted");
    assert!(
        after[resumed..]
            .iter()
            .any(|e| e.kind == EventKind::TaskRetryScheduled)
    );
    let g2 = "tasks:\n  - { id: s, tool: sleep, args: { ms: 100 }, retry: { max_attempts: 2, backoff: 1ms } }\n";
    let (_, log) = run(graph(g2), 1);
    let ev = events(&log);
    let cut = ev
        .iter()
        .position(|e| e.kind == EventKind::ToolCompleted)
        .unwrap();
    let (out, _) = resume_from(&ev[..cut], 0);
    assert_eq!(out.status, RunStatus::Completed);
    // A finished run cannot be resumed.
    let log2 = Arc::new(MemoryLog::default());
    log2.append_now(ev.iter().map(Envelope::to_new_event).collect());
    let err = rt()
        .block_on(driver::resume(
            log2.as_ref(),
            ev[0].run_id,
            RunOptions {
                seed: 0,
                sink: log2.clone(),
                clock: Arc::new(TokioClock::new(T0)),
                tools: registry(),
                models: models(),
                observer: None,
                secrets: Arc::new(agent_runtime_core::NoSecrets),
                labels: Default::default(),
            },
        ))
        .unwrap_err();
    assert!(matches!(err, DriverError::Finished { .. }), "{err}");
}

#[test]
fn cancelling_a_run_stops_everything() {
    let g = graph(
        "tasks:\n  - { id: a, tool: sleep, args: { ms: 5000 } }\n  - { id: b, tool: sleep, args: { ms: 5000 } }\n  - { id: c, tool: echo, needs: [a], args: {} }\n  - { id: r, tool: fail, args: { message: m }, retry: { max_attempts: 3, backoff: 10s } }\n  - { id: done, tool: echo, args: { v: 1 } }\n",
    );
    let log = Arc::new(MemoryLog::default());
    let token = CancellationToken::new();
    let out = rt()
        .block_on(async {
            let t = token.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                t.cancel();
            });
            let opts = opts_at_t0(log.clone(), registry());
            driver::run_graph_with_cancel(g, opts, token).await
        })
        .unwrap();
    assert_eq!(out.status, RunStatus::Cancelled);
    let ev = events(&log);
    assert_eq!(
        ev.iter()
            .filter(|e| e.kind == EventKind::TaskCancelled)
            .count(),
        2
    );
    // Only `done`'s call completed.
    assert_eq!(
        ev.iter()
            .filter(|e| e.kind == EventKind::ToolCompleted)
            .count(),
        1
    );
    assert_eq!(
        driver::replay_events(&ev).unwrap().status,
        RunStatus::Cancelled
    );
    // `runs show`: why and by whom, each running task's reason, and a task never started (it
    // waited on `a`) is cancelled too, as the outcome says.
    let summary = RunSummary::fold(&ev).unwrap();
    assert_eq!(summary.status, "cancelled");
    let cancelled = ev
        .iter()
        .find(|e| e.kind == EventKind::RunCancelled)
        .unwrap();
    let reason = cancelled.payload["reason"].as_str().unwrap();
    assert_eq!(
        summary.error.as_deref(),
        Some(format!("{reason} ({})", cancelled.actor).as_str())
    );
    assert_eq!(
        out.error, summary.error,
        "the outcome says why, as runs show does"
    );
    let row = |id: &str| summary.tasks.iter().find(|t| t.id == id).unwrap().clone();
    assert_eq!(row("a").status, "cancelled");
    assert!(row("a").error.is_some_and(|e| !e.is_empty()));
    assert_eq!(row("c").status, "cancelled");
    assert_eq!(
        row("c").error.as_deref(),
        Some("the run was cancelled first")
    );
    // The final task that completed first: its output, in the outcome and in `runs show`.
    assert_eq!(out.outputs["done"], json!({"v": 1}));
    assert_eq!(summary.outputs, json!(out.outputs));
    // `r` failed once and was waiting for its retry: cancelled with the run, in the outcome and
    // in `runs show` alike, not left `retrying`.
    assert!(ev.iter().any(|e| e.kind == EventKind::TaskRetryScheduled));
    assert_eq!(row("r").status, "cancelled");
    for id in ["c", "r"] {
        assert_eq!(
            out.tasks.iter().find(|t| t.id == id).unwrap().status,
            TaskStatus::Cancelled
        );
    }
}

#[test]
fn cancelling_a_subtree_leaves_the_rest_running() {
    let g = graph(
        "tasks:\n  - { id: a, tool: echo, args: {} }\n  - { id: b, tool: echo, needs: [a], args: {} }\n  - { id: c, tool: echo, needs: [b], args: {} }\n  - { id: x, tool: echo, args: {} }\n",
    );
    let created = Engine::created_event(agent_runtime_core::RunId::from_bytes([3; 16]), &g, 1, T0);
    let mut engine = Engine::create(&created).unwrap();
    engine.drain_events();
    let effects: Vec<_> = engine.drain_effects().collect();
    assert_eq!(effects.len(), 2, "a and x start");
    let cancel = engine.cancel_task_event(T0, "ann", "b", None).unwrap();
    engine.apply(&cancel).unwrap();
    let ev: Vec<_> = engine.drain_events().collect();
    assert_eq!(
        ev.iter()
            .filter(|e| e.kind() == EventKind::TaskCancelled)
            .count(),
        2,
        "b and c"
    );
    for effect in effects {
        let call = match effect {
            agent_runtime_workforce::Effect::CallTool { call, .. } => call,
            other => panic!("{other:?}"),
        };
        let done = engine.tool_result_event(call, "echo", T0, Ok(json!({})));
        engine.apply(&done).unwrap();
    }
    assert_eq!(engine.status(), RunStatus::Completed);
    let views = engine.task_views();
    assert_eq!(views[2].status, TaskStatus::Cancelled);
    assert_eq!(views[3].status, TaskStatus::Completed);
}

/// The call numbers of the tool calls among `effects`, by tool step.
fn tool_calls(effects: Vec<agent_runtime_workforce::Effect>) -> Vec<u64> {
    effects
        .into_iter()
        .filter_map(|e| match e {
            agent_runtime_workforce::Effect::CallTool { call, .. } => Some(call),
            _ => None,
        })
        .collect()
}

/// A slot freed by a cancellation that `admit` hands to a waiting task which the same
/// cancellation then cancels goes on to the next waiter: it was lost, and the run stalled with
/// a task blocked behind a free slot (and stalled again on resume).
#[test]
fn a_slot_handed_to_a_task_cancelled_before_it_starts_goes_to_the_next() {
    let g = graph(
        "limits: { concurrency: 4, tools: { flaky: 1 } }
tasks:
  - { id: r, tool: echo, args: {} }
  - { id: x, tool: echo, args: {} }
  - { id: b, tool: flaky, args: { key: b }, needs: [r], priority: 10 }
  - { id: c, tool: flaky, args: { key: c }, needs: [r], priority: 5 }
  - { id: d, tool: flaky, args: { key: d }, needs: [x], priority: 1 }
",
    );
    let created = Engine::created_event(agent_runtime_core::RunId::from_bytes([4; 16]), &g, 1, T0);
    let mut engine = Engine::create(&created).unwrap();
    let first = tool_calls(engine.drain_effects().collect());
    assert_eq!(first.len(), 2, "r and x start");
    for call in first {
        let done = engine.tool_result_event(call, "echo", T0, Ok(json!({})));
        engine.apply(&done).unwrap();
    }
    // b holds the one flaky slot; c and d wait for it.
    let running = tool_calls(engine.drain_effects().collect());
    assert_eq!(running.len(), 1, "b alone");
    let cancel = engine.cancel_task_event(T0, "ann", "r", None).unwrap();
    engine.apply(&cancel).unwrap();
    let started = tool_calls(engine.drain_effects().collect());
    assert_eq!(
        started.len(),
        1,
        "d gets the slot b freed: {:?}",
        engine.task_views()
    );
    let done = engine.tool_result_event(started[0], "flaky", T0, Ok(json!({})));
    engine.apply(&done).unwrap();
    assert_eq!(engine.status(), RunStatus::Completed);
    let views = engine.task_views();
    let status = |id: &str| views.iter().find(|v| v.id == id).unwrap().status;
    assert_eq!(
        [status("b"), status("c"), status("d")],
        [
            TaskStatus::Cancelled,
            TaskStatus::Cancelled,
            TaskStatus::Completed
        ]
    );
}

/// An attempt whose calls were never made when the process died goes on in `resume`, which
/// makes them: the time the process was gone does not count against its `timeout` (it timed
/// out at the first tick after the resume).
#[test]
fn a_kept_attempt_gets_its_timeout_again_on_resume() {
    let g = graph("tasks:\n  - { id: t, tool: sleep, args: { ms: 20 }, timeout: 800ms }\n");
    let created = Engine::created_event(agent_runtime_core::RunId::from_bytes([5; 16]), &g, 1, T0);
    let mut engine = Engine::create(&created).unwrap();
    let calls = tool_calls(engine.drain_effects().collect());
    assert_eq!(calls.len(), 1);
    let later = |ms: u64| Timestamp::from_unix_nanos(T0.as_unix_nanos() + ms * 1_000_000);
    let resumed = engine.resumed_event_unstarted(later(10_000), &calls);
    engine.apply(&resumed).unwrap();
    assert_eq!(engine.next_deadline(), Some(later(10_800)));
    engine.apply(&engine.clock_event(later(10_500))).unwrap();
    assert_eq!(engine.status(), RunStatus::Running);
    let done = engine.tool_result_event(calls[0], "sleep", later(10_520), Ok(json!({})));
    engine.apply(&done).unwrap();
    assert_eq!(engine.status(), RunStatus::Completed);
}

/// The downtime counts from the last time the log knew of before the process stopped (the
/// resume's `since`), not from the cancellation requests it applies first, which move the
/// clock to the resume's time: with one queued, a kept attempt timed out at once.
#[test]
fn a_kept_attempt_s_downtime_counts_from_before_queued_requests() {
    let g = graph(
        "tasks:\n  - { id: t, tool: sleep, args: { ms: 20 }, timeout: 800ms }\n  - { id: u, tool: sleep, args: { ms: 20 } }\n",
    );
    let created = Engine::created_event(agent_runtime_core::RunId::from_bytes([7; 16]), &g, 1, T0);
    let mut engine = Engine::create(&created).unwrap();
    let calls = tool_calls(engine.drain_effects().collect());
    assert_eq!(calls.len(), 2);
    let later = |ms: u64| Timestamp::from_unix_nanos(T0.as_unix_nanos() + ms * 1_000_000);
    let since = engine.now();
    let cancel = engine
        .cancel_task_event(later(10_000), "ann", "u", None)
        .unwrap();
    engine.apply(&cancel).unwrap();
    let resumed = engine.resumed_event_since(later(10_000), &calls[..1], Some(since));
    engine.apply(&resumed).unwrap();
    assert_eq!(engine.next_deadline(), Some(later(10_800)));
    engine.apply(&engine.clock_event(later(10_500))).unwrap();
    assert_eq!(engine.status(), RunStatus::Running);
}

/// The native `fail` tool cannot say the log failed to audit it (only the gateway says so, and
/// a run stops on it): asked to, it fails as a tool.
#[test]
fn the_fail_tool_cannot_claim_the_log_failed() {
    let (out, log) = run(
        graph(
            "tasks:\n  - { id: a, tool: fail, args: { class: audit_unavailable }, on_failure: skip }\n",
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Completed);
    let failed = events(&log)
        .into_iter()
        .find(|e| e.kind == EventKind::TaskFailed)
        .unwrap();
    assert_eq!(failed.payload["class"], "tool_error");
}

/// On resume, an agent attempt whose model call waits for its provider's slot has nothing in
/// flight and goes on (it failed as interrupted, as the attempt whose call was made does).
#[test]
fn an_attempt_whose_call_waits_for_a_slot_goes_on_after_resume() {
    let g = graph(
        "limits: { providers: { script: 1 } }
agents:
  w: { model: script/m, tools: [] }
tasks:
  - { id: a, agent: w, prompt: one, on_failure: skip }
  - { id: b, agent: w, prompt: two, on_failure: skip }
",
    );
    let created = Engine::created_event(agent_runtime_core::RunId::from_bytes([6; 16]), &g, 1, T0);
    let mut engine = Engine::create(&created).unwrap();
    let made: Vec<_> = engine.drain_effects().collect();
    assert_eq!(made.len(), 1, "one model call has the provider's slot");
    engine.drain_events();
    let resumed = engine.resumed_event_unstarted(T0, &[]);
    engine.apply(&resumed).unwrap();
    let all: Vec<_> = engine.drain_events().collect();
    let failed: Vec<_> = all
        .iter()
        .filter(|e| e.kind() == EventKind::TaskFailed)
        .map(|e| String::from_utf8_lossy(e.payload_json()).into_owned())
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "only the attempt whose call was made: {failed:?}"
    );
    let views = engine.task_views();
    let status = |id: &str| views.iter().find(|v| v.id == id).unwrap().status;
    assert_eq!(status("b"), TaskStatus::Running);
    assert_eq!(views.iter().find(|v| v.id == "b").unwrap().attempts, 1);
}

/// Backoff doubles until `max_backoff` however many retries came before (it stopped doubling
/// after the 21st), and a delay too long for milliseconds in a u64 is recorded as the most
/// there are rather than wrapped around.
#[test]
fn backoff_doubles_to_its_cap_and_huge_delays_are_recorded_whole() {
    let (_, log) = run(
        graph(
            "tasks:\n  - { id: a, tool: fail, args: { message: x }, retry: { max_attempts: 24, backoff: 1us, max_backoff: 1h, jitter: 0 }, on_failure: skip }\n",
        ),
        1,
    );
    let delays: Vec<u64> = events(&log)
        .iter()
        .filter(|e| e.kind == EventKind::TaskRetryScheduled)
        .map(|e| e.payload["delay_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(delays.len(), 23);
    assert_eq!(&delays[19..], [524, 1048, 2097, 4194]);

    let (_, log) = run(
        graph(
            "tasks:\n  - { id: a, tool: fail, args: { message: x }, retry: { max_attempts: 2, backoff: 18446744073709551615s, max_backoff: 18446744073709551615s, jitter: 0 }, on_failure: skip }\n",
        ),
        1,
    );
    let scheduled = events(&log)
        .into_iter()
        .find(|e| e.kind == EventKind::TaskRetryScheduled)
        .unwrap();
    assert_eq!(scheduled.payload["delay_ms"], json!(u64::MAX));
}

/// An attempt that ends (here by its timeout) with one call running and another queued for
/// the same limited tool ends the queued one first: the slot the running one frees is not
/// handed to its own queued call, which was recorded as requested, made and cancelled at once.
#[test]
fn an_ending_attempt_does_not_start_its_own_queued_call() {
    let (out, log) = run(
        graph(
            r#"
limits: { tools: { flaky: 1 } }
agents:
  w: { model: script/m, tools: [flaky] }
tasks:
  - { id: t, agent: w, prompt: "slow twice", timeout: 100ms, on_failure: skip }
"#,
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Completed);
    let ev = events(&log);
    let failed = ev.iter().find(|e| e.kind == EventKind::TaskFailed).unwrap();
    assert_eq!(failed.payload["class"], "timeout");
    let requested = ev
        .iter()
        .filter(|e| e.kind == EventKind::ToolRequested)
        .count();
    assert_eq!(
        requested, 1,
        "only the call that held the slot was requested"
    );
    driver::replay_events(&ev).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn agent_tasks_loop_through_model_and_tools() {
    let (out, log) = run(
        graph(
            r#"
agents:
  w: { model: script/m, tools: [echo], max_turns: 3, instructions: "be brief" }
tasks:
  - { id: fetch, tool: echo, args: { text: data } }
  - { id: think, agent: w, prompt: "summarize {{ tasks.fetch.output.text }}" }
"#,
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Completed);
    let text = out.outputs["think"]["text"].as_str().unwrap();
    assert!(text.contains("summarize data"), "{text}");
    let ev = events(&log);
    assert_eq!(
        ev.iter()
            .filter(|e| e.kind == EventKind::ModelRequested)
            .count(),
        2
    );
    assert_eq!(
        ev.iter()
            .filter(|e| e.kind == EventKind::ToolRequested)
            .count(),
        2
    );
    assert_eq!(driver::replay_events(&ev).unwrap().log_hash, out.log_hash);
}

#[test]
fn agents_fail_at_their_turn_limit_and_retry_rate_limits() {
    let (out, log) = run(
        graph(
            "agents:\n  w: { model: script/m, tools: [echo], max_turns: 2 }\ntasks:\n  - { id: l, agent: w, prompt: loop, on_failure: skip }\n  - { id: r, agent: w, prompt: ratelimit, retry: { max_attempts: 2, backoff: 1ms, on: [model_rate_limit] }, on_failure: { continue_with: gave up } }\n",
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Completed);
    let ev = events(&log);
    let l_fail = ev
        .iter()
        .find(|e| e.kind == EventKind::TaskFailed && name_of(&ev, e.task_id) == "l")
        .unwrap();
    assert_eq!(l_fail.payload["class"], "budget_exceeded");
    assert_eq!(count(&ev, EventKind::TaskStarted, "r"), 2);
    assert_eq!(out.outputs["r"], json!("gave up"));
}

#[test]
fn agents_spawn_sub_tasks_within_limits() {
    let (out, log) = run(
        graph(
            "limits: { max_spawn_depth: 1 }\nagents:\n  w: { model: script/m, tools: [spawn_task] }\ntasks:\n  - { id: boss, agent: w, prompt: spawn helpers }\n",
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Completed);
    let ev = events(&log);
    let spawned: Vec<_> = ev
        .iter()
        .filter(|e| e.kind == EventKind::TaskSpawned)
        .collect();
    assert_eq!(spawned.len(), 1);
    assert_eq!(spawned[0].payload["task"], "boss.1");
    assert!(
        out.tasks
            .iter()
            .any(|t| t.id == "boss.1" && t.status == TaskStatus::Completed)
    );
    assert_eq!(driver::replay_events(&ev).unwrap().log_hash, out.log_hash);
    let summary = RunSummary::fold(&ev).unwrap();
    assert_eq!(summary.tasks.len(), 2);
    assert_eq!(summary.tasks[1].status, "completed");
    // Folded for the run alone (`runs list`): the same run, without task rows or outputs.
    let mut light = agent_runtime_workforce::state::RunFold::run_only(&ev[0]).unwrap();
    ev.iter().for_each(|e| light.push(e));
    let light = light.finish();
    assert!(light.tasks.is_empty() && light.outputs.is_null());
    assert_eq!(
        RunSummary {
            tasks: Vec::new(),
            outputs: serde_json::Value::Null,
            ..summary.clone()
        },
        light
    );
    // Depth 0 forbids spawning: the agent gets an error and answers anyway.
    let (out, log) = run(
        graph(
            "limits: { max_spawn_depth: 0 }\nagents:\n  w: { model: script/m, tools: [spawn_task] }\ntasks:\n  - { id: boss, agent: w, prompt: spawn helpers }\n",
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Completed);
    assert!(
        events(&log)
            .iter()
            .all(|e| e.kind != EventKind::TaskSpawned)
    );
    assert!(
        out.outputs["boss"]["text"]
            .as_str()
            .unwrap()
            .contains("max_spawn_depth")
    );
}

#[test]
fn provider_limits_hold_model_calls() {
    let (out, log) = run(
        graph(
            "limits: { providers: { script: 1 } }\nagents:\n  w: { model: script/m, tools: [echo], concurrency: 4 }\ntasks:\n  - { id: a, agent: w, prompt: one }\n  - { id: b, agent: w, prompt: two }\n  - { id: c, agent: w, prompt: three }\n",
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Completed);
    let peaks = check_limits(&events(&log)).unwrap();
    assert_eq!(peaks["provider:script"], 1);
    assert!(peaks["agent:w"] >= 2);
}

/// A large graph is validated while its `run.created` is encoded on another thread; an
/// invalid one is still refused before anything is recorded, with the cycle named.
#[test]
fn a_large_invalid_graph_is_refused_before_anything_is_recorded() {
    let mut yaml = String::from("tasks:\n");
    for i in 0..1500 {
        yaml += &format!("  - {{ id: t{i:04}, tool: echo, args: {{}} }}\n");
    }
    let mut g = graph(&yaml);
    g.tasks[0].needs = vec!["t1499".into()];
    g.tasks[1499].needs = vec!["t0000".into()];
    let log = Arc::new(MemoryLog::default());
    let err = rt()
        .block_on(driver::run_graph(g, opts_at_t0(log.clone(), registry())))
        .unwrap_err()
        .to_string();
    assert!(err.contains("t0000 -> t1499 -> t0000"), "{err}");
    assert!(log.all().is_empty());
}

#[test]
fn unknown_tools_are_refused_before_the_run_starts() {
    let log = Arc::new(MemoryLog::default());
    let err = rt()
        .block_on(driver::run_graph(
            graph("tasks:\n  - { id: a, tool: ecoh, args: {} }\n"),
            opts_at_t0(log.clone(), registry()),
        ))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown tool `ecoh` (did you mean `echo`?)"),
        "{err}"
    );
    assert!(log.all().is_empty());
}

#[test]
fn run_summary_folds_status_and_task_table() {
    let (_, log) = run(
        graph(
            "tasks:\n  - { id: ok, tool: echo, args: {} }\n  - { id: bad, tool: fail, args: { message: boom } }\n",
        ),
        1,
    );
    let s = RunSummary::fold(&events(&log)).unwrap();
    assert_eq!(s.status, "failed");
    assert!(s.error.as_deref().unwrap().contains("boom"));
    let bad = s.tasks.iter().find(|t| t.id == "bad").unwrap();
    assert_eq!(bad.status, "failed");
    assert_eq!(bad.attempts, 1);
    assert_eq!(bad.error.as_deref(), Some("tool_error: boom"));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// A random graph of tool steps: each task needs some earlier ones, fails a few times with a
    /// transient class, and has a random policy: skip, continue_with, fail_run, or a fallback
    /// task of its own (which may fail too). Also returns whether any task has `fail_run`.
    fn graph_yaml(seed: u64, n: usize, concurrency: u32) -> (String, bool) {
        let mut rng = agent_runtime_core::SeededRng::new(seed);
        let mut y =
            format!("limits: {{ concurrency: {concurrency}, tools: {{ flaky: 2 }} }}\ntasks:\n");
        let mut fail_run = false;
        for i in 0..n {
            let needs: Vec<String> = (0..i)
                .filter(|_| rng.below(4) == 0)
                .map(|j| format!("t{j}"))
                .collect();
            let fail = rng.below(3);
            let policy = match rng.below(5) {
                1 => "{ continue_with: 0 }".to_string(),
                2 => {
                    // Nothing needs a fallback task: it runs only in place of `t{i}`.
                    y.push_str(&format!(
                        "  - {{ id: f{i}, tool: flaky, args: {{ key: f{i}, fail: {}, ms: {} }}, retry: {{ max_attempts: 2, backoff: 3ms }}, on_failure: skip }}\n",
                        rng.below(3),
                        rng.below(30),
                    ));
                    format!("{{ fallback: f{i} }}")
                }
                3 => {
                    fail_run = true;
                    "fail_run".to_string()
                }
                _ => "skip".to_string(),
            };
            y.push_str(&format!(
                "  - {{ id: t{i}, tool: flaky, args: {{ key: t{i}, fail: {fail}, ms: {} }}, needs: [{}], retry: {{ max_attempts: 2, backoff: 3ms }}, on_failure: {policy}, priority: {} }}\n",
                rng.below(30),
                needs.join(", "),
                rng.below(3)
            ));
        }
        (y, fail_run)
    }

    /// Where the outcome and `runs show` (a fold over the log alone) disagree about a task's
    /// final status, if anywhere.
    fn status_disagreement(out: &driver::Outcome, ev: &[Envelope]) -> Option<String> {
        let summary = RunSummary::fold(ev).unwrap();
        out.tasks.iter().find_map(|t| {
            let shown = &summary.tasks.iter().find(|r| r.id == t.id)?.status;
            let status = match t.status {
                TaskStatus::Completed => "completed",
                TaskStatus::Failed => "failed",
                TaskStatus::Skipped => "skipped",
                TaskStatus::Cancelled => "cancelled",
                other => return Some(format!("task {} ended {other:?}", t.id)),
            };
            (shown != status).then(|| format!("task {}: outcome {status}, runs show {shown}", t.id))
        })
    }

    /// The generator reaches every policy's paths: over a range of seeds, some fallback task
    /// runs in place of its task, some is skipped as not needed, and some run fails; every run
    /// replays to its own hash, and `runs show` tells each task's end as the outcome does.
    #[test]
    fn generated_graphs_reach_fallbacks_and_failures() {
        let (mut ran, mut not_needed, mut failed) = (0, 0, 0);
        for seed in 0..40u64 {
            let (yaml, _) = graph_yaml(seed, 10, 3);
            let (out, log) = run(graph(&yaml), seed);
            let report = driver::replay_events(&events(&log)).unwrap();
            assert_eq!(report.log_hash, out.log_hash, "seed {seed}");
            assert_eq!(
                status_disagreement(&out, &events(&log)),
                None,
                "seed {seed}"
            );
            for t in out.tasks.iter().filter(|t| t.id.starts_with('f')) {
                match t.status {
                    TaskStatus::Completed | TaskStatus::Failed => ran += 1,
                    TaskStatus::Skipped => not_needed += 1,
                    _ => {}
                }
            }
            failed += usize::from(out.status == RunStatus::Failed);
        }
        assert!(
            ran > 0 && not_needed > 0 && failed > 0,
            "{ran} {not_needed} {failed}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

        #[test]
        fn live_runs_replay_finish_and_respect_limits(seed in any::<u64>(), n in 1usize..14, concurrency in 1u32..5) {
            let (yaml, fail_run) = graph_yaml(seed, n, concurrency);
            let g = graph(&yaml);
            let (out, log) = run(g.clone(), seed);
            if fail_run {
                prop_assert!(matches!(out.status, RunStatus::Completed | RunStatus::Failed), "{:?}", out.status);
            } else {
                prop_assert_eq!(out.status, RunStatus::Completed);
                prop_assert!(out.tasks.iter().all(|t| t.status.is_terminal()));
            }
            let ev = events(&log);
            let report = driver::replay_events(&ev).unwrap();
            prop_assert_eq!(&report.log_hash, &out.log_hash);
            prop_assert_eq!(status_disagreement(&out, &ev), None);
            let peaks = check_limits(&ev).unwrap();
            prop_assert!(peaks["global"] <= concurrency);
            let (again, _) = run(g, seed);
            prop_assert_eq!(&again.log_hash, &out.log_hash);
        }
    }
}

#[test]
fn control_requests_are_recorded_before_they_act_and_foreign_events_are_not_replayed() {
    let g = graph(
        "tasks:\n  - { id: slow, tool: sleep, args: { ms: 60000 } }\n  - { id: after, tool: echo, needs: [slow], args: {} }\n  - { id: quick, tool: sleep, args: { ms: 20 } }\n",
    );
    let log = Arc::new(MemoryLog::default());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let other_run = agent_runtime_core::RunId::from_bytes([9; 16]);
    let out = rt()
        .block_on(async {
            let opts = opts_at_t0(log.clone(), registry());
            let run = tokio::spawn(driver::run_graph_controlled(
                g,
                opts,
                CancellationToken::new(),
                Some(rx),
            ));
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Ignored: meant for another run, and a task the graph does not have.
            tx.send(ControlRequest::CancelRun {
                run_id: Some(other_run),
                by: "eve".into(),
                reason: "not yours".into(),
            })
            .unwrap();
            tx.send(ControlRequest::CancelTask {
                run_id: None,
                by: "ann".into(),
                task: "nope".into(),
                reason: None,
            })
            .unwrap();
            tx.send(ControlRequest::CancelTask {
                run_id: None,
                by: "ann".into(),
                task: "slow".into(),
                reason: Some("too slow".into()),
            })
            .unwrap();
            run.await.unwrap()
        })
        .unwrap();
    // `quick` finished; `slow` and `after` were cancelled; the run ends on its own.
    assert_eq!(out.status, RunStatus::Completed);
    let status: Vec<(String, TaskStatus)> =
        out.tasks.iter().map(|t| (t.id.clone(), t.status)).collect();
    assert!(status.contains(&("slow".into(), TaskStatus::Cancelled)));
    assert!(status.contains(&("after".into(), TaskStatus::Cancelled)));
    assert!(status.contains(&("quick".into(), TaskStatus::Completed)));
    let mut ev = events(&log);
    let by_ann: Vec<&Envelope> = ev
        .iter()
        .filter(|e| e.actor == Actor::Person("ann".into()))
        .collect();
    assert_eq!(by_ann.len(), 1, "one request acted on, recorded once");
    assert_eq!(by_ann[0].kind, EventKind::TaskCancelled);
    // The reason is recorded with the request and given to each task cancelled, which
    // `runs show` prints.
    assert_eq!(by_ann[0].payload["reason"], "too slow");
    let summary = RunSummary::fold(&ev).unwrap();
    for id in ["slow", "after"] {
        let row = summary.tasks.iter().find(|t| t.id == id).unwrap();
        assert_eq!(
            row.error.as_deref(),
            Some("cancelled with `slow` and its subtree: too slow")
        );
    }
    assert!(ev.iter().all(|e| e.actor != Actor::Person("eve".into())));

    // Records that other parts write under the run's id (the gateway's audit trail, a
    // cancellation request) do not disturb replay, wherever they sit.
    let mut foreign = ev[1].clone();
    foreign.kind = EventKind::PolicyDecided;
    foreign.payload = json!({"rule": "default.read"});
    let mut gateway_tool = ev[1].clone();
    gateway_tool.kind = EventKind::ToolCompleted;
    gateway_tool.payload = json!({"call_id": "0192", "output": {}});
    let mut request = ev[1].clone();
    request.kind = EventKind::RunCancelRequested;
    request.payload = json!({"task": "slow"});
    let mut note = ev[1].clone();
    note.kind = EventKind::Note;
    note.payload = json!({"text": "a person's remark on the run"});
    let mut model_audit = ev[1].clone();
    model_audit.kind = EventKind::ModelCompleted;
    model_audit.payload = json!({"call_id": "0193", "usage": {}});
    ev.insert(2, foreign);
    ev.insert(3, gateway_tool);
    ev.insert(4, request);
    ev.insert(5, note);
    ev.insert(6, model_audit);
    let report = driver::replay_events(&ev).unwrap();
    assert_eq!(report.log_hash, out.log_hash);
    // A workforce event that is out of place still diverges.
    let mut bad = ev.clone();
    bad.swap(7, 8);
    assert!(driver::replay_events(&bad).is_err());
}

#[test]
fn a_tool_that_panics_fails_its_attempt_instead_of_hanging_the_run() {
    let (out, log) = run(
        graph(
            "tasks:\n  - { id: boom, tool: flaky, args: { panic: true }, on_failure: { continue_with: recovered } }\n  - { id: calm, tool: echo, args: { ok: true } }\n",
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(out.outputs["boom"], json!("recovered"));
    let failed: Vec<Envelope> = events(&log)
        .into_iter()
        .filter(|e| e.kind == EventKind::TaskFailed)
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].payload["class"], "internal");
    // The panic's message says what went wrong.
    assert_eq!(
        failed[0].payload["message"],
        "the call panicked: flaky was asked to panic"
    );
    assert_eq!(
        driver::replay_events(&events(&log)).unwrap().log_hash,
        out.log_hash
    );
}

#[test]
fn a_spent_token_budget_stops_further_model_calls() {
    // Each scripted answer costs 15 tokens; the budget is spent after the first.
    let (out, log) = run(
        graph(
            "limits: { concurrency: 1, budget: { tokens: 15 } }\nagents:\n  w: { model: script/m, tools: [] }\ntasks:\n  - { id: a, agent: w, prompt: hi, on_failure: skip }\n  - { id: b, agent: w, prompt: hi, needs: [a], on_failure: skip }\n",
        ),
        1,
    );
    assert_eq!(out.status, RunStatus::Completed);
    let ev = events(&log);
    // One call only: `b` is refused before it asks the model.
    assert_eq!(
        ev.iter()
            .filter(|e| e.kind == EventKind::ModelRequested)
            .count(),
        1
    );
    let b_fail = ev
        .iter()
        .find(|e| e.kind == EventKind::TaskFailed && name_of(&ev, e.task_id) == "b")
        .unwrap();
    assert_eq!(b_fail.payload["class"], "budget_exceeded");
    assert_eq!(driver::replay_events(&ev).unwrap().log_hash, out.log_hash);
}

/// The typed inputs the driver and the simulator use (`apply_tool_result`,
/// `apply_model_result`) record and do what applying the same result as an event does: same
/// input bytes, same derived events, same outcome. Replay depends on it: it reads results back
/// as events.
#[test]
fn typed_results_equal_results_applied_as_events() {
    use agent_runtime_core::{
        EncodedEvent, ErrorClass, FinishReason, Message, ModelResponse, Role, ToolCall, Usage,
    };
    use agent_runtime_workforce::Effect;
    let g = graph(
        r#"
agents:
  w: { model: p/m, tools: [echo], max_turns: 3 }
tasks:
  - { id: a, tool: echo, args: { text: "x" } }
  - { id: b, tool: echo, args: {}, retry: { max_attempts: 2, backoff: 1ms } }
  - { id: c, agent: w, prompt: "go", needs: [a], retry: { max_attempts: 2, backoff: 1ms, on: [model_error] } }
"#,
    );
    let created = Engine::created_event(agent_runtime_core::RunId::from_bytes([4; 16]), &g, 1, T0);
    let mut by_event = Engine::create(&created).unwrap();
    let mut typed = Engine::create(&created).unwrap();
    let mut asked = Message::new(Role::Assistant, "\"calling\"\n");
    asked.tool_calls = vec![ToolCall {
        id: "t1".into(),
        name: "echo".into(),
        arguments: json!({"text": "é", "n": [1, 2.5]}),
    }];
    let answers = [
        Err((ErrorClass::ModelError, "overloaded \"now\"".to_string())),
        Ok(ModelResponse {
            message: asked,
            finish: FinishReason::ToolCalls,
            usage: Usage {
                input_tokens: 3,
                output_tokens: 2,
            },
        }),
        Ok(ModelResponse {
            message: Message::new(Role::Assistant, "done"),
            finish: FinishReason::Stop,
            usage: Usage::default(),
        }),
    ];
    let mut answers = answers.into_iter();
    let mut tool_results = 0;
    let mut time = T0;
    for _ in 0..40 {
        let derived: Vec<EncodedEvent> = by_event.drain_events().collect();
        assert_eq!(derived, typed.drain_events().collect::<Vec<_>>());
        let effects: Vec<Effect> = by_event.drain_effects().collect();
        typed.drain_effects();
        if by_event.is_finished() {
            break;
        }
        time = time.saturating_add(Duration::from_millis(5));
        for effect in effects {
            let (as_event, as_typed) = match effect {
                Effect::CallTool {
                    call, tool, args, ..
                } => {
                    tool_results += 1;
                    // The second tool result fails once, to go through a failure too.
                    let result = if tool_results == 2 {
                        Err((ErrorClass::ToolError, "exit 1".to_string()))
                    } else {
                        Ok(json!({"echo": args}))
                    };
                    let event = by_event.tool_result_event(call, &tool, time, result.clone());
                    (event, typed.apply_tool_result(call, &tool, time, result))
                }
                Effect::CallModel { call, .. } => {
                    let result = answers.next().expect("three model calls");
                    let event = by_event.model_result_event(
                        call,
                        time,
                        result.as_ref().map_err(Clone::clone),
                    );
                    (event, typed.apply_model_result(call, time, result))
                }
                Effect::Cancel { .. } => continue,
            };
            by_event.apply(&as_event).unwrap();
            assert_eq!(EncodedEvent::new(as_event), as_typed);
        }
        if let Some(d) = by_event.next_deadline() {
            let tick = by_event.clock_event(d.max(time));
            by_event.apply(&tick).unwrap();
            typed.apply(&tick).unwrap();
        }
    }
    assert_eq!(by_event.status(), RunStatus::Completed);
    assert_eq!(typed.status(), RunStatus::Completed);
    assert_eq!(by_event.final_outputs(), typed.final_outputs());
    assert!(tool_results >= 3, "{tool_results}");
}

/// A pump stopped at its step (the driver hands a burst to the log in steps) derives exactly
/// what one whole pump derives, whether it is gone on with step by step or an input arrives
/// while it is unfinished: replay and resume fold recorded runs in whole pumps.
#[test]
fn pumps_in_steps_derive_what_whole_pumps_derive() {
    use agent_runtime_core::{EncodedEvent, RunId};
    use agent_runtime_workforce::Effect;
    let mut yaml = String::from(
        "limits: { concurrency: 23, tools: { echo: 9 } }\ntasks:\n  - { id: root, tool: echo, args: {} }\n",
    );
    for i in 0..60 {
        let needs = if i % 2 == 0 { "[root]" } else { "[]" };
        yaml += &format!(
            "  - {{ id: t{i:02}, tool: {}, args: {{ n: {i} }}, needs: {needs}, priority: {} }}\n",
            if i % 3 == 0 { "echo" } else { "upper" },
            i % 4
        );
    }
    let g = graph(&yaml);
    let run_id = RunId::from_bytes([5; 16]);
    let created = Engine::created_event(run_id, &g, 3, T0);
    let mut whole = Engine::create(&created).unwrap();
    let mut stepped = Engine::start_in_steps(run_id, g, 3, T0, 4);
    let mut unfinished = 0;
    let mut time = T0;
    // What each engine derived since the last comparison.
    let (mut stepped_events, mut stepped_effects) = (Vec::<EncodedEvent>::new(), Vec::new());
    let (mut whole_events, mut whole_effects) = (Vec::<EncodedEvent>::new(), Vec::<Effect>::new());
    for round in 0..200 {
        // Even rounds drive the stepped engine step by step, as the driver does, and compare;
        // in odd rounds the results arrive while its pump is unfinished, and it is finished at
        // once, as a caller that records inputs does first.
        if round % 2 == 0 {
            while stepped.is_pumping() {
                unfinished += 1;
                stepped_events.extend(stepped.drain_events());
                stepped_effects.extend(stepped.drain_effects());
                stepped.pump_more();
            }
        } else if stepped.is_pumping() {
            unfinished += 1;
            stepped.finish_pump();
        }
        stepped_events.extend(stepped.drain_events());
        stepped_effects.extend(stepped.drain_effects());
        let answered = whole_effects.len();
        whole_events.extend(whole.drain_events());
        whole_effects.extend(whole.drain_effects());
        let to_answer = whole_effects[answered..].to_vec();
        if round % 2 == 0 {
            assert_eq!(stepped_events, whole_events, "round {round}");
            assert_eq!(stepped_effects, whole_effects, "round {round}");
            stepped_events.clear();
            stepped_effects.clear();
            whole_events.clear();
            whole_effects.clear();
        }
        if whole.is_finished() && round % 2 == 0 {
            break;
        }
        time = time.saturating_add(Duration::from_millis(5));
        for effect in to_answer {
            let Effect::CallTool {
                call, tool, args, ..
            } = effect
            else {
                continue;
            };
            let result = Ok(json!({ "echo": args }));
            let as_whole = whole.apply_tool_result(call, &tool, time, result.clone());
            let as_stepped = stepped.apply_tool_result(call, &tool, time, result);
            assert_eq!(as_whole, as_stepped);
            stepped_events.push(as_stepped);
            whole_events.push(as_whole);
        }
    }
    assert_eq!(whole.status(), RunStatus::Completed);
    assert_eq!(stepped.status(), RunStatus::Completed);
    assert_eq!(whole.final_outputs(), stepped.final_outputs());
    assert!(
        unfinished >= 5,
        "the pumps never stopped at their step: {unfinished}"
    );
}

/// The `n` of every `tool.requested` a test log holds durably, the appends made, and how many
/// pieces were submitted and not yet durable at most.
#[derive(Default)]
struct Durable {
    requested: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    appends: std::sync::Mutex<Vec<usize>>,
    in_flight: std::sync::atomic::AtomicUsize,
    most_in_flight: std::sync::atomic::AtomicUsize,
}

impl Durable {
    /// Records `events` as durable in `log`, after a delay.
    async fn write(
        &self,
        log: &MemoryLog,
        events: Vec<agent_runtime_core::EncodedEvent>,
    ) -> Vec<agent_runtime_core::Appended> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let n: Vec<u64> = events
            .iter()
            .filter(|e| e.kind() == EventKind::ToolRequested)
            .filter_map(|e| {
                let p: serde_json::Value = serde_json::from_slice(e.payload_json()).ok()?;
                p["args"]["n"].as_u64()
            })
            .collect();
        self.appends.lock().unwrap().push(events.len());
        let landed = log.append_encoded_now(events).unwrap();
        self.requested.lock().unwrap().extend(n);
        landed
    }
}

/// Test logs take plain events as the store does: encoded, then appended as encoded.
fn encoded(events: Vec<agent_runtime_core::NewEvent>) -> Vec<agent_runtime_core::EncodedEvent> {
    events
        .into_iter()
        .map(agent_runtime_core::EncodedEvent::new)
        .collect()
}

/// A log that makes appends durable slowly, one at a time, and answers each call only then
/// (`EventSink::submit_encoded`'s default: the driver waits for each piece as it submits it).
struct SlowSink(Arc<MemoryLog>, Arc<Durable>);

#[agent_runtime_core::async_trait]
impl agent_runtime_core::EventSink for SlowSink {
    async fn append(
        &self,
        events: Vec<agent_runtime_core::NewEvent>,
    ) -> Result<Vec<agent_runtime_core::Appended>, agent_runtime_core::SinkError> {
        self.append_encoded(encoded(events)).await
    }
    async fn append_encoded(
        &self,
        events: Vec<agent_runtime_core::EncodedEvent>,
    ) -> Result<Vec<agent_runtime_core::Appended>, agent_runtime_core::SinkError> {
        Ok(self.1.write(&self.0, events).await)
    }
}

/// A log that queues submitted pieces and makes them durable slowly, in order, on a task of its
/// own, as the store's writer does: the driver has several pieces in flight at once.
struct QueueSink {
    queue: tokio::sync::mpsc::UnboundedSender<(
        Vec<agent_runtime_core::EncodedEvent>,
        tokio::sync::oneshot::Sender<Vec<agent_runtime_core::Appended>>,
    )>,
    durable: Arc<Durable>,
}

impl QueueSink {
    /// Call inside a runtime: the writing task starts here.
    fn start(log: Arc<MemoryLog>, durable: Arc<Durable>) -> QueueSink {
        let (queue, mut incoming) = tokio::sync::mpsc::unbounded_channel::<(
            Vec<agent_runtime_core::EncodedEvent>,
            tokio::sync::oneshot::Sender<Vec<agent_runtime_core::Appended>>,
        )>();
        let writer = durable.clone();
        tokio::spawn(async move {
            while let Some((events, reply)) = incoming.recv().await {
                let landed = writer.write(&log, events).await;
                writer
                    .in_flight
                    .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                let _ = reply.send(landed);
            }
        });
        QueueSink { queue, durable }
    }
}

#[agent_runtime_core::async_trait]
impl agent_runtime_core::EventSink for QueueSink {
    async fn append(
        &self,
        events: Vec<agent_runtime_core::NewEvent>,
    ) -> Result<Vec<agent_runtime_core::Appended>, agent_runtime_core::SinkError> {
        self.append_encoded(encoded(events)).await
    }
    async fn append_encoded(
        &self,
        events: Vec<agent_runtime_core::EncodedEvent>,
    ) -> Result<Vec<agent_runtime_core::Appended>, agent_runtime_core::SinkError> {
        self.submit_encoded(events, &agent_runtime_core::AppendStream::new())
            .await?
            .await
    }
    async fn submit_encoded(
        &self,
        events: Vec<agent_runtime_core::EncodedEvent>,
        stream: &agent_runtime_core::AppendStream,
    ) -> Result<agent_runtime_core::PendingAppend, agent_runtime_core::SinkError> {
        stream.check()?;
        let (reply, landed) = tokio::sync::oneshot::channel();
        let now = self
            .durable
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        self.durable
            .most_in_flight
            .fetch_max(now, std::sync::atomic::Ordering::SeqCst);
        self.queue.send((events, reply)).unwrap();
        Ok(Box::pin(async move {
            landed
                .await
                .map_err(|_| agent_runtime_core::SinkError::new("the test log stopped"))
        }))
    }
}

/// A burst of calls goes to the log in pieces, and each call starts only once the piece holding
/// its `tool.requested` is durable: a log that is slow to make appends durable, and a tool that
/// checks, when called, that its request is already in the durable log. Both with a log that
/// answers each append only once it is durable and with one that queues pieces (the driver then
/// has several in flight).
#[test]
fn calls_of_a_burst_start_only_once_their_own_request_is_durable() {
    use agent_runtime_core::{
        CallContext, EventSink, RiskClass, Tool, ToolDescriptor, ToolError, ToolOutput, ToolSource,
        async_trait,
    };

    struct Check(ToolDescriptor, Arc<Durable>);
    #[async_trait]
    impl Tool for Check {
        fn descriptor(&self) -> &ToolDescriptor {
            &self.0
        }
        async fn call(
            &self,
            args: serde_json::Value,
            _ctx: CallContext,
        ) -> Result<ToolOutput, ToolError> {
            let n = args["n"].as_u64().unwrap_or(u64::MAX);
            let durable = self.1.requested.lock().unwrap().contains(&n);
            Ok(ToolOutput::new(json!({"durable": durable})))
        }
    }

    let n = 5000;
    let mut yaml = format!("limits: {{ concurrency: {n}, max_tasks: {n} }}\ntasks:\n");
    for i in 0..n {
        yaml.push_str(&format!(
            "  - {{ id: t{i:05}, tool: check, args: {{ n: {i} }} }}\n"
        ));
    }
    for queued in [false, true] {
        let durable = Arc::new(Durable::default());
        let mut tools = agent_runtime_workforce::tools::ToolRegistry::with_native_tools();
        tools.register(Arc::new(Check(
            ToolDescriptor {
                name: "check".into(),
                description: "reports whether its request was durable when it ran".into(),
                input_schema: json!({"type": "object"}),
                output_schema: None,
                risk: RiskClass::Read,
                source: ToolSource::Native,
            },
            durable.clone(),
        )));
        let log = Arc::new(MemoryLog::default());
        let rt = rt();
        let sink: Arc<dyn EventSink> = if queued {
            let _in = rt.enter();
            Arc::new(QueueSink::start(log.clone(), durable.clone()))
        } else {
            Arc::new(SlowSink(log.clone(), durable.clone()))
        };
        let out = rt
            .block_on(driver::run_graph(
                graph(&yaml),
                opts_at_t0(sink, Arc::new(tools)),
            ))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.status, RunStatus::Completed);
        assert_eq!(out.outputs.len(), n);
        for (id, output) in &out.outputs {
            assert_eq!(
                output["durable"], true,
                "{id} ran before its request was durable (queued log: {queued})"
            );
        }
        // The burst (run.created, run.started, then a task.started and a tool.requested per
        // task) went in more than one append: the first calls did not wait for all of it.
        let appends = durable.appends.lock().unwrap().clone();
        assert!(appends[0] < 2 * n + 2, "{appends:?}");
        // Every event the driver counted is in the log, in the order it was submitted.
        assert_eq!(log.all().len() as u64, out.events);
        // The engine started the burst in steps, each handed to the log before the next was
        // derived; replay, which folds it in one pump, derives the same events.
        let replayed = driver::replay_events(&log.all()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(replayed.log_hash, out.log_hash);
        assert_eq!(replayed.status, RunStatus::Completed);
        let most = durable
            .most_in_flight
            .load(std::sync::atomic::Ordering::SeqCst);
        if queued {
            assert!(most > 1, "the driver never had two pieces in flight");
        }
    }
}

/// A tool list that panics while a model call is being started fails that call's attempt
/// (class `internal`) instead of stopping every later call and leaving the run waiting.
#[test]
fn a_tool_list_that_panics_fails_the_model_call_instead_of_hanging_the_run() {
    let panicky = Altered {
        spec: Some(|_| panic!("no tool list today")),
        ..Altered::default()
    };
    let log = Arc::new(MemoryLog::default());
    let message = one_internal_failure(
        opts_at_t0(log.clone(), Arc::new(panicky)),
        &log,
        "agents:\n  w: { model: script/m, tools: [echo] }\ntasks:\n  - { id: a, agent: w, prompt: hi, on_failure: skip }\n  - { id: b, tool: echo, args: { ok: true } }\n",
    );
    assert_eq!(
        message,
        "listing the agent's tools panicked: no tool list today"
    );
}

/// Runs `yaml` (a task `a` whose call fails, skipped, and a task `b` that echoes
/// `{ok: true}`) on paused time, failing the test if the run hangs; checks that it completes
/// with exactly one failed attempt, of class `internal`, and returns that failure's message.
fn one_internal_failure(opts: RunOptions, log: &MemoryLog, yaml: &str) -> String {
    let out = rt()
        .block_on(async {
            // Paused time jumps to this deadline if the run waits on nothing: a hang fails.
            tokio::time::timeout(
                Duration::from_secs(3600),
                driver::run_graph(graph(yaml), opts),
            )
            .await
        })
        .expect("the run hung")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status, RunStatus::Completed);
    let failed: Vec<Envelope> = events(log)
        .into_iter()
        .filter(|e| e.kind == EventKind::TaskFailed)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].payload["class"], "internal");
    assert_eq!(out.outputs["b"], json!({"ok": true}));
    failed[0].payload["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A secret source that panics fails the call that asked it (class `internal`, without the
/// panic's message, which may quote a secret) instead of leaving the run waiting for a result
/// that never comes.
#[test]
fn a_secret_source_that_panics_fails_the_call_instead_of_hanging_the_run() {
    struct PanickyVault;
    impl agent_runtime_core::SecretSource for PanickyVault {
        fn secret(&self, _name: &str) -> Option<String> {
            panic!("vault said hunter2-value");
        }
    }
    let log = Arc::new(MemoryLog::default());
    let opts = RunOptions {
        secrets: Arc::new(PanickyVault),
        ..opts_at_t0(log.clone(), registry())
    };
    let message = one_internal_failure(
        opts,
        &log,
        "tasks:\n  - { id: a, tool: echo, args: { auth: \"{{ secrets.TOKEN }}\" }, on_failure: skip }\n  - { id: b, tool: echo, args: { ok: true } }\n",
    );
    assert_eq!(message, "reading the call's secrets panicked");
    let text = serde_json::to_string(&events(&log)).unwrap();
    assert!(!text.contains("hunter2-value"), "{text}");
}

/// `capture`: notes the arguments it was called with and returns them, as a tool that echoes
/// its token would.
struct Capture {
    d: agent_runtime_core::ToolDescriptor,
    seen: std::sync::Mutex<Vec<serde_json::Value>>,
}

impl Capture {
    /// The arguments of every call so far.
    fn lock_seen(&self) -> Vec<serde_json::Value> {
        self.seen.lock().unwrap().clone()
    }
}

#[agent_runtime_core::async_trait]
impl agent_runtime_core::Tool for Capture {
    fn descriptor(&self) -> &agent_runtime_core::ToolDescriptor {
        &self.d
    }
    async fn call(
        &self,
        args: serde_json::Value,
        _ctx: agent_runtime_core::CallContext,
    ) -> Result<agent_runtime_core::ToolOutput, agent_runtime_core::ToolError> {
        self.seen.lock().unwrap().push(args.clone());
        if args.get("panic").is_some() {
            panic!("capture choked on {args}");
        }
        if args.get("fail").is_some() {
            return Err(agent_runtime_core::ClassifiedError::new(
                agent_runtime_core::ErrorClass::ToolError,
                format!("refused {args}"),
            ));
        }
        Ok(agent_runtime_core::ToolOutput::new(json!({ "echo": args })))
    }
}

const SECRET_FLOW: &str = r#"
tasks:
  - id: a
    tool: capture
    args: { auth: "Bearer {{ secrets.TOKEN }}", nested: [{ key: "{{secrets.TOKEN}}" }], gha: "${{ secrets.TOKEN }}", plain: x }
  - id: inj
    tool: concat
    args: { parts: ["{{ secr", "ets.TOKEN }}"] }
  - id: c
    tool: capture
    args: { text: "{{ tasks.inj.output.text }}" }
  - id: f
    tool: capture
    args: { fail: yes, auth: "{{ secrets.TOKEN }}" }
    on_failure: skip
  - id: p
    tool: capture
    args: { panic: yes, auth: "{{ secrets.TOKEN }}" }
    on_failure: skip
"#;

/// Runs `SECRET_FLOW` with `secrets`: the capture tool, the outcome and the log.
fn run_with_secrets(
    secrets: Arc<dyn agent_runtime_core::SecretSource>,
) -> (Arc<Capture>, driver::Outcome, Arc<MemoryLog>) {
    let capture = Arc::new(Capture {
        d: agent_runtime_core::ToolDescriptor {
            name: "capture".into(),
            description: "notes its arguments".into(),
            input_schema: json!({"type": "object"}),
            output_schema: None,
            risk: agent_runtime_core::RiskClass::Read,
            source: agent_runtime_core::ToolSource::Native,
        },
        seen: std::sync::Mutex::new(Vec::new()),
    });
    let mut tools = agent_runtime_workforce::tools::ToolRegistry::with_native_tools();
    tools.register(capture.clone());
    let log = Arc::new(MemoryLog::default());
    let out = rt()
        .block_on(driver::run_graph(
            graph(SECRET_FLOW),
            RunOptions {
                secrets,
                ..opts_at_t0(log.clone(), Arc::new(tools))
            },
        ))
        .unwrap();
    (capture, out, log)
}

/// `{{ secrets.NAME }}` reaches the tool step's call and nothing recorded: the events keep the
/// text, the call's output and error are redacted, replay needs no secret. A reference that
/// arrives in an upstream output, or in GitHub Actions' `${{ }}`, stays text.
#[test]
fn secrets_reach_the_call_and_never_the_log() {
    const VALUE: &str = "s3cr3t-value-1";
    let secrets = Arc::new(agent_runtime_core::StaticSecrets::new([("TOKEN", VALUE)]));
    let (capture, out, log) = run_with_secrets(secrets);
    assert_eq!(out.status, RunStatus::Completed, "{out:?}");
    let seen = capture.lock_seen();
    let a = seen.iter().find(|s| s.get("plain").is_some()).unwrap();
    assert_eq!(a["auth"], format!("Bearer {VALUE}"));
    assert_eq!(a["nested"][0]["key"], VALUE);
    assert_eq!(a["gha"], "${{ secrets.TOKEN }}");
    let c = seen.iter().find(|s| s.get("text").is_some()).unwrap();
    assert_eq!(
        c["text"], "{{ secrets.TOKEN }}",
        "an upstream output is not filled in"
    );
    assert!(
        seen.iter()
            .any(|s| s["auth"] == VALUE && s.get("fail").is_some())
    );
    // Nothing recorded holds the value; the request holds the text, the result the mask.
    let all = events(&log);
    let text = serde_json::to_string(&all).unwrap();
    assert!(!text.contains(VALUE), "{text}");
    assert_eq!(out.outputs["a"]["echo"]["auth"], "Bearer [REDACTED]");
    let requested = all
        .iter()
        .find(|e| e.kind == EventKind::ToolRequested && e.payload["tool"] == "capture")
        .unwrap();
    assert_eq!(
        requested.payload["args"]["auth"],
        "Bearer {{ secrets.TOKEN }}"
    );
    let failed = all
        .iter()
        .find(|e| e.kind == EventKind::ToolFailed)
        .unwrap();
    assert!(
        failed.payload["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"auth\":\"[REDACTED]\"")),
        "{}",
        failed.payload
    );
    // A call that panics quoting its arguments: the message is recorded, masked.
    let panicked = all
        .iter()
        .find(|e| {
            e.kind == EventKind::ToolFailed
                && e.payload["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("the call panicked: capture choked on"))
        })
        .unwrap_or_else(|| panic!("{all:?}"));
    assert!(
        panicked.payload["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"auth\":\"[REDACTED]\"")),
        "{}",
        panicked.payload
    );
    // Replay feeds back the recorded (redacted) results and calls nothing.
    let report = driver::replay_events(&all).unwrap();
    assert_eq!(report.log_hash, out.log_hash);
}

/// A secret one call writes and another reads back is redacted in the second call's result
/// too, though that call names no secret: every call's result is redacted with all the run's
/// secrets.
#[test]
fn a_secret_read_back_by_another_call_is_redacted() {
    const VALUE: &str = "s3cr3t-value-2";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.txt");
    let flow = format!(
        "tasks:\n  - {{ id: w, tool: write_file, args: {{ path: '{0}', text: 'tok={{{{ secrets.TOKEN }}}}' }} }}\n  - {{ id: r, tool: read_file, needs: [w], args: {{ path: '{0}' }} }}\n",
        file.display()
    );
    let log = Arc::new(MemoryLog::default());
    let out = rt()
        .block_on(driver::run_graph(
            graph(&flow),
            RunOptions {
                secrets: Arc::new(agent_runtime_core::StaticSecrets::new([("TOKEN", VALUE)])),
                ..opts_at_t0(log.clone(), registry())
            },
        ))
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed, "{out:?}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        format!("tok={VALUE}"),
        "the call got the value"
    );
    assert_eq!(out.outputs["r"]["text"], "tok=[REDACTED]");
    let text = serde_json::to_string(&events(&log)).unwrap();
    assert!(!text.contains(VALUE), "{text}");
}

/// A secret read again when its call is made may have changed since the run started (a
/// vault rotating it): the new value is redacted too, also when two names shared the old one.
#[test]
fn a_secret_rotated_during_the_run_is_redacted() {
    struct RotatingVault(std::sync::atomic::AtomicUsize);
    impl agent_runtime_core::SecretSource for RotatingVault {
        fn secret(&self, name: &str) -> Option<String> {
            // The run reads both names once when it starts; every read after is rotated.
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Some(if n < 2 || name == "OTHER" {
                "shared-value-1".into()
            } else {
                "rotated-value-2".into()
            })
        }
    }
    let log = Arc::new(MemoryLog::default());
    let out = rt()
        .block_on(driver::run_graph(
            graph(
                "tasks:\n  - { id: a, tool: echo, args: { t: \"{{ secrets.TOKEN }}\" } }\n  - { id: b, tool: echo, args: { t: \"{{ secrets.OTHER }}\" } }\n",
            ),
            RunOptions {
                secrets: Arc::new(RotatingVault(Default::default())),
                ..opts_at_t0(log.clone(), registry())
            },
        ))
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed, "{out:?}");
    assert_eq!(out.outputs["a"]["t"], "[REDACTED]");
    assert_eq!(out.outputs["b"]["t"], "[REDACTED]");
    let text = serde_json::to_string(&events(&log)).unwrap();
    assert!(!text.contains("rotated-value"), "{text}");
    assert!(!text.contains("shared-value"), "{text}");
}

/// A secret that is not set fails the call that names it, which is never made, and the
/// message names the secret.
#[test]
fn a_missing_secret_fails_its_call_without_making_it() {
    let (capture, out, log) = run_with_secrets(Arc::new(agent_runtime_core::NoSecrets));
    assert_eq!(out.status, RunStatus::Failed, "{out:?}");
    let seen = capture.lock_seen();
    assert!(seen.iter().all(|s| s.get("plain").is_none()), "{seen:?}");
    let failed = events(&log)
        .into_iter()
        .find(|e| e.kind == EventKind::ToolFailed)
        .unwrap();
    let text = failed.payload.to_string();
    assert!(text.contains("secret `TOKEN` is not set"), "{text}");
    assert!(text.contains("invalid_arguments"), "{text}");
}

/// A secret too short to be redacted (it would match ordinary text) is refused rather than
/// handed to a call whose result might carry it into the log.
#[test]
fn a_secret_too_short_to_redact_fails_its_call() {
    let (capture, out, log) =
        run_with_secrets(Arc::new(agent_runtime_core::StaticSecrets::new([(
            "TOKEN", "abc",
        )])));
    assert_eq!(out.status, RunStatus::Failed, "{out:?}");
    assert!(capture.lock_seen().iter().all(|s| s.get("plain").is_none()));
    let text = serde_json::to_string(&events(&log)).unwrap();
    assert!(
        text.contains("secret `TOKEN` is shorter than 4 bytes"),
        "{text}"
    );
}

/// Secrets go only where a call, and nothing recorded, gets them.
#[test]
fn secrets_are_refused_where_they_would_be_recorded() {
    for (yaml, want) in [
        (
            "agents: { w: { model: script/m } }\ntasks:\n  - { id: a, agent: w, prompt: \"use {{ secrets.TOKEN }}\" }\n",
            "goes only into a tool step's arguments",
        ),
        (
            "agents: { w: { model: script/m, instructions: \"key {{ secrets.TOKEN }}\" } }\ntasks:\n  - { id: a, agent: w, prompt: hi }\n",
            "agents.w.instructions: `{{ secrets.NAME }}` goes only into a tool step's arguments",
        ),
        (
            "tasks:\n  - { id: u, tool: echo, args: {} }\n  - { id: a, tool: echo, args: { t: \"{{ secrets.TOKEN }} {{ tasks.u.output }}\" } }\n",
            "args.t names a secret and takes an upstream output",
        ),
        (
            "tasks:\n  - { id: a, tool: echo, args: { t: [\"{{ secrets.MY-TOKEN }}\"] } }\n",
            "secret name `MY-TOKEN` at args.t[0] must be letters, digits and `_`",
        ),
    ] {
        let err = agent_runtime_workforce::graph::parse_graph(yaml, std::path::Path::new("s.yaml"))
            .and_then(|g| g.validate().map(|_| g))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}");
    }
}

/// A caller that stops waiting for a run (here a timeout drops `run_graph`'s future) stops the
/// run: nothing is recorded afterwards (the slow call's result would be, a minute in). Guards
/// any change that moves the driver onto a task of its own (tried in session 10), which must
/// then abort that task.
#[test]
fn dropping_a_runs_future_stops_the_run() {
    let log = Arc::new(MemoryLog::default());
    rt().block_on(async {
        let opts = opts_at_t0(log.clone(), registry());
        let g = graph(
            "tasks:\n  - { id: slow, tool: sleep, args: { ms: 60000 } }\n  - { id: after, tool: echo, needs: [slow], args: { x: 1 } }\n",
        );
        let gave_up =
            tokio::time::timeout(Duration::from_secs(1), driver::run_graph(g, opts)).await;
        assert!(gave_up.is_err(), "the run ended within a second: {gave_up:?}");
        let recorded = log.all().len();
        assert!(recorded > 0);
        // Paused time jumps past the slow call's end.
        tokio::time::sleep(Duration::from_secs(120)).await;
        let after = log.all();
        let kinds: Vec<EventKind> = after[recorded..].iter().map(|e| e.kind).collect();
        assert!(kinds.is_empty(), "recorded after the run was dropped: {kinds:?}");
        assert!(after.iter().all(|e| e.kind != EventKind::ToolCompleted));
    });
}

/// A tool step whose fixed arguments its tool refuses stops the run before it starts: nothing
/// is recorded, and the error names the task. Templated arguments wait for the call.
#[test]
fn fixed_arguments_a_tool_refuses_stop_the_run_before_it_starts() {
    let strict = || Altered {
        check_args: Some(|name, args| {
            if name == "sleep" && !args["ms"].is_u64() {
                return Err(agent_runtime_core::ClassifiedError::new(
                    agent_runtime_core::ErrorClass::InvalidArguments,
                    "ms must be a number",
                ));
            }
            Ok(())
        }),
        ..Altered::default()
    };
    let log = Arc::new(MemoryLog::default());
    let err = rt()
        .block_on(driver::run_graph(
            graph("tasks:\n  - { id: a, tool: echo, args: { text: '5' } }\n  - { id: nap, tool: sleep, args: { ms: soon } }\n"),
            opts_at_t0(log.clone(), Arc::new(strict())),
        ))
        .unwrap_err();
    assert_eq!(err.to_string(), "task `nap`: args: ms must be a number");
    assert!(log.all().is_empty(), "{:?}", log.all());
    // The same step with its argument from upstream is checked when the call is made.
    let out = rt()
        .block_on(driver::run_graph(
            graph("tasks:\n  - { id: a, tool: echo, args: { text: '5' } }\n  - { id: nap, tool: sleep, needs: [a], args: { ms: '{{ tasks.a.output.text }}' }, on_failure: skip }\n"),
            opts_at_t0(log.clone(), Arc::new(strict())),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status, RunStatus::Completed);
    assert!(!log.all().is_empty());
}

/// The native tools, with `spec` or `check_args` replaced when set: a tool list that
/// misbehaves in one way.
struct Altered {
    inner: Arc<agent_runtime_workforce::tools::ToolRegistry>,
    spec: Option<fn(&str) -> Option<agent_runtime_core::ToolSpec>>,
    check_args: Option<ArgsCheck>,
}

type ArgsCheck = fn(&str, &serde_json::Value) -> Result<(), agent_runtime_core::ToolError>;

impl Default for Altered {
    fn default() -> Self {
        Altered {
            inner: registry(),
            spec: None,
            check_args: None,
        }
    }
}

#[agent_runtime_core::async_trait]
impl driver::ToolInvoker for Altered {
    fn names(&self) -> Vec<String> {
        driver::ToolInvoker::names(&*self.inner)
    }
    fn spec(&self, name: &str) -> Option<agent_runtime_core::ToolSpec> {
        match self.spec {
            Some(spec) => spec(name),
            None => self.inner.spec(name),
        }
    }
    async fn invoke(
        &self,
        name: &str,
        args: serde_json::Value,
        ctx: agent_runtime_core::CallContext,
    ) -> Result<agent_runtime_core::ToolOutput, agent_runtime_core::ToolError> {
        self.inner.invoke(name, args, ctx).await
    }
    fn check_args(
        &self,
        name: &str,
        args: &serde_json::Value,
    ) -> Result<(), agent_runtime_core::ToolError> {
        match self.check_args {
            Some(check) => check(name, args),
            None => self.inner.check_args(name, args),
        }
    }
}

/// A log whose reads ignore `after_seq` and `limit` (handing the whole run every time) still
/// replays to the end, with the same report: replay reads a page at a time and must not loop
/// on the same events.
#[test]
fn a_replay_ends_even_when_the_log_ignores_paging() {
    struct Unpaged(Arc<MemoryLog>);
    #[agent_runtime_core::async_trait]
    impl agent_runtime_core::EventSource for Unpaged {
        async fn query(
            &self,
            q: agent_runtime_core::EventQuery,
        ) -> Result<Vec<Envelope>, agent_runtime_core::SinkError> {
            let whole = agent_runtime_core::EventQuery {
                after_seq: None,
                limit: None,
                ..q
            };
            self.0.query(whole).await
        }
    }
    // More events than a page (4,096), so that replay asks for a second one.
    let n = 1100;
    let mut yaml = format!("limits: {{ concurrency: 64, max_tasks: {n} }}\ntasks:\n");
    for i in 0..n {
        yaml += &format!("  - {{ id: t{i}, tool: echo, args: {{ n: {i} }} }}\n");
    }
    let (out, log) = run(graph(&yaml), 1);
    assert!(out.events > 4096, "{}", out.events);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let report = rt().block_on(driver::replay(&Unpaged(log), out.run_id));
        let _ = tx.send(report.map(|r| (r.log_hash, r.events, r.finished)));
    });
    let report = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the replay never ended")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.0, out.log_hash);
    assert_eq!(report.1, out.events);
    assert!(report.2);
}

/// A log that refuses a batch stops the run with the log's own words, also when the driver
/// has several pieces of a burst in flight (a log refuses every piece after a failed one and
/// only the failed one says why): no hang, and no tool runs whose request was not recorded.
#[test]
fn a_log_that_refuses_a_batch_stops_the_run_with_its_message() {
    let mut yaml = String::from("limits: { concurrency: 3000, max_tasks: 3000 }\ntasks:\n");
    for i in 0..3000 {
        yaml.push_str(&format!(
            "  - {{ id: t{i}, tool: echo, args: {{ text: x }} }}\n"
        ));
    }
    let g = graph(&yaml);
    for accepts in [0, 1, 2, 3, 5] {
        let log = Arc::new(RefusingLog {
            accepts: accepts.into(),
        });
        let err = rt()
            .block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(600),
                    driver::run_graph(g.clone(), opts_at_t0(log, registry())),
                )
                .await
            })
            .expect("the run stops")
            .expect_err("the log refused a batch");
        assert!(
            matches!(&err, DriverError::Log(m) if m.contains("disk full at /var/log/events.db")),
            "after {accepts}: {err}"
        );
    }
}

/// Graphs that later versions refuse as authoring mistakes (a zero timeout, a template in
/// `continue_with`, a fallback that waits for its own task, a limit on a tool that does not
/// exist) were accepted before, so logs hold runs of them: such a run still resumes and replays.
#[test]
fn runs_recorded_before_newer_graph_checks_still_resume_and_replay() {
    let cases = [
        (
            "zero timeout",
            json!({"tasks": [{"id": "a", "tool": "sleep", "args": {"ms": 10}, "timeout": "0s"}]}),
            true,
        ),
        (
            "template in continue_with",
            json!({"tasks": [
                {"id": "a", "tool": "flaky", "args": {"fail": 1},
                 "on_failure": {"continue_with": "{{ tasks.b.output }}"}},
                {"id": "b", "tool": "echo", "args": {}}
            ]}),
            true,
        ),
        (
            "fallback waiting for its task",
            json!({"tasks": [
                // `a` succeeds, as it must have in a recorded run that ended (had it failed,
                // the run would have stalled, as it does now if resumed before `a` ends).
                {"id": "a", "tool": "flaky", "args": {}, "on_failure": {"fallback": "b"}},
                {"id": "b", "tool": "echo", "needs": ["a"], "args": {}},
                {"id": "c", "tool": "echo", "args": {}}
            ]}),
            true,
        ),
        (
            "limit on an unknown tool",
            json!({"limits": {"tools": {"no_such_tool": 1}}, "tasks": [{"id": "a", "tool": "echo", "args": {}}]}),
            false,
        ),
    ];
    for (what, graph_json, refused_now) in cases {
        let g: agent_runtime_workforce::graph::TaskGraph =
            serde_json::from_value(graph_json).unwrap();
        if refused_now {
            assert!(g.validate().is_err(), "{what}: a new run of it is refused");
        } else {
            let refused = rt().block_on(driver::run_graph(
                g.clone(),
                opts_at_t0(Arc::new(MemoryLog::default()), registry()),
            ));
            assert!(
                matches!(refused, Err(DriverError::Unavailable(ref m)) if m.contains("no_such_tool")),
                "{what}: {refused:?}"
            );
        }
        let run_id = agent_runtime_core::RunId::from_bytes([9; 16]);
        let created = Engine::created_event(run_id, &g, 1, T0);
        let log = MemoryLog::default();
        log.append_now(vec![created]);
        let (out, ev) = resume_from(&events(&log), 1);
        assert_ne!(out.status, RunStatus::Running, "{what}");
        let report = driver::replay_events(&ev).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(report.finished, "{what}");
        assert_eq!(report.status, out.status, "{what}");
    }
}

/// A call's context names its task as the graph does (`fetch`), for what the call asks a
/// person: two tasks of one agent, or two tool steps, would otherwise ask alike.
#[test]
fn a_call_knows_its_task_by_its_graph_id() {
    use agent_runtime_core::{
        CallContext, RiskClass, Tool, ToolDescriptor, ToolError, ToolOutput, ToolSource,
        async_trait,
    };

    struct Name(ToolDescriptor);
    #[async_trait]
    impl Tool for Name {
        fn descriptor(&self) -> &ToolDescriptor {
            &self.0
        }
        async fn call(
            &self,
            _args: serde_json::Value,
            ctx: CallContext,
        ) -> Result<ToolOutput, ToolError> {
            Ok(ToolOutput::new(json!({ "task": ctx.task_name })))
        }
    }
    let mut tools = agent_runtime_workforce::tools::ToolRegistry::with_native_tools();
    tools.register(Arc::new(Name(ToolDescriptor {
        name: "name".into(),
        description: "returns the task its context names".into(),
        input_schema: json!({"type": "object"}),
        output_schema: None,
        risk: RiskClass::Read,
        source: ToolSource::Native,
    })));
    let log = Arc::new(MemoryLog::default());
    let out = rt()
        .block_on(driver::run_graph(
            graph("tasks:\n  - { id: fetch, tool: name }\n  - { id: report, tool: name, needs: [fetch] }\n"),
            opts_at_t0(log, Arc::new(tools)),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(out.outputs["report"], json!({"task": "report"}));
}

/// A graph built in code that does not validate is refused as a graph, with its typed error
/// (it was an engine error about `run.created`, which nothing had recorded), and nothing is
/// written.
#[test]
fn an_invalid_graph_given_to_run_graph_is_refused_as_one() {
    let mut g = graph("tasks:\n  - { id: a, tool: echo }\n  - { id: b, tool: echo, needs: [a] }\n");
    g.tasks[0].needs = vec!["b".into()];
    let log = Arc::new(MemoryLog::default());
    let err = rt()
        .block_on(driver::run_graph(
            g,
            opts_at_t0(
                log.clone(),
                Arc::new(agent_runtime_workforce::tools::ToolRegistry::with_native_tools()),
            ),
        ))
        .unwrap_err();
    match &err {
        driver::DriverError::Graph(agent_runtime_workforce::graph::GraphError::Cycle {
            path,
            ..
        }) => assert_eq!(path.len(), 3, "{err}"),
        other => panic!("{other}"),
    }
    assert!(err.to_string().starts_with("invalid task graph: "), "{err}");
    assert!(log.all().is_empty());
}
