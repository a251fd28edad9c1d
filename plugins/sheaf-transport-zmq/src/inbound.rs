//! What arrives: each peer's outbox and its seal, the frames received and not yet
//! taken, the credit each sender holds, and the state host threads and the runtime's
//! tasks share behind one mutex.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sheaf_auth::Key;
use sheaf_core::{CommError, Op};
use tokio::sync::Notify;
use zeromq::{PushSocket, SocketSend};

use crate::config::MAX_MESSAGE;
use crate::wire::{self, Kind};

/// The socket to one peer's inbox. Host threads put frames on it themselves (a
/// queue push inside the crate, no hop through a task of ours), and so do the
/// runtime's tasks for acknowledgements and heartbeats; the lock keeps each frame
/// whole.
pub(crate) type Outbox = Arc<tokio::sync::Mutex<Sealer>>;

/// A peer's socket, and the seal of every frame put on it: the next sequence number
/// on this stream and the run's link key.
pub(crate) struct Sealer {
    pub(crate) socket: PushSocket,
    pub(crate) dst: u32,
    pub(crate) next: u64,
    pub(crate) key: Arc<Key>,
}

impl Sealer {
    pub(crate) fn seal(&mut self, frame: &mut [u8]) {
        wire::seal(frame, &self.key, self.dst, self.next);
        self.next += 1;
    }
}

/// Seals one frame and puts it on `outbox`, from a host thread.
pub(crate) fn post(outbox: &Outbox, mut frame: Vec<u8>) -> Result<(), String> {
    let mut out = outbox.blocking_lock();
    out.seal(&mut frame);
    futures::executor::block_on(out.socket.send(frame.into())).map_err(|e| e.to_string())
}

/// Seals one frame and puts it on `outbox`, from the runtime.
pub(crate) async fn post_async(outbox: &Outbox, mut frame: Vec<u8>) -> Result<(), String> {
    let mut out = outbox.lock().await;
    out.seal(&mut frame);
    out.socket.send(frame.into()).await.map_err(|e| e.to_string())
}

/// The identity rank `rank` connects to its peers' inboxes with: its rank and its
/// rendezvous nonce, which only the run's ranks know.
pub(crate) fn identity(rank: usize, sessions: &[String]) -> String {
    format!("rank-{rank}-{}", sessions[rank])
}

/// A message being assembled: its chunks' payloads, kept as the frames they arrived
/// in (no copy until a receive puts them where they belong).
pub(crate) struct Partial {
    pub(crate) total: u64,
    pub(crate) got: u64,
    pub(crate) chunks: Vec<Bytes>,
}

pub(crate) struct State {
    pub(crate) queues: HashMap<(usize, u64), VecDeque<Vec<Bytes>>>,
    pub(crate) partial: HashMap<(usize, u64), Partial>,
    /// Bytes sent to each peer and not yet acknowledged.
    pub(crate) inflight: Vec<u64>,
    /// Bytes sent to each peer since the last chunk that asked for a receipt.
    pub(crate) since_sync: Vec<u64>,
    /// Bytes received from each peer and not yet acknowledged.
    pub(crate) unacked: Vec<u64>,
    pub(crate) last_seen: Vec<Instant>,
    pub(crate) hello: Vec<bool>,
    pub(crate) dead: Vec<Option<String>>,
    pub(crate) left: Vec<bool>,
    pub(crate) bye_acked: Vec<bool>,
    pub(crate) protocol: Vec<Option<String>>,
    /// The sequence number of the next frame from each peer.
    pub(crate) next_in: Vec<u64>,
    /// Frames dropped because they came from no rank of this run.
    pub(crate) refused: u64,
    pub(crate) garbage: Option<String>,
    pub(crate) abort: Option<(usize, String)>,
    pub(crate) reports: Vec<(usize, usize)>,
    pub(crate) closing: bool,
    pub(crate) closed: bool,
}

pub(crate) struct Shared {
    pub(crate) rank: usize,
    pub(crate) world: usize,
    pub(crate) peer_timeout: Duration,
    /// The run's link key, once the rendezvous has given every rank's nonce.
    pub(crate) link_key: std::sync::OnceLock<Arc<Key>>,
    pub(crate) state: Mutex<State>,
    /// Told after every change of `state` a waiting host thread may care about.
    pub(crate) wake: Notify,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks peers silent for longer than the peer timeout as dead.
    pub(crate) fn check_liveness(&self, st: &mut State) {
        let now = Instant::now();
        for p in (0..self.world).filter(|&p| p != self.rank) {
            if st.dead[p].is_none() && !st.left[p] && now.duration_since(st.last_seen[p]) > self.peer_timeout
            {
                st.dead[p] = Some(format!("no message or heartbeat for {:?}", self.peer_timeout));
            }
        }
    }

    /// The error a blocked call on `peer` must return now, if any.
    pub(crate) fn failure(&self, st: &mut State, peer: usize, op: Op) -> Option<CommError> {
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
    pub(crate) fn sending_failed(&self, peer: usize, error: &str) {
        let mut st = self.lock();
        if !st.left[peer] && st.dead[peer].is_none() {
            st.dead[peer] = Some(format!("sending failed: {error}"));
        }
        drop(st);
        self.wake.notify_waiters();
    }

    /// Drops a frame that came from no rank of this run, and says so (the first few
    /// and then at powers of two, so a flood cannot flood the log).
    pub(crate) fn refuse(&self, st: &mut State, bytes: &[u8], why: &str) {
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
    pub(crate) fn handle(&self, raw: &Bytes) -> Vec<(usize, Vec<u8>)> {
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
