//! Exports: `jsonl` (one audit envelope per line), `otlp` (OpenTelemetry log records, OTLP/JSON,
//! one `ExportLogsServiceRequest` per line as the OpenTelemetry file exporter writes them) and
//! `bundle` (a header line, every envelope, and the chain head: verifiable offline with
//! [`verify_bundle`](crate::verify_bundle)).

use std::io::Write;
use std::str::FromStr;

use agent_runtime_core::{EventQuery, Hash32, RunId, TaskId, Timestamp};
use serde_json::json;

use crate::error::StoreError;
use crate::pipeline::ordered_parallel;
use crate::store::{RawRow, Store};
use crate::verify::{BundleHeader, BundleTrailer, ChainHead};

const BATCH: usize = 2048;
const OTLP_RECORDS_PER_LINE: usize = 512;

/// An export format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExportFormat {
    /// One audit envelope (the published schema) per line.
    Jsonl,
    /// OpenTelemetry log records, OTLP/JSON, one export request per line.
    Otlp,
    /// Header, every envelope, chain head: verifiable offline.
    Bundle,
}

impl FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "jsonl" => Ok(ExportFormat::Jsonl),
            "otlp" => Ok(ExportFormat::Otlp),
            "bundle" => Ok(ExportFormat::Bundle),
            other => Err(format!(
                "unknown export format {other:?}: use jsonl, otlp or bundle"
            )),
        }
    }
}

/// What an export wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExportSummary {
    /// Events written.
    pub events: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// One batch of rows, encoded on a worker.
struct Encoded {
    /// jsonl or bundle lines, or OTLP log records back to back (each ends at an offset in
    /// `ends`).
    buf: Vec<u8>,
    /// Where each OTLP log record in `buf` ends.
    ends: Vec<usize>,
    /// Sequence and hash of the batch's last row.
    tail: Option<(u64, Hash32)>,
    /// Rows in the batch.
    n: u64,
}

struct CountingWriter<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Store {
    /// Writes the events matching `query` to `out` in `format`, on the calling thread (it
    /// blocks until done; see the crate docs).
    ///
    /// A bundle must hold the chain from its start, so it takes no filter: `query` must be the
    /// default (the whole log).
    pub fn export(
        &self,
        query: &EventQuery,
        format: ExportFormat,
        out: impl Write,
    ) -> Result<ExportSummary, StoreError> {
        let path = self.inner.path.clone();
        let io_err = |source| StoreError::ExportOutput {
            database: path.clone(),
            source,
        };
        if format == ExportFormat::Bundle && *query != EventQuery::default() {
            return Err(StoreError::BadEvent {
                path: path.clone(),
                seq: 0,
                detail: "a bundle holds the whole chain; it cannot be filtered by run, kind, time or sequence".into(),
            });
        }
        if format == ExportFormat::Bundle {
            // A bundle says "the whole chain": not of a log whose end was cut off.
            let reader = self.inner.reader.lock().unwrap_or_else(|p| p.into_inner());
            crate::store::check_tail(&reader, &path, self.inner.cipher.as_deref())?;
        }
        let mut out = CountingWriter {
            inner: std::io::BufWriter::with_capacity(1 << 20, out),
            bytes: 0,
        };
        if format == ExportFormat::Bundle {
            serde_json::to_writer(
                &mut out,
                &BundleHeader {
                    agent_runtime_bundle: 1,
                },
            )
            .map_err(|e| io_err(e.into()))?;
            out.write_all(b"\n").map_err(io_err)?;
        }
        let reader = &self.inner.reader;
        let mut events = 0u64;
        let mut last: Option<(u64, Hash32)> = None;
        let mut write_err: Option<StoreError> = None;
        let mut otlp = OtlpLines::new();
        ordered_parallel(
            |emit| {
                crate::store::scan_batches(
                    &reader.lock().unwrap_or_else(|p| p.into_inner()),
                    &path,
                    query,
                    BATCH,
                    emit,
                )
            },
            |rows: Vec<RawRow>| -> Result<Encoded, StoreError> {
                let mut buf = Vec::with_capacity(rows.len() * 900);
                let mut ends = Vec::new();
                let n = rows.len() as u64;
                let mut tail = None;
                let mut scratch = Vec::with_capacity(1024);
                for r in rows {
                    let plain = self.open_payload_into(&r.as_record(), &mut scratch)?;
                    tail = Some((r.seq, Hash32::from_slice(&r.hash).unwrap_or_default()));
                    match format {
                        // Written here, on the workers, and its tree freed here too: one
                        // thread writing and freeing every record made OTLP 20 to 30 times
                        // slower than jsonl.
                        ExportFormat::Otlp => {
                            serde_json::to_writer(&mut buf, &otlp_record(&r, plain))
                                .map_err(|e| io_err(e.into()))?;
                            ends.push(buf.len());
                        }
                        _ => write_envelope_line(&r, plain, &mut buf),
                    }
                }
                Ok(Encoded { buf, ends, tail, n })
            },
            |res| match res {
                Ok(Encoded { buf, ends, tail, n }) => {
                    let written = if format == ExportFormat::Otlp {
                        otlp.extend(&buf, &ends, &mut out)
                    } else {
                        out.write_all(&buf)
                    };
                    if let Err(e) = written {
                        write_err = Some(io_err(e));
                        return false;
                    }
                    events += n;
                    if tail.is_some() {
                        last = tail;
                    }
                    true
                }
                Err(e) => {
                    write_err = Some(e);
                    false
                }
            },
        )?;
        if let Some(e) = write_err {
            return Err(e);
        }
        if format == ExportFormat::Otlp {
            otlp.flush(&mut out).map_err(io_err)?;
        }
        if format == ExportFormat::Bundle {
            let (seq, hash) = last.unwrap_or((0, Hash32::GENESIS));
            serde_json::to_writer(
                &mut out,
                &BundleTrailer {
                    chain_head: ChainHead { seq, hash },
                },
            )
            .map_err(|e| io_err(e.into()))?;
            out.write_all(b"\n").map_err(io_err)?;
        }
        out.flush().map_err(io_err)?;
        Ok(ExportSummary {
            events,
            bytes: out.bytes,
        })
    }
}

/// Writes one envelope as a JSON line, byte for byte what `serde_json::to_string(&Envelope)`
/// writes (a test holds it to that), without parsing the payload: the stored payload is already
/// canonical JSON. This is what makes export fast.
fn write_envelope_line(r: &RawRow, payload: &[u8], out: &mut Vec<u8>) {
    write_line(&r.as_record(), payload, out);
    out.push(b'\n');
}

/// An envelope as a jsonl or bundle line, without its newline, from the record's fields and
/// `payload` (the canonical payload JSON; the record's own may be sealed): the one form an
/// export writes, which [`verify_bundle`](crate::verify_bundle) also holds every line to (what
/// the hash does not cover, a field added or a time written another way, is a change too).
pub(crate) fn write_line(p: &crate::frame::EventRecord<'_>, payload: &[u8], out: &mut Vec<u8>) {
    use std::io::Write as _;
    let _ = write!(
        out,
        "{{\"seq\":{},\"run_id\":\"{}\"",
        p.seq,
        RunId::from_bytes(p.run_id)
    );
    if let Some(t) = p.task_id {
        let _ = write!(out, ",\"task_id\":\"{}\"", TaskId::from_bytes(t));
    }
    out.extend_from_slice(b",\"actor\":");
    let _ = serde_json::to_writer(&mut *out, p.actor);
    out.extend_from_slice(b",\"kind\":");
    let _ = serde_json::to_writer(&mut *out, p.kind);
    let _ = write!(
        out,
        ",\"time\":\"{}\",\"payload\":",
        Timestamp::from_unix_nanos(p.time_ns)
    );
    out.extend_from_slice(payload);
    out.extend_from_slice(b",\"prev_hash\":\"");
    push_hex(out, p.prev_hash);
    out.extend_from_slice(b"\",\"hash\":\"");
    push_hex(out, p.hash);
    out.extend_from_slice(b"\"}");
}

/// Lowercase hex of `bytes` appended to `out` (the `hex` crate's iterator is slow on this path).
fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0x0f)]);
    }
}

fn otlp_record(r: &RawRow, payload: &[u8]) -> serde_json::Value {
    let severity = if r.kind.ends_with(".failed") {
        (17, "ERROR")
    } else {
        (9, "INFO")
    };
    let mut attributes = vec![
        json!({"key": "agent_runtime.seq", "value": {"intValue": r.seq.to_string()}}),
        json!({"key": "agent_runtime.run_id", "value": {"stringValue": RunId::from_bytes(r.run_id).to_string()}}),
        json!({"key": "agent_runtime.actor", "value": {"stringValue": r.actor}}),
        json!({"key": "agent_runtime.kind", "value": {"stringValue": r.kind}}),
        json!({"key": "agent_runtime.prev_hash", "value": {"stringValue": hex::encode(&r.prev_hash)}}),
        json!({"key": "agent_runtime.hash", "value": {"stringValue": hex::encode(&r.hash)}}),
    ];
    if let Some(t) = r.task_id {
        attributes.push(json!({"key": "agent_runtime.task_id", "value": {"stringValue": TaskId::from_bytes(t).to_string()}}));
    }
    let mut rec = json!({
        "timeUnixNano": r.time_ns.to_string(),
        "observedTimeUnixNano": r.time_ns.to_string(),
        "severityNumber": severity.0,
        "severityText": severity.1,
        "eventName": r.kind,
        "body": {"stringValue": String::from_utf8_lossy(payload)},
        "attributes": attributes,
        // The run is the trace: every event of a run shares its trace id.
        "traceId": hex::encode(r.run_id),
    });
    if let Some(t) = r.task_id {
        // A task is a span within the run; OTLP span ids are 8 bytes.
        rec["spanId"] = json!(hex::encode(&t[8..]));
    }
    rec
}

/// An OTLP/JSON line around `records`: what each line of an `otlp` export is.
fn otlp_line(records: Vec<serde_json::Value>) -> serde_json::Value {
    json!({
        "resourceLogs": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "agent-runtime"}}]},
            "scopeLogs": [{
                "scope": {"name": "agent-runtime.audit", "version": env!("CARGO_PKG_VERSION")},
                "logRecords": records,
            }],
        }],
    })
}

/// OTLP lines of [`OTLP_RECORDS_PER_LINE`] records each, from records already written: the
/// bytes of [`otlp_line`] around them, as serde_json writes it (whatever order its maps keep
/// keys in), cut where the records go.
struct OtlpLines {
    prefix: Vec<u8>,
    suffix: Vec<u8>,
    records: Vec<u8>,
    count: usize,
}

impl OtlpLines {
    fn new() -> OtlpLines {
        let empty = serde_json::to_vec(&otlp_line(Vec::new())).unwrap_or_default();
        let marker = br#""logRecords":[]"#;
        let at = empty
            .windows(marker.len())
            .position(|w| w == marker)
            .map_or(empty.len(), |i| i + marker.len() - 1);
        OtlpLines {
            prefix: empty[..at].to_vec(),
            suffix: empty[at..].to_vec(),
            records: Vec::new(),
            count: 0,
        }
    }

    /// Adds the records of `buf` (each ending at an offset in `ends`), writing every line
    /// they fill.
    fn extend(&mut self, buf: &[u8], ends: &[usize], out: &mut impl Write) -> std::io::Result<()> {
        let mut start = 0;
        for &end in ends {
            if self.count > 0 {
                self.records.push(b',');
            }
            self.records.extend_from_slice(&buf[start..end]);
            self.count += 1;
            start = end;
            if self.count == OTLP_RECORDS_PER_LINE {
                self.flush(out)?;
            }
        }
        Ok(())
    }

    /// Writes the records held as a line, if there are any.
    fn flush(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        out.write_all(&self.prefix)?;
        out.write_all(&self.records)?;
        out.write_all(&self.suffix)?;
        out.write_all(b"\n")?;
        self.records.clear();
        self.count = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_runtime_core::{Actor, Envelope, EventKind, NewEvent};

    /// Records written one by one and joined into lines give the bytes of the whole line
    /// written as one tree, at and around the records-per-line cut.
    #[test]
    fn otlp_lines_equal_the_line_written_whole() {
        let record =
            |i: u64| json!({"seq": i.to_string(), "body": {"stringValue": format!("é\"{i}")}});
        for n in [
            1,
            OTLP_RECORDS_PER_LINE - 1,
            OTLP_RECORDS_PER_LINE,
            OTLP_RECORDS_PER_LINE + 3,
        ] {
            let mut buf = Vec::new();
            let mut ends = Vec::new();
            for i in 0..n as u64 {
                serde_json::to_writer(&mut buf, &record(i)).unwrap();
                ends.push(buf.len());
            }
            let mut lines = OtlpLines::new();
            let mut out = Vec::new();
            // In two pieces, as batches arrive.
            let half = ends.len() / 2;
            lines
                .extend(
                    &buf[..ends[half.max(1) - 1]],
                    &ends[..half.max(1)],
                    &mut out,
                )
                .unwrap();
            let rest: Vec<usize> = ends[half.max(1)..]
                .iter()
                .map(|e| e - ends[half.max(1) - 1])
                .collect();
            lines
                .extend(&buf[ends[half.max(1) - 1]..], &rest, &mut out)
                .unwrap();
            lines.flush(&mut out).unwrap();
            let mut expected = Vec::new();
            let all: Vec<_> = (0..n as u64).map(record).collect();
            for chunk in all.chunks(OTLP_RECORDS_PER_LINE) {
                serde_json::to_writer(&mut expected, &otlp_line(chunk.to_vec())).unwrap();
                expected.push(b'\n');
            }
            assert_eq!(
                String::from_utf8(out).unwrap(),
                String::from_utf8(expected).unwrap(),
                "{n} records"
            );
        }
    }

    #[test]
    fn hand_written_line_equals_serde() {
        for task in [None, Some(TaskId::from_bytes([4; 16]))] {
            let ev = NewEvent {
                run_id: RunId::from_bytes([3; 16]),
                task_id: task,
                actor: Actor::Agent("wr\"iter".into()),
                kind: EventKind::ToolCompleted,
                time: Timestamp::from_unix_nanos(1_764_254_213_123_456_789),
                payload: json!({"z": [1, 2.5, "é\u{1}"], "a": null}),
            };
            let env = Envelope::seal(9, Hash32([1; 32]), ev.clone());
            let raw = RawRow {
                seq: 9,
                run_id: [3; 16],
                task_id: task.map(|t| *t.as_bytes()),
                actor: ev.actor.to_string(),
                kind: ev.kind.as_str().into(),
                time_ns: ev.time.as_unix_nanos(),
                header: ev.canonical_header(),
                payload: agent_runtime_core::canonical_json(&ev.payload),
                prev_hash: vec![1; 32],
                hash: env.hash.0.to_vec(),
            };
            let mut line = Vec::new();
            write_envelope_line(&raw, &raw.payload, &mut line);
            let expected = serde_json::to_string(&env).unwrap() + "\n";
            assert_eq!(String::from_utf8(line).unwrap(), expected);
        }
    }
}
