//! The Q8_0 prompt product with weight rows in vector lanes (AVX512-VNNI): each task copies its
//! weight rows, sixteen at a time, into a scratch layout where one 512-bit vector holds the same
//! four quants of sixteen rows; an activation's four quants, broadcast, then meet sixteen rows in one
//! `vpdpbusd`, and a block's 32 values take eight of them with no horizontal sums, no per-pair scale
//! shuffles: sixteen dot products per twelve instructions, where [`super::q8_0`]'s row tiles take
//! five per dot. The copy costs one pass over the weights per product, repaid over a prompt's rows;
//! decode (one row) keeps the row tiles. llama.cpp repacks some types into interleaved rows at load
//! for the same reason (ggml-cpu `repack.cpp`); ours repacks per product, so the model keeps the
//! GGUF's blocks as they are (shared by copies, exported byte for byte).

#![cfg(target_arch = "x86_64")]
// Indexed loops over the const tile sizes unroll fully and keep the accumulators in registers.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use super::q8_0::BLOCK;

/// Weight rows per group: the lanes of a 512-bit vector of i32.
const LANES: usize = 16;
/// Weight rows per task: four groups, whose scratch (40 bytes a weight) stays in L2.
const TASK_ROWS: usize = 64;
/// Activation rows per tile (accumulators in registers beside the eight weight vectors).
const RX: usize = 8;
/// One group's block in the scratch: scales (16 f32), −128·Σw per row (16 i32), then eight vectors
/// of quants (vector g, lane i: row i's quants 4g..4g+4).
const GROUP_BLOCK: usize = 64 * 10;

/// A cache line of scratch (the vectors load aligned).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

thread_local! {
    /// Each thread's scratch, reused across products (a 64-row task of a 14336-wide matrix: 1.1 MB).
    static SCRATCH: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// Whether the lane product serves an `m`-row product on this tier: prompts on VNNI CPUs.
pub(super) fn serves(m: usize, vnni: bool) -> bool {
    vnni && m >= 16
}

/// `dst[m, n] = x[m] · w[n]ᵀ`: `w` `n` rows and `x` `m` rows of `kb` Q8_0 blocks.
pub(super) fn product(w: &[u8], x: &[u8], m: usize, kb: usize, n: usize, dst: &mut [f32]) {
    let (ldw, ldx) = (kb * BLOCK, kb * BLOCK);
    // The kernels read by pointer: every row they are given must be whole.
    assert!(w.len() == n * ldw && x.len() == m * ldx && dst.len() == m * n, "q8_0 lanes: operand sizes disagree");
    // The activations once: quants made unsigned (x + 128, the bias the scratch's sums take back) in
    // rows of k bytes, scales as f32.
    let mut xq = vec![0u8; m * kb * 32];
    let mut xd = vec![0f32; m * kb];
    for ((q, d), block) in xq.chunks_exact_mut(32).zip(xd.iter_mut()).zip(x.chunks_exact(BLOCK)) {
        *d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        q.iter_mut().zip(&block[2..]).for_each(|(q, &v)| *q = v ^ 0x80);
    }
    let tiles: Vec<(usize, usize, Vec<f32>)> = (0..n.div_ceil(TASK_ROWS))
        .into_par_iter()
        .map(|t| {
            let (start, len) = (t * TASK_ROWS, TASK_ROWS.min(n - t * TASK_ROWS));
            let mut out = vec![0f32; m * len];
            SCRATCH.with_borrow_mut(|scratch| {
                repack(&w[start * ldw..(start + len) * ldw], len, kb, scratch);
                for g in 0..len.div_ceil(LANES) {
                    let lanes = ((1u32 << LANES.min(len - g * LANES)) - 1) as u16;
                    // Activation rows c.. against group g, by `tile` (RX rows or one).
                    let mut run = |tile: Tile, c: usize| {
                        // SAFETY: the CPU has AVX-512 VNNI (`serves`); the scratch holds group g
                        // (`repack`); the tile's rows c.. of xq and xd exist (callers keep within m);
                        // out has m rows of len, and only the group's rows (`lanes`) are written.
                        unsafe {
                            tile(
                                kb,
                                scratch.as_ptr().cast::<u8>().add(g * kb * GROUP_BLOCK),
                                xq.as_ptr().add(c * kb * 32),
                                kb * 32,
                                xd.as_ptr().add(c * kb),
                                kb,
                                out.as_mut_ptr().add(c * len + g * LANES),
                                len,
                                lanes,
                            )
                        }
                    };
                    let whole = m / RX * RX;
                    for c in (0..whole).step_by(RX) {
                        run(tile::<RX>, c);
                    }
                    for c in whole..m {
                        run(tile::<1>, c);
                    }
                }
            });
            (start, len, out)
        })
        .collect();
    for (start, len, out) in tiles {
        for (d, o) in dst.chunks_mut(n).zip(out.chunks(len)) {
            d[start..start + len].copy_from_slice(o);
        }
    }
}

/// `rows` weight rows of `kb` Q8_0 blocks (`w`) into `scratch`, groups of sixteen (the last padded
/// with zero rows, whose sums are zero), each group's blocks in order.
fn repack(w: &[u8], rows: usize, kb: usize, scratch: &mut Vec<Line>) {
    let groups = rows.div_ceil(LANES);
    scratch.clear();
    scratch.resize(groups * kb * GROUP_BLOCK / 64, Line([0; 64]));
    for g in 0..groups {
        for b in 0..kb {
            let lines = &mut scratch[(g * kb + b) * GROUP_BLOCK / 64..][..GROUP_BLOCK / 64];
            for i in 0..LANES.min(rows - g * LANES) {
                let block = &w[((g * LANES + i) * kb + b) * BLOCK..][..BLOCK];
                let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                lines[0].0[4 * i..4 * i + 4].copy_from_slice(&d.to_le_bytes());
                let sum: i32 = block[2..].iter().map(|&q| q as i8 as i32).sum();
                lines[1].0[4 * i..4 * i + 4].copy_from_slice(&(-128 * sum).to_le_bytes());
                for v in 0..8 {
                    lines[2 + v].0[4 * i..4 * i + 4].copy_from_slice(&block[2 + 4 * v..2 + 4 * v + 4]);
                }
            }
        }
    }
}

/// A tile: sixteen weight rows (one scratch group) against `RX` activation rows.
type Tile = unsafe fn(kb: usize, group: *const u8, xq: *const u8, ldq: usize, xd: *const f32, ldd: usize, out: *mut f32, ldo: usize, lanes: u16);

/// `out[c·ldo + i] = w_i · x_c` for the group's rows i (those set in `lanes`) and RX activation rows.
///
/// # Safety
/// The CPU has AVX-512F and VNNI; `group` holds `kb` group blocks; `xq` RX rows of `kb`·32 unsigned
/// quants (`ldq` apart), `xd` RX rows of `kb` scales (`ldd` apart); `out[c·ldo + i]` is writable for
/// c < RX and lanes i set in `lanes`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)] // a micro-kernel's operands: pointers and leading dimensions
unsafe fn tile<const RX: usize>(kb: usize, group: *const u8, xq: *const u8, ldq: usize, xd: *const f32, ldd: usize, out: *mut f32, ldo: usize, lanes: u16) {
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
            let q = xq.add(c * ldq + b * 32);
            let mut sum = start;
            for v in 0..8 {
                sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi32(q.add(4 * v).cast::<i32>().read_unaligned()), wq[v]);
            }
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*xd.add(c * ldd + b)));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[c]);
        }
    }
    for c in 0..RX {
        _mm512_mask_storeu_ps(out.add(c * ldo), lanes, acc[c]);
    }
}
