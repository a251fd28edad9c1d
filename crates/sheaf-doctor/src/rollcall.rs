//! `sheaf doctor`'s roll call: who can reach whom, found before (and without) the
//! transport, so that a world that cannot meet still gets its N x N matrix.
//!
//! Every rank listens on its advertised address (a port of its own) and tells rank 0,
//! at `MASTER_ADDR`:`MASTER_PORT + 1`, where. Rank 0 waits for every rank until the
//! deadline, then answers each with every address it heard; each rank connects to every
//! other, timing the round trip of one byte, and reports its row; rank 0 gathers the
//! rows and tells each rank the verdict. Plain TCP; every message of the roll call is
//! signed with the job's secret over a nonce rank 0 chose for that connection, so a
//! stranger can neither enrol nor replay an enrolment.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sheaf_auth::Key;

use sheaf_plugins::HostError;
use sheaf_runtime::WorkerEnv;

const DOMAIN: &str = "sheaf-doctor-rollcall";
/// The longest roll-call message a rank accepts (a table of many ranks' addresses).
const MAX_MESSAGE: usize = 1 << 20;
/// How long one rank waits to connect to another and have its byte back.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Who reached whom.
#[derive(Clone, Debug, PartialEq)]
pub struct Reach {
    /// Where each rank listened; `None` for a rank that never answered the roll call.
    pub addrs: Vec<Option<String>>,
    /// `rtt_ms[r][q]`: rank r's round trip to rank q, in ms; `NaN` where it could not
    /// connect or had no answer, or rank r never reported.
    pub rtt_ms: Vec<Vec<f64>>,
    /// Why each failed pair failed, `(r, q, reason)`, as far as this rank knows.
    pub failures: Vec<(usize, usize, String)>,
    /// Processes that answered the roll call as no rank of this world can be: a rank
    /// claimed twice, or another world's size (a misconfigured launch).
    pub conflicts: Vec<String>,
    /// Rank 0's verdict: every rank answered, none twice, and every pair reached each
    /// other.
    pub complete: bool,
}

impl Reach {
    /// The problems, one line each: processes that answered as no rank of this world
    /// can, ranks that never came, pairs that failed.
    pub fn problems(&self, master: &str) -> Vec<String> {
        let mut out: Vec<String> = self.conflicts.clone();
        out.extend(
            self.addrs
                .iter()
                .enumerate()
                .filter(|(_, a)| a.is_none())
                .map(|(r, _)| format!("rank {r} never answered the roll call at {master}")),
        );
        out.extend(self.failures.iter().map(|(r, q, why)| {
            format!("rank {r} cannot reach rank {q} at {}: {why}", self.addrs[*q].as_deref().unwrap_or("?"))
        }));
        out
    }

    /// The matrix, row pings column: "·" on the diagonal, "--" where no answer came,
    /// "?" in the row and column of a rank that never came.
    pub fn matrix(&self) -> String {
        let n = self.addrs.len();
        let mut s = format!("{:>8}", "");
        for q in 0..n {
            s += &format!("{:>9}", format!("rank {q}"));
        }
        s.push('\n');
        for r in 0..n {
            s += &format!("{:>8}", format!("rank {r}"));
            for q in 0..n {
                let came = self.addrs[r].is_some() && self.addrs[q].is_some();
                let cell = match (r == q, came, self.rtt_ms[r][q]) {
                    (true, _, _) => "·".to_string(),
                    (false, false, _) => "?".to_string(),
                    (false, true, t) if t.is_finite() => format!("{t:.3}"),
                    _ => "--".to_string(),
                };
                s += &format!("{cell:>9}");
            }
            s.push('\n');
        }
        s
    }
}

#[derive(Serialize, Deserialize)]
enum Message {
    /// A rank enrols: where it listens.
    Hello { rank: usize, world: usize, addr: String },
    /// Rank 0's answer: every rank's address, `None` for those that never came.
    Table { addrs: Vec<Option<String>> },
    /// A rank's round trips to every rank, and why the failed ones failed.
    Row { rtt_ms: Vec<Option<f64>>, failures: Vec<(usize, String)> },
    /// Rank 0's verdict: whether the whole world reaches itself.
    Done { complete: bool },
}

/// One signed connection of the roll call.
struct Channel {
    stream: TcpStream,
    nonce: [u8; sheaf_auth::NONCE],
    key: Arc<Key>,
    peer: String,
}

impl Channel {
    fn send(&mut self, m: &Message) -> std::io::Result<()> {
        let json = serde_json::to_vec(m).expect("roll-call messages serialise");
        let proof = self.key.prove(DOMAIN, &[&self.nonce, &json]);
        let mut frame = (json.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&json);
        frame.extend_from_slice(&proof);
        self.stream.write_all(&frame)
    }

    /// The next message, before `deadline`; an error naming the peer on a timeout, a
    /// bad signature or garbage.
    fn recv(&mut self, deadline: Instant) -> Result<Message, String> {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        self.stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).map_err(|e| format!("{}: {e}", self.peer))?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_MESSAGE {
            return Err(format!("{}: a message of {len} bytes (at most {MAX_MESSAGE})", self.peer));
        }
        let mut body = vec![0u8; len + sheaf_auth::PROOF];
        self.stream.read_exact(&mut body).map_err(|e| format!("{}: {e}", self.peer))?;
        let (json, proof) = body.split_at(len);
        if !self.key.verify(DOMAIN, &[&self.nonce, json], proof) {
            return Err(format!(
                "{}: a message not signed with this job's secret (SHEAF_JOB_TOKEN)",
                self.peer
            ));
        }
        serde_json::from_slice(json).map_err(|e| format!("{}: not a roll-call message: {e}", self.peer))
    }
}

/// Answers pings (one byte back for one byte in) on `listener` until `stop`.
fn answer_pings(listener: TcpListener, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = listener.set_nonblocking(true);
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(PING_TIMEOUT));
                        let mut b = [0u8; 1];
                        if s.read_exact(&mut b).is_ok() {
                            let _ = s.write_all(&b);
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    })
}

/// This rank's round trip to every listed rank: `(rtt_ms, failures)`.
fn ping_all(rank: usize, addrs: &[Option<String>]) -> (Vec<Option<f64>>, Vec<(usize, String)>) {
    let mut rtt = vec![None; addrs.len()];
    let mut failures = Vec::new();
    for (q, addr) in addrs.iter().enumerate() {
        let Some(addr) = addr.as_deref().filter(|_| q != rank) else { continue };
        let once = || -> Result<f64, String> {
            let to: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
            let t = Instant::now();
            let mut s = TcpStream::connect_timeout(&to, PING_TIMEOUT).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(PING_TIMEOUT)).map_err(|e| e.to_string())?;
            s.write_all(&[1]).and_then(|()| s.read_exact(&mut [0u8; 1])).map_err(|e| e.to_string())?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        };
        match once() {
            Ok(t) => rtt[q] = Some(t),
            Err(e) => failures.push((q, e)),
        }
    }
    (rtt, failures)
}

fn fail(env: &WorkerEnv, detail: String) -> HostError {
    HostError::Train { rank: env.rank, detail: format!("roll call: {detail}") }
}

/// The roll-call address: `MASTER_ADDR`:`MASTER_PORT + 1`.
pub fn master(env: &WorkerEnv) -> String {
    format!("{}:{}", env.master_addr, env.master_port.wrapping_add(1))
}

/// Runs the roll call as this rank, within `timeout` for the world to gather. Rank 0
/// returns who reached whom; the others their own row and rank 0's verdict.
pub fn roll_call(env: &WorkerEnv, listen_ip: &str, timeout: Duration) -> Result<Reach, HostError> {
    if env.master_port == u16::MAX {
        return Err(HostError::Usage(format!(
            "MASTER_PORT={}: sheaf doctor's roll call uses the port above it; choose a lower one",
            env.master_port
        )));
    }
    let deadline = Instant::now() + timeout;
    let key = Arc::new(Key::new(std::env::var(sheaf_auth::TOKEN_ENV).unwrap_or_default().as_bytes()));
    let listener =
        TcpListener::bind((listen_ip, 0)).map_err(|e| fail(env, format!("listening on {listen_ip}: {e}")))?;
    let mine = listener.local_addr().map_err(|e| fail(env, e.to_string()))?.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let answering = answer_pings(listener, stop.clone());
    let result =
        if env.rank == 0 { as_rank_0(env, mine, key, deadline) } else { as_peer(env, mine, key, deadline) };
    stop.store(true, Ordering::Relaxed);
    let _ = answering.join();
    result
}

fn as_rank_0(env: &WorkerEnv, mine: String, key: Arc<Key>, deadline: Instant) -> Result<Reach, HostError> {
    let n = env.world_size;
    let at = master(env);
    let bind = at
        .to_socket_addrs()
        .map_err(|e| fail(env, format!("{at} does not resolve: {e}")))?
        .next()
        .ok_or_else(|| fail(env, format!("{at} has no address")))?;
    let listener = TcpListener::bind(bind).map_err(|e| fail(env, format!("listening on {at}: {e}")))?;
    listener.set_nonblocking(true).map_err(|e| fail(env, e.to_string()))?;
    let mut addrs: Vec<Option<String>> = vec![None; n];
    addrs[0] = Some(mine);
    let mut channels: Vec<Option<Channel>> = (0..n).map(|_| None).collect();
    let mut conflicts = Vec::new();
    // Enrolment: until every rank came or the deadline.
    while addrs.iter().any(Option::is_none) && Instant::now() < deadline {
        let (stream, from) = match listener.accept() {
            Ok(s) => s,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        let mut ch = Channel { stream, nonce: sheaf_auth::nonce(), key: key.clone(), peer: from.to_string() };
        let hello = ch
            .stream
            .write_all(&ch.nonce)
            .map_err(|e| e.to_string())
            .and_then(|()| ch.recv(deadline.min(Instant::now() + PING_TIMEOUT)));
        match hello {
            Ok(Message::Hello { rank, world, addr }) if world == n && rank > 0 && rank < n => {
                if let Some(first) = &addrs[rank] {
                    conflicts.push(format!(
                        "two processes answered as rank {rank}: one listening at {first}, one at {addr} (from {from})"
                    ));
                    continue;
                }
                ch.peer = format!("rank {rank} ({from})");
                addrs[rank] = Some(addr);
                channels[rank] = Some(ch);
            }
            Ok(Message::Hello { rank, world, .. }) => {
                conflicts.push(format!(
                    "a process at {from} answered as rank {rank} of a world of {world}; this world is {n} \
                     (launched with another world size?)"
                ));
            }
            Ok(_) => tracing::warn!("roll call: {from} sent something other than its enrolment: ignored"),
            Err(e) => tracing::warn!("roll call: ignored {e}"),
        }
    }
    let mut rtt_ms = vec![vec![f64::NAN; n]; n];
    let mut failures = Vec::new();
    for ch in channels.iter_mut().flatten() {
        if let Err(e) = ch.send(&Message::Table { addrs: addrs.clone() }) {
            tracing::warn!("roll call: {}: {e}", ch.peer);
        }
    }
    let (row, failed) = ping_all(0, &addrs);
    rtt_ms[0] = row.iter().map(|t| t.unwrap_or(f64::NAN)).collect();
    failures.extend(failed.into_iter().map(|(q, why)| (0, q, why)));
    // Rows, within the pings' own time after the table.
    let rows_by = Instant::now() + PING_TIMEOUT * (n as u32 + 1);
    for (r, ch) in channels.iter_mut().enumerate() {
        let Some(ch) = ch else { continue };
        match ch.recv(rows_by) {
            Ok(Message::Row { rtt_ms: row, failures: failed }) if row.len() == n => {
                rtt_ms[r] = row.iter().map(|t| t.unwrap_or(f64::NAN)).collect();
                failures.extend(failed.into_iter().filter(|(q, _)| *q < n).map(|(q, why)| (r, q, why)));
            }
            Ok(_) => failures.push((r, r, "reported a row of the wrong size".into())),
            Err(e) => failures.push((r, r, format!("did not report: {e}"))),
        }
    }
    let complete = addrs.iter().all(Option::is_some) && failures.is_empty() && conflicts.is_empty();
    let reach = Reach { addrs, rtt_ms, failures, conflicts, complete };
    for ch in channels.iter_mut().flatten() {
        let _ = ch.send(&Message::Done { complete });
    }
    Ok(reach)
}

fn as_peer(env: &WorkerEnv, mine: String, key: Arc<Key>, deadline: Instant) -> Result<Reach, HostError> {
    let n = env.world_size;
    let at = master(env);
    // Rank 0 may start later: try until the deadline.
    let stream = loop {
        let attempt = at.to_socket_addrs().map_err(|e| e.to_string()).and_then(|mut a| {
            let to = a.next().ok_or_else(|| format!("{at} has no address"))?;
            TcpStream::connect_timeout(&to, PING_TIMEOUT).map_err(|e| e.to_string())
        });
        match attempt {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(fail(
                    env,
                    format!("cannot reach rank 0 at {at} (MASTER_ADDR:MASTER_PORT+1): {e}"),
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut ch = Channel { stream, nonce: [0; sheaf_auth::NONCE], key, peer: format!("rank 0 ({at})") };
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    ch.stream.set_read_timeout(Some(left)).map_err(|e| fail(env, e.to_string()))?;
    ch.stream.read_exact(&mut ch.nonce).map_err(|e| fail(env, format!("{}: {e}", ch.peer)))?;
    ch.send(&Message::Hello { rank: env.rank, world: n, addr: mine.clone() })
        .map_err(|e| fail(env, format!("{}: {e}", ch.peer)))?;
    // Rank 0 answers once every rank came or its deadline passed.
    let addrs = match ch.recv(deadline + PING_TIMEOUT).map_err(|e| fail(env, e))? {
        Message::Table { addrs } if addrs.len() == n => addrs,
        _ => return Err(fail(env, format!("{}: expected the table of addresses", ch.peer))),
    };
    let (row, failures) = ping_all(env.rank, &addrs);
    ch.send(&Message::Row { rtt_ms: row.clone(), failures: failures.clone() })
        .map_err(|e| fail(env, format!("{}: {e}", ch.peer)))?;
    let complete = match ch.recv(Instant::now() + PING_TIMEOUT * (n as u32 + 2)).map_err(|e| fail(env, e))? {
        Message::Done { complete } => complete,
        _ => return Err(fail(env, format!("{}: expected the verdict", ch.peer))),
    };
    let mut rtt_ms = vec![vec![f64::NAN; n]; n];
    rtt_ms[env.rank] = row.iter().map(|t| t.unwrap_or(f64::NAN)).collect();
    let failures = failures.into_iter().map(|(q, why)| (env.rank, q, why)).collect();
    Ok(Reach { addrs, rtt_ms, failures, conflicts: Vec::new(), complete })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(rank: usize, world: usize, port: u16) -> WorkerEnv {
        WorkerEnv {
            rank,
            world_size: world,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            spans_hosts: false,
        }
    }

    fn free_port() -> u16 {
        // Two in a row: the roll call uses the one above the master port.
        loop {
            let p = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            if TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
                return p;
            }
        }
    }

    /// Three ranks as threads: a full matrix; with rank 2 absent, rank 0 reports it
    /// missing within the deadline and the verdict reaches rank 1.
    #[test]
    fn the_roll_call_finds_every_rank_or_names_the_missing() {
        let port = free_port();
        let ranks: Vec<_> = (0..3)
            .map(|r| {
                std::thread::spawn(move || roll_call(&env(r, 3, port), "127.0.0.1", Duration::from_secs(5)))
            })
            .collect();
        let reaches: Vec<Reach> = ranks.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
        assert!(reaches.iter().all(|r| r.complete), "{:?}", reaches[0]);
        let m = reaches[0].matrix();
        assert!(!m.contains("--") && !m.contains('?') && m.contains("rank 2"), "{m}");

        let port = free_port();
        let ranks: Vec<_> = (0..2)
            .map(|r| {
                std::thread::spawn(move || {
                    roll_call(&env(r, 3, port), "127.0.0.1", Duration::from_millis(600))
                })
            })
            .collect();
        let reaches: Vec<Reach> = ranks.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
        assert!(!reaches[0].complete && !reaches[1].complete);
        let problems = reaches[0].problems("127.0.0.1:1");
        assert_eq!(problems, ["rank 2 never answered the roll call at 127.0.0.1:1"]);
        let m = reaches[0].matrix();
        assert_eq!(m.lines().nth(3).unwrap().split_whitespace().filter(|c| *c == "?").count(), 2, "{m}");
        assert_eq!(m.lines().nth(1).unwrap().split_whitespace().last(), Some("?"), "{m}");
    }

    /// A rank claimed by two processes, and a process of another world size, are
    /// problems named by rank 0, not silently ignored.
    #[test]
    fn ranks_claimed_twice_or_from_another_world_are_named() {
        let port = free_port();
        let start = |rank, world| {
            std::thread::spawn(move || {
                roll_call(&env(rank, world, port), "127.0.0.1", Duration::from_secs(2))
            })
        };
        let (zero, one) = (start(0, 3), start(1, 3));
        std::thread::sleep(Duration::from_millis(200));
        // The second claimant of rank 1 is dropped, and so is the stranger to this
        // world: their roll calls fail.
        let (again, other) = (start(1, 3), start(2, 5));
        let reach = zero.join().unwrap().unwrap();
        let _ = one.join().unwrap();
        assert!(again.join().unwrap().is_err() && other.join().unwrap().is_err());
        assert!(!reach.complete);
        let problems = reach.problems("m").join("\n");
        assert!(problems.contains("two processes answered as rank 1"), "{problems}");
        assert!(problems.contains("as rank 2 of a world of 5; this world is 3"), "{problems}");
    }

    /// A rank with another secret is not enrolled: rank 0 finds it missing.
    #[test]
    fn a_stranger_is_not_enrolled() {
        let port = free_port();
        let zero =
            std::thread::spawn(move || roll_call(&env(0, 2, port), "127.0.0.1", Duration::from_millis(800)));
        std::thread::sleep(Duration::from_millis(100));
        let mut s = TcpStream::connect(("127.0.0.1", port + 1)).unwrap();
        let mut nonce = [0u8; sheaf_auth::NONCE];
        s.read_exact(&mut nonce).unwrap();
        let mut ch =
            Channel { stream: s, nonce, key: Arc::new(Key::new(b"not the secret")), peer: "0".into() };
        ch.send(&Message::Hello { rank: 1, world: 2, addr: "127.0.0.1:9".into() }).unwrap();
        let reach = zero.join().unwrap().unwrap();
        assert_eq!(reach.addrs[1], None);
    }
}
