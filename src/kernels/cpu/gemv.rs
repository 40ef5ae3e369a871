//! The CPU matrix-vector product of decode (one row times a weight): threaded, f32 accumulation, one
//! rounding per output. Written by hand because candle's gemm runs single-row matmuls on one thread
//! and, for bf16, first converts the whole weight to f32 on every call.

use super::tier::{self, Tier};
use super::{linear_operands, linear_rows, Elem, LinearOperands};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Output rows per rayon task: about four tasks per thread so a 192-row k_proj still splits evenly
/// (fixed 64-row chunks gave 3 tasks to 2 threads), and at least 16 rows so a task dwarfs the
/// hand-off cost.
pub(super) fn gemv_chunk(out_dim: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads().max(1);
    out_dim.div_ceil(tasks).next_multiple_of(8).max(16)
}

/// `y = x Wᵀ` for a single row `x` `[1, in]` and `w` `[out, in]` (f32 or bf16, same dtype), on the
/// CPU: f32 accumulation, one rounding per output (what torch's bf16 GEMV does). Returns None when
/// the inputs are not that case, so the caller falls back to candle's matmul.
pub fn gemv(x: &Tensor, w: &Tensor) -> Option<Result<Tensor>> {
    if linear_rows(x, w) != Some(1) {
        return None;
    }
    Some(x.contiguous().and_then(|x| x.apply_op2_no_bwd(w, &Gemv)))
}

/// `x` `[1, in]` times `w`ᵀ by the one-row loops.
struct Gemv;

/// Dot products of one input row against rows of `w`, written to `out` (one value per row).
/// Sixteen independent accumulators let LLVM keep them in vector registers without reordering any
/// single accumulator's additions (float adds are not reassociated automatically).
macro_rules! dot_rows {
    ($name:ident, $t:ty, $widen:expr, $fma:expr) => {
        unsafe fn $name(x: &[f32], w: &[$t], out: &mut [f32]) {
            let n = x.len();
            for (o, row) in out.iter_mut().zip(w.chunks_exact(n)) {
                let mut acc = [0f32; 16];
                let xs = x.chunks_exact(16);
                let ws = row.chunks_exact(16);
                let (xr, wr) = (xs.remainder(), ws.remainder());
                for (xc, wc) in xs.zip(ws) {
                    for i in 0..16 {
                        acc[i] = $fma(xc[i], $widen(wc[i]), acc[i]);
                    }
                }
                let mut s = 0f32;
                for (&a, &b) in xr.iter().zip(wr) {
                    s += a * $widen(b);
                }
                // Pairwise reduction of the lanes.
                let mut width = 16;
                while width > 1 {
                    width /= 2;
                    for i in 0..width {
                        acc[i] += acc[i + width];
                    }
                }
                *o = acc[0] + s;
            }
        }
    };
}

#[inline(always)]
fn mul_add_plain(a: f32, b: f32, c: f32) -> f32 {
    a * b + c
}

// Widening is `Elem::to_f32` (for bf16 a shift, which vectorises).
dot_rows!(dot_f32_generic, f32, <f32 as Elem>::to_f32, mul_add_plain);
dot_rows!(dot_bf16_generic, bf16, <bf16 as Elem>::to_f32, mul_add_plain);
dot_rows!(dot_f16_generic, f16, <f16 as Elem>::to_f32, mul_add_plain);
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    //! Explicit AVX2/FMA loops: the auto-vectorised generic version measured ~1.5× slower than
    //! candle's gemm per thread, so the inner loop is written out (4 × 8 lanes in flight).
    use half::bf16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(in crate::kernels::cpu) unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// SAFETY (callers): the CPU has AVX2 and FMA; `w.len()` is a multiple of `x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_f32(x: &[f32], w: &[f32], out: &mut [f32]) {
        let n = x.len();
        let main = n / 32 * 32;
        for (o, row) in out.iter_mut().zip(w.chunks_exact(n)) {
            let (xp, wp) = (x.as_ptr(), row.as_ptr());
            let mut a = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < main {
                for (k, acc) in a.iter_mut().enumerate() {
                    let off = i + 8 * k;
                    *acc = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(off)), _mm256_loadu_ps(wp.add(off)), *acc);
                }
                i += 32;
            }
            let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
            for j in main..n {
                s += x[j] * row[j];
            }
            *o = s;
        }
    }

    /// SAFETY (callers): as dot_f32.
    ///
    /// A 256-bit load holds 16 bf16 as 8 pairs; each 32-bit lane's high half is already the f32 of
    /// the odd element (mask the low half) and its low half shifted up is the even one. So `x` is
    /// reordered once per call to match (per 16: 8 even, then 8 odd), and the weights are widened
    /// with one shift and one AND per 16 instead of two zero-extending shuffles: up to 1.3× on
    /// cache-resident matrices, equal on DRAM-bound ones (criterion, BENCHMARKS.md). Pairing two
    /// rows per pass to share the `x` loads measured slower on the DRAM-bound lm_head, so rows go
    /// one at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_bf16(x: &[f32], w: &[bf16], out: &mut [f32]) {
        let n = x.len();
        let main = n / 32 * 32;
        let mut xs = vec![0f32; main];
        for (blk, dst) in x[..main].chunks_exact(16).zip(xs.chunks_exact_mut(16)) {
            for i in 0..8 {
                dst[i] = blk[2 * i];
                dst[8 + i] = blk[2 * i + 1];
            }
        }
        let xp = xs.as_ptr();
        let hi_mask = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let tail = |row: &[bf16]| -> f32 { x[main..].iter().zip(&row[main..]).map(|(&a, &b)| a * <bf16 as super::Elem>::to_f32(b)).sum() };
        // (even, odd) halves of the 16 bf16 at `p`, as f32.
        let load = |p: *const bf16| {
            let v = _mm256_loadu_si256(p as *const __m256i);
            (_mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)), _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask)))
        };
        for (o, row) in out.iter_mut().zip(w.chunks_exact(n)) {
            let p = row.as_ptr();
            let mut a = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < main {
                let ((we0, wo0), (we1, wo1)) = (load(p.add(i)), load(p.add(i + 16)));
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), we0, a[0]);
                a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i + 8)), wo0, a[1]);
                a[2] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i + 16)), we1, a[2]);
                a[3] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i + 24)), wo1, a[3]);
                i += 32;
            }
            *o = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]))) + tail(row);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    //! 512-bit loops: f32 rows with AVX-512F FMAs, and on AVX512_BF16 bf16 rows multiplied as stored
    //! (`vdpbf16ps`: 16 exact pair products per instruction, f32 sums, denormals counted as zero),
    //! 4 × 16 lanes in flight; the depth's tail is a masked load in the same loop.
    use half::bf16;
    use std::arch::x86_64::*;

    /// Lanes `0..n` of a 16- or 32-lane mask.
    #[inline(always)]
    pub(in crate::kernels::cpu) fn mask32(n: usize) -> u32 {
        if n >= 32 {
            !0
        } else {
            (1u32 << n) - 1
        }
    }

    /// SAFETY (callers): the CPU has AVX-512F; `w.len()` is a multiple of `x.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_f32(x: &[f32], w: &[f32], out: &mut [f32]) {
        let n = x.len();
        let main = n / 64 * 64;
        let xp = x.as_ptr();
        for (o, row) in out.iter_mut().zip(w.chunks_exact(n)) {
            let wp = row.as_ptr();
            let mut a = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i < main {
                for (k, acc) in a.iter_mut().enumerate() {
                    let off = i + 16 * k;
                    *acc = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(off)), _mm512_loadu_ps(wp.add(off)), *acc);
                }
                i += 64;
            }
            while i < n {
                let m = mask32(n - i) as __mmask16;
                a[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xp.add(i)), _mm512_maskz_loadu_ps(m, wp.add(i)), a[0]);
                i += 16;
            }
            *o = reduce(a);
        }
    }

    /// The sum of a dot's four accumulators, in an order written out here rather than left to the
    /// compiler's `_mm512_reduce_add_ps`: the four added pairwise, then the halves folded 16 → 8 → 4 →
    /// 2 → 1 lanes. The batch tiles (`gemv_batch`) fold sixteen outputs at once by exactly these
    /// additions, so a batch row's bits are its lone bits.
    #[inline(always)]
    pub(in crate::kernels::cpu) unsafe fn reduce(a: [__m512; 4]) -> f32 {
        let v = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
        let hi8 = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let s8 = _mm256_add_ps(_mm512_castps512_ps256(v), hi8);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
    }

    /// The bf16 pairs at `p` whose lanes `mask` selects (the rest 0, which adds nothing).
    #[inline(always)]
    pub(in crate::kernels::cpu) unsafe fn load_bf16(p: *const bf16, mask: __mmask32) -> __m512bh {
        // SAFETY: both are 512-bit vectors; __m512bh only retypes the lanes as bf16 pairs.
        std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(mask, p as *const i16))
    }

    /// SAFETY (callers): the CPU has AVX-512F/BW and AVX512_BF16; as dot_f32. `x` holds bf16 values
    /// (a bf16 model's activations, widened): they are narrowed back once per call (per task of a
    /// threaded GEMV), exactly.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn dot_bf16(x: &[f32], w: &[bf16], out: &mut [f32]) {
        let n = x.len();
        let main = n / 128 * 128;
        let xs: Vec<bf16> = x.iter().map(|&v| <bf16 as super::Elem>::from_f32(v)).collect();
        let xp = xs.as_ptr();
        for (o, row) in out.iter_mut().zip(w.chunks_exact(n)) {
            let wp = row.as_ptr();
            let mut a = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i < main {
                for (k, acc) in a.iter_mut().enumerate() {
                    let off = i + 32 * k;
                    *acc = _mm512_dpbf16_ps(*acc, load_bf16(xp.add(off), !0), load_bf16(wp.add(off), !0));
                }
                i += 128;
            }
            while i < n {
                let m = mask32(n - i);
                a[0] = _mm512_dpbf16_ps(a[0], load_bf16(xp.add(i), m), load_bf16(wp.add(i), m));
                i += 32;
            }
            *o = reduce(a);
        }
    }
}

fn dot_f32(x: &[f32], w: &[f32], out: &mut [f32], tier: Tier) {
    // The loops run the tier's instructions: a tier this CPU lacks must stop here, not fault.
    assert!(tier.supported(), "gemv: the {} tier on a CPU without it", tier.name());
    #[cfg(target_arch = "x86_64")]
    if tier.avx512() {
        // SAFETY: `tier` is one this CPU runs (AVX-512F); the loop reads whole rows of x.len()
        // elements of `w` (chunks_exact) and x itself, whatever the caller's sizes.
        unsafe { avx512::dot_f32(x, w, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if tier.avx2() {
        // SAFETY: `avx2` comes from a run-time check that this CPU has AVX2 and FMA; rows as above.
        unsafe { avx2::dot_f32(x, w, out) };
        return;
    }
    let _ = tier;
    // SAFETY: the generic version enables no target feature; `unsafe` is only the macro's signature.
    unsafe { dot_f32_generic(x, w, out) }
}

/// `x` holds bf16 values (the widened activations of a bf16 model): the AVX512_BF16 loop multiplies
/// them as bf16.
fn dot_bf16(x: &[f32], w: &[bf16], out: &mut [f32], tier: Tier) {
    // As in dot_f32.
    assert!(tier.supported(), "gemv: the {} tier on a CPU without it", tier.name());
    #[cfg(target_arch = "x86_64")]
    if tier.avx512bf16() {
        // SAFETY: `tier` is one this CPU runs (AVX-512F/BW, AVX512_BF16); rows as in dot_f32.
        unsafe { avx512::dot_bf16(x, w, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if tier.avx2() {
        // SAFETY: `avx2` comes from a run-time check that this CPU has AVX2 and FMA; rows as in dot_f32.
        unsafe { avx2::dot_bf16(x, w, out) };
        return;
    }
    let _ = tier;
    // SAFETY: as in dot_f32.
    unsafe { dot_bf16_generic(x, w, out) }
}

/// A weight element the GEMV reads: its dot-product loop on a tier (explicit vector loops where
/// written, portable otherwise; f16 has only the portable one, as no hot path runs f16 on the CPU).
/// For bf16 weights `x` holds bf16 values (a bf16 model's activations).
pub(crate) trait DotElem: Copy + Sync {
    fn dot(x: &[f32], w: &[Self], out: &mut [f32], tier: Tier);
}

impl DotElem for f32 {
    fn dot(x: &[f32], w: &[f32], out: &mut [f32], tier: Tier) {
        dot_f32(x, w, out, tier)
    }
}

impl DotElem for bf16 {
    fn dot(x: &[f32], w: &[bf16], out: &mut [f32], tier: Tier) {
        dot_bf16(x, w, out, tier)
    }
}

impl DotElem for f16 {
    fn dot(x: &[f32], w: &[f16], out: &mut [f32], _tier: Tier) {
        // SAFETY: the generic version enables no target feature; `unsafe` is only the macro's signature.
        unsafe { dot_f16_generic(x, w, out) }
    }
}

/// `out[r] = Σ x·w[r]` in f32 for every row of `w` (`out.len()` rows of `x.len()`), split over rayon's
/// pool in balanced chunks of rows; small products stay on the calling thread.
pub(crate) fn gemv_rows<T: DotElem>(x: &[f32], w: &[T], out: &mut [f32]) {
    let (n, out_dim) = (x.len(), out.len());
    debug_assert_eq!(w.len(), n * out_dim);
    let tier = tier::active();
    if out_dim * n < 1 << 15 {
        T::dot(x, w, out, tier);
    } else {
        let chunk = gemv_chunk(out_dim);
        out.par_chunks_mut(chunk).zip(w.par_chunks(chunk * n)).for_each(|(o, wc)| T::dot(x, wc, o, tier));
    }
}

impl CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "expanse-gemv"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        linear_cpu_fwd("gemv", (s1, l1), (s2, l2), gemv_one_row::<f32>, gemv_one_row::<bf16>)
    }
}

/// [`gemv_rows`] of the op's one row: `gemv` asks only one (`linear_rows`); several go through
/// `gemv_batch`.
fn gemv_one_row<T: DotElem>(x: &[f32], m: usize, w: &[T], out: &mut [f32]) {
    debug_assert_eq!(m, 1, "gemv: {m} rows");
    gemv_rows(x, w, out)
}

/// A CPU op's `x` `[m, in]` times `w`ᵀ: f32 or bf16 operands of one dtype, the f32 products written by
/// `rows_f32` / `rows_bf16` (`x`, its rows `m`, `w`, `out` `[m, out]`); bf16 activations widened
/// exactly, the outputs rounded once to bf16.
pub(super) fn linear_cpu_fwd(
    op: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    rows_f32: impl FnOnce(&[f32], usize, &[f32], &mut [f32]),
    rows_bf16: impl FnOnce(&[f32], usize, &[bf16], &mut [f32]),
) -> Result<(CpuStorage, Shape)> {
    let LinearOperands { x: xr, w: wr, m, n: out_dim, .. } = linear_operands(op, l1, l2)?;
    let mut y = vec![0f32; m * out_dim];
    let out = match (s1, s2) {
        (CpuStorage::F32(x), CpuStorage::F32(w)) => {
            rows_f32(&x[xr], m, &w[wr], &mut y);
            CpuStorage::F32(y)
        }
        (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
            let xf: Vec<f32> = x[xr].iter().map(|&v| <bf16 as Elem>::to_f32(v)).collect();
            rows_bf16(&xf, m, &w[wr], &mut y);
            CpuStorage::BF16(y.into_iter().map(<bf16 as Elem>::from_f32).collect())
        }
        _ => bail!("{op}: f32 or bf16 inputs of one dtype"),
    };
    Ok((out, Shape::from((m, out_dim))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// gemv against an f64 reference over the weights as stored: every output within a few f32 ulps
    /// of the sum of |products| (the bound on any summation order's error).
    fn check(dtype: DType, out_dim: usize, in_dim: usize) {
        let x = Tensor::from_vec(values(in_dim, 1), (1, in_dim), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let w = Tensor::from_vec(values(out_dim * in_dim, 2), (out_dim, in_dim), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let y = gemv(&x, &w).expect("a single row on the CPU takes the GEMV path").unwrap();
        assert_eq!(y.dims(), &[1, out_dim]);
        assert_eq!(y.dtype(), dtype);
        let xs = x.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ws = w.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        let ys = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // One rounding to the output dtype on top of the f32 accumulation error.
        let out_ulp = if dtype == DType::BF16 { 1.0 / 128.0 } else { 0.0 };
        for (r, (row, &got)) in ws.iter().zip(&ys).enumerate() {
            let want: f64 = row.iter().zip(&xs).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mag: f64 = row.iter().zip(&xs).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            let tol = mag * 1e-6 + want.abs() * out_ulp;
            assert!((got as f64 - want).abs() <= tol, "{dtype:?} {out_dim}x{in_dim} row {r}: {got} vs {want} (tol {tol})");
        }
    }

    #[test]
    fn gemv_matches_f64_reference() {
        let _guard = crate::kernels::guard_buffers();
        for dtype in [DType::F32, DType::BF16] {
            // Odd row counts, widths with and without a tail after the 32-wide main loop, and sizes
            // below and above the threading threshold.
            for (out_dim, in_dim) in [(1, 32), (3, 7), (37, 576 + 13), (192, 576), (1001, 64), (257, 4096)] {
                check(dtype, out_dim, in_dim);
            }
        }
    }

    #[test]
    fn gemv_declines_what_it_does_not_handle() {
        let w = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
        let two_rows = Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(gemv(&two_rows, &w).is_none(), "more than one row goes to candle's matmul");
        let f16 = Tensor::zeros((1, 8), DType::F16, &Device::Cpu).unwrap();
        assert!(gemv(&f16, &w.to_dtype(DType::F16).unwrap()).is_none());
    }

    /// Every tier's inner loops this CPU runs against an f64 reference, so none is only ever
    /// compared with another; depths with each kind of tail.
    #[test]
    fn every_tiers_dot_loops_match_f64_reference() {
        let _guard = crate::kernels::guard_buffers();
        for (out_dim, n) in [(9, 576 + 5), (5, 4096), (3, 17), (4, 128 + 32 + 31)] {
            check_dot_loops(out_dim, n);
        }
    }

    /// The decode GEMV follows its tier's denormal rule as the GEMM does (README): `vdpbf16ps` counts
    /// a denormal input as zero, the other loops multiply it exactly.
    #[test]
    fn a_denormal_bf16_input_follows_the_tiers_rule() {
        let x = [bf16::from_bits(1).to_f32(), 0.0]; // 2^-133, the smallest bf16 denormal
        let w = [bf16::from_f32(2f32.powi(100)), bf16::ZERO];
        for tier in Tier::available() {
            let mut out = [f32::NAN];
            dot_bf16(&x, &w, &mut out, tier);
            let want = if cfg!(target_arch = "x86_64") && tier.avx512bf16() { 0.0 } else { 2f32.powi(-33) };
            assert_eq!(out[0], want, "{tier:?}");
        }
    }

    fn check_dot_loops(out_dim: usize, n: usize) {
        // bf16 values, as a bf16 model's activations are (the bf16 loops' contract).
        let x: Vec<f32> = values(n, 3 + n as u64).iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let wf = values(out_dim * n, 4 + n as u64);
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        for tier in Tier::available() {
            let mut got_f32 = vec![0f32; out_dim];
            dot_f32(&x, &wf, &mut got_f32, tier);
            let mut got_bf16 = vec![0f32; out_dim];
            dot_bf16(&x, &wb, &mut got_bf16, tier);
            for r in 0..out_dim {
                let row_f32 = &wf[r * n..(r + 1) * n];
                let row_bf16: Vec<f32> = wb[r * n..(r + 1) * n].iter().map(|v| v.to_f32()).collect();
                for (got, row) in [(got_f32[r], row_f32), (got_bf16[r], &row_bf16[..])] {
                    let want: f64 = row.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let mag: f64 = row.iter().zip(&x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                    assert!((got as f64 - want).abs() <= mag * 1e-6, "{tier:?} {out_dim}x{n} row {r}: {got} vs {want}");
                }
            }
        }
    }
}
