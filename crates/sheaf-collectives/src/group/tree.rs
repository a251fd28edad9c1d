//! Binomial-tree broadcast and reduce: log2(n) rounds over ranks relative to the root.

use sheaf_core::{CommError, DType, Deadline, ReduceOp, TagClass};

use super::Group;
use crate::reduce;

impl Group {
    /// Binomial-tree broadcast; `v` is this rank relative to `root`.
    pub(super) fn binomial_broadcast(
        &self,
        buf: &mut [u8],
        v: usize,
        root: usize,
        dl: Deadline,
    ) -> Result<(), CommError> {
        let n = self.size();
        let mut mask = 1;
        while mask < n {
            if v & mask != 0 {
                let parent = (v - mask + root) % n;
                let msg = self.recv_exact(parent, TagClass::Broadcast, 0, buf.len(), dl)?;
                buf.copy_from_slice(&msg);
                break;
            }
            mask <<= 1;
        }
        mask >>= 1;
        while mask > 0 {
            if v + mask < n {
                self.send_to((v + mask + root) % n, TagClass::Broadcast, 0, buf, dl)?;
            }
            mask >>= 1;
        }
        Ok(())
    }

    /// Binomial-tree reduce towards `root`, the mirror of the broadcast: the root
    /// (`v == 0`) ends with the reduction (an average still to be divided).
    pub(super) fn binomial_reduce(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        v: usize,
        root: usize,
        dl: Deadline,
    ) -> Result<(), CommError> {
        let n = self.size();
        let mut mask = 1;
        while mask < n {
            if v & mask != 0 {
                self.send_to((v - mask + root) % n, TagClass::Reduce, mask as u32, buf, dl)?;
                break;
            }
            if v + mask < n {
                let child =
                    self.recv_exact((v + mask + root) % n, TagClass::Reduce, mask as u32, buf.len(), dl)?;
                reduce::combine(buf, &child, dtype, op);
            }
            mask <<= 1;
        }
        Ok(())
    }
}
