//! The frame format on the data plane: one ZeroMQ frame per message chunk, a fixed
//! 56-byte little-endian header then the payload. The header's last 24 bytes seal it:
//! the frame's sequence number on its (sender, receiver) stream and a 16-byte
//! HMAC-SHA256 of the header's first 40 bytes and the receiver's rank under the run's
//! link key (derived from the job's secret and every rank's rendezvous nonce). A frame
//! whose seal does not verify, or that repeats or skips a sequence number, is dropped
//! unread: it came from no rank of this run.

use sheaf_auth::Key;

/// `"SF"`: Sheaf frame.
pub const MAGIC: u16 = 0x5346;
pub const VERSION: u8 = 3;
pub const HEADER: usize = 56;
/// Where the seal starts: the sequence number, then the MAC.
const SEALED: usize = 40;
const MAC: usize = 16;
const DOMAIN: &str = "sheaf-zmq-frame";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A chunk of a message: `a` = total length, `b` = offset of this chunk.
    Data = 1,
    /// Receipt of every data chunk since the last receipt: `a` = their payload bytes.
    Ack = 2,
    /// Connection check after rendezvous.
    Hello = 3,
    /// The sender is alive.
    Heartbeat = 4,
    /// The sender has sent everything and is leaving.
    Bye = 5,
    /// Reply to `Bye`.
    ByeAck = 6,
    /// The sender gave up: `tag` = the rank it blames, payload = reason.
    Abort = 7,
    /// A chunk of a message, like `Data`, whose sender asks for a receipt.
    DataSync = 8,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        [
            Kind::Data,
            Kind::Ack,
            Kind::Hello,
            Kind::Heartbeat,
            Kind::Bye,
            Kind::ByeAck,
            Kind::Abort,
            Kind::DataSync,
        ]
        .into_iter()
        .find(|k| *k as u8 == v)
    }
}

/// A parsed frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: Kind,
    pub src: u32,
    pub tag: u64,
    pub a: u64,
    pub b: u64,
    pub payload: &'a [u8],
}

/// Encodes a frame into one buffer.
pub fn encode(kind: Kind, src: u32, tag: u64, a: u64, b: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&src.to_le_bytes());
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&a.to_le_bytes());
    out.extend_from_slice(&b.to_le_bytes());
    out.extend_from_slice(&[0u8; HEADER - 32]);
    out.extend_from_slice(payload);
    out
}

/// Seals `frame` (from [`encode`]) as the `seq`-th frame to rank `dst`.
pub fn seal(frame: &mut [u8], key: &Key, dst: u32, seq: u64) {
    if frame.len() < HEADER {
        return;
    }
    frame[32..SEALED].copy_from_slice(&seq.to_le_bytes());
    let mac = key.prove(DOMAIN, &[&dst.to_le_bytes(), &frame[..SEALED]]);
    frame[SEALED..HEADER].copy_from_slice(&mac[..MAC]);
}

/// Whether `frame`'s seal verifies for receiver `me`: its sequence number if so.
pub fn unseal(frame: &[u8], key: &Key, me: u32) -> Option<u64> {
    let header = frame.get(..HEADER)?;
    key.verify(DOMAIN, &[&me.to_le_bytes(), &header[..SEALED]], &header[SEALED..])
        .then(|| u64::from_le_bytes(header[32..SEALED].try_into().expect("8 bytes")))
}

/// Parses a frame, or says what is wrong with it.
pub fn decode(bytes: &[u8]) -> Result<Frame<'_>, String> {
    if bytes.len() < HEADER {
        return Err(format!("frame of {} bytes is shorter than the {HEADER}-byte header", bytes.len()));
    }
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let magic = u16::from_le_bytes([bytes[0], bytes[1]]);
    if magic != MAGIC {
        return Err(format!("bad magic {magic:#06x} (not a Sheaf frame)"));
    }
    if bytes[2] != VERSION {
        return Err(format!("frame version {} (this transport speaks {VERSION})", bytes[2]));
    }
    let kind = Kind::from_u8(bytes[3]).ok_or_else(|| format!("unknown frame kind {}", bytes[3]))?;
    Ok(Frame {
        kind,
        src: u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")),
        tag: u64_at(8),
        a: u64_at(16),
        b: u64_at(24),
        payload: &bytes[HEADER..],
    })
}

/// The sender a frame claims, if its header got that far (for the log of refused
/// frames: a claim, never trusted).
pub fn claimed_src(bytes: &[u8]) -> Option<u32> {
    (bytes.len() >= 8 && u16::from_le_bytes([bytes[0], bytes[1]]) == MAGIC)
        .then(|| u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let f = encode(Kind::Data, 3, 0xABCD, 10, 4, b"hello");
        assert_eq!(
            decode(&f).unwrap(),
            Frame { kind: Kind::Data, src: 3, tag: 0xABCD, a: 10, b: 4, payload: b"hello" }
        );
        assert!(decode(b"short").unwrap_err().contains("shorter"));
        let mut bad = f.clone();
        bad[0] = 0;
        assert!(decode(&bad).unwrap_err().contains("magic"));
        let mut bad = f.clone();
        bad[3] = 99;
        assert!(decode(&bad).unwrap_err().contains("kind"));
        let mut bad = f.clone();
        bad[2] = 9;
        assert!(decode(&bad).unwrap_err().contains("version"));

        // Sealed for rank 1 as its 7th frame: verifies there, nowhere else, not after
        // a change, not under another key.
        let (key, other) = (Key::new(b"run key"), Key::new(b"another run"));
        let mut sealed = f;
        seal(&mut sealed, &key, 1, 7);
        assert_eq!(unseal(&sealed, &key, 1), Some(7));
        assert_eq!(unseal(&sealed, &key, 2), None);
        assert_eq!(unseal(&sealed, &other, 1), None);
        let mut changed = sealed.clone();
        changed[9] ^= 1;
        assert_eq!(unseal(&changed, &key, 1), None);
        let mut replayed = sealed.clone();
        replayed[32] = 8;
        assert_eq!(unseal(&replayed, &key, 1), None);
        assert_eq!(unseal(&sealed[..40], &key, 1), None);
    }
}
