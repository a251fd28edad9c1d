//! Compute: models described as data, built by a backend, trained through a flat
//! parameter buffer.
//!
//! Parameters and gradients cross this interface as one flat `f32` buffer in
//! [`ParamLayout`] order: a data-parallel strategy allreduces it (or buckets of it)
//! without knowing the model, a sharded optimizer slices it, and a checkpoint names its
//! pieces. A backend keeps its own tensors (on a GPU, say) and copies at the boundary.

use std::ops::Range;

use crate::{Error, HfLayout, Piece, Result};

/// A model to build: its kind (`"mlp"`, `"gpt"`, ...) and the kind's own settings
/// as a JSON object, which only the compute plugin providing the kind interprets (and
/// validates, naming any key it does not know).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    pub kind: String,
    /// The `[model]` table less `kind`, as JSON text.
    pub config: String,
    /// The dataset's vocabulary size when it has one (a token dataset with a known
    /// vocabulary); a kind that needs one takes it from here when its config has none.
    pub vocab_size: Option<usize>,
}

impl ModelSpec {
    pub fn new(kind: impl Into<String>, config: impl Into<String>) -> ModelSpec {
        ModelSpec { kind: kind.into(), config: config.into(), vocab_size: None }
    }

    /// A ReLU multilayer perceptron: `layers[0]` inputs, `layers.last()` classes.
    pub fn mlp(layers: Vec<usize>) -> ModelSpec {
        let widths: Vec<String> = layers.iter().map(usize::to_string).collect();
        ModelSpec::new("mlp", format!("{{\"layers\":[{}]}}", widths.join(",")))
    }
}

/// What a model consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelInput {
    /// Rows of `features` values, each labelled with one of `classes`.
    Rows { features: usize, classes: usize },
    /// Windows of `block_size + 1` token ids below `vocab_size`: the first
    /// `block_size` are the input, each position predicts the next token.
    Tokens { vocab_size: usize, block_size: usize },
}

/// One unit a pipeline may cut between: a layer, a transformer block, the embeddings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub name: String,
    /// Parameters it holds (its share of the balance by parameter count).
    pub params: u64,
}

/// What a compute backend reports of a model spec, without building the model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// The whole model's parameters, in checkpoint order and with checkpoint names.
    pub layout: ParamLayout,
    /// The ordered blocks a pipeline may cut between.
    pub blocks: Vec<Block>,
    pub input: ModelInput,
}

/// One parameter of a piece: which parameter of the whole model it comes from, and
/// which of its values (ranges of rows, or of columns, of its 2-D view
/// `[shape[0], numel / shape[0]]`; one range covering everything for a whole
/// parameter). Ranges concatenate in order, so a fused weight (q, k and v stacked)
/// can give each tensor-parallel rank its heads of all three.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardSource {
    pub param: usize,
    pub by_columns: bool,
    pub ranges: Vec<Range<usize>>,
}

impl ShardSource {
    /// All of parameter `param`, whose first dimension is `rows` long.
    pub fn whole(param: usize, rows: usize) -> ShardSource {
        ShardSource { param, by_columns: false, ranges: std::iter::once(0..rows).collect() }
    }
}

/// The parameters of a piece and where each comes from in the whole model.
#[derive(Clone, Debug, PartialEq)]
pub struct PieceLayout {
    pub layout: ParamLayout,
    /// One per parameter of `layout`.
    pub sources: Vec<ShardSource>,
    /// Bytes of activations one sample (a row, a token window) keeps from the piece's
    /// forward pass for its backward pass.
    pub activation_bytes_per_sample: u64,
}

impl PieceLayout {
    /// For each of the piece's values, its index in the whole model's flat buffer.
    pub fn full_indices(&self, whole: &ParamLayout) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.layout.total());
        for src in &self.sources {
            let base = whole.range(src.param).start;
            let shape = &whole.specs()[src.param].shape;
            let rows = shape.first().copied().unwrap_or(1).max(1);
            let cols = whole.specs()[src.param].numel() / rows;
            if src.by_columns {
                for row in 0..rows {
                    for r in &src.ranges {
                        out.extend(base + row * cols + r.start..base + row * cols + r.end);
                    }
                }
            } else {
                for r in &src.ranges {
                    out.extend(base + r.start * cols..base + r.end * cols);
                }
            }
        }
        out
    }

    /// This piece's values out of the whole model's flat buffer.
    pub fn slice(&self, whole: &ParamLayout, full: &[f32]) -> Vec<f32> {
        self.full_indices(whole).into_iter().map(|i| full[i]).collect()
    }

    /// Writes this piece's `values` into the whole model's flat buffer.
    pub fn place(&self, whole: &ParamLayout, values: &[f32], full: &mut [f32]) {
        for (i, v) in self.full_indices(whole).into_iter().zip(values) {
            full[i] = *v;
        }
    }

    /// Shard `shard.index` of `shard.count` of every parameter of `whole`, by rows (its
    /// first dimension, as FSDP2 shards a parameter): parameter `p` of `rows` rows
    /// keeps rows [`chunk_range`]`(rows, count, index)`, which may be none. Names stay
    /// the whole model's; each shape's first dimension is the rows kept. The layout of
    /// a model built by [`ComputeBackend::build_shard`] (ZeRO stage 3).
    pub fn row_shard(
        whole: &ParamLayout,
        shard: ParamShard,
        activation_bytes_per_sample: u64,
    ) -> PieceLayout {
        let (specs, sources) = whole
            .specs()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let rows = s.shape.first().copied().unwrap_or(1);
                let own = crate::chunk_range(rows, shard.count, shard.index);
                let mut shape = s.shape.clone();
                match shape.first_mut() {
                    Some(first) => *first = own.len(),
                    None => shape.push(own.len()),
                }
                let source =
                    ShardSource { param: i, by_columns: false, ranges: std::iter::once(own).collect() };
                (ParamSpec { name: s.name.clone(), shape }, source)
            })
            .unzip();
        PieceLayout { layout: ParamLayout::new(specs), sources, activation_bytes_per_sample }
    }

    /// Shard `shard.index` of `shard.count` of every parameter of this piece, by rows
    /// as [`PieceLayout::row_shard`] shards a whole model's: each parameter keeps rows
    /// [`chunk_range`](crate::chunk_range)`(rows, count, index)` of the piece's, which
    /// come from the whole model's rows its source names. Fails on a parameter the
    /// piece holds by columns (a tensor-parallel slice's), whose rows are not rows of
    /// the whole model's.
    pub fn rows(&self, shard: ParamShard) -> Result<PieceLayout> {
        shard.validate()?;
        let (mut specs, mut sources) = (Vec::new(), Vec::new());
        for (s, src) in self.layout.specs().iter().zip(&self.sources) {
            if src.by_columns {
                return Err(Error::invalid(format!(
                    "`{}` is held by columns: a row shard of it holds no whole rows of the model's",
                    s.name
                )));
            }
            let rows = s.shape.first().copied().unwrap_or(1);
            let own = crate::chunk_range(rows, shard.count, shard.index);
            // The piece's rows are its source's ranges, one after another.
            let mut ranges = Vec::new();
            let mut at = 0;
            for r in &src.ranges {
                let (lo, hi) = (own.start.max(at), own.end.min(at + r.len()));
                if lo < hi {
                    ranges.push(r.start + lo - at..r.start + hi - at);
                }
                at += r.len();
            }
            if ranges.is_empty() {
                // No rows: an empty range where row `own.start` would be.
                let mut at = 0;
                let mut start = src.ranges.last().map_or(0, |r| r.end);
                for r in &src.ranges {
                    if own.start < at + r.len() {
                        start = r.start + own.start - at;
                        break;
                    }
                    at += r.len();
                }
                ranges.push(start..start);
            }
            let mut shape = s.shape.clone();
            match shape.first_mut() {
                Some(first) => *first = own.len(),
                None => shape.push(own.len()),
            }
            specs.push(ParamSpec { name: s.name.clone(), shape });
            sources.push(ShardSource { param: src.param, by_columns: false, ranges });
        }
        Ok(PieceLayout {
            layout: ParamLayout::new(specs),
            sources,
            activation_bytes_per_sample: self.activation_bytes_per_sample,
        })
    }

    /// The whole model as one piece.
    pub fn whole(layout: &ParamLayout, activation_bytes_per_sample: u64) -> PieceLayout {
        let sources = layout
            .specs()
            .iter()
            .enumerate()
            .map(|(i, s)| ShardSource::whole(i, s.shape.first().copied().unwrap_or(1).max(1)))
            .collect();
        PieceLayout { layout: layout.clone(), sources, activation_bytes_per_sample }
    }
}

/// Which of `count` row shards of every parameter a rank holds under fully sharded
/// data parallelism (ZeRO stage 3; see [`PieceLayout::row_shard`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamShard {
    pub index: usize,
    pub count: usize,
}

impl ParamShard {
    /// Checks that the shard is one of its count's (at least one).
    pub fn validate(&self) -> Result<()> {
        match self.count > 0 && self.index < self.count {
            true => Ok(()),
            false => Err(Error::invalid(format!("parameter shard {} of {}", self.index, self.count))),
        }
    }
}

/// A named parameter and its shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where each named parameter sits in the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    specs: Vec<ParamSpec>,
    offsets: Vec<usize>,
    total: usize,
}

impl ParamLayout {
    pub fn new(specs: Vec<ParamSpec>) -> ParamLayout {
        let mut offsets = Vec::with_capacity(specs.len());
        let mut total = 0;
        for s in &specs {
            offsets.push(total);
            total += s.numel();
        }
        ParamLayout { specs, offsets, total }
    }

    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Total number of elements.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The elements of parameter `i` in the flat buffer.
    pub fn range(&self, i: usize) -> Range<usize> {
        self.offsets[i]..self.offsets[i] + self.specs[i].numel()
    }

    /// Named views of flat `values` and `grads` (both `total()` long), one per
    /// parameter, as an optimizer step takes them.
    pub fn params<'a>(&'a self, values: &'a mut [f32], grads: &'a [f32]) -> Vec<crate::Param<'a>> {
        assert_eq!(values.len(), self.total, "values do not match the layout");
        assert_eq!(grads.len(), self.total, "grads do not match the layout");
        let mut out = Vec::with_capacity(self.specs.len());
        let mut rest = values;
        for (i, spec) in self.specs.iter().enumerate() {
            let (value, tail) = rest.split_at_mut(spec.numel());
            rest = tail;
            out.push(crate::Param { name: &spec.name, value, grad: &grads[self.range(i)] });
        }
        out
    }
}

/// A batch of samples, lent for one call.
#[derive(Clone, Copy, Debug)]
pub enum Batch<'a> {
    /// `inputs` is row-major `[labels.len(), input_dim]`.
    Rows { inputs: &'a [f32], labels: &'a [u32], input_dim: usize },
    /// `windows` is row-major `[n, window]`: each window's first `window - 1` tokens
    /// are the input and its last `window - 1` the targets (a window of one token is
    /// a context to predict from, as generation asks).
    Tokens { windows: &'a [u32], window: usize },
}

impl<'a> Batch<'a> {
    /// Samples (rows or windows).
    pub fn len(&self) -> usize {
        match *self {
            Batch::Rows { labels, .. } => labels.len(),
            Batch::Tokens { windows, window } => windows.len().checked_div(window).unwrap_or(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Predictions the loss averages over: one per row, `window - 1` per window.
    pub fn predictions(&self) -> usize {
        match *self {
            Batch::Rows { labels, .. } => labels.len(),
            Batch::Tokens { window, .. } => self.len() * window.saturating_sub(1),
        }
    }
}

/// Samples gathered from a [`Dataset`], owned.
#[derive(Clone, Debug, PartialEq)]
pub enum Samples {
    Rows { inputs: Vec<f32>, labels: Vec<u32>, input_dim: usize },
    Tokens { windows: Vec<u32>, window: usize },
}

impl Samples {
    pub fn batch(&self) -> Batch<'_> {
        match self {
            Samples::Rows { inputs, labels, input_dim } => {
                Batch::Rows { inputs, labels, input_dim: *input_dim }
            }
            Samples::Tokens { windows, window } => Batch::Tokens { windows, window: *window },
        }
    }

    pub fn len(&self) -> usize {
        self.batch().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What each prediction is scored against, in order: a row's label, or each
    /// window's tokens after its first.
    pub fn targets(&self) -> Vec<u32> {
        match self {
            Samples::Rows { labels, .. } => labels.clone(),
            Samples::Tokens { windows, window } => {
                windows.chunks_exact((*window).max(1)).flat_map(|w| w[1..].iter().copied()).collect()
            }
        }
    }
}

/// A dataset split (train, or validation), read sample by sample: a rank gathers the
/// samples of its batch and nothing else, so its memory does not grow with the data.
pub trait Dataset: Send + Sync {
    /// Samples in the split.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The samples at `indices`, in that order.
    fn gather(&self, indices: &[usize]) -> Result<Samples>;
}

/// A model instance on some device.
pub trait Model: Send {
    fn layout(&self) -> &ParamLayout;
    /// Copy the parameters into `out` (length `layout().total()`).
    fn read_params(&self, out: &mut [f32]) -> Result<()>;
    /// Replace the parameters with `src` (length `layout().total()`).
    fn write_params(&mut self, src: &[f32]) -> Result<()>;
    /// The model's own parameters (`layout().total()` values, in layout order), lent
    /// for an update in place: a strategy steps its optimizer there, where it would
    /// otherwise step a copy and write it in with [`Model::write_params`] (2.6 MB a
    /// step for the reference MLP). Changes take effect from the next pass. `None`
    /// (the default): the model keeps its parameters some other way (a graph's
    /// tensors, or a plugin of an ABI before 0.9), and a strategy writes them in; see
    /// `sheaf_train::ModelParams`.
    fn params_mut(&mut self) -> Result<Option<&mut [f32]>> {
        Ok(None)
    }
    /// Forward and backward on `batch`: returns the mean loss and writes its gradient
    /// with respect to every parameter into `grads`.
    fn forward_backward(&mut self, batch: &Batch<'_>, grads: &mut [f32]) -> Result<f32>;
    /// Whether [`Model::backward_begin`] and [`Model::backward_next`] run the backward
    /// pass in steps (a layer at a time), so a strategy can reduce the gradients a step
    /// finished while the next steps run. Gradients are final in reverse layout order.
    fn backward_in_steps(&self) -> bool {
        false
    }

    /// The forward pass on `batch`, keeping what the backward pass needs; returns the
    /// mean loss. [`Model::backward_next`] then runs the backward pass step by step.
    fn backward_begin(&mut self, batch: &Batch<'_>) -> Result<f32> {
        let _ = batch;
        Err(Error::Unsupported("this model has no stepped backward pass".into()))
    }

    /// The next step of the backward pass [`Model::backward_begin`] began. `pending` is
    /// the front of the flat gradient buffer whose values are not final yet (all of it
    /// at first, then as long as the last call returned): the step writes its
    /// gradients there and returns how many values at the front are still pending, so
    /// `pending[returned..]` is final. 0: the pass is done, every gradient written.
    fn backward_next(&mut self, pending: &mut [f32]) -> Result<usize> {
        let _ = pending;
        Err(Error::Unsupported("this model has no stepped backward pass".into()))
    }

    /// The most gradient values one step of the stepped backward pass finishes, for a
    /// model that can write each step into a window of the gradient buffer
    /// ([`Model::backward_next_into`]); `None` (the default): only into the whole of
    /// its front. With windows, ZeRO stage 2 holds a bucket and a step of gradients
    /// rather than all of them.
    fn backward_window(&self) -> Option<usize> {
        None
    }

    /// [`Model::backward_next`] into `window`, which stands for values
    /// `[end - window.len(), end)` of the flat gradient buffer, `end` being how many
    /// values the last step left pending (the layout's total at first): the step writes
    /// its gradients there and returns how many are still pending, never fewer than
    /// `end - window.len()`. A window of [`Model::backward_window`] values, or all that
    /// is pending when fewer, always suffices.
    fn backward_next_into(&mut self, window: &mut [f32], end: usize) -> Result<usize> {
        let _ = (window, end);
        Err(Error::Unsupported(
            "this model writes its backward steps only into the whole gradient buffer".into(),
        ))
    }

    /// Summed loss and number of correct predictions on `batch`, without gradients
    /// (over [`Batch::predictions`] predictions).
    fn evaluate(&mut self, batch: &Batch<'_>) -> Result<(f64, usize)>;

    /// The model's output for the last position of each sample, without gradients:
    /// `[samples, classes]` logits (for token windows, the next token's logits after
    /// the whole window, which is all context).
    fn predict(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
        let _ = batch;
        Err(Error::Unsupported("this model cannot predict".into()))
    }

    // The stage interface, for model parallelism: a model built from a [`Piece`] runs
    // its layers on activations that come from and go to other ranks, micro-batch by
    // micro-batch. Backends that only train whole models keep the defaults.

    /// The part of the model this instance holds.
    fn piece(&self) -> Option<Piece> {
        None
    }

    /// How many segments the piece runs in: 1 for whole layers. Under tensor
    /// parallelism, pair `k` of layers (column-parallel then row-parallel) is segment
    /// `2k`, whose output is this rank's part of a sum over the group (the row layer
    /// without its bias), and segment `2k + 1` is replicated: the row layer's bias
    /// added to the summed output, the nonlinearity, and after the last pair an
    /// unpaired last layer. The strategy allreduces an even segment's output after its
    /// forward and its input gradient after its backward.
    fn segments(&self) -> usize {
        1
    }

    /// Forward of micro-batch `micro` through segment `segment` of this piece:
    /// `input` is `[rows, width]` row-major (the samples' features for the first
    /// stage, the previous stage's output after it). Keeps what the backward pass
    /// needs until [`Model::stage_backward`] (or [`Model::drop_saved`]). Returns
    /// `[rows, out]`.
    fn stage_forward(&mut self, micro: u64, segment: usize, input: &[f32], rows: usize) -> Result<Vec<f32>> {
        let _ = (micro, segment, input, rows);
        Err(Error::Unsupported("this backend has no stage interface".into()))
    }

    /// The first stage's forward of micro-batch `micro` through segment `segment`,
    /// from the samples themselves: rows of features (the default: their inputs
    /// through [`Model::stage_forward`]) or token windows (for a model that embeds
    /// them; each window's last token is only a target).
    fn stage_forward_batch(&mut self, micro: u64, segment: usize, batch: &Batch<'_>) -> Result<Vec<f32>> {
        match *batch {
            Batch::Rows { inputs, labels, .. } => self.stage_forward(micro, segment, inputs, labels.len()),
            Batch::Tokens { .. } => {
                Err(Error::Unsupported("this model's stages take rows of features".into()))
            }
        }
    }

    /// Parameters this piece holds that another piece holds too (a tied embedding on
    /// the first and last pipeline stages): `(index in this piece's layout, index in
    /// the whole model's)`. A strategy sums their gradients over the pieces holding
    /// them, so the copies stay equal.
    fn tied_params(&self) -> Vec<(usize, usize)> {
        Vec::new()
    }

    /// For each parameter of this piece, whether every rank of its tensor-parallel
    /// group holds it whole (the same values, the same gradient), so that a norm over
    /// the whole model counts it once. Whole pieces hold nothing sliced: all `false`.
    fn replicated_params(&self) -> Vec<bool> {
        vec![false; self.layout().specs().len()]
    }

    /// Backward of micro-batch `micro` through segment `segment`: adds its parameter
    /// gradients to the accumulated ones, frees what its forward kept, and returns the
    /// gradient with respect to its input (`[rows, width]`; for an even segment under
    /// tensor parallelism, this rank's part of a sum over the group).
    fn stage_backward(&mut self, micro: u64, segment: usize, grad_output: &[f32]) -> Result<Vec<f32>> {
        let _ = (micro, segment, grad_output);
        Err(Error::Unsupported("this backend has no stage interface".into()))
    }

    /// The cross-entropy of `logits` (`[labels.len(), classes]`) against `labels`:
    /// its sum, the number of correct predictions, and the gradient of `scale` times
    /// the sum with respect to the logits.
    fn loss_grad(&mut self, logits: &[f32], labels: &[u32], scale: f32) -> Result<(f64, usize, Vec<f32>)> {
        let _ = (logits, labels, scale);
        Err(Error::Unsupported("this backend has no stage interface".into()))
    }

    /// Moves the accumulated gradients into `out` (`layout().total()` long) and
    /// starts accumulating from zero.
    fn take_grads(&mut self, out: &mut [f32]) -> Result<()> {
        let _ = out;
        Err(Error::Unsupported("this backend has no stage interface".into()))
    }

    /// Forgets everything forward passes kept (after an evaluation pass).
    fn drop_saved(&mut self) {}

    /// Bytes of activations kept for backward passes right now.
    fn saved_bytes(&self) -> u64 {
        0
    }

    // Fully sharded data parallelism (ZeRO stage 3): a model built as a row
    // shard ([`ComputeBackend::build_shard`]) holds only its rows of every parameter
    // (its `layout`, `read_params`, `write_params` and `params_mut` are the shard's)
    // and runs a pass unit by unit on parameters the strategy gathers from every
    // shard just before it needs them, so no rank ever holds the whole model.

    /// The model's units, in the order the forward pass runs them: each a list of
    /// parameter indices (of `layout()`, which orders parameters as the whole model
    /// does), every parameter in exactly one. The first is the root (embeddings, a
    /// final norm and head: what the pass needs at both ends), which the model keeps
    /// from its forward to the end of its backward. Empty when the model cannot run
    /// unit by unit.
    fn units(&self) -> Vec<Vec<usize>> {
        Vec::new()
    }

    /// Starts a pass over `batch`; with `train`, a backward pass follows the forward.
    fn unit_begin(&mut self, batch: &Batch<'_>, train: bool) -> Result<()> {
        let _ = (batch, train);
        Err(Error::Unsupported("this model does not run unit by unit".into()))
    }

    /// Forward of unit `unit` (0, 1, ... in order) with its parameters gathered:
    /// `params` holds them whole, in the order `units()[unit]` lists them. After the
    /// last unit, returns the batch's summed loss and its correct predictions.
    fn unit_forward(&mut self, unit: usize, params: &[f32]) -> Result<Option<(f64, usize)>> {
        let _ = (unit, params);
        Err(Error::Unsupported("this model does not run unit by unit".into()))
    }

    /// Backward of unit `unit` (from the last down to 0), with its parameters gathered
    /// again (none for the root, which the model kept): writes the gradients of the
    /// batch's mean loss with respect to the unit's parameters into `grads`, in the
    /// order and shapes of `params`.
    fn unit_backward(&mut self, unit: usize, params: &[f32], grads: &mut [f32]) -> Result<()> {
        let _ = (unit, params, grads);
        Err(Error::Unsupported("this model does not run unit by unit".into()))
    }

    // (1.2.) Fully sharded model pieces (ZeRO stage 3 inside a pipeline stage): a
    // piece built as a row shard ([`ComputeBackend::build_piece_shard`]) holds its rows
    // of every parameter of the piece (its `layout`, `read_params`, `write_params` and
    // `params_mut` are the shard's) and runs the stage interface one unit at a time:
    // each of its [`Model::segments`] is one unit, whose parameters [`Model::units`]
    // lists (indices of `layout()`, every parameter in exactly one unit, none kept by
    // the model). Before a segment's forward, and again before its backward, the
    // strategy writes the segment's parameters whole into the piece's buffer
    // ([`Model::piece_params_mut`]); a segment's backward adds its gradients into the
    // piece's gradient buffer ([`Model::piece_grads_mut`]), from which the strategy
    // takes them. Both buffers are laid out as the piece held whole
    // ([`ComputeBackend::piece_layout`]) and are private memory of the model (its
    // heap), which the strategy may hand back to the kernel a page at a time between
    // uses (setting it to zeros), so only the units in use are resident.

    /// A piece shard's buffer of the whole piece's parameters, lent; `None` (the
    /// default): the model is no piece shard.
    fn piece_params_mut(&mut self) -> Result<Option<&mut [f32]>> {
        Ok(None)
    }

    /// A piece shard's buffer of the whole piece's gradients, lent; `None` (the
    /// default): the model is no piece shard.
    fn piece_grads_mut(&mut self) -> Result<Option<&mut [f32]>> {
        Ok(None)
    }
}

/// Builds models on a device (`"cpu"`, `"cuda:0"`).
pub trait ComputeBackend: Send + Sync {
    fn device(&self) -> &str;
    /// The model kinds this backend builds.
    fn model_kinds(&self) -> Vec<String>;
    /// Checks `spec` (unknown keys are errors naming the key) and reports the model's
    /// parameters, blocks and input, without building it.
    fn describe(&self, spec: &ModelSpec) -> Result<ModelInfo>;

    /// The parameters of `piece` and where they come from in the whole model; fails on
    /// a piece the model cannot be cut into (a tensor width that does not divide it).
    fn piece_layout(&self, spec: &ModelSpec, piece: &Piece) -> Result<PieceLayout> {
        let info = self.describe(spec)?;
        if *piece == Piece::whole(info.blocks.len()) {
            return Ok(PieceLayout::whole(&info.layout, 0));
        }
        Err(Error::Unsupported(format!(
            "compute backend `{}` cannot cut `{}` models",
            self.device(),
            spec.kind
        )))
    }
    /// A model with parameters initialised deterministically from `seed`.
    fn build_model(&self, spec: &ModelSpec, seed: u64) -> Result<Box<dyn Model>>;

    /// The part `piece` of the model, its parameters exactly those of
    /// `build_model(spec, seed)` sliced by [`ComputeBackend::piece_layout`].
    fn build_piece(&self, spec: &ModelSpec, piece: &Piece, seed: u64) -> Result<Box<dyn Model>> {
        let _ = (spec, piece, seed);
        Err(Error::Unsupported(format!("compute backend `{}` cannot build model pieces", self.device())))
    }

    /// Row shard `shard` of the whole model ([`PieceLayout::row_shard`]), its values
    /// exactly those of `build_model(spec, seed)` sliced so, running unit by unit
    /// ([`Model::units`]) for ZeRO stage 3.
    fn build_shard(&self, spec: &ModelSpec, shard: ParamShard, seed: u64) -> Result<Box<dyn Model>> {
        let _ = (shard, seed);
        Err(Error::Unsupported(format!(
            "compute backend `{}` cannot shard `{}` models' parameters (ZeRO stage 3)",
            self.device(),
            spec.kind
        )))
    }

    /// (1.2.) Row shard `shard` of `piece` ([`PieceLayout::rows`] of its
    /// [`ComputeBackend::piece_layout`]), its values exactly those of
    /// `build_piece(spec, piece, seed)` sliced so, running the stage interface unit by
    /// unit (see [`Model::piece_params_mut`]) for ZeRO stage 3 inside a pipeline stage.
    fn build_piece_shard(
        &self,
        spec: &ModelSpec,
        piece: &Piece,
        shard: ParamShard,
        seed: u64,
    ) -> Result<Box<dyn Model>> {
        let _ = (piece, shard, seed);
        Err(Error::Unsupported(format!(
            "compute backend `{}` cannot shard the parameters of pieces of `{}` models (ZeRO stage 3 \
             inside a pipeline stage)",
            self.device(),
            spec.kind
        )))
    }

    /// (1.5.) How `spec`'s model is laid out as Hugging Face transformers saves it
    /// (`save_pretrained`: `config.json` and `model.safetensors`), for
    /// `sheaf export --format hf` and `--init-from` a transformers directory.
    fn hf_layout(&self, spec: &ModelSpec) -> Result<HfLayout> {
        Err(Error::Unsupported(format!(
            "compute backend `{}` has no Hugging Face layout for `{}` models",
            self.device(),
            spec.kind
        )))
    }

    /// (1.5.) The model a transformers `config.json` describes, as a model kind and its
    /// `[model]` settings (JSON): what `--init-from DIR` fills a job's `[model]` with.
    /// An architecture the backend does not build is an error naming it.
    fn hf_model(&self, config_json: &str) -> Result<ModelSpec> {
        let _ = config_json;
        Err(Error::Unsupported(format!(
            "compute backend `{}` reads no Hugging Face configurations",
            self.device()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(shapes: &[&[usize]]) -> ParamLayout {
        ParamLayout::new(
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| ParamSpec { name: format!("p{i}"), shape: s.to_vec() })
                .collect(),
        )
    }

    /// Rows of a piece are rows of the rows it holds: for every count and index, the
    /// whole model's values a shard of a piece names are the piece's own rows
    /// `chunk_range(rows, count, index)`, its sources' ranges followed in order (a
    /// parameter held as three row ranges, as a tensor slice holds q, k and v); the
    /// shards of a piece tile it; the rows of the whole model as a piece are
    /// [`PieceLayout::row_shard`]; a parameter held by columns is refused.
    #[test]
    fn rows_of_a_piece_are_rows_of_its_rows() {
        let whole = layout(&[&[9, 2], &[5], &[4, 3]]);
        let full: Vec<f32> = (0..whole.total()).map(|v| v as f32).collect();
        let piece = PieceLayout {
            layout: layout(&[&[6, 2], &[4, 3]]),
            sources: vec![
                ShardSource { param: 0, by_columns: false, ranges: vec![1..3, 4..6, 7..9] },
                ShardSource::whole(2, 4),
            ],
            activation_bytes_per_sample: 7,
        };
        let values = piece.slice(&whole, &full);
        for count in 1..=7 {
            let mut tiled = Vec::new();
            for index in 0..count {
                let rows = piece.rows(ParamShard { index, count }).unwrap();
                assert_eq!(rows.activation_bytes_per_sample, 7);
                let got = rows.slice(&whole, &full);
                // The piece's own rows of each parameter, in its order.
                let mut want = Vec::new();
                for (i, s) in piece.layout.specs().iter().enumerate() {
                    let per_row = s.numel() / s.shape[0];
                    let own = crate::chunk_range(s.shape[0], count, index);
                    let at = piece.layout.range(i).start;
                    want.extend_from_slice(&values[at + own.start * per_row..at + own.end * per_row]);
                    assert_eq!(rows.layout.specs()[i].shape[0], own.len());
                }
                assert_eq!(got, want, "shard {index} of {count}");
                tiled.extend(rows.full_indices(&whole));
            }
            tiled.sort_unstable();
            let mut all = piece.full_indices(&whole);
            all.sort_unstable();
            assert_eq!(tiled, all, "{count} shards tile the piece once");
        }
        let as_piece = PieceLayout::whole(&whole, 3);
        for count in 1..=11 {
            for index in 0..count {
                let shard = ParamShard { index, count };
                assert_eq!(as_piece.rows(shard).unwrap(), PieceLayout::row_shard(&whole, shard, 3));
            }
        }
        let columns = PieceLayout {
            layout: layout(&[&[4, 1]]),
            sources: vec![ShardSource {
                param: 2,
                by_columns: true,
                ranges: std::iter::once(1..2).collect(),
            }],
            activation_bytes_per_sample: 0,
        };
        let e = columns.rows(ParamShard { index: 0, count: 2 }).unwrap_err().to_string();
        assert!(e.contains("by columns"), "{e}");
        assert!(piece.rows(ParamShard { index: 2, count: 2 }).is_err());
    }
}
