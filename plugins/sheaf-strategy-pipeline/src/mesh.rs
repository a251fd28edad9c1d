//! The ranks' groups: a `D x P x T` mesh's pipelines, tensor groups and replicas, and
//! the stages sharing a tied parameter.

use sheaf_core::{Communicator, DType, Deadline, Error, ReduceOp, Result};

/// `D x P x T` ranks split three ways: rank `(d * P + p) * T + t` is slice `t` of
/// stage `p` of pipeline `d`.
pub(crate) struct Mesh3 {
    pub(crate) replica: usize,
    pub(crate) stage: usize,
    pub(crate) slice: usize,
    /// Same pipeline and slice, by stage.
    pub(crate) pipe: Box<dyn Communicator>,
    /// Same pipeline and stage, by slice.
    pub(crate) tensor: Box<dyn Communicator>,
    /// Same stage and slice, by pipeline.
    pub(crate) replicas: Box<dyn Communicator>,
}

impl Mesh3 {
    pub(crate) fn split(
        comm: &dyn Communicator,
        data: usize,
        stages: usize,
        width: usize,
        dl: Deadline,
    ) -> Result<Mesh3> {
        let world = comm.world_size();
        if data * stages * width != world {
            return Err(Error::config(
                "parallel.options.pipeline",
                format!("{data} x {stages} x {width} ranks do not make a world of {world}"),
            ));
        }
        let r = comm.rank();
        let (replica, stage, slice) = (r / (stages * width), r / width % stages, r % width);
        let group = |color: usize, key: usize| -> Result<Box<dyn Communicator>> {
            comm.split(Some(color as u32), key as u32, dl)?.ok_or_else(|| Error::BadState("no group".into()))
        };
        let pipe = group(replica * width + slice, stage)?;
        // Stages receive each neighbour's activations and gradients in the order they
        // were sent, so stages that disagree on the schedule fail at once, by name.
        pipe.order_point_to_point()?;
        let tensor = group(replica * stages + stage, slice)?;
        let replicas = group(stage * width + slice, replica)?;
        Ok(Mesh3 { replica, stage, slice, pipe, tensor, replicas })
    }
}

/// Parameters held by several stages (a tied embedding): their gradients are summed
/// over the stages holding them, every step, so the copies stay equal.
pub(crate) struct Ties {
    pub(crate) group: Option<Box<dyn Communicator>>,
    pub(crate) ranges: Vec<std::ops::Range<usize>>,
}

impl Ties {
    pub(crate) fn new(
        pipe: &dyn Communicator,
        tied: Vec<(usize, usize)>,
        layout: &sheaf_core::ParamLayout,
        dl: Deadline,
    ) -> Result<Ties> {
        // Every stage holding a tied parameter must hold the same ones: their whole-model
        // indices summed, and counted, agree across the group (checked below).
        let color = (!tied.is_empty()).then_some(0);
        let group = pipe.split(color, pipe.rank() as u32, dl)?;
        if let Some(g) = &group {
            let mine = [tied.len() as f64, tied.iter().map(|t| t.1 as f64).sum::<f64>()];
            let (mut max, mut min) = (mine, mine);
            g.allreduce(bytemuck::cast_slice_mut(&mut max), DType::F64, ReduceOp::Max, dl)?;
            g.allreduce(bytemuck::cast_slice_mut(&mut min), DType::F64, ReduceOp::Min, dl)?;
            if max != mine || min != mine {
                return Err(Error::BadState(format!(
                    "stage {} holds tied parameters {tied:?}, other stages hold others",
                    pipe.rank()
                )));
            }
        }
        let mut tied = tied;
        tied.sort_by_key(|t| t.1);
        let ranges = tied.iter().map(|&(i, _)| layout.range(i)).collect();
        Ok(Ties { group, ranges })
    }

    pub(crate) fn sum(&self, grads: &mut [f32], dl: Deadline) -> Result<()> {
        if let Some(g) = &self.group {
            if g.world_size() > 1 {
                for r in &self.ranges {
                    g.allreduce(
                        bytemuck::cast_slice_mut(&mut grads[r.clone()]),
                        DType::F32,
                        ReduceOp::Sum,
                        dl,
                    )?;
                }
            }
        }
        Ok(())
    }
}
