//! `agent-runtime tools|policy|mcp` and the MCP server's interop with the official TypeScript SDK.
//!
//! The MCP tests need node and `.test-deps/npm` (run `scripts/test-deps.sh`); they fail naming
//! what is missing.

mod common;

use std::path::{Path, PathBuf};

use common::assert_ok;

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::write(
            dir.path().join("gateway.yaml"),
            r#"
workspace: ["ws"]
policy: policy.yaml
tools:
  - name: fs.write
    description: Write a file in the workspace
    risk: write
    input_schema:
      type: object
      properties: { path: { type: string }, text: { type: string } }
      required: [path, text]
    command: ["/bin/sh", "-c", "printf %s \"$1\" > \"$0\"", "{path}", "{text}"]
  - name: sh.run
    description: Run a shell script
    risk: exec
    input_schema: { type: object, properties: { script: { type: string } }, required: [script] }
    command: ["/bin/sh", "-c", "{script}"]
"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("policy.yaml"),
            r#"
workspace: ["ws"]
rules:
  - id: no-shell-meta
    tools: ["sh.run"]
    when: [ { shell_metacharacters: { arg: script } } ]
    effect: deny
    reason: shell metacharacters are not allowed
"#,
        )
        .unwrap();
        Env { dir }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::cargo_bin("agent-runtime").unwrap();
        c.current_dir(self.dir.path())
            .env_remove("AGENT_RUNTIME_GATEWAY_CONFIG")
            // The user's data folder (the trust record) is the test's own.
            .env("XDG_DATA_HOME", self.dir.path().join("data"))
            .arg("--db")
            .arg(self.dir.path().join("events.db"))
            .arg("--plaintext");
        c
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("gateway.yaml")
    }

    /// `run FLOW --json --config gateway.yaml EXTRA...` of `flow` (YAML), which must succeed;
    /// its outcome.
    fn run_json(&self, flow: &str, extra: &[&std::ffi::OsStr]) -> Value {
        let path = self.dir.path().join("flow.yaml");
        std::fs::write(&path, flow).unwrap();
        let out = self
            .cmd()
            .arg("run")
            .arg(&path)
            .arg("--json")
            .arg("--config")
            .arg(self.config())
            .args(extra)
            .output()
            .unwrap();
        assert_ok(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The events of run `run_id`, as `audit export --format jsonl` gives them.
    fn run_events(&self, run_id: &str) -> Vec<Value> {
        let out = self
            .cmd()
            .args(["audit", "export", "--format", "jsonl", "--run", run_id])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

#[test]
fn tools_list_and_describe() {
    let env = Env::new();
    env.cmd()
        .args(["tools", "list", "--config"])
        .arg(env.config())
        .assert()
        .success()
        .stdout(predicate::str::contains("builtin.echo").and(predicate::str::contains("fs.write")));
    let out = env
        .cmd()
        .args(["tools", "list", "--json", "--config"])
        .arg(env.config())
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "sh.run" && t["risk"] == "exec")
    );
    // What a task graph can call: the workforce's native tools are listed too.
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "write_file" && t["risk"] == "write")
    );
    env.cmd()
        .args(["tools", "describe", "fs.write", "--config"])
        .arg(env.config())
        .assert()
        .success()
        .stdout(
            predicate::str::contains("\"input_schema\"")
                .and(predicate::str::contains("\"command\"")),
        );
    env.cmd()
        .args(["tools", "describe", "nope", "--config"])
        .arg(env.config())
        .assert()
        .code(2)
        .stderr(predicate::str::contains("unknown tool"));
}

#[test]
fn tools_call_through_the_pipeline() {
    let env = Env::new();
    env.cmd()
        .args([
            "tools",
            "call",
            "builtin.echo",
            "--args",
            r#"{"text":"hello"}"#,
        ])
        .assert()
        .success()
        .stdout("hello\n");
    // Bad arguments: exit 2 with what to fix.
    env.cmd()
        .args([
            "tools",
            "call",
            "builtin.echo",
            "--args",
            r#"{"txt":"hello"}"#,
        ])
        .assert()
        .code(2)
        .stderr(
            predicate::str::contains("invalid_arguments")
                .and(predicate::str::contains("\"text\" is a required property")),
        );
    env.cmd()
        .args(["tools", "call", "builtin.echo", "--args", "not json"])
        .assert()
        .code(2);
    // Arguments from standard input or a file (past a command line's 128 KiB a word).
    let long = "y".repeat(200_000);
    env.cmd()
        .args(["tools", "call", "builtin.echo", "--args", "-"])
        .write_stdin(format!(r#"{{"text":"{long}"}}"#))
        .assert()
        .success()
        .stdout(format!("{long}\n"));
    let file = env.dir.path().join("args.json");
    std::fs::write(&file, r#"{"text":"from a file"}"#).unwrap();
    env.cmd()
        .args(["tools", "call", "builtin.echo", "--args"])
        .arg(format!("@{}", file.display()))
        .assert()
        .success()
        .stdout("from a file\n");
    env.cmd()
        .args(["tools", "call", "builtin.echo", "--args", "@no-such.json"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "--args @no-such.json: cannot read it",
        ));
    env.cmd()
        .args(["tools", "call", "builtin.echo", "--timeout-ms", "0"])
        .assert()
        .code(2);
    // The native tools take only their own arguments: a stray `path` is refused as such,
    // not judged as a file to read (which asked for approval).
    for (tool, args) in [
        ("concat", r#"{"parts":["a"],"path":"/etc/passwd"}"#),
        ("sleep", r#"{"ms":1,"path":"/etc/passwd"}"#),
        ("read_file", r#"{"path":"x","file":"/etc/passwd"}"#),
    ] {
        env.cmd()
            .args(["tools", "call", tool, "--args", args])
            .assert()
            .code(2)
            .stderr(
                predicate::str::contains("invalid_arguments").and(predicate::str::contains(
                    "Additional properties are not allowed",
                )),
            );
    }
    // A write inside the workspace runs (sandboxed); outside it is denied.
    env.cmd()
        .args([
            "tools",
            "call",
            "fs.write",
            "--args",
            r#"{"path":"note.txt","text":"hi"}"#,
            "--config",
        ])
        .arg(env.config())
        .assert()
        .success();
    assert_eq!(
        std::fs::read_to_string(env.dir.path().join("ws/note.txt")).unwrap(),
        "hi"
    );
    env.cmd()
        .args([
            "tools",
            "call",
            "fs.write",
            "--args",
            r#"{"path":"../escape.txt","text":"hi"}"#,
            "--config",
        ])
        .arg(env.config())
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("policy_denied")
                .and(predicate::str::contains("default.write-outside")),
        );
    assert!(!env.dir.path().join("escape.txt").exists());
    // Exec asks; with no terminal, nobody can approve.
    env.cmd()
        .args([
            "tools",
            "call",
            "sh.run",
            "--args",
            r#"{"script":"echo hi"}"#,
            "--config",
        ])
        .arg(env.config())
        .assert()
        .code(1)
        .stderr(
            predicate::str::contains("approval_denied")
                .and(predicate::str::contains("no terminal")),
        );
}

#[test]
fn a_policy_without_a_workspace_uses_the_gateways() {
    let env = Env::new();
    std::fs::write(env.dir.path().join("bare-policy.yaml"), "rules: []\n").unwrap();
    // The configuration given by a bare file name, relative to the working directory.
    let check = |path: &str| {
        env.cmd()
            .args(["policy", "check", "--json", "--tool", "fs.write", "--args"])
            .arg(format!(r#"{{"path":{path:?},"text":"x"}}"#))
            .args(["--config", "gateway.yaml", "--policy", "bare-policy.yaml"])
            .output()
            .unwrap()
    };
    // Beside the workspace `ws` (inside the working directory, but not the workspace).
    let beside = env.dir.path().join("beside.txt").display().to_string();
    let out = check(&beside);
    assert_ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"]["rule"], "default.write-outside", "{v}");
    let inside = env.dir.path().join("ws/in.txt").display().to_string();
    let v: Value = serde_json::from_slice(&check(&inside).stdout).unwrap();
    assert_eq!(v["decision"]["rule"], "default.write-inside", "{v}");
}

/// The policy judges a relative path against the first workspace root; `read_file` and
/// `write_file` must open that same file, not one under the folder the command runs in.
#[test]
fn file_tools_open_the_path_the_policy_judged() {
    let env = Env::new();
    let root = env.dir.path();
    std::fs::create_dir_all(root.join("ws/secret")).unwrap();
    std::fs::write(root.join("ws/secret/key"), "TOPSECRET").unwrap();
    std::fs::create_dir_all(root.join("ws/pub")).unwrap();
    std::os::unix::fs::symlink("../secret", root.join("ws/pub/up")).unwrap();
    std::fs::write(
        root.join("policy.yaml"),
        "workspace: [\"ws\"]\nrules:\n  - id: no-secret\n    when: [ { path_inside: { arg: \"@paths\", roots: [\"ws/secret\"] } } ]\n    effect: deny\n",
    )
    .unwrap();
    let call = |cwd: &Path, tool: &str, args: &str| {
        env.cmd()
            .current_dir(cwd)
            .args(["tools", "call", tool, "--args", args, "--config"])
            .arg(env.config())
            .output()
            .unwrap()
    };
    // From `ws/pub`, `up/key` is the secret for the process, but the policy judged
    // `ws/up/key`: the tool opens that (which does not exist), never the secret.
    let out = call(&root.join("ws/pub"), "read_file", r#"{"path":"up/key"}"#);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success() && !all.contains("TOPSECRET"), "{all}");
    assert!(all.contains("ws/up/key"), "{all}");
    // A relative write from another folder lands in the workspace, where it was judged.
    std::fs::create_dir_all(root.join("other")).unwrap();
    let out = call(
        &root.join("other"),
        "write_file",
        r#"{"path":"written.txt","text":"x"}"#,
    );
    assert_ok(&out);
    assert!(root.join("ws/written.txt").exists());
    assert!(!root.join("other/written.txt").exists());
}

/// A server that cannot be reached: its tools are unavailable (exit 1), not unknown (exit 2),
/// and what is shown of it holds neither the URL's secrets nor rmcp's type names.
#[test]
fn an_unreachable_mcp_server_is_named_without_its_url_secrets() {
    let env = Env::new();
    let servers = env.dir.path().join("servers.json");
    std::fs::write(
        &servers,
        r#"{"mcpServers": {
            "dead": {"command": "/bin/false"},
            "web": {"url": "http://user:hunter2pw@127.0.0.1:1/mcp?token=qs-secret-999", "startup_timeout_ms": 3000}
        }}"#,
    )
    .unwrap();
    let check = |args: &[&str], code: i32| {
        let out = env
            .cmd()
            .args(args)
            .arg("--mcp-config")
            .arg(&servers)
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(code), "{args:?}: {all}");
        for leaked in ["hunter2pw", "qs-secret-999", "rmcp::"] {
            assert!(!all.contains(leaked), "{args:?} shows {leaked}: {all}");
        }
        all
    };
    let all = check(&["tools", "call", "dead.anything", "--args", "{}"], 1);
    assert!(
        all.contains("\"dead.anything\" is a tool of MCP server \"dead\", which cannot be reached"),
        "{all}"
    );
    let all = check(&["tools", "call", "web.anything", "--args", "{}"], 1);
    assert!(all.contains("http://127.0.0.1:1/mcp?..."), "{all}");
    check(&["mcp", "list", "--tools"], 0);
    let all = check(&["mcp", "list", "--json"], 0);
    assert!(all.contains("http://127.0.0.1:1/mcp?..."), "{all}");
}

/// `--agent agent:reviewer` is the agent `reviewer`, as rules name it.
#[test]
fn an_agent_given_with_its_prefix_is_that_agent() {
    let env = Env::new();
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/policy.yaml");
    for agent in ["reviewer", "agent:reviewer"] {
        let out = env
            .cmd()
            .args([
                "policy",
                "check",
                "--json",
                "--tool",
                "write_file",
                "--agent",
                agent,
            ])
            .args(["--args", r#"{"path":"x","text":"y"}"#, "--policy"])
            .arg(&examples)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(v["decision"]["rule"], "reviewers-read-only", "{agent}: {v}");
    }
}

/// The commands that `examples/gateway.yaml` and `examples/policy.yaml` show in their comments
/// run, and decide as the rules they point at say (one once named a tool no example defined).
#[test]
fn the_example_configuration_decides_as_its_comments_say() {
    let env = Env::new();
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut shown = Vec::new();
    for file in ["gateway.yaml", "policy.yaml"] {
        let text = std::fs::read_to_string(examples.join(file)).unwrap();
        shown.extend(text.lines().filter_map(|l| {
            l.strip_prefix("#   agent-runtime policy check --config examples/gateway.yaml --tool sh.run --args '")
                .and_then(|rest| rest.strip_suffix('\''))
                .map(str::to_string)
        }));
    }
    assert_eq!(shown.len(), 3, "{shown:?}");
    for (args, rule, shown_in_example) in [
        (r#"{"command":"ls; rm -rf /"}"#, "no-shell-tricks", true),
        (r#"{"command":"git status"}"#, "git-inspect", true),
        // `argument` matches any later word: these carried `status` past the allow rule.
        (
            r#"{"command":"git -c core.fsmonitor=evil.sh status"}"#,
            "git-writing-or-running",
            false,
        ),
        (
            r#"{"command":"git clean -fdx -e status"}"#,
            "git-writing-or-running",
            false,
        ),
    ] {
        assert!(
            !shown_in_example || shown.iter().any(|s| s == args),
            "{args} is not shown"
        );
        let out = env
            .cmd()
            .args([
                "policy", "check", "--json", "--tool", "sh.run", "--args", args,
            ])
            .arg("--config")
            .arg(examples.join("gateway.yaml"))
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(v["decision"]["rule"], rule, "{args}: {v}");
    }
}

#[test]
fn policy_check_names_the_rule() {
    let env = Env::new();
    env.cmd()
        .args([
            "policy",
            "check",
            "--tool",
            "sh.run",
            "--args",
            r#"{"script":"ls; rm -rf /"}"#,
            "--config",
        ])
        .arg(env.config())
        .assert()
        .success()
        .stdout(
            predicate::str::contains("decision:   deny")
                .and(predicate::str::contains(
                    r#"arguments:  {"script":"ls; rm -rf /"}"#,
                ))
                .and(predicate::str::contains("no-shell-meta"))
                .and(predicate::str::contains(
                    "shell metacharacters are not allowed",
                )),
        );
    // `policy check --json` of a call to fs.write; its standard output.
    let check_write = |args: &str| {
        let out = env
            .cmd()
            .args([
                "policy", "check", "--json", "--tool", "fs.write", "--args", args,
            ])
            .arg("--config")
            .arg(env.config())
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let v: Value =
        serde_json::from_str(&check_write(r#"{"path":"/etc/passwd","text":"x"}"#)).unwrap();
    assert_eq!(v["decision"]["effect"], "deny");
    assert_eq!(v["decision"]["rule"], "default.write-outside");
    assert_eq!(v["risk"], "write");
    // The report shows the arguments as the call's event would record them: redacted.
    let text = check_write(r#"{"path":"ws/a","text":"x","api_key":"hunter2-secret"}"#);
    assert!(!text.contains("hunter2-secret"), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["arguments"]["api_key"], "[REDACTED]");
    env.cmd()
        .args(["policy", "check", "--tool", "nope", "--args", "{}"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("unknown tool"));
}

/// A mistake in a configuration, policy or servers file exits 2 (bad input, as documented) and
/// names the file; `mcp add` refuses an entry that could only fail later, and writes nothing.
#[test]
fn configuration_mistakes_exit_2_naming_the_file() {
    let env = Env::new();
    let mut config = std::fs::read_to_string(env.config()).unwrap();
    config.push_str(
        "  - name: sh.run\n    description: again\n    risk: read\n    input_schema: { type: object }\n    command: [/bin/true]\n",
    );
    let twice = env.dir.path().join("twice.yaml");
    std::fs::write(&twice, config).unwrap();
    env.cmd()
        .args(["tools", "list", "--config"])
        .arg(&twice)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(format!(
            "{}: tool \"sh.run\" is registered twice",
            twice.display()
        )));
    let policy = env.dir.path().join("policy.yaml");
    std::fs::write(&policy, "version: 7\nrules: []\n").unwrap();
    env.cmd()
        .args(["tools", "list", "--config"])
        .arg(env.config())
        .assert()
        .code(2)
        // `FILE: WHAT`, as the configuration's own mistakes are reported.
        .stderr(predicate::str::starts_with(format!(
            "error: {}: version 7 is not a policy format",
            policy.display()
        )));
    std::fs::remove_file(&policy).unwrap();
    env.cmd()
        .args(["tools", "list", "--config"])
        .arg(env.config())
        .assert()
        .code(2)
        .stderr(predicate::str::starts_with(format!(
            "error: {}: cannot read it: ",
            policy.display()
        )));

    let add = |extra: &[&str]| {
        let mut c = env.cmd();
        c.args(["mcp", "add", "srv", "--mcp-config", "servers.json"])
            .args(extra);
        c.assert()
    };
    add(&["--url", "localhost:8080/mcp"])
        .code(2)
        .stderr(predicate::str::contains("must be http:// or https://"));
    add(&["--url", "http://[::1/mcp"])
        .code(2)
        .stderr(predicate::str::contains("`url` is not a valid URL"));
    add(&["--command", "node", "--env", "=value"])
        .code(2)
        .stderr(predicate::str::contains("name \"\" is empty"));
    add(&["--command", "node", "--env", "A=1", "--env", "A=2"])
        .code(2)
        .stderr(predicate::str::contains("--env: KEY \"A\" is given twice"));
    add(&["--command", "node", "--timeout-ms", "0"])
        .code(2)
        .stderr(predicate::str::contains("`timeout_ms` must be at least 1"));
    add(&["--command", ""])
        .code(2)
        .stderr(predicate::str::contains(
            "servers.json: MCP server \"srv\": `command` is empty",
        ));
    assert!(!env.dir.path().join("servers.json").exists());
    // A file with an unusable entry: named with the server when it is read.
    std::fs::write(
        env.dir.path().join("servers.json"),
        r#"{"mcpServers": {"srv": {"command": "node", "headers": {"A": "b"}}}}"#,
    )
    .unwrap();
    env.cmd()
        .args(["mcp", "list", "--mcp-config", "servers.json"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "servers.json: MCP server \"srv\": `headers` are sent to `url` servers only",
        ));

    // Limits no call could live with, refused when the file is read.
    let tool = |extra: &str| {
        format!(
            "tools:\n  - name: t\n    description: d\n    risk: read\n    input_schema: {{ type: object }}\n    command: [/bin/true]\n{extra}"
        )
    };
    for (text, says) in [
        (
            tool("    limits: { memory_mb: 0 }\n"),
            "limits.memory_mb is 0; it must be between 16 and",
        ),
        (
            tool("    limits: { processes: 18446744073709551615 }\n"),
            "limits.processes is 18446744073709551615",
        ),
        (
            tool("    success_exit_codes: [0, 300]\n"),
            "success_exit_codes holds 300",
        ),
        (
            "limits: { default_timeout_ms: 0 }\n".to_string(),
            "limits.default_timeout_ms is 0",
        ),
    ] {
        let file = env.dir.path().join("limits.yaml");
        std::fs::write(&file, &text).unwrap();
        env.cmd()
            .args(["tools", "list", "--config"])
            .arg(&file)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(says));
    }
    // A file past 4 MiB (or a device that never ends) and one that is not UTF-8.
    let big = env.dir.path().join("big.yaml");
    std::fs::write(&big, "#".repeat(5 << 20)).unwrap();
    for (file, says) in [
        (
            big.as_path(),
            "over 4 MiB, the most a configuration file may have",
        ),
        (Path::new("/dev/zero"), "over 4 MiB"),
    ] {
        env.cmd()
            .args(["tools", "list", "--config"])
            .arg(file)
            .timeout(std::time::Duration::from_secs(60))
            .assert()
            .code(2)
            .stderr(predicate::str::contains(says));
    }
    // Serving beyond loopback is bad input, refused before anything is opened.
    env.cmd()
        .args(["mcp", "serve", "--http", "0.0.0.0:0"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "--http 0.0.0.0:0: the MCP endpoint has no authentication",
        ));
    let latin1 = env.dir.path().join("latin1.yaml");
    std::fs::write(&latin1, b"workspace: [\"ws\"]\n# caf\xe9\n").unwrap();
    env.cmd()
        .args(["tools", "list", "--config"])
        .arg(&latin1)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "not UTF-8 text (byte 0xe9 at line 2 column 6)",
        ));
}

fn npm() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.test-deps/npm/node_modules/@modelcontextprotocol");
    assert!(
        p.join("server-everything/dist/index.js").exists() && p.join("sdk/package.json").exists(),
        "the MCP CLI tests need .test-deps/npm (server-everything and the TypeScript SDK): run scripts/test-deps.sh"
    );
    assert!(
        std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "the MCP CLI tests need node (Debian package nodejs): run scripts/test-deps.sh"
    );
    p
}

#[test]
fn mcp_add_list_and_call_a_server() {
    let npm = npm();
    let env = Env::new();
    let server = npm.join("server-everything/dist/index.js");
    env.cmd()
        .args(["mcp", "add", "everything", "--command", "node", "--arg"])
        .arg(&server)
        .args(["--arg", "stdio"])
        .assert()
        .success()
        .stdout(predicate::str::contains("added everything"));
    env.cmd()
        .args(["mcp", "add", "everything", "--command", "node"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("already"));
    // A name as a person writes it is refused, with the one its tools would be listed under.
    env.cmd()
        .args(["mcp", "add", "My Server", "--command", "node"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("(`my_server` is one)"));
    env.cmd()
        .args(["mcp", "list", "--tools"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("everything  stdio")
                .and(predicate::str::contains("everything.echo")),
        );
    env.cmd()
        .args([
            "tools",
            "call",
            "everything.echo",
            "--args",
            r#"{"message":"via mcp"}"#,
        ])
        .assert()
        .success()
        .stdout("Echo: via mcp\n");
}

/// `mcp serve --stdio` in `cwd` with `db` and `config`: the child, its stdin, and the lines it
/// answers with, read on a thread, so that a server that never answers fails a test instead of
/// hanging it.
fn serve_stdio(
    cwd: &Path,
    db: &Path,
    config: &Path,
) -> (
    std::process::Child,
    std::process::ChildStdin,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("agent-runtime"))
        .current_dir(cwd)
        .arg("--db")
        .arg(db)
        .args(["--plaintext", "mcp", "serve", "--stdio", "--config"])
        .arg(config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, stdin, rx)
}

/// Malformed params of a method the server has are "invalid params" (-32602), not "method not
/// found" (-32601), which would send a client looking for a method that is there; a method it
/// does not have is still -32601.
#[test]
fn mcp_serve_answers_malformed_params_with_invalid_params() {
    use std::io::Write;
    let env = Env::new();
    let (mut child, mut stdin, rx) = serve_stdio(
        env.dir.path(),
        &env.dir.path().join("events.db"),
        &env.config(),
    );
    for line in [
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":5,"arguments":{"k":"hunter2-secret"}}}"#,
        r#"{"jsonrpc":"2.0","id":4,"method":"no/such/method"}"#,
    ] {
        writeln!(stdin, "{line}").unwrap();
    }
    stdin.flush().unwrap();
    let mut errors = std::collections::BTreeMap::new();
    while errors.len() < 2 {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("an answer within 30 s");
        let v: Value = serde_json::from_str(&line).unwrap();
        if let Some(id) = v["id"].as_i64().filter(|id| *id >= 2) {
            errors.insert(id, v["error"].clone());
        }
    }
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(errors[&2]["code"], -32602, "{errors:?}");
    assert!(
        errors[&2]["message"]
            .as_str()
            .unwrap()
            .contains("invalid params for tools/call"),
        "{errors:?}"
    );
    assert!(!format!("{errors:?}").contains("hunter2-secret"));
    assert_eq!(errors[&4]["code"], -32601, "{errors:?}");
}

/// Over stdio the server answers every request, also one it cannot read (not UTF-8, nested
/// too deep) with a parse error carrying its id; a notification before `initialize` does not
/// end the session; and SIGTERM ends it the way closing stdin does: the call in flight is
/// cancelled and its outcome recorded.
#[test]
fn mcp_serve_stdio_answers_what_it_cannot_read_and_ends_its_calls_on_sigterm() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "workspace: [{}]\ntools:\n  - name: t.wait\n    description: waits\n    risk: read\n    input_schema: {{ type: object }}\n    command: [sleep, \"30\"]\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let db = dir.path().join("events.db");
    let (mut child, mut stdin, rx) = serve_stdio(dir.path(), &db, &config);
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{{"name":"t.wait","arguments":{{"a":{}1{}}}}}}}"#,
        "[".repeat(300),
        "]".repeat(300)
    );
    let mut lines: Vec<Vec<u8>> = vec![
        br#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":9}}"#.to_vec(),
        br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#.to_vec(),
        br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.to_vec(),
        b"{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"tools/call\",\"params\":{\"name\":\"t.wait\",\"arguments\":{\"p\":\"a\xff\"}}}".to_vec(),
    ];
    lines.push(deep.into_bytes());
    lines.push(
        serde_json::to_vec(
            &serde_json::json!({"jsonrpc": "2.0", "id": 6, "method": "tools/call",
            "params": {"name": "builtin.echo", "arguments": {"text": "x".repeat(300_000)}}}),
        )
        .unwrap(),
    );
    lines.push(br#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"t.wait","arguments":{}}}"#.to_vec());
    for line in &lines {
        stdin.write_all(line).unwrap();
        stdin.write_all(b"\n").unwrap();
    }
    stdin.flush().unwrap();
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < 4 {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("an answer within 30 s");
        let v: Value = serde_json::from_str(&line).unwrap();
        if let Some(id) = v["id"].as_i64() {
            answers.insert(id, v);
        }
    }
    assert!(
        answers[&1]["result"]["serverInfo"].is_object(),
        "{answers:?}"
    );
    for id in [3, 4] {
        assert_eq!(answers[&id]["error"]["code"], -32700, "{answers:?}");
    }
    // A result cut to the output limit says so, in its text and its `_meta`.
    let cut = &answers[&6]["result"];
    assert_eq!(cut["_meta"]["agent-runtime/truncated"], true);
    assert!(
        cut["content"][0]["text"]
            .as_str()
            .unwrap()
            .ends_with("[truncated: the output was over the gateway's limit]")
    );
    // The call is running (its tool.started is recorded): stop the server.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let kinds = || -> Vec<String> {
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("agent-runtime"))
            .arg("--db")
            .arg(&db)
            .args(["--plaintext", "audit", "tail", "--json"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|e| e["kind"].as_str().map(String::from))
            .collect()
    };
    while !kinds().iter().any(|k| k == "tool.started") {
        assert!(std::time::Instant::now() < until, "the call never started");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: signalling the child spawned above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < until, "no exit after SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let kinds = kinds();
    assert!(kinds.iter().any(|k| k == "tool.failed"), "{kinds:?}");
}

#[test]
fn mcp_serve_stdio_interoperates_with_the_typescript_sdk() {
    let npm = npm();
    let env = Env::new();
    // The served registry includes an MCP server of its own, for progress and cancellation
    // end to end: TypeScript client -> agent-runtime -> server-everything.
    let everything = npm.join("server-everything/dist/index.js");
    std::fs::write(
        env.dir.path().join("mcp.json"),
        format!(
            r#"{{"mcpServers": {{"everything": {{"command": "node", "args": [{:?}, "stdio"]}}}}}}"#,
            everything.display().to_string()
        ),
    )
    .unwrap();
    let mut config = std::fs::read_to_string(env.config()).unwrap();
    config.push_str("mcp: mcp.json\n");
    std::fs::write(env.config(), config).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("agent-runtime");
    let sdk = npm.join("sdk/dist/esm");
    let script = format!(
        r#"
import {{ Client }} from "file://{sdk}/client/index.js";
import {{ StdioClientTransport }} from "file://{sdk}/client/stdio.js";
const transport = new StdioClientTransport({{
  command: {bin:?},
  args: ["--db", {db:?}, "--plaintext", "mcp", "serve", "--stdio", "--config", {config:?}],
  cwd: {cwd:?},
}});
const client = new Client({{ name: "interop-test", version: "1.0.0" }});
await client.connect(transport);
const tools = await client.listTools();
const echo = await client.callTool({{ name: "builtin.echo", arguments: {{ text: "from typescript" }} }});
const bad = await client.callTool({{ name: "builtin.echo", arguments: {{ nope: 1 }} }});
const denied = await client.callTool({{ name: "fs.write", arguments: {{ path: "/etc/x", text: "x" }} }});
const asked = await client.callTool({{ name: "sh.run", arguments: {{ script: "id" }} }});
const progress = [];
const long = await client.callTool(
  {{ name: "everything.trigger-long-running-operation", arguments: {{ duration: 0.3, steps: 3 }} }},
  undefined,
  {{ onprogress: (p) => progress.push(p) }},
);
const abort = new AbortController();
setTimeout(() => abort.abort("enough"), 300);
const t0 = Date.now();
let cancelled = null;
try {{
  await client.callTool(
    {{ name: "everything.trigger-long-running-operation", arguments: {{ duration: 30, steps: 30 }} }},
    undefined,
    {{ signal: abort.signal }},
  );
}} catch (e) {{ cancelled = {{ error: String(e), ms: Date.now() - t0 }}; }}
const after = await client.callTool({{ name: "builtin.echo", arguments: {{ text: "still serving" }} }});
console.log(JSON.stringify({{ tools: tools.tools, echo, bad, denied, asked, long, progress, cancelled, after }}));
await client.close();
"#,
        sdk = sdk.display(),
        bin = bin.display().to_string(),
        db = env.dir.path().join("events.db").display().to_string(),
        config = env.config().display().to_string(),
        cwd = env.dir.path().display().to_string(),
    );
    let out = std::process::Command::new("node")
        .args(["--input-type=module", "-e", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "node failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"builtin.echo") && names.contains(&"fs.write"),
        "{names:?}"
    );
    // The workforce's native tools are for task graphs, not for MCP clients.
    assert!(
        !names.contains(&"write_file") && !names.contains(&"fail"),
        "{names:?}"
    );
    let echo_tool = v["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "builtin.echo")
        .unwrap();
    assert_eq!(echo_tool["annotations"]["readOnlyHint"], true);
    assert_eq!(v["echo"]["isError"], false);
    assert_eq!(v["echo"]["content"][0]["text"], "from typescript");
    assert_eq!(v["bad"]["isError"], true);
    assert!(
        v["bad"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("invalid_arguments"),
        "{}",
        v["bad"]
    );
    assert_eq!(v["denied"]["isError"], true);
    assert!(
        v["denied"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("policy_denied"),
        "{}",
        v["denied"]
    );
    assert!(
        v["asked"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("approval_denied"),
        "{}",
        v["asked"]
    );
    assert!(
        v["long"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("completed"),
        "{}",
        v["long"]
    );
    assert_eq!(
        v["progress"].as_array().unwrap().len(),
        3,
        "{}",
        v["progress"]
    );
    assert!(
        v["cancelled"]["ms"].as_u64().unwrap() < 10_000,
        "{}",
        v["cancelled"]
    );
    assert_eq!(v["after"]["content"][0]["text"], "still serving");
}

#[test]
fn mcp_serve_http_interoperates_with_the_typescript_sdk() {
    let npm = npm();
    let env = Env::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bin = assert_cmd::cargo::cargo_bin("agent-runtime");
    let mut server = std::process::Command::new(&bin)
        .current_dir(env.dir.path())
        .arg("--db")
        .arg(env.dir.path().join("events.db"))
        .args([
            "--plaintext",
            "mcp",
            "serve",
            "--http",
            &format!("127.0.0.1:{port}"),
            "--config",
        ])
        .arg(env.config())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = server.try_wait() {
            panic!("mcp serve --http exited early: {status}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mcp serve --http did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _guard = Kill(server);
    let sdk = npm.join("sdk/dist/esm");
    let script = format!(
        r#"
import {{ Client }} from "file://{sdk}/client/index.js";
import {{ StreamableHTTPClientTransport }} from "file://{sdk}/client/streamableHttp.js";
const client = new Client({{ name: "interop-http", version: "1.0.0" }});
await client.connect(new StreamableHTTPClientTransport(new URL("http://127.0.0.1:{port}/mcp")));
const tools = await client.listTools();
const echo = await client.callTool({{ name: "builtin.echo", arguments: {{ text: "over http" }} }});
const denied = await client.callTool({{ name: "fs.write", arguments: {{ path: "/etc/x", text: "x" }} }});
console.log(JSON.stringify({{ tools: tools.tools.map(t => t.name), echo, denied }}));
await client.close();
"#,
        sdk = sdk.display(),
    );
    let out = std::process::Command::new("node")
        .args(["--input-type=module", "-e", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "node failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "builtin.echo"),
        "{v}"
    );
    assert_eq!(v["echo"]["content"][0]["text"], "over http");
    assert_eq!(v["denied"]["isError"], true);
    assert!(
        v["denied"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("policy_denied"),
        "{}",
        v["denied"]
    );
}

#[test]
fn a_task_graph_runs_mcp_and_sandboxed_tools_through_the_gateway() {
    let npm = npm();
    let env = Env::new();
    let mcp = env.dir.path().join("mcp.json");
    std::fs::write(
        &mcp,
        format!(
            r#"{{"mcpServers": {{"everything": {{"command": "node", "args": [{:?}, "stdio"]}}}}}}"#,
            npm.join("server-everything/dist/index.js")
                .display()
                .to_string()
        ),
    )
    .unwrap();
    let outcome = env.run_json(
        r#"
name: through-the-gateway
tasks:
  - { id: hello, tool: everything.echo, args: { message: "from a flow" } }
  - { id: save, tool: fs.write, args: { path: "saved.txt", text: "{{ tasks.hello.output }}" } }
  - { id: escape, tool: fs.write, args: { path: "../escape.txt", text: "x" }, on_failure: { continue_with: "refused" } }
  - { id: shell, tool: sh.run, args: { script: "id" }, on_failure: { continue_with: "not approved" } }
"#,
        &["--mcp-config".as_ref(), mcp.as_os_str()],
    );
    assert_eq!(outcome["status"], "completed");
    // The MCP server's answer fed the sandboxed write.
    assert_eq!(
        std::fs::read_to_string(env.dir.path().join("ws/saved.txt")).unwrap(),
        "Echo: from a flow"
    );
    // Policy denied the write outside the workspace and, with no terminal to ask, the exec.
    assert!(!env.dir.path().join("escape.txt").exists());
    assert_eq!(outcome["outputs"]["escape"], "refused");
    assert_eq!(outcome["outputs"]["shell"], "not approved");
    let run_id = outcome["run_id"].as_str().unwrap().to_string();

    // The gateway's audit trail is in the run: decisions, the approval it could not get.
    let lines = env.run_events(&run_id);
    let kinds = |k: &str| lines.iter().filter(|e| e["kind"] == k).count();
    assert_eq!(
        kinds("policy.decided"),
        5,
        "four calls, one asked and then denied"
    );
    assert_eq!(kinds("approval.requested"), 1);
    assert_eq!(kinds("approval.decided"), 1);
    assert!(
        lines
            .iter()
            .any(|e| e["kind"] == "tool.failed" && e["payload"]["class"] == "policy_denied")
    );
    // And replay, which calls nothing, reaches the same log hash past those records.
    env.cmd()
        .args(["replay", &run_id])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            outcome["log_hash"].as_str().unwrap(),
        ));
}

/// The store's passphrase and the graph secrets leave the environment when the command line
/// starts: a hook (a program the configuration names, which inherits the environment) never
/// sees them.
#[test]
fn hooks_do_not_inherit_the_store_passphrase_or_secrets() {
    let env = Env::new();
    let seen = env.dir.path().join("hook-env.txt");
    let config = env.dir.path().join("hooked.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
workspace: ["ws"]
hooks:
  - name: env-dump
    command: ["/bin/sh", "-c", "env > '{}'; cat > /dev/null; echo '{{\"action\":\"continue\"}}'"]
    phases: [pre]
"#,
            seen.display()
        ),
    )
    .unwrap();
    env.cmd()
        .env("AGENT_RUNTIME_PASSPHRASE", "canary-passphrase-7731")
        .env("AGENT_RUNTIME_SECRET_GH_TOKEN", "canary-secret-5519")
        .env("HOOK_SEES_THIS", "yes")
        .args([
            "tools",
            "call",
            "builtin.echo",
            "--args",
            r#"{"text":"hello"}"#,
            "--config",
        ])
        .arg(&config)
        .assert()
        .success()
        .stdout("hello\n");
    let dumped = std::fs::read_to_string(&seen).expect("the hook ran");
    // The hook got the rest of the environment, not the passphrase.
    assert!(dumped.contains("HOOK_SEES_THIS=yes"), "{dumped}");
    assert!(!dumped.contains("canary-passphrase-7731"));
    assert!(!dumped.contains("AGENT_RUNTIME_PASSPHRASE"));
    assert!(!dumped.contains("canary-secret-5519"));
    assert!(!dumped.contains("AGENT_RUNTIME_SECRET_"));
}

/// A command tool with `success_exit_codes` fails the call on any other status, so a task
/// graph's retry and `on_failure` act on it; without it the status is output.
#[test]
fn success_exit_codes_make_a_failing_command_a_failed_step() {
    let env = Env::new();
    std::fs::write(
        env.config(),
        r#"
workspace: ["ws"]
tools:
  - name: check
    risk: read
    input_schema: { type: object, properties: { script: { type: string } }, required: [script] }
    command: ["/bin/sh", "-c", "{script}"]
    success_exit_codes: [0, 1]
  - name: check.loose
    risk: read
    input_schema: { type: object, properties: { script: { type: string } }, required: [script] }
    command: ["/bin/sh", "-c", "{script}"]
"#,
    )
    .unwrap();
    let outcome = env.run_json(
        r#"
tasks:
  - id: strict
    tool: check
    args: { script: "echo checking; echo 3 problems found >&2; exit 3" }
    retry: { max_attempts: 2, backoff: 1ms, on: [tool_error] }
    on_failure: { continue_with: "handled" }
  - { id: allowed, tool: check, args: { script: "exit 1" } }
  - { id: loose, tool: check.loose, args: { script: "exit 3" } }
"#,
        &[],
    );
    assert_eq!(outcome["outputs"]["strict"], "handled", "{outcome}");
    assert_eq!(outcome["outputs"]["allowed"]["exit_code"], 1, "{outcome}");
    assert_eq!(outcome["outputs"]["loose"]["exit_code"], 3, "{outcome}");
    let run_id = outcome["run_id"].as_str().unwrap().to_string();
    let failures: Vec<Value> = env
        .run_events(&run_id)
        .into_iter()
        .filter(|e| e["kind"] == "tool.failed")
        .collect();
    // Both attempts, each recorded by the gateway and by the run.
    assert_eq!(failures.len(), 4, "{failures:#?}");
    for f in &failures {
        assert_eq!(f["payload"]["class"], "tool_error", "{f}");
        let m = f["payload"]["message"].as_str().unwrap();
        assert!(
            m.contains("check: exited with status 3 (success_exit_codes: 0, 1): 3 problems found"),
            "{m}"
        );
    }

    // An empty list is refused where the configuration is read.
    std::fs::write(
        env.config(),
        "workspace: [\"ws\"]\ntools:\n  - { name: bad, risk: read, command: [\"/bin/true\"], success_exit_codes: [] }\n",
    )
    .unwrap();
    env.cmd()
        .args(["tools", "list", "--config"])
        .arg(env.config())
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "success_exit_codes is empty, so no call could succeed",
        ));
}

/// A tool's description is a server's text: `tools list` escapes the terminal controls in it
/// (a description could otherwise rewrite the screen it is listed on).
#[test]
fn tools_list_escapes_what_a_server_says_of_its_tools() {
    let env = Env::new();
    let server = r#"
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    method = m.get("method")
    if method == "initialize":
        out = {"protocolVersion": m["params"]["protocolVersion"], "capabilities": {"tools": {}},
               "serverInfo": {"name": "py", "version": "1"}}
    elif method == "tools/list":
        out = {"tools": [{"name": "t", "inputSchema": {"type": "object"},
                          "description": "looks \u001b[2J\u001b[31mfine\u009b0m"}]}
    else:
        continue
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": out}) + "\n")
    sys.stdout.flush()
"#;
    let servers = env.dir.path().join("servers.json");
    std::fs::write(
        &servers,
        serde_json::to_string(&serde_json::json!({"mcpServers": {"py": {
            "command": "/usr/bin/python3", "args": ["-c", server]}}}))
        .unwrap(),
    )
    .unwrap();
    let out = env
        .cmd()
        .args(["tools", "list", "--mcp-config"])
        .arg(&servers)
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("py.t "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        !line.contains('\u{1b}') && !line.contains('\u{9b}'),
        "{line:?}"
    );
    assert!(line.contains("looks \\u{1b}[2J\\u{1b}[31mfine"), "{line:?}");
}

/// `mcp list --tools`: a server that cannot be started has its `error`; what a connected
/// server's tools list brought up (two names alike, a schema that is no object) are its
/// `warnings`, every one of them, under the server they concern, and its other tools listed.
#[test]
fn mcp_list_tells_a_server_s_warnings_from_its_error() {
    let env = Env::new();
    let server = r#"
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    method = m.get("method")
    if method == "initialize":
        out = {"protocolVersion": m["params"]["protocolVersion"], "capabilities": {"tools": {}},
               "serverInfo": {"name": "py", "version": "1"}}
    elif method == "tools/list":
        s = {"type": "object"}
        out = {"tools": [{"name": "dup", "inputSchema": s}, {"name": "Dup", "inputSchema": s},
                         {"name": "ok", "inputSchema": s}, {"name": "bad", "inputSchema": {"type": 5}}]}
    else:
        continue
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": out}) + "\n")
    sys.stdout.flush()
"#;
    let servers = env.dir.path().join("servers.json");
    std::fs::write(
        &servers,
        serde_json::to_string(&serde_json::json!({"mcpServers": {
            "py": {"command": "/usr/bin/python3", "args": ["-c", server]},
            "gone": {"command": "/nonexistent/server"}}}))
        .unwrap(),
    )
    .unwrap();
    let out = env
        .cmd()
        .args(["mcp", "list", "--tools", "--json", "--mcp-config"])
        .arg(&servers)
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let of = |name: &str| {
        v["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
            .clone()
    };
    let (py, gone) = (of("py"), of("gone"));
    assert_eq!(py["tools"], serde_json::json!(["py.dup", "py.ok"]), "{py}");
    assert!(py.get("error").is_none(), "{py}");
    let warnings = py["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 2, "{py}");
    assert!(
        warnings[0].as_str().unwrap().contains("both become"),
        "{py}"
    );
    assert!(warnings[1].as_str().unwrap().contains("py.bad"), "{py}");
    assert!(
        gone["error"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/server"),
        "{gone}"
    );
    assert!(gone.get("warnings").is_none(), "{gone}");

    let out = env
        .cmd()
        .args(["mcp", "list", "--tools", "--mcp-config"])
        .arg(&servers)
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("    warning: ").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("    error: ").count(), 1, "{stdout}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A command that calls tools starts only the MCP servers those tools belong to: a server
/// that never answers `initialize` held up every `run` and `tools call` for its startup
/// timeout, and a server that is not needed is not a process started for nothing. (The server
/// here notes that it was started in a file, and never answers.)
#[test]
fn only_the_mcp_servers_of_the_tools_called_are_started() {
    let env = Env::new();
    let marker = env.dir.path().join("started");
    let servers = env.dir.path().join("servers.json");
    std::fs::write(
        &servers,
        serde_json::to_string(&serde_json::json!({"mcpServers": {"mute": {
            "command": "/bin/sh",
            "args": ["-c", "echo >> \"$0\"; exec sleep 600", marker],
            "startup_timeout_ms": 500}}}))
        .unwrap(),
    )
    .unwrap();
    let with_servers = |c: &mut Command| {
        c.arg("--mcp-config").arg(&servers);
    };
    let mut call = env.cmd();
    call.args(["tools", "call", "echo", "--args", r#"{"text":"hi"}"#]);
    with_servers(&mut call);
    call.assert().success();
    let mut check = env.cmd();
    check.args([
        "policy",
        "check",
        "--tool",
        "echo",
        "--args",
        r#"{"text":"hi"}"#,
    ]);
    with_servers(&mut check);
    check.assert().success();
    let outcome = env.run_json(
        "tasks: [ { id: a, tool: echo, args: { text: hi } } ]\n",
        &["--mcp-config".as_ref(), servers.as_os_str()],
    );
    assert_eq!(outcome["status"], "completed", "{outcome}");
    assert!(
        !marker.exists(),
        "a server no tool of the command needs was started"
    );

    // Calling one of its tools starts it (and names it when it does not answer).
    let mut call = env.cmd();
    call.args(["tools", "call", "mute.anything", "--args", "{}"]);
    with_servers(&mut call);
    let out = call.output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"mute\""), "{stderr}");
    assert!(marker.exists());
}

/// The policy of [`ShWorkspace`]: `sh.run` may run anything (in the sandbox).
const ALLOW_SH: &str = "rules:\n  - id: allow-sh\n    tools: [\"sh.run\"]\n    effect: allow\n";

/// A workspace `ws` in a temporary folder whose configuration and policy ([`ALLOW_SH`]) lie
/// inside it, in `conf` (`""`: its root), declaring `sh.run` (`/bin/sh -c {script}`); the
/// event database is `ws/events.db`.
struct ShWorkspace {
    _dir: tempfile::TempDir,
    ws: PathBuf,
    config: PathBuf,
}

impl ShWorkspace {
    /// Asserts that a tool may not write `path` (relative to the workspace): the gateway's
    /// `default.protected` rule refuses it.
    #[track_caller]
    fn assert_write_refused(&self, path: &str) {
        let args = serde_json::json!({"path": path, "text": "evil"}).to_string();
        let out = self.call("write_file", &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{path}: {stderr}");
        assert!(stderr.contains("default.protected"), "{path}: {stderr}");
    }

    fn new(conf: &str) -> ShWorkspace {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(ws.join(conf)).unwrap();
        let root = if conf.is_empty() { "." } else { ".." };
        let config = format!(
            "workspace: [\"{root}\"]\npolicy: policy.yaml\ntools:\n  - name: sh.run\n    risk: exec\n    input_schema: {{ type: object, properties: {{ script: {{ type: string }} }}, required: [script] }}\n    command: [\"/bin/sh\", \"-c\", \"{{script}}\"]\n"
        );
        std::fs::write(ws.join(conf).join("gateway.yaml"), config).unwrap();
        std::fs::write(ws.join(conf).join("policy.yaml"), ALLOW_SH).unwrap();
        let config = Path::new(conf).join("gateway.yaml");
        ShWorkspace {
            _dir: dir,
            ws,
            config,
        }
    }

    /// The user's data folder of the commands run here (where the trust record is kept):
    /// inside the workspace, so that what tools may do to it shows.
    fn data_home(&self) -> PathBuf {
        self.ws.join("data")
    }

    /// `tools call TOOL --args ARGS` with the configuration, run in the workspace.
    fn call(&self, tool: &str, args: &str) -> std::process::Output {
        Command::cargo_bin("agent-runtime")
            .unwrap()
            .current_dir(&self.ws)
            .env("XDG_DATA_HOME", self.data_home())
            .env_remove("AGENT_RUNTIME_GATEWAY_CONFIG")
            .args([
                "--db",
                "events.db",
                "--plaintext",
                "tools",
                "call",
                tool,
                "--config",
            ])
            .arg(&self.config)
            .args(["--args", args])
            .output()
            .unwrap()
    }
}

/// No tool may change what the runtime trusts: its configuration, policy and hooks (a hook and
/// an MCP server run outside the sandbox, nobody asked), the `.agent-runtime` folder the next
/// start loads them from, or its event database. An agent rewrote the policy inside its
/// workspace with `write_file`, or through a sandboxed command, and ran as root unsandboxed.
#[test]
fn tools_cannot_change_the_runtime_s_own_files() {
    let sh = ShWorkspace::new("");
    let (ws, call) = (&sh.ws, |tool: &str, args: &str| sh.call(tool, args));
    for path in [
        "policy.yaml",
        "gateway.yaml",
        ".agent-runtime/gateway.yaml",
        "events.db-wal",
    ] {
        sh.assert_write_refused(path);
    }
    let out = call(
        "sh.run",
        r#"{"script": "echo evil >> policy.yaml; echo hooks > .agent-runtime/gateway.yaml; echo ok > fine.txt"}"#,
    );
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Read-only file system"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(ws.join("policy.yaml")).unwrap(),
        ALLOW_SH
    );
    assert!(!ws.join(".agent-runtime/gateway.yaml").exists());
    assert_eq!(
        std::fs::read_to_string(ws.join("fine.txt")).unwrap(),
        "ok\n"
    );
    // Reading them is not changing them.
    let out = call("read_file", r#"{"path": "policy.yaml"}"#);
    assert_ok(&out);
}

/// What a hook or a local MCP server loads that its command names is protected like the
/// configuration: a hook `sh hooks/check.sh` runs outside the sandbox, so a command that
/// rewrote `hooks/check.sh` ran its code unsandboxed at the next call, nobody asked.
#[test]
fn files_that_hooks_and_mcp_servers_load_are_protected() {
    let sh = ShWorkspace::new("");
    let ws = &sh.ws;
    std::fs::create_dir_all(ws.join("hooks")).unwrap();
    std::fs::create_dir_all(ws.join("mcp")).unwrap();
    let hook = "cat > /dev/null; echo '{\"action\":\"continue\"}'\n";
    std::fs::write(ws.join("hooks/check.sh"), hook).unwrap();
    std::fs::write(ws.join("mcp/server.js"), "// a server\n").unwrap();
    std::fs::write(
        ws.join("mcp.json"),
        r#"{"mcpServers": {"local": {"command": "node", "args": ["--no-warnings", "server.js", "."], "cwd": "mcp"}}}"#,
    )
    .unwrap();
    let mut config = std::fs::read_to_string(ws.join("gateway.yaml")).unwrap();
    config.push_str(
        "mcp: mcp.json\nhooks:\n  - name: check\n    command: [\"sh\", \"hooks/check.sh\"]\n    phases: [pre]\n",
    );
    std::fs::write(ws.join("gateway.yaml"), config).unwrap();
    for path in ["hooks/check.sh", "mcp/server.js"] {
        sh.assert_write_refused(path);
    }
    let out = sh.call(
        "sh.run",
        r#"{"script": "echo 'touch /tmp/owned' > hooks/check.sh; echo hook=$?; echo x >> mcp/server.js; echo srv=$?; echo ok > hooks/notes.txt; echo notes=$?"}"#,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_ok(&out);
    assert!(
        !stdout.contains("hook=0") && !stdout.contains("srv=0"),
        "{stdout}"
    );
    // The folders holding them, and the server's argument `.` (a folder), stay writable.
    assert!(stdout.contains("notes=0"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(ws.join("hooks/check.sh")).unwrap(),
        hook
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("mcp/server.js")).unwrap(),
        "// a server\n"
    );
    // A hook's relative script is the configuration's, wherever the runtime runs: one planted
    // in a subfolder (as a tool could) is not what runs from there.
    let marker = ws.join("planted-ran");
    std::fs::create_dir_all(ws.join("sub/hooks")).unwrap();
    std::fs::write(
        ws.join("sub/hooks/check.sh"),
        format!("touch {}; {hook}", marker.display()),
    )
    .unwrap();
    let out = Command::cargo_bin("agent-runtime")
        .unwrap()
        .current_dir(ws.join("sub"))
        .env("XDG_DATA_HOME", sh.data_home())
        .args([
            "--db",
            "../events.db",
            "--plaintext",
            "tools",
            "call",
            "echo",
        ])
        .arg("--config")
        .arg(ws.join("gateway.yaml"))
        .args(["--args", r#"{"x": 1}"#])
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(!marker.exists(), "the planted hook ran");
}

/// What a person's own `git` runs from a workspace's repository (its hooks, its configuration,
/// which can name programs: `core.fsmonitor`, `core.hooksPath`) is kept from tools: a command
/// that wrote `.git/hooks/pre-commit` ran its code as the person at their next commit.
#[test]
fn a_workspace_repository_s_hooks_and_configuration_are_protected() {
    let sh = ShWorkspace::new("");
    let ws = &sh.ws;
    // No hooks folder (git works without one): it is made, to be kept read-only.
    std::fs::create_dir_all(ws.join(".git/modules/lib")).unwrap();
    std::fs::create_dir_all(ws.join(".githooks")).unwrap();
    let config = "[core]\n\thooksPath = .githooks ; ours\n";
    std::fs::write(ws.join(".git/config"), config).unwrap();
    std::fs::write(ws.join(".git/modules/lib/config"), "[core]\n").unwrap();
    for path in [
        ".git/hooks/pre-commit",
        ".git/config",
        ".githooks/pre-commit",
        ".git/modules/lib/config",
        ".git/commondir",
    ] {
        sh.assert_write_refused(path);
    }
    let out = sh.call(
        "sh.run",
        r#"{"script": "echo x > .git/hooks/pre-commit; echo h=$?; echo '\tfsmonitor = evil' >> .git/config; echo c=$?; echo x > .githooks/pre-commit; echo p=$?; echo ok > .git/description; echo d=$?"}"#,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_ok(&out);
    for refused in ["h=0", "c=0", "p=0"] {
        assert!(!stdout.contains(refused), "{stdout}");
    }
    // The rest of the repository stays the tools' (git writes objects, refs, its index).
    assert!(stdout.contains("d=0"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(ws.join(".git/config")).unwrap(),
        config
    );
    assert!(!ws.join(".git/hooks/pre-commit").exists());
    // What cannot be kept read-only (a file not there yet) is named at the end when it
    // appears: `commondir` sends git to another repository, the tool's.
    let out = sh.call(
        "sh.run",
        r#"{"script": "echo evil > .git/commondir; echo m=$?; echo x >> .git/modules/lib/config; echo s=$?"}"#,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("m=0") && !stdout.contains("s=0"),
        "{stdout}"
    );
    assert!(
        stderr.contains(".git/commondir changed while this process ran tools")
            && stderr.contains("look at them before you run git there"),
        "{stderr}"
    );
    // A repository made below the root (`git status` at the root enters it) is named too.
    let out = sh.call("sh.run", r#"{"script": "mkdir -p vendor/lib/.git"}"#);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("a repository appeared at ") && stderr.contains("vendor/lib/.git"),
        "{stderr}"
    );
    let out = sh.call("sh.run", r#"{"script": "true"}"#);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("appeared"),
        "one there before is not new"
    );
}

/// What gets past the protection is caught before it is used: a policy file changed while a
/// process ran tools (here by a tool a rule lets run unsandboxed, one of the known ways
/// around it) is named at the end, and every later start refuses until a person accepts it
/// with `trust`. Edits between runs need nothing.
#[test]
fn a_trusted_file_changed_while_tools_ran_is_refused_until_accepted() {
    let sh = ShWorkspace::new("");
    let ws = &sh.ws;
    let unsandboxed = format!("{ALLOW_SH}    sandbox: none\n");
    std::fs::write(ws.join("policy.yaml"), &unsandboxed).unwrap();
    let trust = |args: &[&str]| {
        Command::cargo_bin("agent-runtime")
            .unwrap()
            .current_dir(ws)
            .env("XDG_DATA_HOME", sh.data_home())
            .args(["--db", "events.db", "trust"])
            .args(args)
            .output()
            .unwrap()
    };
    // A person's edit between runs needs no acceptance.
    let out = sh.call("sh.run", r#"{"script": "echo fine"}"#);
    assert_ok(&out);
    std::fs::write(ws.join("policy.yaml"), format!("{unsandboxed}# reviewed\n")).unwrap();

    let out = sh.call(
        "sh.run",
        r#"{"script": "echo '  - { id: all, effect: allow }' >> policy.yaml"}"#,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("policy.yaml changed while this process ran tools")
            && stderr.contains("`agent-runtime trust`"),
        "{stderr}"
    );
    for _ in 0..2 {
        let out = sh.call("sh.run", r#"{"script": "echo ran > ran.txt"}"#);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("policy.yaml was changed during the session of process"),
            "{stderr}"
        );
        assert!(!ws.join("ran.txt").exists(), "a refused start ran the tool");
    }
    let listed = trust(&["--list"]);
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(
        stdout.contains("policy.yaml was changed") && stdout.contains("not accepted yet"),
        "{stdout}"
    );
    assert_eq!(
        sh.call("sh.run", r#"{"script": "true"}"#).status.code(),
        Some(2)
    );
    let accepted = trust(&[]);
    let stdout = String::from_utf8_lossy(&accepted.stdout);
    assert!(
        accepted.status.success() && stdout.contains("accepted 1 change"),
        "{stdout}"
    );
    let out = sh.call("sh.run", r#"{"script": "echo ran > ran.txt"}"#);
    assert_ok(&out);
    assert!(ws.join("ran.txt").exists());
    let again = trust(&[]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to accept"));
    // The record (kept in the user's data folder, here inside the workspace) is the
    // runtime's own: a tool may not write it, nor its lock.
    for path in [
        "data/agent-runtime/trust.json",
        "data/agent-runtime/trust.json.lock",
    ] {
        sh.assert_write_refused(path);
    }
}

/// A configuration the runtime finds by itself (`.agent-runtime/` in the folder it runs in) is
/// loaded only as a person accepted it: a sandboxed tool can make one in any folder below a
/// workspace root (only the root's own is kept read-only), and a start run from there loaded
/// it and ran its hooks outside the sandbox.
#[test]
fn a_configuration_found_below_a_workspace_root_waits_for_acceptance() {
    let sh = ShWorkspace::new("");
    let marker = sh.ws.join("hook-ran");
    let planted = marking_hook(&marker);
    let script = format!(
        "mkdir -p sub/.agent-runtime && cat > sub/.agent-runtime/gateway.yaml <<'EOF'\n{planted}EOF\necho made=$?"
    );
    let out = sh.call(
        "sh.run",
        &serde_json::json!({ "script": script }).to_string(),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("made=0"));
    let sub = sh.ws.join("sub");
    let in_sub = |args: &[&str]| {
        Command::cargo_bin("agent-runtime")
            .unwrap()
            .current_dir(&sub)
            .env("XDG_DATA_HOME", sh.data_home())
            .env_remove("AGENT_RUNTIME_GATEWAY_CONFIG")
            .args(["--db", "../events.db", "--plaintext"])
            .args(args)
            .output()
            .unwrap()
    };
    let call = ["tools", "call", "echo", "--args", r#"{"x": 1}"#];
    let out = in_sub(&call);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "the configuration found here is not accepted as it is now (new or changed: "
        ) && stderr.contains("sub/.agent-runtime/gateway.yaml"),
        "{stderr}"
    );
    assert!(!marker.exists(), "the planted hook ran");
    // A person who read it accepts it; then it is loaded (and its hook runs).
    let accepted = in_sub(&["trust"]);
    let stdout = String::from_utf8_lossy(&accepted.stdout);
    assert!(
        stdout.contains("accepted the configuration found here"),
        "{stdout}"
    );
    let out = in_sub(&call);
    assert_ok(&out);
    assert!(marker.exists());
    // Files named on the command line are the person's choice: a policy given with --policy
    // is not held to the found configuration's acceptance.
    std::fs::write(sub.join("allow.yaml"), ALLOW_SH).unwrap();
    let out = in_sub(&[
        "tools",
        "call",
        "echo",
        "--policy",
        "allow.yaml",
        "--args",
        r#"{"x": 2}"#,
    ]);
    assert_ok(&out);
    // `trust` with nothing new says so.
    let again = in_sub(&["trust"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to accept"));
    // `mcp add` does not write a servers file the configuration would not load.
    let add = in_sub(&["mcp", "add", "x", "--command", "node"]);
    assert_eq!(add.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&add.stderr).contains("names no MCP servers file"));
    assert!(!sub.join(".agent-runtime/mcp.json").exists());
    // `mcp list` of it lists no servers, as it has none (it refused the configuration).
    let list = in_sub(&["mcp", "list"]);
    assert_ok(&list);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("no MCP servers: ")
            && String::from_utf8_lossy(&list.stdout).contains("names no servers file"),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );
    // Changed again (by anyone): accepted again first.
    std::fs::write(sub.join(".agent-runtime/gateway.yaml"), "hooks: []\n").unwrap();
    assert_eq!(in_sub(&call).status.code(), Some(2));
}

/// `agent-runtime --db events.db --plaintext ARGS` in `dir`, with `dir/data` as the user's
/// data folder (where the trust record is).
fn run_in(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::cargo_bin("agent-runtime")
        .unwrap()
        .current_dir(dir)
        .env("XDG_DATA_HOME", dir.join("data"))
        .env_remove("AGENT_RUNTIME_GATEWAY_CONFIG")
        .args(["--db", "events.db", "--plaintext"])
        .args(args)
        .output()
        .unwrap()
}

/// A gateway configuration with a hook that touches `marker` (as a planted one would run
/// code) and lets every call go on.
fn marking_hook(marker: &Path) -> String {
    format!(
        "hooks:\n  - name: planted\n    command: [\"/bin/sh\", \"-c\", \"touch {}; cat >/dev/null; echo '{{\\\"action\\\":\\\"continue\\\"}}'\"]\n",
        marker.display()
    )
}

/// A command whose reader went away (`tools list | head`) ends its trust session as it exits:
/// a person's edit after it needs nothing (it was taken for a dead process's, and refused).
#[test]
fn a_command_ended_by_a_closed_pipe_ends_its_session() {
    let sh = ShWorkspace::new("");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("agent-runtime"))
        .current_dir(&sh.ws)
        .env("XDG_DATA_HOME", sh.data_home())
        .env_remove("AGENT_RUNTIME_GATEWAY_CONFIG")
        .args([
            "--db",
            "events.db",
            "--plaintext",
            "tools",
            "list",
            "--config",
        ])
        .arg(&sh.config)
        .stdout(common::closed_pipe())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    // Ended by the closed pipe, as `main` ends such a command.
    assert_eq!(status.code(), Some(141));
    std::fs::write(sh.ws.join("policy.yaml"), format!("{ALLOW_SH}# edited\n")).unwrap();
    let out = sh.call("sh.run", r#"{"script": "true"}"#);
    assert!(
        out.status.success(),
        "after {status:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `mcp add` keeps an accepted configuration accepted, but does not bless one nobody accepted,
/// even one that cannot be loaded yet (planted, naming a servers file not made yet, which
/// `mcp add` would make).
#[test]
fn mcp_add_does_not_accept_a_planted_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("planted-ran");
    std::fs::create_dir_all(dir.path().join(".agent-runtime")).unwrap();
    std::fs::write(
        dir.path().join(".agent-runtime/gateway.yaml"),
        format!("mcp: mcp.json\n{}", marking_hook(&marker)),
    )
    .unwrap();
    let cmd = |args: &[&str]| run_in(dir.path(), args);
    let added = cmd(&["mcp", "add", "x", "--command", "/bin/true"]);
    assert_ok(&added);
    assert!(String::from_utf8_lossy(&added.stderr).contains("was not accepted before this change"));
    let out = cmd(&["tools", "call", "echo", "--args", r#"{"x": 1}"#]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!marker.exists(), "the planted hook ran");
}

/// `mcp list --tools` starts the servers: a found servers file nobody accepted is refused
/// there too; and `trust` of a found configuration that cannot be loaded says so by its exit.
#[test]
fn mcp_list_tools_and_trust_hold_to_acceptance() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("server-ran");
    std::fs::create_dir_all(dir.path().join(".agent-runtime")).unwrap();
    std::fs::write(
        dir.path().join(".agent-runtime/mcp.json"),
        format!(
            r#"{{"mcpServers": {{"z": {{"command": "/bin/sh", "args": ["-c", "touch {}"]}}}}}}"#,
            marker.display()
        ),
    )
    .unwrap();
    let cmd = |args: &[&str]| run_in(dir.path(), args);
    let out = cmd(&["mcp", "list", "--tools"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not accepted as it is now"), "{stderr}");
    assert!(!marker.exists(), "the server was started");
    // A configuration naming a servers file not made yet cannot be accepted: said by exit 2.
    std::fs::remove_file(dir.path().join(".agent-runtime/mcp.json")).unwrap();
    std::fs::write(
        dir.path().join(".agent-runtime/gateway.yaml"),
        "mcp: servers.json\n",
    )
    .unwrap();
    let out = cmd(&["trust"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot be loaded, so it is not accepted"),
        "{stderr}"
    );
}

/// A trusted file with a second name in the workspace (a hard link made before the run) is
/// refused at the start: a tool could change it through that name, which nothing protects.
#[test]
fn a_trusted_file_with_another_name_in_the_workspace_is_refused() {
    let sh = ShWorkspace::new("");
    std::fs::hard_link(sh.ws.join("policy.yaml"), sh.ws.join("notes.txt")).unwrap();
    let out = sh.call("sh.run", r#"{"script": "echo ran > ran.txt"}"#);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("policy.yaml: has 2 names (hard links)"),
        "{stderr}"
    );
    assert!(!sh.ws.join("ran.txt").exists());
    std::fs::remove_file(sh.ws.join("notes.txt")).unwrap();
    let out = sh.call("sh.run", r#"{"script": "echo ran > ran.txt"}"#);
    assert_ok(&out);
}

/// A protected file in a folder of the workspace stays where it is: the folder cannot be renamed
/// away and replaced by one holding another policy (`mv conf conf.old && mkdir conf ...`, which
/// ran the next call unsandboxed), while the folder's other files stay writable.
#[test]
fn a_folder_holding_the_configuration_cannot_be_renamed_away() {
    let sh = ShWorkspace::new("conf");
    let ws = &sh.ws;
    let out = sh.call(
        "sh.run",
        r#"{"script": "mv conf conf.old; echo mv=$?; echo notes > conf/notes.txt; echo write=$?"}"#,
    );
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("mv=0"), "{stdout}");
    assert!(stdout.contains("write=0"), "{stdout}");
    assert!(!ws.join("conf.old").exists());
    assert_eq!(
        std::fs::read_to_string(ws.join("conf/policy.yaml")).unwrap(),
        ALLOW_SH
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("conf/notes.txt")).unwrap(),
        "notes\n"
    );
}

/// A command writes a relative path where the policy judged it: in the policy's workspace,
/// when that is not the configuration's (it wrote `protected/x` in the configuration's root, a
/// folder a deny rule protected, while the policy judged it in its own).
#[test]
fn a_command_writes_a_relative_path_where_the_policy_judged_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("ws/sub/protected")).unwrap();
    std::fs::create_dir_all(d.join("ws/protected")).unwrap();
    std::fs::write(
        d.join("cfg.yaml"),
        "workspace: [\"ws\"]\npolicy: pol.yaml\ntools:\n  - name: put\n    risk: write\n    input_schema: { type: object, properties: { path: { type: string }, text: { type: string } }, required: [path, text] }\n    command: [\"sh\", \"-c\", \"printf '%s' \\\"$1\\\" > \\\"$2\\\"\", \"sh\", \"{text}\", \"{path}\"]\n",
    )
    .unwrap();
    std::fs::write(
        d.join("pol.yaml"),
        "workspace: [\"ws/sub\"]\nrules:\n  - id: protect\n    when: [ { path_inside: { arg: \"@paths\", roots: [\"ws/protected\"] } } ]\n    effect: deny\n",
    )
    .unwrap();
    let out = Command::cargo_bin("agent-runtime")
        .unwrap()
        .current_dir(d)
        .env_remove("AGENT_RUNTIME_GATEWAY_CONFIG")
        .args([
            "--db",
            "e.db",
            "--plaintext",
            "tools",
            "call",
            "put",
            "--config",
            "cfg.yaml",
        ])
        .args(["--args", r#"{"path": "protected/x", "text": "pwn"}"#])
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(
        !d.join("ws/protected/x").exists(),
        "written where the policy did not look"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("ws/sub/protected/x")).unwrap(),
        "pwn"
    );
}

/// A graph that calls a tool of an MCP server that cannot be reached is refused saying so,
/// where the tool is named (it said "unknown tool", listing every other tool).
#[test]
fn a_run_needing_an_unreachable_server_says_it_cannot_be_reached() {
    let env = Env::new();
    let servers = env.dir.path().join("servers.json");
    std::fs::write(
        &servers,
        r#"{"mcpServers": {"down": {"command": "/bin/sh",
            "args": ["-c", "echo 'Error: no licence' >&2; exit 1"], "startup_timeout_ms": 5000}}}"#,
    )
    .unwrap();
    let flow = env.dir.path().join("flow.yaml");
    std::fs::write(&flow, "tasks:\n  - id: a\n    tool: down.echo\n").unwrap();
    let out = env
        .cmd()
        .args(["run", "flow.yaml", "--config"])
        .arg(env.config())
        .arg("--mcp-config")
        .arg(&servers)
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("flow.yaml:3:5: tasks[0].tool: tool `down.echo` is not available now: MCP server \"down\" cannot be reached: initialize failed")
            && last.contains("Error: no licence"),
        "{stderr}"
    );
}
