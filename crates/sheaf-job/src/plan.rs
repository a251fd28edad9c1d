//! The layout of a job over its world: the strategy plugin plans which piece of the
//! model each rank holds; the host checks the plan (every rank, every block) and that
//! every rank fits its memory budget. Worked out from the job alone (and the model's
//! blocks), so `launch` checks it once before any worker starts and every worker
//! derives the same plan. No strategy is named here.

use std::collections::BTreeMap;

use sheaf_core::{
    ComputeBackend, ModelInfo, ModelSpec, Piece, PieceLayout, PlanInput, RankPlan, Reach, Strategy,
    TransportInfo,
};

use crate::job::Job;
use sheaf_plugins::{HostError, Registry};

/// Which piece each rank holds, as the strategy planned it and the host checked it.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub spec: ModelSpec,
    pub info: ModelInfo,
    /// Per rank.
    pub ranks: Vec<RankPlan>,
    /// Per rank: the piece's parameters and where they come from.
    pub layouts: Vec<PieceLayout>,
    /// Whether ranks train through the stage interface.
    pub stage_interface: bool,
    /// Values of optimizer state per parameter, as the job's optimizer says
    /// (`Optimizer::state_values_per_param`), or [`UNSAID_STATE_VALUES`] where it does not.
    pub state_values_per_param: u32,
    /// Per rank, the gradient bytes the strategy says it holds at its peak
    /// (`Strategy::planned_gradient_bytes`), where it says.
    pub gradient_bytes: Option<Vec<u64>>,
    /// Likewise its parameter bytes (`Strategy::planned_parameter_bytes`).
    pub parameter_bytes: Option<Vec<u64>>,
    /// What the job's transport says of itself (under `auto`, the one it connects
    /// across hosts), for the buffers it holds.
    pub transport: TransportInfo,
}

/// Values of state per parameter a plan assumes of an optimizer that does not say
/// (one built against ABI 1.0): the most a built-in optimizer keeps (AdamW's two
/// moments), so that such a plan errs on the side of not fitting.
pub const UNSAID_STATE_VALUES: u32 = 2;

impl Plan {
    /// Whether any rank holds less than the whole model (a piece of it, or a shard of
    /// its parameters).
    pub fn is_model_parallel(&self) -> bool {
        let whole = Piece::whole(self.info.blocks.len());
        self.ranks.iter().any(|r| r.piece != whole || r.param_shard.is_some())
    }

    pub fn layout_of(&self, rank: usize) -> &PieceLayout {
        &self.layouts[rank]
    }

    /// The lowest rank holding each distinct piece, in rank order: together their
    /// pieces hold every parameter (the plan is checked for that).
    pub fn representatives(&self) -> Vec<usize> {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for (r, rank) in self.ranks.iter().enumerate() {
            let holds = (&rank.piece, rank.param_shard);
            if !seen.contains(&holds) {
                seen.push(holds);
                out.push(r);
            }
        }
        out
    }
}

fn job_err(detail: String) -> HostError {
    HostError::Job(detail)
}

/// What each block weighs when a strategy cuts blocks: its parameters, or its
/// measured time.
fn block_costs(job: &Job, info: &ModelInfo) -> Result<Vec<u64>, HostError> {
    let par = &job.parallel;
    let blocks = info.blocks.len();
    match (par.balance.as_str(), &par.layer_costs) {
        (_, Some(c)) if c.len() != blocks => Err(job_err(format!(
            "key `parallel.layer_costs`: {} costs for a model of {blocks} blocks",
            c.len()
        ))),
        ("time", Some(c)) => Ok(c.clone()),
        ("time", None) => Err(job_err(
            "key `parallel.balance`: \"time\" needs the measured `parallel.layer_costs` (sheaf launch measures them; under another launcher, set them)".into(),
        )),
        ("params", _) => Ok(info.blocks.iter().map(|b| b.params).collect()),
        (other, _) => Err(job_err(format!("key `parallel.balance`: `{other}` (params, time)"))),
    }
}

/// The plan of `job` over `world` ranks for the model `spec` (described as `info`):
/// the strategy plans it; the host checks that it covers the world and places every
/// block, that each piece can be cut, and that each rank fits
/// `compute.memory_limit_mb`. Fails naming the key.
pub fn plan(
    job: &Job,
    world: usize,
    registry: &Registry,
    compute: &dyn ComputeBackend,
    strategy: &dyn Strategy,
    spec: &ModelSpec,
    info: &ModelInfo,
) -> Result<Plan, HostError> {
    let costs = block_costs(job, info)?;
    let partitioner =
        registry.model_partitioner(&job.parallel.partitioner, &job.parallel.partitioner_config())?;
    let input = PlanInput {
        world,
        blocks: &info.blocks,
        costs: &costs,
        batch_size: job.train.batch_size,
        partitioner: partitioner.as_ref(),
    };
    let planned = strategy.plan(&input).map_err(|e| job_err(e.to_string()))?;
    // The optimizer is asked, never named: it says what state it will keep.
    let optimizer = registry.optimizer(&job.train.optimizer, &job.train.optimizer_config())?;
    let state_values_per_param = optimizer.state_values_per_param().unwrap_or(UNSAID_STATE_VALUES);
    check_cover(&job.parallel.strategy, world, info.blocks.len(), &planned.ranks)?;
    let mut layouts: BTreeMap<String, PieceLayout> = BTreeMap::new();
    let key = |p: &Piece| format!("{p:?}");
    for r in &planned.ranks {
        if let std::collections::btree_map::Entry::Vacant(slot) = layouts.entry(key(&r.piece)) {
            slot.insert(compute.piece_layout(spec, &r.piece).map_err(|e| job_err(e.to_string()))?);
        }
    }
    // A rank sharding its parameters (ZeRO stage 3) holds its rows of each of its
    // piece's, with the piece's activations.
    let layout_of = |r: &RankPlan| -> Result<PieceLayout, HostError> {
        let piece = &layouts[&key(&r.piece)];
        match r.param_shard {
            None => Ok(piece.clone()),
            Some(s) if s.validate().is_err() => {
                Err(job_err(format!("the strategy planned parameter shard {} of {}", s.index, s.count)))
            }
            // A piece's rows (ZeRO 3 inside a pipeline stage): rows of the rows it holds.
            Some(s) if piece.layout != info.layout => piece.rows(s).map_err(|e| {
                job_err(format!("the strategy planned parameter shards of piece {:?}: {e}", r.piece))
            }),
            Some(s) => Ok(PieceLayout::row_shard(&info.layout, s, piece.activation_bytes_per_sample)),
        }
    };
    let plan = Plan {
        spec: spec.clone(),
        info: info.clone(),
        layouts: planned.ranks.iter().map(layout_of).collect::<Result<_, _>>()?,
        ranks: planned.ranks,
        stage_interface: planned.stage_interface,
        state_values_per_param,
        gradient_bytes: strategy.planned_gradient_bytes(&input).map_err(|e| job_err(e.to_string()))?,
        parameter_bytes: strategy.planned_parameter_bytes(&input).map_err(|e| job_err(e.to_string()))?,
        transport: match job.transport.plugin() {
            "auto" => registry.transport_info(&registry.preferred_transport(Reach::Network)?)?,
            name => registry.transport_info(name)?,
        },
    };
    check_memory(job, &plan)?;
    Ok(plan)
}

/// A strategy's plan is checked, not trusted: one piece per rank, each inside the
/// model, and every block held whole by some rank or in every slice of a
/// tensor-parallel group.
fn check_cover(strategy: &str, world: usize, blocks: usize, ranks: &[RankPlan]) -> Result<(), HostError> {
    let bad = |detail: String| job_err(format!("key `parallel.strategy`: `{strategy}` planned {detail}"));
    if ranks.len() != world {
        return Err(bad(format!("{} ranks for a world of {world}", ranks.len())));
    }
    for (r, rank) in ranks.iter().enumerate() {
        rank.piece.validate(blocks).map_err(|e| bad(format!("rank {r}: {e}")))?;
    }
    for b in 0..blocks {
        let holders: Vec<&Piece> = ranks.iter().map(|r| &r.piece).filter(|p| p.blocks.contains(&b)).collect();
        let whole = holders.iter().any(|p| p.tensor_width == 1);
        let sliced = holders.iter().any(|p| {
            (0..p.tensor_width)
                .all(|t| holders.iter().any(|q| q.tensor_width == p.tensor_width && q.tensor_rank == t))
        });
        if !whole && !sliced {
            return Err(bad(format!("no rank holding all of block {b}")));
        }
    }
    Ok(())
}

/// Bytes rank `rank` needs at most: its parameters, their gradients and optimizer
/// state (its shard of it, where the strategy shards it), and the activations it
/// keeps at once.
pub fn need_bytes(plan: &Plan, rank: usize) -> (u64, u64) {
    let layout = plan.layout_of(rank);
    let r = &plan.ranks[rank];
    let values = layout.layout.total() as u64;
    // A shard of every bucket's state, rounded up as the strategy pads its chunks.
    let state = (values * u64::from(plan.state_values_per_param)).div_ceil(r.state_shards.max(1));
    let params = 4 * (2 * values + state);
    (params, r.activation_samples * layout.activation_bytes_per_sample)
}

/// Whether the compute plugin builds what `plan` asks of it beyond whole models and
/// pieces: a row shard of a pipeline stage (ZeRO 3 inside a stage), which a model kind
/// may not have. The launcher builds one, the smallest, and drops it, so such a job
/// fails before any worker starts.
pub fn check_buildable(plan: &Plan, compute: &dyn ComputeBackend, seed: u64) -> Result<(), HostError> {
    let sharded_pieces =
        (0..plan.ranks.len()).filter(|&r| plan.stage_interface && plan.ranks[r].param_shard.is_some());
    let Some(r) = sharded_pieces.min_by_key(|&r| plan.layout_of(r).layout.total()) else { return Ok(()) };
    let (rank, shard) = (&plan.ranks[r], plan.ranks[r].param_shard.expect("filtered"));
    compute
        .build_piece_shard(&plan.spec, &rank.piece, shard, seed)
        .map(drop)
        .map_err(|e| job_err(format!("rank {r}'s row shard of blocks {:?}: {e}", rank.piece.blocks)))
}

/// Every rank's plan against `compute.memory_limit_mb`: fails naming the first rank
/// over it and its largest part.
pub fn check_memory(job: &Job, plan: &Plan) -> Result<(), HostError> {
    let Some(limit_mb) = job.compute.memory_limit_mb else { return Ok(()) };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for rank in 0..plan.ranks.len() {
        let need = crate::memory::planned(job, plan, rank);
        if mib(need.total) > limit_mb {
            let hint = if plan.is_model_parallel() {
                "use more workers"
            } else {
                "cut the model over several workers with a model-parallel strategy (`sheaf plugins` lists the strategies)"
            };
            let shards = match plan.ranks[rank].state_shards {
                1 => String::new(),
                n => format!(", the optimizer state sharded over {n} ranks"),
            };
            return Err(job_err(format!(
                "key `compute.memory_limit_mb`: rank {rank} needs {:.2} MiB but the limit is {limit_mb} MiB \
                 ({}{shards}; `sheaf plan` shows every part); {hint}",
                mib(need.total),
                crate::memory::parts_text(&need),
            )));
        }
    }
    Ok(())
}

/// The job's strategy plugin, and its plan of the job over `world` ranks (see
/// [`plan`]): what the launcher, every worker and `sheaf doctor` start from.
pub fn strategy_and_plan(
    job: &Job,
    world: usize,
    registry: &Registry,
    compute: &dyn ComputeBackend,
    data: &crate::data::JobData,
) -> Result<(Box<dyn Strategy>, Plan), HostError> {
    let timeout_ms = job.transport.timeout().as_millis() as u64;
    let strategy = registry.strategy(&job.parallel.strategy, &job.parallel.strategy_config(timeout_ms))?;
    let plan = plan(job, world, registry, compute, strategy.as_ref(), &data.spec, &data.info)?;
    Ok((strategy, plan))
}

/// Measures each block's forward and backward time on one micro-batch of random data
/// (median of 5, nanoseconds), one block built at a time, each fed the previous
/// block's output, for `parallel.balance = "time"`: `sheaf launch` measures once and
/// hands the costs to every worker, so all cut the model the same way.
pub fn measure_layer_costs(
    job: &Job,
    compute: &dyn ComputeBackend,
    data: &crate::data::JobData,
) -> Result<Vec<u64>, HostError> {
    let par = &job.parallel;
    // A replica's share of the global batch: what blocks weigh relative to each other
    // hardly depends on the rows.
    let rows = job.train.batch_size.div_ceil(par.data.unwrap_or(1).max(1)).max(1);
    let core = |source| HostError::Core { during: Some("measuring layer costs"), source };
    let mut rng = sheaf_core::SplitMix64::new(job.seed);
    // The first block takes real samples; each later block its predecessor's output.
    let first = data.train.gather(&(0..rows.min(data.train.len())).collect::<Vec<_>>()).map_err(core)?;
    let rows = first.len();
    let mut input: Vec<f32> = Vec::new();
    let mut costs = Vec::with_capacity(data.info.blocks.len());
    for b in 0..data.info.blocks.len() {
        let piece = Piece { blocks: b..b + 1, tensor_rank: 0, tensor_width: 1 };
        let mut model = compute.build_piece(&data.spec, &piece, job.seed).map_err(core)?;
        let mut times = Vec::new();
        let mut output = Vec::new();
        for micro in 0..6u64 {
            let t = std::time::Instant::now();
            output = if b == 0 {
                model.stage_forward_batch(micro, 0, &first.batch()).map_err(core)?
            } else {
                model.stage_forward(micro, 0, &input, rows).map_err(core)?
            };
            let grad: Vec<f32> = output.iter().map(|_| rng.next_f32()).collect();
            model.stage_backward(micro, 0, &grad).map_err(core)?;
            if micro > 0 {
                times.push(t.elapsed().as_nanos() as u64);
            }
        }
        times.sort_unstable();
        costs.push(times[times.len() / 2].max(1));
        input = output;
    }
    Ok(costs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{info, job, plan, shard};

    fn piece(blocks: std::ops::Range<usize>, tensor_rank: usize, tensor_width: usize) -> RankPlan {
        RankPlan {
            piece: Piece { blocks, tensor_rank, tensor_width },
            activation_samples: 1,
            state_shards: 1,
            param_shard: None,
        }
    }

    /// Blocks weigh their parameters, or the measured times the job carries; a cost
    /// list that does not fit the model is refused whatever the balance.
    #[test]
    fn blocks_weigh_parameters_or_measured_time() {
        let info = info();
        assert_eq!(block_costs(&job(&[]), &info).unwrap(), vec![40, 20, 40]);
        let timed = job(&["parallel.balance=time", "parallel.layer_costs=[5, 6, 7]"]);
        assert_eq!(block_costs(&timed, &info).unwrap(), vec![5, 6, 7]);
        let e = block_costs(&job(&["parallel.balance=time"]), &info).unwrap_err().to_string();
        assert!(e.contains("`parallel.balance`") && e.contains("layer_costs"), "{e}");
        let e = block_costs(&job(&["parallel.layer_costs=[1, 2]"]), &info).unwrap_err().to_string();
        assert!(e.contains("`parallel.layer_costs`: 2 costs for a model of 3 blocks"), "{e}");
        assert_eq!(block_costs(&job(&["parallel.layer_costs=[1, 2, 3]"]), &info).unwrap(), vec![40, 20, 40]);
        let e = block_costs(&job(&["parallel.balance=flops"]), &info).unwrap_err().to_string();
        assert!(e.contains("`flops` (params, time)"), "{e}");
    }

    /// A strategy's plan is checked: a rank per rank of the world, pieces inside the
    /// model, every block held whole or in every slice of a group.
    #[test]
    fn plans_that_do_not_cover_the_model_are_refused() {
        let ok = |ranks: &[RankPlan]| check_cover("s", ranks.len(), 3, ranks);
        assert!(ok(&[piece(0..3, 0, 1), piece(0..3, 0, 1)]).is_ok());
        assert!(ok(&[piece(0..2, 0, 1), piece(2..3, 0, 1)]).is_ok());
        assert!(ok(&[piece(0..3, 0, 2), piece(0..3, 1, 2)]).is_ok());
        let refused = |world: usize, ranks: &[RankPlan], detail: &str| {
            let e = check_cover("s", world, 3, ranks).unwrap_err().to_string();
            assert!(e.starts_with("key `parallel.strategy`: `s` planned ") && e.contains(detail), "{e}");
        };
        refused(3, &[piece(0..3, 0, 1)], "1 ranks for a world of 3");
        refused(2, &[piece(0..3, 0, 1), piece(1..4, 0, 1)], "rank 1:");
        refused(1, &[piece(0..3, 2, 2)], "tensor rank 2 outside a group of 2");
        refused(2, &[piece(0..1, 0, 1), piece(2..3, 0, 1)], "no rank holding all of block 1");
        refused(1, &[piece(0..3, 0, 2)], "no rank holding all of block 0");
        // Two slices of three are not the block.
        refused(2, &[piece(0..3, 0, 3), piece(0..3, 1, 3)], "no rank holding all of block 0");
        // Slices of different groups do not make a whole.
        refused(2, &[piece(0..3, 0, 2), piece(0..3, 1, 3)], "no rank holding all of block 0");
        // Block 2's group is whole; blocks 0 and 1 only in slices of one group.
        assert!(ok(&[piece(0..2, 0, 2), piece(0..2, 1, 2), piece(2..3, 0, 1)]).is_ok());
    }

    /// The lowest rank holding each distinct piece, and whether any rank holds less than
    /// the whole model.
    #[test]
    fn representatives_hold_every_piece_once() {
        let replicas = plan(&[0..3, 0..3], 1, &[None, None]);
        assert_eq!((replicas.representatives(), replicas.is_model_parallel()), (vec![0], false));
        let zero3 = plan(&[0..3, 0..3], 1, &[shard(0, 2), shard(1, 2)]);
        assert_eq!((zero3.representatives(), zero3.is_model_parallel()), (vec![0, 1], true));
        let stages = plan(&[0..2, 0..2, 2..3, 2..3], 1, &[None; 4]);
        assert_eq!((stages.representatives(), stages.is_model_parallel()), (vec![0, 2], true));
    }

    /// A rank needs its parameters, their gradients and its shard of the optimizer's
    /// state (rounded up, as chunks are padded), and its samples' activations.
    #[test]
    fn need_is_parameters_gradients_state_and_activations() {
        // 100 values, 2 state values each: 4 * (200 + 200) bytes, 2 samples of 8 bytes.
        assert_eq!(need_bytes(&plan(&vec![0..3; 1], 1, &[None]), 0), (1600, 16));
        // State over 3 ranks: 200 / 3 rounds up to 67 values.
        assert_eq!(need_bytes(&plan(&vec![0..3; 3], 3, &[None; 3]), 2), (4 * (200 + 67), 16));
        let mut adam = plan(&[0..2, 2..3], 1, &[None, None]);
        adam.state_values_per_param = 1;
        assert_eq!(need_bytes(&adam, 0), (4 * (120 + 60), 16));
        assert_eq!(need_bytes(&adam, 1), (4 * (80 + 40), 16));
    }

    /// The budget: a rank over it is named with its parts and a hint that fits the
    /// plan; a rank exactly at it fits.
    #[test]
    fn the_memory_limit_names_the_rank_over_it() {
        let stages = plan(&[0..2, 2..3], 1, &[None, None]);
        let total = |r| crate::memory::planned(&job(&[]), &stages, r).total;
        let (big, small) = (total(0), total(1));
        assert!(big > small, "{big} {small}");
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let limit = |b: u64| format!("compute.memory_limit_mb={}", mib(b));
        assert!(check_memory(&job(&[&limit(big)]), &stages).is_ok());
        assert!(check_memory(&job(&[]), &stages).is_ok());
        let e = check_memory(&job(&[&limit(big - 1)]), &stages).unwrap_err().to_string();
        assert!(
            e.contains("`compute.memory_limit_mb`: rank 0 needs") && e.contains("use more workers"),
            "{e}"
        );
        assert!(!e.contains("sharded over"), "{e}");
        let e = check_memory(&job(&[&limit(small - 1)]), &stages).unwrap_err().to_string();
        assert!(e.contains("rank 0 needs"), "the first rank over it: {e}");
        let replicas = plan(&[0..3, 0..3], 2, &[None, None]);
        let need = crate::memory::planned(&job(&[]), &replicas, 0).total;
        let e = check_memory(&job(&[&limit(need - 1)]), &replicas).unwrap_err().to_string();
        assert!(e.contains("model-parallel strategy") && e.contains("sharded over 2 ranks"), "{e}");
    }
}
