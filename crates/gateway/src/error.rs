//! Errors of configuration and setup (a tool call's own failures are core's `ToolError`).

use std::path::PathBuf;

/// A failure to load or assemble the gateway: a bad configuration, a bad policy, a duplicate tool.
///
/// Messages say what was being done and to which file or tool; they never contain secret values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// A file could not be read.
    #[error("{path}: cannot read it: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file could not be written (an MCP servers file being changed).
    #[error("{path}: cannot write it: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A configuration or policy file did not parse.
    #[error("{what}: {message}")]
    Parse {
        /// Which file or document.
        what: String,
        /// The parser's message.
        message: String,
    },
    /// A tool's declaration is unusable (bad name, bad schema, bad template).
    #[error("tool {name:?}: {message}")]
    InvalidTool {
        /// The tool's name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Two tools have the same registry name.
    #[error("tool {0:?} is registered twice")]
    Duplicate(String),
    /// A workspace root cannot be used (it does not exist, or is not reachable).
    #[error("workspace root {}: {source}", root.display())]
    Workspace {
        /// The root as configured (made absolute).
        root: PathBuf,
        /// Why it cannot be used.
        source: std::io::Error,
    },
    /// A policy rule is unusable.
    #[error("policy rule {rule:?}: {message}")]
    Policy {
        /// The rule's id.
        rule: String,
        /// What is wrong.
        message: String,
    },
    /// Something a configuration, policy or MCP servers file declares is unusable: the file,
    /// then what is wrong in it. Always a problem of the file's content, never of the world.
    #[error("{}: {source}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        source: Box<GatewayError>,
    },
    /// An MCP server could not be configured or reached.
    #[error("MCP server {server:?}: {message}")]
    Mcp {
        /// The server's configured name.
        server: String,
        /// What went wrong.
        message: String,
    },
    /// Serving the registry over MCP (`mcp serve`) failed.
    #[error("serving MCP over {transport}: {message}")]
    Serve {
        /// `stdio`, or `http ADDRESS`.
        transport: String,
        /// What went wrong.
        message: String,
    },
}

impl GatewayError {
    /// `self`, placed in the file `path` unless it names a file already (a read or parse error,
    /// or one placed before).
    pub fn in_file(self, path: &std::path::Path) -> GatewayError {
        match self {
            GatewayError::Read { .. }
            | GatewayError::Parse { .. }
            | GatewayError::InFile { .. } => self,
            other => GatewayError::InFile {
                path: path.to_path_buf(),
                source: Box::new(other),
            },
        }
    }

    /// Whether the error is the configuration's fault (exit 2 in the CLI) rather than a
    /// failure to reach something it names (an MCP server that does not answer) or to write a
    /// file.
    pub fn is_configuration(&self) -> bool {
        !matches!(
            self,
            GatewayError::Mcp { .. } | GatewayError::Serve { .. } | GatewayError::Write { .. }
        )
    }
}
