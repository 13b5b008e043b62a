//! Key-encryption keys kept in the OS keyring.
//!
//! When a new encrypted database is created without a passphrase, a random 256-bit key is stored
//! in the OS keyring (Secret Service on Linux, Keychain on macOS, Credential Manager on Windows)
//! under the service `agent-runtime` and an account named after a random key id kept in the
//! database's `meta` table, so the database can move on disk without losing its key. That key
//! wraps the data key exactly as a passphrase-derived key would.

use zeroize::Zeroizing;

/// The keyring service name under which keys are stored.
pub const KEYRING_SERVICE: &str = "agent-runtime";

/// The keyring account of a database's key.
pub(crate) fn account(key_id: &str) -> String {
    format!("event-log-key-{key_id}")
}

/// Creates and stores a new key-encryption key for `key_id`.
#[cfg(feature = "os-keyring")]
pub(crate) fn create_kek(key_id: &str) -> Result<Zeroizing<[u8; 32]>, String> {
    let mut kek = Zeroizing::new([0u8; 32]);
    crate::crypto::key_material(kek.as_mut())?;
    let entry =
        keyring::Entry::new(KEYRING_SERVICE, &account(key_id)).map_err(|e| e.to_string())?;
    entry.set_secret(kek.as_ref()).map_err(|e| e.to_string())?;
    // Read it back: some keyrings accept a write they cannot serve later (locked collections).
    let back = Zeroizing::new(entry.get_secret().map_err(|e| e.to_string())?);
    if back.as_slice() != kek.as_ref() {
        return Err("the keyring returned a different key than was stored".into());
    }
    Ok(kek)
}

/// Loads the key-encryption key of `key_id`.
#[cfg(feature = "os-keyring")]
pub(crate) fn load_kek(key_id: &str) -> Result<Zeroizing<[u8; 32]>, String> {
    let entry =
        keyring::Entry::new(KEYRING_SERVICE, &account(key_id)).map_err(|e| e.to_string())?;
    let secret = Zeroizing::new(entry.get_secret().map_err(|e| e.to_string())?);
    let mut kek = Zeroizing::new([0u8; 32]);
    if secret.len() != 32 {
        return Err(format!(
            "the keyring entry holds {} bytes, not a 32-byte key",
            secret.len()
        ));
    }
    kek.copy_from_slice(&secret);
    Ok(kek)
}

/// Removes the key of `key_id`: one made for a database that was then not created (another
/// process's creation won, or the creation failed). Best effort: an entry left behind holds a
/// key that wraps nothing.
#[cfg(feature = "os-keyring")]
pub(crate) fn delete_kek(key_id: &str) {
    if let Ok(entry) = keyring::Entry::new(KEYRING_SERVICE, &account(key_id)) {
        let _ = entry.delete_credential();
    }
}

/// Without the `os-keyring` feature there is no keyring.
#[cfg(not(feature = "os-keyring"))]
pub(crate) fn delete_kek(_key_id: &str) {}

/// Without the `os-keyring` feature there is no keyring.
#[cfg(not(feature = "os-keyring"))]
pub(crate) fn create_kek(_key_id: &str) -> Result<Zeroizing<[u8; 32]>, String> {
    Err("this build has no OS keyring support (feature os-keyring)".into())
}

/// Without the `os-keyring` feature there is no keyring.
#[cfg(not(feature = "os-keyring"))]
pub(crate) fn load_kek(_key_id: &str) -> Result<Zeroizing<[u8; 32]>, String> {
    Err("this build has no OS keyring support (feature os-keyring)".into())
}
