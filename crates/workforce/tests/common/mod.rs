//! Test doubles shared by the workforce tests: scripted tools and a scripted model.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use agent_runtime_core::{
    CallContext, ClassifiedError, Envelope, ErrorClass, EventQuery, FinishReason, MemoryLog,
    Message, ModelError, ModelProvider, ModelRequest, ModelResponse, RiskClass, Role, Timestamp,
    Tool, ToolCall, ToolDescriptor, ToolError, ToolOutput, ToolSource, Usage, async_trait,
};
use agent_runtime_workforce::driver::{self, Outcome, RunOptions, StaticModels, TokioClock};
use agent_runtime_workforce::graph::{TaskGraph, parse_graph};
use agent_runtime_workforce::tools::ToolRegistry;
use serde_json::{Value, json};

/// `flaky`: fails with `class` (default tool_error) the first `fail` times it is called with the
/// same `key`, then returns `{key, calls}`; waits `ms` (tokio time) first, and before that
/// `ask_ms` as if a person were reading an approval question; panics when `panic` is given.
pub struct Flaky {
    d: ToolDescriptor,
    calls: Mutex<BTreeMap<String, u64>>,
}

impl Flaky {
    pub fn new() -> Self {
        Flaky {
            d: ToolDescriptor {
                name: "flaky".into(),
                description: "fails N times".into(),
                input_schema: json!({"type": "object"}),
                output_schema: None,
                risk: RiskClass::Read,
                source: ToolSource::Native,
            },
            calls: Mutex::new(BTreeMap::new()),
        }
    }
}

#[async_trait]
impl Tool for Flaky {
    fn descriptor(&self) -> &ToolDescriptor {
        &self.d
    }
    async fn call(&self, args: Value, ctx: CallContext) -> Result<ToolOutput, ToolError> {
        if args.get("panic").is_some() {
            panic!("flaky was asked to panic");
        }
        if let Some(ms) = args.get("ask_ms").and_then(Value::as_u64) {
            let _asking = ctx.waiting_for_person();
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        if let Some(ms) = args.get("ms").and_then(Value::as_u64) {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        let key = args
            .get("key")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let n = {
            let mut m = self.calls.lock().unwrap();
            let c = m.entry(key.clone()).or_default();
            *c += 1;
            *c
        };
        let fail = args.get("fail").and_then(Value::as_u64).unwrap_or(0);
        if n <= fail {
            let class = args
                .get("class")
                .and_then(Value::as_str)
                .and_then(|c| c.parse().ok())
                .unwrap_or(ErrorClass::ToolError);
            return Err(ClassifiedError::new(class, format!("{key} failure {n}")));
        }
        Ok(ToolOutput::new(json!({"key": key, "calls": n})))
    }
}

/// A scripted model: on a user turn it calls the first tool offered with `{"text": PROMPT}`
/// (or `spawn_task` when the prompt says "spawn"); after tool results it answers with the
/// results joined. A prompt containing "loop" always asks for a tool (to hit max_turns); one
/// containing "twice" asks for two calls at once, and "slow" adds `ms: 1000` to their arguments.
pub struct ScriptModel;

#[async_trait]
impl ModelProvider for ScriptModel {
    fn id(&self) -> &str {
        "script"
    }
    async fn complete(
        &self,
        req: ModelRequest,
        _ctx: CallContext,
    ) -> Result<ModelResponse, ModelError> {
        let user = req
            .messages
            .iter()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.clone())
            .unwrap_or_default();
        if user.contains("ratelimit") {
            return Err(ModelError::new(ErrorClass::ModelRateLimit, "slow down"));
        }
        let last = req.messages.last().map(|m| m.role);
        let usage = Usage {
            input_tokens: 10,
            output_tokens: 5,
        };
        let wants_tool = last == Some(Role::User) || user.contains("loop");
        if wants_tool && !req.tools.is_empty() {
            let spawn = user.contains("spawn") && req.tools.iter().any(|t| t.name == "spawn_task");
            let (name, arguments) = if spawn {
                ("spawn_task".to_string(), json!({"prompt": "child work"}))
            } else {
                let name = req
                    .tools
                    .iter()
                    .find(|t| t.name != "spawn_task")
                    .map(|t| t.name.clone())
                    .unwrap_or_default();
                let mut arguments = json!({"text": user});
                if user.contains("slow") {
                    arguments["ms"] = json!(1000);
                }
                (name, arguments)
            };
            let mut message = Message::new(Role::Assistant, "");
            let calls = if user.contains("twice") { 2 } else { 1 };
            message.tool_calls = (0..calls)
                .map(|i| ToolCall {
                    id: format!("c{}-{i}", req.messages.len()),
                    name: name.clone(),
                    arguments: arguments.clone(),
                })
                .collect();
            return Ok(ModelResponse {
                message,
                finish: FinishReason::ToolCalls,
                usage,
            });
        }
        let results: Vec<String> = req
            .messages
            .iter()
            .filter(|m| m.role == Role::Tool)
            .map(|m| m.content.clone())
            .collect();
        let text = if results.is_empty() {
            format!("answer to {user}")
        } else {
            format!("answer: {}", results.join(" | "))
        };
        Ok(ModelResponse {
            message: Message::new(Role::Assistant, text),
            finish: FinishReason::Stop,
            usage,
        })
    }
}

pub fn graph(yaml: &str) -> TaskGraph {
    parse_graph(yaml, Path::new("test.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

pub fn registry() -> Arc<ToolRegistry> {
    let mut r = ToolRegistry::with_native_tools();
    r.register(Arc::new(Flaky::new()));
    Arc::new(r)
}

pub fn models() -> Arc<StaticModels> {
    let mut m: BTreeMap<String, Arc<dyn ModelProvider>> = BTreeMap::new();
    m.insert("script".into(), Arc::new(ScriptModel));
    Arc::new(StaticModels(m))
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

pub const T0: Timestamp = Timestamp::from_unix_nanos(1_767_225_600_000_000_000);

/// Runs a graph on paused tokio time with fresh scripted tools; returns the outcome and the log.
pub fn run(g: TaskGraph, seed: u64) -> (Outcome, Arc<MemoryLog>) {
    let log = Arc::new(MemoryLog::default());
    let rt = rt();
    let out = rt
        .block_on(async {
            let opts = RunOptions {
                seed,
                sink: log.clone(),
                clock: Arc::new(TokioClock::new(T0)),
                tools: registry(),
                models: models(),
                observer: None,
                secrets: Arc::new(agent_runtime_core::NoSecrets),
                labels: Default::default(),
            };
            driver::run_graph(g, opts).await
        })
        .unwrap_or_else(|e| panic!("{e}"));
    (out, log)
}

pub fn events(log: &MemoryLog) -> Vec<Envelope> {
    log.query_now(&EventQuery::default())
}

/// A log that takes `accepts` batches and refuses every one after, saying why ("disk full at
/// /var/log/events.db").
pub struct RefusingLog {
    pub accepts: std::sync::atomic::AtomicUsize,
}

#[agent_runtime_core::async_trait]
impl agent_runtime_core::EventSink for RefusingLog {
    async fn append(
        &self,
        events: Vec<agent_runtime_core::NewEvent>,
    ) -> Result<Vec<agent_runtime_core::Appended>, agent_runtime_core::SinkError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self
            .accepts
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_err()
        {
            return Err(agent_runtime_core::SinkError::new(
                "disk full at /var/log/events.db",
            ));
        }
        Ok(vec![
            agent_runtime_core::Appended {
                seq: 0,
                hash: agent_runtime_core::Hash32::GENESIS,
            };
            events.len()
        ])
    }
}
