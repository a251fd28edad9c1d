//! Fault injection, as a wrapper around any link (the way burn's `Autodiff<B>` wraps
//! a backend): delays, reordering, dropped messages, a rank that dies or stops
//! answering.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sheaf_core::{CommError, DType, Deadline, Link, Op, ReduceOp, Tag};

use crate::InProcLink;

/// A link whose rank can be made to die, as its process would.
pub trait Kill {
    fn kill(&self, reason: &str);
}

impl Kill for InProcLink {
    fn kill(&self, reason: &str) {
        InProcLink::kill(self, reason);
    }
}

/// What goes wrong on one rank.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Every send waits this long first.
    DelaySends(Duration),
    /// The `n`-th send (0-based) is silently lost.
    DropSend(usize),
    /// The rank dies instead of making its `n`-th send.
    KillAtSend(usize),
    /// The rank stops answering at its `n`-th send: it sleeps for the given time
    /// (past everyone's deadline) and sends nothing more.
    StallAtSend(usize, Duration),
    /// Every send is held back until the rank's next send, receive or close; a next send to
    /// the same peer under another tag overtakes it. That is all the reordering the
    /// link contract allows (messages with one tag between two ranks stay in order),
    /// and a held message is always released before the rank waits.
    Reorder,
}

/// A message held back by [`Fault::Reorder`].
struct Held {
    peer: usize,
    tag: Tag,
    data: Vec<u8>,
    deadline: Deadline,
}

/// `inner` with `faults` applied to its sends.
pub struct FaultyLink<L> {
    inner: L,
    faults: Vec<Fault>,
    sends: AtomicUsize,
    held: Mutex<Option<Held>>,
    overtakes: AtomicUsize,
}

impl<L> FaultyLink<L> {
    pub fn new(inner: L, faults: Vec<Fault>) -> FaultyLink<L> {
        FaultyLink {
            inner,
            faults,
            sends: AtomicUsize::new(0),
            held: Mutex::new(None),
            overtakes: AtomicUsize::new(0),
        }
    }
}

impl<L> FaultyLink<L> {
    /// How many messages [`Fault::Reorder`] let overtake another.
    pub fn overtakes(&self) -> usize {
        self.overtakes.load(Ordering::SeqCst)
    }
}

impl<L: Link> FaultyLink<L> {
    /// Sends the message held back by [`Fault::Reorder`], if any.
    fn release(&self) -> Result<(), CommError> {
        match self.held.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(h) => self.inner.send(h.peer, h.tag, &h.data, h.deadline),
            None => Ok(()),
        }
    }

    /// [`Fault::Reorder`]'s send: the new message overtakes a held one to the same
    /// peer under another tag; otherwise the held one goes and the new one is held.
    fn reordered_send(
        &self,
        peer: usize,
        tag: Tag,
        data: &[u8],
        deadline: Deadline,
    ) -> Result<(), CommError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let new = Held { peer, tag, data: data.to_vec(), deadline };
        match held.take() {
            Some(h) if h.peer == peer && h.tag != tag => {
                self.overtakes.fetch_add(1, Ordering::SeqCst);
                self.inner.send(peer, tag, data, deadline)?;
                self.inner.send(h.peer, h.tag, &h.data, h.deadline)
            }
            Some(h) => {
                *held = Some(new);
                self.inner.send(h.peer, h.tag, &h.data, h.deadline)
            }
            None => {
                *held = Some(new);
                Ok(())
            }
        }
    }
}

impl<L: Link + Kill> Link for FaultyLink<L> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn send(&self, peer: usize, tag: Tag, data: &[u8], deadline: Deadline) -> Result<(), CommError> {
        let n = self.sends.fetch_add(1, Ordering::SeqCst);
        for fault in &self.faults {
            match *fault {
                Fault::DelaySends(d) => std::thread::sleep(d),
                Fault::DropSend(k) if k == n => return Ok(()),
                Fault::KillAtSend(k) if k <= n => {
                    self.inner.kill("killed by fault injection");
                    return Err(CommError::Closed { op: Op::Send });
                }
                Fault::StallAtSend(k, d) if k <= n => {
                    std::thread::sleep(d);
                    return Err(CommError::Closed { op: Op::Send });
                }
                Fault::Reorder => return self.reordered_send(peer, tag, data, deadline),
                _ => {}
            }
        }
        self.inner.send(peer, tag, data, deadline)
    }

    fn recv(&self, peer: usize, tag: Tag, deadline: Deadline) -> Result<Vec<u8>, CommError> {
        self.release()?;
        self.inner.recv(peer, tag, deadline)
    }

    fn abort(&self, culprit: usize, reason: &str) {
        self.inner.abort(culprit, reason);
    }

    fn failure_reports(&self) -> Vec<(usize, usize)> {
        self.inner.failure_reports()
    }

    fn close(&self, deadline: Deadline) -> Result<(), CommError> {
        self.release()?;
        self.inner.close(deadline)
    }

    fn native_allreduce(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        deadline: Deadline,
    ) -> Result<(), CommError> {
        self.inner.native_allreduce(buf, dtype, op, deadline)
    }
}
