//! CPU kernels for the fused training paths: a bounds-checked front to the `gemm`
//! crate (the matrix products candle itself runs on, with its AVX-512 kernels turned
//! on) and the few elementwise passes around it, written once over plain slices so a
//! step allocates nothing after its first.

use gemm::Parallelism;

/// A matrix view of a slice: `rows x cols`, element `(i, j)` at `i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// Row-major `rows x cols`.
    pub(crate) fn rows(data: &'a [f32], rows: usize, cols: usize) -> View<'a> {
        View { data, rows, cols, rs: cols, cs: 1 }
    }

    /// `rows x cols`, row `i` starting at `i * rs` (a column block of a wider matrix).
    pub(crate) fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> View<'a> {
        View { data, rows, cols, rs, cs: 1 }
    }

    /// The transpose: `cols x rows`.
    pub(crate) fn t(self) -> View<'a> {
        View { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(last < self.data.len(), "matrix view past the end of its slice");
        }
    }
}

/// Compute threads of this process: the worker's share of the cores, as the launcher
/// sets it (`RAYON_NUM_THREADS`).
pub(crate) fn threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

/// Runs `f` (a whole forward or backward step) on this process's compute threads,
/// which the training thread joins ([`sheaf_pool::install`]).
///
/// The serial parts of `f` run on one of those threads too: run from a thread outside
/// the pool, they raced the pool's threads (which spin a while after each product
/// before they sleep) for the same cores, and two threads were no faster than one on a
/// 2-core machine.
pub(crate) fn on_compute_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    sheaf_pool::install(threads(), f)
}

/// `dst = a * b` (or `dst += a * b` when `accumulate`), `dst` row-major `a.rows x b.cols`.
///
/// With several threads, `dst` is split among them (by columns, or by rows for a
/// weight's gradient), each thread one single-threaded product over its share:
/// measured on the reference MLP's shapes, that scaled better on two cores (1.4x to
/// 2.0x) than `gemm`'s own split (1.1x to 1.5x).
pub(crate) fn matmul(dst: &mut [f32], accumulate: bool, a: View<'_>, b: View<'_>, threads: usize) {
    assert_eq!(dst.len(), a.rows * b.cols, "destination is not {} x {}", a.rows, b.cols);
    matmul_to(dst, b.cols, accumulate, a, b, threads)
}

/// [`matmul`] into the first `b.cols` columns of row-major `dst` whose rows are `ld`
/// apart (a column block of a wider matrix).
pub(crate) fn matmul_to(
    dst: &mut [f32],
    ld: usize,
    accumulate: bool,
    a: View<'_>,
    b: View<'_>,
    threads: usize,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "inner dimensions differ");
    a.check();
    b.check();
    if m == 0 || n == 0 {
        return;
    }
    assert!(ld >= n && (m - 1) * ld + n <= dst.len(), "destination is not {m} x {n} with rows {ld} apart");
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(ld).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    // The columns of `dst` are split, except for a weight's gradient (a long inner
    // dimension, the batch, and more rows than columns), whose rows are: measured on
    // the reference GPT at two threads, 21.3k tokens/s against 18.7k splitting
    // columns, and 18.7k splitting rows of every product with more rows than columns.
    // A product of many rows (a GPT's linear layers over all its tokens) is left to
    // `gemm`'s own split, which packs each operand once: 3.5% less wall time for the
    // reference GPT at two threads (farm-bench, medians of 5), while on the MLP's
    // 256-row products it lost to the column split (30.2k against 33.8k samples/s).
    let by_rows = m > n && k > m;
    let long = if by_rows { m } else { n };
    let parts = if m * n * k >= MIN_SPLIT_WORK { threads.min(long / MIN_SPLIT_COLUMNS).max(1) } else { 1 };
    let dst = SendPtr(dst.as_mut_ptr());
    // SAFETY: every view was checked to lie inside its slice, `dst` holds m rows of
    // n columns `ld` apart and is uniquely borrowed, so no input aliases it; each part
    // writes only its own block `rows x cols` of `dst`, reading the same rows of `a`
    // and columns of `b`.
    let part = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>, parallelism: Parallelism| unsafe {
        gemm::gemm(
            rows.len(),
            cols.len(),
            k,
            dst.get().add(rows.start * ld + cols.start),
            1,
            ld as isize,
            accumulate,
            a.data.as_ptr().add(rows.start * a.rs),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(cols.start * b.cs),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    };
    if parts > 1 && !by_rows && m >= GEMM_SPLIT_ROWS {
        part(0..m, 0..n, Parallelism::Rayon(parts));
    } else if parts == 1 {
        part(0..m, 0..n, Parallelism::None);
    } else {
        rayon::scope(|s| {
            for p in 0..parts {
                let share = sheaf_core::chunk_range(long, parts, p);
                if by_rows {
                    s.spawn(move |_| part(share, 0..n, Parallelism::None));
                } else {
                    s.spawn(move |_| part(0..m, share, Parallelism::None));
                }
            }
        });
    }
}

/// Products with at least this many rows are split by `gemm` itself.
const GEMM_SPLIT_ROWS: usize = 1024;

/// Products smaller than this run on one thread.
const MIN_SPLIT_WORK: usize = 64 * 64 * 64;
/// Rows or columns each thread gets at least.
const MIN_SPLIT_COLUMNS: usize = 32;

/// A destination pointer the threads of one product share (each writes its own columns).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the threads sharing one write disjoint elements, and `matmul` waits for all.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `f` over equal pieces of `dst` and `src` (as long as `dst`), one piece per thread.
pub(crate) fn elementwise(
    dst: &mut [f32],
    src: &[f32],
    threads: usize,
    f: impl Fn(&mut [f32], &[f32]) + Sync,
) {
    use rayon::prelude::*;
    if threads > 1 {
        let chunk = dst.len().div_ceil(threads).max(1);
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| f(d, s));
    } else {
        f(dst, src);
    }
}

/// `f` over equal pieces of `dst`, one piece per thread.
pub(crate) fn elementwise_in_place(dst: &mut [f32], threads: usize, f: impl Fn(&mut [f32]) + Sync) {
    use rayon::prelude::*;
    if threads > 1 {
        let chunk = dst.len().div_ceil(threads).max(1);
        dst.par_chunks_mut(chunk).for_each(&f);
    } else {
        f(dst);
    }
}

/// Every row of `dst` (rows of `bias.len()`) set to `bias`, over the threads.
pub(crate) fn fill_rows(dst: &mut [f32], bias: &[f32], threads: usize) {
    use rayon::prelude::*;
    if bias.is_empty() {
        return;
    }
    let fill = |rows: &mut [f32]| rows.chunks_exact_mut(bias.len()).for_each(|row| row.copy_from_slice(bias));
    let rows = dst.len() / bias.len();
    if threads > 1 && rows > 1 {
        dst.par_chunks_mut(rows_per_thread(rows, threads) * bias.len()).for_each(fill);
    } else {
        fill(dst);
    }
}

/// Rows in one piece of a sum over rows. Each piece's partial sum is taken on its own
/// and the partials are added in order, so a result does not depend on how many
/// threads took the pieces.
const SUM_ROWS: usize = 64;

/// Column sums of row-major `src` (rows of `out.len()`) into `out`.
pub(crate) fn column_sums(src: &[f32], out: &mut [f32], accumulate: bool, threads: usize) {
    let c = out.len();
    if !accumulate {
        out.fill(0.0);
    }
    if c == 0 {
        return;
    }
    let piece = |rows: &[f32]| {
        let mut part = vec![0f32; c];
        for row in rows.chunks_exact(c) {
            part.iter_mut().zip(row).for_each(|(o, v)| *o += v);
        }
        part
    };
    let parts: Vec<Vec<f32>> = if threads > 1 {
        use rayon::prelude::*;
        src.par_chunks(SUM_ROWS * c).map(piece).collect()
    } else {
        src.chunks(SUM_ROWS * c).map(piece).collect()
    };
    for part in parts {
        out.iter_mut().zip(part).for_each(|(o, v)| *o += v);
    }
}

/// Rows each thread takes when `rows` are split among `threads`.
pub(crate) fn rows_per_thread(rows: usize, threads: usize) -> usize {
    rows.div_ceil(threads.max(1)).max(1)
}

/// Softmax cross-entropy of row-major `logits` (rows of `classes`) against `labels`:
/// the summed loss, the correct predictions (the first maximum, as argmax), and, when
/// `grad` is given, `scale` times the gradient of the sum with respect to the logits.
/// Rows are taken in pieces of [`SUM_ROWS`] among the threads and the pieces' sums
/// added in order, so the result does not depend on the thread count.
pub(crate) fn cross_entropy(
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    scale: f32,
    grad: Option<&mut [f32]>,
    threads: usize,
) -> (f64, usize) {
    use rayon::prelude::*;
    if classes == 0 {
        return (0.0, 0);
    }
    let len = SUM_ROWS * classes;
    let parts: Vec<(f64, usize)> = match grad {
        Some(grad) if threads > 1 => logits
            .par_chunks(len)
            .zip(labels.par_chunks(SUM_ROWS).zip(grad.par_chunks_mut(len)))
            .map(|(z, (l, g))| cross_entropy_rows(z, l, classes, scale, Some(g)))
            .collect(),
        Some(grad) => logits
            .chunks(len)
            .zip(labels.chunks(SUM_ROWS).zip(grad.chunks_mut(len)))
            .map(|(z, (l, g))| cross_entropy_rows(z, l, classes, scale, Some(g)))
            .collect(),
        None if threads > 1 => logits
            .par_chunks(len)
            .zip(labels.par_chunks(SUM_ROWS))
            .map(|(z, l)| cross_entropy_rows(z, l, classes, scale, None))
            .collect(),
        None => logits
            .chunks(len)
            .zip(labels.chunks(SUM_ROWS))
            .map(|(z, l)| cross_entropy_rows(z, l, classes, scale, None))
            .collect(),
    };
    parts.into_iter().fold((0.0, 0), |(l, c), (pl, pc)| (l + pl, c + pc))
}

/// [`cross_entropy`] of one piece of rows.
#[multiversion::multiversion(targets = "simd")]
fn cross_entropy_rows(
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    scale: f32,
    mut grad: Option<&mut [f32]>,
) -> (f64, usize) {
    let (mut loss, mut correct) = (0f64, 0usize);
    for (i, (z, &label)) in logits.chunks_exact(classes).zip(labels).enumerate() {
        let (mut best, mut max) = (0, f32::NEG_INFINITY);
        for (j, &v) in z.iter().enumerate() {
            if v > max {
                (best, max) = (j, v);
            }
        }
        correct += usize::from(best == label as usize);
        // In lanes: one running f32 sum over a vocabulary of 50,000 terms, most far
        // below its last place, loses about 7e-5 of the loss (measured on a GPT-2
        // vocabulary against f64); sixteen running sums lose about 2e-8, and vectorise.
        let sum = lane_sum(z, z, |v, _| exp(v - max));
        let lse = max + sum.ln();
        loss += f64::from(lse - z[label as usize]);
        if let Some(g) = grad.as_deref_mut() {
            let g = &mut g[i * classes..(i + 1) * classes];
            for (d, v) in g.iter_mut().zip(z) {
                *d = exp(v - lse) * scale;
            }
            g[label as usize] -= scale;
        }
    }
    (loss, correct)
}

/// `e^x` in f32, branch-free so that loops over slices vectorise (libm's `expf` is a
/// call per value): Cephes' `expf`, `2^k e^r` with `|r| <= ln 2 / 2` and a degree-7
/// polynomial for `e^r`. Within 2 ulp of `f32::exp` on the normal range (tested);
/// below about -87.3 it gives about 1e-38 rather than 0 or a subnormal.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    // Rounded to the nearest integer by adding and taking away 1.5 * 2^23 (no call
    // to `roundf`, which the baseline x86-64 target lacks an instruction for); while
    // added, the low bits of the sum are `k` itself, from which 2^k is built without
    // a float-to-int conversion (Rust's saturating `as` does not vectorise).
    const ROUND: f32 = 12_582_912.0;
    let rounded = x * std::f32::consts::LOG2_E + ROUND;
    let k = rounded - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(rounded.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23)
}

/// The error function in f32, branch-free (see [`exp`]): the rational approximation
/// Eigen and XLA use, exact to a few ulp (tested against libm's `erff`); +-1 beyond
/// +-3.83, where erf is within an ulp of +-1.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-3.832_507, 3.832_507);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_6e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_474e-2;
    x * p / q
}

#[cfg(test)]
mod fast_math_tests {
    /// Over a GPT-2-sized vocabulary (50,304 logits, most far below the largest, as a
    /// trained model's), the cross-entropy is the f64 definition's to within 1e-6 per
    /// row: no bias from summing the exponentials in one running f32.
    #[test]
    fn cross_entropy_over_a_large_vocabulary_is_unbiased() {
        let (classes, rows) = (50_304, 8);
        let mut rng = sheaf_core::SplitMix64::new(3);
        let logits: Vec<f32> = (0..classes * rows).map(|_| 6.0 * rng.next_f32() - 2.0).collect();
        let labels: Vec<u32> = (0..rows as u32).map(|r| r * 997).collect();
        let (loss, _) = super::cross_entropy(&logits, &labels, classes, 0.0, None, 1);
        let want: f64 = logits
            .chunks_exact(classes)
            .zip(&labels)
            .map(|(z, &l)| {
                let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
                max + z.iter().map(|&v| (f64::from(v) - max).exp()).sum::<f64>().ln()
                    - f64::from(z[l as usize])
            })
            .sum();
        assert!(
            (loss - want).abs() < 1e-6 * rows as f64,
            "{loss} vs {want}: {}",
            (loss - want) / rows as f64
        );
    }

    #[test]
    fn exp_is_within_2_ulp_of_std() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (super::exp(x), x.exp());
            worst = worst.max((a - b).abs() / (b * f32::EPSILON));
            x += 0.0137;
        }
        assert!(worst <= 2.0, "worst {worst} ulp");
        assert_eq!(super::exp(0.0), 1.0);
        assert!(super::exp(-1000.0) < 1e-37 && super::exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn erf_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        let mut x = -6.0f32;
        while x < 6.0 {
            let (a, b) = (super::erf(x), candle_core::cpu::erf::erf_f32(x));
            worst = worst.max((a - b).abs());
            x += 0.000_97;
        }
        assert!(worst <= 4.0 * f32::EPSILON, "worst absolute error {worst}");
        assert_eq!(super::erf(0.0), 0.0);
        assert!(
            (super::erf(10.0) - 1.0).abs() <= f32::EPSILON && (super::erf(-10.0) + 1.0).abs() <= f32::EPSILON
        );
    }
}

/// Lanes of the sums and maxima below: sixteen running values side by side, which
/// vectorise (a single running value is a chain the compiler must keep in order).
const LANES: usize = 16;

/// `f(a[i], b[i])` summed, in [`LANES`] running sums added at the end.
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for j in 0..LANES {
            acc[j] += f(x[j], y[j]);
        }
    }
    for (j, (x, y)) in ar.iter().zip(br).enumerate() {
        acc[j] += f(*x, *y);
    }
    acc.iter().sum()
}

/// The sum of `a`.
#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    lane_sum(a, a, |x, _| x)
}

/// The dot product of `a` and `b` (as long as the shorter).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    lane_sum(a, b, |x, y| x * y)
}

/// The sum of `(a[i] - c)^2`.
#[inline(always)]
pub(crate) fn sum_sq_dev(a: &[f32], c: f32) -> f32 {
    lane_sum(a, a, |x, _| (x - c) * (x - c))
}

/// The largest value of `a` (negative infinity for none; NaNs are passed over).
#[inline(always)]
pub(crate) fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder();
    for x in chunks {
        for j in 0..LANES {
            acc[j] = if x[j] > acc[j] { x[j] } else { acc[j] };
        }
    }
    for (j, &x) in rest.iter().enumerate() {
        acc[j] = if x > acc[j] { x } else { acc[j] };
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

#[cfg(test)]
mod matmul_tests {
    use super::{matmul_to, View, GEMM_SPLIT_ROWS};

    /// A product of many rows, which `gemm` splits itself, into a column block,
    /// transposed or not, equals its definition.
    #[test]
    fn a_product_of_many_rows_equals_its_definition() {
        let (m, k, n, ld) = (GEMM_SPLIT_ROWS + 77, 20, 70, 73);
        let value = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 25.0;
        let a_data: Vec<f32> = (0..m * k).map(value).collect();
        let b_data: Vec<f32> = (0..n * k).map(|i| value(i + 5)).collect();
        for (threads, accumulate) in [(2, false), (3, true)] {
            let before: Vec<f32> = (0..m * ld).map(|i| value(i + 1)).collect();
            let mut dst = before.clone();
            let b = View::rows(&b_data, n, k).t();
            matmul_to(&mut dst, ld, accumulate, View::rows(&a_data, m, k), b, threads);
            for i in 0..m {
                for j in 0..ld {
                    let got = dst[i * ld + j];
                    if j >= n {
                        assert_eq!(got, before[i * ld + j]);
                        continue;
                    }
                    let sum: f64 =
                        (0..k).map(|p| f64::from(a_data[i * k + p]) * f64::from(b_data[j * k + p])).sum();
                    let want = sum + if accumulate { f64::from(before[i * ld + j]) } else { 0.0 };
                    assert!(
                        (f64::from(got) - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// Any product, split among any number of threads (by rows or by columns,
        /// sizes above and below the split threshold), into a column block of a wider
        /// destination, from plain or transposed operands, equals its definition; the
        /// destination's other columns are left alone.
        #[test]
        fn matmul_equals_its_definition(
            m in 1usize..130,
            k in 0usize..130,
            n in 1usize..130,
            pad in 0usize..3,
            a_t in proptest::bool::ANY,
            b_t in proptest::bool::ANY,
            accumulate in proptest::bool::ANY,
            threads in 1usize..4,
        ) {
            let value = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 25.0;
            let a_data: Vec<f32> = (0..m * k).map(value).collect();
            let b_data: Vec<f32> = (0..k * n).map(|i| value(i + 7)).collect();
            // a as stored row-major m x k, or its transpose stored k x m.
            let a = if a_t { View::rows(&a_data, k, m).t() } else { View::rows(&a_data, m, k) };
            let b = if b_t { View::rows(&b_data, n, k).t() } else { View::rows(&b_data, k, n) };
            let at = |i: usize, p: usize| if a_t { a_data[p * m + i] } else { a_data[i * k + p] };
            let bt = |p: usize, j: usize| if b_t { b_data[j * k + p] } else { b_data[p * n + j] };
            let ld = n + pad;
            let before: Vec<f32> = (0..m * ld).map(|i| value(i + 3)).collect();
            let mut dst = before.clone();
            matmul_to(&mut dst, ld, accumulate, a, b, threads);
            for i in 0..m {
                for j in 0..ld {
                    let got = dst[i * ld + j];
                    if j >= n {
                        proptest::prop_assert_eq!(got, before[i * ld + j]);
                        continue;
                    }
                    let sum: f64 = (0..k).map(|p| f64::from(at(i, p)) * f64::from(bt(p, j))).sum();
                    let want = sum + if accumulate { f64::from(before[i * ld + j]) } else { 0.0 };
                    proptest::prop_assert!((f64::from(got) - want).abs() <= 1e-4 * (1.0 + want.abs()), "({i}, {j}): {got} vs {want}");
                }
            }
        }
    }
}
