//! The job: the TOML description of a run (`job`), the dataset it names (`data`), and
//! the memory plan made from both before a byte is allocated (`plan`, `memory`).

pub mod data;
pub mod job;
pub mod memory;
pub mod plan;

#[cfg(test)]
mod fixture;
