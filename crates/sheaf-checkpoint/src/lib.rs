//! Checkpoints a run resumes from, and the whole-model files rank 0 writes from the
//! pieces other ranks hold.

pub mod checkpoint;
#[cfg(test)]
mod fuzz;
pub mod universal;
pub mod whole;
