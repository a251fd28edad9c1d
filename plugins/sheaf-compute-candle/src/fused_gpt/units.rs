//! The fused GPT as a row shard for ZeRO stage 3 ([`sheaf_core::Model::units`]): the
//! model holds its rows of every parameter, and runs a pass unit by unit on the
//! parameters the strategy gathers. The units are the root (the embeddings, the final
//! LayerNorm and an untied head: what both ends of the pass need) and each
//! transformer block.
//!
//! The pass runs in a compact buffer laid out as a one-block GPT's parameters: the
//! root's values around one block's slot, every block's place in [`At`] pointing at
//! that slot. Each block's gathered parameters are copied into it just before its
//! forward or backward, so the same kernels run as in the whole model, on the same
//! values: the same bits.

use std::ops::Range;

use sheaf_core::{Batch, Error, ParamLayout, ParamShard, PieceLayout, Result};

use super::{At, FusedGpt, Grads, Step};
use crate::gpt::{init_piece, GptSpec};
use crate::kernels::on_compute_threads;

/// What a row shard holds beside the compact buffer (`FusedGpt::params`).
pub(super) struct Sharded {
    /// This rank's rows of every parameter (laid out as `FusedGpt::layout` says).
    values: Vec<f32>,
    units: Vec<Vec<usize>>,
    /// The block slot of the compact buffer.
    slot: Range<usize>,
    /// The root's gradients, in the compact layout (the slot unused), written by the
    /// head's step first and the embeddings' last.
    root_grads: Vec<f32>,
    /// Whether the pass under way trains, and the units run so far in it.
    train: bool,
    forward_done: usize,
}

/// Row shard `shard` of the GPT `spec`, its values those of the whole model's
/// initialisation.
pub fn shard(spec: &GptSpec, shard: ParamShard, seed: u64) -> Result<FusedGpt> {
    if shard.count == 0 || shard.index >= shard.count {
        return Err(Error::invalid(format!("parameter shard {} of {}", shard.index, shard.count)));
    }
    let whole = spec.layout();
    let piece = PieceLayout::row_shard(&whole, shard, 0);
    let values = init_piece(spec, &piece, seed);
    let units = units_of(spec, &whole);
    // The compact buffer: a one-block GPT's layout, its block standing for every block.
    let one = GptSpec { n_layer: 1, ..spec.clone() };
    let compact = one.layout();
    let mut at = At::new(&one, &compact);
    let slot = at.block_start(0)..at.ln_f.w.start;
    let block = at.blocks[0].clone();
    at.blocks = vec![block; spec.n_layer];
    let mut model = FusedGpt::new_with(spec, compact.total(), at);
    model.layout = piece.layout;
    model.sharded = Some(Box::new(Sharded {
        values,
        units,
        root_grads: vec![0.0; compact.total()],
        slot,
        train: false,
        forward_done: 0,
    }));
    Ok(model)
}

/// The units of `whole` (the GPT `spec`'s layout): the root first, then each block.
fn units_of(spec: &GptSpec, whole: &ParamLayout) -> Vec<Vec<usize>> {
    let mut units = vec![Vec::new(); spec.n_layer + 1];
    for (i, s) in whole.specs().iter().enumerate() {
        let block = s
            .name
            .strip_prefix("transformer.h.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|l| l.parse::<usize>().ok());
        units[block.map_or(0, |l| l + 1)].push(i);
    }
    units
}

impl Sharded {
    pub(super) fn values(&mut self) -> &mut [f32] {
        &mut self.values
    }

    pub(super) fn values_ref(&self) -> &[f32] {
        &self.values
    }

    pub(super) fn units(&self) -> Vec<Vec<usize>> {
        self.units.clone()
    }
}

/// The error of a whole-model call on a shard.
pub(super) fn whole_only(what: &str) -> Error {
    Error::Unsupported(format!(
        "a row shard of the GPT (ZeRO stage 3) cannot {what}: it runs unit by unit on parameters \
         the data-parallel strategy gathers"
    ))
}

impl FusedGpt {
    fn sharded(&mut self) -> Result<&mut Sharded> {
        self.sharded
            .as_deref_mut()
            .ok_or_else(|| Error::Unsupported("this GPT holds its whole parameters: it runs whole".into()))
    }

    /// Checks `params` against unit `unit`'s gathered size (the root's, or a block's).
    fn check_unit(&mut self, unit: usize, params: usize) -> Result<Range<usize>> {
        let units = self.spec.n_layer + 1;
        let (slot, total) = {
            let s = self.sharded()?;
            (s.slot.clone(), s.root_grads.len())
        };
        let want = if unit == 0 { total - slot.len() } else { slot.len() };
        if unit >= units {
            return Err(Error::invalid(format!("unit {unit} of a GPT of {units} units")));
        }
        if params != want {
            return Err(Error::invalid(format!("{params} values for unit {unit}, which has {want}")));
        }
        Ok(slot)
    }

    pub(super) fn unit_begin_impl(&mut self, batch: &Batch<'_>, train: bool) -> Result<()> {
        self.sharded()?;
        self.load(batch, if train { "trains on" } else { "evaluates" })?;
        let s = self.sharded()?;
        s.train = train;
        s.forward_done = 0;
        Ok(())
    }

    pub(super) fn unit_forward_impl(&mut self, unit: usize, params: &[f32]) -> Result<Option<(f64, usize)>> {
        let slot = self.check_unit(unit, params.len())?;
        let (train, done) = {
            let s = self.sharded()?;
            (s.train, s.forward_done)
        };
        if unit != done {
            return Err(Error::BadState(format!("unit {unit}'s forward asked after {done} units")));
        }
        if unit == 0 {
            let (front, back) = params.split_at(slot.start);
            self.params[..slot.start].copy_from_slice(front);
            self.params[slot.end..].copy_from_slice(back);
        } else {
            self.params[slot].copy_from_slice(params);
        }
        let rows = self.n * self.t;
        let last = unit == self.spec.n_layer;
        let end = on_compute_threads(|| {
            if rows > 0 {
                match unit {
                    0 => self.embed(),
                    u => self.block(u - 1, train),
                }
            }
            (last && rows > 0).then(|| {
                self.head_logits();
                self.loss(train)
            })
        });
        self.sharded()?.forward_done = unit + 1;
        Ok(if last { Some(end.unwrap_or((0.0, 0))) } else { None })
    }

    pub(super) fn unit_backward_impl(
        &mut self,
        unit: usize,
        params: &[f32],
        grads: &mut [f32],
    ) -> Result<()> {
        let units = self.spec.n_layer + 1;
        let (train, done) = {
            let s = self.sharded()?;
            (s.train, s.forward_done)
        };
        if !train || done != units || (unit == 0) != params.is_empty() {
            return Err(Error::BadState(format!(
                "unit {unit}'s backward asked out of order (a training pass with every unit's forward \
                 run, units from the last down, the root's without parameters)"
            )));
        }
        let slot = if unit == 0 {
            let s = self.sharded()?;
            s.slot.clone()
        } else {
            self.check_unit(unit, params.len())?
        };
        let mut root_grads = std::mem::take(&mut self.sharded()?.root_grads);
        let result = on_compute_threads(|| {
            // The head's step runs with the last unit's backward (its gradients wait
            // in the root's); the embeddings' with the root's.
            if unit + 1 == units {
                self.backward_step(Step::Head, &mut Grads { buf: &mut root_grads, base: 0 });
            }
            if unit == 0 {
                self.backward_step(Step::Embeddings, &mut Grads { buf: &mut root_grads, base: 0 });
                let (front, back) = grads.split_at_mut(slot.start);
                if back.len() != root_grads.len() - slot.end {
                    return Err(Error::invalid(format!(
                        "{} gradient slots for the root's {} values",
                        front.len() + back.len(),
                        root_grads.len() - slot.len()
                    )));
                }
                front.copy_from_slice(&root_grads[..slot.start]);
                back.copy_from_slice(&root_grads[slot.end..]);
                return Ok(());
            }
            if grads.len() != slot.len() {
                return Err(Error::invalid(format!(
                    "{} gradient slots for a block of {}",
                    grads.len(),
                    slot.len()
                )));
            }
            self.params[slot.clone()].copy_from_slice(params);
            self.backward_step(Step::Block(unit - 1), &mut Grads { buf: grads, base: slot.start });
            Ok(())
        });
        self.sharded()?.root_grads = root_grads;
        result
    }
}
