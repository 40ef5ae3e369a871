//! Q8_0 weights in lanes against q8_0 activations (and the layout and tile the 32-value types of
//! [`super::q4_0`] are repacked into). Scratch per group block: scales (16 f32), −128·Σw per row
//! (16 i32), eight vectors of quants (vector v, lane i: row i's quants 4v..4v+4), and for weights
//! with a min (the `_1` types) the mins (16 f32). The activations' quants are made unsigned (x + 128,
//! flipping the sign bit) for `vpdpbusd`'s unsigned operand; each dot starts from −128·Σw, which
//! takes the bias back exactly.

// Indexed loops over the const tile sizes unroll fully and keep the accumulators in registers.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{f16, transpose, Kind, Line, Rows, LANES};
use crate::quant::cpu_product::int8::f16_at;
use crate::quant::cpu_product::q8_0::BLOCK;

pub(super) const GROUP_BLOCK: usize = 64 * 10;
/// A group block with the mins' line.
pub(super) const GROUP_BLOCK_MIN: usize = 64 * 11;
/// Activation rows per tile: RX accumulators beside the eight weight vectors.
pub(super) const RX: usize = 8;

pub(super) const KIND: Kind = Kind {
    w_block: BLOCK,
    group_block: GROUP_BLOCK,
    values: 32,
    // One word per block, unused: the driver's layout has room for it.
    words: 1,
    repack,
    activation,
    rx: RX,
    tile: tile::<RX, false>,
    tile1: tile::<1, false>,
    x_block: BLOCK,
};

/// # Safety
/// The CPU has AVX-512F/BW/VL and VNNI; `scratch` holds the group blocks.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn repack(w: &[u8], rows: usize, kb: usize, scratch: &mut [Line]) {
    repack_groups::<false>(w, rows, kb, BLOCK, scratch, |p| (_mm256_loadu_si256(p.add(2).cast()), f16_at(p), 0.0))
}

/// Writes the group blocks of `rows` weight rows of `kb` stored blocks of `w_block` bytes into
/// `scratch`: `unpack` gives a stored block's quants (signed bytes), scale and (`MIN`) min.
///
/// # Safety
/// Inside a function compiled with AVX-512F/BW/VL and VNNI; `scratch` holds the group blocks.
#[inline(always)]
pub(super) unsafe fn repack_groups<const MIN: bool>(
    w: &[u8],
    rows: usize,
    kb: usize,
    w_block: usize,
    scratch: &mut [Line],
    unpack: impl Fn(*const u8) -> (__m256i, f32, f32),
) {
    let group_block = if MIN { GROUP_BLOCK_MIN } else { GROUP_BLOCK };
    // `unpack` reads by pointer: every block it is given must be whole.
    assert!(w.len() >= rows * kb * w_block && scratch.len() >= rows.div_ceil(LANES) * kb * group_block / 64, "lane repack: buffers too small");
    for g in 0..rows.div_ceil(LANES) {
        for b in 0..kb {
            // Rows past the group's end stay zero (scale and quants): their lanes are never stored.
            let (mut q, mut d, mut m) = ([_mm256_setzero_si256(); LANES], [0f32; LANES], [0f32; LANES]);
            for i in 0..LANES.min(rows - g * LANES) {
                (q[i], d[i], m[i]) = unpack(w.as_ptr().add(((g * LANES + i) * kb + b) * w_block));
            }
            put_group(&mut scratch[(g * kb + b) * group_block / 64..][..group_block / 64], &q, &d, MIN.then_some(&m));
        }
    }
}

/// A group block's `lines` from its sixteen rows' quants (`q[i]`: row i's 32 signed bytes), scales
/// and, for a layout with mins, mins; each row's −128·Σq summed in the transposed vectors' lanes.
///
/// # Safety
/// Inside a function compiled with AVX-512F/BW/VL and VNNI.
#[inline(always)]
unsafe fn put_group(lines: &mut [Line], q: &[__m256i; LANES], d: &[f32; LANES], min: Option<&[f32; LANES]>) {
    let (ones, mut sum) = (_mm512_set1_epi8(1), _mm512_setzero_si512());
    for (v, quants) in transpose(q).into_iter().enumerate() {
        sum = _mm512_dpbusd_epi32(sum, ones, quants);
        _mm512_store_si512(lines[2 + v].0.as_mut_ptr().cast(), quants);
    }
    _mm512_store_ps(lines[0].0.as_mut_ptr().cast(), _mm512_loadu_ps(d.as_ptr()));
    _mm512_store_si512(lines[1].0.as_mut_ptr().cast(), _mm512_mullo_epi32(sum, _mm512_set1_epi32(-128)));
    if let Some(m) = min {
        _mm512_store_ps(lines[10].0.as_mut_ptr().cast(), _mm512_loadu_ps(m.as_ptr()));
    }
}

/// A q8_0 block's quants made unsigned, and its scale.
pub(super) fn activation(block: &[u8], q: &mut [u8], _words: &mut [u32]) -> f32 {
    q.iter_mut().zip(&block[2..]).for_each(|(q, &v)| *q = v ^ 0x80);
    f16(block)
}

/// A q8_1 block's quants made unsigned, its s (d·Σq as stored) in the word, and its scale.
pub(super) fn activation_q8_1(block: &[u8], q: &mut [u8], words: &mut [u32]) -> f32 {
    q.iter_mut().zip(&block[4..]).for_each(|(q, &v)| *q = v ^ 0x80);
    words[0] = f16(&block[2..]).to_bits();
    f16(block)
}

/// The tile; with `MIN`, each block also adds m·s (the group block's mins, the activation's word).
///
/// # Safety
/// As [`super::Tile`]: AVX-512F/VNNI; `group` holds `kb` group blocks, `x` RX rows.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn tile<const RX: usize, const MIN: bool>(kb: usize, group: *const u8, x: Rows, out: *mut f32, ldo: usize, lanes: u16) {
    let mut acc = [_mm512_setzero_ps(); RX];
    let group_block = if MIN { GROUP_BLOCK_MIN } else { GROUP_BLOCK };
    for b in 0..kb {
        let p = group.add(b * group_block);
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
            if MIN {
                let s = f32::from_bits(*x.words.add(c * x.ldw + b));
                acc[c] = _mm512_fmadd_ps(_mm512_load_ps(p.add(640).cast()), _mm512_set1_ps(s), acc[c]);
            }
        }
    }
    for c in 0..RX {
        _mm512_mask_storeu_ps(out.add(c * ldo), lanes, acc[c]);
    }
}
