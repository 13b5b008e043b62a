//! Redaction of secrets before anything is recorded or shown: the [`Redactor`] lives in
//! `agent_runtime_core::secret` (the workforce redacts too); this module adds the gateway's
//! `${NAME}` expansion of configured values, whose values become secrets.

pub use agent_runtime_core::secret::{REDACTED, Redactor, is_secret_key};

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
}
