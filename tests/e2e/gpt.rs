//! The GPT language model through the real binary: token data from a text file, a
//! `.bin` file and a directory `sheaf prepare` wrote with GPT-2's tokenizer, data-parallel runs over ZeroMQ and shared memory ending where one
//! process ends, the training loop's metrics, `sheaf sample`, and bad input refused
//! before any worker starts.

use std::path::{Path, PathBuf};

use crate::training::{checkpoint, max_abs_diff, ok, sheaf, summary};

/// A small deterministic English-like text of about 24,000 characters.
fn text() -> String {
    let words = ["the", "king", "and", "queen", "of", "night", "shall", "speak", "to", "thee", "my", "lord"];
    let mut rng = sheaf_core::SplitMix64::new(7);
    let mut out = String::new();
    while out.len() < 24_000 {
        let n = 3 + (rng.next_u64() % 8) as usize;
        let line: Vec<&str> = (0..n).map(|_| words[(rng.next_u64() % words.len() as u64) as usize]).collect();
        out.push_str(&line.join(" "));
        out.push_str(".\n");
    }
    out
}

/// A job file for a tiny GPT on `dataset`, with `extra` appended to `[train]`.
pub(crate) fn job(dir: &Path, dataset: &Path, model_extra: &str, train_extra: &str) -> PathBuf {
    let path = dir.join("gpt.toml");
    let body = format!(
        r#"seed = 3
[model]
kind = "gpt"
n_layer = 2
n_head = 2
n_embd = 16
block_size = 16
{model_extra}
[data]
dataset = "{}"
[train]
epochs = 50
max_steps = 10
batch_size = 8
optimizer = "adamw"
lr = 3e-3
{train_extra}
[parallel]
strategy = "data-parallel"
[parallel.options.data-parallel]
checksum_every = 5
"#,
        dataset.display()
    );
    std::fs::write(&path, body).unwrap();
    path
}

pub(crate) fn text_file(dir: &Path) -> PathBuf {
    let path = dir.join("corpus.txt");
    std::fs::write(&path, text()).unwrap();
    path
}

pub(crate) fn launch(n: usize, job: &Path, sets: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = vec!["launch".into(), "-n".into(), n.to_string(), job.display().to_string()];
    for s in sets {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&sheaf(&args, dir.path()));
    dir
}

/// Launches 2 (or `n`) workers expecting failure before any starts; returns stderr.
fn launch_fails(job: &Path, sets: &[&str]) -> String {
    launch_n_fails(2, job, sets)
}

fn launch_n_fails(n: usize, job: &Path, sets: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = vec!["launch".into(), "-n".into(), n.to_string(), job.display().to_string()];
    for s in sets {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = sheaf(&args, dir.path());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(!err.contains("[rank"), "a worker started: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// After 10 AdamW steps of a 2-block GPT, data-parallel runs of 2 (ZeroMQ) and 4
/// (shared memory) workers hold the parameters one process does.
#[test]
fn gpt_data_parallel_ends_where_one_process_ends() {
    let data = tempfile::tempdir().unwrap();
    let job = job(data.path(), &text_file(data.path()), "", "");
    let one = launch(1, &job, &[]);
    let reference = checkpoint(one.path());
    assert!(reference.iter().any(|(n, s, _)| n == "transformer.h.1.attn.c_attn.weight" && s == &[48, 16]));
    assert!(!reference.iter().any(|(n, _, _)| n == "lm_head.weight"), "the tied head is stored once");
    for (n, transport) in [(2, "zmq-tcp"), (4, "shm")] {
        let run = launch(n, &job, &[&format!("transport.plugin=\"{transport}\"")]);
        let d = max_abs_diff(&checkpoint(run.path()), &reference);
        assert!(d <= 1e-5, "world {n} over {transport}: max abs diff {d}");
    }
    // ZeRO stage 2 in 1 KiB buckets: each backward step of a 6-block GPT goes into a
    // window of a bucket and a step (the tied head's part of the embedding's gradient
    // held in the model until the embeddings' step), so a rank holds fewer gradient
    // values in all than the model has, and still ends where one process ends.
    let deep = "model.n_layer=6";
    let reference = checkpoint(launch(1, &job, &[deep]).path());
    let sets = ["parallel.options.data-parallel.zero=2", "parallel.options.data-parallel.bucket_mb=0.001"];
    let windowed = launch(3, &job, &[deep, sets[0], sets[1], "transport.plugin=\"shm\""]);
    let d = max_abs_diff(&checkpoint(windowed.path()), &reference);
    assert!(d <= 1e-5, "ZeRO 2 through windows over 3 processes: max abs diff {d}");
    let values: usize = reference.iter().map(|(_, _, v)| v.len()).sum();
    let held = summary(windowed.path())["gradient_bytes_per_rank"].as_u64().unwrap();
    assert!(
        held < 4 * values as u64,
        "ZeRO 2 through windows: {held} bytes of gradients for {values} values"
    );
    let s = summary(one.path());
    assert!(s["val_loss"].as_f64().unwrap().is_finite(), "{s}");
    assert!(s["tokens_per_sec"].as_f64().unwrap() > 0.0, "{s}");
    let vocab: serde_json::Value =
        serde_json::from_slice(&std::fs::read(one.path().join("vocab.json")).unwrap()).unwrap();
    // The corpus's distinct characters: newline, space, the full stop and 19 letters.
    assert_eq!(vocab["tokens"].as_array().unwrap().len(), 22, "{vocab}");
}

/// The GPT as pipeline stages of blocks (the embeddings on the first stage, the final
/// LayerNorm and the tied head on the last, the tied embedding's gradient summed
/// between them): 2 stages under GPipe and 1F1B, and 2 pipelines of 2, end where one
/// process ends.
#[test]
fn gpt_pipelines_end_where_one_process_ends() {
    let data = tempfile::tempdir().unwrap();
    let job = job(data.path(), &text_file(data.path()), "", "");
    let reference = checkpoint(launch(1, &job, &[]).path());
    for (n, sets) in [
        (
            2,
            vec![
                "parallel.strategy=\"pipeline\"",
                "parallel.options.pipeline.schedule=\"gpipe\"",
                "parallel.options.pipeline.micro_batches=3",
            ],
        ),
        (
            2,
            vec![
                "parallel.strategy=\"pipeline\"",
                "parallel.options.pipeline.schedule=\"1f1b\"",
                "parallel.options.pipeline.micro_batches=4",
            ],
        ),
        (4, vec!["parallel.strategy=\"pipeline\"", "parallel.data=2", "transport.plugin=\"shm\""]),
        // Stages cut by each block's measured time (sheaf launch measures them).
        (2, vec!["parallel.strategy=\"pipeline\"", "parallel.balance=\"time\""]),
    ] {
        let run = launch(n, &job, &sets);
        let d = max_abs_diff(&checkpoint(run.path()), &reference);
        assert!(d <= 1e-5, "{n} workers {sets:?}: max abs diff {d}");
        let s = summary(run.path());
        let per_rank: Vec<u64> =
            s["params_per_rank"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert!(per_rank.iter().all(|&p| p < s["params"].as_u64().unwrap()), "{s}");
        assert!(s["val_loss"].as_f64().unwrap().is_finite(), "{s}");
    }
    // An untied head: no parameter is shared, the same law holds.
    let untied = job_with(data.path(), "tie_embeddings = false");
    let reference = checkpoint(launch(1, &untied, &[]).path());
    let run = launch(2, &untied, &["parallel.strategy=\"pipeline\""]);
    let d = max_abs_diff(&checkpoint(run.path()), &reference);
    assert!(d <= 1e-5, "untied: max abs diff {d}");
}

/// The GPT tensor-parallel, Megatron's way (heads split across ranks; the
/// embeddings, LayerNorms and head replicated): 2 ranks, and 2 groups of 2, end where
/// one process ends; a width that does not divide the heads is refused up front.
#[test]
fn gpt_tensor_parallel_ends_where_one_process_ends() {
    let data = tempfile::tempdir().unwrap();
    let job = job(data.path(), &text_file(data.path()), "", "");
    let reference = checkpoint(launch(1, &job, &[]).path());
    for (n, sets) in [
        (2, vec!["parallel.strategy=\"tensor-parallel\""]),
        (4, vec!["parallel.strategy=\"tensor-parallel\"", "parallel.data=2", "transport.plugin=\"shm\""]),
    ] {
        let run = launch(n, &job, &sets);
        let d = max_abs_diff(&checkpoint(run.path()), &reference);
        assert!(d <= 1e-5, "{n} workers {sets:?}: max abs diff {d}");
        let s = summary(run.path());
        let per_rank = s["params_per_rank"][0].as_u64().unwrap();
        assert!(per_rank < s["params"].as_u64().unwrap(), "{s}");
    }
    let e = launch_fails(&job, &["parallel.strategy=\"tensor-parallel\"", "model.n_head=1"]);
    assert!(e.contains("does not divide n_head = 1"), "{e}");
}

/// Pipelines of tensor-parallel stages: P2 x T2 (4 processes) and D2 x P2 x T2 (8
/// processes) end where one process ends.
#[test]
fn gpt_meshes_of_pipelines_and_slices_end_where_one_process_ends() {
    let data = tempfile::tempdir().unwrap();
    let job = job(data.path(), &text_file(data.path()), "", "grad_clip = 1.0");
    let reference = checkpoint(launch(1, &job, &[]).path());
    let mesh = ["parallel.strategy=\"pipeline\"", "parallel.options.pipeline.tensor=2"];
    for (n, extra) in [(4, vec![]), (8, vec!["parallel.data=2", "transport.plugin=\"shm\""])] {
        let sets: Vec<&str> = mesh.iter().copied().chain(extra).collect();
        let run = launch(n, &job, &sets);
        let d = max_abs_diff(&checkpoint(run.path()), &reference);
        assert!(d <= 1e-5, "{n} workers {sets:?}: max abs diff {d}");
        let s = summary(run.path());
        let per_rank: Vec<u64> =
            s["params_per_rank"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(per_rank.len(), n);
        assert!(per_rank.iter().all(|&p| 3 * p < s["params"].as_u64().unwrap()), "{s}");
    }
}

fn job_with(dir: &Path, model_extra: &str) -> PathBuf {
    let text = text_file(dir);
    job(dir, &text, model_extra, "")
}

/// The training loop's settings reach the metrics: the warmup and cosine schedule,
/// the gradient norm, validation every `eval_every` steps; accumulation and
/// clipping keep world 2 equal to one process.
#[test]
fn the_training_loop_writes_its_metrics() {
    let data = tempfile::tempdir().unwrap();
    let loop_keys = "lr_schedule = \"cosine\"\nwarmup_steps = 3\nmin_lr = 3e-4\ngrad_clip = 0.5\ngrad_accum = 2\neval_every = 4";
    let job = job(data.path(), &text_file(data.path()), "", loop_keys);
    let one = launch(1, &job, &[]);
    let two = launch(2, &job, &[]);
    let d = max_abs_diff(&checkpoint(two.path()), &checkpoint(one.path()));
    assert!(d <= 1e-5, "max abs diff {d}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(two.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    let lr: Vec<f64> = lines.iter().map(|l| l["lr"].as_f64().unwrap()).collect();
    assert!((lr[0] - 3e-3 / 4.0).abs() < 1e-12 && (lr[2] - 3e-3 * 3.0 / 4.0).abs() < 1e-12, "{lr:?}");
    assert!((lr[3] - 3e-3).abs() < 1e-12, "{lr:?}");
    assert!(lr.windows(2).skip(3).all(|w| w[1] < w[0]) && lr[9] > 3e-4, "{lr:?}");
    let evaluated: Vec<u64> =
        lines.iter().filter(|l| l["val_loss"].is_number()).map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(evaluated, [4, 8]);
    assert!(lines.iter().all(|l| l["grad_norm"].as_f64().unwrap() > 0.0));
}

/// `[outputs] tensorboard = true`: the run's scalars as TensorBoard event files that
/// read back as metrics.jsonl says, each rank's step time beside them; `sheaf eval`
/// gives the run's own val_loss from its checkpoint, on the first batches when asked,
/// and refuses data of another vocabulary.
#[test]
fn tensorboard_files_and_eval_agree_with_the_run() {
    let data = tempfile::tempdir().unwrap();
    let job = job(data.path(), &text_file(data.path()), "", "eval_every = 3");
    std::fs::write(&job, std::fs::read_to_string(&job).unwrap() + "[outputs]\ntensorboard = true\n").unwrap();
    let run = launch(2, &job, &["train.max_steps=6"]);
    let board = run.path().join("tensorboard");
    let scalars = sheaf_report::tensorboard::read_scalars(&board).unwrap();
    let of = |tag: &str| -> Vec<(u64, f32)> {
        scalars.iter().filter(|s| s.tag == tag).map(|s| (s.step, s.value)).collect()
    };
    let loss = metric(run.path(), "loss");
    assert_eq!(of("loss"), (1..=6).zip(loss.iter().map(|&l| l as f32)).collect::<Vec<_>>());
    let val = metric(run.path(), "val_loss");
    assert_eq!(of("val_loss"), vec![(3, val[2] as f32), (6, val[5] as f32)]);
    for tag in ["lr", "grad_norm", "tokens_per_sec"] {
        let v = of(tag);
        assert!(v.len() == 6 && v.iter().all(|&(_, x)| x > 0.0), "{tag}: {v:?}");
    }
    for rank in 0..2 {
        let times = sheaf_report::tensorboard::read_scalars(&board.join(format!("rank-{rank}"))).unwrap();
        assert_eq!(
            times.iter().map(|s| s.step).collect::<Vec<_>>(),
            (1..=6).collect::<Vec<_>>(),
            "rank {rank}"
        );
        assert!(times.iter().all(|s| s.tag == "step_time_s" && s.value > 0.0 && s.value < 60.0), "{times:?}");
    }

    let eval = |args: &[&str]| {
        std::process::Command::new(sheaf_tests::sheaf_bin())
            .arg("eval")
            .arg(run.path())
            .args(args)
            .output()
            .unwrap()
    };
    let out = eval(&[]);
    ok(&out);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (got, want) = (line["val_loss"].as_f64().unwrap(), summary(run.path())["val_loss"].as_f64().unwrap());
    assert!((got - want).abs() <= 1e-6 * want, "eval {got}, the run {want}");
    assert!((line["perplexity"].as_f64().unwrap() - got.exp()).abs() < 1e-9 * got.exp());
    let tokens = line["tokens"].as_u64().unwrap();
    assert!(
        tokens > 0 && tokens.is_multiple_of(16) && line["tokens_per_sec"].as_f64().unwrap() > 0.0,
        "{line}"
    );
    let out = eval(&["--batches", "1"]);
    ok(&out);
    let first: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((first["tokens"].as_u64(), first["batches"].as_u64()), (Some(8 * 16), Some(1)), "{first}");
    // A classifier's evaluation is its run's test accuracy and loss.
    let classifier = tempfile::tempdir().unwrap();
    ok(&sheaf(&["run", "--set", "train.max_steps=4"], classifier.path()));
    let out = std::process::Command::new(sheaf_tests::sheaf_bin())
        .arg("eval")
        .arg(classifier.path())
        .output()
        .unwrap();
    ok(&out);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run = summary(classifier.path());
    assert!(
        (line["accuracy"].as_f64().unwrap() - run["test_accuracy"].as_f64().unwrap()).abs() < 1e-12,
        "{line}"
    );
    assert!((line["val_loss"].as_f64().unwrap() - run["test_loss"].as_f64().unwrap()).abs() < 1e-6, "{line}");
    assert!(line["perplexity"].is_null() && line["samples"].as_u64() > Some(0), "{line}");
    let out = eval(&["--data", "shakespeare"]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--data") && e.contains("characters, but the model was trained on"), "{e}");
}

/// `sheaf export --format hf` writes transformers' layout (config.json, and
/// model.safetensors with GPT-2's Conv1D weights transposed, its metadata saying
/// PyTorch), and `--init-from` that directory starts a run whose job names only the
/// kind at exactly the exported weights (a step at learning rate 0 changes nothing).
/// A job key the config contradicts, another architecture and a missing tensor are
/// refused by name.
#[test]
fn hugging_face_directories_go_out_and_come_back() {
    let data = tempfile::tempdir().unwrap();
    let corpus = text_file(data.path());
    let job_path = job(data.path(), &corpus, "gelu = \"tanh\"", "");
    let run = launch(2, &job_path, &["train.max_steps=3"]);
    let hf = data.path().join("hf");
    let out = std::process::Command::new(sheaf_tests::sheaf_bin())
        .args([
            "export",
            &run.path().display().to_string(),
            "--format",
            "hf",
            "--out",
            &hf.display().to_string(),
        ])
        .output()
        .unwrap();
    ok(&out);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!((config["model_type"].as_str(), config["n_layer"].as_u64()), (Some("gpt2"), Some(2)));
    assert_eq!(config["activation_function"], "gelu_new");
    let bytes = std::fs::read(hf.join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
    assert_eq!(
        file.tensor("transformer.h.0.attn.c_attn.weight").unwrap().shape(),
        [16, 48],
        "Conv1D: [in, out]"
    );
    assert_eq!(file.tensor("transformer.h.1.mlp.c_proj.weight").unwrap().shape(), [64, 16]);
    assert_eq!(file.tensor("transformer.wte.weight").unwrap().shape().len(), 2);

    // A job that names the kind alone; the shape comes from config.json.
    let bare = data.path().join("bare.toml");
    let body = std::fs::read_to_string(&job_path).unwrap();
    let body = body
        .lines()
        .filter(|l| !["n_layer", "n_head", "n_embd", "block_size", "gelu"].iter().any(|k| l.starts_with(k)))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("lr = 3e-3", "lr = 0.0");
    std::fs::write(&bare, body).unwrap();
    let start = |sets: &[&str], from: &Path| {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["launch".to_string(), "-n".into(), "2".into(), bare.display().to_string()];
        args.extend(["--init-from".to_string(), from.display().to_string()]);
        for s in sets {
            args.extend(["--set".to_string(), s.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (sheaf(&args, dir.path()), dir)
    };
    let (out, again) = start(&["train.max_steps=1"], &hf);
    ok(&out);
    assert_eq!(max_abs_diff(&checkpoint(again.path()), &checkpoint(run.path())), 0.0);

    let fails = |sets: &[&str], from: &Path| {
        let (out, _dir) = start(sets, from);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = fails(&["model.n_layer=3"], &hf);
    assert!(e.contains("key `model.n_layer`: 3 in the job") && e.contains("config.json says 2"), "{e}");
    let llama = data.path().join("llama");
    std::fs::create_dir_all(&llama).unwrap();
    std::fs::write(
        llama.join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#,
    )
    .unwrap();
    let e = fails(&[], &llama);
    assert!(e.contains("LlamaForCausalLM") && e.contains("reads GPT2LMHeadModel"), "{e}");
    // One more layer than the file holds.
    let mut bigger = config.clone();
    bigger["n_layer"] = 3.into();
    std::fs::write(hf.join("config.json"), bigger.to_string()).unwrap();
    let e = fails(&[], &hf);
    assert!(e.contains("no tensor `transformer.h.2.ln_1.weight`") && e.contains("model.safetensors"), "{e}");
}

fn metric(dir: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[key].as_f64().unwrap_or(f64::NAN))
        .collect()
}

/// The whole training loop (accumulation, clipping by the global norm, validation)
/// under pipeline and tensor parallelism: the global gradient norm each step is one
/// process's (shards summed, replicated and tied parameters counted once), and so is
/// where the run ends.
#[test]
fn the_global_norm_and_the_loop_hold_under_model_parallelism() {
    let data = tempfile::tempdir().unwrap();
    let loop_keys = "grad_clip = 0.5\ngrad_accum = 2\neval_every = 5";
    let job = job(data.path(), &text_file(data.path()), "", loop_keys);
    let one = launch(1, &job, &[]);
    let norms = metric(one.path(), "grad_norm");
    assert!(norms.iter().any(|&n| n > 0.5), "clipping should bite: {norms:?}");
    for (n, sets) in [
        (2, vec!["parallel.strategy=\"pipeline\""]),
        (2, vec!["parallel.strategy=\"tensor-parallel\""]),
        (4, vec!["parallel.strategy=\"pipeline\"", "parallel.data=2"]),
    ] {
        let run = launch(n, &job, &sets);
        let got = metric(run.path(), "grad_norm");
        for (a, b) in got.iter().zip(&norms) {
            assert!((a - b).abs() <= 1e-5 * b.max(1.0), "{sets:?}: norm {a} vs one process's {b}");
        }
        let val = metric(run.path(), "val_loss");
        assert!(val[4].is_finite() && val[9].is_finite() && val[0].is_nan(), "{sets:?}: {val:?}");
        let d = max_abs_diff(&checkpoint(run.path()), &checkpoint(one.path()));
        assert!(d <= 1e-5, "{sets:?}: max abs diff {d}");
    }
}

/// A `.bin` file of u16 ids (nanoGPT's format) trains; without `vocab_size`, or with
/// an id at or above it, the launch fails before any worker starts, naming the cause.
#[test]
fn bin_token_files_train_and_are_checked() {
    let data = tempfile::tempdir().unwrap();
    let bin = data.path().join("train.bin");
    let ids: Vec<u8> = text().bytes().flat_map(|b| u16::from(b % 50).to_le_bytes()).collect();
    std::fs::write(&bin, &ids).unwrap();
    let job_path = job(data.path(), &bin, "vocab_size = 50", "");
    let run = launch(2, &job_path, &[]);
    assert!(summary(run.path())["val_loss"].as_f64().unwrap().is_finite());
    assert!(!run.path().join("vocab.json").exists());

    let fail = launch_fails;
    let no_vocab = job(data.path(), &bin, "", "");
    let e = fail(&no_vocab, &[]);
    assert!(e.contains("model.vocab_size") && e.contains("required"), "{e}");
    let e = fail(&no_vocab, &["model.vocab_size=40"]);
    assert!(e.contains("token id 4") && e.contains("offset") && e.contains("vocab_size 40"), "{e}");
}

/// `sheaf prepare` encodes a text with GPT-2's tokenizer into a directory a job
/// trains on (a vocab_size rounded up as nanoGPT's 50304 is allowed); `sheaf sample`
/// encodes the prompt and decodes with it. Bad input is refused by name.
#[test]
fn gpt2_tokens_prepare_train_and_sample() {
    let data = tempfile::tempdir().unwrap();
    let corpus = text_file(data.path());
    let dir = data.path().join("gpt2");
    let prepare = |args: &[&str]| {
        std::process::Command::new(sheaf_tests::sheaf_bin())
            .arg("prepare")
            .arg(&corpus)
            .args(["--out", &dir.display().to_string()])
            .args(args)
            .output()
            .unwrap()
    };
    let out = prepare(&["--tokenizer", "gpt2"]);
    ok(&out);
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta, on_disk);
    assert_eq!((meta["tokenizer"].as_str(), meta["vocab_size"].as_u64()), (Some("gpt2"), Some(50257)));
    for (file, key) in [("train.bin", "train_tokens"), ("val.bin", "val_tokens")] {
        let bytes = std::fs::metadata(dir.join(file)).unwrap().len();
        assert_eq!(Some(bytes / 2), meta[key].as_u64(), "{file}");
    }
    // Whole words: far fewer tokens than characters, about a tenth validating.
    let (train, val) = (meta["train_tokens"].as_u64().unwrap(), meta["val_tokens"].as_u64().unwrap());
    assert!(train + val < 24_000 / 3 && val * 12 > train && val * 8 < train, "{meta}");

    let job_path = job(data.path(), &dir, "vocab_size = 50304", "");
    let run = launch(2, &job_path, &["train.max_steps=3"]);
    assert!(summary(run.path())["val_loss"].as_f64().unwrap().is_finite());
    let vocab: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.path().join("vocab.json")).unwrap()).unwrap();
    assert_eq!(vocab["tokenizer"], "gpt2");
    let sample = || {
        std::process::Command::new(sheaf_tests::sheaf_bin())
            .arg("sample")
            .arg(run.path())
            .args(["--prompt", "the king shall", "--tokens", "6", "--temperature", "0"])
            .output()
            .unwrap()
    };
    let a = sample();
    ok(&a);
    let text = String::from_utf8_lossy(&a.stdout);
    assert!(text.starts_with("the king shall") && text.trim_end().len() > "the king shall".len(), "{text}");
    assert_eq!(a.stdout, sample().stdout, "greedy decoding repeats");

    let out = prepare(&["--tokenizer", "bert"]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--tokenizer") && e.contains("unknown tokenizer") && e.contains("gpt2"), "{e}");
    // Exported, the run's directory carries the tokenizer's files for transformers.
    let hf = data.path().join("hf");
    let out = std::process::Command::new(sheaf_tests::sheaf_bin())
        .args(["export", &run.path().display().to_string(), "--out", &hf.display().to_string()])
        .output()
        .unwrap();
    ok(&out);
    for file in ["config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"] {
        assert!(hf.join(file).is_file(), "{file}");
    }
    let e = launch_fails(&job_path, &["data.test_fraction=0.2"]);
    assert!(e.contains("data.test_fraction") && e.contains("val.bin"), "{e}");
    let e = launch_fails(&job_path, &["model.vocab_size=50000"]);
    assert!(e.contains("model.vocab_size") && e.contains("50257"), "{e}");
    // An id the tokenizer does not have, in the validation file.
    let mut val_bin = std::fs::read(dir.join("val.bin")).unwrap();
    val_bin[2..4].copy_from_slice(&60000u16.to_le_bytes());
    std::fs::write(dir.join("val.bin"), &val_bin).unwrap();
    let e = launch_fails(&job_path, &[]);
    assert!(e.contains("val.bin") && e.contains("token id 60000 at token offset 1"), "{e}");
}

#[test]
fn bad_gpt_jobs_fail_before_any_worker_starts() {
    let data = tempfile::tempdir().unwrap();
    let job = job(data.path(), &text_file(data.path()), "", "");
    let fail = |sets: &[&str]| launch_fails(&job, sets);
    let e = fail(&["model.kind=\"mamba\""]);
    assert!(e.contains("unknown model kind `mamba`") && e.contains("kinds loaded: gpt, mlp"), "{e}");
    let e = fail(&["model.n_embd=30", "model.n_head=4"]);
    assert!(e.contains("model.n_embd") && e.contains("not divisible by n_head = 4"), "{e}");
    let e = fail(&["model.block_size=5000"]);
    assert!(e.contains("block_size longer than the validation split"), "{e}");
    let e = fail(&["model.n_layers=3"]);
    assert!(e.contains("unknown field `n_layers`"), "{e}");
    // One transformer block: three blocks in all (embeddings, h.0, head), not four stages.
    let e = launch_n_fails(4, &job, &["parallel.strategy=\"pipeline\"", "model.n_layer=1"]);
    assert!(e.contains("4 stages, but the model has only 3 blocks"), "{e}");
    let e = fail(&["data.dataset=\"digits\""]);
    assert!(e.contains("model.vocab_size") && e.contains("rows of features are not tokens"), "{e}");
    let e = fail(&["data.dataset=\"digits\"", "model.vocab_size=16"]);
    assert!(e.contains("do not fit") && e.contains("token windows"), "{e}");
}

/// A language model's runs speak of validation loss and tokens/s, a classifier's of
/// accuracy and samples/s: the last line of `sheaf run` and of `sheaf launch` alike.
#[test]
fn runs_report_the_measures_of_their_kind() {
    let data = tempfile::tempdir().unwrap();
    let job = job(data.path(), &text_file(data.path()), "", "");
    for args in [
        vec!["run".to_string(), job.display().to_string()],
        vec!["launch".into(), "-n".into(), "2".into(), job.display().to_string()],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.extend(["--set", "train.max_steps=3"]);
        let out = sheaf(&a, dir.path());
        ok(&out);
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or_default();
        assert!(last.contains("val_loss") && last.contains("tokens/s"), "{args:?}: {last}");
        assert!(!text.contains("accuracy") && !text.contains("samples/s"), "{args:?}: {text}");
        let s = crate::training::summary(dir.path());
        assert!(s["val_loss"].is_number() && s["tokens_per_sec"].is_number(), "{s}");
        assert!(s.get("test_accuracy").is_none(), "a language model's summary has no accuracy: {s}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = sheaf(&["run", "--set", "train.max_steps=3"], dir.path());
    ok(&out);
    let last = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string();
    assert!(last.contains("test accuracy") && last.contains("samples/s"), "{last}");
    // Without a terminal a progress line comes every SHEAF_PROGRESS_EVERY_S (10 s by
    // default; here every step), in the kind's rate.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(sheaf_tests::sheaf_bin())
        .args(["run", &job.display().to_string(), "--set", "train.max_steps=3", "--run-dir"])
        .arg(dir.path())
        .env("SHEAF_PROGRESS_EVERY_S", "0")
        .output()
        .unwrap();
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("step 3/3 (epoch 1/") && err.contains("tokens/s"), "{err}");
    assert!(!err.contains("samples/s"), "{err}");
}

/// `sheaf sample` continues a prompt with the trained model (given its checkpoint or
/// its run directory); greedy decoding is deterministic, characters outside the
/// vocabulary are refused, and a classifier's run is named as one.
#[test]
fn sample_prints_generated_text() {
    let data = tempfile::tempdir().unwrap();
    let job = job(data.path(), &text_file(data.path()), "", "");
    let run = launch(2, &job, &["train.max_steps=30"]);
    let ckpt = run.path().join("checkpoint.safetensors");
    let sample = |prompt: &str, extra: &[&str]| {
        let mut cmd = std::process::Command::new(sheaf_tests::sheaf_bin());
        cmd.arg("sample").arg(&ckpt).args(["--prompt", prompt, "--tokens", "40"]).args(extra);
        cmd.output().unwrap()
    };
    let a = sample("the king", &["--temperature", "0"]);
    ok(&a);
    let text = String::from_utf8_lossy(&a.stdout).to_string();
    assert!(text.starts_with("the king") && text.trim_end().chars().count() >= 40, "{text}");
    assert_eq!(a.stdout, sample("the king", &["--temperature", "0"]).stdout);
    // Sampling: a seed makes it repeatable, another seed another text; top-k 1 is
    // greedy decoding whatever the seed and temperature.
    let b = sample("the king", &["--top-k", "5", "--seed", "4"]);
    ok(&b);
    assert_eq!(b.stdout, sample("the king", &["--top-k", "5", "--seed", "4"]).stdout, "same seed, same text");
    let others: Vec<_> = (5..9)
        .map(|seed| sample("the king", &["--top-k", "5", "--seed", &seed.to_string()]).stdout)
        .collect();
    assert!(others.iter().any(|o| *o != b.stdout), "four other seeds all gave seed 4's text");
    assert_eq!(sample("the king", &["--top-k", "1", "--seed", "9", "--temperature", "1.5"]).stdout, a.stdout);
    let bad = sample("Zebra", &[]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not in the model's vocabulary"));
    // The run directory stands for its checkpoint.
    let by_dir = std::process::Command::new(sheaf_tests::sheaf_bin())
        .arg("sample")
        .arg(run.path())
        .args(["--prompt", "the king", "--tokens", "40", "--temperature", "0"])
        .output()
        .unwrap();
    assert_eq!(by_dir.stdout, a.stdout);
    // A classifier's run is named as such (exit 2), not as a missing vocabulary.
    let classifier = tempfile::tempdir().unwrap();
    crate::training::ok(&crate::training::sheaf(&["run", "--set", "train.max_steps=2"], classifier.path()));
    let out = std::process::Command::new(sheaf_tests::sheaf_bin())
        .arg("sample")
        .arg(classifier.path())
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(
        e.contains("trained a classifier") && e.contains("model kind `mlp`") && !e.contains("vocab"),
        "{e}"
    );
}
