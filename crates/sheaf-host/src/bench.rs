//! `sheaf bench`: collectives and point-to-point over a transport plugin, in real
//! processes, reported as nccl-tests reports them. The launcher side starts the
//! workers (`sheaf bench-worker`, hidden) and prints rank 0's rows; each row carries a
//! correctness check, and every figure is measured in the same run as its baseline.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sheaf_collectives::{Algorithm, Group};
use sheaf_core::{chunk_range, CommError, Communicator, DType, Deadline, ReduceOp};

use crate::worker::WorkerEnv;
use crate::{HostError, Registry};

/// One measured size.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub op: String,
    pub size_bytes: usize,
    pub count: usize,
    pub time_us: f64,
    pub algbw_gbps: f64,
    pub busbw_gbps: f64,
    pub check: String,
    pub transport: String,
    pub algorithm: String,
    pub world_size: usize,
}

/// What the workers measure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchSpec {
    /// `allreduce`, `broadcast`, `allgather`, `reduce-scatter`, or `p2p`.
    pub op: String,
    pub transport: String,
    pub min_bytes: usize,
    pub max_bytes: usize,
    pub iters: usize,
    /// Allreduce algorithm (`auto`, `ring`, `halving-doubling`, `direct`).
    pub algorithm: String,
}

/// nccl-tests' bus bandwidth factor.
pub fn bus_factor(op: &str, n: usize) -> f64 {
    let n = n as f64;
    match op {
        "allreduce" => 2.0 * (n - 1.0) / n,
        "allgather" | "reduce-scatter" | "all-to-all" => (n - 1.0) / n,
        _ => 1.0,
    }
}

fn comm_err(rank: usize) -> impl Fn(CommError) -> HostError {
    move |e| HostError::Train { rank, detail: e.to_string() }
}

fn sizes(min: usize, max: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut s = min.max(4);
    while s <= max {
        out.push(s);
        s *= 2;
    }
    out
}

/// Element `i` of rank `rank`'s input: small integers, so sums stay exact in f32 and
/// the check is bitwise.
fn value(rank: usize, i: usize) -> f32 {
    ((i * 7 + rank * 13) % 17) as f32
}

fn fill(rank: usize, elems: usize) -> Vec<f32> {
    (0..elems).map(|i| value(rank, i)).collect()
}

fn sum(n: usize, i: usize) -> f32 {
    (0..n).map(|q| value(q, i)).sum()
}

fn bytes(v: &mut [f32]) -> &mut [u8] {
    bytemuck::cast_slice_mut(v)
}

/// Runs `op` once on buffers sized for `size` bytes; returns whether the result is right.
fn run_once(g: &Group, op: &str, size: usize, dl: Deadline, check: bool) -> Result<bool, CommError> {
    let (n, r) = (g.world_size(), g.rank());
    match op {
        "allreduce" => {
            let elems = size / 4;
            let mut buf = fill(r, elems);
            g.allreduce(bytes(&mut buf), DType::F32, ReduceOp::Sum, dl)?;
            Ok(!check || buf.iter().enumerate().all(|(i, &v)| v == sum(n, i)))
        }
        "broadcast" => {
            let elems = size / 4;
            let mut buf = if r == 0 { fill(0, elems) } else { vec![0.0; elems] };
            g.broadcast(bytes(&mut buf), 0, dl)?;
            Ok(!check || buf == fill(0, elems))
        }
        "allgather" => {
            let per = size / 4 / n;
            let mut mine = fill(r, per);
            let mut out = vec![0f32; per * n];
            g.allgather(bytes(&mut mine), bytes(&mut out), dl)?;
            Ok(!check || (0..n).all(|q| out[q * per..(q + 1) * per] == fill(q, per)[..]))
        }
        "reduce-scatter" => {
            let elems = size / 4;
            let mut input = fill(r, elems);
            let range = chunk_range(elems, n, r);
            let mut out = vec![0f32; range.len()];
            g.reduce_scatter(bytes(&mut input), bytes(&mut out), DType::F32, ReduceOp::Sum, dl)?;
            Ok(!check || range.clone().zip(&out).all(|(i, &v)| v == sum(n, i)))
        }
        "all-to-all" => {
            let per = size / 4 / n;
            // Block j of rank r's input carries (r, j) so the check can tell blocks apart.
            let mut input: Vec<f32> =
                (0..n).flat_map(|j| (0..per).map(move |i| value(r * n + j, i))).collect();
            let mut out = vec![0f32; per * n];
            g.all_to_all(bytes(&mut input), bytes(&mut out), dl)?;
            Ok(!check || (0..n).all(|q| (0..per).all(|i| out[q * per + i] == value(q * n + r, i))))
        }
        other => Err(CommError::InvalidArgument {
            op: sheaf_core::Op::Allreduce,
            detail: format!("unknown op {other}"),
        }),
    }
}

/// The worker side: measures every size and returns rank 0's rows.
pub fn bench_worker(registry: &Registry, env: &WorkerEnv, spec: &BenchSpec) -> Result<Vec<Row>, HostError> {
    let link = env.connect(registry, &spec.transport, Duration::from_secs(60), Duration::from_secs(30))?;
    let algorithm: Algorithm = spec.algorithm.parse().map_err(HostError::Usage)?;
    let g = Group::world(link.clone()).with_algorithm(algorithm);
    let err = comm_err(env.rank);
    let dl = || Deadline::after(Duration::from_secs(120));
    let n = g.world_size();
    let mut rows = Vec::new();
    if spec.op == "p2p" {
        rows = p2p(&g, spec, env.rank)?;
    } else {
        for size in sizes(spec.min_bytes, spec.max_bytes) {
            // Round so every rank's share is whole f32s.
            let size = size / (4 * n).max(4) * (4 * n).max(4);
            if size == 0 {
                continue;
            }
            let ok = run_once(&g, &spec.op, size, dl(), true).map_err(&err)?;
            g.barrier(dl()).map_err(&err)?;
            let start = Instant::now();
            for _ in 0..spec.iters {
                run_once(&g, &spec.op, size, dl(), false).map_err(&err)?;
            }
            let mut t = [start.elapsed().as_secs_f64() / spec.iters as f64, if ok { 1.0 } else { 0.0 }];
            // The slowest rank's time; every rank's check.
            let mut slowest = [t[0]];
            g.allreduce(bytes_f64(&mut slowest), DType::F64, ReduceOp::Max, dl()).map_err(&err)?;
            let mut all_ok = [t[1]];
            g.allreduce(bytes_f64(&mut all_ok), DType::F64, ReduceOp::Min, dl()).map_err(&err)?;
            t[0] = slowest[0];
            let algbw = size as f64 / t[0] / 1e9;
            rows.push(Row {
                op: spec.op.clone(),
                size_bytes: size,
                count: size / 4,
                time_us: t[0] * 1e6,
                algbw_gbps: algbw,
                busbw_gbps: algbw * bus_factor(&spec.op, n),
                check: if all_ok[0] == 1.0 { "ok".into() } else { "bad".into() },
                transport: spec.transport.clone(),
                algorithm: match spec.op.as_str() {
                    "allreduce" => algorithm.choose(size, n).name().into(),
                    "broadcast" => sheaf_collectives::broadcast_algorithm(size, n).into(),
                    _ => "ring".into(),
                },
                world_size: n,
            });
        }
    }
    link.close(dl()).map_err(&err)?;
    Ok(rows)
}

fn bytes_f64(v: &mut [f64]) -> &mut [u8] {
    bytemuck::cast_slice_mut(v)
}

/// Two ranks: one-way bandwidth per size (a stream of messages, then one reply),
/// round-trip latency of a 4-byte ping-pong, and single-thread memcpy bandwidth.
fn p2p(g: &Group, spec: &BenchSpec, rank: usize) -> Result<Vec<Row>, HostError> {
    let err = comm_err(rank);
    let dl = || Deadline::after(Duration::from_secs(120));
    if g.world_size() != 2 {
        return Err(HostError::Usage("bench p2p needs exactly 2 ranks".into()));
    }
    let peer = 1 - g.rank();
    let mut rows = Vec::new();
    let row = |op: &str, size: usize, secs: f64, check: bool| Row {
        op: op.into(),
        size_bytes: size,
        count: size,
        time_us: secs * 1e6,
        algbw_gbps: size as f64 / secs / 1e9,
        busbw_gbps: size as f64 / secs / 1e9,
        check: if check { "ok".into() } else { "bad".into() },
        transport: spec.transport.clone(),
        algorithm: "p2p".into(),
        world_size: 2,
    };
    // Latency: median of ping-pongs.
    let mut rtts = Vec::new();
    for i in 0..(spec.iters * 10).max(50) {
        let start = Instant::now();
        if g.rank() == 0 {
            g.send(peer, 1, &(i as u32).to_le_bytes(), dl()).map_err(&err)?;
            g.recv(peer, 2, dl()).map_err(&err)?;
        } else {
            let m = g.recv(peer, 1, dl()).map_err(&err)?;
            g.send(peer, 2, &m, dl()).map_err(&err)?;
        }
        rtts.push(start.elapsed().as_secs_f64());
    }
    rtts.sort_by(f64::total_cmp);
    rows.push(row("p2p-rtt", 4, rtts[rtts.len() / 2], true));
    for size in sizes(spec.min_bytes, spec.max_bytes) {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        g.barrier(dl()).map_err(&err)?;
        let start = Instant::now();
        let mut ok = true;
        if g.rank() == 0 {
            for _ in 0..spec.iters {
                g.send(peer, 3, &payload, dl()).map_err(&err)?;
            }
            g.recv(peer, 4, dl()).map_err(&err)?;
        } else {
            for _ in 0..spec.iters {
                ok &= g.recv(peer, 3, dl()).map_err(&err)? == payload;
            }
            g.send(peer, 4, &[], dl()).map_err(&err)?;
        }
        let secs = start.elapsed().as_secs_f64() / spec.iters as f64;
        rows.push(row("p2p-oneway", size, secs, ok));
    }
    // memcpy: the bound every transport on this host is measured against.
    // At least 64 MiB, so the copy runs from memory rather than cache.
    let src = vec![1u8; spec.max_bytes.max(64 << 20)];
    let mut dst = vec![0u8; src.len()];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        dst.copy_from_slice(&src);
        best = best.min(start.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    rows.push(row("memcpy", src.len(), best, dst == src));
    Ok(rows)
}

/// The launcher side: starts `workers` processes of `sheaf bench-worker` and returns
/// rank 0's rows.
pub fn bench(
    spec: &BenchSpec,
    workers: usize,
    plugin_dirs: &[std::path::PathBuf],
) -> Result<Vec<Row>, HostError> {
    let exe = std::env::current_exe().map_err(|e| HostError::Launch(e.to_string()))?;
    let port = crate::launch::free_port()?;
    let spec_json = serde_json::to_string(spec).expect("spec serialises");
    let threads = crate::launch::threads_per_worker(workers);
    let mut children = Vec::new();
    for rank in 0..workers {
        let mut cmd = crate::launch::local_worker(&exe, rank, workers, port, threads);
        for d in plugin_dirs {
            cmd.arg("--plugin-dir").arg(d);
        }
        cmd.args(["bench-worker", &spec_json]).stdout(Stdio::piped()).stderr(Stdio::inherit());
        children.push(cmd.spawn().map_err(|e| HostError::Launch(format!("cannot start rank {rank}: {e}")))?);
    }
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().map_err(|e| HostError::Launch(e.to_string()))?;
        if !out.status.success() {
            failed.push(format!("rank {rank} failed ({})", out.status));
        } else if rank == 0 {
            rows = serde_json::from_slice(&out.stdout)
                .map_err(|e| HostError::Launch(format!("rank 0 printed no rows: {e}")))?;
        }
    }
    if !failed.is_empty() {
        return Err(HostError::Launch(failed.join("; ")));
    }
    Ok(rows)
}

/// nccl-tests-style table.
pub fn render(rows: &[Row], out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>14} {:>12} {:>14} {:>12} {:>12} {:>6}  {} / {} / world {}",
        "size(B)",
        "count",
        "time(us)",
        "algbw(GB/s)",
        "busbw(GB/s)",
        "check",
        rows.first().map_or("", |r| r.op.as_str()),
        rows.first().map_or("", |r| r.transport.as_str()),
        rows.first().map_or(0, |r| r.world_size)
    )?;
    for r in rows {
        writeln!(
            out,
            "{:>14} {:>12} {:>14.2} {:>12.3} {:>12.3} {:>6}  {}",
            r.size_bytes, r.count, r.time_us, r.algbw_gbps, r.busbw_gbps, r.check, r.op
        )?;
    }
    Ok(())
}
