//! The schedules as laws: simulated on a pipeline where a forward takes one unit and a
//! backward two, every schedule finishes (no stage waits on a pass that never comes),
//! GPipe's step takes `(M + P - 1)` forward-backward times (its bubble is
//! `(P - 1) / (M + P - 1)`), 1F1B's takes no longer, and a stage keeps at most `M`
//! micro-batches of activations under GPipe and `min(P - p, M)` under 1F1B.

use proptest::prelude::*;

use super::*;

struct Outcome {
    makespan: usize,
    /// Per stage: most micro-batches forwarded but not yet backwarded at once.
    peak: Vec<usize>,
}

fn simulate(kind: Schedule, stages: usize, micro: usize) -> Outcome {
    let lists: Vec<Vec<Pass>> = (0..stages).map(|p| schedule(kind, stages, p, micro)).collect();
    // Completion time of every pass, once known.
    let mut fwd = vec![vec![None::<usize>; micro]; stages];
    let mut bwd = vec![vec![None::<usize>; micro]; stages];
    let mut next = vec![0usize; stages];
    let mut free_at = vec![0usize; stages];
    let mut peak = vec![0usize; stages];
    let mut in_flight = vec![0usize; stages];
    loop {
        let mut progressed = false;
        for p in 0..stages {
            let Some(&pass) = lists[p].get(next[p]) else { continue };
            let ready = match pass {
                Pass::Forward(m) => {
                    if p == 0 {
                        Some(0)
                    } else {
                        fwd[p - 1][m]
                    }
                }
                Pass::Backward(m) => {
                    if p + 1 == stages {
                        fwd[p][m]
                    } else {
                        bwd[p + 1][m]
                    }
                }
            };
            let Some(ready) = ready else { continue };
            let start = ready.max(free_at[p]);
            match pass {
                Pass::Forward(m) => {
                    fwd[p][m] = Some(start + 1);
                    free_at[p] = start + 1;
                    in_flight[p] += 1;
                    peak[p] = peak[p].max(in_flight[p]);
                }
                Pass::Backward(m) => {
                    assert!(fwd[p][m].is_some(), "stage {p} backward {m} before its forward");
                    bwd[p][m] = Some(start + 2);
                    free_at[p] = start + 2;
                    in_flight[p] -= 1;
                }
            }
            next[p] += 1;
            progressed = true;
        }
        if !progressed {
            break;
        }
    }
    for p in 0..stages {
        assert_eq!(
            next[p],
            lists[p].len(),
            "{kind:?} P={stages} M={micro}: stage {p} stuck at {:?}",
            lists[p].get(next[p])
        );
    }
    Outcome { makespan: free_at.into_iter().max().unwrap_or(0), peak }
}

proptest! {
    #[test]
    fn schedules_finish_with_their_bubble_and_memory(stages in 1usize..=8, micro in 1usize..=16) {
        for kind in [Schedule::Gpipe, Schedule::OneFOneB] {
            for p in 0..stages {
                let list = schedule(kind, stages, p, micro);
                for m in 0..micro {
                    prop_assert_eq!(list.iter().filter(|&&x| x == Pass::Forward(m)).count(), 1);
                    prop_assert_eq!(list.iter().filter(|&&x| x == Pass::Backward(m)).count(), 1);
                }
            }
        }
        let gpipe = simulate(Schedule::Gpipe, stages, micro);
        prop_assert_eq!(gpipe.makespan, 3 * (micro + stages - 1));
        prop_assert!(gpipe.peak.iter().all(|&k| k == micro));
        let one = simulate(Schedule::OneFOneB, stages, micro);
        prop_assert!(one.makespan <= gpipe.makespan, "1F1B {} vs GPipe {}", one.makespan, gpipe.makespan);
        for (p, &k) in one.peak.iter().enumerate() {
            prop_assert!(k <= (stages - p).min(micro), "stage {p} kept {k}");
        }
    }
}

#[test]
fn config_parses_both_schedules_and_refuses_zeroes() {
    let c = PipelineConfig::parse(r#"{"stages": 2, "micro_batches": 8, "schedule": "1f1b"}"#).unwrap();
    assert_eq!((c.stages, c.micro_batches, c.schedule), (Some(2), 8, Schedule::OneFOneB));
    assert!(PipelineConfig::parse(r#"{"micro_batches": 0}"#).is_err());
    assert!(PipelineConfig::parse(r#"{"schedule": "zigzag"}"#).is_err());
}

/// ZeRO across the pipelines: stages 1 and 3 are taken (3 with whole blocks only),
/// stage 2 is refused with the reason (nothing to save), and no other stage exists.
#[test]
fn zero_stages_across_pipelines_are_checked() {
    assert_eq!(PipelineConfig::parse(r#"{"zero": 1}"#).unwrap().zero, 1);
    assert_eq!(PipelineConfig::parse(r#"{"zero": 3}"#).unwrap().zero, 3);
    let e = PipelineConfig::parse(r#"{"zero": 2}"#).unwrap_err().to_string();
    assert!(e.contains("parallel.options.pipeline.zero") && e.contains("saves nothing"), "{e}");
    let e = PipelineConfig::parse(r#"{"zero": 3, "tensor": 2}"#).unwrap_err().to_string();
    assert!(e.contains("parallel.options.pipeline.zero") && e.contains("by columns"), "{e}");
    let e = PipelineConfig::parse(r#"{"zero": 4}"#).unwrap_err().to_string();
    assert!(e.contains("no ZeRO stage 4"), "{e}");
}

/// The plan of ZeRO 3 across 2 pipelines of 2 stages: every rank holds rows of its
/// stage (shard `d` of `D`, pipeline `d`), its optimizer state its rows' whole; under
/// ZeRO 1 the state is sharded and the parameters are whole.
#[test]
fn fully_sharded_stages_plan_row_shards_per_pipeline() {
    let blocks: Vec<sheaf_core::Block> =
        (0..4).map(|i| sheaf_core::Block { name: format!("b{i}"), params: 10 }).collect();
    let costs = vec![1u64; 4];
    let partitioner = Even;
    let input =
        PlanInput { world: 4, blocks: &blocks, costs: &costs, batch_size: 8, partitioner: &partitioner };
    let plan = |zero: u8| {
        let c = PipelineConfig { data: Some(2), zero, ..PipelineConfig::default() };
        sheaf_core::Strategy::plan(&Pipeline { config: c }, &input).unwrap()
    };
    let three = plan(3);
    let shards: Vec<_> = three.ranks.iter().map(|r| (r.param_shard, r.state_shards)).collect();
    let shard = |index| Some(sheaf_core::ParamShard { index, count: 2 });
    assert_eq!(shards, [(shard(0), 1), (shard(0), 1), (shard(1), 1), (shard(1), 1)]);
    let one = plan(1);
    assert!(one.ranks.iter().all(|r| r.param_shard.is_none() && r.state_shards == 2));
}

/// D pipelines of P stages of T slices: rank `r` is pipeline `r / (P T)`, stage
/// `r / T % P`, slice `r % T`; a stage keeps M micro-batches of its share under GPipe
/// and `min(P - p, M)` under 1F1B; ZeRO 3 kept whole through the step plans its
/// stage and its rows.
#[test]
fn plans_lay_pipelines_of_stages_of_slices() {
    let blocks: Vec<sheaf_core::Block> =
        (0..4).map(|i| sheaf_core::Block { name: format!("b{i}"), params: 10 * (i + 1) }).collect();
    let costs = vec![1u64; 4];
    let input =
        |world| PlanInput { world, blocks: &blocks, costs: &costs, batch_size: 24, partitioner: &Even };
    let pipeline = |json: &str| Pipeline { config: PipelineConfig::parse(json).unwrap() };
    let p = sheaf_core::Strategy::plan(
        &pipeline(r#"{"data": 2, "stages": 2, "tensor": 2, "micro_batches": 3, "schedule": "1f1b"}"#),
        &input(8),
    )
    .unwrap();
    for (r, rank) in p.ranks.iter().enumerate() {
        let (stage, slice) = (r / 2 % 2, r % 2);
        assert_eq!(rank.piece.blocks, [0..2, 2..4][stage], "rank {r}");
        assert_eq!((rank.piece.tensor_rank, rank.piece.tensor_width), (slice, 2), "rank {r}");
        // 12 samples a pipeline in 3 micro-batches of 4; 1F1B keeps 2 - stage of them.
        assert_eq!(rank.activation_samples, (2 - stage as u64) * 4, "rank {r}");
    }
    let gpipe =
        sheaf_core::Strategy::plan(&pipeline(r#"{"stages": 4, "micro_batches": 5}"#), &input(4)).unwrap();
    assert!(gpipe.ranks.iter().all(|r| r.activation_samples == 25), "24 samples in 5 micro-batches of 5");
    // By default the stages are the world over the pipelines and slices.
    assert_eq!(PipelineConfig::parse(r#"{"data": 2, "tensor": 2}"#).unwrap().layout(8).unwrap(), (2, 2, 2));
    let e = PipelineConfig::parse(r#"{"data": 2, "stages": 2}"#).unwrap().layout(6).unwrap_err().to_string();
    assert!(e.contains("parallel.options.pipeline.stages"), "2 x 2 is not a world of 6: {e}");
    let kept =
        |json: &str| sheaf_core::Strategy::planned_parameter_bytes(&pipeline(json), &input(4)).unwrap();
    assert_eq!(kept(r#"{"data": 2, "zero": 3}"#), None);
    assert_eq!(kept(r#"{"data": 2, "zero": 1}"#), None);
    // Stages of 30 and 70 values, each with its half of the rows.
    let whole = kept(r#"{"data": 2, "zero": 3, "reshard_after_forward": false}"#).unwrap();
    assert_eq!(whole, [4 * (30 + 15), 4 * (70 + 35), 4 * (30 + 15), 4 * (70 + 35)]);
}

/// The job's model partitioner is checked, not trusted: its cut must be as many
/// contiguous, non-empty stages as asked, covering every block; more stages than
/// blocks are refused before it is asked.
#[test]
fn cuts_are_checked() {
    let blocks: Vec<sheaf_core::Block> =
        (0..4).map(|i| sheaf_core::Block { name: format!("b{i}"), params: 1 }).collect();
    let costs = vec![1u64; 4];
    let cut = |ranges: Vec<std::ops::Range<usize>>, stages: usize| {
        let fixed = Fixed(ranges);
        let input =
            PlanInput { world: stages, blocks: &blocks, costs: &costs, batch_size: 8, partitioner: &fixed };
        let config = PipelineConfig { stages: Some(stages), ..PipelineConfig::default() };
        sheaf_core::Strategy::plan(&Pipeline { config }, &input)
            .map(|p| p.ranks.len())
            .map_err(|e| e.to_string())
    };
    assert_eq!(cut(vec![0..1, 1..4], 2), Ok(2));
    for bad in [
        vec![0..1, 2..4],
        vec![1..2, 2..4],
        vec![0..2, 2..3],
        vec![0..4, 4..4],
        std::iter::once(0..4).collect(),
    ] {
        let e = cut(bad.clone(), 2).unwrap_err();
        assert!(
            e.contains("parallel.partitioner") && e.contains("not 2 contiguous non-empty stages"),
            "{bad:?}: {e}"
        );
    }
    let e = cut(vec![0..1; 5], 5).unwrap_err();
    assert!(e.contains("parallel.options.pipeline.stages") && e.contains("only 4 blocks"), "{e}");
    // Keeping units gathered applies to ZeRO 3 alone.
    assert!(PipelineConfig::parse(r#"{"zero": 3, "reshard_after_forward": false}"#).is_ok());
    assert!(PipelineConfig::parse(r#"{"zero": 1, "reshard_after_forward": false}"#).is_err());
}

/// A partitioner that answers a fixed cut.
struct Fixed(Vec<std::ops::Range<usize>>);

impl sheaf_core::ModelPartitioner for Fixed {
    fn cut(&self, _: &[u64], _: usize) -> Result<Vec<std::ops::Range<usize>>> {
        Ok(self.0.clone())
    }
}

/// Blocks cut into equal runs.
struct Even;

impl sheaf_core::ModelPartitioner for Even {
    fn cut(&self, layer_costs: &[u64], stages: usize) -> Result<Vec<std::ops::Range<usize>>> {
        let n = layer_costs.len();
        Ok((0..stages).map(|k| k * n / stages..(k + 1) * n / stages).collect())
    }
}

/// An evaluation pass takes a training micro-batch's samples: a pipeline's share of
/// the global batch cut into the micro-batches (at least one sample).
#[test]
fn evaluation_passes_take_a_micro_batch() {
    assert_eq!(eval_rows(8, 2, 4), 1);
    assert_eq!(eval_rows(12, 1, 4), 3);
    assert_eq!(eval_rows(10, 3, 2), 2);
    assert_eq!(eval_rows(3, 1, 8), 1);
    assert_eq!(eval_rows(0, 2, 4), 1);
}

/// A pipeline's share is cut into at most as many micro-batches as it has samples, or
/// (under ZeRO 3, where every pipeline runs as many) exactly as many, some empty.
#[test]
fn shares_are_cut_into_micro_batches() {
    use crate::micro::{micro_cut, micro_ranges};
    assert_eq!(micro_ranges(2, 3), [0..1, 1..2]);
    assert_eq!(micro_ranges(7, 3), [0..3, 3..5, 5..7]);
    assert_eq!(micro_ranges(0, 3), vec![std::ops::Range { start: 0, end: 0 }]);
    assert_eq!(micro_cut(2, 3), [0..1, 1..2, 2..2]);
    assert_eq!(micro_cut(0, 2), [0..0, 0..0]);
    assert_eq!(micro_cut(5, 0), vec![std::ops::Range { start: 0, end: 5 }]);
}

/// What a neighbouring stage sends is checked against the micro-batch: nothing for an
/// empty one, whole f32 values otherwise.
#[test]
fn received_values_are_checked_against_the_micro_batch() {
    assert_eq!(crate::f32s(&[], "activations", 1, 0).unwrap(), Vec::<f32>::new());
    let two = [1f32, -2.0];
    assert_eq!(crate::f32s(bytemuck::cast_slice(&two), "activations", 1, 1).unwrap(), two);
    for (bytes, rows) in [(0, 2), (4, 0), (5, 1), (3, 1)] {
        let e = crate::f32s(&vec![0u8; bytes], "gradients", 3, rows).unwrap_err().to_string();
        assert!(
            e.contains(&format!("gradients from rank 3 of the pipeline: {bytes} bytes for {rows} samples")),
            "{e}"
        );
    }
}

mod law;
