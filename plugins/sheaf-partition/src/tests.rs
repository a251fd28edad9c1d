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

/// The plugin lists exactly what it builds: three data partitioners and one model
/// partitioner, each of which its factories make.
#[test]
fn provides_what_it_builds() {
    use sheaf_abi::Plugin;
    use sheaf_core::PluginKind;
    let provided: Vec<(PluginKind, String)> =
        crate::PartitionPlugin::provides().into_iter().map(|p| (p.kind, p.name)).collect();
    let data = ["contiguous", "strided", "shuffle"].map(|n| (PluginKind::DataPartitioner, n.to_string()));
    let want: Vec<_> = data.into_iter().chain([(PluginKind::ModelPartitioner, "balanced".into())]).collect();
    assert_eq!(provided, want);
    for (kind, name) in &provided {
        let built = match kind {
            PluginKind::DataPartitioner => new_data_partitioner(name, "").map(|_| ()),
            _ => new_model_partitioner(name, "").map(|_| ()),
        };
        assert!(built.is_ok(), "{name}: {built:?}");
    }
}

/// A bad setting names the partitioner and the key; one that is not an object names
/// the partitioner alone.
#[test]
fn config_errors_name_the_key() {
    let e = new_data_partitioner("shuffle", r#"{"seed": "x"}"#).err().unwrap().to_string();
    assert!(e.contains("partitioner shuffle: seed"), "{e}");
    let e = new_data_partitioner("shuffle", "7").err().unwrap().to_string();
    assert!(e.contains("partitioner shuffle") && !e.contains("partitioner shuffle:"), "{e}");
}

/// A rank outside the world, or an empty world, is an error for every partitioner.
#[test]
fn ranks_outside_the_world_are_errors() {
    for name in ["contiguous", "strided", "shuffle"] {
        let p = new_data_partitioner(name, "").unwrap();
        assert!(p.shard(0, 10, 2, 2).is_err(), "{name}: rank 2 of 2");
        assert!(p.shard(0, 10, 5, 3).is_err(), "{name}: rank 5 of 3");
        assert!(p.shard(0, 10, 0, 0).is_err(), "{name}: a world of 0");
        assert!(p.shard(0, 10, 1, 2).is_ok(), "{name}: rank 1 of 2");
    }
}

/// Every (seed, epoch) draws its own permutation, for seeds of all zeros and all ones
/// too (where mixing the epoch in by `or` or `and` would not change it).
#[test]
fn every_epoch_draws_its_own_permutation_for_any_seed() {
    for seed in [0, u64::MAX, 12_345] {
        let s = Shuffle { seed };
        let orders: Vec<Vec<usize>> = (0..5).map(|e| s.permutation(e, 50)).collect();
        for a in 0..5 {
            for b in a + 1..5 {
                assert_ne!(orders[a], orders[b], "seed {seed}: epochs {a} and {b}");
            }
        }
    }
}
