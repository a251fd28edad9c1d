//! Data-parallel training over the in-process transport equals one process training
//! on the same global batches, for worlds of 2 to 5 and batches that do not divide
//! evenly, directly and through the ABI adapters. The model here is a small softmax
//! regression with analytic gradients and the optimizer plain momentum SGD, written
//! in the test (a plugin's tests cannot link another plugin's rlib); the end-to-end
//! tests repeat the law with the real candle, optimizer and partitioner plugins.

use sheaf_core::{
    Batch, LrSchedule, Model, OptimState, Optimizer, ParamLayout, ParamSpec, Result, StepMetrics, Strategy,
    TrainConfig, TrainContext, TrainSummary,
};
use sheaf_testkit::run_world;
use sheaf_testkit::train::{Blocks, Collect, Momentum, Saved};

use crate::{DataParallel, DataParallelConfig};

/// Softmax regression: logits = x W^T + b, mean cross-entropy.
struct Softmax {
    layout: ParamLayout,
    params: Vec<f32>,
    d: usize,
    k: usize,
    /// Whether the backward pass runs in steps (the bias, then the weights).
    stepped: bool,
    /// The stepped pass's gradient, computed whole and handed out a step at a time.
    pending: Vec<f32>,
    /// Backward steps left before one fails (a model's error mid-pass).
    fail_in: Option<usize>,
    /// Whether it lends its parameter buffer ([`Model::params_mut`]).
    lends: bool,
    /// Whether every pass drifts its first parameter by a bit (a replica gone astray,
    /// as a nondeterministic kernel would send it).
    drifts: bool,
}

impl Softmax {
    fn new(d: usize, k: usize, seed: u64) -> Softmax {
        let layout = ParamLayout::new(vec![
            ParamSpec { name: "layers.0.weight".into(), shape: vec![k, d] },
            ParamSpec { name: "layers.0.bias".into(), shape: vec![k] },
        ]);
        let mut g = sheaf_testkit::conformance::SplitMix::new(seed);
        let params = (0..layout.total()).map(|_| g.next_f32() * 0.1).collect();
        Softmax {
            layout,
            params,
            d,
            k,
            stepped: false,
            pending: Vec::new(),
            fail_in: None,
            lends: false,
            drifts: false,
        }
    }

    fn probs(&self, x: &[f32]) -> Vec<f64> {
        let logits: Vec<f64> = (0..self.k)
            .map(|c| {
                let w = &self.params[c * self.d..(c + 1) * self.d];
                f64::from(self.params[self.k * self.d + c])
                    + w.iter().zip(x).map(|(w, x)| f64::from(*w) * f64::from(*x)).sum::<f64>()
            })
            .collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let s: f64 = exp.iter().sum();
        exp.into_iter().map(|e| e / s).collect()
    }
}

impl Model for Softmax {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    fn read_params(&self, out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(&self.params);
        Ok(())
    }
    fn write_params(&mut self, src: &[f32]) -> Result<()> {
        self.params.copy_from_slice(src);
        Ok(())
    }
    fn params_mut(&mut self) -> Result<Option<&mut [f32]>> {
        Ok(self.lends.then_some(&mut self.params[..]))
    }
    fn forward_backward(&mut self, batch: &Batch<'_>, grads: &mut [f32]) -> Result<f32> {
        if self.drifts {
            self.params[0] = f32::from_bits(self.params[0].to_bits() ^ 1);
        }
        let Batch::Rows { inputs, labels, .. } = *batch else { panic!("rows") };
        let n = batch.len();
        let mut g = vec![0f64; grads.len()];
        let mut loss = 0.0;
        for i in 0..n {
            let x = &inputs[i * self.d..(i + 1) * self.d];
            let p = self.probs(x);
            let y = labels[i] as usize;
            loss -= p[y].ln();
            for c in 0..self.k {
                let delta = p[c] - f64::from(u8::from(c == y));
                for j in 0..self.d {
                    g[c * self.d + j] += delta * f64::from(x[j]);
                }
                g[self.k * self.d + c] += delta;
            }
        }
        let scale = if n == 0 { 0.0 } else { 1.0 / n as f64 };
        grads.iter_mut().zip(&g).for_each(|(o, g)| *o = (g * scale) as f32);
        Ok((loss * scale) as f32)
    }
    fn backward_in_steps(&self) -> bool {
        self.stepped
    }
    fn backward_begin(&mut self, batch: &Batch<'_>) -> Result<f32> {
        let mut g = vec![f32::NAN; self.layout.total()];
        let loss = self.forward_backward(batch, &mut g)?;
        self.pending = g;
        Ok(loss)
    }
    fn backward_next(&mut self, pending: &mut [f32]) -> Result<usize> {
        if let Some(left) = self.fail_in.as_mut() {
            if *left == 0 {
                return Err(sheaf_core::Error::BadState("the model failed mid-pass".into()));
            }
            *left -= 1;
        }
        let weights = self.k * self.d;
        let from = if pending.len() > weights { weights } else { 0 };
        let to = pending.len();
        pending[from..].copy_from_slice(&self.pending[from..to]);
        Ok(from)
    }
    fn evaluate(&mut self, batch: &Batch<'_>) -> Result<(f64, usize)> {
        let Batch::Rows { inputs, labels, .. } = *batch else { panic!("rows") };
        let mut loss = 0.0;
        let mut correct = 0;
        for i in 0..batch.len() {
            let p = self.probs(&inputs[i * self.d..(i + 1) * self.d]);
            let y = labels[i] as usize;
            loss -= p[y].ln();
            let best = (0..self.k).max_by(|a, b| p[*a].total_cmp(&p[*b])).unwrap();
            correct += usize::from(best == y);
        }
        Ok((loss, correct))
    }
}

fn train(n: usize, batch: usize, steps: Option<u64>, via_abi: bool) -> Vec<(Vec<f32>, TrainSummary)> {
    train_seeded(n, batch, steps, via_abi, 9)
}

fn train_seeded(
    n: usize,
    batch: usize,
    steps: Option<u64>,
    via_abi: bool,
    seed: u64,
) -> Vec<(Vec<f32>, TrainSummary)> {
    let config = TrainConfig::basic(seed, 3, batch, steps, 0.5);
    train_with(n, config, via_abi).into_iter().map(|(p, s, _)| (p, s)).collect()
}

/// How the replicas exchange gradients in a test run.
#[derive(Clone, Debug, Default)]
struct Exchange {
    /// Whether the model's backward pass runs in steps, and it lends its parameter
    /// buffer (the single-process runs the laws compare with do neither).
    stepped: bool,
    config: DataParallelConfig,
}

fn train_with(
    n: usize,
    config: TrainConfig,
    via_abi: bool,
) -> Vec<(Vec<f32>, TrainSummary, Vec<StepMetrics>)> {
    train_exchanging(n, config, via_abi, Exchange::default())
}

/// Every rank's final parameters, summary and step metrics.
fn train_exchanging(
    n: usize,
    config: TrainConfig,
    via_abi: bool,
    exchange: Exchange,
) -> Vec<(Vec<f32>, TrainSummary, Vec<StepMetrics>)> {
    let data = sheaf_data::teacher(300, 8, 3, 5);
    let (train, test) = data.split(0.2, 1);
    run_world(n, |comm| {
        // Every rank starts from a different seed: the broadcast must fix that.
        let mut model = Softmax::new(8, 3, 100 + sheaf_core::Communicator::rank(&comm) as u64);
        (model.stepped, model.lends) = (exchange.stepped, exchange.stepped);
        let mut opt = Momentum { lr: 0.5, buf: vec![] };
        let mut sink = Collect(Vec::new());
        let mut saved = Saved::default();
        let mut strategy: Box<dyn Strategy> = Box::new(DataParallel::new(exchange.config.clone()));
        if via_abi {
            strategy = sheaf_abi::from_abi::strategy(sheaf_abi::to_abi::strategy("dp", strategy)).unwrap();
        }
        let summary = strategy
            .train(TrainContext {
                config: config.clone(),
                comm: &comm,
                model: &mut model,
                optimizer: &mut opt,
                partitioner: &Blocks,
                train: &train,
                test: &test,
                metrics: &mut sink,
                checkpoints: &mut saved,
            })
            .unwrap();
        assert_eq!(sink.0.len() as u64, summary.steps);
        (model.params.clone(), summary, sink.0)
    })
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(sheaf_testkit::proptest_cases(24)))]

    /// The law: world N with per-rank shards of a global batch B ends where one
    /// process with batch B ends, for any world, batch (even below the world size),
    /// step count and seed; and every rank holds identical parameters.
    #[test]
    fn data_parallel_equals_single_process(n in 2usize..=6, batch in 1usize..=48, steps in 1u64..=12, seed in proptest::prelude::any::<u64>()) {
        let single = train_seeded(1, batch, Some(steps), false, seed);
        let multi = train_seeded(n, batch, Some(steps), false, seed);
        for (p, _) in &multi {
            proptest::prop_assert_eq!(p, &multi[0].0);
        }
        let d = max_abs_diff(&multi[0].0, &single[0].0);
        proptest::prop_assert!(d <= 1e-6, "world {} batch {} steps {}: max abs diff {}", n, batch, steps, d);
    }
}

#[test]
fn world_n_equals_one_process_on_the_same_global_batch() {
    for batch in [32, 25, 3] {
        let single = train(1, batch, Some(10), false);
        for n in 2..=5 {
            let multi = train(n, batch, Some(10), n == 2);
            for (rank, (p, s)) in multi.iter().enumerate() {
                assert_eq!(p, &multi[0].0, "batch {batch} world {n}: rank {rank} differs from rank 0");
                assert_eq!(s.steps, 10);
                let d = max_abs_diff(p, &single[0].0);
                assert!(d <= 1e-6, "batch {batch} world {n}: max abs diff {d}");
            }
        }
    }
}

#[test]
fn whole_run_learns_and_matches_one_process_accuracy() {
    let single = train(1, 16, None, false);
    let multi = train(3, 16, None, true);
    let (s1, s3) = (&single[0].1, &multi[0].1);
    assert_eq!((s3.epochs, s3.steps), (3, 3 * 240usize.div_ceil(16) as u64));
    assert!(s3.test_accuracy > 0.6, "{s3:?}");
    assert!((s1.test_accuracy - s3.test_accuracy).abs() <= 0.01, "{s1:?} vs {s3:?}");
    // The validation figures are the final model's on the whole test split, scored here
    // in one pass.
    let (_, test) = sheaf_data::teacher(300, 8, 3, 5).split(0.2, 1);
    let mut model = Softmax::new(8, 3, 0);
    model.write_params(&multi[0].0).unwrap();
    let all = sheaf_core::Dataset::gather(&test, &(0..test.len()).collect::<Vec<_>>()).unwrap();
    let (loss, correct) = model.evaluate(&all.batch()).unwrap();
    let n = test.len() as f64;
    assert!((s3.test_accuracy - correct as f64 / n).abs() < 1e-9, "{s3:?}: {correct} of {n}");
    assert!((s3.test_loss - loss / n).abs() < 1e-5, "{s3:?}: {}", loss / n);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(sheaf_testkit::proptest_cases(16)))]

    /// The same law with the whole training loop: gradient accumulation, clipping by
    /// the global norm (reported equal to one process's) and a cosine schedule with
    /// warmup.
    #[test]
    fn the_training_loop_equals_single_process(
        n in 2usize..=4,
        batch in 1usize..=24,
        accum in 1usize..=3,
        clip in proptest::option::of(0.05f64..2.0),
        steps in 1u64..=8,
        stepped in proptest::bool::ANY,
        bucket_bytes in 1usize..200,
        zero in 0u8..=2,
        overlap in proptest::bool::ANY,
    ) {
        // Tiny buckets: one per parameter, or the two together.
        let exchange = Exchange {
            stepped,
            config: DataParallelConfig {
                bucket_mb: bucket_bytes as f64 / 1048576.0,
                zero,
                overlap: Some(overlap),
                ..DataParallelConfig::default()
            },
        };
        let config = TrainConfig {
            grad_accum: accum,
            grad_clip: clip,
            lr: LrSchedule { base: 0.5, cosine: true, warmup_steps: 2, min_lr: 0.05 },
            eval_every: Some(3),
            ..TrainConfig::basic(4, 3, batch, Some(steps), 0.5)
        };
        let single = train_with(1, config.clone(), false);
        let multi = train_exchanging(n, config, false, exchange);
        let d = max_abs_diff(&multi[0].0, &single[0].0);
        proptest::prop_assert!(d <= 1e-6, "max abs diff {}", d);
        for (a, b) in multi[0].2.iter().zip(&single[0].2) {
            proptest::prop_assert!((a.grad_norm - b.grad_norm).abs() <= 1e-5 * b.grad_norm.max(1.0), "{} vs {}", a.grad_norm, b.grad_norm);
            proptest::prop_assert_eq!(a.lr, b.lr);
            proptest::prop_assert_eq!(a.val_loss.is_some(), a.step % 3 == 0);
        }
    }
}

/// Three micro-steps of 8 samples are one step of 24: the same samples in the same
/// optimizer steps, the same result up to summation order.
#[test]
fn accumulation_equals_the_larger_batch() {
    let accumulated =
        train_with(2, TrainConfig { grad_accum: 3, ..TrainConfig::basic(9, 1, 8, Some(6), 0.5) }, false);
    let large = train_with(2, TrainConfig::basic(9, 1, 24, Some(6), 0.5), false);
    assert_eq!(accumulated[0].1.steps, 6);
    let d = max_abs_diff(&accumulated[0].0, &large[0].0);
    assert!(d <= 1e-5, "max abs diff {d}");
}

/// Clipping scales the step to the norm asked for: the clipped run's parameters
/// differ from the unclipped one's, and every reported norm is the unclipped norm.
#[test]
fn clipping_bounds_the_update() {
    let free = train_with(1, TrainConfig::basic(9, 1, 16, Some(1), 0.5), false);
    let clipped = train_with(
        1,
        TrainConfig { grad_clip: Some(1e-3), ..TrainConfig::basic(9, 1, 16, Some(1), 0.5) },
        false,
    );
    let norm = free[0].2[0].grad_norm;
    assert!(norm > 1e-3);
    assert_eq!(clipped[0].2[0].grad_norm, norm);
    let start = Softmax::new(8, 3, 100).params;
    let moved = |p: &[f32]| p.iter().zip(&start).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>().sqrt();
    // One momentum-SGD step moves the parameters by lr times the (clipped) gradient.
    assert!((moved(&clipped[0].0) - 0.5 * 1e-3).abs() < 1e-5, "{}", moved(&clipped[0].0));
    assert!((moved(&free[0].0) - 0.5 * norm).abs() < 1e-4 * norm);
}

/// Gradients through bfloat16 on the wire: every rank still holds the same parameters,
/// the run still learns, and it ends near the f32 run (bf16 keeps 8 bits of mantissa,
/// so the parameters drift apart by a little, not by their scale).
#[test]
fn bf16_gradients_stay_in_sync_and_near_f32() {
    let config = TrainConfig::basic(9, 3, 16, None, 0.5);
    let bf16 = Exchange {
        stepped: true,
        config: DataParallelConfig { grad_dtype: crate::GradDType::Bf16, ..DataParallelConfig::default() },
    };
    let narrow = train_exchanging(3, config.clone(), true, bf16);
    let wide = train_with(3, config, false);
    for (p, _, _) in &narrow {
        assert_eq!(p, &narrow[0].0);
    }
    let (n, w) = (&narrow[0].1, &wide[0].1);
    assert!(n.test_accuracy > 0.6 && (n.test_accuracy - w.test_accuracy).abs() <= 0.03, "{n:?} vs {w:?}");
    assert!((n.test_loss - w.test_loss).abs() <= 0.01 * w.test_loss, "{} vs {}", n.test_loss, w.test_loss);
    let d = max_abs_diff(&narrow[0].0, &wide[0].0);
    assert!(d > 0.0 && d < 0.05, "max abs diff {d}");
    // The loss travels alone in f32 beside the bf16 buckets: the first step's, from the
    // same parameters, is the f32 run's.
    let (first, want) = (narrow[0].2[0].loss, wide[0].2[0].loss);
    assert!((first - want).abs() <= 1e-6 * want.abs(), "{first} vs {want}");
}

#[test]
fn bucket_and_wire_settings_are_checked() {
    assert_eq!(
        DataParallelConfig::parse(r#"{"grad_dtype": "bf16", "bucket_mb": 4}"#).unwrap().bucket_mb,
        4.0
    );
    assert_eq!(DataParallelConfig::parse(r#"{"overlap": false}"#).unwrap().overlap, Some(false));
    assert_eq!(DataParallelConfig::parse("{}").unwrap().overlap, None);
    let e = DataParallelConfig::parse(r#"{"overlap": "yes"}"#).unwrap_err().to_string();
    assert!(e.contains("parallel.options.data-parallel"), "{e}");
    for bad in [r#"{"bucket_mb": 0}"#, r#"{"bucket_mb": -1}"#, r#"{"grad_dtype": "f16"}"#] {
        let e = DataParallelConfig::parse(bad).unwrap_err().to_string();
        assert!(e.contains("parallel.options.data-parallel"), "{bad}: {e}");
    }
}

/// ZeRO stages 1 and 2: after 10 steps the parameters equal plain data parallelism's
/// (within 1e-6, the order of the gradient sums aside), every rank holds the same, and
/// each holds 1/world of the optimizer state (measured from what the optimizer
/// reports). Gradient buffers: the step's sums (the model writes into them when a step
/// is one micro-batch), a buffer for each micro-batch's own when steps accumulate, and
/// the rank's shard under ZeRO; stage 2 keeps no full-size sums, only the model's
/// buffer and its shard.
#[test]
fn zero_equals_plain_data_parallel_with_a_shard_of_the_state() {
    let config = TrainConfig { grad_clip: Some(0.5), ..TrainConfig::basic(9, 3, 24, Some(10), 0.5) };
    // The Softmax test model: 8 x 3 weights and 3 biases.
    let total = 27u64;
    for world in [2, 3, 4] {
        for bucket_mb in [25.0, 40.0 / 1048576.0] {
            for (zero, stepped, accum) in [(1, true, 1), (2, true, 1), (2, false, 1), (2, true, 3)] {
                let config = TrainConfig { grad_accum: accum, ..config.clone() };
                let plain = train_with(world, config.clone(), false);
                let sharded = train_exchanging(
                    world,
                    config.clone(),
                    world == 2,
                    Exchange {
                        stepped,
                        config: DataParallelConfig { zero, bucket_mb, ..DataParallelConfig::default() },
                    },
                );
                let case = format!("world {world}, ZeRO {zero}, stepped {stepped}, accum {accum}, buckets of {bucket_mb} MiB");
                let whole = plain[0].1.optimizer_state_bytes_per_rank;
                assert_eq!(whole, total * 4);
                let own = if accum > 1 { total } else { 0 };
                assert_eq!(plain[0].1.gradient_bytes_per_rank, Some((4 * (total + 1 + own)) as f64));
                let (mut held, mut shard_values) = (0, 0);
                for (p, s, m) in &sharded {
                    assert_eq!(p, &sharded[0].0, "{case}");
                    let d = max_abs_diff(p, &plain[0].0);
                    assert!(d <= 1e-6, "{case}: max abs diff {d}");
                    for (a, b) in m.iter().zip(&plain[0].2) {
                        assert!(
                            (a.loss - b.loss).abs() <= 1e-6 * b.loss.abs().max(1.0),
                            "{case}: loss {} vs {}",
                            a.loss,
                            b.loss
                        );
                    }
                    assert!(
                        s.optimizer_state_bytes_per_rank <= whole.div_ceil(world as u64) + 4 * 2,
                        "{case}"
                    );
                    held += s.optimizer_state_bytes_per_rank;
                    let bytes = s.gradient_bytes_per_rank.unwrap() as u64;
                    if zero == 1 {
                        // Its shard is the front of the full-size sum: no buffer beside.
                        assert_eq!(bytes, 4 * (total + 1 + own), "{case}");
                        continue;
                    }
                    let shard = bytes / 4 - total;
                    assert!(shard <= total.div_ceil(world as u64) + 2, "{case}: a shard of {shard} values");
                    shard_values += shard;
                }
                assert_eq!(held, whole, "{case}: the shards together hold the whole state once");
                if zero >= 2 {
                    assert_eq!(
                        shard_values, total,
                        "{case}: the gradient shards together hold every value once"
                    );
                }
            }
        }
    }
}

/// ZeRO stage 2 through bfloat16 on the wire: every rank holds the same parameters and
/// the run ends near the f32 run, as plain data parallelism's bf16 run does.
#[test]
fn zero_2_over_bf16_stays_in_sync_and_near_f32() {
    let config = TrainConfig::basic(9, 3, 16, None, 0.5);
    let narrow = train_exchanging(
        3,
        config.clone(),
        false,
        Exchange {
            stepped: true,
            config: DataParallelConfig {
                zero: 2,
                grad_dtype: crate::GradDType::Bf16,
                ..DataParallelConfig::default()
            },
        },
    );
    let wide = train_with(3, config, false);
    for (p, _, _) in &narrow {
        assert_eq!(p, &narrow[0].0);
    }
    let (n, w) = (&narrow[0].1, &wide[0].1);
    assert!(n.test_accuracy > 0.6 && (n.test_accuracy - w.test_accuracy).abs() <= 0.03, "{n:?} vs {w:?}");
    let d = max_abs_diff(&narrow[0].0, &wide[0].0);
    assert!(d > 0.0 && d < 0.05, "max abs diff {d}");
    // The loss travels alone in f32 beside the bf16 buckets: the first step's, from the
    // same parameters, is the f32 run's.
    let (first, want) = (narrow[0].2[0].loss, wide[0].2[0].loss);
    assert!((first - want).abs() <= 1e-6 * want.abs(), "{first} vs {want}");
}

#[test]
fn zero_stages_are_checked() {
    for stage in 0..=3 {
        assert_eq!(DataParallelConfig::parse(&format!(r#"{{"zero": {stage}}}"#)).unwrap().zero, stage);
    }
    let e = DataParallelConfig::parse(r#"{"zero": 4}"#).unwrap_err().to_string();
    assert!(e.contains("no ZeRO stage 4"), "{e}");
    // Sharding within hosts is ZeRO 3's alone.
    let host = DataParallelConfig::parse(r#"{"zero": 3, "zero_scope": "host"}"#).unwrap();
    assert_eq!(host.zero_scope, crate::ZeroScope::Host);
    let e = DataParallelConfig::parse(r#"{"zero": 2, "zero_scope": "host"}"#).unwrap_err().to_string();
    assert!(e.contains("zero_scope") && e.contains("zero = 3"), "{e}");
    assert!(DataParallelConfig::parse(r#"{"zero": 3, "zero_scope": "rack"}"#).is_err());
    // Each host's ranks, where the launcher says how many; the world where it does not;
    // hosts that cannot hold whole replicas are refused naming the key.
    assert_eq!(host.shard_count_of(8, Some(4)).unwrap(), 4);
    assert_eq!(host.shard_count_of(8, None).unwrap(), 8);
    assert_eq!(host.shard_count_of(8, Some(8)).unwrap(), 8);
    for local in [0, 3, 16] {
        let e = host.shard_count_of(8, Some(local)).unwrap_err().to_string();
        assert!(e.contains("zero_scope") && e.contains(&format!("hosts of {local} ranks")), "{local}: {e}");
    }
    let world = DataParallelConfig::parse(r#"{"zero": 3}"#).unwrap();
    assert_eq!(world.shard_count_of(8, Some(3)).unwrap(), 8, "the world's scope ignores hosts");
}

/// A run resumed from the state a checkpoint handed over (parameters, optimizer
/// state, `start_step`) ends where the uninterrupted run ends, bit for bit, through
/// the ABI as well.
#[test]
fn resuming_from_a_checkpoint_equals_the_uninterrupted_run() {
    let data = sheaf_data::teacher(300, 8, 3, 5);
    let (train_set, test) = data.split(0.2, 1);
    let mut config = TrainConfig::basic(3, 2, 32, Some(9), 0.5);
    config.checkpoint_every = Some(4);
    let run = |config: TrainConfig, from: Option<(Vec<f32>, OptimState)>| {
        run_world(2, |comm| {
            let mut model = Softmax::new(8, 3, 100);
            let mut opt = Momentum { lr: 0.5, buf: vec![] };
            if let Some((params, state)) = &from {
                model.params = params.clone();
                opt.load_state(state).unwrap();
            }
            let (mut sink, mut saved) = (Collect(Vec::new()), Saved::default());
            let strategy = DataParallel::new(DataParallelConfig::default());
            let mut strategy =
                sheaf_abi::from_abi::strategy(sheaf_abi::to_abi::strategy("dp", Box::new(strategy))).unwrap();
            let summary = strategy
                .train(TrainContext {
                    config: config.clone(),
                    comm: &comm,
                    model: &mut model,
                    optimizer: &mut opt,
                    partitioner: &Blocks,
                    train: &train_set,
                    test: &test,
                    metrics: &mut sink,
                    checkpoints: &mut saved,
                })
                .unwrap();
            (model.params.clone(), summary.steps, saved.0, sink.0.first().map(|m| m.step))
        })
    };
    let whole = run(config.clone(), None);
    let saved = &whole[0].2;
    assert_eq!(saved.iter().map(|s| s.0).collect::<Vec<_>>(), [4, 8]);
    let (_, params, state) = saved[0].clone();
    config.start_step = 4;
    let resumed = run(config, Some((params, state)));
    for (w, r) in whole.iter().zip(&resumed) {
        assert_eq!(w.0, r.0, "final parameters");
        assert_eq!((w.1, r.1), (9, 9), "steps");
        assert_eq!(r.3, Some(5), "the resumed run's first step");
    }
}

/// Left to itself, the exchange overlaps the backward pass where a core is spare for
/// it, where the world spans hosts, or where the layout is unknown; not where the
/// workers' compute threads take every core of one host.
#[test]
fn overlap_is_chosen_by_spare_cores_and_hosts() {
    use crate::overlap_by_default as overlap;
    // 2 cores: 2 workers of 1 thread, or 1 of 2, leave none spare.
    assert!(!overlap(2, Some(1), Some(2), Some(2)));
    assert!(!overlap(2, Some(2), Some(1), Some(1)));
    // A core spare: 1 worker of 1 thread on 2 cores, 3 of 2 on 8.
    assert!(overlap(2, Some(1), Some(1), Some(1)));
    assert!(overlap(8, Some(2), Some(3), Some(3)));
    // No thread count: the worker computes on every core.
    assert!(!overlap(8, None, Some(1), Some(1)));
    // Over hosts (2 of 4 ranks here), or nothing known of the layout.
    assert!(overlap(2, Some(1), Some(2), Some(4)));
    assert!(overlap(2, Some(1), None, None));
}

/// A model that fails in the middle of a backward pass (after its bias's bucket went
/// out) fails its rank's run with the model's error, and the rank waiting for it in the
/// next bucket's exchange fails at its deadline naming it: with the exchange on a
/// communication thread or between the backward steps, nothing hangs and no error is
/// swallowed.
#[test]
fn a_model_failing_mid_pass_fails_the_run_on_either_exchange_path() {
    let data = sheaf_data::teacher(300, 8, 3, 5);
    let (train, test) = data.split(0.2, 1);
    for overlap in [false, true] {
        let config = DataParallelConfig {
            overlap: Some(overlap),
            timeout_ms: 2_000,
            // A bucket per parameter: the bias (3 values), then the weights.
            bucket_mb: 16.0 / 1048576.0,
            ..DataParallelConfig::default()
        };
        let started = std::time::Instant::now();
        let outcomes = run_world(2, |comm| {
            let rank = sheaf_core::Communicator::rank(&comm);
            let mut model = Softmax::new(8, 3, 100);
            model.stepped = true;
            // Rank 0's third step fails: the second pass's weights.
            model.fail_in = (rank == 0).then_some(3);
            DataParallel::new(config.clone())
                .train(TrainContext {
                    config: TrainConfig::basic(9, 1, 16, Some(4), 0.5),
                    comm: &comm,
                    model: &mut model,
                    optimizer: &mut Momentum { lr: 0.5, buf: vec![] },
                    partitioner: &Blocks,
                    train: &train,
                    test: &test,
                    metrics: &mut Collect(Vec::new()),
                    checkpoints: &mut Saved::default(),
                })
                .map(|s| s.steps)
        });
        let e0 = outcomes[0].as_ref().unwrap_err().to_string();
        assert!(e0.contains("the model failed mid-pass"), "overlap {overlap}: {e0}");
        let e1 = outcomes[1].as_ref().unwrap_err().to_string();
        assert!(e1.contains("allreduce") && e1.contains("waiting for rank 0"), "overlap {overlap}: {e1}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "overlap {overlap}");
    }
}

/// A replica whose parameters drift (one bit of one value at every pass) is found by
/// the checksum every `checksum_every` steps, every rank told the step; without
/// checksums along the way, by the check at the end.
#[test]
fn drifting_replicas_are_found_at_the_checksum_step() {
    let data = sheaf_data::teacher(300, 8, 3, 5);
    let (train, test) = data.split(0.2, 1);
    for every in [0u64, 3] {
        let outcomes = run_world(2, |comm| {
            let mut model = Softmax::new(8, 3, 100);
            // It lends its buffer, so what the checksum reads is what it runs on.
            (model.drifts, model.lends) = (sheaf_core::Communicator::rank(&comm) == 1, true);
            let config = DataParallelConfig { checksum_every: every, ..DataParallelConfig::default() };
            let mut strategy = DataParallel::new(config);
            sheaf_testkit::train::run_rank(
                &mut strategy,
                &comm,
                &mut model,
                TrainConfig::basic(9, 1, 16, Some(5), 0.5),
                (&train, &test),
            )
            .summary
            .map(|s| s.steps)
            .map_err(|e| e.to_string())
        });
        // Checked every 3 steps: found at step 3; else only by the check at the end.
        let at = if every == 3 { 3 } else { 5 };
        for (rank, o) in outcomes.iter().enumerate() {
            let e = o.as_ref().unwrap_err();
            assert!(
                e.contains(&format!("diverged by step {at}")) && e.contains(&format!("rank {rank} ")),
                "{e}"
            );
        }
    }
}

mod plans;
mod window;
mod zero3;
