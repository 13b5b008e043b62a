//! Payload sealing and data-key wrapping.
//!
//! Each payload is sealed with XChaCha20-Poly1305 under the database's random 256-bit data key,
//! with a fresh random 192-bit nonce (large enough that random nonces never collide in practice)
//! and the event's canonical header (run, task, actor, kind, time) as associated data, so a
//! ciphertext moved to another row no longer opens. Stored form: `0x01 ‖ nonce(24) ‖ ciphertext ‖
//! tag(16)`.
//!
//! The data key is wrapped (sealed) by a key-encryption key derived from the passphrase with
//! Argon2id, or kept in the OS keyring; the salt and cost parameters are stored beside it, so they
//! can be raised later without re-encrypting events.
//!
//! XChaCha20-Poly1305 is built the standard way (as libsodium and
//! draft-irtf-cfrg-xchacha specify): HChaCha20 of the key and the nonce's first 16 bytes gives a
//! subkey, and ChaCha20-Poly1305 (RFC 8439) runs under that subkey with the nonce's last 8 bytes.
//! HChaCha20 comes from RustCrypto's `chacha20`, ChaCha20-Poly1305 from `ring`, whose assembly
//! picks the CPU's vector unit at run time: about four times faster here than the pure-Rust
//! `chacha20poly1305` crate in a portable build, which matters because verifying a log decrypts
//! every payload. A test checks the result against that crate byte for byte.

use std::cell::RefCell;

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use zeroize::Zeroizing;

/// Version byte of a sealed payload.
const SEALED_V1: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Associated data of the wrapped data key.
const WRAP_AD: &[u8] = b"agent-runtime data key v1";
/// The associated data of a data key wrapped by a build that authenticates the log's head
/// (database format 3): a key that opens under it says the head must carry its tag, which
/// nobody without the key can then remove unnoticed.
const WRAP_AD_HEAD: &[u8] = b"agent-runtime data key v2, head authenticated";
/// The context of the key that tags the log's head, derived from the data key.
const HEAD_KEY_CONTEXT: &str = "agent-runtime event log head v1";

/// The ChaCha20-Poly1305 key and nonce that XChaCha20-Poly1305 with `key` and `nonce` reduces to.
fn xchacha(key: &[u8; 32], nonce: &[u8; NONCE_LEN]) -> Option<(LessSafeKey, Nonce)> {
    let mut head = [0u8; 16];
    head.copy_from_slice(&nonce[..16]);
    let subkey = Zeroizing::new(<[u8; 32]>::from(chacha20::hchacha::<chacha20::R20>(
        &(*key).into(),
        &head.into(),
    )));
    let mut short = [0u8; 12];
    short[4..].copy_from_slice(&nonce[16..]);
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, subkey.as_ref()).ok()?);
    Some((key, Nonce::assume_unique_for_key(short)))
}

/// `nonce ‖ ciphertext ‖ tag` of `msg` appended to `out`.
fn seal_into(key: &[u8; 32], msg: &[u8], aad: &[u8], out: &mut Vec<u8>) {
    let mut nonce = [0u8; NONCE_LEN];
    random_bytes(&mut nonce);
    out.extend_from_slice(&nonce);
    let start = out.len();
    out.extend_from_slice(msg);
    // Sealing only fails for messages over 256 GiB; payloads are capped far below.
    match xchacha(key, &nonce).and_then(|(k, n)| {
        k.seal_in_place_separate_tag(n, Aad::from(aad), &mut out[start..])
            .ok()
    }) {
        Some(tag) => out.extend_from_slice(tag.as_ref()),
        // Fail closed: never leave the plaintext where the ciphertext should be (the result
        // then does not authenticate, which readers report).
        None => out[start..].fill(0),
    }
}

/// Opens `nonce ‖ ciphertext ‖ tag` into `out` (cleared first); false when it does not
/// authenticate.
fn open_into_raw(key: &[u8; 32], sealed: &[u8], aad: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return false;
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let Ok(nonce) = <[u8; NONCE_LEN]>::try_from(nonce) else {
        return false;
    };
    let Some((k, n)) = xchacha(key, &nonce) else {
        return false;
    };
    out.extend_from_slice(ct);
    match k.open_in_place(n, Aad::from(aad), out) {
        Ok(plain) => {
            let len = plain.len();
            out.truncate(len);
            true
        }
        Err(_) => {
            out.clear();
            false
        }
    }
}

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

/// Fills `buf` from the thread's CSPRNG (nonces).
pub(crate) fn random_bytes(buf: &mut [u8]) {
    NONCE_RNG.with(|r| r.borrow_mut().fill_bytes(buf));
}

/// Fills `buf` with key material (data keys, key-encryption keys, salts, key ids) straight from
/// the operating system. Unlike nonces, keys get no fallback: if the OS source fails, a key made
/// from anything weaker (a clock) could be guessed, so the caller refuses to create one.
pub(crate) fn key_material(buf: &mut [u8]) -> Result<(), String> {
    key_material_from(buf, getrandom::fill)
}

fn key_material_from(
    buf: &mut [u8],
    source: impl FnOnce(&mut [u8]) -> Result<(), getrandom::Error>,
) -> Result<(), String> {
    source(buf).map_err(|e| {
        buf.fill(0);
        format!("the operating system's random source failed ({e}); no key was made from anything weaker")
    })
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

impl KdfParams {
    /// The most memory a key derivation may ask for: 1 GiB, 50 times the default. The
    /// parameters are read from the database, and a file changed to ask for terabytes or
    /// billions of passes must fail at once, not hang every command or exhaust memory.
    pub const MAX_M_KIB: u32 = 1024 * 1024;
    /// The most passes: 64 (the default is 2).
    pub const MAX_T: u32 = 64;
    /// The most lanes: 64 (the default is 1).
    pub const MAX_P: u32 = 64;

    /// Whether the costs are within [`KdfParams::MAX_M_KIB`], [`KdfParams::MAX_T`] and
    /// [`KdfParams::MAX_P`]; what is over them when not.
    pub fn check_bounds(&self) -> Result<(), String> {
        for (name, value, max) in [
            ("memory (m_kib)", self.m_kib, Self::MAX_M_KIB),
            ("passes (t)", self.t, Self::MAX_T),
            ("lanes (p)", self.p, Self::MAX_P),
        ] {
            if value > max {
                return Err(format!(
                    "Argon2id {name} of {value} is over the limit of {max}"
                ));
            }
        }
        Ok(())
    }
}

/// Derives the key-encryption key from a passphrase.
pub(crate) fn derive_kek(
    passphrase: &[u8],
    salt: &[u8],
    params: KdfParams,
) -> Result<Zeroizing<[u8; 32]>, String> {
    params.check_bounds()?;
    let p = argon2::Params::new(params.m_kib, params.t, params.p, Some(32))
        .map_err(|e| e.to_string())?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p);
    let mut out = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase, salt, out.as_mut())
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Wraps `data_key` under `kek`: `nonce ‖ ciphertext ‖ tag`, marked as a key whose log's
/// head is authenticated (see [`WRAP_AD_HEAD`]).
pub(crate) fn wrap_key(kek: &[u8; 32], data_key: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(NONCE_LEN + 32 + TAG_LEN);
    seal_into(kek, data_key, WRAP_AD_HEAD, &mut out);
    out
}

/// Unwraps a data key, and says whether its log's head must be authenticated (a key wrapped
/// by this build; one of format 2 was not); `None` when `kek` is not the key it was wrapped
/// under.
pub(crate) fn unwrap_key(kek: &[u8; 32], wrapped: &[u8]) -> Option<(Zeroizing<[u8; 32]>, bool)> {
    let mut plain = Zeroizing::new(Vec::with_capacity(48));
    let head_required = if open_into_raw(kek, wrapped, WRAP_AD_HEAD, &mut plain) {
        true
    } else if open_into_raw(kek, wrapped, WRAP_AD, &mut plain) {
        false
    } else {
        return None;
    };
    if plain.len() != 32 {
        return None;
    }
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&plain);
    Some((key, head_required))
}

/// Seals and opens payloads under one data key, and tags the log's head with a key derived
/// from it.
pub(crate) struct PayloadCipher {
    key: Zeroizing<[u8; 32]>,
    head_key: Zeroizing<[u8; 32]>,
    /// Whether the head must carry its tag (see [`unwrap_key`]).
    pub(crate) head_required: bool,
}

impl PayloadCipher {
    pub(crate) fn new(data_key: &[u8; 32], head_required: bool) -> Self {
        PayloadCipher {
            key: Zeroizing::new(*data_key),
            head_key: Zeroizing::new(blake3::derive_key(HEAD_KEY_CONTEXT, data_key)),
            head_required,
        }
    }

    /// The tag of the log's head: keyed BLAKE3 of `u64_be(seq) ‖ hash`. Only a holder of the
    /// key can make it, so a log cut short or rewritten by anyone else no longer matches it.
    pub(crate) fn head_tag(&self, seq: u64, hash: &[u8; 32]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.head_key);
        h.update(&seq.to_be_bytes());
        h.update(hash);
        *h.finalize().as_bytes()
    }

    /// `0x01 ‖ nonce ‖ ciphertext ‖ tag` of `plaintext`, bound to `header`.
    pub(crate) fn seal(&self, plaintext: &[u8], header: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.push(SEALED_V1);
        seal_into(&self.key, plaintext, header, &mut out);
        out
    }

    /// Opens a sealed payload into `out` (cleared first), reusing its allocation; false when it
    /// does not authenticate.
    pub(crate) fn open_into(&self, sealed: &[u8], header: &[u8], out: &mut Vec<u8>) -> bool {
        match sealed.split_first() {
            Some((&SEALED_V1, rest)) => open_into_raw(&self.key, rest, header, out),
            _ => {
                out.clear();
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys come from the OS source or not at all: a failing source is an error, and the
    /// buffer holds nothing from it.
    #[test]
    fn key_material_has_no_weak_fallback() {
        let mut key = [7u8; 32];
        let err = key_material_from(&mut key, |_| Err(getrandom::Error::UNSUPPORTED)).unwrap_err();
        assert!(err.contains("random source failed"), "{err}");
        assert_eq!(key, [0; 32]);
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        key_material(&mut a).unwrap();
        key_material(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0; 32]);
    }

    impl PayloadCipher {
        fn open(&self, sealed: &[u8], header: &[u8]) -> Option<Vec<u8>> {
            let mut out = Vec::new();
            self.open_into(sealed, header, &mut out).then_some(out)
        }
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let c = PayloadCipher::new(&[7; 32], true);
        let sealed = c.seal(b"hello", b"hdr");
        assert_eq!(c.open(&sealed, b"hdr").as_deref(), Some(&b"hello"[..]));
        assert!(c.open(&sealed, b"other").is_none());
        let mut flipped = sealed.clone();
        flipped[30] ^= 1;
        assert!(c.open(&flipped, b"hdr").is_none());
        assert!(
            PayloadCipher::new(&[8; 32], true)
                .open(&sealed, b"hdr")
                .is_none()
        );
        assert!(c.open(&[], b"hdr").is_none());
    }

    /// The construction is the standard XChaCha20-Poly1305: RustCrypto's implementation opens
    /// what we seal and we open what it seals.
    #[test]
    fn interoperates_with_the_reference_xchacha20poly1305() {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let key = [9u8; 32];
        let reference = chacha20poly1305::XChaCha20Poly1305::new(&chacha20poly1305::Key::from(key));
        for len in [0usize, 1, 63, 64, 65, 560, 4097] {
            let msg: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let sealed = PayloadCipher::new(&key, true).seal(&msg, b"header");
            let nonce: [u8; NONCE_LEN] = sealed[1..25].try_into().unwrap();
            let opened = reference
                .decrypt(
                    &chacha20poly1305::XNonce::from(nonce),
                    Payload {
                        msg: &sealed[25..],
                        aad: b"header",
                    },
                )
                .expect("reference opens ours");
            assert_eq!(opened, msg);
            let theirs = reference
                .encrypt(
                    &chacha20poly1305::XNonce::from(nonce),
                    Payload {
                        msg: &msg,
                        aad: b"header",
                    },
                )
                .unwrap();
            assert_eq!(
                theirs,
                sealed[25..],
                "same key, nonce and message: same bytes"
            );
        }
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
        assert_eq!(*unwrap_key(&kek, &wrapped).unwrap().0, [3; 32]);
        let other = derive_kek(b"pw2", b"0123456789abcdef", CHEAP).unwrap();
        assert!(unwrap_key(&other, &wrapped).is_none());
    }
}
