//! One worker process: assembles the job's plugins (transport, compute, strategy,
//! optimizer, partitioner), loads the data, trains, and on rank 0 writes the run
//! directory. Everything that can be checked before connecting to the other ranks is
//! checked first, so bad input fails before any worker trains.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sheaf_collectives::Group;
use sheaf_core::{Communicator, Deadline, Link, TrainContext};

use sheaf_checkpoint::checkpoint::Checkpointer;
use sheaf_job::job::Job;
use sheaf_plugins::{HostError, Registry};
use sheaf_report::outputs::{json_number, read_safetensors, write_atomic, Metrics, Summary};

/// Where this worker sits in the world, as torchrun's variables say.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// The launcher says the world spans more than one host.
    pub spans_hosts: bool,
}

impl WorkerEnv {
    /// From the environment of whichever launcher started this process (torchrun,
    /// SLURM, Open MPI, MPICH, a Kubernetes Indexed Job: [`crate::world`]); a world of
    /// one when none did.
    pub fn from_env() -> Result<WorkerEnv, HostError> {
        crate::world::from_vars(|k| std::env::var(k).ok())
    }

    /// The address peers reach this rank at: `SHEAF_ADVERTISE_ADDR`, or loopback when
    /// the master is on this host, or else this host's address on the route to the
    /// master (a UDP socket's local address once connected; nothing is sent).
    pub fn advertise_addr(&self) -> Result<Option<String>, HostError> {
        if let Ok(a) = std::env::var("SHEAF_ADVERTISE_ADDR") {
            return Ok(Some(a));
        }
        let loopback = self.master_addr == "localhost"
            || self.master_addr.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if self.world_size == 1 || loopback {
            return Ok(None);
        }
        use std::net::ToSocketAddrs;
        let master = (self.master_addr.as_str(), self.master_port)
            .to_socket_addrs()
            .map_err(|e| HostError::Usage(format!("MASTER_ADDR={} does not resolve: {e}", self.master_addr)))?
            .next()
            .ok_or_else(|| HostError::Usage(format!("MASTER_ADDR={} has no address", self.master_addr)))?;
        let any: std::net::SocketAddr = if master.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let route = std::net::UdpSocket::bind(any)
            .and_then(|s| s.connect(master).and_then(|()| s.local_addr()))
            .map_err(|e| {
                HostError::Usage(format!("no route to MASTER_ADDR={} ({master}): {e}", self.master_addr))
            })?;
        Ok(Some(route.ip().to_string()))
    }
}

/// A rank's link to the world, and the world's hosts when the transport knows them
/// (`auto`).
pub struct Connected {
    pub link: Arc<dyn Link>,
    /// `host_of[rank]`: which host each rank is on.
    pub hosts: Option<Vec<usize>>,
}

impl Connected {
    /// The world communicator over the link, running `algorithm` (hierarchical over
    /// the hosts when they are known and the algorithm is `auto` or `hierarchical`).
    pub fn group(&self, algorithm: sheaf_collectives::Algorithm) -> Group {
        let g = Group::world(self.link.clone()).with_algorithm(algorithm);
        match &self.hosts {
            Some(h) => g.with_hosts(h),
            None => g,
        }
    }
}

/// What tells hosts apart: the kernel's boot id, the network namespace (ranks in
/// separate namespaces cannot share memory through abstract sockets, so they count as
/// separate hosts) and the host name, hashed (FNV-1a).
fn host_key() -> u64 {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let netns = std::fs::read_link("/proc/self/ns/net").map(|p| p.display().to_string()).unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{boot}|{netns}|{host}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl WorkerEnv {
    /// This rank's link from `transport`: a plugin's, or `auto`, which connects
    /// `zmq-tcp` across the world, learns which ranks share a host, connects `shm`
    /// among them and routes each peer over one or the other ([`HybridLink`]); its
    /// world group then reduces hierarchically.
    ///
    /// [`HybridLink`]: sheaf_collectives::HybridLink
    pub fn connect(
        &self,
        registry: &Registry,
        transport: &str,
        connect_timeout: Duration,
        peer_timeout: Duration,
    ) -> Result<Connected, HostError> {
        if transport != "auto" {
            let link = self.connect_plugin(registry, transport, connect_timeout, peer_timeout)?;
            return Ok(Connected { link, hosts: None });
        }
        let world = self.connect_plugin(registry, "zmq-tcp", connect_timeout, peer_timeout)?;
        if self.world_size == 1 {
            return Ok(Connected { link: world, hosts: None });
        }
        let fail = |e: sheaf_core::CommError| HostError::Train {
            rank: self.rank,
            detail: format!("finding hosts: {e}"),
        };
        let mut keys = vec![0u8; 8 * self.world_size];
        Group::world(world.clone())
            .allgather(&host_key().to_le_bytes(), &mut keys, Deadline::after(connect_timeout))
            .map_err(fail)?;
        let keys: Vec<u64> =
            keys.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8"))).collect();
        let mut order: Vec<u64> = Vec::new();
        for k in &keys {
            if !order.contains(k) {
                order.push(*k);
            }
        }
        let host_of: Vec<usize> =
            keys.iter().map(|k| order.iter().position(|o| o == k).expect("seen")).collect();
        let mine: Vec<usize> = (0..self.world_size).filter(|&r| host_of[r] == host_of[self.rank]).collect();
        if mine.len() == 1 {
            return Ok(Connected { link: world, hosts: Some(host_of) });
        }
        let local_env = WorkerEnv {
            rank: mine.iter().position(|&r| r == self.rank).expect("this rank"),
            world_size: mine.len(),
            ..self.clone()
        };
        let local = local_env.connect_plugin(registry, "shm", connect_timeout, peer_timeout)?;
        let link = sheaf_collectives::HybridLink::new(world, local, &mine).map_err(fail)?;
        Ok(Connected { link: Arc::new(link), hosts: Some(host_of) })
    }

    /// This rank's link over the job's transport, with its timeouts.
    pub fn connect_job(&self, registry: &Registry, job: &Job) -> Result<Connected, HostError> {
        self.connect(
            registry,
            job.transport.plugin(),
            Duration::from_millis((job.transport.timeout_s * 1000.0) as u64),
            Duration::from_secs_f64(job.transport.peer_timeout_s),
        )
    }

    /// This rank's link from the transport plugin `transport`, after meeting the other
    /// ranks: the one place
    /// the transport's connection settings are written (rank, world, master, timeouts,
    /// `SHEAF_ADVERTISE_ADDR` when set, and the job's secret, `SHEAF_JOB_TOKEN`, which
    /// a world of more than one requires: `sheaf launch` makes one for its workers;
    /// ranks started by other launchers must all be given the same).
    fn connect_plugin(
        &self,
        registry: &Registry,
        transport: &str,
        connect_timeout: Duration,
        peer_timeout: Duration,
    ) -> Result<Arc<dyn Link>, HostError> {
        let token = std::env::var(sheaf_auth::TOKEN_ENV).ok().filter(|t| !t.is_empty());
        if token.is_none() && self.world_size > 1 {
            return Err(HostError::Usage(format!(
                "{} is not set: every rank of a world of {} must hold the job's secret (sheaf launch makes one; \
                 under another launcher export the same value to every rank, e.g. from `openssl rand -hex 32`)",
                sheaf_auth::TOKEN_ENV,
                self.world_size
            )));
        }
        let config = serde_json::json!({
            "rank": self.rank,
            "world_size": self.world_size,
            "master_addr": self.master_addr,
            "master_port": self.master_port,
            "connect_timeout_ms": connect_timeout.as_millis() as u64,
            "peer_timeout_ms": peer_timeout.as_millis() as u64,
            "advertise_addr": self.advertise_addr()?,
            "job_token": token,
        })
        .to_string();
        Ok(Arc::from(registry.link(transport, &config)?))
    }
}

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
}

impl RunOptions {
    pub fn progress_default() -> bool {
        std::env::var_os("SHEAF_PROGRESS").is_some() || std::io::stderr().is_terminal()
    }
}

/// Trains `job` as one rank; returns the summary (on every rank; rank 0 also writes it).
pub fn run_worker(job: &Job, registry: &Registry, opts: &RunOptions) -> Result<Summary, HostError> {
    let env = &opts.env;
    // `cuda` without an index: this host's local rank's device, as torchrun users
    // expect. Only the compute plugin is told: the job (job.toml, the summary, what a
    // resumed world reads) keeps what was asked, the same for every rank.
    let mut local = job.compute.clone();
    if local.device == "cuda" {
        local.device = format!("cuda:{}", env.local_rank);
    }
    let compute = registry.compute(&local.backend, &local.config_json())?;
    let data = sheaf_job::data::load(job, registry, compute.as_ref())?;
    let (train, test) = (data.train.as_ref(), data.test.as_ref());
    let mut optimizer = registry.optimizer(&job.train.optimizer, &job.train.optimizer_config())?;
    let partitioner = registry.data_partitioner(&job.data.partitioner, &job.data.partitioner_config())?;
    let timeout_ms = (job.transport.timeout_s * 1000.0) as u64;
    let (mut strategy, plan) =
        sheaf_job::plan::strategy_and_plan(job, env.world_size, registry, compute.as_ref(), &data)?;
    let piece = plan.ranks[env.rank].piece.clone();
    let spec = plan.spec.clone();
    let whole = plan.info.layout.clone();
    let core = |e: sheaf_core::Error| HostError::Core(e.to_string());
    // What this process holds before its model: plugins, the dataset, the runtime.
    let baseline_rss = sheaf_job::memory::peak_rss_bytes();
    let mut model = if let Some(shard) = plan.ranks[env.rank].param_shard {
        compute.build_shard(&spec, shard, job.seed).map_err(core)?
    } else if plan.stage_interface {
        compute.build_piece(&spec, &piece, job.seed).map_err(core)?
    } else {
        compute.build_model(&spec, job.seed).map_err(core)?
    };
    if let Some(path) = &opts.init_from {
        let full = read_safetensors(path, &whole)?;
        model.write_params(&plan.layout_of(env.rank).slice(&whole, &full)).map_err(core)?;
    }
    let mut config = job.train.config(job.seed);
    let resumed = match (&opts.run_dir, opts.resume) {
        (Some(dir), true) => match sheaf_checkpoint::checkpoint::latest(dir)? {
            Some((_, at)) => {
                let r = sheaf_checkpoint::checkpoint::read(&at, &plan, env.rank, &job.parallel.strategy)?;
                model.write_params(&r.params).map_err(core)?;
                optimizer.load_state(&r.optimizer).map_err(core)?;
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
            std::fs::create_dir_all(dir).map_err(|e| HostError::Output(format!("{}: {e}", dir.display())))?;
            sheaf_checkpoint::checkpoint::write_job(dir, job)?;
            Some(dir.clone())
        }
        _ => None,
    };

    let connected = env.connect_job(registry, job)?;
    let algorithm = job.collectives.algorithm().map_err(HostError::Job)?;
    let comm = connected.group(algorithm);
    let link = connected.link.clone();
    tracing::info!(
        "rank {}/{}: {} on {}, {} parameters, {} training samples",
        env.rank,
        env.world_size,
        job.parallel.strategy,
        job.transport.plugin(),
        model.layout().total(),
        train.len()
    );

    let mut metrics = Metrics::new(
        run_dir.as_ref().map(|d| d.join("metrics.jsonl")).as_deref(),
        env.rank == 0,
        opts.progress,
        job.train.epochs,
        config.total_steps(train.len()),
        resumed,
    )?
    .with_tokens_per_sample(data.tokens_per_sample());
    if let (Some(dir), Some(vocab)) = (&run_dir, &data.vocab) {
        let tokens: Vec<String> = vocab.iter().map(char::to_string).collect();
        let json = serde_json::json!({ "kind": "characters", "tokens": tokens });
        write_atomic(&dir.join("vocab.json"), json.to_string().as_bytes())?;
    }
    let mut checkpoints = Checkpointer {
        comm: &comm,
        plan: &plan,
        run_dir: opts.run_dir.clone().filter(|_| config.checkpoint_every.is_some()),
        keep: job.train.keep_checkpoints,
        config: config.clone(),
        train_len: train.len(),
        world_size: env.world_size,
        strategy: job.parallel.strategy.clone(),
        job: serde_json::to_value(job).unwrap_or_default(),
        timeout: Duration::from_millis(timeout_ms),
        saved: resumed,
    };
    // What the strategy is lent records where the time goes (trace.json).
    let recorder = sheaf_report::trace::Recorder::new(env.rank);
    let result = {
        let world: &dyn Communicator = &comm;
        let traced = sheaf_report::trace::TracedComm::world(world, recorder.clone());
        let mut traced_model =
            sheaf_report::trace::TracedModel { inner: model.as_mut(), rec: recorder.clone() };
        let mut traced_optimizer =
            sheaf_report::trace::TracedOptimizer { inner: optimizer.as_mut(), rec: recorder.clone() };
        strategy.train(TrainContext {
            config,
            comm: &traced,
            model: &mut traced_model,
            optimizer: &mut traced_optimizer,
            partitioner: partitioner.as_ref(),
            train,
            test,
            metrics: &mut metrics,
            checkpoints: &mut checkpoints,
        })
    };
    let trained = match result {
        Ok(s) => s,
        Err(e) => {
            // Tell the other ranks at once instead of leaving them to time out.
            link.abort(env.rank, &e.to_string());
            return Err(HostError::Train { rank: env.rank, detail: e.to_string() });
        }
    };
    metrics.finish()?;

    let dl = || Deadline::after(Duration::from_millis(timeout_ms));
    let train_err = |e: sheaf_core::CommError| HostError::Train { rank: env.rank, detail: e.to_string() };
    let values = model.layout().total();
    // The final parameters: the model's own buffer where it lends it, never a copy
    // of it that only the checkpoint would need.
    let lends = model.params_mut().map_err(core)?.is_some_and(|p| p.len() == values);
    let mut copy = Vec::new();
    if !lends {
        copy = vec![0f32; values];
        model.read_params(&mut copy).map_err(core)?;
    }
    let mine: &[f32] = match lends {
        true => model
            .params_mut()
            .map_err(core)?
            .ok_or_else(|| HostError::Core("the model no longer lends its parameter buffer".into()))?,
        false => &copy,
    };
    // The last checkpoint to resume from, unless the strategy's last step wrote it
    // (the optimizer's state is copied out only when one is written).
    if checkpoints.due(trained.steps) {
        // The optimizer's last use: its state is moved out, not copied.
        checkpoints.write(trained.steps, mine, &optimizer.take_state().map_err(core)?)?;
    }
    let path = run_dir.as_ref().map(|d| d.join("checkpoint.safetensors"));
    sheaf_checkpoint::whole::write_whole(&comm, mine, &plan, path.as_deref(), dl)?;
    drop(copy);

    // Every rank's parameter count, peak activations, busy and idle time, and its
    // memory as the kernel counts it: at its peak, and before the model was built.
    let peak = match trained.peak_activation_bytes {
        0 => sheaf_job::plan::need_bytes(job, &plan, env.rank).1,
        measured => measured,
    };
    let mine = [
        values as f64,
        peak as f64,
        trained.busy_seconds,
        trained.idle_seconds,
        sheaf_job::memory::peak_rss_bytes() as f64,
        baseline_rss as f64,
    ];
    const STATS: usize = 6;
    let mut all = vec![0f64; STATS * env.world_size];
    comm.allgather(bytemuck::cast_slice(&mine), bytemuck::cast_slice_mut(&mut all), dl())
        .map_err(train_err)?;
    let column = |k: usize| all.chunks_exact(STATS).map(|r| r[k]).collect::<Vec<f64>>();
    let bytes = |k: usize| column(k).into_iter().map(|v| v as u64).collect::<Vec<u64>>();
    let (busy, idle) = (column(2), column(3));
    // Strategies that measure waiting (pipelines) report a bubble.
    let bubble = idle.iter().any(|&i| i > 0.0).then(|| {
        let fractions: Vec<f64> =
            busy.iter().zip(&idle).map(|(b, i)| if b + i > 0.0 { i / (b + i) } else { 0.0 }).collect();
        fractions.iter().sum::<f64>() / fractions.len() as f64
    });
    let (trace, stragglers) = gather_trace(&comm, &recorder, dl).map_err(train_err)?;
    // Busy and idle seconds where the strategy measured them (pipelines), else absent.
    let timed = busy.iter().chain(&idle).any(|&v| v > 0.0);
    let language_model = data.tokens_per_sample().is_some();
    let trained_values = summary_values(job, &trained, train.len(), &column(1), timed, language_model);

    let summary = Summary {
        world_size: env.world_size,
        strategy: job.parallel.strategy.clone(),
        transport: job.transport.plugin().to_string(),
        device: job.compute.device.clone(),
        trained_values,
        val_loss: data.tokens_per_sample().map(|_| trained.test_loss),
        tokens_per_sec: data.tokens_per_sample().map(|t| trained.samples_per_sec * t as f64),
        trained: trained.clone(),
        params: whole.total(),
        params_per_rank: bytes(0),
        peak_activation_bytes_per_rank: bytes(1),
        peak_rss_bytes_per_rank: bytes(4),
        baseline_rss_bytes_per_rank: bytes(5),
        planned_bytes_per_rank: (0..env.world_size)
            .map(|r| sheaf_job::memory::planned(job, &plan, r))
            .collect(),
        busy_seconds_per_rank: timed.then_some(busy),
        idle_seconds_per_rank: timed.then_some(idle),
        bubble_fraction: bubble,
        resumed_from_step: resumed,
        stragglers,
        sheaf_version: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: option_env!("SHEAF_GIT_COMMIT").map(str::to_string),
        // The launcher's, when one of ours started this worker.
        command_line: std::env::var(sheaf_launch::LAUNCH_COMMAND_ENV)
            .ok()
            .and_then(|c| serde_json::from_str(&c).ok())
            .unwrap_or_else(|| std::env::args().collect()),
        hosts: host_names(&comm, dl()).map_err(train_err)?,
        restarts: run_dir.as_ref().map(|d| restarts(d)).unwrap_or_default(),
        components: registry.used(),
        job: serde_json::to_value(job).unwrap_or_default(),
    };
    if let Some(dir) = &run_dir {
        let json = serde_json::to_vec_pretty(&summary).expect("summary serialises");
        write_atomic(&dir.join("summary.json"), &json)?;
        sheaf_report::plot::write_loss_svg(dir)?;
        if let Some(trace) = &trace {
            write_atomic(&dir.join("trace.json"), trace)?;
        }
    }
    comm.barrier(dl()).map_err(train_err)?;
    link.close(dl()).map_err(train_err)?;
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
    rec: &sheaf_report::trace::Recorder,
    dl: impl Fn() -> Deadline,
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
