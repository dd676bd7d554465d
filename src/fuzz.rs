//! Bounded random-input tests for the decoders (test builds only): a small deterministic generator, so that a
//! failure reproduces, and an iteration count that a long run raises with `EXUVIA_FUZZ_ITERATIONS`.
//!
//! ```text
//! EXUVIA_FUZZ_ITERATIONS=10000000 cargo test --release --lib random_
//! ```

/// xorshift64*: deterministic for a seed, good enough to spread inputs.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Up to `max` random bytes, often starting from `seed` (a valid input) with some bytes changed,
    /// truncated or extended, so that the decoder gets past its first checks.
    pub(crate) fn mutate(&mut self, seed: &[u8], max: usize) -> Vec<u8> {
        let mut v: Vec<u8> = if seed.is_empty() || self.below(4) == 0 {
            (0..self.below(max + 1))
                .map(|_| self.next() as u8)
                .collect()
        } else {
            seed.to_vec()
        };
        for _ in 0..self.below(4) {
            if v.is_empty() {
                break;
            }
            let i = self.below(v.len());
            v[i] = self.next() as u8;
        }
        match self.below(4) {
            0 => v.truncate(self.below(v.len() + 1)),
            1 => v.extend((0..self.below(16)).map(|_| self.next() as u8)),
            _ => {}
        }
        v.truncate(max);
        v
    }

    /// A string of up to `max` chars made of `pieces` and random characters.
    pub(crate) fn text(&mut self, pieces: &[&str], max: usize) -> String {
        let mut s = String::new();
        while s.chars().count() < max && self.below(8) != 0 {
            if self.below(3) == 0 {
                s.push(char::from_u32(self.below(0x250) as u32).unwrap_or('x'));
            } else {
                s.push_str(pieces[self.below(pieces.len())]);
            }
        }
        s.chars().take(max).collect()
    }
}

/// `default`, or `EXUVIA_FUZZ_ITERATIONS` for a long run.
pub(crate) fn iterations(default: u64) -> u64 {
    std::env::var("EXUVIA_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
