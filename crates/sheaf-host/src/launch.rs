//! `sheaf launch`: N local worker processes, like `torchrun --nproc-per-node N`. The
//! launcher checks the job, picks a rendezvous port and a run directory, starts the
//! workers with torchrun's environment, prefixes their output with the rank, and if
//! one fails stops the others and reports which.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::HostError;

/// How to start the workers.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    pub workers: usize,
    /// Arguments every worker's `sheaf run` gets (job file, `--set`, `--plugin-dir`).
    pub worker_args: Vec<String>,
    pub run_dir: PathBuf,
    pub threads_per_worker: Option<usize>,
    /// Send the workers' standard output to our standard error (our standard output
    /// then carries only what the caller prints, e.g. `--json`).
    pub workers_to_stderr: bool,
}

/// `runs/<UTC date>-<time>-<pid>`.
pub fn default_run_dir() -> PathBuf {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    PathBuf::from("runs").join(format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}-{}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        std::process::id()
    ))
}

/// A free TCP port on loopback, for a local world's rendezvous.
///
/// Picked at random below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), and checked free: a port the kernel
/// hands out for `:0` can be handed out again to another process's outgoing
/// connection or `:0` bind (a ZeroMQ inbox, say) between this check and rank 0's bind,
/// which failed parallel launches on one host with "Address already in use". Below
/// the range only another launcher's pick can collide, one chance in thousands.
pub(crate) fn free_port() -> Result<u16, HostError> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u16>().ok()))
        .unwrap_or(32768);
    let low = ephemeral_low.saturating_sub(12_288).max(1024);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut rng = sheaf_core::SplitMix64::new(nanos as u64 ^ (u64::from(std::process::id()) << 32));
    if ephemeral_low > low {
        for _ in 0..64 {
            let port = low + (rng.next_u64() % u64::from(ephemeral_low - low)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| HostError::Launch(format!("cannot find a free port for the rendezvous: {e}")))?;
    Ok(l.local_addr().map_err(|e| HostError::Launch(e.to_string()))?.port())
}

/// This executable as rank `rank` of a local world of `world` ranks meeting at
/// `127.0.0.1:port`: torchrun's variables, `threads` compute threads, no stdin. The
/// caller adds the arguments and where the output goes.
pub(crate) fn local_worker(
    exe: &std::path::Path,
    rank: usize,
    world: usize,
    port: u16,
    threads: usize,
) -> Command {
    let mut cmd = Command::new(exe);
    cmd.env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string())
        .stdin(Stdio::null());
    cmd
}

/// Compute threads per worker when `workers` share this machine.
pub(crate) fn threads_per_worker(workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / workers.max(1)).max(1)
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("killed by signal {sig}");
        }
    }
    match status.code() {
        Some(c) => format!("exit status {c}"),
        None => status.to_string(),
    }
}

/// Copies a worker's output to ours, each line prefixed with its rank; `raw` copies
/// bytes as they come (rank 0's progress bar redraws one line with `\r`).
fn forward(
    rank: usize,
    stream: impl Read + Send + 'static,
    to_stderr: bool,
    raw: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let write = |bytes: &[u8]| {
            if to_stderr {
                let _ = std::io::stderr().lock().write_all(bytes);
            } else {
                let _ = std::io::stdout().lock().write_all(bytes);
            }
        };
        if raw {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                write(&buf[..n]);
            }
            return;
        }
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).map(|n| n > 0).unwrap_or(false) {
            let mut out = format!("[rank {rank}] ").into_bytes();
            out.extend_from_slice(&line);
            if !out.ends_with(b"\n") {
                out.push(b'\n');
            }
            write(&out);
            line.clear();
        }
    })
}

fn terminate(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            #[cfg(unix)]
            // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    for (_, c) in children.iter_mut() {
        while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Starts the workers and waits for them. Returns once all succeeded, or with an
/// error naming the first rank that failed (the others are stopped).
pub fn launch(opts: &LaunchOptions) -> Result<(), HostError> {
    if opts.workers == 0 {
        return Err(HostError::Usage("launch -n must be at least 1".into()));
    }
    let exe = std::env::current_exe()
        .map_err(|e| HostError::Launch(format!("cannot find the sheaf executable: {e}")))?;
    let port = match std::env::var("MASTER_PORT").ok().and_then(|p| p.parse().ok()) {
        Some(p) => p,
        None => free_port()?,
    };
    let threads = opts.threads_per_worker.unwrap_or_else(|| threads_per_worker(opts.workers));
    let progress = std::io::stderr().is_terminal();
    std::fs::create_dir_all(&opts.run_dir)
        .map_err(|e| HostError::Output(format!("{}: {e}", opts.run_dir.display())))?;

    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut forwarders = Vec::new();
    for rank in 0..opts.workers {
        let mut cmd = local_worker(&exe, rank, opts.workers, port, threads);
        cmd.arg("run")
            .args(&opts.worker_args)
            .arg("--run-dir")
            .arg(&opts.run_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if progress && rank == 0 {
            cmd.env("SHEAF_PROGRESS", "1");
        } else {
            cmd.env_remove("SHEAF_PROGRESS");
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                terminate(&mut children);
                return Err(HostError::Launch(format!("cannot start rank {rank}: {e}")));
            }
        };
        eprintln!("[launch] rank {rank} pid {}", child.id());
        forwarders.push(forward(rank, child.stdout.take().expect("piped"), opts.workers_to_stderr, false));
        forwarders.push(forward(rank, child.stderr.take().expect("piped"), true, progress && rank == 0));
        children.push((rank, child));
    }

    let mut done = vec![false; children.len()];
    let failure = loop {
        // Every rank that has failed by now; one killed by a signal is the likelier
        // cause of the others' errors, so it is named first.
        let mut failed: Vec<(bool, String)> = Vec::new();
        for (i, (rank, child)) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    done[i] = true;
                    if !status.success() {
                        failed.push((
                            status.code().is_some(),
                            format!("rank {rank} failed ({})", describe(status)),
                        ));
                    }
                }
                Ok(None) => {}
                Err(e) => failed.push((true, format!("rank {rank}: cannot wait for it: {e}"))),
            }
        }
        if !failed.is_empty() {
            failed.sort_by_key(|(exited, _)| *exited);
            break Some(failed.into_iter().map(|(_, m)| m).collect::<Vec<_>>().join("; "));
        }
        if done.iter().all(|&d| d) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if let Some(msg) = failure {
        terminate(&mut children);
        for f in forwarders {
            let _ = f.join();
        }
        return Err(HostError::Launch(format!("{msg}; stopped the other workers")));
    }
    for f in forwarders {
        let _ = f.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Rendezvous ports come from below the kernel's ephemeral range, where no `:0`
    /// bind or outgoing connection can take them, and are free when handed out.
    #[test]
    fn rendezvous_ports_avoid_the_ephemeral_range() {
        let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u16>().ok()))
            .unwrap_or(32768);
        for _ in 0..20 {
            let port = super::free_port().unwrap();
            assert!(port < low && port >= 1024, "{port} (ephemeral from {low})");
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}
