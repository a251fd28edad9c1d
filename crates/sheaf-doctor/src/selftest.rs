//! The collective conformance laws run over a transport plugin, one process per rank.
//! Every rank derives the same cases from the seed and checks its own results.

use std::time::Duration;

use sheaf_core::{DType, Deadline, ReduceOp};
use sheaf_testkit::conformance::collectives::{check_all, Case};
use sheaf_testkit::conformance::SplitMix;

use sheaf_plugins::{HostError, Registry};
use sheaf_runtime::WorkerEnv;

/// The `i`-th case of a run seeded with `seed`: lengths from 0 to `max_len`, half of
/// them below 16 (and so often below the world size).
pub fn case(seed: u64, i: u64, max_len: usize) -> Case {
    let mut g = SplitMix::new(seed.wrapping_mul(0x9E37_79B9).wrapping_add(i));
    let len = if g.next_u64().is_multiple_of(2) {
        g.next_u64() as usize % 16
    } else {
        g.next_u64() as usize % (max_len + 1)
    };
    Case {
        seed: g.next_u64(),
        len,
        dtype: DType::ALL[g.next_u64() as usize % DType::ALL.len()],
        op: ReduceOp::ALL[g.next_u64() as usize % ReduceOp::ALL.len()],
        root: g.next_u64() as usize % 64,
    }
}

/// Connects through `transport` and checks `cases` cases; returns how many passed
/// (all of them) or the first failure.
pub fn check_collectives(
    registry: &Registry,
    env: &WorkerEnv,
    transport: &str,
    cases: u64,
    seed: u64,
    max_len: usize,
) -> Result<u64, HostError> {
    let connected = env.connect(registry, transport, Duration::from_secs(30), Duration::from_secs(10))?;
    let group = connected.group(sheaf_collectives::Algorithm::Auto);
    let link = connected.link.clone();
    let dl = || Deadline::after(Duration::from_secs(30));
    for i in 0..cases {
        let c = case(seed, i, max_len);
        check_all(&group, &c, dl())
            .map_err(|e| HostError::Train { rank: env.rank, detail: format!("case {i} ({c:?}): {e}") })?;
    }
    link.close(dl()).map_err(|e| HostError::Train { rank: env.rank, detail: e.to_string() })?;
    Ok(cases)
}
