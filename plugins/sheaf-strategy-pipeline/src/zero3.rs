//! ZeRO stage 3 inside each pipeline stage: the `D` ranks holding the same stage in
//! different pipelines shard its parameters by rows.
//!
//! Each rank's model is a row shard of its stage ([`sheaf_core::ComputeBackend::build_piece_shard`]),
//! run one unit (one of the stage's blocks) a segment. Just before a unit's forward
//! pass, and again before its backward pass, every replica's rows of the unit are
//! allgathered into the piece's buffer ([`Model::piece_params_mut`]), which goes back to
//! the kernel as soon as the unit has run (FSDP2's `reshard_after_forward`); as a
//! unit's backward pass ends, its gradient is reduce-scattered out of the piece's
//! gradient buffer into this replica's rows of the summed gradient, and that buffer
//! goes back too. A micro-batch in flight keeps only its activations: a rank holds its
//! rows of the stage's parameters, gradients and optimizer state, and one unit
//! gathered. The optimizer steps those rows in place in the model's shard.
//!
//! With `reshard_after_forward = false` a unit gathered once stays in the piece's
//! buffer until the step's optimizer changes the rows (FSDP2's option of that name,
//! which torchtitan takes under pipelines): one gather a unit a step instead of two a
//! micro-batch, for the stage's parameters held whole during the step.

use std::ops::Range;

use sheaf_core::{Communicator, DType, Deadline, Error, Model, ParamLayout, ReduceOp, Result};
use sheaf_train::{rows_by_rank, zero_release_part, SegmentParams};

/// The geometry of a stage's units over its replicas, and this replica's summed rows.
pub struct StageShards<'c> {
    replicas: &'c dyn Communicator,
    deadline: &'c dyn Fn() -> Deadline,
    /// The shard's layout (the model's).
    pub layout: ParamLayout,
    /// Each parameter's place in the whole piece's buffers.
    piece: Vec<Range<usize>>,
    /// Each parameter's values per row.
    row_len: Vec<usize>,
    /// Each parameter's rows held by each replica: `rows[p][q]`.
    rows: Vec<Vec<Range<usize>>>,
    /// Per unit, its parameters, the most values of it any replica holds, and its
    /// places in the piece's buffers merged into contiguous spans (released whole, so
    /// that only the pages a span shares with its neighbours stay resident).
    units: Vec<Vec<usize>>,
    pad: Vec<usize>,
    spans: Vec<Vec<Range<usize>>>,
    /// This replica's rows of the gradient summed over the replicas and the step's
    /// micro-batches, laid out as `layout`.
    pub grads: Vec<f32>,
    wire: Vec<f32>,
    /// Whether a gathered unit stays until the rows change, and which are gathered.
    keep: bool,
    gathered: Vec<bool>,
}

impl<'c> StageShards<'c> {
    /// The units of `model` (a piece shard) over `replicas`: every replica's row counts
    /// are gathered once, so each knows where every replica's rows go.
    pub fn new(
        model: &mut dyn Model,
        replicas: &'c dyn Communicator,
        deadline: &'c dyn Fn() -> Deadline,
        reshard_after_forward: bool,
    ) -> Result<StageShards<'c>> {
        let count = replicas.world_size();
        let layout = model.layout().clone();
        let units = model.units();
        let piece_len = model.piece_params_mut()?.map(|b| b.len());
        let (Some(piece_len), false) = (piece_len, units.is_empty()) else {
            return Err(Error::Unsupported(
                "parallel.options.pipeline.zero = 3 needs a model piece that runs unit by unit on \
                 gathered parameters; this one does not (its compute plugin builds no piece shards)"
                    .into(),
            ));
        };
        if units.len() != model.segments() || units.iter().flatten().any(|&p| p >= layout.specs().len()) {
            return Err(Error::BadState(format!(
                "the piece shard lists {} units of {} parameters for {} segments",
                units.len(),
                layout.specs().len(),
                model.segments()
            )));
        }
        let rows = rows_by_rank(&layout, replicas, deadline())?;
        let (mut piece, mut row_len) = (Vec::new(), Vec::new());
        let mut at = 0;
        for (s, held) in layout.specs().iter().zip(&rows) {
            let per_row = s.shape.iter().skip(1).product::<usize>();
            let all_rows = held.last().map_or(0, |r| r.end);
            piece.push(at..at + all_rows * per_row);
            at += all_rows * per_row;
            row_len.push(per_row);
        }
        if at != piece_len {
            return Err(Error::BadState(format!(
                "the replicas' rows make a piece of {at} values, but the model's piece buffer holds {piece_len}"
            )));
        }
        let pad = units
            .iter()
            .map(|u| {
                (0..count).map(|q| u.iter().map(|&p| rows[p][q].len() * row_len[p]).sum()).max().unwrap_or(0)
            })
            .collect();
        let spans: Vec<Vec<Range<usize>>> = units
            .iter()
            .map(|u| {
                let mut places: Vec<Range<usize>> = u.iter().map(|&p| piece[p].clone()).collect();
                places.sort_by_key(|r| r.start);
                let mut merged: Vec<Range<usize>> = Vec::new();
                for r in places {
                    match merged.last_mut() {
                        Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                        _ => merged.push(r),
                    }
                }
                merged
            })
            .collect();
        let grads = vec![0f32; layout.total()];
        Ok(StageShards {
            replicas,
            deadline,
            layout,
            piece,
            row_len,
            rows,
            units,
            pad,
            gathered: vec![false; spans.len()],
            spans,
            grads,
            wire: Vec::new(),
            keep: !reshard_after_forward,
        })
    }

    /// Replica `q`'s values of parameter `p`, in the piece's buffers.
    fn part(&self, p: usize, q: usize) -> Range<usize> {
        let (rows, len, at) = (&self.rows[p][q], self.row_len[p], self.piece[p].start);
        at + rows.start * len..at + rows.end * len
    }

    /// The wire for unit `u`, zeroed: every replica's part of it (each padded to the
    /// longest) and, after them, this replica's own.
    fn take_wire(&mut self, u: usize) -> Vec<f32> {
        let mut wire = std::mem::take(&mut self.wire);
        wire.clear();
        wire.resize(self.pad[u] * (self.replicas.world_size() + 1), 0.0);
        wire
    }

    /// Where replica `q`'s rows of unit `u` lie: in the piece's buffers, and in its part
    /// of the wire.
    fn parts(&self, u: usize, q: usize) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + '_ {
        let mut at = q * self.pad[u];
        self.units[u].iter().map(move |&p| {
            let part = self.part(p, q);
            at += part.len();
            (part.clone(), at - part.len()..at)
        })
    }

    /// Unit `u` gathered whole into the model's piece buffer from every replica's rows.
    fn gather(&mut self, model: &mut dyn Model, u: usize) -> Result<()> {
        let (count, dl) = (self.replicas.world_size(), (self.deadline)());
        let mut wire = self.take_wire(u);
        let (all, mine) = wire.split_at_mut(self.pad[u] * count);
        let shard = lent(model.params_mut()?, "its shard")?;
        for (held, sent) in own(&self.layout, &self.units[u]) {
            mine[sent].copy_from_slice(&shard[held]);
        }
        self.replicas.allgather(bytemuck::cast_slice(mine), bytemuck::cast_slice_mut(all), dl)?;
        let piece = lent(model.piece_params_mut()?, "its piece's parameters")?;
        for q in 0..count {
            for (place, got) in self.parts(u, q) {
                piece[place].copy_from_slice(&all[got]);
            }
        }
        self.wire = wire;
        Ok(())
    }

    /// Unit `u`'s gradient reduce-scattered out of the model's piece gradient buffer
    /// and added into this replica's rows of the sum; the buffer's part handed back.
    fn reduce_scatter_add(&mut self, model: &mut dyn Model, u: usize) -> Result<()> {
        let (count, dl) = (self.replicas.world_size(), (self.deadline)());
        let mut wire = self.take_wire(u);
        let (all, mine) = wire.split_at_mut(self.pad[u] * count);
        let grads = lent(model.piece_grads_mut()?, "its piece's gradients")?;
        for q in 0..count {
            for (place, sent) in self.parts(u, q) {
                all[sent].copy_from_slice(&grads[place]);
            }
        }
        for span in &self.spans[u] {
            zero_release_part(&mut grads[span.clone()]);
        }
        self.replicas.reduce_scatter(
            bytemuck::cast_slice(all),
            bytemuck::cast_slice_mut(mine),
            DType::F32,
            ReduceOp::Sum,
            dl,
        )?;
        for (held, got) in own(&self.layout, &self.units[u]) {
            self.grads[held].iter_mut().zip(&mine[got]).for_each(|(s, m)| *s += m);
        }
        self.wire = wire;
        Ok(())
    }

    /// The model's piece buffer's part for unit `u` handed back to the kernel.
    fn release(&self, model: &mut dyn Model, u: usize) -> Result<()> {
        let piece = lent(model.piece_params_mut()?, "its piece's parameters")?;
        for span in &self.spans[u] {
            zero_release_part(&mut piece[span.clone()]);
        }
        Ok(())
    }

    /// The values the strategy's own buffers hold at most (the summed rows, the wire).
    pub fn capacity(&self) -> usize {
        self.grads.capacity() + self.wire.capacity()
    }

    /// Starts a step's sums from zero.
    pub fn start_step(&mut self) {
        self.grads.fill(0.0);
    }

    /// Every unit handed back: the rows are about to change (the optimizer's step), or
    /// changed.
    pub fn release_all(&mut self, model: &mut dyn Model) -> Result<()> {
        for u in 0..self.units.len() {
            if std::mem::take(&mut self.gathered[u]) {
                self.release(model, u)?;
            }
        }
        Ok(())
    }
}

impl SegmentParams for StageShards<'_> {
    fn before(&mut self, model: &mut dyn Model, seg: usize, _backward: bool) -> Result<()> {
        if self.gathered[seg] {
            return Ok(());
        }
        self.gathered[seg] = self.keep;
        self.gather(model, seg)
    }

    fn after(&mut self, model: &mut dyn Model, seg: usize, backward: bool) -> Result<()> {
        if backward {
            self.reduce_scatter_add(model, seg)?;
        }
        match self.keep {
            true => Ok(()),
            false => self.release(model, seg),
        }
    }
}

/// Where a replica's own rows of a unit's parameters `unit` lie: in its shard (laid out
/// as `layout`), and in its own part of the wire.
fn own<'a>(
    layout: &'a ParamLayout,
    unit: &'a [usize],
) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + 'a {
    let mut at = 0;
    unit.iter().map(move |&p| {
        let r = layout.range(p);
        at += r.len();
        (r.clone(), at - r.len()..at)
    })
}

fn lent<'m>(buf: Option<&'m mut [f32]>, what: &str) -> Result<&'m mut [f32]> {
    buf.ok_or_else(|| Error::BadState(format!("the piece shard no longer lends {what}")))
}
