//! MCP: a client of MCP servers (their tools join the registry as `server.tool`) and a server
//! exposing the registry to MCP hosts, both through the official Rust SDK (`rmcp`).
//!
//! # Configuration
//!
//! A JSON (or YAML) file in the `mcpServers` format desktop MCP hosts use, with a few optional
//! fields of our own:
//!
//! ```json
//! {
//!   "mcpServers": {
//!     "everything": { "command": "node", "args": ["server-everything/dist/index.js", "stdio"] },
//!     "files": { "command": "npx", "args": ["@modelcontextprotocol/server-filesystem", "/work"],
//!                "env": { "TOKEN": "${FILES_TOKEN}" }, "timeout_ms": 30000, "risk": "write" }
//!   }
//! }
//! ```
//!
//! `env` values of the form `${NAME}` are read from the host's environment and redacted from
//! every record. `risk` overrides the risk class that is otherwise read from each tool's
//! annotations (`readOnlyHint` gives `read`, `openWorldHint` gives `network`, anything else
//! `write`). Servers with a `url` speak streamable HTTP (`http://` or `https://`, TLS by rustls).
//!
//! # Failures
//!
//! A slow call times out (the server's `timeout_ms`, or the call's budget); a cancelled call
//! sends `notifications/cancelled`; a server that exits is restarted with exponential backoff
//! while its in-flight calls fail with a `tool_error` naming the server; malformed messages are
//! the SDK's to reject and never hang a call beyond its timeout.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_runtime_core::{
    CallContext, ClassifiedError, ErrorClass, Progress, RiskClass, Tool, ToolDescriptor, ToolError,
    ToolOutput, ToolSource,
};
use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CancelledNotificationParam, ClientRequest,
    ContentBlock, NumberOrString, ProgressToken, ServerResult,
};
use rmcp::service::PeerRequestOptions;
use rmcp::service::{NotificationContext, RunningService};
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::error::GatewayError;
use crate::redact::Redactor;
use crate::registry::Registry;

mod edit;
pub mod server;
mod stdio;

/// One MCP server as configured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct McpServerConfig {
    /// The program of a stdio server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Its environment (added to a scrubbed one: `PATH`, `HOME`, `LANG` are kept).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Its working folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// The URL of a streamable HTTP server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// HTTP headers sent to a streamable HTTP server (`"Authorization": "Bearer ${TOKEN}"`);
    /// `${NAME}` in a value is the host's variable, treated as a secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Time limit of one call, in milliseconds (default 60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Time limit for starting the server and the `initialize` handshake, in milliseconds
    /// (default 20000): a cold start (`npx` fetching, node loading modules) says nothing about
    /// how fast calls are answered, so it has its own limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_timeout_ms: Option<u64>,
    /// Risk class of every tool of this server, overriding the tools' annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<RiskClass>,
    /// Skip this server.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

impl McpServerConfig {
    /// What the server's command loads that it names, for a local server (see
    /// [`crate::config::command_files`]); nothing for a remote one.
    pub fn loaded_files(&self) -> Vec<PathBuf> {
        let Some(program) = &self.command else {
            return Vec::new();
        };
        let command: Vec<String> = std::iter::once(program.clone())
            .chain(self.args.iter().cloned())
            .collect();
        crate::config::command_files(&command, self.cwd.as_deref())
    }
}

/// The keys a servers file holds its servers under (`mcpServers`, as desktop hosts write it,
/// or `servers`).
const SERVERS_KEYS: &[&str] = &["mcpServers", "servers"];

/// The MCP servers file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct McpConfig {
    /// Servers by name (the namespace of their tools).
    #[serde(rename = "mcpServers", alias = "servers", default)]
    pub servers: BTreeMap<String, McpServerConfig>,
}

impl McpConfig {
    /// Reads a servers file (JSON, or YAML when the name ends in `.yaml`/`.yml`).
    pub fn load(path: &Path) -> Result<McpConfig, GatewayError> {
        let text = crate::read_config_text(path)?;
        let mut config = McpConfig::parse(&text, path)?;
        // A relative `cwd` is relative to the file, as every path in the runtime's files is
        // (without one, a server starts in the folder the runtime runs in).
        let base = crate::policy::base_dir(path)?;
        for server in config.servers.values_mut() {
            if let Some(cwd) = server.cwd.as_mut().filter(|c| c.is_relative()) {
                *cwd = base.join(&*cwd);
            }
        }
        Ok(config)
    }

    /// Parses a servers file; `path` names it in errors and picks the format.
    pub fn parse(text: &str, path: &Path) -> Result<McpConfig, GatewayError> {
        // Only the servers are checked for keys written twice: the file's other sections may
        // belong to another program that shares it (a desktop host's settings).
        let config: McpConfig = if is_yaml(path) {
            crate::yaml_from_str_checking(text, SERVERS_KEYS)
        } else {
            crate::json_from_str_checking(text, SERVERS_KEYS)
        }
        .map_err(|message| GatewayError::Parse {
            what: path.display().to_string(),
            message,
        })?;
        // A desktop host's file names servers as people do (`GitHub`, `Brave Search`): read
        // as registry names, the way tool names are, rather than refusing the whole file.
        let mut servers = BTreeMap::new();
        let mut written_as: BTreeMap<String, String> = BTreeMap::new();
        for (written, server) in config.servers {
            let name = registry_name(&written);
            if let Some(first) = written_as.get(&name) {
                return Err(GatewayError::Mcp {
                    server: written.clone(),
                    message: format!(
                        "the servers {first:?} and {written:?} are both named {name:?} here \
                         (server names are lower-cased, other characters than a-z, 0-9, '_', \
                         '.' and '-' made '_'): rename one"
                    ),
                }
                .in_file(path));
            }
            check_server(&name, &server).map_err(|e| e.in_file(path))?;
            written_as.insert(name.clone(), written);
            servers.insert(name, server);
        }
        Ok(McpConfig { servers })
    }

    /// Writes the file (JSON, or YAML when the name ends in `.yaml`/`.yml`) in the
    /// `mcpServers` format, replacing it at once (a crash leaves the old file or the new one;
    /// a symbolic link stays a link).
    ///
    /// Only what [`McpConfig`] holds is written: to add a server to a file that other programs
    /// share, keeping their keys, use [`McpConfig::add_server`].
    pub fn save(&self, path: &Path) -> Result<(), GatewayError> {
        let text = if is_yaml(path) {
            serde_yaml_ng::to_string(self).map_err(|e| e.to_string())
        } else {
            serde_json::to_string_pretty(self)
                .map(|t| t + "\n")
                .map_err(|e| e.to_string())
        }
        .map_err(|message| GatewayError::Parse {
            what: path.display().to_string(),
            message,
        })?;
        agent_runtime_core::fs::replace(path, |f| std::io::Write::write_all(f, text.as_bytes()))
            .map_err(|source| GatewayError::Write {
                path: path.to_path_buf(),
                source,
            })
    }
}

/// Whether a servers file is read as YAML (by its name).
fn is_yaml(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "yaml" || e == "yml")
}

/// Whether one server's entry can be used, checked when the file is read so that a mistake is
/// reported with its file and server before anything starts, not as a transport error later.
/// A `disabled` entry is checked for its name only.
/// Messages never quote a URL or a header or environment value: they may hold a token.
pub fn check_server(name: &str, s: &McpServerConfig) -> Result<(), GatewayError> {
    let fail = |message: String| {
        Err(GatewayError::Mcp {
            server: name.to_string(),
            message,
        })
    };
    if crate::registry::check_name(name).is_err() {
        // The name a host's file with this entry would have it under (see `registry_name`).
        let usable = registry_name(name);
        let hint = if crate::registry::check_name(&usable).is_ok() {
            format!(" (`{usable}` is one)")
        } else {
            String::new()
        };
        return fail(format!(
            "server names are 1-128 characters of a-z, 0-9, '_', '.', '-'{hint}"
        ));
    }
    // An entry switched off (often a stale one, in a file a desktop host shares) is never
    // started: it must not stop the file from loading.
    if s.disabled {
        return Ok(());
    }
    match (&s.command, &s.url) {
        (Some(_), Some(_)) | (None, None) => {
            return fail("give exactly one of `command` (stdio) or `url` (streamable HTTP)".into());
        }
        (Some(command), None) => {
            if command.trim().is_empty() {
                return fail("`command` is empty".into());
            }
            if !s.headers.is_empty() {
                return fail(
                    "`headers` are sent to `url` servers only; this one has a `command`".into(),
                );
            }
        }
        (None, Some(url)) => {
            if !s.args.is_empty() || !s.env.is_empty() || s.cwd.is_some() {
                return fail(
                    "`args`, `env` and `cwd` belong to `command` servers; this one has a `url`"
                        .into(),
                );
            }
            match url::Url::parse(url) {
                Err(e) => return fail(format!("`url` is not a valid URL ({e})")),
                Ok(u) if !matches!(u.scheme(), "http" | "https") => {
                    return fail(format!(
                        "`url` must be http:// or https://, not {}://",
                        u.scheme()
                    ));
                }
                Ok(_) => {}
            }
        }
    }
    let nul = |t: &str| t.contains('\0');
    if s.command.as_deref().is_some_and(nul) || s.args.iter().any(|a| nul(a)) {
        return fail("`command` and `args` cannot contain a NUL character".into());
    }
    for (key, value) in &s.env {
        if key.is_empty() || key.contains('=') || nul(key) {
            return fail(format!(
                "environment variable name {key:?} is empty or holds '=' or NUL"
            ));
        }
        if nul(value) {
            return fail(format!("the value of environment variable {key} holds NUL"));
        }
    }
    for (key, value) in &s.headers {
        // Not quoted: a header written whole as its name (`Authorization: Bearer TOKEN=`,
        // cut at the token's own `=`) would put the token in the message.
        if http::HeaderName::from_bytes(key.as_bytes()).is_err() {
            return fail(
                "a header's name is not a valid HTTP header name (a header is given as \
                 `NAME=VALUE`, not `NAME: VALUE`)"
                    .into(),
            );
        }
        // `${NAME}` is checked as written; the variable's value is checked when read.
        if http::HeaderValue::from_str(value).is_err() {
            return fail(format!(
                "the value of header {key} holds characters a header cannot carry"
            ));
        }
    }
    for (field, ms) in [
        ("timeout_ms", s.timeout_ms),
        ("startup_timeout_ms", s.startup_timeout_ms),
    ] {
        if ms == Some(0) {
            return fail(format!("`{field}` must be at least 1"));
        }
    }
    Ok(())
}

/// Installs the process-wide TLS crypto provider (ring) once, for `https` MCP servers.
fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Fails only when another provider is installed already, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A registry name for a server's tool: `server.tool`, the tool's name lower-cased with other
/// characters than `a-z0-9_.-` replaced by `_`.
pub fn namespaced(server: &str, tool: &str) -> String {
    format!("{server}.{}", registry_name(tool))
}

/// `name` lower-cased, other characters than `a-z0-9_.-` replaced by `_`: what a server's or
/// a tool's name is in the registry.
///
/// ```
/// assert_eq!(agent_runtime_gateway::mcp::registry_name("Brave Search"), "brave_search");
/// ```
pub fn registry_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

type ProgressMap = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Progress>>>>;

/// The client side's handler of server notifications.
#[derive(Clone)]
struct Handler {
    progress: ProgressMap,
    tools_changed: Arc<Notify>,
}

impl ClientHandler for Handler {
    fn on_progress(
        &self,
        params: rmcp::model::ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) -> impl Future<Output = ()> + Send + '_ {
        let key = token_key(&params.progress_token);
        if let Some(tx) = self
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            let _ = tx.send(Progress {
                done: params.progress,
                total: params.total,
                message: params.message.clone(),
                detail: Value::Null,
            });
        }
        std::future::ready(())
    }

    fn on_tool_list_changed(
        &self,
        _context: NotificationContext<RoleClient>,
    ) -> impl Future<Output = ()> + Send + '_ {
        self.tools_changed.notify_one();
        std::future::ready(())
    }
}

fn token_key(t: &ProgressToken) -> String {
    match &t.0 {
        NumberOrString::Number(n) => format!("n{n}"),
        NumberOrString::String(s) => format!("s{s}"),
    }
}

type Client = RunningService<RoleClient, Handler>;

/// Whether a session has ended: cancelled, or its transport closed (the server exited).
fn closed(c: &Client) -> bool {
    c.is_closed() || c.peer().is_transport_closed()
}

/// One connected (or restarting) MCP server.
pub struct McpServer {
    name: String,
    config: McpServerConfig,
    env: Vec<(String, String)>,
    /// Redacts the values of the entry's `env` and `headers` from what the server prints on
    /// stderr.
    stderr_redactor: Redactor,
    headers: Vec<(String, String)>,
    client: tokio::sync::RwLock<Option<Arc<Client>>>,
    progress: ProgressMap,
    tools_changed: Arc<Notify>,
    generation: AtomicU64,
    pid: std::sync::atomic::AtomicU32,
    suspect: std::sync::atomic::AtomicBool,
    /// What its command names, as it was when configured: checked before each start (see
    /// [`crate::trust::Pinned`]).
    pinned: crate::trust::Pinned,
}

impl std::fmt::Debug for McpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServer")
            .field("name", &self.name)
            .finish()
    }
}

impl McpServer {
    /// A server from its configuration; `${NAME}` environment values are read now and
    /// registered with `redactor`.
    pub fn new(
        name: &str,
        config: McpServerConfig,
        redactor: &mut Redactor,
    ) -> Result<Arc<Self>, GatewayError> {
        check_server(name, &config)?;
        Self::from_checked(name, config, redactor)
    }

    /// [`McpServer::new`] of an entry [`check_server`] accepted.
    fn from_checked(
        name: &str,
        config: McpServerConfig,
        redactor: &mut Redactor,
    ) -> Result<Arc<Self>, GatewayError> {
        // What the server's own words (its stderr) must not show: every value its entry gives
        // it, whether from `${NAME}` or written in (a desktop host's file holds tokens as
        // they are), and each variable's value alone (`Bearer ${TOKEN}`: the token).
        let mut stderr_redactor = Redactor::new();
        let mut expand_all = |entries: &BTreeMap<String, String>| {
            let mut expanded = Vec::with_capacity(entries.len());
            for (k, v) in entries {
                let value =
                    crate::redact::expand_env(v, redactor).map_err(|var| GatewayError::Mcp {
                        server: name.to_string(),
                        message: format!("environment variable {var} is not set"),
                    })?;
                for secret in crate::redact::referenced_env_values(v) {
                    stderr_redactor.add_secret(secret);
                }
                stderr_redactor.add_secret(value.clone());
                expanded.push((k.clone(), value));
            }
            Ok::<_, GatewayError>(expanded)
        };
        let env = expand_all(&config.env)?;
        let headers = expand_all(&config.headers)?;
        let pinned = crate::trust::Pinned::take(config.loaded_files());
        Ok(Arc::new(McpServer {
            pinned,
            name: name.to_string(),
            config,
            env,
            stderr_redactor,
            headers,
            client: tokio::sync::RwLock::new(None),
            progress: Arc::default(),
            tools_changed: Arc::new(Notify::new()),
            generation: AtomicU64::new(0),
            pid: std::sync::atomic::AtomicU32::new(0),
            suspect: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The server's configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn err(&self, message: impl std::fmt::Display) -> GatewayError {
        GatewayError::Mcp {
            server: self.name.clone(),
            message: message.to_string(),
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms.unwrap_or(60_000))
    }

    /// How long starting and initializing may take.
    fn startup_timeout(&self) -> Duration {
        Duration::from_millis(self.config.startup_timeout_ms.unwrap_or(20_000))
    }

    /// Starts the server process and initializes the session.
    pub async fn connect(&self) -> Result<(), GatewayError> {
        let handler = Handler {
            progress: self.progress.clone(),
            tools_changed: self.tools_changed.clone(),
        };
        let client = match (&self.config.command, &self.config.url) {
            (Some(program), _) => {
                self.pinned.refuse_moved().await.map_err(|e| self.err(e))?;
                let mut cmd = tokio::process::Command::new(program);
                cmd.args(&self.config.args).env_clear();
                for keep in ["PATH", "HOME", "LANG", "TMPDIR", "NODE_PATH"] {
                    if let Some(v) = std::env::var_os(keep) {
                        cmd.env(keep, v);
                    }
                }
                cmd.envs(self.env.iter().cloned());
                if let Some(cwd) = &self.config.cwd {
                    cmd.current_dir(cwd);
                }
                crate::child::prepare(cmd.as_std_mut());
                // A server still working when this process dies (killed mid-run) would go on
                // acting beside the resume that retries its call.
                crate::child::die_with_parent(cmd.as_std_mut());
                let (transport, stderr) = rmcp::transport::TokioChildProcess::builder(cmd)
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .map_err(|e| self.err(format!("cannot start {program}: {e}")))?;
                self.pid
                    .store(transport.id().unwrap_or(0), Ordering::Relaxed);
                // Its last lines on stderr say why a server that fails to start failed ("Cannot
                // find module", "no such directory"); read all along, so the pipe never fills.
                let tail = StderrTail::follow(stderr, self.stderr_redactor.clone());
                let init = handler.serve(transport);
                match tokio::time::timeout(self.startup_timeout(), init).await {
                    Err(_) => {
                        return Err(self.err(tail.after("no answer to initialize in time").await));
                    }
                    Ok(Err(e)) => {
                        let why = format!("initialize failed: {}", transport_error(e));
                        return Err(self.err(tail.after(&why).await));
                    }
                    Ok(Ok(client)) => client,
                }
            }
            (None, Some(url)) => {
                install_crypto_provider();
                use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
                let mut config = StreamableHttpClientTransportConfig::with_uri(url.clone());
                let mut custom = std::collections::HashMap::new();
                for (k, v) in &self.headers {
                    if k.eq_ignore_ascii_case("authorization")
                        && let Some(token) = v.strip_prefix("Bearer ")
                    {
                        config = config.auth_header(token);
                        continue;
                    }
                    let name = http::HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| self.err(format!("invalid header name {k:?}")))?;
                    let value = http::HeaderValue::from_str(v)
                        .map_err(|_| self.err(format!("invalid value for header {k:?}")))?;
                    custom.insert(name, value);
                }
                let config = config.custom_headers(custom);
                let transport = rmcp::transport::StreamableHttpClientTransport::from_config(config);
                let init = handler.serve(transport);
                tokio::time::timeout(self.startup_timeout(), init)
                    .await
                    .map_err(|_| self.err("no answer to initialize in time"))?
                    .map_err(|e| {
                        self.err(format!(
                            "initialize failed: {}",
                            transport_error_of(e, Some(url))
                        ))
                    })?
            }
            (None, None) => return Err(self.err("neither command nor url")),
        };
        *self.client.write().await = Some(Arc::new(client));
        self.generation.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn current(&self) -> Option<Arc<Client>> {
        self.client.read().await.clone()
    }

    /// The process id of a stdio server's current process (0 when none).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// The current session's peer: the bare `rmcp` client, for measurements and for uses the
    /// gateway does not cover. Calls made through it bypass policy and the audit trail.
    pub async fn peer(&self) -> Option<rmcp::Peer<RoleClient>> {
        self.current().await.map(|c| c.peer().clone())
    }

    /// How many times the server has been (re)connected.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Whether the session answers a `tools/list` within a few seconds.
    async fn healthy(&self) -> bool {
        let Some(client) = self.current().await else {
            return false;
        };
        let peer = client.peer().clone();
        // Straight to the wire: `Peer::list_tools` may answer from its cache.
        let listing = peer.send_request(ClientRequest::ListToolsRequest(
            rmcp::model::ListToolsRequest::default(),
        ));
        matches!(
            tokio::time::timeout(Duration::from_secs(3), listing).await,
            Ok(Ok(_))
        )
    }

    /// Whether the session is up.
    pub async fn is_up(&self) -> bool {
        self.current().await.is_some_and(|c| !closed(&c))
    }

    /// Lists the server's tools as registry tools, and a warning for each tool left out because
    /// its registry name ([`namespaced`]) is an earlier tool's.
    pub async fn tools(
        self: &Arc<Self>,
    ) -> Result<(Vec<Arc<dyn Tool>>, Vec<GatewayError>), GatewayError> {
        let client = self
            .current()
            .await
            .ok_or_else(|| self.err("not connected"))?;
        let listed = tokio::time::timeout(self.timeout(), client.peer().list_all_tools())
            .await
            .map_err(|_| self.err("tools/list timed out"))?
            .map_err(|e| {
                self.err(format!(
                    "tools/list failed: {}",
                    transport_error_of(e, self.config.url.as_deref())
                ))
            })?;
        let mut out: Vec<Arc<dyn Tool>> = Vec::new();
        let mut named: BTreeMap<String, String> = BTreeMap::new();
        let mut left_out = Vec::new();
        for t in listed {
            let name = namespaced(&self.name, &t.name);
            if let Some(first) = named.get(&name) {
                left_out.push(self.err(format!(
                    "its tools {first:?} and {:?} both become {name:?} (names are lower-cased, \
                     characters other than a-z, 0-9, `_`, `.` and `-` made `_`); only {first:?} \
                     can be called",
                    t.name
                )));
                continue;
            }
            named.insert(name.clone(), t.name.to_string());
            let ann = t.annotations.as_ref();
            let risk = self.config.risk.unwrap_or_else(|| {
                if ann.and_then(|a| a.read_only_hint) == Some(true) {
                    RiskClass::Read
                } else if ann.and_then(|a| a.open_world_hint) == Some(true) {
                    RiskClass::Network
                } else {
                    RiskClass::Write
                }
            });
            let descriptor = ToolDescriptor {
                name,
                description: t.description.as_deref().unwrap_or_default().to_string(),
                input_schema: Value::Object((*t.input_schema).clone()),
                output_schema: t
                    .output_schema
                    .as_ref()
                    .map(|s| Value::Object((**s).clone())),
                risk,
                source: ToolSource::Mcp {
                    server: self.name.clone(),
                },
            };
            out.push(Arc::new(McpTool {
                descriptor,
                remote: t.name.to_string(),
                server: self.clone(),
            }));
        }
        Ok((out, left_out))
    }

    async fn call(
        &self,
        remote: &str,
        args: Value,
        ctx: CallContext,
    ) -> Result<ToolOutput, ToolError> {
        let fail = |m: String| {
            ClassifiedError::new(
                ErrorClass::ToolError,
                format!("MCP server {}: {m}", self.name),
            )
        };
        let client = match self.current().await {
            Some(c) if !closed(&c) => c,
            _ => return Err(fail("not running (restarting); try again shortly".into())),
        };
        let arguments = match args {
            Value::Object(m) => m,
            Value::Null => serde_json::Map::new(),
            _ => {
                return Err(ClassifiedError::new(
                    ErrorClass::InvalidArguments,
                    "arguments must be an object",
                ));
            }
        };
        let params = CallToolRequestParams::new(remote.to_string()).with_arguments(arguments);
        let limit = ctx
            .timeout
            .map_or(self.timeout(), |t| t.min(self.timeout()));
        let peer = client.peer().clone();
        let gone = |_| {
            fail(format!(
                "stopped during the call to {remote}; it will be restarted"
            ))
        };
        let request = ClientRequest::CallToolRequest(CallToolRequest::new(params));
        // The SDK gives every request its own progress token; route that one to the caller.
        let handle = peer
            .send_request_with_option(request, PeerRequestOptions::no_options())
            .await
            .map_err(gone)?;
        let id = handle.id.clone();
        let key = token_key(&handle.progress_token);
        let mut guard = ProgressGuard {
            map: self.progress.clone(),
            key: None,
        };
        if let Some(tx) = ctx.progress.clone() {
            self.progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone(), tx);
            guard.key = Some(key);
        }
        let closed = async {
            while !closed(&client) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        // Cancelled at the server however the call ends unanswered: here (the caller's token,
        // the server's limit), or by a caller that drops it (the gateway's own time limit, a
        // run's driver ending a task's attempt), which would leave the server working on it.
        let unanswered = CancelOnDrop {
            peer: Some(peer.clone()),
            id: id.clone(),
        };
        let result = tokio::select! {
            r = handle.await_response() => {
                unanswered.disarm();
                r
            }
            _ = ctx.cancel.cancelled() => {
                unanswered.cancel("cancelled by the caller").await;
                return Err(ClassifiedError::new(ErrorClass::Cancelled, format!("call to {}.{remote} cancelled", self.name)));
            }
            _ = tokio::time::sleep(limit) => {
                unanswered.cancel("timed out").await;
                self.suspect.store(true, Ordering::Relaxed);
                return Err(ClassifiedError::new(
                    ErrorClass::Timeout,
                    format!("MCP server {} did not answer {remote} within {} ms", self.name, limit.as_millis()),
                ));
            }
            _ = closed => {
                unanswered.disarm();
                return Err(fail(format!("stopped during the call to {remote}; it will be restarted")));
            }
        };
        drop(guard);
        let result = result.map_err(|e| match e {
            rmcp::ServiceError::TransportClosed | rmcp::ServiceError::TransportSend(_) => fail(
                format!("stopped during the call to {remote}; it will be restarted"),
            ),
            rmcp::ServiceError::McpError(e) if e.code == rmcp::model::ErrorCode::INVALID_PARAMS => {
                ClassifiedError::new(
                    ErrorClass::InvalidArguments,
                    format!("{remote}: {}", e.message),
                )
            }
            other => fail(format!(
                "{remote}: {}",
                transport_error_of(other, self.config.url.as_deref())
            )),
        })?;
        let result = match result {
            ServerResult::CallToolResult(r) => r,
            other => {
                let kind = serde_json::to_value(&other)
                    .ok()
                    .and_then(|v| v.get("resultType").cloned());
                return Err(fail(format!(
                    "{remote}: unexpected reply to tools/call ({kind:?})"
                )));
            }
        };
        let mut result = result;
        // Read the result as it came, without turning it into a JSON value first.
        let text = text_of(&mut result.content);
        if result.is_error == Some(true) {
            return Err(fail(format!(
                "{remote} failed: {}",
                text.unwrap_or_else(|| serde_json::to_value(&result)
                    .unwrap_or(Value::Null)
                    .to_string())
            )));
        }
        let out = match (result.structured_content.take(), text) {
            (Some(s), _) if !s.is_null() => s,
            (_, Some(t)) => Value::String(t),
            _ => serde_json::to_value(&result.content).unwrap_or(Value::Null),
        };
        Ok(ToolOutput::new(out))
    }
}

/// The text of a result whose content is only text blocks, joined by newlines (taken out of
/// the blocks, which are left empty); `None`, and the blocks untouched, otherwise.
fn text_of(content: &mut [ContentBlock]) -> Option<String> {
    if content.is_empty() || content.iter().any(|c| c.as_text().is_none()) {
        return None;
    }
    let mut texts = content.iter_mut().filter_map(|c| match c {
        ContentBlock::Text(t) => Some(std::mem::take(&mut t.text)),
        _ => None,
    });
    let mut out = texts.next().unwrap_or_default();
    for t in texts {
        out.push('\n');
        out.push_str(&t);
    }
    Some(out)
}

struct ProgressGuard {
    map: ProgressMap,
    key: Option<String>,
}

/// How long a call's progress route outlives its response. `rmcp` hands each notification to a
/// task of its own, so the last progress notification of a call, sent by the server before the
/// response, can reach our handler after the response has: keep routing for a moment so it is
/// not lost (and so that a relaying MCP server can forward it before its own response).
const PROGRESS_GRACE: Duration = Duration::from_millis(25);

impl Drop for ProgressGuard {
    fn drop(&mut self) {
        let Some(k) = self.key.take() else { return };
        let map = self.map.clone();
        let remove = move || {
            map.lock().unwrap_or_else(|p| p.into_inner()).remove(&k);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    tokio::time::sleep(PROGRESS_GRACE).await;
                    remove();
                });
            }
            Err(_) => remove(),
        }
    }
}

/// A tool of an MCP server, as the registry holds it.
pub struct McpTool {
    descriptor: ToolDescriptor,
    remote: String,
    server: Arc<McpServer>,
}

impl std::fmt::Debug for McpTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpTool")
            .field("name", &self.descriptor.name)
            .finish()
    }
}

#[async_trait::async_trait]
impl Tool for McpTool {
    fn descriptor(&self) -> &ToolDescriptor {
        &self.descriptor
    }

    async fn call(&self, args: Value, ctx: CallContext) -> Result<ToolOutput, ToolError> {
        self.server.call(&self.remote, args, ctx).await
    }

    fn time_limit(&self) -> Option<Duration> {
        Some(self.server.timeout())
    }
}

/// Sends `notifications/cancelled` for a request when dropped armed (`peer` set): its call was
/// dropped before an answer came.
struct CancelOnDrop {
    peer: Option<rmcp::service::Peer<RoleClient>>,
    id: rmcp::model::RequestId,
}

impl CancelOnDrop {
    /// The call ended with its answer or with its session: nothing to cancel.
    fn disarm(mut self) {
        self.peer = None;
    }

    /// Cancels the request at the server now, waiting (at most a second) for the notification
    /// to go out.
    async fn cancel(mut self, reason: &str) {
        if let Some(peer) = self.peer.take() {
            notify_cancelled(peer, self.id.clone(), reason).await;
        }
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(peer) = self.peer.take() else {
            return;
        };
        // Not awaited here (a drop cannot): a task of its own.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(notify_cancelled(
                peer,
                self.id.clone(),
                "the caller gave up on the call",
            ));
        }
    }
}

/// Sends `notifications/cancelled` for request `id`, giving up after a second (a server that
/// does not read holds nothing up).
async fn notify_cancelled(
    peer: rmcp::service::Peer<RoleClient>,
    id: rmcp::model::RequestId,
    reason: &str,
) {
    let note = CancelledNotificationParam::new(Some(id), Some(reason.to_string()));
    let _ = tokio::time::timeout(Duration::from_secs(1), peer.notify_cancelled(note)).await;
}

/// The last lines a stdio server printed on stderr, read all along by a task of its own.
struct StderrTail {
    lines: Arc<Mutex<StderrLines>>,
    /// Dropped, it goes on reading (a running server's stderr must not fill its pipe), until
    /// the server ends.
    reader: Option<tokio::task::JoinHandle<()>>,
}

/// The first line that reads as an error (a stack trace's message comes before the trace's
/// last lines), and the last lines.
#[derive(Default)]
struct StderrLines {
    first_error: Option<String>,
    last: std::collections::VecDeque<String>,
}

impl StderrTail {
    /// Lines kept, and characters of each.
    const LINES: usize = 3;
    const CHARS: usize = 300;

    /// Follows `stderr`, keeping its lines redacted by `redactor` (before they are cut).
    fn follow(stderr: Option<tokio::process::ChildStderr>, redactor: Redactor) -> StderrTail {
        let lines: Arc<Mutex<StderrLines>> = Arc::default();
        let reader = stderr.map(|stderr| {
            let lines = lines.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut stderr = tokio::io::BufReader::new(stderr);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    // Bounded: a line without end is cut, not held whole.
                    let read = tokio::io::AsyncReadExt::take(&mut stderr, 64 * 1024)
                        .read_until(b'\n', &mut buf)
                        .await;
                    match read {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {
                            let text = String::from_utf8_lossy(&buf);
                            let text = text.trim();
                            if text.is_empty() {
                                continue;
                            }
                            let line: String = redactor
                                .redact_str(text)
                                .chars()
                                .take(Self::CHARS)
                                .collect();
                            let mut kept = lines.lock().unwrap_or_else(|p| p.into_inner());
                            if kept.first_error.is_none()
                                && (line.contains("Error") || line.contains("error"))
                            {
                                kept.first_error = Some(line.clone());
                            }
                            if kept.last.len() == Self::LINES {
                                kept.last.pop_front();
                            }
                            kept.last.push_back(line);
                        }
                    }
                }
            })
        });
        StderrTail { lines, reader }
    }

    /// `why`, and what the server last said on stderr, if anything: waits a moment for the
    /// server's last words (it has usually just exited) to be read.
    async fn after(mut self, why: &str) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(crate::child::STDERR_GRACE, reader).await;
        }
        let kept = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if kept.last.is_empty() {
            return why.to_string();
        }
        let mut said: Vec<&str> = Vec::new();
        if let Some(first) = &kept.first_error
            && !kept.last.contains(first)
        {
            said.extend([first.as_str(), "..."]);
        }
        said.extend(kept.last.iter().map(String::as_str));
        format!("{why}; its stderr ended: {}", said.join(" | "))
    }
}

/// Connects configured servers, registers their tools, follows `tools/list_changed` and
/// restarts servers that exit, with exponential backoff.
///
/// Keep it for as long as the servers' tools are used: dropping it stops the supervision.
/// Start it on a runtime whose threads live as long as the servers should: a stdio server is
/// killed when the thread that started it ends (it must not outlive a process killed
/// mid-run), so not from a thread of tokio's blocking pool, nor a short-lived runtime.
#[must_use = "dropping the manager stops supervising the MCP servers"]
pub struct McpManager {
    servers: Vec<Arc<McpServer>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for McpManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpManager")
            .field("servers", &self.servers)
            .finish()
    }
}

/// The first wait before restarting a server, doubled after each failure up to 30 s.
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl McpManager {
    /// Connects every enabled server of `config` and registers its tools in `registry`.
    /// Servers that fail to start are reported (with the error) and retried in the background;
    /// one whose entry cannot be used (a `${NAME}` that is not set) is reported and left out,
    /// its tools' calls saying why. The error is for what concerns every server.
    pub async fn start(
        config: &McpConfig,
        registry: Arc<Registry>,
        redactor: &mut Redactor,
    ) -> Result<(McpManager, Vec<GatewayError>), GatewayError> {
        let mut servers = Vec::new();
        let mut unusable = Vec::new();
        for (name, cfg) in &config.servers {
            if cfg.disabled {
                continue;
            }
            // An entry built in code that is not usable is the caller's mistake, as a file's
            // is when it is read.
            check_server(name, cfg)?;
            match McpServer::from_checked(name, cfg.clone(), redactor) {
                Ok(server) => servers.push(server),
                // A server that cannot be set up (a `${NAME}` that is not set) is unavailable,
                // and says why to whoever calls its tools; it holds up no other tool.
                Err(e) => {
                    registry.set_unreachable(name, Some(e.to_string()));
                    unusable.push(e);
                }
            }
        }
        // Connect all at once: a slow or broken server costs its own timeout, not the sum.
        let mut connecting = tokio::task::JoinSet::new();
        for (i, server) in servers.iter().enumerate() {
            let (server, registry) = (server.clone(), registry.clone());
            connecting.spawn(async move { (i, connect_and_register(&server, &registry).await) });
        }
        let mut results = Vec::new();
        while let Some(done) = connecting.join_next().await {
            match done {
                Ok(r) => results.push(r),
                Err(e) => results.push((
                    usize::MAX,
                    Err(GatewayError::Mcp {
                        server: "?".into(),
                        message: format!("connect task failed: {e}"),
                    }),
                )),
            }
        }
        results.sort_by_key(|(i, _)| *i);
        let mut errors = unusable;
        for (_, r) in results {
            match r {
                Ok(errs) => errors.extend(errs),
                Err(e) => errors.push(e),
            }
        }
        let tasks = servers
            .iter()
            .map(|s| tokio::spawn(supervise(s.clone(), registry.clone())))
            .collect();
        Ok((McpManager { servers, tasks }, errors))
    }

    /// The servers.
    pub fn servers(&self) -> &[Arc<McpServer>] {
        &self.servers
    }

    /// Stops supervising and closes every session.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        for s in &self.servers {
            if let Some(c) = s.client.write().await.take()
                && let Ok(c) = Arc::try_unwrap(c)
            {
                let _ = tokio::time::timeout(Duration::from_secs(2), c.cancel()).await;
            }
        }
    }
}

impl Drop for McpManager {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn connect_and_register(
    server: &Arc<McpServer>,
    registry: &Registry,
) -> Result<Vec<GatewayError>, GatewayError> {
    let connected = async {
        server.connect().await?;
        server.tools().await
    }
    .await;
    match connected {
        Ok((tools, mut warnings)) => {
            registry.set_unreachable(&server.name, None);
            warnings.extend(registry.replace_source(&server.name, tools));
            Ok(warnings)
        }
        Err(e) => {
            registry.set_unreachable(&server.name, Some(e.to_string()));
            Err(e)
        }
    }
}

/// How long a server must stay up for its restarts' wait to start over from
/// [`BACKOFF_START`]: one that dies right after each start (it answers `initialize`, then
/// exits) would otherwise be restarted every few hundred milliseconds for ever.
const STABLE_AFTER: Duration = Duration::from_secs(10);

async fn supervise(server: Arc<McpServer>, registry: Arc<Registry>) {
    let mut backoff = BACKOFF_START;
    // Started (or tried) just before.
    let mut up_since = Some(std::time::Instant::now());
    loop {
        tokio::select! {
            _ = server.tools_changed.notified() => {
                if let Ok((tools, _)) = server.tools().await {
                    registry.replace_source(&server.name, tools);
                }
                continue;
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if server.suspect.swap(false, Ordering::Relaxed)
            && server.is_up().await
            && !server.healthy().await
        {
            // A call timed out or its transport failed and the session does not answer a
            // listing either (an HTTP server restarted under us forgets our session): start over.
            if let Some(c) = server.client.write().await.take() {
                c.cancellation_token().cancel();
            }
        }
        if server.is_up().await {
            if up_since.is_some_and(|t| t.elapsed() >= STABLE_AFTER) {
                backoff = BACKOFF_START;
            }
            continue;
        }
        *server.client.write().await = None;
        tokio::time::sleep(backoff).await;
        // Each restart of a server that did not stay up waits twice as long as the last.
        backoff = (backoff * 2).min(BACKOFF_MAX);
        up_since = connect_and_register(&server, &registry)
            .await
            .ok()
            .map(|_| std::time::Instant::now());
    }
}

/// A server's URL as it may be shown: without the user and password, the query and the
/// fragment, which often carry a token (`https://host/mcp?token=...`). Text that is no URL is
/// shown as `(invalid URL)`.
///
/// ```
/// use agent_runtime_gateway::mcp::shown_url;
/// assert_eq!(shown_url("https://u:pw@example.com:8443/mcp?token=t#x"), "https://example.com:8443/mcp?...");
/// assert_eq!(shown_url("http://127.0.0.1:1/mcp"), "http://127.0.0.1:1/mcp");
/// ```
pub fn shown_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            let had_query = u.query().is_some() || u.fragment().is_some();
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            let mut shown = u.to_string();
            if had_query {
                shown.push_str("?...");
            }
            shown
        }
        Err(_) => "(invalid URL)".into(),
    }
}

/// An error of the MCP transport as it may be shown: the server's URL (which may hold a
/// token) and anything else that looks like one cut to [`shown_url`]'s form, and rmcp's type
/// names (`Transport [rmcp::transport::worker::WorkerTransport<...>]`) left out.
fn transport_error(e: impl std::fmt::Display) -> String {
    transport_error_of(e, None)
}

/// [`transport_error`] of a server at `url`: its password, query and fragment are replaced
/// wherever they appear first, since a URL's end cannot be told from the text around it (a
/// query may hold `)` or a space, encoded or not).
fn transport_error_of(e: impl std::fmt::Display, url: Option<&str>) -> String {
    let mut text = e.to_string();
    if let Some(u) = url.and_then(|u| url::Url::parse(u).ok()) {
        for secret in [u.password(), u.query(), u.fragment()]
            .into_iter()
            .flatten()
        {
            if !secret.is_empty() {
                text = text.replace(secret, "...");
            }
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let next_url = ["http://", "https://"]
            .iter()
            .filter_map(|s| rest.find(s))
            .min();
        let next_type = rest.find(" [rmcp::");
        match (next_url, next_type) {
            (Some(u), t) if t.is_none_or(|t| u < t) => {
                out.push_str(&rest[..u]);
                let end = rest[u..]
                    .find(|c: char| c.is_whitespace() || c == ')' || c == '"')
                    .map_or(rest.len(), |e| u + e);
                out.push_str(&shown_url(&rest[u..end]));
                rest = &rest[end..];
            }
            (_, Some(t)) => {
                out.push_str(&rest[..t]);
                // Past the bracket that closes the one opened, nested `<...>` and all.
                let mut depth = 0usize;
                let mut end = rest.len();
                for (i, c) in rest[t + 1..].char_indices() {
                    match c {
                        '[' => depth += 1,
                        ']' => {
                            depth -= 1;
                            if depth == 0 {
                                end = t + 1 + i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &rest[end..];
            }
            _ => {
                out.push_str(rest);
                rest = "";
            }
        }
    }
    out
}

/// A summary of a server for `mcp list`.
pub fn describe_server(name: &str, s: &McpServerConfig) -> Value {
    json!({
        "name": name,
        "transport": if s.url.is_some() { "streamable_http" } else { "stdio" },
        "command": s.command, "args": s.args, "url": s.url.as_deref().map(shown_url),
        "env": s.env.keys().collect::<Vec<_>>(),
        "headers": s.headers.keys().collect::<Vec<_>>(),
        "disabled": s.disabled,
    })
}

#[cfg(test)]
mod shown_tests {
    use super::*;

    #[test]
    fn transport_errors_show_no_url_secret_nor_rmcp_types() {
        let raw = "Send message error Transport [rmcp::transport::worker::WorkerTransport<rmcp::transport::streamable_http_client::StreamableHttpClientWorker<reqwest::async_impl::client::Client>>] error: Client error: error sending request for url (http://user:hunter2@127.0.0.1:1/mcp?token=qs-secret-999)";
        let shown = transport_error(raw);
        assert_eq!(
            shown,
            "Send message error Transport error: Client error: error sending request for url (http://127.0.0.1:1/mcp?...)"
        );
        assert_eq!(transport_error("plain words"), "plain words");
        // A `)` inside the query ends no URL: the configured URL's secrets go first.
        let url = "http://127.0.0.1:1/mcp?token=a&x=(y)secret31#f)secret11";
        let shown = transport_error_of(
            "error sending request for url (http://127.0.0.1:1/mcp?token=a&x=(y)secret31#f)secret11)",
            Some(url),
        );
        assert!(!shown.contains("secret"), "{shown}");
        // An unclosed bracket drops the rest rather than showing half a type.
        assert_eq!(transport_error("x [rmcp::a<b"), "x");
        assert_eq!(shown_url("not a url"), "(invalid URL)");
    }
}
