//! Loading one plugin library, with short errors.

use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibraryError, RootModule};
use abi_stable::std_types::RStr;
use sheaf_abi::{abi_version_compatible, PluginModRef, ABI_VERSION};
use sheaf_core::{
    ComputeBackend, DataPartitioner, Link, ModelPartitioner, Optimizer, PluginKind, Provided, Strategy,
    TransportInfo,
};

/// Why a library could not be used as a plugin. Every message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error("{file}: cannot be loaded as a shared library: {detail}")]
    NotLoadable { file: PathBuf, detail: String },
    #[error("{file}: not a Sheaf plugin: {detail}")]
    NotAPlugin { file: PathBuf, detail: String },
    #[error(
        "{file}: built against Sheaf plugin ABI {plugin}, but this host speaks ABI {host} and loads plugins \
         of its major version only; rebuild the plugin against sheaf-abi {host}"
    )]
    AbiMismatch { file: PathBuf, plugin: String, host: String },
    #[error("{file}: declares plugin ABI {version} but its types differ from this host's ({summary})")]
    Layout { file: PathBuf, version: String, summary: String },
    #[error("{file}: {detail}")]
    Init { file: PathBuf, detail: String },
    #[error(
        "{file}: built with panic = \"abort\": a panic inside it would kill the whole process instead of \
         becoming an error naming the plugin; rebuild it with panic = \"unwind\" (cargo's default)"
    )]
    PanicAbort { file: PathBuf },
}

/// The build facts a plugin exports beside its root module (`sheaf_abi::BUILD_INFO_SYMBOL`),
/// `None` for a library built before they existed.
fn build_info(file: &Path) -> Option<serde_json::Value> {
    // SAFETY: the library is already loaded (abi_stable opened it); this takes another
    // reference to it and reads a function the export macro defines with this type.
    let library = unsafe { libloading::Library::new(file) }.ok()?;
    let symbol = format!("{}\0", sheaf_abi::BUILD_INFO_SYMBOL);
    // SAFETY: as above; the string it returns is a static in the library.
    let text = unsafe {
        let get = library.get::<unsafe extern "C" fn() -> *const std::ffi::c_char>(symbol.as_bytes()).ok()?;
        let p = get();
        if p.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
    };
    serde_json::from_str(&text).ok()
}

/// What a loaded plugin says about itself, in core types.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginManifest {
    pub name: String,
    pub version: String,
    pub abi_version: String,
    pub provides: Vec<Provided>,
}

impl PluginManifest {
    /// The distinct kinds provided, in a stable order.
    pub fn kinds(&self) -> Vec<PluginKind> {
        let mut kinds: Vec<PluginKind> = self.provides.iter().map(|p| p.kind).collect();
        kinds.sort();
        kinds.dedup();
        kinds
    }

    pub fn provides(&self, kind: PluginKind, name: &str) -> bool {
        self.provides.iter().any(|p| p.kind == kind && p.name == name)
    }
}

/// What a loaded library is: a Rust plugin's root module (of this host's ABI major:
/// any 1.x), or a C transport's table.
#[derive(Clone)]
pub(crate) enum Module {
    Rust(PluginModRef),
    CTransport(std::sync::Arc<crate::cabi::CTransport>),
}

/// Builds a component through a root module: calls factory `$f` with the name and
/// config, and adapts the box with `from_abi::$adapt`.
macro_rules! build {
    ($self:expr, $f:ident, $adapt:ident, $name:expr, $config:expr) => {{
        let (name, config) = ($name, $config);
        match &$self.module {
            Module::Rust(m) => {
                let b = (m.$f())(RStr::from_str(name), RStr::from_str(config)).into_result()?;
                Ok(sheaf_abi::from_abi::$adapt(b))
            }
            Module::CTransport(_) => Err(sheaf_core::Error::Unsupported(format!(
                "{} is a C transport library, not a Rust plugin",
                $self.file.display()
            ))),
        }
    }};
}

/// A plugin library that loaded and passed every check.
#[derive(Clone)]
pub struct LoadedPlugin {
    pub file: PathBuf,
    pub manifest: PluginManifest,
    pub(crate) module: Module,
}

impl LoadedPlugin {
    pub(crate) fn optimizer(&self, name: &str, config: &str) -> sheaf_core::Result<Box<dyn Optimizer>> {
        build!(self, new_optimizer, optimizer, name, config)?
    }

    pub(crate) fn data_partitioner(
        &self,
        name: &str,
        config: &str,
    ) -> sheaf_core::Result<Box<dyn DataPartitioner>> {
        build!(self, new_data_partitioner, data_partitioner, name, config)
    }

    pub(crate) fn model_partitioner(
        &self,
        name: &str,
        config: &str,
    ) -> sheaf_core::Result<Box<dyn ModelPartitioner>> {
        build!(self, new_model_partitioner, model_partitioner, name, config)
    }

    pub(crate) fn compute(&self, name: &str, config: &str) -> sheaf_core::Result<Box<dyn ComputeBackend>> {
        build!(self, new_compute, compute, name, config)?
    }

    pub(crate) fn strategy(&self, name: &str, config: &str) -> sheaf_core::Result<Box<dyn Strategy>> {
        build!(self, new_strategy, strategy, name, config)?
    }

    pub(crate) fn link(&self, name: &str, config: &str) -> sheaf_core::Result<Box<dyn Link>> {
        match &self.module {
            Module::CTransport(c) => c.link(config),
            _ => build!(self, new_link, link, name, config)?,
        }
    }

    /// What transport `name` says of itself: a Rust plugin of ABI 1.2 or later answers;
    /// an earlier one's root module lacks the factory, and a C transport's table has no
    /// such entry, so theirs are taken as network reach.
    pub(crate) fn transport_info(&self, name: &str) -> sheaf_core::Result<TransportInfo> {
        match &self.module {
            Module::Rust(m) => match m.transport_info() {
                Some(f) => TransportInfo::decode(f(RStr::from_str(name)).into_result()?.as_str()),
                None => Ok(TransportInfo::network()),
            },
            Module::CTransport(_) => Ok(TransportInfo::network()),
        }
    }
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin").field("file", &self.file).field("manifest", &self.manifest).finish()
    }
}

/// The minor number of ABI version `v` (0 where it has none).
fn minor(v: &str) -> u64 {
    v.split('.').nth(1).and_then(|m| m.parse().ok()).unwrap_or(0)
}

/// abi_stable's layout report runs to kilobytes (two full type dumps per mismatch):
/// keep its verdict, "<error>: this host has <type>, the plugin <type>", for the first
/// mismatch. `reversed`: the check ran with the plugin's types as the expected ones.
fn summarise_layout_error(e: &LibraryError, reversed: bool) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let after = |label: &str| lines.iter().position(|l| *l == label).and_then(|i| lines.get(i + 1)).copied();
    let errors: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("Error:")).collect();
    let (host, plugin) = if reversed { ("Found:", "Expected:") } else { ("Expected:", "Found:") };
    match (errors.first(), after(host), after(plugin)) {
        (Some(err), Some(host), Some(plugin)) => {
            format!("{err}: this host has {host}, the plugin {plugin}; {} mismatch(es)", errors.len())
        }
        _ => lines
            .iter()
            .find(|l| !l.starts_with("Compared"))
            .unwrap_or(&"layout mismatch")
            .chars()
            .take(160)
            .collect(),
    }
}

/// Loads the library at `file` and checks, in order: that it is a shared library,
/// that it exports an abi_stable root module (or else a C transport's table,
/// [`crate::cabi`]), that the module is Sheaf's, that its ABI version matches ours,
/// that its type layout matches ours, and that its manifest can be read. The library
/// stays loaded for the life of the process either way.
pub fn load_plugin(file: &Path) -> Result<LoadedPlugin, LoadError> {
    let file_buf = file.to_path_buf();
    let header = match lib_header_from_path(file) {
        Ok(h) => h,
        Err(LibraryError::OpenError { err, .. }) => {
            return Err(LoadError::NotLoadable { file: file_buf, detail: err.to_string() })
        }
        Err(LibraryError::GetSymbolError { .. }) => {
            return match crate::cabi::load(file)? {
                Some(c) => Ok(LoadedPlugin {
                    file: file_buf,
                    manifest: PluginManifest {
                        name: c.name.clone(),
                        version: c.version.clone(),
                        abi_version: format!("C transport v{}", c.abi),
                        provides: vec![Provided { kind: PluginKind::Transport, name: c.name.clone() }],
                    },
                    module: Module::CTransport(c),
                }),
                None => Err(LoadError::NotAPlugin {
                    file: file_buf,
                    detail: "it exports neither a plugin root module nor sheaf_transport_plugin_v1".into(),
                }),
            };
        }
        Err(other) => return Err(LoadError::NotAPlugin { file: file_buf, detail: other.to_string() }),
    };
    let consts = header.root_mod_consts();
    let base_name = consts.base_name().as_str();
    if base_name != PluginModRef::BASE_NAME {
        return Err(LoadError::NotAPlugin {
            file: file_buf,
            detail: format!("its root module is `{base_name}`, not `{}`", PluginModRef::BASE_NAME),
        });
    }
    if build_info(file).is_some_and(|info| info["panic"] == "abort") {
        return Err(LoadError::PanicAbort { file: file_buf });
    }
    let version = header.version_strings().version.as_str().to_owned();
    let layout_err = |e: LibraryError, reversed: bool| match e {
        LibraryError::AbiInstability(_) => LoadError::Layout {
            file: file_buf.clone(),
            version: version.clone(),
            summary: summarise_layout_error(&e, reversed),
        },
        other => LoadError::Init { file: file_buf.clone(), detail: other.to_string() },
    };
    let manifest_err = |detail: String| LoadError::Init { file: file_buf.clone(), detail };
    // A plugin of this host's major version: abi_stable checks its layout against the
    // host's types, prefix by prefix (a 1.0 plugin lacks what later minors appended,
    // which the host then finds missing and falls back to the default for).
    if !abi_version_compatible(ABI_VERSION, &version) {
        return Err(LoadError::AbiMismatch { file: file_buf, plugin: version, host: ABI_VERSION.to_owned() });
    }
    let m = if minor(&version) < minor(ABI_VERSION) {
        // Built for an earlier minor: its types must be a prefix of ours, field by
        // field, which is abi_stable's check with the roles reversed (it lets only the
        // library have fields the host lacks: a newer plugin in an older host).
        let theirs = header.layout().ok_or_else(|| {
            manifest_err("exports its root module without a layout, so its types cannot be checked".into())
        })?;
        let ours = <PluginModRef as abi_stable::StableAbi>::LAYOUT;
        // With globals of its own: abi_stable's shared ones merge every checked prefix
        // type into one view, which the reversed roles would leave at the shorter one,
        // failing every later (newer) plugin.
        let globals = abi_stable::abi_stability::abi_checking::CheckingGlobals::new();
        abi_stable::abi_stability::abi_checking::check_layout_compatibility_with_globals(
            theirs, ours, &globals,
        )
        .map_err(|e| {
            layout_err(LibraryError::AbiInstability(abi_stable::std_types::RBoxError::new(e)), true)
        })?;
        // SAFETY: the layout was checked just above: every type the library built is a
        // prefix of the host's, and what later minors appended is reached only through
        // abi_stable's prefix accessors, which see the library's shorter vtables and
        // fall back to the trait methods' defaults.
        unsafe { header.init_root_module_with_unchecked_layout::<PluginModRef>() }
            .map_err(|e| layout_err(e, true))?
    } else {
        header.init_root_module::<PluginModRef>().map_err(|e| layout_err(e, false))?
    };
    let abi_manifest =
        (m.manifest())().into_result().map_err(|e| manifest_err(sheaf_core::Error::from(e).to_string()))?;
    let provided: Vec<(String, String)> =
        abi_manifest.provides.iter().map(|p| (p.kind.to_string(), p.name.to_string())).collect();
    let (module, manifest) =
        (Module::Rust(m), (abi_manifest.name.into_string(), abi_manifest.version.into_string(), provided));
    let (name, plugin_version, provided) = manifest;
    let provides = provided
        .into_iter()
        .filter_map(|(kind_name, name)| match PluginKind::from_name(&kind_name) {
            Some(kind) => Some(Provided { kind, name }),
            None => {
                tracing::warn!("{}: ignoring unknown plugin kind `{kind_name}`", file.display());
                None
            }
        })
        .collect();
    Ok(LoadedPlugin {
        file: file_buf,
        manifest: PluginManifest { name, version: plugin_version, abi_version: version, provides },
        module,
    })
}
