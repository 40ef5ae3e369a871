//! The CPU matrix product of prompts, `y = x Wᵀ` for many rows `x` against a weight `W` `[out, in]`,
//! and the register-blocked core that prompt attention runs on too. Both operands are k-contiguous
//! rows, so a 4×3 tile is twelve dot products in vector accumulators (AVX-512F, AVX2/FMA, portable
//! fallback, by the CPU tier; llamafile's tinyBLAS shape) and nothing is packed: f32 weights are read
//! in place, bf16 ones widened exactly one L2-sized block at a time, never the whole operand — or, on
//! the AVX512_BF16 tier, multiplied as stored (`gemm_bf16`). f32 accumulation and one rounding per
//! output: torch's bf16 GEMM numerics. Hand-written because candle's CPU matmul widens a bf16
//! operand's whole storage to f32 on every call (for a view into a stacked weight, the whole stack)
//! and packs both operands per call, and prompts ran at 0.4–0.6× llama.cpp (BENCHMARKS.md).

use super::tier::{self, Tier};
use super::{gemm_bf16, linear_operands, linear_rows, narrow, widen, Elem, LinearOperands};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;
use std::borrow::Cow;

/// Where the tiles write: row-major f32, rows `ldc` apart.
#[derive(Clone, Copy)]
pub(super) struct Out {
    pub ptr: *mut f32,
    pub ldc: usize,
}
// SAFETY: tasks given the same `Out` write disjoint column ranges of it (see `gemm_nt`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

// ---------------------------------------------------------------------------
// x·Wᵀ without packing: both operands are already k-contiguous rows, so a tile of RM rows of x and
// RN rows of W is a set of RM×RN dot products run side by side in vector accumulators (llamafile's
// tinyBLAS shape), summed across lanes once at the end of each depth block.

/// Rows of x per tile.
const TM: usize = 4;
/// Rows of W per tile (4×3 accumulators + 3 W vectors + 1 x vector = 16 registers).
const TN: usize = 3;
/// A task's columns are a multiple of this, so its tiles are whole (both tile widths divide it).
const TASK_COLS: usize = 12;
const _: () = assert!(TASK_COLS.is_multiple_of(TN) && TASK_COLS.is_multiple_of(gemm_bf16::TN));
/// Depth block: a TM×TK slice of x (16 KB) stays in L1 while the W block streams from L2.
const TK: usize = 1024;
/// W rows per block: TB×TK f32 (≤ 192 KB) stays in L2 while every tile of x passes over it.
const TB: usize = 48;

/// One tile: `C[RM × RN] (+)= x[RM, k] · w[RN, k]ᵀ` (rows `ldx`, `ldw`, `ldc` apart).
type Tile = unsafe fn(k: usize, x: *const f32, ldx: usize, w: *const f32, ldw: usize, c: *mut f32, ldc: usize, accumulate: bool);

/// SAFETY (callers): x holds RM rows and w RN rows of `k` readable values; c RM rows of RN writable.
#[allow(clippy::too_many_arguments)] // a micro-kernel's operands: pointers and leading dimensions
unsafe fn tile_portable<const RM: usize, const RN: usize>(
    k: usize,
    x: *const f32,
    ldx: usize,
    w: *const f32,
    ldw: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[[0f32; 8]; RN]; RM];
    let main = k / 8 * 8;
    for p in (0..main).step_by(8) {
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let xs = std::slice::from_raw_parts(x.add(i * ldx + p), 8);
            for (j, a) in acc_i.iter_mut().enumerate() {
                let ws = std::slice::from_raw_parts(w.add(j * ldw + p), 8);
                for l in 0..8 {
                    a[l] += xs[l] * ws[l];
                }
            }
        }
    }
    for (i, acc_i) in acc.iter().enumerate() {
        for (j, a) in acc_i.iter().enumerate() {
            let mut s = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
            for p in main..k {
                s += *x.add(i * ldx + p) * *w.add(j * ldw + p);
            }
            let o = c.add(i * ldc + j);
            *o = if accumulate { *o + s } else { s };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2_tile {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// SAFETY (callers): the CPU has AVX2 and FMA; otherwise as `tile_portable`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)] // a micro-kernel's operands: pointers and leading dimensions
    pub(super) unsafe fn tile<const RM: usize, const RN: usize>(
        k: usize,
        x: *const f32,
        ldx: usize,
        w: *const f32,
        ldw: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); RN]; RM];
        let main = k / 8 * 8;
        let mut p = 0;
        while p < main {
            let mut wv = [_mm256_setzero_ps(); RN];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(w.add(j * ldw + p));
            }
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add(i * ldx + p));
                for (a, &v) in acc_i.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, v, *a);
                }
            }
            p += 8;
        }
        for (i, acc_i) in acc.iter().enumerate() {
            for (j, &a) in acc_i.iter().enumerate() {
                let mut s = hsum(a);
                for p in main..k {
                    s += *x.add(i * ldx + p) * *w.add(j * ldw + p);
                }
                let o = c.add(i * ldc + j);
                *o = if accumulate { *o + s } else { s };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512_tile {
    use std::arch::x86_64::*;

    /// SAFETY (callers): the CPU has AVX-512F; otherwise as `tile_portable`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)] // a micro-kernel's operands: pointers and leading dimensions
    #[allow(clippy::needless_range_loop)] // indexed loops: see the comment in the body
    pub(super) unsafe fn tile<const RM: usize, const RN: usize>(
        k: usize,
        x: *const f32,
        ldx: usize,
        w: *const f32,
        ldw: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); RN]; RM];
        // Indexed loops over the const sizes unroll fully and keep the accumulators in registers.
        macro_rules! step {
            ($p:expr, $load:expr) => {{
                let mut wv = [$load(w.add($p)); RN];
                for j in 1..RN {
                    wv[j] = $load(w.add(j * ldw + $p));
                }
                for i in 0..RM {
                    let xv = $load(x.add(i * ldx + $p));
                    for j in 0..RN {
                        acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
                    }
                }
            }};
        }
        let main = k / 16 * 16;
        let mut p = 0;
        while p < main {
            step!(p, |q| _mm512_loadu_ps(q));
            p += 16;
        }
        if main < k {
            // The depth's tail: masked-off lanes load as 0 and add nothing.
            let mask: __mmask16 = (1u16 << (k - main)) - 1;
            step!(main, |q| _mm512_maskz_loadu_ps(mask, q));
        }
        for (i, acc_i) in acc.iter().enumerate() {
            for (j, &a) in acc_i.iter().enumerate() {
                let s = _mm512_reduce_add_ps(a);
                let o = c.add(i * ldc + j);
                *o = if accumulate { *o + s } else { s };
            }
        }
    }
}

/// The tile kernel for an `rm × rn` tile on `tier` (a tier this CPU runs; rm ≤ TM, rn ≤ TN). The
/// 512-bit tile keeps TM×TN too: 4×4, 5×4 and 6×4 measured no faster (the larger ones spill
/// accumulators to the stack, 1.3–1.4× slower).
fn tile(rm: usize, rn: usize, tier: Tier) -> Tile {
    macro_rules! pick {
        ($f:ident) => {{
            fn row<const RM: usize>(rn: usize) -> Tile {
                match rn {
                    3 => $f::<RM, 3>,
                    2 => $f::<RM, 2>,
                    _ => $f::<RM, 1>,
                }
            }
            match rm {
                4 => row::<4>(rn),
                3 => row::<3>(rn),
                2 => row::<2>(rn),
                _ => row::<1>(rn),
            }
        }};
    }
    debug_assert!(tier.supported() && rm <= TM && rn <= TN, "{tier:?} {rm}×{rn}");
    #[cfg(target_arch = "x86_64")]
    if tier.avx512() {
        use avx512_tile::tile as t;
        return pick!(t);
    }
    #[cfg(target_arch = "x86_64")]
    if tier.avx2() {
        use avx2_tile::tile as t;
        return pick!(t);
    }
    pick!(tile_portable)
}

/// Row-major operands of `C = X · Wᵀ`: `x` `[m, k]` f32 and `w` `[n, k]`, rows `ldx`, `ldw` apart.
#[derive(Clone, Copy)]
struct Nt<'a, T> {
    x: &'a [f32],
    ldx: usize,
    m: usize,
    k: usize,
    w: &'a [T],
    ldw: usize,
}

/// W rows `n0..n1` of one task: `C[:, n0..n1] = X · W[n0..n1]ᵀ`; bf16 weights are widened one
/// TB×TK block at a time.
fn gemm_nt_rows<T: Weight>(op: Nt<T>, n0: usize, n1: usize, c: Out, tier: Tier) {
    // The tiles run the tier's instructions: a tier this CPU lacks must stop here, not fault.
    assert!(tier.supported(), "gemm: the {} tier on a CPU without it", tier.name());
    let Nt { x, ldx, m, k, w, ldw: ldw_src } = op;
    let mut buf = Vec::new();
    for k0 in (0..k).step_by(TK) {
        let kc = TK.min(k - k0);
        for b0 in (n0..n1).step_by(TB) {
            let nb = TB.min(n1 - b0);
            let (wp, ldw) = match widened(w, ldw_src, b0, nb, k0, kc, &mut buf) {
                Some(f) => (f.as_ptr(), ldw_src),
                None => (buf.as_ptr(), kc),
            };
            for i0 in (0..m).step_by(TM) {
                let rm = TM.min(m - i0);
                for j0 in (0..nb).step_by(TN) {
                    let rn = TN.min(nb - j0);
                    // SAFETY: rows i0.. +rm of x and j0.. +rn of the W block hold kc values from
                    // their start; C's rows i0.. and columns b0+j0.. are inside it and this task's.
                    unsafe {
                        tile(rm, rn, tier)(kc, x.as_ptr().add(i0 * ldx + k0), ldx, wp.add(j0 * ldw), ldw, c.ptr.add(i0 * c.ldc + b0 + j0), c.ldc, k0 > 0)
                    };
                }
            }
        }
    }
}

/// The W block `[b0.. +nb, k0.. +kc]` as f32: a view of `w` itself when it is f32 (rows `ldw`
/// apart, returned as Some), else widened into `buf` (rows `kc` apart, None).
fn widened<'w, T: Weight>(w: &'w [T], ldw: usize, b0: usize, nb: usize, k0: usize, kc: usize, buf: &mut Vec<f32>) -> Option<&'w [f32]> {
    if let Some(f) = T::as_f32(w) {
        return Some(&f[b0 * ldw + k0..]);
    }
    buf.resize(nb * kc, 0.0);
    for (dst, r) in buf.chunks_exact_mut(kc).zip(b0..b0 + nb) {
        widen(&w[r * ldw + k0..][..kc], dst);
    }
    None
}

/// A weight element: f32 weights are read in place, others widened block by block (or, bf16 on the
/// AVX512_BF16 tier, multiplied as stored).
pub(crate) trait Weight: Elem {
    fn as_f32(w: &[Self]) -> Option<&[f32]>;
    fn as_bf16(w: &[Self]) -> Option<&[bf16]>;
}

impl Weight for f32 {
    fn as_f32(w: &[f32]) -> Option<&[f32]> {
        Some(w)
    }
    fn as_bf16(_: &[f32]) -> Option<&[bf16]> {
        None
    }
}

impl Weight for bf16 {
    fn as_f32(_: &[bf16]) -> Option<&[f32]> {
        None
    }
    fn as_bf16(w: &[bf16]) -> Option<&[bf16]> {
        Some(w)
    }
}

/// The rows `x` of a product, prepared once per call for the tier's kernel: bf16 activations stay as
/// stored where the AVX512_BF16 tile multiplies them with bf16 weights, else they are widened to f32
/// (exactly) once, not per task.
pub(crate) enum Lhs<'a> {
    F32(Cow<'a, [f32]>),
    Bf16(&'a [bf16]),
}

impl<'a> Lhs<'a> {
    pub fn f32(x: &'a [f32]) -> Lhs<'a> {
        Lhs::F32(Cow::Borrowed(x))
    }

    /// A bf16 model's activations, for bf16 weights, on `tier`.
    pub fn bf16(x: &'a [bf16], tier: Tier) -> Lhs<'a> {
        if gemm_bf16::runs_on(tier) {
            return Lhs::Bf16(x);
        }
        let mut xf = vec![0f32; x.len()];
        widen(x, &mut xf);
        Lhs::F32(Cow::Owned(xf))
    }
}

/// `C = X · Wᵀ` on this thread: `x` `[m, k]` f32 and `w` `[n, k]` (rows `ldx`, `ldw` apart) into
/// `c` `[m, n]` (rows `ldc` apart; columns `n..ldc` are left alone). For kernels that split the work
/// themselves (prompt attention, the fused MLP up-projection).
#[allow(clippy::too_many_arguments)] // BLAS-style operands: each matrix with its leading dimension
pub(crate) fn matmul_nt<T: Weight>(x: &Lhs, ldx: usize, m: usize, k: usize, w: &[T], ldw: usize, n: usize, c: &mut [f32], ldc: usize) {
    let fits = |len: usize, rows: usize, ld: usize, cols: usize| rows == 0 || len >= (rows - 1) * ld + cols;
    let x_len = match x {
        Lhs::F32(x) => x.len(),
        Lhs::Bf16(x) => x.len(),
    };
    assert!(fits(x_len, m, ldx, k) && fits(w.len(), n, ldw, k) && fits(c.len(), m, ldc, n) && n <= ldc, "matmul_nt: operand too small");
    if k == 0 {
        (0..m).for_each(|i| c[i * ldc..][..n].fill(0.0));
        return;
    }
    let out = Out { ptr: c.as_mut_ptr(), ldc };
    rows(x, ldx, m, k, w, ldw, 0, n, out, tier::active());
}

/// `C[:, n0..n1] = X · W[n0..n1]ᵀ` on this thread, with the kernel `x` was prepared for.
#[allow(clippy::too_many_arguments)] // BLAS-style operands: each matrix with its leading dimension
fn rows<T: Weight>(x: &Lhs, ldx: usize, m: usize, k: usize, w: &[T], ldw: usize, n0: usize, n1: usize, c: Out, tier: Tier) {
    match (x, T::as_bf16(w)) {
        (Lhs::Bf16(x), Some(w)) => gemm_bf16::rows(gemm_bf16::Nt { x, ldx, m, k, w, ldw }, n0, n1, c),
        (Lhs::F32(x), _) => gemm_nt_rows(Nt { x, ldx, m, k, w, ldw }, n0, n1, c, tier),
        // Not made: `Lhs::Bf16` comes only with bf16 weights. Widened, the product is still right.
        (Lhs::Bf16(xb), None) => {
            let mut xf = vec![0f32; xb.len()];
            widen(xb, &mut xf);
            gemm_nt_rows(Nt { x: &xf, ldx, m, k, w, ldw }, n0, n1, c, tier)
        }
    }
}

/// `X · Wᵀ` (`x` `[m, k]`, `w` `[n, k]`) into a new `[m, n]` f32 buffer, W's rows split over
/// rayon's pool.
fn gemm_nt<T: Weight>(x: &Lhs, m: usize, k: usize, w: &[T], n: usize, tier: Tier) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    if k == 0 || n == 0 {
        return c;
    }
    let out = Out { ptr: c.as_mut_ptr(), ldc: n };
    let threads = rayon::current_num_threads().max(1);
    if threads == 1 || m * n * k < 1 << 18 {
        rows(x, k, m, k, w, k, 0, n, out, tier);
    } else {
        // Two tasks per thread so an uneven split still balances; each of whole tiles.
        let per = n.div_ceil(2 * threads).next_multiple_of(TASK_COLS);
        (0..n.div_ceil(per)).into_par_iter().for_each(|t| {
            // Each task owns columns t·per.. of C: disjoint ranges of the one buffer.
            rows(x, k, m, k, w, k, t * per, ((t + 1) * per).min(n), out, tier)
        });
    }
    c
}

/// `y = x Wᵀ` for `x` `[m, in]` with m ≥ 2 rows and `w` `[out, in]` (f32 or bf16, one dtype) on the
/// CPU: f32 accumulation, one rounding per output. Returns None when the inputs are not that case
/// (the caller falls back to candle's matmul).
pub fn gemm(x: &Tensor, w: &Tensor) -> Option<Result<Tensor>> {
    if linear_rows(x, w).is_none_or(|m| m < 2) {
        return None;
    }
    Some(x.contiguous().and_then(|x| x.apply_op2_no_bwd(w, &Gemm { tier: tier::active() })))
}

struct Gemm {
    /// The kernels' tier (tests run every tier this CPU has).
    tier: Tier,
}

impl CustomOp2 for Gemm {
    fn name(&self) -> &'static str {
        "expanse-gemm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let LinearOperands { x: xr, w: wr, m, n, k } = linear_operands("gemm", l1, l2)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(gemm_nt(&Lhs::f32(&x[xr]), m, k, &w[wr], n, self.tier)),
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                let y = gemm_nt(&Lhs::bf16(&x[xr], self.tier), m, k, &w[wr], n, self.tier);
                let mut out = vec![bf16::ZERO; m * n];
                narrow(&y, &mut out);
                CpuStorage::BF16(out)
            }
            _ => bail!("gemm: f32 or bf16 inputs of one dtype"),
        };
        Ok((out, Shape::from((m, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{rand_tensor, rng, to_vec_f32};
    use candle_core::{DType, Device};

    /// `gemm` (both micro-kernels) against an f64 product of the inputs as stored: every output
    /// within the f32 accumulation bound (a few ulps of Σ|products|) plus one output rounding.
    #[test]
    fn gemm_matches_f64_reference() {
        let _guard = crate::kernels::guard_buffers();
        let mut rng = rng("gemm_matches_f64_reference");
        let tiers = Tier::available();
        // Partial tiles in both directions, depths with a tail and across TK blocks, widths across
        // TB blocks,
        // sizes below and above the threading threshold.
        let shapes = [(2, 1, 1), (5, 17, 7), (6, 16, 64), (7, 33, 257), (13, 300, 1500), (128, 192, 576), (37, 520, 40)];
        for dtype in [DType::F32, DType::BF16] {
            for &(m, n, k) in &shapes {
                let x = rand_tensor(&mut rng, &[m, k], 1.0, dtype, &Device::Cpu);
                let w = rand_tensor(&mut rng, &[n, k], 1.0, dtype, &Device::Cpu);
                let (xs, ws) = (to_vec_f32(&x), to_vec_f32(&w));
                for &tier in &tiers {
                    let y = x.apply_op2_no_bwd(&w, &Gemm { tier }).unwrap();
                    assert_eq!((y.dims(), y.dtype()), (&[m, n][..], dtype));
                    let ys = to_vec_f32(&y);
                    let out_ulp = if dtype == DType::BF16 { 1.0 / 128.0 } else { 0.0 };
                    for i in 0..m {
                        for j in 0..n {
                            let (xr, wr) = (&xs[i * k..][..k], &ws[j * k..][..k]);
                            let want: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                            let mag: f64 = xr.iter().zip(wr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                            let got = ys[i * n + j] as f64;
                            let tol = mag * 1e-6 + want.abs() * out_ulp;
                            assert!((got - want).abs() <= tol, "{dtype:?} {m}x{n}x{k} {tier:?} [{i},{j}]: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    /// A row's outputs are the same bits whatever rows run beside it (how many, and where in a tile
    /// it falls): every tier, f32 and bf16, depths across TK blocks, widths with partial tiles. Serve
    /// reuses cached prompt positions to the token on this (`Model::prompt_rows_invariant`).
    #[test]
    fn a_rows_outputs_do_not_depend_on_the_rows_beside_it() {
        let _guard = crate::kernels::guard_buffers();
        let mut rng = rng("a_rows_outputs_do_not_depend_on_the_rows_beside_it");
        let (m, n, k) = (13, 2 * TB + 7, 2 * TK + 37);
        for dtype in [DType::F32, DType::BF16] {
            let x = rand_tensor(&mut rng, &[m, k], 1.0, dtype, &Device::Cpu);
            let w = rand_tensor(&mut rng, &[n, k], 1.0, dtype, &Device::Cpu);
            let bits = |t: &Tensor| to_vec_f32(t).iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
            for &tier in &Tier::available() {
                let all = bits(&x.apply_op2_no_bwd(&w, &Gemm { tier }).unwrap());
                assert!(all.iter().all(|&b| f32::from_bits(b).is_finite()), "{dtype:?} {tier:?}: outputs not finite");
                // Runs of every length from 2 (one row takes the GEMV) at offsets that move each row
                // to another place in its 4-row tile.
                for (start, len) in [(0, 2), (1, 3), (3, 2), (2, 5), (5, 8), (6, 7), (11, 2)] {
                    let part = bits(&x.narrow(0, start, len).unwrap().apply_op2_no_bwd(&w, &Gemm { tier }).unwrap());
                    for r in 0..len {
                        let (got, want) = (&part[r * n..][..n], &all[(start + r) * n..][..n]);
                        let diff = got.iter().zip(want).position(|(a, b)| a != b);
                        assert!(diff.is_none(), "{dtype:?} {tier:?}: row {} run in rows {start}..{} differs at column {diff:?}", start + r, start + len);
                    }
                }
            }
        }
    }

    /// `matmul_nt` with row strides wider than the rows (what prompt attention passes).
    #[test]
    fn matmul_nt_with_strides_matches_f64_reference() {
        let _guard = crate::kernels::guard_buffers();
        let mut rng = rng("matmul_nt_with_strides_matches_f64_reference");
        let (m, n, k, ldx, ldw, ldc) = (9, 20, 1100, 1103, 1107, 25);
        let x = to_vec_f32(&rand_tensor(&mut rng, &[m * ldx], 1.0, DType::F32, &Device::Cpu));
        let w = to_vec_f32(&rand_tensor(&mut rng, &[n * ldw], 1.0, DType::F32, &Device::Cpu));
        let mut c = vec![f32::NAN; m * ldc];
        matmul_nt(&Lhs::f32(&x), ldx, m, k, &w, ldw, n, &mut c, ldc);
        for i in 0..m {
            for j in 0..n {
                let prods = (0..k).map(|p| x[i * ldx + p] as f64 * w[j * ldw + p] as f64);
                let (want, mag) = prods.fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
                assert!((c[i * ldc + j] as f64 - want).abs() <= mag * 1e-6, "[{i},{j}]: {} vs {want}", c[i * ldc + j]);
            }
            assert!(c[i * ldc + n..][..ldc - n].iter().all(|v| v.is_nan()), "row {i}: wrote past column n");
        }
    }

    /// The one place the tiers' numerics differ by rule: `vdpbf16ps` counts a denormal input as zero
    /// (documented in the README), where the f32 tiles multiply it exactly. Each tier this CPU runs
    /// must do what its rule says.
    #[test]
    fn a_denormal_bf16_input_follows_the_tiers_rule() {
        let tiny = bf16::from_bits(1); // 2^-133, the smallest bf16 denormal
        let x = Tensor::from_vec(vec![tiny, bf16::ZERO, bf16::ONE, bf16::ZERO], (2, 2), &Device::Cpu).unwrap();
        let big = bf16::from_f32(2f32.powi(100));
        let w = Tensor::from_vec(vec![big, bf16::ZERO], (1, 2), &Device::Cpu).unwrap();
        for tier in Tier::available() {
            let y = to_vec_f32(&x.apply_op2_no_bwd(&w, &Gemm { tier }).unwrap());
            let want = if gemm_bf16::runs_on(tier) { 0.0 } else { 2f32.powi(-33) };
            assert_eq!((y[0], y[1]), (want, 2f32.powi(100)), "{tier:?}");
        }
    }

    #[test]
    fn gemm_declines_what_it_does_not_handle() {
        let w = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
        let one_row = Tensor::zeros((1, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(gemm(&one_row, &w).is_none(), "one row is the GEMV's");
        let f16 = Tensor::zeros((3, 8), DType::F16, &Device::Cpu).unwrap();
        assert!(gemm(&f16, &w.to_dtype(DType::F16).unwrap()).is_none());
        let wrong_k = Tensor::zeros((3, 7), DType::F32, &Device::Cpu).unwrap();
        assert!(gemm(&wrong_k, &w).is_none());
    }
}
