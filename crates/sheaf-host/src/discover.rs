//! Where plugins are looked for.

use std::path::{Path, PathBuf};

/// Colon-separated directories searched for plugins, after `--plugin-dir`.
pub const PLUGIN_PATH_ENV: &str = "SHEAF_PLUGIN_PATH";

/// Why a directory is searched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Named with `--plugin-dir`.
    Flag,
    /// Listed in `SHEAF_PLUGIN_PATH`.
    Env,
    /// The directory of the `sheaf` executable, where cargo puts the plugins it builds.
    Executable,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchDir {
    pub path: PathBuf,
    pub origin: Origin,
}

/// The directories to search, in priority order: each `--plugin-dir`, then
/// `SHEAF_PLUGIN_PATH`, then the executable's own directory. A plugin found earlier
/// wins over one of the same name found later.
pub fn search_dirs(flag_dirs: &[PathBuf], env_path: Option<&str>, exe: Option<&Path>) -> Vec<SearchDir> {
    let mut dirs: Vec<SearchDir> =
        flag_dirs.iter().map(|p| SearchDir { path: p.clone(), origin: Origin::Flag }).collect();
    if let Some(env) = env_path {
        dirs.extend(
            env.split(':')
                .filter(|s| !s.is_empty())
                .map(|s| SearchDir { path: PathBuf::from(s), origin: Origin::Env }),
        );
    }
    if let Some(dir) = exe.and_then(Path::parent) {
        dirs.push(SearchDir { path: dir.to_path_buf(), origin: Origin::Executable });
    }
    dirs
}

fn is_shared_library(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("so" | "dylib" | "dll"))
}

/// The library files to try, in search order, each once. In the executable's
/// directory only `libsheaf_*` / `sheaf_*` libraries count (cargo's output directory
/// holds other build products); in a directory the user named, every shared library
/// does, so a stray one is reported rather than ignored. A directory that cannot be
/// read is skipped with a warning.
pub fn candidates(dirs: &[SearchDir]) -> Vec<PathBuf> {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(&dir.path) {
            Ok(e) => e,
            Err(e) => {
                if dir.origin != Origin::Executable {
                    tracing::warn!("cannot read plugin directory {}: {e}", dir.path.display());
                }
                continue;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file() && is_shared_library(p))
            .collect();
        files.sort();
        for file in files {
            if dir.origin == Origin::Executable {
                let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if !(name.starts_with("libsheaf_") || name.starts_with("sheaf_")) {
                    continue;
                }
            }
            let canonical = file.canonicalize().unwrap_or_else(|_| file.clone());
            if !seen.contains(&canonical) {
                seen.push(canonical);
                out.push(file);
            }
        }
    }
    out
}
