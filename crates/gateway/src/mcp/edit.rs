//! Changing an MCP servers file in place: the file is often shared with desktop MCP hosts,
//! which keep keys of their own in it, so it is edited as a document (every key kept), not
//! rewritten from [`McpConfig`]; and it is replaced at once, so that a crash or a full disk
//! leaves the old file or the new one, never half of one.

use std::io::Write;
use std::path::Path;

use agent_runtime_core::fs::{folder_of, link_target};

use super::{McpConfig, McpServerConfig, check_server, is_yaml};
use crate::error::GatewayError;

impl McpConfig {
    /// Adds the server `name` to the servers file at `path`, creating the file (and its folder)
    /// when it does not exist.
    ///
    /// Everything else in the file is kept: other servers, keys this runtime does not know
    /// (a desktop host's settings), the `servers` spelling of a YAML file. JSON objects come
    /// out with their keys sorted. A YAML file with comments is refused rather than rewritten
    /// without them; the error shows the entry to paste in by hand. The entry is checked as
    /// loading checks it, and an existing server of that name is an error. Concurrent adds to
    /// files of one folder are serialized (an advisory lock on the folder), so none is lost.
    ///
    /// ```no_run
    /// use agent_runtime_gateway::mcp::{McpConfig, McpServerConfig};
    /// # fn main() -> Result<(), agent_runtime_gateway::GatewayError> {
    /// let server = McpServerConfig {
    ///     command: Some("npx".into()),
    ///     args: vec!["-y".into(), "@modelcontextprotocol/server-everything".into()],
    ///     ..McpServerConfig::default()
    /// };
    /// McpConfig::add_server(".agent-runtime/mcp.json".as_ref(), "everything", &server)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn add_server(
        path: &Path,
        name: &str,
        server: &McpServerConfig,
    ) -> Result<(), GatewayError> {
        let read = |source| GatewayError::Read {
            path: path.to_path_buf(),
            source,
        };
        let write = |source| GatewayError::Write {
            path: path.to_path_buf(),
            source,
        };
        check_server(name, server).map_err(|e| e.in_file(path))?;
        // A link (a dotfile manager's) is followed, even to a file not made yet.
        let target = link_target(path).map_err(read)?;
        let dir = folder_of(&target);
        std::fs::create_dir_all(&dir).map_err(write)?;
        // An exclusive lock (std's `flock`) on the folder, held until this returns. The folder,
        // not the file: the file is replaced by a rename, and a lock on the old file would let
        // a waiter go on to read what is no longer the file.
        let folder = std::fs::File::open(&dir).map_err(write)?;
        folder.lock().map_err(write)?;
        let text = match crate::read_config_text(&target) {
            Ok(text) => text,
            Err(GatewayError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                String::new()
            }
            Err(e) => return Err(e),
        };
        // A blank file (just created with `touch`) is an empty list of servers.
        if !text.trim().is_empty() {
            let existing = McpConfig::parse(&text, path)?;
            if existing.servers.contains_key(name) {
                return Err(GatewayError::Mcp {
                    server: name.to_string(),
                    message: "is in the file already".into(),
                }
                .in_file(path));
            }
        }
        let new_text = if is_yaml(path) {
            with_server_yaml(&text, name, server)
        } else {
            with_server_json(&text, name, server)
        }
        .map_err(|message| GatewayError::Parse {
            what: path.display().to_string(),
            message,
        })?;
        // What is written must read back as the file plus this server.
        McpConfig::parse(&new_text, path)?;
        agent_runtime_core::fs::replace(path, |f| f.write_all(new_text.as_bytes())).map_err(write)
    }
}

/// The servers key a document uses: `servers` when only that spelling is there, else the
/// desktop hosts' `mcpServers`.
fn servers_key(has: impl Fn(&str) -> bool) -> &'static str {
    if has("servers") && !has("mcpServers") {
        "servers"
    } else {
        "mcpServers"
    }
}

fn with_server_json(text: &str, name: &str, server: &McpServerConfig) -> Result<String, String> {
    use serde_json::Value;
    let mut doc: Value = if text.trim().is_empty() {
        Value::Object(Default::default())
    } else {
        serde_json::from_str(text).map_err(|e| e.to_string())?
    };
    let root = doc.as_object_mut().ok_or("the file is not a JSON object")?;
    let key = servers_key(|k| root.contains_key(k));
    let servers = root
        .entry(key)
        .or_insert_with(|| Value::Object(Default::default()));
    if servers.is_null() {
        *servers = Value::Object(Default::default());
    }
    let servers = servers
        .as_object_mut()
        .ok_or_else(|| format!("`{key}` is not an object"))?;
    servers.insert(
        name.to_string(),
        serde_json::to_value(server).map_err(|e| e.to_string())?,
    );
    serde_json::to_string_pretty(&doc)
        .map(|t| t + "\n")
        .map_err(|e| e.to_string())
}

fn with_server_yaml(text: &str, name: &str, server: &McpServerConfig) -> Result<String, String> {
    use serde_yaml_ng::{Mapping, Value};
    if has_yaml_comment(text) {
        // In YAML's flow style (JSON is that), so that the entry stays on the error's one
        // line and pastes as it is under the servers key.
        let entry = format!(
            "{}: {}",
            serde_json::to_string(name).map_err(|e| e.to_string())?,
            serde_json::to_string(server).map_err(|e| e.to_string())?
        );
        return Err(format!(
            "the file has comments, which rewriting it would lose; add the server under its \
             servers key by hand: {entry}"
        ));
    }
    let mut doc: Value = if text.trim().is_empty() {
        Value::Mapping(Mapping::new())
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?
    };
    let root = doc
        .as_mapping_mut()
        .ok_or("the file is not a YAML mapping")?;
    let key = servers_key(|k| root.contains_key(k));
    let servers = root
        .entry(Value::String(key.into()))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if servers.is_null() {
        *servers = Value::Mapping(Mapping::new());
    }
    let servers = servers
        .as_mapping_mut()
        .ok_or_else(|| format!("`{key}` is not a mapping"))?;
    servers.insert(
        Value::String(name.to_string()),
        serde_yaml_ng::to_value(server).map_err(|e| e.to_string())?,
    );
    serde_yaml_ng::to_string(&doc).map_err(|e| e.to_string())
}

/// Whether YAML text may hold a comment: a `#` that starts a line or follows a blank. A `#`
/// so placed inside a quoted string counts too: telling them apart needs a YAML scanner, and
/// the cost of the mistake is only a refusal to rewrite.
fn has_yaml_comment(text: &str) -> bool {
    text.lines().any(|line| {
        line.trim_start().starts_with('#') || line.contains(" #") || line.contains("\t#")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_are_seen_where_yaml_allows_them() {
        assert!(has_yaml_comment("# servers\nservers: {}\n"));
        assert!(has_yaml_comment("servers:\n  a: {command: x} # mine\n"));
        assert!(!has_yaml_comment("servers:\n  a: {command: 'x#y'}\n"));
    }
}
