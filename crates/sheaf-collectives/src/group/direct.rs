//! The direct allreduce: one round, for tiny messages.

use sheaf_core::{CommError, DType, Deadline, ReduceOp, TagClass};

use super::Group;
use crate::reduce;

/// The tag value of the direct exchange.
const DIRECT: u32 = 1 << 20;

impl Group {
    /// Every rank sends its buffer to every other, then each reduces all of them in
    /// rank order, so the result is the naive left-to-right reduction.
    pub(super) fn direct_allreduce(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        dl: Deadline,
    ) -> Result<(), CommError> {
        let (n, me) = (self.size(), self.rank);
        for peer in (0..n).filter(|&p| p != me) {
            self.send_to(peer, TagClass::Allreduce, DIRECT, buf, dl)?;
        }
        // Fold in rank order, the same on every rank: x0, then x1, ...
        let mine = (me > 0).then(|| buf.to_vec());
        for q in 0..n {
            match (&mine, q) {
                (_, q) if q == me && q == 0 => {} // `buf` holds x0 already
                (Some(mine), q) if q == me => reduce::combine(buf, mine, dtype, op),
                (_, 0) => self.recv_to(0, TagClass::Allreduce, DIRECT, buf, None, dl)?,
                (_, q) => self.recv_to(q, TagClass::Allreduce, DIRECT, buf, Some((dtype, op)), dl)?,
            }
        }
        reduce::finish_avg(buf, dtype, op, n);
        Ok(())
    }
}
