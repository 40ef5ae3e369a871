//! Q4_K weights in lanes against q8_K activations. Scratch per group block: d, dmin (16 f32
//! each), the eight sub-block scales (eight vectors of 16 i32), the mins as i16 pairs (four vectors:
//! lane i of vector t holds row i's mins 2t and 2t + 1), then 64 vectors of quants unpacked to bytes
//! (vector v, lane i: row i's values 4v..4v+4). A row's dot with an activation block is
//! `d·d_x·Σ_j s_j (Σ q·x)_j − dmin·d_x·Σ_j m_j S_j` (S_j: the activations' sum over sub-block j,
//! two per 32-bit word): eight `vpdpbusd` per sub-block, its scale by `vpmulld`, the mins by four
//! `vpdpwssd`.
//!
//! Q5_K blocks take the same scratch layout and tile: only their repack differs, each value's fifth
//! bit joining its nibble (quants to 31 stay unsigned bytes for `vpdpbusd`).

// Indexed loops over the const tile sizes unroll fully and keep the accumulators in registers.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{f16, put, put_chunks, scaled_sums, vector, Kind, Line, Rows, LANES};
use crate::quant::cpu_product::q4_k::{scales_mins, BLOCK, BLOCK5, Q8K_BLOCK};

const GROUP_BLOCK: usize = 64 * 78;
/// Activation rows per tile: 3·RX accumulators beside the weight vector and scale.
const RX: usize = 6;

pub(super) const KIND: Kind = Kind {
    w_block: BLOCK,
    group_block: GROUP_BLOCK,
    values: 256,
    words: 4,
    repack,
    activation,
    rx: RX,
    tile: tile::<RX>,
    tile1: tile::<1>,
    x_block: Q8K_BLOCK,
};

pub(super) const KIND5: Kind = Kind { w_block: BLOCK5, repack: repack5, ..KIND };

/// Q4_K rows: each block's nibbles at byte 16, no high bits.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL and VNNI; `scratch` holds the group blocks.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn repack(w: &[u8], rows: usize, kb: usize, scratch: &mut [Line]) {
    repack_k::<false>(w, rows, kb, scratch)
}

/// Q5_K rows: high bits at byte 16, nibbles at byte 48.
///
/// # Safety
/// As [`repack`].
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn repack5(w: &[u8], rows: usize, kb: usize, scratch: &mut [Line]) {
    repack_k::<true>(w, rows, kb, scratch)
}

/// # Safety
/// As [`repack`].
#[inline(always)]
unsafe fn repack_k<const Q5: bool>(w: &[u8], rows: usize, kb: usize, scratch: &mut [Line]) {
    let (block_bytes, nibbles) = if Q5 { (BLOCK5, 48) } else { (BLOCK, 16) };
    // The chunks read by pointer: every block must be whole.
    assert!(w.len() >= rows * kb * block_bytes && scratch.len() >= rows.div_ceil(LANES) * kb * GROUP_BLOCK / 64, "lane repack: buffers too small");
    let (low, bit) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(0x10));
    for g in 0..rows.div_ceil(LANES) {
        let n = LANES.min(rows - g * LANES);
        for b in 0..kb {
            let lines = &mut scratch[(g * kb + b) * GROUP_BLOCK / 64..][..GROUP_BLOCK / 64];
            let block = |i: usize| &w[((g * LANES + i) * kb + b) * block_bytes..][..block_bytes];
            for i in 0..n {
                let block = block(i);
                put(&mut lines[0], i, f16(block).to_le_bytes());
                put(&mut lines[1], i, f16(&block[2..]).to_le_bytes());
                let (sc, mn) = scales_mins(std::array::from_fn(|k| block[4 + k]));
                for j in 0..8 {
                    put(&mut lines[2 + j], i, (sc[j] as i32).to_le_bytes());
                }
                for t in 0..4 {
                    put(&mut lines[10 + t], i, [mn[2 * t], 0, mn[2 * t + 1], 0]);
                }
            }
            // Values 32k..32k + 32: the low (k even) or high nibbles of bytes 32(k/2).., and (Q5_K)
            // bit k of the high-bit bytes 0..32 as the fifth bit.
            put_chunks(lines, 14, 8, n, |i, k| {
                let p = block(i).as_ptr();
                let qs = _mm256_loadu_si256(p.add(nibbles + 32 * (k / 2)).cast());
                let q = _mm256_and_si256(if k % 2 == 0 { qs } else { _mm256_srli_epi16(qs, 4) }, low);
                if !Q5 {
                    return q;
                }
                let high = _mm256_srl_epi16(_mm256_loadu_si256(p.add(16).cast()), _mm_cvtsi32_si128(k as i32));
                _mm256_or_si256(q, _mm256_and_si256(_mm256_slli_epi16(high, 4), bit))
            });
        }
    }
}

/// A q8_K block (d f32, 256 quants, 16 sums of 16) as quants, sub-block sums S_j paired as i16 in
/// four words, and d.
fn activation(block: &[u8], q: &mut [u8], words: &mut [u32]) -> f32 {
    q.copy_from_slice(&block[4..260]);
    let bsum = |s: usize| i16::from_le_bytes([block[260 + 2 * s], block[261 + 2 * s]]);
    // A sub-block of 32 sums two 16-value sums (each within ±2032, so the pair fits i16).
    let sub = |j: usize| (bsum(2 * j) + bsum(2 * j + 1)) as u16 as u32;
    for (t, word) in words.iter_mut().enumerate() {
        *word = sub(2 * t) | sub(2 * t + 1) << 16;
    }
    f32::from_le_bytes([block[0], block[1], block[2], block[3]])
}

/// # Safety
/// As [`super::Tile`]: AVX-512F/VNNI; `group` holds `kb` group blocks, `x` RX rows.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile<const RX: usize>(kb: usize, group: *const u8, x: Rows, out: *mut f32, ldo: usize, lanes: u16) {
    let mut acc = [_mm512_setzero_ps(); RX];
    for b in 0..kb {
        let p = group.add(b * GROUP_BLOCK);
        let mut isum = [_mm512_setzero_si512(); RX];
        // Sub-blocks of 32: eight quant vectors each (from vector 14), scales from vector 2.
        scaled_sums(p, x, b, (8, 8), (14, 2), &mut isum);
        let (d, dmin) = (_mm512_load_ps(p.cast()), _mm512_load_ps(p.add(64).cast()));
        for c in 0..RX {
            let words = x.words.add(c * x.ldw + b * 4);
            let mut msum = _mm512_setzero_si512();
            for t in 0..4 {
                msum = _mm512_dpwssd_epi32(msum, vector(p, 10 + t), _mm512_set1_epi32(*words.add(t) as i32));
            }
            let dx = _mm512_set1_ps(*x.d.add(c * x.ldd + b));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[c]), _mm512_mul_ps(d, dx), acc[c]);
            acc[c] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum), _mm512_mul_ps(dmin, dx), acc[c]);
        }
    }
    for c in 0..RX {
        _mm512_mask_storeu_ps(out.add(c * ldo), lanes, acc[c]);
    }
}
