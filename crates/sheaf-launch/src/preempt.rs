//! Preemption: the signals that ask a run to stop at its next step boundary with a
//! checkpoint. SIGTERM and SIGINT always do (what a scheduler, Kubernetes and a
//! terminal send), and so does `--preempt-signal` (SIGUSR1 by default, as SLURM's
//! `--signal=USR1@SECONDS` sends it ahead of a time limit). A worker only raises a
//! flag; the ranks agree on it at the next step boundary (the host's checkpoint sink
//! allreduces it), save, and exit with [`sheaf_plugins::exit::PREEMPTED`]. A second
//! signal changes nothing: where a scheduler signals every task and the launcher
//! forwards the same signal, each worker gets it twice. What does not stop within the
//! launcher's grace period is killed.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use sheaf_plugins::HostError;

/// The signal `--preempt-signal` names when it is not given.
pub const DEFAULT_SIGNAL: &str = "USR1";

/// The number of a signal named as `kill -l` and SLURM's `--signal` name them (`USR1`,
/// `SIGUSR1`, or its number). SIGKILL and SIGSTOP cannot be caught: refused.
pub fn parse_signal(name: &str) -> Result<i32, HostError> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    let named = [
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("ALRM", libc::SIGALRM),
        ("TERM", libc::SIGTERM),
        ("XCPU", libc::SIGXCPU),
    ];
    let sig = match (named.iter().find(|(n, _)| *n == bare), bare.parse::<i32>()) {
        (Some((_, s)), _) => *s,
        (None, Ok(n)) if n > 0 && n < 32 => n,
        _ => {
            return Err(HostError::Usage(format!(
            "--preempt-signal {name}: not a signal this host can watch (one of HUP, INT, QUIT, USR1, USR2, \
                 ALRM, TERM, XCPU, or a number below 32)"
        )))
        }
    };
    if sig == libc::SIGKILL || sig == libc::SIGSTOP {
        return Err(HostError::Usage(format!(
            "--preempt-signal {name}: cannot be caught, so cannot stop a run cleanly"
        )));
    }
    Ok(sig)
}

/// Raises the returned flag on SIGTERM, SIGINT or `extra`: what a worker's
/// checkpoint sink reads at each step boundary. Registered once per process.
pub fn watch(extra: i32) -> Result<Arc<AtomicBool>, HostError> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    if let Some(flag) = FLAG.get() {
        return Ok(flag.clone());
    }
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT, extra] {
        signal_hook::flag::register(sig, flag.clone())
            .map_err(|e| HostError::os(format!("cannot watch signal {sig}"), e))?;
    }
    Ok(FLAG.get_or_init(|| flag).clone())
}

/// Raises the returned flag on SIGUSR2: a worker then writes its flight recorder.
/// Registered once per process.
pub fn watch_flight() -> Result<Arc<AtomicBool>, HostError> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    if let Some(flag) = FLAG.get() {
        return Ok(flag.clone());
    }
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(libc::SIGUSR2, flag.clone())
        .map_err(|e| HostError::os("cannot watch SIGUSR2", e))?;
    Ok(FLAG.get_or_init(|| flag).clone())
}

#[cfg(test)]
mod tests {
    use super::parse_signal;

    /// Names as `kill -l` and SLURM give them, with or without `SIG`, any case, or
    /// numbers; what cannot be caught, or is no signal, is refused naming the flag.
    #[test]
    fn signals_are_named_as_kill_names_them() {
        for (name, sig) in
            [("USR1", libc::SIGUSR1), ("sigterm", libc::SIGTERM), ("Int", libc::SIGINT), ("12", 12)]
        {
            assert_eq!(parse_signal(name).unwrap(), sig, "{name}");
        }
        for bad in ["KILL", "SIGSTOP", "9", "0", "64", "USR3", ""] {
            let e = parse_signal(bad).unwrap_err();
            assert!(e.to_string().contains("--preempt-signal"), "{bad}: {e}");
            assert_eq!(e.exit_code(), sheaf_plugins::exit::USAGE, "{bad}");
        }
    }
}
