//! ZeRO stage 3 over the in-process transport: ranks that each hold their rows of the
//! testkit's chain of three blocks, and run it unit by unit on what the strategy
//! gathers, end where one process holding the chain whole ends, with or without
//! overlap, with units kept between passes or not, over batches smaller than the
//! world, and under HSDP (the rows shared within each host, the hosts replicas).

use sheaf_core::{LrSchedule, Model, TrainConfig, TrainSummary};
use sheaf_testkit::chain::{joined, layout_of, Chain, BLOCKS};
use sheaf_testkit::run_world;
use sheaf_testkit::train::run_rank;

use crate::{DataParallel, DataParallelConfig};

/// What a rank ends with: its parameters (its rows when sharded), its summary, its
/// step metrics and its optimizer state's length.
struct Rank {
    params: Vec<f32>,
    summary: TrainSummary,
    metrics: Vec<sheaf_core::StepMetrics>,
    momentum: usize,
}

/// Every rank's run of `world` under `dp`; with ZeRO 3, rank `r` holds shard
/// `r % shards` of `shards` (the world's, or each host's under HSDP).
fn run(world: usize, shards: usize, config: &TrainConfig, dp: &DataParallelConfig) -> Vec<Rank> {
    let (train, test) = sheaf_data::teacher(200, BLOCKS[0].0, BLOCKS[2].1, 5).split(0.2, 1);
    run_world(world, |comm| {
        let rank = sheaf_core::Communicator::rank(&comm);
        let mut model = Chain::new(0..BLOCKS.len(), 5);
        if dp.zero == 3 {
            model = model.row_shard(rank % shards, shards);
        }
        let mut strategy = DataParallel::new(DataParallelConfig { timeout_ms: 10_000, ..dp.clone() });
        let ran = run_rank(&mut strategy, &comm, &mut model, config.clone(), (&train, &test));
        let mut params = vec![0.0; model.layout().total()];
        model.read_params(&mut params).unwrap();
        Rank { params, summary: ran.summary.unwrap(), metrics: ran.metrics, momentum: ran.momentum.len() }
    })
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The law for one case: the shards' rows joined are the one process's parameters;
/// every step's loss, norm and rate and the validation figures agree; each rank's
/// optimizer state is its rows, the rows of one shard group are the model once, and
/// the strategy's buffers hold what a pass needs (two units, or every unit kept).
fn check(world: usize, shards: usize, config: TrainConfig, dp: DataParallelConfig) {
    let case = format!("world {world}, {shards} shards, {config:?}, {dp:?}");
    let one = run(1, 1, &config, &DataParallelConfig::default()).remove(0);
    let ranks = run(world, shards, &config, &dp);
    let whole = layout_of(0..BLOCKS.len());
    let rows: Vec<Vec<f32>> = ranks[..shards].iter().map(|r| r.params.clone()).collect();
    let diff = max_abs_diff(&joined(&whole, &rows), &one.params);
    assert!(diff < 2e-5, "{case}: {diff} from one process");
    let largest = (0..BLOCKS.len()).map(|b| sheaf_testkit::chain::span(b).len()).max().unwrap();
    for (r, rank) in ranks.iter().enumerate() {
        // Under HSDP a host's ranks hold what the same ranks of every other host hold.
        assert_eq!(rank.params, ranks[r % shards].params, "{case}: rank {r}'s rows");
        assert_eq!(rank.momentum, rank.params.len(), "{case}: rank {r}'s optimizer state");
        assert_eq!(rank.metrics.len(), one.metrics.len(), "{case}");
        for (a, b) in rank.metrics.iter().zip(&one.metrics) {
            assert!(
                (a.loss - b.loss).abs() <= 1e-5 * b.loss.max(1.0),
                "{case}: loss {} vs {}",
                a.loss,
                b.loss
            );
            let (x, y) = (a.grad_norm, b.grad_norm);
            assert!((x - y).abs() <= 1e-5 * y.max(1.0), "{case}: step {}'s norm {x} vs {y}", a.step);
            assert_eq!(a.lr, b.lr, "{case}");
            assert_eq!(a.val_loss.is_some(), b.val_loss.is_some(), "{case}");
            if let (Some(x), Some(y)) = (a.val_loss, b.val_loss) {
                assert!((x - y).abs() < 1e-5, "{case}: step {}'s validation loss {x} vs {y}", a.step);
            }
        }
        let (s, o) = (&rank.summary, &one.summary);
        assert_eq!((s.steps, s.epochs), (o.steps, o.epochs), "{case}");
        assert!((s.test_accuracy - o.test_accuracy).abs() < 1e-9, "{case}: {s:?} vs {o:?}");
        assert!((s.test_loss - o.test_loss).abs() < 1e-5, "{case}: {s:?} vs {o:?}");
        // The rows' summed gradient, and the pass's buffers: a unit gathered and its
        // gradient at least, or every unit kept and a gradient.
        let beside = (s.gradient_bytes_per_rank.unwrap() / 4.0) as usize - rank.params.len();
        let least = if dp.reshard_after_forward { 2 * largest } else { whole.total() + largest };
        assert!(beside >= least, "{case}: rank {r}'s buffers hold {beside} values, at least {least}");
    }
    let held: usize = ranks[..shards].iter().map(|r| r.params.len()).sum();
    assert_eq!(held, whole.total(), "{case}: the shards hold every row once");
}

fn zero3(overlap: bool, keep: bool) -> DataParallelConfig {
    DataParallelConfig { zero: 3, overlap: Some(overlap), reshard_after_forward: !keep, ..Default::default() }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(sheaf_testkit::proptest_cases(12)))]

    /// The law over worlds of 2 to 5 (rows that do not divide, ranks with no rows of a
    /// parameter), batches down to one sample (ranks with none), accumulation,
    /// clipping, a schedule and evaluations between steps.
    #[test]
    fn zero_3_equals_one_process(
        world in 2usize..=5,
        batch in 1usize..=20,
        accum in 1usize..=2,
        clip in proptest::option::of(0.05f64..2.0),
        overlap in proptest::bool::ANY,
        keep in proptest::bool::ANY,
    ) {
        let config = TrainConfig {
            grad_accum: accum,
            grad_clip: clip,
            lr: LrSchedule { base: 0.3, cosine: true, warmup_steps: 2, min_lr: 0.05 },
            eval_every: Some(2),
            ..TrainConfig::basic(3, 1, batch, Some(5), 0.3)
        };
        check(world, world, config, zero3(overlap, keep));
    }
}

/// Each path through the pass at least once, on a whole run of two epochs.
#[test]
fn zero_3_trains_a_whole_run_as_one_process_does() {
    for (overlap, keep) in [(false, false), (true, false), (false, true), (true, true)] {
        check(3, 3, TrainConfig::basic(8, 2, 16, None, 0.3), zero3(overlap, keep));
    }
}

/// HSDP: each host's ranks (`LOCAL_WORLD_SIZE`, 2 of them here) share the rows, the
/// hosts hold the same rows and add their sums; the result is the one process's.
#[test]
fn hybrid_sharding_equals_one_process() {
    let dp = DataParallelConfig { zero_scope: crate::ZeroScope::Host, ..zero3(false, false) };
    // Read by this test's runs alone: every other test runs at the world's scope, where
    // it is ignored (or as overlap's default, which changes no value).
    std::env::set_var("LOCAL_WORLD_SIZE", "2");
    check(4, 2, TrainConfig::basic(4, 1, 12, Some(6), 0.3), dp.clone());
    check(6, 2, TrainConfig::basic(4, 1, 5, Some(4), 0.3), dp);
    std::env::remove_var("LOCAL_WORLD_SIZE");
}

/// A model that cannot run unit by unit, or lends no buffer, is refused with what
/// ZeRO 3 needs of it.
#[test]
fn zero_3_refuses_a_model_held_whole() {
    let (train, test) = sheaf_data::teacher(40, BLOCKS[0].0, BLOCKS[2].1, 5).split(0.2, 1);
    let errors = run_world(2, |comm| {
        let mut model = Chain::new(0..BLOCKS.len(), 5);
        let mut strategy = DataParallel::new(zero3(false, false));
        let ran = run_rank(
            &mut strategy,
            &comm,
            &mut model,
            TrainConfig::basic(1, 1, 8, Some(1), 0.1),
            (&train, &test),
        );
        ran.summary.err().map(|e| e.to_string())
    });
    for e in errors {
        let e = e.expect("a whole model under ZeRO 3 is refused");
        assert!(e.contains("ZeRO stage 3 needs a model that runs unit by unit"), "{e}");
    }
}
