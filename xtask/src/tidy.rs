//! Repository conventions, checked by `cargo xtask tidy` and by `cargo test`:
//! every Rust file starts with a `//!` line saying what it is for, and holds no code
//! block in a doc comment (`xtask ci` runs no doc tests); every crate's
//! dependencies are on its allow-list (`ALLOWED`); every crate inherits the workspace
//! lints.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// Every `.rs` file under `dir`, build outputs and hidden directories left out.
pub fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if !matches!(name, "target" | ".git" | "runs") && !name.starts_with('.') {
                rust_files(&path, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// Every dependency a crate may have (its `[dependencies]`, by crate directory): a new
/// one is a decision made here, in review, not in passing. Core is vocabulary (the
/// training helpers' `multiversion` and `libc` live in `sheaf-train`); the ABI and
/// collectives stay free of async runtimes, candle and ZeroMQ.
#[rustfmt::skip]
const ALLOWED: &[(&str, &[&str])] = &[
    ("crates/sheaf-abi", &["sheaf-core", "abi_stable"]),
    ("crates/sheaf-auth", &["hmac", "sha2", "getrandom"]),
    ("crates/sheaf-checkpoint", &["bytemuck", "serde", "serde_json", "safetensors", "toml", "tracing", "sheaf-core", "sheaf-collectives", "sheaf-plugins", "sheaf-job", "sheaf-report"]),
    ("crates/sheaf-collectives", &["sheaf-core", "bytemuck", "half"]),
    ("crates/sheaf-conformance", &["bytemuck", "serde", "serde_json", "tempfile", "sheaf-core", "sheaf-collectives", "sheaf-testkit", "sheaf-plugins", "sheaf-job", "sheaf-report", "sheaf-launch", "sheaf-runtime"]),
    ("crates/sheaf-core", &["bytemuck", "thiserror"]),
    ("crates/sheaf-data", &["sheaf-core", "flate2", "memmap2", "thiserror", "rayon", "serde", "serde_json", "tiktoken-rs"]),
    ("crates/sheaf-doctor", &["bytemuck", "serde", "serde_json", "tracing", "sheaf-core", "sheaf-collectives", "sheaf-auth", "sheaf-testkit", "sheaf-plugins", "sheaf-job", "sheaf-report", "sheaf-launch", "sheaf-runtime"]),
    ("crates/sheaf-job", &["serde", "serde_json", "serde_path_to_error", "toml", "libc", "sheaf-core", "sheaf-collectives", "sheaf-data", "sheaf-plugins"]),
    ("crates/sheaf-launch", &["serde", "serde_json", "libc", "signal-hook", "sheaf-core", "sheaf-auth", "sheaf-plugins", "sheaf-report", "sheaf-checkpoint"]),
    ("crates/sheaf-plugins", &["abi_stable", "serde", "serde_json", "thiserror", "tracing", "libloading", "sheaf-core", "sheaf-abi", "sheaf-collectives"]),
    ("crates/sheaf-pool", &["rayon"]),
    ("crates/sheaf-report", &["bytemuck", "serde", "serde_json", "safetensors", "memmap2", "plotters", "indicatif", "console", "prost", "crc32c", "half", "sheaf-core", "sheaf-plugins", "sheaf-job"]),
    ("crates/sheaf-runtime", &["bytemuck", "serde_json", "tracing", "sheaf-core", "sheaf-collectives", "sheaf-auth", "sheaf-plugins", "sheaf-job", "sheaf-report", "sheaf-checkpoint", "sheaf-launch"]),
    ("crates/sheaf-testkit", &["sheaf-core", "sheaf-collectives", "bytemuck", "half", "proptest", "libc"]),
    ("crates/sheaf-train", &["sheaf-core", "bytemuck", "multiversion", "libc"]),
    ("crates/sheaf", &["clap", "serde_json", "libc", "tracing-subscriber", "sheaf-core", "sheaf-collectives", "sheaf-data", "sheaf-plugins", "sheaf-job", "sheaf-report", "sheaf-checkpoint", "sheaf-launch", "sheaf-runtime", "sheaf-doctor", "sheaf-conformance"]),
    ("plugins/sheaf-compute-candle", &["sheaf-core", "sheaf-train", "sheaf-pool", "sheaf-abi", "abi_stable", "candle-core", "gemm", "rayon", "multiversion", "serde", "serde_json"]),
    ("plugins/sheaf-optim", &["sheaf-core", "sheaf-pool", "rayon", "sheaf-abi", "abi_stable", "serde", "serde_json", "serde_path_to_error"]),
    ("plugins/sheaf-partition", &["sheaf-core", "sheaf-abi", "abi_stable", "serde", "serde_json", "serde_path_to_error"]),
    ("plugins/sheaf-strategy-data-parallel", &["sheaf-core", "sheaf-train", "sheaf-abi", "abi_stable", "bytemuck", "half", "serde", "serde_json"]),
    ("plugins/sheaf-strategy-pipeline", &["sheaf-core", "sheaf-train", "sheaf-abi", "abi_stable", "bytemuck", "serde", "serde_json"]),
    ("plugins/sheaf-strategy-tensor-parallel", &["sheaf-core", "sheaf-train", "sheaf-abi", "abi_stable", "bytemuck", "serde", "serde_json"]),
    ("plugins/sheaf-transport-shm", &["sheaf-core", "sheaf-abi", "sheaf-collectives", "abi_stable", "libc", "serde", "serde_json", "sheaf-auth"]),
    ("plugins/sheaf-transport-zmq", &["sheaf-core", "sheaf-abi", "sheaf-collectives", "bytes", "abi_stable", "zeromq", "tokio", "futures", "serde", "serde_json", "sheaf-auth"]),
];

/// The names in a manifest's `[dependencies]` (and any `[target.*.dependencies]`).
pub fn dependencies(manifest: &str) -> Vec<String> {
    let mut in_deps = false;
    let mut names = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_deps = line == "[dependencies]"
                || (line.starts_with("[target.") && line.ends_with(".dependencies]"));
        } else if in_deps && !line.is_empty() && !line.starts_with('#') {
            if let Some(name) = line.split(['.', ' ', '=']).next() {
                names.push(name.to_owned());
            }
        }
    }
    names
}

/// Every convention broken, one line each.
pub fn check(root: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for dir in ["crates", "plugins", "xtask", "tests", "benches"] {
        let d = root.join(dir);
        if d.exists() {
            rust_files(&d, &mut files)?;
        }
    }
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        if !text.starts_with("//!") {
            problems
                .push(format!("{}: does not start with a `//!` line", file.strip_prefix(root)?.display()));
        }
        // `cargo xtask ci` runs no doc tests: a code block in a doc comment would be one.
        let fence = |l: &str| {
            let t = l.trim_start();
            (t.starts_with("///") || t.starts_with("//!")) && t.contains("```")
        };
        if let Some(n) = text.lines().position(fence) {
            problems.push(format!(
                "{}:{}: a code block in a doc comment (a doc test `cargo xtask ci` does not run)",
                file.strip_prefix(root)?.display(),
                n + 1
            ));
        }
    }
    for group in ["crates", "plugins"] {
        for entry in std::fs::read_dir(root.join(group))? {
            let dir = entry?.path();
            let Ok(manifest) = std::fs::read_to_string(dir.join("Cargo.toml")) else { continue };
            let name = dir.strip_prefix(root)?.display().to_string();
            let Some((_, allowed)) = ALLOWED.iter().find(|(d, _)| *d == name) else {
                problems.push(format!("{name}: not in tidy's ALLOWED list of each crate's dependencies"));
                continue;
            };
            for dep in dependencies(&manifest) {
                if !allowed.contains(&dep.as_str()) {
                    problems.push(format!(
                        "{name}: depends on {dep}, which tidy's ALLOWED list does not allow it"
                    ));
                }
            }
        }
    }
    for group in ["crates", "plugins"] {
        for entry in std::fs::read_dir(root.join(group))? {
            let manifest = entry?.path().join("Cargo.toml");
            if manifest.exists() && !std::fs::read_to_string(&manifest)?.contains("[lints]\nworkspace = true")
            {
                problems.push(format!(
                    "{}: lacks `[lints] workspace = true`",
                    manifest.strip_prefix(root)?.display()
                ));
            }
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    /// A dependency added to core's manifest is caught (the check reads the sections).
    #[test]
    fn dependencies_are_read_from_their_sections() {
        let manifest = "[package]\nname = \"x\"\n[dependencies]\nthiserror.workspace = true\ntokio = { workspace = true }\n\n[dev-dependencies]\nproptest.workspace = true\n[target.'cfg(unix)'.dependencies]\nlibc = \"0.2\"\n";
        assert_eq!(super::dependencies(manifest), ["thiserror", "tokio", "libc"]);
    }

    #[test]
    fn repository_is_tidy() {
        let problems = super::check(&super::super::workspace_root()).unwrap();
        assert!(problems.is_empty(), "tidy:\n{}", problems.join("\n"));
    }
}
