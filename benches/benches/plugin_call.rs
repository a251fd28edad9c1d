//! The cost of one call through the plugin boundary: an SGD step on a 64 MiB
//! parameter called directly, and through the abi_stable adapters (what a loaded
//! `.so` costs). Buffers cross as slices, so the two should match.

use criterion::{criterion_group, criterion_main, Criterion};
use sheaf_core::Param;

fn step(c: &mut Criterion) {
    let n = 16 << 20; // 64 MiB of f32
    let mut value = vec![1.0f32; n];
    let grad = vec![1e-3f32; n];
    let mut group = c.benchmark_group("plugin_call");
    group.sample_size(10);
    let mut direct = sheaf_optim::new_optimizer("sgd", r#"{"lr":0.01}"#).unwrap();
    group.bench_function("sgd_step_64MiB_direct", |b| {
        b.iter(|| direct.step(&mut [Param { name: "w", value: &mut value, grad: &grad }]).unwrap())
    });
    let mut loaded = sheaf_abi::from_abi::optimizer(sheaf_abi::to_abi::optimizer(
        "sheaf-optim",
        sheaf_optim::new_optimizer("sgd", r#"{"lr":0.01}"#).unwrap(),
    ))
    .unwrap();
    group.bench_function("sgd_step_64MiB_through_abi", |b| {
        b.iter(|| loaded.step(&mut [Param { name: "w", value: &mut value, grad: &grad }]).unwrap())
    });
    let mut tiny = vec![0.0f32; 1];
    let tiny_grad = vec![0.0f32; 1];
    group.bench_function("sgd_step_1_through_abi", |b| {
        b.iter(|| loaded.step(&mut [Param { name: "t", value: &mut tiny, grad: &tiny_grad }]).unwrap())
    });
    group.finish();
}

criterion_group!(benches, step);
criterion_main!(benches);
