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

use crate::job::Job;
use crate::outputs::{json_number, read_safetensors, safetensors_bytes, write_atomic, Metrics, Summary};
use crate::{HostError, Registry};

/// Where this worker sits in the world, as torchrun's variables say.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl WorkerEnv {
    /// From `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`; a world
    /// of one when unset.
    pub fn from_env() -> Result<WorkerEnv, HostError> {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> Result<T, HostError> {
            match std::env::var(name) {
                Ok(v) => v.trim().parse().map_err(|_| HostError::Usage(format!("{name}={v} is not valid"))),
                Err(_) => Ok(default),
            }
        }
        let env = WorkerEnv {
            rank: var("RANK", 0)?,
            world_size: var("WORLD_SIZE", 1)?,
            local_rank: var("LOCAL_RANK", 0)?,
            master_addr: var("MASTER_ADDR", "127.0.0.1".to_string())?,
            master_port: var("MASTER_PORT", 29500)?,
        };
        if env.world_size == 0 || env.rank >= env.world_size {
            return Err(HostError::Usage(format!("RANK={} outside WORLD_SIZE={}", env.rank, env.world_size)));
        }
        Ok(env)
    }
}

impl WorkerEnv {
    /// This rank's link from `transport`, after meeting the other ranks: the one place
    /// the transport's connection settings are written (rank, world, master, timeouts,
    /// and `SHEAF_ADVERTISE_ADDR` when set).
    pub fn connect(
        &self,
        registry: &Registry,
        transport: &str,
        connect_timeout: Duration,
        peer_timeout: Duration,
    ) -> Result<Arc<dyn Link>, HostError> {
        let config = serde_json::json!({
            "rank": self.rank,
            "world_size": self.world_size,
            "master_addr": self.master_addr,
            "master_port": self.master_port,
            "connect_timeout_ms": connect_timeout.as_millis() as u64,
            "peer_timeout_ms": peer_timeout.as_millis() as u64,
            "advertise_addr": std::env::var("SHEAF_ADVERTISE_ADDR").ok(),
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
}

impl RunOptions {
    pub fn progress_default() -> bool {
        std::env::var_os("SHEAF_PROGRESS").is_some() || std::io::stderr().is_terminal()
    }
}

/// Trains `job` as one rank; returns the summary (on every rank; rank 0 also writes it).
pub fn run_worker(job: &Job, registry: &Registry, opts: &RunOptions) -> Result<Summary, HostError> {
    let env = &opts.env;
    let compute = registry.compute(&job.compute.backend, &job.compute.config_json())?;
    let data = crate::data::load(job, registry, compute.as_ref())?;
    let (train, test) = (data.train.as_ref(), data.test.as_ref());
    let mut optimizer = registry.optimizer(&job.train.optimizer, &job.train.optimizer_config())?;
    let partitioner = registry.data_partitioner(&job.data.partitioner, "")?;
    let timeout_ms = (job.transport.timeout_s * 1000.0) as u64;
    let mut strategy =
        registry.strategy(&job.parallel.strategy, &job.parallel.strategy_config(timeout_ms))?;
    let plan = crate::plan::plan(
        job,
        env.world_size,
        registry,
        compute.as_ref(),
        strategy.as_ref(),
        &data.spec,
        &data.info,
    )?;
    let piece = plan.ranks[env.rank].piece.clone();
    let spec = plan.spec.clone();
    let whole = plan.info.layout.clone();
    let core = |e: sheaf_core::Error| HostError::Core(e.to_string());
    let mut model = if plan.stage_interface {
        compute.build_piece(&spec, &piece, job.seed).map_err(core)?
    } else {
        compute.build_model(&spec, job.seed).map_err(core)?
    };
    if let Some(path) = &opts.init_from {
        let full = read_safetensors(path, &whole)?;
        model.write_params(&plan.layout_of(env.rank).slice(&whole, &full)).map_err(core)?;
    }
    let run_dir = match (&opts.run_dir, env.rank) {
        (Some(dir), 0) => {
            std::fs::create_dir_all(dir).map_err(|e| HostError::Output(format!("{}: {e}", dir.display())))?;
            Some(dir.clone())
        }
        _ => None,
    };

    let link = env.connect(
        registry,
        &job.transport.plugin,
        Duration::from_millis(timeout_ms),
        Duration::from_secs_f64(job.transport.peer_timeout_s),
    )?;
    let algorithm = job.collectives.algorithm().map_err(HostError::Job)?;
    let comm = Group::world(link.clone()).with_algorithm(algorithm);
    tracing::info!(
        "rank {}/{}: {} on {}, {} parameters, {} training samples",
        env.rank,
        env.world_size,
        job.parallel.strategy,
        job.transport.plugin,
        model.layout().total(),
        train.len()
    );

    let config = job.train.config(job.seed);
    let steps_per_epoch =
        (train.len().div_ceil(job.train.batch_size) as u64).div_ceil(config.grad_accum as u64);
    let mut metrics = Metrics::new(
        run_dir.as_ref().map(|d| d.join("metrics.jsonl")).as_deref(),
        env.rank == 0,
        opts.progress,
        steps_per_epoch,
        job.train.epochs,
    )?;
    if let (Some(dir), Some(vocab)) = (&run_dir, &data.vocab) {
        let tokens: Vec<String> = vocab.iter().map(char::to_string).collect();
        let json = serde_json::json!({ "kind": "characters", "tokens": tokens });
        write_atomic(&dir.join("vocab.json"), json.to_string().as_bytes())?;
    }
    let result = strategy.train(TrainContext {
        config,
        comm: &comm,
        model: model.as_mut(),
        optimizer: optimizer.as_mut(),
        partitioner: partitioner.as_ref(),
        train,
        test,
        metrics: &mut metrics,
    });
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
    // Every rank's parameter count, peak activations, busy and idle time.
    let peak = match trained.peak_activation_bytes {
        0 => crate::plan::need_bytes(job, &plan, env.rank).1,
        measured => measured,
    };
    let mine = [model.layout().total() as f64, peak as f64, trained.busy_seconds, trained.idle_seconds];
    let mut all = vec![0f64; 4 * env.world_size];
    comm.allgather(bytemuck::cast_slice(&mine), bytemuck::cast_slice_mut(&mut all), dl())
        .map_err(train_err)?;
    let column = |k: usize| all.chunks_exact(4).map(|r| r[k]).collect::<Vec<f64>>();
    let (busy, idle) = (column(2), column(3));
    // Strategies that measure waiting (pipelines) report a bubble.
    let bubble = idle.iter().any(|&i| i > 0.0).then(|| {
        let fractions: Vec<f64> =
            busy.iter().zip(&idle).map(|(b, i)| if b + i > 0.0 { i / (b + i) } else { 0.0 }).collect();
        fractions.iter().sum::<f64>() / fractions.len() as f64
    });
    let full = gather_full_params(&comm, model.as_ref(), &plan, dl).map_err(train_err)?;

    let summary = Summary {
        world_size: env.world_size,
        strategy: job.parallel.strategy.clone(),
        transport: job.transport.plugin.clone(),
        device: job.compute.device.clone(),
        trained_values: trained.to_values().into_iter().map(|(k, v)| (k, json_number(v))).collect(),
        val_loss: data.tokens_per_sample().map(|_| trained.test_loss),
        tokens_per_sec: data.tokens_per_sample().map(|t| trained.samples_per_sec * t as f64),
        trained: trained.clone(),
        params: whole.total(),
        params_per_rank: column(0).into_iter().map(|v| v as u64).collect(),
        peak_activation_bytes_per_rank: column(1).into_iter().map(|v| v as u64).collect(),
        busy_seconds_per_rank: busy,
        idle_seconds_per_rank: idle,
        bubble_fraction: bubble,
        job: serde_json::to_value(job).unwrap_or_default(),
    };
    if let (Some(dir), Some(full)) = (&run_dir, &full) {
        write_atomic(&dir.join("checkpoint.safetensors"), &safetensors_bytes(&whole, full))?;
        let json = serde_json::to_vec_pretty(&summary).expect("summary serialises");
        write_atomic(&dir.join("summary.json"), &json)?;
    }
    comm.barrier(dl()).map_err(train_err)?;
    link.close(dl()).map_err(train_err)?;
    Ok(summary)
}

/// The whole model's parameters on rank 0 (`None` elsewhere): its own, or under model
/// parallelism each distinct piece sent to rank 0 by the lowest rank holding it and
/// put in place, so the checkpoint always holds the model one process would.
fn gather_full_params(
    comm: &Group,
    model: &dyn sheaf_core::Model,
    plan: &crate::plan::Plan,
    dl: impl Fn() -> Deadline,
) -> Result<Option<Vec<f32>>, sheaf_core::CommError> {
    const PIECE_TAG: u32 = 0x5EAF_0001;
    let mut mine = vec![0f32; model.layout().total()];
    model.read_params(&mut mine).map_err(|e| sheaf_core::CommError::Protocol {
        op: sheaf_core::Op::Gather,
        peer: comm.rank(),
        detail: e.to_string(),
    })?;
    let rank = comm.rank();
    if !plan.is_model_parallel() {
        return Ok((rank == 0).then_some(mine));
    }
    let senders = plan.representatives();
    if rank != 0 {
        if senders.contains(&rank) {
            comm.send(0, PIECE_TAG, bytemuck::cast_slice(&mine), dl())?;
        }
        return Ok(None);
    }
    let whole = &plan.info.layout;
    let mut full = vec![0f32; whole.total()];
    plan.layouts[0].place(whole, &mine, &mut full);
    for &r in senders.iter().filter(|&&r| r != 0) {
        let piece = &plan.layouts[r];
        let bytes = comm.recv(r, PIECE_TAG, dl())?;
        let want = piece.layout.total() * 4;
        if bytes.len() != want {
            return Err(sheaf_core::CommError::Protocol {
                op: sheaf_core::Op::Gather,
                peer: r,
                detail: format!("sent {} bytes of parameters, its piece has {want}", bytes.len()),
            });
        }
        let values: Vec<f32> =
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect();
        piece.place(whole, &values, &mut full);
    }
    Ok(Some(full))
}
