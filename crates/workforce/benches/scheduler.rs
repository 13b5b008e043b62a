//! Criterion benches of the scheduler: the simulator per task with no log, with the in-memory
//! log, and the engine alone on one task's life cycle. Run with
//! `cargo bench -p agent-runtime-workforce --bench scheduler`.

use std::sync::Arc;

use agent_runtime_core::MemoryLog;
use agent_runtime_workforce::bench::NullSink;
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

criterion_group!(benches, sim);
criterion_main!(benches);
