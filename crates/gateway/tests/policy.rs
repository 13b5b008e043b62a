//! Policy decisions, table-driven, with hostile arguments.

use std::path::{Path, PathBuf};

use agent_runtime_core::{Actor, Effect, RiskClass};
use agent_runtime_gateway::policy::{Policy, PolicyInput, RelativePaths};
use serde_json::{Value, json};

const POLICY: &str = r#"
version: 1
workspace: ["ws"]
rules:
  - id: no-shell-meta
    tools: ["sh.run"]
    when: [ { shell_metacharacters: { arg: command } } ]
    effect: deny
    reason: shell metacharacters are not allowed
  - id: no-rm
    tools: ["sh.run"]
    when: [ { program: { arg: command, any: ["rm", "sudo", "dd"] } } ]
    effect: deny
    reason: destructive programs are not allowed
  - id: git-readonly
    tools: ["sh.run"]
    when:
      - program: { arg: command, any: ["git"] }
      - argument: { arg: command, any: ["status", "log", "diff"] }
    effect: allow
    reason: read-only git
  - id: ls-allowed
    tools: ["sh.run"]
    when: [ { program: { arg: command, any: ["ls"] } } ]
    effect: allow
  - id: fetch-allowlist
    tools: ["web.fetch"]
    when: [ { url_host_in: { arg: url, hosts: ["example.com", "*.example.com"] } } ]
    effect: allow
  - id: fetch-others
    tools: ["web.fetch"]
    effect: deny
    reason: host not on the allow-list
  - id: reader-cannot-write
    agents: ["agent:reader"]
    risk: [write]
    effect: deny
  - id: read-outside-asks
    tools: ["fs.read"]
    when: [ { path_outside: { arg: path, roots: ["$workspace"] } } ]
    effect: ask
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    policy: Policy,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let ws = root.join("ws");
    std::fs::create_dir_all(ws.join("sub")).unwrap();
    std::fs::create_dir_all(root.join("outside")).unwrap();
    std::os::unix::fs::symlink(root.join("outside"), ws.join("escape")).unwrap();
    std::os::unix::fs::symlink("/etc", ws.join("etc-link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent-outside/file", ws.join("dangling")).unwrap();
    std::os::unix::fs::symlink("sub", ws.join("inner-link")).unwrap();
    let policy = Policy::from_yaml(POLICY, &root).unwrap();
    Fixture {
        _dir: dir,
        root,
        policy,
    }
}

/// A fixture of `policy` (its paths relative to a fresh folder), with the folder `ws/FOLDER`
/// made for each of `folders`, and whatever `prepare` adds to that folder.
fn fixture_of(policy: &str, folders: &[&str], prepare: impl FnOnce(&Path)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    for f in folders {
        std::fs::create_dir_all(root.join("ws").join(f)).unwrap();
    }
    prepare(&root);
    Fixture {
        policy: Policy::from_yaml(policy, &root).unwrap(),
        root,
        _dir: dir,
    }
}

fn decide(f: &Fixture, tool: &str, risk: RiskClass, actor: &str, args: &Value) -> (Effect, String) {
    let actor: Actor = actor.parse().unwrap();
    let d = f.policy.decide(&PolicyInput {
        tool,
        risk,
        actor: &actor,
        arguments: args,
        relative_paths: Default::default(),
    });
    (d.effect, d.rule)
}

fn check(f: &Fixture, cases: &[(&str, RiskClass, &str, Value, Effect, &str)]) {
    let mut failures = Vec::new();
    for (tool, risk, actor, args, effect, rule) in cases {
        let got = decide(f, tool, *risk, actor, args);
        if got != (*effect, rule.to_string()) {
            failures.push(format!(
                "{tool} {args}: want {effect:?} by {rule}, got {got:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn write_paths_inside_and_outside_the_workspace() {
    use Effect::*;
    use RiskClass::Write;
    let f = fixture();
    let ws = f.root.join("ws");
    let a = "agent:writer";
    let out = f.root.join("outside/x").display().to_string();
    let inside_abs = ws.join("sub/x").display().to_string();
    check(
        &f,
        &[
            (
                "fs.write",
                Write,
                a,
                json!({"path": "a.txt"}),
                Allow,
                "default.write-inside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": "sub/../b.txt"}),
                Allow,
                "default.write-inside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": "new/deeper/file"}),
                Allow,
                "default.write-inside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": inside_abs}),
                Allow,
                "default.write-inside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": "inner-link/x"}),
                Allow,
                "default.write-inside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": "../outside/x"}),
                Deny,
                "default.write-outside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": "sub/../../outside/x"}),
                Deny,
                "default.write-outside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": out}),
                Deny,
                "default.write-outside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": "escape/x"}),
                Deny,
                "default.write-outside",
            ),
            // `escape/..` is the parent of the symlink's target, as the kernel sees it.
            (
                "fs.write",
                Write,
                a,
                json!({"path": "escape/../ws/x"}),
                Allow,
                "default.write-inside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": "escape/../outside/y"}),
                Deny,
                "default.write-outside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": "etc-link/passwd"}),
                Deny,
                "default.write-outside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": "dangling"}),
                Deny,
                "default.write-outside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": "/etc/passwd"}),
                Deny,
                "default.write-outside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": "/"}),
                Deny,
                "default.write-outside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": "a\u{0}/../../x"}),
                Deny,
                "default.write-outside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"paths": ["a", "../../etc/x"]}),
                Deny,
                "default.write-outside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"source": "a", "destination": "/tmp/x"}),
                Deny,
                "default.write-outside",
            ),
            // Look-alikes of `..` are ordinary names: they stay inside.
            (
                "fs.write",
                Write,
                a,
                json!({"path": "\u{ff0e}\u{ff0e}/outside/x"}),
                Allow,
                "default.write-inside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": "\u{2024}\u{2024}/x"}),
                Allow,
                "default.write-inside",
            ),
            // A home folder to a tool that expands `~`, a folder named `~` to one that does
            // not: no one resolution, so outside.
            (
                "fs.write",
                Write,
                a,
                json!({"path": "~/x"}),
                Deny,
                "default.write-outside",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": "./~/x"}),
                Allow,
                "default.write-inside",
            ),
            // Nothing to check: a person decides.
            (
                "fs.write",
                Write,
                a,
                json!({"content": "x"}),
                Ask,
                "default.write-unknown",
            ),
            (
                "fs.write",
                Write,
                a,
                json!({"path": 42}),
                Ask,
                "default.write-unknown",
            ),
            // Per-agent rule comes first.
            (
                "fs.write",
                Write,
                "agent:reader",
                json!({"path": "a.txt"}),
                Deny,
                "reader-cannot-write",
            ),
        ],
    );
}

#[test]
fn commands_programs_and_shell_metacharacters() {
    use Effect::*;
    use RiskClass::Exec;
    let f = fixture();
    let a = "agent:dev";
    let cases: Vec<(&str, RiskClass, &str, Value, Effect, &str)> = vec![
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "ls -la"}),
            Allow,
            "ls-allowed",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": ["ls", "-la"]}),
            Allow,
            "ls-allowed",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "ls; rm -rf /"}),
            Deny,
            "no-shell-meta",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "ls && curl http://x"}),
            Deny,
            "no-shell-meta",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "ls | sh"}),
            Deny,
            "no-shell-meta",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "ls $(whoami)"}),
            Deny,
            "no-shell-meta",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "ls `id`"}),
            Deny,
            "no-shell-meta",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "ls > /etc/passwd"}),
            Deny,
            "no-shell-meta",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "ls\nrm -rf /"}),
            Deny,
            "no-shell-meta",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "ls\u{0}rm"}),
            Deny,
            "no-shell-meta",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "rm -rf /"}),
            Deny,
            "no-rm",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "/bin/rm -rf /"}),
            Deny,
            "no-rm",
        ),
        // A backslash or a quote in the middle does not hide the program from the rule.
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "r\\m -rf /"}),
            Deny,
            "no-rm",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "\"r\"m -rf /"}),
            Deny,
            "no-rm",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "'rm' -rf /"}),
            Deny,
            "no-rm",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": ["rm", "-rf", "/"]}),
            Deny,
            "no-rm",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "sudo ls"}),
            Deny,
            "no-rm",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "git status"}),
            Allow,
            "git-readonly",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "git push"}),
            Ask,
            "default.exec",
        ),
        // An allow rule trusts a program name only where PATH finds it: a file named `git` in
        // the workspace (one an agent may have written) or elsewhere is not `git` to it.
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "./git status"}),
            Ask,
            "default.exec",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": ["ws/tools/git", "log"]}),
            Ask,
            "default.exec",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "/usr/bin/git diff"}),
            Ask,
            "default.exec",
        ),
        // A deny rule catches the name wherever the file is.
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "/bin/rm -rf ws"}),
            Deny,
            "no-rm",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "./sudo ls"}),
            Deny,
            "no-rm",
        ),
        // Look-alikes never match an allow rule written for the ASCII name.
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "\u{ff4c}\u{ff53} -la"}),
            Ask,
            "default.exec",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "l\u{200b}s"}),
            Ask,
            "default.exec",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": "\u{ff52}\u{ff4d} -rf /"}),
            Ask,
            "default.exec",
        ),
        (
            "sh.run",
            Exec,
            a,
            json!({"command": ""}),
            Ask,
            "default.exec",
        ),
        ("sh.run", Exec, a, json!({}), Ask, "default.exec"),
    ];
    check(&f, &cases);
}

#[test]
fn url_host_allow_list() {
    use Effect::*;
    use RiskClass::Network;
    let f = fixture();
    let a = "agent:web";
    let cases: Vec<(&str, RiskClass, &str, Value, Effect, &str)> = vec![
        (
            "web.fetch",
            Network,
            a,
            json!({"url": "https://example.com/x"}),
            Allow,
            "fetch-allowlist",
        ),
        (
            "web.fetch",
            Network,
            a,
            json!({"url": "https://api.example.com/"}),
            Allow,
            "fetch-allowlist",
        ),
        (
            "web.fetch",
            Network,
            a,
            json!({"url": "https://EXAMPLE.com/"}),
            Allow,
            "fetch-allowlist",
        ),
        (
            "web.fetch",
            Network,
            a,
            json!({"url": "https://example.com./"}),
            Allow,
            "fetch-allowlist",
        ),
        (
            "web.fetch",
            Network,
            a,
            json!({"url": "https://example.com.evil.org/"}),
            Deny,
            "fetch-others",
        ),
        (
            "web.fetch",
            Network,
            a,
            json!({"url": "https://evil.org/?u=https://example.com"}),
            Deny,
            "fetch-others",
        ),
        (
            "web.fetch",
            Network,
            a,
            json!({"url": "https://example.com@evil.org/"}),
            Deny,
            "fetch-others",
        ),
        (
            "web.fetch",
            Network,
            a,
            json!({"url": "https://evil.org\\@example.com/"}),
            Deny,
            "fetch-others",
        ),
        // The other way round: example.com to the WHATWG parser, 127.0.0.1 to curl.
        (
            "web.fetch",
            Network,
            a,
            json!({"url": "http://example.com\\@127.0.0.1:8765/internal.txt"}),
            Deny,
            "fetch-others",
        ),
        (
            "web.fetch",
            Network,
            a,
            json!({"url": "https://exam\tple.com/"}),
            Deny,
            "fetch-others",
        ),
        (
            "web.fetch",
            Network,
            a,
            json!({"url": "https://ex\u{0430}mple.com/"}),
            Deny,
            "fetch-others",
        ),
        (
            "web.fetch",
            Network,
            a,
            json!({"url": "file:///etc/passwd"}),
            Deny,
            "fetch-others",
        ),
        (
            "web.fetch",
            Network,
            a,
            json!({"url": "not a url"}),
            Deny,
            "fetch-others",
        ),
        (
            "web.fetch",
            Network,
            a,
            json!({"url": "http://127.0.0.1/"}),
            Deny,
            "fetch-others",
        ),
        ("web.fetch", Network, a, json!({}), Deny, "fetch-others"),
    ];
    check(&f, &cases);
}

#[test]
fn reads_and_defaults() {
    use Effect::*;
    let f = fixture();
    let a = "agent:any";
    let cases: Vec<(&str, RiskClass, &str, Value, Effect, &str)> = vec![
        (
            "fs.read",
            RiskClass::Read,
            a,
            json!({"path": "a.txt"}),
            Allow,
            "default.read",
        ),
        (
            "fs.read",
            RiskClass::Read,
            a,
            json!({"path": "/etc/shadow"}),
            Ask,
            "read-outside-asks",
        ),
        (
            "fs.read",
            RiskClass::Read,
            a,
            json!({"path": "escape/secret"}),
            Ask,
            "read-outside-asks",
        ),
        // Without a rule of its own, a read-only tool may read the workspace; anywhere else
        // (through a symlink too) a person decides.
        (
            "other.read",
            RiskClass::Read,
            a,
            json!({"path": "/etc/shadow"}),
            Ask,
            "default.read-outside",
        ),
        (
            "other.read",
            RiskClass::Read,
            a,
            json!({"paths": ["a.txt", "etc-link/passwd"]}),
            Ask,
            "default.read-outside",
        ),
        (
            "other.read",
            RiskClass::Read,
            a,
            json!({"file": "sub/../a.txt"}),
            Allow,
            "default.read",
        ),
        // A path key in another case or style is a path key (an MCP tool's `filePath`).
        (
            "other.read",
            RiskClass::Read,
            a,
            json!({"filePath": "/etc/shadow"}),
            Ask,
            "default.read-outside",
        ),
        (
            "other.read",
            RiskClass::Read,
            a,
            json!({"Working-Directory": "/root"}),
            Ask,
            "default.read-outside",
        ),
        (
            "other.read",
            RiskClass::Read,
            a,
            json!({"query": "/etc/shadow"}),
            Allow,
            "default.read",
        ),
        ("x.exec", RiskClass::Exec, a, json!({}), Ask, "default.exec"),
        (
            "x.net",
            RiskClass::Network,
            a,
            json!({}),
            Ask,
            "default.network",
        ),
    ];
    check(&f, &cases);
}

/// The read roots (the gateway's configured `read_roots`) are read like the workspace, and
/// `$read_roots` names them in a rule.
#[test]
fn read_roots_are_readable_without_asking() {
    use Effect::*;
    let mut f = fixture();
    let shared = f.root.join("outside");
    f.policy = Policy::from_yaml(
        &format!(
            "{POLICY}  - id: no-writes-in-read-roots\n    risk: [write]\n    when: [ {{ path_inside: {{ arg: path, roots: [\"$read_roots\"] }} }} ]\n    effect: deny\n"
        ),
        &f.root,
    )
    .unwrap()
    .with_read_roots(std::slice::from_ref(&shared))
    .unwrap();
    assert_eq!(f.policy.read_roots(), std::slice::from_ref(&shared));
    let a = "agent:any";
    let inside = shared.join("notes.txt").display().to_string();
    check(
        &f,
        &[
            (
                "other.read",
                RiskClass::Read,
                a,
                json!({"path": inside}),
                Allow,
                "default.read",
            ),
            (
                "other.read",
                RiskClass::Read,
                a,
                json!({"path": "escape/notes.txt"}),
                Allow,
                "default.read",
            ),
            (
                "other.read",
                RiskClass::Read,
                a,
                json!({"path": "/etc/shadow"}),
                Ask,
                "default.read-outside",
            ),
            (
                "fs.write",
                RiskClass::Write,
                a,
                json!({"path": inside}),
                Deny,
                "no-writes-in-read-roots",
            ),
        ],
    );
}

/// Path conditions are read on the safe side: one path is enough for a deny or ask rule (a
/// second, harmless path argument must not hide the first), and a path that cannot be resolved
/// counts for them; an allow rule needs every path, resolved.
#[test]
fn path_conditions_lean_to_refusing() {
    use Effect::*;
    let f = fixture_of(
        "workspace: [ws]\nrules:\n  - id: no-private\n    when: [ { path_inside: { arg: \"@paths\", roots: [ws/private] } } ]\n    effect: deny\n  - id: reads-inside\n    tools: [fs.read]\n    when: [ { path_inside: { arg: \"@paths\", roots: [\"$workspace\"] } } ]\n    effect: allow\n  - id: reads-ask\n    tools: [fs.read]\n    effect: ask\n",
        &["private"],
        |root| std::os::unix::fs::symlink("loop", root.join("ws/loop")).unwrap(),
    );
    let a = "agent:any";
    check(
        &f,
        &[
            (
                "fs.read",
                RiskClass::Read,
                a,
                json!({"path": "private/key", "file": "pub.txt"}),
                Deny,
                "no-private",
            ),
            (
                "fs.read",
                RiskClass::Read,
                a,
                json!({"path": "loop/key"}),
                Deny,
                "no-private",
            ),
            (
                "fs.read",
                RiskClass::Read,
                a,
                json!({"path": "pub.txt", "file": "/etc/passwd"}),
                Ask,
                "reads-ask",
            ),
            (
                "fs.read",
                RiskClass::Read,
                a,
                json!({"path": "pub.txt"}),
                Allow,
                "reads-inside",
            ),
        ],
    );
    // Every path argument is resolved for the tool, whichever rule decided, and one that
    // resolves to nothing is handed on as such.
    let actor: Actor = a.parse().unwrap();
    let d = f.policy.decide(&PolicyInput {
        tool: "fs.read",
        risk: RiskClass::Read,
        actor: &actor,
        arguments: &json!({"path": "pub.txt", "Output": "sub/../o.txt"}),
        relative_paths: Default::default(),
    });
    assert_eq!(d.rule, "reads-inside");
    let ws = f.root.join("ws");
    assert_eq!(d.paths["pub.txt"], Some(ws.join("pub.txt")));
    assert_eq!(d.paths["sub/../o.txt"], Some(ws.join("o.txt")));
    let d = Policy::from_yaml(
        "workspace: [ws]\nrules: [ { id: all, effect: allow } ]\n",
        &f.root,
    )
    .unwrap()
    .decide(&PolicyInput {
        tool: "fs.read",
        risk: RiskClass::Read,
        actor: &actor,
        arguments: &json!({"path": "loop/x"}),
        relative_paths: Default::default(),
    });
    assert_eq!(d.rule, "all");
    assert_eq!(d.paths["loop/x"], None);
}

/// An ask rule's `path_inside` takes a call with one path inside: a harmless second path carried
/// the first past it to a later allow (`cat secrets/key a.txt` read the key, nobody asked).
/// Taken that way only, it never loosens a later deny.
#[test]
fn an_ask_rule_guarding_a_folder_takes_a_call_with_one_path_in_it() {
    use Effect::*;
    let f = fixture_of(
        "workspace: [ws]\nrules:\n  - id: ask-before-secrets\n    when: [ { path_inside: { arg: \"@paths\", roots: [ws/secrets] } } ]\n    effect: ask\n  - id: no-etc\n    when: [ { path_inside: { arg: \"@paths\", roots: [/etc] } } ]\n    effect: deny\n",
        &["secrets"],
        |_| {},
    );
    let a = "agent:any";
    check(
        &f,
        &[
            (
                "fs.read",
                RiskClass::Read,
                a,
                json!({"paths": ["secrets/key"]}),
                Ask,
                "ask-before-secrets",
            ),
            (
                "fs.read",
                RiskClass::Read,
                a,
                json!({"paths": ["secrets/key", "a.txt"]}),
                Ask,
                "ask-before-secrets",
            ),
            // One path inside, and one a later rule denies: denied, not asked.
            (
                "fs.read",
                RiskClass::Read,
                a,
                json!({"paths": ["secrets/key", "/etc/shadow"]}),
                Deny,
                "no-etc",
            ),
            (
                "fs.read",
                RiskClass::Read,
                a,
                json!({"paths": ["a.txt"]}),
                Allow,
                "default.read",
            ),
        ],
    );
}

#[test]
fn without_defaults_nothing_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let p = Policy::from_yaml("defaults: false\nrules: []\n", dir.path()).unwrap();
    let actor = Actor::System;
    let d = p.decide(&PolicyInput {
        tool: "t",
        risk: RiskClass::Read,
        actor: &actor,
        arguments: &json!({}),
        relative_paths: Default::default(),
    });
    assert_eq!((d.effect, d.rule.as_str()), (Effect::Deny, "default.deny"));
}

/// A caller written without its kind is an agent: `agents: [reviewer]` matched no caller (all
/// are `agent:NAME`, `person:NAME` or `system`), so its deny rule never applied.
#[test]
fn a_caller_written_without_its_kind_is_an_agent() {
    let dir = tempfile::tempdir().unwrap();
    let p = Policy::from_yaml(
        "rules:\n  - id: reviewer-reads-only\n    agents: [reviewer, \"rev*er2\"]\n    risk: [write]\n    effect: deny\n",
        dir.path(),
    )
    .unwrap();
    for (name, denied) in [
        ("agent:reviewer", true),
        ("agent:reviewer2", true),
        ("agent:writer", false),
    ] {
        let actor: Actor = name.parse().unwrap();
        let d = p.decide(&PolicyInput {
            tool: "write_file",
            risk: RiskClass::Write,
            actor: &actor,
            arguments: &json!({"path": "x"}),
            relative_paths: Default::default(),
        });
        assert_eq!(
            d.rule == "reviewer-reads-only",
            denied,
            "{name}: {}",
            d.rule
        );
    }
}

#[test]
fn a_configuration_key_written_twice_is_refused() {
    // The second `path` would replace the first in the tool's input schema, silently.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    std::fs::write(
        &file,
        "tools:\n  - name: t\n    description: d\n    risk: read\n    command: [cat]\n    input_schema:\n      type: object\n      properties:\n        path: { type: string }\n        path: { type: integer }\n",
    )
    .unwrap();
    let err = agent_runtime_gateway::config::GatewayFile::load(&file)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gateway.yaml")
            && err.contains("duplicate key `path`")
            && err.contains("at line 10 column 9"),
        "{err}"
    );
    // A top-level key written twice is placed at the second one too (the parser places it
    // nowhere), and a field the file's type knows is checked before serde's own "duplicate
    // field", which has no place.
    std::fs::write(
        &file,
        "# workspace: [a]\nworkspace: [\".\"]\ntools:\n  - name: t\n    workspace: 1\nread_roots: []\nworkspace: [\"x\"]\n",
    )
    .unwrap();
    let err = agent_runtime_gateway::config::GatewayFile::load(&file)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("duplicate key `workspace`") && err.contains("at line 7 column 1"),
        "{err}"
    );
}

/// A workspace root that does not exist is named, with the configuration file that names it.
#[test]
fn a_missing_workspace_root_names_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, "workspace: [\"nope\"]\n").unwrap();
    let opts = agent_runtime_gateway::config::Options {
        config: Some(file.clone()),
        ..Default::default()
    };
    let err = agent_runtime_gateway::config::assemble(&opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("{}: workspace root ", file.display()))
            && err.contains("nope")
            && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn bad_policies_are_rejected_with_the_rule_named() {
    let base = Path::new("/");
    let err = Policy::from_yaml(
        "rules:\n  - id: a\n    effect: allow\n  - id: a\n    effect: deny\n",
        base,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("duplicate rule id") && err.contains("\"a\""),
        "{err}"
    );
    let err = Policy::from_yaml("rules:\n  - id: a\n    effect: maybe\n", base)
        .unwrap_err()
        .to_string();
    assert!(err.contains("maybe"), "{err}");
    let err = Policy::from_yaml("rules:\n  - id: a\n    effect: allow\n    wen: []\n", base)
        .unwrap_err()
        .to_string();
    assert!(err.contains("wen"), "{err}");
    let err = Policy::from_yaml(
        "rules:\n  - id: a\n    effect: allow\n    when: [ { path_sideways: { arg: p } } ]\n",
        base,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("path_sideways"), "{err}");
    // A selector that is neither a key, a pointer nor a list says what `arg` takes.
    let err = Policy::from_yaml(
        "rules:\n  - id: a\n    effect: deny\n    when: [ { matches: { arg: { x: 1 }, any: ['*'] } } ]\n",
        base,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("rules[0].when[0].matches.arg")
            && err.contains("expected an argument's key, a JSON pointer"),
        "{err}"
    );
    // A format from another build is refused rather than read by guesswork; version 1, or
    // none, is this build's.
    let err = Policy::from_yaml("version: 2\nrules: []\n", base)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("version 2 is not a policy format this build reads"),
        "{err}"
    );
    Policy::from_yaml("version: 1\nrules: []\n", base).unwrap();
    // Rule errors of a file name the file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(
        &file,
        "version: 1\nrules:\n  - {id: a, effect: allow}\n  - {id: a, effect: deny}\n",
    )
    .unwrap();
    let err = agent_runtime_gateway::config::assemble(&agent_runtime_gateway::config::Options {
        policy: Some(file.clone()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with(&format!(
            "{}: policy rule \"a\": duplicate rule id",
            file.display()
        )),
        "{err}"
    );
    // Lists of keys and pointers still load.
    Policy::from_yaml(
        "rules:\n  - id: a\n    effect: deny\n    when: [ { matches: { arg: [command, /opts/x], any: ['*'] } } ]\n",
        base,
    )
    .unwrap();
    // Nesting the YAML parser would take quadratic time over is refused before it runs,
    // at the first bracket too deep (line 2: `  - ` then 257 brackets).
    let deep = format!("rules:\n  - {}{}\n", "[".repeat(5_000), "]".repeat(5_000));
    let err = Policy::from_yaml(&deep, base).unwrap_err().to_string();
    assert!(
        err.contains("line 2 column 261: brackets nested more than 256 levels deep"),
        "{err}"
    );
}

#[test]
fn explain_lists_every_rule() {
    let f = fixture();
    let actor = Actor::Agent("dev".into());
    let args = json!({"command": "ls; rm"});
    let trace = f.policy.explain(&PolicyInput {
        tool: "sh.run",
        risk: RiskClass::Exec,
        actor: &actor,
        arguments: &args,
        relative_paths: Default::default(),
    });
    assert_eq!(trace[0].rule, "no-shell-meta");
    assert!(trace[0].matched);
    assert!(trace.iter().any(|t| t.rule == "default.exec" && t.matched));
    assert!(trace.iter().any(|t| t.rule == "default.read" && !t.matched));
}

#[test]
fn the_example_policy_and_mcp_file_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let p = Policy::load(&root.join("policy.yaml")).unwrap();
    let actor = Actor::Agent("dev".into());
    let args = json!({"command": "ls; rm -rf /"});
    let d = p.decide(&PolicyInput {
        tool: "sh.run",
        risk: RiskClass::Exec,
        actor: &actor,
        arguments: &args,
        relative_paths: Default::default(),
    });
    assert_eq!(
        (d.effect, d.rule.as_str()),
        (Effect::Deny, "no-shell-tricks")
    );
    let secrets = root.join("../.secrets/key").display().to_string();
    let args = json!({"path": secrets});
    let d = p.decide(&PolicyInput {
        tool: "fs.read",
        risk: RiskClass::Read,
        actor: &actor,
        arguments: &args,
        relative_paths: Default::default(),
    });
    assert_eq!(d.rule, "no-secrets-folder");
    let m = agent_runtime_gateway::mcp::McpConfig::load(&root.join("mcp.json")).unwrap();
    assert_eq!(m.servers.len(), 2);
}

/// A tool whose input schema is not for an object could never be called (arguments are an
/// object) and makes MCP clients refuse the whole tool list: refused, naming the tool.
#[test]
fn a_tool_schema_for_anything_but_an_object_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    for (schema, ok) in [
        ("{ type: array }", false),
        ("{ type: [object, \"null\"] }", false),
        ("{}", true),
        ("{ type: object }", true),
    ] {
        std::fs::write(
            &file,
            format!(
                "workspace: [{ws}]\ntools:\n  - name: t.list\n    description: d\n    risk: read\n    command: [cat]\n    input_schema: {schema}\n",
                ws = dir.path().display()
            ),
        )
        .unwrap();
        let r = agent_runtime_gateway::config::assemble(&agent_runtime_gateway::config::Options {
            config: Some(file.clone()),
            ..Default::default()
        });
        match (r, ok) {
            (Ok(_), true) => {}
            (Err(e), false) => {
                let e = e.to_string();
                assert!(e.contains("t.list") && e.contains("type: object"), "{e}");
            }
            (r, _) => panic!("{schema}: {:?}", r.map(|_| ()).map_err(|e| e.to_string())),
        }
    }
}

/// A relative path of a tool that resolves it against a folder the gateway does not know (an
/// MCP server's) resolves to nothing: judged outside, where it would have been judged inside
/// the workspace for a tool of the gateway's own. An absolute path is judged as ever.
#[test]
fn a_relative_path_of_a_tool_with_an_unknown_folder_is_judged_outside() {
    let dir = tempfile::tempdir().unwrap();
    let ws = std::fs::canonicalize(dir.path()).unwrap();
    let policy = Policy::defaults(vec![ws.clone()]).unwrap();
    let actor = Actor::Agent("a".into());
    let decide = |path: &str, relative_paths| {
        let args = json!({ "path": path });
        let d = policy.decide(&PolicyInput {
            tool: "files.write_file",
            risk: RiskClass::Write,
            actor: &actor,
            arguments: &args,
            relative_paths,
        });
        (d.effect, d.rule, d.paths.get(path).cloned().flatten())
    };
    assert_eq!(
        decide("notes.txt", RelativePaths::Base),
        (
            Effect::Allow,
            "default.write-inside".to_string(),
            Some(ws.join("notes.txt"))
        )
    );
    assert_eq!(
        decide("notes.txt", RelativePaths::Unknown),
        (Effect::Deny, "default.write-outside".to_string(), None)
    );
    let inside = ws.join("notes.txt").display().to_string();
    assert_eq!(
        decide(&inside, RelativePaths::Unknown).0,
        Effect::Allow,
        "an absolute path is judged as it is"
    );
}
