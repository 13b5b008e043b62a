//! The invocation pipeline: validation, policy, approval, timeout, cancellation, output cap,
//! redaction, hooks and the events it records.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agent_runtime_core::CancellationToken;
use agent_runtime_core::{
    Actor, Appended, ApprovalDecision, ApprovalError, ApprovalRequest, ApprovalSink, CallContext,
    Effect, Envelope, ErrorClass, EventKind, EventSink, Hash32, MemoryLog, NewEvent,
    PolicyEnvelope, RiskClass, SinkError, Tool, ToolDescriptor, ToolError, ToolOutput, ToolSource,
};
use agent_runtime_gateway::{
    CommandHook, CommandHookConfig, Gateway, GatewayBuilder, GatewayConfig, Hook, HookCall, Policy,
    PostAction, PreAction, Redactor, Registry,
};
use serde_json::{Value, json};

#[derive(Clone, Copy)]
enum Behaviour {
    Echo,
    Sleep,
    Big,
    Leak,
    /// Fails with the argument `text` as its message.
    Fail,
    /// Panics.
    Panic,
    /// Returns output cut short in the middle of the secret `hunter2-secret`.
    CutSecret,
}

struct TestTool {
    d: ToolDescriptor,
    calls: Arc<AtomicUsize>,
    seen: Arc<std::sync::Mutex<Vec<Value>>>,
    behaviour: Behaviour,
    cancelled: Arc<AtomicUsize>,
    tokens: Arc<std::sync::Mutex<Vec<CancellationToken>>>,
}

#[async_trait::async_trait]
impl Tool for TestTool {
    fn descriptor(&self) -> &ToolDescriptor {
        &self.d
    }
    async fn call(&self, args: Value, ctx: CallContext) -> Result<ToolOutput, ToolError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().unwrap().push(args.clone());
        // Kept beyond the call, so a test can see whether the gateway cancelled it even when
        // the gateway dropped the call's future.
        self.tokens.lock().unwrap().push(ctx.cancel.clone());
        match self.behaviour {
            Behaviour::Echo => Ok(ToolOutput::new(args)),
            Behaviour::Fail => Err(agent_runtime_core::ClassifiedError::tool(
                args["text"].as_str().unwrap_or_default(),
            )),
            Behaviour::Sleep => {
                let c = ctx.cancel.clone();
                let flag = self.cancelled.clone();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(30)) => Ok(ToolOutput::new(json!("late"))),
                    _ = c.cancelled() => { flag.fetch_add(1, Ordering::SeqCst); Err(ToolError::tool("stopped")) }
                }
            }
            Behaviour::Big => Ok(ToolOutput::new(json!("é".repeat(10_000)))),
            Behaviour::Panic => panic!("the test tool panics"),
            Behaviour::CutSecret => Ok(ToolOutput {
                value: json!({"stdout": "padding hunter2-se", "truncated": true}),
                truncated: true,
            }),
            Behaviour::Leak => Ok(ToolOutput::new(
                json!({"note": "the key is hunter2-secret", "token_count": 3}),
            )),
        }
    }
}

struct Handles {
    calls: Arc<AtomicUsize>,
    seen: Arc<std::sync::Mutex<Vec<Value>>>,
    cancelled: Arc<AtomicUsize>,
    tokens: Arc<std::sync::Mutex<Vec<CancellationToken>>>,
}

fn tool(name: &str, risk: RiskClass, behaviour: Behaviour) -> (Arc<dyn Tool>, Handles) {
    tool_from(name, risk, behaviour, ToolSource::Native)
}

/// [`tool`] with another source (an MCP server's, say).
fn tool_from(
    name: &str,
    risk: RiskClass,
    behaviour: Behaviour,
    source: ToolSource,
) -> (Arc<dyn Tool>, Handles) {
    let h = Handles {
        calls: Arc::default(),
        seen: Arc::default(),
        cancelled: Arc::default(),
        tokens: Arc::default(),
    };
    let t = TestTool {
        d: ToolDescriptor {
            name: name.into(),
            description: "test".into(),
            input_schema: json!({"type": "object",
                "properties": {"text": {"type": "string"}, "path": {"type": "string"},
                               "api_key": {"type": "string"}, "n": {"type": "integer", "minimum": 0}},
                "additionalProperties": false}),
            output_schema: None,
            risk,
            source,
        },
        calls: h.calls.clone(),
        seen: h.seen.clone(),
        behaviour,
        cancelled: h.cancelled.clone(),
        tokens: h.tokens.clone(),
    };
    (Arc::new(t), h)
}

struct Approve;

#[async_trait::async_trait]
impl ApprovalSink for Approve {
    async fn request(
        &self,
        _r: ApprovalRequest,
        _c: CancellationToken,
    ) -> Result<ApprovalDecision, ApprovalError> {
        Ok(ApprovalDecision {
            approved: true,
            decided_by: Actor::Person("ann".into()),
            reason: Some("fine".into()),
        })
    }
}

fn ctx() -> CallContext {
    CallContext::new(Actor::Agent("tester".into()))
}

fn kinds(log: &MemoryLog) -> Vec<EventKind> {
    log.all().iter().map(|e| e.kind).collect()
}

fn envelopes(log: &MemoryLog) -> Vec<PolicyEnvelope> {
    log.all()
        .iter()
        .filter(|e| e.kind == EventKind::PolicyDecided)
        .map(|e| serde_json::from_value(e.payload.clone()).unwrap())
        .collect()
}

fn gateway(tools: Vec<Arc<dyn Tool>>, log: Arc<MemoryLog>) -> GatewayBuilder {
    let reg = Arc::new(Registry::new());
    for t in tools {
        reg.register(t).unwrap();
    }
    // The policy only needs the root to exist; nothing is written in it. Under the target dir,
    // not a kept temp dir, so test runs leave nothing behind in /tmp.
    let ws = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pipeline-workspace");
    std::fs::create_dir_all(&ws).unwrap();
    GatewayBuilder::new(reg, log).policy(Policy::defaults(vec![ws]).unwrap())
}

fn verify_chain(log: &MemoryLog) {
    let mut prev = Hash32::GENESIS;
    for e in log.all() {
        assert_eq!(e.prev_hash, prev);
        assert_eq!(e.computed_hash(), e.hash);
        prev = e.hash;
    }
}

#[tokio::test]
async fn allowed_call_records_request_decision_start_result() {
    let log = Arc::new(MemoryLog::default());
    let (t, h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let gw = gateway(vec![t], log.clone()).build().unwrap();
    let out = gw
        .call("t.read", json!({"text": "hi"}), ctx())
        .await
        .unwrap();
    assert_eq!(out.value, json!({"text": "hi"}));
    assert_eq!(h.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        kinds(&log),
        [
            EventKind::ToolRequested,
            EventKind::PolicyDecided,
            EventKind::ToolStarted,
            EventKind::ToolCompleted
        ]
    );
    let env = &envelopes(&log)[0];
    assert_eq!(env.effect, Effect::Allow);
    assert_eq!(env.rule, "default.read");
    assert_eq!(env.decided_by, "policy");
    assert_eq!(env.subject, Actor::Agent("tester".into()));
    assert_eq!(
        env.arguments_digest,
        PolicyEnvelope::digest_arguments(&json!({"text": "hi"}))
    );
    let all = log.all();
    assert_eq!(all[0].actor, Actor::Agent("tester".into()));
    assert_eq!(all[3].payload["output"], json!({"text": "hi"}));
    verify_chain(&log);
}

#[tokio::test]
async fn invalid_arguments_never_reach_the_tool() {
    let log = Arc::new(MemoryLog::default());
    let (t, h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let gw = gateway(vec![t], log.clone()).build().unwrap();
    for (args, needle) in [
        (json!({"n": -1}), "/n"),
        (json!({"n": "three"}), "/n"),
        (json!({"bogus": 1}), "bogus"),
        (json!([1, 2]), "(root)"),
    ] {
        let err = gw.call("t.read", args.clone(), ctx()).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidArguments, "{args}");
        assert!(err.message.contains(needle), "{args}: {}", err.message);
        assert!(err.message.contains("t.read"), "{}", err.message);
        // The same facts as data: one entry per violation, with where it is.
        let details = err
            .details
            .as_ref()
            .expect("invalid_arguments carries details");
        assert_eq!(details["tool"], "t.read");
        let errors = details["errors"].as_array().unwrap();
        assert!(!errors.is_empty());
        assert!(
            errors
                .iter()
                .any(|e| e["at"].as_str().unwrap().contains(needle)
                    || e["error"].as_str().unwrap().contains(needle)),
            "{details}"
        );
    }
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
    let err = gw.call("no.such", json!({}), ctx()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::InvalidArguments);
    assert!(
        err.message.contains("unknown tool") && err.message.contains("t.read"),
        "{}",
        err.message
    );
    assert!(
        kinds(&log)
            .iter()
            .all(|k| matches!(k, EventKind::ToolRequested | EventKind::ToolFailed))
    );
}

/// `check_args` (the gateway's and its tool handles') validates as a call does, and runs,
/// records and asks nothing.
#[tokio::test]
async fn checking_arguments_validates_as_a_call_and_records_nothing() {
    let log = Arc::new(MemoryLog::default());
    let (t, h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let gw = gateway(vec![t], log.clone()).build().unwrap();
    let handle = gw.tool_handle("t.read").unwrap();
    let bad = json!({"n": "three"});
    let by_call = gw.call("t.read", bad.clone(), ctx()).await.unwrap_err();
    let seen_by_call = log.all().len();
    for checked in [gw.check_args("t.read", &bad), handle.check_args(&bad)] {
        let err = checked.unwrap_err();
        assert_eq!(err.class, ErrorClass::InvalidArguments);
        assert_eq!(err.message, by_call.message);
    }
    assert!(gw.check_args("t.read", &json!({"n": 3})).is_ok());
    let err = gw.check_args("no.such", &json!({})).unwrap_err();
    assert!(err.message.contains("unknown tool"), "{}", err.message);
    // A likely typo gets the closest name.
    let err = gw.check_args("t.raed", &json!({})).unwrap_err();
    assert!(
        err.message
            .starts_with("unknown tool \"t.raed\" (did you mean `t.read`?); known tools: t.read"),
        "{}",
        err.message
    );
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
    assert_eq!(log.all().len(), seen_by_call, "a check recorded events");
}

/// A call of the empty name is refused and recorded with actors that read back (`tool:` would
/// not: one such event made `audit tail` fail on the whole database).
#[tokio::test]
async fn an_empty_tool_name_is_recorded_with_an_actor_that_reads_back() {
    let log = Arc::new(MemoryLog::default());
    let (t, _h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let gw = gateway(vec![t], log.clone()).build().unwrap();
    let err = gw.call("", json!({}), ctx()).await.unwrap_err();
    assert!(err.message.contains("unknown tool"), "{}", err.message);
    let events = log.all();
    assert!(!events.is_empty());
    for e in events {
        let text = e.actor.to_string();
        assert_eq!(text.parse::<Actor>().ok(), Some(e.actor.clone()), "{text}");
    }
}

/// Arguments too large for their event are refused as such, recorded by size and digest,
/// not reported as a log failure.
#[tokio::test]
async fn arguments_too_large_to_record_are_refused_as_arguments() {
    let log = Arc::new(MemoryLog::default());
    let (t, h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let gw = gateway(vec![t], log.clone()).build().unwrap();
    let big = "x".repeat(agent_runtime_core::MAX_ARGUMENT_BYTES);
    let err = gw
        .call("t.read", json!({ "text": big }), ctx())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::InvalidArguments);
    assert!(err.message.contains("bytes of JSON"), "{}", err.message);
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
    let events = log.all();
    assert_eq!(events[0].kind, EventKind::ToolRequested);
    assert!(events[0].payload.get("arguments").is_none());
    assert!(events[0].payload["arguments_bytes"].as_u64().unwrap() > big.len() as u64);
    assert_eq!(events[1].kind, EventKind::ToolFailed);
}

/// A value hidden because of its key (`api_key`) is a secret of the call wherever else it
/// shows up: another argument, the output, the digest.
#[tokio::test]
async fn a_value_under_a_secret_key_is_hidden_everywhere_in_its_call() {
    let log = Arc::new(MemoryLog::default());
    let (t, _h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let gw = gateway(vec![t], log.clone()).build().unwrap();
    let out = gw
        .call(
            "t.read",
            json!({"api_key": "argsecret999", "text": "key=argsecret999"}),
            ctx(),
        )
        .await
        .unwrap();
    // A check's report, which is printed, has it nowhere either: not in the arguments, nor
    // in the paths the policy resolved.
    let report = gw
        .check(
            "t.read",
            json!({"api_key": "argsecret999", "path": "dir/argsecret999"}),
            &Actor::Agent("a".into()),
        )
        .await
        .unwrap();
    let shown = format!("{:?} {:?}", report.arguments, report.decision.paths);
    assert!(report.decision.paths.len() == 1, "{shown}");
    assert!(!shown.contains("argsecret999"), "{shown}");
    // Redacted in the output returned too, as a configured secret is; the log has it nowhere.
    assert_eq!(out.value["text"], "key=[REDACTED]");
    let recorded =
        serde_json::to_string(&log.all().iter().map(|e| &e.payload).collect::<Vec<_>>()).unwrap();
    assert!(!recorded.contains("argsecret999"), "{recorded}");
    assert!(recorded.contains("key=[REDACTED]"), "{recorded}");
}

#[tokio::test]
async fn denied_call_is_recorded_and_not_run() {
    let log = Arc::new(MemoryLog::default());
    let (t, h) = tool("t.write", RiskClass::Write, Behaviour::Echo);
    let gw = gateway(vec![t], log.clone()).build().unwrap();
    let err = gw
        .call("t.write", json!({"path": "/etc/passwd"}), ctx())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::PolicyDenied);
    assert!(
        err.message.contains("default.write-outside"),
        "{}",
        err.message
    );
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        kinds(&log),
        [
            EventKind::ToolRequested,
            EventKind::PolicyDecided,
            EventKind::ToolFailed
        ]
    );
    assert_eq!(envelopes(&log)[0].effect, Effect::Deny);
}

#[tokio::test]
async fn ask_without_a_person_is_denied_and_with_one_runs() {
    let log = Arc::new(MemoryLog::default());
    let (t, h) = tool("t.exec", RiskClass::Exec, Behaviour::Echo);
    let gw = gateway(vec![t.clone()], log.clone()).build().unwrap();
    let err = gw.call("t.exec", json!({}), ctx()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::ApprovalDenied);
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        kinds(&log),
        [
            EventKind::ToolRequested,
            EventKind::PolicyDecided,
            EventKind::ApprovalRequested,
            EventKind::ApprovalDecided,
            EventKind::PolicyDecided,
            EventKind::ToolFailed
        ]
    );
    let envs = envelopes(&log);
    assert_eq!(
        (envs[0].effect, envs[0].decided_by.as_str()),
        (Effect::Ask, "policy")
    );
    assert_eq!(
        (envs[1].effect, envs[1].decided_by.as_str()),
        (Effect::Deny, "system")
    );

    let log = Arc::new(MemoryLog::default());
    let gw = gateway(vec![t], log.clone())
        .approval(Arc::new(Approve))
        .build()
        .unwrap();
    gw.call("t.exec", json!({}), ctx()).await.unwrap();
    assert_eq!(h.calls.load(Ordering::SeqCst), 1);
    let envs = envelopes(&log);
    assert_eq!(
        (envs[1].effect, envs[1].decided_by.as_str()),
        (Effect::Allow, "person:ann")
    );
    assert_eq!(kinds(&log).last(), Some(&EventKind::ToolCompleted));
}

/// A gateway built without a policy has no workspace: a library never takes the process's
/// working folder for one (it once did, so a relative path was written where the process
/// happened to run).
#[tokio::test]
async fn without_a_policy_no_write_is_inside_a_workspace() {
    let log = Arc::new(MemoryLog::default());
    let (t, h) = tool("t.write", RiskClass::Write, Behaviour::Echo);
    let reg = Arc::new(Registry::new());
    reg.register(t).unwrap();
    let gw = GatewayBuilder::new(reg, log.clone()).build().unwrap();
    let here = std::env::current_dir().unwrap().join("x.txt");
    for path in ["x.txt".to_string(), here.display().to_string()] {
        let err = gw
            .call("t.write", json!({"path": path}), ctx())
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::PolicyDenied, "{path}: {err}");
    }
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
    assert!(
        envelopes(&log)
            .iter()
            .all(|e| e.effect == Effect::Deny && e.rule == "default.write-outside"),
        "{:?}",
        envelopes(&log)
    );
}

#[tokio::test]
async fn timeout_stops_the_tool() {
    let log = Arc::new(MemoryLog::default());
    let (t, h) = tool("t.slow", RiskClass::Read, Behaviour::Sleep);
    let gw = gateway(vec![t], log.clone()).build().unwrap();
    let mut c = ctx();
    c.timeout = Some(Duration::from_millis(50));
    let err = gw.call("t.slow", json!({}), c).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Timeout, "{err}");
    assert_eq!(kinds(&log).last(), Some(&EventKind::ToolFailed));
    assert_eq!(log.all().last().unwrap().payload["class"], "timeout");
    assert!(
        h.tokens.lock().unwrap()[0].is_cancelled(),
        "the tool is told to stop"
    );
}

/// The gateway's default limit is for calls that set none: a caller's longer limit (a task's
/// `timeout`) is kept, and a tool's own shorter one still caps it.
#[tokio::test]
async fn the_default_timeout_applies_only_where_no_limit_is_set() {
    let log = Arc::new(MemoryLog::default());
    let (t, _h) = tool("t.slow", RiskClass::Read, Behaviour::Sleep);
    let gw = gateway(vec![t], log.clone())
        .config(agent_runtime_gateway::GatewayConfig {
            default_timeout: Duration::from_millis(20),
            ..Default::default()
        })
        .build()
        .unwrap();
    let started_with = |log: &MemoryLog| {
        log.all()
            .iter()
            .rev()
            .find(|e| e.kind == EventKind::ToolStarted)
            .map(|e| e.payload["timeout_ms"].clone())
    };
    let err = gw.call("t.slow", json!({}), ctx()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Timeout, "{err}");
    assert_eq!(started_with(&log), Some(json!(20)));
    let mut c = ctx();
    c.timeout = Some(Duration::from_millis(150));
    let err = gw.call("t.slow", json!({}), c).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Timeout, "{err}");
    assert!(err.message.contains("150 ms"), "{err}");
    assert_eq!(started_with(&log), Some(json!(150)));
}

/// A call its caller drops unfinished (a task's timeout, a cancelled run: the workforce drops
/// the call's future) still gets its end in the audit trail: a question nobody answered is
/// decided by the system, and a started call fails as cancelled. Both were left open.
#[tokio::test]
async fn a_call_dropped_unfinished_records_how_it_ended() {
    struct NeverAnswers;
    #[async_trait::async_trait]
    impl ApprovalSink for NeverAnswers {
        async fn request(
            &self,
            _r: ApprovalRequest,
            cancel: CancellationToken,
        ) -> Result<ApprovalDecision, ApprovalError> {
            cancel.cancelled().await;
            Err(agent_runtime_core::ClassifiedError::new(
                ErrorClass::Cancelled,
                "withdrawn",
            ))
        }
    }

    // Dropped while its question is open.
    let log = Arc::new(MemoryLog::default());
    let (t, h) = tool("t.exec", RiskClass::Exec, Behaviour::Echo);
    let gw = gateway(vec![t], log.clone())
        .approval(Arc::new(NeverAnswers))
        .build()
        .unwrap();
    let dropped = tokio::time::timeout(
        Duration::from_millis(50),
        gw.call("t.exec", json!({}), ctx()),
    )
    .await;
    assert!(dropped.is_err(), "the call waits for its answer");
    // Each end is appended by a task of its own: waited for, not slept on.
    gw.ends_in_flight().recorded().await;
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
    let events = log.all();
    assert_eq!(
        events.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [
            EventKind::ToolRequested,
            EventKind::PolicyDecided,
            EventKind::ApprovalRequested,
            EventKind::ApprovalDecided,
            EventKind::ToolFailed
        ]
    );
    let decided = &events[3];
    assert_eq!(decided.actor, Actor::System);
    assert_eq!(decided.payload["approved"], false);
    assert_eq!(
        decided.payload["request_id"],
        events[2].payload["request_id"]
    );
    assert_eq!(events[4].payload["class"], "cancelled");
    assert_eq!(events[4].payload["call_id"], events[0].payload["call_id"]);
    verify_chain(&log);

    // Dropped while it runs.
    let log = Arc::new(MemoryLog::default());
    let (t, _h) = tool("t.slow", RiskClass::Read, Behaviour::Sleep);
    let gw = gateway(vec![t], log.clone()).build().unwrap();
    let dropped = tokio::time::timeout(
        Duration::from_millis(50),
        gw.call("t.slow", json!({}), ctx()),
    )
    .await;
    assert!(dropped.is_err());
    gw.ends_in_flight().recorded().await;
    let events = log.all();
    assert_eq!(
        events.last().unwrap().kind,
        EventKind::ToolFailed,
        "{:?}",
        kinds(&log)
    );
    assert_eq!(events.last().unwrap().payload["class"], "cancelled");
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == EventKind::ToolStarted)
            .count(),
        1
    );

    // A call that ends on its own records its end once.
    let log = Arc::new(MemoryLog::default());
    let (t, _h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let gw = gateway(vec![t], log.clone()).build().unwrap();
    gw.call("t.read", json!({}), ctx()).await.unwrap();
    gw.ends_in_flight().recorded().await;
    assert_eq!(kinds(&log).last(), Some(&EventKind::ToolCompleted));
    assert_eq!(
        kinds(&log)
            .iter()
            .filter(|k| **k == EventKind::ToolFailed)
            .count(),
        0
    );
}

/// A sink that times answers itself (from when it shows the question) gets no limit from the
/// gateway: its answer after longer than `approval_timeout` counts; another sink's does not.
#[tokio::test]
async fn a_sink_that_times_answers_gets_no_limit_of_the_gateway_s() {
    struct Slow(bool);
    #[async_trait::async_trait]
    impl ApprovalSink for Slow {
        async fn request(
            &self,
            r: ApprovalRequest,
            _cancel: CancellationToken,
        ) -> Result<ApprovalDecision, ApprovalError> {
            assert_eq!(r.answer_within_ms, Some(50));
            tokio::time::sleep(Duration::from_millis(150)).await;
            Ok(ApprovalDecision {
                approved: true,
                decided_by: Actor::Person("ann".into()),
                reason: None,
            })
        }
        fn times_answers(&self) -> bool {
            self.0
        }
    }
    for times_answers in [true, false] {
        let log = Arc::new(MemoryLog::default());
        let (t, h) = tool("t.exec", RiskClass::Exec, Behaviour::Echo);
        let gw = gateway(vec![t], log.clone())
            .approval(Arc::new(Slow(times_answers)))
            .config(agent_runtime_gateway::GatewayConfig {
                approval_timeout: Duration::from_millis(50),
                ..Default::default()
            })
            .build()
            .unwrap();
        let r = gw.call("t.exec", json!({}), ctx()).await;
        assert_eq!(r.is_ok(), times_answers, "{r:?}");
        assert_eq!(h.calls.load(Ordering::SeqCst), usize::from(times_answers));
    }
}

/// A call that unwinds from a panic (the workforce catches a tool's) records its end as a panic,
/// not as a cancellation; a log that will never take the events (one too large) is an internal
/// error, not `audit_unavailable`, which stops a run for a resume that would meet it again.
#[tokio::test]
async fn a_panic_and_a_refusing_log_are_recorded_for_what_they_are() {
    let log = Arc::new(MemoryLog::default());
    let (t, _h) = tool("t.boom", RiskClass::Read, Behaviour::Panic);
    let gw = gateway(vec![t], log.clone()).build().unwrap();
    let joined = tokio::spawn(async move { gw.call("t.boom", json!({}), ctx()).await }).await;
    assert!(joined.unwrap_err().is_panic());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let last = log.all().pop().unwrap();
    assert_eq!(last.kind, EventKind::ToolFailed);
    assert_eq!(last.payload["class"], "internal", "{:?}", last.payload);
    assert!(
        last.payload["message"]
            .as_str()
            .unwrap()
            .contains("panicked")
    );

    struct Refusing;
    #[async_trait::async_trait]
    impl EventSink for Refusing {
        async fn append(&self, _events: Vec<NewEvent>) -> Result<Vec<Appended>, SinkError> {
            Err(SinkError::refused(
                "an event of 20000000 bytes is over the limit",
            ))
        }
    }
    let (t, h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let reg = Arc::new(Registry::new());
    reg.register(t).unwrap();
    let gw = GatewayBuilder::new(reg, Arc::new(Refusing))
        .build()
        .unwrap();
    let err = gw.call("t.read", json!({}), ctx()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Internal, "{err}");
    assert!(err.message.contains("over the limit"), "{err}");
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn cancellation_reaches_the_tool() {
    let log = Arc::new(MemoryLog::default());
    let (t, h) = tool("t.slow", RiskClass::Read, Behaviour::Sleep);
    let gw = gateway(vec![t], log.clone()).build().unwrap();
    let c = ctx();
    let token = c.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        token.cancel();
    });
    let err = gw.call("t.slow", json!({}), c).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Cancelled);
    assert_eq!(h.calls.load(Ordering::SeqCst), 1);
    assert!(h.tokens.lock().unwrap()[0].is_cancelled());
}

#[tokio::test]
async fn a_secret_argument_is_not_quoted_in_a_validation_error() {
    let log = Arc::new(MemoryLog::default());
    let (t, _h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let gw = gateway(vec![t], log.clone()).build().unwrap();
    let err = gw
        .call("t.read", json!({"api_key": ["sk-live-abcdef123"]}), ctx())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::InvalidArguments);
    assert!(err.message.contains("/api_key"), "{}", err.message);
    assert!(
        !err.message.contains("sk-live-abcdef123"),
        "{}",
        err.message
    );
    let text = serde_json::to_string(&log.all()).unwrap();
    assert!(!text.contains("sk-live-abcdef123"), "{text}");
}

#[tokio::test]
async fn long_output_is_capped_and_marked() {
    let log = Arc::new(MemoryLog::default());
    let (t, _h) = tool("t.big", RiskClass::Read, Behaviour::Big);
    let config = GatewayConfig {
        max_output_bytes: 101,
        ..GatewayConfig::default()
    };
    let gw = gateway(vec![t], log.clone())
        .config(config)
        .build()
        .unwrap();
    let out = gw.call("t.big", json!({}), ctx()).await.unwrap();
    assert!(out.truncated);
    let s = out.value.as_str().unwrap();
    // 101 bytes of JSON: the quotes and 49 two-byte characters, cut at a character boundary.
    assert_eq!(s.len(), 98);
    assert_eq!(log.all().last().unwrap().payload["truncated"], true);

    // A structure over the limit keeps its shape: its strings are cut, and it is marked.
    let (echo, _h) = tool("t.echo", RiskClass::Read, Behaviour::Echo);
    let gw = gateway(vec![echo], log.clone())
        .config(GatewayConfig {
            max_output_bytes: 101,
            ..GatewayConfig::default()
        })
        .build()
        .unwrap();
    let out = gw
        .call("t.echo", json!({"n": 3, "text": "x".repeat(200)}), ctx())
        .await
        .unwrap();
    assert!(out.truncated);
    assert_eq!(out.value["n"], 3);
    let text = out.value["text"].as_str().unwrap();
    assert!(text.len() > 50 && text.len() < 101, "{}", text.len());
    assert!(serde_json::to_string(&out.value).unwrap().len() <= 101);
    assert_eq!(log.all().last().unwrap().payload["truncated"], true);
    // One that is over the limit even with its strings emptied is refused with its size, not
    // cut into broken JSON text.
    let (echo, _h) = tool("t.echo", RiskClass::Read, Behaviour::Echo);
    let gw20 = gateway(vec![echo], log.clone())
        .config(GatewayConfig {
            max_output_bytes: 20,
            ..GatewayConfig::default()
        })
        .build()
        .unwrap();
    let args = json!({"n": 12345, "path": "p", "api_key": ""});
    let err = gw20.call("t.echo", args.clone(), ctx()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::ToolError);
    assert_eq!(
        err.message,
        format!(
            "the output of t.echo is {} bytes of JSON, over the gateway's limit of 20 (limits.max_output_bytes) even with every string in it emptied",
            serde_json::to_string(&args).unwrap().len()
        )
    );
    let last = log.all().last().unwrap().clone();
    assert_eq!(last.kind, EventKind::ToolFailed);
    // Small structures pass as they are.
    let out = gw
        .call("t.echo", json!({"text": "x"}), ctx())
        .await
        .unwrap();
    assert_eq!((out.value, out.truncated), (json!({"text": "x"}), false));
}

#[tokio::test]
async fn secrets_never_reach_the_log() {
    let log = Arc::new(MemoryLog::default());
    let (t, _h) = tool("t.leak", RiskClass::Read, Behaviour::Leak);
    let mut r = Redactor::new();
    r.add_secret("hunter2-secret");
    let gw = gateway(vec![t], log.clone()).redactor(r).build().unwrap();
    let out = gw
        .call("t.leak", json!({"api_key": "sk-live-123456"}), ctx())
        .await
        .unwrap();
    assert_eq!(out.value["note"], "the key is [REDACTED]");
    assert_eq!(
        out.value["token_count"], 3,
        "returned output keeps non-secret keys"
    );
    let text = serde_json::to_string(&log.all()).unwrap();
    assert!(!text.contains("sk-live-123456"), "{text}");
    assert!(!text.contains("hunter2-secret"), "{text}");
    assert!(text.contains("[REDACTED]"));
}

/// The arguments' digest is of the redacted arguments when they hold a secret the gateway
/// knows (a `${VAR}` of its configuration), as for the call's own: a digest of the plain ones
/// let anyone holding the log confirm a guessed secret.
#[tokio::test]
async fn an_argument_digest_does_not_confirm_a_guessed_secret() {
    let log = Arc::new(MemoryLog::default());
    let (t, _h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let mut r = Redactor::new();
    r.add_secret("hunter2-secret");
    let gw = gateway(vec![t], log.clone()).redactor(r).build().unwrap();
    gw.call("t.read", json!({"text": "hunter2-secret"}), ctx())
        .await
        .unwrap();
    let requested = log
        .all()
        .into_iter()
        .find(|e| e.kind == EventKind::ToolRequested)
        .unwrap();
    let digest = requested.payload["arguments_digest"].clone();
    let of = |v: Value| json!(PolicyEnvelope::digest_arguments(&v));
    assert_ne!(digest, of(json!({"text": "hunter2-secret"})));
    assert_eq!(digest, of(json!({"text": "[REDACTED]"})));
}

/// An output the tool cut short in the middle of a secret keeps nothing of it: the secret's
/// start was returned and recorded in the clear, not being the secret's whole form.
#[tokio::test]
async fn a_secret_cut_in_two_by_an_output_limit_is_redacted() {
    let log = Arc::new(MemoryLog::default());
    let (t, _h) = tool("t.cut", RiskClass::Read, Behaviour::CutSecret);
    let mut r = Redactor::new();
    r.add_secret("hunter2-secret");
    let gw = gateway(vec![t], log.clone()).redactor(r).build().unwrap();
    let out = gw.call("t.cut", json!({}), ctx()).await.unwrap();
    assert_eq!(out.value["stdout"], "padding [REDACTED]");
    let text = serde_json::to_string(&log.all()).unwrap();
    assert!(!text.contains("hunter2-se"), "{text}");
}

/// What the runtime trusts is no tool's to change, whatever the tool says of its own risk: an
/// MCP tool marked read-only that names a protected file is denied (one rewrote the policy),
/// as is one whose path resolves to nothing (a relative path of an MCP tool could be the
/// policy) and any path in a configuration folder at any depth; the built-in reader may read.
#[tokio::test]
async fn protected_files_are_no_tool_s_to_change_whatever_its_risk() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    std::fs::write(root.join("policy.yaml"), "rules: []\n").unwrap();
    let mcp = ToolSource::Mcp {
        server: "files".into(),
    };
    let (writer, writes) = tool_from("files.write", RiskClass::Read, Behaviour::Echo, mcp.clone());
    let (mover, moves) = tool_from("files.move", RiskClass::Write, Behaviour::Echo, mcp);
    let (reader, reads) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let log = Arc::new(MemoryLog::default());
    let gw = gateway(vec![writer, mover, reader], log.clone())
        .policy(Policy::from_yaml("rules:\n  - { id: allow-all, effect: allow }\n", &root).unwrap())
        .config(agent_runtime_gateway::GatewayConfig {
            protected: vec![root.join("policy.yaml")],
            ..Default::default()
        })
        .build()
        .unwrap();
    let policy = root.join("policy.yaml").display().to_string();
    let sub = root
        .join("pkg/.agent-runtime/gateway.yaml")
        .display()
        .to_string();
    for path in [policy.as_str(), "policy.yaml", sub.as_str()] {
        let err = gw
            .call("files.write", json!({"path": path}), ctx())
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::PolicyDenied, "{path}: {err}");
        assert!(err.message.contains("default.protected"), "{path}: {err}");
    }
    assert_eq!(writes.calls.load(Ordering::SeqCst), 0);
    // The folder holding it, to a tool that may write: moved away, it takes the policy along
    // (an MCP server's `move` of the configuration's folder, then a new one in its place). A
    // reader may still name the folder (to list it).
    let folder = root.display().to_string();
    let err = gw
        .call("files.move", json!({"path": folder}), ctx())
        .await
        .unwrap_err();
    assert!(err.message.contains("default.protected"), "{err}");
    assert_eq!(moves.calls.load(Ordering::SeqCst), 0);
    gw.call("files.write", json!({"path": folder}), ctx())
        .await
        .unwrap();
    gw.call("t.read", json!({"path": policy}), ctx())
        .await
        .unwrap();
    assert_eq!(reads.calls.load(Ordering::SeqCst), 1);
}

/// An error the gateway itself makes quotes what the caller sent (a schema error the value it
/// refuses, an unknown tool its name): what the caller gets back is redacted as the log is.
#[tokio::test]
async fn errors_returned_to_the_caller_are_redacted() {
    let log = Arc::new(MemoryLog::default());
    let (t, _h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let mut r = Redactor::new();
    r.add_secret("supersecretvalue123");
    let gw = gateway(vec![t], log.clone()).redactor(r).build().unwrap();
    let err = gw
        .call("t.read", json!({"n": "supersecretvalue123"}), ctx())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::InvalidArguments);
    let returned = format!("{} {:?}", err.message, err.details);
    assert!(returned.contains("[REDACTED]"), "{returned}");
    assert!(!returned.contains("supersecret"), "{returned}");
    let err = gw
        .call("nosuch-supersecretvalue123", json!({}), ctx())
        .await
        .unwrap_err();
    assert!(!err.message.contains("supersecret"), "{}", err.message);
    let logged = serde_json::to_string(&log.all()).unwrap();
    assert!(!logged.contains("supersecret"), "{logged}");
}

/// A long error message is cut after it is redacted: a secret across the cut is hidden whole,
/// not left as a prefix that no longer matches it.
#[tokio::test]
async fn a_long_error_is_cut_after_redaction() {
    let log = Arc::new(MemoryLog::default());
    let (t, _h) = tool("t.fail", RiskClass::Read, Behaviour::Fail);
    let mut r = Redactor::new();
    r.add_secret("hunter2-secret");
    let gw = gateway(vec![t], log.clone()).redactor(r).build().unwrap();
    let text = format!("{}hunter2-secret{}", "x".repeat(1995), "y".repeat(5000));
    let err = gw
        .call("t.fail", json!({ "text": text }), ctx())
        .await
        .unwrap_err();
    assert_eq!(
        err.message.len(),
        agent_runtime_gateway::MAX_ERROR_BYTES + 3
    );
    assert!(
        err.message.ends_with("x[REDA..."),
        "{}",
        &err.message[1990..]
    );
    let logged = serde_json::to_string(&log.all()).unwrap();
    assert!(!logged.contains("hunter"), "{logged}");
}

struct RustHook;

#[async_trait::async_trait]
impl Hook for RustHook {
    fn name(&self) -> &str {
        "guard"
    }
    async fn pre_call(&self, call: &HookCall<'_>) -> Result<PreAction, ToolError> {
        Ok(match call.arguments.get("text").and_then(Value::as_str) {
            Some("forbidden") => PreAction::Deny("forbidden text".into()),
            Some("rewrite-me") => PreAction::Rewrite(json!({"text": "rewritten"})),
            Some("rewrite-badly") => PreAction::Rewrite(json!({"text": 5})),
            _ => PreAction::Continue,
        })
    }
    async fn post_call(
        &self,
        _call: &HookCall<'_>,
        out: &ToolOutput,
    ) -> Result<PostAction, ToolError> {
        if out.value.to_string().contains("classified") {
            return Ok(PostAction::Replace(ToolOutput::new(json!("[withheld]"))));
        }
        Ok(PostAction::Continue)
    }
}

#[tokio::test]
async fn rust_hooks_deny_rewrite_and_redact() {
    let log = Arc::new(MemoryLog::default());
    let (t, h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let gw = gateway(vec![t], log.clone())
        .hook(Arc::new(RustHook))
        .build()
        .unwrap();
    let err = gw
        .call("t.read", json!({"text": "forbidden"}), ctx())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::PolicyDenied);
    let env = envelopes(&log).pop().unwrap();
    assert_eq!(
        (env.decided_by.as_str(), env.effect),
        ("hook:guard", Effect::Deny)
    );

    let out = gw
        .call("t.read", json!({"text": "rewrite-me"}), ctx())
        .await
        .unwrap();
    assert_eq!(out.value, json!({"text": "rewritten"}));
    assert_eq!(
        h.seen.lock().unwrap().last().unwrap(),
        &json!({"text": "rewritten"})
    );
    // The decision is about the rewritten arguments.
    let env = envelopes(&log).pop().unwrap();
    assert_eq!(
        env.arguments_digest,
        PolicyEnvelope::digest_arguments(&json!({"text": "rewritten"}))
    );

    let err = gw
        .call("t.read", json!({"text": "rewrite-badly"}), ctx())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::InvalidArguments);
    assert!(err.message.contains("hook guard"), "{}", err.message);

    let out = gw
        .call("t.read", json!({"text": "classified plans"}), ctx())
        .await
        .unwrap();
    assert_eq!(out.value, json!("[withheld]"));
    // What the log records as the output is what the hook put in its place.
    let completed = log
        .all()
        .into_iter()
        .rev()
        .find(|e| e.kind == EventKind::ToolCompleted)
        .unwrap();
    assert_eq!(completed.payload["output"], json!("[withheld]"));
}

fn sh_hook(name: &str, script: &str) -> Arc<dyn Hook> {
    Arc::new(
        CommandHook::new(CommandHookConfig {
            name: name.into(),
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            tools: vec![],
            phases: vec![],
            timeout_ms: Some(5000),
            cwd: None,
        })
        .unwrap(),
    )
}

/// A hook's script (named by its command) that changes under a running gateway is not run:
/// the call is denied, even when the script was put back between (a tool rewrote it through a
/// name the protection did not know, and the hook ran it outside the sandbox).
#[tokio::test]
async fn a_hook_whose_script_changed_since_the_start_is_not_run() {
    let (t, h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("check.sh");
    let ran = dir.path().join("ran");
    let good = "cat >/dev/null; echo '{\"action\":\"continue\"}'\n";
    std::fs::write(&script, good).unwrap();
    let hook = CommandHook::new(CommandHookConfig {
        name: "check".into(),
        command: vec!["/bin/sh".into(), script.display().to_string()],
        tools: vec![],
        phases: vec![],
        timeout_ms: Some(5000),
        cwd: None,
    })
    .unwrap();
    let log = Arc::new(MemoryLog::default());
    let gw = gateway(vec![t], log.clone())
        .hook(Arc::new(hook))
        .build()
        .unwrap();
    gw.call("t.read", json!({"text": "x"}), ctx())
        .await
        .unwrap();
    std::fs::write(&script, format!("touch {}; {good}", ran.display())).unwrap();
    let err = gw
        .call("t.read", json!({"text": "x"}), ctx())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::PolicyDenied);
    assert!(
        err.message
            .contains("check.sh changed since the gateway started"),
        "{}",
        err.message
    );
    assert!(!ran.exists(), "the changed script ran");
    // Put back as it was: it runs again.
    std::fs::write(&script, good).unwrap();
    gw.call("t.read", json!({"text": "x"}), ctx())
        .await
        .unwrap();
    assert_eq!(h.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn external_hooks_speak_json_and_fail_closed() {
    let (t, h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let cases = [
        (
            r#"cat >/dev/null; echo '{"action":"deny","reason":"not today"}'"#,
            Some("not today"),
        ),
        (r#"cat >/dev/null; exit 3"#, Some("hook ext failed")),
        (
            r#"cat >/dev/null; echo 'bad thing happened' >&2; exit 1"#,
            Some("exited with exit status: 1; its stderr ended: bad thing happened"),
        ),
        // A process it left behind holds its stderr open: the call is not held up by it.
        (
            r#"cat >/dev/null; sleep 30 >/dev/null & echo 'left one behind' >&2; exit 1"#,
            Some("its stderr ended: left one behind"),
        ),
        (r#"cat >/dev/null; echo 'not json'"#, Some("invalid JSON")),
        (
            r#"cat >/dev/null; echo '{"action":"explode"}'"#,
            Some("unknown action"),
        ),
    ];
    for (script, want) in cases {
        let log = Arc::new(MemoryLog::default());
        let gw = gateway(vec![t.clone()], log.clone())
            .hook(sh_hook("ext", script))
            .build()
            .unwrap();
        // A bound on waiting (the left-behind process sleeps 30 s), not a timing assertion.
        let err = tokio::time::timeout(
            Duration::from_secs(20),
            gw.call("t.read", json!({"text": "x"}), ctx()),
        )
        .await
        .unwrap_or_else(|_| panic!("{script}: the call was held up"))
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::PolicyDenied, "{script}");
        assert!(
            err.message.contains(want.unwrap()),
            "{script}: {}",
            err.message
        );
        // A failing hook refuses the call as a denying one does: the log records the hook's
        // decision, then the failure.
        let kinds: Vec<EventKind> = log.all().iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                EventKind::ToolRequested,
                EventKind::PolicyDecided,
                EventKind::ToolFailed
            ],
            "{script}"
        );
        let decided = &log.all()[1].payload;
        assert_eq!(decided["decided_by"], json!("hook:ext"), "{script}");
        assert_eq!(decided["effect"], json!("deny"), "{script}");
        assert!(
            decided["reason"].as_str().unwrap().contains(want.unwrap()),
            "{script}: {decided}"
        );
    }
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);

    // Rewrite in pre, replace in post (the script answers by phase).
    let script = r#"input=$(cat); case "$input" in
        *'"phase":"pre"'*) echo '{"action":"rewrite","arguments":{"text":"from-hook"}}' ;;
        *) echo '{"action":"replace","output":"redacted by hook"}' ;; esac"#;
    let log = Arc::new(MemoryLog::default());
    let gw = gateway(vec![t], log.clone())
        .hook(sh_hook("ext", script))
        .build()
        .unwrap();
    let out = gw
        .call("t.read", json!({"text": "x"}), ctx())
        .await
        .unwrap();
    assert_eq!(out.value, json!("redacted by hook"));
    assert_eq!(
        h.seen.lock().unwrap().last().unwrap(),
        &json!({"text": "from-hook"})
    );
}

/// A hook (run outside the sandbox) gets none of the descriptors the gateway inherited open
/// either.
#[tokio::test]
async fn a_hook_gets_no_inherited_descriptor() {
    let (t, _h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let dir = std::ffi::CString::new("/").unwrap();
    // SAFETY: a NUL-terminated path; the descriptor is closed below. No O_CLOEXEC, as a shell's
    // `exec 7</` leaves it.
    let fd = unsafe { libc::open(dir.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    assert!(fd >= 0);
    let script = format!(
        r#"cat >/dev/null; if [ -e /proc/self/fd/{fd} ]; then echo '{{"action":"deny","reason":"inherited {fd}"}}'; else echo '{{"action":"continue"}}'; fi"#
    );
    let gw = gateway(vec![t], Arc::new(MemoryLog::default()))
        .hook(sh_hook("fds", &script))
        .build()
        .unwrap();
    let r = gw.call("t.read", json!({"text": "x"}), ctx()).await;
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    r.unwrap();
}

/// A log that takes `accepts` appends, then refuses every one.
struct BrokenSink {
    accepts: AtomicUsize,
}

impl BrokenSink {
    fn refusing_after(accepts: usize) -> Arc<Self> {
        Arc::new(BrokenSink {
            accepts: AtomicUsize::new(accepts),
        })
    }
}

#[async_trait::async_trait]
impl EventSink for BrokenSink {
    async fn append(
        &self,
        e: Vec<NewEvent>,
    ) -> Result<Vec<agent_runtime_core::Appended>, SinkError> {
        let took = self
            .accepts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match took {
            Ok(_) => Ok(e
                .iter()
                .map(|_| agent_runtime_core::Appended {
                    seq: 0,
                    hash: Hash32::GENESIS,
                })
                .collect()),
            Err(_) => Err(SinkError::new("disk on fire")),
        }
    }
}

#[tokio::test]
async fn an_outcome_that_cannot_be_recorded_says_the_call_ran() {
    let (t, h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let reg = Arc::new(Registry::new());
    reg.register(t).unwrap();
    // The request, decision and start are recorded; the outcome is not.
    let gw = GatewayBuilder::new(reg, BrokenSink::refusing_after(1))
        .build()
        .unwrap();
    let err = gw.call("t.read", json!({}), ctx()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::AuditUnavailable);
    assert_eq!(h.calls.load(Ordering::SeqCst), 1);
    assert!(
        err.message
            .contains("the call ran but its outcome is not recorded"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn nothing_runs_unrecorded() {
    let (t, h) = tool("t.read", RiskClass::Read, Behaviour::Echo);
    let reg = Arc::new(Registry::new());
    reg.register(t).unwrap();
    let gw = GatewayBuilder::new(reg, BrokenSink::refusing_after(0))
        .build()
        .unwrap();
    let err = gw.call("t.read", json!({}), ctx()).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::AuditUnavailable);
    assert!(
        err.message.contains("audit log unavailable, call not run"),
        "{}",
        err.message
    );
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn tool_handles_go_through_the_pipeline() {
    let log = Arc::new(MemoryLog::default());
    let (t, _h) = tool("t.write", RiskClass::Write, Behaviour::Echo);
    let gw: Gateway = gateway(vec![t], log.clone()).build().unwrap();
    let handle: Arc<dyn Tool> = Arc::new(gw.tool_handle("t.write").unwrap());
    assert_eq!(handle.descriptor().name, "t.write");
    let err = handle
        .call(json!({"path": "/etc/x"}), ctx())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::PolicyDenied);
    assert_eq!(gw.tool_handles().len(), 1);
    let all: Vec<Envelope> = log.all();
    assert_eq!(all.len(), 3);
}

#[tokio::test]
async fn duplicate_and_badly_named_tools_are_refused() {
    let reg = Registry::new();
    let (t, _) = tool("t.a", RiskClass::Read, Behaviour::Echo);
    reg.register(t.clone()).unwrap();
    assert!(reg.register(t).unwrap_err().to_string().contains("twice"));
    let (bad, _) = tool("Bad Name", RiskClass::Read, Behaviour::Echo);
    assert!(reg.register(bad).is_err());
}

/// The gateway that `--config DIR/gateway.yaml` assembles, recording to a log of its own.
fn configured_gateway(dir: &std::path::Path) -> (agent_runtime_gateway::Gateway, Arc<MemoryLog>) {
    let opts = agent_runtime_gateway::config::Options {
        config: Some(dir.join("gateway.yaml")),
        ..Default::default()
    };
    let assembled = agent_runtime_gateway::config::assemble(&opts).unwrap();
    let log = Arc::new(MemoryLog::default());
    let (gw, _mcp) = assembled
        .into_gateway(log.clone(), Arc::new(agent_runtime_core::DenyAll))
        .unwrap();
    (gw, log)
}

#[tokio::test]
async fn secrets_of_configured_servers_and_tools_are_redacted() {
    let dir = tempfile::tempdir().unwrap();
    // PATH stands in for a secret: every process has it, and setting a variable here could race
    // with other tests' threads reading the environment.
    let secret = std::env::var("PATH").unwrap();
    std::fs::write(
        dir.path().join("mcp.json"),
        r#"{"mcpServers": {"x": {"command": "true", "env": {"TOKEN": "${PATH}"}},
                           "y": {"url": "http://127.0.0.1:9/mcp", "headers": {"Authorization": "Bearer ${HOME}"}}}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("gateway.yaml"),
        "workspace: [\".\"]\nmcp: mcp.json\n",
    )
    .unwrap();
    let (gw, log) = configured_gateway(dir.path());
    let out = gw
        .call(
            "builtin.echo",
            json!({"text": format!("token is {secret}")}),
            ctx(),
        )
        .await
        .unwrap();
    assert_eq!(out.value, json!("token is [REDACTED]"));
    // A header's `${VAR}` (HOME stands in for a bearer token) is a secret of the gateway too.
    let bearer = std::env::var("HOME").unwrap();
    let out = gw
        .call(
            "builtin.echo",
            json!({"text": format!("sent Bearer {bearer}")}),
            ctx(),
        )
        .await
        .unwrap();
    assert_eq!(out.value, json!("sent Bearer [REDACTED]"));
    let text = serde_json::to_string(&log.all()).unwrap();
    assert!(!text.contains(&secret), "{text}");
    assert!(!text.contains(&format!("Bearer {bearer}")), "{text}");
}

/// A configured secret that a command tool hands back encoded (base64 from coreutils, hex from
/// `od`, at any offset in the output) is redacted in the output and in the log, as the value
/// itself is.
#[tokio::test]
async fn a_secret_a_tool_returns_encoded_is_redacted() {
    let dir = tempfile::tempdir().unwrap();
    // PATH stands in for a secret (see above).
    let secret = std::env::var("PATH").unwrap();
    std::fs::write(
        dir.path().join("gateway.yaml"),
        r#"workspace: ["."]
tools:
  - name: encode
    description: prints its token encoded
    risk: read
    input_schema: { type: object, properties: { prefix: { type: string } } }
    command: ["/bin/sh", "-c", "printf '%s%s' \"$1\" \"$API_TOKEN\" | base64 -w0; echo; printf %s \"$API_TOKEN\" | od -An -tx1 -v | tr -d ' \\n'", "sh", "{prefix}"]
    env: { API_TOKEN: "${PATH}" }
"#,
    )
    .unwrap();
    let (gw, log) = configured_gateway(dir.path());
    use base64::Engine as _;
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    for prefix in ["", "a", "ab", "Bearer "] {
        let out = gw
            .call("encode", json!({ "prefix": prefix }), ctx())
            .await
            .unwrap();
        let stdout = out.value["stdout"].as_str().unwrap_or_default().to_string();
        let plain = base64::engine::general_purpose::STANDARD.encode(format!("{prefix}{secret}"));
        assert_eq!(out.value["exit_code"], 0, "{}", out.value);
        assert!(!stdout.contains(&plain), "{prefix:?}: {stdout}");
        assert!(!stdout.contains(&hex), "{prefix:?}: {stdout}");
        assert_eq!(
            stdout.matches("[REDACTED]").count(),
            2,
            "{prefix:?}: {stdout}"
        );
    }
    let text = serde_json::to_string(&log.all()).unwrap();
    assert!(!text.contains(&hex), "{text}");
    assert!(!text.contains(&secret), "{text}");
}

/// The tool is handed the paths the policy judged, as they resolved when it judged them: a
/// link put in the way while the call waited for approval (a command of the same run can do
/// that) does not change what the tool is told to open.
#[tokio::test]
async fn the_tool_gets_the_paths_as_the_policy_resolved_them() {
    /// What the tool saw: the judged path of its argument, and the path it would open.
    type Seen = Option<(Option<std::path::PathBuf>, std::path::PathBuf)>;
    struct Reader {
        d: ToolDescriptor,
        judged: Arc<std::sync::Mutex<Seen>>,
    }
    #[async_trait::async_trait]
    impl Tool for Reader {
        fn descriptor(&self) -> &ToolDescriptor {
            &self.d
        }
        async fn call(&self, args: Value, ctx: CallContext) -> Result<ToolOutput, ToolError> {
            let given = args["path"].as_str().unwrap_or_default();
            let target = ctx.file(given).unwrap();
            let judged = target.is_judged().then(|| target.path().to_path_buf());
            *self.judged.lock().unwrap() = Some((judged, ctx.path(given)));
            Ok(ToolOutput::new(json!({})))
        }
    }
    /// Approves after moving the folder aside and putting a link to the outside in its place.
    struct SwapThenApprove(std::path::PathBuf, std::path::PathBuf);
    #[async_trait::async_trait]
    impl ApprovalSink for SwapThenApprove {
        async fn request(
            &self,
            _r: ApprovalRequest,
            _c: CancellationToken,
        ) -> Result<ApprovalDecision, ApprovalError> {
            let sub = self.0.join("sub");
            std::fs::rename(&sub, self.0.join("sub-moved")).unwrap();
            std::os::unix::fs::symlink(&self.1, &sub).unwrap();
            Ok(ApprovalDecision {
                approved: true,
                decided_by: Actor::Person("ann".into()),
                reason: None,
            })
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let ws = root.join("ws");
    std::fs::create_dir_all(ws.join("sub")).unwrap();
    std::fs::create_dir_all(root.join("out")).unwrap();
    let judged = Arc::new(std::sync::Mutex::new(None));
    let reader = Reader {
        d: ToolDescriptor {
            name: "fs.read".into(),
            description: "test".into(),
            input_schema: json!({"type": "object", "properties": {"path": {"type": "string"}}}),
            output_schema: None,
            risk: RiskClass::Read,
            source: ToolSource::Native,
        },
        judged: judged.clone(),
    };
    let reg = Arc::new(Registry::new());
    reg.register(Arc::new(reader)).unwrap();
    let policy = Policy::from_yaml(
        "workspace: [ws]\nrules:\n  - id: ask-inside\n    when: [ { path_inside: { arg: path, roots: [\"$workspace\"] } } ]\n    effect: ask\n",
        &root,
    )
    .unwrap();
    let gw = GatewayBuilder::new(reg, Arc::new(MemoryLog::default()))
        .policy(policy)
        .approval(Arc::new(SwapThenApprove(ws.clone(), root.join("out"))))
        .build()
        .unwrap();
    gw.call("fs.read", json!({"path": "sub/a.txt"}), ctx())
        .await
        .unwrap();
    let (judged, path) = judged.lock().unwrap().clone().unwrap();
    assert_eq!(judged.as_deref(), Some(ws.join("sub/a.txt").as_path()));
    assert_eq!(path, ws.join("sub/a.txt"));
    // Resolved now, the same text leads out of the workspace.
    assert_eq!(
        agent_runtime_gateway::paths::resolve("sub/a.txt", &ws).unwrap(),
        root.join("out/a.txt")
    );
}
