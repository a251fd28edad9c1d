//! The pipeline's settings and its schedules.

use serde::Deserialize;
use sheaf_core::{Error, Result};
use sheaf_train::check_piece_zero_stage;

/// Fill-drain, or one-forward-one-backward.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Gpipe,
    #[serde(rename = "1f1b")]
    OneFOneB,
}

/// Settings, as JSON: `[parallel.options.pipeline]`, `parallel.data` and the host's
/// deadline.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Deadline of each receive and collective, in milliseconds.
    pub timeout_ms: u64,
    /// Stages per pipeline (`P`; default: the world over `data`).
    pub stages: Option<usize>,
    /// Pipelines, each training on its share of every global batch (`D`; default 1).
    pub data: Option<usize>,
    /// Tensor-parallel ranks per stage (`T`; default 1): each stage's blocks sliced
    /// across a group, as the tensor-parallel strategy slices a whole model.
    pub tensor: usize,
    /// Micro-batches per step and pipeline (`M`).
    pub micro_batches: usize,
    pub schedule: Schedule,
    /// ZeRO stage across the `D` pipelines: 0, 1 (the ranks holding the same piece
    /// in different pipelines shard its optimizer state: gradients reduce-scattered
    /// among them, each steps its chunk, the parameters allgathered) or 3 (they shard
    /// the piece's parameters by rows, each unit gathered just before it runs; whole
    /// blocks only, `tensor` 1).
    pub zero: u8,
    /// Under `zero = 3`: whether a unit's gathered parameters go as soon as it has run
    /// (true, the default: two gathers a unit a micro-batch), or stay until the step's
    /// optimizer changes them (one gather a unit a step, the stage held whole while it
    /// trains).
    pub reshard_after_forward: bool,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            timeout_ms: 60_000,
            stages: None,
            data: None,
            tensor: 1,
            micro_batches: 4,
            schedule: Schedule::Gpipe,
            zero: 0,
            reshard_after_forward: true,
        }
    }
}

impl PipelineConfig {
    pub fn parse(json: &str) -> Result<PipelineConfig> {
        if json.trim().is_empty() {
            return Ok(PipelineConfig::default());
        }
        let c: PipelineConfig =
            serde_json::from_str(json).map_err(|e| Error::config("parallel.options.pipeline", e))?;
        if c.stages == Some(0) || c.data == Some(0) || c.micro_batches == 0 || c.tensor == 0 {
            return Err(Error::config(
                "parallel.options.pipeline",
                "stages, data, tensor and micro_batches must be at least 1",
            ));
        }
        if !c.reshard_after_forward && c.zero != 3 {
            return Err(Error::config(
                "parallel.options.pipeline.reshard_after_forward",
                "applies to zero = 3 only (the stages' parameters sharded by rows)",
            ));
        }
        match (c.zero, c.tensor) {
            (3, 1) => {}
            (3, t) => {
                return Err(Error::config(
                    "parallel.options.pipeline.zero",
                    format!(
                        "ZeRO stage 3 shards whole blocks by rows; stages sliced {t} ways for tensor \
                         parallelism hold weights by columns (use zero = 1 with tensor > 1)"
                    ),
                ))
            }
            (z, _) => check_piece_zero_stage("parallel.options.pipeline.zero", z).map_err(|_| {
                Error::config(
                    "parallel.options.pipeline.zero",
                    format!(
                        "no ZeRO stage {z} across pipelines (0, 1 or 3; 2 saves nothing here: each stage \
                     sums its micro-batches' gradients itself and reduces them once per step)"
                    ),
                )
            })?,
        }
        Ok(c)
    }

    /// `(D, P, T)` over `world` ranks.
    pub fn layout(&self, world: usize) -> Result<(usize, usize, usize)> {
        let (data, tensor) = (self.data.unwrap_or(1), self.tensor);
        let stages = self.stages.unwrap_or(world / (data * tensor).max(1));
        if data * stages * tensor != world || stages == 0 {
            return Err(Error::config(
                "parallel.options.pipeline.stages",
                format!(
                    "{data} pipelines of {stages} stages of {tensor} tensor-parallel ranks need {} ranks, not {world}",
                    data * stages * tensor
                ),
            ));
        }
        Ok((data, stages, tensor))
    }
}

/// One pass of one micro-batch through one stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward(usize),
    Backward(usize),
}

/// The order stage `stage` of `stages` runs the passes of `micro` micro-batches in.
pub fn schedule(kind: Schedule, stages: usize, stage: usize, micro: usize) -> Vec<Pass> {
    match kind {
        Schedule::Gpipe => (0..micro).map(Pass::Forward).chain((0..micro).map(Pass::Backward)).collect(),
        Schedule::OneFOneB => {
            let warm = (stages - 1 - stage).min(micro);
            let mut out: Vec<Pass> = (0..warm).map(Pass::Forward).collect();
            for b in 0..micro {
                if warm + b < micro {
                    out.push(Pass::Forward(warm + b));
                }
                out.push(Pass::Backward(b));
            }
            out
        }
    }
}
