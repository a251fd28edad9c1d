//! Error types shared by every crate and carried across the plugin boundary.

use std::fmt;
use std::time::Duration;

/// `Result` with Sheaf's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The operation a communication error happened in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    Connect,
    Send,
    Recv,
    Allreduce,
    Broadcast,
    Allgather,
    ReduceScatter,
    Barrier,
    Split,
    Close,
    Reduce,
    Gather,
    Scatter,
    AllToAll,
}

impl Op {
    pub const ALL: [Op; 14] = [
        Op::Connect,
        Op::Send,
        Op::Recv,
        Op::Allreduce,
        Op::Broadcast,
        Op::Allgather,
        Op::ReduceScatter,
        Op::Barrier,
        Op::Split,
        Op::Close,
        Op::Reduce,
        Op::Gather,
        Op::Scatter,
        Op::AllToAll,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Connect => "connect",
            Op::Send => "send",
            Op::Recv => "recv",
            Op::Allreduce => "allreduce",
            Op::Broadcast => "broadcast",
            Op::Allgather => "allgather",
            Op::ReduceScatter => "reduce-scatter",
            Op::Barrier => "barrier",
            Op::Split => "split",
            Op::Close => "close",
            Op::Reduce => "reduce",
            Op::Gather => "gather",
            Op::Scatter => "scatter",
            Op::AllToAll => "all-to-all",
        }
    }

    /// Stable numeric code, used on the wire and across the plugin ABI.
    pub fn code(self) -> u8 {
        Op::ALL.iter().position(|&o| o == self).unwrap_or(0) as u8
    }

    pub fn from_code(code: u8) -> Option<Op> {
        Op::ALL.get(usize::from(code)).copied()
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A failed communication. Every variant that involves another rank names it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CommError {
    #[error("{op}: timed out after {waited:?} waiting for rank {peer}")]
    Timeout { op: Op, peer: usize, waited: Duration },
    #[error("{op}: rank {peer} failed: {reason}")]
    PeerFailed { op: Op, peer: usize, reason: String },
    /// Another rank gave up and blamed `peer`; this rank was woken to fail too.
    #[error("{op}: aborted, rank {peer} failed: {reason}")]
    Aborted { op: Op, peer: usize, reason: String },
    #[error("{op}: bad message from rank {peer}: {detail}")]
    Protocol { op: Op, peer: usize, detail: String },
    #[error("{op}: invalid argument: {detail}")]
    InvalidArgument { op: Op, detail: String },
    #[error("{op}: not supported by this communicator")]
    Unsupported { op: Op },
    #[error("{op}: communicator is closed")]
    Closed { op: Op },
    #[error("{op}: communicator unusable after an earlier failure ({cause})")]
    Poisoned { op: Op, cause: String },
    #[error("{op}: transport failure: {detail}")]
    Transport { op: Op, detail: String },
}

impl CommError {
    /// The operation that failed.
    pub fn op(&self) -> Op {
        match self {
            CommError::Timeout { op, .. }
            | CommError::PeerFailed { op, .. }
            | CommError::Aborted { op, .. }
            | CommError::Protocol { op, .. }
            | CommError::InvalidArgument { op, .. }
            | CommError::Unsupported { op }
            | CommError::Closed { op }
            | CommError::Poisoned { op, .. }
            | CommError::Transport { op, .. } => *op,
        }
    }

    /// The rank held responsible, where there is one.
    pub fn peer(&self) -> Option<usize> {
        match self {
            CommError::Timeout { peer, .. }
            | CommError::PeerFailed { peer, .. }
            | CommError::Aborted { peer, .. }
            | CommError::Protocol { peer, .. } => Some(*peer),
            _ => None,
        }
    }

    /// The same error reported as part of a larger operation (a collective built from
    /// sends and receives reports the collective, not the receive).
    pub fn within(self, outer: Op) -> CommError {
        match self {
            CommError::Timeout { peer, waited, .. } => CommError::Timeout { op: outer, peer, waited },
            CommError::PeerFailed { peer, reason, .. } => CommError::PeerFailed { op: outer, peer, reason },
            CommError::Aborted { peer, reason, .. } => CommError::Aborted { op: outer, peer, reason },
            CommError::Protocol { peer, detail, .. } => CommError::Protocol { op: outer, peer, detail },
            CommError::InvalidArgument { detail, .. } => CommError::InvalidArgument { op: outer, detail },
            CommError::Unsupported { .. } => CommError::Unsupported { op: outer },
            CommError::Closed { .. } => CommError::Closed { op: outer },
            CommError::Poisoned { cause, .. } => CommError::Poisoned { op: outer, cause },
            CommError::Transport { detail, .. } => CommError::Transport { op: outer, detail },
        }
    }
}

/// Any failure outside communication: configuration, state, plugins.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("invalid config key `{key}`: {detail}")]
    InvalidConfig { key: String, detail: String },
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("bad state: {0}")]
    BadState(String),
    #[error("plugin `{plugin}`: {detail}")]
    Plugin { plugin: String, detail: String },
    #[error("{0}")]
    Other(String),
    /// (1.3.) The world agreed to stop after optimizer step `step` (a preemption
    /// signal reached a rank; [`crate::CheckpointSink::preempted`]), its checkpoint
    /// written: not a failure, the run goes on when resumed.
    #[error("preempted after step {step}, checkpointed")]
    Preempted { step: u64 },
}

impl Error {
    pub fn invalid(detail: impl Into<String>) -> Error {
        Error::InvalidArgument(detail.into())
    }

    pub fn config(key: impl Into<String>, detail: impl fmt::Display) -> Error {
        Error::InvalidConfig { key: key.into(), detail: detail.to_string() }
    }
}
