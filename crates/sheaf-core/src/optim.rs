//! Optimizers: a step over named parameter buffers, with state that can be saved.

use crate::Result;

/// One parameter buffer and its gradient, by name. The name keys the optimizer's
/// state, so the same parameter must keep the same name from step to step. A
/// ZeRO-style sharded optimizer passes the shard it owns under a name of its own.
#[derive(Debug)]
pub struct Param<'a> {
    pub name: &'a str,
    pub value: &'a mut [f32],
    pub grad: &'a [f32],
}

/// Optimizer state: a step count and named buffers (`"<param>.<slot>"`, for example
/// `"layers.0.weight.exp_avg"`), enough to resume bit-for-bit.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptimState {
    pub step: u64,
    pub buffers: Vec<(String, Vec<f32>)>,
}

impl OptimState {
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.buffers.iter().find(|(n, _)| n == name).map(|(_, b)| b.as_slice())
    }
}

/// (1.4.) An optimizer's state lent, not copied: its step count and its buffers as
/// they are (names as in [`OptimState`]), valid while the optimizer is not stepped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateViews<'a> {
    pub step: u64,
    pub buffers: Vec<(String, &'a [f32])>,
}

impl StateViews<'_> {
    /// The state copied out.
    pub fn copied(&self) -> OptimState {
        OptimState {
            step: self.step,
            buffers: self.buffers.iter().map(|(n, b)| (n.clone(), b.to_vec())).collect(),
        }
    }
}

/// Updates parameters from gradients.
pub trait Optimizer: Send {
    /// Apply one update to every parameter. `value` and `grad` of each have equal
    /// lengths; a parameter seen before must keep its length.
    fn step(&mut self, params: &mut [Param<'_>]) -> Result<()>;

    fn learning_rate(&self) -> f64;

    /// Change the learning rate (schedules call this between steps).
    fn set_learning_rate(&mut self, lr: f64);

    /// The state to resume from (an error when it cannot be had, never a default).
    fn state(&self) -> Result<OptimState>;

    /// Restore state saved by [`Optimizer::state`] of the same kind of optimizer.
    fn load_state(&mut self, state: &OptimState) -> Result<()>;

    /// (1.4.) The state lent as it is, for a checkpoint to copy where it keeps it
    /// (warm staging) or write straight away: no copy is made here. `None`, the
    /// default: the optimizer does not lend it, and [`Optimizer::state`] copies it.
    fn state_views(&self) -> Result<Option<StateViews<'_>>> {
        Ok(None)
    }

    /// The state moved out, leaving the optimizer as if new: what a run's
    /// last checkpoint takes, so the state (AdamW's two moments: 8 bytes a parameter)
    /// is never held twice. The default copies it ([`Optimizer::state`]).
    fn take_state(&mut self) -> Result<OptimState> {
        self.state()
    }

    /// Bytes of the state held now, without copying it. The default copies
    /// it to count ([`Optimizer::state`]).
    fn state_bytes(&self) -> Result<u64> {
        Ok(self.state()?.buffers.iter().map(|(_, b)| b.len() as u64 * 4).sum())
    }

    /// Values of state this optimizer keeps per parameter once it has stepped (plain
    /// SGD 0, SGD with momentum 1, AdamW 2), for a memory plan made before the first
    /// step (1.1). `None`, the default: it does not say, and a plan assumes the most a
    /// built-in optimizer keeps.
    fn state_values_per_param(&self) -> Option<u32> {
        None
    }
}
