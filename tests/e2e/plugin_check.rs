//! `sheaf plugin check PATH.so`: the vendor's tool, run on every shipped plugin (it
//! must pass) and on broken ones (it must fail, saying why).

use std::process::Command;

use serde_json::Value;
use sheaf_tests::{library, sheaf_bin};

fn check(crate_name: &str, extra: &[&str]) -> (bool, Vec<Value>, String) {
    let out = Command::new(sheaf_bin())
        .args(["plugin", "check"])
        .arg(library(crate_name))
        .args(extra)
        .arg("--json")
        .output()
        .unwrap();
    let rows = serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    (out.status.success(), rows, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn every_shipped_plugin_passes_its_conformance_suite() {
    for (name, kinds) in [
        ("sheaf-transport-zmq", vec!["transport"]),
        ("sheaf-transport-shm", vec!["transport"]),
        ("sheaf-optim", vec!["optimizer"]),
        ("sheaf-partition", vec!["data-partitioner", "model-partitioner"]),
        ("sheaf-compute-candle", vec!["compute", "model"]),
        ("sheaf-strategy-data-parallel", vec!["strategy"]),
        ("sheaf-strategy-pipeline", vec!["strategy"]),
        ("sheaf-strategy-tensor-parallel", vec!["strategy"]),
    ] {
        let (ok, rows, stderr) = check(name, &["--cases", "6", "--worlds", "1,2,3"]);
        assert!(ok, "{name}: {stderr}\n{rows:#?}");
        assert!(rows.iter().all(|r| r["passed"] == true), "{name}: {rows:#?}");
        for k in kinds {
            assert!(rows.iter().any(|r| r["kind"] == k), "{name}: no {k} rows in {rows:#?}");
        }
    }
    let (_, rows, _) = check("sheaf-transport-zmq", &["--cases", "2", "--worlds", "2,4"]);
    let tcp: Vec<&str> =
        rows.iter().filter(|r| r["name"] == "zmq-tcp").map(|r| r["check"].as_str().unwrap()).collect();
    assert_eq!(tcp, ["collective laws, 2 processes, 2 cases", "collective laws, 4 processes, 2 cases"]);
}

#[test]
fn a_broken_plugin_fails_the_check_and_says_why() {
    let (ok, rows, stderr) = check("fixture-panicky", &[]);
    assert!(!ok);
    assert!(stderr.contains("conformance checks failed"), "{stderr}");
    assert!(rows.iter().all(|r| r["passed"] == false), "{rows:#?}");
    assert!(rows.iter().any(|r| r["detail"].as_str().unwrap().contains("panicked")), "{rows:#?}");

    let (ok, _, stderr) = check("fixture-old-abi", &[]);
    assert!(!ok && stderr.contains("0.0.7"), "{stderr}");
}

/// Every kind has laws: the local-SGD fixture's ranks drift apart between averages, so
/// at a world of 2 it does not end where one process does, and the check says so.
#[test]
fn a_strategy_that_is_not_one_process_fails_its_law() {
    let (ok, rows, _) = check("fixture-local-sgd", &[]);
    assert!(!ok);
    let row = rows.iter().find(|r| r["kind"] == "strategy").unwrap();
    assert_eq!(row["passed"], false);
    let detail = row["detail"].as_str().unwrap();
    assert!(detail.contains("at a world of 2") && detail.contains("from one process's"), "{detail}");
}

/// `cargo xtask new-plugin` writes out-of-tree crates that build and pass `sheaf plugin
/// check` as generated, nothing of the workspace copied: the most involved kind with
/// path dependencies into this checkout, the simplest with git dependencies on its
/// repository (`file://`, the committed tree).
#[test]
fn generated_plugins_build_out_of_tree_and_pass_the_check() {
    let out_of_tree = tempfile::tempdir().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    // Their own target directory: not beside `sheaf`, where a `libsheaf_*` is a plugin.
    let target = sheaf_tests::target_dir().parent().unwrap().join("new-plugin");
    let git = format!("file://{}", root.display());
    // The git form needs this checkout to be a repository cargo can fetch from.
    let fetchable = Command::new("git")
        .args(["-C", &root.display().to_string(), "rev-parse", "--is-shallow-repository"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "false");
    if !fetchable {
        eprintln!(
            "{} is not a full git repository: the optimizer uses path dependencies too",
            root.display()
        );
    }
    for (kind, source) in [("optimizer", fetchable.then_some(git.as_str())), ("strategy", None)] {
        let dir = out_of_tree.path().join(kind);
        let name = format!("made-{kind}");
        let mut new_plugin = Command::new(&cargo);
        new_plugin.args(["xtask", "new-plugin", &name, "--kind", kind, "--path"]).arg(&dir);
        if let Some(url) = source {
            new_plugin.args(["--git", url]);
        }
        let out = new_plugin.current_dir(&root).output().unwrap();
        assert!(out.status.success(), "new-plugin {kind}: {}", String::from_utf8_lossy(&out.stderr));
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains(if source.is_some() { "git = \"file://" } else { "path = \"" }),
            "{manifest}"
        );
        // A git source is fetched (from this repository, no network); paths build offline.
        let mut build = Command::new(&cargo);
        build.args(["build", "--quiet"]).args(source.is_none().then_some("--offline"));
        let out = build.current_dir(&dir).env("CARGO_TARGET_DIR", &target).output().unwrap();
        assert!(out.status.success(), "building the {kind} crate: {}", String::from_utf8_lossy(&out.stderr));
        let library = target.join("debug").join(format!("libsheaf_made_{kind}.so"));
        let out =
            Command::new(sheaf_bin()).args(["plugin", "check"]).arg(&library).arg("--json").output().unwrap();
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert!(out.status.success(), "{kind}: {}\n{rows:#?}", String::from_utf8_lossy(&out.stderr));
        assert!(
            !rows.is_empty() && rows.iter().all(|r| r["passed"] == true && r["name"] == name.as_str()),
            "{rows:#?}"
        );
    }
}
