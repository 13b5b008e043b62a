//! Frames: how events sit in the database (format 2).
//!
//! The writer stores the events of a group commit as a few rows of the `frames` table rather
//! than a row each: a frame is a run of consecutive events, encoded back to back in one blob.
//! SQLite's cost is per row and per index entry (three to four microseconds for an event row
//! with its run, kind and time indexes on the project machine), so a row per event bounded the
//! log at about 230,000 events a second; a frame pays that cost once for up to
//! [`MAX_FRAME_EVENTS`] events.
//!
//! Each event keeps its own place in the hash chain: its record holds its canonical header
//! (the bytes the chain hash covers, see `agent_runtime_core::event`), its stored payload
//! (sealed, or the canonical JSON in a plaintext log) and its hash. A record's `prev_hash` is
//! the hash of the record before it, or the frame's `prev_hash` for the first one, and its
//! sequence number is the frame's `first_seq` plus its index. Layout of one record, integers
//! big-endian as in the canonical header:
//!
//! ```text
//! run_id [16] | task flag [1] (0 or 1) | task_id [16] if the flag is 1
//!   | actor length [4] | actor (UTF-8) | kind length [4] | kind (UTF-8) | time in ns [8]
//!   | payload length [4] | payload | hash [32]
//! ```
//!
//! Independent verifiers can read a database with [`records`]; `docs/audit-format.md` has the
//! table definitions.

use std::collections::BTreeSet;

use agent_runtime_core::Hash32;

/// Most events one frame holds. Part of the format: readers rely on it to find the frames that
/// may hold a sequence number, and verify treats a larger frame as damage.
pub const MAX_FRAME_EVENTS: u64 = 1024;
/// A frame is closed once its body reaches this size (a single larger event still gets one).
pub(crate) const FRAME_TARGET_BYTES: usize = 256 * 1024;

/// One event as a frame holds it, borrowed from the frame's blob.
#[derive(Clone, Copy, Debug)]
pub struct EventRecord<'a> {
    /// Its sequence number: the frame's first plus its index.
    pub seq: u64,
    /// The run's id.
    pub run_id: [u8; 16],
    /// The task's id, if any.
    pub task_id: Option<[u8; 16]>,
    /// The actor as written (`agent:NAME`, `tool:NAME`, `person:NAME`, `system`).
    pub actor: &'a str,
    /// The event kind as written.
    pub kind: &'a str,
    /// Its time, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// Its canonical header: what the chain hash covers before the payload.
    pub header: &'a [u8],
    /// The payload as stored: sealed in an encrypted log, canonical JSON otherwise.
    pub payload: &'a [u8],
    /// The hash of the event before it (as this frame records it).
    pub prev_hash: &'a [u8],
    /// Its own hash.
    pub hash: &'a [u8],
}

/// A record that cannot be read: the frame is damaged from `seq` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError {
    /// The first sequence number that cannot be read.
    pub seq: u64,
    /// What is wrong, in words.
    pub detail: String,
}

/// Appends one event's record to a frame body.
pub fn push_record(body: &mut Vec<u8>, header: &[u8], payload: &[u8], hash: &Hash32) {
    body.reserve(header.len() + payload.len() + 36);
    body.extend_from_slice(header);
    // Payloads are capped far below 4 GiB by the store's limit.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(payload);
    body.extend_from_slice(&hash.0);
}

/// The records of a frame, in order.
///
/// ```
/// use agent_runtime_core::{Hash32, NewEvent, RunId, Actor, EventKind, Timestamp};
/// use agent_runtime_store::frame::{push_record, records};
///
/// let event = NewEvent { run_id: RunId::from_bytes([7; 16]), task_id: None, actor: Actor::System,
///                        kind: EventKind::Note, time: Timestamp::EPOCH,
///                        payload: serde_json::json!({"text": "hi"}) };
/// let mut body = Vec::new();
/// push_record(&mut body, &event.canonical_header(), br#"{"text":"hi"}"#, &Hash32([9; 32]));
/// let all: Vec<_> = records(41, &Hash32::GENESIS.0, &body).collect::<Result<_, _>>().unwrap();
/// assert_eq!((all[0].seq, all[0].kind, all[0].payload), (41, "note", &br#"{"text":"hi"}"#[..]));
/// ```
pub fn records<'a>(first_seq: u64, prev_hash: &'a [u8], body: &'a [u8]) -> Records<'a> {
    Records {
        body,
        pos: 0,
        seq: first_seq,
        prev: prev_hash,
        failed: false,
    }
}

/// Iterator over a frame's records; see [`records`]. Yields one error and stops at the first
/// record that cannot be read.
pub struct Records<'a> {
    body: &'a [u8],
    pos: usize,
    seq: u64,
    prev: &'a [u8],
    failed: bool,
}

impl<'a> Records<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.body.len())
            .ok_or_else(|| {
                format!(
                    "the frame ends inside the event's {what} (at byte {} of {})",
                    self.pos,
                    self.body.len()
                )
            })?;
        let out = &self.body[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn len_prefixed(&mut self, what: &str) -> Result<&'a [u8], String> {
        let len = self.take(4, what)?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        self.take(len, what)
    }

    fn text(&mut self, what: &str) -> Result<&'a str, String> {
        let bytes = self.len_prefixed(what)?;
        std::str::from_utf8(bytes).map_err(|_| format!("the event's {what} is not UTF-8"))
    }

    fn record(&mut self) -> Result<EventRecord<'a>, String> {
        let start = self.pos;
        let run_id = fixed16(self.take(16, "run id")?);
        let task_id = match self.take(1, "task flag")?[0] {
            0 => None,
            1 => Some(fixed16(self.take(16, "task id")?)),
            other => return Err(format!("the event's task flag is {other}, not 0 or 1")),
        };
        let actor = self.text("actor")?;
        let kind = self.text("kind")?;
        let time = self.take(8, "time")?;
        let time_ns = u64::from_be_bytes(time.try_into().unwrap_or([0xff; 8]));
        let header = &self.body[start..self.pos];
        let payload = self.len_prefixed("payload")?;
        let hash = self.take(32, "hash")?;
        Ok(EventRecord {
            seq: self.seq,
            run_id,
            task_id,
            actor,
            kind,
            time_ns,
            header,
            payload,
            prev_hash: self.prev,
            hash,
        })
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<EventRecord<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.body.len() {
            return None;
        }
        match self.record() {
            Ok(r) => {
                self.prev = r.hash;
                self.seq += 1;
                Some(Ok(r))
            }
            Err(detail) => {
                self.failed = true;
                Some(Err(FrameError {
                    seq: self.seq,
                    detail,
                }))
            }
        }
    }
}

fn fixed16(b: &[u8]) -> [u8; 16] {
    b.try_into().unwrap_or([0xff; 16])
}

/// A frame being filled by the writer.
pub(crate) struct FrameBuilder {
    pub first_seq: u64,
    pub prev_hash: Hash32,
    pub last_hash: Hash32,
    pub count: u64,
    pub min_time: i64,
    pub max_time: i64,
    pub body: Vec<u8>,
    /// The distinct runs in the frame (usually one).
    pub runs: BTreeSet<[u8; 16]>,
}

impl FrameBuilder {
    pub(crate) fn new() -> Self {
        FrameBuilder {
            first_seq: 0,
            prev_hash: Hash32::GENESIS,
            last_hash: Hash32::GENESIS,
            count: 0,
            min_time: i64::MAX,
            max_time: i64::MIN,
            body: Vec::with_capacity(FRAME_TARGET_BYTES + 4096),
            runs: BTreeSet::new(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the next event must start a new frame.
    pub(crate) fn is_full(&self) -> bool {
        self.count >= MAX_FRAME_EVENTS || self.body.len() >= FRAME_TARGET_BYTES
    }

    /// Adds an event at `seq`, whose chain predecessor is `prev`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push(
        &mut self,
        seq: u64,
        prev: Hash32,
        run_id: &[u8; 16],
        time_ns: i64,
        header: &[u8],
        payload: &[u8],
        hash: Hash32,
    ) {
        if self.count == 0 {
            self.first_seq = seq;
            self.prev_hash = prev;
        }
        self.count += 1;
        self.last_hash = hash;
        self.min_time = self.min_time.min(time_ns);
        self.max_time = self.max_time.max(time_ns);
        self.runs.insert(*run_id);
        push_record(&mut self.body, header, payload, &hash);
    }

    /// Empties the builder for the next frame, keeping its buffers.
    pub(crate) fn reset(&mut self) {
        self.count = 0;
        self.min_time = i64::MAX;
        self.max_time = i64::MIN;
        self.body.clear();
        self.runs.clear();
    }
}
