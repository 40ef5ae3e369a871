//! Q6_K weights in lanes against q8_K activations. Scratch per group block: d (16 f32), the 16
//! sub-block scales (16 vectors of i32), the offset's weights −32·s as i16 pairs (eight vectors:
//! lane i of vector t holds row i's −32·s₂ₜ and −32·s₂ₜ₊₁), then 64 vectors of quants unpacked to
//! bytes (0..=63; vector v, lane i: row i's values 4v..4v+4). A row's dot with an activation block
//! is `d·d_x·(Σ_j s_j (Σ q·x)_j − 32 Σ_j s_j bsum_j)`: four `vpdpbusd` per sub-block of 16, its
//! scale by `vpmulld`, the offset by eight `vpdpwssd` into the same sums.

// Indexed loops over the const tile sizes unroll fully and keep the accumulators in registers.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{f16, put, put_chunks, scaled_sums, vector, Kind, Line, Rows, LANES};
use crate::quant::cpu_product::q4_k::Q8K_BLOCK;
use crate::quant::cpu_product::q6_k::BLOCK;

const GROUP_BLOCK: usize = 64 * 89;
/// Activation rows per tile: 2·RX accumulators beside the weight vector and scale.
const RX: usize = 8;

pub(super) const KIND: Kind = Kind {
    w_block: BLOCK,
    group_block: GROUP_BLOCK,
    values: 256,
    words: 8,
    repack,
    activation,
    rx: RX,
    tile: tile::<RX>,
    tile1: tile::<1>,
    x_block: Q8K_BLOCK,
};

/// # Safety
/// The CPU has AVX-512F/BW/VL and VNNI; `scratch` holds the group blocks.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn repack(w: &[u8], rows: usize, kb: usize, scratch: &mut [Line]) {
    // The chunks read by pointer: every block must be whole.
    assert!(w.len() >= rows * kb * BLOCK && scratch.len() >= rows.div_ceil(LANES) * kb * GROUP_BLOCK / 64, "lane repack: buffers too small");
    let (low, high_bits) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(0x30));
    for g in 0..rows.div_ceil(LANES) {
        let n = LANES.min(rows - g * LANES);
        for b in 0..kb {
            let lines = &mut scratch[(g * kb + b) * GROUP_BLOCK / 64..][..GROUP_BLOCK / 64];
            let block = |i: usize| &w[((g * LANES + i) * kb + b) * BLOCK..][..BLOCK];
            for i in 0..n {
                let block = block(i);
                put(&mut lines[0], i, f16(&block[208..]).to_le_bytes());
                let sc = |j: usize| block[192 + j] as i8 as i32;
                for j in 0..16 {
                    put(&mut lines[1 + j], i, sc(j).to_le_bytes());
                }
                for t in 0..8 {
                    let (a, b) = ((-32 * sc(2 * t)) as i16, (-32 * sc(2 * t + 1)) as i16);
                    let (a, b) = (a.to_le_bytes(), b.to_le_bytes());
                    put(&mut lines[17 + t], i, [a[0], a[1], b[0], b[1]]);
                }
            }
            // ggml's `dequantize_row_q6_K`: values 128h + 32m + l (chunk k = 4h + m) take the low
            // (m < 2) or high nibble of ql[64h + 32(m % 2) + l] and bits 2m, 2m + 1 of qh[32h + l].
            put_chunks(lines, 25, 8, n, |i, k| {
                let p = block(i).as_ptr();
                let (h, m) = (k / 4, k % 4);
                let ql = _mm256_loadu_si256(p.add(64 * h + 32 * (m % 2)).cast());
                let q = _mm256_and_si256(if m < 2 { ql } else { _mm256_srli_epi16(ql, 4) }, low);
                let qh = _mm256_srl_epi16(_mm256_loadu_si256(p.add(128 + 32 * h).cast()), _mm_cvtsi32_si128(2 * m as i32));
                _mm256_or_si256(q, _mm256_and_si256(_mm256_slli_epi16(qh, 4), high_bits))
            });
        }
    }
}

/// A q8_K block as quants, its 16-value sums paired as i16 in eight words, and d.
fn activation(block: &[u8], q: &mut [u8], words: &mut [u32]) -> f32 {
    q.copy_from_slice(&block[4..260]);
    for (t, word) in words.iter_mut().enumerate() {
        *word = u32::from_le_bytes([block[260 + 4 * t], block[261 + 4 * t], block[262 + 4 * t], block[263 + 4 * t]]);
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
        // Sub-blocks of 16: four quant vectors each (from vector 25), scales from vector 1.
        scaled_sums(p, x, b, (16, 4), (25, 1), &mut isum);
        let d = _mm512_load_ps(p.cast());
        for c in 0..RX {
            let words = x.words.add(c * x.ldw + b * 8);
            for t in 0..8 {
                isum[c] = _mm512_dpwssd_epi32(isum[c], vector(p, 17 + t), _mm512_set1_epi32(*words.add(t) as i32));
            }
            let dx = _mm512_set1_ps(*x.d.add(c * x.ldd + b));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[c]), _mm512_mul_ps(d, dx), acc[c]);
        }
    }
    for c in 0..RX {
        _mm512_mask_storeu_ps(out.add(c * ldo), lanes, acc[c]);
    }
}
