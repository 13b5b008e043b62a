//! Crash safety and multi-process use, with real processes: this test binary re-runs itself as
//! the child (`child_appender`), which appends as fast as it can and reports every append that
//! returned.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};

use agent_runtime_core::EventQuery;
use common::*;

const DB_VAR: &str = "STORE_CRASH_TEST_DB";
const RUN_VAR: &str = "STORE_CRASH_TEST_RUN";
const LIMIT_VAR: &str = "STORE_CRASH_TEST_LIMIT";

#[test]
#[ignore = "entry point of the child process that crash tests start"]
fn child_appender() {
    let Some(db) = std::env::var_os(DB_VAR) else {
        return;
    };
    let run: u8 = std::env::var(RUN_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let limit: u64 = std::env::var(LIMIT_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    let store = open_encrypted(std::path::Path::new(&db));
    let mut out = std::io::stdout().lock();
    let mut i = 0u64;
    while i < limit {
        let batch: Vec<_> = (i + 1..=i + 10).map(|k| event(run, k)).collect();
        let landed = store.append_blocking(batch).expect("append");
        i += 10;
        // Only what `append` returned for is reported as durable.
        writeln!(out, "durable {} {}", landed.last().map_or(0, |a| a.seq), i).unwrap();
        out.flush().unwrap();
    }
}

fn spawn_child(db: &std::path::Path, run: u8, limit: Option<u64>) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_appender",
        "--include-ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(DB_VAR, db)
    .env(RUN_VAR, run.to_string())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if let Some(l) = limit {
        cmd.env(LIMIT_VAR, l.to_string());
    }
    cmd.spawn().expect("spawn child test process")
}

#[test]
fn kill_9_loses_no_returned_append_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    // Create it first so the child does not race the key setup with the kill.
    drop(open_encrypted(&db));
    let mut child = spawn_child(&db, 1, None);
    let stdout = child.stdout.take().unwrap();
    let mut confirmed_seq = 0u64;
    let mut confirmed_i = 0u64;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        // libtest may print its own words before ours on the same line.
        let Some(at) = line.find("durable ") else {
            continue;
        };
        let mut parts = line[at..].split_whitespace().skip(1);
        if let (Some(seq), Some(i)) = (parts.next(), parts.next()) {
            confirmed_seq = seq.parse().unwrap();
            confirmed_i = i.parse().unwrap();
        }
        if confirmed_seq >= 3000 {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(confirmed_seq >= 3000, "child stopped early");

    let store = open_encrypted(&db);
    let report = store.verify().unwrap();
    assert_eq!(report.problem, None, "chain verifies after kill -9");
    assert!(
        report.last_seq >= confirmed_seq,
        "lost durable events: head {} < confirmed {confirmed_seq}",
        report.last_seq
    );
    let all = store.query_blocking(&EventQuery::default()).unwrap();
    let is: Vec<u64> = all
        .iter()
        .map(|e| e.payload["i"].as_u64().unwrap())
        .collect();
    assert_eq!(
        is[..confirmed_i as usize],
        (1..=confirmed_i).collect::<Vec<_>>()[..]
    );
    // Appending continues on the same chain.
    let landed = store.append_blocking(events(2, 5)).unwrap();
    assert_eq!(landed[0].seq, report.last_seq + 1);
    assert_eq!(store.verify().unwrap().problem, None);
}

#[test]
fn two_processes_on_one_file_serialize_into_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    drop(open_encrypted(&db));
    let a = spawn_child(&db, 1, Some(1500));
    let b = spawn_child(&db, 2, Some(1500));
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "child failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let store = open_encrypted(&db);
    let report = store.verify().unwrap();
    assert_eq!((report.events, report.problem), (3000, None));
    for run in [1u8, 2] {
        let q = EventQuery {
            run_id: Some(agent_runtime_core::RunId::from_bytes([run; 16])),
            ..Default::default()
        };
        let is: Vec<u64> = store
            .query_blocking(&q)
            .unwrap()
            .iter()
            .map(|e| e.payload["i"].as_u64().unwrap())
            .collect();
        assert_eq!(
            is,
            (1..=1500).collect::<Vec<_>>(),
            "process {run}'s events in its order"
        );
    }
}
