//! Several hosts, for real: network namespaces joined by a veth pair, each a host with
//! its own address and network stack, one `sheaf launch` per host with torchrun's
//! multi-node flags. Needs root and iproute2 (`.ci/run` installs it when missing).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use sheaf_tests::sheaf_bin;

use crate::training::{checkpoint, max_abs_diff, ok, sheaf};

/// Two namespaces joined by a veth pair: `addr(0)` and `addr(1)` on one /24.
struct Hosts {
    names: [String; 2],
    net: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("iproute2's `ip` (run as root)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Hosts {
    fn new() -> Hosts {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}-{n}", std::process::id() % 100_000);
        let names = [format!("sh0-{tag}"), format!("sh1-{tag}")];
        let net = format!("10.{}.{}", 100 + n % 100, std::process::id() % 250);
        // Built first, so that a failure below still removes what was made.
        let hosts = Hosts { names, net };
        let veth = [format!("v0-{tag}"), format!("v1-{tag}")];
        for ns in &hosts.names {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (h0, h1) = (&hosts.names[0], &hosts.names[1]);
        ip(&["link", "add", &veth[0], "netns", h0, "type", "veth", "peer", "name", &veth[1], "netns", h1]);
        for (i, ns) in hosts.names.iter().enumerate() {
            ip(&["-n", ns, "addr", "add", &format!("{}/24", hosts.addr(i)), "dev", &veth[i]]);
            ip(&["-n", ns, "link", "set", &veth[i], "up"]);
        }
        hosts
    }

    fn addr(&self, host: usize) -> String {
        format!("{}.{}", self.net, host + 1)
    }

    /// Takes host 1's end of the link down.
    fn cut(&self) {
        ip(&["-n", &self.names[1], "link", "set", &self.dev(1), "down"]);
    }

    /// Impairs the link both ways: `tc netem delay 2ms loss 1%`, or where the kernel has
    /// no netem (this project's CI machines' kernels have none, nor the random-drop
    /// filter actions) a token bucket of 50 Mbit/s whose queue holds 24 kB: what
    /// arrives faster is dropped, so TCP loses packets under every burst and resends
    /// them ([`Hosts::dropped`] counts them). Returns which.
    fn impair(&self) -> &'static str {
        const NETEM: &[&str] = &["netem", "delay", "2ms", "loss", "1%"];
        const TBF: &[&str] = &["tbf", "rate", "50mbit", "burst", "16kb", "limit", "24kb"];
        let mut used = NETEM;
        for (i, ns) in self.names.iter().enumerate() {
            let dev = self.dev(i);
            let tc = |q: &[&str]| {
                let mut args = vec!["-n", ns.as_str(), "qdisc", "add", "dev", &dev, "root"];
                args.extend(q);
                Command::new("tc").args(&args).output().expect("tc")
            };
            let mut out = tc(used);
            if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("qdisc kind is unknown")
            {
                used = TBF;
                out = tc(used);
            }
            assert!(out.status.success(), "tc {}: {}", used.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        if used == TBF {
            "tbf rate 50mbit burst 16kb limit 24kb, dropping what overflows (this kernel has no netem)"
        } else {
            "netem delay 2ms loss 1%"
        }
    }

    /// Host `i`'s end of the link.
    fn dev(&self, i: usize) -> String {
        format!("v{i}-{}", self.names[i].split_once('-').unwrap().1)
    }

    /// Packets the links' queueing disciplines dropped, both ends (`tc -s`).
    fn dropped(&self) -> u64 {
        (0..2)
            .map(|i| {
                let out = Command::new("tc")
                    .args(["-s", "-n", &self.names[i], "qdisc", "show", "dev", &self.dev(i)])
                    .output()
                    .expect("tc -s");
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.split("dropped ")
                    .skip(1)
                    .filter_map(|t| t.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum()
    }

    /// `sheaf launch` on host `node` as node `node` of `nnodes` (`M` or `MIN:MAX`), `per`
    /// workers, meeting at host 0, with `args` after; started, its output piped.
    fn launcher(&self, node: usize, nnodes: &str, per: &str, args: &[&str]) -> std::process::Child {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.names[node]]).arg(sheaf_bin());
        cmd.args(["launch", "--nnodes", nnodes, "--node-rank", &node.to_string(), "--nproc-per-node", per]);
        cmd.args(["--master-addr", &self.addr(0), "--master-port", "29500", "--threads-per-worker", "1"]);
        cmd.args(args)
            .env("SHEAF_JOB_TOKEN", "the hosts' shared secret")
            .env_remove("SHEAF_PLUGIN_PATH")
            .env_remove("MASTER_PORT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ip netns exec sheaf")
    }

    /// One `sheaf launch` per host, `per_host` workers each; returns node 0's run
    /// directory (where rank 0 writes) once both finished.
    fn launch(&self, per_host: usize, job: Option<&Path>, sets: &[&str], dirs: &[&Path; 2]) -> [Output; 2] {
        let per = per_host.to_string();
        let children: Vec<_> = (0..2)
            .map(|node| {
                let mut args: Vec<&str> = job.and_then(Path::to_str).into_iter().collect();
                args.extend(sets.iter().flat_map(|s| ["--set", s]));
                let dir = dirs[node].to_str().expect("a temporary directory's name");
                args.extend(["--run-dir", dir]);
                self.launcher(node, "2", &per, &args)
            })
            .collect();
        let outs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        outs.try_into().unwrap()
    }
}

impl Hosts {
    /// `sheaf ARGS` as every rank of 2 hosts x `per_host`, started as another launcher
    /// would (torchrun's variables, a shared secret), with `(rank, variable, value)`
    /// added; every rank's output, by rank.
    fn run_ranks(&self, per_host: usize, args: &[&str], extra: &[(usize, &str, &str)]) -> Vec<Output> {
        let world = (2 * per_host).to_string();
        let children: Vec<_> = (0..2 * per_host)
            .map(|rank| {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &self.names[rank / per_host]]).arg(sheaf_bin()).args(args);
                cmd.env("RANK", rank.to_string())
                    .env("LOCAL_RANK", (rank % per_host).to_string())
                    .env("WORLD_SIZE", &world)
                    .env("MASTER_ADDR", self.addr(0))
                    .env("MASTER_PORT", "29500")
                    .env("SHEAF_JOB_TOKEN", "the hosts' shared secret")
                    .env_remove("SHEAF_PLUGIN_PATH");
                for (_, k, v) in extra.iter().filter(|e| e.0 == rank) {
                    cmd.env(k, v);
                }
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("ip netns exec sheaf")
            })
            .collect();
        children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

const SETS: [&str; 3] = ["train.max_steps=10", "train.lr=0.05", "model.layers=[64, 96, 80, 64, 10]"];

/// Runs `sets` (with `job`) on 2 hosts x 2 workers, the link impaired or not; returns
/// node 0's run directory after checking both launchers succeeded and the world was 4,
/// and that an impaired link lost packets.
fn across_hosts(job: Option<&Path>, sets: &[&str], impaired: bool) -> tempfile::TempDir {
    let hosts = Hosts::new();
    let netem = impaired.then(|| hosts.impair());
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let outs = hosts.launch(2, job, sets, &[d0.path(), d1.path()]);
    for (node, out) in outs.iter().enumerate() {
        assert!(
            out.status.success(),
            "node {node} {sets:?} (link {netem:?}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d0.path().join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["world_size"], 4);
    if let Some(n) = netem {
        let dropped = hosts.dropped();
        eprintln!("the link between the hosts: {n}; {dropped} packets dropped ({sets:?})");
        assert!(dropped > 0, "the impaired link dropped nothing: {n}");
    }
    d0
}

/// A GPT as a pipeline of 2 tensor-parallel stages (P2 x T2), over 2 hosts of 2
/// workers, ends where one process ends (within 1e-5, as on one host).
#[test]
fn a_mesh_of_pipelines_and_slices_across_hosts_equals_one_process() {
    let data = tempfile::tempdir().unwrap();
    let job = crate::gpt::job(data.path(), &crate::gpt::text_file(data.path()), "", "");
    let one = tempfile::tempdir().unwrap();
    ok(&sheaf(&["run", job.to_str().unwrap()], one.path()));
    let sets = [
        "parallel.strategy=\"pipeline\"",
        "parallel.options.pipeline.tensor=2",
        "transport.plugin=\"zmq-tcp\"",
    ];
    let run = across_hosts(Some(&job), &sets, false);
    let d = max_abs_diff(&checkpoint(one.path()), &checkpoint(run.path()));
    assert!(d <= 1e-5, "max abs diff {d} against one process");
}

/// Data-parallel (over ZeroMQ, and over `auto`: shared memory inside each host, ZeroMQ
/// between, allreduce hierarchical) and a 2 x 2 pipeline mesh, each over 2 hosts of 2
/// workers, end with the parameters of one process (within 1e-6, the reduction order),
/// and so do the first two over a lossy link (`tc netem delay 2ms loss 1%`, or a 50
/// Mbit/s token bucket that drops what overflows its queue where the kernel has no
/// netem; the test prints which, and asserts packets were dropped). A job that names
/// no transport runs over `auto` across hosts.
#[test]
fn training_across_hosts_equals_one_process() {
    let one = tempfile::tempdir().unwrap();
    let mut args = vec!["run"];
    args.extend(SETS.iter().flat_map(|s| ["--set", *s]));
    ok(&sheaf(&args, one.path()));
    let reference = checkpoint(one.path());
    let dp: &[&str] = &["parallel.strategy=\"data-parallel\"", "transport.plugin=\"zmq-tcp\""];
    let pipe: &[&str] = &[
        "parallel.strategy=\"pipeline\"",
        "parallel.data=2",
        "parallel.options.pipeline.micro_batches=2",
        "transport.plugin=\"zmq-tcp\"",
    ];
    // No transport named: across hosts that is `auto` (shared memory inside each host,
    // ZeroMQ between, allreduce hierarchical).
    let auto: &[&str] = &["parallel.strategy=\"data-parallel\""];
    for (extra, impaired) in [(dp, false), (pipe, false), (auto, false), (dp, true), (pipe, true)] {
        let mut sets = SETS.to_vec();
        sets.extend(extra);
        let run = across_hosts(None, &sets, impaired);
        let d = max_abs_diff(&reference, &checkpoint(run.path()));
        assert!(d <= 1e-6, "{extra:?} (impaired {impaired}): max abs diff {d} against one process");
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.path().join("summary.json")).unwrap()).unwrap();
        let expected = if extra == auto { "auto" } else { "zmq-tcp" };
        assert_eq!(s["transport"], expected, "{extra:?}");
    }
}

/// ZeRO stage 3 sharding within each host and replicating across them (HSDP,
/// `zero_scope = "host"`), and sharding over the whole world, each over 2 hosts of 2
/// workers (AdamW at its usual rate, clipped, 2 micro-batches a step), end with the
/// parameters of one process (within 1e-6). Under HSDP rank 0's host holds every row
/// (the checkpoint is gathered from it alone) and each host's shards are the same.
#[test]
fn fully_sharded_parameters_within_and_across_hosts_equal_one_process() {
    let adamw = ["train.optimizer=\"adamw\"", "train.lr=0.001", "train.grad_clip=0.5", "train.grad_accum=2"];
    let one = tempfile::tempdir().unwrap();
    let mut args = vec!["run"];
    args.extend(
        SETS.iter().chain(&adamw).filter(|s| !s.starts_with("train.lr=0.05")).flat_map(|s| ["--set", *s]),
    );
    ok(&sheaf(&args, one.path()));
    let reference = checkpoint(one.path());
    for (scope, copies) in [("host", 2), ("world", 1)] {
        let mut sets: Vec<&str> = SETS.iter().copied().filter(|s| !s.starts_with("train.lr=0.05")).collect();
        sets.extend(adamw);
        let scope = format!("parallel.options.data-parallel.zero_scope=\"{scope}\"");
        sets.extend([
            "parallel.options.data-parallel.zero=3",
            scope.as_str(),
            "transport.plugin=\"zmq-tcp\"",
        ]);
        let run = across_hosts(None, &sets, false);
        let d = max_abs_diff(&reference, &checkpoint(run.path()));
        assert!(d <= 1e-6, "{scope}: max abs diff {d} against one process");
        // Each host holds the parameters once under HSDP; the world, once in all.
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.path().join("summary.json")).unwrap()).unwrap();
        let held: u64 = s["params_per_rank"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum();
        assert_eq!(held, copies * s["params"].as_u64().unwrap(), "{scope}: {s}");
    }
}

/// The launchers of 2 hosts plan the world their workers plan: under HSDP
/// (`zero_scope = "host"`) each rank holds half the parameters (its host's 2 ranks
/// share them), not a quarter, so a memory limit between the two plans is refused by
/// both launchers before any worker starts (each launcher once planned a world of one
/// host, sharding over all 4, and let its workers find the excess).
#[test]
fn launchers_plan_host_sharding_as_their_workers_do() {
    let mut sets: Vec<&str> = SETS.to_vec();
    sets.extend([
        "train.optimizer=\"adamw\"",
        "parallel.options.data-parallel.zero=3",
        "parallel.options.data-parallel.zero_scope=\"host\"",
        "transport.plugin=\"zmq-tcp\"",
    ]);
    let plan = |local: &str| -> f64 {
        let mut cmd = Command::new(sheaf_bin());
        cmd.args(["plan", "-n", "4", "--json"]).args(sets.iter().flat_map(|s| ["--set", *s]));
        cmd.env_remove("SHEAF_PLUGIN_PATH").env("LOCAL_WORLD_SIZE", local).env("WORLD_SIZE", "4");
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        rows[0]["total"].as_f64().unwrap() / (1 << 20) as f64
    };
    let (per_host, per_world) = (plan("2"), plan("4"));
    assert!(per_host > per_world, "HSDP plans {per_host} MiB a rank, sharding over the world {per_world}");
    let limit = format!("compute.memory_limit_mb={}", (per_host + per_world) / 2.0);
    sets.push(&limit);
    let hosts = Hosts::new();
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (node, out) in hosts.launch(2, None, &sets, &[d0.path(), d1.path()]).iter().enumerate() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "node {node}: {err}");
        assert!(
            err.contains("compute.memory_limit_mb") && !err.contains("[launch] rank"),
            "node {node}: {err}"
        );
    }
}

/// torchrun's flags checked against each other, naming the flag.
#[test]
fn multi_node_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (
            &["launch", "--nnodes", "2", "--node-rank", "2", "-n", "1", "--master-port", "1"][..],
            "--node-rank 2 is not below --nnodes 2",
        ),
        (&["launch", "--nnodes", "2", "-n", "1"][..], "--master-port"),
        (
            &["launch", "-n", "1", "--master-addr", "no-such-host.invalid"][..],
            "--master-addr no-such-host.invalid does not resolve",
        ),
        (&["launch", "--nnodes", "3:2", "-n", "1", "--master-port", "1"][..], "--nnodes 3:2"),
        (&["launch", "--nnodes", "two", "-n", "1"][..], "--nnodes two: not a number of hosts"),
        (
            &["launch", "--nnodes", "2", "--rejoin-s", "0", "-n", "1", "--master-port", "1"][..],
            "--rejoin-s 0",
        ),
    ] {
        let out = Command::new(sheaf_bin())
            .args(args)
            .arg("--run-dir")
            .arg(dir.path())
            .env("SHEAF_JOB_TOKEN", "s")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// A launcher's variables for one rank.
type LauncherVars<'a> = &'a dyn Fn(usize) -> Vec<(String, String)>;

/// Two `sheaf run` processes of the default job (5 steps) into `dir`, each with only
/// the variables `vars` gives its rank (and the job's secret): both must succeed, and
/// their summary is returned. `name` names the launcher in a failure.
fn train_two_ranks(name: &str, dir: &std::path::Path, vars: LauncherVars<'_>) -> serde_json::Value {
    let children: Vec<_> = (0..2)
        .map(|rank| {
            let mut cmd = Command::new(sheaf_bin());
            cmd.args(["run", "--set", "train.max_steps=5", "--threads-per-worker", "1", "--run-dir"])
                .arg(dir)
                .env_remove("SHEAF_PLUGIN_PATH");
            for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"] {
                cmd.env_remove(v);
            }
            cmd.envs(vars(rank)).env("SHEAF_JOB_TOKEN", "a launcher's secret");
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for (rank, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{name} rank {rank}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["world_size"], 2, "{name}: {s}");
    s
}

/// Ranks started by another launcher, one process each with only that launcher's
/// variables (SLURM's `srun`, Open MPI's `mpirun`), form one world and train.
#[test]
fn other_launchers_environments_form_one_world() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let slurm = |rank: usize| -> Vec<(String, String)> {
        vec![
            ("SLURM_PROCID".into(), rank.to_string()),
            ("SLURM_NTASKS".into(), "2".into()),
            ("SLURM_LOCALID".into(), rank.to_string()),
            ("SLURM_JOB_NODELIST".into(), "localhost".into()),
            ("SLURM_JOB_ID".into(), (u32::from(port) + 20_000).to_string()),
        ]
    };
    let ompi = |rank: usize| -> Vec<(String, String)> {
        vec![
            ("OMPI_COMM_WORLD_RANK".into(), rank.to_string()),
            ("OMPI_COMM_WORLD_SIZE".into(), "2".into()),
            ("OMPI_COMM_WORLD_LOCAL_RANK".into(), rank.to_string()),
            ("MASTER_ADDR".into(), "127.0.0.1".into()),
            ("MASTER_PORT".into(), port.to_string()),
        ]
    };
    let launchers: [(&str, LauncherVars); 2] = [("SLURM", &slurm), ("Open MPI", &ompi)];
    for (name, vars) in launchers {
        let dir = tempfile::tempdir().unwrap();
        train_two_ranks(name, dir.path(), vars);
        // Each rank keeps its log in the run directory, as under `sheaf launch`.
        for rank in 0..2 {
            let log = std::fs::read_to_string(dir.path().join(format!("logs/rank-{rank}.log"))).unwrap();
            assert!(log.contains(&format!("rank {rank}/2")), "{name} rank {rank}'s log: {log}");
        }
    }
}

/// Under torchrun's elastic agent, whose store already listens on `MASTER_PORT`
/// (`TORCHELASTIC_USE_AGENT_STORE=True`), the workers meet beside it and train, the
/// store's listener untouched: here a listener held on the port as the agent's is,
/// and exactly torchrun's variables (its `localhost`, its run id). Without the move the
/// first rank fails with "Address already in use".
#[test]
fn torchruns_agent_store_keeps_its_port() {
    let store = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = store.local_addr().unwrap().port();
    let torchrun = |rank: usize| -> Vec<(String, String)> {
        [
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("WORLD_SIZE", "2".into()),
            ("LOCAL_WORLD_SIZE", "2".into()),
            ("GROUP_RANK", "0".into()),
            ("MASTER_ADDR", "localhost".into()),
            ("MASTER_PORT", port.to_string()),
            ("TORCHELASTIC_USE_AGENT_STORE", "True".into()),
            ("TORCHELASTIC_RUN_ID", "test-run".into()),
            ("TORCHELASTIC_RESTART_COUNT", "0".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    train_two_ranks("torchrun", dir.path(), &torchrun);
    // The agent's store still holds its port.
    assert_eq!(store.local_addr().unwrap().port(), port);
    let client = std::net::TcpStream::connect(("127.0.0.1", port));
    assert!(client.is_ok(), "the store's port no longer answers: {client:?}");
}

/// `sheaf doctor -n N` runs the doctor over N local ranks with the secret and the
/// addresses filled in (no variable exported by hand): rank 0's report covers every
/// rank, and a problem on any rank is a non-zero exit naming the ranks.
#[test]
fn the_doctor_starts_its_own_local_ranks() {
    let doctor = |extra: &[&str]| {
        let mut cmd = Command::new(sheaf_bin());
        cmd.args(["doctor", "-n", "3"]).args(extra).env_remove("SHEAF_PLUGIN_PATH");
        for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SHEAF_JOB_TOKEN"] {
            cmd.env_remove(v);
        }
        cmd.output().unwrap()
    };
    let out = doctor(&[]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        report.contains("3 ranks") && report.contains("rank 2") && report.contains("doctor: OK"),
        "{report}"
    );
    let out = doctor(&["--set", "compute.memory_limit_mb=0.01"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("over the 0.01 MiB budget") && err.contains("rank(s) 0, 1, 2"), "{err}");
}

/// Incomplete launcher environments and a master that does not resolve: clear errors
/// naming the variable, exit 2, at once.
#[test]
fn bad_launcher_environments_name_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[("SLURM_PROCID", "1"), ("SLURM_JOB_NODELIST", "n[1-2]")], "SLURM_NTASKS is not"),
        (&[("JOB_COMPLETION_INDEX", "1"), ("MASTER_ADDR", "svc")], "WORLD_SIZE is not"),
        (
            &[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "no-such-host.invalid")],
            "MASTER_ADDR=no-such-host.invalid does not resolve",
        ),
    ];
    for (vars, needle) in cases {
        let mut cmd = Command::new(sheaf_bin());
        cmd.args(["run", "--run-dir"]).arg(dir.path()).env("SHEAF_JOB_TOKEN", "s");
        for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"] {
            cmd.env_remove(v);
        }
        let out = cmd.envs(vars.iter().copied()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{vars:?}: {err}");
        assert!(err.contains(needle), "{vars:?}: {err}");
    }
}

/// Every collective law holds between real processes on 2 hosts x 2 over `auto`
/// (shared memory inside each host, ZeroMQ between, allreduce hierarchical).
#[test]
fn collective_laws_hold_hierarchically_across_hosts() {
    let hosts = Hosts::new();
    let outs = hosts.run_ranks(
        2,
        &["check-collectives", "--transport", "auto", "--cases", "12", "--max-len", "20000"],
        &[],
    );
    for (rank, out) in outs.iter().enumerate() {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(&format!("rank {rank}: 12 cases passed")),
            "rank {rank}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `sheaf doctor` as every rank of 2 hosts x 2: the round-trip matrix and every rank's
/// memory plan, "doctor: OK". With rank 3 listening on a second address of host 1 that
/// host 0 routes into a black hole, the roll call's matrix shows exactly rows 0 and 1
/// failing to reach rank 3, and every rank fails. With host 1's link down, rank 0
/// prints the matrix with host 1's ranks never having come, within the deadline; host
/// 1's ranks say there is no route to the master.
#[test]
fn doctor_across_hosts_prints_the_matrix_and_fails_on_a_cut_link() {
    let hosts = Hosts::new();
    let doctor = ["doctor", "--set", "transport.plugin=\"zmq-tcp\"", "--set", "transport.timeout_s=5"];
    let outs = hosts.run_ranks(2, &doctor, &[]);
    for (rank, out) in outs.iter().enumerate() {
        assert!(out.status.success(), "rank {rank}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let report = String::from_utf8_lossy(&outs[0].stdout);
    assert!(
        report.contains("round trips (ms)") && report.contains("rank 3") && report.contains("doctor: OK"),
        "{report}"
    );
    // Every rank's memory line says what `sheaf plan` plans for it, to the hundredth MiB.
    let plan = Command::new(sheaf_bin())
        .args(["plan", "-n", "4", "--json", "--set", "transport.plugin=\"zmq-tcp\""])
        .env_remove("SHEAF_PLUGIN_PATH")
        .output()
        .unwrap();
    assert!(plan.status.success(), "{}", String::from_utf8_lossy(&plan.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    for rank in 0..4 {
        let mib = plan[rank]["total"].as_f64().unwrap() / (1u64 << 20) as f64;
        let line = format!("rank {rank}: memory {mib:.2} MiB");
        assert!(report.lines().any(|l| l.trim_start().starts_with(&line)), "no `{line}` in:\n{report}");
    }

    // Host 0 cannot reach rank 3's address; everyone else reaches everyone.
    let hidden = format!("{}.12", hosts.net);
    ip(&["-n", &hosts.names[1], "addr", "add", &format!("{hidden}/32"), "dev", &hosts.dev(1)]);
    ip(&["-n", &hosts.names[0], "route", "add", "blackhole", &format!("{hidden}/32")]);
    let start = std::time::Instant::now();
    let outs = hosts.run_ranks(2, &doctor, &[(3, "SHEAF_ADVERTISE_ADDR", &hidden)]);
    let report = String::from_utf8_lossy(&outs[0].stdout);
    eprintln!("rank 3 hidden from host 0, {:?}:\n{report}", start.elapsed());
    assert!(report.contains("the world cannot meet") && report.contains("reachability"), "{report}");
    let rows: Vec<Vec<&str>> = report
        .lines()
        .skip_while(|l| !l.starts_with("reachability"))
        .skip(2)
        .take(4)
        .map(|l| l.split_whitespace().skip(2).collect())
        .collect();
    for (r, row) in rows.iter().enumerate() {
        for (q, cell) in row.iter().enumerate() {
            let cut = q == 3 && r < 2;
            assert_eq!(*cell == "--", cut, "rank {r} -> rank {q}: {cell}\n{report}");
        }
    }
    assert!(
        report.contains("problem: rank 0 cannot reach rank 3") && report.contains("doctor: 2 problem(s)")
    );
    for (rank, out) in outs.iter().enumerate() {
        assert_eq!(out.status.code(), Some(1), "rank {rank}: {}", String::from_utf8_lossy(&out.stderr));
    }

    hosts.cut();
    let start = std::time::Instant::now();
    let outs = hosts.run_ranks(2, &doctor, &[]);
    assert!(start.elapsed() < std::time::Duration::from_secs(60), "{:?}", start.elapsed());
    let report = String::from_utf8_lossy(&outs[0].stdout);
    eprintln!("host 1's link down, {:?}:\n{report}", start.elapsed());
    for r in [2, 3] {
        assert!(report.contains(&format!("problem: rank {r} never answered the roll call")), "{report}");
    }
    let row0: Vec<&str> = report
        .lines()
        .find(|l| l.trim_start().starts_with("rank 0 ") && l.contains('·'))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(row0[4..], ["?", "?"], "{report}");
    let row2: Vec<&str> = report
        .lines()
        .find(|l| l.trim_start().starts_with("rank 2 ") && l.contains('·'))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(row2[2..], ["?", "?", "·", "?"], "{report}");
    for (rank, out) in outs.iter().enumerate() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "rank {rank}: {err}");
        if rank >= 2 {
            assert!(err.contains("no route to MASTER_ADDR"), "rank {rank}: {err}");
        }
    }
}

/// A rank slowed on purpose (the test-only `SHEAF_TEST_SLOW_MS` on rank
/// `SHEAF_TEST_SLOW_RANK`) is named by `sheaf doctor`'s compute probe, and the doctor
/// fails.
#[test]
fn doctor_names_a_slow_rank() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(sheaf_bin())
                .arg("doctor")
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("SHEAF_JOB_TOKEN", "doctor's secret")
                .env("SHEAF_TEST_SLOW_RANK", "1")
                .env("SHEAF_TEST_SLOW_MS", "400")
                .env_remove("SHEAF_PLUGIN_PATH")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let report = String::from_utf8_lossy(&outs[0].stdout);
    assert!(report.contains("problem: rank 1 computes slowly"), "{report}");
    assert!(!report.contains("problem: rank 0"), "{report}");
    for out in &outs {
        assert_eq!(out.status.code(), Some(1));
    }
}

/// Elastic shrink: 2 hosts x 2 ranks (`--nnodes 1:2 --max-restarts 1`) checkpointing
/// into a run directory both hosts share; node 1's launcher is killed for good mid-run
/// (its workers die with it). Node 0's launcher waits `--rejoin-s` for it, goes on with
/// its own 2 ranks from the newest checkpoint (resharded, the same global batch), and
/// the run ends within 1e-5 of an uninterrupted 4-rank run.
#[test]
fn a_world_that_loses_a_host_goes_on_with_the_hosts_left() {
    let sets = [
        "data.dataset=\"synthetic\"",
        "data.samples=2048",
        "model.layers=[128, 512, 512, 10]",
        "train.batch_size=256",
        "train.max_steps=40",
        "train.checkpoint_every=10",
        "train.optimizer=\"adamw\"",
        "train.lr=0.002",
    ];
    let whole = tempfile::tempdir().unwrap();
    let mut args = vec!["launch", "-n", "4", "--threads-per-worker", "1"];
    args.extend(sets.iter().flat_map(|s| ["--set", s]));
    ok(&sheaf(&args, whole.path()));

    let hosts = Hosts::new();
    let shared = tempfile::tempdir().unwrap();
    let dir = shared.path().to_str().expect("a temporary directory's name");
    let mut args = vec!["--max-restarts", "1", "--rejoin-s", "5", "--run-dir", dir];
    args.extend(sets.iter().flat_map(|s| ["--set", s]));
    let mut launchers: Vec<std::process::Child> =
        (0..2).map(|node| hosts.launcher(node, "1:2", "2", &args)).collect();
    let first = shared.path().join("checkpoints/step-00000010");
    let t = std::time::Instant::now();
    while !first.exists() {
        assert!(t.elapsed() < std::time::Duration::from_secs(120), "no checkpoint at step 10");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Node 1's launcher, for good: `ip netns exec` became it.
    launchers[1].kill().unwrap();
    launchers[1].wait().unwrap();
    let node0 = launchers.remove(0).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&node0.stderr);
    assert!(node0.status.success(), "node 0: {err}");
    assert!(err.contains("world 1: 1 of 2 hosts"), "{err}");
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shared.path().join("summary.json")).unwrap()).unwrap();
    assert_eq!((s["world_size"].as_u64(), s["steps"].as_u64()), (Some(2), Some(40)), "{s}");
    assert!(s["resumed_from_step"].as_u64().is_some_and(|r| r >= 10), "{s}");
    assert_eq!(s["restarts"].as_array().map(Vec::len), Some(1), "{s}");
    let d = max_abs_diff(&checkpoint(whole.path()), &checkpoint(shared.path()));
    let losses = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!("{}:{:.6}", v["step"], v["loss"].as_f64().unwrap())
            })
            .collect()
    };
    eprintln!("shrunk from 4 ranks to 2 at step {}: max abs diff {d}", s["resumed_from_step"]);
    assert!(
        d <= 1e-5,
        "max abs diff {d} from the uninterrupted 4-rank run\n{:?}\n{:?}\n{err}",
        losses(whole.path()),
        losses(shared.path())
    );
}
