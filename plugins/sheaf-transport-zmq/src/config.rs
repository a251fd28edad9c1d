//! The transport's settings (`ZmqConfig`, from the host's JSON) and its limits.

use std::time::Duration;

use serde::Deserialize;

/// `tcp://` or `ipc://` for the data plane (rendezvous is always TCP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Tcp,
    Ipc,
}

pub(crate) fn default_connect_ms() -> u64 {
    60_000
}
pub(crate) fn default_peer_timeout_ms() -> u64 {
    15_000
}
pub(crate) fn default_heartbeat_ms() -> u64 {
    500
}
pub(crate) fn default_chunk() -> usize {
    1 << 20
}
pub(crate) fn default_window() -> usize {
    16 << 20
}
/// 200 µs, or `SHEAF_ZMQ_SPIN_US` (as NCCL and MPI take their progress knobs from the
/// environment; the host does not pass transport tuning through the job).
pub(crate) fn default_spin_us() -> u64 {
    std::env::var("SHEAF_ZMQ_SPIN_US").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
}

/// What the host passes to the transport (as JSON).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZmqConfig {
    pub rank: usize,
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// The address peers reach this rank's inbox at. Defaults to `127.0.0.1` when the
    /// master is on this host; required otherwise.
    #[serde(default)]
    pub advertise_addr: Option<String>,
    /// Directory for `ipc://` socket files; unset, the sockets live in Linux's abstract
    /// namespace (no file, so nothing is left behind even when a rank is killed).
    #[serde(default)]
    pub ipc_dir: Option<String>,
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// A peer silent (no message, no heartbeat) this long is declared dead.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_chunk")]
    pub chunk_bytes: usize,
    /// Unacknowledged bytes allowed in flight to one peer.
    #[serde(default = "default_window")]
    pub window_bytes: usize,
    /// How long a waiting call polls the sockets before it sleeps in the kernel:
    /// lower latency for CPU time (0: always sleep).
    #[serde(default = "default_spin_us")]
    pub spin_us: u64,
    /// The job's shared secret: every rank proves it holds it at the rendezvous, and
    /// every frame is sealed with a key derived from it (unset: an empty secret, which
    /// proves nothing; the host always sets it for worlds of more than one).
    #[serde(default)]
    pub job_token: Option<String>,
}

/// Largest message a peer may announce: protects against a garbage length.
pub(crate) const MAX_MESSAGE: u64 = 1 << 36;
/// How often blocked calls re-check liveness.
pub(crate) const POLL: Duration = Duration::from_millis(50);
