//! The CPU implementations of expanse's kernels (f32 / bf16 / f16, f32 arithmetic, rounded once per
//! output value unless a kernel says otherwise). They serve CPU inference and are the references the
//! CUDA and Metal kernels are tested against.

mod add;
mod argmax;
mod attention;
mod block_matmul;
mod exp;
mod gemm;
mod gemm_bf16;
mod gemv;
mod gemv_batch;
mod norm;
mod prompt_attention;
mod random;
mod rope;
mod silu_mul;
mod softmax;
mod swiglu;
pub mod tier;

pub use add::add;
pub(crate) use argmax::argmax;
pub(crate) use attention::{attention_combine, attention_into, attention_partial, decode_attention};
pub use gemm::gemm;
pub use gemv::gemv;
pub(crate) use gemv::{gemv_rows, DotElem};
pub use gemv_batch::gemv_batch;
pub(crate) use norm::residual_rms_norm;
pub use norm::rms_norm;
pub use prompt_attention::prompt_attention;
#[cfg(test)]
pub(crate) use random::normal;
pub(crate) use random::{fill_normal, mix64};
pub use rope::rope_heads;
#[cfg(test)]
pub(crate) use rope::rope_kv;
pub(crate) use rope::{rope_qk, write_cache_rows, RopeDims};
pub(crate) use silu_mul::silu_mul;
pub use softmax::softmax_last_dim;
pub use swiglu::swiglu;

use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Tensor};
use half::{bf16, f16};
use std::ops::Range;

/// Storage element: exact widening to f32, round-to-nearest-even narrowing.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// `v` rounded to this type and widened back.
    #[inline(always)]
    fn round_f32(v: f32) -> f32 {
        Self::from_f32(v).to_f32()
    }
    /// The elements of a CPU storage of this dtype (None for another dtype).
    fn slice_of(s: &CpuStorage) -> Option<&[Self]>;
    fn slice_of_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! storage_access {
    ($variant:ident) => {
        #[inline(always)]
        fn slice_of(s: &CpuStorage) -> Option<&[Self]> {
            match s {
                CpuStorage::$variant(v) => Some(v),
                _ => None,
            }
        }
        #[inline(always)]
        fn slice_of_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
            match s {
                CpuStorage::$variant(v) => Some(v),
                _ => None,
            }
        }
    };
}

impl Elem for f32 {
    storage_access!(F32);
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
    storage_access!(BF16);
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the upper half of an f32: widening is a shift (exact), which vectorises.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        // A select, not an early return, so loops over it vectorise; NaN stays NaN (quietened), as
        // half's `bf16::from_f32` makes it.
        let b = v.to_bits();
        let bits = if v.is_nan() { (b >> 16) | 0x40 } else { bf16_round_bits(v) >> 16 };
        bf16::from_bits(bits as u16)
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
    storage_access!(F16);
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// `fn name<T: Elem>(args) { body }`, compiled as written and again with AVX2 enabled, the variant chosen
/// at run time: elementwise loops are written once, and the x86-64 baseline build vectorises them only
/// 4 wide.
macro_rules! with_avx2 {
    ($(#[$m:meta])* $vis:vis fn $name:ident<T: Elem>($($a:ident: $t:ty),*) $body:block) => {
        $(#[$m])* $vis fn $name<T: Elem>($($a: $t),*) {
            #[inline(always)]
            fn run<T: Elem>($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            unsafe fn run_avx2<T: Elem>($($a: $t),*) {
                run($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::kernels::cpu::has_avx2() {
                // SAFETY: AVX2 checked just above.
                return unsafe { run_avx2($($a),*) };
            }
            run($($a),*)
        }
    };
}
pub(crate) use with_avx2;

with_avx2! {
    /// `dst = src` widened to f32 (exact); widening the weights is 5 % of a bf16 prompt.
    pub(crate) fn widen<T: Elem>(src: &[T], dst: &mut [f32]) {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
    }
}

with_avx2! {
    /// `dst = src` rounded to `T` (to nearest, ties to even).
    pub(crate) fn narrow<T: Elem>(src: &[f32], dst: &mut [T]) {
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = T::from_f32(s));
    }
}

/// Work (elements) below which the CPU kernels stay single-threaded.
pub(crate) const PAR_THRESHOLD: usize = 1 << 15;

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

/// Where a product's operands lie in their storages, and its sizes.
pub(crate) struct LinearOperands {
    pub x: Range<usize>,
    pub w: Range<usize>,
    /// Rows of `x`.
    pub m: usize,
    /// Rows of `w` (outputs per row of `x`).
    pub n: usize,
    /// The shared inner dimension.
    pub k: usize,
}

/// The operands of a contiguous `x` `[rows, in]` and `w` `[out, in]`, or an error naming `op`.
pub(crate) fn linear_operands(op: &str, lx: &Layout, lw: &Layout) -> Result<LinearOperands> {
    let (Some((x0, x1)), Some((w0, w1))) = (lx.contiguous_offsets(), lw.contiguous_offsets()) else {
        bail!("{op}: inputs must be contiguous");
    };
    let (m, k) = lx.shape().dims2()?;
    let (n, kw) = lw.shape().dims2()?;
    if kw != k || x1 - x0 != m * k || w1 - w0 != n * k {
        bail!("{op}: x {:?} does not match w {:?}", lx.dims(), lw.dims());
    }
    Ok(LinearOperands { x: x0..x1, w: w0..w1, m, n, k })
}

/// The storage range of a contiguous layout, or an error naming `op` and the operand.
pub(crate) fn contiguous_range(op: &str, what: &str, l: &Layout) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(r) => Ok(r),
        None => bail!("{op}: {what} must be contiguous (shape {:?}, strides {:?})", l.dims(), l.stride()),
    }
}

/// Whether the AVX2 loops may run: the active tier (`tier::active`) is AVX2 or above, so the CPU has
/// AVX2 and FMA.
pub(crate) fn has_avx2() -> bool {
    tier::active().avx2()
}

/// As `has_avx2` (the tier brings FMA with AVX2): what the explicit GEMV and GEMM loops need (x86
/// only: elsewhere those loops do not exist).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    tier::active().avx2()
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

    /// The slice conversions (AVX2-wide where the CPU has it) element for element as `Elem`'s.
    #[test]
    fn widen_and_narrow_are_elementwise() {
        let _guard = crate::kernels::guard_buffers();
        let mut rng = crate::kernels::tests::rng("widen_and_narrow_are_elementwise");
        let xs: Vec<f32> = (0..100_003).map(|_| f32::from_bits(rng.random())).collect();
        let mut narrowed = vec![bf16::ZERO; xs.len()];
        narrow(&xs, &mut narrowed);
        for (&x, n) in xs.iter().zip(&narrowed) {
            let want = <bf16 as Elem>::from_f32(x);
            assert!(n.to_bits() == want.to_bits() || (x.is_nan() && n.is_nan()), "narrow {x:e}: {n} vs {want}");
        }
        let bits: Vec<bf16> = (0..100_003).map(|_| bf16::from_bits(rng.random())).collect();
        let mut wide = vec![0f32; bits.len()];
        widen(&bits, &mut wide);
        for (b, w) in bits.iter().zip(&wide) {
            assert_eq!(w.to_bits(), (b.to_bits() as u32) << 16, "widen {b:?}");
        }
    }
}
