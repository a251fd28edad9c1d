//! End-to-end tests of the real `sheaf` binary and real plugin libraries.

mod bench;
mod c_transport;
mod collectives;
mod gpt;
mod hosts;
mod memory;
mod model_parallel;
mod plugin_check;
mod plugins;
mod resilience;
mod training;
