//! Checkpoints a run can resume from: `RUN_DIR/checkpoints/step-NNNNNNNN/` holds
//! `model.safetensors` (the whole model, as one process would hold it),
//! `optimizer-rank-R.safetensors` (the optimizer state of each rank whose state is its
//! own: every rank under ZeRO, the lowest rank holding each distinct piece otherwise;
//! the step count in the metadata) and `state.json` (step, data position, the seed
//! every random stream derives from, the world and the resolved job).
//!
//! Rank 0 writes everything: the others send it their pieces, a parameter at a time
//! as it writes the model (`whole`), and their state shards, so writing needs no
//! filesystem shared between hosts and no rank holds the whole model. It writes into
//! `step-N.partial-PID/`, syncs each file and the directory, and renames it into place,
//! so a crash at any moment leaves the previous checkpoints whole and the partial one
//! ignored (and removed by the next save). Then only the newest `keep` are kept.
//!
//! Resuming reads the newest complete checkpoint on every rank (so resuming a world
//! spread over hosts needs the run directory on a shared filesystem).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sheaf_collectives::Group;
use sheaf_core::{CheckpointSink, Communicator, DType, Deadline, OptimState, ReduceOp, TrainConfig};

use crate::whole::{receive_state, send_state, write_whole};
use sheaf_job::plan::Plan;
use sheaf_plugins::HostError;
use sheaf_report::outputs::{write_atomic, write_safetensors, NamedTensor, TensorFile};

/// The run directory's subdirectory of checkpoints.
pub const CHECKPOINTS: &str = "checkpoints";
const FORMAT: &str = "sheaf-checkpoint-1";

/// `state.json`: what a checkpoint is besides its tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format: String,
    /// Optimizer steps done.
    pub step: u64,
    /// Where the next global batch comes from: micro-steps (global batches) taken,
    /// and as epoch and batch within it.
    pub micro_step: u64,
    pub epoch: u64,
    pub batch_in_epoch: u64,
    /// The job's seed. Every random stream of a run (sample order, shuffling
    /// partitioners, initialisation) is a pure function of it and the epoch or
    /// micro-step, so this and the position above are the whole random state.
    pub seed: u64,
    pub world_size: usize,
    pub strategy: String,
    /// Which rank's optimizer state each rank resumes from, by rank.
    pub optimizer_files: Vec<String>,
    /// The resolved job that wrote it.
    pub job: serde_json::Value,
}

/// Where rank `rank` finds its optimizer state: its own file when its state is a
/// shard of its own (ZeRO), else the file of the lowest rank holding the same piece
/// (whose state is the same).
fn state_source(plan: &Plan, rank: usize) -> usize {
    if plan.ranks[rank].state_shards > 1 || plan.ranks[rank].param_shard.is_some() {
        return rank;
    }
    let piece = &plan.ranks[rank].piece;
    plan.ranks.iter().position(|r| &r.piece == piece).unwrap_or(rank)
}

fn state_file(rank: usize) -> String {
    format!("optimizer-rank-{rank}.safetensors")
}

fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(CHECKPOINTS).join(format!("step-{step:08}"))
}

/// fsync a directory, so a rename in it survives a crash.
fn sync_dir(dir: &Path) -> Result<(), HostError> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| HostError::io(dir, e))
}

/// An optimizer state's buffers as tensors, and its step as metadata.
fn state_tensors(state: &OptimState) -> (impl Iterator<Item = NamedTensor<'_>>, HashMap<String, String>) {
    let meta = HashMap::from([("step".to_string(), state.step.to_string())]);
    (state.buffers.iter().map(|(name, b)| (name.as_str(), vec![b.len()], b.as_slice())), meta)
}

#[cfg(test)]
pub(crate) fn state_bytes(state: &OptimState) -> Result<Vec<u8>, HostError> {
    let (tensors, meta) = state_tensors(state);
    sheaf_report::outputs::safetensors_of(tensors, Some(meta))
}

pub(crate) fn state_from_file(file: &TensorFile) -> Result<OptimState, HostError> {
    let step = file
        .metadata()?
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HostError::Data("optimizer state without a step count in its metadata".into()))?;
    let mut buffers = Vec::new();
    for name in file.names()? {
        let values = file.f32s(&name, None)?;
        buffers.push((name, values));
    }
    // The optimizer keys its state by name; the file's order is the writer's.
    buffers.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(OptimState { step, buffers })
}

/// The host's [`CheckpointSink`]: what strategies hand their state to.
pub struct Checkpointer<'a> {
    pub comm: &'a Group,
    pub plan: &'a Plan,
    /// The run directory (rank 0 writes into it; `None`: no checkpoints).
    pub run_dir: Option<PathBuf>,
    /// Checkpoints kept (the newest).
    pub keep: usize,
    pub config: TrainConfig,
    pub train_len: usize,
    pub world_size: usize,
    pub strategy: String,
    pub job: serde_json::Value,
    pub timeout: Duration,
    /// The newest step saved.
    pub saved: Option<u64>,
    /// Raised by a preemption signal on this rank (`sheaf_launch::preempt::watch`);
    /// `None`: the run is not preemptible.
    pub preempt: Option<Arc<AtomicBool>>,
    /// Where a preemption's checkpoint goes when the job saves none otherwise.
    pub preempt_dir: Option<PathBuf>,
}

impl Checkpointer<'_> {
    fn deadline(&self) -> Deadline {
        Deadline::after(self.timeout)
    }

    fn state(&self, step: u64) -> CheckpointState {
        let micro_step = step * self.config.grad_accum.max(1) as u64;
        let per_epoch = self.train_len.div_ceil(self.config.batch_size.max(1)).max(1) as u64;
        CheckpointState {
            format: FORMAT.into(),
            step,
            micro_step,
            epoch: micro_step / per_epoch,
            batch_in_epoch: micro_step % per_epoch,
            seed: self.config.seed,
            world_size: self.world_size,
            strategy: self.strategy.clone(),
            optimizer_files: (0..self.world_size).map(|r| state_file(state_source(self.plan, r))).collect(),
            job: self.job.clone(),
        }
    }

    /// Whether [`Checkpointer::write`] at `step` writes anything: not without a run
    /// directory for checkpoints, nor a second time for the same step.
    pub fn due(&self, step: u64) -> bool {
        self.run_dir.is_some() && self.saved != Some(step)
    }

    /// The checkpoint after `step` steps from every rank's `params` (its piece) and
    /// optimizer `state`; every rank calls it.
    pub fn write(&mut self, step: u64, params: &[f32], state: &OptimState) -> Result<(), HostError> {
        if !self.due(step) {
            return Ok(());
        }
        let rank = self.comm.rank();
        let writers: Vec<usize> = (0..self.world_size).filter(|&r| state_source(self.plan, r) == r).collect();
        if rank != 0 {
            write_whole(self.comm, params, self.plan, None, || self.deadline())?;
            if writers.contains(&rank) {
                send_state(self.comm, state, || self.deadline())?;
            }
            self.saved = Some(step);
            return Ok(());
        }
        let root = self.run_dir.clone().expect("checked above");
        let checkpoints = root.join(CHECKPOINTS);
        std::fs::create_dir_all(&checkpoints).map_err(|e| HostError::io(&checkpoints, e))?;
        let partial = checkpoints.join(format!("step-{step:08}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir(&partial).map_err(|e| HostError::io(&partial, e))?;
        write_whole(self.comm, params, self.plan, Some(&partial.join("model.safetensors")), || {
            self.deadline()
        })?;
        for &w in &writers {
            let path = partial.join(state_file(w));
            if w == 0 {
                // Rank 0's own state streams from its buffers.
                let (tensors, meta) = state_tensors(state);
                write_safetensors(&path, tensors, Some(meta))?;
            } else {
                receive_state(self.comm, w, &path, || self.deadline())?;
            }
        }
        let json = serde_json::to_vec_pretty(&self.state(step)).expect("state serialises");
        write_synced(&partial.join("state.json"), &json)?;
        sync_dir(&partial)?;
        let done = step_dir(&root, step);
        let _ = std::fs::remove_dir_all(&done);
        std::fs::rename(&partial, &done).map_err(|e| HostError::io(&done, e))?;
        sync_dir(&checkpoints)?;
        self.prune(&checkpoints)?;
        self.saved = Some(step);
        tracing::info!("checkpoint at step {step}: {}", done.display());
        Ok(())
    }

    /// Removes all but the newest `keep` checkpoints, and partial ones left by crashes.
    fn prune(&self, checkpoints: &Path) -> Result<(), HostError> {
        let mut complete = complete_steps(checkpoints)?;
        complete.sort_unstable();
        let drop = complete.len().saturating_sub(self.keep.max(1));
        for (step, dir) in complete.into_iter().take(drop) {
            std::fs::remove_dir_all(&dir).map_err(|e| HostError::io(&dir, e))?;
            tracing::debug!("removed checkpoint at step {step}");
        }
        for entry in std::fs::read_dir(checkpoints).map_err(|e| HostError::io(checkpoints, e))?.flatten() {
            if entry.file_name().to_string_lossy().contains(".partial") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(())
    }
}

impl CheckpointSink for Checkpointer<'_> {
    fn save(&mut self, step: u64, params: &[f32], optimizer: &OptimState) -> sheaf_core::Result<()> {
        self.write(step, params, optimizer).map_err(|e| sheaf_core::Error::Other(e.to_string()))
    }

    /// Whether a preemption signal reached any rank: the flag allreduced over the world
    /// at every step boundary (one value), so every rank stops after the same step.
    fn preempted(&mut self, step: u64) -> sheaf_core::Result<bool> {
        let Some(flag) = &self.preempt else { return Ok(false) };
        let mut any = [f32::from(u8::from(flag.load(Ordering::SeqCst)))];
        self.comm.allreduce(
            bytemuck::cast_slice_mut(&mut any),
            DType::F32,
            ReduceOp::Max,
            self.deadline(),
        )?;
        if any[0] == 0.0 {
            return Ok(false);
        }
        if self.run_dir.is_none() {
            self.run_dir = self.preempt_dir.clone();
        }
        tracing::info!("preempted: stopping after step {step} with a checkpoint");
        Ok(true)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), HostError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| HostError::io(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| HostError::io(path, e))
}

/// Every complete checkpoint under `checkpoints/`: `(step, dir)`.
fn complete_steps(checkpoints: &Path) -> Result<Vec<(u64, PathBuf)>, HostError> {
    let entries = match std::fs::read_dir(checkpoints) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(HostError::io(checkpoints, e)),
    };
    Ok(entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            Some((step, e.path()))
        })
        .collect())
}

/// The newest complete checkpoint of a run directory, if any.
pub fn latest(run_dir: &Path) -> Result<Option<(u64, PathBuf)>, HostError> {
    Ok(complete_steps(&run_dir.join(CHECKPOINTS))?.into_iter().max_by_key(|(s, _)| *s))
}

/// What a rank resumes from: its piece's parameters, its optimizer state, the step.
pub struct Resumed {
    pub state: CheckpointState,
    pub params: Vec<f32>,
    pub optimizer: OptimState,
    pub dir: PathBuf,
}

/// Whether `file`, a name `state.json` gives, names a file in the checkpoint's own
/// directory: no separator, no parent, so a crafted `state.json` reads nothing else.
fn is_plain_file_name(file: &str) -> bool {
    !(file.is_empty() || file.contains('/') || file.contains(".."))
}

/// Reads checkpoint `dir` for `rank` of a world laid out by `plan`: fails when it was
/// written by another world size or strategy (its optimizer shards would not fit).
pub fn read(dir: &Path, plan: &Plan, rank: usize, strategy: &str) -> Result<Resumed, HostError> {
    let bad = |detail: String| HostError::Data(format!("checkpoint {}: {detail}", dir.display()));
    let json = std::fs::read(dir.join("state.json")).map_err(|e| bad(format!("state.json: {e}")))?;
    let state: CheckpointState =
        serde_json::from_slice(&json).map_err(|e| bad(format!("state.json: {e}")))?;
    if state.format != FORMAT {
        return Err(bad(format!("format `{}`, this sheaf reads `{FORMAT}`", state.format)));
    }
    let world = plan.ranks.len();
    if state.world_size != world || state.strategy != strategy {
        return Err(bad(format!(
            "written by {} ranks of `{}`, this run is {world} of `{strategy}`: resume with the same \
             world and strategy (--init-from starts any layout from its parameters alone)",
            state.world_size, state.strategy
        )));
    }
    let whole = TensorFile::read(&dir.join("model.safetensors"))?.params(&plan.info.layout)?;
    let params = plan.layout_of(rank).slice(&plan.info.layout, &whole);
    let file =
        state.optimizer_files.get(rank).ok_or_else(|| bad(format!("no optimizer file for rank {rank}")))?;
    if !is_plain_file_name(file) {
        return Err(bad(format!("optimizer file `{file}` is not a file name")));
    }
    let optimizer = state_from_file(&TensorFile::read(&dir.join(file))?)?;
    Ok(Resumed { state, params, optimizer, dir: dir.to_path_buf() })
}

/// Whether `dir` already holds a run's outputs (which a new run must not overwrite).
/// Its `job.toml` alone is not one: the launcher writes it before its workers start.
pub fn holds_a_run(dir: &Path) -> bool {
    ["metrics.jsonl", "summary.json", "checkpoint.safetensors", CHECKPOINTS]
        .iter()
        .any(|f| dir.join(f).exists())
}

/// Writes `job` as the run directory's `job.toml` (what `--resume` reads).
pub fn write_job(dir: &Path, job: &sheaf_job::job::Job) -> Result<(), HostError> {
    let text = toml::to_string(job).map_err(|e| HostError::encode("job.toml", e))?;
    write_atomic(&dir.join("job.toml"), text.as_bytes())
}

#[cfg(test)]
mod file_names {
    use super::is_plain_file_name;

    /// What `state.json` may name: files beside it, never a path out of it.
    #[test]
    fn only_plain_names_inside_the_checkpoint_are_read() {
        assert!(is_plain_file_name("optimizer-rank-0.safetensors"));
        for bad in ["/etc/passwd", "../step-1/optimizer-rank-0.safetensors", "..", "a/b", ""] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }
}
