//! The tiles of ggml's 32-value types — Q4_0, Q5_0 (× q8_0) and Q4_1, Q5_1 (× q8_1): what older
//! files hold, and what llama-quantize falls back to for rows that are not a multiple of 256 (a
//! SmolLM2-135M "Q4_K_M" file is mostly Q5_0: its rows are 576 wide). A weight block is an f16 scale
//! d (and for the `_1` types an f16 min m) and 32 quants q of 4 bits (5 with a 32-bit word of high
//! bits): weight = d·(q − 8) or d·(q − 16) for the `_0` types, d·q + m for the `_1` types.
//!
//! Each block pair is one exact integer dot over 32-bit lanes: the unsigned quants (0..31) times the
//! signed activations (`vpdpbusd`), started for the `_0` types from −offset·Σx of the same four bytes
//! (once per activation block, for every weight row of the tile). Every lane so holds the integer
//! ggml's AVX2 `ggml_vec_dot_q4_0_q8_0` & co. hold in theirs (their signed `q − offset` times x, by
//! the sign trick), turned to f32 and added with d·d_x into eight lanes; the `_1` types add m·s_x
//! (s_x = d_x·Σx, as the q8_1 block stores it) beside, summed once at the end, as ggml does. The
//! quants are unpacked once per weight block and serve every activation row of the tile; the tiling
//! is ours.

#![cfg(target_arch = "x86_64")]
// Indexed loops over the const tile sizes unroll fully and keep the accumulators in registers.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::int8::{f16_at, hsum, load, tiles_for, Isa};

/// Bytes of a block: d (f16), then m (f16, `_1` types), then the high bits (u32, 5-bit types), then
/// 16 bytes of nibbles (values j and j + 16 in byte j's low and high halves).
pub(super) const Q4_0_BLOCK: usize = 18;
pub(super) const Q4_1_BLOCK: usize = 20;
pub(super) const Q5_0_BLOCK: usize = 22;
pub(super) const Q5_1_BLOCK: usize = 24;
/// Bytes of a q8_0 block (d, 32 quants) and of a q8_1 block (d, s = d·Σq rounded to f16, 32 quants).
pub(super) const Q8_0_BLOCK: usize = 34;
pub(super) const Q8_1_BLOCK: usize = 36;

/// The 32 bits at `p` as 32 bytes, byte i 0xFF where bit i is set (ggml's `bytes_from_bits_32`).
#[inline(always)]
unsafe fn bytes_from_bits(p: *const u8) -> __m256i {
    let bits = _mm256_set1_epi32(p.cast::<u32>().read_unaligned() as i32);
    // Byte i takes byte i/8 of the word; OR-ing every bit but i%8 leaves all ones where bit i%8 is set.
    let spread = _mm256_shuffle_epi8(bits, _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0));
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
}

/// The tile for one of the four types: `FIFTH` for the 5-bit ones, `MIN` for the `_1` ones.
///
/// # Safety
/// As [`super::int8::Tile`]: the CPU has `I`'s instructions; `w` holds RW rows of `kb` blocks of the
/// type, `x` RX rows of `kb` q8_0 (q8_1 for `MIN`) blocks, at the given strides; `out[c·ldo + r]` is
/// writable.
#[inline(always)]
unsafe fn tile_32<I: Isa, const RW: usize, const RX: usize, const FIFTH: bool, const MIN: bool>(
    kb: usize,
    w: *const u8,
    ldw: usize,
    x: *const u8,
    ldx: usize,
    out: *mut f32,
    ldo: usize,
) {
    let (w_block, x_block) = (w_block::<FIFTH, MIN>(), if MIN { Q8_1_BLOCK } else { Q8_0_BLOCK });
    let mut acc = [[_mm256_setzero_ps(); RX]; RW];
    // The `_1` types' m·s_x of even and of odd blocks, two chains of scalar adds: one would cost a
    // one-row tile the add's latency every block.
    let (mut even, mut odd) = ([[0f32; RX]; RW], [[0f32; RX]; RW]);
    let mut b = 0;
    while b + 2 <= kb {
        block::<I, RW, RX, FIFTH, MIN>(w.add(b * w_block), ldw, x.add(b * x_block), ldx, &mut acc, &mut even);
        block::<I, RW, RX, FIFTH, MIN>(w.add((b + 1) * w_block), ldw, x.add((b + 1) * x_block), ldx, &mut acc, &mut odd);
        b += 2;
    }
    if b < kb {
        block::<I, RW, RX, FIFTH, MIN>(w.add(b * w_block), ldw, x.add(b * x_block), ldx, &mut acc, &mut even);
    }
    for r in 0..RW {
        for c in 0..RX {
            *out.add(c * ldo + r) = hsum(acc[r][c]) + (even[r][c] + odd[r][c]);
        }
    }
}

/// Bytes of a weight block of the type.
pub(super) const fn w_block<const FIFTH: bool, const MIN: bool>() -> usize {
    match (FIFTH, MIN) {
        (false, false) => Q4_0_BLOCK,
        (false, true) => Q4_1_BLOCK,
        (true, false) => Q5_0_BLOCK,
        (true, true) => Q5_1_BLOCK,
    }
}

/// The 32 quants of the block at `p`, unsigned (0..15, or 0..31 for the 5-bit types), value j in byte j.
///
/// # Safety
/// AVX2; `p` holds a block of the type.
#[inline(always)]
pub(super) unsafe fn quants<const FIFTH: bool, const MIN: bool>(p: *const u8) -> __m256i {
    let (min_bytes, high_bytes) = (if MIN { 2 } else { 0 }, if FIFTH { 4 } else { 0 });
    let packed = _mm_loadu_si128(p.add(2 + min_bytes + high_bytes).cast());
    let q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0xF));
    if !FIFTH {
        return q;
    }
    _mm256_or_si256(q, _mm256_and_si256(bytes_from_bits(p.add(2 + min_bytes)), _mm256_set1_epi8(0x10)))
}

/// One block of each of the tile's rows: `w` and `x` point at the block of the first weight and
/// activation row.
///
/// # Safety
/// As [`tile_32`], for one block.
#[inline(always)]
unsafe fn block<I: Isa, const RW: usize, const RX: usize, const FIFTH: bool, const MIN: bool>(
    w: *const u8,
    ldw: usize,
    x: *const u8,
    ldx: usize,
    acc: &mut [[__m256; RX]; RW],
    mins: &mut [[f32; RX]; RW],
) {
    let x_quants = if MIN { 4 } else { 2 };
    let zero = _mm256_setzero_si256();
    let offset = _mm256_set1_epi8(if FIFTH { 16 } else { 8 });
    let (mut q, mut d, mut m) = ([zero; RW], [0f32; RW], [0f32; RW]);
    for r in 0..RW {
        let p = w.add(r * ldw);
        d[r] = f16_at(p);
        if MIN {
            m[r] = f16_at(p.add(2));
        }
        q[r] = quants::<FIFTH, MIN>(p);
    }
    for c in 0..RX {
        let p = x.add(c * ldx);
        let dx = f16_at(p);
        let xq = load(p.add(x_quants));
        // −offset·Σx per lane (the `_1` types carry their offset in m instead).
        let start = if MIN { zero } else { _mm256_sub_epi32(zero, I::dpbusd(zero, offset, xq)) };
        let sx = if MIN { f16_at(p.add(2)) } else { 0.0 };
        for r in 0..RW {
            let dot = I::dpbusd(start, q[r], xq);
            acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(d[r] * dx), _mm256_cvtepi32_ps(dot), acc[r][c]);
            if MIN {
                mins[r][c] += m[r] * sx;
            }
        }
    }
}

tiles_for!(tiles4_0, tile_32, false, false);
tiles_for!(tiles4_1, tile_32, false, true);
tiles_for!(tiles5_0, tile_32, true, false);
tiles_for!(tiles5_1, tile_32, true, true);
