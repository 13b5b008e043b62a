//! A check to run on YAML text before a YAML parser sees it.
//!
//! The YAML parser the crates use (`serde_yaml_ng`, over libyaml) takes time quadratic in the
//! depth of nested flow collections (`[[[...]]]`): 200,000 levels, 400 KB of text, kept
//! `agent-runtime run` busy for over a minute, and 40,000 levels took 3 s. Its deserializer
//! refuses structures deeper than 128 levels, but only after the whole text is parsed. Every
//! YAML file the runtime reads (task graphs, gateway configuration, policies, MCP server lists)
//! goes through [`flow_nesting_past`] first.

/// The deepest nesting of `[` and `{` the runtime's YAML readers accept. Brackets inside
/// strings count too: telling them apart would need a YAML scanner, and a scanner that an
/// apostrophe in a plain scalar could fool would let a deep nest through. The bound leaves room
/// above the 128 levels of structure the deserializer allows.
pub const MAX_YAML_FLOW_DEPTH: usize = 256;

/// Where the first `[` or `{` deeper than `max` levels is, as a 1-based (line, column in
/// characters), or `None` when the text nests no deeper. One pass over the bytes.
///
/// ```
/// use agent_runtime_core::yaml::flow_nesting_past;
///
/// assert_eq!(flow_nesting_past("a: [[1]]\nb: [[[2]]]\n", 2), Some((2, 6)));
/// assert_eq!(flow_nesting_past("a: [[1]]\nb: '[[['\n", 3), None);
/// ```
pub fn flow_nesting_past(text: &str, max: usize) -> Option<(usize, usize)> {
    let mut depth = 0usize;
    let (mut line, mut line_start) = (1usize, 0usize);
    for (i, b) in text.bytes().enumerate() {
        match b {
            b'\n' => {
                line += 1;
                line_start = i + 1;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    // `i` and `line_start` sit at ASCII bytes: both are char boundaries.
                    return Some((line, text[line_start..i].chars().count() + 1));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// What is wrong with text that [`flow_nesting_past`] refused, for a caller that reports the
/// place itself.
pub fn too_deep() -> String {
    format!("brackets nested more than {MAX_YAML_FLOW_DEPTH} levels deep")
}

/// The message for text that [`flow_nesting_past`] refused at (`line`, `column`).
pub fn too_deep_message(line: usize, column: usize) -> String {
    format!("line {line} column {column}: {}", too_deep())
}

/// The key a "duplicate field `K`" (serde) or "duplicate key `K`" (the document check)
/// message names.
pub fn duplicated_key(message: &str) -> Option<&str> {
    ["duplicate field `", "duplicate key `"]
        .iter()
        .find_map(|start| message.split_once(start))
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(key, _)| key)
        .filter(|key| !key.is_empty())
}

/// The line and column of the second `key:` at or after `line`:`column` (1-based): in the
/// mapping that starts there, the key written again.
pub fn second_key_at(text: &str, key: &str, line: usize, column: usize) -> Option<(usize, usize)> {
    key_positions(text, key, line, column).nth(1)
}

/// Each place (line, column; 1-based) where `key:` is written as a key at or after
/// `line`:`column`: the key itself, not the end of a longer one (`my_timeout:`). None for a
/// position the parser did not give (line 0).
pub fn key_positions<'a>(
    text: &'a str,
    key: &str,
    line: usize,
    column: usize,
) -> impl Iterator<Item = (usize, usize)> + 'a {
    let pattern = format!("{key}:");
    text.lines()
        .enumerate()
        .skip(line.max(1) - 1)
        .take(if line == 0 { 0 } else { usize::MAX })
        .flat_map(move |(n, l)| {
            let from = if n + 1 == line {
                column.saturating_sub(1)
            } else {
                0
            };
            l.match_indices(pattern.as_str())
                .filter(move |(i, _)| {
                    *i >= from
                        && !i
                            .checked_sub(1)
                            .map(|b| l.as_bytes()[b])
                            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
                })
                .map(move |(i, _)| (n + 1, i + 1))
                .collect::<Vec<_>>()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_across_lines_and_recovers_after_closing() {
        assert_eq!(flow_nesting_past("", 0), None);
        assert_eq!(flow_nesting_past("[", 0), Some((1, 1)));
        assert_eq!(flow_nesting_past("[]{}[]", 1), None);
        // Closers beyond the openers do not bank depth for later.
        assert_eq!(flow_nesting_past("]]]]\n[[", 1), Some((2, 2)));
        assert_eq!(flow_nesting_past("{a: [\n  [\n    [x]]]}", 3), Some((3, 5)));
        // Columns count characters, not bytes.
        assert_eq!(flow_nesting_past("é: [[", 1), Some((1, 5)));
    }
}
