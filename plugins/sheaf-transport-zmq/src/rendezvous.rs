//! The rendezvous as torchrun's: rank 0's ROUTER on `MASTER_ADDR:MASTER_PORT`, a
//! challenge-response over the job's secret with every peer, and the table of inboxes.

use std::collections::HashMap;

use bytes::Bytes;
use serde::Deserialize;
use sheaf_auth::{join, Key};
use sheaf_core::CommError;
use zeromq::{DealerSocket, RouterSocket, SocketRecv, SocketSend, ZmqMessage};

use crate::link::connect_err;

/// The rendezvous, as JSON messages between rank 0's ROUTER and each peer's DEALER:
/// `Hello`, rank 0's `Challenge` (a fresh nonce), the peer's `Join` proving it holds the
/// job's secret over that nonce and what it claims, and rank 0's `Table` of inboxes and
/// rendezvous nonces, proving the same over the peer's nonce. `Refused` tells a peer
/// why rank 0 did not take its join.
#[derive(Debug, serde::Serialize, Deserialize)]
#[serde(tag = "type")]
pub(crate) enum Rendezvous {
    Hello { rank: usize },
    Challenge { nonce: String },
    Join { rank: usize, world_size: usize, endpoint: String, session: String, proof: String },
    Table { endpoints: Vec<String>, sessions: Vec<String>, proof: String },
    Refused { reason: String },
}

pub(crate) const JOIN: &str = "sheaf-zmq-join";
pub(crate) const TABLE: &str = "sheaf-zmq-table";

/// A peer's join as rank 0 reads it.
#[derive(Debug, PartialEq)]
pub(crate) enum Joined {
    /// A rank of this run: its rank, inbox and rendezvous nonce.
    Rank { rank: usize, endpoint: String, session: String },
    /// No proof of the secret over this connection's challenge: a stranger (or a
    /// replayed join), refused.
    Refused(String),
    /// A proven join that does not fit this world: the job is misconfigured.
    Mismatch(String),
}

/// Rank 0's reading of `msg`, the answer to `challenge`, with `table` holding the
/// inboxes of the ranks joined so far (its length is the world's size).
pub(crate) fn check_join(key: &Key, challenge: &[u8], msg: &Rendezvous, table: &[String]) -> Joined {
    let Rendezvous::Join { rank, world_size, endpoint, session, proof } = msg else {
        return Joined::Refused("a message that is not a join".into());
    };
    let proof = sheaf_auth::unhex(proof).unwrap_or_default();
    // The inbox is claimed too: rank 0 hands it to every other rank.
    let extra = [endpoint.as_bytes()];
    let claim = join::Claim {
        rank: *rank as u64,
        world: *world_size as u64,
        session: session.as_bytes(),
        extra: &extra,
    };
    match join::check(key, JOIN, challenge, &claim, &proof, table.len(), |r| !table[r].is_empty()) {
        join::Joined::Rank(rank) => {
            Joined::Rank { rank, endpoint: endpoint.clone(), session: session.clone() }
        }
        join::Joined::Refused(why) => Joined::Refused(why),
        join::Joined::Mismatch(why) => Joined::Mismatch(why),
    }
}

pub(crate) fn table_proof(
    key: &Key,
    session: &str,
    endpoints: &[String],
    sessions: &[String],
) -> [u8; sheaf_auth::PROOF] {
    let (e, s) = (
        serde_json::to_string(endpoints).expect("strings"),
        serde_json::to_string(sessions).expect("strings"),
    );
    key.prove(TABLE, &[session.as_bytes(), e.as_bytes(), s.as_bytes()])
}

/// A peer's reading of rank 0's answer to its join (whose nonce was `session`):
/// every rank's inbox and nonce, proven by rank 0.
pub(crate) fn check_table(
    key: &Key,
    session: &str,
    msg: &Rendezvous,
    world: usize,
) -> Result<(Vec<String>, Vec<String>), String> {
    match msg {
        Rendezvous::Table { endpoints, sessions, proof } => {
            if endpoints.len() != world || sessions.len() != world {
                return Err(format!(
                    "rank 0 answered with a table of {} ranks for a world of {world}",
                    endpoints.len()
                ));
            }
            let proof = sheaf_auth::unhex(proof).unwrap_or_default();
            if !key.verify(
                TABLE,
                &[
                    session.as_bytes(),
                    serde_json::to_string(endpoints).expect("strings").as_bytes(),
                    serde_json::to_string(sessions).expect("strings").as_bytes(),
                ],
                &proof,
            ) {
                return Err("rank 0 could not prove it holds the job's secret (is SHEAF_JOB_TOKEN the same on every rank?)".into());
            }
            Ok((endpoints.clone(), sessions.clone()))
        }
        Rendezvous::Refused { reason } => Err(format!("rank 0 refused this rank: {reason}")),
        _ => Err("rank 0 answered the rendezvous with garbage".into()),
    }
}

pub(crate) async fn send_to(
    router: &mut RouterSocket,
    id: &Bytes,
    msg: &Rendezvous,
) -> Result<(), CommError> {
    let mut reply = ZmqMessage::from(id.clone());
    reply.push_back(serde_json::to_vec(msg).expect("serialises").into());
    router.send(reply).await.map_err(connect_err)
}

/// Rank 0's side: challenges every connection, takes the joins that prove the
/// secret (refusing and logging the rest, which never end the rendezvous), and
/// answers each rank with the table.
pub(crate) async fn rendezvous_as_rank_0(
    router: &mut RouterSocket,
    key: &Key,
    world: usize,
    mine: String,
) -> Result<(Vec<String>, Vec<String>), CommError> {
    let mut table = vec![String::new(); world];
    let mut sessions = vec![String::new(); world];
    table[0] = mine;
    sessions[0] = sheaf_auth::hex(&sheaf_auth::nonce());
    let mut challenges: HashMap<Bytes, [u8; sheaf_auth::NONCE]> = HashMap::new();
    let mut joined: Vec<(Bytes, usize)> = Vec::new();
    let mut refused = 0u64;
    let mut refuse = |why: String| {
        refused += 1;
        if refused <= 4 || refused.is_power_of_two() {
            eprintln!("sheaf-zmq: rank 0 refused {why} on the rendezvous port ({refused} refused so far)");
        }
    };
    while joined.len() < world - 1 {
        let msg = router.recv().await.map_err(connect_err)?;
        let (Some(id), Some(body)) = (msg.get(0), msg.get(1)) else {
            refuse("a message without a body".into());
            continue;
        };
        let msg: Rendezvous = match serde_json::from_slice(body) {
            Ok(m) => m,
            Err(e) => {
                refuse(format!("garbage ({e})"));
                continue;
            }
        };
        if let Rendezvous::Hello { .. } = msg {
            // Bounded: a flood of hellos forgets old challenges, not memory.
            if challenges.len() >= 1024 {
                challenges.clear();
            }
            let nonce = sheaf_auth::nonce();
            challenges.insert(id.clone(), nonce);
            send_to(router, id, &Rendezvous::Challenge { nonce: sheaf_auth::hex(&nonce) }).await?;
            continue;
        }
        let Some(challenge) = challenges.remove(id) else {
            refuse("a message before its challenge".into());
            continue;
        };
        match check_join(key, &challenge, &msg, &table) {
            Joined::Rank { rank, endpoint, session } => {
                table[rank] = endpoint;
                sessions[rank] = session;
                joined.push((id.clone(), rank));
            }
            Joined::Refused(why) => {
                refuse(why);
                let reason =
                    "no proof of the job's secret (is SHEAF_JOB_TOKEN the same on every rank?)".into();
                send_to(router, id, &Rendezvous::Refused { reason }).await?;
            }
            Joined::Mismatch(why) => return Err(connect_err(why)),
        }
    }
    for (id, rank) in &joined {
        let proof = sheaf_auth::hex(&table_proof(key, &sessions[*rank], &table, &sessions));
        let msg = Rendezvous::Table { endpoints: table.clone(), sessions: sessions.clone(), proof };
        send_to(router, id, &msg).await?;
    }
    Ok((table, sessions))
}

/// A peer's side: hello, answer rank 0's challenge with a proof, check rank 0's.
pub(crate) async fn rendezvous_as_peer(
    dealer: &mut DealerSocket,
    key: &Key,
    rank: usize,
    world: usize,
    mine: String,
) -> Result<(Vec<String>, Vec<String>), CommError> {
    let send = |msg: &Rendezvous| ZmqMessage::from(serde_json::to_vec(msg).expect("serialises"));
    dealer.send(send(&Rendezvous::Hello { rank })).await.map_err(connect_err)?;
    let reply = dealer.recv().await.map_err(connect_err)?;
    let challenge = match reply.get(0).and_then(|b| serde_json::from_slice::<Rendezvous>(b).ok()) {
        Some(Rendezvous::Challenge { nonce }) => sheaf_auth::unhex(&nonce)
            .ok_or_else(|| connect_err("rank 0 answered the rendezvous with garbage"))?,
        _ => return Err(connect_err("rank 0 answered the rendezvous with garbage")),
    };
    let session = sheaf_auth::hex(&sheaf_auth::nonce());
    let extra = [mine.as_bytes()];
    let claim =
        join::Claim { rank: rank as u64, world: world as u64, session: session.as_bytes(), extra: &extra };
    let proof = sheaf_auth::hex(&claim.prove(key, JOIN, &challenge));
    let join = Rendezvous::Join { rank, world_size: world, endpoint: mine, session: session.clone(), proof };
    dealer.send(send(&join)).await.map_err(connect_err)?;
    let reply = dealer.recv().await.map_err(connect_err)?;
    let msg = reply
        .get(0)
        .and_then(|b| serde_json::from_slice::<Rendezvous>(b).ok())
        .ok_or_else(|| connect_err("rank 0 answered the rendezvous with garbage"))?;
    check_table(key, &session, &msg, world).map_err(connect_err)
}
