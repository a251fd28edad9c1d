//! The multilayer perceptron (`model.kind = "mlp"`): its settings, its pieces (a
//! pipeline stage of layers, Megatron column/row slices of layer pairs), the whole
//! model and the stage interface.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::Deserialize;
use sheaf_core::{
    chunk_range, Batch, Block, Error, Model, ModelInfo, ModelInput, ModelSpec, ParamLayout, ParamSpec, Piece,
    PieceLayout, Result, ShardSource, SplitMix64,
};

use crate::{
    add_var_grads, candle_err, log_softmax_one_hot, loss_sum_correct_grad, read_vars, take_accumulated,
    vars_from, write_vars,
};

pub(crate) mod fused;
pub(crate) mod kind;

/// Nonlinearity between hidden layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Tanh,
}

/// `[model]` of kind `mlp`: `layers[0]` inputs, `layers.last()` classes.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpSpec {
    pub layers: Vec<usize>,
    #[serde(default = "relu")]
    pub activation: Activation,
}

fn relu() -> Activation {
    Activation::Relu
}

impl MlpSpec {
    pub fn parse(spec: &ModelSpec) -> Result<MlpSpec> {
        let asked = serde_json::from_str::<serde_json::Value>(&spec.config)
            .is_ok_and(|v| v.get("activation_checkpointing").is_some());
        if asked {
            return Err(Error::config(
                "train.activation_checkpointing",
                "the mlp kind does not recompute activations: each of its layers keeps one activation, \
                 its output, which is the next layer's input, so a layer that kept only its input \
                 would keep as much (the gpt kind's blocks recompute)",
            ));
        }
        let s: MlpSpec = crate::parse_config("mlp", &spec.config)?;
        if s.layers.len() < 2 {
            return Err(Error::config("model.layers", "needs at least an input and an output width"));
        }
        if let Some(i) = s.layers.iter().position(|&w| w == 0) {
            return Err(Error::config("model.layers", format!("width {i} is zero")));
        }
        Ok(s)
    }

    /// `layers.{i}.weight` (`[out, in]`) then `layers.{i}.bias` (`[out]`) per layer.
    pub fn layout(&self) -> ParamLayout {
        let specs = self
            .layers
            .windows(2)
            .enumerate()
            .flat_map(|(i, w)| {
                [
                    ParamSpec { name: format!("layers.{i}.weight"), shape: vec![w[1], w[0]] },
                    ParamSpec { name: format!("layers.{i}.bias"), shape: vec![w[1]] },
                ]
            })
            .collect();
        ParamLayout::new(specs)
    }

    fn n(&self) -> usize {
        self.layers.len() - 1
    }

    /// The batch's rows, checked against the model.
    pub(crate) fn check_rows<'b>(&self, batch: &Batch<'b>) -> Result<Rows<'b>> {
        let Batch::Rows { inputs, labels, input_dim } = *batch else {
            return Err(Error::invalid("an mlp takes rows of features, not token windows"));
        };
        let d = self.layers[0];
        if input_dim != d || inputs.len() != labels.len() * d {
            return Err(Error::invalid(format!(
                "batch of {} samples with {input_dim} inputs each ({} values) does not fit a model with {d} inputs",
                labels.len(),
                inputs.len()
            )));
        }
        let classes = *self.layers.last().expect("validated");
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes) {
            return Err(Error::invalid(format!("label {bad} but the model has {classes} classes")));
        }
        Ok(Rows { inputs, labels })
    }

    pub fn info(&self) -> ModelInfo {
        ModelInfo {
            layout: self.layout(),
            blocks: self
                .layers
                .windows(2)
                .enumerate()
                .map(|(i, w)| Block { name: format!("layers.{i}"), params: (w[0] * w[1] + w[1]) as u64 })
                .collect(),
            input: ModelInput::Rows {
                features: self.layers[0],
                classes: *self.layers.last().expect("validated"),
            },
        }
    }

    /// Checks `piece`: blocks in range, and every sliced width divisible by the group.
    pub fn validate_piece(&self, piece: &Piece) -> Result<()> {
        piece.validate(self.n())?;
        if piece.tensor_width > 1 {
            for l in piece.blocks.clone() {
                let (width, what) = match paired(l, self.n()) {
                    Some(true) => (self.layers[l + 1], "output"),
                    Some(false) => (self.layers[l], "input"),
                    None => continue,
                };
                if !width.is_multiple_of(piece.tensor_width) {
                    return Err(Error::config(
                        "parallel.options.tensor-parallel.width",
                        format!(
                            "a tensor-parallel width of {} does not divide the {width} {what} features of layer {l}",
                            piece.tensor_width
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// How layer `l` (one of the piece's) is held.
    pub fn cut(&self, piece: &Piece, l: usize) -> LayerCut {
        if piece.tensor_width == 1 {
            return LayerCut::Whole;
        }
        let part = |width: usize| chunk_range(width, piece.tensor_width, piece.tensor_rank);
        match paired(l, self.n()) {
            Some(true) => LayerCut::Column { rows: part(self.layers[l + 1]) },
            Some(false) => LayerCut::Row { cols: part(self.layers[l]) },
            None => LayerCut::Whole,
        }
    }

    /// The piece's parameters (the whole model's names, sliced shapes) and where they
    /// come from.
    pub fn piece_layout(&self, piece: &Piece) -> Result<PieceLayout> {
        self.validate_piece(piece)?;
        if piece.tensor_width > 1 && piece.blocks != (0..self.n()) {
            return Err(Error::Unsupported(
                "an mlp's tensor-parallel piece holds slices of every layer; pipeline stages of mlp slices are not supported (a gpt's are)".into(),
            ));
        }
        let mut specs = Vec::new();
        let mut sources = Vec::new();
        for l in piece.blocks.clone() {
            let (inp, out) = (self.layers[l], self.layers[l + 1]);
            let (w, b, ws, bs) = match self.cut(piece, l) {
                LayerCut::Whole => (vec![out, inp], out, (false, 0..out), 0..out),
                LayerCut::Column { rows } => (vec![rows.len(), inp], rows.len(), (false, rows.clone()), rows),
                LayerCut::Row { cols } => (vec![out, cols.len()], out, (true, cols), 0..out),
            };
            specs.push(ParamSpec { name: format!("layers.{l}.weight"), shape: w });
            specs.push(ParamSpec { name: format!("layers.{l}.bias"), shape: vec![b] });
            sources.push(ShardSource { param: 2 * l, by_columns: ws.0, ranges: vec![ws.1] });
            sources.push(ShardSource { param: 2 * l + 1, by_columns: false, ranges: vec![bs] });
        }
        Ok(PieceLayout {
            layout: ParamLayout::new(specs),
            sources,
            activation_bytes_per_sample: self.activation_bytes_per_row(piece),
        })
    }

    /// Bytes one row keeps from the piece's forward pass for its backward pass: the
    /// piece's input and, per layer, its output before and after the nonlinearity.
    fn activation_bytes_per_row(&self, piece: &Piece) -> u64 {
        let width = |l: usize| match self.cut(piece, l) {
            LayerCut::Column { rows } => rows.len(),
            _ => self.layers[l + 1],
        };
        let per_row =
            self.layers[piece.blocks.start] + piece.blocks.clone().map(|l| 2 * width(l)).sum::<usize>();
        (per_row * 4) as u64
    }
}

/// How one linear layer is held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerCut {
    Whole,
    /// Output rows `rows` of the weight and bias.
    Column {
        rows: Range<usize>,
    },
    /// Input columns `cols` of the weight; the bias whole.
    Row {
        cols: Range<usize>,
    },
}

/// Within a tensor-parallel model of `n` layers: `Some(true)` for the first layer of
/// a pair (column-parallel), `Some(false)` for the second (row-parallel), `None` for an
/// unpaired last layer.
fn paired(l: usize, n: usize) -> Option<bool> {
    if l.is_multiple_of(2) {
        (l + 1 < n).then_some(true)
    } else {
        Some(false)
    }
}

/// The values of `piece` of [`init_params`]`(spec, seed)`, drawn without building the
/// whole model's: each parameter value is the draw at its index in the whole model's
/// stream, which SplitMix64 reaches by skipping. A piece of a model too big for one
/// worker never holds more than its own parameters.
pub fn init_piece(spec: &MlpSpec, piece: &Piece, seed: u64) -> Result<Vec<f32>> {
    Ok(init_values(spec, &spec.piece_layout(piece)?, seed))
}

/// The values of the parameters `piece` lays out (a piece, a row shard) of
/// [`init_params`]`(spec, seed)`, drawn as [`init_piece`] draws them.
pub(crate) fn init_values(spec: &MlpSpec, piece: &PieceLayout, seed: u64) -> Vec<f32> {
    let layout = spec.layout();
    let indices = piece.full_indices(&layout);
    let start = SplitMix64::new(seed ^ INIT_STREAM);
    // Parameter `p` covers `layout.range(p)`; its bound comes from layer `p / 2`.
    let mut p = 0;
    indices
        .into_iter()
        .map(|i| {
            if !layout.range(p).contains(&i) {
                p = (0..layout.specs().len()).find(|&q| layout.range(q).contains(&i)).expect("in the layout");
            }
            let mut rng = start.clone();
            rng.skip(i as u64);
            rng.next_f32() * (1.0 / (spec.layers[p / 2] as f32).sqrt())
        })
        .collect()
}

const INIT_STREAM: u64 = 0x1F2E_3D4C_5B6A_7988;

/// PyTorch's `nn.Linear` initialisation, drawn from a seeded SplitMix64: every
/// parameter uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in))`.
pub fn init_params(spec: &MlpSpec, seed: u64) -> Vec<f32> {
    let layout = spec.layout();
    let mut out = vec![0f32; layout.total()];
    let mut rng = SplitMix64::new(seed ^ INIT_STREAM);
    for (i, s) in layout.specs().iter().enumerate() {
        let fan_in = spec.layers[i / 2];
        let bound = 1.0 / (fan_in as f32).sqrt();
        for v in &mut out[layout.range(i)] {
            *v = rng.next_f32() * bound;
        }
        debug_assert_eq!(s.numel(), layout.range(i).len());
    }
    out
}

/// A multilayer perceptron held as candle `Var`s: `[w0, b0, w1, b1, ...]`.
pub struct Mlp {
    spec: MlpSpec,
    layout: ParamLayout,
    vars: Vec<Var>,
    device: Device,
}

impl Mlp {
    pub fn new(spec: &MlpSpec, seed: u64, device: Device) -> Result<Mlp> {
        let layout = spec.layout();
        let vars = vars_from(&layout, &init_params(spec, seed), &device)?;
        Ok(Mlp { spec: spec.clone(), layout, vars, device })
    }

    /// Logits and log-probabilities of a batch, and the one-hot labels.
    fn forward(&self, batch: &Rows<'_>) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let n = batch.labels.len();
        let x = Tensor::from_slice(batch.inputs, (n, self.spec.layers[0]), &self.device)?;
        let layers = self.vars.len() / 2;
        let mut h = x;
        for l in 0..layers {
            let (w, b) = (self.vars[2 * l].as_tensor(), self.vars[2 * l + 1].as_tensor());
            h = h.matmul(&w.t()?)?.broadcast_add(b)?;
            if l + 1 < layers {
                h = match self.spec.activation {
                    Activation::Tanh => h.tanh()?,
                    _ => h.relu()?,
                };
            }
        }
        let classes = *self.spec.layers.last().expect("validated");
        let (log_probs, one_hot) = log_softmax_one_hot(&h, batch.labels, classes, &self.device)?;
        Ok((h, log_probs, one_hot))
    }
}

impl Model for Mlp {
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
        let rows = self.spec.check_rows(batch)?;
        if grads.len() != self.layout.total() {
            return Err(Error::invalid(format!(
                "{} gradient slots for {} parameters",
                grads.len(),
                self.layout.total()
            )));
        }
        if batch.is_empty() {
            grads.fill(0.0);
            return Ok(0.0);
        }
        let n = batch.len() as f64;
        let mut step = || -> candle_core::Result<f32> {
            let (_, log_probs, one_hot) = self.forward(&rows)?;
            let loss = (log_probs * one_hot)?.sum_all()?.affine(-1.0 / n, 0.0)?;
            let store = loss.backward()?;
            for (i, v) in self.vars.iter().enumerate() {
                let g = store.get(v.as_tensor()).expect("every parameter takes part in the loss");
                grads[self.layout.range(i)].copy_from_slice(&g.flatten_all()?.to_vec1::<f32>()?);
            }
            loss.to_dtype(DType::F32)?.to_scalar::<f32>()
        };
        step().map_err(candle_err("forward/backward"))
    }

    fn evaluate(&mut self, batch: &Batch<'_>) -> Result<(f64, usize)> {
        let rows = self.spec.check_rows(batch)?;
        if batch.is_empty() {
            return Ok((0.0, 0));
        }
        let eval = || -> candle_core::Result<(f64, usize)> {
            let (logits, log_probs, one_hot) = self.forward(&rows)?;
            let loss = (log_probs * one_hot)?.sum_all()?.to_scalar::<f32>()?;
            let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let correct = predicted.iter().zip(rows.labels).filter(|(p, l)| p == l).count();
            Ok((-f64::from(loss), correct))
        };
        eval().map_err(candle_err("evaluate"))
    }

    fn predict(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
        let rows = self.spec.check_rows(batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let run = || self.forward(&rows)?.0.flatten_all()?.to_vec1::<f32>();
        run().map_err(candle_err("predict"))
    }
}

/// One model piece for the stage interface (a pipeline stage): its layers as candle
/// `Var`s, the activations each micro-batch's forward keeps, and accumulated gradients.
pub struct Stage {
    spec: MlpSpec,
    piece: Piece,
    layout: ParamLayout,
    vars: Vec<Var>,
    device: Device,
    grads: Vec<f32>,
    /// Per micro-batch and segment: the input (a `Var`, for its gradient), the
    /// output, and the bytes the graph between them keeps.
    saved: HashMap<(u64, usize), (Var, Tensor, u64)>,
    saved_bytes: u64,
}

impl Stage {
    pub fn new(spec: &MlpSpec, piece: &Piece, seed: u64, device: Device) -> Result<Stage> {
        let layout = spec.piece_layout(piece)?.layout;
        let n = spec.layers.len() - 1;
        if piece.tensor_width > 1 && piece.blocks != (0..n) {
            return Err(Error::Unsupported(
                "a tensor-parallel piece holds slices of every layer; pipeline stages of tensor-parallel slices are not supported".into(),
            ));
        }
        let init = init_piece(spec, piece, seed)?;
        let vars = vars_from(&layout, &init, &device)?;
        Ok(Stage {
            spec: spec.clone(),
            piece: piece.clone(),
            grads: vec![0.0; layout.total()],
            layout,
            vars,
            device,
            saved: HashMap::new(),
            saved_bytes: 0,
        })
    }

    fn layers(&self) -> usize {
        self.spec.layers.len() - 1
    }

    fn tensor_parallel(&self) -> bool {
        self.piece.tensor_width > 1
    }

    fn weight(&self, l: usize) -> &Tensor {
        self.vars[2 * (l - self.piece.blocks.start)].as_tensor()
    }

    fn bias(&self, l: usize) -> &Tensor {
        self.vars[2 * (l - self.piece.blocks.start) + 1].as_tensor()
    }

    fn activate(&self, h: Tensor) -> candle_core::Result<Tensor> {
        match self.spec.activation {
            Activation::Tanh => h.tanh(),
            _ => h.relu(),
        }
    }

    /// Column/row pairs of a tensor-parallel piece.
    fn pairs(&self) -> usize {
        if self.tensor_parallel() {
            self.layers() / 2
        } else {
            0
        }
    }

    /// Width of segment `seg`'s input.
    fn input_width(&self, seg: usize) -> usize {
        match (self.pairs(), seg) {
            (0, _) | (_, 0) => self.spec.layers[self.piece.blocks.start],
            (_, s) => self.spec.layers[2 * s.div_ceil(2)],
        }
    }

    /// Segment `seg` on `h`: the output, and how many values the autograd graph keeps.
    /// Without tensor parallelism: every layer. With it, even segments are pair
    /// `seg / 2`'s column layer and its row layer without bias (a partial sum); odd
    /// segments are replicated: the row layer's bias (after the sum), the
    /// nonlinearity, and after the last pair an unpaired last layer.
    fn run_segment(&self, seg: usize, mut h: Tensor) -> candle_core::Result<(Tensor, usize)> {
        let last = self.layers();
        let mut kept = h.elem_count();
        let mut keep = |t: &Tensor| kept += t.elem_count();
        let whole = |l: usize, h: &Tensor| h.matmul(&self.weight(l).t()?)?.broadcast_add(self.bias(l));
        if self.pairs() == 0 {
            for l in self.piece.blocks.clone() {
                h = whole(l, &h)?;
                keep(&h);
                if l + 1 < last {
                    h = self.activate(h)?;
                    keep(&h);
                }
            }
        } else if seg.is_multiple_of(2) {
            let l = seg;
            h = self.activate(whole(l, &h)?)?;
            keep(&h);
            h = h.matmul(&self.weight(l + 1).t()?)?;
            keep(&h);
        } else {
            let l = seg;
            h = h.broadcast_add(self.bias(l))?;
            keep(&h);
            if l + 1 < last {
                h = self.activate(h)?;
                keep(&h);
            }
            if l + 2 == last {
                h = whole(last - 1, &h)?;
                keep(&h);
            }
        }
        Ok((h, kept))
    }
}

impl Model for Stage {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn read_params(&self, out: &mut [f32]) -> Result<()> {
        read_vars(&self.layout, &self.vars, out)
    }

    fn write_params(&mut self, src: &[f32]) -> Result<()> {
        write_vars(&self.layout, &self.vars, src, &self.device)
    }

    fn forward_backward(&mut self, _batch: &Batch<'_>, _grads: &mut [f32]) -> Result<f32> {
        Err(Error::Unsupported(
            "a model piece trains through the stage interface (a model-parallel strategy)".into(),
        ))
    }

    fn evaluate(&mut self, _batch: &Batch<'_>) -> Result<(f64, usize)> {
        Err(Error::Unsupported(
            "a model piece evaluates through the stage interface (a model-parallel strategy)".into(),
        ))
    }

    fn piece(&self) -> Option<Piece> {
        Some(self.piece.clone())
    }

    fn segments(&self) -> usize {
        (2 * self.pairs()).max(1)
    }

    fn stage_forward(&mut self, micro: u64, segment: usize, input: &[f32], rows: usize) -> Result<Vec<f32>> {
        if segment >= self.segments() {
            return Err(Error::invalid(format!("segment {segment} of a piece of {}", self.segments())));
        }
        let width = self.input_width(segment);
        if input.len() != rows * width {
            return Err(Error::invalid(format!(
                "stage input of {} values is not {rows} rows of {width} (layers {:?}, segment {segment})",
                input.len(),
                self.piece.blocks
            )));
        }
        if self.saved.contains_key(&(micro, segment)) {
            return Err(Error::BadState(format!("micro-batch {micro} ran forward twice without a backward")));
        }
        let run = || -> candle_core::Result<(Var, Tensor, usize, Vec<f32>)> {
            let x = Var::from_tensor(&Tensor::from_slice(input, (rows, width), &self.device)?)?;
            let (h, kept) = self.run_segment(segment, x.as_tensor().clone())?;
            let out = h.flatten_all()?.to_vec1::<f32>()?;
            Ok((x, h, kept, out))
        };
        let (x, h, kept, out) = run().map_err(candle_err("stage forward"))?;
        let bytes = 4 * kept as u64;
        self.saved.insert((micro, segment), (x, h, bytes));
        self.saved_bytes += bytes;
        Ok(out)
    }

    fn stage_backward(&mut self, micro: u64, segment: usize, grad_output: &[f32]) -> Result<Vec<f32>> {
        let (x, h, bytes) = self.saved.remove(&(micro, segment)).ok_or_else(|| {
            Error::BadState(format!(
                "backward of micro-batch {micro} segment {segment}, which ran no forward"
            ))
        })?;
        self.saved_bytes -= bytes;
        if grad_output.len() != h.elem_count() {
            return Err(Error::invalid(format!(
                "gradient of {} values for an output of {}",
                grad_output.len(),
                h.elem_count()
            )));
        }
        let mut run = || -> candle_core::Result<Vec<f32>> {
            let g = Tensor::from_slice(grad_output, h.shape(), &self.device)?;
            // d(sum(h * g))/dθ = J^T g: the vector-Jacobian product backward needs.
            let store = (&h * &g)?.sum_all()?.backward()?;
            add_var_grads(&self.layout, &self.vars, &store, &mut self.grads)?;
            match store.get(x.as_tensor()) {
                Some(gx) => gx.flatten_all()?.to_vec1::<f32>(),
                None => Ok(vec![0.0; x.as_tensor().elem_count()]),
            }
        };
        run().map_err(candle_err("stage backward"))
    }

    fn loss_grad(&mut self, logits: &[f32], labels: &[u32], scale: f32) -> Result<(f64, usize, Vec<f32>)> {
        let classes = *self.spec.layers.last().expect("validated");
        let rows = labels.len();
        if logits.len() != rows * classes {
            return Err(Error::invalid(format!(
                "{} logits for {rows} labels of {classes} classes",
                logits.len()
            )));
        }
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes) {
            return Err(Error::invalid(format!("label {bad} but the model has {classes} classes")));
        }
        if rows == 0 {
            return Ok((0.0, 0, Vec::new()));
        }
        let run = || -> candle_core::Result<(f64, usize, Vec<f32>)> {
            let z = Var::from_tensor(&Tensor::from_slice(logits, (rows, classes), &self.device)?)?;
            let (log_probs, one_hot) = log_softmax_one_hot(z.as_tensor(), labels, classes, &self.device)?;
            let sum = (log_probs * one_hot)?.sum_all()?.affine(-1.0, 0.0)?;
            loss_sum_correct_grad(&z, &sum, labels, scale)
        };
        run().map_err(candle_err("loss"))
    }

    fn take_grads(&mut self, out: &mut [f32]) -> Result<()> {
        take_accumulated(&mut self.grads, out)
    }

    fn drop_saved(&mut self) {
        self.saved.clear();
        self.saved_bytes = 0;
    }

    fn replicated_params(&self) -> Vec<bool> {
        // Under tensor parallelism: whole layers and the row layers' biases.
        let tp = self.tensor_parallel();
        self.piece
            .blocks
            .clone()
            .flat_map(|l| match self.spec.cut(&self.piece, l) {
                LayerCut::Whole => [tp, tp],
                LayerCut::Column { .. } => [false, false],
                LayerCut::Row { .. } => [false, tp],
            })
            .collect()
    }

    fn saved_bytes(&self) -> u64 {
        self.saved_bytes
    }
}

/// A batch's rows, checked.
pub(crate) struct Rows<'a> {
    pub(crate) inputs: &'a [f32],
    pub(crate) labels: &'a [u32],
}
