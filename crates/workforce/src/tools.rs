//! A small tool registry and native tools, so graphs of direct tool steps run end to end before
//! the gateway lands. The gateway replaces [`ToolRegistry`] behind the
//! [`ToolInvoker`] seam.
//!
//! Native tools: `echo` (returns its arguments), `concat` (joins `parts` with `sep`), `sleep`
//! (waits `ms` milliseconds, cancellable), `read_file` (`path` to `{text, bytes}`), `write_file`
//! (`path`, `text`; idempotent: writing the same text again changes nothing) and `fail` (always
//! fails with `class` and `message`, for trying failure policies).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::{
    CallContext, ClassifiedError, ErrorClass, RiskClass, Tool, ToolDescriptor, ToolError,
    ToolOutput, ToolSource, ToolSpec, async_trait,
};
use serde_json::{Value, json};

use crate::driver::ToolInvoker;

/// Tools by name.
#[derive(Clone, Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Arc<dyn Tool>>,
}

impl ToolRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry with every native tool of this module.
    pub fn with_native_tools() -> Self {
        Self::from_tools(native_tools())
    }

    /// A registry of `tools` (a later tool of the same name replaces an earlier one); for
    /// example the gateway's tool handles, so that every call goes through its policy,
    /// sandbox and audit.
    pub fn from_tools(tools: impl IntoIterator<Item = Arc<dyn Tool>>) -> Self {
        let mut r = Self::new();
        for t in tools {
            r.register(t);
        }
        r
    }

    /// Adds or replaces a tool under its descriptor's name.
    pub fn register(&mut self, tool: Arc<dyn Tool>) {
        self.tools.insert(tool.descriptor().name.clone(), tool);
    }
}

#[async_trait]
impl ToolInvoker for ToolRegistry {
    fn names(&self) -> Vec<String> {
        self.tools.keys().cloned().collect()
    }

    fn spec(&self, name: &str) -> Option<ToolSpec> {
        self.tools.get(name).map(|t| {
            let d = t.descriptor();
            ToolSpec {
                name: d.name.clone(),
                description: d.description.clone(),
                input_schema: d.input_schema.clone(),
            }
        })
    }

    async fn invoke(
        &self,
        name: &str,
        args: Value,
        ctx: CallContext,
    ) -> Result<ToolOutput, ToolError> {
        self.get(name)?.call(args, ctx).await
    }

    fn check_args(&self, name: &str, args: &Value) -> Result<(), ToolError> {
        self.get(name)?.check_args(args)
    }
}

impl ToolRegistry {
    /// Tool `name`, or the `invalid_arguments` error a call of an unknown tool gets.
    fn get(&self, name: &str) -> Result<&Arc<dyn Tool>, ToolError> {
        self.tools.get(name).ok_or_else(|| {
            ClassifiedError::new(
                ErrorClass::InvalidArguments,
                format!("unknown tool `{name}`"),
            )
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Which {
    Echo,
    Concat,
    Sleep,
    ReadFile,
    WriteFile,
    Fail,
}

/// Every native tool of this module, for a registry of one's own or the gateway's.
pub fn native_tools() -> Vec<Arc<dyn Tool>> {
    vec![
        Arc::new(Native::echo()),
        Arc::new(Native::concat()),
        Arc::new(Native::sleep()),
        Arc::new(Native::read_file()),
        Arc::new(Native::write_file()),
        Arc::new(Native::fail()),
    ]
}

/// One of the native tools.
#[derive(Debug)]
pub struct Native {
    which: Which,
    descriptor: ToolDescriptor,
}

impl Native {
    fn new(
        which: Which,
        name: &str,
        description: &str,
        risk: RiskClass,
        input_schema: Value,
    ) -> Self {
        Native {
            which,
            descriptor: ToolDescriptor {
                name: name.into(),
                description: description.into(),
                input_schema,
                output_schema: None,
                risk,
                source: ToolSource::Native,
            },
        }
    }
    /// `echo`: returns its arguments.
    pub fn echo() -> Self {
        Self::new(
            Which::Echo,
            "echo",
            "Returns its arguments unchanged.",
            RiskClass::Read,
            json!({"type": "object"}),
        )
    }
    /// `concat`: joins `parts` (strings or JSON) with `sep` into `{text}`.
    pub fn concat() -> Self {
        Self::new(
            Which::Concat,
            "concat",
            "Joins `parts` with `sep` (default empty) into {text}.",
            RiskClass::Read,
            json!({"type": "object", "properties": {"parts": {"type": "array"}, "sep": {"type": "string"}}, "required": ["parts"]}),
        )
    }
    /// `sleep`: waits `ms` milliseconds.
    pub fn sleep() -> Self {
        Self::new(
            Which::Sleep,
            "sleep",
            "Waits `ms` milliseconds, then returns {slept_ms}.",
            RiskClass::Read,
            json!({"type": "object", "properties": {"ms": {"type": "integer", "minimum": 0}}, "required": ["ms"]}),
        )
    }
    /// `read_file`: reads a UTF-8 file.
    pub fn read_file() -> Self {
        Self::new(
            Which::ReadFile,
            "read_file",
            "Reads the UTF-8 file at `path` into {text, bytes}.",
            RiskClass::Read,
            json!({"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}),
        )
    }
    /// `write_file`: writes `text` to `path` (idempotent).
    pub fn write_file() -> Self {
        Self::new(
            Which::WriteFile,
            "write_file",
            "Writes `text` to the file at `path` (replacing it) and returns {path, bytes}.",
            RiskClass::Write,
            json!({"type": "object", "properties": {"path": {"type": "string"}, "text": {"type": "string"}}, "required": ["path", "text"]}),
        )
    }
    /// `fail`: always fails.
    pub fn fail() -> Self {
        Self::new(
            Which::Fail,
            "fail",
            "Always fails with error class `class` (default tool_error) and `message`.",
            RiskClass::Read,
            json!({"type": "object", "properties": {"class": {"type": "string"}, "message": {"type": "string"}}}),
        )
    }
}

fn arg_str<'a>(args: &'a Value, key: &str) -> Result<&'a str, ToolError> {
    args.get(key).and_then(Value::as_str).ok_or_else(|| {
        ClassifiedError::new(
            ErrorClass::InvalidArguments,
            format!("argument `{key}` must be a string"),
        )
    })
}

#[async_trait]
impl Tool for Native {
    fn descriptor(&self) -> &ToolDescriptor {
        &self.descriptor
    }

    async fn call(&self, args: Value, ctx: CallContext) -> Result<ToolOutput, ToolError> {
        match self.which {
            Which::Echo => Ok(ToolOutput::new(args)),
            Which::Concat => {
                let parts = args.get("parts").and_then(Value::as_array).ok_or_else(|| {
                    ClassifiedError::new(
                        ErrorClass::InvalidArguments,
                        "argument `parts` must be an array",
                    )
                })?;
                let sep = args.get("sep").and_then(Value::as_str).unwrap_or("");
                let text: Vec<String> = parts
                    .iter()
                    .map(|p| match p {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect();
                Ok(ToolOutput::new(json!({"text": text.join(sep)})))
            }
            Which::Sleep => {
                let ms = args.get("ms").and_then(Value::as_u64).ok_or_else(|| {
                    ClassifiedError::new(
                        ErrorClass::InvalidArguments,
                        "argument `ms` must be a whole number",
                    )
                })?;
                // Not held through the wait: ten thousand sleeping calls kept ten thousand
                // argument maps alive (about 600 bytes each).
                drop(args);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(ToolOutput::new(json!({"slept_ms": ms}))),
                    _ = ctx.cancel.cancelled() => Err(ClassifiedError::new(ErrorClass::Cancelled, "sleep cancelled")),
                }
            }
            Which::ReadFile => {
                let path = arg_str(&args, "path")?;
                let text = tokio_fs_read(path).await?;
                let bytes = text.len();
                Ok(ToolOutput::new(json!({"text": text, "bytes": bytes})))
            }
            Which::WriteFile => {
                let path = arg_str(&args, "path")?.to_string();
                let text = arg_str(&args, "text")?.to_string();
                let bytes = text.len();
                let p = path.clone();
                std::fs::write(&p, text)
                    .map_err(|e| ClassifiedError::tool(format!("cannot write {path}: {e}")))?;
                Ok(ToolOutput::new(json!({"path": path, "bytes": bytes})))
            }
            Which::Fail => {
                let class = args
                    .get("class")
                    .and_then(Value::as_str)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(ErrorClass::ToolError);
                let message = args
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("failed as asked");
                Err(ClassifiedError::new(class, message))
            }
        }
    }
}

async fn tokio_fs_read(path: &str) -> Result<String, ToolError> {
    // Small files only; a blocking read keeps the feature set of tokio small.
    std::fs::read_to_string(path)
        .map_err(|e| ClassifiedError::tool(format!("cannot read {path}: {e}")))
}
