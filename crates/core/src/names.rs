//! Suggestions for mistyped names: the tool, task or agent a user most likely meant.

/// The closest of `candidates` to `name`, when close enough to be a likely typo: at most two
/// edits (transpositions count as one), or a third of the candidate's length for long names, and
/// fewer edits than the longer name has characters (something of it was typed right).
///
/// A candidate that differs from `name` in case alone is the closest of all, however short.
///
/// ```
/// use agent_runtime_core::names::closest;
/// assert_eq!(closest("ecoh", ["echo", "sleep"]), Some("echo"));
/// assert_eq!(closest("write", ["echo", "sleep"]), None);
/// assert_eq!(closest("A", ["a", "b"]), Some("a"));
/// ```
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let candidates: Vec<&'a str> = candidates.into_iter().collect();
    if let Some(same) = candidates
        .iter()
        .find(|c| c.to_lowercase() == name.to_lowercase())
    {
        return Some(same);
    }
    let name_chars = name.chars().count();
    candidates
        .into_iter()
        // Lengths that differ by more than the edits allowed can't match; skipping them keeps a
        // pasted megabyte from costing a megabyte-by-name table per candidate.
        .filter(|c| name_chars.abs_diff(c.chars().count()) <= 2.max(c.len() / 3))
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        // A distance as large as the longer name means every character differs: `zz` is no
        // typo of `a`, though only two edits apart.
        .filter(|(d, c)| {
            *d <= 2.max(c.len() / 3) && *d < name.chars().count().max(c.chars().count())
        })
        .min()
        .map(|(_, c)| c)
}

/// `` (did you mean `x`?)`` when a candidate is close to `name` (see [`closest`]), or nothing:
/// for the end of an error message.
///
/// ```
/// use agent_runtime_core::names::suggestion;
/// assert_eq!(suggestion("fetc", ["fetch"]), " (did you mean `fetch`?)");
/// assert_eq!(suggestion("zzz", ["fetch"]), "");
/// assert_eq!(suggestion("zz", ["a", "b"]), "");
/// assert_eq!(suggestion("aa", ["a", "b"]), " (did you mean `a`?)");
/// ```
pub fn suggestion<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    closest(name, candidates).map_or(String::new(), |c| format!(" (did you mean `{c}`?)"))
}

/// An argument as an error message quotes it: at most 80 characters, then `... (N characters)`,
/// so that a pasted megabyte makes a one-line error, not a megabyte of one.
///
/// ```
/// use agent_runtime_core::names::shown;
/// assert_eq!(shown("fetch"), "fetch");
/// assert_eq!(shown(&"x".repeat(100)), format!("{}... (100 characters)", "x".repeat(80)));
/// ```
pub fn shown(arg: &str) -> std::borrow::Cow<'_, str> {
    match arg.char_indices().nth(80) {
        None => arg.into(),
        Some((cut, _)) => format!("{}... ({} characters)", &arg[..cut], arg.chars().count()).into(),
    }
}

/// `text` with its middle cut out when it is longer than `max` characters: the first two thirds
/// of `max` and the last third, around `... (N characters) ...`. For error messages that quote
/// what they were given: the start says what is wrong, the end often what to do.
///
/// ```
/// use agent_runtime_core::names::cut_middle;
/// assert_eq!(cut_middle("short", 100), "short");
/// let long = format!("start {} end", "x".repeat(1000));
/// let cut = cut_middle(&long, 30);
/// assert!(cut.starts_with("start xxxx") && cut.ends_with("xxx end"), "{cut}");
/// assert!(cut.contains("... (1010 characters) ..."), "{cut}");
/// ```
pub fn cut_middle(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    let count = text.chars().count();
    if count <= max {
        return text.into();
    }
    let head = max * 2 / 3;
    let tail = max - head;
    let head_end = text.char_indices().nth(head).map_or(text.len(), |(i, _)| i);
    let tail_start = text
        .char_indices()
        .nth(count - tail)
        .map_or(text.len(), |(i, _)| i);
    format!(
        "{}... ({count} characters) ...{}",
        &text[..head_end],
        &text[tail_start..]
    )
    .into()
}
