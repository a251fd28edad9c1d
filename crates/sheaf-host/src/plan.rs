//! The layout of a job over its world: which piece of the model each rank holds, what
//! the strategy plugin is told, and whether every rank fits its memory budget. Worked
//! out from the job alone (and the model partitioner), so `launch` checks it once
//! before any worker starts and every worker derives the same plan.

use sheaf_core::{ComputeBackend, ModelInfo, ModelInput, ModelSpec, Piece, PieceLayout};

use crate::job::Job;
use crate::{HostError, Registry};

/// Which piece each rank holds, and the strategy's model-parallel settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub spec: ModelSpec,
    pub info: ModelInfo,
    /// Data-parallel replicas (`D`), and model-parallel ranks per replica (`P` or `T`).
    pub data: usize,
    pub model_ranks: usize,
    /// Per rank (rank `d * model_ranks + m` is model rank `m` of replica `d`).
    pub pieces: Vec<Piece>,
    /// Per model rank: the piece's parameters and where they come from.
    pub layouts: Vec<PieceLayout>,
    /// Settings for the strategy plugin beyond the host's own (JSON object).
    pub strategy: serde_json::Map<String, serde_json::Value>,
}

impl Plan {
    /// Whether ranks hold pieces rather than the whole model.
    pub fn is_model_parallel(&self) -> bool {
        self.model_ranks > 1
    }

    /// Whether the strategy trains through the stage interface (a pipeline or
    /// tensor-parallel strategy, even of a single rank holding the whole model).
    pub fn uses_pieces(&self) -> bool {
        self.strategy.contains_key("pipeline") || self.strategy.contains_key("tensor")
    }

    /// The piece layout of `rank`.
    pub fn layout_of(&self, rank: usize) -> &PieceLayout {
        &self.layouts[rank % self.model_ranks]
    }
}

fn job_err(detail: String) -> HostError {
    HostError::Job(detail)
}

/// The plan of `job` over `world` ranks for the model `spec` (described as `info` by
/// `compute`); fails, naming the key, on a layout that cannot work or a rank that
/// would not fit `compute.memory_limit_mb`.
pub fn plan(
    job: &Job,
    world: usize,
    registry: &Registry,
    compute: &dyn ComputeBackend,
    spec: &ModelSpec,
    info: &ModelInfo,
) -> Result<Plan, HostError> {
    let blocks = info.blocks.len();
    let par = &job.parallel;
    let model_parallel = ["pipeline", "tensor-parallel"].contains(&par.strategy.as_str());
    let data = par.data.unwrap_or(if model_parallel { 1 } else { world });
    if data == 0 || !world.is_multiple_of(data) {
        return Err(job_err(format!("key `parallel.data`: a world of {world} ranks is not divisible into {data} data-parallel replicas")));
    }
    let per_replica = world / data;
    let mut strategy = serde_json::Map::new();
    let (model_ranks, piece_of): (usize, Box<dyn Fn(usize) -> Piece>) = match par.strategy.as_str() {
        "pipeline" => {
            let stages = par.pipeline.unwrap_or(per_replica);
            if stages * data != world {
                return Err(job_err(format!(
                    "key `parallel.pipeline`: {data} replicas of {stages} stages need {} ranks, not {world}",
                    stages * data
                )));
            }
            if stages > blocks {
                return Err(job_err(format!(
                    "key `parallel.pipeline`: {stages} stages, but the model has only {blocks} blocks (one stage holds at least one)"
                )));
            }
            if !["gpipe", "1f1b"].contains(&par.schedule.as_str()) {
                return Err(job_err(format!("key `parallel.schedule`: `{}` (gpipe, 1f1b)", par.schedule)));
            }
            if par.micro_batches == 0 {
                return Err(job_err("key `parallel.micro_batches`: must be at least 1".into()));
            }
            let costs = match (par.balance.as_str(), &par.layer_costs) {
                (_, Some(c)) if c.len() != blocks => {
                    return Err(job_err(format!(
                        "key `parallel.layer_costs`: {} costs for a model of {blocks} blocks",
                        c.len()
                    )))
                }
                ("time", Some(c)) => c.clone(),
                ("time", None) => {
                    return Err(job_err(
                        "key `parallel.balance`: \"time\" needs the measured `parallel.layer_costs` (sheaf launch measures them; under another launcher, set them)".into(),
                    ))
                }
                ("params", _) => info.blocks.iter().map(|b| b.params).collect(),
                (other, _) => return Err(job_err(format!("key `parallel.balance`: `{other}` (params, time)"))),
            };
            let cut = registry
                .model_partitioner(&par.partitioner, "")?
                .cut(&costs, stages)
                .map_err(|e| job_err(format!("key `parallel.partitioner`: {e}")))?;
            // A vendor's partitioner is checked, not trusted: `stages` contiguous,
            // non-empty ranges covering every block.
            let covers = cut.len() == stages
                && cut.first().is_some_and(|r| r.start == 0)
                && cut.last().is_some_and(|r| r.end == blocks)
                && cut.iter().all(|r| !r.is_empty())
                && cut.windows(2).all(|w| w[0].end == w[1].start);
            if !covers {
                return Err(job_err(format!(
                    "key `parallel.partitioner`: `{}` cut {blocks} blocks into {cut:?}, not {stages} contiguous non-empty stages",
                    par.partitioner
                )));
            }
            strategy.insert("pipeline".into(), stages.into());
            strategy.insert("data".into(), data.into());
            strategy.insert("micro_batches".into(), par.micro_batches.into());
            strategy.insert("schedule".into(), par.schedule.clone().into());
            (stages, Box::new(move |m| Piece { blocks: cut[m].clone(), tensor_rank: 0, tensor_width: 1 }))
        }
        "tensor-parallel" => {
            let width = par.tensor.unwrap_or(per_replica);
            if width * data != world {
                return Err(job_err(format!(
                    "key `parallel.tensor`: {data} replicas of {width} tensor-parallel ranks need {} ranks, not {world}",
                    width * data
                )));
            }
            strategy.insert("tensor".into(), width.into());
            strategy.insert("data".into(), data.into());
            (width, Box::new(move |m| Piece { blocks: 0..blocks, tensor_rank: m, tensor_width: width }))
        }
        _ => {
            if data != world {
                return Err(job_err(format!(
                    "key `parallel.data`: {} replicas every rank holding the whole model need {data} ranks, not {world}",
                    par.strategy
                )));
            }
            (1, Box::new(move |_| Piece::whole(blocks)))
        }
    };
    let pieces: Vec<Piece> = (0..world).map(|r| piece_of(r % model_ranks)).collect();
    let layouts = pieces[..model_ranks]
        .iter()
        .map(|p| compute.piece_layout(spec, p).map_err(|e| job_err(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let plan = Plan { spec: spec.clone(), info: info.clone(), data, model_ranks, pieces, layouts, strategy };
    check_memory(job, &plan)?;
    Ok(plan)
}

/// Values of optimizer state per parameter.
fn state_copies(optimizer: &str) -> usize {
    match optimizer {
        "adamw" => 2,
        _ => 1,
    }
}

/// Bytes rank `rank` needs at most: its parameters, their gradients and optimizer
/// state, and the activations its schedule keeps at once.
pub fn need_bytes(job: &Job, plan: &Plan, rank: usize) -> (u64, u64) {
    let layout = plan.layout_of(rank);
    let params = layout.param_bytes(state_copies(&job.train.optimizer));
    let per_sample = layout.activation_bytes_per_sample;
    let share = job.train.batch_size.div_ceil(plan.data);
    let par = &job.parallel;
    let activations = if par.strategy == "pipeline" {
        let micro = par.micro_batches.min(share).max(1);
        let rows = share.div_ceil(micro);
        let stage = rank % plan.model_ranks;
        let kept = if par.schedule == "1f1b" { (plan.model_ranks - stage).min(micro) } else { micro };
        kept as u64 * rows as u64 * per_sample
    } else {
        share as u64 * per_sample
    };
    (params, activations)
}

fn check_memory(job: &Job, plan: &Plan) -> Result<(), HostError> {
    let Some(limit_mb) = job.compute.memory_limit_mb else { return Ok(()) };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for rank in 0..plan.pieces.len() {
        let (params, activations) = need_bytes(job, plan, rank);
        if mib(params + activations) > limit_mb {
            let hint = if plan.is_model_parallel() {
                "use more workers"
            } else {
                "cut the model over several workers with parallel.strategy = \"pipeline\" or \"tensor-parallel\""
            };
            return Err(job_err(format!(
                "key `compute.memory_limit_mb`: rank {rank} needs {:.2} MiB (parameters, gradients and optimizer state {:.2} MiB, activations {:.2} MiB) but the limit is {limit_mb} MiB; {hint}",
                mib(params + activations),
                mib(params),
                mib(activations)
            )));
        }
    }
    Ok(())
}

/// Measures each block's forward and backward time on one micro-batch of random data
/// (median of 5, nanoseconds), one block built at a time, each fed the previous
/// block's output, for `parallel.balance = "time"`: `sheaf launch` measures once and
/// hands the costs to every worker, so all cut the model the same way.
pub fn measure_layer_costs(job: &Job, registry: &Registry) -> Result<Vec<u64>, HostError> {
    let compute_config = serde_json::json!({ "device": job.compute.device }).to_string();
    let compute = registry.compute(&job.compute.backend, &compute_config)?;
    let data = crate::data::load(job, registry, compute.as_ref())?;
    let ModelInput::Rows { features, .. } = data.info.input else {
        return Err(job_err(
            "key `parallel.balance`: \"time\" measures models of feature rows only; use \"params\"".into(),
        ));
    };
    let par = &job.parallel;
    let rows =
        job.train.batch_size.div_ceil(par.data.unwrap_or(1).max(1)).div_ceil(par.micro_batches.max(1)).max(1);
    let core = |e: sheaf_core::Error| HostError::Core(format!("measuring layer costs: {e}"));
    let mut rng = sheaf_core::SplitMix64::new(job.seed);
    let mut input: Vec<f32> = (0..rows * features).map(|_| rng.next_f32()).collect();
    let mut costs = Vec::with_capacity(data.info.blocks.len());
    for b in 0..data.info.blocks.len() {
        let piece = Piece { blocks: b..b + 1, tensor_rank: 0, tensor_width: 1 };
        let mut model = compute.build_piece(&data.spec, &piece, job.seed).map_err(core)?;
        let mut times = Vec::new();
        let mut output = Vec::new();
        for micro in 0..6u64 {
            let t = std::time::Instant::now();
            output = model.stage_forward(micro, 0, &input, rows).map_err(core)?;
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
