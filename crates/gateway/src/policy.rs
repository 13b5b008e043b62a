//! The policy engine: ordered rules that allow, deny or ask about a tool call.
//!
//! A policy is a YAML document of rules. The first rule whose every condition matches decides;
//! after the configured rules come the safe defaults (unless `defaults: false`):
//!
//! | rule | when | effect |
//! | --- | --- | --- |
//! | `default.read-outside` | risk `read`, some path argument outside the workspace and the read roots | ask |
//! | `default.read` | risk `read`, every path argument inside (or none to check) | allow |
//! | `default.write-inside` | risk `write`, every path argument inside the workspace | allow |
//! | `default.write-outside` | risk `write`, some path argument outside the workspace | deny |
//! | `default.write-unknown` | risk `write`, no path argument to check | ask |
//! | `default.exec` | risk `exec` | ask |
//! | `default.network` | risk `network` | ask |
//! | `default.deny` | anything else | deny |
//!
//! ```yaml
//! workspace: ["."]            # relative to the policy file
//! rules:
//!   - id: no-shell-tricks
//!     tools: ["sh.*"]
//!     when:
//!       - shell_metacharacters: { arg: command }
//!     effect: deny
//!     reason: shell metacharacters are not allowed
//!   - id: git-inspect
//!     tools: ["sh.run"]
//!     when:
//!       - program: { arg: command, any: ["git"] }
//!       - argument: { arg: command, any: ["status", "log", "diff"] }
//!     effect: allow
//!     reason: read-only git commands
//! ```
//!
//! Path conditions resolve each path against the first workspace root, follow symlinks that
//! exist and apply `..` after them, so `link/../x` and a symlink out of the workspace are seen
//! for what they are. Program and argument conditions match globs on Unicode scalar values, so a
//! look-alike (`ｒｍ`) never matches an allow rule written for `rm`.

use std::path::{Path, PathBuf};

use agent_runtime_core::{Actor, Effect, RiskClass};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::GatewayError;
use crate::glob::{any_match, glob_match};
use crate::paths::{is_within, resolve};

/// Whether a command tool runs in the sandbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxMode {
    /// In the OS sandbox (bubblewrap plus resource limits): the default.
    #[default]
    Bubblewrap,
    /// Without a sandbox: only when a policy rule names it for the tool.
    None,
}

/// The argument selector of a condition: a top-level key, a JSON pointer (`/a/0/b`), a list of
/// them, or `@paths` for every top-level key that conventionally holds a path.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ArgSelector {
    /// One key or pointer.
    One(String),
    /// Several keys or pointers.
    Many(Vec<String>),
}

/// By hand rather than `untagged`, whose error for anything else is "data did not match any
/// variant of untagged enum ArgSelector": this one says what `arg` takes.
impl<'de> Deserialize<'de> for ArgSelector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Selector;
        impl<'de> serde::de::Visitor<'de> for Selector {
            type Value = ArgSelector;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "an argument's key, a JSON pointer (`/options/path`), a list of them, or \
                     `@paths`",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ArgSelector, E> {
                Ok(ArgSelector::One(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ArgSelector, A::Error> {
                let mut all = Vec::new();
                while let Some(one) = seq.next_element::<String>()? {
                    all.push(one);
                }
                Ok(ArgSelector::Many(all))
            }
        }
        d.deserialize_any(Selector)
    }
}

/// Top-level argument keys that `@paths` selects, in any letter case and with or without `_`
/// and `-` between words (see [`is_path_key`]).
pub const PATH_KEYS: &[&str] = &[
    "path",
    "paths",
    "file",
    "files",
    "file_path",
    "filename",
    "dir",
    "directory",
    "source",
    "destination",
    "dest",
    "target",
    "cwd",
    "root",
    "from",
    "to",
    "output",
    "folder",
    "pathname",
    "dir_path",
    "directory_path",
    "source_path",
    "destination_path",
    "target_path",
    "input_path",
    "output_path",
    "working_directory",
];

impl ArgSelector {
    fn keys(&self) -> Vec<&str> {
        match self {
            ArgSelector::One(s) => vec![s.as_str()],
            ArgSelector::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }

    /// Every string the selector finds in `args` (arrays of strings are flattened).
    pub fn strings<'a>(&self, args: &'a Value) -> Vec<&'a str> {
        let mut out = Vec::new();
        for key in self.keys() {
            if key == "@paths" {
                // Every top-level key that is one of PATH_KEYS written in another case or
                // style (`filePath`, `FILE-PATH`, `file_path`): tools name their arguments
                // as their authors like, and a path the policy does not see is not judged.
                if let Value::Object(map) = args {
                    for (k, v) in map {
                        if is_path_key(k) {
                            collect_strings(Some(v), &mut out);
                        }
                    }
                }
            } else if key.starts_with('/') {
                collect_strings(args.pointer(key), &mut out);
            } else {
                collect_strings(args.get(key), &mut out);
            }
        }
        out
    }
}

/// Whether the argument key `key` is one of [`PATH_KEYS`], letter case, `_` and `-` aside.
pub fn is_path_key(key: &str) -> bool {
    fn folded(k: &str) -> String {
        k.chars()
            .filter(|c| !matches!(c, '_' | '-'))
            .map(|c| c.to_ascii_lowercase())
            .collect()
    }
    // Asked for every argument key of every path condition: the list is folded once.
    static FOLDED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let key = folded(key);
    FOLDED
        .get_or_init(|| PATH_KEYS.iter().map(|k| folded(k)).collect())
        .contains(&key)
}

fn collect_strings<'a>(v: Option<&'a Value>, out: &mut Vec<&'a str>) {
    match v {
        Some(Value::String(s)) => out.push(s),
        Some(Value::Array(items)) => {
            for i in items {
                collect_strings(Some(i), out);
            }
        }
        _ => {}
    }
}

/// One condition of a rule; a rule matches when all of its conditions do. Written in YAML as a
/// map with one key, the condition's name: `- path_outside: { arg: path, roots: [$workspace] }`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", try_from = "ConditionMap")]
#[non_exhaustive]
pub enum Condition {
    /// Every selected path (at least one) resolves inside one of `roots`.
    PathInside {
        /// Which arguments hold paths.
        arg: ArgSelector,
        /// Roots; `$workspace` stands for the workspace roots, `$read_roots` for the read roots
        /// ([`Policy::with_read_roots`]).
        roots: Vec<String>,
    },
    /// Some selected path resolves outside all of `roots` (or cannot be resolved safely).
    PathOutside {
        /// Which arguments hold paths.
        arg: ArgSelector,
        /// Roots; `$workspace` stands for the workspace roots, `$read_roots` for the read roots
        /// ([`Policy::with_read_roots`]).
        roots: Vec<String>,
    },
    /// The command's program (its first word, or the first array element) matches a glob, by
    /// its full text or its base name.
    Program {
        /// Which argument holds the command (a string or an array of strings).
        arg: ArgSelector,
        /// Globs.
        any: Vec<String>,
    },
    /// Some word of the command after the program matches a glob.
    Argument {
        /// Which argument holds the command.
        arg: ArgSelector,
        /// Globs.
        any: Vec<String>,
    },
    /// The selected string contains shell metacharacters (`; | & $ \` < > ( ) { }`, newlines, NUL).
    ShellMetacharacters {
        /// Which argument holds the command.
        arg: ArgSelector,
    },
    /// Every selected URL (at least one) has a host matching one of the globs.
    UrlHostIn {
        /// Which arguments hold URLs.
        arg: ArgSelector,
        /// Host globs (`example.com`, `*.example.com`).
        hosts: Vec<String>,
    },
    /// Some selected URL has no host matching the globs (or does not parse, or has no host).
    UrlHostNotIn {
        /// Which arguments hold URLs.
        arg: ArgSelector,
        /// Host globs.
        hosts: Vec<String>,
    },
    /// Some selected string matches a glob.
    Matches {
        /// Which arguments.
        arg: ArgSelector,
        /// Globs.
        any: Vec<String>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ArgRoots {
    arg: ArgSelector,
    roots: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ArgAny {
    arg: ArgSelector,
    any: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ArgOnly {
    arg: ArgSelector,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ArgHosts {
    arg: ArgSelector,
    hosts: Vec<String>,
}

/// The YAML form of a [`Condition`]: a map with exactly one of these keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConditionMap {
    path_inside: Option<ArgRoots>,
    path_outside: Option<ArgRoots>,
    program: Option<ArgAny>,
    argument: Option<ArgAny>,
    shell_metacharacters: Option<ArgOnly>,
    url_host_in: Option<ArgHosts>,
    url_host_not_in: Option<ArgHosts>,
    matches: Option<ArgAny>,
}

impl TryFrom<ConditionMap> for Condition {
    type Error = String;
    fn try_from(m: ConditionMap) -> Result<Self, String> {
        let mut out = Vec::new();
        if let Some(c) = m.path_inside {
            out.push(Condition::PathInside {
                arg: c.arg,
                roots: c.roots,
            });
        }
        if let Some(c) = m.path_outside {
            out.push(Condition::PathOutside {
                arg: c.arg,
                roots: c.roots,
            });
        }
        if let Some(c) = m.program {
            out.push(Condition::Program {
                arg: c.arg,
                any: c.any,
            });
        }
        if let Some(c) = m.argument {
            out.push(Condition::Argument {
                arg: c.arg,
                any: c.any,
            });
        }
        if let Some(c) = m.shell_metacharacters {
            out.push(Condition::ShellMetacharacters { arg: c.arg });
        }
        if let Some(c) = m.url_host_in {
            out.push(Condition::UrlHostIn {
                arg: c.arg,
                hosts: c.hosts,
            });
        }
        if let Some(c) = m.url_host_not_in {
            out.push(Condition::UrlHostNotIn {
                arg: c.arg,
                hosts: c.hosts,
            });
        }
        if let Some(c) = m.matches {
            out.push(Condition::Matches {
                arg: c.arg,
                any: c.any,
            });
        }
        if out.len() != 1 {
            return Err(format!(
                "a condition is a map with exactly one key (path_inside, path_outside, program, \
                 argument, shell_metacharacters, url_host_in, url_host_not_in, matches); got {}",
                out.len()
            ));
        }
        Ok(out.remove(0))
    }
}

/// A rule as written in the policy file.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A unique id, recorded in every decision the rule makes.
    pub id: String,
    /// Tool-name globs; empty means every tool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// Caller globs over the actor string (`agent:writer`, `agent:*`); empty means anyone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// Risk classes; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub risk: Vec<RiskClass>,
    /// Conditions on the arguments; all must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
    /// What to do.
    pub effect: Effect,
    /// Why, for the log and the approval prompt.
    #[serde(default)]
    pub reason: Option<String>,
    /// For command tools: `none` lets the tool run without the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxMode>,
}

/// The policy file format this build reads (`version: 1`; a file without `version` is read as
/// this one).
pub const POLICY_VERSION: u32 = 1;

/// A policy file.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Format version ([`POLICY_VERSION`]; other versions are refused).
    #[serde(default)]
    pub version: Option<u32>,
    /// Workspace roots, relative to the policy file's folder (default: the current folder).
    #[serde(default)]
    pub workspace: Vec<PathBuf>,
    /// Ordered rules.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Whether the safe defaults follow the rules (default true).
    #[serde(default)]
    pub defaults: Option<bool>,
}

/// What the policy decided about one call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Allow, deny or ask.
    pub effect: Effect,
    /// The deciding rule's id.
    pub rule: String,
    /// Why.
    pub reason: String,
    /// The sandbox mode the rule grants (command tools only).
    pub sandbox: SandboxMode,
    /// The paths the decision judged: each path argument's text (every `@paths` argument, and
    /// any other a path condition looked at), and what it resolved to (`None`: nothing safe).
    /// The gateway hands them to the tool (`CallContext::judged_paths`), which opens them as
    /// judged.
    #[serde(skip)]
    pub paths: std::collections::BTreeMap<String, Option<PathBuf>>,
}

/// Each path a decision resolved, once: every rule sees the same resolution of one text, and
/// the tool is given it.
#[derive(Clone, Default)]
struct Resolutions {
    known: std::cell::RefCell<std::collections::BTreeMap<String, Option<PathBuf>>>,
    /// Relative paths resolve to nothing (see [`RelativePaths::Unknown`]).
    relative_unknown: bool,
}

impl Resolutions {
    fn new(relative_paths: RelativePaths) -> Resolutions {
        Resolutions {
            known: Default::default(),
            relative_unknown: relative_paths == RelativePaths::Unknown,
        }
    }

    fn resolve(&self, path: &str, base: &Path) -> Option<PathBuf> {
        if let Some(known) = self.known.borrow().get(path) {
            return known.clone();
        }
        let resolved = if self.relative_unknown && !Path::new(path).is_absolute() {
            None
        } else {
            resolve(path, base)
        };
        self.known
            .borrow_mut()
            .insert(path.to_string(), resolved.clone());
        resolved
    }

    /// Every resolution made, after resolving the `@paths` arguments no rule looked at: the
    /// tool opens each as resolved here, whichever rule decided.
    fn into_judged(
        self,
        args: &Value,
        base: &Path,
    ) -> std::collections::BTreeMap<String, Option<PathBuf>> {
        for p in ArgSelector::One("@paths".into()).strings(args) {
            self.resolve(p, base);
        }
        self.known.into_inner()
    }
}

/// What a policy is asked about.
#[derive(Clone, Copy, Debug)]
pub struct PolicyInput<'a> {
    /// The tool's registry name.
    pub tool: &'a str,
    /// Its risk class.
    pub risk: RiskClass,
    /// Who calls.
    pub actor: &'a Actor,
    /// The validated arguments.
    pub arguments: &'a Value,
    /// Where the tool takes a relative path in its arguments from.
    pub relative_paths: RelativePaths,
}

/// Where a tool takes a relative path in its arguments from: what the policy must judge it
/// against, or whether it can.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RelativePaths {
    /// The policy's base ([`Policy::base`], the first workspace root): the tools the gateway
    /// hands it (`CallContext::workdir`) and the commands it starts there.
    #[default]
    Base,
    /// A folder the gateway does not know: an MCP server resolves a relative path against its
    /// own working folder, wherever it was started (or a remote machine's). Such a path is
    /// judged to resolve to nothing, as outside every root: a read asks, a write is denied.
    Unknown,
}

#[derive(Clone, Debug)]
enum Compiled {
    /// Paths inside (`inside`) or outside the roots. `any`: one matching path is enough and
    /// one that resolves to nothing counts as matching; else every path (at least one) must
    /// resolve and match. See [`path_condition_any`] for which rules read it which way.
    Path {
        roots: Vec<PathBuf>,
        inside: bool,
        any: bool,
    },
    Program {
        globs: Vec<String>,
        /// Whether a program given by path also matches by its file's base name: for deny and
        /// ask rules (catching `/bin/rm` as `rm` is the safe side), not for allow rules (a
        /// file named `git` that an agent wrote is not `git`).
        by_base_name: bool,
    },
    Argument(Vec<String>),
    ShellMeta,
    UrlIn(Vec<String>),
    UrlNotIn(Vec<String>),
    Matches(Vec<String>),
}

#[derive(Clone, Debug)]
struct CompiledRule {
    rule: Rule,
    conditions: Vec<(Compiled, ArgSelector)>,
}

/// A loaded policy: rules compiled, roots resolved.
#[derive(Clone, Debug)]
pub struct Policy {
    rules: Vec<CompiledRule>,
    workspace: Vec<PathBuf>,
    /// Folders outside the workspace whose files may be read: `$read_roots` in rules.
    read_roots: Vec<PathBuf>,
    /// The first workspace root (`/` without one): what relative paths are judged against.
    base: std::sync::Arc<Path>,
}

/// One line of [`Policy::explain`].
#[derive(Clone, Debug, Serialize)]
pub struct RuleTrace {
    /// The rule's id.
    pub rule: String,
    /// Whether it matched.
    pub matched: bool,
    /// Its effect.
    pub effect: Effect,
}

const SHELL_META: &[char] = &[
    ';', '|', '&', '$', '`', '<', '>', '(', ')', '{', '}', '\n', '\r', '\0',
];

impl Policy {
    /// The safe defaults alone, with `workspace` as the workspace roots.
    ///
    /// No roots means no workspace: no path is inside one, so writes are denied and reads of
    /// paths outside the read roots ask. The process's working folder is never taken for one
    /// here (an app started from a file manager runs in `/`); the command line and policy
    /// files, which document that default, pass it themselves.
    pub fn defaults(workspace: Vec<PathBuf>) -> Result<Policy, GatewayError> {
        Policy::from_file(PolicyFile::default(), workspace)
    }

    /// Parses a policy from YAML; relative workspace roots are taken from `base`.
    pub fn from_yaml(text: &str, base: &Path) -> Result<Policy, GatewayError> {
        Policy::from_yaml_in(text, base, &[])
    }

    /// [`Policy::from_yaml`], with `workspace` as the default workspace (see
    /// [`Policy::load_in`]).
    pub fn from_yaml_in(
        text: &str,
        base: &Path,
        workspace: &[PathBuf],
    ) -> Result<Policy, GatewayError> {
        let mut file: PolicyFile =
            crate::yaml_from_str(text).map_err(|message| GatewayError::Parse {
                what: "policy".into(),
                message,
            })?;
        if let Some(v) = file.version.filter(|v| *v != POLICY_VERSION) {
            return Err(GatewayError::Parse {
                what: "policy".into(),
                message: format!(
                    "version {v} is not a policy format this build reads (it reads version \
                     {POLICY_VERSION})"
                ),
            });
        }
        // Roots in rules, like the workspace, are relative to the policy file.
        for rule in &mut file.rules {
            // A caller written without its kind (`reviewer`) is an agent (`agent:reviewer`), as
            // the command line's `--agent` reads it: as written it matched no caller, and the
            // rule never applied, without a word.
            for a in rule.agents.iter_mut() {
                if !a.contains(':') && a != "*" {
                    *a = format!("agent:{a}");
                }
            }
            for c in &mut rule.when {
                if let Condition::PathInside { roots, .. } | Condition::PathOutside { roots, .. } =
                    c
                {
                    for r in roots.iter_mut() {
                        if !ROOT_TOKENS.contains(&r.as_str()) && Path::new(r.as_str()).is_relative()
                        {
                            *r = base.join(r.as_str()).display().to_string();
                        }
                    }
                }
            }
        }
        let roots: Vec<PathBuf> = file.workspace.iter().map(|r| base.join(r)).collect();
        let roots = if roots.is_empty() {
            workspace_or_cwd(workspace.to_vec())?
        } else {
            roots
        };
        Policy::from_file(file, roots)
    }

    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<Policy, GatewayError> {
        Policy::load_in(path, &[])
    }

    /// [`Policy::load`], with `workspace` as the workspace when the file names none (the
    /// gateway passes its own, so that policy and sandbox agree on it); empty means the
    /// current directory.
    pub fn load_in(path: &Path, workspace: &[PathBuf]) -> Result<Policy, GatewayError> {
        let text = crate::read_config_text(path)?;
        let base = base_dir(path)?;
        Policy::from_yaml_in(&text, &base, workspace).map_err(|e| match e {
            GatewayError::Parse { message, .. } => GatewayError::Parse {
                what: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Builds a policy from a parsed file and resolved workspace roots.
    pub fn from_file(file: PolicyFile, workspace: Vec<PathBuf>) -> Result<Policy, GatewayError> {
        let workspace: Vec<PathBuf> = workspace
            .iter()
            .map(|r| resolve_root(r))
            .collect::<Result<_, _>>()?;
        let mut rules = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let defaults = file.defaults.unwrap_or(true);
        let mut all = file.rules;
        if defaults {
            all.extend(default_rules());
        }
        for rule in all {
            if rule.id.is_empty() {
                return Err(GatewayError::Policy {
                    rule: rule.id,
                    message: "empty id".into(),
                });
            }
            if !seen.insert(rule.id.clone()) {
                return Err(GatewayError::Policy {
                    rule: rule.id.clone(),
                    message: "duplicate rule id".into(),
                });
            }
            let conditions = compile_all(&rule, &workspace, &[])?;
            rules.push(CompiledRule { rule, conditions });
        }
        let base = workspace
            .first()
            .map_or_else(|| Path::new("/").into(), |root| root.as_path().into());
        Ok(Policy {
            rules,
            workspace,
            read_roots: Vec::new(),
            base,
        })
    }

    /// The policy with `roots` as its read roots, the folders outside the workspace whose
    /// files read-only tools may read without approval (`$read_roots` in a rule's roots;
    /// the default rule `default.read-outside` asks about reads anywhere else). The gateway
    /// passes its configuration's `read_roots`, the folders every command tool sees.
    ///
    /// ```
    /// # use agent_runtime_gateway::Policy;
    /// # let dir = std::env::temp_dir();
    /// let policy = Policy::defaults(vec![dir.clone()])?.with_read_roots(&["/usr/share/dict".into()])?;
    /// assert_eq!(policy.read_roots().len(), 1);
    /// # Ok::<(), agent_runtime_gateway::GatewayError>(())
    /// ```
    pub fn with_read_roots(mut self, roots: &[PathBuf]) -> Result<Policy, GatewayError> {
        self.read_roots = roots
            .iter()
            .map(|r| {
                resolve_root(r).map_err(|e| match e {
                    GatewayError::Policy { message, .. } => GatewayError::Policy {
                        rule: "read_roots".into(),
                        message,
                    },
                    other => other,
                })
            })
            .collect::<Result<_, _>>()?;
        for r in &mut self.rules {
            r.conditions = compile_all(&r.rule, &self.workspace, &self.read_roots)?;
        }
        Ok(self)
    }

    /// The resolved read roots (see [`Policy::with_read_roots`]).
    pub fn read_roots(&self) -> &[PathBuf] {
        &self.read_roots
    }

    /// The resolved workspace roots.
    pub fn workspace(&self) -> &[PathBuf] {
        &self.workspace
    }

    /// The rules in evaluation order (configured rules, then defaults).
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().map(|r| &r.rule)
    }

    /// The folder relative paths in arguments are judged against: the first workspace root
    /// (`/` without one). The gateway hands it to the tools it calls
    /// (`CallContext::workdir`), so that they open what was judged.
    pub fn base(&self) -> &std::sync::Arc<Path> {
        &self.base
    }

    /// Decides about one call. With no matching rule (only possible with `defaults: false`),
    /// the call is denied by the implicit rule `default.deny`.
    pub fn decide(&self, input: &PolicyInput<'_>) -> Decision {
        let resolutions = Resolutions::new(input.relative_paths);
        self.decide_from(0, input, resolutions)
    }

    /// The decision of the rules from the `first` on, with the paths resolved so far (every
    /// rule sees one resolution of a path's text).
    fn decide_from(
        &self,
        first: usize,
        input: &PolicyInput<'_>,
        resolutions: Resolutions,
    ) -> Decision {
        let base = &*self.base;
        for (i, r) in self.rules.iter().enumerate().skip(first) {
            if self.rule_matches(r, input, base, &resolutions, false) {
                // An ask rule's `path_inside` takes a call with one path inside (a harmless
                // second path must not carry the first past it, to a later allow). Matched
                // that way only, it never loosens what the later rules decide: a call they
                // deny stays denied rather than go to a person.
                if r.rule.effect == Effect::Ask
                    && !self.rule_matches(r, input, base, &resolutions, true)
                {
                    let rest = self.decide_from(i + 1, input, resolutions.clone());
                    if rest.effect == Effect::Deny {
                        return rest;
                    }
                }
                return Decision {
                    effect: r.rule.effect,
                    rule: r.rule.id.clone(),
                    reason: r.rule.reason.clone().unwrap_or_else(|| {
                        format!("rule {} says {}", r.rule.id, r.rule.effect.as_str())
                    }),
                    sandbox: r.rule.sandbox.unwrap_or_default(),
                    paths: resolutions.into_judged(input.arguments, base),
                };
            }
        }
        Decision {
            effect: Effect::Deny,
            rule: "default.deny".into(),
            reason: "no rule allows this call".into(),
            sandbox: SandboxMode::Bubblewrap,
            paths: resolutions.into_judged(input.arguments, base),
        }
    }

    /// Every rule with whether it matches, in order (for `policy check`).
    pub fn explain(&self, input: &PolicyInput<'_>) -> Vec<RuleTrace> {
        let base = &*self.base;
        let resolutions = Resolutions::new(input.relative_paths);
        self.rules
            .iter()
            .map(|r| RuleTrace {
                rule: r.rule.id.clone(),
                matched: self.rule_matches(r, input, base, &resolutions, false),
                effect: r.rule.effect,
            })
            .collect()
    }

    fn rule_matches(
        &self,
        r: &CompiledRule,
        input: &PolicyInput<'_>,
        base: &Path,
        resolutions: &Resolutions,
        every_path_inside: bool,
    ) -> bool {
        let rule = &r.rule;
        if !rule.tools.is_empty() && !any_match(&rule.tools, input.tool) {
            return false;
        }
        if !rule.risk.is_empty() && !rule.risk.contains(&input.risk) {
            return false;
        }
        if !rule.agents.is_empty() && !any_match(&rule.agents, &input.actor.to_string()) {
            return false;
        }
        r.conditions.iter().all(|(c, sel)| {
            condition_matches(
                c,
                sel,
                input.arguments,
                base,
                resolutions,
                every_path_inside,
            )
        })
    }
}

/// The absolute folder of a configuration file, against which its relative paths resolve
/// (`.` for a bare file name, whose parent is the empty path).
pub(crate) fn base_dir(path: &Path) -> Result<PathBuf, GatewayError> {
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::path::absolute(base).map_err(|source| GatewayError::Read {
        path: base.to_path_buf(),
        source,
    })
}

fn workspace_or_cwd(roots: Vec<PathBuf>) -> Result<Vec<PathBuf>, GatewayError> {
    if !roots.is_empty() {
        return Ok(roots);
    }
    let cwd = std::env::current_dir().map_err(|source| GatewayError::Read {
        path: PathBuf::from("."),
        source,
    })?;
    Ok(vec![cwd])
}

fn resolve_root(root: &Path) -> Result<PathBuf, GatewayError> {
    let text = root.to_str().ok_or_else(|| GatewayError::Policy {
        rule: "workspace".into(),
        message: format!("root {} is not UTF-8", root.display()),
    })?;
    let cwd = std::env::current_dir().map_err(|source| GatewayError::Read {
        path: PathBuf::from("."),
        source,
    })?;
    resolve(text, &cwd).ok_or_else(|| GatewayError::Policy {
        rule: "workspace".into(),
        message: format!("root {text} cannot be resolved"),
    })
}

/// The words that stand for roots the policy is given rather than paths of the file.
const ROOT_TOKENS: &[&str] = &["$workspace", "$read_roots"];

fn expand_roots(
    roots: &[String],
    workspace: &[PathBuf],
    read_roots: &[PathBuf],
    rule: &str,
) -> Result<Vec<PathBuf>, GatewayError> {
    let mut out = Vec::new();
    for r in roots {
        if r == "$workspace" {
            out.extend(workspace.iter().cloned());
        } else if r == "$read_roots" {
            out.extend(read_roots.iter().cloned());
        } else {
            out.push(
                resolve_root(Path::new(r)).map_err(|e| GatewayError::Policy {
                    rule: rule.to_string(),
                    message: e.to_string(),
                })?,
            );
        }
    }
    Ok(out)
}

fn compile_all(
    rule: &Rule,
    workspace: &[PathBuf],
    read_roots: &[PathBuf],
) -> Result<Vec<(Compiled, ArgSelector)>, GatewayError> {
    rule.when
        .iter()
        .map(|c| compile(c, workspace, read_roots, &rule.id, rule.effect))
        .collect()
}

fn compile(
    c: &Condition,
    workspace: &[PathBuf],
    read_roots: &[PathBuf],
    rule: &str,
    effect: Effect,
) -> Result<(Compiled, ArgSelector), GatewayError> {
    Ok(match c {
        Condition::PathInside { arg, roots } => (
            Compiled::Path {
                roots: expand_roots(roots, workspace, read_roots, rule)?,
                inside: true,
                any: path_condition_any(effect),
            },
            arg.clone(),
        ),
        Condition::PathOutside { arg, roots } => (
            Compiled::Path {
                roots: expand_roots(roots, workspace, read_roots, rule)?,
                inside: false,
                any: path_condition_any(effect),
            },
            arg.clone(),
        ),
        Condition::Program { arg, any } => (
            Compiled::Program {
                globs: any.clone(),
                by_base_name: effect != Effect::Allow,
            },
            arg.clone(),
        ),
        Condition::Argument { arg, any } => (Compiled::Argument(any.clone()), arg.clone()),
        Condition::ShellMetacharacters { arg } => (Compiled::ShellMeta, arg.clone()),
        Condition::UrlHostIn { arg, hosts } => (Compiled::UrlIn(lower(hosts)), arg.clone()),
        Condition::UrlHostNotIn { arg, hosts } => (Compiled::UrlNotIn(lower(hosts)), arg.clone()),
        Condition::Matches { arg, any } => (Compiled::Matches(any.clone()), arg.clone()),
    })
}

/// Whether a path condition in a rule of `effect` matches on one path (and on a path that
/// resolves to nothing) rather than needing every path: read on the side that refuses more.
/// `path_inside` in a deny rule: one path inside is enough (`{path: secret, file: notes}` must
/// not slip past it). `path_outside` in a deny or ask rule: one path outside is enough, and
/// so is `path_inside` in an ask rule (`{paths: [secrets/key, a.txt]}` was not asked about, and
/// a later allow took it), which then never loosens a later deny (see [`Policy::decide`]). An
/// allow rule needs every path.
fn path_condition_any(effect: Effect) -> bool {
    match effect {
        Effect::Deny | Effect::Ask => true,
        Effect::Allow => false,
    }
}

fn lower(v: &[String]) -> Vec<String> {
    v.iter().map(|s| s.to_ascii_lowercase()).collect()
}

/// The words of a command: an array of strings as given, or a string split on whitespace with
/// simple single and double quotes honoured.
pub fn command_words(v: &Value) -> Vec<String> {
    match v {
        Value::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(String::from))
            .collect(),
        Value::String(s) => split_words(s),
        _ => Vec::new(),
    }
}

fn split_words(s: &str) -> Vec<String> {
    // Quotes and backslashes as `sh` reads them, so that `r\m` or `"r"m` is the program `rm`
    // a rule names, not a different word that slips past it.
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars().peekable();
    while let Some(ch) = chars.next() {
        match quote {
            Some(q) if ch == q => quote = None,
            // In double quotes a backslash escapes only these; elsewhere it stays.
            Some('"') if ch == '\\' && matches!(chars.peek(), Some('$' | '`' | '"' | '\\')) => {
                cur.extend(chars.next());
            }
            Some(_) => cur.push(ch),
            // A backslash before a newline joins the lines; before anything else it quotes it.
            None if ch == '\\' => {
                if let Some(next) = chars.next().filter(|c| *c != '\n') {
                    cur.push(next);
                    in_word = true;
                }
            }
            None if ch == '\'' || ch == '"' => {
                quote = Some(ch);
                in_word = true;
            }
            None if ch.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            None => {
                cur.push(ch);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

fn selected_commands<'a>(sel: &ArgSelector, args: &'a Value) -> Vec<&'a Value> {
    let mut out = Vec::new();
    for key in sel.keys() {
        let v = if key.starts_with('/') {
            args.pointer(key)
        } else {
            args.get(key)
        };
        if let Some(v) = v {
            out.push(v);
        }
    }
    out
}

fn url_host(text: &str) -> Option<String> {
    // Where parsers disagree, a URL has no host here, so no allow-list takes it: `\\` is a
    // path separator to the WHATWG parser and part of the user name to curl
    // (`http://example.com\\@127.0.0.1/` is example.com to one and 127.0.0.1 to the other),
    // and the WHATWG parser drops tabs and line breaks that others keep.
    if text
        .chars()
        .any(|c| c == '\\' || c.is_whitespace() || c.is_control())
    {
        return None;
    }
    let u = url::Url::parse(text).ok()?;
    u.host_str()
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
}

/// Whether condition `c` matches; `every_path_inside` reads a `path_inside` as needing every
/// path, whatever its rule's effect (see [`Policy::decide`]).
fn condition_matches(
    c: &Compiled,
    sel: &ArgSelector,
    args: &Value,
    base: &Path,
    resolutions: &Resolutions,
    every_path_inside: bool,
) -> bool {
    match c {
        Compiled::Path { roots, inside, any } => {
            let any = *any && !(every_path_inside && *inside);
            let matches = |p: &&str| {
                resolutions
                    .resolve(p, base)
                    .map(|p| roots.iter().any(|r| is_within(&p, r)) == *inside)
            };
            let paths = sel.strings(args);
            if any {
                paths.iter().any(|p| matches(p).unwrap_or(true))
            } else {
                !paths.is_empty() && paths.iter().all(|p| matches(p).unwrap_or(false))
            }
        }
        Compiled::Program {
            globs,
            by_base_name,
        } => selected_commands(sel, args).iter().any(|v| {
            let words = command_words(v);
            // A bare name is whatever PATH finds, and matches as it is; a path matches by its
            // full text, and by its base name only where `by_base_name` allows.
            words.first().is_some_and(|prog| {
                let base_name = prog.rsplit('/').next().unwrap_or(prog);
                any_match(globs, prog) || (*by_base_name && any_match(globs, base_name))
            })
        }),
        Compiled::Argument(globs) => selected_commands(sel, args)
            .iter()
            .any(|v| command_words(v).iter().skip(1).any(|w| any_match(globs, w))),
        Compiled::ShellMeta => sel.strings(args).iter().any(|s| s.contains(SHELL_META)),
        Compiled::UrlIn(hosts) => {
            let urls = sel.strings(args);
            !urls.is_empty()
                && urls
                    .iter()
                    .all(|u| url_host(u).is_some_and(|h| hosts.iter().any(|g| glob_match(g, &h))))
        }
        Compiled::UrlNotIn(hosts) => sel
            .strings(args)
            .iter()
            .any(|u| !url_host(u).is_some_and(|h| hosts.iter().any(|g| glob_match(g, &h)))),
        Compiled::Matches(globs) => sel.strings(args).iter().any(|s| any_match(globs, s)),
    }
}

fn default_rules() -> Vec<Rule> {
    let paths = || ArgSelector::One("@paths".into());
    let ws = || vec!["$workspace".to_string()];
    let rule =
        |id: &str, risk: RiskClass, when: Vec<Condition>, effect: Effect, reason: &str| Rule {
            id: id.into(),
            tools: Vec::new(),
            agents: Vec::new(),
            risk: vec![risk],
            when,
            effect,
            reason: Some(reason.into()),
            sandbox: None,
        };
    vec![
        // Read-only tools read anything the process can (the file tools run in-process, and
        // a gateway run as root reads /etc/shadow): outside the folders it was given, a
        // person decides.
        rule(
            "default.read-outside",
            RiskClass::Read,
            vec![Condition::PathOutside {
                arg: paths(),
                roots: vec!["$workspace".into(), "$read_roots".into()],
            }],
            Effect::Ask,
            "reading outside the workspace and the configuration's read_roots needs approval",
        ),
        rule(
            "default.read",
            RiskClass::Read,
            vec![],
            Effect::Allow,
            "read-only tools are allowed inside the workspace and the read roots, and when no path argument is given",
        ),
        rule(
            "default.write-inside",
            RiskClass::Write,
            vec![Condition::PathInside {
                arg: paths(),
                roots: ws(),
            }],
            Effect::Allow,
            "writes inside the workspace are allowed",
        ),
        rule(
            "default.write-outside",
            RiskClass::Write,
            vec![Condition::PathOutside {
                arg: paths(),
                roots: ws(),
            }],
            Effect::Deny,
            "writes outside the workspace are denied",
        ),
        rule(
            "default.write-unknown",
            RiskClass::Write,
            vec![],
            Effect::Ask,
            "a write whose target the policy cannot see needs approval",
        ),
        rule(
            "default.exec",
            RiskClass::Exec,
            vec![],
            Effect::Ask,
            "running programs needs approval",
        ),
        rule(
            "default.network",
            RiskClass::Network,
            vec![],
            Effect::Ask,
            "network access needs approval",
        ),
    ]
}
