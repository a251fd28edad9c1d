//! Which allreduce algorithm a group runs, and the automatic choice.

use std::fmt;
use std::str::FromStr;

/// An allreduce algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// Pick by message size and world size (see [`Algorithm::choose`]).
    Auto,
    /// Ring reduce-scatter then ring allgather: bandwidth-optimal, 2(n-1) steps.
    Ring,
    /// Recursive halving (reduce-scatter) then recursive doubling (allgather),
    /// 2 log2(p) steps; a world that is not a power of two first folds its extra
    /// ranks into partners.
    HalvingDoubling,
    /// Every rank sends its whole buffer to every other and reduces all of them in
    /// rank order: one round, for tiny messages.
    Direct,
}

impl Algorithm {
    pub const ALL: [Algorithm; 3] = [Algorithm::Ring, Algorithm::HalvingDoubling, Algorithm::Direct];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Auto => "auto",
            Algorithm::Ring => "ring",
            Algorithm::HalvingDoubling => "halving-doubling",
            Algorithm::Direct => "direct",
        }
    }

    /// The concrete algorithm for a `bytes`-long buffer over `world` ranks. Direct
    /// while everything each rank receives (`bytes * (world - 1)`) stays within 64 KiB,
    /// where one round of latency beats bandwidth; ring above.
    pub fn choose(self, bytes: usize, world: usize) -> Algorithm {
        match self {
            Algorithm::Auto if bytes.saturating_mul(world.saturating_sub(1)) <= 64 << 10 => Algorithm::Direct,
            Algorithm::Auto => Algorithm::Ring,
            other => other,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Algorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Algorithm, String> {
        [Algorithm::Auto, Algorithm::Ring, Algorithm::HalvingDoubling, Algorithm::Direct]
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| format!("unknown algorithm `{s}` (auto, ring, halving-doubling, direct)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Auto` picks direct while a rank receives at most 64 KiB in all, ring above; a
    /// fixed choice is kept.
    #[test]
    fn auto_chooses_by_bytes_received() {
        assert_eq!(Algorithm::Auto.choose(64 << 10, 2), Algorithm::Direct);
        assert_eq!(Algorithm::Auto.choose((64 << 10) + 1, 2), Algorithm::Ring);
        assert_eq!(Algorithm::Auto.choose(16 << 10, 5), Algorithm::Direct);
        assert_eq!(Algorithm::Auto.choose((16 << 10) + 1, 5), Algorithm::Ring);
        assert_eq!(Algorithm::Auto.choose(usize::MAX, 1), Algorithm::Direct);
        for a in Algorithm::ALL {
            assert_eq!(a.choose(1, 4), a);
            assert_eq!(a.name().parse::<Algorithm>(), Ok(a));
        }
    }
}
