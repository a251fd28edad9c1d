//! Gradient buckets reduced while the backward pass runs.
//!
//! The flat gradient buffer is cut, at parameter boundaries, into buckets in reverse
//! layout order (the order a backward pass finishes them): the first 1 MiB (or
//! `bucket_mb`, when smaller) so that communication starts early, as PyTorch DDP does,
//! then `bucket_mb` each. A communication thread allreduces each bucket as soon as the
//! model's stepped backward pass ([`Model::backward_next`]) has finished every
//! gradient in it, while the pass goes on with the layers below. A model without a
//! stepped pass runs its whole backward first; its buckets go out the same way.
//!
//! Under ZeRO stage 2 ([`Exchange::scatter`]) each finished bucket is reduce-scattered
//! instead, into this rank's chunks only.
//!
//! Every rank cuts the same buckets from the same layout and sends them in the same
//! order, so the collectives match. Each element is summed by the same algorithm
//! whatever the bucket, so the result equals one allreduce of the whole buffer up to
//! the order of additions that the algorithm chosen for a bucket's size uses.

use std::ops::Range;
use std::sync::mpsc;

use half::bf16;
use serde::Deserialize;
use sheaf_core::{Communicator, DType, Deadline, Error, Model, ParamLayout, ReduceOp, Result};
use sheaf_train::{sum_of_squares, Shards};

use crate::zero;

/// How gradients travel between replicas.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GradDType {
    /// As computed.
    #[default]
    F32,
    /// Rounded to bfloat16 (half the bytes), summed in bfloat16, widened back.
    Bf16,
}

/// `values` rounded to bfloat16 for the wire.
pub(crate) fn narrow(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// Bfloat16 values from the wire, widened into `dst`.
pub(crate) fn widen(dst: &mut [f32], values: &[bf16]) {
    for (d, v) in dst.iter_mut().zip(values) {
        *d = v.to_f32();
    }
}

/// The first bucket's size at most, as DDP's.
const FIRST_BUCKET_BYTES: usize = 1 << 20;

/// The buckets of `layout`: ranges of the flat buffer, the last parameters first,
/// together covering all of it.
pub fn buckets(layout: &ParamLayout, bucket_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut end = layout.total();
    let mut cap = FIRST_BUCKET_BYTES.min(bucket_bytes).max(1);
    for p in (0..layout.specs().len()).rev() {
        let start = layout.range(p).start;
        if (end - start) * 4 >= cap || p == 0 {
            out.push(start..end);
            end = start;
            cap = bucket_bytes.max(1);
        }
    }
    out
}

/// What one optimizer step's last micro-batch reduces.
pub struct Exchange<'a> {
    pub comm: &'a dyn Communicator,
    pub buckets: &'a [Range<usize>],
    pub wire: GradDType,
    pub timeout: std::time::Duration,
    /// Whether [`Exchange::run`] reduces on a communication thread while the backward
    /// pass goes on, or on this thread between its steps.
    pub overlap: bool,
}

impl Exchange<'_> {
    /// Runs the backward pass of `model` on the batch it began (or the whole
    /// forward/backward for a model without a stepped pass) and allreduces each bucket
    /// on a communication thread as soon as the pass has finished it (without
    /// `overlap`, or in a world of one, with nothing to overlap, on this thread). `reduced` holds
    /// the step's gradients with the loss in its last slot: with `grads`, the pass
    /// writes there and `share` times each finished gradient (and the loss) is added
    /// into `reduced` (an earlier micro-batch's sums are in it); without, the pass
    /// writes straight into `reduced`, whose gradients are scaled by `share` in place
    /// (the step's only micro-batch: the same values, one pass over memory fewer).
    ///
    /// Returns the sum of squares of the reduced gradients (the loss slot left out),
    /// summed bucket by bucket, in bucket order, right after each bucket's reduction
    /// while it is still in cache, on whichever thread reduced it (see
    /// [`Exchange::pipelined`]). A fixed order, so every rank and every world size of the same
    /// layout gets the same bits from the same gradients.
    pub fn run(
        &self,
        model: &mut dyn Model,
        grads: Option<&mut [f32]>,
        reduced: &mut [f32],
        share: f32,
        backward: Backward<'_>,
    ) -> Result<f64> {
        let total = reduced.len() - 1;
        let deadline = || Deadline::after(self.timeout);
        // The loss slot rides at the end of the first bucket on an f32 wire; through
        // bf16 it would be rounded, so it travels alone in f32 after that bucket.
        let (body, mut loss_alone) = match self.wire {
            GradDType::F32 => (reduced, None),
            GradDType::Bf16 => {
                let (body, slot) = reduced.split_at_mut(total);
                (body, Some(slot))
            }
        };
        let (comm, wire, buckets) = (self.comm, self.wire, self.buckets);
        // One finished bucket's allreduce (and the loss's, travelling alone), then the
        // squares of its gradients.
        let exchange = move |i: usize, bucket: &mut [f32], loss: Option<&mut [f32]>| -> Result<f64> {
            reduce(comm, bucket, wire, deadline())?;
            if let Some(loss) = loss {
                comm.allreduce(bytemuck::cast_slice_mut(loss), DType::F32, ReduceOp::Sum, deadline())?;
            }
            Ok(sum_of_squares(&bucket[..buckets[i].len()]))
        };
        let ((), squares) = self.pipelined(
            |deliver| {
                self.produce(model, grads, body, total, share, &mut loss_alone, backward, |i, b, l| {
                    deliver((i, b, l))
                })
            },
            |(i, bucket, loss)| exchange(i, bucket, loss),
        )?;
        Ok(squares)
    }

    /// What [`Exchange::scatter_windowed`] holds for backward steps of at most `step`
    /// values, in values: its buffer (the largest bucket and one step, as a step may
    /// finish the end of one bucket and the start of the next, no more than the whole
    /// buffer), and the copies of finished buckets on their way (one exchanged between
    /// the backward steps or, with a communication thread, up to three: one it reduces,
    /// one queued, one waiting to be queued).
    pub fn window_sizes(&self, step: usize) -> (usize, usize) {
        let total = self.buckets.first().map_or(0, |b| b.end);
        let largest = self.buckets.iter().map(Range::len).max().unwrap_or(0);
        window_sizes(total, largest, self.buckets.len(), step, self.threaded())
    }

    /// Whether finished buckets go to a communication thread (see [`Exchange::pipelined`]).
    pub fn threaded(&self) -> bool {
        self.comm.world_size() > 1 && self.overlap
    }

    /// Runs `produce`, which hands out jobs (finished buckets) through the closure it
    /// is given, and does each job with `work`: on a communication thread while
    /// `produce` goes on (`overlap`), or here as each is handed out (without `overlap`,
    /// or in a world of one, where an exchange is a copy or bf16's rounding and there
    /// is nothing to overlap it with; no thread is started, about 0.1 ms a step on a
    /// shared 2-core machine). The handing-out closure returns false once `work` has
    /// failed, and `work`'s error is the one returned (a refused bucket stops the pass
    /// early). Returns what `produce` returned and the sum of what `work` returned.
    fn pipelined<J: Send, T>(
        &self,
        produce: impl FnOnce(&mut dyn FnMut(J) -> bool) -> Result<T>,
        mut work: impl FnMut(J) -> Result<f64> + Send,
    ) -> Result<(T, f64)> {
        if !self.threaded() {
            let (mut sum, mut failed) = (0f64, None);
            let produced = produce(&mut |job| match work(job) {
                Ok(v) => {
                    sum += v;
                    true
                }
                Err(e) => {
                    failed = Some(e);
                    false
                }
            });
            return match failed {
                Some(e) => Err(e),
                None => produced.map(|t| (t, sum)),
            };
        }
        std::thread::scope(|s| {
            // At most one job waits while the thread works on another: a producer that
            // copies its jobs out (`scatter_windowed`) holds three at the most.
            let (tx, rx) = mpsc::sync_channel::<J>(1);
            let worker = s.spawn(move || -> Result<f64> {
                let mut sum = 0f64;
                for job in rx {
                    sum += work(job)?;
                }
                Ok(sum)
            });
            // A closed channel: the worker failed, and its error is reported.
            let produced = produce(&mut |job| tx.send(job).is_ok());
            drop(tx);
            let done = worker.join().map_err(|_| Error::BadState("the gradient reducer panicked".into()))?;
            done.and_then(|sum| produced.map(|t| (t, sum)))
        })
    }

    /// Runs the backward pass for [`Exchange::run`] and hands each finished bucket of
    /// the step's sums (`body`, with the loss in its first bucket's slot or in
    /// `loss_alone`) to `deliver`, scaled by `share`, or with `grads`, `share` times the
    /// pass's gradients added into it. `deliver` returning false stops handing out.
    #[allow(clippy::too_many_arguments)]
    fn produce<'b>(
        &self,
        model: &mut dyn Model,
        grads: Option<&'b mut [f32]>,
        body: &'b mut [f32],
        total: usize,
        share: f32,
        loss_alone: &mut Option<&'b mut [f32]>,
        backward: Backward<'_>,
        mut deliver: impl FnMut(usize, &'b mut [f32], Option<&'b mut [f32]>) -> bool,
    ) -> Result<()> {
        match grads {
            None => self.drive(model, backward, body, total, |i, slice, loss| {
                // A step's only micro-batch on one rank has a share of 1: x * 1 is x.
                if share != 1.0 {
                    let n = self.buckets[i].len();
                    slice[..n].iter_mut().for_each(|g| *g *= share);
                }
                send_bucket(&mut deliver, loss_alone, i, slice, loss * share)
            }),
            Some(grads) => {
                // `reduced`'s bucket slices, in the order they complete.
                let mut slices: Vec<&mut [f32]> = Vec::with_capacity(self.buckets.len());
                let mut rest = body;
                for b in self.buckets {
                    let (lo, hi) = std::mem::take(&mut rest).split_at_mut(b.start);
                    slices.push(hi);
                    rest = lo;
                }
                let mut slices = slices.into_iter();
                self.drive(model, backward, grads, total, |i, finished, loss| {
                    let slice = slices.next().expect("a slice per bucket");
                    slice.iter_mut().zip(finished.iter()).for_each(|(r, g)| *r += g * share);
                    send_bucket(&mut deliver, loss_alone, i, slice, loss * share)
                })
            }
        }
        .map(|_| ())
    }

    /// ZeRO stage 2: runs the backward pass like [`Exchange::run`], but each finished
    /// bucket of `grads` goes to the communication thread (or, without `overlap`, is
    /// exchanged between the backward steps), which scales it by `share`,
    /// reduce-scatters it and adds this rank's chunk of the sum into `shard` (see
    /// [`zero::scatter_add`]). Nothing full-size is reduced or kept besides the
    /// model's own gradient buffer. Returns the micro-batch's mean loss.
    pub fn scatter(
        &self,
        model: &mut dyn Model,
        grads: &mut [f32],
        shards: &Shards,
        shard: &mut [f32],
        share: f32,
        backward: Backward<'_>,
    ) -> Result<f32> {
        let total = grads.len();
        let mut outs = shards.split_shard(shard).into_iter();
        let (loss, _) = self.pipelined(
            |deliver| {
                self.drive(model, backward, grads, total, |_, bucket, _| {
                    let out = outs.next().expect("a chunk of the shard per bucket");
                    deliver((bucket, out))
                })
            },
            self.scatter_work(share),
        )?;
        Ok(loss)
    }

    /// ZeRO stage 2's work on one finished bucket, for [`Exchange::pipelined`]: the
    /// bucket scaled by `share`, reduce-scattered, and this rank's chunk of the sum added
    /// into its chunk of the shard ([`zero::scatter_add`]).
    fn scatter_work<B: AsMut<[f32]>>(
        &self,
        share: f32,
    ) -> impl FnMut((B, &mut [f32])) -> Result<f64> + Send + use<'_, B> {
        let (comm, wire, timeout) = (self.comm, self.wire, self.timeout);
        let mut scratch = Vec::new();
        move |(mut bucket, out)| {
            let deadline = Deadline::after(timeout);
            zero::scatter_add(comm, bucket.as_mut(), share, out, wire, deadline, &mut scratch).map(|()| 0.0)
        }
    }

    /// ZeRO stage 2 for a model that writes each backward step into a window
    /// ([`Model::backward_next_into`], at most `step` values a step): as
    /// [`Exchange::scatter`], but no full-size gradient buffer is held. The steps are
    /// written into `held`, which holds the final values of the bucket being filled and
    /// room for one more step (the largest bucket plus `step` values, see
    /// [`Exchange::window_sizes`]), and each finished bucket is copied out of it to be
    /// scattered.
    /// Returns the micro-batch's mean loss.
    pub fn scatter_windowed(
        &self,
        model: &mut dyn Model,
        held: &mut [f32],
        shards: &Shards,
        shard: &mut [f32],
        share: f32,
        batch: &sheaf_core::Batch<'_>,
    ) -> Result<f32> {
        let total = self.buckets.first().map_or(0, |b| b.end);
        let mut outs = shards.split_shard(shard).into_iter();
        let (loss, _) = self.pipelined(
            |deliver| {
                let loss = model.backward_begin(batch)?;
                let cap = held.len();
                // `held[i]` is gradient value `top - cap + i`; values `[pending, top)` are
                // final and not handed out yet (part of bucket `sent`).
                let (mut top, mut pending, mut sent) = (total, total, 0);
                while pending > 0 {
                    let room = cap - (top - pending);
                    let window = &mut held[pending + cap - top - room.min(pending)..pending + cap - top];
                    let floor = pending - window.len();
                    let left = model.backward_next_into(window, pending)?;
                    if left >= pending || left < floor {
                        return Err(Error::BadState(format!(
                            "the model's backward step into a window of {} values ending at {pending} left {left} pending",
                            pending - floor
                        )));
                    }
                    pending = left;
                    while sent < self.buckets.len() && self.buckets[sent].start >= pending {
                        let b = &self.buckets[sent];
                        let bucket = held[b.start + cap - top..].to_vec();
                        // What is final below the bucket moves up to the top of `held`.
                        held.copy_within(pending + cap - top..b.start + cap - top, cap - (b.start - pending));
                        top = b.start;
                        if !deliver((bucket, outs.next().expect("a chunk of the shard per bucket"))) {
                            return Ok(loss);
                        }
                        sent += 1;
                    }
                }
                Ok(loss)
            },
            self.scatter_work::<Vec<f32>>(share),
        )?;
        Ok(loss)
    }

    /// Runs `model`'s backward pass, whose gradients go into the first `total` values of
    /// `buf`, and hands each bucket's slice of `buf` to `ready` (with the pass's loss)
    /// as soon as the pass has finished it, the buckets in order; the first bucket's
    /// slice runs to the end of `buf` (past `total`: a loss slot). `ready` returning
    /// false stops handing out. Returns the loss.
    fn drive<'g>(
        &self,
        model: &mut dyn Model,
        backward: Backward<'_>,
        buf: &'g mut [f32],
        total: usize,
        mut ready: impl FnMut(usize, &'g mut [f32], f32) -> bool,
    ) -> Result<f32> {
        // `rest` is the front of `buf` not yet handed out: it ends where the last bucket
        // handed out starts, and always covers what is still pending.
        let mut rest: &'g mut [f32] = buf;
        let mut pending = total;
        let loss = match backward {
            Backward::Stepped(batch) => model.backward_begin(batch)?,
            Backward::Whole(batch) => {
                pending = 0;
                model.forward_backward(batch, &mut rest[..total])?
            }
        };
        let mut sent = 0;
        loop {
            if pending > 0 {
                pending = backward_step(model, &mut rest[..pending])?;
            }
            while sent < self.buckets.len() && self.buckets[sent].start >= pending {
                let (front, bucket) = std::mem::take(&mut rest).split_at_mut(self.buckets[sent].start);
                rest = front;
                if !ready(sent, bucket, loss) {
                    return Ok(loss);
                }
                sent += 1;
            }
            if pending == 0 {
                return Ok(loss);
            }
        }
    }
}

/// Hands a finished bucket of the step's sums to `deliver`, the micro-batch's share of
/// the loss added to the first bucket: into the slot at its end on an f32 wire, or into
/// the slot that travels alone after it (`loss_alone`, taken). False when `deliver`
/// refuses (the reducer stopped: its error is the one to report).
fn send_bucket<'b>(
    deliver: &mut impl FnMut(usize, &'b mut [f32], Option<&'b mut [f32]>) -> bool,
    loss_alone: &mut Option<&'b mut [f32]>,
    i: usize,
    slice: &'b mut [f32],
    loss: f32,
) -> bool {
    let mut alone = None;
    if i == 0 {
        match loss_alone.take() {
            Some(slot) => {
                slot[0] += loss;
                alone = Some(slot);
            }
            None => {
                if let Some(last) = slice.last_mut() {
                    *last += loss;
                }
            }
        }
    }
    deliver(i, slice, alone)
}

/// One step of `model`'s stepped backward pass over `pending`, the front of the
/// gradient buffer not final yet; returns how much of it still is. A step that
/// finishes nothing is an error rather than a loop without end.
fn backward_step(model: &mut dyn Model, pending: &mut [f32]) -> Result<usize> {
    let before = pending.len();
    let left = model.backward_next(pending)?;
    if left >= before {
        return Err(Error::BadState(format!(
            "the model's backward step finished nothing ({before} values pending)"
        )));
    }
    Ok(left)
}

/// How the last micro-batch's backward pass runs.
pub enum Backward<'b> {
    /// Layer by layer, through `backward_begin`/`backward_next`.
    Stepped(&'b sheaf_core::Batch<'b>),
    /// All at once, through `forward_backward`.
    Whole(&'b sheaf_core::Batch<'b>),
}

/// Allreduces one bucket, in f32 or through bfloat16.
fn reduce(comm: &dyn Communicator, bucket: &mut [f32], wire: GradDType, deadline: Deadline) -> Result<()> {
    match wire {
        GradDType::F32 => {
            comm.allreduce(bytemuck::cast_slice_mut(bucket), DType::F32, ReduceOp::Sum, deadline)?
        }
        GradDType::Bf16 => {
            let mut wire = narrow(bucket);
            comm.allreduce(bytemuck::cast_slice_mut(&mut wire), DType::BF16, ReduceOp::Sum, deadline)?;
            widen(bucket, &wire);
        }
    }
    Ok(())
}

/// [`Exchange::window_sizes`] of `total` gradient values in `count` buckets of at most
/// `largest`, for backward steps of at most `step` values, buckets exchanged on a
/// communication thread or not (`threaded`): what the plan counts before any model
/// exists.
pub fn window_sizes(
    total: usize,
    largest: usize,
    count: usize,
    step: usize,
    threaded: bool,
) -> (usize, usize) {
    let copies = if threaded { 3 } else { 1 };
    ((largest + step).min(total), copies.min(count) * largest)
}

#[cfg(test)]
mod tests {
    use super::buckets;

    use sheaf_testkit::flat_layout as layout;

    proptest::proptest! {
        /// Buckets tile the buffer from its end to its start at parameter boundaries,
        /// each closed as soon as it reaches its size (the first at most 1 MiB).
        #[test]
        fn buckets_tile_the_buffer_backwards(
            sizes in proptest::collection::vec(1usize..400_000, 1..12),
            mb in 1usize..4,
        ) {
            let l = layout(&sizes);
            let b = buckets(&l, mb << 20);
            proptest::prop_assert_eq!(b.first().map(|r| r.end), Some(l.total()));
            proptest::prop_assert_eq!(b.last().map(|r| r.start), Some(0));
            for w in b.windows(2) {
                proptest::prop_assert_eq!(w[0].start, w[1].end);
            }
            let starts: Vec<usize> = (0..sizes.len()).map(|p| l.range(p).start).collect();
            for (i, r) in b.iter().enumerate() {
                proptest::prop_assert!(starts.contains(&r.start));
                let cap = if i == 0 { (1usize << 20).min(mb << 20) } else { mb << 20 };
                // Closed at the first parameter boundary at or past the cap: less
                // its first (lowest) parameter, it was still under the cap.
                let first = starts.iter().position(|&s| s == r.start).unwrap();
                let without_first = r.end - l.range(first).end;
                proptest::prop_assert!(without_first * 4 < cap || r.start == 0, "{r:?} {cap}");
            }
        }
    }
}
