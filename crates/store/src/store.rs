//! The store itself: opening, the group-committing writer, queries and follow.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use agent_runtime_core::{
    Actor, AppendStream, Appended, EncodedEvent, Envelope, EventKind, EventQuery, Hash32, NewEvent,
    RunId, TaskId, Timestamp, chain_hash,
};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Durability, Encryption, StoreConfig};
use crate::crypto::{self, KdfParams, PayloadCipher};
use crate::error::{StoreError, sqlite_detail, sqlite_error};
use crate::frame::{EventRecord, FrameBuilder, MAX_FRAME_EVENTS};

/// The on-disk format this build writes for a plaintext log, and reads: 2 is frames (see
/// [`crate::frame`]); 1 was a row per event.
pub(crate) const FORMAT: &str = "2";
/// The format of an encrypted log this build creates: 2, with the head tagged under a key
/// derived from the data key (`head_tag`; the data key is wrapped as one whose head is tagged).
/// A build that reads only 2 refuses it by its format, rather than take its key for a wrong one.
pub(crate) const FORMAT_HEAD_TAGGED: &str = "3";

/// The formats this build reads, as its errors name them.
const FORMATS_READ: &str = "2 or 3";

fn is_known_format(f: &str) -> bool {
    f == FORMAT || f == FORMAT_HEAD_TAGGED
}
/// Most events one group commit takes; more wait for the next.
const MAX_BATCH_EVENTS: usize = 16 * 1024;
/// Requests queued for the writer before appenders wait (backpressure).
const QUEUE_DEPTH: usize = 1024;

/// The tables. `frames` holds the events (a row per run of consecutive events, see
/// [`crate::frame`]); `frame_runs` says which frames hold a run's events, so that a run's events
/// are found without reading the others. Kind and time are filtered while reading: an index
/// entry per event is what made a row per event slow, and frames carry their time range.
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS frames (
    first_seq INTEGER PRIMARY KEY,
    last_seq  INTEGER NOT NULL,
    min_time  INTEGER NOT NULL,
    max_time  INTEGER NOT NULL,
    prev_hash BLOB NOT NULL,
    last_hash BLOB NOT NULL,
    body      BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS frame_runs (
    run_id    BLOB NOT NULL,
    first_seq INTEGER NOT NULL,
    PRIMARY KEY (run_id, first_seq)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS frames_append_only_update BEFORE UPDATE ON frames
    BEGIN SELECT RAISE(ABORT, 'agent-runtime events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS frames_append_only_delete BEFORE DELETE ON frames
    BEGIN SELECT RAISE(ABORT, 'agent-runtime events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS frame_runs_append_only_update BEFORE UPDATE ON frame_runs
    BEGIN SELECT RAISE(ABORT, 'agent-runtime events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS frame_runs_append_only_delete BEFORE DELETE ON frame_runs
    BEGIN SELECT RAISE(ABORT, 'agent-runtime events are append-only'); END;
";

/// Writer connection settings, shared with the benchmark's baseline so the comparison is fair.
/// The page cache is 2 MiB: the writer only appends frames, whose pages it never reads again,
/// and the few b-tree pages it does read stay hot; a larger cache only filled with written
/// pages (8 MiB cost a live run of 10,000 agents about 500 bytes of memory per agent and 10 %
/// more page faults).
///
/// The write-ahead log is cut back to [`WAL_LIMIT`] when it starts over. With
/// [`Durability::Full`] a thread of the store's own checkpoints it once it passes that (see
/// [`Checkpointer`]), and the writer's own checkpoint at 4,096 pages (64 MiB) is a backstop;
/// [`Durability::Normal`] has the writer checkpoint at [`WAL_LIMIT`] ([`NORMAL_CHECKPOINT`]).
pub(crate) const WRITER_TUNING: &str = "PRAGMA cache_size = -2048; PRAGMA wal_autocheckpoint = \
     4096; PRAGMA journal_size_limit = 16777216; PRAGMA temp_store = MEMORY;";

/// The size of write-ahead log past which it is copied into the database (checkpointed), and
/// to which it is cut back when it starts over: a database needs about this much disk beyond
/// its own size while a process writes it. Each commit appends whole pages, so a run of small
/// commits (an interactive run: a few events each) grows the log about 17 times faster than
/// the data: with no checkpoint before 256 MiB, as before, a 3,000-task run whose database ends
/// at 11 MB held a 177 MB log, and could not finish on a disk with 50 MB free.
const WAL_LIMIT: u64 = 16 << 20;

/// How long a `RESTART` checkpoint waits for the writer's commit and for readers of the old
/// log, holding new commits off meanwhile (see [`Checkpointer`]).
const RESTART_WAIT: Duration = Duration::from_millis(20);

/// The writer's own checkpoint with [`Durability::Normal`], which has no [`Checkpointer`]:
/// [`WAL_LIMIT`] in 16 KiB pages.
const NORMAL_CHECKPOINT: &str = "PRAGMA wal_autocheckpoint = 1024;";

/// The columns every frame reader selects, in this order.
pub(crate) const FRAME_COLUMNS: &str = "first_seq, last_seq, prev_hash, last_hash, body";

/// An event prepared for the writer: everything that does not depend on its place in the log is
/// computed by the appender, so the single writer only numbers, hashes and copies.
pub(crate) struct Prepared {
    /// The event's time as stored (checked to fit).
    time_ns: i64,
    /// The canonical body, which the chain hash covers.
    event: EncodedEvent,
    /// The sealed payload as stored; `None` in a plaintext log, which stores the canonical
    /// payload itself.
    sealed: Option<Vec<u8>>,
}

enum Reply {
    Async(oneshot::Sender<Result<Vec<Appended>, StoreError>>),
}

struct WriteRequest {
    events: Vec<Prepared>,
    /// The producer's stream, if it submitted through one: refused once the stream failed.
    stream: Option<AppendStream>,
    reply: Reply,
}

/// A batch queued by [`Store::submit_encoded`]: resolves to where its events landed once they
/// are durable, or to the error that kept them out (then none of them is in the log).
#[must_use = "the batch is written either way; await it to know that it is durable"]
#[derive(Debug)]
pub struct PendingBatch {
    reply: oneshot::Receiver<Result<Vec<Appended>, StoreError>>,
    path: PathBuf,
}

impl std::future::Future for PendingBatch {
    type Output = Result<Vec<Appended>, StoreError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.reply).poll(cx).map(|r| {
            r.unwrap_or_else(|_| {
                Err(StoreError::WriterGone {
                    path: self.path.clone(),
                    detail: "no reply".into(),
                })
            })
        })
    }
}

/// An event record copied out of its frame: what crosses threads in export and verify.
pub(crate) struct RawRow {
    pub seq: u64,
    pub run_id: [u8; 16],
    pub task_id: Option<[u8; 16]>,
    pub actor: String,
    pub kind: String,
    pub time_ns: u64,
    pub header: Vec<u8>,
    pub payload: Vec<u8>,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

impl RawRow {
    pub(crate) fn from_record(r: &EventRecord<'_>) -> RawRow {
        RawRow {
            seq: r.seq,
            run_id: r.run_id,
            task_id: r.task_id,
            actor: r.actor.to_string(),
            kind: r.kind.to_string(),
            time_ns: r.time_ns,
            header: r.header.to_vec(),
            payload: r.payload.to_vec(),
            prev_hash: r.prev_hash.to_vec(),
            hash: r.hash.to_vec(),
        }
    }

    /// The record, borrowed.
    pub(crate) fn as_record(&self) -> EventRecord<'_> {
        EventRecord {
            seq: self.seq,
            run_id: self.run_id,
            task_id: self.task_id,
            actor: &self.actor,
            kind: &self.kind,
            time_ns: self.time_ns,
            header: &self.header,
            payload: &self.payload,
            prev_hash: &self.prev_hash,
            hash: &self.hash,
        }
    }
}

pub(crate) struct Inner {
    pub(crate) path: PathBuf,
    pub(crate) cipher: Option<Arc<PayloadCipher>>,
    pub(crate) max_payload_bytes: usize,
    pub(crate) reader: Mutex<Connection>,
    /// Whether readers open the file as immutable (see [`open_reader`]).
    pub(crate) immutable: bool,
    tx: Option<mpsc::Sender<WriteRequest>>,
    /// In an encrypted store, the thread that seals payloads between the queue and the writer.
    sealer: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
    pub(crate) last_seq: watch::Receiver<u64>,
    counters: Arc<WriterCounters>,
}

#[derive(Default)]
struct WriterCounters {
    commits: std::sync::atomic::AtomicU64,
    events: std::sync::atomic::AtomicU64,
    syncs: std::sync::atomic::AtomicU64,
    /// CPU time of the writer and sync threads so far, ns (`u64::MAX`: no per-thread clock).
    writer_cpu_ns: std::sync::atomic::AtomicU64,
    sync_cpu_ns: std::sync::atomic::AtomicU64,
}

/// What the writer has done since the store was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriterStats {
    /// Group commits (transactions).
    pub commits: u64,
    /// Events committed.
    pub events: u64,
    /// With [`Durability::Full`], fsyncs of the write-ahead log: one covers every commit
    /// finished before it began, so there are at most as many as commits.
    pub syncs: u64,
    /// CPU time the writer thread has used, ns, as of its last commit: with the store's
    /// throughput, how close the single writer is to being the bottleneck. `None` where the
    /// platform has no per-thread CPU clock.
    pub writer_cpu_ns: Option<u64>,
    /// The same for the thread that fsyncs the log ([`Durability::Full`] only), as of its last
    /// fsync.
    pub sync_cpu_ns: Option<u64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue lets the sealer and then the writer finish what is queued and exit.
        self.tx.take();
        if let Some(sealer) = self.sealer.take() {
            let _ = sealer.join();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// The embedded event log: one SQLite file in WAL mode, one writer thread that group-commits,
/// a hash chain over every event, payloads sealed at rest.
///
/// Cloning is cheap and shares the writer. The writer stops when the last clone is dropped,
/// after committing everything queued.
///
/// ```
/// use agent_runtime_core::{Actor, EventKind, EventQuery, NewEvent, RunId, Timestamp};
/// use agent_runtime_store::{Store, StoreConfig};
///
/// let dir = tempfile::tempdir().unwrap();
/// let store = Store::open(StoreConfig::plaintext(dir.path().join("events.db"))).unwrap();
/// let run_id = RunId::from_bytes([1; 16]);
/// let event = NewEvent { run_id, task_id: None, actor: Actor::System, kind: EventKind::RunStarted,
///                        time: Timestamp::EPOCH, payload: serde_json::json!({"graph": "demo"}) };
/// let landed = store.append_blocking(vec![event]).unwrap();
/// assert_eq!(landed[0].seq, 1);
/// let back = store.query_blocking(&EventQuery { run_id: Some(run_id), ..Default::default() }).unwrap();
/// assert_eq!(back[0].payload["graph"], "demo");
/// assert!(store.verify().unwrap().problem.is_none());
/// ```
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .field("encrypted", &self.inner.cipher.is_some())
            .finish()
    }
}

/// How long a connection waits for another one's lock before giving up with
/// [`StoreError::Busy`].
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

fn set_pragmas(conn: &Connection, path: &Path, write: bool) -> Result<(), StoreError> {
    let err = |e| sqlite_error(path, e, None);
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    if write {
        // Larger pages make each commit write fewer, fuller pages; it only takes effect on a new
        // database (before WAL mode is set) and is a no-op on an existing one.
        conn.execute_batch("PRAGMA page_size = 16384;")
            .map_err(err)?;
        let mode = switch_to_wal(conn).map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                detail: format!("cannot switch to WAL mode (got {mode})"),
            });
        }
        // No fsync inside a commit, with either durability: `Durability::Full` has the
        // write-ahead log fsynced after each commit by a thread of its own (see `WalSyncer`).
        // SQLite still fsyncs the log and the database around each checkpoint.
        conn.execute_batch(&format!("PRAGMA synchronous=NORMAL; {WRITER_TUNING}"))
            .map_err(err)?;
    }
    Ok(())
}

/// A read-only connection to `path`; with `immutable`, one that reads the file alone, without
/// the write-ahead log's shared-memory file (SQLite's `immutable=1`).
pub(crate) fn read_only_connection(path: &Path, immutable: bool) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if !immutable {
        return Connection::open_with_flags(path, flags);
    }
    // Every byte of the path but plain ASCII is percent-encoded: a URI gives `%`, `?` and `#`
    // meanings, and a path need not be UTF-8.
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file:");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(char::from(b));
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str("?immutable=1");
    Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI)
}

/// Opens `path` for reading. A database in WAL mode is read through a shared-memory file
/// beside it (`PATH-shm`), which a reader must be able to create: on read-only media (an
/// archive, a folder the reader cannot write) it cannot, and every read failed with "attempt
/// to write a readonly database". Such a file is then read as immutable, which is exact when
/// its write-ahead log is empty or absent (everything is in the file); with a log that holds
/// events it is refused, naming what to do, rather than read without them. Returns the
/// connection and whether it is immutable.
fn open_reader(path: &Path) -> Result<(Connection, bool), StoreError> {
    let open_error = |e| match sqlite_error(path, e, None) {
        StoreError::Sqlite { path, detail } => StoreError::Open { path, detail },
        other => other,
    };
    let conn = read_only_connection(path, false).map_err(open_error)?;
    match conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(())) {
        Err(rusqlite::Error::SqliteFailure(f, _))
            if matches!(
                f.code,
                rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::CannotOpen
            ) || matches!(
                // A full disk: SQLite could not make or grow the shared-memory file. Other
                // I/O errors (a failing disk, broken locks) are not read past.
                f.extended_code,
                rusqlite::ffi::SQLITE_IOERR_SHMOPEN
                    | rusqlite::ffi::SQLITE_IOERR_SHMSIZE
                    | rusqlite::ffi::SQLITE_IOERR_SHMMAP
            ) =>
        {
            drop(conn);
            let wal = beside(path, "-wal");
            if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
                return Err(StoreError::Open {
                    path: path.to_path_buf(),
                    detail: format!(
                        "cannot read it here: its write-ahead log ({}) holds events, and reading \
                         them needs a file beside it ({}) that cannot be made here{}; \
                         copy the database with its -wal file to a folder you can write",
                        wal.display(),
                        beside(path, "-shm").display(),
                        crate::error::io_hint(path, false)
                            .map_or(String::new(), |h| format!(" ({h})")),
                    ),
                });
            }
            Ok((read_only_connection(path, true).map_err(open_error)?, true))
        }
        // Anything else is for the steps after to report, as they always have.
        _ => Ok((conn, false)),
    }
}

/// Sets WAL mode, waiting out other connections as the busy timeout would.
///
/// On a new database the switch writes the file's header: SQLite takes a read lock, then upgrades
/// it, and does not call the busy handler for that upgrade (it could deadlock), so a second
/// process creating the same database at that moment got "database is locked" at once. Waiting
/// here is safe because nothing else is held on this connection yet.
fn switch_to_wal(conn: &Connection) -> rusqlite::Result<String> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)) {
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn get_meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

fn meta_string(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    Ok(get_meta(conn, key)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
}

impl Store {
    /// Opens (creating when needed, unless read-only) the database `config` names.
    ///
    /// Blocks the calling thread (file I/O, and for an encrypted database the passphrase's
    /// key derivation); from async code, call it in `tokio::task::spawn_blocking`.
    ///
    /// Errors: the file cannot be created; it is not an event database or is damaged; it is
    /// encrypted and no passphrase was given, or the wrong one; a new encrypted database has no
    /// key source.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        let path = config.path.clone();
        if path.is_dir() {
            return Err(StoreError::Open {
                path,
                detail: "is a folder, not a database file".into(),
            });
        }
        if (config.read_only || config.must_exist) && !path.exists() {
            return Err(StoreError::NotFound { path });
        }
        // SQLite puts `NAME-wal` and `NAME-shm` beside the database, and the store its run
        // claims in `NAME-runs/`: a name that leaves no room for them would be created and then
        // be of no use.
        let name_len = path.file_name().map_or(0, |n| n.len());
        if !config.read_only && name_len > MAX_DB_NAME_BYTES {
            return Err(StoreError::Open {
                path,
                detail: format!(
                    "a database's file name may have at most {MAX_DB_NAME_BYTES} bytes (this one \
                     has {name_len}), leaving room for the -wal, -shm and -runs beside it"
                ),
            });
        }
        if !config.read_only
            && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                path: path.clone(),
                detail: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        if !config.read_only
            && matches!(std::fs::symlink_metadata(&path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
        {
            create_whole(&config)?;
        }
        refuse_planted_journal(&path)?;
        let flags = if config.read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let open = |flags| {
            Connection::open_with_flags(&path, flags).map_err(|e| {
                match sqlite_error(&path, e, None) {
                    StoreError::Sqlite { path, detail } => StoreError::Open { path, detail },
                    other => other,
                }
            })
        };
        let (conn, immutable) = if config.read_only {
            open_reader(&path)?
        } else {
            (open(flags)?, false)
        };
        if !config.read_only {
            refuse_foreign(&conn, &path)?;
        } else if is_blank(&conn, &path)? {
            // An empty file (created by hand, or by a writer that has not committed its tables
            // yet) holds no event database: saying it is damaged would send a user looking for
            // damage.
            return Err(StoreError::NotFound { path });
        }
        set_pragmas(&conn, &path, !config.read_only)?;
        if !config.read_only {
            init_schema(&conn, &config)?;
        }
        let cipher = unlock(&conn, &config)?.map(Arc::new);
        // A reader opens a damaged head too, so that verify can say what is wrong with it.
        let head = match read_head(&conn, &path) {
            Err(StoreError::Damaged { .. }) if config.read_only => None,
            other => other?,
        };
        if !config.read_only {
            // The next commit would record a new head over the evidence of the cut.
            check_tail(&conn, &path, cipher.as_deref())?;
        }
        let (last_tx, last_rx) = watch::channel(head.map_or(0, |h| h.0));

        let counters = Arc::new(WriterCounters::default());
        let (tx, sealer, writer) = if config.read_only {
            (None, None, None)
        } else {
            let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
            let writer_conn = conn;
            let wpath = path.clone();
            let replies = match config.durability {
                Durability::Full => {
                    Replies::AfterSync(WalSyncer::start(&path, last_tx, counters.clone())?)
                }
                Durability::Normal => {
                    writer_conn
                        .execute_batch(NORMAL_CHECKPOINT)
                        .map_err(|e| sqlite_error(&path, e, None))?;
                    Replies::AtCommit(last_tx)
                }
            };
            let handle = std::thread::Builder::new()
                .name("agent-runtime-store-writer".into())
                .spawn({
                    let counters = counters.clone();
                    let cipher = cipher.clone();
                    move || writer_loop(writer_conn, wpath, rx, replies, counters, cipher)
                })
                .map_err(|e| StoreError::Open {
                    path: path.clone(),
                    detail: format!("cannot start writer thread: {e}"),
                })?;
            match &cipher {
                Some(cipher) => {
                    let (entry, sealer) = start_sealer(&path, cipher.clone(), tx)?;
                    (Some(entry), Some(sealer), Some(handle))
                }
                None => (Some(tx), None, Some(handle)),
            }
        };
        let reader = if config.read_only {
            read_only_connection(&path, immutable).map_err(|e| {
                match sqlite_error(&path, e, None) {
                    StoreError::Sqlite { path, detail } => StoreError::Open { path, detail },
                    other => other,
                }
            })?
        } else {
            open(OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)?
        };
        set_pragmas(&reader, &path, false)?;

        Ok(Store {
            inner: Arc::new(Inner {
                path,
                cipher,
                max_payload_bytes: config.max_payload_bytes,
                reader: Mutex::new(reader),
                immutable,
                tx,
                sealer,
                writer,
                last_seq: last_rx,
                counters,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Group commits and events written by this store's writer since it was opened.
    pub fn writer_stats(&self) -> WriterStats {
        use std::sync::atomic::Ordering::Relaxed;
        WriterStats {
            commits: self.inner.counters.commits.load(Relaxed),
            events: self.inner.counters.events.load(Relaxed),
            syncs: self.inner.counters.syncs.load(Relaxed),
            writer_cpu_ns: cpu_figure(self.inner.counters.writer_cpu_ns.load(Relaxed)),
            sync_cpu_ns: cpu_figure(self.inner.counters.sync_cpu_ns.load(Relaxed)),
        }
    }

    /// Claims `run_id` for this process (see
    /// [`EventSink::claim_run`](agent_runtime_core::EventSink::claim_run)): an exclusive lock on
    /// the file `PATH-runs/RUN_ID` next to the database, which the OS releases when the file is
    /// closed or the process dies. The file holds the claiming process's id, which a refused
    /// claim names. Dropping the [`RunLock`] removes the file (on Unix; elsewhere it stays).
    ///
    /// Errors: [`StoreError::RunClaimed`] while another claim on the run lives (in any process);
    /// [`StoreError::ReadOnly`] on a read-only store; [`StoreError::Open`] when the folder or
    /// the file cannot be made.
    pub fn claim_run(&self, run_id: RunId) -> Result<RunLock, StoreError> {
        use std::io::{Read, Seek, Write};
        if self.inner.tx.is_none() {
            return Err(StoreError::ReadOnly {
                path: self.inner.path.clone(),
            });
        }
        let path = self.claim_path(run_id);
        let dir = path.parent().unwrap_or(Path::new("."));
        let failed = |e: std::io::Error| StoreError::Open {
            path: self.inner.path.clone(),
            detail: format!("cannot claim run {run_id} through {}: {e}", path.display()),
        };
        std::fs::create_dir_all(dir).map_err(failed)?;
        // A holder removes the file before it unlocks it: a lock taken on a file the path no
        // longer names is worthless, and the claim starts over on the path's new file. A probe
        // ([`Store::run_is_claimed`]) holds the lock for microseconds: a few short waits keep
        // it from refusing a claim, while a driver holds the lock for its whole run.
        let mut waits = 0;
        for _ in 0..100 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(failed)?;
            match file.try_lock() {
                Ok(()) => {
                    if !names_file(&path, &file) {
                        continue;
                    }
                    // The holder's process id, for the message of a refused claim; the claim
                    // holds without it.
                    let _ = file
                        .set_len(0)
                        .and_then(|()| file.rewind())
                        .and_then(|()| write!(file, "{}", std::process::id()))
                        .and_then(|()| file.flush());
                    return Ok(RunLock { _file: file, path });
                }
                Err(std::fs::TryLockError::WouldBlock) if waits < 20 => {
                    waits += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    return Err(StoreError::RunClaimed {
                        path: self.inner.path.clone(),
                        run_id: run_id.to_string(),
                        holder: if holder.chars().all(|c| c.is_ascii_digit()) && !holder.is_empty()
                        {
                            format!("process {holder}")
                        } else {
                            "another process".to_string()
                        },
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(failed(e)),
            }
        }
        Err(failed(std::io::Error::other(
            "the claim file kept being replaced",
        )))
    }

    /// [`Store::claim_run`] for a run about to be created: refused with
    /// [`StoreError::RunExists`] when the database already holds events of `run_id`. The check
    /// runs under the claim, so no other process can start the run in between.
    pub fn claim_new_run(&self, run_id: RunId) -> Result<RunLock, StoreError> {
        let lock = self.claim_run(run_id)?;
        if self.has_run(run_id)? {
            return Err(StoreError::RunExists {
                path: self.inner.path.clone(),
                run_id: run_id.to_string(),
            });
        }
        Ok(lock)
    }

    /// Every run id the database holds events of (workforce runs, and the ids a gateway
    /// records its calls under), in byte order, which for the runtime's UUIDv7 ids is creation
    /// order to the millisecond. One pass over an index.
    pub fn run_ids(&self) -> Result<Vec<RunId>, StoreError> {
        self.run_ids_by("SELECT DISTINCT run_id FROM frame_runs ORDER BY run_id")
    }

    /// Every run id the database holds events of, in the order of each run's first event in
    /// the log: the last is the run that began last, whatever its id or its events' times say
    /// (a simulation's run carries a virtual time). One pass over an index.
    pub fn run_ids_in_log_order(&self) -> Result<Vec<RunId>, StoreError> {
        self.run_ids_by(
            "SELECT run_id, min(first_seq) AS first FROM frame_runs GROUP BY run_id ORDER BY first, run_id",
        )
    }

    /// The run ids `sql` selects (in its first column), in its order.
    fn run_ids_by(&self, sql: &str) -> Result<Vec<RunId>, StoreError> {
        let conn = self.inner.reader.lock().unwrap_or_else(|p| p.into_inner());
        let failed = |e| crate::error::sqlite_error(&self.inner.path, e, None);
        let mut st = conn.prepare_cached(sql).map_err(failed)?;
        let rows = st
            .query_map([], |row| row.get::<_, Vec<u8>>(0))
            .map_err(failed)?;
        let mut out = Vec::new();
        for row in rows {
            let bytes = row.map_err(failed)?;
            // A row that is not 16 bytes was not written by this store; verify reports it.
            if let Ok(b) = <[u8; 16]>::try_from(bytes.as_slice()) {
                out.push(RunId::from_bytes(b));
            }
        }
        Ok(out)
    }

    /// Whether the database holds any event of `run_id` (one index lookup).
    pub fn has_run(&self, run_id: RunId) -> Result<bool, StoreError> {
        let conn = self.inner.reader.lock().unwrap_or_else(|p| p.into_inner());
        conn.prepare_cached("SELECT 1 FROM frame_runs WHERE run_id = ?1 LIMIT 1")
            .and_then(|mut st| st.exists([&run_id.as_bytes()[..]]))
            .map_err(|e| crate::error::sqlite_error(&self.inner.path, e, None))
    }

    /// Whether some process holds a claim on `run_id` now (see [`Store::claim_run`]): a run
    /// that has not ended is being driven when it is claimed, and was interrupted when not.
    /// Works on a read-only store. The probe takes a shared lock for an instant, which a claim
    /// made in that instant waits out.
    pub fn run_is_claimed(&self, run_id: RunId) -> Result<bool, StoreError> {
        let path = self.claim_path(run_id);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                return Err(StoreError::Open {
                    path: self.inner.path.clone(),
                    detail: format!("cannot read the claim {}: {e}", path.display()),
                });
            }
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(false),
            Err(std::fs::TryLockError::WouldBlock) => Ok(true),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Open {
                path: self.inner.path.clone(),
                detail: format!("cannot probe the claim {}: {e}", path.display()),
            }),
        }
    }

    /// `PATH-runs/RUN_ID`, where a run's claim lives.
    fn claim_path(&self, run_id: RunId) -> PathBuf {
        beside(&self.inner.path, "-runs").join(run_id.to_string())
    }

    /// Whether payloads are sealed.
    pub fn is_encrypted(&self) -> bool {
        self.inner.cipher.is_some()
    }

    fn prepare(&self, event: EncodedEvent) -> Result<Prepared, StoreError> {
        // Nanoseconds fit i64 until 2262; a later time could not be stored as the hash and the
        // seal saw it, so the event is refused rather than made unreadable.
        let time_ns = i64::try_from(event.time().as_unix_nanos()).map_err(|_| {
            StoreError::TimeOutOfRange {
                time: event.time().to_string(),
            }
        })?;
        let size = event.payload_json().len();
        if size > self.inner.max_payload_bytes {
            return Err(StoreError::TooLarge {
                size,
                limit: self.inner.max_payload_bytes,
            });
        }
        // An encrypted store's payloads are sealed by its sealer thread, not here on the
        // producer's (see `start_sealer`).
        Ok(Prepared {
            time_ns,
            event,
            sealed: None,
        })
    }

    /// Appends `events` as one batch; returns once the batch is durable (see [`Durability`]).
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, StoreError> {
        self.append_encoded(events.into_iter().map(EncodedEvent::new).collect())
            .await
    }

    /// [`Store::append`] for events already encoded (see [`EncodedEvent`]): their canonical
    /// bytes are hashed and stored as they are.
    pub async fn append_encoded(
        &self,
        events: Vec<EncodedEvent>,
    ) -> Result<Vec<Appended>, StoreError> {
        self.queue(events, None).await?.await
    }

    /// Queues `events` as the next batch of `stream` and returns once it is queued, before it
    /// is durable; the returned [`PendingBatch`] resolves as [`Store::append_encoded`] would
    /// have. See [`EventSink::submit_encoded`](agent_runtime_core::EventSink::submit_encoded)
    /// for the promises: batches keep the order of their calls, and once one of `stream`'s
    /// batches fails, the stream's later batches are refused ([`StoreError::StreamFailed`]).
    ///
    /// ```
    /// # use agent_runtime_core::{Actor, AppendStream, EncodedEvent, EventKind, NewEvent, RunId, Timestamp};
    /// # use agent_runtime_store::{Store, StoreConfig};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = Store::open(StoreConfig::plaintext(dir.path().join("events.db"))).unwrap();
    /// let note = |i: u64| EncodedEvent::new(NewEvent {
    ///     run_id: RunId::from_bytes([1; 16]), task_id: None, actor: Actor::System,
    ///     kind: EventKind::Note, time: Timestamp::from_unix_nanos(i),
    ///     payload: serde_json::json!({"i": i}) });
    /// let stream = AppendStream::new();
    /// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    /// rt.block_on(async {
    ///     let first = store.submit_encoded(vec![note(1), note(2)], &stream).await.unwrap();
    ///     let second = store.submit_encoded(vec![note(3)], &stream).await.unwrap();
    ///     assert_eq!(second.await.unwrap()[0].seq, 3);
    ///     assert_eq!(first.await.unwrap()[1].seq, 2);
    /// });
    /// ```
    pub async fn submit_encoded(
        &self,
        events: Vec<EncodedEvent>,
        stream: &AppendStream,
    ) -> Result<PendingBatch, StoreError> {
        if let Some(cause) = stream.failure() {
            return Err(StoreError::StreamFailed {
                path: self.inner.path.clone(),
                cause: cause.to_string(),
            });
        }
        self.queue(events, Some(stream.clone())).await
    }

    async fn queue(
        &self,
        events: Vec<EncodedEvent>,
        stream: Option<AppendStream>,
    ) -> Result<PendingBatch, StoreError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let pending = PendingBatch {
            reply: reply_rx,
            path: self.inner.path.clone(),
        };
        if events.is_empty() {
            let _ = reply_tx.send(Ok(Vec::new()));
            return Ok(pending);
        }
        // A batch refused here was never queued, and its producer learns so before it can
        // submit another: the stream need not fail. (A loop rather than `collect` into a
        // `Result`, which cannot size the vector ahead and grows it by copying: a few percent
        // of the simulator's CPU time with the store.)
        let mut prepared = Vec::with_capacity(events.len());
        for event in events {
            prepared.push(self.prepare(event)?);
        }
        let tx = self.inner.tx.as_ref().ok_or_else(|| StoreError::ReadOnly {
            path: self.inner.path.clone(),
        })?;
        tx.send(WriteRequest {
            events: prepared,
            stream,
            reply: Reply::Async(reply_tx),
        })
        .await
        .map_err(|_| StoreError::WriterGone {
            path: self.inner.path.clone(),
            detail: "queue closed".into(),
        })?;
        Ok(pending)
    }

    /// [`Store::append`] for code without an async runtime. Blocks the calling thread.
    pub fn append_blocking(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, StoreError> {
        crate::block_on::block_on(self.append(events))
    }

    /// The events matching `query`, in sequence order, payloads decrypted.
    pub fn query_blocking(&self, query: &EventQuery) -> Result<Vec<Envelope>, StoreError> {
        let conn = self.inner.reader.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        scan_events(&conn, &self.inner.path, query, &mut |r| {
            out.push(self.decode(&r)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Where the last `n` events matching `query` (its `after_seq` and `limit` aside) at or
    /// before sequence number `up_to` begin: the `after_seq` that reads them (the sequence
    /// number before the first of them), or `up_to` when none matches. What `audit tail`
    /// starts from.
    ///
    /// Walks back from `up_to` in windows that double in size, each read only up to where the
    /// one before began and without decoding payloads: the cost is that of the events walked
    /// over, where reading each window to the end of the log made a rare filter quadratic
    /// (2.5 minutes for 4 million events).
    pub fn start_of_last(
        &self,
        query: &EventQuery,
        n: usize,
        up_to: u64,
    ) -> Result<u64, StoreError> {
        if n == 0 {
            return Ok(up_to);
        }
        let conn = self.inner.reader.lock().unwrap_or_else(|p| p.into_inner());
        let mut hi = up_to;
        let mut window = 4096u64;
        // Newest first: sequence numbers of matches found so far.
        let mut found: Vec<u64> = Vec::new();
        while hi > 0 && found.len() < n {
            let lo = hi.saturating_sub(window);
            let mut q = query.clone();
            q.after_seq = Some(lo);
            q.limit = None;
            let mut page = Vec::new();
            scan_events(&conn, &self.inner.path, &q, &mut |r| {
                if r.seq > hi {
                    return Ok(false);
                }
                page.push(r.seq);
                Ok(true)
            })?;
            found.extend(page.iter().rev().take(n - found.len()));
            hi = lo;
            window = (window * 2).min(1 << 20);
        }
        Ok(found.last().map_or(up_to, |first| first - 1))
    }

    /// The plaintext canonical payload of a record, decrypted into `scratch` when sealed.
    pub(crate) fn open_payload_into<'a>(
        &self,
        r: &EventRecord<'a>,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], StoreError> {
        match &self.inner.cipher {
            None => Ok(r.payload),
            Some(c) => {
                if c.open_into(r.payload, r.header, scratch) {
                    Ok(scratch)
                } else {
                    Err(StoreError::BadEvent {
                        path: self.inner.path.clone(),
                        seq: r.seq,
                        detail: "payload does not decrypt (tampered, or sealed under another key)"
                            .into(),
                    })
                }
            }
        }
    }

    pub(crate) fn decode(&self, r: &EventRecord<'_>) -> Result<Envelope, StoreError> {
        let bad = |detail: String| StoreError::BadEvent {
            path: self.inner.path.clone(),
            seq: r.seq,
            detail,
        };
        let mut scratch = Vec::new();
        let plain = self.open_payload_into(r, &mut scratch)?;
        let payload =
            serde_json::from_slice(plain).map_err(|e| bad(format!("payload is not JSON: {e}")))?;
        let actor: Actor = r.actor.parse().map_err(|e| bad(format!("{e}")))?;
        let kind = EventKind::read(r.kind).map_err(|e| bad(format!("{e}")))?;
        Ok(Envelope {
            seq: r.seq,
            run_id: RunId::from_bytes(r.run_id),
            task_id: r.task_id.map(TaskId::from_bytes),
            actor,
            kind,
            time: Timestamp::from_unix_nanos(r.time_ns),
            payload,
            prev_hash: Hash32::from_slice(r.prev_hash)
                .ok_or_else(|| bad("prev_hash is not 32 bytes".into()))?,
            hash: Hash32::from_slice(r.hash).ok_or_else(|| bad("hash is not 32 bytes".into()))?,
        })
    }

    /// The sequence number and hash of the newest event, if any.
    pub fn head(&self) -> Result<Option<(u64, Hash32)>, StoreError> {
        let conn = self.inner.reader.lock().unwrap_or_else(|p| p.into_inner());
        read_head(&conn, &self.inner.path)
    }

    /// Follows the log: returns events after `after_seq` matching `query`, waiting up to
    /// `wait` for new ones to be committed (by this process, or by another: those are noticed
    /// by polling within `wait`). An empty result means nothing new in time. Refused on a store
    /// read as immutable (a reader on read-only media, see `Store::open`), which would never
    /// see new events.
    pub fn follow_blocking(
        &self,
        query: &EventQuery,
        after_seq: u64,
        wait: Duration,
    ) -> Result<Vec<Envelope>, StoreError> {
        // Read as immutable (read-only media), the file is never looked at anew: a writer's
        // later events would not be seen, and following would wait forever saying nothing.
        if self.inner.immutable {
            return Err(StoreError::Open {
                path: self.inner.path.clone(),
                detail: "it is read as an immutable file (its folder cannot hold the files a \
                         live reader needs), so new events would not be seen; follow it from a \
                         folder you can write"
                    .into(),
            });
        }
        let mut q = query.clone();
        q.after_seq = Some(after_seq.max(query.after_seq.unwrap_or(0)));
        let found = self.query_blocking(&q)?;
        if !found.is_empty() {
            return Ok(found);
        }
        let mut rx = self.inner.last_seq.clone();
        let seen = *rx.borrow_and_update();
        // Wait for an in-process commit, or for the poll interval to pass. A read-only store
        // has no writer, so nothing will ever notify: then just wait the interval.
        let waited = crate::block_on::block_on_timeout(
            async { rx.wait_for(|s| *s > seen).await.map(|_| ()) },
            wait,
        );
        if matches!(waited, Some(Err(_))) {
            std::thread::sleep(wait);
        }
        self.query_blocking(&q)
    }
}

/// Whether the file has no tables at all: empty, or a new database whose creator has not
/// committed its tables yet.
fn is_blank(conn: &Connection, path: &Path) -> Result<bool, StoreError> {
    conn.query_row("SELECT count(*) = 0 FROM sqlite_master", [], |r| r.get(0))
        .map_err(|e| sqlite_error(path, e, None))
}

/// Refuses a database with a rollback journal beside it (`NAME-journal`, not empty). An event
/// log is in WAL mode from its creation (built under another name), so SQLite never writes one
/// for it; one that is there was put there, and SQLite would play it back at the next open,
/// rewriting the log's pages as whoever wrote it chose (a command with write access to the
/// folder replaced the end of the log that way, and verify said ok).
fn refuse_planted_journal(path: &Path) -> Result<(), StoreError> {
    let journal = beside(path, "-journal");
    match std::fs::metadata(&journal) {
        Ok(m) if m.len() > 0 => Err(StoreError::Damaged {
            path: path.to_path_buf(),
            after_seq: None,
            detail: format!(
                "a rollback journal lies beside it ({}), which SQLite never writes for an event \
                 log (it is in WAL mode) and would play back over its pages: it was put there. \
                 Nothing was opened; keep the journal as evidence, move it away and run `audit \
                 verify`",
                journal.display()
            ),
        }),
        _ => Ok(()),
    }
}

/// Refuses an existing SQLite file that is not an event database (it has tables of its own),
/// before anything (journal mode, schema, format marker) is written into it.
fn refuse_foreign(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let foreign: Option<String> = conn
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' \
             AND name NOT IN ('meta', 'events', 'frames', 'frame_runs') AND name NOT LIKE 'sqlite_%' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| sqlite_error(path, e, None))?;
    match foreign {
        Some(table) => Err(StoreError::NotEventDatabase {
            path: path.to_path_buf(),
            detail: format!("it has a table `{table}`"),
        }),
        None => Ok(()),
    }
}

/// Creates the database `config` names, which does not exist yet, whole or not at all: it is
/// built under a temporary name beside it and hard-linked into place. So a creation that fails
/// (no key for an encrypted database, a full disk) leaves no file that later reads as "no event
/// database", and no process ever opens half a database. When another process creates the same
/// database meanwhile, its link wins and this one's copy is dropped: both then open the same
/// file, as [`Store::open`] allows.
fn create_whole(config: &StoreConfig) -> Result<(), StoreError> {
    let path = &config.path;
    // Leftovers of creators killed mid-way; then a name unique to this call (threads of one
    // process may create the same database at once).
    agent_runtime_core::fs::remove_stale_temps(path, "creating");
    let tmp = agent_runtime_core::fs::temp_beside(path, "creating");
    let remove_tmp = || {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(beside(&tmp, suffix));
        }
    };
    // A leftover of a crashed process that had this process id and count.
    remove_tmp();
    // Held (locked) until the end: while it is, other openers know this creation is alive,
    // and once this process is gone (Ctrl-C mid-way) they remove what it left at once.
    // SQLite opens the empty file as a new database.
    let _held = agent_runtime_core::fs::create_locked_temp(&tmp).map_err(|e| StoreError::Open {
        path: path.clone(),
        detail: format!("cannot create {}: {e}", tmp.display()),
    })?;
    let failed = |detail: String| StoreError::Open {
        path: path.clone(),
        detail,
    };
    // The OS keyring entry this creation made, removed unless this creation's file is the one
    // linked into place: a creation that fails or loses the race leaves no key behind.
    let mut keyring_entry: Option<String> = None;
    let forget_key = |entry: Option<String>| {
        if let Some(key_id) = entry {
            crate::keyring::delete_kek(&key_id);
        }
    };
    let built = (|| {
        let conn = Connection::open_with_flags(
            &tmp,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| failed(format!("cannot create {}: {e}", tmp.display())))?;
        set_pragmas(&conn, path, true)?;
        keyring_entry = init_schema(&conn, config)?;
        // Closing the last connection checkpoints the write-ahead log into the file.
        conn.close().map_err(|(_, e)| sqlite_error(path, e, None))
    })();
    if let Err(e) = built {
        remove_tmp();
        forget_key(keyring_entry);
        return Err(e);
    }
    let linked = std::fs::hard_link(&tmp, path);
    // A link that reports EEXIST may still be ours (a retried link on a network file system):
    // the key is forgotten only when the file in place is another creator's.
    let ours = match &linked {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => same_file(&tmp, path),
        Err(_) => false,
    };
    remove_tmp();
    if !ours {
        forget_key(keyring_entry);
    }
    match linked {
        Ok(()) => {
            // The new name is durable once its folder is.
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let _ = std::fs::File::open(dir.unwrap_or(Path::new("."))).and_then(|d| d.sync_all());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        // A file system without hard links (FAT, some network mounts): create in place, as
        // the opener does with a blank file.
        Err(_) => Ok(()),
    }
}

/// Writes the schema and, for a new database, its format marker and keys. Returns the id of the
/// OS keyring entry it made, if it made one (removed again when it fails).
/// The longest file name an event database may have: file systems take 255 bytes, and the
/// store puts `NAME-runs` (5 more) beside it.
pub const MAX_DB_NAME_BYTES: usize = 250;

/// Whether two paths name one file (the same device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn init_schema(conn: &Connection, config: &StoreConfig) -> Result<Option<String>, StoreError> {
    let path = &config.path;
    let err = |e| sqlite_error(path, e, None);
    // IMMEDIATE: two processes creating the same database at once serialize here.
    conn.execute_batch("BEGIN IMMEDIATE").map_err(err)?;
    let mut keyring_entry: Option<String> = None;
    let result = (|| -> Result<(), StoreError> {
        conn.execute_batch(SCHEMA).map_err(err)?;
        match meta_string(conn, "format").map_err(err)? {
            Some(f) if is_known_format(&f) => return Ok(()),
            Some(f) => {
                return Err(StoreError::Format {
                    path: path.clone(),
                    found: f,
                    expected: FORMATS_READ.into(),
                });
            }
            None => {}
        }
        let put = |k: &str, v: &[u8]| {
            conn.execute(
                "INSERT INTO meta(key, value) VALUES (?1, ?2)",
                params![k, v],
            )
            .map(|_| ())
        };
        let format = match config.encryption {
            Encryption::Plaintext => FORMAT,
            Encryption::Encrypted => FORMAT_HEAD_TAGGED,
        };
        put("format", format.as_bytes()).map_err(err)?;
        match config.encryption {
            Encryption::Plaintext => put("encryption", b"none").map_err(err)?,
            Encryption::Encrypted => {
                let no_key = |detail: String| StoreError::Open {
                    path: path.clone(),
                    detail: format!("cannot create its key: {detail}"),
                };
                let mut data_key = zeroize::Zeroizing::new([0u8; 32]);
                crypto::key_material(data_key.as_mut()).map_err(no_key)?;
                put("encryption", b"xchacha20poly1305").map_err(err)?;
                match &config.passphrase {
                    Some(pass) => {
                        let mut salt = [0u8; 16];
                        crypto::key_material(&mut salt).map_err(no_key)?;
                        let kek = crypto::derive_kek(pass.as_bytes(), &salt, config.kdf).map_err(
                            |d| StoreError::Open {
                                path: path.clone(),
                                detail: format!("key derivation failed: {d}"),
                            },
                        )?;
                        let kdf = serde_json::to_vec(&config.kdf).unwrap_or_default();
                        put("key_source", b"passphrase-argon2id").map_err(err)?;
                        put("kdf", &kdf).map_err(err)?;
                        put("salt", &salt).map_err(err)?;
                        put("wrapped_key", &crypto::wrap_key(&kek, &data_key)).map_err(err)?;
                    }
                    None if config.use_keyring => {
                        let mut id = [0u8; 16];
                        crypto::key_material(&mut id).map_err(no_key)?;
                        let key_id = hex::encode(id);
                        let kek = crate::keyring::create_kek(&key_id).map_err(|detail| {
                            StoreError::NoKeyForNewDatabase {
                                path: path.clone(),
                                keyring: Some(detail),
                            }
                        })?;
                        keyring_entry = Some(key_id.clone());
                        put("key_source", b"os-keyring").map_err(err)?;
                        put("key_id", key_id.as_bytes()).map_err(err)?;
                        put("wrapped_key", &crypto::wrap_key(&kek, &data_key)).map_err(err)?;
                    }
                    None => {
                        return Err(StoreError::NoKeyForNewDatabase {
                            path: path.clone(),
                            keyring: None,
                        });
                    }
                }
            }
        }
        Ok(())
    })();
    match result.and_then(|()| conn.execute_batch("COMMIT").map_err(err)) {
        Ok(()) => Ok(keyring_entry),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            if let Some(key_id) = keyring_entry {
                crate::keyring::delete_kek(&key_id);
            }
            Err(e)
        }
    }
}

fn unlock(conn: &Connection, config: &StoreConfig) -> Result<Option<PayloadCipher>, StoreError> {
    let path = &config.path;
    let not_ours = |detail: String| StoreError::Damaged {
        path: path.clone(),
        after_seq: None,
        detail,
    };
    let err = |e| sqlite_error(path, e, None);
    let foreign = |detail: String| StoreError::NotEventDatabase {
        path: path.clone(),
        detail,
    };
    let format = meta_string(conn, "format").map_err(|e| match e {
        rusqlite::Error::SqliteFailure(..) => match sqlite_error(path, e, None) {
            StoreError::Sqlite { detail, .. } => foreign(detail),
            other => other,
        },
        e => err(e),
    })?;
    match format {
        Some(f) if is_known_format(&f) => {}
        Some(f) => {
            return Err(StoreError::Format {
                path: path.clone(),
                found: f,
                expected: FORMATS_READ.into(),
            });
        }
        None => return Err(foreign("no format marker".into())),
    }
    let encryption = meta_string(conn, "encryption")
        .map_err(err)?
        .unwrap_or_default();
    match encryption.as_str() {
        "none" => Ok(None),
        "xchacha20poly1305" => {
            let missing = |what: &str| not_ours(format!("encryption metadata {what} is missing"));
            let wrapped = get_meta(conn, "wrapped_key")
                .map_err(err)?
                .ok_or_else(|| missing("wrapped_key"))?;
            let source = meta_string(conn, "key_source")
                .map_err(err)?
                .unwrap_or_else(|| "passphrase-argon2id".into());
            let kek = match source.as_str() {
                "os-keyring" => {
                    let key_id = meta_string(conn, "key_id")
                        .map_err(err)?
                        .ok_or_else(|| missing("key_id"))?;
                    crate::keyring::load_kek(&key_id).map_err(|detail| StoreError::Keyring {
                        path: path.clone(),
                        detail,
                    })?
                }
                "passphrase-argon2id" => {
                    let pass = config
                        .passphrase
                        .as_ref()
                        .ok_or_else(|| StoreError::MissingKey { path: path.clone() })?;
                    let salt = get_meta(conn, "salt")
                        .map_err(err)?
                        .ok_or_else(|| missing("salt"))?;
                    let kdf: KdfParams = get_meta(conn, "kdf")
                        .map_err(err)?
                        .and_then(|v| serde_json::from_slice(&v).ok())
                        .ok_or_else(|| missing("kdf"))?;
                    crypto::derive_kek(pass.as_bytes(), &salt, kdf)
                        .map_err(|d| not_ours(format!("bad key derivation parameters: {d}")))?
                }
                // Written by a newer build, or damaged: guessing would only fail later.
                other => {
                    return Err(StoreError::Format {
                        path: path.clone(),
                        found: format!("key source {other:?}"),
                        expected: "os-keyring or passphrase-argon2id".into(),
                    });
                }
            };
            let (data_key, head_required) = crypto::unwrap_key(&kek, &wrapped)
                .ok_or_else(|| StoreError::WrongKey { path: path.clone() })?;
            Ok(Some(PayloadCipher::new(&data_key, head_required)))
        }
        other => Err(StoreError::Format {
            path: path.clone(),
            found: format!("encryption {other:?}"),
            expected: "none or xchacha20poly1305".into(),
        }),
    }
}

pub(crate) fn read_head(
    conn: &Connection,
    path: &Path,
) -> Result<Option<(u64, Hash32)>, StoreError> {
    // Columns of the wrong type (NULL, text) are read as absent and reported as damage below,
    // not as SQLite's "Invalid column type" naming no event.
    // first_seq, last_seq, last_hash, each absent when not of its type.
    type HeadRow = (Option<i64>, Option<i64>, Option<Vec<u8>>);
    let row: Option<HeadRow> = conn
        .query_row(
            "SELECT first_seq, last_seq, last_hash FROM frames ORDER BY first_seq DESC LIMIT 1",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0).ok(),
                    r.get::<_, i64>(1).ok(),
                    r.get::<_, Vec<u8>>(2).ok(),
                ))
            },
        )
        .optional()
        .map_err(|e| sqlite_error(path, e, None))?;
    // A malformed head must not become a fresh start: chaining onto it would hide the damage.
    let damaged = |detail: String| StoreError::Damaged {
        path: path.to_path_buf(),
        after_seq: None,
        detail,
    };
    row.map(|(first, last, hash)| {
        match (
            last.and_then(|s| u64::try_from(s).ok()),
            hash.as_deref().and_then(Hash32::from_slice),
        ) {
            (Some(seq), Some(hash)) => Ok((seq, hash)),
            (Some(seq), None) => Err(damaged(format!(
                "the newest event (sequence {seq}) has a missing or malformed hash"
            ))),
            (None, _) => Err(damaged(format!(
                "the newest frame (from sequence {}) has no readable last sequence number",
                first.map_or("?".to_string(), |f| f.to_string())
            ))),
        }
    })
    .transpose()
}

/// Refuses a log whose end was cut off: the head recorded in the same transaction as the
/// newest events is past the newest event present (`present`), which no commit, crash or
/// rollback leaves, only a change behind the store's back. A writer would record a new head over
/// that evidence, and a bundle would hand out the shorter chain as a whole one.
///
/// In an encrypted log whose head is tagged (format 3), the head present must also carry the
/// tag its writer made: a log cut short with its recorded head lowered to match, or rewritten,
/// by someone without the key is refused alike.
pub(crate) fn check_tail(
    conn: &Connection,
    path: &Path,
    cipher: Option<&PayloadCipher>,
) -> Result<(), StoreError> {
    // One read transaction: both heads from one snapshot, though other processes commit.
    let tx = conn
        .unchecked_transaction()
        .map_err(|e| sqlite_error(path, e, None))?;
    let head = read_head(&tx, path)?;
    let present = head.map_or(0, |h| h.0);
    let recorded = read_recorded_head(&tx, path)?;
    let tag = read_head_tag(&tx, path)?;
    drop(tx);
    match recorded {
        Some(recorded) if recorded > present => Err(StoreError::Damaged {
            path: path.to_path_buf(),
            after_seq: Some(present),
            detail: format!(
                "it records {recorded} events but only {present} are present: its end was cut \
                 off. Nothing is written to it or bundled from it, so that the evidence stays; \
                 `audit verify` reports it, and `audit export --format jsonl` still reads what \
                 is left"
            ),
        }),
        _ => Ok(()),
    }?;
    if let (Some(cipher), Some((seq, hash))) = (cipher.filter(|c| c.head_required), head)
        && tag.as_deref() != Some(&cipher.head_tag(seq, &hash.0)[..])
    {
        return Err(StoreError::Damaged {
            path: path.to_path_buf(),
            after_seq: Some(present),
            detail: "its newest event is not the head its writer tagged: events were cut off its \
                     end, or it was rewritten, by someone without its key. Nothing is written to \
                     it or bundled from it, so that the evidence stays; `audit verify` reports it"
                .into(),
        });
    }
    Ok(())
}

/// The head recorded in `meta` at each commit: lets verify notice events cut off the end.
pub(crate) fn read_recorded_head(
    conn: &Connection,
    path: &Path,
) -> Result<Option<u64>, StoreError> {
    let v = get_meta(conn, "head_seq").map_err(|e| sqlite_error(path, e, None))?;
    Ok(v.and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(u64::from_be_bytes))
}

/// The tag of the head that the writer recorded with it (an encrypted log of format 3).
pub(crate) fn read_head_tag(conn: &Connection, path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    get_meta(conn, "head_tag").map_err(|e| sqlite_error(path, e, None))
}

/// The SQL and arguments that select the frames which may hold events matching `query`, in
/// sequence order (see [`scan_events`]).
fn scan_sql(query: &EventQuery) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value as V;
    let after = query.after_seq.unwrap_or(0);
    // A frame holding a sequence number after `after` starts after this (frames are bounded).
    let lowest_start = i64::try_from(after.saturating_sub(MAX_FRAME_EVENTS)).unwrap_or(i64::MAX);
    let after_i = i64::try_from(after).unwrap_or(i64::MAX);
    let mut args: Vec<V> = Vec::new();
    let mut sql = match &query.run_id {
        Some(run) => {
            args.push(V::Blob(run.as_bytes().to_vec()));
            // CROSS JOIN keeps SQLite reading the run's frames, not every frame.
            "SELECT f.first_seq, f.last_seq, f.prev_hash, f.last_hash, f.body \
             FROM frame_runs r CROSS JOIN frames f ON f.first_seq = r.first_seq \
             WHERE r.run_id = ? AND r.first_seq > ?"
                .to_string()
        }
        None => format!("SELECT {FRAME_COLUMNS} FROM frames f WHERE f.first_seq > ?"),
    };
    args.push(V::Integer(lowest_start));
    sql.push_str(" AND f.last_seq > ?");
    args.push(V::Integer(after_i));
    let nanos = |t: Timestamp| i64::try_from(t.as_unix_nanos()).unwrap_or(i64::MAX);
    if let Some(t) = query.since {
        sql.push_str(" AND f.max_time >= ?");
        args.push(V::Integer(nanos(t)));
    }
    if let Some(t) = query.until {
        sql.push_str(" AND f.min_time < ?");
        args.push(V::Integer(nanos(t)));
    }
    // By the run index's own order when filtering by run: it is the same order (the join
    // equates the two), but SQLite does not see that for `f.first_seq` and sorted every
    // matching frame, blobs included, through a temporary B-tree first. A query of a run's
    // first page paid for sorting all of its frames.
    sql.push_str(if query.run_id.is_some() {
        " ORDER BY r.first_seq"
    } else {
        " ORDER BY f.first_seq"
    });
    (sql, args)
}

/// Hands every event matching `query` to `each`, in sequence order, until it returns
/// `Ok(false)` or an error, or `query.limit` events were handed. Frames are chosen by run
/// (through `frame_runs`), sequence and time range; each of their records is then filtered on
/// everything the query names. A record that cannot be read is `BadEvent` naming its sequence.
pub(crate) fn scan_events(
    conn: &Connection,
    path: &Path,
    query: &EventQuery,
    each: &mut dyn FnMut(EventRecord<'_>) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let after = query.after_seq.unwrap_or(0);
    let (sql, args) = scan_sql(query);
    let since = query.since.map(Timestamp::as_unix_nanos);
    let until = query.until.map(Timestamp::as_unix_nanos);
    let run = query.run_id.map(|r| *r.as_bytes());
    let mut remaining = query.limit.unwrap_or(usize::MAX);
    if remaining == 0 {
        return Ok(());
    }
    let mut stmt = conn
        .prepare_cached(&sql)
        .map_err(|e| sqlite_error(path, e, None))?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(args.iter()))
        .map_err(|e| sqlite_error(path, e, None))?;
    let mut last = None;
    let sql_error = |e, last| sqlite_error(path, e, last);
    while let Some(row) = rows.next().map_err(|e| sql_error(e, last))? {
        let first: i64 = row.get(0).map_err(|e| sql_error(e, last))?;
        let prev = row.get_ref(2).and_then(|v| Ok(v.as_blob()?));
        let body = row.get_ref(4).and_then(|v| Ok(v.as_blob()?));
        let (prev, body) = (
            prev.map_err(|e| sql_error(e, last))?,
            body.map_err(|e| sql_error(e, last))?,
        );
        for rec in crate::frame::records(u64::try_from(first).unwrap_or(0), prev, body) {
            let r = rec.map_err(|e| StoreError::BadEvent {
                path: path.to_path_buf(),
                seq: e.seq,
                detail: format!("its frame is damaged: {}", e.detail),
            })?;
            last = Some(r.seq);
            let wanted = r.seq > after
                && run.is_none_or(|id| id == r.run_id)
                && (query.kinds.is_empty() || query.kinds.iter().any(|k| k.as_str() == r.kind))
                && since.is_none_or(|t| r.time_ns >= t)
                && until.is_none_or(|t| r.time_ns < t);
            if !wanted {
                continue;
            }
            remaining -= 1;
            if !each(r)? || remaining == 0 {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// [`scan_events`] in batches of copied records, for readers that hand the work to other
/// threads. Events read before one that cannot be read are emitted before the error returns.
pub(crate) fn scan_batches(
    conn: &Connection,
    path: &Path,
    query: &EventQuery,
    batch_size: usize,
    emit: &mut dyn FnMut(Vec<RawRow>) -> bool,
) -> Result<(), StoreError> {
    let mut batch = Vec::with_capacity(batch_size);
    let mut stopped = false;
    let scanned = scan_events(conn, path, query, &mut |r| {
        batch.push(RawRow::from_record(&r));
        if batch.len() == batch_size
            && !emit(std::mem::replace(
                &mut batch,
                Vec::with_capacity(batch_size),
            ))
        {
            stopped = true;
        }
        Ok(!stopped)
    });
    if !stopped && !batch.is_empty() && !emit(batch) {
        return Ok(());
    }
    scanned
}

/// A run claimed by [`Store::claim_run`]. Dropping it removes the claim file (on Unix), then
/// unlocks it.
#[derive(Debug)]
pub struct RunLock {
    /// Held for its lock, which lives as long as the open file.
    _file: std::fs::File,
    path: PathBuf,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Removed while still locked (the file closes after this): a claimant that opened the
        // old file finds, once it gets the lock, that the path no longer names it, and starts
        // over (see `claim_run`). Windows cannot remove a file another process has open, so
        // the file stays there.
        #[cfg(unix)]
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether `path` names `file` now (Unix: same device and inode); elsewhere claim files are
/// never removed, so it always does.
fn names_file(path: &Path, file: &std::fs::File) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(path), file.metadata()) {
            (Ok(p), Ok(f)) => p.dev() == f.dev() && p.ino() == f.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, file);
        true
    }
}

/// Every file and folder of the event database at `db`: itself, SQLite's `-wal`, `-shm` and
/// `-journal`, and the run claims' `-runs` (what a gateway keeps its tools from changing).
///
/// ```
/// let files = agent_runtime_store::database_files(std::path::Path::new("/d/e.db"));
/// assert_eq!(files[1], std::path::Path::new("/d/e.db-wal"));
/// assert_eq!(files.len(), 5);
/// ```
pub fn database_files(db: &Path) -> Vec<PathBuf> {
    ["", "-wal", "-shm", "-journal", "-runs"]
        .iter()
        .map(|suffix| beside(db, suffix))
        .collect()
}

/// The file or folder named as the database with `suffix` added (`PATH-wal`, `PATH-runs`).
pub(crate) fn beside(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Where a commit's replies go: straight to the appenders ([`Durability::Normal`]), or to the
/// [`WalSyncer`], which answers once the commit is on disk ([`Durability::Full`]).
enum Replies {
    AtCommit(watch::Sender<u64>),
    AfterSync(WalSyncer),
}

/// A commit whose appenders wait for the write-ahead log to reach the disk.
struct Committed {
    head: u64,
    replies: Vec<(Reply, Option<AppendStream>, Vec<Appended>)>,
    /// The commit's events, freed by the sync thread after it answers: freeing memory that
    /// other threads allocated is slow with mimalloc, and the writer has better things to do.
    spent: Vec<Vec<Prepared>>,
}

/// `Durability::Full` without the writer waiting for the disk.
///
/// SQLite's `synchronous=FULL` fsyncs the write-ahead log inside each commit, and the writer
/// can do nothing else meanwhile (on the project machine a commit's fsync takes 1 to 2 ms).
/// Instead the writer commits without an fsync and hands the commit to this thread,
/// which fsyncs the log file and only then answers the commit's appenders and moves the
/// durable head. The promise is SQLite's own: an append that returned is in a log that was
/// fsynced after its commit was written. Commits land in the log in order and one fsync covers
/// every commit written before it, so commits that finish while an fsync runs share the next
/// one (group commit). SQLite has no call to fsync a log from another thread, hence a file
/// handle of our own on the same file.
struct WalSyncer {
    tx: std::sync::mpsc::Sender<Committed>,
    thread: JoinHandle<()>,
    /// Set once an fsync failed: what the OS said. The writer then refuses every batch.
    failed: Arc<std::sync::OnceLock<String>>,
}

impl WalSyncer {
    fn start(
        db: &Path,
        last_seq: watch::Sender<u64>,
        counters: Arc<WriterCounters>,
    ) -> Result<WalSyncer, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel::<Committed>();
        let failed = Arc::new(std::sync::OnceLock::new());
        let thread = std::thread::Builder::new()
            .name("agent-runtime-store-sync".into())
            .spawn({
                let (db, failed) = (db.to_path_buf(), failed.clone());
                move || wal_sync_loop(&db, &rx, &last_seq, &counters, &failed)
            })
            .map_err(|e| StoreError::Open {
                path: db.to_path_buf(),
                detail: format!("cannot start the log's sync thread: {e}"),
            })?;
        Ok(WalSyncer { tx, thread, failed })
    }
}

/// A thread's CPU time as the counters keep it: `u64::MAX` where there is no clock.
fn cpu_now() -> u64 {
    agent_runtime_core::thread_cpu_ns().unwrap_or(u64::MAX)
}

fn cpu_figure(kept: u64) -> Option<u64> {
    (kept != u64::MAX).then_some(kept)
}

fn wal_sync_loop(
    db: &Path,
    rx: &std::sync::mpsc::Receiver<Committed>,
    last_seq: &watch::Sender<u64>,
    counters: &WriterCounters,
    failed: &std::sync::OnceLock<String>,
) {
    let mut wal: Option<std::fs::File> = None;
    let checkpointer = Checkpointer::start(db);
    while let Ok(first) = rx.recv() {
        let mut done = vec![first];
        done.extend(rx.try_iter());
        let synced = match failed.get() {
            Some(detail) => Err(detail.clone()),
            None => sync_wal(db, &mut wal),
        };
        match synced {
            Ok(()) => {
                counters
                    .syncs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(last) = done.last() {
                    let _ = last_seq.send(last.head);
                }
                let mut spent = Vec::with_capacity(done.len());
                for commit in done {
                    spent.push(commit.spent);
                    for (reply, _, landed) in commit.replies {
                        let Reply::Async(tx) = reply;
                        let _ = tx.send(Ok(landed));
                    }
                }
                drop(spent);
                if let Some(checkpointer) = &checkpointer
                    && let Some(len) = wal
                        .as_ref()
                        .and_then(|f| f.metadata().ok())
                        .map(|m| m.len())
                        .filter(|&len| len > WAL_LIMIT)
                {
                    checkpointer.wake(len);
                }
                counters
                    .sync_cpu_ns
                    .store(cpu_now(), std::sync::atomic::Ordering::Relaxed);
            }
            Err(detail) => {
                let _ = failed.set(detail.clone());
                for (reply, stream, _) in done.into_iter().flat_map(|c| c.replies) {
                    refuse_not_durable(db, reply, stream.as_ref(), &detail);
                }
            }
        }
    }
    if let Some(checkpointer) = checkpointer {
        checkpointer.stop();
    }
}

/// Copies the write-ahead log into the database on a thread and connection of its own, when
/// the sync thread sees the log past [`WAL_LIMIT`]. SQLite's automatic checkpoint runs in the
/// commit that passes its limit: the writer took no batch while it copied 16 MiB and fsynced
/// the database (the simulator's store point rose by about a quarter). Here a passive
/// checkpoint copies what is there without blocking the writer; then a `RESTART` one copies
/// what the writer appended meanwhile (little) and has the log start over, holding the writer
/// off for that long only. A passive checkpoint alone never lets the log start over under a
/// writer that never pauses (tried: the simulator's log grew to 72 MB).
///
/// A `RESTART` also waits for readers of the old log (an export, a verify, `audit tail`) and
/// holds new commits off meanwhile, so it waits [`RESTART_WAIT`] at most, and after one that
/// could not finish the thread lets the log grow by another [`WAL_LIMIT`] before it tries
/// again: with a 1 s wait at every wake, a long export in another process held the writer to
/// about one commit a second.
struct Checkpointer {
    wake: std::sync::mpsc::SyncSender<u64>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    /// `None` when the thread cannot start: the writer's own checkpoint remains.
    fn start(db: &Path) -> Option<Checkpointer> {
        let (wake, woken) = std::sync::mpsc::sync_channel::<u64>(1);
        let db = db.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("agent-runtime-store-checkpoint".into())
            .spawn(move || {
                let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
                // Opened at the first wake: most stores never need it.
                let mut conn: Option<Connection> = None;
                // The log's size below which no checkpoint is tried again after one failed.
                let mut retry_above = 0u64;
                while let Ok(len) = woken.recv() {
                    if len <= retry_above {
                        continue;
                    }
                    if conn.is_none() {
                        conn = Connection::open_with_flags(&db, flags)
                            .and_then(|c| {
                                // The log is synced before each copy, the database after it.
                                c.execute_batch("PRAGMA synchronous = NORMAL;")?;
                                c.busy_timeout(RESTART_WAIT)?;
                                Ok(c)
                            })
                            .ok();
                    }
                    // A failure (a full disk, a reader holding the log) leaves the log to grow
                    // by another limit, or to the writer's own checkpoint.
                    let finished = |mode: &str| {
                        conn.as_ref().is_some_and(|c| {
                            c.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                                r.get::<_, i64>(0)
                            })
                            .is_ok_and(|busy| busy == 0)
                        })
                    };
                    retry_above = if finished("PASSIVE") && finished("RESTART") {
                        0
                    } else {
                        len.saturating_add(WAL_LIMIT)
                    };
                }
            })
            .ok()?;
        Some(Checkpointer { wake, thread })
    }

    /// Asks for a checkpoint of a log of `len` bytes; one already asked for and not begun
    /// covers this one.
    fn wake(&self, len: u64) {
        let _ = self.wake.try_send(len);
    }

    /// Ends the thread, closing its connection: the writer's, closed after it, then
    /// checkpoints the log and removes it.
    fn stop(self) {
        drop(self.wake);
        let _ = self.thread.join();
    }
}

/// Answers an appender whose events were written but are not known to be on disk; its stream
/// fails, so that nothing is appended after the gap that a power loss could leave.
fn refuse_not_durable(db: &Path, reply: Reply, stream: Option<&AppendStream>, detail: &str) {
    if let Some(stream) = stream {
        stream.fail(format!("not known to be on disk: {detail}"));
    }
    let Reply::Async(tx) = reply;
    let _ = tx.send(Err(StoreError::NotDurable {
        path: db.to_path_buf(),
        detail: detail.to_string(),
    }));
}

/// Fsyncs the database's write-ahead log (`PATH-wal`, which SQLite keeps while a connection
/// is open), opening it the first time; the directory is synced then too, since the log file
/// may be new and SQLite would have synced its directory entry at its first fsync.
fn sync_wal(db: &Path, wal: &mut Option<std::fs::File>) -> Result<(), String> {
    let file = match wal {
        Some(file) => file,
        None => {
            let path = beside(db, "-wal");
            // Opened for writing, though nothing is written through it: Windows flushes only
            // through a handle with write access.
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| format!("cannot open {} to sync it: {e}", path.display()))?;
            #[cfg(unix)]
            {
                let dir = match db.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| format!("fsync of {} failed: {e}", dir.display()))?;
            }
            wal.insert(file)
        }
    };
    file.sync_data()
        .map_err(|e| format!("fsync of the write-ahead log failed: {e}"))
}

/// Starts an encrypted store's sealer: a thread between the queue and the writer that seals
/// every payload, batch after batch in queue order, and hands the batch on. Sealing
/// (XChaCha20-Poly1305, a few hundred nanoseconds a payload) thus runs beside both the
/// producers and the writer: a live run's driver submits its events itself, and sealing them
/// there put it on the run's critical path. Returns the queue's entry.
fn start_sealer(
    path: &Path,
    cipher: Arc<PayloadCipher>,
    writer: mpsc::Sender<WriteRequest>,
) -> Result<(mpsc::Sender<WriteRequest>, JoinHandle<()>), StoreError> {
    let (entry, mut incoming) = mpsc::channel::<WriteRequest>(QUEUE_DEPTH);
    let handle = std::thread::Builder::new()
        .name("agent-runtime-store-sealer".into())
        .spawn(move || {
            while let Some(mut req) = incoming.blocking_recv() {
                for ev in &mut req.events {
                    ev.sealed = Some(cipher.seal(ev.event.payload_json(), ev.event.header()));
                }
                // The writer's queue closes only when the writer is gone, which the appenders
                // then learn from their dropped replies.
                if writer.blocking_send(req).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| StoreError::Open {
            path: path.to_path_buf(),
            detail: format!("cannot start the sealer thread: {e}"),
        })?;
    Ok((entry, handle))
}

fn writer_loop(
    mut conn: Connection,
    path: PathBuf,
    mut rx: mpsc::Receiver<WriteRequest>,
    replies: Replies,
    counters: Arc<WriterCounters>,
    cipher: Option<Arc<PayloadCipher>>,
) {
    let mut batch: Vec<WriteRequest> = Vec::new();
    let mut frame = FrameBuilder::new();
    while let Some(first) = rx.blocking_recv() {
        let mut n = first.events.len();
        batch.push(first);
        while n < MAX_BATCH_EVENTS {
            match rx.try_recv() {
                Ok(req) => {
                    n += req.events.len();
                    batch.push(req);
                }
                Err(_) => break,
            }
        }
        // A batch behind a failed one of its stream is refused, not written: the producer's
        // events must stay a prefix of what it submitted. (Batches before it were committed or
        // failed before this point: the queue is taken in order.)
        if batch
            .iter()
            .any(|r| r.stream.as_ref().is_some_and(AppendStream::has_failed))
        {
            for req in std::mem::take(&mut batch) {
                if let Some(cause) = req.stream.as_ref().and_then(AppendStream::failure) {
                    n -= req.events.len();
                    let cause = cause.to_string();
                    let Reply::Async(tx) = req.reply;
                    let _ = tx.send(Err(StoreError::StreamFailed {
                        path: path.clone(),
                        cause,
                    }));
                } else {
                    batch.push(req);
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        // After a failed fsync nothing more is written: a power loss could cut the log before
        // events that are already acknowledged as missing.
        if let Replies::AfterSync(syncer) = &replies
            && let Some(detail) = syncer.failed.get()
        {
            for req in batch.drain(..) {
                refuse_not_durable(&path, req.reply, req.stream.as_ref(), detail);
            }
            continue;
        }
        match commit_batch(&mut conn, &path, &batch, &mut frame, cipher.as_deref()) {
            Ok((results, head)) => {
                counters
                    .commits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                counters
                    .events
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                counters
                    .writer_cpu_ns
                    .store(cpu_now(), std::sync::atomic::Ordering::Relaxed);
                match &replies {
                    Replies::AtCommit(last_seq) => {
                        let _ = last_seq.send(head);
                        for (req, res) in batch.drain(..).zip(results) {
                            let Reply::Async(tx) = req.reply;
                            let _ = tx.send(Ok(res));
                        }
                    }
                    Replies::AfterSync(syncer) => {
                        let mut spent = Vec::with_capacity(batch.len());
                        let replies = batch
                            .drain(..)
                            .zip(results)
                            .map(|(req, res)| {
                                spent.push(req.events);
                                (req.reply, req.stream, res)
                            })
                            .collect();
                        let committed = Committed {
                            head,
                            replies,
                            spent,
                        };
                        if let Err(std::sync::mpsc::SendError(committed)) =
                            syncer.tx.send(committed)
                        {
                            // The sync thread is gone (it cannot stop while this sender
                            // lives, short of a panic): nobody can confirm these events.
                            let detail = "the log's sync thread stopped".to_string();
                            let _ = syncer.failed.set(detail.clone());
                            for (reply, stream, _) in committed.replies {
                                refuse_not_durable(&path, reply, stream.as_ref(), &detail);
                            }
                        }
                    }
                }
            }
            Err(detail) => {
                for req in batch.drain(..) {
                    if let Some(stream) = &req.stream {
                        stream.fail(detail.as_str());
                    }
                    let Reply::Async(tx) = req.reply;
                    let _ = tx.send(Err(StoreError::Sqlite {
                        path: path.clone(),
                        detail: format!("append failed, nothing written: {detail}"),
                    }));
                }
            }
        }
    }
    // Every commit is answered before the log is checkpointed and truncated.
    if let Replies::AfterSync(syncer) = replies {
        drop(syncer.tx);
        let _ = syncer.thread.join();
    }
    // Leave a checkpointed database behind so that the file alone holds every event.
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
}

/// Numbers and chains every event of `batch` and writes them as frames, in one transaction.
fn commit_batch(
    conn: &mut Connection,
    path: &Path,
    batch: &[WriteRequest],
    frame: &mut FrameBuilder,
    cipher: Option<&PayloadCipher>,
) -> Result<(Vec<Vec<Appended>>, u64), String> {
    let encrypted = cipher.is_some();
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| sqlite_detail(path, &e))?;
    // Re-read the head inside the write lock: another process may have appended since.
    let head = read_head(&tx, path).map_err(|e| e.to_string())?;
    let (mut seq, mut prev) = head.unwrap_or((0, Hash32::GENESIS));
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut insert_frame = tx
            .prepare_cached("INSERT INTO frames (first_seq, last_seq, min_time, max_time, prev_hash, last_hash, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")
            .map_err(|e| sqlite_detail(path, &e))?;
        let mut insert_run = tx
            .prepare_cached("INSERT OR IGNORE INTO frame_runs (run_id, first_seq) VALUES (?1, ?2)")
            .map_err(|e| sqlite_detail(path, &e))?;
        let mut flush = |frame: &mut FrameBuilder| -> Result<(), String> {
            if frame.is_empty() {
                return Ok(());
            }
            let first = i64::try_from(frame.first_seq).unwrap_or(i64::MAX);
            let last = i64::try_from(frame.first_seq + frame.count - 1).unwrap_or(i64::MAX);
            insert_frame
                .execute(params![
                    first,
                    last,
                    frame.min_time,
                    frame.max_time,
                    &frame.prev_hash.0[..],
                    &frame.last_hash.0[..],
                    &frame.body,
                ])
                .map_err(|e| sqlite_detail(path, &e))?;
            for run in &frame.runs {
                insert_run
                    .execute(params![&run[..], first])
                    .map_err(|e| sqlite_detail(path, &e))?;
            }
            frame.reset();
            Ok(())
        };
        frame.reset();
        for req in batch {
            let mut landed = Vec::with_capacity(req.events.len());
            for ev in &req.events {
                if frame.is_full() {
                    flush(frame)?;
                }
                // Fail closed: an encrypted store never stores a payload the sealer missed.
                let stored = match (&ev.sealed, encrypted) {
                    (Some(sealed), _) => sealed.as_slice(),
                    (None, false) => ev.event.payload_json(),
                    (None, true) => return Err("a payload reached the writer unsealed".into()),
                };
                seq += 1;
                let hash = chain_hash(&prev, seq, ev.event.body());
                frame.push(
                    seq,
                    prev,
                    ev.event.run_id().as_bytes(),
                    ev.time_ns,
                    ev.event.header(),
                    stored,
                    hash,
                );
                landed.push(Appended { seq, hash });
                prev = hash;
            }
            results.push(landed);
        }
        flush(frame)?;
    }
    tx.execute(
        "INSERT INTO meta(key, value) VALUES ('head_seq', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [&seq.to_be_bytes()[..]],
    )
    .map_err(|e| sqlite_detail(path, &e))?;
    // The head's tag, which only a holder of the key can make: verify finds a log cut short or
    // rewritten by anyone else (see `docs/audit-format.md`).
    if let Some(cipher) = cipher.filter(|c| c.head_required) {
        tx.execute(
            "INSERT INTO meta(key, value) VALUES ('head_tag', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [&cipher.head_tag(seq, &prev.0)[..]],
        )
        .map_err(|e| sqlite_detail(path, &e))?;
    }
    tx.commit().map_err(|e| sqlite_detail(path, &e))?;
    Ok((results, seq))
}

#[agent_runtime_core::async_trait]
impl agent_runtime_core::EventSink for Store {
    async fn append(
        &self,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Appended>, agent_runtime_core::SinkError> {
        Store::append(self, events).await.map_err(Into::into)
    }

    async fn append_encoded(
        &self,
        events: Vec<EncodedEvent>,
    ) -> Result<Vec<Appended>, agent_runtime_core::SinkError> {
        Store::append_encoded(self, events)
            .await
            .map_err(Into::into)
    }

    async fn submit_encoded(
        &self,
        events: Vec<EncodedEvent>,
        stream: &AppendStream,
    ) -> Result<agent_runtime_core::PendingAppend, agent_runtime_core::SinkError> {
        let pending = Store::submit_encoded(self, events, stream).await?;
        Ok(Box::pin(async move { pending.await.map_err(Into::into) }))
    }

    fn claim_run(
        &self,
        run_id: RunId,
    ) -> Result<agent_runtime_core::RunClaim, agent_runtime_core::SinkError> {
        let lock = Store::claim_run(self, run_id)?;
        Ok(agent_runtime_core::RunClaim::new(lock))
    }

    fn claim_new_run(
        &self,
        run_id: RunId,
    ) -> Result<agent_runtime_core::RunClaim, agent_runtime_core::SinkError> {
        let lock = Store::claim_new_run(self, run_id)?;
        Ok(agent_runtime_core::RunClaim::new(lock))
    }
}

#[agent_runtime_core::async_trait]
impl agent_runtime_core::EventSource for Store {
    async fn query(
        &self,
        query: EventQuery,
    ) -> Result<Vec<Envelope>, agent_runtime_core::SinkError> {
        let store = self.clone();
        let run = move || store.query_blocking(&query);
        let result = match tokio::runtime::Handle::try_current() {
            Ok(h) => h
                .spawn_blocking(run)
                .await
                .map_err(|e| StoreError::WriterGone {
                    path: self.inner.path.clone(),
                    detail: e.to_string(),
                })?,
            Err(_) => run(),
        };
        result.map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every query shape reads frames in index order: no temporary B-tree, which for a run's
    /// query meant sorting all of the run's frames, blobs included, before the first row.
    #[test]
    fn frame_scans_never_sort() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.db");
        drop(Store::open(crate::StoreConfig::plaintext(&path)).unwrap());
        let conn = Connection::open(&path).unwrap();
        let run = Some(RunId::from_bytes([7; 16]));
        let t = Some(Timestamp::from_unix_nanos(1_000));
        let shapes = [
            EventQuery::default(),
            EventQuery {
                run_id: run,
                ..EventQuery::default()
            },
            EventQuery {
                run_id: run,
                after_seq: Some(5000),
                limit: Some(10),
                since: t,
                until: t,
                ..EventQuery::default()
            },
            EventQuery {
                after_seq: Some(5000),
                since: t,
                ..EventQuery::default()
            },
        ];
        for q in shapes {
            let (sql, args) = scan_sql(&q);
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let plan: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(args.iter()), |row| row.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter().all(|step| !step.contains("TEMP B-TREE")),
                "{q:?}: {plan:?}"
            );
            assert!(
                plan.iter().any(|step| step.contains("SEARCH")),
                "{q:?}: {plan:?}"
            );
        }
    }
}
