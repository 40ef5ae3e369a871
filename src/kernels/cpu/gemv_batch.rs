//! The CPU decode product of a batch (`serve --parallel`: m sequences, one row each, times a weight):
//! every output the bits the one-row GEMV (`gemv`) gives it alone, the weights read from memory once
//! for all rows. Written by hand: no crate's GEMM promises a row's bits independent of the batch.
//!
//! How the bits stay the same: the one-row loops keep four accumulators per output and add a step's
//! four slices into them in turn, so accumulator k is a dot over every fourth slice, independent of
//! the other three. A register tile of R activation rows × C weight rows keeps all four per output
//! where they fit (R × C ≤ 6 in 512-bit registers, ≤ 3 in 256-bit ones), else two of the four in a
//! pass (accumulators 0 and 1, then 2 and 3; the first pass's sums wait on the stack), adding the same
//! products in the same order, and sums them as the one-row loop does; on 512-bit tiers the lanes are
//! then folded sixteen outputs at a time by the very additions of the one-row `reduce` (on AVX2 each
//! output's by the one-row loop's `hsum`, then its scalar tail).
//!
//! The tile's shape follows the batch ([`tile_for`]): below about 8 rows one weight row per tile (one
//! stream from memory), above it 3 weight rows sharing each activation load. Measured (Zen 4,
//! BENCHMARKS.md): a decode step of the 135M model at 2 rows 1.8× (f32) and 2.0× (bf16) the 4 × 3
//! two-pass tiles before, at 4 rows 1.6× and 1.9×, at 16 rows 1.09× and 1.19×.

use super::gemv::{gemv_chunk, gemv_rows, linear_cpu_fwd, DotElem};
use super::linear_rows;
use super::tier::{self, Tier};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

/// `y = x Wᵀ` for `x` `[m, in]` on the CPU, each row's outputs the bits [`super::gemv`] gives that row
/// alone (batch invariance: a sequence decoded beside others gets the logits it gets alone), the
/// weights read from memory once for all rows. None where `gemv` would decline.
pub fn gemv_batch(x: &Tensor, w: &Tensor) -> Option<Result<Tensor>> {
    if linear_rows(x, w).is_none_or(|m| m == 0) {
        return None;
    }
    Some(x.contiguous().and_then(|x| x.apply_op2_no_bwd(w, &GemvBatch)))
}

struct GemvBatch;

impl CustomOp2 for GemvBatch {
    fn name(&self) -> &'static str {
        "expanse-gemv-batch"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        linear_cpu_fwd("gemv_batch", (s1, l1), (s2, l2), gemv_batch_rows::<f32>, gemv_batch_rows::<bf16>)
    }
}

/// `out[i·o + r] = x_i · w_r` (`o` = `out.len() / m` weight rows) for the `m` rows of `x`: every output
/// the bits [`gemv_rows`] gives that row alone. Tasks of weight rows as in `gemv_rows`.
pub(crate) fn gemv_batch_rows<T: BatchElem>(x: &[f32], m: usize, w: &[T], out: &mut [f32]) {
    if m <= 1 || x.is_empty() {
        // (An empty depth: every output is 0.)
        return if m <= 1 { gemv_rows(x, w, out) } else { out.fill(0.0) };
    }
    let (n, out_dim) = (x.len() / m, out.len() / m);
    debug_assert_eq!((x.len(), w.len()), (m * n, n * out_dim));
    let tier = tier::active();
    let chunk = gemv_chunk(out_dim);
    let tasks: Vec<Vec<f32>> = w
        .par_chunks(chunk * n)
        .map(|wc| {
            let mut o = vec![0f32; m * (wc.len() / n)];
            T::dot_batch(x, m, wc, &mut o, tier);
            o
        })
        .collect();
    for (t, o) in tasks.iter().enumerate() {
        let (start, rows) = (t * chunk, o.len() / m);
        for (dst, src) in out.chunks_exact_mut(out_dim).zip(o.chunks_exact(rows)) {
            dst[start..start + rows].copy_from_slice(src);
        }
    }
}

/// Bytes of one weight panel of the portable batch loop: a panel stays in L2 (≥ 1 MB per core on the
/// CPUs of BENCHMARKS.md) while every activation row passes it.
const PANEL_BYTES: usize = 32 << 10;

/// A weight element of batched decode products.
pub(crate) trait BatchElem: DotElem + Send {
    /// `out[q·r + j] = dot(x_q, w_j)` for the `m` rows of `x` and the `r` = `out.len() / m` rows of `w`,
    /// each output the bits [`DotElem::dot`] gives it. Register tiles where the tier has them; else
    /// each row's `dot` over panels of `w` small enough to stay in cache while every row passes.
    fn dot_batch(x: &[f32], m: usize, w: &[Self], out: &mut [f32], tier: Tier) {
        by_panels(x, m, w, out, tier)
    }
}

fn by_panels<T: DotElem>(x: &[f32], m: usize, w: &[T], out: &mut [f32], tier: Tier) {
    let (n, rows) = (x.len() / m, out.len() / m);
    let panel = (PANEL_BYTES / (n * std::mem::size_of::<T>()).max(1)).max(1);
    for (p, wp) in w.chunks(panel * n).enumerate() {
        let at = p * panel;
        for (xq, oq) in x.chunks_exact(n).zip(out.chunks_exact_mut(rows)) {
            T::dot(xq, wp, &mut oq[at..at + wp.len() / n], tier);
        }
    }
}

/// The sizes the tile loops rely on, `(n, rows)`: `m` rows of one depth `n > 0` in `x`, whole rows in
/// `w`, one output per (row, weight row). `gemv_batch_rows` cuts them so (from `linear_operands`'
/// checked shapes); anything else is a bug, stopped before a tile reads out of bounds.
#[cfg(target_arch = "x86_64")]
fn shapes_agree<T>(x: &[f32], m: usize, w: &[T], out: &[f32]) -> (usize, usize) {
    let n = x.len().checked_div(m).unwrap_or(0);
    let rows = w.len().checked_div(n).unwrap_or(0);
    let agree = n > 0 && x.len() == m * n && w.len() == rows * n && out.len() == m * rows;
    assert!(agree, "gemv_batch: x {} for {m} rows, w {}, out {}", x.len(), w.len(), out.len());
    (n, rows)
}

/// Calls `tile(q0, r, j0, c)` for each register tile: weight rows `j0..j0 + c` (up to `cols`) against
/// activation rows `q0..q0 + r` (up to `rows_x`); each group of weight rows passes every activation
/// row while it is in cache.
#[cfg(target_arch = "x86_64")]
fn by_tiles(m: usize, rows: usize, (rows_x, cols): (usize, usize), mut tile: impl FnMut(usize, usize, usize, usize)) {
    let mut j0 = 0;
    while j0 < rows {
        let c = (rows - j0).min(cols);
        let mut q0 = 0;
        while q0 < m {
            let r = (m - q0).min(rows_x);
            tile(q0, r, j0, c);
            q0 += r;
        }
        j0 += c;
    }
}

/// `$f::<R, C>(args)` for the run-time tile shape `(r, c)`: every shape `by_tiles` cuts from
/// [`tile_for`]'s (4 × 1 and 2 × 3 on 512-bit tiers, 3 × 1 and 2 × 3 on 256-bit ones, and their edges).
#[cfg(target_arch = "x86_64")]
macro_rules! tile_shape {
    ($m:ident::$f:ident, $r:expr, $c:expr, $args:tt) => {
        match ($r, $c) {
            (1, 1) => $m::$f::<1, 1> $args,
            (2, 1) => $m::$f::<2, 1> $args,
            (3, 1) => $m::$f::<3, 1> $args,
            (4, 1) => $m::$f::<4, 1> $args,
            (1, 2) => $m::$f::<1, 2> $args,
            (2, 2) => $m::$f::<2, 2> $args,
            (1, 3) => $m::$f::<1, 3> $args,
            (2, 3) => $m::$f::<2, 3> $args,
            (r, c) => unreachable!("no {r} × {c} tile"),
        }
    };
}

/// The register tile `(activation rows, weight rows)` for a batch of `m` rows on a 512-bit (`wide`) or
/// 256-bit tier. Few rows: one weight row per tile, so the weights stream from memory as one run per
/// row: tiles of 3 weight rows read them as three interleaved streams and stalled on them (a 2-row
/// decode step slower than one row's; as the K-quant decode tiles found on the same cores). Many
/// rows: 3 weight rows per tile, each activation load shared by three, the weight rows' group read
/// from memory by the first tile and from cache by the rest. The crossover (Zen 4, one thread, the
/// 135M model's decode step): 8 rows on 512-bit tiles, 9 on 256-bit ones. Not measured on Intel cores.
#[cfg(target_arch = "x86_64")]
fn tile_for(m: usize, wide: bool) -> (usize, usize) {
    match (wide, m) {
        (true, ..8) => (4, 1),
        (false, ..9) => (3, 1),
        _ => (2, 3),
    }
}

impl BatchElem for f32 {
    fn dot_batch(x: &[f32], m: usize, w: &[f32], out: &mut [f32], tier: Tier) {
        // The loops run the tier's instructions: a tier this CPU lacks must stop here, not fault.
        assert!(tier.supported(), "gemv_batch: the {} tier on a CPU without it", tier.name());
        #[cfg(target_arch = "x86_64")]
        if tier.avx2() {
            let (n, rows) = shapes_agree(x, m, w, out);
            let (xp, wp, op) = (x.as_ptr(), w.as_ptr(), out.as_mut_ptr());
            let shape = tile_for(m, tier.avx512());
            by_tiles(m, rows, shape, |q0, r, j0, c| {
                // SAFETY: the tier is one this CPU runs (asserted above); `shapes_agree` asserted x holds
                // m rows of n, w `rows` rows of n and out m × rows, and by_tiles keeps q0 + r ≤ m,
                // j0 + c ≤ rows, r ≤ 4 and c ≤ 3.
                unsafe {
                    let (x, w, out) = (xp.add(q0 * n), wp.add(j0 * n), op.add(q0 * rows + j0));
                    if tier.avx512() {
                        tile_shape!(avx512::tile_f32, r, c, (x, w, n, out, rows, q0 == 0))
                    } else {
                        tile_shape!(avx2::tile_f32, r, c, (x, w, n, out, rows))
                    }
                }
            });
            return;
        }
        by_panels(x, m, w, out, tier)
    }
}

impl BatchElem for bf16 {
    fn dot_batch(x: &[f32], m: usize, w: &[bf16], out: &mut [f32], tier: Tier) {
        assert!(tier.supported(), "gemv_batch: the {} tier on a CPU without it", tier.name());
        #[cfg(target_arch = "x86_64")]
        if tier.avx512bf16() {
            let (n, rows) = shapes_agree(x, m, w, out);
            // The activations are bf16 values (a bf16 model's, widened): narrowed back exactly, once,
            // by the one-row loop's own narrowing.
            let xb: Vec<bf16> = x.iter().map(|&v| <bf16 as super::Elem>::from_f32(v)).collect();
            let (xp, wp, op) = (xb.as_ptr(), w.as_ptr(), out.as_mut_ptr());
            by_tiles(m, rows, tile_for(m, true), |q0, r, j0, c| {
                // SAFETY: as for f32 (xb has x's length). The prefetches may point past `w`: a prefetch
                // never faults.
                unsafe { tile_shape!(avx512::tile_bf16, r, c, (xp.add(q0 * n), wp.add(j0 * n), n, op.add(q0 * rows + j0), rows, q0 == 0)) }
            });
            return;
        }
        by_panels(x, m, w, out, tier)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The tiles of the 512-bit one-row loops (`gemv::avx512::dot_f32`, `dot_bf16`).
    use super::super::gemv::avx512::{load_bf16, mask32};
    use half::bf16;
    use std::arch::x86_64::*;

    /// `out[q·stride + c] = dot_f32(x_q, w_c)` for R rows of `x` and C rows of `w` (each `n` long,
    /// contiguous), the same bits. `dot_f32` adds slice k (16 lanes) of every 64-wide step into its
    /// accumulator k; here every output keeps its four (4·R·C registers, R·C ≤ 6), the depth's tail
    /// goes into accumulator 0 after its steps, as there, and the four are summed
    /// as there: (a0 + a1) + (a2 + a3), then the lanes by `reduce`'s folds. `ahead`: the first tile
    /// of a weight group, which brings the next group's rows (the C after these) toward the cache.
    /// SAFETY (callers): the CPU has AVX-512F; `x` holds R rows of `n`, `w` C rows of `n`, and `out`
    /// R rows of `stride` ≥ C.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // indexed loops over the const sizes unroll fully
    pub(super) unsafe fn tile_f32<const R: usize, const C: usize>(x: *const f32, w: *const f32, n: usize, out: *mut f32, stride: usize, ahead: bool) {
        let main = n / 64 * 64;
        const { assert!(R * C <= 6, "four accumulators per output in 24 of the 32 registers") };
        let mut acc = [[[_mm512_setzero_ps(); 4]; C]; R];
        let mut step = 0;
        while step < main {
            for k in 0..4 {
                let i = step + 16 * k;
                let mut xv = [_mm512_setzero_ps(); R];
                for q in 0..R {
                    xv[q] = _mm512_loadu_ps(x.add(q * n + i));
                }
                for c in 0..C {
                    if ahead {
                        // The next group's rows follow these in memory: ask for its line of this
                        // slice while this group is used. One group ahead measured 3 % faster than
                        // none on a 16-row decode step, two groups ahead 7 % slower (Zen 4, with the
                        // 4 × 3 tiles before these shapes; not re-measured on them).
                        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((C + c) * n + i).cast());
                    }
                    let wv = _mm512_loadu_ps(w.add(c * n + i));
                    for q in 0..R {
                        acc[q][c][k] = _mm512_fmadd_ps(xv[q], wv, acc[q][c][k]);
                    }
                }
            }
            step += 64;
        }
        let mut i = main;
        while i < n {
            let m = mask32(n - i) as __mmask16;
            for c in 0..C {
                let wv = _mm512_maskz_loadu_ps(m, w.add(c * n + i));
                for q in 0..R {
                    acc[q][c][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x.add(q * n + i)), wv, acc[q][c][0]);
                }
            }
            i += 16;
        }
        store_sums::<R, C>(&acc, out, stride);
    }

    /// `tile_f32` of the bf16 loop (`dot_bf16`): 128-wide steps of four 32-pair slices, `vdpbf16ps`.
    /// SAFETY (callers): the CPU has AVX-512F/BW and AVX512_BF16; sizes as for `tile_f32`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::needless_range_loop)] // as in tile_f32
    pub(super) unsafe fn tile_bf16<const R: usize, const C: usize>(x: *const bf16, w: *const bf16, n: usize, out: *mut f32, stride: usize, ahead: bool) {
        let main = n / 128 * 128;
        const { assert!(R * C <= 6, "four accumulators per output in 24 of the 32 registers") };
        let mut acc = [[[_mm512_setzero_ps(); 4]; C]; R];
        let mut step = 0;
        while step < main {
            for k in 0..4 {
                let i = step + 32 * k;
                let mut xv = [load_bf16(x, 0); R];
                for q in 0..R {
                    xv[q] = load_bf16(x.add(q * n + i), !0);
                }
                for c in 0..C {
                    if ahead {
                        // As in tile_f32.
                        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((C + c) * n + i).cast());
                    }
                    let wv = load_bf16(w.add(c * n + i), !0);
                    for q in 0..R {
                        acc[q][c][k] = _mm512_dpbf16_ps(acc[q][c][k], xv[q], wv);
                    }
                }
            }
            step += 128;
        }
        let mut i = main;
        while i < n {
            let m = mask32(n - i);
            for c in 0..C {
                let wv = load_bf16(w.add(c * n + i), m);
                for q in 0..R {
                    acc[q][c][0] = _mm512_dpbf16_ps(acc[q][c][0], load_bf16(x.add(q * n + i), m), wv);
                }
            }
            i += 32;
        }
        store_sums::<R, C>(&acc, out, stride);
    }

    /// `out[q·stride + c]` = the four accumulators of output (q, c) summed as the one-row loops sum
    /// them, (a0 + a1) + (a2 + a3), then the lanes added by `reduce`'s folds: sixteen outputs at
    /// once by [`fold16`] (a quarter of the instructions of one fold each), fewer padded with zero
    /// vectors, which never meet a real output's lanes (a tile of one output too: adding +0 to a sum
    /// would turn -0 into +0).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // as in tile_f32
    unsafe fn store_sums<const R: usize, const C: usize>(acc: &[[[__m512; 4]; C]; R], out: *mut f32, stride: usize) {
        const { assert!(R * C <= 16, "one fold16 per tile") };
        let mut v = [_mm512_setzero_ps(); 16];
        for k in 0..R * C {
            let a = &acc[k / C][k % C];
            v[k] = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
        }
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), fold16(v));
        for k in 0..R * C {
            *out.add(k / C * stride + k % C) = lanes[4 * (k % 4) + k / 4];
        }
    }

    /// `reduce`'s folds (16 → 8 → 4 → 2 → 1 lanes, each addition's operands as there) of sixteen
    /// vectors at once: output i lands in lane 4·(i % 4) + i / 4.
    #[inline(always)]
    unsafe fn fold16(v: [__m512; 16]) -> __m512 {
        // 16 → 8: vector j holds v[2j]'s eight sums, then v[2j + 1]'s (low half + high half).
        let mut t = [_mm512_setzero_ps(); 8];
        for (j, tj) in t.iter_mut().enumerate() {
            let (a, b) = (v[2 * j], v[2 * j + 1]);
            *tj = _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(a, b), _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b));
        }
        // 8 → 4: 128-bit lane g of vector j holds v[4j + g]'s four sums.
        let mut u = [_mm512_setzero_ps(); 4];
        for (j, uj) in u.iter_mut().enumerate() {
            let (a, b) = (t[2 * j], t[2 * j + 1]);
            *uj = _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b));
        }
        // 4 → 2 (lanes 0 + 2, 1 + 3, as `movehl`): lane g of vector j holds v[8j + g]'s two, then
        // v[8j + 4 + g]'s.
        let mut w = [_mm512_setzero_ps(); 2];
        for (j, wj) in w.iter_mut().enumerate() {
            let (a, b) = (u[2 * j], u[2 * j + 1]);
            *wj = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b));
        }
        // 2 → 1: lane g holds v[g], v[4 + g], v[8 + g], v[12 + g].
        _mm512_add_ps(_mm512_shuffle_ps::<0x88>(w[0], w[1]), _mm512_shuffle_ps::<0xDD>(w[0], w[1]))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The tiles of the 256-bit one-row f32 loop (`gemv::avx2::dot_f32`).
    use super::super::gemv::avx2::hsum;
    use std::arch::x86_64::*;

    /// `out[q·stride + c] = dot_f32(x_q, w_c)` with the 256-bit loop's bits: as `avx512::tile_f32`
    /// over 32-wide steps of four 8-lane slices (in one pass or two), the four accumulators summed as
    /// there, then the
    /// depth's tail added one product at a time, as there.
    /// SAFETY (callers): the CPU has AVX2 and FMA; sizes as for `avx512::tile_f32`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // as in avx512::tile_f32
    pub(super) unsafe fn tile_f32<const R: usize, const C: usize>(x: *const f32, w: *const f32, n: usize, out: *mut f32, stride: usize) {
        let main = n / 32 * 32;
        // All four accumulators of every output in one pass where they fit in the 16 registers with
        // the loads (R·C ≤ 3), else two passes of two (slices 0 and 1, then 2 and 3).
        let per_pass = if R * C <= 3 { 4 } else { 2 };
        let mut sums = [[_mm256_setzero_ps(); C]; R];
        for h in 0..4 / per_pass {
            let mut acc = [[[_mm256_setzero_ps(); 4]; C]; R];
            let mut step = 0;
            while step < main {
                for j in 0..per_pass {
                    let i = step + 8 * (per_pass * h + j);
                    let mut xv = [_mm256_setzero_ps(); R];
                    for q in 0..R {
                        xv[q] = _mm256_loadu_ps(x.add(q * n + i));
                    }
                    for c in 0..C {
                        let wv = _mm256_loadu_ps(w.add(c * n + i));
                        for q in 0..R {
                            acc[q][c][j] = _mm256_fmadd_ps(xv[q], wv, acc[q][c][j]);
                        }
                    }
                }
                step += 32;
            }
            for q in 0..R {
                for c in 0..C {
                    let a = &acc[q][c];
                    let part = if per_pass == 4 { _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])) } else { _mm256_add_ps(a[0], a[1]) };
                    sums[q][c] = if h == 0 { part } else { _mm256_add_ps(sums[q][c], part) };
                }
            }
        }
        for q in 0..R {
            for c in 0..C {
                let mut s = hsum(sums[q][c]);
                for j in main..n {
                    s += *x.add(q * n + j) * *w.add(c * n + j);
                }
                *out.add(q * stride + c) = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::{fill_normal, mix64};
    use candle_core::{DType, Device};

    fn fresh_seed() -> u64 {
        mix64(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64)
    }

    fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut v = vec![0f32; n];
        fill_normal(&mut v, seed, 0.0, 1.0);
        v
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// `dot_batch` on every tier this CPU runs gives each output the bits the one-row `dot` gives it:
    /// fresh random rows, batches that fill whole tiles and leave every kind of partial tile, depths
    /// with every kind of tail of the 32-, 64- and 128-wide steps. Outputs start as NaN and must all be
    /// finite first (NaN's bits equal NaN's bits: an output no tile wrote could pass the bit check).
    #[test]
    fn a_batch_tiles_outputs_are_each_rows_own_dot_on_every_tier() {
        let seed = fresh_seed();
        // (rows, weight rows, depth): every tile `tile_for` picks (4 × 1 below 8 rows and 2 × 3 from
        // 8 on 512-bit tiers; 3 × 1 to 8 rows and two-pass 2 × 3 above on AVX2) and their edges, depths
        // below one 16-lane slice, between steps, and long.
        let shapes = [
            (2, 1, 64),
            (2, 5, 3),
            (3, 7, 100),
            (4, 6, 576),
            (5, 13, 17),
            (6, 8, 9),
            (6, 7, 40),
            (7, 11, 4096 + 160 + 7),
            (9, 5, 128 + 32 + 31),
            (16, 25, 1536),
        ];
        for (k, (m, rows, n)) in shapes.into_iter().enumerate() {
            let s = seed.wrapping_add(10 * k as u64);
            let x = normal(m * n, s);
            // bf16 values, as a bf16 model's activations are (the bf16 loops' contract).
            let xb: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            let wf = normal(rows * n, s + 1);
            let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            for tier in Tier::available() {
                let lone = |one: &dyn Fn(&[f32], &mut [f32]), x: &[f32]| -> Vec<f32> {
                    let mut o = vec![0f32; m * rows];
                    for (xq, oq) in x.chunks_exact(n).zip(o.chunks_exact_mut(rows)) {
                        one(xq, oq);
                    }
                    o
                };
                let want_f32 = lone(&|xq, oq| f32::dot(xq, &wf, oq, tier), &x);
                let want_bf16 = lone(&|xq, oq| bf16::dot(xq, &wb, oq, tier), &xb);
                let mut got = vec![f32::NAN; m * rows];
                f32::dot_batch(&x, m, &wf, &mut got, tier);
                assert!(got.iter().all(|v| v.is_finite()), "f32 {tier:?} seed {s} [{m}, {n}]·[{rows}, {n}]ᵀ: an output left unwritten");
                assert!(bits(&got) == bits(&want_f32), "f32 {tier:?} seed {s} [{m}, {n}]·[{rows}, {n}]ᵀ");
                let mut got = vec![f32::NAN; m * rows];
                bf16::dot_batch(&xb, m, &wb, &mut got, tier);
                assert!(got.iter().all(|v| v.is_finite()), "bf16 {tier:?} seed {s} [{m}, {n}]·[{rows}, {n}]ᵀ: an output left unwritten");
                assert!(bits(&got) == bits(&want_bf16), "bf16 {tier:?} seed {s} [{m}, {n}]·[{rows}, {n}]ᵀ");
            }
        }
    }

    /// Products that all underflow sum to -0 alone on the FMA loops; a batch must give the lone sign
    /// too (not +0 from an added zero), in every tile family `tile_for` picks (one weight row per
    /// tile below 8 rows, 2 × 3 tiles from 8 and their AVX2 two-pass form), on every tier.
    #[test]
    fn an_underflowing_sum_keeps_its_sign_in_a_batch() {
        for (m, rows, n) in [(5, 1, 64), (1, 4, 64), (5, 4, 40), (2, 2, 130), (8, 4, 64), (9, 4, 64), (16, 3, 128)] {
            let x = vec![1e-30f32; m * n];
            let wf = vec![-1e-30f32; rows * n];
            let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let xb: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            for tier in Tier::available() {
                let mut lone = vec![f32::NAN; rows];
                f32::dot(&x[..n], &wf, &mut lone, tier);
                // The FMA loops keep the sign (-tiny + 0 rounds to -0) where every lane gets products
                // (depths of whole 64-wide steps; a lane with none stays +0, and -0 + +0 = +0); the
                // portable loop multiplies, then adds -0 to its +0 start: +0. The batch must agree.
                if cfg!(target_arch = "x86_64") && tier.avx2() && n % 64 == 0 {
                    assert!(lone.iter().all(|v| v.to_bits() == (-0f32).to_bits()), "f32 {tier:?}: the lone dot gives {lone:?}, not -0");
                }
                let mut got = vec![f32::NAN; m * rows];
                f32::dot_batch(&x, m, &wf, &mut got, tier);
                assert!(bits(&got) == bits(&lone.repeat(m)), "f32 {tier:?} [{m}, {n}]·[{rows}, {n}]ᵀ: {got:?} alone {lone:?}");
                bf16::dot(&xb[..n], &wb, &mut lone, tier);
                let mut got = vec![f32::NAN; m * rows];
                bf16::dot_batch(&xb, m, &wb, &mut got, tier);
                assert!(bits(&got) == bits(&lone.repeat(m)), "bf16 {tier:?} [{m}, {n}]·[{rows}, {n}]ᵀ: {got:?} alone {lone:?}");
            }
        }
    }

    /// Each row of a batch gets the bits it gets alone through the whole op (threaded tasks, bf16
    /// rounding): fresh random rows and weights, batches of 2 to 17 rows, below and above the
    /// threading threshold.
    #[test]
    fn a_batch_rows_outputs_are_its_lone_outputs_bit_for_bit() {
        let _guard = crate::kernels::guard_buffers();
        let seed = fresh_seed();
        for dtype in [DType::F32, DType::BF16] {
            for (i, (m, out_dim, in_dim)) in [(2, 9, 40), (5, 300, 576), (16, 1000, 4096 + 32), (17, 37, 96)].into_iter().enumerate() {
                let s = seed.wrapping_add(i as u64 * 7);
                let x = Tensor::from_vec(normal(m * in_dim, s), (m, in_dim), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let w = Tensor::from_vec(normal(out_dim * in_dim, s + 1), (out_dim, in_dim), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let bits = |t: &Tensor| bits(&t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
                let batch = gemv_batch(&x, &w).expect("CPU f32/bf16 rows").unwrap();
                assert_eq!(batch.dims(), &[m, out_dim]);
                for r in 0..m {
                    let alone = super::super::gemv(&x.narrow(0, r, 1).unwrap(), &w).unwrap().unwrap();
                    assert!(bits(&batch.narrow(0, r, 1).unwrap()) == bits(&alone), "{dtype:?} seed {s} [{m}, {in_dim}]·[{out_dim}, {in_dim}]ᵀ row {r}");
                }
            }
        }
    }
}
