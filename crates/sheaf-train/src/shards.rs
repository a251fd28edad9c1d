//! ZeRO's sharding of a flat parameter buffer among `world` replicas, for any strategy
//! that keeps replicas (data-parallel, and the replicas of a pipeline mesh).
//!
//! Each bucket of the buffer is cut in `world` chunks ([`chunk_range`]); replica `r`
//! owns chunk `r` of every bucket. Its shard holds the summed gradient of its chunks
//! (after a reduce-scatter), the optimizer steps those chunks only (so its state is
//! 1/world of the model's), and the updated chunks are allgathered into every
//! replica's full parameters. Elementwise optimizers step each element as an unsharded
//! run would, so the parameters are the same up to the order of the gradient sums.

use std::ops::Range;

use sheaf_core::{
    chunk_range, Communicator, DType, Deadline, Error, Optimizer, Param, ParamLayout, ReduceOp, Result,
};

use crate::{clip_to, norm_contribution, sum_of_squares};

/// What this replica owns of each bucket, and the optimizer's pieces of it.
pub struct Shards {
    world: usize,
    rank: usize,
    buckets: Vec<Range<usize>>,
    pieces: Vec<Piece>,
    len: usize,
}

/// An owned piece of one parameter.
struct Piece {
    /// The name the optimizer keys its state by: `<param>@<first index in the param>`.
    name: String,
    param: usize,
    /// Where it sits in the flat buffer, and where in the shard.
    flat: Range<usize>,
    at: Range<usize>,
}

impl Shards {
    /// Replica `rank` of `world`'s chunks of `buckets` (ranges tiling `layout`'s buffer).
    pub fn new(layout: &ParamLayout, buckets: &[Range<usize>], rank: usize, world: usize) -> Shards {
        let mut pieces = Vec::new();
        let mut len = 0;
        for b in buckets {
            let own = owned(b, world, rank);
            for (p, spec) in layout.specs().iter().enumerate() {
                let r = layout.range(p);
                let (lo, hi) = (r.start.max(own.start), r.end.min(own.end));
                if lo < hi {
                    let name = format!("{}@{}", spec.name, lo - r.start);
                    pieces.push(Piece { name, param: p, flat: lo..hi, at: len..len + hi - lo });
                    len += hi - lo;
                }
            }
        }
        Shards { world, rank, buckets: buckets.to_vec(), pieces, len }
    }

    /// Values this replica owns.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// This replica's chunk of each bucket within `shard`, in bucket order.
    pub fn split_shard<'s>(&self, mut shard: &'s mut [f32]) -> Vec<&'s mut [f32]> {
        self.buckets
            .iter()
            .map(|b| {
                let n = owned(b, self.world, self.rank).len();
                let (mine, rest) = std::mem::take(&mut shard).split_at_mut(n);
                shard = rest;
                mine
            })
            .collect()
    }

    /// Reduce-scatters each bucket of `grads` (the whole buffer, this replica's
    /// values) into `shard` with `each(bucket of grads, this replica's chunk of shard)`,
    /// which runs the collective (over whatever wire the strategy uses).
    pub fn reduce_scatter_with(
        &self,
        grads: &[f32],
        shard: &mut [f32],
        mut each: impl FnMut(&[f32], &mut [f32]) -> Result<()>,
    ) -> Result<()> {
        for (b, out) in self.buckets.iter().zip(self.split_shard(shard)) {
            each(&grads[b.clone()], out)?;
        }
        Ok(())
    }

    /// [`Shards::reduce_scatter_with`] without a shard buffer: each bucket of `buf` (the
    /// whole buffer, this replica's values) reduce-scattered into one chunk of scratch
    /// and moved to its place in the shard, which ends up at the front of `buf`
    /// (`buf[..self.len()]`). A chunk never lands on a bucket not yet reduced, as the
    /// buckets run in increasing order (`new` was given them so; checked): a ZeRO 1
    /// replica holds no shard of the gradients beside their full-size sum.
    pub fn reduce_scatter_in_place(
        &self,
        buf: &mut [f32],
        mut each: impl FnMut(&[f32], &mut [f32]) -> Result<()>,
    ) -> Result<()> {
        if self.buckets.windows(2).any(|w| w[1].start < w[0].end) {
            return Err(sheaf_core::Error::BadState(
                "reduce-scattering into the gradients' own buffer needs buckets in increasing order".into(),
            ));
        }
        let (mut scratch, mut at) = (Vec::new(), 0);
        for b in &self.buckets {
            let n = owned(b, self.world, self.rank).len();
            scratch.clear();
            scratch.resize(n, 0.0);
            each(&buf[b.clone()], &mut scratch)?;
            buf[at..at + n].copy_from_slice(&scratch);
            at += n;
        }
        Ok(())
    }

    /// The sum of squares of `shard`'s values, leaving out the parameters `skip` names
    /// (as [`crate::norm_contribution`] does for a whole buffer).
    pub fn norm_contribution(&self, shard: &[f32], skip: impl Fn(usize) -> bool) -> f64 {
        self.pieces.iter().filter(|p| !skip(p.param)).map(|p| sum_of_squares(&shard[p.at.clone()])).sum()
    }

    /// One optimizer step on this replica's chunks of `params`, with `shard`'s
    /// gradients.
    pub fn step(&self, optimizer: &mut dyn Optimizer, params: &mut [f32], shard: &[f32]) -> Result<()> {
        // Pieces lie in increasing flat order within a bucket and buckets may run from
        // the end of the buffer down, so sort the views by flat position to split them.
        let mut order: Vec<usize> = (0..self.pieces.len()).collect();
        order.sort_by_key(|&i| self.pieces[i].flat.start);
        let mut views: Vec<Option<Param<'_>>> = (0..self.pieces.len()).map(|_| None).collect();
        let mut rest = params;
        let mut base = 0;
        for i in order {
            let Piece { name, flat, at, .. } = &self.pieces[i];
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(flat.start - base);
            let (value, tail) = tail.split_at_mut(flat.len());
            rest = tail;
            base = flat.end;
            views[i] = Some(Param { name, value, grad: &shard[at.clone()] });
        }
        let mut views: Vec<Param<'_>> = views.into_iter().flatten().collect();
        optimizer.step(&mut views)
    }

    /// Every replica's updated chunks into every replica's `params`, bucket by bucket,
    /// over `comm` (the replicas' group).
    pub fn allgather(
        &self,
        comm: &dyn Communicator,
        params: &mut [f32],
        deadline: impl Fn() -> Deadline,
    ) -> Result<()> {
        for b in &self.buckets {
            // Chunks differ by one value at most: each travels padded to the longest.
            let pad = b.len().div_ceil(self.world);
            let mut mine = vec![0f32; pad];
            let own = owned(b, self.world, self.rank);
            mine[..own.len()].copy_from_slice(&params[own]);
            let mut all = vec![0f32; pad * self.world];
            comm.allgather(bytemuck::cast_slice(&mine), bytemuck::cast_slice_mut(&mut all), deadline())?;
            for q in 0..self.world {
                let theirs = chunk_range(b.len(), self.world, q);
                params[b.start + theirs.start..b.start + theirs.end]
                    .copy_from_slice(&all[q * pad..q * pad + theirs.len()]);
            }
        }
        Ok(())
    }
}

/// Checks the ZeRO stage `key` asks of a strategy whose pieces sum their micro-batches'
/// gradients themselves (pipeline stages, tensor slices): 0 or 1. Stage 2 is refused
/// with the reason: such a piece has no second full-size gradient buffer to shard.
pub fn check_piece_zero_stage(key: &str, stage: u8) -> Result<()> {
    match stage {
        0 | 1 => Ok(()),
        2 => Err(Error::config(
            key,
            "ZeRO stage 2 saves nothing here: each piece sums its micro-batches' gradients \
             itself and reduces them once per step, with no second full-size buffer to shard; \
             use zero = 1",
        )),
        n => Err(Error::config(key, format!("no ZeRO stage {n} (0 or 1)"))),
    }
}

/// One optimizer step of a model piece held by several replicas, for strategies that
/// cut the model (pipeline stages, tensor slices) and replicate the pieces.
pub struct ReplicaStep<'a> {
    /// The ranks holding the same piece, one per replica.
    pub replicas: &'a dyn Communicator,
    /// The groups holding the other pieces of one copy of the model (a pipeline, a
    /// tensor-parallel group): the norm's squares are summed over each.
    pub model_groups: &'a [&'a dyn Communicator],
    /// Clip the whole model's gradient to this norm.
    pub clip: Option<f64>,
    pub deadline: &'a dyn Fn() -> Deadline,
}

impl ReplicaStep<'_> {
    /// Sums `grads` (this rank's gradients of its piece) over the replicas, or, with
    /// `sharded` (ZeRO 1: the replicas' [`Shards`] and this replica's shard buffer),
    /// reduce-scatters them into this replica's chunk; clips by the whole model's norm
    /// (the parameters `skip` names left out of this piece's squares: a copy another
    /// piece counts); steps `optimizer` on `params` (its chunk under ZeRO, then
    /// allgathered). Returns the norm before clipping.
    pub fn run(
        &self,
        layout: &ParamLayout,
        grads: &mut [f32],
        sharded: Option<(&Shards, &mut [f32])>,
        skip: impl Fn(usize) -> bool,
        optimizer: &mut dyn Optimizer,
        params: &mut [f32],
    ) -> Result<f64> {
        let (replicas, dl) = (self.replicas, self.deadline);
        // The squares of this piece summed over the other pieces of the model.
        let over_model = |mut squares: [f64; 1]| -> Result<f64> {
            for group in self.model_groups.iter().filter(|g| g.world_size() > 1) {
                group.allreduce(bytemuck::cast_slice_mut(&mut squares), DType::F64, ReduceOp::Sum, dl())?;
            }
            Ok(squares[0])
        };
        match sharded {
            None => {
                if replicas.world_size() > 1 {
                    replicas.allreduce(bytemuck::cast_slice_mut(grads), DType::F32, ReduceOp::Sum, dl())?;
                }
                let squares = over_model([norm_contribution(layout, grads, &skip)])?;
                let norm = clip_to(grads, squares, self.clip);
                optimizer.step(&mut layout.params(params, grads))?;
                Ok(norm)
            }
            Some((shards, shard)) => {
                shards.reduce_scatter_with(grads, shard, |input, out| {
                    replicas.reduce_scatter(
                        bytemuck::cast_slice(input),
                        bytemuck::cast_slice_mut(out),
                        DType::F32,
                        ReduceOp::Sum,
                        dl(),
                    )?;
                    Ok(())
                })?;
                let mut squares = [shards.norm_contribution(shard, &skip)];
                replicas.allreduce(
                    bytemuck::cast_slice_mut(&mut squares),
                    DType::F64,
                    ReduceOp::Sum,
                    dl(),
                )?;
                let squares = over_model(squares)?;
                let norm = clip_to(shard, squares, self.clip);
                shards.step(optimizer, params, shard)?;
                shards.allgather(replicas, params, dl)?;
                Ok(norm)
            }
        }
    }
}

impl ReplicaStep<'_> {
    /// The step of a replica holding its rows of its piece's parameters (ZeRO stage 3):
    /// `grads`, its rows of the gradient already summed over the replicas, clipped by
    /// the whole model's norm (its squares summed over the replicas, whose rows are
    /// disjoint, and over the model's groups; `skip` as for [`ReplicaStep::run`]), and
    /// `optimizer` stepped on `params`, its rows. Returns the norm before clipping.
    pub fn run_rows(
        &self,
        layout: &ParamLayout,
        grads: &mut [f32],
        skip: impl Fn(usize) -> bool,
        optimizer: &mut dyn Optimizer,
        params: &mut [f32],
    ) -> Result<f64> {
        let dl = self.deadline;
        let mut squares = [norm_contribution(layout, grads, &skip)];
        for group in std::iter::once(&self.replicas).chain(self.model_groups).filter(|g| g.world_size() > 1) {
            group.allreduce(bytemuck::cast_slice_mut(&mut squares), DType::F64, ReduceOp::Sum, dl())?;
        }
        let norm = clip_to(grads, squares[0], self.clip);
        optimizer.step(&mut layout.params(params, grads))?;
        Ok(norm)
    }
}

/// Where every rank's rows of each parameter lie when ranks each hold a row shard of
/// the same parameters (ZeRO stage 3), from `layout` (this rank's shard): every rank's
/// row counts are gathered once over `comm`, and `rows[p][q]` is rank `q`'s rows of
/// parameter `p` in the parameter whole (the ranks' rows one after another, in rank
/// order, as [`sheaf_core::PieceLayout::row_shard`] cuts them).
pub fn rows_by_rank(
    layout: &ParamLayout,
    comm: &dyn Communicator,
    deadline: Deadline,
) -> Result<Vec<Vec<Range<usize>>>> {
    let world = comm.world_size();
    let mine: Vec<u64> =
        layout.specs().iter().map(|s| s.shape.first().copied().unwrap_or(1) as u64).collect();
    let mut all = vec![0u64; mine.len() * world];
    comm.allgather(bytemuck::cast_slice(&mine), bytemuck::cast_slice_mut(&mut all), deadline)?;
    Ok((0..mine.len())
        .map(|p| {
            let mut start = 0;
            (0..world)
                .map(|q| {
                    let n = all[q * mine.len() + p] as usize;
                    start += n;
                    start - n..start
                })
                .collect()
        })
        .collect())
}

/// Replica `rank`'s chunk of bucket `b`, in the flat buffer.
fn owned(b: &Range<usize>, world: usize, rank: usize) -> Range<usize> {
    let own = chunk_range(b.len(), world, rank);
    b.start + own.start..b.start + own.end
}

#[cfg(test)]
mod tests {
    use super::*;
    use sheaf_testkit::flat_layout as layout_of;

    /// The shards of every replica tile the buffer once, each piece inside one
    /// parameter; the norm over the pieces is the buffer's.
    #[test]
    fn shards_tile_the_buffer_once() {
        let layout = layout_of(&[5, 3, 8]);
        let grads: Vec<f32> = (0..16).map(|i| i as f32).collect();
        for buckets in [std::iter::once(0..16).collect(), vec![8..16, 0..8], vec![13..16, 5..13, 0..5]] {
            for world in 1..=5 {
                let mut seen = vec![0; 16];
                let mut norm = 0.0;
                for rank in 0..world {
                    let s = Shards::new(&layout, &buckets, rank, world);
                    let mut shard = vec![0f32; s.len()];
                    s.reduce_scatter_with(&grads, &mut shard, |g, out| {
                        let own = chunk_range(g.len(), world, rank);
                        out.copy_from_slice(&g[own]);
                        Ok(())
                    })
                    .unwrap();
                    for p in &s.pieces {
                        assert!(
                            layout.range(p.param).start <= p.flat.start
                                && p.flat.end <= layout.range(p.param).end
                        );
                        assert_eq!(&shard[p.at.clone()], &grads[p.flat.clone()]);
                        p.flat.clone().for_each(|i| seen[i] += 1);
                    }
                    norm += s.norm_contribution(&shard, |p| p == 1);
                }
                assert_eq!(seen, vec![1; 16], "{buckets:?} over {world}");
                let want: f64 = grads
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !(5..8).contains(i))
                    .map(|(_, &g)| f64::from(g * g))
                    .sum();
                assert_eq!(norm, want);
            }
        }
    }

    /// Reduce-scattered in place, the front of the buffer is the shard a separate
    /// buffer gets (every bucket's chunk, each reduced from the bucket's values before
    /// any chunk overwrote them), for buckets of every size in increasing order over
    /// worlds of 1 to 5; buckets out of order are refused, not silently mixed up.
    #[test]
    fn reduce_scatter_in_place_equals_a_separate_shard() {
        let layout = layout_of(&[7, 2, 11]);
        let grads: Vec<f32> = (0..20).map(|i| (i * i) as f32).collect();
        for buckets in [std::iter::once(0..20).collect(), vec![0..3, 3..20], vec![0..6, 6..7, 7..15, 15..20]]
        {
            for world in 1..=5 {
                for rank in 0..world {
                    let s = Shards::new(&layout, &buckets, rank, world);
                    // A reduction every rank would agree on: this rank's chunk of the
                    // bucket, plus the bucket's first value (read after earlier chunks
                    // landed, so a clobbered bucket shows).
                    let each = |g: &[f32], out: &mut [f32]| {
                        let own = chunk_range(g.len(), world, rank);
                        out.iter_mut().zip(&g[own]).for_each(|(o, v)| *o = v + g[0]);
                        Ok(())
                    };
                    let mut apart = vec![0f32; s.len()];
                    s.reduce_scatter_with(&grads, &mut apart, each).unwrap();
                    let mut buf = grads.clone();
                    s.reduce_scatter_in_place(&mut buf, each).unwrap();
                    assert_eq!(&buf[..s.len()], &apart[..], "{buckets:?}, rank {rank} of {world}");
                }
            }
        }
        let s = Shards::new(&layout, &[10..20, 0..10], 0, 2);
        assert!(s.reduce_scatter_in_place(&mut grads.clone(), |_, _| Ok(())).is_err());
    }

    /// Plain SGD (`p -= lr g`), the optimizer a step's arithmetic is checked with.
    struct Sgd;

    impl Optimizer for Sgd {
        fn step(&mut self, params: &mut [Param<'_>]) -> Result<()> {
            for p in params.iter_mut() {
                p.value.iter_mut().zip(p.grad).for_each(|(v, g)| *v -= 0.5 * g);
            }
            Ok(())
        }
        fn learning_rate(&self) -> f64 {
            0.5
        }
        fn set_learning_rate(&mut self, _: f64) {}
        fn state(&self) -> Result<sheaf_core::OptimState> {
            Ok(sheaf_core::OptimState::default())
        }
        fn load_state(&mut self, _: &sheaf_core::OptimState) -> Result<()> {
            Ok(())
        }
    }

    /// Rank `r`'s gradient: small integers, so every sum is exact in any order.
    fn grads_of(r: usize, total: usize) -> Vec<f32> {
        (0..total).map(|i| ((i * 7 + r * 3) % 5) as f32 - 2.0).collect()
    }

    /// A step of replicas over an in-process world of 1 to 4 ranks equals one process
    /// stepping the summed gradient: its norm (the whole sum's, one copy of a skipped
    /// parameter left out), the clipped update, every replica's parameters; ZeRO 1
    /// (reduce-scattered chunks, each stepped, allgathered) ends where the plain step
    /// ends, on every rank.
    #[test]
    fn replica_steps_equal_one_process_on_the_summed_gradient() {
        let layout = layout_of(&[5, 3, 9]);
        let total = layout.total();
        let skip = |p: usize| p == 1;
        for world in 1..=4 {
            let summed: Vec<f32> =
                (0..total).map(|i| (0..world).map(|r| grads_of(r, total)[i]).sum()).collect();
            let squares: f64 = summed
                .iter()
                .enumerate()
                .filter(|(i, _)| !(5..8).contains(i))
                .map(|(_, &g)| f64::from(g * g))
                .sum();
            for (clip, sharded) in [(None, false), (Some(1.5), false), (None, true), (Some(1.5), true)] {
                // Clipped as one process clips (`clip_to`, tested in `norms`).
                let mut clipped = summed.clone();
                clip_to(&mut clipped, squares, clip);
                let want: Vec<f32> = clipped.iter().map(|g| 1.0 - 0.5 * g).collect();
                let out = sheaf_testkit::run_world(world, |g| {
                    let r = g.rank();
                    let dl = || Deadline::after(std::time::Duration::from_secs(10));
                    let step = ReplicaStep { replicas: &g, model_groups: &[], clip, deadline: &dl };
                    let mut grads = grads_of(r, total);
                    let mut params = vec![1f32; total];
                    let shards = Shards::new(&layout, &[0..9, 9..17], r, world);
                    let mut shard = vec![0f32; shards.len()];
                    let with = sharded.then_some((&shards, &mut shard[..]));
                    let norm = step.run(&layout, &mut grads, with, skip, &mut Sgd, &mut params).unwrap();
                    (norm, params)
                });
                for (r, (norm, params)) in out.iter().enumerate() {
                    let case = format!("world {world}, clip {clip:?}, sharded {sharded}, rank {r}");
                    assert!((norm - squares.sqrt()).abs() < 1e-9, "{case}: norm {norm}");
                    assert_eq!(params, &want, "{case}");
                }
            }
        }
    }

    /// Replicas holding rows (ZeRO 3): each rank's rows of the summed gradient, the
    /// norm over every rank's rows, and each stepping its own rows, equal one process.
    /// The rows every rank holds are found from their counts alone (`rows_by_rank`),
    /// uneven shards included.
    #[test]
    fn row_steps_and_row_places_equal_one_process() {
        let whole = layout_of(&[7, 2, 10]);
        for world in 1..=4 {
            let summed = grads_of(9, whole.total());
            let squares: f64 = summed.iter().map(|&g| f64::from(g * g)).sum();
            let out = sheaf_testkit::run_world(world, |g| {
                let r = g.rank();
                let dl = || Deadline::after(std::time::Duration::from_secs(10));
                let rows = sheaf_core::PieceLayout::row_shard(
                    &whole,
                    sheaf_core::ParamShard { index: r, count: world },
                    0,
                );
                let mine = rows.slice(&whole, &summed);
                let places = rows_by_rank(&rows.layout, &g, dl()).unwrap();
                let step = ReplicaStep { replicas: &g, model_groups: &[], clip: Some(2.0), deadline: &dl };
                let (mut grads, mut params) = (mine.clone(), vec![1f32; mine.len()]);
                let norm = step.run_rows(&rows.layout, &mut grads, |_| false, &mut Sgd, &mut params).unwrap();
                (norm, places, rows, params)
            });
            let mut clipped = summed.clone();
            clip_to(&mut clipped, squares, Some(2.0));
            let mut stepped = vec![f32::NAN; whole.total()];
            for (r, (norm, places, rows, params)) in out.iter().enumerate() {
                assert!((norm - squares.sqrt()).abs() < 1e-9, "world {world}, rank {r}: norm {norm}");
                rows.place(&whole, params, &mut stepped);
                for (p, spec) in whole.specs().iter().enumerate() {
                    let want: Vec<std::ops::Range<usize>> =
                        (0..world).map(|q| chunk_range(spec.shape[0], world, q)).collect();
                    assert_eq!(places[p], want, "world {world}, rank {r}, parameter {p}");
                }
            }
            let want: Vec<f32> = clipped.iter().map(|g| 1.0 - 0.5 * g).collect();
            assert_eq!(stepped, want, "world {world}");
        }
    }

    /// Every replica's chunks, allgathered, give every replica the whole buffer; ZeRO
    /// stages are checked for pieces: 0 and 1 taken, 2 refused saying why, no other.
    #[test]
    fn chunks_allgather_whole_and_piece_stages_are_checked() {
        let layout = layout_of(&[4, 11]);
        for world in 1..=4 {
            let out = sheaf_testkit::run_world(world, |g| {
                let r = g.rank();
                let shards = Shards::new(&layout, &[0..6, 6..15], r, world);
                // Only this rank's chunks hold the right values before.
                let mut params = vec![-1f32; 15];
                for b in [0..6, 6..15] {
                    let own = owned(&b, world, r);
                    params[own.clone()].iter_mut().zip(own).for_each(|(v, i)| *v = i as f32);
                }
                shards
                    .allgather(&g, &mut params, || Deadline::after(std::time::Duration::from_secs(10)))
                    .unwrap();
                params
            });
            for params in out {
                assert_eq!(params, (0..15).map(|i| i as f32).collect::<Vec<_>>(), "world {world}");
            }
        }
        assert!(check_piece_zero_stage("k", 0).is_ok() && check_piece_zero_stage("k", 1).is_ok());
        let e = check_piece_zero_stage("k", 2).unwrap_err().to_string();
        assert!(e.contains("saves nothing") && e.contains('k'), "{e}");
        assert!(check_piece_zero_stage("k", 4).unwrap_err().to_string().contains("no ZeRO stage 4"));
        let whole: Vec<std::ops::Range<usize>> = std::iter::once(0..15).collect();
        assert!(
            Shards::new(&layout, &whole, 3, 4).len() == 3 && !Shards::new(&layout, &whole, 3, 4).is_empty()
        );
        let two: Vec<std::ops::Range<usize>> = std::iter::once(0..2).collect();
        assert!(Shards::new(&layout_of(&[2]), &two, 3, 4).is_empty());
    }

    /// The norm a replica step clips by is the whole model's: 2 pieces (of different
    /// sizes) held by 2 replicas each, every rank's norm the square root of both
    /// pieces' squares of their replica-summed gradients.
    #[test]
    fn replica_steps_count_every_piece_in_the_norm() {
        let sizes = [3usize, 4];
        let summed = |p: usize| -> Vec<f32> {
            (0..sizes[p]).map(|i| grads_of(p, sizes[p])[i] + grads_of(p + 2, sizes[p])[i]).collect()
        };
        let want: f64 = (0..2).flat_map(summed).map(|g| f64::from(g * g)).sum::<f64>().sqrt();
        let norms = sheaf_testkit::run_world(4, |g| {
            let r = g.rank();
            let dl = || Deadline::after(std::time::Duration::from_secs(10));
            let split = |color: usize| g.split(Some(color as u32), r as u32, dl()).unwrap().unwrap();
            let (replicas, pieces) = (split(r % 2), split(2 + r / 2));
            let layout = layout_of(&[sizes[r % 2]]);
            let mut grads = grads_of(r, layout.total());
            let mut params = vec![1f32; layout.total()];
            let step = ReplicaStep {
                replicas: replicas.as_ref(),
                model_groups: &[pieces.as_ref()],
                clip: None,
                deadline: &dl,
            };
            step.run(&layout, &mut grads, None, |_| false, &mut Sgd, &mut params).unwrap()
        });
        for (r, norm) in norms.iter().enumerate() {
            assert!((norm - want).abs() < 1e-9, "rank {r}: {norm}, the model's {want}");
        }
    }
}
