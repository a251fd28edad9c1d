//! A small deterministic random number generator (SplitMix64) for everything that
//! every rank must compute identically from a seed without communicating: sample
//! orders, shuffles, parameter initialisation, generated test data.

/// SplitMix64: one `u64` of state, statistically sound for shuffling and init, and the
/// same on every platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    /// Skips `n` draws in constant time (the state only ever advances by a constant),
    /// so a rank can draw the values of its own slice of a long stream.
    pub fn skip(&mut self, n: u64) {
        self.0 = self.0.wrapping_add(n.wrapping_mul(Self::GAMMA));
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`, on a grid of 2^-23.
    pub fn next_f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Uniform integer in `lo..=hi`.
    pub fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as i64
    }

    /// A permutation of `0..n` (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut perm: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            perm.swap(i, (self.next_u64() % (i as u64 + 1)) as usize);
        }
        perm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_seeded_and_complete() {
        let p = SplitMix64::new(3).permutation(100);
        let mut sorted = p.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(p, SplitMix64::new(3).permutation(100));
        assert_ne!(p, SplitMix64::new(4).permutation(100));
    }

    #[test]
    fn skip_lands_where_drawing_does() {
        let mut drawn = SplitMix64::new(9);
        for _ in 0..1000 {
            drawn.next_u64();
        }
        let mut skipped = SplitMix64::new(9);
        skipped.skip(1000);
        assert_eq!(drawn.next_u64(), skipped.next_u64());
    }
}
