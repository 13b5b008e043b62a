//! The simulator: determinism over seeds and shapes, replayability, limits, and properties.

mod common;

use std::sync::Arc;

use agent_runtime_core::{EventQuery, MemoryLog};
use agent_runtime_workforce::driver;
use agent_runtime_workforce::engine::RunStatus;
use agent_runtime_workforce::sim::{Shape, SimConfig, simulate};
use agent_runtime_workforce::state::{check_limits, log_hash};
use proptest::prelude::*;

fn sim(
    cfg: &SimConfig,
) -> (
    agent_runtime_workforce::sim::SimReport,
    Vec<agent_runtime_core::Envelope>,
) {
    let log = Arc::new(MemoryLog::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let report = rt.block_on(simulate(cfg, log.clone())).unwrap();
    (report, log.query_now(&EventQuery::default()))
}

#[test]
fn same_seed_same_hash_other_seed_other_hash() {
    for shape in [Shape::Chain, Shape::Fanout, Shape::Layered, Shape::Random] {
        let cfg = SimConfig::new(5, 200, shape, 0.1, 7);
        let (a, ev) = sim(&cfg);
        let (b, _) = sim(&cfg);
        let (c, _) = sim(&SimConfig {
            seed: 8,
            ..cfg.clone()
        });
        assert_eq!(a.log_hash, b.log_hash, "{shape:?}");
        assert_ne!(a.log_hash, c.log_hash, "{shape:?}");
        assert_eq!(a.status, RunStatus::Completed);
        assert_eq!(a.tasks_done + a.tasks_skipped, 200);
        assert!(a.retries > 0, "{shape:?}: 10% failures must cause retries");
        assert_eq!(log_hash(&ev), a.log_hash, "the written log hashes the same");
        assert_eq!(a.events as usize, ev.len());
    }
}

#[test]
fn a_simulated_run_replays_like_a_live_one() {
    let (report, ev) = sim(&SimConfig::new(3, 150, Shape::Random, 0.2, 99));
    let replay = driver::replay_events(&ev).unwrap();
    assert_eq!(replay.log_hash, report.log_hash);
    check_limits(&ev).unwrap();
}

#[test]
fn chains_take_the_sum_of_their_durations() {
    let (chain, _) = sim(&SimConfig::new(4, 50, Shape::Chain, 0.0, 1));
    let (fan, _) = sim(&SimConfig::new(4, 50, Shape::Fanout, 0.0, 1));
    assert!(chain.virtual_makespan_ms >= 50 * 50);
    assert!(fan.virtual_makespan_ms < chain.virtual_makespan_ms);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_seed_and_shape_is_deterministic_replayable_and_within_limits(
        seed in any::<u64>(),
        shape in prop_oneof![Just(Shape::Chain), Just(Shape::Fanout), Just(Shape::Layered), Just(Shape::Random)],
        agents in 1u32..6,
        tasks in 1u32..80,
        failure_rate in 0.0f64..0.5,
        agent_concurrency in 1u32..4,
        concurrency in 1u32..8,
    ) {
        let cfg = SimConfig { agent_concurrency, concurrency: Some(concurrency), ..SimConfig::new(agents, tasks, shape, failure_rate, seed) };
        let (a, ev) = sim(&cfg);
        let (b, _) = sim(&cfg);
        prop_assert_eq!(&a.log_hash, &b.log_hash);
        prop_assert_eq!(a.status, RunStatus::Completed);
        prop_assert_eq!(a.tasks_done + a.tasks_skipped, u64::from(tasks));
        let replay = driver::replay_events(&ev).unwrap();
        prop_assert_eq!(&replay.log_hash, &a.log_hash);
        let peaks = check_limits(&ev).unwrap();
        prop_assert!(peaks["global"] <= concurrency);
    }
}

/// Each shape's name is the one `--shape` takes back, and an unknown one lists them all.
#[test]
fn shapes_parse_from_their_names() {
    for shape in Shape::ALL {
        assert_eq!(shape.name().parse::<Shape>(), Ok(shape));
        assert_eq!(shape.to_string(), shape.name());
    }
    assert_eq!(
        "weird".parse::<Shape>(),
        Err("unknown shape `weird` (chain, fanout, layered, random)".to_string())
    );
}

/// A log that refuses a batch mid-run stops the simulation with the log's own message, wherever
/// the refused batch falls among those the simulator lets the log hold at once: no hang, and no
/// report of a run whose events were lost.
#[test]
fn a_log_that_refuses_a_batch_stops_the_simulation_with_its_message() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    for accepts in [0, 1, 2, 5, 9] {
        let mut cfg = SimConfig::new(20, 20_000, Shape::Layered, 0.0, 1);
        cfg.batch = 256;
        let log = Arc::new(common::RefusingLog {
            accepts: accepts.into(),
        });
        let err = rt
            .block_on(simulate(&cfg, log))
            .expect_err("the log refused a batch");
        assert!(
            err.to_string().contains("disk full at /var/log/events.db"),
            "after {accepts}: {err}"
        );
    }
}

/// A benchmark's sections measure their own peak memory: after `reset_peak_memory` the peak is
/// what the process holds now, not the largest it ever held (a section after a large one was
/// reported with the large one's peak).
#[cfg(target_os = "linux")]
#[test]
fn the_peak_memory_starts_over_when_reset() {
    use agent_runtime_workforce::sim::{peak_memory_bytes, reset_peak_memory};
    // Large beside what the other tests of this binary hold at once (they run meanwhile).
    const BIG: usize = 256 << 20;
    // Touched page by page, then freed (a block this large is its own mapping, returned whole).
    let mut block = vec![0u8; BIG];
    for i in (0..BIG).step_by(4096) {
        block[i] = 1;
    }
    std::hint::black_box(&block);
    let with_block = peak_memory_bytes().unwrap();
    drop(block);
    assert!(
        reset_peak_memory(),
        "the peak cannot start over here: /proc/self/clear_refs is not writable"
    );
    let after = peak_memory_bytes().unwrap();
    assert!(
        after + (BIG as u64) / 2 < with_block,
        "peak {after} after the reset, {with_block} with the block"
    );
}
