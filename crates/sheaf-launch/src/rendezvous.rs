//! The launchers of a job spread over hosts agree, before each world they start, on
//! the hosts taking part: elastic restarts (torchrun's `--nnodes MIN:MAX`).
//!
//! Node 0's launcher (at `--master-addr`) listens on `--master-port` + 1 for one round
//! at a time; every other launcher connects, answers a challenge with a proof over the
//! job's secret, and says its round and its node rank. Node 0 waits for every host up
//! to `--rejoin-s` seconds, then numbers those present (node 0 first, the others in
//! their order) and tells each its new node rank and the number of hosts; with fewer
//! than the minimum it tells them the world cannot go on. Each world's ranks are then
//! `node_rank * N .. node_rank * N + N - 1` of `nnodes * N`, resuming from the run's
//! newest checkpoint (universal: any world size), global batch unchanged.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sheaf_plugins::HostError;

const DOMAIN: &str = "sheaf-launch-rendezvous";

/// What a round settled for this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Round {
    pub nnodes: usize,
    pub node_rank: usize,
}

/// A joining launcher's line.
#[derive(Serialize, Deserialize)]
struct Join {
    round: u64,
    node_rank: usize,
    proof: String,
}

/// Node 0's answer.
#[derive(Serialize, Deserialize)]
enum Answer {
    Go(Round),
    Refused(String),
}

fn key() -> sheaf_auth::Key {
    sheaf_auth::Key::new(crate::job_token().as_bytes())
}

fn proof(challenge: &[u8], round: u64, node: usize) -> String {
    sheaf_auth::hex(&key().prove(DOMAIN, &[challenge, &round.to_le_bytes(), &(node as u64).to_le_bytes()]))
}

/// Node 0's side of round `round`: waits up to `window` for the other `max_nodes - 1`
/// launchers at `port` and numbers those present; fewer than `min_nodes` is an error
/// (and what every launcher present is told).
pub fn host(
    port: u16,
    round: u64,
    max_nodes: usize,
    min_nodes: usize,
    window: Duration,
) -> Result<Round, HostError> {
    let listener = TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| HostError::os(format!("cannot listen for the other launchers on port {port}"), e))?;
    listener.set_nonblocking(true).map_err(|e| HostError::os("rendezvous socket", e))?;
    let until = Instant::now() + window;
    let mut joined: Vec<(usize, TcpStream)> = Vec::new();
    while joined.len() + 1 < max_nodes && Instant::now() < until {
        match listener.accept() {
            Ok((stream, from)) => match admit(stream, round, max_nodes, until) {
                Ok((node, stream)) if !joined.iter().any(|(n, _)| *n == node) => joined.push((node, stream)),
                Ok((node, _)) => eprintln!("[launch] node {node} joined round {round} twice; kept the first"),
                Err(e) => eprintln!("[launch] a launcher at {from} was not admitted to round {round}: {e}"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(HostError::os("rendezvous", e)),
        }
    }
    joined.sort_by_key(|(n, _)| *n);
    let nnodes = joined.len() + 1;
    let refused = (nnodes < min_nodes).then(|| {
        format!(
            "round {round}: {nnodes} of {max_nodes} hosts came within {:.0} s, fewer than the {min_nodes} the \
             job needs (--nnodes {min_nodes}:{max_nodes})",
            window.as_secs_f64()
        )
    });
    for (i, (_, stream)) in joined.iter_mut().enumerate() {
        let answer = match &refused {
            Some(why) => Answer::Refused(why.clone()),
            None => Answer::Go(Round { nnodes, node_rank: i + 1 }),
        };
        let line = serde_json::to_string(&answer).expect("an answer serialises");
        let _ = writeln!(stream, "{line}");
    }
    match refused {
        Some(why) => Err(HostError::Launch(why)),
        None => Ok(Round { nnodes, node_rank: 0 }),
    }
}

/// One launcher's admission: a challenge, its proof, its round and node rank.
fn admit(
    stream: TcpStream,
    round: u64,
    max_nodes: usize,
    until: Instant,
) -> Result<(usize, TcpStream), String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    let left = until.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
    stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
    let challenge = sheaf_auth::nonce();
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    writeln!(writer, "{}", sheaf_auth::hex(&challenge)).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&stream).take(4096).read_line(&mut line).map_err(|e| e.to_string())?;
    let join: Join = serde_json::from_str(line.trim()).map_err(|e| format!("an unreadable join: {e}"))?;
    let parts: [&[u8]; 3] = [&challenge, &join.round.to_le_bytes(), &(join.node_rank as u64).to_le_bytes()];
    if !key().verify(DOMAIN, &parts, &sheaf_auth::unhex(&join.proof).unwrap_or_default()) {
        return Err("its proof does not hold: another job's secret".into());
    }
    if join.round != round || join.node_rank == 0 || join.node_rank >= max_nodes {
        return Err(format!("it asks for round {} as node {}", join.round, join.node_rank));
    }
    Ok((join.node_rank, stream))
}

/// Another node's side of round `round`: joins node 0's launcher at `addr:port`
/// within `window` and returns what it settled.
pub fn join(
    addr: &str,
    port: u16,
    round: u64,
    node_rank: usize,
    window: Duration,
) -> Result<Round, HostError> {
    let until = Instant::now() + window;
    let target = (addr, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| HostError::Usage(format!("--master-addr {addr} does not resolve")))?;
    let failed =
        |what: String| HostError::Launch(format!("round {round}: node 0's launcher at {target}: {what}"));
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let stream = TcpStream::connect_timeout(&target, Duration::from_millis(500))?;
            // The answer comes once node 0 has waited for every host.
            stream.set_read_timeout(Some(window + Duration::from_secs(5)))?;
            let mut reader = BufReader::new(stream.try_clone()?);
            let mut challenge = String::new();
            reader.read_line(&mut challenge)?;
            let challenge = sheaf_auth::unhex(challenge.trim()).unwrap_or_default();
            let line = Join { round, node_rank, proof: proof(&challenge, round, node_rank) };
            writeln!(&stream, "{}", serde_json::to_string(&line).expect("a join serialises"))?;
            let mut answer = String::new();
            reader.read_line(&mut answer)?;
            Ok(answer)
        })();
        match attempt {
            Ok(answer) if !answer.trim().is_empty() => {
                return match serde_json::from_str::<Answer>(answer.trim()) {
                    Ok(Answer::Go(r)) => Ok(r),
                    Ok(Answer::Refused(why)) => Err(HostError::Launch(why)),
                    Err(e) => Err(failed(format!("an unreadable answer: {e}"))),
                };
            }
            _ if Instant::now() < until => std::thread::sleep(Duration::from_millis(200)),
            Ok(_) => return Err(failed("it closed the connection without an answer".into())),
            Err(e) => return Err(failed(format!("not reached within {:.0} s: {e}", window.as_secs_f64()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three launchers of a job of up to three hosts, one of which never comes: the
    /// two present are numbered 0 and 1 of 2; with a minimum of three, both are told
    /// the world cannot go on.
    #[test]
    fn the_hosts_present_are_numbered_and_too_few_are_refused() {
        std::env::set_var(sheaf_auth::TOKEN_ENV, "a secret of the test's");
        let port = crate::free_port().unwrap();
        let window = Duration::from_secs(2);
        let joiner = std::thread::spawn(move || join("127.0.0.1", port, 1, 2, window));
        assert_eq!(host(port, 1, 3, 2, window).unwrap(), Round { nnodes: 2, node_rank: 0 });
        assert_eq!(joiner.join().unwrap().unwrap(), Round { nnodes: 2, node_rank: 1 });

        let port = crate::free_port().unwrap();
        let joiner = std::thread::spawn(move || join("127.0.0.1", port, 4, 1, window));
        let e = host(port, 4, 3, 3, window).unwrap_err().to_string();
        assert!(e.contains("2 of 3 hosts came") && e.contains("--nnodes 3:3"), "{e}");
        let e = joiner.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("fewer than the 3"), "{e}");
        // A launcher of another round is turned away (and, left without an answer,
        // gives up at the end of its window).
        let port = crate::free_port().unwrap();
        let stale = std::thread::spawn(move || join("127.0.0.1", port, 7, 1, Duration::from_secs(1)));
        assert_eq!(host(port, 8, 2, 1, Duration::from_secs(1)).unwrap(), Round { nnodes: 1, node_rank: 0 });
        assert!(stale.join().unwrap().is_err());
    }
}
