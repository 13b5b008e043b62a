//! Where each key and list item of a graph's text starts, by its field path (`tasks[1].needs`),
//! read from a YAML parser's events: what places an error found after the graph was read (an
//! unknown task, a duplicate id, a cycle) at its line and column.
//!
//! A path finds its own place, not the first text that looks like it: minified JSON, ids
//! written with any spacing or quoting, two tasks declaring the same field, and characters
//! wider than a byte before it all come out right. YAML 1.2 reads JSON too, so one parser
//! serves both formats. Only on the error path: a valid graph never pays for this.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, Span};

/// Line and column (both from 1, the column in characters) of each key and list item.
#[derive(Debug, Default)]
pub(crate) struct Positions {
    /// By field path: a key's path (`agents.w.tools`), a list item's (`tasks[1]`).
    at: HashMap<String, (usize, usize)>,
    /// Scalar list items by their list's path and their text (`tasks[1].needs`, `fetc`).
    items: HashMap<(String, String), (usize, usize)>,
}

/// What the walk is inside of.
enum Frame {
    Map {
        path: String,
        /// The key whose value comes next; `None` while a key is expected.
        key: Option<String>,
    },
    Seq {
        path: String,
        index: usize,
    },
}

fn place(span: &Span) -> (usize, usize) {
    (span.start.line(), span.start.col() + 1)
}

fn child(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl Positions {
    /// The positions in `text` (YAML or JSON), from its first document; as far as it parses.
    pub(crate) fn of(text: &str) -> Positions {
        let mut out = Positions::default();
        let mut stack: Vec<Frame> = Vec::new();
        let mut documents = 0;
        for next in Parser::new_from_str(text) {
            let Ok((event, span)) = next else { break };
            // The path of the node this event starts, when it starts one.
            let node = |stack: &mut Vec<Frame>, out: &mut Positions| -> Option<String> {
                match stack.last_mut() {
                    None => Some(String::new()),
                    Some(Frame::Map {
                        key: Some(key),
                        path,
                    }) => Some(child(path, key)),
                    // A key: recorded where the caller knows its text.
                    Some(Frame::Map { key: None, .. }) => None,
                    Some(Frame::Seq { path, index }) => {
                        let item = format!("{path}[{index}]");
                        out.at.insert(item.clone(), place(&span));
                        Some(item)
                    }
                }
            };
            // After a value: the map expects its next key, the list its next item.
            let done = |stack: &mut Vec<Frame>| match stack.last_mut() {
                Some(Frame::Map { key, .. }) => *key = None,
                Some(Frame::Seq { index, .. }) => *index += 1,
                None => {}
            };
            match event {
                Event::DocumentStart(_) => {
                    documents += 1;
                    if documents > 1 {
                        break;
                    }
                }
                Event::Scalar(value, ..) => match stack.last_mut() {
                    Some(Frame::Map {
                        key: key @ None,
                        path,
                    }) => {
                        out.at.insert(child(path, &value), place(&span));
                        *key = Some(value.into_owned());
                    }
                    Some(Frame::Seq { path, index }) => {
                        let at = place(&span);
                        out.at.insert(format!("{path}[{index}]"), at);
                        out.items
                            .entry((path.clone(), value.into_owned()))
                            .or_insert(at);
                        *index += 1;
                    }
                    _ => done(&mut stack),
                },
                Event::Alias(_) => {
                    // An alias stands where it is written: the anchored node's own keys are
                    // elsewhere, so a field under it finds this place (see `find`).
                    let key_expected = matches!(stack.last(), Some(Frame::Map { key: None, .. }));
                    if key_expected {
                        // An alias as a key: nothing to name it by; its value follows.
                        if let Some(Frame::Map { key, .. }) = stack.last_mut() {
                            *key = Some("*".into());
                        }
                    } else {
                        node(&mut stack, &mut out);
                        done(&mut stack);
                    }
                }
                Event::MappingStart(..) | Event::SequenceStart(..) => {
                    // A collection as a key (YAML allows it) gets a path no field has.
                    let path = node(&mut stack, &mut out).unwrap_or_else(|| "?".into());
                    stack.push(if matches!(event, Event::MappingStart(..)) {
                        Frame::Map { path, key: None }
                    } else {
                        Frame::Seq { path, index: 0 }
                    });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                    match stack.last_mut() {
                        Some(Frame::Map {
                            key: key @ None, ..
                        }) => *key = Some("?".into()),
                        _ => done(&mut stack),
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Where `path` is written, or the nearest enclosing field that is (the alias a task came
    /// from, the task a missing field belongs to). `None` when not even the first part is.
    pub(crate) fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut path = path;
        loop {
            if let Some(at) = self.at.get(path) {
                return Some(*at);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }

    /// Where the list at `path` holds the item `value`, else where `path` is.
    pub(crate) fn find_item(&self, path: &str, value: &str) -> Option<(usize, usize)> {
        self.items
            .get(&(path.to_string(), value.to_string()))
            .copied()
            .or_else(|| self.find(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_items_are_placed_by_path() {
        let yaml = "name: x\ntasks:\n  - id: a\n    tool: echo\n  - { id: b, needs: [a, zz] }\n  - id: c   # needs: [a]\n    args:\n      deep: {v: 1}\n";
        let p = Positions::of(yaml);
        assert_eq!(p.find("name"), Some((1, 1)));
        assert_eq!(p.find("tasks[0]"), Some((3, 5)));
        assert_eq!(p.find("tasks[0].tool"), Some((4, 5)));
        assert_eq!(p.find("tasks[1].needs"), Some((5, 14)));
        assert_eq!(p.find_item("tasks[1].needs", "zz"), Some((5, 25)));
        // A field the task lacks: the task.
        assert_eq!(p.find("tasks[0].needs"), Some((3, 5)));
        assert_eq!(p.find("tasks[2].args.deep.v"), Some((8, 14)));
        assert_eq!(p.find("agents.w"), None);
    }

    #[test]
    fn minified_json_and_wide_characters_are_placed_by_character() {
        let json =
            r#"{"name":"日本語","tasks":[{"id":"a","tool":"echo"},{"id":"b","needs":["a"]}]}"#;
        let p = Positions::of(json);
        // Counted in characters: 日本語 is three columns here, nine bytes.
        assert_eq!(p.find("tasks[1].needs"), Some((1, 59)));
        assert_eq!(p.find("tasks[1].id"), Some((1, 50)));
        let crlf = "{\r\n  \"tasks\": [\r\n    {\"id\": \"a\",\r\n     \"needs\": [\"a\"]}\r\n  ]\r\n}\r\n";
        assert_eq!(Positions::of(crlf).find("tasks[0].needs"), Some((4, 6)));
    }

    #[test]
    fn an_aliased_task_is_placed_at_its_alias() {
        let yaml = "tasks:\n  - &t\n    id: a\n    tool: echo\n  - *t\n";
        let p = Positions::of(yaml);
        assert_eq!(p.find("tasks[1].id"), Some((5, 5)));
        assert_eq!(p.find("tasks[0].id"), Some((3, 5)));
    }
}
