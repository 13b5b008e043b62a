//! The invocation pipeline every call goes through.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use agent_runtime_core::{
    Actor, ApprovalRequest, ApprovalSink, CallContext, ClassifiedError, Clock, DenyAll, Effect,
    ErrorClass, EventKind, EventSink, IdGenerator, NewEvent, PolicyEnvelope, RunId, SystemClock,
    Tool, ToolDescriptor, ToolError, ToolOutput,
};
use serde_json::{Value, json};

use crate::hooks::{Hook, HookCall, PostAction, PreAction};
use crate::policy::{Decision, Policy, PolicyInput, RuleTrace, SandboxMode};
use crate::redact::Redactor;
use crate::registry::{RegisteredTool, Registry};

/// Limits of the pipeline.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Time limit of a call when neither the caller nor the tool sets one (when either does,
    /// the shorter of theirs is the limit).
    pub default_timeout: Duration,
    /// Largest output returned and recorded, in bytes of JSON; longer outputs are truncated.
    pub max_output_bytes: usize,
    /// How long an approval may take before the call is denied.
    pub approval_timeout: Duration,
    /// Files and folders (resolved) no tool may change: a call whose judged path falls inside
    /// one is denied, unless the tool only reads (rule `default.protected`). See
    /// [`crate::config::protected_paths`].
    pub protected: Vec<std::path::PathBuf>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            default_timeout: Duration::from_secs(120),
            max_output_bytes: 256 * 1024,
            approval_timeout: Duration::from_secs(600),
            protected: Vec::new(),
        }
    }
}

/// Assembles a [`Gateway`].
pub struct GatewayBuilder {
    registry: Arc<Registry>,
    policy: Option<Policy>,
    hooks: Vec<Arc<dyn Hook>>,
    approval: Arc<dyn ApprovalSink>,
    events: Arc<dyn EventSink>,
    clock: Arc<dyn Clock>,
    ids: Option<IdGenerator>,
    redactor: Redactor,
    config: GatewayConfig,
    run_id: Option<RunId>,
}

impl GatewayBuilder {
    /// A builder recording into `events`, with the safe default policy and no workspace (every
    /// write is denied until [`GatewayBuilder::policy`] gives one: `Policy::defaults(vec![root])`),
    /// no hooks and an approval sink that denies everything.
    pub fn new(registry: Arc<Registry>, events: Arc<dyn EventSink>) -> Self {
        GatewayBuilder {
            registry,
            policy: None,
            hooks: Vec::new(),
            approval: Arc::new(DenyAll),
            events,
            clock: Arc::new(SystemClock),
            ids: None,
            redactor: Redactor::new(),
            config: GatewayConfig::default(),
            run_id: None,
        }
    }

    /// Sets the policy.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Adds a hook (hooks run in the order added).
    pub fn hook(mut self, hook: Arc<dyn Hook>) -> Self {
        self.hooks.push(hook);
        self
    }

    /// Sets where approval requests go.
    pub fn approval(mut self, sink: Arc<dyn ApprovalSink>) -> Self {
        self.approval = sink;
        self
    }

    /// Sets the clock of event timestamps.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Sets the id generator (seeded for reproducible tests).
    pub fn ids(mut self, ids: IdGenerator) -> Self {
        self.ids = Some(ids);
        self
    }

    /// Sets the redactor (with the secret values it must hide).
    pub fn redactor(mut self, redactor: Redactor) -> Self {
        self.redactor = redactor;
        self
    }

    /// Sets the limits.
    pub fn config(mut self, config: GatewayConfig) -> Self {
        self.config = config;
        self
    }

    /// The run recorded for calls whose context names none (default: a fresh id).
    pub fn run_id(mut self, run_id: RunId) -> Self {
        self.run_id = Some(run_id);
        self
    }

    /// Builds the gateway.
    pub fn build(self) -> Result<Gateway, crate::GatewayError> {
        let policy = match self.policy {
            Some(p) => p,
            None => Policy::defaults(Vec::new())?,
        };
        let ids = self
            .ids
            .unwrap_or_else(|| IdGenerator::random(self.clock.clone()));
        let run_id = self.run_id.unwrap_or_else(|| ids.run_id());
        Ok(Gateway {
            inner: Arc::new(Inner {
                registry: self.registry,
                policy: RwLock::new(Arc::new(policy)),
                hooks: self.hooks,
                approval: self.approval,
                events: self.events,
                clock: self.clock,
                ids,
                redactor: self.redactor,
                config: self.config,
                run_id,
                ends: EndsInFlight::default(),
            }),
        })
    }
}

/// The ends of calls dropped unfinished still being appended (each by a task of its own), which
/// [`EndsInFlight::recorded`] waits for: see [`Gateway::ends_in_flight`].
#[derive(Clone, Debug, Default)]
pub struct EndsInFlight(Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)>);

/// One end being appended: counted from its start until it is dropped (appended, failed, or
/// its task dropped with its runtime).
struct EndInFlight(EndsInFlight);

impl Drop for EndInFlight {
    fn drop(&mut self) {
        self.0.0.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.0.1.notify_waiters();
    }
}

impl EndsInFlight {
    fn start(&self) -> EndInFlight {
        self.0.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        EndInFlight(self.clone())
    }

    /// Waits until no end is being appended (each appended, or its append failed): ends begun
    /// meanwhile are waited for too.
    pub async fn recorded(&self) {
        loop {
            let notified = self.0.1.notified();
            if self.0.0.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct Inner {
    registry: Arc<Registry>,
    policy: RwLock<Arc<Policy>>,
    hooks: Vec<Arc<dyn Hook>>,
    approval: Arc<dyn ApprovalSink>,
    events: Arc<dyn EventSink>,
    clock: Arc<dyn Clock>,
    ids: IdGenerator,
    redactor: Redactor,
    config: GatewayConfig,
    run_id: RunId,
    ends: EndsInFlight,
}

/// The tool gateway: one pipeline for every call (validate, hooks, policy, approval, execute
/// with timeout and cancellation, cap, record). Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("registry", &self.inner.registry)
            .finish()
    }
}

/// The result of a dry run of the pipeline's checks (`policy check`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct CheckReport {
    /// The tool.
    pub tool: String,
    /// The arguments the policy saw (after pre-call hooks), redacted.
    pub arguments: Value,
    /// The decision.
    pub decision: Decision,
    /// Who decided: `policy` or `hook:NAME`.
    pub decided_by: String,
    /// Every rule and whether it matched.
    pub trace: Vec<RuleTrace>,
}

struct CallRecord<'a> {
    run_id: RunId,
    task_id: Option<agent_runtime_core::TaskId>,
    tool: &'a str,
    call_id: String,
    /// The gateway's redactor, with the call's own secrets (`CallContext::secrets`) added
    /// when it has any.
    redactor: std::borrow::Cow<'a, Redactor>,
}

/// Where a call stands whose request is recorded and whose outcome is not yet: when the
/// caller drops the call there (its task timed out, the run was cancelled, a question was
/// withdrawn), the drop records how it ended, so that the audit trail never holds a request,
/// a question or a start without its end.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Nothing to close (not recorded yet, or its outcome is).
    Settled,
    /// `approval.requested` is recorded; the answer is not.
    Asking,
    /// `tool.started` is recorded (or its decision, before it starts).
    Running,
}

/// Records the end of a call dropped unfinished (see [`Pending`]).
struct Unfinished {
    inner: Arc<Inner>,
    run_id: RunId,
    task_id: Option<agent_runtime_core::TaskId>,
    tool: String,
    call_id: String,
    request_id: Option<String>,
    pending: Pending,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if self.pending == Pending::Settled {
            return;
        }
        // Appending is async: a task of the runtime the call ran on does it. (Without one, at
        // the end of a process, there is nothing to do it with.)
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let event = |actor: Actor, kind: EventKind, payload: Value| NewEvent {
            run_id: self.run_id,
            task_id: self.task_id,
            actor,
            kind,
            time: self.inner.clock.now(),
            payload,
        };
        let mut events = Vec::with_capacity(2);
        // Unwinding from a panic (a tool's, caught by the caller) is no cancellation.
        let panicked = std::thread::panicking();
        let why = match (panicked, self.pending) {
            (true, Pending::Asking) => {
                "the call panicked while asking (its caller reports the panic)"
            }
            (true, _) => "the call panicked (its caller reports the panic)",
            (false, Pending::Asking) => {
                "the call was cancelled before an answer to its question was recorded (its caller gave up: a timeout, a \
                 cancellation)"
            }
            (false, _) => {
                "the call was cancelled while it ran (its caller gave up: a timeout, a cancellation)"
            }
        };
        if self.pending == Pending::Asking {
            events.push(event(
                Actor::System,
                EventKind::ApprovalDecided,
                json!({"request_id": self.request_id, "call_id": self.call_id, "approved": false,
                       "decided_by": "system", "reason": why}),
            ));
        }
        events.push(event(
            Actor::Tool(self.tool.clone()),
            EventKind::ToolFailed,
            json!({"tool": self.tool, "call_id": self.call_id,
                   "class": if panicked { ErrorClass::Internal } else { ErrorClass::Cancelled },
                   "message": why}),
        ));
        let sink = self.inner.events.clone();
        let end = self.inner.ends.start();
        runtime.spawn(async move {
            let _ = sink.append(events).await;
            drop(end);
        });
    }
}

/// The reason of a question nobody answered within `wait`: whole seconds when it is some.
///
/// ```
/// # use std::time::Duration;
/// assert_eq!(agent_runtime_gateway::nobody_answered(Duration::from_secs(600)), "nobody answered within 600 s");
/// assert_eq!(agent_runtime_gateway::nobody_answered(Duration::from_millis(1500)), "nobody answered within 1500 ms");
/// ```
pub fn nobody_answered(wait: std::time::Duration) -> String {
    match wait.as_millis() {
        ms if ms % 1000 == 0 => format!("nobody answered within {} s", ms / 1000),
        ms => format!("nobody answered within {ms} ms"),
    }
}

/// Whether `path` lies in a folder named like the runtime's configuration folder
/// (`.agent-runtime`), at any depth: the command line loads its configuration from such a
/// folder in the folder it runs in, which may be any folder of a workspace.
fn is_config_folder_path(path: &std::path::Path) -> bool {
    path.components()
        .any(|c| c.as_os_str() == crate::config::CONFIG_FOLDER)
}

impl Gateway {
    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// The current policy.
    pub fn policy(&self) -> Arc<Policy> {
        self.inner
            .policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the policy (calls already past their decision are not affected).
    pub fn set_policy(&self, policy: Policy) {
        *self.inner.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }

    /// What waits for the ends of calls dropped unfinished to be recorded (each is appended by
    /// a task of its own, see [`Gateway::call`]): await [`EndsInFlight::recorded`] before the
    /// runtime shuts down, or an end may not be in the log. Shared by every clone of the
    /// gateway and of its tools.
    pub fn ends_in_flight(&self) -> EndsInFlight {
        self.inner.ends.clone()
    }

    /// The redactor.
    pub fn redactor(&self) -> &Redactor {
        &self.inner.redactor
    }

    /// The run id recorded for calls whose context has none.
    pub fn default_run_id(&self) -> RunId {
        self.inner.run_id
    }

    /// Every tool's descriptor.
    pub fn descriptors(&self) -> Vec<ToolDescriptor> {
        self.inner.registry.descriptors()
    }

    /// Checks `args` against tool `name`'s input schema, as a call does first, without running
    /// hooks or policy and without recording anything. Errors as a call's validation does
    /// (`invalid_arguments`, values under secret-looking keys hidden), or for an unknown tool.
    pub fn check_args(&self, name: &str, args: &Value) -> Result<(), ToolError> {
        let entry = self
            .inner
            .registry
            .get(name)
            .ok_or_else(|| self.unknown(name))?;
        entry.validate(args)
    }

    /// A handle to tool `name` that implements core's [`Tool`] by calling through this gateway,
    /// so a scheduler holding `Arc<dyn Tool>` gets validation, policy and the audit trail.
    pub fn tool_handle(&self, name: &str) -> Option<GatewayTool> {
        let entry = self.inner.registry.get(name)?;
        Some(GatewayTool {
            gateway: self.clone(),
            descriptor: entry.descriptor().clone(),
        })
    }

    /// Handles for every tool.
    pub fn tool_handles(&self) -> Vec<Arc<dyn Tool>> {
        self.inner
            .registry
            .descriptors()
            .into_iter()
            .map(|descriptor| {
                Arc::new(GatewayTool {
                    gateway: self.clone(),
                    descriptor,
                }) as Arc<dyn Tool>
            })
            .collect()
    }

    fn unknown(&self, name: &str) -> ToolError {
        // A tool of an MCP server that could not be reached is not unknown: it is unavailable
        // now, and may be later.
        if let Some((server, why)) = self.inner.registry.unreachable_reason(name) {
            return ClassifiedError::new(
                ErrorClass::ToolError,
                format!(
                    "{name:?} is a tool of MCP server {server:?}, which cannot be reached: {why}"
                ),
            );
        }
        let names = self.inner.registry.names();
        let shown: Vec<&str> = names.iter().take(20).map(String::as_str).collect();
        ClassifiedError::new(
            ErrorClass::InvalidArguments,
            format!(
                "unknown tool {name:?}{}; known tools: {}",
                agent_runtime_core::names::suggestion(name, names.iter().map(String::as_str)),
                shown.join(", ")
            ),
        )
    }

    /// Runs validation, hooks and policy without executing or recording anything.
    pub async fn check(
        &self,
        name: &str,
        args: Value,
        actor: &Actor,
    ) -> Result<CheckReport, ToolError> {
        let entry = self
            .inner
            .registry
            .get(name)
            .ok_or_else(|| self.unknown(name))?;
        entry.validate(&args)?;
        let (args, hook_denial) = self
            .run_pre_hooks(&entry, name, args, actor)
            .await
            .map_err(|failure| failure.error)?;
        let policy = self.policy();
        let input = PolicyInput {
            tool: name,
            risk: entry.descriptor().risk,
            actor,
            arguments: &args,
            relative_paths: relative_paths_of(&entry),
        };
        let trace = policy.explain(&input);
        let (redactor, _) = self.call_redactor(&args, &[]);
        let (mut decision, decided_by) = self.decide(&policy, hook_denial, &input, &redactor);
        // A report is shown and printed: redacted as the call's events would be, the paths
        // the policy resolved too (they are argument text).
        decision.paths = std::mem::take(&mut decision.paths)
            .into_iter()
            .map(|(given, resolved)| {
                let resolved = resolved
                    .map(|p| std::path::PathBuf::from(redactor.redact_str(&p.to_string_lossy())));
                (redactor.redact_str(&given), resolved)
            })
            .collect();
        Ok(CheckReport {
            tool: name.to_string(),
            arguments: redactor.redact(&args),
            decision,
            decided_by,
            trace,
        })
    }

    /// The redactor of a call of `args` with the call's own `secrets`: the gateway's, and
    /// the values under credential keys (`token`, `api_key`), which are secrets of the call
    /// wherever else they show up (another argument, the tool's output). Also whether the
    /// call has secrets of its own.
    fn call_redactor(
        &self,
        args: &Value,
        secrets: &[String],
    ) -> (std::borrow::Cow<'_, Redactor>, bool) {
        let keyed = agent_runtime_core::secret::keyed_secret_values(args);
        if secrets.is_empty() && keyed.is_empty() {
            return (std::borrow::Cow::Borrowed(&self.inner.redactor), false);
        }
        let redactor = self
            .inner
            .redactor
            .clone()
            .with_secrets(secrets)
            .with_secrets(&keyed);
        (std::borrow::Cow::Owned(redactor), true)
    }

    /// The decision on a call and who made it: a pre-call hook's denial if one denied, else
    /// the policy's. The reason is redacted: it goes into events and errors, and a hook or a
    /// rule may quote the arguments.
    fn decide(
        &self,
        policy: &Policy,
        hook_denial: Option<(String, String)>,
        input: &PolicyInput<'_>,
        redactor: &Redactor,
    ) -> (Decision, String) {
        let (mut decision, mut decided_by) = match hook_denial {
            Some((hook, reason)) => (
                Decision {
                    effect: Effect::Deny,
                    rule: format!("hook:{hook}"),
                    reason,
                    sandbox: SandboxMode::Bubblewrap,
                    paths: Default::default(),
                },
                format!("hook:{hook}"),
            ),
            None => (policy.decide(input), "policy".to_string()),
        };
        // Before any rule: what the runtime trusts is no tool's to change. Only a built-in tool
        // that reads (`read_file`) may name it: any other may write whatever its risk says (an
        // MCP server marks a writing tool read-only as it likes). A path that resolved to
        // nothing (an MCP tool's relative path, a leading `~`) could be one of them.
        let reads_only =
            input.risk == agent_runtime_core::RiskClass::Read
                && self.inner.registry.get(input.tool).is_some_and(|e| {
                    e.descriptor().source == agent_runtime_core::ToolSource::Native
                });
        if decision.effect != Effect::Deny && !reads_only {
            let protected = &self.inner.config.protected;
            let hit = decision
                .paths
                .iter()
                .find_map(|(text, resolved)| match resolved {
                    // In one, or, for a tool that may write, a folder holding one (moved or
                    // removed, it takes the file along); a reader may list such a folder.
                    Some(p) => ((!protected.is_empty() && is_config_folder_path(p))
                        || protected.iter().any(|q| {
                            p.starts_with(q)
                                || (input.risk != agent_runtime_core::RiskClass::Read
                                    && q.starts_with(p))
                        }))
                    .then(|| format!("{} is or holds", p.display())),
                    None if !protected.is_empty() => Some(format!(
                        "{text} resolves to nothing the gateway can judge, so it could be"
                    )),
                    None => None,
                });
            if let Some(what) = hit {
                decision.effect = Effect::Deny;
                decision.rule = "default.protected".into();
                decision.reason = format!(
                    "{what} the runtime's own configuration, policy, hook or event log, which no \
                     tool may change (give an absolute path outside them)"
                );
                decided_by = "policy".into();
            }
        }
        decision.reason = redactor.redact_str(&decision.reason);
        (decision, decided_by)
    }

    /// Pre-call hooks; returns the final arguments, or the denying hook and its reason. A hook
    /// that fails (or rewrites the arguments into something the tool refuses) ends the call:
    /// the error comes with the hook's name, for the call's record.
    async fn run_pre_hooks(
        &self,
        entry: &RegisteredTool,
        name: &str,
        mut args: Value,
        actor: &Actor,
    ) -> Result<(Value, Option<(String, String)>), HookFailure> {
        for hook in &self.inner.hooks {
            if !hook.applies_to(name) {
                continue;
            }
            let call = HookCall {
                tool: name,
                actor,
                arguments: &args,
            };
            let failed = |error: ToolError| HookFailure {
                hook: hook.name().to_string(),
                error,
            };
            match hook.pre_call(&call).await.map_err(failed)? {
                PreAction::Continue => {}
                PreAction::Deny(reason) => {
                    return Ok((args, Some((hook.name().to_string(), reason))));
                }
                PreAction::Rewrite(new_args) => {
                    entry.validate(&new_args).map_err(|e| {
                        failed(ClassifiedError::new(
                            e.class,
                            format!(
                                "hook {} rewrote the arguments badly: {}",
                                hook.name(),
                                e.message
                            ),
                        ))
                    })?;
                    args = new_args;
                }
            }
        }
        Ok((args, None))
    }

    fn event(
        &self,
        rec: &CallRecord<'_>,
        actor: Actor,
        kind: EventKind,
        payload: Value,
    ) -> NewEvent {
        NewEvent {
            run_id: rec.run_id,
            task_id: rec.task_id,
            actor,
            kind,
            time: self.inner.clock.now(),
            payload,
        }
    }

    fn failed_event(&self, rec: &CallRecord<'_>, err: &ToolError) -> NewEvent {
        // The name is the caller's text until it is found in the registry: redacted too.
        let tool = rec.redactor.redact_str(rec.tool);
        // An empty name (a caller's mistake) is no actor: `tool:` would not read back.
        let actor = if tool.is_empty() {
            Actor::System
        } else {
            Actor::Tool(tool.clone())
        };
        self.event(
            rec,
            actor,
            EventKind::ToolFailed,
            json!({"tool": tool, "call_id": rec.call_id, "class": err.class,
                   "message": rec.redactor.redact_str(&err.message)}),
        )
    }

    /// Records events before the tool runs; if the log refuses them, the call does not run.
    async fn append(&self, events: Vec<NewEvent>) -> Result<(), ToolError> {
        self.append_or(events, "call not run").await
    }

    /// Records a call's outcome, after the tool ran.
    async fn append_outcome(&self, events: Vec<NewEvent>) -> Result<(), ToolError> {
        self.append_or(events, "the call ran but its outcome is not recorded")
            .await
    }

    async fn append_or(&self, events: Vec<NewEvent>, consequence: &str) -> Result<(), ToolError> {
        self.inner
            .events
            .append(events)
            .await
            .map(|_| ())
            .map_err(|e| {
                // A log that will never take these events (one too large) is no passing
                // trouble: stopping the run for a resume that meets it again would not help.
                let class = if e.refused {
                    ErrorClass::Internal
                } else {
                    ErrorClass::AuditUnavailable
                };
                ClassifiedError::new(
                    class,
                    format!(
                        "audit log unavailable, {consequence}: {}",
                        self.inner.redactor.redact_str(&e.message)
                    ),
                )
            })
    }

    /// Calls tool `name` with `args` through the whole pipeline.
    ///
    /// Records `tool.requested`, `policy.decided` (a [`PolicyEnvelope`]), the approval events
    /// when asked, `tool.started` and `tool.completed` or `tool.failed`, with secrets redacted.
    /// Nothing runs unless its request and decision were recorded first.
    pub async fn call(
        &self,
        name: &str,
        args: Value,
        ctx: CallContext,
    ) -> Result<ToolOutput, ToolError> {
        let inner = &*self.inner;
        let (redactor, call_secrets) = self.call_redactor(&args, &ctx.secrets);
        let rec = CallRecord {
            run_id: ctx.run_id.unwrap_or(inner.run_id),
            task_id: ctx.task_id,
            tool: name,
            call_id: inner.ids.event_id().to_string(),
            redactor,
        };
        let mut unfinished = Unfinished {
            inner: self.inner.clone(),
            run_id: rec.run_id,
            task_id: rec.task_id,
            tool: rec.redactor.redact_str(name),
            call_id: rec.call_id.clone(),
            request_id: None,
            pending: Pending::Settled,
        };
        // A digest of arguments that hold a secret (the call's own, or one the gateway knows:
        // a `${VAR}` of its configuration) would let anyone holding the log confirm a guessed
        // secret: arguments are digested as redacted whenever there are secrets to redact
        // (arguments without any digest as they are).
        let digest_of = |args: &Value| {
            if !call_secrets && !rec.redactor.has_secrets() {
                PolicyEnvelope::digest_arguments(args)
            } else {
                PolicyEnvelope::digest_arguments(&rec.redactor.redact_values(args))
            }
        };
        let requested_with = |args: &Value, digest: &agent_runtime_core::Hash32| {
            self.event(
                &rec,
                ctx.actor.clone(),
                EventKind::ToolRequested,
                json!({"tool": rec.redactor.redact_str(name), "call_id": rec.call_id,
                       "arguments_digest": digest,
                       "arguments": rec.redactor.redact(args)}),
            )
        };
        let requested = |args: &Value| requested_with(args, &digest_of(args));
        let size = agent_runtime_core::canonical::json_size(&args);
        if size > agent_runtime_core::MAX_ARGUMENT_BYTES {
            let err = ClassifiedError::new(
                ErrorClass::InvalidArguments,
                format!(
                    "the arguments are {size} bytes of JSON; a call's may have at most {}",
                    agent_runtime_core::MAX_ARGUMENT_BYTES
                ),
            );
            // Recorded by their size and digest: they would not fit an event.
            let requested = self.event(
                &rec,
                ctx.actor.clone(),
                EventKind::ToolRequested,
                json!({"tool": rec.redactor.redact_str(name), "call_id": rec.call_id,
                       "arguments_digest": digest_of(&args), "arguments_bytes": size}),
            );
            self.append(vec![requested, self.failed_event(&rec, &err)])
                .await?;
            return Err(err);
        }
        let Some(entry) = inner.registry.get(name) else {
            let err = redacted_error(&rec.redactor, self.unknown(name));
            self.append(vec![requested(&args), self.failed_event(&rec, &err)])
                .await?;
            return Err(err);
        };
        if let Err(err) = entry.validate(&args) {
            // A schema error quotes the argument it refuses, which may be a secret.
            let err = redacted_error(&rec.redactor, err);
            self.append(vec![requested(&args), self.failed_event(&rec, &err)])
                .await?;
            return Err(err);
        }
        // The digest of the arguments as requested; the policy's envelope carries the digest
        // of the arguments after the pre-call hooks, which is the same when no hook applies.
        let requested_digest = digest_of(&args);
        let mut batch = Vec::with_capacity(4);
        batch.push(requested_with(&args, &requested_digest));
        let hooks_apply = inner.hooks.iter().any(|h| h.applies_to(name));
        let (args, hook_denial) = if hooks_apply {
            match self.run_pre_hooks(&entry, name, args, &ctx.actor).await {
                Ok(v) => v,
                Err(HookFailure { hook, error }) => {
                    // Hooks fail closed: the failure is the hook's decision to refuse the
                    // call, recorded as one, so that an audit of policy decisions sees every
                    // refusal and who made it.
                    let error = redacted_error(&rec.redactor, error);
                    let envelope = PolicyEnvelope {
                        subject: ctx.actor.clone(),
                        tool: name.to_string(),
                        arguments_digest: requested_digest,
                        rule: format!("hook:{hook}"),
                        effect: Effect::Deny,
                        reason: error.message.clone(),
                        decided_by: format!("hook:{hook}"),
                    };
                    batch.push(self.event(
                        &rec,
                        Actor::System,
                        EventKind::PolicyDecided,
                        serde_json::to_value(&envelope).unwrap_or(Value::Null),
                    ));
                    batch.push(self.failed_event(&rec, &error));
                    self.append(batch).await?;
                    return Err(error);
                }
            }
        } else {
            (args, None)
        };
        // A command line that cannot be made (a word over the system's limit) fails now, not
        // after a person was asked to approve a call that could never run.
        if let Some(Err(err)) = entry.command().map(|c| c.render(&args)) {
            let err = redacted_error(&rec.redactor, err);
            batch.push(self.failed_event(&rec, &err));
            self.append(batch).await?;
            return Err(err);
        }
        let policy = self.policy();
        let risk = entry.descriptor().risk;
        let (decision, decided_by) = self.decide(
            &policy,
            hook_denial,
            &PolicyInput {
                tool: name,
                risk,
                actor: &ctx.actor,
                arguments: &args,
                relative_paths: relative_paths_of(&entry),
            },
            &rec.redactor,
        );
        let digest = if hooks_apply {
            digest_of(&args)
        } else {
            requested_digest
        };
        let envelope = |effect: Effect, decided_by: String| PolicyEnvelope {
            subject: ctx.actor.clone(),
            tool: name.to_string(),
            arguments_digest: digest,
            rule: decision.rule.clone(),
            effect,
            reason: decision.reason.clone(),
            decided_by,
        };
        let decided = |env: PolicyEnvelope| {
            self.event(
                &rec,
                Actor::System,
                EventKind::PolicyDecided,
                serde_json::to_value(&env).unwrap_or(Value::Null),
            )
        };
        batch.push(decided(envelope(decision.effect, decided_by)));

        match decision.effect {
            Effect::Deny => {
                let err = ClassifiedError::new(
                    ErrorClass::PolicyDenied,
                    format!("{name} denied by {}: {}", decision.rule, decision.reason),
                );
                batch.push(self.failed_event(&rec, &err));
                self.append(batch).await?;
                return Err(err);
            }
            Effect::Ask => {
                let request = ApprovalRequest {
                    id: inner.ids.event_id(),
                    run_id: ctx.run_id,
                    task_id: ctx.task_id,
                    task_name: ctx.task_name.as_deref().map(str::to_string),
                    subject: ctx.actor.clone(),
                    tool: name.to_string(),
                    arguments: rec.redactor.redact(&args),
                    risk,
                    reason: decision.reason.clone(),
                    answer_within_ms: Some(
                        u64::try_from(inner.config.approval_timeout.as_millis())
                            .unwrap_or(u64::MAX),
                    ),
                };
                batch.push(self.event(
                    &rec,
                    Actor::System,
                    EventKind::ApprovalRequested,
                    json!({"request_id": request.id.to_string(), "call_id": rec.call_id,
                           "tool": name, "risk": risk, "reason": decision.reason}),
                ));
                self.append(std::mem::take(&mut batch)).await?;
                let request_id = request.id.to_string();
                (unfinished.request_id, unfinished.pending) =
                    (Some(request_id.clone()), Pending::Asking);
                // The caller's clock (a task's timeout) stands still while a person reads.
                let asking = ctx.waiting_for_person();
                let answer = self.ask(request, &ctx).await;
                drop(asking);
                // The decision is recorded below; until its append is done, a drop records one
                // too (a store commits what it was handed even if the call is dropped: an end
                // twice rather than none).
                let (approved, by, why) = match &answer {
                    Ok(d) => (
                        d.approved,
                        d.decided_by.clone(),
                        d.reason.as_deref().map(|r| rec.redactor.redact_str(r)),
                    ),
                    Err(e) => (
                        false,
                        Actor::System,
                        Some(rec.redactor.redact_str(&e.message)),
                    ),
                };
                batch.push(self.event(
                    &rec,
                    by.clone(),
                    EventKind::ApprovalDecided,
                    json!({"request_id": request_id, "call_id": rec.call_id, "approved": approved,
                           "decided_by": by.to_string(), "reason": why}),
                ));
                let final_effect = if approved {
                    Effect::Allow
                } else {
                    Effect::Deny
                };
                batch.push(decided(envelope(final_effect, by.to_string())));
                if !approved {
                    let err = match answer {
                        Err(e) if e.class == ErrorClass::Cancelled => e,
                        _ => ClassifiedError::new(
                            ErrorClass::ApprovalDenied,
                            format!(
                                "{name} needs approval ({}) and {by} denied it{}",
                                decision.reason,
                                why.map(|w| format!(": {w}")).unwrap_or_default()
                            ),
                        ),
                    };
                    batch.push(self.failed_event(&rec, &err));
                    self.append(batch).await?;
                    unfinished.pending = Pending::Settled;
                    return Err(err);
                }
            }
            Effect::Allow => {}
        }

        // The caller's limit (a task's `timeout`, `--timeout-ms`) and the tool's own, the
        // shorter; the gateway's default only where neither sets one: a graph asking ten
        // minutes for a build step gets them (a tool's own limit is the way to cap one).
        let timeout = [ctx.timeout, entry.timeout()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(inner.config.default_timeout);
        batch.push(self.event(
            &rec,
            Actor::Tool(name.to_string()),
            EventKind::ToolStarted,
            json!({"tool": name, "call_id": rec.call_id, "timeout_ms": timeout.as_millis() as u64,
                   "sandbox": entry.command().map(|_| decision.sandbox)}),
        ));
        // The answer (if one was asked) is in this batch: a drop during its append records
        // the question's end as well as the call's.
        if unfinished.pending == Pending::Settled {
            unfinished.pending = Pending::Running;
        }
        self.append(batch).await?;
        unfinished.pending = Pending::Running;

        let started = Instant::now();
        // The arguments are kept for the post-call hooks only; without any, they move.
        let (call_args, kept_args) = if hooks_apply {
            (args.clone(), args)
        } else {
            (args, Value::Null)
        };
        let result = self
            .execute(&entry, call_args, &ctx, timeout, decision, policy.base())
            .await;
        let result = match result {
            Ok(out) => {
                self.post_process(name, &ctx.actor, &kept_args, out, &rec.redactor)
                    .await
            }
            Err(e) => Err(e),
        };
        let elapsed_us = started.elapsed().as_micros() as u64;
        // Its outcome is recorded below (or the log refused it, which the caller hears).
        unfinished.pending = Pending::Settled;
        match result {
            Ok(out) => {
                self.append_outcome(vec![self.event(
                    &rec,
                    Actor::Tool(name.to_string()),
                    EventKind::ToolCompleted,
                    json!({"tool": name, "call_id": rec.call_id, "output": rec.redactor.redact(&out.value),
                           "truncated": out.truncated, "duration_us": elapsed_us}),
                )])
                .await?;
                Ok(out)
            }
            Err(err) => {
                let err = redacted_error(&rec.redactor, err);
                self.append_outcome(vec![self.failed_event(&rec, &err)])
                    .await?;
                Err(err)
            }
        }
    }

    async fn ask(
        &self,
        request: ApprovalRequest,
        ctx: &CallContext,
    ) -> Result<agent_runtime_core::ApprovalDecision, ToolError> {
        let cancel = ctx.cancel.child_token();
        let wait = self.inner.config.approval_timeout;
        let sink = &self.inner.approval;
        let fut = sink.request(request, cancel.clone());
        // A sink that times answers from when it shows them gets no limit here: counted from
        // the call, a question queued behind others ran out before anyone saw it.
        let limit = async {
            if sink.times_answers() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(wait).await;
        };
        tokio::select! {
            r = fut => r,
            _ = limit => {
                cancel.cancel();
                Ok(agent_runtime_core::ApprovalDecision {
                    approved: false,
                    decided_by: Actor::System,
                    reason: Some(nobody_answered(wait)),
                })
            }
            _ = ctx.cancel.cancelled() => {
                cancel.cancel();
                Err(ClassifiedError::new(ErrorClass::Cancelled, "call cancelled while waiting for approval"))
            }
        }
    }

    async fn execute(
        &self,
        entry: &RegisteredTool,
        args: Value,
        ctx: &CallContext,
        timeout: Duration,
        decision: Decision,
        judged_against: &std::sync::Arc<std::path::Path>,
    ) -> Result<ToolOutput, ToolError> {
        let Decision {
            sandbox,
            paths: judged_paths,
            ..
        } = decision;
        let name = &entry.descriptor().name;
        let mut child = ctx.clone();
        child.cancel = ctx.cancel.child_token();
        child.timeout = Some(timeout);
        // Relative paths mean what the policy judged, not the process's working folder (nor a
        // folder the caller names: the policy is what decided).
        child.workdir = Some(judged_against.clone());
        // And a path the policy resolved is opened as resolved, with no link followed: a link
        // put in its way since (by a command of the same run) cannot take the open elsewhere.
        child.judged_paths = (!judged_paths.is_empty()).then(|| std::sync::Arc::new(judged_paths));
        let token = child.cancel.clone();
        let enforces_own_limit = entry.timeout().is_some();
        let fut = async {
            match entry.command() {
                Some(cmd) => cmd.run(args, child, sandbox).await,
                None => entry.tool().call(args, child).await,
            }
        };
        tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => {
                token.cancel();
                Err(ClassifiedError::new(ErrorClass::Cancelled, format!("{name} cancelled by its caller")))
            }
            r = fut => r,
            // Command tools and tools with a limit of their own (an MCP server's) enforce the
            // same limit themselves, report which limit was hit, and act on it (an MCP client
            // checks the session of a server that did not answer): this is the backstop.
            _ = tokio::time::sleep(if enforces_own_limit { timeout + Duration::from_millis(500) } else { timeout }) => {
                token.cancel();
                Err(ClassifiedError::new(
                    ErrorClass::Timeout,
                    format!("{name} did not finish within {} ms and was stopped", timeout.as_millis()),
                ))
            }
        }
    }

    async fn post_process(
        &self,
        name: &str,
        actor: &Actor,
        args: &Value,
        mut out: ToolOutput,
        redactor: &Redactor,
    ) -> Result<ToolOutput, ToolError> {
        for hook in &self.inner.hooks {
            if !hook.applies_to(name) {
                continue;
            }
            let call = HookCall {
                tool: name,
                actor,
                arguments: args,
            };
            match hook.post_call(&call, &out).await? {
                PostAction::Continue => {}
                PostAction::Deny(reason) => {
                    return Err(ClassifiedError::new(
                        ErrorClass::PolicyDenied,
                        format!(
                            "output of {name} withheld by hook {}: {reason}",
                            hook.name()
                        ),
                    ));
                }
                PostAction::Replace(o) => out = o,
            }
        }
        if redactor.has_secrets() {
            // An output the tool cut short (a command's `output_bytes`) may end in the start of
            // a secret cut in two, which the secret's whole form does not match.
            out.value = if out.truncated {
                redactor.redact_cut_ends(&out.value)
            } else {
                redactor.redact_values(&out.value)
            };
        }
        cap_output(out, self.inner.config.max_output_bytes).map_err(|size| {
            ClassifiedError::tool(format!(
                "the output of {name} is {size} bytes of JSON, over the gateway's limit of {} \
                 (limits.max_output_bytes) even with every string in it emptied",
                self.inner.config.max_output_bytes
            ))
        })
    }
}

/// A pre-call hook that failed, and how: the call ends, refused by that hook.
struct HookFailure {
    hook: String,
    error: ToolError,
}

/// `err` as the caller gets it: message and details redacted, then the message cut at
/// [`MAX_ERROR_BYTES`]. Cut after redaction, never before: a cut through a secret would leave a
/// prefix of it that redaction no longer recognizes.
fn redacted_error(redactor: &Redactor, err: ToolError) -> ToolError {
    let mut message = redactor.redact_str(&err.message);
    if message.len() > MAX_ERROR_BYTES {
        truncate_at_char(&mut message, MAX_ERROR_BYTES);
        message.push_str("...");
    }
    ClassifiedError {
        class: err.class,
        message,
        details: err.details.map(|d| redactor.redact_values(&d)),
    }
}

/// The longest error message a call's failure carries (a command's last line of stderr can be
/// as long as its output): cut, after redaction, with `...` added.
pub const MAX_ERROR_BYTES: usize = 2000;

/// Caps `out` at `max` bytes of JSON, marking it `truncated` when anything was cut. Strings are
/// cut at a character boundary: text cut short is still text. A string is cut to fit; an
/// object or array over the limit keeps its shape and has its longest strings cut (all to one
/// length, the longest the limit allows), so a command's `exit_code` and the start of its
/// `stdout` and `stderr` survive a flood on one of them: cut anywhere else it would be a string
/// of broken JSON where the caller reads fields. An object cut gains `"truncated": true` (when
/// it has no such key), which a caller that keeps only the value still sees. Refused with the
/// value's size (`Err(size)`) only when it is over the limit even with every string emptied.
pub fn cap_output(mut out: ToolOutput, max: usize) -> Result<ToolOutput, usize> {
    if matches!(out.value, Value::Null | Value::Bool(_) | Value::Number(_)) {
        return Ok(out);
    }
    let size = agent_runtime_core::canonical::json_size(&out.value);
    if size <= max {
        return Ok(out);
    }
    let marked = matches!(&out.value, Value::Object(o) if !o.contains_key("truncated"));
    // `,"truncated":true`, or without the comma in an empty object.
    let mark = if marked { 17 } else { 0 };
    if !cut_longest_strings(&mut out.value, (size - max).saturating_add(mark)) {
        return Err(size);
    }
    if let (true, Value::Object(o)) = (marked, &mut out.value) {
        o.insert("truncated".into(), Value::Bool(true));
    }
    // Every byte cut took at least one off the JSON, and the mark was counted in.
    debug_assert!(agent_runtime_core::canonical::json_size(&out.value) <= max);
    out.truncated = true;
    Ok(out)
}

/// The bytes `s` takes inside a JSON string as serde_json writes it: `"`, `\` and the control
/// characters are escaped (`\n`, or `\u0000` for those without a short form).
fn escaped_len(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// Where a string is cut to keep at most `keep` bytes: the character boundary at or before.
fn cut_point(s: &str, keep: usize) -> usize {
    let mut end = keep.min(s.len());
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// Cuts every string in `value` longer than some length `keep` (in bytes) down to it, with
/// `keep` the largest that takes at least `excess` bytes off the JSON (counting escapes as
/// they are written); false, and nothing cut, if even emptying every string would not.
fn cut_longest_strings(value: &mut Value, excess: usize) -> bool {
    fn strings<'v>(v: &'v Value, out: &mut Vec<&'v str>) {
        match v {
            Value::String(s) => out.push(s),
            Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
            Value::Object(o) => o.values().for_each(|v| strings(v, out)),
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    fn cut(v: &mut Value, keep: usize) {
        match v {
            Value::String(s) => truncate_at_char(s, keep),
            Value::Array(a) => a.iter_mut().for_each(|v| cut(v, keep)),
            Value::Object(o) => o.values_mut().for_each(|v| cut(v, keep)),
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    let keep = {
        let mut all = Vec::new();
        strings(value, &mut all);
        // The JSON bytes a cut to `keep` takes off: the escaped length of what goes.
        let removed = |keep: usize| -> usize {
            all.iter()
                .filter(|s| s.len() > keep)
                .map(|s| escaped_len(&s[cut_point(s, keep)..]))
                .sum()
        };
        if removed(0) < excess {
            return false;
        }
        // The largest `keep` with removed(keep) >= excess: removed only falls as keep grows.
        let (mut lo, mut hi) = (0, all.iter().map(|s| s.len()).max().unwrap_or(0));
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if removed(mid) >= excess {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    };
    cut(value, keep);
    true
}

fn truncate_at_char(s: &mut String, max: usize) {
    s.truncate(cut_point(s, max));
}

/// A registry tool seen through the gateway: implements core's [`Tool`], and every call goes
/// through the whole pipeline.
#[derive(Clone)]
pub struct GatewayTool {
    gateway: Gateway,
    descriptor: ToolDescriptor,
}

impl std::fmt::Debug for GatewayTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayTool")
            .field("name", &self.descriptor.name)
            .finish()
    }
}

#[async_trait::async_trait]
impl Tool for GatewayTool {
    fn descriptor(&self) -> &ToolDescriptor {
        &self.descriptor
    }

    async fn call(&self, args: Value, ctx: CallContext) -> Result<ToolOutput, ToolError> {
        self.gateway.call(&self.descriptor.name, args, ctx).await
    }

    fn check_args(&self, args: &Value) -> Result<(), ToolError> {
        self.gateway.check_args(&self.descriptor.name, args)
    }
}

/// Where `tool` takes relative paths from: an MCP server from a folder of its own, which the
/// policy cannot judge against.
fn relative_paths_of(tool: &RegisteredTool) -> crate::policy::RelativePaths {
    match tool.descriptor().source {
        agent_runtime_core::ToolSource::Mcp { .. } => crate::policy::RelativePaths::Unknown,
        _ => crate::policy::RelativePaths::Base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn capped(value: Value, max: usize) -> Result<ToolOutput, usize> {
        cap_output(ToolOutput::new(value), max)
    }

    #[test]
    fn a_flood_on_one_stream_cuts_that_stream_only() {
        let out = capped(
            json!({"exit_code": 0, "stdout": "a".repeat(10_000), "stderr": "warn"}),
            300,
        )
        .unwrap();
        assert!(out.truncated);
        assert_eq!(out.value["truncated"], true, "marked in the value too");
        assert_eq!(out.value["exit_code"], 0);
        assert_eq!(out.value["stderr"], "warn");
        let stdout = out.value["stdout"].as_str().unwrap();
        assert!(stdout.chars().all(|c| c == 'a'));
        let size = serde_json::to_string(&out.value).unwrap().len();
        // As much as fits is kept: the limit less the rest of the object.
        assert!(size <= 300 && size > 290, "{size}");
    }

    #[test]
    fn strings_are_cut_to_one_length_and_escapes_counted() {
        // Two long strings, one of quotes (two bytes of JSON each), in an array in an object.
        let out = capped(
            json!({"a": ["\"".repeat(400), "é".repeat(300)], "b": "short"}),
            500,
        )
        .unwrap();
        assert!(out.truncated);
        let text = serde_json::to_string(&out.value).unwrap();
        assert!(text.len() <= 500, "{}", text.len());
        assert_eq!(out.value["b"], "short");
        let quotes = out.value["a"][0].as_str().unwrap();
        let accents = out.value["a"][1].as_str().unwrap();
        assert!(!quotes.is_empty() && !accents.is_empty());
        assert!(
            quotes.len().abs_diff(accents.len()) <= 1,
            "{quotes} {accents}"
        );
    }

    /// Control characters take six bytes of JSON each (`\u0000`): what fits is counted in
    /// JSON bytes, so a flood of them is cut to fit rather than refused.
    #[test]
    fn escapes_count_as_the_bytes_they_take() {
        let out = capped(
            json!({"stdout": "\u{0}".repeat(60_000), "exit_code": 0}),
            262_144,
        )
        .unwrap();
        let size = serde_json::to_string(&out.value).unwrap().len();
        assert!(size <= 262_144 && size > 262_144 - 12, "{size}");
        assert_eq!(out.value["exit_code"], 0);
        // A string alone, as JSON, the same way.
        let out = capped(json!("\u{1}".repeat(1000)), 602).unwrap();
        assert_eq!(out.value.as_str().unwrap().len(), 100);
        assert!(out.truncated);
        // An object's own `truncated` is left as it is.
        let out = capped(json!({"truncated": "partly", "s": "x".repeat(100)}), 60).unwrap();
        assert_eq!(out.value["truncated"], "partly");
    }

    #[test]
    fn a_structure_that_cannot_fit_is_refused_and_one_that_fits_is_untouched() {
        assert_eq!(capped(json!([1, 2, 3, 4, 5]), 5).unwrap_err(), 11);
        assert_eq!(capped(json!({"k": "v"}), 5).unwrap_err(), 9);
        let out = capped(json!({"k": "v"}), 9).unwrap();
        assert_eq!((out.value, out.truncated), (json!({"k": "v"}), false));
        let out = capped(json!("x".repeat(20)), 5).unwrap();
        // Counted as JSON: the quotes take two of the five bytes.
        assert_eq!((out.value, out.truncated), (json!("xxx"), true));
    }
}
