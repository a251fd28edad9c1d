//! A piece of the GPT on the CPU (a pipeline stage, a tensor-parallel slice of one, or
//! both) through the stage interface, on the fused model's kernels: its parameters one
//! flat buffer it lends to the strategy, its gradients accumulated over micro-batches
//! in a second, and per micro-batch in flight only what the backward pass reads (each
//! block's input, and of a block that does not recompute the activations
//! [`block_forward`] keeps), where candle's graph keeps every intermediate tensor and
//! copies of the parameters besides.
//!
//! A pipeline stage runs as one segment: the embeddings on the first stage, its
//! transformer blocks, and on the last the final LayerNorm and the head. A
//! tensor-parallel slice runs the segments [`GptSpec::tensor_segments`] lists, as
//! candle's graph model does: Megatron's column-parallel `c_attn` and `c_fc` and
//! row-parallel `c_proj` over this rank's heads and hidden columns, the strategy
//! summing each even segment's output over the group. A block that recomputes keeps
//! only its input (under tensor parallelism, the input of its attention and of its
//! MLP: the slice recomputes its own part, without any communication).

use std::collections::HashMap;
use std::ops::Range;

use sheaf_core::{Batch, Error, Model, ParamLayout, Piece, PieceLayout, Result};

mod shard;

use super::layers::{
    add, attention, attention_backward, block_backward, block_forward, embed, embed_backward, gelu,
    gelu_backward, layer_norm, layer_norm_backward, linear, linear_backward, Backward, Shape,
};
use super::{Affine, BlockActs, BlockAt, Grads};
use crate::check_values;
use crate::cpu::kernels::{column_sums, cross_entropy, matmul, on_compute_threads, threads, View};
use crate::gpt::{init_piece, After, GptSpec, Segment};

/// Where a piece's parameters sit in its flat buffer.
struct PieceAt {
    /// The embeddings, on the first stage.
    wte: Option<Range<usize>>,
    wpe: Option<Range<usize>>,
    /// The transformer blocks held, layers `first_layer..`.
    first_layer: usize,
    blocks: Vec<BlockAt>,
    /// The final LayerNorm and the head (the token embedding when tied), on the last
    /// stage.
    ln_f: Option<Affine>,
    head: Option<Range<usize>>,
}

impl PieceAt {
    fn new(spec: &GptSpec, piece: &Piece, layout: &ParamLayout) -> PieceAt {
        let find = |name: &str| {
            let i = layout.specs().iter().position(|s| s.name == name);
            i.map(|i| layout.range(i))
        };
        let must =
            |name: String| find(&name).unwrap_or_else(|| panic!("the gpt piece's layout has `{name}`"));
        let affine =
            |name: &str| Affine { w: must(format!("{name}.weight")), b: find(&format!("{name}.bias")) };
        let layers = spec.layers_in(&piece.blocks);
        let blocks = layers.clone().map(|i| BlockAt::of_layer(i, &affine)).collect();
        let first = piece.blocks.start == 0;
        let last = piece.blocks.end == spec.blocks();
        let head_name = if spec.tie_embeddings { "transformer.wte.weight" } else { "lm_head.weight" };
        PieceAt {
            wte: first.then(|| must("transformer.wte.weight".into())),
            wpe: first.then(|| must("transformer.wpe.weight".into())),
            first_layer: layers.start,
            blocks,
            ln_f: last.then(|| affine("transformer.ln_f")),
            head: last.then(|| must(head_name.into())),
        }
    }
}

/// A tensor-parallel segment with its parameters' places resolved.
enum Seg {
    Entry,
    /// The residual stream: the summed partial output, plus the previous replicated
    /// segment's stream and a row-parallel layer's bias; then a LayerNorm, the head, or
    /// the stream itself for the next stage.
    Replicated {
        bias: Option<Range<usize>>,
        then: Then,
    },
    /// This rank's heads of the attention of held block `j`, up to its `c_proj`
    /// without the bias.
    Attention(usize),
    /// This rank's columns of the MLP of held block `j`, likewise.
    Mlp(usize),
}

enum Then {
    Norm(Affine),
    Head,
    Output,
}

/// What a forward pass (a stage's, or one segment's) keeps for its backward pass.
#[derive(Default)]
struct Saved {
    /// `n` windows of `t` positions, and on the first stage their input tokens.
    n: usize,
    t: usize,
    tokens: Vec<u32>,
    /// A stage: each block's input, then the stream into the final LayerNorm on the
    /// last stage. A segment: its input (a partial one's) or its residual stream (a
    /// replicated one's).
    xs: Vec<Vec<f32>>,
    /// What each block (or a partial segment) kept: empty where it recomputes.
    acts: Vec<BlockActs>,
    /// The final LayerNorm's output (for the head's gradient), and a LayerNorm's
    /// statistics.
    norm: Vec<f32>,
    norm_stats: Vec<(f32, f32)>,
}

impl BlockActs {
    fn bytes(&self) -> u64 {
        let values = self.qkv.len() + self.att.len() + self.atty.len() + self.res_2.len() + self.fc.len();
        4 * values as u64 + 8 * (self.ln_1_stats.len() + self.ln_2_stats.len()) as u64
    }
}

impl Saved {
    /// Keeps `input` as the forward pass's first stream (`xs[0]`), in the buffer a
    /// spare one had.
    fn keep_input(&mut self, input: &[f32]) {
        self.xs.resize_with(1, Vec::new);
        self.xs[0].clear();
        self.xs[0].extend_from_slice(input);
    }

    fn bytes(&self) -> u64 {
        let values: usize = self.xs.iter().map(Vec::len).sum::<usize>() + self.norm.len() + self.tokens.len();
        4 * values as u64
            + 8 * self.norm_stats.len() as u64
            + self.acts.iter().map(BlockActs::bytes).sum::<u64>()
    }
}

/// A piece of a GPT on the CPU, run through the stage interface.
pub struct FusedPiece {
    spec: GptSpec,
    piece: Piece,
    layout: ParamLayout,
    params: Vec<f32>,
    /// Gradients accumulated since the last `take_grads`.
    grads: Vec<f32>,
    at: PieceAt,
    threads: usize,
    /// `(index here, index in the whole model)` of a tied head's embedding.
    tied: Vec<(usize, usize)>,
    replicated: Vec<bool>,
    /// Under tensor parallelism, the segments; empty for a whole-block stage.
    segs: Vec<Seg>,
    /// Per `(micro-batch, segment)` in flight, what its forward pass kept.
    saved: HashMap<(u64, usize), Saved>,
    saved_bytes: u64,
    /// Per segment, the buffers of micro-batches whose backward pass is done, reused
    /// by the step's next forward passes (a later stage's micro-batches run one after
    /// another) until the step ends.
    spare: HashMap<usize, Vec<Saved>>,
    /// Tensor parallelism: the gradient with respect to a replicated segment's
    /// residual stream that a later replicated segment sent back.
    residual_grad: HashMap<(u64, usize), Vec<f32>>,
    /// The activations of a block that recomputes, and the backward pass's scratch.
    scratch: BlockActs,
    d: Backward,
    /// A row shard of the piece (ZeRO stage 3 inside a pipeline stage): its rows, and
    /// `params` and `grads` the whole piece's buffers, filled unit by unit.
    shard: Option<shard::PieceShard>,
}

impl FusedPiece {
    /// Blocks `piece.blocks` of the GPT `spec`, each whole or this rank's slice, their
    /// values those of the whole model's initialisation.
    pub fn new(spec: &GptSpec, piece: &Piece, seed: u64) -> Result<FusedPiece> {
        let pl = spec.piece_layout(piece)?;
        let params = init_piece(spec, &pl, seed);
        FusedPiece::with_params(spec, piece, pl, params)
    }

    /// The piece laid out as `pl`, its parameters `params`.
    fn with_params(spec: &GptSpec, piece: &Piece, pl: PieceLayout, params: Vec<f32>) -> Result<FusedPiece> {
        let at = PieceAt::new(spec, piece, &pl.layout);
        let (tied, replicated) = spec.sharing(piece, &pl);
        let index: HashMap<&str, Range<usize>> = pl
            .layout
            .specs()
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), pl.layout.range(i)))
            .collect();
        let place = |name: &str| {
            index
                .get(name)
                .cloned()
                .ok_or_else(|| Error::BadState(format!("no parameter `{name}` in this piece")))
        };
        let mut segs = Vec::new();
        if piece.tensor_width > 1 {
            for seg in spec.tensor_segments(&piece.blocks) {
                segs.push(match seg {
                    Segment::Entry => Seg::Entry,
                    Segment::Replicated { bias, then } => Seg::Replicated {
                        bias: bias.as_deref().filter(|_| spec.bias).map(place).transpose()?,
                        then: match then {
                            After::Norm(name) => Then::Norm(Affine {
                                w: place(&format!("{name}.weight"))?,
                                b: spec.bias.then(|| place(&format!("{name}.bias"))).transpose()?,
                            }),
                            After::Head => Then::Head,
                            After::Output => Then::Output,
                        },
                    },
                    Segment::Attention(i) => Seg::Attention(i - at.first_layer),
                    Segment::Mlp(i) => Seg::Mlp(i - at.first_layer),
                });
            }
        }
        Ok(FusedPiece {
            spec: spec.clone(),
            piece: piece.clone(),
            grads: vec![0.0; pl.layout.total()],
            layout: pl.layout,
            params,
            at,
            threads: threads(),
            tied,
            replicated,
            segs,
            saved: HashMap::new(),
            saved_bytes: 0,
            spare: HashMap::new(),
            residual_grad: HashMap::new(),
            scratch: BlockActs::default(),
            d: Backward::default(),
            shard: None,
        })
    }

    fn shape(&self, n: usize, t: usize) -> Shape {
        Shape {
            n,
            t,
            c: self.spec.n_embd,
            n_head: self.spec.n_head,
            gelu: self.spec.gelu,
            threads: self.threads,
        }
    }

    /// Keeps what segment `seg` of micro-batch `micro` needs for its backward pass.
    fn save(&mut self, micro: u64, seg: usize, saved: Saved) -> Result<()> {
        if self.saved.contains_key(&(micro, seg)) {
            return Err(Error::BadState(format!(
                "micro-batch {micro} segment {seg} ran forward twice without a backward"
            )));
        }
        self.saved_bytes += saved.bytes();
        self.saved.insert((micro, seg), saved);
        Ok(())
    }

    /// Buffers for segment `seg`'s forward pass of `n` windows of `t` positions: a
    /// spare one's when there is one.
    fn fresh(&mut self, seg: usize, n: usize, t: usize) -> Saved {
        let mut saved = self.spare.get_mut(&seg).and_then(Vec::pop).unwrap_or_default();
        (saved.n, saved.t) = (n, t);
        saved.tokens.clear();
        saved
    }

    fn take_saved(&mut self, micro: u64, seg: usize) -> Result<Saved> {
        let saved = self.saved.remove(&(micro, seg)).ok_or_else(|| {
            Error::BadState(format!("backward of micro-batch {micro} segment {seg}, which ran no forward"))
        })?;
        self.saved_bytes -= saved.bytes();
        Ok(saved)
    }

    /// The final LayerNorm of `x` into `norm` (its statistics into `stats`) and the
    /// head's logits.
    fn head_forward(&self, norm: &mut Vec<f32>, stats: &mut Vec<(f32, f32)>, x: &[f32]) -> Vec<f32> {
        let (c, v, threads) = (self.spec.n_embd, self.spec.vocab_size, self.threads);
        let (ln_f, head) =
            (self.at.ln_f.as_ref().expect("a last stage"), self.at.head.clone().expect("a head"));
        let rows = x.len() / c;
        layer_norm(norm, stats, x, &self.params, ln_f, c, threads);
        let mut logits = vec![0.0; rows * v];
        let w = View::rows(&self.params[head], v, c);
        matmul(&mut logits, false, View::rows(norm, rows, c), w.t(), threads);
        logits
    }

    /// The backward of [`FusedPiece::head_forward`] on the stream `x` into it: the
    /// gradient with respect to `x` into `d.res`.
    fn head_backward(&mut self, saved: &Saved, x: &[f32], d_logits: &[f32]) {
        let (c, v, threads) = (self.spec.n_embd, self.spec.vocab_size, self.threads);
        let rows = x.len() / c;
        let FusedPiece { params, grads, at, d, .. } = self;
        let (ln_f, head) = (at.ln_f.as_ref().expect("a last stage"), at.head.clone().expect("a head"));
        let mut g = Grads::add(grads, 0);
        let dy = View::rows(d_logits, rows, v);
        matmul(g.at(&head), true, dy.t(), View::rows(&saved.norm, rows, c), threads);
        d.narrow.resize(rows * c, 0.0);
        matmul(&mut d.narrow, false, dy, View::rows(&params[head], v, c), threads);
        d.res.clear();
        d.res.resize(rows * c, 0.0);
        layer_norm_backward(&mut d.res, &mut g, &d.narrow, x, &saved.norm_stats, params, ln_f, c, threads);
    }

    /// A whole-block stage's forward pass from the stream in `saved.xs[0]` (the
    /// embeddings, or the previous stage's output): its output, or on the last stage
    /// the logits.
    fn stage_pass(&mut self, saved: &mut Saved) -> Vec<f32> {
        let shape = self.shape(saved.n, saved.t);
        let blocks = self.at.blocks.len();
        let Saved { xs, acts, norm, norm_stats, .. } = saved;
        xs.resize_with(blocks + 1, Vec::new);
        acts.resize_with(blocks, BlockActs::default);
        for (j, b) in self.at.blocks.iter().enumerate() {
            let (before, after) = xs.split_at_mut(j + 1);
            let kept =
                if self.spec.recomputes(self.at.first_layer + j) { &mut self.scratch } else { &mut acts[j] };
            block_forward(kept, &mut self.d, &before[j], Some(&mut after[0]), &self.params, b, shape);
        }
        if self.at.ln_f.is_none() {
            // Not kept: the next stage's input, which the backward pass does not read.
            return std::mem::take(&mut xs[blocks]);
        }
        self.head_forward(norm, norm_stats, &xs[blocks])
    }

    /// The backward of [`FusedPiece::stage_pass`]: the gradient with respect to the
    /// stage's input (none on the first stage).
    fn stage_back(&mut self, saved: &Saved, grad: &[f32]) -> Vec<f32> {
        let shape = self.shape(saved.n, saved.t);
        let blocks = self.at.blocks.len();
        if self.at.ln_f.is_some() {
            self.head_backward(saved, &saved.xs[blocks], grad);
        } else {
            self.d.res.clear();
            self.d.res.extend_from_slice(grad);
        }
        let FusedPiece { spec, params, grads, at, scratch, d, .. } = self;
        let mut g = Grads::add(grads, 0);
        for j in (0..blocks).rev() {
            let kept = (!spec.recomputes(at.first_layer + j)).then(|| &saved.acts[j]);
            block_backward(d, &mut g, kept, scratch, &saved.xs[j], params, &at.blocks[j], shape);
        }
        match (&at.wte, &at.wpe) {
            (Some(wte), Some(wpe)) => {
                embed_backward(&mut g, &d.res, &saved.tokens, saved.t, wte, wpe, spec.n_embd);
                Vec::new()
            }
            _ => d.res.clone(),
        }
    }

    /// The forward pass of tensor-parallel segment `seg` on `input` (`saved.n` windows
    /// of `saved.t` positions; for the entry of the first stage, the embeddings of
    /// `saved.tokens`), keeping in `saved` what its backward pass reads.
    fn segment_forward(
        &mut self,
        micro: u64,
        seg: usize,
        input: &[f32],
        mut saved: Saved,
    ) -> Result<Vec<f32>> {
        let (c, threads) = (self.spec.n_embd, self.threads);
        let (n, t) = (saved.n, saved.t);
        let rows = n * t;
        let out = match &self.segs[seg] {
            Seg::Entry => {
                // Computed on every rank, emitted by rank 0 only: the group's sum is it
                // once, and every rank's embedding gradient whole.
                let out = if self.piece.tensor_rank == 0 { input.to_vec() } else { vec![0.0; input.len()] };
                self.save(micro, seg, saved)?;
                return Ok(out);
            }
            Seg::Replicated { bias, then } => {
                saved.keep_input(input);
                let Saved { xs, norm, norm_stats, .. } = &mut saved;
                let x = &mut xs[0];
                // The previous replicated segment's stream, which it keeps for its
                // own backward pass.
                if let Some(prev) = seg.checked_sub(2).and_then(|p| self.saved.get(&(micro, p))) {
                    add(x, &prev.xs[0]);
                }
                if let Some(b) = bias {
                    let b = &self.params[b.clone()];
                    x.chunks_exact_mut(c).for_each(|row| add(row, b));
                }
                match then {
                    Then::Norm(a) => {
                        let mut out = Vec::new();
                        layer_norm(&mut out, norm_stats, x, &self.params, a, c, threads);
                        out
                    }
                    Then::Head => self.head_forward(norm, norm_stats, x),
                    // Not kept: the next stage's input, which no backward pass reads.
                    Then::Output => std::mem::take(x),
                }
            }
            &Seg::Attention(j) | &Seg::Mlp(j) => {
                let attention = matches!(self.segs[seg], Seg::Attention(_));
                let recomputes = self.spec.recomputes(self.at.first_layer + j);
                saved.acts.resize_with(usize::from(!recomputes), BlockActs::default);
                let mut scratch = std::mem::take(&mut self.scratch);
                let acts = saved.acts.first_mut().unwrap_or(&mut scratch);
                let (b, p) = (&self.at.blocks[j], &self.params[..]);
                let mut out = Vec::new();
                if attention {
                    self.attention_acts(acts, j, input, n, t);
                    let proj = Affine { w: b.attn_proj.w.clone(), b: None };
                    linear(&mut out, &acts.atty, p, &proj, rows, acts.atty.len() / rows, c, threads);
                } else {
                    self.mlp_acts(acts, j, input, rows);
                    gelu(&mut self.d.gelu, &acts.fc, self.spec.gelu, threads);
                    let proj = Affine { w: b.mlp_proj.w.clone(), b: None };
                    linear(&mut out, &self.d.gelu, p, &proj, rows, acts.fc.len() / rows, c, threads);
                }
                self.scratch = scratch;
                saved.keep_input(input);
                out
            }
        };
        self.save(micro, seg, saved)?;
        Ok(out)
    }

    /// This rank's heads of held block `j`'s attention on `h` (its `ln_1` output) into
    /// `acts`: q, k, v, the probabilities and the heads' outputs (the input of the
    /// partial `c_proj`).
    fn attention_acts(&self, acts: &mut BlockActs, j: usize, h: &[f32], n: usize, t: usize) {
        let (c, threads) = (self.spec.n_embd, self.threads);
        let (b, rows, p) = (&self.at.blocks[j], n * t, &self.params[..]);
        let (cl, nh) = (b.c_attn.w.len() / (3 * c), self.spec.n_head / self.piece.tensor_width);
        linear(&mut acts.qkv, h, p, &b.c_attn, rows, c, 3 * cl, threads);
        attention(&mut acts.att, &mut acts.atty, &acts.qkv, n, t, cl, nh, threads);
    }

    /// This rank's columns of held block `j`'s MLP on `h` (its `ln_2` output) into
    /// `acts`: the hidden layer before GELU.
    fn mlp_acts(&self, acts: &mut BlockActs, j: usize, h: &[f32], rows: usize) {
        let (c, threads) = (self.spec.n_embd, self.threads);
        let (b, p) = (&self.at.blocks[j], &self.params[..]);
        linear(&mut acts.fc, h, p, &b.c_fc, rows, c, b.c_fc.w.len() / c, threads);
    }

    /// The backward pass of tensor-parallel segment `seg`: the gradient with respect to
    /// its input (for an even segment, this rank's part of a sum over the group).
    fn segment_backward(&mut self, micro: u64, seg: usize, saved: &Saved, grad: &[f32]) -> Vec<f32> {
        let (c, threads) = (self.spec.n_embd, self.threads);
        let (n, t) = (saved.n, saved.t);
        let rows = n * t;
        match &self.segs[seg] {
            Seg::Entry => match (&self.at.wte, &self.at.wpe) {
                (Some(wte), Some(wpe)) => {
                    let mut g = Grads::add(&mut self.grads, 0);
                    embed_backward(&mut g, grad, &saved.tokens, t, wte, wpe, c);
                    Vec::new()
                }
                _ => grad.to_vec(),
            },
            Seg::Replicated { bias, then } => {
                let bias = bias.clone();
                let mut dx = match then {
                    Then::Norm(a) => {
                        let mut dx = vec![0.0; rows * c];
                        let mut g = Grads::add(&mut self.grads, 0);
                        let x = &saved.xs[0];
                        layer_norm_backward(
                            &mut dx,
                            &mut g,
                            grad,
                            x,
                            &saved.norm_stats,
                            &self.params,
                            a,
                            c,
                            threads,
                        );
                        dx
                    }
                    Then::Head => {
                        self.head_backward(saved, &saved.xs[0], grad);
                        std::mem::take(&mut self.d.res)
                    }
                    Then::Output => grad.to_vec(),
                };
                if let Some(later) = self.residual_grad.remove(&(micro, seg)) {
                    add(&mut dx, &later);
                }
                if let Some(b) = bias {
                    column_sums(&dx, &mut self.grads[b], true, threads);
                }
                // x = input + previous stream + bias: the previous stream's gradient
                // is this one's, for the replicated segment two back.
                if seg >= 3 {
                    self.residual_grad.insert((micro, seg - 2), dx.clone());
                }
                dx
            }
            &Seg::Attention(j) => {
                let h = &saved.xs[0];
                let mut scratch = std::mem::take(&mut self.scratch);
                let a = match saved.acts.first() {
                    Some(a) => a,
                    None => {
                        self.attention_acts(&mut scratch, j, h, n, t);
                        &scratch
                    }
                };
                let FusedPiece { spec, piece, params, grads, at, d, .. } = self;
                let b = &at.blocks[j];
                let (cl, nh) = (b.c_attn.w.len() / (3 * c), spec.n_head / piece.tensor_width);
                let mut g = Grads::add(grads, 0);
                d.atty.resize(rows * cl, 0.0);
                let proj = Affine { w: b.attn_proj.w.clone(), b: None };
                linear_backward(&mut g, &mut d.atty, grad, &a.atty, params, &proj, rows, cl, c, threads);
                d.qkv.resize(rows * 3 * cl, 0.0);
                attention_backward(&mut d.qkv, &d.atty, &a.qkv, &a.att, n, t, cl, nh, threads);
                let mut dh = vec![0.0; rows * c];
                linear_backward(&mut g, &mut dh, &d.qkv, h, params, &b.c_attn, rows, c, 3 * cl, threads);
                self.scratch = scratch;
                dh
            }
            &Seg::Mlp(j) => {
                let h = &saved.xs[0];
                let mut scratch = std::mem::take(&mut self.scratch);
                let a = match saved.acts.first() {
                    Some(a) => a,
                    None => {
                        self.mlp_acts(&mut scratch, j, h, rows);
                        &scratch
                    }
                };
                let FusedPiece { params, grads, at, d, .. } = self;
                let b = &at.blocks[j];
                let wide = b.c_fc.w.len() / c;
                let mut g = Grads::add(grads, 0);
                d.wide.resize(rows * wide, 0.0);
                let proj = Affine { w: b.mlp_proj.w.clone(), b: None };
                // GELU's output, not kept: again from its input.
                gelu(&mut d.gelu, &a.fc, self.spec.gelu, threads);
                linear_backward(&mut g, &mut d.wide, grad, &d.gelu, params, &proj, rows, wide, c, threads);
                gelu_backward(&mut d.wide, &a.fc, self.spec.gelu, threads);
                let mut dh = vec![0.0; rows * c];
                linear_backward(&mut g, &mut dh, &d.wide, h, params, &b.c_fc, rows, c, wide, threads);
                self.scratch = scratch;
                dh
            }
        }
    }

    fn tensor_parallel(&self) -> bool {
        !self.segs.is_empty()
    }

    fn stage_only(&self, what: &str) -> Error {
        Error::Unsupported(format!(
            "a piece of a gpt (blocks {:?}, slice {} of {}) {what} through the stage interface (a model-parallel strategy)",
            self.piece.blocks, self.piece.tensor_rank, self.piece.tensor_width
        ))
    }
}

impl Model for FusedPiece {
    fn layout(&self) -> &ParamLayout {
        match &self.shard {
            Some(s) => &s.layout,
            None => &self.layout,
        }
    }

    fn read_params(&self, out: &mut [f32]) -> Result<()> {
        let own = self.shard.as_ref().map_or(&self.params, |s| &s.values);
        check_values(out.len(), own.len())?;
        out.copy_from_slice(own);
        Ok(())
    }

    fn write_params(&mut self, src: &[f32]) -> Result<()> {
        let own = self.shard.as_mut().map_or(&mut self.params, |s| &mut s.values);
        check_values(src.len(), own.len())?;
        own.copy_from_slice(src);
        Ok(())
    }

    fn params_mut(&mut self) -> Result<Option<&mut [f32]>> {
        Ok(Some(self.shard.as_mut().map_or(&mut self.params, |s| &mut s.values)))
    }

    fn units(&self) -> Vec<Vec<usize>> {
        self.shard.as_ref().map_or_else(Vec::new, |s| s.units.clone())
    }

    fn piece_params_mut(&mut self) -> Result<Option<&mut [f32]>> {
        Ok(self.shard.is_some().then_some(&mut self.params[..]))
    }

    fn piece_grads_mut(&mut self) -> Result<Option<&mut [f32]>> {
        Ok(self.shard.is_some().then_some(&mut self.grads[..]))
    }

    fn forward_backward(&mut self, _: &Batch<'_>, _: &mut [f32]) -> Result<f32> {
        Err(self.stage_only("trains"))
    }

    fn evaluate(&mut self, _: &Batch<'_>) -> Result<(f64, usize)> {
        Err(self.stage_only("evaluates"))
    }

    fn piece(&self) -> Option<Piece> {
        Some(self.piece.clone())
    }

    fn segments(&self) -> usize {
        match &self.shard {
            Some(s) => s.units.len(),
            None => self.segs.len().max(1),
        }
    }

    fn stage_forward_batch(&mut self, micro: u64, segment: usize, batch: &Batch<'_>) -> Result<Vec<f32>> {
        if self.shard.is_some() {
            return self.shard_forward(micro, segment, shard::Input::Batch(batch));
        }
        let (Some(wte), Some(wpe)) = (self.at.wte.clone(), self.at.wpe.clone()) else {
            return Err(Error::invalid(format!(
                "only the stage holding the embeddings takes token windows (this one holds blocks {:?})",
                self.piece.blocks
            )));
        };
        if segment != 0 {
            return Err(Error::invalid(format!("token windows go to segment 0, not {segment}")));
        }
        let (windows, n, window) = self.spec.windows(batch, "takes")?;
        let mut saved = self.fresh(0, n, 0);
        let mut targets = Vec::new();
        saved.t = self.spec.split_windows(windows, window, &mut saved.tokens, &mut targets)?;
        if self.tensor_parallel() {
            let mut x = Vec::new();
            embed(&mut x, &saved.tokens, saved.t, &self.params, &wte, &wpe, self.spec.n_embd);
            return self.segment_forward(micro, 0, &x, saved);
        }
        saved.xs.resize_with(1, Vec::new);
        embed(&mut saved.xs[0], &saved.tokens, saved.t, &self.params, &wte, &wpe, self.spec.n_embd);
        let out = on_compute_threads(|| self.stage_pass(&mut saved));
        self.save(micro, 0, saved)?;
        Ok(out)
    }

    fn stage_forward(&mut self, micro: u64, segment: usize, input: &[f32], rows: usize) -> Result<Vec<f32>> {
        if self.shard.is_some() {
            return self.shard_forward(micro, segment, shard::Input::Values(input, rows));
        }
        if segment >= self.segments() || (segment == 0 && self.at.wte.is_some()) {
            return Err(Error::invalid(format!(
                "a gpt piece holding blocks {:?} in {} segments takes {} (segment {segment})",
                self.piece.blocks,
                self.segments(),
                if segment == 0 { "token windows" } else { "no such segment" }
            )));
        }
        let t = self.spec.stage_positions(&format!("segment {segment}"), input, rows)?;
        if self.tensor_parallel() {
            let saved = self.fresh(segment, rows, t);
            return on_compute_threads(|| self.segment_forward(micro, segment, input, saved));
        }
        let mut saved = self.fresh(0, rows, t);
        saved.keep_input(input);
        let out = on_compute_threads(|| self.stage_pass(&mut saved));
        self.save(micro, 0, saved)?;
        Ok(out)
    }

    fn stage_backward(&mut self, micro: u64, segment: usize, grad_output: &[f32]) -> Result<Vec<f32>> {
        if self.shard.is_some() {
            return self.shard_backward(micro, segment, grad_output);
        }
        let saved = self.take_saved(micro, segment)?;
        let rows = saved.n * saved.t;
        let logits = match &self.segs.get(segment) {
            Some(Seg::Replicated { then: Then::Head, .. }) => true,
            Some(_) => false,
            None => self.at.ln_f.is_some(),
        };
        let width = if logits { self.spec.vocab_size } else { self.spec.n_embd };
        if grad_output.len() != rows * width {
            return Err(Error::invalid(format!(
                "gradient of {} values for an output of {}",
                grad_output.len(),
                rows * width
            )));
        }
        let input_grad = match self.tensor_parallel() {
            true => on_compute_threads(|| self.segment_backward(micro, segment, &saved, grad_output)),
            false => on_compute_threads(|| self.stage_back(&saved, grad_output)),
        };
        self.spare.entry(segment).or_default().push(saved);
        Ok(input_grad)
    }

    fn loss_grad(&mut self, logits: &[f32], labels: &[u32], scale: f32) -> Result<(f64, usize, Vec<f32>)> {
        let (v, rows) = (self.spec.vocab_size, labels.len());
        self.spec.check_logits(logits, labels)?;
        let mut grad = vec![0.0; rows * v];
        let (sum, correct) = cross_entropy(logits, labels, v, scale, Some(&mut grad), self.threads);
        Ok((sum, correct, grad))
    }

    fn take_grads(&mut self, out: &mut [f32]) -> Result<()> {
        if self.shard.is_some() {
            return Err(Error::Unsupported(
                "a row shard of a gpt piece gives its gradients unit by unit (piece_grads_mut)".into(),
            ));
        }
        // The step's passes are done: their buffers go, so that what runs next (an
        // evaluation, of other sizes) does not find them held beside its own.
        self.spare.clear();
        crate::take_accumulated(&mut self.grads, out)
    }

    fn drop_saved(&mut self) {
        self.saved.clear();
        self.spare.clear();
        self.residual_grad.clear();
        self.saved_bytes = 0;
    }

    fn saved_bytes(&self) -> u64 {
        self.saved_bytes
    }

    fn tied_params(&self) -> Vec<(usize, usize)> {
        self.tied.clone()
    }

    fn replicated_params(&self) -> Vec<bool> {
        self.replicated.clone()
    }
}
