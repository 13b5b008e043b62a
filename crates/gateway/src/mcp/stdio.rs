//! The stdio transport of `mcp serve`: the client's lines pass through a reader of ours on the
//! way to the SDK, and the SDK's answers through a writer of ours on the way out.
//!
//! Why not hand the SDK (rmcp) stdin and stdout directly: it drops a line it cannot decode
//! without an answer, so a request with invalid UTF-8, a lone surrogate escape, nesting deeper
//! than the JSON parser's limit or more than 16 MiB left its client waiting forever; it ends
//! the session on a notification that comes before `initialize`; it goes on running calls when
//! nobody reads its answers any more; and it has no way to be stopped but end of input. Here:
//! each line that does not parse is answered with a JSON-RPC parse error (with the request's
//! id when one can be read); notifications and responses before `initialize` are dropped; a
//! write to stdout that fails (the client is gone) stops the session; and `stop` ends the
//! input as the client closing it would, so calls in flight are cancelled and recorded.

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use agent_runtime_core::CancellationToken;
use serde_json::{Value, json};

/// The longest line (one JSON-RPC message) read; a longer one is answered with an error and
/// passed over.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// One line read from the client.
enum Line {
    /// A whole line, without its newline.
    Text(Vec<u8>),
    /// A line longer than [`MAX_MESSAGE_BYTES`], passed over: its first [`KEPT_OF_LONG`]
    /// bytes, where its id usually is.
    TooLong(Vec<u8>),
    /// End of input.
    End,
}

/// How long answers still go out once the session is over (the client's input ended, or the
/// server was told to stop), for a client that does not take them.
const WRITE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Lines queued for stdout before the SDK and the reader wait for the client to take them.
const QUEUED_LINES: usize = 16;

/// Requests handed to the SDK and not answered yet, at most: the SDK queues the answers of
/// everything it reads, so a client that sends without reading would otherwise grow it
/// without bound.
const MAX_OUTSTANDING: usize = 256;

/// The requests the SDK has not answered yet (see [`MAX_OUTSTANDING`]).
#[derive(Default)]
struct Outstanding {
    count: std::sync::atomic::AtomicUsize,
    freed: tokio::sync::Notify,
}

impl Outstanding {
    /// Waits for room for one more request, and takes it; false if `session` ends first.
    async fn admit(&self, session: &CancellationToken) -> bool {
        use std::sync::atomic::Ordering;
        loop {
            let freed = self.freed.notified();
            if self.count.load(Ordering::Acquire) < MAX_OUTSTANDING {
                self.count.fetch_add(1, Ordering::AcqRel);
                return true;
            }
            tokio::select! {
                _ = freed => {}
                _ = session.cancelled() => return false,
            }
        }
    }

    /// One request will not be waited for any more (answered, or cancelled: the SDK does not
    /// answer a cancelled request).
    fn release(&self) {
        use std::sync::atomic::Ordering;
        let _ = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.freed.notify_waiters();
    }
}

/// What the relay needs to know of the SDK's line: whether it answers a request.
#[derive(serde::Deserialize)]
struct Probe {
    id: Option<serde::de::IgnoredAny>,
    method: Option<serde::de::IgnoredAny>,
}

/// How much of a line too long to read is kept, to find its id in.
const KEPT_OF_LONG: usize = 64 * 1024;

/// Reads the next line, keeping at most [`MAX_MESSAGE_BYTES`] of it.
async fn next_line<R: AsyncRead + Unpin>(input: &mut BufReader<R>) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = input.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if too_long {
                Line::TooLong(line)
            } else if line.is_empty() {
                Line::End
            } else {
                Line::Text(line)
            });
        }
        let (chunk, ended) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !too_long {
            if line.len() + chunk.len() > MAX_MESSAGE_BYTES {
                too_long = true;
                line.truncate(KEPT_OF_LONG);
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = ended.unwrap_or(buf.len());
        input.consume(used);
        if ended.is_some() {
            return Ok(if too_long {
                Line::TooLong(line)
            } else {
                Line::Text(line)
            });
        }
    }
}

/// The JSON-RPC error answering a message that could not be read.
fn parse_error(id: Value, message: String) -> Vec<u8> {
    error_line(id, -32700, message)
}

/// A JSON-RPC error answer, as a line.
fn error_line(id: Value, code: i64, message: String) -> Vec<u8> {
    let mut line = serde_json::to_vec(&json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {"code": code, "message": message},
    }))
    .unwrap_or_default();
    line.push(b'\n');
    line
}

/// The longest string id a parse error gives back.
const MAX_SALVAGED_ID: usize = 1024;

/// The `id` of a top-level JSON object in `text` that does not parse as a whole, when it is a
/// whole number or a string (of at most [`MAX_SALVAGED_ID`] bytes): found by a scan that
/// tracks strings and nesting only, so that a request whose parameters are broken still gets
/// its answer. The first `id` key counts.
fn salvage_id(text: &str) -> Value {
    let b = text.as_bytes();
    let (mut depth, mut i) = (0usize, 0usize);
    while i < b.len() {
        match b[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                let key = text.get(start..i.min(b.len())).unwrap_or("");
                if depth == 1 && key == "id" {
                    let rest = text.get(i + 1..).unwrap_or("").trim_start();
                    if let Some(rest) = rest.strip_prefix(':') {
                        let mut de = serde_json::Deserializer::from_str(rest.trim_start())
                            .into_iter::<Value>();
                        match de.next() {
                            // An id the client can match: a whole number, or a string of
                            // reasonable size (not a number written with a fraction or an
                            // exponent, nor `-0`, which the parser reads as a float).
                            Some(Ok(Value::Number(n))) if n.is_i64() || n.is_u64() => {
                                return Value::Number(n);
                            }
                            Some(Ok(Value::String(id))) if id.len() <= MAX_SALVAGED_ID => {
                                return Value::String(id);
                            }
                            _ => return Value::Null,
                        }
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    Value::Null
}

/// What to do with one line from the client.
enum Verdict {
    /// Pass it to the SDK.
    Forward,
    /// Pass this request to the SDK, which will answer it.
    ForwardRequest,
    /// Pass this `notifications/cancelled` to the SDK, which will then not answer the request
    /// it names.
    ForwardCancel,
    /// Answer it ourselves and pass it over.
    Answer(Vec<u8>),
    /// Pass it over without an answer (a notification or response before `initialize`).
    Drop,
}

fn judge(line: &[u8], initialized: &mut bool) -> Verdict {
    let text = match std::str::from_utf8(line) {
        Ok(t) => t,
        Err(e) => {
            let id = salvage_id(&String::from_utf8_lossy(line));
            return Verdict::Answer(parse_error(
                id,
                format!("Parse error: the message is not UTF-8 ({e})"),
            ));
        }
    };
    if text.trim().is_empty() {
        return Verdict::Drop;
    }
    let message: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return Verdict::Answer(parse_error(salvage_id(text), format!("Parse error: {e}")));
        }
    };
    let Value::Object(m) = &message else {
        // Batches and stray values: the SDK answers them.
        return Verdict::Forward;
    };
    let id = m.get("id").filter(|id| {
        matches!(id, Value::String(_)) || id.as_i64().is_some() || id.as_u64().is_some()
    });
    // What the SDK would answer without an id (the client could not match it): answered here
    // with it. A notification so malformed is dropped (notifications get no answer).
    let malformed = if m.get("jsonrpc") != Some(&json!("2.0")) {
        Some("`jsonrpc` must be \"2.0\"")
    } else if m.contains_key("method") && !m["method"].is_string() {
        Some("`method` must be a string")
    } else if m.get("params").is_some_and(|p| !p.is_object()) {
        Some("`params` must be an object")
    } else {
        None
    };
    if let Some(why) = malformed {
        return match id {
            Some(id) if m.contains_key("method") => Verdict::Answer(error_line(
                id.clone(),
                -32600,
                format!("Invalid Request: {why}"),
            )),
            Some(_) => Verdict::Forward,
            None => Verdict::Drop,
        };
    }
    let is_request = m.contains_key("method") && id.is_some();
    if !*initialized {
        if is_request && m.get("method").and_then(Value::as_str) == Some("initialize") {
            *initialized = true;
        } else if !is_request {
            return Verdict::Drop;
        }
    }
    if is_request {
        Verdict::ForwardRequest
    } else if m.get("method").and_then(Value::as_str) == Some("notifications/cancelled") {
        Verdict::ForwardCancel
    } else {
        Verdict::Forward
    }
}

/// Serves a session of the SDK's `service` over `input` and `output` (stdin and stdout) until
/// the client closes its input, stdout fails, or `stop` is cancelled; see the module's notes.
/// `serve` starts the SDK's side on the given pair of pipes and resolves when the session ends;
/// `calls` is cancelled when stdout fails (the calls' results could not reach anyone).
pub(crate) async fn framed<R, W, F, Fut, E>(
    input: R,
    mut output: W,
    stop: CancellationToken,
    calls: CancellationToken,
    serve: F,
) -> Result<(), E>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    F: FnOnce(tokio::io::DuplexStream, tokio::io::DuplexStream) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    let (sdk_in, mut feed) = tokio::io::duplex(1 << 16);
    let (sdk_out, from_sdk) = tokio::io::duplex(1 << 16);
    // Bounded: a client that does not read holds up the SDK and this reader, rather than
    // making the queue grow with everything it sends.
    let (answers, mut answered) = mpsc::channel::<Vec<u8>>(QUEUED_LINES);
    let session = stop.child_token();
    let outstanding = std::sync::Arc::new(Outstanding::default());

    // The client's lines, judged, to the SDK; our own answers to the writer.
    let reading = {
        let session = session.clone();
        let answers = answers.clone();
        let outstanding = outstanding.clone();
        tokio::spawn(async move {
            let mut input = BufReader::new(input);
            let mut initialized = false;
            loop {
                let line = tokio::select! {
                    line = next_line(&mut input) => line,
                    _ = session.cancelled() => break,
                };
                let line = match line {
                    Ok(Line::Text(line)) => line,
                    Ok(Line::TooLong(start)) => {
                        let answer = parse_error(
                            salvage_id(&String::from_utf8_lossy(&start)),
                            format!("Parse error: the message is over {MAX_MESSAGE_BYTES} bytes"),
                        );
                        tokio::select! {
                            _ = answers.send(answer) => {}
                            _ = session.cancelled() => break,
                        }
                        continue;
                    }
                    Ok(Line::End) | Err(_) => break,
                };
                let verdict = judge(&line, &mut initialized);
                match verdict {
                    Verdict::ForwardRequest if !outstanding.admit(&session).await => break,
                    Verdict::ForwardCancel => outstanding.release(),
                    _ => {}
                }
                match verdict {
                    Verdict::Forward | Verdict::ForwardRequest | Verdict::ForwardCancel => {
                        let fed = async {
                            feed.write_all(&line).await?;
                            feed.write_all(b"\n").await?;
                            feed.flush().await
                        };
                        let fed = tokio::select! {
                            r = fed => r.is_ok(),
                            _ = session.cancelled() => false,
                        };
                        if !fed {
                            break;
                        }
                    }
                    Verdict::Answer(a) => {
                        tokio::select! {
                            _ = answers.send(a) => {}
                            _ = session.cancelled() => break,
                        }
                    }
                    Verdict::Drop => {}
                }
            }
            // End of input for the SDK: it cancels what is in flight and ends the session.
            let _ = feed.shutdown().await;
        })
    };

    // The SDK's lines, whole, into the same queue as our answers: read by a task of their own,
    // so that no line is cut by a read given up half way (`read_until` is not cancel-safe) and
    // the SDK never waits on a client that does not read.
    // (The relay takes the last sender: the queue closes when it and the reader are done.)
    let relaying = {
        let outstanding = outstanding.clone();
        tokio::spawn(async move {
            let mut from_sdk = BufReader::new(from_sdk);
            loop {
                let mut line = Vec::new();
                match from_sdk.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let answer = serde_json::from_slice::<Probe>(&line)
                            .is_ok_and(|p| p.id.is_some() && p.method.is_none());
                        if answers.send(line).await.is_err() {
                            break;
                        }
                        if answer {
                            outstanding.release();
                        }
                    }
                }
            }
        })
    };
    // Every line out to stdout, in the order queued. It ends when both the reader and the
    // relay are done (the queue closes), or when stdout fails; once the session has been over
    // for WRITE_GRACE, what the client has not taken is given up (a client that stopped
    // reading must not keep a stopped server alive).
    let abandon = CancellationToken::new();
    {
        let (session, abandon) = (session.clone(), abandon.clone());
        tokio::spawn(async move {
            session.cancelled().await;
            tokio::time::sleep(WRITE_GRACE).await;
            abandon.cancel();
        });
    }
    let writing = {
        let session = session.clone();
        tokio::spawn(async move {
            let mut writable = true;
            while let Some(next) = answered.recv().await {
                if !writable {
                    // Taken off the queue and dropped, so that the SDK can finish.
                    continue;
                }
                let written = async {
                    output.write_all(&next).await?;
                    output.flush().await
                };
                let written = tokio::select! {
                    biased;
                    r = written => r.is_ok(),
                    _ = abandon.cancelled() => false,
                };
                if !written {
                    // Nobody reads the answers: end the session and its calls rather than run
                    // calls whose results nobody will see.
                    writable = false;
                    calls.cancel();
                    session.cancel();
                }
            }
        })
    };

    let result = serve(sdk_in, sdk_out).await;
    session.cancel();
    let _ = reading.await;
    let _ = relaying.await;
    let _ = writing.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_that_do_not_parse_are_answered_with_their_id() {
        let mut init = false;
        for (line, id) in [
            (&b"{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"tools/call\",\"params\":{\"p\":\"a\xff\"}}"[..], json!(3)),
            (br#"{"jsonrpc":"2.0","id":"x","method":"m","params":{"p":"a\ud800"}}"#, json!("x")),
            (br#"{"params":{"s":"\"id\": 9"},"id":4,"method":"m","x":[[["#, json!(4)),
            (b"garbage", Value::Null),
            // Ids a client could not match are not made up: a float, a number past 64 bits.
            (br#"{"id":1.5,"method":"m","params":{"p":"a\ud800"}}"#, Value::Null),
            (br#"{"id":123456789012345678901234,"method":"m","x":"\ud800"}"#, Value::Null),
            (br#"{"id":-0,"method":"m","x":"\ud800"}"#, Value::Null),
            (br#"{"id":-7,"method":"m","x":"\ud800"}"#, json!(-7)),
        ] {
            let Verdict::Answer(a) = judge(line, &mut init) else {
                panic!("{}", String::from_utf8_lossy(line));
            };
            let a: Value = serde_json::from_slice(&a).unwrap();
            assert_eq!(a["id"], id, "{a}");
            assert_eq!(a["error"]["code"], -32700);
        }
        let deep = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"m\",\"params\":{{\"a\":{}1{}}}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        let Verdict::Answer(a) = judge(deep.as_bytes(), &mut init) else {
            panic!("deep");
        };
        assert_eq!(serde_json::from_slice::<Value>(&a).unwrap()["id"], 7);
    }

    #[test]
    fn requests_the_sdk_would_answer_without_an_id_are_answered_here() {
        let mut init = true;
        for (line, id) in [
            (
                &br#"{"jsonrpc":"2.0","id":21,"method":"tools/list","params":[]}"#[..],
                json!(21),
            ),
            (br#"{"id":"a","method":"tools/list"}"#, json!("a")),
            (br#"{"jsonrpc":"2.0","id":25,"method":5}"#, json!(25)),
        ] {
            let Verdict::Answer(a) = judge(line, &mut init) else {
                panic!("{}", String::from_utf8_lossy(line));
            };
            let a: Value = serde_json::from_slice(&a).unwrap();
            assert_eq!(
                (a["id"].clone(), a["error"]["code"].clone()),
                (id, json!(-32600)),
                "{a}"
            );
        }
        let note = br#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":"x"}"#;
        assert!(matches!(judge(note, &mut init), Verdict::Drop));
    }

    #[test]
    fn notifications_before_initialize_are_dropped() {
        let mut init = false;
        let note =
            br#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":5}}"#;
        assert!(matches!(judge(note, &mut init), Verdict::Drop));
        let response = br#"{"jsonrpc":"2.0","id":1,"result":{}}"#;
        assert!(matches!(judge(response, &mut init), Verdict::Drop));
        let ping = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
        assert!(matches!(judge(ping, &mut init), Verdict::ForwardRequest));
        // A notification named `initialize` initializes nothing.
        let not_a_request = br#"{"jsonrpc":"2.0","method":"initialize","params":{}}"#;
        assert!(matches!(judge(not_a_request, &mut init), Verdict::Drop));
        assert!(!init);
        let initialize = br#"{"jsonrpc":"2.0","id":2,"method":"initialize","params":{}}"#;
        assert!(matches!(
            judge(initialize, &mut init),
            Verdict::ForwardRequest
        ));
        assert!(init);
        assert!(matches!(judge(note, &mut init), Verdict::ForwardCancel));
        let initialized = br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
        assert!(matches!(judge(initialized, &mut init), Verdict::Forward));
    }

    /// Writes an `initialize` request, then requests 1 to `count`, each followed by `garbage`
    /// lines that do not parse.
    async fn send_requests(client: &mut tokio::io::DuplexStream, count: u32, garbage: usize) {
        client
            .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"initialize\",\"params\":{}}\n")
            .await
            .unwrap();
        for id in 1..=count {
            let line = format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"m\"}}\n");
            client.write_all(line.as_bytes()).await.unwrap();
            for _ in 0..garbage {
                client.write_all(b"garbage\n").await.unwrap();
            }
        }
    }

    /// The SDK's long lines and our own answers come out whole, however they interleave, and
    /// the session ends when the client's input does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_come_out_whole_and_the_session_ends_with_the_input() {
        let (mut client, input) = tokio::io::duplex(1 << 16);
        let (output, mut from_server) = tokio::io::duplex(1 << 16);
        // A stand-in for the SDK: answers each line it gets with 300 KB of JSON.
        let sdk = |sdk_in: tokio::io::DuplexStream, mut sdk_out: tokio::io::DuplexStream| async move {
            let mut lines = BufReader::new(sdk_in).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let v: Value = serde_json::from_str(&line).unwrap();
                let mut answer = serde_json::to_vec(
                    &json!({"jsonrpc": "2.0", "id": v["id"], "result": "x".repeat(300_000)}),
                )
                .unwrap();
                answer.push(b'\n');
                sdk_out.write_all(&answer).await.unwrap();
            }
            Ok::<(), ()>(())
        };
        let served = tokio::spawn(framed(
            input,
            output,
            CancellationToken::new(),
            CancellationToken::new(),
            sdk,
        ));
        let reading = tokio::spawn(async move {
            let mut out = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut from_server, &mut out)
                .await
                .unwrap();
            out
        });
        send_requests(&mut client, 10, 20).await;
        drop(client);
        tokio::time::timeout(std::time::Duration::from_secs(30), served)
            .await
            .expect("the session ends with its input")
            .unwrap()
            .unwrap();
        let out = reading.await.unwrap();
        let lines: Vec<&[u8]> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), 11 + 200);
        for line in lines {
            let v: Value = serde_json::from_slice(line).unwrap_or_else(|e| {
                panic!(
                    "{e}: {}",
                    String::from_utf8_lossy(&line[..80.min(line.len())])
                )
            });
            assert!(
                v.get("result").is_some() || v["error"]["code"] == -32700,
                "{v}"
            );
        }
    }

    /// A client that sends without reading is held back once MAX_OUTSTANDING requests wait
    /// for their answers: the SDK is not handed more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_does_not_read_is_held_back() {
        let (mut client, input) = tokio::io::duplex(1 << 20);
        let (output, _never_read) = tokio::io::duplex(1 << 10);
        let handed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = handed.clone();
        let sdk = move |sdk_in: tokio::io::DuplexStream, mut sdk_out: tokio::io::DuplexStream| async move {
            // Answers every request from a queue of its own, as the SDK does, without waiting
            // for its answers to be taken.
            let mut lines = BufReader::new(sdk_in).lines();
            let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
            tokio::spawn(async move {
                while let Some(a) = rx.recv().await {
                    if sdk_out.write_all(&a).await.is_err() {
                        break;
                    }
                }
            });
            while let Ok(Some(line)) = lines.next_line().await {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let v: Value = serde_json::from_str(&line).unwrap();
                let mut a =
                    serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": v["id"], "result": {}}))
                        .unwrap();
                a.push(b'\n');
                let _ = tx.send(a);
            }
            Ok::<(), ()>(())
        };
        let stop = CancellationToken::new();
        let served = tokio::spawn(framed(
            input,
            output,
            stop.clone(),
            CancellationToken::new(),
            sdk,
        ));
        send_requests(&mut client, 2000, 0).await;
        // Until the SDK is handed no more (not a time limit: a slow machine only waits longer),
        // and at least as many as may wait, so that the bound below is met by holding back.
        let count = || handed.load(std::sync::atomic::Ordering::SeqCst);
        let settle = async {
            let (mut last, mut still) = (count(), 0);
            while still < 5 || last < MAX_OUTSTANDING {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                let now = count();
                still = if now == last { still + 1 } else { 0 };
                last = now;
            }
            last
        };
        let last = tokio::time::timeout(std::time::Duration::from_secs(60), settle)
            .await
            .unwrap_or_else(|_| panic!("held back below {MAX_OUTSTANDING}: {}", count()));
        // What fits in the output's queues and pipes, plus MAX_OUTSTANDING waiting.
        assert!(last <= MAX_OUTSTANDING + QUEUED_LINES + 64, "{last}");
        stop.cancel();
        drop(client);
        tokio::time::timeout(std::time::Duration::from_secs(30), served)
            .await
            .expect("a stopped session ends though its client reads nothing")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_long_line_is_passed_over_and_the_next_read() {
        let mut text = vec![b'x'; MAX_MESSAGE_BYTES + 10];
        text.extend_from_slice(b"\nnext\n");
        let mut input = BufReader::new(&text[..]);
        assert!(matches!(
            next_line(&mut input).await.unwrap(),
            Line::TooLong(start) if start.len() == KEPT_OF_LONG
        ));
        assert!(matches!(next_line(&mut input).await.unwrap(), Line::Text(l) if l == b"next"));
        assert!(matches!(next_line(&mut input).await.unwrap(), Line::End));
    }
}
