//! The paths the property tests' sizes do not reach: ring blocks larger than one
//! segment (so segmentation and sending ahead run), peers that are not ranks, and
//! collectives that must leave no message unreceived.

use std::sync::Arc;
use std::time::Duration;

use sheaf_collectives::{Algorithm, Group};
use sheaf_core::{CommError, Communicator, DType, Deadline, Link, ReduceOp};
use sheaf_testkit::conformance::collectives::{self as laws, Case};
use sheaf_testkit::{run_links, run_world, InProcLink, InProcWorld};

fn deadline() -> Deadline {
    sheaf_testkit::test_deadline(Duration::from_secs(60))
}

/// Ring allreduce and reduce-scatter of blocks of several segments (up to 4 x 1 MiB
/// segments per block), in every dtype, equal their naive definitions.
#[test]
fn ring_blocks_of_many_segments_equal_naive() {
    for (n, len, dtype) in [
        (2, 1 << 20, DType::F32),
        (3, 3 << 20, DType::F32),
        (2, (1 << 20) + 7, DType::BF16),
        (4, 1 << 21, DType::F64),
    ] {
        let case = Case { seed: 11, len, dtype, op: ReduceOp::Sum, root: 0 };
        let results = run_world(n, |g| {
            let g = g.with_algorithm(Algorithm::Ring);
            laws::check_allreduce(&g, &case, deadline())?;
            laws::check_reduce_scatter(&g, &case, deadline())
        });
        for (r, res) in results.into_iter().enumerate() {
            assert!(res.is_ok(), "world {n} len {len} {dtype:?} rank {r}: {res:?}");
        }
    }
}

/// Sending to, or receiving from, a rank that is not another member is an
/// `InvalidArgument` naming it, before anything moves.
#[test]
fn peers_outside_the_group_are_refused() {
    let results = run_world(3, |g| {
        let me = g.rank();
        let mut out = Vec::new();
        for peer in [me, 3, 100] {
            out.push(g.send(peer, 1, &[1, 2, 3], deadline()));
            out.push(g.recv(peer, 1, deadline()).map(|_| ()));
        }
        out
    });
    for (r, rank) in results.into_iter().enumerate() {
        for res in rank {
            match res {
                Err(CommError::InvalidArgument { detail, .. }) => {
                    assert!(detail.contains("is not another rank of a group of 3"), "rank {r}: {detail}");
                }
                other => panic!("rank {r}: {other:?}"),
            }
        }
    }
}

/// Every collective, every algorithm, at sizes on both sides of the thresholds, leaves
/// no message unreceived anywhere in the world (an extra send would sit in a queue and
/// could later match another collective's receive).
#[test]
fn collectives_leave_no_message_behind() {
    for n in [2usize, 3, 5] {
        for len in [0usize, 3, 20_000, 300_000] {
            for algorithm in Algorithm::ALL {
                let world = InProcWorld::new(n);
                let links: Vec<Arc<dyn Link>> =
                    world.links().into_iter().map(|l| Arc::new(l) as Arc<dyn Link>).collect();
                let case = Case { seed: len as u64, len, dtype: DType::F32, op: ReduceOp::Max, root: n - 1 };
                let results = run_links(links, |g| {
                    let g = g.with_algorithm(algorithm);
                    laws::check_all(&g, &case, deadline())
                });
                for (r, res) in results.into_iter().enumerate() {
                    assert!(res.is_ok(), "world {n} len {len} {algorithm}: rank {r}: {res:?}");
                }
                assert_eq!(world.pending(), 0, "world {n} len {len} {algorithm}: messages left unreceived");
            }
        }
    }
}

/// Broadcasts and reduces of 64 KiB and more over 3 ranks go down (or up) the chain
/// in pieces of an eighth of the buffer, at least 16 KiB and at most 1 MiB (a reduce's
/// in whole elements): the pipelining that makes the chain take about one buffer's transfer.
/// Each hop carries the whole buffer once, and only the chain's hops carry anything.
#[test]
fn chain_collectives_cut_the_buffer_in_eighths_within_16_kib_and_1_mib() {
    // (bytes, the broadcast's pieces, the reduce's: it keeps whole f64s together).
    for (len, bytes, values) in [
        (64 << 10, 16 << 10, 16 << 10),
        (1 << 20, 128 << 10, 128 << 10),
        (16 << 20, 1 << 20, 1 << 20),
        ((1 << 20) + 24, 131_075, 131_072),
    ] {
        for reduce in [false, true] {
            let piece = if reduce { values } else { bytes };
            let world = InProcWorld::new(3);
            let links: Vec<Arc<dyn Link>> =
                world.links().into_iter().map(|l| Arc::new(l) as Arc<dyn Link>).collect();
            let results = run_links(links, |g| {
                let mut buf = vec![1u8; len];
                if reduce {
                    g.reduce(&mut buf, DType::F64, ReduceOp::Sum, 0, deadline())
                } else {
                    g.broadcast(&mut buf, 0, deadline())
                }
            });
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            let what = if reduce { "reduce" } else { "broadcast" };
            // What went from rank to rank besides the call's signature, the 24 bytes each
            // rank sends its right neighbour first.
            let data = |from: usize, to: usize| {
                let mut sent = world.sent(from, to);
                if to == (from + 1) % 3 {
                    assert_eq!(sent.first(), Some(&24), "{from} -> {to}: no signature first");
                    sent.remove(0);
                }
                sent
            };
            // Broadcast: 0 -> 1 -> 2; reduce: 2 -> 1 -> 0.
            let hops = if reduce { [(2, 1), (1, 0)] } else { [(0, 1), (1, 2)] };
            for (from, to) in hops {
                let sent = data(from, to);
                assert_eq!(
                    sent.iter().sum::<usize>(),
                    len,
                    "{what} of {len} bytes, {from} -> {to}: {sent:?}"
                );
                assert!(
                    sent[..sent.len() - 1].iter().all(|&s| s == piece),
                    "{what} of {len} bytes: {sent:?}"
                );
                assert!(*sent.last().unwrap() <= piece, "{what}: {sent:?}");
            }
            for (from, to) in
                [(0, 2), (2, 0)].into_iter().chain(if reduce { [(0, 1), (1, 2)] } else { [(2, 1), (1, 0)] })
            {
                assert!(data(from, to).is_empty(), "{what}: {from} -> {to} is not a hop");
            }
        }
    }
}

/// Hosts, in process: a world link and a link per host combined into each rank's
/// `HybridLink`, the world group told the hosts. Every collective law holds (the
/// hierarchical allreduce included: reduce in each host, allreduce among the hosts'
/// first ranks, broadcast in each host), for uneven hosts too, every reduction, sizes
/// on both sides of the thresholds; and no message is left unreceived on any link.
#[test]
fn hierarchical_collectives_over_hybrid_links_keep_every_law() {
    use sheaf_collectives::HybridLink;
    for host_of in [vec![0, 0, 1, 1], vec![0, 0, 0, 1, 1], vec![1, 0, 1, 0, 2, 2]] {
        let n = host_of.len();
        for (len, op) in
            [(5usize, ReduceOp::Sum), (20_000, ReduceOp::Avg), (70_000, ReduceOp::Max), (0, ReduceOp::Min)]
        {
            let world = InProcWorld::new(n);
            let mut host_ids: Vec<usize> = host_of.clone();
            host_ids.sort_unstable();
            host_ids.dedup();
            // One in-process world per host, its links in the order of that host's ranks.
            let mut local: Vec<Vec<InProcLink>> = Vec::new();
            let mut local_worlds = Vec::new();
            for &h in &host_ids {
                let size = host_of.iter().filter(|&&x| x == h).count();
                let w = InProcWorld::new(size);
                local.push(w.links());
                local_worlds.push(w);
            }
            let mut locals: Vec<std::vec::IntoIter<InProcLink>> =
                local.into_iter().map(Vec::into_iter).collect();
            let links: Vec<Arc<dyn Link>> = world
                .links()
                .into_iter()
                .enumerate()
                .map(|(r, w)| {
                    let h = host_ids.iter().position(|&x| x == host_of[r]).unwrap();
                    let ranks: Vec<usize> = (0..n).filter(|&q| host_of[q] == host_of[r]).collect();
                    let l = locals[h].next().unwrap();
                    Arc::new(HybridLink::new(Arc::new(w), Arc::new(l), &ranks).unwrap()) as Arc<dyn Link>
                })
                .collect();
            let case = Case { seed: len as u64 + 7, len, dtype: DType::F32, op, root: n - 1 };
            let host_of_ref = &host_of;
            let results = run_links(links, |g| {
                // Auto (direct below the ring's size, hierarchical above), then
                // hierarchical at every size, on the same links.
                let auto = g.with_hosts(host_of_ref);
                laws::check_all(&auto, &case, deadline())?;
                let world = Group::world(auto.link().clone()).with_algorithm(Algorithm::Hierarchical);
                laws::check_all(&world.with_hosts(host_of_ref), &case, deadline())
            });
            for (r, res) in results.into_iter().enumerate() {
                assert!(res.is_ok(), "hosts {host_of:?} len {len} {op:?}: rank {r}: {res:?}");
            }
            assert_eq!(world.pending(), 0, "hosts {host_of:?}: messages left on the world link");
            for w in &local_worlds {
                assert_eq!(w.pending(), 0, "hosts {host_of:?}: messages left on a host's link");
            }
        }
    }
}

/// Two hosts of two ranks, in process: each rank's `HybridLink` over the world link
/// and its host's link, with the in-process worlds kept to look at.
fn two_hosts() -> (Vec<sheaf_collectives::HybridLink>, InProcWorld, [InProcWorld; 2]) {
    let world = InProcWorld::new(4);
    let hosts = [InProcWorld::new(2), InProcWorld::new(2)];
    let mut locals: Vec<std::vec::IntoIter<InProcLink>> =
        hosts.iter().map(|h| h.links().into_iter()).collect();
    let links = world
        .links()
        .into_iter()
        .enumerate()
        .map(|(r, w)| {
            let ranks: Vec<usize> = if r < 2 { vec![0, 1] } else { vec![2, 3] };
            let local = locals[r / 2].next().unwrap();
            sheaf_collectives::HybridLink::new(Arc::new(w), Arc::new(local), &ranks).unwrap()
        })
        .collect();
    (links, world, hosts)
}

/// A hybrid link passes an abort, failure reports and its close to both of its links:
/// a rank on the same host and one on another are told of the abort naming the right
/// rank; the reports come back in world ranks, each once; after a close, peers over
/// either link see the rank leave instead of waiting out their deadline.
#[test]
fn hybrid_links_carry_aborts_reports_and_closes_over_both_links() {
    let short = || Deadline::after(Duration::from_millis(300));
    let tag = sheaf_core::Tag::new(1, sheaf_core::TagClass::User, 7);

    // Rank 1 (host 0) blames rank 3 (host 1).
    let (links, _world, _hosts) = two_hosts();
    links[1].abort(3, "boom");
    match links[2].recv(0, tag, short()) {
        Err(CommError::Aborted { peer: 3, reason, .. }) => assert_eq!(reason, "boom"),
        other => panic!("rank 2, over the world link: {other:?}"),
    }
    // Rank 3 is not on host 0: there the aborting rank itself is blamed, in world ranks.
    match links[0].recv(1, tag, short()) {
        Err(CommError::Aborted { peer: 1, .. }) => {}
        other => panic!("rank 0, over host 0's link: {other:?}"),
    }
    assert_eq!(links[0].failure_reports(), vec![(1, 3), (1, 1)]);

    // Blaming a rank of its own host: the two links' reports say the same, once.
    let (links, _world, _hosts) = two_hosts();
    links[1].abort(0, "boom");
    assert_eq!(links[0].failure_reports(), vec![(1, 0)]);
    assert!(matches!(links[0].recv(1, tag, short()), Err(CommError::Aborted { peer: 0, .. })));
    assert!(matches!(links[3].recv(0, tag, short()), Err(CommError::Aborted { peer: 0, .. })));

    // A closed rank leaves both links: its host's peer and another host's see it go.
    let (links, _world, _hosts) = two_hosts();
    links[0].close(short()).unwrap();
    for (r, over) in [(1, "host 0's link"), (2, "the world link")] {
        match links[r].recv(0, tag, short()) {
            Err(CommError::PeerFailed { peer: 0, reason, .. }) => {
                assert!(reason.contains("left"), "{reason}")
            }
            other => panic!("rank {r}, over {over}: {other:?}"),
        }
    }
}

/// An abort from another host reaches a rank blocked on a host-mate at once, not at
/// its deadline: the host's first rank relays the world link's abort to the host's
/// link, and the call it wakes names the rank the other host blamed.
#[test]
fn an_abort_from_another_host_wakes_a_rank_waiting_on_a_host_mate() {
    let tag = sheaf_core::Tag::new(1, sheaf_core::TagClass::User, 7);
    let (links, _world, _hosts) = two_hosts();
    let links = Arc::new(links);
    let waiting = {
        let links = links.clone();
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            // Rank 1 waits on rank 0, its host-mate, which never sends.
            let got = links[1].recv(0, tag, Deadline::after(Duration::from_secs(20)));
            (got, start.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    // Rank 2, on the other host, gives up on rank 3.
    links[2].abort(3, "boom");
    let (got, waited) = waiting.join().unwrap();
    match got {
        Err(CommError::Aborted { peer: 3, reason, .. }) => {
            assert!(reason.contains("rank 2 reported rank 3"), "{reason}")
        }
        other => panic!("rank 1, blocked on host 0's link: {other:?}"),
    }
    assert!(waited < Duration::from_secs(10), "woken only after {waited:?}");
    // The relay added one report, in world ranks: rank 0's abort of its host's link,
    // blaming itself as the culprit is not on that link.
    assert_eq!(links[1].failure_reports(), vec![(2, 3), (0, 0)]);
    // Nothing is relayed to the host of the rank that aborted: it was told directly.
    assert_eq!(links[3].failure_reports(), vec![(2, 3)]);
}

/// Each allreduce algorithm, asked for or chosen by `Auto` from the size, puts its own
/// pattern on the wire over 4 ranks (what rank 0 sends each peer, the call's signature
/// to its right neighbour left out): direct, the whole buffer once to every rank; ring,
/// 2(n-1) blocks to its right neighbour only; halving-doubling, two messages to each
/// partner (ranks 1 and 2) and none to rank 3. The results are equal whichever runs
/// (the laws), so only the wire tells which one did.
#[test]
fn each_allreduce_algorithm_and_autos_choice_show_on_the_wire() {
    let small = 4096;
    let large = 300_000;
    for (algorithm, len, expect) in [
        (Algorithm::Direct, small, "direct"),
        (Algorithm::Ring, small, "ring"),
        (Algorithm::HalvingDoubling, small, "halving-doubling"),
        (Algorithm::Auto, small, "direct"),
        (Algorithm::Auto, large, "ring"),
    ] {
        let world = InProcWorld::new(4);
        let links: Vec<Arc<dyn Link>> =
            world.links().into_iter().map(|l| Arc::new(l) as Arc<dyn Link>).collect();
        let results = run_links(links, |g| {
            let mut buf = vec![0u8; len];
            g.with_algorithm(algorithm).allreduce(&mut buf, DType::F32, ReduceOp::Sum, deadline())
        });
        assert!(results.iter().all(Result::is_ok), "{algorithm}: {results:?}");
        let sent = |to: usize| {
            let mut sent = world.sent(0, to);
            if to == 1 {
                assert_eq!(sent.first(), Some(&24), "{algorithm}: no signature first");
                sent.remove(0);
            }
            sent
        };
        let (to1, to2, to3) = (sent(1), sent(2), sent(3));
        let case = format!("{algorithm} of {len} bytes: to 1 {to1:?}, to 2 {to2:?}, to 3 {to3:?}");
        match expect {
            "direct" => assert!([&to1, &to2, &to3].iter().all(|s| s[..] == [len]), "{case}"),
            "ring" => {
                assert_eq!(to1.iter().sum::<usize>(), 2 * 3 * len / 4, "{case}");
                assert!(to1.len() >= 6 && to2.is_empty() && to3.is_empty(), "{case}");
            }
            _ => assert!(to1.len() == 2 && to2.len() == 2 && to3.is_empty(), "{case}"),
        }
    }
}

/// Over two hosts of two ranks, the hierarchical allreduce (asked for, or `Auto`'s
/// choice from the size where a flat `Auto` would take the ring) keeps rank 1, which
/// leads no host, off the network: it sends nothing to the other host's ranks but the
/// call's signature to its right neighbour, rank 2. Below that size `Auto` runs the flat
/// direct round (rank 1 sends rank 3 the whole buffer), and an explicit ring stays a
/// ring (rank 1 sends its blocks to rank 2).
#[test]
fn the_hierarchical_allreduce_is_chosen_by_size_and_keeps_non_leaders_off_the_network() {
    let (small, large) = (4096, 300_000);
    for (algorithm, len, expect) in [
        (Algorithm::Auto, small, "direct"),
        (Algorithm::Auto, large, "hierarchical"),
        (Algorithm::Hierarchical, small, "hierarchical"),
        (Algorithm::Ring, large, "ring"),
    ] {
        let (links, world, _hosts) = two_hosts();
        let links: Vec<Arc<dyn Link>> = links.into_iter().map(|l| Arc::new(l) as Arc<dyn Link>).collect();
        let results = run_links(links, |g| {
            let mut buf = vec![0u8; len];
            let g = g.with_algorithm(algorithm).with_hosts(&[0, 0, 1, 1]);
            g.allreduce(&mut buf, DType::F32, ReduceOp::Sum, deadline())
        });
        assert!(results.iter().all(Result::is_ok), "{algorithm}: {results:?}");
        let (to2, to3) = (world.sent(1, 2), world.sent(1, 3));
        let case = format!("{algorithm} of {len} bytes: rank 1 sent rank 2 {to2:?}, rank 3 {to3:?}");
        assert_eq!(to2.first(), Some(&24), "{case}: no signature first");
        match expect {
            "direct" => assert!(to2[1..] == [len] && to3 == [len], "{case}"),
            "hierarchical" => assert!(to2.len() == 1 && to3.is_empty(), "{case}"),
            _ => assert!(to2.len() > 1 && to3.is_empty(), "{case}"),
        }
    }
}

/// A step's mean loss and a run's test totals, as every strategy reduces them over a
/// world of 3 ranks: sums over every rank divided by every rank's count, a rank that
/// scores nothing (zeros) changing nothing, and no predictions at all a loss of 0 and
/// totals of NaN rather than a division by zero.
#[test]
fn mean_loss_and_test_totals_divide_the_world_sums() {
    let results = run_world(3, |g| {
        let r = sheaf_core::Communicator::rank(&g) as f64;
        let scored = if r == 2.0 { [0.0, 0.0] } else { [3.0 + r, 2.0 + r] };
        let mean = sheaf_train::mean_loss(&g, scored, deadline()).unwrap();
        let nothing = sheaf_train::mean_loss(&g, [0.0, 0.0], deadline()).unwrap();
        let totals = sheaf_train::test_totals(&g, [2.0 * r, r, 4.0], deadline()).unwrap();
        let none = sheaf_train::test_totals(&g, [0.0; 3], deadline()).unwrap();
        (mean, nothing, totals, none)
    });
    for (mean, nothing, totals, none) in results {
        assert_eq!(mean, 7.0 / 5.0);
        assert_eq!(nothing, 0.0);
        assert_eq!(totals, (3.0 / 12.0, 6.0 / 12.0));
        assert!(none.0.is_nan() && none.1.is_nan(), "{none:?}");
    }
}
