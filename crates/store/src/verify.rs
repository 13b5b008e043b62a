//! Verification of the hash chain, over a database or an exported bundle.

use std::fmt;
use std::io::{BufRead, Read};
use std::path::Path;

use agent_runtime_core::{Envelope, Hash32, chain_hash, chain_hash_parts, push_canonical_payload};
use serde::Serialize;

use crate::error::{StoreError, read_error};
use crate::frame::{EventRecord, MAX_FRAME_EVENTS};
use crate::pipeline::ordered_parallel;
use crate::store::{FRAME_COLUMNS, RawRow, Store, read_recorded_head, scan_batches};

const BATCH: usize = 2048;
/// Rows per block when workers read the log themselves.
const BLOCK: i64 = 8192;

thread_local! {
    /// A worker thread's read connection, kept across the blocks of one verification (and
    /// reopened when another database is verified).
    static BLOCK_READER: std::cell::RefCell<Option<(std::path::PathBuf, rusqlite::Connection)>> =
        const { std::cell::RefCell::new(None) };
}
/// How far from its place an event is looked for when its hash does not match its place.
const REORDER_WINDOW: u64 = 64;

/// What is wrong at the first broken place in a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProblemKind {
    /// An event's content differs from what was hashed.
    PayloadChanged,
    /// A sequence number is missing.
    EventMissing,
    /// An event sits at another place than the one it was written at.
    OrderChanged,
    /// An event does not link to the one before it.
    ChainBroken,
    /// Payloads do not decrypt: the data key is not the one they were sealed under.
    WrongKey,
    /// Events are missing from the end (the recorded head is further on).
    TailMissing,
    /// The file could not be read past this point.
    Damaged,
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProblemKind::PayloadChanged => "payload changed",
            ProblemKind::EventMissing => "event missing",
            ProblemKind::OrderChanged => "order changed",
            ProblemKind::ChainBroken => "chain broken",
            ProblemKind::WrongKey => "wrong key",
            ProblemKind::TailMissing => "events missing at the end",
            ProblemKind::Damaged => "file damaged",
        })
    }
}

/// The first broken place in a chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The first sequence number that does not verify.
    pub seq: u64,
    /// What is wrong there.
    pub kind: ProblemKind,
    /// Details in words.
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sequence {}: {}: {}", self.seq, self.kind, self.detail)
    }
}

/// The outcome of a verification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Events that verified before the first problem (all of them when there is none).
    pub events: u64,
    /// Sequence number of the last event that verified.
    pub last_seq: u64,
    /// Hash of the last event that verified: the chain head when there is no problem.
    pub head: Hash32,
    /// The first problem, if any.
    pub problem: Option<Problem>,
}

/// One row's check, made on a worker.
pub(crate) struct Checked {
    seq: u64,
    prev_hash: Hash32,
    hash: Hash32,
    outcome: Outcome,
}

enum Outcome {
    Ok,
    HashMismatch {
        body: Vec<u8>,
    },
    Undecryptable,
    Malformed(String),
    /// The frame holding it is inconsistent or cannot be read.
    Damaged(String),
}

impl Checked {
    fn damaged(seq: u64, detail: String) -> Checked {
        Checked {
            seq,
            prev_hash: Hash32::GENESIS,
            hash: Hash32::GENESIS,
            outcome: Outcome::Damaged(detail),
        }
    }
}

/// Walks checked rows in order and finds the first problem.
struct ChainChecker {
    expected_seq: u64,
    prev: Hash32,
    events: u64,
    /// An undecryptable row waiting to see whether the next one is too (then: wrong key).
    undecryptable: Option<u64>,
    problem: Option<Problem>,
}

impl ChainChecker {
    fn new() -> Self {
        ChainChecker {
            expected_seq: 1,
            prev: Hash32::GENESIS,
            events: 0,
            undecryptable: None,
            problem: None,
        }
    }

    /// Returns false once a problem is found.
    fn push(&mut self, c: Checked) -> bool {
        if self.problem.is_some() {
            return false;
        }
        if let Some(seq) = self.undecryptable.take() {
            let kind = if matches!(c.outcome, Outcome::Undecryptable) {
                ProblemKind::WrongKey
            } else {
                ProblemKind::PayloadChanged
            };
            let detail = if kind == ProblemKind::WrongKey {
                "payloads do not decrypt under this database's data key".to_string()
            } else {
                "payload does not decrypt: its ciphertext or metadata was changed".to_string()
            };
            self.problem = Some(Problem { seq, kind, detail });
            return false;
        }
        let fail = |kind, detail: String| {
            Some(Problem {
                seq: c.seq,
                kind,
                detail,
            })
        };
        // A frame that cannot be read or contradicts itself is named where it goes wrong,
        // whatever place the checker expected.
        if let Outcome::Damaged(detail) = &c.outcome {
            self.problem = fail(ProblemKind::Damaged, detail.clone());
            return false;
        }
        if c.seq != self.expected_seq {
            self.problem = if c.seq > self.expected_seq {
                Some(Problem {
                    seq: self.expected_seq,
                    kind: ProblemKind::EventMissing,
                    detail: format!(
                        "the sequence jumps from {} to {}",
                        self.expected_seq - 1,
                        c.seq
                    ),
                })
            } else {
                fail(
                    ProblemKind::OrderChanged,
                    format!("sequence {} appears after {}", c.seq, self.expected_seq - 1),
                )
            };
            return false;
        }
        match c.outcome {
            Outcome::Ok if c.prev_hash == self.prev => {}
            Outcome::Ok => {
                self.problem = fail(
                    ProblemKind::ChainBroken,
                    format!(
                        "its prev_hash does not match the hash of event {}",
                        c.seq - 1
                    ),
                );
                return false;
            }
            Outcome::Undecryptable => {
                self.undecryptable = Some(c.seq);
                self.expected_seq += 1;
                return true;
            }
            Outcome::Malformed(detail) => {
                self.problem = fail(ProblemKind::PayloadChanged, detail);
                return false;
            }
            // Handled before the sequence check.
            Outcome::Damaged(_) => return false,
            Outcome::HashMismatch { body } => {
                // Written at another place? Then it was moved (swapped, or renumbered after a
                // deletion); otherwise its content changed.
                let lo = c.seq.saturating_sub(REORDER_WINDOW).max(1);
                let written_at = (lo..=c.seq + REORDER_WINDOW)
                    .filter(|&m| m != c.seq)
                    .find(|&m| chain_hash(&c.prev_hash, m, &body) == c.hash);
                self.problem = match written_at {
                    Some(m) => fail(
                        ProblemKind::OrderChanged,
                        format!(
                            "the event here was written as sequence {m} (events were moved or removed)"
                        ),
                    ),
                    None if c.prev_hash != self.prev => fail(
                        ProblemKind::ChainBroken,
                        format!(
                            "its prev_hash does not match event {} and its hash does not match its content",
                            c.seq - 1
                        ),
                    ),
                    None => fail(
                        ProblemKind::PayloadChanged,
                        "its content does not match its hash".into(),
                    ),
                };
                return false;
            }
        }
        self.prev = c.hash;
        self.expected_seq += 1;
        self.events += 1;
        true
    }

    fn finish(mut self, recorded_head: Option<u64>, what: &str) -> VerifyReport {
        if self.problem.is_none()
            && let Some(seq) = self.undecryptable.take()
        {
            self.problem = Some(Problem {
                seq,
                kind: ProblemKind::PayloadChanged,
                detail: "payload does not decrypt: its ciphertext or metadata was changed".into(),
            });
        }
        let last_seq = self.expected_seq - 1;
        if self.problem.is_none()
            && let Some(head) = recorded_head
            && head > last_seq
        {
            self.problem = Some(Problem {
                seq: last_seq + 1,
                kind: ProblemKind::TailMissing,
                detail: format!("the {what} records {head} events but only {last_seq} are present"),
            });
        }
        VerifyReport {
            events: self.events,
            last_seq: self.events,
            head: self.prev,
            problem: self.problem,
        }
    }
}

impl Store {
    /// Verifies the whole chain: every event's hash against its content and place, every link,
    /// and the recorded head. Decrypts every payload, spreading the work over the cores.
    ///
    /// A returned report with a `problem` means the log was changed; `Err` means it could not be
    /// read at all. Blocks the calling thread until the whole log is read (see the crate docs).
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let path = self.inner.path.clone();
        let (recorded_head, head_tag, bounds, index) = {
            let reader = self.inner.reader.lock().unwrap_or_else(|p| p.into_inner());
            // One snapshot for the head, the index and the bounds: a frame another process
            // commits meanwhile would otherwise fall inside the bounds with its index rows
            // missing from the index read before it, and read as damage.
            let snapshot = reader
                .unchecked_transaction()
                .map_err(|e| crate::error::sqlite_error(&path, e, None))?;
            let reader = &*snapshot;
            let head = read_recorded_head(reader, &path)?;
            let head_tag = crate::store::read_head_tag(reader, &path)?;
            // An index that cannot be read is reported after the chain is checked.
            let index = read_run_index(reader, &path);
            let bounds: Option<(i64, i64)> = reader
                .query_row(
                    // Blocks are cut by first sequence numbers: the bounds rest on the key
                    // alone, so that a frame whose other columns were changed is still read
                    // (and named) by the blocks, not sent to the slower path below.
                    "SELECT min(first_seq), max(first_seq) FROM frames",
                    [],
                    |r| Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?)),
                )
                .ok()
                .map(|(lo, hi)| (lo.unwrap_or(1), hi.unwrap_or(0)));
            drop(snapshot);
            (head, head_tag, bounds, index)
        };
        let index_ok = index.as_ref().ok();
        let mut checker = ChainChecker::new();
        let mut damaged: Option<StoreError> = None;
        let result = match bounds {
            // Every worker reads its own blocks of rows through its own connection, so reading,
            // decrypting and hashing all spread over the cores. Rows up to the head read here
            // never change (the log is append-only), so the blocks form one consistent log.
            Some((lo, hi)) => ordered_parallel(
                |emit| {
                    let mut start = lo.min(1).saturating_sub(1);
                    while start < hi {
                        let end = start.saturating_add(BLOCK).min(hi);
                        if !emit(vec![(start, end)]) {
                            break;
                        }
                        start = end;
                    }
                    Ok(())
                },
                // What a block checked before a row failed to read is kept: the report counts
                // the events verified before the damage, not before the block.
                |blocks: Vec<(i64, i64)>| {
                    let mut out = Vec::with_capacity(BLOCK as usize);
                    for (start, end) in blocks {
                        if let Err(e) = self.check_block(start, end, index_ok, &mut out) {
                            return (out, Some(e));
                        }
                    }
                    (out, None)
                },
                |(checked, error): (Vec<Checked>, Option<StoreError>)| {
                    if !checked.into_iter().all(|c| checker.push(c)) {
                        return false;
                    }
                    match error {
                        Some(e) => {
                            damaged = Some(e);
                            false
                        }
                        None => true,
                    }
                },
            ),
            // The table cannot even be summarized (a damaged file): read it in order, to name
            // the last event that can still be read.
            None => {
                let reader = &self.inner.reader;
                ordered_parallel(
                    |emit| {
                        scan_rows(
                            &reader.lock().unwrap_or_else(|p| p.into_inner()),
                            &path,
                            emit,
                        )
                    },
                    |rows: Vec<RawRow>| {
                        let mut scratch = Vec::with_capacity(1024);
                        rows.into_iter()
                            .map(|r| self.check_row(r, &mut scratch))
                            .collect::<Vec<_>>()
                    },
                    |checked| checked.into_iter().all(|c| checker.push(c)),
                )
            }
        };
        if let Err(e) = result {
            damaged = Some(e);
        }
        if let Some(StoreError::Damaged {
            after_seq, detail, ..
        }) = &damaged
            && checker.problem.is_none()
        {
            let seq = after_seq.map_or(1, |s| s + 1);
            checker.problem = Some(Problem {
                seq,
                kind: ProblemKind::Damaged,
                detail: detail.clone(),
            });
            return Ok(checker.finish(None, "database"));
        }
        if let Some(e) = damaged {
            return Err(e);
        }
        let mut report = checker.finish(recorded_head, "database");
        // The head's tag, which only a holder of the key makes: a chain that is whole but was
        // cut short or rewritten by someone without it (the chain's hashes need no key) ends
        // at another head.
        if report.problem.is_none()
            && let Some(cipher) = self.inner.cipher.as_ref().filter(|c| c.head_required)
            && report.last_seq > 0
        {
            let expected = cipher.head_tag(report.last_seq, &report.head.0);
            let detail = match head_tag {
                Some(tag) if tag[..] == expected[..] => None,
                Some(_) => Some(
                    "the log ends at another head than the one its writer tagged: events were \
                     cut off its end, or it was rewritten, by someone without its key",
                ),
                None => Some(
                    "the log's head has no tag, which every commit of its writer leaves: it was \
                     removed, and the events may have been cut off or rewritten",
                ),
            };
            if let Some(detail) = detail {
                report.problem = Some(Problem {
                    seq: report.last_seq,
                    kind: ProblemKind::ChainBroken,
                    detail: detail.into(),
                });
            }
        }
        // Index rows for frames that do not exist (every frame's own rows were checked above),
        // or an index that cannot be read: after the chain's own problems, a cut-off end
        // included, which leave such rows behind.
        if report.problem.is_none() && bounds.is_some() {
            report.problem = match &index {
                Ok(RunIndex {
                    orphan: Some(orphan),
                    ..
                }) => Some(Problem {
                    seq: *orphan,
                    kind: ProblemKind::Damaged,
                    detail: format!(
                        "the run index names a frame at sequence {orphan}, which the log does not hold"
                    ),
                }),
                Ok(_) => None,
                Err(e) => Some(Problem {
                    seq: 1,
                    kind: ProblemKind::Damaged,
                    detail: e.to_string(),
                }),
            };
        }
        Ok(report)
    }

    /// Reads and checks the rows with `start < seq <= end` through a connection of this thread.
    fn check_block(
        &self,
        start: i64,
        end: i64,
        index: Option<&RunIndex>,
        out: &mut Vec<Checked>,
    ) -> Result<(), StoreError> {
        let path = &self.inner.path;
        let mut last = u64::try_from(start).ok().filter(|&s| s > 0);
        let damaged = |e, last| read_error(path, e, last);
        BLOCK_READER.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(p, _)| p != path) {
                let conn = crate::store::read_only_connection(path, self.inner.immutable)
                    .map_err(|e| damaged(e, last))?;
                // Memory-mapped reads save a copy per page on a full scan; a no-op where the
                // platform does not support it.
                let _ = conn.execute_batch("PRAGMA mmap_size = 1073741824;");
                *slot = Some((path.clone(), conn));
            }
            let Some((_, conn)) = slot.as_ref() else {
                return Ok(());
            };
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {FRAME_COLUMNS}, min_time, max_time FROM frames WHERE first_seq > ?1 AND first_seq <= ?2 ORDER BY first_seq"
                ))
                .map_err(|e| damaged(e, last))?;
            let mut rows = stmt.query([start, end]).map_err(|e| damaged(e, last))?;
            let mut scratch = Vec::with_capacity(1024);
            loop {
                let row = match rows.next() {
                    Ok(Some(row)) => row,
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(damaged(e, last)),
                };
                let frame = FrameRow::from_row(row).map_err(|e| StoreError::Damaged {
                    path: path.clone(),
                    after_seq: last,
                    detail: format!("a frame's columns do not hold their types ({e})"),
                })?;
                frame.check(self, index, &mut scratch, out);
                last = Some(frame.last_seq);
            }
        })
    }

    fn check_row(&self, r: RawRow, scratch: &mut Vec<u8>) -> Checked {
        self.check_record(&r.as_record(), scratch)
    }

    /// Checks one record: decrypts its payload into `scratch` (reused from record to record)
    /// and re-hashes it with its header.
    fn check_record(&self, r: &EventRecord<'_>, scratch: &mut Vec<u8>) -> Checked {
        let (prev_hash, hash) = match (Hash32::from_slice(r.prev_hash), Hash32::from_slice(r.hash))
        {
            (Some(p), Some(h)) => (p, h),
            _ => {
                return Checked {
                    seq: r.seq,
                    prev_hash: Hash32::GENESIS,
                    hash: Hash32::GENESIS,
                    outcome: Outcome::Malformed("its frame's prev_hash is not 32 bytes".into()),
                };
            }
        };
        let plain: &[u8] = match &self.inner.cipher {
            None => r.payload,
            Some(c) => {
                if !c.open_into(r.payload, r.header, scratch) {
                    return Checked {
                        seq: r.seq,
                        prev_hash,
                        hash,
                        outcome: Outcome::Undecryptable,
                    };
                }
                scratch
            }
        };
        let outcome = if chain_hash_parts(&prev_hash, r.seq, r.header, plain) == hash {
            Outcome::Ok
        } else {
            // Only on failure: the body, to look for the place it was written at.
            let mut body = r.header.to_vec();
            push_canonical_payload(&mut body, plain);
            Outcome::HashMismatch { body }
        };
        Checked {
            seq: r.seq,
            prev_hash,
            hash,
            outcome,
        }
    }
}

/// The run index (`frame_runs`) as verify checks it: for each frame, by its first sequence
/// number, the runs it says the frame holds events of, sorted.
pub(crate) struct RunIndex {
    runs: std::collections::HashMap<u64, Vec<[u8; 16]>>,
    /// The lowest first sequence number the index names that no frame has.
    orphan: Option<u64>,
}

/// Reads the whole run index: one row per run and frame, a small table beside the frames.
fn read_run_index(conn: &rusqlite::Connection, path: &Path) -> Result<RunIndex, StoreError> {
    let damaged = |detail: String| StoreError::Damaged {
        path: path.to_path_buf(),
        after_seq: None,
        detail,
    };
    let sql_err = |e: rusqlite::Error| damaged(format!("the run index cannot be read: {e}"));
    let mut stmt = conn
        .prepare(
            "SELECT r.run_id, r.first_seq, f.first_seq IS NOT NULL FROM frame_runs r \
             LEFT JOIN frames f ON f.first_seq = r.first_seq",
        )
        .map_err(sql_err)?;
    let mut rows = stmt.query([]).map_err(sql_err)?;
    let mut runs: std::collections::HashMap<u64, Vec<[u8; 16]>> = Default::default();
    let mut orphan: Option<u64> = None;
    while let Some(row) = rows.next().map_err(sql_err)? {
        let first_seq = u64::try_from(row.get::<_, i64>(1).map_err(sql_err)?).unwrap_or(0);
        let run: [u8; 16] = row
            .get_ref(0)
            .map_err(sql_err)?
            .as_blob()
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                damaged(format!(
                    "the run index's entry for the frame at sequence {first_seq} has no 16-byte run id"
                ))
            })?;
        if !row.get::<_, bool>(2).map_err(sql_err)? {
            orphan = Some(orphan.map_or(first_seq, |o| o.min(first_seq)));
            continue;
        }
        runs.entry(first_seq).or_default().push(run);
    }
    for list in runs.values_mut() {
        list.sort_unstable();
    }
    Ok(RunIndex { runs, orphan })
}

/// A frame row as verify reads it, borrowed from SQLite's row buffer.
struct FrameRow<'a> {
    first_seq: u64,
    last_seq: u64,
    prev_hash: &'a [u8],
    last_hash: &'a [u8],
    body: &'a [u8],
    min_time: i64,
    max_time: i64,
}

impl<'a> FrameRow<'a> {
    fn from_row(row: &'a rusqlite::Row<'_>) -> rusqlite::Result<FrameRow<'a>> {
        let seq =
            |i| -> rusqlite::Result<u64> { Ok(u64::try_from(row.get::<_, i64>(i)?).unwrap_or(0)) };
        Ok(FrameRow {
            first_seq: seq(0)?,
            last_seq: seq(1)?,
            prev_hash: row.get_ref(2)?.as_blob()?,
            last_hash: row.get_ref(3)?.as_blob()?,
            body: row.get_ref(4)?.as_blob()?,
            min_time: row.get(5)?,
            max_time: row.get(6)?,
        })
    }

    /// Checks every record of the frame, then that the frame's own columns agree with them:
    /// its last sequence number, its last hash (what the next append chains onto), its size,
    /// and what queries select frames by, which the chain does not cover: its time bounds and
    /// its runs in the run index. A frame left out of a run's index or a time range hides its
    /// events from `export --run`, `--since` and `runs show` while the chain stays whole.
    fn check(
        &self,
        store: &Store,
        index: Option<&RunIndex>,
        scratch: &mut Vec<u8>,
        out: &mut Vec<Checked>,
    ) {
        // A problem of the frame's query columns is placed at its first event, before its
        // records' own checks, which are taken back: the report counts what verified before it.
        let start = out.len();
        let mut last: Option<(u64, &[u8])> = None;
        let mut runs: Vec<[u8; 16]> = Vec::new();
        let (mut min_time, mut max_time) = (i64::MAX, i64::MIN);
        for rec in crate::frame::records(self.first_seq, self.prev_hash, self.body) {
            match rec {
                Ok(r) => {
                    out.push(store.check_record(&r, scratch));
                    last = Some((r.seq, r.hash));
                    if !runs.contains(&r.run_id) {
                        runs.push(r.run_id);
                    }
                    let time = i64::try_from(r.time_ns).unwrap_or(i64::MAX);
                    min_time = min_time.min(time);
                    max_time = max_time.max(time);
                }
                Err(e) => {
                    out.push(Checked::damaged(
                        e.seq,
                        format!("its frame cannot be read: {}", e.detail),
                    ));
                    return;
                }
            }
        }
        match last {
            None => out.push(Checked::damaged(
                self.first_seq,
                format!("its frame (sequence {}) holds no events", self.first_seq),
            )),
            Some((seq, _)) if seq != self.last_seq => out.push(Checked::damaged(
                seq.min(self.last_seq) + 1,
                format!(
                    "its frame starts at {} and says it ends at {}, but holds events up to {seq}",
                    self.first_seq, self.last_seq
                ),
            )),
            Some((seq, hash)) if hash != self.last_hash => out.push(Checked::damaged(
                seq,
                "its frame's recorded last hash is not this event's hash".into(),
            )),
            Some((seq, _)) if seq - self.first_seq + 1 > MAX_FRAME_EVENTS => {
                out.push(Checked::damaged(
                    self.first_seq + MAX_FRAME_EVENTS,
                    format!("its frame holds more than {MAX_FRAME_EVENTS} events"),
                ))
            }
            Some(_) if (self.min_time, self.max_time) != (min_time, max_time) => {
                out.truncate(start);
                out.push(Checked::damaged(
                    self.first_seq,
                    format!(
                        "its frame's time bounds ({}..{}) are not its events' times \
                         ({min_time}..{max_time}): a query by time would skip or misplace them",
                        self.min_time, self.max_time
                    ),
                ))
            }
            Some(_) => {
                let Some(index) = index else {
                    return;
                };
                runs.sort_unstable();
                let indexed = index
                    .runs
                    .get(&self.first_seq)
                    .map_or(&[][..], Vec::as_slice);
                if indexed != runs.as_slice() {
                    let listed = if indexed.len() == runs.len() {
                        "other runs than those its events belong to".to_string()
                    } else {
                        format!(
                            "{} run(s) for its frame, whose events belong to {}",
                            indexed.len(),
                            runs.len()
                        )
                    };
                    out.truncate(start);
                    out.push(Checked::damaged(
                        self.first_seq,
                        format!(
                            "the run index lists {listed}: a query by run would skip or \
                             misplace them"
                        ),
                    ))
                }
            }
        }
    }
}

/// Reads every event in sequence order in batches; what stops the reading becomes `Damaged`
/// after the last sequence number read.
pub(crate) fn scan_rows(
    conn: &rusqlite::Connection,
    path: &Path,
    emit: &mut dyn FnMut(Vec<RawRow>) -> bool,
) -> Result<(), StoreError> {
    let mut last: Option<u64> = None;
    let scanned = scan_batches(conn, path, &Default::default(), BATCH, &mut |rows| {
        last = rows.last().map(|r| r.seq).or(last);
        emit(rows)
    });
    scanned.map_err(|e| match e {
        StoreError::BadEvent { seq, detail, .. } => StoreError::Damaged {
            path: path.to_path_buf(),
            after_seq: seq.checked_sub(1),
            detail,
        },
        StoreError::Sqlite { path, detail } => StoreError::Damaged {
            path,
            after_seq: last,
            detail,
        },
        other => other,
    })
}

/// The first line of a bundle.
#[derive(Debug, Serialize, serde::Deserialize)]
pub(crate) struct BundleHeader {
    pub agent_runtime_bundle: u32,
}

/// The last line of a bundle: the chain head it must end at.
#[derive(Debug, Serialize, serde::Deserialize)]
pub(crate) struct BundleTrailer {
    pub chain_head: ChainHead,
}

/// The head of a chain: how many events and the last hash.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub(crate) struct ChainHead {
    pub seq: u64,
    pub hash: Hash32,
}

/// The longest line a bundle may hold: an envelope carries one payload (at most
/// [`crate::MAX_PAYLOAD_BYTES`] by default, a store may allow more) and a few hundred bytes
/// more. Longer is not a bundle: a file like `/dev/zero` must not be read whole as one line.
const MAX_BUNDLE_LINE: u64 = 4 * crate::MAX_PAYLOAD_BYTES as u64;

/// The lines of a bundle (`\n` or `\r\n` ended), each a line of text or, for one longer than
/// [`MAX_BUNDLE_LINE`] or not UTF-8, what is wrong with it.
struct BundleLines<R> {
    reader: R,
}

impl<R: BufRead> Iterator for BundleLines<R> {
    type Item = std::io::Result<Result<String, String>>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut buf = Vec::new();
        match (&mut self.reader)
            .take(MAX_BUNDLE_LINE + 1)
            .read_until(b'\n', &mut buf)
        {
            Err(e) => Some(Err(e)),
            Ok(0) => None,
            Ok(_) => {
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                    if buf.last() == Some(&b'\r') {
                        buf.pop();
                    }
                } else if buf.len() as u64 > MAX_BUNDLE_LINE {
                    return Some(Ok(Err(format!(
                        "a line longer than {MAX_BUNDLE_LINE} bytes"
                    ))));
                }
                Some(Ok(
                    String::from_utf8(buf).map_err(|_| "a line that is not UTF-8 text".into())
                ))
            }
        }
    }
}

/// Items gathered into batches of at most `max_items`, or of as many as reach `max_bytes`
/// together, whichever comes first.
struct Batches<T> {
    max_items: usize,
    max_bytes: u64,
    batch: Vec<T>,
    bytes: u64,
}

impl<T> Batches<T> {
    fn new(max_items: usize, max_bytes: u64) -> Self {
        Batches {
            max_items,
            max_bytes,
            batch: Vec::with_capacity(max_items),
            bytes: 0,
        }
    }

    /// Adds `item` of `bytes`; the batch, when that filled it.
    fn push(&mut self, item: T, bytes: u64) -> Option<Vec<T>> {
        self.batch.push(item);
        self.bytes += bytes;
        (self.batch.len() >= self.max_items || self.bytes >= self.max_bytes).then(|| {
            self.bytes = 0;
            std::mem::replace(&mut self.batch, Vec::with_capacity(self.max_items))
        })
    }

    /// What is left, if anything.
    fn finish(self) -> Option<Vec<T>> {
        (!self.batch.is_empty()).then_some(self.batch)
    }
}

/// Verifies a bundle written by `export --format bundle`, offline: no database and no key.
///
/// A clean report says the bundle is whole and consistent with itself: every event hashes to
/// what it claims and links to the one before, up to the chain head it names. It does not say
/// the bundle is the log it claims to be: whoever rewrites events can recompute every hash.
/// Compare `report.head` with a head you obtained another way (from the log's owner, a
/// published or earlier checkpoint); events up to a head you trust cannot have been changed.
///
/// ```no_run
/// let report = agent_runtime_store::verify_bundle(std::path::Path::new("audit.bundle.jsonl")).unwrap();
/// assert!(report.problem.is_none());
/// ```
pub fn verify_bundle(path: &Path) -> Result<VerifyReport, StoreError> {
    let file = std::fs::File::open(path).map_err(|source| StoreError::Io {
        what: "cannot open bundle",
        path: path.to_path_buf(),
        source,
    })?;
    verify_bundle_from(std::io::BufReader::new(file), path)
}

/// Whether `line` is the very line an export writes for `env` (see `export::write_line`).
fn is_exported_form(env: &Envelope, payload: &[u8], line: &str) -> bool {
    let kind = env.kind.as_str();
    let actor = env.actor.to_string();
    let mut expected = Vec::with_capacity(line.len());
    crate::export::write_line(
        &crate::frame::EventRecord {
            seq: env.seq,
            run_id: *env.run_id.as_bytes(),
            task_id: env.task_id.map(|t| *t.as_bytes()),
            actor: &actor,
            kind,
            time_ns: env.time.as_unix_nanos(),
            // Not part of a line.
            header: &[],
            payload: &[],
            prev_hash: &env.prev_hash.0,
            hash: &env.hash.0,
        },
        payload,
        &mut expected,
    );
    expected == line.as_bytes()
}

/// [`verify_bundle`] of a bundle read from `reader` (received over a network, held in memory):
/// `name` stands for it in errors (`<received>`, say).
///
/// ```
/// let bundle = b"{\"agent_runtime_bundle\":1}\n{\"chain_head\":{\"seq\":0,\"hash\":\"0000000000000000000000000000000000000000000000000000000000000000\"}}\n";
/// let report = agent_runtime_store::verify_bundle_from(&bundle[..], "<received>".as_ref()).unwrap();
/// assert_eq!((report.events, report.problem), (0, None));
/// ```
pub fn verify_bundle_from<R: BufRead + Send>(
    reader: R,
    name: &Path,
) -> Result<VerifyReport, StoreError> {
    let path = name;
    let mut lines = BundleLines { reader };
    let bad = |line: u64, detail: String| StoreError::BadBundle {
        path: path.to_path_buf(),
        line,
        detail,
    };
    let io = |source| StoreError::Io {
        what: "cannot read bundle",
        path: path.to_path_buf(),
        source,
    };
    let first = lines
        .next()
        .transpose()
        .map_err(io)?
        .ok_or_else(|| bad(1, "empty file: not a bundle".into()))?
        .map_err(|why| bad(1, format!("{why}: not an agent-runtime bundle")))?;
    let header: BundleHeader = serde_json::from_str(&first)
        .map_err(|_| bad(1, "not an agent-runtime bundle (no bundle header)".into()))?;
    if header.agent_runtime_bundle != 1 {
        return Err(bad(
            1,
            format!(
                "bundle version {} is not supported (this build reads 1)",
                header.agent_runtime_bundle
            ),
        ));
    }
    let mut checker = ChainChecker::new();
    let mut trailer: Option<(u64, ChainHead)> = None;
    let mut line_no = 1u64;
    let mut read_error: Option<StoreError> = None;
    let result = ordered_parallel(
        |emit| {
            // Bounded by bytes too: lines of up to 64 MiB each, a batch of them by count alone
            // could hold tens of GiB.
            let mut batches = Batches::new(BATCH, MAX_BUNDLE_LINE);
            for line in lines.by_ref() {
                line_no += 1;
                let line = line.map_err(io)?.map_err(|why| bad(line_no, why))?;
                if line.is_empty() {
                    return Err(bad(
                        line_no,
                        "an empty line (a bundle holds one JSON record per line)".into(),
                    ));
                }
                if trailer.is_some() {
                    return Err(bad(line_no, "data after the chain head".into()));
                }
                if line.starts_with("{\"chain_head\"") {
                    let t: BundleTrailer = serde_json::from_str(&line)
                        .map_err(|e| bad(line_no, format!("bad chain head: {e}")))?;
                    trailer = Some((line_no, t.chain_head));
                    continue;
                }
                let bytes = line.len() as u64;
                if let Some(full) = batches.push((line_no, line), bytes)
                    && !emit(full)
                {
                    return Ok(());
                }
            }
            if let Some(rest) = batches.finish() {
                emit(rest);
            }
            Ok(())
        },
        |lines: Vec<(u64, String)>| {
            lines
                .into_iter()
                .map(|(n, l)| match serde_json::from_str::<Envelope>(&l) {
                    Ok(env) => {
                        // The payload's canonical bytes once, for the hash and the line's form.
                        let header = env.to_new_event().canonical_header();
                        let payload = agent_runtime_core::canonical_json(&env.payload);
                        let outcome = if chain_hash_parts(
                            &env.prev_hash,
                            env.seq,
                            &header,
                            &payload,
                        ) != env.hash
                        {
                            let mut body = header;
                            push_canonical_payload(&mut body, &payload);
                            Outcome::HashMismatch { body }
                        } else if !is_exported_form(&env, &payload, &l) {
                            Outcome::Malformed(format!(
                                "line {n} is not as an export writes it: something the hash does \
                                 not cover was changed (a field added, a key given twice, a \
                                 time, hash or id written another way)"
                            ))
                        } else {
                            Outcome::Ok
                        };
                        Ok(Checked {
                            seq: env.seq,
                            prev_hash: env.prev_hash,
                            hash: env.hash,
                            outcome,
                        })
                    }
                    Err(e) => Err(bad(n, format!("not an audit envelope: {e}"))),
                })
                .collect::<Vec<_>>()
        },
        |checked| {
            for c in checked {
                match c {
                    Ok(c) => {
                        if !checker.push(c) {
                            return false;
                        }
                    }
                    Err(e) => {
                        read_error = Some(e);
                        return false;
                    }
                }
            }
            true
        },
    );
    result?;
    if let Some(e) = read_error {
        return Err(e);
    }
    if checker.problem.is_some() {
        return Ok(checker.finish(None, "bundle"));
    }
    match trailer {
        None => {
            let seq = checker.expected_seq;
            let mut report = checker.finish(None, "bundle");
            report.problem = Some(Problem {
                seq,
                kind: ProblemKind::TailMissing,
                detail: "the bundle has no chain head: it was cut short".into(),
            });
            Ok(report)
        }
        Some((_, head)) => {
            let mut report = checker.finish(Some(head.seq), "bundle's chain head");
            if report.problem.is_none() && (head.seq != report.last_seq || head.hash != report.head)
            {
                report.problem = Some(Problem {
                    seq: head.seq,
                    kind: ProblemKind::ChainBroken,
                    detail: format!(
                        "the chain ends at {} with hash {} but the chain head says {} with {}",
                        report.last_seq, report.head, head.seq, head.hash
                    ),
                });
            }
            Ok(report)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Batches;

    #[test]
    fn batches_are_bounded_by_count_and_by_bytes() {
        let mut batches = Batches::new(3, 100);
        // Small items: three to a batch.
        assert_eq!(batches.push(1, 1), None);
        assert_eq!(batches.push(2, 1), None);
        assert_eq!(batches.push(3, 1), Some(vec![1, 2, 3]));
        // Large ones: as many as reach the bytes, however few.
        assert_eq!(batches.push(4, 60), None);
        assert_eq!(batches.push(5, 60), Some(vec![4, 5]));
        assert_eq!(batches.push(6, 150), Some(vec![6]));
        // The bytes count starts again with each batch.
        assert_eq!(batches.push(7, 99), None);
        assert_eq!(batches.finish(), Some(vec![7]));
        assert_eq!(Batches::<u8>::new(3, 100).finish(), None);
    }
}
