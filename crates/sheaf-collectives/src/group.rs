//! [`Group`]: a communicator over a subset of a link's ranks.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sheaf_core::{chunk_range, CommError, Communicator, DType, Deadline, Link, Op, ReduceOp, Tag, TagClass};

use crate::{reduce, Algorithm, BroadcastAlgorithm, Tuning};

mod chain;
mod direct;
mod halving_doubling;
mod p2p;
mod ring;
mod signature;
mod tree;

use signature::Signature;

/// How long a rank that gave up waits for the other ranks' failure reports before it
/// names a culprit. Every failure is reported at most this long after its deadline.
pub const BLAME_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// A communicator: a set of the link's ranks (the world, or a `split` of it) that run
/// collectives together. Errors name peers by their rank in the link's world.
pub struct Group {
    link: Arc<dyn Link>,
    /// Group rank -> link rank.
    members: Arc<[usize]>,
    rank: usize,
    context: u32,
    splits: AtomicU32,
    poisoned: Mutex<Option<String>>,
    /// The link rank of the last receive's peer, for [`Group::blame`].
    waiting_on: AtomicUsize,
    /// The link said it cannot receive into a buffer; stop asking.
    no_recv_into: AtomicBool,
    algorithm: Algorithm,
    /// Collective calls made so far (the next one's sequence number, less one).
    calls: AtomicU64,
    /// A collective call is in progress (one inside it is part of it).
    in_call: AtomicBool,
    /// The call's signature while the left neighbour's is still to be checked.
    unchecked: Mutex<Option<Signature>>,
    /// The world's hosts, when known ([`Group::with_hosts`]).
    hosts: Option<Arc<Hosts>>,
    /// Point-to-point signatures, once promised ([`Communicator::order_point_to_point`]).
    ordered: p2p::Ordered,
    /// What `auto` runs, measured on this group ([`crate::calibrate`]); the fixed rule
    /// ([`Algorithm::choose`]) without it.
    tuning: Option<Arc<Tuning>>,
}

/// A world group's hosts: the group of this host's ranks, and (on its first rank) the
/// group of every host's first rank.
struct Hosts {
    intra: Group,
    leaders: Option<Group>,
}

impl Group {
    /// The whole world of `link`.
    pub fn world(link: Arc<dyn Link>) -> Group {
        let members: Arc<[usize]> = (0..link.world_size()).collect();
        let rank = link.rank();
        Group::new(link, members, rank, 0)
    }

    fn new(link: Arc<dyn Link>, members: Arc<[usize]>, rank: usize, context: u32) -> Group {
        Group {
            link,
            members,
            rank,
            context,
            splits: AtomicU32::new(0),
            poisoned: Mutex::new(None),
            waiting_on: AtomicUsize::new(usize::MAX),
            no_recv_into: AtomicBool::new(false),
            algorithm: Algorithm::Auto,
            calls: AtomicU64::new(0),
            in_call: AtomicBool::new(false),
            unchecked: Mutex::new(None),
            hosts: None,
            ordered: p2p::Ordered::default(),
            tuning: None,
        }
    }

    /// The same group knowing which host each rank is on (`host_of[rank]`, equal on
    /// ranks of one host): allreduce then runs hierarchically ([`Algorithm::Hierarchical`])
    /// unless a flat algorithm is fixed. Every rank must pass the same hosts. The
    /// groups of each host and of the hosts' first ranks are made here, without
    /// talking, each under a context of its own.
    pub fn with_hosts(mut self, host_of: &[usize]) -> Group {
        let n = self.size();
        if host_of.len() != n {
            return self;
        }
        let mut order: Vec<usize> = Vec::new();
        for &h in host_of {
            if !order.contains(&h) {
                order.push(h);
            }
        }
        let mine = host_of[self.rank];
        let intra: Vec<usize> = (0..n).filter(|&r| host_of[r] == mine).collect();
        let leaders: Vec<usize> =
            order.iter().map(|&h| (0..n).find(|&r| host_of[r] == h).expect("a rank per host")).collect();
        // One host, or one rank per host: nothing to gain.
        if order.len() < 2 || leaders.len() == n {
            return self;
        }
        let group = |ranks: &[usize], salt: u32| {
            let members: Arc<[usize]> = ranks.iter().map(|&r| self.members[r]).collect();
            let rank = ranks.iter().position(|&r| r == self.rank).expect("a member");
            Group::new(self.link.clone(), members, rank, child_context(self.context, salt)).with_algorithm(
                match self.algorithm {
                    Algorithm::Hierarchical => Algorithm::Auto,
                    a => a,
                },
            )
        };
        let hosts = Hosts {
            intra: group(&intra, u32::MAX),
            leaders: leaders.contains(&self.rank).then(|| group(&leaders, u32::MAX - 1)),
        };
        self.hosts = Some(Arc::new(hosts));
        self
    }

    /// Allreduce as a reduce inside each host, an allreduce among the hosts' first
    /// ranks and a broadcast inside each host (averages summed throughout and divided
    /// once at the end).
    fn hierarchical_allreduce(
        &self,
        hosts: &Hosts,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        dl: Deadline,
    ) -> Result<(), CommError> {
        let summed = if op == ReduceOp::Avg { ReduceOp::Sum } else { op };
        hosts.intra.reduce(buf, dtype, summed, 0, dl)?;
        if let Some(leaders) = &hosts.leaders {
            leaders.allreduce(buf, dtype, summed, dl)?;
        }
        hosts.intra.broadcast(buf, 0, dl)?;
        reduce::finish_avg(buf, dtype, op, self.size());
        Ok(())
    }

    /// The same group, running `algorithm` for allreduce (sub-communicators split from
    /// it inherit the choice). Every rank must choose the same.
    pub fn with_algorithm(mut self, algorithm: Algorithm) -> Group {
        self.algorithm = algorithm;
        self
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The same group, `auto` running what `tuning` measured (a tuning measured at
    /// another group size is ignored, and so is one for a group that knows its hosts,
    /// whose `auto` stays hierarchical by the fixed rule). Sub-communicators of the
    /// same size inherit it. Every rank must pass the same.
    pub fn with_tuning(mut self, tuning: Tuning) -> Group {
        if tuning.world == self.size() && self.hosts.is_none() {
            self.tuning = Some(Arc::new(tuning));
        }
        self
    }

    /// Whether the group knows its hosts ([`Group::with_hosts`]): its `auto` is then
    /// hierarchical, which calibration does not measure.
    pub fn knows_hosts(&self) -> bool {
        self.hosts.is_some()
    }

    /// What `auto` runs, when measured.
    pub fn tuning(&self) -> Option<&Tuning> {
        self.tuning.as_deref()
    }

    /// The allreduce algorithm for a `bytes`-long buffer: the fixed one, or `auto`'s
    /// by the tuning where there is one, by the fixed rule otherwise.
    pub fn choice(&self, bytes: usize) -> Algorithm {
        match (self.algorithm, &self.tuning) {
            (Algorithm::Auto, Some(t)) => t.choose(bytes),
            (a, _) => a.choose(bytes, self.size()),
        }
    }

    /// The same ranks on a context of their own, running `algorithm`: what
    /// calibration measures, apart from the group's own traffic.
    pub(crate) fn probe(&self, algorithm: Algorithm) -> Group {
        let context = child_context(self.context, u32::MAX - 2);
        Group::new(self.link.clone(), self.members.clone(), self.rank, context).with_algorithm(algorithm)
    }

    /// The link this group talks over.
    pub fn link(&self) -> &Arc<dyn Link> {
        &self.link
    }

    /// This group's members as link ranks, in group-rank order.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn tag(&self, class: TagClass, value: u32) -> Tag {
        Tag::new(self.context, class, value)
    }

    fn send_to(
        &self,
        peer: usize,
        class: TagClass,
        value: u32,
        data: &[u8],
        dl: Deadline,
    ) -> Result<(), CommError> {
        self.link.send(self.members[peer], self.tag(class, value), data, dl)
    }

    fn recv_from(
        &self,
        peer: usize,
        class: TagClass,
        value: u32,
        dl: Deadline,
    ) -> Result<Vec<u8>, CommError> {
        self.check_in_step(dl)?;
        self.waiting_on.store(self.members[peer], Ordering::Relaxed);
        self.link.recv(self.members[peer], self.tag(class, value), dl)
    }

    /// Runs collective `op` as one call with a signature (see [`signature`]): every
    /// rank sends its right neighbour the call's signature before the call's own
    /// messages, and checks its left neighbour's before its first receive of the call
    /// (or at its end, when it receives nothing), so ranks that disagree (some pair of
    /// neighbours does when any two ranks do) fail at once, without a round of waiting
    /// added to calls that agree. A collective run inside another (a split's
    /// allgather) is part of it.
    fn collective<T>(
        &self,
        op: Op,
        (dtype, reduce, count, root): (Option<DType>, Option<ReduceOp>, usize, Option<usize>),
        dl: Deadline,
        f: impl FnOnce() -> Result<T, CommError>,
    ) -> Result<T, CommError> {
        if self.in_call.swap(true, Ordering::Relaxed) {
            return self.guarded(op, f);
        }
        let seq = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let sig = Signature { seq, op, dtype, reduce, count: count as u64, root: root.map(|r| r as u32) };
        let result = self.guarded(op, || {
            let n = self.size();
            if n > 1 {
                let right = self.members[(self.rank + 1) % n];
                self.link.send(right, self.tag(TagClass::Signature, 0), &sig.encode(), dl)?;
                *self.lock_unchecked() = Some(sig);
            }
            let out = f()?;
            self.check_in_step(dl)?;
            Ok(out)
        });
        *self.lock_unchecked() = None;
        self.in_call.store(false, Ordering::Relaxed);
        result
    }

    fn lock_unchecked(&self) -> std::sync::MutexGuard<'_, Option<Signature>> {
        self.unchecked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Once per call, before its first receive: the left neighbour's signature must
    /// be this call's.
    fn check_in_step(&self, dl: Deadline) -> Result<(), CommError> {
        let Some(mine) = self.lock_unchecked().take() else { return Ok(()) };
        let n = self.size();
        let left = (self.rank + n - 1) % n;
        // Straight into a buffer where the transport can (`recv_to`): a plain receive
        // may first drain the call's data behind the signature into copies (shared
        // memory did, costing 20-30% from 1 MiB up), where `recv_into` later reads it
        // in place. The signature is taken above, so this receive checks none.
        let mut bytes = [0u8; signature::LEN];
        self.recv_to(left, TagClass::Signature, 0, &mut bytes, None, dl)?;
        let theirs = Signature::decode(&bytes);
        if theirs == Some(mine) {
            return Ok(());
        }
        let (me, them) = (self.members[self.rank], self.members[left]);
        Err(CommError::Protocol {
            op: mine.op,
            peer: them,
            detail: format!(
                "collectives out of step: rank {me} is in {}; rank {them} in {}",
                mine.describe(),
                theirs.map_or_else(|| "something unreadable".to_string(), |t| t.describe())
            ),
        })
    }

    /// Receive exactly `dst.len()` bytes into `dst`, copying or (with `reduce`)
    /// combining: straight out of the transport's buffers when it can
    /// ([`Link::recv_into`]), else through [`Link::recv`].
    fn recv_to(
        &self,
        peer: usize,
        class: TagClass,
        value: u32,
        dst: &mut [u8],
        reduce: Option<(DType, ReduceOp)>,
        dl: Deadline,
    ) -> Result<(), CommError> {
        if !self.no_recv_into.load(Ordering::Relaxed) {
            self.check_in_step(dl)?;
            self.waiting_on.store(self.members[peer], Ordering::Relaxed);
            match self.link.recv_into(self.members[peer], self.tag(class, value), dst, reduce, dl) {
                Err(CommError::Unsupported { .. }) => self.no_recv_into.store(true, Ordering::Relaxed),
                other => return other,
            }
        }
        let msg = self.recv_exact(peer, class, value, dst.len(), dl)?;
        match reduce {
            Some((dtype, op)) => reduce::combine(dst, &msg, dtype, op),
            None => dst.copy_from_slice(&msg),
        }
        Ok(())
    }

    /// Receive exactly `len` bytes, or fail naming the sender.
    fn recv_exact(
        &self,
        peer: usize,
        class: TagClass,
        value: u32,
        len: usize,
        dl: Deadline,
    ) -> Result<Vec<u8>, CommError> {
        let msg = self.recv_from(peer, class, value, dl)?;
        if msg.len() != len {
            return Err(CommError::Protocol {
                op: Op::Recv,
                peer: self.members[peer],
                detail: format!("expected {len} bytes, got {}", msg.len()),
            });
        }
        Ok(msg)
    }

    /// Runs one operation: refuses when poisoned, and on failure poisons the group and
    /// tells the world whom to blame, so that no other rank waits for its deadline on a
    /// collective that can no longer complete.
    fn guarded<T>(&self, op: Op, f: impl FnOnce() -> Result<T, CommError>) -> Result<T, CommError> {
        if let Some(cause) = self.poisoned.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(CommError::Poisoned { op, cause });
        }
        f().map_err(|e| {
            let e = e.within(op);
            if matches!(e, CommError::InvalidArgument { .. } | CommError::Unsupported { .. }) {
                return e; // caller's mistake, made the same on every rank: nothing sent
            }
            let e = self.blame(e);
            *self.poisoned.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            e
        })
    }

    /// Finds the rank at the root of a failure. A timeout blames the peer waited on,
    /// but that peer may itself be waiting on a silent rank. So every rank that gives
    /// up reports whom it was waiting on ([`Link::abort`], which also wakes every
    /// other rank), waits [`BLAME_GRACE`] for the others' reports, then follows the
    /// chain of reports to a rank that reported nothing: the one that stopped. A death
    /// the transport saw is taken as it is. In a cycle of waits (a lost message) the
    /// direct blame stands.
    fn blame(&self, e: CommError) -> CommError {
        let waited = self.waiting_on.load(Ordering::Relaxed);
        let direct = match &e {
            CommError::Timeout { peer, .. } | CommError::PeerFailed { peer, .. } => *peer,
            CommError::Aborted { .. } if waited != usize::MAX => waited,
            CommError::Aborted { peer, .. } => *peer,
            CommError::Protocol { peer, .. } => {
                self.link.abort(*peer, &e.to_string());
                return e;
            }
            _ => return e,
        };
        self.link.abort(direct, &e.to_string());
        if matches!(e, CommError::PeerFailed { .. }) {
            return e;
        }
        std::thread::sleep(BLAME_GRACE);
        let reports = self.link.failure_reports();
        let me = self.link.rank();
        let mut culprit = direct;
        let mut seen = vec![me];
        while let Some(&(_, next)) = reports.iter().find(|(reporter, _)| *reporter == culprit) {
            seen.push(culprit);
            if seen.contains(&next) {
                culprit = direct;
                break;
            }
            culprit = next;
        }
        match e {
            CommError::Timeout { op, waited, .. } if culprit == direct => CommError::Timeout { op, peer: culprit, waited },
            CommError::Timeout { op, waited, .. } => CommError::PeerFailed {
                op,
                peer: culprit,
                reason: format!("stopped answering (this rank timed out after {waited:?} waiting on rank {direct}, which waited on it)"),
            },
            CommError::Aborted { op, .. } => CommError::PeerFailed {
                op,
                peer: culprit,
                reason: format!("stopped answering (found by following the ranks' waits from rank {direct})"),
            },
            other => other,
        }
    }

    fn check_root(&self, root: usize, op: Op) -> Result<(), CommError> {
        if root >= self.size() {
            return Err(CommError::InvalidArgument {
                op,
                detail: format!("root {root} outside a group of {}", self.size()),
            });
        }
        Ok(())
    }

    fn check_peer(&self, peer: usize, op: Op) -> Result<(), CommError> {
        if peer >= self.size() || peer == self.rank {
            return Err(CommError::InvalidArgument {
                op,
                detail: format!("peer {peer} is not another rank of a group of {}", self.size()),
            });
        }
        Ok(())
    }

    fn byte_blocks(&self, elems: usize, dtype: DType) -> Vec<Range<usize>> {
        let sz = dtype.size();
        (0..self.size())
            .map(|i| {
                let c = chunk_range(elems, self.size(), i);
                c.start * sz..c.end * sz
            })
            .collect()
    }

    /// Where an ordered point-to-point call with group rank `peer` goes.
    fn wire(&self, peer: usize, tag: u32) -> p2p::Wire<'_> {
        p2p::Wire {
            link: &*self.link,
            data: self.tag(TagClass::User, tag),
            records: self.tag(TagClass::Signature, 1),
            me: self.members[self.rank],
            peer: self.members[peer],
        }
    }

    fn is_whole_world(&self) -> bool {
        self.size() == self.link.world_size() && self.members.iter().enumerate().all(|(i, &m)| i == m)
    }
}

fn whole_elems(len: usize, dtype: DType, op: Op) -> Result<usize, CommError> {
    if !len.is_multiple_of(dtype.size()) {
        return Err(CommError::InvalidArgument {
            op,
            detail: format!("{len} bytes is not a whole number of {dtype} elements"),
        });
    }
    Ok(len / dtype.size())
}

/// A sub-communicator's context: a mix of the parent's and the split's sequence
/// number, never 0 (the world's). Sibling groups of one split share it safely: their
/// members are disjoint.
fn child_context(parent: u32, seq: u32) -> u32 {
    let mut h = (u64::from(parent) << 32 | u64::from(seq)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 29;
    let ctx = (h as u32) & ((1 << Tag::CONTEXT_BITS) - 1);
    if ctx == 0 {
        1
    } else {
        ctx
    }
}

impl Communicator for Group {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size()
    }

    fn send(&self, peer: usize, tag: u32, data: &[u8], dl: Deadline) -> Result<(), CommError> {
        self.check_peer(peer, Op::Send)?;
        if self.ordered.is_on() {
            return self.guarded(Op::Send, || self.ordered.send(peer, &self.wire(peer, tag), data, dl));
        }
        self.guarded(Op::Send, || self.send_to(peer, TagClass::User, tag, data, dl))
    }

    fn recv(&self, peer: usize, tag: u32, dl: Deadline) -> Result<Vec<u8>, CommError> {
        self.check_peer(peer, Op::Recv)?;
        if self.ordered.is_on() {
            return self.guarded(Op::Recv, || {
                self.waiting_on.store(self.members[peer], Ordering::Relaxed);
                self.ordered.recv(peer, &self.wire(peer, tag), dl)
            });
        }
        self.guarded(Op::Recv, || self.recv_from(peer, TagClass::User, tag, dl))
    }

    fn order_point_to_point(&self) -> Result<bool, CommError> {
        self.ordered.enable(self.size());
        Ok(true)
    }

    fn allreduce(&self, buf: &mut [u8], dtype: DType, op: ReduceOp, dl: Deadline) -> Result<(), CommError> {
        let elems = whole_elems(buf.len(), dtype, Op::Allreduce)?;
        self.collective(Op::Allreduce, (Some(dtype), Some(op), elems, None), dl, || {
            let n = self.size();
            if n == 1 {
                return Ok(());
            }
            if self.is_whole_world() {
                match self.link.native_allreduce(buf, dtype, op, dl) {
                    Err(CommError::Unsupported { .. }) => {}
                    other => return other,
                }
            }
            // Hierarchical when asked, or by `Auto` where a flat allreduce would take the
            // ring: below that, one direct round beats three phases of latency.
            if let Some(hosts) = &self.hosts {
                let flat_direct = Algorithm::Auto.choose(buf.len(), n) == Algorithm::Direct;
                match self.algorithm {
                    Algorithm::Hierarchical => return self.hierarchical_allreduce(hosts, buf, dtype, op, dl),
                    Algorithm::Auto if !flat_direct => {
                        return self.hierarchical_allreduce(hosts, buf, dtype, op, dl)
                    }
                    _ => {}
                }
            }
            match self.choice(buf.len()) {
                Algorithm::Direct => self.direct_allreduce(buf, dtype, op, dl),
                Algorithm::HalvingDoubling => self.halving_doubling_allreduce(buf, elems, dtype, op, dl),
                _ => self.ring_allreduce(buf, elems, dtype, op, dl),
            }
        })
    }

    fn broadcast(&self, buf: &mut [u8], root: usize, dl: Deadline) -> Result<(), CommError> {
        let n = self.size();
        if root >= n {
            return Err(CommError::InvalidArgument {
                op: Op::Broadcast,
                detail: format!("root {root} outside a group of {n}"),
            });
        }
        self.collective(Op::Broadcast, (None, None, buf.len(), Some(root)), dl, || {
            let v = (self.rank + n - root) % n;
            match BroadcastAlgorithm::choose(buf.len(), n) {
                BroadcastAlgorithm::Chain => self.chain_broadcast(buf, v, root, dl),
                BroadcastAlgorithm::Binomial => self.binomial_broadcast(buf, v, root, dl),
            }
        })
    }

    fn allgather(&self, input: &[u8], output: &mut [u8], dl: Deadline) -> Result<(), CommError> {
        let n = self.size();
        let len = input.len();
        if output.len() != len * n {
            return Err(CommError::InvalidArgument {
                op: Op::Allgather,
                detail: format!("output is {} bytes, expected {n} x {len}", output.len()),
            });
        }
        self.collective(Op::Allgather, (None, None, len, None), dl, || {
            output[self.rank * len..(self.rank + 1) * len].copy_from_slice(input);
            let blocks: Vec<_> = (0..n).map(|i| i * len..(i + 1) * len).collect();
            self.ring_allgather(output, &blocks, dl)
        })
    }

    fn reduce_scatter(
        &self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        dl: Deadline,
    ) -> Result<(), CommError> {
        let elems = whole_elems(input.len(), dtype, Op::ReduceScatter)?;
        let blocks = self.byte_blocks(elems, dtype);
        let mine = blocks[self.rank].clone();
        if output.len() != mine.len() {
            return Err(CommError::InvalidArgument {
                op: Op::ReduceScatter,
                detail: format!("output is {} bytes, this rank's chunk is {}", output.len(), mine.len()),
            });
        }
        self.collective(Op::ReduceScatter, (Some(dtype), Some(op), elems, None), dl, || {
            self.ring_reduce_scatter_into(input, output, &blocks, dtype, op, dl)?;
            reduce::finish_avg(output, dtype, op, self.size());
            Ok(())
        })
    }

    fn barrier(&self, dl: Deadline) -> Result<(), CommError> {
        self.collective(Op::Barrier, (None, None, 0, None), dl, || {
            let n = self.size();
            let mut dist = 1;
            let mut round = 0;
            while dist < n {
                self.send_to((self.rank + dist) % n, TagClass::Barrier, round, &[], dl)?;
                self.recv_exact((self.rank + n - dist) % n, TagClass::Barrier, round, 0, dl)?;
                dist <<= 1;
                round += 1;
            }
            Ok(())
        })
    }

    fn reduce(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        root: usize,
        dl: Deadline,
    ) -> Result<(), CommError> {
        let elems = whole_elems(buf.len(), dtype, Op::Reduce)?;
        let n = self.size();
        self.check_root(root, Op::Reduce)?;
        self.collective(Op::Reduce, (Some(dtype), Some(op), elems, Some(root)), dl, || {
            let v = (self.rank + n - root) % n;
            match BroadcastAlgorithm::choose(buf.len(), n) {
                BroadcastAlgorithm::Chain => self.chain_reduce(buf, dtype, op, v, root, dl)?,
                BroadcastAlgorithm::Binomial => self.binomial_reduce(buf, dtype, op, v, root, dl)?,
            }
            if v == 0 {
                reduce::finish_avg(buf, dtype, op, n);
            }
            Ok(())
        })
    }

    fn gather(&self, input: &[u8], output: &mut [u8], root: usize, dl: Deadline) -> Result<(), CommError> {
        let (n, len) = (self.size(), input.len());
        self.check_root(root, Op::Gather)?;
        if self.rank == root && output.len() != n * len {
            return Err(CommError::InvalidArgument {
                op: Op::Gather,
                detail: format!("root's output is {} bytes, expected {n} x {len}", output.len()),
            });
        }
        self.collective(Op::Gather, (None, None, len, Some(root)), dl, || {
            if self.rank != root {
                return self.send_to(root, TagClass::Gather, 0, input, dl);
            }
            output[root * len..(root + 1) * len].copy_from_slice(input);
            for q in (0..n).filter(|&q| q != root) {
                let got = self.recv_exact(q, TagClass::Gather, 0, len, dl)?;
                output[q * len..(q + 1) * len].copy_from_slice(&got);
            }
            Ok(())
        })
    }

    fn scatter(&self, input: &[u8], output: &mut [u8], root: usize, dl: Deadline) -> Result<(), CommError> {
        let (n, len) = (self.size(), output.len());
        self.check_root(root, Op::Scatter)?;
        if self.rank == root && input.len() != n * len {
            return Err(CommError::InvalidArgument {
                op: Op::Scatter,
                detail: format!("root's input is {} bytes, expected {n} x {len}", input.len()),
            });
        }
        self.collective(Op::Scatter, (None, None, len, Some(root)), dl, || {
            if self.rank != root {
                let got = self.recv_exact(root, TagClass::Scatter, 0, len, dl)?;
                output.copy_from_slice(&got);
                return Ok(());
            }
            for q in (0..n).filter(|&q| q != root) {
                self.send_to(q, TagClass::Scatter, 0, &input[q * len..(q + 1) * len], dl)?;
            }
            output.copy_from_slice(&input[root * len..(root + 1) * len]);
            Ok(())
        })
    }

    fn all_to_all(&self, input: &[u8], output: &mut [u8], dl: Deadline) -> Result<(), CommError> {
        let n = self.size();
        if input.len() != output.len() || !input.len().is_multiple_of(n) {
            return Err(CommError::InvalidArgument {
                op: Op::AllToAll,
                detail: format!(
                    "input {} and output {} bytes must be equal and {n} equal blocks",
                    input.len(),
                    output.len()
                ),
            });
        }
        let len = input.len() / n;
        self.collective(Op::AllToAll, (None, None, len, None), dl, || {
            let me = self.rank;
            for q in (0..n).filter(|&q| q != me) {
                self.send_to(q, TagClass::AllToAll, 0, &input[q * len..(q + 1) * len], dl)?;
            }
            output[me * len..(me + 1) * len].copy_from_slice(&input[me * len..(me + 1) * len]);
            for q in (0..n).filter(|&q| q != me) {
                let got = self.recv_exact(q, TagClass::AllToAll, 0, len, dl)?;
                output[q * len..(q + 1) * len].copy_from_slice(&got);
            }
            Ok(())
        })
    }

    fn split(
        &self,
        color: Option<u32>,
        key: u32,
        dl: Deadline,
    ) -> Result<Option<Box<dyn Communicator>>, CommError> {
        self.collective(Op::Split, (None, None, 9, None), dl, || {
            let seq = self.splits.fetch_add(1, Ordering::Relaxed);
            // Everyone learns everyone's (color, key): 1 flag byte, color, key.
            let mut mine = [0u8; 9];
            if let Some(c) = color {
                mine[0] = 1;
                mine[1..5].copy_from_slice(&c.to_le_bytes());
            }
            mine[5..9].copy_from_slice(&key.to_le_bytes());
            let n = self.size();
            let mut all = vec![0u8; 9 * n];
            all[self.rank * 9..(self.rank + 1) * 9].copy_from_slice(&mine);
            let blocks: Vec<_> = (0..n).map(|i| i * 9..(i + 1) * 9).collect();
            self.ring_allgather(&mut all, &blocks, dl)?;
            let Some(color) = color else { return Ok(None) };
            let mut same: Vec<(u32, usize)> = all
                .chunks_exact(9)
                .enumerate()
                .filter(|(_, e)| e[0] == 1 && e[1..5] == color.to_le_bytes())
                .map(|(r, e)| (u32::from_le_bytes(e[5..9].try_into().expect("4 bytes")), r))
                .collect();
            same.sort_unstable();
            let members: Arc<[usize]> = same.iter().map(|&(_, r)| self.members[r]).collect();
            let rank = same.iter().position(|&(_, r)| r == self.rank).expect("own entry present");
            let ctx = child_context(self.context, seq);
            let mut sub = Group::new(self.link.clone(), members, rank, ctx).with_algorithm(self.algorithm);
            if let Some(t) = self.tuning.as_deref() {
                sub = sub.with_tuning(t.clone());
            }
            Ok(Some(Box::new(sub) as Box<dyn Communicator>))
        })
    }
}

#[cfg(test)]
mod tests;
