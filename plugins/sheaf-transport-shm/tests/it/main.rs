//! The shared-memory link between threads of one process (the segment and its
//! rendezvous are the real thing: memfd, SCM_RIGHTS, futexes): the collective laws
//! hold for every algorithm, messages far larger than a ring cross it while both
//! sides send at once, and garbage, dropped peers, aborts and silence are typed
//! errors naming the rank. Across real processes: the end-to-end tests and
//! `sheaf plugin check`.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use sheaf_collectives::Algorithm;
use sheaf_core::{CommError, DType, Deadline, Link, ReduceOp, Tag};
use sheaf_testkit::conformance::collectives::{check_all, Case};
use sheaf_testkit::{proptest_cases, run_links};
use sheaf_transport_shm::{ShmConfig, ShmLink};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn config(rank: usize, world: usize, port: u16, ring: usize) -> ShmConfig {
    serde_json::from_value(serde_json::json!({
        "rank": rank, "world_size": world, "master_addr": "127.0.0.1", "master_port": port,
        "connect_timeout_ms": 20000, "ring_bytes": ring, "advertise_addr": null,
        "job_token": "a test secret"
    }))
    .unwrap()
}

fn world_with_ring(n: usize, ring: usize) -> Vec<ShmLink> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..n).map(|r| s.spawn(move || ShmLink::connect(config(r, n, port, ring)))).collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    })
}

fn world(n: usize) -> Vec<ShmLink> {
    world_with_ring(n, 64 << 10)
}

fn dl() -> Deadline {
    Deadline::after(Duration::from_secs(20))
}

fn arcs(links: Vec<ShmLink>) -> Vec<Arc<dyn Link>> {
    links.into_iter().map(|l| Arc::new(l) as Arc<dyn Link>).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: proptest_cases(12), ..ProptestConfig::default() })]

    /// Every law of the conformance suite, every allreduce algorithm, over a 64 KiB
    /// ring, so that long buffers stream through it in many pieces.
    #[test]
    fn collective_laws_hold_over_shared_memory(
        n in 1usize..=5,
        len in prop_oneof![0usize..8, 8usize..3000, 3000usize..100_000],
        seed in any::<u64>(),
        dtype in prop::sample::select(vec![DType::F32, DType::F64, DType::BF16, DType::F16]),
        op in prop::sample::select(vec![ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min]),
        algorithm in prop::sample::select(vec![Algorithm::Ring, Algorithm::HalvingDoubling, Algorithm::Direct]),
        root in 0usize..5,
    ) {
        let case = Case { seed, len, dtype, op, root: root % n };
        let results = run_links(arcs(world(n)), |g| {
            let g = g.with_algorithm(algorithm);
            check_all(&g, &case, dl()).and_then(|()| g.link().close(dl()).map_err(|e| e.to_string()))
        });
        prop_assert!(results.iter().all(Result::is_ok), "{results:?}");
    }
}

#[test]
fn large_messages_cross_both_ways_at_once_through_a_small_ring() {
    let links = world(2);
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::thread::scope(|s| {
        for (me, link) in links.iter().enumerate() {
            let big = &big;
            s.spawn(move || {
                // Both send everything before receiving anything: only a send that
                // drains its own incoming ring while blocked gets through this.
                for i in 0..3u64 {
                    link.send(1 - me, Tag(i), big, dl()).unwrap();
                }
                for i in (0..3u64).rev() {
                    assert_eq!(&link.recv(1 - me, Tag(i), dl()).unwrap(), big);
                }
                link.close(dl()).unwrap();
            });
        }
    });
}

#[test]
fn a_closed_peers_messages_are_still_delivered() {
    let links = world(2);
    links[0].send(1, Tag(1), b"last words", dl()).unwrap();
    links[0].close(dl()).unwrap();
    assert_eq!(links[1].recv(0, Tag(1), dl()).unwrap(), b"last words");
    let e = links[1].recv(0, Tag(2), dl()).unwrap_err();
    assert!(matches!(&e, CommError::PeerFailed { peer: 0, reason, .. } if reason.contains("left")), "{e:?}");
}

#[test]
fn a_dropped_peer_is_named_quickly() {
    let mut links = world(3);
    drop(links.remove(2));
    let start = Instant::now();
    let e = links[0].recv(1, Tag(7), Deadline::after(Duration::from_secs(30))).unwrap_err();
    assert!(matches!(e, CommError::PeerFailed { peer: 2, .. }), "{e:?}");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
}

#[test]
fn an_abort_reaches_every_rank_with_its_culprit() {
    let links = world(3);
    links[1].abort(2, "rank 2 sent nonsense");
    for l in [&links[0], &links[2]] {
        let e = l.recv(1, Tag(3), dl()).unwrap_err();
        assert!(
            matches!(&e, CommError::Aborted { peer: 2, reason, .. } if reason.contains("nonsense")),
            "{e:?}"
        );
    }
    assert_eq!(links[0].failure_reports(), vec![(1, 2)]);
}

#[test]
fn silence_is_a_timeout_naming_the_peer() {
    let links = world(2);
    let start = Instant::now();
    let e = links[0].recv(1, Tag(0), Deadline::after(Duration::from_millis(300))).unwrap_err();
    assert!(matches!(e, CommError::Timeout { peer: 1, .. }), "{e:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn garbage_in_a_ring_is_a_protocol_error_naming_the_sender() {
    let links = world(2);
    links[1].write_raw_for_tests(0, &[0xAB; 40]);
    let e = links[0].recv(1, Tag(9), dl()).unwrap_err();
    assert!(matches!(&e, CommError::Protocol { peer: 1, .. }), "{e:?}");
    // And it stays an error: the ring cannot be trusted any more.
    assert!(links[0].recv(1, Tag(9), dl()).is_err());
}

#[test]
fn rendezvous_times_out_naming_the_socket() {
    let port = free_port();
    let mut c = config(1, 2, port, 1 << 16);
    c.connect_timeout_ms = 300;
    let start = Instant::now();
    let e = ShmLink::connect(c).err().unwrap().to_string();
    assert!(e.contains(&port.to_string()) && e.contains("one host"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn a_mismatched_world_is_refused() {
    let port = free_port();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(move || ShmLink::connect(config(0, 2, port, 1 << 16)).map(|_| ()));
        let b = s.spawn(move || ShmLink::connect(config(1, 3, port, 1 << 16)).map(|_| ()));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (a, b) = (a.unwrap_err().to_string(), b.unwrap_err().to_string());
    assert!(a.contains("world of 3") && b.contains("refused"), "{a} / {b}");
}

#[test]
#[ignore = "timing probe, run by hand"]
fn probe_rtt() {
    let links = world_with_ring(2, 4 << 20);
    let n = 2000;
    std::thread::scope(|s| {
        let (a, b) = (&links[0], &links[1]);
        s.spawn(move || {
            for i in 0..n {
                let m = b.recv(0, Tag(i), dl()).unwrap();
                b.send(0, Tag(i), &m, dl()).unwrap();
            }
        });
        let mut times = Vec::new();
        for i in 0..n {
            let t = Instant::now();
            a.send(1, Tag(i), &[1, 2, 3, 4], dl()).unwrap();
            a.recv(1, Tag(i), dl()).unwrap();
            times.push(t.elapsed());
        }
        times.sort();
        eprintln!(
            "rtt median {:?} p10 {:?} p90 {:?}",
            times[n as usize / 2],
            times[n as usize / 10],
            times[n as usize * 9 / 10]
        );
    });
}

#[test]
#[ignore = "timing probe, run by hand"]
fn probe_stream() {
    let links = world_with_ring(2, 4 << 20);
    for size in [4096usize, 65536, 262144, 524288, 1 << 20] {
        let n = 2000;
        let payload = vec![7u8; size];
        let t = Instant::now();
        std::thread::scope(|s| {
            let (a, b) = (&links[0], &links[1]);
            s.spawn(move || {
                let mut got = vec![0u8; size];
                for i in 0..n {
                    b.recv_into(0, Tag(i), &mut got, None, dl()).unwrap();
                }
            });
            for i in 0..n {
                a.send(1, Tag(i), &payload, dl()).unwrap();
            }
        });
        let per = t.elapsed() / n as u32;
        eprintln!("{size}: {per:?} per message, {:.2} GB/s", size as f64 / per.as_secs_f64() / 1e9);
    }
}

/// Strangers on the shared-memory rendezvous (garbage, a join proven under another
/// secret, one that connects and says nothing) are refused and never get the segment;
/// the ranks that hold the secret still meet.
#[test]
fn strangers_at_the_rendezvous_never_get_the_segment() {
    use std::io::{Read, Write};
    use std::os::linux::net::SocketAddrExt;
    let port = free_port();
    let rank0 = std::thread::spawn(move || ShmLink::connect(config(0, 2, port, 64 << 10)));
    std::thread::sleep(Duration::from_millis(300));
    let uid = unsafe { libc::getuid() };
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(format!("sheaf-shm-{uid}-{port}")).unwrap();
    let stranger = |join: Option<Vec<u8>>| {
        let mut s = std::os::unix::net::UnixStream::connect_addr(&addr).unwrap();
        let mut challenge = [0u8; 24];
        s.read_exact(&mut challenge).unwrap();
        assert_eq!(&challenge[..8], b"SHMCHAL1");
        let Some(mut join) = join else { return String::from("silent") };
        if join.len() == 64 {
            // A proof over this challenge, but under a wrong secret.
            let proof = sheaf_auth::Key::new(b"a wrong secret").prove(
                "sheaf-shm-join",
                &[&challenge[8..], &1u32.to_le_bytes(), &2u32.to_le_bytes(), &join[16..32]],
            );
            join[32..].copy_from_slice(&proof);
        }
        s.write_all(&join).unwrap();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    };
    assert!(stranger(Some(vec![0xAB; 64 + 1].into_iter().take(64).collect())).starts_with("SHMERR"));
    let mut forged = b"SHMJOIN2".to_vec();
    forged.extend_from_slice(&1u32.to_le_bytes());
    forged.extend_from_slice(&2u32.to_le_bytes());
    forged.extend_from_slice(&[7; 16 + 32]);
    assert!(stranger(Some(forged)).starts_with("SHMERR"));
    stranger(None);
    let rank1 = ShmLink::connect(config(1, 2, port, 64 << 10)).unwrap();
    let rank0 = rank0.join().unwrap().unwrap();
    rank1.send(0, Tag(3), b"member", dl()).unwrap();
    assert_eq!(rank0.recv(1, Tag(3), dl()).unwrap(), b"member");
}
