//! Sheaf plugin: the shared-memory transport, for ranks on one host.
//!
//! Rank 0 creates one anonymous shared-memory file (`memfd_create`) holding a control
//! block per rank and a single-producer single-consumer byte ring per ordered pair of
//! ranks, and hands its descriptor to the other ranks over an abstract Unix socket
//! named after the rendezvous port (`SCM_RIGHTS`). Nothing is left in the filesystem,
//! even when a rank is killed. A message is written into the sender's ring to the
//! receiver and streamed out as it is read, so messages larger than a ring cross it
//! in pieces. Waiting spins briefly, then yields, then sleeps on a futex ("doorbell")
//! in the waiter's control block that the other side rings.
//!
//! A rank blocked sending into a full ring drains its own incoming rings meanwhile,
//! so two ranks sending to each other at once never deadlock (`send` stays buffered,
//! as [`sheaf_core::Link`] requires). Dead peers are found through their process
//! state; aborts are written into the aborting rank's control block for all to see.

mod config;
mod inbound;
mod layout;
mod link;
mod rendezvous;
mod segment;

#[cfg(test)]
mod fuzz;

pub use config::ShmConfig;
pub use link::ShmLink;

use sheaf_core::{Error, Link, PluginKind, Provided, Result};

/// The plugin as exported to the host.
pub struct ShmPlugin;

impl sheaf_abi::Plugin for ShmPlugin {
    const NAME: &'static str = "sheaf-transport-shm";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn provides() -> Vec<Provided> {
        vec![Provided { kind: PluginKind::Transport, name: "shm".into() }]
    }

    /// The ranks of one host; the rings a rank reads, one from each peer (4 MiB each
    /// by default, prefaulted by their reader), are resident; preferred within a host.
    fn transport_info(name: &str) -> Result<sheaf_core::TransportInfo> {
        if name != "shm" {
            return Err(Error::invalid(format!("unknown transport `{name}` (this plugin has shm)")));
        }
        let ring = layout::DEFAULT_RING_BYTES as u64;
        Ok(sheaf_core::TransportInfo::host().with_resident_bytes_per_peer(ring).with_preference(100))
    }

    fn link(name: &str, config: &str) -> Result<Box<dyn Link>> {
        if name != "shm" {
            return Err(Error::config(
                "transport.plugin",
                format!("unknown transport `{name}` (this plugin has shm)"),
            ));
        }
        let config: ShmConfig = serde_json::from_str(config).map_err(|e| Error::config("transport", e))?;
        Ok(Box::new(ShmLink::connect(config)?))
    }
}

sheaf_abi::export_plugin!(ShmPlugin);
