//! Plugin loading: finds plugin libraries, loads them safely, and hands out core trait
//! objects built by them.
//!
//! Key decisions: libraries are loaded with `lib_header_from_path` (never
//! `RootModule::load_from_*`, which caches one module per type per process), the ABI
//! version is checked by us before abi_stable's layout check so the error is short and
//! names both versions, a library that fails to load never stops the others, and no
//! library is ever unloaded.

mod cabi;
mod discover;
mod error;
mod loader;
mod registry;

pub use discover::{candidates, search_dirs, Candidates, Origin, SearchDir, PLUGIN_PATH_ENV};
pub use error::{exit, BoxError, HostError};
pub use loader::{load_plugin, LoadError, LoadedPlugin, PluginManifest};
pub use registry::{ComponentSource, PluginInfo, Registry};
