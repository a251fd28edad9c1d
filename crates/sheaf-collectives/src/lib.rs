//! Collective algorithms over any point-to-point [`Link`].
//!
//! A transport plugin only has to move tagged bytes; [`Group`] turns that into a full
//! [`Communicator`]: allreduce by ring (reduce-scatter then allgather over the same
//! balanced chunks), recursive halving-doubling or a direct exchange ([`Algorithm`],
//! chosen by size unless a job fixes it), ring allgather and reduce-scatter,
//! binomial-tree or pipelined-chain broadcast and reduce ([`BroadcastAlgorithm`]),
//! dissemination barrier, and `split` into sub-communicators that share the link under
//! their own tag context. A transport that reduces natively is asked first.
//!
//! `group.rs` is the communicator (peers, deadlines, failures, the collectives'
//! argument checks); each algorithm is a module under `group/`; `policy.rs` chooses
//! among them.
//!
//! Invariants: every rank of a group calls the same collectives in the same order; the
//! reduction order of each algorithm is fixed, so results are reproducible run to run;
//! after any failure the group is poisoned and the world is told who failed.

mod group;
mod hybrid;
mod policy;
pub mod reduce;
mod tuning;

pub use group::{Group, BLAME_GRACE};
pub use hybrid::HybridLink;
pub use policy::{Algorithm, BroadcastAlgorithm, CHAIN_MIN_BYTES};
pub use sheaf_core::Link;
pub use tuning::{calibrate, Tuning};
