//! Pre-call and post-call hooks: code that sees every call and may deny it, rewrite its
//! arguments or redact its output.
//!
//! Hooks run in the order given. Pre-call hooks run after schema validation and before policy,
//! so the policy decides on the arguments that will actually be used (rewritten arguments are
//! validated again). Post-call hooks run on a successful result before it is capped and recorded.
//! A hook that fails denies the call: hooks fail closed.
//!
//! A hook is either Rust code implementing [`Hook`] or an external command ([`CommandHook`])
//! speaking one JSON object on stdin and one on stdout:
//!
//! ```text
//! stdin:  {"phase":"pre","tool":"fs.write","actor":"agent:writer","arguments":{...}}
//! stdout: {"action":"continue"} | {"action":"deny","reason":"..."}
//!       | {"action":"rewrite","arguments":{...}}
//! stdin:  {"phase":"post","tool":"fs.read","actor":"agent:writer","arguments":{...},"output":...}
//! stdout: {"action":"continue"} | {"action":"deny","reason":"..."}
//!       | {"action":"replace","output":...}
//! ```

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use agent_runtime_core::{Actor, ClassifiedError, ErrorClass, ToolError, ToolOutput};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::glob::any_match;

/// What a hook sees of a call.
#[derive(Clone, Debug)]
pub struct HookCall<'a> {
    /// The tool's registry name.
    pub tool: &'a str,
    /// Who calls.
    pub actor: &'a Actor,
    /// The arguments (validated).
    pub arguments: &'a Value,
}

/// A pre-call hook's verdict.
#[derive(Clone, Debug, PartialEq)]
pub enum PreAction {
    /// Go on with the arguments unchanged.
    Continue,
    /// Refuse the call.
    Deny(String),
    /// Go on with these arguments instead.
    Rewrite(Value),
}

/// A post-call hook's verdict.
#[derive(Clone, Debug, PartialEq)]
pub enum PostAction {
    /// Keep the output.
    Continue,
    /// Refuse to return the output.
    Deny(String),
    /// Return this output instead (for example with secrets removed).
    Replace(ToolOutput),
}

/// Code that sees every call. Default methods do nothing.
#[async_trait::async_trait]
pub trait Hook: Send + Sync {
    /// The hook's name, recorded as `hook:NAME` when it decides.
    fn name(&self) -> &str;

    /// Whether the hook wants to see calls of `tool` (default: all).
    fn applies_to(&self, _tool: &str) -> bool {
        true
    }

    /// Before policy.
    async fn pre_call(&self, _call: &HookCall<'_>) -> Result<PreAction, ToolError> {
        Ok(PreAction::Continue)
    }

    /// After a successful call.
    async fn post_call(
        &self,
        _call: &HookCall<'_>,
        _output: &ToolOutput,
    ) -> Result<PostAction, ToolError> {
        Ok(PostAction::Continue)
    }
}

/// Which phases an external hook takes part in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookPhase {
    /// Before policy.
    Pre,
    /// After the call.
    Post,
}

/// An external hook as configured.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandHookConfig {
    /// The hook's name.
    pub name: String,
    /// Program and arguments (no shell).
    pub command: Vec<String>,
    /// Tool-name globs (default: all).
    #[serde(default)]
    pub tools: Vec<String>,
    /// Phases (default: both).
    #[serde(default)]
    pub phases: Vec<HookPhase>,
    /// How long the hook may take, in milliseconds (default 5000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The folder it runs in, where its relative program and arguments are: in a
    /// configuration file, relative to the file's folder, which is also the default (so a
    /// hook `sh hooks/check.sh` is the configuration's own script wherever the runtime runs);
    /// built in code, the process's folder when `None`.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
}

impl CommandHookConfig {
    /// What the hook's command loads that it names (see [`crate::config::command_files`]).
    pub fn loaded_files(&self) -> Vec<PathBuf> {
        crate::config::command_files(&self.command, self.cwd.as_deref())
    }
}

/// A hook run as an external command speaking JSON on stdin and stdout.
#[derive(Clone, Debug)]
pub struct CommandHook {
    config: CommandHookConfig,
    program: PathBuf,
    /// What its command names, as it was when configured (see [`crate::trust::Pinned`]).
    pinned: crate::trust::Pinned,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
struct HookReply {
    action: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    arguments: Option<Value>,
    #[serde(default)]
    output: Option<Value>,
    #[serde(default)]
    truncated: Option<bool>,
}

impl CommandHook {
    /// A hook from its configuration.
    pub fn new(config: CommandHookConfig) -> Result<Self, crate::GatewayError> {
        let program =
            config
                .command
                .first()
                .cloned()
                .ok_or_else(|| crate::GatewayError::Parse {
                    what: format!("hook {}", config.name),
                    message: "command is empty".into(),
                })?;
        // A relative program given as a path is the one in `cwd` (what the system makes of
        // one with a working folder set differs between systems).
        let program = match &config.cwd {
            Some(cwd) if program.contains('/') => cwd.join(program),
            _ => PathBuf::from(program),
        };
        Ok(CommandHook {
            program,
            pinned: crate::trust::Pinned::take(config.loaded_files()),
            config,
        })
    }

    fn wants(&self, phase: HookPhase) -> bool {
        self.config.phases.is_empty() || self.config.phases.contains(&phase)
    }

    fn fail(&self, message: impl std::fmt::Display) -> ToolError {
        ClassifiedError::new(
            ErrorClass::PolicyDenied,
            format!("hook {} failed, call denied: {message}", self.config.name),
        )
    }

    async fn exchange(&self, input: Value) -> Result<HookReply, ToolError> {
        let timeout = Duration::from_millis(self.config.timeout_ms.unwrap_or(5000));
        self.pinned.refuse_moved().await.map_err(|e| self.fail(e))?;
        let mut cmd = tokio::process::Command::new(&self.program);
        if let Some(cwd) = &self.config.cwd {
            cmd.current_dir(cwd);
        }
        cmd.args(&self.config.command[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        crate::child::prepare(cmd.as_std_mut());
        crate::child::die_with_parent(cmd.as_std_mut());
        let mut child = cmd.spawn().map_err(|e| {
            self.fail(format!(
                "cannot start {} (in {}): {e}",
                self.program.display(),
                self.config
                    .cwd
                    .as_deref()
                    .map_or_else(|| ".".to_string(), |c| c.display().to_string())
            ))
        })?;
        // Read all along (a hook that writes much there must not block on a full pipe); its
        // last line says why a failing hook failed.
        let said = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        // Aborted however this ends (a timeout, a write error): a process the hook left
        // behind may keep the pipe open for long.
        let stderr = child.stderr.take().map(|mut err| {
            let said = said.clone();
            crate::child::AbortOnDrop(tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut tail = said
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 8192 {
                        let cut = tail.len() - 4096;
                        tail.drain(..cut);
                    }
                }
            }))
        });
        let body = serde_json::to_vec(&input).map_err(|e| self.fail(e))?;
        let mut stdin = child.stdin.take().ok_or_else(|| self.fail("no stdin"))?;
        let mut stdout = child.stdout.take().ok_or_else(|| self.fail("no stdout"))?;
        let work = async move {
            stdin.write_all(&body).await?;
            drop(stdin);
            let mut out = Vec::new();
            (&mut stdout).take(16 << 20).read_to_end(&mut out).await?;
            let status = child.wait().await?;
            Ok::<_, std::io::Error>((status, out))
        };
        let (status, out) = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| self.fail(format!("no answer within {} ms", timeout.as_millis())))?
            .map_err(|e| self.fail(e))?;
        if !status.success() {
            // A process the hook left behind may hold its stderr open: what was said by then.
            if let Some(mut task) = stderr {
                let _ = tokio::time::timeout(crate::child::STDERR_GRACE, &mut task.0).await;
            }
            let said = said
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let said = String::from_utf8_lossy(&said);
            return Err(self.fail(match crate::child::last_said(&said) {
                Some(line) => format!("exited with {status}; its stderr ended: {line}"),
                None => format!("exited with {status}"),
            }));
        }
        drop(stderr);
        serde_json::from_slice(&out).map_err(|e| self.fail(format!("invalid JSON reply: {e}")))
    }
}

#[async_trait::async_trait]
impl Hook for CommandHook {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn applies_to(&self, tool: &str) -> bool {
        self.config.tools.is_empty() || any_match(&self.config.tools, tool)
    }

    async fn pre_call(&self, call: &HookCall<'_>) -> Result<PreAction, ToolError> {
        if !self.wants(HookPhase::Pre) {
            return Ok(PreAction::Continue);
        }
        let reply = self
            .exchange(
                json!({"phase": "pre", "tool": call.tool, "actor": call.actor.to_string(),
                             "arguments": call.arguments}),
            )
            .await?;
        match reply.action.as_str() {
            "continue" => Ok(PreAction::Continue),
            "deny" => Ok(PreAction::Deny(
                reply.reason.unwrap_or_else(|| "denied by hook".into()),
            )),
            "rewrite" => match reply.arguments {
                Some(a) => Ok(PreAction::Rewrite(a)),
                None => Err(self.fail("rewrite without arguments")),
            },
            other => Err(self.fail(format!("unknown action {other:?}"))),
        }
    }

    async fn post_call(
        &self,
        call: &HookCall<'_>,
        output: &ToolOutput,
    ) -> Result<PostAction, ToolError> {
        if !self.wants(HookPhase::Post) {
            return Ok(PostAction::Continue);
        }
        let reply = self
            .exchange(
                json!({"phase": "post", "tool": call.tool, "actor": call.actor.to_string(),
                             "arguments": call.arguments, "output": output.value}),
            )
            .await?;
        match reply.action.as_str() {
            "continue" => Ok(PostAction::Continue),
            "deny" => Ok(PostAction::Deny(
                reply.reason.unwrap_or_else(|| "denied by hook".into()),
            )),
            "replace" => match reply.output {
                Some(v) => Ok(PostAction::Replace(ToolOutput {
                    value: v,
                    truncated: reply.truncated.unwrap_or(output.truncated),
                })),
                None => Err(self.fail("replace without output")),
            },
            other => Err(self.fail(format!("unknown action {other:?}"))),
        }
    }
}
