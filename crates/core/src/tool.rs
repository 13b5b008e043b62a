//! The `Tool` trait: anything an agent can call.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::context::CallContext;
use crate::error::{ClassifiedError, ErrorClass};

/// The most bytes of JSON a call's arguments may have: the call's `tool.requested` event
/// records them, and the store's events hold at most 16 MiB of payload. Larger arguments are
/// refused as `invalid_arguments` before anything runs (a file's content belongs in a file).
pub const MAX_ARGUMENT_BYTES: usize = 15 * 1024 * 1024;

/// How much harm a tool can do; the safe default policy keys on it.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RiskClass {
    /// Reads data, changes nothing.
    Read,
    /// Changes files or state.
    Write,
    /// Runs programs.
    Exec,
    /// Talks to the network.
    Network,
}

/// Where a tool comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ToolSource {
    /// Rust code in this process.
    Native,
    /// A sandboxed command declared in configuration.
    Command,
    /// A tool of an MCP server, by the server's configured name.
    Mcp {
        /// The server's name in the configuration.
        server: String,
    },
}

/// What a tool is, as the registry, the policy and the model see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ToolDescriptor {
    /// Registry name: `[a-z0-9_.-]+`, namespaced by source for MCP tools (`server.tool`).
    pub name: String,
    /// What it does, for the model.
    pub description: String,
    /// JSON Schema of the arguments.
    pub input_schema: Value,
    /// JSON Schema of the output, when the tool promises one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
    /// How much harm it can do.
    pub risk: RiskClass,
    /// Where it comes from.
    pub source: ToolSource,
}

/// What a tool returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolOutput {
    /// The result, as JSON (text results are a JSON string).
    pub value: Value,
    /// True when the output was cut to the caller's cap.
    #[serde(default)]
    pub truncated: bool,
}

impl ToolOutput {
    /// A complete output.
    pub fn new(value: Value) -> Self {
        ToolOutput {
            value,
            truncated: false,
        }
    }
}

/// A failed tool call. Its message reaches the model and the log: never put secrets in it.
pub type ToolError = ClassifiedError;

impl ClassifiedError {
    /// A tool that ran and failed.
    pub fn tool(message: impl Into<String>) -> Self {
        ClassifiedError::new(ErrorClass::ToolError, message)
    }
}

/// Something an agent can call: a native function, a sandboxed command or an MCP server's tool.
///
/// # Contract
/// - **Arguments** have been validated against `descriptor().input_schema` before `call`; a tool
///   may still refuse them with [`ErrorClass::InvalidArguments`].
/// - **Cancellation and timeouts**: see [`CallContext`]. A tool that starts processes must kill
///   them when the future is dropped.
/// - **Streaming**: progress goes through [`CallContext::report_progress`]; the result comes once.
/// - **Errors** carry an [`ErrorClass`]: `tool_error` for failures worth retrying,
///   `invalid_arguments` for input the model should fix, `sandbox_error`, `timeout`, `cancelled`.
/// - **Idempotency**: a resumed run may call a tool again for a call whose result was not
///   recorded before a crash. Tools with side effects should make repeats harmless (write the same
///   file again, use a request id) or be marked `write`/`exec` so policy can ask first.
///
/// ```
/// use agent_runtime_core::{async_trait, CallContext, RiskClass, Tool, ToolDescriptor, ToolError, ToolOutput, ToolSource};
/// use serde_json::{json, Value};
///
/// struct Echo(ToolDescriptor);
///
/// #[async_trait]
/// impl Tool for Echo {
///     fn descriptor(&self) -> &ToolDescriptor { &self.0 }
///     async fn call(&self, args: Value, _ctx: CallContext) -> Result<ToolOutput, ToolError> {
///         Ok(ToolOutput::new(args))
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait Tool: Send + Sync {
    /// The tool's descriptor; the same value for the tool's whole life.
    fn descriptor(&self) -> &ToolDescriptor;

    /// Runs the tool once.
    async fn call(&self, args: Value, ctx: CallContext) -> Result<ToolOutput, ToolError>;

    /// Checks `args` as a call would before running the tool (against the input schema, for
    /// the gateway's tools), without running, recording or asking anything. A scheduler uses it
    /// to refuse a task graph whose tool step has fixed arguments the tool would refuse, before
    /// the run starts. The default accepts everything: the call still validates.
    fn check_args(&self, args: &Value) -> Result<(), ToolError> {
        let _ = args;
        Ok(())
    }

    /// The tool's own time limit for one call, if it has one (an MCP server's `timeout_ms`):
    /// the shorter of it and the caller's bounds the call, and is what a gateway records as the
    /// call's limit. The default: none.
    fn time_limit(&self) -> Option<std::time::Duration> {
        None
    }
}
