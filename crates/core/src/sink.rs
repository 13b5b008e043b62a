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
    /// Whether the log will never take these events (one too large, a time it cannot store):
    /// trying again cannot help. `false` when it could not take them now (a full disk, a
    /// read-only file), which may pass.
    pub refused: bool,
}

impl SinkError {
    /// An error of a log that could not take events now; see [`SinkError::refused`].
    pub fn new(message: impl Into<String>) -> SinkError {
        SinkError {
            message: message.into(),
            refused: false,
        }
    }

    /// An error of a log that will never take these events; see [`SinkError::refused`].
    pub fn refused(message: impl Into<String>) -> SinkError {
        SinkError {
            message: message.into(),
            refused: true,
        }
    }
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
            .map_err(|e| SinkError::new(format!("an encoded event's payload is not JSON: {e}")))?;
        self.append(decoded).await
    }

    /// Hands `events` to the log as the next batch of `stream` and returns once the batch has
    /// its place in the log's order, usually before it is durable; the returned
    /// [`PendingAppend`] resolves as [`EventSink::append_encoded`] would have. Batches of one
    /// stream land in the order their calls returned, so a producer can go on working (and
    /// submit more) while the log writes, and keep its order.
    ///
    /// **No gaps**: once a batch of `stream` fails, the stream is failed and every batch of it
    /// that was submitted after that one is refused too, even one already queued; a log of
    /// `stream`'s batches is thus always a prefix of what was submitted.
    ///
    /// Errors found before the batch is queued (a payload too large, a closed log, a failed
    /// stream) come back here; errors while writing come from the pending append. Dropping the
    /// pending append does not withdraw the batch. The default appends at once and returns
    /// the finished result: it keeps both promises but overlaps nothing.
    async fn submit_encoded(
        &self,
        events: Vec<EncodedEvent>,
        stream: &AppendStream,
    ) -> Result<PendingAppend, SinkError> {
        stream.check()?;
        let landed = self.append_encoded(events).await;
        if let Err(e) = &landed {
            stream.fail(e.message.as_str());
        }
        Ok(Box::pin(std::future::ready(landed)))
    }

    /// Claims `run_id` for the caller, who is about to drive it (start it, or resume it): while
    /// the returned [`RunClaim`] lives, claiming the same run again fails, in this process or,
    /// for a log that several processes share, in another. Two drivers of one run would
    /// interleave their events and run its tools twice. The claim ends when it is dropped, and
    /// with the process however it ends (kill -9 included), so a run whose driver died can be
    /// resumed at once.
    ///
    /// The default claims nothing: right for a log that only its own process writes and whose
    /// owner drives each run once, such as [`MemoryLog`].
    fn claim_run(&self, run_id: RunId) -> Result<RunClaim, SinkError> {
        let _ = run_id;
        Ok(RunClaim::unguarded())
    }

    /// [`EventSink::claim_run`] for a run about to be created: refused as well when the log
    /// already holds events of `run_id`. Run ids are drawn from a run's seed and clock (so that
    /// a run is reproducible), and two runs with the same seed started in the same millisecond,
    /// or a simulation configuration run twice, draw the same id; appending the second run
    /// would interleave two runs under one id, which neither replay nor resume can untangle.
    ///
    /// The default only claims: right for logs that cannot look up a run.
    fn claim_new_run(&self, run_id: RunId) -> Result<RunClaim, SinkError> {
        self.claim_run(run_id)
    }
}

/// A run claimed by [`EventSink::claim_run`]; dropping it releases the run.
#[must_use = "the run is released as soon as the claim is dropped"]
pub struct RunClaim {
    _guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl RunClaim {
    /// A claim that holds `guard` (a lock, a lease) until it is dropped.
    pub fn new(guard: impl std::any::Any + Send + Sync) -> RunClaim {
        RunClaim {
            _guard: Some(Box::new(guard)),
        }
    }

    /// A claim that guards nothing (see [`EventSink::claim_run`]'s default).
    pub fn unguarded() -> RunClaim {
        RunClaim { _guard: None }
    }
}

impl std::fmt::Debug for RunClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunClaim")
            .field("guarded", &self._guard.is_some())
            .finish()
    }
}

/// A batch handed to a log by [`EventSink::submit_encoded`]: resolves to where its events
/// landed once they are durable, or to the error that kept all of them out.
pub type PendingAppend = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<Appended>, SinkError>> + Send + 'static>,
>;

/// The batches one producer submits that must land without a gap (see
/// [`EventSink::submit_encoded`]). Clones share the stream.
///
/// ```
/// use agent_runtime_core::AppendStream;
/// let stream = AppendStream::new();
/// assert!(stream.check().is_ok());
/// stream.fail("disk full");
/// let refused = stream.check().unwrap_err().message;
/// assert!(refused.contains("earlier batch") && refused.contains("disk full"), "{refused}");
/// ```
#[derive(Clone, Debug, Default)]
pub struct AppendStream {
    /// Why the first batch that failed did: a later refusal says so, since its producer may
    /// see the refusal before (or instead of) that batch's own error.
    failed: std::sync::Arc<std::sync::OnceLock<String>>,
}

impl AppendStream {
    /// A new stream, not failed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the stream failed: a batch of it did not land (`cause` says why, in one line), so
    /// no later one may. The first cause is kept.
    pub fn fail(&self, cause: impl Into<String>) {
        let _ = self.failed.set(cause.into());
    }

    /// Whether a batch of the stream failed.
    pub fn has_failed(&self) -> bool {
        self.failed.get().is_some()
    }

    /// Why the stream failed, once it has.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// `Ok` while no batch of the stream failed; the error to refuse a batch with otherwise,
    /// which names the failure.
    pub fn check(&self) -> Result<(), SinkError> {
        match self.failure() {
            Some(cause) => Err(SinkError::new(format!(
                "an earlier batch of this stream failed to append ({cause}), so later ones \
                     are refused (the log must not have a gap)"
            ))),
            None => Ok(()),
        }
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
    /// Each event as encoded, with its chain hash; its number is its position plus one.
    /// Envelopes (with parsed payloads) are built when read: a simulation appends far more
    /// than anyone reads back, and parsing every payload at append was most of its cost.
    events: std::sync::Mutex<Vec<(EncodedEvent, Hash32)>>,
}

impl MemoryLog {
    /// Appends without async (the memory log never waits).
    pub fn append_now(&self, events: Vec<NewEvent>) -> Vec<Appended> {
        let encoded = events.into_iter().map(EncodedEvent::new).collect();
        self.push_encoded(encoded)
    }

    /// [`MemoryLog::append_now`] for encoded events: checks that each payload is JSON (without
    /// building it), then keeps the bytes as they are. Fails, appending nothing, when one
    /// payload is not JSON.
    pub fn append_encoded_now(
        &self,
        events: Vec<EncodedEvent>,
    ) -> Result<Vec<Appended>, serde_json::Error> {
        for e in &events {
            serde_json::from_slice::<serde::de::IgnoredAny>(e.payload_json())?;
        }
        Ok(self.push_encoded(events))
    }

    fn push_encoded(&self, events: Vec<EncodedEvent>) -> Vec<Appended> {
        let mut log = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            let prev_hash = log.last().map_or(Hash32::GENESIS, |(_, h)| *h);
            let seq = log.len() as u64 + 1;
            let hash = crate::event::chain_hash(&prev_hash, seq, event.body());
            out.push(Appended { seq, hash });
            log.push((event, hash));
        }
        out
    }

    /// The events matching `query`, without async.
    pub fn query_now(&self, query: &EventQuery) -> Vec<Envelope> {
        let log = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (i, (event, hash)) in log.iter().enumerate() {
            if out.len() >= query.limit.unwrap_or(usize::MAX) {
                break;
            }
            let seq = i as u64 + 1;
            if query.matches_parts(seq, event.run_id(), event.kind(), event.time()) {
                let prev_hash = match i {
                    0 => Hash32::GENESIS,
                    _ => log[i - 1].1,
                };
                out.push(envelope(seq, prev_hash, *hash, event));
            }
        }
        out
    }

    /// Every event, in order.
    pub fn all(&self) -> Vec<Envelope> {
        self.query_now(&EventQuery::default())
    }
}

/// The envelope of an event the log holds.
fn envelope(seq: u64, prev_hash: Hash32, hash: Hash32, event: &EncodedEvent) -> Envelope {
    Envelope {
        seq,
        run_id: event.run_id(),
        task_id: event.task_id(),
        actor: event.actor().clone(),
        kind: event.kind(),
        time: event.time(),
        // Every payload was checked to be JSON when it was appended (or encoded from a value).
        payload: serde_json::from_slice(event.payload_json()).unwrap_or_default(),
        prev_hash,
        hash,
    }
}

impl EventQuery {
    /// Whether `e` matches every condition of the query but `limit`.
    pub fn matches(&self, e: &Envelope) -> bool {
        self.matches_parts(e.seq, e.run_id, e.kind, e.time)
    }

    /// [`EventQuery::matches`] on an event's number, run, kind and time.
    pub fn matches_parts(&self, seq: u64, run_id: RunId, kind: EventKind, time: Timestamp) -> bool {
        self.run_id.is_none_or(|r| r == run_id)
            && (self.kinds.is_empty() || self.kinds.contains(&kind))
            && self.since.is_none_or(|t| time >= t)
            && self.until.is_none_or(|t| time < t)
            && self.after_seq.is_none_or(|s| seq > s)
    }
}

#[async_trait::async_trait]
impl EventSink for MemoryLog {
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, SinkError> {
        Ok(self.append_now(events))
    }

    async fn append_encoded(&self, events: Vec<EncodedEvent>) -> Result<Vec<Appended>, SinkError> {
        self.append_encoded_now(events)
            .map_err(|e| SinkError::new(format!("an encoded event's payload is not JSON: {e}")))
    }

    fn claim_new_run(&self, run_id: RunId) -> Result<RunClaim, SinkError> {
        let log = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if log.iter().any(|(e, _)| e.run_id() == run_id) {
            return Err(SinkError::new(format!(
                "run {run_id} is already in the in-memory log; a new run needs a new id"
            )));
        }
        Ok(RunClaim::unguarded())
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

    /// The default `submit_encoded` keeps the no-gap promise: once a batch fails, the stream
    /// refuses the rest, while a batch that landed resolves to where it landed.
    #[test]
    fn the_default_submit_fails_the_stream_with_its_batch() {
        struct Flaky(MemoryLog, std::sync::atomic::AtomicBool);
        #[async_trait::async_trait]
        impl EventSink for Flaky {
            async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, SinkError> {
                if self.1.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(SinkError::new("disk full"));
                }
                Ok(self.0.append_now(events))
            }
        }
        let note = |i: u64| {
            EncodedEvent::new(NewEvent {
                run_id: RunId::from_bytes([1; 16]),
                task_id: None,
                actor: Actor::System,
                kind: EventKind::Note,
                time: Timestamp::from_unix_nanos(i),
                payload: serde_json::json!({ "i": i }),
            })
        };
        let sink = Flaky(
            MemoryLog::default(),
            std::sync::atomic::AtomicBool::new(false),
        );
        let stream = AppendStream::new();
        // Nothing here waits on anything outside: polling until ready is enough.
        fn run<T>(f: impl std::future::Future<Output = T>) -> T {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let mut f = std::pin::pin!(f);
            loop {
                if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                    return v;
                }
            }
        }
        let landed = run(async {
            let pending = sink.submit_encoded(vec![note(1)], &stream).await?;
            pending.await
        });
        assert_eq!(landed.unwrap()[0].seq, 1);
        sink.1.store(true, std::sync::atomic::Ordering::SeqCst);
        let failed = run(async {
            let pending = sink.submit_encoded(vec![note(2)], &stream).await?;
            pending.await
        });
        assert_eq!(failed.unwrap_err().message, "disk full");
        assert!(stream.has_failed());
        sink.1.store(false, std::sync::atomic::Ordering::SeqCst);
        let refused = run(async {
            sink.submit_encoded(vec![note(3)], &stream)
                .await
                .map(|_| ())
        });
        let refused = refused.unwrap_err().message;
        assert!(refused.contains("earlier batch"), "{refused}");
        assert!(
            refused.contains("(disk full)"),
            "the refusal names the failure: {refused}"
        );
        assert_eq!(sink.0.all().len(), 1);
    }

    /// Reads build envelopes from the kept bytes: numbers, chain links and filters as a
    /// durable log gives them.
    #[test]
    fn queries_filter_number_and_chain_the_kept_events() {
        let log = MemoryLog::default();
        let event = |i: u8, kind| NewEvent {
            run_id: RunId::from_bytes([i % 2; 16]),
            task_id: None,
            actor: Actor::System,
            kind,
            time: Timestamp::from_unix_nanos(u64::from(i)),
            payload: serde_json::json!({"i": i}),
        };
        log.append_now((0..6).map(|i| event(i, EventKind::Note)).collect());
        log.append_now(vec![event(6, EventKind::RunStarted)]);
        let all = log.all();
        assert_eq!(all.len(), 7);
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1);
            assert_eq!(e.payload["i"], i);
            let prev = if i == 0 {
                Hash32::GENESIS
            } else {
                all[i - 1].hash
            };
            assert_eq!(e.prev_hash, prev);
            assert_eq!(e.hash, e.computed_hash());
        }
        let odd = log.query_now(&EventQuery {
            run_id: Some(RunId::from_bytes([1; 16])),
            after_seq: Some(2),
            limit: Some(2),
            ..EventQuery::default()
        });
        assert_eq!(odd.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 6]);
        let started = log.query_now(&EventQuery {
            kinds: vec![EventKind::RunStarted],
            since: Some(Timestamp::from_unix_nanos(1)),
            until: Some(Timestamp::from_unix_nanos(7)),
            ..EventQuery::default()
        });
        assert_eq!(started, all[6..].to_vec());
    }
}
