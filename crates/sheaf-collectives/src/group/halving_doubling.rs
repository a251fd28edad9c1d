//! Rabenseifner's allreduce: recursive halving, then recursive doubling.

use sheaf_core::{CommError, DType, Deadline, ReduceOp, TagClass};

use super::Group;
use crate::reduce;

// Tag values of its phases: folding the extra ranks in and out, halving, doubling.
const FOLD: u32 = 2 << 20;
const UNFOLD: u32 = 3 << 20;
const HALVE: u32 = 4 << 20;
const DOUBLE: u32 = 5 << 20;

impl Group {
    /// Rabenseifner's allreduce: recursive halving leaves each of the `p` (a power of
    /// two) active ranks one reduced block, recursive doubling gathers the blocks. With
    /// `n = p + rem`, ranks `0..2 rem` first pair up: each even rank hands its buffer
    /// to the odd one above it, sits out, and gets the result back at the end.
    pub(super) fn halving_doubling_allreduce(
        &self,
        buf: &mut [u8],
        elems: usize,
        dtype: DType,
        op: ReduceOp,
        dl: Deadline,
    ) -> Result<(), CommError> {
        let (n, me, sz) = (self.size(), self.rank, dtype.size());
        let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let rem = n - p;
        // Fold the extra ranks in.
        let virtual_rank = if me < 2 * rem {
            if me % 2 == 0 {
                self.send_to(me + 1, TagClass::Allreduce, FOLD, buf, dl)?;
                return self.recv_to(me + 1, TagClass::Allreduce, UNFOLD, buf, None, dl);
            }
            let lower = self.recv_exact(me - 1, TagClass::Allreduce, FOLD, buf.len(), dl)?;
            let mut acc = lower;
            reduce::combine(&mut acc, buf, dtype, op);
            buf.copy_from_slice(&acc);
            me / 2
        } else {
            me - rem
        };
        let real = |v: usize| if v < rem { 2 * v + 1 } else { v + rem };
        // Recursive halving: the range this rank is responsible for shrinks by half
        // each step; the partner keeps the other half.
        let mut ranges: Vec<std::ops::Range<usize>> = Vec::with_capacity(1 + p.trailing_zeros() as usize);
        ranges.push(0..elems);
        let mut dist = p / 2;
        let mut step = 0;
        while dist > 0 {
            let range = ranges.last().expect("non-empty").clone();
            let mid = range.start + range.len() / 2;
            let partner = virtual_rank ^ dist;
            let (keep, give) = if virtual_rank & dist == 0 {
                (range.start..mid, mid..range.end)
            } else {
                (mid..range.end, range.start..mid)
            };
            self.send_to(
                real(partner),
                TagClass::Allreduce,
                HALVE + step,
                &buf[give.start * sz..give.end * sz],
                dl,
            )?;
            let mine = &mut buf[keep.start * sz..keep.end * sz];
            // Lower virtual rank first, so both partners reduce in the same order.
            if virtual_rank & dist == 0 {
                self.recv_to(real(partner), TagClass::Allreduce, HALVE + step, mine, Some((dtype, op)), dl)?;
            } else {
                let theirs =
                    self.recv_exact(real(partner), TagClass::Allreduce, HALVE + step, mine.len(), dl)?;
                let mut acc = theirs;
                reduce::combine(&mut acc, mine, dtype, op);
                mine.copy_from_slice(&acc);
            }
            ranges.push(keep);
            dist /= 2;
            step += 1;
        }
        let done = ranges.last().expect("non-empty").clone();
        reduce::finish_avg(&mut buf[done.start * sz..done.end * sz], dtype, op, n);
        // Recursive doubling: swap the finished halves back up the same tree.
        let mut dist = 1;
        while dist < p {
            let mine = ranges.pop().expect("one range per step");
            let parent = ranges.last().expect("the whole buffer at the bottom").clone();
            let theirs =
                if mine.start == parent.start { mine.end..parent.end } else { parent.start..mine.start };
            let partner = virtual_rank ^ dist;
            self.send_to(
                real(partner),
                TagClass::Allreduce,
                DOUBLE + step,
                &buf[mine.start * sz..mine.end * sz],
                dl,
            )?;
            let dst = &mut buf[theirs.start * sz..theirs.end * sz];
            self.recv_to(real(partner), TagClass::Allreduce, DOUBLE + step, dst, None, dl)?;
            dist *= 2;
            step += 1;
        }
        if me < 2 * rem {
            self.send_to(me - 1, TagClass::Allreduce, UNFOLD, buf, dl)?;
        }
        Ok(())
    }
}
