//! [`ShmLink`]: the segment's layout, the byte rings, and the blocking link over them.
//!
//! Layout of the segment (every offset 64-byte aligned):
//! - a header: magic, version, world size, ring size, total size, the count of attached
//!   ranks and the counter that orders abort reports;
//! - a control block per rank: its pid, whether it left, its doorbell (a futex word
//!   rung whenever something it may wait for happens) and its abort report;
//! - a ring per ordered pair `(src, dst)`: a write position owned by `src`, a read
//!   position owned by `dst` (on separate cache lines), then `ring_bytes` of data.
//!
//! A message in a ring is a 24-byte record header (magic, tag, length) and the payload.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sheaf_auth::{join, Key};
use sheaf_collectives::reduce;
use sheaf_core::{CommError, DType, Deadline, Link, Op, ReduceOp, Tag};

use crate::segment::{self, Segment};

const MAGIC: u64 = u64::from_le_bytes(*b"SHEAFSHM");
const VERSION: u32 = 1;
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"SHMR");
const RECORD: usize = 24;
/// Largest message a record may announce: protects against a garbage length.
const MAX_MESSAGE: u64 = 1 << 36;

/// A record header (`RECORD` bytes read at stream position `r`, `avail` bytes being
/// published from there in a ring of `cap` bytes): `(tag, payload length)`, or what is
/// wrong with it.
pub(crate) fn parse_record_header(
    head: &[u8],
    r: u64,
    avail: usize,
    cap: usize,
) -> Result<(u64, usize), String> {
    let garbage = || "garbage in its ring (bad record header)".to_string();
    let head: &[u8; RECORD] = head.try_into().map_err(|_| garbage())?;
    let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    let (magic, tag, len) = (word(0) as u32, word(8), word(16));
    if magic != RECORD_MAGIC || avail > cap || !r.is_multiple_of(8) {
        Err(garbage())
    } else if len > MAX_MESSAGE {
        Err(format!("announced a message of {len} bytes"))
    } else {
        Ok((tag, len as usize))
    }
}

/// Bytes of rank 0's challenge: a magic and a nonce.
const CHALLENGE: usize = 8 + sheaf_auth::NONCE;
/// Bytes of a join: a magic, rank, world, the joiner's nonce and its proof.
pub(crate) const JOIN: usize = 16 + sheaf_auth::NONCE + sheaf_auth::PROOF;
/// How long rank 0 waits for one connection's join before it drops it (a stranger
/// that connects and says nothing must not hold up the ranks behind it).
const JOIN_WAIT: Duration = Duration::from_secs(2);

const JOIN_DOMAIN: &str = "sheaf-shm-join";

fn ok_proof(key: &Key, session: &[u8], total: u64) -> [u8; sheaf_auth::PROOF] {
    key.prove("sheaf-shm-ok", &[session, &total.to_le_bytes()])
}

/// A join as rank 0 reads it.
#[derive(Debug, PartialEq)]
pub(crate) enum Joined {
    /// A rank of this run, and its nonce.
    Rank(usize, Vec<u8>),
    /// No proof of the secret over this connection's challenge: refused.
    Refused(String),
    /// A proven join that does not fit this world: the job is misconfigured.
    Mismatch(String),
}

/// Rank 0's reading of a join on the rendezvous socket, the answer to `challenge`.
pub(crate) fn parse_join(join: &[u8], key: &Key, challenge: &[u8], world: usize, joined: &[bool]) -> Joined {
    let Ok(join) = <&[u8; JOIN]>::try_from(join) else {
        return Joined::Refused("garbage".into());
    };
    let field = |i: usize| u32::from_le_bytes(join[i..i + 4].try_into().expect("4 bytes"));
    let (magic, rank, their_world) = (&join[..8], field(8), field(12));
    let (session, proof) = (&join[16..16 + sheaf_auth::NONCE], &join[16 + sheaf_auth::NONCE..]);
    if magic != b"SHMJOIN2" {
        return Joined::Refused("garbage".into());
    }
    let claim = join::Claim { rank: rank.into(), world: their_world.into(), session, extra: &[] };
    match join::check(key, JOIN_DOMAIN, challenge, &claim, proof, world, |r| joined.get(r) != Some(&false)) {
        join::Joined::Rank(rank) => Joined::Rank(rank, session.to_vec()),
        join::Joined::Refused(why) => Joined::Refused(why),
        join::Joined::Mismatch(why) => Joined::Mismatch(why),
    }
}

const HEADER_BYTES: usize = 256;
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_RING: usize = 16;
const H_TOTAL: usize = 24;
const H_ATTACHED: usize = 64;
const H_ABORT_ORDER: usize = 128;

const CTRL_BYTES: usize = 512;
const C_PID: usize = 0;
const C_STATE: usize = 4;
const C_BELL: usize = 64;
const C_SLEEPERS: usize = 68;
const C_CULPRIT: usize = 128;
const C_ORDER: usize = 136;
const C_REASON_LEN: usize = 144;
const C_REASON: usize = 192;
const REASON_MAX: usize = 256;

const RING_HDR: usize = 256;
const R_WRITE: usize = 0;
const R_READ: usize = 128;

const ACTIVE: u32 = 0;
const LEFT: u32 = 1;
const DROPPED: u32 = 2;
const NO_CULPRIT: u64 = u64::MAX;

/// A writer publishes at most this much at a time, so the reader starts copying out
/// while the rest is still being copied in.
const PUBLISH_MAX: usize = 256 << 10;
const _: () = assert!(PUBLISH_MAX.is_multiple_of(8) && RECORD.is_multiple_of(8));
/// How often blocked calls look for peers that died.
const LIVENESS_EVERY: Duration = Duration::from_millis(20);

fn default_connect_ms() -> u64 {
    60_000
}

/// What the host passes to the transport (as JSON). Other keys the host writes for
/// network transports (the advertise address) are ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct ShmConfig {
    pub rank: usize,
    pub world_size: usize,
    #[serde(default)]
    pub master_addr: String,
    pub master_port: u16,
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// Bytes of each ring (a power of two, at least 64 KiB); by default 4 MiB, less
    /// for large worlds so that the segment stays under 2 GiB.
    #[serde(default)]
    pub ring_bytes: Option<usize>,
    /// The job's shared secret, which every joining rank proves it holds before rank 0
    /// hands it the segment (unset: an empty secret, which proves nothing).
    #[serde(default)]
    pub job_token: Option<String>,
}

fn ring_bytes(config: &ShmConfig) -> usize {
    let pairs = (config.world_size * config.world_size).max(1);
    let want = config.ring_bytes.unwrap_or_else(|| (4 << 20).min((2usize << 30) / pairs));
    want.clamp(64 << 10, 1 << 30).next_power_of_two()
}

fn rings_offset(world: usize) -> usize {
    (HEADER_BYTES + world * CTRL_BYTES).next_multiple_of(4096)
}

fn segment_bytes(world: usize, cap: usize) -> usize {
    rings_offset(world) + world * world * (RING_HDR + cap)
}

fn connect_err(detail: impl std::fmt::Display) -> CommError {
    CommError::Transport { op: Op::Connect, detail: detail.to_string() }
}

/// A message being streamed out of a ring.
struct Partial {
    tag: u64,
    want: usize,
    buf: Vec<u8>,
}

/// What this rank has read from one peer's ring but nobody received yet.
#[derive(Default)]
struct Rx {
    stash: HashMap<u64, VecDeque<Vec<u8>>>,
    partial: Option<Partial>,
    broken: Option<String>,
}

impl Rx {
    fn take(&mut self, tag: u64) -> Option<Vec<u8>> {
        self.stash.get_mut(&tag).and_then(VecDeque::pop_front)
    }
}

/// Spin, then yield, then sleep on the doorbell: cheap when the other side answers
/// within microseconds, and no burnt core when it computes for seconds.
struct Waiter {
    since: Option<Instant>,
}

impl Waiter {
    /// Busy-wait this long first: a futex wake-up costs tens of microseconds. Short,
    /// because when both ranks share one core the peer cannot run until we yield
    /// (measured here: with 50 us of spinning, such round trips took 104 us, not 2).
    const SPIN: Duration = Duration::from_micros(20);
    /// Then yield the core this long before sleeping.
    const YIELD: Duration = Duration::from_micros(500);

    fn new() -> Waiter {
        Waiter { since: None }
    }

    fn reset(&mut self) {
        self.since = None;
    }

    fn wait(&mut self, bell: &AtomicU32, sleepers: &AtomicU32, seen: u32, deadline: Deadline) {
        let waited = self.since.get_or_insert_with(Instant::now).elapsed();
        if waited < Self::SPIN {
            // One PAUSE per poll: it lets a sibling hyperthread run, while the poll's
            // own work between PAUSEs keeps a hypervisor from taking the loop for a
            // spin lock (pause-loop exiting deschedules the vCPU for ~100 us).
            std::hint::spin_loop();
        } else if waited < Self::SPIN + Self::YIELD {
            std::thread::yield_now();
        } else {
            sleepers.fetch_add(1, SeqCst);
            if bell.load(SeqCst) == seen {
                segment::futex_wait(bell, seen, deadline.remaining().min(Duration::from_millis(5)));
            }
            sleepers.fetch_sub(1, SeqCst);
        }
    }
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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

    /// Rank 0: creates the segment and hands it to every other rank.
    fn host(config: &ShmConfig, name: &str, deadline: Deadline) -> Result<Segment, CommError> {
        let world = config.world_size;
        let cap = ring_bytes(config);
        let total = segment_bytes(world, cap);
        let seg = Segment::create(total)
            .map_err(|e| connect_err(format!("creating a {total}-byte shared segment: {e}")))?;
        set_u64(&seg, H_MAGIC, MAGIC);
        set_u64(&seg, H_VERSION, u64::from(VERSION) | ((world as u64) << 32));
        set_u64(&seg, H_RING, cap as u64);
        set_u64(&seg, H_TOTAL, total as u64);
        for r in 0..world {
            set_u64(&seg, HEADER_BYTES + r * CTRL_BYTES + C_CULPRIT, NO_CULPRIT);
        }
        if world == 1 {
            return Ok(seg);
        }
        let listener = segment::listen(name).map_err(|e| {
            connect_err(format!(
                "rank 0 listening on the shared-memory rendezvous `{name}`: {e} (is another job using port {}?)",
                config.master_port
            ))
        })?;
        let key = Key::new(config.job_token.as_deref().unwrap_or("").as_bytes());
        let mut joined = vec![false; world];
        joined[0] = true;
        let mut refused = 0u64;
        while joined.iter().any(|j| !j) {
            let Some(mut stream) = segment::accept(&listener, deadline).map_err(connect_err)? else {
                let missing = joined.iter().position(|j| !j).unwrap_or(0);
                return Err(CommError::Timeout { op: Op::Connect, peer: missing, waited: Duration::ZERO });
            };
            // Challenge, then a proof of the secret over it, before anything is handed over.
            let nonce = sheaf_auth::nonce();
            let mut challenge = b"SHMCHAL1".to_vec();
            challenge.extend_from_slice(&nonce);
            let mut join = [0u8; JOIN];
            let wait = Deadline::after(deadline.remaining().min(JOIN_WAIT));
            let read = segment::write_all(&mut stream, &challenge, wait)
                .and_then(|()| segment::read_exact(&mut stream, &mut join, wait));
            let verdict = match read {
                Ok(()) => parse_join(&join, &key, &nonce, world, &joined),
                Err(e) => Joined::Refused(format!("a connection that sent no join ({e})")),
            };
            let (their_rank, session) = match verdict {
                Joined::Rank(r, session) => (r, session),
                Joined::Refused(why) => {
                    refused += 1;
                    if refused <= 4 || refused.is_power_of_two() {
                        eprintln!(
                            "sheaf-shm: rank 0 refused {why} on the rendezvous `{name}` ({refused} refused so far)"
                        );
                    }
                    let reason = "no proof of the job's secret (is SHEAF_JOB_TOKEN the same on every rank?)";
                    let _ = segment::write_all(&mut stream, format!("SHMERR{reason}").as_bytes(), wait);
                    continue;
                }
                Joined::Mismatch(p) => {
                    let _ = segment::write_all(&mut stream, format!("SHMERR{p}").as_bytes(), deadline);
                    return Err(connect_err(p));
                }
            };
            joined[their_rank] = true;
            let mut reply = b"SHMOK\0\0\0".to_vec();
            reply.extend_from_slice(&(total as u64).to_le_bytes());
            reply.extend_from_slice(&ok_proof(&key, &session, total as u64));
            segment::send_fd(&stream, seg.raw_fd(), &reply)
                .map_err(|e| connect_err(format!("handing the segment to rank {their_rank}: {e}")))?;
        }
        Ok(seg)
    }

    /// Ranks other than 0: receive the segment's descriptor from rank 0 and map it.
    fn join(config: &ShmConfig, name: &str, deadline: Deadline) -> Result<Segment, CommError> {
        let (rank, world) = (config.rank, config.world_size);
        let mut stream = segment::connect(name, deadline).map_err(|e| {
            connect_err(format!(
                "rank {rank} could not reach rank 0's shared-memory rendezvous `{name}` in {} ms: {e} (the shm transport joins ranks on one host)",
                config.connect_timeout_ms
            ))
        })?;
        let key = Key::new(config.job_token.as_deref().unwrap_or("").as_bytes());
        let mut challenge = [0u8; CHALLENGE];
        segment::read_exact(&mut stream, &mut challenge, deadline)
            .map_err(|e| connect_err(format!("rank {rank} waiting for rank 0's challenge: {e}")))?;
        if &challenge[..8] != b"SHMCHAL1" {
            return Err(connect_err("rank 0 answered the shared-memory rendezvous with garbage"));
        }
        let session = sheaf_auth::nonce();
        let mut join = b"SHMJOIN2".to_vec();
        join.extend_from_slice(&(rank as u32).to_le_bytes());
        join.extend_from_slice(&(world as u32).to_le_bytes());
        join.extend_from_slice(&session);
        let claim = join::Claim { rank: rank as u64, world: world as u64, session: &session, extra: &[] };
        join.extend_from_slice(&claim.prove(&key, JOIN_DOMAIN, &challenge[8..]));
        segment::write_all(&mut stream, &join, deadline).map_err(connect_err)?;
        let mut reply = [0u8; 512];
        let (n, fd) = segment::recv_fd(&stream, &mut reply, deadline)
            .map_err(|e| connect_err(format!("rank {rank} waiting for rank 0's segment: {e}")))?;
        let reply = &reply[..n];
        if let Some(err) = reply.strip_prefix(b"SHMERR") {
            return Err(connect_err(format!("rank 0 refused rank {rank}: {}", String::from_utf8_lossy(err))));
        }
        let (Some(fd), Some(rest)) =
            (fd, reply.strip_prefix(b"SHMOK\0\0\0").filter(|t| t.len() == 8 + sheaf_auth::PROOF))
        else {
            return Err(connect_err("rank 0 answered the shared-memory rendezvous with garbage"));
        };
        let total = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        if !key.verify("sheaf-shm-ok", &[&session, &total.to_le_bytes()], &rest[8..]) {
            return Err(connect_err(
                "rank 0 could not prove it holds the job's secret (is SHEAF_JOB_TOKEN the same on every rank?)",
            ));
        }
        let total = total as usize;
        let seg =
            Segment::open(fd, total).map_err(|e| connect_err(format!("mapping the shared segment: {e}")))?;
        let version = seg_u64(&seg, H_VERSION);
        if seg_u64(&seg, H_MAGIC) != MAGIC || version as u32 != VERSION || (version >> 32) as usize != world {
            return Err(connect_err(format!(
                "the shared segment is not a world of {world} of this version (header {version:#x})"
            )));
        }
        let cap = seg_u64(&seg, H_RING) as usize;
        if !cap.is_power_of_two() || segment_bytes(world, cap) != total {
            return Err(connect_err("the shared segment's ring size does not match its length"));
        }
        Ok(seg)
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

/// Bytes after a payload of `len` bytes up to the next multiple of 8.
fn padding(len: usize) -> usize {
    len.next_multiple_of(8) - len
}

fn seg_u64(seg: &Segment, off: usize) -> u64 {
    // SAFETY: in bounds and aligned; written before the segment was shared.
    unsafe { AtomicU64::from_ptr(seg.base().add(off).cast()).load(SeqCst) }
}

fn set_u64(seg: &Segment, off: usize, v: u64) {
    // SAFETY: as for `seg_u64`.
    unsafe { AtomicU64::from_ptr(seg.base().add(off).cast()).store(v, SeqCst) }
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
    #[doc(hidden)]
    pub fn write_raw_for_tests(&self, peer: usize, bytes: &[u8]) {
        let _one_writer = lock(&self.send_locks[peer]);
        let ring = self.ring(self.rank, peer);
        let w = self.u64_at(ring + R_WRITE).load(Relaxed);
        self.copy_in(ring, w, bytes);
        self.u64_at(ring + R_WRITE).store(w + bytes.len() as u64, Release);
        self.ring_bell(peer);
    }
}
