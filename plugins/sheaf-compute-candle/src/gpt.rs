//! The GPT language model (`model.kind = "gpt"`): exactly GPT-2 as nanoGPT writes it,
//! without dropout. Token and learned position embeddings; `n_layer` pre-LayerNorm
//! blocks `x + attn(ln_1(x))`, `x + mlp(ln_2(x))`; causal multi-head self-attention
//! with one fused `c_attn` (q, then k, then v) and `c_proj`, scaled by 1/sqrt(head
//! size); an MLP of `c_fc` (4 x n_embd), exact (erf) GELU and `c_proj`; a final
//! LayerNorm (eps 1e-5 everywhere) and a head tied to the token embedding by default.
//!
//! Parameters carry nanoGPT's state-dict names and shapes (`transformer.wte.weight`,
//! `transformer.h.0.attn.c_attn.weight` as `[3 n_embd, n_embd]`, ...; a tied head is
//! not stored twice), so a checkpoint loads into nanoGPT's `GPT` unchanged.
//! Initialisation is nanoGPT's: normal(0, 0.02) for weights and embeddings,
//! 0.02/sqrt(2 n_layer) for both `c_proj` weights, zero biases, unit LayerNorm
//! weights, each parameter drawn from its own seeded stream.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use sheaf_core::{Batch, Error, Model, ParamLayout, Piece, Result};

use crate::{
    add_var_grads, candle_err, loss_sum_correct_grad, read_vars, take_accumulated, vars_from, write_vars,
};

pub(crate) mod fused;
pub(crate) mod hf;
pub(crate) mod kind;
mod spec;

pub(crate) use spec::init_piece;
#[cfg(test)]
pub(crate) use spec::Gelu;
pub use spec::{init_params, GptSpec};
pub(crate) use spec::{After, Segment};

/// A GPT, or a pipeline stage of one (a range of its blocks), held as candle `Var`s
/// in its piece's layout order.
pub struct Gpt {
    spec: GptSpec,
    piece: Piece,
    layout: ParamLayout,
    vars: Vec<Var>,
    index: HashMap<String, usize>,
    device: Device,
    /// `(index here, index in the whole model)` of a tied head's embedding.
    tied: Vec<(usize, usize)>,
    /// Per parameter: held whole by every rank of a tensor-parallel group.
    replicated: Vec<bool>,
    /// The stage interface: accumulated gradients, and per micro-batch what its
    /// forward kept (the input as a `Var` for its gradient, the output, bytes).
    grads: Vec<f32>,
    saved: HashMap<(u64, usize), Saved>,
    saved_bytes: u64,
    bytes_per_window: u64,
    /// Tensor parallelism: the residual stream after the last replicated segment's
    /// forward, and the gradient a later segment sent back into it, per micro-batch.
    residual: HashMap<u64, Tensor>,
    residual_grad: HashMap<(u64, usize), Tensor>,
    /// Under tensor parallelism, the piece's segments.
    segs: Vec<Segment>,
}

/// What a segment's forward keeps for its backward.
struct Saved {
    /// The segment's input, and under tensor parallelism the residual stream it adds
    /// to (both as `Var`s, for their gradients).
    input: Option<Var>,
    prev: Option<Var>,
    /// The residual stream it leaves (tensor parallelism's replicated segments).
    x: Option<Tensor>,
    out: Tensor,
    bytes: u64,
}

/// Windows evaluated at once by `evaluate`, bounding its memory.
const EVAL_CHUNK: usize = 32;

/// What a stage's first block receives.
enum StageIn {
    /// Token ids `[n, t]`.
    Tokens(Tensor),
    /// The residual stream `[n * t, n_embd]`.
    Hidden(Tensor),
}

impl Gpt {
    /// The whole model.
    pub fn new(spec: &GptSpec, seed: u64, device: Device) -> Result<Gpt> {
        Gpt::piece(spec, &Piece::whole(spec.blocks()), seed, device)
    }

    /// Blocks `piece.blocks` of the model, their values exactly the whole model's.
    pub fn piece(spec: &GptSpec, piece: &Piece, seed: u64, device: Device) -> Result<Gpt> {
        if spec.recompute_every > 0 {
            return Err(Error::config(
                "train.activation_checkpointing",
                format!(
                    "the gpt recomputes activations on the CPU's fused models only, not on {device:?} yet"
                ),
            ));
        }
        let pl = spec.piece_layout(piece)?;
        let vars = vars_from(&pl.layout, &init_piece(spec, &pl, seed), &device)?;
        let index = pl.layout.specs().iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        let (tied, replicated) = spec.sharing(piece, &pl);
        Ok(Gpt {
            spec: spec.clone(),
            piece: piece.clone(),
            grads: vec![0.0; pl.layout.total()],
            layout: pl.layout,
            vars,
            index,
            device,
            tied,
            replicated,
            saved: HashMap::new(),
            saved_bytes: 0,
            bytes_per_window: pl.activation_bytes_per_sample,
            residual: HashMap::new(),
            residual_grad: HashMap::new(),
            segs: if piece.tensor_width > 1 { spec.tensor_segments(&piece.blocks) } else { Vec::new() },
        })
    }

    fn is_whole(&self) -> bool {
        self.piece == Piece::whole(self.spec.blocks())
    }

    fn p(&self, name: &str) -> candle_core::Result<&Tensor> {
        match self.index.get(name) {
            Some(&i) => Ok(self.vars[i].as_tensor()),
            None => candle_core::bail!("no parameter `{name}` in this piece"),
        }
    }

    fn opt(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| self.vars[i].as_tensor())
    }

    /// `x [rows, in] @ w^T + b`.
    fn linear(&self, x: &Tensor, name: &str) -> candle_core::Result<Tensor> {
        let y = x.matmul(&self.p(&format!("{name}.weight"))?.t()?)?;
        match self.opt(&format!("{name}.bias")) {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// LayerNorm over the last dimension, eps 1e-5.
    fn layer_norm(&self, x: &Tensor, name: &str) -> candle_core::Result<Tensor> {
        let y = crate::cpu::ops::normalize(x, 1e-5)?.broadcast_mul(self.p(&format!("{name}.weight"))?)?;
        match self.opt(&format!("{name}.bias")) {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Transformer block `i` on the residual stream `x` (`[n * t, n_embd]`).
    fn block(&self, x: Tensor, i: usize, n: usize, t: usize) -> candle_core::Result<Tensor> {
        let (c, nh) = (self.spec.n_embd, self.spec.n_head);
        let hs = c / nh;
        let heads = |m: Tensor| m.reshape((n, t, nh, hs))?.transpose(1, 2)?.contiguous();
        let h = format!("transformer.h.{i}");
        let qkv = self.linear(&self.layer_norm(&x, &format!("{h}.ln_1"))?, &format!("{h}.attn.c_attn"))?;
        let q = heads(qkv.narrow(1, 0, c)?)?;
        let k = heads(qkv.narrow(1, c, c)?)?;
        let v = heads(qkv.narrow(1, 2 * c, c)?)?;
        let att = crate::cpu::ops::causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (hs as f64).sqrt())?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((n * t, c))?;
        let x = (x + self.linear(&y, &format!("{h}.attn.c_proj"))?)?;
        let m = self.linear(&self.layer_norm(&x, &format!("{h}.ln_2"))?, &format!("{h}.mlp.c_fc"))?;
        x + self.linear(&self.gelu(&m)?, &format!("{h}.mlp.c_proj"))?
    }

    /// GELU in the spec's form.
    fn gelu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.spec.gelu {
            spec::Gelu::Erf => x.gelu_erf(),
            spec::Gelu::Tanh => x.gelu(),
        }
    }

    /// This piece's blocks on `input` of `n` windows of `t` positions: the residual
    /// stream after them, or after the head the logits `[n * t, vocab]`.
    fn run(&self, input: StageIn, n: usize, t: usize) -> candle_core::Result<Tensor> {
        let c = self.spec.n_embd;
        let mut x = match input {
            StageIn::Tokens(idx) => {
                let tok = self.p("transformer.wte.weight")?.index_select(&idx.flatten_all()?, 0)?;
                let pos = self.p("transformer.wpe.weight")?.narrow(0, 0, t)?;
                tok.reshape((n, t, c))?.broadcast_add(&pos)?.reshape((n * t, c))?
            }
            StageIn::Hidden(x) => x,
        };
        for b in self.piece.blocks.clone() {
            if (1..=self.spec.n_layer).contains(&b) {
                x = self.block(x, b - 1, n, t)?;
            }
        }
        if self.piece.blocks.end == self.spec.blocks() {
            let x = self.layer_norm(&x, "transformer.ln_f")?;
            let head = if self.spec.tie_embeddings { "transformer.wte.weight" } else { "lm_head.weight" };
            return x.matmul(&self.p(head)?.t()?);
        }
        Ok(x)
    }

    /// Logits `[n * t, vocab]` of the token ids `idx` (`[n, t]`, `t <= block_size`).
    fn logits(&self, idx: &Tensor) -> candle_core::Result<Tensor> {
        let (n, t) = idx.dims2()?;
        self.run(StageIn::Tokens(idx.clone()), n, t)
    }

    /// The windows of a batch, checked: `(windows, n, window)`.
    fn windows<'b>(&self, batch: &Batch<'b>, what: &str) -> Result<(&'b [u32], usize, usize)> {
        self.spec.windows(batch, what)
    }

    /// Inputs `[n, t]` and targets `[n * t]` of windows of `t + 1` tokens.
    fn inputs_targets(&self, windows: &[u32], n: usize, window: usize) -> Result<(Tensor, Tensor)> {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        let t = self.spec.split_windows(windows, window, &mut x, &mut y)?;
        let make = || -> candle_core::Result<(Tensor, Tensor)> {
            Ok((Tensor::from_vec(x, (n, t), &self.device)?, Tensor::from_vec(y, n * t, &self.device)?))
        };
        make().map_err(candle_err("building a batch"))
    }

    fn whole_only(&self, what: &str) -> Result<()> {
        if self.is_whole() {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "a piece of a gpt (blocks {:?}) {what} through the stage interface (a model-parallel strategy)",
                self.piece.blocks
            )))
        }
    }

    /// Keeps what segment `seg` of micro-batch `micro` needs for its backward; returns
    /// its output's values.
    fn save(&mut self, key: (u64, usize), saved: Saved) -> Result<Vec<f32>> {
        if self.saved.contains_key(&key) {
            return Err(Error::BadState(format!(
                "micro-batch {} segment {} ran forward twice without a backward",
                key.0, key.1
            )));
        }
        let values =
            saved.out.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(candle_err("stage forward"))?;
        self.saved_bytes += saved.bytes;
        self.saved.insert(key, saved);
        Ok(values)
    }

    fn tensor_parallel(&self) -> bool {
        self.piece.tensor_width > 1
    }

    /// `x @ w^T` without the bias: a row-parallel layer's partial output.
    fn matmul_weight(&self, x: &Tensor, name: &str) -> candle_core::Result<Tensor> {
        x.matmul(&self.p(&format!("{name}.weight"))?.t()?)
    }

    /// A tensor-parallel replicated segment: the residual stream `x` is the summed
    /// partial output `s`, plus the previous residual and a row-parallel layer's
    /// bias; then a LayerNorm, `ln_f` and the head, or `x` itself for the next stage.
    fn tensor_replicated(
        &self,
        bias: Option<&str>,
        then: &After,
        s: &Tensor,
        prev: Option<&Tensor>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let mut x = match prev {
            Some(p) => (s + p)?,
            None => s.clone(),
        };
        if let Some(b) = bias.and_then(|b| self.opt(b)) {
            x = x.broadcast_add(b)?;
        }
        let out = match then {
            After::Norm(name) => self.layer_norm(&x, name)?,
            After::Head => {
                let f = self.layer_norm(&x, "transformer.ln_f")?;
                let head = if self.spec.tie_embeddings { "transformer.wte.weight" } else { "lm_head.weight" };
                f.matmul(&self.p(head)?.t()?)?
            }
            After::Output => x.clone(),
        };
        Ok((x, out))
    }

    /// A tensor-parallel partial segment: this rank's heads of block `i`'s attention,
    /// or its slice of the block's MLP, up to the row-parallel `c_proj` without its
    /// bias.
    fn tensor_partial(&self, seg: &Segment, h: &Tensor, n: usize, t: usize) -> candle_core::Result<Tensor> {
        match *seg {
            Segment::Attention(i) => {
                let name = format!("transformer.h.{i}");
                let width = self.piece.tensor_width;
                let (c, nh) = (self.spec.n_embd / width, self.spec.n_head / width);
                let hs = c / nh;
                let heads = |m: Tensor| m.reshape((n, t, nh, hs))?.transpose(1, 2)?.contiguous();
                let qkv = self.linear(h, &format!("{name}.attn.c_attn"))?;
                let q = heads(qkv.narrow(1, 0, c)?)?;
                let k = heads(qkv.narrow(1, c, c)?)?;
                let v = heads(qkv.narrow(1, 2 * c, c)?)?;
                let att = crate::cpu::ops::causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (hs as f64).sqrt())?;
                let y = att.matmul(&v)?.transpose(1, 2)?.reshape((n * t, c))?;
                self.matmul_weight(&y, &format!("{name}.attn.c_proj"))
            }
            Segment::Mlp(i) => {
                let name = format!("transformer.h.{i}");
                let m = self.gelu(&self.linear(h, &format!("{name}.mlp.c_fc"))?)?;
                self.matmul_weight(&m, &format!("{name}.mlp.c_proj"))
            }
            _ => candle_core::bail!("segment {seg:?} is not a partial one"),
        }
    }

    /// Forward of tensor-parallel segment `seg` on `input` (`rows` windows of the
    /// residual stream or of a LayerNorm's output).
    fn tensor_forward(&mut self, micro: u64, seg: usize, input: &[f32], rows: usize) -> Result<Vec<f32>> {
        let c = self.spec.n_embd;
        let t = self.spec.stage_positions(&format!("segment {seg}"), input, rows)?;
        let bytes = self.bytes_per_window * rows as u64 / self.segs.len() as u64;
        let kind = self.segs[seg].clone();
        let saved = match &kind {
            Segment::Entry => {
                // The residual stream from the previous stage, the same on every rank,
                // emitted by rank 0 so the group's sum is it once.
                let run = || -> candle_core::Result<Saved> {
                    let x = Var::from_tensor(&Tensor::from_slice(input, (rows * t, c), &self.device)?)?;
                    let out = x.as_tensor().clone();
                    Ok(Saved { input: Some(x), prev: None, x: None, out, bytes })
                };
                let saved = run().map_err(candle_err("stage forward"))?;
                let values = self.save((micro, seg), saved)?;
                return Ok(if self.piece.tensor_rank == 0 { values } else { vec![0.0; values.len()] });
            }
            Segment::Replicated { bias, then } => {
                let prev = self.residual.remove(&micro);
                let run = || -> candle_core::Result<Saved> {
                    let s = Var::from_tensor(&Tensor::from_slice(input, (rows * t, c), &self.device)?)?;
                    let prev = prev.map(|p| Var::from_tensor(&p)).transpose()?;
                    let (x, out) = self.tensor_replicated(
                        bias.as_deref(),
                        then,
                        s.as_tensor(),
                        prev.as_ref().map(Var::as_tensor),
                    )?;
                    Ok(Saved { input: Some(s), prev, x: Some(x), out, bytes })
                };
                let saved = run().map_err(candle_err("stage forward"))?;
                if let (Some(x), false) = (&saved.x, matches!(then, After::Output | After::Head)) {
                    self.residual.insert(micro, x.detach());
                }
                saved
            }
            partial => {
                let run = || -> candle_core::Result<Saved> {
                    let h = Var::from_tensor(&Tensor::from_slice(input, (rows * t, c), &self.device)?)?;
                    let out = self.tensor_partial(partial, h.as_tensor(), rows, t)?;
                    Ok(Saved { input: Some(h), prev: None, x: None, out, bytes })
                };
                run().map_err(candle_err("stage forward"))?
            }
        };
        self.save((micro, seg), saved)
    }
}

/// Summed cross-entropy of `logits` `[rows, vocab]` against `targets` `[rows]`.
fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
    let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    log_probs.gather(&targets.unsqueeze(1)?, 1)?.sum_all()?.neg()
}

impl Model for Gpt {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn read_params(&self, out: &mut [f32]) -> Result<()> {
        read_vars(&self.layout, &self.vars, out)
    }

    fn write_params(&mut self, src: &[f32]) -> Result<()> {
        write_vars(&self.layout, &self.vars, src, &self.device)
    }

    fn forward_backward(&mut self, batch: &Batch<'_>, grads: &mut [f32]) -> Result<f32> {
        self.whole_only("trains")?;
        let (windows, n, window) = self.windows(batch, "trains on")?;
        if grads.len() != self.layout.total() {
            return Err(Error::invalid(format!(
                "{} gradient slots for {} parameters",
                grads.len(),
                self.layout.total()
            )));
        }
        if n == 0 {
            grads.fill(0.0);
            return Ok(0.0);
        }
        let (x, y) = self.inputs_targets(windows, n, window)?;
        let predictions = (n * (window - 1)) as f64;
        let mut run = || -> candle_core::Result<f32> {
            let loss = cross_entropy_sum(&self.logits(&x)?, &y)?.affine(1.0 / predictions, 0.0)?;
            let store = loss.backward()?;
            for (i, v) in self.vars.iter().enumerate() {
                let range = self.layout.range(i);
                match store.get(v.as_tensor()) {
                    Some(g) => grads[range].copy_from_slice(&g.flatten_all()?.to_vec1::<f32>()?),
                    // Position embeddings past the windows' length take no part.
                    None => grads[range].fill(0.0),
                }
            }
            loss.to_dtype(DType::F32)?.to_scalar::<f32>()
        };
        run().map_err(candle_err("gpt forward/backward"))
    }

    fn evaluate(&mut self, batch: &Batch<'_>) -> Result<(f64, usize)> {
        self.whole_only("evaluates")?;
        let (windows, _, window) = self.windows(batch, "evaluates")?;
        let (mut loss, mut correct) = (0f64, 0usize);
        for chunk in windows.chunks(EVAL_CHUNK * window) {
            let rows = chunk.len() / window;
            let (x, y) = self.inputs_targets(chunk, rows, window)?;
            let run = || -> candle_core::Result<(f64, usize)> {
                let logits = self.logits(&x)?.detach();
                let sum = cross_entropy_sum(&logits, &y)?.to_scalar::<f32>()?;
                let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
                let targets = y.to_vec1::<u32>()?;
                Ok((f64::from(sum), predicted.iter().zip(&targets).filter(|(p, t)| p == t).count()))
            };
            let (l, c) = run().map_err(candle_err("gpt evaluate"))?;
            loss += l;
            correct += c;
        }
        Ok((loss, correct))
    }

    fn predict(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
        self.whole_only("predicts")?;
        let (windows, n, window) = self.windows(batch, "predicts from")?;
        if n == 0 {
            // candle panics on an empty gather.
            return Ok(Vec::new());
        }
        // The context is the last block_size tokens of each window, as nanoGPT crops.
        let t = window.min(self.spec.block_size);
        let ctx: Vec<u32> =
            windows.chunks_exact(window).flat_map(|w| w[window - t..].iter().copied()).collect();
        let run = || -> candle_core::Result<Vec<f32>> {
            let x = Tensor::from_vec(ctx, (n, t), &self.device)?;
            let logits = self.logits(&x)?.reshape((n, t, self.spec.vocab_size))?;
            logits.narrow(1, t - 1, 1)?.flatten_all()?.to_vec1::<f32>()
        };
        run().map_err(candle_err("gpt predict"))
    }

    fn piece(&self) -> Option<Piece> {
        Some(self.piece.clone())
    }

    fn stage_forward_batch(&mut self, micro: u64, segment: usize, batch: &Batch<'_>) -> Result<Vec<f32>> {
        if segment != 0 || self.piece.blocks.start != 0 {
            return Err(Error::invalid(format!(
                "only the stage holding the embeddings takes token windows (this one holds blocks {:?}, segment {segment})",
                self.piece.blocks
            )));
        }
        let (windows, n, window) = self.windows(batch, "takes")?;
        let (x, _) = self.inputs_targets(windows, n, window)?;
        let bytes = self.bytes_per_window * n as u64;
        if self.tensor_parallel() {
            // The embeddings, computed on every rank (so every rank's embedding
            // gradient is whole) but emitted by rank 0 only: the strategy sums this
            // segment's output over the group.
            let (c, t) = (self.spec.n_embd, window - 1);
            let run = || -> candle_core::Result<Tensor> {
                let tok = self.p("transformer.wte.weight")?.index_select(&x.flatten_all()?, 0)?;
                let pos = self.p("transformer.wpe.weight")?.narrow(0, 0, t)?;
                tok.reshape((n, t, c))?.broadcast_add(&pos)?.reshape((n * t, c))
            };
            let out = run().map_err(candle_err("stage forward"))?;
            let bytes = bytes / self.segs.len() as u64;
            let values = self.save((micro, 0), Saved { input: None, prev: None, x: None, out, bytes })?;
            return Ok(if self.piece.tensor_rank == 0 { values } else { vec![0.0; values.len()] });
        }
        let out = self.run(StageIn::Tokens(x), n, window - 1).map_err(candle_err("stage forward"))?;
        self.save((micro, 0), Saved { input: None, prev: None, x: None, out, bytes })
    }

    fn stage_forward(&mut self, micro: u64, segment: usize, input: &[f32], rows: usize) -> Result<Vec<f32>> {
        let c = self.spec.n_embd;
        if self.tensor_parallel()
            && segment < self.segments()
            && !(segment == 0 && self.piece.blocks.start == 0)
        {
            return self.tensor_forward(micro, segment, input, rows);
        }
        if segment != 0 || self.piece.blocks.start == 0 {
            return Err(Error::invalid(format!(
                "a gpt stage holding blocks {:?} takes {} (segment {segment})",
                self.piece.blocks,
                if self.piece.blocks.start == 0 { "token windows" } else { "the residual stream" }
            )));
        }
        let t = self.spec.stage_positions("stage", input, rows)?;
        let run = || -> candle_core::Result<(Var, Tensor)> {
            let x = Var::from_tensor(&Tensor::from_slice(input, (rows * t, c), &self.device)?)?;
            let out = self.run(StageIn::Hidden(x.as_tensor().clone()), rows, t)?;
            Ok((x, out))
        };
        let (x, out) = run().map_err(candle_err("stage forward"))?;
        let bytes = self.bytes_per_window * rows as u64;
        self.save((micro, 0), Saved { input: Some(x), prev: None, x: None, out, bytes })
    }

    fn segments(&self) -> usize {
        self.segs.len().max(1)
    }

    fn stage_backward(&mut self, micro: u64, segment: usize, grad_output: &[f32]) -> Result<Vec<f32>> {
        let saved = self.saved.remove(&(micro, segment)).ok_or_else(|| {
            Error::BadState(format!(
                "backward of micro-batch {micro} segment {segment}, which ran no forward"
            ))
        })?;
        self.saved_bytes -= saved.bytes;
        let out = &saved.out;
        if grad_output.len() != out.elem_count() {
            return Err(Error::invalid(format!(
                "gradient of {} values for an output of {}",
                grad_output.len(),
                out.elem_count()
            )));
        }
        let residual_grad = self.residual_grad.remove(&(micro, segment));
        let mut run = || -> candle_core::Result<(Vec<f32>, Option<Tensor>)> {
            let g = Tensor::from_slice(grad_output, out.shape(), &self.device)?;
            // d(sum(out * g))/dθ = J^T g: the vector-Jacobian product backward needs;
            // the residual stream's gradient from a later segment joins it.
            let mut root = (out * &g)?.sum_all()?;
            if let (Some(x), Some(gr)) = (&saved.x, &residual_grad) {
                root = (root + (x * gr)?.sum_all()?)?;
            }
            let store = root.backward()?;
            add_var_grads(&self.layout, &self.vars, &store, &mut self.grads)?;
            let prev_grad = saved.prev.as_ref().and_then(|p| store.get(p.as_tensor())).cloned();
            let input_grad = match saved.input.as_ref() {
                Some(x) => match store.get(x.as_tensor()) {
                    Some(gx) => gx.flatten_all()?.to_vec1::<f32>()?,
                    None => vec![0.0; x.as_tensor().elem_count()],
                },
                None => Vec::new(),
            };
            Ok((input_grad, prev_grad))
        };
        let (input_grad, prev_grad) = run().map_err(candle_err("stage backward"))?;
        if let Some(pg) = prev_grad {
            // The previous replicated segment's residual stream, two segments back.
            self.residual_grad.insert((micro, segment - 2), pg);
        }
        Ok(input_grad)
    }

    fn loss_grad(&mut self, logits: &[f32], labels: &[u32], scale: f32) -> Result<(f64, usize, Vec<f32>)> {
        let (v, rows) = (self.spec.vocab_size, labels.len());
        self.spec.check_logits(logits, labels)?;
        if rows == 0 {
            return Ok((0.0, 0, Vec::new()));
        }
        let run = || -> candle_core::Result<(f64, usize, Vec<f32>)> {
            let z = Var::from_tensor(&Tensor::from_slice(logits, (rows, v), &self.device)?)?;
            let y = Tensor::from_slice(labels, rows, &self.device)?;
            loss_sum_correct_grad(&z, &cross_entropy_sum(z.as_tensor(), &y)?, labels, scale)
        };
        run().map_err(candle_err("loss"))
    }

    fn take_grads(&mut self, out: &mut [f32]) -> Result<()> {
        take_accumulated(&mut self.grads, out)
    }

    fn drop_saved(&mut self) {
        self.saved.clear();
        self.residual.clear();
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
