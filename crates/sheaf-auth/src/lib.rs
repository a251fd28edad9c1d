//! A job's shared secret (`SHEAF_JOB_TOKEN`) and the proofs made with it. Every
//! connection between a job's processes (the rendezvous, each ZeroMQ link, the
//! shared-memory socket) is a challenge and a response: one side sends a fresh random
//! nonce, the other answers with an HMAC-SHA256 of that nonce (and what it claims: its
//! rank, its world) under the secret, so a process without the secret cannot join, and
//! a recorded answer is worth nothing against the next challenge. Session keys derived
//! the same way from the nonces of a run authenticate every later frame.
//!
//! This is authentication, not encryption: the bytes themselves travel in the clear,
//! and a process that can read a rank's memory or environment has the secret.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The environment variable that carries a job's secret to its processes.
pub const TOKEN_ENV: &str = "SHEAF_JOB_TOKEN";

/// Bytes of a challenge nonce.
pub const NONCE: usize = 16;

/// Bytes of a full proof (an HMAC-SHA256).
pub const PROOF: usize = 32;

/// A fresh random nonce from the operating system.
pub fn nonce() -> [u8; NONCE] {
    let mut n = [0u8; NONCE];
    getrandom::fill(&mut n).expect("the operating system's random numbers");
    n
}

/// A new job secret: 32 random bytes, hex.
pub fn generate_token() -> String {
    let mut t = [0u8; 32];
    getrandom::fill(&mut t).expect("the operating system's random numbers");
    hex(&t)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from lowercase or uppercase hex; `None` for anything else.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// A secret to prove things with: the job's token, or a session key derived from it.
#[derive(Clone)]
pub struct Key(HmacSha256);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// The key of a job's secret (any bytes; an empty secret proves nothing to anyone
    /// who knows the protocol).
    pub fn new(secret: &[u8]) -> Key {
        Key(HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length"))
    }

    /// The HMAC-SHA256 of `parts` (each length-prefixed, so parts cannot be shifted
    /// between one another) in the context `domain`.
    pub fn prove(&self, domain: &str, parts: &[&[u8]]) -> [u8; PROOF] {
        let mut mac = self.0.clone();
        for part in std::iter::once(domain.as_bytes()).chain(parts.iter().copied()) {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// Whether `proof` (all of it, or a prefix of at least 16 bytes) is this key's
    /// proof of `parts`, compared in constant time.
    pub fn verify(&self, domain: &str, parts: &[&[u8]], proof: &[u8]) -> bool {
        let want = self.prove(domain, parts);
        if proof.len() < 16 || proof.len() > PROOF {
            return false;
        }
        want[..proof.len()].iter().zip(proof).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// A key for one purpose derived from this one and `parts` (a session's nonces).
    pub fn derive(&self, domain: &str, parts: &[&[u8]]) -> Key {
        Key::new(&self.prove(domain, parts))
    }
}

/// The join every transport's rendezvous runs (and the doctor's roll call): rank 0
/// sends each connection a fresh challenge; a joining rank answers with its rank, the
/// size of its world, its own nonce and whatever else the transport needs rank 0 to
/// trust (the address it listens at), proven with the job's secret over the challenge.
/// Rank 0 takes a join only when the proof holds and the rank fits its world.
pub mod join {
    use super::{Key, PROOF};

    /// What a joining rank claims.
    #[derive(Clone, Copy, Debug)]
    pub struct Claim<'a> {
        pub rank: u64,
        pub world: u64,
        /// The joiner's nonce for this run.
        pub session: &'a [u8],
        /// Whatever else rank 0 must be able to trust (an address), in order.
        pub extra: &'a [&'a [u8]],
    }

    impl Claim<'_> {
        fn parts<'b>(&'b self, challenge: &'b [u8], rank: &'b [u8; 8], world: &'b [u8; 8]) -> Vec<&'b [u8]> {
            let mut parts: Vec<&[u8]> = vec![challenge, rank, world, self.session];
            parts.extend_from_slice(self.extra);
            parts
        }

        /// The joiner's proof: the claim under the secret, bound to `challenge`, in
        /// the transport's `domain`.
        pub fn prove(&self, key: &Key, domain: &str, challenge: &[u8]) -> [u8; PROOF] {
            let (r, w) = (self.rank.to_le_bytes(), self.world.to_le_bytes());
            key.prove(domain, &self.parts(challenge, &r, &w))
        }
    }

    /// Rank 0's reading of a join.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Joined {
        /// A rank of this run.
        Rank(usize),
        /// No proof of the secret over this connection's challenge: a stranger (or a
        /// replayed join), refused without ending the rendezvous.
        Refused(String),
        /// A proven join that does not fit this world: the job is misconfigured.
        Mismatch(String),
    }

    /// Rank 0's check of `claim` and its `proof` against `challenge`, in a world of
    /// `world` ranks where `taken(r)` says rank r has joined already.
    pub fn check(
        key: &Key,
        domain: &str,
        challenge: &[u8],
        claim: &Claim<'_>,
        proof: &[u8],
        world: usize,
        taken: impl Fn(usize) -> bool,
    ) -> Joined {
        let (r, w) = (claim.rank.to_le_bytes(), claim.world.to_le_bytes());
        if !key.verify(domain, &claim.parts(challenge, &r, &w), proof) {
            return Joined::Refused(format!(
                "a join claiming rank {} without proof of the job's secret",
                claim.rank
            ));
        }
        let fits = usize::try_from(claim.rank)
            .ok()
            .filter(|&rank| claim.world == world as u64 && rank > 0 && rank < world && !taken(rank));
        match fits {
            Some(rank) => Joined::Rank(rank),
            None => Joined::Mismatch(format!(
                "rank {} of a world of {} joined a world of {world} (duplicate or mismatched rank)",
                claim.rank, claim.world
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_depend_on_the_key_the_domain_and_every_part() {
        let (k, other) = (Key::new(b"secret"), Key::new(b"secreT"));
        let p = k.prove("join", &[b"nonce", b"rank 1"]);
        assert!(k.verify("join", &[b"nonce", b"rank 1"], &p));
        assert!(k.verify("join", &[b"nonce", b"rank 1"], &p[..16]));
        assert!(!k.verify("join", &[b"nonce", b"rank 1"], &p[..8]));
        assert!(!other.verify("join", &[b"nonce", b"rank 1"], &p));
        assert!(!k.verify("table", &[b"nonce", b"rank 1"], &p));
        assert!(!k.verify("join", &[b"nonce", b"rank 2"], &p));
        // Length prefixes: moving a byte between parts changes the proof.
        assert_ne!(k.prove("join", &[b"ab", b"c"]), k.prove("join", &[b"a", b"bc"]));
        assert_ne!(nonce(), nonce());
        let t = generate_token();
        assert_eq!(t.len(), 64);
        assert_eq!(hex(&unhex(&t).unwrap()), t);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
    }

    /// A join verifies only with the secret, the challenge and the claim it was made
    /// for, and only for a free rank of this world.
    #[test]
    fn joins_are_proven_and_fit_the_world() {
        use join::{check, Claim, Joined};
        let key = Key::new(b"secret");
        let claim = Claim { rank: 2, world: 4, session: b"nonce", extra: &[b"tcp://h:1"] };
        let proof = claim.prove(&key, "d", b"challenge");
        let free = |_| false;
        assert_eq!(check(&key, "d", b"challenge", &claim, &proof, 4, free), Joined::Rank(2));
        for (k, domain, challenge) in [
            (Key::new(b"other"), "d", &b"challenge"[..]),
            (Key::new(b"secret"), "e", b"challenge"),
            (Key::new(b"secret"), "d", b"replayed"),
        ] {
            assert!(matches!(check(&k, domain, challenge, &claim, &proof, 4, free), Joined::Refused(_)));
        }
        let moved = Claim { extra: &[b"tcp://elsewhere:1"], ..claim };
        assert!(matches!(check(&key, "d", b"challenge", &moved, &proof, 4, free), Joined::Refused(_)));
        assert!(matches!(check(&key, "d", b"challenge", &claim, &proof, 3, free), Joined::Mismatch(_)));
        assert!(matches!(check(&key, "d", b"challenge", &claim, &proof, 4, |r| r == 2), Joined::Mismatch(_)));
        for rank in [0u64, 4, u64::MAX] {
            let c = Claim { rank, ..claim };
            let p = c.prove(&key, "d", b"challenge");
            assert!(matches!(check(&key, "d", b"challenge", &c, &p, 4, free), Joined::Mismatch(_)), "{rank}");
        }
    }
}
