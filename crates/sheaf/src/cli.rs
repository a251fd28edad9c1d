//! The `sheaf` command line: parsing and dispatch. The binary only sets up logging
//! and maps errors to exit codes.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use sheaf_plugins::{search_dirs, HostError, Registry, PLUGIN_PATH_ENV};

use crate::commands;

/// The exit codes ([`sheaf_plugins::exit`]), as `sheaf --help` lists them.
const EXIT_CODES: &str = "\
Exit codes:
  0      done
  1      the run, check or benchmark failed (a rank's error, a worker that died, a file not written)
  2      the command line or job cannot be run as given (nothing was trained)
  75     preempted (SIGTERM, SIGINT, --preempt-signal): stopped after a step, checkpointed; --resume RUN_DIR continues
  128+N  stopped by signal N before the workers could checkpoint (130: SIGINT, 143: SIGTERM); --resume RUN_DIR
         continues from the newest checkpoint";

#[derive(Debug, Parser)]
#[command(
    name = "sheaf",
    version,
    about = "Sheaf: distributed training with pluggable transports and strategies",
    after_help = EXIT_CODES
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
    /// strategy or world size), or from a Hugging Face transformers directory
    /// (config.json and model.safetensors, as save_pretrained writes them), whose
    /// config.json fills the [model] keys the job leaves out.
    #[arg(long, value_name = "FILE")]
    pub init_from: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its newest checkpoint (parameters, optimizer
    /// state, step, data position), with its job (RUN_DIR/job.toml) unless a job file
    /// is given; --set still applies. Any world size, strategy and layout, the same
    /// global batch. (--init-from then counts only while the run has no checkpoint yet.)
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// The signal that preempts the run besides SIGTERM and SIGINT (as SLURM's
    /// --signal sends it): the ranks stop together after the step in progress, write a
    /// checkpoint and exit 75; --resume RUN_DIR continues.
    #[arg(long, value_name = "SIGNAL", default_value = sheaf_launch::preempt::DEFAULT_SIGNAL)]
    pub preempt_signal: String,
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
    Launch(LaunchArgs),
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
        /// Left out: the loaded transport of network reach preferred most.
        #[arg(long)]
        transport: Option<String>,
        #[arg(long, default_value_t = 20)]
        cases: u64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 10_000)]
        max_len: usize,
    },
    /// Print text generated by a trained language model: the run's checkpoint, with
    /// its job (summary.json) and vocabulary (vocab.json) read from beside it.
    Sample(SampleArgs),
    /// Encode a text file with a tokenizer into a dataset directory for
    /// `data.dataset`: DIR/train.bin and DIR/val.bin (u16 ids, as nanoGPT writes
    /// them) and DIR/meta.json. Streams: any size of input in bounded memory.
    Prepare(PrepareArgs),
    /// Write a run's checkpoint in another framework's layout: `--format hf`, a
    /// directory that Hugging Face transformers opens with from_pretrained
    /// (config.json and model.safetensors).
    Export {
        /// A checkpoint.safetensors a run wrote, or its run directory.
        checkpoint: PathBuf,
        /// The layout: hf (Hugging Face transformers).
        #[arg(long, default_value = "hf")]
        format: String,
        /// The directory to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a trained model's loss on the validation split of its job's dataset (or
    /// of --data, of the same vocabulary) as one JSON line: val_loss, perplexity,
    /// tokens, tokens_per_sec (a classifier's: val_loss, accuracy, samples).
    Eval {
        /// A checkpoint.safetensors a run wrote, or its run directory.
        checkpoint: PathBuf,
        /// A dataset in place of the job's, as `data.dataset` names one.
        #[arg(long)]
        data: Option<String>,
        /// Evaluate the first N batches of the job's batch_size only.
        #[arg(long, value_name = "N")]
        batches: Option<usize>,
    },
    /// List every plugin library found, with its kinds, versions and whether it loads.
    Plugins {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `sheaf launch`'s options.
#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// Workers on this host.
    #[arg(short = 'n', long = "nproc-per-node", visible_alias = "nproc", value_name = "N")]
    pub workers: usize,
    /// Hosts in the job, one launcher each (torchrun's flag): `M`, or `MIN:MAX` for a
    /// world that goes on with at least MIN hosts when others do not come back (with
    /// --max-restarts, from the newest checkpoint, resharded; global batch unchanged).
    #[arg(long, value_name = "M", default_value = "1")]
    pub nnodes: String,
    /// The fewest hosts a world may go on with (as `--nnodes MIN:MAX` sets it).
    #[arg(long, value_name = "M")]
    pub min_nodes: Option<usize>,
    /// Seconds node 0's launcher waits for the other hosts' launchers before each world
    /// (they meet on --master-port + 1).
    #[arg(long, value_name = "S", default_value_t = 60.0)]
    pub rejoin_s: f64,
    /// This host's place among them, from 0; its workers are ranks R*N .. R*N+N-1.
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub node_rank: usize,
    /// Where rank 0 (on node 0) meets the others.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub master_addr: String,
    /// The rendezvous port (default: a free one, on one host only).
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// The address this host's workers are reached at (default: each worker's
    /// address on the route to the master).
    #[arg(long, value_name = "ADDR")]
    pub advertise_addr: Option<String>,
    #[command(flatten)]
    pub job: JobArgs,
    /// When a worker dies, stop the others and start the world again from the
    /// newest checkpoint (train.checkpoint_every), at most K times.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub max_restarts: usize,
    /// Seconds workers get to stop after the launcher forwards SIGINT, SIGTERM or the
    /// preemption signal, before they are killed (default: what a checkpoint of this
    /// run takes to write at 100 MB/s, plus 10 s; printed).
    #[arg(long, value_name = "S")]
    pub grace_s: Option<f64>,
}

/// `sheaf prepare`'s options.
#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    /// The text file (UTF-8).
    pub input: PathBuf,
    /// The tokenizer: gpt2 (GPT-2's byte-pair encoding, 50,257 ids).
    #[arg(long)]
    pub tokenizer: String,
    /// The dataset directory to write (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// The share of the text, from its end, that validates.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
}

/// `sheaf sample`'s options.
#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// A checkpoint.safetensors a run wrote.
    pub checkpoint: PathBuf,
    /// The text to continue.
    #[arg(long, default_value = "\n")]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Divide the logits by this before sampling (0: always the likeliest token).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Sample among the K likeliest tokens only.
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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
    /// The transport to measure; left out: the loaded transport of network reach
    /// preferred most (ZeroMQ's TCP, of the bundled ones).
    #[arg(long)]
    pub transport: Option<String>,
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
    let env = sheaf_runtime::WorkerEnv::from_env().ok()?;
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
        Command::Run(args) => commands::run_worker(&cli, args, out),
        Command::Launch(args) => commands::launch(&cli, args, out),
        Command::Plan { job, overrides, workers, json } => {
            commands::plan(&cli, job.as_deref(), overrides, *workers, *json, out)
        }
        Command::Sample(args) => commands::sample(&cli, args, out),
        Command::Prepare(args) => commands::prepare(args, out),
        Command::Export { checkpoint, format, out: dir } => {
            if format != "hf" {
                return Err(HostError::Usage(format!("--format {format}: the formats are: hf")));
            }
            let line = sheaf_runtime::hf::export(&cli.registry(), checkpoint, dir)?;
            writeln!(out, "{line}").map_err(HostError::output)
        }
        Command::Eval { checkpoint, data, batches } => {
            let opts = sheaf_runtime::eval::EvalOptions { data: data.clone(), batches: *batches };
            let line = sheaf_runtime::eval::eval(&cli.registry(), checkpoint, &opts)?;
            writeln!(out, "{line}").map_err(HostError::output)
        }
        Command::Bench { what: BenchWhat::Train { workers, runs, json, job } } => {
            commands::bench_train(&cli, *workers, *runs, *json, job, out)
        }
        Command::Bench { what } => commands::bench(&cli, what, out),
        Command::Plugin { what: PluginWhat::Check { file, cases, worlds, seed, json } } => {
            commands::plugin_check(file, *cases, worlds, *seed, *json, out)
        }
        Command::Doctor { job, overrides, slow_factor, workers: Some(n) } => {
            sheaf_doctor::doctor::local(&cli.plugin_dirs, job.as_deref(), overrides, *slow_factor, *n)
        }
        Command::Doctor { job, overrides, slow_factor, workers: None } => {
            commands::doctor(&cli, job.as_deref(), overrides, *slow_factor, out)
        }
        Command::BenchWorker { spec } => commands::bench_worker(&cli, spec, out),
        Command::CheckCollectives { transport, cases, seed, max_len } => {
            commands::check_collectives(&cli, transport.as_deref(), *cases, *seed, *max_len, out)
        }
        Command::Plugins { json } => commands::plugins(&cli, *json, out),
    }
}
