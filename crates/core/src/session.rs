//! The `Session` trait: a terminal or browser that agents and people share.

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::error::ClassifiedError;
use crate::ids::SessionId;

/// What kind of session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    /// A pseudo-terminal running a shell or program.
    Terminal,
    /// A headless browser.
    Browser,
}

/// Input to a session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum SessionInput {
    /// Bytes typed into a terminal.
    Keys {
        /// The bytes, as text.
        text: String,
    },
    /// A new terminal size.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// A browser command (navigate, click, ...), as JSON.
    Command {
        /// The command.
        command: serde_json::Value,
    },
}

/// Output of a session, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum SessionOutput {
    /// Bytes a terminal printed, as lossy UTF-8.
    Text {
        /// The text.
        text: String,
    },
    /// A browser screenshot or event, as JSON.
    Frame {
        /// The frame.
        frame: serde_json::Value,
    },
    /// The session ended.
    Closed {
        /// The exit code, for a terminal program.
        exit_code: Option<i32>,
    },
}

/// A failed session operation.
pub type SessionError = ClassifiedError;

/// A live terminal or browser session.
///
/// # Contract
/// - **Streaming**: [`Session::subscribe`] gives every subscriber every output from the moment it
///   subscribes; a subscriber that falls behind gets `RecvError::Lagged` rather than slowing the
///   session.
/// - **Cancellation**: [`Session::close`] ends the session and its processes; dropping the session
///   must do the same.
/// - **Errors**: class `session_error`, `cancelled` or `timeout`.
#[async_trait::async_trait]
pub trait Session: Send + Sync {
    /// The session's id.
    fn id(&self) -> SessionId;
    /// What kind of session it is.
    fn kind(&self) -> SessionKind;
    /// Sends input.
    async fn send(&self, input: SessionInput) -> Result<(), SessionError>;
    /// Subscribes to output.
    fn subscribe(&self) -> broadcast::Receiver<SessionOutput>;
    /// Ends the session.
    async fn close(&self) -> Result<(), SessionError>;
}
