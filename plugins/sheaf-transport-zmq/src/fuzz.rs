//! Fuzzing what this transport reads from the network: frames (every message on a
//! data link, decoded and their seals checked) and rendezvous messages (joins rank 0
//! reads, the table the others read).

use sheaf_auth::Key;
use sheaf_testkit::fuzz::{fuzz, inputs, CappedAlloc};

use crate::rendezvous::{check_join, check_table, Joined, Rendezvous};
use crate::wire::{self, Kind};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

#[test]
fn frames() {
    let key = Key::new(b"fuzz");
    let mut seeds = vec![
        wire::encode(Kind::Data, 1, 0xABCD, 4096, 0, &[7; 64]),
        wire::encode(Kind::DataSync, 3, 1 << 40, 1 << 20, 1 << 19, b"payload"),
        wire::encode(Kind::Bye, 0, 0, 0, 0, &[]),
    ];
    for (i, s) in seeds.iter_mut().enumerate() {
        wire::seal(s, &key, 1, i as u64);
    }
    fuzz("zmq frame", inputs(seeds), |b| {
        if let Ok(f) = wire::decode(b) {
            assert_eq!(f.payload.len(), b.len() - wire::HEADER);
        }
        let _ = wire::claimed_src(b);
        let _ = wire::unseal(b, &key, 1);
    });
}

#[test]
fn rendezvous_messages() {
    let key = Key::new(b"fuzz");
    let msg = |m: &Rendezvous| serde_json::to_vec(m).unwrap();
    let seeds = vec![
        msg(&Rendezvous::Hello { rank: 1 }),
        msg(&Rendezvous::Join {
            rank: 1,
            world_size: 4,
            endpoint: "tcp://127.0.0.1:4242".into(),
            session: "00ff".into(),
            proof: "ab".repeat(32),
        }),
        msg(&Rendezvous::Table {
            endpoints: vec!["tcp://127.0.0.1:1".into(), "ipc://\0sheaf-1-2-rank1.ipc".into()],
            sessions: vec!["00".into(), "11".into()],
            proof: "cd".repeat(32),
        }),
        msg(&Rendezvous::Refused { reason: "no".into() }),
    ];
    fuzz("zmq rendezvous", inputs(seeds), |b| {
        let Ok(m) = serde_json::from_slice::<Rendezvous>(b) else { return };
        let table = vec![String::from("tcp://127.0.0.1:1"), String::new(), String::new(), String::new()];
        // Without the secret no input is taken as a rank.
        assert!(!matches!(check_join(&key, b"challenge", &m, &table), Joined::Rank { .. }));
        assert!(check_table(&key, "00ff", &m, 2).is_err());
    });
}
