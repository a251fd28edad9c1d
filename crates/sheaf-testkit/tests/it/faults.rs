//! Fault injection: a rank that dies or stops answering mid-collective makes every
//! other rank return an error naming it, before its deadline; no rank hangs and no
//! rank returns wrong data.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use sheaf_collectives::{Algorithm, BLAME_GRACE};
use sheaf_core::{CommError, Communicator, DType, Deadline, Link, ReduceOp};
use sheaf_testkit::conformance::collectives::{self as laws, Case};
use sheaf_testkit::{run_links, Fault, FaultyLink, InProcWorld};

#[derive(Clone, Copy, Debug)]
enum Coll {
    Allreduce,
    Allgather,
    Broadcast,
    Barrier,
}

fn run_coll(c: &dyn Communicator, coll: Coll, case: &Case, dl: Deadline) -> Result<(), String> {
    match coll {
        Coll::Allreduce => laws::check_allreduce(c, case, dl),
        Coll::Allgather => laws::check_allgather(c, case, dl),
        Coll::Broadcast => laws::check_broadcast(c, case, dl),
        Coll::Barrier => laws::check_barrier(c, dl),
    }
}

/// Runs `coll` with `fault` on `victim`; returns each survivor's outcome and time.
fn with_fault(
    n: usize,
    victim: usize,
    fault: Fault,
    coll: Coll,
    case: &Case,
    timeout: Duration,
) -> Vec<(usize, Result<(), String>, Duration)> {
    with_fault_using(Algorithm::Auto, n, victim, fault, coll, case, timeout)
}

/// `with_fault` with allreduce pinned to `alg` (the stall and drop scenarios count
/// sends, which differ between algorithms).
fn with_fault_using(
    alg: Algorithm,
    n: usize,
    victim: usize,
    fault: Fault,
    coll: Coll,
    case: &Case,
    timeout: Duration,
) -> Vec<(usize, Result<(), String>, Duration)> {
    let all = every_rank_with_fault(alg, n, victim, fault, coll, case, timeout);
    all.into_iter().filter(|(r, _, _)| *r != victim).collect()
}

/// Every rank's outcome, the victim's included.
fn every_rank_with_fault(
    alg: Algorithm,
    n: usize,
    victim: usize,
    fault: Fault,
    coll: Coll,
    case: &Case,
    timeout: Duration,
) -> Vec<(usize, Result<(), String>, Duration)> {
    let links: Vec<Arc<dyn Link>> = InProcWorld::new(n)
        .links()
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let faults = if r == victim { vec![fault.clone()] } else { vec![] };
            Arc::new(FaultyLink::new(l, faults)) as Arc<dyn Link>
        })
        .collect();
    run_links(links, |g| {
        let g = g.with_algorithm(alg);
        let start = Instant::now();
        let res = run_coll(&g, coll, case, Deadline::after(timeout));
        (g.rank(), res, start.elapsed())
    })
}

fn coll() -> impl Strategy<Value = Coll> {
    prop::sample::select(vec![Coll::Allreduce, Coll::Allgather, Coll::Broadcast, Coll::Barrier])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(sheaf_testkit::proptest_cases(48)))]

    /// A rank that dies at any of its sends: every survivor either finished with the
    /// correct result (it needed nothing more from the victim) or fails naming the
    /// victim, well before its deadline; at least one survivor fails unless the victim
    /// had nothing left to send.
    #[test]
    fn killed_rank_is_named_by_every_failing_survivor(n in 2usize..=8, victim_seed in any::<usize>(), at in 0usize..16, coll in coll(), len in 0usize..2000, seed in any::<u64>()) {
        let victim = victim_seed % n;
        let case = Case { seed, len, dtype: DType::F32, op: ReduceOp::Sum, root: seed as usize };
        let timeout = Duration::from_secs(20);
        let all = every_rank_with_fault(Algorithm::Auto, n, victim, Fault::KillAtSend(at), coll, &case, timeout);
        let killed = all.iter().any(|(r, res, _)| *r == victim && res.is_err());
        let outcomes: Vec<_> = all.into_iter().filter(|(r, _, _)| *r != victim).collect();
        for (rank, res, took) in &outcomes {
            prop_assert!(*took < timeout, "rank {rank} took {took:?}");
            if let Err(e) = res {
                prop_assert!(e.contains(&format!("rank {victim} ")), "rank {rank} blamed the wrong rank: {e}");
            }
        }
        // Every message of these algorithms is needed by its receiver: a victim that
        // died at a send left a survivor without it, and one that never reached its
        // fatal send (it had fewer to make) left every survivor whole.
        let failed = outcomes.iter().filter(|(_, res, _)| res.is_err()).count();
        if killed {
            prop_assert!(failed > 0, "rank {victim} died at send {at}, yet every survivor succeeded");
        } else {
            prop_assert_eq!(failed, 0, "rank {} finished, yet survivors failed", victim);
        }
    }
}

/// A rank that stops answering: the ranks that wait on it time out at their deadline
/// and name it; the others learn of it through the abort and name it too.
#[test]
fn stalled_rank_is_named_within_the_deadline() {
    for n in [2, 3, 5, 8] {
        for victim in [0, n - 1] {
            let case = Case { seed: 3, len: 1000, dtype: DType::F32, op: ReduceOp::Sum, root: 0 };
            let timeout = Duration::from_millis(300);
            let outcomes = with_fault_using(
                Algorithm::Ring,
                n,
                victim,
                Fault::StallAtSend(1, Duration::from_secs(2)),
                Coll::Allreduce,
                &case,
                timeout,
            );
            for (rank, res, took) in outcomes {
                let e = res.expect_err("a survivor completed an allreduce its victim never finished");
                assert!(e.contains(&format!("rank {victim}")), "n={n} rank {rank}: {e}");
                assert!(
                    took < timeout + BLAME_GRACE + Duration::from_millis(200),
                    "n={n} rank {rank} took {took:?}"
                );
            }
        }
    }
}

/// A killed rank in an allreduce: all-to-all dependence means every survivor fails.
#[test]
fn killed_rank_fails_every_allreduce_survivor() {
    for n in 2..=8 {
        let case = Case { seed: 9, len: 4096, dtype: DType::F32, op: ReduceOp::Sum, root: 0 };
        let outcomes =
            with_fault(n, 1, Fault::KillAtSend(0), Coll::Allreduce, &case, Duration::from_secs(20));
        for (rank, res, took) in outcomes {
            let e = res.expect_err("survivor completed");
            assert!(e.contains("rank 1 failed"), "rank {rank}: {e}");
            // Far inside the 20 s deadline: a death is seen at once, not timed out.
            assert!(took < Duration::from_secs(5), "rank {rank} took {took:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(sheaf_testkit::proptest_cases(24)))]

    /// Messages overtaking each other (as far as the link contract lets them) on every
    /// rank change no result, for every law and allreduce algorithm.
    #[test]
    fn reordered_messages_give_the_same_results(
        n in 1usize..=6,
        seed in any::<u64>(),
        len in prop_oneof![0usize..10, 10usize..=5000],
        alg in prop::sample::select(vec![Algorithm::Ring, Algorithm::HalvingDoubling, Algorithm::Direct]),
        root in 0usize..6,
    ) {
        let case = Case { seed, len, dtype: DType::F32, op: ReduceOp::Sum, root: root % n };
        let links: Vec<Arc<dyn Link>> = InProcWorld::new(n)
            .links()
            .into_iter()
            .map(|l| Arc::new(FaultyLink::new(l, vec![Fault::Reorder])) as Arc<dyn Link>)
            .collect();
        let dl = || sheaf_testkit::test_deadline(Duration::from_secs(20));
        // Like a worker at exit, each rank closes its link, which sends what is held.
        let results = run_links(links, |g| {
            let g = g.with_algorithm(alg);
            laws::check_all(&g, &case, dl())
                .and_then(|()| g.link().close(dl()).map_err(|e| e.to_string()))
        });
        prop_assert!(results.iter().all(Result::is_ok), "{results:?}");
    }
}

/// The reordering fault does reorder: over one run of every law on 4 ranks, messages
/// overtake others.
#[test]
fn the_reorder_fault_reorders() {
    let case = Case { seed: 9, len: 1000, dtype: DType::F32, op: ReduceOp::Sum, root: 1 };
    let faulty: Vec<Arc<FaultyLink<_>>> = InProcWorld::new(4)
        .links()
        .into_iter()
        .map(|l| Arc::new(FaultyLink::new(l, vec![Fault::Reorder])))
        .collect();
    let links = faulty.iter().map(|l| l.clone() as Arc<dyn Link>).collect();
    let dl = || sheaf_testkit::test_deadline(Duration::from_secs(20));
    let results = run_links(links, |g| {
        laws::check_all(&g, &case, dl()).and_then(|()| g.link().close(dl()).map_err(|e| e.to_string()))
    });
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let overtakes: usize = faulty.iter().map(|l| l.overtakes()).sum();
    assert!(overtakes > 0, "no message overtook another");
}

/// Delays slow things down but never change the result.
#[test]
fn delayed_sends_give_the_same_result() {
    let case = Case { seed: 4, len: 777, dtype: DType::BF16, op: ReduceOp::Avg, root: 2 };
    let outcomes = with_fault(
        4,
        2,
        Fault::DelaySends(Duration::from_millis(5)),
        Coll::Allreduce,
        &case,
        Duration::from_secs(20),
    );
    assert!(outcomes.iter().all(|(_, r, _)| r.is_ok()), "{outcomes:?}");
}

/// A lost message is never silently papered over: the receiver times out naming the
/// sender, every rank fails, and the group refuses further work. (The other ranks wait
/// on each other in a cycle, so which rank they name is not pinned down.)
#[test]
fn dropped_message_is_a_timeout_naming_the_sender_then_poisoned() {
    let links: Vec<Arc<dyn Link>> = InProcWorld::new(3)
        .links()
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            Arc::new(FaultyLink::new(l, if r == 0 { vec![Fault::DropSend(0)] } else { vec![] }))
                as Arc<dyn Link>
        })
        .collect();
    let results = run_links(links, |g| {
        let g = g.with_algorithm(Algorithm::Ring);
        let mut buf = vec![0u8; 64];
        let first =
            g.allreduce(&mut buf, DType::F32, ReduceOp::Sum, Deadline::after(Duration::from_millis(300)));
        let second = g.barrier(Deadline::after(Duration::from_millis(300)));
        (first, second)
    });
    // Rank 1 receives from rank 0 first in the ring: it must name rank 0.
    let (first, second) = &results[1];
    assert_eq!(first.as_ref().err().and_then(CommError::peer), Some(0), "{first:?}");
    assert!(matches!(second, Err(CommError::Poisoned { .. })), "{second:?}");
    for (rank, (first, second)) in results.iter().enumerate() {
        assert!(first.as_ref().err().and_then(CommError::peer).is_some(), "rank {rank}: {first:?}");
        assert!(matches!(second, Err(CommError::Poisoned { .. })), "rank {rank}: {second:?}");
    }
}

/// Ranks that took different code paths are caught at their first message, with both
/// calls named, long before the deadline: another collective, another element count,
/// another dtype, another root, or one call more than the others.
#[test]
fn ranks_in_different_collectives_fail_at_once_naming_both_calls() {
    type Step = fn(&dyn Communicator, usize, Deadline) -> Result<(), CommError>;
    fn allreduce(n: usize, c: &dyn Communicator, dl: Deadline) -> Result<(), CommError> {
        let mut buf = vec![0u8; 4 * n];
        c.allreduce(&mut buf, DType::F32, ReduceOp::Sum, dl)
    }
    let cases: [(&str, Step, &[&str]); 4] = [
        (
            "allreduce vs broadcast",
            |c, r, dl| {
                let mut buf = vec![0u8; 4 * 1000];
                if r == 0 {
                    c.broadcast(&mut buf, 0, dl)
                } else {
                    c.allreduce(&mut buf, DType::F32, ReduceOp::Sum, dl)
                }
            },
            &["allreduce #1 (sum) of 1,000 f32", "broadcast #1 of 4,000 bytes from root 0"],
        ),
        (
            "counts",
            |c, r, dl| allreduce(if r == 1 { 999 } else { 1000 }, c, dl),
            &["of 999 f32", "of 1,000 f32"],
        ),
        (
            "roots",
            |c, r, dl| {
                let mut buf = vec![0u8; 64];
                c.broadcast(&mut buf, usize::from(r == 2), dl)
            },
            &["from root 1", "from root 0"],
        ),
        (
            "one call more",
            |c, r, dl| {
                if r == 1 {
                    c.barrier(dl)?;
                }
                allreduce(10, c, dl)
            },
            &["barrier #1", "allreduce #1"],
        ),
    ];
    for (what, step, needles) in cases {
        let t = Instant::now();
        let out = sheaf_testkit::run_world(3, |g| {
            let dl = Deadline::after(Duration::from_secs(20));
            step(&g, g.rank(), dl)
        });
        assert!(t.elapsed() < Duration::from_secs(5), "{what}: took {:?}", t.elapsed());
        let errors: Vec<String> =
            out.iter().filter_map(|r| r.as_ref().err()).map(|e| e.to_string()).collect();
        assert!(!errors.is_empty(), "{what}: every rank succeeded");
        let named = errors.iter().find(|e| e.contains("collectives out of step")).unwrap_or_else(|| {
            panic!("{what}: no rank named the mismatch: {errors:?}");
        });
        for n in needles {
            assert!(named.contains(n), "{what}: `{n}` missing from {named}");
        }
    }
}
