//! Reduction kernels against `copy_from_slice` of the same bytes: the kernel reads two
//! buffers and writes one, so near 1.5x the copy time is memory-bandwidth bound.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sheaf_collectives::reduce::combine;
use sheaf_core::{DType, ReduceOp};

fn kernels(c: &mut Criterion) {
    let mut group = c.benchmark_group("reduce");
    for bytes in [64 << 10, 4 << 20] {
        let src = vec![1u8; bytes];
        let mut dst = vec![2u8; bytes];
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_with_input(BenchmarkId::new("copy", bytes), &bytes, |b, _| {
            b.iter(|| dst.copy_from_slice(&src))
        });
        for (dtype, op) in
            [(DType::F32, ReduceOp::Sum), (DType::F32, ReduceOp::Max), (DType::BF16, ReduceOp::Sum)]
        {
            let src: Vec<u8> = std::iter::repeat([0u8, 0, 128, 63]).flatten().take(bytes).collect();
            let mut acc = src.clone();
            group.bench_with_input(BenchmarkId::new(format!("{dtype}-{op}"), bytes), &bytes, |b, _| {
                b.iter(|| combine(&mut acc, &src, dtype, op))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
