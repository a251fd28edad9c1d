//! The frame format on the data plane: one ZeroMQ frame per message chunk, a fixed
//! 32-byte little-endian header then the payload. Anything that does not parse is a
//! protocol error naming the sender when the header names a valid one.

/// `"SF"`: Sheaf frame.
pub const MAGIC: u16 = 0x5346;
pub const VERSION: u8 = 2;
pub const HEADER: usize = 32;

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
    out.extend_from_slice(payload);
    out
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

/// The sender a malformed frame claims, if its header got that far.
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
        let mut bad = f;
        bad[2] = 9;
        assert!(decode(&bad).unwrap_err().contains("version"));
    }
}
