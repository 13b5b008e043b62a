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
        "DROP TRIGGER events_append_only_update; DROP TRIGGER events_append_only_delete;",
    )
    .expect("drop append-only triggers");
    conn
}

/// Runs SQL against the database behind the store's back (to tamper with it).
pub fn tamper(path: &Path, sql: &str) {
    tamper_conn(path).execute_batch(sql).expect("tamper sql");
}
