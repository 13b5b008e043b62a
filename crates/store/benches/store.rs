//! Criterion benches of the store's hot paths. The whole-subsystem figures with their baseline
//! come from `agent-runtime bench store --json`; these track the pieces between changes.

use agent_runtime_core::{Actor, EventKind, EventQuery, NewEvent, RunId, TaskId, Timestamp};
use agent_runtime_store::{ExportFormat, KdfParams, Passphrase, Store, StoreConfig};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

fn events(n: u64) -> Vec<NewEvent> {
    (0..n)
        .map(|i| NewEvent {
            run_id: RunId::from_bytes([1; 16]),
            task_id: Some(TaskId::from_bytes([(i % 200) as u8; 16])),
            actor: Actor::Agent("bench".into()),
            kind: EventKind::ToolCompleted,
            time: Timestamp::from_unix_nanos(i),
            payload: serde_json::json!({"data": "z".repeat(490), "i": i}),
        })
        .collect()
}

fn store(dir: &tempfile::TempDir, name: &str, encrypted: bool) -> Store {
    let path = dir.path().join(name);
    let cfg = if encrypted {
        StoreConfig::new(path)
            .passphrase(Passphrase::new("bench"))
            .kdf(KdfParams {
                m_kib: 256,
                t: 1,
                p: 1,
            })
    } else {
        StoreConfig::plaintext(path)
    };
    Store::open(cfg).expect("open bench store")
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let batch = events(1000);
    let mut g = c.benchmark_group("store");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1000));
    for encrypted in [true, false] {
        let s = store(
            &dir,
            if encrypted { "a-enc.db" } else { "a-plain.db" },
            encrypted,
        );
        let name = if encrypted {
            "append_1000_encrypted"
        } else {
            "append_1000_plaintext"
        };
        g.bench_function(name, |b| {
            b.iter_batched(
                || batch.clone(),
                |evs| s.append_blocking(evs).expect("append"),
                BatchSize::LargeInput,
            )
        });
    }
    let s = store(&dir, "v.db", true);
    s.append_blocking(events(10_000)).expect("fill");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("verify_10000_encrypted", |b| {
        b.iter(|| s.verify().expect("verify"))
    });
    g.bench_function("export_jsonl_10000_encrypted", |b| {
        b.iter(|| {
            s.export(&EventQuery::default(), ExportFormat::Jsonl, std::io::sink())
                .expect("export")
        })
    });
    g.finish();
    let one = events(1).remove(0);
    c.bench_function("canonical_body_512b", |b| b.iter(|| one.canonical_body()));
}

criterion_group!(benches, bench);
criterion_main!(benches);
