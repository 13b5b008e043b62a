//! Summary figures about a log.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::StoreError;
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
    /// The earliest event time. Not necessarily the first event's: a simulation's events
    /// carry virtual times, and several processes append to one log.
    pub first_time: Option<String>,
    /// The latest event time.
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
        // One pass over the records (their metadata is in clear: nothing is decrypted).
        let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
        let mut events = 0;
        let mut runs = std::collections::BTreeSet::new();
        let mut times: Option<(u64, u64)> = None;
        crate::store::scan_events(&conn, path, &Default::default(), &mut |r| {
            events += 1;
            match kinds.get_mut(r.kind) {
                Some(n) => *n += 1,
                None => {
                    kinds.insert(r.kind.to_string(), 1);
                }
            }
            runs.insert(r.run_id);
            times = Some(times.map_or((r.time_ns, r.time_ns), |(earliest, latest)| {
                (earliest.min(r.time_ns), latest.max(r.time_ns))
            }));
            Ok(true)
        })?;
        let show = |t: u64| agent_runtime_core::Timestamp::from_unix_nanos(t).to_string();
        let first_time = times.map(|(t, _)| show(t));
        let last_time = times.map(|(_, t)| show(t));
        drop(conn);
        let head = self.head()?;
        let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        Ok(Stats {
            path: path.display().to_string(),
            bytes: size(path) + size(&crate::store::beside(path, "-wal")),
            encrypted: self.is_encrypted(),
            events,
            runs: runs.len() as u64,
            kinds,
            first_time,
            last_time,
            head_seq: head.map_or(0, |h| h.0),
            head_hash: head.map(|h| h.1.to_string()),
        })
    }
}
