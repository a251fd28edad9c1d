//! Adapters between the two layers. [`to_abi`] wraps core trait objects (owned, or
//! borrowed for one call) as ABI objects, running every call inside `catch_unwind`;
//! [`from_abi`] wraps ABI objects back into core traits. Plugins export through
//! `to_abi` and the host lends its communicator, model, optimizer, partitioner and
//! metrics sink to strategy plugins through it too, so a panic on either side of the
//! boundary becomes an error.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use abi_stable::std_types::{RResult, RString, RVec};
use sheaf_core::{
    Block, Deadline, Error, ModelInfo, ModelInput, ModelSpec, OptimState, ParamLayout, ParamSpec, Piece,
    PieceLayout, Result, Samples, ShardSource, StepMetrics, TrainSummary,
};

use crate::traits::{
    AbiBlock, AbiModelInfo, AbiModelSpec, AbiParamSpec, AbiPiece, AbiPieceLayout, AbiSamples, AbiShardSource,
    AbiStepMetrics, AbiSummary, BATCH_ROWS, BATCH_TOKENS,
};
use crate::AbiRange;
use crate::{AbiError, AbiOptimState};

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

fn deadline(timeout_ns: u64) -> Deadline {
    Deadline::after(Duration::from_nanos(timeout_ns))
}

fn timeout_ns(d: Deadline) -> u64 {
    d.remaining().as_nanos().min(u128::from(u64::MAX)) as u64
}

fn state_to_abi(s: OptimState) -> AbiOptimState {
    let (names, buffers): (Vec<_>, Vec<_>) =
        s.buffers.into_iter().map(|(n, b)| (RString::from(n), RVec::from(b))).unzip();
    AbiOptimState { step: s.step, names: names.into(), buffers: buffers.into() }
}

fn state_from_abi(s: &AbiOptimState) -> OptimState {
    OptimState {
        step: s.step,
        buffers: s.names.iter().zip(s.buffers.iter()).map(|(n, b)| (n.to_string(), b.to_vec())).collect(),
    }
}

fn layout_to_abi(l: &ParamLayout) -> RVec<AbiParamSpec> {
    l.specs()
        .iter()
        .map(|s| AbiParamSpec {
            name: s.name.as_str().into(),
            shape: s.shape.iter().map(|&d| d as u64).collect(),
        })
        .collect()
}

fn layout_from_abi(l: &[AbiParamSpec]) -> ParamLayout {
    ParamLayout::new(
        l.iter()
            .map(|s| ParamSpec {
                name: s.name.to_string(),
                shape: s.shape.iter().map(|&d| d as usize).collect(),
            })
            .collect(),
    )
}

fn piece_to_abi(p: &Piece) -> AbiPiece {
    AbiPiece {
        start: p.blocks.start as u64,
        end: p.blocks.end as u64,
        tensor_rank: p.tensor_rank as u64,
        tensor_width: p.tensor_width as u64,
    }
}

fn usize_of(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::invalid(format!("{what} {v} too large")))
}

fn piece_from_abi(p: &AbiPiece) -> Result<Piece> {
    Ok(Piece {
        blocks: usize_of(p.start, "piece start")?..usize_of(p.end, "piece end")?,
        tensor_rank: usize_of(p.tensor_rank, "tensor rank")?,
        tensor_width: usize_of(p.tensor_width, "tensor width")?,
    })
}

fn spec_to_abi(s: &ModelSpec) -> AbiModelSpec {
    AbiModelSpec {
        kind: s.kind.as_str().into(),
        config: s.config.as_str().into(),
        vocab_size: s.vocab_size.map_or(u64::MAX, |v| v as u64),
    }
}

fn spec_from_abi(s: &AbiModelSpec) -> Result<ModelSpec> {
    Ok(ModelSpec {
        kind: s.kind.to_string(),
        config: s.config.to_string(),
        vocab_size: if s.vocab_size == u64::MAX { None } else { Some(usize_of(s.vocab_size, "vocab_size")?) },
    })
}

fn info_to_abi(i: &ModelInfo) -> AbiModelInfo {
    let (input_kind, a, b) = match i.input {
        ModelInput::Rows { features, classes } => (BATCH_ROWS, features, classes),
        ModelInput::Tokens { vocab_size, block_size } => (BATCH_TOKENS, vocab_size, block_size),
    };
    AbiModelInfo {
        layout: layout_to_abi(&i.layout),
        blocks: i
            .blocks
            .iter()
            .map(|b| AbiBlock { name: b.name.as_str().into(), params: b.params })
            .collect(),
        input_kind,
        input_a: a as u64,
        input_b: b as u64,
    }
}

fn info_from_abi(i: &AbiModelInfo) -> Result<ModelInfo> {
    let (a, b) = (usize_of(i.input_a, "model input")?, usize_of(i.input_b, "model input")?);
    let input = match i.input_kind {
        BATCH_ROWS => ModelInput::Rows { features: a, classes: b },
        BATCH_TOKENS => ModelInput::Tokens { vocab_size: a, block_size: b },
        other => return Err(Error::invalid(format!("unknown model input kind {other}"))),
    };
    Ok(ModelInfo {
        layout: layout_from_abi(&i.layout),
        blocks: i.blocks.iter().map(|b| Block { name: b.name.to_string(), params: b.params }).collect(),
        input,
    })
}

fn piece_layout_to_abi(p: &PieceLayout) -> AbiPieceLayout {
    AbiPieceLayout {
        layout: layout_to_abi(&p.layout),
        sources: p
            .sources
            .iter()
            .map(|s| AbiShardSource {
                param: s.param as u64,
                by_columns: s.by_columns,
                ranges: s
                    .ranges
                    .iter()
                    .map(|r| AbiRange { start: r.start as u64, end: r.end as u64 })
                    .collect(),
            })
            .collect(),
        activation_bytes_per_sample: p.activation_bytes_per_sample,
    }
}

fn piece_layout_from_abi(p: &AbiPieceLayout) -> Result<PieceLayout> {
    let sources = p
        .sources
        .iter()
        .map(|s| {
            let ranges = s
                .ranges
                .iter()
                .map(|r| Ok(usize_of(r.start, "range start")?..usize_of(r.end, "range end")?))
                .collect::<Result<Vec<_>>>()?;
            Ok(ShardSource { param: usize_of(s.param, "parameter index")?, by_columns: s.by_columns, ranges })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PieceLayout {
        layout: layout_from_abi(&p.layout),
        sources,
        activation_bytes_per_sample: p.activation_bytes_per_sample,
    })
}

fn samples_to_abi(s: Samples) -> AbiSamples {
    match s {
        Samples::Rows { inputs, labels, input_dim } => AbiSamples {
            kind: BATCH_ROWS,
            inputs: inputs.into(),
            labels: labels.into(),
            width: input_dim as u64,
        },
        Samples::Tokens { windows, window } => AbiSamples {
            kind: BATCH_TOKENS,
            inputs: RVec::new(),
            labels: windows.into(),
            width: window as u64,
        },
    }
}

fn samples_from_abi(s: AbiSamples) -> Result<Samples> {
    let width = usize_of(s.width, "sample width")?;
    match s.kind {
        BATCH_ROWS => {
            Ok(Samples::Rows { inputs: s.inputs.into_vec(), labels: s.labels.into_vec(), input_dim: width })
        }
        BATCH_TOKENS => Ok(Samples::Tokens { windows: s.labels.into_vec(), window: width }),
        other => Err(Error::invalid(format!("unknown sample kind {other}"))),
    }
}

fn nan_none(v: f64) -> Option<f64> {
    (!v.is_nan()).then_some(v)
}

fn metrics_to_abi(m: &StepMetrics) -> AbiStepMetrics {
    AbiStepMetrics {
        step: m.step,
        epoch: m.epoch,
        loss: m.loss,
        lr: m.lr,
        samples_per_sec: m.samples_per_sec,
        grad_norm: m.grad_norm,
        val_loss: m.val_loss.unwrap_or(f64::NAN),
    }
}

fn metrics_from_abi(m: &AbiStepMetrics) -> StepMetrics {
    StepMetrics {
        step: m.step,
        epoch: m.epoch,
        loss: m.loss,
        lr: m.lr,
        samples_per_sec: m.samples_per_sec,
        grad_norm: m.grad_norm,
        val_loss: nan_none(m.val_loss),
    }
}

fn summary_to_abi(s: &TrainSummary) -> AbiSummary {
    AbiSummary {
        epochs: s.epochs,
        steps: s.steps,
        final_loss: s.final_loss,
        test_accuracy: s.test_accuracy,
        test_loss: s.test_loss,
        samples_per_sec: s.samples_per_sec,
        wall_seconds: s.wall_seconds,
        peak_activation_bytes: s.peak_activation_bytes,
        busy_seconds: s.busy_seconds,
        idle_seconds: s.idle_seconds,
    }
}

fn summary_from_abi(s: &AbiSummary) -> TrainSummary {
    TrainSummary {
        epochs: s.epochs,
        steps: s.steps,
        final_loss: s.final_loss,
        test_accuracy: s.test_accuracy,
        test_loss: s.test_loss,
        samples_per_sec: s.samples_per_sec,
        wall_seconds: s.wall_seconds,
        peak_activation_bytes: s.peak_activation_bytes,
        busy_seconds: s.busy_seconds,
        idle_seconds: s.idle_seconds,
    }
}

/// Core objects into ABI objects.
pub mod to_abi {
    use std::ops::{Deref, DerefMut};

    use abi_stable::sabi_trait::TD_Opaque;
    use abi_stable::std_types::{ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec};
    use sheaf_core::{
        Batch, Communicator, ComputeBackend, DType, DataPartitioner, Dataset, Link, MetricsSink, Model,
        ModelPartitioner, Optimizer, Param, ReduceOp, Strategy, Tag, TrainConfig, TrainContext,
    };

    use super::*;
    use crate::traits::*;
    use crate::{AbiParam, AbiRange};

    /// A core object (behind any pointer: a `Box`, a `&`, a `&mut`) exported by
    /// `plugin`. Every ABI method it implements catches panics.
    pub struct Exported<P> {
        plugin: &'static str,
        inner: P,
    }

    impl<P> Exported<P> {
        pub fn new(plugin: &'static str, inner: P) -> Exported<P> {
            Exported { plugin, inner }
        }
    }

    fn usize_arg(v: u64, what: &str) -> Result<usize, AbiError> {
        usize::try_from(v).map_err(|_| sheaf_core::Error::invalid(format!("{what} {v} too large")).into())
    }

    fn dtype_op(dtype: u8, op: u8, which: sheaf_core::Op) -> Result<(DType, ReduceOp), AbiError> {
        let bad = |what: &str, code: u8| {
            AbiError::from(sheaf_core::CommError::InvalidArgument {
                op: which,
                detail: format!("unknown {what} code {code}"),
            })
        };
        Ok((
            DType::from_code(dtype).ok_or_else(|| bad("dtype", dtype))?,
            ReduceOp::from_code(op).ok_or_else(|| bad("reduce op", op))?,
        ))
    }

    pub(crate) fn batch_from_abi<'a>(b: &AbiBatch<'a>) -> Result<Batch<'a>> {
        let width = usize_of(b.width, "batch width")?;
        match b.kind {
            BATCH_ROWS => {
                Ok(Batch::Rows { inputs: b.inputs.as_slice(), labels: b.labels.as_slice(), input_dim: width })
            }
            BATCH_TOKENS => Ok(Batch::Tokens { windows: b.labels.as_slice(), window: width }),
            other => Err(sheaf_core::Error::invalid(format!("unknown batch kind {other}"))),
        }
    }

    pub(crate) fn batch_to_abi<'a>(b: &Batch<'a>) -> AbiBatch<'a> {
        match *b {
            Batch::Tokens { windows, window } => AbiBatch {
                kind: BATCH_TOKENS,
                inputs: RSlice::from_slice(&[]),
                labels: RSlice::from_slice(windows),
                width: window as u64,
            },
            Batch::Rows { inputs, labels, input_dim } => AbiBatch {
                kind: BATCH_ROWS,
                inputs: RSlice::from_slice(inputs),
                labels: RSlice::from_slice(labels),
                width: input_dim as u64,
            },
        }
    }

    impl<P, T> DatasetAbi for Exported<P>
    where
        P: Deref<Target = T> + Send + Sync,
        T: Dataset + ?Sized,
    {
        fn len(&self) -> RResult<u64, AbiError> {
            guard(self.plugin, "dataset len", || Ok(self.inner.len() as u64))
        }
        fn gather(&self, indices: RSlice<'_, u64>) -> RResult<AbiSamples, AbiError> {
            guard(self.plugin, "dataset gather", || {
                let idx =
                    indices.iter().map(|&i| usize_arg(i, "sample index")).collect::<Result<Vec<_>, _>>()?;
                Ok(samples_to_abi(self.inner.gather(&idx)?))
            })
        }
    }

    impl<P, T> OptimizerAbi for Exported<P>
    where
        P: DerefMut<Target = T> + Send,
        T: Optimizer + ?Sized,
    {
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
            guard(self.plugin, "optimizer state", || Ok(state_to_abi(self.inner.state()?)))
        }
        fn load_state(&mut self, state: &AbiOptimState) -> RResult<(), AbiError> {
            guard(self.plugin, "optimizer load_state", || {
                Ok(self.inner.load_state(&state_from_abi(state))?)
            })
        }
    }

    impl<P, T> DataPartitionerAbi for Exported<P>
    where
        P: Deref<Target = T> + Send + Sync,
        T: DataPartitioner + ?Sized,
    {
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

    impl<P, T> ModelPartitionerAbi for Exported<P>
    where
        P: Deref<Target = T> + Send + Sync,
        T: ModelPartitioner + ?Sized,
    {
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

    impl<P, T> LinkAbi for Exported<P>
    where
        P: Deref<Target = T> + Send + Sync,
        T: Link + ?Sized,
    {
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
        fn failure_reports(&self) -> RResult<RVec<AbiRange>, AbiError> {
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
                let (dtype, op) = dtype_op(buf.dtype, op, sheaf_core::Op::Allreduce)?;
                Ok(self.inner.native_allreduce(&mut buf.bytes, dtype, op, deadline(timeout_ns))?)
            })
        }
        fn recv_into(
            &self,
            peer: u64,
            tag: u64,
            mut dst: AbiBuf<'_>,
            op: u8,
            timeout_ns: u64,
        ) -> RResult<(), AbiError> {
            guard(self.plugin, "link recv_into", || {
                let reduce = match op {
                    RECV_COPY => None,
                    op => Some(dtype_op(dst.dtype, op, sheaf_core::Op::Recv)?),
                };
                let peer = usize_arg(peer, "peer")?;
                Ok(self.inner.recv_into(peer, Tag(tag), &mut dst.bytes, reduce, deadline(timeout_ns))?)
            })
        }
    }

    impl<P, T> CommunicatorAbi for Exported<P>
    where
        P: Deref<Target = T> + Send + Sync,
        T: Communicator + ?Sized,
    {
        fn rank(&self) -> RResult<u64, AbiError> {
            guard(self.plugin, "communicator rank", || Ok(self.inner.rank() as u64))
        }
        fn world_size(&self) -> RResult<u64, AbiError> {
            guard(self.plugin, "communicator world_size", || Ok(self.inner.world_size() as u64))
        }
        fn send(&self, peer: u64, tag: u32, data: RSlice<'_, u8>, timeout_ns: u64) -> RResult<(), AbiError> {
            guard(self.plugin, "communicator send", || {
                Ok(self.inner.send(usize_arg(peer, "peer")?, tag, &data, deadline(timeout_ns))?)
            })
        }
        fn recv(&self, peer: u64, tag: u32, timeout_ns: u64) -> RResult<RVec<u8>, AbiError> {
            guard(self.plugin, "communicator recv", || {
                Ok(self.inner.recv(usize_arg(peer, "peer")?, tag, deadline(timeout_ns))?.into())
            })
        }
        fn allreduce(&self, mut buf: AbiBuf<'_>, op: u8, timeout_ns: u64) -> RResult<(), AbiError> {
            guard(self.plugin, "communicator allreduce", || {
                let (dtype, op) = dtype_op(buf.dtype, op, sheaf_core::Op::Allreduce)?;
                Ok(self.inner.allreduce(&mut buf.bytes, dtype, op, deadline(timeout_ns))?)
            })
        }
        fn broadcast(&self, mut buf: RSliceMut<'_, u8>, root: u64, timeout_ns: u64) -> RResult<(), AbiError> {
            guard(self.plugin, "communicator broadcast", || {
                Ok(self.inner.broadcast(&mut buf, usize_arg(root, "root")?, deadline(timeout_ns))?)
            })
        }
        fn allgather(
            &self,
            input: RSlice<'_, u8>,
            mut output: RSliceMut<'_, u8>,
            timeout_ns: u64,
        ) -> RResult<(), AbiError> {
            guard(self.plugin, "communicator allgather", || {
                Ok(self.inner.allgather(&input, &mut output, deadline(timeout_ns))?)
            })
        }
        fn reduce_scatter(
            &self,
            input: RSlice<'_, u8>,
            mut output: AbiBuf<'_>,
            op: u8,
            timeout_ns: u64,
        ) -> RResult<(), AbiError> {
            guard(self.plugin, "communicator reduce_scatter", || {
                let (dtype, op) = dtype_op(output.dtype, op, sheaf_core::Op::ReduceScatter)?;
                Ok(self.inner.reduce_scatter(&input, &mut output.bytes, dtype, op, deadline(timeout_ns))?)
            })
        }
        fn barrier(&self, timeout_ns: u64) -> RResult<(), AbiError> {
            guard(self.plugin, "communicator barrier", || Ok(self.inner.barrier(deadline(timeout_ns))?))
        }
        fn reduce(&self, mut buf: AbiBuf<'_>, op: u8, root: u64, timeout_ns: u64) -> RResult<(), AbiError> {
            guard(self.plugin, "communicator reduce", || {
                let (dtype, op) = dtype_op(buf.dtype, op, sheaf_core::Op::Reduce)?;
                Ok(self.inner.reduce(
                    &mut buf.bytes,
                    dtype,
                    op,
                    usize_arg(root, "root")?,
                    deadline(timeout_ns),
                )?)
            })
        }
        fn gather(
            &self,
            input: RSlice<'_, u8>,
            mut output: RSliceMut<'_, u8>,
            root: u64,
            timeout_ns: u64,
        ) -> RResult<(), AbiError> {
            guard(self.plugin, "communicator gather", || {
                Ok(self.inner.gather(&input, &mut output, usize_arg(root, "root")?, deadline(timeout_ns))?)
            })
        }
        fn scatter(
            &self,
            input: RSlice<'_, u8>,
            mut output: RSliceMut<'_, u8>,
            root: u64,
            timeout_ns: u64,
        ) -> RResult<(), AbiError> {
            guard(self.plugin, "communicator scatter", || {
                Ok(self.inner.scatter(&input, &mut output, usize_arg(root, "root")?, deadline(timeout_ns))?)
            })
        }
        fn all_to_all(
            &self,
            input: RSlice<'_, u8>,
            mut output: RSliceMut<'_, u8>,
            timeout_ns: u64,
        ) -> RResult<(), AbiError> {
            guard(self.plugin, "communicator all_to_all", || {
                Ok(self.inner.all_to_all(&input, &mut output, deadline(timeout_ns))?)
            })
        }
        fn split(
            &self,
            color: ROption<u32>,
            key: u32,
            timeout_ns: u64,
        ) -> RResult<ROption<CommunicatorBox>, AbiError> {
            let plugin = self.plugin;
            guard(plugin, "communicator split", || {
                let sub = self.inner.split(color.into_option(), key, deadline(timeout_ns))?;
                Ok(sub.map(|s| communicator(plugin, s)).into())
            })
        }
    }

    impl<P, T> ModelAbi for Exported<P>
    where
        P: DerefMut<Target = T> + Send,
        T: Model + ?Sized,
    {
        fn layout(&self) -> RResult<RVec<AbiParamSpec>, AbiError> {
            guard(self.plugin, "model layout", || Ok(layout_to_abi(self.inner.layout())))
        }
        fn read_params(&self, mut out: RSliceMut<'_, f32>) -> RResult<(), AbiError> {
            guard(self.plugin, "model read_params", || Ok(self.inner.read_params(&mut out)?))
        }
        fn write_params(&mut self, src: RSlice<'_, f32>) -> RResult<(), AbiError> {
            guard(self.plugin, "model write_params", || Ok(self.inner.write_params(&src)?))
        }
        fn forward_backward(
            &mut self,
            batch: AbiBatch<'_>,
            mut grads: RSliceMut<'_, f32>,
        ) -> RResult<f32, AbiError> {
            guard(self.plugin, "model forward_backward", || {
                Ok(self.inner.forward_backward(&batch_from_abi(&batch)?, &mut grads)?)
            })
        }
        fn evaluate(&mut self, batch: AbiBatch<'_>) -> RResult<AbiEval, AbiError> {
            guard(self.plugin, "model evaluate", || {
                let (loss_sum, correct) = self.inner.evaluate(&batch_from_abi(&batch)?)?;
                Ok(AbiEval { loss_sum, correct: correct as u64 })
            })
        }
        fn piece(&self) -> RResult<ROption<AbiPiece>, AbiError> {
            guard(self.plugin, "model piece", || Ok(self.inner.piece().as_ref().map(piece_to_abi).into()))
        }
        fn segments(&self) -> RResult<u64, AbiError> {
            guard(self.plugin, "model segments", || Ok(self.inner.segments() as u64))
        }
        fn stage_forward(
            &mut self,
            micro: u64,
            segment: u64,
            input: RSlice<'_, f32>,
            rows: u64,
        ) -> RResult<RVec<f32>, AbiError> {
            guard(self.plugin, "model stage_forward", || {
                let (segment, rows) = (usize_arg(segment, "segment")?, usize_arg(rows, "rows")?);
                Ok(self.inner.stage_forward(micro, segment, &input, rows)?.into())
            })
        }
        fn stage_backward(
            &mut self,
            micro: u64,
            segment: u64,
            grad_output: RSlice<'_, f32>,
        ) -> RResult<RVec<f32>, AbiError> {
            guard(self.plugin, "model stage_backward", || {
                Ok(self.inner.stage_backward(micro, usize_arg(segment, "segment")?, &grad_output)?.into())
            })
        }
        fn loss_grad(
            &mut self,
            logits: RSlice<'_, f32>,
            labels: RSlice<'_, u32>,
            scale: f32,
        ) -> RResult<AbiLossGrad, AbiError> {
            guard(self.plugin, "model loss_grad", || {
                let (loss_sum, correct, grad) = self.inner.loss_grad(&logits, &labels, scale)?;
                Ok(AbiLossGrad { loss_sum, correct: correct as u64, grad: grad.into() })
            })
        }
        fn take_grads(&mut self, mut out: RSliceMut<'_, f32>) -> RResult<(), AbiError> {
            guard(self.plugin, "model take_grads", || Ok(self.inner.take_grads(&mut out)?))
        }
        fn drop_saved(&mut self) -> RResult<(), AbiError> {
            guard(self.plugin, "model drop_saved", || {
                self.inner.drop_saved();
                Ok(())
            })
        }
        fn saved_bytes(&self) -> RResult<u64, AbiError> {
            guard(self.plugin, "model saved_bytes", || Ok(self.inner.saved_bytes()))
        }
        fn predict(&mut self, batch: AbiBatch<'_>) -> RResult<RVec<f32>, AbiError> {
            guard(self.plugin, "model predict", || Ok(self.inner.predict(&batch_from_abi(&batch)?)?.into()))
        }
        fn stage_forward_batch(
            &mut self,
            micro: u64,
            segment: u64,
            batch: AbiBatch<'_>,
        ) -> RResult<RVec<f32>, AbiError> {
            guard(self.plugin, "model stage_forward_batch", || {
                let segment = usize_arg(segment, "segment")?;
                Ok(self.inner.stage_forward_batch(micro, segment, &batch_from_abi(&batch)?)?.into())
            })
        }
        fn replicated_params(&self) -> RResult<RVec<u8>, AbiError> {
            guard(self.plugin, "model replicated_params", || {
                Ok(self.inner.replicated_params().into_iter().map(u8::from).collect())
            })
        }
        fn tied_params(&self) -> RResult<RVec<AbiRange>, AbiError> {
            guard(self.plugin, "model tied_params", || {
                Ok(self
                    .inner
                    .tied_params()
                    .into_iter()
                    .map(|(p, w)| AbiRange { start: p as u64, end: w as u64 })
                    .collect())
            })
        }
    }

    impl<P, T> ComputeAbi for Exported<P>
    where
        P: Deref<Target = T> + Send + Sync,
        T: ComputeBackend + ?Sized,
    {
        fn device(&self) -> RResult<RString, AbiError> {
            guard(self.plugin, "compute device", || Ok(self.inner.device().into()))
        }
        fn build_model(&self, spec: AbiModelSpec, seed: u64) -> RResult<ModelBox, AbiError> {
            let plugin = self.plugin;
            guard(plugin, "compute build_model", || {
                Ok(model(plugin, self.inner.build_model(&spec_from_abi(&spec)?, seed)?))
            })
        }
        fn build_piece(&self, spec: AbiModelSpec, piece: AbiPiece, seed: u64) -> RResult<ModelBox, AbiError> {
            let plugin = self.plugin;
            guard(plugin, "compute build_piece", || {
                let piece = piece_from_abi(&piece)?;
                Ok(model(plugin, self.inner.build_piece(&spec_from_abi(&spec)?, &piece, seed)?))
            })
        }
        fn model_kinds(&self) -> RResult<RVec<RString>, AbiError> {
            guard(self.plugin, "compute model_kinds", || {
                Ok(self.inner.model_kinds().into_iter().map(RString::from).collect())
            })
        }
        fn describe(&self, spec: AbiModelSpec) -> RResult<AbiModelInfo, AbiError> {
            guard(self.plugin, "compute describe", || {
                Ok(info_to_abi(&self.inner.describe(&spec_from_abi(&spec)?)?))
            })
        }
        fn piece_layout(&self, spec: AbiModelSpec, piece: AbiPiece) -> RResult<AbiPieceLayout, AbiError> {
            guard(self.plugin, "compute piece_layout", || {
                let piece = piece_from_abi(&piece)?;
                Ok(piece_layout_to_abi(&self.inner.piece_layout(&spec_from_abi(&spec)?, &piece)?))
            })
        }
    }

    impl<P, T> MetricsSinkAbi for Exported<P>
    where
        P: DerefMut<Target = T>,
        T: MetricsSink + ?Sized,
    {
        fn record(&mut self, metrics: AbiStepMetrics) -> RResult<(), AbiError> {
            guard(self.plugin, "metrics record", || {
                self.inner.record(&metrics_from_abi(&metrics));
                Ok(())
            })
        }
    }

    impl<P, T> StrategyAbi for Exported<P>
    where
        P: DerefMut<Target = T> + Send,
        T: Strategy + ?Sized,
    {
        fn name(&self) -> RResult<RString, AbiError> {
            guard(self.plugin, "strategy name", || Ok(self.inner.name().into()))
        }
        fn train(&mut self, ctx: AbiTrainContext<'_>) -> RResult<AbiSummary, AbiError> {
            let plugin = self.plugin;
            let inner = &mut self.inner;
            guard(plugin, "strategy train", || {
                super::from_abi::train_context(ctx, |core| inner.train(core).map(|s| summary_to_abi(&s)))
                    .map_err(AbiError::from)
            })
        }
        fn plan(&self, input: AbiPlanInput<'_>) -> RResult<AbiStrategyPlan, AbiError> {
            guard(self.plugin, "strategy plan", || {
                let plan = super::from_abi::plan_input(input, |core| self.inner.plan(core))?;
                Ok(AbiStrategyPlan {
                    pieces: plan.ranks.iter().map(|r| piece_to_abi(&r.piece)).collect(),
                    activation_samples: plan.ranks.iter().map(|r| r.activation_samples).collect(),
                    stage_interface: plan.stage_interface,
                })
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

    pub fn communicator(plugin: &'static str, inner: Box<dyn Communicator>) -> CommunicatorBox {
        CommunicatorAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
    }

    pub fn model(plugin: &'static str, inner: Box<dyn Model>) -> ModelBox {
        ModelAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
    }

    pub fn compute(plugin: &'static str, inner: Box<dyn ComputeBackend>) -> ComputeBox {
        ComputeAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
    }

    pub fn strategy(plugin: &'static str, inner: Box<dyn Strategy>) -> StrategyBox {
        StrategyAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
    }

    fn config_to_abi(c: &TrainConfig) -> AbiTrainConfig {
        AbiTrainConfig {
            seed: c.seed,
            epochs: c.epochs,
            batch_size: c.batch_size as u64,
            max_steps: c.max_steps.unwrap_or(u64::MAX),
            lr: c.lr.base,
            lr_cosine: c.lr.cosine,
            warmup_steps: c.lr.warmup_steps,
            min_lr: c.lr.min_lr,
            grad_clip: c.grad_clip.unwrap_or(f64::NAN),
            grad_accum: c.grad_accum as u64,
            eval_every: c.eval_every.unwrap_or(0),
        }
    }

    /// Lends `input` across the boundary for the duration of `f`: the host's side of
    /// a strategy plugin's `plan`.
    pub fn with_plan_input<R>(
        plugin: &'static str,
        input: &sheaf_core::PlanInput<'_>,
        f: impl FnOnce(AbiPlanInput<'_>) -> R,
    ) -> R {
        let blocks: Vec<AbiBlock> = input
            .blocks
            .iter()
            .map(|b| AbiBlock { name: b.name.as_str().into(), params: b.params })
            .collect();
        let partitioner = Exported { plugin, inner: input.partitioner };
        f(AbiPlanInput {
            world: input.world as u64,
            blocks: RSlice::from_slice(&blocks),
            costs: RSlice::from_slice(input.costs),
            batch_size: input.batch_size as u64,
            partitioner: ModelPartitionerAbi_TO::from_ptr(&partitioner, TD_Opaque),
        })
    }

    /// Lends the parts of `ctx` across the boundary for the duration of `f`: the
    /// host's side of a strategy plugin's `train`. Calls back into the host catch
    /// panics as `plugin` (the host's name).
    pub fn with_train_context<R>(
        plugin: &'static str,
        ctx: TrainContext<'_>,
        f: impl FnOnce(AbiTrainContext<'_>) -> R,
    ) -> R {
        let TrainContext { config, comm, model, optimizer, partitioner, train, test, metrics } = ctx;
        let comm = Exported { plugin, inner: comm };
        let mut model = Exported { plugin, inner: model };
        let mut optimizer = Exported { plugin, inner: optimizer };
        let partitioner = Exported { plugin, inner: partitioner };
        let (train, test) = (Exported { plugin, inner: train }, Exported { plugin, inner: test });
        let mut metrics = Exported { plugin, inner: metrics };
        f(AbiTrainContext {
            config: config_to_abi(&config),
            comm: CommunicatorAbi_TO::from_ptr(&comm, TD_Opaque),
            model: ModelAbi_TO::from_ptr(&mut model, TD_Opaque),
            optimizer: OptimizerAbi_TO::from_ptr(&mut optimizer, TD_Opaque),
            partitioner: DataPartitionerAbi_TO::from_ptr(&partitioner, TD_Opaque),
            train: DatasetAbi_TO::from_ptr(&train, TD_Opaque),
            test: DatasetAbi_TO::from_ptr(&test, TD_Opaque),
            metrics: MetricsSinkAbi_TO::from_ptr(&mut metrics, TD_Opaque),
        })
    }
}

/// ABI objects into core trait objects.
pub mod from_abi {
    use std::ops::Range;

    use abi_stable::pointer_trait::{AsMutPtr, AsPtr, GetPointerKind};
    use abi_stable::std_types::{ROption, RSlice, RSliceMut, RStr};
    use sheaf_core::{
        Batch, CommError, Communicator, ComputeBackend, DType, DataPartitioner, Dataset, Error, Link,
        LrSchedule, MetricsSink, Model, ModelInfo, ModelPartitioner, ModelSpec, OptimState, Optimizer, Param,
        ParamLayout, PieceLayout, PlanInput, RankPlan, ReduceOp, Result, Samples, StepMetrics, Strategy,
        StrategyPlan, Tag, TrainConfig, TrainContext, TrainSummary,
    };

    use super::to_abi::batch_to_abi;
    use super::*;
    use crate::traits::*;
    use crate::AbiParam;

    fn comm_err(e: AbiError) -> CommError {
        e.into_comm()
    }

    struct LoadedOptimizer<'a, P: GetPointerKind> {
        inner: OptimizerAbi_TO<'a, P>,
        lr: f64,
    }

    impl<P: AsMutPtr<PtrTarget = ()> + Send> Optimizer for LoadedOptimizer<'_, P> {
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
        fn state(&self) -> Result<OptimState> {
            Ok(state_from_abi(&self.inner.state().into_result()?))
        }
        fn load_state(&mut self, state: &OptimState) -> Result<()> {
            self.inner.load_state(&state_to_abi(state.clone())).into_result().map_err(Error::from)
        }
    }

    struct LoadedDataPartitioner<'a, P: GetPointerKind>(DataPartitionerAbi_TO<'a, P>);

    impl<P: AsPtr<PtrTarget = ()> + Send + Sync> DataPartitioner for LoadedDataPartitioner<'_, P> {
        fn shard(&self, epoch: u64, num_samples: usize, rank: usize, world: usize) -> Result<Vec<usize>> {
            let v = self.0.shard(epoch, num_samples as u64, rank as u64, world as u64).into_result()?;
            Ok(v.into_iter().map(|i| i as usize).collect())
        }
    }

    struct LoadedModelPartitioner<'a, P: GetPointerKind>(ModelPartitionerAbi_TO<'a, P>);

    impl<P: AsPtr<PtrTarget = ()> + Send + Sync> ModelPartitioner for LoadedModelPartitioner<'_, P> {
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
        fn send(&self, peer: usize, tag: Tag, data: &[u8], dl: Deadline) -> Result<(), CommError> {
            self.inner
                .send(peer as u64, tag.0, RSlice::from_slice(data), timeout_ns(dl))
                .into_result()
                .map_err(comm_err)
        }
        fn recv(&self, peer: usize, tag: Tag, dl: Deadline) -> Result<Vec<u8>, CommError> {
            self.inner
                .recv(peer as u64, tag.0, timeout_ns(dl))
                .into_result()
                .map(|v| v.into_vec())
                .map_err(comm_err)
        }
        fn abort(&self, culprit: usize, reason: &str) {
            if let Err(e) = self.inner.abort(culprit as u64, RStr::from_str(reason)).into_result() {
                tracing_free_warn("link abort", &Error::from(e));
            }
        }
        fn failure_reports(&self) -> Vec<(usize, usize)> {
            match self.inner.failure_reports().into_result() {
                Ok(v) => v.into_iter().map(|r| (r.start as usize, r.end as usize)).collect(),
                Err(e) => {
                    // Blame falls back to the waits' chain; the failure is reported.
                    tracing_free_warn("link failure_reports", &Error::from(e));
                    Vec::new()
                }
            }
        }
        fn close(&self, dl: Deadline) -> Result<(), CommError> {
            self.inner.close(timeout_ns(dl)).into_result().map_err(comm_err)
        }
        fn native_allreduce(
            &self,
            buf: &mut [u8],
            dtype: DType,
            op: ReduceOp,
            dl: Deadline,
        ) -> Result<(), CommError> {
            let buf = AbiBuf { bytes: RSliceMut::from_mut_slice(buf), dtype: dtype.code() };
            self.inner.native_allreduce(buf, op.code(), timeout_ns(dl)).into_result().map_err(comm_err)
        }
        fn recv_into(
            &self,
            peer: usize,
            tag: Tag,
            dst: &mut [u8],
            reduce: Option<(DType, ReduceOp)>,
            dl: Deadline,
        ) -> Result<(), CommError> {
            let (dtype, op) = reduce.map_or((DType::F32.code(), RECV_COPY), |(d, o)| (d.code(), o.code()));
            let dst = AbiBuf { bytes: RSliceMut::from_mut_slice(dst), dtype };
            self.inner.recv_into(peer as u64, tag.0, dst, op, timeout_ns(dl)).into_result().map_err(comm_err)
        }
    }

    struct LoadedCommunicator<'a, P: GetPointerKind> {
        inner: CommunicatorAbi_TO<'a, P>,
        rank: usize,
        world: usize,
    }

    impl<P: AsPtr<PtrTarget = ()> + Send + Sync> Communicator for LoadedCommunicator<'_, P> {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world
        }
        fn send(&self, peer: usize, tag: u32, data: &[u8], dl: Deadline) -> Result<(), CommError> {
            self.inner
                .send(peer as u64, tag, RSlice::from_slice(data), timeout_ns(dl))
                .into_result()
                .map_err(comm_err)
        }
        fn recv(&self, peer: usize, tag: u32, dl: Deadline) -> Result<Vec<u8>, CommError> {
            self.inner
                .recv(peer as u64, tag, timeout_ns(dl))
                .into_result()
                .map(|v| v.into_vec())
                .map_err(comm_err)
        }
        fn allreduce(
            &self,
            buf: &mut [u8],
            dtype: DType,
            op: ReduceOp,
            dl: Deadline,
        ) -> Result<(), CommError> {
            let buf = AbiBuf { bytes: RSliceMut::from_mut_slice(buf), dtype: dtype.code() };
            self.inner.allreduce(buf, op.code(), timeout_ns(dl)).into_result().map_err(comm_err)
        }
        fn broadcast(&self, buf: &mut [u8], root: usize, dl: Deadline) -> Result<(), CommError> {
            self.inner
                .broadcast(RSliceMut::from_mut_slice(buf), root as u64, timeout_ns(dl))
                .into_result()
                .map_err(comm_err)
        }
        fn allgather(&self, input: &[u8], output: &mut [u8], dl: Deadline) -> Result<(), CommError> {
            self.inner
                .allgather(RSlice::from_slice(input), RSliceMut::from_mut_slice(output), timeout_ns(dl))
                .into_result()
                .map_err(comm_err)
        }
        fn reduce_scatter(
            &self,
            input: &[u8],
            output: &mut [u8],
            dtype: DType,
            op: ReduceOp,
            dl: Deadline,
        ) -> Result<(), CommError> {
            let out = AbiBuf { bytes: RSliceMut::from_mut_slice(output), dtype: dtype.code() };
            self.inner
                .reduce_scatter(RSlice::from_slice(input), out, op.code(), timeout_ns(dl))
                .into_result()
                .map_err(comm_err)
        }
        fn barrier(&self, dl: Deadline) -> Result<(), CommError> {
            self.inner.barrier(timeout_ns(dl)).into_result().map_err(comm_err)
        }
        fn reduce(
            &self,
            buf: &mut [u8],
            dtype: DType,
            op: ReduceOp,
            root: usize,
            dl: Deadline,
        ) -> Result<(), CommError> {
            let buf = AbiBuf { bytes: RSliceMut::from_mut_slice(buf), dtype: dtype.code() };
            self.inner.reduce(buf, op.code(), root as u64, timeout_ns(dl)).into_result().map_err(comm_err)
        }
        fn gather(
            &self,
            input: &[u8],
            output: &mut [u8],
            root: usize,
            dl: Deadline,
        ) -> Result<(), CommError> {
            self.inner
                .gather(
                    RSlice::from_slice(input),
                    RSliceMut::from_mut_slice(output),
                    root as u64,
                    timeout_ns(dl),
                )
                .into_result()
                .map_err(comm_err)
        }
        fn scatter(
            &self,
            input: &[u8],
            output: &mut [u8],
            root: usize,
            dl: Deadline,
        ) -> Result<(), CommError> {
            self.inner
                .scatter(
                    RSlice::from_slice(input),
                    RSliceMut::from_mut_slice(output),
                    root as u64,
                    timeout_ns(dl),
                )
                .into_result()
                .map_err(comm_err)
        }
        fn all_to_all(&self, input: &[u8], output: &mut [u8], dl: Deadline) -> Result<(), CommError> {
            self.inner
                .all_to_all(RSlice::from_slice(input), RSliceMut::from_mut_slice(output), timeout_ns(dl))
                .into_result()
                .map_err(comm_err)
        }
        fn split(
            &self,
            color: Option<u32>,
            key: u32,
            dl: Deadline,
        ) -> Result<Option<Box<dyn Communicator>>, CommError> {
            let sub = self
                .inner
                .split(ROption::from(color), key, timeout_ns(dl))
                .into_result()
                .map_err(comm_err)?;
            match sub.into_option() {
                None => Ok(None),
                Some(b) => Ok(Some(communicator(b)?)),
            }
        }
    }

    struct LoadedModel<'a, P: GetPointerKind> {
        inner: ModelAbi_TO<'a, P>,
        layout: ParamLayout,
        piece: Option<Piece>,
        segments: usize,
        tied: Vec<(usize, usize)>,
        replicated: Vec<bool>,
    }

    impl<'a, P: AsPtr<PtrTarget = ()> + GetPointerKind> LoadedModel<'a, P> {
        fn new(inner: ModelAbi_TO<'a, P>) -> Result<LoadedModel<'a, P>> {
            let layout = layout_from_abi(&inner.layout().into_result()?);
            let piece = match inner.piece().into_result()?.into_option() {
                Some(p) => Some(piece_from_abi(&p)?),
                None => None,
            };
            let segments = usize_of(inner.segments().into_result()?, "segments")?;
            let tied = inner
                .tied_params()
                .into_result()?
                .iter()
                .map(|r| Ok((usize_of(r.start, "tied parameter")?, usize_of(r.end, "tied parameter")?)))
                .collect::<Result<Vec<_>>>()?;
            let replicated: Vec<bool> =
                inner.replicated_params().into_result()?.iter().map(|&f| f != 0).collect();
            if replicated.len() != layout.specs().len() {
                return Err(Error::invalid(format!(
                    "the model reports {} replicated flags for {} parameters",
                    replicated.len(),
                    layout.specs().len()
                )));
            }
            Ok(LoadedModel { inner, layout, piece, segments, tied, replicated })
        }
    }

    impl<P: AsMutPtr<PtrTarget = ()> + Send> Model for LoadedModel<'_, P> {
        fn layout(&self) -> &ParamLayout {
            &self.layout
        }
        fn read_params(&self, out: &mut [f32]) -> Result<()> {
            self.inner.read_params(RSliceMut::from_mut_slice(out)).into_result().map_err(Error::from)
        }
        fn write_params(&mut self, src: &[f32]) -> Result<()> {
            self.inner.write_params(RSlice::from_slice(src)).into_result().map_err(Error::from)
        }
        fn forward_backward(&mut self, batch: &Batch<'_>, grads: &mut [f32]) -> Result<f32> {
            self.inner
                .forward_backward(batch_to_abi(batch), RSliceMut::from_mut_slice(grads))
                .into_result()
                .map_err(Error::from)
        }
        fn evaluate(&mut self, batch: &Batch<'_>) -> Result<(f64, usize)> {
            let e = self.inner.evaluate(batch_to_abi(batch)).into_result()?;
            Ok((e.loss_sum, e.correct as usize))
        }
        fn piece(&self) -> Option<Piece> {
            self.piece.clone()
        }
        fn segments(&self) -> usize {
            self.segments
        }
        fn stage_forward(
            &mut self,
            micro: u64,
            segment: usize,
            input: &[f32],
            rows: usize,
        ) -> Result<Vec<f32>> {
            let out = self
                .inner
                .stage_forward(micro, segment as u64, RSlice::from_slice(input), rows as u64)
                .into_result()?;
            Ok(out.into_vec())
        }
        fn stage_backward(&mut self, micro: u64, segment: usize, grad_output: &[f32]) -> Result<Vec<f32>> {
            let out = self
                .inner
                .stage_backward(micro, segment as u64, RSlice::from_slice(grad_output))
                .into_result()?;
            Ok(out.into_vec())
        }
        fn loss_grad(
            &mut self,
            logits: &[f32],
            labels: &[u32],
            scale: f32,
        ) -> Result<(f64, usize, Vec<f32>)> {
            let r = self
                .inner
                .loss_grad(RSlice::from_slice(logits), RSlice::from_slice(labels), scale)
                .into_result()?;
            Ok((r.loss_sum, r.correct as usize, r.grad.into_vec()))
        }
        fn take_grads(&mut self, out: &mut [f32]) -> Result<()> {
            self.inner.take_grads(RSliceMut::from_mut_slice(out)).into_result().map_err(Error::from)
        }
        fn drop_saved(&mut self) {
            if let Err(e) = self.inner.drop_saved().into_result() {
                tracing_free_warn("model drop_saved", &Error::from(e));
            }
        }
        fn saved_bytes(&self) -> u64 {
            match self.inner.saved_bytes().into_result() {
                Ok(b) => b,
                Err(e) => {
                    tracing_free_warn("model saved_bytes", &Error::from(e));
                    0
                }
            }
        }
        fn predict(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
            Ok(self.inner.predict(batch_to_abi(batch)).into_result()?.into_vec())
        }
        fn stage_forward_batch(&mut self, micro: u64, segment: usize, batch: &Batch<'_>) -> Result<Vec<f32>> {
            let out =
                self.inner.stage_forward_batch(micro, segment as u64, batch_to_abi(batch)).into_result()?;
            Ok(out.into_vec())
        }
        fn tied_params(&self) -> Vec<(usize, usize)> {
            self.tied.clone()
        }
        fn replicated_params(&self) -> Vec<bool> {
            self.replicated.clone()
        }
    }

    struct LoadedDataset<'a, P: GetPointerKind>(DatasetAbi_TO<'a, P>, usize);

    impl<P: AsPtr<PtrTarget = ()> + Send + Sync> Dataset for LoadedDataset<'_, P> {
        fn len(&self) -> usize {
            self.1
        }
        fn gather(&self, indices: &[usize]) -> Result<Samples> {
            let idx: Vec<u64> = indices.iter().map(|&i| i as u64).collect();
            samples_from_abi(self.0.gather(RSlice::from_slice(&idx)).into_result()?)
        }
    }

    struct LoadedCompute {
        inner: ComputeBox,
        device: String,
        kinds: Vec<String>,
    }

    impl ComputeBackend for LoadedCompute {
        fn device(&self) -> &str {
            &self.device
        }
        fn build_model(&self, spec: &ModelSpec, seed: u64) -> Result<Box<dyn Model>> {
            model(self.inner.build_model(spec_to_abi(spec), seed).into_result()?)
        }
        fn build_piece(&self, spec: &ModelSpec, piece: &Piece, seed: u64) -> Result<Box<dyn Model>> {
            model(self.inner.build_piece(spec_to_abi(spec), piece_to_abi(piece), seed).into_result()?)
        }
        fn model_kinds(&self) -> Vec<String> {
            self.kinds.clone()
        }
        fn describe(&self, spec: &ModelSpec) -> Result<ModelInfo> {
            info_from_abi(&self.inner.describe(spec_to_abi(spec)).into_result()?)
        }
        fn piece_layout(&self, spec: &ModelSpec, piece: &Piece) -> Result<PieceLayout> {
            piece_layout_from_abi(
                &self.inner.piece_layout(spec_to_abi(spec), piece_to_abi(piece)).into_result()?,
            )
        }
    }

    struct LoadedMetrics<'a, P: GetPointerKind>(MetricsSinkAbi_TO<'a, P>);

    impl<P: AsMutPtr<PtrTarget = ()>> MetricsSink for LoadedMetrics<'_, P> {
        fn record(&mut self, metrics: &StepMetrics) {
            if let Err(e) = self.0.record(metrics_to_abi(metrics)).into_result() {
                tracing_free_warn("metrics sink", &Error::from(e));
            }
        }
    }

    /// The ABI crate logs nothing (no `tracing` dependency); a failure of a call whose
    /// core signature has no error (a metrics sink, `drop_saved`, `saved_bytes`) is
    /// reported on stderr, never dropped.
    fn tracing_free_warn(what: &str, e: &Error) {
        eprintln!("warning: {what} failed: {e}");
    }

    struct LoadedStrategy {
        inner: StrategyBox,
        name: String,
    }

    impl Strategy for LoadedStrategy {
        fn name(&self) -> &str {
            &self.name
        }
        fn train(&mut self, ctx: TrainContext<'_>) -> Result<TrainSummary> {
            let inner = &mut self.inner;
            super::to_abi::with_train_context("sheaf-host", ctx, |abi| inner.train(abi).into_result())
                .map(|s| summary_from_abi(&s))
                .map_err(Error::from)
        }
        fn plan(&self, input: &PlanInput<'_>) -> Result<StrategyPlan> {
            let plan = super::to_abi::with_plan_input("sheaf-host", input, |abi| {
                self.inner.plan(abi).into_result()
            })?;
            if plan.pieces.len() != plan.activation_samples.len() {
                return Err(Error::invalid(format!(
                    "strategy `{}` planned {} pieces but {} activation counts",
                    self.name,
                    plan.pieces.len(),
                    plan.activation_samples.len()
                )));
            }
            let ranks = plan
                .pieces
                .iter()
                .zip(plan.activation_samples.iter())
                .map(|(p, &a)| Ok(RankPlan { piece: piece_from_abi(p)?, activation_samples: a }))
                .collect::<Result<Vec<_>>>()?;
            Ok(StrategyPlan { ranks, stage_interface: plan.stage_interface })
        }
    }

    /// The plugin's side of `plan`: turns the lent ABI input back into a core
    /// [`PlanInput`] for the duration of `f`.
    pub fn plan_input<R>(input: AbiPlanInput<'_>, f: impl FnOnce(&PlanInput<'_>) -> Result<R>) -> Result<R> {
        let blocks: Vec<sheaf_core::Block> = input
            .blocks
            .iter()
            .map(|b| sheaf_core::Block { name: b.name.to_string(), params: b.params })
            .collect();
        let partitioner = LoadedModelPartitioner(input.partitioner);
        f(&PlanInput {
            world: usize_of(input.world, "world size")?,
            blocks: &blocks,
            costs: input.costs.as_slice(),
            batch_size: usize_of(input.batch_size, "batch size")?,
            partitioner: &partitioner,
        })
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

    pub fn communicator(inner: CommunicatorBox) -> Result<Box<dyn Communicator>, CommError> {
        let rank = inner.rank().into_result().map_err(comm_err)? as usize;
        let world = inner.world_size().into_result().map_err(comm_err)? as usize;
        Ok(Box::new(LoadedCommunicator { inner, rank, world }))
    }

    /// A model loaded from a plugin: its layout, piece and segments are asked for once,
    /// and a failure to answer is an error here rather than a default later.
    pub fn model(inner: ModelBox) -> Result<Box<dyn Model>> {
        Ok(Box::new(LoadedModel::new(inner)?))
    }

    pub fn compute(inner: ComputeBox) -> Result<Box<dyn ComputeBackend>> {
        let device = inner.device().into_result()?.into_string();
        let kinds = inner.model_kinds().into_result()?.into_iter().map(RString::into_string).collect();
        Ok(Box::new(LoadedCompute { inner, device, kinds }))
    }

    pub fn strategy(inner: StrategyBox) -> Result<Box<dyn Strategy>> {
        let name = inner.name().into_result()?.into_string();
        Ok(Box::new(LoadedStrategy { inner, name }))
    }

    /// The plugin's side of `train`: turns the lent ABI context back into a core
    /// [`TrainContext`] for the duration of `f`.
    pub fn train_context<R>(
        ctx: AbiTrainContext<'_>,
        f: impl FnOnce(TrainContext<'_>) -> Result<R>,
    ) -> Result<R> {
        let AbiTrainContext { config, comm, model, optimizer, partitioner, train, test, metrics } = ctx;
        let rank = comm.rank().into_result()? as usize;
        let world = comm.world_size().into_result()? as usize;
        let comm = LoadedCommunicator { inner: comm, rank, world };
        let mut model = LoadedModel::new(model)?;
        let train_len = usize_of(train.len().into_result()?, "training samples")?;
        let test_len = usize_of(test.len().into_result()?, "test samples")?;
        let (train, test) = (LoadedDataset(train, train_len), LoadedDataset(test, test_len));
        let lr = optimizer.learning_rate().into_result()?;
        let mut optimizer = LoadedOptimizer { inner: optimizer, lr };
        let partitioner = LoadedDataPartitioner(partitioner);
        let mut metrics = LoadedMetrics(metrics);
        f(TrainContext {
            config: TrainConfig {
                seed: config.seed,
                epochs: config.epochs,
                batch_size: usize_of(config.batch_size, "batch size")?,
                max_steps: (config.max_steps != u64::MAX).then_some(config.max_steps),
                lr: LrSchedule {
                    base: config.lr,
                    cosine: config.lr_cosine,
                    warmup_steps: config.warmup_steps,
                    min_lr: config.min_lr,
                },
                grad_clip: nan_none(config.grad_clip),
                grad_accum: usize_of(config.grad_accum, "grad_accum")?.max(1),
                eval_every: (config.eval_every > 0).then_some(config.eval_every),
            },
            comm: &comm,
            model: &mut model,
            optimizer: &mut optimizer,
            partitioner: &partitioner,
            train: &train,
            test: &test,
            metrics: &mut metrics,
        })
    }
}
