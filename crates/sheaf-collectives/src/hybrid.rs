//! [`HybridLink`]: one world's link made of two, a fast one among the ranks of this
//! host (shared memory) and one across hosts (ZeroMQ over TCP): every message to a rank
//! of this host goes over the first, every other over the second. Every collective
//! runs over it unchanged; [`crate::Group::with_hosts`] adds the hierarchical
//! allreduce that sends across hosts only between one leader per host.
//!
//! An abort that reaches a host over the world link only (another host's rank blamed
//! someone) is relayed to the host's link by a watcher thread of the host's first
//! rank, so a call blocked on a host-mate wakes at once rather than at its deadline.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use sheaf_core::{CommError, DType, Deadline, Link, Op, ReduceOp, Tag};

/// A world link routing each peer to the host-local link or the world-wide one.
pub struct HybridLink {
    world: Arc<dyn Link>,
    local: Arc<dyn Link>,
    /// World rank -> rank in `local`, for the ranks of this host.
    local_of: Vec<Option<usize>>,
    /// Rank in `local` -> world rank.
    global_of: Vec<usize>,
    /// The host's first rank's relay; dropping the sender stops it.
    watcher: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

/// How often the watcher looks at the world link's failure reports.
const WATCH: Duration = Duration::from_millis(20);

impl HybridLink {
    /// `world` spans every rank; `local` spans `hosts_ranks` (this host's world ranks,
    /// in the order of `local`'s ranks, this rank among them).
    pub fn new(
        world: Arc<dyn Link>,
        local: Arc<dyn Link>,
        host_ranks: &[usize],
    ) -> Result<HybridLink, CommError> {
        let n = world.world_size();
        let bad = |detail: String| CommError::InvalidArgument { op: Op::Connect, detail };
        if local.world_size() != host_ranks.len() || host_ranks.iter().any(|&r| r >= n) {
            return Err(bad(format!(
                "a local link of {} ranks for host ranks {host_ranks:?} of a world of {n}",
                local.world_size()
            )));
        }
        if host_ranks.get(local.rank()) != Some(&world.rank()) {
            return Err(bad(format!(
                "local rank {} is not world rank {} in {host_ranks:?}",
                local.rank(),
                world.rank()
            )));
        }
        let mut local_of = vec![None; n];
        for (l, &g) in host_ranks.iter().enumerate() {
            if local_of[g].replace(l).is_some() {
                return Err(bad(format!("world rank {g} twice in {host_ranks:?}")));
            }
        }
        let (stop, stopped) = mpsc::channel();
        // The host's first rank relays for the host: its abort wakes every rank there.
        let watcher = (local.rank() == 0).then(|| {
            let (world, local, local_of) = (world.clone(), local.clone(), local_of.clone());
            std::thread::Builder::new()
                .name("hybrid-abort-relay".into())
                .spawn(move || watch(&*world, &*local, &local_of, &stopped))
                .map(|handle| (stop, handle))
                .map_err(|e| bad(format!("starting the abort relay: {e}")))
        });
        Ok(HybridLink {
            world,
            local,
            local_of,
            global_of: host_ranks.to_vec(),
            watcher: watcher.transpose()?,
        })
    }

    /// An error of the local link, its ranks renamed as world ranks.
    fn global(&self, e: CommError) -> CommError {
        let g = |p: usize| self.global_of.get(p).copied().unwrap_or(p);
        match e {
            CommError::Timeout { op, peer, waited } => CommError::Timeout { op, peer: g(peer), waited },
            CommError::PeerFailed { op, peer, reason } => CommError::PeerFailed { op, peer: g(peer), reason },
            // A relayed abort names the rank another host blamed.
            CommError::Aborted { op, peer, reason } => match remote_report(&*self.world, &self.local_of) {
                Some((_, blamed)) => CommError::Aborted { op, peer: blamed, reason },
                None => CommError::Aborted { op, peer: g(peer), reason },
            },
            CommError::Protocol { op, peer, detail } => CommError::Protocol { op, peer: g(peer), detail },
            other => other,
        }
    }
}

/// The first abort the world link heard from a rank of another host (whose abort did
/// not go over this host's link): `(reporter, blamed)`.
fn remote_report(world: &dyn Link, local_of: &[Option<usize>]) -> Option<(usize, usize)> {
    world.failure_reports().into_iter().find(|&(r, _)| local_of.get(r).copied().flatten().is_none())
}

/// Until `stop` is dropped: waits for an abort a rank of another host reported over
/// the world link, then aborts the host's link once (blaming the same rank where it
/// is on this host, this rank otherwise, as [`HybridLink::abort`] does).
fn watch(world: &dyn Link, local: &dyn Link, local_of: &[Option<usize>], stop: &mpsc::Receiver<()>) {
    loop {
        match stop.recv_timeout(WATCH) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        if let Some((reporter, blamed)) = remote_report(world, local_of) {
            let reason = format!("rank {reporter} reported rank {blamed} over the link between hosts");
            local.abort(local_of.get(blamed).copied().flatten().unwrap_or(local.rank()), &reason);
            return;
        }
    }
}

impl Drop for HybridLink {
    fn drop(&mut self) {
        if let Some((stop, watcher)) = self.watcher.take() {
            drop(stop);
            let _ = watcher.join();
        }
    }
}

impl Link for HybridLink {
    fn rank(&self) -> usize {
        self.world.rank()
    }

    fn world_size(&self) -> usize {
        self.world.world_size()
    }

    fn send(&self, peer: usize, tag: Tag, data: &[u8], deadline: Deadline) -> Result<(), CommError> {
        match self.local_of.get(peer).copied().flatten() {
            Some(l) => self.local.send(l, tag, data, deadline).map_err(|e| self.global(e)),
            None => self.world.send(peer, tag, data, deadline),
        }
    }

    fn recv(&self, peer: usize, tag: Tag, deadline: Deadline) -> Result<Vec<u8>, CommError> {
        match self.local_of.get(peer).copied().flatten() {
            Some(l) => self.local.recv(l, tag, deadline).map_err(|e| self.global(e)),
            None => self.world.recv(peer, tag, deadline),
        }
    }

    fn recv_into(
        &self,
        peer: usize,
        tag: Tag,
        dst: &mut [u8],
        reduce: Option<(DType, ReduceOp)>,
        deadline: Deadline,
    ) -> Result<(), CommError> {
        let result = match self.local_of.get(peer).copied().flatten() {
            Some(l) => self.local.recv_into(l, tag, dst, reduce, deadline).map_err(|e| self.global(e)),
            None => self.world.recv_into(peer, tag, dst, reduce, deadline),
        };
        // One of the two may lack it: receive and copy then, whichever it is.
        match result {
            Err(CommError::Unsupported { .. }) => {
                let msg = self.recv(peer, tag, deadline)?;
                if msg.len() != dst.len() {
                    return Err(CommError::Protocol {
                        op: Op::Recv,
                        peer,
                        detail: format!("expected {} bytes, got {}", dst.len(), msg.len()),
                    });
                }
                crate::reduce::copy_or_combine(dst, &msg, reduce);
                Ok(())
            }
            other => other,
        }
    }

    fn abort(&self, culprit: usize, reason: &str) {
        self.world.abort(culprit, reason);
        let local_culprit = self.local_of.get(culprit).copied().flatten().unwrap_or(self.local.rank());
        self.local.abort(local_culprit, reason);
    }

    fn failure_reports(&self) -> Vec<(usize, usize)> {
        let g = |p: usize| self.global_of.get(p).copied().unwrap_or(p);
        let mut reports = self.world.failure_reports();
        for (reporter, blamed) in self.local.failure_reports() {
            let r = (g(reporter), g(blamed));
            if !reports.contains(&r) {
                reports.push(r);
            }
        }
        reports
    }

    fn close(&self, deadline: Deadline) -> Result<(), CommError> {
        let local = self.local.close(deadline).map_err(|e| self.global(e));
        let world = self.world.close(deadline);
        local.and(world)
    }
}
