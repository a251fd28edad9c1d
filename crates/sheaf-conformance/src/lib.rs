//! Conformance and benchmarks: `sheaf plugin check` (a plugin library against the
//! laws of its kind) and `sheaf bench` (collectives over a transport, in real
//! processes).

pub mod bench;
pub mod plugin_check;
