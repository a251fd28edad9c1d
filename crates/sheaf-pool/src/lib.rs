//! A plugin's compute threads. The first thread that runs work on them (a worker's
//! training thread) joins them as their first thread, so the work of a step runs on
//! that thread and the pool's others: no hand-over to the pool and back on every call,
//! and no threads started for one call and ended after it.
//!
//! Each plugin library links its own copy of this crate and of rayon, so each has its
//! own pool: the compute plugin's for its products, the optimizer plugin's for its
//! updates (which started a thread every step before). Measured on the reference MLP
//! at one worker of two threads, against the compute plugin's own pool that the
//! training thread handed every step to: samples/s 1.015x (median of 10 interleaved
//! pairs, spread 0.967-1.044), so within the noise of one pair.
//!
//! Work sent from any other thread runs on a second pool of the same size, which that
//! thread waits on, as with [`rayon::ThreadPool::install`].

use std::cell::OnceCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Runs `f` on this library's compute threads, `threads` of them (the first call's
/// count sizes the pool; 1 or 0 runs `f` on the caller alone). Inside `f`, rayon's
/// parallel iterators, `join` and `scope` share out work among those threads.
///
/// The first thread to call this joins the pool as its thread 0, for as long as the
/// process lives: `f` runs on it directly, and it takes part in the work it shares
/// out. Any other thread hands `f` to a second pool and waits.
pub fn install<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    static CLAIMED: AtomicBool = AtomicBool::new(false);
    static SHARED: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    thread_local! {
        // This thread's pool, when this thread is its thread 0 (kept so it is never
        // dropped: the pool lives as long as the process).
        static JOINED: OnceCell<Option<rayon::ThreadPool>> = const { OnceCell::new() };
    }
    if threads < 2 {
        return f();
    }
    let joined = JOINED.with(|joined| {
        joined
            .get_or_init(|| {
                // `use_current_thread` fails when this thread already belongs to a
                // pool; the work then goes to the shared pool below.
                (!CLAIMED.swap(true, Ordering::SeqCst))
                    .then(|| builder(threads).use_current_thread().build().ok())
                    .flatten()
            })
            .is_some()
    });
    if joined {
        return f();
    }
    match SHARED.get_or_init(|| builder(threads).build().ok()) {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

fn builder(threads: usize) -> rayon::ThreadPoolBuilder {
    rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(|i| format!("compute-{i}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// A sum shared out on the pool, the threads it had, and whether `f` ran on a
    /// pool's thread.
    fn shared_out(threads: usize) -> (u64, usize, bool) {
        install(threads, || {
            let sum = (0..10_000u64).into_par_iter().map(|i| i * i).sum::<u64>();
            (sum, rayon::current_num_threads(), rayon::current_thread_index().is_some())
        })
    }

    #[test]
    fn work_runs_on_the_joined_pool_and_on_the_shared_one() {
        let expected: u64 = (0..10_000u64).map(|i| i * i).sum();
        // Whichever thread claims the joined pool, this one or another test's, the
        // work runs on three threads of a pool, here and from threads that cannot join.
        assert_eq!(shared_out(3), (expected, 3, true));
        let others: Vec<(u64, usize, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4).map(|_| s.spawn(|| shared_out(3))).collect();
            handles.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        assert!(others.iter().all(|&r| r == (expected, 3, true)), "{others:?}");
        // Again on this thread: the same pool.
        assert_eq!(shared_out(3), (expected, 3, true));
    }

    #[test]
    fn one_thread_runs_on_the_caller() {
        std::thread::spawn(|| {
            let caller = std::thread::current().id();
            let (on, in_pool) = install(1, || (std::thread::current().id(), rayon::current_thread_index()));
            assert_eq!((on, in_pool), (caller, None));
        })
        .join()
        .expect("thread");
    }
}
