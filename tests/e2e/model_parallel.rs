//! Model parallelism through the real binary: pipeline stages and tensor-parallel
//! slices in real processes over ZeroMQ, each holding a piece of the model, train to
//! the same parameters as one process; the checkpoint is always the whole model; bad layouts and budgets fail
//! before any worker trains.

use std::path::Path;

use serde_json::Value;

use super::training::{checkpoint, max_abs_diff, ok, sheaf, summary};

/// `sheaf launch -n N` (or `run` for one) with `sets`; returns the run directory.
fn launch(n: usize, sets: &[String]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let n_arg = n.to_string();
    let mut args = if n == 1 { vec!["run"] } else { vec!["launch", "-n", &n_arg] };
    for s in sets {
        args.extend(["--set", s.as_str()]);
    }
    ok(&sheaf(&args, dir.path()));
    dir
}

fn sets(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["train.max_steps=10", "train.lr=0.05", "model.layers=[64, 96, 80, 64, 10]"]
        .map(String::from)
        .to_vec();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn nums(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// ZeRO 1 across the replicas of hybrid meshes: 2 pipelines of 2 stages, and 2 groups
/// of 2 tensor slices, on 4 processes. After 10 steps the parameters equal one
/// process's, and each rank holds half the optimizer state the same mesh holds
/// without ZeRO (momentum SGD: one value per parameter of its piece).
#[test]
fn zero_shards_the_state_across_the_replicas_of_hybrid_meshes() {
    let reference = checkpoint(launch(1, &sets(&["train.optimizer=\"sgd\""])).path());
    for (strategy, option) in [
        ("pipeline", "parallel.options.pipeline.zero"),
        ("tensor-parallel", "parallel.options.tensor-parallel.zero"),
    ] {
        let strategy = format!("parallel.strategy=\"{strategy}\"");
        let base = [strategy.as_str(), "parallel.data=2", "train.optimizer=\"sgd\""];
        let plain = launch(4, &sets(&base));
        let zero = format!("{option}=1");
        let sharded = launch(4, &sets(&[&base[..], &[zero.as_str()]].concat()));
        let d = max_abs_diff(&reference, &checkpoint(sharded.path()));
        assert!(d <= 1e-6, "{strategy} with ZeRO 1: max abs diff {d}");
        let state =
            |dir: &tempfile::TempDir| summary(dir.path())["optimizer_state_bytes_per_rank"].as_u64().unwrap();
        let (whole, shard) = (state(&plain), state(&sharded));
        assert!(
            whole > 0 && shard.abs_diff(whole / 2) <= 8,
            "{strategy}: {whole} bytes without ZeRO, {shard} with"
        );
        let grads = summary(sharded.path())["gradient_bytes_per_rank"].as_u64().unwrap();
        assert_eq!(
            grads,
            whole + shard,
            "{strategy}: the piece's gradients and this replica's chunk of them"
        );
    }
}

/// Pipelines of 2 and 3 stages (GPipe and 1F1B, 1 to 5 micro-batches), tensor
/// parallelism over 2 ranks, and the hybrids of 2 replicas x 2 stages and 2 replicas x
/// 2 tensor slices on 4 processes: after 10 steps the parameters equal one process's
/// on the same global batches.
#[test]
fn model_parallel_runs_end_with_the_parameters_of_one_process() {
    let one = launch(1, &sets(&[]));
    let reference = checkpoint(one.path());
    const PIPE: &str = "parallel.strategy=\"pipeline\"";
    const TENSOR: &str = "parallel.strategy=\"tensor-parallel\"";
    for (n, extra) in [
        (
            2,
            vec![
                PIPE,
                "parallel.options.pipeline.schedule=\"gpipe\"",
                "parallel.options.pipeline.micro_batches=1",
            ],
        ),
        (
            2,
            vec![
                PIPE,
                "parallel.options.pipeline.schedule=\"gpipe\"",
                "parallel.options.pipeline.micro_batches=4",
            ],
        ),
        (
            2,
            vec![
                PIPE,
                "parallel.options.pipeline.schedule=\"1f1b\"",
                "parallel.options.pipeline.micro_batches=3",
            ],
        ),
        (
            3,
            vec![
                PIPE,
                "parallel.options.pipeline.schedule=\"1f1b\"",
                "parallel.options.pipeline.micro_batches=5",
            ],
        ),
        (
            4,
            vec![
                PIPE,
                "parallel.data=2",
                "parallel.options.pipeline.schedule=\"1f1b\"",
                "parallel.options.pipeline.micro_batches=2",
            ],
        ),
        (2, vec![TENSOR]),
        (4, vec![TENSOR, "parallel.data=2"]),
    ] {
        let dir = launch(n, &sets(&extra));
        let d = max_abs_diff(&reference, &checkpoint(dir.path()));
        assert!(d <= 1e-6, "{n} ranks {extra:?}: max abs diff {d}");
        let sum = summary(dir.path());
        let per_rank = nums(&sum["params_per_rank"]);
        assert_eq!(per_rank.len(), n);
        let total = sum["params"].as_f64().unwrap();
        assert!(per_rank.iter().all(|&p| p < total), "a rank holds the whole model: {per_rank:?}");
    }
}

/// The default digits job under tensor parallelism on 2 ranks: 95% and more, within a
/// point of one process, each rank holding about half the model.
#[test]
fn tensor_parallel_trains_the_default_job() {
    let tp = launch(2, &["parallel.strategy=\"tensor-parallel\"".into()]);
    let one = launch(1, &[]);
    let s = summary(tp.path());
    let acc = s["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.95, "{s}");
    assert!((acc - summary(one.path())["test_accuracy"].as_f64().unwrap()).abs() <= 0.01);
    let total = s["params"].as_f64().unwrap();
    for p in nums(&s["params_per_rank"]) {
        assert!((p / total - 0.5).abs() < 0.05, "{p} of {total}");
    }
}

/// The default digits job as a 2-stage pipeline: 95% and more, within a point of one
/// process, and no rank holds the whole model.
#[test]
fn pipeline_trains_the_default_job() {
    let pipe = launch(2, &["parallel.strategy=\"pipeline\"".into()]);
    let one = launch(1, &[]);
    let s = summary(pipe.path());
    let acc = s["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.95, "{s}");
    assert!((acc - summary(one.path())["test_accuracy"].as_f64().unwrap()).abs() <= 0.01);
    let per_rank = nums(&s["params_per_rank"]);
    assert_eq!(per_rank.iter().sum::<f64>(), s["params"].as_f64().unwrap());
    assert!(per_rank.iter().all(|&p| p < s["params"].as_f64().unwrap()), "{per_rank:?}");
}

/// A checkpoint written by a pipeline starts a data-parallel run (and the other way
/// round): with no training steps, the checkpoint comes back unchanged; and training on
/// from it goes the same way in any layout: 5 steps from the pipeline's checkpoint as
/// one data-parallel process and as a 3-stage pipeline end within 1e-6 of each other
/// (a layout that loaded the checkpoint but trained its pieces from other parameters,
/// or cut it wrongly, would not).
#[test]
fn checkpoints_cross_strategies_and_world_sizes() {
    let pipe = launch(2, &sets(&["parallel.strategy=\"pipeline\""]));
    let from_steps = |n: usize, strategy: &str, init: &Path, steps: u64| {
        let dir = tempfile::tempdir().unwrap();
        let init = init.join("checkpoint.safetensors");
        let n_arg = n.to_string();
        let mut args = if n == 1 { vec!["run"] } else { vec!["launch", "-n", &n_arg] };
        let s = [
            format!("train.max_steps={steps}"),
            "train.lr=0.05".into(),
            "model.layers=[64, 96, 80, 64, 10]".into(),
            format!("parallel.strategy=\"{strategy}\""),
        ];
        for x in &s {
            args.extend(["--set", x.as_str()]);
        }
        args.extend(["--init-from", init.to_str().unwrap()]);
        ok(&sheaf(&args, dir.path()));
        dir
    };
    let from = |n: usize, strategy: &str, init: &Path| from_steps(n, strategy, init, 0);
    let dp = from(1, "data-parallel", pipe.path());
    assert_eq!(max_abs_diff(&checkpoint(pipe.path()), &checkpoint(dp.path())), 0.0);
    let back = from(3, "pipeline", dp.path());
    assert_eq!(max_abs_diff(&checkpoint(dp.path()), &checkpoint(back.path())), 0.0);
    // One process may run a model-parallel strategy too (one piece: the whole model).
    let alone = from(1, "tensor-parallel", back.path());
    assert_eq!(max_abs_diff(&checkpoint(back.path()), &checkpoint(alone.path())), 0.0);
    // Same accuracy from the same parameters.
    assert_eq!(summary(back.path())["test_accuracy"], summary(pipe.path())["test_accuracy"]);

    let (dp5, pipe5) =
        (from_steps(1, "data-parallel", pipe.path(), 5), from_steps(3, "pipeline", pipe.path(), 5));
    let moved = max_abs_diff(&checkpoint(pipe.path()), &checkpoint(dp5.path()));
    assert!(moved > 1e-4, "5 steps changed nothing ({moved}): the comparison below would be empty");
    let d = max_abs_diff(&checkpoint(dp5.path()), &checkpoint(pipe5.path()));
    assert!(d <= 1e-6, "5 steps on from the checkpoint: data-parallel and a 3-stage pipeline differ by {d}");
}

/// GPipe keeps every micro-batch's activations until its backward pass; 1F1B at most
/// `P - p` on stage `p`: measured on the first of 2 stages with 4 micro-batches.
#[test]
fn one_f_one_b_keeps_fewer_activations_than_gpipe() {
    let peak = |schedule: &str| {
        let dir = launch(
            2,
            &sets(&[
                "parallel.strategy=\"pipeline\"",
                "parallel.options.pipeline.micro_batches=4",
                &format!("parallel.options.pipeline.schedule=\"{schedule}\""),
            ]),
        );
        nums(&summary(dir.path())["peak_activation_bytes_per_rank"])
    };
    let (gpipe, one) = (peak("gpipe"), peak("1f1b"));
    // 64 samples in 4 micro-batches of 16: stage 0 keeps 4 of them under GPipe, 2 under 1F1B.
    assert_eq!(one[0] * 2.0, gpipe[0], "1F1B {one:?} vs GPipe {gpipe:?}");
    assert_eq!(one[1], gpipe[1] / 4.0, "the last stage runs each backward at once under 1F1B");
}

/// Layouts that cannot work fail before any worker starts, naming the key.
#[test]
fn bad_layouts_fail_before_training() {
    for (n, set, want) in [
        (3, "parallel.strategy=\"pipeline\"", "3 stages, but the model has only 2 blocks"),
        (3, "parallel.data=2", "2 replicas need 2 ranks, not 3"),
        (3, "parallel.strategy=\"tensor-parallel\"", "does not divide the 128 output features of layer 0"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let n = n.to_string();
        let out = sheaf(&["launch", "-n", &n, "--set", set], dir.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{set}: {err}");
        assert!(err.contains(want), "{set}: {err}");
        assert!(!err.contains("[launch] rank"), "a worker started: {err}");
    }
}

/// The example job: over its memory budget on one worker (an error naming the need and
/// the limit, before training), trained as a 2-stage pipeline.
#[test]
fn a_model_over_the_memory_budget_trains_as_a_pipeline() {
    let job = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipeline-memory.toml");
    let job = job.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = sheaf(&["run", job, "--set", "parallel.strategy=\"data-parallel\""], dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("needs 10.48 MiB") && err.contains("the limit is 8 MiB"), "{err}");
    assert!(!dir.path().join("checkpoint.safetensors").exists());
    let dir = tempfile::tempdir().unwrap();
    ok(&sheaf(&["launch", "-n", "2", job], dir.path()));
    let s = summary(dir.path());
    assert!(s["test_accuracy"].as_f64().unwrap() >= 0.95, "{s}");
}

/// GPipe's measured bubble (each stage's waiting over its step time, averaged) is
/// close to `(P - 1) / (M + P - 1)` on balanced stages: 2 stages of two 1024-wide
/// layers each, 4 micro-batches, one compute thread per worker, shared memory. The
/// formula is the schedule's own idle time; what the stages measure adds the
/// transfers between stages and the last stage's loss, which it leaves out, so the
/// band is 0.03 below it and 0.08 above (0.24 measured here alone).
///
/// Timing: two workers each need a core of their own, so this runs after the other
/// tests, alone (`cargo xtask ci` runs the ignored e2e tests with one test thread);
/// among the parallel tests of a 2-core CI machine it measured other tests' load.
#[test]
#[ignore = "timing: needs the machine alone; `cargo xtask ci` runs it after the others"]
fn gpipe_bubble_matches_the_formula() {
    let dir = tempfile::tempdir().unwrap();
    let sets = [
        "transport.plugin=\"shm\"",
        "parallel.strategy=\"pipeline\"",
        "parallel.options.pipeline.schedule=\"gpipe\"",
        "parallel.options.pipeline.micro_batches=4",
        "data.dataset=\"synthetic\"",
        "data.samples=2048",
        "model.layers=[1024, 1024, 1024, 1024, 1024, 10]",
        "train.batch_size=512",
        "train.max_steps=6",
    ];
    let mut args = vec!["launch", "-n", "2", "--threads-per-worker", "1"];
    for s in &sets {
        args.extend(["--set", s]);
    }
    ok(&sheaf(&args, dir.path()));
    let s = summary(dir.path());
    let (busy, idle) = (nums(&s["busy_seconds_per_rank"]), nums(&s["idle_seconds_per_rank"]));
    assert!(busy.iter().all(|&b| b > 0.0), "{s}");
    let bubble = s["bubble_fraction"].as_f64().unwrap();
    let mean: f64 = busy.iter().zip(&idle).map(|(b, i)| i / (b + i)).sum::<f64>() / 2.0;
    assert!((bubble - mean).abs() < 1e-9);
    let theory = 1.0 / 5.0;
    assert!(
        (theory - 0.03..=theory + 0.08).contains(&bubble),
        "measured bubble {bubble}, formula {theory}: {s}"
    );
}

/// `parallel.balance = "time"`: `launch` measures each layer's forward and backward
/// once and every worker cuts by those costs; unknown balances are refused up front.
#[test]
fn stages_can_be_balanced_by_measured_time() {
    let dir = launch(2, &sets(&["parallel.strategy=\"pipeline\"", "parallel.balance=\"time\""]));
    let s = summary(dir.path());
    let costs = s["job"]["parallel"]["layer_costs"].as_array().expect("costs recorded in the job");
    assert_eq!(costs.len(), 4);
    assert!(costs.iter().all(|c| c.as_u64().unwrap() > 0), "{costs:?}");
    let per_rank = nums(&s["params_per_rank"]);
    assert_eq!(per_rank.iter().sum::<f64>(), s["params"].as_f64().unwrap());

    let dir = tempfile::tempdir().unwrap();
    let out = sheaf(
        &[
            "launch",
            "-n",
            "2",
            "--set",
            "parallel.strategy=\"pipeline\"",
            "--set",
            "parallel.balance=\"speed\"",
        ],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("`speed` (params, time)"), "{err}");
}

/// ZeRO stage 1's sharded optimizer state counts in the memory budget: on two
/// data-parallel workers with AdamW, the example model needs its parameters,
/// gradients and two moments whole without ZeRO, and half the moments with it, so a
/// budget between the two refuses the first before any worker starts and trains the
/// second; a budget below the sharded need names the sharding.
#[test]
fn zero_state_shards_count_in_the_memory_budget() {
    let job = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipeline-memory.toml");
    let job = job.to_str().unwrap();
    let run = |zero: u8, limit: f64| {
        let dir = tempfile::tempdir().unwrap();
        let out = sheaf(
            &[
                "launch",
                "-n",
                "2",
                job,
                "--set",
                "parallel.strategy=\"data-parallel\"",
                "--set",
                &format!("parallel.options.data-parallel.zero={zero}"),
                "--set",
                "train.optimizer=\"adamw\"",
                "--set",
                "train.lr=0.001",
                "--set",
                "train.epochs=1",
                "--set",
                &format!("compute.memory_limit_mb={limit}"),
            ],
            dir.path(),
        );
        (out, dir)
    };
    // Planned per rank (`sheaf plan`): zero 0, 19.42 MiB (AdamW's two moments whole);
    // zero 1, 17.85 MiB (half the moments, and a half-size shard of the gradients).
    let (out, _dir) = run(0, 18.5);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("needs 19.42 MiB") && !err.contains("sharded"), "{err}");
    assert!(!err.contains("[launch] rank"), "a worker started: {err}");
    let (out, _dir) = run(1, 17.5);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("needs 17.85 MiB") && err.contains("optimizer state sharded over 2 ranks"), "{err}");
    let (out, dir) = run(1, 18.5);
    ok(&out);
    let s = summary(dir.path());
    let whole = 826_378 * 4 * 2;
    let per_rank = s["optimizer_state_bytes_per_rank"].as_u64().unwrap();
    assert!(per_rank <= whole / 2 + 4096 && per_rank >= whole / 2, "{s}");
}
