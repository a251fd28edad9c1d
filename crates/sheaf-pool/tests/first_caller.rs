//! Its own process, so this test's thread is the first to call `install`.

#[test]
fn the_first_caller_joins_the_pool_as_its_thread_0() {
    let caller = std::thread::current().id();
    for _ in 0..2 {
        let (on, index, threads) = sheaf_pool::install(3, || {
            (std::thread::current().id(), rayon::current_thread_index(), rayon::current_num_threads())
        });
        assert_eq!((on, index, threads), (caller, Some(0), 3));
    }
    // Another thread hands its work to the other pool.
    let other = std::thread::spawn(|| {
        let caller = std::thread::current().id();
        sheaf_pool::install(3, || (std::thread::current().id() != caller, rayon::current_num_threads()))
    })
    .join()
    .expect("thread");
    assert_eq!(other, (true, 3));
}
