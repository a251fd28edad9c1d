//! The GPT's settings (`[model]` of kind `gpt`), its parameters' names, shapes and
//! places in the flat buffer, the pieces a pipeline or tensor-parallel group cuts it
//! into, and its initialisation: what the fused CPU model and candle's graph share.

use serde::Deserialize;
use sheaf_core::{
    chunk_range, Batch, Block, Error, ModelInfo, ModelInput, ModelSpec, ParamLayout, ParamSpec, Piece,
    PieceLayout, Result, ShardSource, SplitMix64,
};

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
    /// GELU's form: `erf` (exact, nanoGPT's and PyTorch's default) or `tanh` (GPT-2's
    /// approximation, transformers' `gelu_new`).
    #[serde(default)]
    gelu: Gelu,
    /// Which blocks keep only their input in the forward pass and run it again in the
    /// backward pass: every `N`-th (1: all). The host passes `train.activation_checkpointing` here.
    #[serde(default)]
    activation_checkpointing: Option<usize>,
}

fn yes() -> bool {
    true
}

/// GELU as `erf` or as GPT-2's `tanh` approximation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gelu {
    #[default]
    Erf,
    Tanh,
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
    pub gelu: Gelu,
    /// Blocks `l` with `l % recompute_every == 0` recompute their activations in the
    /// backward pass (0: none do).
    pub recompute_every: usize,
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
            gelu: c.gelu,
            recompute_every: match c.activation_checkpointing {
                Some(0) => {
                    return Err(Error::config(
                        "train.activation_checkpointing",
                        "every 0th block: use \"none\"",
                    ))
                }
                n => n.unwrap_or(0),
            },
        })
    }

    /// Whether transformer block `l` keeps only its input and recomputes the rest in
    /// the backward pass.
    pub fn recomputes(&self, l: usize) -> bool {
        self.recompute_every > 0 && l.is_multiple_of(self.recompute_every)
    }

    /// Bytes one window keeps from the fused CPU forward pass for its backward pass,
    /// and the pass's scratch: per token, each block's input, and of every block that
    /// does not recompute its LayerNorms' statistics, q, k and v, the heads' outputs,
    /// the residual after the attention, the MLP's hidden layer before GELU and a row
    /// of attention probabilities per head; one more block's worth when any block
    /// recomputes; the final LayerNorm, the logits and their gradient; one LayerNorm's
    /// output and GELU's (recomputed in the backward pass), and the gradients of the
    /// widest layers in flight.
    pub fn fused_activation_bytes(&self) -> u64 {
        let (t, c, v) = (self.block_size as u64, self.n_embd as u64, self.vocab_size as u64);
        let block = 9 * c + self.n_head as u64 * t + 4;
        let kept = (0..self.n_layer).filter(|&l| !self.recomputes(l)).count() as u64;
        let scratch = u64::from(kept < self.n_layer as u64);
        4 * t * ((self.n_layer as u64 + 1) * c + (kept + scratch) * block + c + 2 + 2 * v + 15 * c)
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

    /// The windows of a batch, checked against the model: `(windows, n, window)`.
    pub(crate) fn windows<'b>(&self, batch: &Batch<'b>, what: &str) -> Result<(&'b [u32], usize, usize)> {
        let Batch::Tokens { windows, window } = *batch else {
            return Err(Error::invalid(format!("a gpt {what} token windows, not rows of features")));
        };
        if window == 0 || !windows.len().is_multiple_of(window) {
            return Err(Error::invalid(format!(
                "{} tokens are not whole windows of {window}",
                windows.len()
            )));
        }
        if let Some((at, &bad)) = windows.iter().enumerate().find(|(_, &t)| t as usize >= self.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {bad} (at {at} in the batch) is not below vocab_size {}",
                self.vocab_size
            )));
        }
        Ok((windows, windows.len() / window, window))
    }

    /// Splits windows of `window` tokens into inputs (the first `window - 1` of each)
    /// and targets (the last `window - 1`), replacing `x` and `y`; returns the
    /// positions per window, `window - 1`, which must be 1 to `block_size`.
    pub(crate) fn split_windows(
        &self,
        windows: &[u32],
        window: usize,
        x: &mut Vec<u32>,
        y: &mut Vec<u32>,
    ) -> Result<usize> {
        let t = window.saturating_sub(1);
        if t == 0 || t > self.block_size {
            return Err(Error::invalid(format!(
                "windows of {window} tokens: a gpt with block_size {} trains on 2 to {} tokens per window",
                self.block_size,
                self.block_size + 1
            )));
        }
        x.clear();
        y.clear();
        for w in windows.chunks_exact(window) {
            x.extend_from_slice(&w[..t]);
            y.extend_from_slice(&w[1..]);
        }
        Ok(t)
    }

    /// The transformer layers among blocks `blocks` (block `l + 1` is layer `l`).
    pub(crate) fn layers_in(&self, blocks: &std::ops::Range<usize>) -> std::ops::Range<usize> {
        blocks.start.max(1) - 1..blocks.end.min(self.n_layer + 1).saturating_sub(1)
    }

    /// Checks a stage's `input` of `rows` windows of the residual stream (or of a
    /// LayerNorm's output): returns their positions per window.
    pub(crate) fn stage_positions(&self, what: &str, input: &[f32], rows: usize) -> Result<usize> {
        let c = self.n_embd;
        let t = input.len().checked_div(rows * c).unwrap_or(0);
        if rows == 0 || t == 0 || t > self.block_size || input.len() != rows * t * c {
            return Err(Error::invalid(format!(
                "{what} input of {} values is not {rows} windows of up to {} positions of {c}",
                input.len(),
                self.block_size
            )));
        }
        Ok(t)
    }

    /// Checks `logits` against `labels` for the loss.
    pub(crate) fn check_logits(&self, logits: &[f32], labels: &[u32]) -> Result<()> {
        let (v, rows) = (self.vocab_size, labels.len());
        if logits.len() != rows * v {
            return Err(Error::invalid(format!("{} logits for {rows} targets of {v} tokens", logits.len())));
        }
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= v) {
            return Err(Error::invalid(format!("target token {bad} is not below vocab_size {v}")));
        }
        Ok(())
    }

    /// What piece `piece` (laid out as `pl`) shares with others: `(index here, index in
    /// the whole model)` of a tied head's token embedding, held twice when the stage
    /// with the embeddings is not the stage with the head; and per parameter, whether
    /// every rank of its tensor-parallel group holds it whole.
    pub(crate) fn sharing(&self, piece: &Piece, pl: &PieceLayout) -> (Vec<(usize, usize)>, Vec<bool>) {
        let head = self.blocks() - 1;
        let split = self.tie_embeddings && !(piece.blocks.start == 0 && piece.blocks.end > head);
        let holds = pl.sources.first().is_some_and(|s| s.param == WTE);
        let tied = if split && holds { vec![(0, WTE)] } else { Vec::new() };
        let whole = self.layout();
        let replicated = pl
            .sources
            .iter()
            .map(|s| {
                piece.tensor_width > 1 && *s == ShardSource::whole(s.param, whole.specs()[s.param].shape[0])
            })
            .collect();
        (tied, replicated)
    }

    /// Blocks: 0 the embeddings, `1..=n_layer` the transformer blocks, `n_layer + 1`
    /// the final LayerNorm and the head.
    pub(crate) fn blocks(&self) -> usize {
        self.n_layer + 2
    }

    /// The block a parameter belongs to.
    pub(crate) fn block_of(&self, name: &str) -> usize {
        if name.starts_with("transformer.wte") || name.starts_with("transformer.wpe") {
            0
        } else if let Some(rest) = name.strip_prefix("transformer.h.") {
            1 + rest.split('.').next().and_then(|i| i.parse::<usize>().ok()).unwrap_or_default()
        } else {
            self.n_layer + 1
        }
    }

    pub fn info(&self) -> ModelInfo {
        let layout = self.layout();
        let mut blocks: Vec<Block> = (0..self.blocks())
            .map(|b| Block {
                name: match b {
                    0 => "embeddings".into(),
                    b if b <= self.n_layer => format!("h.{}", b - 1),
                    _ => "head".into(),
                },
                params: 0,
            })
            .collect();
        for s in layout.specs() {
            blocks[self.block_of(&s.name)].params += s.numel() as u64;
        }
        ModelInfo {
            layout,
            blocks,
            input: ModelInput::Tokens { vocab_size: self.vocab_size, block_size: self.block_size },
        }
    }

    /// Bytes one window keeps from the fused CPU forward pass of a piece (a pipeline
    /// stage, a tensor-parallel slice) for its backward pass: per token and held block
    /// its input, and unless it recomputes, its
    /// activations (under tensor parallelism the replicated streams and LayerNorm
    /// inputs whole, this rank's share of the rest); on the first stage the tokens; on
    /// the last the stream into the final LayerNorm, its output, the logits and their
    /// gradient. (The backward pass's scratch, and a recomputing block's, is one
    /// micro-batch's, not one per window in flight: left out.)
    fn fused_piece_activation_bytes(&self, piece: &Piece) -> u64 {
        let (t, c, v, w) =
            (self.block_size as u64, self.n_embd as u64, self.vocab_size as u64, piece.tensor_width as u64);
        let nh = self.n_head as u64;
        let layers = self.layers_in(&piece.blocks);
        let held = layers.len() as u64;
        let kept = layers.clone().filter(|&l| !self.recomputes(l)).count() as u64;
        let (whole, sliced) = if w > 1 {
            // Two streams and two LayerNorm outputs with their statistics; q, k, v, the
            // heads' outputs, the MLP's hidden layer before GELU, and the probabilities.
            (4 * c + 4, (8 * c + nh * t) / w)
        } else {
            (c, 9 * c + nh * t + 4)
        };
        let first = u64::from(piece.blocks.start == 0);
        let last = if piece.blocks.end == self.blocks() { 2 * c + 2 + 2 * v } else { 0 };
        4 * t * (held * whole + kept * sliced + first + last)
    }

    /// A pipeline stage's parameters: those of its blocks, and on a last stage that
    /// does not hold the embeddings, the tied token embedding it uses as its head
    /// (the one parameter two pieces share).
    /// A piece's parameters: those of its blocks (on a last pipeline stage that does
    /// not hold the embeddings, also the tied token embedding it uses as its head: the
    /// one parameter two pieces share), each whole or, under tensor parallelism,
    /// sliced Megatron's way: the heads split across ranks (`c_attn` by rows of q, k
    /// and v for this rank's heads, the attention `c_proj` by the matching columns),
    /// `c_fc` by rows and the MLP `c_proj` by columns; everything else (embeddings,
    /// LayerNorms, the row-parallel layers' biases) whole on every rank.
    pub fn piece_layout(&self, piece: &Piece) -> Result<PieceLayout> {
        piece.validate(self.blocks())?;
        let whole_model = *piece == Piece::whole(self.blocks());
        let (t, width) = (piece.tensor_rank, piece.tensor_width);
        if !self.n_head.is_multiple_of(width) {
            return Err(Error::config(
                "parallel.options.tensor-parallel.width",
                format!("a tensor-parallel width of {width} does not divide n_head = {}", self.n_head),
            ));
        }
        let c = self.n_embd;
        let mine = |len: usize| chunk_range(len, width, t);
        let whole = self.layout();
        let tied_head = self.tie_embeddings && piece.blocks.end == self.blocks() && piece.blocks.start > 0;
        let mut specs = Vec::new();
        let mut sources = Vec::new();
        for (i, s) in whole.specs().iter().enumerate() {
            if !(piece.blocks.contains(&self.block_of(&s.name)) || (tied_head && i == WTE)) {
                continue;
            }
            let name = s.name.as_str();
            let sliced = width > 1;
            let (shape, source) =
                if sliced && (name.ends_with("attn.c_attn.weight") || name.ends_with("attn.c_attn.bias")) {
                    let r = mine(c);
                    let ranges = vec![r.clone(), c + r.start..c + r.end, 2 * c + r.start..2 * c + r.end];
                    let mut shape = s.shape.clone();
                    shape[0] = 3 * r.len();
                    (shape, ShardSource { param: i, by_columns: false, ranges })
                } else if sliced && (name.ends_with("mlp.c_fc.weight") || name.ends_with("mlp.c_fc.bias")) {
                    let r = mine(4 * c);
                    let mut shape = s.shape.clone();
                    shape[0] = r.len();
                    (shape, ShardSource { param: i, by_columns: false, ranges: vec![r] })
                } else if sliced && name.ends_with("c_proj.weight") {
                    let r = mine(s.shape[1]);
                    (vec![s.shape[0], r.len()], ShardSource { param: i, by_columns: true, ranges: vec![r] })
                } else {
                    (s.shape.clone(), ShardSource::whole(i, s.shape[0]))
                };
            specs.push(ParamSpec { name: s.name.clone(), shape });
            sources.push(source);
        }
        Ok(PieceLayout {
            layout: ParamLayout::new(specs),
            sources,
            // As the CPU's fused models keep them (candle's graph, on a GPU, keeps more).
            activation_bytes_per_sample: if whole_model {
                self.fused_activation_bytes()
            } else {
                self.fused_piece_activation_bytes(piece)
            },
        })
    }

    /// The segments of a tensor-parallel piece of blocks `blocks`: its entry (the
    /// embeddings, or the residual stream from the previous stage), then per
    /// transformer block the replicated residual add and `ln_1`, the attention's
    /// partial sum, the residual add and `ln_2`, the MLP's partial sum, and last the
    /// residual add and, on the last stage, the head.
    pub(crate) fn tensor_segments(&self, blocks: &std::ops::Range<usize>) -> Vec<Segment> {
        let layers = self.layers_in(blocks);
        let mut segs = vec![Segment::Entry];
        let mut pending = None;
        for i in layers {
            let h = format!("transformer.h.{i}");
            segs.push(Segment::Replicated { bias: pending.take(), then: After::Norm(format!("{h}.ln_1")) });
            segs.push(Segment::Attention(i));
            segs.push(Segment::Replicated {
                bias: Some(format!("{h}.attn.c_proj.bias")),
                then: After::Norm(format!("{h}.ln_2")),
            });
            segs.push(Segment::Mlp(i));
            pending = Some(format!("{h}.mlp.c_proj.bias"));
        }
        let then = if blocks.end == self.blocks() { After::Head } else { After::Output };
        segs.push(Segment::Replicated { bias: pending, then });
        segs
    }
}

/// One segment of a tensor-parallel GPT piece. Even positions end in a partial sum
/// the strategy sums over the group; odd ones are replicated.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Segment {
    /// The embeddings (computed on every rank, emitted by rank 0), or on a later
    /// pipeline stage the residual stream it receives (likewise).
    Entry,
    /// The residual stream: the summed partial output, plus the previous residual and
    /// a row-parallel layer's bias; then what follows.
    Replicated { bias: Option<String>, then: After },
    /// This rank's heads of block `i`'s attention, up to the row-parallel `c_proj`.
    Attention(usize),
    /// This rank's slice of block `i`'s MLP, up to the row-parallel `c_proj`.
    Mlp(usize),
}

/// What a replicated segment does with the residual stream.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum After {
    Norm(String),
    Head,
    /// Hands it to the next pipeline stage.
    Output,
}

const INIT_STREAM: u64 = 0x6A09_E667_F3BC_C908;

/// `transformer.wte.weight`'s index in the whole layout.
pub(crate) const WTE: usize = 0;

/// The initial values of `spec`'s parameters from `seed`. Parameter `p`'s value `j`
/// is a Box-Muller normal from draws `2j` and `2j + 1` of the stream of `(seed, p)`,
/// so any slice of a parameter can be drawn without the rest.
pub fn init_params(spec: &GptSpec, seed: u64) -> Vec<f32> {
    let params = spec.params();
    // Sized once: collected from parts, the buffer would grow by doubling (holding old
    // and new at once) and keep the slack.
    let mut out = Vec::with_capacity(params.iter().map(|(s, _)| s.numel()).sum());
    for p in 0..params.len() {
        out.extend(init_param(&params, p, seed));
    }
    out
}

fn init_param(params: &[(ParamSpec, Init)], p: usize, seed: u64) -> Vec<f32> {
    let (s, init) = &params[p];
    match *init {
        Init::Zeros => vec![0.0; s.numel()],
        Init::Ones => vec![1.0; s.numel()],
        Init::Normal(std) => {
            let mut rng =
                SplitMix64::new(seed ^ INIT_STREAM ^ (p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            (0..s.numel()).map(|_| std * normal(&mut rng)).collect()
        }
    }
}

/// The initial values of a piece: each of its parameters drawn on its own and sliced.
pub(crate) fn init_piece(spec: &GptSpec, piece: &PieceLayout, seed: u64) -> Vec<f32> {
    let params = spec.params();
    let whole = spec.layout();
    let mut out = Vec::with_capacity(piece.layout.total());
    for src in &piece.sources {
        let values = init_param(&params, src.param, seed);
        let one = PieceLayout {
            layout: ParamLayout::new(vec![params[src.param].0.clone()]),
            sources: vec![ShardSource { param: 0, by_columns: src.by_columns, ranges: src.ranges.clone() }],
            activation_bytes_per_sample: 0,
        };
        let single = ParamLayout::new(vec![whole.specs()[src.param].clone()]);
        out.extend(one.slice(&single, &values));
    }
    out
}

/// One standard normal from two uniform draws (Box-Muller).
fn normal(rng: &mut SplitMix64) -> f32 {
    let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}
