//! Seeded randomness.
//!
//! A run draws every random number (retry jitter, simulated failures) from one [`SeededRng`]
//! seeded by the run's seed, in the scheduler's deterministic order, so the same seed gives the
//! same draws. ChaCha8 is used because its output for a seed is fixed by its specification, not by
//! a library version.

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// A reproducible random source.
///
/// ```
/// use agent_runtime_core::SeededRng;
/// let mut a = SeededRng::new(42);
/// let mut b = SeededRng::new(42);
/// assert_eq!(a.next_u64(), b.next_u64());
/// ```
#[derive(Clone, Debug)]
pub struct SeededRng(ChaCha8Rng);

impl SeededRng {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SeededRng(ChaCha8Rng::seed_from_u64(seed))
    }

    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A float in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A whole number in `[0, n)`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Multiply-shift: unbiased enough for scheduling jitter and simulation.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}
