//! Sheaf plugin: the standard optimizers, SGD and AdamW, with PyTorch's update rules.
//!
//! Each optimizer keeps its state per parameter name, validates a whole step before
//! touching any parameter (a rejected step changes nothing), and saves and restores
//! state exactly, so a resumed run is bit-for-bit an uninterrupted one.

mod adamw;
mod sgd;

pub use adamw::{AdamW, AdamWConfig};
pub use sgd::{Sgd, SgdConfig};

use sheaf_core::{Error, Optimizer, Param, PluginKind, Provided, Result};

/// The plugin as exported to the host.
pub struct OptimPlugin;

impl sheaf_abi::Plugin for OptimPlugin {
    const NAME: &'static str = "sheaf-optim";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn provides() -> Vec<Provided> {
        ["sgd", "adamw"].map(|name| Provided { kind: PluginKind::Optimizer, name: name.into() }).to_vec()
    }

    fn optimizer(name: &str, config: &str) -> Result<Box<dyn Optimizer>> {
        new_optimizer(name, config)
    }
}

sheaf_abi::export_plugin!(OptimPlugin);

/// Builds optimizer `name` from a JSON object of settings (`{}` for the defaults).
pub fn new_optimizer(name: &str, config: &str) -> Result<Box<dyn Optimizer>> {
    let config = if config.trim().is_empty() { "{}" } else { config };
    match name {
        "sgd" => Ok(Box::new(Sgd::new(parse(name, config)?)?)),
        "adamw" => Ok(Box::new(AdamW::new(parse(name, config)?)?)),
        other => Err(Error::config(
            "train.optimizer",
            format!("unknown optimizer `{other}` (sheaf-optim has sgd, adamw)"),
        )),
    }
}

fn parse<T: serde::de::DeserializeOwned>(name: &str, config: &str) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_str(config);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." { format!("optimizer {name}") } else { format!("optimizer {name}: {path}") };
        Error::config(key, e.into_inner())
    })
}

/// Checks that every parameter's gradient matches it, and its state buffers if any,
/// before any parameter is changed.
fn validate(params: &[Param<'_>], state_len: impl Fn(&str) -> Option<usize>) -> Result<()> {
    for p in params {
        if p.value.len() != p.grad.len() {
            return Err(Error::invalid(format!(
                "parameter `{}` has {} elements but its gradient {}",
                p.name,
                p.value.len(),
                p.grad.len()
            )));
        }
        if let Some(n) = state_len(p.name) {
            if n != p.value.len() {
                return Err(Error::invalid(format!(
                    "parameter `{}` has {} elements but its optimizer state {n}",
                    p.name,
                    p.value.len()
                )));
            }
        }
    }
    Ok(())
}

fn check_finite(what: &str, v: f64) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(Error::config(what, format!("must be a finite non-negative number, got {v}")))
    }
}

#[cfg(test)]
mod tests;
