//! `cargo xtask perf [--record] [--rounds R]`: the performance regression guard.
//!
//! Builds in release, then measures in one run, interleaved over R rounds (default 3),
//! medians kept: `memcpy` (this machine's copy bandwidth, measured here), every
//! transport's allreduce sweep (`sheaf bench collectives`, 2 ranks, 4 KiB to 16 MiB),
//! Open MPI's allreduce over shared memory and loopback TCP when `mpicc` and `mpirun`
//! are installed, and `sheaf bench train` on the reference jobs (2 x 1). Each figure is
//! turned into a ratio against a baseline of the same run: a transport's busbw against
//! memcpy and against MPI's on the same medium, a job's throughput against memcpy. The
//! ratios (taken round by round) are compared with `benches/perf/last.json` (the last
//! recorded run's medians, with the machine it came from): one whose median and best
//! round both fell by more than 15% is printed as a regression, one whose best round
//! did not as noise (the exit status stays 0: a noisy machine must not fail anything).
//! `--record` writes this run as the new `last.json`. Not part of CI; run it before a
//! closing note that touches a hot path and quote its table.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// A fall larger than this share of a recorded ratio is a regression.
const TOLERANCE: f64 = 0.15;
const SIZES: [u64; 7] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20];
const TRANSPORTS: [(&str, &str); 2] = [("shm", "vader"), ("zmq-tcp", "tcp")];
const JOBS: [&str; 2] = ["mlp", "gpt"];

pub fn perf(root: &Path, args: &[String]) -> Result<()> {
    let record = args.iter().any(|a| a == "--record");
    let rounds: usize = match args.iter().position(|a| a == "--rounds") {
        Some(i) => args.get(i + 1).context("--rounds needs a number")?.parse()?,
        None => 3,
    };
    run(Command::new("cargo").args(["build", "--release"]).current_dir(root))?;
    let sheaf = root.join("target/release/sheaf");
    let mpi = mpi_program(root)?;
    // Every figure of every round, by name.
    let mut seen: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for round in 1..=rounds {
        eprintln!("perf: round {round} of {rounds}");
        seen.entry("memcpy GB/s".into()).or_default().push(memcpy_gbps());
        for (transport, btl) in TRANSPORTS {
            for (size, busbw) in sheaf_sweep(&sheaf, transport)? {
                seen.entry(format!("{transport} {} busbw", label(size))).or_default().push(busbw);
            }
            if let Some(mpi) = &mpi {
                for (size, busbw) in mpi_sweep(mpi, btl)? {
                    seen.entry(format!("MPI {btl} {} busbw", label(size))).or_default().push(busbw);
                }
            }
        }
        for job in JOBS {
            let rate = train_rate(root, &sheaf, job)?;
            seen.entry(format!("{job} 2x1 per s")).or_default().push(rate);
        }
    }
    // Each ratio taken round by round (its two figures measured in the same round).
    let at = |k: &str, r: usize| seen.get(k).and_then(|v| v.get(r)).copied();
    let mut ratios: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in 0..rounds {
        let memcpy = at("memcpy GB/s", r).context("no memcpy figure")?;
        let mut put = |name: String, value: Option<f64>| {
            if let Some(v) = value {
                ratios.entry(name).or_default().push(v);
            }
        };
        for (transport, btl) in TRANSPORTS {
            for size in SIZES {
                let Some(busbw) = at(&format!("{transport} {} busbw", label(size)), r) else { continue };
                put(format!("{transport} {} / memcpy", label(size)), Some(busbw / memcpy));
                let theirs = at(&format!("MPI {btl} {} busbw", label(size)), r);
                put(format!("{transport} {} / MPI {btl}", label(size)), theirs.map(|t| busbw / t));
            }
        }
        for job in JOBS {
            put(format!("{job} 2x1 / memcpy"), at(&format!("{job} 2x1 per s"), r).map(|rate| rate / memcpy));
        }
    }
    let path = root.join("benches/perf/last.json");
    let last = std::fs::read_to_string(&path).ok().and_then(|t| parse_last(&t));
    println!("{}", render(&seen, &ratios, last.as_ref(), rounds));
    if record {
        std::fs::create_dir_all(path.parent().expect("a parent"))?;
        std::fs::write(&path, last_json(&seen, &ratios, root)?)?;
        println!("recorded as {}", path.display());
    }
    Ok(())
}

fn label(size: u64) -> String {
    if size >= 1 << 20 {
        format!("{}MiB", size >> 20)
    } else {
        format!("{}KiB", size >> 10)
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// This machine's copy bandwidth: the best of 5 copies of 64 MiB (read plus write
/// counted once, as `busbw` counts bytes moved).
fn memcpy_gbps() -> f64 {
    let src = vec![1u8; 64 << 20];
    let mut dst = vec![0u8; 64 << 20];
    dst.copy_from_slice(&src); // touch it
    (0..5)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            src.len() as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// `(size, busbw GB/s)` of Sheaf's allreduce over `transport` at 2 ranks.
fn sheaf_sweep(sheaf: &Path, transport: &str) -> Result<Vec<(u64, f64)>> {
    let out = output(Command::new(sheaf).args([
        "bench",
        "collectives",
        "--transport",
        transport,
        "--min-bytes",
        "4096",
        "--max-bytes",
        "16777216",
        "--json",
    ]))?;
    let rows: Vec<Value> = serde_json::from_str(&out).with_context(|| format!("bench output: {out}"))?;
    let rows: Vec<(u64, f64)> =
        rows.iter().filter_map(|r| Some((r["size_bytes"].as_u64()?, r["busbw_gbps"].as_f64()?))).collect();
    if rows.is_empty() {
        bail!("`sheaf bench collectives --transport {transport}` printed no rows: {out}");
    }
    Ok(rows)
}

/// The MPI comparison program, built from `benches/reference/mpi_allreduce.c`, or
/// `None` (with a note) where Open MPI is not installed.
fn mpi_program(root: &Path) -> Result<Option<std::path::PathBuf>> {
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("mpicc") || !have("mpirun") {
        eprintln!("perf: no mpicc or mpirun (apt-get install openmpi-bin libopenmpi-dev): no MPI baseline");
        return Ok(None);
    }
    let exe = root.join("target/release/mpi_allreduce");
    let src = root.join("benches/reference/mpi_allreduce.c");
    run(Command::new("mpicc").arg("-O2").arg("-o").arg(&exe).arg(&src))?;
    Ok(Some(exe))
}

/// `(size, busbw GB/s)` of Open MPI's allreduce at 2 ranks over `btl`.
fn mpi_sweep(exe: &Path, btl: &str) -> Result<Vec<(u64, f64)>> {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", "2", "--mca", "btl", &format!("{btl},self")]);
    if btl == "tcp" {
        cmd.args(["--mca", "btl_tcp_if_include", "lo"]);
    }
    let out = output(cmd.arg(exe).args(["4096", "16777216"]))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.first()?.parse().ok()?, f.get(4)?.parse().ok()?))
        })
        .collect())
}

/// The median throughput of `sheaf bench train` on reference job `job` at 2 x 1.
fn train_rate(root: &Path, sheaf: &Path, job: &str) -> Result<f64> {
    let dir = std::env::temp_dir().join(format!("sheaf-perf-{job}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = output(
        Command::new(sheaf)
            .args([
                "bench",
                "train",
                "-n",
                "2",
                "--threads-per-worker",
                "1",
                "--runs",
                "1",
                "--json",
                "--run-dir",
            ])
            .arg(&dir)
            .arg(root.join(format!("benches/reference/{job}.toml"))),
    );
    let _ = std::fs::remove_dir_all(&dir);
    let report: Value = serde_json::from_str(&out?)?;
    report["median"].as_f64().context("`sheaf bench train` printed no median")
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The machine and the ratios of a recorded run.
fn parse_last(text: &str) -> Option<(String, BTreeMap<String, f64>)> {
    let v: Value = serde_json::from_str(text).ok()?;
    let ratios =
        v["ratios"].as_object()?.iter().filter_map(|(k, x)| Some((k.clone(), x.as_f64()?))).collect();
    Some((v["machine"].as_str()?.to_string(), ratios))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

fn last_json(
    seen: &BTreeMap<String, Vec<f64>>,
    ratios: &BTreeMap<String, Vec<f64>>,
    root: &Path,
) -> Result<String> {
    let commit = output(Command::new("git").args(["rev-parse", "--short", "HEAD"]).current_dir(root))
        .map(|c| c.trim().to_string())
        .unwrap_or_default();
    let when = output(Command::new("date").arg("-u").arg("+%Y-%m-%dT%H:%MZ"))
        .map(|d| d.trim().to_string())
        .unwrap_or_default();
    let figures: serde_json::Map<String, Value> =
        seen.iter().map(|(k, v)| (k.clone(), json!(median(v)))).collect();
    let record = json!({
        "machine": machine(),
        "commit": commit,
        "when": when,
        "figures": figures,
        "ratios": ratios.iter().map(|(k, v)| (k.clone(), json!(median(v)))).collect::<serde_json::Map<String, Value>>(),
    });
    Ok(serde_json::to_string_pretty(&record)? + "\n")
}

/// The figures and ratios, each ratio's median against the record. A ratio whose
/// median fell by more than [`TOLERANCE`] is a regression when even its best round
/// fell that far; otherwise it is within its own spread (a noisy figure) and said so.
fn render(
    seen: &BTreeMap<String, Vec<f64>>,
    ratios: &BTreeMap<String, Vec<f64>>,
    last: Option<&(String, BTreeMap<String, f64>)>,
    rounds: usize,
) -> String {
    let mut s =
        format!("perf on {} (medians of {rounds} rounds)\n\n| figure | median |\n|---|---|\n", machine());
    for (k, v) in seen {
        s += &format!("| {k} | {:.3} |\n", median(v));
    }
    match last {
        Some((m, _)) => s += &format!("\nratios against the record (taken on {m}):\n"),
        None => s += "\nratios (nothing recorded yet: `cargo xtask perf --record`):\n",
    }
    s += "\n| ratio | now | best round | recorded | change |\n|---|---|---|---|---|\n";
    let mut regressions = 0;
    for (k, v) in ratios {
        let (now, best) = (median(v), v.iter().copied().fold(f64::NEG_INFINITY, f64::max));
        let before = last.and_then(|(_, r)| r.get(k)).copied();
        let change = before.map(|b| now / b - 1.0);
        let flag = match before {
            Some(b) if now < b * (1.0 - TOLERANCE) && best < b * (1.0 - TOLERANCE) => {
                regressions += 1;
                " REGRESSION"
            }
            Some(b) if now < b * (1.0 - TOLERANCE) => " (its best round did not fall that far: noise?)",
            _ => "",
        };
        s += &format!(
            "| {k} | {now:.3} | {best:.3} | {} | {}{flag} |\n",
            before.map_or("-".into(), |b| format!("{b:.3}")),
            change.map_or("-".into(), |c| format!("{:+.0}%", c * 100.0)),
        );
    }
    s += &format!("\n{regressions} ratio(s) fell by more than {:.0}% in every round.", TOLERANCE * 100.0);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `--record` writes reads back (the medians); a median that fell past the
    /// tolerance in every round is a regression, one whose best round did not fall that
    /// far is marked as noise, and a smaller fall is neither.
    #[test]
    fn a_record_reads_back_and_falls_are_flagged() {
        let mut seen = BTreeMap::new();
        seen.insert("memcpy GB/s".to_string(), vec![10.0, 12.0, 11.0]);
        let mut ratios = BTreeMap::new();
        ratios.insert("shm 4KiB / memcpy".to_string(), vec![0.5, 0.4, 0.6]);
        ratios.insert("shm 1MiB / memcpy".to_string(), vec![0.8]);
        ratios.insert("zmq-tcp 4MiB / memcpy".to_string(), vec![0.3]);
        let text = last_json(&seen, &ratios, Path::new(".")).unwrap();
        let (_, back) = parse_last(&text).unwrap();
        let medians: BTreeMap<String, f64> = ratios.iter().map(|(k, v)| (k.clone(), median(v))).collect();
        assert_eq!(back, medians);
        let mut now = BTreeMap::new();
        now.insert("shm 4KiB / memcpy".to_string(), vec![0.39, 0.4, 0.41]); // every round -18% or more
        now.insert("shm 1MiB / memcpy".to_string(), vec![0.8 * 0.9]); // -10%
        now.insert("zmq-tcp 4MiB / memcpy".to_string(), vec![0.2, 0.2, 0.35]); // median -33%, best +17%
        let report = render(&seen, &now, Some(&("m".into(), back)), 3);
        assert!(
            report.contains("| shm 4KiB / memcpy | 0.400 | 0.410 | 0.500 | -20% REGRESSION |"),
            "{report}"
        );
        assert!(report.contains("| shm 1MiB / memcpy | 0.720 | 0.720 | 0.800 | -10% |"), "{report}");
        assert!(
            report.contains("| zmq-tcp 4MiB / memcpy | 0.200 | 0.350 | 0.300 | -33% (its best round"),
            "{report}"
        );
        assert!(report.contains("1 ratio(s) fell by more than 15% in every round."), "{report}");
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
