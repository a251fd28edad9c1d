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
