//! The Q6_K × q8_K tile. A Q6_K block is 256 weights: 6-bit quants q (low 4 bits in `ql`, high 2 in
//! `qh`), a signed 8-bit scale per 16 weights, an f16 super-scale d; weight = d·s·(q − 32). So a dot
//! with a q8_K block is `d·d_x · (Σ_j s_j Σ q·x − 32 Σ_j s_j bsum_j)`: the 6-bit quants are
//! assembled once per weight block and serve every activation row of the tile; q·x pairs
//! (`vpmaddubsw`, no overflow: 2·63·127) are weighted by their scale into 32-bit sums (`vpdpwssd`),
//! the offset's term by the same scales against the 16-value sums. The formula is ggml's
//! `ggml_vec_dot_q6_K_q8_K`; the tiling is ours.

#![cfg(target_arch = "x86_64")]
// Indexed loops over the const tile sizes unroll fully and keep the accumulators in registers.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::int8::{f16_at, f32_at, hsum, load, tiles_for, Isa};
use super::q4_k::Q8K_BLOCK;

/// Bytes of a Q6_K block: 128 of `ql`, 64 of `qh`, 16 scales, d (f16).
pub(super) const BLOCK: usize = 210;

/// Half `n` of the block's quants (values 128n..128n+128), 32 at a time (values 128n + 32i.. at index
/// i), each 0..=63, in ggml's layout: `ql[64n + l]`'s low and high nibbles are values 128n + l and
/// 128n + l + 64, `ql[64n + 32 + l]`'s are 128n + l + 32 and 128n + l + 96, and `qh[32n + l]`'s bit
/// pairs 0-1, 2-3, 4-5, 6-7 are the high bits of those four, in that order (l + 0, +32, +64, +96).
#[inline(always)]
unsafe fn quants(block: *const u8, n: usize) -> [__m256i; 4] {
    let (nibble, high) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(0x30));
    let ql0 = load(block.add(64 * n));
    let ql1 = load(block.add(64 * n + 32));
    let qh = load(block.add(128 + 32 * n));
    // 16-bit shifts move bits across bytes; the masks keep each byte's own.
    [
        _mm256_or_si256(_mm256_and_si256(ql0, nibble), _mm256_and_si256(_mm256_slli_epi16(qh, 4), high)),
        _mm256_or_si256(_mm256_and_si256(ql1, nibble), _mm256_and_si256(_mm256_slli_epi16(qh, 2), high)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), nibble), _mm256_and_si256(qh, high)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), nibble), _mm256_and_si256(_mm256_srli_epi16(qh, 2), high)),
    ]
}

/// Byte shuffles that fill the lower 128 bits with i16 lane 2u of a half and the upper with lane
/// 2u + 1 (u = v mod 4: scales 2v and 2v + 1 of the half holding them).
static SCALE_PAIRS: [[u8; 32]; 4] = {
    let mut t = [[0u8; 32]; 4];
    let mut u = 0;
    while u < 4 {
        let mut i = 0;
        while i < 16 {
            t[u][i] = (4 * u + i % 2) as u8;
            t[u][16 + i] = (4 * u + 2 + i % 2) as u8;
            i += 1;
        }
        u += 1;
    }
    t
};

/// # Safety
/// As [`super::int8::Tile`]: the CPU has `I`'s instructions; `w` holds RW rows of `kb` Q6_K blocks,
/// `x` RX rows of `kb` q8_K blocks, at the given strides; `out[c·ldo + r]` is writable.
#[inline(always)]
unsafe fn tile<I: Isa, const RW: usize, const RX: usize>(kb: usize, w: *const u8, ldw: usize, x: *const u8, ldx: usize, out: *mut f32, ldo: usize) {
    let mut acc = [[_mm256_setzero_ps(); RX]; RW];
    for b in 0..kb {
        // Plain loops, no closures: a closure is a function of its own, compiled without the
        // wrapper's target features, and its intrinsics would become calls.
        let (mut wb, mut xb) = ([w; RW], [x; RX]);
        // The 16 scales as i16, each 128-bit half of the vector in both halves: scales 0-7, 8-15.
        let mut halves = [[_mm256_setzero_si256(); 2]; RW];
        for r in 0..RW {
            wb[r] = w.add(r * ldw + b * BLOCK);
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wb[r].add(192).cast()));
            halves[r] = [_mm256_permute2x128_si256::<0x00>(sc16, sc16), _mm256_permute2x128_si256::<0x11>(sc16, sc16)];
        }
        for c in 0..RX {
            xb[c] = x.add(c * ldx + b * Q8K_BLOCK);
        }
        let mut isum = [[_mm256_setzero_si256(); RX]; RW];
        // Quants are assembled half a block at a time: 8 vectors per row would crowd the registers.
        for n in 0..2 {
            let mut q = [[_mm256_setzero_si256(); 4]; RW];
            for r in 0..RW {
                q[r] = quants(wb[r], n);
            }
            for i in 0..4 {
                let v = 4 * n + i;
                // Scale 2v in the lower eight i16 lanes, 2v + 1 in the upper: one byte shuffle.
                let pick = load(SCALE_PAIRS[v % 4].as_ptr());
                let mut s = [_mm256_setzero_si256(); RW];
                for r in 0..RW {
                    s[r] = _mm256_shuffle_epi8(halves[r][v / 4], pick);
                }
                for c in 0..RX {
                    let xq = load(xb[c].add(4 + 32 * v));
                    for r in 0..RW {
                        isum[r][c] = I::dpwssd(isum[r][c], _mm256_maddubs_epi16(q[r][i], xq), s[r]);
                    }
                }
            }
        }
        for r in 0..RW {
            let d = f16_at(wb[r].add(208));
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wb[r].add(192).cast()));
            for c in 0..RX {
                let dx = f32_at(xb[c]);
                // − 32 Σ_j s_j bsum_j: the quants' offset.
                let offset = _mm256_slli_epi32(_mm256_madd_epi16(load(xb[c].add(260)), sc16), 5);
                let sum = _mm256_sub_epi32(isum[r][c], offset);
                acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(sum), acc[r][c]);
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
