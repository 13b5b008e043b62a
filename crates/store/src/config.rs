//! How to open a store.

use std::fmt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::crypto::KdfParams;

/// The environment variable holding the passphrase that unlocks an encrypted database.
pub const PASSPHRASE_ENV: &str = "AGENT_RUNTIME_PASSPHRASE";
/// The environment variable naming the database file.
pub const DB_ENV: &str = "AGENT_RUNTIME_DB";

/// A passphrase. Its `Debug` output is redacted and its memory is wiped on drop.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Wraps `s`.
    pub fn new(s: impl Into<String>) -> Self {
        Passphrase(Zeroizing::new(s.into()))
    }
    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// How durable an append is when it returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// The write-ahead log is fsynced after every group commit and before its appends return,
    /// so an event whose append returned survives a process crash and a power loss. The
    /// default. (SQLite's `synchronous=FULL` promise, kept by a thread of the store's own so
    /// that the writer commits the next batch while the disk confirms this one.)
    #[default]
    Full,
    /// `PRAGMA synchronous=NORMAL` alone: survives a process crash (kill -9), but the last
    /// commits before a power loss or OS crash may be lost. Faster on slow disks.
    Normal,
}

/// Whether new databases are encrypted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encryption {
    /// Payloads sealed with XChaCha20-Poly1305. The default.
    #[default]
    Encrypted,
    /// Payloads stored in clear. Only when asked for by name.
    Plaintext,
}

/// Everything [`Store::open`](crate::Store::open) needs.
///
/// ```
/// use agent_runtime_store::{StoreConfig, Passphrase};
/// let cfg = StoreConfig::new("/tmp/events.db").passphrase(Passphrase::new("correct horse"));
/// assert!(format!("{cfg:?}").contains("<redacted>"));
/// ```
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub(crate) path: PathBuf,
    pub(crate) encryption: Encryption,
    pub(crate) passphrase: Option<Passphrase>,
    pub(crate) durability: Durability,
    pub(crate) kdf: KdfParams,
    pub(crate) read_only: bool,
    pub(crate) must_exist: bool,
    pub(crate) max_payload_bytes: usize,
    pub(crate) use_keyring: bool,
}

/// The largest canonical payload a store takes in one event, by default.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;

impl StoreConfig {
    /// An encrypted database at `path` (key still to be given).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StoreConfig {
            path: path.into(),
            encryption: Encryption::Encrypted,
            passphrase: None,
            durability: Durability::Full,
            kdf: KdfParams::default(),
            read_only: false,
            must_exist: false,
            max_payload_bytes: MAX_PAYLOAD_BYTES,
            use_keyring: cfg!(feature = "os-keyring"),
        }
    }

    /// A plaintext database at `path`.
    pub fn plaintext(path: impl Into<PathBuf>) -> Self {
        Self::new(path).encryption(Encryption::Plaintext)
    }

    /// The database at `path` (or [`DB_ENV`], or [`default_db_path`]), encrypted unless
    /// `plaintext`, with the passphrase from [`PASSPHRASE_ENV`] when set.
    pub fn from_env(path: Option<PathBuf>, plaintext: bool) -> Self {
        let path = path
            .or_else(|| std::env::var_os(DB_ENV).map(PathBuf::from))
            .unwrap_or_else(default_db_path);
        let mut cfg = Self::new(path);
        if plaintext {
            cfg.encryption = Encryption::Plaintext;
        }
        if let Ok(p) = std::env::var(PASSPHRASE_ENV)
            && !p.is_empty()
        {
            cfg.passphrase = Some(Passphrase::new(p));
        }
        cfg
    }

    /// Sets the passphrase.
    pub fn passphrase(mut self, p: Passphrase) -> Self {
        self.passphrase = Some(p);
        self
    }

    /// Sets whether a new database is encrypted (an existing one keeps its mode).
    pub fn encryption(mut self, e: Encryption) -> Self {
        self.encryption = e;
        self
    }

    /// Sets the durability of appends.
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }

    /// Sets the Argon2id cost for a new database (tests use a cheap one).
    pub fn kdf(mut self, k: KdfParams) -> Self {
        self.kdf = k;
        self
    }

    /// Whether a new encrypted database without a passphrase may keep its key in the OS keyring
    /// (on by default when built with the `os-keyring` feature). A passphrase, when given, is
    /// always used instead.
    pub fn os_keyring(mut self, allow: bool) -> Self {
        self.use_keyring = allow;
        self
    }

    /// Opens without a writer: queries, verify and export only; the file must exist.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Opens for writing only a database that exists already ([`StoreError::NotFound`]
    /// otherwise): for work on what a database holds (resuming or cancelling a run), where a
    /// path that names nothing is a mistake that must not become a new, empty database.
    ///
    /// [`StoreError::NotFound`]: crate::StoreError::NotFound
    pub fn must_exist(mut self) -> Self {
        self.must_exist = true;
        self
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `agent-runtime/events.db` under the user's data directory (`$XDG_DATA_HOME` or
/// `~/.local/share` on Linux, `~/Library/Application Support` on macOS, `%APPDATA%` on Windows),
/// or in the current directory when there is none.
pub fn default_db_path() -> PathBuf {
    dirs::data_dir()
        .map(|d| d.join("agent-runtime"))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("events.db")
}
