//! `sheaf plugin check PATH.so`: the conformance suite against one plugin library, the
//! tool a vendor runs on its own plugin. Transports run the collective laws in real
//! processes (`sheaf check-collectives --plugin-file PATH`) at several world sizes;
//! optimizers and partitioners run their laws in this process.

use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use serde::Serialize;
use sheaf_core::PluginKind;
use sheaf_testkit::conformance;

use crate::{load_plugin, HostError, Registry, SearchDir};

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct CheckRow {
    pub kind: String,
    pub name: String,
    pub check: String,
    pub passed: bool,
    pub seconds: f64,
    pub detail: String,
}

fn transport_world(file: &Path, transport: &str, n: usize, cases: u64, seed: u64) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let port = crate::launch::free_port().map_err(|e| e.to_string())?;
    let threads = crate::launch::threads_per_worker(n);
    let children: Vec<_> = (0..n)
        .map(|rank| {
            crate::launch::local_worker(&exe, rank, n, port, threads)
                .arg("--plugin-file")
                .arg(file)
                .args(["check-collectives", "--transport", transport])
                .args(["--cases", &cases.to_string(), "--seed", &seed.to_string()])
                .env("SHEAF_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start rank {rank}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let mut errors = Vec::new();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned();
            errors.push(format!("rank {rank} ({}): {last}", out.status));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Every check that applies to the plugin at `file`.
pub fn check(file: &Path, cases: u64, worlds: &[usize], seed: u64) -> Result<Vec<CheckRow>, HostError> {
    let plugin = load_plugin(file)?;
    let registry = Registry::load_files(
        vec![file.to_path_buf()],
        &[SearchDir {
            path: file.parent().unwrap_or(Path::new(".")).to_path_buf(),
            origin: crate::Origin::Flag,
        }],
    );
    let mut rows = Vec::new();
    let mut record =
        |kind: PluginKind, name: &str, check: String, start: Instant, result: Result<(), String>| {
            rows.push(CheckRow {
                kind: kind.name().into(),
                name: name.into(),
                check,
                passed: result.is_ok(),
                seconds: start.elapsed().as_secs_f64(),
                detail: result.err().unwrap_or_default(),
            })
        };
    for provided in &plugin.manifest.provides {
        let name = provided.name.as_str();
        match provided.kind {
            PluginKind::Transport => {
                for &n in worlds {
                    let start = Instant::now();
                    let r = transport_world(file, name, n, cases, seed);
                    record(
                        provided.kind,
                        name,
                        format!("collective laws, {n} processes, {cases} cases"),
                        start,
                        r,
                    );
                }
            }
            PluginKind::Optimizer => {
                let start = Instant::now();
                let r = (|| {
                    let make = || registry.optimizer(name, "{}").expect("checked below");
                    registry.optimizer(name, "{}").map_err(|e| e.to_string())?;
                    (0..20).try_for_each(|s| conformance::optimizer::check_all(&make, seed.wrapping_add(s)))
                })();
                record(provided.kind, name, "resume, bad input, learning rate (20 seeds)".into(), start, r);
            }
            PluginKind::DataPartitioner => {
                let start = Instant::now();
                let r = registry.data_partitioner(name, "{}").map_err(|e| e.to_string()).and_then(|p| {
                    [(0, 1, 0), (5, 8, 1), (1797, 2, 3), (1000, 7, 9), (100_000, 16, 2)]
                        .into_iter()
                        .try_for_each(|(n, world, epoch)| {
                            conformance::partitioner::check_data_partitioner(p.as_ref(), n, world, epoch)
                        })
                });
                record(provided.kind, name, "every index to exactly one rank, balanced".into(), start, r);
            }
            PluginKind::ModelPartitioner => {
                let start = Instant::now();
                let r = registry.model_partitioner(name, "{}").map_err(|e| e.to_string()).and_then(|p| {
                    (0..8).try_for_each(|stages| {
                        conformance::partitioner::check_model_partitioner(
                            p.as_ref(),
                            &[5, 1, 9, 2, 7, 7],
                            stages,
                        )
                    })
                });
                record(provided.kind, name, "contiguous, covering, non-empty stages".into(), start, r);
            }
            _ => {
                let start = Instant::now();
                record(provided.kind, name, "no conformance suite yet for this kind".into(), start, Ok(()));
            }
        }
    }
    Ok(rows)
}

/// The report as a table.
pub fn render(rows: &[CheckRow]) -> String {
    let mut out = format!("{:<18} {:<14} {:<46} {:>8}  RESULT\n", "KIND", "NAME", "CHECK", "SECONDS");
    for r in rows {
        out += &format!(
            "{:<18} {:<14} {:<46} {:>8.2}  {}\n",
            r.kind,
            r.name,
            r.check,
            r.seconds,
            if r.passed { "pass".to_string() } else { format!("FAIL: {}", r.detail) }
        );
    }
    out
}
