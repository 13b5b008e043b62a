//! Time-ordered identifiers.
//!
//! Every id is a UUID version 7: 48 bits of milliseconds since the Unix epoch, then random bits.
//! Sorting ids sorts them by creation time. Ids are made by an [`IdGenerator`], which takes its
//! time from a [`Clock`] and its random bits either from the operating system (live runs) or from
//! a seeded generator (deterministic runs and the simulator), so the same seed gives the same ids.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::time::Clock;

/// The error for a string that is not an id of the expected kind.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid {kind} id {input:?}: expected a UUID such as 01936f9e-1c3a-7c4d-8e5f-0a1b2c3d4e5f"
)]
pub struct IdError {
    kind: &'static str,
    input: String,
}

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(uuid::Uuid);

        impl $name {
            /// The id's 16 bytes, big-endian (as stored and hashed).
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
            /// The id from its 16 bytes.
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                $name(uuid::Uuid::from_bytes(bytes))
            }
            /// The id from a slice that must be exactly 16 bytes long.
            pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
                let arr: [u8; 16] = bytes.try_into().map_err(|_| IdError {
                    kind: $kind,
                    input: hex::encode(bytes),
                })?;
                Ok(Self::from_bytes(arr))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($kind, ":{}"), self.0.hyphenated())
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                uuid::Uuid::try_parse(s)
                    .map($name)
                    .map_err(|_| IdError { kind: $kind, input: s.to_string() })
            }
        }

        string_type!($name, IdError, stringify!($name), {
            "type": "string",
            "format": "uuid",
            "description": concat!("Time-ordered ", $kind, " id (UUID version 7)")
        });
    };
}

define_id!(
    /// Identifies one run of a task graph.
    RunId,
    "run"
);
define_id!(
    /// Identifies one task within a run (graph tasks and spawned sub-tasks alike).
    TaskId,
    "task"
);
define_id!(
    /// Identifies one agent instance within a run.
    AgentId,
    "agent"
);
define_id!(
    /// Identifies one event, tool call, model call or approval request.
    EventId,
    "event"
);
define_id!(
    /// Identifies one terminal or browser session.
    SessionId,
    "session"
);

/// Makes time-ordered ids from a clock and a random source.
///
/// Cloning shares the random source, so clones never repeat each other's ids.
///
/// ```
/// use agent_runtime_core::{IdGenerator, ManualClock, Timestamp};
/// use std::sync::Arc;
/// let clock = Arc::new(ManualClock::new(Timestamp::EPOCH));
/// let a = IdGenerator::seeded(7, clock.clone());
/// let b = IdGenerator::seeded(7, clock);
/// assert_eq!(a.run_id(), b.run_id()); // same seed, same ids
/// ```
#[derive(Clone, Debug)]
pub struct IdGenerator {
    clock: Arc<dyn Clock>,
    rng: Arc<Mutex<ChaCha8Rng>>,
}

impl IdGenerator {
    /// Ids whose random bits come from a generator seeded with `seed`: reproducible.
    pub fn seeded(seed: u64, clock: Arc<dyn Clock>) -> Self {
        IdGenerator {
            clock,
            rng: Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(seed))),
        }
    }

    /// [`IdGenerator::seeded`] on ChaCha stream `stream`: the draws of one stream share
    /// nothing with another's for the same seed, so ids of two kinds of things drawn from one
    /// seed at one instant (a run's id and its first task's) never coincide.
    pub fn seeded_stream(seed: u64, stream: u64, clock: Arc<dyn Clock>) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        IdGenerator {
            clock,
            rng: Arc::new(Mutex::new(rng)),
        }
    }

    /// Ids whose random bits come from a generator seeded by the operating system.
    pub fn random(clock: Arc<dyn Clock>) -> Self {
        Self::seeded(os_random_u64(), clock)
    }

    fn next_uuid(&self) -> uuid::Uuid {
        let mut bytes = [0u8; 10];
        {
            // A poisoned lock only means another thread panicked mid-draw; the RNG state is
            // still a valid RNG state, so keep going rather than propagate the panic.
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            rng.fill_bytes(&mut bytes);
        }
        uuid::Builder::from_unix_timestamp_millis(self.clock.now().as_unix_millis(), &bytes)
            .into_uuid()
    }

    /// A new run id.
    pub fn run_id(&self) -> RunId {
        RunId(self.next_uuid())
    }
    /// A new task id.
    pub fn task_id(&self) -> TaskId {
        TaskId(self.next_uuid())
    }
    /// A new agent id.
    pub fn agent_id(&self) -> AgentId {
        AgentId(self.next_uuid())
    }
    /// A new event, call or request id.
    pub fn event_id(&self) -> EventId {
        EventId(self.next_uuid())
    }
    /// A new session id.
    pub fn session_id(&self) -> SessionId {
        SessionId(self.next_uuid())
    }
}

/// 64 random bits from the operating system; falls back to the clock's nanoseconds mixed with
/// the process id when the OS source fails (which only happens on a broken system).
pub fn os_random_u64() -> u64 {
    let mut buf = [0u8; 8];
    match getrandom::fill(&mut buf) {
        Ok(()) => u64::from_le_bytes(buf),
        Err(_) => {
            let t = crate::time::SystemClock.now().as_unix_nanos();
            t ^ (u64::from(std::process::id()) << 32)
        }
    }
}
