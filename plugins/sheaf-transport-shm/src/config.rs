//! The transport's settings (`ShmConfig`, from the host's JSON).

use std::time::Duration;

use serde::Deserialize;

/// How often blocked calls look for peers that died.
pub(crate) const LIVENESS_EVERY: Duration = Duration::from_millis(20);

pub(crate) fn default_connect_ms() -> u64 {
    60_000
}

/// What the host passes to the transport (as JSON). Other keys the host writes for
/// network transports (the advertise address) are ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct ShmConfig {
    pub rank: usize,
    pub world_size: usize,
    #[serde(default)]
    pub master_addr: String,
    pub master_port: u16,
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// Bytes of each ring (a power of two, at least 64 KiB); by default 4 MiB, less
    /// for large worlds so that the segment stays under 2 GiB.
    #[serde(default)]
    pub ring_bytes: Option<usize>,
    /// The job's shared secret, which every joining rank proves it holds before rank 0
    /// hands it the segment (unset: an empty secret, which proves nothing).
    #[serde(default)]
    pub job_token: Option<String>,
}
