//! Point-to-point signatures, for a group whose user has promised NCCL's rule
//! ([`Communicator::order_point_to_point`](sheaf_core::Communicator::order_point_to_point)):
//! between two ranks, each one's sends are received by the other in the order they
//! were sent, whatever their tags.
//!
//! Under that rule each rank writes its peer one stream of records (class
//! `Signature`, value 1), in its own order of calls toward that peer:
//! - a `send` record ahead of every message (its number, tag and length);
//! - a `wait` record when one of its receives from the peer has waited [`PROBE`]
//!   (the receive's number and tag).
//!
//! A receive reads the peer's stream up to the next `send` record, which must carry
//! the tag asked for: another tag means the two ranks disagree on what comes next,
//! and the receive fails at once naming both calls. A `wait` record read first means
//! the peer will send nothing more before this rank sends it something; when this
//! rank has not yet sent the message that receive waits for, neither rank can go on
//! (each waits in a receive from the other), and the receive fails at once too.
//! Without the promise a message of another tag may legally come first, so nothing
//! can be concluded before the deadline; groups are unordered until asked.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sheaf_core::{CommError, Deadline, Link, Op, Tag};

use super::signature::thousands;

/// How long a receive waits before telling its peer that it waits.
pub(crate) const PROBE: Duration = Duration::from_millis(50);

/// One record of a rank's stream to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Record {
    /// The `seq`-th message this rank sent the peer: `tag`, `bytes` long.
    Send { seq: u64, tag: u32, bytes: u64 },
    /// This rank's `seq`-th receive from the peer, of `tag`, has waited [`PROBE`].
    Wait { seq: u64, tag: u32 },
}

pub(crate) const LEN: usize = 24;

impl Record {
    pub fn encode(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        let (kind, seq, tag, bytes) = match *self {
            Record::Send { seq, tag, bytes } => (1u8, seq, tag, bytes),
            Record::Wait { seq, tag } => (2u8, seq, tag, 0),
        };
        out[0] = kind;
        out[4..8].copy_from_slice(&tag.to_le_bytes());
        out[8..16].copy_from_slice(&seq.to_le_bytes());
        out[16..24].copy_from_slice(&bytes.to_le_bytes());
        out
    }

    /// `None` for anything that is not a record this code wrote.
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let bytes: &[u8; LEN] = bytes.try_into().ok()?;
        if bytes[1..4] != [0, 0, 0] {
            return None;
        }
        let tag = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        let seq = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        match bytes[0] {
            1 => Some(Record::Send { seq, tag, bytes: len }),
            2 if len == 0 => Some(Record::Wait { seq, tag }),
            _ => None,
        }
    }
}

/// What a rank knows of its point-to-point traffic with one peer.
#[derive(Default)]
struct Peer {
    /// Messages sent to the peer.
    sent: u64,
    /// Receives from the peer begun.
    received: u64,
    /// Records read off the peer's stream and not yet used.
    stash: VecDeque<Record>,
}

/// The ordered point-to-point state of a group: off until the promise is made.
#[derive(Default)]
pub(crate) struct Ordered {
    peers: Mutex<Option<Vec<Peer>>>,
}

/// Where a group's point-to-point calls go: the link, the tags and the peers' link ranks.
pub(crate) struct Wire<'a> {
    pub link: &'a dyn Link,
    pub data: Tag,
    pub records: Tag,
    /// This rank's and the peer's link ranks.
    pub me: usize,
    pub peer: usize,
}

impl Ordered {
    /// Turns the checks on for a group of `size` ranks (again: no change).
    pub fn enable(&self, size: usize) {
        let mut peers = self.lock();
        if peers.is_none() {
            *peers = Some((0..size).map(|_| Peer::default()).collect());
        }
    }

    pub fn is_on(&self) -> bool {
        self.lock().is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<Peer>>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_peer<T>(&self, peer: usize, f: impl FnOnce(&mut Peer) -> T) -> T {
        let mut peers = self.lock();
        f(&mut peers.as_mut().expect("ordered point-to-point is on")[peer])
    }

    /// Sends `data` to group rank `peer`, its record first. Also takes in what the
    /// peer's stream already holds, so that the records of a peer that only receives
    /// from this rank do not pile up.
    pub fn send(&self, peer: usize, w: &Wire<'_>, data: &[u8], dl: Deadline) -> Result<(), CommError> {
        let seq = self.with_peer(peer, |p| {
            p.sent += 1;
            p.sent
        });
        let record = Record::Send { seq, tag: w.data.value(), bytes: data.len() as u64 };
        w.link.send(w.peer, w.records, &record.encode(), dl)?;
        w.link.send(w.peer, w.data, data, dl)?;
        loop {
            // An expired deadline only takes what is already there.
            let Some(record) = self.read(w, Deadline::after(Duration::ZERO))? else { return Ok(()) };
            self.with_peer(peer, |p| match record {
                Record::Wait { seq, .. } if seq <= p.sent => {} // answered by a send already made
                r => p.stash.push_back(r),
            });
        }
    }

    /// Receives the message of `w.data`'s tag that group rank `peer` sends next.
    pub fn recv(&self, peer: usize, w: &Wire<'_>, dl: Deadline) -> Result<Vec<u8>, CommError> {
        let want = w.data.value();
        let seq = self.with_peer(peer, |p| {
            p.received += 1;
            p.received
        });
        let start = Instant::now();
        let mut told = false;
        loop {
            let stashed = self.with_peer(peer, |p| p.stash.pop_front());
            let record = match stashed {
                Some(r) => r,
                None => {
                    let probe = Deadline::at(dl.instant().min(Instant::now() + PROBE));
                    match self.read(w, probe)? {
                        Some(r) => r,
                        None if dl.expired() => {
                            return Err(CommError::Timeout {
                                op: Op::Recv,
                                peer: w.peer,
                                waited: start.elapsed(),
                            })
                        }
                        None => {
                            if !told {
                                let wait = Record::Wait { seq, tag: want };
                                w.link.send(w.peer, w.records, &wait.encode(), dl)?;
                                told = true;
                            }
                            continue;
                        }
                    }
                }
            };
            match record {
                Record::Send { tag, .. } if tag == want => return w.link.recv(w.peer, w.data, dl),
                Record::Send { seq: theirs, tag, bytes } => {
                    return Err(out_of_step(
                        w,
                        format!(
                            "rank {me}'s recv #{seq} from rank {peer} wants tag {want}; rank {peer}'s \
                             send #{theirs} to rank {me} was tag {tag} ({} bytes)",
                            thousands(bytes),
                            me = w.me,
                            peer = w.peer,
                        ),
                    ))
                }
                Record::Wait { seq: theirs, tag } => {
                    if self.with_peer(peer, |p| theirs <= p.sent) {
                        continue; // a receive this rank's sends have answered
                    }
                    return Err(out_of_step(
                        w,
                        format!(
                            "rank {me} waits in recv #{seq} of tag {want} from rank {peer}, and rank \
                             {peer} in recv #{theirs} of tag {tag} from rank {me}: neither will send",
                            me = w.me,
                            peer = w.peer,
                        ),
                    ));
                }
            }
        }
    }

    /// The next record of the peer's stream, or `None` at `dl`.
    fn read(&self, w: &Wire<'_>, dl: Deadline) -> Result<Option<Record>, CommError> {
        match w.link.recv(w.peer, w.records, dl) {
            Ok(bytes) => Record::decode(&bytes).map(Some).ok_or_else(|| CommError::Protocol {
                op: Op::Recv,
                peer: w.peer,
                detail: format!("unreadable point-to-point signature ({} bytes)", bytes.len()),
            }),
            Err(CommError::Timeout { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn out_of_step(w: &Wire<'_>, detail: String) -> CommError {
    CommError::Protocol {
        op: Op::Recv,
        peer: w.peer,
        detail: format!("point-to-point out of step: {detail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        for r in [Record::Send { seq: 3, tag: 7, bytes: 4096 }, Record::Wait { seq: u64::MAX, tag: u32::MAX }]
        {
            assert_eq!(Record::decode(&r.encode()), Some(r));
        }
        assert_eq!(Record::decode(&[0u8; LEN]), None);
        assert_eq!(Record::decode(&[1u8; LEN]), None);
        assert_eq!(Record::decode(&[0u8; LEN - 1]), None);
        let mut wait_with_bytes = Record::Wait { seq: 1, tag: 1 }.encode();
        wait_with_bytes[16] = 1;
        assert_eq!(Record::decode(&wait_with_bytes), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(
            std::env::var("SHEAF_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000),
        ))]
        /// No input makes decoding panic; whatever decodes encodes back to itself.
        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            if let Some(r) = Record::decode(&bytes) {
                proptest::prop_assert_eq!(&r.encode()[..], &bytes[..]);
            }
        }
    }
}
