//! `Group`'s own tests over stand-in links: members, argument checks, blame, contexts
//! and the hierarchy over hosts.

use super::*;

/// A link of `world` ranks that carries nothing (for what needs no messages).
struct Silent(usize, usize);

impl Link for Silent {
    fn rank(&self) -> usize {
        self.0
    }
    fn world_size(&self) -> usize {
        self.1
    }
    fn send(&self, _: usize, _: Tag, _: &[u8], _: Deadline) -> Result<(), CommError> {
        Err(CommError::Closed { op: Op::Send })
    }
    fn recv(&self, _: usize, _: Tag, _: Deadline) -> Result<Vec<u8>, CommError> {
        Err(CommError::Closed { op: Op::Recv })
    }
}

/// The world group's members are the link's ranks in order; a sub-group's are the
/// link ranks it was made of, in its own rank order, and its rank and size follow.
#[test]
fn members_are_link_ranks_in_group_order() {
    let link: Arc<dyn Link> = Arc::new(Silent(2, 4));
    let world = Group::world(link.clone());
    assert_eq!((world.members(), world.rank(), world.world_size()), (&[0, 1, 2, 3][..], 2, 4));
    assert!(world.is_whole_world());
    let sub = Group::new(link.clone(), Arc::from(vec![3, 2]), 1, 7);
    assert_eq!((sub.members(), sub.rank(), sub.world_size()), (&[3, 2][..], 1, 2));
    assert!(!sub.is_whole_world());
    // The world's first ranks, in order, are still not the world (its native
    // allreduce would reduce over every rank).
    assert!(!Group::new(link, Arc::from(vec![0, 1]), 1, 7).is_whole_world());
    // A peer outside the group is refused before anything is sent.
    let e = sub.send(2, 0, &[], Deadline::after(std::time::Duration::from_secs(1))).unwrap_err();
    assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
}

/// A root outside the group is the caller's mistake, refused before anything is
/// sent, by every rooted collective.
#[test]
fn a_root_outside_the_group_is_refused() {
    let g = Group::world(Arc::new(Silent(0, 3)));
    let dl = Deadline::after(std::time::Duration::from_secs(5));
    let (mut buf, input) = ([0u8; 12], [0u8; 12]);
    let mut one = [0u8; 4];
    let errors = [
        g.broadcast(&mut buf, 3, dl).unwrap_err(),
        g.reduce(&mut buf, DType::F32, ReduceOp::Sum, 3, dl).unwrap_err(),
        g.gather(&input[..4], &mut buf, 3, dl).unwrap_err(),
        g.scatter(&input, &mut one, 7, dl).unwrap_err(),
    ];
    for e in errors {
        assert!(
            matches!(&e, CommError::InvalidArgument { detail, .. } if detail.contains("outside a group of 3")),
            "{e}"
        );
    }
}

/// An all-to-all whose input and output differ in length, or whose buffers are not
/// one equal block per rank, is refused before anything is sent.
#[test]
fn an_all_to_all_of_unequal_or_uneven_buffers_is_refused() {
    let g = Group::world(Arc::new(Silent(0, 3)));
    let dl = Deadline::after(std::time::Duration::from_secs(5));
    for (input, output) in [(12, 9), (9, 12), (10, 10)] {
        let e = g.all_to_all(&vec![0u8; input], &mut vec![0u8; output], dl).unwrap_err();
        assert!(
            matches!(&e, CommError::InvalidArgument { detail, .. } if detail.contains("3 equal blocks")),
            "{input} -> {output}: {e}"
        );
    }
}

/// A link whose ranks have already reported whom they waited on.
struct Reported(Vec<(usize, usize)>);

impl Link for Reported {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        4
    }
    fn send(&self, _: usize, _: Tag, _: &[u8], _: Deadline) -> Result<(), CommError> {
        Err(CommError::Closed { op: Op::Send })
    }
    fn recv(&self, _: usize, _: Tag, _: Deadline) -> Result<Vec<u8>, CommError> {
        Err(CommError::Closed { op: Op::Recv })
    }
    fn failure_reports(&self) -> Vec<(usize, usize)> {
        self.0.clone()
    }
}

/// Rank 0 timed out waiting on rank 1. With no report from rank 1 (or a cycle of
/// waits) the timeout stands, naming rank 1; when rank 1 reported waiting on rank
/// 2, which reported nothing, rank 2 is named as failed.
#[test]
fn blame_follows_the_reported_waits_to_the_rank_that_stopped() {
    let timeout =
        || CommError::Timeout { op: Op::Allreduce, peer: 1, waited: std::time::Duration::from_secs(2) };
    let blamed = |reports: Vec<(usize, usize)>| Group::world(Arc::new(Reported(reports))).blame(timeout());
    for reports in [vec![(0, 1)], vec![(0, 1), (1, 2), (2, 1)]] {
        let e = blamed(reports.clone());
        assert!(matches!(e, CommError::Timeout { peer: 1, .. }), "{reports:?}: {e}");
    }
    let e = blamed(vec![(0, 1), (1, 2)]);
    assert!(
        matches!(&e, CommError::PeerFailed { peer: 2, reason, .. } if reason.contains("waiting on rank 1")),
        "{e}"
    );
}

/// Sub-communicator contexts are never the world's (0), differ from their parent's
/// and from each other across a parent's splits, and fit the tag's context bits.
#[test]
fn child_contexts_are_distinct_and_in_range() {
    for parent in [0u32, 1, 7, 0xABCDE] {
        let mut seen = std::collections::HashSet::new();
        for seq in 0..2000 {
            let c = child_context(parent, seq);
            assert!(c != 0 && c != parent, "parent {parent} seq {seq}: {c}");
            assert!(c < 1 << Tag::CONTEXT_BITS, "{c:#x}");
            assert!(seen.insert(c), "parent {parent}: seq {seq} repeats context {c:#x}");
        }
    }
}

/// `with_hosts` builds the hierarchy only where it helps: several hosts, some with
/// more than one rank, and hosts given for every rank. Then this rank's host group
/// holds exactly its host's ranks in world order, the leaders' group exactly each
/// host's first rank (and only leaders belong to it), each under a context of its
/// own: distinct from each other and from the parent's.
#[test]
fn with_hosts_builds_the_hierarchy_only_where_it_helps() {
    let at = |rank: usize, host_of: &[usize]| {
        let n = if host_of.len() == 6 { 6 } else { 4 };
        Group::world(Arc::new(Silent(rank, n))).with_hosts(host_of)
    };
    // One host; one rank per host; hosts for 3 or 5 ranks of a world of 4.
    for flat in [&[0, 0, 0, 0][..], &[3, 1, 2, 0], &[0, 0, 1], &[0, 0, 1, 1, 1]] {
        assert!(at(0, flat).hosts.is_none(), "{flat:?}");
    }
    for (host_of, rank, intra, leaders) in [
        (&[0, 0, 1, 1][..], 0, &[0, 1][..], Some(&[0, 2][..])),
        (&[0, 0, 1, 1], 3, &[2, 3], None),
        (&[1, 0, 1, 0, 2, 2], 2, &[0, 2], None),
        (&[1, 0, 1, 0, 2, 2], 4, &[4, 5], Some(&[0, 1, 4][..])),
        (&[0, 1, 1, 1], 0, &[0], Some(&[0, 1][..])),
    ] {
        let g = at(rank, host_of);
        let hosts = g.hosts.as_ref().unwrap_or_else(|| panic!("{host_of:?}: no hierarchy"));
        assert_eq!(hosts.intra.members(), intra, "{host_of:?} rank {rank}");
        assert_eq!(hosts.leaders.as_ref().map(|l| l.members()), leaders, "{host_of:?} rank {rank}");
        if let Some(l) = &hosts.leaders {
            assert!(l.context != hosts.intra.context && l.context != g.context, "{host_of:?}");
        }
        assert_ne!(hosts.intra.context, g.context, "{host_of:?}");
    }
}
