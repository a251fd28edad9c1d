//! The ABI adapters: a link exported and loaded back behaves as the original (the
//! collective laws hold over it, failures still name the culprit), and errors cross
//! the boundary without losing what they say.

use std::sync::Arc;
use std::time::Duration;

use sheaf_abi::{from_abi, to_abi, AbiError};
use sheaf_core::{CommError, Deadline, Error, Link, Op};
use sheaf_testkit::conformance::collectives::{check_all, Case};
use sheaf_testkit::{run_links, Fault, FaultyLink, InProcWorld};

fn through_abi<L: Link + 'static>(link: L) -> Arc<dyn Link> {
    Arc::from(from_abi::link(to_abi::link("test-transport", Box::new(link))).unwrap())
}

#[test]
fn collective_laws_hold_over_a_link_that_crossed_the_abi() {
    for n in 1..=5 {
        for (seed, len) in [(1, 0), (2, 3), (3, 1000)] {
            let case =
                Case { seed, len, dtype: sheaf_core::DType::F32, op: sheaf_core::ReduceOp::Avg, root: 1 };
            let links = InProcWorld::new(n).links().into_iter().map(through_abi).collect();
            let results =
                run_links(links, |g| check_all(&g, &case, Deadline::after(Duration::from_secs(20))));
            assert!(results.iter().all(Result::is_ok), "world {n}, len {len}: {results:?}");
        }
    }
}

/// The host's communicator as a strategy plugin sees it (exported, then loaded):
/// every collective law holds through the adapters, sub-communicators included.
#[test]
fn collective_laws_hold_over_a_communicator_that_crossed_the_abi() {
    for n in [1, 2, 3, 5] {
        let case = Case {
            seed: 11,
            len: 777,
            dtype: sheaf_core::DType::BF16,
            op: sheaf_core::ReduceOp::Max,
            root: 2,
        };
        let results = sheaf_testkit::run_world(n, |g| {
            let loaded = from_abi::communicator(to_abi::communicator("sheaf-host", Box::new(g))).unwrap();
            check_all(loaded.as_ref(), &case, Deadline::after(Duration::from_secs(20)))
        });
        assert!(results.iter().all(Result::is_ok), "world {n}: {results:?}");
    }
}

#[test]
fn a_killed_rank_is_still_named_through_the_abi() {
    let links = InProcWorld::new(4)
        .links()
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            through_abi(FaultyLink::new(l, if r == 2 { vec![Fault::KillAtSend(0)] } else { vec![] }))
        })
        .collect();
    let results = run_links(links, |g| {
        let mut buf = vec![0u8; 400];
        sheaf_core::Communicator::allreduce(
            &g,
            &mut buf,
            sheaf_core::DType::F32,
            sheaf_core::ReduceOp::Sum,
            Deadline::after(Duration::from_secs(10)),
        )
    });
    for (rank, r) in results.iter().enumerate().filter(|(r, _)| *r != 2) {
        assert_eq!(r.as_ref().err().and_then(CommError::peer), Some(2), "rank {rank}: {r:?}");
    }
}

#[test]
fn errors_round_trip() {
    let comm = [
        CommError::Timeout { op: Op::Allreduce, peer: 3, waited: Duration::from_millis(1500) },
        CommError::PeerFailed { op: Op::Recv, peer: 1, reason: "died".into() },
        CommError::Aborted { op: Op::Barrier, peer: 0, reason: "r".into() },
        CommError::Protocol { op: Op::Broadcast, peer: 7, detail: "short".into() },
        CommError::InvalidArgument { op: Op::Send, detail: "peer 9".into() },
        CommError::Unsupported { op: Op::Split },
        CommError::Closed { op: Op::Send },
        CommError::Poisoned { op: Op::Allgather, cause: "earlier".into() },
        CommError::Transport { op: Op::Connect, detail: "refused".into() },
    ];
    for e in comm {
        assert_eq!(AbiError::from(e.clone()).into_comm(), e);
        assert_eq!(Error::from(AbiError::from(Error::Comm(e.clone()))), Error::Comm(e));
    }
    let other = [
        Error::InvalidArgument("x".into()),
        Error::config("train.lr", "negative"),
        Error::Unsupported("y".into()),
        Error::BadState("z".into()),
        Error::Plugin { plugin: "p".into(), detail: "d".into() },
        Error::Other("o".into()),
        Error::Preempted { step: 17 },
    ];
    for e in other {
        assert_eq!(Error::from(AbiError::from(e.clone())), e);
    }
}

#[test]
fn abi_versions_must_agree_in_their_major() {
    use sheaf_abi::abi_version_compatible as ok;
    assert!(ok("0.1.0", "0.1.3"));
    assert!(ok("1.2.0", "1.2.9"));
    assert!(ok("1.2.0", "1.0.0"), "a plugin built before an appended method");
    assert!(ok("1.0.0", "1.3.0"), "a plugin built after: its extra methods are never called");
    assert!(!ok("0.1.0", "0.2.0"), "before 1.0 every minor is a major");
    assert!(!ok("0.1.0", "0.0.7"));
    assert!(!ok("1.0.0", "0.10.0"));
    assert!(!ok("2.0.0", "1.9.0"));
    assert!(!ok("1.0.0", "garbage"));
}
