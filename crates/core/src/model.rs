//! The `ModelProvider` trait: anything that answers a chat request.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::context::CallContext;
use crate::error::{ClassifiedError, ErrorClass};

/// Who wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Instructions.
    System,
    /// The person or the task's input.
    User,
    /// The model.
    Assistant,
    /// A tool's result.
    Tool,
}

impl Role {
    /// The string form serde gives it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// A tool call the model asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The provider's id for the call, echoed in the tool message that answers it.
    pub id: String,
    /// Registry name of the tool.
    pub name: String,
    /// Arguments as JSON.
    pub arguments: Value,
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// Its text.
    pub content: String,
    /// Tool calls the assistant asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a tool message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A message of `role` with `content` and nothing else.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A tool as offered to the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// Registry name.
    pub name: String,
    /// What it does.
    pub description: String,
    /// JSON Schema of its arguments.
    pub input_schema: Value,
}

/// A chat request.
///
/// The conversation and the tool list are shared, not owned: an agent sends its whole
/// conversation again at every turn and the same tools every time, and with thousands of agents
/// alive, copying them per call (and freeing the copies) was most of the scheduler's overhead.
/// Providers read them through the `Arc`; the caller appends to its conversation with
/// `Arc::make_mut`, which copies only when a provider still holds the previous turn.
///
/// ```
/// use std::sync::Arc;
/// use agent_runtime_core::{Message, ModelRequest, Role};
/// let request = ModelRequest {
///     model: "gpt-4o".into(),
///     messages: Arc::new(vec![Message::new(Role::User, "hello")]),
///     tools: Arc::from(Vec::new()),
///     max_tokens: None,
///     temperature: None,
/// };
/// assert_eq!(request.messages.len(), 1);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRequest {
    /// The provider's model name.
    pub model: String,
    /// The conversation so far.
    pub messages: Arc<Vec<Message>>,
    /// Tools the model may call.
    #[serde(default = "no_tools")]
    pub tools: Arc<[ToolSpec]>,
    /// Cap on output tokens.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
}

fn no_tools() -> Arc<[ToolSpec]> {
    Arc::from(Vec::new())
}

/// Why the model stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// It gave its answer.
    Stop,
    /// It wants tool results.
    ToolCalls,
    /// It hit `max_tokens`.
    Length,
    /// The provider filtered the output.
    ContentFilter,
}

impl FinishReason {
    /// The string form serde gives it.
    pub const fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
        }
    }
}

/// Tokens used by a call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
}

/// A complete answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelResponse {
    /// The assistant's message (text and tool calls).
    pub message: Message,
    /// Why it stopped.
    pub finish: FinishReason,
    /// Tokens used.
    pub usage: Usage,
}

impl ModelResponse {
    /// Writes the response's members as canonical JSON, the form a log records (the same bytes
    /// as `canonical_json(&serde_json::to_value(self))`), without building a `Value`: the
    /// scheduler records one response per model call.
    ///
    /// ```
    /// use agent_runtime_core::{Actor, EncodedEvent, EventKind, FinishReason, Message, ModelResponse,
    ///                          Role, RunId, Timestamp, Usage, canonical_json};
    ///
    /// let response = ModelResponse { message: Message::new(Role::Assistant, "hi"),
    ///                                finish: FinishReason::Stop, usage: Usage::default() };
    /// let event = EncodedEvent::with_object(RunId::from_bytes([1; 16]), None, Actor::System,
    ///     EventKind::Note, Timestamp::EPOCH, |o| response.write_canonical(o));
    /// assert_eq!(event.payload_json(), canonical_json(&serde_json::to_value(&response).unwrap()));
    /// ```
    pub fn write_canonical(&self, o: &mut crate::ObjectWriter<'_>) {
        let message = &self.message;
        o.str("finish", self.finish.as_str())
            .object("message", |o| {
                o.str("content", &message.content)
                    .str("role", message.role.as_str());
                if let Some(id) = &message.tool_call_id {
                    o.str("tool_call_id", id);
                }
                if !message.tool_calls.is_empty() {
                    o.objects("tool_calls", &message.tool_calls, |o, call| {
                        o.value("arguments", &call.arguments)
                            .str("id", &call.id)
                            .str("name", &call.name);
                    });
                }
            })
            .object("usage", |o| {
                o.u64("input_tokens", self.usage.input_tokens)
                    .u64("output_tokens", self.usage.output_tokens);
            });
    }
}

/// A piece of a streamed answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ModelDelta {
    /// More text.
    Text {
        /// The new text.
        text: String,
    },
    /// The whole answer, always last.
    Done {
        /// The assembled response.
        response: ModelResponse,
    },
}

/// The receiving end of a streamed answer. It ends with a [`ModelDelta::Done`] or an error.
pub type ModelStream = mpsc::Receiver<Result<ModelDelta, ModelError>>;

/// A failed model call, with the provider's retry hint when it gave one.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{error}")]
pub struct ModelError {
    /// Class and message. Never contains the API key or request headers.
    pub error: ClassifiedError,
    /// How long the provider asked us to wait before retrying.
    pub retry_after: Option<Duration>,
}

impl ModelError {
    /// An error of `class` with `message` and no retry hint.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        ModelError {
            error: ClassifiedError::new(class, message),
            retry_after: None,
        }
    }
}

/// Something that answers chat requests: a remote API or a local model.
///
/// # Contract
/// - **Cancellation and timeouts**: see [`CallContext`]; dropping the future or the stream must
///   abort the underlying request.
/// - **Streaming**: [`ModelProvider::stream`] sends text deltas as they come and one final
///   [`ModelDelta::Done`]; the default implementation calls [`ModelProvider::complete`] and sends
///   only `Done`.
/// - **Errors**: class `model_rate_limit` (with `retry_after` when the provider said),
///   `model_error`, `model_unavailable`, `timeout`, `cancelled`.
/// - **Secrets**: API keys stay inside the provider; they never appear in errors, events or
///   `Debug` output.
#[async_trait::async_trait]
pub trait ModelProvider: Send + Sync {
    /// The provider's id in the registry (`openai`, `local`, ...).
    fn id(&self) -> &str;

    /// Answers `request` in one piece.
    async fn complete(
        &self,
        request: ModelRequest,
        ctx: CallContext,
    ) -> Result<ModelResponse, ModelError>;

    /// Answers `request` as a stream.
    async fn stream(
        &self,
        request: ModelRequest,
        ctx: CallContext,
    ) -> Result<ModelStream, ModelError> {
        let response = self.complete(request, ctx).await?;
        let (tx, rx) = mpsc::channel(1);
        // The receiver is alive (we hold it) and the channel has room for one item.
        let _ = tx.try_send(Ok(ModelDelta::Done { response }));
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(response: &ModelResponse) -> Vec<u8> {
        crate::EncodedEvent::with_object(
            crate::RunId::from_bytes([1; 16]),
            None,
            crate::Actor::System,
            crate::EventKind::Note,
            crate::Timestamp::EPOCH,
            |o| response.write_canonical(o),
        )
        .payload_json()
        .to_vec()
    }

    /// The hand-written canonical form is serde's form, canonicalized: every optional part,
    /// every role and finish reason, strings that need escapes.
    #[test]
    fn write_canonical_is_the_canonical_serde_form() {
        let mut asked = Message::new(Role::Assistant, "tab\t \"q\" é \u{1}");
        asked.tool_calls = vec![
            ToolCall {
                id: "c1".into(),
                name: "fetch".into(),
                arguments: serde_json::json!({"url": "https://x", "a": [1, 2.5, null], "n": {"z": 1, "b": 2}}),
            },
            ToolCall {
                id: "c\"2".into(),
                name: "t".into(),
                arguments: Value::Null,
            },
        ];
        let mut answer = Message::new(Role::Tool, "ok");
        answer.tool_call_id = Some("c1".into());
        let messages = [
            asked,
            answer,
            Message::new(Role::User, ""),
            Message::new(Role::System, "s"),
        ];
        let finishes = [
            FinishReason::Stop,
            FinishReason::ToolCalls,
            FinishReason::Length,
            FinishReason::ContentFilter,
        ];
        for (i, message) in messages.into_iter().enumerate() {
            for finish in finishes {
                let response = ModelResponse {
                    message: message.clone(),
                    finish,
                    usage: Usage {
                        input_tokens: i as u64,
                        output_tokens: u64::MAX,
                    },
                };
                let value = serde_json::to_value(&response).unwrap();
                assert_eq!(
                    String::from_utf8(written(&response)).unwrap(),
                    String::from_utf8(crate::canonical_json(&value)).unwrap()
                );
            }
        }
    }
}
