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

use super::{f16, put, scaled_sums, vector, Kind, Line, Rows, LANES};
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
fn repack(w: &[u8], rows: usize, kb: usize, scratch: &mut [Line]) {
    repack_k::<false>(w, rows, kb, scratch)
}

/// Q5_K rows: high bits at byte 16, nibbles at byte 48.
fn repack5(w: &[u8], rows: usize, kb: usize, scratch: &mut [Line]) {
    repack_k::<true>(w, rows, kb, scratch)
}

fn repack_k<const Q5: bool>(w: &[u8], rows: usize, kb: usize, scratch: &mut [Line]) {
    let (block_bytes, nibbles) = if Q5 { (BLOCK5, 48) } else { (BLOCK, 16) };
    let mut values = [0u8; 256];
    for g in 0..rows.div_ceil(LANES) {
        for b in 0..kb {
            let lines = &mut scratch[(g * kb + b) * GROUP_BLOCK / 64..][..GROUP_BLOCK / 64];
            for i in 0..LANES.min(rows - g * LANES) {
                let block = &w[((g * LANES + i) * kb + b) * block_bytes..][..block_bytes];
                put(&mut lines[0], i, f16(block).to_le_bytes());
                put(&mut lines[1], i, f16(&block[2..]).to_le_bytes());
                let (sc, mn) = scales_mins(std::array::from_fn(|k| block[4 + k]));
                for j in 0..8 {
                    put(&mut lines[2 + j], i, (sc[j] as i32).to_le_bytes());
                }
                for t in 0..4 {
                    put(&mut lines[10 + t], i, [mn[2 * t], 0, mn[2 * t + 1], 0]);
                }
                // Values 64c + l and 64c + 32 + l: the low and high nibbles of byte 32c + l, and
                // (Q5_K) bits 2c and 2c + 1 of high-bit byte l.
                for (c, qs) in block[nibbles..nibbles + 128].chunks_exact(32).enumerate() {
                    for (l, &q) in qs.iter().enumerate() {
                        let h = if Q5 { block[16 + l] >> (2 * c) } else { 0 };
                        values[64 * c + l] = (q & 0xF) | (h & 1) << 4;
                        values[64 * c + 32 + l] = (q >> 4) | (h >> 1 & 1) << 4;
                    }
                }
                for (v, word) in values.chunks_exact(4).enumerate() {
                    put(&mut lines[14 + v], i, [word[0], word[1], word[2], word[3]]);
                }
            }
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
