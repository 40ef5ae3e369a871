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
/// Bytes of a Q5_K block: d, dmin, the same 12 bytes of scales and mins, 32 of high bits, 128 of
/// nibbles.
pub(super) const BLOCK5: usize = 176;
/// Bytes of a q8_K block: d (f32), 256 quants, 16 sums (i16) of 16 quants each.
pub(super) const Q8K_BLOCK: usize = 292;

/// The eight 6-bit scales and mins packed in 12 bytes, unpacked to bytes: scales in words 0-1, mins
/// in words 2-3 (ggml's `kmask` steps in `ggml_vec_dot_q4_K_q8_K`: whole-word masks and shifts, where
/// a byte at a time costs the decode tile a third of its time).
#[inline(always)]
pub(super) fn scales_mins_words(s: [u8; 12]) -> [u32; 4] {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (w0, w1, w2) = (w(0), w(1), w(2));
    [w0 & LOW6, (w2 & LOW4) | (((w0 >> 6) & LOW2) << 4), w1 & LOW6, ((w2 >> 4) & LOW4) | (((w1 >> 6) & LOW2) << 4)]
}

/// The same as two byte arrays (scales, mins): ggml's `get_scale_min_k4` for j = 0..8.
#[inline(always)]
pub(super) fn scales_mins(s: [u8; 12]) -> ([u8; 8], [u8; 8]) {
    let w = scales_mins_words(s);
    let bytes = |a: u32, b: u32| (a as u64 | (b as u64) << 32).to_le_bytes();
    (bytes(w[0], w[1]), bytes(w[2], w[3]))
}

/// Byte shuffles of eight bytes (repeated in every 64 bits) to i16 lanes: `SCALE[k]` puts byte k in
/// every lane, `MIN_PAIRS` bytes 0-3 in the lower half's lane pairs and 4-7 in the upper's (each min
/// weighs both 16-value sums of its sub-block).
static SCALE: [[u8; 32]; 8] = {
    let mut t = [[0x80u8; 32]; 8];
    let mut k = 0;
    while k < 8 {
        let mut i = 0;
        while i < 32 {
            t[k][i] = k as u8;
            i += 2;
        }
        k += 1;
    }
    t
};
static MIN_PAIRS: [u8; 32] = {
    let mut t = [0x80u8; 32];
    let mut i = 0;
    while i < 32 {
        t[i] = (i / 16 * 4 + i % 16 / 4) as u8;
        i += 2;
    }
    t
};

/// The tile for Q4_K blocks, or for Q5_K's (`Q5`): their nibbles from byte 48, after the high bits.
///
/// # Safety
/// As [`super::int8::Tile`]: the CPU has `I`'s instructions; `w` holds RW rows of `kb` Q4_K (Q5_K)
/// blocks, `x` RX rows of `kb` q8_K blocks, at the given strides; `out[c·ldo + r]` is writable.
#[inline(always)]
unsafe fn tile_k<I: Isa, const RW: usize, const RX: usize, const Q5: bool>(
    kb: usize,
    w: *const u8,
    ldw: usize,
    x: *const u8,
    ldx: usize,
    out: *mut f32,
    ldo: usize,
) {
    let (block, nibbles) = if Q5 { (BLOCK5, 48) } else { (BLOCK, 16) };
    let (nibble, fifth) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(0x10));
    let mut acc = [[_mm256_setzero_ps(); RX]; RW];
    for b in 0..kb {
        // Plain loops, no closures: a closure is a function of its own, compiled without the
        // wrapper's target features, and its intrinsics would become calls.
        let (mut wb, mut xb) = ([w; RW], [x; RX]);
        // Scales and mins as bytes, repeated in every 64 bits of a vector.
        let (mut sc, mut mn) = ([_mm256_setzero_si256(); RW], [_mm256_setzero_si256(); RW]);
        for r in 0..RW {
            wb[r] = w.add(r * ldw + b * block);
            let u = scales_mins_words(wb[r].add(4).cast::<[u8; 12]>().read_unaligned());
            sc[r] = _mm256_set1_epi64x((u[0] as u64 | (u[1] as u64) << 32) as i64);
            mn[r] = _mm256_set1_epi64x((u[2] as u64 | (u[3] as u64) << 32) as i64);
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
                let q = load(wb[r].add(nibbles + 32 * j));
                lo[r] = _mm256_and_si256(q, nibble);
                hi[r] = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
                if Q5 {
                    // Bit 2j (2j + 1) of each high-bit byte, as 16 where set.
                    let (bit_lo, bit_hi) = (_mm256_set1_epi8(1 << (2 * j)), _mm256_set1_epi8((1u8 << (2 * j + 1)) as i8));
                    let h = load(wb[r].add(16));
                    lo[r] = _mm256_or_si256(lo[r], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bit_lo), bit_lo), fifth));
                    hi[r] = _mm256_or_si256(hi[r], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bit_hi), bit_hi), fifth));
                }
                s_lo[r] = _mm256_shuffle_epi8(sc[r], load(SCALE[2 * j].as_ptr()));
                s_hi[r] = _mm256_shuffle_epi8(sc[r], load(SCALE[2 * j + 1].as_ptr()));
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
            let mins = _mm256_shuffle_epi8(mn[r], load(MIN_PAIRS.as_ptr()));
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

tiles_for!(tiles, tile_k, false);
tiles_for!(tiles5, tile_k, true);
