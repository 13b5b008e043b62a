//! `agent-runtime audit verify|export|tail|stats` and `bench store`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agent_runtime_core::{Envelope, EventKind, EventQuery, Timestamp};
use agent_runtime_store::{ExportFormat, VerifyReport, verify_bundle};
use anyhow::Context;
use clap::{Args, Subcommand};

use crate::common::{CliError, GlobalArgs, terminal_text};

/// Audit log subcommands.
#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain; exit 1 and name the first broken sequence number when it fails,
    /// exit 3 when the log could not be checked (no database, wrong key, unreadable).
    Verify(VerifyArgs),
    /// Write events as jsonl, otlp (OpenTelemetry logs, OTLP/JSON) or a verifiable bundle.
    Export(ExportArgs),
    /// Print the newest events, and with --follow keep printing new ones.
    Tail(TailArgs),
    /// Count events by kind and run; show the chain head.
    Stats(JsonFlag),
}

#[derive(Args)]
pub struct JsonFlag {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Verify an exported bundle instead of the database (needs no key).
    #[arg(long, value_name = "FILE")]
    pub bundle: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Which events (shared by export and tail).
#[derive(Args, Clone)]
pub struct Filter {
    /// Only this run's events: its id, 4 or more of its first hex digits, or `last`.
    #[arg(long, value_name = "RUN_ID")]
    pub run: Option<String>,
    /// Only these kinds (repeat or comma-separate: --kind task.failed,tool.failed).
    #[arg(long, value_delimiter = ',')]
    pub kind: Vec<String>,
    /// Only events at or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Only events before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
}

impl Filter {
    /// The query, but for `--run`, which needs the store to resolve (see [`Filter::resolve_run`]).
    fn to_query(&self) -> Result<EventQuery, CliError> {
        let usage = |e: String| CliError::Usage(e);
        let query = EventQuery {
            run_id: None,
            kinds: self
                .kind
                .iter()
                .map(|k| k.parse::<EventKind>())
                .collect::<Result<_, _>>()
                .map_err(|e| usage(format!("--kind: {e}")))?,
            since: self
                .since
                .as_deref()
                .map(str::parse::<Timestamp>)
                .transpose()
                .map_err(|e| usage(format!("--since: {e}")))?,
            until: self
                .until
                .as_deref()
                .map(str::parse::<Timestamp>)
                .transpose()
                .map_err(|e| usage(format!("--until: {e}")))?,
            after_seq: None,
            limit: None,
        };
        if let (Some(since), Some(until)) = (query.since, query.until)
            && since > until
        {
            return Err(usage(format!(
                "--since {since} is after --until {until}: no event can match"
            )));
        }
        Ok(query)
    }

    /// `--run` as the workforce commands take a run: a whole id, `last`, or the start of an id.
    fn resolve_run(
        &self,
        store: &agent_runtime_store::Store,
        query: &mut EventQuery,
    ) -> anyhow::Result<()> {
        if let Some(arg) = &self.run {
            let id = crate::workforce::resolve_run_id(store, arg).map_err(|e| {
                match e.downcast::<CliError>() {
                    Ok(CliError::Usage(m)) => CliError::Usage(format!("--run: {m}")).into(),
                    Ok(other) => other.into(),
                    Err(e) => e,
                }
            })?;
            query.run_id = Some(id);
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct ExportArgs {
    /// jsonl, otlp or bundle.
    #[arg(long, default_value = "jsonl")]
    pub format: String,
    /// Write here instead of standard output (`-` is standard output too).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub filter: Filter,
    /// Print a JSON summary (to standard error when exporting to standard output).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct TailArgs {
    /// How many of the newest events to print first.
    #[arg(short = 'n', long, default_value_t = 20)]
    pub lines: usize,
    /// Keep printing new events as they are committed (Ctrl-C to stop).
    #[arg(short, long)]
    pub follow: bool,
    #[command(flatten)]
    pub filter: Filter,
    /// Print each event as a JSON line (the audit envelope).
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: AuditCommand, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify(args) => verify(args, global),
        AuditCommand::Export(args) => export(args, global),
        AuditCommand::Tail(args) => tail(args, global),
        AuditCommand::Stats(args) => stats(args, global),
    }
}

/// Prints a verification report; exit 1 when it found a problem.
pub fn print_report(report: &VerifyReport, source: &str, json: bool) -> ExitCode {
    if json {
        outln!(
            "{}",
            serde_json::json!({"source": source, "ok": report.problem.is_none(), "report": report})
        );
    } else if let Some(p) = &report.problem {
        outln!(
            "FAILED {source}: {p} ({} events verified before it)",
            report.events
        );
    } else {
        outln!(
            "ok {source}: {} events, chain head {} at sequence {}",
            report.events,
            report.head,
            report.last_seq
        );
    }
    if report.problem.is_some() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn verify(args: VerifyArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    // A report with a problem exits 1 (`print_report`), as does a file found damaged before
    // any report could be made (checked, and found changed); not getting to look at all (no
    // database, a wrong key, a locked file) exits 3. With --json, either is a JSON line too.
    let source = args
        .bundle
        .clone()
        .unwrap_or_else(|| global.store_config().path().to_path_buf());
    let json = args.json;
    // A database found damaged, or a bundle that is not well formed, was checked and found
    // not intact: exit 1, as for a broken chain.
    let not_verified = |e: anyhow::Error| {
        let damaged = matches!(
            e.downcast_ref::<agent_runtime_store::StoreError>(),
            Some(
                agent_runtime_store::StoreError::Damaged { .. }
                    | agent_runtime_store::StoreError::BadBundle { .. }
            )
        );
        if json {
            outln!(
                "{}",
                serde_json::json!({"source": source.display().to_string(), "ok": false,
                                   "checked": damaged, "error": e.to_string()})
            );
        }
        if damaged {
            CliError::Failed(e.to_string())
        } else {
            CliError::NotVerified(e)
        }
    };
    if let Some(bundle) = &args.bundle {
        let report = verify_bundle(bundle).map_err(|e| not_verified(e.into()))?;
        return Ok(print_report(
            &report,
            &bundle.display().to_string(),
            args.json,
        ));
    }
    let store = global.open_store_read_only().map_err(not_verified)?;
    let report = store.verify().map_err(|e| not_verified(e.into()))?;
    Ok(print_report(
        &report,
        &store.path().display().to_string(),
        args.json,
    ))
}

fn export(args: ExportArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let format: ExportFormat = args
        .format
        .parse()
        .map_err(|e: String| CliError::Usage(format!("--format: {e}")))?;
    let mut query = args.filter.to_query()?;
    if format == ExportFormat::Bundle
        && (query != EventQuery::default() || args.filter.run.is_some())
    {
        return Err(CliError::Usage("--format bundle holds the whole chain: it cannot be combined with --run, --kind, --since or --until".into()).into());
    }
    let store = global.open_store_read_only()?;
    args.filter.resolve_run(&store, &mut query)?;
    // `-o -` is standard output, as for most tools, not a file named `-`.
    let output = args.output.as_ref().filter(|p| p.as_os_str() != "-");
    // The summary goes beside the data only when the data went to a file: a device or pipe
    // (`-o /dev/stdout | ...`) may be standard output itself, where the line would end up in
    // the export (and make a bundle fail verification).
    let mut summary_to_stdout = output.is_some();
    let summary = match output {
        Some(path) => {
            let (summary, to_stream) = export_to(&store, &query, format, path)?;
            summary_to_stdout = !to_stream;
            summary
        }
        None => store
            .export(&query, format, std::io::stdout().lock())
            .map_err(|e| naming_output(e, "to standard output"))?,
    };
    let line = if args.json {
        serde_json::json!({"events": summary.events, "bytes": summary.bytes, "format": args.format, "output": output}).to_string()
    } else {
        format!(
            "exported {} events ({} bytes) as {} to {}",
            summary.events,
            summary.bytes,
            args.format,
            output.map_or("standard output".into(), |p| p.display().to_string())
        )
    };
    if summary_to_stdout {
        outln!("{line}")
    } else {
        eprintln!("{line}")
    }
    Ok(ExitCode::SUCCESS)
}

/// Exports `query` as `format` to `path` as `audit export -o` does: a device or a pipe
/// (`/dev/stdout`, a FIFO) written in place, a regular file (new or existing, through a link)
/// written beside it and renamed onto it, never the database being exported or a companion of
/// it. Says whether it went to a stream (where a summary line must not follow it).
pub(crate) fn export_to(
    store: &agent_runtime_store::Store,
    query: &EventQuery,
    format: ExportFormat,
    path: &std::path::Path,
) -> anyhow::Result<(agent_runtime_store::ExportSummary, bool)> {
    Ok(match check_export_target(store, path)? {
        ExportTarget::Stream => {
            // Renaming a file onto a device would replace the device node itself.
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let summary = store
                .export(query, format, file)
                .map_err(|e| naming_output(e, &path.display().to_string()))?;
            (summary, true)
        }
        ExportTarget::File => {
            // Written beside the target and renamed onto it: a failed export leaves no half
            // file, and the replaced file's permissions are kept.
            let summary = agent_runtime_core::fs::replace(path, |f| {
                store
                    .export(query, format, f)
                    .map_err(|e| naming_output(e, &path.display().to_string()))
            })
            .map_err(|e| {
                if e.is::<std::io::Error>() {
                    e.context(format!("cannot write {}", path.display()))
                } else {
                    e
                }
            })?;
            (summary, false)
        }
    })
}

/// An export's failure to write its output named by that output (`out`: a path, or "to
/// standard output"), which the store does not know; other errors as they are.
fn naming_output(e: agent_runtime_store::StoreError, out: &str) -> anyhow::Error {
    match e {
        agent_runtime_store::StoreError::ExportOutput { source, .. } => {
            anyhow::Error::new(source).context(format!("cannot write {out}"))
        }
        other => other.into(),
    }
}

/// Where an export to `path` goes, refusing what [`export_to`] refuses (a folder, the
/// database being exported or a companion of it): the demo checks before it runs a graph.
pub(crate) fn check_export_target(
    store: &agent_runtime_store::Store,
    path: &std::path::Path,
) -> anyhow::Result<ExportTarget> {
    let kind = ExportTarget::of(path)?;
    if let ExportTarget::File = kind {
        let target = agent_runtime_core::fs::link_target(path)
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        refuse_the_database(path, &target, store.path())?;
    }
    Ok(kind)
}

/// Where an export to a named output goes.
pub(crate) enum ExportTarget {
    /// A regular file, new or existing (see [`agent_runtime_core::fs::replace`]): written
    /// beside it and renamed onto it; a symbolic link is followed, so the file it names is
    /// replaced or made and the link stays.
    File,
    /// Anything else that exists (a character device, a FIFO, a socket): written in place.
    Stream,
}

/// Refuses an output that is the database being exported, or one of its companion files:
/// renaming the export over it would destroy the log it was read from.
fn refuse_the_database(
    given: &std::path::Path,
    target: &std::path::Path,
    db: &std::path::Path,
) -> anyhow::Result<()> {
    let resolved = |p: &std::path::Path| -> Option<PathBuf> {
        std::fs::canonicalize(p).ok().or_else(|| {
            let parent = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            Some(std::fs::canonicalize(parent).ok()?.join(p.file_name()?))
        })
    };
    let (Some(target), Some(db)) = (resolved(target), resolved(db)) else {
        return Ok(());
    };
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut companion = db.as_os_str().to_owned();
        companion.push(suffix);
        if target.as_os_str() == companion {
            return Err(CliError::Usage(format!(
                "-o {}: is the event database being exported{}; name another file",
                given.display(),
                if suffix.is_empty() {
                    String::new()
                } else {
                    format!(" (its {suffix} file)")
                }
            ))
            .into());
        }
    }
    Ok(())
}

impl ExportTarget {
    fn of(path: &std::path::Path) -> anyhow::Result<ExportTarget> {
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => Ok(ExportTarget::File),
            Ok(m) if m.is_dir() => Err(CliError::Usage(format!(
                "-o {}: is a directory; name a file",
                path.display()
            ))
            .into()),
            Ok(_) => Ok(ExportTarget::Stream),
            // A new file, or a link to a file not made yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ExportTarget::File),
            Err(e) => {
                Err(anyhow::Error::new(e).context(format!("cannot write {}", path.display())))
            }
        }
    }
}

/// One event as a line for people. The payload's JSON escapes C0 controls, not DEL or C1, and
/// the actor is any text: the line goes through [`terminal_text`].
pub fn human_line(e: &Envelope) -> String {
    let task = e.task_id.map(|t| format!(" task={t}")).unwrap_or_default();
    let payload = agent_runtime_core::canonical_json(&e.payload);
    let mut payload = String::from_utf8_lossy(&payload).into_owned();
    if payload.len() > 160 {
        let mut cut = 157;
        while !payload.is_char_boundary(cut) {
            cut -= 1;
        }
        payload.truncate(cut);
        payload.push_str("...");
    }
    let line = format!(
        "{:>6} {} {:<22} {:<20} run={}{} {}",
        e.seq,
        e.time,
        e.kind.as_str(),
        e.actor.to_string(),
        e.run_id,
        task,
        payload
    );
    match terminal_text(&line) {
        std::borrow::Cow::Borrowed(_) => line,
        escaped => escaped.into_owned(),
    }
}

/// Events `audit tail` reads and prints at a time.
const TAIL_PAGE: usize = 4096;

fn tail(args: TailArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let mut query = args.filter.to_query()?;
    let store = global.open_store_read_only()?;
    args.filter.resolve_run(&store, &mut query)?;
    // The newest N matching events: find where they start, then read forward.
    let head = store.head()?.map_or(0, |h| h.0);
    let start = store.start_of_last(&query, args.lines, head)?;
    let mut out = std::io::stdout().lock();
    let mut print = |events: &[Envelope]| -> std::io::Result<()> {
        for e in events {
            if args.json {
                serde_json::to_writer(&mut out, e)?;
                out.write_all(b"\n")?;
            } else {
                writeln!(out, "{}", human_line(e))?;
            }
        }
        out.flush()
    };
    // Read and printed a page at a time: `-n 1000000` held a million events at once.
    let mut last = start;
    loop {
        let mut q = query.clone();
        q.after_seq = Some(last);
        q.limit = Some(TAIL_PAGE);
        let page = store.query_blocking(&q)?;
        // A reader that went away (a closed pipe) ends the command with 141, see `main`.
        print(&page)?;
        match page.last() {
            Some(e) if page.len() == TAIL_PAGE && e.seq < head => last = e.seq,
            Some(e) => {
                last = e.seq;
                break;
            }
            None => break,
        }
    }
    if !args.follow {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        // Every event up to the head read here is looked at by the next call: later calls start
        // past it, so a filter that matches nothing does not re-read the log at every poll.
        let head = store.head()?.map_or(0, |(seq, _)| seq);
        let new = store.follow_blocking(&query, last, Duration::from_millis(250))?;
        last = last.max(head);
        if let Some(e) = new.last() {
            last = last.max(e.seq);
        }
        print(&new)?;
        // Events are recorded with the time they happen at: once the clock is past --until,
        // what comes next is later still (a simulation's virtual times aside), so following
        // ends there instead of waiting forever for nothing. Not at once: an event stamped
        // just before --until may reach the log a little later (a group commit, another
        // process), so it ends after a grace period with nothing new.
        const GRACE: Duration = Duration::from_secs(5);
        if let Some(until) = query.until
            && std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .is_ok_and(|now| {
                    now.as_nanos() >= u128::from(until.as_unix_nanos()) + GRACE.as_nanos()
                })
            && new.is_empty()
        {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

fn stats(args: JsonFlag, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let store = global.open_store_read_only()?;
    let s = store.stats()?;
    if args.json {
        outln!("{}", serde_json::to_string(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("database   {}", s.path);
    outln!("size       {} bytes", s.bytes);
    outln!(
        "encrypted  {}",
        if s.encrypted {
            "yes (XChaCha20-Poly1305)"
        } else {
            "no (plaintext)"
        }
    );
    outln!("events     {}", s.events);
    outln!("runs       {}", s.runs);
    if let (Some(a), Some(b)) = (&s.first_time, &s.last_time) {
        outln!("time       {a} .. {b}");
    }
    outln!(
        "head       {} {}",
        s.head_seq,
        s.head_hash.as_deref().unwrap_or("-")
    );
    for (k, n) in &s.kinds {
        outln!("  {k:<24} {n}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `bench store`.
#[derive(Args)]
pub struct StoreBenchArgs {
    /// Events per measurement.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 512)]
    pub payload_bytes: usize,
    /// Events per append call.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Concurrent appenders (threads), 1 to 64.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub appenders: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn bench(args: StoreBenchArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    if args.events == 0 || args.batch == 0 {
        return Err(CliError::Usage("--events and --batch must be at least 1".into()).into());
    }
    // Checked before any event is built: the bench holds every event in memory first.
    let max_payload = agent_runtime_store::MAX_PAYLOAD_BYTES;
    if args.payload_bytes > max_payload {
        return Err(CliError::Usage(format!(
            "--payload-bytes {} is over the store's limit of {max_payload} bytes per payload",
            args.payload_bytes
        ))
        .into());
    }
    const MAX_BENCH_BYTES: u64 = 2 << 30;
    if (args.payload_bytes as u64).saturating_mul(args.events) > MAX_BENCH_BYTES {
        return Err(CliError::Usage(format!(
            "--events {} of --payload-bytes {} is over {MAX_BENCH_BYTES} bytes of events, which the bench builds in memory first",
            args.events, args.payload_bytes
        ))
        .into());
    }
    let report = agent_runtime_store::bench::run_under(
        &agent_runtime_store::bench::BenchConfig {
            events: args.events,
            payload_bytes: args.payload_bytes,
            batch: args.batch,
            // At most 64, by the argument's parser.
            appenders: usize::try_from(args.appenders).unwrap_or(64),
        },
        &global.bench_folder()?,
    )?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!("{}", report.summary());
    }
    Ok(ExitCode::SUCCESS)
}
