//! The Q8_0 × q8_0 tile: weight blocks (f16 scale, 32 signed quants) against activation blocks of
//! the same form. Each block pair is one integer dot (signed × signed through the sign trick:
//! |w| · sign(x, w)), turned to f32 and added with the product of the two scales into eight lanes
//! per (weight row, activation row); the lanes are summed once at the end. llama.cpp's Q8_0 prompt
//! product (llamafile's tinyBLAS) has this form; ours keeps RW weight and RX activation blocks in
//! registers so each load serves RX (or RW) dots. Each step also asks for the same bytes of the next
//! tile's rows (RW rows on): a tile reads RW short streams at once (a 4096-wide row is 4.3 KB), which
//! the hardware prefetchers barely learn before they end (Zen 4, OpenChat-shaped Q8_0 decode at one
//! thread: 13.1 → 16.3 tokens/s).

#![cfg(target_arch = "x86_64")]
// Indexed loops over the const tile sizes unroll fully and keep the accumulators in registers.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::int8::{f16_at, hsum, load, prefetch, Avx2, Isa};

/// Bytes of one block (f16 scale, 32 quants), weights and activations alike.
pub(super) const BLOCK: usize = 34;

/// # Safety
/// The CPU has `I`'s instructions; `w` holds RW rows and `x` RX rows of `kb` blocks at the given
/// strides; `out` has room for `out[c·ldo + r]`, c < RX, r < RW.
#[inline(always)]
unsafe fn tile<I: Isa, const RW: usize, const RX: usize>(kb: usize, w: *const u8, ldw: usize, x: *const u8, ldx: usize, out: *mut f32, ldo: usize) {
    let mut acc = [[_mm256_setzero_ps(); RX]; RW];
    for b in 0..kb {
        let mut wq = [_mm256_setzero_si256(); RW];
        let mut wa = [_mm256_setzero_si256(); RW];
        let mut dw = [0f32; RW];
        for r in 0..RW {
            let p = w.add(r * ldw + b * BLOCK);
            prefetch(p, RW * ldw, BLOCK);
            dw[r] = f16_at(p);
            wq[r] = load(p.add(2));
            wa[r] = _mm256_sign_epi8(wq[r], wq[r]);
        }
        for c in 0..RX {
            let p = x.add(c * ldx + b * BLOCK);
            let dx = f16_at(p);
            let xq = load(p.add(2));
            for r in 0..RW {
                let dot = I::dpbusd(_mm256_setzero_si256(), wa[r], _mm256_sign_epi8(xq, wq[r]));
                acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dw[r] * dx), _mm256_cvtepi32_ps(dot), acc[r][c]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (c, &a) in acc.iter().enumerate() {
            *out.add(c * ldo + r) = hsum(a);
        }
    }
}

/// The 256-bit tile in AVX2 steps (VNNI CPUs take the 512-bit tile below, so no VNNI twin is built).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const RW: usize, const RX: usize>(kb: usize, w: *const u8, ldw: usize, x: *const u8, ldx: usize, out: *mut f32, ldo: usize) {
    tile::<Avx2, RW, RX>(kb, w, ldw, x, ldx, out, ldo)
}

/// The AVX512-VNNI tile, 512 bits wide: two blocks per vector. AVX-512 has no byte sign instruction,
/// so it multiplies activations made unsigned (x + 128, an XOR of the sign bit) by the signed
/// weights and starts each dot from −128·Σw (the same for every activation row: once per weight
/// block), which leaves Σ x·w exactly: four instructions per 64 products, where the 256-bit sign
/// trick takes six per 32. A block left over at the end runs the same steps 256 bits wide.
///
/// # Safety
/// As [`tile`], with a CPU that has AVX-512F/BW/VL and VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_vnni512<const RW: usize, const RX: usize>(kb: usize, w: *const u8, ldw: usize, x: *const u8, ldx: usize, out: *mut f32, ldo: usize) {
    let (sign, zero) = (_mm512_set1_epi8(-128), _mm512_setzero_si512());
    let pair = |p: *const u8| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(load(p.add(2))), load(p.add(BLOCK + 2)));
    let scales = |p: *const u8| _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(f16_at(p)), _mm512_set1_ps(f16_at(p.add(BLOCK))));
    let mut acc = [[_mm512_setzero_ps(); RX]; RW];
    let mut b = 0;
    while b + 2 <= kb {
        let (mut wq, mut start, mut dw) = ([zero; RW], [zero; RW], [_mm512_setzero_ps(); RW]);
        for r in 0..RW {
            let p = w.add(r * ldw + b * BLOCK);
            prefetch(p, RW * ldw, 2 * BLOCK);
            wq[r] = pair(p);
            start[r] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, sign, wq[r]));
            dw[r] = scales(p);
        }
        for c in 0..RX {
            let p = x.add(c * ldx + b * BLOCK);
            let xu = _mm512_xor_si512(pair(p), sign);
            let dx = scales(p);
            for r in 0..RW {
                let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start[r], xu, wq[r]));
                acc[r][c] = _mm512_fmadd_ps(_mm512_mul_ps(dw[r], dx), dot, acc[r][c]);
            }
        }
        b += 2;
    }
    let mut tail = [[0f32; RX]; RW];
    if b < kb {
        let (sign, zero) = (_mm256_set1_epi8(-128), _mm256_setzero_si256());
        for r in 0..RW {
            let p = w.add(r * ldw + b * BLOCK);
            let wq = load(p.add(2));
            let start = _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, sign, wq));
            for c in 0..RX {
                let q = x.add(c * ldx + b * BLOCK);
                let dot = _mm256_dpbusd_epi32(start, _mm256_xor_si256(load(q.add(2)), sign), wq);
                tail[r][c] = f16_at(p) * f16_at(q) * hsum(_mm256_cvtepi32_ps(dot));
            }
        }
    }
    for r in 0..RW {
        for c in 0..RX {
            *out.add(c * ldo + r) = _mm512_reduce_add_ps(acc[r][c]) + tail[r][c];
        }
    }
}

/// The tile for a tile shape: the 512-bit VNNI tile where the CPU has it, the 256-bit one else.
pub(super) fn tiles(use_vnni: bool, rw: usize, rx: usize) -> super::int8::Tile {
    if !use_vnni {
        return super::int8::by_shape!(tile_avx2, rw, rx);
    }
    super::int8::by_shape!(tile_vnni512, rw, rx)
}
