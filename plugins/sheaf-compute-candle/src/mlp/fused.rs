//! The whole MLP on the CPU without candle's graph: forward and backward written out
//! over the flat parameter buffer, each layer one `gemm` plus a pass that adds the
//! bias and applies the nonlinearity. Parameters live in the flat buffer itself (a
//! write is one copy), gradients are written straight into the caller's buffer, and
//! activations stay in buffers reused from step to step. The backward pass runs a
//! layer at a time ([`Model::backward_next`]), so a data-parallel strategy reduces the
//! last layers' gradients while the first layers' are computed.
//!
//! Profiled against candle's autograd on the reference MLP (784-512-512-10, batch
//! 256), the graph spent as long allocating, zeroing, broadcasting and copying as
//! multiplying; here the products are nearly all of a step.

use sheaf_core::{Batch, Error, Model, ParamLayout, ParamShard, PieceLayout, Result};

use crate::cpu::kernels::{
    column_sums, cross_entropy, elementwise, elementwise_in_place, fill_rows, matmul, on_compute_threads,
    threads, View,
};
use crate::mlp::{init_params, init_values, Activation, MlpSpec, Rows};
use crate::{check_values, whole_backward};

pub struct FusedMlp {
    spec: MlpSpec,
    layout: ParamLayout,
    params: Vec<f32>,
    threads: usize,
    /// The batch of the pass in progress: inputs and labels.
    input: Vec<f32>,
    labels: Vec<u32>,
    /// Each layer's output (after the nonlinearity; the last layer's logits).
    outputs: Vec<Vec<f32>>,
    /// The gradient with respect to the output of layer `next` (`delta`), and
    /// scratch for the one below.
    delta: Vec<f32>,
    scratch: Vec<f32>,
    /// The layer whose backward runs next (`layers()` when none is pending).
    next: usize,
    /// Whether `delta` is still that of layer `next` (its propagation to the layer
    /// below is owed to the next backward step).
    owed: bool,
    /// A row shard's own values (ZeRO stage 3): then `params` is empty, `layout` the
    /// shard's, and a pass runs layer by layer (each layer a unit) on gathered
    /// parameters.
    shard: Option<Shard>,
}

/// What a row shard of the MLP holds, and the pass under way.
struct Shard {
    values: Vec<f32>,
    train: bool,
    forward_done: usize,
}

/// Row shard `shard` of the MLP `spec`, its values those of the whole model's
/// initialisation.
pub fn shard(spec: &MlpSpec, shard: ParamShard, seed: u64) -> Result<FusedMlp> {
    shard.validate()?;
    let piece = PieceLayout::row_shard(&spec.layout(), shard, 0);
    let values = init_values(spec, &piece, seed);
    let mut model = FusedMlp::new_with(spec, Vec::new());
    model.layout = piece.layout;
    model.shard = Some(Shard { values, train: false, forward_done: 0 });
    Ok(model)
}

/// The forward pass of layer `l` (`w`, `b`) of `spec` on `n` rows of `x` into `dst`.
#[allow(clippy::too_many_arguments)]
fn layer_forward(
    spec: &MlpSpec,
    l: usize,
    w: &[f32],
    b: &[f32],
    x: &[f32],
    dst: &mut Vec<f32>,
    n: usize,
    threads: usize,
) {
    let (inp, out) = (spec.layers[l], spec.layers[l + 1]);
    dst.resize(n * out, 0.0);
    fill_rows(dst, b, threads);
    matmul(dst, true, View::rows(x, n, inp), View::rows(w, out, inp).t(), threads);
    if l + 2 < spec.layers.len() {
        match spec.activation {
            Activation::Relu => {
                elementwise_in_place(dst, threads, |d| d.iter_mut().for_each(|v| *v = v.max(0.0)))
            }
            Activation::Tanh => {
                elementwise_in_place(dst, threads, |d| d.iter_mut().for_each(|v| *v = v.tanh()))
            }
        }
    }
}

impl FusedMlp {
    pub fn new(spec: &MlpSpec, seed: u64) -> FusedMlp {
        FusedMlp::new_with(spec, init_params(spec, seed))
    }

    fn new_with(spec: &MlpSpec, params: Vec<f32>) -> FusedMlp {
        let layers = spec.layers.len() - 1;
        FusedMlp {
            spec: spec.clone(),
            layout: spec.layout(),
            params,
            threads: threads(),
            input: Vec::new(),
            labels: Vec::new(),
            outputs: vec![Vec::new(); layers],
            delta: Vec::new(),
            scratch: Vec::new(),
            next: 0,
            owed: false,
            shard: None,
        }
    }

    fn layers(&self) -> usize {
        self.spec.layers.len() - 1
    }

    fn rows(&self) -> usize {
        self.labels.len()
    }

    /// Copies in a batch of rows, checked against the model.
    fn load(&mut self, batch: &Batch<'_>) -> Result<()> {
        let Rows { inputs, labels } = self.spec.check_rows(batch)?;
        self.input.clear();
        self.input.extend_from_slice(inputs);
        self.labels.clear();
        self.labels.extend_from_slice(labels);
        self.next = 0;
        self.owed = false;
        Ok(())
    }

    /// The forward pass of the loaded batch: every layer's output.
    fn forward(&mut self) {
        for l in 0..self.layers() {
            let (w, b) = (self.layout.range(2 * l), self.layout.range(2 * l + 1));
            let params = std::mem::take(&mut self.params);
            self.forward_layer(l, &params[w], &params[b]);
            self.params = params;
        }
    }

    /// The forward pass of layer `l` with weight `w` and bias `b`.
    fn forward_layer(&mut self, l: usize, w: &[f32], b: &[f32]) {
        let mut dst = std::mem::take(&mut self.outputs[l]);
        let x = if l == 0 { &self.input } else { &self.outputs[l - 1] };
        layer_forward(&self.spec, l, w, b, x, &mut dst, self.rows(), self.threads);
        self.outputs[l] = dst;
    }

    fn logits(&self) -> &[f32] {
        &self.outputs[self.layers() - 1]
    }
}

impl Model for FusedMlp {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn read_params(&self, out: &mut [f32]) -> Result<()> {
        let own = self.shard.as_ref().map_or(&self.params[..], |s| &s.values[..]);
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
        self.whole("train on a whole batch")?;
        whole_backward(self, batch, grads)
    }

    fn backward_in_steps(&self) -> bool {
        self.shard.is_none()
    }

    fn units(&self) -> Vec<Vec<usize>> {
        match self.shard {
            Some(_) => (0..self.layers()).map(|l| vec![2 * l, 2 * l + 1]).collect(),
            None => Vec::new(),
        }
    }

    fn unit_begin(&mut self, batch: &Batch<'_>, train: bool) -> Result<()> {
        self.shard_mut()?;
        self.load(batch)?;
        let s = self.shard_mut()?;
        s.train = train;
        s.forward_done = 0;
        Ok(())
    }

    fn unit_forward(&mut self, unit: usize, params: &[f32]) -> Result<Option<(f64, usize)>> {
        let (train, done) = self.shard_mut().map(|s| (s.train, s.forward_done))?;
        if unit != done {
            return Err(Error::BadState(format!("unit {unit}'s forward asked after {done} units")));
        }
        let (w, b) = self.unit_params(unit, params)?;
        let n = self.rows();
        let last = unit + 1 == self.layers();
        let end = on_compute_threads(|| {
            if n > 0 {
                self.forward_layer(unit, w, b);
            }
            (last && n > 0).then(|| self.loss(train))
        });
        self.shard_mut()?.forward_done = unit + 1;
        Ok(if last { Some(end.unwrap_or((0.0, 0))) } else { None })
    }

    fn unit_backward(&mut self, unit: usize, params: &[f32], grads: &mut [f32]) -> Result<()> {
        let (train, done) = self.shard_mut().map(|s| (s.train, s.forward_done))?;
        if !train || done != self.layers() || (unit == 0) != params.is_empty() {
            return Err(Error::BadState(format!(
                "unit {unit}'s backward asked out of order (a training pass with every unit's forward \
                 run, units from the last down, the root's without parameters)"
            )));
        }
        // Layer 0's input gradient is not needed: its weight (the root's) is not either.
        let w = if unit == 0 { &[][..] } else { self.unit_params(unit, params)?.0 };
        let (inp, out) = (self.spec.layers[unit], self.spec.layers[unit + 1]);
        if grads.len() != out * inp + out {
            return Err(Error::invalid(format!(
                "{} gradient slots for layer {unit}'s {} values",
                grads.len(),
                out * inp + out
            )));
        }
        let n = self.rows();
        on_compute_threads(|| {
            let (dw, db) = grads.split_at_mut(out * inp);
            if n == 0 {
                grads.fill(0.0);
                return;
            }
            let x = if unit == 0 { &self.input } else { &self.outputs[unit - 1] };
            matmul(dw, false, View::rows(&self.delta, n, out).t(), View::rows(x, n, inp), self.threads);
            column_sums(&self.delta, db, false, self.threads);
            if unit > 0 {
                self.propagate(unit, w);
            }
        });
        Ok(())
    }

    fn backward_begin(&mut self, batch: &Batch<'_>) -> Result<f32> {
        self.whole("train on a whole batch")?;
        self.load(batch)?;
        let n = self.rows();
        self.next = self.layers();
        if n == 0 {
            return Ok(0.0);
        }
        let loss = on_compute_threads(|| {
            self.forward();
            self.loss(true).0
        });
        Ok((loss / n as f64) as f32)
    }

    fn backward_next(&mut self, pending: &mut [f32]) -> Result<usize> {
        // The whole front is a window ending where it does.
        let end = pending.len();
        self.backward_next_into(pending, end)
    }

    fn backward_window(&self) -> Option<usize> {
        // A step is one layer: its weight and its bias.
        (0..self.layers()).map(|l| self.layout.range(2 * l).len() + self.layout.range(2 * l + 1).len()).max()
    }

    fn backward_next_into(&mut self, window: &mut [f32], end: usize) -> Result<usize> {
        let expected = self.pending()?;
        if end != expected || window.len() > end {
            return Err(Error::invalid(format!(
                "{} pending gradient values in a window of {}, but the backward pass has {expected} left",
                end,
                window.len()
            )));
        }
        let base = end - window.len();
        on_compute_threads(|| self.backward_layer(window, base))
    }

    fn evaluate(&mut self, batch: &Batch<'_>) -> Result<(f64, usize)> {
        self.whole("evaluate on its own")?;
        self.load(batch)?;
        if self.rows() == 0 {
            return Ok((0.0, 0));
        }
        on_compute_threads(|| self.forward());
        let classes = *self.spec.layers.last().expect("validated");
        Ok(cross_entropy(self.logits(), &self.labels, classes, 0.0, None, self.threads))
    }

    fn predict(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
        self.whole("predict on its own")?;
        self.load(batch)?;
        if self.rows() == 0 {
            return Ok(Vec::new());
        }
        on_compute_threads(|| self.forward());
        Ok(self.logits().to_vec())
    }
}

impl FusedMlp {
    /// The cross-entropy of the logits against the loaded labels: its sum and the
    /// correct predictions; with `backward`, `delta` gets the gradient of the mean.
    fn loss(&mut self, backward: bool) -> (f64, usize) {
        let (n, classes) = (self.rows(), *self.spec.layers.last().expect("validated"));
        if !backward {
            return cross_entropy(self.logits(), &self.labels, classes, 0.0, None, self.threads);
        }
        let mut delta = std::mem::take(&mut self.delta);
        delta.resize(n * classes, 0.0);
        let scale = 1.0 / n as f32;
        let out = cross_entropy(self.logits(), &self.labels, classes, scale, Some(&mut delta), self.threads);
        self.delta = delta;
        out
    }

    /// The parameters this model holds: the whole model's, or a shard's rows.
    fn own_values(&mut self) -> &mut [f32] {
        match &mut self.shard {
            Some(s) => &mut s.values,
            None => &mut self.params,
        }
    }

    fn whole(&self, what: &str) -> Result<()> {
        match self.shard {
            None => Ok(()),
            Some(_) => Err(Error::Unsupported(format!(
                "a row shard of the MLP (ZeRO stage 3) cannot {what}: it runs unit by unit on \
                 parameters the data-parallel strategy gathers"
            ))),
        }
    }

    fn shard_mut(&mut self) -> Result<&mut Shard> {
        self.shard
            .as_mut()
            .ok_or_else(|| Error::Unsupported("this MLP holds its whole parameters: it runs whole".into()))
    }

    /// Layer `unit`'s gathered weight and bias out of `params`, checked.
    fn unit_params<'p>(&self, unit: usize, params: &'p [f32]) -> Result<(&'p [f32], &'p [f32])> {
        if unit >= self.layers() {
            return Err(Error::invalid(format!("unit {unit} of an MLP of {} layers", self.layers())));
        }
        let (inp, out) = (self.spec.layers[unit], self.spec.layers[unit + 1]);
        if params.len() != out * inp + out {
            return Err(Error::invalid(format!(
                "{} values for layer {unit}, which has {}",
                params.len(),
                out * inp + out
            )));
        }
        Ok(params.split_at(out * inp))
    }

    /// The values of the gradient buffer not final yet: up to the end of layer
    /// `next - 1`'s bias. An error when no backward pass is under way.
    fn pending(&self) -> Result<usize> {
        if self.next == 0 {
            return Err(Error::BadState("backward_next without a backward pass begun".into()));
        }
        Ok(self.layout.range(2 * self.next - 1).end)
    }

    /// The backward pass of the next layer down (see [`Model::backward_next`]): its
    /// weight and bias gradients, returned as soon as they are written so that a
    /// strategy can send them while the gradient with respect to the layer's input
    /// (the delta of the layer below, which needs a product as large) is computed at
    /// the start of the next call. `buf` holds the gradient buffer's values from
    /// `base` on, up to what is pending.
    fn backward_layer(&mut self, buf: &mut [f32], base: usize) -> Result<usize> {
        let l = self.next - 1;
        let (inp, out) = (self.spec.layers[l], self.spec.layers[l + 1]);
        let (w, b) = (self.layout.range(2 * l), self.layout.range(2 * l + 1));
        if w.start < base {
            return Err(Error::invalid(format!(
                "a window from gradient value {base} cannot hold layer {l}'s, from {}",
                w.start
            )));
        }
        let (w, b) = (w.start - base..w.end - base, b.start - base..b.end - base);
        let n = self.rows();
        if self.owed && n > 0 {
            // The delta of layer `next` from that of the layer above it.
            let params = std::mem::take(&mut self.params);
            self.propagate(self.next, &params[self.layout.range(2 * self.next)]);
            self.params = params;
        }
        self.owed = false;
        if n == 0 {
            buf[w.start..].fill(0.0);
        } else {
            let x = if l == 0 { &self.input } else { &self.outputs[l - 1] };
            let delta = View::rows(&self.delta, n, out);
            // dW = delta^T x, db = the column sums of delta.
            matmul(&mut buf[w.clone()], false, delta.t(), View::rows(x, n, inp), self.threads);
            column_sums(&self.delta, &mut buf[b], false, self.threads);
            self.owed = l > 0;
        }
        self.next = l;
        Ok(w.start + base)
    }

    /// Replaces `delta`, the gradient with respect to the output of layer `above`, by
    /// the gradient with respect to that layer's input, through the nonlinearity of
    /// the layer below that made it.
    fn propagate(&mut self, above: usize, w: &[f32]) {
        let n = self.rows();
        let (inp, out) = (self.spec.layers[above], self.spec.layers[above + 1]);
        let mut below = std::mem::take(&mut self.scratch);
        below.resize(n * inp, 0.0);
        matmul(&mut below, false, View::rows(&self.delta, n, out), View::rows(w, out, inp), self.threads);
        let h = &self.outputs[above - 1];
        match self.spec.activation {
            // A select, not a branch: it vectorises.
            Activation::Relu => elementwise(&mut below, h, self.threads, |d, h| {
                d.iter_mut().zip(h).for_each(|(d, &h)| *d = if h > 0.0 { *d } else { 0.0 })
            }),
            Activation::Tanh => elementwise(&mut below, h, self.threads, |d, h| {
                d.iter_mut().zip(h).for_each(|(d, &h)| *d *= 1.0 - h * h)
            }),
        }
        self.scratch = std::mem::replace(&mut self.delta, below);
    }
}
