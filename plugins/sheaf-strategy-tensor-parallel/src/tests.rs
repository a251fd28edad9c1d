//! Tensor-parallel training over the in-process transport ends where one process ends
//! on the same global batches: groups of 2 and 3 slices, 2 groups of 2 sharing each
//! batch, with and without ZeRO 1 across the groups. The model is a column- then
//! row-parallel pair written in the test (a plugin's tests cannot link another
//! plugin's rlib); the end-to-end tests repeat the law with the candle plugin's GPT.

use sheaf_core::{
    Batch, Error, Model, ParamLayout, ParamSpec, Piece, Result, Strategy, TrainConfig, TrainSummary,
};
use sheaf_testkit::run_world;
use sheaf_testkit::train::{run_rank, softmax_loss_grad, take};

use crate::{TensorParallel, TensorParallelConfig};

/// Features, hidden units and classes of the pair.
const D: usize = 8;
const H: usize = 6;
const K: usize = 3;

/// `logits = relu(x W1^T + b1) W2^T + b2`, held as slice `t` of `width`: `W1`'s and
/// `b1`'s rows `t` (column-parallel), `W2`'s matching columns (row-parallel), `b2`
/// whole on every slice. Segment 0 is the slice's part of the pre-bias logits (summed
/// over the group by the strategy), segment 1 adds `b2`.
struct Pair {
    t: usize,
    width: usize,
    layout: ParamLayout,
    /// `w1 [h, D]`, `b1 [h]`, `w2 [K, h]`, `b2 [K]` for this slice's `h` units.
    params: Vec<f32>,
    grads: Vec<f32>,
    /// Per micro-batch: the input and the hidden activations.
    saved: std::collections::HashMap<u64, (Vec<f32>, Vec<f32>)>,
}

impl Pair {
    /// Slice `t` of `width` of the pair whose whole parameters come from `seed`.
    fn new(t: usize, width: usize, seed: u64) -> Pair {
        let whole = whole_params(seed);
        let h = H / width;
        let rows = t * h..(t + 1) * h;
        let (w1, rest) = whole.split_at(H * D);
        let (b1, rest) = rest.split_at(H);
        let (w2, b2) = rest.split_at(K * H);
        let mut params: Vec<f32> = w1[rows.start * D..rows.end * D].to_vec();
        params.extend_from_slice(&b1[rows.clone()]);
        params.extend((0..K).flat_map(|k| w2[k * H + rows.start..k * H + rows.end].to_vec()));
        params.extend_from_slice(b2);
        let spec = |name: &str, shape: Vec<usize>| ParamSpec { name: name.into(), shape };
        let layout = ParamLayout::new(vec![
            spec("w1", vec![h, D]),
            spec("b1", vec![h]),
            spec("w2", vec![K, h]),
            spec("b2", vec![K]),
        ]);
        let grads = vec![0.0; layout.total()];
        Pair { t, width, layout, params, grads, saved: Default::default() }
    }

    fn h(&self) -> usize {
        H / self.width
    }

    /// The slices' parameters put back together as the whole pair's.
    fn assemble(slices: &[Vec<f32>]) -> Vec<f32> {
        let h = H / slices.len();
        let mut w1 = Vec::new();
        let mut b1 = Vec::new();
        let mut w2 = vec![0.0; K * H];
        for (t, p) in slices.iter().enumerate() {
            w1.extend_from_slice(&p[..h * D]);
            b1.extend_from_slice(&p[h * D..h * D + h]);
            for k in 0..K {
                let from = h * D + h + k * h;
                w2[k * H + t * h..k * H + (t + 1) * h].copy_from_slice(&p[from..from + h]);
            }
        }
        let b2 = &slices[0][slices[0].len() - K..];
        [w1, b1, w2, b2.to_vec()].concat()
    }
}

fn whole_params(seed: u64) -> Vec<f32> {
    let mut g = sheaf_testkit::conformance::SplitMix::new(seed);
    (0..H * D + H + K * H + K).map(|_| g.next_f32() * 0.5).collect()
}

impl Model for Pair {
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
    fn forward_backward(&mut self, _: &Batch<'_>, _: &mut [f32]) -> Result<f32> {
        Err(Error::Unsupported("the pair trains through its stage interface".into()))
    }
    fn evaluate(&mut self, _: &Batch<'_>) -> Result<(f64, usize)> {
        Err(Error::Unsupported("the pair evaluates through its stage interface".into()))
    }
    fn piece(&self) -> Option<Piece> {
        Some(Piece { blocks: 0..1, tensor_rank: self.t, tensor_width: self.width })
    }
    fn segments(&self) -> usize {
        2
    }
    fn replicated_params(&self) -> Vec<bool> {
        vec![false, false, false, true]
    }
    fn stage_forward(&mut self, micro: u64, segment: usize, input: &[f32], rows: usize) -> Result<Vec<f32>> {
        let h = self.h();
        let (w1, rest) = self.params.split_at(h * D);
        let (b1, rest) = rest.split_at(h);
        let (w2, b2) = rest.split_at(K * h);
        if segment == 1 {
            return Ok(input.chunks(K).flat_map(|row| row.iter().zip(b2).map(|(y, b)| y + b)).collect());
        }
        let hidden: Vec<f32> = (0..rows)
            .flat_map(|r| {
                let x = &input[r * D..(r + 1) * D];
                (0..h).map(move |j| {
                    let z = b1[j] + w1[j * D..(j + 1) * D].iter().zip(x).map(|(w, x)| w * x).sum::<f32>();
                    z.max(0.0)
                })
            })
            .collect();
        let out = (0..rows)
            .flat_map(|r| {
                let a = &hidden[r * h..(r + 1) * h];
                (0..K).map(move |k| w2[k * h..(k + 1) * h].iter().zip(a).map(|(w, a)| w * a).sum::<f32>())
            })
            .collect();
        self.saved.insert(micro, (input.to_vec(), hidden));
        Ok(out)
    }
    fn stage_backward(&mut self, micro: u64, segment: usize, grad: &[f32]) -> Result<Vec<f32>> {
        let h = self.h();
        let (gw1, rest) = self.grads.split_at_mut(h * D);
        let (gb1, rest) = rest.split_at_mut(h);
        let (gw2, gb2) = rest.split_at_mut(K * h);
        if segment == 1 {
            for row in grad.chunks(K) {
                gb2.iter_mut().zip(row).for_each(|(g, d)| *g += d);
            }
            return Ok(grad.to_vec());
        }
        let (x, hidden) =
            self.saved.remove(&micro).ok_or_else(|| Error::BadState("no forward kept".into()))?;
        let w1 = &self.params[..h * D];
        let w2 = &self.params[h * D + h..h * D + h + K * h];
        let rows = grad.len() / K;
        let mut gx = vec![0.0; rows * D];
        for r in 0..rows {
            let (g, a, xr) = (&grad[r * K..(r + 1) * K], &hidden[r * h..(r + 1) * h], &x[r * D..(r + 1) * D]);
            for j in 0..h {
                let mut ga = 0.0;
                for k in 0..K {
                    gw2[k * h + j] += g[k] * a[j];
                    ga += g[k] * w2[k * h + j];
                }
                if a[j] > 0.0 {
                    gb1[j] += ga;
                    for i in 0..D {
                        gw1[j * D + i] += ga * xr[i];
                        gx[r * D + i] += ga * w1[j * D + i];
                    }
                }
            }
        }
        Ok(gx)
    }
    fn loss_grad(&mut self, logits: &[f32], labels: &[u32], scale: f32) -> Result<(f64, usize, Vec<f32>)> {
        Ok(softmax_loss_grad(logits, labels, K, scale))
    }
    fn take_grads(&mut self, out: &mut [f32]) -> Result<()> {
        take(&mut self.grads, out);
        Ok(())
    }
    fn drop_saved(&mut self) {
        self.saved.clear();
    }
    fn saved_bytes(&self) -> u64 {
        self.saved.values().map(|(x, h)| 4 * (x.len() + h.len()) as u64).sum()
    }
}

/// Every rank's final parameters and summary, and rank 0's step metrics, after
/// training `groups` groups of `width` slices on the same data and batches.
fn train(groups: usize, width: usize, zero: u8, batch: usize) -> (Vec<Vec<f32>>, TrainSummary, Vec<f64>) {
    let (train, test) = data();
    let mut config = TrainConfig::basic(7, 2, batch, None, 0.2);
    config.grad_clip = Some(5.0);
    config.eval_every = Some(3);
    let out: Vec<_> = run_groups(groups, width, zero, &config, (&train, &test))
        .into_iter()
        .map(|(params, ran)| {
            (params, ran.summary.unwrap(), ran.metrics.iter().map(|m| m.loss).collect::<Vec<f64>>())
        })
        .collect();
    let summary = out[0].1.clone();
    let losses = out[0].2.clone();
    (out.into_iter().map(|(p, _, _)| p).collect(), summary, losses)
}

/// The test split (as [`train`] splits it), and the whole pair's accuracy and mean
/// loss on it with parameters `whole`, computed here in one pass.
fn scored(whole: &[f32]) -> (f64, f64) {
    let (_, test) = data();
    let mut pair = Pair::new(0, 1, 0);
    pair.write_params(whole).unwrap();
    let samples = sheaf_core::Dataset::gather(&test, &(0..test.len()).collect::<Vec<_>>()).unwrap();
    let sheaf_core::Batch::Rows { inputs, labels, .. } = samples.batch() else { unreachable!() };
    let partial = pair.stage_forward(0, 0, inputs, labels.len()).unwrap();
    let logits = pair.stage_forward(0, 1, &partial, labels.len()).unwrap();
    let (loss, correct, _) = softmax_loss_grad(&logits, labels, K, 0.0);
    (correct as f64 / labels.len() as f64, loss / labels.len() as f64)
}

/// The training and test splits every run uses.
fn data() -> (sheaf_data::Dataset, sheaf_data::Dataset) {
    sheaf_data::teacher(120, D, K, 5).split(0.25, 1)
}

/// `groups` groups of `width` slices trained on `data` under `config`: every rank's
/// final parameters and run. Every group starts from its own seed (the strategy makes
/// the replicas agree); a broken exchange fails in seconds, not the default minute.
fn run_groups(
    groups: usize,
    width: usize,
    zero: u8,
    config: &TrainConfig,
    data: (&sheaf_data::Dataset, &sheaf_data::Dataset),
) -> Vec<(Vec<f32>, sheaf_testkit::train::Ran)> {
    run_world(groups * width, |comm| {
        let rank = sheaf_core::Communicator::rank(&comm);
        let mut model = Pair::new(rank % width, width, 11 + (rank / width) as u64 * 7);
        let config_tp =
            TensorParallelConfig { data: Some(groups), width: Some(width), zero, timeout_ms: 10_000 };
        let mut strategy = TensorParallel { config: config_tp };
        let ran = run_rank(&mut strategy, &comm, &mut model, config.clone(), (data.0, data.1));
        (model.params, ran)
    })
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The law: slices trained together end as the one process's parameters, every group
/// alike; the loss each step reports and the validation figures agree with it.
#[test]
fn slices_end_where_one_process_ends() {
    for batch in [16, 7] {
        let (one, one_summary, one_losses) = train(1, 1, 0, batch);
        assert!(one_summary.steps > 6, "{one_summary:?}");
        // The pair's own gradients are right: one process learns.
        let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
        let (first, last) = (mean(&one_losses[..3]), mean(&one_losses[one_losses.len() - 4..]));
        assert!(last < 0.9 * first, "{one_losses:?}");
        for (groups, width, zero) in [(1, 2, 0), (1, 3, 0), (2, 2, 0), (2, 2, 1), (3, 1, 1)] {
            let (ranks, summary, losses) = train(groups, width, zero, batch);
            let label = format!("batch {batch}, {groups} groups of {width}, zero {zero}");
            for g in 0..groups {
                let slices = &ranks[g * width..(g + 1) * width];
                let whole = Pair::assemble(slices);
                let d = max_abs_diff(&whole, &one[0]);
                assert!(d < 2e-5, "{label}: group {g} differs by {d}");
                assert_eq!(slices, &ranks[..width], "{label}: group {g} differs from group 0");
            }
            assert_eq!(summary.steps, one_summary.steps, "{label}");
            assert_eq!(losses.len(), one_losses.len(), "{label}");
            for (a, b) in losses.iter().zip(&one_losses) {
                assert!((a - b).abs() < 1e-5, "{label}: loss {a} vs {b}");
            }
            assert!((summary.test_accuracy - one_summary.test_accuracy).abs() < 1e-9, "{label}");
            assert!((summary.test_loss - one_summary.test_loss).abs() < 1e-5, "{label}");
            // The validation figures are the final model's on the whole test split.
            let (accuracy, loss) = scored(&one[0]);
            assert!(
                (summary.test_accuracy - accuracy).abs() < 1e-9,
                "{label}: {} vs {accuracy}",
                summary.test_accuracy
            );
            assert!((summary.test_loss - loss).abs() < 1e-5, "{label}: {} vs {loss}", summary.test_loss);
        }
    }
}

/// A model partitioner a tensor-parallel plan must not need.
struct Uncut;

impl sheaf_core::ModelPartitioner for Uncut {
    fn cut(&self, _: &[u64], _: usize) -> Result<Vec<std::ops::Range<usize>>> {
        Err(Error::Unsupported("tensor slices cut no blocks".into()))
    }
}

/// A plan of `D` groups of `T`: rank `d * T + t` holds slice `t` of every block, its
/// group's share of the batch in flight, its state over the groups under ZeRO 1; a
/// world that is not `D x T` is refused naming the key.
#[test]
fn plans_lay_groups_of_slices() {
    let blocks = vec![sheaf_core::Block { name: "b".into(), params: 1 }; 3];
    let costs = [1, 1, 1];
    let plan = |data, width, zero, world| {
        let strategy = TensorParallel {
            config: TensorParallelConfig { data: Some(data), width, zero, ..Default::default() },
        };
        let input = sheaf_core::PlanInput {
            world,
            blocks: &blocks,
            costs: &costs,
            batch_size: 10,
            partitioner: &Uncut,
        };
        strategy.plan(&input)
    };
    let p = plan(2, Some(3), 1, 6).unwrap();
    assert!(p.stage_interface);
    for (r, rank) in p.ranks.iter().enumerate() {
        assert_eq!(
            (rank.piece.blocks.clone(), rank.piece.tensor_rank, rank.piece.tensor_width),
            (0..3, r % 3, 3)
        );
        assert_eq!((rank.activation_samples, rank.state_shards, rank.param_shard), (5, 2, None));
    }
    let p = plan(3, None, 0, 6).unwrap();
    assert_eq!(
        (p.ranks[5].piece.tensor_width, p.ranks[5].piece.tensor_rank, p.ranks[0].state_shards),
        (2, 1, 1)
    );
    assert_eq!(p.ranks[0].activation_samples, 4, "10 samples over 3 groups, rounded up");
    let e = plan(2, Some(2), 0, 6).unwrap_err().to_string();
    assert!(e.contains("parallel.options.tensor-parallel.width") && e.contains("need 4 ranks, not 6"), "{e}");
}

/// The plugin builds the strategy it lists, and only that.
#[test]
fn provides_what_it_builds() {
    use sheaf_abi::Plugin;
    sheaf_testkit::train::check_strategy_factory(
        crate::TensorParallelPlugin::provides(),
        crate::TensorParallelPlugin::strategy,
    );
}

/// What a rank is handed is checked before it trains: a batch of 0, and a slice that
/// is not the one its place in the world holds, are errors naming what is wrong.
#[test]
fn bad_contexts_are_refused() {
    let (train, test) = data();
    let run = |batch: usize, slice: usize| {
        run_world(2, |comm| {
            let rank = sheaf_core::Communicator::rank(&comm);
            let mut model = Pair::new(if rank == 1 { slice } else { 0 }, 2, 1);
            // Rank 0 waits for a refused rank 1 until its deadline.
            let config = TensorParallelConfig { timeout_ms: 500, ..Default::default() };
            let mut strategy = TensorParallel { config };
            sheaf_testkit::train::refusal(&mut strategy, &comm, &mut model, batch, (&train, &test))
        })
    };
    let errors = run(0, 1);
    assert!(
        errors.iter().all(|e| e.as_deref().is_some_and(|e| e.contains("train.batch_size"))),
        "{errors:?}"
    );
    let errors = run(8, 0);
    let e = errors[1].as_deref().expect("rank 1 holds slice 0");
    assert!(e.contains("rank 1 holds tensor slice 0 of 2, expected 1 of 2"), "{e}");
    assert_eq!(run(8, 1), [None, None]);
}

/// Widths and group counts of 0 are refused naming the table.
#[test]
fn empty_groups_are_refused() {
    for json in [r#"{"width": 0}"#, r#"{"data": 0}"#, r#"{"width": 0, "data": 0}"#] {
        let e = TensorParallelConfig::parse(json).unwrap_err().to_string();
        assert!(e.contains("parallel.options.tensor-parallel") && e.contains("at least 1"), "{json}: {e}");
    }
    assert_eq!(TensorParallelConfig::parse(r#"{"width": 2, "data": 1}"#).unwrap().layout(2).unwrap(), (1, 2));
}

/// One step on the whole training split, against the step computed here from its
/// definition: the mean cross-entropy's gradient (with replicated `b2` counted once in
/// the norm, clipped to `clip`), one momentum-SGD step from the first group's
/// parameters, the mean loss reported; every rank kept one micro-batch of its group's
/// share; ZeRO 1 keeps each slice's momentum over the groups.
#[test]
fn one_step_is_the_definition() {
    let (train, test) = data();
    let n = train.len();
    for clip in [None, Some(0.05)] {
        // The step by hand, on the whole pair.
        let mut pair = Pair::new(0, 1, 11);
        let samples = sheaf_core::Dataset::gather(&train, &(0..n).collect::<Vec<_>>()).unwrap();
        let Batch::Rows { inputs, labels, .. } = samples.batch() else { unreachable!() };
        let partial = pair.stage_forward(0, 0, inputs, n).unwrap();
        let logits = pair.stage_forward(0, 1, &partial, n).unwrap();
        let (loss_sum, _, grad) = softmax_loss_grad(&logits, labels, K, 1.0 / n as f32);
        let back = pair.stage_backward(0, 1, &grad).unwrap();
        pair.stage_backward(0, 0, &back).unwrap();
        let mut g = vec![0.0; pair.params.len()];
        pair.take_grads(&mut g).unwrap();
        let norm = g.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        let factor = clip.map_or(1.0, |c| (c / norm).min(1.0)) as f32;
        let want: Vec<f32> = pair.params.iter().zip(&g).map(|(w, g)| w - 0.2 * g * factor).collect();
        for (groups, width, zero) in [(1, 1, 0), (1, 2, 0), (1, 3, 0), (2, 2, 0), (2, 3, 1), (3, 1, 1)] {
            let label = format!("clip {clip:?}, {groups} groups of {width}, zero {zero}");
            let mut config = TrainConfig::basic(7, 1, n, Some(1), 0.2);
            config.grad_clip = clip;
            let out: Vec<_> = run_groups(groups, width, zero, &config, (&train, &test))
                .into_iter()
                .map(|(params, ran)| {
                    let peak = ran.summary.unwrap().peak_activation_bytes;
                    (params, ran.metrics[0].loss, peak, ran.momentum.len())
                })
                .collect();
            for g in 0..groups {
                let slices: Vec<Vec<f32>> =
                    out[g * width..(g + 1) * width].iter().map(|o| o.0.clone()).collect();
                let d = max_abs_diff(&Pair::assemble(&slices), &want);
                assert!(d < 1e-6, "{label}: group {g} is {d} from the step by hand");
            }
            let h = H / width;
            for (rank, (_, loss, peak, momentum)) in out.iter().enumerate() {
                assert!(
                    (loss - loss_sum / n as f64).abs() < 1e-6,
                    "{label}: rank {rank} reports loss {loss}"
                );
                let share = sheaf_core::chunk_range(n, groups, rank / width).len();
                assert_eq!(*peak, 4 * (share * (D + h)) as u64, "{label}: rank {rank}'s kept activations");
                let slice = h * D + h + K * h + K;
                let kept = if zero == 1 {
                    sheaf_core::chunk_range(slice, groups, rank / width).len()
                } else {
                    slice
                };
                assert_eq!(*momentum, kept, "{label}: rank {rank}'s momentum");
            }
        }
    }
}
