//! Sheaf plugin: data-parallel training.
//!
//! Every rank holds the whole model. Rank 0's initial parameters are broadcast; each
//! epoch's sample order is a permutation drawn from the seed (the same on every rank
//! and at every world size); each global batch of `batch_size` samples is split among
//! the ranks by the data partitioner; each rank's mean gradient is weighted by its
//! share of the batch and the gradients (with the loss riding along) are summed with
//! one allreduce, so every rank holds the gradient of the mean loss over the whole
//! global batch: the same as one process training on that batch. Every rank then takes
//! the same optimizer step. A parameter checksum compared across ranks every
//! `checksum_every` steps and at the end turns any desync into an error.
//!
//! The training loop: `grad_accum` micro-steps (global batches) per optimizer step,
//! their gradients weighted by their share of the step's samples and reduced once;
//! the summed gradient clipped to `grad_clip` by its global norm (every rank holds the
//! whole gradient, so the norm is local); the learning rate of the step from the
//! schedule; validation every `eval_every` steps.
//!
//! ZeRO (`zero = 1` or `2`, see `zero`): each rank keeps and steps only its chunks of
//! every bucket; stage 2 also reduce-scatters each bucket as the backward pass finishes
//! it, so no full-size sum of the gradients is held.

mod buckets;
mod zero;
mod zero3;

use std::time::{Duration, Instant};

pub use buckets::{buckets, GradDType};
use buckets::{Backward, Exchange};

use serde::Deserialize;
use sheaf_core::{
    Communicator, DType, DataPartitioner, Dataset, Deadline, Error, Model, PlanInput, PluginKind, Provided,
    ReduceOp, Result, Strategy, StrategyPlan, TrainContext, TrainSummary,
};
use sheaf_train::{
    clip_to, evaluate_passes, most_passes, prefetched_steps, sum_of_squares, test_totals, ModelParams,
    Passes, Prefetch, RunTally, Shards, StepDone,
};

/// The plugin as exported to the host.
pub struct DataParallelPlugin;

impl sheaf_abi::Plugin for DataParallelPlugin {
    const NAME: &'static str = "sheaf-strategy-data-parallel";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn provides() -> Vec<Provided> {
        vec![Provided { kind: PluginKind::Strategy, name: "data-parallel".into() }]
    }

    fn strategy(name: &str, config: &str) -> Result<Box<dyn Strategy>> {
        if name != "data-parallel" {
            return Err(Error::config(
                "parallel.strategy",
                format!("unknown strategy `{name}` (this plugin has data-parallel)"),
            ));
        }
        Ok(Box::new(DataParallel::new(DataParallelConfig::parse(config)?)))
    }
}

sheaf_abi::export_plugin!(DataParallelPlugin);

/// Settings, as JSON.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataParallelConfig {
    /// Deadline of each collective, in milliseconds.
    pub timeout_ms: u64,
    /// Compare parameter checksums across ranks every this many steps (0: only at the end).
    pub checksum_every: u64,
    /// Replicas: every rank is one, so this must be the world size when set.
    pub data: Option<usize>,
    /// Gradient bucket size in MiB: each bucket is allreduced as soon as the backward
    /// pass has finished it, while the pass goes on (the first bucket 1 MiB at most).
    pub bucket_mb: f64,
    /// Whether the buckets' exchanges run on a communication thread while the backward
    /// pass goes on (true), or on the training thread as each bucket is finished, the
    /// pass waiting (false). Left out: [`overlap_by_default`].
    pub overlap: Option<bool>,
    /// Gradients on the wire: `f32`, or `bf16` (half the bytes).
    pub grad_dtype: GradDType,
    /// ZeRO stage: 0 (every rank holds the whole optimizer state), 1 (the optimizer
    /// state sharded: gradients reduce-scattered, each rank steps its shard, the
    /// parameters allgathered) or 2 (the reduced gradients sharded too: each bucket is
    /// reduce-scattered as the backward pass finishes it, and no full-size reduced
    /// gradient is held), or 3 (the parameters sharded too: each rank holds its rows
    /// of every parameter and gathers each unit of the model just before it runs it;
    /// see `zero3`).
    pub zero: u8,
    /// Over which ranks ZeRO stage 3 shards the parameters: `world` (all of them), or
    /// `host` (the ranks of each host, `LOCAL_WORLD_SIZE` of them, the hosts holding
    /// replicas of one another: HSDP), so the gathers stay inside a host.
    pub zero_scope: ZeroScope,
    /// Under ZeRO stage 3: whether a unit's gathered parameters go as soon as the model
    /// has run it (true, the default, FSDP2's: two gathers a unit a micro-batch), or
    /// stay until the optimizer changes the rows (one gather a unit a step, the model
    /// held whole while it trains).
    pub reshard_after_forward: bool,
}

/// See [`DataParallelConfig::zero_scope`].
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ZeroScope {
    #[default]
    World,
    Host,
}

impl Default for DataParallelConfig {
    fn default() -> Self {
        DataParallelConfig {
            timeout_ms: 60_000,
            checksum_every: 50,
            data: None,
            bucket_mb: 25.0,
            overlap: None,
            grad_dtype: GradDType::F32,
            zero: 0,
            zero_scope: ZeroScope::World,
            reshard_after_forward: true,
        }
    }
}

impl DataParallelConfig {
    pub fn parse(json: &str) -> Result<DataParallelConfig> {
        if json.trim().is_empty() {
            return Ok(DataParallelConfig::default());
        }
        let config: DataParallelConfig =
            serde_json::from_str(json).map_err(|e| Error::config("parallel.options.data-parallel", e))?;
        if !(config.bucket_mb.is_finite() && config.bucket_mb > 0.0) {
            return Err(Error::config(
                "parallel.options.data-parallel.bucket_mb",
                format!("must be a positive number of MiB, not {}", config.bucket_mb),
            ));
        }
        if config.zero_scope == ZeroScope::Host && config.zero != 3 {
            return Err(Error::config(
                "parallel.options.data-parallel.zero_scope",
                "shards parameters within each host, which only ZeRO stage 3 does (zero = 3)",
            ));
        }
        if !config.reshard_after_forward && config.zero != 3 {
            return Err(Error::config(
                "parallel.options.data-parallel.reshard_after_forward",
                "applies to zero = 3 only (the parameters sharded by rows)",
            ));
        }
        match config.zero {
            0..=3 => Ok(config),
            n => Err(Error::config(
                "parallel.options.data-parallel.zero",
                format!("no ZeRO stage {n} (0, 1, 2 or 3)"),
            )),
        }
    }

    fn overlap(&self) -> bool {
        self.overlap.unwrap_or_else(|| {
            let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            overlap_by_default(cores, var("RAYON_NUM_THREADS"), var("LOCAL_WORLD_SIZE"), var("WORLD_SIZE"))
        })
    }

    /// The ranks ZeRO stage 3 shards the parameters over in a world of `world`: all of
    /// them, or each host's (`LOCAL_WORLD_SIZE`, as every launcher sets it; the whole
    /// world where it is not set, as on one host).
    fn shard_count(&self, world: usize) -> Result<usize> {
        let local = std::env::var("LOCAL_WORLD_SIZE").ok().and_then(|v| v.parse::<usize>().ok());
        self.shard_count_of(world, local)
    }

    /// [`DataParallelConfig::shard_count`] with `local` ranks per host, where said.
    fn shard_count_of(&self, world: usize, local: Option<usize>) -> Result<usize> {
        if self.zero_scope == ZeroScope::World {
            return Ok(world);
        }
        match local.unwrap_or(world) {
            n if n > 0 && world.is_multiple_of(n) => Ok(n),
            n => Err(Error::config(
                "parallel.options.data-parallel.zero_scope",
                format!(
                    "hosts of {n} ranks cannot hold replicas of a world of {world}: give every host as many"
                ),
            )),
        }
    }

    fn bucket_bytes(&self) -> usize {
        (self.bucket_mb * 1024.0 * 1024.0) as usize
    }
}

/// Whether buckets are exchanged on a communication thread, overlapped with the backward
/// pass, when the job does not say: where it can gain anything. A worker computes on
/// `threads` of the machine's `cores` (`RAYON_NUM_THREADS`), beside the other workers
/// of its host (`local`, `LOCAL_WORLD_SIZE`, as the launcher and torchrun set them) of
/// `world` in all.
///
/// Over shared memory or loopback TCP an exchange is the CPU's own work (copies and
/// sums), so it only overlaps on a core no compute thread uses; on a machine whose
/// cores all compute, the thread takes its time from the backward pass and the two
/// ranks' exchanges wait on each other's preempted threads. Measured on a 2-core
/// machine, the reference MLP at 2 x 1 trained 11-13% faster over shm and 17% faster
/// over zmq-tcp without the thread (medians of 8-10 interleaved pairs); the reference
/// GPT, with less to exchange per product, the same either way. So: a thread when a
/// core is spare, or when the world spans hosts (a network's transfer time is not the
/// CPU's), or when the layout is not known (DDP's choice).
pub fn overlap_by_default(
    cores: usize,
    threads: Option<usize>,
    local: Option<usize>,
    world: Option<usize>,
) -> bool {
    match local {
        None => true,
        Some(local) => world.is_some_and(|w| w > local) || cores > threads.unwrap_or(cores).max(1) * local,
    }
}

pub struct DataParallel {
    config: DataParallelConfig,
}

impl DataParallel {
    pub fn new(config: DataParallelConfig) -> DataParallel {
        DataParallel { config }
    }

    fn deadline(&self) -> Deadline {
        Deadline::after(Duration::from_millis(self.config.timeout_ms))
    }
}

/// What asks the loader thread for this rank's share of each micro-batch of a step
/// (`asked` counts the micro-batches asked for, as the partitioner numbers them: from
/// the resumed run's first).
fn ask_shares(
    partitioner: &dyn DataPartitioner,
    mut asked: u64,
    rank: usize,
    world: usize,
) -> impl FnMut(&mut Prefetch, &[(u64, Vec<usize>)]) -> Result<()> + '_ {
    move |loader, group| {
        for (_, global) in group {
            let mine = partitioner.shard(asked, global.len(), rank, world)?;
            asked += 1;
            loader.request(mine.into_iter().map(|i| global[i]).collect())?;
        }
        Ok(())
    }
}

/// An order-sensitive hash of the parameters' bits (FNV-1a over each value's bits),
/// and its two 32-bit halves as exact f64 values, so that max and min over ranks
/// compare them bit for bit.
fn checksum(params: &[f32]) -> (u64, [f64; 2]) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in params {
        h = (h ^ u64::from(v.to_bits())).wrapping_mul(0x100_0000_01b3);
    }
    (h, [(h >> 32) as f64, (h & 0xffff_ffff) as f64])
}

/// Checks that every rank holds bit-identical parameters: each rank's checksum (an
/// order-sensitive hash of the bits) must equal the maximum and the minimum over ranks.
fn check_in_sync(comm: &dyn Communicator, params: &[f32], step: u64, dl: Deadline) -> Result<()> {
    let (h, mine) = checksum(params);
    let mut max = mine;
    let mut min = mine;
    comm.allreduce(bytemuck::cast_slice_mut(&mut max), DType::F64, ReduceOp::Max, dl)?;
    comm.allreduce(bytemuck::cast_slice_mut(&mut min), DType::F64, ReduceOp::Min, dl)?;
    if max != mine || min != mine {
        return Err(Error::BadState(format!(
            "data-parallel ranks diverged by step {step}: rank {} has parameter checksum {h:016x}, others differ",
            comm.rank()
        )));
    }
    Ok(())
}

impl Strategy for DataParallel {
    fn name(&self) -> &str {
        "data-parallel"
    }

    fn plan(&self, input: &PlanInput<'_>) -> Result<StrategyPlan> {
        if let Some(data) = self.config.data.filter(|&d| d != input.world) {
            return Err(Error::config(
                "parallel.data",
                format!(
                    "data-parallel keeps a replica per rank: {data} replicas need {data} ranks, not {}",
                    input.world
                ),
            ));
        }
        let plan = StrategyPlan::replicas(input.world, input.blocks.len(), input.batch_size);
        // ZeRO stages 1 and 2: each replica keeps its chunk of every bucket's optimizer
        // state; stage 3 its rows of every parameter (and their state).
        Ok(match self.config.zero {
            0 => plan,
            3 => plan.with_param_shards(self.config.shard_count(input.world)?),
            _ => plan.with_state_shards(input.world as u64),
        })
    }

    /// ZeRO stage 2 holds no full-size sum: its chunk of the reduced gradients, and
    /// for a model that writes its backward steps into windows (the CPU's fused
    /// models; the plan assumes one, a step being at most a block) a buffer of a bucket
    /// and a step beside the buckets on their way, as `train` sizes them. Other stages:
    /// the host's reckoning.
    /// ZeRO stage 3 keeping its gathered units through the step holds its rows and,
    /// while it trains, the whole model's parameters.
    fn planned_parameter_bytes(&self, input: &PlanInput<'_>) -> Result<Option<Vec<u64>>> {
        if self.config.zero != 3 || self.config.reshard_after_forward {
            return Ok(None);
        }
        let total = input.blocks.iter().map(|b| b.params).sum::<u64>();
        let rows = total.div_ceil(self.config.shard_count(input.world)? as u64);
        Ok(Some(vec![4 * (total + rows); input.world]))
    }

    fn planned_gradient_bytes(&self, input: &PlanInput<'_>) -> Result<Option<Vec<u64>>> {
        if self.config.zero != 2 {
            return Ok(None);
        }
        let total = input.blocks.iter().map(|b| b.params as usize).sum::<usize>();
        let step = input.blocks.iter().map(|b| b.params as usize).max().unwrap_or(0);
        let per_bucket = (self.config.bucket_bytes() / 4).max(1);
        let largest = per_bucket.min(total);
        let threaded = input.world > 1 && self.config.overlap();
        let (held, in_flight) =
            buckets::window_sizes(total, largest, total.div_ceil(per_bucket), step, threaded);
        let buffer = if held + in_flight < total { held + in_flight } else { total };
        let shard = total.div_ceil(input.world.max(1));
        Ok(Some(vec![4 * (shard + buffer) as u64; input.world]))
    }

    fn train(&mut self, ctx: TrainContext<'_>) -> Result<TrainSummary> {
        if self.config.zero == 3 {
            return self.train_sharded(ctx);
        }
        let TrainContext { config, comm, model, optimizer, partitioner, train, test, metrics, checkpoints } =
            ctx;
        let (rank, world) = (comm.rank(), comm.world_size());
        if config.batch_size == 0 {
            return Err(Error::config("train.batch_size", "must be at least 1"));
        }
        if train.is_empty() {
            return Err(Error::config("data.dataset", "the training set is empty"));
        }
        let layout = model.layout().clone();
        let total = layout.total();
        // Stepped in the model's own buffer where it lends it; otherwise a copy.
        let mut params = ModelParams::synced(model, comm, self.deadline())?;

        let total_steps = config.total_steps(train.len());
        let stage = self.config.zero;
        // The step's gradient sums then its loss, reduced together (none under ZeRO
        // stage 2, which sums each rank's chunks straight into `shard_grads`); a step
        // of one micro-batch writes its gradients into them directly, so a buffer for
        // each micro-batch's own is needed only with accumulation or stage 2.
        let mut reduced = vec![0f32; if stage >= 2 { 0 } else { total + 1 }];
        let buckets = buckets(&layout, self.config.bucket_bytes());
        let stepped = model.backward_in_steps();
        let exchange = Exchange {
            comm,
            buckets: &buckets,
            wire: self.config.grad_dtype,
            timeout: Duration::from_millis(self.config.timeout_ms),
            overlap: self.config.overlap(),
        };
        // Under stage 2, a model that writes each backward step into a window fills a
        // buffer of a bucket and a step (`held`, besides the copies of buckets on their
        // way) instead of a full-size one (`grads`), where that holds fewer values.
        let window = model
            .backward_window()
            .filter(|_| stage >= 2 && stepped)
            .map(|step| exchange.window_sizes(step))
            .filter(|(held, in_flight)| held + in_flight < total);
        let (mut held, in_flight) = match window {
            Some((held, in_flight)) => (vec![0f32; held], in_flight),
            None => (Vec::new(), 0),
        };
        let full = (stage >= 2 && window.is_none()) || (stage < 2 && config.grad_accum > 1);
        let mut grads = vec![0f32; if full { total } else { 0 }];
        // Stage 1 reduce-scatters the full-size sum into its own front (buckets taken
        // in increasing order for that), stage 2 into a shard of its own.
        let mut ascending = buckets.clone();
        ascending.sort_by_key(|b| b.start);
        let shards = match stage {
            0 => None,
            1 => Some(Shards::new(&layout, &ascending, rank, world)),
            _ => Some(Shards::new(&layout, &buckets, rank, world)),
        };
        let mut shard_grads = vec![0f32; if stage >= 2 { shards.as_ref().map_or(0, Shards::len) } else { 0 }];
        let gradient_bytes =
            4 * (grads.len() + reduced.len() + shard_grads.len() + held.len() + in_flight) as u64;
        // A resumed run goes on from its checkpoint's step (the host restored the
        // parameters and optimizer state; `optimizer_steps` starts after it).
        let mut tally = RunTally::new(&config);
        let validate = |model: &mut dyn Model, passes: &mut Passes<'_>| {
            self.evaluate(comm, model, partitioner, test, config.batch_size, passes)
        };
        // The next step's samples are gathered while this one trains.
        let ask = ask_shares(partitioner, config.start_micro_step(), rank, world);
        prefetched_steps(train, &config, ask, |loader, group, ()| {
            let t0 = Instant::now();
            // Every micro-step's mean gradient weighted by its share of the samples of
            // the whole optimizer step: the gradient of the mean loss over all of them.
            let group_samples: usize = group.iter().map(|(_, g)| g.len()).sum();
            // Sums start at zero; a step of one micro-batch writes every gradient
            // over the old ones (a model writes all of its gradients, as ZeRO
            // stage 2's buffer relies on too), so only its loss slot is reset.
            if let Some((slot, sums)) = reduced.split_last_mut() {
                *slot = 0.0;
                if group.len() > 1 {
                    sums.fill(0.0);
                }
            }
            shard_grads.fill(0.0);
            // This rank's share of the step's loss, under ZeRO stage 2.
            let mut scattered_loss = 0f32;
            // The reduced gradients' sum of squares, from the exchange.
            let mut squares = 0f64;
            for k in 0..group.len() {
                let local = loader.take()?;
                let share = local.len() as f32 / group_samples as f32;
                let batch = local.batch();
                let backward = if stepped { Backward::Stepped(&batch) } else { Backward::Whole(&batch) };
                if let (Some(shards), true) = (&shards, stage >= 2) {
                    // Every micro-batch's buckets are reduce-scattered as they finish.
                    let loss = if window.is_some() {
                        exchange.scatter_windowed(
                            model,
                            &mut held,
                            shards,
                            &mut shard_grads,
                            share,
                            &batch,
                        )?
                    } else {
                        exchange.scatter(model, &mut grads, shards, &mut shard_grads, share, backward)?
                    };
                    scattered_loss += loss * share;
                    continue;
                }
                let only = group.len() == 1;
                if k + 1 < group.len() || shards.is_some() {
                    // An earlier micro-batch of the step (or any under ZeRO stage 1,
                    // which reduce-scatters after the pass): sum, nothing to send.
                    let loss = if only {
                        let loss = model.forward_backward(&batch, &mut reduced[..total])?;
                        reduced[..total].iter_mut().for_each(|g| *g *= share);
                        loss
                    } else {
                        let loss = model.forward_backward(&batch, &mut grads)?;
                        for (r, g) in reduced.iter_mut().zip(&grads) {
                            *r += g * share;
                        }
                        loss
                    };
                    reduced[total] += loss * share;
                    continue;
                }
                // The last: its backward pass overlaps the buckets' allreduces.
                let grads = (!only).then_some(&mut grads[..]);
                squares = exchange.run(model, grads, &mut reduced, share, backward)?;
            }
            let (grad_norm, loss) = match &shards {
                None => {
                    // Every rank holds the same summed gradient, so its norm needs no
                    // talk: its squares were summed as the buckets were reduced.
                    let grad_norm = clip_to(&mut reduced[..total], squares, config.grad_clip);
                    optimizer.set_learning_rate(config.lr.at(tally.steps(), total_steps));
                    params.update(model, |p| optimizer.step(&mut layout.params(p, &reduced[..total])))?;
                    (grad_norm, f64::from(reduced[total]))
                }
                Some(shards) => {
                    let (local_loss, shard) = if stage >= 2 {
                        (scattered_loss, &mut shard_grads[..])
                    } else {
                        let (wire, loss) = (self.config.grad_dtype, reduced[total]);
                        let sums = &mut reduced[..total];
                        zero::reduce_scatter_in_place(shards, comm, sums, wire, || self.deadline())?;
                        (loss, &mut reduced[..shards.len()])
                    };
                    // The loss and the squares of every rank's chunks, summed.
                    let mut sums = [f64::from(local_loss), sum_of_squares(shard)];
                    comm.allreduce(
                        bytemuck::cast_slice_mut(&mut sums),
                        DType::F64,
                        ReduceOp::Sum,
                        self.deadline(),
                    )?;
                    let grad_norm = clip_to(shard, sums[1], config.grad_clip);
                    optimizer.set_learning_rate(config.lr.at(tally.steps(), total_steps));
                    params.update(model, |p| {
                        shards.step(optimizer, p, shard)?;
                        shards.allgather(comm, p, || self.deadline())
                    })?;
                    // As plain data parallelism reports it: rounded to f32.
                    (grad_norm, f64::from(sums[0] as f32))
                }
            };
            let step = tally.steps() + 1;
            if self.config.checksum_every > 0 && step.is_multiple_of(self.config.checksum_every) {
                params.read(model, |p| check_in_sync(comm, p, step, self.deadline()))?;
            }
            let done = StepDone {
                epoch: group.last().map_or(0, |(e, _)| *e),
                loss,
                grad_norm,
                samples: group_samples,
                started: t0,
            };
            tally.end_step(done, metrics, checkpoints, model, optimizer, validate)?;
            Ok(())
        })?;
        params.read(model, |p| check_in_sync(comm, p, tally.steps(), self.deadline()))?;
        tally.summary(train.len(), model, optimizer, gradient_bytes, validate)
    }
}

impl DataParallel {
    /// Accuracy and mean loss per prediction on the test split: each rank evaluates
    /// its share, `chunk` samples at a time, as many `passes` as the rank with the most.
    fn evaluate(
        &self,
        comm: &dyn Communicator,
        model: &mut dyn Model,
        partitioner: &dyn DataPartitioner,
        test: &dyn Dataset,
        chunk: usize,
        passes: &mut Passes<'_>,
    ) -> Result<(f64, f64)> {
        let shard = partitioner.shard(0, test.len(), comm.rank(), comm.world_size())?;
        let rounds = most_passes(comm, shard.len().div_ceil(chunk.max(1)), self.deadline())?;
        let totals = evaluate_passes(model, test, &shard, chunk, passes, rounds)?;
        test_totals(comm, totals, self.deadline())
    }
}

#[cfg(test)]
mod tests;
