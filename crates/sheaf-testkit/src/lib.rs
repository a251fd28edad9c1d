//! Test support for Sheaf: an in-process transport, fault injection, and the
//! conformance suite.
//!
//! The in-process transport ([`InProcWorld`]) runs every rank as a thread over shared
//! queues. It is for unit and property tests, beside (never instead of) the real
//! transports. The conformance suite ([`conformance`]) states the laws every
//! communicator, optimizer and partitioner must obey as functions a test can call on
//! any implementation, including one loaded from a third party's `.so`; collective
//! checks derive every rank's input from a seed so each rank can verify its own
//! result, which is what lets them run across real processes too.

pub mod chain;
pub mod conformance;
mod fault;
#[cfg(feature = "fuzz")]
pub mod fuzz;
mod inproc;
pub mod train;

pub use fault::{Fault, FaultyLink, Kill};
pub use inproc::{InProcLink, InProcWorld};

use std::sync::Arc;

use sheaf_collectives::Group;
use sheaf_core::{Link, ParamLayout, ParamSpec};

/// A layout of one-dimensional parameters `p0`, `p1`, ... of `sizes` values each: the
/// flat buffer tests of buckets, shards and steps cut up.
pub fn flat_layout(sizes: &[usize]) -> ParamLayout {
    ParamLayout::new(
        sizes.iter().enumerate().map(|(i, &n)| ParamSpec { name: format!("p{i}"), shape: vec![n] }).collect(),
    )
}

/// Runs `f` on every rank of a fresh in-process world of `n`, one thread per rank, and
/// returns each rank's result in rank order.
pub fn run_world<T: Send>(n: usize, f: impl Fn(Group) -> T + Sync) -> Vec<T> {
    run_links(InProcWorld::new(n).links().into_iter().map(|l| Arc::new(l) as Arc<dyn Link>).collect(), f)
}

/// Runs `f` on a world communicator over each of `links`, one thread per rank.
pub fn run_links<T: Send>(links: Vec<Arc<dyn Link>>, f: impl Fn(Group) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = links
            .into_iter()
            .map(|link| {
                let f = &f;
                s.spawn(move || f(Group::world(link)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
    })
}

/// The deadline of a test's collectives: `default`, or `SHEAF_TEST_DEADLINE_MS` when set.
/// Mutation runs set it low, so that a mutant which leaves a rank waiting on a message
/// that never comes fails in seconds rather than waiting out the usual deadline.
pub fn test_deadline(default: std::time::Duration) -> sheaf_core::Deadline {
    let ms = std::env::var("SHEAF_TEST_DEADLINE_MS").ok().and_then(|v| v.parse().ok());
    sheaf_core::Deadline::after(ms.map_or(default, std::time::Duration::from_millis))
}

/// The number of cases a property test runs: `PROPTEST_CASES` when set (the long runs
/// quoted in closing notes), else `default` (sized for a 2-core CI machine).
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Views `f32`s as bytes, for calling byte-level collectives from tests.
pub fn f32_bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// Copies bytes into `f32`s, whatever their alignment.
pub fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}
