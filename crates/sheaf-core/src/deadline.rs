//! Deadlines: every blocking call in Sheaf takes one.

use std::time::{Duration, Instant};

/// The instant by which a blocking operation must finish.
///
/// A deadline, not a timeout, is passed down a call chain so that a collective made of
/// many sends and receives fails on time as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Deadline {
        let now = Instant::now();
        // Saturate instead of panicking on absurd timeouts.
        Deadline(now.checked_add(timeout).unwrap_or(now + Duration::from_secs(86_400 * 365)))
    }

    /// A deadline at `instant`.
    pub fn at(instant: Instant) -> Deadline {
        Deadline(instant)
    }

    /// The instant itself.
    pub fn instant(self) -> Instant {
        self.0
    }

    /// Time left, zero once expired.
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn expired(self) -> bool {
        Instant::now() >= self.0
    }
}
