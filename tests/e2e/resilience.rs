//! Runs that survive: checkpoints resumed bit for bit after a SIGKILL, elastic
//! restarts after random kills, supervised workers, run directories never
//! overwritten. Real processes throughout.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sheaf_core::SplitMix64;
use sheaf_tests::sheaf_bin;

use crate::training::{ok, sheaf, summary};

/// A launch running in the background: its child, and the worker pids it printed.
struct Running {
    child: Child,
    pids: mpsc::Receiver<u32>,
    /// The launcher's stderr, line by line, as it comes.
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn launch_bg(args: &[&str], run_dir: &Path) -> Running {
    launch_bg_with(args, run_dir, &[])
}

/// [`launch_bg`] with `env` set for the launcher and its workers.
fn launch_bg_with(args: &[&str], run_dir: &Path, env: &[(&str, &str)]) -> Running {
    let mut child = Command::new(sheaf_bin())
        .args(args)
        .envs(env.iter().copied())
        .arg("--run-dir")
        .arg(run_dir)
        .env_remove("SHEAF_PLUGIN_PATH")
        .env_remove("MASTER_PORT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sheaf launch");
    let (tx, pids) = mpsc::channel();
    let err = child.stderr.take().expect("piped");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            seen.lock().unwrap().push(line.clone());
            // "[launch] rank R pid P"
            if let Some(pid) = line.strip_prefix("[launch] rank ").and_then(|r| r.split(" pid ").nth(1)) {
                if let Ok(pid) = pid.trim().parse() {
                    let _ = tx.send(pid);
                }
            }
        }
    });
    Running { child, pids, lines }
}

fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid this test saw started; a pid already gone is ESRCH.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(") ").next().is_some_and(|rest| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every file of the newest checkpoint and the final parameters, by name.
fn final_state(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let checkpoints = dir.join("checkpoints");
    let newest = std::fs::read_dir(&checkpoints)
        .expect("checkpoints")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("step-"))
        .filter(|p| !p.to_string_lossy().contains(".partial"))
        .max()
        .expect("a checkpoint");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&newest)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files.push(("checkpoint.safetensors".into(), std::fs::read(dir.join("checkpoint.safetensors")).unwrap()));
    files
}

fn assert_same_state(a: &Path, b: &Path, what: &str) {
    let (x, y) = (final_state(a), final_state(b));
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&x), names(&y), "{what}: different files");
    for ((name, p), (_, q)) in x.iter().zip(&y) {
        assert!(p == q, "{what}: {name} differs between the uninterrupted and the resumed run");
    }
}

fn args<'a>(n: &'a str, sets: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["launch", "-n", n];
    for s in sets {
        v.extend(["--set", s]);
    }
    v
}

/// Steps slow enough (tens of milliseconds) that a kill lands mid-run.
const SLOW: [&str; 4] = [
    "data.dataset=\"synthetic\"",
    "data.samples=2048",
    "model.layers=[128, 512, 512, 10]",
    "train.batch_size=256",
];

/// The resume law: a run of 2N steps, and the same run SIGKILLed (launcher and,
/// through it, every worker) once its checkpoint at step N exists, then resumed,
/// end with bit-identical parameters and optimizer state.
fn resume_law(n: &str, sets: &[&str]) {
    resume_law_of(None, n, sets, &SLOW)
}

/// [`resume_law`] of the job file `job` (the built-in default when `None`), slowed by
/// `slow`.
fn resume_law_of(job: Option<&str>, n: &str, sets: &[&str], slow: &[&str]) {
    let mut sets: Vec<&str> = sets.to_vec();
    sets.extend(slow);
    sets.extend(["train.max_steps=16", "train.checkpoint_every=8"]);
    let with_job = |n| {
        let mut a = args(n, &sets);
        a.extend(job);
        a
    };
    let whole = tempfile::tempdir().unwrap();
    ok(&sheaf(&with_job(n), whole.path()));

    let cut = tempfile::tempdir().unwrap();
    let mut run = launch_bg(&with_job(n), cut.path());
    let at = cut.path().join("checkpoints/step-00000008");
    wait_for("the checkpoint at step 8", Duration::from_secs(120), || {
        at.exists() || matches!(run.child.try_wait(), Ok(Some(_)))
    });
    let finished_first = cut.path().join("summary.json").exists();
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    let workers: Vec<u32> = run.pids.try_iter().collect();
    wait_for("the workers to die with their launcher", Duration::from_secs(10), || {
        workers.iter().all(|&p| !alive(p))
    });
    assert!(!finished_first, "the run ended before it could be killed: make its steps slower");
    assert!(!cut.path().join("checkpoints/step-00000016").exists());

    let resumed = sheaf(&["launch", "-n", n, "--resume", &cut.path().display().to_string()], cut.path());
    ok(&resumed);
    let s = summary(cut.path());
    assert_eq!(s["resumed_from_step"], 8, "{s}");
    assert_eq!(s["steps"], 16, "{s}");
    assert_same_state(whole.path(), cut.path(), &format!("{sets:?}"));
    // The metrics of the steps taken twice appear once.
    let steps: Vec<u64> = std::fs::read_to_string(cut.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=16).collect::<Vec<_>>());
}

#[test]
fn resumed_data_parallel_runs_are_bit_identical() {
    resume_law("2", &["train.optimizer=\"sgd\""]);
    resume_law(
        "2",
        &[
            "train.optimizer=\"adamw\"",
            "train.lr_schedule=\"cosine\"",
            "train.warmup_steps=3",
            "train.grad_accum=2",
            "parallel.options.data-parallel.zero=1",
        ],
    );
    resume_law(
        "2",
        &["train.optimizer=\"adamw\"", "train.grad_clip=1.0", "parallel.options.data-parallel.zero=2"],
    );
    // ZeRO stage 3 over 3 ranks: uneven row shards, each rank's optimizer state its own.
    resume_law(
        "3",
        &["train.optimizer=\"adamw\"", "train.grad_clip=1.0", "parallel.options.data-parallel.zero=3"],
    );
    // Saved on a thread while training goes on: the same files.
    resume_law("2", &["train.optimizer=\"adamw\"", "train.checkpoint_async=true"]);
}

/// A crash during a save leaves the previous checkpoint whole: runs saving every 2
/// steps (synchronously, and on a thread) SIGKILLed, launcher and workers, the moment
/// a save is seen in progress (its `.partial` directory), then resumed, end bit for bit where the uninterrupted run ends; the
/// summary lists every committed save with its stall and write times.
#[test]
fn a_crash_during_a_save_leaves_the_previous_checkpoint_whole() {
    let mut rng = SplitMix64::new(7);
    let mut mid_save = 0;
    for (trial, asynchronous) in [false, true, false, true].into_iter().enumerate() {
        let flag = format!("train.checkpoint_async={asynchronous}");
        let mut sets: Vec<&str> = SLOW.to_vec();
        sets.extend(["train.max_steps=60", "train.checkpoint_every=2", "train.optimizer=\"adamw\"", &flag]);
        let whole = tempfile::tempdir().unwrap();
        ok(&sheaf(&args("2", &sets), whole.path()));
        let saves = summary(whole.path())["checkpoint_saves"].as_array().unwrap().clone();
        let steps: Vec<u64> = saves.iter().map(|s| s["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, (1..=30).map(|k| 2 * k).collect::<Vec<_>>(), "trial {trial}");
        assert!(saves
            .iter()
            .all(|s| s["stall_s"].as_f64().unwrap() > 0.0 && s["write_s"].as_f64().unwrap() > 0.0));

        let cut = tempfile::tempdir().unwrap();
        let mut run = launch_bg(&args("2", &sets), cut.path());
        let workers: Vec<u32> =
            (0..2).map(|_| run.pids.recv_timeout(Duration::from_secs(60)).unwrap()).collect();
        // Past a random number of saves, the first moment one is in progress.
        let checkpoints = cut.path().join("checkpoints");
        let skip = 1 + rng.next_u64() % 8;
        let saving = || {
            let names: Vec<String> = std::fs::read_dir(&checkpoints)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let newest =
                names.iter().filter_map(|n| n.strip_prefix("step-")?.get(..8)?.parse::<u64>().ok()).max();
            newest.is_some_and(|s| s > 2 * skip) && names.iter().any(|n| n.contains(".partial"))
        };
        wait_for("a save in progress", Duration::from_secs(60), || {
            saving() || matches!(run.child.try_wait(), Ok(Some(_)))
        });
        run.child.kill().unwrap();
        run.child.wait().unwrap();
        wait_for("the workers to die", Duration::from_secs(10), || workers.iter().all(|&p| !alive(p)));
        let partial = std::fs::read_dir(cut.path().join("checkpoints"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".partial"));
        eprintln!("trial {trial} (async {asynchronous}): killed with a save in progress: {partial}");
        mid_save += usize::from(partial);
        let resume = cut.path().display().to_string();
        ok(&sheaf(&["launch", "-n", "2", "--resume", &resume], cut.path()));
        assert_same_state(whole.path(), cut.path(), &format!("trial {trial}"));
    }
    assert!(mid_save >= 2, "only {mid_save} of 4 kills landed during a save");
}

#[test]
fn resumed_model_parallel_runs_are_bit_identical() {
    resume_law(
        "2",
        &[
            "parallel.strategy=\"pipeline\"",
            "train.optimizer=\"adamw\"",
            "train.lr_schedule=\"cosine\"",
            "transport.plugin=\"shm\"",
        ],
    );
    resume_law("2", &["parallel.strategy=\"tensor-parallel\"", "train.optimizer=\"sgd\""]);
    // Two pipelines of two stages, their optimizer state sharded across the pipelines.
    resume_law(
        "4",
        &[
            "parallel.strategy=\"pipeline\"",
            "parallel.data=2",
            "parallel.options.pipeline.zero=1",
            "train.optimizer=\"adamw\"",
            "transport.plugin=\"shm\"",
        ],
    );
    // And their parameters sharded by rows (ZeRO 3 inside each stage), a GPT's: each
    // rank's rows and their optimizer state written and read back as its own.
    let data = tempfile::tempdir().unwrap();
    let gpt = crate::gpt::job(data.path(), &crate::gpt::text_file(data.path()), "", "grad_clip = 1.0");
    resume_law_of(
        Some(gpt.to_str().unwrap()),
        "4",
        &[
            "parallel.strategy=\"pipeline\"",
            "parallel.options.pipeline.data=2",
            "parallel.options.pipeline.zero=3",
            "parallel.options.pipeline.schedule=\"1f1b\"",
            "transport.plugin=\"shm\"",
        ],
        &["model.n_embd=64", "model.n_layer=4", "train.batch_size=32"],
    );
}

/// `--max-restarts`: 20 trials, each killing a random rank at a random moment of a
/// run; every run ends with the parameters and optimizer state of the uninterrupted
/// run, bit for bit, and records its restart.
#[test]
fn elastic_restarts_end_where_uninterrupted_runs_end() {
    let trials: u64 = std::env::var("SHEAF_ELASTIC_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let mut sets: Vec<&str> = SLOW.to_vec();
    sets.extend([
        "train.max_steps=12",
        "train.checkpoint_every=3",
        "train.optimizer=\"adamw\"",
        "train.lr_schedule=\"cosine\"",
        "transport.plugin=\"shm\"",
    ]);
    // The span kills are drawn from: start to the summary of an uninterrupted run.
    let whole = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let mut run = launch_bg(&args("2", &sets), whole.path());
    let summary_at = whole.path().join("summary.json");
    wait_for("the uninterrupted run's summary", Duration::from_secs(120), || summary_at.exists());
    let span = t.elapsed();
    assert!(run.child.wait().unwrap().success());
    let mut rng = SplitMix64::new(0x5EAF);
    let mut killed_mid_run = 0;
    for trial in 0..trials {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args("2", &sets);
        a.extend(["--max-restarts", "3"]);
        let mut run = launch_bg(&a, dir.path());
        let pids: Vec<u32> =
            (0..2).map(|_| run.pids.recv_timeout(Duration::from_secs(60)).unwrap()).collect();
        let rank = (rng.next_u64() % 2) as usize;
        let moment = span.mul_f64(0.05 + 0.8 * (rng.next_u64() % 1000) as f64 / 1000.0);
        std::thread::sleep(moment);
        // Mid-run: before the summary (once it is written a rank may exit between
        // this check and the kill, and nothing restarts).
        let mid_run = !dir.path().join("summary.json").exists() && alive(pids[rank]);
        kill(pids[rank], libc::SIGKILL);
        let status = run.child.wait().unwrap();
        assert!(status.success(), "trial {trial}: rank {rank} killed after {moment:?}: {status}");
        assert_same_state(whole.path(), dir.path(), &format!("trial {trial}"));
        if mid_run {
            let s = summary(dir.path());
            let restarts = s["restarts"].as_array().cloned().unwrap_or_default();
            assert_eq!(restarts.len(), 1, "trial {trial}: {s}");
            assert_eq!(restarts[0]["rank"], rank, "trial {trial}: {s}");
            killed_mid_run += 1;
        }
    }
    eprintln!("elastic: {killed_mid_run} of {trials} kills landed mid-run");
    // Kills must land while the world runs, or this tests nothing (a busy machine
    // moves a run's start-up, so not all of them do).
    assert!(killed_mid_run * 4 >= trials, "{killed_mid_run} of {trials} kills landed mid-run");
}

/// SIGTERM to the launcher (what `scancel` or a pod eviction sends) is forwarded;
/// with no grace period to checkpoint in, the workers are killed at once: no worker
/// is left, the launcher exits 128 + SIGTERM and says why it stopped and that
/// `--resume` continues the run.
#[test]
fn a_terminated_launcher_leaves_no_worker_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut sets: Vec<&str> = SLOW.to_vec();
    sets.push("train.epochs=1000");
    let mut a = args("2", &sets);
    a.extend(["--grace-s", "0"]);
    let mut run = launch_bg(&a, dir.path());
    let pids: Vec<u32> = (0..2).map(|_| run.pids.recv_timeout(Duration::from_secs(60)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(pids.iter().all(|&p| alive(p)), "the workers should be training");
    kill(run.child.id(), libc::SIGTERM);
    let t = Instant::now();
    let status = run.child.wait().unwrap();
    // Stopped without a checkpoint: 128 + SIGTERM, as a shell reports it, not a
    // failed run's 1 nor a checkpointed preemption's 75.
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    wait_for("every worker to exit", Duration::from_secs(15).saturating_sub(t.elapsed()), || {
        pids.iter().all(|&p| !alive(p))
    });
    // And it says how to go on.
    wait_for("the launcher to say how to continue", Duration::from_secs(5), || {
        run.lines.lock().unwrap().iter().any(|l| l.contains("signal") && l.contains("--resume"))
    });

    // SIGKILL cannot be forwarded: the kernel kills the workers with their launcher.
    let dir = tempfile::tempdir().unwrap();
    let mut run = launch_bg(&args("2", &sets), dir.path());
    let pids: Vec<u32> = (0..2).map(|_| run.pids.recv_timeout(Duration::from_secs(60)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    wait_for("every worker to die with the launcher", Duration::from_secs(15), || {
        pids.iter().all(|&p| !alive(p))
    });
}

/// Lines in `path` (0 before it exists).
fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// Preemption: SIGTERM, SIGUSR1 or SIGINT at a random moment of a run, sent to the
/// launcher alone or to the launcher and every worker at once (as `srun` and
/// Kubernetes send it). Every time the ranks stop together after one step, no step
/// finished before the signal is lost, the launcher exits 75 with the step in
/// `summary.json`, and the run resumed ends bit for bit where the uninterrupted run
/// ends (AdamW, a cosine schedule, clipping). Four trials here; `SHEAF_PREEMPT_TRIALS`
/// asks for more.
#[test]
fn preempted_runs_resume_bit_identical() {
    let trials: usize = std::env::var("SHEAF_PREEMPT_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let mut sets: Vec<&str> = SLOW.to_vec();
    sets.extend([
        "train.max_steps=120",
        "train.checkpoint_every=1000",
        "train.optimizer=\"adamw\"",
        "train.lr_schedule=\"cosine\"",
        "train.warmup_steps=3",
        "train.grad_clip=1.0",
    ]);
    let whole = tempfile::tempdir().unwrap();
    ok(&sheaf(&args("2", &sets), whole.path()));
    let mut rng = SplitMix64::new(26);
    let mut preempted = 0;
    for trial in 0..trials {
        let sig = [libc::SIGTERM, libc::SIGUSR1, libc::SIGINT][trial % 3];
        let every_task = trial % 2 == 1;
        let case = format!("trial {trial}: signal {sig}, to every task: {every_task}");
        let dir = tempfile::tempdir().unwrap();
        let mut run = launch_bg(&args("2", &sets), dir.path());
        let pids: Vec<u32> =
            (0..2).map(|_| run.pids.recv_timeout(Duration::from_secs(60)).unwrap()).collect();
        let metrics = dir.path().join("metrics.jsonl");
        wait_for("the first step", Duration::from_secs(60), || lines(&metrics) > 0);
        std::thread::sleep(Duration::from_millis(rng.next_u64() % 500));
        let done = lines(&metrics) as u64;
        let t = Instant::now();
        kill(run.child.id(), sig);
        if every_task {
            pids.iter().for_each(|&p| kill(p, sig));
        }
        let status = run.child.wait().unwrap();
        let took = t.elapsed();
        match status.code() {
            Some(75) => {
                preempted += 1;
                let at = summary(dir.path())["preempted_at_step"].as_u64().expect("preempted_at_step");
                assert!(at >= done, "{case}: stopped after step {at}, but step {done} was done");
                assert!(dir.path().join(format!("checkpoints/step-{at:08}")).is_dir(), "{case}");
                eprintln!(
                    "{case}: after step {done}, stopped after step {at}; the launcher exited in {took:?}"
                );
                ok(&sheaf(&["launch", "-n", "2", "--resume", &dir.path().display().to_string()], dir.path()));
                assert_eq!(summary(dir.path())["resumed_from_step"], at, "{case}");
            }
            // The run ended before the signal was handled.
            Some(0) => eprintln!("{case}: the run had ended"),
            _ => panic!("{case}: {status:?}\n{}", run.lines.lock().unwrap().join("\n")),
        }
        wait_for("every worker to exit", Duration::from_secs(10), || pids.iter().all(|&p| !alive(p)));
        assert_same_state(whole.path(), dir.path(), &case);
    }
    assert!(2 * preempted > trials, "{preempted} of {trials} runs were preempted: make the steps slower");
}

/// A signal during an evaluation stops it between two passes: with every step
/// evaluating, and each pass made 150 ms long (about 2 s an evaluation), the run stops
/// after the step whose evaluation the signal interrupted, that step without a
/// validation loss and every earlier one with its own, and resumed ends bit for bit
/// where the uninterrupted run ends.
#[test]
fn a_preemption_during_an_evaluation_stops_it_between_passes() {
    let mut sets: Vec<&str> = SLOW.to_vec();
    sets.extend(["data.samples=8192", "train.batch_size=64", "train.max_steps=8", "train.eval_every=1"]);
    sets.push("train.checkpoint_every=1000");
    let whole = tempfile::tempdir().unwrap();
    ok(&sheaf(&args("2", &sets), whole.path()));
    let dir = tempfile::tempdir().unwrap();
    let mut run = launch_bg_with(&args("2", &sets), dir.path(), &[("SHEAF_TEST_SLOW_EVAL_MS", "150")]);
    let metrics = dir.path().join("metrics.jsonl");
    wait_for("the first step", Duration::from_secs(60), || lines(&metrics) > 0);
    std::thread::sleep(Duration::from_millis(700));
    let t = Instant::now();
    kill(run.child.id(), libc::SIGTERM);
    let status = run.child.wait().unwrap();
    let took = t.elapsed();
    assert_eq!(status.code(), Some(75), "{}", run.lines.lock().unwrap().join("\n"));
    let at = summary(dir.path())["preempted_at_step"].as_u64().expect("preempted_at_step");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let val: Vec<bool> = text
        .lines()
        .map(|l| !serde_json::from_str::<serde_json::Value>(l).unwrap()["val_loss"].is_null())
        .collect();
    let mut want = vec![true; at as usize];
    want[at as usize - 1] = false;
    assert_eq!(val, want, "stopped after step {at}");
    eprintln!("preempted during step {at}'s evaluation; the launcher exited {took:?} after the signal");
    ok(&sheaf(&["launch", "-n", "2", "--resume", &dir.path().display().to_string()], dir.path()));
    assert_same_state(whole.path(), dir.path(), "preempted in an evaluation");
}

/// An existing run directory is never overwritten; `--resume` needs a run there.
#[test]
fn run_directories_are_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    ok(&sheaf(&["launch", "-n", "1", "--set", "train.max_steps=2"], dir.path()));
    let before = std::fs::read(dir.path().join("checkpoint.safetensors")).unwrap();
    for cmd in [&["launch", "-n", "1"][..], &["run"][..]] {
        let out = sheaf(cmd, dir.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("already holds a run") && err.contains("--resume"), "{err}");
    }
    assert_eq!(std::fs::read(dir.path().join("checkpoint.safetensors")).unwrap(), before);

    let empty = tempfile::tempdir().unwrap();
    let out = sheaf(&["run", "--resume", &empty.path().display().to_string()], empty.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no job.toml"), "{err}");
}

/// The local TCP ports `pid` listens on (its sockets' inodes matched against
/// `/proc/net/tcp`).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    l.to_string_lossy().strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            (*state == "0A" && inodes.iter().any(|i| i == inode))
                .then(|| u16::from_str_radix(local.rsplit(':').next()?, 16).ok())?
        })
        .collect()
}

/// A stranger without the job's secret, on a job run over ZeroMQ by another launcher
/// (two `sheaf run` processes given the same `SHEAF_JOB_TOKEN`): at the rendezvous
/// port while rank 0 waits there (garbage, a join proven under a wrong secret, a join
/// recorded for one challenge replayed against another, each answered `Refused`), then
/// at every worker's inbox while they train (garbage, frames claiming rank 0 or 1
/// sealed under a wrong secret). The job ends with the parameters of the same job
/// without the stranger, bit for bit.
#[test]
fn strangers_without_the_secret_change_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use zeromq::{Socket, SocketRecv, SocketSend};
    let mut sets: Vec<&str> = SLOW.to_vec();
    sets.push("train.max_steps=30");
    let quiet = tempfile::tempdir().unwrap();
    let mut a = args("2", &sets);
    a.extend(["--threads-per-worker", "1"]);
    ok(&sheaf(&a, quiet.path()));

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let secret = "the job's secret";
    let dir = tempfile::tempdir().unwrap();
    let rank = |r: usize| {
        let mut cmd = Command::new(sheaf_bin());
        cmd.arg("run").args(sets.iter().flat_map(|s| ["--set", s])).args(["--threads-per-worker", "1"]);
        cmd.arg("--run-dir")
            .arg(dir.path())
            .env_remove("SHEAF_PLUGIN_PATH")
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("SHEAF_JOB_TOKEN", secret)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut rank0 = rank(0);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let master = format!("tcp://127.0.0.1:{port}");
    let json = |v: serde_json::Value| zeromq::ZmqMessage::from(serde_json::to_vec(&v).unwrap());
    let read =
        |m: zeromq::ZmqMessage| serde_json::from_slice::<serde_json::Value>(m.get(0).unwrap()).unwrap();
    let join = |challenge: &[u8], key: &[u8]| {
        let (r, w, e, sn) = (1u64.to_le_bytes(), 2u64.to_le_bytes(), "tcp://127.0.0.1:9", "00");
        let proof = sheaf_auth::Key::new(key)
            .prove("sheaf-zmq-join", &[challenge, &r, &w, e.as_bytes(), sn.as_bytes()]);
        serde_json::json!({"type": "Join", "rank": 1, "world_size": 2, "endpoint": e, "session": sn,
            "proof": sheaf_auth::hex(&proof)})
    };
    rt.block_on(async {
        wait_for("rank 0 to listen", Duration::from_secs(60), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let mut d = zeromq::DealerSocket::new();
        d.connect(&master).await.unwrap();
        d.send("garbage".into()).await.unwrap();
        d.send(json(serde_json::json!({"type": "Hello", "rank": 1}))).await.unwrap();
        let challenge = sheaf_auth::unhex(read(d.recv().await.unwrap())["nonce"].as_str().unwrap()).unwrap();
        d.send(json(join(&challenge, b"a wrong secret"))).await.unwrap();
        assert_eq!(read(d.recv().await.unwrap())["type"], "Refused");
        // The right proof for that challenge (as if overheard), replayed on another
        // connection, which has another challenge.
        let mut again = zeromq::DealerSocket::new();
        again.connect(&master).await.unwrap();
        again.send(json(serde_json::json!({"type": "Hello", "rank": 1}))).await.unwrap();
        let _ = read(again.recv().await.unwrap());
        again.send(json(join(&challenge, secret.as_bytes()))).await.unwrap();
        assert_eq!(read(again.recv().await.unwrap())["type"], "Refused");
    });
    let mut rank1 = rank(1);
    let pids = [rank0.id(), rank1.id()];
    let stop = AtomicBool::new(false);
    let frames = std::thread::scope(|s| {
        let stop = &stop;
        let stranger = s.spawn(move || {
            let mut frames = 0;
            while !stop.load(Ordering::SeqCst) {
                rt.block_on(async {
                    let t = Duration::from_millis(300);
                    for p in pids.iter().flat_map(|&pid| listening_ports(pid)) {
                        let mut push = zeromq::PushSocket::new();
                        let Ok(Ok(())) =
                            tokio::time::timeout(t, push.connect(&format!("tcp://127.0.0.1:{p}"))).await
                        else {
                            continue;
                        };
                        for claimed in [0u32, 1] {
                            let mut f = 0x5346u16.to_le_bytes().to_vec();
                            f.extend_from_slice(&[3, 1]);
                            f.extend_from_slice(&claimed.to_le_bytes());
                            f.extend_from_slice(&[0; 8 * 4]);
                            let mac = sheaf_auth::Key::new(b"a wrong secret").prove("sheaf-zmq-frame", &[&f]);
                            f.extend_from_slice(&mac[..16]);
                            f.extend_from_slice(b"poison");
                            let _ = tokio::time::timeout(t, push.send(f.into())).await;
                            let _ = tokio::time::timeout(t, push.send("garbage".into())).await;
                            frames += 2;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                });
            }
            frames
        });
        let statuses = [rank0.wait().unwrap(), rank1.wait().unwrap()];
        stop.store(true, Ordering::SeqCst);
        let frames = stranger.join().unwrap();
        assert!(statuses.iter().all(|s| s.success()), "the job failed: {statuses:?}");
        frames
    });
    let mut log = String::new();
    for c in [&mut rank0, &mut rank1] {
        std::io::Read::read_to_string(c.stderr.as_mut().unwrap(), &mut log).unwrap();
    }
    let refused = log.lines().filter(|l| l.contains("refused")).count();
    eprintln!("stranger: {frames} frames on the inboxes; {refused} refusals logged");
    assert!(frames > 0, "the stranger never reached an inbox: {log}");
    assert!(log.contains("rank 0 refused") && log.contains("on the rendezvous port"), "{log}");
    let (a, b) = (
        std::fs::read(quiet.path().join("checkpoint.safetensors")).unwrap(),
        std::fs::read(dir.path().join("checkpoint.safetensors")).unwrap(),
    );
    assert!(a == b, "the stranger changed the parameters");
}

/// A rank of a world of more than one started without the job's secret (by another
/// launcher that did not set it) stops before connecting, saying what to set.
#[test]
fn ranks_without_a_secret_are_told_to_set_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(sheaf_bin())
        .args(["run", "--run-dir"])
        .arg(dir.path())
        .env_remove("SHEAF_JOB_TOKEN")
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("MASTER_PORT", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("SHEAF_JOB_TOKEN is not set"), "{err}");
}

/// Resuming with another global batch is refused, saying why and what to set; the
/// run directory is left as it was.
#[test]
fn resuming_with_another_global_batch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sets =
        ["--set", "train.max_steps=4", "--set", "train.checkpoint_every=2", "--set", "train.batch_size=32"];
    let mut first = vec!["launch", "-n", "2"];
    first.extend(sets);
    ok(&sheaf(&first, dir.path()));
    let before = std::fs::read(dir.path().join("checkpoint.safetensors")).unwrap();
    let resume = dir.path().display().to_string();
    let out = sheaf(&["launch", "-n", "1", "--resume", &resume, "--set", "train.batch_size=64"], dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("global batch of 32 samples")
            && err.contains("this run has 64")
            && err.contains("train.batch_size = 32")
            && err.contains("--init-from"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.path().join("checkpoint.safetensors")).unwrap(), before);
}

/// The largest difference between two runs' final parameters.
fn final_diff(a: &Path, b: &Path) -> f32 {
    let (x, y) = (crate::training::checkpoint(a), crate::training::checkpoint(b));
    assert_eq!(x.len(), y.len());
    x.iter()
        .zip(&y)
        .flat_map(|((n, s, p), (m, t, q))| {
            assert_eq!((n, s), (m, t));
            p.iter().zip(q).map(|(a, b)| (a - b).abs())
        })
        .fold(0.0, f32::max)
}

/// The resharding law: a run of 12 steps under one layout, and the same run resumed
/// from its checkpoint at step 6 under another (another world size, strategy, ZeRO
/// stage, mesh), end within 1e-5 of each other: AdamW with a cosine schedule and
/// clipping, the same global batches.
fn reshard_law(job: Option<&Path>, first: (usize, &[&str]), then: (usize, &[&str])) {
    let base = [
        "train.max_steps=12",
        "train.checkpoint_every=6",
        "train.batch_size=64",
        "train.lr=0.01",
        "train.optimizer=\"adamw\"",
        "train.lr_schedule=\"cosine\"",
        "train.warmup_steps=2",
        "train.grad_clip=0.5",
    ];
    let mut sets: Vec<&str> = base.to_vec();
    if job.is_none() {
        sets.push("model.layers=[64, 96, 80, 64, 10]");
    }
    sets.extend(first.1);
    let whole = tempfile::tempdir().unwrap();
    let n = first.0.to_string();
    let mut a = args(&n, &sets);
    let job = job.map(|j| j.display().to_string());
    a.extend(job.as_deref());
    ok(&sheaf(&a, whole.path()));
    // The run as it stood at step 6: its job and that checkpoint.
    let cut = tempfile::tempdir().unwrap();
    std::fs::copy(whole.path().join("job.toml"), cut.path().join("job.toml")).unwrap();
    let from = whole.path().join("checkpoints/step-00000006");
    let to = cut.path().join("checkpoints/step-00000006");
    std::fs::create_dir_all(&to).unwrap();
    for f in std::fs::read_dir(&from).unwrap().flatten() {
        std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
    }
    let n = then.0.to_string();
    let resume = cut.path().display().to_string();
    let mut again = vec!["launch", "-n", &n, "--resume", &resume];
    for s in then.1 {
        again.extend(["--set", s]);
    }
    ok(&sheaf(&again, cut.path()));
    let case = format!("{first:?} resumed as {then:?}");
    assert_eq!(summary(cut.path())["resumed_from_step"], 6, "{case}");
    assert_eq!(summary(cut.path())["steps"], 12, "{case}");
    let d = final_diff(whole.path(), cut.path());
    assert!(d <= 1e-5, "{case}: max abs diff {d}");
}

#[test]
fn checkpoints_reshard_across_world_sizes_and_strategies() {
    const DP: &str = "parallel.strategy=\"data-parallel\"";
    const PIPE: &str = "parallel.strategy=\"pipeline\"";
    const TENSOR: &str = "parallel.strategy=\"tensor-parallel\"";
    // D4 with ZeRO 1 resumed as D2.
    reshard_law(
        None,
        (4, &[DP, "parallel.options.data-parallel.zero=1"]),
        (2, &["parallel.options.data-parallel.zero=0"]),
    );
    // 2 pipelines of 2 stages resumed as 2 tensor slices.
    reshard_law(None, (4, &[PIPE, "parallel.data=2"]), (2, &[TENSOR, "parallel.data=1"]));
    // ZeRO 3 over 3 ranks (uneven rows) resumed as plain data parallelism over 2.
    reshard_law(
        None,
        (3, &[DP, "parallel.options.data-parallel.zero=3"]),
        (2, &["parallel.options.data-parallel.zero=0"]),
    );
    // A GPT's 2 stages of 2 tensor slices each (fused q, k, v sliced by heads, tied
    // embeddings on both ends) resumed as one process.
    let data = tempfile::tempdir().unwrap();
    let gpt = crate::gpt::job(data.path(), &crate::gpt::text_file(data.path()), "", "");
    reshard_law(Some(&gpt), (4, &[PIPE, "parallel.options.pipeline.tensor=2"]), (1, &[DP]));
}

/// The flight recorder of a world that stopped: the launcher asks every worker still
/// running for its record (SIGUSR2) and says who stopped where. `args` slow or stall a
/// rank, `timeout_s` is the transport's deadline; returns the launcher's standard
/// error, which comes within 60 s.
fn stalled_world(n: &str, timeout_s: u32, args: &[String], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(sheaf_bin())
        .args(["launch", "-n", n])
        .args(args)
        .args(["--set", &format!("transport.timeout_s={timeout_s}"), "--run-dir"])
        .arg(dir.path())
        .envs(env.iter().copied())
        .env_remove("SHEAF_PLUGIN_PATH")
        .env_remove("MASTER_PORT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "{err}");
    let records = std::fs::read_dir(dir.path().join("flight")).map_or(0, |d| d.flatten().count());
    assert_eq!(records, n.parse::<usize>().unwrap(), "every rank's record: {err}");
    err
}

/// The `local-sgd` fixture in a plugin directory of its own, and the arguments that
/// train it with `options` set.
fn local_sgd(options: &[&str]) -> (tempfile::TempDir, Vec<String>) {
    let plugins = tempfile::tempdir().unwrap();
    let src = sheaf_tests::library("fixture-local-sgd");
    std::fs::copy(&src, plugins.path().join(src.file_name().unwrap())).unwrap();
    let mut args = vec!["--plugin-dir".to_string(), plugins.path().to_str().unwrap().to_string()];
    args.extend(["--set".into(), "parallel.strategy=\"local-sgd\"".into()]);
    for o in options {
        args.extend(["--set".into(), format!("parallel.options.local-sgd.{o}")]);
    }
    (plugins, args)
}

/// A rank that never enters a collective (the `local-sgd` fixture's skipping rank,
/// waiting elsewhere at step 3): the report names it, the last call it left and the
/// one it never entered, and the rank that waited there until its deadline.
#[test]
fn the_flight_recorder_names_a_rank_that_skipped_a_collective() {
    let (_plugins, args) = local_sgd(&["sync_every=100", "skipping_rank=1"]);
    let err = stalled_world("2", 3, &args, &[]);
    // Broadcast #0, then each step's loss allreduce: step 3's is #3.
    assert!(err.contains("rank 1 left allreduce #2 of group world and never entered #3"), "{err}");
    assert!(err.contains("rank 0 waited in allreduce #3 of group world"), "{err}");
}

/// Point-to-point calls carry signatures once a strategy promises NCCL's rule (the
/// fixture passes each step's number around the ring through the plugin ABI): a
/// send tagged other than its receiver expects, and two ranks each waiting to receive
/// from the other, fail at once, far inside the 120 s deadline, naming both calls.
#[test]
fn ranks_that_disagree_point_to_point_fail_at_once_naming_both_calls() {
    let cases = [
        (
            "mistagging_rank=1",
            "point-to-point out of step: rank 0's recv #3 from rank 1 wants tag 3; rank 1's send #3 to \
             rank 0 was tag 4 (8 bytes)",
        ),
        // Whichever rank reads the other's record first names both calls.
        ("recv_first_at=3", "in recv #3 of tag 3 from rank 1: neither will send"),
    ];
    for (misstep, want) in cases {
        let (_plugins, args) = local_sgd(&["ring_pass=true", "timeout_ms=120000", misstep]);
        let err = stalled_world("2", 120, &args, &[]);
        let either = want.replace("from rank 1: neither", "from rank 0: neither");
        assert!(err.contains(want) || err.contains(&either), "{misstep}: {err}");
    }
}

/// A pipeline stage that sleeps in its forward pass (the test-only slowdown on rank
/// 0): the report names the last call the sleeping stage left and the receive its
/// neighbour waited in, by number and peer.
#[test]
fn the_flight_recorder_names_a_stage_that_stopped() {
    let args = ["--set", "parallel.strategy=\"pipeline\"", "--set", "model.layers=[64, 96, 80, 64, 10]"];
    let args = args.map(String::from);
    let err = stalled_world("2", 3, &args, &[("SHEAF_TEST_SLOW_RANK", "0"), ("SHEAF_TEST_SLOW_MS", "60000")]);
    // Stage 0 left the step's barrier and sleeps before its first forward pass; stage
    // 1 waited for its activations.
    assert!(err.contains("rank 0 left barrier #1 of group world/0.0 and never entered #2"), "{err}");
    assert!(err.contains("rank 1 waited in recv #1 from rank 0 3."), "{err}");
}
