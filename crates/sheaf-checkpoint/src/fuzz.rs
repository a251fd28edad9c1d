//! Fuzzing what the host reads from files and command lines: checkpoints (the
//! safetensors files of parameters and optimizer state, `state.json`), job files and
//! `--set` values.

use std::path::Path;

use sheaf_core::{OptimState, ParamLayout, ParamSpec};
use sheaf_testkit::fuzz::{fuzz, inputs, CappedAlloc};

use crate::checkpoint::{state_bytes, state_from_file, CheckpointState};
use sheaf_job::job::{parse_job, DEFAULT_JOB};
use sheaf_report::outputs::{safetensors_bytes, TensorFile};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

fn layout() -> ParamLayout {
    ParamLayout::new(vec![
        ParamSpec { name: "layers.0.weight".into(), shape: vec![4, 3] },
        ParamSpec { name: "layers.0.bias".into(), shape: vec![4] },
    ])
}

#[test]
fn checkpoint_tensors() {
    let layout = layout();
    let params: Vec<f32> = (0..layout.total()).map(|i| i as f32 * 0.5).collect();
    let state = OptimState { step: 7, buffers: vec![("layers.0.bias.exp_avg".into(), vec![1.0, 2.0])] };
    let seeds = vec![safetensors_bytes(&layout, &params).unwrap(), state_bytes(&state).unwrap()];
    fuzz("checkpoint safetensors", inputs(seeds), |b| {
        let Ok(file) = TensorFile::from_bytes(Path::new("fuzz.safetensors"), b.clone()) else { return };
        if let Ok(p) = file.params(&layout) {
            assert_eq!(p.len(), layout.total());
        }
        let _ = file.metadata();
        let _ = state_from_file(&file);
    });
}

#[test]
fn checkpoint_state() {
    let state = CheckpointState {
        format: "sheaf-checkpoint-2".into(),
        step: 20,
        micro_step: 40,
        epoch: 1,
        batch_in_epoch: 17,
        seed: 3,
        world_size: 2,
        strategy: "data-parallel".into(),
        optimizer_files: Vec::new(),
        job: serde_json::json!({"seed": 3, "train": {"lr": 0.1, "batch_size": 64}}),
        batch_size: 64,
        grad_accum: 1,
        optimizer_step: 20,
    };
    let seed = serde_json::to_vec_pretty(&state).unwrap();
    fuzz("checkpoint state.json", inputs(vec![seed]), |b| {
        let _ = serde_json::from_slice::<CheckpointState>(b);
    });
}

#[test]
fn checkpoint_index() {
    let mut index = crate::universal::Index::default();
    index.tensors.insert(
        "l.weight".into(),
        crate::universal::Tensor {
            param: "l.weight".into(),
            slot: None,
            shape: vec![2, 3],
            fragments: vec![crate::universal::Fragment {
                file: "rank-0.safetensors".into(),
                tensor: "f0".into(),
                runs: vec![[0, 2, 3, 2]],
            }],
        },
    );
    let seed = serde_json::to_vec(&index).unwrap();
    fuzz("checkpoint index.json", inputs(vec![seed]), |b| {
        let _ = serde_json::from_slice::<crate::universal::Index>(b);
    });
}

#[test]
fn job_files() {
    let seeds = vec![
        DEFAULT_JOB.as_bytes().to_vec(),
        include_bytes!("../../../examples/shakespeare-gpt.toml").to_vec(),
        include_bytes!("../../../examples/pipeline-memory.toml").to_vec(),
    ];
    fuzz("job file", inputs(seeds), |b| {
        let _ = parse_job(&String::from_utf8_lossy(b), "fuzz.toml", &[]);
    });
}

#[test]
fn set_values() {
    let seeds: Vec<Vec<u8>> = [
        "train.lr=0.1",
        "train.optimizer=\"adamw\"",
        "model.layers=[64, 128, 10]",
        "parallel.options.pipeline.micro_batches=4",
        "train.options.sgd.momentum=0.9",
        "data.test_fraction=0.25",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("--set value", inputs(seeds), |b| {
        let _ = parse_job(DEFAULT_JOB, "default", &[String::from_utf8_lossy(b).into_owned()]);
    });
}
