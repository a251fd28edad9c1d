//! Adapters between the two layers: [`to_abi`] wraps core trait objects for export
//! (catching panics at every entry), [`from_abi`] wraps loaded objects back into core
//! traits for the host.

use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::std_types::{RResult, RString, RVec};

use crate::AbiError;

/// Runs `f`, turning a panic into an [`AbiError`] naming `plugin` and `what`.
pub(crate) fn guard<T>(
    plugin: &str,
    what: &str,
    f: impl FnOnce() -> Result<T, AbiError>,
) -> RResult<T, AbiError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.into(),
        Err(payload) => RResult::RErr(AbiError::panic(plugin, what, payload.as_ref())),
    }
}

fn state_to_abi(s: sheaf_core::OptimState) -> crate::AbiOptimState {
    let (names, buffers): (Vec<_>, Vec<_>) =
        s.buffers.into_iter().map(|(n, b)| (RString::from(n), RVec::from(b))).unzip();
    crate::AbiOptimState { step: s.step, names: names.into(), buffers: buffers.into() }
}

fn state_from_abi(s: &crate::AbiOptimState) -> sheaf_core::OptimState {
    sheaf_core::OptimState {
        step: s.step,
        buffers: s.names.iter().zip(s.buffers.iter()).map(|(n, b)| (n.to_string(), b.to_vec())).collect(),
    }
}

/// Plugin side: core objects into ABI objects.
pub mod to_abi {
    use abi_stable::sabi_trait::TD_Opaque;
    use abi_stable::std_types::{RResult, RSlice, RSliceMut, RStr, RVec};
    use sheaf_core::{
        DType, DataPartitioner, Deadline, Link, ModelPartitioner, Optimizer, Param, ReduceOp, Tag,
    };
    use std::time::Duration;

    use super::{guard, state_from_abi, state_to_abi};
    use crate::traits::{DataPartitionerAbi, LinkAbi, ModelPartitionerAbi, OptimizerAbi};
    use crate::traits::{DataPartitionerAbi_TO, LinkAbi_TO, ModelPartitionerAbi_TO, OptimizerAbi_TO};
    use crate::{
        AbiBuf, AbiError, AbiOptimState, AbiParam, AbiRange, DataPartitionerBox, LinkBox,
        ModelPartitionerBox, OptimizerBox,
    };

    /// A core object exported by plugin `plugin`.
    struct Exported<T: ?Sized> {
        plugin: &'static str,
        inner: Box<T>,
    }

    fn usize_arg(v: u64, what: &str) -> Result<usize, AbiError> {
        usize::try_from(v).map_err(|_| sheaf_core::Error::invalid(format!("{what} {v} too large")).into())
    }

    fn deadline(timeout_ns: u64) -> Deadline {
        Deadline::after(Duration::from_nanos(timeout_ns))
    }

    impl OptimizerAbi for Exported<dyn Optimizer> {
        fn step(&mut self, mut params: RSliceMut<'_, AbiParam<'_>>) -> RResult<(), AbiError> {
            guard(self.plugin, "optimizer step", || {
                let mut core: Vec<Param<'_>> = params
                    .iter_mut()
                    .map(|p| Param { name: p.name.as_str(), value: &mut p.value[..], grad: &p.grad[..] })
                    .collect();
                Ok(self.inner.step(&mut core)?)
            })
        }
        fn learning_rate(&self) -> RResult<f64, AbiError> {
            guard(self.plugin, "optimizer learning_rate", || Ok(self.inner.learning_rate()))
        }
        fn set_learning_rate(&mut self, lr: f64) -> RResult<(), AbiError> {
            guard(self.plugin, "optimizer set_learning_rate", || {
                self.inner.set_learning_rate(lr);
                Ok(())
            })
        }
        fn state(&self) -> RResult<AbiOptimState, AbiError> {
            guard(self.plugin, "optimizer state", || Ok(state_to_abi(self.inner.state())))
        }
        fn load_state(&mut self, state: &AbiOptimState) -> RResult<(), AbiError> {
            guard(self.plugin, "optimizer load_state", || {
                Ok(self.inner.load_state(&state_from_abi(state))?)
            })
        }
    }

    impl DataPartitionerAbi for Exported<dyn DataPartitioner> {
        fn shard(&self, epoch: u64, num_samples: u64, rank: u64, world: u64) -> RResult<RVec<u64>, AbiError> {
            guard(self.plugin, "data partitioner shard", || {
                let shard = self.inner.shard(
                    epoch,
                    usize_arg(num_samples, "num_samples")?,
                    usize_arg(rank, "rank")?,
                    usize_arg(world, "world")?,
                )?;
                Ok(shard.into_iter().map(|i| i as u64).collect())
            })
        }
    }

    impl ModelPartitionerAbi for Exported<dyn ModelPartitioner> {
        fn cut(&self, layer_costs: RSlice<'_, u64>, stages: u64) -> RResult<RVec<AbiRange>, AbiError> {
            guard(self.plugin, "model partitioner cut", || {
                let ranges = self.inner.cut(&layer_costs, usize_arg(stages, "stages")?)?;
                Ok(ranges
                    .into_iter()
                    .map(|r| AbiRange { start: r.start as u64, end: r.end as u64 })
                    .collect())
            })
        }
    }

    impl LinkAbi for Exported<dyn Link> {
        fn rank(&self) -> RResult<u64, AbiError> {
            guard(self.plugin, "link rank", || Ok(self.inner.rank() as u64))
        }
        fn world_size(&self) -> RResult<u64, AbiError> {
            guard(self.plugin, "link world_size", || Ok(self.inner.world_size() as u64))
        }
        fn send(&self, peer: u64, tag: u64, data: RSlice<'_, u8>, timeout_ns: u64) -> RResult<(), AbiError> {
            guard(self.plugin, "link send", || {
                Ok(self.inner.send(usize_arg(peer, "peer")?, Tag(tag), &data, deadline(timeout_ns))?)
            })
        }
        fn recv(&self, peer: u64, tag: u64, timeout_ns: u64) -> RResult<RVec<u8>, AbiError> {
            guard(self.plugin, "link recv", || {
                Ok(self.inner.recv(usize_arg(peer, "peer")?, Tag(tag), deadline(timeout_ns))?.into())
            })
        }
        fn abort(&self, culprit: u64, reason: RStr<'_>) -> RResult<(), AbiError> {
            guard(self.plugin, "link abort", || {
                self.inner.abort(usize_arg(culprit, "culprit")?, reason.as_str());
                Ok(())
            })
        }
        fn failure_reports(&self) -> RResult<RVec<crate::AbiRange>, AbiError> {
            guard(self.plugin, "link failure_reports", || {
                Ok(self
                    .inner
                    .failure_reports()
                    .into_iter()
                    .map(|(r, b)| AbiRange { start: r as u64, end: b as u64 })
                    .collect())
            })
        }
        fn close(&self, timeout_ns: u64) -> RResult<(), AbiError> {
            guard(self.plugin, "link close", || Ok(self.inner.close(deadline(timeout_ns))?))
        }
        fn native_allreduce(&self, mut buf: AbiBuf<'_>, op: u8, timeout_ns: u64) -> RResult<(), AbiError> {
            guard(self.plugin, "link native_allreduce", || {
                let bad = |what: &str, code: u8| {
                    AbiError::from(sheaf_core::CommError::InvalidArgument {
                        op: sheaf_core::Op::Allreduce,
                        detail: format!("unknown {what} code {code}"),
                    })
                };
                let dtype = DType::from_code(buf.dtype).ok_or_else(|| bad("dtype", buf.dtype))?;
                let op = ReduceOp::from_code(op).ok_or_else(|| bad("reduce op", op))?;
                Ok(self.inner.native_allreduce(&mut buf.bytes, dtype, op, deadline(timeout_ns))?)
            })
        }
    }

    pub fn optimizer(plugin: &'static str, inner: Box<dyn Optimizer>) -> OptimizerBox {
        OptimizerAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
    }

    pub fn data_partitioner(plugin: &'static str, inner: Box<dyn DataPartitioner>) -> DataPartitionerBox {
        DataPartitionerAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
    }

    pub fn model_partitioner(plugin: &'static str, inner: Box<dyn ModelPartitioner>) -> ModelPartitionerBox {
        ModelPartitionerAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
    }

    pub fn link(plugin: &'static str, inner: Box<dyn Link>) -> LinkBox {
        LinkAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
    }
}

/// Host side: ABI objects into core trait objects.
pub mod from_abi {
    use std::ops::Range;

    use abi_stable::std_types::{RSlice, RSliceMut, RStr};
    use sheaf_core::{
        CommError, DType, DataPartitioner, Deadline, Error, Link, ModelPartitioner, OptimState, Optimizer,
        Param, ReduceOp, Result, Tag,
    };

    use super::{state_from_abi, state_to_abi};
    use crate::{AbiBuf, AbiParam, DataPartitionerBox, LinkBox, ModelPartitionerBox, OptimizerBox};

    fn timeout_ns(d: Deadline) -> u64 {
        d.remaining().as_nanos().min(u128::from(u64::MAX)) as u64
    }

    struct LoadedOptimizer {
        inner: OptimizerBox,
        lr: f64,
    }

    impl Optimizer for LoadedOptimizer {
        fn step(&mut self, params: &mut [Param<'_>]) -> Result<()> {
            let mut abi: Vec<AbiParam<'_>> = params
                .iter_mut()
                .map(|p| AbiParam {
                    name: RStr::from_str(p.name),
                    value: RSliceMut::from_mut_slice(&mut *p.value),
                    grad: RSlice::from_slice(p.grad),
                })
                .collect();
            self.inner.step(RSliceMut::from_mut_slice(&mut abi)).into_result().map_err(Error::from)
        }
        fn learning_rate(&self) -> f64 {
            self.lr
        }
        fn set_learning_rate(&mut self, lr: f64) {
            // A panic here is reported by the next step, which sees the plugin's state.
            if self.inner.set_learning_rate(lr).is_ok() {
                self.lr = lr;
            }
        }
        fn state(&self) -> OptimState {
            self.inner.state().into_result().map(|s| state_from_abi(&s)).unwrap_or_default()
        }
        fn load_state(&mut self, state: &OptimState) -> Result<()> {
            self.inner.load_state(&state_to_abi(state.clone())).into_result().map_err(Error::from)
        }
    }

    struct LoadedDataPartitioner(DataPartitionerBox);

    impl DataPartitioner for LoadedDataPartitioner {
        fn shard(&self, epoch: u64, num_samples: usize, rank: usize, world: usize) -> Result<Vec<usize>> {
            let v = self.0.shard(epoch, num_samples as u64, rank as u64, world as u64).into_result()?;
            Ok(v.into_iter().map(|i| i as usize).collect())
        }
    }

    struct LoadedModelPartitioner(ModelPartitionerBox);

    impl ModelPartitioner for LoadedModelPartitioner {
        fn cut(&self, layer_costs: &[u64], stages: usize) -> Result<Vec<Range<usize>>> {
            let v = self.0.cut(RSlice::from_slice(layer_costs), stages as u64).into_result()?;
            Ok(v.into_iter().map(|r| r.start as usize..r.end as usize).collect())
        }
    }

    struct LoadedLink {
        inner: LinkBox,
        rank: usize,
        world: usize,
    }

    impl Link for LoadedLink {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world
        }
        fn send(&self, peer: usize, tag: Tag, data: &[u8], deadline: Deadline) -> Result<(), CommError> {
            self.inner
                .send(peer as u64, tag.0, RSlice::from_slice(data), timeout_ns(deadline))
                .into_result()
                .map_err(|e| e.into_comm())
        }
        fn recv(&self, peer: usize, tag: Tag, deadline: Deadline) -> Result<Vec<u8>, CommError> {
            self.inner
                .recv(peer as u64, tag.0, timeout_ns(deadline))
                .into_result()
                .map(|v| v.into_vec())
                .map_err(|e| e.into_comm())
        }
        fn abort(&self, culprit: usize, reason: &str) {
            let _ = self.inner.abort(culprit as u64, RStr::from_str(reason));
        }
        fn failure_reports(&self) -> Vec<(usize, usize)> {
            self.inner
                .failure_reports()
                .into_result()
                .map(|v| v.into_iter().map(|r| (r.start as usize, r.end as usize)).collect())
                .unwrap_or_default()
        }
        fn close(&self, deadline: Deadline) -> Result<(), CommError> {
            self.inner.close(timeout_ns(deadline)).into_result().map_err(|e| e.into_comm())
        }
        fn native_allreduce(
            &self,
            buf: &mut [u8],
            dtype: DType,
            op: ReduceOp,
            deadline: Deadline,
        ) -> Result<(), CommError> {
            let buf = AbiBuf { bytes: RSliceMut::from_mut_slice(buf), dtype: dtype.code() };
            self.inner
                .native_allreduce(buf, op.code(), timeout_ns(deadline))
                .into_result()
                .map_err(|e| e.into_comm())
        }
    }

    /// An optimizer loaded from a plugin. Fails if the plugin cannot even report its
    /// learning rate.
    pub fn optimizer(inner: OptimizerBox) -> Result<Box<dyn Optimizer>> {
        let lr = inner.learning_rate().into_result()?;
        Ok(Box::new(LoadedOptimizer { inner, lr }))
    }

    pub fn data_partitioner(inner: DataPartitionerBox) -> Box<dyn DataPartitioner> {
        Box::new(LoadedDataPartitioner(inner))
    }

    pub fn model_partitioner(inner: ModelPartitionerBox) -> Box<dyn ModelPartitioner> {
        Box::new(LoadedModelPartitioner(inner))
    }

    /// A link loaded from a plugin; asks it once for its rank and world size.
    pub fn link(inner: LinkBox) -> Result<Box<dyn Link>> {
        let rank = inner.rank().into_result()? as usize;
        let world = inner.world_size().into_result()? as usize;
        Ok(Box::new(LoadedLink { inner, rank, world }))
    }
}
