//! Whole-pipeline measurements behind `agent-runtime bench gateway`: each figure with its
//! baseline measured in the same run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_runtime_core::{Actor, CallContext, EventSink, RiskClass};
use serde_json::{Value, json};

use crate::builtin;
use crate::gateway::GatewayBuilder;
use crate::mcp::{McpConfig, McpManager, McpServerConfig};
use crate::policy::{Policy, SandboxMode};
use crate::redact::Redactor;
use crate::registry::Registry;
use crate::sandbox::{CommandTool, CommandToolConfig, Limits, SandboxSettings, probe};

/// What to measure with.
pub struct BenchSetup {
    /// Named event sinks for the native pipeline figures (`memory`, `store`, ...).
    pub sinks: Vec<(String, Arc<dyn EventSink>)>,
    /// The sink of the concurrent-calls figure.
    pub concurrent_sink: (String, Arc<dyn EventSink>),
    /// The stdio MCP server to measure against (server-everything), if available.
    pub mcp_server: Option<McpServerConfig>,
    /// Workspace of the sandboxed command.
    pub workspace: PathBuf,
    /// Iterations of the native pipeline figure.
    pub native_iterations: usize,
    /// Iterations of the MCP figure.
    pub mcp_iterations: usize,
    /// Iterations of the sandbox figure.
    pub sandbox_iterations: usize,
    /// Concurrent calls.
    pub concurrent_calls: usize,
}

impl std::fmt::Debug for BenchSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchSetup")
            .field("workspace", &self.workspace)
            .finish()
    }
}

/// Percentiles of a sample, in microseconds.
fn summary(mut d: Vec<Duration>) -> Value {
    d.sort();
    let pct = |p: f64| {
        if d.is_empty() {
            return 0.0;
        }
        let i = ((d.len() as f64 - 1.0) * p).round() as usize;
        d[i].as_nanos() as f64 / 1000.0
    };
    json!({"n": d.len(), "p50_us": round(pct(0.5)), "p90_us": round(pct(0.9)),
           "p99_us": round(pct(0.99)), "max_us": round(pct(1.0))})
}

/// Rounds of each interleaved comparison: the added time is reported as the median over the
/// rounds of (p50 of the measured path - p50 of its baseline), which a burst of load on a shared
/// machine moves less than one long run.
const ROUNDS: usize = 5;

fn p50_us(d: &[Duration]) -> f64 {
    let mut d = d.to_vec();
    d.sort();
    d.get(d.len().saturating_sub(1) / 2)
        .map_or(0.0, |x| x.as_nanos() as f64 / 1000.0)
}

fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x.get(x.len().saturating_sub(1) / 2).copied().unwrap_or(0.0)
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn ctx() -> CallContext {
    CallContext::new(Actor::Agent("bench".into()))
}

fn registry() -> Arc<Registry> {
    let r = Arc::new(Registry::new());
    for t in builtin::builtins() {
        let _ = r.register(t);
    }
    r
}

/// Runs every measurement; failures of one part are reported in its place.
pub async fn run(setup: BenchSetup) -> Value {
    let mut out = serde_json::Map::new();
    let policy = || Policy::defaults(vec![setup.workspace.clone()]);

    // 1. MCP stdio round trip: bare rmcp client vs through the gateway, same server process.
    out.insert("mcp_stdio".into(), mcp(&setup).await);

    // 2. Sandboxed `true` vs a plain spawn of `true`. Measured before the native figure fills
    //    the memory log: spawning with a pre-exec hook forks, and fork time grows with the
    //    process's resident memory.
    out.insert("sandbox_true".into(), sandbox(&setup).await);

    // 3. A native no-op through the whole pipeline, per sink.
    let mut native = serde_json::Map::new();
    for (name, sink) in &setup.sinks {
        let gw = match policy().and_then(|p| {
            GatewayBuilder::new(registry(), sink.clone())
                .policy(p)
                .build()
        }) {
            Ok(g) => g,
            Err(e) => {
                native.insert(name.clone(), json!({"error": e.to_string()}));
                continue;
            }
        };
        let warm = (setup.native_iterations / 10).max(10);
        for _ in 0..warm {
            let _ = gw.call("builtin.noop", json!({}), ctx()).await;
        }
        let mut d = Vec::with_capacity(setup.native_iterations);
        let mut errors = 0usize;
        for _ in 0..setup.native_iterations {
            let t = Instant::now();
            if gw.call("builtin.noop", json!({}), ctx()).await.is_err() {
                errors += 1;
            }
            d.push(t.elapsed());
        }
        let mut s = summary(d);
        s["errors"] = json!(errors);
        native.insert(name.clone(), s);
    }
    out.insert(
        "native_noop_pipeline".into(),
        json!({"sinks": native, "goal": {"p50_us": 20, "p99_us": 100},
               "what": "builtin.noop through validate, policy, execute, cap and two audit appends (4 events)"}),
    );

    // 4. Concurrent native calls.
    let (name, sink) = &setup.concurrent_sink;
    let concurrent = match policy().and_then(|p| {
        GatewayBuilder::new(registry(), sink.clone())
            .policy(p)
            .build()
    }) {
        Ok(gw) => {
            let n = setup.concurrent_calls;
            let t = Instant::now();
            let mut handles = Vec::with_capacity(n);
            for _ in 0..n {
                let gw = gw.clone();
                handles.push(tokio::spawn(async move {
                    gw.call("builtin.noop", json!({}), ctx()).await.is_ok()
                }));
            }
            let mut ok = 0usize;
            for h in handles {
                if h.await.unwrap_or(false) {
                    ok += 1;
                }
            }
            let secs = t.elapsed().as_secs_f64();
            json!({"sink": name, "calls": n, "ok": ok, "seconds": round(secs * 1000.0) / 1000.0,
                   "calls_per_sec": (n as f64 / secs).round()})
        }
        Err(e) => json!({"error": e.to_string()}),
    };
    out.insert("concurrent_native".into(), concurrent);
    Value::Object(out)
}

async fn mcp(setup: &BenchSetup) -> Value {
    let Some(server) = setup.mcp_server.clone() else {
        return json!({"skipped": "server-everything not installed (run scripts/test-deps.sh)"});
    };
    let mut server = server;
    server.risk = Some(RiskClass::Read);
    let config = McpConfig {
        servers: [("everything".to_string(), server)].into_iter().collect(),
    };
    let registry = Arc::new(Registry::new());
    let mut redactor = Redactor::new();
    let (manager, errors) = match McpManager::start(&config, registry.clone(), &mut redactor).await
    {
        Ok(m) => m,
        Err(e) => return json!({"error": e.to_string()}),
    };
    if !errors.is_empty() {
        return json!({"error": errors.iter().map(|e| e.to_string()).collect::<Vec<_>>()});
    }
    let sink: Arc<dyn EventSink> = setup
        .sinks
        .first()
        .map(|s| s.1.clone())
        .unwrap_or_else(|| Arc::new(agent_runtime_core::MemoryLog::default()));
    let gw = match Policy::defaults(vec![setup.workspace.clone()])
        .and_then(|p| GatewayBuilder::new(registry, sink).policy(p).build())
    {
        Ok(g) => g,
        Err(e) => return json!({"error": e.to_string()}),
    };
    let server = manager.servers().first().cloned();
    let Some(peer) = (match server {
        Some(s) => s.peer().await,
        None => None,
    }) else {
        return json!({"error": "not connected"});
    };
    let args = json!({"message": "bench"});
    let bare = || {
        let peer = peer.clone();
        let a = args.as_object().cloned().unwrap_or_default();
        async move {
            peer.call_tool(rmcp::model::CallToolRequestParams::new("echo").with_arguments(a))
                .await
                .is_ok()
        }
    };
    let n = setup.mcp_iterations;
    for _ in 0..(n / 10).max(10) {
        bare().await;
        let _ = gw.call("everything.echo", args.clone(), ctx()).await;
    }
    // Interleave so that drift hits both alike.
    let direct = gw.registry().get("everything.echo");
    let (mut db, mut dg, mut dd) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut errors = 0usize;
    let per_round = n.div_ceil(ROUNDS);
    let (mut added_rounds, mut pct_rounds) = (Vec::new(), Vec::new());
    for i in 0..n {
        // Alternate which path goes first, so that neither always follows the other.
        let order: [u8; 3] = if i % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
        for which in order {
            let t = Instant::now();
            let ok = match which {
                0 => bare().await,
                1 => gw
                    .call("everything.echo", args.clone(), ctx())
                    .await
                    .is_ok(),
                _ => match &direct {
                    Some(tool) => tool.tool().call(args.clone(), ctx()).await.is_ok(),
                    None => continue,
                },
            };
            let e = t.elapsed();
            errors += usize::from(!ok);
            [&mut db, &mut dg, &mut dd][which as usize].push(e);
        }
        if (i + 1) % per_round == 0 || i + 1 == n {
            let from = db.len() - ((i % per_round) + 1);
            let (b, g) = (p50_us(&db[from..]), p50_us(&dg[from..]));
            added_rounds.push(g - b);
            pct_rounds.push(100.0 * (g - b) / b.max(1.0));
        }
    }
    manager.shutdown().await;
    let b = summary(db);
    let g = summary(dg);
    let added = median(added_rounds.clone());
    json!({"bare_rmcp": b, "gateway": g, "mcp_tool_without_pipeline": summary(dd), "errors": errors,
           "rounds": added_rounds.len(),
           "added_p50_us_per_round": added_rounds.iter().map(|x| round(*x)).collect::<Vec<_>>(),
           "added_p50_us": round(added), "added_p50_pct": round(median(pct_rounds)),
           "goal": {"added_pct": 10, "added_us": 50},
           "what": "everything.echo over stdio; the gateway path records to the first sink"})
}

async fn sandbox(setup: &BenchSetup) -> Value {
    let settings = Arc::new(SandboxSettings::new(vec![setup.workspace.clone()], vec![]));
    if let Err(e) = probe(&settings) {
        return json!({"skipped": e});
    }
    let config = CommandToolConfig {
        name: "bench.true".into(),
        description: String::new(),
        input_schema: json!({"type": "object"}),
        output_schema: None,
        risk: RiskClass::Exec,
        command: vec!["true".into()],
        stdin: None,
        env: Default::default(),
        read_roots: vec![],
        limits: Limits::default(),
        success_exit_codes: None,
    };
    let tool = match CommandTool::new(config, settings, &mut Redactor::new()) {
        Ok(t) => t,
        Err(e) => return json!({"error": e.to_string()}),
    };
    let Some(true_bin) = crate::sandbox::find_in_path("true") else {
        return json!({"skipped": "no `true` on PATH"});
    };
    let n = setup.sandbox_iterations;
    let (mut plain, mut boxed) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut errors = 0usize;
    let per_round = n.div_ceil(ROUNDS).max(1);
    let mut added_rounds = Vec::new();
    for i in 0..n + 3 {
        let plain_spawn = || async {
            let t = Instant::now();
            let ok = tokio::process::Command::new(&true_bin)
                .status()
                .await
                .is_ok_and(|s| s.success());
            (t.elapsed(), ok)
        };
        let sandboxed = || async {
            let t = Instant::now();
            let r = tool.run(json!({}), ctx(), SandboxMode::Bubblewrap).await;
            (t.elapsed(), r.is_ok_and(|o| o.value["exit_code"] == 0))
        };
        // Alternate which goes first.
        let ((e1, ok1), (e2, ok2)) = if i % 2 == 0 {
            let a = plain_spawn().await;
            (a, sandboxed().await)
        } else {
            let b = sandboxed().await;
            (plain_spawn().await, b)
        };
        errors += usize::from(!ok1) + usize::from(!ok2);
        if i >= 3 {
            plain.push(e1);
            boxed.push(e2);
            let k = i - 3;
            if (k + 1) % per_round == 0 || k + 1 == n {
                let from = plain.len() - ((k % per_round) + 1);
                added_rounds.push(p50_us(&boxed[from..]) - p50_us(&plain[from..]));
            }
        }
    }
    let p = summary(plain);
    let b = summary(boxed);
    let added_ms = median(added_rounds.clone()) / 1000.0;
    json!({"plain_spawn": p, "sandboxed": b, "errors": errors,
           "rounds": added_rounds.len(),
           "added_p50_ms_per_round": added_rounds.iter().map(|x| round(*x / 1000.0)).collect::<Vec<_>>(),
           "added_p50_ms": round(added_ms), "goal": {"added_p50_ms": 5},
           "what": "`true` under bubblewrap with rlimits and a pids cgroup vs tokio::process `true`"})
}
