//! Pipelines over the in-process transport end where one process ends on the same
//! global batches: 2 and 3 stages, 2 pipelines of 2 stages sharing each batch, both
//! schedules, 1 to 4 micro-batches, with and without ZeRO 1 across the pipelines. The
//! model is a chain of three dense blocks written in the test (a plugin's tests
//! cannot link another plugin's rlib); the end-to-end tests repeat the law with the
//! candle plugin's GPT, tied embeddings, tensor slices and ZeRO 3 inside stages.

use sheaf_core::{Batch, Error, Model, ParamLayout, ParamSpec, Piece, Result, TrainConfig};
use sheaf_testkit::run_world;
use sheaf_testkit::train::{run_rank, softmax_loss_grad, take};

use crate::{Pipeline, PipelineConfig, Schedule};

/// Features, hidden units and classes.
const D: usize = 8;
const H: usize = 6;
const K: usize = 3;

/// Block `b`'s (inputs, outputs, whether a ReLU follows).
const BLOCKS: [(usize, usize, bool); 3] = [(D, H, true), (H, H, true), (H, K, false)];

/// Blocks `blocks` of `relu(W0 x + b0) -> relu(W1 . + b1) -> W2 . + b2`: each block's
/// weight `[out, in]` then bias `[out]`, in block order.
struct Chain {
    blocks: std::ops::Range<usize>,
    layout: ParamLayout,
    params: Vec<f32>,
    grads: Vec<f32>,
    /// Per micro-batch: each held block's input, and its output before the ReLU.
    saved: std::collections::HashMap<u64, Vec<Kept>>,
}

/// A block's input and its output before the ReLU.
type Kept = (Vec<f32>, Vec<f32>);

/// The whole chain's parameters from `seed`.
fn whole_params(seed: u64) -> Vec<f32> {
    let mut g = sheaf_testkit::conformance::SplitMix::new(seed);
    let n: usize = BLOCKS.iter().map(|(i, o, _)| o * i + o).sum();
    (0..n).map(|_| g.next_f32() * 0.6).collect()
}

/// Where block `b`'s parameters start in the whole chain's buffer, and how many.
fn span(b: usize) -> std::ops::Range<usize> {
    let start: usize = BLOCKS[..b].iter().map(|(i, o, _)| o * i + o).sum();
    let (i, o, _) = BLOCKS[b];
    start..start + o * i + o
}

impl Chain {
    fn new(blocks: std::ops::Range<usize>, seed: u64) -> Chain {
        let whole = whole_params(seed);
        let params: Vec<f32> = blocks.clone().flat_map(|b| whole[span(b)].to_vec()).collect();
        let specs = blocks
            .clone()
            .flat_map(|b| {
                let (i, o, _) = BLOCKS[b];
                [
                    ParamSpec { name: format!("l{b}.weight"), shape: vec![o, i] },
                    ParamSpec { name: format!("l{b}.bias"), shape: vec![o] },
                ]
            })
            .collect();
        let grads = vec![0.0; params.len()];
        Chain { blocks, layout: ParamLayout::new(specs), params, grads, saved: Default::default() }
    }

    /// Where held block `b`'s parameters start in this piece's buffer.
    fn offset(&self, b: usize) -> usize {
        span(b).start - span(self.blocks.start).start
    }
}

impl Model for Chain {
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
        Err(Error::Unsupported("the chain trains through its stage interface".into()))
    }
    fn evaluate(&mut self, _: &Batch<'_>) -> Result<(f64, usize)> {
        Err(Error::Unsupported("the chain evaluates through its stage interface".into()))
    }
    fn piece(&self) -> Option<Piece> {
        Some(Piece { blocks: self.blocks.clone(), tensor_rank: 0, tensor_width: 1 })
    }
    fn stage_forward(&mut self, micro: u64, _: usize, input: &[f32], rows: usize) -> Result<Vec<f32>> {
        let mut x = input.to_vec();
        let mut kept = Vec::new();
        for b in self.blocks.clone() {
            let (i, o, relu) = BLOCKS[b];
            let at = self.offset(b);
            let (w, bias) = (&self.params[at..at + o * i], &self.params[at + o * i..at + o * i + o]);
            let z: Vec<f32> = (0..rows)
                .flat_map(|r| {
                    let xr = &x[r * i..(r + 1) * i];
                    (0..o).map(move |j| {
                        bias[j] + w[j * i..(j + 1) * i].iter().zip(xr).map(|(w, x)| w * x).sum::<f32>()
                    })
                })
                .collect();
            let y = if relu { z.iter().map(|v| v.max(0.0)).collect() } else { z.clone() };
            kept.push((x, z));
            x = y;
        }
        self.saved.insert(micro, kept);
        Ok(x)
    }
    fn stage_backward(&mut self, micro: u64, _: usize, grad: &[f32]) -> Result<Vec<f32>> {
        let kept = self.saved.remove(&micro).ok_or_else(|| Error::BadState("no forward kept".into()))?;
        let mut g = grad.to_vec();
        for (b, (x, z)) in self.blocks.clone().zip(kept).rev() {
            let (i, o, relu) = BLOCKS[b];
            let at = self.offset(b);
            if relu {
                g.iter_mut().zip(&z).for_each(|(g, z)| *g = if *z > 0.0 { *g } else { 0.0 });
            }
            let rows = g.len() / o;
            let mut gx = vec![0.0; rows * i];
            for r in 0..rows {
                for j in 0..o {
                    let gj = g[r * o + j];
                    self.grads[at + o * i + j] += gj;
                    for k in 0..i {
                        self.grads[at + j * i + k] += gj * x[r * i + k];
                        gx[r * i + k] += gj * self.params[at + j * i + k];
                    }
                }
            }
            g = gx;
        }
        Ok(g)
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
        self.saved.values().flatten().map(|(x, z)| 4 * (x.len() + z.len()) as u64).sum()
    }
}

/// How a test run lays the chain out.
#[derive(Clone, Copy, Debug)]
struct Layout {
    pipelines: usize,
    stages: usize,
    micro_batches: usize,
    schedule: Schedule,
    zero: u8,
}

/// The blocks of stage `p` of `stages`: three blocks cut as evenly as they go, the
/// first stages taking the extra.
fn cut(stages: usize, p: usize) -> std::ops::Range<usize> {
    sheaf_core::chunk_range(BLOCKS.len(), stages, p)
}

/// The whole chain's final parameters as each pipeline holds them, rank 0's step
/// losses, and its summary.
fn train(l: Layout, batch: usize) -> (Vec<Vec<f32>>, Vec<f64>, sheaf_core::TrainSummary) {
    let (train, test) = data();
    let mut config = TrainConfig::basic(7, 5, batch, None, 0.2);
    config.grad_clip = Some(5.0);
    config.eval_every = Some(3);
    config.grad_accum = 2;
    let out: Vec<_> = run_pipelines(l, &config, (&train, &test))
        .into_iter()
        .map(|(params, ran)| {
            (params, ran.metrics.iter().map(|m| m.loss).collect::<Vec<f64>>(), ran.summary.unwrap())
        })
        .collect();
    let whole =
        out.chunks(l.stages).map(|pipe| pipe.iter().flat_map(|(p, _, _)| p.clone()).collect()).collect();
    (whole, out[0].1.clone(), out[0].2.clone())
}

/// `l`'s pipelines of stages trained on `data` under `config`: every rank's final
/// parameters and run. Every pipeline starts from its own seed (the strategy makes the
/// replicas agree); a broken exchange fails in seconds, not the default minute.
fn run_pipelines(
    l: Layout,
    config: &TrainConfig,
    data: (&sheaf_data::Dataset, &sheaf_data::Dataset),
) -> Vec<(Vec<f32>, sheaf_testkit::train::Ran)> {
    run_world(l.pipelines * l.stages, |comm| {
        let rank = sheaf_core::Communicator::rank(&comm);
        let (d, p) = (rank / l.stages, rank % l.stages);
        let mut model = Chain::new(cut(l.stages, p), 11 + d as u64 * 7);
        let config_json = serde_json::json!({
            "data": l.pipelines,
            "stages": l.stages,
            "micro_batches": l.micro_batches,
            "schedule": match l.schedule { Schedule::Gpipe => "gpipe", Schedule::OneFOneB => "1f1b" },
            "zero": l.zero,
            "timeout_ms": 10_000,
        });
        let mut strategy = Pipeline { config: PipelineConfig::parse(&config_json.to_string()).unwrap() };
        let ran = run_rank(&mut strategy, &comm, &mut model, config.clone(), (data.0, data.1));
        (model.params, ran)
    })
}

/// The training and test splits every run uses.
fn data() -> (sheaf_data::Dataset, sheaf_data::Dataset) {
    sheaf_data::teacher(120, D, K, 5).split(0.25, 1)
}

/// The whole chain's accuracy and mean loss on the test split with parameters
/// `whole`, computed here in one pass.
fn scored(whole: &[f32]) -> (f64, f64) {
    let (_, test) = data();
    let mut chain = Chain::new(0..BLOCKS.len(), 0);
    chain.write_params(whole).unwrap();
    let samples = sheaf_core::Dataset::gather(&test, &(0..test.len()).collect::<Vec<_>>()).unwrap();
    let Batch::Rows { inputs, labels, .. } = samples.batch() else { unreachable!() };
    let logits = chain.stage_forward(0, 0, inputs, labels.len()).unwrap();
    let (loss, correct, _) = softmax_loss_grad(&logits, labels, K, 0.0);
    (correct as f64 / labels.len() as f64, loss / labels.len() as f64)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The law: stages trained as pipelines end as the one process's parameters, every
/// pipeline alike; the loss each step reports and the validation figures agree.
#[test]
fn pipelines_end_where_one_process_ends() {
    let one_process =
        Layout { pipelines: 1, stages: 1, micro_batches: 1, schedule: Schedule::Gpipe, zero: 0 };
    for batch in [16, 7] {
        let (one, one_losses, one_summary) = train(one_process, batch);
        assert!(one_summary.steps > 3, "{one_summary:?}");
        let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
        let (first, last) = (mean(&one_losses[..3]), mean(&one_losses[one_losses.len() - 3..]));
        assert!(last < 0.9 * first, "the chain learns: {one_losses:?}");
        for (pipelines, stages, micro_batches, schedule, zero) in [
            (1, 2, 1, Schedule::Gpipe, 0),
            (1, 3, 4, Schedule::Gpipe, 0),
            (1, 3, 3, Schedule::OneFOneB, 0),
            (2, 2, 2, Schedule::OneFOneB, 0),
            (2, 2, 4, Schedule::Gpipe, 1),
            (3, 1, 2, Schedule::OneFOneB, 1),
        ] {
            let l = Layout { pipelines, stages, micro_batches, schedule, zero };
            let (pipes, losses, summary) = train(l, batch);
            for (d, whole) in pipes.iter().enumerate() {
                let diff = max_abs_diff(whole, &one[0]);
                assert!(diff < 2e-5, "batch {batch}, {l:?}: pipeline {d} differs by {diff}");
                assert_eq!(whole, &pipes[0], "batch {batch}, {l:?}: pipeline {d} differs from pipeline 0");
            }
            assert_eq!((summary.steps, losses.len()), (one_summary.steps, one_losses.len()), "{l:?}");
            for (a, b) in losses.iter().zip(&one_losses) {
                assert!((a - b).abs() < 1e-5, "batch {batch}, {l:?}: loss {a} vs {b}");
            }
            assert!((summary.test_accuracy - one_summary.test_accuracy).abs() < 1e-9, "{l:?}");
            assert!((summary.test_loss - one_summary.test_loss).abs() < 1e-5, "{l:?}");
            // The validation figures are the final model's on the whole test split.
            let (accuracy, loss) = scored(&one[0]);
            assert!(
                (summary.test_accuracy - accuracy).abs() < 1e-9,
                "{l:?}: {} vs {accuracy}",
                summary.test_accuracy
            );
            assert!((summary.test_loss - loss).abs() < 1e-5, "{l:?}: {} vs {loss}", summary.test_loss);
        }
    }
}

/// The plugin builds the strategy it lists, and only that.
#[test]
fn provides_what_it_builds() {
    use sheaf_abi::Plugin;
    sheaf_testkit::train::check_strategy_factory(
        crate::PipelinePlugin::provides(),
        crate::PipelinePlugin::strategy,
    );
}

/// What a rank is handed is checked before it trains: a batch of 0, and a stage that
/// does not hold block 0 first, are errors naming what is wrong.
#[test]
fn bad_contexts_are_refused() {
    let (train, test) = data();
    let run = |batch: usize, first: std::ops::Range<usize>| {
        run_world(2, |comm| {
            let rank = sheaf_core::Communicator::rank(&comm);
            let mut model = Chain::new(if rank == 0 { first.clone() } else { 2..3 }, 1);
            // A stage waits for a refused one until its deadline.
            let config = PipelineConfig { timeout_ms: 500, micro_batches: 2, ..Default::default() };
            let mut strategy = Pipeline { config };
            let result = run_rank(
                &mut strategy,
                &comm,
                &mut model,
                TrainConfig::basic(1, 1, batch, Some(1), 0.1),
                (&train, &test),
            )
            .summary;
            result.err().map(|e| e.to_string())
        })
    };
    let errors = run(0, 0..2);
    assert!(
        errors.iter().all(|e| e.as_deref().is_some_and(|e| e.contains("train.batch_size"))),
        "{errors:?}"
    );
    let errors = run(8, 1..2);
    let e = errors[0].as_deref().expect("stage 0 without block 0");
    assert!(e.contains("stage 0 holds blocks 1..2: stage 0, and only stage 0, must hold block 0"), "{e}");
    assert_eq!(run(8, 0..2), [None, None]);
}

/// One step on the whole training split, against the step computed here from its
/// definition (the mean cross-entropy's gradient, clipped to `clip`, one momentum-SGD
/// step from the first pipeline's parameters), with the mean loss reported; under
/// GPipe a stage keeps its share's activations of every micro-batch at once, under
/// 1F1B no more; ZeRO 1 keeps each piece's momentum over the pipelines.
#[test]
fn one_step_is_the_definition() {
    let (train, test) = data();
    let n = train.len();
    for clip in [None, Some(0.05)] {
        let mut chain = Chain::new(0..BLOCKS.len(), 11);
        let samples = sheaf_core::Dataset::gather(&train, &(0..n).collect::<Vec<_>>()).unwrap();
        let Batch::Rows { inputs, labels, .. } = samples.batch() else { unreachable!() };
        let logits = chain.stage_forward(0, 0, inputs, n).unwrap();
        let (loss_sum, _, grad) = softmax_loss_grad(&logits, labels, K, 1.0 / n as f32);
        chain.stage_backward(0, 0, &grad).unwrap();
        let mut g = vec![0.0; chain.params.len()];
        chain.take_grads(&mut g).unwrap();
        let norm = g.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        let factor = clip.map_or(1.0, |c| (c / norm).min(1.0)) as f32;
        let want: Vec<f32> = chain.params.iter().zip(&g).map(|(w, g)| w - 0.2 * g * factor).collect();
        for (pipelines, stages, micro_batches, schedule, zero) in [
            (1, 1, 1, Schedule::Gpipe, 0),
            (1, 3, 4, Schedule::Gpipe, 0),
            (1, 2, 3, Schedule::OneFOneB, 0),
            (2, 2, 2, Schedule::Gpipe, 1),
            (3, 1, 2, Schedule::OneFOneB, 1),
        ] {
            let l = Layout { pipelines, stages, micro_batches, schedule, zero };
            let mut config = TrainConfig::basic(7, 1, n, Some(1), 0.2);
            config.grad_clip = clip;
            let out: Vec<_> = run_pipelines(l, &config, (&train, &test))
                .into_iter()
                .map(|(params, ran)| {
                    let peak = ran.summary.unwrap().peak_activation_bytes;
                    (params, ran.metrics[0].loss, peak, ran.momentum.len())
                })
                .collect();
            for (d, pipe) in out.chunks(stages).enumerate() {
                let whole: Vec<f32> = pipe.iter().flat_map(|o| o.0.clone()).collect();
                let diff = max_abs_diff(&whole, &want);
                assert!(diff < 1e-6, "clip {clip:?}, {l:?}: pipeline {d} is {diff} from the step by hand");
            }
            for (rank, (params, loss, peak, momentum)) in out.iter().enumerate() {
                assert!((loss - loss_sum / n as f64).abs() < 1e-6, "{l:?}: rank {rank} reports loss {loss}");
                let (d, p) = (rank / stages, rank % stages);
                let share = sheaf_core::chunk_range(n, pipelines, d).len();
                let per_row: usize = cut(stages, p).map(|b| BLOCKS[b].0 + BLOCKS[b].1).sum();
                let all = 4 * (share * per_row) as u64;
                match schedule {
                    Schedule::Gpipe => assert_eq!(*peak, all, "{l:?}: rank {rank}'s kept activations"),
                    Schedule::OneFOneB => {
                        let kept = (stages - p).min(micro_batches);
                        let most = 4 * (kept * share.div_ceil(micro_batches) * per_row) as u64;
                        assert!(
                            *peak > 0 && *peak <= most.min(all),
                            "{l:?}: rank {rank} kept {peak} of at most {most}"
                        );
                    }
                }
                let whole = params.len();
                let held = if zero == 1 { sheaf_core::chunk_range(whole, pipelines, d).len() } else { whole };
                assert_eq!(*momentum, held, "{l:?}: rank {rank}'s momentum");
            }
        }
    }
}
