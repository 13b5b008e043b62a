//! Error classes shared by every capability.
//!
//! A failure policy retries "on named error classes", so every error that crosses a trait
//! boundary carries one [`ErrorClass`]. The string forms are stable and appear in events, task
//! graphs (`retry.on: [timeout, tool_error]`) and the CLI.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

macro_rules! error_classes {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// What kind of failure something was, for retry decisions and reporting.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, schemars::JsonSchema)]
        #[serde(rename_all = "snake_case")]
        #[non_exhaustive]
        pub enum ErrorClass {
            $($(#[$doc])* $variant,)*
        }

        impl ErrorClass {
            /// Every class, in declaration order.
            pub const ALL: &'static [ErrorClass] = &[$(ErrorClass::$variant,)*];

            /// The stable string form.
            pub const fn as_str(self) -> &'static str {
                match self { $(ErrorClass::$variant => $name,)* }
            }
        }

        impl FromStr for ErrorClass {
            type Err = ErrorClassError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok(ErrorClass::$variant),)*
                    _ => Err(ErrorClassError { input: s.to_string() }),
                }
            }
        }
    };
}

error_classes! {
    /// Arguments did not match the tool's input schema; the model can fix and retry.
    InvalidArguments => "invalid_arguments",
    /// Policy denied the call.
    PolicyDenied => "policy_denied",
    /// A person denied the call, or nobody answered in time.
    ApprovalDenied => "approval_denied",
    /// The call ran out of time.
    Timeout => "timeout",
    /// The call was cancelled by its caller.
    Cancelled => "cancelled",
    /// The process stopped (crash, kill -9) while the call was in flight; found on resume.
    Interrupted => "interrupted",
    /// The tool ran and reported failure.
    ToolError => "tool_error",
    /// The sandbox could not be set up or a sandbox limit was hit.
    SandboxError => "sandbox_error",
    /// The model provider asked us to slow down.
    ModelRateLimit => "model_rate_limit",
    /// The model provider returned an error.
    ModelError => "model_error",
    /// No model provider could be reached.
    ModelUnavailable => "model_unavailable",
    /// A run's budget (tokens, cost, tasks) is spent.
    BudgetExceeded => "budget_exceeded",
    /// A session failed (terminal died, browser crashed).
    SessionError => "session_error",
    /// The event log refused a call's audit events (a full disk, say): the call did not run,
    /// or it ran and its outcome is not recorded. A run that meets it stops, resumable, as
    /// when its own events are refused, rather than fail the task.
    AuditUnavailable => "audit_unavailable",
    /// A bug or an unexpected state in the runtime.
    Internal => "internal",
}

/// The error for an unknown error class name: the closest class when it looks like a typo,
/// and every class.
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown error class {input:?}{hint} (known: {known})",
    hint = crate::names::suggestion(input, ErrorClass::ALL.iter().map(|c| c.as_str())),
    known = ErrorClass::ALL.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ")
)]
pub struct ErrorClassError {
    input: String,
}

/// By name, as [`FromStr`] reads it, so that a typo in a task graph's `retry.on` gets the
/// closest class (serde's derive lists every variant and suggests none).
impl<'de> Deserialize<'de> for ErrorClass {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = ErrorClass;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an error class name (`timeout`, `tool_error`, ...)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ErrorClass, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Name)
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ErrorClass {
    /// Whether a failure of this class may succeed when tried again unchanged. Failure policies
    /// still name the classes they retry; this is the default set.
    pub const fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorClass::Timeout
                | ErrorClass::Interrupted
                | ErrorClass::ToolError
                | ErrorClass::ModelRateLimit
                | ErrorClass::ModelError
                | ErrorClass::ModelUnavailable
        )
    }
}

/// An error with a class and a message, as it crosses a capability boundary.
///
/// Messages must never contain secrets; they are recorded in events.
#[derive(
    Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, thiserror::Error,
)]
#[error("{class}: {message}")]
pub struct ClassifiedError {
    /// The error class.
    pub class: ErrorClass,
    /// What went wrong and where, in one line.
    pub message: String,
    /// Structured detail a program (or a model) can act on, such as the list of schema
    /// violations behind an `invalid_arguments` error. Never holds secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl ClassifiedError {
    /// An error of `class` saying `message`.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        ClassifiedError {
            class,
            message: message.into(),
            details: None,
        }
    }

    /// The same error with structured `details`.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }
}

/// The message a panic was raised with (`panic!("...")` gives a `&str` or a `String`), if it
/// has one: what a runtime that catches a panic reports instead of the panic itself.
///
/// ```
/// let caught = std::panic::catch_unwind(|| panic!("bad index {}", 3)).unwrap_err();
/// assert_eq!(agent_runtime_core::error::panic_message(caught.as_ref()), Some("bad index 3"));
/// ```
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events record a class by its string form, written either through serde or through
    /// `as_str`: the two must be one form, and parse back.
    #[test]
    fn serde_form_is_the_string_form() {
        for &class in ErrorClass::ALL {
            assert_eq!(
                serde_json::to_value(class).unwrap(),
                serde_json::Value::String(class.as_str().into())
            );
            assert_eq!(class.as_str().parse::<ErrorClass>().unwrap(), class);
            let back: ErrorClass =
                serde_json::from_value(serde_json::Value::String(class.as_str().into())).unwrap();
            assert_eq!(back, class);
        }
    }

    /// A misspelt class gets the closest one; a far-off name only the list.
    #[test]
    fn an_unknown_class_suggests_the_closest() {
        let e = serde_json::from_str::<ErrorClass>("\"tool_eror\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("unknown error class \"tool_eror\" (did you mean `tool_error`?) (known: invalid_arguments,"),
            "{e}"
        );
        let e = "zebra".parse::<ErrorClass>().unwrap_err().to_string();
        assert!(
            e.starts_with("unknown error class \"zebra\" (known: "),
            "{e}"
        );
        assert!(serde_json::from_str::<ErrorClass>("5").is_err());
    }
}
