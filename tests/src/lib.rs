//! Support for the end-to-end tests: where the built `sheaf` binary and plugin
//! libraries are, and making sure they are fresh before a test uses them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The crates of the host (everything but core, the ABI, the libraries plugins share
/// and the plugins): none of them may name a component a plugin provides.
pub const HOST_CRATES: &[&str] = &[
    "sheaf",
    "sheaf-plugins",
    "sheaf-job",
    "sheaf-report",
    "sheaf-checkpoint",
    "sheaf-launch",
    "sheaf-runtime",
    "sheaf-doctor",
    "sheaf-conformance",
];

/// cargo's output directory for this profile (`target/debug`), found from the test
/// executable's own path (`target/debug/deps/e2e-…`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf()
}

/// Builds the whole workspace (binary, plugins, fixtures) once per test process, so
/// the tests never run a stale `.so`. Cheap when nothing changed. The test fixtures
/// are left only in `deps/`, where only the tests look ([`library`]): not beside
/// `sheaf`, where `sheaf plugins` and its errors would list them to a user.
pub fn ensure_built() -> &'static Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT.get_or_init(|| {
        for args in [
            &["build", "--workspace", "--exclude", "fixture-*", "--quiet"][..],
            &["build", "-p", "fixture-*", "--quiet"],
        ] {
            let status = cargo_here(args).status().map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("`cargo {}` failed ({status})", args.join(" ")));
            }
        }
        clear_fixtures_beside_sheaf();
        Ok(())
    })
}

/// Removes cargo's copies of the fixture libraries beside `sheaf` (the builds' own
/// stay in `deps/`).
fn clear_fixtures_beside_sheaf() {
    let prefix = format!("{}fixture_", std::env::consts::DLL_PREFIX);
    for entry in std::fs::read_dir(target_dir()).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(std::env::consts::DLL_SUFFIX) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// `cargo ARGS` in this crate's directory, building for the profile these tests were
/// built with.
fn cargo_here(args: &[&str]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
    let mut cmd = Command::new(cargo);
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    let profile = target_dir().file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_owned();
    if profile != "debug" {
        cmd.args(["--profile", if profile == "release" { "release" } else { &profile }]);
    }
    cmd
}

/// A built artifact in the target directory (a fixture's in `deps/`), after
/// [`ensure_built`].
pub fn artifact(name: &str) -> PathBuf {
    if let Err(e) = ensure_built() {
        panic!("cannot build the workspace for end-to-end tests: {e}");
    }
    let fixture = name.starts_with(&format!("{}fixture_", std::env::consts::DLL_PREFIX));
    let path = if fixture { target_dir().join("deps").join(name) } else { target_dir().join(name) };
    assert!(path.exists(), "{} missing after building the workspace", path.display());
    path
}

/// The `sheaf` executable.
pub fn sheaf_bin() -> PathBuf {
    artifact("sheaf")
}

/// A plugin or fixture library by crate name (`sheaf-optim` -> `libsheaf_optim.so`).
pub fn library(crate_name: &str) -> PathBuf {
    artifact(&format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        crate_name.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    ))
}

/// Builds `package` again with `rustc_args` passed to its own compilation only
/// (`cargo rustc -p PACKAGE -- ARGS`; its dependencies stay as built) and returns its
/// library. For fixtures that must be built unlike the rest (`-C panic=abort`): the
/// next `cargo build` rebuilds it as usual, so copy the result before relying on it.
pub fn cargo_rustc(package: &str, rustc_args: &[&str]) -> PathBuf {
    if let Err(e) = ensure_built() {
        panic!("cannot build the workspace for end-to-end tests: {e}");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
    let mut cmd = Command::new(cargo);
    cmd.args(["rustc", "--quiet", "-p", package]);
    let profile = target_dir().file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_owned();
    if profile != "debug" {
        cmd.args(["--profile", if profile == "release" { "release" } else { &profile }]);
    }
    let status =
        cmd.arg("--").args(rustc_args).current_dir(env!("CARGO_MANIFEST_DIR")).status().expect("cargo runs");
    assert!(status.success(), "cargo rustc -p {package} -- {rustc_args:?}: {status}");
    clear_fixtures_beside_sheaf();
    library(package)
}
