//! Communication: the point-to-point [`Link`] a transport provides, and the
//! [`Communicator`] (point-to-point plus collectives) that training code uses.

use std::fmt;
use std::ops::Range;

use crate::{CommError, DType, Deadline, ReduceOp};

/// Largest tag a user may pass to [`Communicator::send`]: tags are 32 bits, the rest of
/// a [`Tag`] belongs to the communicator.
pub const MAX_USER_TAG: u32 = u32::MAX;

/// Which traffic a [`Tag`] belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum TagClass {
    User = 0,
    Allreduce = 1,
    Broadcast = 2,
    Allgather = 3,
    ReduceScatter = 4,
    Barrier = 5,
    Split = 6,
    Gather = 7,
    Scatter = 8,
    AllToAll = 9,
    Reduce = 10,
    /// A collective call's signature, sent to the right neighbour ahead of the call's
    /// messages (value 0), or a point-to-point signature (value 1). The sending thread always makes another call on the link after it
    /// (a send or a receive of the same collective), so a transport may hold such a
    /// message until then and write it together with what follows.
    Signature = 11,
    Control = 255,
}

/// A link-level message tag: 24 bits of communicator context, 8 bits of [`TagClass`],
/// 32 bits of value (a user tag, or a step inside a collective).
///
/// Messages between two ranks with equal tags arrive in the order they were sent;
/// different tags never match each other. Sub-communicators get their own context, so
/// their traffic cannot be confused with their parent's.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(pub u64);

impl Tag {
    pub const CONTEXT_BITS: u32 = 24;

    pub fn new(context: u32, class: TagClass, value: u32) -> Tag {
        let context = u64::from(context & ((1 << Self::CONTEXT_BITS) - 1));
        Tag((context << 40) | (u64::from(class as u8) << 32) | u64::from(value))
    }

    pub fn context(self) -> u32 {
        (self.0 >> 40) as u32
    }

    pub fn class_code(self) -> u8 {
        (self.0 >> 32) as u8
    }

    pub fn value(self) -> u32 {
        self.0 as u32
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag(ctx={}, class={}, value={})", self.context(), self.class_code(), self.value())
    }
}

/// What a transport must provide: reliable, ordered, tagged messages between ranks.
///
/// A link is shared (`&self`, `Send + Sync`) so that sub-communicators and, later,
/// a communication thread overlapping the backward pass can use it at once.
///
/// Contract, checked by the conformance suite in `sheaf-testkit`:
/// - `send` is *buffered*: it returns once the transport owns the bytes and never waits
///   for the matching `recv` (ring algorithms send before they receive). It may wait
///   for flow control, but no later than `deadline`.
/// - Messages from one rank with one tag are received in the order they were sent.
/// - `recv` returns by `deadline` with the message, or with an error naming the peer.
///   A `recv` that times out takes nothing: a message that comes later is there for
///   the next `recv`, and a `recv` whose deadline has already passed still returns a
///   message that is there (a poll).
///   Once any rank of the world is known dead or has called [`Link::abort`], every
///   pending and later `recv` fails with [`CommError::PeerFailed`] naming the culprit.
pub trait Link: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn send(&self, peer: usize, tag: Tag, data: &[u8], deadline: Deadline) -> Result<(), CommError>;
    fn recv(&self, peer: usize, tag: Tag, deadline: Deadline) -> Result<Vec<u8>, CommError>;

    /// Receive a message of exactly `dst.len()` bytes straight into `dst`: copied when
    /// `reduce` is `None`, combined element-wise (`dst = dst op message`, a sum for
    /// `Avg`) when it is `Some`. A transport that can read out of its own buffers
    /// overrides this to save a copy and an allocation per message; the default says
    /// it does not, and the caller falls back to [`Link::recv`].
    fn recv_into(
        &self,
        peer: usize,
        tag: Tag,
        dst: &mut [u8],
        reduce: Option<(DType, ReduceOp)>,
        deadline: Deadline,
    ) -> Result<(), CommError> {
        let _ = (peer, tag, dst, reduce, deadline);
        Err(CommError::Unsupported { op: crate::Op::Recv })
    }

    /// Declare the world failed because of `culprit`, so that no rank waits on a
    /// collective that can no longer complete. Best effort, never blocks for long.
    fn abort(&self, culprit: usize, reason: &str) {
        let _ = (culprit, reason);
    }

    /// Every `(reporter, blamed)` pair this rank has heard through [`Link::abort`],
    /// its own included, in arrival order. Used to find the root of a stall: when
    /// rank 2 waits on rank 1 which waits on a silent rank 0, both time out, and
    /// following the reports from 2 leads to 0.
    fn failure_reports(&self) -> Vec<(usize, usize)> {
        Vec::new()
    }

    /// Flush what was sent and leave the world. Returns once peers have everything this
    /// rank sent, or at `deadline`.
    fn close(&self, deadline: Deadline) -> Result<(), CommError> {
        let _ = deadline;
        Ok(())
    }

    /// A transport may reduce natively over the whole world (hardware offload, a vendor
    /// library). The default says it does not, and Sheaf's own algorithms are used.
    fn native_allreduce(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        deadline: Deadline,
    ) -> Result<(), CommError> {
        let _ = (buf, dtype, op, deadline);
        Err(CommError::Unsupported { op: crate::Op::Allreduce })
    }
}

/// The check every [`Link`] makes of a peer argument: a rank of the world other than
/// `rank` itself, else [`CommError::InvalidArgument`] for `op`.
pub fn check_link_peer(rank: usize, world: usize, peer: usize, op: crate::Op) -> Result<(), CommError> {
    if peer >= world || peer == rank {
        return Err(CommError::InvalidArgument {
            op,
            detail: format!("no peer rank {peer} in a world of {world}"),
        });
    }
    Ok(())
}

/// Point-to-point messages and collectives over a group of ranks.
///
/// Buffers are bytes plus a [`DType`], so new element types never change this trait.
/// Every rank of the group calls the same collectives in the same order. After any
/// error the communicator is poisoned: later calls fail instead of matching stale
/// messages.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    fn send(&self, peer: usize, tag: u32, data: &[u8], deadline: Deadline) -> Result<(), CommError>;
    fn recv(&self, peer: usize, tag: u32, deadline: Deadline) -> Result<Vec<u8>, CommError>;

    /// (1.4.) The caller promises NCCL's rule for this communicator's point-to-point
    /// calls from now on: between two ranks, each one's sends are received by the
    /// other in the order they were sent, whatever their tags, and a rank makes its
    /// calls toward one peer from one thread at a time. (Without the promise a message
    /// of another tag may come first.) Every rank of the communicator promises, before
    /// its first point-to-point call. A communicator that checks the promise returns
    /// `true`: each send then carries a signature (its number, tag and length), and a
    /// receive fails at once with [`CommError::Protocol`] naming both calls when the
    /// peer's next send has another tag, or when the two ranks each wait to receive
    /// from the other. The default checks nothing and returns `false`.
    fn order_point_to_point(&self) -> Result<bool, CommError> {
        Ok(false)
    }

    /// Combine `buf` across all ranks in place; every rank ends with the same bytes.
    fn allreduce(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        deadline: Deadline,
    ) -> Result<(), CommError>;

    /// Copy `root`'s `buf` into every rank's `buf` (all the same length).
    fn broadcast(&self, buf: &mut [u8], root: usize, deadline: Deadline) -> Result<(), CommError>;

    /// Concatenate every rank's `input` (all the same length) in rank order into
    /// `output`, which is `world_size` times as long.
    fn allgather(&self, input: &[u8], output: &mut [u8], deadline: Deadline) -> Result<(), CommError>;

    /// Reduce `input` across ranks and leave this rank the elements
    /// [`chunk_range`]`(n, world_size, rank)` of the result in `output`.
    fn reduce_scatter(
        &self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        deadline: Deadline,
    ) -> Result<(), CommError>;

    /// Return once every rank has entered the barrier.
    fn barrier(&self, deadline: Deadline) -> Result<(), CommError>;

    /// Reduce every rank's `buf` into `root`'s `buf`; the others' buffers are left
    /// unspecified.
    fn reduce(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        root: usize,
        deadline: Deadline,
    ) -> Result<(), CommError> {
        let _ = (buf, dtype, op, root, deadline);
        Err(CommError::Unsupported { op: crate::Op::Reduce })
    }

    /// Concatenate every rank's `input` (all the same length) in rank order into
    /// `root`'s `output` (`world_size` times as long); other ranks pass an empty output.
    fn gather(
        &self,
        input: &[u8],
        output: &mut [u8],
        root: usize,
        deadline: Deadline,
    ) -> Result<(), CommError> {
        let _ = (input, output, root, deadline);
        Err(CommError::Unsupported { op: crate::Op::Gather })
    }

    /// Give rank `i` block `i` of `root`'s `input` (`world_size` equal blocks) in its
    /// `output`; other ranks pass an empty input.
    fn scatter(
        &self,
        input: &[u8],
        output: &mut [u8],
        root: usize,
        deadline: Deadline,
    ) -> Result<(), CommError> {
        let _ = (input, output, root, deadline);
        Err(CommError::Unsupported { op: crate::Op::Scatter })
    }

    /// Block `j` of every rank's `input` goes to rank `j`; block `i` of `output` comes
    /// from rank `i`. Both are `world_size` equal blocks.
    fn all_to_all(&self, input: &[u8], output: &mut [u8], deadline: Deadline) -> Result<(), CommError> {
        let _ = (input, output, deadline);
        Err(CommError::Unsupported { op: crate::Op::AllToAll })
    }

    /// Split into sub-communicators, like `MPI_Comm_split`: ranks passing the same
    /// `color` form a group ordered by `(key, rank)`; `None` takes part in the call but
    /// joins no group. Collective over this communicator.
    fn split(
        &self,
        color: Option<u32>,
        key: u32,
        deadline: Deadline,
    ) -> Result<Option<Box<dyn Communicator>>, CommError>;
}

/// The elements of a length-`len` buffer that `rank` owns when it is cut into
/// `world` balanced contiguous chunks: sizes differ by at most one, earlier ranks get
/// the larger ones, and chunks may be empty when `len < world`.
pub fn chunk_range(len: usize, world: usize, rank: usize) -> Range<usize> {
    assert!(world > 0 && rank < world, "chunk_range: rank {rank} outside world {world}");
    let base = len / world;
    let rem = len % world;
    let start = rank * base + rank.min(rem);
    let size = base + usize::from(rank < rem);
    start..start + size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_tile_the_buffer() {
        for len in 0..40 {
            for world in 1..9 {
                let mut next = 0;
                for rank in 0..world {
                    let r = chunk_range(len, world, rank);
                    assert_eq!(r.start, next);
                    assert!(r.len() == len / world || r.len() == len / world + 1);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn tag_fields_round_trip() {
        let t = Tag::new(0xABCDEF, TagClass::Barrier, 77);
        assert_eq!(t.context(), 0xABCDEF);
        assert_eq!(t.class_code(), TagClass::Barrier as u8);
        assert_eq!(t.value(), 77);
    }
}
