//! Redaction of secrets before anything is recorded or shown.
//!
//! Two rules: the value of any object key that names a secret (`token`, `password`, `api_key`,
//! `authorization`, ...) is replaced, and any occurrence of a registered secret value (the values
//! of environment variables handed to tools, MCP server tokens) is replaced wherever it appears in
//! a string. Redaction is applied to event payloads, approval requests and error messages.

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

    /// Registers a secret value; values shorter than 4 bytes are ignored (they would redact
    /// ordinary text).
    pub fn add_secret(&mut self, value: impl Into<String>) {
        let v = value.into();
        if v.len() >= 4 && !self.values.contains(&v) {
            self.values.push(v);
            // Longest first, so a secret containing another is replaced whole.
            self.values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        }
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

    /// `value` with secret keys and secret values replaced.
    pub fn redact(&self, value: &Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| {
                        let v = if is_secret_key(k) && !v.is_null() {
                            Value::String(REDACTED.to_string())
                        } else {
                            self.redact(v)
                        };
                        (self.redact_str(k), v)
                    })
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(|v| self.redact(v)).collect()),
            Value::String(s) if !self.values.is_empty() => Value::String(self.redact_str(s)),
            other => other.clone(),
        }
    }
}

/// The `${NAME}` references in a configured value, in order: where each starts and ends (byte
/// offsets, the braces included) and the name. An unclosed `${` ends the scan; the rest is
/// literal.
fn env_refs(value: &str) -> impl Iterator<Item = (usize, usize, &str)> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let start = at + value.get(at..)?.find("${")?;
        let len = value[start..].find('}')?;
        at = start + len + 1;
        Some((start, at, &value[start + 2..start + len]))
    })
}

/// A configured value (an environment entry of a command tool or MCP server, an MCP header)
/// with every `${NAME}` replaced by the host's variable `NAME`, each value registered with
/// `redactor` as a secret. Fails with the name of the first variable that is not set.
pub(crate) fn expand_env(value: &str, redactor: &mut Redactor) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut copied = 0;
    for (start, end, name) in env_refs(value) {
        let host = std::env::var(name).map_err(|_| name.to_string())?;
        out.push_str(&value[copied..start]);
        out.push_str(&host);
        redactor.add_secret(host);
        copied = end;
    }
    out.push_str(&value[copied..]);
    Ok(out)
}

/// The host's values of the variables a configured value names as `${NAME}` (unset ones
/// skipped): the secrets a value will carry, for a redactor built before the value is used.
pub(crate) fn referenced_env_values(value: &str) -> Vec<String> {
    env_refs(value)
        .filter_map(|(_, _, name)| std::env::var(name).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// One reading of `${NAME}` for every configured value: whole, embedded, several, unclosed;
    /// unset variables are named; values become secrets. (`PATH` stands in for a token: setting
    /// a variable here would race the other tests' threads.)
    #[test]
    fn env_references_expand_to_secrets() {
        let path = std::env::var("PATH").expect("PATH is set");
        let mut r = Redactor::new();
        assert_eq!(expand_env("${PATH}", &mut r).unwrap(), path);
        assert_eq!(
            expand_env("Bearer ${PATH}; again ${PATH}.", &mut r).unwrap(),
            format!("Bearer {path}; again {path}.")
        );
        assert_eq!(
            expand_env("plain $ {x} ${open", &mut r).unwrap(),
            "plain $ {x} ${open"
        );
        assert_eq!(
            expand_env("a ${AR_REDACT_TEST_UNSET_VAR} b", &mut r),
            Err("AR_REDACT_TEST_UNSET_VAR".to_string())
        );
        assert_eq!(r.redact_str(&format!("sent {path}")), "sent [REDACTED]");
        assert_eq!(
            referenced_env_values("x${PATH}${AR_REDACT_TEST_UNSET_VAR}"),
            [path]
        );
    }

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
}
