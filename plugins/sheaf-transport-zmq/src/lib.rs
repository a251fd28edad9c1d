//! Sheaf plugin: the ZeroMQ transport, over `tcp://` or `ipc://`.
//!
//! The plugin owns a current-thread tokio runtime (tokio's context does not cross
//! `dlopen`), run by the host threads that wait on the link, as MPI's progress engine
//! runs inside its blocking calls, and by an idle driver thread between calls; it
//! exposes the blocking, deadline-bound [`sheaf_core::Link`]. Each rank binds one PULL
//! inbox and connects one PUSH socket to every peer's inbox; ranks find each other the
//! way torchrun's do: rank 0 listens on `MASTER_ADDR:MASTER_PORT`, the others connect,
//! and rank 0 tells everyone everyone's inbox.
//!
//! ZeroMQ's `send` returns once a message is queued and has no byte-based
//! backpressure, so the wire protocol adds what a trainer needs: messages are cut into
//! chunks, receipts are cumulative and asked for every quarter window, a sender waits
//! for credit once a window of bytes is unacknowledged, `close` returns only once every
//! peer has received everything sent (and said goodbye), heartbeats and connection
//! monitoring detect a dead peer, and an abort frame tells every rank whom a failing
//! rank blames.

mod config;
mod inbound;
mod link;
mod progress;
mod rendezvous;
mod wire;

#[cfg(test)]
mod fuzz;

pub use config::{Scheme, ZmqConfig};
pub use link::ZmqLink;

use sheaf_core::{Error, Link, PluginKind, Provided, Result};

/// The plugin as exported to the host.
pub struct ZmqPlugin;

impl sheaf_abi::Plugin for ZmqPlugin {
    const NAME: &'static str = "sheaf-transport-zmq";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn provides() -> Vec<Provided> {
        ["zmq-tcp", "zmq-ipc"].map(|n| Provided { kind: PluginKind::Transport, name: n.into() }).to_vec()
    }

    /// TCP reaches across hosts; IPC (Unix sockets) only within one, below shared
    /// memory and above TCP there. Frames in flight, no fixed buffers.
    fn transport_info(name: &str) -> Result<sheaf_core::TransportInfo> {
        match name {
            "zmq-tcp" => Ok(sheaf_core::TransportInfo::network().with_preference(10)),
            "zmq-ipc" => Ok(sheaf_core::TransportInfo::host().with_preference(50)),
            other => {
                Err(Error::invalid(format!("unknown transport `{other}` (this plugin has zmq-tcp, zmq-ipc)")))
            }
        }
    }

    fn link(name: &str, config: &str) -> Result<Box<dyn Link>> {
        let scheme = match name {
            "zmq-tcp" => Scheme::Tcp,
            "zmq-ipc" => Scheme::Ipc,
            other => {
                return Err(Error::config(
                    "transport.plugin",
                    format!("unknown transport `{other}` (this plugin has zmq-tcp, zmq-ipc)"),
                ))
            }
        };
        let config: ZmqConfig = serde_json::from_str(config).map_err(|e| Error::config("transport", e))?;
        Ok(Box::new(ZmqLink::connect(scheme, config)?))
    }
}

sheaf_abi::export_plugin!(ZmqPlugin);
