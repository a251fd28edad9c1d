//! The `sheaf` command line: parsing and dispatch. The binary only sets up logging
//! and maps errors to exit codes.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{search_dirs, HostError, PluginInfo, Registry, PLUGIN_PATH_ENV};

#[derive(Debug, Parser)]
#[command(
    name = "sheaf",
    version,
    about = "Sheaf: distributed training with pluggable transports and strategies"
)]
pub struct Cli {
    /// Also look for plugins in DIR (before SHEAF_PLUGIN_PATH and the executable's directory).
    #[arg(long = "plugin-dir", value_name = "DIR", global = true)]
    pub plugin_dirs: Vec<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List every plugin library found, with its kinds, versions and whether it loads.
    Plugins {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

impl Cli {
    /// The plugins on this invocation's search path.
    pub fn registry(&self) -> Registry {
        let env = std::env::var(PLUGIN_PATH_ENV).ok();
        let exe = std::env::current_exe().ok();
        Registry::load(&search_dirs(&self.plugin_dirs, env.as_deref(), exe.as_deref()))
    }
}

/// Runs a parsed command line, writing results to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), HostError> {
    match &cli.command {
        Command::Plugins { json } => {
            let rows = cli.registry().listing();
            let text = if *json {
                serde_json::to_string_pretty(&rows).map_err(|e| HostError::Usage(e.to_string()))? + "\n"
            } else {
                render_table(&rows)
            };
            out.write_all(text.as_bytes()).map_err(|e| HostError::Usage(format!("cannot write output: {e}")))
        }
    }
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

/// `sheaf plugins` as a table: one line per library, errors on their own lines.
pub fn render_table(rows: &[PluginInfo]) -> String {
    let dash = || "-".to_owned();
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone().unwrap_or_else(dash),
                if r.provides.is_empty() { dash() } else { group_provides(&r.provides) },
                r.version.clone().unwrap_or_else(dash),
                r.abi_version.clone().unwrap_or_else(dash),
                if r.ok { "ok".into() } else { "error".into() },
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
    }
    if rows.is_empty() {
        out += "(no plugin libraries found)\n";
    }
    out
}
