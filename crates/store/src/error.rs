//! The store's errors. Each names what failed and the database it failed on.

use std::path::PathBuf;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database file or its directory could not be created or opened.
    #[error("cannot open event database {path}: {detail}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What the operating system or SQLite said.
        detail: String,
    },
    /// Read-only open of a database that does not exist, or of a file with no tables yet (empty,
    /// or a new database whose creator has not committed them).
    #[error("no event database at {path}")]
    NotFound {
        /// The path looked at.
        path: PathBuf,
    },
    /// The file is not an event database, or is damaged (truncated, overwritten).
    #[error("event database {path} is damaged{at}: {detail}", at = .after_seq.map(|s| format!(" after sequence {s}")).unwrap_or_default())]
    Damaged {
        /// The database file.
        path: PathBuf,
        /// The last sequence number read intact, when reading had begun.
        after_seq: Option<u64>,
        /// What SQLite said.
        detail: String,
    },
    /// The file is an SQLite database of something else (another program's, or an empty
    /// one's tables without the log's format marker): not an event database, and not touched.
    #[error("{path}: not an agent-runtime event database ({detail}); nothing was read or written")]
    NotEventDatabase {
        /// The file.
        path: PathBuf,
        /// What tells it apart.
        detail: String,
    },
    /// The database is encrypted and no key source was given.
    #[error("event database {path} is encrypted: set AGENT_RUNTIME_PASSPHRASE to its passphrase")]
    MissingKey {
        /// The database file.
        path: PathBuf,
    },
    /// A new encrypted database needs a key source.
    #[error("no key to encrypt the new event database {path}{why}: set AGENT_RUNTIME_PASSPHRASE, or ask for a plaintext database by name (--plaintext)",
        why = .keyring.as_ref().map(|k| format!(" (no OS keyring: {k})")).unwrap_or_default())]
    NoKeyForNewDatabase {
        /// The database file.
        path: PathBuf,
        /// Why the OS keyring could not be used, when it was tried.
        keyring: Option<String>,
    },
    /// The database's key lives in the OS keyring, which cannot give it.
    #[error(
        "the key of event database {path} is in the OS keyring, which cannot give it: {detail}"
    )]
    Keyring {
        /// The database file.
        path: PathBuf,
        /// What the keyring said.
        detail: String,
    },
    /// The passphrase does not unlock the database's data key.
    #[error("wrong passphrase for event database {path}: its data key does not unlock")]
    WrongKey {
        /// The database file.
        path: PathBuf,
    },
    /// The database was written by a newer or unknown format.
    #[error("event database {path} has format {found}; this build reads format {expected}")]
    Format {
        /// The database file.
        path: PathBuf,
        /// The format found.
        found: String,
        /// The format this build writes.
        expected: String,
    },
    /// An event could not be decrypted or decoded.
    #[error("event {seq} in {path} cannot be read: {detail}")]
    BadEvent {
        /// The database file.
        path: PathBuf,
        /// Its sequence number.
        seq: u64,
        /// Why.
        detail: String,
    },
    /// An event is larger than the store accepts.
    #[error("event payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The payload's canonical size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// An event's time is past what the log stores (nanoseconds since 1970 in an `i64`, until
    /// 2262): stored, it would no longer match the time its hash and seal cover.
    #[error("event time {time} is after 2262-04-11, the latest time the event log stores")]
    TimeOutOfRange {
        /// The event's time.
        time: String,
    },
    /// Append on a store opened read-only.
    #[error("event database {path} is open read-only")]
    ReadOnly {
        /// The database file.
        path: PathBuf,
    },
    /// The writer stopped (the store was closed, or a write failed and the writer shut down).
    #[error("event database {path}: the writer has stopped: {detail}")]
    WriterGone {
        /// The database file.
        path: PathBuf,
        /// Why, when known.
        detail: String,
    },
    /// A batch of an [`agent_runtime_core::AppendStream`] is refused because an earlier batch of
    /// the same stream failed: appending it would leave a gap in the producer's events.
    #[error(
        "event database {path}: an earlier batch of this stream failed to append ({cause}), so this one is refused (the log must not have a gap)"
    )]
    StreamFailed {
        /// The database file.
        path: PathBuf,
        /// Why the earlier batch failed.
        cause: String,
    },
    /// A run is being driven by someone else (see [`crate::Store::claim_run`]).
    #[error(
        "run {run_id} is being driven by {holder} (its claim is in {}-runs); wait for it to end, or stop it",
        path.display()
    )]
    RunClaimed {
        /// The database file.
        path: PathBuf,
        /// The run.
        run_id: String,
        /// Who holds it: `process PID`, or `another process`.
        holder: String,
    },
    /// A new run was to be created under an id the log already holds (see
    /// `EventSink::claim_new_run`); nothing was written.
    #[error(
        "event database {path}: run {run_id} is already in it; a new run needs a new id (a run's id follows from its seed and the millisecond it starts, a simulation's from its seed alone)",
        path = path.display()
    )]
    RunExists {
        /// The database file.
        path: PathBuf,
        /// The run.
        run_id: String,
    },
    /// The events were written, but the disk did not confirm them (the fsync of the
    /// write-ahead log failed), so they may not survive a power loss. The store takes no more
    /// appends: reopen it, and check it with `verify`, once the disk is sound.
    #[error(
        "event database {path}: the disk did not confirm the write ({detail}); the events may be lost on power loss, and the store takes no more appends until it is reopened"
    )]
    NotDurable {
        /// The database file.
        path: PathBuf,
        /// What the operating system said.
        detail: String,
    },
    /// SQLite could not do the work now (the database is locked or busy past the wait, memory
    /// ran out, the call was interrupted): nothing is known to be wrong with the file, and the
    /// same call may succeed later. A check that meets this has checked nothing.
    #[error("event database {path} could not be read or written now ({detail}); try again")]
    Busy {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        detail: String,
    },
    /// A SQLite error while reading or writing.
    #[error("event database {path}: {detail}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        detail: String,
    },
    /// An I/O error on an export or bundle.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Writing an export's output failed (a full disk, a closed pipe): the output is named by
    /// the caller, which knows it; the database is named here.
    #[error("cannot write the export of {database}: {source}")]
    ExportOutput {
        /// The database being exported.
        database: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A bundle or export file that cannot be parsed.
    #[error("{path} line {line}: {detail}")]
    BadBundle {
        /// The bundle file.
        path: PathBuf,
        /// The 1-based line number.
        line: u64,
        /// What is wrong.
        detail: String,
    },
}

impl From<StoreError> for agent_runtime_core::SinkError {
    fn from(e: StoreError) -> Self {
        let refused = matches!(
            e,
            StoreError::TooLarge { .. } | StoreError::TimeOutOfRange { .. }
        );
        agent_runtime_core::SinkError {
            message: e.to_string(),
            refused,
        }
    }
}

/// Maps a SQLite error to `Damaged` when it means the file is corrupt, to `Busy` when it says
/// only that the work cannot be done now, else to `Sqlite`.
pub(crate) fn sqlite_error(
    path: &std::path::Path,
    e: rusqlite::Error,
    after_seq: Option<u64>,
) -> StoreError {
    use rusqlite::ffi::ErrorCode;
    if let rusqlite::Error::SqliteFailure(f, _) = &e {
        match f.code {
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                let detail = if f.code == ErrorCode::NotADatabase && !begins_as_sqlite(path) {
                    // SQLite's "file is not a database" reads as if an event database broke;
                    // most often the path names some other file.
                    "it does not begin as an SQLite database does: not an event database, \
                     or one whose first page was overwritten"
                        .to_string()
                } else if let Some((size, expected)) =
                    after_seq.is_none().then(|| cut_short(path)).flatten()
                {
                    // SQLite refuses even to read its schema then: its "malformed" says nothing
                    // of what happened, nor that no event can be read.
                    format!(
                        "it is shorter than its own header says ({size} of {expected} bytes): \
                         the file was cut off, and SQLite reads nothing of it; restore it from \
                         a bundle or a backup"
                    )
                } else {
                    e.to_string()
                };
                return StoreError::Damaged {
                    path: path.to_path_buf(),
                    after_seq,
                    detail,
                };
            }
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::OutOfMemory
            | ErrorCode::OperationInterrupted => {
                return StoreError::Busy {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                };
            }
            _ => {}
        }
    }
    StoreError::Sqlite {
        path: path.to_path_buf(),
        detail: sqlite_detail(path, &e),
    }
}

/// What SQLite said, followed for an I/O failure by what the file system says of it
/// ([`io_hint`]).
pub(crate) fn sqlite_detail(path: &std::path::Path, e: &rusqlite::Error) -> String {
    use rusqlite::ffi::ErrorCode;
    let detail = e.to_string();
    if let rusqlite::Error::SqliteFailure(f, _) = e
        && matches!(
            f.code,
            ErrorCode::SystemIoFailure | ErrorCode::CannotOpen | ErrorCode::DiskFull
        )
        && let Some(hint) = io_hint(path, f.code != ErrorCode::CannotOpen)
    {
        return format!("{detail} ({hint})");
    }
    detail
}

/// Bytes free below which a disk counts as full for [`io_hint`]: SQLite needs a few pages
/// (16 KiB each) and its shared-memory file (32 KiB) to go on.
const LOW_SPACE: u64 = 1 << 20;

/// What the file system says about a failed write or open of `path`, to follow SQLite's
/// "disk I/O error" and "unable to open database file", which do not say why: SQLite reports a
/// full disk that way when it cannot grow its shared-memory file, a file size limit (`ulimit
/// -f`) as an I/O error, and a file system out of inodes as a file it cannot open. The limit is
/// named only for a failed write (`writing`) of a database or log grown within 1 MiB of it.
/// `None` when none of these holds, or it cannot be told.
pub(crate) fn io_hint(path: &std::path::Path, writing: bool) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let dir = agent_runtime_core::fs::folder_of(path);
        let mut hints = Vec::new();
        let c_dir = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: all-zero bytes are a valid `statvfs` (plain integers).
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c_dir` is NUL-terminated and `st` is a valid place to write to.
        if unsafe { libc::statvfs(c_dir.as_ptr(), &mut st) } == 0 {
            // The field types differ between platforms (u32 or u64).
            #[allow(clippy::useless_conversion)]
            let (size, blocks, block_size, files, free_files) = (
                u64::from(st.f_blocks),
                u64::from(st.f_bavail),
                u64::from(st.f_frsize),
                u64::from(st.f_files),
                u64::from(st.f_favail),
            );
            let free = blocks.saturating_mul(block_size);
            // A file system that reports no size at all (some FUSE mounts) says nothing.
            if size > 0 && free < LOW_SPACE {
                hints.push(format!(
                    "the disk holding {} is full: {free} bytes free",
                    dir.display()
                ));
            } else if files > 0 && free_files == 0 {
                hints.push(format!(
                    "the file system holding {} has no free inodes",
                    dir.display()
                ));
            }
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let largest = [path.to_path_buf(), crate::store::beside(path, "-wal")]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok().map(|m| m.len()))
            .max()
            .unwrap_or(0);
        if writing
            // SAFETY: `limit` is a valid place to write to.
            && unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit) } == 0
            && limit.rlim_cur != libc::RLIM_INFINITY
            && largest.saturating_add(LOW_SPACE) >= limit.rlim_cur
        {
            hints.push(format!(
                "this process may not write past {} bytes of a file (`ulimit -f`)",
                limit.rlim_cur
            ));
        }
        (!hints.is_empty()).then(|| hints.join("; "))
    }
    #[cfg(not(unix))]
    {
        let _ = (path, writing);
        None
    }
}

/// Whether the file's first 16 bytes are SQLite's header string (true when it can't be read:
/// then nothing better can be said than what SQLite said).
fn begins_as_sqlite(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut header = [0u8; 16];
    match std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header)) {
        Ok(()) => &header == b"SQLite format 3\0",
        Err(e) => e.kind() != std::io::ErrorKind::UnexpectedEof,
    }
}

/// The file's size and the size its SQLite header gives (page size × page count), when the
/// file is the shorter: cut off. (In WAL mode the header's count only grows at a checkpoint, so
/// a whole file is never shorter than it.)
fn cut_short(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::io::Read;
    let mut header = [0u8; 32];
    let mut file = std::fs::File::open(path).ok()?;
    file.read_exact(&mut header).ok()?;
    if &header[..16] != b"SQLite format 3\0" {
        return None;
    }
    // Offsets 16 (page size, big-endian; 1 means 65,536) and 28 (pages), per the file format.
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n => u64::from(n),
    };
    let pages = u64::from(u32::from_be_bytes([
        header[28], header[29], header[30], header[31],
    ]));
    let expected = page_size * pages;
    let size = file.metadata().ok()?.len();
    (size < expected).then_some((size, expected))
}

/// An error while reading the log in order: unless SQLite says only that it cannot read now
/// (`Busy`), the file cannot be read past `after_seq`, so it is reported as damaged there.
pub(crate) fn read_error(
    path: &std::path::Path,
    e: rusqlite::Error,
    after_seq: Option<u64>,
) -> StoreError {
    match sqlite_error(path, e, after_seq) {
        StoreError::Sqlite { path, detail } => StoreError::Damaged {
            path,
            after_seq,
            detail,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::ffi;

    fn failure(code: std::ffi::c_int) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)
    }

    /// A verifier that meets a locked or busy database must say it could not check, not that
    /// the file is damaged; corruption and other read failures still are damage.
    #[test]
    fn busy_is_not_damage() {
        let path = std::path::Path::new("/x/events.db");
        for code in [
            ffi::SQLITE_BUSY,
            ffi::SQLITE_LOCKED,
            ffi::SQLITE_NOMEM,
            ffi::SQLITE_INTERRUPT,
        ] {
            let e = read_error(path, failure(code), Some(7));
            assert!(matches!(e, StoreError::Busy { .. }), "{code}: {e:?}");
            assert!(e.to_string().contains("try again"), "{e}");
        }
        for code in [ffi::SQLITE_CORRUPT, ffi::SQLITE_IOERR, ffi::SQLITE_NOTADB] {
            let e = read_error(path, failure(code), Some(7));
            assert!(
                matches!(
                    e,
                    StoreError::Damaged {
                        after_seq: Some(7),
                        ..
                    }
                ),
                "{code}: {e:?}"
            );
        }
        assert!(matches!(
            sqlite_error(path, failure(ffi::SQLITE_CONSTRAINT), None),
            StoreError::Sqlite { .. }
        ));
    }
}
