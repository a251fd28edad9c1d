//! Sheaf plugin: compute on candle-core. Builds the MLPs a job describes and runs
//! forward and backward with candle's autograd (`Var` + `backward`, measured faster
//! here than candle-nn's layers for these sizes).
//!
//! Parameters are initialised on the host from the seed, exactly as PyTorch's
//! `nn.Linear` does (uniform in +-1/sqrt(fan_in)), so every device and every rank
//! starts from the same numbers. The loss is the mean cross-entropy of the batch.
//! `cuda:N` needs the `cuda` feature; without it the error says so.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::Deserialize;
use sheaf_core::{
    Activation, Batch, ComputeBackend, Error, Model, ModelSpec, ParamLayout, Piece, PluginKind, Provided,
    Result, SplitMix64,
};

/// The plugin as exported to the host.
pub struct CandlePlugin;

impl sheaf_abi::Plugin for CandlePlugin {
    const NAME: &'static str = "sheaf-compute-candle";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn provides() -> Vec<Provided> {
        vec![Provided { kind: PluginKind::Compute, name: "candle".into() }]
    }

    fn compute(name: &str, config: &str) -> Result<Box<dyn ComputeBackend>> {
        if name != "candle" {
            return Err(Error::config(
                "compute.backend",
                format!("unknown backend `{name}` (this plugin has candle)"),
            ));
        }
        let config: CandleConfig = if config.trim().is_empty() {
            CandleConfig::default()
        } else {
            serde_json::from_str(config).map_err(|e| Error::config("compute", e))?
        };
        Ok(Box::new(CandleBackend::new(&config.device)?))
    }
}

sheaf_abi::export_plugin!(CandlePlugin);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CandleConfig {
    device: String,
}

impl Default for CandleConfig {
    fn default() -> Self {
        CandleConfig { device: "cpu".into() }
    }
}

fn candle_err(what: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::Other(format!("candle: {what}: {e}"))
}

/// A compute backend on one candle device.
pub struct CandleBackend {
    name: String,
    device: Device,
}

impl CandleBackend {
    /// `"cpu"` or `"cuda:N"`.
    pub fn new(device: &str) -> Result<CandleBackend> {
        let dev = match device {
            "cpu" => Device::Cpu,
            d if d.starts_with("cuda") => cuda_device(d)?,
            other => {
                return Err(Error::config(
                    "compute.device",
                    format!("unknown device `{other}` (cpu, cuda:N)"),
                ))
            }
        };
        Ok(CandleBackend { name: device.to_owned(), device: dev })
    }
}

fn cuda_ordinal(d: &str) -> Result<usize> {
    match d {
        "cuda" => Ok(0),
        _ => d
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::config("compute.device", format!("`{d}` is not cuda:N"))),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(d: &str) -> Result<Device> {
    Device::new_cuda(cuda_ordinal(d)?).map_err(candle_err("opening the CUDA device"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(d: &str) -> Result<Device> {
    cuda_ordinal(d)?;
    Err(Error::config(
        "compute.device",
        format!("`{d}` asked for, but sheaf-compute-candle was built without CUDA support (rebuild with --features cuda)"),
    ))
}

impl ComputeBackend for CandleBackend {
    fn device(&self) -> &str {
        &self.name
    }

    fn build_model(&self, spec: &ModelSpec, seed: u64) -> Result<Box<dyn Model>> {
        spec.validate()?;
        Ok(Box::new(Mlp::new(spec, seed, self.device.clone())?))
    }

    fn build_piece(&self, spec: &ModelSpec, piece: &Piece, seed: u64) -> Result<Box<dyn Model>> {
        Ok(Box::new(Stage::new(spec, piece, seed, self.device.clone())?))
    }
}

/// The values of `piece` of [`init_params`]`(spec, seed)`, drawn without building the
/// whole model's: each parameter value is the draw at its index in the whole model's
/// stream, which SplitMix64 reaches by skipping. A piece of a model too big for one
/// worker never holds more than its own parameters.
pub fn init_piece(spec: &ModelSpec, piece: &Piece, seed: u64) -> Vec<f32> {
    let layout = spec.layout();
    let start = SplitMix64::new(seed ^ INIT_STREAM);
    // Parameter `p` covers `layout.range(p)`; its bound comes from layer `p / 2`.
    let mut p = 0;
    piece
        .full_indices(spec)
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
pub fn init_params(spec: &ModelSpec, seed: u64) -> Vec<f32> {
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
    spec: ModelSpec,
    layout: ParamLayout,
    vars: Vec<Var>,
    device: Device,
}

impl Mlp {
    pub fn new(spec: &ModelSpec, seed: u64, device: Device) -> Result<Mlp> {
        let layout = spec.layout();
        let vars = vars_from(&layout, &init_params(spec, seed), &device)?;
        Ok(Mlp { spec: spec.clone(), layout, vars, device })
    }

    fn check_batch(&self, batch: &Batch<'_>) -> Result<()> {
        let d = self.spec.layers[0];
        if batch.input_dim != d || batch.inputs.len() != batch.len() * d {
            return Err(Error::invalid(format!(
                "batch of {} samples with {} inputs each ({} values) does not fit a model with {d} inputs",
                batch.len(),
                batch.input_dim,
                batch.inputs.len()
            )));
        }
        let classes = *self.spec.layers.last().expect("validated");
        if let Some(&bad) = batch.labels.iter().find(|&&l| l as usize >= classes) {
            return Err(Error::invalid(format!("label {bad} but the model has {classes} classes")));
        }
        Ok(())
    }

    /// Logits and log-probabilities of a batch, and the one-hot labels.
    fn forward(&self, batch: &Batch<'_>) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let n = batch.len();
        let x = Tensor::from_slice(batch.inputs, (n, batch.input_dim), &self.device)?;
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
        self.check_batch(batch)?;
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
            let (_, log_probs, one_hot) = self.forward(batch)?;
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
        self.check_batch(batch)?;
        if batch.is_empty() {
            return Ok((0.0, 0));
        }
        let eval = || -> candle_core::Result<(f64, usize)> {
            let (logits, log_probs, one_hot) = self.forward(batch)?;
            let loss = (log_probs * one_hot)?.sum_all()?.to_scalar::<f32>()?;
            let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let correct = predicted.iter().zip(batch.labels).filter(|(p, l)| p == l).count();
            Ok((-f64::from(loss), correct))
        };
        eval().map_err(candle_err("evaluate"))
    }
}

#[cfg(test)]
mod tests;

/// One model piece for the stage interface (a pipeline stage): its layers as candle
/// `Var`s, the activations each micro-batch's forward keeps, and accumulated gradients.
pub struct Stage {
    spec: ModelSpec,
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
    pub fn new(spec: &ModelSpec, piece: &Piece, seed: u64, device: Device) -> Result<Stage> {
        spec.validate()?;
        piece.validate(spec)?;
        let n = spec.layers.len() - 1;
        if piece.tensor_width > 1 && piece.layers != (0..n) {
            return Err(Error::Unsupported(
                "a tensor-parallel piece holds slices of every layer; pipeline stages of tensor-parallel slices are not supported".into(),
            ));
        }
        let layout = piece.layout(spec);
        let init = init_piece(spec, piece, seed);
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
        self.vars[2 * (l - self.piece.layers.start)].as_tensor()
    }

    fn bias(&self, l: usize) -> &Tensor {
        self.vars[2 * (l - self.piece.layers.start) + 1].as_tensor()
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
            (0, _) | (_, 0) => self.spec.layers[self.piece.layers.start],
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
            for l in self.piece.layers.clone() {
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

/// One `Var` per parameter of `layout`, from flat `values`.
fn vars_from(layout: &ParamLayout, values: &[f32], device: &Device) -> Result<Vec<Var>> {
    layout
        .specs()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let t = Tensor::from_slice(&values[layout.range(i)], s.shape.as_slice(), device)
                .map_err(candle_err("creating a parameter"))?;
            Var::from_tensor(&t).map_err(candle_err("creating a parameter"))
        })
        .collect()
}

fn read_vars(layout: &ParamLayout, vars: &[Var], out: &mut [f32]) -> Result<()> {
    if out.len() != layout.total() {
        return Err(Error::invalid(format!("{} values for {} parameters", out.len(), layout.total())));
    }
    for (i, v) in vars.iter().enumerate() {
        let values =
            v.as_tensor().flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(candle_err("reading"))?;
        out[layout.range(i)].copy_from_slice(&values);
    }
    Ok(())
}

fn write_vars(layout: &ParamLayout, vars: &[Var], src: &[f32], device: &Device) -> Result<()> {
    if src.len() != layout.total() {
        return Err(Error::invalid(format!("{} values for {} parameters", src.len(), layout.total())));
    }
    for (i, v) in vars.iter().enumerate() {
        let shape = layout.specs()[i].shape.as_slice();
        let t = Tensor::from_slice(&src[layout.range(i)], shape, device).map_err(candle_err("writing"))?;
        v.set(&t).map_err(candle_err("writing"))?;
    }
    Ok(())
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
                self.piece.layers
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
            for (i, v) in self.vars.iter().enumerate() {
                // A segment uses some of the piece's parameters only.
                let Some(gv) = store.get(v.as_tensor()) else { continue };
                for (acc, d) in
                    self.grads[self.layout.range(i)].iter_mut().zip(gv.flatten_all()?.to_vec1::<f32>()?)
                {
                    *acc += d;
                }
            }
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
            // A zero scale (an evaluation pass) needs no gradient: candle drops the
            // graph of a product with zero.
            let grad = if scale == 0.0 {
                vec![0.0; logits.len()]
            } else {
                let store = sum.affine(f64::from(scale), 0.0)?.backward()?;
                match store.get(z.as_tensor()) {
                    Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
                    None => vec![0.0; logits.len()],
                }
            };
            let predicted = z.as_tensor().argmax(D::Minus1)?.to_vec1::<u32>()?;
            let correct = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
            Ok((f64::from(sum.to_scalar::<f32>()?), correct, grad))
        };
        run().map_err(candle_err("loss"))
    }

    fn take_grads(&mut self, out: &mut [f32]) -> Result<()> {
        if out.len() != self.grads.len() {
            return Err(Error::invalid(format!(
                "{} gradient slots for {} parameters",
                out.len(),
                self.grads.len()
            )));
        }
        out.copy_from_slice(&self.grads);
        self.grads.fill(0.0);
        Ok(())
    }

    fn drop_saved(&mut self) {
        self.saved.clear();
        self.saved_bytes = 0;
    }

    fn saved_bytes(&self) -> u64 {
        self.saved_bytes
    }
}

/// Log-probabilities of `logits` and the one-hot matrix of `labels`.
fn log_softmax_one_hot(
    logits: &Tensor,
    labels: &[u32],
    classes: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    let mut one_hot = vec![0f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        one_hot[i * classes + l as usize] = 1.0;
    }
    Ok((log_probs, Tensor::from_vec(one_hot, (labels.len(), classes), device)?))
}
