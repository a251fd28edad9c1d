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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use sheaf_auth::Key;
use sheaf_collectives::reduce;
use sheaf_core::{CommError, DType, Deadline, Link, Op, ReduceOp, Tag, TagClass};
use tokio::sync::Notify;
use zeromq::{
    util::PeerIdentity, DealerSocket, PullSocket, PushSocket, RouterSocket, Socket, SocketEvent,
    SocketOptions, SocketRecv,
};

use crate::config::{Scheme, ZmqConfig, POLL};
use crate::inbound::{identity, post, post_async, Outbox, Sealer, Shared, State};
use crate::progress::Progress;
use crate::rendezvous::{rendezvous_as_peer, rendezvous_as_rank_0};
use crate::wire::{self, Kind};

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

pub(crate) fn connect_err(detail: impl std::fmt::Display) -> CommError {
    CommError::Transport { op: Op::Connect, detail: detail.to_string() }
}

pub(crate) fn is_loopback(addr: &str) -> bool {
    addr == "localhost" || addr.starts_with("127.") || addr == "::1"
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
    #[cfg(feature = "test-hooks")]
    pub fn inbox_for_tests(&self, rank: usize) -> &str {
        &self.endpoints[rank]
    }

    /// Frames refused so far (from no rank of this run).
    #[cfg(feature = "test-hooks")]
    pub fn refused_for_tests(&self) -> u64 {
        self.shared.lock().refused
    }

    /// Puts raw bytes on the wire to `peer`, sealed but otherwise unframed: for tests
    /// of how a receiver handles a corrupt peer.
    #[cfg(feature = "test-hooks")]
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
pub(crate) async fn setup(
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
