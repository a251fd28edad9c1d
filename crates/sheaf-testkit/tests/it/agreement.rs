//! The algorithms against each other on arbitrary floating-point data, not just the
//! small integers of the conformance suite (where every order of summation is exact).
//!
//! - Max and min (IEEE 754-2019 `maximum`/`minimum`: NaN wins, +0 above -0) are
//!   commutative and associative bit for bit, so every algorithm gives the same bits
//!   on any input: NaNs, infinities, signed zeros, subnormals.
//! - A floating-point sum depends on the order of additions, and each algorithm's
//!   order follows from its communication pattern (ring: around the ring from the
//!   block's neighbour; halving-doubling: a pairwise tree; direct: rank order). So on
//!   arbitrary data: every algorithm is bitwise reproducible run to run and the same
//!   on every rank; all agree bitwise for two ranks (one addition, which commutes
//!   exactly); and each is within the classic bound of recursive summation,
//!   (n - 1) u sum |x_i|, of the exact sum. Forcing one order on every algorithm
//!   would mean sending unreduced data (ring and halving-doubling would lose their
//!   bandwidth) or exact accumulators (an order of magnitude more bytes).

use proptest::prelude::*;
use sheaf_collectives::Algorithm;
use sheaf_core::{DType, ReduceOp, SplitMix64};
use sheaf_testkit::run_world;

use super::deadline;

const ALGORITHMS: [Algorithm; 3] = [Algorithm::Ring, Algorithm::HalvingDoubling, Algorithm::Direct];

/// Every rank's result of one allreduce, checked to be the same bytes on all ranks.
fn allreduce(
    inputs: &[Vec<u8>],
    dtype: DType,
    op: ReduceOp,
    alg: Algorithm,
) -> Result<Vec<u8>, TestCaseError> {
    let results = run_world(inputs.len(), |g| {
        let g = g.with_algorithm(alg);
        let mut buf = inputs[sheaf_core::Communicator::rank(&g)].clone();
        sheaf_core::Communicator::allreduce(&g, &mut buf, dtype, op, deadline()).map(|()| buf)
    });
    let mut results =
        results.into_iter().collect::<Result<Vec<_>, _>>().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let first = results.swap_remove(0);
    prop_assert!(results.iter().all(|r| *r == first), "{alg}: ranks disagree");
    Ok(first)
}

/// Arbitrary bit patterns of `dtype`'s width: every kind of float there is.
fn any_bits(seed: u64, n: usize, len: usize, dtype: DType) -> Vec<Vec<u8>> {
    let mut g = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            (0..len)
                .flat_map(|_| {
                    // Mostly raw bits; some signed zeros and NaNs on purpose.
                    let bits = match g.next_u64() % 8 {
                        0 => 0,
                        1 => u64::MAX << (dtype.size() * 8 - 1),
                        2 => u64::MAX,
                        _ => g.next_u64(),
                    };
                    bits.to_le_bytes()[..dtype.size()].to_vec()
                })
                .collect()
        })
        .collect()
}

/// Finite values spread over 2^-60..2^60 with either sign, some subnormal or zero.
fn finite(seed: u64, n: usize, len: usize) -> Vec<Vec<f64>> {
    let mut g = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| {
                    let sign = if g.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
                    match g.next_u64() % 16 {
                        0 => 0.0,
                        1 => sign * f64::from(f32::MIN_POSITIVE) * (g.next_u64() % 1000) as f64 / 1000.0,
                        _ => sign * (1.0 + g.next_f32() as f64) * 2f64.powi(g.int(-60, 60) as i32),
                    }
                })
                .collect()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(sheaf_testkit::proptest_cases(48)))]

    #[test]
    fn max_and_min_agree_bitwise_on_any_floats(
        n in 1usize..=8,
        len in prop_oneof![0usize..10, 10usize..=3000],
        seed in any::<u64>(),
        dtype in prop::sample::select(DType::ALL.to_vec()),
        op in prop::sample::select(vec![ReduceOp::Max, ReduceOp::Min]),
    ) {
        let inputs = any_bits(seed, n, len, dtype);
        let results: Vec<Vec<u8>> = ALGORITHMS.iter().map(|&a| allreduce(&inputs, dtype, op, a)).collect::<Result<_, _>>()?;
        for (alg, r) in ALGORITHMS.iter().zip(&results).skip(1) {
            prop_assert!(*r == results[0], "{alg} differs from ring for {op:?} over {dtype}");
        }
    }

    #[test]
    fn float_sums_are_reproducible_and_within_the_summation_bound(
        n in 1usize..=8,
        len in prop_oneof![0usize..10, 10usize..=3000],
        seed in any::<u64>(),
        wide in any::<bool>(),
    ) {
        let values = finite(seed, n, len);
        // Unit roundoff, and the spacing of subnormals (an absolute error per addition).
        let (dtype, unit, tiny) = if wide {
            (DType::F64, f64::EPSILON / 2.0, f64::from_bits(1))
        } else {
            (DType::F32, f64::from(f32::EPSILON) / 2.0, f64::from(f32::from_bits(1)))
        };
        let encode = |v: &[f64]| -> Vec<u8> {
            if wide { v.iter().flat_map(|x| x.to_le_bytes()).collect() } else { v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect() }
        };
        let decode = |b: &[u8]| -> Vec<f64> {
            if wide {
                b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
            } else {
                b.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect()
            }
        };
        let inputs: Vec<Vec<u8>> = values.iter().map(|v| encode(v)).collect();
        // What each rank really holds (f32 inputs are rounded once on encoding).
        let held: Vec<Vec<f64>> = inputs.iter().map(|b| decode(b)).collect();
        let mut results = Vec::new();
        for alg in ALGORITHMS {
            let once = allreduce(&inputs, dtype, ReduceOp::Sum, alg)?;
            let again = allreduce(&inputs, dtype, ReduceOp::Sum, alg)?;
            prop_assert!(once == again, "{alg} is not reproducible");
            for (i, got) in decode(&once).into_iter().enumerate() {
                // Exact enough: two-sum compensated accumulation in f64.
                let (mut sum, mut comp, mut abs) = (0.0f64, 0.0f64, 0.0f64);
                for h in &held {
                    let t = sum + h[i];
                    comp += if sum.abs() >= h[i].abs() { (sum - t) + h[i] } else { (h[i] - t) + sum };
                    sum = t;
                    abs += h[i].abs();
                }
                let exact = sum + comp;
                let bound = (n.saturating_sub(1) as f64) * unit * abs * (1.0 + 1e-9) + 4.0 * unit * unit * abs + n as f64 * tiny;
                prop_assert!((got - exact).abs() <= bound, "{alg} element {i}: {got} vs {exact} (bound {bound})");
            }
            results.push(once);
        }
        if n <= 2 {
            prop_assert!(results.iter().all(|r| *r == results[0]), "algorithms disagree on two ranks");
        }
    }
}
