//! Partitioner laws: every sample to exactly one rank, balanced; stages contiguous,
//! covering and non-empty.

use sheaf_core::{DataPartitioner, ModelPartitioner};

type Check = Result<(), String>;

/// For one epoch: every index in `0..num_samples` goes to exactly one of `world`
/// ranks, shard sizes differ by at most one, and asking twice gives the same answer.
pub fn check_data_partitioner(
    p: &dyn DataPartitioner,
    num_samples: usize,
    world: usize,
    epoch: u64,
) -> Check {
    let mut owner = vec![usize::MAX; num_samples];
    let mut sizes = Vec::with_capacity(world);
    for rank in 0..world {
        let shard = p.shard(epoch, num_samples, rank, world).map_err(|e| format!("rank {rank}: {e}"))?;
        if p.shard(epoch, num_samples, rank, world).map_err(|e| e.to_string())? != shard {
            return Err(format!("rank {rank}: two calls for epoch {epoch} disagree"));
        }
        for &i in &shard {
            if i >= num_samples {
                return Err(format!("rank {rank} got index {i} of {num_samples}"));
            }
            if owner[i] != usize::MAX {
                return Err(format!("index {i} given to ranks {} and {rank}", owner[i]));
            }
            owner[i] = rank;
        }
        sizes.push(shard.len());
    }
    if let Some(i) = owner.iter().position(|&o| o == usize::MAX) {
        return Err(format!("index {i} given to no rank"));
    }
    let (lo, hi) = (sizes.iter().min().copied().unwrap_or(0), sizes.iter().max().copied().unwrap_or(0));
    if hi - lo > 1 {
        return Err(format!("shard sizes range from {lo} to {hi}"));
    }
    Ok(())
}

/// `cut(costs, stages)` returns contiguous, non-empty ranges covering every layer;
/// asking for more stages than layers, or none, is an error.
pub fn check_model_partitioner(p: &dyn ModelPartitioner, costs: &[u64], stages: usize) -> Check {
    let result = p.cut(costs, stages);
    if stages == 0 || stages > costs.len() {
        return match result {
            Err(_) => Ok(()),
            Ok(r) => Err(format!("{stages} stages of {} layers accepted: {r:?}", costs.len())),
        };
    }
    let ranges = result.map_err(|e| e.to_string())?;
    if ranges.len() != stages {
        return Err(format!("asked for {stages} stages, got {}", ranges.len()));
    }
    let mut next = 0;
    for r in &ranges {
        if r.start != next || r.is_empty() {
            return Err(format!("stages {ranges:?} are not contiguous and non-empty"));
        }
        next = r.end;
    }
    if next != costs.len() {
        return Err(format!("stages {ranges:?} do not cover {} layers", costs.len()));
    }
    Ok(())
}
