#![allow(dead_code)]
//! Helpers shared by the store's integration tests.

use std::path::Path;

use agent_runtime_core::{Actor, EventKind, NewEvent, RunId, TaskId, Timestamp};
use agent_runtime_store::{KdfParams, Passphrase, Store, StoreConfig};

/// A cheap Argon2id cost so tests open databases quickly.
pub const CHEAP_KDF: KdfParams = KdfParams {
    m_kib: 256,
    t: 1,
    p: 1,
};

pub fn encrypted_config(path: &Path, pass: &str) -> StoreConfig {
    StoreConfig::new(path)
        .passphrase(Passphrase::new(pass))
        .kdf(CHEAP_KDF)
}

pub fn open_encrypted(path: &Path) -> Store {
    Store::open(encrypted_config(path, "test passphrase")).expect("open encrypted store")
}

pub fn event(run: u8, i: u64) -> NewEvent {
    NewEvent {
        run_id: RunId::from_bytes([run; 16]),
        task_id: if i.is_multiple_of(2) {
            Some(TaskId::from_bytes([i as u8; 16]))
        } else {
            None
        },
        actor: Actor::Agent(format!("agent-{run}")),
        kind: if i.is_multiple_of(3) {
            EventKind::TaskStarted
        } else {
            EventKind::ToolCompleted
        },
        time: Timestamp::from_unix_nanos(1_000_000_000 * i),
        payload: serde_json::json!({"i": i, "run": run, "text": "x".repeat(64)}),
    }
}

pub fn events(run: u8, n: u64) -> Vec<NewEvent> {
    (1..=n).map(|i| event(run, i)).collect()
}

/// Opens the database behind the store's back, as an attacker would: without the triggers that
/// keep honest tools from changing events.
pub fn tamper_conn(path: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).expect("open for tampering");
    conn.execute_batch(
        "DROP TRIGGER IF EXISTS frames_append_only_update; DROP TRIGGER IF EXISTS frames_append_only_delete; \
         DROP TRIGGER IF EXISTS frame_runs_append_only_update; DROP TRIGGER IF EXISTS frame_runs_append_only_delete;",
    )
    .expect("drop append-only triggers");
    conn
}

/// One event as a row of the tampering table: seq, run, task, actor, kind, time, payload,
/// prev_hash, hash.
type EventRow = (
    i64,
    Vec<u8>,
    Option<Vec<u8>>,
    String,
    String,
    i64,
    Vec<u8>,
    Vec<u8>,
    Vec<u8>,
);

/// Tampers with the log as rows: the frames are unpacked into a temporary table `events` with
/// a row per event (seq, run_id, task_id, actor, kind, time_ns, payload, prev_hash, hash),
/// `change` edits it with SQL, and the rows are written back as frames of one event each,
/// byte for byte what an attacker with SQLite and the format description could write.
pub fn with_event_rows(path: &Path, change: impl FnOnce(&rusqlite::Connection)) {
    let conn = tamper_conn(path);
    conn.execute_batch(
        "CREATE TEMP TABLE events (seq INTEGER PRIMARY KEY, run_id BLOB, task_id BLOB, actor TEXT, \
         kind TEXT, time_ns INTEGER, payload BLOB, prev_hash BLOB, hash BLOB);",
    )
    .unwrap();
    {
        let mut frames = conn
            .prepare("SELECT first_seq, prev_hash, body FROM frames ORDER BY first_seq")
            .unwrap();
        let mut rows = frames.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            let first: i64 = row.get(0).unwrap();
            let prev = row.get_ref(1).unwrap().as_blob().unwrap();
            let body = row.get_ref(2).unwrap().as_blob().unwrap();
            for r in agent_runtime_store::frame::records(first as u64, prev, body) {
                let r = r.expect("an intact frame");
                conn.execute(
                    "INSERT INTO temp.events VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    rusqlite::params![
                        r.seq as i64,
                        &r.run_id[..],
                        r.task_id.as_ref().map(|t| &t[..]),
                        r.actor,
                        r.kind,
                        r.time_ns as i64,
                        r.payload,
                        r.prev_hash,
                        r.hash
                    ],
                )
                .unwrap();
            }
        }
    }
    change(&conn);
    conn.execute_batch("DELETE FROM main.frames; DELETE FROM main.frame_runs;")
        .unwrap();
    let rows: Vec<EventRow> = conn
        .prepare("SELECT * FROM temp.events ORDER BY seq")
        .unwrap()
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (seq, run, task, actor, kind, time, payload, prev, hash) in rows {
        let run_id = RunId::from_bytes(run.as_slice().try_into().unwrap());
        let task_id = task.map(|t| TaskId::from_bytes(t.as_slice().try_into().unwrap()));
        let mut body = Vec::new();
        agent_runtime_core::write_canonical_header(
            &mut body,
            &run_id,
            task_id.as_ref(),
            &actor,
            &kind,
            Timestamp::from_unix_nanos(time as u64),
        );
        body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        body.extend_from_slice(&payload);
        // Written as given, even when not 32 bytes: that is a kind of damage too.
        body.extend_from_slice(&hash);
        conn.execute(
            "INSERT INTO main.frames VALUES (?1, ?1, ?2, ?2, ?3, ?4, ?5)",
            rusqlite::params![seq, time, prev, hash, body],
        )
        .unwrap();
        conn.execute(
            "INSERT OR IGNORE INTO main.frame_runs VALUES (?1, ?2)",
            rusqlite::params![run, seq],
        )
        .unwrap();
    }
}

/// Runs SQL against the row-per-event view of [`with_event_rows`] (to tamper with the log).
pub fn tamper(path: &Path, sql: &str) {
    with_event_rows(path, |conn| conn.execute_batch(sql).expect("tamper sql"));
}
