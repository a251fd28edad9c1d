//! What the strategy plans, cuts and checks without training: plans per ZeRO stage and
//! their byte figures, DDP's buckets, the plugin's factory, the replicas' checksum.

use super::*;

/// Blocks cut into equal runs (the data-parallel plan cuts nothing; the plan input
/// needs one).
struct Even;

impl sheaf_core::ModelPartitioner for Even {
    fn cut(&self, costs: &[u64], stages: usize) -> sheaf_core::Result<Vec<std::ops::Range<usize>>> {
        Ok((0..stages).map(|k| k * costs.len() / stages..(k + 1) * costs.len() / stages).collect())
    }
}

/// ZeRO stage 2 plans what `train` holds: its chunk of the sums and a buffer of a
/// bucket and a backward step, with the buckets on their way (three with a
/// communication thread, one without), where that is less than the model; the whole
/// model's sum where it is not; the other stages leave the reckoning to the host.
#[test]
fn zero_2_plans_its_chunk_and_window() {
    let blocks: Vec<sheaf_core::Block> = [1 << 20, 3 << 20, 3 << 20, 1 << 19]
        .iter()
        .map(|&p| sheaf_core::Block { name: "b".into(), params: p })
        .collect();
    let costs = vec![1u64; blocks.len()];
    let total = blocks.iter().map(|b| b.params).sum::<u64>();
    let input =
        sheaf_core::PlanInput { world: 4, blocks: &blocks, costs: &costs, batch_size: 8, partitioner: &Even };
    let planned = |json: &str| {
        let s = DataParallel { config: DataParallelConfig::parse(json).unwrap() };
        sheaf_core::Strategy::planned_gradient_bytes(&s, &input).unwrap()
    };
    for zero in [0, 1, 3] {
        assert_eq!(planned(&format!(r#"{{"zero": {zero}}}"#)), None, "zero {zero}");
    }
    // 1 MiB buckets (262144 values), a step of at most 3 Mi values.
    let bucket = 1u64 << 18;
    let with = planned(r#"{"zero": 2, "bucket_mb": 1, "overlap": true}"#).unwrap();
    assert_eq!(with, vec![4 * (total / 4 + bucket + (3 << 20) + 3 * bucket); 4]);
    let without = planned(r#"{"zero": 2, "bucket_mb": 1, "overlap": false}"#).unwrap();
    assert_eq!(without, vec![4 * (total / 4 + bucket + (3 << 20) + bucket); 4]);
    // A world of one has no communication thread to plan for, overlap or not.
    let alone = sheaf_core::PlanInput { world: 1, ..input };
    let s = DataParallel {
        config: DataParallelConfig::parse(r#"{"zero": 2, "bucket_mb": 1, "overlap": true}"#).unwrap(),
    };
    let one = sheaf_core::Strategy::planned_gradient_bytes(&s, &alone).unwrap().unwrap();
    assert_eq!(one, vec![4 * (total + bucket + (3 << 20) + bucket)]);
    // Buckets as large as the model: no window is smaller than the whole sum.
    let whole = planned(r#"{"zero": 2, "bucket_mb": 64}"#).unwrap();
    assert_eq!(whole, vec![4 * (total / 4 + total); 4]);
    // ZeRO 3 keeping its units gathered holds the model whole beside its rows.
    let parameters = |json: &str| {
        let s = DataParallel { config: DataParallelConfig::parse(json).unwrap() };
        sheaf_core::Strategy::planned_parameter_bytes(&s, &input).unwrap()
    };
    assert_eq!(parameters(r#"{"zero": 3}"#), None);
    let kept = parameters(r#"{"zero": 3, "reshard_after_forward": false}"#).unwrap();
    assert_eq!(kept, vec![4 * (total + total / 4); 4]);
    let e = DataParallelConfig::parse(r#"{"zero": 2, "reshard_after_forward": false}"#).unwrap_err();
    assert!(e.to_string().contains("reshard_after_forward"), "{e}");
}

/// Every rank a replica of the whole model; ZeRO 1 and 2 shard its optimizer state
/// over the world, ZeRO 3 its parameters by rows, one shard a rank.
#[test]
fn plans_shard_what_each_stage_shards() {
    let blocks = vec![sheaf_core::Block { name: "b".into(), params: 10 }; 2];
    let costs = [1, 1];
    let input =
        sheaf_core::PlanInput { world: 3, blocks: &blocks, costs: &costs, batch_size: 8, partitioner: &Even };
    let plan = |zero: u8| {
        let s =
            DataParallel { config: DataParallelConfig::parse(&format!(r#"{{"zero": {zero}}}"#)).unwrap() };
        sheaf_core::Strategy::plan(&s, &input).unwrap()
    };
    for zero in [0u8, 1, 2, 3] {
        let p = plan(zero);
        assert_eq!(p.ranks.len(), 3);
        for (r, rank) in p.ranks.iter().enumerate() {
            assert_eq!(rank.piece, sheaf_core::Piece::whole(2), "zero {zero}");
            let shards = if zero == 1 || zero == 2 { 3 } else { 1 };
            assert_eq!(rank.state_shards, shards, "zero {zero}");
            let rows = (zero == 3).then_some(sheaf_core::ParamShard { index: r, count: 3 });
            assert_eq!(rank.param_shard, rows, "zero {zero}");
        }
    }
    // `parallel.data` is the world, when given.
    let with_data = |data: usize| {
        let s =
            DataParallel { config: DataParallelConfig::parse(&format!(r#"{{"data": {data}}}"#)).unwrap() };
        sheaf_core::Strategy::plan(&s, &input).map(|p| p.ranks.len()).map_err(|e| e.to_string())
    };
    assert_eq!(with_data(3), Ok(3));
    let e = with_data(2).unwrap_err();
    assert!(e.contains("parallel.data") && e.contains("2 replicas need 2 ranks, not 3"), "{e}");
}

proptest::proptest! {
    /// Buckets as DDP cuts them: whole parameters, the last first, covering the buffer
    /// once; each closes at the first parameter that brings it to its cap (1 MiB at
    /// most for the first, `bucket_bytes` after), the one holding parameter 0 at it.
    #[test]
    fn buckets_close_at_their_cap(
        sizes in proptest::collection::vec(1usize..300_000, 1..12),
        bucket_bytes in 1usize..3_000_000,
    ) {
        let layout = sheaf_testkit::flat_layout(&sizes);
        let buckets = crate::buckets(&layout, bucket_bytes);
        let mut end = layout.total();
        let mut p = sizes.len();
        for (k, b) in buckets.iter().enumerate() {
            proptest::prop_assert_eq!(b.end, end);
            let cap = if k == 0 { bucket_bytes.min(1 << 20) } else { bucket_bytes };
            // Parameters taken one at a time, from the last down, until the cap.
            let mut start = end;
            while p > 0 {
                p -= 1;
                start = layout.range(p).start;
                if (end - start) * 4 >= cap {
                    break;
                }
            }
            proptest::prop_assert_eq!(b.start, start, "bucket {} of {:?}", k, buckets);
            end = start;
        }
        proptest::prop_assert_eq!((end, p), (0, 0));
        proptest::prop_assert!(crate::buckets(&sheaf_testkit::flat_layout(&[]), bucket_bytes).is_empty());
    }
}

/// The plugin builds the strategy it lists, and only that.
#[test]
fn provides_what_it_builds() {
    use sheaf_abi::Plugin;
    sheaf_testkit::train::check_strategy_factory(
        crate::DataParallelPlugin::provides(),
        crate::DataParallelPlugin::strategy,
    );
}

/// The checksum is FNV-1a over the values' bits, its halves exact; ranks that differ
/// in one bit of one value are all told, naming the step; equal ranks pass.
#[test]
fn diverged_replicas_are_found() {
    let params: Vec<f32> = (0..50).map(|i| i as f32 * 0.37 - 3.0).collect();
    let (h, halves) = crate::checksum(&params);
    let mut want: u64 = 0xcbf2_9ce4_8422_2325;
    for v in &params {
        want ^= u64::from(v.to_bits());
        want = want.wrapping_mul(0x0100_0000_01b3);
    }
    assert_eq!(h, want);
    assert_eq!((halves[0] as u64) << 32 | halves[1] as u64, want, "the halves are the hash, exactly");
    assert!(halves.iter().all(|&x| x < 4_294_967_296.0 && x.fract() == 0.0));
    let dl = || sheaf_testkit::test_deadline(std::time::Duration::from_secs(10));
    let same = run_world(3, |comm| crate::check_in_sync(&comm, &params, 7, dl()).is_ok());
    assert_eq!(same, [true; 3]);
    let results = run_world(3, |comm| {
        let mut mine = params.clone();
        if sheaf_core::Communicator::rank(&comm) == 2 {
            mine[17] = f32::from_bits(mine[17].to_bits() ^ 1);
        }
        crate::check_in_sync(&comm, &mine, 7, dl()).err().map(|e| e.to_string())
    });
    for (rank, e) in results.iter().enumerate() {
        let e = e.as_deref().unwrap_or_else(|| panic!("rank {rank} was not told"));
        assert!(e.contains("diverged by step 7") && e.contains(&format!("rank {rank} ")), "{e}");
    }
}
