//! Repository conventions, checked by `cargo xtask tidy` and by `cargo test`:
//! every Rust file starts with a `//!` line saying what it is for; the vocabulary and
//! ABI crates stay free of async runtimes, candle, ZeroMQ (and core of abi_stable);
//! every crate inherits the workspace lints.

use std::path::{Path, PathBuf};

use anyhow::Result;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
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

/// Dependencies a crate must not have, by crate directory.
const FORBIDDEN: &[(&str, &[&str])] = &[
    ("crates/sheaf-core", &["tokio", "candle-core", "zeromq", "abi_stable", "libloading"]),
    ("crates/sheaf-abi", &["tokio", "candle-core", "zeromq"]),
    ("crates/sheaf-collectives", &["tokio", "candle-core", "zeromq", "abi_stable"]),
];

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
    }
    for (dir, banned) in FORBIDDEN {
        let manifest = std::fs::read_to_string(root.join(dir).join("Cargo.toml"))?;
        for dep in *banned {
            if manifest.lines().any(|l| {
                l.trim_start().starts_with(&format!("{dep} "))
                    || l.trim_start().starts_with(&format!("{dep}."))
            }) {
                problems.push(format!("{dir}: must not depend on {dep}"));
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
    #[test]
    fn repository_is_tidy() {
        let problems = super::check(&super::super::workspace_root()).unwrap();
        assert!(problems.is_empty(), "tidy:\n{}", problems.join("\n"));
    }
}
