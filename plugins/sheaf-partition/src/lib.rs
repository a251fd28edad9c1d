//! Sheaf plugin: partitioners.
//!
//! Data: `contiguous` (rank r takes the r-th balanced block), `strided` (every
//! world-th index from r) and `shuffle` (a seeded permutation, new every epoch, cut
//! into balanced blocks; every rank computes the same permutation from the seed, so no
//! communication is needed). Model: `balanced`, which cuts layers into contiguous
//! stages minimising the largest stage cost (an exact dynamic programme).

use std::ops::Range;

use serde::Deserialize;
use sheaf_core::{
    chunk_range, DataPartitioner, Error, ModelPartitioner, PluginKind, Provided, Result, SplitMix64,
};

/// The plugin as exported to the host.
pub struct PartitionPlugin;

impl sheaf_abi::Plugin for PartitionPlugin {
    const NAME: &'static str = "sheaf-partition";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn provides() -> Vec<Provided> {
        let data = ["contiguous", "strided", "shuffle"]
            .map(|n| Provided { kind: PluginKind::DataPartitioner, name: n.into() });
        let model = Provided { kind: PluginKind::ModelPartitioner, name: "balanced".into() };
        data.into_iter().chain([model]).collect()
    }

    fn data_partitioner(name: &str, config: &str) -> Result<Box<dyn DataPartitioner>> {
        new_data_partitioner(name, config)
    }

    fn model_partitioner(name: &str, config: &str) -> Result<Box<dyn ModelPartitioner>> {
        new_model_partitioner(name, config)
    }
}

sheaf_abi::export_plugin!(PartitionPlugin);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ShuffleConfig {
    seed: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoConfig {}

fn parse<T: serde::de::DeserializeOwned>(name: &str, config: &str) -> Result<T> {
    let config = if config.trim().is_empty() { "{}" } else { config };
    let de = &mut serde_json::Deserializer::from_str(config);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let key =
            if path == "." { format!("partitioner {name}") } else { format!("partitioner {name}: {path}") };
        Error::config(key, e.into_inner())
    })
}

pub fn new_data_partitioner(name: &str, config: &str) -> Result<Box<dyn DataPartitioner>> {
    match name {
        "contiguous" => {
            parse::<NoConfig>(name, config).map(|_| Box::new(Contiguous) as Box<dyn DataPartitioner>)
        }
        "strided" => parse::<NoConfig>(name, config).map(|_| Box::new(Strided) as Box<dyn DataPartitioner>),
        "shuffle" => parse::<ShuffleConfig>(name, config).map(|c| Box::new(Shuffle { seed: c.seed }) as _),
        other => Err(Error::config(
            "data.partitioner",
            format!("unknown data partitioner `{other}` (sheaf-partition has contiguous, strided, shuffle)"),
        )),
    }
}

pub fn new_model_partitioner(name: &str, config: &str) -> Result<Box<dyn ModelPartitioner>> {
    match name {
        "balanced" => {
            parse::<NoConfig>(name, config).map(|_| Box::new(Balanced) as Box<dyn ModelPartitioner>)
        }
        other => Err(Error::config(
            "parallel.partitioner",
            format!("unknown model partitioner `{other}` (sheaf-partition has balanced)"),
        )),
    }
}

fn check_rank(rank: usize, world: usize) -> Result<()> {
    if world == 0 || rank >= world {
        return Err(Error::invalid(format!("rank {rank} outside a world of {world}")));
    }
    Ok(())
}

/// Rank r takes the r-th of `world` balanced contiguous blocks.
pub struct Contiguous;

impl DataPartitioner for Contiguous {
    fn shard(&self, _epoch: u64, n: usize, rank: usize, world: usize) -> Result<Vec<usize>> {
        check_rank(rank, world)?;
        Ok(chunk_range(n, world, rank).collect())
    }
}

/// Rank r takes indices r, r + world, r + 2 world, ...
pub struct Strided;

impl DataPartitioner for Strided {
    fn shard(&self, _epoch: u64, n: usize, rank: usize, world: usize) -> Result<Vec<usize>> {
        check_rank(rank, world)?;
        Ok((rank..n).step_by(world).collect())
    }
}

/// A permutation of `0..n` drawn from `(seed, epoch)`, cut into balanced blocks.
pub struct Shuffle {
    pub seed: u64,
}

impl Shuffle {
    /// The epoch's permutation.
    pub fn permutation(&self, epoch: u64, n: usize) -> Vec<usize> {
        SplitMix64::new(self.seed ^ epoch.wrapping_mul(0xA076_1D64_78BD_642F)).permutation(n)
    }
}

impl DataPartitioner for Shuffle {
    fn shard(&self, epoch: u64, n: usize, rank: usize, world: usize) -> Result<Vec<usize>> {
        check_rank(rank, world)?;
        Ok(self.permutation(epoch, n)[chunk_range(n, world, rank)].to_vec())
    }
}

/// Contiguous stages minimising the cost of the most expensive one; ties go to the
/// cut that puts more layers in earlier stages.
pub struct Balanced;

impl ModelPartitioner for Balanced {
    fn cut(&self, costs: &[u64], stages: usize) -> Result<Vec<Range<usize>>> {
        let layers = costs.len();
        if stages == 0 {
            return Err(Error::config("parallel.options.pipeline.stages", "needs at least one stage"));
        }
        if stages > layers {
            return Err(Error::config(
                "parallel.options.pipeline.stages",
                format!("{stages} stages but the model has only {layers} layers"),
            ));
        }
        let prefix: Vec<u64> = std::iter::once(0)
            .chain(costs.iter().scan(0u64, |s, &c| {
                *s = s.saturating_add(c);
                Some(*s)
            }))
            .collect();
        let cost = |a: usize, b: usize| prefix[b] - prefix[a];
        // best[s][i]: the least possible maximum stage cost of layers 0..i in s stages.
        let mut best = vec![vec![u64::MAX; layers + 1]; stages + 1];
        let mut cut_at = vec![vec![0usize; layers + 1]; stages + 1];
        best[0][0] = 0;
        for s in 1..=stages {
            for i in s..=layers - (stages - s) {
                for j in (s - 1..i).rev() {
                    if best[s - 1][j] == u64::MAX {
                        continue;
                    }
                    let c = best[s - 1][j].max(cost(j, i));
                    if c < best[s][i] {
                        best[s][i] = c;
                        cut_at[s][i] = j;
                    }
                }
            }
        }
        let mut ranges = Vec::with_capacity(stages);
        let mut end = layers;
        for s in (1..=stages).rev() {
            let start = cut_at[s][end];
            ranges.push(start..end);
            end = start;
        }
        ranges.reverse();
        Ok(ranges)
    }
}

#[cfg(test)]
mod tests;
