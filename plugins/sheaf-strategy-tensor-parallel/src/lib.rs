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
    epoch_order, Communicator, DType, Deadline, Error, Model, PluginKind, Provided, ReduceOp, Result,
    StepMetrics, Strategy, TrainContext, TrainSummary,
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

/// Settings, as JSON.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TensorParallelConfig {
    /// Deadline of each collective, in milliseconds.
    pub timeout_ms: u64,
    /// Ranks per tensor-parallel group (`T`).
    pub tensor: usize,
    /// Groups, each training on its share of every global batch (`D`).
    pub data: usize,
}

impl Default for TensorParallelConfig {
    fn default() -> Self {
        TensorParallelConfig { timeout_ms: 60_000, tensor: 1, data: 1 }
    }
}

impl TensorParallelConfig {
    pub fn parse(json: &str) -> Result<TensorParallelConfig> {
        if json.trim().is_empty() {
            return Ok(TensorParallelConfig::default());
        }
        let c: TensorParallelConfig = serde_json::from_str(json).map_err(|e| Error::config("parallel", e))?;
        if c.tensor == 0 || c.data == 0 {
            return Err(Error::config("parallel", "tensor and data must be at least 1"));
        }
        Ok(c)
    }
}

struct TensorParallel {
    config: TensorParallelConfig,
}

fn sum_over(group: &dyn Communicator, v: &mut [f32], dl: Deadline) -> Result<()> {
    if group.world_size() > 1 {
        group.allreduce(bytemuck::cast_slice_mut(v), DType::F32, ReduceOp::Sum, dl)?;
    }
    Ok(())
}

impl TensorParallel {
    fn deadline(&self) -> Deadline {
        Deadline::after(Duration::from_millis(self.config.timeout_ms))
    }

    /// Forward through every segment, summing partial outputs over the group; returns
    /// the logits (the same on every rank of the group).
    fn forward(
        &self,
        group: &dyn Communicator,
        model: &mut dyn Model,
        micro: u64,
        inputs: &[f32],
        rows: usize,
    ) -> Result<Vec<f32>> {
        let mut act = inputs.to_vec();
        for seg in 0..model.segments() {
            act = model.stage_forward(micro, seg, &act, rows)?;
            if seg.is_multiple_of(2) && model.segments() > 1 {
                sum_over(group, &mut act, self.deadline())?;
            }
        }
        Ok(act)
    }

    /// Backward through every segment from the logits' gradient, summing partial input
    /// gradients over the group (none needed for the samples themselves).
    fn backward(
        &self,
        group: &dyn Communicator,
        model: &mut dyn Model,
        micro: u64,
        grad: Vec<f32>,
    ) -> Result<()> {
        let mut grad = grad;
        let segments = model.segments();
        for seg in (0..segments).rev() {
            grad = model.stage_backward(micro, seg, &grad)?;
            if seg.is_multiple_of(2) && seg > 0 && segments > 1 {
                sum_over(group, &mut grad, self.deadline())?;
            }
        }
        Ok(())
    }
}

impl Strategy for TensorParallel {
    fn name(&self) -> &str {
        "tensor-parallel"
    }

    fn train(&mut self, ctx: TrainContext<'_>) -> Result<TrainSummary> {
        let TrainContext { config, comm, model, optimizer, partitioner, train, test, metrics } = ctx;
        let (width, groups) = (self.config.tensor, self.config.data);
        let (rank, world) = (comm.rank(), comm.world_size());
        if width * groups != world {
            return Err(Error::config(
                "parallel",
                format!(
                    "{groups} groups of {width} tensor-parallel ranks need {} ranks, not {world}",
                    width * groups
                ),
            ));
        }
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
        let (d, t) = (rank / width, rank % width);
        if piece.tensor_width != width || piece.tensor_rank != t {
            return Err(Error::BadState(format!(
                "rank {rank} holds tensor slice {} of {}, expected {t} of {width}",
                piece.tensor_rank, piece.tensor_width
            )));
        }
        let group = comm
            .split(Some(d as u32), t as u32, self.deadline())?
            .ok_or_else(|| Error::BadState("no tensor-parallel group".into()))?;
        let replicas = comm
            .split(Some(t as u32), d as u32, self.deadline())?
            .ok_or_else(|| Error::BadState("no data-parallel group".into()))?;
        let layout = model.layout().clone();
        let mut params = vec![0f32; layout.total()];
        model.read_params(&mut params)?;
        replicas.broadcast(bytemuck::cast_slice_mut(&mut params), 0, self.deadline())?;
        model.write_params(&params)?;

        let start = Instant::now();
        let mut grads = vec![0f32; layout.total()];
        let (mut step, mut epochs_done, mut last_loss, mut samples, mut peak) =
            (0u64, 0, f64::NAN, 0usize, 0u64);
        let mut busy = Duration::ZERO;
        'epochs: for epoch in 0..config.epochs {
            let order = epoch_order(train.len(), config.seed, epoch);
            for global in order.chunks(config.batch_size) {
                if config.max_steps.is_some_and(|m| step >= m) {
                    break 'epochs;
                }
                let t0 = Instant::now();
                let share: Vec<usize> = partitioner
                    .shard(step, global.len(), d, groups)?
                    .into_iter()
                    .map(|i| global[i])
                    .collect();
                let mut loss = [0.0f64];
                if !share.is_empty() {
                    let (inputs, labels) = train.gather(&share);
                    let logits = self.forward(group.as_ref(), model, step, &inputs, share.len())?;
                    peak = peak.max(model.saved_bytes());
                    let (loss_sum, _, grad) = model.loss_grad(&logits, &labels, 1.0 / global.len() as f32)?;
                    self.backward(group.as_ref(), model, step, grad)?;
                    if t == 0 {
                        loss[0] = loss_sum;
                    }
                }
                model.take_grads(&mut grads)?;
                sum_over(replicas.as_ref(), &mut grads, self.deadline())?;
                optimizer.step(&mut layout.params(&mut params, &grads))?;
                model.write_params(&params)?;
                comm.allreduce(
                    bytemuck::cast_slice_mut(&mut loss),
                    DType::F64,
                    ReduceOp::Sum,
                    self.deadline(),
                )?;
                busy += t0.elapsed();
                step += 1;
                samples += global.len();
                last_loss = loss[0] / global.len() as f64;
                metrics.record(&StepMetrics {
                    step,
                    epoch,
                    loss: last_loss,
                    lr: optimizer.learning_rate(),
                    samples_per_sec: global.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9),
                });
            }
            epochs_done = epoch + 1;
        }
        let wall = start.elapsed().as_secs_f64();

        // Test accuracy: group 0 runs the test set forward in batches.
        let mut totals = [0.0f64; 3];
        if d == 0 {
            let all: Vec<usize> = (0..test.len()).collect();
            for (k, chunk) in all.chunks(config.batch_size.max(1)).enumerate() {
                let (inputs, labels) = test.gather(chunk);
                let logits =
                    self.forward(group.as_ref(), model, u64::MAX / 2 + k as u64, &inputs, chunk.len())?;
                model.drop_saved();
                let (l, c, _) = model.loss_grad(&logits, &labels, 0.0)?;
                if t == 0 {
                    totals = [totals[0] + l, totals[1] + c as f64, totals[2] + chunk.len() as f64];
                }
            }
        }
        comm.allreduce(bytemuck::cast_slice_mut(&mut totals), DType::F64, ReduceOp::Sum, self.deadline())?;
        let test_accuracy = if totals[2] > 0.0 { totals[1] / totals[2] } else { f64::NAN };
        Ok(TrainSummary {
            epochs: epochs_done,
            steps: step,
            final_loss: last_loss,
            test_accuracy,
            samples_per_sec: samples as f64 / wall.max(1e-9),
            wall_seconds: wall,
            peak_activation_bytes: peak,
            busy_seconds: busy.as_secs_f64(),
            idle_seconds: 0.0,
        })
    }
}
