//! Payload sealing and data-key wrapping.
//!
//! Each payload is sealed with XChaCha20-Poly1305 under the database's random 256-bit data key,
//! with a fresh random 192-bit nonce (large enough that random nonces never collide in practice)
//! and the event's canonical header (run, task, actor, kind, time) as associated data, so a
//! ciphertext moved to another row no longer opens. Stored form: `0x01 ‖ nonce(24) ‖ ciphertext ‖
//! tag(16)`.
//!
//! The data key is wrapped (sealed) by a key-encryption key derived from the passphrase with
//! Argon2id; the salt and cost parameters are stored beside it, so they can be raised later
//! without re-encrypting events.

use std::cell::RefCell;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use zeroize::Zeroizing;

/// Version byte of a sealed payload.
const SEALED_V1: u8 = 1;
const NONCE_LEN: usize = 24;
/// Associated data of the wrapped data key.
const WRAP_AD: &[u8] = b"agent-runtime data key v1";

thread_local! {
    // A CSPRNG per thread, seeded from the OS: a getrandom syscall per event would cost more
    // than the encryption itself.
    static NONCE_RNG: RefCell<ChaCha20Rng> = RefCell::new(ChaCha20Rng::from_seed(os_seed()));
}

fn os_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    if getrandom::fill(&mut seed).is_err() {
        // Only on a broken system; mix what we have rather than panic.
        let t = agent_runtime_core::ids::os_random_u64();
        seed[..8].copy_from_slice(&t.to_le_bytes());
    }
    seed
}

/// Fills `buf` from the thread's CSPRNG.
pub(crate) fn random_bytes(buf: &mut [u8]) {
    NONCE_RNG.with(|r| r.borrow_mut().fill_bytes(buf));
}

/// Argon2id cost parameters, stored with the wrapped key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl Default for KdfParams {
    /// The OWASP-recommended minimum for Argon2id (19 MiB, 2 passes, 1 lane): tens of
    /// milliseconds per open.
    fn default() -> Self {
        KdfParams {
            m_kib: 19 * 1024,
            t: 2,
            p: 1,
        }
    }
}

/// Derives the key-encryption key from a passphrase.
pub(crate) fn derive_kek(
    passphrase: &[u8],
    salt: &[u8],
    params: KdfParams,
) -> Result<Zeroizing<[u8; 32]>, String> {
    let p = argon2::Params::new(params.m_kib, params.t, params.p, Some(32))
        .map_err(|e| e.to_string())?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p);
    let mut out = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase, salt, out.as_mut())
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Wraps `data_key` under `kek`: `nonce ‖ ciphertext ‖ tag`.
pub(crate) fn wrap_key(kek: &[u8; 32], data_key: &[u8; 32]) -> Vec<u8> {
    seal_with(kek, data_key, WRAP_AD)
}

/// Unwraps a data key; `None` when `kek` is not the key it was wrapped under.
pub(crate) fn unwrap_key(kek: &[u8; 32], wrapped: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
    let plain = Zeroizing::new(open_with(kek, wrapped, WRAP_AD)?);
    let mut key = Zeroizing::new([0u8; 32]);
    if plain.len() != 32 {
        return None;
    }
    key.copy_from_slice(&plain);
    Some(key)
}

fn seal_with(key: &[u8; 32], msg: &[u8], aad: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(&Key::from(*key));
    let mut nonce = [0u8; NONCE_LEN];
    random_bytes(&mut nonce);
    let ct = cipher
        .encrypt(&XNonce::from(nonce), Payload { msg, aad })
        // Only fails for messages over 256 GiB.
        .unwrap_or_default();
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

fn open_with(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN + 16 {
        return None;
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
    let cipher = XChaCha20Poly1305::new(&Key::from(*key));
    cipher
        .decrypt(&XNonce::from(nonce), Payload { msg: ct, aad })
        .ok()
}

/// Seals and opens payloads under one data key.
pub(crate) struct PayloadCipher {
    cipher: XChaCha20Poly1305,
}

impl PayloadCipher {
    pub(crate) fn new(data_key: &[u8; 32]) -> Self {
        PayloadCipher {
            cipher: XChaCha20Poly1305::new(&Key::from(*data_key)),
        }
    }

    /// `0x01 ‖ nonce ‖ ciphertext ‖ tag` of `plaintext`, bound to `header`.
    pub(crate) fn seal(&self, plaintext: &[u8], header: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: header,
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a sealed payload into `out` (cleared first), reusing its allocation; false when it
    /// does not authenticate.
    pub(crate) fn open_into(&self, sealed: &[u8], header: &[u8], out: &mut Vec<u8>) -> bool {
        use chacha20poly1305::AeadInOut;
        out.clear();
        let Some((&version, rest)) = sealed.split_first() else {
            return false;
        };
        if version != SEALED_V1 || rest.len() < NONCE_LEN + 16 {
            return false;
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let Ok(nonce) = <[u8; NONCE_LEN]>::try_from(nonce) else {
            return false;
        };
        out.extend_from_slice(ct);
        self.cipher
            .decrypt_in_place(&XNonce::from(nonce), header, out)
            .is_ok()
    }

    /// The plaintext of a sealed payload; `None` when it does not authenticate.
    pub(crate) fn open(&self, sealed: &[u8], header: &[u8]) -> Option<Vec<u8>> {
        let (&version, rest) = sealed.split_first()?;
        if version != SEALED_V1 || rest.len() < NONCE_LEN + 16 {
            return None;
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        self.cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ct,
                    aad: header,
                },
            )
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let c = PayloadCipher::new(&[7; 32]);
        let sealed = c.seal(b"hello", b"hdr");
        assert_eq!(c.open(&sealed, b"hdr").as_deref(), Some(&b"hello"[..]));
        assert!(c.open(&sealed, b"other").is_none());
        let mut flipped = sealed.clone();
        flipped[30] ^= 1;
        assert!(c.open(&flipped, b"hdr").is_none());
        assert!(PayloadCipher::new(&[8; 32]).open(&sealed, b"hdr").is_none());
        assert!(c.open(&[], b"hdr").is_none());
    }

    #[test]
    fn wrapped_key_opens_only_with_its_kek() {
        const CHEAP: KdfParams = KdfParams {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        let kek = derive_kek(b"pw", b"0123456789abcdef", CHEAP).unwrap();
        let wrapped = wrap_key(&kek, &[3; 32]);
        assert_eq!(*unwrap_key(&kek, &wrapped).unwrap(), [3; 32]);
        let other = derive_kek(b"pw2", b"0123456789abcdef", CHEAP).unwrap();
        assert!(unwrap_key(&other, &wrapped).is_none());
    }
}
