//! Sheaf's automation, run as `cargo xtask <command>` (aliased in `.cargo/config.toml`).
//!
//! - `ci`: formatting check, clippy with warnings denied, then `test`. What `.ci/run` runs.
//! - `test`: builds the whole workspace (the `sheaf` binary, every plugin `.so`, the
//!   test fixtures), then runs every test.
//! - `tidy`: the repository conventions (also run as a test).

mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("ci") => ci(&root),
        Some("test") => test(&root, &args[1..]),
        Some("tidy") => {
            let problems = tidy::check(&root)?;
            if problems.is_empty() {
                println!("tidy: ok");
                Ok(())
            } else {
                bail!("tidy found {} problem(s):\n{}", problems.len(), problems.join("\n"))
            }
        }
        _ => {
            eprintln!("usage: cargo xtask <ci | test [cargo test args] | tidy>");
            std::process::exit(2)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root").to_path_buf()
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(cargo).args(args).current_dir(root).status().context("running cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    cargo(root, &["build", "--workspace"])?;
    let mut args = vec!["test", "--workspace"];
    args.extend(extra.iter().map(String::as_str));
    cargo(root, &args)
}

fn ci(root: &Path) -> Result<()> {
    cargo(root, &["fmt", "--all", "--", "--check"])?;
    cargo(root, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    test(root, &[])
}
