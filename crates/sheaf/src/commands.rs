//! What each `sheaf` command does, one function each; [`crate::cli::run`] dispatches
//! to them.

use std::io::Write;
use std::path::Path;

use sheaf_plugins::{HostError, PluginInfo};

use crate::cli::{BenchWhat, Cli, JobArgs, LaunchArgs, PrepareArgs, SampleArgs};

/// `sheaf run`: this process as one rank of a world its launcher placed.
pub fn run_worker(cli: &Cli, args: &JobArgs, out: &mut dyn Write) -> Result<(), HostError> {
    if let Some(t) = args.threads_per_worker {
        // Before the first tensor operation: candle reads these once.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", t.to_string());
    }
    // First, so a preemption from here on stops the run at a step boundary.
    let preempt = sheaf_launch::preempt::watch(sheaf_launch::preempt::parse_signal(&args.preempt_signal)?)?;
    let dump_flight = sheaf_launch::preempt::watch_flight()?;
    let (job_file, run_dir, resume) = args.resolve()?;
    let mut job = sheaf_job::job::load_job(job_file.as_deref(), &args.overrides)?;
    let env = sheaf_runtime::WorkerEnv::from_env()?;
    let registry = cli.registry_for(&job);
    if let Some(dir) = args.init_from.as_deref().filter(|p| sheaf_runtime::hf::is_hf_dir(p)) {
        sheaf_runtime::hf::fill_model(&mut job, dir, &registry)?;
    }
    job.transport.resolve(env.spans_hosts, &registry)?;
    let opts = sheaf_runtime::worker::RunOptions {
        run_dir: Some(run_dir),
        env,
        progress: sheaf_runtime::worker::RunOptions::progress_default(),
        init_from: args.init_from.clone(),
        resume,
        preempt: Some(preempt),
        dump_flight: Some(dump_flight),
    };
    sheaf_runtime::worker::run_worker(&job, &registry, &opts)?;
    if opts.env.rank == 0 {
        let dir = opts.run_dir.as_ref().expect("set above");
        writeln!(out, "{}", sheaf_report::outputs::outcome(dir)).map_err(HostError::output)?;
    }
    Ok(())
}

/// `sheaf launch`: this host's workers of a world, supervised.
pub fn launch(cli: &Cli, args: &LaunchArgs, out: &mut dyn Write) -> Result<(), HostError> {
    let LaunchArgs {
        workers,
        job,
        max_restarts,
        grace_s,
        nnodes,
        min_nodes,
        rejoin_s,
        node_rank,
        master_addr,
        master_port,
        advertise_addr,
    } = args;
    let (_, run_dir, _) = job.resolve()?;
    let bad = || HostError::Usage(format!("--nnodes {nnodes}: not a number of hosts, nor MIN:MAX"));
    let (fewest, most) = match nnodes.split_once(':') {
        Some((lo, hi)) => (lo.trim().parse().map_err(|_| bad())?, hi.trim().parse().map_err(|_| bad())?),
        None => {
            let n: usize = nnodes.trim().parse().map_err(|_| bad())?;
            (n, n)
        }
    };
    if !(rejoin_s.is_finite() && *rejoin_s > 0.0) {
        return Err(HostError::Usage(format!("--rejoin-s {rejoin_s}: not a number of seconds")));
    }
    let nodes = sheaf_launch::Nodes {
        nnodes: most,
        node_rank: *node_rank,
        master_addr: master_addr.clone(),
        master_port: *master_port,
        advertise_addr: advertise_addr.clone(),
        min_nodes: min_nodes.unwrap_or(fewest),
        rejoin: std::time::Duration::from_secs_f64(*rejoin_s),
    };
    launch_job(cli, *workers, job, &run_dir, false, (*max_restarts, *grace_s), nodes)?;
    if *node_rank > 0 {
        return writeln!(
            out,
            "node {node_rank}: {workers} workers done; rank 0 writes the outputs on node 0"
        )
        .map_err(HostError::output);
    }
    writeln!(out, "{workers} workers: {}", sheaf_report::outputs::outcome(&run_dir))
        .map_err(HostError::output)
}

/// `sheaf plan`: every rank's planned memory, without starting a world.
pub fn plan(
    cli: &Cli,
    job: Option<&Path>,
    overrides: &[String],
    workers: usize,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), HostError> {
    let mut job = sheaf_job::job::load_job(job, overrides)?;
    if workers == 0 {
        return Err(HostError::Usage("-n 0: a world needs at least one rank".into()));
    }
    let registry = cli.registry_for(&job);
    job.transport.resolve(false, &registry)?;
    let backend = job.compute.backend_for(&job.model.kind, &registry)?;
    let compute = registry.compute(&backend, &job.compute.config_json())?;
    let data = sheaf_job::data::load(&job, &registry, compute.as_ref())?;
    // The budget is checked below, after the table is printed.
    let mut unbounded = job.clone();
    unbounded.compute.memory_limit_mb = None;
    let (_, plan) =
        sheaf_job::plan::strategy_and_plan(&unbounded, workers, &registry, compute.as_ref(), &data)?;
    let rows: Vec<_> = (0..workers).map(|r| sheaf_job::memory::planned(&job, &plan, r)).collect();
    let text = if json {
        serde_json::to_string_pretty(&rows).map_err(|e| HostError::encode("JSON rows", e))? + "\n"
    } else {
        format!(
            "{} over {workers} ranks, {} parameters\n{}",
            job.parallel.strategy,
            plan.info.layout.total(),
            sheaf_job::memory::table(&rows)
        )
    };
    out.write_all(text.as_bytes()).map_err(HostError::output)?;
    sheaf_job::plan::check_memory(&job, &plan)?;
    sheaf_job::plan::check_buildable(&plan, compute.as_ref(), job.seed)?;
    sheaf_job::memory::check_host(&rows, sheaf_job::memory::peak_rss_bytes())
}

/// `sheaf sample`: text from a trained language model.
pub fn sample(cli: &Cli, args: &SampleArgs, out: &mut dyn Write) -> Result<(), HostError> {
    let SampleArgs { checkpoint, prompt, tokens, temperature, top_k, seed } = args;
    let text = sheaf_runtime::sample::sample(
        &cli.registry(),
        checkpoint,
        &sheaf_runtime::sample::SampleOptions {
            prompt: prompt.clone(),
            tokens: *tokens,
            temperature: *temperature,
            top_k: *top_k,
            seed: *seed,
        },
    )?;
    writeln!(out, "{text}").map_err(HostError::output)
}

/// `sheaf prepare`: a text file encoded into a dataset directory; prints `meta.json`.
pub fn prepare(args: &PrepareArgs, out: &mut dyn Write) -> Result<(), HostError> {
    let PrepareArgs { input, tokenizer, out: dir, val_fraction } = args;
    let usage = |e: sheaf_data::DataError| HostError::Usage(e.to_string());
    let tokenizer =
        sheaf_data::Tokenizer::named(tokenizer).map_err(|e| HostError::Usage(format!("--tokenizer: {e}")))?;
    let size = std::fs::metadata(input).map_err(|e| HostError::io(input, e))?.len();
    let bar = sheaf_report::outputs::ByteProgress::new(size, "prepare");
    let meta = sheaf_data::prepare(input, tokenizer, dir, *val_fraction, &mut |done, _| bar.set(done));
    bar.finish();
    let meta = meta.map_err(|e| match e {
        e @ sheaf_data::DataError::Corrupt { .. } if e.to_string().starts_with("--val-fraction") => usage(e),
        e => HostError::input("cannot prepare the dataset", e),
    })?;
    let json = serde_json::to_string(&meta).expect("meta serializes");
    writeln!(out, "{json}").map_err(HostError::output)
}

/// `sheaf bench train`: the median throughput of several runs of a job.
pub fn bench_train(
    cli: &Cli,
    workers: usize,
    runs: usize,
    json: bool,
    job: &JobArgs,
    out: &mut dyn Write,
) -> Result<(), HostError> {
    if runs == 0 || workers == 0 {
        return Err(HostError::Usage("bench train: need --runs >= 1 and -n >= 1".into()));
    }
    let base = job.run_dir.clone().unwrap_or_else(sheaf_launch::default_run_dir);
    let mut rows = Vec::new();
    for k in 0..runs {
        let dir = base.join(format!("run-{k}"));
        launch_job(cli, workers, job, &dir, true, (0, Some(10.0)), sheaf_launch::Nodes::single())?;
        let path = dir.join("summary.json");
        let text = std::fs::read_to_string(&path).map_err(|e| HostError::io(&path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| HostError::os(path.display(), e.into()))?;
        rows.push(v);
    }
    let report = sheaf_conformance::bench::train_report(&rows, workers, job.threads_per_worker, &base);
    let written = if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report).expect("report serialises"))
    } else {
        sheaf_conformance::bench::render_train(&report, out)
    };
    written.map_err(HostError::output)
}

/// `sheaf bench collectives` and `sheaf bench p2p`.
pub fn bench(cli: &Cli, what: &BenchWhat, out: &mut dyn Write) -> Result<(), HostError> {
    let (op, workers, common) = match what {
        BenchWhat::Collectives { op, workers, common } => (op.clone(), *workers, common),
        BenchWhat::P2p { common } => ("p2p".to_string(), 2, common),
        BenchWhat::Train { .. } => {
            return Err(HostError::Usage("bench train is handled above".into()));
        }
    };
    common.algorithm.parse::<sheaf_collectives::Algorithm>().map_err(HostError::Usage)?;
    if common.min_bytes > common.max_bytes || common.iters == 0 {
        return Err(HostError::Usage("bench: need --min-bytes <= --max-bytes and --iters >= 1".into()));
    }
    let spec = sheaf_conformance::bench::BenchSpec {
        op,
        transport: match &common.transport {
            Some(t) => t.clone(),
            None => cli.registry().preferred_transport(sheaf_core::Reach::Network)?,
        },
        min_bytes: common.min_bytes,
        max_bytes: common.max_bytes,
        iters: common.iters,
        algorithm: common.algorithm.clone(),
    };
    let rows = sheaf_conformance::bench::bench(&spec, workers, &cli.plugin_dirs)?;
    let written = if common.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows).expect("rows serialise"))
    } else {
        sheaf_conformance::bench::render(&rows, out)
    };
    written.map_err(HostError::output)
}

/// `sheaf plugin check`: a plugin library against the laws of its kinds.
pub fn plugin_check(
    file: &Path,
    cases: u64,
    worlds: &[usize],
    seed: u64,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), HostError> {
    let rows = sheaf_conformance::plugin_check::check(file, cases, worlds, seed)?;
    let text = if json {
        serde_json::to_string_pretty(&rows).expect("rows serialise") + "\n"
    } else {
        sheaf_conformance::plugin_check::render(&rows)
    };
    out.write_all(text.as_bytes()).map_err(HostError::output)?;
    let failed = rows.iter().filter(|r| !r.passed).count();
    if failed > 0 {
        return Err(HostError::Check(format!("{failed} of {} conformance checks failed", rows.len())));
    }
    Ok(())
}

/// `sheaf doctor` as one rank placed by its launcher.
pub fn doctor(
    cli: &Cli,
    job: Option<&Path>,
    overrides: &[String],
    slow_factor: f64,
    out: &mut dyn Write,
) -> Result<(), HostError> {
    let mut job = sheaf_job::job::load_job(job, overrides)?;
    let env = sheaf_runtime::WorkerEnv::from_env()?;
    let registry = cli.registry_for(&job);
    job.transport.resolve(env.spans_hosts, &registry)?;
    sheaf_doctor::doctor::doctor(&job, &registry, &env, slow_factor, out)
}

/// One rank of `sheaf bench` (hidden).
pub fn bench_worker(cli: &Cli, spec: &str, out: &mut dyn Write) -> Result<(), HostError> {
    let spec: sheaf_conformance::bench::BenchSpec =
        serde_json::from_str(spec).map_err(|e| HostError::input("bench-worker spec", e))?;
    let env = sheaf_runtime::WorkerEnv::from_env()?;
    let rows = sheaf_conformance::bench::bench_worker(&cli.registry(), &env, &spec)?;
    if env.rank == 0 {
        writeln!(out, "{}", serde_json::to_string(&rows).expect("rows serialise"))
            .map_err(HostError::output)?;
    }
    Ok(())
}

/// The collective conformance laws as one rank (hidden; the end-to-end tests).
pub fn check_collectives(
    cli: &Cli,
    transport: Option<&str>,
    cases: u64,
    seed: u64,
    max_len: usize,
    out: &mut dyn Write,
) -> Result<(), HostError> {
    let env = sheaf_runtime::WorkerEnv::from_env()?;
    let registry = cli.registry();
    let transport = match transport {
        Some(t) => t.to_owned(),
        None => registry.preferred_transport(sheaf_core::Reach::Network)?,
    };
    let passed =
        sheaf_doctor::selftest::check_collectives(&registry, &env, &transport, cases, seed, max_len)?;
    writeln!(out, "rank {}: {passed} cases passed", env.rank).map_err(HostError::output)
}

/// `sheaf plugins`: every library found, and whether it loads.
pub fn plugins(cli: &Cli, json: bool, out: &mut dyn Write) -> Result<(), HostError> {
    let registry = cli.registry();
    let rows = registry.listing();
    let text = if json {
        serde_json::to_string_pretty(&rows).map_err(|e| HostError::encode("JSON rows", e))? + "\n"
    } else {
        render_table(&rows)
    };
    out.write_all(text.as_bytes()).map_err(HostError::output)?;
    // The listing is printed either way; a library that failed, or a component
    // two libraries provide, is a problem for the exit code.
    let (failed, conflicts) = (registry.failed.len(), registry.conflicts().len());
    if failed + conflicts > 0 {
        return Err(HostError::Check(format!(
            "{failed} plugin librar{} failed to load, {conflicts} component(s) provided by more than one",
            if failed == 1 { "y" } else { "ies" }
        )));
    }
    Ok(())
}

/// `["optimizer:sgd", "optimizer:adamw"]` as `optimizer(sgd,adamw)`.
fn group_provides(provides: &[String]) -> String {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for p in provides {
        let (kind, name) = p.split_once(':').unwrap_or((p, ""));
        match groups.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, names)) => names.push(name),
            None => groups.push((kind, vec![name])),
        }
    }
    groups.iter().map(|(k, n)| format!("{k}({})", n.join(","))).collect::<Vec<_>>().join(" ")
}

/// `sheaf plugins` as a table: one line per library, errors on their own lines; then
/// the files not tried, each with the reason.
pub fn render_table(all: &[PluginInfo]) -> String {
    let (skipped, rows): (Vec<&PluginInfo>, Vec<&PluginInfo>) = all.iter().partition(|r| r.skipped.is_some());
    let dash = || "-".to_owned();
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone().unwrap_or_else(dash),
                if r.provides.is_empty() { dash() } else { group_provides(&r.provides) },
                r.version.clone().unwrap_or_else(dash),
                r.abi_version.clone().unwrap_or_else(dash),
                match (r.ok, &r.skipped, r.conflicts.is_empty()) {
                    (true, _, true) => "ok".into(),
                    (true, _, false) => "conflict".into(),
                    (false, Some(_), _) => "skipped".into(),
                    (false, None, _) => "error".into(),
                },
            ]
        })
        .collect();
    let header = ["NAME", "PROVIDES", "VERSION", "ABI", "STATUS"];
    let mut widths = header.map(str::len);
    for c in &cells {
        for (w, s) in widths.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |c: &[String]| {
        c.iter()
            .zip(widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(&header.map(String::from)) + "\n";
    for (row, c) in rows.iter().zip(&cells) {
        out += &line(c);
        out += "\n";
        out += &format!("    {}\n", row.file);
        if let Some(e) = &row.error {
            out += &format!("    {e}\n");
        }
        for c in &row.conflicts {
            out += &format!("    {c}: a job using it must choose ([plugins.<kind>] <name> = \"<plugin>\")\n");
        }
    }
    if rows.is_empty() {
        out += "(no plugin libraries found)\n";
    }
    if !skipped.is_empty() {
        out += "not tried:\n";
    }
    for r in skipped {
        out += &format!("    {}: {}\n", r.file, r.skipped.as_deref().unwrap_or(""));
    }
    out
}

/// Checks `job` and its layout over `workers` ranks (so a bad one fails once, before
/// any worker starts), then starts the workers writing to `run_dir` and waits.
fn launch_job(
    cli: &Cli,
    workers: usize,
    job: &JobArgs,
    run_dir: &std::path::Path,
    workers_to_stderr: bool,
    supervision: (usize, Option<f64>),
    nodes: sheaf_launch::Nodes,
) -> Result<(), HostError> {
    let (max_restarts, grace_s) = supervision;
    if workers == 0 {
        return Err(HostError::Usage(
            "-n 0: a world needs at least one worker on each host; give -n N (--nproc-per-node) with N >= 1"
                .into(),
        ));
    }
    nodes.check()?;
    if let Some(g) = grace_s.filter(|g| !(g.is_finite() && *g >= 0.0)) {
        return Err(HostError::Usage(format!("--grace-s {g}: not a number of seconds")));
    }
    let (job_file, _, resume) = job.resolve()?;
    let preempt_signal = sheaf_launch::preempt::parse_signal(&job.preempt_signal)?;
    if !resume && sheaf_checkpoint::checkpoint::holds_a_run(run_dir) {
        return Err(HostError::Usage(format!(
            "{} already holds a run: continue it with --resume {0}, or choose another --run-dir",
            run_dir.display()
        )));
    }
    let mut parsed = sheaf_job::job::load_job(job_file.as_deref(), &job.overrides)?;
    if resume {
        sheaf_checkpoint::checkpoint::check_resumable(run_dir, &parsed.train.config(parsed.seed))?;
    }
    let registry = cli.registry_for(&parsed);
    if let Some(dir) = job.init_from.as_deref().filter(|p| sheaf_runtime::hf::is_hf_dir(p)) {
        sheaf_runtime::hf::fill_model(&mut parsed, dir, &registry)?;
    }
    parsed.transport.resolve(nodes.nnodes > 1, &registry)?;
    // The plan below is the one the workers make, read from the variables each of them
    // gets: a strategy that shards within a host (ZeRO 3's `zero_scope = "host"`) or
    // chooses by the workers sharing its cores reads this host's ranks and the world's
    // from them, and without them here planned a world of one host.
    for (var, value) in [("LOCAL_WORLD_SIZE", workers), ("WORLD_SIZE", workers * nodes.nnodes)] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, value.to_string());
        }
    }
    // The transports the workers will ask for, found here so that a job naming one no
    // plugin provides fails once, before any worker starts.
    let transports = match parsed.transport.plugin() {
        "auto" => vec![
            registry.preferred_transport(sheaf_core::Reach::Network)?,
            registry.preferred_transport(sheaf_core::Reach::Host)?,
        ],
        one => vec![one.to_owned()],
    };
    for t in transports {
        registry.provider(sheaf_core::PluginKind::Transport, &t)?;
    }
    let mut worker_args: Vec<String> = Vec::new();
    let backend = parsed.compute.backend_for(&parsed.model.kind, &registry)?;
    let compute = registry.compute(&backend, &parsed.compute.config_json())?;
    let data = sheaf_job::data::load(&parsed, &registry, compute.as_ref())?;
    if parsed.parallel.balance == "time" && parsed.parallel.layer_costs.is_none() {
        // Measured once here, so that every worker cuts the model the same way.
        let costs = sheaf_job::plan::measure_layer_costs(&parsed, compute.as_ref(), &data)?;
        eprintln!("[launch] measured layer costs (ns): {costs:?}");
        parsed.parallel.layer_costs = Some(costs);
    }
    let (_, plan) = sheaf_job::plan::strategy_and_plan(
        &parsed,
        workers * nodes.nnodes,
        &registry,
        compute.as_ref(),
        &data,
    )?;
    drop(data);
    sheaf_job::plan::check_buildable(&plan, compute.as_ref(), parsed.seed)?;
    // This host's ranks against the memory it has: each needs its plan and about what
    // this launcher holds now (the same plugins and dataset) as its own baseline.
    let mine = nodes.node_rank * workers..(nodes.node_rank + 1) * workers;
    let local: Vec<_> = mine.map(|r| sheaf_job::memory::planned(&parsed, &plan, r)).collect();
    sheaf_job::memory::check_host(&local, sheaf_job::memory::peak_rss_bytes())?;
    // Time for a preemption's checkpoint: what this host's ranks write (their
    // parameters and optimizer state, at most), at 100 MB/s, and 10 s besides.
    let save_bytes: u64 = local.iter().map(|p| p.parameters + p.optimizer_state).sum();
    let grace_s = grace_s.unwrap_or(10.0 + save_bytes as f64 / 100e6);
    eprintln!(
        "[launch] a preemption signal gives the workers {grace_s:.0} s to checkpoint (this host's ranks \
         save at most {:.1} MB; --grace-s sets it)",
        save_bytes as f64 / 1e6
    );
    if let Some(f) = &job.init_from {
        if !f.is_file() && !sheaf_runtime::hf::is_hf_dir(f) {
            return Err(HostError::Data(format!(
                "--init-from {}: neither a checkpoint file nor a directory with a transformers config.json",
                f.display()
            )));
        }
        worker_args.push("--init-from".into());
        worker_args.push(std::path::absolute(f).unwrap_or_else(|_| f.clone()).display().to_string());
    }
    // The resolved job (overrides and measured costs in it) is what every worker,
    // and every restart of the world, reads.
    std::fs::create_dir_all(run_dir).map_err(|e| HostError::io(run_dir, e))?;
    sheaf_checkpoint::checkpoint::write_job(run_dir, &parsed)?;
    worker_args.push(run_dir.join("job.toml").display().to_string());
    if resume {
        worker_args.push("--resume".into());
        worker_args.push(run_dir.display().to_string());
    }
    worker_args.push("--preempt-signal".into());
    worker_args.push(preempt_signal.to_string());
    for d in &cli.plugin_dirs {
        worker_args.push("--plugin-dir".into());
        worker_args.push(d.display().to_string());
    }
    sheaf_launch::launch(&sheaf_launch::LaunchOptions {
        workers,
        worker_args,
        run_dir: run_dir.to_path_buf(),
        threads_per_worker: job.threads_per_worker,
        workers_to_stderr,
        resume: false,
        max_restarts,
        grace: std::time::Duration::from_secs_f64(grace_s),
        preempt_signal,
        nodes,
    })
}
