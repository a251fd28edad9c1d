//! Reduction kernels: combine one buffer of elements into another.
//!
//! Buffers are bytes; when they are aligned for the element type (the usual case: they
//! come from a `Vec<f32>`) the kernel runs over typed slices the compiler vectorises,
//! otherwise it falls back to unaligned loads.

use bytemuck::Pod;
use half::{bf16, f16};
use sheaf_core::{DType, ReduceOp};

trait Elem: Pod {
    fn combine(self, other: Self, op: ReduceOp) -> Self;
    fn scale(self, by: f64) -> Self;
}

macro_rules! float_elem {
    ($t:ty) => {
        impl Elem for $t {
            #[inline(always)]
            fn combine(self, other: Self, op: ReduceOp) -> Self {
                // Max and min are IEEE 754-2019 `maximum`/`minimum`: a NaN wins, and
                // +0 is above -0. Unlike `f32::max` (which drops NaNs and may return
                // either zero), that is commutative and associative bit for bit, so
                // every algorithm's reduction order gives the same bits.
                match op {
                    ReduceOp::Max | ReduceOp::Min if self.is_nan() || other.is_nan() => <$t>::NAN,
                    ReduceOp::Max if self == other => <$t>::from_bits(self.to_bits() & other.to_bits()),
                    ReduceOp::Min if self == other => <$t>::from_bits(self.to_bits() | other.to_bits()),
                    ReduceOp::Max => {
                        if self > other {
                            self
                        } else {
                            other
                        }
                    }
                    ReduceOp::Min => {
                        if self < other {
                            self
                        } else {
                            other
                        }
                    }
                    // Avg sums here and is divided once at the end.
                    _ => self + other,
                }
            }
            #[inline(always)]
            fn scale(self, by: f64) -> Self {
                (f64::from(self) * by) as $t
            }
        }
    };
}
float_elem!(f32);
float_elem!(f64);

macro_rules! half_elem {
    ($t:ty) => {
        impl Elem for $t {
            #[inline(always)]
            fn combine(self, other: Self, op: ReduceOp) -> Self {
                <$t>::from_f32(self.to_f32().combine(other.to_f32(), op))
            }
            #[inline(always)]
            fn scale(self, by: f64) -> Self {
                <$t>::from_f64(self.to_f64() * by)
            }
        }
    };
}
half_elem!(f16);

/// bf16 is the top half of an f32, so widening is a shift; narrowing rounds to nearest
/// even and keeps NaNs quiet, exactly as `half::bf16::from_f32` does, but branch-free
/// so the loops vectorise.
#[inline(always)]
fn bf16_to_f32(x: bf16) -> f32 {
    f32::from_bits(u32::from(x.to_bits()) << 16)
}

#[inline(always)]
fn f32_to_bf16(x: f32) -> bf16 {
    let b = x.to_bits();
    let rounded = ((b.wrapping_add(0x7FFF + ((b >> 16) & 1))) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x40;
    bf16::from_bits(if (b & 0x7FFF_FFFF) > 0x7F80_0000 { nan } else { rounded })
}

impl Elem for bf16 {
    #[inline(always)]
    fn combine(self, other: Self, op: ReduceOp) -> Self {
        f32_to_bf16(bf16_to_f32(self).combine(bf16_to_f32(other), op))
    }
    #[inline(always)]
    fn scale(self, by: f64) -> Self {
        bf16::from_f64(self.to_f64() * by)
    }
}

fn combine_typed<T: Elem>(acc: &mut [u8], src: &[u8], op: ReduceOp) {
    match (bytemuck::try_cast_slice_mut::<u8, T>(acc), bytemuck::try_cast_slice::<u8, T>(src)) {
        (Ok(a), Ok(s)) => match op {
            // Spelled out per op so each loop is a straight-line vectorisable body.
            ReduceOp::Sum | ReduceOp::Avg => {
                a.iter_mut().zip(s).for_each(|(x, y)| *x = x.combine(*y, ReduceOp::Sum))
            }
            ReduceOp::Max => a.iter_mut().zip(s).for_each(|(x, y)| *x = x.combine(*y, ReduceOp::Max)),
            _ => a.iter_mut().zip(s).for_each(|(x, y)| *x = x.combine(*y, op)),
        },
        _ => {
            let n = std::mem::size_of::<T>();
            for (x, y) in acc.chunks_exact_mut(n).zip(src.chunks_exact(n)) {
                let v = bytemuck::pod_read_unaligned::<T>(x).combine(bytemuck::pod_read_unaligned(y), op);
                x.copy_from_slice(bytemuck::bytes_of(&v));
            }
        }
    }
}

fn scale_typed<T: Elem>(buf: &mut [u8], by: f64) {
    match bytemuck::try_cast_slice_mut::<u8, T>(buf) {
        Ok(b) => b.iter_mut().for_each(|x| *x = x.scale(by)),
        Err(_) => {
            let n = std::mem::size_of::<T>();
            for x in buf.chunks_exact_mut(n) {
                let v = bytemuck::pod_read_unaligned::<T>(x).scale(by);
                x.copy_from_slice(bytemuck::bytes_of(&v));
            }
        }
    }
}

/// What a receive into a buffer does with the bytes that arrive (`Link::recv_into`):
/// reduce them into `dst` when `reduce` is given, else copy them over it.
pub fn copy_or_combine(dst: &mut [u8], src: &[u8], reduce: Option<(DType, ReduceOp)>) {
    match reduce {
        Some((dtype, op)) => combine(dst, src, dtype, op),
        None => dst.copy_from_slice(src),
    }
}

/// `acc[i] = op(acc[i], src[i])` for every element. `Avg` sums; finish it with
/// [`finish_avg`]. Lengths must be equal and whole elements.
pub fn combine(acc: &mut [u8], src: &[u8], dtype: DType, op: ReduceOp) {
    debug_assert_eq!(acc.len(), src.len());
    match dtype {
        DType::F32 => combine_typed::<f32>(acc, src, op),
        DType::F64 => combine_typed::<f64>(acc, src, op),
        DType::BF16 => combine_typed::<bf16>(acc, src, op),
        DType::F16 => combine_typed::<f16>(acc, src, op),
        other => unreachable!("dtype {other} has no reduction kernel"),
    }
}

/// Turn a sum over `world` ranks into the average, when `op` is `Avg`.
pub fn finish_avg(buf: &mut [u8], dtype: DType, op: ReduceOp, world: usize) {
    if op != ReduceOp::Avg || world == 1 {
        return;
    }
    let by = 1.0 / world as f64;
    match dtype {
        DType::F32 => scale_typed::<f32>(buf, by),
        DType::F64 => scale_typed::<f64>(buf, by),
        DType::BF16 => scale_typed::<bf16>(buf, by),
        DType::F16 => scale_typed::<f16>(buf, by),
        other => unreachable!("dtype {other} has no reduction kernel"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_and_aligned_agree() {
        let a: Vec<f32> = (0..33).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..33).map(|i| 10.0 - i as f32).collect();
        for op in ReduceOp::ALL {
            let mut aligned = bytemuck::cast_slice::<f32, u8>(&a).to_vec();
            combine(&mut aligned, bytemuck::cast_slice(&b), DType::F32, op);
            // Same bytes shifted by one so the f32 view is misaligned.
            let mut shifted = vec![0u8; aligned.len() + 1];
            shifted[1..].copy_from_slice(bytemuck::cast_slice(&a));
            let mut src = vec![0u8; aligned.len() + 1];
            src[1..].copy_from_slice(bytemuck::cast_slice(&b));
            combine(&mut shifted[1..], &src[1..], DType::F32, op);
            assert_eq!(&shifted[1..], &aligned[..], "{op}");
        }
    }

    /// The branch-free bf16 conversions round exactly as the `half` crate's.
    #[test]
    fn bf16_conversions_match_half() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let mut g = 0x9E37_79B9u32;
        let samples = (0..200_000).map(|_| {
            g ^= g << 13;
            g ^= g >> 17;
            g ^= g << 5;
            f32::from_bits(g)
        });
        for x in specials.into_iter().chain(samples) {
            let (ours, theirs) = (f32_to_bf16(x), bf16::from_f32(x));
            if x.is_nan() {
                assert!(ours.is_nan(), "{x:?}");
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{x:?}");
            }
            assert_eq!(bf16_to_f32(theirs).to_bits(), theirs.to_f32().to_bits());
        }
    }

    #[test]
    fn avg_divides_once() {
        let mut buf = bytemuck::cast_slice::<f32, u8>(&[6.0f32, 9.0]).to_vec();
        finish_avg(&mut buf, DType::F32, ReduceOp::Avg, 3);
        assert_eq!(bytemuck::cast_slice::<u8, f32>(&buf), &[2.0, 3.0]);
    }
}

#[cfg(test)]
mod rounding_and_signed_zero {
    use super::*;

    /// Ties round to even: exactly half an ulp of bf16 above an even mantissa rounds
    /// down, above an odd one rounds up (as `half` does).
    #[test]
    fn bf16_ties_round_to_even() {
        for upper in [0x3F80u32, 0x3F81, 0x4000, 0x4001, 0xBF80, 0xBF81, 0x0001, 0x7F7E] {
            let x = f32::from_bits((upper << 16) | 0x8000);
            let want = if upper & 1 == 0 { upper } else { upper + 1 } as u16;
            assert_eq!(f32_to_bf16(x).to_bits(), want, "{x:?} ({:#x})", x.to_bits());
            assert_eq!(bf16::from_f32(x).to_bits(), want);
            // Just below and just above the tie.
            let below = f32::from_bits((upper << 16) | 0x7FFF);
            let above = f32::from_bits((upper << 16) | 0x8001);
            assert_eq!(f32_to_bf16(below).to_bits(), upper as u16);
            assert_eq!(f32_to_bf16(above).to_bits(), upper as u16 + 1);
        }
    }

    fn reduce2<T: bytemuck::Pod>(a: T, b: T, dtype: DType, op: ReduceOp) -> T {
        let mut acc = bytemuck::bytes_of(&a).to_vec();
        combine(&mut acc, bytemuck::bytes_of(&b), dtype, op);
        bytemuck::pod_read_unaligned(&acc)
    }

    /// Max and min follow IEEE 754-2019 `maximum`/`minimum` in every float type:
    /// +0 is above -0 whichever comes first, and a NaN wins.
    #[test]
    fn max_min_order_signed_zeros_and_propagate_nan() {
        for (a, b) in [(0.0f64, -0.0f64), (-0.0, 0.0)] {
            let bits = |v: f64| v.to_bits();
            assert_eq!(bits(reduce2(a, b, DType::F64, ReduceOp::Max)), bits(0.0));
            assert_eq!(bits(reduce2(a, b, DType::F64, ReduceOp::Min)), bits(-0.0));
            let (fa, fb) = (a as f32, b as f32);
            assert_eq!(reduce2(fa, fb, DType::F32, ReduceOp::Max).to_bits(), 0.0f32.to_bits());
            assert_eq!(reduce2(fa, fb, DType::F32, ReduceOp::Min).to_bits(), (-0.0f32).to_bits());
            let (ha, hb) = (half::f16::from_f64(a), half::f16::from_f64(b));
            assert_eq!(
                reduce2(ha, hb, DType::F16, ReduceOp::Max).to_bits(),
                half::f16::from_f64(0.0).to_bits()
            );
            assert_eq!(
                reduce2(ha, hb, DType::F16, ReduceOp::Min).to_bits(),
                half::f16::from_f64(-0.0).to_bits()
            );
            let (ba, bb) = (bf16::from_f64(a), bf16::from_f64(b));
            assert_eq!(reduce2(ba, bb, DType::BF16, ReduceOp::Max).to_bits(), bf16::from_f64(0.0).to_bits());
            assert_eq!(reduce2(ba, bb, DType::BF16, ReduceOp::Min).to_bits(), bf16::from_f64(-0.0).to_bits());
        }
        for op in [ReduceOp::Max, ReduceOp::Min] {
            assert!(reduce2(f32::NAN, 1.0f32, DType::F32, op).is_nan());
            assert!(reduce2(1.0f32, f32::NAN, DType::F32, op).is_nan());
            assert!(reduce2(f64::NAN, -1.0f64, DType::F64, op).is_nan());
        }
    }
}
