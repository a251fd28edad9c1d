//! The CPU kernels every model kind's fused path runs on: matrix products through
//! `gemm` on the plugin's compute threads, elementwise kernels compiled per SIMD target
//! (`kernels`), and candle custom ops with their own backward (`ops`).

pub(crate) mod kernels;
pub(crate) mod ops;
