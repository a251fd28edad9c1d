//! The whole GPT on the CPU without candle's graph, as llm.c writes GPT-2: forward and
//! backward of every layer written out over the flat parameter buffer, each linear
//! layer one product (`kernels::matmul`, split among the compute threads), the
//! attention of each window and head as three small products, and LayerNorm, GELU,
//! the causal softmax and the residual adds as single passes over rows split among
//! the threads. Activations live in buffers reused from step to step; gradients go
//! straight into the caller's buffer.
//!
//! The backward pass runs in steps ([`Model::backward_next`]): the head and the final
//! LayerNorm, then each transformer block from the last, then the embeddings, so a
//! data-parallel strategy reduces the last blocks' gradients while the first blocks'
//! are computed. Each step can be written into a window of the gradient buffer
//! ([`Model::backward_next_into`]), so ZeRO stage 2 holds a bucket and a step. With a
//! tied head the token embedding's gradient (first in the layout) collects the head's
//! part in the first step and the embedding's in the last; when the first step's
//! window does not reach it, the head's part waits in the model until the last.
//!
//! Sums over rows (bias and LayerNorm gradients) are taken in pieces of fixed size
//! and added in order, so the result does not depend on the number of threads.
//! Profiled against candle's graph on the GPT example, the graph spent about 70% of a
//! step in elementwise ops, copies and allocation; here the products are most of it.

use std::ops::Range;

use sheaf_core::{Batch, Error, Model, ParamLayout, Result};

use crate::cpu::kernels::{cross_entropy, matmul, on_compute_threads, threads, View};
use crate::gpt::{init_params, GptSpec};
use crate::{check_values, whole_backward};

/// Windows evaluated at once by `evaluate` and `predict`, bounding their memory.
const EVAL_CHUNK: usize = 32;

mod layers;
mod piece;
mod units;

use layers::{
    block_backward, block_forward, embed, embed_backward, layer_norm, layer_norm_backward, Backward, Shape,
};

pub use piece::FusedPiece;
pub use units::shard as build_shard;

/// A weight and its bias (absent when the model has no biases).
#[derive(Clone)]
struct Affine {
    w: Range<usize>,
    b: Option<Range<usize>>,
}

/// The part of the flat gradient buffer a backward step writes: values from `base`
/// on (all of them, or a window of them; see [`Model::backward_next_into`]), indexed
/// by where they sit in the whole buffer.
struct Grads<'a> {
    buf: &'a mut [f32],
    base: usize,
    /// Whether gradients are added to what the buffer holds (a piece's, accumulated
    /// over micro-batches) instead of written over it.
    add: bool,
}

impl<'a> Grads<'a> {
    /// Gradients written over `buf`, which starts at value `base`.
    fn write(buf: &'a mut [f32], base: usize) -> Grads<'a> {
        Grads { buf, base, add: false }
    }

    /// Gradients added to `buf`, which starts at value `base`.
    fn add(buf: &'a mut [f32], base: usize) -> Grads<'a> {
        Grads { buf, base, add: true }
    }

    fn at(&mut self, r: &Range<usize>) -> &mut [f32] {
        &mut self.buf[r.start - self.base..r.end - self.base]
    }

    /// Every value from `start` on.
    fn from(&mut self, start: usize) -> &mut [f32] {
        &mut self.buf[start - self.base..]
    }
}

/// Where one transformer block's parameters sit in the flat buffer.
#[derive(Clone)]
struct BlockAt {
    ln_1: Affine,
    c_attn: Affine,
    attn_proj: Affine,
    ln_2: Affine,
    c_fc: Affine,
    mlp_proj: Affine,
}

/// Where every parameter sits in the flat buffer.
struct At {
    wte: Range<usize>,
    wpe: Range<usize>,
    blocks: Vec<BlockAt>,
    ln_f: Affine,
    /// The head's weight: `wte` when tied.
    head: Range<usize>,
}

impl Affine {
    /// The same place `by` values earlier.
    fn before(&self, by: usize) -> Affine {
        let shift = |r: &Range<usize>| r.start - by..r.end - by;
        Affine { w: shift(&self.w), b: self.b.as_ref().map(shift) }
    }
}

impl BlockAt {
    /// Layer `i`'s places, each affine layer's found by its name by `affine`.
    fn of_layer(i: usize, affine: &impl Fn(&str) -> Affine) -> BlockAt {
        let h = format!("transformer.h.{i}");
        BlockAt {
            ln_1: affine(&format!("{h}.ln_1")),
            c_attn: affine(&format!("{h}.attn.c_attn")),
            attn_proj: affine(&format!("{h}.attn.c_proj")),
            ln_2: affine(&format!("{h}.ln_2")),
            c_fc: affine(&format!("{h}.mlp.c_fc")),
            mlp_proj: affine(&format!("{h}.mlp.c_proj")),
        }
    }

    /// The same block's places `by` values earlier (a block's own buffer: `by` its
    /// start in the whole buffer).
    fn before(&self, by: usize) -> BlockAt {
        BlockAt {
            ln_1: self.ln_1.before(by),
            c_attn: self.c_attn.before(by),
            attn_proj: self.attn_proj.before(by),
            ln_2: self.ln_2.before(by),
            c_fc: self.c_fc.before(by),
            mlp_proj: self.mlp_proj.before(by),
        }
    }
}

impl At {
    fn new(spec: &GptSpec, layout: &ParamLayout) -> At {
        let find = |name: String| {
            let i = layout.specs().iter().position(|s| s.name == name);
            i.map(|i| layout.range(i))
        };
        let must = |name: String| find(name.clone()).unwrap_or_else(|| panic!("the gpt layout has `{name}`"));
        let affine =
            |name: &str| Affine { w: must(format!("{name}.weight")), b: find(format!("{name}.bias")) };
        let blocks = (0..spec.n_layer).map(|i| BlockAt::of_layer(i, &affine)).collect();
        let wte = must("transformer.wte.weight".into());
        At {
            head: if spec.tie_embeddings { wte.clone() } else { must("lm_head.weight".into()) },
            wte,
            wpe: must("transformer.wpe.weight".into()),
            blocks,
            ln_f: affine("transformer.ln_f"),
        }
    }

    /// Where the gradients of block `l` and everything after it begin.
    fn block_start(&self, l: usize) -> usize {
        self.blocks.get(l).map_or(self.ln_f.w.start, |b| b.ln_1.w.start)
    }
}

/// What one transformer block's forward keeps for its backward: not the LayerNorms'
/// outputs nor GELU's (the inputs of `c_attn`, `c_fc` and the MLP's `c_proj`), which
/// the backward pass recomputes from what is kept (the LayerNorms' inputs and
/// statistics, GELU's input) into one block's scratch (`Backward`) at a pass over
/// their values each: 6 of the 15 values per position and `n_embd` a block kept,
/// Megatron's selective recomputation for the cheap layers.
#[derive(Default)]
struct BlockActs {
    ln_1_stats: Vec<(f32, f32)>,
    qkv: Vec<f32>,
    /// Attention probabilities, `[n, n_head, t, t]`, zero above the diagonal.
    att: Vec<f32>,
    /// The heads' outputs side by side, `[n * t, n_embd]`.
    atty: Vec<f32>,
    /// The residual stream after the attention.
    res_2: Vec<f32>,
    ln_2_stats: Vec<(f32, f32)>,
    /// The MLP's hidden layer before GELU, `[n * t, 4 n_embd]`.
    fc: Vec<f32>,
}

/// The step of the backward pass that runs next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Idle,
    Head,
    Block(usize),
    Embeddings,
}

/// A whole GPT on the CPU: its parameters as one flat buffer in the layout's order,
/// and the activations of the pass in progress.
pub struct FusedGpt {
    spec: GptSpec,
    layout: ParamLayout,
    params: Vec<f32>,
    at: At,
    threads: usize,
    /// The pass in progress: `n` windows of `t` positions, their inputs and targets.
    n: usize,
    t: usize,
    tokens: Vec<u32>,
    targets: Vec<u32>,
    /// The residual stream into each block and out of the last (`n_layer + 1`).
    residual: Vec<Vec<f32>>,
    /// What each block's forward kept for its backward: empty for a block that
    /// recomputes (see [`GptSpec::recomputes`]).
    blocks: Vec<BlockActs>,
    /// The activations of one block at a time: of each block that recomputes (in the
    /// forward pass, then again in its backward step), and of every block when no
    /// backward pass follows (evaluation, prediction).
    scratch: BlockActs,
    ln_f: Vec<f32>,
    ln_f_stats: Vec<(f32, f32)>,
    logits: Vec<f32>,
    /// Backward: the gradient of the loss with respect to the logits, then to the
    /// residual stream at the step's point; scratch of the step's widths.
    d_logits: Vec<f32>,
    d: Backward,
    /// A tied head's part of the token embedding's gradient, kept here when the head's
    /// step was written into a window that does not reach the embedding (the front of
    /// the buffer), and added in by the embeddings' step.
    d_head: Vec<f32>,
    head_held: bool,
    step: Step,
    /// Windows of the last training pass (0 before the first).
    trained_windows: usize,
    /// A row shard's own values and units (ZeRO stage 3; see `units`): then `params`
    /// is the compact buffer a pass runs in, and `layout` the shard's.
    sharded: Option<Box<units::Sharded>>,
}

impl FusedGpt {
    pub fn new(spec: &GptSpec, seed: u64) -> FusedGpt {
        let layout = spec.layout();
        let at = At::new(spec, &layout);
        let mut model = FusedGpt::new_with(spec, 0, at);
        model.params = init_params(spec, seed);
        model
    }

    /// A GPT of `spec` running in a parameter buffer of `values` zeros laid out as
    /// `at` says.
    fn new_with(spec: &GptSpec, values: usize, at: At) -> FusedGpt {
        FusedGpt {
            at,
            params: vec![0.0; values],
            spec: spec.clone(),
            layout: spec.layout(),
            threads: threads(),
            n: 0,
            t: 0,
            tokens: Vec::new(),
            targets: Vec::new(),
            residual: (0..=spec.n_layer).map(|_| Vec::new()).collect(),
            blocks: (0..spec.n_layer).map(|_| BlockActs::default()).collect(),
            scratch: BlockActs::default(),
            ln_f: Vec::new(),
            ln_f_stats: Vec::new(),
            logits: Vec::new(),
            d_logits: Vec::new(),
            d: Backward::default(),
            d_head: Vec::new(),
            head_held: false,
            step: Step::Idle,
            trained_windows: 0,
            sharded: None,
        }
    }

    /// The parameters this model holds: the whole model's, or a shard's rows.
    fn own_values(&mut self) -> &mut [f32] {
        match &mut self.sharded {
            Some(s) => s.values(),
            None => &mut self.params,
        }
    }

    /// Copies in a batch of training windows, checked against the model.
    fn load(&mut self, batch: &Batch<'_>, what: &str) -> Result<()> {
        let (windows, n, window) = self.spec.windows(batch, what)?;
        self.step = Step::Idle;
        self.n = n;
        self.t = if n == 0 {
            0
        } else {
            self.spec.split_windows(windows, window, &mut self.tokens, &mut self.targets)?
        };
        if n == 0 {
            self.tokens.clear();
            self.targets.clear();
        }
        Ok(())
    }

    /// The forward pass of the loaded windows, up to the logits. With `backward`, each
    /// block that does not recompute keeps its activations for the backward pass;
    /// otherwise only the residual stream into each block is kept.
    fn forward(&mut self, backward: bool) {
        self.embed();
        for l in 0..self.spec.n_layer {
            self.block(l, backward, None);
        }
        self.head_logits();
    }

    /// The embeddings of the loaded windows: the residual stream into block 0.
    fn embed(&mut self) {
        let FusedGpt { spec, params, at, t, tokens, residual, .. } = self;
        embed(&mut residual[0], tokens, *t, params, &at.wte, &at.wpe, spec.n_embd);
    }

    /// The forward pass of transformer block `l` (see [`FusedGpt::forward`]), on the
    /// model's parameters or on `lent` ones (a row shard's gathered block).
    fn block(&mut self, l: usize, backward: bool, lent: Option<&[f32]>) {
        let FusedGpt { spec, params, at, threads, n, t, residual, blocks, scratch, d, .. } = self;
        let params = lent.unwrap_or(params);
        let shape =
            Shape { n: *n, t: *t, c: spec.n_embd, n_head: spec.n_head, gelu: spec.gelu, threads: *threads };
        let (before, after) = residual.split_at_mut(l + 1);
        // Without a backward pass every block runs in the buffers of one: the first
        // block's own where it keeps them (sized by the last training pass), else the
        // scratch.
        let acts = match (backward, spec.recomputes(l), spec.recomputes(0)) {
            (true, false, _) => &mut blocks[l],
            (false, _, false) => &mut blocks[0],
            _ => &mut *scratch,
        };
        block_forward(acts, d, &before[l], Some(&mut after[0]), params, &at.blocks[l], shape);
    }

    /// The final LayerNorm and the head: the logits.
    fn head_logits(&mut self) {
        let FusedGpt { spec, params, at, threads, n, t, residual, ln_f, ln_f_stats, logits, .. } = self;
        let (c, rows, threads) = (spec.n_embd, *n * *t, *threads);
        let p = &params[..];
        let last = &residual[spec.n_layer];
        layer_norm(ln_f, ln_f_stats, last, p, &at.ln_f, c, threads);
        logits.resize(rows * spec.vocab_size, 0.0);
        let head = View::rows(&p[at.head.clone()], spec.vocab_size, c);
        matmul(logits, false, View::rows(ln_f, rows, c), head.t(), threads);
    }

    /// The cross-entropy of the logits against the loaded targets: its sum and the
    /// correct predictions; with `backward`, `d_logits` gets the gradient of the mean.
    fn loss(&mut self, backward: bool) -> (f64, usize) {
        let (v, rows) = (self.spec.vocab_size, self.n * self.t);
        if !backward {
            return cross_entropy(&self.logits, &self.targets, v, 0.0, None, self.threads);
        }
        self.d_logits.resize(rows * v, 0.0);
        let scale = 1.0 / rows as f32;
        cross_entropy(&self.logits, &self.targets, v, scale, Some(&mut self.d_logits), self.threads)
    }

    /// Forward passes over `windows` of `window` tokens, `EVAL_CHUNK` windows at a
    /// time, calling `each` with every chunk's logits and targets.
    fn forward_chunks(
        &mut self,
        windows: &[u32],
        window: usize,
        mut each: impl FnMut(&[f32], &[u32], usize),
    ) -> Result<()> {
        // As many windows at once as the last training pass (so evaluation fits in
        // its buffers), `EVAL_CHUNK` at most.
        let at_once = match self.trained_windows {
            0 => EVAL_CHUNK,
            n => n.min(EVAL_CHUNK),
        };
        for chunk in windows.chunks(at_once * window) {
            let n = chunk.len() / window;
            self.t = self.spec.split_windows(chunk, window, &mut self.tokens, &mut self.targets)?;
            self.n = n;
            on_compute_threads(|| self.forward(false));
            each(&self.logits, &self.targets, self.t);
        }
        Ok(())
    }

    /// Where the values still pending before `step` end.
    fn pending_before(&self, step: Step) -> usize {
        match step {
            Step::Idle => 0,
            Step::Head => self.layout.total(),
            Step::Block(l) => self.at.block_start(l + 1),
            Step::Embeddings => self.at.block_start(0),
        }
    }

    /// Where the values still pending after `step` end: the gradients it finishes
    /// begin there.
    fn pending_after(&self, step: Step) -> usize {
        match step {
            Step::Idle => 0,
            Step::Head => self.at.ln_f.w.start,
            Step::Block(l) => self.at.block_start(l),
            Step::Embeddings => 0,
        }
    }

    /// Runs `step` of the backward pass into `pending`; returns the next step and
    /// where the values still pending end.
    fn backward_step(&mut self, step: Step, pending: &mut Grads<'_>) -> (Step, usize) {
        let (c, v, rows, threads) = (self.spec.n_embd, self.spec.vocab_size, self.n * self.t, self.threads);
        let last = self.spec.n_layer.checked_sub(1);
        match step {
            Step::Idle => unreachable!("checked by the caller"),
            Step::Head => {
                let at = &self.at;
                let frontier = at.ln_f.w.start;
                if rows == 0 {
                    pending.from(frontier).fill(0.0);
                } else {
                    let p = &self.params[..];
                    // The head: logits = ln_f(x) head^T. A tied head's gradient waits
                    // here for the embeddings' step when the window stops short of it.
                    self.head_held = at.head.start < pending.base;
                    let d_head = if self.head_held {
                        self.d_head.resize(at.head.len(), 0.0);
                        &mut self.d_head[..]
                    } else {
                        pending.at(&at.head)
                    };
                    matmul(
                        d_head,
                        false,
                        View::rows(&self.d_logits, rows, v).t(),
                        View::rows(&self.ln_f, rows, c),
                        threads,
                    );
                    self.d.narrow.resize(rows * c, 0.0);
                    let head = View::rows(&p[at.head.clone()], v, c);
                    matmul(&mut self.d.narrow, false, View::rows(&self.d_logits, rows, v), head, threads);
                    self.d.res.clear();
                    self.d.res.resize(rows * c, 0.0);
                    let x = &self.residual[self.spec.n_layer];
                    layer_norm_backward(
                        &mut self.d.res,
                        pending,
                        &self.d.narrow,
                        x,
                        &self.ln_f_stats,
                        p,
                        &at.ln_f,
                        c,
                        threads,
                    );
                }
                (last.map_or(Step::Embeddings, Step::Block), frontier)
            }
            Step::Block(l) => {
                let frontier = self.at.block_start(l);
                if rows == 0 {
                    pending.from(frontier).fill(0.0);
                } else {
                    self.block_backward(l, pending, None);
                }
                (if l == 0 { Step::Embeddings } else { Step::Block(l - 1) }, frontier)
            }
            Step::Embeddings => {
                let at = &self.at;
                let tied = self.spec.tie_embeddings;
                // A tied head wrote its part of the token embedding's gradient first,
                // there or into `d_head`.
                if !tied || rows == 0 {
                    pending.at(&at.wte).fill(0.0);
                } else if self.head_held {
                    pending.at(&at.wte).copy_from_slice(&self.d_head);
                }
                pending.at(&at.wpe).fill(0.0);
                embed_backward(pending, &self.d.res[..rows * c], &self.tokens, self.t, &at.wte, &at.wpe, c);
                (Step::Idle, 0)
            }
        }
    }

    /// Backward of transformer block `l` (on the model's parameters or on `lent` ones):
    /// `d.res` holds the gradient with respect to the block's output and leaves holding
    /// it with respect to its input.
    fn block_backward(&mut self, l: usize, pending: &mut Grads<'_>, lent: Option<&[f32]>) {
        let shape = Shape {
            n: self.n,
            t: self.t,
            c: self.spec.n_embd,
            n_head: self.spec.n_head,
            gelu: self.spec.gelu,
            threads: self.threads,
        };
        let recomputes = self.spec.recomputes(l);
        let FusedGpt { params, at, residual, blocks, scratch, d, .. } = self;
        let (p, b, x) = (lent.unwrap_or(&params[..]), &at.blocks[l], &residual[l]);
        let kept = if recomputes { None } else { Some(&blocks[l]) };
        block_backward(d, pending, kept, scratch, x, p, b, shape);
    }
}

impl Model for FusedGpt {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn read_params(&self, out: &mut [f32]) -> Result<()> {
        let own = match &self.sharded {
            Some(s) => s.values_ref(),
            None => &self.params[..],
        };
        check_values(out.len(), own.len())?;
        out.copy_from_slice(own);
        Ok(())
    }

    fn write_params(&mut self, src: &[f32]) -> Result<()> {
        let own = self.own_values();
        check_values(src.len(), own.len())?;
        own.copy_from_slice(src);
        Ok(())
    }

    fn params_mut(&mut self) -> Result<Option<&mut [f32]>> {
        Ok(Some(self.own_values()))
    }

    fn forward_backward(&mut self, batch: &Batch<'_>, grads: &mut [f32]) -> Result<f32> {
        if self.sharded.is_some() {
            return Err(units::whole_only("train on a whole batch"));
        }
        whole_backward(self, batch, grads)
    }

    fn units(&self) -> Vec<Vec<usize>> {
        self.sharded.as_ref().map_or_else(Vec::new, |s| s.units())
    }

    fn unit_begin(&mut self, batch: &Batch<'_>, train: bool) -> Result<()> {
        self.unit_begin_impl(batch, train)
    }

    fn unit_forward(&mut self, unit: usize, params: &[f32]) -> Result<Option<(f64, usize)>> {
        self.unit_forward_impl(unit, params)
    }

    fn unit_backward(&mut self, unit: usize, params: &[f32], grads: &mut [f32]) -> Result<()> {
        self.unit_backward_impl(unit, params, grads)
    }

    fn backward_in_steps(&self) -> bool {
        self.sharded.is_none()
    }

    fn backward_begin(&mut self, batch: &Batch<'_>) -> Result<f32> {
        if self.sharded.is_some() {
            return Err(units::whole_only("train on a whole batch"));
        }
        self.load(batch, "trains on")?;
        self.trained_windows = self.trained_windows.max(self.n);
        let rows = self.n * self.t;
        let loss = if rows == 0 {
            0.0
        } else {
            on_compute_threads(|| {
                self.forward(true);
                self.loss(true).0 / rows as f64
            })
        };
        self.step = Step::Head;
        Ok(loss as f32)
    }

    fn backward_next(&mut self, pending: &mut [f32]) -> Result<usize> {
        // The whole front is a window ending where it does.
        let end = pending.len();
        self.backward_next_into(pending, end)
    }

    fn backward_window(&self) -> Option<usize> {
        if self.sharded.is_some() {
            return None;
        }
        // The head's step (the final LayerNorm, and an untied head), each block's, and
        // the embeddings'. A tied head's gradient is held aside when out of reach.
        let steps = std::iter::once(Step::Head)
            .chain((0..self.spec.n_layer).map(Step::Block))
            .chain(std::iter::once(Step::Embeddings));
        steps.map(|s| self.pending_before(s) - self.pending_after(s)).max()
    }

    fn backward_next_into(&mut self, window: &mut [f32], end: usize) -> Result<usize> {
        if self.step == Step::Idle {
            return Err(Error::BadState("backward_next without a backward pass begun".into()));
        }
        let expected = self.pending_before(self.step);
        if end != expected || window.len() > end {
            return Err(Error::invalid(format!(
                "{end} pending gradient values in a window of {}, but the backward pass has {expected} left",
                window.len()
            )));
        }
        let base = end - window.len();
        let frontier = self.pending_after(self.step);
        if frontier < base {
            return Err(Error::invalid(format!(
                "a window from gradient value {base} cannot hold the {:?} step's, from {frontier}",
                self.step
            )));
        }
        let mut grads = Grads::write(window, base);
        let (next, frontier) = on_compute_threads(|| self.backward_step(self.step, &mut grads));
        self.step = next;
        Ok(frontier)
    }

    fn evaluate(&mut self, batch: &Batch<'_>) -> Result<(f64, usize)> {
        if self.sharded.is_some() {
            return Err(units::whole_only("evaluate on its own"));
        }
        let (windows, _, window) = self.spec.windows(batch, "evaluates")?;
        self.step = Step::Idle;
        let (mut loss, mut correct) = (0f64, 0usize);
        let (v, threads) = (self.spec.vocab_size, self.threads);
        self.forward_chunks(windows, window, |logits, targets, _| {
            let (l, k) = cross_entropy(logits, targets, v, 0.0, None, threads);
            loss += l;
            correct += k;
        })?;
        Ok((loss, correct))
    }

    fn predict(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
        if self.sharded.is_some() {
            return Err(units::whole_only("predict on its own"));
        }
        let (windows, n, window) = self.spec.windows(batch, "predicts from")?;
        self.step = Step::Idle;
        // The context is the last block_size tokens of each window, as nanoGPT crops;
        // a window of t + 1 tokens with a dummy target runs the forward pass.
        let t = window.min(self.spec.block_size);
        let mut ctx = Vec::with_capacity(n * (t + 1));
        for w in windows.chunks_exact(window) {
            ctx.extend_from_slice(&w[window - t..]);
            ctx.push(0);
        }
        let v = self.spec.vocab_size;
        let mut out = Vec::with_capacity(n * v);
        self.forward_chunks(&ctx, t + 1, |logits, _, t| {
            for row in logits.chunks_exact(t * v) {
                out.extend_from_slice(&row[(t - 1) * v..]);
            }
        })?;
        Ok(out)
    }
}
