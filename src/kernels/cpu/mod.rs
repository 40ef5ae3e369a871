//! The CPU implementations of expanse's kernels (f32 / bf16 / f16, f32 arithmetic, rounded once per
//! output value unless a kernel says otherwise). They serve CPU inference and are the references the
//! CUDA and Metal kernels are tested against.

mod argmax;
mod attention;
mod gemv;
mod norm;
mod random;
mod rope_kv;
mod silu_mul;
mod softmax;

pub(crate) use argmax::argmax;
pub(crate) use attention::{attention_combine, attention_into, attention_partial, decode_attention};
pub(crate) use gemv::{gemv_rows, DotElem};
pub use gemv::gemv;
pub(crate) use norm::residual_rms_norm;
pub(crate) use random::{fill_normal, mix64};
#[cfg(test)]
pub(crate) use random::normal;
#[cfg(test)]
pub(crate) use rope_kv::rope_kv;
pub(crate) use rope_kv::{rope_qk, write_cache_rows, RopeDims};
pub(crate) use silu_mul::silu_mul;
pub use softmax::softmax_last_dim;

use candle_core::CpuStorage;
use half::{bf16, f16};

/// Storage element: exact widening to f32, round-to-nearest-even narrowing.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
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
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
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
