//! Model pieces: the part of a model one rank holds under model parallelism.
//!
//! A [`Piece`] is a contiguous range of the model's blocks (a pipeline stage), each
//! held whole or as one slice of a tensor-parallel group. What a block is, and how its
//! parameters slice, is the compute backend's business
//! ([`crate::ComputeBackend::piece_layout`]); a piece's parameters keep the whole
//! model's names, so pieces gather into (and slice out of) the same flat buffer and
//! checkpoint as one process holds.

use std::ops::Range;

use crate::{Error, Result};

/// The part of a model one rank holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The blocks held (indices into [`crate::ModelInfo::blocks`]).
    pub blocks: Range<usize>,
    /// This rank's place in its tensor-parallel group, and the group's size (1: whole
    /// blocks).
    pub tensor_rank: usize,
    pub tensor_width: usize,
}

impl Piece {
    /// The whole model of `blocks` blocks.
    pub fn whole(blocks: usize) -> Piece {
        Piece { blocks: 0..blocks, tensor_rank: 0, tensor_width: 1 }
    }

    /// Checks the piece against a model of `blocks` blocks: blocks in range and
    /// non-empty, a tensor rank inside its group.
    pub fn validate(&self, blocks: usize) -> Result<()> {
        if self.blocks.is_empty() || self.blocks.end > blocks {
            return Err(Error::invalid(format!(
                "piece blocks {:?} outside a model of {blocks} blocks",
                self.blocks
            )));
        }
        if self.tensor_width == 0 || self.tensor_rank >= self.tensor_width {
            return Err(Error::invalid(format!(
                "tensor rank {} outside a group of {}",
                self.tensor_rank, self.tensor_width
            )));
        }
        Ok(())
    }
}
