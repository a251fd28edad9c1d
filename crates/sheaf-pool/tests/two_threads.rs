//! Its own process: the first call sizes the pools, and the unit tests ask for 3.

#[test]
fn two_threads_run_on_a_pool() {
    let on_pool = std::thread::spawn(|| sheaf_pool::install(2, || rayon::current_thread_index().is_some()));
    assert!(on_pool.join().expect("thread"));
}
