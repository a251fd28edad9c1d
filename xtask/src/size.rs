//! `cargo xtask size`: every crate's Rust lines (its `src/`, test modules and `tests/`
//! counted apart), its dependencies, and its largest file that is not a test, so a
//! change in shape is visible and anyone can reproduce the figures.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// Lines of `file` before its first `#[cfg(test)]` module, and after it.
fn split_lines(file: &Path) -> Result<(usize, usize)> {
    let text = std::fs::read_to_string(file)?;
    let lines: Vec<&str> = text.lines().collect();
    let at = lines.iter().position(|l| l.trim_start().starts_with("#[cfg(test)]")).unwrap_or(lines.len());
    Ok((at, lines.len() - at))
}

/// One line per crate under `crates/` and `plugins/`, then the totals.
pub fn report(root: &Path) -> Result<String> {
    let mut rows = Vec::new();
    for group in ["crates", "plugins"] {
        let mut dirs: Vec<PathBuf> =
            std::fs::read_dir(root.join(group))?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
        dirs.sort();
        for dir in dirs.into_iter().filter(|d| d.join("Cargo.toml").exists()) {
            let (mut code, mut tests, mut largest) = (0, 0, (0, PathBuf::new()));
            let mut files = Vec::new();
            if dir.join("src").exists() {
                crate::tidy::rust_files(&dir.join("src"), &mut files)?;
            }
            for f in &files {
                let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let (c, t) = split_lines(f)?;
                // Test-only files: `tests.rs`, `fuzz.rs` and `src/tests/` (modules only
                // tests declare).
                let in_tests = f.strip_prefix(dir.join("src")).is_ok_and(|r| r.starts_with("tests"));
                if in_tests || matches!(name, "tests.rs" | "fuzz.rs") {
                    tests += c + t;
                    continue;
                }
                code += c;
                tests += t;
                if c > largest.0 {
                    largest = (c, f.strip_prefix(root)?.to_path_buf());
                }
            }
            let mut integration = Vec::new();
            if dir.join("tests").exists() {
                crate::tidy::rust_files(&dir.join("tests"), &mut integration)?;
            }
            for f in &integration {
                tests += std::fs::read_to_string(f)?.lines().count();
            }
            let deps = crate::tidy::dependencies(&std::fs::read_to_string(dir.join("Cargo.toml"))?).len();
            rows.push((
                dir.strip_prefix(root)?.display().to_string(),
                files.len(),
                code,
                tests,
                deps,
                largest,
            ));
        }
    }
    let mut out = format!(
        "{:<40} {:>5} {:>6} {:>6} {:>4}  largest non-test file (lines)\n",
        "crate", "files", "code", "tests", "deps"
    );
    for (name, files, code, tests, deps, (l, path)) in &rows {
        out += &format!("{name:<40} {files:>5} {code:>6} {tests:>6} {deps:>4}  {} ({l})\n", path.display());
    }
    let (code, tests): (usize, usize) = rows.iter().fold((0, 0), |(c, t), r| (c + r.2, t + r.3));
    out += &format!("{:<40} {:>5} {code:>6} {tests:>6}\n", "total", "");
    Ok(out)
}
