//! Point-to-point signatures under NCCL's rule (`order_point_to_point`): any program
//! whose ranks agree delivers every message as an unordered group does, however
//! slow a rank is (no false alarm); a receive whose peer sent another tag, and two
//! ranks each waiting to receive from the other, fail at once naming both calls.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use sheaf_core::{CommError, Communicator, Deadline};
use sheaf_testkit::run_world;

/// One message of a program: from, to, tag, payload length, and how long the
/// sender dawdles before sending it (past the probe, so waits are announced).
type Message = (usize, usize, u32, usize, u64);

fn program() -> impl Strategy<Value = (usize, Vec<Message>)> {
    (2usize..=4).prop_flat_map(|n| {
        let message = (0..n, 1..n, 0u32..4, 0usize..64, prop_oneof![4 => Just(0u64), 1 => 60u64..90]);
        let messages = prop::collection::vec(message, 1..24)
            .prop_map(move |ms| ms.into_iter().map(|(s, d, t, l, w)| (s, (s + d) % n, t, l, w)).collect());
        (Just(n), messages)
    })
}

fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j) as u8).collect()
}

/// Each rank runs its part of `messages` in their global order (a send where it is
/// the sender, a receive where it is the receiver), so the ranks agree and nothing
/// can deadlock; returns every rank's error, if any.
fn run(n: usize, messages: &[Message], ordered: bool) -> Vec<String> {
    let results = run_world(n, |g| -> Result<(), String> {
        let dl = Deadline::after(Duration::from_secs(30));
        let r = g.rank();
        if ordered && !g.order_point_to_point().map_err(|e| e.to_string())? {
            return Err("the group does not check point-to-point order".into());
        }
        for (i, &(from, to, tag, len, dawdle)) in messages.iter().enumerate() {
            if r == from {
                std::thread::sleep(Duration::from_millis(dawdle));
                g.send(to, tag, &payload(i, len), dl).map_err(|e| e.to_string())?;
            } else if r == to {
                let got = g.recv(from, tag, dl).map_err(|e| e.to_string())?;
                if got != payload(i, len) {
                    return Err(format!("message {i} arrived as {got:?}"));
                }
            }
        }
        g.barrier(dl).map_err(|e| e.to_string())
    });
    results.into_iter().enumerate().filter_map(|(r, e)| e.err().map(|e| format!("rank {r}: {e}"))).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(sheaf_testkit::proptest_cases(24)))]

    /// Ranks that agree never trip the checks, slow senders included: every receive
    /// gets what an unordered group gives it.
    #[test]
    fn agreeing_ranks_get_every_message_as_unordered((n, messages) in program()) {
        let errors = run(n, &messages, true);
        prop_assert!(errors.is_empty(), "{}", errors.join("\n"));
        prop_assert!(run(n, &messages, false).is_empty());
    }
}

/// Runs a two-rank world where `each` is what each rank does, and returns each
/// rank's error (`None` when it finished) and when it came.
fn two(
    each: impl Fn(&sheaf_collectives::Group, Deadline) -> Result<(), CommError> + Sync,
) -> Vec<(Option<String>, Duration)> {
    let start = Instant::now();
    run_world(2, |g| {
        g.order_point_to_point().unwrap();
        let out = each(&g, Deadline::after(Duration::from_secs(30)));
        (out.err().map(|e| e.to_string()), start.elapsed())
    })
}

#[test]
fn a_receive_whose_peer_sent_another_tag_fails_at_once_naming_both() {
    let out = two(|g, dl| {
        if g.rank() == 1 {
            g.send(0, 1, b"one", dl)?;
            g.send(0, 5, b"five", dl)?;
            return Ok(());
        }
        g.recv(1, 1, dl)?;
        g.recv(1, 4, dl).map(drop)
    });
    let (err, when) = &out[0];
    let err = err.as_deref().expect("rank 0 fails");
    assert!(
        err.contains("point-to-point out of step: rank 0's recv #2 from rank 1 wants tag 4; rank 1's send #2 to rank 0 was tag 5 (4 bytes)"),
        "{err}"
    );
    assert!(*when < Duration::from_secs(10), "failed only after {when:?}");
}

#[test]
fn two_ranks_each_waiting_on_the_other_fail_at_once() {
    let out = two(|g, dl| {
        let peer = 1 - g.rank();
        g.send(peer, 0, b"first", dl)?;
        g.recv(peer, 0, dl)?;
        // Both receive next: neither will send.
        g.recv(peer, 7, dl).map(drop)
    });
    // The rank that sees it first names both calls; the other, told by the abort,
    // may fail naming it before it reads the first one's record. Both fail at once.
    let mut named = 0;
    for (r, (err, when)) in out.iter().enumerate() {
        let err = err.as_deref().unwrap_or_else(|| panic!("rank {r} finished"));
        let want = format!(
            "rank {r} waits in recv #2 of tag 7 from rank {p}, and rank {p} in recv #2 of tag 7 from rank {r}: \
             neither will send",
            p = 1 - r
        );
        named += usize::from(err.contains(&want));
        assert!(*when < Duration::from_secs(10), "rank {r} failed only after {when:?}: {err}");
    }
    assert!(named >= 1, "{out:?}");
}

/// A receive that waited (and said so) and then got its message was no deadlock: the
/// peer, receiving in turn, reads the stale wait and goes on.
#[test]
fn a_wait_answered_late_is_no_deadlock() {
    let out = two(|g, dl| {
        let peer = 1 - g.rank();
        if g.rank() == 0 {
            g.recv(peer, 3, dl)?; // waits past the probe: says so
            g.send(peer, 4, b"back", dl)?;
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(300));
        g.send(peer, 3, b"late", dl)?;
        g.recv(peer, 4, dl).map(drop)
    });
    assert!(out.iter().all(|(e, _)| e.is_none()), "{out:?}");
}

/// A wait record that a send answered before it was read (it crossed the send on the
/// wire) is recognised as answered by the receive that reads it. Rank 1's record is
/// written by hand here, as the race would leave it: "recv #1 of tag 3 waits".
#[test]
fn a_wait_read_after_the_send_that_answered_it_is_no_deadlock() {
    let out = two(|g, dl| {
        let peer = 1 - g.rank();
        if g.rank() == 0 {
            g.send(peer, 3, b"first", dl)?;
            return g.recv(peer, 4, dl).map(drop);
        }
        let mut wait = [0u8; 24];
        wait[0] = 2; // a wait record
        wait[4..8].copy_from_slice(&3u32.to_le_bytes());
        wait[8..16].copy_from_slice(&1u64.to_le_bytes());
        let records = sheaf_core::Tag::new(0, sheaf_core::TagClass::Signature, 1);
        g.link().send(0, records, &wait, dl)?;
        g.recv(peer, 3, dl)?;
        g.send(peer, 4, b"second", dl)
    });
    assert!(out.iter().all(|(e, _)| e.is_none()), "{out:?}");
}
