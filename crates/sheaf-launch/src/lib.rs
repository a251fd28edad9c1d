//! `sheaf launch`: N local worker processes, like `torchrun --nproc-per-node N`. The
//! launcher checks the job, picks a rendezvous port and a run directory, starts the
//! workers with torchrun's environment, prefixes their output with the rank (and
//! copies it to `RUN_DIR/logs/rank-N.log`), and if one fails stops the others and
//! either reports which or, with `--max-restarts`, starts the world again from the
//! newest checkpoint. Workers are supervised: each leads its own process group, gets
//! the launcher's SIGINT, SIGTERM and preemption signal forwarded (then SIGKILL after
//! the grace period; workers that stopped checkpointed make the launcher exit
//! [`sheaf_plugins::exit::PREEMPTED`]), and is killed by the kernel when the launcher
//! dies (`PR_SET_PDEATHSIG`).

pub mod preempt;
pub mod rendezvous;

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sheaf_plugins::HostError;

/// How to start the workers.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    pub workers: usize,
    /// Arguments every worker's `sheaf run` gets (job file, `--set`, `--plugin-dir`).
    pub worker_args: Vec<String>,
    pub run_dir: PathBuf,
    pub threads_per_worker: Option<usize>,
    /// Send the workers' standard output to our standard error (our standard output
    /// then carries only what the caller prints, e.g. `--json`).
    pub workers_to_stderr: bool,
    /// The workers resume the run in `run_dir` (`--resume`).
    pub resume: bool,
    /// Start the world again (from the newest checkpoint) this many times at most
    /// when a worker fails.
    pub max_restarts: usize,
    /// How long workers get to stop after a forwarded SIGINT or SIGTERM.
    pub grace: Duration,
    /// The signal besides SIGINT and SIGTERM that preempts the run (`--preempt-signal`),
    /// forwarded as they are.
    pub preempt_signal: i32,
    /// Several hosts, one launcher each, as torchrun's flags say.
    pub nodes: Nodes,
}

/// Where this launcher's workers sit among several hosts: `nnodes` launchers, this
/// one the `node_rank`th, each starting `workers` ranks, all meeting at the master.
#[derive(Clone, Debug)]
pub struct Nodes {
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    /// `None`: a free port (one host only).
    pub master_port: Option<u16>,
    /// The address this host's workers are reached at (default: found by each rank).
    pub advertise_addr: Option<String>,
    /// How few hosts a world may go on with when the others do not come back (torchrun's
    /// `--nnodes MIN:MAX`); `nnodes` is the most.
    pub min_nodes: usize,
    /// How long node 0's launcher waits for the others before each world.
    pub rejoin: Duration,
}

impl Nodes {
    /// One host.
    pub fn single() -> Nodes {
        Nodes {
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: None,
            advertise_addr: None,
            min_nodes: 1,
            rejoin: Duration::from_secs(60),
        }
    }

    /// Checks torchrun's flags against each other, naming the flag that is wrong.
    pub fn check(&self) -> Result<(), HostError> {
        if self.nnodes == 0 || self.node_rank >= self.nnodes {
            return Err(HostError::Usage(format!(
                "--node-rank {} is not below --nnodes {}",
                self.node_rank, self.nnodes
            )));
        }
        if self.min_nodes == 0 || self.min_nodes > self.nnodes {
            return Err(HostError::Usage(format!(
                "--nnodes {}:{}: the fewest hosts must be at least 1 and at most the most",
                self.min_nodes, self.nnodes
            )));
        }
        if self.nnodes > 1 {
            if self.master_port.is_none() {
                return Err(HostError::Usage("--master-port is needed with --nnodes above 1".into()));
            }
            if std::env::var(sheaf_auth::TOKEN_ENV).map_or(true, |t| t.is_empty()) {
                return Err(HostError::Usage(format!(
                    "{} must be set, to the same secret on every node, with --nnodes above 1 (e.g. from \
                     `openssl rand -hex 32`)",
                    sheaf_auth::TOKEN_ENV
                )));
            }
        }
        use std::net::ToSocketAddrs;
        (self.master_addr.as_str(), self.master_port.unwrap_or(0)).to_socket_addrs().map_err(|e| {
            HostError::input(format!("--master-addr {} does not resolve", self.master_addr), e)
        })?;
        Ok(())
    }
}

/// `runs/<UTC date>-<time>-<pid>`.
pub fn default_run_dir() -> PathBuf {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    PathBuf::from("runs").join(format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}-{}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        std::process::id()
    ))
}

/// A free TCP port on loopback, for a local world's rendezvous.
///
/// Picked at random below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), and checked free: a port the kernel
/// hands out for `:0` can be handed out again to another process's outgoing
/// connection or `:0` bind (a ZeroMQ inbox, say) between this check and rank 0's bind,
/// which failed parallel launches on one host with "Address already in use". Below
/// the range only another launcher's pick can collide, one chance in thousands.
pub fn free_port() -> Result<u16, HostError> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u16>().ok()))
        .unwrap_or(32768);
    let low = ephemeral_low.saturating_sub(12_288).max(1024);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut rng = sheaf_core::SplitMix64::new(nanos as u64 ^ (u64::from(std::process::id()) << 32));
    if ephemeral_low > low {
        for _ in 0..64 {
            let port = low + (rng.next_u64() % u64::from(ephemeral_low - low)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| HostError::os("cannot find a free port for the rendezvous", e))?;
    Ok(l.local_addr().map_err(|e| HostError::os("cannot read the rendezvous port", e))?.port())
}

/// This executable as rank `rank` of a local world of `world` ranks meeting at
/// `127.0.0.1:port`: torchrun's variables, `threads` compute threads, no stdin. The
/// caller adds the arguments and where the output goes.
pub fn local_worker(exe: &std::path::Path, rank: usize, world: usize, port: u16, threads: usize) -> Command {
    worker_command(exe, (rank, rank, world, world), ("127.0.0.1", port), threads)
}

/// `workers` commands of this executable forming one local world (a free rendezvous
/// port, the cores shared among them), each passed `plugin_dirs`: the caller adds its
/// subcommand, arguments and where the output goes.
pub fn local_world(workers: usize, plugin_dirs: &[std::path::PathBuf]) -> Result<Vec<Command>, HostError> {
    let exe = std::env::current_exe().map_err(|e| HostError::os("cannot find the sheaf executable", e))?;
    let port = free_port()?;
    let threads = threads_per_worker(workers);
    Ok((0..workers)
        .map(|rank| {
            let mut cmd = local_worker(&exe, rank, workers, port, threads);
            for d in plugin_dirs {
                cmd.arg("--plugin-dir").arg(d);
            }
            cmd
        })
        .collect())
}

/// The launcher's command line (JSON), which its workers report as the run's.
pub const LAUNCH_COMMAND_ENV: &str = "SHEAF_LAUNCH_COMMAND";

/// Variables of other launchers, which a worker of ours must not inherit (run under
/// `srun`, a launcher's own SLURM_PROCID would contradict its workers' RANK).
const OTHER_LAUNCHERS: &[&str] = &[
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMI_RANK",
    "PMI_SIZE",
    "MPI_LOCALRANKID",
    "JOB_COMPLETION_INDEX",
    // No torchrun agent serves a store on the port this launcher picks, and its
    // workers meet there.
    "TORCHELASTIC_USE_AGENT_STORE",
    "SHEAF_MASTER_PORT",
];

/// This executable as `(rank, local rank, ranks on this host, world)` meeting at
/// `master`: torchrun's variables and the job's secret, `threads` compute threads, no
/// stdin.
pub fn worker_command(
    exe: &std::path::Path,
    (rank, local_rank, local_world, world): (usize, usize, usize, usize),
    (master_addr, master_port): (&str, u16),
    threads: usize,
) -> Command {
    let mut cmd = Command::new(exe);
    for v in OTHER_LAUNCHERS {
        cmd.env_remove(v);
    }
    cmd.env(sheaf_auth::TOKEN_ENV, job_token())
        .env(
            LAUNCH_COMMAND_ENV,
            serde_json::to_string(&std::env::args().collect::<Vec<_>>()).unwrap_or_default(),
        )
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", local_rank.to_string())
        .env("LOCAL_WORLD_SIZE", local_world.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", master_addr)
        .env("MASTER_PORT", master_port.to_string())
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string())
        .stdin(Stdio::null());
    cmd
}

/// The secret of the jobs this process launches: `SHEAF_JOB_TOKEN` when set (so
/// launchers on several hosts can share one), else made once, at random.
pub fn job_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        std::env::var(sheaf_auth::TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(sheaf_auth::generate_token)
    })
}

/// Compute threads per worker when `workers` share this machine.
pub fn threads_per_worker(workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / workers.max(1)).max(1)
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("killed by signal {sig}");
        }
    }
    match status.code() {
        Some(c) => format!("exit status {c}"),
        None => status.to_string(),
    }
}

/// A rank's log file (`RUN_DIR/logs/rank-N.log`), shared by its two output streams.
type Log = Arc<Mutex<Option<std::fs::File>>>;

/// Copies a worker's output to ours, each line prefixed with its rank, and to its log
/// file; `raw` copies bytes as they come (rank 0's progress bar redraws one line with
/// `\r`, so its log gets them as they are).
fn forward(
    rank: usize,
    stream: impl Read + Send + 'static,
    to_stderr: bool,
    raw: bool,
    log: Log,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let write = |bytes: &[u8], line: &[u8]| {
            if to_stderr {
                let _ = std::io::stderr().lock().write_all(bytes);
            } else {
                let _ = std::io::stdout().lock().write_all(bytes);
            }
            if let Some(f) = log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                let _ = f.write_all(line);
            }
        };
        if raw {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                write(&buf[..n], &buf[..n]);
            }
            return;
        }
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).map(|n| n > 0).unwrap_or(false) {
            if !line.ends_with(b"\n") {
                line.push(b'\n');
            }
            let mut out = format!("[rank {rank}] ").into_bytes();
            out.extend_from_slice(&line);
            write(&out, &line);
            line.clear();
        }
    })
}

/// Sends `sig` to each worker's process group (a worker is the leader of its own).
fn signal_all(children: &[(usize, Child)], sig: libc::c_int) {
    for (_, c) in children {
        // SAFETY: killpg(2) on the group of a child we spawned as its leader; a group
        // already gone is ESRCH, which changes nothing.
        unsafe {
            libc::killpg(c.id() as libc::pid_t, sig);
        }
    }
}

/// Asks every worker still running to stop (SIGTERM), waits up to `grace` for them,
/// then kills what is left (SIGKILL) and reaps them all.
fn terminate(children: &mut [(usize, Child)], grace: Duration) {
    signal_all(children, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while children.iter_mut().any(|(_, c)| matches!(c.try_wait(), Ok(None))) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    signal_all(children, libc::SIGKILL);
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The ranks found exited since the last look: `(exited with a code rather than
/// killed by a signal, rank, what happened)` for each that failed.
fn collect_failures(children: &mut [(usize, Child)], done: &mut [bool]) -> Vec<(bool, usize, String)> {
    let mut failed = Vec::new();
    for (i, (rank, child)) in children.iter_mut().enumerate() {
        if done[i] {
            continue;
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                done[i] = true;
                if !status.success() {
                    failed.push((
                        status.code().is_some(),
                        *rank,
                        format!("rank {rank} failed ({})", describe(status)),
                    ));
                }
            }
            Ok(None) => {}
            Err(e) => failed.push((true, *rank, format!("rank {rank}: cannot wait for it: {e}"))),
        }
    }
    failed
}

/// How one world ended.
enum Ended {
    Done,
    /// A rank failed: which, and the message naming every rank that failed.
    Failed {
        rank: usize,
        message: String,
    },
    /// The launcher got SIGINT, SIGTERM or the preemption signal, and the workers did
    /// not all stop checkpointed (or finish) within the grace period.
    Signalled(libc::c_int),
    /// The launcher forwarded a preemption signal, and every worker stopped checkpointed.
    Preempted,
}

/// Signals the launcher forwards: the last one received (0: none).
/// Registered once per process (`sheaf bench train` launches several times); a signal
/// left from an earlier launch is cleared by the caller.
fn watch_signals(preempt: libc::c_int) -> Result<Arc<AtomicUsize>, HostError> {
    static GOT: std::sync::OnceLock<Arc<AtomicUsize>> = std::sync::OnceLock::new();
    static WATCHED: Mutex<Vec<libc::c_int>> = Mutex::new(Vec::new());
    let got = GOT.get_or_init(|| Arc::new(AtomicUsize::new(0))).clone();
    let mut watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, preempt] {
        if !watched.contains(&sig) {
            signal_hook::flag::register_usize(sig, got.clone(), sig as usize)
                .map_err(|e| HostError::os(format!("cannot watch signal {sig}"), e))?;
            watched.push(sig);
        }
    }
    Ok(got)
}

/// After a forwarded signal: waits up to `grace` for every worker to exit on its own,
/// kills what is left, and says how the world ended: preempted where every worker
/// stopped checkpointed, done where every one finished anyway.
fn stop_after_signal(children: &mut [(usize, Child)], grace: Duration, sig: libc::c_int) -> Ended {
    let deadline = Instant::now() + grace;
    let mut codes: Vec<Option<i32>> = vec![None; children.len()];
    let mut exited = vec![false; children.len()];
    while exited.iter().any(|e| !e) && Instant::now() < deadline {
        for (i, (_, c)) in children.iter_mut().enumerate() {
            if let (false, Ok(Some(status))) = (exited[i], c.try_wait()) {
                (exited[i], codes[i]) = (true, status.code());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    terminate(children, Duration::ZERO);
    let all = |code: u8| codes.iter().all(|c| *c == Some(i32::from(code)));
    if all(sheaf_plugins::exit::PREEMPTED) {
        Ended::Preempted
    } else if all(sheaf_plugins::exit::OK) {
        Ended::Done
    } else {
        Ended::Signalled(sig)
    }
}

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

/// One restart, as `RUN_DIR/restarts.jsonl` records it (and `summary.json` lists).
fn record_restart(
    run_dir: &std::path::Path,
    attempt: usize,
    rank: usize,
    why: &str,
    detected_after_s: f64,
) -> Result<(), HostError> {
    let from = sheaf_checkpoint::checkpoint::latest(run_dir)?.map(|(s, _)| s);
    let line = serde_json::json!({
        "restart": attempt,
        "at_unix_ms": unix_ms() as u64,
        "rank": rank,
        "why": why,
        "world_ran_s": detected_after_s,
        "resumed_from_step": from,
    });
    let path = run_dir.join(RESTARTS);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .map_err(|e| HostError::io(&path, e))?;
    writeln!(f, "{line}").map_err(|e| HostError::io(&path, e))
}

/// The launcher's record of restarts in a run directory.
pub const RESTARTS: &str = "restarts.jsonl";

/// Starts one world of workers and waits for it to end.
fn run_world(
    opts: &LaunchOptions,
    nodes: &Nodes,
    exe: &std::path::Path,
    attempt: usize,
    resume: bool,
    signals: &AtomicUsize,
) -> Result<Ended, HostError> {
    let port = match (nodes.master_port, std::env::var("MASTER_PORT").ok().and_then(|p| p.parse().ok())) {
        (Some(p), _) | (None, Some(p)) => p,
        (None, None) => free_port()?,
    };
    let world = nodes.nnodes * opts.workers;
    let threads = opts.threads_per_worker.unwrap_or_else(|| threads_per_worker(opts.workers));
    let progress = std::io::stderr().is_terminal();
    let logs = opts.run_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| HostError::io(&logs, e))?;
    // The flight records are this world's: an earlier world's would mislead.
    let flight = opts.run_dir.join(sheaf_report::flight::DIR);
    let _ = std::fs::remove_dir_all(&flight);
    let launcher = std::process::id();
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut forwarders = Vec::new();
    for local in 0..opts.workers {
        let rank = nodes.node_rank * opts.workers + local;
        let mut cmd =
            worker_command(exe, (rank, local, opts.workers, world), (&nodes.master_addr, port), threads);
        if let Some(a) = &nodes.advertise_addr {
            cmd.env("SHEAF_ADVERTISE_ADDR", a);
        }
        cmd.arg("run").args(&opts.worker_args).arg("--run-dir").arg(&opts.run_dir);
        if resume && !opts.worker_args.iter().any(|a| a == "--resume") {
            cmd.arg("--resume").arg(&opts.run_dir);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        if progress && rank == 0 {
            cmd.env("SHEAF_PROGRESS", "1");
        } else {
            cmd.env_remove("SHEAF_PROGRESS");
        }
        // Each worker leads a process group of its own, so a terminal's Ctrl-C reaches
        // the launcher alone (which forwards it), and dies with the launcher.
        cmd.process_group(0);
        // SAFETY: between fork and exec only async-signal-safe calls: prctl, getppid.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The launcher died before the line above: nothing will kill us later.
                if libc::getppid() as u32 != launcher {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                terminate(&mut children, opts.grace);
                return Err(HostError::os(format!("cannot start rank {rank}"), e));
            }
        };
        eprintln!("[launch] rank {rank} pid {}", child.id());
        let path = logs.join(format!("rank-{rank}.log"));
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| HostError::io(&path, e))?;
        if attempt > 0 {
            let _ = writeln!(file, "--- restart {attempt} ---");
        }
        let log: Log = Arc::new(Mutex::new(Some(file)));
        let (out, err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
        forwarders.push(forward(rank, out, opts.workers_to_stderr, false, log.clone()));
        forwarders.push(forward(rank, err, true, progress && rank == 0, log));
        children.push((rank, child));
    }

    let mut done = vec![false; children.len()];
    let ended = loop {
        let sig = signals.swap(0, Ordering::SeqCst);
        if sig != 0 {
            let sig = sig as libc::c_int;
            eprintln!(
                "[launch] got signal {sig}: forwarding it to the workers, which stop at their next step \
                 with a checkpoint; those still running in {} s (--grace-s) are killed",
                opts.grace.as_secs_f64()
            );
            signal_all(&children, sig);
            break stop_after_signal(&mut children, opts.grace, sig);
        }
        // Every rank that has failed by now; one killed by a signal is the likelier
        // cause of the others' errors, so it is named first. A rank killed by a signal
        // can still be tearing down (not yet reaped) when a peer that saw it go has
        // already exited with an error, so when only such errors show, a signal's
        // victim gets up to 200 ms to show too before the culprit is named.
        let mut failed = collect_failures(&mut children, &mut done);
        if !failed.is_empty() {
            let until = Instant::now() + Duration::from_millis(200);
            while failed.iter().all(|(exited, _, _)| *exited) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
                failed.extend(collect_failures(&mut children, &mut done));
            }
            failed.sort_by_key(|(exited, _, _)| *exited);
            let rank = failed[0].1;
            let message = failed.into_iter().map(|(_, _, m)| m).collect::<Vec<_>>().join("; ");
            break Ended::Failed { rank, message };
        }
        if done.iter().all(|&d| d) {
            break Ended::Done;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    match ended {
        // Stopped above.
        Ended::Done | Ended::Signalled(_) | Ended::Preempted => {}
        // The others are waiting on the dead rank: no grace needed. First every worker
        // still running writes its flight recorder (SIGUSR2).
        Ended::Failed { .. } => {
            signal_all(&children, libc::SIGUSR2);
            std::thread::sleep(Duration::from_millis(300));
            terminate(&mut children, Duration::from_millis(500));
        }
    }
    for f in forwarders {
        let _ = f.join();
    }
    // What the ranks' flight recorders say of a failed world: who stopped where.
    if let Ended::Failed { rank, message } = ended {
        let lines = sheaf_report::flight::report(&sheaf_report::flight::read_records(&flight));
        for line in &lines {
            eprintln!("[launch] flight recorder: {line}");
        }
        let message = match lines.is_empty() {
            true => message,
            false => format!("{message}; the flight recorders say: {}", lines.join("; ")),
        };
        return Ok(Ended::Failed { rank, message });
    }
    Ok(ended)
}

/// This world's hosts: as given on one host; over several, what the launchers agree
/// on before world `round` ([`rendezvous`]): the hosts that came, renumbered.
fn agree_on_hosts(opts: &LaunchOptions, round: u64) -> Result<Nodes, HostError> {
    let nodes = &opts.nodes;
    if nodes.nnodes == 1 {
        return Ok(nodes.clone());
    }
    let port = nodes.master_port.expect("checked: several hosts have a master port").wrapping_add(1);
    let settled = match nodes.node_rank {
        0 => rendezvous::host(port, round, nodes.nnodes, nodes.min_nodes, nodes.rejoin)?,
        r => rendezvous::join(&nodes.master_addr, port, round, r, nodes.rejoin)?,
    };
    if settled.nnodes < nodes.nnodes {
        eprintln!(
            "[launch] world {round}: {} of {} hosts, this one node {} (from {})",
            settled.nnodes, nodes.nnodes, settled.node_rank, nodes.node_rank
        );
    }
    Ok(Nodes { nnodes: settled.nnodes, node_rank: settled.node_rank, ..nodes.clone() })
}

/// Starts the workers and waits for them. When one fails the others are stopped, and
/// the world is started again from the run's newest checkpoint, up to `max_restarts`
/// times (each recorded in `RUN_DIR/restarts.jsonl`); then the error names the rank
/// that failed. SIGINT and SIGTERM are forwarded to the workers, which are killed
/// after `grace`.
pub fn launch(opts: &LaunchOptions) -> Result<(), HostError> {
    if opts.workers == 0 {
        return Err(HostError::Usage("launch -n must be at least 1".into()));
    }
    let exe = std::env::current_exe().map_err(|e| HostError::os("cannot find the sheaf executable", e))?;
    std::fs::create_dir_all(&opts.run_dir).map_err(|e| HostError::io(&opts.run_dir, e))?;
    let signals = watch_signals(opts.preempt_signal)?;
    signals.store(0, Ordering::SeqCst);
    let mut attempt = 0;
    let mut resume = opts.resume;
    loop {
        let started = Instant::now();
        let nodes = agree_on_hosts(opts, attempt as u64)?;
        match run_world(opts, &nodes, &exe, attempt, resume, &signals)? {
            Ended::Done => return Ok(()),
            Ended::Signalled(signal) => {
                return Err(HostError::Stopped { signal, run_dir: opts.run_dir.clone() });
            }
            Ended::Preempted => {
                let step = sheaf_checkpoint::checkpoint::latest(&opts.run_dir)?.map(|(s, _)| s);
                return Err(HostError::Preempted { step, run_dir: opts.run_dir.clone() });
            }
            Ended::Failed { rank, message } if attempt < opts.max_restarts => {
                attempt += 1;
                record_restart(&opts.run_dir, attempt, rank, &message, started.elapsed().as_secs_f64())?;
                eprintln!(
                    "[launch] {message}; restart {attempt} of {} from the newest checkpoint",
                    opts.max_restarts
                );
                resume = true;
            }
            Ended::Failed { rank, message } => {
                return Err(HostError::RankFailed { rank, message, run_dir: opts.run_dir.clone() });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Rendezvous ports come from below the kernel's ephemeral range, where no `:0`
    /// bind or outgoing connection can take them, and are free when handed out.
    #[test]
    fn rendezvous_ports_avoid_the_ephemeral_range() {
        let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u16>().ok()))
            .unwrap_or(32768);
        for _ in 0..20 {
            let port = super::free_port().unwrap();
            assert!(port < low && port >= 1024, "{port} (ephemeral from {low})");
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}
