//! The host: finds plugin libraries, loads them safely, and hands out core trait
//! objects built by them. The `sheaf` binary is a thin layer over this library.
//!
//! Key decisions: libraries are loaded with `lib_header_from_path` (never
//! `RootModule::load_from_*`, which caches one module per type per process), the ABI
//! version is checked by us before abi_stable's layout check so the error is short and
//! names both versions, a library that fails to load never stops the others, and no
//! library is ever unloaded.

pub mod bench;
mod cabi;
pub mod checkpoint;
pub mod cli;
pub mod data;
mod discover;
pub mod doctor;
#[cfg(test)]
mod fuzz;
pub mod job;
pub mod launch;
mod loader;
pub mod memory;
pub mod outputs;
pub mod plan;
pub mod plot;
pub mod plugin_check;
mod registry;
mod rollcall;
pub mod sample;
pub mod selftest;
pub mod trace;
mod whole;
pub mod worker;
pub mod world;

pub use discover::{candidates, search_dirs, Candidates, Origin, SearchDir, PLUGIN_PATH_ENV};
pub use loader::{load_plugin, LoadError, LoadedPlugin, PluginManifest};
pub use registry::{ComponentSource, HostError, PluginInfo, Registry};
