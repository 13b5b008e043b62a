//! Events: the one record of everything that happens.
//!
//! A capability describes what happened as a [`NewEvent`] and hands it to an
//! [`EventSink`](crate::EventSink). The log gives it a sequence number and links it into a hash
//! chain, and from then on it is an [`Envelope`].
//!
//! # Canonical form and hash chain
//!
//! The hash of an envelope is `BLAKE3(prev_hash ‖ canonical_bytes)`, where `prev_hash` is the hash
//! of the envelope with the previous sequence number (32 zero bytes for the first) and
//! `canonical_bytes` is, in order, with every integer big-endian and `lp(x)` meaning the `u32`
//! byte length of `x` followed by `x`:
//!
//! | field | bytes |
//! | --- | --- |
//! | `seq` | `u64` |
//! | `run_id` | 16 bytes of the UUID |
//! | `task_id` | `0x00`, or `0x01` then 16 bytes of the UUID |
//! | `actor` | `lp(UTF-8 of the actor string, such as "agent:writer")` |
//! | `kind` | `lp(UTF-8 of the kind, such as "task.completed")` |
//! | `time` | `u64` nanoseconds since the Unix epoch |
//! | `payload` | `lp(canonical JSON of the payload)` |
//!
//! Canonical JSON is compact JSON (no spaces) with the keys of every object sorted by their UTF-8
//! bytes, strings escaped as `serde_json` escapes them (only `"`, `\` and control characters;
//! everything else literal UTF-8), and numbers written as `serde_json` writes them (integers in
//! decimal, floats in their shortest round-trip form). [`canonical_json`] produces it; the payload
//! of an exported envelope re-encoded by these rules gives back the hashed bytes. This is what a
//! third-party verifier implements; `docs/audit-format.md` has a worked example.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{RunId, TaskId};
use crate::time::Timestamp;

/// Who did something.
///
/// Written as a string: `agent:NAME`, `tool:NAME`, `person:NAME` or `system`.
///
/// ```
/// use agent_runtime_core::Actor;
/// let a: Actor = "agent:writer".parse().unwrap();
/// assert_eq!(a, Actor::Agent("writer".into()));
/// assert_eq!(Actor::System.to_string(), "system");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Actor {
    /// An agent, by its name in the task graph.
    Agent(String),
    /// A tool, by its registry name.
    Tool(String),
    /// A person, by the name the approval surface reports.
    Person(String),
    /// The runtime itself (scheduler, store, gateway).
    System,
}

/// The error for a string that is not an actor.
#[derive(Debug, thiserror::Error)]
#[error("invalid actor {input:?}: expected agent:NAME, tool:NAME, person:NAME or system")]
pub struct ActorError {
    input: String,
}

impl fmt::Display for Actor {
    // Must write exactly what `write_bytes` writes (the hashed form); a test holds them equal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Agent(n) => write!(f, "agent:{n}"),
            Actor::Tool(n) => write!(f, "tool:{n}"),
            Actor::Person(n) => write!(f, "person:{n}"),
            Actor::System => f.write_str("system"),
        }
    }
}

impl Actor {
    /// Appends the string form (what `Display` writes) without going through the formatter:
    /// this runs for every event appended and verified.
    fn write_bytes(&self, out: &mut Vec<u8>) {
        // Each prefix copied where its length is known (no `memcpy` call for a few bytes).
        let name = match self {
            Actor::Agent(n) => {
                out.extend_from_slice(b"agent:");
                n
            }
            Actor::Tool(n) => {
                out.extend_from_slice(b"tool:");
                n
            }
            Actor::Person(n) => {
                out.extend_from_slice(b"person:");
                n
            }
            Actor::System => {
                out.extend_from_slice(b"system");
                return;
            }
        };
        out.extend_from_slice(name.as_bytes());
    }
}

impl FromStr for Actor {
    type Err = ActorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ActorError {
            input: s.to_string(),
        };
        if s == "system" {
            return Ok(Actor::System);
        }
        let (kind, name) = s.split_once(':').ok_or_else(err)?;
        if name.is_empty() {
            return Err(err());
        }
        match kind {
            "agent" => Ok(Actor::Agent(name.to_string())),
            "tool" => Ok(Actor::Tool(name.to_string())),
            "person" => Ok(Actor::Person(name.to_string())),
            _ => Err(err()),
        }
    }
}

string_type!(Actor, ActorError, "Actor", {
    "type": "string",
    "pattern": "^(system|(agent|tool|person):.+)$",
    "description": "Who did it: agent:NAME, tool:NAME, person:NAME or system"
});

macro_rules! event_kinds {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// What kind of fact an event records.
        ///
        /// The string forms (`run.started`, `tool.completed`, ...) are stable: they are stored,
        /// exported and queried by. A kind this build does not know, read from a log a newer
        /// build wrote, is `EventKind::Unknown` (see `EventKind::read`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, schemars::JsonSchema)]
        #[non_exhaustive]
        pub enum EventKind {
            $($(#[$doc])* #[serde(rename = $name)] $variant,)*
            /// A kind this build does not know, as it was written: read from a log that a newer
            /// build wrote. Its events verify, export and list unchanged; folds of a run's
            /// state pass over them, and replay and resume refuse a run that holds one. Made by
            /// [`EventKind::read`]; this build records one only when handed one (events copied
            /// from another log).
            #[schemars(skip)]
            Unknown(UnknownKind),
        }

        impl EventKind {
            /// Every kind, in declaration order.
            pub const ALL: &'static [EventKind] = &[$(EventKind::$variant,)*];

            /// The stable string form.
            pub const fn as_str(self) -> &'static str {
                match self { $(EventKind::$variant => $name,)* EventKind::Unknown(kind) => kind.0 }
            }
        }

        impl FromStr for EventKind {
            type Err = EventKindError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok(EventKind::$variant),)*
                    _ => Err(EventKindError { input: s.to_string(), too_many: false }),
                }
            }
        }
    };
}

event_kinds! {
    /// A run was created from a task graph (payload: graph digest, seed, limits).
    RunCreated => "run.created",
    /// A run started executing.
    RunStarted => "run.started",
    /// A run was resumed after its process stopped.
    RunResumed => "run.resumed",
    /// A run finished with every task done or skipped.
    RunCompleted => "run.completed",
    /// A run failed.
    RunFailed => "run.failed",
    /// A run was cancelled.
    RunCancelled => "run.cancelled",
    /// Someone asked a running run to cancel itself or a subtree (payload: `task`, `reason`).
    /// Not an input of the run: the process driving it records `run.cancelled` or
    /// `task.cancelled` when it acts on the request.
    RunCancelRequested => "run.cancel_requested",
    /// A task entered the graph (declared or spawned by an agent).
    TaskSpawned => "task.spawned",
    /// A task was dispatched to run.
    TaskStarted => "task.started",
    /// A task finished with an output.
    TaskCompleted => "task.completed",
    /// An attempt of a task failed (payload names the error class).
    TaskFailed => "task.failed",
    /// A failed attempt will be retried after a backoff.
    TaskRetryScheduled => "task.retry_scheduled",
    /// A task was skipped by its failure policy or because an upstream task was.
    TaskSkipped => "task.skipped",
    /// A task was cancelled.
    TaskCancelled => "task.cancelled",
    /// A call of a task's attempt began waiting for a person (payload: `call`, `for`:
    /// `approval`, and `since` when the wait began before the event was recorded): the
    /// attempt's `timeout` stops counting from then until every such wait has ended.
    TaskPaused => "task.paused",
    /// A call's wait for a person ended (payload: `call`); see [`EventKind::TaskPaused`].
    TaskUnpaused => "task.unpaused",
    /// A tool call was requested (payload: tool, argument digest).
    ToolRequested => "tool.requested",
    /// Policy decided on a tool call (payload: a `PolicyEnvelope`).
    PolicyDecided => "policy.decided",
    /// A tool call started executing.
    ToolStarted => "tool.started",
    /// A tool reported progress.
    ToolProgress => "tool.progress",
    /// A tool call returned a result.
    ToolCompleted => "tool.completed",
    /// A tool call failed.
    ToolFailed => "tool.failed",
    /// A model call was made.
    ModelRequested => "model.requested",
    /// A model call returned.
    ModelCompleted => "model.completed",
    /// A model call failed.
    ModelFailed => "model.failed",
    /// A person was asked to approve something.
    ApprovalRequested => "approval.requested",
    /// A person (or a timeout) decided an approval request.
    ApprovalDecided => "approval.decided",
    /// A terminal or browser session opened.
    SessionOpened => "session.opened",
    /// A session produced output.
    SessionOutput => "session.output",
    /// A session received input.
    SessionInput => "session.input",
    /// A session closed.
    SessionClosed => "session.closed",
    /// A reading of the clock that a decision depends on.
    ClockObserved => "clock.observed",
    /// A random draw that a decision depends on.
    RandomDrawn => "random.drawn",
    /// A free-form note by a person or the system.
    Note => "note",
}

/// The error for an unknown event kind. It quotes the input short (see
/// [`crate::names::shown`]) and names the closest kind when there is one.
///
/// ```
/// use agent_runtime_core::EventKind;
/// let err = "task.complete".parse::<EventKind>().unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "unknown event kind \"task.complete\" (did you mean `task.completed`?)"
/// );
/// ```
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown event kind {:?}{}",
    crate::names::shown(input),
    if *too_many {
        format!(
            " (this process has met {MAX_UNKNOWN_KINDS} kinds it does not know already, the \
             most it keeps: the log is not one a newer build of this runtime wrote)"
        )
    } else {
        suggestion_or_examples(input)
    }
)]
pub struct EventKindError {
    input: String,
    /// Refused by [`EventKind::read`] for the number of unknown kinds met, not its shape.
    too_many: bool,
}

fn suggestion_or_examples(input: &str) -> String {
    match crate::names::closest(input, EventKind::ALL.iter().map(|k| k.as_str())) {
        Some(kind) => format!(" (did you mean `{kind}`?)"),
        None => " (kinds look like run.started, task.completed, tool.failed)".into(),
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name of an event kind this build does not know ([`EventKind::Unknown`]), as it was
/// written: made only by [`EventKind::read`], so it is always shaped like a kind and never the
/// name of a known one (which would compare unequal to that kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UnknownKind(&'static str);

impl UnknownKind {
    /// The kind's name.
    pub const fn as_str(self) -> &'static str {
        self.0
    }
}

/// How many distinct unknown kinds one process keeps ([`EventKind::read`] interns each once):
/// a newer build adds a few; a log with more is refused rather than grown without end.
const MAX_UNKNOWN_KINDS: usize = 256;

impl EventKind {
    /// The kind written as `s` in a stored or exported event: a known one, or one this build
    /// does not know ([`EventKind::Unknown`]) when `s` is shaped like a kind (1 to 64 of
    /// `a-z`, `0-9`, `_`, `.`, `-`, starting with a letter), so that a log a newer build wrote
    /// can still be listed, shown, verified and exported. [`str::parse`] is for what people
    /// type, and refuses what it does not know with a suggestion.
    ///
    /// ```
    /// use agent_runtime_core::EventKind;
    /// assert_eq!(EventKind::read("task.completed").unwrap(), EventKind::TaskCompleted);
    /// let newer = EventKind::read("task.handed_over").unwrap();
    /// assert!(!newer.is_known());
    /// assert_eq!(newer.as_str(), "task.handed_over");
    /// assert!(EventKind::read("Task Completed").is_err());
    /// ```
    pub fn read(s: &str) -> Result<EventKind, EventKindError> {
        if let Ok(kind) = s.parse() {
            return Ok(kind);
        }
        let shaped = (1..=64).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
            });
        if !shaped {
            return Err(EventKindError {
                input: s.to_string(),
                too_many: false,
            });
        }
        static UNKNOWN: std::sync::Mutex<std::collections::BTreeSet<&'static str>> =
            std::sync::Mutex::new(std::collections::BTreeSet::new());
        let mut known = UNKNOWN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(name) = known.get(s) {
            return Ok(EventKind::Unknown(UnknownKind(name)));
        }
        if known.len() >= MAX_UNKNOWN_KINDS {
            return Err(EventKindError {
                input: s.to_string(),
                too_many: true,
            });
        }
        // Leaked once per distinct name, at most MAX_UNKNOWN_KINDS of them: `EventKind` stays
        // `Copy`, which every fold and filter relies on.
        let name: &'static str = Box::leak(s.to_string().into_boxed_str());
        known.insert(name);
        Ok(EventKind::Unknown(UnknownKind(name)))
    }

    /// Whether this build knows the kind (it is not [`EventKind::Unknown`]).
    pub const fn is_known(self) -> bool {
        !matches!(self, EventKind::Unknown(_))
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Read as [`EventKind::read`] reads: an exported event of a kind this build does not know
/// is [`EventKind::Unknown`], not an error.
impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        EventKind::read(&text).map_err(serde::de::Error::custom)
    }
}

/// A 32-byte BLAKE3 hash, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Hash32(pub [u8; 32]);

impl Hash32 {
    /// The `prev_hash` of the first event: 32 zero bytes.
    pub const GENESIS: Hash32 = Hash32([0; 32]);

    /// From a slice that must be 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Hash32)
    }
}

impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash32({self})")
    }
}

/// The error for a string that is not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("invalid hash {input:?}: expected 64 hex digits")]
pub struct HashError {
    input: String,
}

impl FromStr for Hash32 {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| HashError {
            input: s.to_string(),
        })?;
        Ok(Hash32(out))
    }
}

string_type!(Hash32, HashError, "Hash32", {
    "type": "string",
    "pattern": "^[0-9a-f]{64}$",
    "description": "BLAKE3 hash, 64 lowercase hex digits"
});

/// An event as a capability describes it, before the log numbers and chains it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NewEvent {
    /// The run the event belongs to. Every event belongs to a run: work done outside a task
    /// graph (a tool called from the command line or by an MCP host) is recorded under a run the
    /// caller opens for that session, so that it can be queried and exported like any other.
    pub run_id: RunId,
    /// The task, when the event is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    /// Who did it.
    pub actor: Actor,
    /// What kind of fact it is.
    pub kind: EventKind,
    /// When, by the run's clock.
    pub time: Timestamp,
    /// The fact itself. Never contains secrets: redact before building the event.
    pub payload: Value,
}

impl NewEvent {
    /// The canonical bytes of everything but the sequence number (see the module docs), which a
    /// log computes once, off its writer, and hashes after the sequence number.
    pub fn canonical_body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        self.write_canonical_body(&mut out);
        out
    }

    /// Appends [`NewEvent::canonical_body`] to `out` without intermediate allocations: the
    /// header, the actor and the canonical payload are written in place.
    pub fn write_canonical_body(&self, out: &mut Vec<u8>) {
        write_body(
            out,
            (&self.run_id, self.task_id.as_ref(), &self.actor, self.kind),
            self.time,
            &self.payload,
        );
    }

    /// The canonical bytes of the metadata (run, task, actor, kind, time), without the payload:
    /// a log that seals payloads binds the ciphertext to these as associated data.
    pub fn canonical_header(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(80);
        write_header(
            &mut out,
            &self.run_id,
            self.task_id.as_ref(),
            ActorText::Parsed(&self.actor),
            self.kind.as_str(),
            self.time,
        );
        out
    }
}

/// A [`NewEvent`] with its canonical body computed: the header, then the length-prefixed
/// canonical payload (see the module docs), which is what a log hashes and stores.
///
/// A pipeline that hashes and stores each event hands this on instead of the `NewEvent`, so
/// that the payload is serialized once, on the thread that built it while it is still in cache,
/// and its `serde_json::Value` is freed there. Logs that keep canonical bytes
/// ([`EventSink::append_encoded`](crate::EventSink::append_encoded)) take it as it is.
///
/// ```
/// use agent_runtime_core::{Actor, EncodedEvent, EventKind, NewEvent, RunId, Timestamp};
///
/// let event = NewEvent { run_id: RunId::from_bytes([1; 16]), task_id: None, actor: Actor::System,
///                        kind: EventKind::Note, time: Timestamp::EPOCH,
///                        payload: serde_json::json!({"b": 1, "a": 2}) };
/// let encoded = EncodedEvent::new(event.clone());
/// assert_eq!(encoded.body(), event.canonical_body());
/// assert_eq!(encoded.payload_json(), br#"{"a":2,"b":1}"#);
/// assert_eq!(encoded.to_new_event().unwrap(), event);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedEvent {
    run_id: RunId,
    task_id: Option<TaskId>,
    actor: Actor,
    kind: EventKind,
    time: Timestamp,
    body: Vec<u8>,
    header_len: usize,
}

impl EncodedEvent {
    /// Encodes `event`, dropping its `Value`.
    pub fn new(event: NewEvent) -> EncodedEvent {
        let NewEvent {
            run_id,
            task_id,
            actor,
            kind,
            time,
            payload,
        } = event;
        EncodedEvent::encode(run_id, task_id, actor, kind, time, 160, |out| {
            write_canonical_json(&payload, out)
        })
    }

    /// An encoded event whose payload is the JSON object `write` builds, member by member,
    /// straight into the event's bytes: no `Value` is built, so a producer that writes an event
    /// per task (the scheduler) skips the allocations of building one and the work of encoding
    /// and dropping it. The writer checks nothing at run time; debug builds check that keys come
    /// in byte order, which is what makes the bytes canonical.
    ///
    /// ```
    /// use agent_runtime_core::{Actor, EncodedEvent, EventKind, NewEvent, RunId, Timestamp};
    ///
    /// let run_id = RunId::from_bytes([1; 16]);
    /// let encoded = EncodedEvent::with_object(run_id, None, Actor::System, EventKind::Note,
    ///     Timestamp::EPOCH, |o| { o.u64("attempt", 2).str("name", "fetch \"a\""); });
    /// assert_eq!(encoded.payload_json(), br#"{"attempt":2,"name":"fetch \"a\""}"#);
    /// let value = NewEvent { run_id, task_id: None, actor: Actor::System, kind: EventKind::Note,
    ///     time: Timestamp::EPOCH, payload: serde_json::json!({"name": "fetch \"a\"", "attempt": 2}) };
    /// assert_eq!(encoded, EncodedEvent::new(value));
    /// ```
    pub fn with_object(
        run_id: RunId,
        task_id: Option<TaskId>,
        actor: Actor,
        kind: EventKind,
        time: Timestamp,
        write: impl FnOnce(&mut ObjectWriter<'_>),
    ) -> EncodedEvent {
        EncodedEvent::encode(run_id, task_id, actor, kind, time, 256, |out| {
            Slot { out }.object(write)
        })
    }

    /// Writes the header, then the payload `write_payload` writes, length-prefixed.
    fn encode(
        run_id: RunId,
        task_id: Option<TaskId>,
        actor: Actor,
        kind: EventKind,
        time: Timestamp,
        capacity: usize,
        write_payload: impl FnOnce(&mut Vec<u8>),
    ) -> EncodedEvent {
        let mut body = Vec::with_capacity(capacity);
        write_header(
            &mut body,
            &run_id,
            task_id.as_ref(),
            ActorText::Parsed(&actor),
            kind.as_str(),
            time,
        );
        let header_len = body.len();
        let at = reserve_len(&mut body);
        write_payload(&mut body);
        patch_len(&mut body, at);
        EncodedEvent {
            run_id,
            task_id,
            actor,
            kind,
            time,
            body,
            header_len,
        }
    }

    /// The run.
    pub fn run_id(&self) -> RunId {
        self.run_id
    }
    /// The task, if any.
    pub fn task_id(&self) -> Option<TaskId> {
        self.task_id
    }
    /// Who did it.
    pub fn actor(&self) -> &Actor {
        &self.actor
    }
    /// What kind of fact it is.
    pub fn kind(&self) -> EventKind {
        self.kind
    }
    /// When.
    pub fn time(&self) -> Timestamp {
        self.time
    }
    /// The canonical body: [`NewEvent::canonical_body`].
    pub fn body(&self) -> &[u8] {
        &self.body
    }
    /// The canonical header: [`NewEvent::canonical_header`].
    pub fn header(&self) -> &[u8] {
        &self.body[..self.header_len]
    }
    /// The canonical payload JSON.
    pub fn payload_json(&self) -> &[u8] {
        &self.body[self.header_len + 4..]
    }
    /// The event back, its payload parsed again (for logs that keep values).
    pub fn to_new_event(&self) -> Result<NewEvent, serde_json::Error> {
        Ok(NewEvent {
            run_id: self.run_id,
            task_id: self.task_id,
            actor: self.actor.clone(),
            kind: self.kind,
            time: self.time,
            payload: serde_json::from_slice(self.payload_json())?,
        })
    }
}

/// The canonical header bytes from the stored parts of an event (see the module docs).
pub fn canonical_header(
    run_id: &RunId,
    task_id: Option<&TaskId>,
    actor: &str,
    kind: &str,
    time: Timestamp,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + actor.len() + kind.len());
    write_header(&mut out, run_id, task_id, ActorText::Raw(actor), kind, time);
    out
}

/// Appends [`canonical_header`] to `out` (for readers that reuse one buffer per row).
pub fn write_canonical_header(
    out: &mut Vec<u8>,
    run_id: &RunId,
    task_id: Option<&TaskId>,
    actor: &str,
    kind: &str,
    time: Timestamp,
) {
    write_header(out, run_id, task_id, ActorText::Raw(actor), kind, time);
}

/// Appends the canonical header: the one place its layout is written down in code.
/// An actor as it reaches the header writer: parsed, or the stored string.
#[derive(Clone, Copy)]
enum ActorText<'a> {
    Parsed(&'a Actor),
    Raw(&'a str),
}

fn write_header(
    out: &mut Vec<u8>,
    run_id: &RunId,
    task_id: Option<&TaskId>,
    actor: ActorText<'_>,
    kind: &str,
    time: Timestamp,
) {
    out.extend_from_slice(run_id.as_bytes());
    match task_id {
        Some(t) => {
            out.push(1);
            out.extend_from_slice(t.as_bytes());
        }
        None => out.push(0),
    }
    let at = reserve_len(out);
    match actor {
        ActorText::Parsed(a) => a.write_bytes(out),
        ActorText::Raw(s) => out.extend_from_slice(s.as_bytes()),
    }
    patch_len(out, at);
    put_lp(out, kind.as_bytes());
    out.extend_from_slice(&time.as_unix_nanos().to_be_bytes());
}

/// Appends the canonical payload bytes (already canonical JSON) to a canonical header, giving
/// the canonical body.
pub fn push_canonical_payload(header: &mut Vec<u8>, payload_json: &[u8]) {
    put_lp(header, payload_json);
}

/// Leaves room for a length prefix; [`patch_len`] fills it in once what follows is written.
fn reserve_len(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    at
}

/// Writes the length of what follows the 4 bytes at `at` into them.
fn patch_len(out: &mut [u8], at: usize) {
    let len = u32::try_from(out.len() - at - 4).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_lp(out: &mut Vec<u8>, bytes: &[u8]) {
    // Lengths over 4 GiB cannot occur: payloads are capped far below that by every log.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// An event as the log holds it: numbered, chained and hashed.
///
/// This is the published audit record (`schemas/audit-envelope.schema.json`); one per line in a
/// `jsonl` export.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(title = "Audit envelope")]
pub struct Envelope {
    /// Position in the log, from 1, without gaps.
    pub seq: u64,
    /// The run the event belongs to.
    pub run_id: RunId,
    /// The task, when the event is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    /// Who did it.
    pub actor: Actor,
    /// What kind of fact it is.
    pub kind: EventKind,
    /// When, by the run's clock.
    pub time: Timestamp,
    /// The fact itself.
    pub payload: Value,
    /// Hash of the envelope at `seq - 1` (zeros for the first).
    pub prev_hash: Hash32,
    /// `BLAKE3(prev_hash ‖ canonical bytes)`.
    pub hash: Hash32,
}

impl Envelope {
    /// Numbers and chains `event` after `prev_hash`.
    pub fn seal(seq: u64, prev_hash: Hash32, event: NewEvent) -> Envelope {
        let hash = chain_hash(&prev_hash, seq, &event.canonical_body());
        let NewEvent {
            run_id,
            task_id,
            actor,
            kind,
            time,
            payload,
        } = event;
        Envelope {
            seq,
            run_id,
            task_id,
            actor,
            kind,
            time,
            payload,
            prev_hash,
            hash,
        }
    }

    /// The hash this envelope should have given its fields and `prev_hash`.
    pub fn computed_hash(&self) -> Hash32 {
        let mut body = Vec::with_capacity(128);
        self.write_canonical_body(&mut body);
        chain_hash(&self.prev_hash, self.seq, &body)
    }

    /// Appends the event's canonical body ([`NewEvent::canonical_body`] of
    /// [`Envelope::to_new_event`]) to `out`, without copying the payload.
    pub fn write_canonical_body(&self, out: &mut Vec<u8>) {
        write_body(
            out,
            (&self.run_id, self.task_id.as_ref(), &self.actor, self.kind),
            self.time,
            &self.payload,
        );
    }

    /// The event without its place in the log.
    pub fn to_new_event(&self) -> NewEvent {
        NewEvent {
            run_id: self.run_id,
            task_id: self.task_id,
            actor: self.actor.clone(),
            kind: self.kind,
            time: self.time,
            payload: self.payload.clone(),
        }
    }
}

/// Appends the canonical body of an event with these fields to `out`: its header, then its
/// length-prefixed canonical payload. What [`NewEvent`] and [`Envelope`] both write.
fn write_body(
    out: &mut Vec<u8>,
    (run_id, task_id, actor, kind): (&RunId, Option<&TaskId>, &Actor, EventKind),
    time: Timestamp,
    payload: &Value,
) {
    write_header(
        out,
        run_id,
        task_id,
        ActorText::Parsed(actor),
        kind.as_str(),
        time,
    );
    let at = reserve_len(out);
    write_canonical_json(payload, out);
    patch_len(out, at);
}

/// `BLAKE3(prev_hash ‖ u64_be(seq) ‖ body)`, where `body` is [`NewEvent::canonical_body`].
pub fn chain_hash(prev_hash: &Hash32, seq: u64, body: &[u8]) -> Hash32 {
    // Most events fit one BLAKE3 chunk (1 KiB) with the link: hashed in one call from a stack
    // copy, which skips the incremental hasher's buffering and tree bookkeeping (a sixth of the
    // hashing cost of a store append). The bytes hashed are the same either way.
    // Most bodies are a few hundred bytes: a smaller copy first, as zeroing the whole chunk's
    // buffer for each event was a percent of the store writer's time.
    if body.len() <= 256 - 40 {
        return link_hash::<256>(prev_hash, seq, body);
    }
    if body.len() <= 1024 - 40 {
        return link_hash::<1024>(prev_hash, seq, body);
    }
    let mut h = blake3::Hasher::new();
    h.update(&prev_hash.0);
    h.update(&seq.to_be_bytes());
    h.update(body);
    Hash32(*h.finalize().as_bytes())
}

/// [`chain_hash`] of a body of at most `N - 40` bytes, hashed from one stack copy.
fn link_hash<const N: usize>(prev_hash: &Hash32, seq: u64, body: &[u8]) -> Hash32 {
    let mut buf = [0u8; N];
    buf[..32].copy_from_slice(&prev_hash.0);
    buf[32..40].copy_from_slice(&seq.to_be_bytes());
    buf[40..40 + body.len()].copy_from_slice(body);
    Hash32(*blake3::hash(&buf[..40 + body.len()]).as_bytes())
}

/// [`chain_hash`] of the body made of `header` (see [`canonical_header`]) and the canonical
/// `payload` JSON, without building the body: what a verifier that reads stored parts uses.
pub fn chain_hash_parts(
    prev_hash: &Hash32,
    seq: u64,
    header: &[u8],
    payload_json: &[u8],
) -> Hash32 {
    let mut h = blake3::Hasher::new();
    h.update(&prev_hash.0);
    h.update(&seq.to_be_bytes());
    h.update(header);
    let len = u32::try_from(payload_json.len()).unwrap_or(u32::MAX);
    h.update(&len.to_be_bytes());
    h.update(payload_json);
    Hash32(*h.finalize().as_bytes())
}

/// The canonical JSON bytes of `value` (see the module docs).
///
/// Written by hand rather than with `serde_json::to_vec` because the key order of a
/// `serde_json::Map` depends on a cargo feature (`preserve_order`) that any crate in a build can
/// switch on; the hash must not.
///
/// ```
/// let v = serde_json::json!({"b": 1, "a": [true, null, "x"]});
/// assert_eq!(agent_runtime_core::canonical_json(&v), br#"{"a":[true,null,"x"],"b":1}"#);
/// ```
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_canonical_json(value, &mut out);
    out
}

/// Appends [`canonical_json`] of `value` to `out`.
pub fn write_canonical_json(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) if maps_iterate_sorted() => {
            // Keys already come in byte order: write them as they iterate.
            out.push(b'{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_string(k, out);
                out.push(b':');
                write_canonical_json(v, out);
            }
            out.push(b'}');
        }
        Value::Object(map) => write_object_sorted(map, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical_json(v, out);
            }
            out.push(b']');
        }
        Value::String(s) => write_json_string(s, out),
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => write_json_number(n, out),
    }
}

/// Writes a number as `serde_json` does: integers in decimal (both use `itoa`, a test holds
/// them equal), floats through `serde_json` itself.
pub(crate) fn write_json_number(n: &serde_json::Number, out: &mut Vec<u8>) {
    if let Some(u) = n.as_u64() {
        write_integer(out, u);
    } else if let Some(i) = n.as_i64() {
        write_integer(out, i);
    } else if let Some(f) = n.as_f64() {
        write_float(out, f);
    } else {
        // Writing a number into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, n);
    }
}

/// Writes a float in the canonical form: its shortest round-trip digits `d1 d2 ... dn` (the
/// fewest that read back as the same float; of two candidates as near, the even one, as
/// ECMAScript's `Number.prototype.toString` picks them) and decimal exponent `e` (the value is
/// `d1.d2...dn × 10^e`), laid out in plain decimal when `-5 <= e < 16`, with `.0` after a whole
/// number (`100.0`, `0.00001`, `123.456`), and in scientific form otherwise, the exponent
/// always signed (`1e+16`, `1.5e-7`); a minus sign first when negative (`-0.0` too).
///
/// Laid out here rather than left to `serde_json`, whose float output changed between versions
/// (`1e16`, then `1e+16`): the form the chain hashes must not move with a dependency. It is
/// the form `serde_json` 1.0.154 writes. The digits come from `ryu` (Rust's own `{:e}` breaks
/// ties upwards, `1658206780088562.3` where this form has `.2`).
///
/// ```
/// let canonical = |v: f64| String::from_utf8(agent_runtime_core::canonical_json(&serde_json::json!(v))).unwrap();
/// assert_eq!(canonical(1.0), "1.0");
/// assert_eq!(canonical(1e15), "1000000000000000.0");
/// assert_eq!(canonical(1e16), "1e+16");
/// assert_eq!(canonical(0.00001), "0.00001");
/// assert_eq!(canonical(-1.5e-7), "-1.5e-7");
/// ```
pub(crate) fn write_float(out: &mut Vec<u8>, f: f64) {
    if !f.is_finite() {
        // JSON has no such number (a `Value` never holds one).
        out.extend_from_slice(b"null");
        return;
    }
    let (digits, exp) = float_digits(f.abs());
    if f.is_sign_negative() {
        out.push(b'-');
    }
    if (-5..16).contains(&exp) {
        if exp < 0 {
            out.extend_from_slice(b"0.");
            out.extend(std::iter::repeat_n(b'0', (-exp - 1) as usize));
            out.extend_from_slice(&digits);
        } else {
            let whole = exp as usize + 1;
            if digits.len() <= whole {
                out.extend_from_slice(&digits);
                out.extend(std::iter::repeat_n(b'0', whole - digits.len()));
                out.extend_from_slice(b".0");
            } else {
                out.extend_from_slice(&digits[..whole]);
                out.push(b'.');
                out.extend_from_slice(&digits[whole..]);
            }
        }
    } else {
        out.push(digits[0]);
        if digits.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if exp < 0 { b'-' } else { b'+' });
        write_integer(out, exp.unsigned_abs());
    }
}

/// The shortest round-trip digits of a finite, non-negative float, without leading or
/// trailing zeros (`0` for zero), and the decimal exponent of the first: `(b"15", -7)` for
/// `1.5e-7`. Read off `ryu`'s text, whatever layout it chooses.
fn float_digits(f: f64) -> (Vec<u8>, i32) {
    let mut buffer = ryu::Buffer::new();
    let text = buffer.format_finite(f).as_bytes();
    let (mantissa, exp) = match text.iter().position(|&b| b == b'e' || b == b'E') {
        Some(at) => (
            &text[..at],
            std::str::from_utf8(&text[at + 1..])
                .ok()
                .and_then(|e| e.parse::<i32>().ok())
                .unwrap_or(0),
        ),
        None => (text, 0),
    };
    let point = mantissa
        .iter()
        .position(|&b| b == b'.')
        .unwrap_or(mantissa.len());
    let all: Vec<u8> = mantissa
        .iter()
        .copied()
        .filter(u8::is_ascii_digit)
        .collect();
    let leading = all.iter().take_while(|&&d| d == b'0').count();
    if leading == all.len() {
        return (vec![b'0'], 0);
    }
    let digits: Vec<u8> = all[leading..].to_vec();
    let end = digits.len() - digits.iter().rev().take_while(|&&d| d == b'0').count();
    // The first significant digit stands `point - 1 - leading` places from the units.
    let first = point as i32 - 1 - leading as i32 + exp;
    (digits[..end].to_vec(), first)
}

/// Writes an integer in decimal, as `serde_json` does (both use `itoa`).
pub(crate) fn write_integer<I: itoa::Integer>(out: &mut Vec<u8>, v: I) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Writes an object with its keys sorted by their bytes, whatever order the map keeps.
fn write_object_sorted(map: &serde_json::Map<String, Value>, out: &mut Vec<u8>) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    out.push(b'{');
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_string(k, out);
        out.push(b':');
        if let Some(v) = map.get(k) {
            write_canonical_json(v, out);
        }
    }
    out.push(b'}');
}

/// Whether every `serde_json::Map` of this build iterates its keys in byte order: true unless
/// some crate switched on serde_json's `preserve_order` feature (then maps keep insertion order
/// and objects go through the sorting path). Probed once.
fn maps_iterate_sorted() -> bool {
    static SORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SORTED.get_or_init(|| {
        let mut m = serde_json::Map::new();
        for k in ["b", "c", "a", "B", "ab", "é", "z"] {
            m.insert(k.to_string(), Value::Null);
        }
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        keys == ["B", "a", "ab", "b", "c", "z", "é"]
    })
}

/// Whether `bytes` hold a byte JSON must escape (`"`, `\\`, or a control character below
/// 0x20), tested eight bytes at a time with the classic "has zero / has less" word tricks
/// (exact for "any": a borrow can only flag bytes above one that matched).
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH != 0;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        let control = x.wrapping_sub(ONES * 0x20) & !x & HIGH != 0;
        if control
            || has_zero(x ^ (ONES * u64::from(b'"')))
            || has_zero(x ^ (ONES * u64::from(b'\\')))
        {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

pub(crate) fn write_json_string(s: &str, out: &mut Vec<u8>) {
    // Most strings (keys, ids, names) need no escape: copy them as they are, which is what
    // serde_json writes for them; anything else goes through serde_json's escaper.
    if !needs_escape(s.as_bytes()) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Writes a canonical JSON object member by member (see [`EncodedEvent::with_object`]). Keys
/// are names the code knows: they must come in byte order, each once, and need no escape
/// (debug builds check both). Values are written as [`canonical_json`] writes them; an object
/// with keys known only at run time goes in whole, as a `Value`.
pub struct ObjectWriter<'a> {
    out: &'a mut Vec<u8>,
    members: usize,
    /// The last key written, to check the order in debug builds.
    #[cfg(debug_assertions)]
    last_key: Option<String>,
}

impl<'a> ObjectWriter<'a> {
    fn start(out: &'a mut Vec<u8>) -> ObjectWriter<'a> {
        out.push(b'{');
        ObjectWriter {
            out,
            members: 0,
            #[cfg(debug_assertions)]
            last_key: None,
        }
    }

    fn finish(self) {
        self.out.push(b'}');
    }

    /// The value of the member `key`, for a value written by code that also writes it
    /// elsewhere (an [`ObjectWriter::entries`] value, say): write exactly one, as with
    /// `entries`' slots.
    #[inline]
    pub fn member(&mut self, key: &'static str) -> Slot<'_> {
        Slot { out: self.key(key) }
    }

    // Inlined into each call site, where the key is a literal: its copy then has a known
    // length and needs no call to `memcpy` (the key writes were a tenth of the simulator's
    // instructions, callgrind).
    #[inline(always)]
    fn key(&mut self, key: &'static str) -> &mut Vec<u8> {
        #[cfg(debug_assertions)]
        {
            assert!(
                !needs_escape(key.as_bytes()),
                "object key {key:?} needs escapes"
            );
            check_key_order(&mut self.last_key, key);
        }
        // Keys are names the code knows (`'static`), checked in debug builds to need no escape:
        // written as they are, with one reservation for the member's punctuation.
        let out = &mut *self.out;
        out.reserve(key.len() + 24);
        if self.members > 0 {
            out.push(b',');
        }
        self.members += 1;
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        out
    }

    /// An unsigned integer member.
    #[inline]
    pub fn u64(&mut self, key: &'static str, value: u64) -> &mut Self {
        self.member(key).u64(value);
        self
    }

    /// A `true` or `false` member.
    #[inline]
    pub fn bool(&mut self, key: &'static str, value: bool) -> &mut Self {
        self.key(key)
            .extend_from_slice(if value { b"true" } else { b"false" });
        self
    }

    /// A string member.
    #[inline]
    pub fn str(&mut self, key: &'static str, value: &str) -> &mut Self {
        self.member(key).str(value);
        self
    }

    /// A member holding any JSON value, written canonically.
    pub fn value(&mut self, key: &'static str, value: &Value) -> &mut Self {
        self.member(key).value(value);
        self
    }

    /// A member holding JSON already written canonically (by [`canonical_json`], say), copied
    /// as it is. Debug builds check that it is canonical.
    pub fn canonical(&mut self, key: &'static str, canonical_json_bytes: &[u8]) -> &mut Self {
        debug_assert!(
            serde_json::from_slice::<Value>(canonical_json_bytes)
                .is_ok_and(|v| canonical_json(&v) == canonical_json_bytes),
            "not canonical JSON: {}",
            String::from_utf8_lossy(canonical_json_bytes)
        );
        self.key(key).extend_from_slice(canonical_json_bytes);
        self
    }

    /// A member holding an object that `write` builds.
    pub fn object(
        &mut self,
        key: &'static str,
        write: impl FnOnce(&mut ObjectWriter<'_>),
    ) -> &mut Self {
        self.member(key).object(write);
        self
    }

    /// A member holding an object whose keys are known only at run time (task ids, say):
    /// `entries` in byte order of their keys, each key once (debug builds check), keys escaped
    /// as needed, each value written by `write` into its slot.
    pub fn entries<K: AsRef<str>, T>(
        &mut self,
        key: &'static str,
        entries: impl IntoIterator<Item = (K, T)>,
        mut write: impl FnMut(Slot<'_>, T),
    ) -> &mut Self {
        let out = self.key(key);
        out.push(b'{');
        #[cfg(debug_assertions)]
        let mut last: Option<String> = None;
        for (i, (k, item)) in entries.into_iter().enumerate() {
            let k = k.as_ref();
            #[cfg(debug_assertions)]
            check_key_order(&mut last, k);
            if i > 0 {
                out.push(b',');
            }
            write_json_string(k, out);
            out.push(b':');
            write(Slot { out: &mut *out }, item);
        }
        out.push(b'}');
        self
    }

    /// A member holding an array of objects, one per item, each built by `write`.
    pub fn objects<T>(
        &mut self,
        key: &'static str,
        items: impl IntoIterator<Item = T>,
        mut write: impl FnMut(&mut ObjectWriter<'_>, T),
    ) -> &mut Self {
        let out = self.key(key);
        out.push(b'[');
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            Slot { out: &mut *out }.object(|o| write(o, item));
        }
        out.push(b']');
        self
    }
}

/// Debug builds' check that an object's keys come in byte order, each once: `last` is the key
/// before `key`, and becomes `key`.
#[cfg(debug_assertions)]
fn check_key_order(last: &mut Option<String>, key: &str) {
    if let Some(last) = last.as_deref() {
        assert!(
            last.as_bytes() < key.as_bytes(),
            "object keys out of byte order: {last:?} then {key:?}"
        );
    }
    *last = Some(key.to_string());
}

/// Where one value of an [`ObjectWriter::entries`] object goes: write exactly one.
pub struct Slot<'a> {
    out: &'a mut Vec<u8>,
}

impl Slot<'_> {
    /// An unsigned integer.
    #[inline]
    pub fn u64(self, value: u64) {
        // Most are one digit (attempts, turns, counts): no formatting, no copy.
        if value < 10 {
            self.out.push(b'0' + value as u8);
        } else {
            write_integer(self.out, value);
        }
    }
    /// A string.
    pub fn str(self, value: &str) {
        write_json_string(value, self.out);
    }
    /// Any JSON value, written canonically.
    pub fn value(self, value: &Value) {
        write_canonical_json(value, self.out);
    }
    /// An object that `write` builds.
    pub fn object(self, write: impl FnOnce(&mut ObjectWriter<'_>)) {
        let mut inner = ObjectWriter::start(self.out);
        write(&mut inner);
        inner.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn float_text(f: f64) -> String {
        let mut out = Vec::new();
        write_float(&mut out, f);
        String::from_utf8(out).unwrap()
    }

    /// The canonical form of floats, pinned: the chain hashes it, so it must not move.
    #[test]
    fn floats_have_one_pinned_form() {
        for (value, text) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (100.0, "100.0"),
            (0.1, "0.1"),
            (123456.789, "123456.789"),
            (1e15, "1000000000000000.0"),
            (9.999e15, "9999000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (12345678901234567890.0, "1.2345678901234567e+19"),
            (f64::MAX, "1.7976931348623157e+308"),
            (1e-4, "0.0001"),
            (1e-5, "0.00001"),
            (1.2345e-5, "0.000012345"),
            (1e-6, "1e-6"),
            (-1.5e-7, "-1.5e-7"),
            (5e-324, "5e-324"),
            (2.2250738585072014e-308, "2.2250738585072014e-308"),
        ] {
            assert_eq!(float_text(value), text, "{value:e}");
        }
    }

    /// The pinned form is what `serde_json` (the version in Cargo.lock) writes, over random
    /// bit patterns: logs written before the form was pinned hash the same. Should a newer
    /// `serde_json` write floats otherwise, this fails while the canonical form stays; the
    /// comparison may then go.
    #[test]
    fn the_pinned_float_form_is_serde_json_s() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = f64::from_bits(x);
            if !f.is_finite() {
                continue;
            }
            assert_eq!(
                float_text(f),
                serde_json::to_string(&f).unwrap(),
                "{:#x}",
                x
            );
        }
        for digits in 1..17 {
            for exp in -330..310 {
                let f: f64 = format!("{}e{exp}", "7".repeat(digits)).parse().unwrap();
                if f.is_finite() {
                    assert_eq!(float_text(f), serde_json::to_string(&f).unwrap(), "{f:e}");
                }
            }
        }
    }

    fn event(payload: Value) -> NewEvent {
        NewEvent {
            run_id: RunId::from_bytes([1; 16]),
            task_id: None,
            actor: Actor::System,
            kind: EventKind::Note,
            time: Timestamp::from_unix_nanos(5),
            payload,
        }
    }

    /// A payload read back from the log must be the payload written, or replay sees other
    /// numbers than the run did: serde_json's default float parser reads these shortest forms
    /// one unit in the last place off; core turns on its `float_roundtrip` feature.
    #[test]
    fn floats_read_back_from_canonical_json_are_the_floats_written() {
        for f in [
            1.0715660391465826e-75_f64,
            -1.81996730402717e-179,
            -1.603964615428183e143,
            -9.643915712060552e-234,
            0.1,
        ] {
            let written = canonical_json(&serde_json::json!({ "x": f }));
            let back: Value = serde_json::from_slice(&written).unwrap();
            assert_eq!(
                back["x"].as_f64().map(f64::to_bits),
                Some(f.to_bits()),
                "{f:e}"
            );
        }
    }

    /// The worked example of `docs/audit-format.md`: if this changes, the format changed.
    #[test]
    fn worked_example_of_the_audit_format() {
        let ev = NewEvent {
            run_id: "01936f9e-1c3a-7c4d-8e5f-0a1b2c3d4e5f".parse().unwrap(),
            task_id: None,
            actor: Actor::Agent("writer".into()),
            kind: EventKind::TaskCompleted,
            time: "2026-01-02T03:04:05Z".parse().unwrap(),
            payload: serde_json::json!({"output": {"text": "hi"}, "attempt": 1}),
        };
        let mut canonical = 1u64.to_be_bytes().to_vec();
        canonical.extend(ev.canonical_body());
        assert_eq!(
            hex::encode(&canonical),
            "000000000000000101936f9e1c3a7c4d8e5f0a1b2c3d4e5f000000000c6167656e743a7772697465720000000e7461736b2e636f6d706c657465641886caf21c963200000000247b22617474656d7074223a312c226f7574707574223a7b2274657874223a226869227d7d"
        );
        let env = Envelope::seal(1, Hash32::GENESIS, ev);
        assert_eq!(
            env.hash.to_string(),
            "b07ac6a3d5f386f8c83f63304b4d5a7a2c28ac9b76bc5c1da3e5d17c3e0a9390"
        );
    }

    #[test]
    fn the_fast_and_the_sorting_object_writers_agree() {
        let v = serde_json::json!({"é": 1, "z": {"b": [1, {"y": null, "x": "q"}], "a": 2.5}, "B": true, "a": "x"});
        let Value::Object(map) = &v else {
            unreachable!()
        };
        let mut sorted = Vec::new();
        write_object_sorted(map, &mut sorted);
        assert_eq!(canonical_json(&v), sorted);
        assert!(
            maps_iterate_sorted(),
            "this build's serde_json maps are sorted (no preserve_order)"
        );
    }

    #[test]
    fn needs_escape_finds_every_escaped_byte_at_every_position() {
        for background in [b'a', b' ', b'!', b']', 0x80, 0xff] {
            for len in 0..20 {
                for pos in 0..len {
                    for b in 0u8..=255 {
                        let mut bytes = vec![background; len];
                        bytes[pos] = b;
                        let expected = b < 0x20 || b == b'"' || b == b'\\';
                        assert_eq!(needs_escape(&bytes), expected, "{len} {pos} {b}");
                    }
                }
            }
        }
        assert!(!needs_escape("é日本 🦀 plain ~\u{7f}".as_bytes()));
    }

    #[test]
    fn scalars_and_strings_are_written_as_serde_json_writes_them() {
        let strings = [
            "",
            "plain",
            "é ü 日本",
            "quote\"",
            "back\\slash",
            "nl\n",
            "tab\t",
            "\u{0}",
            "\u{1f}",
            "\u{7f}",
            "\u{2028}",
            "mixed \"a\"\r\n\u{8}\u{c}",
            "emoji 🦀",
        ];
        for s in strings {
            let v = Value::String(s.to_string());
            assert_eq!(canonical_json(&v), serde_json::to_vec(&v).unwrap(), "{s:?}");
        }
        let numbers = serde_json::json!([
            0,
            1,
            -1,
            42,
            u64::MAX,
            i64::MIN,
            i64::MAX,
            0.0,
            -0.0,
            1.5,
            1e300,
            0.1,
            -2.5e-8,
            100.0
        ]);
        let Value::Array(numbers) = numbers else {
            unreachable!()
        };
        for n in numbers
            .into_iter()
            .chain([Value::Null, Value::Bool(true), Value::Bool(false)])
        {
            assert_eq!(canonical_json(&n), serde_json::to_vec(&n).unwrap(), "{n}");
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let v = serde_json::json!({"z": {"y": 1, "x": 2}, "a": "é\n"});
        assert_eq!(
            canonical_json(&v),
            "{\"a\":\"é\\n\",\"z\":{\"x\":2,\"y\":1}}".as_bytes()
        );
    }

    #[test]
    fn chain_hash_parts_equals_chain_hash_of_the_body() {
        let e = event(serde_json::json!({"a": [1, 2]}));
        let payload = canonical_json(&e.payload);
        assert_eq!(
            chain_hash_parts(&Hash32([3; 32]), 7, &e.canonical_header(), &payload),
            chain_hash(&Hash32([3; 32]), 7, &e.canonical_body())
        );
    }

    #[test]
    fn hash_changes_with_any_field() {
        let base = Envelope::seal(1, Hash32::GENESIS, event(serde_json::json!({"k": 1})));
        assert_eq!(base.computed_hash(), base.hash);
        let mut changed = base.clone();
        changed.payload = serde_json::json!({"k": 2});
        assert_ne!(changed.computed_hash(), base.hash);
        let mut changed = base.clone();
        changed.seq = 2;
        assert_ne!(changed.computed_hash(), base.hash);
        let mut changed = base.clone();
        changed.actor = Actor::Agent("a".into());
        assert_ne!(changed.computed_hash(), base.hash);
        let mut changed = base.clone();
        changed.prev_hash = Hash32([9; 32]);
        assert_ne!(changed.computed_hash(), base.hash);
    }

    #[test]
    fn json_round_trip_keeps_the_hash() {
        let e = Envelope::seal(
            3,
            Hash32([7; 32]),
            event(serde_json::json!({"f": 1.5, "s": "x"})),
        );
        let text = serde_json::to_string(&e).unwrap();
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back.computed_hash(), e.hash);
    }

    #[test]
    fn every_kind_round_trips_through_its_string() {
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>().unwrap(), *k);
        }
        assert!("run.exploded".parse::<EventKind>().is_err());
    }

    #[test]
    fn actor_bytes_equal_its_display() {
        for a in [
            Actor::Agent("w".into()),
            Actor::Tool("t.x".into()),
            Actor::Person("ann".into()),
            Actor::System,
        ] {
            let mut out = Vec::new();
            a.write_bytes(&mut out);
            assert_eq!(out, a.to_string().into_bytes());
        }
    }

    #[test]
    fn actor_strings() {
        assert!("agent:".parse::<Actor>().is_err());
        assert!("robot:x".parse::<Actor>().is_err());
        assert_eq!(
            "person:ann:b".parse::<Actor>().unwrap(),
            Actor::Person("ann:b".into())
        );
    }

    /// An object written member by member is byte for byte what encoding the same value
    /// gives: escapes, nesting, every kind of member.
    #[test]
    fn object_writer_matches_canonical_json() {
        let nested = serde_json::json!({"z": [1, -2, 2.5, null], "a": {"y": "é\n", "b": true}});
        let encoded = EncodedEvent::with_object(
            RunId::from_bytes([1; 16]),
            None,
            Actor::System,
            EventKind::Note,
            Timestamp::from_unix_nanos(5),
            |o| {
                o.value("args", &nested)
                    .u64("call", u64::MAX)
                    .bool("done", false)
                    .object("output", |o| {
                        o.str("text", "line\n\"quoted\" \u{1}")
                            .u64("turns", 0)
                            .u64("v10", 10)
                            .u64("v9", 9);
                    })
                    .canonical("raw", br#"{"a":[1,"x"],"b":null}"#)
                    .object("zero", |_| {})
                    .entries(
                        "\u{7f}key",
                        [("a\"b", 1u64), ("b", 2), ("é", 3)],
                        |slot, n| match n {
                            1 => slot.u64(7),
                            2 => slot.str("\n"),
                            _ => slot.object(|o| {
                                o.value("v", &serde_json::json!([{"y": 1, "x": 2}]));
                            }),
                        },
                    );
            },
        );
        let value = serde_json::json!({
            "args": nested, "call": u64::MAX, "done": false,
            "output": {"text": "line\n\"quoted\" \u{1}", "turns": 0, "v10": 10, "v9": 9},
            "zero": {},
            "raw": {"a": [1, "x"], "b": null},
            "\u{7f}key": {"a\"b": 7, "b": "\n", "é": {"v": [{"x": 2, "y": 1}]}},
        });
        assert_eq!(encoded, EncodedEvent::new(event(value.clone())));
        assert_eq!(encoded.to_new_event().unwrap().payload, value);
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "needs escapes")]
    fn object_writer_refuses_keys_that_need_escapes_in_debug_builds() {
        note_with(|o| {
            o.u64("a\"b", 1);
        });
    }

    /// A note whose payload `write` builds.
    fn note_with(write: impl FnOnce(&mut ObjectWriter<'_>)) -> EncodedEvent {
        EncodedEvent::with_object(
            RunId::from_bytes([1; 16]),
            None,
            Actor::System,
            EventKind::Note,
            Timestamp::EPOCH,
            write,
        )
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "object keys out of byte order")]
    fn object_writer_refuses_unsorted_keys_in_debug_builds() {
        note_with(|o| {
            o.u64("turn", 1).u64("call", 2);
        });
    }

    /// An envelope writes the canonical body its event would, without copying the payload.
    #[test]
    fn an_envelope_writes_its_event_s_canonical_body() {
        for task in [None, Some(TaskId::from_bytes([7; 16]))] {
            let event = NewEvent {
                run_id: RunId::from_bytes([2; 16]),
                task_id: task,
                actor: Actor::Tool("ré\"ad".into()),
                kind: EventKind::ToolCompleted,
                time: Timestamp::from_unix_nanos(1_764_254_213_000_000_001),
                payload: serde_json::json!({"b": [1, 2.5, null], "a": "x\u{1}"}),
            };
            let env = Envelope::seal(3, Hash32([9; 32]), event.clone());
            let mut body = Vec::new();
            env.write_canonical_body(&mut body);
            assert_eq!(body, event.canonical_body());
            assert_eq!(env.computed_hash(), env.hash);
        }
    }

    /// The one-call paths for bodies that fit one BLAKE3 chunk hash the same bytes as the
    /// incremental one: sizes on both sides of each cut, and far past them.
    #[test]
    fn chain_hash_is_blake3_of_link_and_body_at_every_size() {
        for len in [0, 1, 63, 64, 215, 216, 217, 983, 984, 985, 1024, 5000] {
            let body: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let prev = Hash32([9; 32]);
            let mut h = blake3::Hasher::new();
            h.update(&prev.0);
            h.update(&42u64.to_be_bytes());
            h.update(&body);
            assert_eq!(
                chain_hash(&prev, 42, &body),
                Hash32(*h.finalize().as_bytes()),
                "{len}"
            );
        }
    }
}
