//! The C ABI for transports (`include/sheaf_transport.h`): the example transport in C
//! (`tests/c-transport/unix_transport.c`, built by this crate's build script with the
//! `cc` crate) loads with `libloading`, passes the conformance suite and trains.

use std::path::Path;
use std::process::Command;

use sheaf_tests::sheaf_bin;

use crate::training::{checkpoint, max_abs_diff, ok, sheaf};

/// The example C transport library.
fn c_transport() -> &'static Path {
    Path::new(env!("SHEAF_C_TRANSPORT"))
}

/// `sheaf plugins` lists it as a C transport; `sheaf plugin check` runs every
/// collective law over it between 1 to 4 real processes and passes.
#[test]
fn the_c_transport_loads_and_passes_the_conformance_suite() {
    let dir = c_transport().parent().unwrap();
    let out = Command::new(sheaf_bin())
        .args(["plugins", "--plugin-dir"])
        .arg(dir)
        .env_remove("SHEAF_PLUGIN_PATH")
        .output()
        .unwrap();
    ok(&out);
    let listing = String::from_utf8_lossy(&out.stdout);
    let row = listing.lines().find(|l| l.starts_with("unix-c")).unwrap_or_else(|| panic!("{listing}"));
    assert!(row.contains("transport(unix-c)") && row.contains("C transport v1"), "{row}");

    let out = Command::new(sheaf_bin())
        .args(["plugin", "check"])
        .arg(c_transport())
        .args(["--cases", "24"])
        .env_remove("SHEAF_PLUGIN_PATH")
        .output()
        .unwrap();
    ok(&out);
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        report.lines().filter(|l| l.contains("collective laws") && l.ends_with("pass")).count(),
        4,
        "{report}"
    );
}

/// The default job on 2 workers over the C transport ends with zmq-tcp's parameters
/// (within 1e-6).
#[test]
fn the_default_job_over_the_c_transport_equals_zmq_tcp() {
    let dir = c_transport().parent().unwrap().to_str().unwrap();
    let run = |transport: &str| {
        let run_dir = tempfile::tempdir().unwrap();
        let set = format!("transport.plugin=\"{transport}\"");
        let out = sheaf(&["--plugin-dir", dir, "launch", "-n", "2", "--set", &set], run_dir.path());
        ok(&out);
        run_dir
    };
    let (c, zmq) = (run("unix-c"), run("zmq-tcp"));
    assert_eq!(crate::training::summary(c.path())["transport"], "unix-c");
    let d = max_abs_diff(&checkpoint(c.path()), &checkpoint(zmq.path()));
    assert!(d <= 1e-6, "max abs diff {d} between unix-c and zmq-tcp");
}

/// A rank killed mid-run: the other rank's C transport sees the connection drop, and
/// the rank fails at once with an error naming the dead rank, well inside the
/// deadline.
#[test]
fn a_dead_peer_over_the_c_transport_is_named() {
    let dir = c_transport().parent().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let run_dir = tempfile::tempdir().unwrap();
    let mut ranks: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(sheaf_bin())
                .arg("--plugin-dir")
                .arg(dir)
                .args(["run", "--set", "transport.plugin=\"unix-c\"", "--set", "train.epochs=10000"])
                .args(["--set", "transport.timeout_s=60", "--threads-per-worker", "1", "--run-dir"])
                .arg(run_dir.path().join(rank.to_string()))
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("SHEAF_JOB_TOKEN", "the C transport's secret")
                .env_remove("SHEAF_PLUGIN_PATH")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Training has begun once rank 0 wrote a metrics line.
    let metrics = run_dir.path().join("0/metrics.jsonl");
    let start = std::time::Instant::now();
    while std::fs::metadata(&metrics).map_or(true, |m| m.len() == 0) {
        assert!(start.elapsed().as_secs() < 60, "no training step within a minute");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    eprintln!("training began after {:?}", start.elapsed());
    ranks[1].kill().unwrap();
    let killed = std::time::Instant::now();
    let out = ranks.remove(0).wait_with_output().unwrap();
    let _ = ranks[0].wait();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("rank 0 failed {:?} after the kill: {err}", killed.elapsed());
    assert!(!out.status.success(), "rank 0 went on: {err}");
    assert!(killed.elapsed().as_secs() < 20, "rank 0 took {:?} to fail", killed.elapsed());
    assert!(err.contains("rank 1"), "rank 0's error does not name rank 1: {err}");
}
