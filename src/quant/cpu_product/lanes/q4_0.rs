//! ggml's 32-value types (Q4_0, Q5_0 against q8_0; Q4_1, Q5_1 against q8_1) in lanes: each weight
//! block is unpacked to its quants as signed bytes (q − 8 or q − 16 for the `_0` types, q for the
//! `_1` types, whose min goes into the mins' line) and laid out as a Q8_0 group block, so the Q8_0
//! tile ([`super::q8_0`]) multiplies them.

use super::q8_0::{activation, activation_q8_1, put_block, tile, GROUP_BLOCK, GROUP_BLOCK_MIN, RX};
use super::{f16, Kind, Line, LANES};
use crate::quant::cpu_product::q4_0::{w_block, Q8_0_BLOCK, Q8_1_BLOCK};

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

/// A stored block's quants as the signed bytes the Q8_0 layout holds, its scale and (`MIN`) min.
fn unpack<const FIFTH: bool, const MIN: bool>(block: &[u8]) -> ([u8; 32], f32, Option<f32>) {
    let (min_bytes, high_bytes) = (if MIN { 2 } else { 0 }, if FIFTH { 4 } else { 0 });
    let high = if FIFTH { u32::from_le_bytes([block[2 + min_bytes], block[3 + min_bytes], block[4 + min_bytes], block[5 + min_bytes]]) } else { 0 };
    let nibbles = &block[2 + min_bytes + high_bytes..];
    let offset = match (MIN, FIFTH) {
        (true, _) => 0,
        (false, false) => 8,
        (false, true) => 16,
    };
    let quants = std::array::from_fn(|j| {
        let q = (nibbles[j % 16] >> (4 * (j / 16))) & 0xF | (((high >> j) & 1) as u8) << 4;
        (q as i8 - offset) as u8
    });
    (quants, f16(block), MIN.then(|| f16(&block[2..])))
}

fn repack<const FIFTH: bool, const MIN: bool>(w: &[u8], rows: usize, kb: usize, scratch: &mut [Line]) {
    let (w_block, group_block) = (w_block::<FIFTH, MIN>(), if MIN { GROUP_BLOCK_MIN } else { GROUP_BLOCK });
    for g in 0..rows.div_ceil(LANES) {
        for b in 0..kb {
            let lines = &mut scratch[(g * kb + b) * group_block / 64..][..group_block / 64];
            for i in 0..LANES.min(rows - g * LANES) {
                let (quants, d, min) = unpack::<FIFTH, MIN>(&w[((g * LANES + i) * kb + b) * w_block..][..w_block]);
                put_block(lines, i, d, &quants, min);
            }
        }
    }
}
