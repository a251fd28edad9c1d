//! ZeRO stages 1 and 2: the optimizer state, and with stage 2 the reduced gradients,
//! sharded across the replicas.
//!
//! Each gradient bucket (see `buckets`) is cut in `world` chunks, rank `r` owning chunk
//! `r` of every bucket ([`Shards`], shared with the pipeline's replicas). Stage 1 sums
//! a step's gradients over its micro-batches in a full-size buffer and reduce-scatters
//! it bucket by bucket after the backward pass, into its own front
//! ([`reduce_scatter_in_place`]). Stage 2 holds no
//! full-size reduced gradient: each micro-batch's buckets are reduce-scattered on the
//! communication thread as the backward pass finishes them and summed into this rank's
//! chunks ([`scatter_add`], driven by `Exchange::scatter`). Either way each rank ends
//! with the sum of its chunks only; it clips with the norm summed over all ranks'
//! chunks, steps the optimizer on its chunks (so its optimizer state is 1/world of the
//! model's) and the updated chunks are allgathered into every rank's full parameters.

use half::bf16;
use sheaf_core::{Communicator, DType, Deadline, ReduceOp, Result};
use sheaf_train::Shards;

use crate::buckets::{narrow, widen};
use crate::GradDType;

/// Stage 1's reduce-scatter: each bucket of `grads` (the whole model's, this rank's
/// weighted share) reduce-scattered, this rank's chunks of the sum gathered at the
/// front of `grads` in bucket order (`grads[..shards.len()]` is the shard afterwards;
/// see [`Shards::reduce_scatter_in_place`]).
pub fn reduce_scatter_in_place(
    shards: &Shards,
    comm: &dyn Communicator,
    grads: &mut [f32],
    wire: GradDType,
    deadline: impl Fn() -> Deadline,
) -> Result<()> {
    shards.reduce_scatter_in_place(grads, |input, out| {
        reduce_scatter_bucket(comm, input, out, wire, deadline())
    })
}

/// Stage 2's step for one finished bucket: scales `bucket` (this rank's gradient
/// values of it, overwritten) by `share`, reduce-scatters it and adds the sum of this
/// rank's chunk into `out`. `scratch` is reused from bucket to bucket.
pub fn scatter_add(
    comm: &dyn Communicator,
    bucket: &mut [f32],
    share: f32,
    out: &mut [f32],
    wire: GradDType,
    deadline: Deadline,
    scratch: &mut Vec<f32>,
) -> Result<()> {
    for v in bucket.iter_mut() {
        *v *= share;
    }
    scratch.clear();
    scratch.resize(out.len(), 0.0);
    reduce_scatter_bucket(comm, bucket, scratch, wire, deadline)?;
    for (o, s) in out.iter_mut().zip(scratch.iter()) {
        *o += s;
    }
    Ok(())
}

/// One bucket's reduce-scatter: `out` gets this rank's chunk of the sum of every rank's
/// `input`, over an f32 or a bfloat16 wire.
pub(crate) fn reduce_scatter_bucket(
    comm: &dyn Communicator,
    input: &[f32],
    out: &mut [f32],
    wire: GradDType,
    deadline: Deadline,
) -> Result<()> {
    match wire {
        GradDType::F32 => {
            comm.reduce_scatter(
                bytemuck::cast_slice(input),
                bytemuck::cast_slice_mut(out),
                DType::F32,
                ReduceOp::Sum,
                deadline,
            )?;
            Ok(())
        }
        GradDType::Bf16 => {
            let mut got = vec![bf16::ZERO; out.len()];
            comm.reduce_scatter(
                bytemuck::cast_slice(&narrow(input)),
                bytemuck::cast_slice_mut(&mut got),
                DType::BF16,
                ReduceOp::Sum,
                deadline,
            )?;
            widen(out, &got);
            Ok(())
        }
    }
}
