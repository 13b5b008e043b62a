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
    /// refuses a path that resolved to nothing. See [`CallContext::judged`].
    pub judged_paths:
        Option<std::sync::Arc<std::collections::BTreeMap<String, Option<std::path::PathBuf>>>>,
}

impl std::fmt::Debug for CallContext {
    // By hand: the derived form would print the secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallContext")
            .field("run_id", &self.run_id)
            .field("task_id", &self.task_id)
            .field("actor", &self.actor)
            .field("timeout", &self.timeout)
            .field("progress", &self.progress.is_some())
            .field("secrets", &self.secrets.len())
            .field("workdir", &self.workdir)
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
            actor,
            cancel: CancellationToken::new(),
            timeout: None,
            progress: None,
            secrets: Vec::new(),
            workdir: None,
            judged_paths: None,
        }
    }

    /// `path` as the call means it: the path the policy judged for it if it judged one
    /// ([`CallContext::judged`]), else joined to [`CallContext::workdir`] when relative and the
    /// caller set one, else as it is. A tool that opens files should ask
    /// [`CallContext::judged`] first: a judged path is to be opened following no link, and one
    /// the policy could not resolve ([`Judged::Unresolvable`]) not at all.
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
        if let Judged::Resolved(judged) = self.judged(path) {
            return judged.to_path_buf();
        }
        match &self.workdir {
            Some(dir) if std::path::Path::new(path).is_relative() => dir.join(path),
            _ => std::path::PathBuf::from(path),
        }
    }

    /// What the policy made of the argument text `path` (see [`CallContext::judged_paths`]).
    pub fn judged(&self, path: &str) -> Judged<'_> {
        match self.judged_paths.as_ref().and_then(|m| m.get(path)) {
            None => Judged::NotJudged,
            Some(Some(p)) => Judged::Resolved(p),
            Some(None) => Judged::Unresolvable,
        }
    }

    /// Reports progress if anyone listens; never blocks and never fails.
    pub fn report_progress(&self, progress: Progress) {
        if let Some(tx) = &self.progress {
            let _ = tx.send(progress);
        }
    }
}

/// What a call's policy made of one path argument ([`CallContext::judged`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judged<'a> {
    /// No policy judged it (a call made without the gateway): open it as given.
    NotJudged,
    /// It resolved to this path, which is what was judged: open it following no link
    /// ([`crate::fs::open_no_symlinks`]).
    Resolved(&'a std::path::Path),
    /// It resolved to nothing safe (a part that could not be looked at, a loop of links): do
    /// not open it, as what the kernel would open was not judged.
    Unresolvable,
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
