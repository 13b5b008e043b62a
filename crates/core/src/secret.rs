//! Secrets: where a run's secrets come from ([`SecretSource`]) and how they are kept out of
//! everything recorded or shown ([`Redactor`]).
//!
//! Redaction has two rules: the value of any object key that names a secret (`token`,
//! `password`, `api_key`, `authorization`, ...) is replaced, and any occurrence of a registered
//! secret value (the values of environment variables handed to tools, MCP server tokens, the
//! secrets a task graph names) is replaced wherever it appears in a string. It is applied to
//! event payloads, approval requests, tool results and error messages.

use serde_json::Value;

/// The text that stands in for a redacted secret.
pub const REDACTED: &str = "[REDACTED]";

/// Replaces secrets in JSON values and strings.
#[derive(Clone, Default)]
pub struct Redactor {
    values: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    // By hand: the derived form would print every secret it hides.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("secrets", &self.values.len())
            .finish()
    }
}

const SECRET_KEY_PARTS: &[&str] = &[
    "token",
    "secret",
    "password",
    "passwd",
    "apikey",
    "api_key",
    "api-key",
    "authorization",
    "cookie",
    "credential",
    "private_key",
    "privatekey",
];

/// Whether an object key names a secret.
pub fn is_secret_key(key: &str) -> bool {
    let lower = key.to_ascii_lowercase();
    SECRET_KEY_PARTS.iter().any(|p| lower.contains(p))
}

impl Redactor {
    /// A redactor that knows no secret values (key names still apply).
    pub fn new() -> Self {
        Redactor::default()
    }

    /// The shortest secret value a redactor replaces: shorter ones would redact ordinary text.
    pub const MIN_SECRET_LEN: usize = 4;

    /// Registers a secret value; values shorter than 4 bytes are ignored (they would redact
    /// ordinary text).
    pub fn add_secret(&mut self, value: impl Into<String>) {
        let v = value.into();
        if v.len() >= Self::MIN_SECRET_LEN && !self.values.contains(&v) {
            self.values.push(v);
            // Longest first, so a secret containing another is replaced whole.
            self.values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        }
    }

    /// This redactor with `values` registered too (see [`Redactor::add_secret`]).
    pub fn with_secrets(mut self, values: &[String]) -> Self {
        for v in values {
            self.add_secret(v.as_str());
        }
        self
    }

    /// Whether any secret values are registered.
    pub fn has_secrets(&self) -> bool {
        !self.values.is_empty()
    }

    /// `text` with every registered secret value replaced.
    pub fn redact_str(&self, text: &str) -> String {
        let mut out = text.to_string();
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), REDACTED);
            }
        }
        out
    }

    /// `value` with every registered secret value replaced in its strings (keys included),
    /// and nothing else changed: for results whose keys are data, not configuration (a tool's
    /// output may well have a `tokens` field).
    pub fn redact_values(&self, value: &Value) -> Value {
        if self.values.is_empty() {
            return value.clone();
        }
        self.walk(value, false)
    }

    /// `value` with secret keys and secret values replaced.
    pub fn redact(&self, value: &Value) -> Value {
        self.walk(value, true)
    }

    /// [`Redactor::redact`] when `by_key`, else [`Redactor::redact_values`].
    fn walk(&self, value: &Value, by_key: bool) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| {
                        let v = if by_key && is_secret_key(k) && !v.is_null() {
                            Value::String(REDACTED.to_string())
                        } else {
                            self.walk(v, by_key)
                        };
                        (self.redact_str(k), v)
                    })
                    .collect(),
            ),
            Value::Array(items) => {
                Value::Array(items.iter().map(|v| self.walk(v, by_key)).collect())
            }
            Value::String(s) if !self.values.is_empty() => Value::String(self.redact_str(s)),
            other => other.clone(),
        }
    }
}

/// Where a run finds the secrets a task graph names as `{{ secrets.NAME }}`.
///
/// A secret's value is handed to the one tool call that names it and never recorded: events
/// keep the `{{ secrets.NAME }}` text, and the call's result is redacted before it is.
///
/// ```
/// use agent_runtime_core::{SecretSource, StaticSecrets};
/// let secrets = StaticSecrets::new([("TOKEN", "s3cr3t")]);
/// assert_eq!(secrets.secret("TOKEN").as_deref(), Some("s3cr3t"));
/// assert_eq!(secrets.secret("OTHER"), None);
/// ```
pub trait SecretSource: Send + Sync {
    /// The value of secret `name`, or `None` when it is not set.
    fn secret(&self, name: &str) -> Option<String>;
}

/// No secrets at all: a graph that names one fails that call.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSecrets;

impl SecretSource for NoSecrets {
    fn secret(&self, _name: &str) -> Option<String> {
        None
    }
}

/// Secrets from the environment: `NAME` is read from [`EnvSecrets::PREFIX`]`NAME`
/// (`AGENT_RUNTIME_SECRET_GITHUB_TOKEN` for `{{ secrets.GITHUB_TOKEN }}`). The prefix keeps a
/// graph from reading any other variable of the process (cloud credentials, the store's
/// passphrase).
#[derive(Clone, Copy, Debug, Default)]
pub struct EnvSecrets;

impl EnvSecrets {
    /// What an environment variable's name starts with to be a secret.
    pub const PREFIX: &'static str = "AGENT_RUNTIME_SECRET_";
}

impl SecretSource for EnvSecrets {
    fn secret(&self, name: &str) -> Option<String> {
        std::env::var(format!("{}{name}", Self::PREFIX)).ok()
    }
}

/// Secrets held in memory: for embedders that read them from their own vault, and for tests.
#[derive(Clone, Default)]
pub struct StaticSecrets {
    values: std::collections::BTreeMap<String, String>,
}

impl StaticSecrets {
    /// Secrets from `(name, value)` pairs.
    pub fn new<N: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (N, V)>) -> Self {
        StaticSecrets {
            values: pairs
                .into_iter()
                .map(|(n, v)| (n.into(), v.into()))
                .collect(),
        }
    }
}

impl std::fmt::Debug for StaticSecrets {
    // By hand: the derived form would print every value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticSecrets")
            .field("names", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SecretSource for StaticSecrets {
    fn secret(&self, name: &str) -> Option<String> {
        self.values.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_and_values_are_redacted() {
        let mut r = Redactor::new();
        r.add_secret("hunter22");
        let v = json!({"path": "x", "API_KEY": "abc", "nested": [{"authToken": 1}],
                       "note": "pw is hunter22!"});
        let out = r.redact(&v);
        assert_eq!(out["API_KEY"], REDACTED);
        assert_eq!(out["nested"][0]["authToken"], REDACTED);
        assert_eq!(out["note"], "pw is [REDACTED]!");
        assert_eq!(out["path"], "x");
    }

    #[test]
    fn value_redaction_leaves_keys_that_only_look_secret() {
        let mut r = Redactor::new();
        r.add_secret("hunter22");
        let v = json!({"tokens": 5, "echo": ["Bearer hunter22"], "hunter22": true});
        assert_eq!(
            r.redact_values(&v),
            json!({"tokens": 5, "echo": ["Bearer [REDACTED]"], "[REDACTED]": true})
        );
        assert_eq!(Redactor::new().redact_values(&v), v);
    }

    #[test]
    fn debug_forms_name_no_value() {
        let mut r = Redactor::new();
        r.add_secret("hunter22");
        let s = StaticSecrets::new([("TOKEN", "hunter22")]);
        let text = format!("{r:?} {s:?}");
        assert!(!text.contains("hunter22"), "{text}");
        assert!(text.contains("TOKEN"), "{text}");
    }
}
