//! Fuzzing the decoders that read bytes from outside the process (frames, rendezvous
//! messages, shared-memory records, checkpoints, datasets, job files): generated
//! inputs, random or valid examples mutated, fed to a decoder that must return (an
//! error is fine) without panicking, hanging or allocating from an unchecked length.
//!
//! `SHEAF_FUZZ_CASES` sets the inputs per decoder (default 2,000, what CI runs; the
//! closing notes' runs use 1,000,000). A test binary that fuzzes installs
//! [`CappedAlloc`] as its global allocator, so an allocation above
//! [`ALLOCATION_CAP`] while a decoder runs aborts the binary with the decoder's name.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Inputs per decoder: `SHEAF_FUZZ_CASES`, default 2,000.
pub fn cases() -> u32 {
    std::env::var("SHEAF_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
}

/// The most one allocation may take while a decoder runs on a fuzzed input: inputs are
/// at most a few kilobytes, so anything near this came from a length field.
pub const ALLOCATION_CAP: usize = 256 << 20;

/// Longest a decoder may take on one input.
pub const CASE_LIMIT: Duration = Duration::from_secs(2);

thread_local! {
    static FUZZING: Cell<Option<&'static str>> = const { Cell::new(None) };
}

/// The system allocator, refusing (by aborting, naming the decoder) any single
/// allocation above [`ALLOCATION_CAP`] made while a decoder runs on this thread.
#[derive(Debug)]
pub struct CappedAlloc;

// SAFETY: every call is forwarded to `System` unchanged, or the process aborts.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn check(size: usize) {
    if size > ALLOCATION_CAP {
        // `try_with`: the thread-local may be gone while a thread exits.
        if let Ok(Some(name)) = FUZZING.try_with(Cell::get) {
            let msg = format!("fuzz {name}: an allocation of {size} bytes from a fuzzed input\n");
            // SAFETY: write(2) of a valid buffer to stderr; then abort, since an
            // allocator may not unwind.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
            }
            std::process::abort();
        }
    }
}

/// Byte strings to feed a decoder: a quarter random (up to 512 bytes), the rest one of
/// `seeds` (valid inputs) with up to 8 edits: a byte flipped, set to 0, 0xFF or a
/// random value, the input cut short, extended, or a stretch of it repeated.
pub fn inputs(seeds: Vec<Vec<u8>>) -> BoxedStrategy<Vec<u8>> {
    let random = proptest::collection::vec(any::<u8>(), 0..512);
    if seeds.is_empty() {
        return random.boxed();
    }
    let seeds = Arc::new(seeds);
    let n = seeds.len();
    let edits = proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..7), 1..8);
    let mutated = (0..n, edits).prop_map(move |(i, edits)| {
        let mut b = seeds[i].clone();
        for (pos, value, kind) in edits {
            let at = if b.is_empty() { 0 } else { pos % b.len() };
            match kind {
                0 if !b.is_empty() => b[at] ^= 1 << (value % 8),
                1 if !b.is_empty() => b[at] = 0,
                2 if !b.is_empty() => b[at] = 0xFF,
                3 if !b.is_empty() => b[at] = value,
                4 => b.truncate(at),
                5 => b.extend(std::iter::repeat_n(value, usize::from(value % 16) + 1)),
                _ if !b.is_empty() => {
                    let len = (usize::from(value) % 16 + 1).min(b.len() - at);
                    let stretch = b[at..at + len].to_vec();
                    b.splice(at..at, stretch);
                }
                _ => b.push(value),
            }
        }
        b
    });
    prop_oneof![1 => random, 3 => mutated].boxed()
}

/// Feeds `decode` [`cases`] inputs from `strategy` (on this thread, under
/// [`CappedAlloc`] when the binary installed it). Fails with the (shrunk) input that
/// panicked or took longer than [`CASE_LIMIT`]; returns how many inputs ran.
pub fn fuzz<S>(name: &'static str, strategy: S, decode: impl Fn(&S::Value)) -> u64
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let cases = cases();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2_000,
        ..Config::default()
    });
    let start = Instant::now();
    let result = runner.run(&strategy, |input| {
        FUZZING.with(|f| f.set(Some(name)));
        let t = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode(&input)));
        FUZZING.with(|f| f.set(None));
        if let Err(payload) = outcome {
            let why = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return Err(TestCaseError::fail(format!("panicked: {why}")));
        }
        if t.elapsed() > CASE_LIMIT {
            return Err(TestCaseError::fail(format!("took {:?}", t.elapsed())));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("fuzz {name}: {e}");
    }
    eprintln!("fuzz {name}: {cases} inputs in {:.1} s, no panic", start.elapsed().as_secs_f64());
    u64::from(cases)
}
