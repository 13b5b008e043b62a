//! # agent-runtime-gateway
//!
//! Every tool call an agent makes goes through one gateway: checked against the tool's schema,
//! decided by policy, approved by a person when the policy says so, run natively, in an OS
//! sandbox or on an MCP server, and recorded in the event log.
//!
//! - **Registry** ([`Registry`]): native tools (core's [`Tool`](agent_runtime_core::Tool)),
//!   sandboxed command tools declared in configuration ([`sandbox`]), and MCP servers' tools
//!   ([`mcp`]), each with a [`ToolDescriptor`](agent_runtime_core::ToolDescriptor) and an argument
//!   validator compiled once.
//! - **Pipeline** ([`Gateway::call`]): validate, pre-call hooks, policy, approval (core's
//!   [`ApprovalSink`](agent_runtime_core::ApprovalSink)), execute with timeout and cancellation,
//!   post-call hooks, cap the output, record `tool.requested`, `policy.decided` (a
//!   [`PolicyEnvelope`](agent_runtime_core::PolicyEnvelope)), `tool.started` and `tool.completed`
//!   or `tool.failed`, secrets redacted ([`redact`]).
//! - **Policy** ([`policy`]): ordered YAML rules over tool-name globs, callers and argument
//!   predicates (paths inside or outside roots after resolving symlinks, programs and their
//!   arguments, URL hosts), with safe defaults; **hooks** ([`hooks`]) in Rust or as external
//!   commands speaking JSON.
//! - **MCP** ([`mcp`]): a client of stdio and streamable HTTP MCP servers through the official
//!   Rust SDK (`rmcp`), tools namespaced by server, restarted with backoff; and a server
//!   ([`mcp::server`]) exposing the registry, policy applied, over stdio or streamable HTTP.
//! - **Sandbox** ([`sandbox`]): command tools run under bubblewrap with resource limits and a
//!   pids cgroup; see `docs/sandbox.md`.
//!
//! ```
//! use std::sync::Arc;
//! use agent_runtime_core::{Actor, CallContext, MemoryLog};
//! use agent_runtime_gateway::{builtin, GatewayBuilder, Registry};
//! use serde_json::json;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let registry = Arc::new(Registry::new());
//! for tool in builtin::builtins() {
//!     registry.register(tool).unwrap();
//! }
//! let log = Arc::new(MemoryLog::default());
//! let gateway = GatewayBuilder::new(registry, log.clone()).build().unwrap();
//! let ctx = CallContext::new(Actor::Agent("writer".into()));
//! let out = gateway.call("builtin.echo", json!({"text": "hi"}), ctx.clone()).await.unwrap();
//! assert_eq!(out.value, json!("hi"));
//! // Bad arguments never reach the tool, and the error says what to fix.
//! let err = gateway.call("builtin.echo", json!({"txt": "hi"}), ctx).await.unwrap_err();
//! assert_eq!(err.class.as_str(), "invalid_arguments");
//! // requested, decided, started, completed; then requested, failed.
//! assert_eq!(log.all().len(), 6);
//! # });
//! ```
//!
//! What it does not do: choose which tool to call (the agent loop does), store events (it hands
//! them to an [`EventSink`](agent_runtime_core::EventSink)), or sandbox on systems other than
//! Linux.

#![warn(missing_docs)]

pub mod bench;
pub mod builtin;
mod child;
pub mod config;
pub mod error;
pub mod gateway;
pub mod glob;
pub mod hooks;
pub mod mcp;
pub mod paths;
pub mod policy;
pub mod redact;
pub mod registry;
pub mod sandbox;
mod seccomp;
pub mod trust;

pub use error::GatewayError;
pub use gateway::{
    CheckReport, EndsInFlight, Gateway, GatewayBuilder, GatewayConfig, GatewayTool,
    MAX_ERROR_BYTES, cap_output, nobody_answered,
};
pub use hooks::{CommandHook, CommandHookConfig, Hook, HookCall, PostAction, PreAction};
pub use policy::{Decision, Policy, PolicyInput, RelativePaths, SandboxMode};
pub use redact::Redactor;
pub use registry::{RegisteredTool, Registry};
pub use sandbox::{CommandTool, CommandToolConfig, Limits, SandboxSettings};

/// The largest configuration, policy or MCP servers file read: far more than any written by
/// hand, and a bound on what `--config /dev/zero` can make the process hold.
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// A configuration file's text: at most [`MAX_CONFIG_BYTES`], UTF-8 (a file that is not is
/// named with the line and column of its first bad byte).
pub(crate) fn read_config_text(path: &std::path::Path) -> Result<String, GatewayError> {
    use std::io::Read;
    let io = |source| GatewayError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let bad = |message: String| GatewayError::Parse {
        what: path.display().to_string(),
        message,
    };
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(bad(format!(
            "over {} MiB, the most a configuration file may have",
            MAX_CONFIG_BYTES >> 20
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let before = String::from_utf8_lossy(&e.as_bytes()[..at]);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        bad(format!(
            "not UTF-8 text (byte 0x{:02x} at line {line} column {column}); save the file as UTF-8",
            e.as_bytes()[at]
        ))
    })
}

/// `serde_yaml_ng::from_str`, after refusing text nested too deep for the YAML parser to take
/// in reasonable time (see [`agent_runtime_core::yaml`]), and refusing a key written twice (a
/// rule's argument, an environment variable would be dropped silently; see
/// [`agent_runtime_core::document`]); errors as text, for the caller to place.
pub(crate) fn yaml_from_str<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    yaml_from_str_checking(text, &[])
}

/// [`yaml_from_str`], checking for keys written twice only under the top-level `keys` when
/// there are some (see [`agent_runtime_core::document::JsonFaithfulUnder`]).
pub(crate) fn yaml_from_str_checking<T: serde::de::DeserializeOwned>(
    text: &str,
    keys: &[&str],
) -> Result<T, String> {
    use agent_runtime_core::document::{JsonFaithful, JsonFaithfulUnder};
    use agent_runtime_core::yaml::{MAX_YAML_FLOW_DEPTH, flow_nesting_past, too_deep_message};
    use serde::de::DeserializeSeed;
    if let Some((line, column)) = flow_nesting_past(text, MAX_YAML_FLOW_DEPTH) {
        return Err(too_deep_message(line, column));
    }
    // The faithfulness check first: it names the line of a key written twice, where serde's
    // own "duplicate field" of a struct's field has no position.
    if keys.is_empty() {
        serde_yaml_ng::from_str::<JsonFaithful>(text).map(|_| ())
    } else {
        JsonFaithfulUnder(keys).deserialize(serde_yaml_ng::Deserializer::from_str(text))
    }
    .map_err(|e| {
        let message = e.to_string();
        // The parser places a key written twice in the top-level mapping nowhere, and others
        // where their mapping starts: the second key is the mistake.
        let Some(key) = agent_runtime_core::yaml::duplicated_key(&message) else {
            return message;
        };
        let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
        // A block mapping's keys stand at its column: not a nested key of the same name, nor
        // one in a comment. A flow mapping's (`{a: 1, a: 2}`) do not, and are searched for
        // anywhere after its start.
        let second = agent_runtime_core::yaml::key_positions(text, key, line, column)
            .filter(|&(_, c)| c == column)
            .nth(1)
            .or_else(|| agent_runtime_core::yaml::second_key_at(text, key, line, column));
        match second {
            Some((line, column)) => format!(
                "{} at line {line} column {column}",
                message.split(" at line ").next().unwrap_or(&message)
            ),
            None => message,
        }
    })?;
    serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
}

/// `serde_json::from_str`, checking for keys written twice as [`yaml_from_str_checking`] does.
pub(crate) fn json_from_str_checking<T: serde::de::DeserializeOwned>(
    text: &str,
    keys: &[&str],
) -> Result<T, String> {
    use agent_runtime_core::document::{JsonFaithful, JsonFaithfulUnder};
    use serde::de::DeserializeSeed;
    if keys.is_empty() {
        serde_json::from_str::<JsonFaithful>(text).map(|_| ())
    } else {
        JsonFaithfulUnder(keys).deserialize(&mut serde_json::Deserializer::from_str(text))
    }
    .map_err(|e| e.to_string())?;
    serde_json::from_str(text).map_err(|e| e.to_string())
}
