//! Sheaf plugin: Megatron-style tensor-parallel training, optionally data-parallel
//! across tensor-parallel groups.
//!
//! The world of `D x T` ranks is `D` groups of `T`: rank `d * T + t` holds slice `t`
//! of every layer (the host builds the piece): in each pair of layers the first is
//! split by output rows (column-parallel), the second by input columns (row-parallel),
//! so each rank holds about `1/T` of each large weight matrix; an unpaired last layer
//! and the row layers' biases are whole on every rank. Every rank of a group sees the
//! same samples. The model runs in segments: after a pair's forward the partial
//! outputs are summed with an allreduce over the group (Megatron's `g`), and in the
//! backward pass the partial gradients with respect to the pair's input are summed the
//! same way (`f`), so replicated parameters get the same gradient on every rank.
//! Groups share each global batch through the data partitioner and sum their
//! gradients (scaled by `1 / global batch`) with an allreduce among the ranks holding
//! the same slice: the step one process takes on the whole batch.

use std::time::{Duration, Instant};

use serde::Deserialize;
use sheaf_core::{
    Communicator, Deadline, Error, Model, Piece, PlanInput, PluginKind, Provided, RankPlan, Result, Strategy,
    StrategyPlan, TrainContext, TrainSummary,
};
use sheaf_train::{
    backward_segments, check_piece_zero_stage, forward_segments, mean_loss, prefetched_steps, test_totals,
    zero_release, Mesh, Passes, Prefetch, ReplicaStep, RunTally, Shards, StageInput, StepDone, Whole,
};

/// The plugin as exported to the host.
pub struct TensorParallelPlugin;

impl sheaf_abi::Plugin for TensorParallelPlugin {
    const NAME: &'static str = "sheaf-strategy-tensor-parallel";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn provides() -> Vec<Provided> {
        vec![Provided { kind: PluginKind::Strategy, name: "tensor-parallel".into() }]
    }

    fn strategy(name: &str, config: &str) -> Result<Box<dyn Strategy>> {
        if name != "tensor-parallel" {
            return Err(Error::config(
                "parallel.strategy",
                format!("unknown strategy `{name}` (this plugin has tensor-parallel)"),
            ));
        }
        Ok(Box::new(TensorParallel { config: TensorParallelConfig::parse(config)? }))
    }
}

sheaf_abi::export_plugin!(TensorParallelPlugin);

/// Settings, as JSON: `[parallel.options.tensor-parallel]`, `parallel.data` and the
/// host's deadline.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TensorParallelConfig {
    /// Deadline of each collective, in milliseconds.
    pub timeout_ms: u64,
    /// Ranks per tensor-parallel group (`T`; default: the world over `data`).
    pub width: Option<usize>,
    /// Groups, each training on its share of every global batch (`D`; default 1).
    pub data: Option<usize>,
    /// ZeRO stage across the `D` groups: 0, or 1 (the ranks holding the same slice in
    /// different groups shard its optimizer state: gradients reduce-scattered among
    /// them, each steps its chunk, the parameters allgathered).
    pub zero: u8,
}

impl Default for TensorParallelConfig {
    fn default() -> Self {
        TensorParallelConfig { timeout_ms: 60_000, width: None, data: None, zero: 0 }
    }
}

impl TensorParallelConfig {
    pub fn parse(json: &str) -> Result<TensorParallelConfig> {
        if json.trim().is_empty() {
            return Ok(TensorParallelConfig::default());
        }
        let c: TensorParallelConfig =
            serde_json::from_str(json).map_err(|e| Error::config("parallel.options.tensor-parallel", e))?;
        if c.width == Some(0) || c.data == Some(0) {
            return Err(Error::config(
                "parallel.options.tensor-parallel",
                "width and data must be at least 1",
            ));
        }
        check_piece_zero_stage("parallel.options.tensor-parallel.zero", c.zero)?;
        Ok(c)
    }

    /// `(D, T)` over `world` ranks.
    pub fn layout(&self, world: usize) -> Result<(usize, usize)> {
        let data = self.data.unwrap_or(1);
        let width = self.width.unwrap_or(world / data.max(1));
        if data * width != world || width == 0 {
            return Err(Error::config(
                "parallel.options.tensor-parallel.width",
                format!(
                    "{data} groups of {width} tensor-parallel ranks need {} ranks, not {world}",
                    data * width
                ),
            ));
        }
        Ok((data, width))
    }
}

struct TensorParallel {
    config: TensorParallelConfig,
}

impl TensorParallel {
    fn deadline(&self) -> Deadline {
        Deadline::after(Duration::from_millis(self.config.timeout_ms))
    }
}

/// Who evaluates and how: group 0 runs the test set forward in batches, its rank 0
/// scores.
struct Eval<'a> {
    group: &'a dyn Communicator,
    evaluating: bool,
    scoring: bool,
    batch: usize,
}

impl TensorParallel {
    /// `[loss sum, correct, predictions]` of this rank's part of an evaluation.
    fn evaluate(
        &self,
        eval: &Eval<'_>,
        model: &mut dyn Model,
        test: &dyn sheaf_core::Dataset,
        passes: &mut Passes<'_>,
    ) -> Result<[f64; 3]> {
        let mut totals = [0.0f64; 3];
        // Every rank asks before each of the evaluating ranks' passes.
        let rounds = test.len().div_ceil(eval.batch.max(1));
        if !eval.evaluating {
            passes.pad(0, rounds)?;
            return Ok(totals);
        }
        let all: Vec<usize> = (0..test.len()).collect();
        for (k, chunk) in all.chunks(eval.batch.max(1)).enumerate() {
            passes.ask()?;
            let samples = test.gather(chunk)?;
            let targets = samples.targets();
            let id = u64::MAX / 2 + k as u64;
            let logits = forward_segments(
                eval.group,
                model,
                &mut Whole,
                id,
                StageInput::Samples(&samples),
                chunk.len(),
                self.deadline(),
            )?;
            model.drop_saved();
            let (l, c, _) = model.loss_grad(&logits, &targets, 0.0)?;
            if eval.scoring {
                totals = [totals[0] + l, totals[1] + c as f64, totals[2] + targets.len() as f64];
            }
        }
        Ok(totals)
    }
}

impl Strategy for TensorParallel {
    fn name(&self) -> &str {
        "tensor-parallel"
    }

    /// `D` groups of `T` (rank `d * T + t` holds slice `t` of every block); every rank
    /// keeps its group's share of the batch in flight.
    fn plan(&self, input: &PlanInput<'_>) -> Result<StrategyPlan> {
        let (data, width) = self.config.layout(input.world)?;
        let share = input.batch_size.div_ceil(data) as u64;
        let ranks = (0..input.world)
            .map(|r| RankPlan {
                piece: Piece { blocks: 0..input.blocks.len(), tensor_rank: r % width, tensor_width: width },
                activation_samples: share,
                // ZeRO 1: the slice's optimizer state sharded over its D replicas.
                state_shards: if self.config.zero >= 1 { data as u64 } else { 1 },
                param_shard: None,
            })
            .collect();
        Ok(StrategyPlan { ranks, stage_interface: true })
    }

    fn train(&mut self, ctx: TrainContext<'_>) -> Result<TrainSummary> {
        let TrainContext { config, comm, model, optimizer, partitioner, train, test, metrics, checkpoints } =
            ctx;
        let total_steps = config.total_steps(train.len());
        let (groups, width) = self.config.layout(comm.world_size())?;
        if config.batch_size == 0 || train.is_empty() {
            return Err(Error::config(
                "train.batch_size",
                "needs a batch of at least 1 and training samples",
            ));
        }
        let piece = model.piece().ok_or_else(|| {
            Error::Unsupported(
                "the tensor-parallel strategy needs a model piece per rank (built by the host)".into(),
            )
        })?;
        let mesh = Mesh::split(comm, groups, width, "tensor-parallel ranks", self.deadline())?;
        let (d, t, group) = (mesh.replica, mesh.model_rank, mesh.model.as_ref());
        if piece.tensor_width != width || piece.tensor_rank != t {
            return Err(Error::BadState(format!(
                "rank {} holds tensor slice {} of {}, expected {t} of {width}",
                comm.rank(),
                piece.tensor_rank,
                piece.tensor_width
            )));
        }
        let layout = model.layout().clone();
        let mut params = mesh.sync_replicas(model, self.deadline())?;

        let replicated = model.replicated_params();
        let eval = Eval { group, evaluating: d == 0, scoring: t == 0, batch: config.batch_size.max(1) };

        let mut tally = RunTally::new(&config);
        // The validation split's accuracy and mean loss over the world.
        let validate = |model: &mut dyn Model, passes: &mut Passes<'_>| {
            test_totals(comm, self.evaluate(&eval, model, test, passes)?, self.deadline())
        };
        let mut grads = vec![0f32; layout.total()];
        // ZeRO 1 across the groups: this replica's chunk of the slice, one bucket.
        let shards = (self.config.zero >= 1)
            .then(|| Shards::new(&layout, std::slice::from_ref(&(0..layout.total())), d, groups));
        let mut shard_grads = vec![0f32; shards.as_ref().map_or(0, Shards::len)];
        // A resumed run goes on from its checkpoint's step.
        let mut micro = config.start_micro_step();
        let mut peak = 0u64;
        // The group's share of each micro-step, asked of the loader thread a step ahead
        // (none for an empty share).
        let mut asked = config.start_micro_step();
        let ask = |loader: &mut Prefetch, batches: &[(u64, Vec<usize>)]| -> Result<Vec<bool>> {
            let mut asked_for = Vec::with_capacity(batches.len());
            for (_, global) in batches {
                let share = partitioner.shard(asked, global.len(), d, groups)?;
                asked += 1;
                asked_for.push(!share.is_empty());
                if !share.is_empty() {
                    loader.request(share.into_iter().map(|i| global[i]).collect())?;
                }
            }
            Ok(asked_for)
        };
        prefetched_steps(train, &config, ask, |loader, batches, asked_for| {
            let t0 = Instant::now();
            let group_samples: usize = batches.iter().map(|(_, g)| g.len()).sum();
            let mut loss = [0.0f64; 2];
            for samples_asked in asked_for {
                if samples_asked {
                    let samples = loader.take()?;
                    let targets = samples.targets();
                    let logits = forward_segments(
                        group,
                        model,
                        &mut Whole,
                        micro,
                        StageInput::Samples(&samples),
                        samples.len(),
                        self.deadline(),
                    )?;
                    peak = peak.max(model.saved_bytes());
                    // Every sample makes the same number of predictions.
                    let per_sample = targets.len() / samples.len();
                    let scale = 1.0 / (group_samples * per_sample).max(1) as f32;
                    let (loss_sum, _, grad) = model.loss_grad(&logits, &targets, scale)?;
                    backward_segments(group, model, &mut Whole, micro, grad, self.deadline())?;
                    if t == 0 {
                        loss = [loss[0] + loss_sum, loss[1] + targets.len() as f64];
                    }
                }
                micro += 1;
            }
            model.take_grads(&mut grads)?;
            // The whole model's norm: the group's slices, replicated parameters counted
            // once (by tensor rank 0); the gradients summed over the groups (or, under
            // ZeRO 1, reduce-scattered among them, each stepping its chunk).
            optimizer.set_learning_rate(config.lr.at(tally.steps(), total_steps));
            let deadline = || self.deadline();
            let replica_step = ReplicaStep {
                replicas: mesh.replicas.as_ref(),
                model_groups: &[group],
                clip: config.grad_clip,
                deadline: &deadline,
            };
            let sharded = shards.as_ref().map(|s| (s, &mut shard_grads[..]));
            let skip = |i: usize| t != 0 && replicated[i];
            let grad_norm = params
                .update(model, |p| replica_step.run(&layout, &mut grads, sharded, skip, optimizer, p))?;
            // Refilled by the next step's `take_grads`: until then its pages go back
            // to the kernel, so the model's accumulator and this copy are never both
            // resident.
            zero_release(&mut grads);
            zero_release(&mut shard_grads);
            let done = StepDone {
                epoch: batches.last().map_or(0, |(e, _)| *e),
                loss: mean_loss(comm, loss, self.deadline())?,
                grad_norm,
                samples: group_samples,
                started: t0,
            };
            tally.end_step(done, metrics, checkpoints, model, optimizer, validate)?;
            Ok(())
        })?;
        let gradient_bytes = 4 * (grads.len() + shard_grads.len()) as u64;
        let summary = tally.summary(train.len(), model, optimizer, gradient_bytes, validate)?;
        Ok(TrainSummary { peak_activation_bytes: peak, ..summary })
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod config_tests {
    use super::TensorParallelConfig;

    /// ZeRO across the groups: stage 1 is taken, stage 2 is refused with the reason
    /// (nothing to save), and no other stage exists.
    #[test]
    fn zero_stages_across_groups_are_checked() {
        assert_eq!(TensorParallelConfig::parse(r#"{"zero": 1, "data": 2}"#).unwrap().zero, 1);
        let e = TensorParallelConfig::parse(r#"{"zero": 2}"#).unwrap_err().to_string();
        assert!(e.contains("parallel.options.tensor-parallel.zero") && e.contains("saves nothing"), "{e}");
        let e = TensorParallelConfig::parse(r#"{"zero": 3}"#).unwrap_err().to_string();
        assert!(e.contains("no ZeRO stage 3"), "{e}");
    }
}
