//! The up half of a Mistral MLP for prompts on the CPU in one pass: `silu(x·W_gateᵀ) ⊙ (x·W_upᵀ)`
//! from the stacked gate/up weight, each task computing both products for its columns with the
//! `gemm` core and applying SiLU and the product as the epilogue, so neither `[rows, intermediate]`
//! projection is written out. Rounds where transformers does in a half dtype: each projection to the
//! dtype, SiLU (f32) to the dtype, the product to the dtype.

use super::exp::exp_in_place;
use super::gemm::{matmul_nt, Lhs, Weight};
use super::tier;
use super::{linear_operands, linear_rows, LinearOperands};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

/// `silu(x·W_gateᵀ) ⊙ (x·W_upᵀ)` for `x` `[m, in]` (m ≥ 2) and `gate_up` `[2·I, in]` (gate rows, then
/// up rows; f32 or bf16 like x) on the CPU; returns `[m, I]`, or None when the inputs are not that
/// case (the caller composes the ops instead).
pub fn swiglu(x: &Tensor, gate_up: &Tensor) -> Option<Result<Tensor>> {
    if linear_rows(x, gate_up).is_none_or(|m| m < 2) || gate_up.dim(0).is_ok_and(|n| !n.is_multiple_of(2)) {
        return None;
    }
    Some(x.contiguous().and_then(|x| x.apply_op2_no_bwd(gate_up, &Swiglu)))
}

struct Swiglu;

/// The output buffer, shared by tasks that each write their own columns.
#[derive(Clone, Copy)]
struct OutPtr<T>(*mut T);
// SAFETY: tasks write disjoint column ranges of the one output buffer (see `swiglu_par`).
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// SAFETY (callers): `at .. at + n` lies inside the buffer and no other task touches it.
    unsafe fn slice<'a>(self, at: usize, n: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(at), n)
    }
}

/// `out[m, inter]` = the epilogue over both products, columns split over rayon's pool.
fn swiglu_par<T: Weight>(x: &Lhs, m: usize, k: usize, w: &[T], inter: usize) -> Vec<T> {
    let mut out = vec![T::from_f32(0.0); m * inter];
    let ptr = OutPtr(out.as_mut_ptr());
    let per = inter.div_ceil(2 * rayon::current_num_threads().max(1)).next_multiple_of(8).max(8);
    (0..inter.div_ceil(per)).into_par_iter().for_each(|t| {
        let (j0, nj) = (t * per, per.min(inter - t * per));
        let mut c = vec![0f32; m * 2 * nj];
        matmul_nt(x, k, m, k, &w[j0 * k..], k, nj, &mut c, 2 * nj);
        matmul_nt(x, k, m, k, &w[(inter + j0) * k..], k, nj, &mut c[nj..], 2 * nj);
        let round = T::round_f32;
        let mut e = vec![0f32; nj];
        for (i, row) in c.chunks_exact_mut(2 * nj).enumerate() {
            let (gate, up) = row.split_at_mut(nj);
            gate.iter_mut().zip(e.iter_mut()).for_each(|(g, e)| {
                *g = round(*g);
                *e = -*g;
            });
            exp_in_place(&mut e);
            // SAFETY: row i, columns j0.. +nj of `out` (m × inter) belong to this task alone.
            let dst = unsafe { ptr.slice(i * inter + j0, nj) };
            for (((o, &g), &e), &u) in dst.iter_mut().zip(&*gate).zip(&e).zip(&*up) {
                // silu(g) = g / (1 + e^-g), as candle and torch compute it.
                *o = T::from_f32(round(g / (1.0 + e)) * round(u));
            }
        }
    });
    out
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "expanse-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let LinearOperands { x: xr, w: wr, m, n, k } = linear_operands("swiglu", l1, l2)?;
        if n % 2 != 0 {
            bail!("swiglu: the stacked gate/up weight has an odd row count {n}");
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(swiglu_par(&Lhs::f32(&x[xr]), m, k, &w[wr], n / 2)),
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => CpuStorage::BF16(swiglu_par::<bf16>(&Lhs::bf16(&x[xr], tier::active()), m, k, &w[wr], n / 2)),
            _ => bail!("swiglu: f32 or bf16 inputs of one dtype"),
        };
        Ok((out, Shape::from((m, n / 2))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{rand_tensor, rng, to_vec_f32};
    use candle_core::{DType, Device};

    /// The composition the model ran before: two matmuls in f32 rounded to the dtype, SiLU in f32
    /// rounded, the product in the dtype (candle ops).
    fn reference(x: &Tensor, gate_up: &Tensor) -> Tensor {
        let inter = gate_up.dim(0).unwrap() / 2;
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let proj = |w: Tensor| f(x).matmul(&f(&w).t().unwrap()).unwrap().to_dtype(x.dtype()).unwrap();
        let (g, u) = (proj(gate_up.narrow(0, 0, inter).unwrap()), proj(gate_up.narrow(0, inter, inter).unwrap()));
        let act = f(&g).silu().unwrap().to_dtype(x.dtype()).unwrap();
        (act * u).unwrap()
    }

    /// The f32 gate and up products `[m, inter]` (flattened), before any rounding.
    fn projections(x: &Tensor, gate_up: &Tensor) -> (Vec<f32>, Vec<f32>) {
        let inter = gate_up.dim(0).unwrap() / 2;
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let proj = |w: Tensor| to_vec_f32(&f(x).matmul(&f(&w).t().unwrap()).unwrap());
        (proj(gate_up.narrow(0, 0, inter).unwrap()), proj(gate_up.narrow(0, inter, inter).unwrap()))
    }

    #[test]
    fn swiglu_matches_composed_ops() {
        let _guard = crate::kernels::guard_buffers();
        let mut rng = rng("swiglu_matches_composed_ops");
        for dtype in [DType::F32, DType::BF16] {
            for (m, inter, k) in [(2, 8, 16), (7, 37, 100), (128, 1536, 576)] {
                let x = rand_tensor(&mut rng, &[m, k], 1.0, dtype, &Device::Cpu);
                let w = rand_tensor(&mut rng, &[2 * inter, k], 0.2, dtype, &Device::Cpu);
                let got = swiglu(&x, &w).expect("a CPU prompt takes the fused path").unwrap();
                let what = format!("{dtype:?} {m}x{inter}x{k}");
                if dtype == DType::F32 {
                    // Summation order only: g and u may each differ by a few ulps of the sums they
                    // pass through, bounded here by 4e-6 · Σ|x·w| (well above f32 order effects, far
                    // below one dropped product), carried into silu(g)·u by its slopes — large where
                    // silu(g) is small and u is not (a fixed 1e-5 relative tolerance failed there on a
                    // fresh seed) — plus a few ulps of the result.
                    let (g, u) = projections(&x, &w);
                    let (ag, au) = projections(&x.abs().unwrap(), &w.abs().unwrap());
                    let tol: Vec<f32> = (0..g.len())
                        .map(|i| {
                            let (silu, dsilu) = silu_and_slope(g[i]);
                            1e-6 + 4e-6 * ((dsilu * u[i]).abs() * ag[i] + silu.abs() * au[i]) + 1e-6 * (silu * u[i]).abs()
                        })
                        .collect();
                    within(&what, &got, &reference(&x, &w), &tol);
                    continue;
                }
                // bf16: a projection g or u may round to the neighbouring bf16 when the f32 sums
                // differ in order; the product carries it — a rounding of u, and of g through silu,
                // whose relative slope at negative g is large (g = -5: one ulp of g is 2.5 % of
                // silu(g)) — plus the roundings of silu(g) and of the product; and, as in f32, the
                // sums' own order effects before rounding, which are not relative to g or u where
                // either is small beside the products it sums (several bf16 ulps of a tiny g).
                let (g, u) = projections(&x, &w);
                let (ag, au) = projections(&x.abs().unwrap(), &w.abs().unwrap());
                let rtol = 1.0 / 128.0;
                let tol: Vec<f32> = (0..g.len())
                    .map(|i| {
                        let (silu, dsilu) = silu_and_slope(g[i]);
                        let order = 4e-6 * ((dsilu * u[i]).abs() * ag[i] + silu.abs() * au[i]);
                        1e-5 + 2.0 * rtol * (silu * u[i]).abs() + rtol * (dsilu * g[i] * u[i]).abs() + order
                    })
                    .collect();
                within(&what, &got, &reference(&x, &w), &tol);
            }
        }
    }

    /// silu(g) and its slope d silu / dg.
    fn silu_and_slope(g: f32) -> (f32, f32) {
        let sig = 1.0 / (1.0 + (-g).exp());
        (g * sig, sig * (1.0 + g * (1.0 - sig)))
    }

    /// Every element of `got` finite and within its own tolerance of `want`'s.
    fn within(what: &str, got: &Tensor, want: &Tensor, tol: &[f32]) {
        let (got, want) = (to_vec_f32(got), to_vec_f32(want));
        assert_eq!(got.len(), tol.len(), "{what}: one tolerance per element");
        for (i, ((a, b), t)) in got.iter().zip(&want).zip(tol).enumerate() {
            assert!(a.is_finite() && (a - b).abs() <= *t, "{what}: mismatch at {i}: got {a} expected {b} (tolerance {t})");
        }
    }

    #[test]
    fn swiglu_declines_what_it_does_not_handle() {
        let w = Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(swiglu(&Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap(), &w).is_none(), "one row");
        assert!(swiglu(&Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap(), &w.narrow(0, 0, 7).unwrap()).is_none(), "odd rows");
    }
}
