//! The MCP client against the reference servers from the npm registry, over stdio.
//!
//! Needs node and `.test-deps/npm` (run `scripts/test-deps.sh`); fails naming what is missing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::{
    Actor, CallContext, ErrorClass, EventKind, MemoryLog, RiskClass, ToolSource,
};
use agent_runtime_gateway::mcp::{McpConfig, McpManager, McpServer, McpServerConfig};
use agent_runtime_gateway::{Gateway, GatewayBuilder, Policy, Redactor, Registry};
use serde_json::json;

fn npm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.test-deps/npm/node_modules/@modelcontextprotocol")
}

fn server_js(package: &str) -> String {
    let p = npm_dir().join(package).join("dist/index.js");
    assert!(
        p.exists(),
        "the MCP tests need the npm package @modelcontextprotocol/{package} in .test-deps/npm: run scripts/test-deps.sh ({} is missing)",
        p.display()
    );
    assert!(
        agent_runtime_gateway::sandbox::find_in_path("node").is_some(),
        "the MCP tests need node on PATH (Debian package nodejs): run scripts/test-deps.sh"
    );
    p.display().to_string()
}

fn everything(timeout_ms: Option<u64>) -> McpServerConfig {
    McpServerConfig {
        command: Some("node".into()),
        args: vec![server_js("server-everything"), "stdio".into()],
        timeout_ms,
        ..McpServerConfig::default()
    }
}

async fn start(servers: Vec<(&str, McpServerConfig)>) -> (Gateway, McpManager, Arc<MemoryLog>) {
    start_reading(servers, &[]).await
}

/// [`start`], with `read_roots` as the policy's read roots.
async fn start_reading(
    servers: Vec<(&str, McpServerConfig)>,
    read_roots: &[std::path::PathBuf],
) -> (Gateway, McpManager, Arc<MemoryLog>) {
    let config = McpConfig {
        servers: servers
            .into_iter()
            .map(|(n, c)| (n.to_string(), c))
            .collect(),
    };
    let registry = Arc::new(Registry::new());
    let mut redactor = Redactor::new();
    let (manager, errors) = McpManager::start(&config, registry.clone(), &mut redactor)
        .await
        .unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let log = Arc::new(MemoryLog::default());
    // The policy only needs the root to exist; nothing is written in it. Under the target dir,
    // not a kept temp dir, so test runs leave nothing behind in /tmp.
    let ws = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("mcp-client-workspace");
    std::fs::create_dir_all(&ws).unwrap();
    let gw = GatewayBuilder::new(registry, log.clone())
        .policy(
            Policy::defaults(vec![ws])
                .unwrap()
                .with_read_roots(read_roots)
                .unwrap(),
        )
        .redactor(redactor)
        .build()
        .unwrap();
    (gw, manager, log)
}

/// A stdio MCP server of a few lines of Python (`/usr/bin/python3`): it answers `initialize`,
/// answers `tools/list` with `tools` (a Python expression) after running `on_list`, runs
/// `on_other` for any other message (`m`, its `method`) and answers it not; `on_start` runs
/// first, and `sys.argv[1]` is `arg`. One line each, Python.
struct PythonServer<'a> {
    tools: &'a str,
    on_start: &'a str,
    on_list: &'a str,
    on_other: &'a str,
    arg: &'a Path,
}

impl<'a> PythonServer<'a> {
    fn new(arg: &'a Path) -> Self {
        PythonServer {
            tools: "[]",
            on_start: "pass",
            on_list: "pass",
            on_other: "pass",
            arg,
        }
    }
}

fn python_server(s: PythonServer<'_>) -> McpServerConfig {
    let script = format!(
        r#"
import json, os, sys, threading
{on_start}
for line in sys.stdin:
    m = json.loads(line)
    method = m.get("method")
    if method == "initialize":
        out = {{"protocolVersion": m["params"]["protocolVersion"], "capabilities": {{"tools": {{}}}},
               "serverInfo": {{"name": "py", "version": "1"}}}}
    elif method == "tools/list":
        out = {{"tools": {tools}}}
        {on_list}
    else:
        {on_other}
        continue
    sys.stdout.write(json.dumps({{"jsonrpc": "2.0", "id": m["id"], "result": out}}) + "\n")
    sys.stdout.flush()
"#,
        on_start = s.on_start,
        tools = s.tools,
        on_list = s.on_list,
        on_other = s.on_other,
    );
    McpServerConfig {
        command: Some("/usr/bin/python3".into()),
        args: vec!["-c".into(), script, s.arg.display().to_string()],
        ..McpServerConfig::default()
    }
}

/// Starts the servers of `config` into a registry of their own; what `start` reported, as text.
async fn start_reporting(config: &McpConfig) -> (McpManager, Arc<Registry>, Vec<String>) {
    let registry = Arc::new(Registry::new());
    let (manager, errors) = McpManager::start(config, registry.clone(), &mut Redactor::new())
        .await
        .unwrap();
    let text = errors.iter().map(|e| e.to_string()).collect();
    (manager, registry, text)
}

fn ctx() -> CallContext {
    CallContext::new(Actor::Agent("tester".into()))
}

#[tokio::test]
async fn lists_and_calls_tools_of_server_everything() {
    let (gw, manager, log) = start(vec![("everything", everything(None))]).await;
    let names = gw.registry().names();
    for want in [
        "everything.echo",
        "everything.get-sum",
        "everything.trigger-long-running-operation",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    let echo = gw.registry().get("everything.echo").unwrap();
    assert_eq!(
        echo.descriptor().source,
        ToolSource::Mcp {
            server: "everything".into()
        }
    );
    let out = gw
        .call("everything.echo", json!({"message": "hi"}), ctx())
        .await
        .unwrap();
    assert_eq!(out.value, json!("Echo: hi"));
    let out = gw
        .call("everything.get-sum", json!({"a": 2, "b": 3}), ctx())
        .await
        .unwrap();
    assert!(out.value.to_string().contains('5'), "{}", out.value);
    // Schema errors are caught before the server sees them.
    let err = gw
        .call("everything.echo", json!({"msg": 1}), ctx())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::InvalidArguments, "{err}");
    assert!(err.message.contains("message"), "{err}");
    assert!(log.all().iter().any(|e| e.kind == EventKind::ToolCompleted));
    manager.shutdown().await;
}

#[tokio::test]
async fn server_errors_are_tool_errors() {
    let (gw, manager, _log) = start(vec![("everything", everything(None))]).await;
    // Straight to the tool, past the gateway's validation: the server refuses.
    let tool = gw.registry().get("everything.get-sum").unwrap();
    let err = tool
        .tool()
        .call(json!({"a": "two"}), ctx())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.class,
            ErrorClass::ToolError | ErrorClass::InvalidArguments
        ),
        "{err}"
    );
    assert!(err.message.contains("get-sum"), "{err}");
    manager.shutdown().await;
}

#[tokio::test]
async fn progress_is_passed_through() {
    let (gw, manager, _log) = start(vec![("everything", everything(None))]).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut c = ctx();
    c.progress = Some(tx);
    let out = gw
        .call(
            "everything.trigger-long-running-operation",
            json!({"duration": 0.3, "steps": 3}),
            c,
        )
        .await
        .unwrap();
    assert!(
        out.value.as_str().unwrap().contains("completed"),
        "{}",
        out.value
    );
    let mut seen = Vec::new();
    while let Ok(p) = rx.try_recv() {
        seen.push(p);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!((seen[2].done, seen[2].total), (3.0, Some(3.0)));
    manager.shutdown().await;
}

#[tokio::test]
async fn cancellation_and_timeouts_end_calls_promptly() {
    let (gw, manager, _log) = start(vec![("everything", everything(Some(500)))]).await;
    let long = json!({"duration": 30, "steps": 30});
    let started = std::time::Instant::now();
    let err = gw
        .call(
            "everything.trigger-long-running-operation",
            long.clone(),
            ctx(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Timeout, "{err}");
    assert!(err.message.contains("500 ms"), "{err}");
    let c = ctx();
    let token = c.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        token.cancel();
    });
    let err = gw
        .call("everything.trigger-long-running-operation", long, c)
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Cancelled, "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // The server is still usable afterwards.
    let out = gw
        .call("everything.echo", json!({"message": "still here"}), ctx())
        .await
        .unwrap();
    assert_eq!(out.value, json!("Echo: still here"));
    manager.shutdown().await;
}

#[tokio::test]
async fn a_server_killed_mid_call_fails_the_call_and_is_restarted() {
    let (gw, manager, _log) = start(vec![("everything", everything(None))]).await;
    let server = manager.servers()[0].clone();
    let pid = server.pid();
    assert!(pid > 0);
    let generation = server.generation();
    let call = gw.call(
        "everything.trigger-long-running-operation",
        json!({"duration": 30, "steps": 30}),
        ctx(),
    );
    let killer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // SAFETY: signalling the server process this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    };
    let (result, ()) = tokio::join!(call, killer);
    let err = result.unwrap_err();
    assert_eq!(err.class, ErrorClass::ToolError, "{err}");
    assert!(
        err.message.contains("everything") && err.message.contains("stopped"),
        "{err}"
    );
    // The supervisor restarts it with backoff.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(server.generation() > generation && server.is_up().await) {
        assert!(
            std::time::Instant::now() < deadline,
            "server was not restarted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(server.pid(), pid);
    let out = gw
        .call("everything.echo", json!({"message": "back"}), ctx())
        .await
        .unwrap();
    assert_eq!(out.value, json!("Echo: back"));
    manager.shutdown().await;
}

#[tokio::test]
async fn broken_servers_give_clear_errors_and_never_hang() {
    let config = McpConfig {
        servers: [
            (
                "garbage".to_string(),
                McpServerConfig {
                    command: Some("/bin/sh".into()),
                    args: vec!["-c".into(), "echo 'this is not json-rpc'; echo '{\"jsonrpc\":\"2.0\",\"id\":\"x\"'; sleep 30".into()],
                    timeout_ms: Some(1000),
                    startup_timeout_ms: Some(1000),
                    ..McpServerConfig::default()
                },
            ),
            (
                "quits".to_string(),
                McpServerConfig {
                    command: Some("/bin/sh".into()),
                    // Why it quits, on stderr (a stack trace's message, then its last lines),
                    // with a secret the configuration brought in.
                    args: vec![
                        "-c".into(),
                        "echo 'starting' >&2; echo \"Error: cannot log in as $TOKEN ($PATH, $KEY)\" >&2; \
                         echo '    at login (server.js:1)' >&2; echo '    at main (server.js:2)' >&2; \
                         echo '    at run (server.js:3)' >&2; echo 'Node.js v20' >&2; exit 1"
                            .into(),
                    ],
                    // A host variable every test machine has, standing in for a token, in a
                    // longer value; and a token written in, as desktop hosts' files hold them.
                    env: [
                        ("TOKEN".to_string(), "Bearer ${PATH}".to_string()),
                        ("KEY".to_string(), "ghp_written_in_token_123".to_string()),
                    ]
                        .into_iter()
                        .collect(),
                    timeout_ms: Some(1000),
                    startup_timeout_ms: Some(1000),
                    ..McpServerConfig::default()
                },
            ),
            (
                "missing".to_string(),
                McpServerConfig { command: Some("/nonexistent/server".into()), ..McpServerConfig::default() },
            ),
        ]
        .into_iter()
        .collect(),
    };
    let registry = Arc::new(Registry::new());
    let started = std::time::Instant::now();
    let (manager, errors) = McpManager::start(&config, registry.clone(), &mut Redactor::new())
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(text.len(), 3, "{text:?}");
    assert!(text.iter().any(|t| t.contains("\"garbage\"")), "{text:?}");
    // A server that fails to start says why, in its own last words: its first error line and
    // its last lines, the secret redacted.
    assert!(
        text.iter().any(|t| t.contains("\"quits\"")
            && t.contains(
                "its stderr ended: Error: cannot log in as [REDACTED] ([REDACTED], [REDACTED]) | ... | \
                 at main (server.js:2) | at run (server.js:3) | Node.js v20"
            )),
        "{text:?}"
    );
    let path = std::env::var("PATH").unwrap();
    assert!(
        !text
            .iter()
            .any(|t| t.contains(&path) || t.contains("ghp_written")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("\"missing\"") && t.contains("cannot start")),
        "{text:?}"
    );
    assert!(registry.is_empty());
    drop(manager);
}

#[tokio::test]
async fn filesystem_server_reads_inside_its_roots_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    std::fs::write(root.join("hello.txt"), "hello from the filesystem server").unwrap();
    let fs = McpServerConfig {
        command: Some("node".into()),
        args: vec![server_js("server-filesystem"), root.display().to_string()],
        ..McpServerConfig::default()
    };
    // The policy lets reads of the server's root and /etc through; the server refuses the
    // latter itself.
    let (gw, manager, _log) =
        start_reading(vec![("files", fs)], &[root.clone(), "/etc".into()]).await;
    let d = gw
        .registry()
        .get("files.read_text_file")
        .expect("files.read_text_file")
        .descriptor()
        .clone();
    assert_eq!(d.risk, RiskClass::Read);
    assert_eq!(
        gw.registry()
            .get("files.write_file")
            .unwrap()
            .descriptor()
            .risk,
        RiskClass::Write
    );
    let p = root.join("hello.txt").display().to_string();
    let out = gw
        .call("files.read_text_file", json!({"path": p}), ctx())
        .await
        .unwrap();
    assert!(
        out.value
            .to_string()
            .contains("hello from the filesystem server"),
        "{}",
        out.value
    );
    let err = gw
        .call(
            "files.read_text_file",
            json!({"path": "/etc/passwd"}),
            ctx(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::ToolError, "{err}");
    // A read outside the workspace and the read roots is the gateway's to refuse first: it
    // asks, and with no one to ask it is denied.
    let err = gw
        .call(
            "files.read_text_file",
            json!({"path": "/usr/share/common-licenses/GPL-3"}),
            ctx(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::ApprovalDenied, "{err}");
    assert!(
        err.message.contains("reading outside the workspace"),
        "{err}"
    );
    // The gateway's own policy still applies to MCP tools: a write outside the workspace is denied.
    let err = gw
        .call(
            "files.write_file",
            json!({"path": root.join("x.txt").display().to_string(), "content": "x"}),
            ctx(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::PolicyDenied, "{err}");
    // A relative path is the server's to resolve, against a folder of its own the policy does
    // not know (it was judged against the workspace, and the server read or wrote elsewhere):
    // judged as resolving to nothing, outside. A read asks; a write is denied.
    let err = gw
        .call("files.read_text_file", json!({"path": "hello.txt"}), ctx())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::ApprovalDenied, "{err}");
    let err = gw
        .call(
            "files.write_file",
            json!({"path": "x.txt", "content": "x"}),
            ctx(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::PolicyDenied, "{err}");
    assert!(!std::path::Path::new("x.txt").exists());
    manager.shutdown().await;
}

#[test]
fn desktop_mcp_servers_format_is_accepted() {
    let text = r#"{"mcpServers": {
        "everything": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-everything"]},
        "web": {"url": "http://127.0.0.1:3001/mcp"}
    }}"#;
    let c = McpConfig::parse(text, Path::new("mcp.json")).unwrap();
    assert_eq!(c.servers.len(), 2);
    assert_eq!(
        c.servers["everything"].args[1],
        "@modelcontextprotocol/server-everything"
    );
    // A name as a person writes it is read as a registry name.
    let named = McpConfig::parse(
        r#"{"mcpServers": {"Bad Name": {"command": "x"}}}"#,
        Path::new("m.json"),
    )
    .unwrap();
    assert!(named.servers.contains_key("bad_name"), "{named:?}");
    let err = McpConfig::parse(r#"{"mcpServers": {"x": {}}}"#, Path::new("m.json")).unwrap_err();
    assert!(err.to_string().contains("exactly one of"), "{err}");
    let y = McpConfig::parse("servers:\n  e:\n    command: node\n", Path::new("m.yaml")).unwrap();
    assert_eq!(y.servers["e"].command.as_deref(), Some("node"));
    // A key written twice would drop the first silently: refused, in JSON and YAML.
    let err = McpConfig::parse(
        r#"{"mcpServers": {"x": {"command": "node", "env": {"TOKEN": "a", "TOKEN": "b"}}}}"#,
        Path::new("m.json"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("m.json") && err.contains("duplicate key `TOKEN`"),
        "{err}"
    );
    let err = McpConfig::parse(
        "servers:\n  e:\n    command: node\n  e:\n    command: python\n",
        Path::new("m.yaml"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("duplicate key `e`"), "{err}");
    // Sections of a shared file that other programs read are theirs to judge.
    let shared = McpConfig::parse(
        r#"{"preferences": {"theme": "dark", "theme": "light"}, "mcpServers": {"x": {"command": "node"}}}"#,
        Path::new("m.json"),
    )
    .unwrap();
    assert_eq!(shared.servers.len(), 1);
}

/// Entries that could only fail later (at connect, with the transport's own words) are refused
/// when the file is read, naming the file and the server, without quoting URLs or values.
#[test]
fn unusable_server_entries_are_refused_naming_file_and_server() {
    let cases = [
        (r#"{"command": ""}"#, "`command` is empty"),
        (
            r#"{"url": "not a url?token=s3cret"}"#,
            "`url` is not a valid URL",
        ),
        (r#"{"url": "ftp://h/mcp?token=s3cret"}"#, "not ftp://"),
        (
            r#"{"command": "node", "headers": {"X-Key": "v"}}"#,
            "`headers` are sent to `url` servers only",
        ),
        (
            r#"{"url": "http://127.0.0.1:1/mcp", "env": {"A": "b"}}"#,
            "belong to `command` servers",
        ),
        (
            r#"{"command": "node", "env": {"": "s3cret"}}"#,
            "name \"\" is empty",
        ),
        (r#"{"command": "node", "env": {"A=B": "c"}}"#, "holds '='"),
        (
            r#"{"url": "http://127.0.0.1:1/mcp", "headers": {"Bad Name": "v"}}"#,
            "not a valid HTTP header name",
        ),
        (
            r#"{"url": "http://127.0.0.1:1/mcp", "headers": {"X": "s3cret\nInjected: 1"}}"#,
            "characters a header cannot carry",
        ),
        (
            r#"{"url": "http://127.0.0.1:1/mcp", "headers": {"Authorization: Bearer s3cret": "v"}}"#,
            "not a valid HTTP header name",
        ),
        (
            r#"{"command": "node", "timeout_ms": 0}"#,
            "`timeout_ms` must be at least 1",
        ),
        (
            r#"{"command": "node", "startup_timeout_ms": 0}"#,
            "`startup_timeout_ms` must be at least 1",
        ),
    ];
    for (entry, expected) in cases {
        let text = format!(r#"{{"mcpServers": {{"srv": {entry}}}}}"#);
        let err = McpConfig::parse(&text, Path::new("conf/mcp.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("conf/mcp.json: MCP server \"srv\": ") && err.contains(expected),
            "{entry}: {err}"
        );
        assert!(
            !err.contains("s3cret"),
            "{entry}: a value was quoted: {err}"
        );
        // A configuration built in code gets the same check before anything starts.
        let config: McpConfig = serde_json::from_str(&text).unwrap();
        let Err(err) = McpServer::new("srv", config.servers["srv"].clone(), &mut Redactor::new())
        else {
            panic!("{entry}: accepted in code");
        };
        assert!(err.to_string().contains(expected), "{entry}: {err}");
    }
}

/// An entry switched off is never started, so a stale one does not stop the file loading.
#[test]
fn a_disabled_entry_is_checked_for_its_name_only() {
    let text = r#"{"mcpServers": {"old": {"url": "ws://gone/mcp", "timeout_ms": 0, "disabled": true},
                                  "ok": {"command": "node"}}}"#;
    let c = McpConfig::parse(text, Path::new("mcp.json")).unwrap();
    assert_eq!(c.servers.len(), 2);
    let err = McpConfig::parse(
        r#"{"mcpServers": {"": {"disabled": true}}}"#,
        Path::new("mcp.json"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("server names are"), "{err}");
}

/// A desktop host's names (`GitHub`, `Brave Search`) are read as registry names, as tool names
/// are, rather than refusing the whole file; two that become one name are refused, naming both.
#[test]
fn server_names_as_people_write_them_are_read_as_registry_names() {
    let c = McpConfig::parse(
        r#"{"mcpServers": {"GitHub": {"command": "gh-mcp"}, "Brave Search": {"command": "brave"}}}"#,
        Path::new("claude_desktop_config.json"),
    )
    .unwrap();
    assert_eq!(
        c.servers.keys().collect::<Vec<_>>(),
        ["brave_search", "github"]
    );
    let err = McpConfig::parse(
        r#"{"mcpServers": {"GitHub": {"command": "a"}, "github": {"command": "b"}}}"#,
        Path::new("mcp.json"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("mcp.json: ")
            && err.contains("\"GitHub\" and \"github\" are both named \"github\""),
        "{err}"
    );
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn stdio(command: &str) -> McpServerConfig {
    McpServerConfig {
        command: Some(command.into()),
        ..McpServerConfig::default()
    }
}

/// A servers file shared with a desktop host keeps the host's keys, and is replaced whole.
#[test]
fn adding_a_server_keeps_everything_else_in_the_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("claude_desktop_config.json");
    std::fs::write(
        &path,
        r#"{"globalShortcut": "Ctrl+Space",
            "mcpServers": {"old": {"command": "node", "type": "stdio", "disabled": true}}}"#,
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    McpConfig::add_server(&path, "new", &stdio("npx")).unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        doc,
        json!({"globalShortcut": "Ctrl+Space", "mcpServers": {
            "old": {"command": "node", "type": "stdio", "disabled": true},
            "new": {"command": "npx"}}})
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "the file's permissions were not kept");
    assert_eq!(dir_names(dir.path()), ["claude_desktop_config.json"]);

    // A second server of the same name: refused, the file untouched.
    let before = std::fs::read(&path).unwrap();
    let err = McpConfig::add_server(&path, "new", &stdio("other"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("claude_desktop_config.json") && err.contains("\"new\": is in the file"),
        "{err}"
    );
    // An unusable entry: refused before the file is touched.
    let err = McpConfig::add_server(&path, "bad", &stdio(""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`command` is empty"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // A file that does not exist is created, with its folder, private to its owner.
    let fresh = dir.path().join("sub/mcp.json");
    McpConfig::add_server(&fresh, "a", &stdio("node")).unwrap();
    assert_eq!(McpConfig::load(&fresh).unwrap().servers["a"], stdio("node"));
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A link (a dotfile manager's) stays a link; its target changes.
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&fresh, &link).unwrap();
    McpConfig::add_server(&link, "b", &stdio("node")).unwrap();
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(McpConfig::load(&fresh).unwrap().servers.len(), 2);
    // A link to a file not made yet: the file is made, the link stays.
    let dangling = dir.path().join("dangling.json");
    std::os::unix::fs::symlink("made-by-add.json", &dangling).unwrap();
    McpConfig::add_server(&dangling, "c", &stdio("node")).unwrap();
    assert!(
        std::fs::symlink_metadata(&dangling)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let made = dir.path().join("made-by-add.json");
    assert_eq!(McpConfig::load(&made).unwrap().servers["c"], stdio("node"));
}

#[test]
fn adding_to_a_yaml_file_writes_yaml_and_refuses_to_drop_comments() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mcp.yaml");
    std::fs::write(&path, "servers:\n  a:\n    command: node\nowner: me\n").unwrap();
    McpConfig::add_server(&path, "b", &stdio("npx")).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.trim_start().starts_with('{'), "not YAML: {text}");
    let doc: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(
        doc,
        json!({"servers": {"a": {"command": "node"}, "b": {"command": "npx"}}, "owner": "me"})
    );
    let commented = "# my servers\nservers:\n  a:\n    command: node\n";
    std::fs::write(&path, commented).unwrap();
    let err = McpConfig::add_server(&path, "b", &stdio("npx"))
        .unwrap_err()
        .to_string();
    // The entry is on the error's one line, and pastes in as it is.
    let entry = err
        .split_once("servers key by hand: ")
        .map(|(_, e)| e)
        .unwrap_or_else(|| panic!("{err}"));
    assert!(err.contains("has comments") && !err.contains('\n'), "{err}");
    let pasted = format!("{commented}  {entry}\n");
    let doc: serde_json::Value = serde_yaml_ng::from_str(&pasted).unwrap();
    assert_eq!(doc["servers"]["b"]["command"], "npx", "{pasted}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), commented);
}

/// Adds from many threads at once all land: none reads the file while another replaces it.
#[test]
fn concurrent_adds_lose_no_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mcp.json");
    let adders: Vec<_> = (0..8)
        .map(|i| {
            let path = path.clone();
            std::thread::spawn(move || McpConfig::add_server(&path, &format!("s{i}"), &stdio("x")))
        })
        .collect();
    for a in adders {
        a.join().unwrap().unwrap();
    }
    assert_eq!(McpConfig::load(&path).unwrap().servers.len(), 8);
    assert_eq!(dir_names(dir.path()), ["mcp.json"]);
}

#[tokio::test]
async fn tools_list_changed_is_honoured() {
    // A server written with the official TypeScript SDK that adds a tool after connecting,
    // which makes the SDK send notifications/tools/list_changed.
    let sdk = npm_dir().join("sdk/dist/esm");
    assert!(
        sdk.exists(),
        "the MCP tests need @modelcontextprotocol/sdk in .test-deps/npm: run scripts/test-deps.sh"
    );
    let script = format!(
        r#"
import {{ McpServer }} from "file://{sdk}/server/mcp.js";
import {{ StdioServerTransport }} from "file://{sdk}/server/stdio.js";
const server = new McpServer({{ name: "dynamic", version: "1.0.0" }});
server.registerTool("first", {{ description: "the first tool" }}, async () => ({{ content: [{{ type: "text", text: "one" }}] }}));
await server.connect(new StdioServerTransport());
setTimeout(() => {{
  server.registerTool("second", {{ description: "added later" }}, async () => ({{ content: [{{ type: "text", text: "two" }}] }}));
}}, 500);
"#,
        sdk = sdk.display()
    );
    let cfg = McpServerConfig {
        command: Some("node".into()),
        args: vec!["--input-type=module".into(), "-e".into(), script],
        ..McpServerConfig::default()
    };
    let (gw, manager, _log) = start(vec![("dyn", cfg)]).await;
    assert!(gw.registry().get("dyn.first").is_some());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while gw.registry().get("dyn.second").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "dyn.second never appeared: {:?}",
            gw.registry().names()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = gw.call("dyn.second", json!({}), ctx()).await;
    // The TS SDK marks tools without annotations as write-capable; the default policy asks for
    // writes it cannot locate, and nobody is there to approve.
    assert_eq!(out.unwrap_err().class, ErrorClass::ApprovalDenied);
    manager.shutdown().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for_port(port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "server on port {port} did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn streamable_http_client_against_server_everything() {
    let js = server_js("server-everything");
    let port = free_port();
    let _server = tokio::process::Command::new("node")
        .arg(js)
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for_port(port).await;
    let cfg = McpServerConfig {
        url: Some(format!("http://127.0.0.1:{port}/mcp")),
        ..McpServerConfig::default()
    };
    let (gw, manager, _log) = start(vec![("web", cfg)]).await;
    assert!(
        gw.registry().get("web.echo").is_some(),
        "{:?}",
        gw.registry().names()
    );
    let out = gw
        .call("web.echo", json!({"message": "over http"}), ctx())
        .await
        .unwrap();
    assert_eq!(out.value, json!("Echo: over http"));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut c = ctx();
    c.progress = Some(tx);
    gw.call(
        "web.trigger-long-running-operation",
        json!({"duration": 0.2, "steps": 2}),
        c,
    )
    .await
    .unwrap();
    let mut n = 0;
    while rx.try_recv().is_ok() {
        n += 1;
    }
    assert_eq!(n, 2);
    // Errors from the server.
    let tool = gw.registry().get("web.get-sum").unwrap();
    let err = tool
        .tool()
        .call(json!({"a": "two"}), ctx())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.class,
            ErrorClass::ToolError | ErrorClass::InvalidArguments
        ),
        "{err}"
    );
    // Cancellation.
    let c = ctx();
    let token = c.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        token.cancel();
    });
    let long = json!({"duration": 30, "steps": 30});
    let err = gw
        .call("web.trigger-long-running-operation", long.clone(), c)
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Cancelled, "{err}");
    manager.shutdown().await;
}

#[tokio::test]
async fn streamable_http_server_killed_mid_call_then_back() {
    let js = server_js("server-everything");
    let port = free_port();
    let spawn = || {
        tokio::process::Command::new("node")
            .arg(&js)
            .arg("streamableHttp")
            .env("PORT", port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut first = spawn();
    wait_for_port(port).await;
    let cfg = McpServerConfig {
        url: Some(format!("http://127.0.0.1:{port}/mcp")),
        timeout_ms: Some(5000),
        ..McpServerConfig::default()
    };
    let (gw, manager, _log) = start(vec![("web", cfg)]).await;
    let server = manager.servers()[0].clone();
    let generation = server.generation();
    let call = gw.call(
        "web.trigger-long-running-operation",
        json!({"duration": 30, "steps": 30}),
        ctx(),
    );
    let killer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        first.kill().await.unwrap();
    };
    let started = std::time::Instant::now();
    let (result, ()) = tokio::join!(call, killer);
    let err = result.unwrap_err();
    assert!(
        matches!(err.class, ErrorClass::ToolError | ErrorClass::Timeout),
        "{err}"
    );
    assert!(err.message.contains("web"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
    // Back on the same port: the client reconnects (a new session) and calls work again.
    let _second = spawn();
    wait_for_port(port).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let last = match gw
            .call("web.echo", json!({"message": "again"}), ctx())
            .await
        {
            Ok(out) => {
                assert_eq!(out.value, json!("Echo: again"));
                break;
            }
            Err(e) => e,
        };
        assert!(
            std::time::Instant::now() < deadline,
            "no recovery (generation {}): {last}",
            server.generation()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = generation;
    manager.shutdown().await;
}

#[tokio::test]
async fn garbage_in_the_middle_of_a_session_does_not_hang_a_call() {
    let sdk = npm_dir().join("sdk/dist/esm");
    assert!(
        sdk.exists(),
        "the MCP tests need @modelcontextprotocol/sdk in .test-deps/npm: run scripts/test-deps.sh"
    );
    let script = format!(
        r#"
import {{ McpServer }} from "file://{sdk}/server/mcp.js";
import {{ StdioServerTransport }} from "file://{sdk}/server/stdio.js";
const server = new McpServer({{ name: "noisy", version: "1.0.0" }});
server.registerTool("garble", {{ description: "writes garbage and never answers", annotations: {{ readOnlyHint: true }} }}, async () => {{
  process.stdout.write("this is not JSON-RPC\n{{\"jsonrpc\":\"2.0\",\"id\":99999,\"result\":{{}}}}\n{{broken\n");
  await new Promise((r) => setTimeout(r, 60000));
  return {{ content: [] }};
}});
server.registerTool("ok", {{ description: "answers", annotations: {{ readOnlyHint: true }} }}, async () => ({{ content: [{{ type: "text", text: "fine" }}] }}));
await server.connect(new StdioServerTransport());
"#,
        sdk = sdk.display()
    );
    let cfg = McpServerConfig {
        command: Some("node".into()),
        args: vec!["--input-type=module".into(), "-e".into(), script],
        timeout_ms: Some(1000),
        ..McpServerConfig::default()
    };
    let (gw, manager, _log) = start(vec![("noisy", cfg)]).await;
    let started = std::time::Instant::now();
    let err = gw.call("noisy.garble", json!({}), ctx()).await.unwrap_err();
    assert!(
        matches!(err.class, ErrorClass::Timeout | ErrorClass::ToolError),
        "{err}"
    );
    assert!(err.message.contains("noisy"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The session survives the noise, or is restarted; either way calls work again.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match gw.call("noisy.ok", json!({}), ctx()).await {
            Ok(out) => {
                assert_eq!(out.value, json!("fine"));
                break;
            }
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "server never recovered: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    manager.shutdown().await;
}

#[tokio::test]
async fn streamable_http_headers_and_tokens_are_sent_and_redacted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A fake server that records the first request's head and answers 500.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let captured = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 8192];
        let n = s.read(&mut buf).await.unwrap();
        let _ = s.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
        String::from_utf8_lossy(&buf[..n]).to_lowercase()
    });
    // PATH stands in for a secret (setting a variable could race with other tests' threads).
    let secret = std::env::var("PATH").unwrap();
    let cfg = McpServerConfig {
        url: Some(format!("http://127.0.0.1:{port}/mcp")),
        headers: [
            ("Authorization".to_string(), "Bearer ${PATH}".to_string()),
            ("X-Team".to_string(), "blue".to_string()),
        ]
        .into_iter()
        .collect(),
        timeout_ms: Some(3000),
        startup_timeout_ms: Some(3000),
        ..McpServerConfig::default()
    };
    let config = McpConfig {
        servers: [("h".to_string(), cfg)].into_iter().collect(),
    };
    let registry = Arc::new(Registry::new());
    let mut redactor = Redactor::new();
    let (manager, errors) = McpManager::start(&config, registry, &mut redactor)
        .await
        .unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), captured)
        .await
        .unwrap()
        .unwrap();
    let want = format!("authorization: bearer {}", secret.to_lowercase());
    assert!(head.contains(&want), "{head}");
    assert!(head.contains("x-team: blue"), "{head}");
    assert_eq!(errors.len(), 1, "the fake server cannot initialize");
    assert!(!errors[0].to_string().contains(&secret));
    assert_eq!(redactor.redact_str(&secret), "[REDACTED]");
    drop(manager);
}

/// A server whose tool names become one registry name (`Die Now!` and `die_now_` are both
/// `x.die_now_`): the first is registered, and the warning names both, so the user knows
/// which one a call reaches. The server is a few lines of Python speaking MCP over stdio.
#[tokio::test]
async fn tool_names_that_become_one_are_named_in_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("server.py");
    std::fs::write(
        &script,
        r#"import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m:
        continue
    if m["method"] == "initialize":
        r = {"protocolVersion": m["params"]["protocolVersion"], "capabilities": {"tools": {}},
             "serverInfo": {"name": "twins", "version": "1"}}
    elif m["method"] == "tools/list":
        r = {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in ["Die Now!", "die_now_", "other"]]}
    else:
        r = {}
    print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": r}), flush=True)
"#,
    )
    .unwrap();
    let config = McpConfig {
        servers: [(
            "x".to_string(),
            McpServerConfig {
                command: Some("/usr/bin/python3".into()),
                args: vec![script.display().to_string()],
                ..McpServerConfig::default()
            },
        )]
        .into(),
    };
    let (manager, registry, text) = start_reporting(&config).await;
    assert_eq!(text.len(), 1, "{text:?}");
    assert!(
        text[0].contains(r#""Die Now!" and "die_now_" both become "x.die_now_""#)
            && text[0].contains(r#"only "Die Now!" can be called"#),
        "{text:?}"
    );
    assert!(registry.get("x.die_now_").is_some() && registry.get("x.other").is_some());
    manager.shutdown().await;
}

/// A stdio server does not outlive what started it: the thread that started the manager goes
/// away without stopping it (as when the process is killed mid-run), and the server is killed.
/// (One busy when its run was killed went on acting beside the resume that retried its call.)
#[test]
fn a_server_dies_with_the_thread_that_started_it() {
    // Found by an environment variable of its own: other tests start the same server.
    let marker = format!("AGENT_RUNTIME_ORPHAN_TEST={}", std::process::id());
    let value = marker.split_once('=').unwrap().1.to_string();
    let starter = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let config = McpConfig {
            servers: [(
                "e".to_string(),
                McpServerConfig {
                    env: [("AGENT_RUNTIME_ORPHAN_TEST".to_string(), value)]
                        .into_iter()
                        .collect(),
                    ..everything(None)
                },
            )]
            .into_iter()
            .collect(),
        };
        let (manager, errors) = rt
            .block_on(McpManager::start(
                &config,
                Arc::new(Registry::new()),
                &mut Redactor::new(),
            ))
            .unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        // Neither the manager nor its runtime is dropped (that would stop the server): only
        // the thread ends.
        std::mem::forget(manager);
        std::mem::forget(rt);
    });
    starter.join().unwrap();
    let running = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .any(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == marker.as_bytes()))
            })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while running() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server still runs after the thread that started it ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A call its caller drops unanswered (the gateway's own time limit, a run's driver ending a
/// task's attempt; not a cancelled token) is cancelled at the server too: it was left working,
/// and a retry ran beside it.
#[tokio::test]
async fn a_dropped_call_is_cancelled_at_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("got");
    // It never answers `slow`, and notes each other message it gets, by method, in a file.
    let config = python_server(PythonServer {
        tools: r#"[{"name": "slow", "inputSchema": {"type": "object"},
                    "annotations": {"readOnlyHint": True}}]"#,
        on_other: r#"open(sys.argv[1] + "." + method.replace("/", "_"), "w").write(json.dumps(m.get("params")))"#,
        ..PythonServer::new(&notes)
    });
    let (gw, manager, _log) = start(vec![("py", config)]).await;
    let noted = |method: &str| dir.path().join(format!("got.{method}"));
    // Dropped once the server has the call (however long that takes on a busy machine).
    let mut call = Box::pin(gw.call("py.slow", json!({}), ctx()));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !noted("tools_call").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the call never reached the server"
        );
        tokio::select! {
            r = &mut call => panic!("the server never answers, yet: {r:?}"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    drop(call);
    let marker = noted("notifications_cancelled");
    while !marker.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no notifications/cancelled reached the server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let note: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&marker).unwrap()).unwrap();
    assert!(note.get("requestId").is_some(), "{note}");
    manager.shutdown().await;
}

/// A server that answers `initialize`, then exits, is restarted with a growing wait (200 ms,
/// 400, 800, 1,600 ...), not every few hundred milliseconds for ever: its successful start
/// does not count as having stayed up.
#[tokio::test]
async fn a_server_that_dies_after_each_start_is_restarted_ever_more_slowly() {
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    // It notes each start, and exits 0.1 s after listing its tools.
    let config = python_server(PythonServer {
        on_start: r#"open(sys.argv[1], "a").write("start\n")"#,
        on_list: "threading.Timer(0.1, lambda: os._exit(0)).start()",
        ..PythonServer::new(&starts)
    });
    let (_gw, manager, _log) = start(vec![("dies", config)]).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let count = std::fs::read_to_string(&starts).unwrap().lines().count();
    manager.shutdown().await;
    // Restarting at once after each start's 0.1 s of life is a dozen starts in 5 s; with the
    // wait doubling, the first start and four restarts (at about 0.3, 0.8, 1.7 and 3.4 s).
    assert!((2..=6).contains(&count), "{count} starts in 5 s");
}

/// An MCP call's recorded limit is the one that holds: the server's `timeout_ms` when the
/// caller's is longer or unset (it recorded the gateway's default, 120 s, where 60 s held).
#[tokio::test]
async fn an_mcp_call_records_the_limit_that_holds() {
    let (gw, manager, log) = start(vec![("everything", everything(Some(4321)))]).await;
    for caller in [
        None,
        Some(Duration::from_secs(600)),
        Some(Duration::from_millis(1234)),
    ] {
        let mut c = ctx();
        c.timeout = caller;
        gw.call("everything.echo", json!({"message": "hi"}), c)
            .await
            .unwrap();
        let started = log
            .all()
            .into_iter()
            .rev()
            .find(|e| e.kind == EventKind::ToolStarted)
            .unwrap();
        let want = caller.map_or(4321, |t| t.as_millis().min(4321) as u64);
        assert_eq!(started.payload["timeout_ms"], want, "caller {caller:?}");
    }
    manager.shutdown().await;
}

/// One server whose entry cannot be used (a `${NAME}` that is not set) holds up nothing else:
/// it is reported, the other servers start, and a call of its tools says why it is missing.
#[tokio::test]
async fn a_server_with_an_unset_variable_is_left_out_alone() {
    let config = McpConfig {
        servers: [
            ("everything".to_string(), everything(None)),
            (
                "unset".to_string(),
                McpServerConfig {
                    command: Some("/bin/true".into()),
                    env: [(
                        "TOKEN".to_string(),
                        "${AGENT_RUNTIME_TEST_SURELY_NOT_SET}".to_string(),
                    )]
                    .into_iter()
                    .collect(),
                    ..McpServerConfig::default()
                },
            ),
        ]
        .into_iter()
        .collect(),
    };
    let (manager, registry, text) = start_reporting(&config).await;
    assert_eq!(text.len(), 1, "{text:?}");
    assert!(
        text[0].contains("\"unset\"")
            && text[0].contains("AGENT_RUNTIME_TEST_SURELY_NOT_SET is not set"),
        "{text:?}"
    );
    assert!(registry.get("everything.echo").is_some());
    let gw = GatewayBuilder::new(registry, Arc::new(MemoryLog::default()))
        .build()
        .unwrap();
    let err = gw
        .call("unset.anything", json!({}), ctx())
        .await
        .unwrap_err();
    assert!(err.message.contains("is not set"), "{err}");
    manager.shutdown().await;
}
