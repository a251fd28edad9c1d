//! Checkpoints a run can resume from: `RUN_DIR/checkpoints/step-NNNNNNNN/` holds a
//! universal checkpoint ([`crate::universal`]: `rank-R.safetensors` and `rank-R.json`
//! from each rank that owns parameters or optimizer state, `index.json`) and
//! `state.json` (step, data position, global batch, the seed every random stream
//! derives from, the world and the resolved job).
//!
//! Every rank writes its own parts (no rank gathers the model) into
//! `step-N.partial/`, which rank 0 made afresh; once every rank reports its files
//! synced, rank 0 merges the index, writes `state.json`, syncs the directory and
//! renames it into place, so a crash at any moment leaves the previous checkpoints
//! whole and the partial one ignored (and removed by the next save). Then only the
//! newest `keep` are kept. Writing and resuming a world spread over hosts needs the
//! run directory on a shared filesystem.
//!
//! Resuming reads the newest complete checkpoint on every rank, each reading the parts
//! it now owns: any world size, strategy and layout, the same global batch. Format 1
//! (the whole model written by rank 0, the optimizer state by rank) is still read, by
//! the same world and strategy.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sheaf_collectives::Group;
use sheaf_core::{
    CheckpointSink, Communicator, DType, Deadline, OptimState, ReduceOp, StateViews, TrainConfig,
};

use crate::universal::RankParts;
use sheaf_job::plan::Plan;
use sheaf_plugins::HostError;
use sheaf_report::outputs::{write_atomic, TensorFile};

/// The run directory's subdirectory of checkpoints.
pub const CHECKPOINTS: &str = "checkpoints";
const FORMAT_1: &str = "sheaf-checkpoint-1";
const FORMAT: &str = "sheaf-checkpoint-2";

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
    /// (Format 2.) The global batch of a micro-step and the micro-steps of an optimizer
    /// step: a resumed run must keep both, or its data order and steps would differ.
    #[serde(default)]
    pub batch_size: usize,
    #[serde(default)]
    pub grad_accum: usize,
    /// (Format 2.) The optimizer's own step count.
    #[serde(default)]
    pub optimizer_step: u64,
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

fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(CHECKPOINTS).join(format!("step-{step:08}"))
}

/// fsync a directory, so a rename in it survives a crash.
fn sync_dir(dir: &Path) -> Result<(), HostError> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| HostError::io(dir, e))
}

/// A format-1 optimizer state file's bytes: its buffers as tensors, its step as
/// metadata.
#[cfg(test)]
pub(crate) fn state_bytes(state: &OptimState) -> Result<Vec<u8>, HostError> {
    let meta = std::collections::HashMap::from([("step".to_string(), state.step.to_string())]);
    let tensors = state.buffers.iter().map(|(name, b)| (name.as_str(), vec![b.len()], b.as_slice()));
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
    /// The run directory (every rank writes its parts into it; `None`: no checkpoints).
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
    /// Write checkpoints on a thread while training goes on (`train.checkpoint_async`).
    pub asynchronous: bool,
    /// The save in flight.
    pub pending: Option<Pending>,
    /// An asynchronous save's copy of the rank's parts, kept for the next save (one
    /// checkpoint's worth of memory, the price of saving while training goes on).
    pub staging: Option<RankParts<'static>>,
    /// Every save this run committed: how long training stopped for it, how long its
    /// files took to write, and when it was committed.
    pub saves: Vec<SaveTiming>,
}

/// A save written but not yet committed.
pub struct Pending {
    step: u64,
    optimizer_step: u64,
    partial: PathBuf,
    started: Instant,
    /// Seconds training stopped for an asynchronous save: the copy and the writer's
    /// start (a synchronous save stops it to its commit).
    handed_over: Option<f64>,
    outcome: Outcome,
}

enum Outcome {
    /// On its thread, which hands back the staging buffers with the outcome.
    Writing(std::thread::JoinHandle<(Result<f64, HostError>, Option<RankParts<'static>>)>),
    Done(Result<f64, HostError>),
}

/// One committed save, as `summary.json` lists them.
#[derive(Clone, Debug, Serialize)]
pub struct SaveTiming {
    pub step: u64,
    /// Seconds the training loop stopped for it.
    pub stall_s: f64,
    /// Seconds this rank took to write and sync its files.
    pub write_s: f64,
    /// Seconds from the save's start to its commit.
    pub committed_s: f64,
}

impl Checkpointer<'_> {
    fn deadline(&self) -> Deadline {
        Deadline::after(self.timeout)
    }

    fn state(&self, step: u64, optimizer_step: u64) -> CheckpointState {
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
            optimizer_files: Vec::new(),
            job: self.job.clone(),
            batch_size: self.config.batch_size,
            grad_accum: self.config.grad_accum.max(1),
            optimizer_step,
        }
    }

    /// Whether [`Checkpointer::write`] at `step` writes anything: not without a run
    /// directory for checkpoints, nor a second time for the same step.
    pub fn due(&self, step: u64) -> bool {
        self.run_dir.is_some() && self.saved != Some(step)
    }

    /// What rank `rank` writes of a checkpoint: its parameters (the lowest rank holding
    /// its piece or shard), its optimizer state (its own, or the lowest holding it).
    fn owns(&self, rank: usize) -> (bool, bool) {
        (self.plan.representatives().contains(&rank), state_source(self.plan, rank) == rank)
    }

    /// Whether `mine` succeeded on every rank (a collective: every rank calls it).
    fn everyone(&self, mine: &Result<(), HostError>) -> Result<bool, HostError> {
        let mut ok = [if mine.is_ok() { 1f32 } else { 0.0 }];
        self.comm
            .allreduce(bytemuck::cast_slice_mut(&mut ok), DType::F32, ReduceOp::Min, self.deadline())
            .map_err(|e| HostError::Train { rank: self.comm.rank(), detail: format!("checkpoint: {e}") })?;
        Ok(ok[0] > 0.0)
    }

    /// The checkpoint after `step` steps from every rank's `params` (its piece) and
    /// optimizer `state`; every rank calls it. A save still in flight is finished
    /// first. With `asynchronous`, the rank's parts are copied (the staging buffer) and
    /// written on a thread while training goes on; the checkpoint is committed at a
    /// later step boundary, once every rank's files are synced ([`Checkpointer::settle`]).
    pub fn write(&mut self, step: u64, params: &[f32], state: &OptimState) -> Result<(), HostError> {
        self.write_state(step, params, state.step, crate::universal::lent(state))
    }

    /// [`Checkpointer::write`] with the optimizer's state handed over (a save on a
    /// thread then takes it without a copy).
    pub fn write_owned(&mut self, step: u64, params: &[f32], state: OptimState) -> Result<(), HostError> {
        let step_count = state.step;
        self.write_state(step, params, step_count, crate::universal::owned(state))
    }

    /// [`Checkpointer::write`] from the optimizer's state as it lends it: written as it
    /// is, or (on a thread) first copied into the staging buffers kept between saves.
    pub fn write_views(
        &mut self,
        step: u64,
        params: &[f32],
        state: &StateViews<'_>,
    ) -> Result<(), HostError> {
        let lent = state.buffers.iter().map(|(n, b)| (n.clone(), Cow::Borrowed(*b))).collect();
        self.write_state(step, params, state.step, lent)
    }

    /// The save of `step`: `params`, and the optimizer's `state` buffers by name after
    /// `optimizer_step` of its steps.
    fn write_state(
        &mut self,
        step: u64,
        params: &[f32],
        optimizer_step: u64,
        state: Vec<(String, Cow<'_, [f32]>)>,
    ) -> Result<(), HostError> {
        if !self.due(step) {
            return Ok(());
        }
        // Training waits for a save still in flight: part of this save's stall.
        let started = Instant::now();
        self.settle(true)?;
        let rank = self.comm.rank();
        let root = self.run_dir.clone().expect("checked above");
        let checkpoints = root.join(CHECKPOINTS);
        let partial = checkpoints.join(format!("step-{step:08}.partial"));
        // Rank 0 makes the directory afresh before any rank writes into it.
        let made = match rank {
            0 => std::fs::create_dir_all(&checkpoints)
                .and_then(|()| match std::fs::remove_dir_all(&partial) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => std::fs::create_dir(&partial),
                })
                .map_err(|e| HostError::io(&partial, e)),
            _ => Ok(()),
        };
        if !self.everyone(&made)? {
            made?;
            return Err(HostError::Output(format!(
                "checkpoint at step {step}: rank 0 could not make {}",
                partial.display()
            )));
        }
        let (owns_params, owns_state) = self.owns(rank);
        let parts = match owns_params || owns_state {
            true => Some(crate::universal::RankParts::new(
                self.plan.layout_of(rank),
                &self.plan.info.layout,
                owns_params.then_some(params),
                owns_state.then_some(state),
            )),
            false => None,
        };
        let pending = |outcome, handed_over| Pending {
            step,
            optimizer_step,
            partial: partial.clone(),
            started,
            handed_over,
            outcome,
        };
        self.saved = Some(step);
        // What this rank cannot hand over fails the save on every rank, as a failed
        // write does: the others learn it at the agreement instead of waiting there.
        let parts = match parts.transpose() {
            Ok(parts) => parts,
            Err(e) => {
                self.pending = Some(pending(Outcome::Done(Err(e)), None));
                return self.settle(true);
            }
        };
        if self.asynchronous {
            // The step's state copied into the staging buffers, then written on a thread.
            let staged = parts.map(|p| p.into_staged(self.staging.take()));
            let dir = partial.clone();
            let thread = std::thread::Builder::new()
                .name(format!("checkpoint-{step}"))
                .spawn(move || {
                    let t = Instant::now();
                    let written = match &staged {
                        Some(p) => p.write(&dir, rank).map(drop),
                        None => Ok(()),
                    };
                    // Every buffer is kept as the next save's staging: refilled, not allocated.
                    (written.map(|()| t.elapsed().as_secs_f64()), staged)
                })
                .map_err(|e| HostError::os("cannot start the checkpoint writer", e))?;
            self.pending = Some(pending(Outcome::Writing(thread), Some(started.elapsed().as_secs_f64())));
            return Ok(());
        }
        let t = Instant::now();
        let written = match &parts {
            Some(p) => p.write(&partial, rank).map(drop),
            None => Ok(()),
        };
        self.pending = Some(pending(Outcome::Done(written.map(|()| t.elapsed().as_secs_f64())), None));
        self.settle(true)
    }

    /// Finishes the save in flight, if any, where every rank has written its parts:
    /// a collective every rank calls at the same step boundary. With `wait` it waits
    /// for this rank's writer; without, a save some rank is still writing stays in
    /// flight. Once all have written, rank 0 merges the index, writes `state.json`,
    /// syncs the directory and renames it into place; a rank that failed fails the
    /// save on every rank (the previous checkpoint stays).
    pub fn settle(&mut self, wait: bool) -> Result<(), HostError> {
        let Some(mut p) = self.pending.take() else { return Ok(()) };
        if let Outcome::Writing(thread) = p.outcome {
            p.outcome = match wait || thread.is_finished() {
                true => {
                    let (written, staging) = thread.join().unwrap_or_else(|_| {
                        (Err(HostError::Output("the checkpoint writer panicked".into())), None)
                    });
                    self.staging = staging;
                    Outcome::Done(written)
                }
                false => Outcome::Writing(thread),
            };
        }
        let (writing, failed) = match &p.outcome {
            Outcome::Writing(_) => (1f32, 0f32),
            Outcome::Done(r) => (0.0, if r.is_ok() { 0.0 } else { 1.0 }),
        };
        let mut flags = [writing, failed];
        self.comm
            .allreduce(bytemuck::cast_slice_mut(&mut flags), DType::F32, ReduceOp::Max, self.deadline())
            .map_err(|e| HostError::Train { rank: self.comm.rank(), detail: format!("checkpoint: {e}") })?;
        if flags[1] > 0.0 {
            let step = p.step;
            if let Outcome::Done(Err(e)) = p.outcome {
                return Err(e);
            }
            return Err(HostError::Output(format!(
                "checkpoint at step {step}: another rank could not write its part; the previous checkpoint stays"
            )));
        }
        if flags[0] > 0.0 {
            self.pending = Some(p);
            return Ok(());
        }
        let write_s = match &p.outcome {
            Outcome::Done(Ok(s)) => *s,
            _ => 0.0,
        };
        if self.comm.rank() == 0 {
            self.commit(p.step, p.optimizer_step, &p.partial)?;
        }
        self.saves.push(SaveTiming {
            step: p.step,
            stall_s: p.handed_over.unwrap_or_else(|| p.started.elapsed().as_secs_f64()),
            write_s,
            committed_s: p.started.elapsed().as_secs_f64(),
        });
        Ok(())
    }

    /// Rank 0's last part of a save every rank has written.
    fn commit(&self, step: u64, optimizer_step: u64, partial: &Path) -> Result<(), HostError> {
        let root = self.run_dir.clone().expect("a save in flight has a directory");
        let checkpoints = root.join(CHECKPOINTS);
        let writers: Vec<usize> = (0..self.world_size).filter(|&r| self.owns(r) != (false, false)).collect();
        crate::universal::merge_index(partial, &writers)?;
        let json = serde_json::to_vec_pretty(&self.state(step, optimizer_step)).expect("state serialises");
        write_synced(&partial.join("state.json"), &json)?;
        sync_dir(partial)?;
        let done = step_dir(&root, step);
        let _ = std::fs::remove_dir_all(&done);
        std::fs::rename(partial, &done).map_err(|e| HostError::io(&done, e))?;
        sync_dir(&checkpoints)?;
        self.prune(&checkpoints)?;
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

    fn save_owned(&mut self, step: u64, params: &[f32], optimizer: OptimState) -> sheaf_core::Result<()> {
        self.write_owned(step, params, optimizer).map_err(|e| sheaf_core::Error::Other(e.to_string()))
    }

    fn save_views(
        &mut self,
        step: u64,
        params: &[f32],
        optimizer: &StateViews<'_>,
    ) -> sheaf_core::Result<()> {
        self.write_views(step, params, optimizer).map_err(|e| sheaf_core::Error::Other(e.to_string()))
    }

    /// Whether a preemption signal reached any rank: the flag allreduced over the world
    /// at every step boundary (one value), so every rank stops after the same step.
    fn preempted(&mut self, step: u64) -> sheaf_core::Result<bool> {
        // A save in flight is committed at the first step boundary where every rank
        // has written its part.
        self.settle(false).map_err(|e| sheaf_core::Error::Other(e.to_string()))?;
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
        // The preemption's own save is written before the process exits.
        self.asynchronous = false;
        self.settle(true).map_err(|e| sheaf_core::Error::Other(e.to_string()))?;
        tracing::info!("preempted: stopping after step {step} with a checkpoint");
        Ok(true)
    }
}

pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), HostError> {
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

/// What a rank resumes from: its piece's parameters, its optimizer's state, the step.
pub struct Resumed {
    pub state: CheckpointState,
    pub params: Vec<f32>,
    pub optimizer: ResumedState,
    pub dir: PathBuf,
}

/// A resumed optimizer's state: as this rank's optimizer held it (format 1, the same
/// layout), or a universal checkpoint to cut it from as the strategy hands the
/// optimizer its parameters ([`crate::universal::Resharding`]).
pub enum ResumedState {
    Whole(OptimState),
    Universal(crate::universal::Universal),
}

/// Whether `file`, a name `state.json` gives, names a file in the checkpoint's own
/// directory: no separator, no parent, so a crafted `state.json` reads nothing else.
pub(crate) fn is_plain_file_name(file: &str) -> bool {
    !(file.is_empty() || file.contains('/') || file.contains(".."))
}

/// Reads checkpoint `dir` for `rank` of a world laid out by `plan`, training under
/// `config`: any world and strategy (format 2), the same global batch; a format-1
/// checkpoint only by the world size and strategy that wrote it.
pub fn read(
    dir: &Path,
    plan: &Plan,
    rank: usize,
    strategy: &str,
    config: &TrainConfig,
) -> Result<Resumed, HostError> {
    let bad = |detail: String| HostError::Data(format!("checkpoint {}: {detail}", dir.display()));
    let json = std::fs::read(dir.join("state.json")).map_err(|e| bad(format!("state.json: {e}")))?;
    let state: CheckpointState =
        serde_json::from_slice(&json).map_err(|e| bad(format!("state.json: {e}")))?;
    if state.format == FORMAT_1 {
        return read_format_1(dir, plan, rank, strategy, state);
    }
    if state.format != FORMAT {
        return Err(bad(format!("format `{}`, this sheaf reads `{FORMAT}` and `{FORMAT_1}`", state.format)));
    }
    same_global_batch(dir, &state, config)?;
    let mut universal = crate::universal::Universal::open(dir)?;
    let params = universal.params(plan.layout_of(rank), &plan.info.layout)?;
    Ok(Resumed { state, params, optimizer: ResumedState::Universal(universal), dir: dir.to_path_buf() })
}

/// Refuses to resume checkpoint `dir` (written as `state` says) under `config` with
/// another global batch.
fn same_global_batch(dir: &Path, state: &CheckpointState, config: &TrainConfig) -> Result<(), HostError> {
    let accum = config.grad_accum.max(1);
    if (state.batch_size, state.grad_accum) == (config.batch_size, accum) {
        return Ok(());
    }
    Err(HostError::Usage(format!(
        "checkpoint {}: written with a global batch of {} samples, {} micro-steps a step; this run has {} \
         and {accum}: the same steps would take other samples, so the run would not go on as it was. Resume \
         with train.batch_size = {} and train.grad_accum = {} (any world size and layout), or start from its \
         parameters alone with --init-from",
        dir.display(),
        state.batch_size,
        state.grad_accum,
        config.batch_size,
        state.batch_size,
        state.grad_accum
    )))
}

/// What a launcher checks before it resumes `run_dir` under `config`: that its newest
/// checkpoint (if any) can be resumed with this global batch.
pub fn check_resumable(run_dir: &Path, config: &TrainConfig) -> Result<(), HostError> {
    let Some((_, dir)) = latest(run_dir)? else { return Ok(()) };
    let json = std::fs::read(dir.join("state.json")).map_err(|e| HostError::io(dir.join("state.json"), e))?;
    let state: CheckpointState =
        serde_json::from_slice(&json).map_err(|e| HostError::input(dir.join("state.json").display(), e))?;
    match state.format == FORMAT {
        true => same_global_batch(&dir, &state, config),
        false => Ok(()),
    }
}

/// A format-1 checkpoint: the whole model in `model.safetensors`, each rank's
/// optimizer state in the file `state.json` names for it.
fn read_format_1(
    dir: &Path,
    plan: &Plan,
    rank: usize,
    strategy: &str,
    state: CheckpointState,
) -> Result<Resumed, HostError> {
    let bad = |detail: String| HostError::Data(format!("checkpoint {}: {detail}", dir.display()));
    let world = plan.ranks.len();
    if state.world_size != world || state.strategy != strategy {
        return Err(bad(format!(
            "written by {} ranks of `{}` in format 1, this run is {world} of `{strategy}`: resume with the \
             same world and strategy (--init-from starts any layout from its parameters alone)",
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
    Ok(Resumed { state, params, optimizer: ResumedState::Whole(optimizer), dir: dir.to_path_buf() })
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

#[cfg(test)]
mod tests;
