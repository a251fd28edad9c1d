//! The collective laws across real processes over the real ZeroMQ plugin: each
//! process is one rank running `sheaf check-collectives`, deriving the same generated
//! cases from a seed and checking its own results.

use std::process::{Command, Stdio};

use proptest::prelude::*;
use sheaf_tests::sheaf_bin;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run_world(n: usize, transport: &str, seed: u64, cases: u64) -> Result<(), String> {
    let port = free_port().to_string();
    let children: Vec<_> = (0..n)
        .map(|rank| {
            Command::new(sheaf_bin())
                .args(["check-collectives", "--transport", transport, "--seed", &seed.to_string()])
                .args(["--cases", &cases.to_string(), "--max-len", "10000"])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                // Ranks started by another launcher share a secret they were given.
                .env("SHEAF_JOB_TOKEN", "the e2e tests' secret")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut errors = Vec::new();
    for (rank, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !stdout.contains(&format!("rank {rank}: {cases} cases passed")) {
            errors.push(format!(
                "rank {rank} ({}): {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(sheaf_testkit::proptest_cases(4)))]

    /// Worlds of 1 to 4 processes, over tcp, ipc and shared memory; every law of the conformance suite,
    /// on 12 generated cases per world (lengths 0 to 10,000, every dtype and op).
    #[test]
    fn collective_laws_hold_between_processes(
        n in 1usize..=4,
        seed in any::<u64>(),
        transport in prop::sample::select(vec!["zmq-tcp", "zmq-ipc", "shm"]),
    ) {
        run_world(n, transport, seed, 12).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn every_transport_between_three_processes() {
    for transport in ["zmq-tcp", "zmq-ipc", "shm"] {
        run_world(3, transport, 42, 12).unwrap();
    }
}

/// Each transport's `auto` is measured on it: a 2-process run on shared memory and one
/// on ZeroMQ each report in `summary.json` the tuning measured there (every size up to
/// the last, ring beyond, only measured algorithms), kept in `tuning.json`; a resumed
/// run on the same transport reads it back instead of measuring again.
#[test]
fn each_transport_runs_what_its_calibration_measured() {
    use crate::training::{ok, sheaf, summary};
    for transport in ["shm", "zmq-tcp"] {
        let dir = tempfile::tempdir().unwrap();
        let set = format!("transport.plugin=\"{transport}\"");
        let args = [
            "launch",
            "-n",
            "2",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.checkpoint_every=2",
            "--set",
            &set,
        ];
        ok(&sheaf(&args, dir.path()));
        let tuning = summary(dir.path())["collectives_tuning"].clone();
        assert_eq!(tuning["measured"], true, "{transport}: {tuning}");
        let auto = tuning["auto"].as_array().unwrap_or_else(|| panic!("{transport}: {tuning}"));
        let last = auto.last().unwrap();
        assert!(last["upto_bytes"].is_null() && last["algorithm"] == "ring", "{transport}: {tuning}");
        assert!(
            auto.iter()
                .all(|a| ["ring", "direct", "halving-doubling"].contains(&a["algorithm"].as_str().unwrap())),
            "{transport}: {tuning}"
        );
        let kept: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("tuning.json")).unwrap()).unwrap();
        assert_eq!((kept["transport"].as_str(), &kept["auto"]), (Some(transport), &tuning["auto"]));
        let resumed =
            ["launch", "-n", "2", "--resume", dir.path().to_str().unwrap(), "--set", "train.max_steps=4"];
        ok(&sheaf(&resumed, dir.path()));
        let again = summary(dir.path())["collectives_tuning"].clone();
        assert_eq!(
            (again["measured"].clone(), &again["auto"]),
            (serde_json::json!(false), &tuning["auto"]),
            "{transport}"
        );
    }
}
