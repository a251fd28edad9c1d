//! Fused CPU kernels with their own backward passes, where a chain of candle's
//! elementwise ops would walk the same memory many times: the causal softmax of
//! attention scores and LayerNorm's normalisation. Other devices run the same
//! mathematics as a chain of candle ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else { candle_core::bail!("{what}: f32 only") };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&values[a..b]),
        None => candle_core::bail!("{what}: the input must be contiguous"),
    }
}

/// `softmax(scale * x + mask)` over the last dimension of `[.., t, t]` scores, where
/// the mask hides the future: row `i` (its index modulo `t`) keeps columns `0..=i`.
struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "causal softmax")?;
        let t = layout.dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![0f32; x.len()];
        for (r, (xr, yr)) in x.chunks_exact(t).zip(y.chunks_exact_mut(t)).enumerate() {
            let keep = r % t + 1;
            let max = xr[..keep].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * self.scale;
            let mut sum = 0f32;
            for (o, &v) in yr[..keep].iter_mut().zip(&xr[..keep]) {
                *o = (v * self.scale - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            yr[..keep].iter_mut().for_each(|o| *o *= inv);
        }
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(&g, &SoftmaxBackward { scale: self.scale })?))
    }
}

/// `scale * y * (g - sum(g * y))` row by row: the softmax's vector-Jacobian product.
struct SoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "causal-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) =
            (contiguous_f32(s1, l1, "softmax backward")?, contiguous_f32(s2, l2, "softmax backward")?);
        let t = l1.dims().last().copied().unwrap_or(1).max(1);
        let mut dx = vec![0f32; y.len()];
        for ((yr, gr), dr) in y.chunks_exact(t).zip(g.chunks_exact(t)).zip(dx.chunks_exact_mut(t)) {
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((d, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
                *d = self.scale * yv * (gv - dot);
            }
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// The causal softmax of attention scores `[.., t, t]` scaled by `scale`.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    if scores.device().is_cpu() {
        return scores.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32 });
    }
    let t = scores.dim(D::Minus1)?;
    let mask: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (t, t), scores.device())?;
    let x = (scores * scale)?.broadcast_add(&mask)?;
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension.
struct Normalize {
    eps: f32,
}

fn normalize_row(xr: &[f32], eps: f32, out: &mut [f32]) -> f32 {
    let n = xr.len() as f32;
    let mean = xr.iter().sum::<f32>() / n;
    let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (o, &v) in out.iter_mut().zip(xr) {
        *o = (v - mean) * inv;
    }
    inv
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "layer norm")?;
        let c = layout.dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            normalize_row(xr, self.eps, yr);
        }
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&g, &NormalizeBackward { eps: self.eps })?))
    }
}

/// `inv * (g - mean(g) - xhat * mean(g * xhat))` row by row.
struct NormalizeBackward {
    eps: f32,
}

impl CustomOp2 for NormalizeBackward {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) =
            (contiguous_f32(s1, l1, "layer norm backward")?, contiguous_f32(s2, l2, "layer norm backward")?);
        let c = l1.dims().last().copied().unwrap_or(1).max(1);
        let mut dx = vec![0f32; x.len()];
        let mut xhat = vec![0f32; c];
        for ((xr, gr), dr) in x.chunks_exact(c).zip(g.chunks_exact(c)).zip(dx.chunks_exact_mut(c)) {
            let inv = normalize_row(xr, self.eps, &mut xhat);
            let mean_g = gr.iter().sum::<f32>() / c as f32;
            let mean_gx = gr.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f32>() / c as f32;
            for ((d, &gv), &h) in dr.iter_mut().zip(gr).zip(&xhat) {
                *d = inv * (gv - mean_g - h * mean_gx);
            }
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// LayerNorm's normalisation over the last dimension (no affine part).
pub fn normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() {
        return x.contiguous()?.apply_op1(Normalize { eps: eps as f32 });
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)
}
