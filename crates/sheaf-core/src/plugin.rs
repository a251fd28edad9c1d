//! What a plugin can provide, as plain data.

use std::fmt;

/// A kind of component a plugin library provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum PluginKind {
    Optimizer,
    DataPartitioner,
    ModelPartitioner,
    Transport,
    Compute,
    Strategy,
    /// A model kind a compute plugin builds (`mlp`, `gpt`).
    Model,
}

impl PluginKind {
    pub const ALL: [PluginKind; 7] = [
        PluginKind::Optimizer,
        PluginKind::DataPartitioner,
        PluginKind::ModelPartitioner,
        PluginKind::Transport,
        PluginKind::Compute,
        PluginKind::Strategy,
        PluginKind::Model,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PluginKind::Optimizer => "optimizer",
            PluginKind::DataPartitioner => "data-partitioner",
            PluginKind::ModelPartitioner => "model-partitioner",
            PluginKind::Transport => "transport",
            PluginKind::Compute => "compute",
            PluginKind::Strategy => "strategy",
            PluginKind::Model => "model",
        }
    }

    pub fn from_name(name: &str) -> Option<PluginKind> {
        PluginKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One named implementation a plugin provides, e.g. `(Optimizer, "adamw")`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Provided {
    pub kind: PluginKind,
    pub name: String,
}

/// Which ranks a transport can connect (1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reach {
    /// Only ranks on one host (shared memory, Unix sockets).
    Host,
    /// Any ranks that reach one another over a network.
    Network,
}

/// What a transport says of itself before it connects (1.2), so the host chooses and
/// plans by what transports are, never by their names: `auto` links the ranks of each
/// host over the preferred transport of host reach and the hosts over the preferred
/// one of network reach; the memory plan counts the buffers a transport keeps resident.
/// A transport that says nothing (a plugin built before 1.2, a C transport) is taken as
/// [`TransportInfo::network`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportInfo {
    pub reach: Reach,
    /// Bytes of buffers a rank keeps resident for each peer whatever it sends (shared
    /// memory's rings), where that is fixed; `None`: the frames in flight.
    pub resident_bytes_per_peer: Option<u64>,
    /// Among transports of the same reach, the higher is preferred.
    pub preference: u32,
}

impl TransportInfo {
    /// A transport of network reach, no fixed buffers, no preference.
    pub fn network() -> TransportInfo {
        TransportInfo { reach: Reach::Network, resident_bytes_per_peer: None, preference: 0 }
    }

    /// A transport of host reach, no fixed buffers, no preference.
    pub fn host() -> TransportInfo {
        TransportInfo { reach: Reach::Host, ..TransportInfo::network() }
    }

    pub fn with_resident_bytes_per_peer(mut self, bytes: u64) -> TransportInfo {
        self.resident_bytes_per_peer = Some(bytes);
        self
    }

    pub fn with_preference(mut self, preference: u32) -> TransportInfo {
        self.preference = preference;
        self
    }

    /// As it crosses the plugin boundary: `key=value` lines, so later releases add keys
    /// without changing a layout.
    pub fn encode(&self) -> String {
        let reach = match self.reach {
            Reach::Host => "host",
            Reach::Network => "network",
        };
        let mut out = format!("reach={reach}\npreference={}\n", self.preference);
        if let Some(b) = self.resident_bytes_per_peer {
            out += &format!("resident_bytes_per_peer={b}\n");
        }
        out
    }

    /// [`TransportInfo::encode`]'s text back; keys it does not know (a later
    /// release's) are skipped, a known key with a bad value is an error naming it.
    pub fn decode(text: &str) -> crate::Result<TransportInfo> {
        let mut info = TransportInfo::network();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (key, value) = line.split_once('=').unwrap_or((line, ""));
            let bad = || crate::Error::invalid(format!("transport info `{key}`: `{value}`"));
            match key {
                "reach" => {
                    info.reach = match value {
                        "host" => Reach::Host,
                        "network" => Reach::Network,
                        _ => return Err(bad()),
                    }
                }
                "preference" => info.preference = value.parse().map_err(|_| bad())?,
                "resident_bytes_per_peer" => {
                    info.resident_bytes_per_peer = Some(value.parse().map_err(|_| bad())?)
                }
                _ => {}
            }
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a transport says survives the boundary; a later release's keys are skipped,
    /// a bad value is an error naming its key, and saying nothing is network reach.
    #[test]
    fn transport_info_crosses_as_text() {
        for info in [
            TransportInfo::network(),
            TransportInfo::host().with_preference(100).with_resident_bytes_per_peer(4 << 20),
            TransportInfo::network().with_preference(7),
        ] {
            assert_eq!(TransportInfo::decode(&info.encode()).unwrap(), info);
        }
        let later = "reach=host\nlatency_ns=900\npreference=3\n";
        assert_eq!(TransportInfo::decode(later).unwrap(), TransportInfo::host().with_preference(3));
        let e = TransportInfo::decode("reach=moon").unwrap_err().to_string();
        assert!(e.contains("reach") && e.contains("moon"), "{e}");
        assert!(TransportInfo::decode("preference=-1").is_err());
        assert_eq!(TransportInfo::decode("").unwrap(), TransportInfo::network());
    }
}
