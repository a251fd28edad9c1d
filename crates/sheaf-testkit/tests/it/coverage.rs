//! The paths the property tests' sizes do not reach: ring blocks larger than one
//! segment (so segmentation and sending ahead run), peers that are not ranks, and
//! collectives that must leave no message unreceived.

use std::sync::Arc;
use std::time::Duration;

use sheaf_collectives::Algorithm;
use sheaf_core::{CommError, Communicator, DType, Deadline, Link, ReduceOp};
use sheaf_testkit::conformance::collectives::{self as laws, Case};
use sheaf_testkit::{run_links, run_world, InProcWorld};

fn deadline() -> Deadline {
    sheaf_testkit::test_deadline(Duration::from_secs(60))
}

/// Ring allreduce and reduce-scatter of blocks of several segments (up to 4 x 1 MiB
/// segments per block), in every dtype, equal their naive definitions.
#[test]
fn ring_blocks_of_many_segments_equal_naive() {
    for (n, len, dtype) in [
        (2, 1 << 20, DType::F32),
        (3, 3 << 20, DType::F32),
        (2, (1 << 20) + 7, DType::BF16),
        (4, 1 << 21, DType::F64),
    ] {
        let case = Case { seed: 11, len, dtype, op: ReduceOp::Sum, root: 0 };
        let results = run_world(n, |g| {
            let g = g.with_algorithm(Algorithm::Ring);
            laws::check_allreduce(&g, &case, deadline())?;
            laws::check_reduce_scatter(&g, &case, deadline())
        });
        for (r, res) in results.into_iter().enumerate() {
            assert!(res.is_ok(), "world {n} len {len} {dtype:?} rank {r}: {res:?}");
        }
    }
}

/// Sending to, or receiving from, a rank that is not another member is an
/// `InvalidArgument` naming it, before anything moves.
#[test]
fn peers_outside_the_group_are_refused() {
    let results = run_world(3, |g| {
        let me = g.rank();
        let mut out = Vec::new();
        for peer in [me, 3, 100] {
            out.push(g.send(peer, 1, &[1, 2, 3], deadline()));
            out.push(g.recv(peer, 1, deadline()).map(|_| ()));
        }
        out
    });
    for (r, rank) in results.into_iter().enumerate() {
        for res in rank {
            match res {
                Err(CommError::InvalidArgument { detail, .. }) => {
                    assert!(detail.contains("is not another rank of a group of 3"), "rank {r}: {detail}");
                }
                other => panic!("rank {r}: {other:?}"),
            }
        }
    }
}

/// Every collective, every algorithm, at sizes on both sides of the thresholds, leaves
/// no message unreceived anywhere in the world (an extra send would sit in a queue and
/// could later match another collective's receive).
#[test]
fn collectives_leave_no_message_behind() {
    for n in [2usize, 3, 5] {
        for len in [0usize, 3, 20_000, 300_000] {
            for algorithm in Algorithm::ALL {
                let world = InProcWorld::new(n);
                let links: Vec<Arc<dyn Link>> =
                    world.links().into_iter().map(|l| Arc::new(l) as Arc<dyn Link>).collect();
                let case = Case { seed: len as u64, len, dtype: DType::F32, op: ReduceOp::Max, root: n - 1 };
                let results = run_links(links, |g| {
                    let g = g.with_algorithm(algorithm);
                    laws::check_all(&g, &case, deadline())
                });
                for (r, res) in results.into_iter().enumerate() {
                    assert!(res.is_ok(), "world {n} len {len} {algorithm}: rank {r}: {res:?}");
                }
                assert_eq!(world.pending(), 0, "world {n} len {len} {algorithm}: messages left unreceived");
            }
        }
    }
}
