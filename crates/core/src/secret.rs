//! Secrets: where a run's secrets come from ([`SecretSource`]) and how they are kept out of
//! everything recorded or shown ([`Redactor`]).
//!
//! Redaction has two rules: the value of any object key that names a secret (`token`,
//! `password`, `api_key`, `authorization`, ...) is replaced, and any occurrence of a registered
//! secret value (the values of environment variables handed to tools, MCP server tokens, the
//! secrets a task graph names) is replaced wherever it appears in a string. It is applied to
//! event payloads, approval requests, tool results and error messages.
//!
//! A value is also looked for in the forms a tool is likely to hand it back in: hexadecimal,
//! base64 (standard and URL-safe, wherever it falls in the encoded text), percent-encoded and
//! JSON-escaped. See [`Redactor::add_secret`].

use serde_json::Value;

/// The text that stands in for a redacted secret.
pub const REDACTED: &str = "[REDACTED]";

/// Replaces secrets in JSON values and strings.
#[derive(Clone, Default)]
pub struct Redactor {
    /// What is replaced: each secret and its encoded forms, longest first.
    values: Vec<String>,
    /// The base64 forms among them, also looked for across line breaks: `base64` and MIME
    /// wrap their output every 76 characters, PEM every 64.
    wrapped: Vec<String>,
    /// Secrets registered (their forms not counted).
    secrets: usize,
}

impl std::fmt::Debug for Redactor {
    // By hand: the derived form would print every secret it hides.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("secrets", &self.secrets)
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

/// Whether an object key is the name of a credential, not merely a word that contains one:
/// `token`, `api_key`, `access-token`, `clientSecret`, `password`, but not `max_tokens`,
/// `tokenizer` or `secret_santa_budget`. The key is compared lower-cased, with `-` and a
/// case change read as `_`, against the names below, whole or as the last part after a `_`.
pub fn is_credential_key(key: &str) -> bool {
    const NAMES: &[&str] = &[
        "token",
        "secret",
        "password",
        "passwd",
        "passphrase",
        "apikey",
        "api_key",
        "authorization",
        "cookie",
        "credential",
        "credentials",
        "private_key",
        "privatekey",
    ];
    let mut folded = String::with_capacity(key.len() + 4);
    let mut prev_lower = false;
    for c in key.chars() {
        if c.is_ascii_uppercase() && prev_lower {
            folded.push('_');
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        folded.push(if c == '-' {
            '_'
        } else {
            c.to_ascii_lowercase()
        });
    }
    NAMES.iter().any(|n| {
        folded == *n
            || folded
                .strip_suffix(n)
                .is_some_and(|head| head.ends_with('_'))
    })
}

/// The most values a call's arguments register as its secrets (see [`keyed_secret_values`]):
/// each is looked for in every string the call records, so their number is bounded.
pub const MAX_KEYED_SECRETS: usize = 16;

/// The shortest value [`keyed_secret_values`] takes: a credential is longer; shorter strings
/// under such keys (`"none"`, `"true"`) would redact ordinary words.
pub const MIN_KEYED_SECRET_LEN: usize = 8;

/// The values `value` holds under credential keys (see [`is_credential_key`]): strings of at
/// least [`MIN_KEYED_SECRET_LEN`] bytes, at any depth below such a key, at most
/// [`MAX_KEYED_SECRETS`] of them. A call's redactor registers them, so that a value hidden
/// because of its key is hidden wherever else it shows up in the call (another argument, the
/// tool's output), as a configured secret is.
///
/// ```
/// use agent_runtime_core::secret::keyed_secret_values;
/// let args = serde_json::json!({
///     "token": "tk-12345678", "auth": {"password": ["pw-98765432"]},
///     "max_tokens": "40960000", "x": "tk-12345678",
/// });
/// assert_eq!(keyed_secret_values(&args), ["pw-98765432", "tk-12345678"]);
/// ```
pub fn keyed_secret_values(value: &Value) -> Vec<String> {
    fn leaves(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s)
                if s.len() >= MIN_KEYED_SECRET_LEN
                    && out.len() < MAX_KEYED_SECRETS
                    && !out.contains(s) =>
            {
                out.push(s.clone());
            }
            Value::Array(items) => items.iter().for_each(|x| leaves(x, out)),
            Value::Object(map) => map.values().for_each(|x| leaves(x, out)),
            _ => {}
        }
    }
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, x) in map {
                    if is_credential_key(k) {
                        leaves(x, out);
                    } else {
                        walk(x, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(value, &mut out);
    out
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
    ///
    /// Its encoded forms are replaced too: a tool may well return what it was given encoded (a
    /// header it echoes, a file it wrote). Base64 is matched wherever the value sits in the
    /// encoded text: only the characters that the value's bits alone decide are looked for, so
    /// the encoding of a longer text that contains the value is caught as well, and is left
    /// partly masked. A form is looked for only when it carries at least the 32 bits of the
    /// shortest value (8 hex digits, 6 base64 characters): a shorter one would turn up by
    /// chance in any long encoded blob.
    ///
    /// ```
    /// use agent_runtime_core::Redactor;
    /// let mut r = Redactor::new();
    /// r.add_secret("sk-live-42");
    /// // "Bearer sk-live-42" in base64; the characters the secret decides are replaced.
    /// assert_eq!(r.redact_str("QmVhcmVyIHNrLWxpdmUtNDI="), "QmVhcmVyIH[REDACTED]I=");
    /// assert_eq!(r.redact_str("736b2d6c6976652d3432"), "[REDACTED]");
    /// assert_eq!(r.redact_str("key=sk-live-42"), "key=[REDACTED]");
    /// ```
    pub fn add_secret(&mut self, value: impl Into<String>) {
        let v = value.into();
        if v.len() < Self::MIN_SECRET_LEN || self.values.contains(&v) {
            return;
        }
        self.secrets += 1;
        let base64 = base64_forms(v.as_bytes());
        let forms = encoded_forms(&v, &base64);
        for form in base64 {
            if !self.wrapped.contains(&form) {
                self.wrapped.push(form);
            }
        }
        self.values.push(v);
        for form in forms {
            if !self.values.contains(&form) {
                self.values.push(form);
            }
        }
        // Longest first, so a secret containing another is replaced whole.
        self.values.sort_by_key(|v| std::cmp::Reverse(v.len()));
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

    /// `text` with every registered secret value replaced, base64 forms also where a line
    /// break falls inside them (the line breaks inside such a form go with it).
    ///
    /// ```
    /// use agent_runtime_core::Redactor;
    /// let mut r = Redactor::new();
    /// r.add_secret("sk-proj-0123456789abcdef0123456789abcdef0123456789abcdef");
    /// // `base64` of a line holding it, wrapped at 76 characters as `base64` does.
    /// let wrapped = "dG9rZW49c2stcHJvai0wMTIzNDU2Nzg5YWJjZGVmMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlh\nYmNkZWYK\n";
    /// let shown = r.redact_str(wrapped);
    /// assert!(shown.starts_with("dG9rZW49[REDACTED]"), "{shown}");
    /// assert!(!shown.contains("c2stcHJvai0wMTIz"));
    /// ```
    pub fn redact_str(&self, text: &str) -> String {
        let mut out = text.to_string();
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), REDACTED);
            }
        }
        let shortest = self.wrapped.iter().map(String::len).min();
        if let Some(shortest) = shortest
            && breaks_base64(&out, shortest)
        {
            out = self.redact_wrapped(&out);
        }
        out
    }

    /// `text` with the base64 forms that a line break (`\n` or `\r\n`) splits replaced: they
    /// are looked for in the text with its line breaks left out, and each one found is replaced
    /// in the text, from its first character to its last.
    fn redact_wrapped(&self, text: &str) -> String {
        // The text without its line breaks (still UTF-8: only ASCII bytes are left out), and
        // for each byte left out, where it would have been in the joined text: a byte at `j`
        // of the joined text is at `j` plus the number of those at or before `j` in `text`.
        let mut joined = String::with_capacity(text.len());
        let mut breaks: Vec<usize> = Vec::new();
        for c in text.chars() {
            if c == '\n' || c == '\r' {
                breaks.push(joined.len());
            } else {
                joined.push(c);
            }
        }
        let at = |j: usize| j + breaks.partition_point(|&b| b <= j);
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for form in &self.wrapped {
            for (start, _) in joined.match_indices(form.as_str()) {
                let last = start + form.len() - 1;
                spans.push((at(start), at(last) + 1));
            }
        }
        if spans.is_empty() {
            return text.to_string();
        }
        spans.sort_unstable();
        let mut out = String::with_capacity(text.len());
        let mut done = 0;
        for (start, end) in spans {
            if end <= done {
                continue;
            }
            if start >= done {
                out.push_str(&text[done..start]);
                out.push_str(REDACTED);
            }
            done = end;
        }
        out.push_str(&text[done..]);
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

    /// `value` (an output cut short) with every string's end that is the start of a secret
    /// value, at least [`Redactor::MIN_SECRET_LEN`] bytes of it, replaced too: a secret cut in
    /// two where the output was cut is not one [`Redactor::redact_values`] recognizes, and its
    /// start would stay in the clear.
    ///
    /// ```
    /// use agent_runtime_core::Redactor;
    /// let mut r = Redactor::new();
    /// r.add_secret("SuperSecretToken-1234");
    /// let cut = serde_json::json!({"stdout": "padding...SuperSecretTo"});
    /// assert_eq!(r.redact_cut_ends(&cut)["stdout"], "padding...[REDACTED]");
    /// ```
    pub fn redact_cut_ends(&self, value: &Value) -> Value {
        let value = self.redact_values(value);
        self.cut_ends(&value)
    }

    fn cut_ends(&self, value: &Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), self.cut_ends(v)))
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(|v| self.cut_ends(v)).collect()),
            Value::String(text) => {
                // The longest start of any value that the text ends with.
                let cut = self
                    .values
                    .iter()
                    .filter_map(|v| {
                        (Self::MIN_SECRET_LEN..v.len())
                            .rev()
                            .filter(|&n| v.is_char_boundary(n))
                            .find(|&n| text.ends_with(&v[..n]))
                    })
                    .max();
                match cut {
                    Some(n) => {
                        let mut t = text[..text.len() - n].to_string();
                        t.push_str(REDACTED);
                        Value::String(t)
                    }
                    None => value.clone(),
                }
            }
            other => other.clone(),
        }
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

/// The forms other than itself in which a secret may come back from a tool: hexadecimal (both
/// cases), base64 in the standard and the URL-safe alphabet at each of the three places a value
/// can start within a 3-byte group, percent-encoding (RFC 3986, upper-case hex) and JSON string
/// escaping. Forms equal to the value are left out, and so are forms that carry fewer than 32
/// bits (see [`Redactor::add_secret`]); percent-encoding and JSON escaping keep every byte of
/// the value, so they carry as much as it does. `base64` is [`base64_forms`] of the value, made
/// once by the caller, which also looks for them across line breaks.
fn encoded_forms(value: &str, base64: &[String]) -> Vec<String> {
    let bytes = value.as_bytes();
    /// Characters that carry 32 bits or more: 4 bits each in hex.
    const MIN_HEX: usize = 8;
    let mut forms = Vec::new();
    if 2 * bytes.len() >= MIN_HEX {
        forms.extend([hex::encode(bytes), hex::encode_upper(bytes)]);
    }
    forms.extend_from_slice(base64);
    let mut percent = String::with_capacity(value.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            percent.push(char::from(b));
        } else {
            percent.push_str(&format!("%{b:02X}"));
        }
    }
    forms.push(percent);
    let quoted = serde_json::Value::String(value.to_string()).to_string();
    forms.push(quoted[1..quoted.len() - 1].to_string());
    forms.retain(|f| f != value);
    forms
}

/// Whether `text` holds a run of base64 characters at least `shortest` long (the shortest form
/// looked for) once its line breaks are left out, with a line break inside it: only then can a
/// form run across a break. Text with line breaks between words (logs, prose, JSON) is passed
/// by this one look, a few times faster than the search it saves.
fn breaks_base64(text: &str, shortest: usize) -> bool {
    let is_b64 = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_');
    let (mut run, mut crossed) = (0usize, false);
    for &b in text.as_bytes() {
        if b == b'\n' || b == b'\r' {
            crossed |= run > 0;
        } else if is_b64(b) {
            run += 1;
            if crossed && run >= shortest {
                return true;
            }
        } else {
            (run, crossed) = (0, false);
        }
    }
    false
}

/// The base64 forms of `bytes` (see [`encoded_forms`]): in the standard and the URL-safe
/// alphabet, at each of the three places a value can start within a 3-byte group, the
/// characters its bits alone decide, when they carry 32 bits or more (6 characters).
fn base64_forms(bytes: &[u8]) -> Vec<String> {
    use base64::Engine as _;
    const MIN_BASE64: usize = 6;
    let mut forms = Vec::new();
    for engine in [
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        for offset in 0..3usize {
            // The value after `offset` bytes of anything: a character of the encoding is the
            // value's alone when its 6 bits all fall within the value's bits.
            let mut shifted = vec![0u8; offset];
            shifted.extend_from_slice(bytes);
            let text = engine.encode(&shifted);
            let first = (8 * offset).div_ceil(6);
            let end = 8 * (offset + bytes.len()) / 6;
            if let Some(core) = text.get(first..end).filter(|c| c.len() >= MIN_BASE64) {
                let core = core.to_string();
                if !forms.contains(&core) {
                    forms.push(core);
                }
            }
        }
    }
    forms
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

    #[test]
    fn credential_keys_are_names_not_words_containing_them() {
        for key in [
            "token",
            "api_key",
            "apiKey",
            "API-KEY",
            "access_token",
            "accessToken",
            "client-secret",
            "clientSecret",
            "password",
            "db_password",
            "Authorization",
            "private_key",
            "credentials",
        ] {
            assert!(is_credential_key(key), "{key}");
        }
        for key in [
            "max_tokens",
            "tokens",
            "tokenizer",
            "n_tokens",
            "secret_santa",
            "passwordless",
            "cookies_enabled",
            "text",
            "path",
        ] {
            assert!(!is_credential_key(key), "{key}");
        }
    }

    #[test]
    fn keyed_values_are_few_and_long_enough() {
        let many: Vec<String> = (0..1000).map(|i| format!("value-{i:08}")).collect();
        let args = serde_json::json!({"tokens": many, "token": many, "password": "short", "secret": 12345678});
        let found = keyed_secret_values(&args);
        assert_eq!(found.len(), MAX_KEYED_SECRETS);
        assert!(found.iter().all(|v| v.len() >= MIN_KEYED_SECRET_LEN));
    }
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

    /// A secret handed back encoded is caught: hex in either case, base64 in either alphabet
    /// wherever it starts within the encoded text (any prefix, any suffix), percent-encoded and
    /// JSON-escaped.
    #[test]
    fn encoded_forms_of_a_secret_are_redacted() {
        use base64::Engine as _;
        use base64::engine::general_purpose::{STANDARD, URL_SAFE};
        // Bytes whose base64 holds `+` and `/` (or `-` and `_`), a quote, a backslash, a space.
        const SECRET: &str = "k>?~ \\\"x~?>>>?";
        let mut r = Redactor::new();
        r.add_secret(SECRET);
        for prefix in ["", "a", "ab", "abc", "Authorization: Bearer "] {
            for suffix in ["", "!", "!!", "!!!"] {
                let text = format!("{prefix}{SECRET}{suffix}");
                for encoded in [STANDARD.encode(&text), URL_SAFE.encode(&text)] {
                    let out = r.redact_str(&encoded);
                    assert!(out.contains(REDACTED), "{prefix:?} {suffix:?}: {out}");
                }
            }
        }
        let hex = hex::encode(SECRET);
        assert_eq!(r.redact_str(&format!("0x{hex}")), "0x[REDACTED]");
        assert_eq!(
            r.redact_str(&hex.to_uppercase()),
            REDACTED,
            "upper-case hex"
        );
        assert_eq!(
            r.redact_str("?t=k%3E%3F~%20%5C%22x~%3F%3E%3E%3E%3F&x=1"),
            "?t=[REDACTED]&x=1"
        );
        let json = serde_json::to_string(&json!({"token": SECRET})).unwrap();
        assert_eq!(r.redact_str(&json), r#"{"token":"[REDACTED]"}"#);
        assert!(!format!("{r:?}").contains("x~"));
    }

    /// Encoded forms that carry fewer than 32 bits are left alone: the 4 or 5 base64
    /// characters that a 4-byte value alone decides would turn up by chance in a long blob.
    /// From 5 bytes, base64 is caught at every offset. Percent and JSON forms keep the value's
    /// bytes and count as it does, from 4 bytes.
    #[test]
    fn short_forms_are_not_looked_for() {
        use base64::Engine as _;
        let mut r = Redactor::new();
        r.add_secret("abcd");
        assert_eq!(r.redact_str("YWJjZA"), "YWJjZA", "base64 of a 4-byte value");
        assert_eq!(r.redact_str("61626364"), REDACTED, "hex is 8 characters");
        assert_eq!(r.redact_str("xabcdx"), "x[REDACTED]x");
        assert_eq!(format!("{r:?}"), "Redactor { secrets: 1 }");
        let mut r = Redactor::new();
        r.add_secret("a b\\");
        assert_eq!(r.redact_str("q=a%20b%5C&"), "q=[REDACTED]&");
        assert_eq!(r.redact_str(r#"{"k":"a b\\"}"#), r#"{"k":"[REDACTED]"}"#);
        let mut r = Redactor::new();
        r.add_secret("k3y!5");
        for prefix in ["", "a", "ab"] {
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(format!("{prefix}k3y!5"));
            assert!(
                r.redact_str(&encoded).contains(REDACTED),
                "{prefix:?}: {encoded}"
            );
        }
    }

    /// Base64 that wraps its lines (`base64`, MIME at 76 characters, PEM at 64, with `\n` or
    /// `\r\n`) is caught wherever the break falls in the secret's form; text around it, and
    /// lines without a secret, are left as they are.
    #[test]
    fn base64_split_by_line_breaks_is_redacted() {
        use base64::Engine as _;
        let secret = "ghp_Zx81uQmT0aVdNc7RkPw2sLeYb9HfJg4KiO3n";
        let r = Redactor::new().with_secrets(&[secret.to_string()]);
        for prefix in ["", "a", "ab", "Authorization: token "] {
            let encoded = base64::engine::general_purpose::STANDARD
                .encode(format!("{prefix}{secret} and more text after it to wrap"));
            for width in [8, 64, 76] {
                for newline in ["\n", "\r\n"] {
                    let wrapped: Vec<&str> = encoded
                        .as_bytes()
                        .chunks(width)
                        .map(|c| std::str::from_utf8(c).unwrap())
                        .collect();
                    let text = format!("head\n{}{newline}tail", wrapped.join(newline));
                    let shown = r.redact_str(&text);
                    assert!(shown.contains(REDACTED), "{prefix:?} {width}: {shown}");
                    let left: String = shown
                        .replace(REDACTED, "\u{0}")
                        .chars()
                        .filter(|c| *c != '\n' && *c != '\r')
                        .collect();
                    // No 8 characters of the secret's form stay in the clear.
                    for form in base64_forms(secret.as_bytes()) {
                        for piece in form.as_bytes().windows(8) {
                            let piece = std::str::from_utf8(piece).unwrap();
                            assert!(!left.contains(piece), "{prefix:?} {width}: {shown}");
                        }
                    }
                    assert!(
                        shown.starts_with("head\n") && shown.ends_with("tail"),
                        "{shown}"
                    );
                }
            }
        }
        let plain = "line one\nline two\n";
        assert_eq!(r.redact_str(plain), plain);
        // Runs of base64 that a break joins count whole (a form spans many short lines);
        // words around breaks do not.
        assert!(breaks_base64("abcd\nefgh\r\nijkl", 12));
        assert!(!breaks_base64("abcd\nefgh\r\nijkl", 13));
        assert!(!breaks_base64("abcdefghijklmnop\n", 6));
        assert!(!breaks_base64("compiling ok\nline two", 7));
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
