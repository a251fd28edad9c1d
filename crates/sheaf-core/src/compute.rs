//! Compute: models described as data, built by a backend, trained through a flat
//! parameter buffer.
//!
//! Parameters and gradients cross this interface as one flat `f32` buffer in
//! [`ParamLayout`] order: a data-parallel strategy allreduces it (or buckets of it)
//! without knowing the model, a sharded optimizer slices it, and a checkpoint names its
//! pieces. A backend keeps its own tensors (on a GPU, say) and copies at the boundary.

use std::ops::Range;

use crate::{Error, Piece, Result};

/// Nonlinearity between hidden layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Activation {
    Relu,
    Tanh,
}

/// A multilayer perceptron: `layers[0]` inputs, `layers.last()` classes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    pub layers: Vec<usize>,
    pub activation: Activation,
}

impl ModelSpec {
    pub fn mlp(layers: Vec<usize>) -> ModelSpec {
        ModelSpec { layers, activation: Activation::Relu }
    }

    /// Checks the spec: at least an input and an output width, none of them zero.
    pub fn validate(&self) -> Result<()> {
        if self.layers.len() < 2 {
            return Err(Error::config("model.layers", "needs at least an input and an output width"));
        }
        if let Some(i) = self.layers.iter().position(|&w| w == 0) {
            return Err(Error::config("model.layers", format!("width {i} is zero")));
        }
        Ok(())
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

/// A batch of samples: `inputs` is row-major `[labels.len(), input_dim]`.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub inputs: &'a [f32],
    pub labels: &'a [u32],
    pub input_dim: usize,
}

impl Batch<'_> {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// The samples `indices`, gathered: their inputs (row-major) and labels.
    pub fn gather(&self, indices: &[usize]) -> (Vec<f32>, Vec<u32>) {
        let d = self.input_dim;
        let mut inputs = Vec::with_capacity(indices.len() * d);
        for &i in indices {
            inputs.extend_from_slice(&self.inputs[i * d..(i + 1) * d]);
        }
        (inputs, indices.iter().map(|&i| self.labels[i]).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// A model instance on some device.
pub trait Model: Send {
    fn layout(&self) -> &ParamLayout;
    /// Copy the parameters into `out` (length `layout().total()`).
    fn read_params(&self, out: &mut [f32]) -> Result<()>;
    /// Replace the parameters with `src` (length `layout().total()`).
    fn write_params(&mut self, src: &[f32]) -> Result<()>;
    /// Forward and backward on `batch`: returns the mean loss and writes its gradient
    /// with respect to every parameter into `grads`.
    fn forward_backward(&mut self, batch: &Batch<'_>, grads: &mut [f32]) -> Result<f32>;
    /// Summed loss and number of correct predictions on `batch`, without gradients.
    fn evaluate(&mut self, batch: &Batch<'_>) -> Result<(f64, usize)>;

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
}

/// Builds models on a device (`"cpu"`, `"cuda:0"`).
pub trait ComputeBackend: Send + Sync {
    fn device(&self) -> &str;
    /// A model with parameters initialised deterministically from `seed`.
    fn build_model(&self, spec: &ModelSpec, seed: u64) -> Result<Box<dyn Model>>;

    /// The part `piece` of the model, its parameters exactly those of
    /// `build_model(spec, seed)` sliced by [`Piece::slice`].
    fn build_piece(&self, spec: &ModelSpec, piece: &Piece, seed: u64) -> Result<Box<dyn Model>> {
        let _ = (spec, piece, seed);
        Err(Error::Unsupported(format!("compute backend `{}` cannot build model pieces", self.device())))
    }
}
