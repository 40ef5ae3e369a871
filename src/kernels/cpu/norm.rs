//! RMSNorm on the CPU as transformers computes it, in one pass per row: `x · rsqrt(mean(x²) + eps)`
//! in f32, rounded to the dtype, then times the weight in the dtype (rounded again). Prompts take it as
//! a candle op ([`rms_norm`]); the decode step calls [`residual_rms_norm`] on its own buffers. Both go
//! through one row function, so the step and the reference path agree bit for bit.

use super::{contiguous_range, Elem, PAR_THRESHOLD};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// RMSNorm over the last dim of `x` `[.., hidden]` with `weight` `[hidden]` (f32, bf16 or f16, one dtype)
/// on the CPU; None when the inputs are not that case (the caller composes candle ops instead).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Option<Result<Tensor>> {
    let ok = x.device().is_cpu()
        && x.dtype() == weight.dtype()
        && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && x.rank() >= 1
        && weight.dims() == [x.dims()[x.rank() - 1]];
    if !ok {
        return None;
    }
    Some(x.contiguous().and_then(|x| x.apply_op2_no_bwd(&weight.contiguous()?, &RmsNorm { eps })))
}

struct RmsNorm {
    eps: f32,
}

/// One row: `out = round(w · round(x · r))` with `r = 1 / sqrt(Σx²/n + eps)` (torch's rsqrt).
fn row<T: Elem>(x: &[T], w: &[T], out: &mut [T], eps: f32) {
    // Eight running sums so the loop vectorises (float adds are not reassociated otherwise).
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| v.to_f32() * v.to_f32()).sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v.to_f32() * v.to_f32();
        }
    }
    let ss = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + tail;
    let r = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = T::from_f32(g.to_f32() * T::round_f32(v.to_f32() * r));
    }
}

/// `x ← x + add` (rounded to `T`, as candle's add; skipped when `add` is None), then
/// `h = round(w · round(x · r))` as [`rms_norm`] computes it for one row.
pub(crate) fn residual_rms_norm<T: Elem>(x: &mut [T], add: Option<&[T]>, w: &[T], eps: f32, h: &mut [T]) {
    if let Some(d) = add {
        for (x, &d) in x.iter_mut().zip(d) {
            *x = T::from_f32(x.to_f32() + d.to_f32());
        }
    }
    row(x, w, h, eps);
}

fn rms_norm_rows<T: Elem>(x: &[T], w: &[T], eps: f32) -> Vec<T> {
    let n = w.len();
    let mut out = vec![T::from_f32(0.0); x.len()];
    if x.len() >= PAR_THRESHOLD {
        // 16-row tasks: a prompt of 128 rows makes 8, enough for two threads to balance.
        out.par_chunks_mut(16 * n)
            .zip(x.par_chunks(16 * n))
            .for_each(|(o, x)| o.chunks_exact_mut(n).zip(x.chunks_exact(n)).for_each(|(o, x)| row(x, w, o, eps)));
    } else {
        out.chunks_exact_mut(n).zip(x.chunks_exact(n)).for_each(|(o, x)| row(x, w, o, eps));
    }
    out
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "expanse-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x0, x1) = contiguous_range("rms_norm", "x", l1)?;
        let (w0, w1) = contiguous_range("rms_norm", "weight", l2)?;
        if w1 == w0 || (x1 - x0) % (w1 - w0) != 0 {
            bail!("rms_norm: x {:?} and weight {:?} disagree on hidden", l1.dims(), l2.dims());
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(rms_norm_rows(&x[x0..x1], &w[w0..w1], self.eps)),
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => CpuStorage::BF16(rms_norm_rows::<bf16>(&x[x0..x1], &w[w0..w1], self.eps)),
            (CpuStorage::F16(x), CpuStorage::F16(w)) => CpuStorage::F16(rms_norm_rows::<f16>(&x[x0..x1], &w[w0..w1], self.eps)),
            _ => bail!("rms_norm: f32, bf16 or f16 inputs of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{rand_tensor, rng, to_vec_f32};
    use candle_core::Device;

    /// Against transformers' formula in f64 over the stored inputs: f32 within a few ulps; bf16
    /// within one bf16 rounding of each of its two rounding steps.
    #[test]
    fn rms_norm_matches_f64_reference() {
        let _guard = crate::kernels::guard_buffers();
        let mut rng = rng("rms_norm_matches_f64_reference");
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (rows, hidden) in [(1, 5), (3, 64), (130, 576)] {
                let x = rand_tensor(&mut rng, &[rows, hidden], 2.0, dtype, &Device::Cpu);
                let w = rand_tensor(&mut rng, &[hidden], 1.5, dtype, &Device::Cpu);
                let got = to_vec_f32(&rms_norm(&x, &w, 1e-5).expect("CPU f32/bf16 takes the kernel").unwrap());
                let (xs, ws) = (to_vec_f32(&x), to_vec_f32(&w));
                let rel = match dtype {
                    DType::F32 => 1e-6,
                    DType::BF16 => 2.0 / 128.0,
                    _ => 2.0 / 1024.0,
                };
                for (r, (xr, gr)) in xs.chunks(hidden).zip(got.chunks(hidden)).enumerate() {
                    let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / hidden as f64;
                    let inv = 1.0 / (ms + 1e-5).sqrt();
                    for (c, ((&v, &g), &want_w)) in xr.iter().zip(gr).zip(&ws).enumerate() {
                        let want = want_w as f64 * v as f64 * inv;
                        assert!((g as f64 - want).abs() <= want.abs() * rel + 1e-7, "{dtype:?} [{r},{c}]: {g} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn rms_norm_declines_what_it_does_not_handle() {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(rms_norm(&x, &Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(), 1e-5).is_none(), "weight size");
        assert!(rms_norm(&x, &Tensor::zeros(4, DType::BF16, &Device::Cpu).unwrap(), 1e-5).is_none(), "mixed dtypes");
    }
}
