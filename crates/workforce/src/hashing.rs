//! A fast hasher for the maps the scheduler keeps by number, task UUID or graph task id.
//!
//! Std's default (SipHash) is built against keys chosen to collide; these keys come from the
//! engine itself or from the graph its user wrote, and SipHash showed in profiles where a run's
//! hundred thousand tasks are indexed. No map hashed with it is ever iterated where the order
//! could reach an event: they serve lookups only.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes with one folded multiplication per word (the 128-bit product's halves xored, as
/// `foldhash` does): every bit of a word reaches both the low bits of the hash (a table's
/// bucket) and its high bits (the table's tags). A plain multiplication leaves the low bits
/// to the low bytes, which ids sharing a prefix (`t000001`, `t000002`, ...) share.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, n: u64) {
        let product = u128::from(self.0 ^ n) * 0x9E37_79B9_7F4A_7C15;
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }
}

/// A `HashMap` hashed with [`FastHasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
