//! The event log seams: [`EventSink`] to append, [`EventSource`] to read back.
//!
//! The embedded default is `agent-runtime-store` (SQLite). A team deployment can put the log on
//! another database by implementing these two traits.

use crate::event::{EncodedEvent, Envelope, EventKind, Hash32, NewEvent};
use crate::ids::RunId;
use crate::time::Timestamp;

/// Where one appended event landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// Its sequence number.
    pub seq: u64,
    /// Its chain hash.
    pub hash: Hash32,
}

/// A failure to append or read events.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    /// What went wrong and where, in one line.
    pub message: String,
}

/// Appends events to a log.
///
/// # Contract
/// - **Durability**: `append` returns `Ok` only once every event in the batch is durable as the
///   implementation documents; after `Ok`, a crash loses none of them.
/// - **Atomicity**: a batch is appended whole or not at all, with consecutive sequence numbers.
/// - **Order**: events of one call keep their order; concurrent calls are serialized in some order.
/// - **Cancellation**: dropping the future after the batch was handed over does not withdraw it;
///   it may still be appended.
#[async_trait::async_trait]
pub trait EventSink: Send + Sync {
    /// Appends `events` as one batch and returns where each landed.
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, SinkError>;

    /// Appends events whose canonical bytes are already computed, under the same contract.
    /// Logs that store canonical bytes override this to use them as they are; the default
    /// parses each payload back and calls [`EventSink::append`].
    async fn append_encoded(&self, events: Vec<EncodedEvent>) -> Result<Vec<Appended>, SinkError> {
        let decoded = events
            .iter()
            .map(EncodedEvent::to_new_event)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SinkError {
                message: format!("an encoded event's payload is not JSON: {e}"),
            })?;
        self.append(decoded).await
    }
}

/// Which events to read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Only this run's events.
    pub run_id: Option<RunId>,
    /// Only these kinds (empty: all).
    pub kinds: Vec<EventKind>,
    /// Only events at or after this time.
    pub since: Option<Timestamp>,
    /// Only events before this time.
    pub until: Option<Timestamp>,
    /// Only events with a sequence number greater than this.
    pub after_seq: Option<u64>,
    /// At most this many events.
    pub limit: Option<usize>,
}

/// Reads events back, in sequence order.
#[async_trait::async_trait]
pub trait EventSource: Send + Sync {
    /// The events matching `query`, in sequence order.
    async fn query(&self, query: EventQuery) -> Result<Vec<Envelope>, SinkError>;
}

/// An event log in memory: numbers and chains events exactly as a durable log does, and keeps
/// them until dropped. For tests, the simulator without a store, and embedders that need no
/// persistence.
///
/// ```
/// # tokio_test_block_on(async {
/// use agent_runtime_core::{Actor, EventKind, EventQuery, EventSink, EventSource, MemoryLog, NewEvent, RunId, Timestamp};
/// let log = MemoryLog::default();
/// let run_id = RunId::from_bytes([1; 16]);
/// let ev = NewEvent { run_id, task_id: None, actor: Actor::System, kind: EventKind::Note,
///                     time: Timestamp::EPOCH, payload: serde_json::json!({}) };
/// let landed = log.append(vec![ev]).await.unwrap();
/// assert_eq!(landed[0].seq, 1);
/// assert_eq!(log.query(EventQuery::default()).await.unwrap().len(), 1);
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     let waker = std::task::Waker::noop();
/// #     let mut cx = std::task::Context::from_waker(&waker);
/// #     let mut f = std::pin::pin!(f);
/// #     loop { if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; } }
/// # }
/// ```
#[derive(Debug, Default)]
pub struct MemoryLog {
    events: std::sync::Mutex<Vec<Envelope>>,
}

impl MemoryLog {
    /// Appends without async (the memory log never waits).
    pub fn append_now(&self, events: Vec<NewEvent>) -> Vec<Appended> {
        let mut log = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            let prev = log.last().map_or(Hash32::GENESIS, |e| e.hash);
            let seq = log.len() as u64 + 1;
            let env = Envelope::seal(seq, prev, event);
            out.push(Appended {
                seq,
                hash: env.hash,
            });
            log.push(env);
        }
        out
    }

    /// [`EventSink::append_encoded`] without async: hashes the events' bytes as they are and
    /// parses each payload once (the log keeps values). A payload that is not JSON appends
    /// nothing.
    pub fn append_encoded_now(
        &self,
        events: Vec<EncodedEvent>,
    ) -> Result<Vec<Appended>, serde_json::Error> {
        let payloads = events
            .iter()
            .map(|e| serde_json::from_slice(e.payload_json()))
            .collect::<Result<Vec<serde_json::Value>, _>>()?;
        let mut log = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(events.len());
        for (event, payload) in events.iter().zip(payloads) {
            let prev_hash = log.last().map_or(Hash32::GENESIS, |e| e.hash);
            let seq = log.len() as u64 + 1;
            let hash = crate::event::chain_hash(&prev_hash, seq, event.body());
            out.push(Appended { seq, hash });
            log.push(Envelope {
                seq,
                run_id: event.run_id(),
                task_id: event.task_id(),
                actor: event.actor().clone(),
                kind: event.kind(),
                time: event.time(),
                payload,
                prev_hash,
                hash,
            });
        }
        Ok(out)
    }

    /// The events matching `query`, without async.
    pub fn query_now(&self, query: &EventQuery) -> Vec<Envelope> {
        let log = self.events.lock().unwrap_or_else(|p| p.into_inner());
        log.iter()
            .filter(|e| query.matches(e))
            .take(query.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect()
    }

    /// Every event, in order.
    pub fn all(&self) -> Vec<Envelope> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl EventQuery {
    /// Whether `e` matches every condition of the query but `limit`.
    pub fn matches(&self, e: &Envelope) -> bool {
        self.run_id.is_none_or(|r| r == e.run_id)
            && (self.kinds.is_empty() || self.kinds.contains(&e.kind))
            && self.since.is_none_or(|t| e.time >= t)
            && self.until.is_none_or(|t| e.time < t)
            && self.after_seq.is_none_or(|s| e.seq > s)
    }
}

#[async_trait::async_trait]
impl EventSink for MemoryLog {
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, SinkError> {
        Ok(self.append_now(events))
    }

    async fn append_encoded(&self, events: Vec<EncodedEvent>) -> Result<Vec<Appended>, SinkError> {
        self.append_encoded_now(events).map_err(|e| SinkError {
            message: format!("an encoded event's payload is not JSON: {e}"),
        })
    }
}

#[async_trait::async_trait]
impl EventSource for MemoryLog {
    async fn query(&self, query: EventQuery) -> Result<Vec<Envelope>, SinkError> {
        Ok(self.query_now(&query))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Actor;

    /// The encoded path is a shortcut, not another log: the same events give the same envelopes.
    #[test]
    fn encoded_appends_give_the_envelopes_plain_appends_give() {
        let events: Vec<NewEvent> = (0..5u8)
            .map(|i| NewEvent {
                run_id: RunId::from_bytes([i; 16]),
                task_id: (i % 2 == 0).then(|| crate::ids::TaskId::from_bytes([9; 16])),
                actor: Actor::Agent(format!("a{i}")),
                kind: EventKind::Note,
                time: Timestamp::from_unix_nanos(u64::from(i) * 1_000),
                payload: serde_json::json!({"z": [i, 0.1, "é\n"], "a": {"b": null}}),
            })
            .collect();
        let plain = MemoryLog::default();
        let encoded = MemoryLog::default();
        let landed_plain = plain.append_now(events.clone());
        let landed_encoded = encoded
            .append_encoded_now(events.into_iter().map(EncodedEvent::new).collect())
            .unwrap();
        assert_eq!(landed_plain, landed_encoded);
        assert_eq!(plain.all(), encoded.all());
    }
}
