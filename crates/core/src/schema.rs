//! The published JSON Schemas, generated from the types.
//!
//! `schemas/*.schema.json` at the repository root are these functions' output; a test fails when
//! they differ, and `UPDATE_SCHEMAS=1 cargo test -p agent-runtime-core --test schemas` rewrites
//! them.

use crate::event::Envelope;
use crate::policy::PolicyEnvelope;

/// Every published schema: file name and content.
pub fn published_schemas() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("audit-envelope.schema.json", schema_of::<Envelope>()),
        ("policy-envelope.schema.json", schema_of::<PolicyEnvelope>()),
    ]
}

/// The JSON Schema (draft 2020-12) of `T`.
pub fn schema_of<T: schemars::JsonSchema>() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(T)).unwrap_or(serde_json::Value::Null)
}
