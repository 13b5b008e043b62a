//! Summary figures about a log.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{StoreError, sqlite_error};
use crate::store::Store;

/// What `audit stats` shows.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    /// The database file.
    pub path: String,
    /// Size of the database file and its write-ahead log, in bytes.
    pub bytes: u64,
    /// Whether payloads are sealed.
    pub encrypted: bool,
    /// Number of events.
    pub events: u64,
    /// Number of distinct runs.
    pub runs: u64,
    /// Events per kind.
    pub kinds: BTreeMap<String, u64>,
    /// Time of the first and last event (by sequence).
    pub first_time: Option<String>,
    /// Time of the last event.
    pub last_time: Option<String>,
    /// Sequence number and hash of the newest event.
    pub head_seq: u64,
    /// Hash of the newest event.
    pub head_hash: Option<String>,
}

impl Store {
    /// Counts events by kind and run, and reports the head.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        let path = &self.inner.path;
        let conn = self.inner.reader.lock().unwrap_or_else(|p| p.into_inner());
        let err = |e| sqlite_error(path, e, None);
        let mut kinds = BTreeMap::new();
        let mut events = 0;
        {
            let mut stmt = conn
                .prepare("SELECT kind, count(*) FROM events GROUP BY kind")
                .map_err(err)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(err)?;
            for row in rows {
                let (k, n) = row.map_err(err)?;
                let n = u64::try_from(n).unwrap_or(0);
                events += n;
                kinds.insert(k, n);
            }
        }
        let runs: i64 = conn
            .query_row("SELECT count(DISTINCT run_id) FROM events", [], |r| {
                r.get(0)
            })
            .map_err(err)?;
        let time_at = |order: &str| -> Result<Option<String>, StoreError> {
            let t: Option<i64> = conn
                .query_row(
                    &format!("SELECT time_ns FROM events ORDER BY seq {order} LIMIT 1"),
                    [],
                    |r| r.get(0),
                )
                .map(Some)
                .or_else(|e| {
                    if matches!(e, rusqlite::Error::QueryReturnedNoRows) {
                        Ok(None)
                    } else {
                        Err(e)
                    }
                })
                .map_err(err)?;
            Ok(t.map(|t| {
                agent_runtime_core::Timestamp::from_unix_nanos(u64::try_from(t).unwrap_or(0))
                    .to_string()
            }))
        };
        let first_time = time_at("ASC")?;
        let last_time = time_at("DESC")?;
        drop(conn);
        let head = self.head()?;
        let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        Ok(Stats {
            path: path.display().to_string(),
            bytes: size(path) + size(std::path::Path::new(&wal)),
            encrypted: self.is_encrypted(),
            events,
            runs: u64::try_from(runs).unwrap_or(0),
            kinds,
            first_time,
            last_time,
            head_seq: head.map_or(0, |h| h.0),
            head_hash: head.map(|h| h.1.to_string()),
        })
    }
}
