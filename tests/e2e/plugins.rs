//! `sheaf plugins`, the loader's errors, panics inside plugins, and the conformance
//! suite run against the shipped `.so` files.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sheaf_plugins::{search_dirs, Registry};
use sheaf_testkit::conformance;
use sheaf_tests::{library, sheaf_bin};

/// `sheaf plugins --json` (with `extra_dir`), which must exit 0 exactly when every
/// library loaded (`all_load`).
fn plugins_json(extra_dir: Option<&Path>, all_load: bool) -> Vec<Value> {
    let mut cmd = Command::new(sheaf_bin());
    cmd.args(["plugins", "--json"]).env_remove("SHEAF_PLUGIN_PATH");
    if let Some(d) = extra_dir {
        cmd.arg("--plugin-dir").arg(d);
    }
    let out = cmd.output().expect("run sheaf");
    assert_eq!(out.status.success(), all_load, "sheaf plugins: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).expect("JSON").as_array().expect("array").clone()
}

fn row<'a>(rows: &'a [Value], file_suffix: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["file"].as_str().is_some_and(|f| f.ends_with(file_suffix)))
        .unwrap_or_else(|| panic!("no row for {file_suffix} in {rows:#?}"))
}

#[test]
fn lists_the_shipped_plugins_as_loaded() {
    let rows = plugins_json(None, true);
    for (file, name, kinds) in [
        ("libsheaf_optim.so", "sheaf-optim", vec!["optimizer"]),
        ("libsheaf_partition.so", "sheaf-partition", vec!["data-partitioner", "model-partitioner"]),
        ("libsheaf_transport_zmq.so", "sheaf-transport-zmq", vec!["transport"]),
        ("libsheaf_transport_shm.so", "sheaf-transport-shm", vec!["transport"]),
        ("libsheaf_compute_candle.so", "sheaf-compute-candle", vec!["compute", "model"]),
        ("libsheaf_strategy_data_parallel.so", "sheaf-strategy-data-parallel", vec!["strategy"]),
        ("libsheaf_strategy_pipeline.so", "sheaf-strategy-pipeline", vec!["strategy"]),
        ("libsheaf_strategy_tensor_parallel.so", "sheaf-strategy-tensor-parallel", vec!["strategy"]),
    ] {
        let r = row(&rows, file);
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["name"], name);
        assert_eq!(r["kinds"], serde_json::json!(kinds));
        assert_eq!(r["abi_version"], sheaf_abi::ABI_VERSION);
        assert!(r["version"].is_string() && r["error"].is_null(), "{r}");
    }
    // The compute plugin lists the model kinds it builds.
    let provides = &row(&rows, "libsheaf_compute_candle.so")["provides"];
    assert!(provides.as_array().unwrap().iter().any(|p| p == "model:gpt"), "{provides}");
    // The test fixtures are built where only the tests look: none beside `sheaf`.
    let fixtures: Vec<_> = rows.iter().filter(|r| r["file"].as_str().unwrap().contains("fixture")).collect();
    assert!(fixtures.is_empty(), "test fixtures beside the executable: {fixtures:?}");
}

/// A library beside the executable that is not `libsheaf_*` is not tried, and listed
/// with the reason: a copy of `sheaf` with a vendor's library beside it.
#[test]
fn foreign_libraries_beside_the_executable_are_not_tried() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("sheaf");
    std::fs::copy(sheaf_bin(), &exe).unwrap();
    let src = library("fixture-local-sgd");
    std::fs::copy(&src, dir.path().join(src.file_name().unwrap())).unwrap();
    let out = Command::new(&exe).args(["plugins"]).env_remove("SHEAF_PLUGIN_PATH").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("not tried:\n") && text.contains("libfixture_local_sgd.so: beside the executable"),
        "{text}"
    );
}

/// A directory with each kind of bad library beside a good one.
fn bad_plugin_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["fixture-not-a-plugin", "fixture-old-abi", "fixture-bad-layout", "fixture-panicky"] {
        let src = library(name);
        std::fs::copy(&src, dir.path().join(src.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.path().join("libgarbage.so"), b"\x7fELF but not really a library").unwrap();
    dir
}

#[test]
fn bad_libraries_get_short_errors_and_do_not_stop_the_listing() {
    let dir = bad_plugin_dir();
    let rows = plugins_json(Some(dir.path()), false);

    let not_plugin = row(&rows, "libfixture_not_a_plugin.so");
    assert_eq!(not_plugin["ok"], false);
    let e = not_plugin["error"].as_str().unwrap();
    assert!(e.contains("libfixture_not_a_plugin.so") && e.contains("not a Sheaf plugin"), "{e}");

    let old = row(&rows, "libfixture_old_abi.so");
    assert_eq!(old["ok"], false);
    let e = old["error"].as_str().unwrap();
    assert!(
        e.contains("libfixture_old_abi.so")
            && e.contains("0.0.7")
            && e.contains(sheaf_abi::ABI_VERSION)
            && e.contains("its major version only"),
        "another major is refused, saying why: {e}"
    );
    assert!(e.len() < 300, "error not summarised: {} bytes", e.len());

    let skewed = row(&rows, "libfixture_bad_layout.so");
    let e = skewed["error"].as_str().unwrap();
    assert!(
        e.contains("libfixture_bad_layout.so") && e.contains("this host has PluginMod, the plugin SkewedMod"),
        "{e}"
    );
    assert!(e.len() < 300, "layout report not summarised: {} bytes", e.len());

    let garbage = row(&rows, "libgarbage.so");
    assert!(garbage["error"].as_str().unwrap().contains("libgarbage.so"), "{garbage}");

    // The good ones still load: the fixture from the named directory, the shipped
    // plugins from the executable's.
    assert_eq!(row(&rows, "libfixture_panicky.so")["ok"], true);
    assert_eq!(row(&rows, "libsheaf_optim.so")["ok"], true);
    assert_eq!(row(&rows, "libsheaf_partition.so")["ok"], true);
}

#[test]
fn table_output_names_every_file_and_error() {
    let dir = bad_plugin_dir();
    let out = Command::new(sheaf_bin())
        .args(["plugins", "--plugin-dir"])
        .arg(dir.path())
        .env_remove("SHEAF_PLUGIN_PATH")
        .output()
        .unwrap();
    // The listing, then an exit code saying libraries failed.
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("4 plugin libraries failed to load"));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("NAME"), "{text}");
    assert!(text.contains("optimizer(sgd,adamw)"), "{text}");
    assert!(text.contains("built against Sheaf plugin ABI 0.0.7"), "{text}");
    // Short errors: the table of libraries tried stays small.
    assert!(text.lines().take_while(|l| *l != "not tried:").count() < 40, "{text}");
}

#[test]
fn plugin_path_env_is_searched() {
    let dir = bad_plugin_dir();
    let out = Command::new(sheaf_bin())
        .args(["plugins", "--json"])
        .env("SHEAF_PLUGIN_PATH", format!("/nonexistent:{}", dir.path().display()))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the bad libraries there failed to load");
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row(&rows, "libfixture_panicky.so")["ok"], true);
}

fn registry_with(dirs: &[PathBuf]) -> Registry {
    Registry::load(&search_dirs(dirs, None, None))
}

/// The shipped plugins, found as `sheaf` finds them beside itself (the fixtures in the
/// same directory are not `libsheaf_*`).
fn shipped() -> Registry {
    Registry::load(&search_dirs(&[], None, Some(&sheaf_bin())))
}

#[test]
fn panics_inside_a_plugin_become_errors_naming_it() {
    let dir = bad_plugin_dir();
    let registry = registry_with(&[dir.path().to_path_buf()]);
    let mut opt = registry.optimizer("panicky", "{}").expect("building the optimizer does not panic");
    let mut value = vec![1.0f32; 3];
    let grad = vec![0.5f32; 3];
    let err = opt
        .step(&mut [sheaf_core::Param { name: "w", value: &mut value, grad: &grad }])
        .expect_err("a panicking step is an error");
    let msg = err.to_string();
    assert!(
        msg.contains("fixture-panicky") && msg.contains("panicked") && msg.contains("always panics"),
        "{msg}"
    );

    let err = registry
        .data_partitioner("panicky", "")
        .err()
        .expect("a panicking constructor is an error")
        .to_string();
    assert!(err.contains("fixture-panicky") && err.contains("panicked"), "{err}");
    // The process is still fine and the plugin still answers.
    assert!(registry.optimizer("panicky", "{}").is_ok());
}

#[test]
fn missing_component_names_what_is_available() {
    let err = shipped().optimizer("lion", "{}").err().unwrap().to_string();
    assert!(err.contains("optimizer `lion`") && err.contains("sgd") && err.contains("adamw"), "{err}");
}

/// The conformance suite against the real `.so` files, as a vendor would run it.
#[test]
fn shipped_optimizer_plugins_pass_the_conformance_suite() {
    let registry = shipped();
    for (name, config) in [
        ("sgd", "{}"),
        ("sgd", r#"{"lr":0.05,"momentum":0.9,"nesterov":true,"weight_decay":1e-4}"#),
        ("adamw", "{}"),
    ] {
        let make = || registry.optimizer(name, config).unwrap();
        for seed in 0..20 {
            conformance::optimizer::check_all(&make, seed).unwrap_or_else(|e| panic!("{name} {config}: {e}"));
        }
    }
    let err = registry.optimizer("sgd", r#"{"momentum": "fast"}"#).err().unwrap().to_string();
    assert!(err.contains("sheaf-optim") && err.contains("momentum"), "{err}");
}

#[test]
fn shipped_partitioner_plugins_pass_the_conformance_suite() {
    let registry = shipped();
    for name in ["contiguous", "strided", "shuffle"] {
        let p = registry.data_partitioner(name, "").unwrap();
        for (n, world, epoch) in [(0, 1, 0), (5, 8, 1), (1797, 2, 3), (1000, 7, 9)] {
            conformance::partitioner::check_data_partitioner(p.as_ref(), n, world, epoch)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    let balanced = registry.model_partitioner("balanced", "").unwrap();
    for stages in 0..6 {
        conformance::partitioner::check_model_partitioner(balanced.as_ref(), &[5, 1, 9, 2], stages).unwrap();
    }
}

/// `sheaf launch -n 2` of the default job under the `local-sgd` fixture, found in a
/// plugin directory of its own, with `sets` added: the output and the run directory.
fn launch_local_sgd(sets: &[&str]) -> (std::process::Output, tempfile::TempDir) {
    let plugins = tempfile::tempdir().unwrap();
    let src = library("fixture-local-sgd");
    std::fs::copy(&src, plugins.path().join(src.file_name().unwrap())).unwrap();
    let run = tempfile::tempdir().unwrap();
    let mut args = vec!["launch", "-n", "2", "--plugin-dir", plugins.path().to_str().unwrap()];
    args.extend(["--set", "parallel.strategy=\"local-sgd\""]);
    for s in sets {
        args.extend(["--set", s]);
    }
    (crate::training::sheaf(&args, run.path()), run)
}

/// A strategy the host has never heard of (the `local-sgd` fixture: its own plan, its
/// own settings under `[parallel.options.local-sgd]`) trains the default job end to
/// end from a plugin directory; its unknown settings are refused naming the key.
#[test]
fn a_strategy_unknown_to_the_host_trains_end_to_end() {
    let (out, run) = launch_local_sgd(&["parallel.options.local-sgd.sync_every=2", "train.epochs=10"]);
    crate::training::ok(&out);
    let s = crate::training::summary(run.path());
    assert_eq!(s["strategy"], "local-sgd");
    assert!(s["test_accuracy"].as_f64().unwrap() > 0.9, "{s}");
    let (out, _) = launch_local_sgd(&["parallel.options.local-sgd.sync_evry=2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("parallel.options.local-sgd") && err.contains("sync_evry"), "{err}");
    assert!(!err.contains("[launch] rank"), "{err}");
}

/// The host names no strategy: they are all plugins' business.
#[test]
fn the_host_names_no_strategy() {
    let crates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates");
    let mut files = 0;
    for krate in sheaf_tests::HOST_CRATES {
        for entry in std::fs::read_dir(crates.join(krate).join("src")).unwrap() {
            let path = entry.unwrap().path();
            if !path.is_file() {
                continue;
            }
            files += 1;
            let text = std::fs::read_to_string(&path).unwrap();
            for name in ["\"pipeline\"", "\"tensor-parallel\""] {
                assert!(!text.contains(name), "{} names the strategy {name}", path.display());
            }
        }
    }
    assert!(files >= sheaf_tests::HOST_CRATES.len(), "read {files} files");
}

/// A strategy whose ranks take different code paths (the `local-sgd` fixture with a
/// divergent rank: it broadcasts where the others allreduce) fails at its first
/// mismatched collective with both calls named, not after the 60 s deadline.
#[test]
fn ranks_calling_different_collectives_fail_at_once_naming_both() {
    let start = std::time::Instant::now();
    let (out, _run) = launch_local_sgd(&["parallel.options.local-sgd.divergent_rank=1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(30), "took {:?}: {err}", start.elapsed());
    assert!(err.contains("collectives out of step"), "{err}");
    assert!(err.contains("allreduce #") && err.contains("broadcast #"), "{err}");
}

/// A directory holding copies of these fixture libraries.
fn dir_with(fixtures: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in fixtures {
        let src = library(name);
        std::fs::copy(&src, dir.path().join(src.file_name().unwrap())).unwrap();
    }
    dir
}

fn sheaf_with(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(sheaf_bin())
        .arg("--plugin-dir")
        .arg(dir)
        .args(args)
        .env_remove("SHEAF_PLUGIN_PATH")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap()
}

/// A library with a model kind of its own: `model.kind` alone picks its compute
/// backend (the job names none), and the run trains to better than chance. A kind two
/// libraries provide must be chosen, by `[plugins.model]` or by `compute.backend`,
/// and an unknown kind names the kinds loaded.
#[test]
fn model_kind_alone_picks_the_library_that_provides_it() {
    let dir = dir_with(&["fixture-compute-line"]);
    let run = tempfile::tempdir().unwrap();
    let line =
        ["--set", "model={kind = \"line\", features = 64, classes = 10}", "--set", "train.max_steps=60"];
    let out =
        sheaf_with(dir.path(), &[&["run"][..], &line, &["--run-dir", run.path().to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: Value = serde_json::from_slice(&std::fs::read(run.path().join("summary.json")).unwrap()).unwrap();
    let compute =
        s["components"].as_array().unwrap().iter().find(|c| c["kind"] == "compute").unwrap().clone();
    assert_eq!(
        (compute["name"].as_str(), compute["plugin"].as_str()),
        (Some("line"), Some("fixture-compute-line"))
    );
    assert!(s["test_accuracy"].as_f64().unwrap() > 0.5, "ten digits: chance is a tenth; {s}");

    // The default job's kind, mlp, is claimed by both libraries.
    let run = tempfile::tempdir().unwrap();
    let out = sheaf_with(
        dir.path(),
        &["run", "--set", "train.max_steps=2", "--run-dir", run.path().to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("model `mlp` is provided by more than one library")
            && err.contains("sheaf-compute-candle (")
            && err.contains("fixture-compute-line (")
            && err.contains("[plugins.model] mlp"),
        "{err}"
    );
    for choice in ["plugins.model.mlp=\"sheaf-compute-candle\"", "compute.backend=\"candle\""] {
        let run = tempfile::tempdir().unwrap();
        let args =
            ["run", "--set", "train.max_steps=2", "--set", choice, "--run-dir", run.path().to_str().unwrap()];
        let out = sheaf_with(dir.path(), &args);
        assert!(out.status.success(), "{choice}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = sheaf_with(dir.path(), &["run", "--set", "model.kind=\"mamba\""]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown model kind `mamba`") && err.contains("kinds loaded: ") && err.contains("line"),
        "{err}"
    );
}

/// A vendor library that also provides optimizer `sgd`: `sheaf plugins` shows the
/// conflict and fails; a job using `sgd` is an error naming both libraries until the
/// job chooses (`[plugins.optimizer] sgd = "..."`), and `summary.json` then says which
/// library supplied every component, with its version and ABI.
#[test]
fn two_providers_of_one_component_must_be_chosen_between() {
    let dir = dir_with(&["fixture-sgd-again"]);
    let out = sheaf_with(dir.path(), &["plugins"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{listing}");
    assert!(listing.contains("optimizer:sgd also in") && listing.contains("conflict"), "{listing}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 component(s) provided by more than one"));

    let run = tempfile::tempdir().unwrap();
    let out = sheaf_with(
        dir.path(),
        &["run", "--set", "train.max_steps=3", "--run-dir", run.path().to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("optimizer `sgd` is provided by more than one library")
            && err.contains("sheaf-optim (")
            && err.contains("fixture-sgd-again (")
            && err.contains("[plugins.optimizer] sgd"),
        "{err}"
    );

    for choice in ["fixture-sgd-again", "sheaf-optim"] {
        let run = tempfile::tempdir().unwrap();
        let set = format!("plugins.optimizer.sgd=\"{choice}\"");
        let out = sheaf_with(
            dir.path(),
            &["run", "--set", "train.max_steps=3", "--set", &set, "--run-dir", run.path().to_str().unwrap()],
        );
        assert!(out.status.success(), "{choice}: {}", String::from_utf8_lossy(&out.stderr));
        let s: Value =
            serde_json::from_slice(&std::fs::read(run.path().join("summary.json")).unwrap()).unwrap();
        let components = s["components"].as_array().unwrap();
        let find = |kind: &str, name: &str| {
            components
                .iter()
                .find(|c| c["kind"] == kind && c["name"] == name)
                .unwrap_or_else(|| panic!("no {kind} {name} in {components:#?}"))
        };
        let sgd = find("optimizer", "sgd");
        assert_eq!(sgd["plugin"], choice, "{sgd}");
        assert_eq!(sgd["abi_version"], sheaf_abi::ABI_VERSION);
        assert!(sgd["version"].is_string() && sgd["file"].as_str().unwrap().ends_with(".so"), "{sgd}");
        assert_eq!(find("strategy", "data-parallel")["plugin"], "sheaf-strategy-data-parallel");
        assert_eq!(find("transport", "zmq-tcp")["plugin"], "sheaf-transport-zmq");
        assert_eq!(find("compute", "candle")["plugin"], "sheaf-compute-candle");
    }

    let out = sheaf_with(dir.path(), &["run", "--set", "plugins.optimizer.sgd=\"nobody\""]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[plugins.optimizer] sgd = \"nobody\"") && err.contains("fixture-sgd-again ("),
        "{err}"
    );
    let out = sheaf_with(dir.path(), &["run", "--set", "plugins.optimiser.sgd=\"sheaf-optim\""]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`plugins.optimiser`: not a kind of plugin"));
}

/// The fixture built with `-C panic=abort` (its crate alone): refused at load saying
/// why; `sheaf plugins` fails; a job asking for what it provides is told that the
/// library failed to load, and why.
#[test]
fn a_plugin_built_with_panic_abort_is_refused_saying_why() {
    let built = sheaf_tests::cargo_rustc("fixture-panic-abort", &["-C", "panic=abort"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&built, dir.path().join("libfixture_panic_abort.so")).unwrap();
    let rows = plugins_json(Some(dir.path()), false);
    let e = row(&rows, "libfixture_panic_abort.so")["error"].as_str().unwrap().to_owned();
    assert!(e.contains("built with panic = \"abort\"") && e.contains("panic = \"unwind\""), "{e}");

    let out = sheaf_with(dir.path(), &["run", "--set", "train.optimizer=\"abort-sgd\""]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no loaded plugin provides optimizer `abort-sgd`")
            && err.contains("failed to load")
            && err.contains("built with panic = \"abort\""),
        "{err}"
    );
}

/// A versioned library name in a plugin directory is not tried, and the listing says
/// why (not a failure: the exit code stays 0).
#[test]
fn files_not_tried_say_why() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(library("fixture-sgd-again"), dir.path().join("libvendor.so.1")).unwrap();
    let rows = plugins_json(Some(dir.path()), true);
    let why = row(&rows, "libvendor.so.1")["skipped"].as_str().unwrap().to_owned();
    assert!(why.contains("versioned library name"), "{why}");
}

/// Plugin ABI 1.x grows by appending. A vendor's plugin as written for 1.0:
/// - built against ABI 1.0 as released (`fixture-abi-1-0`, through the frozen
///   `frozen/sheaf-abi-1.0`), it loads into today's host and trains on 2 real processes
///   to where today's SGD with the same momentum ends (within 1e-6), and what 1.1
///   appended, `Optimizer::state_values_per_param`, missing from its vtable, gets the
///   default there: the plan assumes 2 values of state per parameter where today's SGD
///   says 1;
/// - the same source builds unchanged against today's `sheaf-core` and `sheaf-abi`
///   (`fixture-vendor-1-0`) and loads as a plugin of today's ABI.
#[test]
fn a_plugin_built_for_abi_1_0_loads_into_later_minors_with_their_defaults() {
    let dir = dir_with(&["fixture-abi-1-0"]);
    let rows = plugins_json(Some(dir.path()), true);
    let old = row(&rows, "libfixture_abi_1_0.so");
    assert_eq!(
        (old["ok"].clone(), old["abi_version"].clone()),
        (Value::Bool(true), Value::from("1.0.0")),
        "{old}"
    );
    assert_ne!(
        sheaf_abi::ABI_VERSION,
        "1.0.0",
        "today's ABI must be a later minor for this to test anything"
    );
    let today = dir_with(&["fixture-vendor-1-0"]);
    let rows = plugins_json(Some(today.path()), true);
    let rebuilt = row(&rows, "libfixture_vendor_1_0.so");
    assert_eq!(
        (rebuilt["ok"].clone(), rebuilt["abi_version"].clone()),
        (Value::Bool(true), Value::from(sheaf_abi::ABI_VERSION)),
        "{rebuilt}"
    );

    // The plan asks the optimizer: a 1.0 one cannot say, and gets the default.
    let state_bytes = |optimizer: &str| {
        let set = format!("train.optimizer=\"{optimizer}\"");
        let out = sheaf_with(
            dir.path(),
            &["plan", "--json", "--set", &set, "--set", "train.options.sgd.momentum=0.9"],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
        (rows[0]["optimizer_state"].as_u64().unwrap(), rows[0]["parameters"].as_u64().unwrap())
    };
    let (vendor, params) = state_bytes("vendor-sgd");
    let (sgd, _) = state_bytes("sgd");
    assert_eq!((vendor, sgd), (2 * params, params), "state bytes of a 1.0 optimizer and of today's SGD");

    let run = |sets: &[&str]| {
        let run_dir = tempfile::tempdir().unwrap();
        let mut args = vec!["launch", "-n", "2", "--set", "train.max_steps=20", "--run-dir"];
        args.push(run_dir.path().to_str().unwrap());
        for s in sets {
            args.extend(["--set", s]);
        }
        let out = sheaf_with(dir.path(), &args);
        assert!(out.status.success(), "{sets:?}: {}", String::from_utf8_lossy(&out.stderr));
        run_dir
    };
    let old = run(&["train.optimizer=\"vendor-sgd\"", "train.options.vendor-sgd.momentum=0.9"]);
    let now = run(&["train.options.sgd.momentum=0.9"]);
    let d = crate::training::max_abs_diff(
        &crate::training::checkpoint(old.path()),
        &crate::training::checkpoint(now.path()),
    );
    assert!(d <= 1e-6, "max abs diff {d} between the 1.0 plugin's SGD and today's");
    let s = crate::training::summary(old.path());
    let optimizer = s["components"].as_array().unwrap().iter().find(|c| c["kind"] == "optimizer").unwrap();
    assert_eq!(
        (optimizer["plugin"].as_str(), optimizer["abi_version"].as_str()),
        (Some("vendor-1-0"), Some("1.0.0"))
    );
}

/// Transports say what they are (ABI 1.2), so the host asks instead of naming them:
/// shared memory reaches a host, keeps 4 MiB rings per peer resident and is preferred
/// there; ZeroMQ's TCP reaches across hosts, its IPC within one; the C transport, whose
/// ABI cannot say, is taken as network reach with no preference (so `auto` never picks
/// it over one that says more).
#[test]
fn transports_say_their_reach() {
    let c_dir = Path::new(env!("SHEAF_C_TRANSPORT")).parent().unwrap();
    let rows = plugins_json(Some(c_dir), true);
    let said = |file: &str, name: &str| -> (String, u64, Option<u64>) {
        let t =
            row(&rows, file)["transports"].as_array().unwrap().iter().find(|t| t["name"] == name).cloned();
        let t = t.unwrap_or_else(|| panic!("{file}: no transport {name}"));
        assert!(t["error"].is_null(), "{t}");
        (
            t["reach"].as_str().unwrap().into(),
            t["preference"].as_u64().unwrap(),
            t["resident_bytes_per_peer"].as_u64(),
        )
    };
    assert_eq!(said("libsheaf_transport_shm.so", "shm"), ("host".into(), 100, Some(4 << 20)));
    assert_eq!(said("libsheaf_transport_zmq.so", "zmq-tcp"), ("network".into(), 10, None));
    assert_eq!(said("libsheaf_transport_zmq.so", "zmq-ipc"), ("host".into(), 50, None));
    let c_file = Path::new(env!("SHEAF_C_TRANSPORT")).file_name().unwrap().to_str().unwrap();
    assert_eq!(said(c_file, "unix-c"), ("network".into(), 0, None));
}

/// The exit codes `sheaf --help` lists: a command whose own output cannot be written
/// (standard output a full device) failed (1), which is not a bad command line (2).
#[test]
fn a_failed_write_is_a_failure_not_a_usage_error() {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out =
        Command::new(sheaf_bin()).args(["plan", "--set", "train.max_steps=1"]).stdout(full).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot write output") && err.contains("No space left on device"), "{err}");

    let help = Command::new(sheaf_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for code in ["0 ", "1 ", "2 ", "128+N"] {
        assert!(help.contains(&format!("\n  {code}")), "--help lists exit code {code}:\n{help}");
    }
}
