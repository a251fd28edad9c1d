//! A small model and plans of it, for the plan's and the memory plan's tests: three
//! blocks (embeddings `e` [10, 4], a layer `w` [4, 4] and `b` [4], a head `o` [4, 10]),
//! 40, 20 and 40 values; 8 bytes of activations per sample per piece.

use sheaf_core::{
    Block, ModelInfo, ModelInput, ModelSpec, ParamLayout, ParamShard, ParamSpec, Piece, PieceLayout,
    RankPlan, ShardSource, TransportInfo,
};

use crate::job::{parse_job, Job};
use crate::plan::Plan;

/// The smallest job, with `sets` applied.
pub fn job(sets: &[&str]) -> Job {
    const MINIMAL: &str = "[model]\n[data]\ndataset = \"synthetic\"\n[train]\nepochs = 1\nbatch_size = 4\n\
                           lr = 0.1\n[parallel]\nstrategy = \"any\"\n";
    parse_job(MINIMAL, "fixture", &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
}

pub fn info() -> ModelInfo {
    let spec = |name: &str, shape: &[usize]| ParamSpec { name: name.into(), shape: shape.to_vec() };
    let layout =
        ParamLayout::new(vec![spec("e", &[10, 4]), spec("w", &[4, 4]), spec("b", &[4]), spec("o", &[4, 10])]);
    let block = |name: &str, params| Block { name: name.into(), params };
    ModelInfo {
        layout,
        blocks: vec![block("embed", 40), block("h0", 20), block("head", 40)],
        input: ModelInput::Tokens { vocab_size: 10, block_size: 4 },
    }
}

/// The layout of blocks `blocks` (whole parameters): block 0 holds `e`, 1 `w` and
/// `b`, 2 `o`.
fn piece_layout(info: &ModelInfo, blocks: std::ops::Range<usize>) -> PieceLayout {
    let params: Vec<usize> = blocks.flat_map(|b| [vec![0], vec![1, 2], vec![3]][b].clone()).collect();
    let specs = params.iter().map(|&p| info.layout.specs()[p].clone()).collect();
    let sources = params.iter().map(|&p| ShardSource::whole(p, info.layout.specs()[p].shape[0])).collect();
    PieceLayout { layout: ParamLayout::new(specs), sources, activation_bytes_per_sample: 8 }
}

/// A plan whose rank `r` holds `pieces[r]` (blocks), its optimizer state over
/// `state_shards` ranks, and `shards[r]`'s rows of it where given; each keeps the
/// activations of 2 samples.
pub fn plan(pieces: &[std::ops::Range<usize>], state_shards: u64, shards: &[Option<ParamShard>]) -> Plan {
    let info = info();
    let ranks: Vec<RankPlan> = pieces
        .iter()
        .zip(shards)
        .map(|(blocks, &param_shard)| RankPlan {
            piece: Piece { blocks: blocks.clone(), tensor_rank: 0, tensor_width: 1 },
            activation_samples: 2,
            state_shards,
            param_shard,
        })
        .collect();
    let stage_interface = pieces.iter().any(|p| *p != (0..3));
    let layouts = ranks
        .iter()
        .map(|r| {
            let piece = piece_layout(&info, r.piece.blocks.clone());
            match (r.param_shard, stage_interface) {
                (None, _) => piece,
                (Some(s), true) => piece.rows(s).unwrap(),
                (Some(s), false) => PieceLayout::row_shard(&info.layout, s, 8),
            }
        })
        .collect();
    Plan {
        spec: ModelSpec::new("fixture", "{}"),
        info,
        ranks,
        layouts,
        stage_interface,
        state_values_per_param: 2,
        gradient_bytes: None,
        parameter_bytes: None,
        transport: TransportInfo::network(),
    }
}

/// Rows `index` of `count` of every parameter.
pub fn shard(index: usize, count: usize) -> Option<ParamShard> {
    Some(ParamShard { index, count })
}
