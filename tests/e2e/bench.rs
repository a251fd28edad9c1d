//! `sheaf bench`: real processes, nccl-tests-style rows with a correctness check each.

use std::process::Command;

use serde_json::Value;
use sheaf_tests::sheaf_bin;

fn bench(args: &[&str]) -> Vec<Value> {
    let out = Command::new(sheaf_bin()).arg("bench").args(args).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

#[test]
fn collectives_rows_have_the_nccl_tests_fields_and_pass_their_check() {
    for (op, n, factor) in [
        ("allreduce", "3", 4.0 / 3.0),
        ("allgather", "2", 0.5),
        ("broadcast", "2", 1.0),
        ("reduce-scatter", "3", 2.0 / 3.0),
        ("all-to-all", "3", 2.0 / 3.0),
    ] {
        let rows = bench(&[
            "collectives",
            "--op",
            op,
            "-n",
            n,
            "--min-bytes",
            "4096",
            "--max-bytes",
            "65536",
            "--iters",
            "3",
        ]);
        assert_eq!(rows.len(), 5, "{op}: 4 KiB to 64 KiB doubling: {rows:#?}");
        for r in &rows {
            assert_eq!(r["op"], op);
            assert_eq!(r["check"], "ok", "{r}");
            assert_eq!(r["transport"], "zmq-tcp");
            assert_eq!(r["world_size"], n.parse::<u64>().unwrap());
            for k in ["size_bytes", "count", "time_us", "algbw_gbps", "busbw_gbps"] {
                assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
            }
            // What the group runs: rings for allgather and reduce-scatter, every block
            // straight to its rank for all-to-all.
            match op {
                "allgather" | "reduce-scatter" => assert_eq!(r["algorithm"], "ring", "{r}"),
                "all-to-all" => assert_eq!(r["algorithm"], "direct", "{r}"),
                _ => assert!(r["algorithm"].is_string()),
            }
            let (alg, bus) = (r["algbw_gbps"].as_f64().unwrap(), r["busbw_gbps"].as_f64().unwrap());
            assert!(
                (bus - alg * factor).abs() <= 1e-9 * alg.max(1.0),
                "{op}: busbw {bus} vs algbw {alg} x {factor}"
            );
        }
    }
}

/// Every allreduce algorithm, chosen on the command line, is correct between real
/// processes (3: not a power of two) and named in its rows.
#[test]
fn every_allreduce_algorithm_checks_out_between_processes() {
    for alg in ["ring", "halving-doubling", "direct"] {
        let rows = bench(&[
            "collectives",
            "-n",
            "3",
            "--algorithm",
            alg,
            "--min-bytes",
            "4",
            "--max-bytes",
            "262144",
            "--iters",
            "2",
        ]);
        assert!(rows.iter().all(|r| r["check"] == "ok" && r["algorithm"] == alg), "{alg}: {rows:#?}");
    }
    let auto =
        bench(&["collectives", "-n", "2", "--min-bytes", "4096", "--max-bytes", "1048576", "--iters", "2"]);
    assert_eq!(auto.first().unwrap()["algorithm"], "direct");
    assert_eq!(auto.last().unwrap()["algorithm"], "ring");
}

#[test]
fn p2p_reports_latency_bandwidth_and_memcpy() {
    for transport in ["zmq-ipc", "shm"] {
        let rows = bench(&[
            "p2p",
            "--transport",
            transport,
            "--min-bytes",
            "4096",
            "--max-bytes",
            "16384",
            "--iters",
            "3",
        ]);
        let ops: Vec<&str> = rows.iter().map(|r| r["op"].as_str().unwrap()).collect();
        assert_eq!(ops, ["p2p-rtt", "p2p-oneway", "p2p-oneway", "p2p-oneway", "memcpy"]);
        assert!(rows.iter().all(|r| r["check"] == "ok" && r["transport"] == transport), "{rows:#?}");
    }
}

/// The shared-memory transport under every op, across ring-sized buffers (its rings
/// are 4 MiB: 8 MiB crosses them in pieces).
#[test]
fn every_op_checks_out_over_shared_memory() {
    for op in ["allreduce", "allgather", "broadcast", "reduce-scatter", "all-to-all"] {
        let rows = bench(&[
            "collectives",
            "--op",
            op,
            "-n",
            "3",
            "--transport",
            "shm",
            "--min-bytes",
            "4096",
            "--max-bytes",
            "8388608",
            "--iters",
            "2",
        ]);
        assert_eq!(rows.len(), 12, "{op}: {rows:#?}");
        assert!(rows.iter().all(|r| r["check"] == "ok" && r["transport"] == "shm"), "{op}: {rows:#?}");
    }
}

/// `sheaf bench train` runs a job several times and reports each run's throughput and
/// the median, keeping each run's directory.
#[test]
fn bench_train_reports_the_median_of_its_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(sheaf_bin())
        .args(["bench", "train", "-n", "2", "--runs", "2", "--json", "--threads-per-worker", "1"])
        .args(["--set", "train.max_steps=5", "--run-dir"])
        .arg(dir.path())
        .env_remove("SHEAF_PLUGIN_PATH")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["unit"], "samples/s");
    assert_eq!(r["runs"].as_array().unwrap().len(), 2);
    let (min, median, max) =
        (r["min"].as_f64().unwrap(), r["median"].as_f64().unwrap(), r["max"].as_f64().unwrap());
    assert!(0.0 < min && min <= median && median <= max, "{r}");
    assert!(dir.path().join("run-0/summary.json").exists() && dir.path().join("run-1/summary.json").exists());
    let bad = Command::new(sheaf_bin()).args(["bench", "train", "--runs", "0"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
