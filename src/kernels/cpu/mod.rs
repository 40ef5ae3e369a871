//! The CPU implementations of expanse's kernels (f32 / bf16 / f16, f32 arithmetic, rounded once per
//! output value unless a kernel says otherwise). They serve CPU inference and are the references the
//! CUDA and Metal kernels are tested against.

mod attention;
mod block_matmul;
mod exp;
mod gemm;
mod gemv;
mod prompt_attention;
mod rms_norm;
mod softmax;
mod swiglu;

pub(crate) use attention::decode_attention;
pub use gemm::gemm;
pub use gemv::gemv;
pub use prompt_attention::prompt_attention;
pub use rms_norm::rms_norm;
pub use softmax::softmax_last_dim;
pub use swiglu::swiglu;

use super::{add_rms_norm_dims, add_rms_norm_out_shape, contiguous_range};
use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Shape, Tensor};
use std::ops::Range;
use half::{bf16, f16};
use rayon::prelude::*;

/// Storage element: exact widening to f32, round-to-nearest-even narrowing.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// `v` rounded to this type and widened back.
    #[inline(always)]
    fn round_f32(v: f32) -> f32 {
        Self::from_f32(v).to_f32()
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        if v.is_nan() {
            return bf16::from_f32(v);
        }
        bf16::from_bits((bf16_round_bits(v) >> 16) as u16)
    }
    #[inline(always)]
    fn round_f32(v: f32) -> f32 {
        if v.is_nan() {
            v
        } else {
            f32::from_bits(bf16_round_bits(v))
        }
    }
}

/// The bits of non-NaN `v` rounded to bf16 (round to nearest, ties to even), low half zero: half's
/// `bf16::from_f32` arithmetic without its branches, so that loops over it vectorise.
#[inline(always)]
fn bf16_round_bits(v: f32) -> u32 {
    let b = v.to_bits();
    b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Work (elements) below which the CPU kernels stay single-threaded.
pub(crate) const PAR_THRESHOLD: usize = 1 << 15;

#[inline(always)]
pub(crate) fn silu_f32(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

macro_rules! dispatch {
    ($op:literal, ($($s:expr),+), |$($v:ident),+| $body:expr) => {
        match ($($s,)+) {
            ($(CpuStorage::F32($v),)+) => CpuStorage::F32($body),
            ($(CpuStorage::BF16($v),)+) => CpuStorage::BF16($body),
            ($(CpuStorage::F16($v),)+) => CpuStorage::F16($body),
            _ => bail!(concat!($op, ": unsupported or mismatched dtypes (f32, bf16, f16)")),
        }
    };
}
pub(crate) use dispatch;

// ---------------------------------------------------------------------------

pub(crate) fn silu_mul(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let (a0, a1) = contiguous_range("silu_mul", "gate", l1)?;
    let (b0, b1) = contiguous_range("silu_mul", "up", l2)?;
    if a1 - a0 != b1 - b0 {
        bail!("silu_mul: element count mismatch");
    }
    fn inner<T: Elem>(g: &[T], u: &[T]) -> Vec<T> {
        let f = |(&g, &u): (&T, &T)| T::from_f32(silu_f32(g.to_f32()) * u.to_f32());
        if g.len() >= PAR_THRESHOLD {
            g.par_iter().zip(u.par_iter()).map(f).collect()
        } else {
            g.iter().zip(u.iter()).map(f).collect()
        }
    }
    let out = dispatch!("silu_mul", (s1, s2), |g, u| inner(&g[a0..a1], &u[b0..b1]));
    Ok((out, l1.shape().clone()))
}

// ---------------------------------------------------------------------------

pub(crate) fn add_rms_norm(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
    eps: f32,
) -> Result<(CpuStorage, Shape)> {
    let (rows, cols) = add_rms_norm_dims(l1, l2, l3)?;
    let (x0, x1) = contiguous_range("add_rms_norm", "x", l1)?;
    let (r0, r1) = contiguous_range("add_rms_norm", "residual", l2)?;
    let (w0, w1) = contiguous_range("add_rms_norm", "weight", l3)?;

    fn row<T: Elem>(x: &[T], r: &[T], w: &[T], sum: &mut [T], normed: &mut [T], eps: f32) {
        let mut ss = 0f32;
        for ((s, &x), &r) in sum.iter_mut().zip(x).zip(r) {
            *s = T::from_f32(x.to_f32() + r.to_f32());
            let sf = s.to_f32();
            ss += sf * sf;
        }
        let inv_rms = 1.0 / (ss / x.len() as f32 + eps).sqrt();
        for ((n, &s), &w) in normed.iter_mut().zip(sum.iter()).zip(w) {
            *n = T::from_f32(s.to_f32() * inv_rms * w.to_f32());
        }
    }
    fn inner<T: Elem>(x: &[T], r: &[T], w: &[T], rows: usize, cols: usize, eps: f32) -> Vec<T> {
        let n = rows * cols;
        let mut out = vec![T::from_f32(0.0); 2 * n];
        let (sum, normed) = out.split_at_mut(n);
        if n >= PAR_THRESHOLD && rows > 1 {
            sum.par_chunks_mut(cols)
                .zip(normed.par_chunks_mut(cols))
                .zip(x.par_chunks(cols).zip(r.par_chunks(cols)))
                .for_each(|((s, nm), (x, r))| row(x, r, w, s, nm, eps));
        } else {
            for (((s, nm), x), r) in sum
                .chunks_mut(cols)
                .zip(normed.chunks_mut(cols))
                .zip(x.chunks(cols))
                .zip(r.chunks(cols))
            {
                row(x, r, w, s, nm, eps);
            }
        }
        out
    }
    let out = dispatch!("add_rms_norm", (s1, s2, s3), |x, r, w| inner(
        &x[x0..x1],
        &r[r0..r1],
        &w[w0..w1],
        rows,
        cols,
        eps
    ));
    Ok((out, add_rms_norm_out_shape(l1)))
}

/// Rows of `x` when `x` `[rows, in]` times `w` `[out, in]`ᵀ is a product the CPU GEMV/GEMM take:
/// on the CPU, one dtype (f32 or bf16), `w` contiguous.
pub(crate) fn linear_rows(x: &Tensor, w: &Tensor) -> Option<usize> {
    let ok = matches!(x.device(), Device::Cpu)
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && x.rank() == 2
        && w.rank() == 2
        && x.dim(1).ok() == w.dim(1).ok()
        && w.is_contiguous();
    ok.then(|| x.dims()[0])
}

/// `(x range, w range, rows, out, in)` of a contiguous `x` `[rows, in]` and `w` `[out, in]` in
/// their storages, or an error naming `op`.
pub(crate) fn linear_operands(op: &str, lx: &Layout, lw: &Layout) -> Result<(Range<usize>, Range<usize>, usize, usize, usize)> {
    let (Some((x0, x1)), Some((w0, w1))) = (lx.contiguous_offsets(), lw.contiguous_offsets()) else {
        bail!("{op}: inputs must be contiguous");
    };
    let (m, k) = lx.shape().dims2()?;
    let (n, kw) = lw.shape().dims2()?;
    if kw != k || x1 - x0 != m * k || w1 - w0 != n * k {
        bail!("{op}: x {:?} does not match w {:?}", lx.dims(), lw.dims());
    }
    Ok((x0..x1, w0..w1, m, n, k))
}

/// Whether this CPU has AVX2 (run-time check; false off x86-64).
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AVX2 and FMA (what the explicit GEMV loops need).
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2() && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// The branch-free bf16 rounding against half's, on random bit patterns and the edges.
    #[test]
    fn bf16_rounding_matches_half() {
        let mut rng = crate::kernels::tests::rng("bf16_rounding_matches_half");
        let mut xs: Vec<f32> = (0..1_000_000).map(|_| f32::from_bits(rng.random())).collect();
        xs.extend([0.0, -0.0, f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE, 1.0 + f32::EPSILON]);
        xs.extend([f32::from_bits(0x3F80_8000), f32::from_bits(0x3F81_8000), f32::from_bits(0x7F7F_FFFF), f32::NAN]);
        for x in xs {
            let (want, got) = (bf16::from_f32(x), <bf16 as Elem>::from_f32(x));
            assert!(want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()), "{x:e} ({:#x}): {got} vs {want}", x.to_bits());
            let r = <bf16 as Elem>::round_f32(x);
            assert!(r.to_bits() == want.to_f32().to_bits() || (r.is_nan() && x.is_nan()), "round {x:e}: {r} vs {want}");
        }
    }
}
