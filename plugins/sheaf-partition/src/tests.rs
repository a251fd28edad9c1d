//! Partitioner laws over random sizes, worlds and epochs, directly and through the
//! plugin ABI adapters; the balanced cut against brute force.

use proptest::prelude::*;
use sheaf_core::ModelPartitioner;
use sheaf_testkit::conformance::partitioner::{check_data_partitioner, check_model_partitioner};

use crate::{new_data_partitioner, new_model_partitioner, Balanced, Shuffle};

fn all_cuts(layers: usize, stages: usize) -> Vec<Vec<usize>> {
    // Every choice of stages-1 cut points among 1..layers.
    fn go(from: usize, layers: usize, left: usize, acc: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if left == 0 {
            out.push(acc.clone());
            return;
        }
        for c in from..layers {
            acc.push(c);
            go(c + 1, layers, left - 1, acc, out);
            acc.pop();
        }
    }
    let mut out = Vec::new();
    go(1, layers, stages - 1, &mut Vec::new(), &mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(sheaf_testkit::proptest_cases(256)))]

    #[test]
    fn every_index_to_exactly_one_rank(n in 0usize..2000, world in 1usize..=16, epoch in 0u64..50, seed in any::<u64>()) {
        let shuffle = format!(r#"{{"seed":{seed}}}"#);
        for (name, config) in [("contiguous", ""), ("strided", ""), ("shuffle", shuffle.as_str())] {
            let direct = new_data_partitioner(name, config).unwrap();
            check_data_partitioner(direct.as_ref(), n, world, epoch).map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
            let exported = sheaf_abi::to_abi::data_partitioner("sheaf-partition", new_data_partitioner(name, config).unwrap());
            let loaded = sheaf_abi::from_abi::data_partitioner(exported);
            check_data_partitioner(loaded.as_ref(), n, world, epoch).map_err(|e| TestCaseError::fail(format!("{name} via ABI: {e}")))?;
        }
    }

    #[test]
    fn shuffle_changes_with_the_epoch_and_is_a_permutation(n in 10usize..500, seed in any::<u64>(), epoch in 0u64..1000) {
        let s = Shuffle { seed };
        let a = s.permutation(epoch, n);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        prop_assert_ne!(a, s.permutation(epoch + 1, n));
    }

    #[test]
    fn balanced_cut_is_valid_and_optimal(costs in prop::collection::vec(0u64..1000, 1..9), stages in 0usize..10) {
        check_model_partitioner(&Balanced, &costs, stages).map_err(TestCaseError::fail)?;
        let loaded = sheaf_abi::from_abi::model_partitioner(
            sheaf_abi::to_abi::model_partitioner("sheaf-partition", new_model_partitioner("balanced", "").unwrap()));
        check_model_partitioner(loaded.as_ref(), &costs, stages).map_err(TestCaseError::fail)?;
        if stages >= 1 && stages <= costs.len() {
            let max_cost = |cuts: &[usize]| {
                let bounds: Vec<usize> = std::iter::once(0).chain(cuts.iter().copied()).chain([costs.len()]).collect();
                bounds.windows(2).map(|w| costs[w[0]..w[1]].iter().sum::<u64>()).max().unwrap()
            };
            let brute = all_cuts(costs.len(), stages).iter().map(|c| max_cost(c)).min().unwrap();
            let got = Balanced.cut(&costs, stages).unwrap();
            let cuts: Vec<usize> = got.iter().skip(1).map(|r| r.start).collect();
            prop_assert_eq!(max_cost(&cuts), brute);
        }
    }
}

#[test]
fn balanced_by_parameter_count_for_an_mlp() {
    // 784-512-512-10: layer parameter counts.
    let costs = [784 * 512 + 512, 512 * 512 + 512, 512 * 10 + 10];
    let cut = Balanced.cut(&costs, 2).unwrap();
    assert_eq!(cut, vec![0..1, 1..3]);
}

#[test]
fn unknown_names_and_bad_configs_are_errors() {
    assert!(new_data_partitioner("random", "").is_err());
    assert!(new_data_partitioner("shuffle", r#"{"sed": 1}"#).err().unwrap().to_string().contains("sed"));
    assert!(new_model_partitioner("greedy", "").is_err());
    assert!(Balanced.cut(&[1, 2], 3).unwrap_err().to_string().contains("3 stages"));
}
