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
    /// A line longer than [`MAX_MESSAGE_BYTES`], passed over.
    TooLong,
    /// End of input.
    End,
}

/// Reads the next line, keeping at most [`MAX_MESSAGE_BYTES`] of it.
async fn next_line<R: AsyncRead + Unpin>(input: &mut BufReader<R>) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = input.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if too_long {
                Line::TooLong
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
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = ended.unwrap_or(buf.len());
        input.consume(used);
        if ended.is_some() {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Text(line)
            });
        }
    }
}

/// The JSON-RPC error answering a message that could not be read.
fn parse_error(id: Value, message: String) -> Vec<u8> {
    let mut line = serde_json::to_vec(&json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {"code": -32700, "message": message},
    }))
    .unwrap_or_default();
    line.push(b'\n');
    line
}

/// The `id` of a top-level JSON object in `text` that does not parse as a whole, when it is a
/// number or a plain string: found by a scan that tracks strings and nesting only, so that a
/// request whose parameters are broken still gets its answer.
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
                        if let Some(Ok(id @ (Value::Number(_) | Value::String(_)))) = de.next() {
                            return id;
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
    let is_request = m.contains_key("method") && m.contains_key("id");
    if !*initialized {
        if m.get("method").and_then(Value::as_str) == Some("initialize") {
            *initialized = true;
        } else if !is_request {
            return Verdict::Drop;
        }
    }
    Verdict::Forward
}

/// Serves a session of the SDK's `service` over `input` and `output` (stdin and stdout) until
/// the client closes its input, stdout fails, or `stop` is cancelled; see the module's notes.
/// `serve` starts the SDK's side on the given pair of pipes and resolves when the session ends.
pub(crate) async fn framed<R, W, F, Fut, E>(
    input: R,
    mut output: W,
    stop: CancellationToken,
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
    let (answers, mut answered) = mpsc::unbounded_channel::<Vec<u8>>();
    let session = stop.child_token();

    // The client's lines, judged, to the SDK; our own answers to the writer.
    let reading = {
        let session = session.clone();
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
                    Ok(Line::TooLong) => {
                        let _ = answers.send(parse_error(
                            Value::Null,
                            format!("the message is over {MAX_MESSAGE_BYTES} bytes"),
                        ));
                        continue;
                    }
                    Ok(Line::End) | Err(_) => break,
                };
                match judge(&line, &mut initialized) {
                    Verdict::Forward => {
                        let fed = async {
                            feed.write_all(&line).await?;
                            feed.write_all(b"\n").await?;
                            feed.flush().await
                        };
                        if fed.await.is_err() {
                            break;
                        }
                    }
                    Verdict::Answer(a) => {
                        let _ = answers.send(a);
                    }
                    Verdict::Drop => {}
                }
            }
            // End of input for the SDK: it cancels what is in flight and ends the session.
            let _ = feed.shutdown().await;
        })
    };

    // The SDK's lines and ours, whole lines each, to stdout.
    let writing = {
        let session = session.clone();
        tokio::spawn(async move {
            let mut from_sdk = BufReader::new(from_sdk);
            let mut sdk_open = true;
            loop {
                let mut line = Vec::new();
                let next = tokio::select! {
                    n = from_sdk.read_until(b'\n', &mut line), if sdk_open => match n {
                        Ok(0) | Err(_) => { sdk_open = false; continue; }
                        Ok(_) => line,
                    },
                    a = answered.recv() => match a {
                        Some(a) => a,
                        None if sdk_open => continue,
                        None => break,
                    },
                    else => break,
                };
                let written = async {
                    output.write_all(&next).await?;
                    output.flush().await
                };
                if written.await.is_err() {
                    // Nobody reads the answers: end the session rather than run calls whose
                    // results nobody will see.
                    session.cancel();
                    break;
                }
            }
        })
    };

    let result = serve(sdk_in, sdk_out).await;
    session.cancel();
    let _ = reading.await;
    // The writer ends once the SDK's side has closed and every answer of ours is out.
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
    fn notifications_before_initialize_are_dropped() {
        let mut init = false;
        let note =
            br#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":5}}"#;
        assert!(matches!(judge(note, &mut init), Verdict::Drop));
        let response = br#"{"jsonrpc":"2.0","id":1,"result":{}}"#;
        assert!(matches!(judge(response, &mut init), Verdict::Drop));
        let ping = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
        assert!(matches!(judge(ping, &mut init), Verdict::Forward));
        let initialize = br#"{"jsonrpc":"2.0","id":2,"method":"initialize","params":{}}"#;
        assert!(matches!(judge(initialize, &mut init), Verdict::Forward));
        assert!(init);
        assert!(matches!(judge(note, &mut init), Verdict::Forward));
    }

    #[tokio::test]
    async fn a_long_line_is_passed_over_and_the_next_read() {
        let mut text = vec![b'x'; MAX_MESSAGE_BYTES + 10];
        text.extend_from_slice(b"\nnext\n");
        let mut input = BufReader::new(&text[..]);
        assert!(matches!(
            next_line(&mut input).await.unwrap(),
            Line::TooLong
        ));
        assert!(matches!(next_line(&mut input).await.unwrap(), Line::Text(l) if l == b"next"));
        assert!(matches!(next_line(&mut input).await.unwrap(), Line::End));
    }
}
