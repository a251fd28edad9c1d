//! Fuzzing what this transport reads from other processes: record headers in the
//! shared rings and joins on the rendezvous socket.

use sheaf_testkit::fuzz::{fuzz, inputs, CappedAlloc};

use crate::link::{parse_join, parse_record_header};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

#[test]
fn record_headers() {
    let mut valid = Vec::new();
    valid.extend_from_slice(&u64::from(u32::from_le_bytes(*b"SHMR")).to_le_bytes());
    valid.extend_from_slice(&0xABCDu64.to_le_bytes());
    valid.extend_from_slice(&4096u64.to_le_bytes());
    let strategy = (inputs(vec![valid]), proptest::prelude::any::<u64>(), 0usize..(8 << 20));
    fuzz("shm record header", strategy, |(head, r, avail)| {
        if let Ok((_, len)) = parse_record_header(head, *r, *avail, 4 << 20) {
            assert!(len as u64 <= 1 << 36);
        }
    });
}

#[test]
fn rendezvous_joins() {
    let mut valid = b"SHMJOIN1".to_vec();
    valid.extend_from_slice(&2u32.to_le_bytes());
    valid.extend_from_slice(&4u32.to_le_bytes());
    fuzz("shm join", inputs(vec![valid]), |b| {
        if let Ok(rank) = parse_join(b, 4, &[true, false, false, true]) {
            assert!(rank == 1 || rank == 2);
        }
    });
}
