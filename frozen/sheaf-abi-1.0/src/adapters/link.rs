//! Transports' point-to-point links.

use super::prelude::*;

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

pub fn export_link(plugin: &'static str, inner: Box<dyn Link>) -> LinkBox {
    LinkAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
}

pub(crate) struct LoadedLink {
    pub(crate) inner: LinkBox,
    pub(crate) rank: usize,
    pub(crate) world: usize,
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

/// A link loaded from a plugin; asks it once for its rank and world size.
pub fn load_link(inner: LinkBox) -> Result<Box<dyn Link>> {
    let rank = inner.rank().into_result()? as usize;
    let world = inner.world_size().into_result()? as usize;
    Ok(Box::new(LoadedLink { inner, rank, world }))
}
