//! The MLP's gradients against finite differences, its parameter round trip, and
//! its errors.

use sheaf_core::{Batch, ComputeBackend, Model, ModelSpec};

use crate::CandleBackend;

fn batch_data(n: usize, d: usize, classes: u32) -> (Vec<f32>, Vec<u32>) {
    let inputs = (0..n * d).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let labels = (0..n as u32).map(|i| i % classes).collect();
    (inputs, labels)
}

#[test]
fn gradients_match_finite_differences() {
    for spec in [
        ModelSpec::mlp(vec![5, 7, 3]),
        ModelSpec { layers: vec![4, 6, 6, 2], activation: sheaf_core::Activation::Tanh },
    ] {
        let mut m = CandleBackend::new("cpu").unwrap().build_model(&spec, 3).unwrap();
        let (inputs, labels) = batch_data(9, spec.layers[0], *spec.layers.last().unwrap() as u32);
        let batch = Batch { inputs: &inputs, labels: &labels, input_dim: spec.layers[0] };
        let total = m.layout().total();
        let mut grads = vec![0f32; total];
        m.forward_backward(&batch, &mut grads).unwrap();
        let mut params = vec![0f32; total];
        m.read_params(&mut params).unwrap();
        let loss_at = |m: &mut Box<dyn Model>, p: &[f32]| {
            m.write_params(p).unwrap();
            m.evaluate(&batch).unwrap().0 / labels.len() as f64
        };
        for i in (0..total).step_by(3) {
            let h = 1e-2f32;
            let mut plus = params.clone();
            plus[i] += h;
            let mut minus = params.clone();
            minus[i] -= h;
            let numeric = (loss_at(&mut m, &plus) - loss_at(&mut m, &minus)) / (2.0 * f64::from(h));
            assert!(
                (numeric - f64::from(grads[i])).abs() < 2e-3,
                "param {i}: numeric {numeric} vs {}",
                grads[i]
            );
        }
    }
}

#[test]
fn params_round_trip_and_init_is_seeded() {
    let spec = ModelSpec::mlp(vec![64, 32, 10]);
    let backend = CandleBackend::new("cpu").unwrap();
    let a = backend.build_model(&spec, 1).unwrap();
    let mut b = backend.build_model(&spec, 2).unwrap();
    let mut pa = vec![0f32; a.layout().total()];
    let mut pb = pa.clone();
    a.read_params(&mut pa).unwrap();
    b.read_params(&mut pb).unwrap();
    assert_ne!(pa, pb);
    assert_eq!(pa, crate::init_params(&spec, 1));
    b.write_params(&pa).unwrap();
    b.read_params(&mut pb).unwrap();
    assert_eq!(pa, pb);
    // Layer 0 has fan-in 64, layer 1 fan-in 32.
    let w0 = 64 * 32 + 32;
    assert!(pa[..w0].iter().all(|v| v.abs() <= 1.0 / 8.0));
    assert!(pa[w0..].iter().all(|v| v.abs() <= 1.0 / 32f32.sqrt()));
}

#[test]
fn wrong_shapes_and_devices_are_errors() {
    let backend = CandleBackend::new("cpu").unwrap();
    let mut m = backend.build_model(&ModelSpec::mlp(vec![4, 3]), 0).unwrap();
    let mut grads = vec![0f32; m.layout().total()];
    let (inputs, labels) = batch_data(2, 5, 3);
    let e = m
        .forward_backward(&Batch { inputs: &inputs, labels: &labels, input_dim: 5 }, &mut grads)
        .unwrap_err();
    assert!(e.to_string().contains("4 inputs"), "{e}");
    let (inputs, _) = batch_data(2, 4, 3);
    let e = m.evaluate(&Batch { inputs: &inputs, labels: &[0, 9], input_dim: 4 }).unwrap_err();
    assert!(e.to_string().contains("label 9"), "{e}");
    assert!(backend.build_model(&ModelSpec::mlp(vec![4]), 0).is_err());
    if !cfg!(feature = "cuda") {
        let e = CandleBackend::new("cuda:0").err().unwrap().to_string();
        assert!(e.contains("built without CUDA support"), "{e}");
    }
    assert!(CandleBackend::new("tpu").is_err());
}

/// Stages run micro-batch by micro-batch (forward through every stage, the loss at
/// the last, backward in reverse) give the whole model's loss and gradients, for any
/// cut and any number of micro-batches; their parameters are the whole model's slices.
#[test]
fn stages_over_micro_batches_equal_the_whole_model() {
    let spec = ModelSpec::mlp(vec![6, 16, 12, 8, 4]);
    let backend = CandleBackend::new("cpu").unwrap();
    let (inputs, labels) = batch_data(12, 6, 4);
    let batch = Batch { inputs: &inputs, labels: &labels, input_dim: 6 };
    let mut whole = backend.build_model(&spec, 11).unwrap();
    let total = whole.layout().total();
    let (mut want, mut params) = (vec![0f32; total], vec![0f32; total]);
    let loss = whole.forward_backward(&batch, &mut want).unwrap();
    whole.read_params(&mut params).unwrap();
    // Stage boundaries: one stage, two, three.
    let cuts: [&[usize]; 3] = [&[0, 4], &[0, 1, 4], &[0, 2, 3, 4]];
    for cut in cuts {
        for micro in [1usize, 2, 3, 12] {
            let mut stages: Vec<_> = cut
                .windows(2)
                .map(|w| {
                    let p = sheaf_core::Piece { layers: w[0]..w[1], tensor_rank: 0, tensor_width: 1 };
                    backend.build_piece(&spec, &p, 11).unwrap()
                })
                .collect();
            let rows = 12 / micro;
            let mut loss_sum = 0.0;
            for m in 0..micro {
                let mut act = inputs[m * rows * 6..(m + 1) * rows * 6].to_vec();
                for s in stages.iter_mut() {
                    act = s.stage_forward(m as u64, 0, &act, rows).unwrap();
                }
                let (l, _, mut grad) = stages
                    .last_mut()
                    .unwrap()
                    .loss_grad(&act, &labels[m * rows..(m + 1) * rows], 1.0 / 12.0)
                    .unwrap();
                loss_sum += l;
                for s in stages.iter_mut().rev() {
                    grad = s.stage_backward(m as u64, 0, &grad).unwrap();
                }
            }
            assert!((loss_sum / 12.0 - f64::from(loss)).abs() < 1e-6, "{cut:?} x{micro}");
            let mut got = vec![0f32; total];
            for s in stages.iter_mut() {
                let piece = s.piece().unwrap();
                let mut g = vec![0f32; s.layout().total()];
                s.take_grads(&mut g).unwrap();
                piece.place(&spec, &g, &mut got);
                let mut p = vec![0f32; s.layout().total()];
                s.read_params(&mut p).unwrap();
                assert_eq!(p, piece.slice(&spec, &params));
                assert_eq!(s.saved_bytes(), 0);
            }
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff <= 1e-6, "{cut:?} x{micro}: max abs diff {diff}");
        }
    }
}

/// Tensor-parallel slices of every layer, run segment by segment with the row-parallel
/// outputs (and the column layers' input gradients) summed over the group as the
/// strategy's allreduce would, give the whole model's loss and gradients; replicated
/// parameters get the same gradient on every rank.
#[test]
fn tensor_parallel_slices_equal_the_whole_model() {
    let backend = CandleBackend::new("cpu").unwrap();
    for (layers, width) in
        [(vec![6, 8, 4], 2), (vec![6, 8, 12, 4], 2), (vec![6, 8, 12, 10, 4], 2), (vec![6, 12, 9], 3)]
    {
        let spec = ModelSpec::mlp(layers.clone());
        let (inputs, labels) = batch_data(10, 6, *layers.last().unwrap() as u32);
        let batch = Batch { inputs: &inputs, labels: &labels, input_dim: 6 };
        let mut whole = backend.build_model(&spec, 5).unwrap();
        let total = whole.layout().total();
        let mut want = vec![0f32; total];
        let loss = whole.forward_backward(&batch, &mut want).unwrap();
        let n = layers.len() - 1;
        let mut ranks: Vec<_> = (0..width)
            .map(|t| {
                let p = sheaf_core::Piece { layers: 0..n, tensor_rank: t, tensor_width: width };
                backend.build_piece(&spec, &p, 5).unwrap()
            })
            .collect();
        let segments = ranks[0].segments();
        assert_eq!(segments, 2 * (n / 2));
        let sum = |parts: Vec<Vec<f32>>| -> Vec<f32> {
            parts
                .iter()
                .skip(1)
                .fold(parts[0].clone(), |acc, p| acc.iter().zip(p).map(|(a, b)| a + b).collect())
        };
        let mut act = inputs.clone();
        for seg in 0..segments {
            let outs: Vec<Vec<f32>> =
                ranks.iter_mut().map(|r| r.stage_forward(0, seg, &act, 10).unwrap()).collect();
            // Even segments end in a partial sum; odd ones are the same on every rank.
            act = if seg.is_multiple_of(2) {
                sum(outs)
            } else {
                assert!(outs.iter().all(|o| *o == outs[0]), "segment {seg} differs between ranks");
                outs[0].clone()
            };
        }
        let mut grad = Vec::new();
        let mut loss_sum = 0.0;
        for r in ranks.iter_mut() {
            let (l, _, g) = r.loss_grad(&act, &labels, 0.1).unwrap();
            loss_sum = l;
            grad = g;
        }
        assert!((loss_sum / 10.0 - f64::from(loss)).abs() < 1e-6);
        for seg in (0..segments).rev() {
            let gins: Vec<Vec<f32>> =
                ranks.iter_mut().map(|r| r.stage_backward(0, seg, &grad).unwrap()).collect();
            grad = if seg.is_multiple_of(2) { sum(gins) } else { gins[0].clone() };
        }
        let mut got = vec![f32::NAN; total];
        for (t, r) in ranks.iter_mut().enumerate() {
            let piece = r.piece().unwrap();
            let mut g = vec![0f32; r.layout().total()];
            r.take_grads(&mut g).unwrap();
            let mut mine = vec![f32::NAN; total];
            piece.place(&spec, &g, &mut mine);
            for i in 0..total {
                if mine[i].is_nan() {
                    continue;
                }
                assert!(
                    got[i].is_nan() || got[i] == mine[i],
                    "{layers:?}: rank {t} parameter {i}: {} vs {}",
                    mine[i],
                    got[i]
                );
                got[i] = mine[i];
            }
        }
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-6, "{layers:?} over {width}: max abs diff {diff}");
    }
}

/// A piece's initial values, drawn on their own, are exactly the whole model's
/// initialisation sliced, for stages and tensor slices.
#[test]
fn piece_init_is_the_whole_init_sliced() {
    let spec = ModelSpec::mlp(vec![6, 8, 12, 10, 4]);
    let whole = crate::init_params(&spec, 21);
    for piece in [
        sheaf_core::Piece { layers: 1..3, tensor_rank: 0, tensor_width: 1 },
        sheaf_core::Piece { layers: 0..4, tensor_rank: 1, tensor_width: 2 },
        sheaf_core::Piece { layers: 3..4, tensor_rank: 0, tensor_width: 1 },
    ] {
        assert_eq!(crate::init_piece(&spec, &piece, 21), piece.slice(&spec, &whole), "{piece:?}");
    }
}
