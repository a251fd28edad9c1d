//! What a rank reads: each peer's partial message and its receive queue, and the
//! doorbell it waits on.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering::*};
use std::time::{Duration, Instant};

use sheaf_core::Deadline;

use crate::segment::{self};

/// A message being streamed out of a ring.
pub(crate) struct Partial {
    pub(crate) tag: u64,
    pub(crate) want: usize,
    pub(crate) buf: Vec<u8>,
}

/// What this rank has read from one peer's ring but nobody received yet.
#[derive(Default)]
pub(crate) struct Rx {
    pub(crate) stash: HashMap<u64, VecDeque<Vec<u8>>>,
    pub(crate) partial: Option<Partial>,
    pub(crate) broken: Option<String>,
}

impl Rx {
    pub(crate) fn take(&mut self, tag: u64) -> Option<Vec<u8>> {
        self.stash.get_mut(&tag).and_then(VecDeque::pop_front)
    }
}

/// Spin, then yield, then sleep on the doorbell: cheap when the other side answers
/// within microseconds, and no burnt core when it computes for seconds.
pub(crate) struct Waiter {
    pub(crate) since: Option<Instant>,
}

impl Waiter {
    /// Busy-wait this long first: a futex wake-up costs tens of microseconds. Short,
    /// because when both ranks share one core the peer cannot run until we yield
    /// (measured here: with 50 us of spinning, such round trips took 104 us, not 2).
    const SPIN: Duration = Duration::from_micros(20);
    /// Then yield the core this long before sleeping.
    const YIELD: Duration = Duration::from_micros(500);

    pub(crate) fn new() -> Waiter {
        Waiter { since: None }
    }

    pub(crate) fn reset(&mut self) {
        self.since = None;
    }

    pub(crate) fn wait(&mut self, bell: &AtomicU32, sleepers: &AtomicU32, seen: u32, deadline: Deadline) {
        let waited = self.since.get_or_insert_with(Instant::now).elapsed();
        if waited < Self::SPIN {
            // One PAUSE per poll: it lets a sibling hyperthread run, while the poll's
            // own work between PAUSEs keeps a hypervisor from taking the loop for a
            // spin lock (pause-loop exiting deschedules the vCPU for ~100 us).
            std::hint::spin_loop();
        } else if waited < Self::SPIN + Self::YIELD {
            std::thread::yield_now();
        } else {
            sleepers.fetch_add(1, SeqCst);
            if bell.load(SeqCst) == seen {
                segment::futex_wait(bell, seen, deadline.remaining().min(Duration::from_millis(5)));
            }
            sleepers.fetch_sub(1, SeqCst);
        }
    }
}
