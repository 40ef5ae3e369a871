//! The Q4_K × q8_K tile. A Q4_K block is 256 weights in eight sub-blocks of 32: 4-bit quants q, a
//! 6-bit scale s and min m per sub-block, f16 super-scales d and dmin; weight = d·s·q − dmin·m. So
//! a dot with a q8_K block (d_x, quants x, sums of x per 16) is
//! `d·d_x · Σ_j s_j Σ q·x − dmin·d_x · Σ_j m_j (bsum₂ⱼ + bsum₂ⱼ₊₁)`: the nibbles are unpacked once
//! per weight block and serve every activation row of the tile; q·x pairs (`vpmaddubsw`, no
//! overflow: 2·15·127) are weighted by the sub-block's scale into 32-bit sums (`vpdpwssd`). The
//! formula is ggml's `ggml_vec_dot_q4_K_q8_K`; the tiling is ours.

#![cfg(target_arch = "x86_64")]
// Indexed loops over the const tile sizes unroll fully and keep the accumulators in registers.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::int8::{f16_at, f32_at, hsum, load, tiles_for, Isa};

/// Bytes of a Q4_K block: d, dmin (f16), 12 bytes of packed scales and mins, 128 of nibbles.
pub(super) const BLOCK: usize = 144;
/// Bytes of a q8_K block: d (f32), 256 quants, 16 sums (i16) of 16 quants each.
pub(super) const Q8K_BLOCK: usize = 292;

/// The eight 6-bit scales and mins packed in 12 bytes (ggml's `get_scale_min_k4`); the row tiles and
/// the lanes' repack both read them here.
#[inline(always)]
pub(super) fn scales_mins(s: [u8; 12]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// # Safety
/// As [`super::int8::Tile`]: the CPU has `I`'s instructions; `w` holds RW rows of `kb` Q4_K blocks,
/// `x` RX rows of `kb` q8_K blocks, at the given strides; `out[c·ldo + r]` is writable.
#[inline(always)]
unsafe fn tile<I: Isa, const RW: usize, const RX: usize>(kb: usize, w: *const u8, ldw: usize, x: *const u8, ldx: usize, out: *mut f32, ldo: usize) {
    let nibble = _mm256_set1_epi8(0xF);
    let mut acc = [[_mm256_setzero_ps(); RX]; RW];
    for b in 0..kb {
        // Plain loops, no closures: a closure is a function of its own, compiled without the
        // wrapper's target features, and its intrinsics would become calls.
        let (mut wb, mut xb) = ([w; RW], [x; RX]);
        let mut packed = [([0u8; 8], [0u8; 8]); RW];
        for r in 0..RW {
            wb[r] = w.add(r * ldw + b * BLOCK);
            packed[r] = scales_mins(wb[r].add(4).cast::<[u8; 12]>().read_unaligned());
        }
        for c in 0..RX {
            xb[c] = x.add(c * ldx + b * Q8K_BLOCK);
        }
        let mut isum = [[_mm256_setzero_si256(); RX]; RW];
        for j in 0..4 {
            let mut lo = [_mm256_setzero_si256(); RW];
            let mut hi = [_mm256_setzero_si256(); RW];
            let mut s_lo = [_mm256_setzero_si256(); RW];
            let mut s_hi = [_mm256_setzero_si256(); RW];
            for r in 0..RW {
                let q = load(wb[r].add(16 + 32 * j));
                lo[r] = _mm256_and_si256(q, nibble);
                hi[r] = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
                s_lo[r] = _mm256_set1_epi16(packed[r].0[2 * j] as i16);
                s_hi[r] = _mm256_set1_epi16(packed[r].0[2 * j + 1] as i16);
            }
            for c in 0..RX {
                let x_lo = load(xb[c].add(4 + 64 * j));
                let x_hi = load(xb[c].add(4 + 64 * j + 32));
                for r in 0..RW {
                    isum[r][c] = I::dpwssd(isum[r][c], _mm256_maddubs_epi16(lo[r], x_lo), s_lo[r]);
                    isum[r][c] = I::dpwssd(isum[r][c], _mm256_maddubs_epi16(hi[r], x_hi), s_hi[r]);
                }
            }
        }
        for r in 0..RW {
            let (d, dmin) = (f16_at(wb[r]), f16_at(wb[r].add(2)));
            // Each min twice: it weighs both 16-value sums of its sub-block.
            let m = packed[r].1;
            let mins = _mm256_setr_epi16(
                m[0] as i16,
                m[0] as i16,
                m[1] as i16,
                m[1] as i16,
                m[2] as i16,
                m[2] as i16,
                m[3] as i16,
                m[3] as i16,
                m[4] as i16,
                m[4] as i16,
                m[5] as i16,
                m[5] as i16,
                m[6] as i16,
                m[6] as i16,
                m[7] as i16,
                m[7] as i16,
            );
            for c in 0..RX {
                let dx = f32_at(xb[c]);
                let bsum_m = _mm256_madd_epi16(load(xb[c].add(260)), mins);
                acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(isum[r][c]), acc[r][c]);
                acc[r][c] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * dx), _mm256_cvtepi32_ps(bsum_m), acc[r][c]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (c, &a) in acc.iter().enumerate() {
            *out.add(c * ldo + r) = hsum(a);
        }
    }
}

tiles_for!(tiles, tile);
