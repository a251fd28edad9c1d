//! Ring reduce-scatter and allgather, pipelined in segments, and the ring allreduce
//! built from them: bandwidth-optimal, 2 (n - 1) steps.

use std::ops::Range;

use sheaf_core::{CommError, DType, Deadline, ReduceOp, TagClass};

use super::Group;
use crate::reduce;

/// The segment size the ring algorithms cut blocks into: a quarter of the largest
/// block, between 64 KiB and 1 MiB, in whole elements. Every rank computes the same
/// from the same block sizes.
fn segment_bytes(largest_block: usize, elem: usize) -> usize {
    let seg = (largest_block / 4).clamp(64 << 10, 1 << 20);
    (seg / elem).max(1) * elem
}

/// Segments of its own first block a rank sends before it has received any: the
/// rest go out one per segment received, so a ring never holds more than this many
/// of one rank's segments unread (with 1 MiB segments, within a 4 MiB transport ring)
/// and nothing waits on a segment that was not sent. Blocks differ by at most one
/// element, so a rank receives at most one segment fewer than it sends first.
const AHEAD: usize = 3;

/// `range` cut into consecutive pieces of at most `seg` bytes (none when empty).
fn segments(range: Range<usize>, seg: usize) -> impl Iterator<Item = Range<usize>> {
    range.clone().step_by(seg).map(move |start| start..(start + seg).min(range.end))
}

impl Group {
    /// Ring allreduce of `elems` values: reduce-scatter over balanced blocks, then
    /// allgather of the same blocks.
    pub(super) fn ring_allreduce(
        &self,
        buf: &mut [u8],
        elems: usize,
        dtype: DType,
        op: ReduceOp,
        dl: Deadline,
    ) -> Result<(), CommError> {
        let blocks = self.byte_blocks(elems, dtype);
        self.ring_reduce_scatter(buf, &blocks, dtype, op, dl)?;
        reduce::finish_avg(&mut buf[blocks[self.rank].clone()], dtype, op, self.size());
        self.ring_allgather(buf, &blocks, dl)
    }

    /// Ring reduce-scatter in place: afterwards this rank's block holds the reduction
    /// of that block over all ranks. `blocks` are byte ranges, one per rank.
    ///
    /// Pipelined: every block moves in segments, and a segment is forwarded to the
    /// right as soon as it is reduced, so sending, receiving and reducing overlap
    /// instead of each step waiting for a whole block.
    pub(super) fn ring_reduce_scatter(
        &self,
        buf: &mut [u8],
        blocks: &[Range<usize>],
        dtype: DType,
        op: ReduceOp,
        dl: Deadline,
    ) -> Result<(), CommError> {
        let n = self.size();
        let (r, right, left) = (self.rank, (self.rank + 1) % n, (self.rank + n - 1) % n);
        if n == 1 {
            return Ok(());
        }
        let seg = segment_bytes(blocks[0].len(), dtype.size());
        let mut first = segments(blocks[(r + n - 1) % n].clone(), seg).peekable();
        for piece in first.by_ref().take(AHEAD) {
            self.send_to(right, TagClass::ReduceScatter, 0, &buf[piece], dl)?;
        }
        for s in 0..n - 1 {
            let block = blocks[(r + 2 * n - s - 2) % n].clone();
            for piece in segments(block, seg) {
                let dst = &mut buf[piece.clone()];
                self.recv_to(left, TagClass::ReduceScatter, s as u32, dst, Some((dtype, op)), dl)?;
                if s + 2 < n {
                    self.send_to(right, TagClass::ReduceScatter, s as u32 + 1, &buf[piece], dl)?;
                }
                if let Some(next) = first.next() {
                    self.send_to(right, TagClass::ReduceScatter, 0, &buf[next], dl)?;
                }
            }
        }
        debug_assert!(first.peek().is_none());
        Ok(())
    }

    /// Ring reduce-scatter from `input` (read, never written) into `out`, this rank's
    /// block of the reduction: what [`Group::ring_reduce_scatter`] computes in place,
    /// with the same messages in the same order, holding one segment of scratch
    /// instead of a copy of the whole input (a ZeRO bucket's reduce-scatter once held
    /// the bucket twice).
    pub(super) fn ring_reduce_scatter_into(
        &self,
        input: &[u8],
        out: &mut [u8],
        blocks: &[Range<usize>],
        dtype: DType,
        op: ReduceOp,
        dl: Deadline,
    ) -> Result<(), CommError> {
        let n = self.size();
        let (r, right, left) = (self.rank, (self.rank + 1) % n, (self.rank + n - 1) % n);
        let mine = blocks[r].start;
        if n == 1 {
            out.copy_from_slice(&input[blocks[r].clone()]);
            return Ok(());
        }
        let seg = segment_bytes(blocks[0].len(), dtype.size());
        let mut first = segments(blocks[(r + n - 1) % n].clone(), seg).peekable();
        for piece in first.by_ref().take(AHEAD) {
            self.send_to(right, TagClass::ReduceScatter, 0, &input[piece], dl)?;
        }
        let mut scratch = Vec::new();
        for s in 0..n - 1 {
            // The last step's block is this rank's own: it is reduced into `out`.
            let last = s + 2 == n;
            let block = blocks[(r + 2 * n - s - 2) % n].clone();
            for piece in segments(block, seg) {
                let dst: &mut [u8] = match last {
                    true => &mut out[piece.start - mine..piece.end - mine],
                    false => {
                        scratch.resize(piece.len(), 0);
                        &mut scratch[..]
                    }
                };
                dst.copy_from_slice(&input[piece.clone()]);
                self.recv_to(left, TagClass::ReduceScatter, s as u32, dst, Some((dtype, op)), dl)?;
                if !last {
                    self.send_to(right, TagClass::ReduceScatter, s as u32 + 1, dst, dl)?;
                }
                if let Some(next) = first.next() {
                    self.send_to(right, TagClass::ReduceScatter, 0, &input[next], dl)?;
                }
            }
        }
        debug_assert!(first.peek().is_none());
        Ok(())
    }

    /// Ring allgather in place: each rank starts with its own block filled and ends
    /// with every block. Pipelined in segments like [`Group::ring_reduce_scatter`].
    pub(super) fn ring_allgather(
        &self,
        buf: &mut [u8],
        blocks: &[Range<usize>],
        dl: Deadline,
    ) -> Result<(), CommError> {
        let n = self.size();
        let (r, right, left) = (self.rank, (self.rank + 1) % n, (self.rank + n - 1) % n);
        if n == 1 {
            return Ok(());
        }
        let seg = segment_bytes(blocks[0].len(), 1);
        let mut first = segments(blocks[r].clone(), seg).peekable();
        for piece in first.by_ref().take(AHEAD) {
            self.send_to(right, TagClass::Allgather, 0, &buf[piece], dl)?;
        }
        for s in 0..n - 1 {
            let block = blocks[(r + 2 * n - s - 1) % n].clone();
            for piece in segments(block, seg) {
                self.recv_to(left, TagClass::Allgather, s as u32, &mut buf[piece.clone()], None, dl)?;
                if s + 2 < n {
                    self.send_to(right, TagClass::Allgather, s as u32 + 1, &buf[piece], dl)?;
                }
                if let Some(next) = first.next() {
                    self.send_to(right, TagClass::Allgather, 0, &buf[next], dl)?;
                }
            }
        }
        debug_assert!(first.peek().is_none());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Segments are a quarter block between 64 KiB and 1 MiB, in whole elements, and
    /// cut a block into consecutive pieces that cover it.
    #[test]
    fn segments_cover_blocks() {
        assert_eq!(segment_bytes(100, 4), 64 << 10);
        assert_eq!(segment_bytes(1 << 20, 4), 256 << 10);
        assert_eq!(segment_bytes(1 << 30, 4), 1 << 20);
        assert_eq!(segment_bytes(3 << 20, 3) % 3, 0);
        let pieces: Vec<_> = segments(10..1000, 300).collect();
        assert_eq!(pieces, [10..310, 310..610, 610..910, 910..1000]);
        assert_eq!(segments(5..5, 64).count(), 0);
    }
}
