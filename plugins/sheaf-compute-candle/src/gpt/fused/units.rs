//! The fused GPT as a row shard for ZeRO stage 3 ([`sheaf_core::Model::units`]): the
//! model holds its rows of every parameter, and runs a pass unit by unit on the
//! parameters the strategy gathers. The units are the root (the embeddings, the final
//! LayerNorm and an untied head: what both ends of the pass need) and each
//! transformer block.
//!
//! The model keeps the root in a buffer laid out as a GPT of no blocks (the root's
//! parameters in the whole model's order), and runs each block on the gathered
//! parameters it is lent, every block's place in [`At`] being a block's places in its
//! own buffer: the same kernels as the whole model's on the same values, so the same
//! bits, and no copy of a block.

use sheaf_core::{Batch, Error, ParamLayout, ParamShard, PieceLayout, Result};

use super::{At, FusedGpt, Grads, Step};
use crate::cpu::kernels::on_compute_threads;
use crate::gpt::{init_piece, GptSpec};

/// What a row shard holds beside the root's parameters (`FusedGpt::params`).
pub(super) struct Sharded {
    /// This rank's rows of every parameter (laid out as `FusedGpt::layout` says).
    values: Vec<f32>,
    units: Vec<Vec<usize>>,
    /// Values of a block.
    block: usize,
    /// The root's gradients, laid out as the root, written by the head's step first
    /// and the embeddings' last.
    root_grads: Vec<f32>,
    /// Whether the pass under way trains, and the units run so far in it.
    train: bool,
    forward_done: usize,
}

/// Row shard `shard` of the GPT `spec`, its values those of the whole model's
/// initialisation.
pub fn shard(spec: &GptSpec, shard: ParamShard, seed: u64) -> Result<FusedGpt> {
    shard.validate()?;
    let whole = spec.layout();
    let piece = PieceLayout::row_shard(&whole, shard, 0);
    let values = init_piece(spec, &piece, seed);
    let units = units_of(spec, &whole);
    // The root: a GPT of no blocks; every block's places, those of a block in its own
    // buffer (a one-block GPT's block, moved to the front).
    let none = GptSpec { n_layer: 0, ..spec.clone() };
    let root = none.layout();
    let one = GptSpec { n_layer: 1, ..spec.clone() };
    let one_at = At::new(&one, &one.layout());
    let (start, block) = (one_at.block_start(0), one_at.ln_f.w.start - one_at.block_start(0));
    let mut at = At::new(&none, &root);
    at.blocks = vec![one_at.blocks[0].before(start); spec.n_layer];
    let mut model = FusedGpt::new_with(spec, root.total(), at);
    model.layout = piece.layout;
    model.sharded = Some(Box::new(Sharded {
        values,
        units,
        root_grads: vec![0.0; root.total()],
        block,
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

    /// Checks `values` (parameters or gradients) against unit `unit`'s size (the
    /// root's, or a block's).
    fn check_unit(&mut self, unit: usize, values: usize) -> Result<()> {
        let units = self.spec.n_layer + 1;
        let s = self.sharded()?;
        let want = if unit == 0 { s.root_grads.len() } else { s.block };
        if unit >= units {
            return Err(Error::invalid(format!("unit {unit} of a GPT of {units} units")));
        }
        if values != want {
            return Err(Error::invalid(format!("{values} values for unit {unit}, which has {want}")));
        }
        Ok(())
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
        self.check_unit(unit, params.len())?;
        let (train, done) = {
            let s = self.sharded()?;
            (s.train, s.forward_done)
        };
        if unit != done {
            return Err(Error::BadState(format!("unit {unit}'s forward asked after {done} units")));
        }
        if unit == 0 {
            self.params.copy_from_slice(params);
        }
        let rows = self.n * self.t;
        let last = unit == self.spec.n_layer;
        let end = on_compute_threads(|| {
            if rows > 0 {
                match unit {
                    0 => self.embed(),
                    u => self.block(u - 1, train, Some(params)),
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
        self.check_unit(unit, grads.len())?;
        if unit > 0 {
            self.check_unit(unit, params.len())?;
        }
        let rows = self.n * self.t;
        let mut root_grads = std::mem::take(&mut self.sharded()?.root_grads);
        on_compute_threads(|| {
            // The head's step runs with the last unit's backward (its gradients wait
            // in the root's); the embeddings' with the root's.
            if unit + 1 == units {
                self.backward_step(Step::Head, &mut Grads::write(&mut root_grads, 0));
            }
            if unit == 0 {
                self.backward_step(Step::Embeddings, &mut Grads::write(&mut root_grads, 0));
                grads.copy_from_slice(&root_grads);
            } else if rows == 0 {
                grads.fill(0.0);
            } else {
                self.block_backward(unit - 1, &mut Grads::write(grads, 0), Some(params));
            }
        });
        self.sharded()?.root_grads = root_grads;
        Ok(())
    }
}
