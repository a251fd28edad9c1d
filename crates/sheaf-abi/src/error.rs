//! Errors across the boundary.

use std::time::Duration;

use abi_stable::std_types::{ROption, RString};
use abi_stable::StableAbi;
use sheaf_core::{CommError, Error, Op};

/// An error as it crosses the plugin boundary: a code, the operation, the peer rank
/// when there is one, and text. Converts losslessly to and from [`CommError`] and
/// [`Error`].
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiError {
    pub code: u32,
    pub op: u8,
    pub peer: ROption<u64>,
    pub waited_ns: u64,
    pub message: RString,
    /// A second string: the config key, or the plugin name.
    pub extra: RString,
}

// Codes. Append only.
const TIMEOUT: u32 = 1;
const PEER_FAILED: u32 = 2;
const PROTOCOL: u32 = 3;
const COMM_INVALID: u32 = 4;
const COMM_UNSUPPORTED: u32 = 5;
const CLOSED: u32 = 6;
const POISONED: u32 = 7;
const TRANSPORT: u32 = 8;
const ABORTED: u32 = 9;
const INVALID_ARGUMENT: u32 = 100;
const INVALID_CONFIG: u32 = 101;
const UNSUPPORTED: u32 = 102;
const BAD_STATE: u32 = 103;
const PLUGIN: u32 = 104;
const OTHER: u32 = 105;
const PREEMPTED: u32 = 106;

impl AbiError {
    fn new(code: u32, op: Op, peer: Option<usize>, message: String) -> AbiError {
        AbiError {
            code,
            op: op.code(),
            peer: peer.map(|p| p as u64).into(),
            waited_ns: 0,
            message: message.into(),
            extra: RString::new(),
        }
    }

    /// A panic caught inside `plugin`.
    pub fn panic(plugin: &str, what: &str, payload: &(dyn std::any::Any + Send)) -> AbiError {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into());
        Error::Plugin { plugin: plugin.into(), detail: format!("panicked in {what}: {msg}") }.into()
    }
}

impl From<CommError> for AbiError {
    fn from(e: CommError) -> AbiError {
        let op = e.op();
        let peer = e.peer();
        match e {
            CommError::Timeout { waited, .. } => AbiError {
                waited_ns: waited.as_nanos().min(u128::from(u64::MAX)) as u64,
                ..AbiError::new(TIMEOUT, op, peer, String::new())
            },
            CommError::PeerFailed { reason, .. } => AbiError::new(PEER_FAILED, op, peer, reason),
            CommError::Protocol { detail, .. } => AbiError::new(PROTOCOL, op, peer, detail),
            CommError::Aborted { reason, .. } => AbiError::new(ABORTED, op, peer, reason),
            CommError::InvalidArgument { detail, .. } => AbiError::new(COMM_INVALID, op, None, detail),
            CommError::Unsupported { .. } => AbiError::new(COMM_UNSUPPORTED, op, None, String::new()),
            CommError::Closed { .. } => AbiError::new(CLOSED, op, None, String::new()),
            CommError::Poisoned { cause, .. } => AbiError::new(POISONED, op, None, cause),
            CommError::Transport { detail, .. } => AbiError::new(TRANSPORT, op, None, detail),
            other => AbiError::new(TRANSPORT, op, peer, other.to_string()),
        }
    }
}

impl From<Error> for AbiError {
    fn from(e: Error) -> AbiError {
        let simple = |code, message: String| AbiError::new(code, Op::Connect, None, message);
        match e {
            Error::Comm(c) => c.into(),
            Error::InvalidArgument(m) => simple(INVALID_ARGUMENT, m),
            Error::InvalidConfig { key, detail } => {
                AbiError { extra: key.into(), ..simple(INVALID_CONFIG, detail) }
            }
            Error::Unsupported(m) => simple(UNSUPPORTED, m),
            Error::BadState(m) => simple(BAD_STATE, m),
            Error::Plugin { plugin, detail } => AbiError { extra: plugin.into(), ..simple(PLUGIN, detail) },
            Error::Preempted { step } => {
                AbiError { extra: step.to_string().into(), ..simple(PREEMPTED, String::new()) }
            }
            other => simple(OTHER, other.to_string()),
        }
    }
}

impl AbiError {
    /// Back to a [`CommError`]; non-communication errors become `Transport`.
    pub fn into_comm(self) -> CommError {
        let op = Op::from_code(self.op).unwrap_or(Op::Connect);
        let peer = self.peer.into_option().map(|p| p as usize);
        let message = self.message.into_string();
        match (self.code, peer) {
            (TIMEOUT, Some(peer)) => {
                CommError::Timeout { op, peer, waited: Duration::from_nanos(self.waited_ns) }
            }
            (PEER_FAILED, Some(peer)) => CommError::PeerFailed { op, peer, reason: message },
            (PROTOCOL, Some(peer)) => CommError::Protocol { op, peer, detail: message },
            (ABORTED, Some(peer)) => CommError::Aborted { op, peer, reason: message },
            (COMM_INVALID, _) => CommError::InvalidArgument { op, detail: message },
            (COMM_UNSUPPORTED, _) => CommError::Unsupported { op },
            (CLOSED, _) => CommError::Closed { op },
            (POISONED, _) => CommError::Poisoned { op, cause: message },
            (TRANSPORT, _) => CommError::Transport { op, detail: message },
            (code, _) if code >= INVALID_ARGUMENT => CommError::Transport {
                op,
                detail: Error::from(AbiError { message: message.into(), ..self }).to_string(),
            },
            (code, _) => CommError::Transport { op, detail: format!("{message} (error code {code})") },
        }
    }
}

impl From<AbiError> for Error {
    fn from(e: AbiError) -> Error {
        match e.code {
            INVALID_ARGUMENT => Error::InvalidArgument(e.message.into_string()),
            INVALID_CONFIG => {
                Error::InvalidConfig { key: e.extra.into_string(), detail: e.message.into_string() }
            }
            UNSUPPORTED => Error::Unsupported(e.message.into_string()),
            BAD_STATE => Error::BadState(e.message.into_string()),
            PLUGIN => Error::Plugin { plugin: e.extra.into_string(), detail: e.message.into_string() },
            OTHER => Error::Other(e.message.into_string()),
            PREEMPTED => match e.extra.parse() {
                Ok(step) => Error::Preempted { step },
                Err(_) => Error::BadState(format!("a preemption with no step (`{}`)", e.extra)),
            },
            c if c < INVALID_ARGUMENT => Error::Comm(e.into_comm()),
            c => Error::Other(format!("{} (unknown error code {c})", e.message)),
        }
    }
}
