//! `sheaf doctor JOB`: checks a world before it spends a cluster's time, as one rank
//! per process under any launcher (like `sheaf run`): the job and every rank's memory
//! plan against `compute.memory_limit_mb`; a roll call over plain TCP
//! ([`crate::rollcall`]) in which every rank reaches every other, so that a world that
//! cannot meet gets an N x N reachability matrix naming the ranks that never came and
//! the pairs that failed; then the world meets over the job's transport; every rank pings
//! every other (an N x N matrix of round trips, "--" where a peer did not answer); a
//! short allreduce and compute probe on every rank, naming the ranks slower than the
//! median by more than `--slow-factor`. Rank 0 prints the report; every rank exits
//! non-zero when anything is wrong.

use std::io::Write;
use std::time::{Duration, Instant};

use sheaf_core::{Communicator, DType, Deadline, ReduceOp};

use sheaf_job::job::Job;
use sheaf_plugins::{HostError, Registry};
use sheaf_runtime::WorkerEnv;

const PING_TAG: u32 = 0x5EAF_0D0C;

/// What each rank measured, as rank 0 reports it.
struct Probe {
    rtt_ms: Vec<f64>,
    allreduce_ms: f64,
    compute_ms: f64,
}

/// A fixed amount of arithmetic (a few tens of milliseconds on one core): the compute
/// probe, the same on every rank whatever the job, so ranks compare.
fn compute_probe(slow: Option<Duration>) -> f64 {
    let t = Instant::now();
    let n = 256;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.25).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.5).collect();
    let mut c = vec![0f32; n * n];
    for _ in 0..2 {
        for i in 0..n {
            for k in 0..n {
                let x = a[i * n + k];
                for (cj, bj) in c[i * n..(i + 1) * n].iter_mut().zip(&b[k * n..(k + 1) * n]) {
                    *cj += x * bj;
                }
            }
        }
    }
    std::hint::black_box(&c);
    if let Some(d) = slow {
        std::thread::sleep(d);
    }
    t.elapsed().as_secs_f64() * 1e3
}

/// Pings every other rank in turn (rank `r` pings `r + d` while `r - d` pings it, for
/// d = 1 .. n-1): the round trip to each, `NaN` where the peer did not answer in time.
fn ping_all(comm: &dyn Communicator, timeout: Duration) -> Vec<f64> {
    let (r, n) = (comm.rank(), comm.world_size());
    let mut rtt = vec![0.0; n];
    for d in 1..n {
        let (to, from) = ((r + d) % n, (r + n - d) % n);
        let dl = || Deadline::after(timeout);
        let t = Instant::now();
        let sent = comm.send(to, PING_TAG, &[1], dl()).is_ok();
        // Answer the rank pinging this one, then read this rank's answer.
        if comm.recv(from, PING_TAG, dl()).is_ok() {
            let _ = comm.send(from, PING_TAG + 1, &[2], dl());
        }
        rtt[to] = match sent && comm.recv(to, PING_TAG + 1, dl()).is_ok() {
            true => t.elapsed().as_secs_f64() * 1e3,
            false => f64::NAN,
        };
    }
    rtt
}

/// The lower median (of two ranks, the faster: the one a slow rank is compared with).
fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    s.get(s.len().saturating_sub(1) / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the checks as this rank; rank 0 writes the report to `out`. `Err` when
/// anything is wrong (after the report).
pub fn doctor(
    job: &Job,
    registry: &Registry,
    env: &WorkerEnv,
    slow_factor: f64,
    out: &mut dyn Write,
) -> Result<(), HostError> {
    let mut problems: Vec<String> = Vec::new();
    // The job and its layout over this world, each rank's memory against the budget.
    let backend = job.compute.backend_for(&job.model.kind, registry)?;
    let compute = registry.compute(&backend, &job.compute.config_json())?;
    let data = sheaf_job::data::load(job, registry, compute.as_ref())?;
    let timeout_ms = job.transport.timeout().as_millis() as u64;
    let mut unbounded = job.clone();
    unbounded.compute.memory_limit_mb = None;
    let (_, plan) =
        sheaf_job::plan::strategy_and_plan(&unbounded, env.world_size, registry, compute.as_ref(), &data)?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let needs: Vec<f64> =
        (0..env.world_size).map(|r| mib(sheaf_job::memory::planned(job, &plan, r).total)).collect();
    if let Some(limit) = job.compute.memory_limit_mb {
        for (r, &need) in needs.iter().enumerate() {
            if need > limit {
                problems.push(format!("rank {r} needs {need:.2} MiB, over the {limit} MiB budget"));
            }
        }
    }

    // Who reaches whom, before the transport, which needs every rank to meet.
    let n = env.world_size;
    let w = HostError::output;
    if n > 1 {
        let listen = env.advertise_addr()?.unwrap_or_else(|| "127.0.0.1".into());
        let reach = crate::rollcall::roll_call(env, &listen, Duration::from_millis(timeout_ms))?;
        if !reach.complete {
            if env.rank == 0 {
                problems.extend(reach.problems(&crate::rollcall::master(env)));
                writeln!(out, "sheaf doctor: {n} ranks; the world cannot meet").map_err(w)?;
                writeln!(
                    out,
                    "reachability (TCP round trips, ms), row reaches column; -- no answer, ? never came:"
                )
                .map_err(w)?;
                write!(out, "{}", reach.matrix()).map_err(w)?;
                report_problems(out, &problems).map_err(w)?;
                return Err(HostError::Check(format!(
                    "{} problem(s): {}",
                    problems.len(),
                    problems.join("; ")
                )));
            }
            let mine: Vec<String> =
                reach.failures.iter().map(|(_, q, why)| format!("cannot reach rank {q}: {why}")).collect();
            return Err(HostError::Check(format!(
                "the world cannot meet (rank 0 prints who reaches whom){}{}",
                if mine.is_empty() { "" } else { "; this rank " },
                mine.join("; ")
            )));
        }
    }

    // The world meets over the job's transport: a rank that cannot is an error naming
    // whom it could not reach.
    let connected = env.connect_job(registry, job)?;
    let comm = connected.group(job.collectives.algorithm().map_err(HostError::Job)?);
    let train_err = |e: sheaf_core::CommError| HostError::Train { rank: env.rank, detail: e.to_string() };
    let rtt = ping_all(&comm, Duration::from_secs(5));

    // Probes: 10 allreduces of 1 MiB, and a fixed computation.
    let dl = || Deadline::after(Duration::from_millis(timeout_ms));
    let mut buf = vec![0u8; 1 << 20];
    comm.barrier(dl()).map_err(train_err)?;
    let t = Instant::now();
    for _ in 0..10 {
        comm.allreduce(&mut buf, DType::F32, ReduceOp::Sum, dl()).map_err(train_err)?;
    }
    let allreduce_ms = t.elapsed().as_secs_f64() * 1e3 / 10.0;
    let slow = sheaf_report::trace::test_slowdown(env.rank);
    let compute_ms = compute_probe(slow);

    let mut mine = rtt.clone();
    mine.extend([allreduce_ms, compute_ms]);
    let mut all = vec![0f64; (n + 2) * n];
    comm.allgather(bytemuck::cast_slice(&mine), bytemuck::cast_slice_mut(&mut all), dl())
        .map_err(train_err)?;
    let probes: Vec<Probe> = all
        .chunks_exact(n + 2)
        .map(|c| Probe { rtt_ms: c[..n].to_vec(), allreduce_ms: c[n], compute_ms: c[n + 1] })
        .collect();
    for (r, p) in probes.iter().enumerate() {
        for (q, &t) in p.rtt_ms.iter().enumerate() {
            if q != r && !t.is_finite() {
                problems.push(format!("rank {r} cannot reach rank {q}"));
            }
        }
    }
    let (ar, cp) = (
        median(&probes.iter().map(|p| p.allreduce_ms).collect::<Vec<_>>()),
        median(&probes.iter().map(|p| p.compute_ms).collect::<Vec<_>>()),
    );
    for (r, p) in probes.iter().enumerate() {
        if p.compute_ms > slow_factor * cp {
            problems.push(format!(
                "rank {r} computes slowly: {:.1} ms against the median {cp:.1} ms",
                p.compute_ms
            ));
        }
        if p.allreduce_ms > slow_factor * ar {
            problems.push(format!(
                "rank {r}'s allreduce is slow: {:.2} ms against the median {ar:.2} ms",
                p.allreduce_ms
            ));
        }
    }

    if env.rank == 0 {
        writeln!(out, "sheaf doctor: {n} ranks, {} on {}", job.parallel.strategy, job.transport.plugin())
            .map_err(w)?;
        writeln!(out, "round trips (ms), row pings column:").map_err(w)?;
        write!(out, "{:>8}", "").map_err(w)?;
        for q in 0..n {
            write!(out, "{:>9}", format!("rank {q}")).map_err(w)?;
        }
        writeln!(out).map_err(w)?;
        for (r, p) in probes.iter().enumerate() {
            write!(out, "{:>8}", format!("rank {r}")).map_err(w)?;
            for (q, &t) in p.rtt_ms.iter().enumerate() {
                let cell = if q == r {
                    "·".to_string()
                } else if t.is_finite() {
                    format!("{t:.3}")
                } else {
                    "--".into()
                };
                write!(out, "{cell:>9}").map_err(w)?;
            }
            writeln!(out).map_err(w)?;
        }
        for (r, p) in probes.iter().enumerate() {
            let budget = job
                .compute
                .memory_limit_mb
                .map_or_else(|| "no budget".to_string(), |l| format!("of {l} MiB"));
            writeln!(
                out,
                "rank {r}: memory {:.2} MiB ({budget}); allreduce 1 MiB {:.2} ms; compute probe {:.1} ms",
                needs[r], p.allreduce_ms, p.compute_ms
            )
            .map_err(w)?;
        }
        report_problems(out, &problems).map_err(w)?;
    }
    comm.barrier(dl()).map_err(train_err)?;
    connected.link.close(dl()).map_err(train_err)?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(HostError::Check(format!("{} problem(s): {}", problems.len(), problems.join("; "))))
    }
}

/// The report's last lines: each problem, then the verdict.
fn report_problems(out: &mut dyn Write, problems: &[String]) -> std::io::Result<()> {
    for p in problems {
        writeln!(out, "problem: {p}")?;
    }
    match problems.len() {
        0 => writeln!(out, "doctor: OK"),
        k => writeln!(out, "doctor: {k} problem(s)"),
    }
}

/// `sheaf doctor -n N`: the doctor as N local ranks of one world (the job's secret and
/// a free rendezvous port filled in, as `sheaf launch` does), rank 0's report printed;
/// fails when any rank does.
pub fn local(
    plugin_dirs: &[std::path::PathBuf],
    file: Option<&std::path::Path>,
    overrides: &[String],
    slow_factor: f64,
    workers: usize,
) -> Result<(), HostError> {
    if workers == 0 {
        return Err(HostError::Usage("doctor -n 0: a world needs at least one rank".into()));
    }
    // A bad job fails here, once, rather than in every rank.
    sheaf_job::job::load_job(file, overrides)?;
    let mut children = Vec::new();
    for (rank, mut cmd) in sheaf_launch::local_world(workers, plugin_dirs)?.into_iter().enumerate() {
        cmd.arg("doctor");
        if let Some(f) = file {
            cmd.arg(f);
        }
        for o in overrides {
            cmd.args(["--set", o]);
        }
        cmd.args(["--slow-factor", &slow_factor.to_string()]);
        children.push(cmd.spawn().map_err(|e| HostError::os(format!("cannot start rank {rank}"), e))?);
    }
    let mut failed = Vec::new();
    for (rank, mut child) in children.into_iter().enumerate() {
        let status = child.wait().map_err(|e| HostError::os("cannot wait for a rank", e))?;
        if !status.success() {
            failed.push(rank.to_string());
        }
    }
    match failed.is_empty() {
        true => Ok(()),
        false => Err(HostError::Check(format!("doctor: rank(s) {} found problems", failed.join(", ")))),
    }
}
