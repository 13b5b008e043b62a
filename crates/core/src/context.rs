//! What every call across a capability boundary carries.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::Actor;
use crate::ids::{RunId, TaskId};

/// The context of one call to a tool, a model or a session.
///
/// # Cancellation
/// `cancel` is cancelled when the caller gives up (run cancelled, timeout, person said stop).
/// Implementations should watch it at every await point that can take long and return an error
/// of class `cancelled` promptly; the caller also drops the future, so work that must be undone
/// (a child process) has to be tied to drop as well.
///
/// # Timeouts
/// `timeout` is the caller's budget for this call. The caller enforces it (it cancels the token
/// and drops the future when it runs out); implementations may use it to size their own waits.
#[derive(Clone)]
pub struct CallContext {
    /// The run the call belongs to, if any.
    pub run_id: Option<RunId>,
    /// The task the call belongs to, if any.
    pub task_id: Option<TaskId>,
    /// That task's id in its graph (`fetch`), for people: an approval question names it.
    pub task_name: Option<std::sync::Arc<str>>,
    /// Who is calling.
    pub actor: Actor,
    /// Cancelled when the caller gives up.
    pub cancel: CancellationToken,
    /// The caller's time budget.
    pub timeout: Option<Duration>,
    /// Where to report progress, if the caller listens.
    pub progress: Option<mpsc::UnboundedSender<Progress>>,
    /// Secret values the caller put into this call's arguments (a task graph's
    /// `{{ secrets.NAME }}`): whoever records or returns anything about the call replaces them
    /// with `[REDACTED]`, as it does its own secrets. Empty for most calls. Never printed by
    /// `Debug`.
    pub secrets: Vec<String>,
    /// The folder relative paths in the call's arguments are relative to: the gateway sets
    /// its policy's first workspace root, which the policy judged them against, so that a tool
    /// working in this process (`read_file`, `write_file`) opens what was judged rather than a
    /// path under the process's working folder. `None`: the process's working folder.
    pub workdir: Option<std::sync::Arc<std::path::Path>>,
    /// The paths the gateway's policy judged for this call: a path argument's text, and the
    /// path it resolved to then (every symlink followed, `..` applied; see the gateway's
    /// `paths::resolve`), or `None` when it resolved to nothing safe (a part that could not be
    /// looked at). A tool working in this process opens the judged path with no symlink
    /// followed ([`crate::fs::open_no_symlinks`]), so that a symlink put in the way after the
    /// judgement (by a command of the same run) cannot take the open out of the workspace, and
    /// refuses a path that resolved to nothing. See [`CallContext::file`].
    pub judged_paths:
        Option<std::sync::Arc<std::collections::BTreeMap<String, Option<std::path::PathBuf>>>>,
    /// Whom to tell while the call waits for a person (an approval question), so that the
    /// caller can stop a clock of its own meanwhile: the workforce does not count that wait
    /// against a task's `timeout`. Whoever asks a person on the call's behalf (the gateway)
    /// holds [`CallContext::waiting_for_person`]'s guard while the question is open.
    pub waits: Option<WaitReporter>,
}

impl std::fmt::Debug for CallContext {
    // By hand: the derived form would print the secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallContext")
            .field("run_id", &self.run_id)
            .field("task_id", &self.task_id)
            .field("task_name", &self.task_name)
            .field("actor", &self.actor)
            .field("timeout", &self.timeout)
            .field("progress", &self.progress.is_some())
            .field("secrets", &self.secrets.len())
            .field("workdir", &self.workdir)
            .field("waits", &self.waits.as_ref().map(|w| w.call))
            // Their keys are argument text, which may hold a secret a task graph put in.
            .field(
                "judged_paths",
                &self.judged_paths.as_ref().map_or(0, |m| m.len()),
            )
            .finish_non_exhaustive()
    }
}

impl CallContext {
    /// A context for `actor` with a fresh token and no run, budget or progress listener.
    pub fn new(actor: Actor) -> Self {
        CallContext {
            run_id: None,
            task_id: None,
            task_name: None,
            actor,
            cancel: CancellationToken::new(),
            timeout: None,
            progress: None,
            secrets: Vec::new(),
            workdir: None,
            judged_paths: None,
            waits: None,
        }
    }

    /// Marks the call as waiting for a person until the returned guard is dropped, telling
    /// [`CallContext::waits`] (if set) now and then. Dropped however the wait ends (an answer,
    /// a timeout, the call's future dropped), so the caller's clock never stays stopped.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use agent_runtime_core::{Actor, CallContext, WaitListener, WaitReporter};
    ///
    /// #[derive(Default)]
    /// struct Log(Mutex<Vec<(u64, bool)>>);
    /// impl WaitListener for Log {
    ///     fn waiting(&self, call: u64, waiting: bool) {
    ///         self.0.lock().unwrap().push((call, waiting));
    ///     }
    /// }
    ///
    /// let log = Arc::new(Log::default());
    /// let mut ctx = CallContext::new(Actor::System);
    /// ctx.waits = Some(WaitReporter { listener: log.clone(), call: 7 });
    /// {
    ///     let _asking = ctx.waiting_for_person();
    ///     assert_eq!(*log.0.lock().unwrap(), [(7, true)]);
    /// }
    /// assert_eq!(*log.0.lock().unwrap(), [(7, true), (7, false)]);
    /// ```
    pub fn waiting_for_person(&self) -> PersonWait<'_> {
        if let Some(w) = &self.waits {
            w.listener.waiting(w.call, true);
        }
        PersonWait(self.waits.as_ref())
    }

    /// `path` as the call means it: the path the policy judged for it if it judged one
    /// ([`CallContext::judged_paths`]), else joined to [`CallContext::workdir`] when relative and the
    /// caller set one, else as it is. A tool that opens files should use [`CallContext::file`]
    /// instead: a judged path is to be opened following no link, and one the policy could not
    /// resolve not at all.
    ///
    /// ```
    /// use agent_runtime_core::{Actor, CallContext};
    /// let mut ctx = CallContext::new(Actor::System);
    /// assert_eq!(ctx.path("a.txt"), std::path::Path::new("a.txt"));
    /// ctx.workdir = Some(std::path::Path::new("/ws").into());
    /// assert_eq!(ctx.path("a.txt"), std::path::Path::new("/ws/a.txt"));
    /// assert_eq!(ctx.path("/etc/x"), std::path::Path::new("/etc/x"));
    /// ```
    pub fn path(&self, path: &str) -> std::path::PathBuf {
        if let Some(Some(judged)) = self.judged_paths.as_ref().and_then(|m| m.get(path)) {
            return judged.clone();
        }
        match &self.workdir {
            Some(dir) if std::path::Path::new(path).is_relative() => dir.join(path),
            _ => std::path::PathBuf::from(path),
        }
    }

    /// The file the path argument `path` names, as the call's policy judged it (see
    /// [`CallContext::judged_paths`]), for a tool working in this process to open with
    /// [`FileTarget::open`]. Refused when the policy could not resolve the path: what the
    /// kernel would open is not what the policy looked at.
    ///
    /// ```
    /// use agent_runtime_core::{Actor, CallContext};
    /// # let dir = std::env::temp_dir().join(format!("file-target-doc-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir).unwrap();
    /// # let dir = std::fs::canonicalize(&dir).unwrap();
    /// # std::fs::write(dir.join("notes.txt"), "hello").unwrap();
    /// let mut ctx = CallContext::new(Actor::System);
    /// // What the gateway sets for a call whose policy resolved `notes.txt`:
    /// ctx.judged_paths = Some(std::sync::Arc::new(
    ///     [("notes.txt".to_string(), Some(dir.join("notes.txt")))].into(),
    /// ));
    /// let target = ctx.file("notes.txt").unwrap();
    /// assert!(target.is_judged());
    /// let mut text = String::new();
    /// std::io::Read::read_to_string(&mut target.open(libc::O_RDONLY, 0).unwrap(), &mut text).unwrap();
    /// assert_eq!(text, "hello");
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// ```
    pub fn file(&self, path: &str) -> Result<FileTarget, UnresolvedPath> {
        match self.judged_paths.as_ref().and_then(|m| m.get(path)) {
            None => Ok(FileTarget {
                path: self.path(path),
                judged: false,
            }),
            Some(Some(p)) => Ok(FileTarget {
                path: p.clone(),
                judged: true,
            }),
            Some(None) => Err(UnresolvedPath {
                path: self.path(path),
            }),
        }
    }

    /// Reports progress if anyone listens; never blocks and never fails.
    pub fn report_progress(&self, progress: Progress) {
        if let Some(tx) = &self.progress {
            let _ = tx.send(progress);
        }
    }
}

/// Told when a call begins and ends waiting for a person ([`CallContext::waits`]).
///
/// Called on the thread of whoever asks; it should not block (the workforce sends on a
/// channel).
pub trait WaitListener: Send + Sync {
    /// `call` ([`WaitReporter::call`]) began (`true`) or stopped (`false`) waiting.
    fn waiting(&self, call: u64, waiting: bool);
}

/// A [`WaitListener`] and the number it knows one call by.
#[derive(Clone)]
pub struct WaitReporter {
    /// Whom to tell.
    pub listener: std::sync::Arc<dyn WaitListener>,
    /// The call, as the listener numbers calls.
    pub call: u64,
}

impl std::fmt::Debug for WaitReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitReporter")
            .field("call", &self.call)
            .finish_non_exhaustive()
    }
}

/// While alive, its call counts as waiting for a person; see
/// [`CallContext::waiting_for_person`].
#[must_use = "the wait ends when this is dropped"]
pub struct PersonWait<'a>(Option<&'a WaitReporter>);

impl Drop for PersonWait<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.0 {
            w.listener.waiting(w.call, false);
        }
    }
}

/// A file a tool is to open, as its call's policy judged it ([`CallContext::file`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileTarget {
    path: std::path::PathBuf,
    judged: bool,
}

impl FileTarget {
    /// The path to open: the one the policy resolved, or as given (joined to the call's
    /// working folder) when no policy judged it.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Whether a policy judged the path (then it is opened following no link).
    pub fn is_judged(&self) -> bool {
        self.judged
    }

    /// Opens the file with `open(2)`'s `flags` (`libc::O_RDONLY`, `O_WRONLY | O_CREAT`, ...;
    /// `mode` for a file it creates; close-on-exec always). A judged path is opened following
    /// no link ([`crate::fs::open_no_symlinks`]): a link found in its way was put there after
    /// the judgement, and [`crate::fs::is_link_in_the_way`] tells the error apart.
    #[cfg(unix)]
    pub fn open(&self, flags: libc::c_int, mode: libc::mode_t) -> std::io::Result<std::fs::File> {
        if self.judged {
            return crate::fs::open_no_symlinks(&self.path, flags, mode);
        }
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.path.as_os_str().as_bytes()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte in the path")
        })?;
        // SAFETY: `path` is NUL-terminated and outlives the call.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                flags | libc::O_CLOEXEC,
                libc::c_uint::from(mode),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: open returned a new descriptor that nothing else owns.
        Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }
}

/// A path argument its call's policy could not resolve ([`CallContext::file`]): a part of it
/// too long to look at, in a folder that cannot be searched, a loop of links, or a leading `~`
/// (a home folder to some tools, a folder named `~` to others).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the policy could not resolve {} (a part of it too long to look at, in a folder that cannot \
     be searched, a loop of links, or a leading `~`: write `./~/...` for a folder named `~`), \
     so it is not opened",
    path.display()
)]
pub struct UnresolvedPath {
    /// The path as given (joined to the call's working folder).
    pub path: std::path::PathBuf,
}

/// A progress report from a long call.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Work done so far, in the implementation's unit.
    pub done: f64,
    /// Total work, when known.
    pub total: Option<f64>,
    /// A short message for a person.
    pub message: Option<String>,
    /// Anything else the implementation wants to pass on.
    #[serde(default)]
    pub detail: Value,
}
