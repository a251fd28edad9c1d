//! A chain of three dense blocks with analytic gradients, written once for the
//! strategies' in-crate laws (a plugin's tests cannot link the compute plugin's rlib).
//!
//! `relu(W0 x + b0) -> relu(W1 . + b1) -> W2 . + b2`, each block's weight `[out, in]`
//! then its bias `[out]`, in block order. A [`Chain`] holds any run of blocks (a
//! pipeline stage's piece, or all of them) and speaks every interface a strategy
//! drives:
//! - the whole model's (`forward_backward`, `evaluate`), for data parallelism;
//! - the stage interface (`stage_forward`, `stage_backward`, `loss_grad`), for
//!   pipelines;
//! - as a row shard ([`Chain::row_shard`], what a compute plugin's `build_shard` and
//!   `build_piece_shard` build for ZeRO 3): its rows of every parameter as its layout,
//!   one unit (and one segment) a block, run either on parameters handed to it
//!   (`unit_forward`, `unit_backward`: the whole model's ZeRO 3) or on its piece
//!   buffer, which the strategy gathers a unit at a time (`piece_params_mut`: ZeRO 3
//!   inside a pipeline stage).

use std::collections::HashMap;
use std::ops::Range;

use sheaf_core::{
    chunk_range, Batch, Error, Model, ParamLayout, ParamShard, ParamSpec, Piece, PieceLayout, Result,
};

use crate::train::{softmax_loss_grad, take};

/// Features, hidden units and classes.
pub const D: usize = 8;
pub const H: usize = 6;
pub const K: usize = 3;

/// Block `b`'s (inputs, outputs, whether a ReLU follows).
pub const BLOCKS: [(usize, usize, bool); 3] = [(D, H, true), (H, H, true), (H, K, false)];

/// A block's input, and its output before the ReLU.
type Kept = (Vec<f32>, Vec<f32>);

/// Blocks `blocks` of the chain (see the module's text).
pub struct Chain {
    pub blocks: Range<usize>,
    /// The piece's parameters whole; for a row shard, the buffer its units are
    /// gathered into (zeros where none is).
    pub params: Vec<f32>,
    grads: Vec<f32>,
    piece_layout: ParamLayout,
    shard: Option<Shard>,
    /// Per micro-batch and segment: each of its blocks' input and output before the ReLU.
    saved: HashMap<(u64, usize), Vec<Kept>>,
    pass: Pass,
    /// For a row shard: the most blocks its piece buffer held gathered (any value not
    /// zero) when a stage pass ran, which is what the strategy keeps resident.
    pub most_gathered: usize,
}

/// A row shard's layout and its rows.
struct Shard {
    layout: ParamLayout,
    rows: Vec<f32>,
}

/// A pass unit by unit: the batch, the activation so far, what each block's backward
/// needs, the root unit's parameters (kept from its forward) and the gradient flowing
/// back.
#[derive(Default)]
struct Pass {
    labels: Vec<u32>,
    rows: usize,
    train: bool,
    act: Vec<f32>,
    kept: Vec<Kept>,
    root: Vec<f32>,
    grad: Vec<f32>,
}

/// The whole chain's parameters from `seed`.
pub fn whole_params(seed: u64) -> Vec<f32> {
    let mut g = crate::conformance::SplitMix::new(seed);
    (0..span(BLOCKS.len() - 1).end).map(|_| g.next_f32() * 0.6).collect()
}

/// Where block `b`'s parameters lie in the whole chain's buffer.
pub fn span(b: usize) -> Range<usize> {
    let start: usize = BLOCKS[..b].iter().map(|(i, o, _)| o * i + o).sum();
    let (i, o, _) = BLOCKS[b];
    start..start + o * i + o
}

/// The layout of blocks `blocks` held whole.
pub fn layout_of(blocks: Range<usize>) -> ParamLayout {
    ParamLayout::new(
        blocks
            .flat_map(|b| {
                let (i, o, _) = BLOCKS[b];
                [
                    ParamSpec { name: format!("l{b}.weight"), shape: vec![o, i] },
                    ParamSpec { name: format!("l{b}.bias"), shape: vec![o] },
                ]
            })
            .collect(),
    )
}

/// The parameters laid out as `whole` from every shard's rows (`shards[q]`: shard `q`
/// of `shards.len()`, as [`Chain::row_shard`] cuts them).
pub fn joined(whole: &ParamLayout, shards: &[Vec<f32>]) -> Vec<f32> {
    let count = shards.len();
    let layouts: Vec<ParamLayout> = (0..count)
        .map(|index| PieceLayout::row_shard(whole, ParamShard { index, count }, 0).layout)
        .collect();
    (0..whole.specs().len())
        .flat_map(|p| shards.iter().zip(&layouts).flat_map(move |(s, l)| s[l.range(p)].to_vec()))
        .collect()
}

/// Block `b` on `rows` rows of `x` with its parameters `p`: its output before the
/// ReLU, and after.
fn block_forward(b: usize, p: &[f32], x: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>) {
    let (i, o, relu) = BLOCKS[b];
    let (w, bias) = p.split_at(o * i);
    let z: Vec<f32> = (0..rows)
        .flat_map(|r| {
            let xr = &x[r * i..(r + 1) * i];
            (0..o)
                .map(move |j| bias[j] + w[j * i..(j + 1) * i].iter().zip(xr).map(|(w, x)| w * x).sum::<f32>())
        })
        .collect();
    let y = if relu { z.iter().map(|v| v.max(0.0)).collect() } else { z.clone() };
    (z, y)
}

/// Block `b`'s backward from `g`, the gradient of its output: adds its parameters'
/// gradient into `grads` (laid out as `p`) and returns its input's.
fn block_backward(b: usize, p: &[f32], (x, z): &Kept, mut g: Vec<f32>, grads: &mut [f32]) -> Vec<f32> {
    let (i, o, relu) = BLOCKS[b];
    if relu {
        g.iter_mut().zip(z).for_each(|(g, z)| *g = if *z > 0.0 { *g } else { 0.0 });
    }
    let rows = g.len() / o;
    let mut gx = vec![0.0; rows * i];
    for r in 0..rows {
        for j in 0..o {
            let gj = g[r * o + j];
            grads[o * i + j] += gj;
            for k in 0..i {
                grads[j * i + k] += gj * x[r * i + k];
                gx[r * i + k] += gj * p[j * i + k];
            }
        }
    }
    gx
}

fn rows_of<'b>(batch: &Batch<'b>) -> Result<(&'b [f32], &'b [u32])> {
    match *batch {
        Batch::Rows { inputs, labels, .. } => Ok((inputs, labels)),
        Batch::Tokens { .. } => Err(Error::Unsupported("the chain takes rows of features".into())),
    }
}

impl Chain {
    /// Blocks `blocks`, held whole, with the whole chain's parameters from `seed`.
    pub fn new(blocks: Range<usize>, seed: u64) -> Chain {
        let whole = whole_params(seed);
        let params: Vec<f32> = blocks.clone().flat_map(|b| whole[span(b)].to_vec()).collect();
        Chain {
            grads: vec![0.0; params.len()],
            piece_layout: layout_of(blocks.clone()),
            blocks,
            params,
            shard: None,
            saved: HashMap::new(),
            pass: Pass::default(),
            most_gathered: 0,
        }
    }

    /// The same blocks as shard `index` of `count`: rows
    /// [`chunk_range`]`(rows, count, index)` of every parameter, as
    /// [`PieceLayout::row_shard`] lays them out; the piece buffer starts empty.
    pub fn row_shard(mut self, index: usize, count: usize) -> Chain {
        let layout = PieceLayout::row_shard(&self.piece_layout, ParamShard { index, count }, 0).layout;
        let mut rows = Vec::with_capacity(layout.total());
        for (p, spec) in self.piece_layout.specs().iter().enumerate() {
            let per_row: usize = spec.shape[1..].iter().product();
            let (at, own) = (self.piece_layout.range(p).start, chunk_range(spec.shape[0], count, index));
            rows.extend_from_slice(&self.params[at + own.start * per_row..at + own.end * per_row]);
        }
        self.params.fill(0.0);
        self.shard = Some(Shard { layout, rows });
        self
    }

    /// Where held block `b`'s parameters start in the piece's buffer.
    fn offset(&self, b: usize) -> usize {
        span(b).start - span(self.blocks.start).start
    }

    /// The blocks segment `seg` runs: one each in a row shard, all of them otherwise.
    fn segment_blocks(&self, seg: usize) -> Range<usize> {
        match self.shard {
            Some(_) => self.blocks.start + seg..self.blocks.start + seg + 1,
            None => self.blocks.clone(),
        }
    }

    /// A row shard's check of its piece buffer as a stage pass starts.
    fn count_gathered(&mut self) {
        if self.shard.is_some() {
            let held = self.blocks.clone().filter(|&b| {
                let at = self.offset(b);
                self.params[at..at + span(b).len()].iter().any(|v| *v != 0.0)
            });
            self.most_gathered = self.most_gathered.max(held.count());
        }
    }

    fn whole_only(&self, what: &str) -> Result<()> {
        match self.shard {
            Some(_) => Err(Error::Unsupported(format!("a row shard of the chain has no {what}"))),
            None => Ok(()),
        }
    }
}

impl Model for Chain {
    fn layout(&self) -> &ParamLayout {
        self.shard.as_ref().map_or(&self.piece_layout, |s| &s.layout)
    }
    fn read_params(&self, out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(self.shard.as_ref().map_or(&self.params, |s| &s.rows));
        Ok(())
    }
    fn write_params(&mut self, src: &[f32]) -> Result<()> {
        match self.shard.as_mut() {
            Some(s) => s.rows.copy_from_slice(src),
            None => self.params.copy_from_slice(src),
        }
        Ok(())
    }
    fn params_mut(&mut self) -> Result<Option<&mut [f32]>> {
        Ok(self.shard.as_mut().map(|s| &mut s.rows[..]))
    }
    fn forward_backward(&mut self, batch: &Batch<'_>, grads: &mut [f32]) -> Result<f32> {
        self.whole_only("whole-model pass")?;
        let (inputs, labels) = rows_of(batch)?;
        let n = labels.len();
        let logits = self.stage_forward(u64::MAX, 0, inputs, n)?;
        let scale = if n == 0 { 0.0 } else { 1.0 / n as f32 };
        let (loss, _, g) = softmax_loss_grad(&logits, labels, K, scale);
        self.stage_backward(u64::MAX, 0, &g)?;
        self.take_grads(grads)?;
        Ok((loss * f64::from(scale)) as f32)
    }
    fn evaluate(&mut self, batch: &Batch<'_>) -> Result<(f64, usize)> {
        self.whole_only("whole-model pass")?;
        let (inputs, labels) = rows_of(batch)?;
        let logits = self.stage_forward(u64::MAX, 0, inputs, labels.len())?;
        self.saved.remove(&(u64::MAX, 0));
        let (loss, correct, _) = softmax_loss_grad(&logits, labels, K, 0.0);
        Ok((loss, correct))
    }
    fn piece(&self) -> Option<Piece> {
        Some(Piece { blocks: self.blocks.clone(), tensor_rank: 0, tensor_width: 1 })
    }
    fn segments(&self) -> usize {
        match self.shard {
            Some(_) => self.blocks.len(),
            None => 1,
        }
    }
    fn stage_forward(&mut self, micro: u64, seg: usize, input: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.count_gathered();
        let mut x = input.to_vec();
        let mut kept = Vec::new();
        for b in self.segment_blocks(seg) {
            let at = self.offset(b);
            let (z, y) = block_forward(b, &self.params[at..at + span(b).len()], &x, rows);
            kept.push((x, z));
            x = y;
        }
        self.saved.insert((micro, seg), kept);
        Ok(x)
    }
    fn stage_backward(&mut self, micro: u64, seg: usize, grad: &[f32]) -> Result<Vec<f32>> {
        self.count_gathered();
        let kept =
            self.saved.remove(&(micro, seg)).ok_or_else(|| Error::BadState("no forward kept".into()))?;
        let mut g = grad.to_vec();
        for (b, k) in self.segment_blocks(seg).zip(&kept).rev() {
            let place = self.offset(b)..self.offset(b) + span(b).len();
            g = block_backward(b, &self.params[place.clone()], k, g, &mut self.grads[place]);
        }
        Ok(g)
    }
    fn loss_grad(&mut self, logits: &[f32], labels: &[u32], scale: f32) -> Result<(f64, usize, Vec<f32>)> {
        Ok(softmax_loss_grad(logits, labels, K, scale))
    }
    fn take_grads(&mut self, out: &mut [f32]) -> Result<()> {
        self.whole_only("gradients to take (its piece buffer holds them)")?;
        take(&mut self.grads, out);
        Ok(())
    }
    fn drop_saved(&mut self) {
        self.saved.clear();
        self.pass.kept.clear();
    }
    fn saved_bytes(&self) -> u64 {
        self.saved.values().flatten().map(|(x, z)| 4 * (x.len() + z.len()) as u64).sum()
    }
    fn units(&self) -> Vec<Vec<usize>> {
        match self.shard {
            Some(_) => (0..self.blocks.len()).map(|s| vec![2 * s, 2 * s + 1]).collect(),
            None => Vec::new(),
        }
    }
    fn unit_begin(&mut self, batch: &Batch<'_>, train: bool) -> Result<()> {
        let (inputs, labels) = rows_of(batch)?;
        let pass = Pass {
            labels: labels.to_vec(),
            rows: labels.len(),
            train,
            act: inputs.to_vec(),
            ..Pass::default()
        };
        self.pass = pass;
        Ok(())
    }
    fn unit_forward(&mut self, unit: usize, params: &[f32]) -> Result<Option<(f64, usize)>> {
        let b = self.blocks.start + unit;
        if params.len() != span(b).len() {
            return Err(Error::BadState(format!(
                "unit {unit} handed {} values of {}",
                params.len(),
                span(b).len()
            )));
        }
        let pass = &mut self.pass;
        if unit == 0 {
            pass.root = params.to_vec();
        }
        let (z, y) = block_forward(b, params, &pass.act, pass.rows);
        let x = std::mem::replace(&mut pass.act, y);
        if pass.train {
            pass.kept.push((x, z));
        }
        if b + 1 < self.blocks.end {
            return Ok(None);
        }
        let scale = if pass.rows == 0 { 0.0 } else { 1.0 / pass.rows as f32 };
        let (loss, correct, g) = softmax_loss_grad(&pass.act, &pass.labels, K, scale);
        pass.grad = g;
        Ok(Some((loss, correct)))
    }
    fn unit_backward(&mut self, unit: usize, params: &[f32], grads: &mut [f32]) -> Result<()> {
        let b = self.blocks.start + unit;
        let pass = &mut self.pass;
        let p = if unit == 0 { &pass.root[..] } else { params };
        let kept = pass.kept.pop();
        match kept {
            Some(k) if pass.kept.len() == unit && p.len() == span(b).len() && grads.len() == p.len() => {
                grads.fill(0.0);
                let g = std::mem::take(&mut pass.grad);
                pass.grad = block_backward(b, p, &k, g, grads);
                Ok(())
            }
            _ => {
                Err(Error::BadState(format!("unit {unit}'s backward out of order or handed the wrong sizes")))
            }
        }
    }
    fn piece_params_mut(&mut self) -> Result<Option<&mut [f32]>> {
        Ok(self.shard.as_ref().map(|_| &mut self.params[..]))
    }
    fn piece_grads_mut(&mut self) -> Result<Option<&mut [f32]>> {
        Ok(self.shard.as_ref().map(|_| &mut self.grads[..]))
    }
}
