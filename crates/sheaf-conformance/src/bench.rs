//! `sheaf bench`: collectives and point-to-point over a transport plugin, in real
//! processes, reported as nccl-tests reports them. The launcher side starts the
//! workers (`sheaf bench-worker`, hidden) and prints rank 0's rows; each row carries a
//! correctness check, and every figure is measured in the same run as its baseline.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sheaf_collectives::{Algorithm, Group};
use sheaf_core::{chunk_range, CommError, Communicator, DType, Deadline, ReduceOp, Tag, TagClass};

use sheaf_plugins::{HostError, Registry};
use sheaf_runtime::WorkerEnv;

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

/// One rank's buffers for `op` on `size` bytes, filled once: the timed runs reuse
/// them, as nccl-tests does, so allocation and page faults stay out of the timing.
struct Buffers {
    input: Vec<f32>,
    out: Vec<f32>,
}

fn buffers(op: &str, size: usize, n: usize, r: usize) -> Buffers {
    let (elems, per) = (size / 4, size / 4 / n);
    let (input, out) = match op {
        "broadcast" if r != 0 => (vec![0.0; elems], Vec::new()),
        "allgather" => (fill(r, per), vec![0f32; per * n]),
        "reduce-scatter" => (fill(r, elems), vec![0f32; chunk_range(elems, n, r).len()]),
        // Block j of rank r's input carries (r, j) so the check can tell blocks apart.
        "all-to-all" => {
            ((0..n).flat_map(|j| (0..per).map(move |i| value(r * n + j, i))).collect(), vec![0f32; per * n])
        }
        _ => (fill(r, elems), Vec::new()),
    };
    Buffers { input, out }
}

/// Runs `op` once on `b`.
fn run_once(g: &Group, op: &str, b: &mut Buffers, dl: Deadline) -> Result<(), CommError> {
    match op {
        "allreduce" => g.allreduce(bytes(&mut b.input), DType::F32, ReduceOp::Sum, dl),
        "broadcast" => g.broadcast(bytes(&mut b.input), 0, dl),
        "allgather" => g.allgather(bytes(&mut b.input), bytes(&mut b.out), dl),
        "reduce-scatter" => {
            g.reduce_scatter(bytes(&mut b.input), bytes(&mut b.out), DType::F32, ReduceOp::Sum, dl)
        }
        "all-to-all" => g.all_to_all(bytes(&mut b.input), bytes(&mut b.out), dl),
        other => Err(CommError::InvalidArgument {
            op: sheaf_core::Op::Allreduce,
            detail: format!("unknown op {other}"),
        }),
    }
}

/// Whether `b` holds the right result after one run of `op` on fresh buffers.
fn correct(op: &str, b: &Buffers, n: usize, r: usize) -> bool {
    let (elems, per) = (b.input.len(), b.out.len() / n.max(1));
    match op {
        "allreduce" => b.input.iter().enumerate().all(|(i, &v)| v == sum(n, i)),
        "broadcast" => b.input == fill(0, elems),
        "allgather" => (0..n).all(|q| b.out[q * per..(q + 1) * per] == fill(q, per)[..]),
        "reduce-scatter" => chunk_range(elems, n, r).zip(&b.out).all(|(i, &v)| v == sum(n, i)),
        "all-to-all" => (0..n).all(|q| (0..per).all(|i| b.out[q * per + i] == value(q * n + r, i))),
        _ => false,
    }
}

/// The worker side: measures every size and returns rank 0's rows.
pub fn bench_worker(registry: &Registry, env: &WorkerEnv, spec: &BenchSpec) -> Result<Vec<Row>, HostError> {
    let connected =
        env.connect(registry, &spec.transport, Duration::from_secs(60), Duration::from_secs(30))?;
    let algorithm: Algorithm = spec.algorithm.parse().map_err(HostError::Usage)?;
    let err = comm_err(env.rank);
    let dl = || Deadline::after(Duration::from_secs(120));
    // `auto` as a run would tune it, measured afresh.
    let (g, _) = sheaf_runtime::tuning::tune(connected.group(algorithm), &spec.transport, None, dl())?;
    let link = connected.link.clone();
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
            let mut b = buffers(&spec.op, size, n, env.rank);
            run_once(&g, &spec.op, &mut b, dl()).map_err(&err)?;
            let ok = correct(&spec.op, &b, n, env.rank);
            let warm = Instant::now();
            run_once(&g, &spec.op, &mut b, dl()).map_err(&err)?;
            let iters = iterations(&g, warm.elapsed(), spec.iters).map_err(&err)?;
            g.barrier(dl()).map_err(&err)?;
            let start = Instant::now();
            for _ in 0..iters {
                run_once(&g, &spec.op, &mut b, dl()).map_err(&err)?;
            }
            let mut t = [start.elapsed().as_secs_f64() / iters as f64, if ok { 1.0 } else { 0.0 }];
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
                    "broadcast" => sheaf_collectives::BroadcastAlgorithm::choose(size, n).name().into(),
                    // Group::all_to_all sends every block straight to its rank.
                    "all-to-all" => "direct".into(),
                    // Group::allgather and reduce_scatter run rings.
                    _ => "ring".into(),
                },
                world_size: n,
            });
        }
    }
    link.close(dl()).map_err(&err)?;
    Ok(rows)
}

/// Timed runs for one size: at least `min`, and enough that the size runs for about
/// [`MIN_TIMED`] judging by one warm run, so that a scheduler hiccup of a few tens of
/// microseconds cannot dominate a small size. Every rank takes the largest count.
fn iterations(g: &Group, warm: Duration, min: usize) -> Result<usize, CommError> {
    let want = (MIN_TIMED.as_secs_f64() / warm.as_secs_f64().max(1e-7)).ceil() as usize;
    let mut count = [want.clamp(min, MAX_ITERS.max(min)) as f64];
    g.allreduce(bytes_f64(&mut count), DType::F64, ReduceOp::Max, Deadline::after(Duration::from_secs(60)))?;
    Ok(count[0] as usize)
}

const MIN_TIMED: Duration = Duration::from_millis(30);
const MAX_ITERS: usize = 20_000;

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
    let (link, data_tag) = (g.link(), Tag::new(0, TagClass::User, 3));
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
        // The receiver reuses one buffer, straight from the transport's buffers when
        // it can, as the collectives do.
        let mut got = vec![0u8; size];
        let warm = Instant::now();
        g.send(peer, 5, &payload, dl()).map_err(&err)?;
        g.recv(peer, 5, dl()).map_err(&err)?;
        let iters = iterations(g, warm.elapsed(), spec.iters).map_err(&err)?;
        g.barrier(dl()).map_err(&err)?;
        let start = Instant::now();
        let mut ok = true;
        if g.rank() == 0 {
            for _ in 0..iters {
                link.send(peer, data_tag, &payload, dl()).map_err(&err)?;
            }
            g.recv(peer, 4, dl()).map_err(&err)?;
        } else {
            for _ in 0..iters {
                match link.recv_into(peer, data_tag, &mut got, None, dl()) {
                    Err(CommError::Unsupported { .. }) => {
                        got = link.recv(peer, data_tag, dl()).map_err(&err)?;
                    }
                    other => other.map_err(&err)?,
                }
            }
            ok = got == payload;
            g.send(peer, 4, &[], dl()).map_err(&err)?;
        }
        let secs = start.elapsed().as_secs_f64() / iters as f64;
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
    let spec_json = serde_json::to_string(spec).expect("spec serialises");
    let mut children = Vec::new();
    for (rank, mut cmd) in sheaf_launch::local_world(workers, plugin_dirs)?.into_iter().enumerate() {
        cmd.args(["bench-worker", &spec_json]).stdout(Stdio::piped()).stderr(Stdio::inherit());
        children.push(cmd.spawn().map_err(|e| HostError::os(format!("cannot start rank {rank}"), e))?);
    }
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().map_err(|e| HostError::os("cannot wait for a rank", e))?;
        if !out.status.success() {
            failed.push(format!("rank {rank} failed ({})", out.status));
        } else if rank == 0 {
            rows = serde_json::from_slice(&out.stdout)
                .map_err(|e| HostError::os("rank 0 printed no rows", e.into()))?;
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

/// `sheaf bench train`: each run's throughput and their median.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    pub workers: usize,
    pub threads_per_worker: Option<usize>,
    /// `tokens_per_sec` for token data, else `samples_per_sec`.
    pub unit: &'static str,
    pub runs: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// The last run's final loss and its validation loss or test accuracy.
    pub final_loss: f64,
    pub quality: f64,
    pub run_dir: String,
}

/// The report of `summaries` (each run's `summary.json`).
pub fn train_report(
    summaries: &[serde_json::Value],
    workers: usize,
    threads_per_worker: Option<usize>,
    base: &std::path::Path,
) -> TrainReport {
    let tokens = summaries.first().is_some_and(|s| s["tokens_per_sec"].is_number());
    let key = if tokens { "tokens_per_sec" } else { "samples_per_sec" };
    let runs: Vec<f64> = summaries.iter().map(|s| s[key].as_f64().unwrap_or(f64::NAN)).collect();
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    let last = summaries.last().cloned().unwrap_or_default();
    let quality = if tokens { &last["val_loss"] } else { &last["test_accuracy"] };
    TrainReport {
        workers,
        threads_per_worker,
        unit: if tokens { "tokens/s" } else { "samples/s" },
        median: sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN),
        min: sorted.first().copied().unwrap_or(f64::NAN),
        max: sorted.last().copied().unwrap_or(f64::NAN),
        runs,
        final_loss: last["final_loss"].as_f64().unwrap_or(f64::NAN),
        quality: quality.as_f64().unwrap_or(f64::NAN),
        run_dir: base.display().to_string(),
    }
}

/// The report as a few lines of text.
pub fn render_train(r: &TrainReport, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let threads = r.threads_per_worker.map_or("default".to_string(), |t| t.to_string());
    writeln!(out, "{} worker(s) x {threads} thread(s), {} runs", r.workers, r.runs.len())?;
    let each: Vec<String> = r.runs.iter().map(|v| format!("{v:.0}")).collect();
    writeln!(
        out,
        "{}: median {:.0} (min {:.0}, max {:.0}); runs {}",
        r.unit,
        r.median,
        r.min,
        r.max,
        each.join(", ")
    )?;
    let what = if r.unit == "tokens/s" { "val_loss" } else { "test accuracy" };
    writeln!(
        out,
        "last run: final loss {:.4}, {what} {:.4}; outputs under {}",
        r.final_loss, r.quality, r.run_dir
    )
}

#[cfg(test)]
mod tests {
    use super::{buffers, correct, Buffers};

    /// Every rank's buffers after `op`, computed from every rank's inputs by the
    /// collective's plain definition (nothing of `correct`'s formulas).
    fn after(op: &str, size: usize, n: usize) -> Vec<Buffers> {
        let ins: Vec<Buffers> = (0..n).map(|r| buffers(op, size, n, r)).collect();
        let (elems, per) = (size / 4, size / 4 / n);
        let summed: Vec<f32> =
            (0..ins[0].input.len()).map(|i| ins.iter().map(|b| b.input[i]).sum()).collect();
        (0..n)
            .map(|r| {
                let mut b = buffers(op, size, n, r);
                match op {
                    "allreduce" => b.input = summed.clone(),
                    "broadcast" => b.input = ins[0].input.clone(),
                    "allgather" => b.out = ins.iter().flat_map(|q| q.input.clone()).collect(),
                    "reduce-scatter" => {
                        b.out = sheaf_core::chunk_range(elems, n, r).map(|i| summed[i]).collect()
                    }
                    "all-to-all" => {
                        b.out = (0..n).flat_map(|q| ins[q].input[r * per..(r + 1) * per].to_vec()).collect()
                    }
                    other => panic!("{other}"),
                }
                b
            })
            .collect()
    }

    /// Adds `d` to element `i` of the buffer `op` writes its result to.
    fn nudge(b: &mut Buffers, i: usize, d: f32) {
        let target = if b.out.is_empty() { &mut b.input } else { &mut b.out };
        target[i] += d;
    }

    /// The bench's check says "ok" for every op's right result and "bad" for a result
    /// with any one element wrong, in worlds of 1 to 4.
    #[test]
    fn the_check_tells_right_results_from_wrong_ones() {
        for op in ["allreduce", "broadcast", "allgather", "reduce-scatter", "all-to-all"] {
            for n in 1..=4 {
                let size = 4 * n * 6;
                for (r, mut b) in after(op, size, n).into_iter().enumerate() {
                    assert!(correct(op, &b, n, r), "{op} n={n} rank {r}: a right result called bad");
                    let len = if b.out.is_empty() { b.input.len() } else { b.out.len() };
                    for i in 0..len {
                        nudge(&mut b, i, 1.0);
                        assert!(!correct(op, &b, n, r), "{op} n={n} rank {r}: element {i} wrong, called ok");
                        nudge(&mut b, i, -1.0);
                    }
                }
            }
        }
    }
}
