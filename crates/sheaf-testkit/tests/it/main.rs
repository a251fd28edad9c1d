//! Property tests of the collectives over the in-process transport: every collective
//! equals its naive definition, allreduce equals reduce-scatter then allgather, a
//! sub-communicator behaves like a world of its size, and a rank that dies or stalls
//! mid-collective makes every other rank fail in time, naming it; and the algorithms
//! against each other on arbitrary floats (`agreement`); point-to-point signatures
//! (`p2p`).

mod agreement;
mod coverage;
mod faults;
mod p2p;
mod tuning;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use sheaf_collectives::Algorithm;
use sheaf_core::{DType, Deadline, ReduceOp};
use sheaf_testkit::conformance::collectives::{self as laws, Case};
use sheaf_testkit::run_world;

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

fn reduce_op() -> impl Strategy<Value = ReduceOp> {
    prop::sample::select(ReduceOp::ALL.to_vec())
}

/// Lengths 0 to 10,000, weighted towards the edge cases below the world size.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..10, 10usize..300, 300usize..=10_000]
}

fn case() -> impl Strategy<Value = (usize, Case)> {
    (1usize..=8, any::<u64>(), length(), dtype(), reduce_op(), 0usize..8)
        .prop_map(|(n, seed, len, dtype, op, root)| (n, Case { seed, len, dtype, op, root }))
}

fn deadline() -> Deadline {
    sheaf_testkit::test_deadline(Duration::from_secs(30))
}

/// Runs a law on every rank of an in-process world and fails with every rank's error.
fn on_world(
    n: usize,
    law: impl Fn(&dyn sheaf_core::Communicator) -> Result<(), String> + Sync,
) -> Result<(), TestCaseError> {
    let results = run_world(n, |g| law(&g));
    let errors: Vec<String> = results
        .into_iter()
        .enumerate()
        .filter_map(|(r, res)| res.err().map(|e| format!("rank {r}: {e}")))
        .collect();
    prop_assert!(errors.is_empty(), "{}", errors.join("\n"));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(sheaf_testkit::proptest_cases(64)))]

    #[test]
    fn allreduce_equals_naive((n, case) in case()) {
        on_world(n, |c| laws::check_allreduce(c, &case, deadline()))?;
    }

    /// Every algorithm (and the automatic choice) equals the naive definition, for
    /// every world size, power of two or not, and lengths below the world size.
    #[test]
    fn every_allreduce_algorithm_equals_naive((n, case) in case(), alg in prop::sample::select(vec![Algorithm::Auto, Algorithm::Ring, Algorithm::HalvingDoubling, Algorithm::Direct])) {
        let results = run_world(n, |g| {
            let g = g.with_algorithm(alg);
            laws::check_allreduce(&g, &case, deadline())
                .and_then(|()| laws::check_allreduce_is_reduce_scatter_then_allgather(&g, &case, deadline()))
                .and_then(|()| laws::check_split(&g, &case, deadline()))
        });
        let errors: Vec<String> = results.into_iter().enumerate().filter_map(|(r, res)| res.err().map(|e| format!("{alg} rank {r}: {e}"))).collect();
        prop_assert!(errors.is_empty(), "{}", errors.join("\n"));
    }

    #[test]
    fn broadcast_from_any_root_equals_naive((n, case) in case()) {
        on_world(n, |c| laws::check_broadcast(c, &case, deadline()))?;
    }

    /// Large broadcasts take the pipelined chain (64 KiB and up, 3 or more ranks),
    /// including buffers that do not divide into whole chunks.
    #[test]
    fn large_broadcast_from_any_root_equals_naive(n in 1usize..=8, seed in any::<u64>(), len in 16_384usize..=300_000, root in 0usize..8) {
        let case = Case { seed, len, dtype: DType::F32, op: ReduceOp::Sum, root };
        on_world(n, |c| laws::check_broadcast(c, &case, deadline()))?;
    }

    #[test]
    fn allgather_equals_naive((n, case) in case()) {
        on_world(n, |c| laws::check_allgather(c, &case, deadline()))?;
    }

    #[test]
    fn reduce_scatter_equals_naive((n, case) in case()) {
        on_world(n, |c| laws::check_reduce_scatter(c, &case, deadline()))?;
    }

    #[test]
    fn allreduce_is_reduce_scatter_then_allgather((n, case) in case()) {
        on_world(n, |c| laws::check_allreduce_is_reduce_scatter_then_allgather(c, &case, deadline()))?;
    }

    #[test]
    fn reduce_to_any_root_equals_naive((n, case) in case()) {
        on_world(n, |c| laws::check_reduce(c, &case, deadline()))?;
    }

    /// Large reduces take the pipelined chain (64 KiB and up, 3 or more ranks), in every
    /// dtype and op, including buffers that do not divide into whole chunks.
    #[test]
    fn large_reduce_to_any_root_equals_naive(n in 1usize..=8, seed in any::<u64>(), len in 8_192usize..=300_000, root in 0usize..8, dtype in dtype(), op in reduce_op()) {
        let case = Case { seed, len, dtype, op, root };
        on_world(n, |c| laws::check_reduce(c, &case, deadline()))?;
    }

    #[test]
    fn gather_and_scatter_equal_naive((n, case) in case()) {
        on_world(n, |c| laws::check_gather(c, &case, deadline()).and_then(|()| laws::check_scatter(c, &case, deadline())))?;
    }

    #[test]
    fn all_to_all_equals_naive((n, case) in case()) {
        on_world(n, |c| laws::check_all_to_all(c, &case, deadline()))?;
    }

    #[test]
    fn send_recv_keeps_order_per_tag((n, case) in case()) {
        on_world(n, |c| laws::check_send_recv(c, &case, deadline()))?;
    }

    #[test]
    fn sub_communicator_equals_world_of_its_size((n, case) in case()) {
        on_world(n, |c| laws::check_split(c, &case, deadline()))?;
    }

    /// No rank leaves the barrier before every rank has entered it.
    #[test]
    fn barrier_waits_for_everyone(n in 1usize..=8, rounds in 1usize..4) {
        let entered = AtomicUsize::new(0);
        on_world(n, |c| {
            for round in 0..rounds {
                entered.fetch_add(1, Ordering::SeqCst);
                c.barrier(deadline()).map_err(|e| e.to_string())?;
                let seen = entered.load(Ordering::SeqCst);
                if seen < (round + 1) * n {
                    return Err(format!("left barrier {round} after only {seen} entries"));
                }
                c.barrier(deadline()).map_err(|e| e.to_string())?;
            }
            Ok(())
        })?;
    }
}

/// Arbitrary (non-integer) floats: ring order differs from the naive order, so f32
/// agrees within rounding, and every rank gets identical bytes.
#[test]
fn allreduce_of_arbitrary_floats_is_close_and_identical_on_all_ranks() {
    use sheaf_testkit::conformance::SplitMix;
    for n in 1..=8 {
        let len = 1000 + n;
        let inputs: Vec<Vec<f32>> = (0..n)
            .map(|r| {
                let mut g = SplitMix::new(r as u64);
                (0..len).map(|_| g.next_f32() * 1e3).collect()
            })
            .collect();
        let results = run_world(n, |g| {
            let mut buf = sheaf_testkit::f32_bytes(&inputs[sheaf_core::Communicator::rank(&g)]).to_vec();
            sheaf_core::Communicator::allreduce(&g, &mut buf, DType::F32, ReduceOp::Sum, deadline()).unwrap();
            buf
        });
        for r in &results {
            assert_eq!(r, &results[0], "ranks disagree at world {n}");
        }
        let got = sheaf_testkit::bytes_f32(&results[0]);
        for i in 0..len {
            let want: f64 = inputs.iter().map(|v| f64::from(v[i])).sum();
            assert!((f64::from(got[i]) - want).abs() <= 1e-3, "element {i}: {} vs {want}", got[i]);
        }
    }
}

/// Arbitrary floats: each algorithm's reduction order is fixed, so every rank gets
/// the same bytes and a second run the same bytes again. (The algorithms reduce in
/// different orders, so they agree with each other only up to rounding.)
#[test]
fn each_algorithm_is_bitwise_reproducible_on_arbitrary_floats() {
    use sheaf_testkit::conformance::SplitMix;
    for alg in Algorithm::ALL {
        for n in [2, 3, 5, 8] {
            let run = || {
                run_world(n, |g| {
                    let g = g.with_algorithm(alg);
                    let mut rng = SplitMix::new(sheaf_core::Communicator::rank(&g) as u64);
                    let v: Vec<f32> = (0..1001).map(|_| rng.next_f32() * 1e3).collect();
                    let mut buf = sheaf_testkit::f32_bytes(&v).to_vec();
                    sheaf_core::Communicator::allreduce(&g, &mut buf, DType::F32, ReduceOp::Avg, deadline())
                        .unwrap();
                    buf
                })
            };
            let (a, b) = (run(), run());
            assert!(a.iter().all(|r| r == &a[0]), "{alg} world {n}: ranks differ");
            assert_eq!(a, b, "{alg} world {n}: two runs differ");
        }
    }
}

#[test]
fn auto_picks_direct_for_tiny_messages_and_ring_for_large() {
    assert_eq!(Algorithm::Auto.choose(1024, 8), Algorithm::Direct);
    assert_eq!(Algorithm::Auto.choose(1 << 20, 2), Algorithm::Ring);
    assert_eq!(Algorithm::HalvingDoubling.choose(16, 2), Algorithm::HalvingDoubling);
    assert_eq!("halving-doubling".parse::<Algorithm>(), Ok(Algorithm::HalvingDoubling));
    assert!("tree".parse::<Algorithm>().is_err());
}

#[test]
fn world_of_one_and_empty_buffers() {
    let case = Case { seed: 1, len: 0, dtype: DType::F32, op: ReduceOp::Avg, root: 0 };
    for n in [1, 3] {
        let results = run_world(n, |g| laws::check_all(&g, &case, deadline()));
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }
}
