//! Native tools that every gateway has (unless `builtins: false`): useful for checking a setup
//! and for measuring the pipeline.

use std::sync::Arc;

use agent_runtime_core::{
    CallContext, RiskClass, Tool, ToolDescriptor, ToolError, ToolOutput, ToolSource,
};
use serde_json::{Value, json};

/// `builtin.echo`: returns its `text` argument.
#[derive(Debug)]
pub struct Echo(ToolDescriptor);

/// `builtin.noop`: does nothing and returns null (the pipeline benchmark's tool).
#[derive(Debug)]
pub struct Noop(ToolDescriptor);

impl Default for Echo {
    fn default() -> Self {
        Echo(ToolDescriptor {
            name: "builtin.echo".into(),
            description: "Returns the text it is given.".into(),
            input_schema: json!({"type": "object", "properties": {"text": {"type": "string"}},
                                 "required": ["text"], "additionalProperties": false}),
            output_schema: Some(json!({"type": "string"})),
            risk: RiskClass::Read,
            source: ToolSource::Native,
        })
    }
}

impl Default for Noop {
    fn default() -> Self {
        Noop(ToolDescriptor {
            name: "builtin.noop".into(),
            description: "Does nothing.".into(),
            input_schema: json!({"type": "object"}),
            output_schema: None,
            risk: RiskClass::Read,
            source: ToolSource::Native,
        })
    }
}

#[async_trait::async_trait]
impl Tool for Echo {
    fn descriptor(&self) -> &ToolDescriptor {
        &self.0
    }
    async fn call(&self, args: Value, _ctx: CallContext) -> Result<ToolOutput, ToolError> {
        Ok(ToolOutput::new(
            args.get("text").cloned().unwrap_or(Value::Null),
        ))
    }
}

#[async_trait::async_trait]
impl Tool for Noop {
    fn descriptor(&self) -> &ToolDescriptor {
        &self.0
    }
    async fn call(&self, _args: Value, _ctx: CallContext) -> Result<ToolOutput, ToolError> {
        Ok(ToolOutput::new(Value::Null))
    }
}

/// The builtin tools.
pub fn builtins() -> Vec<Arc<dyn Tool>> {
    vec![Arc::new(Echo::default()), Arc::new(Noop::default())]
}
