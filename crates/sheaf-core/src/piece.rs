//! Model pieces: the part of a model one rank holds under model parallelism.
//!
//! A [`Piece`] is a contiguous range of the model's linear layers (a pipeline stage),
//! each either whole or sliced Megatron-style across a tensor-parallel group: layers
//! pair up, the first of a pair split by output rows (column-parallel), the second by
//! input columns (row-parallel, its bias whole on every rank); an unpaired last layer
//! stays whole. A piece's parameters keep the full model's names, so pieces gather
//! into (and slice out of) the same flat buffer and checkpoint as one process holds.

use std::ops::Range;

use crate::{chunk_range, Error, ModelSpec, ParamLayout, ParamSpec, Result};

/// How one linear layer is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerCut {
    Whole,
    /// Output rows `rows` of the weight and bias.
    Column {
        rows: (usize, usize),
    },
    /// Input columns `cols` of the weight; the bias whole.
    Row {
        cols: (usize, usize),
    },
}

/// The part of a model one rank holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The linear layers held (layer `i` maps `layers[i]` to `layers[i + 1]` widths).
    pub layers: Range<usize>,
    /// This rank's place in its tensor-parallel group, and the group's size (1: whole
    /// layers).
    pub tensor_rank: usize,
    pub tensor_width: usize,
}

impl Piece {
    /// The whole model.
    pub fn whole(spec: &ModelSpec) -> Piece {
        Piece { layers: 0..spec.layers.len() - 1, tensor_rank: 0, tensor_width: 1 }
    }

    pub fn is_whole(&self, spec: &ModelSpec) -> bool {
        *self == Piece::whole(spec)
    }

    /// Checks the piece against the model: layers in range and non-empty, a tensor
    /// rank inside its group, and every sliced width divisible by the group.
    pub fn validate(&self, spec: &ModelSpec) -> Result<()> {
        let n = spec.layers.len() - 1;
        if self.layers.is_empty() || self.layers.end > n {
            return Err(Error::invalid(format!(
                "piece layers {:?} outside a model of {n} layers",
                self.layers
            )));
        }
        if self.tensor_width == 0 || self.tensor_rank >= self.tensor_width {
            return Err(Error::invalid(format!(
                "tensor rank {} outside a group of {}",
                self.tensor_rank, self.tensor_width
            )));
        }
        if self.tensor_width > 1 {
            for l in self.layers.clone() {
                let (width, what) = match paired(l, n) {
                    Some(true) => (spec.layers[l + 1], "output"),
                    Some(false) => (spec.layers[l], "input"),
                    None => continue,
                };
                if !width.is_multiple_of(self.tensor_width) {
                    return Err(Error::config(
                        "parallel.tensor",
                        format!(
                            "a tensor-parallel width of {} does not divide the {width} {what} features of layer {l}",
                            self.tensor_width
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// How layer `l` (one of this piece's) is held.
    pub fn cut(&self, spec: &ModelSpec, l: usize) -> LayerCut {
        let n = spec.layers.len() - 1;
        if self.tensor_width == 1 {
            return LayerCut::Whole;
        }
        let part = |width: usize| {
            let r = chunk_range(width, self.tensor_width, self.tensor_rank);
            (r.start, r.end)
        };
        match paired(l, n) {
            Some(true) => LayerCut::Column { rows: part(spec.layers[l + 1]) },
            Some(false) => LayerCut::Row { cols: part(spec.layers[l]) },
            None => LayerCut::Whole,
        }
    }

    /// This piece's parameters: the full model's names, sliced shapes.
    pub fn layout(&self, spec: &ModelSpec) -> ParamLayout {
        let specs = self
            .layers
            .clone()
            .flat_map(|l| {
                let (inp, out) = (spec.layers[l], spec.layers[l + 1]);
                let (w, b) = match self.cut(spec, l) {
                    LayerCut::Whole => (vec![out, inp], out),
                    LayerCut::Column { rows } => (vec![rows.1 - rows.0, inp], rows.1 - rows.0),
                    LayerCut::Row { cols } => (vec![out, cols.1 - cols.0], out),
                };
                [
                    ParamSpec { name: format!("layers.{l}.weight"), shape: w },
                    ParamSpec { name: format!("layers.{l}.bias"), shape: vec![b] },
                ]
            })
            .collect();
        ParamLayout::new(specs)
    }

    /// For each of this piece's values, its index in the full model's flat buffer.
    pub fn full_indices(&self, spec: &ModelSpec) -> Vec<usize> {
        let full = spec.layout();
        let mut out = Vec::with_capacity(self.layout(spec).total());
        for l in self.layers.clone() {
            let (w, b) = (full.range(2 * l), full.range(2 * l + 1));
            let inp = spec.layers[l];
            match self.cut(spec, l) {
                LayerCut::Whole => {
                    out.extend(w);
                    out.extend(b);
                }
                LayerCut::Column { rows } => {
                    out.extend(w.start + rows.0 * inp..w.start + rows.1 * inp);
                    out.extend(b.start + rows.0..b.start + rows.1);
                }
                LayerCut::Row { cols } => {
                    for row in 0..spec.layers[l + 1] {
                        out.extend(w.start + row * inp + cols.0..w.start + row * inp + cols.1);
                    }
                    out.extend(b);
                }
            }
        }
        out
    }

    /// This piece's values out of the full model's flat buffer.
    pub fn slice(&self, spec: &ModelSpec, full: &[f32]) -> Vec<f32> {
        self.full_indices(spec).into_iter().map(|i| full[i]).collect()
    }

    /// Writes this piece's `values` into the full model's flat buffer.
    pub fn place(&self, spec: &ModelSpec, values: &[f32], full: &mut [f32]) {
        for (i, v) in self.full_indices(spec).into_iter().zip(values) {
            full[i] = *v;
        }
    }

    /// Bytes of parameters, gradients and optimizer state (`state_copies` values per
    /// parameter: 1 for SGD with momentum, 2 for AdamW) this piece needs.
    pub fn param_bytes(&self, spec: &ModelSpec, state_copies: usize) -> u64 {
        self.layout(spec).total() as u64 * 4 * (2 + state_copies as u64)
    }

    /// Bytes of activations one micro-batch of `rows` samples keeps from its forward
    /// pass for its backward pass: the piece's input and, per layer, its output before
    /// and after the nonlinearity.
    pub fn activation_bytes(&self, spec: &ModelSpec, rows: usize) -> u64 {
        let width = |l: usize| match self.cut(spec, l) {
            LayerCut::Column { rows } => rows.1 - rows.0,
            _ => spec.layers[l + 1],
        };
        let per_row =
            spec.layers[self.layers.start] + self.layers.clone().map(|l| 2 * width(l)).sum::<usize>();
        (rows * per_row * 4) as u64
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(layers: &[usize]) -> ModelSpec {
        ModelSpec::mlp(layers.to_vec())
    }

    /// Placing every piece of a cut puts back every value of the full buffer, and
    /// slicing gives each piece its own.
    #[test]
    fn pieces_tile_the_model() {
        for layers in [&[4, 6, 2][..], &[3, 8, 4, 5, 2], &[5, 4]] {
            let s = spec(layers);
            let n = layers.len() - 1;
            let full: Vec<f32> = (0..s.layout().total()).map(|i| i as f32).collect();
            for stages in 1..=n {
                let cuts: Vec<Range<usize>> = (0..stages).map(|k| chunk_range(n, stages, k)).collect();
                for width in [1, 2] {
                    let mut rebuilt = vec![-1f32; full.len()];
                    let mut count = 0;
                    for c in &cuts {
                        for t in 0..width {
                            let p = Piece { layers: c.clone(), tensor_rank: t, tensor_width: width };
                            if p.validate(&s).is_err() {
                                continue;
                            }
                            let mine = p.slice(&s, &full);
                            assert_eq!(mine.len(), p.layout(&s).total());
                            p.place(&s, &mine, &mut rebuilt);
                            count += 1;
                        }
                    }
                    if count == stages * width {
                        assert_eq!(rebuilt, full, "{layers:?} stages {stages} width {width}");
                    }
                }
            }
        }
    }

    #[test]
    fn megatron_pairs_split_columns_then_rows() {
        let s = spec(&[64, 128, 10]);
        let p = Piece { layers: 0..2, tensor_rank: 1, tensor_width: 2 };
        p.validate(&s).unwrap();
        assert_eq!(p.cut(&s, 0), LayerCut::Column { rows: (64, 128) });
        assert_eq!(p.cut(&s, 1), LayerCut::Row { cols: (64, 128) });
        let shapes: Vec<Vec<usize>> = p.layout(&s).specs().iter().map(|x| x.shape.clone()).collect();
        assert_eq!(shapes, [vec![64, 64], vec![64], vec![10, 64], vec![10]]);
        // About half the model each: 4,810 of 9,610.
        assert_eq!(p.layout(&s).total(), 4810);
        let odd = Piece { layers: 0..2, tensor_rank: 0, tensor_width: 3 };
        let e = odd.validate(&s).unwrap_err().to_string();
        assert!(e.contains("does not divide the 128 output features of layer 0"), "{e}");
    }
}
