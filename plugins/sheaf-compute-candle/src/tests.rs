//! The MLP's gradients against finite differences, its parameter round trip, and
//! its errors.

use sheaf_core::{Batch, ComputeBackend, Model, ModelSpec};

use crate::{CandleBackend, MlpSpec};

fn widths(spec: &ModelSpec) -> Vec<usize> {
    MlpSpec::parse(spec).unwrap().layers
}

fn batch_data(n: usize, d: usize, classes: u32) -> (Vec<f32>, Vec<u32>) {
    let inputs = (0..n * d).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let labels = (0..n as u32).map(|i| i % classes).collect();
    (inputs, labels)
}

#[test]
fn gradients_match_finite_differences() {
    for spec in [
        ModelSpec::mlp(vec![5, 7, 3]),
        ModelSpec::new("mlp", r#"{"layers": [4, 6, 6, 2], "activation": "tanh"}"#),
    ] {
        let mut m = CandleBackend::new("cpu").unwrap().build_model(&spec, 3).unwrap();
        let w = widths(&spec);
        let (inputs, labels) = batch_data(9, w[0], *w.last().unwrap() as u32);
        let batch = Batch::Rows { inputs: &inputs, labels: &labels, input_dim: w[0] };
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
    assert_eq!(pa, crate::init_params(&MlpSpec::parse(&spec).unwrap(), 1));
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
        .forward_backward(&Batch::Rows { inputs: &inputs, labels: &labels, input_dim: 5 }, &mut grads)
        .unwrap_err();
    assert!(e.to_string().contains("4 inputs"), "{e}");
    let (inputs, _) = batch_data(2, 4, 3);
    let e = m.evaluate(&Batch::Rows { inputs: &inputs, labels: &[0, 9], input_dim: 4 }).unwrap_err();
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
    let batch = Batch::Rows { inputs: &inputs, labels: &labels, input_dim: 6 };
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
                    let p = sheaf_core::Piece { blocks: w[0]..w[1], tensor_rank: 0, tensor_width: 1 };
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
                let piece = backend.piece_layout(&spec, &s.piece().unwrap()).unwrap();
                let mut g = vec![0f32; s.layout().total()];
                s.take_grads(&mut g).unwrap();
                piece.place(whole.layout(), &g, &mut got);
                let mut p = vec![0f32; s.layout().total()];
                s.read_params(&mut p).unwrap();
                assert_eq!(p, piece.slice(whole.layout(), &params));
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
        let batch = Batch::Rows { inputs: &inputs, labels: &labels, input_dim: 6 };
        let mut whole = backend.build_model(&spec, 5).unwrap();
        let total = whole.layout().total();
        let mut want = vec![0f32; total];
        let loss = whole.forward_backward(&batch, &mut want).unwrap();
        let n = layers.len() - 1;
        let mut ranks: Vec<_> = (0..width)
            .map(|t| {
                let p = sheaf_core::Piece { blocks: 0..n, tensor_rank: t, tensor_width: width };
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
            let piece = backend.piece_layout(&spec, &r.piece().unwrap()).unwrap();
            let mut g = vec![0f32; r.layout().total()];
            r.take_grads(&mut g).unwrap();
            let mut mine = vec![f32::NAN; total];
            piece.place(whole.layout(), &g, &mut mine);
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
    let spec = MlpSpec::parse(&ModelSpec::mlp(vec![6, 8, 12, 10, 4])).unwrap();
    let whole = crate::init_params(&spec, 21);
    for piece in [
        sheaf_core::Piece { blocks: 1..3, tensor_rank: 0, tensor_width: 1 },
        sheaf_core::Piece { blocks: 0..4, tensor_rank: 1, tensor_width: 2 },
        sheaf_core::Piece { blocks: 3..4, tensor_rank: 0, tensor_width: 1 },
    ] {
        let sliced = spec.piece_layout(&piece).unwrap().slice(&spec.layout(), &whole);
        assert_eq!(crate::init_piece(&spec, &piece, 21).unwrap(), sliced, "{piece:?}");
    }
}

/// Placing every piece of a cut puts back every value of the full buffer, and slicing
/// gives each piece its own.
#[test]
fn pieces_tile_the_model() {
    for layers in [&[4, 6, 2][..], &[3, 8, 4, 5, 2], &[5, 4]] {
        let s = MlpSpec::parse(&ModelSpec::mlp(layers.to_vec())).unwrap();
        let whole = s.layout();
        let n = layers.len() - 1;
        let full: Vec<f32> = (0..whole.total()).map(|i| i as f32).collect();
        for stages in 1..=n {
            let cuts: Vec<_> = (0..stages).map(|k| sheaf_core::chunk_range(n, stages, k)).collect();
            for width in [1, 2] {
                let mut rebuilt = vec![-1f32; full.len()];
                let mut count = 0;
                for c in &cuts {
                    for t in 0..width {
                        let p = sheaf_core::Piece { blocks: c.clone(), tensor_rank: t, tensor_width: width };
                        let Ok(pl) = s.piece_layout(&p) else { continue };
                        let mine = pl.slice(&whole, &full);
                        assert_eq!(mine.len(), pl.layout.total());
                        pl.place(&whole, &mine, &mut rebuilt);
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
    let s = MlpSpec::parse(&ModelSpec::mlp(vec![64, 128, 10])).unwrap();
    let p = sheaf_core::Piece { blocks: 0..2, tensor_rank: 1, tensor_width: 2 };
    assert_eq!(s.cut(&p, 0), crate::LayerCut::Column { rows: 64..128 });
    assert_eq!(s.cut(&p, 1), crate::LayerCut::Row { cols: 64..128 });
    let pl = s.piece_layout(&p).unwrap();
    let shapes: Vec<Vec<usize>> = pl.layout.specs().iter().map(|x| x.shape.clone()).collect();
    assert_eq!(shapes, [vec![64, 64], vec![64], vec![10, 64], vec![10]]);
    // About half the model each: 4,810 of 9,610.
    assert_eq!(pl.layout.total(), 4810);
    let odd = sheaf_core::Piece { blocks: 0..2, tensor_rank: 0, tensor_width: 3 };
    let e = s.piece_layout(&odd).unwrap_err().to_string();
    assert!(e.contains("does not divide the 128 output features of layer 0"), "{e}");
}

#[test]
fn mlp_settings_are_checked_by_the_plugin() {
    let backend = CandleBackend::new("cpu").unwrap();
    let e = backend.describe(&ModelSpec::new("mlp", r#"{"layers": [4, 2], "widht": 3}"#)).unwrap_err();
    assert!(e.to_string().contains("unknown field `widht`"), "{e}");
    let e = backend.describe(&ModelSpec::new("resnet", "{}")).unwrap_err();
    assert!(
        e.to_string().contains("unknown model kind `resnet`") && e.to_string().contains("mlp, gpt"),
        "{e}"
    );
    let info = backend.describe(&ModelSpec::mlp(vec![4, 6, 2])).unwrap();
    assert_eq!(info.blocks.iter().map(|b| b.params).collect::<Vec<_>>(), [30, 14]);
}

/// Every entry point dispatches through the table of kinds: an unknown kind is the
/// same error from each, naming the key, and the kinds listed are the kinds provided.
#[test]
fn every_entry_point_goes_through_the_table_of_kinds() {
    let backend = CandleBackend::new("cpu").unwrap();
    let spec = ModelSpec::new("resnet", "{}");
    let (piece, shard) = (sheaf_core::Piece::whole(1), sheaf_core::ParamShard { index: 0, count: 1 });
    let errors = [
        backend.describe(&spec).err(),
        backend.piece_layout(&spec, &piece).err(),
        backend.build_model(&spec, 0).err(),
        backend.build_piece(&spec, &piece, 0).err(),
        backend.build_shard(&spec, shard, 0).err(),
        backend.build_piece_shard(&spec, &piece, shard, 0).err(),
    ];
    for e in errors {
        let e = e.expect("an unknown kind is an error");
        assert!(matches!(&e, sheaf_core::Error::InvalidConfig { key, .. } if key == "model.kind"), "{e}");
    }
    assert_eq!(backend.model_kinds(), ["mlp", "gpt"]);
    let provided: Vec<String> = <crate::CandlePlugin as sheaf_abi::Plugin>::provides()
        .into_iter()
        .filter(|p| p.kind == sheaf_core::PluginKind::Model)
        .map(|p| p.name)
        .collect();
    assert_eq!(provided, backend.model_kinds());
}

pub(crate) mod gpt;
mod hf;
mod units;

/// A model's stepped backward pass over `batch` into a buffer of NaNs: the loss, the
/// frontier each step returned, and the gradients.
pub(crate) fn stepped_pass(model: &mut dyn Model, batch: &Batch<'_>) -> (f32, Vec<usize>, Vec<f32>) {
    let mut grads = vec![f32::NAN; model.layout().total()];
    let loss = model.backward_begin(batch).unwrap();
    let mut pending = grads.len();
    let mut frontiers = Vec::new();
    while pending > 0 {
        pending = model.backward_next(&mut grads[..pending]).unwrap();
        frontiers.push(pending);
    }
    (loss, frontiers, grads)
}

/// A model's stepped backward pass over `batch`, each step written into a fresh
/// window of NaNs `window` values long (or all that is pending, when fewer) and copied
/// out of it: the loss and the gradients.
pub(crate) fn windowed_pass(model: &mut dyn Model, batch: &Batch<'_>, window: usize) -> (f32, Vec<f32>) {
    let total = model.layout().total();
    let mut grads = vec![f32::NAN; total];
    let loss = model.backward_begin(batch).unwrap();
    let mut end = total;
    while end > 0 {
        let mut buf = vec![f32::NAN; window.min(end)];
        let left = model.backward_next_into(&mut buf, end).unwrap();
        let base = end - buf.len();
        grads[left..end].copy_from_slice(&buf[left - base..]);
        end = left;
    }
    (loss, grads)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// The fused CPU MLP computes what candle's graph computes: the loss, every
    /// gradient, the evaluation and the logits, for any widths, batch and activation;
    /// and its stepped backward pass finishes gradients in reverse layout order, one
    /// layer a step, ending with the same values as the whole pass.
    #[test]
    fn fused_mlp_equals_candle_graph(
        widths in proptest::collection::vec(1usize..12, 2..5),
        rows in 0usize..9,
        tanh in proptest::bool::ANY,
        seed in 0u64..1000,
    ) {
        use crate::{FusedMlp, Mlp};
        let activation = if tanh { "tanh" } else { "relu" };
        let spec = ModelSpec::new("mlp", format!(r#"{{"layers": {widths:?}, "activation": "{activation}"}}"#));
        let parsed = MlpSpec::parse(&spec).unwrap();
        let mut fused = FusedMlp::new(&parsed, seed);
        let mut graph = Mlp::new(&parsed, seed, candle_core::Device::Cpu).unwrap();
        let classes = *widths.last().unwrap() as u32;
        let (inputs, labels) = batch_data(rows, widths[0], classes);
        let batch = Batch::Rows { inputs: &inputs, labels: &labels, input_dim: widths[0] };
        let total = fused.layout().total();
        let (mut gf, mut gg) = (vec![f32::NAN; total], vec![f32::NAN; total]);
        let lf = fused.forward_backward(&batch, &mut gf).unwrap();
        let lg = graph.forward_backward(&batch, &mut gg).unwrap();
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
        proptest::prop_assert!(close(lf, lg), "loss {lf} vs {lg}");
        for (i, (a, b)) in gf.iter().zip(&gg).enumerate() {
            proptest::prop_assert!(close(*a, *b), "gradient {i}: {a} vs {b}");
        }
        let (ef, eg) = (fused.evaluate(&batch).unwrap(), graph.evaluate(&batch).unwrap());
        proptest::prop_assert!((ef.0 - eg.0).abs() <= 1e-4 * (1.0 + eg.0.abs()) && ef.1 == eg.1, "{ef:?} vs {eg:?}");
        let (pf, pg) = (fused.predict(&batch).unwrap(), graph.predict(&batch).unwrap());
        proptest::prop_assert!(pf.iter().zip(&pg).all(|(a, b)| close(*a, *b)) && pf.len() == pg.len());

        proptest::prop_assert!(fused.backward_in_steps());
        let (loss, frontiers, stepped) = crate::tests::stepped_pass(&mut fused, &batch);
        proptest::prop_assert_eq!(loss, lf);
        let layout = fused.layout().clone();
        let expected: Vec<usize> = (0..widths.len() - 1).rev().map(|l| layout.range(2 * l).start).collect();
        proptest::prop_assert_eq!(frontiers, expected);
        proptest::prop_assert_eq!(&stepped, &gf);
        proptest::prop_assert!(fused.backward_next(&mut []).is_err(), "a step past the end is an error");

        // The same pass a step at a time into a window of the largest step, each step
        // copied out of it: the same gradients, bit for bit. A window too small for a
        // step is an error, not a write elsewhere.
        let largest = fused.backward_window().unwrap();
        proptest::prop_assert_eq!(largest, frontiers_sizes(&layout, widths.len() - 1).into_iter().max().unwrap());
        let (loss, windowed) = windowed_pass(&mut fused, &batch, largest);
        proptest::prop_assert_eq!(loss, lf);
        proptest::prop_assert_eq!(&windowed, &gf);
        fused.backward_begin(&batch).unwrap();
        let top = *frontiers_sizes(&layout, widths.len() - 1).last().unwrap();
        let e = fused.backward_next_into(&mut vec![0.0; top - 1], total).unwrap_err().to_string();
        proptest::prop_assert!(e.contains("cannot hold layer"), "{}", e);
        for (len, end) in [(top, total - 1), (total + 1, total)] {
            let e = fused.backward_next_into(&mut vec![0.0; len], end).unwrap_err().to_string();
            proptest::prop_assert!(e.contains("pending gradient values in a window of"), "{}", e);
        }
    }
}

/// Each layer's weight and bias values, first layer first: what one backward step of
/// the fused MLP finishes.
fn frontiers_sizes(layout: &sheaf_core::ParamLayout, layers: usize) -> Vec<usize> {
    (0..layers).map(|l| layout.range(2 * l).len() + layout.range(2 * l + 1).len()).collect()
}
