//! What every subcommand shares: global options, opening the store, error kinds.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use agent_runtime_core::{EnvSecrets, Redactor, StaticSecrets};
use clap::Args;

/// Options every subcommand accepts.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// The event database (default: agent-runtime/events.db under the user's data directory).
    #[arg(long, global = true, env = "AGENT_RUNTIME_DB", value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Create or open the database without encryption (payloads stored in clear).
    #[arg(long, global = true)]
    pub plaintext: bool,
}

/// An error that decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or input: exit 2.
    #[error("{0}")]
    Usage(String),
    /// A check failed (verification, a failed run): exit 1.
    #[error("{0}")]
    Failed(String),
    /// `audit verify` could not check the log at all (no database, a wrong key, a locked or
    /// unreadable file): exit 3, so that a script tells "not checked" from "checked and found
    /// changed" (exit 1).
    #[error(transparent)]
    NotVerified(anyhow::Error),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
            CliError::NotVerified(_) => 3,
        }
    }
}

/// `text` made safe to print on one terminal line: each control character, and each
/// invisible character that changes how the text around it reads, is written as the escape
/// Rust's `char::escape_default` gives it; everything else is left as it is.
///
/// Control characters are those of Unicode's `Cc` category ([`char::is_control`]): C0 (U+0000
/// to U+001F, with newline, carriage return, tab and ESC), DEL (U+007F) and C1 (U+0080 to
/// U+009F, where U+009B is a CSI on some terminals). The invisible ones (see
/// [`is_invisible_format`]) are the bidirectional controls, which reorder what follows them (a
/// name ending in U+202E turns the rest of a table's row around), and the zero-width spaces and
/// marks, which make two different texts look alike. Newline, carriage return and tab become
/// `\n`, `\r` and `\t`, the others `\u{1b}`-style escapes. So a graph's name, a tool's message,
/// an approval's arguments or an error read from the event log can neither break a line or a
/// table, nor send escape sequences (clear the screen, retitle the window) to the user's
/// terminal, nor show something other than what it holds. A backslash is left as it is: the
/// result is for reading, not for turning back into the text (that is what `--json` is for).
/// Text without such characters, the usual case, is borrowed.
pub fn terminal_text(text: &str) -> Cow<'_, str> {
    let escaped = |c: char| c.is_control() || is_invisible_format(c);
    let Some(first) = text.find(escaped) else {
        return Cow::Borrowed(text);
    };
    let mut out = String::with_capacity(text.len() + 8);
    out.push_str(&text[..first]);
    for c in text[first..].chars() {
        if escaped(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The invisible characters [`terminal_text`] escapes: the bidirectional marks, embeddings,
/// overrides and isolates (U+061C, U+200E, U+200F, U+202A to U+202E, U+2066 to U+2069), the
/// zero-width space and no-break space (U+200B, U+FEFF), the invisible operators (U+2060 to
/// U+2064), the soft hyphen (U+00AD), the line and paragraph separators (U+2028, U+2029, which
/// some terminals break lines at), the Hangul fillers that render as blanks (U+115F, U+1160,
/// U+3164, U+FFA0) and the braille blank (U+2800), the tag characters (U+E0000 to U+E007F,
/// which can carry hidden ASCII), and the other characters that draw nothing yet make two
/// texts differ: the combining grapheme joiner (U+034F), the Mongolian variation selectors and
/// vowel separator (U+180B to U+180F), the deprecated format controls (U+206A to U+206F), the
/// variation selectors (U+FE00 to U+FE0F, U+E0100 to U+E01EF: an emoji then shows its selector
/// escaped), the interlinear annotation marks (U+FFF9 to U+FFFB) and the musical format
/// controls (U+1D173 to U+1D17A). The zero-width joiner and non-joiner (U+200C, U+200D) are
/// left: emoji sequences and several scripts need them, and they reorder nothing.
pub fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{180B}'..='\u{180F}'
            | '\u{206A}'..='\u{206F}'
            | '\u{2800}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0100}'..='\u{E01EF}'
            | '\u{061C}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{200B}'
            | '\u{200E}'
            | '\u{200F}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{3164}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

/// The event database of this process and the files SQLite keeps beside it, which the
/// gateway protects from tools (see `gateway::config::protected_paths`).
static EVENT_DATABASE: std::sync::OnceLock<Vec<std::path::PathBuf>> = std::sync::OnceLock::new();

/// Records the event database's path (once, at start). Its files and the trust book are
/// protected from tools.
pub fn set_event_database(db: &std::path::Path) {
    let mut files = agent_runtime_store::database_files(db);
    files.extend(trust_book().files());
    let _ = EVENT_DATABASE.set(files);
}

/// The user's [`TrustBook`](agent_runtime_gateway::trust::TrustBook): `agent-runtime/trust.json`
/// under the user's data directory (where the default event database is), one for every
/// database and folder the user runs in, so that a change recorded by one start is seen by
/// every later one. Protected from tools where a workspace holds it.
pub fn trust_book() -> agent_runtime_gateway::trust::TrustBook {
    agent_runtime_gateway::trust::TrustBook::new(
        agent_runtime_store::default_db_path().with_file_name("trust.json"),
    )
}

/// The session of this process over the files the runtime trusts, begun when it builds a
/// gateway (its tools may run from then on) and ended by `main` once the command is done.
static TRUST_SESSION: std::sync::Mutex<Option<agent_runtime_gateway::trust::Watch>> =
    std::sync::Mutex::new(None);

/// Begins this process's trust session over `files` (at most one: a second call adds none).
pub fn begin_trust_session(files: &[PathBuf]) -> anyhow::Result<()> {
    let book = trust_book();
    let mut session = TRUST_SESSION
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if session.is_some() {
        return Ok(());
    }
    match book.begin(files) {
        Ok(watch) => {
            *session = Some(watch);
            Ok(())
        }
        Err(e) => Err(CliError::Usage(terminal_text(&e.to_string()).into_owned()).into()),
    }
}

/// What a person's own `git` would run from the workspace roots' repositories, as it was when
/// this process began to run tools (see [`watch_git`]).
static GIT_WATCH: std::sync::Mutex<Option<GitWatch>> = std::sync::Mutex::new(None);

/// See [`watch_git`].
struct GitWatch {
    pinned: agent_runtime_gateway::trust::Pinned,
    roots: Vec<PathBuf>,
    /// The repositories below the roots when the process began (see [`nested_repositories`]);
    /// `None` when the roots were too large to look through.
    nested: Option<std::collections::BTreeSet<PathBuf>>,
}

/// How deep below a root [`nested_repositories`] looks, and how many entries it reads at most:
/// enough for `sub/.git` or `vendor/lib/.git`, bounded for a workspace with a huge tree.
const NESTED_DEPTH: usize = 3;
const NESTED_ENTRIES: usize = 200_000;

/// The `.git` entries below `roots` (not the roots' own), to `NESTED_DEPTH` levels, leaving
/// out folders that hold no one's repositories (`node_modules`, `target`, `.git` itself): a
/// repository a command made there runs its configuration and hooks when the person's `git
/// status` at the root enters it.
/// `None` when the roots hold more than `NESTED_ENTRIES` entries in those levels (a partial
/// look would compare two different parts of the tree).
fn nested_repositories(roots: &[PathBuf]) -> Option<std::collections::BTreeSet<PathBuf>> {
    let mut found = std::collections::BTreeSet::new();
    let mut queue: std::collections::VecDeque<(PathBuf, usize)> =
        roots.iter().map(|r| (r.clone(), 0)).collect();
    let mut seen = 0;
    while let Some((dir, depth)) = queue.pop_front() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            if seen > NESTED_ENTRIES {
                return None;
            }
            let name = entry.file_name();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if name == ".git" {
                if depth > 0 {
                    found.insert(entry.path());
                }
            } else if kind.is_dir()
                && depth < NESTED_DEPTH
                && name != "node_modules"
                && name != "target"
            {
                queue.push_back((entry.path(), depth + 1));
            }
        }
    }
    Some(found)
}

/// Pins what a person's `git` runs from each root's repository (its configuration, hooks,
/// submodules' configuration and hooks, and a `.git` not there yet), so that the end of the
/// process says what changed: git has ways to run code the sandbox does not close (a nested
/// repository, `commondir`), and the person should look before they run git there.
pub fn watch_git(roots: &[PathBuf]) {
    let mut watch = GIT_WATCH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if watch.is_some() {
        return;
    }
    let mut paths = Vec::new();
    for root in roots {
        let dot_git = root.join(".git");
        if !dot_git.exists() {
            paths.push(dot_git);
            continue;
        }
        for p in agent_runtime_gateway::config::git_run_paths(root) {
            if p.file_name() == Some(std::ffi::OsStr::new("modules"))
                && let Ok(modules) = std::fs::read_dir(&p)
            {
                for m in modules.flatten() {
                    paths.push(m.path().join("config"));
                    paths.push(m.path().join("hooks"));
                }
            }
            paths.push(p);
        }
    }
    *watch = Some(GitWatch {
        pinned: agent_runtime_gateway::trust::Pinned::take(paths),
        roots: roots.to_vec(),
        nested: nested_repositories(roots),
    });
}

/// Ends this process's trust session, if one began, and says which trusted files changed
/// during it (the next start refuses until a person accepts them), and what changed of what
/// a person's `git` runs.
pub fn end_trust_session() {
    let git = GIT_WATCH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(git) = git {
        let moved = git.pinned.moved_all();
        for path in &moved {
            eprintln!(
                "warning: {} changed while this process ran tools",
                terminal_text(&path.display().to_string())
            );
        }
        let appeared: Vec<PathBuf> = match (&git.nested, nested_repositories(&git.roots)) {
            (Some(before), Some(now)) => now.difference(before).cloned().collect(),
            _ => Vec::new(),
        };
        for path in &appeared {
            eprintln!(
                "warning: a repository appeared at {} while this process ran tools",
                terminal_text(&path.display().to_string())
            );
        }
        if !moved.is_empty() || !appeared.is_empty() {
            eprintln!(
                "warning: a person's `git` runs what a repository's configuration and hooks name, \
                 outside any sandbox: look at them before you run git there (or run it with \
                 `-c core.hooksPath=/dev/null -c core.fsmonitor=false`)"
            );
        }
    }
    end_trust_file_session();
}

fn end_trust_file_session() {
    let watch = TRUST_SESSION
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let Some(watch) = watch else {
        return;
    };
    match watch.end() {
        Ok(changes) if changes.is_empty() => {}
        Ok(changes) => {
            for c in &changes {
                eprintln!(
                    "warning: {} changed while this process ran tools",
                    terminal_text(&c.path.display().to_string())
                );
            }
            eprintln!(
                "warning: the runtime trusts these files (hooks and MCP servers run outside \
                 the sandbox): the next start refuses until you read them and accept them with \
                 `agent-runtime trust` in their folder"
            );
        }
        Err(e) => eprintln!(
            "warning: the trusted files could not be checked at the end: {}",
            terminal_text(&e.to_string())
        ),
    }
}

/// The event database's files, as recorded by [`set_event_database`].
pub fn event_database_files() -> Vec<std::path::PathBuf> {
    EVENT_DATABASE.get().cloned().unwrap_or_default()
}

/// The person at this terminal, as events name them: `person:$USER`, or `person:terminal`
/// when `USER` is unset or empty (`person:` would not read back).
pub fn person() -> agent_runtime_core::Actor {
    let name = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "terminal".into());
    agent_runtime_core::Actor::Person(name)
}

/// How many terminal columns `text` takes: a CJK character or an emoji two, a combining mark
/// none. What table columns are padded by, so that rows with wide names line up.
pub fn columns_of(text: &str) -> usize {
    unicode_width::UnicodeWidthStr::width(text)
}

/// `text` cut to at most `max` columns, ending with `…` when cut.
pub fn cut_to_columns(text: &str, max: usize) -> Cow<'_, str> {
    if columns_of(text) <= max {
        return Cow::Borrowed(text);
    }
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars() {
        let w = unicode_width::UnicodeWidthChar::width(c).unwrap_or(0);
        if used + w > max.saturating_sub(1) {
            break;
        }
        used += w;
        out.push(c);
    }
    out.push('…');
    Cow::Owned(out)
}

/// `text` followed by spaces up to `width` columns (none when it is wider).
pub fn padded(text: &str, width: usize) -> String {
    let mut out = text.to_string();
    out.extend(std::iter::repeat_n(
        ' ',
        width.saturating_sub(columns_of(text)),
    ));
    out
}

/// The store's passphrase, moved out of the environment by [`take_secrets_from_env`].
static PASSPHRASE: OnceLock<agent_runtime_store::Passphrase> = OnceLock::new();

/// The graph secrets (`AGENT_RUNTIME_SECRET_NAME`), moved out of the environment by
/// [`take_secrets_from_env`].
static GRAPH_SECRETS: OnceLock<Arc<StaticSecrets>> = OnceLock::new();

/// Moves the store's passphrase ([`agent_runtime_store::PASSPHRASE_ENV`]) and the graph secrets
/// ([`EnvSecrets::PREFIX`]`NAME`) from the environment into this process's memory, and installs
/// a panic hook that masks their values.
///
/// Every child process (a command tool, a policy hook, an MCP server) inherits the environment
/// unless it is cleared for it; hooks keep it, so secrets must not be there: a graph's secret
/// reaches only the call whose arguments name it. A panic's message may quote the data it
/// choked on; the hook prints it with every secret value masked.
///
/// # Safety
/// No other thread may run (the rule of [`std::env::remove_var`]): call it first in `main`.
pub unsafe fn take_secrets_from_env() {
    let mut redactor = Redactor::new();
    let name = agent_runtime_store::PASSPHRASE_ENV;
    if let Some(p) = std::env::var_os(name) {
        // SAFETY: the caller promises that this thread is the only one.
        unsafe { std::env::remove_var(name) };
        if let Some(p) = p.to_str().filter(|p| !p.is_empty()) {
            redactor.add_secret(p);
            let _ = PASSPHRASE.set(agent_runtime_store::Passphrase::new(p));
        }
    }
    let mut secrets = Vec::new();
    for (key, value) in std::env::vars_os() {
        let Some(secret) = key
            .to_str()
            .and_then(|k| k.strip_prefix(EnvSecrets::PREFIX))
        else {
            continue;
        };
        // A value that is not UTF-8 cannot be filled into JSON arguments: the graph's call
        // finds the secret unset and says so, as it would with `EnvSecrets`.
        if let Some(value) = value.to_str() {
            redactor.add_secret(value);
            secrets.push((secret.to_string(), value.to_string()));
        }
        // SAFETY: as above.
        unsafe { std::env::remove_var(&key) };
    }
    let _ = GRAPH_SECRETS.set(Arc::new(StaticSecrets::new(secrets)));
    std::panic::set_hook(Box::new(move |info| print_panic(info, &redactor)));
}

/// The graph secrets [`take_secrets_from_env`] took (none if it was not called).
pub fn graph_secrets() -> Arc<StaticSecrets> {
    GRAPH_SECRETS.get().cloned().unwrap_or_default()
}

/// What the standard panic hook prints, with secret values masked in the message.
fn print_panic(info: &std::panic::PanicHookInfo<'_>, redactor: &Redactor) {
    let message =
        agent_runtime_core::error::panic_message(info.payload()).unwrap_or("Box<dyn Any>");
    let thread = std::thread::current();
    let location = info.location().map(|l| l.to_string());
    let backtrace = std::backtrace::Backtrace::capture();
    let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
        .then(|| backtrace.to_string());
    // One write, so that lines of two threads panicking at once do not interleave.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        panic_report(
            thread.name().unwrap_or("<unnamed>"),
            location.as_deref(),
            message,
            backtrace.as_deref(),
            redactor,
        )
        .as_bytes(),
    );
}

/// The text of [`print_panic`].
fn panic_report(
    thread: &str,
    location: Option<&str>,
    message: &str,
    backtrace: Option<&str>,
    redactor: &Redactor,
) -> String {
    let at = location.map(|l| format!(" at {l}")).unwrap_or_default();
    let tail = match backtrace {
        Some(b) => format!("stack backtrace:\n{b}"),
        None => {
            "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace".into()
        }
    };
    format!(
        "\nthread '{thread}' panicked{at}:\n{}\n{tail}\n",
        redactor.redact_str(message)
    )
}

impl GlobalArgs {
    /// The store configuration these options and the environment describe.
    pub fn store_config(&self) -> agent_runtime_store::StoreConfig {
        let config = agent_runtime_store::StoreConfig::from_env(self.db.clone(), self.plaintext);
        match PASSPHRASE.get() {
            Some(p) => config.passphrase(p.clone()),
            None => config,
        }
    }

    /// Opens (creating if needed) the event database for appending.
    pub fn open_store(&self) -> anyhow::Result<agent_runtime_store::Store> {
        Ok(agent_runtime_store::Store::open(self.store_config())?)
    }

    /// Where `bench store` and `bench gateway` make their temporary databases: beside the
    /// database `--db` names (so the figures are those of its disk), else under the system's
    /// temporary folder (`TMPDIR`). They make databases of their own, in both modes, so
    /// `--plaintext` does not apply to them.
    pub fn bench_folder(&self) -> anyhow::Result<std::path::PathBuf> {
        let Some(db) = &self.db else {
            return Ok(std::env::temp_dir());
        };
        let folder = match db.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        if !folder.is_dir() {
            return Err(CliError::Usage(format!(
                "--db {}: the folder {} does not exist (the bench measures beside the database --db names)",
                db.display(),
                folder.display()
            ))
            .into());
        }
        Ok(folder)
    }

    /// Opens an existing event database for appending: a `--db` that names nothing is "no
    /// event database", not a new one (resume and cancel work on what the database holds).
    pub fn open_existing_store(&self) -> anyhow::Result<agent_runtime_store::Store> {
        Ok(agent_runtime_store::Store::open(
            self.store_config().must_exist(),
        )?)
    }

    /// Opens an existing event database for reading only.
    pub fn open_store_read_only(&self) -> anyhow::Result<agent_runtime_store::Store> {
        Ok(agent_runtime_store::Store::open(
            self.store_config().read_only(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic's message is printed with every secret value masked, the rest as the standard
    /// hook prints it.
    #[test]
    fn a_panic_report_masks_secret_values() {
        let mut redactor = Redactor::new();
        redactor.add_secret("hunter2-passphrase");
        redactor.add_secret("ghp_token_value");
        let report = panic_report(
            "main",
            Some("src/x.rs:1:2"),
            "bad header Bearer ghp_token_value for hunter2-passphrase",
            None,
            &redactor,
        );
        assert!(!report.contains("ghp_token_value"), "{report}");
        assert!(!report.contains("hunter2"), "{report}");
        assert!(
            report.contains(
                "thread 'main' panicked at src/x.rs:1:2:\nbad header Bearer [REDACTED] for [REDACTED]\n"
            ),
            "{report}"
        );
        assert!(report.contains("RUST_BACKTRACE=1"), "{report}");
    }

    /// Clean text is borrowed; every class of control character is escaped, the text around
    /// it kept.
    #[test]
    fn terminal_text_escapes_control_characters_only() {
        let clean = "run é 日本 \\n";
        assert!(matches!(terminal_text(clean), Cow::Borrowed(t) if t == clean));
        assert!(matches!(terminal_text(""), Cow::Borrowed("")));
        for (text, shown) in [
            ("a\nb\r\tc", "a\\nb\\r\\tc"),
            ("\u{1b}[2J\u{0}\u{7}", "\\u{1b}[2J\\u{0}\\u{7}"),
            ("del\u{7f}", "del\\u{7f}"),
            (
                "c1 \u{80}\u{9b}31m\u{9f} é",
                "c1 \\u{80}\\u{9b}31m\\u{9f} é",
            ),
        ] {
            let out = terminal_text(text);
            assert!(matches!(out, Cow::Owned(_)), "{text:?}");
            assert_eq!(out, shown);
        }
        // The last character before C1 and the first after it are not controls.
        assert_eq!(terminal_text("\u{7e}\u{a0}"), "\u{7e}\u{a0}");
        // Bidirectional controls and zero-width spaces are escaped; joiners are not.
        assert_eq!(
            terminal_text("txt.\u{202e}fdp\u{200b}\u{2066}"),
            "txt.\\u{202e}fdp\\u{200b}\\u{2066}"
        );
        assert_eq!(
            terminal_text("a\u{2028}b\u{e0041}\u{ad}"),
            "a\\u{2028}b\\u{e0041}\\u{ad}"
        );
        let family = "\u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467}";
        assert!(matches!(terminal_text(family), Cow::Borrowed(_)));
        // Characters that draw nothing yet make two texts differ (found in an approval
        // question): each escaped.
        for c in [
            '\u{180e}',
            '\u{206a}',
            '\u{206e}',
            '\u{fe0f}',
            '\u{34f}',
            '\u{fff9}',
            '\u{2800}',
            '\u{1d173}',
            '\u{e0100}',
        ] {
            let text = format!("a{c}b");
            assert_eq!(terminal_text(&text), format!("a{}b", c.escape_default()));
        }
    }

    #[test]
    fn columns_count_wide_characters_twice() {
        assert_eq!(columns_of("abc"), 3);
        assert_eq!(columns_of("日本語🎉"), 8);
        assert_eq!(padded("日本", 6), "日本  ");
        assert_eq!(padded("toolong", 3), "toolong");
        assert_eq!(cut_to_columns("日本語の名前", 7), "日本語…");
        assert_eq!(cut_to_columns("abcdef", 4), "abc…");
        assert!(matches!(cut_to_columns("abc", 3), Cow::Borrowed("abc")));
    }
}
