//! The store benchmark behind `agent-runtime bench store`, measured against plain batched
//! SQLite inserting the same bytes into the same table in the same run.

use std::time::Instant;

use agent_runtime_core::{Actor, EventKind, EventQuery, NewEvent, RunId, TaskId, Timestamp};
use serde::Serialize;

use crate::config::{Encryption, Passphrase, StoreConfig};
use crate::crypto::KdfParams;
use crate::error::StoreError;
use crate::export::ExportFormat;
use crate::store::Store;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Events per measurement.
    pub events: u64,
    /// Canonical payload size in bytes.
    pub payload_bytes: usize,
    /// Events per append call (and per baseline transaction).
    pub batch: usize,
    /// Concurrent appending threads.
    pub appenders: usize,
}

/// One measured rate.
#[derive(Clone, Debug, Serialize)]
pub struct Rate {
    /// Events processed.
    pub events: u64,
    /// Seconds taken.
    pub seconds: f64,
    /// Events per second.
    pub per_second: f64,
}

impl Rate {
    fn new(events: u64, start: Instant) -> Rate {
        let seconds = start.elapsed().as_secs_f64().max(1e-9);
        Rate {
            events,
            seconds,
            per_second: events as f64 / seconds,
        }
    }
}

/// Everything `bench store` prints.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Events per measurement.
    pub events: u64,
    /// Payload bytes per event.
    pub payload_bytes: usize,
    /// Events per append call.
    pub batch: usize,
    /// Concurrent appenders.
    pub appenders: usize,
    /// Durability of every measurement (the store's default).
    pub durability: &'static str,
    /// Baseline: plain batched rusqlite inserts of the same rows, one transaction per
    /// `batch` events (what each appender hands the store).
    pub baseline_sqlite_insert: Rate,
    /// Mean events per group commit in the encrypted append run: the store merges concurrent
    /// appenders' batches into one transaction.
    pub mean_group_commit_events: f64,
    /// The baseline again with transactions as large as the store's mean group commit: how much
    /// of the store's speed comes from group commit rather than the per-event work.
    pub baseline_at_group_commit_size: Rate,
    /// Durable encrypted appends through the store.
    pub append_encrypted: Rate,
    /// Durable plaintext appends through the store.
    pub append_plaintext: Rate,
    /// `append_encrypted / baseline` (goal: at least 0.6).
    pub encrypted_vs_baseline: f64,
    /// `append_plaintext / baseline`.
    pub plaintext_vs_baseline: f64,
    /// Full verification of the encrypted log (decrypt and hash every event).
    pub verify_encrypted: Rate,
    /// Full verification of the plaintext log.
    pub verify_plaintext: Rate,
    /// jsonl export of the encrypted log.
    pub export_jsonl_encrypted: Rate,
    /// Offline verification of a bundle.
    pub verify_bundle: Rate,
    /// Goals and whether this run met them.
    pub goals: Vec<Goal>,
}

/// A goal from the issue and whether it was met.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    /// What is measured.
    pub name: &'static str,
    /// The target.
    pub target: f64,
    /// The measured value.
    pub measured: f64,
    /// Whether it was met.
    pub met: bool,
}

impl BenchReport {
    /// A few lines for people.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "store bench: {} events of {} bytes, batches of {}, {} appenders, synchronous={}\n",
            self.events, self.payload_bytes, self.batch, self.appenders, self.durability
        );
        for (name, r) in [
            ("baseline sqlite insert", &self.baseline_sqlite_insert),
            ("baseline, group size", &self.baseline_at_group_commit_size),
            ("append encrypted", &self.append_encrypted),
            ("append plaintext", &self.append_plaintext),
            ("verify encrypted", &self.verify_encrypted),
            ("verify plaintext", &self.verify_plaintext),
            ("export jsonl", &self.export_jsonl_encrypted),
            ("verify bundle", &self.verify_bundle),
        ] {
            s.push_str(&format!("  {name:<24} {:>12.0} events/s\n", r.per_second));
        }
        s.push_str(&format!(
            "  mean group commit        {:>12.0} events\n",
            self.mean_group_commit_events
        ));
        s.push_str(&format!(
            "  encrypted / baseline     {:>12.2}\n",
            self.encrypted_vs_baseline
        ));
        for g in &self.goals {
            s.push_str(&format!(
                "  goal {:<40} {:>12.2} (target {}) {}\n",
                g.name,
                g.measured,
                g.target,
                if g.met { "met" } else { "NOT met" }
            ));
        }
        s
    }
}

fn make_events(n: u64, payload_bytes: usize) -> Vec<NewEvent> {
    let run = RunId::from_bytes([0x42; 16]);
    (0..n)
        .map(|i| {
            // {"data":"…","i":N} sized so the canonical JSON is `payload_bytes` long.
            let fixed = format!("{{\"data\":\"\",\"i\":{i}}}").len();
            let filler: String = (0..payload_bytes.saturating_sub(fixed))
                .map(|k| (b'a' + ((i as usize + k) % 26) as u8) as char)
                .collect();
            NewEvent {
                run_id: run,
                task_id: Some(TaskId::from_bytes([(i % 251) as u8; 16])),
                actor: Actor::Agent("bench".into()),
                kind: EventKind::ToolCompleted,
                time: Timestamp::from_unix_nanos(1_700_000_000_000_000_000 + i),
                payload: serde_json::json!({"data": filler, "i": i}),
            }
        })
        .collect()
}

fn append_all(
    store: &Store,
    events: &[NewEvent],
    batch: usize,
    appenders: usize,
) -> Result<Rate, StoreError> {
    let per = events.len().div_ceil(appenders).max(1);
    // Owned batches built before the clock starts: callers hand their events over, so cloning
    // them is not part of appending.
    let parts: Vec<Vec<Vec<NewEvent>>> = events
        .chunks(per)
        .map(|part| part.chunks(batch).map(<[NewEvent]>::to_vec).collect())
        .collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| {
                s.spawn(move || -> Result<(), StoreError> {
                    for chunk in part {
                        store.append_blocking(chunk)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        }
        Ok::<(), StoreError>(())
    })?;
    Ok(Rate::new(events.len() as u64, start))
}

/// The baseline's table: a row per event with run, kind and time indexes, what a plain SQLite
/// event log looks like (and the store's own layout before frames, format 1).
const BASELINE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq       INTEGER PRIMARY KEY,
    run_id    BLOB NOT NULL,
    task_id   BLOB,
    actor     TEXT NOT NULL,
    kind      TEXT NOT NULL,
    time_ns   INTEGER NOT NULL,
    payload   BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    hash      BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_run ON events(run_id, seq);
CREATE INDEX IF NOT EXISTS events_by_kind ON events(kind, seq);
CREATE INDEX IF NOT EXISTS events_by_time ON events(time_ns, seq);
";

fn baseline(path: &std::path::Path, events: &[NewEvent], batch: usize) -> Result<Rate, StoreError> {
    let err = |e: rusqlite::Error| StoreError::Sqlite {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let mut conn = rusqlite::Connection::open(path).map_err(err)?;
    conn.execute_batch(&format!(
        "PRAGMA page_size=16384; PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; {}",
        crate::store::WRITER_TUNING
    ))
    .map_err(err)?;
    conn.execute_batch(BASELINE_SCHEMA).map_err(err)?;
    // The same bytes the store writes: ids, strings, canonical payload, two 32-byte hashes.
    let rows: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e.run_id.as_bytes().to_vec(),
                e.task_id.map(|t| t.as_bytes().to_vec()),
                e.actor.to_string(),
                e.kind.as_str(),
                e.time.as_unix_nanos() as i64,
                agent_runtime_core::canonical_json(&e.payload),
            )
        })
        .collect();
    let hash = [7u8; 32];
    let start = Instant::now();
    let mut seq = 0i64;
    for chunk in rows.chunks(batch) {
        let tx = conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached("INSERT INTO events (seq, run_id, task_id, actor, kind, time_ns, payload, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)")
                .map_err(err)?;
            for r in chunk {
                seq += 1;
                stmt.execute(rusqlite::params![
                    seq,
                    r.0,
                    r.1,
                    r.2,
                    r.3,
                    r.4,
                    r.5,
                    &hash[..],
                    &hash[..]
                ])
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
    }
    Ok(Rate::new(events.len() as u64, start))
}

/// Runs every measurement in a temporary directory under the system's temporary folder.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, StoreError> {
    run_under(cfg, &std::env::temp_dir())
}

/// Runs every measurement in a temporary directory made in `parent` (removed afterwards), so
/// that the figures are those of the disk `parent` is on.
pub fn run_under(cfg: &BenchConfig, parent: &std::path::Path) -> Result<BenchReport, StoreError> {
    let dir = parent.join(format!("agent-runtime-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
        what: "cannot create bench directory",
        path: dir.clone(),
        source,
    })?;
    let result = run_in(cfg, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(cfg: &BenchConfig, dir: &std::path::Path) -> Result<BenchReport, StoreError> {
    let events = make_events(cfg.events, cfg.payload_bytes);
    let base = baseline(&dir.join("baseline.db"), &events, cfg.batch)?;

    let enc_cfg = StoreConfig::new(dir.join("enc.db"))
        .passphrase(Passphrase::new("bench"))
        .kdf(KdfParams::default());
    let enc = Store::open(enc_cfg)?;
    let append_enc = append_all(&enc, &events, cfg.batch, cfg.appenders)?;
    let ws = enc.writer_stats();
    let mean_commit = ws.events as f64 / ws.commits.max(1) as f64;
    let base_group = baseline(
        &dir.join("baseline-group.db"),
        &events,
        (mean_commit.round() as usize).max(1),
    )?;
    let plain =
        Store::open(StoreConfig::new(dir.join("plain.db")).encryption(Encryption::Plaintext))?;
    let append_plain = append_all(&plain, &events, cfg.batch, cfg.appenders)?;

    let start = Instant::now();
    let v = enc.verify()?;
    let verify_enc = Rate::new(v.events, start);
    let start = Instant::now();
    let v = plain.verify()?;
    let verify_plain = Rate::new(v.events, start);
    let start = Instant::now();
    let x = enc.export(&EventQuery::default(), ExportFormat::Jsonl, std::io::sink())?;
    let export = Rate::new(x.events, start);
    let bundle = dir.join("bundle.jsonl");
    let file = std::fs::File::create(&bundle).map_err(|source| StoreError::Io {
        what: "cannot create",
        path: bundle.clone(),
        source,
    })?;
    enc.export(&EventQuery::default(), ExportFormat::Bundle, file)?;
    let start = Instant::now();
    let b = crate::verify::verify_bundle(&bundle)?;
    let verify_bundle = Rate::new(b.events, start);

    let ratio = append_enc.per_second / base.per_second;
    let goals = vec![
        Goal {
            name: "encrypted append events/s >= 200000",
            target: 200_000.0,
            measured: append_enc.per_second,
            met: append_enc.per_second >= 200_000.0,
        },
        Goal {
            name: "encrypted append / baseline >= 0.6",
            target: 0.6,
            measured: ratio,
            met: ratio >= 0.6,
        },
        Goal {
            name: "verify events/s >= 1000000",
            target: 1_000_000.0,
            measured: verify_enc.per_second,
            met: verify_enc.per_second >= 1_000_000.0,
        },
        Goal {
            name: "jsonl export events/s >= 500000",
            target: 500_000.0,
            measured: export.per_second,
            met: export.per_second >= 500_000.0,
        },
    ];
    Ok(BenchReport {
        events: cfg.events,
        payload_bytes: cfg.payload_bytes,
        batch: cfg.batch,
        appenders: cfg.appenders,
        durability: "FULL",
        plaintext_vs_baseline: append_plain.per_second / base.per_second,
        encrypted_vs_baseline: ratio,
        baseline_sqlite_insert: base,
        mean_group_commit_events: mean_commit,
        baseline_at_group_commit_size: base_group,
        append_encrypted: append_enc,
        append_plaintext: append_plain,
        verify_encrypted: verify_enc,
        verify_plaintext: verify_plain,
        export_jsonl_encrypted: export,
        verify_bundle,
        goals,
    })
}
