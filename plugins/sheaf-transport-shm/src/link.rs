//! [`ShmLink`]: the blocking link over the segment's byte rings: sending into a peer's
//! ring, draining its own rings into per-peer queues, waiting on its doorbell, and
//! telling a dead peer from a slow one.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sheaf_collectives::reduce;
use sheaf_core::{CommError, DType, Deadline, Link, Op, ReduceOp, Tag};

use crate::config::{ShmConfig, LIVENESS_EVERY};
use crate::inbound::{Partial, Rx, Waiter};
use crate::layout::{
    padding, parse_record_header, rings_offset, seg_u64, ACTIVE, CTRL_BYTES, C_BELL, C_CULPRIT, C_ORDER,
    C_PID, C_REASON, C_REASON_LEN, C_SLEEPERS, C_STATE, DROPPED, HEADER_BYTES, H_ABORT_ORDER, H_ATTACHED,
    H_RING, LEFT, NO_CULPRIT, PUBLISH_MAX, REASON_MAX, RECORD, RECORD_MAGIC, RING_HDR, R_READ, R_WRITE,
};
use crate::segment::{self, Segment};

pub(crate) fn connect_err(detail: impl std::fmt::Display) -> CommError {
    CommError::Transport { op: Op::Connect, detail: detail.to_string() }
}

/// One rank's shared-memory link.
pub struct ShmLink {
    seg: Segment,
    rank: usize,
    world: usize,
    cap: usize,
    send_locks: Vec<Mutex<()>>,
    rx: Vec<Mutex<Rx>>,
    dead: Mutex<(Instant, Vec<Option<String>>)>,
    abort_lock: Mutex<()>,
    closed: AtomicBool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ShmLink {
    /// Creates (rank 0) or receives (the others) the segment, then waits until every
    /// rank has mapped it, all within the connect timeout.
    pub fn connect(config: ShmConfig) -> Result<ShmLink, CommError> {
        let (rank, world) = (config.rank, config.world_size);
        if world == 0 || rank >= world {
            return Err(connect_err(format!("rank {rank} outside a world of {world}")));
        }
        let start = Instant::now();
        let deadline = Deadline::after(Duration::from_millis(config.connect_timeout_ms));
        let name = segment::socket_name(config.master_port);
        let seg = if rank == 0 {
            Self::host(&config, &name, deadline)?
        } else {
            Self::join(&config, &name, deadline)?
        };
        let link = ShmLink {
            cap: seg_u64(&seg, H_RING) as usize,
            seg,
            rank,
            world,
            send_locks: (0..world).map(|_| Mutex::new(())).collect(),
            rx: (0..world).map(|_| Mutex::new(Rx::default())).collect(),
            dead: Mutex::new((Instant::now(), vec![None; world])),
            abort_lock: Mutex::new(()),
            closed: AtomicBool::new(false),
        };
        // The rings this rank writes and reads, and nothing else.
        for peer in (0..world).filter(|&p| p != rank) {
            for ring in [link.ring(rank, peer), link.ring(peer, rank)] {
                link.seg.prefault(ring..ring + RING_HDR + link.cap);
            }
        }
        link.u32_at(link.ctrl(rank) + C_PID).store(std::process::id(), SeqCst);
        link.u32_at(H_ATTACHED).fetch_add(1, SeqCst);
        while link.u32_at(H_ATTACHED).load(SeqCst) < world as u32 {
            if deadline.expired() {
                let missing = (0..world).find(|&p| link.u32_at(link.ctrl(p) + C_PID).load(SeqCst) == 0);
                return Err(CommError::Timeout {
                    op: Op::Connect,
                    peer: missing.unwrap_or(0),
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(link)
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= self.seg.len());
        // SAFETY: in bounds, aligned, and the segment outlives `&self`.
        unsafe { AtomicU32::from_ptr(self.seg.base().add(off).cast()) }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= self.seg.len());
        // SAFETY: as for `u32_at`.
        unsafe { AtomicU64::from_ptr(self.seg.base().add(off).cast()) }
    }

    fn ctrl(&self, rank: usize) -> usize {
        HEADER_BYTES + rank * CTRL_BYTES
    }

    /// Offset of the ring `src -> dst`.
    fn ring(&self, src: usize, dst: usize) -> usize {
        rings_offset(self.world) + (src * self.world + dst) * (RING_HDR + self.cap)
    }

    /// Rings `rank`'s doorbell, waking it if it sleeps.
    fn ring_bell(&self, rank: usize) {
        let c = self.ctrl(rank);
        self.u32_at(c + C_BELL).fetch_add(1, SeqCst);
        if self.u32_at(c + C_SLEEPERS).load(SeqCst) > 0 {
            segment::futex_wake(self.u32_at(c + C_BELL));
        }
    }

    fn my_bell(&self) -> (&AtomicU32, &AtomicU32) {
        let c = self.ctrl(self.rank);
        (self.u32_at(c + C_BELL), self.u32_at(c + C_SLEEPERS))
    }

    /// Copies `src` into ring `ring` at stream position `pos`, wrapping around.
    fn copy_in(&self, ring: usize, pos: u64, src: &[u8]) {
        let off = (pos as usize) & (self.cap - 1);
        let first = src.len().min(self.cap - off);
        // SAFETY: both pieces lie inside the ring's data, in the free space that only
        // this rank (the ring's single writer, under its send lock) writes.
        unsafe {
            let data = self.seg.base().add(ring + RING_HDR);
            std::ptr::copy_nonoverlapping(src.as_ptr(), data.add(off), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), data, src.len() - first);
        }
    }

    /// Appends `len` bytes of ring `ring` from stream position `pos` to `dst`.
    fn copy_out(&self, ring: usize, pos: u64, len: usize, dst: &mut Vec<u8>) {
        let off = (pos as usize) & (self.cap - 1);
        let first = len.min(self.cap - off);
        // SAFETY: both pieces lie inside the ring's data, in the published range that
        // the writer does not touch until this rank (its single reader, under the
        // peer's rx lock) moves the read position past it.
        unsafe {
            let data = self.seg.base().add(ring + RING_HDR);
            dst.extend_from_slice(std::slice::from_raw_parts(data.add(off), first));
            dst.extend_from_slice(std::slice::from_raw_parts(data, len - first));
        }
    }

    /// The record header at stream position `r` of `ring`, `avail` bytes being
    /// published from there: `(tag, payload length)`.
    fn read_header(&self, ring: usize, r: u64, avail: usize) -> Result<(u64, usize), String> {
        let mut head = Vec::with_capacity(RECORD);
        self.copy_out(ring, r, RECORD, &mut head);
        parse_record_header(&head, r, avail, self.cap)
    }

    /// Copies or reduces `dst.len()` bytes of `ring` from stream position `pos` into
    /// `dst`, in place in shared memory.
    fn apply_from_ring(&self, ring: usize, pos: u64, dst: &mut [u8], reduce: Option<(DType, ReduceOp)>) {
        let off = (pos as usize) & (self.cap - 1);
        let first = dst.len().min(self.cap - off);
        // SAFETY: as in `copy_out`: the published range, which only this reader
        // (holding the peer's rx lock) consumes.
        let (a, b) = unsafe {
            let data = self.seg.base().add(ring + RING_HDR);
            (
                std::slice::from_raw_parts(data.add(off), first),
                std::slice::from_raw_parts(data, dst.len() - first),
            )
        };
        let (d1, d2) = dst.split_at_mut(first);
        reduce::copy_or_combine(d1, a, reduce);
        reduce::copy_or_combine(d2, b, reduce);
    }

    /// Reads whatever `peer` has published to this rank into `rx`, without blocking.
    /// Returns whether anything was read.
    fn pump(&self, peer: usize, rx: &mut Rx) -> Result<bool, CommError> {
        if let Some(detail) = &rx.broken {
            return Err(CommError::Protocol { op: Op::Recv, peer, detail: detail.clone() });
        }
        let ring = self.ring(peer, self.rank);
        let mut r = self.u64_at(ring + R_READ).load(Relaxed);
        let w = self.u64_at(ring + R_WRITE).load(Acquire);
        let start = r;
        let mut completed = false;
        loop {
            let avail = w.wrapping_sub(r) as usize;
            match &mut rx.partial {
                None => {
                    if avail < RECORD {
                        break;
                    }
                    let (tag, len) = match self.read_header(ring, r, avail) {
                        Ok(h) => h,
                        Err(detail) => {
                            rx.broken = Some(detail.clone());
                            return Err(CommError::Protocol { op: Op::Recv, peer, detail });
                        }
                    };
                    r += RECORD as u64;
                    let want = len;
                    rx.partial = Some(Partial { tag, want, buf: Vec::with_capacity(want.min(64 << 20)) });
                }
                Some(p) => {
                    let take = avail.min(p.want - p.buf.len());
                    if take == 0 && p.buf.len() < p.want {
                        break;
                    }
                    self.copy_out(ring, r, take, &mut p.buf);
                    r += take as u64;
                }
            }
            if let Some(p) = rx.partial.take_if(|p| p.buf.len() == p.want) {
                r += padding(p.want) as u64;
                rx.stash.entry(p.tag).or_default().push_back(p.buf);
                completed = true;
            } else if w == r {
                break;
            }
        }
        if r != start {
            self.u64_at(ring + R_READ).store(r, Release);
            self.ring_bell(peer);
        }
        if completed {
            // Another thread of this rank may be waiting for what was stashed.
            self.ring_bell(self.rank);
        }
        Ok(r != start)
    }

    /// Drains every incoming ring that no other thread is draining.
    fn pump_all(&self) -> bool {
        let mut progress = false;
        for p in (0..self.world).filter(|&p| p != self.rank) {
            if let Ok(mut rx) = self.rx[p].try_lock() {
                progress |= self.pump(p, &mut rx).unwrap_or(false);
            }
        }
        progress
    }

    /// Peers whose process is gone without closing their link, checked at most every
    /// [`LIVENESS_EVERY`].
    fn dead_peer(&self, first: usize) -> Option<(usize, String)> {
        let mut dead = lock(&self.dead);
        if dead.0.elapsed() >= LIVENESS_EVERY {
            dead.0 = Instant::now();
            for p in (0..self.world).filter(|&p| p != self.rank) {
                if dead.1[p].is_some() {
                    continue;
                }
                let c = self.ctrl(p);
                let state = self.u32_at(c + C_STATE).load(Acquire);
                let pid = self.u32_at(c + C_PID).load(Acquire);
                if state == DROPPED {
                    dead.1[p] = Some("dropped its link without closing it".into());
                } else if state == ACTIVE && !segment::process_alive(pid) {
                    dead.1[p] = Some(format!("its process {pid} exited or crashed"));
                }
            }
        }
        let order = std::iter::once(first).chain(0..self.world);
        order.filter(|&p| p < self.world).find_map(|p| dead.1[p].clone().map(|d| (p, d)))
    }

    /// The earliest abort report of any rank: `(reporter, culprit, reason)`.
    fn abort_reports(&self) -> Vec<(u64, usize, usize, String)> {
        let mut reports: Vec<_> = (0..self.world)
            .filter_map(|r| {
                let c = self.ctrl(r);
                let culprit = self.u64_at(c + C_CULPRIT).load(Acquire);
                (culprit != NO_CULPRIT).then(|| {
                    let order = self.u64_at(c + C_ORDER).load(Relaxed);
                    let len = (self.u32_at(c + C_REASON_LEN).load(Relaxed) as usize).min(REASON_MAX);
                    let mut reason = Vec::with_capacity(len);
                    // SAFETY: the reason bytes were written before the culprit was
                    // published (release) and are never written again.
                    unsafe {
                        let p = self.seg.base().add(c + C_REASON);
                        reason.extend_from_slice(std::slice::from_raw_parts(p, len));
                    }
                    (order, r, culprit as usize, String::from_utf8_lossy(&reason).into_owned())
                })
            })
            .collect();
        reports.sort();
        reports
    }

    /// The error a blocked call on `peer` must return now, if any.
    fn failure(&self, peer: usize, op: Op) -> Option<CommError> {
        if self.closed.load(Relaxed) {
            return Some(CommError::Closed { op });
        }
        if let Some((dead, reason)) = self.dead_peer(peer) {
            return Some(CommError::PeerFailed { op, peer: dead, reason });
        }
        let reports = self.abort_reports();
        reports.into_iter().next().map(|(_, _, culprit, reason)| CommError::Aborted {
            op,
            peer: culprit,
            reason,
        })
    }

    fn peer_left(&self, peer: usize) -> bool {
        self.u32_at(self.ctrl(peer) + C_STATE).load(Acquire) == LEFT
    }

    fn check_peer(&self, peer: usize, op: Op) -> Result<(), CommError> {
        sheaf_core::check_link_peer(self.rank, self.world, peer, op)?;
        if self.closed.load(Relaxed) {
            return Err(CommError::Closed { op });
        }
        Ok(())
    }

    /// Waits until ring `ring` has `need` free bytes, draining incoming rings
    /// meanwhile; returns the free bytes.
    fn wait_space(
        &self,
        ring: usize,
        peer: usize,
        w: u64,
        need: usize,
        dl: Deadline,
        start: Instant,
    ) -> Result<usize, CommError> {
        let mut waiter = Waiter::new();
        let (bell, sleepers) = self.my_bell();
        loop {
            let seen = bell.load(SeqCst);
            let free = self.cap - w.wrapping_sub(self.u64_at(ring + R_READ).load(Acquire)) as usize;
            if free >= need {
                return Ok(free);
            }
            if self.pump_all() {
                waiter.reset();
                continue;
            }
            if self.peer_left(peer) {
                return Err(CommError::PeerFailed { op: Op::Send, peer, reason: "left the world".into() });
            }
            if let Some(e) = self.failure(peer, Op::Send) {
                return Err(e);
            }
            if dl.expired() {
                return Err(CommError::Timeout { op: Op::Send, peer, waited: start.elapsed() });
            }
            waiter.wait(bell, sleepers, seen, dl);
        }
    }
}

impl Link for ShmLink {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn send(&self, peer: usize, tag: Tag, data: &[u8], dl: Deadline) -> Result<(), CommError> {
        self.check_peer(peer, Op::Send)?;
        let start = Instant::now();
        let _one_writer = lock(&self.send_locks[peer]);
        let ring = self.ring(self.rank, peer);
        let write = self.u64_at(ring + R_WRITE);
        let mut w = write.load(Relaxed);
        self.wait_space(ring, peer, w, RECORD, dl, start)?;
        let mut head = [0u8; RECORD];
        head[..8].copy_from_slice(&u64::from(RECORD_MAGIC).to_le_bytes());
        head[8..16].copy_from_slice(&tag.0.to_le_bytes());
        head[16..].copy_from_slice(&(data.len() as u64).to_le_bytes());
        self.copy_in(ring, w, &head);
        w += RECORD as u64;
        let mut off = 0;
        loop {
            let free = self.cap - w.wrapping_sub(self.u64_at(ring + R_READ).load(Acquire)) as usize;
            let take = free.min(data.len() - off).min(PUBLISH_MAX);
            self.copy_in(ring, w, &data[off..off + take]);
            off += take;
            // Positions stay 8-byte aligned: the last piece carries the padding (free
            // space is a multiple of 8, so it fits), so no element straddles a piece.
            w += if off == data.len() { take + padding(data.len()) } else { take } as u64;
            write.store(w, Release);
            self.ring_bell(peer);
            if off == data.len() {
                return Ok(());
            }
            self.wait_space(ring, peer, w, 1, dl, start)?;
        }
    }

    fn recv(&self, peer: usize, tag: Tag, dl: Deadline) -> Result<Vec<u8>, CommError> {
        self.check_peer(peer, Op::Recv)?;
        let start = Instant::now();
        let (bell, sleepers) = self.my_bell();
        let mut waiter = Waiter::new();
        loop {
            let seen = bell.load(SeqCst);
            let left = self.peer_left(peer);
            {
                let mut rx = lock(&self.rx[peer]);
                if let Some(msg) = rx.take(tag.0) {
                    return Ok(msg);
                }
                let progress = self.pump(peer, &mut rx)?;
                if let Some(msg) = rx.take(tag.0) {
                    return Ok(msg);
                }
                if progress {
                    waiter.reset();
                    continue;
                }
                if left {
                    // It left after publishing everything, and we read it all.
                    return Err(CommError::PeerFailed {
                        op: Op::Recv,
                        peer,
                        reason: "left the world".into(),
                    });
                }
            }
            if let Some(e) = self.failure(peer, Op::Recv) {
                return Err(e);
            }
            if dl.expired() {
                return Err(CommError::Timeout { op: Op::Recv, peer, waited: start.elapsed() });
            }
            waiter.wait(bell, sleepers, seen, dl);
        }
    }

    /// Streams a message whose record is at the head of the ring straight into `dst`
    /// (copying or reducing out of shared memory); one that was already drained into
    /// the stash comes from there.
    fn recv_into(
        &self,
        peer: usize,
        tag: Tag,
        dst: &mut [u8],
        reduce: Option<(DType, ReduceOp)>,
        dl: Deadline,
    ) -> Result<(), CommError> {
        self.check_peer(peer, Op::Recv)?;
        let start = Instant::now();
        let (bell, sleepers) = self.my_bell();
        let mut waiter = Waiter::new();
        let mut rx = lock(&self.rx[peer]);
        let ring = self.ring(peer, self.rank);
        let (read, write) = (self.u64_at(ring + R_READ), self.u64_at(ring + R_WRITE));
        let elem = reduce.map_or(1, |(d, _)| d.size());
        let want = dst.len();
        let wrong_len = |got: usize| CommError::Protocol {
            op: Op::Recv,
            peer,
            detail: format!("expected {want} bytes, got {got}"),
        };
        // Bytes of `dst` filled, once this message's record header is consumed.
        let mut filled: Option<usize> = None;
        loop {
            let seen = bell.load(SeqCst);
            let left = self.peer_left(peer);
            if filled.is_none() {
                if let Some(msg) = rx.take(tag.0) {
                    if msg.len() != dst.len() {
                        return Err(wrong_len(msg.len()));
                    }
                    reduce::copy_or_combine(dst, &msg, reduce);
                    return Ok(());
                }
                if let Some(detail) = &rx.broken {
                    return Err(CommError::Protocol { op: Op::Recv, peer, detail: detail.clone() });
                }
                let (r, w) = (read.load(Relaxed), write.load(Acquire));
                let avail = w.wrapping_sub(r) as usize;
                if rx.partial.is_none() && avail >= RECORD {
                    let (t, len) = self.read_header(ring, r, avail).map_err(|detail| {
                        rx.broken = Some(detail.clone());
                        CommError::Protocol { op: Op::Recv, peer, detail }
                    })?;
                    if t == tag.0 {
                        if len != dst.len() {
                            return Err(wrong_len(len));
                        }
                        read.store(r + RECORD as u64, Release);
                        filled = Some(0);
                    }
                }
            }
            if let Some(off) = filled.as_mut() {
                let (r, w) = (read.load(Relaxed), write.load(Acquire));
                let mut take = (w.wrapping_sub(r) as usize).min(dst.len() - *off);
                if take < dst.len() - *off {
                    take -= take % elem;
                }
                if take > 0 || *off == dst.len() {
                    self.apply_from_ring(ring, r, &mut dst[*off..*off + take], reduce);
                    *off += take;
                    let done = *off == dst.len();
                    read.store(r + (take + if done { padding(dst.len()) } else { 0 }) as u64, Release);
                    self.ring_bell(peer);
                    if done {
                        return Ok(());
                    }
                    waiter.reset();
                    continue;
                }
            } else {
                let progress = self.pump(peer, &mut rx)?;
                if progress {
                    waiter.reset();
                    continue;
                }
                if left {
                    return Err(CommError::PeerFailed {
                        op: Op::Recv,
                        peer,
                        reason: "left the world".into(),
                    });
                }
            }
            if self.pump_all() {
                waiter.reset();
                continue;
            }
            let failed = self.failure(peer, Op::Recv).map(Err).or_else(|| {
                dl.expired().then(|| Err(CommError::Timeout { op: Op::Recv, peer, waited: start.elapsed() }))
            });
            if let Some(e) = failed {
                if filled.is_some() {
                    rx.broken = Some("a receive gave up in the middle of a message".into());
                }
                return e;
            }
            waiter.wait(bell, sleepers, seen, dl);
        }
    }

    fn abort(&self, culprit: usize, reason: &str) {
        let _one = lock(&self.abort_lock);
        let c = self.ctrl(self.rank);
        if self.u64_at(c + C_CULPRIT).load(Acquire) == NO_CULPRIT {
            let bytes = &reason.as_bytes()[..reason.len().min(REASON_MAX)];
            // SAFETY: this rank's own reason field, written once, before the culprit
            // is published; readers look only after seeing the culprit.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.seg.base().add(c + C_REASON), bytes.len())
            };
            self.u32_at(c + C_REASON_LEN).store(bytes.len() as u32, Relaxed);
            let order = self.u64_at(H_ABORT_ORDER).fetch_add(1, SeqCst);
            self.u64_at(c + C_ORDER).store(order, Relaxed);
            self.u64_at(c + C_CULPRIT).store(culprit as u64, Release);
        }
        for r in 0..self.world {
            self.ring_bell(r);
        }
    }

    fn failure_reports(&self) -> Vec<(usize, usize)> {
        self.abort_reports().into_iter().map(|(_, reporter, culprit, _)| (reporter, culprit)).collect()
    }

    /// Everything sent is already in shared memory, which outlives this process for as
    /// long as a peer maps it, so closing only marks this rank as gone.
    fn close(&self, _deadline: Deadline) -> Result<(), CommError> {
        if !self.closed.swap(true, SeqCst) {
            self.u32_at(self.ctrl(self.rank) + C_STATE).store(LEFT, Release);
            for r in 0..self.world {
                self.ring_bell(r);
            }
        }
        Ok(())
    }
}

impl Drop for ShmLink {
    fn drop(&mut self) {
        if !self.closed.load(SeqCst) {
            self.u32_at(self.ctrl(self.rank) + C_STATE).store(DROPPED, Release);
            for r in 0..self.world {
                self.ring_bell(r);
            }
        }
    }
}

impl ShmLink {
    /// Puts raw bytes into the ring to `peer`, bypassing framing: for tests of how a
    /// receiver handles a corrupt sender.
    #[cfg(feature = "test-hooks")]
    pub fn write_raw_for_tests(&self, peer: usize, bytes: &[u8]) {
        let _one_writer = lock(&self.send_locks[peer]);
        let ring = self.ring(self.rank, peer);
        let w = self.u64_at(ring + R_WRITE).load(Relaxed);
        self.copy_in(ring, w, bytes);
        self.u64_at(ring + R_WRITE).store(w + bytes.len() as u64, Release);
        self.ring_bell(peer);
    }
}
