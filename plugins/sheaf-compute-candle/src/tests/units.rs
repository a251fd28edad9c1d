//! Row shards (ZeRO stage 3): the shards of every rank together are the whole model's
//! initialisation, and a pass unit by unit on gathered parameters gives the whole
//! model's loss and gradients bit for bit (the same kernels on the same values).

use sheaf_core::{Batch, ComputeBackend, Model, ModelSpec, ParamLayout, ParamShard, PieceLayout};

use crate::CandleBackend;

/// Every rank's shard of `spec` placed into one buffer, and that buffer.
fn gathered(
    backend: &CandleBackend,
    spec: &ModelSpec,
    whole: &ParamLayout,
    count: usize,
    seed: u64,
) -> Vec<f32> {
    let mut full = vec![f32::NAN; whole.total()];
    for index in 0..count {
        let shard = ParamShard { index, count };
        let model = backend.build_shard(spec, shard, seed).unwrap();
        let layout = PieceLayout::row_shard(whole, shard, 0);
        assert_eq!(model.layout(), &layout.layout, "shard {index} of {count}");
        let mut own = vec![0f32; layout.layout.total()];
        model.read_params(&mut own).unwrap();
        layout.place(whole, &own, &mut full);
    }
    full
}

/// A training pass of `model` (a row shard) unit by unit, each unit's parameters
/// taken from `full`: the loss sum and the whole model's gradient.
fn unit_pass(model: &mut dyn Model, whole: &ParamLayout, full: &[f32], batch: &Batch<'_>) -> (f64, Vec<f32>) {
    let units = model.units();
    let pack = |u: &[usize]| -> Vec<f32> { u.iter().flat_map(|&p| full[whole.range(p)].to_vec()).collect() };
    model.unit_begin(batch, true).unwrap();
    let mut end = None;
    for (u, params) in units.iter().enumerate() {
        end = model.unit_forward(u, &pack(params)).unwrap();
    }
    let mut grads = vec![f32::NAN; whole.total()];
    for (u, params) in units.iter().enumerate().rev() {
        let given = if u == 0 { Vec::new() } else { pack(params) };
        let mut g = vec![f32::NAN; params.iter().map(|&p| whole.range(p).len()).sum()];
        model.unit_backward(u, &given, &mut g).unwrap();
        let mut at = 0;
        for &p in params {
            let r = whole.range(p);
            grads[r.clone()].copy_from_slice(&g[at..at + r.len()]);
            at += r.len();
        }
    }
    (end.expect("the last unit ends the pass").0, grads)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The law for one model: shards of 1 to 4 ranks tile the whole initialisation, and
/// the first shard's pass on the gathered parameters is the whole model's.
fn shards_run_as_the_whole_model(spec: &ModelSpec, batch: &Batch<'_>, predictions: usize) {
    let backend = CandleBackend::new("cpu").unwrap();
    let mut whole_model = backend.build_model(spec, 11).unwrap();
    let whole = whole_model.layout().clone();
    let mut want = vec![0f32; whole.total()];
    whole_model.read_params(&mut want).unwrap();
    let mut grads = vec![f32::NAN; whole.total()];
    let loss = whole_model.forward_backward(batch, &mut grads).unwrap();
    for count in 1..=4 {
        let full = gathered(&backend, spec, &whole, count, 11);
        assert_eq!(bits(&full), bits(&want), "{count} shards' initial values");
        let mut shard = backend.build_shard(spec, ParamShard { index: count - 1, count }, 11).unwrap();
        assert!(shard.forward_backward(batch, &mut grads.clone()).is_err(), "a shard trains whole");
        let (sum, got) = unit_pass(shard.as_mut(), &whole, &full, batch);
        assert_eq!(((sum / predictions as f64) as f32).to_bits(), loss.to_bits(), "{count} shards' loss");
        assert_eq!(bits(&got), bits(&grads), "{count} shards' gradients");
    }
}

#[test]
fn gpt_shards_run_unit_by_unit_as_the_whole_model() {
    for extra in [
        r#""tie_embeddings": true"#,
        r#""tie_embeddings": false, "bias": false"#,
        r#""tie_embeddings": true, "activation_checkpointing": 2"#,
    ] {
        let mut spec = ModelSpec::new(
            "gpt",
            format!(r#"{{"n_layer": 3, "n_head": 2, "n_embd": 6, "block_size": 5, {extra}}}"#),
        );
        spec.vocab_size = Some(7);
        let w: Vec<u32> = (0..3 * 6).map(|i| (i * 5 % 7) as u32).collect();
        shards_run_as_the_whole_model(&spec, &Batch::Tokens { windows: &w, window: 6 }, 3 * 5);
    }
}

#[test]
fn mlp_shards_run_unit_by_unit_as_the_whole_model() {
    let spec = ModelSpec::mlp(vec![5, 7, 3, 4]);
    let inputs: Vec<f32> = (0..6 * 5).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
    let labels: Vec<u32> = (0..6).map(|i| i % 4).collect();
    shards_run_as_the_whole_model(&spec, &Batch::Rows { inputs: &inputs, labels: &labels, input_dim: 5 }, 6);
}

/// A shard asked out of order, or given a unit of the wrong size, is an error.
#[test]
fn units_out_of_order_are_errors() {
    let backend = CandleBackend::new("cpu").unwrap();
    let spec = ModelSpec::mlp(vec![5, 7, 3]);
    let mut shard = backend.build_shard(&spec, ParamShard { index: 0, count: 2 }, 1).unwrap();
    let inputs = vec![0.5f32; 5];
    let batch = Batch::Rows { inputs: &inputs, labels: &[1], input_dim: 5 };
    shard.unit_begin(&batch, true).unwrap();
    assert!(shard.unit_forward(1, &[0.0; 24]).is_err(), "unit 1 before unit 0");
    assert!(shard.unit_forward(0, &[0.0; 3]).is_err(), "a unit of the wrong size");
    assert!(shard.unit_backward(0, &[], &mut [0.0; 42]).is_err(), "a backward before the forward");
    assert!(backend.build_shard(&spec, ParamShard { index: 2, count: 2 }, 1).is_err());
}

/// Pipeline stages `cut` of `spec` run over `micro` micro-batches of `w` (windows of
/// `window`), every forward pass before any backward pass: each stage held whole, and
/// as row shard `index` of `count` run unit by unit, the piece's buffer holding NaN
/// everywhere but the unit that runs (its values gathered from the whole piece), and
/// its gradient buffer checked unit by unit. Asserts that the shards' values
/// are the whole model's rows, that every stage's output and input gradient are the
/// whole piece's bit for bit, that a unit's backward pass adds to its own gradients
/// only, and that the gradients added up are the whole piece's bit for bit.
fn piece_shards_run_as_the_whole_piece(
    spec: &crate::GptSpec,
    cut: &[usize],
    (index, count): (usize, usize),
    w: &[u32],
    window: usize,
    micro: usize,
) {
    use crate::FusedPiece;
    use sheaf_core::Piece;
    let seed = 5;
    let full_model = crate::gpt::init_params(spec, seed);
    let whole_layout = spec.layout();
    let pieces: Vec<Piece> =
        cut.windows(2).map(|c| Piece { blocks: c[0]..c[1], tensor_rank: 0, tensor_width: 1 }).collect();
    let mut whole: Vec<FusedPiece> = pieces.iter().map(|p| FusedPiece::new(spec, p, seed).unwrap()).collect();
    let shard = ParamShard { index, count };
    let mut shards: Vec<FusedPiece> =
        pieces.iter().map(|p| FusedPiece::new_shard(spec, p, shard, seed).unwrap()).collect();
    let mut values = Vec::new();
    for ((p, s), w) in pieces.iter().zip(&shards).zip(&whole) {
        let rows = spec.piece_layout(p).unwrap().rows(shard).unwrap();
        assert_eq!(s.layout(), &rows.layout);
        let mut own = vec![f32::NAN; rows.layout.total()];
        s.read_params(&mut own).unwrap();
        assert_eq!(bits(&own), bits(&rows.slice(&whole_layout, &full_model)), "shard {index} of {count}");
        let mut v = vec![0f32; w.layout().total()];
        w.read_params(&mut v).unwrap();
        values.push(v);
        // Every parameter in a unit (a tied embedding in the head's too).
        let mut seen: Vec<usize> = s.units().concat();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, (0..rows.layout.specs().len()).collect::<Vec<_>>());
    }
    // Unit `u` of stage `k` gathered into its shard's piece buffer, NaN elsewhere.
    let layouts: Vec<ParamLayout> = whole.iter().map(|p| p.layout().clone()).collect();
    let gather = |s: &mut FusedPiece, k: usize, u: usize, values: &[Vec<f32>]| {
        let layout = &layouts[k];
        let units = s.units();
        let buf = s.piece_params_mut().unwrap().expect("a piece shard lends its piece's buffer");
        buf.fill(f32::NAN);
        for &p in &units[u] {
            buf[layout.range(p)].copy_from_slice(&values[k][layout.range(p)]);
        }
    };
    let n = w.len() / window;
    let rows = n / micro;
    let targets = sheaf_core::Samples::Tokens { windows: w.to_vec(), window }.targets();
    let mut grads_out = Vec::new();
    for m in 0..micro {
        let mine = &w[m * rows * window..(m + 1) * rows * window];
        let batch = Batch::Tokens { windows: mine, window };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for k in 0..pieces.len() {
            a = match k {
                0 => whole[k].stage_forward_batch(m as u64, 0, &batch),
                _ => whole[k].stage_forward(m as u64, 0, &a, rows),
            }
            .unwrap();
            for u in 0..shards[k].segments() {
                gather(&mut shards[k], k, u, &values);
                b = match (k, u) {
                    (0, 0) => shards[k].stage_forward_batch(m as u64, 0, &batch),
                    _ => shards[k].stage_forward(m as u64, u, &b, rows),
                }
                .unwrap();
            }
            assert_eq!(bits(&a), bits(&b), "stage {k}'s output, micro-batch {m}");
        }
        let t = &targets[m * rows * (window - 1)..(m + 1) * rows * (window - 1)];
        grads_out.push(whole.last_mut().unwrap().loss_grad(&a, t, 0.25).unwrap().2);
    }
    for (m, grad) in grads_out.into_iter().enumerate().rev() {
        let (mut a, mut b) = (grad.clone(), grad);
        for k in (0..pieces.len()).rev() {
            a = whole[k].stage_backward(m as u64, 0, &a).unwrap();
            let layout = whole[k].layout().clone();
            for u in (0..shards[k].segments()).rev() {
                gather(&mut shards[k], k, u, &values);
                let before = shards[k].piece_grads_mut().unwrap().unwrap().to_vec();
                b = shards[k].stage_backward(m as u64, u, &b).unwrap();
                let units = shards[k].units();
                let g = shards[k].piece_grads_mut().unwrap().unwrap();
                // Outside the unit nothing changed: put the unit's values back as they
                // were, and the whole buffer reads as before.
                let mut outside = g.to_vec();
                for &p in &units[u] {
                    outside[layout.range(p)].copy_from_slice(&before[layout.range(p)]);
                }
                assert_eq!(
                    bits(&outside),
                    bits(&before),
                    "unit {u} of stage {k} wrote outside its parameters"
                );
            }
            assert_eq!(bits(&a), bits(&b), "stage {k}'s input gradient, micro-batch {m}");
        }
    }
    // Added up over the micro-batches in the piece's gradient buffer, as the whole
    // piece adds them up in its own.
    for (k, (w, s)) in whole.iter_mut().zip(&mut shards).enumerate() {
        assert_eq!(s.saved_bytes(), 0, "every micro-batch's activations freed");
        let mut g = vec![f32::NAN; w.layout().total()];
        w.take_grads(&mut g).unwrap();
        let taken = s.piece_grads_mut().unwrap().unwrap();
        assert_eq!(bits(taken), bits(&g), "stage {k}'s gradients");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Row shards of pipeline stages (ZeRO stage 3 inside a pipeline stage): the
    /// shards' values are the whole model's rows, and a stage run unit by unit on
    /// gathered parameters, with several micro-batches in flight, gives the whole
    /// stage's outputs, input gradients and accumulated gradients bit for bit, reading
    /// no parameter outside the unit it runs and writing no gradient outside it.
    #[test]
    fn piece_shards_run_unit_by_unit_as_the_whole_piece(
        n_layer in 1usize..4,
        stages in 1usize..4,
        count in 1usize..4,
        last in proptest::bool::ANY,
        bias in proptest::bool::ANY,
        tied in proptest::bool::ANY,
        every in 0usize..3,
        micro in 1usize..3,
        seed in 0usize..100,
    ) {
        let (vocab, window) = (7usize, 5usize);
        let recompute = if every == 0 { String::new() } else { format!(r#", "activation_checkpointing": {every}"#) };
        let mut s = ModelSpec::new("gpt", format!(
            r#"{{"n_layer": {n_layer}, "n_head": 2, "n_embd": 6, "block_size": 5, "bias": {bias}, "tie_embeddings": {tied}{recompute}}}"#
        ));
        s.vocab_size = Some(vocab);
        let spec = crate::GptSpec::parse(&s).unwrap();
        let blocks = n_layer + 2;
        let stages = stages.min(blocks);
        let cut: Vec<usize> = (0..=stages).map(|k| k * blocks / stages).collect();
        let w: Vec<u32> = (0..2 * micro * window).map(|i| ((i * 3 + seed) % vocab) as u32).collect();
        let index = if last { count - 1 } else { 0 };
        piece_shards_run_as_the_whole_piece(&spec, &cut, (index, count), &w, window, micro);
    }
}

/// A piece shard refuses what it cannot run: a tensor-parallel slice, a whole-piece
/// gradient take, and a unit it does not have.
#[test]
fn piece_shards_refuse_slices_and_whole_calls() {
    let backend = CandleBackend::new("cpu").unwrap();
    let mut spec = ModelSpec::new("gpt", r#"{"n_layer": 2, "n_head": 2, "n_embd": 6, "block_size": 5}"#);
    spec.vocab_size = Some(7);
    let shard = ParamShard { index: 0, count: 2 };
    let sliced = sheaf_core::Piece { blocks: 1..3, tensor_rank: 0, tensor_width: 2 };
    let e = backend.build_piece_shard(&spec, &sliced, shard, 1).err().expect("refused").to_string();
    assert!(e.contains("parallel.options.pipeline.zero") && e.contains("columns"), "{e}");
    let piece = sheaf_core::Piece { blocks: 1..3, tensor_rank: 0, tensor_width: 1 };
    let mut m = backend.build_piece_shard(&spec, &piece, shard, 1).unwrap();
    assert_eq!(m.segments(), 2);
    assert!(m.take_grads(&mut vec![0.0; m.layout().total()]).is_err());
    assert!(m.stage_forward(0, 2, &[0.0; 6], 1).is_err(), "no unit 2");
    assert!(m.stage_backward(0, 0, &[0.0; 6]).is_err(), "a backward before its forward");
    let mlp = ModelSpec::mlp(vec![5, 7, 3]);
    let e =
        backend.build_piece_shard(&mlp, &sheaf_core::Piece::whole(2), shard, 1).err().unwrap().to_string();
    assert!(
        e.contains("ZeRO stage 3 inside a pipeline stage: `mlp` models have no row shards of a piece"),
        "{e}"
    );
}
