//! Every way the log can be damaged gives a clear answer naming what and where.

mod common;

use agent_runtime_store::{ProblemKind, Store, StoreConfig, StoreError};
use common::*;

fn filled(dir: &tempfile::TempDir, n: u64) -> std::path::PathBuf {
    let path = dir.path().join("t.db");
    let store = open_encrypted(&path);
    store.append_blocking(events(1, n)).unwrap();
    path
}

/// What verify says of the database, read only (as `audit verify` opens it).
fn report(path: &std::path::Path) -> agent_runtime_store::VerifyReport {
    Store::open(encrypted_config(path, "test passphrase").read_only())
        .unwrap()
        .verify()
        .unwrap()
}

fn problem(path: &std::path::Path) -> agent_runtime_store::Problem {
    report(path).problem.expect("verify should find a problem")
}

/// A database of `first` events of run 1 and then `second` of run 2, in two commits: two frames.
fn in_two_frames(dir: &tempfile::TempDir, first: u64, second: u64) -> std::path::PathBuf {
    let path = dir.path().join("t.db");
    let store = open_encrypted(&path);
    store.append_blocking(events(1, first)).unwrap();
    store.append_blocking(events(2, second)).unwrap();
    path
}

#[test]
fn honest_sql_cannot_change_or_delete_events() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 5);
    let conn = rusqlite::Connection::open(&path).unwrap();
    for sql in [
        "UPDATE frames SET last_seq = 9 WHERE first_seq = 1",
        "DELETE FROM frames",
        "UPDATE frame_runs SET first_seq = 2",
        "DELETE FROM frame_runs",
    ] {
        let err = conn.execute_batch(sql).unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
    }
    drop(conn);
    assert_eq!(open_encrypted(&path).verify().unwrap().problem, None);
}

#[test]
fn intact_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 500);
    let report = open_encrypted(&path).verify().unwrap();
    assert_eq!(
        (report.events, report.last_seq, report.problem),
        (500, 500, None)
    );
}

#[test]
fn flipped_payload_byte_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 500);
    // Flip one byte in the middle of event 321's sealed payload.
    with_event_rows(&path, |conn| {
        let mut payload: Vec<u8> = conn
            .query_row("SELECT payload FROM events WHERE seq = 321", [], |r| {
                r.get(0)
            })
            .unwrap();
        payload[40] ^= 0x01;
        conn.execute("UPDATE events SET payload = ?1 WHERE seq = 321", [payload])
            .unwrap();
    });
    let p = problem(&path);
    assert_eq!((p.seq, p.kind), (321, ProblemKind::PayloadChanged), "{p}");
}

#[test]
fn flipped_byte_in_a_plaintext_log_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    Store::open(StoreConfig::plaintext(&path))
        .unwrap()
        .append_blocking(events(1, 50))
        .unwrap();
    tamper(
        &path,
        "UPDATE events SET payload = CAST(replace(CAST(payload AS TEXT), '\"i\":17', '\"i\":71') AS BLOB) WHERE seq = 17",
    );
    let p = Store::open(StoreConfig::plaintext(&path))
        .unwrap()
        .verify()
        .unwrap()
        .problem
        .unwrap();
    assert_eq!((p.seq, p.kind), (17, ProblemKind::PayloadChanged), "{p}");
}

#[test]
fn changed_metadata_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 50);
    tamper(
        &path,
        "UPDATE events SET actor = 'person:mallory' WHERE seq = 9",
    );
    let p = problem(&path);
    assert_eq!(p.seq, 9, "{p}");
}

#[test]
fn deleted_event_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 500);
    tamper(&path, "DELETE FROM events WHERE seq = 250");
    let p = problem(&path);
    assert_eq!((p.seq, p.kind), (250, ProblemKind::EventMissing), "{p}");
}

#[test]
fn deleted_tail_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 500);
    tamper(&path, "DELETE FROM events WHERE seq > 490");
    let p = problem(&path);
    assert_eq!((p.seq, p.kind), (491, ProblemKind::TailMissing), "{p}");
}

/// A log whose end was cut off keeps the evidence: no writer opens it (its next commit would
/// record a new head over the cut), and no bundle is made of it (it would verify on its own as
/// a whole chain); it can still be read.
#[test]
fn a_cut_off_end_is_neither_written_over_nor_bundled() {
    let dir = tempfile::tempdir().unwrap();
    // Two frames: the newest is cut off.
    let path = in_two_frames(&dir, 300, 200);
    let conn = tamper_conn(&path);
    conn.execute_batch("DELETE FROM frames WHERE first_seq = (SELECT max(first_seq) FROM frames)")
        .unwrap();
    drop(conn);
    let Err(err) = Store::open(encrypted_config(&path, "test passphrase")) else {
        panic!("a writer opened a log whose end was cut off");
    };
    assert!(
        matches!(err, StoreError::Damaged { .. })
            && err.to_string().contains("records 500 events but only")
            && err.to_string().contains("cut off"),
        "{err}"
    );
    let reader = Store::open(encrypted_config(&path, "test passphrase").read_only()).unwrap();
    let err = reader
        .export(
            &agent_runtime_core::EventQuery::default(),
            agent_runtime_store::ExportFormat::Bundle,
            Vec::new(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("cut off"), "{err}");
    let mut jsonl = Vec::new();
    let summary = reader
        .export(
            &agent_runtime_core::EventQuery::default(),
            agent_runtime_store::ExportFormat::Jsonl,
            &mut jsonl,
        )
        .unwrap();
    assert_eq!(summary.events, 300);
    assert_eq!(problem(&path).kind, ProblemKind::TailMissing);
}

/// Key derivation costs changed in the file to absurd values fail at once, naming them: they
/// would otherwise hang every command (billions of passes) or exhaust memory (terabytes).
#[test]
fn absurd_key_derivation_costs_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 5);
    for (kdf, says) in [
        (
            r#"{"m_kib":8,"t":4000000000,"p":1}"#,
            "passes (t) of 4000000000",
        ),
        (
            r#"{"m_kib":3000000000,"t":1,"p":1}"#,
            "memory (m_kib) of 3000000000",
        ),
    ] {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'kdf'",
            [kdf.as_bytes()],
        )
        .unwrap();
        drop(conn);
        let Err(err) = Store::open(encrypted_config(&path, "test passphrase").read_only()) else {
            panic!("opened with {kdf}");
        };
        assert!(
            matches!(err, StoreError::Damaged { .. }) && err.to_string().contains(says),
            "{err}"
        );
    }
}

#[test]
fn swapped_events_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 500);
    tamper(
        &path,
        "UPDATE events SET seq = -1 WHERE seq = 200; UPDATE events SET seq = 200 WHERE seq = 201; UPDATE events SET seq = 201 WHERE seq = -1;",
    );
    let p = problem(&path);
    assert_eq!((p.seq, p.kind), (200, ProblemKind::OrderChanged), "{p}");
    assert!(p.detail.contains("written as sequence 201"), "{p}");
}

#[test]
fn payload_moved_between_rows_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 100);
    // Sealed payloads are bound to their row's metadata: a copied ciphertext does not open.
    tamper(
        &path,
        "UPDATE events SET payload = (SELECT payload FROM events WHERE seq = 11) WHERE seq = 13",
    );
    let p = problem(&path);
    assert_eq!((p.seq, p.kind), (13, ProblemKind::PayloadChanged), "{p}");
}

#[test]
fn wrong_passphrase_is_refused_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 10);
    let err = Store::open(encrypted_config(&path, "not the passphrase")).unwrap_err();
    assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("wrong passphrase") && msg.contains("t.db"),
        "{msg}"
    );
    assert!(
        !msg.contains("not the passphrase"),
        "the passphrase leaked into the error"
    );
    assert!(!format!("{err:?}").contains("not the passphrase"));
}

#[test]
fn missing_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 10);
    let err = Store::open(StoreConfig::new(&path)).unwrap_err();
    assert!(matches!(err, StoreError::MissingKey { .. }), "{err}");
    assert!(err.to_string().contains("AGENT_RUNTIME_PASSPHRASE"));
}

#[test]
fn swapped_data_key_reads_as_wrong_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 10);
    // Another database with the same passphrase has another data key.
    let other = dir.path().join("other.db");
    drop(open_encrypted(&other));
    let conn = tamper_conn(&path);
    conn.execute("ATTACH DATABASE ?1 AS other", [other.to_str().unwrap()])
        .unwrap();
    conn.execute_batch("UPDATE main.meta SET value = (SELECT value FROM other.meta WHERE key = 'wrapped_key') WHERE key = 'wrapped_key'; UPDATE main.meta SET value = (SELECT value FROM other.meta WHERE key = 'salt') WHERE key = 'salt';").unwrap();
    drop(conn);
    let p = problem(&path);
    assert_eq!((p.seq, p.kind), (1, ProblemKind::WrongKey), "{p}");
}

#[test]
fn truncated_database_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 5000);
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(
        len > 100_000,
        "the database should be checkpointed into the main file on close"
    );
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    match Store::open(encrypted_config(&path, "test passphrase")) {
        // SQLite cannot read even its schema: the error says the file was cut, with sizes,
        // not only SQLite's "malformed".
        Err(e) => assert!(
            e.to_string()
                .contains("is damaged: it is shorter than its own header says (")
                && e.to_string()
                    .contains(&format!(" of {len} bytes): the file was cut off")),
            "{e}"
        ),
        Ok(store) => match store.verify() {
            Ok(report) => {
                let p = report.problem.expect("a truncated file must not verify");
                assert!(
                    matches!(p.kind, ProblemKind::Damaged | ProblemKind::TailMissing),
                    "{p}"
                );
                assert!(p.seq > 1, "names where reading stopped: {p}");
            }
            Err(e) => assert!(e.to_string().contains("damaged"), "{e}"),
        },
    }
}

#[test]
fn a_database_name_without_room_for_its_neighbours_is_refused_leaving_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ok = dir
        .path()
        .join("d".repeat(agent_runtime_store::MAX_DB_NAME_BYTES));
    drop(Store::open(StoreConfig::plaintext(&ok)).expect("250 bytes leave room"));
    for len in [agent_runtime_store::MAX_DB_NAME_BYTES + 1, 255] {
        let path = dir.path().join("n".repeat(len));
        let err = Store::open(StoreConfig::plaintext(&path)).unwrap_err();
        assert!(
            err.to_string().contains("may have at most 250 bytes"),
            "{err}"
        );
        assert!(!path.exists(), "nothing is created");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('n') || n.to_string_lossy().starts_with(".n"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_file_that_is_not_a_database_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.db");
    std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
    let err = Store::open(encrypted_config(&path, "x")).unwrap_err();
    assert!(
        matches!(err, StoreError::Damaged { .. } | StoreError::Open { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("junk.db"), "{err}");
    // What SQLite says ("file is not a database") reads as if an event database broke: a file
    // that doesn't begin as SQLite's do is named as that, opened for writing or reading, short
    // or long, and left as it was.
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "hello\n").unwrap();
    for (file, config) in [
        (&path, StoreConfig::plaintext(&path)),
        (&path, StoreConfig::plaintext(&path).read_only()),
        (&text, StoreConfig::plaintext(&text)),
        (&text, StoreConfig::plaintext(&text).read_only()),
    ] {
        let before = std::fs::read(file).unwrap();
        let err = Store::open(config).unwrap_err();
        assert!(
            err.to_string()
                .contains("does not begin as an SQLite database does: not an event database"),
            "{err}"
        );
        assert_eq!(std::fs::read(file).unwrap(), before);
    }
    // An SQLite database of something else.
    let other = dir.path().join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    let err = Store::open(StoreConfig::plaintext(&other).read_only()).unwrap_err();
    assert!(
        err.to_string()
            .contains("not an agent-runtime event database"),
        "{err}"
    );
    // Opened for writing, it is refused too, and left as it was.
    let before = std::fs::read(&other).unwrap();
    let err = Store::open(StoreConfig::plaintext(&other)).unwrap_err();
    assert!(
        err.to_string()
            .contains("not an agent-runtime event database (it has a table `t`)"),
        "{err}"
    );
    assert_eq!(std::fs::read(&other).unwrap(), before);
    let conn = rusqlite::Connection::open(&other).unwrap();
    let journal: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "delete");
}

#[test]
fn a_malformed_newest_event_is_not_chained_onto() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 5);
    tamper(&path, "UPDATE events SET hash = x'00' WHERE seq = 5;");
    // Opening to append refuses: chaining onto a made-up head would hide the damage.
    let err = Store::open(encrypted_config(&path, "test passphrase")).unwrap_err();
    assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
    assert!(err.to_string().contains("sequence 5"), "{err}");
    // Verify (which opens for reading) still names the broken event.
    let report = report(&path);
    assert_eq!(report.problem.map(|p| p.seq), Some(5));
}

/// Where a record sits in its frame's blob: (first_seq, body, offset of the record's payload).
fn payload_offset(path: &std::path::Path, seq: u64) -> (i64, Vec<u8>, usize) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let (first, prev, body): (i64, Vec<u8>, Vec<u8>) = conn
        .query_row(
            "SELECT first_seq, prev_hash, body FROM frames WHERE first_seq <= ?1 ORDER BY first_seq DESC LIMIT 1",
            [seq as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let offset = agent_runtime_store::frame::records(first as u64, &prev, &body)
        .map(Result::unwrap)
        .find(|r| r.seq == seq)
        .map(|r| r.payload.as_ptr() as usize - body.as_ptr() as usize)
        .unwrap();
    (first, body, offset)
}

fn replace_body(path: &std::path::Path, first: i64, body: Vec<u8>) {
    tamper_conn(path)
        .execute(
            "UPDATE frames SET body = ?1 WHERE first_seq = ?2",
            rusqlite::params![body, first],
        )
        .unwrap();
}

#[test]
fn a_flipped_byte_inside_a_frame_of_many_events_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 500);
    let (first, mut body, at) = payload_offset(&path, 321);
    assert!(
        first < 321,
        "event 321 should share its frame with earlier ones"
    );
    body[at + 30] ^= 0x01;
    replace_body(&path, first, body);
    let p = problem(&path);
    assert_eq!((p.seq, p.kind), (321, ProblemKind::PayloadChanged), "{p}");
}

#[test]
fn a_cut_frame_is_named_at_the_first_event_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 500);
    let (first, mut body, at) = payload_offset(&path, 250);
    body.truncate(at + 5);
    replace_body(&path, first, body);
    let p = problem(&path);
    assert_eq!((p.seq, p.kind), (250, ProblemKind::Damaged), "{p}");
    assert!(p.detail.contains("frame"), "{p}");
    // Reading it says so too, naming the event, instead of returning a short answer.
    let err = open_encrypted(&path)
        .query_blocking(&Default::default())
        .unwrap_err();
    assert!(err.to_string().contains("250"), "{err}");
}

#[test]
fn a_frame_whose_columns_contradict_its_events_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 500);
    // Claims a further event: the next append would leave a hole.
    tamper(&path, "SELECT 1"); // one event per frame from here on
    tamper_conn(&path)
        .execute_batch("UPDATE frames SET last_seq = 501 WHERE first_seq = 500")
        .unwrap();
    let p = problem(&path);
    assert_eq!((p.seq, p.kind), (501, ProblemKind::Damaged), "{p}");

    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 500);
    // A recorded last hash other than the last event's: the next append would chain onto it.
    tamper_conn(&path)
        .execute_batch("UPDATE frames SET last_hash = zeroblob(32)")
        .unwrap();
    let p = problem(&path);
    assert_eq!((p.seq, p.kind), (500, ProblemKind::Damaged), "{p}");
}

/// What queries select frames by (the run index, the time bounds) is outside the chain: a
/// change there hid events from `export --run`, `--since` and `runs show` while verify said
/// the log was whole. Verify checks them against the events.
#[test]
fn a_changed_run_index_or_time_bound_is_named() {
    let last_frame = |path: &std::path::Path| -> i64 {
        rusqlite::Connection::open(path)
            .unwrap()
            .query_row("SELECT max(first_seq) FROM frames", [], |r| r.get(0))
            .unwrap()
    };
    let cases: [(&str, &str); 5] = [
        (
            "DELETE FROM frame_runs WHERE first_seq = {F}",
            "the run index lists 0 run(s) for its frame, whose events belong to 1",
        ),
        (
            "INSERT INTO frame_runs VALUES (zeroblob(16), {F})",
            "the run index lists 2 run(s) for its frame, whose events belong to 1",
        ),
        (
            "UPDATE frame_runs SET run_id = zeroblob(16) WHERE first_seq = {F}",
            "the run index lists other runs than those its events belong to",
        ),
        (
            "UPDATE frames SET min_time = 0, max_time = 0 WHERE first_seq = {F}",
            "its frame's time bounds (0..0) are not its events' times",
        ),
        (
            "INSERT INTO frame_runs VALUES (zeroblob(16), 99999)",
            "the run index names a frame at sequence 99999",
        ),
    ];
    for (sql, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = in_two_frames(&dir, 300, 200);
        let frame = last_frame(&path);
        tamper_conn(&path)
            .execute_batch(&sql.replace("{F}", &frame.to_string()))
            .unwrap();
        let report = report(&path);
        let p = report.problem.expect("a problem");
        assert_eq!(p.kind, ProblemKind::Damaged, "{sql}: {p}");
        assert!(p.detail.contains(says), "{sql}: {p}");
        if !sql.contains("99999") {
            assert_eq!(p.seq, frame as u64, "{sql}: {p}");
            // What verified before it: the events before the frame, not the frame's own.
            assert_eq!(report.events, frame as u64 - 1, "{sql}: {p}");
        }
    }
}

#[test]
fn a_database_of_the_row_per_event_format_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 3);
    tamper_conn(&path)
        .execute_batch("UPDATE meta SET value = CAST('1' AS BLOB) WHERE key = 'format'")
        .unwrap();
    let err = Store::open(encrypted_config(&path, "test passphrase")).unwrap_err();
    match &err {
        StoreError::Format {
            found, expected, ..
        } => assert_eq!(
            (found.as_str(), expected.as_str()),
            ("1", "2 or 3"),
            "{err}"
        ),
        other => panic!("expected a format error, got {other}"),
    }
}

#[test]
fn a_frame_that_links_to_another_chain_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 3000);
    let second: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT first_seq FROM frames WHERE first_seq > 1 ORDER BY first_seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    tamper_conn(&path)
        .execute(
            "UPDATE frames SET prev_hash = zeroblob(32) WHERE first_seq = ?1",
            [second],
        )
        .unwrap();
    let p = problem(&path);
    assert_eq!(
        (p.seq, p.kind),
        (second as u64, ProblemKind::ChainBroken),
        "{p}"
    );
}

/// A frame whose columns hold the wrong types is damage at its first event, reported with the
/// events verified before it (not "before its block"), and an unreadable head is named as such.
#[test]
fn frames_with_columns_of_the_wrong_type_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = in_two_frames(&dir, 49, 20);
    tamper_conn(&path)
        .execute_batch("UPDATE frames SET body = CAST(body AS TEXT) || 'x' WHERE first_seq = 50")
        .unwrap();
    let report = report(&path);
    let p = report.problem.expect("a problem");
    assert_eq!((p.seq, p.kind), (50, ProblemKind::Damaged), "{p}");
    assert!(p.detail.contains("do not hold their types"), "{p}");
    assert_eq!(report.events, 49);

    tamper_conn(&path)
        .execute_batch("UPDATE frames SET last_seq = 'abc' WHERE first_seq = 50")
        .unwrap();
    let Err(err) = Store::open(encrypted_config(&path, "test passphrase")) else {
        panic!("a writer opened a log whose head is unreadable");
    };
    assert!(
        err.to_string()
            .contains("the newest frame (from sequence 50) has no readable last sequence number"),
        "{err}"
    );
    // Verify names it too (it read the log past it before, by another path, and said ok).
    let p = problem(&path);
    assert_eq!((p.seq, p.kind), (50, ProblemKind::Damaged), "{p}");
}

/// An encrypted log's head carries a tag only a holder of its key can make: cutting events off
/// its end and lowering `head_seq` with them, rewriting the chain after a deletion, or removing
/// the tag, each of which keeps the chain whole (its hashes need no key), is named.
#[test]
fn a_log_cut_short_without_its_key_is_named_by_its_head_tag() {
    let dir = tempfile::tempdir().unwrap();
    let path = in_two_frames(&dir, 10, 5);
    let format: Vec<u8> = tamper_conn(&path)
        .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(format, b"3");
    assert!(report(&path).problem.is_none());
    // The second frame (events 11 to 15) goes, and the head with it, as one who knows the
    // format (but not the key) would do it.
    let conn = tamper_conn(&path);
    conn.execute_batch(
        "DELETE FROM frames WHERE first_seq = 11; DELETE FROM frame_runs WHERE first_seq = 11;",
    )
    .unwrap();
    conn.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'head_seq'",
        [&10u64.to_be_bytes()[..]],
    )
    .unwrap();
    drop(conn);
    let p = problem(&path);
    assert_eq!((p.seq, p.kind), (10, ProblemKind::ChainBroken), "{p:?}");
    assert!(p.detail.contains("without its key"), "{}", p.detail);
    // No writer opens it (its next commit would tag the shorter chain), and no bundle is made.
    let err = Store::open(encrypted_config(&path, "test passphrase")).unwrap_err();
    assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
    assert!(err.to_string().contains("without its key"), "{err}");
    let reader = Store::open(encrypted_config(&path, "test passphrase").read_only()).unwrap();
    let bundle = reader.export(
        &agent_runtime_core::EventQuery::default(),
        agent_runtime_store::ExportFormat::Bundle,
        Vec::new(),
    );
    assert!(bundle.is_err());
    drop(reader);
    // Without the tag at all: named too.
    tamper_conn(&path)
        .execute_batch("DELETE FROM meta WHERE key = 'head_tag'")
        .unwrap();
    let p = problem(&path);
    assert_eq!((p.seq, p.kind), (10, ProblemKind::ChainBroken), "{p:?}");
    assert!(p.detail.contains("no tag"), "{}", p.detail);
}

/// A rollback journal put beside the log (SQLite never writes one for it: it is in WAL mode)
/// would be played back over its pages at the next open, rewriting the log as its author chose:
/// the log is refused, naming it, and the journal is left as evidence.
#[test]
fn a_rollback_journal_put_beside_the_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled(&dir, 5);
    let journal = dir.path().join("t.db-journal");
    std::fs::write(&journal, vec![0xd9u8; 4096]).unwrap();
    for read_only in [false, true] {
        let config = encrypted_config(&path, "test passphrase");
        let config = if read_only {
            config.read_only()
        } else {
            config
        };
        let err = Store::open(config).unwrap_err();
        assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
        assert!(err.to_string().contains("rollback journal"), "{err}");
    }
    assert_eq!(std::fs::read(&journal).unwrap().len(), 4096);
    std::fs::remove_file(&journal).unwrap();
    assert!(report(&path).problem.is_none());
}
