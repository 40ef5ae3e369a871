//! Q8_0 weights in lanes against q8_0 activations. Scratch per group block: scales (16 f32),
//! −128·Σw per row (16 i32), eight vectors of quants (vector v, lane i: row i's quants 4v..4v+4).
//! The activations' quants are made unsigned (x + 128, flipping the sign bit) for `vpdpbusd`'s
//! unsigned operand; each dot starts from −128·Σw, which takes the bias back exactly.

// Indexed loops over the const tile sizes unroll fully and keep the accumulators in registers.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{f16, put, Kind, Line, Rows, LANES};
use crate::quant::cpu_product::q8_0::BLOCK;

const GROUP_BLOCK: usize = 64 * 10;
/// Activation rows per tile: RX accumulators beside the eight weight vectors.
const RX: usize = 8;

pub(super) const KIND: Kind = Kind {
    w_block: BLOCK,
    group_block: GROUP_BLOCK,
    values: 32,
    // One word per block, unused: the driver's layout has room for it.
    words: 1,
    repack,
    activation,
    rx: RX,
    tile: tile::<RX>,
    tile1: tile::<1>,
    x_block: BLOCK,
};

fn repack(w: &[u8], rows: usize, kb: usize, scratch: &mut [Line]) {
    for g in 0..rows.div_ceil(LANES) {
        for b in 0..kb {
            let lines = &mut scratch[(g * kb + b) * GROUP_BLOCK / 64..][..GROUP_BLOCK / 64];
            for i in 0..LANES.min(rows - g * LANES) {
                let block = &w[((g * LANES + i) * kb + b) * BLOCK..][..BLOCK];
                put(&mut lines[0], i, f16(block).to_le_bytes());
                let sum: i32 = block[2..].iter().map(|&q| q as i8 as i32).sum();
                put(&mut lines[1], i, (-128 * sum).to_le_bytes());
                for v in 0..8 {
                    put(&mut lines[2 + v], i, [block[2 + 4 * v], block[3 + 4 * v], block[4 + 4 * v], block[5 + 4 * v]]);
                }
            }
        }
    }
}

fn activation(block: &[u8], q: &mut [u8], _words: &mut [u32]) -> f32 {
    q.iter_mut().zip(&block[2..]).for_each(|(q, &v)| *q = v ^ 0x80);
    f16(block)
}

/// # Safety
/// As [`super::Tile`]: AVX-512F/VNNI; `group` holds `kb` group blocks, `x` RX rows.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile<const RX: usize>(kb: usize, group: *const u8, x: Rows, out: *mut f32, ldo: usize, lanes: u16) {
    let mut acc = [_mm512_setzero_ps(); RX];
    for b in 0..kb {
        let p = group.add(b * GROUP_BLOCK);
        let dw = _mm512_load_ps(p.cast());
        let start = _mm512_load_si512(p.add(64).cast());
        let mut wq = [_mm512_setzero_si512(); 8];
        for v in 0..8 {
            wq[v] = _mm512_load_si512(p.add(128 + 64 * v).cast());
        }
        for c in 0..RX {
            let q = x.q.add(c * x.ldq + b * 32);
            let mut sum = start;
            for v in 0..8 {
                sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi32(q.add(4 * v).cast::<i32>().read_unaligned()), wq[v]);
            }
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.add(c * x.ldd + b)));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[c]);
        }
    }
    for c in 0..RX {
        _mm512_mask_storeu_ps(out.add(c * ldo), lanes, acc[c]);
    }
}
