//! The 256-bit integer steps the quantized tiles are written in, in two instruction sets: AVX2
//! (`vpmaddubsw` + `vpmaddwd`) and AVX512-VNNI (`vpdpbusd`, `vpdpwssd`: one instruction each, and
//! 32 vector registers with VL). A tile is written once, generic over [`Isa`], `#[inline(always)]`,
//! and compiled into each ISA's `#[target_feature]` wrapper, so every step inlines as that ISA's
//! instructions. The two give the same integers: the sums fit their lanes (`vpmaddubsw`'s pairs reach
//! at most 2·128·127). The Q8_0 sign trick (|w| · sign(x, w)) needs activations within ±127 — a −128
//! negated wraps to itself — which our quantizer guarantees (|x| ≤ amax scales to at most 127).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// An instruction set's integer dot steps.
pub(super) trait Isa {
    /// `acc + Σ₄ u·s` per 32-bit lane: four unsigned × signed byte products.
    unsafe fn dpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
    /// `acc + Σ₂ a·b` per 32-bit lane: two i16 × i16 products.
    unsafe fn dpwssd(acc: __m256i, a: __m256i, b: __m256i) -> __m256i;
}

/// AVX2 + FMA + F16C.
pub(super) struct Avx2;
/// AVX512-VNNI with VL on top of AVX2 (256-bit vectors).
pub(super) struct Vnni;

impl Isa for Avx2 {
    #[inline(always)]
    unsafe fn dpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
    }
    #[inline(always)]
    unsafe fn dpwssd(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
    }
}

impl Isa for Vnni {
    #[inline(always)]
    unsafe fn dpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, u, s)
    }
    #[inline(always)]
    unsafe fn dpwssd(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpwssd_epi32(acc, a, b)
    }
}

/// The f16 at `p` (any alignment) as f32.
#[inline(always)]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<u16>().read_unaligned() as i32)))
}

/// The f32 at `p` (any alignment).
#[inline(always)]
pub(super) unsafe fn f32_at(p: *const u8) -> f32 {
    p.cast::<f32>().read_unaligned()
}

/// 32 bytes at `p` (any alignment).
#[inline(always)]
pub(super) unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p.cast())
}

/// Asks for the cache lines of `bytes` bytes `ahead` bytes past `p`. `wrapping_add`: the address may
/// lie past the matrix's last row, outside the allocation, and a prefetch of any address is harmless.
#[inline(always)]
pub(super) unsafe fn prefetch(p: *const u8, ahead: usize, bytes: usize) {
    let mut o = 0;
    while o < bytes {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead + o).cast());
        o += 64;
    }
}

/// The sum of the eight lanes.
#[inline(always)]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// A tile: `out[c·ldo + r] = w_r · x_c` for the tile's weight rows `r` (rows `ldw` bytes apart from
/// `w`) and activation rows `c` (`ldx` bytes apart from `x`), each `kb` blocks long.
pub(super) type Tile = unsafe fn(kb: usize, w: *const u8, ldw: usize, x: *const u8, ldx: usize, out: *mut f32, ldo: usize);

/// `$tile::<I, RW, RX, $extra…>` (the extra const arguments a tile generic over its type takes)
/// compiled for AVX2 and for VNNI, as [`Tile`]s picked by tile shape:
/// `$name(vnni, rw, rx)` for 1 ≤ rw ≤ 4, 1 ≤ rx ≤ 4 (a kernel whose rows are fixed ignores rw).
macro_rules! tiles_for {
    ($name:ident, $tile:ident $(, $extra:tt)*) => {
        pub(super) fn $name(use_vnni: bool, rw: usize, rx: usize) -> $crate::quant::cpu_product::int8::Tile {
            use $crate::quant::cpu_product::int8::{Avx2, Tile, Vnni};
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2<const RW: usize, const RX: usize>(kb: usize, w: *const u8, ldw: usize, x: *const u8, ldx: usize, out: *mut f32, ldo: usize) {
                $tile::<Avx2, RW, RX $(, $extra)*>(kb, w, ldw, x, ldx, out, ldo)
            }
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
            unsafe fn vnni<const RW: usize, const RX: usize>(kb: usize, w: *const u8, ldw: usize, x: *const u8, ldx: usize, out: *mut f32, ldo: usize) {
                $tile::<Vnni, RW, RX $(, $extra)*>(kb, w, ldw, x, ldx, out, ldo)
            }
            fn by_rx<const RW: usize>(vnni_isa: bool, rx: usize) -> Tile {
                match (vnni_isa, rx) {
                    (false, 1) => avx2::<RW, 1>,
                    (false, 2) => avx2::<RW, 2>,
                    (false, 3) => avx2::<RW, 3>,
                    (false, _) => avx2::<RW, 4>,
                    (true, 1) => vnni::<RW, 1>,
                    (true, 2) => vnni::<RW, 2>,
                    (true, 3) => vnni::<RW, 3>,
                    (true, _) => vnni::<RW, 4>,
                }
            }
            match rw {
                1 => by_rx::<1>(use_vnni, rx),
                2 => by_rx::<2>(use_vnni, rx),
                3 => by_rx::<3>(use_vnni, rx),
                _ => by_rx::<4>(use_vnni, rx),
            }
        }
    };
}
pub(super) use tiles_for;

/// `$tile::<RW, RX>` for a tile shape (1 ≤ rw ≤ 4, 1 ≤ rx ≤ 4), as a [`Tile`].
macro_rules! by_shape {
    ($tile:ident, $rw:expr, $rx:expr) => {{
        fn by_rx<const RW: usize>(rx: usize) -> $crate::quant::cpu_product::int8::Tile {
            match rx {
                1 => $tile::<RW, 1>,
                2 => $tile::<RW, 2>,
                3 => $tile::<RW, 3>,
                _ => $tile::<RW, 4>,
            }
        }
        match $rw {
            1 => by_rx::<1>($rx),
            2 => by_rx::<2>($rx),
            3 => by_rx::<3>($rx),
            _ => by_rx::<4>($rx),
        }
    }};
}
pub(super) use by_shape;
