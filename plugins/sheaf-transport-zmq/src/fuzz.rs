//! Fuzzing what this transport reads from the network: frames (every message on a
//! data link) and rendezvous messages (joins rank 0 reads, the table the others read).

use sheaf_testkit::fuzz::{fuzz, inputs, CappedAlloc};

use crate::link::{check_join, parse_table, Join};
use crate::wire::{self, Kind};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

#[test]
fn frames() {
    let seeds = vec![
        wire::encode(Kind::Data, 1, 0xABCD, 4096, 0, &[7; 64]),
        wire::encode(Kind::DataSync, 3, 1 << 40, 1 << 20, 1 << 19, b"payload"),
        wire::encode(Kind::Bye, 0, 0, 0, 0, &[]),
    ];
    fuzz("zmq frame", inputs(seeds), |b| {
        if let Ok(f) = wire::decode(b) {
            assert_eq!(f.payload.len(), b.len() - 32);
        }
        let _ = wire::claimed_src(b);
    });
}

#[test]
fn rendezvous_messages() {
    let join = |rank, world, endpoint: &str| {
        serde_json::to_vec(&Join { rank, world_size: world, endpoint: endpoint.into() }).unwrap()
    };
    let seeds = vec![
        join(1, 2, "tcp://127.0.0.1:4242"),
        join(3, 4, "ipc://\0sheaf-1-2-rank3.ipc"),
        serde_json::to_vec(&["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]).unwrap(),
    ];
    fuzz("zmq rendezvous", inputs(seeds), |b| {
        let table = vec![String::from("tcp://127.0.0.1:1"), String::new(), String::new(), String::new()];
        if let Ok(j) = check_join(b, &table) {
            assert!(j.rank > 0 && j.rank < 4 && j.world_size == 4);
        }
        if let Some(t) = parse_table(b, 2) {
            assert_eq!(t.len(), 2);
        }
    });
}
