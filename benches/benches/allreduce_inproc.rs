//! Ring allreduce over the in-process transport, world 2 and 4: the algorithm's cost
//! without a network. One world of threads lives through all iterations.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sheaf_collectives::Group;
use sheaf_core::{Communicator, DType, Deadline, ReduceOp};
use sheaf_testkit::InProcWorld;

/// Runs `iters` allreduces of `bytes` on every rank of a world of `n` and returns the
/// time rank 0 took.
fn timed(n: usize, bytes: usize, iters: u64) -> Duration {
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        for link in InProcWorld::new(n).links() {
            let tx = tx.clone();
            s.spawn(move || {
                let g = Group::world(std::sync::Arc::new(link));
                let mut buf = vec![0u8; bytes];
                g.barrier(Deadline::after(Duration::from_secs(30))).unwrap();
                let start = Instant::now();
                for _ in 0..iters {
                    g.allreduce(
                        &mut buf,
                        DType::F32,
                        ReduceOp::Sum,
                        Deadline::after(Duration::from_secs(30)),
                    )
                    .unwrap();
                }
                if g.rank() == 0 {
                    tx.send(start.elapsed()).unwrap();
                }
            });
        }
    });
    rx.recv().unwrap()
}

fn allreduce(c: &mut Criterion) {
    let mut group = c.benchmark_group("allreduce_inproc");
    group.sample_size(10);
    for n in [2, 4] {
        for bytes in [4 << 10, 1 << 20] {
            group.throughput(Throughput::Bytes(bytes as u64));
            group.bench_with_input(BenchmarkId::new(format!("world{n}"), bytes), &bytes, |b, &bytes| {
                b.iter_custom(|iters| timed(n, bytes, iters))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, allreduce);
criterion_main!(benches);
