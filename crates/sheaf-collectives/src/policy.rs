//! The policy: which algorithm a group runs for each collective, as typed choices,
//! and the thresholds of the automatic ones. The algorithms themselves are the
//! modules of `group`.

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
    /// Over several hosts ([`crate::Group::with_hosts`]): a reduce inside each host to
    /// its first rank, an allreduce among those leaders (by size, as `Auto`), and a
    /// broadcast inside each host, so only one rank per host talks across hosts. What
    /// `Auto` runs when the group knows its hosts, from the size where a flat `Auto`
    /// would take the ring (below, one direct round wins); ring on a group that does
    /// not know them.
    Hierarchical,
}

impl Algorithm {
    pub const ALL: [Algorithm; 3] = [Algorithm::Ring, Algorithm::HalvingDoubling, Algorithm::Direct];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Auto => "auto",
            Algorithm::Ring => "ring",
            Algorithm::HalvingDoubling => "halving-doubling",
            Algorithm::Direct => "direct",
            Algorithm::Hierarchical => "hierarchical",
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

/// The broadcast (and reduce) algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BroadcastAlgorithm {
    /// A binomial tree over ranks relative to the root: log2(n) rounds.
    Binomial,
    /// A pipelined chain root, root + 1, ... in chunks: about one buffer's transfer
    /// plus a chunk per hop.
    Chain,
}

/// Broadcasts and reduces of at least this many bytes over 3 or more ranks use the
/// pipelined chain; smaller ones the binomial tree.
pub const CHAIN_MIN_BYTES: usize = 64 << 10;

impl BroadcastAlgorithm {
    /// The algorithm for `bytes` over `world` ranks.
    pub fn choose(bytes: usize, world: usize) -> BroadcastAlgorithm {
        if world >= 3 && bytes >= CHAIN_MIN_BYTES {
            BroadcastAlgorithm::Chain
        } else {
            BroadcastAlgorithm::Binomial
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BroadcastAlgorithm::Binomial => "binomial",
            BroadcastAlgorithm::Chain => "chain",
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
        [
            Algorithm::Auto,
            Algorithm::Ring,
            Algorithm::HalvingDoubling,
            Algorithm::Direct,
            Algorithm::Hierarchical,
        ]
        .into_iter()
        .find(|a| a.name() == s)
        .ok_or_else(|| {
            format!("unknown algorithm `{s}` (auto, ring, halving-doubling, direct, hierarchical)")
        })
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
            assert_eq!(a.to_string(), a.name());
        }
        assert_eq!(Algorithm::Auto.to_string(), "auto");
        assert!("rings".parse::<Algorithm>().unwrap_err().contains("unknown algorithm `rings`"));
    }

    /// The pipelined chain from 64 KiB on 3 or more ranks, the binomial tree otherwise.
    #[test]
    fn broadcast_chooses_by_size_and_world() {
        use BroadcastAlgorithm::{Binomial, Chain};
        assert_eq!(BroadcastAlgorithm::choose(CHAIN_MIN_BYTES, 3), Chain);
        assert_eq!(BroadcastAlgorithm::choose(CHAIN_MIN_BYTES - 1, 3), Binomial);
        assert_eq!(BroadcastAlgorithm::choose(1 << 30, 2), Binomial);
        assert_eq!(BroadcastAlgorithm::choose(1 << 30, 8), Chain);
        assert_eq!((Chain.name(), Binomial.name()), ("chain", "binomial"));
    }
}
