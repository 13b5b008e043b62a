//! What every subcommand shares: global options, opening the store, error kinds.

use std::path::PathBuf;
use std::sync::OnceLock;

use clap::Args;

/// Options every subcommand accepts.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// The event database (default: agent-runtime/events.db under the user's data directory).
    #[arg(long, global = true, env = "AGENT_RUNTIME_DB", value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Create or open the database without encryption (payloads stored in clear).
    #[arg(long, global = true)]
    pub plaintext: bool,
}

/// An error that decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or input: exit 2.
    #[error("{0}")]
    Usage(String),
    /// A check failed (verification, a failed run): exit 1.
    #[error("{0}")]
    Failed(String),
    /// `audit verify` could not check the log at all (no database, a wrong key, a locked or
    /// unreadable file): exit 3, so that a script tells "not checked" from "checked and found
    /// changed" (exit 1).
    #[error(transparent)]
    NotVerified(anyhow::Error),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
            CliError::NotVerified(_) => 3,
        }
    }
}

/// The store's passphrase, moved out of the environment by [`take_passphrase_from_env`].
static PASSPHRASE: OnceLock<agent_runtime_store::Passphrase> = OnceLock::new();

/// Moves the store's passphrase ([`agent_runtime_store::PASSPHRASE_ENV`]) from the environment
/// into this process's memory. Every child process (a command tool, a policy hook, an MCP
/// server) inherits the environment unless it is cleared for it; hooks keep it, so the
/// passphrase must not be there.
///
/// # Safety
/// No other thread may run (the rule of [`std::env::remove_var`]): call it first in `main`.
pub unsafe fn take_passphrase_from_env() {
    let name = agent_runtime_store::PASSPHRASE_ENV;
    if let Some(p) = std::env::var_os(name) {
        // SAFETY: the caller promises that this thread is the only one.
        unsafe { std::env::remove_var(name) };
        if let Some(p) = p.to_str().filter(|p| !p.is_empty()) {
            let _ = PASSPHRASE.set(agent_runtime_store::Passphrase::new(p));
        }
    }
}

impl GlobalArgs {
    /// The store configuration these options and the environment describe.
    pub fn store_config(&self) -> agent_runtime_store::StoreConfig {
        let config = agent_runtime_store::StoreConfig::from_env(self.db.clone(), self.plaintext);
        match PASSPHRASE.get() {
            Some(p) => config.passphrase(p.clone()),
            None => config,
        }
    }

    /// Opens (creating if needed) the event database for appending.
    pub fn open_store(&self) -> anyhow::Result<agent_runtime_store::Store> {
        Ok(agent_runtime_store::Store::open(self.store_config())?)
    }

    /// Opens an existing event database for reading only.
    pub fn open_store_read_only(&self) -> anyhow::Result<agent_runtime_store::Store> {
        Ok(agent_runtime_store::Store::open(
            self.store_config().read_only(),
        )?)
    }
}
