//! Policy decisions, as recorded.

use serde::{Deserialize, Serialize};

use crate::event::{Actor, Hash32};

/// What a policy rule says to do with a tool call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// Run it.
    Allow,
    /// Refuse it.
    Deny,
    /// Ask a person through the `ApprovalSink`, then run or refuse.
    Ask,
}

impl Effect {
    /// The stable string form.
    pub const fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
            Effect::Ask => "ask",
        }
    }
}

/// One policy decision about one tool call: the payload of a `policy.decided` event.
///
/// Published as `schemas/policy-envelope.schema.json`. The arguments are recorded only as a digest
/// (BLAKE3 of their canonical JSON) so that a decision can be matched to a call without copying
/// arguments, which may hold personal data, into the policy trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(title = "Policy envelope")]
pub struct PolicyEnvelope {
    /// Who asked for the call.
    pub subject: Actor,
    /// The tool's registry name.
    pub tool: String,
    /// BLAKE3 of the canonical JSON of the arguments as validated.
    pub arguments_digest: Hash32,
    /// The rule that decided, by its id in the policy (`default` for the built-in defaults).
    pub rule: String,
    /// What the rule said.
    pub effect: Effect,
    /// Why, in words a person reads in an approval prompt.
    pub reason: String,
    /// Who made the final call: `policy`, a hook (`hook:NAME`) or a person (`person:NAME`).
    pub decided_by: String,
}

impl PolicyEnvelope {
    /// The digest recorded for `arguments`.
    pub fn digest_arguments(arguments: &serde_json::Value) -> Hash32 {
        Hash32(*blake3::hash(&crate::event::canonical_json(arguments)).as_bytes())
    }
}
