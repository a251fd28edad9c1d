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

use sheaf_core::{Batch, Error, Model, ParamLayout, Result};

use crate::kernels::{
    column_sums, cross_entropy, elementwise, elementwise_in_place, fill_rows, matmul, on_compute_threads,
    threads, View,
};
use crate::mlp::{init_params, Activation, MlpSpec, Rows};
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
}

impl FusedMlp {
    pub fn new(spec: &MlpSpec, seed: u64) -> FusedMlp {
        let layers = spec.layers.len() - 1;
        FusedMlp {
            spec: spec.clone(),
            layout: spec.layout(),
            params: init_params(spec, seed),
            threads: threads(),
            input: Vec::new(),
            labels: Vec::new(),
            outputs: vec![Vec::new(); layers],
            delta: Vec::new(),
            scratch: Vec::new(),
            next: 0,
            owed: false,
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

    fn weight(&self, l: usize) -> View<'_> {
        View::rows(&self.params[self.layout.range(2 * l)], self.spec.layers[l + 1], self.spec.layers[l])
    }

    /// The forward pass of the loaded batch: every layer's output.
    fn forward(&mut self) {
        let n = self.rows();
        for l in 0..self.layers() {
            let (inp, out) = (self.spec.layers[l], self.spec.layers[l + 1]);
            let mut dst = std::mem::take(&mut self.outputs[l]);
            dst.resize(n * out, 0.0);
            fill_rows(&mut dst, &self.params[self.layout.range(2 * l + 1)], self.threads);
            let x = if l == 0 { &self.input } else { &self.outputs[l - 1] };
            matmul(&mut dst, true, View::rows(x, n, inp), self.weight(l).t(), self.threads);
            if l + 1 < self.layers() {
                match self.spec.activation {
                    Activation::Relu => elementwise_in_place(&mut dst, self.threads, |d| {
                        d.iter_mut().for_each(|v| *v = v.max(0.0))
                    }),
                    Activation::Tanh => elementwise_in_place(&mut dst, self.threads, |d| {
                        d.iter_mut().for_each(|v| *v = v.tanh())
                    }),
                }
            }
            self.outputs[l] = dst;
        }
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
        check_values(out.len(), self.params.len())?;
        out.copy_from_slice(&self.params);
        Ok(())
    }

    fn write_params(&mut self, src: &[f32]) -> Result<()> {
        check_values(src.len(), self.params.len())?;
        self.params.copy_from_slice(src);
        Ok(())
    }

    fn params_mut(&mut self) -> Result<Option<&mut [f32]>> {
        Ok(Some(&mut self.params))
    }

    fn forward_backward(&mut self, batch: &Batch<'_>, grads: &mut [f32]) -> Result<f32> {
        whole_backward(self, batch, grads)
    }

    fn backward_in_steps(&self) -> bool {
        true
    }

    fn backward_begin(&mut self, batch: &Batch<'_>) -> Result<f32> {
        self.load(batch)?;
        let n = self.rows();
        self.next = self.layers();
        if n == 0 {
            return Ok(0.0);
        }
        let loss = on_compute_threads(|| {
            self.forward();
            let classes = *self.spec.layers.last().expect("validated");
            let mut delta = std::mem::take(&mut self.delta);
            delta.resize(n * classes, 0.0);
            let scale = 1.0 / n as f32;
            let (loss, _) =
                cross_entropy(self.logits(), &self.labels, classes, scale, Some(&mut delta), self.threads);
            self.delta = delta;
            loss
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
        self.load(batch)?;
        if self.rows() == 0 {
            return Ok((0.0, 0));
        }
        on_compute_threads(|| self.forward());
        let classes = *self.spec.layers.last().expect("validated");
        Ok(cross_entropy(self.logits(), &self.labels, classes, 0.0, None, self.threads))
    }

    fn predict(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
        self.load(batch)?;
        if self.rows() == 0 {
            return Ok(Vec::new());
        }
        on_compute_threads(|| self.forward());
        Ok(self.logits().to_vec())
    }
}

impl FusedMlp {
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
            self.propagate(self.next);
        }
        self.owed = false;
        if n == 0 {
            buf[w.start..].fill(0.0);
        } else {
            let x = if l == 0 { &self.input } else { &self.outputs[l - 1] };
            let delta = View::rows(&self.delta, n, out);
            // dW = delta^T x, db = the column sums of delta.
            matmul(&mut buf[w.clone()], false, delta.t(), View::rows(x, n, inp), self.threads);
            column_sums(&self.delta, &mut buf[b], self.threads);
            self.owed = l > 0;
        }
        self.next = l;
        Ok(w.start + base)
    }

    /// Replaces `delta`, the gradient with respect to the output of layer `above`, by
    /// the gradient with respect to that layer's input, through the nonlinearity of
    /// the layer below that made it.
    fn propagate(&mut self, above: usize) {
        let n = self.rows();
        let (inp, out) = (self.spec.layers[above], self.spec.layers[above + 1]);
        let mut below = std::mem::take(&mut self.scratch);
        below.resize(n * inp, 0.0);
        matmul(&mut below, false, View::rows(&self.delta, n, out), self.weight(above), self.threads);
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
