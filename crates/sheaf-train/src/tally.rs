//! A run's tally: what each optimizer step did, the metrics and the summary every
//! strategy reports the same way, the losses and accuracy summed over the world, and
//! the checkpoints due.

use sheaf_core::{
    CheckpointSink, Communicator, DType, Dataset, Deadline, Error, MetricsSink, Model, Optimizer, ReduceOp,
    Result, StepMetrics, TrainConfig, TrainSummary,
};

use crate::epochs_done;

/// Checkpoints `model` and `optimizer` into `sink` when `step` (optimizer steps done)
/// is a multiple of the job's `checkpoint_every`: what a strategy calls after each
/// step, on every rank.
pub fn save_checkpoint_if_due(
    sink: &mut dyn CheckpointSink,
    config: &TrainConfig,
    step: u64,
    model: &dyn Model,
    optimizer: &dyn Optimizer,
) -> Result<()> {
    if !config.checkpoint_due(step) {
        return Ok(());
    }
    save_checkpoint(sink, step, model, optimizer)
}

fn save_checkpoint(
    sink: &mut dyn CheckpointSink,
    step: u64,
    model: &dyn Model,
    optimizer: &dyn Optimizer,
) -> Result<()> {
    let mut params = vec![0f32; model.layout().total()];
    model.read_params(&mut params)?;
    save_with_state(sink, step, &params, optimizer)
}

/// Saves `params` and the optimizer's state: lent as it is where the optimizer lends
/// it (the sink copies what it keeps, into buffers it keeps), else a copy handed over.
fn save_with_state(
    sink: &mut dyn CheckpointSink,
    step: u64,
    params: &[f32],
    optimizer: &dyn Optimizer,
) -> Result<()> {
    match optimizer.state_views()? {
        Some(views) => sink.save_views(step, params, &views),
        None => sink.save_owned(step, params, optimizer.state()?),
    }
}

/// [`save_checkpoint`] from the model's own buffer where it lends it (no copy of the
/// parameters).
fn save_lent(
    sink: &mut dyn CheckpointSink,
    step: u64,
    model: &mut dyn Model,
    optimizer: &dyn Optimizer,
) -> Result<()> {
    let total = model.layout().total();
    let mut read;
    let params: &[f32] = match model.params_mut()? {
        Some(params) if params.len() == total => params,
        _ => {
            read = vec![0f32; total];
            model.read_params(&mut read)?;
            &read
        }
    };
    save_with_state(sink, step, params, optimizer)
}

/// After step `step` (and its checkpoint, if one was due): when the world agrees it
/// is preempted ([`CheckpointSink::preempted`]), checkpoints now (unless that was
/// done) and stops the run with [`Error::Preempted`].
pub fn stop_if_preempted(
    sink: &mut dyn CheckpointSink,
    config: &TrainConfig,
    step: u64,
    model: &mut dyn Model,
    optimizer: &dyn Optimizer,
) -> Result<()> {
    match sink.preempted(step)? {
        true => stop_here(sink, config, step, model, optimizer),
        false => Ok(()),
    }
}

/// The world stops after `step`, preempted: saved there (unless the step's own
/// checkpoint already was), the run ended with [`Error::Preempted`].
fn stop_here(
    sink: &mut dyn CheckpointSink,
    config: &TrainConfig,
    step: u64,
    model: &mut dyn Model,
    optimizer: &dyn Optimizer,
) -> Result<()> {
    if !config.checkpoint_due(step) {
        save_lent(sink, step, model, optimizer)?;
    }
    Err(Error::Preempted { step })
}

/// An evaluation's passes, each preceded by [`Passes::ask`], which asks the world
/// whether it is preempted ([`CheckpointSink::preempted`], a collective), so that a
/// signal arriving during a long evaluation stops the run within one pass. Every rank
/// of the world calls `ask` equally often in one evaluation (a rank with fewer
/// passes of its own calls it for the others' too: [`Passes::pad`]).
pub struct Passes<'s> {
    sink: Option<&'s mut dyn CheckpointSink>,
    step: u64,
    preempted: bool,
}

impl<'s> Passes<'s> {
    /// The passes of step `step`'s evaluation, asking `sink`.
    pub fn asking(sink: &'s mut dyn CheckpointSink, step: u64) -> Passes<'s> {
        Passes { sink: Some(sink), step, preempted: false }
    }

    /// Passes that ask nothing: an evaluation no preemption interrupts (the run's final
    /// one, a test's).
    pub fn unasked() -> Passes<'static> {
        Passes { sink: None, step: 0, preempted: false }
    }

    /// Before a pass: [`Error::Preempted`] when the world is preempted, which the
    /// evaluation returns as it is.
    pub fn ask(&mut self) -> Result<()> {
        let Some(sink) = self.sink.as_deref_mut() else { return Ok(()) };
        if sink.preempted(self.step)? {
            self.preempted = true;
            return Err(Error::Preempted { step: self.step });
        }
        Ok(())
    }

    /// [`Passes::ask`] for each of the `rounds - done` passes that other ranks run
    /// after this one's `done`.
    pub fn pad(&mut self, done: usize, rounds: usize) -> Result<()> {
        (done..rounds).try_for_each(|_| self.ask())
    }
}

/// What one optimizer step did, for [`RunTally::end_step`].
#[derive(Clone, Debug)]
pub struct StepDone {
    /// The epoch of the step's last micro-batch.
    pub epoch: u64,
    /// The step's mean training loss.
    pub loss: f64,
    /// The gradient's global norm before clipping.
    pub grad_norm: f64,
    /// The samples the step trained on, over all ranks.
    pub samples: usize,
    /// When the step began.
    pub started: std::time::Instant,
}

/// A run's tally from its first optimizer step to its summary, kept the same way under
/// every strategy, on every rank: optimizer steps done (from the checkpoint's step on a
/// resumed run), samples trained on, the last loss, the wall time, and the last
/// evaluation, so that a run ending on an evaluation step reports it rather than
/// evaluating the same parameters again.
pub struct RunTally<'a> {
    config: &'a TrainConfig,
    steps: u64,
    samples: usize,
    last_loss: f64,
    last_eval: Option<(u64, (f64, f64))>,
    start: std::time::Instant,
}

impl<'a> RunTally<'a> {
    /// A tally starting now, at the job's first step.
    pub fn new(config: &'a TrainConfig) -> RunTally<'a> {
        RunTally {
            config,
            steps: config.start_step,
            samples: 0,
            last_loss: f64::NAN,
            last_eval: None,
            start: std::time::Instant::now(),
        }
    }

    /// Optimizer steps done.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The end of an optimizer step: counts it; on the steps that evaluate
    /// (`train.eval_every`) takes `validate`'s accuracy and validation loss (its passes
    /// ask whether the world is preempted: one that is stops the evaluation and the
    /// run); records the step's metrics to `metrics`, then checkpoints when one is due.
    /// Returns the validation loss when there was one.
    pub fn end_step(
        &mut self,
        done: StepDone,
        metrics: &mut dyn MetricsSink,
        checkpoints: &mut dyn CheckpointSink,
        model: &mut dyn Model,
        optimizer: &dyn Optimizer,
        validate: impl FnOnce(&mut dyn Model, &mut Passes<'_>) -> Result<(f64, f64)>,
    ) -> Result<Option<f64>> {
        self.steps += 1;
        self.samples += done.samples;
        self.last_loss = done.loss;
        let (config, step) = (self.config, self.steps);
        // Steps count from 1, and no step is a multiple of 0.
        let mut evaluates = config.eval_every.is_some_and(|every| step.is_multiple_of(every));
        // A preemption does not wait for an evaluation: asked before one too (the
        // world agrees, so every rank skips it alike).
        let mut preempted = evaluates && checkpoints.preempted(step)?;
        evaluates &= !preempted;
        let val_loss = if evaluates {
            let mut passes = Passes::asking(&mut *checkpoints, step);
            match validate(model, &mut passes) {
                Ok(eval) => {
                    self.last_eval = Some((step, eval));
                    Some(eval.1)
                }
                // The world stopped it between two passes: no validation loss.
                Err(Error::Preempted { .. }) if passes.preempted => {
                    preempted = true;
                    None
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        metrics.record(&StepMetrics {
            step,
            epoch: done.epoch,
            loss: done.loss,
            lr: optimizer.learning_rate(),
            samples_per_sec: done.samples as f64 / done.started.elapsed().as_secs_f64().max(1e-9),
            grad_norm: done.grad_norm,
            val_loss,
        });
        if config.checkpoint_due(step) {
            save_lent(checkpoints, step, model, optimizer)?;
        }
        // Asked again after the step's checkpoint, unless the answer came before or
        // during the evaluation.
        if preempted || checkpoints.preempted(step)? {
            stop_here(checkpoints, config, step, model, optimizer)?;
        }
        Ok(val_loss)
    }

    /// The run's summary, its wall time ending now: the test accuracy and loss from the
    /// last step's evaluation, or from `validate` (the one [`RunTally::end_step`] takes)
    /// when the last step did not evaluate (with [`Passes::unasked`]: the run is done);
    /// `gradient_bytes` as the strategy measured them. What a strategy does not measure is 0 (activations, busy and idle time),
    /// for it to fill in.
    pub fn summary(
        self,
        train_len: usize,
        model: &mut dyn Model,
        optimizer: &dyn Optimizer,
        gradient_bytes: u64,
        validate: impl FnOnce(&mut dyn Model, &mut Passes<'_>) -> Result<(f64, f64)>,
    ) -> Result<TrainSummary> {
        let wall = self.start.elapsed().as_secs_f64();
        let (test_accuracy, test_loss) = match self.last_eval {
            Some((at, eval)) if at == self.steps => eval,
            _ => validate(model, &mut Passes::unasked())?,
        };
        Ok(TrainSummary {
            epochs: epochs_done(self.steps, train_len, self.config),
            steps: self.steps,
            final_loss: self.last_loss,
            test_accuracy,
            test_loss,
            samples_per_sec: self.samples as f64 / wall.max(1e-9),
            wall_seconds: wall,
            peak_activation_bytes: 0,
            busy_seconds: 0.0,
            idle_seconds: 0.0,
            optimizer_state_bytes_per_rank: optimizer_state_bytes(optimizer)?,
            gradient_bytes_per_rank: Some(gradient_bytes as f64),
        })
    }
}

/// The mean training loss of a step from every rank's `[loss sum, predictions]`,
/// summed over `comm` (a rank that scores none gives zeros).
pub fn mean_loss(comm: &dyn Communicator, mut sums: [f64; 2], dl: Deadline) -> Result<f64> {
    comm.allreduce(bytemuck::cast_slice_mut(&mut sums), DType::F64, ReduceOp::Sum, dl)?;
    Ok(sums[0] / sums[1].max(1.0))
}

/// Bytes of the state `optimizer` holds now, as it reports them.
pub fn optimizer_state_bytes(optimizer: &dyn sheaf_core::Optimizer) -> Result<u64> {
    optimizer.state_bytes()
}

/// Accuracy and mean loss per prediction from every rank's `[loss sum, correct,
/// predictions]`, summed over `comm`.
pub fn test_totals(comm: &dyn Communicator, mut totals: [f64; 3], dl: Deadline) -> Result<(f64, f64)> {
    comm.allreduce(bytemuck::cast_slice_mut(&mut totals), DType::F64, ReduceOp::Sum, dl)?;
    Ok(if totals[2] > 0.0 { (totals[1] / totals[2], totals[0] / totals[2]) } else { (f64::NAN, f64::NAN) })
}

/// The most passes any rank of `comm` runs, from this rank's `mine`: what each pads to
/// ([`Passes::pad`]).
pub fn most_passes(comm: &dyn Communicator, mine: usize, dl: Deadline) -> Result<usize> {
    let mut most = [mine as f64];
    comm.allreduce(bytemuck::cast_slice_mut(&mut most), DType::F64, ReduceOp::Max, dl)?;
    Ok(most[0] as usize)
}

/// `[loss sum, correct, predictions]` of `model` on the samples `indices` of `data`,
/// evaluated `chunk` samples at a time (no preemption asked: [`evaluate_passes`]).
pub fn evaluate_indices(
    model: &mut dyn Model,
    data: &dyn Dataset,
    indices: &[usize],
    chunk: usize,
) -> Result<[f64; 3]> {
    evaluate_passes(model, data, indices, chunk, &mut Passes::unasked(), 0)
}

/// [`evaluate_indices`] with each pass after [`Passes::ask`], padded to `rounds` (the
/// most passes any rank runs).
pub fn evaluate_passes(
    model: &mut dyn Model,
    data: &dyn Dataset,
    indices: &[usize],
    chunk: usize,
    passes: &mut Passes<'_>,
    rounds: usize,
) -> Result<[f64; 3]> {
    let mut totals = [0f64; 3];
    let parts = indices.chunks(chunk.max(1));
    let done = parts.len();
    for part in parts {
        passes.ask()?;
        let samples = data.gather(part)?;
        let batch = samples.batch();
        let (loss, correct) = model.evaluate(&batch)?;
        totals[0] += loss;
        totals[1] += correct as f64;
        totals[2] += batch.predictions() as f64;
    }
    passes.pad(done, rounds)?;
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sheaf_core::{CheckpointSink, OptimState, StepMetrics};

    /// A model of two parameters that trains nothing: [`RunTally`] only reads and
    /// checkpoints it.
    struct Two(sheaf_core::ParamLayout, [f32; 2]);

    impl Model for Two {
        fn layout(&self) -> &sheaf_core::ParamLayout {
            &self.0
        }
        fn read_params(&self, out: &mut [f32]) -> Result<()> {
            out.copy_from_slice(&self.1);
            Ok(())
        }
        fn write_params(&mut self, src: &[f32]) -> Result<()> {
            self.1.copy_from_slice(src);
            Ok(())
        }
        fn forward_backward(&mut self, _: &sheaf_core::Batch<'_>, _: &mut [f32]) -> Result<f32> {
            Ok(0.0)
        }
        fn evaluate(&mut self, _: &sheaf_core::Batch<'_>) -> Result<(f64, usize)> {
            Ok((0.0, 0))
        }
    }

    /// A step of loss 1 on 4 samples, begun now.
    fn a_step() -> StepDone {
        StepDone { epoch: 0, loss: 1.0, grad_norm: 1.0, samples: 4, started: std::time::Instant::now() }
    }

    /// `n` rows of one input each.
    struct Rows(usize);

    impl sheaf_core::Dataset for Rows {
        fn len(&self) -> usize {
            self.0
        }
        fn gather(&self, indices: &[usize]) -> Result<sheaf_core::Samples> {
            let inputs = indices.iter().map(|&i| i as f32).collect();
            Ok(sheaf_core::Samples::Rows { inputs, labels: vec![0; indices.len()], input_dim: 1 })
        }
    }

    /// An optimizer holding three values of state, at a fixed learning rate.
    struct Still;

    impl Optimizer for Still {
        fn step(&mut self, _: &mut [sheaf_core::Param<'_>]) -> Result<()> {
            Ok(())
        }
        fn learning_rate(&self) -> f64 {
            0.25
        }
        fn set_learning_rate(&mut self, _: f64) {}
        fn state(&self) -> Result<OptimState> {
            Ok(OptimState { step: 0, buffers: vec![("m".into(), vec![0.0; 3])] })
        }
        fn load_state(&mut self, _: &OptimState) -> Result<()> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct Sinks(Vec<StepMetrics>, Vec<u64>);

    impl MetricsSink for Sinks {
        fn record(&mut self, m: &StepMetrics) {
            self.0.push(m.clone());
        }
    }

    impl CheckpointSink for Sinks {
        fn save(&mut self, step: u64, params: &[f32], _: &OptimState) -> Result<()> {
            assert_eq!(params, [1.0, 2.0]);
            self.1.push(step);
            Ok(())
        }
    }

    /// A resumed run's tally counts on from the checkpoint's step: evaluations and
    /// checkpoints fall on multiples of their intervals, every step's metrics are
    /// recorded, and the summary reuses the last step's evaluation when it had one,
    /// evaluating only when it had not; an evaluation's error ends the step.
    #[test]
    fn a_tally_counts_on_from_the_start_step_and_reuses_the_last_evaluation() {
        let layout =
            sheaf_core::ParamLayout::new(vec![sheaf_core::ParamSpec { name: "w".into(), shape: vec![2] }]);
        let mut model = Two(layout, [1.0, 2.0]);
        let config = TrainConfig {
            start_step: 5,
            eval_every: Some(2),
            checkpoint_every: Some(3),
            ..TrainConfig::basic(0, 100, 4, None, 0.25)
        };
        for (steps, evaluated_last) in [(3u64, true), (4, false)] {
            let (mut metrics, mut checkpoints) = (Sinks::default(), Sinks::default());
            let mut tally = RunTally::new(&config);
            let mut validations = 0;
            for i in 0..steps {
                let before = std::time::Instant::now();
                let done = StepDone {
                    epoch: 1,
                    loss: i as f64,
                    grad_norm: 1.5,
                    samples: 4,
                    started: std::time::Instant::now(),
                };
                let val = tally
                    .end_step(done, &mut metrics, &mut checkpoints, &mut model, &Still, |_, _| {
                        validations += 1;
                        Ok((0.5, validations as f64))
                    })
                    .unwrap();
                assert_eq!(val.is_some(), (6 + i) % 2 == 0, "step {}", 6 + i);
                // The step's 4 samples over no more than the time it took.
                let rate = metrics.0.last().unwrap().samples_per_sec;
                assert!(rate >= 4.0 / before.elapsed().as_secs_f64(), "{rate} samples/s");
            }
            assert_eq!(tally.steps(), 5 + steps);
            let steps_seen: Vec<u64> = metrics.0.iter().map(|m| m.step).collect();
            assert_eq!(steps_seen, (6..6 + steps).collect::<Vec<_>>());
            assert!(metrics.0.iter().all(|m| m.lr == 0.25 && m.grad_norm == 1.5));
            assert_eq!(checkpoints.1, (6..6 + steps).filter(|s| s % 3 == 0).collect::<Vec<_>>());
            let mut evaluated = false;
            let summary = tally
                .summary(400, &mut model, &Still, 8, |_, _| {
                    evaluated = true;
                    Ok((0.75, 9.0))
                })
                .unwrap();
            assert_eq!(evaluated, !evaluated_last);
            let expected = if evaluated_last { (0.5, validations as f64) } else { (0.75, 9.0) };
            assert_eq!((summary.test_accuracy, summary.test_loss), expected);
            assert_eq!((summary.steps, summary.final_loss), (5 + steps, (steps - 1) as f64));
            assert_eq!(summary.epochs, (5 + steps) * 4 / 400);
            let trained = summary.samples_per_sec * summary.wall_seconds;
            assert!((trained - 4.0 * steps as f64).abs() < 1e-6, "{trained} samples counted");
            assert_eq!(
                (summary.optimizer_state_bytes_per_rank, summary.gradient_bytes_per_rank),
                (12, Some(8.0))
            );
        }
        let mut tally = RunTally::new(&config);
        let done =
            StepDone { epoch: 1, loss: 0.0, grad_norm: 0.0, samples: 1, started: std::time::Instant::now() };
        let (mut metrics, mut checkpoints) = (Sinks::default(), Sinks::default());
        let e = tally
            .end_step(done, &mut metrics, &mut checkpoints, &mut model, &Still, |_, _| {
                Err(sheaf_core::Error::BadState("no validation split".into()))
            })
            .unwrap_err();
        assert!(e.to_string().contains("no validation split"), "{e}");
        assert!(metrics.0.is_empty(), "a failed step is not recorded");
    }

    /// A sink that keeps the steps saved and answers `preempted` from step `at` on.
    struct Preempting {
        at: u64,
        saved: Vec<u64>,
        asked: Vec<u64>,
    }

    impl CheckpointSink for Preempting {
        fn save(&mut self, step: u64, params: &[f32], _: &OptimState) -> Result<()> {
            assert_eq!(params, [1.0, 2.0]);
            self.saved.push(step);
            Ok(())
        }
        fn preempted(&mut self, step: u64) -> Result<bool> {
            self.asked.push(step);
            Ok(step >= self.at)
        }
    }

    /// The sink is asked after every step; once it says preempted, the step is saved
    /// once (not again when a checkpoint was due at it anyway) and the run stops with
    /// `Preempted` naming the step, its metrics recorded.
    #[test]
    fn a_preemption_saves_the_step_once_and_stops_the_run() {
        for (every, at, saved) in [(None, 3u64, vec![3u64]), (Some(2), 3, vec![2, 3]), (Some(3), 3, vec![3])]
        {
            let config = TrainConfig { checkpoint_every: every, ..TrainConfig::basic(0, 100, 4, None, 0.25) };
            let (stopped, metrics, sink, _) = run_until_preempted(&config, at);
            assert_eq!(stopped, Some(sheaf_core::Error::Preempted { step: at }), "every {every:?}");
            assert_eq!(sink.asked, (1..=at).collect::<Vec<_>>(), "every {every:?}");
            assert_eq!(sink.saved, saved, "every {every:?}");
            assert_eq!(metrics.0.len() as u64, at, "the preempted step's metrics are recorded");
        }
        // Evaluating every step: asked before each evaluation too, and a preempted step
        // is not evaluated (the world stops at once); its metrics say so.
        let config = TrainConfig { eval_every: Some(1), ..TrainConfig::basic(0, 100, 4, None, 0.25) };
        let (stopped, metrics, sink, evaluated) = run_until_preempted(&config, 2);
        assert_eq!(stopped, Some(sheaf_core::Error::Preempted { step: 2 }));
        assert_eq!((sink.asked, sink.saved, evaluated), (vec![1, 1, 2], vec![2], vec![1]));
        assert_eq!(metrics.0.iter().map(|m| m.val_loss.is_some()).collect::<Vec<_>>(), [true, false]);
    }

    /// A signal during an evaluation: the world says preempted at the third question
    /// of step 2 (after the step, then before its evaluation's first two passes), so
    /// the evaluation stops before its second pass, the step is saved and the run
    /// stops with no validation loss for it. Every pass asked first.
    #[test]
    fn a_preemption_during_an_evaluation_stops_it_between_passes() {
        struct Third(Vec<u64>, Vec<u64>);
        impl CheckpointSink for Third {
            fn save(&mut self, step: u64, _: &[f32], _: &OptimState) -> Result<()> {
                self.1.push(step);
                Ok(())
            }
            fn preempted(&mut self, step: u64) -> Result<bool> {
                self.0.push(step);
                Ok(step == 2 && self.0.iter().filter(|&&s| s == 2).count() == 3)
            }
        }
        let config = TrainConfig { eval_every: Some(2), ..TrainConfig::basic(0, 100, 4, None, 0.25) };
        let layout =
            sheaf_core::ParamLayout::new(vec![sheaf_core::ParamSpec { name: "w".into(), shape: vec![2] }]);
        let mut model = Two(layout, [1.0, 2.0]);
        let mut tally = RunTally::new(&config);
        let (mut metrics, mut sink) = (Sinks::default(), Third(vec![], vec![]));
        let mut passes_run = 0;
        let mut outcome = Ok(None);
        for _ in 0..2 {
            let done = a_step();
            outcome = tally.end_step(done, &mut metrics, &mut sink, &mut model, &Still, |_, passes| {
                for _ in 0..4 {
                    passes.ask()?;
                    passes_run += 1;
                }
                Ok((1.0, 1.0))
            });
        }
        assert_eq!(outcome, Err(sheaf_core::Error::Preempted { step: 2 }));
        assert_eq!(passes_run, 1, "one pass ran before the signal was heard");
        assert_eq!((sink.0, sink.1), (vec![1, 2, 2, 2], vec![2]));
        assert_eq!(metrics.0.iter().map(|m| m.val_loss).collect::<Vec<_>>(), [None, None]);
    }

    /// Every rank asks equally often: a rank with fewer passes of its own pads to the
    /// world's most, and an unasked evaluation asks nothing.
    #[test]
    fn evaluations_ask_once_a_pass_padded_to_the_world() {
        struct Count(u64);
        impl CheckpointSink for Count {
            fn save(&mut self, _: u64, _: &[f32], _: &OptimState) -> Result<()> {
                Ok(())
            }
            fn preempted(&mut self, _: u64) -> Result<bool> {
                self.0 += 1;
                Ok(false)
            }
        }
        let data = Rows(10);
        let layout =
            sheaf_core::ParamLayout::new(vec![sheaf_core::ParamSpec { name: "w".into(), shape: vec![2] }]);
        let mut model = Two(layout, [1.0, 2.0]);
        let mut sink = Count(0);
        let totals =
            evaluate_passes(&mut model, &data, &[0, 1, 2, 3, 4], 2, &mut Passes::asking(&mut sink, 1), 4)
                .unwrap();
        assert_eq!(totals[2], 5.0, "every sample evaluated");
        assert_eq!(sink.0, 4, "3 passes of its own and one for the others");
        evaluate_passes(&mut model, &data, &[0, 1, 2], 2, &mut Passes::unasked(), 4).unwrap();
    }

    /// Up to 5 steps under `config` into a sink that says preempted from step `at`: the
    /// error that stopped them, the metrics, the sink, and the steps evaluated.
    fn run_until_preempted(
        config: &TrainConfig,
        at: u64,
    ) -> (Option<sheaf_core::Error>, Sinks, Preempting, Vec<u64>) {
        let layout =
            sheaf_core::ParamLayout::new(vec![sheaf_core::ParamSpec { name: "w".into(), shape: vec![2] }]);
        let mut model = Two(layout, [1.0, 2.0]);
        let mut tally = RunTally::new(config);
        let (mut metrics, mut sink) = (Sinks::default(), Preempting { at, saved: vec![], asked: vec![] });
        let mut evaluated = Vec::new();
        for _ in 0..5 {
            let done = a_step();
            let step = tally.steps() + 1;
            let result = tally.end_step(done, &mut metrics, &mut sink, &mut model, &Still, |_, _| {
                evaluated.push(step);
                Ok((0.0, 0.0))
            });
            if let Err(e) = result {
                return (Some(e), metrics, sink, evaluated);
            }
        }
        (None, metrics, sink, evaluated)
    }
}
