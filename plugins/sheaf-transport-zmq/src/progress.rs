//! Who runs the runtime: a host thread that waits runs it itself (a short spin,
//! then `epoll`), as MPI's progress engine runs inside its blocking calls; an idle
//! driver thread runs it between calls and hands it back when a host thread asks.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How long the link must have been left alone before the idle driver takes the
/// runtime: long enough that a collective's calls in a row keep it on their thread.
pub(crate) const IDLE: Duration = Duration::from_millis(2);
/// The longest the idle driver holds the runtime before looking again.
pub(crate) const IDLE_TURN: Duration = Duration::from_millis(100);

/// The runtime and who runs it: host threads inside [`Progress::drive`], or the
/// idle driver while none is.
pub(crate) struct Progress {
    pub(crate) runtime: tokio::runtime::Runtime,
    /// Host threads inside `drive`.
    pub(crate) active: AtomicUsize,
    /// When the last `drive` ended, in nanoseconds since `epoch`.
    pub(crate) last_end: AtomicU64,
    pub(crate) epoch: Instant,
    /// The idle driver holds (or is about to hold) the runtime.
    pub(crate) idle_driving: AtomicBool,
    /// A host thread wants the runtime back from the idle driver.
    pub(crate) wanted: Notify,
    pub(crate) stop: AtomicBool,
}

impl Progress {
    pub(crate) fn new(runtime: tokio::runtime::Runtime) -> Progress {
        Progress {
            runtime,
            active: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            epoch: Instant::now(),
            idle_driving: AtomicBool::new(false),
            wanted: Notify::new(),
            stop: AtomicBool::new(false),
        }
    }

    pub(crate) fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Runs the runtime on this thread until `fut` is done (taking it from the idle
    /// driver first, or sharing it with other host threads).
    pub(crate) fn drive<T>(&self, fut: impl Future<Output = T>) -> T {
        self.active.fetch_add(1, Ordering::SeqCst);
        // Either the idle driver sees `active` before it takes the runtime, or this
        // thread sees it driving and asks for the runtime back.
        if self.idle_driving.load(Ordering::SeqCst) {
            self.wanted.notify_one();
        }
        let out = self.runtime.block_on(fut);
        self.last_end.store(self.now_ns(), Ordering::SeqCst);
        self.active.fetch_sub(1, Ordering::SeqCst);
        out
    }

    /// Runs the tasks that are ready (the writers of frames just posted) and returns.
    pub(crate) fn kick(&self) {
        self.drive(tokio::task::yield_now());
    }

    /// The idle driver's loop: runs the runtime whenever no host thread has been in
    /// the link for [`IDLE`], until the link is dropped.
    pub(crate) fn idle_driver(&self) {
        let idle_ns = u64::try_from(IDLE.as_nanos()).unwrap_or(u64::MAX);
        while !self.stop.load(Ordering::SeqCst) {
            let quiet = self.active.load(Ordering::SeqCst) == 0
                && self.now_ns().saturating_sub(self.last_end.load(Ordering::SeqCst)) >= idle_ns;
            if !quiet {
                std::thread::sleep(IDLE);
                continue;
            }
            self.idle_driving.store(true, Ordering::SeqCst);
            if self.active.load(Ordering::SeqCst) == 0 {
                self.runtime.block_on(async {
                    let _ = tokio::time::timeout(IDLE_TURN, self.wanted.notified()).await;
                });
            }
            self.idle_driving.store(false, Ordering::SeqCst);
        }
    }
}
