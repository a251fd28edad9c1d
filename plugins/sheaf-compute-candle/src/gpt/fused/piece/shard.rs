//! A row shard of a GPT piece (ZeRO stage 3 inside a pipeline stage,
//! [`sheaf_core::ComputeBackend::build_piece_shard`]): the model holds its rows of
//! every parameter of the piece, and runs the stage interface one unit at a time, a
//! unit being one of the piece's blocks (the embeddings, a transformer layer, or the
//! final LayerNorm and the head, a tied head's embedding with it). The strategy writes
//! a unit's parameters whole into the piece's buffer before the unit runs and takes
//! its gradients from the piece's gradient buffer after its backward pass; every
//! kernel is the whole piece's, at the same places, so a shard computes what the
//! piece held whole computes, bit for bit.

use sheaf_core::{Batch, Error, ParamLayout, ParamShard, Piece, Result};

use super::{FusedPiece, Saved};
use crate::cpu::kernels::on_compute_threads;
use crate::gpt::fused::layers::{block_backward, block_forward, embed, embed_backward};
use crate::gpt::fused::Grads;
use crate::gpt::{init_piece, GptSpec};

/// What a row shard holds beside the whole piece's buffers.
pub(super) struct PieceShard {
    /// The shard's layout (the piece's parameters, each its rows of them).
    pub(super) layout: ParamLayout,
    /// The shard's values, laid out as `layout`.
    pub(super) values: Vec<f32>,
    /// Per unit (segment), the parameters it reads (indices of `layout`).
    pub(super) units: Vec<Vec<usize>>,
}

/// What a unit's forward pass takes.
pub(super) enum Input<'a> {
    Batch(&'a Batch<'a>),
    Values(&'a [f32], usize),
}

/// One of the piece's blocks.
enum Unit {
    Embeddings,
    /// Held transformer layer `j` (of `PieceAt::blocks`).
    Layer(usize),
    Head,
}

impl FusedPiece {
    /// Row shard `shard` of `piece` of the GPT `spec`, its values those of the whole
    /// model's initialisation; its whole-piece buffers start as untouched zeros.
    pub fn new_shard(spec: &GptSpec, piece: &Piece, shard: ParamShard, seed: u64) -> Result<FusedPiece> {
        if piece.tensor_width > 1 {
            return Err(Error::config(
                "parallel.options.pipeline.zero",
                format!(
                    "ZeRO stage 3 shards whole blocks by rows; a stage sliced {} ways for tensor \
                     parallelism holds its weights by columns (use zero = 1 with tensor > 1)",
                    piece.tensor_width
                ),
            ));
        }
        let pl = spec.piece_layout(piece)?;
        let rows = pl.rows(shard)?;
        let values = init_piece(spec, &rows, seed);
        // A tied head's embedding runs with the head: on a last stage without the
        // embeddings it is the head's alone; on a stage holding both, the head reads it
        // too, so it is in both units (each unit's backward adds its part).
        let first = piece.blocks.start;
        let units_count = piece.blocks.len();
        let mut units = vec![Vec::new(); units_count];
        let head = piece.blocks.end == spec.blocks();
        for (i, s) in pl.layout.specs().iter().enumerate() {
            let block = spec.block_of(&s.name);
            let unit = if block < first { units_count - 1 } else { block - first };
            units[unit].push(i);
            if spec.tie_embeddings && head && first == 0 && i == crate::gpt::spec::WTE && units_count > 1 {
                units[units_count - 1].push(i);
            }
        }
        let total = pl.layout.total();
        let mut model = FusedPiece::with_params(spec, piece, pl, vec![0.0; total])?;
        model.shard = Some(PieceShard { layout: rows.layout, values, units });
        Ok(model)
    }

    fn unit(&self, seg: usize) -> Result<Unit> {
        let units = self.piece.blocks.len();
        if seg >= units {
            return Err(Error::invalid(format!(
                "unit {seg} of a gpt piece of {units} blocks ({:?})",
                self.piece.blocks
            )));
        }
        Ok(match self.piece.blocks.start + seg {
            0 => Unit::Embeddings,
            b if b == self.spec.n_layer + 1 => Unit::Head,
            b => Unit::Layer(b - 1 - self.at.first_layer),
        })
    }

    /// Forward of micro-batch `micro` through unit `seg`, on the parameters the
    /// strategy wrote into the piece's buffer.
    pub(super) fn shard_forward(&mut self, micro: u64, seg: usize, input: Input<'_>) -> Result<Vec<f32>> {
        let unit = self.unit(seg)?;
        let c = self.spec.n_embd;
        let (saved, out) = match (unit, input) {
            (Unit::Embeddings, Input::Batch(batch)) => {
                let (wte, wpe) = (self.at.wte.clone(), self.at.wpe.clone());
                let (Some(wte), Some(wpe)) = (wte, wpe) else {
                    return Err(Error::BadState("the embeddings' unit without embeddings".into()));
                };
                let (windows, n, window) = self.spec.windows(batch, "takes")?;
                let mut saved = self.fresh(seg, n, 0);
                let mut targets = Vec::new();
                saved.t = self.spec.split_windows(windows, window, &mut saved.tokens, &mut targets)?;
                let mut x = Vec::new();
                embed(&mut x, &saved.tokens, saved.t, &self.params, &wte, &wpe, c);
                (saved, x)
            }
            (Unit::Embeddings, Input::Values(..)) | (_, Input::Batch(_)) => {
                return Err(Error::invalid(format!(
                    "unit {seg} of a gpt piece holding blocks {:?}: only the embeddings take token windows",
                    self.piece.blocks
                )));
            }
            (Unit::Layer(j), Input::Values(input, rows)) => {
                let t = self.spec.stage_positions(&format!("unit {seg}"), input, rows)?;
                let mut saved = self.fresh(seg, rows, t);
                saved.keep_input(input);
                // A recomputing block keeps its input alone; its activations go to scratch.
                let recomputes = self.spec.recomputes(self.at.first_layer + j);
                saved.acts.resize_with(usize::from(!recomputes), Default::default);
                let shape = self.shape(rows, t);
                let mut out = Vec::new();
                on_compute_threads(|| {
                    let FusedPiece { params, at, scratch, d, .. } = self;
                    let kept = saved.acts.first_mut().unwrap_or(scratch);
                    block_forward(kept, d, &saved.xs[0], Some(&mut out), params, &at.blocks[j], shape);
                });
                (saved, out)
            }
            (Unit::Head, Input::Values(input, rows)) => {
                let t = self.spec.stage_positions(&format!("unit {seg}"), input, rows)?;
                let mut saved = self.fresh(seg, rows, t);
                saved.keep_input(input);
                let Saved { xs, norm, norm_stats, .. } = &mut saved;
                let logits = on_compute_threads(|| self.head_forward(norm, norm_stats, &xs[0]));
                (saved, logits)
            }
        };
        self.save(micro, seg, saved)?;
        Ok(out)
    }

    /// Backward of micro-batch `micro` through unit `seg`: its gradients added into
    /// the piece's gradient buffer; returns the gradient with respect to its input
    /// (none for the embeddings).
    pub(super) fn shard_backward(&mut self, micro: u64, seg: usize, grad: &[f32]) -> Result<Vec<f32>> {
        let unit = self.unit(seg)?;
        let saved = self.take_saved(micro, seg)?;
        let rows = saved.n * saved.t;
        let width = if matches!(unit, Unit::Head) { self.spec.vocab_size } else { self.spec.n_embd };
        if grad.len() != rows * width {
            return Err(Error::invalid(format!(
                "gradient of {} values for unit {seg}'s output of {}",
                grad.len(),
                rows * width
            )));
        }
        let c = self.spec.n_embd;
        let out = on_compute_threads(|| match unit {
            Unit::Embeddings => {
                let FusedPiece { grads, at, .. } = self;
                let (wte, wpe) = (at.wte.as_ref().expect("embeddings"), at.wpe.as_ref().expect("embeddings"));
                embed_backward(&mut Grads::add(grads, 0), grad, &saved.tokens, saved.t, wte, wpe, c);
                Vec::new()
            }
            Unit::Layer(j) => {
                let shape = self.shape(saved.n, saved.t);
                let FusedPiece { spec, params, grads, at, scratch, d, .. } = self;
                d.res.clear();
                d.res.extend_from_slice(grad);
                let kept = (!spec.recomputes(at.first_layer + j)).then(|| &saved.acts[0]);
                let mut g = Grads::add(grads, 0);
                block_backward(d, &mut g, kept, scratch, &saved.xs[0], params, &at.blocks[j], shape);
                d.res.clone()
            }
            Unit::Head => {
                self.head_backward(&saved, &saved.xs[0], grad);
                self.d.res.clone()
            }
        });
        self.spare.entry(seg).or_default().push(saved);
        Ok(out)
    }
}
