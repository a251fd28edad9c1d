//! A world of replicas x model-parallel ranks, split into its groups.

use sheaf_core::{Communicator, Deadline, Error, Model, Result};

/// A world of `replicas x width` ranks seen by a model-parallel strategy: rank
/// `d * width + m` is model rank `m` (a stage or a tensor slice) of replica `d`.
pub struct Mesh {
    pub replica: usize,
    pub model_rank: usize,
    /// The ranks of this replica, ordered by model rank.
    pub model: Box<dyn Communicator>,
    /// The ranks holding the same piece, one per replica, ordered by replica.
    pub replicas: Box<dyn Communicator>,
}

impl Mesh {
    /// Splits `comm`; `what` names the layout in the error when the sizes do not fit.
    pub fn split(
        comm: &dyn Communicator,
        replicas: usize,
        width: usize,
        what: &str,
        dl: Deadline,
    ) -> Result<Mesh> {
        let world = comm.world_size();
        if replicas * width != world {
            return Err(Error::config(
                "parallel",
                format!("{replicas} replicas of {width} {what} need {} ranks, not {world}", replicas * width),
            ));
        }
        let (replica, model_rank) = (comm.rank() / width, comm.rank() % width);
        let model = comm
            .split(Some(replica as u32), model_rank as u32, dl)?
            .ok_or_else(|| Error::BadState("no model-parallel group".into()))?;
        let peers = comm
            .split(Some(model_rank as u32), replica as u32, dl)?
            .ok_or_else(|| Error::BadState("no data-parallel group".into()))?;
        Ok(Mesh { replica, model_rank, model, replicas: peers })
    }

    /// Makes every replica start from replica 0's parameters; returns the hold on them.
    pub fn sync_replicas(&self, model: &mut dyn Model, dl: Deadline) -> Result<crate::ModelParams> {
        crate::ModelParams::synced(model, self.replicas.as_ref(), dl)
    }
}
