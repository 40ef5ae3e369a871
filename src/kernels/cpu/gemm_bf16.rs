//! The AVX512_BF16 prompt product of a bf16 model, `C = X · Wᵀ` with both operands bf16 as stored:
//! `vdpbf16ps` multiplies 16 pairs exactly and adds them into f32 lanes, so nothing is widened (the
//! f32 tiles widen every weight block first). `gemm`'s scheme otherwise — k-contiguous rows, no
//! packing, TK × TB cache blocks — with a 4×4 tile. The instruction is the bound (measured on the
//! Xeon of BENCHMARKS.md: one per two cycles, 16 products a cycle), so 16 accumulators keep it busy;
//! a 4×6 tile spilled accumulators to the stack and ran 1.4× slower. Hand-written: candle has no
//! bf16 dot-product path on the CPU, and llama.cpp's bf16 prompt speed on such CPUs comes from this
//! instruction. Numerics: exact products, f32 sums (a different order from the f32 tiles'), and the
//! instruction's own rule that denormal inputs and sums count as zero (bf16 values below 1.2e-38).

// On other architectures only `runs_on` (always false) is used.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use super::gemm::Out;
use super::tier::Tier;
use half::bf16;

/// Rows of x per tile.
const TM: usize = 4;
/// Rows of W per tile.
pub(super) const TN: usize = 4;
/// Depth block: a TM×TK slice of x (8 KB) stays in L1 while the W block streams from L2.
const TK: usize = 1024;
/// W rows per block: TB×TK bf16 (96 KB) stays in L2 while every tile of x passes over it.
const TB: usize = 48;

/// Whether `tier` runs this product (the caller keeps bf16 activations as stored for it).
pub(super) fn runs_on(tier: Tier) -> bool {
    cfg!(target_arch = "x86_64") && tier.avx512bf16()
}

/// Row-major bf16 operands of `C = X · Wᵀ`: `x` `[m, k]` and `w` `[n, k]`, rows `ldx`, `ldw` apart.
#[derive(Clone, Copy)]
pub(super) struct Nt<'a> {
    pub x: &'a [bf16],
    pub ldx: usize,
    pub m: usize,
    pub k: usize,
    pub w: &'a [bf16],
    pub ldw: usize,
}

/// One tile: `C[RM × RN] (+)= x[RM, k] · w[RN, k]ᵀ`.
type Tile = unsafe fn(k: usize, x: *const bf16, ldx: usize, w: *const bf16, ldw: usize, c: *mut f32, ldc: usize, accumulate: bool);

#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use half::bf16;
    use std::arch::x86_64::*;

    /// The bf16 pairs at `p` whose lanes `mask` selects (the rest 0, which adds nothing).
    #[inline(always)]
    unsafe fn load(p: *const bf16, mask: __mmask32) -> __m512bh {
        // SAFETY: both are 512-bit vectors; __m512bh only retypes the lanes as bf16 pairs.
        std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(mask, p as *const i16))
    }

    /// SAFETY (callers): the CPU has AVX-512F/BW and AVX512_BF16; x holds RM rows and w RN rows of
    /// `k` readable values; c RM rows of RN writable.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)] // a micro-kernel's operands: pointers and leading dimensions
    pub(super) unsafe fn tile<const RM: usize, const RN: usize>(
        k: usize,
        x: *const bf16,
        ldx: usize,
        w: *const bf16,
        ldw: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); RN]; RM];
        // One step of 32 depth values; indexed loops over the const sizes unroll fully, so the
        // accumulators stay in registers (iterator chains here spilled them to the stack).
        macro_rules! step {
            ($p:expr, $mask:expr) => {{
                let mut wv = [load(w.add($p), $mask); RN];
                for j in 1..RN {
                    wv[j] = load(w.add(j * ldw + $p), $mask);
                }
                for i in 0..RM {
                    let xv = load(x.add(i * ldx + $p), $mask);
                    for j in 0..RN {
                        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
                    }
                }
            }};
        }
        let main = k / 32 * 32;
        let mut p = 0;
        while p < main {
            step!(p, !0);
            p += 32;
        }
        if main < k {
            // The depth's tail: masked-off lanes load as 0 and add nothing (an odd depth too).
            step!(main, (1u32 << (k - main)) - 1);
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

/// The tile kernel for an `rm × rn` tile (1 ≤ rm ≤ TM, 1 ≤ rn ≤ TN).
#[cfg(target_arch = "x86_64")]
fn tile(rm: usize, rn: usize) -> Tile {
    use avx512bf16::tile as t;
    fn row<const RM: usize>(rn: usize) -> Tile {
        match rn {
            4 => t::<RM, 4>,
            3 => t::<RM, 3>,
            2 => t::<RM, 2>,
            _ => t::<RM, 1>,
        }
    }
    match rm {
        4 => row::<4>(rn),
        3 => row::<3>(rn),
        2 => row::<2>(rn),
        _ => row::<1>(rn),
    }
}

/// `C[:, n0..n1] = X · W[n0..n1]ᵀ` on this thread.
pub(super) fn rows(op: Nt, n0: usize, n1: usize, c: Out) {
    // The tile is AVX512_BF16 code: a CPU without it must stop here, not fault.
    assert!(runs_on(Tier::Avx512Bf16) && Tier::Avx512Bf16.supported(), "gemm_bf16 on a CPU without AVX512_BF16");
    let Nt { x, ldx, m, k, w, ldw } = op;
    let fits = |len: usize, rows: usize, ld: usize| rows == 0 || len >= (rows - 1) * ld + k;
    assert!(fits(x.len(), m, ldx) && fits(w.len(), n1, ldw), "gemm_bf16: operand too small");
    #[cfg(target_arch = "x86_64")]
    for k0 in (0..k).step_by(TK) {
        let kc = TK.min(k - k0);
        for b0 in (n0..n1).step_by(TB) {
            let b1 = (b0 + TB).min(n1);
            for i0 in (0..m).step_by(TM) {
                let rm = TM.min(m - i0);
                for j0 in (b0..b1).step_by(TN) {
                    let rn = TN.min(b1 - j0);
                    // SAFETY: the tier has AVX512_BF16 (`runs_on`); rows i0.. +rm of x and j0.. +rn
                    // of w hold kc values from column k0 (checked above); C's rows i0.. and columns
                    // j0.. +rn are inside it and this task's.
                    unsafe {
                        tile(rm, rn)(kc, x.as_ptr().add(i0 * ldx + k0), ldx, w.as_ptr().add(j0 * ldw + k0), ldw, c.ptr.add(i0 * c.ldc + j0), c.ldc, k0 > 0)
                    };
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, w, n0, c);
}
