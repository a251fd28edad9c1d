//! Sheaf plugin: the standard optimizers, SGD and AdamW, with PyTorch's update rules.
//!
//! Each optimizer keeps its state per parameter name, validates a whole step before
//! touching any parameter (a rejected step changes nothing), and saves and restores
//! state exactly, so a resumed run is bit-for-bit an uninterrupted one.

mod adamw;
mod sgd;

pub use adamw::{AdamW, AdamWConfig};
pub use sgd::{Sgd, SgdConfig};

use rayon::prelude::*;
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
    let mut seen = std::collections::BTreeSet::new();
    for p in params {
        if !seen.insert(p.name) {
            return Err(Error::invalid(format!("parameter `{}` given twice in one step", p.name)));
        }
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

/// One piece of a parameter for an elementwise update: its values, its gradient and
/// up to two state buffers of the same length (empty where the rule keeps fewer), and
/// whether the state is new this step.
pub(crate) struct Piece<'a> {
    pub value: &'a mut [f32],
    pub grad: &'a [f32],
    pub state: [&'a mut [f32]; 2],
    pub fresh: bool,
}

/// Elements in a piece of work.
const PIECE: usize = 16 * 1024;
/// Updates smaller than this run on the caller's thread alone: below it, starting a
/// thread costs about what it saves.
const MIN_PARALLEL: usize = 256 * 1024;

/// This process's compute threads: the worker's share of the cores, as the launcher
/// sets it (`RAYON_NUM_THREADS`), else every core.
pub(crate) fn compute_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs `update` over every piece of `params`, shared among `threads` threads (this
/// library's pool, which the training thread joins, rather than a thread started for
/// each step) when the step is large enough to gain. The update is elementwise, so the
/// result does not depend on how the pieces were shared out.
pub(crate) fn update_pieces(params: Vec<Piece<'_>>, threads: usize, update: impl Fn(Piece<'_>) + Sync) {
    let total: usize = params.iter().map(|p| p.value.len()).sum();
    if total < MIN_PARALLEL || threads < 2 {
        params.into_iter().for_each(update);
        return;
    }
    // Pieces of at most PIECE elements, which rayon shares out among the threads.
    let mut pieces = Vec::with_capacity(total / PIECE + params.len());
    for mut p in params {
        while p.value.len() > PIECE {
            let (value, rest_value) = std::mem::take(&mut p.value).split_at_mut(PIECE);
            let (grad, rest_grad) = p.grad.split_at(PIECE);
            let [a, b] = p.state.each_mut().map(|s| {
                let s = std::mem::take(s);
                let at = PIECE.min(s.len());
                s.split_at_mut(at)
            });
            pieces.push(Piece { value, grad, state: [a.0, b.0], fresh: p.fresh });
            p = Piece { value: rest_value, grad: rest_grad, state: [a.1, b.1], fresh: p.fresh };
        }
        pieces.push(p);
    }
    sheaf_pool::install(threads, || pieces.into_par_iter().for_each(&update));
}

/// A parameter beside its optimizer state, and whether the state is new this step.
pub(crate) struct WithState<'p, 's, S> {
    pub value: &'p mut [f32],
    pub grad: &'p [f32],
    pub state: &'s mut S,
    pub fresh: bool,
}

/// Each parameter's state in `state` (made by `new` where missing), paired with the
/// parameter, and whether it was made now. Names are unique ([`validate`] checks).
pub(crate) fn with_state<'p, 's, S>(
    params: &'p mut [Param<'_>],
    state: &'s mut std::collections::BTreeMap<String, S>,
    new: impl Fn(usize) -> S,
) -> Result<Vec<WithState<'p, 's, S>>> {
    let mut fresh = std::collections::BTreeSet::new();
    for p in params.iter() {
        if !state.contains_key(p.name) {
            state.insert(p.name.to_owned(), new(p.value.len()));
            fresh.insert(p.name.to_owned());
        }
    }
    let mut slots: std::collections::BTreeMap<&str, &mut S> =
        state.iter_mut().map(|(n, s)| (n.as_str(), s)).collect();
    params
        .iter_mut()
        .map(|p| {
            let slot = slots
                .remove(p.name)
                .ok_or_else(|| Error::BadState(format!("parameter `{}` given twice in one step", p.name)))?;
            Ok(WithState { value: &mut *p.value, grad: p.grad, state: slot, fresh: fresh.contains(p.name) })
        })
        .collect()
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
