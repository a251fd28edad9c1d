//! The conformance suite: laws every implementation of a Sheaf trait must obey, as
//! plain functions returning `Err(description)` on a violation. Property tests drive
//! them with generated cases; `sheaf plugin check` will drive them against a vendor's
//! `.so`.

pub mod collectives;
pub mod compute;
pub mod optimizer;
pub mod partitioner;

/// The deterministic generator every rank and process derives the same data from.
pub use sheaf_core::SplitMix64 as SplitMix;
