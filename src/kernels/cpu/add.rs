//! The residual adds of prompts on the CPU: `a + b` in f32, rounded once to the dtype, as candle's and
//! torch's adds of half dtypes round. Hand-written because candle 0.11's CPU add of a prompt-sized
//! tensor runs on candle's own thread pool beside rayon's, whose pinned workers spin (25,000 rounds)
//! after each call and take the cores from the next GEMM's: replacing the two adds per layer made bf16
//! and f32 prompts 20–30 % faster (BENCHMARKS.md). Runs on rayon's pool, AVX2-wide where the CPU has it.

use super::{dispatch, with_avx2, Elem, PAR_THRESHOLD};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `a + b` for two CPU tensors of one shape and dtype (f32, bf16 or f16); None when the inputs are
/// not that case (the caller uses candle's add).
pub fn add(a: &Tensor, b: &Tensor) -> Option<Result<Tensor>> {
    let ok = a.device().is_cpu() && a.dtype() == b.dtype() && matches!(a.dtype(), DType::F32 | DType::BF16 | DType::F16) && a.dims() == b.dims();
    if !ok {
        return None;
    }
    Some((|| a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add))())
}

struct Add;

with_avx2! {
    fn add_chunk<T: Elem>(a: &[T], b: &[T], out: &mut [T]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = T::from_f32(x.to_f32() + y.to_f32());
        }
    }
}

fn add_all<T: Elem>(a: &[T], b: &[T]) -> Vec<T> {
    let mut out = vec![T::from_f32(0.0); a.len()];
    if a.len() >= 4 * PAR_THRESHOLD {
        let chunk = PAR_THRESHOLD;
        out.par_chunks_mut(chunk).zip(a.par_chunks(chunk).zip(b.par_chunks(chunk))).for_each(|(o, (a, b))| add_chunk(a, b, o));
    } else {
        add_chunk(a, b, &mut out);
    }
    out
}

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "expanse-add"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a0, a1) = super::contiguous_range("add", "a", l1)?;
        let (b0, b1) = super::contiguous_range("add", "b", l2)?;
        if a1 - a0 != b1 - b0 {
            bail!("add: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
        }
        let out = dispatch!("add", (s1, s2), |a, b| add_all(&a[a0..a1], &b[b0..b1]));
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{rand_tensor, rng};
    use candle_core::Device;

    /// Bit for bit candle's add (the reference path's op before this one), on fresh
    /// random inputs of magnitudes far apart (so sums round) and sizes around the vector width and
    /// the threading threshold.
    #[test]
    fn add_is_candles_add_bit_for_bit() {
        let _guard = crate::kernels::guard_buffers();
        let mut rng = rng("add_is_candles_add_bit_for_bit");
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for n in [1, 7, 8, 33, 576, 4 * PAR_THRESHOLD + 5] {
                let a = rand_tensor(&mut rng, &[n], 100.0, dtype, &Device::Cpu);
                let b = rand_tensor(&mut rng, &[n], 0.3, dtype, &Device::Cpu);
                let want = (&a + &b).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                let got = add(&a, &b).expect("the CPU takes it").unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{dtype:?} n={n}");
            }
        }
    }

    #[test]
    fn add_declines_what_it_does_not_handle() {
        let a = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(add(&a, &Tensor::zeros((4, 2), DType::F32, &Device::Cpu).unwrap()).is_none(), "shapes");
        assert!(add(&a, &Tensor::zeros((2, 4), DType::BF16, &Device::Cpu).unwrap()).is_none(), "dtypes");
    }
}
