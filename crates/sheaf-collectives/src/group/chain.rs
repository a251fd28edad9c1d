//! The pipelined chain broadcast and reduce, for large buffers over 3 or more ranks.

use sheaf_core::{CommError, DType, Deadline, ReduceOp, TagClass};

use super::Group;

/// The first tag value of a chain's chunks (chunk `i` is `CHAIN + i`).
const CHAIN: u32 = 1 << 20;

impl Group {
    /// Pipelined chain reduce for large buffers, the mirror of the chain broadcast:
    /// partial results flow root+n-1, ..., root+1, root in chunks, each rank adding its
    /// own to a chunk and passing it on as soon as it arrives.
    pub(super) fn chain_reduce(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        v: usize,
        root: usize,
        dl: Deadline,
    ) -> Result<(), CommError> {
        let n = self.size();
        let chunk = (buf.len() / 8).clamp(16 << 10, 1 << 20) / dtype.size() * dtype.size();
        let (towards_root, from) = ((v + n - 1 + root) % n, (v + 1 + root) % n);
        for (i, piece) in buf.chunks_mut(chunk).enumerate() {
            let tag = CHAIN + i as u32;
            if v + 1 < n {
                self.recv_to(from, TagClass::Reduce, tag, piece, Some((dtype, op)), dl)?;
            }
            if v > 0 {
                self.send_to(towards_root, TagClass::Reduce, tag, piece, dl)?;
            }
        }
        Ok(())
    }

    /// Pipelined chain broadcast for large buffers: the buffer moves down the chain
    /// root, root+1, ... in chunks, each rank forwarding a chunk as soon as it has it,
    /// so the time is about one buffer's transfer plus a chunk per hop.
    pub(super) fn chain_broadcast(
        &self,
        buf: &mut [u8],
        v: usize,
        root: usize,
        dl: Deadline,
    ) -> Result<(), CommError> {
        let n = self.size();
        let chunk = (buf.len() / 8).clamp(16 << 10, 1 << 20);
        let (prev, next) = ((v + n - 1 + root) % n, (v + 1 + root) % n);
        for (i, piece) in buf.chunks_mut(chunk).enumerate() {
            let tag = CHAIN + i as u32;
            if v > 0 {
                self.recv_to(prev, TagClass::Broadcast, tag, piece, None, dl)?;
            }
            if v + 1 < n {
                self.send_to(next, TagClass::Broadcast, tag, piece, dl)?;
            }
        }
        Ok(())
    }
}
