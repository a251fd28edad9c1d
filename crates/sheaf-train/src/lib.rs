//! What training strategies share, built on `sheaf-core`'s vocabulary: the order
//! samples are trained in (`order`), a run's tally and its world-wide sums (`tally`),
//! gradient norms and clipping (`norms`), a model piece's segments run forward and
//! backward (`segments`), a replicas x model-parallel mesh (`mesh`), samples prefetched
//! on a thread of their own (`prefetch`), ZeRO's shards of a flat buffer (`shards`), a
//! strategy's hold on its model's parameters (`params`) and buffers that give their
//! pages back between uses (`pages`). A strategy plugin depends on it; the host, the
//! ABI and vendors' other plugins need not.

mod mesh;
mod norms;
mod order;
mod pages;
mod params;
mod prefetch;
mod segments;
mod shards;
mod tally;

pub use mesh::Mesh;
pub use norms::{clip_factor, clip_to, norm_contribution, sum_of_squares};
pub use order::{epoch_order, epochs_done, global_batches, optimizer_steps, EpochOrder};
pub use pages::{take_release, zero_release, zero_release_part};
pub use params::ModelParams;
pub use prefetch::{prefetched_steps, with_prefetch, Prefetch};
pub use segments::{backward_segments, forward_segments, SegmentParams, StageInput, Whole};
pub use shards::{check_piece_zero_stage, rows_by_rank, ReplicaStep, Shards};
pub use tally::{
    evaluate_indices, evaluate_passes, mean_loss, most_passes, optimizer_state_bytes, save_checkpoint_if_due,
    stop_if_preempted, test_totals, Passes, RunTally, StepDone,
};
