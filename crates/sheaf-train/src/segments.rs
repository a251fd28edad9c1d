//! A model piece's segments (a tensor-parallel slice, a pipeline stage) run forward
//! and backward for one micro-batch, summing the outputs of the slices.

use sheaf_core::{Communicator, DType, Deadline, Model, ReduceOp, Result};

/// What a piece's first segment takes: the samples (the stage holding the model's
/// first block) or the previous stage's output.
pub enum StageInput<'a> {
    Samples(&'a sheaf_core::Samples),
    Values(&'a [f32]),
}

/// Where a piece's segments find their parameters: in place all along ([`Whole`]),
/// or, for a piece shard under ZeRO stage 3 (one unit a segment), gathered into the
/// piece's buffer just before a segment runs and handed back just after, its
/// gradients taken as its backward pass leaves it.
pub trait SegmentParams {
    /// Before segment `seg`'s forward (`backward` false) or backward pass.
    fn before(&mut self, model: &mut dyn Model, seg: usize, backward: bool) -> Result<()>;
    /// After it.
    fn after(&mut self, model: &mut dyn Model, seg: usize, backward: bool) -> Result<()>;
}

/// A piece that holds its parameters whole: nothing to gather.
pub struct Whole;

impl SegmentParams for Whole {
    fn before(&mut self, _: &mut dyn Model, _: usize, _: bool) -> Result<()> {
        Ok(())
    }
    fn after(&mut self, _: &mut dyn Model, _: usize, _: bool) -> Result<()> {
        Ok(())
    }
}

fn sum_over(group: &dyn Communicator, v: &mut [f32], dl: Deadline) -> Result<()> {
    if group.world_size() > 1 {
        group.allreduce(bytemuck::cast_slice_mut(v), DType::F32, ReduceOp::Sum, dl)?;
    }
    Ok(())
}

/// Forward of micro-batch `id` (`rows` samples) through every segment of `model`'s
/// piece: each even segment's partial output summed over the tensor-parallel `group`
/// (Megatron's `g`). A piece of one segment runs once, with no sum. Returns the
/// piece's output, the same on every rank of the group.
pub fn forward_segments(
    group: &dyn Communicator,
    model: &mut dyn Model,
    params: &mut dyn SegmentParams,
    id: u64,
    input: StageInput<'_>,
    rows: usize,
    dl: Deadline,
) -> Result<Vec<f32>> {
    let segments = model.segments();
    params.before(model, 0, false)?;
    let mut act = match input {
        StageInput::Samples(s) => model.stage_forward_batch(id, 0, &s.batch())?,
        StageInput::Values(v) => model.stage_forward(id, 0, v, rows)?,
    };
    params.after(model, 0, false)?;
    for seg in 0..segments {
        if seg > 0 {
            params.before(model, seg, false)?;
            act = model.stage_forward(id, seg, &act, rows)?;
            params.after(model, seg, false)?;
        }
        if seg.is_multiple_of(2) && segments > 1 {
            sum_over(group, &mut act, dl)?;
        }
    }
    Ok(act)
}

/// Backward of micro-batch `id` through every segment from the gradient of the
/// piece's output, summing even segments' partial input gradients over `group`
/// (Megatron's `f`; not the piece's own input's, which every slice holds whole).
/// Returns the gradient of the piece's input.
pub fn backward_segments(
    group: &dyn Communicator,
    model: &mut dyn Model,
    params: &mut dyn SegmentParams,
    id: u64,
    grad: Vec<f32>,
    dl: Deadline,
) -> Result<Vec<f32>> {
    let segments = model.segments();
    let mut grad = grad;
    for seg in (0..segments).rev() {
        params.before(model, seg, true)?;
        grad = model.stage_backward(id, seg, &grad)?;
        params.after(model, seg, true)?;
        if seg.is_multiple_of(2) && seg > 0 && segments > 1 {
            sum_over(group, &mut grad, dl)?;
        }
    }
    Ok(grad)
}
