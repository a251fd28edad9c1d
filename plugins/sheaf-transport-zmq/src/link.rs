//! [`ZmqLink`]: the blocking side (host threads) and the async side (the plugin's
//! runtime) of the ZeroMQ transport, sharing one state behind a mutex.
//!
//! The runtime has no worker threads of its own. A host thread that must wait (for a
//! message, for credit, for goodbyes) runs the runtime itself until what it waits for
//! has happened, as MPI's progress engine runs inside its blocking calls: the frames
//! it sends are written and the frames it waits for are read on its own thread, with
//! no wakeup of another thread on the way. While no host thread is in the link (the
//! trainer computing), an idle driver thread runs the runtime instead, so heartbeats,
//! receipts and reads go on; it hands the runtime back as soon as a host thread asks.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use sheaf_auth::{join, Key};
use sheaf_collectives::reduce;
use sheaf_core::{CommError, DType, Deadline, Link, Op, ReduceOp, Tag, TagClass};
use tokio::sync::Notify;
use zeromq::{
    util::PeerIdentity, DealerSocket, PullSocket, PushSocket, RouterSocket, Socket, SocketEvent,
    SocketOptions, SocketRecv, SocketSend, ZmqMessage,
};

use crate::wire::{self, Kind};

/// `tcp://` or `ipc://` for the data plane (rendezvous is always TCP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Tcp,
    Ipc,
}

fn default_connect_ms() -> u64 {
    60_000
}
fn default_peer_timeout_ms() -> u64 {
    15_000
}
fn default_heartbeat_ms() -> u64 {
    500
}
fn default_chunk() -> usize {
    1 << 20
}
fn default_window() -> usize {
    16 << 20
}
/// 200 µs, or `SHEAF_ZMQ_SPIN_US` (as NCCL and MPI take their progress knobs from the
/// environment; the host does not pass transport tuning through the job).
fn default_spin_us() -> u64 {
    std::env::var("SHEAF_ZMQ_SPIN_US").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
}

/// What the host passes to the transport (as JSON).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZmqConfig {
    pub rank: usize,
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// The address peers reach this rank's inbox at. Defaults to `127.0.0.1` when the
    /// master is on this host; required otherwise.
    #[serde(default)]
    pub advertise_addr: Option<String>,
    /// Directory for `ipc://` socket files; unset, the sockets live in Linux's abstract
    /// namespace (no file, so nothing is left behind even when a rank is killed).
    #[serde(default)]
    pub ipc_dir: Option<String>,
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// A peer silent (no message, no heartbeat) this long is declared dead.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_chunk")]
    pub chunk_bytes: usize,
    /// Unacknowledged bytes allowed in flight to one peer.
    #[serde(default = "default_window")]
    pub window_bytes: usize,
    /// How long a waiting call polls the sockets before it sleeps in the kernel:
    /// lower latency for CPU time (0: always sleep).
    #[serde(default = "default_spin_us")]
    pub spin_us: u64,
    /// The job's shared secret: every rank proves it holds it at the rendezvous, and
    /// every frame is sealed with a key derived from it (unset: an empty secret, which
    /// proves nothing; the host always sets it for worlds of more than one).
    #[serde(default)]
    pub job_token: Option<String>,
}

/// Largest message a peer may announce: protects against a garbage length.
const MAX_MESSAGE: u64 = 1 << 36;
/// How often blocked calls re-check liveness.
const POLL: Duration = Duration::from_millis(50);

/// The socket to one peer's inbox. Host threads put frames on it themselves (a
/// queue push inside the crate, no hop through a task of ours), and so do the
/// runtime's tasks for acknowledgements and heartbeats; the lock keeps each frame
/// whole.
type Outbox = Arc<tokio::sync::Mutex<Sealer>>;

/// A peer's socket, and the seal of every frame put on it: the next sequence number
/// on this stream and the run's link key.
struct Sealer {
    socket: PushSocket,
    dst: u32,
    next: u64,
    key: Arc<Key>,
}

impl Sealer {
    fn seal(&mut self, frame: &mut [u8]) {
        wire::seal(frame, &self.key, self.dst, self.next);
        self.next += 1;
    }
}

/// Seals one frame and puts it on `outbox`, from a host thread.
fn post(outbox: &Outbox, mut frame: Vec<u8>) -> Result<(), String> {
    let mut out = outbox.blocking_lock();
    out.seal(&mut frame);
    futures::executor::block_on(out.socket.send(frame.into())).map_err(|e| e.to_string())
}

/// Seals one frame and puts it on `outbox`, from the runtime.
async fn post_async(outbox: &Outbox, mut frame: Vec<u8>) -> Result<(), String> {
    let mut out = outbox.lock().await;
    out.seal(&mut frame);
    out.socket.send(frame.into()).await.map_err(|e| e.to_string())
}

/// The identity rank `rank` connects to its peers' inboxes with: its rank and its
/// rendezvous nonce, which only the run's ranks know.
fn identity(rank: usize, sessions: &[String]) -> String {
    format!("rank-{rank}-{}", sessions[rank])
}

/// A message being assembled: its chunks' payloads, kept as the frames they arrived
/// in (no copy until a receive puts them where they belong).
struct Partial {
    total: u64,
    got: u64,
    chunks: Vec<Bytes>,
}

struct State {
    queues: HashMap<(usize, u64), VecDeque<Vec<Bytes>>>,
    partial: HashMap<(usize, u64), Partial>,
    /// Bytes sent to each peer and not yet acknowledged.
    inflight: Vec<u64>,
    /// Bytes sent to each peer since the last chunk that asked for a receipt.
    since_sync: Vec<u64>,
    /// Bytes received from each peer and not yet acknowledged.
    unacked: Vec<u64>,
    last_seen: Vec<Instant>,
    hello: Vec<bool>,
    dead: Vec<Option<String>>,
    left: Vec<bool>,
    bye_acked: Vec<bool>,
    protocol: Vec<Option<String>>,
    /// The sequence number of the next frame from each peer.
    next_in: Vec<u64>,
    /// Frames dropped because they came from no rank of this run.
    refused: u64,
    garbage: Option<String>,
    abort: Option<(usize, String)>,
    reports: Vec<(usize, usize)>,
    closing: bool,
    closed: bool,
}

struct Shared {
    rank: usize,
    world: usize,
    peer_timeout: Duration,
    /// The run's link key, once the rendezvous has given every rank's nonce.
    link_key: std::sync::OnceLock<Arc<Key>>,
    state: Mutex<State>,
    /// Told after every change of `state` a waiting host thread may care about.
    wake: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks peers silent for longer than the peer timeout as dead.
    fn check_liveness(&self, st: &mut State) {
        let now = Instant::now();
        for p in (0..self.world).filter(|&p| p != self.rank) {
            if st.dead[p].is_none() && !st.left[p] && now.duration_since(st.last_seen[p]) > self.peer_timeout
            {
                st.dead[p] = Some(format!("no message or heartbeat for {:?}", self.peer_timeout));
            }
        }
    }

    /// The error a blocked call on `peer` must return now, if any.
    fn failure(&self, st: &mut State, peer: usize, op: Op) -> Option<CommError> {
        self.check_liveness(st);
        if st.closed {
            return Some(CommError::Closed { op });
        }
        if let Some(detail) = &st.protocol[peer] {
            return Some(CommError::Protocol { op, peer, detail: detail.clone() });
        }
        if let Some(detail) = &st.garbage {
            return Some(CommError::Transport { op, detail: detail.clone() });
        }
        if let Some(reason) = &st.dead[peer] {
            return Some(CommError::PeerFailed { op, peer, reason: reason.clone() });
        }
        if let Some((dead, reason)) = st.dead.iter().enumerate().find_map(|(r, d)| d.as_ref().map(|d| (r, d)))
        {
            return Some(CommError::PeerFailed { op, peer: dead, reason: reason.clone() });
        }
        if let Some((culprit, reason)) = &st.abort {
            return Some(CommError::Aborted { op, peer: *culprit, reason: reason.clone() });
        }
        None
    }

    /// Records that frames to `peer` can no longer be sent.
    fn sending_failed(&self, peer: usize, error: &str) {
        let mut st = self.lock();
        if !st.left[peer] && st.dead[peer].is_none() {
            st.dead[peer] = Some(format!("sending failed: {error}"));
        }
        drop(st);
        self.wake.notify_waiters();
    }

    /// Drops a frame that came from no rank of this run, and says so (the first few
    /// and then at powers of two, so a flood cannot flood the log).
    fn refuse(&self, st: &mut State, bytes: &[u8], why: &str) {
        st.refused += 1;
        let n = st.refused;
        if n <= 4 || n.is_power_of_two() {
            let claim = wire::claimed_src(bytes).map_or_else(String::new, |s| format!(", claiming rank {s}"));
            eprintln!(
                "sheaf-zmq: rank {} refused {why} ({} bytes{claim}; {n} refused so far)",
                self.rank,
                bytes.len()
            );
        }
    }

    /// Handles one frame from the inbox; returns frames to send in reply.
    fn handle(&self, raw: &Bytes) -> Vec<(usize, Vec<u8>)> {
        let bytes: &[u8] = raw;
        let mut replies = Vec::new();
        let mut st = self.lock();
        let Some(key) = self.link_key.get() else {
            self.refuse(&mut st, bytes, "a frame before the rendezvous ended");
            return replies;
        };
        // Only frames sealed by a rank of this run, in sequence, are read at all.
        let frame = match wire::decode(bytes) {
            Ok(f) => f,
            Err(e) => {
                self.refuse(&mut st, bytes, &e);
                return replies;
            }
        };
        let src = frame.src as usize;
        if src >= self.world || src == self.rank {
            self.refuse(&mut st, bytes, &format!("a frame claiming rank {src} in a world of {}", self.world));
            return replies;
        }
        match wire::unseal(bytes, key, self.rank as u32) {
            Some(seq) if seq == st.next_in[src] => st.next_in[src] += 1,
            Some(seq) => {
                let why = format!("frame {seq} from rank {src} out of sequence (a replay?)");
                self.refuse(&mut st, bytes, &why);
                return replies;
            }
            None => {
                self.refuse(&mut st, bytes, "a frame whose seal does not verify (no secret)");
                return replies;
            }
        }
        st.last_seen[src] = Instant::now();
        match frame.kind {
            Kind::Data | Kind::DataSync => {
                let key = (src, frame.tag);
                let (total, offset, len) = (frame.a, frame.b, frame.payload.len() as u64);
                let ok = if offset == 0 && !st.partial.contains_key(&key) {
                    if total > MAX_MESSAGE {
                        Err(format!("announced message of {total} bytes"))
                    } else {
                        st.partial.insert(key, Partial { total, got: 0, chunks: Vec::new() });
                        Ok(())
                    }
                } else {
                    match st.partial.get(&key) {
                        Some(p) if p.total == total && p.got == offset => Ok(()),
                        _ => Err(format!(
                            "chunk at offset {offset} of a {total}-byte message arrived out of order"
                        )),
                    }
                };
                match ok.and_then(|()| {
                    let p = st.partial.get_mut(&key).expect("inserted above");
                    if p.got + len > p.total {
                        return Err(format!("chunk overruns a {}-byte message", p.total));
                    }
                    if len > 0 {
                        p.chunks.push(raw.slice(wire::HEADER..));
                    }
                    p.got += len;
                    Ok(p.got == p.total)
                }) {
                    Ok(complete) => {
                        if complete {
                            let p = st.partial.remove(&key).expect("present");
                            st.queues.entry(key).or_default().push_back(p.chunks);
                        }
                        // One cumulative receipt, only where the sender asked for it.
                        st.unacked[src] += len;
                        if frame.kind == Kind::DataSync {
                            let bytes = std::mem::take(&mut st.unacked[src]);
                            replies.push((src, wire::encode(Kind::Ack, self.rank as u32, 0, bytes, 0, &[])));
                        }
                    }
                    Err(e) => st.protocol[src] = Some(e),
                }
            }
            Kind::Ack => {
                if frame.a > st.inflight[src] {
                    st.protocol[src] = Some(format!(
                        "acknowledged {} bytes but only {} were in flight",
                        frame.a, st.inflight[src]
                    ));
                } else {
                    st.inflight[src] -= frame.a;
                }
            }
            Kind::Hello => st.hello[src] = true,
            Kind::Heartbeat => {}
            Kind::Bye => {
                st.left[src] = true;
                replies.push((src, wire::encode(Kind::ByeAck, self.rank as u32, 0, 0, 0, &[])));
            }
            Kind::ByeAck => {
                // The peer answers `Bye` after every frame sent before it: all arrived.
                st.bye_acked[src] = true;
                st.inflight[src] = 0;
            }
            Kind::Abort => {
                let culprit = frame.tag as usize;
                let reason = String::from_utf8_lossy(frame.payload).into_owned();
                st.reports.push((src, culprit));
                if st.abort.is_none() {
                    st.abort = Some((culprit, reason));
                }
            }
        }
        drop(st);
        self.wake.notify_waiters();
        replies
    }
}

/// How long the link must have been left alone before the idle driver takes the
/// runtime: long enough that a collective's calls in a row keep it on their thread.
const IDLE: Duration = Duration::from_millis(2);
/// The longest the idle driver holds the runtime before looking again.
const IDLE_TURN: Duration = Duration::from_millis(100);

/// The runtime and who runs it: host threads inside [`Progress::drive`], or the
/// idle driver while none is.
struct Progress {
    runtime: tokio::runtime::Runtime,
    /// Host threads inside `drive`.
    active: AtomicUsize,
    /// When the last `drive` ended, in nanoseconds since `epoch`.
    last_end: AtomicU64,
    epoch: Instant,
    /// The idle driver holds (or is about to hold) the runtime.
    idle_driving: AtomicBool,
    /// A host thread wants the runtime back from the idle driver.
    wanted: Notify,
    stop: AtomicBool,
}

impl Progress {
    fn new(runtime: tokio::runtime::Runtime) -> Progress {
        Progress {
            runtime,
            active: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            epoch: Instant::now(),
            idle_driving: AtomicBool::new(false),
            wanted: Notify::new(),
            stop: AtomicBool::new(false),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Runs the runtime on this thread until `fut` is done (taking it from the idle
    /// driver first, or sharing it with other host threads).
    fn drive<T>(&self, fut: impl Future<Output = T>) -> T {
        self.active.fetch_add(1, Ordering::SeqCst);
        // Either the idle driver sees `active` before it takes the runtime, or this
        // thread sees it driving and asks for the runtime back.
        if self.idle_driving.load(Ordering::SeqCst) {
            self.wanted.notify_one();
        }
        let out = self.runtime.block_on(fut);
        self.last_end.store(self.now_ns(), Ordering::SeqCst);
        self.active.fetch_sub(1, Ordering::SeqCst);
        out
    }

    /// Runs the tasks that are ready (the writers of frames just posted) and returns.
    fn kick(&self) {
        self.drive(tokio::task::yield_now());
    }

    /// The idle driver's loop: runs the runtime whenever no host thread has been in
    /// the link for [`IDLE`], until the link is dropped.
    fn idle_driver(&self) {
        let idle_ns = u64::try_from(IDLE.as_nanos()).unwrap_or(u64::MAX);
        while !self.stop.load(Ordering::SeqCst) {
            let quiet = self.active.load(Ordering::SeqCst) == 0
                && self.now_ns().saturating_sub(self.last_end.load(Ordering::SeqCst)) >= idle_ns;
            if !quiet {
                std::thread::sleep(IDLE);
                continue;
            }
            self.idle_driving.store(true, Ordering::SeqCst);
            if self.active.load(Ordering::SeqCst) == 0 {
                self.runtime.block_on(async {
                    let _ = tokio::time::timeout(IDLE_TURN, self.wanted.notified()).await;
                });
            }
            self.idle_driving.store(false, Ordering::SeqCst);
        }
    }
}

/// One rank's ZeroMQ link.
pub struct ZmqLink {
    shared: Arc<Shared>,
    outboxes: Vec<Option<Outbox>>,
    send_locks: Vec<Mutex<()>>,
    chunk: usize,
    window: u64,
    spin: Duration,
    progress: Arc<Progress>,
    idle_driver: Option<JoinHandle<()>>,
    /// A collective's signature was posted without running the writers: the next
    /// send or receive runs them (see `TagClass::Signature`).
    deferred: std::sync::atomic::AtomicBool,
    /// Every rank's inbox address.
    endpoints: Vec<String>,
}

fn connect_err(detail: impl std::fmt::Display) -> CommError {
    CommError::Transport { op: Op::Connect, detail: detail.to_string() }
}

fn is_loopback(addr: &str) -> bool {
    addr == "localhost" || addr.starts_with("127.") || addr == "::1"
}

/// The rendezvous, as JSON messages between rank 0's ROUTER and each peer's DEALER:
/// `Hello`, rank 0's `Challenge` (a fresh nonce), the peer's `Join` proving it holds the
/// job's secret over that nonce and what it claims, and rank 0's `Table` of inboxes and
/// rendezvous nonces, proving the same over the peer's nonce. `Refused` tells a peer
/// why rank 0 did not take its join.
#[derive(Debug, serde::Serialize, Deserialize)]
#[serde(tag = "type")]
pub(crate) enum Rendezvous {
    Hello { rank: usize },
    Challenge { nonce: String },
    Join { rank: usize, world_size: usize, endpoint: String, session: String, proof: String },
    Table { endpoints: Vec<String>, sessions: Vec<String>, proof: String },
    Refused { reason: String },
}

const JOIN: &str = "sheaf-zmq-join";
const TABLE: &str = "sheaf-zmq-table";

/// A peer's join as rank 0 reads it.
#[derive(Debug, PartialEq)]
pub(crate) enum Joined {
    /// A rank of this run: its rank, inbox and rendezvous nonce.
    Rank { rank: usize, endpoint: String, session: String },
    /// No proof of the secret over this connection's challenge: a stranger (or a
    /// replayed join), refused.
    Refused(String),
    /// A proven join that does not fit this world: the job is misconfigured.
    Mismatch(String),
}

/// Rank 0's reading of `msg`, the answer to `challenge`, with `table` holding the
/// inboxes of the ranks joined so far (its length is the world's size).
pub(crate) fn check_join(key: &Key, challenge: &[u8], msg: &Rendezvous, table: &[String]) -> Joined {
    let Rendezvous::Join { rank, world_size, endpoint, session, proof } = msg else {
        return Joined::Refused("a message that is not a join".into());
    };
    let proof = sheaf_auth::unhex(proof).unwrap_or_default();
    // The inbox is claimed too: rank 0 hands it to every other rank.
    let extra = [endpoint.as_bytes()];
    let claim = join::Claim {
        rank: *rank as u64,
        world: *world_size as u64,
        session: session.as_bytes(),
        extra: &extra,
    };
    match join::check(key, JOIN, challenge, &claim, &proof, table.len(), |r| !table[r].is_empty()) {
        join::Joined::Rank(rank) => {
            Joined::Rank { rank, endpoint: endpoint.clone(), session: session.clone() }
        }
        join::Joined::Refused(why) => Joined::Refused(why),
        join::Joined::Mismatch(why) => Joined::Mismatch(why),
    }
}

fn table_proof(
    key: &Key,
    session: &str,
    endpoints: &[String],
    sessions: &[String],
) -> [u8; sheaf_auth::PROOF] {
    let (e, s) = (
        serde_json::to_string(endpoints).expect("strings"),
        serde_json::to_string(sessions).expect("strings"),
    );
    key.prove(TABLE, &[session.as_bytes(), e.as_bytes(), s.as_bytes()])
}

/// A peer's reading of rank 0's answer to its join (whose nonce was `session`):
/// every rank's inbox and nonce, proven by rank 0.
pub(crate) fn check_table(
    key: &Key,
    session: &str,
    msg: &Rendezvous,
    world: usize,
) -> Result<(Vec<String>, Vec<String>), String> {
    match msg {
        Rendezvous::Table { endpoints, sessions, proof } => {
            if endpoints.len() != world || sessions.len() != world {
                return Err(format!(
                    "rank 0 answered with a table of {} ranks for a world of {world}",
                    endpoints.len()
                ));
            }
            let proof = sheaf_auth::unhex(proof).unwrap_or_default();
            if !key.verify(
                TABLE,
                &[
                    session.as_bytes(),
                    serde_json::to_string(endpoints).expect("strings").as_bytes(),
                    serde_json::to_string(sessions).expect("strings").as_bytes(),
                ],
                &proof,
            ) {
                return Err("rank 0 could not prove it holds the job's secret (is SHEAF_JOB_TOKEN the same on every rank?)".into());
            }
            Ok((endpoints.clone(), sessions.clone()))
        }
        Rendezvous::Refused { reason } => Err(format!("rank 0 refused this rank: {reason}")),
        _ => Err("rank 0 answered the rendezvous with garbage".into()),
    }
}

async fn send_to(router: &mut RouterSocket, id: &Bytes, msg: &Rendezvous) -> Result<(), CommError> {
    let mut reply = ZmqMessage::from(id.clone());
    reply.push_back(serde_json::to_vec(msg).expect("serialises").into());
    router.send(reply).await.map_err(connect_err)
}

/// Rank 0's side: challenges every connection, takes the joins that prove the
/// secret (refusing and logging the rest, which never end the rendezvous), and
/// answers each rank with the table.
async fn rendezvous_as_rank_0(
    router: &mut RouterSocket,
    key: &Key,
    world: usize,
    mine: String,
) -> Result<(Vec<String>, Vec<String>), CommError> {
    let mut table = vec![String::new(); world];
    let mut sessions = vec![String::new(); world];
    table[0] = mine;
    sessions[0] = sheaf_auth::hex(&sheaf_auth::nonce());
    let mut challenges: HashMap<Bytes, [u8; sheaf_auth::NONCE]> = HashMap::new();
    let mut joined: Vec<(Bytes, usize)> = Vec::new();
    let mut refused = 0u64;
    let mut refuse = |why: String| {
        refused += 1;
        if refused <= 4 || refused.is_power_of_two() {
            eprintln!("sheaf-zmq: rank 0 refused {why} on the rendezvous port ({refused} refused so far)");
        }
    };
    while joined.len() < world - 1 {
        let msg = router.recv().await.map_err(connect_err)?;
        let (Some(id), Some(body)) = (msg.get(0), msg.get(1)) else {
            refuse("a message without a body".into());
            continue;
        };
        let msg: Rendezvous = match serde_json::from_slice(body) {
            Ok(m) => m,
            Err(e) => {
                refuse(format!("garbage ({e})"));
                continue;
            }
        };
        if let Rendezvous::Hello { .. } = msg {
            // Bounded: a flood of hellos forgets old challenges, not memory.
            if challenges.len() >= 1024 {
                challenges.clear();
            }
            let nonce = sheaf_auth::nonce();
            challenges.insert(id.clone(), nonce);
            send_to(router, id, &Rendezvous::Challenge { nonce: sheaf_auth::hex(&nonce) }).await?;
            continue;
        }
        let Some(challenge) = challenges.remove(id) else {
            refuse("a message before its challenge".into());
            continue;
        };
        match check_join(key, &challenge, &msg, &table) {
            Joined::Rank { rank, endpoint, session } => {
                table[rank] = endpoint;
                sessions[rank] = session;
                joined.push((id.clone(), rank));
            }
            Joined::Refused(why) => {
                refuse(why);
                let reason =
                    "no proof of the job's secret (is SHEAF_JOB_TOKEN the same on every rank?)".into();
                send_to(router, id, &Rendezvous::Refused { reason }).await?;
            }
            Joined::Mismatch(why) => return Err(connect_err(why)),
        }
    }
    for (id, rank) in &joined {
        let proof = sheaf_auth::hex(&table_proof(key, &sessions[*rank], &table, &sessions));
        let msg = Rendezvous::Table { endpoints: table.clone(), sessions: sessions.clone(), proof };
        send_to(router, id, &msg).await?;
    }
    Ok((table, sessions))
}

/// A peer's side: hello, answer rank 0's challenge with a proof, check rank 0's.
async fn rendezvous_as_peer(
    dealer: &mut DealerSocket,
    key: &Key,
    rank: usize,
    world: usize,
    mine: String,
) -> Result<(Vec<String>, Vec<String>), CommError> {
    let send = |msg: &Rendezvous| ZmqMessage::from(serde_json::to_vec(msg).expect("serialises"));
    dealer.send(send(&Rendezvous::Hello { rank })).await.map_err(connect_err)?;
    let reply = dealer.recv().await.map_err(connect_err)?;
    let challenge = match reply.get(0).and_then(|b| serde_json::from_slice::<Rendezvous>(b).ok()) {
        Some(Rendezvous::Challenge { nonce }) => sheaf_auth::unhex(&nonce)
            .ok_or_else(|| connect_err("rank 0 answered the rendezvous with garbage"))?,
        _ => return Err(connect_err("rank 0 answered the rendezvous with garbage")),
    };
    let session = sheaf_auth::hex(&sheaf_auth::nonce());
    let extra = [mine.as_bytes()];
    let claim =
        join::Claim { rank: rank as u64, world: world as u64, session: session.as_bytes(), extra: &extra };
    let proof = sheaf_auth::hex(&claim.prove(key, JOIN, &challenge));
    let join = Rendezvous::Join { rank, world_size: world, endpoint: mine, session: session.clone(), proof };
    dealer.send(send(&join)).await.map_err(connect_err)?;
    let reply = dealer.recv().await.map_err(connect_err)?;
    let msg = reply
        .get(0)
        .and_then(|b| serde_json::from_slice::<Rendezvous>(b).ok())
        .ok_or_else(|| connect_err("rank 0 answered the rendezvous with garbage"))?;
    check_table(key, &session, &msg, world).map_err(connect_err)
}

impl ZmqLink {
    /// Binds this rank's inbox, meets the other ranks through rank 0, connects to
    /// every peer and checks every connection with a hello, all within the connect
    /// timeout.
    pub fn connect(scheme: Scheme, config: ZmqConfig) -> Result<ZmqLink, CommError> {
        let (rank, world) = (config.rank, config.world_size);
        if world == 0 || rank >= world {
            return Err(connect_err(format!("rank {rank} outside a world of {world}")));
        }
        let now = Instant::now();
        let shared = Arc::new(Shared {
            rank,
            world,
            peer_timeout: Duration::from_millis(config.peer_timeout_ms),
            link_key: std::sync::OnceLock::new(),
            state: Mutex::new(State {
                queues: HashMap::new(),
                partial: HashMap::new(),
                inflight: vec![0; world],
                since_sync: vec![0; world],
                unacked: vec![0; world],
                last_seen: vec![now; world],
                hello: vec![false; world],
                dead: vec![None; world],
                left: vec![false; world],
                bye_acked: vec![false; world],
                protocol: vec![None; world],
                next_in: vec![0; world],
                refused: 0,
                garbage: None,
                abort: None,
                reports: Vec::new(),
                closing: false,
                closed: false,
            }),
            wake: Notify::new(),
        });
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(connect_err)?;
        let mut link = ZmqLink {
            shared: shared.clone(),
            outboxes: (0..world).map(|_| None).collect(),
            send_locks: (0..world).map(|_| Mutex::new(())).collect(),
            chunk: config.chunk_bytes.max(1),
            window: config.window_bytes.max(1) as u64,
            spin: Duration::from_micros(config.spin_us),
            progress: Arc::new(Progress::new(runtime)),
            idle_driver: None,
            deferred: std::sync::atomic::AtomicBool::new(false),
            endpoints: Vec::new(),
        };
        if world == 1 {
            return Ok(link);
        }
        let deadline = Deadline::after(Duration::from_millis(config.connect_timeout_ms));
        let setup = link.progress.drive(async {
            tokio::time::timeout(deadline.remaining(), setup(scheme, &config, shared.clone())).await.map_err(
                |_| {
                    connect_err(format!(
                        "rank {rank} could not meet the other ranks through {}:{} within {} ms",
                        config.master_addr, config.master_port, config.connect_timeout_ms
                    ))
                },
            )?
        });
        let (outboxes, rendezvous, endpoints) = setup?;
        link.outboxes = outboxes;
        link.endpoints = endpoints;
        // Heartbeats keep peers from declaring this rank dead while it computes.
        let beats: Vec<_> = link.outboxes.clone();
        let every = Duration::from_millis(config.heartbeat_ms.max(10));
        let me = rank as u32;
        link.progress.runtime.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                for outbox in beats.iter().flatten() {
                    let _ = post_async(outbox, wire::encode(Kind::Heartbeat, me, 0, 0, 0, &[])).await;
                }
            }
        });
        let progress = link.progress.clone();
        link.idle_driver = Some(
            std::thread::Builder::new()
                .name(format!("sheaf-zmq-{rank}"))
                .spawn(move || progress.idle_driver())
                .map_err(connect_err)?,
        );
        // Every peer has our table entry once it says hello; wait for all of them.
        for outbox in link.outboxes.iter().flatten() {
            let _ = post(outbox, wire::encode(Kind::Hello, me, 0, 0, 0, &[]));
        }
        let mut st = shared.lock();
        loop {
            if let Some(p) = (0..world).find(|&p| p != rank && st.dead[p].is_some()) {
                return Err(connect_err(format!(
                    "rank {p} failed during rendezvous: {}",
                    st.dead[p].clone().unwrap_or_default()
                )));
            }
            let missing = (0..world).find(|&p| p != rank && !st.hello[p]);
            let Some(p) = missing else { break };
            if deadline.expired() {
                return Err(CommError::Timeout { op: Op::Connect, peer: p, waited: now.elapsed() });
            }
            st = link.wait(st, deadline);
        }
        drop(st);
        drop(rendezvous);
        Ok(link)
    }

    /// Rank `rank`'s inbox address (for tests of strangers connecting to it).
    #[doc(hidden)]
    pub fn inbox_for_tests(&self, rank: usize) -> &str {
        &self.endpoints[rank]
    }

    /// Frames refused so far (from no rank of this run).
    #[doc(hidden)]
    pub fn refused_for_tests(&self) -> u64 {
        self.shared.lock().refused
    }

    /// Puts raw bytes on the wire to `peer`, sealed but otherwise unframed: for tests
    /// of how a receiver handles a corrupt peer.
    #[doc(hidden)]
    pub fn send_raw_for_tests(&self, peer: usize, bytes: Vec<u8>) {
        let _ = post(self.outbox(peer), bytes);
    }

    fn outbox(&self, peer: usize) -> &Outbox {
        self.outboxes[peer].as_ref().expect("an outbox for every peer")
    }

    /// The next complete message from `peer` under `tag`, as the chunks it came in.
    fn next_message(&self, peer: usize, tag: Tag, deadline: Deadline) -> Result<Vec<Bytes>, CommError> {
        self.check_peer(peer, Op::Recv)?;
        // A signature posted just before goes out now, even when what is received
        // here is already queued and no wait runs the writers.
        if self.deferred.swap(false, Ordering::SeqCst) {
            self.progress.kick();
        }
        let start = Instant::now();
        let mut st = self.shared.lock();
        loop {
            if let Some(msg) = st.queues.get_mut(&(peer, tag.0)).and_then(VecDeque::pop_front) {
                return Ok(msg);
            }
            if let Some(e) = self.shared.failure(&mut st, peer, Op::Recv) {
                return Err(e);
            }
            if st.left[peer] {
                return Err(CommError::PeerFailed { op: Op::Recv, peer, reason: "left the world".into() });
            }
            if deadline.expired() {
                return Err(CommError::Timeout { op: Op::Recv, peer, waited: start.elapsed() });
            }
            st = self.wait(st, deadline);
        }
    }

    fn check_peer(&self, peer: usize, op: Op) -> Result<(), CommError> {
        sheaf_core::check_link_peer(self.shared.rank, self.shared.world, peer, op)
    }

    /// Releases `st` and runs the runtime until the state changes, or at most until
    /// the deadline or [`POLL`] (for liveness checks), then takes the lock again.
    fn wait<'a>(&'a self, st: MutexGuard<'a, State>, deadline: Deadline) -> MutexGuard<'a, State> {
        let t = deadline.remaining().min(POLL);
        let notified = self.shared.wake.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before the lock is released: a change made in between still wakes.
        notified.as_mut().enable();
        drop(st);
        self.progress.drive(async {
            // Poll first, as MPI does: a message that comes within the spin is read
            // without the kernel putting this thread to sleep and waking it again.
            let spin_until = Instant::now() + self.spin;
            while Instant::now() < spin_until {
                if futures::poll!(notified.as_mut()).is_ready() {
                    return;
                }
                tokio::task::yield_now().await;
            }
            let _ = tokio::time::timeout(t, notified).await;
        });
        self.shared.lock()
    }
}

/// The async part of `connect`: inbox, rendezvous, outboxes and the receive loop.
async fn setup(
    scheme: Scheme,
    config: &ZmqConfig,
    shared: Arc<Shared>,
) -> Result<(Vec<Option<Outbox>>, Option<RouterSocket>, Vec<String>), CommError> {
    let (rank, world) = (config.rank, config.world_size);
    let mut inbox = PullSocket::new();
    let endpoint = match scheme {
        Scheme::Tcp => {
            let host = match &config.advertise_addr {
                Some(a) => a.clone(),
                None if is_loopback(&config.master_addr) => "127.0.0.1".into(),
                None => {
                    return Err(connect_err(format!(
                        "master {} is not on this host: set the advertise address (SHEAF_ADVERTISE_ADDR) peers reach rank {rank} at",
                        config.master_addr
                    )))
                }
            };
            format!("tcp://{host}:0")
        }
        Scheme::Ipc => {
            let name = format!("sheaf-{}-{}-rank{rank}.ipc", config.master_port, std::process::id());
            match &config.ipc_dir {
                Some(dir) => {
                    let path = format!("{dir}/{name}");
                    let _ = std::fs::remove_file(&path);
                    format!("ipc://{path}")
                }
                // A leading NUL: tokio binds and connects it in the abstract namespace.
                None => format!("ipc://\0{name}"),
            }
        }
    };
    let bound = inbox.bind(&endpoint).await.map_err(|e| connect_err(format!("binding {endpoint:?}: {e}")))?;
    // An abstract socket has no path for the crate to report: peers get the name bound.
    let mine = match (scheme, &bound) {
        (Scheme::Ipc, zeromq::Endpoint::Ipc(None)) => endpoint.clone(),
        _ => bound.to_string(),
    };
    let mut monitor = inbox.monitor();

    let master = format!("tcp://{}:{}", config.master_addr, config.master_port);
    let mut opts = SocketOptions::default();
    opts.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
    let key = Key::new(config.job_token.as_deref().unwrap_or("").as_bytes());
    let (table, sessions, router) = if rank == 0 {
        let mut router = RouterSocket::new();
        router.bind(&master).await.map_err(|e| connect_err(format!("rank 0 listening on {master}: {e}")))?;
        let (table, sessions) = rendezvous_as_rank_0(&mut router, &key, world, mine.clone()).await?;
        (table, sessions, Some(router))
    } else {
        let mut dealer = DealerSocket::with_options(opts);
        dealer
            .connect(&master)
            .await
            .map_err(|e| connect_err(format!("rank {rank} reaching rank 0 at {master}: {e}")))?;
        let (table, sessions) = rendezvous_as_peer(&mut dealer, &key, rank, world, mine.clone()).await?;
        (table, sessions, None)
    };
    // The run's link key: the secret and every rank's nonce of this rendezvous, so
    // frames of another run (or recorded from this one for another pair) never verify.
    let session_parts: Vec<&[u8]> = sessions.iter().map(|s| s.as_bytes()).collect();
    let link_key = Arc::new(key.derive("sheaf-zmq-link", &session_parts));
    let _ = shared.link_key.set(link_key.clone());

    let mut outboxes: Vec<Option<Outbox>> = (0..world).map(|_| None).collect();
    for (peer, endpoint) in table.iter().enumerate().filter(|(p, _)| *p != rank) {
        let mut opts = SocketOptions::default();
        opts.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
        // An identity no stranger can guess (it holds this run's nonce), so none can
        // take over this connection or report it closed in this rank's name.
        opts.peer_identity(
            PeerIdentity::try_from(identity(rank, &sessions).into_bytes()).expect("short identity"),
        );
        let mut push = PushSocket::with_options(opts);
        push.connect(endpoint)
            .await
            .map_err(|e| connect_err(format!("connecting to rank {peer} at {endpoint}: {e}")))?;
        outboxes[peer] = Some(Arc::new(tokio::sync::Mutex::new(Sealer {
            socket: push,
            dst: peer as u32,
            next: 0,
            key: link_key.clone(),
        })));
    }

    // The receive loop: every frame updates the shared state; replies go out through
    // the outboxes.
    let replies_to = outboxes.clone();
    let rx_shared = shared.clone();
    tokio::spawn(async move {
        loop {
            match inbox.recv().await {
                Ok(msg) => {
                    if msg.len() != 1 {
                        let mut st = rx_shared.lock();
                        rx_shared.refuse(&mut st, &[], &format!("a message of {} parts", msg.len()));
                        continue;
                    }
                    let frame = msg.get(0).expect("one frame");
                    for (peer, reply) in rx_shared.handle(frame) {
                        if let Some(outbox) = &replies_to[peer] {
                            if let Err(e) = post_async(outbox, reply).await {
                                rx_shared.sending_failed(peer, &e);
                            }
                        }
                    }
                }
                Err(e) => {
                    let mut st = rx_shared.lock();
                    if !st.closing {
                        st.garbage = Some(format!("inbox failed: {e}"));
                    }
                    drop(st);
                    rx_shared.wake.notify_waiters();
                    break;
                }
            }
        }
    });
    // A peer whose connection drops before it said goodbye has died.
    let mon_shared = shared.clone();
    let identities: Vec<String> = (0..world).map(|p| identity(p, &sessions)).collect();
    tokio::spawn(async move {
        while let Some(event) = monitor.next().await {
            if let SocketEvent::Disconnected(id) = event {
                let Some(peer) = identities.iter().position(|i| i.as_bytes() == id.as_ref()) else {
                    continue;
                };
                let mut st = mon_shared.lock();
                if !st.left[peer] && !st.closing && st.dead[peer].is_none() {
                    st.dead[peer] = Some("connection lost (the process exited or crashed)".into());
                }
                drop(st);
                mon_shared.wake.notify_waiters();
            }
        }
    });
    Ok((outboxes, router, table))
}

impl Link for ZmqLink {
    fn rank(&self) -> usize {
        self.shared.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn send(&self, peer: usize, tag: Tag, data: &[u8], deadline: Deadline) -> Result<(), CommError> {
        self.check_peer(peer, Op::Send)?;
        let start = Instant::now();
        let _one_message_at_a_time = self.send_locks[peer].lock().unwrap_or_else(|e| e.into_inner());
        let total = data.len() as u64;
        let chunks: Vec<&[u8]> =
            if data.is_empty() { vec![&[][..]] } else { data.chunks(self.chunk).collect() };
        let mut offset = 0u64;
        for chunk in chunks {
            let mut st = self.shared.lock();
            loop {
                if let Some(e) = self.shared.failure(&mut st, peer, Op::Send) {
                    return Err(e);
                }
                if st.inflight[peer] == 0 || st.inflight[peer] + chunk.len() as u64 <= self.window {
                    break;
                }
                if deadline.expired() {
                    return Err(CommError::Timeout { op: Op::Send, peer, waited: start.elapsed() });
                }
                st = self.wait(st, deadline);
            }
            // Ask for a receipt every quarter window, and whenever the next full chunk
            // would not fit: a sender waiting for credit has always asked for the
            // receipt that frees it.
            let len = chunk.len() as u64;
            st.inflight[peer] += len;
            st.since_sync[peer] += len;
            let sync =
                st.since_sync[peer] >= self.window / 4 || st.inflight[peer] + self.chunk as u64 > self.window;
            if sync {
                st.since_sync[peer] = 0;
            }
            drop(st);
            let kind = if sync { Kind::DataSync } else { Kind::Data };
            let frame = wire::encode(kind, self.shared.rank as u32, tag.0, total, offset, chunk);
            if let Err(e) = post(self.outbox(peer), frame) {
                self.shared.sending_failed(peer, &e);
                return Err(CommError::PeerFailed {
                    op: Op::Send,
                    peer,
                    reason: format!("sending failed: {e}"),
                });
            }
            offset += chunk.len() as u64;
        }
        // Write what was posted now rather than at this rank's next wait; a collective's
        // signature goes with the call's next message or wait (see `TagClass`).
        if tag.class_code() == TagClass::Signature as u8 {
            self.deferred.store(true, Ordering::SeqCst);
        } else {
            self.deferred.store(false, Ordering::SeqCst);
            self.progress.kick();
        }
        Ok(())
    }

    fn recv(&self, peer: usize, tag: Tag, deadline: Deadline) -> Result<Vec<u8>, CommError> {
        let chunks = self.next_message(peer, tag, deadline)?;
        if chunks.len() == 1 {
            return Ok(Vec::from(chunks.into_iter().next().expect("one chunk")));
        }
        Ok(chunks.concat())
    }

    /// Puts the message's chunks straight into `dst` (copying or reducing), saving the
    /// copy that assembling them into one buffer would cost.
    fn recv_into(
        &self,
        peer: usize,
        tag: Tag,
        dst: &mut [u8],
        reduce: Option<(DType, ReduceOp)>,
        deadline: Deadline,
    ) -> Result<(), CommError> {
        let chunks = self.next_message(peer, tag, deadline)?;
        let total: usize = chunks.iter().map(Bytes::len).sum();
        if total != dst.len() {
            return Err(CommError::Protocol {
                op: Op::Recv,
                peer,
                detail: format!("expected {} bytes, got {total}", dst.len()),
            });
        }
        let elem = reduce.map_or(1, |(d, _)| d.size());
        let apply = |dst: &mut [u8], src: &[u8]| reduce::copy_or_combine(dst, src, reduce);
        if chunks.iter().all(|c| c.len() % elem == 0) {
            let mut off = 0;
            for c in &chunks {
                apply(&mut dst[off..off + c.len()], c);
                off += c.len();
            }
        } else {
            // A sender whose chunks split elements: assemble first.
            apply(dst, &chunks.concat());
        }
        Ok(())
    }

    fn abort(&self, culprit: usize, reason: &str) {
        let me = self.shared.rank;
        let mut st = self.shared.lock();
        st.reports.push((me, culprit));
        if st.abort.is_none() {
            st.abort = Some((culprit, reason.to_owned()));
        }
        drop(st);
        self.shared.wake.notify_waiters();
        for outbox in self.outboxes.iter().flatten() {
            let _ =
                post(outbox, wire::encode(Kind::Abort, me as u32, culprit as u64, 0, 0, reason.as_bytes()));
        }
        self.progress.kick();
    }

    fn failure_reports(&self) -> Vec<(usize, usize)> {
        self.shared.lock().reports.clone()
    }

    /// Says goodbye to every peer and returns once each has acknowledged everything
    /// this rank sent and said goodbye itself (or is dead), so that exiting right
    /// after loses nothing.
    fn close(&self, deadline: Deadline) -> Result<(), CommError> {
        let (me, world) = (self.shared.rank, self.shared.world);
        if world == 1 {
            return Ok(());
        }
        let start = Instant::now();
        self.shared.lock().closing = true;
        for outbox in self.outboxes.iter().flatten() {
            let _ = post(outbox, wire::encode(Kind::Bye, me as u32, 0, 0, 0, &[]));
        }
        let mut st = self.shared.lock();
        loop {
            self.shared.check_liveness(&mut st);
            let pending = (0..world).find(|&p| {
                p != me && st.dead[p].is_none() && (st.inflight[p] > 0 || !st.bye_acked[p] || !st.left[p])
            });
            let Some(p) = pending else { break };
            if deadline.expired() {
                return Err(CommError::Timeout { op: Op::Close, peer: p, waited: start.elapsed() });
            }
            st = self.wait(st, deadline);
        }
        st.closed = true;
        drop(st);
        // The last acknowledgements leave through the outboxes; give them a moment.
        self.progress.drive(async { tokio::time::sleep(Duration::from_millis(50)).await });
        Ok(())
    }
}

impl Drop for ZmqLink {
    fn drop(&mut self) {
        self.progress.stop.store(true, Ordering::SeqCst);
        self.progress.wanted.notify_one();
        if let Some(driver) = self.idle_driver.take() {
            let _ = driver.join();
        }
        // The runtime goes with the last reference to `progress`, now this one: its
        // tasks hold the shared state, not the runtime, and are dropped with their
        // sockets.
    }
}
