//! Pipelines over the in-process transport end where one process ends on the same
//! global batches: 2 and 3 stages, 2 pipelines of 2 stages sharing each batch, both
//! schedules, 1 to 4 micro-batches, with ZeRO 1 across the pipelines and with ZeRO 3
//! inside the stages (each stage's replicas holding its rows). The model is the
//! testkit's chain of three dense blocks (a plugin's tests cannot link another
//! plugin's rlib); the end-to-end tests repeat the law with the candle plugin's GPT,
//! tied embeddings and tensor slices.

use sheaf_core::{Batch, Model, TrainConfig};
use sheaf_testkit::chain::{joined, layout_of, Chain, BLOCKS, D, K};
use sheaf_testkit::run_world;
use sheaf_testkit::train::{run_rank, softmax_loss_grad, Ran};

use crate::{Pipeline, PipelineConfig, Schedule};

/// How a test run lays the chain out.
#[derive(Clone, Copy, Debug)]
struct Layout {
    pipelines: usize,
    stages: usize,
    micro_batches: usize,
    schedule: Schedule,
    zero: u8,
    /// Under ZeRO 3, `reshard_after_forward = false`: a unit gathered stays to the step's end.
    keep: bool,
}

impl Layout {
    fn new(pipelines: usize, stages: usize, micro_batches: usize, schedule: Schedule, zero: u8) -> Layout {
        Layout { pipelines, stages, micro_batches, schedule, zero, keep: false }
    }
}

/// The blocks of stage `p` of `stages`: three blocks cut as evenly as they go, the
/// first stages taking the extra.
fn cut(stages: usize, p: usize) -> std::ops::Range<usize> {
    sheaf_core::chunk_range(BLOCKS.len(), stages, p)
}

/// The whole chain's final parameters as each pipeline holds them, rank 0's step
/// losses, its summary, and the most blocks any rank's piece buffer held gathered.
fn train(l: Layout, batch: usize) -> (Vec<Vec<f32>>, Vec<f64>, sheaf_core::TrainSummary, usize) {
    let (train, test) = data();
    let mut config = TrainConfig::basic(7, 5, batch, None, 0.2);
    config.grad_clip = Some(5.0);
    config.eval_every = Some(3);
    config.grad_accum = 2;
    let mut out = run_pipelines(l, &config, (&train, &test));
    let whole = wholes(l, &out);
    let gathered = out.iter().map(|r| r.most_gathered).max().unwrap_or(0);
    let first = out.swap_remove(0).ran;
    let losses = first.metrics.iter().map(|m| m.loss).collect();
    (whole, losses, first.summary.unwrap(), gathered)
}

/// What a rank ends with: its parameters (its rows under ZeRO 3), its run, and the
/// most blocks its piece buffer held gathered at once.
struct Rank {
    params: Vec<f32>,
    ran: Ran,
    most_gathered: usize,
}

/// The whole chain as each pipeline holds it at the end: its stages' parameters in
/// order; under ZeRO 3 each stage's replicas' rows joined (one chain, held together).
fn wholes(l: Layout, out: &[Rank]) -> Vec<Vec<f32>> {
    let held = |d: usize, p: usize| out[d * l.stages + p].params.clone();
    let stage = |d: usize, p: usize| match l.zero {
        3 => joined(&layout_of(cut(l.stages, p)), &(0..l.pipelines).map(|q| held(q, p)).collect::<Vec<_>>()),
        _ => held(d, p),
    };
    (0..l.pipelines).map(|d| (0..l.stages).flat_map(|p| stage(d, p)).collect()).collect()
}

/// `l`'s pipelines of stages trained on `data` under `config`. Every pipeline starts
/// from its own seed (the strategy makes the replicas agree), except under ZeRO 3,
/// where each replica holds its rows of one chain, as a compute plugin builds them; a
/// broken exchange fails in seconds, not the default minute.
fn run_pipelines(
    l: Layout,
    config: &TrainConfig,
    data: (&sheaf_data::Dataset, &sheaf_data::Dataset),
) -> Vec<Rank> {
    run_world(l.pipelines * l.stages, |comm| {
        let rank = sheaf_core::Communicator::rank(&comm);
        let (d, p) = (rank / l.stages, rank % l.stages);
        let sharded = l.zero == 3;
        let mut model = Chain::new(cut(l.stages, p), if sharded { 11 } else { 11 + d as u64 * 7 });
        if sharded {
            model = model.row_shard(d, l.pipelines);
        }
        let config_json = serde_json::json!({
            "data": l.pipelines,
            "stages": l.stages,
            "micro_batches": l.micro_batches,
            "schedule": match l.schedule { Schedule::Gpipe => "gpipe", Schedule::OneFOneB => "1f1b" },
            "zero": l.zero,
            "reshard_after_forward": !l.keep,
            "timeout_ms": 10_000,
        });
        let mut strategy = Pipeline { config: PipelineConfig::parse(&config_json.to_string()).unwrap() };
        let ran = run_rank(&mut strategy, &comm, &mut model, config.clone(), (data.0, data.1));
        let mut params = vec![0.0; model.layout().total()];
        model.read_params(&mut params).unwrap();
        Rank { params, ran, most_gathered: model.most_gathered }
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
    let one_process = Layout::new(1, 1, 1, Schedule::Gpipe, 0);
    for batch in [16, 7] {
        let (one, one_losses, one_summary, _) = train(one_process, batch);
        assert!(one_summary.steps > 3, "{one_summary:?}");
        let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
        let (first, last) = (mean(&one_losses[..3]), mean(&one_losses[one_losses.len() - 3..]));
        assert!(last < 0.9 * first, "the chain learns: {one_losses:?}");
        for (pipelines, stages, micro_batches, schedule, zero, keep) in [
            (1, 2, 1, Schedule::Gpipe, 0, false),
            (1, 3, 4, Schedule::Gpipe, 0, false),
            (1, 3, 3, Schedule::OneFOneB, 0, false),
            (2, 2, 2, Schedule::OneFOneB, 0, false),
            (2, 2, 4, Schedule::Gpipe, 1, false),
            (3, 1, 2, Schedule::OneFOneB, 1, false),
            (2, 1, 2, Schedule::Gpipe, 3, false),
            (3, 2, 3, Schedule::OneFOneB, 3, false),
            (2, 2, 2, Schedule::Gpipe, 3, true),
            (4, 1, 1, Schedule::OneFOneB, 3, true),
        ] {
            let l = Layout { pipelines, stages, micro_batches, schedule, zero, keep };
            let (pipes, losses, summary, gathered) = train(l, batch);
            // ZeRO 3 keeps one block gathered at a time (a stage of one block, whichever),
            // or with `keep` every block of the stage once gathered.
            let blocks = cut(stages, 0).len();
            let want = match (zero, keep) {
                (3, false) => 1,
                (3, true) => blocks,
                _ => 0,
            };
            assert_eq!(gathered, want, "batch {batch}, {l:?}: blocks gathered at once");
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
            sheaf_testkit::train::refusal(&mut strategy, &comm, &mut model, batch, (&train, &test))
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
/// 1F1B no more; ZeRO 1 keeps each piece's momentum over the pipelines, ZeRO 3 its
/// parameters, gradients and momentum by rows.
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
            (2, 2, 2, Schedule::OneFOneB, 3),
            (3, 1, 1, Schedule::Gpipe, 3),
        ] {
            let l = Layout::new(pipelines, stages, micro_batches, schedule, zero);
            let mut config = TrainConfig::basic(7, 1, n, Some(1), 0.2);
            config.grad_clip = clip;
            let ranks = run_pipelines(l, &config, (&train, &test));
            let wholes = wholes(l, &ranks);
            let out: Vec<_> = ranks
                .into_iter()
                .map(|r| {
                    let summary = r.ran.summary.unwrap();
                    let grad_bytes = summary.gradient_bytes_per_rank.unwrap_or(0.0) as usize;
                    (
                        r.params,
                        r.ran.metrics[0].loss,
                        summary.peak_activation_bytes,
                        r.ran.momentum.len(),
                        grad_bytes,
                    )
                })
                .collect();
            for (d, whole) in wholes.iter().enumerate() {
                let diff = max_abs_diff(whole, &want);
                assert!(diff < 1e-6, "clip {clip:?}, {l:?}: pipeline {d} is {diff} from the step by hand");
            }
            for (rank, (params, loss, peak, momentum, grad_bytes)) in out.iter().enumerate() {
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
                // A piece's momentum whole; its chunk over the pipelines under ZeRO 1; under
                // ZeRO 3 the rank's rows, which together are the piece once.
                let piece = layout_of(cut(stages, p)).total();
                let held = match zero {
                    1 => sheaf_core::chunk_range(piece, pipelines, d).len(),
                    3 => params.len(),
                    _ => piece,
                };
                assert_eq!(*momentum, held, "{l:?}: rank {rank}'s momentum");
                if zero == 3 {
                    let rows: usize = (0..pipelines).map(|q| out[q * stages + p].0.len()).sum();
                    assert_eq!(rows, piece, "{l:?}: stage {p}'s rows");
                    // Its rows' summed gradient and a wire of every replica's part of a
                    // unit (each at most the piece), no more.
                    let values = grad_bytes / 4;
                    let most = params.len() + (pipelines + 1) * piece;
                    assert!(
                        values > params.len() && values <= most,
                        "{l:?}: rank {rank} holds {values} gradient values"
                    );
                }
            }
        }
    }
}
