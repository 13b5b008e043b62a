//! The person at the terminal: approval prompts, the interrupt key, and what the live
//! progress line may draw.
//!
//! A run may ask for several approvals at once (its tasks call tools concurrently), a call
//! may be cancelled while its question is on the screen, and the progress line redraws itself
//! all along. So the terminal has one reader of its lines (a thread of its own, which nothing
//! waits for at exit), prompts take turns, and while one is open the progress line keeps still.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use agent_runtime_core::{
    Actor, ApprovalDecision, ApprovalError, ApprovalRequest, ApprovalSink, CancellationToken,
    ClassifiedError, ErrorClass,
};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Mutex;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::common::terminal_text;

/// Whether an approval prompt is on the screen: the progress line does not redraw over it.
static PROMPT_OPEN: AtomicBool = AtomicBool::new(false);

/// Whether an approval prompt is on the screen now.
pub(crate) fn prompt_open() -> bool {
    PROMPT_OPEN.load(Ordering::Acquire)
}

/// Whether stderr is a terminal that understands cursor movement: not one whose `TERM` is
/// `dumb` (Emacs' shell, some CI logs), which shows escape sequences as text.
pub(crate) fn stderr_is_smart_terminal() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("TERM").is_none_or(|t| t != "dumb")
}

/// The width of the terminal on stderr, in columns, when it has one.
pub(crate) fn stderr_columns() -> Option<usize> {
    // SAFETY: TIOCGWINSZ writes a `winsize` into the one passed; stderr stays open.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_col > 0).then_some(usize::from(size.ws_col))
}

/// The lines typed on the terminal, read by one thread for the whole process and handed to
/// whichever prompt is open; the lock makes prompts take turns. A plain thread rather than
/// `spawn_blocking`: a read that no prompt waits for any more must not hold the runtime's
/// shutdown (the process would hang until Enter), and its next line goes to the next prompt.
fn typed_lines() -> &'static Mutex<UnboundedReceiver<String>> {
    static LINES: OnceLock<Mutex<UnboundedReceiver<String>>> = OnceLock::new();
    LINES.get_or_init(|| {
        let (tx, rx) = unbounded_channel();
        let spawned = std::thread::Builder::new()
            .name("terminal-input".into())
            .spawn(move || {
                let stdin = std::io::stdin();
                loop {
                    let mut line = String::new();
                    match stdin.lock().read_line(&mut line) {
                        // End of input: dropping the sender tells the prompt.
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            if tx.send(line).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        // Without the thread, the sender is gone and every prompt reads "end of input": denied.
        drop(spawned);
        Mutex::new(rx)
    })
}

/// The text of a prompt, every piece that comes from a graph, a tool or a rule with its
/// control and invisible characters escaped (see [`terminal_text`]): what the person reads is
/// what the call will get. The arguments keep the lines of their pretty JSON.
fn prompt_text(request: &ApprovalRequest) -> String {
    let arguments =
        serde_json::to_string_pretty(&shortened(&request.arguments)).unwrap_or_default();
    let arguments: Vec<_> = arguments.lines().map(terminal_text).collect();
    // Which task asks, as the graph names it: two tasks of one agent ask alike otherwise.
    let task = request
        .task_name
        .as_deref()
        .map(|t| format!(" (task `{}`)", terminal_text(t)))
        .unwrap_or_default();
    format!(
        "{}{task} wants to call {} ({:?}) with\n{}\nbecause policy says: {}\nAllow? [y/N] ",
        terminal_text(&request.subject.to_string()),
        terminal_text(&request.tool),
        request.risk,
        arguments.join("\n"),
        terminal_text(&request.reason)
    )
}

/// The longest string an approval question shows whole, in characters; a longer one shows its
/// start and end and how much is left out. (A 200,000-character argument scrolled the question
/// itself off the screen.)
const SHOWN_STRING_CHARS: usize = 2_000;

/// `value` with every string longer than [`SHOWN_STRING_CHARS`] cut to its first and last
/// thousand characters around a note of how many are not shown, so that the person sees that
/// something is left out (and may deny for that reason).
fn shortened(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(text) => {
            let chars = text.chars().count();
            if chars <= SHOWN_STRING_CHARS {
                return value.clone();
            }
            let half = SHOWN_STRING_CHARS / 2;
            let head: String = text.chars().take(half).collect();
            let tail: String = text.chars().skip(chars - half).collect();
            Value::String(format!(
                "{head} [... {} characters not shown ...] {tail}",
                chars - 2 * half
            ))
        }
        Value::Array(items) => Value::Array(items.iter().map(shortened).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shortened(v))).collect())
        }
        other => other.clone(),
    }
}

/// How long after a question appears a typed line is taken for one typed before it could be
/// read (keys typed on after the previous answer, an Enter pressed twice) and ignored, so that
/// it cannot decide a question nobody has seen.
const READING_TIME: std::time::Duration = std::time::Duration::from_millis(500);

/// What a typed line says: `y` or `yes` approve, `n`, `no` or an empty line deny (any case);
/// anything else answers nothing.
fn answer_of(line: &str) -> Option<bool> {
    match line.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Some(true),
        "" | "n" | "no" => Some(false),
        _ => None,
    }
}

/// Asks on the terminal, one question at a time; denies (decided by `system`) when there is
/// no terminal, or once its input has ended.
pub(crate) struct TerminalApproval;

#[agent_runtime_core::async_trait]
impl ApprovalSink for TerminalApproval {
    /// Questions take turns on the one terminal: each has its whole time once shown.
    fn times_answers(&self) -> bool {
        true
    }

    async fn request(
        &self,
        request: ApprovalRequest,
        cancel: CancellationToken,
    ) -> Result<ApprovalDecision, ApprovalError> {
        if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
            return Ok(ApprovalDecision {
                approved: false,
                decided_by: Actor::System,
                reason: Some(format!(
                    "no terminal to ask about {}: denied",
                    terminal_text(&request.tool)
                )),
            });
        }
        let withdrawn =
            || ClassifiedError::new(ErrorClass::Cancelled, "approval request cancelled");
        let mut lines = tokio::select! {
            lines = typed_lines().lock() => lines,
            _ = cancel.cancelled() => return Err(withdrawn()),
        };
        // What was typed before this question was asked answers nothing.
        while lines.try_recv().is_ok() {}
        let mut open = OpenPrompt::show(&prompt_text(&request));
        let shown = std::time::Instant::now();
        // The time to answer counts from here, not from the call: a question that waited its
        // turn behind others has all of it (see `times_answers`).
        let answer_within = request
            .answer_within_ms
            .map(std::time::Duration::from_millis);
        let expired = async {
            match answer_within {
                Some(limit) => tokio::time::sleep_until((shown + limit).into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        let approved = loop {
            // An answer typed as the call is cancelled still counts as given (and is recorded).
            let line = tokio::select! {
                biased;
                line = lines.recv() => line,
                _ = cancel.cancelled() => return Err(withdrawn()),
                _ = &mut expired => {
                    open.answered = true;
                    let why = agent_runtime_gateway::nobody_answered(answer_within.unwrap_or_default());
                    eprintln!("\n({why}: denied)");
                    return Ok(ApprovalDecision {
                        approved: false,
                        decided_by: Actor::System,
                        reason: Some(why),
                    });
                }
            };
            let Some(line) = line else {
                // Nobody can answer any more (Ctrl-D, the terminal closed): the person did not
                // decide this, and the record says so.
                open.answered = true;
                eprintln!("\n(the terminal's input has ended: denied)");
                return Ok(ApprovalDecision {
                    approved: false,
                    decided_by: Actor::System,
                    reason: Some("the terminal's input had ended: denied without asking".into()),
                });
            };
            if shown.elapsed() < READING_TIME {
                eprint!("(typed before the question could be read: ignored)\nAllow? [y/N] ");
                continue;
            }
            match answer_of(&line) {
                Some(approved) => break approved,
                None => eprint!("(answer y or n)\nAllow? [y/N] "),
            }
        };
        open.answered = true;
        eprintln!("{}", if approved { "(approved)" } else { "(denied)" });
        Ok(ApprovalDecision {
            approved,
            decided_by: crate::common::person(),
            reason: Some(
                if approved {
                    "approved on the terminal"
                } else {
                    "denied on the terminal"
                }
                .into(),
            ),
        })
    }
}

/// A question on the screen. Dropped unanswered (its call was cancelled, or timed out and its
/// future dropped), it says so, so that nobody answers a question no longer asked; either way
/// the progress line may draw again.
struct OpenPrompt {
    answered: bool,
}

impl OpenPrompt {
    fn show(text: &str) -> OpenPrompt {
        PROMPT_OPEN.store(true, Ordering::Release);
        let mut err = std::io::stderr().lock();
        // Clear the progress line the question starts on (a dumb terminal has none, and would
        // show the escape as text); the cursor stays after it.
        if stderr_is_smart_terminal() {
            let _ = write!(err, "\r\x1b[2K");
        }
        let _ = write!(err, "\n{text}");
        let _ = err.flush();
        OpenPrompt { answered: false }
    }
}

impl Drop for OpenPrompt {
    fn drop(&mut self) {
        if !self.answered {
            // Not `eprintln!`, which panics when stderr fails (a terminal hung up): a panic in
            // a drop while unwinding aborts the process.
            let _ = writeln!(
                std::io::stderr(),
                "\n(withdrawn: the call was cancelled or timed out)"
            );
        }
        PROMPT_OPEN.store(false, Ordering::Release);
    }
}

/// Cancels `token` at the first interrupt (Ctrl-C); a second one ends the process at once
/// (exit 130, as a shell reports an interrupted command; 143 after SIGTERM, where it counts)
/// for when cancelling takes too long:
/// what was committed stays in the log, as after `kill -9`.
pub(crate) fn cancel_on_ctrl_c(token: CancellationToken) {
    on_signals(move || token.cancel(), false);
}

/// Calls `first` at the first interrupt (Ctrl-C); a second one ends the process at once, as
/// [`cancel_on_ctrl_c`] does.
pub(crate) fn on_ctrl_c(first: impl FnOnce() + Send + 'static) {
    on_signals(first, false);
}

/// [`cancel_on_ctrl_c`], and SIGTERM does the same: for a server (`mcp serve`), which its host
/// stops with SIGTERM and which has no `resume`, so it should end its calls and record their
/// outcomes rather than die in the middle. (A run is resumable: there SIGTERM stays a crash.)
pub(crate) fn cancel_on_ctrl_c_or_term(token: CancellationToken) {
    on_signals(move || token.cancel(), true);
}

fn on_signals(first: impl FnOnce() + Send + 'static, term: bool) {
    tokio::spawn(async move {
        let mut terminate = if term {
            signal(SignalKind::terminate()).ok()
        } else {
            None
        };
        if next_signal(&mut terminate).await.is_none() {
            return;
        }
        first();
        if let Some(code) = next_signal(&mut terminate).await {
            let _ = writeln!(std::io::stderr(), "\nasked twice to stop: stopping now");
            std::process::exit(code);
        }
    });
}

/// Waits for Ctrl-C, or SIGTERM when `terminate` listens for it, and gives the exit status a
/// shell reports for a command that signal ended (130, 143); `None` when no signal can come.
async fn next_signal(terminate: &mut Option<tokio::signal::unix::Signal>) -> Option<i32> {
    let interrupt = async { tokio::signal::ctrl_c().await.ok().map(|()| 130) };
    match terminate {
        Some(t) => tokio::select! {
            code = interrupt => code,
            r = t.recv() => r.map(|()| 143),
        },
        None => interrupt.await,
    }
}
