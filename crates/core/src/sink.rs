//! The event log seams: [`EventSink`] to append, [`EventSource`] to read back.
//!
//! The embedded default is `agent-runtime-store` (SQLite). A team deployment can put the log on
//! another database by implementing these two traits.

use crate::event::{Envelope, EventKind, Hash32, NewEvent};
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
