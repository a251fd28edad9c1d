//! The job: the TOML description of a run (`job`), the dataset it names (`data`), and
//! the memory plan made from both before a byte is allocated (`plan`, `memory`).

pub mod data;
pub mod job;
pub mod memory;
pub mod plan;

/// A small model and plans of it, for tests here and in the crates above (feature
/// `fixture`).
#[cfg(any(test, feature = "fixture"))]
pub mod fixture;
