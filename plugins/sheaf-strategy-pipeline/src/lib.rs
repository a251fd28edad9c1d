//! Sheaf plugin: pipeline-parallel training, optionally data-parallel across pipelines.
//!
//! The world of `D x P` ranks is `D` pipelines of `P` stages: rank `d * P + p` is
//! stage `p` of pipeline `d`, and holds the model piece the host built for stage `p`
//! (a contiguous range of layers). Every step takes the global batch one process
//! would (the same seeded epoch order), gives pipeline `d` its share through the data
//! partitioner, and cuts that share into `M` micro-batches. Activations flow forward
//! and gradients backward between neighbouring stages with send/recv, in the order the
//! schedule gives: GPipe (all forwards, then all backwards: a stage keeps `M`
//! micro-batches of activations) or 1F1B (after a warm-up of `P - 1 - p` forwards,
//! one forward then one backward: at most `P - p`). The last stage computes the loss,
//! scaled by `1 / global batch`, so that the gradients accumulated over micro-batches
//! (and summed over pipelines with an allreduce among the ranks holding the same
//! stage) are those of the mean loss over the whole global batch: the same step one
//! process takes.
//!
//! Across the pipelines, the ranks holding the same stage may shard it: its optimizer
//! state (`zero = 1`), or its parameters, gradients and optimizer state by rows, each
//! unit gathered just before it runs (`zero = 3`, see `zero3`).
//!
//! Each stage measures the time it computes and, between a barrier before and after
//! each step's schedule, the time it waits: the pipeline bubble.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use sheaf_core::{
    Communicator, Deadline, Error, Model, ParamShard, Piece, PlanInput, PluginKind, Provided, RankPlan,
    Result, Strategy, StrategyPlan, TrainContext, TrainSummary,
};
use sheaf_train::{
    backward_segments, forward_segments, mean_loss, prefetched_steps, test_totals, zero_release, ModelParams,
    Passes, Prefetch, ReplicaStep, RunTally, SegmentParams, Shards, StageInput, StepDone, Whole,
};

mod config;
mod mesh;
mod micro;
mod zero3;

pub use config::{schedule, Pass, PipelineConfig, Schedule};
use mesh::{Mesh3, Ties};
use micro::{eval_rows, micro_batches, micro_cut, micro_ranges, Micro};
use zero3::StageShards;

/// The plugin as exported to the host.
pub struct PipelinePlugin;

impl sheaf_abi::Plugin for PipelinePlugin {
    const NAME: &'static str = "sheaf-strategy-pipeline";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn provides() -> Vec<Provided> {
        vec![Provided { kind: PluginKind::Strategy, name: "pipeline".into() }]
    }

    fn strategy(name: &str, config: &str) -> Result<Box<dyn Strategy>> {
        if name != "pipeline" {
            return Err(Error::config(
                "parallel.strategy",
                format!("unknown strategy `{name}` (this plugin has pipeline)"),
            ));
        }
        Ok(Box::new(Pipeline { config: PipelineConfig::parse(config)? }))
    }
}

sheaf_abi::export_plugin!(PipelinePlugin);

struct Pipeline {
    config: PipelineConfig,
}

/// What one stage measured.
#[derive(Default)]
struct StageClock {
    busy: Duration,
    idle: Duration,
    peak: u64,
}

/// Values received from a neighbouring stage for a micro-batch of `rows` samples
/// (whose size the stage receiving them checks against its own input): none for an
/// empty micro-batch, some otherwise.
fn f32s(bytes: &[u8], what: &str, peer: usize, rows: usize) -> Result<Vec<f32>> {
    if bytes.is_empty() != (rows == 0) || !bytes.len().is_multiple_of(4) {
        return Err(Error::BadState(format!(
            "{what} from rank {peer} of the pipeline: {} bytes for {rows} samples, not a whole \
             number of f32 values for each",
            bytes.len()
        )));
    }
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
}

fn bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

impl Pipeline {
    fn deadline(&self) -> Deadline {
        Deadline::after(Duration::from_millis(self.config.timeout_ms))
    }

    /// Runs `passes` for this stage over `micros` (samples on the first stage, targets
    /// on the last): returns the loss summed over the micro-batches (last stage, else
    /// 0), the number of correct predictions and of predictions. The loss's gradient is
    /// scaled by `1 / (global samples x predictions per sample)`; `global: None` runs
    /// forwards only (an evaluation).
    #[allow(clippy::too_many_arguments)]
    fn run_passes(
        &self,
        pipe: &dyn Communicator,
        tensor: &dyn Communicator,
        model: &mut dyn Model,
        params: &mut dyn SegmentParams,
        passes: &[Pass],
        micros: &[Micro],
        global: Option<usize>,
        first_micro_id: u64,
        clock: &mut StageClock,
    ) -> Result<(f64, usize, usize)> {
        let (p, stages) = (pipe.rank(), pipe.world_size());
        let (first, last) = (p == 0, p + 1 == stages);
        let mut loss_grads: Vec<Option<Vec<f32>>> = vec![None; micros.len()];
        let (mut loss_sum, mut correct, mut predictions) = (0.0, 0, 0);
        for &pass in passes {
            match pass {
                Pass::Forward(m) => {
                    let (rows, id) = (micros[m].rows, first_micro_id + m as u64);
                    let out = if first {
                        let samples = micros[m].samples.as_ref().ok_or_else(|| {
                            Error::BadState(format!("the first stage has no samples for micro-batch {m}"))
                        })?;
                        let t = Instant::now();
                        let out = forward_segments(
                            tensor,
                            model,
                            params,
                            id,
                            StageInput::Samples(samples),
                            rows,
                            self.deadline(),
                        )?;
                        clock.busy += t.elapsed();
                        out
                    } else {
                        let t = Instant::now();
                        let got = pipe.recv(p - 1, 2 * m as u32, self.deadline())?;
                        clock.idle += t.elapsed();
                        let input = f32s(&got, "activations", p - 1, rows)?;
                        let t = Instant::now();
                        let out = forward_segments(
                            tensor,
                            model,
                            params,
                            id,
                            StageInput::Values(&input),
                            rows,
                            self.deadline(),
                        )?;
                        clock.busy += t.elapsed();
                        out
                    };
                    clock.peak = clock.peak.max(model.saved_bytes());
                    if last {
                        let t = Instant::now();
                        let targets = &micros[m].targets;
                        let scale = match global {
                            Some(g) => 1.0 / (g * targets.len() / rows.max(1)).max(1) as f32,
                            None => 0.0,
                        };
                        let (l, c, g) = model.loss_grad(&out, targets, scale)?;
                        loss_sum += l;
                        correct += c;
                        predictions += targets.len();
                        loss_grads[m] = Some(g);
                        clock.busy += t.elapsed();
                    } else {
                        pipe.send(p + 1, 2 * m as u32, bytes(&out), self.deadline())?;
                    }
                }
                Pass::Backward(m) => {
                    let grad = if last {
                        loss_grads[m].take().ok_or_else(|| {
                            Error::BadState(format!("backward of micro-batch {m} before its forward"))
                        })?
                    } else {
                        let t = Instant::now();
                        let got = pipe.recv(p + 1, 2 * m as u32 + 1, self.deadline())?;
                        clock.idle += t.elapsed();
                        f32s(&got, "gradients", p + 1, micros[m].rows)?
                    };
                    let t = Instant::now();
                    let id = first_micro_id + m as u64;
                    let grad_in = backward_segments(tensor, model, params, id, grad, self.deadline())?;
                    clock.busy += t.elapsed();
                    if !first {
                        pipe.send(p - 1, 2 * m as u32 + 1, bytes(&grad_in), self.deadline())?;
                    }
                }
            }
        }
        Ok((loss_sum, correct, predictions))
    }
}

/// Who evaluates and how: pipeline 0 runs the test set forward in batches.
struct Eval<'a> {
    pipe: &'a dyn Communicator,
    tensor: &'a dyn Communicator,
    first: bool,
    last: bool,
    /// Pipeline 0 evaluates, and under ZeRO 3 every pipeline (each gather takes every
    /// replica of the stage); tensor rank 0 of pipeline 0 scores (every slice holds the
    /// same logits).
    evaluating: bool,
    scoring: bool,
    batch: usize,
}

impl Pipeline {
    /// `[loss sum, correct, predictions]` of this rank's part of an evaluation (the
    /// last stage of pipeline 0 scores; every other rank reports zeros).
    fn evaluate(
        &self,
        eval: &Eval<'_>,
        model: &mut dyn Model,
        params: &mut dyn SegmentParams,
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
            let micros = micro_batches(test, chunk, 1, eval.first, eval.last)?;
            let id = u64::MAX / 2 + k as u64;
            let mut scratch = StageClock::default();
            let forward = [Pass::Forward(0)];
            let (l, c, n) = self.run_passes(
                eval.pipe,
                eval.tensor,
                model,
                params,
                &forward,
                &micros,
                None,
                id,
                &mut scratch,
            )?;
            model.drop_saved();
            if eval.last && eval.scoring {
                totals = [totals[0] + l, totals[1] + c as f64, totals[2] + n as f64];
            }
        }
        Ok(totals)
    }
}

impl Pipeline {
    /// `(D, P, T)` over the world of `input`, and the blocks of each of the `P`
    /// stages, cut by the job's model partitioner on the blocks' costs (checked, not
    /// trusted: contiguous, non-empty, covering every block).
    fn cut(&self, input: &PlanInput<'_>) -> Result<(usize, usize, usize, Vec<std::ops::Range<usize>>)> {
        let (data, stages, width) = self.config.layout(input.world)?;
        let blocks = input.blocks.len();
        if stages > blocks {
            return Err(Error::config(
                "parallel.options.pipeline.stages",
                format!(
                    "{stages} stages, but the model has only {blocks} blocks (one stage holds at least one)"
                ),
            ));
        }
        let cut = input.partitioner.cut(input.costs, stages)?;
        // A vendor's partitioner is checked, not trusted.
        let covers = cut.len() == stages
            && cut.first().is_some_and(|r| r.start == 0)
            && cut.last().is_some_and(|r| r.end == blocks)
            && cut.iter().all(|r| !r.is_empty())
            && cut.windows(2).all(|w| w[0].end == w[1].start);
        if !covers {
            return Err(Error::config(
                "parallel.partitioner",
                format!("cut {blocks} blocks into {cut:?}, not {stages} contiguous non-empty stages"),
            ));
        }
        Ok((data, stages, width, cut))
    }
}

impl Strategy for Pipeline {
    fn name(&self) -> &str {
        "pipeline"
    }

    /// `D` pipelines of `P` stages of `T` tensor-parallel ranks (rank
    /// `(d * P + p) * T + t` holds slice `t` of stage `p`), the blocks cut into `P`
    /// contiguous stages by the job's model partitioner on the blocks' costs; stage
    /// `p` keeps `M` (GPipe) or `min(P - p, M)` (1F1B) micro-batches in flight.
    fn plan(&self, input: &PlanInput<'_>) -> Result<StrategyPlan> {
        let (data, stages, width, cut) = self.cut(input)?;
        let share = input.batch_size.div_ceil(data);
        let micro = self.config.micro_batches.min(share).max(1);
        let rows = share.div_ceil(micro) as u64;
        let ranks = (0..input.world)
            .map(|r| {
                let (d, p, t) = (r / (stages * width), r / width % stages, r % width);
                let kept = match self.config.schedule {
                    Schedule::OneFOneB => (stages - p).min(micro),
                    Schedule::Gpipe => micro,
                };
                RankPlan {
                    piece: Piece { blocks: cut[p].clone(), tensor_rank: t, tensor_width: width },
                    activation_samples: kept as u64 * rows,
                    // ZeRO 1: the piece's optimizer state sharded over its D replicas;
                    // ZeRO 3: its parameters by rows (the state is its rows', whole).
                    state_shards: if self.config.zero == 1 { data as u64 } else { 1 },
                    param_shard: (self.config.zero == 3).then_some(ParamShard { index: d, count: data }),
                }
            })
            .collect();
        Ok(StrategyPlan { ranks, stage_interface: true })
    }

    /// ZeRO 3 keeping its gathered units through the step holds its rows and, while
    /// it trains, its stage whole (a tied head's embedding copy on the last stage
    /// left out: the strategy sees blocks, not which parameters they share).
    fn planned_parameter_bytes(&self, input: &PlanInput<'_>) -> Result<Option<Vec<u64>>> {
        if self.config.zero != 3 || self.config.reshard_after_forward {
            return Ok(None);
        }
        let (data, stages, width, cut) = self.cut(input)?;
        let bytes = (0..input.world)
            .map(|r| {
                let stage: u64 = input.blocks[cut[r / width % stages].clone()].iter().map(|b| b.params).sum();
                4 * (stage + stage.div_ceil(data as u64))
            })
            .collect();
        Ok(Some(bytes))
    }

    fn train(&mut self, ctx: TrainContext<'_>) -> Result<TrainSummary> {
        let TrainContext { config, comm, model, optimizer, partitioner, train, test, metrics, checkpoints } =
            ctx;
        let total_steps = config.total_steps(train.len());
        let (pipelines, stages, width) = self.config.layout(comm.world_size())?;
        if config.batch_size == 0 || train.is_empty() {
            return Err(Error::config(
                "train.batch_size",
                "needs a batch of at least 1 and training samples",
            ));
        }
        let piece = model.piece().ok_or_else(|| {
            Error::Unsupported(
                "the pipeline strategy needs a model piece per stage (built by the host)".into(),
            )
        })?;
        let mesh = Mesh3::split(comm, pipelines, stages, width, self.deadline())?;
        let (d, p, t, pipe) = (mesh.replica, mesh.stage, mesh.slice, mesh.pipe.as_ref());
        let (first, last) = (p == 0, p + 1 == stages);
        if piece.tensor_width != width || piece.tensor_rank != t {
            return Err(Error::BadState(format!(
                "rank {} holds tensor slice {} of {}, expected {t} of {width}",
                comm.rank(),
                piece.tensor_rank,
                piece.tensor_width
            )));
        }
        if first != (piece.blocks.start == 0) {
            return Err(Error::BadState(format!(
                "stage {p} holds blocks {:?}: stage 0, and only stage 0, must hold block 0",
                piece.blocks
            )));
        }
        let layout = model.layout().clone();
        // Under ZeRO 3 each replica holds its own rows (nothing to make equal), and the
        // units' gathers and reduce-scatters run over the replicas of the stage.
        let fully_sharded = self.config.zero == 3;
        let dl = || self.deadline();
        let mut params = match fully_sharded {
            true => ModelParams::new(model)?,
            false => ModelParams::synced(model, mesh.replicas.as_ref(), self.deadline())?,
        };
        let stage = match fully_sharded {
            true => {
                let reshard = self.config.reshard_after_forward;
                Some(StageShards::new(model, mesh.replicas.as_ref(), &dl, reshard)?)
            }
            false => None,
        };
        let stage = RefCell::new(stage);
        let ties = Ties::new(pipe, model.tied_params(), &layout, self.deadline())?;

        let tied: Vec<usize> = model.tied_params().iter().map(|t| t.0).collect();
        let replicated = model.replicated_params();
        let tensor = mesh.tensor.as_ref();
        let eval = Eval {
            pipe,
            tensor,
            first,
            last,
            evaluating: d == 0 || fully_sharded,
            scoring: t == 0 && d == 0,
            batch: eval_rows(config.batch_size, pipelines, self.config.micro_batches),
        };

        let mut tally = RunTally::new(&config);
        // The validation split's accuracy and mean loss over the world.
        let validate = |model: &mut dyn Model, passes: &mut Passes<'_>| {
            let (mut whole, mut held) = (Whole, stage.borrow_mut());
            let units: &mut dyn SegmentParams = match held.as_mut() {
                Some(s) => s,
                None => &mut whole,
            };
            test_totals(comm, self.evaluate(&eval, model, units, test, passes)?, self.deadline())
        };
        let mut grads = vec![0f32; if fully_sharded { 0 } else { layout.total() }];
        // ZeRO 1 across the pipelines: this replica's chunk of the piece, one bucket.
        let shards = (self.config.zero == 1)
            .then(|| Shards::new(&layout, std::slice::from_ref(&(0..layout.total())), d, pipelines));
        let mut shard_grads = vec![0f32; shards.as_ref().map_or(0, Shards::len)];
        let mut clock = StageClock::default();
        // A resumed run goes on from its checkpoint's step.
        let mut micro_step = config.start_micro_step();
        // This pipeline's share of each micro-step, cut into micro-batches and asked of
        // the loader thread a step ahead, by the stages that need samples (the first its
        // inputs, the last its labels); every stage keeps the micro-batches' sizes.
        let gathers = first || last;
        let mut asked = config.start_micro_step();
        let ask = |loader: &mut Prefetch, group: &[(u64, Vec<usize>)]| -> Result<Vec<Vec<usize>>> {
            let mut sizes = Vec::with_capacity(group.len());
            for (_, global) in group {
                let share: Vec<usize> = partitioner
                    .shard(asked, global.len(), d, pipelines)?
                    .into_iter()
                    .map(|i| global[i])
                    .collect();
                asked += 1;
                // Under ZeRO 3 a stage's replicas gather each unit together, once a
                // micro-batch: every pipeline runs as many, as the largest share is cut
                // into (a pipeline with fewer samples runs some empty).
                let m = self.config.micro_batches;
                let parts = match fully_sharded {
                    true => micro_cut(share.len(), m.min(global.len().div_ceil(pipelines))),
                    false => micro_ranges(share.len(), m),
                };
                if gathers {
                    for r in &parts {
                        loader.request(share[r.clone()].to_vec())?;
                    }
                }
                sizes.push(parts.iter().map(|r| r.len()).collect());
            }
            Ok(sizes)
        };
        prefetched_steps(train, &config, ask, |loader, group, sizes| {
            let t0 = Instant::now();
            let group_samples: usize = group.iter().map(|(_, g)| g.len()).sum();
            let (mut loss_sum, mut predictions) = (0.0, 0);
            let (mut whole, mut held) = (Whole, stage.borrow_mut());
            if let Some(s) = held.as_mut() {
                s.start_step();
            }
            for rows in sizes {
                let micros = rows
                    .into_iter()
                    .map(|rows| {
                        Ok(Micro::new(rows, gathers.then(|| loader.take()).transpose()?, first, last))
                    })
                    .collect::<Result<Vec<Micro>>>()?;
                let passes = schedule(self.config.schedule, stages, p, micros.len());
                pipe.barrier(self.deadline())?;
                let t_sched = Instant::now();
                let before = (clock.busy, clock.idle);
                let id = micro_step << 20;
                let units: &mut dyn SegmentParams = match held.as_mut() {
                    Some(s) => s,
                    None => &mut whole,
                };
                let (l, _, n) = self.run_passes(
                    pipe,
                    tensor,
                    model,
                    units,
                    &passes,
                    &micros,
                    Some(group_samples),
                    id,
                    &mut clock,
                )?;
                if t == 0 {
                    (loss_sum, predictions) = (loss_sum + l, predictions + n);
                }
                pipe.barrier(self.deadline())?;
                // Everything in the step's schedule that was not computing was waiting.
                // The first micro-step (first touches of every buffer) is left out.
                let spent = t_sched.elapsed();
                clock.idle = before.1 + spent.saturating_sub(clock.busy - before.0);
                if micro_step == config.start_micro_step() {
                    (clock.busy, clock.idle) = (Duration::ZERO, Duration::ZERO);
                }
                micro_step += 1;
            }
            if held.is_none() {
                model.take_grads(&mut grads)?;
                ties.sum(&mut grads, self.deadline())?;
            }
            // The whole model's norm: every stage's and slice's squares, a tied copy
            // counted once (by the first stage) and a replicated parameter once (by
            // tensor rank 0), summed over the pipeline and the tensor group; the
            // gradients summed over the pipelines (or, under ZeRO 1, reduce-scattered
            // among them, each stepping its chunk).
            let skip = |i: usize| (!first && tied.contains(&i)) || (t != 0 && replicated[i]);
            optimizer.set_learning_rate(config.lr.at(tally.steps(), total_steps));
            let replica_step = ReplicaStep {
                replicas: mesh.replicas.as_ref(),
                model_groups: &[pipe, tensor],
                clip: config.grad_clip,
                deadline: &dl,
            };
            let sharded = shards.as_ref().map(|s| (s, &mut shard_grads[..]));
            let grad_norm = match held.as_mut() {
                // ZeRO 3: the rows' sums are in; a tied copy's rows summed over the
                // stages holding it, as the whole parameter's would be.
                Some(rows) => {
                    rows.release_all(model)?;
                    ties.sum(&mut rows.grads, self.deadline())?;
                    let g = &mut rows.grads;
                    params.update(model, |p| replica_step.run_rows(&layout, g, skip, optimizer, p))?
                }
                None => params
                    .update(model, |p| replica_step.run(&layout, &mut grads, sharded, skip, optimizer, p))?,
            };
            drop(held);
            // Refilled by the next step's `take_grads`: until then its pages go back
            // to the kernel, so the model's accumulator and this copy are never both
            // resident.
            zero_release(&mut grads);
            zero_release(&mut shard_grads);
            let done = StepDone {
                epoch: group.last().map_or(0, |(e, _)| *e),
                loss: mean_loss(comm, [loss_sum, predictions as f64], self.deadline())?,
                grad_norm,
                samples: group_samples,
                started: t0,
            };
            tally.end_step(done, metrics, checkpoints, model, optimizer, validate)?;
            Ok(())
        })?;
        let held = stage.borrow().as_ref().map_or(0, StageShards::capacity);
        let gradient_bytes = 4 * (grads.len() + shard_grads.len() + held) as u64;
        let summary = tally.summary(train.len(), model, optimizer, gradient_bytes, validate)?;
        Ok(TrainSummary {
            peak_activation_bytes: clock.peak,
            busy_seconds: clock.busy.as_secs_f64(),
            idle_seconds: clock.idle.as_secs_f64(),
            ..summary
        })
    }
}

#[cfg(test)]
mod tests;
