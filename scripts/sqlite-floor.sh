#!/usr/bin/env bash
# What SQLite alone costs per event row on this machine, with the store's table and indexes
# and no Rust at all: the floor under `bench store` and `bench workforce`. Inserts 200,000
# rows of the store's shape (300-byte payload) in one transaction with INSERT ... SELECT, so
# no per-statement binding is counted, with 0 to 3 of the store's secondary indexes.
# Needs the sqlite3 command (Debian package sqlite3). Usage: scripts/sqlite-floor.sh [ROWS]
set -euo pipefail
rows=${1:-200000}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
command -v sqlite3 >/dev/null || { echo "needs the sqlite3 command (apt-get install sqlite3)" >&2; exit 2; }
sqlite3 "$dir/src.db" "CREATE TABLE src AS WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i<$rows) SELECT i, randomblob(16) t, randomblob(300) p, randomblob(32) h FROM c;"
kind="(CASE i%4 WHEN 0 THEN 'task.started' WHEN 1 THEN 'model.requested' WHEN 2 THEN 'model.completed' ELSE 'task.completed' END)"
measure() {
  rm -f "$dir"/ev.db*
  sqlite3 "$dir/ev.db" "PRAGMA page_size=16384;" "PRAGMA journal_mode=WAL;" \
    "CREATE TABLE events (seq INTEGER PRIMARY KEY, run_id BLOB NOT NULL, task_id BLOB, actor TEXT NOT NULL, kind TEXT NOT NULL, time_ns INTEGER NOT NULL, payload BLOB NOT NULL, prev_hash BLOB, hash BLOB NOT NULL);" \
    "$2" >/dev/null
  local start end
  start=$(date +%s%N)
  sqlite3 "$dir/ev.db" "ATTACH '$dir/src.db' AS s;" "PRAGMA synchronous=FULL;" "BEGIN;" \
    "INSERT INTO events SELECT i, x'00112233445566778899aabbccddeeff', t, 'agent:a12', $kind, 1767225600000000000+i*1000, p, h, h FROM s.src;" \
    "COMMIT;" >/dev/null
  end=$(date +%s%N)
  printf '{"indexes": "%s", "ns_per_row": %d}\n' "$1" $(( (end - start) / rows ))
}
measure "none" ""
measure "run" "CREATE INDEX r ON events(run_id, seq);"
measure "run,kind" "CREATE INDEX r ON events(run_id, seq); CREATE INDEX k ON events(kind, seq);"
measure "run,kind,time (the store's)" "CREATE INDEX r ON events(run_id, seq); CREATE INDEX k ON events(kind, seq); CREATE INDEX t ON events(time_ns, seq);"
