//! The `sheaf` command line: parsing and dispatch. The binary only sets up logging
//! and maps errors to exit codes.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use sheaf_plugins::{search_dirs, HostError, PluginInfo, Registry, PLUGIN_PATH_ENV};

#[derive(Debug, Parser)]
#[command(
    name = "sheaf",
    version,
    about = "Sheaf: distributed training with pluggable transports and strategies"
)]
pub struct Cli {
    /// Also look for plugins in DIR (before SHEAF_PLUGIN_PATH and the executable's directory).
    #[arg(long = "plugin-dir", value_name = "DIR", global = true)]
    pub plugin_dirs: Vec<PathBuf>,
    /// Load only this plugin library (used by `sheaf plugin check` for its workers).
    #[arg(long = "plugin-file", value_name = "FILE", global = true, hide = true)]
    pub plugin_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by `run` and `launch`.
#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    /// The job file (TOML). Without one, the built-in default job (examples/digits.toml).
    pub job: Option<PathBuf>,
    /// Override a job key with a TOML value, e.g. --set train.lr=0.1 --set 'train.optimizer="adamw"'.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Where the run's outputs go (default: runs/<timestamp>).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Compute threads per worker (default: the cores divided among the workers).
    #[arg(long, value_name = "T")]
    pub threads_per_worker: Option<usize>,
    /// Start from this checkpoint (a checkpoint.safetensors any run wrote, under any
    /// strategy or world size).
    #[arg(long, value_name = "FILE")]
    pub init_from: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its newest checkpoint (parameters, optimizer
    /// state, step, data position), with its job (RUN_DIR/job.toml) unless a job file
    /// is given; --set still applies. Same world size and strategy. (--init-from then
    /// counts only while the run has no checkpoint yet.)
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
}

impl JobArgs {
    /// The job file, the run directory and whether the run is resumed.
    pub fn resolve(&self) -> Result<(Option<PathBuf>, PathBuf, bool), HostError> {
        let Some(dir) = &self.resume else {
            let run_dir = self.run_dir.clone().unwrap_or_else(sheaf_launch::default_run_dir);
            return Ok((self.job.clone(), run_dir, false));
        };
        if self.run_dir.as_ref().is_some_and(|r| r != dir) {
            return Err(HostError::Usage(format!(
                "--resume {} and --run-dir {}: a resumed run writes into the directory it resumes",
                dir.display(),
                self.run_dir.as_ref().expect("some").display()
            )));
        }
        let job = match &self.job {
            Some(j) => j.clone(),
            None => {
                let j = dir.join("job.toml");
                if !j.is_file() {
                    return Err(HostError::Usage(format!(
                        "--resume {}: no job.toml there (not a run directory?)",
                        dir.display()
                    )));
                }
                j
            }
        };
        Ok((Some(job), dir.clone(), true))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one worker; its rank and world come from the launcher's environment
    /// (torchrun, SLURM, Open MPI, MPICH, Kubernetes: see below), a world of one when
    /// none set it.
    #[command(after_help = sheaf_runtime::world::HELP)]
    Run(JobArgs),
    /// Start N local worker processes and wait for them.
    Launch {
        /// Workers on this host.
        #[arg(short = 'n', long = "nproc-per-node", visible_alias = "nproc", value_name = "N")]
        workers: usize,
        /// Hosts in the job, one launcher each (torchrun's flag).
        #[arg(long, value_name = "M", default_value_t = 1)]
        nnodes: usize,
        /// This host's place among them, from 0; its workers are ranks R*N .. R*N+N-1.
        #[arg(long, value_name = "R", default_value_t = 0)]
        node_rank: usize,
        /// Where rank 0 (on node 0) meets the others.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
        master_addr: String,
        /// The rendezvous port (default: a free one, on one host only).
        #[arg(long, value_name = "PORT")]
        master_port: Option<u16>,
        /// The address this host's workers are reached at (default: each worker's
        /// address on the route to the master).
        #[arg(long, value_name = "ADDR")]
        advertise_addr: Option<String>,
        #[command(flatten)]
        job: JobArgs,
        /// When a worker dies, stop the others and start the world again from the
        /// newest checkpoint (train.checkpoint_every), at most K times.
        #[arg(long, value_name = "K", default_value_t = 0)]
        max_restarts: usize,
        /// Seconds workers get to stop after the launcher forwards SIGINT or SIGTERM,
        /// before they are killed.
        #[arg(long, value_name = "S", default_value_t = 10.0)]
        grace_s: f64,
    },
    /// Check a world before training: run as every rank, under any launcher (as
    /// `sheaf run`). Every rank's memory plan against the budget, an N x N matrix of
    /// round trips, and allreduce and compute probes naming slow ranks; rank 0 prints
    /// the report, and every rank exits non-zero on a problem.
    #[command(after_help = sheaf_runtime::world::HELP)]
    Doctor {
        /// The job file (TOML); without one, the default job.
        job: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// A rank slower than the median by more than this factor is a problem.
        #[arg(long, value_name = "X", default_value_t = 2.0)]
        slow_factor: f64,
        /// Start N local ranks of the doctor with the secret and addresses filled in,
        /// as `sheaf launch -n N` starts workers (without it: this process is one rank,
        /// placed by its launcher's variables).
        #[arg(short = 'n', long = "nproc", value_name = "N")]
        workers: Option<usize>,
    },
    /// Print the job's layout over N ranks and what each rank is planned to hold, by
    /// part (parameters, gradients, optimizer state, activations, communication),
    /// against `compute.memory_limit_mb` and this host's available memory, without
    /// starting a world. Exits non-zero when a rank does not fit.
    Plan {
        /// The job file (TOML); without one, the default job.
        job: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Ranks in the world.
        #[arg(short = 'n', long = "nproc", value_name = "N", default_value_t = 1)]
        workers: usize,
        /// Print JSON (a list of every rank's parts) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure collectives or point-to-point over a transport, in real processes.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Tools for plugin authors.
    Plugin {
        #[command(subcommand)]
        what: PluginWhat,
    },
    /// One rank of `sheaf bench` (started by it).
    #[command(hide = true)]
    BenchWorker { spec: String },
    /// Run the collective conformance laws over a transport plugin in this process's
    /// rank of a world set up as for `run` (used by the end-to-end tests).
    #[command(hide = true)]
    CheckCollectives {
        #[arg(long, default_value = "zmq-tcp")]
        transport: String,
        #[arg(long, default_value_t = 20)]
        cases: u64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 10_000)]
        max_len: usize,
    },
    /// Print text generated by a trained language model: the run's checkpoint, with
    /// its job (summary.json) and vocabulary (vocab.json) read from beside it.
    Sample {
        /// A checkpoint.safetensors a run wrote.
        checkpoint: PathBuf,
        /// The text to continue.
        #[arg(long, default_value = "\n")]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 200)]
        tokens: usize,
        /// Divide the logits by this before sampling (0: always the likeliest token).
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Sample among the K likeliest tokens only.
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// List every plugin library found, with its kinds, versions and whether it loads.
    Plugins {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PluginWhat {
    /// Run the conformance suite against a plugin library: transports in real
    /// processes at several world sizes, optimizers and partitioners in-process.
    /// Prints a pass/fail table; exits non-zero if anything fails.
    Check {
        /// The plugin library (`.so`).
        file: PathBuf,
        /// Generated collective cases per world size.
        #[arg(long, default_value_t = 12)]
        cases: u64,
        /// World sizes to run transports at.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
        worlds: Vec<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// nccl-tests-style rows for one collective over a range of sizes.
    Collectives {
        #[arg(long, default_value = "allreduce", value_parser = ["allreduce", "broadcast", "allgather", "reduce-scatter", "all-to-all"])]
        op: String,
        #[arg(short = 'n', default_value_t = 2)]
        workers: usize,
        #[command(flatten)]
        common: BenchArgs,
    },
    /// One-way bandwidth and round-trip latency between two ranks, and memcpy bandwidth.
    P2p {
        #[command(flatten)]
        common: BenchArgs,
    },
    /// Train a job several times and report the median samples/s (tokens/s for token
    /// data) of the runs, each run's directory kept under --run-dir.
    Train {
        #[arg(short = 'n', long = "nproc", default_value_t = 1)]
        workers: usize,
        /// Runs to take the median of.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        job: JobArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "zmq-tcp")]
    pub transport: String,
    #[arg(long, default_value_t = 4096)]
    pub min_bytes: usize,
    #[arg(long, default_value_t = 64 << 20)]
    pub max_bytes: usize,
    /// Timed runs per size, at least; small sizes run more, about 30 ms each.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Allreduce algorithm: auto (by size), ring, halving-doubling, direct.
    #[arg(long, default_value = "auto")]
    pub algorithm: String,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl Cli {
    /// The plugins on this invocation's search path.
    /// The plugins for running `job`: [`Cli::registry`] with the job's choices among
    /// libraries that provide the same component (`[plugins.<kind>]`).
    pub fn registry_for(&self, job: &sheaf_job::job::Job) -> Registry {
        let mut registry = self.registry();
        registry.choose(&job.plugins);
        registry
    }

    pub fn registry(&self) -> Registry {
        if let Some(file) = &self.plugin_file {
            let dir = file.parent().map(|d| d.to_path_buf()).unwrap_or_default();
            return Registry::load_files(
                vec![file.clone()],
                &[sheaf_plugins::SearchDir { path: dir, origin: sheaf_plugins::Origin::Flag }],
            );
        }
        let env = std::env::var(PLUGIN_PATH_ENV).ok();
        let exe = std::env::current_exe().ok();
        Registry::load(&search_dirs(&self.plugin_dirs, env.as_deref(), exe.as_deref()))
    }
}

/// Checks `job` and its layout over `workers` ranks (so a bad one fails once, before
/// any worker starts), then starts the workers writing to `run_dir` and waits.
fn launch_job(
    cli: &Cli,
    workers: usize,
    job: &JobArgs,
    run_dir: &std::path::Path,
    workers_to_stderr: bool,
    supervision: (usize, f64),
    nodes: sheaf_launch::Nodes,
) -> Result<(), HostError> {
    let (max_restarts, grace_s) = supervision;
    if workers == 0 {
        return Err(HostError::Usage(
            "-n 0: a world needs at least one worker on each host; give -n N (--nproc-per-node) with N >= 1"
                .into(),
        ));
    }
    nodes.check(max_restarts)?;
    if !(grace_s.is_finite() && grace_s >= 0.0) {
        return Err(HostError::Usage(format!("--grace-s {grace_s}: not a number of seconds")));
    }
    let (job_file, _, resume) = job.resolve()?;
    if !resume && sheaf_checkpoint::checkpoint::holds_a_run(run_dir) {
        return Err(HostError::Usage(format!(
            "{} already holds a run: continue it with --resume {0}, or choose another --run-dir",
            run_dir.display()
        )));
    }
    let mut parsed = sheaf_job::job::load_job(job_file.as_deref(), &job.overrides)?;
    parsed.transport.resolve(nodes.nnodes > 1);
    let registry = cli.registry_for(&parsed);
    // The transports the workers will ask for, found here so that a job naming one no
    // plugin provides fails once, before any worker starts.
    let transports = match parsed.transport.plugin() {
        "auto" => vec!["zmq-tcp", "shm"],
        one => vec![one],
    };
    for t in transports {
        registry.provider(sheaf_core::PluginKind::Transport, t)?;
    }
    let mut worker_args: Vec<String> = Vec::new();
    let compute = registry.compute(&parsed.compute.backend, &parsed.compute.config_json())?;
    let data = sheaf_job::data::load(&parsed, &registry, compute.as_ref())?;
    if parsed.parallel.balance == "time" && parsed.parallel.layer_costs.is_none() {
        // Measured once here, so that every worker cuts the model the same way.
        let costs = sheaf_job::plan::measure_layer_costs(&parsed, compute.as_ref(), &data)?;
        eprintln!("[launch] measured layer costs (ns): {costs:?}");
        parsed.parallel.layer_costs = Some(costs);
    }
    let (_, plan) = sheaf_job::plan::strategy_and_plan(
        &parsed,
        workers * nodes.nnodes,
        &registry,
        compute.as_ref(),
        &data,
    )?;
    drop(data);
    // This host's ranks against the memory it has: each needs its plan and about what
    // this launcher holds now (the same plugins and dataset) as its own baseline.
    let mine = nodes.node_rank * workers..(nodes.node_rank + 1) * workers;
    let local: Vec<_> = mine.map(|r| sheaf_job::memory::planned(&parsed, &plan, r)).collect();
    sheaf_job::memory::check_host(&local, sheaf_job::memory::peak_rss_bytes())?;
    if let Some(f) = &job.init_from {
        if !f.is_file() {
            return Err(HostError::Data(format!("--init-from {}: no such file", f.display())));
        }
        worker_args.push("--init-from".into());
        worker_args.push(std::path::absolute(f).unwrap_or_else(|_| f.clone()).display().to_string());
    }
    // The resolved job (overrides and measured costs in it) is what every worker,
    // and every restart of the world, reads.
    std::fs::create_dir_all(run_dir).map_err(|e| HostError::Output(format!("{}: {e}", run_dir.display())))?;
    sheaf_checkpoint::checkpoint::write_job(run_dir, &parsed)?;
    worker_args.push(run_dir.join("job.toml").display().to_string());
    if resume {
        worker_args.push("--resume".into());
        worker_args.push(run_dir.display().to_string());
    }
    for d in &cli.plugin_dirs {
        worker_args.push("--plugin-dir".into());
        worker_args.push(d.display().to_string());
    }
    sheaf_launch::launch(&sheaf_launch::LaunchOptions {
        workers,
        worker_args,
        run_dir: run_dir.to_path_buf(),
        threads_per_worker: job.threads_per_worker,
        workers_to_stderr,
        resume: false,
        max_restarts,
        grace: std::time::Duration::from_secs_f64(grace_s),
        nodes,
    })
}

/// The log file of a `sheaf run` rank started by another launcher (srun, mpirun, a
/// Kubernetes Job): `RUN_DIR/logs/rank-N.log`, opened to append (a resumed run adds to
/// it), as `sheaf launch` writes for its workers. Only for a world of more than one,
/// and for ranks other than 0 only with `--run-dir` or `--resume` (each rank's default
/// directory would be its own). `None` otherwise, or when the directory cannot be made
/// (the run itself reports that).
pub fn worker_log(cli: &Cli) -> Option<std::fs::File> {
    let Command::Run(args) = &cli.command else { return None };
    if std::env::var_os(sheaf_launch::LAUNCH_COMMAND_ENV).is_some() {
        return None;
    }
    let env = sheaf_runtime::worker::WorkerEnv::from_env().ok()?;
    let explicit = args.run_dir.is_some() || args.resume.is_some();
    if env.world_size < 2 || !(explicit || env.rank == 0) {
        return None;
    }
    let (_, run_dir, _) = args.resolve().ok()?;
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs).ok()?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(format!("rank-{}.log", env.rank)))
        .ok()
}

/// Runs a parsed command line, writing results to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), HostError> {
    match &cli.command {
        Command::Run(args) => {
            if let Some(t) = args.threads_per_worker {
                // Before the first tensor operation: candle reads these once.
                std::env::set_var("RAYON_NUM_THREADS", t.to_string());
                std::env::set_var("CANDLE_NUM_THREADS", t.to_string());
            }
            let (job_file, run_dir, resume) = args.resolve()?;
            let mut job = sheaf_job::job::load_job(job_file.as_deref(), &args.overrides)?;
            let env = sheaf_runtime::worker::WorkerEnv::from_env()?;
            job.transport.resolve(env.spans_hosts);
            let opts = sheaf_runtime::worker::RunOptions {
                run_dir: Some(run_dir),
                env,
                progress: sheaf_runtime::worker::RunOptions::progress_default(),
                init_from: args.init_from.clone(),
                resume,
            };
            let registry = cli.registry_for(&job);
            sheaf_runtime::worker::run_worker(&job, &registry, &opts)?;
            if opts.env.rank == 0 {
                let dir = opts.run_dir.as_ref().expect("set above");
                writeln!(out, "{}", sheaf_report::outputs::outcome(dir))
                    .map_err(|e| HostError::Usage(format!("cannot write output: {e}")))?;
            }
            Ok(())
        }
        Command::Launch {
            workers,
            job,
            max_restarts,
            grace_s,
            nnodes,
            node_rank,
            master_addr,
            master_port,
            advertise_addr,
        } => {
            let (_, run_dir, _) = job.resolve()?;
            let nodes = sheaf_launch::Nodes {
                nnodes: *nnodes,
                node_rank: *node_rank,
                master_addr: master_addr.clone(),
                master_port: *master_port,
                advertise_addr: advertise_addr.clone(),
            };
            launch_job(&cli, *workers, job, &run_dir, false, (*max_restarts, *grace_s), nodes)?;
            if *node_rank > 0 {
                return writeln!(
                    out,
                    "node {node_rank}: {workers} workers done; rank 0 writes the outputs on node 0"
                )
                .map_err(|e| HostError::Usage(format!("cannot write output: {e}")));
            }
            writeln!(out, "{workers} workers: {}", sheaf_report::outputs::outcome(&run_dir))
                .map_err(|e| HostError::Usage(format!("cannot write output: {e}")))
        }
        Command::Plan { job, overrides, workers, json } => {
            let job = sheaf_job::job::load_job(job.as_deref(), overrides)?;
            if *workers == 0 {
                return Err(HostError::Usage("-n 0: a world needs at least one rank".into()));
            }
            let registry = cli.registry_for(&job);
            let compute = registry.compute(&job.compute.backend, &job.compute.config_json())?;
            let data = sheaf_job::data::load(&job, &registry, compute.as_ref())?;
            // The budget is checked below, after the table is printed.
            let mut unbounded = job.clone();
            unbounded.compute.memory_limit_mb = None;
            let (_, plan) =
                sheaf_job::plan::strategy_and_plan(&unbounded, *workers, &registry, compute.as_ref(), &data)?;
            let rows: Vec<_> = (0..*workers).map(|r| sheaf_job::memory::planned(&job, &plan, r)).collect();
            let text = if *json {
                serde_json::to_string_pretty(&rows).map_err(|e| HostError::Usage(e.to_string()))? + "\n"
            } else {
                format!(
                    "{} over {workers} ranks, {} parameters\n{}",
                    job.parallel.strategy,
                    plan.info.layout.total(),
                    sheaf_job::memory::table(&rows)
                )
            };
            out.write_all(text.as_bytes())
                .map_err(|e| HostError::Usage(format!("cannot write output: {e}")))?;
            sheaf_job::plan::check_memory(&job, &plan)?;
            sheaf_job::memory::check_host(&rows, sheaf_job::memory::peak_rss_bytes())
        }
        Command::Sample { checkpoint, prompt, tokens, temperature, top_k, seed } => {
            let text = sheaf_runtime::sample::sample(
                &cli.registry(),
                checkpoint,
                &sheaf_runtime::sample::SampleOptions {
                    prompt: prompt.clone(),
                    tokens: *tokens,
                    temperature: *temperature,
                    top_k: *top_k,
                    seed: *seed,
                },
            )?;
            writeln!(out, "{text}").map_err(|e| HostError::Usage(format!("cannot write output: {e}")))
        }
        Command::Bench { what: BenchWhat::Train { workers, runs, json, job } } => {
            if *runs == 0 || *workers == 0 {
                return Err(HostError::Usage("bench train: need --runs >= 1 and -n >= 1".into()));
            }
            let base = job.run_dir.clone().unwrap_or_else(sheaf_launch::default_run_dir);
            let mut rows = Vec::new();
            for k in 0..*runs {
                let dir = base.join(format!("run-{k}"));
                launch_job(&cli, *workers, job, &dir, true, (0, 10.0), sheaf_launch::Nodes::single())?;
                let path = dir.join("summary.json");
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| HostError::Output(format!("{}: {e}", path.display())))?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| HostError::Output(format!("{}: {e}", path.display())))?;
                rows.push(v);
            }
            let report =
                sheaf_conformance::bench::train_report(&rows, *workers, job.threads_per_worker, &base);
            let written = if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report).expect("report serialises"))
            } else {
                sheaf_conformance::bench::render_train(&report, out)
            };
            written.map_err(|e| HostError::Usage(format!("cannot write output: {e}")))
        }
        Command::Bench { what } => {
            let (op, workers, common) = match what {
                BenchWhat::Collectives { op, workers, common } => (op.clone(), *workers, common),
                BenchWhat::P2p { common } => ("p2p".to_string(), 2, common),
                BenchWhat::Train { .. } => {
                    return Err(HostError::Usage("bench train is handled above".into()));
                }
            };
            common.algorithm.parse::<sheaf_collectives::Algorithm>().map_err(HostError::Usage)?;
            if common.min_bytes > common.max_bytes || common.iters == 0 {
                return Err(HostError::Usage(
                    "bench: need --min-bytes <= --max-bytes and --iters >= 1".into(),
                ));
            }
            let spec = sheaf_conformance::bench::BenchSpec {
                op,
                transport: common.transport.clone(),
                min_bytes: common.min_bytes,
                max_bytes: common.max_bytes,
                iters: common.iters,
                algorithm: common.algorithm.clone(),
            };
            let rows = sheaf_conformance::bench::bench(&spec, workers, &cli.plugin_dirs)?;
            let written = if common.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&rows).expect("rows serialise"))
            } else {
                sheaf_conformance::bench::render(&rows, out)
            };
            written.map_err(|e| HostError::Usage(format!("cannot write output: {e}")))
        }
        Command::Plugin { what: PluginWhat::Check { file, cases, worlds, seed, json } } => {
            let rows = sheaf_conformance::plugin_check::check(file, *cases, worlds, *seed)?;
            let text = if *json {
                serde_json::to_string_pretty(&rows).expect("rows serialise") + "\n"
            } else {
                sheaf_conformance::plugin_check::render(&rows)
            };
            out.write_all(text.as_bytes())
                .map_err(|e| HostError::Usage(format!("cannot write output: {e}")))?;
            let failed = rows.iter().filter(|r| !r.passed).count();
            if failed > 0 {
                return Err(HostError::Check(format!(
                    "{failed} of {} conformance checks failed",
                    rows.len()
                )));
            }
            Ok(())
        }
        Command::Doctor { job: file, overrides, slow_factor, workers: Some(n) } => {
            sheaf_doctor::doctor::local(&cli.plugin_dirs, file.as_deref(), overrides, *slow_factor, *n)
        }
        Command::Doctor { job, overrides, slow_factor, workers: None } => {
            let mut job = sheaf_job::job::load_job(job.as_deref(), overrides)?;
            let env = sheaf_runtime::worker::WorkerEnv::from_env()?;
            job.transport.resolve(env.spans_hosts);
            let registry = cli.registry_for(&job);
            sheaf_doctor::doctor::doctor(&job, &registry, &env, *slow_factor, out)
        }
        Command::BenchWorker { spec } => {
            let spec: sheaf_conformance::bench::BenchSpec = serde_json::from_str(spec)
                .map_err(|e| HostError::Usage(format!("bench-worker spec: {e}")))?;
            let env = sheaf_runtime::worker::WorkerEnv::from_env()?;
            let rows = sheaf_conformance::bench::bench_worker(&cli.registry(), &env, &spec)?;
            if env.rank == 0 {
                writeln!(out, "{}", serde_json::to_string(&rows).expect("rows serialise"))
                    .map_err(|e| HostError::Usage(format!("cannot write output: {e}")))?;
            }
            Ok(())
        }
        Command::CheckCollectives { transport, cases, seed, max_len } => {
            let env = sheaf_runtime::worker::WorkerEnv::from_env()?;
            let passed = sheaf_doctor::selftest::check_collectives(
                &cli.registry(),
                &env,
                transport,
                *cases,
                *seed,
                *max_len,
            )?;
            writeln!(out, "rank {}: {passed} cases passed", env.rank)
                .map_err(|e| HostError::Usage(format!("cannot write output: {e}")))
        }
        Command::Plugins { json } => {
            let registry = cli.registry();
            let rows = registry.listing();
            let text = if *json {
                serde_json::to_string_pretty(&rows).map_err(|e| HostError::Usage(e.to_string()))? + "\n"
            } else {
                render_table(&rows)
            };
            out.write_all(text.as_bytes())
                .map_err(|e| HostError::Usage(format!("cannot write output: {e}")))?;
            // The listing is printed either way; a library that failed, or a component
            // two libraries provide, is a problem for the exit code.
            let (failed, conflicts) = (registry.failed.len(), registry.conflicts().len());
            if failed + conflicts > 0 {
                return Err(HostError::Check(format!(
                    "{failed} plugin librar{} failed to load, {conflicts} component(s) provided by more than one",
                    if failed == 1 { "y" } else { "ies" }
                )));
            }
            Ok(())
        }
    }
}

/// `["optimizer:sgd", "optimizer:adamw"]` as `optimizer(sgd,adamw)`.
fn group_provides(provides: &[String]) -> String {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for p in provides {
        let (kind, name) = p.split_once(':').unwrap_or((p, ""));
        match groups.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, names)) => names.push(name),
            None => groups.push((kind, vec![name])),
        }
    }
    groups.iter().map(|(k, n)| format!("{k}({})", n.join(","))).collect::<Vec<_>>().join(" ")
}

/// `sheaf plugins` as a table: one line per library, errors on their own lines; then
/// the files not tried, each with the reason.
pub fn render_table(all: &[PluginInfo]) -> String {
    let (skipped, rows): (Vec<&PluginInfo>, Vec<&PluginInfo>) = all.iter().partition(|r| r.skipped.is_some());
    let dash = || "-".to_owned();
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone().unwrap_or_else(dash),
                if r.provides.is_empty() { dash() } else { group_provides(&r.provides) },
                r.version.clone().unwrap_or_else(dash),
                r.abi_version.clone().unwrap_or_else(dash),
                match (r.ok, &r.skipped, r.conflicts.is_empty()) {
                    (true, _, true) => "ok".into(),
                    (true, _, false) => "conflict".into(),
                    (false, Some(_), _) => "skipped".into(),
                    (false, None, _) => "error".into(),
                },
            ]
        })
        .collect();
    let header = ["NAME", "PROVIDES", "VERSION", "ABI", "STATUS"];
    let mut widths = header.map(str::len);
    for c in &cells {
        for (w, s) in widths.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |c: &[String]| {
        c.iter()
            .zip(widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(&header.map(String::from)) + "\n";
    for (row, c) in rows.iter().zip(&cells) {
        out += &line(c);
        out += "\n";
        out += &format!("    {}\n", row.file);
        if let Some(e) = &row.error {
            out += &format!("    {e}\n");
        }
        for c in &row.conflicts {
            out += &format!("    {c}: a job using it must choose ([plugins.<kind>] <name> = \"<plugin>\")\n");
        }
    }
    if rows.is_empty() {
        out += "(no plugin libraries found)\n";
    }
    if !skipped.is_empty() {
        out += "not tried:\n";
    }
    for r in skipped {
        out += &format!("    {}: {}\n", r.file, r.skipped.as_deref().unwrap_or(""));
    }
    out
}
