//! Criterion benches of the scheduler: the simulator per task with no log and with the
//! in-memory log, and a live run of 1,000 agent tasks each awaiting a 20 ms tool through the real
//! driver (events dropped: the time over 20 ms is the driver's, the engine's and tokio's).
//! Run with `cargo bench -p agent-runtime-workforce --bench scheduler`.

use std::sync::Arc;

use agent_runtime_core::MemoryLog;
use agent_runtime_workforce::bench::{NullSink, live_agents};
use agent_runtime_workforce::sim::{Shape, SimConfig, simulate};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn sim(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("simulate_layered");
    g.sample_size(10);
    for tasks in [1_000u32, 10_000] {
        g.throughput(Throughput::Elements(u64::from(tasks)));
        g.bench_with_input(BenchmarkId::new("null_log", tasks), &tasks, |b, &n| {
            b.iter(|| {
                rt.block_on(simulate(
                    &SimConfig::new(100, n, Shape::Layered, 0.05, 1),
                    Arc::new(NullSink),
                ))
                .unwrap()
            })
        });
        g.bench_with_input(BenchmarkId::new("memory_log", tasks), &tasks, |b, &n| {
            b.iter(|| {
                rt.block_on(simulate(
                    &SimConfig::new(100, n, Shape::Layered, 0.05, 1),
                    Arc::new(MemoryLog::default()),
                ))
                .unwrap()
            })
        });
    }
    g.finish();
}

fn live(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("live_agents");
    g.sample_size(10);
    let agents = 1_000u32;
    g.throughput(Throughput::Elements(u64::from(agents)));
    g.bench_function(BenchmarkId::new("tool_20ms_null_log", agents), |b| {
        b.iter(|| {
            rt.block_on(live_agents(agents, 20, Arc::new(NullSink)))
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, sim, live);
criterion_main!(benches);
