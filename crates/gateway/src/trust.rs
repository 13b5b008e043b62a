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
//! assert_eq!(book.accept().unwrap().len(), 1); // a person read it
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
        "the runtime's own files changed while an earlier process ran tools: {}. A tool may \
         have changed them, and hooks and MCP servers run outside the sandbox with nobody \
         asked: read them, then accept them as they are with `agent-runtime trust`",
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
    /// Whether the session ended by itself (`false`: its process died, and a later one
    /// compared for it, so the change may have been made after it died).
    pub ended: bool,
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
        if !self.ended {
            f.write_str(" (which died; perhaps after)")?;
        }
        Ok(())
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
}

const BOOK_VERSION: u32 = 1;

#[derive(Clone, Serialize, Deserialize)]
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
#[derive(Clone, Serialize, Deserialize)]
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
    id: String,
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
    /// that appears is a change). Refuses with [`TrustError::Changed`] while changes recorded
    /// by earlier sessions, or found now for sessions whose process died, are not accepted.
    pub fn begin(&self, files: &[PathBuf]) -> Result<Watch, TrustError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let pid = std::process::id();
        let id = format!(
            "{pid}-{}-{}",
            process_start(pid).unwrap_or(0),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.update(|book| {
            settle_dead_sessions(book);
            if !book.changed.is_empty() {
                return Err(TrustError::Changed {
                    changes: book.changed.clone(),
                });
            }
            book.sessions.push(Session {
                id: id.clone(),
                pid,
                pid_start: process_start(pid),
                began: SystemClock.now(),
                files: files
                    .iter()
                    .map(|f| Mark {
                        path: f.clone(),
                        fingerprint: fingerprint(f),
                    })
                    .collect(),
            });
            Ok(())
        })?;
        Ok(Watch {
            book: self.clone(),
            id,
            ended: false,
        })
    }

    /// The changes not accepted yet (with those of sessions whose process died, which are
    /// recorded now).
    pub fn pending(&self) -> Result<Vec<Change>, TrustError> {
        self.update(|book| {
            settle_dead_sessions(book);
            Ok(book.changed.clone())
        })
    }

    /// Accepts the trusted files as they are now: forgets the changes recorded (returned) and
    /// starts the sessions of dead processes' over. Live sessions go on.
    pub fn accept(&self) -> Result<Vec<Change>, TrustError> {
        self.update(|book| {
            settle_dead_sessions(book);
            Ok(std::mem::take(&mut book.changed))
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
        let folder = std::fs::File::open(&dir).map_err(io)?;
        folder.lock().map_err(io)?;
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
        let out = change(&mut book);
        // Written even when `change` refused (dead sessions settled meanwhile are kept), and
        // only when something changed: looking makes no file.
        let text = serde_json::to_vec_pretty(&book).map_err(|e| io(std::io::Error::other(e)))?;
        let empty = book.sessions.is_empty() && book.changed.is_empty();
        if read.as_ref().map_or(!empty, |before| *before != text) {
            agent_runtime_core::fs::replace(&self.path, |f| std::io::Write::write_all(f, &text))
                .map_err(io)?;
        }
        out
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
        let id = self.id.clone();
        self.book.update(|book| {
            let Some(at) = book.sessions.iter().position(|s| s.id == id) else {
                // Settled by another process, which took it for a dead one's.
                return Ok(Vec::new());
            };
            let session = book.sessions.remove(at);
            let changes = compare(&session, true);
            book.changed.extend(changes.iter().cloned());
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
        book.changed.extend(compare(&session, false));
    }
}

/// The session's files whose fingerprint moved since it began.
fn compare(session: &Session, ended: bool) -> Vec<Change> {
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
                    ended,
                })
            },
        )
        .collect()
}

/// The BLAKE3 of the file's bytes (links followed), `None` when there is no file; one that
/// cannot be read gets a fingerprint saying so, which differs from any content's.
fn fingerprint(path: &Path) -> Fingerprint {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(format!("unreadable: {}", e.kind())),
    };
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
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
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
        assert_eq!(book.accept().unwrap(), changes);
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
    fn live_sessions_are_not_settled() {
        let dir = tempfile::tempdir().unwrap();
        let book = TrustBook::new(dir.path().join("trust.json"));
        let first = book.begin(&files(dir.path())).unwrap();
        std::fs::write(dir.path().join("policy.yaml"), "x").unwrap();
        // Another session begins while the first runs: nothing is recorded for the first yet.
        let second = book.begin(&files(dir.path())).unwrap();
        assert_eq!(first.end().unwrap().len(), 1);
        assert!(second.end().unwrap().is_empty());
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
        let own = process_start(std::process::id());
        assert!(own.is_some());
        assert!(is_alive(std::process::id(), own));
        assert!(!is_alive(std::process::id(), own.map(|s| s + 1)));
    }
}
