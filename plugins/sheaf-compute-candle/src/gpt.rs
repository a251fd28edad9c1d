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
use serde::Deserialize;
use sheaf_core::{
    Batch, Block, Error, Model, ModelInfo, ModelInput, ModelSpec, ParamLayout, ParamSpec, Piece, PieceLayout,
    Result, SplitMix64,
};

use crate::{candle_err, read_vars, vars_from, write_vars};

/// `[model]` of kind `gpt`, as the job gives it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct GptConfig {
    n_layer: usize,
    n_head: usize,
    n_embd: usize,
    block_size: usize,
    #[serde(default)]
    vocab_size: Option<usize>,
    #[serde(default = "yes")]
    bias: bool,
    #[serde(default = "yes")]
    tie_embeddings: bool,
}

fn yes() -> bool {
    true
}

/// A GPT's shape, checked, with its vocabulary size resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GptSpec {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub vocab_size: usize,
    pub bias: bool,
    pub tie_embeddings: bool,
}

/// How a parameter starts.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    Normal(f32),
    Zeros,
    Ones,
}

impl GptSpec {
    pub fn parse(spec: &ModelSpec) -> Result<GptSpec> {
        let c: GptConfig = crate::parse_config("gpt", &spec.config)?;
        let vocab_size = match (c.vocab_size, spec.vocab_size) {
            (Some(v), Some(data)) if v < data => {
                return Err(Error::config(
                    "model.vocab_size",
                    format!("{v}, but the dataset's vocabulary has {data} tokens"),
                ))
            }
            (Some(v), _) => v,
            (None, Some(data)) => data,
            (None, None) => {
                return Err(Error::config(
                    "model.vocab_size",
                    "required: the dataset has no vocabulary of its own (a .bin file of token ids has none; rows of features are not tokens)",
                ))
            }
        };
        for (key, v) in [
            ("n_layer", c.n_layer),
            ("n_head", c.n_head),
            ("n_embd", c.n_embd),
            ("block_size", c.block_size),
            ("vocab_size", vocab_size),
        ] {
            if v == 0 {
                return Err(Error::config(format!("model.{key}"), "must be at least 1"));
            }
        }
        if !c.n_embd.is_multiple_of(c.n_head) {
            return Err(Error::config(
                "model.n_embd",
                format!("{} is not divisible by n_head = {}", c.n_embd, c.n_head),
            ));
        }
        Ok(GptSpec {
            n_layer: c.n_layer,
            n_head: c.n_head,
            n_embd: c.n_embd,
            block_size: c.block_size,
            vocab_size,
            bias: c.bias,
            tie_embeddings: c.tie_embeddings,
        })
    }

    /// Every parameter with its initialisation, in nanoGPT's state-dict order.
    fn params(&self) -> Vec<(ParamSpec, Init)> {
        let (c, v) = (self.n_embd, self.vocab_size);
        let std = Init::Normal(0.02);
        let proj = Init::Normal(0.02 / (2.0 * self.n_layer as f32).sqrt());
        let p = |name: String, shape: Vec<usize>, init| (ParamSpec { name, shape }, init);
        let mut out = vec![
            p("transformer.wte.weight".into(), vec![v, c], std),
            p("transformer.wpe.weight".into(), vec![self.block_size, c], std),
        ];
        let linear = |out: &mut Vec<_>, name: String, rows: usize, cols: usize, init| {
            out.push(p(format!("{name}.weight"), vec![rows, cols], init));
            if self.bias {
                out.push(p(format!("{name}.bias"), vec![rows], Init::Zeros));
            }
        };
        let norm = |out: &mut Vec<_>, name: String| {
            out.push(p(format!("{name}.weight"), vec![c], Init::Ones));
            if self.bias {
                out.push(p(format!("{name}.bias"), vec![c], Init::Zeros));
            }
        };
        for i in 0..self.n_layer {
            let h = format!("transformer.h.{i}");
            norm(&mut out, format!("{h}.ln_1"));
            linear(&mut out, format!("{h}.attn.c_attn"), 3 * c, c, std);
            linear(&mut out, format!("{h}.attn.c_proj"), c, c, proj);
            norm(&mut out, format!("{h}.ln_2"));
            linear(&mut out, format!("{h}.mlp.c_fc"), 4 * c, c, std);
            linear(&mut out, format!("{h}.mlp.c_proj"), c, 4 * c, proj);
        }
        norm(&mut out, "transformer.ln_f".into());
        if !self.tie_embeddings {
            out.push(p("lm_head.weight".into(), vec![v, c], std));
        }
        out
    }

    pub fn layout(&self) -> ParamLayout {
        ParamLayout::new(self.params().into_iter().map(|(s, _)| s).collect())
    }

    /// Blocks: the embeddings, each transformer block, then the final LayerNorm and
    /// the head.
    pub fn info(&self) -> ModelInfo {
        let layout = self.layout();
        let mut blocks: Vec<Block> = Vec::with_capacity(self.n_layer + 2);
        let block_of = |name: &str| -> String {
            if name.starts_with("transformer.wte") || name.starts_with("transformer.wpe") {
                "embeddings".into()
            } else if let Some(rest) = name.strip_prefix("transformer.h.") {
                format!("h.{}", rest.split('.').next().unwrap_or_default())
            } else {
                "head".into()
            }
        };
        for s in layout.specs() {
            let name = block_of(&s.name);
            match blocks.last_mut() {
                Some(b) if b.name == name => b.params += s.numel() as u64,
                _ => blocks.push(Block { name, params: s.numel() as u64 }),
            }
        }
        ModelInfo {
            layout,
            blocks,
            input: ModelInput::Tokens { vocab_size: self.vocab_size, block_size: self.block_size },
        }
    }

    /// Bytes one window keeps from the forward pass for the backward pass (an
    /// estimate of what autograd holds: per token and layer about 17 activations of
    /// `n_embd` and two attention rows, plus the logits and their softmax).
    pub fn activation_bytes_per_window(&self) -> u64 {
        let (t, c) = (self.block_size as u64, self.n_embd as u64);
        let per_token =
            self.n_layer as u64 * (17 * c + 2 * self.n_head as u64 * t) + 2 * self.vocab_size as u64 + 2 * c;
        4 * t * per_token
    }

    pub fn piece_layout(&self, piece: &Piece) -> Result<PieceLayout> {
        let blocks = self.n_layer + 2;
        piece.validate(blocks)?;
        if *piece != Piece::whole(blocks) {
            return Err(Error::Unsupported(
                "gpt models train whole (data-parallel) in this version; pipeline stages and tensor-parallel slices of a gpt are not built yet".into(),
            ));
        }
        Ok(PieceLayout::whole(&self.layout(), self.activation_bytes_per_window()))
    }
}

const INIT_STREAM: u64 = 0x6A09_E667_F3BC_C908;

/// The initial values of `spec`'s parameters from `seed`. Parameter `p`'s value `j`
/// is a Box-Muller normal from draws `2j` and `2j + 1` of the stream of `(seed, p)`,
/// so any slice of a parameter can be drawn without the rest.
pub fn init_params(spec: &GptSpec, seed: u64) -> Vec<f32> {
    let params = spec.params();
    let mut out = Vec::with_capacity(params.iter().map(|(s, _)| s.numel()).sum());
    for (p, (s, init)) in params.iter().enumerate() {
        match *init {
            Init::Zeros => out.extend(std::iter::repeat_n(0.0, s.numel())),
            Init::Ones => out.extend(std::iter::repeat_n(1.0, s.numel())),
            Init::Normal(std) => {
                let mut rng =
                    SplitMix64::new(seed ^ INIT_STREAM ^ (p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                for _ in 0..s.numel() {
                    out.push(std * normal(&mut rng));
                }
            }
        }
    }
    out
}

/// One standard normal from two uniform draws (Box-Muller).
fn normal(rng: &mut SplitMix64) -> f32 {
    let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// A whole GPT held as candle `Var`s in layout order.
pub struct Gpt {
    spec: GptSpec,
    layout: ParamLayout,
    vars: Vec<Var>,
    index: HashMap<String, usize>,
    device: Device,
}

/// Windows evaluated at once by `evaluate`, bounding its memory.
const EVAL_CHUNK: usize = 32;

impl Gpt {
    pub fn new(spec: &GptSpec, seed: u64, device: Device) -> Result<Gpt> {
        let layout = spec.layout();
        let vars = vars_from(&layout, &init_params(spec, seed), &device)?;
        let index = layout.specs().iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        Ok(Gpt { spec: spec.clone(), layout, vars, index, device })
    }

    fn p(&self, name: &str) -> candle_core::Result<&Tensor> {
        match self.index.get(name) {
            Some(&i) => Ok(self.vars[i].as_tensor()),
            None => candle_core::bail!("no parameter `{name}`"),
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
        let y = crate::ops::normalize(x, 1e-5)?.broadcast_mul(self.p(&format!("{name}.weight"))?)?;
        match self.opt(&format!("{name}.bias")) {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Logits `[n * t, vocab]` of the token ids `idx` (`[n, t]`, `t <= block_size`).
    fn logits(&self, idx: &Tensor) -> candle_core::Result<Tensor> {
        let (n, t) = idx.dims2()?;
        let (c, nh) = (self.spec.n_embd, self.spec.n_head);
        let hs = c / nh;
        let tok = self.p("transformer.wte.weight")?.index_select(&idx.flatten_all()?, 0)?;
        let pos = self.p("transformer.wpe.weight")?.narrow(0, 0, t)?;
        let mut x = tok.reshape((n, t, c))?.broadcast_add(&pos)?.reshape((n * t, c))?;
        let scale = 1.0 / (hs as f64).sqrt();
        let heads = |m: Tensor| m.reshape((n, t, nh, hs))?.transpose(1, 2)?.contiguous();
        for i in 0..self.spec.n_layer {
            let h = format!("transformer.h.{i}");
            let qkv =
                self.linear(&self.layer_norm(&x, &format!("{h}.ln_1"))?, &format!("{h}.attn.c_attn"))?;
            let q = heads(qkv.narrow(1, 0, c)?)?;
            let k = heads(qkv.narrow(1, c, c)?)?;
            let v = heads(qkv.narrow(1, 2 * c, c)?)?;
            let att = crate::ops::causal_softmax(&q.matmul(&k.t()?)?, scale)?;
            let y = att.matmul(&v)?.transpose(1, 2)?.reshape((n * t, c))?;
            x = (x + self.linear(&y, &format!("{h}.attn.c_proj"))?)?;
            let m = self.linear(&self.layer_norm(&x, &format!("{h}.ln_2"))?, &format!("{h}.mlp.c_fc"))?;
            x = (x + self.linear(&m.gelu_erf()?, &format!("{h}.mlp.c_proj"))?)?;
        }
        let x = self.layer_norm(&x, "transformer.ln_f")?;
        let head = if self.spec.tie_embeddings {
            self.p("transformer.wte.weight")?
        } else {
            self.p("lm_head.weight")?
        };
        x.matmul(&head.t()?)
    }

    /// The windows of a batch, checked: `(windows, n, window)`.
    fn windows<'b>(&self, batch: &Batch<'b>, what: &str) -> Result<(&'b [u32], usize, usize)> {
        let Batch::Tokens { windows, window } = *batch else {
            return Err(Error::invalid(format!("a gpt {what} token windows, not rows of features")));
        };
        if window == 0 || !windows.len().is_multiple_of(window) {
            return Err(Error::invalid(format!(
                "{} tokens are not whole windows of {window}",
                windows.len()
            )));
        }
        if let Some((at, &bad)) =
            windows.iter().enumerate().find(|(_, &t)| t as usize >= self.spec.vocab_size)
        {
            return Err(Error::invalid(format!(
                "token id {bad} (at {at} in the batch) is not below vocab_size {}",
                self.spec.vocab_size
            )));
        }
        Ok((windows, windows.len() / window, window))
    }

    /// Inputs `[n, t]` and targets `[n * t]` of windows of `t + 1` tokens.
    fn inputs_targets(&self, windows: &[u32], n: usize, window: usize) -> Result<(Tensor, Tensor)> {
        let t = window - 1;
        if t == 0 || t > self.spec.block_size {
            return Err(Error::invalid(format!(
                "windows of {window} tokens: a gpt with block_size {} trains on 2 to {} tokens per window",
                self.spec.block_size,
                self.spec.block_size + 1
            )));
        }
        let mut x = Vec::with_capacity(n * t);
        let mut y = Vec::with_capacity(n * t);
        for w in windows.chunks_exact(window) {
            x.extend_from_slice(&w[..t]);
            y.extend_from_slice(&w[1..]);
        }
        let make = || -> candle_core::Result<(Tensor, Tensor)> {
            Ok((Tensor::from_vec(x, (n, t), &self.device)?, Tensor::from_vec(y, n * t, &self.device)?))
        };
        make().map_err(candle_err("building a batch"))
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
        let (windows, n, window) = self.windows(batch, "evaluates")?;
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
        debug_assert!(n == 0 || loss.is_finite() || loss.is_nan());
        Ok((loss, correct))
    }

    fn predict(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
        let (windows, n, window) = self.windows(batch, "predicts from")?;
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
}
