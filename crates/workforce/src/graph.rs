//! Task graphs: the file format, parsing with located errors, and validation.
//!
//! A graph names **agents** (instructions, model route, allowed tools, limits) and **tasks**. A
//! task is either an *agent task* (`agent` + `prompt`) or a *direct tool step* (`tool` + `args`).
//! Tasks depend on each other through `needs` and through templates in their inputs
//! (`{{ tasks.fetch.output.text }}`), which add the dependency implicitly.
//!
//! The published schema is `schemas/task-graph.schema.json` ([`task_graph_schema`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_runtime_core::ErrorClass;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::hashing::FastMap;
use crate::template;

/// A whole task graph, as written in a YAML or JSON file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Task graph")]
pub struct TaskGraph {
    /// A name for the graph, shown in `runs list`.
    #[serde(default)]
    pub name: Option<String>,
    /// Limits of the whole run.
    #[serde(default)]
    pub limits: RunLimits,
    /// Agents by name.
    #[serde(default)]
    pub agents: BTreeMap<String, AgentSpec>,
    /// The tasks, in any order (dependencies decide the order of execution).
    pub tasks: Vec<TaskSpec>,
}

/// Limits of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunLimits {
    /// Tasks running at once, across the run.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1))]
    pub concurrency: u32,
    /// Tasks in the run, declared and spawned together.
    #[serde(default = "default_max_tasks")]
    pub max_tasks: u32,
    /// How deep agents may spawn sub-tasks of sub-tasks (0: no spawning).
    #[serde(default = "default_spawn_depth")]
    pub max_spawn_depth: u32,
    /// Calls of one tool running at once, by tool name.
    #[serde(default)]
    #[schemars(extend("additionalProperties" = {"type": "integer", "format": "uint32", "minimum": 1}))]
    pub tools: BTreeMap<String, u32>,
    /// Model calls to one provider running at once, by provider (the part of a model route
    /// before `/`).
    #[serde(default)]
    #[schemars(extend("additionalProperties" = {"type": "integer", "format": "uint32", "minimum": 1}))]
    pub providers: BTreeMap<String, u32>,
    /// What the run may spend.
    #[serde(default)]
    pub budget: Budget,
}

fn default_concurrency() -> u32 {
    8
}
fn default_max_tasks() -> u32 {
    10_000
}
fn default_spawn_depth() -> u32 {
    2
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            concurrency: default_concurrency(),
            max_tasks: default_max_tasks(),
            max_spawn_depth: default_spawn_depth(),
            tools: BTreeMap::new(),
            providers: BTreeMap::new(),
            budget: Budget::default(),
        }
    }
}

/// What a run may spend; the run fails with `budget_exceeded` when it is spent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Model tokens (input and output) across the run.
    #[serde(default)]
    pub tokens: Option<u64>,
    /// Model calls across the run.
    #[serde(default)]
    pub model_calls: Option<u64>,
}

/// An agent: who works on agent tasks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// The system instructions.
    #[serde(default)]
    pub instructions: String,
    /// The model route, `provider/model` (for example `openai/gpt-4o-mini`).
    pub model: String,
    /// Tools the agent may call, by registry name. `spawn_task` lets it add sub-tasks.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Model calls per task attempt before it fails with `budget_exceeded`.
    #[serde(default = "default_max_turns")]
    #[schemars(range(min = 1))]
    pub max_turns: u32,
    /// Tasks of this agent running at once.
    #[serde(default = "default_agent_concurrency")]
    #[schemars(range(min = 1))]
    pub concurrency: u32,
}

fn default_max_turns() -> u32 {
    8
}
fn default_agent_concurrency() -> u32 {
    4
}

/// One task of the graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Unique id: letters, digits, `_` and `-`, at most 128 of them.
    #[schemars(length(min = 1, max = 128))]
    pub id: String,
    /// For an agent task: the agent's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// For an agent task: what to do (templated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// For a direct tool step: the tool's registry name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// For a direct tool step: its arguments (templated: any string may hold
    /// `{{ tasks.ID.output... }}`, or `{{ secrets.NAME }}`, which only the call gets and no
    /// event records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// Tasks that must finish first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// Higher runs first among ready tasks (default 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// Time budget of one attempt, such as `30s` or `500ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    #[serde(with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// Retries of failed attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// What happens when the task has failed for good.
    #[serde(default, skip_serializing_if = "OnFailure::is_default")]
    pub on_failure: OnFailure,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

/// Retries with exponential backoff and seeded jitter.
///
/// The delay before retry `n` (from 1) is `min(backoff * 2^(n-1), max_backoff)`, times a factor
/// drawn uniformly from `[1 - jitter, 1 + jitter]` from the run's seeded random source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 1))]
    pub max_attempts: u32,
    /// Delay before the first retry.
    #[serde(default = "default_backoff", with = "duration_str")]
    #[schemars(with = "String")]
    pub backoff: Duration,
    /// Cap on the delay.
    #[serde(default = "default_max_backoff", with = "duration_str")]
    #[schemars(with = "String")]
    pub max_backoff: Duration,
    /// Relative jitter in `[0, 1]`.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
    /// Error classes worth retrying (default: timeout, tool_error, model_rate_limit,
    /// model_error, model_unavailable, interrupted).
    #[serde(default = "default_retry_on")]
    pub on: Vec<ErrorClass>,
}

fn default_attempts() -> u32 {
    3
}
fn default_backoff() -> Duration {
    Duration::from_millis(200)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_jitter() -> f64 {
    0.2
}
/// The error classes retried when a retry policy does not name any.
pub fn default_retry_on() -> Vec<ErrorClass> {
    ErrorClass::ALL
        .iter()
        .copied()
        .filter(|c| c.is_transient())
        .collect()
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: default_attempts(),
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
            jitter: default_jitter(),
            on: default_retry_on(),
        }
    }
}

/// What happens to the run when a task has failed for good (retries spent or not retryable).
///
/// Written `fail_run`, `skip`, `{ continue_with: VALUE }` or `{ fallback: TASK }`.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum OnFailure {
    /// The run fails (the default).
    #[default]
    FailRun,
    /// The task is skipped, and so are the tasks that need it.
    Skip,
    /// The task completes with this output instead.
    ContinueWith(Value),
    /// The named task runs in its place; its output becomes this task's output.
    Fallback(String),
}

impl Serialize for OnFailure {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            OnFailure::FailRun => s.serialize_str("fail_run"),
            OnFailure::Skip => s.serialize_str("skip"),
            OnFailure::ContinueWith(v) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("continue_with", v)?;
                m.end()
            }
            OnFailure::Fallback(t) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("fallback", t)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for OnFailure {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        const EXPECTED: &str =
            "expected fail_run, skip, { continue_with: VALUE } or { fallback: TASK }";
        let v = Value::deserialize(d)?;
        match &v {
            Value::String(s) if s == "fail_run" => Ok(OnFailure::FailRun),
            Value::String(s) if s == "skip" => Ok(OnFailure::Skip),
            Value::Object(m) if m.len() == 1 => match m.iter().next() {
                Some((k, v)) if k == "continue_with" => Ok(OnFailure::ContinueWith(v.clone())),
                Some((k, Value::String(t))) if k == "fallback" => {
                    Ok(OnFailure::Fallback(t.clone()))
                }
                Some((k, _)) if k == "fallback" => {
                    Err(D::Error::custom("fallback must name a task"))
                }
                // `{ skip: true }`: a policy without a value is written as a word.
                Some((k, _)) if k == "skip" || k == "fail_run" => Err(D::Error::custom(format!(
                    "`{k}` takes no value: write `on_failure: {k}`; {EXPECTED}"
                ))),
                Some((k, _)) => Err(D::Error::custom(format!(
                    "unknown policy `{k}`{}; {EXPECTED}",
                    suggestion(k, ["continue_with", "fallback"])
                ))),
                None => Err(D::Error::custom(EXPECTED)),
            },
            Value::String(s) => Err(D::Error::custom(format!(
                "unknown policy `{s}`{}; {EXPECTED}",
                suggestion(s, ["fail_run", "skip"])
            ))),
            _ => Err(D::Error::custom(EXPECTED)),
        }
    }
}

impl JsonSchema for OnFailure {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "OnFailure".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "What happens when the task has failed for good",
            "oneOf": [
                {"type": "string", "enum": ["fail_run", "skip"]},
                {"type": "object", "properties": {"continue_with": {}}, "required": ["continue_with"], "additionalProperties": false},
                {"type": "object", "properties": {"fallback": {"type": "string"}}, "required": ["fallback"], "additionalProperties": false}
            ]
        })
    }
}

impl OnFailure {
    fn is_default(&self) -> bool {
        matches!(self, OnFailure::FailRun)
    }
}

/// Which kind of work a task does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskKind<'a> {
    /// An agent loop.
    Agent {
        /// The agent's name.
        agent: &'a str,
        /// The templated prompt.
        prompt: &'a str,
    },
    /// One tool call.
    Tool {
        /// The tool's name.
        tool: &'a str,
        /// The templated arguments.
        args: &'a Value,
    },
}

static NULL: Value = Value::Null;

impl TaskSpec {
    /// The task's kind (valid after [`TaskGraph::validate`]).
    pub fn kind(&self) -> TaskKind<'_> {
        match (&self.agent, &self.tool) {
            (Some(agent), _) => TaskKind::Agent {
                agent,
                prompt: self.prompt.as_deref().unwrap_or(""),
            },
            (None, Some(tool)) => TaskKind::Tool {
                tool,
                args: self.args.as_ref().unwrap_or(&NULL),
            },
            (None, None) => TaskKind::Tool {
                tool: "",
                args: &NULL,
            },
        }
    }

    /// Ids of upstream tasks referenced in the task's templates.
    pub fn template_refs(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        if let Some(p) = &self.prompt {
            template::collect_refs_str(p, &mut out);
        }
        if let Some(a) = &self.args {
            template::collect_refs(a, &mut out);
        }
        out
    }

    /// Calls `f` with each upstream task id referenced in the task's templates (repeats
    /// included), without collecting them.
    pub fn for_each_template_ref(&self, f: &mut dyn FnMut(&str)) {
        if let Some(p) = &self.prompt {
            template::for_each_ref_str(p, f);
        }
        if let Some(a) = &self.args {
            template::for_each_ref(a, f);
        }
    }
}

mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse(&String::deserialize(d)?)
    }

    /// A duration as written in a graph (`500ms`, `30s`, `2m`).
    pub fn parse<E: serde::de::Error>(s: &str) -> Result<Duration, E> {
        humantime::parse_duration(s).map_err(|e| {
            E::custom(format!(
                "invalid duration {s:?} ({e}); write e.g. 500ms, 30s, 2m"
            ))
        })
    }
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_str::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| super::duration_str::parse(&s)).transpose()
    }
}

/// The JSON Schema of a task graph file (published as `schemas/task-graph.schema.json`).
pub fn task_graph_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(TaskGraph)).unwrap_or(Value::Null)
}

/// Where in a file something is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The file (or `<input>`).
    pub file: PathBuf,
    /// 1-based line, 0 when unknown.
    pub line: usize,
    /// 1-based column, 0 when unknown.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
        }
    }
}

/// Which of [`TaskGraph`]'s checks to run: all of them for a graph about to start a run, the
/// engine's own for one read back from a log.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Checks {
    New,
    Recorded,
}

/// The most characters of a field path or a message a [`GraphError`] shows: what a graph
/// quotes back (a value, a name) may be a pasted megabyte.
const MAX_SHOWN: usize = 300;

use agent_runtime_core::names::cut_middle;

/// A task graph that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GraphError {
    /// The file could not be read.
    #[error("cannot read task graph {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid YAML/JSON, or a field has the wrong shape.
    #[error(
        "{at}: {}: {}",
        cut_middle(field, MAX_SHOWN),
        cut_middle(message, MAX_SHOWN)
    )]
    Syntax {
        /// Where.
        at: Location,
        /// The field path, such as `tasks[1].retry.backoff`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The graph is well formed but does not make sense.
    #[error(
        "{at}: {}: {}",
        cut_middle(field, MAX_SHOWN),
        cut_middle(message, MAX_SHOWN)
    )]
    Invalid {
        /// Where (the best location found for the field).
        at: Location,
        /// The field path, such as `tasks[2].needs`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The graph is larger than a graph in its format may be ([`MAX_GRAPH_BYTES`],
    /// [`MAX_YAML_GRAPH_BYTES`]).
    #[error(
        "task graph {} is over {} MiB, the most a {format} graph may have{hint}",
        path.display(),
        limit >> 20
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit it is over, in bytes.
        limit: usize,
        /// `JSON` or `YAML`.
        format: &'static str,
        /// What to do instead, if anything.
        hint: &'static str,
    },
    /// The dependencies form a cycle.
    #[error("{at}: tasks: {}", cycle_text(path))]
    Cycle {
        /// Where the first task of the cycle declares what it needs.
        at: Location,
        /// The task ids of the cycle, each needing the next, the first repeated at the end.
        path: Vec<String>,
    },
}

/// A cycle's path as `a -> b -> c -> a`; a long one keeps its ends and says how many tasks
/// it leaves out between (a cycle through 50,000 tasks made an error line of half a megabyte).
fn cycle_path(path: &[String]) -> String {
    const ENDS: usize = 8;
    if path.len() <= 2 * ENDS + 1 {
        path.join(" -> ")
    } else {
        format!(
            "{} -> ... ({} more) ... -> {}",
            path[..ENDS].join(" -> "),
            path.len() - 2 * ENDS,
            path[path.len() - ENDS..].join(" -> ")
        )
    }
}

/// The message of [`GraphError::Cycle`].
fn cycle_text(path: &[String]) -> String {
    if let [one, _] = path {
        return format!("task `{one}` needs itself");
    }
    format!(
        "dependency cycle {} (each task needs the next)",
        cycle_path(path)
    )
}

/// The largest task graph accepted, in bytes (16 MiB: a JSON graph of about 100,000 tasks).
/// The bound is on memory: a graph's values become `serde_json` values, and a 2 MB JSON file of
/// nested empty lists took 260 MB to load and run (`agent-runtime run`).
pub const MAX_GRAPH_BYTES: usize = 16 << 20;

/// The largest YAML task graph accepted, in bytes. The YAML parser first turns the whole text
/// into parser events: the 2 MB file above, as YAML, took 490 MB and twice the time.
pub const MAX_YAML_GRAPH_BYTES: usize = 4 << 20;

/// Reads and validates a task graph file (JSON when it starts with `{`, YAML otherwise). A file
/// over [`MAX_GRAPH_BYTES`] is refused without being read whole.
pub fn load_graph(path: &Path) -> Result<TaskGraph, GraphError> {
    load_graph_source(path).map(|(graph, _)| graph)
}

/// [`load_graph`], also returning the file's text: what later checks locate their errors in
/// (see [`TaskGraph::check_tools_in`]).
pub fn load_graph_source(path: &Path) -> Result<(TaskGraph, String), GraphError> {
    let file = std::fs::File::open(path).map_err(|source| GraphError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_graph_source(file, path)
}

/// [`load_graph_source`] from any reader (standard input, say); `path` names it in errors.
///
/// ```
/// use std::path::Path;
/// let text = "tasks:\n  - { id: a, tool: echo, args: { text: hi } }\n";
/// let (graph, _) =
///     agent_runtime_workforce::graph::read_graph_source(text.as_bytes(), Path::new("<stdin>"))
///         .unwrap();
/// assert_eq!(graph.tasks[0].id, "a");
/// let err = agent_runtime_workforce::graph::read_graph_source(&b"tasks: 3"[..], Path::new("<stdin>"));
/// assert!(err.unwrap_err().to_string().starts_with("<stdin>:1:1: tasks: invalid type"));
/// ```
pub fn read_graph_source(
    reader: impl std::io::Read,
    path: &Path,
) -> Result<(TaskGraph, String), GraphError> {
    use std::io::Read;
    let io = |source| GraphError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    // One byte past the limit tells a file at the limit from a larger one; reading through
    // `take` also bounds a pipe or a device, whose size the file system does not know. Bytes,
    // not text: the cut may split a character, and the file is too large anyway.
    reader
        .take(MAX_GRAPH_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() > MAX_GRAPH_BYTES {
        let start = bytes.strip_prefix(BOM.as_bytes()).unwrap_or(&bytes);
        let json = is_json(path, start.trim_ascii_start().starts_with(b"{"));
        return Err(too_large(path, json));
    }
    let text = String::from_utf8(bytes).map_err(|e| not_utf8(path, &e))?;
    let graph = parse_graph(&text, path)?;
    Ok((graph, text))
}

/// The error for a file that is not UTF-8 text, at the line and column of its first bad byte
/// (the column counts characters, as an editor's does).
fn not_utf8(path: &Path, e: &std::string::FromUtf8Error) -> GraphError {
    let bytes = e.as_bytes();
    let at = e.utf8_error().valid_up_to();
    // Everything before `at` is valid UTF-8.
    let before = std::str::from_utf8(&bytes[..at]).unwrap_or_default();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    GraphError::Syntax {
        at: Location {
            file: path.to_path_buf(),
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        },
        field: "(top level)".into(),
        message: format!(
            "not UTF-8 text (byte 0x{:02x}); save the file as UTF-8",
            bytes[at]
        ),
    }
}

/// The error for a graph over its format's limit.
fn too_large(file: &Path, json: bool) -> GraphError {
    let (limit, format, hint) = if json {
        (MAX_GRAPH_BYTES, "JSON", "")
    } else {
        (
            MAX_YAML_GRAPH_BYTES,
            "YAML",
            " (write a larger graph as JSON, which may have up to 16 MiB)",
        )
    };
    GraphError::TooLarge {
        path: file.to_path_buf(),
        limit,
        format,
        hint,
    }
}

/// The byte order mark some editors (on Windows, mostly) put at the start of a UTF-8 file.
const BOM: &str = "\u{feff}";

/// Whether a graph is read as JSON: a `.json` file is, a `.yaml` or `.yml` file is not, and
/// anything else (standard input, other names) is when its text starts with `{`.
fn is_json(file: &Path, starts_with_brace: bool) -> bool {
    match file.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("json") => true,
        Some(e) if e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml") => false,
        _ => starts_with_brace,
    }
}

/// Parses and validates a task graph from `text`; `file` names it in errors. JSON for a `.json`
/// file, YAML for a `.yaml` or `.yml` one, and otherwise JSON when the text starts with `{`
/// (JSON is YAML, but serde_json reports better positions); a byte order mark at the start is
/// passed over. Refuses a text over [`MAX_GRAPH_BYTES`] (JSON) or [`MAX_YAML_GRAPH_BYTES`]
/// (YAML), and YAML nested deeper than
/// [`MAX_YAML_FLOW_DEPTH`](agent_runtime_core::yaml::MAX_YAML_FLOW_DEPTH), before parsing it
/// (see [`agent_runtime_core::yaml`]).
pub fn parse_graph(text: &str, file: &Path) -> Result<TaskGraph, GraphError> {
    let text = text.strip_prefix(BOM).unwrap_or(text);
    let json = is_json(file, text.trim_start().starts_with('{'));
    if text.len()
        > (if json {
            MAX_GRAPH_BYTES
        } else {
            MAX_YAML_GRAPH_BYTES
        })
    {
        return Err(too_large(file, json));
    }
    if !json
        && let Some((line, column)) = agent_runtime_core::yaml::flow_nesting_past(
            text,
            agent_runtime_core::yaml::MAX_YAML_FLOW_DEPTH,
        )
    {
        return Err(GraphError::Syntax {
            at: Location {
                file: file.to_path_buf(),
                line,
                column,
            },
            field: "(top level)".into(),
            message: agent_runtime_core::yaml::too_deep(),
        });
    }
    // Before the types read it: their error for an array task would be about a missing field.
    if json && let Some(path) = array_for_object(text) {
        return Err(GraphError::Syntax {
            at: locate_field(text, file, &path, None),
            field: if path.is_empty() {
                "(top level)".into()
            } else {
                path
            },
            message: "an array where an object belongs (a JSON graph names each field, as a \
                      YAML one does)"
                .into(),
        });
    }
    let graph: TaskGraph = deserialize_located(text, file, json)?;
    // Parsers keep the last of a key written twice in a mapping, silently dropping the first
    // (a whole agent, an argument), and JSON values turn YAML's `.nan` into `null`: refused,
    // where they are.
    deserialize_located::<agent_runtime_core::document::JsonFaithful>(text, file, json)?;
    // JSON's parser reads an integer past 64 bits as the nearest float, silently (YAML's
    // refuses it): refused too, where it is.
    if json && let Some((line, column, literal)) = lossy_integer(text) {
        return Err(GraphError::Syntax {
            at: Location {
                file: file.to_path_buf(),
                line,
                column,
            },
            field: "(top level)".into(),
            message: format!(
                "the integer {} does not fit in 64 bits and would be rounded; write it as a string",
                agent_runtime_core::names::shown(literal)
            ),
        });
    }
    graph.validate_in(text, file)?;
    Ok(graph)
}

/// The field path of the first array in a JSON graph where the schema wants an object
/// (`(top level)` is the empty path).
///
/// serde's derived structs also take an array of their fields in order, and JSON's reader
/// offers it: `"limits": [4]` would read as `concurrency: 4`, silently. YAML's reader and the
/// published schema refuse it; the schema (generated from the types, so never out of step)
/// says where arrays may be.
fn array_for_object(text: &str) -> Option<String> {
    static SCHEMA: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    let schema = SCHEMA.get_or_init(task_graph_schema);
    let value: Value = serde_json::from_str(text).ok()?;
    let mut path = String::new();
    array_where_schema_has_none(&value, schema, schema, &mut path).then_some(path)
}

/// Follows `$ref` (`#/$defs/X`, the only kind the generated schema has).
fn resolved<'a>(schema: &'a Value, root: &'a Value) -> &'a Value {
    let mut s = schema;
    // A bound, in case a definition refers to itself.
    for _ in 0..8 {
        let Some(name) = s
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/$defs/"))
        else {
            break;
        };
        match root.get("$defs").and_then(|d| d.get(name)) {
            Some(next) => s = next,
            None => break,
        }
    }
    s
}

/// The schema's alternatives (`anyOf`, `oneOf`), resolved; `s` itself when it has none.
fn alternatives<'a>(s: &'a Value, root: &'a Value) -> Vec<&'a Value> {
    let listed: Vec<&Value> = ["anyOf", "oneOf"]
        .iter()
        .filter_map(|k| s.get(*k).and_then(Value::as_array))
        .flatten()
        .map(|a| resolved(a, root))
        .collect();
    if listed.is_empty() { vec![s] } else { listed }
}

/// Whether a schema (resolved, without alternatives) admits a value of JSON type `kind`.
fn admits(s: &Value, kind: &str) -> bool {
    match s.get("type") {
        Some(Value::String(t)) => t == kind,
        Some(Value::Array(ts)) => ts.iter().any(|t| t == kind),
        // No type: a constant or an enumeration of scalars admits no container; anything else
        // (an argument's value, `continue_with`'s) admits all.
        _ => s.get("const").is_none() && s.get("enum").is_none(),
    }
}

/// Walks `value` beside `schema`, extending `path`; true (with `path` at it) at the first array
/// where its schema admits an object and no array.
fn array_where_schema_has_none(
    value: &Value,
    schema: &Value,
    root: &Value,
    path: &mut String,
) -> bool {
    let choices = alternatives(resolved(schema, root), root);
    match value {
        Value::Array(items) => {
            let Some(list) = choices.iter().find(|s| admits(s, "array")) else {
                // An array for a string or a number is the types' to name.
                return choices.iter().any(|s| admits(s, "object"));
            };
            let Some(item_schema) = list.get("items") else {
                return false;
            };
            let len = path.len();
            for (i, item) in items.iter().enumerate() {
                path.push_str(&format!("[{i}]"));
                if array_where_schema_has_none(item, item_schema, root, path) {
                    return true;
                }
                path.truncate(len);
            }
            false
        }
        Value::Object(fields) => {
            // Of an enum's object forms, the one that names the first field (`fallback`,
            // `continue_with`).
            let object = choices.iter().filter(|s| admits(s, "object")).find(|s| {
                fields.keys().next().is_none_or(|k| {
                    s.get("properties").and_then(|p| p.get(k)).is_some()
                        || s.get("additionalProperties").is_some_and(Value::is_object)
                })
            });
            let Some(object) = object else { return false };
            let len = path.len();
            for (key, field) in fields {
                let field_schema = match object.get("properties").and_then(|p| p.get(key)) {
                    Some(s) => s,
                    None => match object.get("additionalProperties") {
                        Some(s) if s.is_object() => s,
                        _ => continue,
                    },
                };
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                if array_where_schema_has_none(field, field_schema, root, path) {
                    return true;
                }
                path.truncate(len);
            }
            false
        }
        _ => false,
    }
}

/// The first integer literal of a JSON text (outside strings) that fits neither `i64` nor
/// `u64`, with its line and column (from 1, in characters).
fn lossy_integer(text: &str) -> Option<(usize, usize, &str)> {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                i += 1;
                while i < b.len() && matches!(b[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                {
                    i += 1;
                }
                let literal = &text[start..i];
                let integer = !literal.contains(['.', 'e', 'E']);
                if integer && literal.parse::<i64>().is_err() && literal.parse::<u64>().is_err() {
                    let before = &text[..start];
                    let line = before.matches('\n').count() + 1;
                    let column = before[before.rfind('\n').map_or(0, |n| n + 1)..]
                        .chars()
                        .count()
                        + 1;
                    return Some((line, column, literal));
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// `text` deserialized as `T` from JSON or YAML, an error naming the file, the line, the column
/// and the field.
fn deserialize_located<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &Path,
    json: bool,
) -> Result<T, GraphError> {
    Ok(if json {
        let mut de = serde_json::Deserializer::from_str(text);
        let graph = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let (field, full) = (path_string(e.path()), e.path().to_string());
            let inner = e.into_inner();
            let mut message = strip_position(&inner.to_string(), &full);
            let column = char_column(text, inner.line(), inner.column());
            // serde_json's message for a comment is about what it expected there instead.
            if inner.is_syntax() && json_comment_at(text, inner.line(), column) {
                message = "JSON has no comments (a YAML graph may have them)".into();
            }
            GraphError::Syntax {
                at: Location {
                    file: file.to_path_buf(),
                    line: inner.line(),
                    column,
                },
                field,
                message,
            }
        })?;
        // Text after the graph (a second object, a stray bracket) is refused, as a second YAML
        // document is: it is not what the person meant to run.
        de.end().map_err(|e| {
            let column = char_column(text, e.line(), e.column());
            GraphError::Syntax {
                at: Location {
                    file: file.to_path_buf(),
                    line: e.line(),
                    column,
                },
                field: "(top level)".into(),
                message: if json_comment_at(text, e.line(), column) {
                    "JSON has no comments (a YAML graph may have them)".into()
                } else {
                    "text after the end of the graph (one JSON value per file)".into()
                },
            }
        })?;
        graph
    } else {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let (field, full) = (path_string(e.path()), e.path().to_string());
            let inner = e.into_inner();
            let (line, column) = inner.location().map_or_else(
                // The parser gives no place for a second document: it is where it starts.
                || second_yaml_document(text).map_or((0, 0), |line| (line, 1)),
                |l| (l.line(), l.column()),
            );
            let (line, column) = yaml_key_at(text, &last_key(&full), line, column);
            let mut message = strip_position(&inner.to_string(), &full);
            if message.starts_with("unknown field `<<`") {
                message = "YAML merge keys (`<<: *anchor`) are not read here: write the fields \
                           out (an alias of a whole value, `*anchor`, works)"
                    .into();
            }
            // A key written twice is reported where its mapping starts: the second one is
            // the mistake.
            let (line, column) = match agent_runtime_core::yaml::duplicated_key(&message) {
                Some(key) => agent_runtime_core::yaml::second_key_at(text, key, line, column)
                    .unwrap_or((line, column)),
                None => (line, column),
            };
            GraphError::Syntax {
                at: Location {
                    file: file.to_path_buf(),
                    line,
                    column,
                },
                field,
                message,
            }
        })?
    })
}

/// The column in characters (from 1) of serde_json's column in bytes on `line` (from 1).
fn char_column(text: &str, line: usize, byte_column: usize) -> usize {
    let Some(l) = text.lines().nth(line.saturating_sub(1)) else {
        return byte_column;
    };
    let mut end = byte_column.saturating_sub(1).min(l.len());
    while !l.is_char_boundary(end) {
        end -= 1;
    }
    l[..end].chars().count() + 1
}

/// Whether a comment (`//` or `/*`) starts at or just after `line`:`column` (from 1, in characters;
/// serde_json's place for an error, which is the character it stopped at).
fn json_comment_at(text: &str, line: usize, column: usize) -> bool {
    let Some(l) = text.lines().nth(line.saturating_sub(1)) else {
        return false;
    };
    let from = l
        .char_indices()
        .nth(column.saturating_sub(1))
        .map_or(l.len(), |(i, _)| i);
    let rest = l[from..].trim_start();
    let before = l[..from].trim_end();
    rest.starts_with("//") || rest.starts_with("/*") || before.ends_with('/')
}

/// The line (from 1) of the `---` that starts a second YAML document, if there is one.
fn second_yaml_document(text: &str) -> Option<usize> {
    let mut content = false;
    for (n, l) in text.lines().enumerate() {
        if l.starts_with("---") {
            if content {
                return Some(n + 1);
            }
        } else if !l.trim().is_empty() && !l.trim_start().starts_with('#') {
            content = true;
        }
    }
    None
}

/// The last key of a field path as serde_path_to_error writes it (`tasks[0].on_failure` →
/// `on_failure`), or nothing when it ends at an index.
fn last_key(path: &str) -> String {
    let last = path.rsplit('.').next().unwrap_or(path);
    if last.contains('[') || last.contains('?') {
        String::new()
    } else {
        last.to_string()
    }
}

/// Where the YAML parser's error about field `key` points, moved onto the key itself: a
/// value's own check (an `on_failure` policy, a duration) fails with the position of the
/// mapping holding it, lines before the key. Searches forward from the reported line; keeps the
/// parser's position when the key is not found.
fn yaml_key_at(text: &str, key: &str, line: usize, column: usize) -> (usize, usize) {
    if key.is_empty() {
        return (line, column);
    }
    agent_runtime_core::yaml::key_positions(text, key, line, 1)
        .next()
        .unwrap_or((line, column))
}

/// Segments of a field path shown before the rest is elided: a value nested a hundred levels
/// deep would otherwise print a path of a hundred `[0]`s.
const SHOWN_PATH_SEGMENTS: usize = 8;

fn path_string(p: &serde_path_to_error::Path) -> String {
    let mut segments: Vec<_> = p.iter().collect();
    // A key the parser never got to (the file ends, a comma trails) says nothing: it is left
    // off, rather than shown as `?`.
    while matches!(segments.last(), Some(serde_path_to_error::Segment::Unknown)) {
        segments.pop();
    }
    if segments.is_empty() {
        return "(top level)".into();
    }
    let mut out = String::new();
    for (i, segment) in segments.iter().take(SHOWN_PATH_SEGMENTS).enumerate() {
        use serde_path_to_error::Segment;
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => out.push_str(if i > 0 { ".?" } else { "?" }),
        }
    }
    if segments.len() > SHOWN_PATH_SEGMENTS {
        out.push_str(&format!(
            " ... ({} more)",
            segments.len() - SHOWN_PATH_SEGMENTS
        ));
    }
    out
}

/// The parser's message without its position and its leading field path (`path`, as the
/// parser writes it, whole), both of which the error reports separately.
fn strip_position(msg: &str, path: &str) -> String {
    // Both parsers append " at line L column C", and the YAML one starts with the field path.
    let msg = match msg.find(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    };
    // The YAML parser's path can stop short of the field: a value's own check (a duration)
    // fails with the path of the mapping holding it (`tasks[0]` for `tasks[0].timeout`).
    let msg = match msg.split_once(": ") {
        Some((prefix, rest)) if !prefix.is_empty() && path.starts_with(prefix) => rest,
        _ => msg,
    };
    // serde_json stops at 128 levels of nesting with a bare "recursion limit exceeded".
    if msg == "recursion limit exceeded" {
        return "arrays and objects nested more than 128 levels deep".into();
    }
    msg.to_string()
}

pub use agent_runtime_core::names::{closest, suggestion};

/// "unknown tool `X` (did you mean `Y`?) (available: ...)": what a graph naming a tool the
/// runtime does not have is told, with or without a location.
pub fn unknown_tool(tool: &str, available: &[String]) -> String {
    format!(
        "unknown tool `{tool}`{} (available: {})",
        suggestion(tool, available.iter().map(String::as_str)),
        available.join(", ")
    )
}

/// Why `tool` is not among `available`: what `why_missing` says of it (a server that cannot be
/// reached), else that it is unknown.
pub fn missing_tool(
    tool: &str,
    available: &[String],
    why_missing: &dyn Fn(&str) -> Option<String>,
) -> String {
    match why_missing(tool) {
        Some(why) => format!("tool `{tool}` is not available now: {why}"),
        None => unknown_tool(tool, available),
    }
}

/// The error for field `tasks[i].FIELD` of task `id`, located in `text` (read from `file`) at
/// the task's `located_at` key: usually the field itself, or another key when the field is
/// absent (a missing `args` is shown at the step's `tool`).
fn task_error(
    (text, file): (&str, &Path),
    i: usize,
    field: &str,
    located_at: &str,
    message: String,
) -> GraphError {
    GraphError::Invalid {
        at: locate_field(text, file, &format!("tasks[{i}].{located_at}"), None),
        field: format!("tasks[{i}].{field}"),
        message,
    }
}

/// Where the field at `path` (`tasks[1].needs`) is written in `text`, found through the
/// parser (see [`crate::positions`]), or the nearest field around it that is written (the
/// task, for a field it lacks; the alias a task came from); with `item`, the item of that list
/// with this text (`fetc` in `needs: [fetch, fetc]`). 0:0 when not even the path's first key
/// is written (a graph built in code has no text).
fn locate_field(text: &str, file: &Path, path: &str, item: Option<&str>) -> Location {
    let positions = crate::positions::Positions::of(text);
    let (line, column) = match item {
        Some(item) => positions.find_item(path, item),
        None => positions.find(path),
    }
    .unwrap_or((0, 0));
    Location {
        file: file.to_path_buf(),
        line,
        column,
    }
}

/// The longest task id or agent name a new graph may have (ids are ASCII: bytes are
/// characters).
pub const MAX_ID_LEN: usize = 128;

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl TaskGraph {
    /// Every tool the graph's tasks may call, sorted: its tool steps' and its agents' (whose
    /// sub-tasks are agent tasks too), without the workforce's own `spawn_task`. What a runtime
    /// must offer for it to run: a host can start only the MCP servers these belong to.
    ///
    /// ```
    /// let g = agent_runtime_workforce::parse_graph(
    ///     "agents: { w: { model: p/m, tools: [files.read, echo, spawn_task] } }\n\
    ///      tasks: [ { id: a, tool: git.status }, { id: b, agent: w, prompt: go } ]",
    ///     std::path::Path::new("g.yaml"),
    /// ).unwrap();
    /// assert_eq!(g.tool_names(), ["echo", "files.read", "git.status"]);
    /// ```
    pub fn tool_names(&self) -> Vec<&str> {
        let steps = self.tasks.iter().filter_map(|t| match t.kind() {
            TaskKind::Tool { tool, .. } => Some(tool),
            TaskKind::Agent { .. } => None,
        });
        let agents = self
            .agents
            .values()
            .flat_map(|a| a.tools.iter().map(String::as_str));
        let all: BTreeSet<&str> = steps
            .chain(agents)
            .filter(|t| *t != crate::engine::SPAWN_TOOL)
            .collect();
        all.into_iter().collect()
    }

    /// Checks that every tool step names one of `available` (a runtime's tools), locating the
    /// first that does not in `text` (the graph's source, read from `file`), with the closest
    /// name as a suggestion. What `driver::check_available` also checks, without a location,
    /// when a run starts.
    pub fn check_tools_in(
        &self,
        text: &str,
        file: &Path,
        available: &[String],
    ) -> Result<(), GraphError> {
        self.check_tools_in_explained(text, file, available, &|_| None)
    }

    /// [`TaskGraph::check_tools_in`], where `why_missing` may say why a tool is not among
    /// `available` (see `driver::ToolInvoker::unavailable`: an MCP server that cannot be
    /// reached): the error then says so, instead of calling the tool unknown.
    pub fn check_tools_in_explained(
        &self,
        text: &str,
        file: &Path,
        available: &[String],
        why_missing: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), GraphError> {
        let unknown_tool =
            |tool: &str, available: &[String]| missing_tool(tool, available, why_missing);
        let known = |tool: &str| available.iter().any(|a| a == tool);
        for (i, t) in self.tasks.iter().enumerate() {
            if let TaskKind::Tool { tool, .. } = t.kind()
                && !known(tool)
            {
                return Err(task_error(
                    (text, file),
                    i,
                    "tool",
                    "tool",
                    unknown_tool(tool, available),
                ));
            }
        }
        let unknown_at = |path: &[&str], field: String, tool: &str| GraphError::Invalid {
            at: match path {
                // A tool in an agent's list: that item.
                ["agents", agent, "tools", item] => {
                    locate_field(text, file, &format!("agents.{agent}.tools"), Some(item))
                }
                _ => locate_field(text, file, &path.join("."), None),
            },
            field,
            message: unknown_tool(tool, available),
        };
        for (name, a) in &self.agents {
            if let Some(tool) = a
                .tools
                .iter()
                .find(|t| t.as_str() != crate::engine::SPAWN_TOOL && !known(t))
            {
                return Err(unknown_at(
                    &["agents", name, "tools", tool],
                    format!("agents.{name}.tools"),
                    tool,
                ));
            }
        }
        // A limit on a tool no step or agent can call limits nothing: most likely a typo.
        if let Some(tool) = self.limits.tools.keys().find(|t| !known(t)) {
            return Err(unknown_at(
                &["limits", "tools", tool],
                "limits.tools".into(),
                tool,
            ));
        }
        Ok(())
    }

    /// The names of the secrets the tool steps' arguments name (`{{ secrets.NAME }}`), each
    /// once, in byte order.
    pub fn secret_names(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for t in &self.tasks {
            if let (TaskKind::Tool { .. }, Some(args)) = (t.kind(), &t.args) {
                crate::template::for_each_secret(args, &mut |name| {
                    if !names.contains(name) {
                        names.insert(name.to_string());
                    }
                });
            }
        }
        names
    }

    /// Checks each `{{ secrets.NAME }}` of the tool steps' arguments with `check` (whether the
    /// run's secret source has a usable value), locating the first refused at the step's
    /// `args`. For a caller whose secrets are known before the run, as the command line's
    /// environment is; the run itself fails the call of a step whose secret is missing.
    pub fn check_secrets_in(
        &self,
        text: &str,
        file: &Path,
        mut check: impl FnMut(&str) -> Result<(), String>,
    ) -> Result<(), GraphError> {
        for (i, t) in self.tasks.iter().enumerate() {
            let (TaskKind::Tool { .. }, Some(args)) = (t.kind(), &t.args) else {
                continue;
            };
            let mut refused = None;
            crate::template::for_each_secret(args, &mut |name| {
                if refused.is_none() {
                    refused = check(name).err();
                }
            });
            if let Some(message) = refused {
                return Err(task_error((text, file), i, "args", "args", message));
            }
        }
        Ok(())
    }

    /// Checks that the model provider of every agent a task uses is configured
    /// (`has_provider`: the provider part of a route, before `/`), locating the first task whose
    /// agent's is not at its `agent` field. What `driver::check_available` also checks, without
    /// a location.
    pub fn check_models_in(
        &self,
        text: &str,
        file: &Path,
        has_provider: impl Fn(&str) -> bool,
    ) -> Result<(), GraphError> {
        for (i, t) in self.tasks.iter().enumerate() {
            let Some(name) = t.agent.as_deref() else {
                continue;
            };
            let Some(agent) = self.agents.get(name) else {
                continue;
            };
            let (provider, _) = crate::engine::split_route(&agent.model);
            if !has_provider(&provider) {
                return Err(task_error(
                    (text, file),
                    i,
                    "agent",
                    "agent",
                    format!(
                        "agent `{name}` routes to `{}`, and no model provider `{provider}` is configured",
                        agent.model
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The tool steps whose arguments are fixed in the graph: no `{{ tasks... }}` template and
    /// no `{{ secrets... }}` anywhere in them, so that they are sent as written. Each as (index,
    /// task id, tool, arguments); absent arguments are `null`, as the call gets them.
    pub fn fixed_tool_args(&self) -> impl Iterator<Item = (usize, &str, &str, &Value)> {
        const NO_ARGS: &Value = &Value::Null;
        self.tasks.iter().enumerate().filter_map(|(i, t)| {
            let TaskKind::Tool { tool, .. } = t.kind() else {
                return None;
            };
            let args = t.args.as_ref().unwrap_or(NO_ARGS);
            let mut templated = false;
            crate::template::for_each_ref(args, &mut |_| templated = true);
            (!templated && !crate::template::names_secrets(args)).then_some((
                i,
                t.id.as_str(),
                tool,
                args,
            ))
        })
    }

    /// Checks each tool step's fixed arguments (see [`TaskGraph::fixed_tool_args`]) with
    /// `check` (the tool's own check: `driver::ToolInvoker::check_args`), locating the first
    /// refused in `text` (the graph's source, read from `file`) at the step's `args` (its
    /// `tool` when it has none).
    pub fn check_args_in(
        &self,
        text: &str,
        file: &Path,
        mut check: impl FnMut(&str, &Value) -> Result<(), String>,
    ) -> Result<(), GraphError> {
        for (i, _, tool, args) in self.fixed_tool_args() {
            if let Err(message) = check(tool, args) {
                let (located_at, message) = if self.tasks[i].args.is_some() {
                    ("args", message)
                } else {
                    (
                        "tool",
                        format!("missing, and `{tool}` needs them: {message}"),
                    )
                };
                return Err(task_error((text, file), i, "args", located_at, message));
            }
        }
        Ok(())
    }

    /// Checks the graph without source text (errors have no line numbers).
    pub fn validate(&self) -> Result<(), GraphError> {
        self.validate_in("", Path::new("<graph>"))
    }

    /// Checks ids, references, task kinds, limits and cycles; `text` and `file` locate errors.
    pub fn validate_in(&self, text: &str, file: &Path) -> Result<(), GraphError> {
        self.checked(text, file, Checks::New)
    }

    /// Checks a graph read back from a run's log: only what the engine relies on (ids,
    /// references, task kinds, limits, cycles), not the checks that refuse authoring mistakes
    /// (a zero timeout, a template in `continue_with`, a fallback that could never run). Those
    /// were added after runs were recorded with such graphs, and a recorded run must stay
    /// replayable and resumable as it ran.
    pub fn validate_recorded(&self) -> Result<(), GraphError> {
        self.checked("", Path::new("<graph>"), Checks::Recorded)
    }

    fn checked(&self, text: &str, file: &Path, checks: Checks) -> Result<(), GraphError> {
        let authoring = checks == Checks::New;
        let invalid = |task: Option<(usize, &str)>, field: &str, message: String| {
            let fpath = match task {
                Some((i, _)) => format!("tasks[{i}].{field}"),
                None => field.to_string(),
            };
            GraphError::Invalid {
                at: locate_field(text, file, &fpath, None),
                field: fpath,
                message,
            }
        };
        if self.tasks.is_empty() {
            return Err(invalid(
                None,
                "tasks",
                "a graph needs at least one task".into(),
            ));
        }
        if self.limits.concurrency == 0 {
            return Err(invalid(
                None,
                "limits.concurrency",
                "must be at least 1".into(),
            ));
        }
        // A zero limit would hold every task that needs the tool or provider forever.
        for (scope, limits) in [
            ("limits.tools", &self.limits.tools),
            ("limits.providers", &self.limits.providers),
        ] {
            if let Some((name, _)) = limits.iter().find(|(_, v)| **v == 0) {
                return Err(invalid(
                    None,
                    scope,
                    format!("the limit of `{name}` must be at least 1"),
                ));
            }
        }
        if self.tasks.len() as u64 > u64::from(self.limits.max_tasks) {
            return Err(invalid(
                None,
                "limits.max_tasks",
                format!(
                    "the graph declares {} task{}, more than max_tasks {}",
                    self.tasks.len(),
                    if self.tasks.len() == 1 { "" } else { "s" },
                    self.limits.max_tasks
                ),
            ));
        }
        for (name, a) in &self.agents {
            if !valid_id(name) {
                return Err(invalid(
                    None,
                    "agents",
                    format!("invalid agent name {name:?}: use letters, digits, _ and -"),
                ));
            }
            if authoring && name.len() > MAX_ID_LEN {
                return Err(invalid(
                    None,
                    "agents",
                    format!(
                        "an agent name of {} characters: at most {MAX_ID_LEN}",
                        name.len()
                    ),
                ));
            }
            if a.concurrency == 0 || a.max_turns == 0 {
                return Err(invalid(
                    None,
                    &format!("agents.{name}"),
                    "concurrency and max_turns must be at least 1".into(),
                ));
            }
            if a.model.trim().is_empty() {
                return Err(invalid(
                    None,
                    &format!("agents.{name}.model"),
                    "the model route is empty".into(),
                ));
            }
            if let Err(e) = template::refuse_secrets(&a.instructions, "an agent's instructions") {
                return Err(invalid(None, &format!("agents.{name}.instructions"), e));
            }
        }
        let mut ids: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, t) in self.tasks.iter().enumerate() {
            if !valid_id(&t.id) {
                return Err(invalid(
                    Some((i, &t.id)),
                    "id",
                    format!("invalid task id {:?}: use letters, digits, _ and -", t.id),
                ));
            }
            // Ids are printed on every progress line and in every output: a long one is a
            // mistake (a pasted value). Recorded graphs of older builds keep theirs.
            if authoring && t.id.len() > MAX_ID_LEN {
                return Err(invalid(
                    Some((i, &t.id)),
                    "id",
                    format!(
                        "a task id of {} characters: at most {MAX_ID_LEN}",
                        t.id.len()
                    ),
                ));
            }
            if let Some(first) = ids.insert(&t.id, i) {
                // Located at the second task with the id, which is the one in error.
                return Err(GraphError::Invalid {
                    at: locate_field(text, file, &format!("tasks[{i}].id"), None),
                    field: format!("tasks[{i}].id"),
                    message: format!("duplicate task id `{}` (tasks[{first}] has it)", t.id),
                });
            }
        }
        let names = || ids.keys().copied();
        for (i, t) in self.tasks.iter().enumerate() {
            let at = Some((i, t.id.as_str()));
            match (&t.agent, &t.tool) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        at,
                        "tool",
                        "a task has either `agent` (agent task) or `tool` (tool step), not both"
                            .into(),
                    ));
                }
                (None, None) => {
                    return Err(invalid(
                        at,
                        "id",
                        "a task needs `agent` (agent task) or `tool` (tool step)".into(),
                    ));
                }
                (Some(agent), None) => {
                    if !self.agents.contains_key(agent) {
                        return Err(invalid(
                            at,
                            "agent",
                            format!(
                                "unknown agent `{agent}`{}",
                                suggestion(agent, self.agents.keys().map(String::as_str))
                            ),
                        ));
                    }
                    if t.args.is_some() {
                        return Err(invalid(
                            at,
                            "args",
                            "`args` belongs to tool steps; an agent task takes `prompt`".into(),
                        ));
                    }
                }
                (None, Some(tool)) => {
                    if tool.is_empty() {
                        return Err(invalid(at, "tool", "the tool name is empty".into()));
                    }
                    if t.prompt.is_some() {
                        return Err(invalid(
                            at,
                            "prompt",
                            "`prompt` belongs to agent tasks; a tool step takes `args`".into(),
                        ));
                    }
                }
            }
            for n in &t.needs {
                let needs_path = format!("tasks[{i}].needs");
                let item_at = || locate_field(text, file, &needs_path, Some(n));
                if !ids.contains_key(n.as_str()) {
                    return Err(GraphError::Invalid {
                        at: item_at(),
                        field: needs_path.clone(),
                        message: format!("unknown task `{n}`{}", suggestion(n, names())),
                    });
                }
                if n == &t.id {
                    return Err(GraphError::Cycle {
                        at: item_at(),
                        path: vec![n.clone(), n.clone()],
                    });
                }
            }
            if authoring && let Err((field, message)) = template::check_paths(t) {
                return Err(invalid(at, &field, message));
            }
            for r in t.template_refs() {
                if !ids.contains_key(r.as_str()) {
                    let field = if t.agent.is_some() { "prompt" } else { "args" };
                    return Err(invalid(
                        at,
                        field,
                        format!(
                            "template refers to unknown task `{r}`{}",
                            suggestion(&r, names())
                        ),
                    ));
                }
            }
            if let Err(e) = template::check(t) {
                let field = if t.agent.is_some() { "prompt" } else { "args" };
                return Err(invalid(at, field, e));
            }
            if authoring && let Some(e) = t.args.as_ref().and_then(template::template_in_key) {
                return Err(invalid(at, "args", e));
            }
            // `timeout: 0` often means "no limit" elsewhere; here it would end every attempt.
            if authoring && t.timeout == Some(Duration::ZERO) {
                return Err(invalid(
                    at,
                    "timeout",
                    "0 would end every attempt at once; leave `timeout` out for no limit".into(),
                ));
            }
            // Calls count time in whole milliseconds: less would be no time at all.
            if authoring && t.timeout.is_some_and(|d| d < Duration::from_millis(1)) {
                return Err(invalid(at, "timeout", "must be at least 1ms".into()));
            }
            if let Some(r) = &t.retry {
                if r.max_attempts == 0 {
                    return Err(invalid(
                        at,
                        "retry.max_attempts",
                        "must be at least 1".into(),
                    ));
                }
                if !(0.0..=1.0).contains(&r.jitter) {
                    return Err(invalid(
                        at,
                        "retry.jitter",
                        "must be between 0 and 1".into(),
                    ));
                }
            }
            if let OnFailure::ContinueWith(v) = &t.on_failure
                && authoring
            {
                let mut refs = std::collections::BTreeSet::new();
                template::collect_refs(v, &mut refs);
                if let Some(r) = refs.first() {
                    return Err(invalid(
                        at,
                        "on_failure",
                        format!(
                            "continue_with is used as written, so `{{{{ tasks.{r}... }}}}` would stay text; to stand in with another task's output, use {{ fallback: TASK }}"
                        ),
                    ));
                }
            }
            if let OnFailure::Fallback(f) = &t.on_failure {
                if !ids.contains_key(f.as_str()) {
                    return Err(invalid(
                        at,
                        "on_failure",
                        format!("unknown fallback task `{f}`{}", suggestion(f, names())),
                    ));
                }
                if f == &t.id {
                    return Err(invalid(
                        at,
                        "on_failure",
                        "a task cannot be its own fallback".into(),
                    ));
                }
            }
        }
        // Fallback tasks are held back until their task fails, so no task may wait for one.
        let deps = self.dependencies();
        let held = self.fallback_targets();
        for (i, d) in deps.iter().enumerate() {
            if let Some(&f) = d.iter().find(|f| held.contains(f)) {
                let task = &self.tasks[i];
                let fallback = &self.tasks[f].id;
                // The dependency is written in `needs`, or made by a template.
                let field = if task.needs.iter().any(|n| n == fallback) {
                    "needs"
                } else if task.agent.is_some() {
                    "prompt"
                } else {
                    "args"
                };
                let how = if field == "needs" {
                    String::new()
                } else {
                    format!(" (its {field} use `{{{{ tasks.{fallback}.output }}}}`)")
                };
                return Err(invalid(
                    Some((i, &task.id)),
                    field,
                    format!(
                        "`{fallback}` is a fallback task (it runs only when the task it stands in for fails), so no task can need it{how}"
                    ),
                ));
            }
        }
        if let Some(cycle) = find_cycle(&deps) {
            let first = cycle[0];
            let at = locate_field(text, file, &format!("tasks[{first}].needs"), None);
            // The search follows dependents; the path reads as the graph is written: each
            // task needs the next, starting where the error points.
            return Err(GraphError::Cycle {
                at,
                path: cycle
                    .iter()
                    .rev()
                    .map(|&i| self.tasks[i].id.clone())
                    .collect(),
            });
        }
        if authoring
            && !held.is_empty()
            && let Some((task, message)) = self.fallback_that_could_never_run(deps)
        {
            return Err(invalid(
                Some((task, &self.tasks[task].id)),
                "on_failure",
                message,
            ));
        }
        Ok(())
    }

    /// A task that failed waits for its fallback's output, so a fallback that waits (through
    /// its dependencies or its own fallback) for the task it stands in for could never run: the
    /// run would stall when that task fails, or, with fallbacks that stand in for each other,
    /// hold them all back and start none. Found as a cycle once each task also waits for its
    /// fallback; `waits`, the dependencies, are known to have none alone. Returns the task whose
    /// `on_failure` names such a fallback, and why.
    fn fallback_that_could_never_run(&self, mut waits: Vec<Vec<usize>>) -> Option<(usize, String)> {
        let ids = self.index();
        for (i, t) in self.tasks.iter().enumerate() {
            if let OnFailure::Fallback(f) = &t.on_failure
                && let Some(f) = ids.get(f)
            {
                waits[i].push(f as usize);
            }
        }
        let cycle = find_cycle(&waits)?;
        // The cycle reads in execution order: a task that waits for its fallback follows it.
        let fallback_of = |i: usize| match &self.tasks[i].on_failure {
            OnFailure::Fallback(f) => ids.get(f).map(|f| f as usize),
            OnFailure::FailRun | OnFailure::Skip | OnFailure::ContinueWith(_) => None,
        };
        let (fallback, task) = cycle
            .windows(2)
            .map(|w| (w[0], w[1]))
            .find(|&(f, t)| fallback_of(t) == Some(f))
            .unwrap_or((cycle[0], cycle[0]));
        let path: Vec<String> = cycle.iter().map(|&i| self.tasks[i].id.clone()).collect();
        Some((
            task,
            format!(
                "fallback `{}` could never run for `{}`: it waits for it, through dependencies and fallbacks ({})",
                self.tasks[fallback].id,
                self.tasks[task].id,
                cycle_path(&path)
            ),
        ))
    }

    /// For each task (by index), the indices of the tasks it depends on: `needs` plus template
    /// references, sorted and without repeats.
    pub fn dependencies(&self) -> Vec<Vec<usize>> {
        let lists = self.dependency_lists();
        (0..lists.len())
            .map(|i| lists.get(i).iter().map(|&u| u as usize).collect())
            .collect()
    }

    /// [`TaskGraph::dependencies`] as [`TaskLists`]: what the engine builds a run from.
    pub(crate) fn dependency_lists(&self) -> TaskLists {
        let ids = self.index();
        // Room for the `needs` (templates rarely add more): the array is not copied as it grows.
        let needs = self.tasks.iter().map(|t| t.needs.len()).sum();
        let mut lists = TaskLists::with_capacity(self.tasks.len(), needs);
        // One task's dependencies, sorted and deduplicated here before they join the lists.
        let mut one: Vec<u32> = Vec::new();
        for t in &self.tasks {
            one.clear();
            one.extend(t.needs.iter().filter_map(|n| ids.get(n)));
            t.for_each_template_ref(&mut |r| {
                if let Some(i) = ids.get(r) {
                    one.push(i);
                }
            });
            one.sort_unstable();
            one.dedup();
            lists.push(&one);
        }
        lists
    }

    /// Task id to index (the last task of an id, should ids repeat in a graph not validated).
    fn index(&self) -> IdIndex<'_> {
        let mut ids = IdIndex::default();
        // Room for short ids, the common case: only the table's control bytes are written now.
        ids.short.reserve(self.tasks.len());
        for (i, t) in self.tasks.iter().enumerate() {
            ids.insert(&t.id, i as u32);
        }
        ids
    }

    /// Indices of tasks that are some task's fallback (held back until needed).
    pub fn fallback_targets(&self) -> BTreeSet<usize> {
        let mut fallbacks = self.tasks.iter().filter_map(|t| match &t.on_failure {
            OnFailure::Fallback(f) => Some(f.as_str()),
            _ => None,
        });
        // Most graphs have no fallback: then no index is needed.
        let Some(first) = fallbacks.next() else {
            return BTreeSet::new();
        };
        let ids = self.index();
        std::iter::once(first)
            .chain(fallbacks)
            .filter_map(|f| ids.get(f).map(|i| i as usize))
            .collect()
    }
}

/// Task ids to indices. An id of at most 8 bytes (most are) is its own key, packed in a word:
/// a lookup then compares words, where keys of `&str` would each be followed into the graph's
/// strings, scattered in memory, a cache miss apiece in a graph of a hundred thousand tasks.
#[derive(Debug, Default)]
struct IdIndex<'a> {
    short: FastMap<u64, u32>,
    long: FastMap<&'a str, u32>,
}

impl<'a> IdIndex<'a> {
    /// The word of an id of at most 8 bytes without a NUL byte (which the zero padding would
    /// make ambiguous): its bytes, zero-padded.
    fn word(id: &str) -> Option<u64> {
        if id.len() > 8 || id.as_bytes().contains(&0) {
            return None;
        }
        let mut bytes = [0u8; 8];
        bytes[..id.len()].copy_from_slice(id.as_bytes());
        Some(u64::from_le_bytes(bytes))
    }

    fn insert(&mut self, id: &'a str, i: u32) {
        match Self::word(id) {
            Some(w) => self.short.insert(w, i),
            None => self.long.insert(id, i),
        };
    }

    fn get(&self, id: &str) -> Option<u32> {
        match Self::word(id) {
            Some(w) => self.short.get(&w),
            None => self.long.get(id),
        }
        .copied()
    }
}

/// One list of task indices per task, all in one array (compressed rows): a graph can hold a
/// hundred thousand tasks, and a vector per task cost an allocation each and several times the
/// memory, all of it fresh pages for the kernel to clear.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TaskLists {
    /// Where each task's list starts in `items`, then where the last one ends.
    starts: Vec<u32>,
    items: Vec<u32>,
}

impl TaskLists {
    fn with_capacity(tasks: usize, items: usize) -> Self {
        let mut starts = Vec::with_capacity(tasks + 1);
        starts.push(0);
        TaskLists {
            starts,
            items: Vec::with_capacity(items),
        }
    }

    /// Appends the list of the next task.
    fn push(&mut self, list: &[u32]) {
        self.items.extend_from_slice(list);
        self.starts.push(self.items.len() as u32);
    }

    /// Tasks listed.
    pub(crate) fn len(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }

    /// The list of task `i`; empty past the tasks listed.
    pub(crate) fn get(&self, i: usize) -> &[u32] {
        match (self.starts.get(i), self.starts.get(i + 1)) {
            (Some(&start), Some(&end)) => &self.items[start as usize..end as usize],
            _ => &[],
        }
    }

    /// The inverse lists: for each task, the tasks whose lists hold it, in increasing order.
    pub(crate) fn inverse(&self) -> TaskLists {
        let n = self.len();
        // Counting sort: sizes, then starts, then the items placed in task order.
        let mut starts = vec![0u32; n + 1];
        for &j in &self.items {
            starts[j as usize + 1] += 1;
        }
        for j in 0..n {
            starts[j + 1] += starts[j];
        }
        let mut next = starts.clone();
        let mut items = vec![0u32; self.items.len()];
        for i in 0..n {
            for &j in self.get(i) {
                items[next[j as usize] as usize] = i as u32;
                next[j as usize] += 1;
            }
        }
        TaskLists { starts, items }
    }
}

/// The digest recorded in `run.created`: BLAKE3 of the canonical JSON of a graph serialized
/// with `serde_json::to_value`.
pub fn digest_of_json(graph: &Value) -> String {
    digest_of_canonical(&agent_runtime_core::canonical_json(graph))
}

/// [`digest_of_json`] of a graph's canonical JSON, already written.
pub fn digest_of_canonical(graph_json: &[u8]) -> String {
    blake3::hash(graph_json).to_hex().to_string()
}

/// Finds a cycle in a dependency list; returns its task indices with the first repeated last.
fn find_cycle(deps: &[Vec<usize>]) -> Option<Vec<usize>> {
    // Iterative three-colour depth-first search, in index order for a deterministic answer.
    let n = deps.len();
    let mut colour = vec![0u8; n]; // 0 new, 1 on stack, 2 done
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for root in 0..n {
        if colour[root] != 0 {
            continue;
        }
        stack.push((root, 0));
        colour[root] = 1;
        while let Some(&mut (v, ref mut next)) = stack.last_mut() {
            if let Some(&w) = deps[v].get(*next) {
                *next += 1;
                match colour[w] {
                    0 => {
                        colour[w] = 1;
                        stack.push((w, 0));
                    }
                    1 => {
                        // The path from w to v on the stack, then w again. Dependencies point
                        // upstream, so reverse it to read in execution order.
                        let pos = stack.iter().position(|&(x, _)| x == w).unwrap_or(0);
                        let mut cycle: Vec<usize> = stack[pos..].iter().map(|&(x, _)| x).collect();
                        cycle.push(w);
                        cycle.reverse();
                        return Some(cycle);
                    }
                    _ => {}
                }
            } else {
                colour[v] = 2;
                stack.pop();
            }
        }
    }
    None
}

/// Topological rank of each task: the length of the longest dependency chain above it. (The
/// engine raises each task's rank as its dependencies complete instead.)
pub fn topo_ranks(deps: &[Vec<usize>]) -> Vec<u32> {
    let n = deps.len();
    let mut lists = TaskLists::with_capacity(n, deps.iter().map(Vec::len).sum());
    for d in deps {
        let d: Vec<u32> = d.iter().map(|&u| u as u32).collect();
        lists.push(&d);
    }
    let dependents = lists.inverse();
    let mut rank = vec![0u32; n];
    let mut waiting: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut queue: std::collections::VecDeque<usize> =
        (0..n).filter(|&i| waiting[i] == 0).collect();
    while let Some(u) = queue.pop_front() {
        for &v in dependents.get(u) {
            let v = v as usize;
            rank[v] = rank[v].max(rank[u] + 1);
            waiting[v] -= 1;
            if waiting[v] == 0 {
                queue.push_back(v);
            }
        }
    }
    rank
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TaskGraph, GraphError> {
        parse_graph(text, Path::new("flow.yaml"))
    }

    /// The error `text` (as `flow.yaml`) is refused with.
    fn refusal(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_format_follows_the_extension_then_the_text() {
        let yaml = "tasks:\n  - { id: a, tool: echo, args: {} }\n";
        let json = r#"{"tasks": [{"id": "a", "tool": "echo", "args": {}}]}"#;
        // `.json` is JSON: YAML in it is refused as JSON.
        let e = parse_graph(yaml, Path::new("g.json"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("g.json:1:"), "{e}");
        assert!(parse_graph(json, Path::new("g.JSON")).is_ok());
        // `.yaml` is YAML, even when it starts with `{` (a flow mapping).
        assert!(
            parse_graph(
                "{tasks: [{id: a, tool: echo, args: {}}]}",
                Path::new("g.yaml")
            )
            .is_ok()
        );
        assert!(parse_graph(json, Path::new("g.yml")).is_ok());
        // Other names (standard input): by the text.
        assert!(parse_graph(json, Path::new("<stdin>")).is_ok());
        assert!(parse_graph(yaml, Path::new("<stdin>")).is_ok());
        // A byte order mark is passed over, in both formats.
        for (text, file) in [(json, "bom.json"), (yaml, "bom.yaml"), (json, "<stdin>")] {
            let with_bom = format!("\u{feff}{text}");
            assert!(parse_graph(&with_bom, Path::new(file)).is_ok(), "{file}");
        }
        // Too large: judged by the format the name says.
        let big = format!(
            "\u{feff}{{\"tasks\": [], \"name\": \"{}\"}}",
            "x".repeat(MAX_YAML_GRAPH_BYTES)
        );
        let e = read_graph_source(big.as_bytes(), Path::new("big.json"));
        assert!(!matches!(e, Err(GraphError::TooLarge { .. })), "{e:?}");
        // An integer past 64 bits would be rounded: refused where it is.
        let e = parse_graph(
            "{\"tasks\": [{\"id\": \"a\", \"tool\": \"echo\", \"args\": {\"s\": \"99999999999999999999\", \"n\": 18446744073709551616}}]}",
            Path::new("g.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(
                "g.json:1:83: (top level): the integer 18446744073709551616 does not fit"
            ),
            "{e}"
        );
        for fine in [
            "18446744073709551615",
            "-9223372036854775808",
            "1e30",
            "1.5",
        ] {
            let text = format!(
                "{{\"tasks\": [{{\"id\": \"a\", \"tool\": \"echo\", \"args\": {{\"n\": {fine}}}}}]}}"
            );
            assert!(parse_graph(&text, Path::new("g.json")).is_ok(), "{fine}");
        }
        // Columns count characters, as the other errors' do.
        let e = parse_graph(
            "{\"name\": \"日本語\", \"tasks\": nope}",
            Path::new("u.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("u.json:1:27: "), "{e}");
        // A comment in JSON is named as such.
        for text in [
            "{\n  // the tasks\n  \"tasks\": []\n}\n",
            "{\"tasks\": [ /* none */ ]}",
            "{\"tasks\": [{\"id\": \"a\", \"tool\": \"echo\", \"args\": {\"t\": \"日本語日本語\"}}, // c\n]}",
            "{\"tasks\": [{\"id\": \"a\", \"tool\": \"echo\"}]} // the end\n",
        ] {
            let e = parse_graph(text, Path::new("g.json"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("JSON has no comments"), "{text}: {e}");
        }
        // Text after the graph is refused where it starts, from a file or standard input.
        for file in ["g.json", "<stdin>"] {
            for (after, column) in [
                ("{\"tasks\": [{\"id\": \"b\", \"tool\": \"fail\"}]}", 53),
                ("]]}", 53),
                (" trailing", 54),
            ] {
                let text = format!("{json}{after}\n");
                let e = parse_graph(&text, Path::new(file)).unwrap_err().to_string();
                assert!(
                    e.starts_with(&format!(
                        "{file}:1:{column}: (top level): text after the end"
                    )),
                    "{text}: {e}"
                );
            }
            // Whitespace after it is fine.
            assert!(parse_graph(&format!("{json}\n\n  \n"), Path::new(file)).is_ok());
        }
    }

    #[test]
    fn a_key_written_twice_in_a_mapping_is_refused() {
        let yaml = |text: &str| parse(text).map(|_| ()).map_err(|e| e.to_string());
        let json = |text: &str| {
            parse_graph(text, Path::new("g.json"))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        for (text, field, key) in [
            (
                "agents: {w: {model: a/b}, w: {model: c/d}}\ntasks:\n  - { id: t, agent: w, prompt: hi }\n",
                "agents",
                "w",
            ),
            (
                "limits: {tools: {sleep: 1, sleep: 5}}\ntasks:\n  - { id: t, tool: sleep, args: {ms: 1} }\n",
                "limits.tools",
                "sleep",
            ),
            (
                "tasks:\n  - { id: t, tool: echo, args: {x: 1, x: 2} }\n",
                "tasks[0].args",
                "x",
            ),
            (
                "tasks:\n  - id: t\n    tool: echo\n    args: {}\n    on_failure: {continue_with: {t: 1, t: 2}}\n",
                "tasks[0].on_failure.continue_with",
                "t",
            ),
            (
                "tasks:\n  - { id: t, tool: echo, args: {a: [{deep: 1, deep: 2}]} }\n",
                "tasks[0].args.a[0]",
                "deep",
            ),
        ] {
            let e = yaml(text).unwrap_err();
            assert!(
                e.contains(&format!("{field}: duplicate key `{key}`")),
                "{text}: {e}"
            );
        }
        // Located at the second one.
        let e = yaml("tasks:\n  - id: t\n    tool: echo\n    args: {}\n    args: { x: 1 }\n")
            .unwrap_err();
        assert!(
            e.starts_with("flow.yaml:5:5: tasks[0]: duplicate field `args`"),
            "{e}"
        );
        let e = yaml(
            "tasks:\n  - id: t\n    tool: echo\n    args:\n      x: 1\n      y: 2\n      x: 3\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("flow.yaml:7:7: tasks[0].args: duplicate key `x`"),
            "{e}"
        );
        let e = json(r#"{"tasks": [{"id": "t", "tool": "echo", "args": {"x": 1, "x": 2}}]}"#)
            .unwrap_err();
        assert!(
            e.starts_with("g.json:1:") && e.contains("tasks[0].args: duplicate key `x`"),
            "{e}"
        );
        // Keys as text, as the graph's values read them: `3.1` and `3.10` are two keys; `1`
        // and `"1"`, `.nan` and `".nan"`, `0x10` and `"0x10"` one each.
        assert!(yaml("tasks:\n  - { id: t, tool: echo, args: {3.1: old, 3.10: new} }\n").is_ok());
        for (a, b, key) in [
            (".nan", "\".nan\"", ".nan"),
            ("0x10", "\"0x10\"", "0x10"),
            ("~", "\"~\"", "~"),
        ] {
            let e = yaml(&format!(
                "tasks:\n  - {{ id: t, tool: echo, args: {{{a}: x, {b}: y}} }}\n"
            ))
            .unwrap_err();
            assert!(e.contains(&format!("duplicate key `{key}`")), "{a}: {e}");
        }
        // YAML's `1` and `"1"` are one key of a JSON object.
        let e = yaml("tasks:\n  - { id: t, tool: echo, args: {1: a, \"1\": b} }\n").unwrap_err();
        assert!(e.contains("duplicate key `1`"), "{e}");
        // YAML's NaN and infinities: no JSON number.
        for v in [".nan", ".inf", "-.inf"] {
            let e = yaml(&format!(
                "tasks:\n  - {{ id: t, tool: echo, args: {{x: {v}}} }}\n"
            ))
            .unwrap_err();
            assert!(
                e.contains("tasks[0].args.x: ") && e.contains("is no number JSON can hold"),
                "{e}"
            );
        }
        // The same key in two mappings is fine.
        assert!(yaml("tasks:\n  - { id: t, tool: echo, args: {y: {x: 1}, z: {x: 1}} }\n").is_ok());
    }

    #[test]
    fn ids_are_at_most_128_characters() {
        let task = |id: &str| format!("tasks:\n  - {{ id: {id}, tool: echo, args: {{}} }}\n");
        assert!(parse(&task(&"t".repeat(MAX_ID_LEN))).is_ok());
        let e = parse(&task(&"t".repeat(MAX_ID_LEN + 1)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a task id of 129 characters: at most 128"),
            "{e}"
        );
        let e = parse(&format!(
            "agents: {{ {}: {{ model: a/b }} }}\n{}",
            "w".repeat(200),
            task("t")
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("an agent name of 200 characters: at most 128"),
            "{e}"
        );
    }

    #[test]
    fn errors_quote_long_values_short() {
        let long = "x".repeat(200_000);
        for text in [
            format!("tasks: \"{long}\"\n"),
            format!("tasks:\n  - {{ id: a, tool: {long}, args: {{}} }}\n"),
            format!("tasks:\n  - {{ id: a, tool: echo, args: {{}}, needs: [{long}] }}\n"),
            format!(
                "tasks:\n  - {{ id: a, tool: echo, args: {{ t: \"{{{{ tasks.{long}.output }}}}\" }} }}\n"
            ),
        ] {
            let e = parse(&text)
                .and_then(|g| g.validate_in(&text, Path::new("flow.yaml")).map(|()| g))
                .and_then(|g| {
                    g.check_tools_in(&text, Path::new("flow.yaml"), &["echo".to_string()])
                        .map(|()| g)
                })
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(
                e.len() < 1000 && e.contains("characters)"),
                "{}",
                &e[..e.len().min(2000)]
            );
            assert!(e.starts_with("flow.yaml:"), "{}", &e[..200]);
        }
    }

    #[test]
    fn parses_yaml_with_every_feature() {
        let g = parse(
            r#"
name: demo
limits: { concurrency: 2, tools: { echo: 1 } }
agents:
  writer: { model: "test/echo", tools: [echo], max_turns: 3 }
tasks:
  - id: fetch
    tool: echo
    args: { text: hi }
    timeout: 2s
    retry: { max_attempts: 4, backoff: 10ms, on: [timeout, tool_error] }
    on_failure: skip
  - id: write
    agent: writer
    prompt: "Summarize {{ tasks.fetch.output.text }}"
    on_failure: { continue_with: "none" }
  - id: alt
    tool: echo
    args: {}
  - id: last
    tool: echo
    needs: [write]
    args: { a: 1 }
    on_failure: { fallback: alt }
"#,
        )
        .unwrap();
        assert_eq!(g.tasks.len(), 4);
        assert_eq!(g.tasks[0].timeout, Some(Duration::from_secs(2)));
        assert_eq!(g.tasks[0].on_failure, OnFailure::Skip);
        assert_eq!(
            g.tasks[1].on_failure,
            OnFailure::ContinueWith(Value::String("none".into()))
        );
        assert_eq!(g.tasks[3].on_failure, OnFailure::Fallback("alt".into()));
        assert_eq!(g.dependencies()[1], vec![0]);
    }

    #[test]
    fn syntax_errors_name_line_column_and_field() {
        let e = refusal("tasks:\n  - id: a\n    tool: echo\n    nedds: [b]\n");
        assert!(e.starts_with("flow.yaml:4:"), "{e}");
        assert!(e.contains("tasks[0]"), "{e}");
        assert!(e.contains("nedds"), "{e}");
        let e = refusal("tasks:\n  - id: a\n    tool: echo\n    timeout: soon\n");
        // The field once: the YAML parser's own path (`tasks[0]`) is not repeated. And at the
        // field's line: the parser points at the task's mapping, two lines up.
        assert!(
            e.starts_with("flow.yaml:4:5: tasks[0].timeout: invalid duration \"soon\""),
            "{e}"
        );
        let e = refusal("tasks:\n  - id: a\n    tool: echo\n    args: {}\n    on_failure: maybe\n");
        assert!(
            e.starts_with("flow.yaml:5:5: tasks[0].on_failure: unknown policy `maybe`"),
            "{e}"
        );
        let e = refusal("tasks:\n  - { id: a, tool: echo, on_failure: maybe }\n");
        assert!(e.starts_with("flow.yaml:2:26: tasks[0].on_failure"), "{e}");
        let e = refusal("tasks:\n  - &t { id: a, tool: echo }\n  - <<: *t\n    id: b\n");
        assert!(
            e.contains("YAML merge keys (`<<: *anchor`) are not read here"),
            "{e}"
        );
        let e = refusal("tasks:\n  - { id: a, tool: echo, on_failure: { skip: true } }\n");
        assert!(
            e.contains("tasks[0].on_failure: `skip` takes no value: write `on_failure: skip`"),
            "{e}"
        );
    }

    /// Deeply nested YAML is refused before the parser sees it (the parser's time grows with
    /// the square of the depth), at the first bracket past the bound; brackets that stay
    /// within it, in strings too, are fine.
    #[test]
    fn deep_yaml_nesting_is_refused_before_parsing() {
        let deep = format!(
            "tasks:\n  - id: t\n    tool: echo\n    args: {{x: {}{}}}\n",
            "[".repeat(5_000),
            "]".repeat(5_000)
        );
        let e = parse(&deep).unwrap_err();
        let GraphError::Syntax { at, message, .. } = &e else {
            panic!("{e:?}")
        };
        // `    args: {x: ` puts the map's brace at column 11 of line 4 (level 1) and the first
        // `[` at column 15, so level 257 is the 256th `[`, at column 15 + 255.
        assert_eq!((at.line, at.column), (4, 15 + 255), "{e}");
        assert!(message.contains("nested more than 256 levels"), "{e}");
        let fine =
            "tasks:\n  - id: t\n    tool: echo\n    args: {x: \"[[[[[[[[[[\", y: [[[[1]]]]}\n";
        let g = parse(fine).unwrap();
        assert_eq!(
            g.tasks[0].args.as_ref().unwrap()["y"],
            serde_json::json!([[[[1]]]])
        );
    }

    /// serde reads a struct from an array of its fields in order; a JSON graph must not: `limits:
    /// [4]` ran with a concurrency of 4. Refused where written, as YAML refuses it; arrays where
    /// the schema has them (needs, retry classes, argument values) still read.
    #[test]
    fn a_json_array_in_place_of_an_object_is_refused_where_it_is() {
        let at = |text: &str| {
            let e = parse_graph(text, Path::new("flow.json")).unwrap_err();
            let GraphError::Syntax { at, field, message } = &e else {
                panic!("{e:?}")
            };
            assert!(message.contains("an array where an object belongs"), "{e}");
            (field.clone(), at.line, at.column)
        };
        assert_eq!(
            at(r#"{"limits": [4], "tasks": [{"id": "a", "tool": "echo"}]}"#),
            ("limits".into(), 1, 2)
        );
        assert_eq!(
            at("{\"tasks\": [\n  {\"id\": \"a\", \"tool\": \"echo\"},\n  [\"b\", null, null]\n]}"),
            ("tasks[1]".into(), 3, 3)
        );
        assert_eq!(
            at(r#"{"tasks": [{"id": "a", "tool": "echo", "retry": [3]}]}"#).0,
            "tasks[0].retry"
        );
        assert_eq!(
            at(r#"{"limits": {"budget": [1, 2]}, "tasks": [{"id": "a", "tool": "echo"}]}"#).0,
            "limits.budget"
        );
        assert_eq!(
            at(r#"{"agents": {"w": ["do it"]}, "tasks": [{"id": "a", "agent": "w"}]}"#).0,
            "agents.w"
        );
        // An array for a string: the types say what belongs there.
        let e = parse_graph(
            r#"{"tasks": [{"id": "b", "tool": "echo"}, {"id": "a", "tool": "echo", "on_failure": {"fallback": ["b"]}}]}"#,
            Path::new("flow.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tasks[1].on_failure: fallback must name a task"),
            "{e}"
        );
        assert_eq!(at(r#"[{"id": "a", "tool": "echo"}]"#).0, "(top level)");
        let fine = r#"{"tasks": [{"id": "a", "tool": "echo", "args": {"x": [[1], {"y": []}]},
            "retry": {"max_attempts": 2, "on": ["timeout"]}},
            {"id": "b", "tool": "echo", "needs": ["a"], "on_failure": {"continue_with": [1, 2]}}]}"#;
        let g = parse_graph(fine, Path::new("flow.json")).unwrap();
        assert_eq!(g.tasks[1].needs, vec!["a".to_string()]);
    }

    /// A JSON graph nested past serde_json's limit says so, with a field path cut short
    /// rather than a hundred levels of `[0]`.
    #[test]
    fn deep_json_nesting_is_refused_with_a_short_path() {
        let deep = format!(
            r#"{{"tasks":[{{"id":"t","tool":"echo","args":{{"x":{}{}}}}}]}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let e = parse_graph(&deep, Path::new("flow.json")).unwrap_err();
        let GraphError::Syntax { field, message, .. } = &e else {
            panic!("{e:?}")
        };
        assert!(field.starts_with("tasks[0].args.x[0][0]"), "{field}");
        assert!(field.ends_with(" more)"), "{field}");
        assert!(field.len() < 60, "{field}");
        assert!(message.contains("nested more than 128 levels"), "{e}");
        // Paths within the bound are shown whole.
        let e = parse_graph(
            r#"{"tasks":[{"id":"t","tool":"echo","timeout":"soon"}]}"#,
            Path::new("flow.json"),
        )
        .unwrap_err();
        let GraphError::Syntax { field, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(field, "tasks[0].timeout");
    }

    /// Graphs over the size limits are refused with the limit and what to do; a file is read
    /// only up to the limit.
    #[test]
    fn oversized_graphs_are_refused() {
        let mut yaml = String::from("tasks:\n  - id: t\n    tool: echo\n# ");
        yaml.push_str(&"x".repeat(MAX_YAML_GRAPH_BYTES));
        let e = parse(&yaml).unwrap_err();
        assert!(
            matches!(e, GraphError::TooLarge { format: "YAML", .. }),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains("flow.yaml is over 4 MiB") && text.contains("as JSON"),
            "{text}"
        );
        // The same size as JSON is within its limit (and fails on what it says instead).
        let json = format!(
            "{{\"tasks\": [], \"name\": \"{}\"}}",
            "x".repeat(MAX_YAML_GRAPH_BYTES)
        );
        assert!(!matches!(
            parse_graph(&json, Path::new("flow.json")),
            Err(GraphError::TooLarge { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.json");
        let mut big = String::from("{\"tasks\": [], \"name\": \"");
        big.push_str(&"x".repeat(MAX_GRAPH_BYTES));
        big.push_str("\"}");
        std::fs::write(&path, &big).unwrap();
        let e = load_graph(&path).unwrap_err();
        assert!(
            matches!(
                e,
                GraphError::TooLarge {
                    format: "JSON",
                    limit: MAX_GRAPH_BYTES,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("big.json is over 16 MiB"), "{e}");
        // Two-byte characters, so that with one prefix or the other the read stops inside
        // one: still "too large", not "not UTF-8".
        for prefix in ["{\"name\": \"", " {\"name\": \""] {
            let mut big = String::from(prefix);
            big.push_str(&"é".repeat(MAX_GRAPH_BYTES / 2 + 1));
            big.push_str("\"}");
            std::fs::write(&path, &big).unwrap();
            let e = load_graph(&path).unwrap_err();
            assert!(
                matches!(e, GraphError::TooLarge { format: "JSON", .. }),
                "{e:?}"
            );
        }
    }

    /// Only arguments sent as written are checked before a run: templated ones and ones naming
    /// secrets wait for the call. A refusal is located at the step's `args`, or at its `tool`
    /// when it has none.
    #[test]
    fn fixed_tool_arguments_are_checked_and_located() {
        let text = "tasks:\n  - { id: a, tool: echo, args: { text: hi } }\n  - id: b\n    tool: sleep\n    args: { ms: soon }\n  - { id: c, tool: sleep, args: { ms: '{{ tasks.a.output.text }}' } }\n  - { id: d, tool: sleep, args: { ms: '{{ secrets.MS }}' } }\n  - id: e\n    tool: sleep\n";
        let g = parse_graph(text, Path::new("t.yaml")).unwrap();
        let fixed: Vec<(usize, &str)> = g.fixed_tool_args().map(|(i, id, ..)| (i, id)).collect();
        assert_eq!(fixed, [(0, "a"), (1, "b"), (4, "e")]);
        // A check that refuses every `sleep` whose `ms` is not a number.
        let mut seen = Vec::new();
        let check = |tool: &str, args: &Value| {
            seen.push(tool.to_string());
            match (tool, args.get("ms")) {
                ("sleep", Some(v)) if !v.is_u64() => Err(format!("ms is {v}, not a number")),
                ("sleep", None) => Err("ms is missing".to_string()),
                _ => Ok(()),
            }
        };
        let e = g
            .check_args_in(text, Path::new("t.yaml"), check)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "t.yaml:5:5: tasks[1].args: ms is \"soon\", not a number");
        assert_eq!(seen, ["echo", "sleep"], "stops at the first refusal");
        let without_b = text.replace("    args: { ms: soon }\n", "    args: { ms: 5 }\n");
        let g = parse_graph(&without_b, Path::new("t.yaml")).unwrap();
        let e = g
            .check_args_in(&without_b, Path::new("t.yaml"), |tool, args| {
                check_ms(tool, args)
            })
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "t.yaml:9:5: tasks[4].args: missing, and `sleep` needs them: ms is missing"
        );
        fn check_ms(tool: &str, args: &Value) -> Result<(), String> {
            match (tool, args.get("ms")) {
                ("sleep", None) => Err("ms is missing".to_string()),
                _ => Ok(()),
            }
        }
    }

    /// Each secret a tool step names is checked, in order; GitHub Actions' `${{ secrets.X }}`
    /// is text, not one of ours. The first refused is located at its step's `args`.
    #[test]
    fn named_secrets_are_checked_and_located() {
        let text = "tasks:\n  - { id: a, tool: echo, args: { ci: '${{ secrets.GH }}' } }\n  - id: b\n    tool: echo\n    args: { auth: 'Bearer {{ secrets.TOKEN }}', more: ['{{ secrets.KEY }}'] }\n";
        let g = parse_graph(text, Path::new("t.yaml")).unwrap();
        let mut asked = Vec::new();
        let e = g
            .check_secrets_in(text, Path::new("t.yaml"), |name| {
                asked.push(name.to_string());
                if name == "KEY" {
                    Err(format!("secret `{name}` is not set"))
                } else {
                    Ok(())
                }
            })
            .unwrap_err()
            .to_string();
        assert_eq!(asked, ["TOKEN", "KEY"]);
        assert_eq!(e, "t.yaml:5:5: tasks[1].args: secret `KEY` is not set");
    }

    /// A task whose agent routes to a provider that is not configured is located at its
    /// `agent` field; tasks of agents whose provider is configured pass.
    #[test]
    fn an_agent_without_its_provider_is_located() {
        let text = "agents:\n  w: { model: local/m }\n  r: { model: openai/gpt }\ntasks:\n  - { id: a, agent: w, prompt: hi }\n  - id: b\n    agent: r\n    prompt: hi\n";
        let g = parse_graph(text, Path::new("t.yaml")).unwrap();
        let e = g
            .check_models_in(text, Path::new("t.yaml"), |p| p == "local")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "t.yaml:7:5: tasks[1].agent: agent `r` routes to `openai/gpt`, and no model provider `openai` is configured"
        );
        assert!(
            g.check_models_in(text, Path::new("t.yaml"), |p| p == "local" || p == "openai")
                .is_ok()
        );
    }

    /// An unknown tool is located at the task's `tool` field, with the closest name.
    #[test]
    fn an_unknown_tool_is_located() {
        let text = "tasks:\n  - { id: a, tool: echo }\n  - id: b\n    tool: ecoh\n";
        let g = parse_graph(text, Path::new("t.yaml")).unwrap();
        let tools = vec!["echo".to_string(), "sleep".to_string()];
        let e = g
            .check_tools_in(text, Path::new("t.yaml"), &tools)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "t.yaml:4:5: tasks[1].tool: unknown tool `ecoh` (did you mean `echo`?) (available: echo, sleep)"
        );
        assert!(
            g.check_tools_in(text, Path::new("t.yaml"), &["echo".into(), "ecoh".into()])
                .is_ok()
        );

        // An agent's tool and a tool's limit, located where they are written.
        let tools = vec!["echo".to_string(), "read_file".to_string()];
        let check = |text: &str| {
            parse_graph(text, Path::new("t.yaml"))
                .unwrap()
                .check_tools_in(text, Path::new("t.yaml"), &tools)
                .map_err(|e| e.to_string())
        };
        let e = check(
            "limits:\n  tools: { echo: 1 }\nagents:\n  w:\n    model: a/b\n    tools: [echo, spawn_task, read_fil]\ntasks:\n  - { id: a, agent: w, prompt: hi }\n",
        )
        .unwrap_err();
        assert_eq!(
            e,
            "t.yaml:6:31: agents.w.tools: unknown tool `read_fil` (did you mean `read_file`?) (available: echo, read_file)"
        );
        let e = check("limits: { tools: { ecoh: 1 } }\ntasks:\n  - { id: a, tool: echo }\n")
            .unwrap_err();
        assert_eq!(
            e,
            "t.yaml:1:20: limits.tools: unknown tool `ecoh` (did you mean `echo`?) (available: echo, read_file)"
        );
        check("limits: { tools: { echo: 1 } }\ntasks:\n  - { id: a, tool: echo }\n").unwrap();
    }

    /// A file that is not UTF-8 (saved as Latin-1, say) is refused at its first bad byte, by
    /// line and column, like any other syntax error.
    #[test]
    fn a_graph_that_is_not_utf8_names_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latin1.yaml");
        let mut bytes = "tasks:\n  - { id: caf".as_bytes().to_vec();
        bytes.push(0xe9); // é in Latin-1
        bytes.extend_from_slice(b", tool: echo }\n");
        std::fs::write(&path, &bytes).unwrap();
        let e = load_graph(&path).unwrap_err();
        assert!(matches!(e, GraphError::Syntax { .. }), "{e:?}");
        assert!(
            e.to_string().ends_with(
                "latin1.yaml:2:14: (top level): not UTF-8 text (byte 0xe9); save the file as UTF-8"
            ),
            "{e}"
        );
        // Columns count characters: a valid two-byte character before the bad byte is one.
        std::fs::write(&path, b"name: \xc3\xa9\xff\n").unwrap();
        let e = load_graph(&path).unwrap_err().to_string();
        assert!(e.contains("latin1.yaml:1:8: "), "{e}");
    }

    #[test]
    fn json_errors_have_positions_too() {
        let e = parse_graph(
            "{\"tasks\": [{\"id\": \"a\", \"tool\": 5}]}",
            Path::new("f.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("f.json:1:"), "{e}");
        assert!(e.contains("tasks[0].tool"), "{e}");
    }

    /// Errors found after reading are placed by the field's path through the parser, not by
    /// searching the text for something that looks like it.
    #[test]
    fn errors_are_placed_by_path_not_by_text() {
        // The first task's `timeout` comes before its id; the second task has one too.
        let e = refusal(
            "tasks:\n  - timeout: 0s\n    id: b\n    tool: echo\n  - id: c\n    tool: echo\n    timeout: 1s\n",
        );
        assert!(e.starts_with("flow.yaml:2:5: tasks[0].timeout: "), "{e}");
        // Minified JSON, as a program writes it.
        let json =
            r#"{"tasks":[{"id":"a","tool":"echo"},{"id":"b","tool":"echo","needs":["zz"]}]}"#;
        let e = parse_graph(json, Path::new("g.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("g.json:1:69: tasks[1].needs: unknown task `zz`"),
            "{e}"
        );
        // Extra spaces after `id:`.
        let e = refusal("tasks:\n  - id:    a\n    tool: echo\n    needs: [zz]\n");
        assert!(e.starts_with("flow.yaml:4:13: "), "{e}");
        // A task written twice through an alias: the alias.
        let e = refusal("tasks:\n  - &t\n    id: a\n    tool: echo\n  - *t\n");
        assert!(
            e.starts_with("flow.yaml:5:5: tasks[1].id: duplicate task id"),
            "{e}"
        );
        // Columns count characters, not bytes.
        let e = refusal("tasks:\n  - { id: a, tool: echo, args: {t: 日本語}, needs: [zz] }\n");
        assert!(e.starts_with("flow.yaml:2:50: "), "{e}");
    }

    #[test]
    fn unknown_reference_suggests_the_closest_name() {
        let e = parse(
            "tasks:\n  - id: fetch\n    tool: echo\n  - id: b\n    tool: echo\n    needs: [fetc]\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "flow.yaml:6:13: tasks[1].needs: unknown task `fetc` (did you mean `fetch`?)"
        );
        let e = parse("tasks:\n  - id: fetch\n    tool: echo\n  - id: b\n    tool: echo\n    args: { x: \"{{ tasks.fech.output }}\" }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown task `fech` (did you mean `fetch`?)"),
            "{e}"
        );
        let e =
            parse("agents: { writer: { model: a/b } }\ntasks:\n  - id: x\n    agent: writter\n")
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("unknown agent `writter` (did you mean `writer`?)"),
            "{e}"
        );
        assert!(e.starts_with("flow.yaml:4:5"), "{e}");
    }

    #[test]
    fn a_zero_timeout_is_refused() {
        for t in ["0", "0s", "0ms"] {
            let e = parse(&format!(
                "tasks:\n  - id: a\n    tool: sleep\n    args: {{ ms: 10 }}\n    timeout: {t}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.starts_with("flow.yaml:5:5: tasks[0].timeout: 0 would end every attempt at once"),
                "{e}"
            );
        }
        parse("tasks:\n  - { id: a, tool: sleep, args: { ms: 10 }, timeout: 1ms }\n").unwrap();
        let e = parse("tasks:\n  - { id: a, tool: sleep, args: { ms: 10 }, timeout: 100us }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tasks[0].timeout: must be at least 1ms"), "{e}");
    }

    /// A space or a filter inside a template's path would look up a field of that name and
    /// render `null`: refused where it is written.
    #[test]
    fn template_paths_with_spaces_or_filters_are_refused() {
        for (template, field, says) in [
            (
                "{{ tasks.a.output.x | upper }}",
                "args.v",
                "has a filter (`|`)",
            ),
            (
                "{{ tasks.a.output.arr. 1 }}",
                "args.v",
                "has a space inside its path (` 1`)",
            ),
            (
                "{{ tasks. a .output }}",
                "args.v",
                "has a space inside its path (` a `)",
            ),
        ] {
            let e = parse(&format!(
                "tasks:\n  - {{ id: a, tool: echo, args: {{}} }}\n  - id: b\n    tool: echo\n    args:\n      v: \"{template}\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.starts_with("flow.yaml:6:7: "), "{e}");
            assert!(e.contains(&format!("tasks[1].{field}: ")), "{e}");
            assert!(e.contains(says), "{e}");
        }
        let e = parse(
            "agents: {w: {model: m/x}}\ntasks:\n  - { id: a, tool: echo, args: {} }\n  - { id: b, agent: w, prompt: \"say {{ tasks.a.output.text|x }}\" }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tasks[1].prompt: ") && e.contains("filter"),
            "{e}"
        );
        // Spaces around the whole template are fine.
        parse("tasks:\n  - { id: a, tool: echo, args: {} }\n  - { id: b, tool: echo, args: { v: \"{{tasks.a.output.x}} {{  tasks.a.output  }}\" } }\n").unwrap();
    }

    /// `continue_with` is a value used as written: a template in it is refused rather than
    /// recorded as the task's output, text and all.
    #[test]
    fn a_template_in_continue_with_is_refused() {
        let e = parse(
            "tasks:\n  - { id: src, tool: echo, args: { v: 1 } }\n  - { id: a, tool: fail, args: {}, on_failure: { continue_with: { got: '{{ tasks.src.output.v }}' } } }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tasks[1].on_failure: continue_with is used as written, so `{{ tasks.src... }}` would stay text"),
            "{e}"
        );
        // Other braces are text, as in arguments.
        parse("tasks:\n  - { id: a, tool: fail, args: {}, on_failure: { continue_with: '{{ other }}' } }\n").unwrap();
    }

    /// A second YAML document is refused where it starts.
    #[test]
    fn a_second_yaml_document_is_located() {
        let e = parse_graph(
            "# flow\n---\ntasks: [{ id: a, tool: echo }]\n---\ntasks: []\n",
            Path::new("t.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("t.yaml:4:1: (top level): "), "{e}");
        assert!(e.contains("more than one document"), "{e}");
    }

    /// Where the parser stopped before a key (a cut file, a trailing comma), the field is the
    /// last one known, not `?`.
    #[test]
    fn a_cut_json_file_names_the_last_known_field() {
        let e = parse_graph(
            r#"{"tasks": [{"id": "a", "tool": "echo""#,
            Path::new("t.json"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "t.json:1:37: tasks[0]: EOF while parsing an object");
        let e = parse_graph(
            r#"{"tasks": [{"id": "a", "tool": "echo"}], }"#,
            Path::new("t.json"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "t.json:1:42: (top level): trailing comma");
    }

    /// Fallbacks that could never run are refused before a run, where they would stall it.
    #[test]
    fn fallbacks_that_could_never_run_are_refused() {
        let fails = "tool: fail, args: { message: m }";
        let refused = |tasks: &str| parse(&format!("tasks:\n{tasks}")).unwrap_err().to_string();
        let e = refused(&format!(
            "  - {{ id: a, {fails}, on_failure: {{ fallback: a }} }}\n"
        ));
        assert!(
            e.contains("tasks[0].on_failure: a task cannot be its own fallback"),
            "{e}"
        );
        let e = refused(&format!(
            "  - {{ id: a, {fails}, on_failure: {{ fallback: b }} }}\n  - {{ id: b, tool: echo, args: {{}} }}\n  - {{ id: c, tool: echo, needs: [b], args: {{}} }}\n"
        ));
        assert!(e.contains("tasks[2].needs: `b` is a fallback task"), "{e}");
        // Needed through a template: named as that, not as a `needs` nobody wrote.
        let e = refused(&format!(
            "  - {{ id: a, {fails}, on_failure: {{ fallback: b }} }}\n  - {{ id: b, tool: echo, args: {{}} }}\n  - {{ id: c, tool: echo, args: {{ v: '{{{{ tasks.b.output }}}}' }} }}\n"
        ));
        assert!(
            e.contains("tasks[2].args: `b` is a fallback task")
                && e.contains("(its args use `{{ tasks.b.output }}`)"),
            "{e}"
        );
        // The fallback needs the task it stands in for: directly, through a template, or
        // through another task.
        for b in [
            "{ id: b, tool: echo, needs: [a], args: {} }",
            "{ id: b, tool: echo, args: { text: '{{ tasks.a.output.text }}' } }",
            "{ id: b, tool: echo, needs: [c], args: {} }\n  - { id: c, tool: echo, needs: [a], args: {} }",
        ] {
            let e = refused(&format!(
                "  - {{ id: a, {fails}, on_failure: {{ fallback: b }} }}\n  - {b}\n"
            ));
            assert!(
                e.starts_with("flow.yaml:2:48: tasks[0].on_failure: fallback `b` could never run for `a`: it waits for it"),
                "{e}"
            );
            assert!(
                e.contains("(a -> b -> a)") || e.contains("(a -> c -> b -> a)"),
                "{e}"
            );
        }
        // Fallbacks that stand in for each other: both held back, neither would ever start.
        let e = refused(&format!(
            "  - {{ id: a, {fails}, on_failure: {{ fallback: b }} }}\n  - {{ id: b, {fails}, on_failure: {{ fallback: a }} }}\n"
        ));
        assert!(e.contains("on_failure: fallback `"), "{e}");
        assert!(e.contains("could never run"), "{e}");
        // A chain of fallbacks is fine, and so is a fallback that needs another task.
        parse(&format!(
            "tasks:\n  - {{ id: a, {fails}, on_failure: {{ fallback: b }} }}\n  - {{ id: b, {fails}, needs: [d], on_failure: {{ fallback: c }} }}\n  - {{ id: c, tool: echo, args: {{}} }}\n  - {{ id: d, tool: echo, args: {{}} }}\n"
        ))
        .unwrap();
    }

    #[test]
    fn cycles_are_named_as_paths() {
        let e = parse(
            "tasks:\n  - { id: a, tool: echo, needs: [c] }\n  - { id: b, tool: echo, needs: [a] }\n  - { id: c, tool: echo, needs: [b] }\n",
        )
        .unwrap_err();
        match &e {
            GraphError::Cycle { path, at } => {
                assert_eq!(path.first(), path.last());
                assert_eq!(path.len(), 4);
                assert!(at.line >= 2);
            }
            other => panic!("{other}"),
        }
        assert!(
            e.to_string()
                .contains("dependency cycle a -> c -> b -> a (each task needs the next)"),
            "{e}"
        );
        let e =
            parse("tasks:\n  - { id: z, tool: echo }\n  - { id: a, tool: echo, needs: [z, a] }\n")
                .unwrap_err()
                .to_string();
        assert!(e.starts_with("flow.yaml:3:"), "{e}");
        assert!(e.ends_with("tasks: task `a` needs itself"), "{e}");
        // A long cycle keeps its ends, and its full path stays in the error's field.
        let mut yaml = "tasks:\n".to_string();
        for i in 0..1000 {
            yaml.push_str(&format!(
                "  - {{ id: t{i}, tool: echo, needs: [t{}] }}\n",
                (i + 1) % 1000
            ));
        }
        let e = parse(&yaml).unwrap_err();
        let text = e.to_string();
        assert!(text.len() < 300, "{text}");
        assert!(text.contains(" -> ... (985 more) ... -> "), "{text}");
        assert!(matches!(&e, GraphError::Cycle { path, .. } if path.len() == 1001));
    }

    #[test]
    fn task_kind_errors() {
        let e = parse("tasks:\n  - { id: a }\n").unwrap_err().to_string();
        assert!(e.contains("needs `agent`"), "{e}");
        let e = parse("tasks:\n  - { id: a, tool: x, needs: [a] }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("task `a` needs itself"), "{e}");
        let e = parse("tasks:\n  - { id: a, tool: x }\n  - { id: a, tool: x }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":3:") && e.contains("tasks[1].id: duplicate task id `a` (tasks[0] has it)"),
            "{e}"
        );
        let e = parse("limits: { tools: { x: 0 } }\ntasks:\n  - { id: a, tool: x }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("limits.tools") && e.contains("`x` must be at least 1"),
            "{e}"
        );
    }

    #[test]
    fn ranks_follow_the_longest_chain() {
        let deps = vec![vec![], vec![0], vec![0, 1], vec![]];
        assert_eq!(topo_ranks(&deps), vec![0, 1, 2, 0]);
    }

    #[test]
    fn ids_short_and_long_find_their_tasks() {
        let ids = ["a", "abcdefgh", "abcdefghi", "abcdefgh\0", "a\0", "é", ""];
        let mut index = IdIndex::default();
        for (i, id) in ids.iter().enumerate() {
            index.insert(id, i as u32);
        }
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(index.get(id), Some(i as u32), "{id:?}");
        }
        assert_eq!(index.get("abcdefg"), None);
        assert_eq!(index.get("abcdefghij"), None);
    }

    #[test]
    fn dependency_lists_and_their_inverse() {
        let g = parse(
            "tasks:\n  - { id: a, tool: echo }\n  - { id: b, tool: echo, needs: [a, a] }\n  - { id: c, tool: echo, needs: [b], args: { x: '{{ tasks.a.output }}' } }\n",
        )
        .unwrap();
        let deps = g.dependency_lists();
        assert_eq!(
            (deps.get(0), deps.get(1), deps.get(2)),
            (&[][..], &[0][..], &[0, 1][..])
        );
        let dependents = deps.inverse();
        assert_eq!(
            (
                dependents.get(0),
                dependents.get(1),
                dependents.get(2),
                dependents.get(3)
            ),
            (&[1, 2][..], &[2][..], &[][..], &[][..])
        );
    }
}
