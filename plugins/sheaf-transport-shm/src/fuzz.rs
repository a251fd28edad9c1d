//! Fuzzing what this transport reads from other processes: record headers in the
//! shared rings and joins on the rendezvous socket.

use sheaf_testkit::fuzz::{fuzz, inputs, CappedAlloc};

use crate::layout::parse_record_header;
use crate::rendezvous::{parse_join, Joined};

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
    let key = sheaf_auth::Key::new(b"fuzz");
    let mut valid = b"SHMJOIN2".to_vec();
    valid.extend_from_slice(&2u32.to_le_bytes());
    valid.extend_from_slice(&4u32.to_le_bytes());
    valid.extend_from_slice(&[9; 16]);
    let claim = sheaf_auth::join::Claim { rank: 2, world: 4, session: &[9; 16], extra: &[] };
    valid.extend_from_slice(&claim.prove(&key, "sheaf-shm-join", b"challenge"));
    assert!(matches!(
        parse_join(&valid, &key, b"challenge", 4, &[true, false, false, true]),
        Joined::Rank(2, _)
    ));
    fuzz("shm join", inputs(vec![valid]), |b| {
        // Without the secret (another key, another challenge) no input is taken.
        let other = sheaf_auth::Key::new(b"another secret");
        assert!(!matches!(
            parse_join(b, &other, b"challenge", 4, &[true, false, false, true]),
            Joined::Rank(..)
        ));
        assert!(!matches!(
            parse_join(b, &key, b"other challenge", 4, &[true, false, false, true]),
            Joined::Rank(..)
        ));
        let _ = parse_join(b, &key, b"challenge", 4, &[true, false, false, true]);
    });
}
