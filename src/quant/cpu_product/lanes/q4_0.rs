//! ggml's 32-value types (Q4_0, Q5_0 against q8_0; Q4_1, Q5_1 against q8_1) in lanes: each weight
//! block is unpacked to its quants as signed bytes (q − 8 or q − 16 for the `_0` types, q for the
//! `_1` types, whose min goes into the mins' line) and laid out as a Q8_0 group block, so the Q8_0
//! tile ([`super::q8_0`]) multiplies them.

use std::arch::x86_64::*;

use super::q8_0::{activation, activation_q8_1, repack_groups, tile, GROUP_BLOCK, GROUP_BLOCK_MIN, RX};
use super::{Kind, Line};
use crate::quant::cpu_product::int8::f16_at;
use crate::quant::cpu_product::q4_0::{quants, w_block, Q8_0_BLOCK, Q8_1_BLOCK};

pub(super) const KIND4_0: Kind = kind::<false, false>();
pub(super) const KIND4_1: Kind = kind::<false, true>();
pub(super) const KIND5_0: Kind = kind::<true, false>();
pub(super) const KIND5_1: Kind = kind::<true, true>();

const fn kind<const FIFTH: bool, const MIN: bool>() -> Kind {
    Kind {
        w_block: w_block::<FIFTH, MIN>(),
        group_block: if MIN { GROUP_BLOCK_MIN } else { GROUP_BLOCK },
        values: 32,
        // The `_1` types' word is the activation block's s; the `_0` types' is unused.
        words: 1,
        repack: repack::<FIFTH, MIN>,
        activation: if MIN { activation_q8_1 } else { activation },
        rx: RX,
        tile: tile::<RX, MIN>,
        tile1: tile::<1, MIN>,
        x_block: if MIN { Q8_1_BLOCK } else { Q8_0_BLOCK },
    }
}

/// # Safety
/// The CPU has AVX-512F/BW/VL and VNNI; `scratch` holds the group blocks.
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn repack<const FIFTH: bool, const MIN: bool>(w: &[u8], rows: usize, kb: usize, scratch: &mut [Line]) {
    // The Q8_0 layout holds signed values: q − 8 or q − 16 for the `_0` types (the `_1` types' offset
    // is their min).
    let offset = _mm256_set1_epi8(match (MIN, FIFTH) {
        (true, _) => 0,
        (false, false) => 8,
        (false, true) => 16,
    });
    repack_groups::<MIN>(w, rows, kb, w_block::<FIFTH, MIN>(), scratch, |p| {
        (_mm256_sub_epi8(quants::<FIFTH, MIN>(p), offset), f16_at(p), if MIN { f16_at(p.add(2)) } else { 0.0 })
    })
}
