//! The tool registry: every tool the gateway can call, with its argument validator compiled once.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use agent_runtime_core::{
    ClassifiedError, ErrorClass, Tool, ToolDescriptor, ToolError, ToolSource,
};
use serde_json::Value;

use crate::error::GatewayError;
use crate::sandbox::CommandTool;

/// How many schema errors an `invalid_arguments` message lists.
const MAX_REPORTED_ERRORS: usize = 8;

/// A tool in the registry.
pub struct RegisteredTool {
    tool: Arc<dyn Tool>,
    command: Option<Arc<CommandTool>>,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for RegisteredTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredTool")
            .field("name", &self.descriptor().name)
            .finish()
    }
}

impl RegisteredTool {
    /// The tool's descriptor.
    pub fn descriptor(&self) -> &ToolDescriptor {
        self.tool.descriptor()
    }

    /// The tool itself.
    pub fn tool(&self) -> &Arc<dyn Tool> {
        &self.tool
    }

    /// The command tool behind this entry, when it is one (the pipeline hands it the sandbox
    /// mode the policy granted).
    pub fn command(&self) -> Option<&Arc<CommandTool>> {
        self.command.as_ref()
    }

    /// The tool's own time limit, if it declares one (a command's `wall_ms`, an MCP server's
    /// `timeout_ms`, any tool's [`Tool::time_limit`]).
    pub fn timeout(&self) -> Option<Duration> {
        self.tool.time_limit()
    }

    /// Checks `args` against the input schema; the error lists what is wrong and where, in
    /// words a model can act on.
    pub fn validate(&self, args: &Value) -> Result<(), ToolError> {
        if self.validator.is_valid(args) {
            return Ok(());
        }
        let errors: Vec<(String, String)> = self
            .validator
            .iter_errors(args)
            .take(MAX_REPORTED_ERRORS)
            .map(|e| {
                let at = e.instance_path().to_string();
                let mut what = e.to_string();
                // The message quotes the bad value; under a secret-looking key (as `api_key`),
                // that value is what `tool.requested` hides, so the error hides it too.
                if at.split('/').any(crate::redact::is_secret_key) {
                    what = what.replace(&e.instance().to_string(), crate::redact::REDACTED);
                }
                let at = if at.is_empty() {
                    "(root)".to_string()
                } else {
                    at
                };
                (at, truncate_chars(&what, 200))
            })
            .collect();
        let words: Vec<String> = errors
            .iter()
            .map(|(at, what)| format!("at {at}: {what}"))
            .collect();
        // The same list as data, for a model or a program to act on field by field.
        let details = serde_json::json!({
            "tool": self.descriptor().name,
            "errors": errors.iter().map(|(at, what)| serde_json::json!({"at": at, "error": what})).collect::<Vec<_>>(),
        });
        Err(ClassifiedError::new(
            ErrorClass::InvalidArguments,
            format!(
                "arguments do not match the input schema of {}: {}",
                self.descriptor().name,
                words.join("; ")
            ),
        )
        .with_details(details))
    }
}

fn truncate_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

/// Checks a registry name: `[a-z0-9_.-]+`, at most 128 bytes.
pub fn check_name(name: &str) -> Result<(), GatewayError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(GatewayError::InvalidTool {
            name: name.to_string(),
            message: "names are 1-128 characters of a-z, 0-9, '_', '.', '-'".into(),
        })
    }
}

/// Every tool the gateway knows: native, command and MCP tools under one namespace.
///
/// Readers take a cheap snapshot of one entry ([`Registry::get`]); MCP servers replace their
/// tools when they announce a change ([`Registry::replace_source`]).
#[derive(Default)]
pub struct Registry {
    tools: RwLock<BTreeMap<String, Arc<RegisteredTool>>>,
    /// Sources (MCP servers) that could not be reached, with why: a call of one of their tools
    /// says so, rather than that the tool is unknown.
    unreachable: RwLock<BTreeMap<String, String>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("tools", &self.names())
            .finish()
    }
}

fn compile(descriptor: &ToolDescriptor) -> Result<jsonschema::Validator, GatewayError> {
    // Arguments are always an object, and MCP clients refuse a tool list in which one tool's
    // `inputSchema` has another `type` (the TypeScript SDK refuses the whole list): a schema
    // for anything else could never be met, and is refused here, naming the tool.
    if let Some(kind) = descriptor.input_schema.get("type")
        && kind != "object"
    {
        return Err(GatewayError::InvalidTool {
            name: descriptor.name.clone(),
            message: format!(
                "input schema has type {kind}; a tool's arguments are an object (type: object)"
            ),
        });
    }
    jsonschema::validator_for(&descriptor.input_schema).map_err(|e| GatewayError::InvalidTool {
        name: descriptor.name.clone(),
        message: format!("input schema does not compile: {e}"),
    })
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Records that `source` (an MCP server, whose tools are named `source.TOOL`) cannot be
    /// reached and why, or, with `None`, that it can again.
    pub fn set_unreachable(&self, source: &str, why: Option<String>) {
        let mut map = self.unreachable.write().unwrap_or_else(|p| p.into_inner());
        match why {
            Some(why) => {
                map.insert(source.to_string(), why);
            }
            None => {
                map.remove(source);
            }
        }
    }

    /// Why the source (an MCP server's name) cannot be reached, or `None` when it can (or is
    /// not known).
    pub fn source_unreachable(&self, source: &str) -> Option<String> {
        self.unreachable
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(source)
            .cloned()
    }

    /// The unreachable source a tool name belongs to (`source.TOOL`), and why it is. Server
    /// names may hold dots (`my.srv`): the longest unreachable name the tool's name starts
    /// with, and only when no registered tool's source is longer still (a typo of a tool of a
    /// reachable `my.fs` is no tool of an unreachable `my`).
    pub fn unreachable_source(&self, tool: &str) -> Option<(String, String)> {
        let owns = |source: &str| {
            tool.strip_prefix(source)
                .is_some_and(|rest| rest.len() > 1 && rest.starts_with('.'))
        };
        let found = {
            let map = self.unreachable.read().unwrap_or_else(|p| p.into_inner());
            map.iter()
                .filter(|(source, _)| owns(source))
                .max_by_key(|(source, _)| source.len())
                .map(|(source, why)| (source.clone(), why.clone()))
        }?;
        let tools = self.tools.read().unwrap_or_else(|p| p.into_inner());
        let longer_reachable = tools.keys().any(|name| {
            name.rsplit_once('.')
                .is_some_and(|(source, _)| source.len() > found.0.len() && owns(source))
        });
        (!longer_reachable).then_some(found)
    }

    /// [`Registry::unreachable_source`], the reason without the `MCP server "NAME": ` it
    /// usually starts with (for a sentence that names the server itself).
    pub fn unreachable_reason(&self, tool: &str) -> Option<(String, String)> {
        self.unreachable_source(tool).map(|(server, why)| {
            let why = why
                .strip_prefix(&format!("MCP server {server:?}: "))
                .unwrap_or(&why)
                .to_string();
            (server, why)
        })
    }

    fn entry(
        tool: Arc<dyn Tool>,
        command: Option<Arc<CommandTool>>,
    ) -> Result<RegisteredTool, GatewayError> {
        let d = tool.descriptor();
        check_name(&d.name)?;
        let validator = compile(d)?;
        Ok(RegisteredTool {
            tool,
            command,
            validator,
        })
    }

    fn insert(&self, entry: RegisteredTool) -> Result<(), GatewayError> {
        let name = entry.descriptor().name.clone();
        let mut map = self.tools.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&name) {
            return Err(GatewayError::Duplicate(name));
        }
        map.insert(name, Arc::new(entry));
        Ok(())
    }

    /// Adds a native (or any other) tool.
    pub fn register(&self, tool: Arc<dyn Tool>) -> Result<(), GatewayError> {
        self.insert(Self::entry(tool, None)?)
    }

    /// Adds a sandboxed command tool.
    pub fn register_command(&self, tool: CommandTool) -> Result<(), GatewayError> {
        let tool = Arc::new(tool);
        let as_tool: Arc<dyn Tool> = tool.clone();
        self.insert(Self::entry(as_tool, Some(tool))?)
    }

    /// Replaces every tool of MCP server `server` with `tools` (after a `tools/list_changed`).
    /// Tools that fail to compile are skipped and returned as errors; the rest are registered.
    pub fn replace_source(&self, server: &str, tools: Vec<Arc<dyn Tool>>) -> Vec<GatewayError> {
        let mut errors = Vec::new();
        let mut entries = Vec::new();
        for t in tools {
            match Self::entry(t, None) {
                Ok(e) => entries.push(e),
                Err(e) => errors.push(e),
            }
        }
        let mut map = self.tools.write().unwrap_or_else(|p| p.into_inner());
        map.retain(
            |_, e| !matches!(&e.descriptor().source, ToolSource::Mcp { server: s } if s == server),
        );
        for e in entries {
            let name = e.descriptor().name.clone();
            match map.entry(name) {
                std::collections::btree_map::Entry::Occupied(o) => {
                    errors.push(GatewayError::Duplicate(o.key().clone()));
                }
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(Arc::new(e));
                }
            }
        }
        errors
    }

    /// The tool called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<RegisteredTool>> {
        self.tools
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Every tool name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tools
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Every descriptor, sorted by name.
    pub fn descriptors(&self) -> Vec<ToolDescriptor> {
        self.tools
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|e| e.descriptor().clone())
            .collect()
    }

    /// How many tools are registered.
    pub fn len(&self) -> usize {
        self.tools.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no tool is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod unreachable_tests {
    use super::*;

    #[test]
    fn the_longest_unreachable_source_owns_a_tool_name() {
        let r = Registry::new();
        r.set_unreachable("my.srv", Some("down".into()));
        assert_eq!(
            r.unreachable_source("my.srv.x"),
            Some(("my.srv".into(), "down".into()))
        );
        assert_eq!(r.unreachable_source("my.srvx.y"), None);
        assert_eq!(r.unreachable_source("my.srv."), None);
        r.set_unreachable("my", Some("gone".into()));
        assert_eq!(
            r.unreachable_source("my.other"),
            Some(("my".into(), "gone".into()))
        );
        r.set_unreachable("my.srv", None);
        assert_eq!(
            r.unreachable_source("my.srv.x"),
            Some(("my".into(), "gone".into()))
        );
    }
}
