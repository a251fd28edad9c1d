//! The worker's runtime: one rank's run, from the job to `summary.json` (`worker`),
//! the world it joins (`world`), and sampling from a trained model (`sample`).

mod connect;
pub mod eval;
pub mod hf;
pub mod sample;
pub mod trained;
pub mod tuning;
pub mod worker;
pub mod world;

pub use connect::Connected;
pub use world::WorkerEnv;
