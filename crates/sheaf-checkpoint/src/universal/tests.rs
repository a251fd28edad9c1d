//! The universal checkpoint's laws: runs against their definition, any layout reading
//! what any layout wrote, buffer names, grouping, the resharding wrapper, and what
//! cannot be read.

use super::*;
use proptest::prelude::*;
use sheaf_core::{chunk_range, ParamShard, ParamSpec, ShardSource};

/// A whole model of a `[rows, cols]` weight and a `[rows]` bias.
fn whole(rows: usize, cols: usize) -> ParamLayout {
    ParamLayout::new(vec![
        ParamSpec { name: "l.weight".into(), shape: vec![rows, cols] },
        ParamSpec { name: "l.bias".into(), shape: vec![rows] },
    ])
}

/// Piece `k` of `n` of `whole`: the weight's columns (a tensor-parallel slice, the
/// bias whole), or every parameter's rows (a ZeRO 3 shard).
fn piece(whole: &ParamLayout, by_columns: bool, k: usize, n: usize) -> PieceLayout {
    if !by_columns {
        return PieceLayout::row_shard(whole, ParamShard { index: k, count: n }, 0);
    }
    let (rows, cols) = (whole.specs()[0].shape[0], whole.specs()[0].shape[1]);
    let own = chunk_range(cols, n, k);
    PieceLayout {
        layout: ParamLayout::new(vec![
            ParamSpec { name: "l.weight".into(), shape: vec![rows, own.len()] },
            ParamSpec { name: "l.bias".into(), shape: vec![rows] },
        ]),
        sources: vec![
            ShardSource { param: 0, by_columns: true, ranges: vec![own] },
            ShardSource::whole(1, rows),
        ],
        activation_bytes_per_sample: 0,
    }
}

/// A piece's optimizer state, one slot, as a strategy holding it in `chunks` of its
/// flat values (ZeRO 1) would name it: `<param>@<first index>.m`.
fn state_of(local: &PieceLayout, values: &[f32], chunks: usize, mine: usize) -> OptimState {
    let mut buffers = Vec::new();
    for (k, spec) in local.layout.specs().iter().enumerate() {
        let r = local.layout.range(k);
        let own = chunk_range(r.len(), chunks, mine);
        let name = match chunks {
            1 => format!("{}.m", spec.name),
            _ => format!("{}@{}.m", spec.name, own.start),
        };
        buffers.push((name, values[r.start + own.start..r.start + own.end].to_vec()));
    }
    OptimState { step: 3, buffers }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(sheaf_testkit::proptest_cases(24)))]

    /// Runs give back the indices they were made of, whatever their order.
    #[test]
    fn runs_expand_to_their_indices(indices in proptest::collection::vec(0usize..300, 0..80)) {
        let back: Vec<usize> =
            each_run(&runs_of(&indices)).flat_map(|(s, l)| s as usize..(s + l) as usize).collect();
        prop_assert_eq!(back, indices);
    }

    /// Runs worked out from a piece's source are where the piece's values lie, value
    /// by value ([`PieceLayout::full_indices`]), for any part of them.
    #[test]
    fn runs_from_sources_are_the_full_indices(
        rows in 1usize..7,
        cols in 1usize..7,
        n in 1usize..4,
        by_columns in any::<bool>(),
        cut in (0usize..100, 0usize..100),
    ) {
        let whole = whole(rows, cols);
        for k in 0..n {
            let local = piece(&whole, by_columns, k, n);
            let full = local.full_indices(&whole);
            for (p, src) in local.sources.iter().enumerate() {
                let r = local.layout.range(p);
                let lo = cut.0 % (r.len() + 1);
                let len = cut.1 % (r.len() - lo + 1);
                let base = whole.range(src.param).start;
                let want: Vec<usize> = full[r.start + lo..r.start + lo + len].iter().map(|i| i - base).collect();
                let got = runs_within(src, &whole.specs()[src.param].shape, lo, len);
                prop_assert_eq!(got, runs_of(&want));
            }
        }
    }

    /// The law: parameters and state written under one layout (slices or row shards
    /// of `n` pieces, the state in ZeRO chunks) and read under another are what the
    /// other layout's slice of the whole model is.
    #[test]
    fn any_layout_reads_what_any_layout_wrote(
        rows in 1usize..7,
        cols in 1usize..7,
        n in 1usize..4,
        m in 1usize..4,
        columns_then in any::<bool>(),
        columns_now in any::<bool>(),
        chunks in 1usize..3,
    ) {
        let whole = whole(rows, cols);
        let params: Vec<f32> = (0..whole.total()).map(|i| i as f32).collect();
        let moments: Vec<f32> = (0..whole.total()).map(|i| -(i as f32) - 0.5).collect();
        let dir = tempfile::tempdir().unwrap();
        let mut writers = Vec::new();
        for k in 0..n {
            let local = piece(&whole, columns_then, k, n);
            let (mine, m_mine) = (local.slice(&whole, &params), local.slice(&whole, &moments));
            for c in 0..chunks {
                let rank = k * chunks + c;
                let state = state_of(&local, &m_mine, chunks, c);
                let owns_params = (c == 0).then_some(&mine[..]);
                RankParts::new(&local, &whole, owns_params, Some(lent(&state))).unwrap().write(dir.path(), rank).unwrap();
                writers.push(rank);
            }
        }
        merge_index(dir.path(), &writers).unwrap();
        let mut u = Universal::open(dir.path()).unwrap();
        for k in 0..m {
            let local = piece(&whole, columns_now, k, m);
            prop_assert_eq!(u.params(&local, &whole).unwrap(), local.slice(&whole, &params));
            prop_assert_eq!(u.slots("l.weight"), vec!["m".to_string()]);
            // The state, cut as a resumed optimizer is handed its parameters.
            let want = local.slice(&whole, &moments);
            let mut optimizer = Keep::default();
            let source = Universal::open(dir.path()).unwrap();
            let mut resharding =
                Resharding::new(&mut optimizer, Some((source, local.clone(), whole.clone(), 3)));
            let mut values = vec![0f32; local.layout.total()];
            let grads = vec![0f32; values.len()];
            // A ZeRO chunk of each parameter: `<param>@<first index>`.
            let mut named: Vec<Param<'_>> = Vec::new();
            let mut rest = &mut values[..];
            for (i, spec) in local.layout.specs().iter().enumerate() {
                let (value, tail) = rest.split_at_mut(spec.numel());
                rest = tail;
                let own = chunk_range(value.len(), 2, 1);
                let name: &'static str = Box::leak(format!("{}@{}", spec.name, own.start).into_boxed_str());
                let r = local.layout.range(i);
                named.push(Param { name, value: &mut value[own.clone()], grad: &grads[r.start + own.start..r.start + own.end] });
            }
            resharding.step(&mut named).unwrap();
            let got = optimizer.0.unwrap();
            prop_assert_eq!(got.step, 3);
            for (i, spec) in local.layout.specs().iter().enumerate() {
                let r = local.layout.range(i);
                let own = chunk_range(r.len(), 2, 1);
                let name = format!("{}@{}.m", spec.name, own.start);
                let buf = got.get(&name).map(<[f32]>::to_vec);
                prop_assert_eq!(buf, Some(want[r.start + own.start..r.start + own.end].to_vec()), "{}", name);
            }
        }
    }
}

/// An optimizer that keeps the state it is given (the checkpointer's tests use it too).
#[derive(Default)]
pub(crate) struct Keep(pub(crate) Option<OptimState>);

impl Optimizer for Keep {
    fn step(&mut self, _: &mut [Param<'_>]) -> sheaf_core::Result<()> {
        Ok(())
    }
    fn learning_rate(&self) -> f64 {
        0.1
    }
    fn set_learning_rate(&mut self, _: f64) {}
    fn state(&self) -> sheaf_core::Result<OptimState> {
        Ok(self.0.clone().unwrap_or_default())
    }
    fn load_state(&mut self, state: &OptimState) -> sheaf_core::Result<()> {
        self.0 = Some(state.clone());
        Ok(())
    }
}

/// An optimizer whose every answer is its own, to see the wrapper pass them on.
struct Probe {
    lr: f64,
    loaded: Option<OptimState>,
}

impl Optimizer for Probe {
    fn step(&mut self, _: &mut [Param<'_>]) -> sheaf_core::Result<()> {
        Ok(())
    }
    fn learning_rate(&self) -> f64 {
        self.lr
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn state(&self) -> sheaf_core::Result<OptimState> {
        Ok(OptimState { step: 9, buffers: vec![("w.m".into(), vec![1.0, 2.0])] })
    }
    fn load_state(&mut self, state: &OptimState) -> sheaf_core::Result<()> {
        self.loaded = Some(state.clone());
        Ok(())
    }
    fn take_state(&mut self) -> sheaf_core::Result<OptimState> {
        Ok(OptimState { step: 10, buffers: Vec::new() })
    }
    fn state_bytes(&self) -> sheaf_core::Result<u64> {
        Ok(12)
    }
    fn state_values_per_param(&self) -> Option<u32> {
        Some(2)
    }
}

/// Besides cutting the state before a step, the wrapper hands every call to the
/// optimizer it wraps and every answer back.
#[test]
fn resharding_hands_everything_else_to_its_optimizer() {
    let mut probe = Probe { lr: 0.25, loaded: None };
    let mut r = Resharding::new(&mut probe, None);
    assert_eq!(r.learning_rate(), 0.25);
    r.set_learning_rate(0.5);
    assert_eq!(r.learning_rate(), 0.5);
    assert_eq!(r.state().unwrap().buffers[0].1, [1.0, 2.0]);
    assert_eq!(r.take_state().unwrap().step, 10);
    assert_eq!((r.state_bytes().unwrap(), r.state_values_per_param()), (12, Some(2)));
    r.load_state(&OptimState { step: 3, buffers: Vec::new() }).unwrap();
    assert_eq!(probe.loaded.map(|s| s.step), Some(3));
}

/// Runs of one length at one stride are one entry: a column slice of a matrix is
/// one, whatever its rows; runs that break the stride start another.
#[test]
fn strided_runs_are_grouped() {
    assert_eq!(runs_of(&[0, 1, 5, 6, 10, 11]), [[0, 2, 5, 3]]);
    assert_eq!(runs_of(&[3, 4, 5]), [[3, 3, 3, 1]]);
    assert_eq!(runs_of(&[0, 1, 5, 6, 12, 13]), [[0, 2, 5, 2], [12, 2, 2, 1]]);
    assert_eq!(runs_of(&[7, 2]), [[7, 1, 1, 1], [2, 1, 1, 1]]);
    assert_eq!(runs_of(&[0, 4, 8, 9]), [[0, 1, 4, 2], [8, 2, 2, 1]]);
}

/// Buffer names come apart into the longest parameter name, the first index and
/// the slot; a name of no parameter does not.
#[test]
fn buffer_names_name_their_parameter() {
    let local = ParamLayout::new(vec![
        ParamSpec { name: "h.0.ln".into(), shape: vec![2] },
        ParamSpec { name: "h.0.ln.weight".into(), shape: vec![2] },
    ]);
    assert_eq!(parse_buffer("h.0.ln.weight.exp_avg", &local), Some((1, 0, "exp_avg".into())));
    assert_eq!(parse_buffer("h.0.ln@1.exp_avg", &local), Some((0, 1, "exp_avg".into())));
    assert_eq!(parse_buffer("h.0.ln.exp_avg_sq", &local), Some((0, 0, "exp_avg_sq".into())));
    for bad in ["h.1.ln.exp_avg", "h.0.ln", "h.0.ln@x.m", "h.0.ln.", "step"] {
        assert_eq!(parse_buffer(bad, &local), None, "{bad}");
    }
}

/// What cannot be read is an error naming it: a tensor no fragment covers, a file
/// name outside the checkpoint, state naming no parameter of the rank.
#[test]
fn what_cannot_be_read_is_named() {
    let whole = whole(2, 3);
    let dir = tempfile::tempdir().unwrap();
    let half = piece(&whole, true, 0, 2);
    assert!(RankParts::new(&half, &whole, Some(&[1.0; 5]), None).is_err(), "5 values for a piece of 6");
    RankParts::new(&half, &whole, Some(&[1.0; 6]), None).unwrap().write(dir.path(), 0).unwrap();
    merge_index(dir.path(), &[0]).unwrap();
    let mut u = Universal::open(dir.path()).unwrap();
    let e = u.params(&piece(&whole, true, 1, 2), &whole).unwrap_err().to_string();
    assert!(e.contains("no fragment holds value 2 of `l.weight`"), "{e}");
    let state = OptimState { step: 1, buffers: vec![("other.m".into(), vec![0.0])] };
    let e = RankParts::new(&half, &whole, None, Some(owned(state))).err().unwrap().to_string();
    assert!(e.contains("`other.m` names no parameter"), "{e}");
    let mut index: Index = serde_json::from_slice(&std::fs::read(dir.path().join(INDEX)).unwrap()).unwrap();
    index.tensors.get_mut("l.weight").unwrap().fragments[0].file = "../x".into();
    std::fs::write(dir.path().join(INDEX), serde_json::to_vec(&index).unwrap()).unwrap();
    let e = Universal::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("`../x` is not a file name"), "{e}");
    index.tensors.get_mut("l.weight").unwrap().fragments[0].file = "rank-0.safetensors".into();
    index.tensors.get_mut("l.weight").unwrap().fragments[0].runs = vec![[0, 2, u64::MAX, 2]];
    std::fs::write(dir.path().join(INDEX), serde_json::to_vec(&index).unwrap()).unwrap();
    let e = Universal::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("outside its 6 values"), "{e}");
    let e = merge_index(dir.path(), &[0, 1]).unwrap_err().to_string();
    assert!(e.contains("rank 1 reported its part written") && e.contains("shared filesystem"), "{e}");
}
