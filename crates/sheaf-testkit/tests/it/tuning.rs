//! `auto` tuned by measurement: whatever a tuning says, allreduce equals its naive
//! definition; the algorithm a tuning names for a size is the one that runs (seen on
//! the wire); and calibration gives every rank the same tuning.

use std::sync::Arc;

use proptest::prelude::*;
use sheaf_collectives::{calibrate, Algorithm, Group, Tuning};
use sheaf_core::{Communicator, DType, Link, ReduceOp};
use sheaf_testkit::conformance::collectives as laws;
use sheaf_testkit::{run_links, run_world, InProcWorld};

use super::{case, deadline};

fn measured() -> impl Strategy<Value = Algorithm> {
    prop::sample::select(vec![Algorithm::Ring, Algorithm::Direct, Algorithm::HalvingDoubling])
}

/// Up to four ranges of sizes, each with its algorithm.
fn tuning(world: usize) -> impl Strategy<Value = Tuning> {
    prop::collection::vec((1usize..20_000, measured()), 1..4).prop_map(move |mut upto| {
        upto.sort_by_key(|u| u.0);
        Tuning { world, upto }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(sheaf_testkit::proptest_cases(64)))]

    /// Every algorithm a tuning can name, at every size, equals the naive allreduce.
    #[test]
    fn a_tuned_allreduce_equals_naive(((n, case), t) in case().prop_flat_map(|(n, c)| (Just((n, c)), tuning(n)))) {
        let t = &t;
        let results = run_world(n, |g| laws::check_allreduce(&g.with_tuning(t.clone()), &case, deadline()));
        let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        prop_assert!(errors.is_empty(), "{}", errors.join("\n"));
    }
}

/// The lengths rank 0 sent rank 1 in one allreduce of `bytes` under `tuning` (4 ranks),
/// the collective's signatures left out.
fn wire(tuning: &Tuning, bytes: usize) -> Vec<usize> {
    let world = InProcWorld::new(4);
    let links: Vec<Arc<dyn Link>> = world.links().into_iter().map(|l| Arc::new(l) as Arc<dyn Link>).collect();
    run_links(links, |g| {
        let mut buf = vec![0u8; bytes];
        g.with_tuning(tuning.clone()).allreduce(&mut buf, DType::F32, ReduceOp::Sum, deadline()).unwrap();
    });
    world.sent(0, 1).into_iter().filter(|&len| len != 24).collect()
}

/// The algorithm a tuning names for a size is the one that runs: direct sends its whole
/// buffer to each peer; halving-doubling sends rank 1 a quarter twice (one halving and
/// one doubling step); ring sends it quarters six times round a world of 4.
#[test]
fn auto_runs_what_the_tuning_names() {
    let t = Tuning {
        world: 4,
        upto: vec![
            (8 << 10, Algorithm::Direct),
            (32 << 10, Algorithm::HalvingDoubling),
            (usize::MAX, Algorithm::Ring),
        ],
    };
    assert_eq!(wire(&t, 8 << 10), vec![8 << 10], "direct at 8 KiB");
    // Rank 1 is rank 0's partner in one halving and one doubling step.
    assert_eq!(wire(&t, 32 << 10), vec![8 << 10, 8 << 10], "halving-doubling at 32 KiB");
    assert_eq!(wire(&t, 64 << 10).iter().max(), Some(&(16 << 10)), "ring at 64 KiB: quarters");
    assert_eq!(wire(&t, 64 << 10).len(), 6, "ring: 2 (n - 1) messages");
    // The same sizes untuned: the fixed rule (direct up to 64 KiB received in all).
    let untuned = Tuning { world: 5, upto: vec![(usize::MAX, Algorithm::Ring)] };
    assert_eq!(wire(&untuned, 16 << 10), vec![16 << 10], "a tuning of another world size is ignored");
}

/// Calibration over worlds of 2 to 4: every rank gets the same tuning, for its world
/// size, its choices measured ones, its sizes rising to the last, which takes every
/// size beyond.
#[test]
fn calibration_agrees_on_every_rank() {
    for n in 2..=4 {
        let tunings = run_world(n, |g: Group| calibrate(&g, deadline()).unwrap());
        let first = &tunings[0];
        assert!(tunings.iter().all(|t| t == first), "world {n}: {tunings:?}");
        assert_eq!(first.world, n);
        assert_eq!(first.upto.last().map(|u| u.0), Some(usize::MAX), "{first:?}");
        assert!(first.upto.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 != w[1].1), "{first:?}");
    }
}
