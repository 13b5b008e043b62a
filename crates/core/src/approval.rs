//! The `ApprovalSink` trait: asking a person.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::error::{ClassifiedError, ErrorClass};
use crate::event::Actor;
use crate::ids::{EventId, RunId, TaskId};
use crate::tool::RiskClass;

/// A question to a person: may this call go ahead?
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    /// Id of this request (echoed in the `approval.decided` event).
    pub id: EventId,
    /// The run, if any.
    pub run_id: Option<RunId>,
    /// The task, if any.
    pub task_id: Option<TaskId>,
    /// The task's id in its graph (`review`), when the caller gave it: what a person knows the
    /// task by.
    #[serde(default)]
    pub task_name: Option<String>,
    /// Who wants to make the call.
    pub subject: Actor,
    /// The tool.
    pub tool: String,
    /// The arguments, with secrets redacted.
    pub arguments: Value,
    /// The tool's risk class.
    pub risk: RiskClass,
    /// Why policy asks (the rule's reason).
    pub reason: String,
    /// How long the person has to answer, in milliseconds (the gateway's
    /// `approval_timeout_ms`). A sink that [times answers itself](ApprovalSink::times_answers)
    /// counts it from when the person is shown the question; the gateway otherwise counts it
    /// from the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_within_ms: Option<u64>,
}

/// A person's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalDecision {
    /// Whether the call may go ahead.
    pub approved: bool,
    /// Who decided (`person:NAME`, or `system` for a timeout or a sink that cannot ask).
    pub decided_by: Actor,
    /// Why, if they said.
    pub reason: Option<String>,
}

/// A failed approval request (the surface is gone, the request was cancelled).
pub type ApprovalError = ClassifiedError;

/// Where approval requests go: a terminal prompt, a desktop dialog, a web control plane.
///
/// # Contract
/// - **Timeouts**: the sink may wait as long as a person takes; the caller bounds the wait and
///   cancels `cancel` when it gives up, after which the sink should withdraw the question. A
///   sink that shows questions one at a time (one terminal) should time each answer itself,
///   from when it is shown ([`ApprovalSink::times_answers`]): the caller's bound counts from
///   the call, so a question queued behind others could run out before anyone saw it.
/// - **Cancellation**: on `cancel`, return an error of class `cancelled`.
/// - **Errors**: a sink that cannot ask anyone returns a denial decided by `system`, not an error,
///   so that "nobody to ask" is recorded as a decision.
#[async_trait::async_trait]
pub trait ApprovalSink: Send + Sync {
    /// Asks, and waits for the answer.
    async fn request(
        &self,
        request: ApprovalRequest,
        cancel: CancellationToken,
    ) -> Result<ApprovalDecision, ApprovalError>;

    /// Whether this sink ends a question itself once [`ApprovalRequest::answer_within_ms`] has
    /// passed since the person was shown it (a denial decided by `system`), so that the caller
    /// sets no limit of its own beyond its cancellation. `false` by default: the caller limits
    /// the whole wait.
    fn times_answers(&self) -> bool {
        false
    }
}

/// A sink that denies everything: the default where there is no person to ask.
#[derive(Clone, Copy, Debug, Default)]
pub struct DenyAll;

#[async_trait::async_trait]
impl ApprovalSink for DenyAll {
    async fn request(
        &self,
        request: ApprovalRequest,
        cancel: CancellationToken,
    ) -> Result<ApprovalDecision, ApprovalError> {
        if cancel.is_cancelled() {
            return Err(ClassifiedError::new(
                ErrorClass::Cancelled,
                "approval request cancelled",
            ));
        }
        Ok(ApprovalDecision {
            approved: false,
            decided_by: Actor::System,
            reason: Some(format!("no one to ask about {}: denied", request.tool)),
        })
    }
}
