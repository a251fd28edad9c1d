//! `sheaf plugin check PATH.so`: the conformance suite against one plugin library, the
//! tool a vendor runs on its own plugin. Every kind has laws, and no kind passes
//! without running them:
//! - transports run the collective laws in real processes (`sheaf check-collectives
//!   --plugin-file PATH`) at several world sizes;
//! - optimizers and partitioners run their laws in this process;
//! - compute backends: every model kind they list builds, initialises from the seed,
//!   has the loss's gradients (against finite differences) and cuts into pieces that
//!   give the whole model's loss and gradients;
//! - strategies train a small model at worlds of 1 and 2 real processes (`sheaf
//!   launch`, with the shipped plugins for the rest), each ending with the parameters
//!   of one process training on the whole batch (the shipped data-parallel strategy at
//!   a world of one).

use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use serde::Serialize;
use sheaf_core::PluginKind;
use sheaf_testkit::conformance;

use sheaf_plugins::{load_plugin, HostError, Registry, SearchDir};

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct CheckRow {
    pub kind: String,
    pub name: String,
    pub check: String,
    pub passed: bool,
    pub seconds: f64,
    pub detail: String,
}

fn transport_world(file: &Path, transport: &str, n: usize, cases: u64, seed: u64) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let port = sheaf_launch::free_port().map_err(|e| e.to_string())?;
    let threads = sheaf_launch::threads_per_worker(n);
    let children: Vec<_> = (0..n)
        .map(|rank| {
            sheaf_launch::local_worker(&exe, rank, n, port, threads)
                .arg("--plugin-file")
                .arg(file)
                .args(["check-collectives", "--transport", transport])
                .args(["--cases", &cases.to_string(), "--seed", &seed.to_string()])
                .env("SHEAF_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start rank {rank}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let mut errors = Vec::new();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned();
            errors.push(format!("rank {rank} ({}): {last}", out.status));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// The small job a strategy trains in its check: the digits shipped with Sheaf, a
/// two-layer perceptron, plain SGD, a few steps.
const STRATEGY_JOB: &str = r#"
seed = 5

[model]
layers = [64, 24, 10]

[data]
dataset = "digits"

[train]
epochs = 1
max_steps = 6
batch_size = 32
lr = 0.1
optimizer = "sgd"

[parallel]
strategy = "data-parallel"
"#;

/// The parameters a run left in `dir`, by tensor name.
fn trained(dir: &Path) -> Result<Vec<(String, Vec<f32>)>, String> {
    let file = sheaf_report::outputs::TensorFile::read(&dir.join("checkpoint.safetensors"))
        .map_err(|e| e.to_string())?;
    let mut names = file.names().map_err(|e| e.to_string())?;
    names.sort();
    names.into_iter().map(|n| Ok((n.clone(), file.f32s(&n, None).map_err(|e| e.to_string())?))).collect()
}

/// Strategy `strategy` from `file` trains [`STRATEGY_JOB`] at worlds of 1 and 2 (real
/// processes) to the parameters of the shipped data-parallel strategy at a world of 1,
/// within 1e-5 (the order of sums).
fn strategy_laws(file: &Path, strategy: &str) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let scratch = tempfile::tempdir().map_err(|e| format!("a scratch directory: {e}"))?;
    let plugins = scratch.path().join("plugins");
    std::fs::create_dir(&plugins).map_err(|e| e.to_string())?;
    let absolute = std::path::absolute(file).map_err(|e| e.to_string())?;
    std::os::unix::fs::symlink(&absolute, plugins.join(file.file_name().unwrap_or_default()))
        .map_err(|e| e.to_string())?;
    let job = scratch.path().join("job.toml");
    std::fs::write(&job, STRATEGY_JOB).map_err(|e| e.to_string())?;
    let run = |args: &[&str], dir: &str| -> Result<Vec<(String, Vec<f32>)>, String> {
        let run_dir = scratch.path().join(dir);
        let out = std::process::Command::new(&exe)
            .arg("--plugin-dir")
            .arg(&plugins)
            .args(args)
            .arg(&job)
            .arg("--run-dir")
            .arg(&run_dir)
            .args(["--threads-per-worker", "1"])
            .env("SHEAF_LOG", "warn")
            .env_remove(sheaf_plugins::PLUGIN_PATH_ENV)
            .env_remove("MASTER_PORT")
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned();
            return Err(format!("`sheaf {}` failed: {last}", args.join(" ")));
        }
        trained(&run_dir)
    };
    let reference = run(&["run"], "one-process")?;
    let set = format!("parallel.strategy=\"{strategy}\"");
    for n in ["1", "2"] {
        let got = run(&["launch", "-n", n, "--set", &set], &format!("world-{n}"))?;
        if got.iter().map(|(k, _)| k).ne(reference.iter().map(|(k, _)| k)) {
            return Err(format!("at a world of {n} the trained model's tensors are not the model's"));
        }
        let worst = got
            .iter()
            .zip(&reference)
            .flat_map(|((name, a), (_, b))| a.iter().zip(b).map(move |(x, y)| ((x - y).abs(), name)))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((d, name)) = worst.filter(|w| w.0 > 1e-5 || w.0.is_nan()) {
            return Err(format!(
                "at a world of {n}, `{name}` ends {d:e} from one process's (more than 1e-5)"
            ));
        }
    }
    Ok(())
}

/// Every check that applies to the plugin at `file`.
pub fn check(file: &Path, cases: u64, worlds: &[usize], seed: u64) -> Result<Vec<CheckRow>, HostError> {
    let plugin = load_plugin(file)?;
    let registry = Registry::load_files(
        vec![file.to_path_buf()],
        &[SearchDir {
            path: file.parent().unwrap_or(Path::new(".")).to_path_buf(),
            origin: sheaf_plugins::Origin::Flag,
        }],
    );
    let mut rows = Vec::new();
    let mut record =
        |kind: PluginKind, name: &str, check: String, start: Instant, result: Result<(), String>| {
            rows.push(CheckRow {
                kind: kind.name().into(),
                name: name.into(),
                check,
                passed: result.is_ok(),
                seconds: start.elapsed().as_secs_f64(),
                detail: result.err().unwrap_or_default(),
            })
        };
    for provided in &plugin.manifest.provides {
        let name = provided.name.as_str();
        match provided.kind {
            PluginKind::Transport => {
                for &n in worlds {
                    let start = Instant::now();
                    let r = transport_world(file, name, n, cases, seed);
                    record(
                        provided.kind,
                        name,
                        format!("collective laws, {n} processes, {cases} cases"),
                        start,
                        r,
                    );
                }
            }
            PluginKind::Optimizer => {
                let start = Instant::now();
                let r = (|| {
                    let make = || registry.optimizer(name, "{}").expect("checked below");
                    registry.optimizer(name, "{}").map_err(|e| e.to_string())?;
                    (0..20).try_for_each(|s| conformance::optimizer::check_all(&make, seed.wrapping_add(s)))
                })();
                record(
                    provided.kind,
                    name,
                    "resume, zero gradient, quadratic, bad input (20 seeds)".into(),
                    start,
                    r,
                );
            }
            PluginKind::DataPartitioner => {
                let start = Instant::now();
                let r = registry.data_partitioner(name, "{}").map_err(|e| e.to_string()).and_then(|p| {
                    [(0, 1, 0), (5, 8, 1), (1797, 2, 3), (1000, 7, 9), (100_000, 16, 2)]
                        .into_iter()
                        .try_for_each(|(n, world, epoch)| {
                            conformance::partitioner::check_data_partitioner(p.as_ref(), n, world, epoch)
                        })
                });
                record(provided.kind, name, "every index to exactly one rank, balanced".into(), start, r);
            }
            PluginKind::ModelPartitioner => {
                let start = Instant::now();
                let r = registry.model_partitioner(name, "{}").map_err(|e| e.to_string()).and_then(|p| {
                    (0..8).try_for_each(|stages| {
                        conformance::partitioner::check_model_partitioner(
                            p.as_ref(),
                            &[5, 1, 9, 2, 7, 7],
                            stages,
                        )
                    })
                });
                record(provided.kind, name, "contiguous, covering, non-empty stages".into(), start, r);
            }
            PluginKind::Compute => {
                let start = Instant::now();
                let r = registry
                    .compute(name, &sheaf_job::job::ComputeSection::default().config_json())
                    .map_err(|e| e.to_string())
                    .and_then(|backend| {
                        let kinds = backend.model_kinds();
                        let listed: Vec<&str> = plugin
                            .manifest
                            .provides
                            .iter()
                            .filter(|p| p.kind == PluginKind::Model)
                            .map(|p| p.name.as_str())
                            .collect();
                        if kinds.iter().map(String::as_str).collect::<Vec<_>>() != listed {
                            return Err(format!("model_kinds() says {kinds:?}, the manifest {listed:?}"));
                        }
                        kinds.iter().try_for_each(|k| {
                            let spec = conformance::compute::tiny_spec(k);
                            backend.describe(&spec).map_err(|e| format!("describe a small `{k}`: {e}"))?;
                            backend
                                .build_model(&spec, 0)
                                .map(drop)
                                .map_err(|e| format!("build a small `{k}`: {e}"))
                        })
                    });
                record(provided.kind, name, "builds every model kind it lists".into(), start, r);
            }
            PluginKind::Model => {
                let start = Instant::now();
                let compute = plugin.manifest.provides.iter().find(|p| p.kind == PluginKind::Compute);
                let r = match compute {
                    None => Err("a model kind from a library that provides no compute backend".into()),
                    Some(c) => registry
                        .compute(&c.name, &sheaf_job::job::ComputeSection::default().config_json())
                        .map_err(|e| e.to_string())
                        .and_then(|backend| {
                            let spec = conformance::compute::tiny_spec(name);
                            (0..3).try_for_each(|s| {
                                conformance::compute::check_all(backend.as_ref(), &spec, seed + s)
                            })
                        }),
                };
                record(
                    provided.kind,
                    name,
                    "seeded init, gradients, pieces, transformers layout".into(),
                    start,
                    r,
                );
            }
            PluginKind::Strategy => {
                let start = Instant::now();
                let r = strategy_laws(file, name);
                record(provided.kind, name, "worlds of 1 and 2 equal one process".into(), start, r);
            }
            // A kind this host has no laws for cannot pass: nothing was checked.
            other => {
                let start = Instant::now();
                let r = Err(format!("this host has no conformance suite for {other} plugins"));
                record(provided.kind, name, "no suite".into(), start, r);
            }
        }
    }
    Ok(rows)
}

/// The report as a table.
pub fn render(rows: &[CheckRow]) -> String {
    let mut out = format!("{:<18} {:<14} {:<46} {:>8}  RESULT\n", "KIND", "NAME", "CHECK", "SECONDS");
    for r in rows {
        out += &format!(
            "{:<18} {:<14} {:<46} {:>8.2}  {}\n",
            r.kind,
            r.name,
            r.check,
            r.seconds,
            if r.passed { "pass".to_string() } else { format!("FAIL: {}", r.detail) }
        );
    }
    out
}
