//! # agent-runtime-store
//!
//! The embedded event log of agent-runtime, and its audit tools. Every capability appends its
//! facts here as [`NewEvent`](agent_runtime_core::NewEvent)s; the store numbers them, links them
//! into a BLAKE3 hash chain, seals their payloads, and keeps them in one SQLite file.
//!
//! - **Append-only, group-committed.** One writer thread takes every queued batch, numbers and
//!   chains it, and commits it in one transaction; [`Store::append`] returns only once its batch
//!   is durable. By default ([`Durability::Full`]) the WAL is fsynced after each group commit
//!   and before its appends return: they survive power loss; the fsync runs on a thread of its
//!   own while the writer commits the next batch. [`Durability::Normal`] trades the last
//!   commits before a power loss for speed.
//! - **Tamper-evident.** `hash = BLAKE3(prev_hash ‖ canonical bytes)`; the canonical form is
//!   documented in [`agent_runtime_core::event`] and `docs/audit-format.md`. [`Store::verify`]
//!   names the first broken sequence number and why.
//! - **Encrypted at rest by default.** Payloads are sealed with XChaCha20-Poly1305 under a random
//!   data key, wrapped by a key derived from a passphrase with Argon2id. Sequence, run, task,
//!   actor, kind and time stay in clear so queries work without the key.
//! - **Exportable.** [`Store::export`] writes `jsonl`, `otlp` or a `bundle` that
//!   [`verify_bundle`] checks offline.
//! - **Shared safely.** Several processes may open one database: each group commit takes SQLite's
//!   write lock and re-reads the head, so appends from different processes serialize into one
//!   chain.
//!
//! ```
//! use agent_runtime_core::{Actor, EventKind, NewEvent, RunId, Timestamp};
//! use agent_runtime_store::{Passphrase, Store, StoreConfig, KdfParams};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let cfg = StoreConfig::new(dir.path().join("events.db"))
//!     .passphrase(Passphrase::new("correct horse battery staple"))
//!     .kdf(KdfParams { m_kib: 1024, t: 1, p: 1 }); // cheap, for the example only
//! let store = Store::open(cfg).unwrap();
//! let event = NewEvent { run_id: RunId::from_bytes([1; 16]), task_id: None, actor: Actor::System,
//!                        kind: EventKind::Note, time: Timestamp::EPOCH,
//!                        payload: serde_json::json!({"text": "hello"}) };
//! store.append_blocking(vec![event]).unwrap();
//! let report = store.verify().unwrap();
//! assert_eq!(report.events, 1);
//! assert!(report.problem.is_none());
//! ```
//!
//! **Which methods block.** [`Store::append`] and [`Store::append_encoded`] (and the
//! [`EventSink`](agent_runtime_core::EventSink) methods)
//! are async: the writer thread does the work. [`Store::open`] (file I/O, and Argon2id for an
//! encrypted database: tens of milliseconds), [`Store::verify`], [`Store::export`],
//! [`verify_bundle`], the `*_blocking` methods and the queries do their work on the calling
//! thread: from async code, call them in `tokio::task::spawn_blocking`.
//!
//! What it does not do: decide what to record (capabilities do), or keep secrets out of payloads
//! (callers redact before appending).

#![warn(missing_docs)]

pub mod bench;
mod block_on;
mod config;
mod crypto;
mod error;
mod export;
pub mod frame;
mod keyring;
mod pipeline;
mod stats;
mod store;
mod verify;

pub use config::{
    DB_ENV, Durability, Encryption, MAX_PAYLOAD_BYTES, PASSPHRASE_ENV, Passphrase, StoreConfig,
    default_db_path,
};
pub use crypto::KdfParams;
pub use error::StoreError;
pub use export::{ExportFormat, ExportSummary};
pub use keyring::KEYRING_SERVICE;
pub use stats::Stats;
pub use store::{MAX_DB_NAME_BYTES, PendingBatch, RunLock, Store, WriterStats, database_files};
pub use verify::{Problem, ProblemKind, VerifyReport, verify_bundle, verify_bundle_from};
