//! The GPT: nanoGPT's names and shapes, its initialisation, gradients against finite
//! differences, and the loss against a plain reference implementation written from
//! the architecture's definition (f64 loops, no candle).

use sheaf_core::{Batch, ComputeBackend, Model, ModelInput, ModelSpec};

use crate::{CandleBackend, GptSpec};

fn spec(extra: &str) -> ModelSpec {
    let mut s = ModelSpec::new(
        "gpt",
        format!(r#"{{"n_layer": 2, "n_head": 2, "n_embd": 8, "block_size": 6{extra}}}"#),
    );
    s.vocab_size = Some(11);
    s
}

fn windows(n: usize, window: usize, vocab: u32) -> Vec<u32> {
    (0..n * window).map(|i| ((i * 7 + i / 3) as u32) % vocab).collect()
}

#[test]
fn names_and_shapes_are_nanogpts() {
    let backend = CandleBackend::new("cpu").unwrap();
    let info = backend.describe(&spec("")).unwrap();
    let names: Vec<(String, Vec<usize>)> =
        info.layout.specs().iter().map(|s| (s.name.clone(), s.shape.clone())).collect();
    let h0: Vec<(String, Vec<usize>)> = [
        ("ln_1.weight", vec![8]),
        ("ln_1.bias", vec![8]),
        ("attn.c_attn.weight", vec![24, 8]),
        ("attn.c_attn.bias", vec![24]),
        ("attn.c_proj.weight", vec![8, 8]),
        ("attn.c_proj.bias", vec![8]),
        ("ln_2.weight", vec![8]),
        ("ln_2.bias", vec![8]),
        ("mlp.c_fc.weight", vec![32, 8]),
        ("mlp.c_fc.bias", vec![32]),
        ("mlp.c_proj.weight", vec![8, 32]),
        ("mlp.c_proj.bias", vec![8]),
    ]
    .into_iter()
    .map(|(n, s)| (format!("transformer.h.0.{n}"), s))
    .collect();
    assert_eq!(names[0], ("transformer.wte.weight".to_string(), vec![11, 8]));
    assert_eq!(names[1], ("transformer.wpe.weight".to_string(), vec![6, 8]));
    assert_eq!(names[2..14], h0[..]);
    assert_eq!(names.len(), 2 + 2 * 12 + 2, "the tied head is not stored");
    assert_eq!(names.last().unwrap().0, "transformer.ln_f.bias");
    let blocks: Vec<&str> = info.blocks.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(blocks, ["embeddings", "h.0", "h.1", "head"]);
    assert_eq!(info.blocks.iter().map(|b| b.params).sum::<u64>() as usize, info.layout.total());
    assert_eq!(info.input, ModelInput::Tokens { vocab_size: 11, block_size: 6 });

    let untied = backend.describe(&spec(r#", "bias": false, "tie_embeddings": false"#)).unwrap();
    let names: Vec<&str> = untied.layout.specs().iter().map(|s| s.name.as_str()).collect();
    assert!(!names.iter().any(|n| n.ends_with(".bias")), "{names:?}");
    assert_eq!(*names.last().unwrap(), "lm_head.weight");
}

#[test]
fn init_is_nanogpts() {
    let mut wide = ModelSpec::new("gpt", r#"{"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 16}"#);
    wide.vocab_size = Some(50);
    let g = GptSpec::parse(&wide).unwrap();
    let layout = g.layout();
    let values = crate::gpt::init_params(&g, 3);
    let std_of = |name: &str| {
        let i = layout.specs().iter().position(|s| s.name == name).unwrap();
        let v = &values[layout.range(i)];
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        (v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    };
    let close = |got: f64, want: f64| (got - want).abs() < 0.1 * want;
    assert!(close(std_of("transformer.wte.weight"), 0.02));
    assert!(close(std_of("transformer.h.1.mlp.c_fc.weight"), 0.02));
    // 0.02 / sqrt(2 n_layer) for both c_proj weights.
    assert!(close(std_of("transformer.h.0.attn.c_proj.weight"), 0.01));
    assert!(close(std_of("transformer.h.1.mlp.c_proj.weight"), 0.01));
    for (i, s) in layout.specs().iter().enumerate() {
        let v = &values[layout.range(i)];
        if s.name.ends_with(".bias") {
            assert!(v.iter().all(|&x| x == 0.0), "{}", s.name);
        } else if s.name.contains(".ln_") {
            assert!(v.iter().all(|&x| x == 1.0), "{}", s.name);
        }
    }
    assert_eq!(values, crate::gpt::init_params(&g, 3));
    assert_ne!(values, crate::gpt::init_params(&g, 4));
}

#[test]
fn bad_settings_are_errors_naming_the_key() {
    let backend = CandleBackend::new("cpu").unwrap();
    let mut odd = ModelSpec::new("gpt", r#"{"n_layer": 1, "n_head": 3, "n_embd": 8, "block_size": 4}"#);
    odd.vocab_size = Some(5);
    let e = backend.describe(&odd).unwrap_err().to_string();
    assert!(e.contains("model.n_embd") && e.contains("not divisible by n_head = 3"), "{e}");
    let no_vocab = ModelSpec::new("gpt", r#"{"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 4}"#);
    let e = backend.describe(&no_vocab).unwrap_err().to_string();
    assert!(e.contains("model.vocab_size") && e.contains("required"), "{e}");
    let e = backend.describe(&spec(r#", "dropout": 0.1"#)).unwrap_err().to_string();
    assert!(e.contains("unknown field `dropout`"), "{e}");
    let e = backend.describe(&spec(r#", "vocab_size": 4"#)).unwrap_err().to_string();
    assert!(e.contains("vocabulary has 11"), "{e}");
    let mut m = backend.build_model(&spec(""), 0).unwrap();
    let mut grads = vec![0f32; m.layout().total()];
    let e =
        m.forward_backward(&Batch::Tokens { windows: &[1, 2, 11, 3], window: 4 }, &mut grads).unwrap_err();
    assert!(e.to_string().contains("token id 11 (at 2"), "{e}");
    let e = m.forward_backward(&Batch::Tokens { windows: &[1; 8], window: 8 }, &mut grads).unwrap_err();
    assert!(e.to_string().contains("block_size 6"), "{e}");
}

#[test]
fn gradients_match_finite_differences() {
    for extra in ["", r#", "bias": false, "tie_embeddings": false"#, r#", "gelu": "tanh""#] {
        let spec = spec(extra);
        let mut m = CandleBackend::new("cpu").unwrap().build_model(&spec, 7).unwrap();
        let w = windows(3, 7, 11);
        let batch = Batch::Tokens { windows: &w, window: 7 };
        let total = m.layout().total();
        let mut grads = vec![0f32; total];
        let loss = m.forward_backward(&batch, &mut grads).unwrap();
        let mut params = vec![0f32; total];
        m.read_params(&mut params).unwrap();
        // Larger values than the init's, so every path's gradient is well above noise.
        let mut rng = sheaf_core::SplitMix64::new(1);
        for p in params.iter_mut() {
            *p += 0.3 * rng.next_f32();
        }
        m.write_params(&params).unwrap();
        let loss2 = m.forward_backward(&batch, &mut grads).unwrap();
        assert!(loss2 != loss);
        let loss_at = |m: &mut Box<dyn Model>, p: &[f32]| {
            m.write_params(p).unwrap();
            m.evaluate(&batch).unwrap().0 / batch.predictions() as f64
        };
        let mut worst = 0f64;
        for i in (0..total).step_by(7) {
            let h = 1e-2f32;
            let mut plus = params.clone();
            plus[i] += h;
            let mut minus = params.clone();
            minus[i] -= h;
            let numeric = (loss_at(&mut m, &plus) - loss_at(&mut m, &minus)) / (2.0 * f64::from(h));
            worst = worst.max((numeric - f64::from(grads[i])).abs());
            assert!(
                (numeric - f64::from(grads[i])).abs() < 3e-3,
                "{extra} param {i}: numeric {numeric} vs {}",
                grads[i]
            );
        }
        assert!(worst > 0.0);
    }
}

/// The plain reference: GPT-2's forward written out in f64 loops.
fn reference_loss(
    spec: &GptSpec,
    layout: &sheaf_core::ParamLayout,
    params: &[f32],
    windows: &[u32],
    window: usize,
) -> f64 {
    let p = |name: &str| -> Option<Vec<f64>> {
        let i = layout.specs().iter().position(|s| s.name == name)?;
        Some(params[layout.range(i)].iter().map(|&v| f64::from(v)).collect())
    };
    let (c, nh, v) = (spec.n_embd, spec.n_head, spec.vocab_size);
    let hs = c / nh;
    let t = window - 1;
    let linear = |x: &[f64], name: &str, out: usize| -> Vec<f64> {
        let w = p(&format!("{name}.weight")).unwrap();
        let b = p(&format!("{name}.bias"));
        let inp = x.len();
        (0..out)
            .map(|o| (0..inp).map(|i| w[o * inp + i] * x[i]).sum::<f64>() + b.as_ref().map_or(0.0, |b| b[o]))
            .collect()
    };
    let norm = |x: &[f64], name: &str| -> Vec<f64> {
        let w = p(&format!("{name}.weight")).unwrap();
        let b = p(&format!("{name}.bias"));
        let mean = x.iter().sum::<f64>() / x.len() as f64;
        let var = x.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / x.len() as f64;
        x.iter()
            .enumerate()
            .map(|(i, a)| (a - mean) / (var + 1e-5).sqrt() * w[i] + b.as_ref().map_or(0.0, |b| b[i]))
            .collect()
    };
    let gelu = |x: f64| match spec.gelu {
        crate::gpt::Gelu::Erf => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
        // GPT-2's: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
        crate::gpt::Gelu::Tanh => {
            0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        }
    };
    let (wte, wpe) = (p("transformer.wte.weight").unwrap(), p("transformer.wpe.weight").unwrap());
    let head = if spec.tie_embeddings { wte.clone() } else { p("lm_head.weight").unwrap() };
    let mut total = 0.0;
    for w in windows.chunks_exact(window) {
        let mut x: Vec<Vec<f64>> =
            (0..t).map(|i| (0..c).map(|k| wte[w[i] as usize * c + k] + wpe[i * c + k]).collect()).collect();
        for l in 0..spec.n_layer {
            let h = format!("transformer.h.{l}");
            let qkv: Vec<Vec<f64>> = x
                .iter()
                .map(|r| linear(&norm(r, &format!("{h}.ln_1")), &format!("{h}.attn.c_attn"), 3 * c))
                .collect();
            let mut y = vec![vec![0.0; c]; t];
            for head_i in 0..nh {
                for i in 0..t {
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hs)
                                .map(|d| qkv[i][head_i * hs + d] * qkv[j][c + head_i * hs + d])
                                .sum::<f64>()
                                / (hs as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (j, ej) in e.iter().enumerate() {
                        for d in 0..hs {
                            y[i][head_i * hs + d] += ej / z * qkv[j][2 * c + head_i * hs + d];
                        }
                    }
                }
            }
            for i in 0..t {
                let a = linear(&y[i], &format!("{h}.attn.c_proj"), c);
                x[i].iter_mut().zip(a).for_each(|(xi, ai)| *xi += ai);
                let m: Vec<f64> = linear(&norm(&x[i], &format!("{h}.ln_2")), &format!("{h}.mlp.c_fc"), 4 * c)
                    .into_iter()
                    .map(gelu)
                    .collect();
                let m = linear(&m, &format!("{h}.mlp.c_proj"), c);
                x[i].iter_mut().zip(m).for_each(|(xi, mi)| *xi += mi);
            }
        }
        for i in 0..t {
            let f = norm(&x[i], "transformer.ln_f");
            let logits: Vec<f64> = (0..v).map(|o| (0..c).map(|k| head[o * c + k] * f[k]).sum()).collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            total += lse - logits[w[i + 1] as usize];
        }
    }
    total
}

/// erf by Abramowitz and Stegun 7.1.26 (|error| < 1.5e-7).
pub(crate) fn erf(x: f64) -> f64 {
    let s = x.signum();
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let y = 1.0
        - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t
            + 0.254_829_592)
            * t
            * (-x * x).exp();
    s * y
}

#[test]
fn loss_equals_the_reference_definition() {
    for extra in ["", r#", "bias": false, "tie_embeddings": false"#, r#", "gelu": "tanh""#] {
        let spec = spec(extra);
        let g = GptSpec::parse(&spec).unwrap();
        let mut m = CandleBackend::new("cpu").unwrap().build_model(&spec, 5).unwrap();
        let total = m.layout().total();
        let mut params = vec![0f32; total];
        m.read_params(&mut params).unwrap();
        let mut rng = sheaf_core::SplitMix64::new(2);
        for p in params.iter_mut() {
            *p += 0.5 * rng.next_f32();
        }
        m.write_params(&params).unwrap();
        // Full windows and shorter ones (fewer positions than block_size).
        for window in [7, 4] {
            let w = windows(3, window, 11);
            let (sum, _) = m.evaluate(&Batch::Tokens { windows: &w, window }).unwrap();
            let want = reference_loss(&g, m.layout(), &params, &w, window);
            assert!(
                (sum - want).abs() < 1e-4 * want.abs().max(1.0),
                "{extra} window {window}: {sum} vs {want}"
            );
        }
    }
}

#[test]
fn predict_gives_the_last_positions_logits() {
    let mut m = CandleBackend::new("cpu").unwrap().build_model(&spec(""), 1).unwrap();
    let ctx = [3u32, 1, 4, 1, 5, 9, 2, 6, 5];
    let logits = m.predict(&Batch::Tokens { windows: &ctx, window: ctx.len() }).unwrap();
    assert_eq!(logits.len(), 11);
    // Longer than block_size: the last 6 tokens are the context, as nanoGPT crops.
    let cropped = m.predict(&Batch::Tokens { windows: &ctx[3..], window: 6 }).unwrap();
    assert_eq!(logits, cropped);
}

/// Pipeline stages of blocks, run micro-batch by micro-batch, give the whole model's
/// loss and gradients for any cut, tied or untied head: the tied embedding's two
/// copies (first and last stage) have gradients that sum to the whole model's.
#[test]
fn stages_over_micro_batches_equal_the_whole_model() {
    let backend = CandleBackend::new("cpu").unwrap();
    for extra in ["", r#", "tie_embeddings": false"#] {
        let spec = spec(extra);
        let w = windows(6, 7, 11);
        let batch = Batch::Tokens { windows: &w, window: 7 };
        let mut whole = backend.build_model(&spec, 11).unwrap();
        let total = whole.layout().total();
        let (mut want, mut params) = (vec![0f32; total], vec![0f32; total]);
        let loss = whole.forward_backward(&batch, &mut want).unwrap();
        whole.read_params(&mut params).unwrap();
        let targets = sheaf_core::Samples::Tokens { windows: w.clone(), window: 7 }.targets();
        for cut in [&[0usize, 4][..], &[0, 1, 4], &[0, 2, 3, 4], &[0, 1, 2, 3, 4]] {
            for micro in [1usize, 2, 3] {
                let mut stages: Vec<_> = cut
                    .windows(2)
                    .map(|c| {
                        let p = sheaf_core::Piece { blocks: c[0]..c[1], tensor_rank: 0, tensor_width: 1 };
                        backend.build_piece(&spec, &p, 11).unwrap()
                    })
                    .collect();
                let rows = 6 / micro;
                let mut loss_sum = 0.0;
                for m in 0..micro {
                    let mine = &w[m * rows * 7..(m + 1) * rows * 7];
                    let mut act = stages[0]
                        .stage_forward_batch(m as u64, 0, &Batch::Tokens { windows: mine, window: 7 })
                        .unwrap();
                    for s in stages[1..].iter_mut() {
                        act = s.stage_forward(m as u64, 0, &act, rows).unwrap();
                    }
                    let t = &targets[m * rows * 6..(m + 1) * rows * 6];
                    let (l, _, mut grad) = stages.last_mut().unwrap().loss_grad(&act, t, 1.0 / 36.0).unwrap();
                    loss_sum += l;
                    for s in stages.iter_mut().rev() {
                        grad = s.stage_backward(m as u64, 0, &grad).unwrap();
                    }
                }
                assert!((loss_sum / 36.0 - f64::from(loss)).abs() < 1e-5, "{cut:?} x{micro}");
                // Gradients summed into the whole model's positions (a tied copy adds).
                let mut got = vec![0f32; total];
                let mut tied = 0;
                for s in stages.iter_mut() {
                    let piece = backend.piece_layout(&spec, &s.piece().unwrap()).unwrap();
                    tied += s.tied_params().len();
                    let mut g = vec![0f32; s.layout().total()];
                    s.take_grads(&mut g).unwrap();
                    let mut mine = vec![0f32; total];
                    piece.place(whole.layout(), &g, &mut mine);
                    got.iter_mut().zip(&mine).for_each(|(a, b)| *a += b);
                    let mut p = vec![0f32; s.layout().total()];
                    s.read_params(&mut p).unwrap();
                    assert_eq!(p, piece.slice(whole.layout(), &params));
                    assert_eq!(s.saved_bytes(), 0);
                }
                // Both the first and the last stage report the tied embedding.
                let tied_expected = if extra.is_empty() && cut.len() > 2 { 2 } else { 0 };
                assert_eq!(tied, tied_expected, "{extra} {cut:?}");
                let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff <= 1e-5, "{extra} {cut:?} x{micro}: max abs diff {diff}");
            }
        }
    }
}

/// Tensor-parallel slices (heads split across ranks), run segment by segment with
/// the partial outputs and the partial input gradients summed over the group as the
/// strategy's allreduce would, give the whole model's loss and gradients; replicated
/// parameters get the same gradient on every rank.
#[test]
fn tensor_parallel_slices_equal_the_whole_model() {
    let backend = CandleBackend::new("cpu").unwrap();
    for (extra, width) in [("", 2), (r#", "bias": false, "tie_embeddings": false"#, 2), ("", 1)] {
        let spec = spec(extra);
        let w = windows(4, 7, 11);
        let batch = Batch::Tokens { windows: &w, window: 7 };
        let mut whole = backend.build_model(&spec, 5).unwrap();
        let total = whole.layout().total();
        let mut want = vec![0f32; total];
        let loss = whole.forward_backward(&batch, &mut want).unwrap();
        if width == 1 {
            continue;
        }
        let mut ranks: Vec<_> = (0..width)
            .map(|t| {
                let p = sheaf_core::Piece { blocks: 0..4, tensor_rank: t, tensor_width: width };
                backend.build_piece(&spec, &p, 5).unwrap()
            })
            .collect();
        let segments = ranks[0].segments();
        assert_eq!(segments, 4 * 2 + 2);
        let sum = |parts: Vec<Vec<f32>>| -> Vec<f32> {
            parts
                .iter()
                .skip(1)
                .fold(parts[0].clone(), |acc, p| acc.iter().zip(p).map(|(a, b)| a + b).collect())
        };
        let mut act = Vec::new();
        for seg in 0..segments {
            let outs: Vec<Vec<f32>> = ranks
                .iter_mut()
                .map(|r| {
                    if seg == 0 {
                        r.stage_forward_batch(0, 0, &batch).unwrap()
                    } else {
                        r.stage_forward(0, seg, &act, 4).unwrap()
                    }
                })
                .collect();
            act = if seg % 2 == 0 {
                sum(outs)
            } else {
                assert!(outs.iter().all(|o| *o == outs[0]), "segment {seg} differs between ranks");
                outs[0].clone()
            };
        }
        let targets = sheaf_core::Samples::Tokens { windows: w.clone(), window: 7 }.targets();
        let mut grad = Vec::new();
        let mut loss_sum = 0.0;
        for r in ranks.iter_mut() {
            let (l, _, g) = r.loss_grad(&act, &targets, 1.0 / 24.0).unwrap();
            loss_sum = l;
            grad = g;
        }
        assert!((loss_sum / 24.0 - f64::from(loss)).abs() < 1e-5, "{loss_sum} vs {loss}");
        for seg in (0..segments).rev() {
            let gins: Vec<Vec<f32>> =
                ranks.iter_mut().map(|r| r.stage_backward(0, seg, &grad).unwrap()).collect();
            grad = if seg % 2 == 0 { sum(gins) } else { gins[0].clone() };
        }
        let mut got = vec![f32::NAN; total];
        for (t, r) in ranks.iter_mut().enumerate() {
            let piece = backend.piece_layout(&spec, &r.piece().unwrap()).unwrap();
            let mut g = vec![0f32; r.layout().total()];
            r.take_grads(&mut g).unwrap();
            assert_eq!(r.saved_bytes(), 0);
            let mut mine = vec![f32::NAN; total];
            piece.place(whole.layout(), &g, &mut mine);
            for i in 0..total {
                if mine[i].is_nan() {
                    continue;
                }
                assert!(
                    got[i].is_nan() || (got[i] - mine[i]).abs() <= 1e-6,
                    "{extra}: rank {t} parameter {i}: {} vs {}",
                    mine[i],
                    got[i]
                );
                got[i] = mine[i];
            }
        }
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-5, "{extra} over {width}: max abs diff {diff}");
    }
    let p = sheaf_core::Piece { blocks: 0..4, tensor_rank: 0, tensor_width: 4 };
    let e = backend.piece_layout(&spec(""), &p).unwrap_err().to_string();
    assert!(e.contains("a tensor-parallel width of 4 does not divide n_head = 2"), "{e}");
}

/// Pipeline stages of tensor-parallel slices (P2 x T2): each stage's slices run its
/// segments with partial sums added over the group, stage outputs feed the next
/// stage, and the loss and the gradients (tied embedding copies summed) are the whole
/// model's.
#[test]
fn stages_of_tensor_slices_equal_the_whole_model() {
    let backend = CandleBackend::new("cpu").unwrap();
    for cut in [&[0usize, 2, 4][..], &[0, 1, 4], &[0, 3, 4]] {
        let spec = spec("");
        let w = windows(4, 7, 11);
        let batch = Batch::Tokens { windows: &w, window: 7 };
        let mut whole = backend.build_model(&spec, 5).unwrap();
        let total = whole.layout().total();
        let mut want = vec![0f32; total];
        let loss = whole.forward_backward(&batch, &mut want).unwrap();
        let width = 2;
        let mut stages: Vec<Vec<Box<dyn Model>>> = cut
            .windows(2)
            .map(|c| {
                (0..width)
                    .map(|t| {
                        let p = sheaf_core::Piece { blocks: c[0]..c[1], tensor_rank: t, tensor_width: width };
                        backend.build_piece(&spec, &p, 5).unwrap()
                    })
                    .collect()
            })
            .collect();
        let sum = |parts: Vec<Vec<f32>>| -> Vec<f32> {
            parts
                .iter()
                .skip(1)
                .fold(parts[0].clone(), |acc, p| acc.iter().zip(p).map(|(a, b)| a + b).collect())
        };
        let mut act = Vec::new();
        for (k, ranks) in stages.iter_mut().enumerate() {
            for seg in 0..ranks[0].segments() {
                let outs: Vec<Vec<f32>> = ranks
                    .iter_mut()
                    .map(|r| {
                        if k == 0 && seg == 0 {
                            r.stage_forward_batch(0, 0, &batch).unwrap()
                        } else {
                            r.stage_forward(0, seg, &act, 4).unwrap()
                        }
                    })
                    .collect();
                act = if seg % 2 == 0 { sum(outs) } else { outs[0].clone() };
            }
        }
        let targets = sheaf_core::Samples::Tokens { windows: w.clone(), window: 7 }.targets();
        let (l, _, mut grad) = stages.last_mut().unwrap()[0].loss_grad(&act, &targets, 1.0 / 24.0).unwrap();
        assert!((l / 24.0 - f64::from(loss)).abs() < 1e-5, "{cut:?}: {l} vs {loss}");
        for ranks in stages.iter_mut().rev() {
            for seg in (0..ranks[0].segments()).rev() {
                let gins: Vec<Vec<f32>> =
                    ranks.iter_mut().map(|r| r.stage_backward(0, seg, &grad).unwrap()).collect();
                grad = if seg % 2 == 0 && seg > 0 { sum(gins) } else { gins[0].clone() };
            }
        }
        // Slices placed into the whole model; a tied copy on another stage adds.
        let mut got = vec![0f32; total];
        for ranks in stages.iter_mut() {
            let mut stage = vec![f32::NAN; total];
            for r in ranks.iter_mut() {
                let piece = backend.piece_layout(&spec, &r.piece().unwrap()).unwrap();
                let mut g = vec![0f32; r.layout().total()];
                r.take_grads(&mut g).unwrap();
                piece.place(whole.layout(), &g, &mut stage);
            }
            got.iter_mut().zip(&stage).filter(|(_, s)| !s.is_nan()).for_each(|(a, s)| *a += s);
        }
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-5, "{cut:?}: max abs diff {diff}");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

    /// The fused CPU GPT computes what candle's graph computes, for any shape: the
    /// loss, every gradient, the evaluation and the last position's logits; its
    /// stepped backward pass finishes the head, then each block from the last, then
    /// the embeddings, ending with the same values as the whole pass.
    #[test]
    fn fused_gpt_equals_candle_graph(
        n_layer in 1usize..4,
        n_head in 1usize..4,
        head_size in 1usize..6,
        block_size in 1usize..7,
        vocab in 2usize..10,
        bias in proptest::bool::ANY,
        tied in proptest::bool::ANY,
        n in 0usize..5,
        positions in 1usize..7,
        seed in 0u64..1000,
    ) {
        use crate::{FusedGpt, Gpt};
        // A LayerNorm over two or three values with random weights can sit where its
        // backward pass is all cancellation: f32 noise of any order of summation,
        // relative to |dy| / std, not to the gradient, exceeds any fixed tolerance
        // (n_embd 2, seed 993: 0.0040 against 0.0053). Shapes that narrow are left to
        // the finite-difference and f64 tests, which use their own weights.
        proptest::prop_assume!(n_head * head_size >= 4);
        let t = positions.min(block_size);
        let mut s = ModelSpec::new(
            "gpt",
            format!(
                r#"{{"n_layer": {n_layer}, "n_head": {n_head}, "n_embd": {}, "block_size": {block_size}, "bias": {bias}, "tie_embeddings": {tied}}}"#,
                n_head * head_size
            ),
        );
        s.vocab_size = Some(vocab);
        let parsed = GptSpec::parse(&s).unwrap();
        let mut fused = FusedGpt::new(&parsed, seed);
        let mut graph = Gpt::new(&parsed, seed, candle_core::Device::Cpu).unwrap();
        // Weights well away from the init, so every path carries signal.
        let total = fused.layout().total();
        let mut rng = sheaf_core::SplitMix64::new(seed);
        let params: Vec<f32> = (0..total).map(|_| rng.next_f32() - 0.5).collect();
        fused.write_params(&params).unwrap();
        graph.write_params(&params).unwrap();
        let w: Vec<u32> = (0..n * (t + 1)).map(|i| ((i * 7 + seed as usize) % vocab) as u32).collect();
        let batch = Batch::Tokens { windows: &w, window: t + 1 };
        let (mut gf, mut gg) = (vec![f32::NAN; total], vec![f32::NAN; total]);
        let lf = fused.forward_backward(&batch, &mut gf).unwrap();
        let lg = graph.forward_backward(&batch, &mut gg).unwrap();
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * (1.0 + b.abs());
        proptest::prop_assert!(close(lf, lg), "loss {lf} vs {lg}");
        // Random weights make some LayerNorms ill-conditioned (rows of a few nearly
        // equal values), where any two f32 orders of summation differ: each gradient
        // may also differ by ten times what a relative change of 1e-6 in the weights
        // does to the graph's own.
        let mut moved = |eps: f32| {
            let p: Vec<f32> = params.iter().enumerate().map(|(i, v)| v * (1.0 + eps * ((i % 3) as f32 - 1.0))).collect();
            graph.write_params(&p).unwrap();
            let mut g = vec![0.0; total];
            graph.forward_backward(&batch, &mut g).unwrap();
            g
        };
        let (up, down) = (moved(1e-6), moved(-1e-6));
        graph.write_params(&params).unwrap();
        for (i, (a, b)) in gf.iter().zip(&gg).enumerate() {
            let sensitivity = 10.0 * (up[i] - down[i]).abs();
            proptest::prop_assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()) + sensitivity,
                "gradient {i}: {a} vs {b} (sensitivity {sensitivity})"
            );
        }
        let (ef, eg) = (fused.evaluate(&batch).unwrap(), graph.evaluate(&batch).unwrap());
        proptest::prop_assert!((ef.0 - eg.0).abs() <= 1e-4 * (1.0 + eg.0.abs()) && ef.1 == eg.1, "{ef:?} vs {eg:?}");
        // Prediction crops windows longer than the block.
        let long: Vec<u32> = (0..n * (block_size + 2)).map(|i| ((i * 5 + 1) % vocab) as u32).collect();
        for window in [1, t, block_size + 2] {
            let b = Batch::Tokens { windows: &long[..n * window], window };
            let (pf, pg) = (fused.predict(&b).unwrap(), graph.predict(&b).unwrap());
            proptest::prop_assert!(pf.len() == pg.len() && pf.iter().zip(&pg).all(|(a, b)| close(*a, *b)), "{pf:?} vs {pg:?}");
        }

        proptest::prop_assert!(fused.backward_in_steps());
        let (loss, frontiers, stepped) = crate::tests::stepped_pass(&mut fused, &batch);
        proptest::prop_assert_eq!(loss, lf);
        let layout = fused.layout().clone();
        let start = |name: &str| {
            let i = layout.specs().iter().position(|s| s.name == name).unwrap();
            layout.range(i).start
        };
        let mut expected = vec![start("transformer.ln_f.weight")];
        expected.extend((0..n_layer).rev().map(|l| start(&format!("transformer.h.{l}.ln_1.weight"))));
        expected.push(0);
        let steps: Vec<usize> =
            std::iter::once(total).chain(expected.iter().copied()).collect::<Vec<_>>().windows(2).map(|w| w[0] - w[1]).collect();
        proptest::prop_assert_eq!(frontiers, expected);
        proptest::prop_assert_eq!(&stepped, &gf);
        proptest::prop_assert!(fused.backward_next(&mut []).is_err(), "a step past the end is an error");

        // The same pass a step at a time into windows of the largest step, each step
        // copied out: the same gradients, bit for bit, a tied head's included (held
        // in the model while its window stops short of the embeddings). A window one
        // value short of a step is an error, not a write elsewhere.
        let largest = fused.backward_window().unwrap();
        proptest::prop_assert_eq!(largest, steps.iter().copied().max().unwrap());
        let (loss, windowed) = crate::tests::windowed_pass(&mut fused, &batch, largest);
        proptest::prop_assert_eq!(loss, lf);
        proptest::prop_assert_eq!(&windowed, &gf);
        fused.backward_begin(&batch).unwrap();
        let e = fused.backward_next_into(&mut vec![0.0; steps[0] - 1], total).unwrap_err().to_string();
        proptest::prop_assert!(e.contains("cannot hold the Head step"), "{}", e);
        // A window ending anywhere but where the pass stands, or longer than what is
        // pending, is an error too.
        for (len, end) in [(steps[0], total - 1), (total + 1, total)] {
            let e = fused.backward_next_into(&mut vec![0.0; len], end).unwrap_err().to_string();
            proptest::prop_assert!(e.contains("pending gradient values in a window of"), "{}", e);
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Activation recomputation changes where activations live, never what is
    /// computed: with every block, or every N-th, keeping only its input and running
    /// its forward pass again in the backward pass, the loss and every gradient equal
    /// the pass that keeps everything bit for bit (the same kernels on the same
    /// inputs), whole, stepped or into windows; so do evaluation and prediction, which
    /// run every block in one block's buffers, before and after training.
    #[test]
    fn recomputed_activations_give_the_same_gradients_bit_for_bit(
        n_layer in 1usize..5,
        every in 1usize..4,
        n_head in 1usize..3,
        head_size in 1usize..5,
        block_size in 1usize..7,
        tied in proptest::bool::ANY,
        n in 1usize..4,
        seed in 0u64..1000,
    ) {
        use crate::FusedGpt;
        let vocab = 7;
        let shape = format!(
            r#""n_layer": {n_layer}, "n_head": {n_head}, "n_embd": {}, "block_size": {block_size}, "tie_embeddings": {tied}"#,
            n_head * head_size
        );
        let parse = |extra: &str| {
            let mut s = ModelSpec::new("gpt", format!("{{{shape}{extra}}}"));
            s.vocab_size = Some(vocab);
            GptSpec::parse(&s).unwrap()
        };
        let kept = parse("");
        let recomputing = parse(&format!(r#", "activation_checkpointing": {every}"#));
        proptest::prop_assert!((0..n_layer).any(|l| recomputing.recomputes(l)));
        let (mut a, mut b) = (FusedGpt::new(&kept, seed), FusedGpt::new(&recomputing, seed));
        let total = a.layout().total();
        let w: Vec<u32> = (0..n * (block_size + 1)).map(|i| ((i * 5 + seed as usize) % vocab) as u32).collect();
        let batch = Batch::Tokens { windows: &w, window: block_size + 1 };
        // Evaluation before any training pass, then after.
        proptest::prop_assert_eq!(a.evaluate(&batch).unwrap(), b.evaluate(&batch).unwrap());
        let (mut ga, mut gb) = (vec![f32::NAN; total], vec![f32::NAN; total]);
        let (la, lb) = (a.forward_backward(&batch, &mut ga).unwrap(), b.forward_backward(&batch, &mut gb).unwrap());
        proptest::prop_assert_eq!(la.to_bits(), lb.to_bits());
        let bits = |g: &[f32]| g.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        proptest::prop_assert_eq!(bits(&ga), bits(&gb));
        let (_, _, stepped) = crate::tests::stepped_pass(&mut b, &batch);
        proptest::prop_assert_eq!(bits(&stepped), bits(&ga));
        let largest = b.backward_window().unwrap();
        let (_, windowed) = crate::tests::windowed_pass(&mut b, &batch, largest);
        proptest::prop_assert_eq!(bits(&windowed), bits(&ga));
        proptest::prop_assert_eq!(a.evaluate(&batch).unwrap(), b.evaluate(&batch).unwrap());
        proptest::prop_assert_eq!(bits(&a.predict(&batch).unwrap()), bits(&b.predict(&batch).unwrap()));
    }
}

/// What recomputation asks of the model kinds: "none", every block, every N-th; the
/// mlp refuses it by the job's key; every 0th block is an error.
#[test]
fn recomputation_is_refused_where_it_is_not_built() {
    let parsed = GptSpec::parse(&spec(r#", "activation_checkpointing": 2"#)).unwrap();
    assert!(parsed.recomputes(0) && !parsed.recomputes(1));
    let err = GptSpec::parse(&spec(r#", "activation_checkpointing": 0"#)).unwrap_err().to_string();
    assert!(err.contains("train.activation_checkpointing"), "{err}");
    // The plan counts fewer activations per window where every block recomputes:
    // the whole model, a pipeline stage, a tensor slice.
    let kept = GptSpec::parse(&spec("")).unwrap();
    let parsed = GptSpec::parse(&spec(r#", "activation_checkpointing": 1"#)).unwrap();
    let pieces = [
        sheaf_core::Piece::whole(kept.n_layer + 2),
        sheaf_core::Piece { blocks: 1..3, tensor_rank: 0, tensor_width: 1 },
        sheaf_core::Piece { blocks: 0..4, tensor_rank: 1, tensor_width: 2 },
    ];
    for piece in pieces {
        let (all, fewer) = (
            kept.piece_layout(&piece).unwrap().activation_bytes_per_sample,
            parsed.piece_layout(&piece).unwrap().activation_bytes_per_sample,
        );
        assert!(fewer < all, "{piece:?}: {fewer} vs {all}");
    }
    let mut mlp = ModelSpec::new("mlp", r#"{"layers": [4, 3], "activation_checkpointing": 1}"#.to_string());
    mlp.vocab_size = None;
    let err = crate::MlpSpec::parse(&mlp).unwrap_err().to_string();
    assert!(err.contains("train.activation_checkpointing") && err.contains("mlp"), "{err}");
}

/// Runs pipeline stages `cut` of tensor slices of `width` over `micro` micro-batches
/// of `w` (windows of `window`), every micro-batch's forward pass before any backward
/// pass (so every one is in flight at once), the partial outputs and input gradients
/// summed over each group as the strategy sums them; returns the summed loss, each
/// piece's gradients (stage by stage, slice by slice) and the activation bytes all
/// pieces held with every micro-batch in flight.
fn run_pieces(
    spec: &GptSpec,
    cut: &[usize],
    width: usize,
    w: &[u32],
    window: usize,
    micro: usize,
) -> (f64, Vec<Vec<f32>>, u64) {
    let mut stages: Vec<Vec<crate::FusedPiece>> = cut
        .windows(2)
        .map(|c| {
            (0..width)
                .map(|t| {
                    let p = sheaf_core::Piece { blocks: c[0]..c[1], tensor_rank: t, tensor_width: width };
                    crate::FusedPiece::new(spec, &p, 3).unwrap()
                })
                .collect()
        })
        .collect();
    let sum = |parts: Vec<Vec<f32>>| -> Vec<f32> {
        parts.iter().skip(1).fold(parts[0].clone(), |acc, p| acc.iter().zip(p).map(|(a, b)| a + b).collect())
    };
    let n = w.len() / window;
    let rows = n / micro;
    let targets = sheaf_core::Samples::Tokens { windows: w.to_vec(), window }.targets();
    let (mut loss, mut grads) = (0.0, Vec::new());
    for m in 0..micro {
        let mine = &w[m * rows * window..(m + 1) * rows * window];
        let mut act = Vec::new();
        for (k, ranks) in stages.iter_mut().enumerate() {
            for seg in 0..ranks[0].segments() {
                let outs: Vec<Vec<f32>> = ranks
                    .iter_mut()
                    .map(|r| match (k, seg) {
                        (0, 0) => {
                            r.stage_forward_batch(m as u64, 0, &Batch::Tokens { windows: mine, window })
                        }
                        _ => r.stage_forward(m as u64, seg, &act, rows),
                    })
                    .collect::<Result<_, _>>()
                    .unwrap();
                act = if seg % 2 == 0 { sum(outs) } else { outs[0].clone() };
            }
        }
        let t = &targets[m * rows * (window - 1)..(m + 1) * rows * (window - 1)];
        let (l, _, g) = stages.last_mut().unwrap()[0].loss_grad(&act, t, 0.5).unwrap();
        loss += l;
        grads.push(g);
    }
    let held = stages.iter().flatten().map(|r| r.saved_bytes()).sum();
    for (m, mut grad) in grads.into_iter().enumerate().rev() {
        for ranks in stages.iter_mut().rev() {
            for seg in (0..ranks[0].segments()).rev() {
                let gins: Vec<Vec<f32>> =
                    ranks.iter_mut().map(|r| r.stage_backward(m as u64, seg, &grad).unwrap()).collect();
                grad = if seg % 2 == 0 && seg > 0 { sum(gins) } else { gins[0].clone() };
            }
        }
    }
    let grads = stages
        .iter_mut()
        .flatten()
        .map(|r| {
            assert_eq!(r.saved_bytes(), 0, "every micro-batch's activations freed by its backward pass");
            let mut g = vec![f32::NAN; r.layout().total()];
            r.take_grads(&mut g).unwrap();
            g
        })
        .collect();
    (loss, grads, held)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Recomputation in pieces: pipeline stages of blocks and tensor-parallel slices of
    /// them that keep only each (recomputing) block's input, with several micro-batches
    /// in flight, give the loss and every piece's gradients of the pieces that keep
    /// everything, bit for bit.
    #[test]
    fn pieces_recompute_activations_bit_for_bit(
        n_layer in 1usize..4,
        every in 1usize..3,
        heads_per_slice in 1usize..3,
        head_size in 1usize..4,
        width in 1usize..3,
        stages in 1usize..4,
        bias in proptest::bool::ANY,
        tied in proptest::bool::ANY,
        micro in 1usize..3,
        seed in 0u64..1000,
    ) {
        let (vocab, block_size, window) = (7usize, 5usize, 5usize);
        let n_head = heads_per_slice * width;
        let shape = format!(
            r#""n_layer": {n_layer}, "n_head": {n_head}, "n_embd": {}, "block_size": {block_size}, "bias": {bias}, "tie_embeddings": {tied}"#,
            n_head * head_size
        );
        let parse = |extra: &str| {
            let mut s = ModelSpec::new("gpt", format!("{{{shape}{extra}}}"));
            s.vocab_size = Some(vocab);
            GptSpec::parse(&s).unwrap()
        };
        // Cuts of the n_layer + 2 blocks into up to `stages` stages.
        let blocks = n_layer + 2;
        let stages = stages.min(blocks);
        let cut: Vec<usize> = (0..=stages).map(|k| k * blocks / stages).collect();
        let w: Vec<u32> = (0..2 * micro * window).map(|i| ((i * 5 + seed as usize) % vocab) as u32).collect();
        let kept = run_pieces(&parse(""), &cut, width, &w, window, micro);
        let recomputed = run_pieces(&parse(&format!(r#", "activation_checkpointing": {every}"#)), &cut, width, &w, window, micro);
        proptest::prop_assert_eq!(kept.0.to_bits(), recomputed.0.to_bits());
        let bits = |g: &[Vec<f32>]| g.iter().map(|g| g.iter().map(|v| v.to_bits()).collect::<Vec<_>>()).collect::<Vec<_>>();
        proptest::prop_assert_eq!(bits(&kept.1), bits(&recomputed.1));
        // And they hold less while the micro-batches are in flight.
        proptest::prop_assert!(recomputed.2 < kept.2, "{} vs {} bytes", recomputed.2, kept.2);
    }
}
