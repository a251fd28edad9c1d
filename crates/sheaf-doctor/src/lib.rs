//! Diagnostics: `sheaf doctor` (what a job will need and whether this machine and its
//! peers can give it), the roll call that finds every rank, and the self-test.

pub mod doctor;
mod rollcall;
pub mod selftest;
