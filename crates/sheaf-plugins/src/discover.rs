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

/// What discovery found in the search directories.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Candidates {
    /// The library files to try, in search order, each once.
    pub files: Vec<PathBuf>,
    /// Files that look like libraries but are not tried, and why.
    pub skipped: Vec<(PathBuf, String)>,
}

/// The library files to try, in search order, each once. In the executable's
/// directory only `libsheaf_*` / `sheaf_*` libraries count (cargo's output directory
/// holds other build products); in a directory the user named, every shared library
/// does, so a stray one is reported rather than ignored. Whatever is passed over is
/// in `skipped` with the reason (a library named otherwise beside the executable, a
/// versioned `libx.so.1`), never dropped without a word. A directory that cannot be
/// read is skipped with a warning.
pub fn candidates(dirs: &[SearchDir]) -> Candidates {
    let mut seen = Vec::new();
    let mut out = Candidates::default();
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
        let mut files: Vec<PathBuf> =
            entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect();
        files.sort();
        for file in files {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("").to_owned();
            if !is_shared_library(&file) {
                if name.contains(".so.") {
                    out.skipped.push((
                        file,
                        "a versioned library name: plugins are loaded from NAME.so (link or rename it)"
                            .into(),
                    ));
                }
                continue;
            }
            if dir.origin == Origin::Executable
                && !(name.starts_with("libsheaf_") || name.starts_with("sheaf_"))
            {
                out.skipped.push((
                    file,
                    "beside the executable only libsheaf_* and sheaf_* libraries are plugins \
                     (name it so, or pass its directory with --plugin-dir)"
                        .into(),
                ));
                continue;
            }
            let canonical = file.canonicalize().unwrap_or_else(|_| file.clone());
            if !seen.contains(&canonical) {
                seen.push(canonical);
                out.files.push(file);
            }
        }
    }
    for (file, why) in &out.skipped {
        tracing::debug!("skipped {}: {why}", file.display());
    }
    out
}
