//! The fused GPT's layers, forward and backward, over the flat parameter buffer:
//! each transformer block's parts (LayerNorm, the linear layers, attention, GELU,
//! the residual adds) as passes over rows split among the compute threads.

use std::ops::Range;

use multiversion::multiversion;
use rayon::prelude::*;

use super::{Affine, BlockActs, BlockAt, Grads};
use crate::cpu::kernels::{
    column_sums, dot, elementwise, erf, exp, fill_rows, matmul, matmul_to, max, rows_per_thread, sum,
    sum_sq_dev, View,
};
use crate::gpt::spec::Gelu;

/// LayerNorm's epsilon, as nanoGPT's.
const EPS: f32 = 1e-5;

/// The sizes of a pass: `n` windows of `t` positions of `c` values, `n_head` heads,
/// on `threads` threads.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub(super) n: usize,
    pub(super) t: usize,
    pub(super) c: usize,
    pub(super) n_head: usize,
    pub(super) gelu: Gelu,
    pub(super) threads: usize,
}

/// The forward pass of one transformer block from its input `x` into `acts`, and its
/// output into `out` (left out when recomputing for the backward pass, which reads
/// everything but the output); the LayerNorms' and GELU's outputs, which `acts` does
/// not keep, go through `tmp`.
pub(super) fn block_forward(
    acts: &mut BlockActs,
    tmp: &mut Backward,
    x: &[f32],
    out: Option<&mut Vec<f32>>,
    p: &[f32],
    b: &BlockAt,
    s: Shape,
) {
    let Shape { n, t, c, n_head, gelu: form, threads } = s;
    let rows = n * t;
    layer_norm(&mut tmp.ln, &mut acts.ln_1_stats, x, p, &b.ln_1, c, threads);
    linear(&mut acts.qkv, &tmp.ln, p, &b.c_attn, rows, c, 3 * c, threads);
    attention(&mut acts.att, &mut acts.atty, &acts.qkv, n, t, c, n_head, threads);
    linear(&mut acts.res_2, &acts.atty, p, &b.attn_proj, rows, c, c, threads);
    add_into(&mut acts.res_2, x, threads);
    layer_norm(&mut tmp.ln, &mut acts.ln_2_stats, &acts.res_2, p, &b.ln_2, c, threads);
    linear(&mut acts.fc, &tmp.ln, p, &b.c_fc, rows, c, 4 * c, threads);
    if let Some(out) = out {
        gelu(&mut tmp.gelu, &acts.fc, form, threads);
        linear(out, &tmp.gelu, p, &b.mlp_proj, rows, 4 * c, c, threads);
        add_into(out, &acts.res_2, threads);
    }
}

/// The backward pass's scratch: the gradient with respect to the residual stream at
/// the step's point, and of the layers' narrow, attention, q-k-v and wide widths.
#[derive(Default)]
pub(super) struct Backward {
    /// A LayerNorm's output and GELU's, which blocks do not keep: written by the
    /// forward pass and recomputed by the backward pass as each needs them.
    pub(super) ln: Vec<f32>,
    pub(super) gelu: Vec<f32>,
    pub(super) res: Vec<f32>,
    pub(super) narrow: Vec<f32>,
    pub(super) atty: Vec<f32>,
    pub(super) qkv: Vec<f32>,
    pub(super) wide: Vec<f32>,
}

/// Backward of one transformer block whose input was `x`: `d.res` holds the gradient
/// with respect to the block's output and leaves holding it with respect to its
/// input. `kept` is what its forward pass kept; without it (a block that recomputes)
/// the forward pass runs again into `scratch` from `x`, up to what the backward pass
/// reads: the same kernels on the same input, so the same bits.
#[allow(clippy::too_many_arguments)]
pub(super) fn block_backward(
    d: &mut Backward,
    pending: &mut Grads<'_>,
    kept: Option<&BlockActs>,
    scratch: &mut BlockActs,
    x: &[f32],
    p: &[f32],
    b: &BlockAt,
    s: Shape,
) {
    let Shape { n, t, c, n_head: nh, gelu: form, threads } = s;
    let rows = n * t;
    let a = match kept {
        Some(a) => a,
        None => {
            block_forward(scratch, d, x, None, p, b, s);
            &*scratch
        }
    };
    // out = res_2 + mlp_proj(gelu(c_fc(ln_2(res_2)))); GELU's output recomputed.
    gelu(&mut d.gelu, &a.fc, form, threads);
    d.wide.resize(rows * 4 * c, 0.0);
    linear_backward(pending, &mut d.wide, &d.res, &d.gelu, p, &b.mlp_proj, rows, 4 * c, c, threads);
    gelu_backward(&mut d.wide, &a.fc, form, threads);
    d.narrow.resize(rows * c, 0.0);
    renormalize(&mut d.ln, &a.res_2, &a.ln_2_stats, p, &b.ln_2, c, threads);
    linear_backward(pending, &mut d.narrow, &d.wide, &d.ln, p, &b.c_fc, rows, c, 4 * c, threads);
    layer_norm_backward(&mut d.res, pending, &d.narrow, &a.res_2, &a.ln_2_stats, p, &b.ln_2, c, threads);
    // res_2 = x + attn_proj(attention(c_attn(ln_1(x)))).
    d.atty.resize(rows * c, 0.0);
    linear_backward(pending, &mut d.atty, &d.res, &a.atty, p, &b.attn_proj, rows, c, c, threads);
    d.qkv.resize(rows * 3 * c, 0.0);
    attention_backward(&mut d.qkv, &d.atty, &a.qkv, &a.att, n, t, c, nh, threads);
    renormalize(&mut d.ln, x, &a.ln_1_stats, p, &b.ln_1, c, threads);
    linear_backward(pending, &mut d.narrow, &d.qkv, &d.ln, p, &b.c_attn, rows, c, 3 * c, threads);
    layer_norm_backward(&mut d.res, pending, &d.narrow, x, &a.ln_1_stats, p, &b.ln_1, c, threads);
}

/// The embeddings of `tokens` (windows of `t`) into `x`: each token's row of `wte`
/// plus its position's of `wpe`.
pub(super) fn embed(
    x: &mut Vec<f32>,
    tokens: &[u32],
    t: usize,
    p: &[f32],
    wte: &Range<usize>,
    wpe: &Range<usize>,
    c: usize,
) {
    x.resize(tokens.len() * c, 0.0);
    for ((row, &tok), pos) in x.chunks_exact_mut(c).zip(tokens).zip((0..t).cycle()) {
        let (e, q) = (&p[wte.clone()][tok as usize * c..][..c], &p[wpe.clone()][pos * c..][..c]);
        row.iter_mut().zip(e.iter().zip(q)).for_each(|(o, (a, b))| *o = a + b);
    }
}

/// The backward of [`embed`]: adds each row of `d` (the gradient with respect to the
/// embeddings) to its token's row of `wte`'s gradient and its position's of `wpe`'s.
pub(super) fn embed_backward(
    grads: &mut Grads<'_>,
    d: &[f32],
    tokens: &[u32],
    t: usize,
    wte: &Range<usize>,
    wpe: &Range<usize>,
    c: usize,
) {
    for ((d, &tok), pos) in d.chunks_exact(c).zip(tokens).zip((0..t).cycle()) {
        let e = &mut grads.at(wte)[tok as usize * c..][..c];
        e.iter_mut().zip(d).for_each(|(g, d)| *g += d);
        let q = &mut grads.at(wpe)[pos * c..][..c];
        q.iter_mut().zip(d).for_each(|(g, d)| *g += d);
    }
}

/// `out = x @ w^T + b` for `rows` rows of `inp` values to `outp`.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear(
    out: &mut Vec<f32>,
    x: &[f32],
    p: &[f32],
    a: &Affine,
    rows: usize,
    inp: usize,
    outp: usize,
    threads: usize,
) {
    out.resize(rows * outp, 0.0);
    if let Some(b) = &a.b {
        fill_rows(out, &p[b.clone()], threads);
    }
    let w = View::rows(&p[a.w.clone()], outp, inp);
    matmul(out, a.b.is_some(), View::rows(x, rows, inp), w.t(), threads);
}

/// The backward of [`linear`]: the weight's and bias's gradients into `grads` (written
/// or added, as it says), the input's into `d_x`, from the output's `d_out`.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_backward(
    grads: &mut Grads<'_>,
    d_x: &mut [f32],
    d_out: &[f32],
    x: &[f32],
    p: &[f32],
    a: &Affine,
    rows: usize,
    inp: usize,
    outp: usize,
    threads: usize,
) {
    let dy = View::rows(d_out, rows, outp);
    let add = grads.add;
    matmul(grads.at(&a.w), add, dy.t(), View::rows(x, rows, inp), threads);
    if let Some(b) = &a.b {
        column_sums(d_out, grads.at(b), add, threads);
    }
    matmul(d_x, false, dy, View::rows(&p[a.w.clone()], outp, inp), threads);
}

/// `dst += src`, over the threads.
pub(super) fn add_into(dst: &mut [f32], src: &[f32], threads: usize) {
    elementwise(dst, src, threads, add);
}

#[multiversion(targets = "simd")]
pub(super) fn add(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
}

/// LayerNorm of each row of `x` (rows of `c`) into `out`, keeping each row's mean
/// and reciprocal standard deviation for the backward pass.
pub(super) fn layer_norm(
    out: &mut Vec<f32>,
    stats: &mut Vec<(f32, f32)>,
    x: &[f32],
    p: &[f32],
    a: &Affine,
    c: usize,
    threads: usize,
) {
    let rows = x.len() / c;
    out.resize(x.len(), 0.0);
    stats.resize(rows, (0.0, 0.0));
    let (w, b) = (&p[a.w.clone()], a.b.as_ref().map(|b| &p[b.clone()]));
    if threads > 1 {
        let per = rows_per_thread(rows, threads);
        out.par_chunks_mut(per * c)
            .zip(stats.par_chunks_mut(per).zip(x.par_chunks(per * c)))
            .for_each(|(out, (stats, x))| normalize(out, stats, x, w, b));
    } else {
        normalize(out, stats, x, w, b);
    }
}

/// LayerNorm of each row of `x` (rows of `w.len()`): see [`layer_norm`].
#[multiversion(targets = "simd")]
pub(super) fn normalize(out: &mut [f32], stats: &mut [(f32, f32)], x: &[f32], w: &[f32], b: Option<&[f32]>) {
    let c = w.len();
    for ((o, s), x) in out.chunks_exact_mut(c).zip(stats).zip(x.chunks_exact(c)) {
        let mean = sum(x) / c as f32;
        let var = sum_sq_dev(x, mean) / c as f32;
        let rstd = 1.0 / (var + EPS).sqrt();
        *s = (mean, rstd);
        normalize_row(o, x, (mean, rstd), w, b);
    }
}

/// One row of a LayerNorm's output from its statistics: the same operations in the
/// same order whether computed with them or again from them, so the same bits.
#[inline(always)]
fn normalize_row(o: &mut [f32], x: &[f32], (mean, rstd): (f32, f32), w: &[f32], b: Option<&[f32]>) {
    match b {
        Some(b) => o
            .iter_mut()
            .zip(x)
            .zip(w.iter().zip(b))
            .for_each(|((o, x), (w, b))| *o = (x - mean) * rstd * w + b),
        None => o.iter_mut().zip(x).zip(w).for_each(|((o, x), w)| *o = (x - mean) * rstd * w),
    }
}

/// A LayerNorm's output again from its input `x` and the statistics its forward pass
/// kept (see [`layer_norm`]): the same values, bit for bit.
pub(super) fn renormalize(
    out: &mut Vec<f32>,
    x: &[f32],
    stats: &[(f32, f32)],
    p: &[f32],
    a: &Affine,
    c: usize,
    threads: usize,
) {
    out.resize(x.len(), 0.0);
    let (w, b) = (&p[a.w.clone()], a.b.as_ref().map(|b| &p[b.clone()]));
    if threads > 1 {
        let per = rows_per_thread(stats.len(), threads);
        out.par_chunks_mut(per * c)
            .zip(x.par_chunks(per * c).zip(stats.par_chunks(per)))
            .for_each(|(o, (x, stats))| normalize_again(o, x, stats, w, b));
    } else {
        normalize_again(out, x, stats, w, b);
    }
}

/// Rows of [`renormalize`].
#[multiversion(targets = "simd")]
fn normalize_again(out: &mut [f32], x: &[f32], stats: &[(f32, f32)], w: &[f32], b: Option<&[f32]>) {
    let c = w.len();
    for ((o, x), &s) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(stats) {
        normalize_row(o, x, s, w, b);
    }
}

/// One piece of rows of [`layer_norm_backward`]: `d_x`, `d_out`, `x` and the stats.
type NormPiece<'a> = (&'a mut [f32], (&'a [f32], (&'a [f32], &'a [(f32, f32)])));

/// Windows of [`attention_backward`]: `d_qkv`, `d_atty`, `qkv` and `att`.
type AttentionPiece<'a> = (&'a mut [f32], (&'a [f32], (&'a [f32], &'a [f32])));

/// Rows in one piece of the LayerNorm weight's gradient (see `kernels::column_sums`).
const NORM_ROWS: usize = 64;

/// The backward of [`layer_norm`]: adds the input's gradient to `d_x` and writes (or
/// adds, as `grads` says) the weight's and bias's into `grads`, from the output's `d_out`.
#[allow(clippy::too_many_arguments)]
pub(super) fn layer_norm_backward(
    d_x: &mut [f32],
    grads: &mut Grads<'_>,
    d_out: &[f32],
    x: &[f32],
    stats: &[(f32, f32)],
    p: &[f32],
    a: &Affine,
    c: usize,
    threads: usize,
) {
    let w = &p[a.w.clone()];
    let piece = |(d_x, (d_out, (x, stats))): NormPiece<'_>| normalize_backward(d_x, d_out, x, stats, w);
    let len = NORM_ROWS * c;
    let parts: Vec<Vec<f32>> = if threads > 1 {
        d_x.par_chunks_mut(len)
            .zip(d_out.par_chunks(len).zip(x.par_chunks(len).zip(stats.par_chunks(NORM_ROWS))))
            .map(piece)
            .collect()
    } else {
        d_x.chunks_mut(len)
            .zip(d_out.chunks(len).zip(x.chunks(len).zip(stats.chunks(NORM_ROWS))))
            .map(piece)
            .collect()
    };
    if !grads.add {
        grads.at(&a.w).fill(0.0);
        if let Some(b) = &a.b {
            grads.at(b).fill(0.0);
        }
    }
    for part in parts {
        grads.at(&a.w).iter_mut().zip(&part[..c]).for_each(|(g, v)| *g += v);
        if let Some(b) = &a.b {
            grads.at(b).iter_mut().zip(&part[c..]).for_each(|(g, v)| *g += v);
        }
    }
}

/// Per piece of rows of [`layer_norm_backward`]: adds the input's gradient to `d_x`
/// and returns the piece's partial sums of the weight's gradient, then the bias's.
#[multiversion(targets = "simd")]
pub(super) fn normalize_backward(
    d_x: &mut [f32],
    d_out: &[f32],
    x: &[f32],
    stats: &[(f32, f32)],
    w: &[f32],
) -> Vec<f32> {
    let c = w.len();
    let mut part = vec![0f32; 2 * c];
    let (dw, db) = part.split_at_mut(c);
    for (((dx, dy), x), &(mean, rstd)) in
        d_x.chunks_exact_mut(c).zip(d_out.chunks_exact(c)).zip(x.chunks_exact(c)).zip(stats)
    {
        let (mut mean_dn, mut mean_dn_n) = (0f32, 0f32);
        for ((dy, x), w) in dy.iter().zip(x).zip(w) {
            let n = (x - mean) * rstd;
            let dn = dy * w;
            mean_dn += dn;
            mean_dn_n += dn * n;
        }
        (mean_dn, mean_dn_n) = (mean_dn / c as f32, mean_dn_n / c as f32);
        for ((((dx, dy), x), w), (dw, db)) in
            dx.iter_mut().zip(dy).zip(x).zip(w).zip(dw.iter_mut().zip(db.iter_mut()))
        {
            let n = (x - mean) * rstd;
            *dw += dy * n;
            *db += dy;
            *dx += (dy * w - mean_dn - n * mean_dn_n) * rstd;
        }
    }
    part
}

/// GELU: exact (erf), as PyTorch's default and candle's `gelu_erf`, or GPT-2's tanh
/// approximation, as transformers' `gelu_new` and candle's `gelu`.
pub(super) fn gelu(out: &mut Vec<f32>, x: &[f32], form: Gelu, threads: usize) {
    out.resize(x.len(), 0.0);
    match form {
        Gelu::Erf => elementwise(out, x, threads, gelu_values),
        Gelu::Tanh => elementwise(out, x, threads, gelu_tanh_values),
    }
}

#[multiversion(targets = "simd")]
pub(super) fn gelu_values(out: &mut [f32], x: &[f32]) {
    out.iter_mut().zip(x).for_each(|(o, &x)| *o = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)))
}

/// sqrt(2 / pi), and the cubic term's weight of GPT-2's GELU.
const GELU_K: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// `tanh(u)` as `1 - 2 / (e^(2u) + 1)`, with the branch-free [`exp`].
#[inline(always)]
fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * u) + 1.0)
}

#[multiversion(targets = "simd")]
pub(super) fn gelu_tanh_values(out: &mut [f32], x: &[f32]) {
    out.iter_mut()
        .zip(x)
        .for_each(|(o, &x)| *o = 0.5 * x * (1.0 + tanh(GELU_K * (x + GELU_CUBIC * x * x * x))))
}

/// `d *= gelu'(x)`, in place.
pub(super) fn gelu_backward(d: &mut [f32], x: &[f32], form: Gelu, threads: usize) {
    match form {
        Gelu::Erf => elementwise(d, x, threads, gelu_backward_values),
        Gelu::Tanh => elementwise(d, x, threads, gelu_tanh_backward_values),
    }
}

#[multiversion(targets = "simd")]
pub(super) fn gelu_backward_values(d: &mut [f32], x: &[f32]) {
    // 1 / sqrt(2 pi).
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    d.iter_mut().zip(x).for_each(|(d, &x)| {
        let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = exp(-0.5 * x * x) * INV_SQRT_2PI;
        *d *= cdf + x * pdf;
    })
}

#[multiversion(targets = "simd")]
pub(super) fn gelu_tanh_backward_values(d: &mut [f32], x: &[f32]) {
    d.iter_mut().zip(x).for_each(|(d, &x)| {
        let th = tanh(GELU_K * (x + GELU_CUBIC * x * x * x));
        let du = GELU_K * (1.0 + 3.0 * GELU_CUBIC * x * x);
        *d *= 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du;
    })
}

/// Causal multi-head attention of `n` windows of `t` positions: from `qkv`
/// (`[n * t, 3 c]`, q then k then v, heads side by side in each) the probabilities
/// `att` (`[n, nh, t, t]`) and the heads' outputs `atty` (`[n * t, c]`). Windows are
/// split among the threads; each head is three small single-threaded products.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    att: &mut Vec<f32>,
    atty: &mut Vec<f32>,
    qkv: &[f32],
    n: usize,
    t: usize,
    c: usize,
    nh: usize,
    threads: usize,
) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    att.resize(n * nh * t * t, 0.0);
    atty.resize(n * t * c, 0.0);
    let window = |(att, (atty, qkv)): (&mut [f32], (&mut [f32], &[f32]))| {
        for (att, (atty, qkv)) in att
            .chunks_exact_mut(nh * t * t)
            .zip(atty.chunks_exact_mut(t * c).zip(qkv.chunks_exact(t * 3 * c)))
        {
            for h in 0..nh {
                let q = View::strided(&qkv[h * hs..], t, hs, 3 * c);
                let k = View::strided(&qkv[c + h * hs..], t, hs, 3 * c);
                let v = View::strided(&qkv[2 * c + h * hs..], t, hs, 3 * c);
                let a = &mut att[h * t * t..][..t * t];
                matmul(a, false, q, k.t(), 1);
                causal_softmax(a, t, scale);
                matmul_to(&mut atty[h * hs..], c, false, View::rows(a, t, t), v, 1);
            }
        }
    };
    if threads > 1 {
        let per = rows_per_thread(n, threads);
        att.par_chunks_mut(per * nh * t * t)
            .zip(atty.par_chunks_mut(per * t * c).zip(qkv.par_chunks(per * t * 3 * c)))
            .for_each(window);
    } else {
        window((att, (atty, qkv)));
    }
}

/// The backward of [`attention`]: `d_qkv` from the heads' outputs' gradient `d_atty`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward(
    d_qkv: &mut [f32],
    d_atty: &[f32],
    qkv: &[f32],
    att: &[f32],
    n: usize,
    t: usize,
    c: usize,
    nh: usize,
    threads: usize,
) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let window = |(d_qkv, (d_atty, (qkv, att))): AttentionPiece<'_>| {
        let mut d_att = vec![0f32; t * t];
        for (d_qkv, (d_atty, (qkv, att))) in d_qkv.chunks_exact_mut(t * 3 * c).zip(
            d_atty.chunks_exact(t * c).zip(qkv.chunks_exact(t * 3 * c).zip(att.chunks_exact(nh * t * t))),
        ) {
            for h in 0..nh {
                let q = View::strided(&qkv[h * hs..], t, hs, 3 * c);
                let k = View::strided(&qkv[c + h * hs..], t, hs, 3 * c);
                let v = View::strided(&qkv[2 * c + h * hs..], t, hs, 3 * c);
                let dy = View::strided(&d_atty[h * hs..], t, hs, c);
                let a = &att[h * t * t..][..t * t];
                // y = a v: d_a = dy v^T, d_v = a^T dy.
                matmul(&mut d_att, false, dy, v.t(), 1);
                matmul_to(&mut d_qkv[2 * c + h * hs..], 3 * c, false, View::rows(a, t, t).t(), dy, 1);
                // Through the softmax (rows of a sum to one) and the scale.
                causal_softmax_backward(&mut d_att, a, t, scale);
                // scores = q k^T: d_q = d_s k, d_k = d_s^T q.
                let ds = View::rows(&d_att, t, t);
                matmul_to(&mut d_qkv[h * hs..], 3 * c, false, ds, k, 1);
                matmul_to(&mut d_qkv[c + h * hs..], 3 * c, false, ds.t(), q, 1);
            }
        }
    };
    if threads > 1 {
        let per = rows_per_thread(n, threads);
        d_qkv
            .par_chunks_mut(per * t * 3 * c)
            .zip(
                d_atty
                    .par_chunks(per * t * c)
                    .zip(qkv.par_chunks(per * t * 3 * c).zip(att.par_chunks(per * nh * t * t))),
            )
            .for_each(window);
    } else {
        window((d_qkv, (d_atty, (qkv, att))));
    }
}

/// `softmax(scale * row)` of each row `i` of the `t x t` scores `a` over its first
/// `i + 1` columns, in place; the rest (the future) zero.
#[multiversion(targets = "simd")]
pub(super) fn causal_softmax(a: &mut [f32], t: usize, scale: f32) {
    for (i, row) in a.chunks_exact_mut(t).enumerate() {
        let (keep, masked) = row.split_at_mut(i + 1);
        let max = max(keep);
        keep.iter_mut().for_each(|v| *v = exp((*v - max) * scale));
        let inv = 1.0 / sum(keep);
        keep.iter_mut().for_each(|v| *v *= inv);
        masked.fill(0.0);
    }
}

/// The backward of [`causal_softmax`], in place: `d` the gradient with respect to the
/// probabilities `a` becomes the one with respect to the scores.
#[multiversion(targets = "simd")]
pub(super) fn causal_softmax_backward(d: &mut [f32], a: &[f32], t: usize, scale: f32) {
    for (i, (d, a)) in d.chunks_exact_mut(t).zip(a.chunks_exact(t)).enumerate() {
        let keep = i + 1;
        let dot = dot(&d[..keep], &a[..keep]);
        d[..keep].iter_mut().zip(&a[..keep]).for_each(|(d, a)| *d = scale * a * (*d - dot));
        d[keep..].fill(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each GELU and its derivative against its definition in f64 (the derivative by
    /// central differences), across the range activations take; the two forms differ.
    #[test]
    fn gelu_forms_match_their_definitions() {
        let xs: Vec<f32> = (-80..=80).map(|i| i as f32 / 10.0).collect();
        let tanh_gelu = |x: f64| {
            0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        };
        let erf_gelu = |x: f64| 0.5 * x * (1.0 + crate::tests::gpt::erf(x / std::f64::consts::SQRT_2));
        let mut apart = 0f64;
        for (form, f) in [(Gelu::Erf, &erf_gelu as &dyn Fn(f64) -> f64), (Gelu::Tanh, &tanh_gelu)] {
            let mut out = Vec::new();
            gelu(&mut out, &xs, form, 1);
            let mut d = vec![1f32; xs.len()];
            gelu_backward(&mut d, &xs, form, 1);
            for ((&x, &y), &dy) in xs.iter().zip(&out).zip(&d) {
                let x = f64::from(x);
                assert!((f64::from(y) - f(x)).abs() < 2e-6 * x.abs().max(1.0), "{form:?} gelu({x}) = {y}");
                let slope = (f(x + 1e-6) - f(x - 1e-6)) / 2e-6;
                assert!((f64::from(dy) - slope).abs() < 2e-5, "{form:?} gelu'({x}) = {dy}, not {slope}");
                apart = apart.max((tanh_gelu(x) - erf_gelu(x)).abs());
            }
        }
        assert!(apart > 1e-4, "the forms are told apart: {apart}");
    }
}
