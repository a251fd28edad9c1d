//! One worker process: assembles the job's plugins (transport, compute, strategy,
//! optimizer, partitioner), loads the data, trains, and on rank 0 writes the run
//! directory. Everything that can be checked before connecting to the other ranks is
//! checked first, so bad input fails before any worker trains.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sheaf_checkpoint::checkpoint::{Checkpointer, ResumedState};
use sheaf_checkpoint::universal::{Resharding, Universal};
use sheaf_collectives::Group;
use sheaf_core::{
    Communicator, DataPartitioner, Deadline, Link, Model, Optimizer, Strategy, TrainConfig, TrainContext,
    TrainSummary,
};
use sheaf_job::data::JobData;
use sheaf_job::job::Job;
use sheaf_job::plan::Plan;
use sheaf_plugins::{HostError, Registry};
use sheaf_report::outputs::{json_number, write_atomic, Metrics, Summary};
use sheaf_report::trace::{Recorder, TracedComm, TracedModel, TracedOptimizer};

use crate::world::WorkerEnv;

/// What `run_worker` needs besides the job.
pub struct RunOptions {
    pub env: WorkerEnv,
    pub run_dir: Option<PathBuf>,
    /// Show a progress bar (rank 0 only): stderr is a terminal, or the launcher's is.
    pub progress: bool,
    /// Start from this checkpoint (the whole model, as any run writes it).
    pub init_from: Option<PathBuf>,
    /// Continue the run in `run_dir` from its newest checkpoint (from the start when
    /// it has none yet); without it, a `run_dir` that holds a run is refused.
    pub resume: bool,
    /// Raised by a preemption signal (`sheaf_launch::preempt::watch`): the ranks stop
    /// together at the next step boundary, checkpointed. `None`: not watched.
    pub preempt: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Raised by SIGUSR2: write the flight recorder's calls
    /// (`RUN_DIR/flight/rank-N.json`) now. `None`: not watched.
    pub dump_flight: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl RunOptions {
    pub fn progress_default() -> bool {
        std::env::var_os("SHEAF_PROGRESS").is_some() || std::io::stderr().is_terminal()
    }
}

/// Trains `job` as one rank; returns the summary (on every rank; rank 0 also writes it).
/// The run goes through four phases, each a function below: [`prepare`] (everything
/// that needs no other rank: plugins, data, plan, model, resume, run directory),
/// [`connect`] (the world), [`train`] (the strategy, then the last checkpoint and the
/// whole model), [`report`] (every rank's figures gathered into `summary.json`).
pub fn run_worker(job: &Job, registry: &Registry, opts: &RunOptions) -> Result<Summary, HostError> {
    let mut prepared = prepare(job, registry, opts)?;
    let world = connect(&prepared, registry)?;
    let trained = train(&mut prepared, &world, opts)?;
    report(&prepared, &world, registry, trained)
}

/// A rank ready to connect: its components built, its data loaded, its model built
/// and given its starting parameters.
pub struct Prepared<'j> {
    job: &'j Job,
    env: WorkerEnv,
    data: JobData,
    model: Box<dyn Model>,
    optimizer: Box<dyn Optimizer>,
    partitioner: Box<dyn DataPartitioner>,
    strategy: Box<dyn Strategy>,
    plan: Plan,
    config: TrainConfig,
    /// The step resumed from (`Some(0)`: asked to resume, nothing to resume from).
    resumed: Option<u64>,
    /// A universal checkpoint resumed from, and its optimizer step: the optimizer's
    /// state is cut from it as the strategy hands the optimizer its parameters.
    reshard: Option<(Universal, u64)>,
    /// The run directory, on rank 0 only.
    run_dir: Option<PathBuf>,
    /// What this process held before its model: plugins, the dataset, the runtime.
    baseline_rss: u64,
}

/// This rank's world: the communicator strategies use and the link under it.
pub struct World {
    comm: Group,
    link: Arc<dyn Link>,
    /// What `auto` runs for allreduce and whether it was measured now (`summary.json`).
    tuning: Option<serde_json::Value>,
}

/// What training left: the strategy's summary, the collectives' record and the
/// checkpoints committed.
pub struct Trained {
    summary: TrainSummary,
    recorder: Arc<Recorder>,
    saves: Vec<serde_json::Value>,
}

/// The phase without communication: every component built and every input checked,
/// so that bad input fails before any rank waits for another.
pub fn prepare<'j>(job: &'j Job, registry: &Registry, opts: &RunOptions) -> Result<Prepared<'j>, HostError> {
    let env = opts.env.clone();
    // `cuda` without an index: this host's local rank's device, as torchrun users
    // expect. Only the compute plugin is told: the job (job.toml, the summary, what a
    // resumed world reads) keeps what was asked, the same for every rank.
    let mut local = job.compute.clone();
    local.backend = job.compute.backend_for(&job.model.kind, registry)?;
    if local.device == "cuda" {
        local.device = format!("cuda:{}", env.local_rank);
    }
    let compute = registry.compute(&local.backend, &local.config_json())?;
    let data = sheaf_job::data::load(job, registry, compute.as_ref())?;
    let mut optimizer = registry.optimizer(&job.train.optimizer, &job.train.optimizer_config())?;
    let partitioner = registry.data_partitioner(&job.data.partitioner, &job.data.partitioner_config())?;
    let (strategy, plan) =
        sheaf_job::plan::strategy_and_plan(job, env.world_size, registry, compute.as_ref(), &data)?;
    let baseline_rss = sheaf_job::memory::peak_rss_bytes();
    let mut model = if let Some(shard) = plan.ranks[env.rank].param_shard {
        match plan.stage_interface {
            true => compute.build_piece_shard(&plan.spec, &plan.ranks[env.rank].piece, shard, job.seed)?,
            false => compute.build_shard(&plan.spec, shard, job.seed)?,
        }
    } else if plan.stage_interface {
        compute.build_piece(&plan.spec, &plan.ranks[env.rank].piece, job.seed)?
    } else {
        compute.build_model(&plan.spec, job.seed)?
    };
    if let Some(path) = &opts.init_from {
        let whole = &plan.info.layout;
        let full = crate::hf::init_params(path, compute.as_ref(), &plan.spec, whole)?;
        model.write_params(&plan.layout_of(env.rank).slice(whole, &full))?;
    }
    let mut config = job.train.config(job.seed);
    let mut reshard = None;
    let resumed = match (&opts.run_dir, opts.resume) {
        (Some(dir), true) => match sheaf_checkpoint::checkpoint::latest(dir)? {
            Some((_, at)) => {
                let strategy = &job.parallel.strategy;
                let r = sheaf_checkpoint::checkpoint::read(&at, &plan, env.rank, strategy, &config)?;
                model.write_params(&r.params)?;
                match r.optimizer {
                    ResumedState::Whole(state) => optimizer.load_state(&state)?,
                    // Cut as the strategy hands the optimizer its parameters.
                    ResumedState::Universal(u) => reshard = Some((u, r.state.optimizer_step)),
                }
                config.start_step = r.state.step;
                tracing::info!("rank {}: resuming from {} (step {})", env.rank, at.display(), r.state.step);
                Some(r.state.step)
            }
            None => {
                tracing::warn!(
                    "rank {}: {} has no checkpoint yet: starting from step 0",
                    env.rank,
                    dir.display()
                );
                Some(0)
            }
        },
        (None, true) => return Err(HostError::Usage("--resume needs the run directory".into())),
        _ => None,
    };
    let run_dir = match (&opts.run_dir, env.rank) {
        (Some(dir), 0) => {
            if resumed.is_none() && sheaf_checkpoint::checkpoint::holds_a_run(dir) {
                return Err(HostError::Usage(format!(
                    "{} already holds a run: continue it with --resume {0}, or choose another --run-dir",
                    dir.display()
                )));
            }
            std::fs::create_dir_all(dir).map_err(|e| HostError::io(dir, e))?;
            sheaf_checkpoint::checkpoint::write_job(dir, job)?;
            Some(dir.clone())
        }
        _ => None,
    };
    Ok(Prepared {
        job,
        env,
        data,
        model,
        optimizer,
        partitioner,
        strategy,
        plan,
        config,
        resumed,
        reshard,
        run_dir,
        baseline_rss,
    })
}

/// The phase that meets the other ranks: this rank's link over the job's transport,
/// and the world communicator over it.
pub fn connect(prepared: &Prepared, registry: &Registry) -> Result<World, HostError> {
    let (job, env) = (prepared.job, &prepared.env);
    let connected = env.connect_job(registry, job)?;
    let algorithm = job.collectives.algorithm().map_err(HostError::Job)?;
    tracing::info!(
        "rank {}/{}: {} on {}, {} parameters, {} training samples",
        env.rank,
        env.world_size,
        job.parallel.strategy,
        job.transport.plugin(),
        prepared.model.layout().total(),
        prepared.data.train.len()
    );
    let dl = Deadline::after(job.transport.timeout());
    let run_dir = prepared.run_dir.as_deref();
    let (comm, tuning) =
        crate::tuning::tune(connected.group(algorithm), job.transport.plugin(), run_dir, dl)?;
    Ok(World { comm, link: connected.link, tuning })
}

impl Prepared<'_> {
    fn deadline(&self) -> impl Fn() -> Deadline {
        let timeout = self.timeout();
        move || Deadline::after(timeout)
    }

    fn timeout(&self) -> Duration {
        self.job.transport.timeout()
    }

    fn failed(&self) -> impl Fn(sheaf_core::CommError) -> HostError {
        let rank = self.env.rank;
        move |e| HostError::Train { rank, detail: e.to_string() }
    }
}

/// The phase that trains: the strategy's run (its collectives, model and optimizer
/// traced), then the last checkpoint if the strategy's last step did not write it, and
/// the whole model's file.
pub fn train(p: &mut Prepared, world: &World, opts: &RunOptions) -> Result<Trained, HostError> {
    let (job, rank) = (p.job, p.env.rank);
    let train_len = p.data.train.len();
    let mut metrics = Metrics::new(
        p.run_dir.as_ref().map(|d| d.join("metrics.jsonl")).as_deref(),
        rank == 0,
        opts.progress,
        job.train.epochs,
        p.config.total_steps(train_len),
        p.resumed,
    )?
    .with_tokens_per_sample(p.data.tokens_per_sample());
    if job.outputs.tensorboard {
        let board = |d: &PathBuf| d.join("tensorboard");
        metrics = metrics.with_tensorboard(
            p.run_dir.as_ref().map(board).as_deref(),
            opts.run_dir.as_ref().map(|d| board(d).join(format!("rank-{rank}"))).as_deref(),
        )?;
    }
    if let (Some(dir), Some(vocab)) = (&p.run_dir, &p.data.vocab) {
        write_atomic(&dir.join("vocab.json"), vocab.to_json().to_string().as_bytes())?;
    }
    let mut checkpoints = Checkpointer {
        comm: &world.comm,
        plan: &p.plan,
        run_dir: opts.run_dir.clone().filter(|_| p.config.checkpoint_every.is_some()),
        keep: job.train.keep_checkpoints,
        config: p.config.clone(),
        train_len,
        world_size: p.env.world_size,
        strategy: job.parallel.strategy.clone(),
        job: serde_json::to_value(job).unwrap_or_default(),
        timeout: p.timeout(),
        saved: p.resumed,
        preempt: opts.preempt.clone(),
        preempt_dir: opts.run_dir.clone(),
        asynchronous: job.train.checkpoint_async,
        pending: None,
        staging: None,
        saves: Vec::new(),
    };
    // What the strategy is lent records where the time goes (trace.json), and its
    // last calls (the flight recorder), written on a failed call, a failed run, or
    // SIGUSR2.
    let recorder = Recorder::new(rank);
    if let Some(dir) = &opts.run_dir {
        let path = dir.join(sheaf_report::flight::DIR).join(format!("rank-{rank}.json"));
        recorder.flight.set_path(path);
    }
    let _watching = opts.dump_flight.clone().map(|flag| FlightWatch::start(flag, recorder.clone()));
    let result = {
        let comm: &dyn Communicator = &world.comm;
        let traced = TracedComm::world(comm, recorder.clone());
        let mut model = TracedModel { inner: p.model.as_mut(), rec: recorder.clone() };
        let local = p.plan.layout_of(rank).clone();
        let from = p.reshard.take().map(|(u, step)| (u, local, p.plan.info.layout.clone(), step));
        let mut resharding = Resharding::new(p.optimizer.as_mut(), from);
        let mut optimizer = TracedOptimizer { inner: &mut resharding, rec: recorder.clone() };
        p.strategy.train(TrainContext {
            config: p.config.clone(),
            comm: &traced,
            model: &mut model,
            optimizer: &mut optimizer,
            partitioner: p.partitioner.as_ref(),
            train: p.data.train.as_ref(),
            test: p.data.test.as_ref(),
            metrics: &mut metrics,
            checkpoints: &mut checkpoints,
        })
    };
    let summary = match result {
        Ok(s) => s,
        Err(sheaf_core::Error::Preempted { step }) => {
            metrics.finish()?;
            if let Some(dir) = &p.run_dir {
                let json = serde_json::json!({ "preempted_at_step": step, "world_size": p.env.world_size });
                write_atomic(&dir.join("summary.json"), json.to_string().as_bytes())?;
            }
            // Said goodbye, so no rank's last message is lost with a process that exits.
            world.link.close(p.deadline()()).map_err(p.failed())?;
            let run_dir = opts.run_dir.clone().unwrap_or_default();
            return Err(HostError::Preempted { step: Some(step), run_dir });
        }
        Err(e) => {
            recorder.write_flight();
            // Tell the other ranks at once instead of leaving them to time out.
            world.link.abort(rank, &e.to_string());
            return Err(HostError::Train { rank, detail: e.to_string() });
        }
    };
    metrics.finish()?;

    let dl = p.deadline();
    let values = p.model.layout().total();
    // The final parameters: the model's own buffer where it lends it, never a copy
    // of it that only the checkpoint would need.
    let lends = p.model.params_mut()?.is_some_and(|b| b.len() == values);
    let mut copy = Vec::new();
    if !lends {
        copy = vec![0f32; values];
        p.model.read_params(&mut copy)?;
    }
    let mine: &[f32] = match lends {
        true => p
            .model
            .params_mut()?
            .ok_or_else(|| HostError::Output("the model no longer lends its parameter buffer".into()))?,
        false => &copy,
    };
    // The last checkpoint to resume from, unless the strategy's last step wrote it
    // (the optimizer's state is copied out only when one is written).
    if checkpoints.due(summary.steps) {
        // The optimizer's last use: its state is moved out, not copied.
        checkpoints.write_owned(summary.steps, mine, p.optimizer.take_state()?)?;
    }
    // A save still in flight is committed before the run ends.
    checkpoints.settle(true)?;
    let path = p.run_dir.as_ref().map(|d| d.join("checkpoint.safetensors"));
    sheaf_checkpoint::whole::write_whole(&world.comm, mine, &p.plan, path.as_deref(), dl)?;
    let saves = checkpoints.saves.iter().map(|s| serde_json::to_value(s).unwrap_or_default()).collect();
    Ok(Trained { summary, recorder, saves })
}

/// The phase that reports: every rank's parameter count, peak activations, busy and
/// idle time, and memory as the kernel counts it (at its peak, and before the model
/// was built) gathered into the summary; rank 0 writes `summary.json`, the loss plot
/// and the trace. Ends with every rank closing its link.
pub fn report(
    p: &Prepared,
    world: &World,
    registry: &Registry,
    trained: Trained,
) -> Result<Summary, HostError> {
    let (job, env, comm) = (p.job, &p.env, &world.comm);
    let (dl, failed) = (p.deadline(), p.failed());
    let Trained { summary: trained, recorder, saves } = trained;
    let peak = match trained.peak_activation_bytes {
        0 => sheaf_job::plan::need_bytes(&p.plan, env.rank).1,
        measured => measured,
    };
    let mine = [
        p.model.layout().total() as f64,
        peak as f64,
        trained.busy_seconds,
        trained.idle_seconds,
        sheaf_job::memory::peak_rss_bytes() as f64,
        p.baseline_rss as f64,
    ];
    const STATS: usize = 6;
    let mut all = vec![0f64; STATS * env.world_size];
    comm.allgather(bytemuck::cast_slice(&mine), bytemuck::cast_slice_mut(&mut all), dl()).map_err(&failed)?;
    let column = |k: usize| all.chunks_exact(STATS).map(|r| r[k]).collect::<Vec<f64>>();
    let bytes = |k: usize| column(k).into_iter().map(|v| v as u64).collect::<Vec<u64>>();
    let (busy, idle) = (column(2), column(3));
    // Strategies that measure waiting (pipelines) report a bubble.
    let bubble = idle.iter().any(|&i| i > 0.0).then(|| {
        let fractions: Vec<f64> =
            busy.iter().zip(&idle).map(|(b, i)| if b + i > 0.0 { i / (b + i) } else { 0.0 }).collect();
        fractions.iter().sum::<f64>() / fractions.len() as f64
    });
    let (trace, stragglers) = gather_trace(comm, &recorder, &dl).map_err(&failed)?;
    // Busy and idle seconds where the strategy measured them (pipelines), else absent.
    let timed = busy.iter().chain(&idle).any(|&v| v > 0.0);
    let tokens = p.data.tokens_per_sample();
    let trained_values =
        summary_values(job, &trained, p.data.train.len(), &column(1), timed, tokens.is_some());

    let summary = Summary {
        world_size: env.world_size,
        strategy: job.parallel.strategy.clone(),
        transport: job.transport.plugin().to_string(),
        device: job.compute.device.clone(),
        trained_values,
        val_loss: tokens.map(|_| trained.test_loss),
        tokens_per_sec: tokens.map(|t| trained.samples_per_sec * t as f64),
        trained,
        params: p.plan.info.layout.total(),
        params_per_rank: bytes(0),
        peak_activation_bytes_per_rank: bytes(1),
        peak_rss_bytes_per_rank: bytes(4),
        baseline_rss_bytes_per_rank: bytes(5),
        planned_bytes_per_rank: (0..env.world_size)
            .map(|r| sheaf_job::memory::planned(job, &p.plan, r))
            .collect(),
        busy_seconds_per_rank: timed.then_some(busy),
        idle_seconds_per_rank: timed.then_some(idle),
        bubble_fraction: bubble,
        resumed_from_step: p.resumed,
        stragglers,
        sheaf_version: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: option_env!("SHEAF_GIT_COMMIT").map(str::to_string),
        // The launcher's, when one of ours started this worker.
        command_line: std::env::var(sheaf_launch::LAUNCH_COMMAND_ENV)
            .ok()
            .and_then(|c| serde_json::from_str(&c).ok())
            .unwrap_or_else(|| std::env::args().collect()),
        hosts: host_names(comm, dl()).map_err(&failed)?,
        restarts: p.run_dir.as_ref().map(|d| restarts(d)).unwrap_or_default(),
        collectives_tuning: world.tuning.clone(),
        checkpoint_saves: saves,
        components: registry.used(),
        job: serde_json::to_value(job).unwrap_or_default(),
    };
    if let Some(dir) = &p.run_dir {
        let json = serde_json::to_vec_pretty(&summary).expect("summary serialises");
        write_atomic(&dir.join("summary.json"), &json)?;
        sheaf_report::plot::write_loss_svg(dir)?;
        if let Some(trace) = &trace {
            write_atomic(&dir.join("trace.json"), trace)?;
        }
    }
    comm.barrier(dl()).map_err(&failed)?;
    world.link.close(dl()).map_err(&failed)?;
    Ok(summary)
}

/// The strategy's report as `summary.json`'s totals, made to agree with the rest of the
/// run's outputs: `epochs` as the log counts them (those the run trained in, a last
/// partial one included, where the strategy counts completed ones), the peak
/// activations the largest of the ranks' figures (which a data-parallel strategy leaves
/// at 0, unmeasured), busy and idle seconds only where some rank measured them, and a
/// language model's measures (val_loss, tokens/s; beside the summary) without a
/// classifier's accuracy.
fn summary_values(
    job: &Job,
    trained: &sheaf_core::TrainSummary,
    train_len: usize,
    activations: &[f64],
    timed: bool,
    language_model: bool,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut values: std::collections::BTreeMap<String, serde_json::Value> =
        trained.to_values().into_iter().map(|(k, v)| (k, json_number(v))).collect();
    let micro_steps_per_epoch = train_len.div_ceil(job.train.batch_size.max(1)).max(1) as u64;
    let micro_steps = trained.steps * job.train.grad_accum.max(1) as u64;
    let epochs = micro_steps.div_ceil(micro_steps_per_epoch).min(job.train.epochs);
    values.insert("epochs".into(), epochs.into());
    let peak = activations.iter().copied().fold(0.0, f64::max);
    values.insert("peak_activation_bytes".into(), json_number(peak));
    if !timed {
        values.remove("busy_seconds");
        values.remove("idle_seconds");
    }
    if language_model {
        values.remove("test_accuracy");
    }
    values
}

/// The launcher's record of restarts in `dir` (none when it has not restarted).
fn restarts(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(sheaf_launch::RESTARTS))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Every rank's host name, by rank (64 bytes each at most).
fn host_names(comm: &Group, dl: Deadline) -> Result<Vec<String>, sheaf_core::CommError> {
    const LEN: usize = 64;
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut mine = [0u8; LEN];
    let bytes = name.trim().as_bytes();
    mine[..bytes.len().min(LEN)].copy_from_slice(&bytes[..bytes.len().min(LEN)]);
    let mut all = vec![0u8; LEN * comm.world_size()];
    comm.allgather(&mine, &mut all, dl)?;
    Ok(all
        .chunks_exact(LEN)
        .map(|c| String::from_utf8_lossy(&c[..c.iter().position(|&b| b == 0).unwrap_or(LEN)]).into_owned())
        .collect())
}

/// Every rank's spans on rank 0: the Chrome trace and who made the others wait
/// (`None` elsewhere).
#[allow(clippy::type_complexity)]
fn gather_trace(
    comm: &Group,
    rec: &Recorder,
    dl: &impl Fn() -> Deadline,
) -> Result<(Option<Vec<u8>>, Option<sheaf_report::trace::Stragglers>), sheaf_core::CommError> {
    const TRACE_TAG: u32 = 0x5EAF_0003;
    const CLOCK_TAG: u32 = 0x5EAF_0004;
    /// Round trips per rank to measure its clock against rank 0's.
    const CLOCK_SAMPLES: usize = 8;
    let mine = rec.to_json();
    if comm.rank() != 0 {
        for _ in 0..CLOCK_SAMPLES {
            comm.recv(0, CLOCK_TAG, dl())?;
            comm.send(0, CLOCK_TAG + 1, &rec.now_us().to_le_bytes(), dl())?;
        }
        comm.send(0, TRACE_TAG, &mine, dl())?;
        return Ok((None, None));
    }
    let mut offsets = vec![0.0; comm.world_size()];
    let mut ranks = vec![serde_json::from_slice(&mine).unwrap_or_default()];
    for (r, offset) in offsets.iter_mut().enumerate().skip(1) {
        let mut samples = Vec::with_capacity(CLOCK_SAMPLES);
        for _ in 0..CLOCK_SAMPLES {
            let sent = rec.now_us();
            comm.send(r, CLOCK_TAG, &[], dl())?;
            let theirs = comm.recv(r, CLOCK_TAG + 1, dl())?;
            let received = rec.now_us();
            let theirs = theirs.get(..8).map_or(sent, |b| f64::from_le_bytes(b.try_into().expect("8 bytes")));
            samples.push((sent, theirs, received));
        }
        *offset = sheaf_report::trace::clock_offset_us(&samples);
        let bytes = comm.recv(r, TRACE_TAG, dl())?;
        // A rank's spans that do not parse are left out of the trace, not fatal.
        ranks.push(serde_json::from_slice(&bytes).unwrap_or_default());
    }
    sheaf_report::trace::align_clocks(&mut ranks, &offsets);
    let mut stragglers = sheaf_report::trace::stragglers(&ranks);
    stragglers.clock_offsets_ms = offsets.iter().map(|o| o / 1e3).collect();
    Ok((Some(sheaf_report::trace::chrome_trace(&ranks)), Some(stragglers)))
}

/// Writes the flight recorder whenever `flag` (raised by SIGUSR2) is up, until dropped.
struct FlightWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl FlightWatch {
    fn start(flag: Arc<std::sync::atomic::AtomicBool>, recorder: Arc<Recorder>) -> FlightWatch {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = stop.clone();
        let watch = move || {
            while !done.load(Ordering::Relaxed) {
                if flag.swap(false, Ordering::SeqCst) {
                    recorder.write_flight();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        if let Err(e) = std::thread::Builder::new().name("flight-recorder".into()).spawn(watch) {
            tracing::warn!("cannot watch for SIGUSR2 (the flight recorder): {e}");
        }
        FlightWatch { stop }
    }
}

impl Drop for FlightWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
