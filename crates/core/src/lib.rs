//! # agent-runtime-core
//!
//! The shared language of agent-runtime: the plain types and traits every capability crate
//! speaks, and nothing else. Like a protocol crate, it holds no machinery: no database, no
//! scheduler, no network.
//!
//! - **Ids** ([`RunId`], [`TaskId`], [`AgentId`], [`EventId`], [`SessionId`]): time-ordered UUIDs
//!   from an [`IdGenerator`], seeded for reproducible runs.
//! - **Time** ([`Clock`], [`SystemClock`], [`ManualClock`], [`Timestamp`]): nothing reads the wall
//!   clock directly, so tests and the simulator own time.
//! - **Events** ([`NewEvent`], [`Envelope`], [`EventKind`], [`Actor`]): every fact enters the log
//!   once; [`Envelope`]s are hash-chained in a documented canonical form ([`event`] module).
//! - **Policy** ([`PolicyEnvelope`], [`Effect`]): the record of a decision about a tool call.
//! - **Traits** the capabilities implement: [`Tool`] (gateway, toolkit), [`ModelProvider`] (model
//!   fabric), [`Session`] and [`ApprovalSink`] (sessions and the human loop), [`EventSink`] and
//!   [`EventSource`] (the log). Each states its contract for cancellation, timeouts, streaming and
//!   error classes; every error crossing them carries an [`ErrorClass`].
//!
//! ```
//! use agent_runtime_core::{Actor, Envelope, EventKind, Hash32, NewEvent, RunId, Timestamp};
//! use serde_json::json;
//!
//! let event = NewEvent {
//!     run_id: RunId::from_bytes([1; 16]),
//!     task_id: None,
//!     actor: Actor::System,
//!     kind: EventKind::RunStarted,
//!     time: Timestamp::EPOCH,
//!     payload: json!({"graph": "demo"}),
//! };
//! let first = Envelope::seal(1, Hash32::GENESIS, event);
//! assert_eq!(first.computed_hash(), first.hash);
//! ```
//!
//! One utility beyond types and traits: [`fs::replace`], the one way the crates replace a file a
//! person names (an MCP servers file, an export) whole.
//!
//! What it does not do: store, schedule or execute anything. See `agent-runtime-store` for the
//! event log and the other `agent-runtime-*` crates for the capabilities.

#![warn(missing_docs)]

/// Implements `TryFrom<String>` (through `FromStr`), `From<T> for String` (through `Display`)
/// and a string `JsonSchema` for a type that serde writes as a string.
macro_rules! string_type {
    ($ty:ty, $err:ty, $name:expr, $schema:tt) => {
        impl TryFrom<String> for $ty {
            type Error = $err;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                v.to_string()
            }
        }

        impl schemars::JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!($schema)
            }
        }
    };
}

pub mod approval;
pub mod canonical;
pub mod context;
pub mod document;
pub mod error;
pub mod event;
pub mod fs;
pub mod ids;
pub mod model;
pub mod names;
pub mod policy;
pub mod random;
pub mod schema;
pub mod secret;
pub mod session;
pub mod sink;
pub mod time;
pub mod tool;
pub mod yaml;

pub use approval::{ApprovalDecision, ApprovalError, ApprovalRequest, ApprovalSink, DenyAll};
pub use async_trait::async_trait;
pub use canonical::{CanonicalError, write_canonical};
pub use context::{
    CallContext, FileTarget, PersonWait, Progress, UnresolvedPath, WaitListener, WaitReporter,
};
pub use error::{ClassifiedError, ErrorClass};
pub use event::{
    Actor, EncodedEvent, Envelope, EventKind, Hash32, NewEvent, ObjectWriter, Slot, UnknownKind,
    canonical_header, canonical_json, chain_hash, chain_hash_parts, push_canonical_payload,
    write_canonical_header, write_canonical_json,
};
pub use ids::{AgentId, EventId, IdGenerator, RunId, SessionId, TaskId, os_random_u64};
pub use model::{
    FinishReason, Message, ModelDelta, ModelError, ModelProvider, ModelRequest, ModelResponse,
    ModelStream, Role, ToolCall, ToolSpec, Usage,
};
pub use policy::{Effect, PolicyEnvelope};
pub use random::SeededRng;
pub use secret::{EnvSecrets, NoSecrets, Redactor, SecretSource, StaticSecrets};
pub use session::{Session, SessionError, SessionInput, SessionKind, SessionOutput};
pub use sink::{
    AppendStream, Appended, EventQuery, EventSink, EventSource, MemoryLog, PendingAppend, RunClaim,
    SinkError,
};
pub use time::{Clock, ManualClock, SystemClock, Timestamp, process_cpu_ns, thread_cpu_ns};
pub use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
pub use tool::{
    MAX_ARGUMENT_BYTES, RiskClass, Tool, ToolDescriptor, ToolError, ToolOutput, ToolSource,
};
