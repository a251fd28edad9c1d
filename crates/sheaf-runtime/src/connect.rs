//! The connect phase: this rank's link to the world, over a transport plugin or
//! `auto` (inside each host the preferred transport of host reach, between hosts the
//! preferred one of network reach, as the transports say of themselves).

use std::sync::Arc;
use std::time::Duration;

use sheaf_collectives::Group;
use sheaf_core::{Communicator, Deadline, Link};
use sheaf_job::job::Job;
use sheaf_plugins::{HostError, Registry};

use crate::world::WorkerEnv;

/// A rank's link to the world, and the world's hosts when the transport knows them
/// (`auto`).
pub struct Connected {
    pub link: Arc<dyn Link>,
    /// `host_of[rank]`: which host each rank is on.
    pub hosts: Option<Vec<usize>>,
}

impl Connected {
    /// The world communicator over the link, running `algorithm` (hierarchical over
    /// the hosts when they are known and the algorithm is `auto` or `hierarchical`).
    pub fn group(&self, algorithm: sheaf_collectives::Algorithm) -> Group {
        let g = Group::world(self.link.clone()).with_algorithm(algorithm);
        match &self.hosts {
            Some(h) => g.with_hosts(h),
            None => g,
        }
    }
}

/// What tells hosts apart: the kernel's boot id, the network namespace (ranks in
/// separate namespaces cannot share memory through abstract sockets, so they count as
/// separate hosts) and the host name, hashed (FNV-1a).
fn host_key() -> u64 {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let netns = std::fs::read_link("/proc/self/ns/net").map(|p| p.display().to_string()).unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{boot}|{netns}|{host}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl WorkerEnv {
    /// This rank's link from `transport`: a plugin's, or `auto`, which connects the
    /// preferred transport of network reach across the world (ZeroMQ's TCP, of the
    /// bundled ones), learns which ranks share a host, connects the preferred one of
    /// host reach among them (shared memory) and routes each peer over one or the
    /// other ([`HybridLink`]); its world group then reduces hierarchically.
    ///
    /// [`HybridLink`]: sheaf_collectives::HybridLink
    pub fn connect(
        &self,
        registry: &Registry,
        transport: &str,
        connect_timeout: Duration,
        peer_timeout: Duration,
    ) -> Result<Connected, HostError> {
        if transport != "auto" {
            let link = self.connect_plugin(registry, transport, connect_timeout, peer_timeout)?;
            return Ok(Connected { link, hosts: None });
        }
        let across = registry.preferred_transport(sheaf_core::Reach::Network)?;
        let world = self.connect_plugin(registry, &across, connect_timeout, peer_timeout)?;
        if self.world_size == 1 {
            return Ok(Connected { link: world, hosts: None });
        }
        let fail = |e: sheaf_core::CommError| HostError::Train {
            rank: self.rank,
            detail: format!("finding hosts: {e}"),
        };
        let mut keys = vec![0u8; 8 * self.world_size];
        Group::world(world.clone())
            .allgather(&host_key().to_le_bytes(), &mut keys, Deadline::after(connect_timeout))
            .map_err(fail)?;
        let keys: Vec<u64> =
            keys.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8"))).collect();
        let mut order: Vec<u64> = Vec::new();
        for k in &keys {
            if !order.contains(k) {
                order.push(*k);
            }
        }
        let host_of: Vec<usize> =
            keys.iter().map(|k| order.iter().position(|o| o == k).expect("seen")).collect();
        let mine: Vec<usize> = (0..self.world_size).filter(|&r| host_of[r] == host_of[self.rank]).collect();
        if mine.len() == 1 {
            return Ok(Connected { link: world, hosts: Some(host_of) });
        }
        let local_env = WorkerEnv {
            rank: mine.iter().position(|&r| r == self.rank).expect("this rank"),
            world_size: mine.len(),
            ..self.clone()
        };
        let within = registry.preferred_transport(sheaf_core::Reach::Host)?;
        let local = local_env.connect_plugin(registry, &within, connect_timeout, peer_timeout)?;
        let link = sheaf_collectives::HybridLink::new(world, local, &mine).map_err(fail)?;
        Ok(Connected { link: Arc::new(link), hosts: Some(host_of) })
    }

    /// This rank's link over the job's transport, with its timeouts.
    pub fn connect_job(&self, registry: &Registry, job: &Job) -> Result<Connected, HostError> {
        self.connect(
            registry,
            job.transport.plugin(),
            job.transport.timeout(),
            Duration::from_secs_f64(job.transport.peer_timeout_s),
        )
    }

    /// This rank's link from the transport plugin `transport`, after meeting the other
    /// ranks: the one place
    /// the transport's connection settings are written (rank, world, master, timeouts,
    /// `SHEAF_ADVERTISE_ADDR` when set, and the job's secret, `SHEAF_JOB_TOKEN`, which
    /// a world of more than one requires: `sheaf launch` makes one for its workers;
    /// ranks started by other launchers must all be given the same).
    fn connect_plugin(
        &self,
        registry: &Registry,
        transport: &str,
        connect_timeout: Duration,
        peer_timeout: Duration,
    ) -> Result<Arc<dyn Link>, HostError> {
        let token = std::env::var(sheaf_auth::TOKEN_ENV).ok().filter(|t| !t.is_empty());
        if token.is_none() && self.world_size > 1 {
            return Err(HostError::Usage(format!(
                "{} is not set: every rank of a world of {} must hold the job's secret (sheaf launch makes one; \
                 under another launcher export the same value to every rank, e.g. from `openssl rand -hex 32`)",
                sheaf_auth::TOKEN_ENV,
                self.world_size
            )));
        }
        let config = serde_json::json!({
            "rank": self.rank,
            "world_size": self.world_size,
            "master_addr": self.master_addr,
            "master_port": self.master_port,
            "connect_timeout_ms": connect_timeout.as_millis() as u64,
            "peer_timeout_ms": peer_timeout.as_millis() as u64,
            "advertise_addr": self.advertise_addr()?,
            "job_token": token,
        })
        .to_string();
        Ok(Arc::from(registry.link(transport, &config)?))
    }
}
