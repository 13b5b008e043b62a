//! Whole-subsystem measurements behind `agent-runtime bench workforce` and the criterion
//! benches: simulator cost per task against different logs, live agents waiting on a slow tool,
//! and how cost grows with the number of tasks. Figures, not assertions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_runtime_core::{
    Appended, CallContext, EventSink, FinishReason, Hash32, Message, ModelError, ModelProvider,
    ModelRequest, ModelResponse, NewEvent, Role, SinkError, SystemClock, Tool, ToolCall,
    ToolDescriptor, ToolError, ToolOutput, Usage, async_trait,
};
use serde_json::json;

use crate::driver::{self, RunOptions, StaticModels};
use crate::graph::{AgentSpec, RunLimits, TaskGraph, TaskSpec};
use crate::sim::{Shape, SimConfig, SimReport, current_memory_bytes, simulate};
use crate::tools::ToolRegistry;

/// A sink that drops events: the baseline that isolates the scheduler and event building.
#[derive(Clone, Copy, Debug, Default)]
pub struct NullSink;

#[async_trait]
impl EventSink for NullSink {
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, SinkError> {
        Ok(events
            .iter()
            .map(|_| Appended {
                seq: 0,
                hash: Hash32::GENESIS,
            })
            .collect())
    }

    async fn append_encoded(
        &self,
        events: Vec<agent_runtime_core::EncodedEvent>,
    ) -> Result<Vec<Appended>, SinkError> {
        Ok(vec![
            Appended {
                seq: 0,
                hash: Hash32::GENESIS,
            };
            events.len()
        ])
    }
}

/// One simulator measurement; its peak memory is its own (the peak starts over first, so an
/// earlier point's does not count), or unknown (`None`) where the peak cannot start over.
pub async fn sim_point(
    tasks: u32,
    agents: u32,
    shape: Shape,
    sink: Arc<dyn EventSink>,
) -> Result<SimReport, crate::sim::SimError> {
    let own_peak = crate::sim::reset_peak_memory();
    let mut report = simulate(&SimConfig::new(agents, tasks, shape, 0.0, 1), sink).await?;
    if !own_peak {
        report.peak_memory_bytes = None;
    }
    Ok(report)
}

/// What the live-agents measurement found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LiveReport {
    /// Agent tasks alive at once.
    pub agents: u32,
    /// How long each agent's tool call waits, ms.
    pub tool_ms: u64,
    /// Wall time of the whole run, ms.
    pub wall_ms: f64,
    /// `(wall - tool_ms) / tool_ms`, percent.
    pub overhead_pct: f64,
    /// Resident memory before the run, bytes.
    pub rss_before: Option<u64>,
    /// Highest resident memory sampled during the run, bytes.
    pub rss_peak: Option<u64>,
    /// `(rss_peak - rss_before) / agents`, bytes.
    pub bytes_per_agent: Option<f64>,
    /// Events written.
    pub events: u64,
    /// The run's status.
    pub status: crate::engine::RunStatus,
    /// CPU time of the whole process during the run (every thread: driver, tokio workers, the
    /// log's threads), per agent, ns: what the run costs the machine, steadier than wall time
    /// on a shared one. Work left to finish after the run returned (its engine's drop) is not
    /// counted.
    pub cpu_ns_per_agent: Option<f64>,
    /// When, after the run started, the first and the last agent's first model call began, ms:
    /// the start-up and the spread of the calls that ask for the tool.
    pub first_calls_ms: [f64; 2],
    /// When the first and the last agent's second model call began (after its tool returned),
    /// ms. Less `tool_ms`, the gap to `first_calls_ms` is what a tool call costs around its
    /// own waiting (recording the request durably, starting it, recording its result).
    pub second_calls_ms: [f64; 2],
    /// When the first and the last agent's tool began, ms: after its request was durable.
    pub tool_starts_ms: [f64; 2],
    /// When the first and the last agent's tool returned, ms; the gap to `second_calls_ms` is
    /// recording the result durably and starting the next model call.
    pub tool_ends_ms: [f64; 2],
}

/// The earliest and latest of a set of instants, as nanoseconds since `origin`.
#[derive(Debug)]
struct Span {
    origin: Instant,
    first: std::sync::atomic::AtomicU64,
    last: std::sync::atomic::AtomicU64,
}

impl Span {
    fn new(origin: Instant) -> Self {
        Span {
            origin,
            first: std::sync::atomic::AtomicU64::new(u64::MAX),
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }
    /// Notes this instant.
    fn mark(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let ns = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.first.fetch_min(ns, Relaxed);
        self.last.fetch_max(ns, Relaxed);
    }
    /// `[first, last]` in ms after `offset_ns` (zeros when nothing was marked).
    fn ms_after(&self, offset_ns: u64) -> [f64; 2] {
        use std::sync::atomic::Ordering::Relaxed;
        let (first, last) = (self.first.load(Relaxed), self.last.load(Relaxed));
        if first == u64::MAX {
            return [0.0, 0.0];
        }
        let ms = |ns: u64| ns.saturating_sub(offset_ns) as f64 / 1e6;
        [ms(first), ms(last)]
    }
}

/// A model that asks once for `sleep {ms}` and then answers, noting when each of its two
/// calls per agent began.
struct SleepyModel {
    ms: u64,
    first: Span,
    second: Span,
}

#[async_trait]
impl ModelProvider for SleepyModel {
    fn id(&self) -> &str {
        "bench"
    }
    async fn complete(
        &self,
        req: ModelRequest,
        _ctx: CallContext,
    ) -> Result<ModelResponse, ModelError> {
        let usage = Usage {
            input_tokens: 1,
            output_tokens: 1,
        };
        if req.messages.last().is_some_and(|m| m.role == Role::User) {
            self.first.mark();
            let mut message = Message::new(Role::Assistant, "");
            message.tool_calls = vec![ToolCall {
                id: "1".into(),
                name: "sleep".into(),
                arguments: json!({"ms": self.ms}),
            }];
            return Ok(ModelResponse {
                message,
                finish: FinishReason::ToolCalls,
                usage,
            });
        }
        self.second.mark();
        Ok(ModelResponse {
            message: Message::new(Role::Assistant, "ok"),
            finish: FinishReason::Stop,
            usage,
        })
    }
}

/// The native `sleep` tool, noting when each call began and returned.
struct TimedSleep {
    inner: crate::tools::Native,
    starts: Span,
    ends: Span,
}

#[async_trait]
impl Tool for TimedSleep {
    fn descriptor(&self) -> &ToolDescriptor {
        self.inner.descriptor()
    }
    // Written out rather than `async fn`: the instrument's own future would otherwise keep the
    // arguments and context it hands on (about 420 bytes per waiting agent, counted against
    // the runtime in `bytes_per_agent`); this one holds the inner call's box and a reference.
    fn call<'life0, 'async_trait>(
        &'life0 self,
        args: serde_json::Value,
        ctx: CallContext,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<ToolOutput, ToolError>> + Send + 'async_trait>,
    >
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        self.starts.mark();
        let inner = self.inner.call(args, ctx);
        let ends = &self.ends;
        Box::pin(async move {
            let out = inner.await;
            ends.mark();
            out
        })
    }
}

/// Runs `agents` agent tasks at once, each calling a tool that waits `tool_ms`, through the real
/// driver on the current tokio runtime; samples resident memory while they wait.
pub async fn live_agents(
    agents: u32,
    tool_ms: u64,
    sink: Arc<dyn EventSink>,
) -> Result<LiveReport, driver::DriverError> {
    let n = agents.max(1);
    let graph = TaskGraph {
        name: Some(format!("bench-live-{n}")),
        limits: RunLimits {
            concurrency: n,
            max_tasks: n,
            max_spawn_depth: 0,
            ..RunLimits::default()
        },
        agents: [(
            "w".to_string(),
            AgentSpec {
                instructions: String::new(),
                model: "bench/m".into(),
                tools: vec!["sleep".into()],
                max_turns: 3,
                concurrency: n,
            },
        )]
        .into_iter()
        .collect(),
        tasks: (0..n)
            .map(|i| TaskSpec {
                id: format!("a{i}"),
                agent: Some("w".into()),
                prompt: Some("wait".into()),
                tool: None,
                args: None,
                needs: Vec::new(),
                priority: 0,
                timeout: None,
                retry: None,
                on_failure: Default::default(),
            })
            .collect(),
    };
    let mut models: std::collections::BTreeMap<String, Arc<dyn ModelProvider>> = Default::default();
    let origin = Instant::now();
    let model = Arc::new(SleepyModel {
        ms: tool_ms,
        first: Span::new(origin),
        second: Span::new(origin),
    });
    models.insert("bench".into(), model.clone());
    let sleep = Arc::new(TimedSleep {
        inner: crate::tools::Native::sleep(),
        starts: Span::new(origin),
        ends: Span::new(origin),
    });
    let mut tools = ToolRegistry::with_native_tools();
    tools.register(sleep.clone());
    let opts = RunOptions {
        seed: 1,
        sink,
        clock: Arc::new(SystemClock),
        tools: Arc::new(tools),
        models: Arc::new(StaticModels(models)),
        observer: None,
        secrets: Arc::new(agent_runtime_core::NoSecrets),
        labels: Default::default(),
    };
    let before = current_memory_bytes();
    let stop = agent_runtime_core::CancellationToken::new();
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = 0u64;
            loop {
                peak = peak.max(current_memory_bytes().unwrap_or(0));
                tokio::select! {
                    _ = stop.cancelled() => return peak,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        })
    };
    let started = Instant::now();
    let cpu_before = agent_runtime_core::process_cpu_ns();
    let offset_ns = u64::try_from(started.duration_since(origin).as_nanos()).unwrap_or(0);
    let out = driver::run_graph(graph, opts).await?;
    let wall = started.elapsed();
    let cpu = cpu_before
        .zip(agent_runtime_core::process_cpu_ns())
        .map(|(a, b)| b.saturating_sub(a));
    stop.cancel();
    let peak = sampler.await.ok().filter(|&p| p > 0);
    let wall_ms = wall.as_secs_f64() * 1000.0;
    Ok(LiveReport {
        agents: n,
        tool_ms,
        wall_ms,
        overhead_pct: (wall_ms - tool_ms as f64) / tool_ms.max(1) as f64 * 100.0,
        rss_before: before,
        rss_peak: peak,
        bytes_per_agent: match (before, peak) {
            (Some(b), Some(p)) => Some(p.saturating_sub(b) as f64 / f64::from(n)),
            _ => None,
        },
        events: out.events,
        status: out.status,
        cpu_ns_per_agent: cpu.map(|ns| ns as f64 / f64::from(n.max(1))),
        first_calls_ms: model.first.ms_after(offset_ns),
        second_calls_ms: model.second.ms_after(offset_ns),
        tool_starts_ms: sleep.starts.ms_after(offset_ns),
        tool_ends_ms: sleep.ends.ms_after(offset_ns),
    })
}

/// One point of the scaling curve.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ScalePoint {
    /// Tasks.
    pub tasks: u32,
    /// Wall nanoseconds per task.
    pub ns_per_task: f64,
    /// This point's cost per task over the first point's, divided by what `n log n` growth
    /// allows (`log n / log n0`): at most 1 means no worse than `n log n`.
    pub vs_n_log_n: f64,
}

/// Simulator cost at each size (layered, 1,000 agents or fewer), against an in-memory log.
pub async fn scaling(
    sizes: &[u32],
    sink: impl Fn() -> Arc<dyn EventSink>,
) -> Result<Vec<ScalePoint>, crate::sim::SimError> {
    let mut out: Vec<ScalePoint> = Vec::new();
    for &n in sizes {
        let r = sim_point(n, 1000.min(n), Shape::Layered, sink()).await?;
        let vs = match out.first() {
            Some(first) => {
                let allowed = (f64::from(n)).ln() / (f64::from(first.tasks)).ln();
                (r.ns_per_task / first.ns_per_task) / allowed
            }
            None => 1.0,
        };
        out.push(ScalePoint {
            tasks: n,
            ns_per_task: r.ns_per_task,
            vs_n_log_n: vs,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The live report's instants follow each agent's path: first model call, its tool (which
    /// waits its full time), the second model call. Causal order only, no timing goal.
    #[test]
    fn live_report_marks_each_step_of_the_agents_path() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let r = rt
            .block_on(live_agents(40, 30, Arc::new(NullSink)))
            .unwrap();
        assert_eq!(r.status, crate::engine::RunStatus::Completed);
        let [call1, tool_start, tool_end, call2] = [
            r.first_calls_ms,
            r.tool_starts_ms,
            r.tool_ends_ms,
            r.second_calls_ms,
        ];
        for span in [call1, tool_start, tool_end, call2] {
            assert!(span[0] > 0.0 && span[0] <= span[1], "{r:?}");
        }
        assert!(call1[0] <= tool_start[0], "{r:?}");
        assert!(tool_end[0] >= tool_start[0] + 30.0, "{r:?}");
        assert!(call2[1] >= tool_end[1], "{r:?}");
        assert!(r.wall_ms >= call2[1], "{r:?}");
        // The run cost some CPU, and no more than every core of the machine for its wall time.
        #[cfg(unix)]
        {
            let cpu_ms = r.cpu_ns_per_agent.expect("a process CPU clock") * 40.0 / 1e6;
            let cores = std::thread::available_parallelism().map_or(64, |n| n.get()) as f64;
            assert!(
                cpu_ms > 0.0 && cpu_ms <= r.wall_ms * cores,
                "{cpu_ms} ms, {r:?}"
            );
        }
    }
}
