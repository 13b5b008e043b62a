//! The `audit` and `demo` commands, driven as a person would from a shell.

mod common;

use assert_cmd::Command;
use common::closed_pipe;
use predicates::prelude::*;

/// `agent-runtime --db DB` with a passphrase, and the user's data folder (the trust record of
/// `demo`, which runs tools) beside the database, not the real user's.
fn cli(db: &std::path::Path) -> Command {
    let mut cmd = Command::cargo_bin("agent-runtime").unwrap();
    cmd.env("AGENT_RUNTIME_PASSPHRASE", "cli test passphrase")
        .env(
            "XDG_DATA_HOME",
            db.parent()
                .unwrap_or(std::path::Path::new("."))
                .join("data"),
        )
        .env_remove("AGENT_RUNTIME_DB")
        .arg("--db")
        .arg(db);
    cmd
}

fn demo(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let db = dir.path().join("events.db");
    cli(&db)
        .arg("demo")
        .assert()
        .success()
        .stdout(predicate::str::contains("verified   39 events"))
        .stdout(predicate::str::contains("exported   39 events"));
    db
}

#[test]
fn demo_then_verify_tail_stats_export() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo(&dir);
    // The demo's run is a real one: it replays, and `runs show` names its tasks.
    cli(&db)
        .args(["replay", "last"])
        .assert()
        .success()
        .stdout(predicate::str::contains("23 events match (completed)"));
    cli(&db)
        .args(["runs", "show", "last"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("summarize  completed")
                .and(predicate::str::contains("output from continue_with")),
        );
    // Its export holds payloads in clear: only its owner may read it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let export = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with(".jsonl"))
            .unwrap();
        let mode = std::fs::metadata(&export).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", export.display());
        assert_eq!(
            std::fs::read_to_string(&export).unwrap().lines().count(),
            39
        );
    }
    // `-o` the database itself is refused before anything runs, as `audit export` refuses it;
    // a device is written in place.
    cli(&db)
        .args(["demo", "-o"])
        .arg(&db)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "is the event database being exported",
        ));
    cli(&db)
        .args(["audit", "stats", "--json"])
        .assert()
        .success()
        .stdout(predicate::str::contains("\"events\":39"));
    cli(&db)
        .args(["audit", "verify"])
        .assert()
        .success()
        .stdout(predicate::str::starts_with("ok "));
    cli(&db)
        .args(["audit", "verify", "--json"])
        .assert()
        .success()
        .stdout(predicate::str::contains("\"ok\":true"));
    cli(&db)
        .args(["audit", "tail", "-n", "2"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("task.completed")
                .and(predicate::str::contains("run.completed")),
        )
        .stdout(predicate::function(|s: &str| s.lines().count() == 2));
    cli(&db)
        .args(["audit", "stats", "--json"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("\"events\":39")
                .and(predicate::str::contains("\"encrypted\":true")),
        );
    let out = dir.path().join("x.jsonl");
    cli(&db)
        .args(["audit", "export", "--kind", "task.completed", "-o"])
        .arg(&out)
        .assert()
        .success();
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 3);
    let otlp = dir.path().join("x.otlp.jsonl");
    cli(&db)
        .args(["audit", "export", "--format", "otlp", "-o"])
        .arg(&otlp)
        .assert()
        .success();
    assert!(
        std::fs::read_to_string(&otlp)
            .unwrap()
            .contains("resourceLogs")
    );
    // A device is written in place, never replaced by a file (as root, a rename would).
    cli(&db)
        .args(["demo", "-o", "/dev/null"])
        .assert()
        .success();
    assert!(!std::fs::metadata("/dev/null").unwrap().is_file());
}

#[test]
fn bundle_verifies_offline_without_key_or_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo(&dir);
    let bundle = dir.path().join("audit.bundle");
    cli(&db)
        .args(["audit", "export", "--format", "bundle", "-o"])
        .arg(&bundle)
        .assert()
        .success();
    std::fs::remove_file(&db).unwrap();
    Command::cargo_bin("agent-runtime")
        .unwrap()
        .env_remove("AGENT_RUNTIME_PASSPHRASE")
        .args(["audit", "verify", "--bundle"])
        .arg(&bundle)
        .assert()
        .success()
        .stdout(predicate::str::contains("39 events"));

    // A bundle that is not well formed was checked and found not intact: exit 1, naming the
    // line. Only one that cannot be read at all is "not verified" (exit 3).
    let text = std::fs::read_to_string(&bundle).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let cut_mid_line = &text[..text.len() - lines.last().unwrap().len() / 2 - 1];
    let with_line_3 = |extra: &str| {
        let mut l = lines.clone();
        l.insert(2, extra);
        l.join("\n") + "\n"
    };
    for (content, says) in [
        (with_line_3(""), "line 3: an empty line"),
        (with_line_3("garbage"), "line 3: not an audit envelope"),
        (cut_mid_line.to_string(), "line 41:"),
    ] {
        let bad = dir.path().join("bad.bundle");
        std::fs::write(&bad, content).unwrap();
        cli(&db)
            .args(["audit", "verify", "--bundle"])
            .arg(&bad)
            .assert()
            .code(1)
            .stderr(predicate::str::contains(says));
    }
    // An endless line is refused after a bounded read, not read into memory whole.
    cli(&db)
        .args(["audit", "verify", "--bundle", "/dev/zero"])
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .code(1)
        .stderr(predicate::str::contains("line 1: a line longer than"));
}

#[test]
fn tampered_log_fails_verify_with_exit_1_naming_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo(&dir);
    let conn = rusqlite::Connection::open(&db).unwrap();
    // As an attacker would: past the append-only trigger, one byte of event 6's sealed payload.
    let (first, prev, mut body): (i64, Vec<u8>, Vec<u8>) = conn
        .query_row(
            "SELECT first_seq, prev_hash, body FROM frames WHERE first_seq <= 6 ORDER BY first_seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let at = agent_runtime_store::frame::records(first as u64, &prev, &body)
        .map(Result::unwrap)
        .find(|r| r.seq == 6)
        .map(|r| r.payload.as_ptr() as usize - body.as_ptr() as usize)
        .unwrap();
    body[at + 20] ^= 0x01;
    conn.execute_batch("DROP TRIGGER frames_append_only_update")
        .unwrap();
    conn.execute(
        "UPDATE frames SET body = ?1 WHERE first_seq = ?2",
        rusqlite::params![body, first],
    )
    .unwrap();
    drop(conn);
    cli(&db).args(["audit", "verify"]).assert().code(1).stdout(
        predicate::str::contains("FAILED")
            .and(predicate::str::contains("sequence 6: payload changed")),
    );
}

#[test]
fn bad_input_gives_one_line_and_the_right_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo(&dir);
    // Usage errors: exit 2.
    for args in [
        vec!["audit", "export", "--format", "xml"],
        vec!["audit", "tail", "--kind", "no.such"],
        vec!["audit", "tail", "--run", "not-a-uuid"],
        vec!["audit", "export", "--format", "bundle", "--kind", "note"],
        vec!["audit", "frobnicate"],
    ] {
        let out = cli(&db).args(&args).assert().code(2).get_output().clone();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{args:?}: {err}"
        );
    }
    // A mistyped kind is suggested; a pasted megabyte is quoted short.
    cli(&db)
        .args(["audit", "tail", "--kind", "task.complete"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "--kind: unknown event kind \"task.complete\" (did you mean `task.completed`?)",
        ));
    let long = "k".repeat(100_000);
    let out = cli(&db)
        .args(["audit", "export", "--kind", &long])
        .assert()
        .code(2)
        .get_output()
        .clone();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.len() < 400 && err.contains("(100000 characters)"),
        "{err}"
    );
    // A text file as --db is named as what it is, not as a broken event database.
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "hello\n").unwrap();
    cli(&text)
        .args(["runs", "list"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "does not begin as an SQLite database does: not an event database",
        ));
    assert_eq!(std::fs::read_to_string(&text).unwrap(), "hello\n");
    // Wrong passphrase: one line, exit 3 (not verified: unlike 1, nothing was found changed),
    // the passphrase not echoed.
    let out = Command::cargo_bin("agent-runtime")
        .unwrap()
        .env("AGENT_RUNTIME_PASSPHRASE", "hunter2-wrong")
        .arg("--db")
        .arg(&db)
        .args(["audit", "verify"])
        .assert()
        .code(3)
        .get_output()
        .clone();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("wrong passphrase") && !err.contains("hunter2"),
        "{err}"
    );
    // Missing key.
    Command::cargo_bin("agent-runtime")
        .unwrap()
        .env_remove("AGENT_RUNTIME_PASSPHRASE")
        .arg("--db")
        .arg(&db)
        .args(["audit", "stats"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "is encrypted: set AGENT_RUNTIME_PASSPHRASE",
        ));
    // No database, no bundle: not verified, exit 3; other commands keep exit 1.
    cli(&dir.path().join("missing.db"))
        .args(["audit", "verify"])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("no event database at"));
    cli(&dir.path().join("missing.db"))
        .args(["audit", "stats"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no event database at"));
    // Following up to a time already past ends, with what there was, instead of waiting.
    cli(&db)
        .args([
            "audit",
            "tail",
            "--follow",
            "--until",
            "2100-01-01T00:00:00Z",
        ])
        .timeout(std::time::Duration::from_secs(1))
        .assert()
        .interrupted();
    cli(&db)
        .args([
            "audit",
            "tail",
            "--follow",
            "--until",
            "2001-01-01T00:00:00Z",
        ])
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .success();
    // A time range that cannot hold anything is refused; RFC 3339 offsets are read.
    cli(&db)
        .args([
            "audit",
            "export",
            "--since",
            "2026-01-02T00:00:00Z",
            "--until",
            "2026-01-01T00:00:00Z",
        ])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("is after --until"));
    cli(&db)
        .args([
            "audit",
            "export",
            "--since",
            "2000-01-01T01:00:00+01:00",
            "--until",
            "2100-01-01t00:00:00z",
        ])
        .assert()
        .success();
    // A folder is named as such, for readers and writers alike.
    for args in [&["audit", "verify"][..], &["demo"][..]] {
        cli(dir.path())
            .args(args)
            .assert()
            .stderr(predicate::str::contains("is a folder, not a database file"));
    }
    // A file found damaged was checked: exit 1, as for a changed event (here it is no SQLite
    // file at all); with --json, a JSON line says so too.
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "just some notes, long enough to be read as a header............................................................................").unwrap();
    let out = cli(&text)
        .args(["audit", "verify", "--json"])
        .assert()
        .code(1)
        .get_output()
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["ok"].as_bool(), v["checked"].as_bool()),
        (Some(false), Some(true))
    );
    // Another program's SQLite file given by mistake is not checked (exit 3): no alarm for a
    // typo in --db.
    let other = dir.path().join("other.sqlite");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t(x);")
        .unwrap();
    let out = cli(&other)
        .args(["audit", "verify", "--json"])
        .assert()
        .code(3)
        .stderr(predicate::str::contains(
            "not an agent-runtime event database",
        ))
        .get_output()
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["checked"].as_bool(), Some(false));
    // Not checked at all (no database): exit 3, and the JSON line says that.
    let out = cli(&dir.path().join("missing.db"))
        .args(["audit", "verify", "--json"])
        .assert()
        .code(3)
        .get_output()
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["ok"].as_bool(), v["checked"].as_bool()),
        (Some(false), Some(false))
    );
    // Commands that work on what a database holds never create one for a mistyped --db.
    for args in [&["cancel", "last"][..], &["resume", "last"][..]] {
        cli(&dir.path().join("typo.db"))
            .args(args)
            .assert()
            .code(1)
            .stderr(predicate::str::contains("no event database at"));
    }
    assert!(!dir.path().join("typo.db").exists());
    assert!(!dir.path().join("typo.db-runs").exists());
    // An empty file is no database yet, not a damaged one (which would exit 1).
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    cli(&empty)
        .args(["audit", "verify"])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("no event database at"));
    cli(&db)
        .args(["audit", "verify", "--bundle"])
        .arg(dir.path().join("missing.bundle"))
        .assert()
        .code(3)
        .stderr(predicate::str::contains("missing.bundle"));
    // A new database needs a key or --plaintext.
    Command::cargo_bin("agent-runtime")
        .unwrap()
        .env_remove("AGENT_RUNTIME_PASSPHRASE")
        .arg("--db")
        .arg(dir.path().join("new.db"))
        .arg("demo")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("--plaintext"));
}

#[test]
fn plaintext_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("plain.db");
    Command::cargo_bin("agent-runtime")
        .unwrap()
        .env_remove("AGENT_RUNTIME_PASSPHRASE")
        .args(["--plaintext", "--db"])
        .arg(&db)
        .arg("demo")
        .assert()
        .success()
        .stdout(predicate::str::contains("(plaintext)"));
    Command::cargo_bin("agent-runtime")
        .unwrap()
        .env_remove("AGENT_RUNTIME_PASSPHRASE")
        .arg("--db")
        .arg(&db)
        .args(["audit", "verify"])
        .assert()
        .success();
}

#[test]
fn bench_store_prints_json_with_a_baseline() {
    // The bench measures beside the database --db names (its disk), in a folder it removes.
    let dir = tempfile::tempdir().unwrap();
    Command::cargo_bin("agent-runtime")
        .unwrap()
        .arg("--db")
        .arg(dir.path().join("missing/x.db"))
        .args(["bench", "store", "--events", "10"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("missing does not exist"));
    let out = Command::cargo_bin("agent-runtime")
        .unwrap()
        .arg("--db")
        .arg(dir.path().join("x.db"))
        .args([
            "bench", "store", "--events", "2000", "--batch", "100", "--json",
        ])
        .assert()
        .success()
        .get_output()
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["baseline_sqlite_insert"]["per_second"].as_f64().unwrap() > 0.0);
    assert!(v["encrypted_vs_baseline"].as_f64().unwrap() > 0.0);
    assert_eq!(v["verify_encrypted"]["events"], 2000);
    assert_eq!(v["export_jsonl_encrypted"]["events"], 2000);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// No iterations would report a p50 of 0 µs, which reads as the goal met, and billions would
/// never end while the in-memory log grows: both refused, naming the range; so are appenders
/// past 64.
#[test]
fn bench_counts_out_of_range_are_refused() {
    for args in [
        &["bench", "gateway", "--iterations", "0"][..],
        &["bench", "gateway", "--iterations", "4294967295"],
        &["bench", "store", "--appenders", "100000"],
        &["bench", "store", "--appenders", "0"],
    ] {
        let range = if args[1] == "gateway" {
            "1..=200000"
        } else {
            "1..=64"
        };
        Command::cargo_bin("agent-runtime")
            .unwrap()
            .args(args)
            .timeout(std::time::Duration::from_secs(30))
            .assert()
            .code(2)
            .stderr(predicate::str::contains(args[2]).and(predicate::str::contains(range)));
    }
}

/// Sizes the bench could not hold are refused before any event is built (a payload of 100 GB
/// ran the machine out of memory first).
#[test]
fn bench_store_refuses_sizes_up_front() {
    for (args, says) in [
        (
            ["--payload-bytes", "99999999999", "--events", "1"],
            "--payload-bytes 99999999999 is over the store's limit of 16777216",
        ),
        (
            ["--payload-bytes", "100000", "--events", "100000"],
            "which the bench builds in memory first",
        ),
    ] {
        Command::cargo_bin("agent-runtime")
            .unwrap()
            .args(["bench", "store"])
            .args(args)
            .timeout(std::time::Duration::from_secs(30))
            .assert()
            .code(2)
            .stderr(predicate::str::contains(says));
    }
}

#[test]
fn tail_follow_sees_events_another_process_appends() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let db = demo(&dir);
    let bin = assert_cmd::cargo::cargo_bin("agent-runtime");
    let mut follower = std::process::Command::new(&bin)
        .env("AGENT_RUNTIME_PASSPHRASE", "cli test passphrase")
        .arg("--db")
        .arg(&db)
        .args([
            "audit",
            "tail",
            "-n",
            "1",
            "--follow",
            "--kind",
            "run.completed",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    // Lines arrive on a channel so that a follower that never prints fails the test in bounded
    // time instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| {
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no {what} from tail --follow within 60 s"))
            .unwrap()
    };
    // The newest matching event first: once it is printed, the follower is following.
    let first = next("first line");
    assert!(
        first.trim_start().starts_with("39 ") && first.contains("run.completed"),
        "{first}"
    );
    // Another process appends a second run.
    cli(&db).arg("demo").assert().success();
    let second = next("line for the second run");
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(second.contains("run.completed"), "{second}");
    assert!(
        second.trim_start().starts_with("78 "),
        "the second run's last event is sequence 78: {second}"
    );
}

#[cfg(unix)]
#[test]
fn a_reader_that_goes_away_ends_the_command_quietly_with_141() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo(&dir);
    // `println!` output (stats, runs list) and writer output (export, tail) alike.
    for args in [
        &["audit", "stats"][..],
        &["runs", "list"],
        &["audit", "export"],
        &["audit", "tail"],
    ] {
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("agent-runtime"))
            .env("AGENT_RUNTIME_PASSPHRASE", "cli test passphrase")
            .env_remove("AGENT_RUNTIME_DB")
            .arg("--db")
            .arg(&db)
            .args(args)
            .stdout(closed_pipe())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!stderr.contains("error"), "{args:?}: {stderr}");
    }
}

/// `-o` onto something that is not a regular file is written in place: a FIFO stays a FIFO
/// (renaming a finished file onto it would replace the node, as it once replaced `/dev/null`),
/// a symbolic link stays a link and its file gets the export, a directory is refused, and `-` is
/// standard output.
#[cfg(unix)]
#[test]
fn export_writes_through_pipes_and_links_without_replacing_them() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let db = demo(&dir);
    let fifo = dir.path().join("events.fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(&fifo).unwrap())
    };
    cli(&db)
        .args(["audit", "export", "--format", "jsonl", "-o"])
        .arg(&fifo)
        .assert()
        .success()
        .stdout("")
        .stderr(predicate::str::contains("exported 39 events"));
    // Checked before joining: a reader of a FIFO that was replaced would wait forever.
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert_eq!(reader.join().unwrap().lines().count(), 39);
    assert!(!dir.path().join("events.fifo.partial").exists());

    let real = dir.path().join("real.jsonl");
    std::fs::write(&real, "old").unwrap();
    let link = dir.path().join("link.jsonl");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    cli(&db)
        .args(["audit", "export", "-o"])
        .arg(&link)
        .assert()
        .success();
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_to_string(&real).unwrap().lines().count(), 39);
    // A link to a file not there yet: the file is created, the link stays.
    let dangling = dir.path().join("dangling.jsonl");
    std::os::unix::fs::symlink("made-by-export.jsonl", &dangling).unwrap();
    cli(&db)
        .args(["audit", "export", "-o"])
        .arg(&dangling)
        .assert()
        .success();
    assert!(
        std::fs::symlink_metadata(&dangling)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let made = dir.path().join("made-by-export.jsonl");
    assert_eq!(std::fs::read_to_string(&made).unwrap().lines().count(), 39);

    cli(&db)
        .args(["audit", "export", "-o"])
        .arg(dir.path())
        .assert()
        .code(2)
        .stderr(predicate::str::contains("is a directory"));

    // `-o -` is standard output, not a file named `-` in the working directory.
    let out = cli(&db)
        .current_dir(dir.path())
        .args(["audit", "export", "-o", "-"])
        .assert()
        .success()
        .stderr(predicate::str::contains("to standard output"));
    assert_eq!(
        String::from_utf8_lossy(&out.get_output().stdout)
            .lines()
            .count(),
        39
    );
    assert!(!dir.path().join("-").exists());

    // `-o /dev/stdout` into a pipe: the export alone reaches it, and a bundle so written
    // verifies (the summary line once followed the chain head there).
    let out = cli(&db)
        .args(["audit", "export", "--format", "bundle", "-o", "/dev/stdout"])
        .assert()
        .success()
        .stderr(predicate::str::contains("exported 39 events"));
    let bundle = dir.path().join("piped.bundle");
    std::fs::write(&bundle, &out.get_output().stdout).unwrap();
    cli(&db)
        .args(["audit", "verify", "--bundle"])
        .arg(&bundle)
        .assert()
        .success();
}

/// An export never replaces the database it reads, and never loosens a file's permissions: it
/// holds the payloads in clear.
#[test]
fn export_keeps_the_database_and_file_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = demo(&dir);
    for target in [db.clone(), dir.path().join("events.db-wal")] {
        cli(&db)
            .args(["audit", "export", "-o"])
            .arg(&target)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(
                "is the event database being exported",
            ));
    }
    // Named another way (through `..`), still the database.
    cli(&db)
        .current_dir(dir.path())
        .args(["audit", "export", "-o", "../"])
        .arg(format!(
            "{}/events.db",
            dir.path().file_name().unwrap().to_string_lossy()
        ))
        .assert()
        .code(2);
    cli(&db).args(["audit", "verify"]).assert().success();

    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let private = dir.path().join("private.bundle");
    std::fs::write(&private, "old").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o640)).unwrap();
    let fresh = dir.path().join("fresh.bundle");
    for target in [&private, &fresh] {
        cli(&db)
            .args(["audit", "export", "--format", "bundle", "-o"])
            .arg(target)
            .assert()
            .success();
    }
    assert_eq!(mode(&private), 0o640);
    assert_eq!(mode(&fresh), 0o600);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

/// Readers work on read-only media (an archive, a folder the reader cannot write), where
/// SQLite cannot make the shared-memory file a WAL database is read through: the file alone
/// is read when its write-ahead log is empty, and a log that holds events is refused, naming
/// what to do, rather than read without them. The reader is a user who cannot write the
/// folder: `nobody` when the tests run as root (root writes anywhere), else the test's user.
#[test]
fn readers_work_on_read_only_media() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let set_mode = |p: &std::path::Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    set_mode(dir.path(), 0o755);
    // A copy of the binary another user can run, wherever the build is.
    let bin = dir.path().join("agent-runtime");
    std::fs::copy(assert_cmd::cargo::cargo_bin("agent-runtime"), &bin).unwrap();
    set_mode(&bin, 0o755);
    // A name with the characters a SQLite URI gives meanings to, and one not UTF-8.
    let archive = dir
        .path()
        .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"arch ive%3f?#\xff"));
    std::fs::create_dir(&archive).unwrap();
    let db = archive.join("events.db");
    cli(&db).arg("--plaintext").arg("demo").assert().success();
    // The same database copied while a writer had events in its write-ahead log.
    let pending = dir.path().join("pending");
    std::fs::create_dir(&pending).unwrap();
    let writer = rusqlite::Connection::open(&db).unwrap();
    writer
        .execute_batch("PRAGMA wal_autocheckpoint = 0; INSERT INTO meta VALUES ('note', x'00');")
        .unwrap();
    for name in ["events.db", "events.db-wal"] {
        std::fs::copy(archive.join(name), pending.join(name)).unwrap();
    }
    drop(writer);
    for folder in [&archive, &pending] {
        for entry in std::fs::read_dir(folder).unwrap() {
            set_mode(&entry.unwrap().path(), 0o444);
        }
        set_mode(folder, 0o555);
    }
    let reader = |db: &std::path::Path, args: &[&str]| {
        // SAFETY: geteuid has no preconditions.
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        cmd.env_remove("AGENT_RUNTIME_DB")
            .env_remove("AGENT_RUNTIME_PASSPHRASE")
            .arg("--db")
            .arg(db)
            .args(args);
        cmd.assert()
    };
    reader(&db, &["audit", "verify"])
        .success()
        .stdout(predicate::str::contains("39 events"));
    reader(&db, &["runs", "list"]).success();
    reader(&db, &["audit", "export", "--format", "bundle"])
        .success()
        .stdout(predicate::str::contains("chain_head"));
    assert!(!archive.join("events.db-shm").exists());
    // Read as immutable, it would never show new events: following is refused, not silent.
    reader(&db, &["audit", "tail", "--follow"])
        .code(1)
        .stderr(predicate::str::contains("read as an immutable file"));
    reader(&pending.join("events.db"), &["audit", "verify"])
        .code(3)
        .stderr(predicate::str::contains(
            "copy the database with its -wal file to a folder you can write",
        ));
    // The temporary folder is removed as the test's user.
    for folder in [&archive, &pending] {
        set_mode(folder, 0o755);
    }
}

/// On a full disk: the readers still read a database that was closed cleanly (SQLite could not
/// make its shared-memory file, and every command said only "disk I/O error"), a run says the
/// disk is full, and an export names the file it could not write. The disk is a 2 MiB tmpfs in
/// a mount namespace of the test's own (`unshare`).
#[test]
fn on_a_full_disk_readers_read_and_writers_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let bin = assert_cmd::cargo::cargo_bin("agent-runtime");
    std::fs::write(
        dir.path().join("flow.yaml"),
        "tasks:\n  - {id: a, tool: echo, args: {text: hi}}\n",
    )
    .unwrap();
    // Each command's exit code and standard error land beside the disk, in files named after
    // it; the script goes on after a failure.
    let script = r#"
set -u
mount -t tmpfs -o size=2m tmpfs disk || exit 90
cmd() { name=$1; shift; "$BIN" --db disk/e.db "$@" > "$name.out" 2> "$name.err"; echo $? > "$name.rc"; }
cmd demo demo
dd if=/dev/zero of=disk/fill bs=4k 2>/dev/null
cmd list runs list
cmd verify audit verify
cmd export audit export -o disk/out.jsonl
cmd run run flow.yaml
ls -a disk > listing.txt
umount disk
"#;
    std::fs::create_dir(dir.path().join("disk")).unwrap();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut unshare = std::process::Command::new("unshare");
    unshare.arg("--mount");
    if !root {
        unshare.arg("--map-root-user");
    }
    let status = unshare
        .args(["bash", "-c", script])
        .current_dir(dir.path())
        .env("BIN", &bin)
        .env("AGENT_RUNTIME_PASSPHRASE", "cli test passphrase")
        .env("XDG_DATA_HOME", dir.path().join("data"))
        .env_remove("AGENT_RUNTIME_DB")
        .status()
        .unwrap();
    assert!(status.success(), "the script failed: {status}");
    let read = |name: &str, ext: &str| {
        std::fs::read_to_string(dir.path().join(format!("{name}.{ext}"))).unwrap_or_default()
    };
    let rc = |name: &str| read(name, "rc").trim().to_string();
    assert_eq!(rc("demo"), "0", "{}", read("demo", "err"));
    assert_eq!(rc("list"), "0", "{}", read("list", "err"));
    assert_eq!(rc("verify"), "0", "{}", read("verify", "err"));
    assert!(
        read("verify", "out").contains("39 events"),
        "{}",
        read("verify", "out")
    );
    assert_eq!(rc("export"), "1", "{}", read("export", "err"));
    assert!(
        read("export", "err").starts_with("error: cannot write disk/out.jsonl: No space left"),
        "{}",
        read("export", "err")
    );
    assert_eq!(rc("run"), "1", "{}", read("run", "err"));
    assert!(
        read("run", "err").contains("(the disk holding disk is full: 0 bytes free)"),
        "{}",
        read("run", "err")
    );
    // The failed export left nothing behind, neither the file nor a part of it.
    let listing = std::fs::read_to_string(dir.path().join("listing.txt")).unwrap();
    assert!(!listing.contains("out.jsonl"), "{listing}");
}
