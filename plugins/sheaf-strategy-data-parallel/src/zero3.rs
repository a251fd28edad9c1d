//! ZeRO stage 3: the parameters sharded too (FSDP).
//!
//! Each rank holds its rows of every parameter (the model is built as a row shard,
//! [`sheaf_core::PieceLayout::row_shard`]) and runs a pass unit by unit
//! ([`Model::units`]): just before a unit's forward, and again before its backward,
//! the unit's rows are allgathered from every rank into one reusable buffer (freed for
//! the next unit as soon as the model has run it: FSDP2's `reshard_after_forward`);
//! as the backward pass leaves a unit, its gradient is reduce-scattered so each rank
//! keeps the sum of its own rows. The optimizer then steps each rank's rows only, in
//! place in the model's buffer, so a rank holds 1/world of the parameters, gradients
//! and optimizer state, plus one unit gathered.
//!
//! The root unit (embeddings, head) is gathered once per micro-batch and kept by the
//! model to the end of its backward pass; the last unit, gathered last in the forward
//! pass, runs its backward on that gather. With `overlap` (as for the other stages:
//! by default where a core is spare), the next unit's gather runs on a communication
//! thread while the model runs the unit before it, and in the backward pass a unit's
//! reduce-scatter runs there beside the next unit's work (FSDP2's prefetch), at the
//! cost of a second unit, gradient and wire buffer.

use std::ops::Range;

use std::time::Instant;

use sheaf_core::{
    Batch, Communicator, DType, DataPartitioner, Dataset, Deadline, Error, Model, ParamLayout, ReduceOp,
    Result, TrainContext, TrainSummary,
};
use sheaf_train::{
    clip_to, most_passes, prefetched_steps, rows_by_rank, sum_of_squares, test_totals, Passes, RunTally,
    StepDone,
};

use crate::{DataParallel, GradDType};

impl DataParallel {
    /// Training under ZeRO stage 3 (see the module's text): the step loop of plain
    /// data parallelism, each micro-batch's pass run unit by unit.
    pub(crate) fn train_sharded(&mut self, ctx: TrainContext<'_>) -> Result<TrainSummary> {
        let TrainContext { config, comm, model, optimizer, partitioner, train, test, metrics, checkpoints } =
            ctx;
        let (rank, world) = (comm.rank(), comm.world_size());
        let dl = || self.deadline();
        // The ranks sharing the parameters (all, or the host's: consecutive ranks), and
        // under HSDP the ranks holding the same shard on the other hosts.
        let count = self.config.shard_count(world)?;
        let group = |color: usize, key: usize| -> Result<Box<dyn Communicator>> {
            comm.split(Some(color as u32), key as u32, dl())?
                .ok_or_else(|| Error::BadState("a rank left out of its own group".into()))
        };
        let (shards, replicas) = match count < world {
            true => (Some(group(rank / count, rank)?), Some(group(rank % count, rank)?)),
            false => (None, None),
        };
        let shard_comm: &dyn Communicator = shards.as_deref().unwrap_or(comm);
        let mut units = Units::new(model, shard_comm, dl(), self.config.overlap())?;
        units.keep = !self.config.reshard_after_forward;
        let total_steps = config.total_steps(train.len());
        let wire_dtype = self.config.grad_dtype;
        // This rank's rows' summed gradient, and the buffers a pass reuses.
        let mut shard_grads = vec![0f32; units.layout.total()];
        // Shared with the evaluations between steps, which would otherwise hold a second
        // set beside the training's (a unit, its gradient and the wire: 450 MB a rank
        // at a billion parameters).
        let bufs = std::cell::RefCell::new(PassBufs::default());
        let mut tally = RunTally::new(&config);
        // Evaluated in chunks of a training micro-batch's share, so an evaluation pass
        // holds no more activations than a training pass.
        let chunk = config.batch_size.div_ceil(world);
        let validate = |model: &mut dyn Model, passes: &mut Passes<'_>| {
            let b = &mut bufs.borrow_mut();
            let comms = (comm, shard_comm);
            let totals = units.evaluate(model, test, partitioner, (chunk, passes), b, comms, &dl)?;
            test_totals(comm, totals, dl())
        };
        let ask = crate::ask_shares(partitioner, config.start_micro_step(), rank, world);
        prefetched_steps(train, &config, ask, |loader, group, ()| {
            let t0 = Instant::now();
            let group_samples: usize = group.iter().map(|(_, g)| g.len()).sum();
            shard_grads.fill(0.0);
            let mut local_loss = 0f32;
            for _ in 0..group.len() {
                let local = loader.take()?;
                let share = local.len() as f32 / group_samples as f32;
                let batch = (!local.is_empty()).then(|| local.batch());
                let bufs = &mut bufs.borrow_mut();
                let (sum, _) = units.forward(model, batch.as_ref(), true, bufs, shard_comm, &dl)?;
                if let Some(b) = &batch {
                    // The mean over the batch's predictions, as the whole model reports it.
                    let loss = (sum / b.predictions().max(1) as f64) as f32;
                    local_loss += loss * share;
                }
                let ran = batch.is_some();
                units.backward(model, ran, share, &mut shard_grads, bufs, wire_dtype, shard_comm, &dl)?;
            }
            // Under HSDP each host summed its ranks' gradients: the hosts' sums, added.
            if let Some(replicas) = &replicas {
                let grads = bytemuck::cast_slice_mut(&mut shard_grads);
                replicas.allreduce(grads, DType::F32, ReduceOp::Sum, dl())?;
            }
            // The loss over every rank; the squares over one copy of the shards.
            let mut loss = [f64::from(local_loss)];
            comm.allreduce(bytemuck::cast_slice_mut(&mut loss), DType::F64, ReduceOp::Sum, dl())?;
            let mut squares = [sum_of_squares(&shard_grads)];
            shard_comm.allreduce(bytemuck::cast_slice_mut(&mut squares), DType::F64, ReduceOp::Sum, dl())?;
            let grad_norm = clip_to(&mut shard_grads, squares[0], config.grad_clip);
            optimizer.set_learning_rate(config.lr.at(tally.steps(), total_steps));
            // The rows change: units kept gathered are stale from here.
            bufs.borrow_mut().release_kept();
            optimizer.step(&mut units.layout.params(own(model)?, &shard_grads))?;
            let done = StepDone {
                epoch: group.last().map_or(0, |(e, _)| *e),
                loss: f64::from(loss[0] as f32),
                grad_norm,
                samples: group_samples,
                started: t0,
            };
            tally.end_step(done, metrics, checkpoints, model, optimizer, validate)?;
            Ok(())
        })?;
        let gradient_bytes = 4 * (shard_grads.len() + bufs.borrow().capacity()) as u64;
        tally.summary(train.len(), model, optimizer, gradient_bytes, validate)
    }
}

/// How every rank's rows of each unit lie in the unit gathered whole.
pub struct Units {
    world: usize,
    /// Whether the next unit's gather (and, in the backward pass, the last unit's
    /// reduce-scatter) runs on a communication thread beside the model's work.
    overlap: bool,
    /// Whether a gathered unit stays gathered (in `PassBufs::kept`) until the rows
    /// change, instead of going as soon as it has run (`reshard_after_forward = false`;
    /// its passes run on the training thread: after the first, nothing to prefetch).
    pub keep: bool,
    /// The model's (this rank's shard's) layout.
    pub layout: ParamLayout,
    units: Vec<Unit>,
}

struct Unit {
    /// The unit's parameters (indices of the layout), in the model's order.
    params: Vec<usize>,
    /// Each parameter's place in the gathered unit.
    whole: Vec<Range<usize>>,
    /// Each parameter's values per row.
    row_len: Vec<usize>,
    /// Each parameter's rows held by each rank: `rows[k][q]`.
    rows: Vec<Vec<Range<usize>>>,
    /// The most values of the unit any rank holds (each rank's part travels padded to it).
    pad: usize,
    len: usize,
}

impl Unit {
    /// Rank `q`'s values of parameter `k`, in the gathered unit.
    fn part(&self, k: usize, q: usize) -> Range<usize> {
        let (rows, len) = (&self.rows[k][q], self.row_len[k]);
        self.whole[k].start + rows.start * len..self.whole[k].start + rows.end * len
    }
}

impl Units {
    /// The units of `model` (a row shard) over `comm`: every rank's row counts are
    /// gathered once, so each knows where every rank's rows go.
    pub fn new(
        model: &dyn Model,
        comm: &dyn Communicator,
        deadline: Deadline,
        overlap: bool,
    ) -> Result<Units> {
        let world = comm.world_size();
        let layout = model.layout().clone();
        let units = model.units();
        if units.is_empty() {
            return Err(Error::Unsupported(
                "ZeRO stage 3 needs a model that runs unit by unit on gathered parameters; this one \
                 does not (its compute plugin builds no row shards of it)"
                    .into(),
            ));
        }
        let specs = layout.specs();
        let by_rank = rows_by_rank(&layout, comm, deadline)?;
        let units = units
            .into_iter()
            .map(|params| {
                let mut whole = Vec::new();
                let mut row_len = Vec::new();
                let mut rows = Vec::new();
                let mut len = 0;
                let mut held = vec![0usize; world];
                for &p in &params {
                    let shape = &specs[p].shape;
                    let per_row = shape.iter().skip(1).product::<usize>();
                    let ranges = by_rank[p].clone();
                    for (h, r) in held.iter_mut().zip(&ranges) {
                        *h += r.len() * per_row;
                    }
                    let all_rows = ranges.last().map_or(0, |r| r.end);
                    whole.push(len..len + all_rows * per_row);
                    len += all_rows * per_row;
                    row_len.push(per_row);
                    rows.push(ranges);
                }
                let pad = held.into_iter().max().unwrap_or(0);
                Unit { params, whole, row_len, rows, pad, len }
            })
            .collect();
        Ok(Units { world, overlap, keep: false, layout, units })
    }

    pub fn count(&self) -> usize {
        self.units.len()
    }

    /// `wire` as every rank's parts of unit `unit` and, after them, this rank's own.
    fn wire_for<'w>(&self, unit: &Unit, wire: &'w mut Vec<f32>) -> (&'w mut [f32], &'w mut [f32]) {
        wire.clear();
        wire.resize(unit.pad * (self.world + 1), 0.0);
        wire.split_at_mut(unit.pad * self.world)
    }

    /// Unit `u` gathered whole into `out` (resized to it) from every rank's `own`
    /// rows (this rank's: the model's buffer, in its layout); `wire` is scratch.
    pub fn gather(
        &self,
        u: usize,
        own: &[f32],
        out: &mut Vec<f32>,
        wire: &mut Vec<f32>,
        comm: &dyn Communicator,
        deadline: Deadline,
    ) -> Result<()> {
        self.pack(u, own, wire);
        self.exchange(u, out, wire, comm, deadline)
    }

    /// This rank's rows of unit `u` from `own` into its part of `wire`: the first half
    /// of a gather, which reads the model's buffer.
    fn pack(&self, u: usize, own: &[f32], wire: &mut Vec<f32>) {
        let unit = &self.units[u];
        let (_, mine) = self.wire_for(unit, wire);
        let mut at = 0;
        for &p in &unit.params {
            let r = self.layout.range(p);
            mine[at..at + r.len()].copy_from_slice(&own[r.clone()]);
            at += r.len();
        }
    }

    /// The second half of a gather: every rank's packed rows of unit `u` exchanged and
    /// placed whole into `out`. Touches no model, so it runs on a communication thread
    /// while the model runs the unit before.
    fn exchange(
        &self,
        u: usize,
        out: &mut Vec<f32>,
        wire: &mut [f32],
        comm: &dyn Communicator,
        deadline: Deadline,
    ) -> Result<()> {
        let unit = &self.units[u];
        let (all, mine) = wire.split_at_mut(unit.pad * self.world);
        comm.allgather(bytemuck::cast_slice(mine), bytemuck::cast_slice_mut(all), deadline)?;
        out.clear();
        out.resize(unit.len, 0.0);
        for q in 0..self.world {
            let mut at = q * unit.pad;
            for k in 0..unit.params.len() {
                let part = unit.part(k, q);
                out[part.clone()].copy_from_slice(&all[at..at + part.len()]);
                at += part.len();
            }
        }
        Ok(())
    }

    /// Reduce-scatters unit `u`'s gradient `grads` (this rank's, the unit whole),
    /// scaled by `share`, and adds the sum of this rank's rows into `shard` (laid out
    /// as the model's parameters); `wire` is scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn reduce_scatter_add(
        &self,
        u: usize,
        grads: &[f32],
        share: f32,
        shard: &mut [f32],
        wire: &mut Vec<f32>,
        dtype: GradDType,
        comm: &dyn Communicator,
        deadline: Deadline,
    ) -> Result<()> {
        let unit = &self.units[u];
        let (all, mine) = self.wire_for(unit, wire);
        for q in 0..self.world {
            let mut at = q * unit.pad;
            for k in 0..unit.params.len() {
                let part = unit.part(k, q);
                for (w, g) in all[at..at + part.len()].iter_mut().zip(&grads[part.clone()]) {
                    *w = g * share;
                }
                at += part.len();
            }
        }
        crate::zero::reduce_scatter_bucket(comm, all, mine, dtype, deadline)?;
        let mut at = 0;
        for &p in &unit.params {
            let r = self.layout.range(p);
            for (s, m) in shard[r.clone()].iter_mut().zip(&mine[at..at + r.len()]) {
                *s += m;
            }
            at += r.len();
        }
        Ok(())
    }

    /// A forward pass of `batch` unit by unit (or, without a batch, the gathers alone:
    /// every rank takes part in each unit's gather); returns the summed loss and the
    /// correct predictions. With `overlap`, each unit's gather after the first runs on
    /// a communication thread while the model runs the unit before it. The last unit
    /// is left gathered in `b.unit`, where [`Units::backward`] starts.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        model: &mut dyn Model,
        batch: Option<&Batch<'_>>,
        train: bool,
        b: &mut PassBufs,
        comm: &dyn Communicator,
        deadline: &dyn Fn() -> Deadline,
    ) -> Result<(f64, usize)> {
        if let Some(batch) = batch {
            model.unit_begin(batch, train)?;
        }
        let n = self.count();
        if self.keep {
            let mut end = None;
            for u in 0..n {
                self.kept(u, model, b, comm, deadline)?;
                if batch.is_some() {
                    end = model.unit_forward(u, &b.kept[u])?;
                }
            }
            return match (batch, end) {
                (None, _) => Ok((0.0, 0)),
                (Some(_), Some(end)) => Ok(end),
                (Some(_), None) => Err(Error::BadState("the model's last unit gave no loss".into())),
            };
        }
        self.gather(0, own(model)?, &mut b.unit, &mut b.wire, comm, deadline())?;
        let mut end = None;
        for u in 0..n {
            let ahead = u + 1 < n;
            let run = |model: &mut dyn Model, params: &[f32]| match batch {
                Some(_) => model.unit_forward(u, params),
                None => Ok(None),
            };
            if self.overlap && ahead {
                self.pack(u + 1, own(model)?, &mut b.next_wire);
                let dl = deadline();
                let PassBufs { unit, next, next_wire, .. } = b;
                let fetch = || self.exchange(u + 1, next, next_wire, comm, dl);
                let (ran, fetched) = beside(fetch, || run(model, unit));
                (end, ()) = (ran?, fetched?);
                std::mem::swap(&mut b.unit, &mut b.next);
            } else {
                end = run(model, &b.unit)?;
                if ahead {
                    self.gather(u + 1, own(model)?, &mut b.unit, &mut b.wire, comm, deadline())?;
                }
            }
        }
        match (batch, end) {
            (None, _) => Ok((0.0, 0)),
            (Some(_), Some(end)) => Ok(end),
            (Some(_), None) => Err(Error::BadState("the model's last unit gave no loss".into())),
        }
    }

    /// The backward pass after [`Units::forward`] with `train`: each unit's gradient,
    /// scaled by `share`, reduce-scattered into `shard` as the pass leaves it (a rank
    /// without a batch sends zeros); the last unit runs on its parameters as the
    /// forward pass left them gathered, each other on a gather again. With `overlap`,
    /// the reduce-scatter of each unit's gradient and the gather of the unit below run
    /// on a communication thread while the model runs the unit's backward: in the same
    /// order as without, so on the same values.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        model: &mut dyn Model,
        ran: bool,
        share: f32,
        shard: &mut [f32],
        b: &mut PassBufs,
        dtype: GradDType,
        comm: &dyn Communicator,
        deadline: &dyn Fn() -> Deadline,
    ) -> Result<()> {
        if self.keep {
            for u in (0..self.count()).rev() {
                self.kept(u, model, b, comm, deadline)?;
                b.grads.clear();
                b.grads.resize(self.units[u].len, 0.0);
                if ran {
                    let params = if u == 0 { &[][..] } else { &b.kept[u][..] };
                    model.unit_backward(u, params, &mut b.grads)?;
                }
                self.reduce_scatter_add(u, &b.grads, share, shard, &mut b.wire, dtype, comm, deadline())?;
            }
            return Ok(());
        }
        // The unit whose gradient waits in `b.sent` for its reduce-scatter.
        let mut pending = None;
        for u in (0..self.count()).rev() {
            b.grads.clear();
            b.grads.resize(self.units[u].len, 0.0);
            // The root stays with the model from its forward: run without parameters.
            let root = u == 0;
            let below = u >= 2;
            let backward = |model: &mut dyn Model, params: &[f32], grads: &mut [f32]| match ran {
                true => model.unit_backward(u, if root { &[] } else { params }, grads),
                false => Ok(()),
            };
            if self.overlap {
                if below {
                    self.pack(u - 1, own(model)?, &mut b.next_wire);
                }
                let dl = deadline();
                let PassBufs { unit, next, grads, sent, wire, next_wire, .. } = b;
                let shard = &mut *shard;
                let communicate = || -> Result<()> {
                    if let Some(p) = pending {
                        self.reduce_scatter_add(p, sent, share, shard, wire, dtype, comm, dl)?;
                    }
                    match below {
                        true => self.exchange(u - 1, next, next_wire, comm, dl),
                        false => Ok(()),
                    }
                };
                let (done, communicated) = beside(communicate, || backward(model, unit, grads));
                done?;
                communicated?;
                pending = Some(u);
                std::mem::swap(&mut b.grads, &mut b.sent);
                if below {
                    std::mem::swap(&mut b.unit, &mut b.next);
                }
            } else {
                backward(model, &b.unit, &mut b.grads)?;
                self.reduce_scatter_add(u, &b.grads, share, shard, &mut b.wire, dtype, comm, deadline())?;
                if below {
                    self.gather(u - 1, own(model)?, &mut b.unit, &mut b.wire, comm, deadline())?;
                }
            }
        }
        if let Some(p) = pending {
            self.reduce_scatter_add(p, &b.sent, share, shard, &mut b.wire, dtype, comm, deadline())?;
        }
        Ok(())
    }

    /// Unit `u` gathered into `b.kept[u]`, unless it is there since the rows last
    /// changed.
    fn kept(
        &self,
        u: usize,
        model: &mut dyn Model,
        b: &mut PassBufs,
        comm: &dyn Communicator,
        deadline: &dyn Fn() -> Deadline,
    ) -> Result<()> {
        if b.kept.len() != self.count() {
            b.kept.resize_with(self.count(), Vec::new);
            b.fresh.resize(self.count(), false);
        }
        if !b.fresh[u] {
            self.gather(u, own(model)?, &mut b.kept[u], &mut b.wire, comm, deadline())?;
            b.fresh[u] = true;
        }
        Ok(())
    }

    /// `[loss sum, correct, predictions]` on this rank's share of `test` (its share
    /// over the world, `comms.0`), `chunk` samples at a time, its units gathered over
    /// `comms.1` into the training's `bufs`; every rank runs as many passes as the rank
    /// with the most, each after [`Passes::ask`].
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate(
        &self,
        model: &mut dyn Model,
        test: &dyn Dataset,
        partitioner: &dyn DataPartitioner,
        (chunk, passes): (usize, &mut Passes<'_>),
        bufs: &mut PassBufs,
        comms: (&dyn Communicator, &dyn Communicator),
        deadline: &dyn Fn() -> Deadline,
    ) -> Result<[f64; 3]> {
        let (world, comm) = comms;
        let chunk = chunk.max(1);
        let indices = partitioner.shard(0, test.len(), world.rank(), world.world_size())?;
        let rounds = most_passes(world, indices.len().div_ceil(chunk), deadline())?;
        let mut totals = [0f64; 3];
        for c in 0..rounds {
            passes.ask()?;
            let part = indices.get(c * chunk..((c + 1) * chunk).min(indices.len())).unwrap_or(&[]);
            let samples = if part.is_empty() { None } else { Some(test.gather(part)?) };
            let batch = samples.as_ref().map(|s| s.batch());
            let (loss, correct) = self.forward(model, batch.as_ref(), false, bufs, comm, deadline)?;
            totals[0] += loss;
            totals[1] += correct as f64;
            totals[2] += batch.map_or(0, |b| b.predictions()) as f64;
        }
        Ok(totals)
    }
}

/// The buffers a pass reuses: the unit gathered, a unit's gradient, their parts on the
/// wire; with overlap also the next unit on its way, the previous unit's gradient on
/// its way, and their parts on the wire.
#[derive(Default)]
pub struct PassBufs {
    unit: Vec<f32>,
    grads: Vec<f32>,
    wire: Vec<f32>,
    next: Vec<f32>,
    sent: Vec<f32>,
    next_wire: Vec<f32>,
    /// Units kept gathered (`Units::keep`), and whether each is since the rows last
    /// changed.
    kept: Vec<Vec<f32>>,
    fresh: Vec<bool>,
}

impl PassBufs {
    /// The values the buffers hold at most.
    pub fn capacity(&self) -> usize {
        let kept: usize = self.kept.iter().map(Vec::capacity).sum();
        [&self.unit, &self.grads, &self.wire, &self.next, &self.sent, &self.next_wire]
            .iter()
            .map(|v| v.capacity())
            .sum::<usize>()
            + kept
    }

    /// Units kept gathered handed back to the kernel: the rows are about to change.
    pub fn release_kept(&mut self) {
        for (k, fresh) in self.kept.iter_mut().zip(&mut self.fresh) {
            if std::mem::take(fresh) {
                sheaf_train::zero_release(k);
            }
        }
    }
}

/// Runs `job` on a scoped thread while `work` runs here; both results.
fn beside<R>(job: impl FnOnce() -> Result<()> + Send, work: impl FnOnce() -> R) -> (R, Result<()>) {
    std::thread::scope(|s| {
        let handle = s.spawn(job);
        let r = work();
        let j = handle
            .join()
            .unwrap_or_else(|_| Err(Error::Other("the ZeRO 3 communication thread panicked".into())));
        (r, j)
    })
}

/// The model's own rows (its lent buffer).
fn own(model: &mut dyn Model) -> Result<&mut [f32]> {
    match model.params_mut()? {
        Some(p) => Ok(p),
        None => Err(Error::Unsupported("ZeRO stage 3 needs a model that lends its parameter buffer".into())),
    }
}
