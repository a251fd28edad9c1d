//! What a run leaves behind: the run directory's files (`summary.json`, metrics,
//! safetensors), the traces of collectives and stragglers, and the loss plot.

pub mod flight;
pub mod outputs;
pub mod plot;
pub mod tensorboard;
pub mod trace;
