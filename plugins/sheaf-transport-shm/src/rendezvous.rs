//! Meeting the other ranks of this host: rank 0 creates the segment and hands it over
//! an abstract Unix socket only to processes that prove the job's secret.

use std::time::Duration;

use sheaf_auth::{join, Key};
use sheaf_core::{CommError, Deadline, Op};

use crate::config::ShmConfig;
use crate::layout::{
    ring_bytes, seg_u64, segment_bytes, set_u64, CTRL_BYTES, C_CULPRIT, HEADER_BYTES, H_MAGIC, H_RING,
    H_TOTAL, H_VERSION, MAGIC, NO_CULPRIT, VERSION,
};
use crate::link::{connect_err, ShmLink};
use crate::segment::{self, Segment};

/// Bytes of rank 0's challenge: a magic and a nonce.
pub(crate) const CHALLENGE: usize = 8 + sheaf_auth::NONCE;
/// Bytes of a join: a magic, rank, world, the joiner's nonce and its proof.
pub(crate) const JOIN: usize = 16 + sheaf_auth::NONCE + sheaf_auth::PROOF;
/// How long rank 0 waits for one connection's join before it drops it (a stranger
/// that connects and says nothing must not hold up the ranks behind it).
pub(crate) const JOIN_WAIT: Duration = Duration::from_secs(2);

pub(crate) const JOIN_DOMAIN: &str = "sheaf-shm-join";

pub(crate) fn ok_proof(key: &Key, session: &[u8], total: u64) -> [u8; sheaf_auth::PROOF] {
    key.prove("sheaf-shm-ok", &[session, &total.to_le_bytes()])
}

/// A join as rank 0 reads it.
#[derive(Debug, PartialEq)]
pub(crate) enum Joined {
    /// A rank of this run, and its nonce.
    Rank(usize, Vec<u8>),
    /// No proof of the secret over this connection's challenge: refused.
    Refused(String),
    /// A proven join that does not fit this world: the job is misconfigured.
    Mismatch(String),
}

/// Rank 0's reading of a join on the rendezvous socket, the answer to `challenge`.
pub(crate) fn parse_join(join: &[u8], key: &Key, challenge: &[u8], world: usize, joined: &[bool]) -> Joined {
    let Ok(join) = <&[u8; JOIN]>::try_from(join) else {
        return Joined::Refused("garbage".into());
    };
    let field = |i: usize| u32::from_le_bytes(join[i..i + 4].try_into().expect("4 bytes"));
    let (magic, rank, their_world) = (&join[..8], field(8), field(12));
    let (session, proof) = (&join[16..16 + sheaf_auth::NONCE], &join[16 + sheaf_auth::NONCE..]);
    if magic != b"SHMJOIN2" {
        return Joined::Refused("garbage".into());
    }
    let claim = join::Claim { rank: rank.into(), world: their_world.into(), session, extra: &[] };
    match join::check(key, JOIN_DOMAIN, challenge, &claim, proof, world, |r| joined.get(r) != Some(&false)) {
        join::Joined::Rank(rank) => Joined::Rank(rank, session.to_vec()),
        join::Joined::Refused(why) => Joined::Refused(why),
        join::Joined::Mismatch(why) => Joined::Mismatch(why),
    }
}

impl ShmLink {
    /// Rank 0: creates the segment and hands it to every other rank.
    pub(crate) fn host(config: &ShmConfig, name: &str, deadline: Deadline) -> Result<Segment, CommError> {
        let world = config.world_size;
        let cap = ring_bytes(config);
        let total = segment_bytes(world, cap);
        let seg = Segment::create(total)
            .map_err(|e| connect_err(format!("creating a {total}-byte shared segment: {e}")))?;
        set_u64(&seg, H_MAGIC, MAGIC);
        set_u64(&seg, H_VERSION, u64::from(VERSION) | ((world as u64) << 32));
        set_u64(&seg, H_RING, cap as u64);
        set_u64(&seg, H_TOTAL, total as u64);
        for r in 0..world {
            set_u64(&seg, HEADER_BYTES + r * CTRL_BYTES + C_CULPRIT, NO_CULPRIT);
        }
        if world == 1 {
            return Ok(seg);
        }
        let listener = segment::listen(name).map_err(|e| {
            connect_err(format!(
                "rank 0 listening on the shared-memory rendezvous `{name}`: {e} (is another job using port {}?)",
                config.master_port
            ))
        })?;
        let key = Key::new(config.job_token.as_deref().unwrap_or("").as_bytes());
        let mut joined = vec![false; world];
        joined[0] = true;
        let mut refused = 0u64;
        while joined.iter().any(|j| !j) {
            let Some(mut stream) = segment::accept(&listener, deadline).map_err(connect_err)? else {
                let missing = joined.iter().position(|j| !j).unwrap_or(0);
                return Err(CommError::Timeout { op: Op::Connect, peer: missing, waited: Duration::ZERO });
            };
            // Challenge, then a proof of the secret over it, before anything is handed over.
            let nonce = sheaf_auth::nonce();
            let mut challenge = b"SHMCHAL1".to_vec();
            challenge.extend_from_slice(&nonce);
            let mut join = [0u8; JOIN];
            let wait = Deadline::after(deadline.remaining().min(JOIN_WAIT));
            let read = segment::write_all(&mut stream, &challenge, wait)
                .and_then(|()| segment::read_exact(&mut stream, &mut join, wait));
            let verdict = match read {
                Ok(()) => parse_join(&join, &key, &nonce, world, &joined),
                Err(e) => Joined::Refused(format!("a connection that sent no join ({e})")),
            };
            let (their_rank, session) = match verdict {
                Joined::Rank(r, session) => (r, session),
                Joined::Refused(why) => {
                    refused += 1;
                    if refused <= 4 || refused.is_power_of_two() {
                        eprintln!(
                            "sheaf-shm: rank 0 refused {why} on the rendezvous `{name}` ({refused} refused so far)"
                        );
                    }
                    let reason = "no proof of the job's secret (is SHEAF_JOB_TOKEN the same on every rank?)";
                    let _ = segment::write_all(&mut stream, format!("SHMERR{reason}").as_bytes(), wait);
                    continue;
                }
                Joined::Mismatch(p) => {
                    let _ = segment::write_all(&mut stream, format!("SHMERR{p}").as_bytes(), deadline);
                    return Err(connect_err(p));
                }
            };
            joined[their_rank] = true;
            let mut reply = b"SHMOK\0\0\0".to_vec();
            reply.extend_from_slice(&(total as u64).to_le_bytes());
            reply.extend_from_slice(&ok_proof(&key, &session, total as u64));
            segment::send_fd(&stream, seg.raw_fd(), &reply)
                .map_err(|e| connect_err(format!("handing the segment to rank {their_rank}: {e}")))?;
        }
        Ok(seg)
    }

    /// Ranks other than 0: receive the segment's descriptor from rank 0 and map it.
    pub(crate) fn join(config: &ShmConfig, name: &str, deadline: Deadline) -> Result<Segment, CommError> {
        let (rank, world) = (config.rank, config.world_size);
        let mut stream = segment::connect(name, deadline).map_err(|e| {
            connect_err(format!(
                "rank {rank} could not reach rank 0's shared-memory rendezvous `{name}` in {} ms: {e} (the shm transport joins ranks on one host)",
                config.connect_timeout_ms
            ))
        })?;
        let key = Key::new(config.job_token.as_deref().unwrap_or("").as_bytes());
        let mut challenge = [0u8; CHALLENGE];
        segment::read_exact(&mut stream, &mut challenge, deadline)
            .map_err(|e| connect_err(format!("rank {rank} waiting for rank 0's challenge: {e}")))?;
        if &challenge[..8] != b"SHMCHAL1" {
            return Err(connect_err("rank 0 answered the shared-memory rendezvous with garbage"));
        }
        let session = sheaf_auth::nonce();
        let mut join = b"SHMJOIN2".to_vec();
        join.extend_from_slice(&(rank as u32).to_le_bytes());
        join.extend_from_slice(&(world as u32).to_le_bytes());
        join.extend_from_slice(&session);
        let claim = join::Claim { rank: rank as u64, world: world as u64, session: &session, extra: &[] };
        join.extend_from_slice(&claim.prove(&key, JOIN_DOMAIN, &challenge[8..]));
        segment::write_all(&mut stream, &join, deadline).map_err(connect_err)?;
        let mut reply = [0u8; 512];
        let (n, fd) = segment::recv_fd(&stream, &mut reply, deadline)
            .map_err(|e| connect_err(format!("rank {rank} waiting for rank 0's segment: {e}")))?;
        let reply = &reply[..n];
        if let Some(err) = reply.strip_prefix(b"SHMERR") {
            return Err(connect_err(format!("rank 0 refused rank {rank}: {}", String::from_utf8_lossy(err))));
        }
        let (Some(fd), Some(rest)) =
            (fd, reply.strip_prefix(b"SHMOK\0\0\0").filter(|t| t.len() == 8 + sheaf_auth::PROOF))
        else {
            return Err(connect_err("rank 0 answered the shared-memory rendezvous with garbage"));
        };
        let total = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        if !key.verify("sheaf-shm-ok", &[&session, &total.to_le_bytes()], &rest[8..]) {
            return Err(connect_err(
                "rank 0 could not prove it holds the job's secret (is SHEAF_JOB_TOKEN the same on every rank?)",
            ));
        }
        let total = total as usize;
        let seg =
            Segment::open(fd, total).map_err(|e| connect_err(format!("mapping the shared segment: {e}")))?;
        let version = seg_u64(&seg, H_VERSION);
        if seg_u64(&seg, H_MAGIC) != MAGIC || version as u32 != VERSION || (version >> 32) as usize != world {
            return Err(connect_err(format!(
                "the shared segment is not a world of {world} of this version (header {version:#x})"
            )));
        }
        let cap = seg_u64(&seg, H_RING) as usize;
        if !cap.is_power_of_two() || segment_bytes(world, cap) != total {
            return Err(connect_err("the shared segment's ring size does not match its length"));
        }
        Ok(seg)
    }
}
