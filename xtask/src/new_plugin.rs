//! `cargo xtask new-plugin NAME --kind KIND [--path DIR] [--git URL]`: writes an
//! out-of-tree plugin crate, `sheaf-NAME`, that builds and passes `sheaf plugin check`
//! as generated. It depends on `sheaf-abi` and `sheaf-core` (a strategy also on
//! `sheaf-train`) by path into this checkout
//! (or from `--git URL`), which cargo resolves with this checkout's workspace settings,
//! so nothing of the workspace is copied; it carries this checkout's `Cargo.lock`, so
//! its dependencies are the versions this host was built with.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The kinds a crate can be generated for, and the component each writes.
const KINDS: &[(&str, &str)] = &[
    ("optimizer", OPTIMIZER),
    ("data-partitioner", DATA_PARTITIONER),
    ("model-partitioner", MODEL_PARTITIONER),
    ("strategy", STRATEGY),
];

pub fn new_plugin(root: &Path, args: &[String]) -> Result<()> {
    let usage =
        "usage: cargo xtask new-plugin NAME --kind <optimizer|data-partitioner|model-partitioner|strategy> \
                 [--path DIR] [--git URL]";
    let mut name = None;
    let (mut kind, mut path, mut git) = (None, None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kind" => kind = it.next().cloned(),
            "--path" => path = it.next().map(PathBuf::from),
            "--git" => git = it.next().cloned(),
            other if !other.starts_with('-') && name.is_none() => name = Some(other.to_owned()),
            other => bail!("new-plugin: unexpected `{other}`\n{usage}"),
        }
    }
    let (Some(name), Some(kind)) = (name, kind) else { bail!("{usage}") };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
        bail!("new-plugin: NAME `{name}` must be lowercase letters, digits and dashes");
    }
    let Some(&(_, body)) = KINDS.iter().find(|(k, _)| *k == kind) else {
        let kinds: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
        bail!(
            "new-plugin: no template for kind `{kind}` ({}); transports: write one against \
             include/sheaf_transport.h or start from plugins/sheaf-transport-shm; compute backends: start \
             from plugins/sheaf-compute-candle",
            kinds.join(", ")
        );
    };
    let krate = format!("sheaf-{name}");
    let dir = path.unwrap_or_else(|| root.join("..").join(&krate));
    if dir.join("Cargo.toml").exists() {
        bail!("new-plugin: {} already holds a crate", dir.display());
    }
    // Strategies also build on the training helpers every strategy shares.
    let mut names = vec!["sheaf-abi", "sheaf-core"];
    if kind == "strategy" {
        names.push("sheaf-train");
    }
    let deps: String = match &git {
        Some(url) => names.iter().map(|n| format!("{n} = {{ git = \"{url}\" }}\n")).collect(),
        None => {
            let crates = root.join("crates").canonicalize().context("the checkout's crates/")?;
            names.iter().map(|n| format!("{n} = {{ path = \"{}\" }}\n", crates.join(n).display())).collect()
        }
    };
    let lib = format!("lib{}.so", krate.replace('-', "_"));
    let fill = |t: &str| {
        t.replace("{{crate}}", &krate)
            .replace("{{name}}", &name)
            .replace("{{kind}}", &kind)
            .replace("{{lib}}", &lib)
    };
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("creating {}", dir.display()))?;
    let write = |file: &str, text: String| {
        std::fs::write(dir.join(file), text).with_context(|| format!("writing {}", dir.join(file).display()))
    };
    write("Cargo.toml", fill(MANIFEST).replace("{{deps}}", &deps))?;
    write("src/lib.rs", fill(body))?;
    write(".gitignore", "/target\n".into())?;
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).context("copying Cargo.lock")?;
    println!(
        "wrote {} ({kind} `{name}`)\nnext:\n  cd {0} && cargo build --release\n  sheaf plugin check \
         target/release/{lib}\n  see docs/plugins.md",
        dir.display()
    );
    Ok(())
}

const MANIFEST: &str = r#"[package]
name = "{{crate}}"
description = "A Sheaf plugin: the {{kind}} `{{name}}`"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
# A shared library the `sheaf` host loads at run time: {{lib}}, which `sheaf`
# finds beside itself or in a --plugin-dir.
crate-type = ["cdylib"]

[dependencies]
{{deps}}abi_stable = "0.11.3"
bytemuck = "1"
serde = { version = "1", features = ["derive"] }
serde_json = "1"

# A workspace of its own, wherever it is put.
[workspace]

# Panics in the plugin become errors naming it; `panic = "abort"` plugins are refused.
[profile.release]
panic = "unwind"
"#;

const OPTIMIZER: &str = r#"//! Sheaf plugin `{{crate}}`: the optimizer `{{name}}`, as `cargo xtask new-plugin` wrote
//! it: SGD with momentum. Replace the update rule in `step` with yours; `sheaf plugin
//! check` says whether it keeps the laws every optimizer must keep (docs/plugins.md).

use serde::Deserialize;
use sheaf_core::{Error, OptimState, Optimizer, Param, PluginKind, Provided, Result};

/// `lr` (the host always passes it) and the keys of `[train.options.{{name}}]`; an
/// unknown key is an error naming it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_lr")]
    lr: f64,
    #[serde(default)]
    momentum: f64,
}

fn default_lr() -> f64 {
    0.01
}

struct Momentum {
    config: Config,
    steps: u64,
    /// One buffer per parameter, by name, in the order first seen.
    velocity: Vec<(String, Vec<f32>)>,
}

impl Optimizer for Momentum {
    fn step(&mut self, params: &mut [Param<'_>]) -> Result<()> {
        // Check everything before changing anything.
        for p in params.iter() {
            if p.value.len() != p.grad.len() {
                return Err(Error::invalid(format!(
                    "parameter `{}`: {} values but {} gradients",
                    p.name,
                    p.value.len(),
                    p.grad.len()
                )));
            }
        }
        let (lr, mu) = (self.config.lr as f32, self.config.momentum as f32);
        for p in params.iter_mut() {
            let i = match self.velocity.iter().position(|(n, _)| n == p.name) {
                Some(i) => i,
                None => {
                    self.velocity.push((p.name.to_owned(), vec![0.0; p.value.len()]));
                    self.velocity.len() - 1
                }
            };
            let v = &mut self.velocity[i].1;
            for ((x, g), v) in p.value.iter_mut().zip(p.grad).zip(v.iter_mut()) {
                *v = mu * *v + g;
                *x -= lr * *v;
            }
        }
        self.steps += 1;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Everything a resumed run needs to continue bit for bit.
    fn state(&self) -> Result<OptimState> {
        let buffers = self.velocity.iter().map(|(n, v)| (format!("{n}.momentum_buffer"), v.clone())).collect();
        Ok(OptimState { step: self.steps, buffers })
    }

    fn load_state(&mut self, state: &OptimState) -> Result<()> {
        self.steps = state.step;
        self.velocity = state
            .buffers
            .iter()
            .map(|(n, v)| (n.strip_suffix(".momentum_buffer").unwrap_or(n).to_owned(), v.clone()))
            .collect();
        Ok(())
    }
}

pub struct Plugin;

impl sheaf_abi::Plugin for Plugin {
    const NAME: &'static str = "{{crate}}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn provides() -> Vec<Provided> {
        vec![Provided { kind: PluginKind::Optimizer, name: "{{name}}".into() }]
    }

    fn optimizer(_name: &str, config: &str) -> Result<Box<dyn Optimizer>> {
        let config: Config =
            serde_json::from_str(config).map_err(|e| Error::config("train.options.{{name}}", e))?;
        Ok(Box::new(Momentum { config, steps: 0, velocity: Vec::new() }))
    }
}

sheaf_abi::export_plugin!(Plugin);
"#;

const DATA_PARTITIONER: &str = r#"//! Sheaf plugin `{{crate}}`: the data partitioner `{{name}}`, as `cargo xtask new-plugin`
//! wrote it: rank r takes the r-th of `world` balanced blocks of each batch. Replace
//! `shard` with yours; `sheaf plugin check` says whether every index still goes to
//! exactly one rank, balanced (docs/plugins.md).

use serde::Deserialize;
use sheaf_core::{chunk_range, DataPartitioner, Error, PluginKind, Provided, Result};

/// The keys of `[data.partitioner_options]`: none yet; an unknown key is an error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {}

struct Blocks;

impl DataPartitioner for Blocks {
    fn shard(&self, _epoch: u64, num_samples: usize, rank: usize, world: usize) -> Result<Vec<usize>> {
        if world == 0 || rank >= world {
            return Err(Error::invalid(format!("rank {rank} of a world of {world}")));
        }
        Ok(chunk_range(num_samples, world, rank).collect())
    }
}

pub struct Plugin;

impl sheaf_abi::Plugin for Plugin {
    const NAME: &'static str = "{{crate}}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn provides() -> Vec<Provided> {
        vec![Provided { kind: PluginKind::DataPartitioner, name: "{{name}}".into() }]
    }

    fn data_partitioner(_name: &str, config: &str) -> Result<Box<dyn DataPartitioner>> {
        let _: Config =
            serde_json::from_str(config).map_err(|e| Error::config("data.partitioner_options", e))?;
        Ok(Box::new(Blocks))
    }
}

sheaf_abi::export_plugin!(Plugin);
"#;

const MODEL_PARTITIONER: &str = r#"//! Sheaf plugin `{{crate}}`: the model partitioner `{{name}}`, as `cargo xtask new-plugin`
//! wrote it: cuts layers into stages of about equal cost, greedily. Replace `cut` with
//! yours; `sheaf plugin check` says whether stages stay contiguous, covering and
//! non-empty (docs/plugins.md).

use std::ops::Range;

use serde::Deserialize;
use sheaf_core::{Error, ModelPartitioner, PluginKind, Provided, Result};

/// The keys of `[parallel.partitioner_options]`: none yet; an unknown key is an error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {}

struct Greedy;

impl ModelPartitioner for Greedy {
    fn cut(&self, costs: &[u64], stages: usize) -> Result<Vec<Range<usize>>> {
        let layers = costs.len();
        if stages == 0 || stages > layers {
            return Err(Error::invalid(format!("{stages} stages of a model of {layers} layers")));
        }
        let total: u64 = costs.iter().sum();
        let mut out = Vec::with_capacity(stages);
        let (mut start, mut acc) = (0, 0u64);
        for (i, &c) in costs.iter().enumerate() {
            acc += c;
            let done = out.len() + 1;
            // Close a stage at its share of the cost, leaving a layer for each stage left.
            let left_layers = layers - i - 1;
            let left_stages = stages - done;
            if done < stages && (acc * stages as u64 >= total * done as u64 || left_layers == left_stages) {
                out.push(start..i + 1);
                start = i + 1;
            }
        }
        out.push(start..layers);
        Ok(out)
    }
}

pub struct Plugin;

impl sheaf_abi::Plugin for Plugin {
    const NAME: &'static str = "{{crate}}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn provides() -> Vec<Provided> {
        vec![Provided { kind: PluginKind::ModelPartitioner, name: "{{name}}".into() }]
    }

    fn model_partitioner(_name: &str, config: &str) -> Result<Box<dyn ModelPartitioner>> {
        let _: Config =
            serde_json::from_str(config).map_err(|e| Error::config("parallel.partitioner_options", e))?;
        Ok(Box::new(Greedy))
    }
}

sheaf_abi::export_plugin!(Plugin);
"#;

const STRATEGY: &str = r#"//! Sheaf plugin `{{crate}}`: the strategy `{{name}}`, as `cargo xtask new-plugin` wrote
//! it: plain data parallelism. Every rank holds the whole model, computes the gradient
//! of its shard of each global batch, and the ranks sum the gradients weighted by their
//! shares, so every rank steps with the gradient of the whole batch. Replace `train`
//! with yours; `sheaf plugin check` says whether worlds of 1 and 2 still end where one
//! process does (docs/plugins.md).

use std::time::{Duration, Instant};

use serde::Deserialize;
use sheaf_core::{DType, Deadline, Error, PlanInput, PluginKind, Provided, ReduceOp, Result, StepMetrics, Strategy, StrategyPlan, TrainContext, TrainSummary};
use sheaf_train::{epochs_done, global_batches, test_totals};

/// The host's `timeout_ms` and `data`, and the keys of `[parallel.options.{{name}}]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
    #[serde(default)]
    data: Option<usize>,
}

fn default_timeout() -> u64 {
    60_000
}

struct Replicas {
    config: Config,
}

impl Replicas {
    fn deadline(&self) -> Deadline {
        Deadline::after(Duration::from_millis(self.config.timeout_ms))
    }
}

impl Strategy for Replicas {
    fn name(&self) -> &str {
        "{{name}}"
    }

    /// A whole replica on every rank.
    fn plan(&self, input: &PlanInput<'_>) -> Result<StrategyPlan> {
        Ok(StrategyPlan::replicas(input.world, input.blocks.len(), input.batch_size))
    }

    fn train(&mut self, ctx: TrainContext<'_>) -> Result<TrainSummary> {
        let TrainContext { config, comm, model, optimizer, partitioner, train, test, metrics, .. } = ctx;
        // Gradient clipping, accumulation, checkpoints...: say so rather than ignore them.
        config.refuse_beyond_basics("{{name}}")?;
        let (rank, world) = (comm.rank(), comm.world_size());
        let layout = model.layout().clone();
        let mut params = vec![0f32; layout.total()];
        model.read_params(&mut params)?;
        // Every replica starts from rank 0's parameters.
        comm.broadcast(bytemuck::cast_slice_mut(&mut params), 0, self.deadline())?;
        model.write_params(&params)?;
        let total_steps = config.total_steps(train.len());
        let start = Instant::now();
        let mut grads = vec![0f32; layout.total()];
        let (mut step, mut samples, mut last_loss) = (0u64, 0usize, f64::NAN);
        for (epoch, global) in global_batches(train.len(), &config) {
            let t0 = Instant::now();
            let mine: Vec<usize> =
                partitioner.shard(step, global.len(), rank, world)?.into_iter().map(|i| global[i]).collect();
            let share = mine.len() as f32 / global.len() as f32;
            let loss = if mine.is_empty() {
                grads.fill(0.0);
                0.0
            } else {
                model.forward_backward(&train.gather(&mine)?.batch(), &mut grads)?
            };
            // The whole batch's mean gradient: each rank's mean, weighted by its share.
            grads.iter_mut().for_each(|g| *g *= share);
            comm.allreduce(bytemuck::cast_slice_mut(&mut grads), DType::F32, ReduceOp::Sum, self.deadline())?;
            optimizer.set_learning_rate(config.lr.at(step, total_steps));
            optimizer.step(&mut layout.params(&mut params, &grads))?;
            model.write_params(&params)?;
            step += 1;
            let mut mean = [f64::from(loss) * f64::from(share)];
            comm.allreduce(bytemuck::cast_slice_mut(&mut mean), DType::F64, ReduceOp::Sum, self.deadline())?;
            last_loss = mean[0];
            samples += global.len();
            metrics.record(&StepMetrics {
                step,
                epoch,
                loss: last_loss,
                lr: optimizer.learning_rate(),
                samples_per_sec: global.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9),
                grad_norm: f64::NAN,
                val_loss: None,
            });
        }
        let wall = start.elapsed().as_secs_f64();
        let shard = partitioner.shard(0, test.len(), rank, world)?;
        let totals = sheaf_train::evaluate_indices(model, test, &shard, config.batch_size)?;
        let (test_accuracy, test_loss) = test_totals(comm, totals, self.deadline())?;
        Ok(TrainSummary {
            epochs: epochs_done(step, train.len(), &config),
            steps: step,
            final_loss: last_loss,
            test_accuracy,
            test_loss,
            samples_per_sec: samples as f64 / wall.max(1e-9),
            wall_seconds: wall,
            peak_activation_bytes: 0,
            busy_seconds: 0.0,
            idle_seconds: 0.0,
            optimizer_state_bytes_per_rank: sheaf_train::optimizer_state_bytes(optimizer)?,
            gradient_bytes_per_rank: None,
        })
    }
}

pub struct Plugin;

impl sheaf_abi::Plugin for Plugin {
    const NAME: &'static str = "{{crate}}";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn provides() -> Vec<Provided> {
        vec![Provided { kind: PluginKind::Strategy, name: "{{name}}".into() }]
    }

    fn strategy(_name: &str, config: &str) -> Result<Box<dyn Strategy>> {
        let config: Config =
            serde_json::from_str(config).map_err(|e| Error::config("parallel.options.{{name}}", e))?;
        if config.data.is_some_and(|d| d == 0) {
            return Err(Error::config("parallel.data", "must be at least 1"));
        }
        Ok(Box::new(Replicas { config }))
    }
}

sheaf_abi::export_plugin!(Plugin);
"#;
