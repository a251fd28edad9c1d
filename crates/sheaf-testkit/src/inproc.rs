//! An in-process transport: ranks are threads, messages go through shared queues.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use sheaf_core::{CommError, Deadline, Link, Op, Tag};

#[derive(Default)]
struct State {
    /// (destination, source, tag) -> messages in send order.
    queues: HashMap<(usize, usize, Tag), VecDeque<Vec<u8>>>,
    /// Ranks that died, and why. A dead rank fails every pending receive in the world.
    dead: Vec<Option<String>>,
    /// Ranks that closed normally: they fail only receives that wait on them.
    left: Vec<bool>,
    /// The first abort: the culprit and the reason.
    abort: Option<(usize, String)>,
    /// Every abort: (reporter, blamed).
    reports: Vec<(usize, usize)>,
    /// (source, destination) -> the length of every message sent, in send order.
    sent: HashMap<(usize, usize), Vec<usize>>,
}

struct Shared {
    state: Mutex<State>,
    /// One per rank, signalled when something that rank may be waiting for changes.
    wake: Vec<Condvar>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake_all(&self) {
        self.wake.iter().for_each(Condvar::notify_all);
    }
}

/// A world of `n` in-process ranks.
pub struct InProcWorld {
    shared: Arc<Shared>,
    n: usize,
}

impl InProcWorld {
    pub fn new(n: usize) -> InProcWorld {
        assert!(n > 0, "a world has at least one rank");
        let state = State { dead: vec![None; n], left: vec![false; n], ..State::default() };
        let shared =
            Arc::new(Shared { state: Mutex::new(state), wake: (0..n).map(|_| Condvar::new()).collect() });
        InProcWorld { shared, n }
    }

    /// One link per rank, in rank order.
    pub fn links(&self) -> Vec<InProcLink> {
        (0..self.n).map(|rank| InProcLink { rank, n: self.n, shared: self.shared.clone() }).collect()
    }

    /// Messages sent and never received, over the whole world: a collective that
    /// finished on every rank must leave none.
    pub fn pending(&self) -> usize {
        self.shared.lock().queues.values().map(VecDeque::len).sum()
    }

    /// The lengths of the messages rank `from` has sent to rank `to`, in order: how a
    /// collective cut its buffer on the wire.
    pub fn sent(&self, from: usize, to: usize) -> Vec<usize> {
        self.shared.lock().sent.get(&(from, to)).cloned().unwrap_or_default()
    }
}

/// One rank's end of an [`InProcWorld`].
pub struct InProcLink {
    rank: usize,
    n: usize,
    shared: Arc<Shared>,
}

impl InProcLink {
    /// Simulates this rank's process dying: every rank waiting on anything fails,
    /// naming this rank.
    pub fn kill(&self, reason: &str) {
        self.shared.lock().dead[self.rank] = Some(reason.to_owned());
        self.shared.wake_all();
    }

    fn check_peer(&self, peer: usize, op: Op) -> Result<(), CommError> {
        sheaf_core::check_link_peer(self.rank, self.n, peer, op)
    }
}

impl Link for InProcLink {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.n
    }

    fn send(&self, peer: usize, tag: Tag, data: &[u8], _deadline: Deadline) -> Result<(), CommError> {
        self.check_peer(peer, Op::Send)?;
        let mut st = self.shared.lock();
        if st.dead[self.rank].is_some() || st.left[self.rank] {
            return Err(CommError::Closed { op: Op::Send });
        }
        if let Some(reason) = &st.dead[peer] {
            return Err(CommError::PeerFailed { op: Op::Send, peer, reason: reason.clone() });
        }
        st.queues.entry((peer, self.rank, tag)).or_default().push_back(data.to_vec());
        st.sent.entry((self.rank, peer)).or_default().push(data.len());
        drop(st);
        self.shared.wake[peer].notify_all();
        Ok(())
    }

    fn recv(&self, peer: usize, tag: Tag, deadline: Deadline) -> Result<Vec<u8>, CommError> {
        self.check_peer(peer, Op::Recv)?;
        let start = Instant::now();
        let mut st = self.shared.lock();
        loop {
            if let Some(msg) = st.queues.get_mut(&(self.rank, peer, tag)).and_then(VecDeque::pop_front) {
                return Ok(msg);
            }
            if let Some((dead, reason)) =
                st.dead.iter().enumerate().find_map(|(r, d)| d.as_ref().map(|d| (r, d)))
            {
                return Err(CommError::PeerFailed { op: Op::Recv, peer: dead, reason: reason.clone() });
            }
            if let Some((culprit, reason)) = &st.abort {
                return Err(CommError::Aborted { op: Op::Recv, peer: *culprit, reason: reason.clone() });
            }
            if st.left[peer] {
                return Err(CommError::PeerFailed { op: Op::Recv, peer, reason: "left the world".into() });
            }
            let remaining = deadline.remaining();
            if remaining.is_zero() {
                return Err(CommError::Timeout { op: Op::Recv, peer, waited: start.elapsed() });
            }
            st = self.shared.wake[self.rank].wait_timeout(st, remaining).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn abort(&self, culprit: usize, reason: &str) {
        let mut st = self.shared.lock();
        if st.abort.is_none() {
            st.abort = Some((culprit, reason.to_owned()));
        }
        st.reports.push((self.rank, culprit));
        drop(st);
        self.shared.wake_all();
    }

    fn failure_reports(&self) -> Vec<(usize, usize)> {
        self.shared.lock().reports.clone()
    }

    fn close(&self, _deadline: Deadline) -> Result<(), CommError> {
        self.shared.lock().left[self.rank] = true;
        self.shared.wake_all();
        Ok(())
    }
}
