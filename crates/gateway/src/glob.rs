//! A small glob matcher for tool names, agents, programs and hosts.
//!
//! `*` matches any run of characters (dots and slashes included), `?` one character; everything
//! else matches itself, case-sensitively. Matching is on Unicode scalar values, so a look-alike
//! (`ｒｍ`, Cyrillic `а`) never matches its ASCII twin.

/// Whether `text` matches `pattern`.
///
/// ```
/// use agent_runtime_gateway::glob::glob_match;
/// assert!(glob_match("fs.*", "fs.read"));
/// assert!(glob_match("*.example.com", "api.example.com"));
/// assert!(!glob_match("rm", "ｒｍ"));
/// ```
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Whether `text` matches any of `patterns`.
pub fn any_match(patterns: &[String], text: &str) -> bool {
    patterns.iter().any(|p| glob_match(p, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, t, want) in [
            ("*", "", true),
            ("*", "anything.at/all", true),
            ("fs.*", "fs.", true),
            ("fs.*", "fsx", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*b*b", "abxbb", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("*.example.com", "example.com", false),
            ("*.example.com", "evil.com.example.com", true),
            ("rm", "RM", false),
        ] {
            assert_eq!(glob_match(p, t), want, "{p} vs {t}");
        }
    }
}
