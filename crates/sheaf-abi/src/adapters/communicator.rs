//! Communicators: the host's collectives, lent to strategies.

use super::prelude::*;

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
    fn order_point_to_point(&self) -> RResult<bool, AbiError> {
        guard(self.plugin, "communicator order_point_to_point", || Ok(self.inner.order_point_to_point()?))
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
            Ok(sub.map(|s| export_communicator(plugin, s)).into())
        })
    }
}

pub fn export_communicator(plugin: &'static str, inner: Box<dyn Communicator>) -> CommunicatorBox {
    CommunicatorAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
}

pub(crate) struct LoadedCommunicator<'a, P: GetPointerKind> {
    pub(crate) inner: CommunicatorAbi_TO<'a, P>,
    pub(crate) rank: usize,
    pub(crate) world: usize,
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
    fn allreduce(&self, buf: &mut [u8], dtype: DType, op: ReduceOp, dl: Deadline) -> Result<(), CommError> {
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
    fn gather(&self, input: &[u8], output: &mut [u8], root: usize, dl: Deadline) -> Result<(), CommError> {
        self.inner
            .gather(RSlice::from_slice(input), RSliceMut::from_mut_slice(output), root as u64, timeout_ns(dl))
            .into_result()
            .map_err(comm_err)
    }
    fn scatter(&self, input: &[u8], output: &mut [u8], root: usize, dl: Deadline) -> Result<(), CommError> {
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
    fn order_point_to_point(&self) -> Result<bool, CommError> {
        self.inner.order_point_to_point().into_result().map_err(comm_err)
    }
    fn split(
        &self,
        color: Option<u32>,
        key: u32,
        dl: Deadline,
    ) -> Result<Option<Box<dyn Communicator>>, CommError> {
        let sub =
            self.inner.split(ROption::from(color), key, timeout_ns(dl)).into_result().map_err(comm_err)?;
        match sub.into_option() {
            None => Ok(None),
            Some(b) => Ok(Some(load_communicator(b)?)),
        }
    }
}

pub fn load_communicator(inner: CommunicatorBox) -> Result<Box<dyn Communicator>, CommError> {
    let rank = inner.rank().into_result().map_err(comm_err)? as usize;
    let world = inner.world_size().into_result().map_err(comm_err)? as usize;
    Ok(Box::new(LoadedCommunicator { inner, rank, world }))
}
