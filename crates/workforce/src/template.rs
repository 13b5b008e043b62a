//! Templates: task inputs that refer to upstream outputs.
//!
//! A template is `{{ tasks.ID.output }}` or `{{ tasks.ID.output.FIELD.FIELD... }}` (array items
//! by number: `.items.0`). When a string is exactly one template, it is replaced by the JSON value
//! itself (an object stays an object); inside longer text, the value is written in: strings as
//! they are, anything else as compact JSON. A missing field renders as `null`.
//!
//! Only `{{ tasks. ... }}` is a template (and `{{ task. ... }}`, refused as a typo of it): any
//! other `{{ ... }}` is text, kept as it is, so that tool arguments and prompts can carry other
//! template languages (GitHub Actions' `${{ secrets.TOKEN }}`, Jinja, Handlebars).
//!
//! `{{ secrets.NAME }}` in a tool step's arguments is not rendered either: events record it as
//! written, and the call alone gets the value (see [`fill_secrets`]). Preceded by `$` it is
//! GitHub Actions' syntax, and text.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::graph::TaskSpec;

/// One `{{ ... }}` found in a string: byte range and parsed reference.
struct Found<'a> {
    start: usize,
    end: usize,
    task: &'a str,
    path: Vec<&'a str>,
}

/// The byte offset of the first `cc` (`{{` or `}}`) in `s` at or after `from`. A byte loop:
/// `str::find` sets up a two-way searcher per call, which costs more than the short prompts
/// and arguments it searches.
fn find_pair(s: &str, from: usize, c: u8) -> Option<usize> {
    let b = s.as_bytes();
    (from..b.len().saturating_sub(1)).find(|&i| b[i] == c && b[i + 1] == c)
}

/// Whether the text inside `{{ }}` (or after an unclosed `{{`) is meant as one of ours: its
/// first dotted part is `tasks` (or `task`, a typo the parse below then reports).
fn is_ours(inner: &str) -> bool {
    let head = inner.trim_start().split('.').next().unwrap_or("").trim();
    head == "tasks" || head == "task"
}

fn scan(s: &str) -> Result<Vec<Found<'_>>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(start) = find_pair(s, pos, b'{') {
        let Some(close) = find_pair(s, start + 2, b'}') else {
            if is_ours(&s[start + 2..]) {
                return Err(format!("unclosed template at byte {start}: missing `}}}}`"));
            }
            break;
        };
        let end = close + 2;
        let inner = s[start + 2..end - 2].trim();
        if !is_ours(inner) {
            // Someone else's template, or text: kept. The next `{{` may start inside it
            // (`{{{ tasks.a.output }}}` is a template in braces).
            pos = start + 1;
            continue;
        }
        let mut parts = inner.split('.');
        let (Some("tasks"), Some(task), Some("output")) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "template `{{{{ {inner} }}}}` must look like {{{{ tasks.ID.output }}}} or {{{{ tasks.ID.output.FIELD }}}}"
            ));
        };
        let path: Vec<&str> = parts.collect();
        if task.is_empty() || path.iter().any(|p| p.is_empty()) {
            return Err(format!("template `{{{{ {inner} }}}}` has an empty part"));
        }
        out.push(Found {
            start,
            end,
            task,
            path,
        });
        pos = end;
    }
    Ok(out)
}

/// Adds the task ids referenced in `s` to `out` (ignores malformed templates; [`check`] reports
/// them).
pub fn collect_refs_str(s: &str, out: &mut BTreeSet<String>) {
    for_each_ref_str(s, &mut |r| {
        out.insert(r.to_string());
    });
}

/// Adds the task ids referenced anywhere in `v` to `out`.
pub fn collect_refs(v: &Value, out: &mut BTreeSet<String>) {
    for_each_ref(v, &mut |r| {
        out.insert(r.to_string());
    });
}

/// Calls `f` with each task id referenced in `s`, in order, repeats included (ignores malformed
/// templates, as [`collect_refs_str`] does).
pub fn for_each_ref_str(s: &str, f: &mut dyn FnMut(&str)) {
    if let Ok(found) = scan(s) {
        found.iter().for_each(|x| f(x.task));
    }
}

/// Calls `f` with each task id referenced anywhere in `v` (see [`for_each_ref_str`]).
pub fn for_each_ref(v: &Value, f: &mut dyn FnMut(&str)) {
    match v {
        Value::String(s) => for_each_ref_str(s, f),
        Value::Array(a) => a.iter().for_each(|x| for_each_ref(x, f)),
        Value::Object(m) => m.values().for_each(|x| for_each_ref(x, f)),
        _ => {}
    }
}

/// Each `{{ secrets.NAME }}` in `s`: its byte range and `NAME` as written (checked by
/// [`check`]). `${{ secrets.NAME }}` is GitHub Actions' and not one.
fn secret_refs(s: &str) -> Vec<(usize, usize, &str)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(start) = find_pair(s, pos, b'{') {
        let Some(close) = find_pair(s, start + 2, b'}') else {
            break;
        };
        let inner = s[start + 2..close].trim();
        match inner.strip_prefix("secrets.") {
            Some(name) if start == 0 || s.as_bytes()[start - 1] != b'$' => {
                out.push((start, close + 2, name.trim()));
                pos = close + 2;
            }
            _ => pos = start + 1,
        }
    }
    out
}

/// Calls `f` with the name of each `{{ secrets.NAME }}` anywhere in `v`, in order, repeats
/// included.
pub fn for_each_secret(v: &Value, f: &mut dyn FnMut(&str)) {
    match v {
        Value::String(s) => secret_refs(s).iter().for_each(|(_, _, name)| f(name)),
        Value::Array(a) => a.iter().for_each(|x| for_each_secret(x, f)),
        Value::Object(m) => m.values().for_each(|x| for_each_secret(x, f)),
        _ => {}
    }
}

/// Whether `s` names a secret (`{{ secrets.NAME }}`).
fn names_secret_str(s: &str) -> bool {
    !secret_refs(s).is_empty()
}

/// Refuses a secret named in text that reaches the model and the log (`what`: a prompt, an
/// agent's instructions), where no call could get its value.
pub fn refuse_secrets(text: &str, what: &str) -> Result<(), String> {
    if names_secret_str(text) {
        return Err(format!(
            "`{{{{ secrets.NAME }}}}` goes only into a tool step's arguments ({what} is sent to \
             the model and recorded)"
        ));
    }
    Ok(())
}

/// Whether any string in `v` names a secret.
pub fn names_secrets(v: &Value) -> bool {
    match v {
        Value::String(s) => names_secret_str(s),
        Value::Array(a) => a.iter().any(names_secrets),
        Value::Object(m) => m.values().any(names_secrets),
        _ => false,
    }
}

/// Checks every template of a task is well formed, and that secrets are named only where a
/// call, and nothing recorded, gets their values.
pub fn check(task: &TaskSpec) -> Result<(), String> {
    let in_arg = |s: &str, at: &str| -> Result<(), String> {
        let templates = scan(s)?;
        for (_, _, name) in secret_refs(s) {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!(
                    "secret name `{name}` at args{at} must be letters, digits and `_`"
                ));
            }
            if !templates.is_empty() {
                // The upstream output would be rendered into the recorded string, and could
                // bring a `{{ secrets.NAME }}` of its own.
                return Err(format!(
                    "args{at} names a secret and takes an upstream output; a string may do one or the other"
                ));
            }
        }
        Ok(())
    };
    if let Some(p) = &task.prompt {
        scan(p)?;
        refuse_secrets(p, "a prompt")?;
    }
    if let Some(a) = &task.args {
        each_string(a, &mut String::new(), &mut |s, at| in_arg(s, at))?;
    }
    Ok(())
}

/// The authoring checks of a new graph's templates, beyond [`check`]: each part of a
/// template's path is a name or an index, without spaces (`{{ tasks. a .output }}`,
/// `{{ tasks.a.output.arr. 1 }}`) or filters (`{{ tasks.a.output.x | upper }}`), which would
/// otherwise look up a field of that name and render `null`. Errors with the field
/// (`prompt`, `args.path.to[0]`) and the message. Recorded graphs are not held to this: their
/// templates render as they did.
pub fn check_paths(task: &TaskSpec) -> Result<(), (String, String)> {
    fn in_str(s: &str) -> Result<(), String> {
        for found in scan(s).unwrap_or_default() {
            let inner = s[found.start + 2..found.end - 2].trim();
            let parts = std::iter::once(found.task).chain(found.path.iter().copied());
            for part in parts {
                if part.contains('|') {
                    return Err(format!(
                        "template `{{{{ {inner} }}}}` has a filter (`|`): templates take a path only, such as {{{{ tasks.ID.output.FIELD }}}}"
                    ));
                }
                if part.contains(char::is_whitespace) {
                    return Err(format!(
                        "template `{{{{ {inner} }}}}` has a space inside its path (`{part}`)"
                    ));
                }
            }
        }
        Ok(())
    }
    if let Some(p) = &task.prompt {
        in_str(p).map_err(|e| ("prompt".to_string(), e))?;
    }
    if let Some(a) = &task.args {
        each_string(a, &mut String::new(), &mut |s, at| {
            in_str(s).map_err(|e| (format!("args{at}"), e))
        })?;
    }
    Ok(())
}

/// Calls `f` with each string in `v` and where it is (`.key[0]`, appended to `at`), stopping
/// at the first error.
fn each_string<E>(
    v: &Value,
    at: &mut String,
    f: &mut dyn FnMut(&str, &str) -> Result<(), E>,
) -> Result<(), E> {
    match v {
        Value::String(s) => f(s, at),
        Value::Array(a) => a.iter().enumerate().try_for_each(|(i, x)| {
            let len = at.len();
            at.push_str(&format!("[{i}]"));
            let r = each_string(x, at, f);
            at.truncate(len);
            r
        }),
        Value::Object(m) => m.iter().try_for_each(|(k, x)| {
            let len = at.len();
            at.push('.');
            at.push_str(k);
            let r = each_string(x, at, f);
            at.truncate(len);
            r
        }),
        _ => Ok(()),
    }
}

/// The value of secret `name` from `secrets`, if it may go into a call. Errors (naming the
/// secret, never its value) when it is not set, or too short to redact: a value the redactor
/// would not replace could come back in the call's result and be recorded, so it is refused
/// rather than leaked.
pub fn usable_secret(
    secrets: &dyn agent_runtime_core::SecretSource,
    name: &str,
) -> Result<String, String> {
    let value = secrets
        .secret(name)
        .ok_or_else(|| format!("secret `{name}` is not set"))?;
    if value.len() < agent_runtime_core::Redactor::MIN_SECRET_LEN {
        return Err(format!(
            "secret `{name}` is shorter than {} bytes, too short to keep out of the log",
            agent_runtime_core::Redactor::MIN_SECRET_LEN
        ));
    }
    Ok(value)
}

/// Fills in the secrets of a tool step's call: each `{{ secrets.NAME }}` of `rendered` (the
/// arguments as recorded) at a place where the graph's own arguments `declared` wrote it, with
/// the value from `secrets`; each value used is added to `used`, for redacting the call's
/// result. Only strings the graph wrote are filled ([`check`] keeps upstream outputs out of
/// them): a `{{ secrets.NAME }}` that arrived in an upstream output, which a model may have
/// written, stays text.
///
/// Errors: the name of a secret that is not set, or whose value is too short to redact.
pub fn fill_secrets(
    declared: &Value,
    rendered: &mut Value,
    secrets: &dyn agent_runtime_core::SecretSource,
    used: &mut Vec<String>,
) -> Result<(), String> {
    match (declared, rendered) {
        (Value::String(d), Value::String(r)) if d == r => {
            let refs = secret_refs(d);
            if refs.is_empty() {
                return Ok(());
            }
            let mut out = String::with_capacity(d.len());
            let mut pos = 0;
            for (start, end, name) in refs {
                let value = usable_secret(secrets, name)?;
                out.push_str(&d[pos..start]);
                out.push_str(&value);
                used.push(value);
                pos = end;
            }
            out.push_str(&d[pos..]);
            *r = out;
            Ok(())
        }
        (Value::Object(dm), Value::Object(rm)) => {
            dm.iter().try_for_each(|(k, dv)| match rm.get_mut(k) {
                Some(rv) => fill_secrets(dv, rv, secrets, used),
                None => Ok(()),
            })
        }
        (Value::Array(da), Value::Array(ra)) => da
            .iter()
            .zip(ra.iter_mut())
            .try_for_each(|(dv, rv)| fill_secrets(dv, rv, secrets, used)),
        _ => Ok(()),
    }
}

/// Where templates find upstream outputs.
pub trait Outputs {
    /// The output of the task `id`, if it has one: borrowed when it is kept as a value, made
    /// when it is kept in another form.
    fn output(&self, id: &str) -> Option<Cow<'_, Value>>;
}

/// Outputs by task id.
impl Outputs for BTreeMap<String, Value> {
    fn output(&self, id: &str) -> Option<Cow<'_, Value>> {
        self.get(id).map(Cow::Borrowed)
    }
}

/// The first object key in `v` that holds a template (`{{ tasks.a.output }}` or
/// `{{ secrets.NAME }}`), and where: keys are taken as written, so such a key would stay text
/// and make no dependency.
pub fn template_in_key(v: &Value) -> Option<String> {
    fn walk(v: &Value, at: &mut String) -> Option<String> {
        match v {
            Value::Array(a) => a.iter().enumerate().find_map(|(i, x)| {
                let len = at.len();
                at.push_str(&format!("[{i}]"));
                let found = walk(x, at);
                at.truncate(len);
                found
            }),
            Value::Object(m) => m.iter().find_map(|(k, x)| {
                // `{{ secrets.NAME }}` too: a key is never filled in, and would record the
                // template as it is where the secret was meant.
                if scan(k).is_ok_and(|found| !found.is_empty()) || names_secret_str(k) {
                    return Some(format!(
                        "the key `{}` at args{at} holds a template; templates are read in values only",
                        agent_runtime_core::names::shown(k)
                    ));
                }
                let len = at.len();
                at.push('.');
                at.push_str(k);
                let found = walk(x, at);
                at.truncate(len);
                found
            }),
            _ => None,
        }
    }
    walk(v, &mut String::new())
}

/// Calls `f` with the value at `path` in the output of `task`, if there is one.
fn lookup<R>(
    outputs: &(impl Outputs + ?Sized),
    task: &str,
    path: &[&str],
    f: impl FnOnce(Option<&Value>) -> R,
) -> R {
    let output = outputs.output(task);
    let mut v = output.as_deref();
    for p in path {
        v = match v {
            Some(Value::Object(m)) => m.get(*p),
            // `usize::from_str` also takes `+1` and `01`; kept so, since the rendered
            // arguments are recorded and replaying older runs must render them the same.
            Some(Value::Array(a)) => p.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        };
    }
    f(v)
}

/// Renders the templates of a string against upstream outputs (task id to output).
pub fn render_str(s: &str, outputs: &(impl Outputs + ?Sized)) -> Value {
    let Ok(found) = scan(s) else {
        return Value::String(s.to_string());
    };
    if found.is_empty() {
        return Value::String(s.to_string());
    }
    if found.len() == 1 && found[0].start == 0 && found[0].end == s.len() {
        return lookup(outputs, found[0].task, &found[0].path, |v| {
            v.cloned().unwrap_or(Value::Null)
        });
    }
    let mut out = String::with_capacity(s.len());
    let mut pos = 0;
    for f in &found {
        out.push_str(&s[pos..f.start]);
        lookup(outputs, f.task, &f.path, |v| match v {
            Some(Value::String(t)) => out.push_str(t),
            Some(v) => out.push_str(&v.to_string()),
            None => out.push_str("null"),
        });
        pos = f.end;
    }
    out.push_str(&s[pos..]);
    Value::String(out)
}

/// Renders every string in `v`.
pub fn render(v: &Value, outputs: &(impl Outputs + ?Sized)) -> Value {
    match v {
        Value::String(s) => render_str(s, outputs),
        Value::Array(a) => Value::Array(a.iter().map(|x| render(x, outputs)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (k.clone(), render(x, outputs)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Renders to text (for prompts): a string as it is, anything else as JSON.
pub fn render_text(s: &str, outputs: &(impl Outputs + ?Sized)) -> String {
    match render_str(s, outputs) {
        Value::String(t) => t,
        // `Display`'s text, written without the formatting machinery.
        other => serde_json::to_string(&other).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whole_templates_keep_their_type_and_embedded_ones_interpolate() {
        let mut o = BTreeMap::new();
        o.insert("a".to_string(), json!({"text": "hi", "n": [1, 2]}));
        assert_eq!(render(&json!("{{ tasks.a.output.n }}"), &o), json!([1, 2]));
        assert_eq!(
            render(
                &json!("x {{tasks.a.output.text}} {{ tasks.a.output.n.1 }}"),
                &o
            ),
            json!("x hi 2")
        );
        assert_eq!(
            render(&json!({"k": ["{{ tasks.a.output.missing }}"]}), &o),
            json!({"k": [null]})
        );
        // An index is what `usize` reads (`+1` and `01` too: recorded runs render so).
        assert_eq!(render(&json!("{{ tasks.a.output.n.0 }}"), &o), json!(1));
        assert_eq!(render(&json!("{{ tasks.a.output.n.+1 }}"), &o), json!(2));
        assert_eq!(render(&json!("{{ tasks.a.output.n.-0 }}"), &o), Value::Null);
    }

    #[test]
    fn a_template_in_a_key_is_named() {
        assert_eq!(template_in_key(&json!({"k": "{{ tasks.a.output }}"})), None);
        let e = template_in_key(&json!({"x": [{"{{ tasks.a.output.k }}": 1}]})).unwrap();
        assert!(
            e.contains("the key `{{ tasks.a.output.k }}` at args.x[0] holds a template"),
            "{e}"
        );
        // Braces that are no template of ours are a key like any other.
        assert_eq!(template_in_key(&json!({"${{ env.X }}": 1, "{x}": 2})), None);
        // A secret in a key would never be filled in.
        let e = template_in_key(&json!({"{{ secrets.ABC }}": 1})).unwrap();
        assert!(
            e.contains("the key `{{ secrets.ABC }}` at args holds a template"),
            "{e}"
        );
    }

    #[test]
    fn malformed_templates_are_reported() {
        assert!(scan("{{ tasks.a }}").is_err());
        assert!(scan("{{ tasks.a.output").is_err());
        assert!(scan("x {{ tasks .a.output }}").is_err());
        let Err(typo) = scan("{{ task.a.output }}") else {
            panic!("a typo of `tasks` was taken")
        };
        assert!(
            typo.contains("must look like {{ tasks.ID.output }}"),
            "{typo}"
        );
        assert!(scan("{{ tasks..output }}").is_err());
        assert!(scan("plain").unwrap().is_empty());
        assert!(scan("{").unwrap().is_empty());
        assert!(scan("{x}}").unwrap().is_empty());
        let found = scan("é{{ tasks.a.output }}}").unwrap();
        assert_eq!((found[0].start, found[0].end, found[0].task), (2, 22, "a"));
        // A template in braces: the braces stay.
        let found = scan("{{{ tasks.a.output }}}").unwrap();
        assert_eq!((found[0].start, found[0].end, found[0].task), (1, 21, "a"));
    }

    /// Other template languages pass through untouched, next to ours.
    #[test]
    fn other_templates_are_text() {
        for text in [
            "token: ${{ secrets.TOKEN }}",
            "{{ name }} and {{ inputs.x }}",
            "{% if x %}{{ x | upper }}{% endif %}",
            "unclosed {{ name",
            "é{{",
        ] {
            assert!(scan(text).unwrap().is_empty(), "{text}");
        }
        let mut o = BTreeMap::new();
        o.insert("a".to_string(), json!({"text": "hi"}));
        assert_eq!(
            render(
                &json!("run: ${{ github.sha }} after {{ tasks.a.output.text }}, then {{ name }}"),
                &o
            ),
            json!("run: ${{ github.sha }} after hi, then {{ name }}")
        );
        assert_eq!(
            render(&json!("{{{ tasks.a.output.text }}}"), &o),
            json!("{hi}")
        );
    }
}
