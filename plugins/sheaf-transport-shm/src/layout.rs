//! The segment's layout and the record format in its rings.
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

use std::sync::atomic::{AtomicU64, Ordering::*};

use crate::config::ShmConfig;
use crate::segment::Segment;

pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"SHEAFSHM");
pub(crate) const VERSION: u32 = 1;
pub(crate) const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"SHMR");
pub(crate) const RECORD: usize = 24;
/// Largest message a record may announce: protects against a garbage length.
pub(crate) const MAX_MESSAGE: u64 = 1 << 36;

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

pub(crate) const HEADER_BYTES: usize = 256;
pub(crate) const H_MAGIC: usize = 0;
pub(crate) const H_VERSION: usize = 8;
pub(crate) const H_RING: usize = 16;
pub(crate) const H_TOTAL: usize = 24;
pub(crate) const H_ATTACHED: usize = 64;
pub(crate) const H_ABORT_ORDER: usize = 128;

pub(crate) const CTRL_BYTES: usize = 512;
pub(crate) const C_PID: usize = 0;
pub(crate) const C_STATE: usize = 4;
pub(crate) const C_BELL: usize = 64;
pub(crate) const C_SLEEPERS: usize = 68;
pub(crate) const C_CULPRIT: usize = 128;
pub(crate) const C_ORDER: usize = 136;
pub(crate) const C_REASON_LEN: usize = 144;
pub(crate) const C_REASON: usize = 192;
pub(crate) const REASON_MAX: usize = 256;

pub(crate) const RING_HDR: usize = 256;
pub(crate) const R_WRITE: usize = 0;
pub(crate) const R_READ: usize = 128;

pub(crate) const ACTIVE: u32 = 0;
pub(crate) const LEFT: u32 = 1;
pub(crate) const DROPPED: u32 = 2;
pub(crate) const NO_CULPRIT: u64 = u64::MAX;

/// A writer publishes at most this much at a time, so the reader starts copying out
/// while the rest is still being copied in.
pub(crate) const PUBLISH_MAX: usize = 256 << 10;
const _: () = assert!(PUBLISH_MAX.is_multiple_of(8) && RECORD.is_multiple_of(8));

/// Each ordered pair's ring, unless the job says or the world is too large for it.
pub(crate) const DEFAULT_RING_BYTES: usize = 4 << 20;

pub(crate) fn ring_bytes(config: &ShmConfig) -> usize {
    let pairs = (config.world_size * config.world_size).max(1);
    let want = config.ring_bytes.unwrap_or_else(|| DEFAULT_RING_BYTES.min((2usize << 30) / pairs));
    want.clamp(64 << 10, 1 << 30).next_power_of_two()
}

pub(crate) fn rings_offset(world: usize) -> usize {
    (HEADER_BYTES + world * CTRL_BYTES).next_multiple_of(4096)
}

pub(crate) fn segment_bytes(world: usize, cap: usize) -> usize {
    rings_offset(world) + world * world * (RING_HDR + cap)
}

/// Bytes after a payload of `len` bytes up to the next multiple of 8.
pub(crate) fn padding(len: usize) -> usize {
    len.next_multiple_of(8) - len
}

pub(crate) fn seg_u64(seg: &Segment, off: usize) -> u64 {
    // SAFETY: in bounds and aligned; written before the segment was shared.
    unsafe { AtomicU64::from_ptr(seg.base().add(off).cast()).load(SeqCst) }
}

pub(crate) fn set_u64(seg: &Segment, off: usize, v: u64) {
    // SAFETY: as for `seg_u64`.
    unsafe { AtomicU64::from_ptr(seg.base().add(off).cast()).store(v, SeqCst) }
}
