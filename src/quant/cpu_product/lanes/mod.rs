//! Prompt products with weight rows in vector lanes (AVX512-VNNI), for Q8_0, Q4_K, Q5_K, Q6_K and
//! ggml's 32-value types (Q4_0, Q4_1, Q5_0, Q5_1). Each
//! task copies its weight rows, sixteen at a time, into a scratch layout where one 512-bit vector
//! holds the same four quants of sixteen rows (unpacked to bytes, scales widened to 32-bit lanes); an
//! activation's four quants, broadcast, then meet sixteen rows in one `vpdpbusd`, and a block's sums
//! need no horizontal adds and no per-pair scale shuffles. The row tiles ([`super::q8_0`] and the
//! others) take four to seven instructions per 64 products of one row pair; these about one and a
//! half. The copy costs one pass over the weights per product, repaid over a prompt's rows; decode
//! (one row) keeps the row tiles. llama.cpp repacks some types into interleaved rows at load for
//! the same reason (ggml-cpu `repack.cpp`); ours repacks per product, so the model keeps the GGUF's
//! blocks as they are (shared by copies, exported byte for byte) and needs no second copy.
//!
//! This module is the driver: tasks, scratch, tiles over the activation rows. Each type's file
//! holds its scratch layout, its activation layout and its tile.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use std::cell::RefCell;

mod q4_0;
mod q4_k;
mod q6_k;
mod q8_0;

/// Weight rows per group: the lanes of a 512-bit vector of i32.
const LANES: usize = 16;
// A task's weight rows (`super::by_tasks`) are whole groups: four, whose scratch stays in L2.
const _: () = assert!(super::TASK_ROWS.is_multiple_of(LANES));

/// A cache line of scratch (the vectors load aligned).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// The f16 at the start of `b` as f32.
fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Row `lane`'s 32-bit word in a scratch vector.
fn put(line: &mut Line, lane: usize, word: [u8; 4]) {
    line.0[4 * lane..4 * lane + 4].copy_from_slice(&word);
}

/// Vector `v` of a group block at `p`.
#[inline(always)]
unsafe fn vector(p: *const u8, v: usize) -> __m512i {
    _mm512_load_si512(p.add(64 * v).cast())
}

/// Eight rows' eight 32-bit words (row i in `r[i]`) as eight vectors, vector v holding word v of
/// every row: unpacks of words, then of pairs, then of halves (ggml's and everyone's 8 × 8 transpose).
///
/// # Safety
/// Inside a function compiled with AVX2.
#[inline(always)]
unsafe fn transpose8(r: [__m256i; 8]) -> [__m256i; 8] {
    let t: [__m256i; 8] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_epi32(a, b)
        } else {
            _mm256_unpackhi_epi32(a, b)
        }
    });
    // u[4h + k] for rows 4h..4h + 4: words k and k + 4 of each, in its two halves.
    let u: [__m256i; 8] = std::array::from_fn(|i| {
        let (h, k) = (i / 4, i % 4);
        let (a, b) = (t[4 * h + k / 2], t[4 * h + 2 + k / 2]);
        if k % 2 == 0 {
            _mm256_unpacklo_epi64(a, b)
        } else {
            _mm256_unpackhi_epi64(a, b)
        }
    });
    std::array::from_fn(|v| match v {
        0..4 => _mm256_permute2x128_si256::<0x20>(u[v], u[4 + v]),
        _ => _mm256_permute2x128_si256::<0x31>(u[v - 4], u[v]),
    })
}

/// Sixteen rows' 32 bytes (row i in `q[i]`) in the scratch layout: vector v, lane i holds row i's
/// bytes 4v..4v + 4.
///
/// # Safety
/// Inside a function compiled with AVX-512F.
#[inline(always)]
unsafe fn transpose(q: &[__m256i; LANES]) -> [__m512i; 8] {
    let low = transpose8(std::array::from_fn(|i| q[i]));
    let high = transpose8(std::array::from_fn(|i| q[8 + i]));
    std::array::from_fn(|v| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low[v]), high[v]))
}

/// Writes `chunks` × 8 quant vectors from line `first` of a group block's `lines`: chunk k of row i
/// (its values 32k..32k + 32, one byte each) is `chunk(i, k)`, for the group's `rows` rows (the
/// others stay zero).
///
/// # Safety
/// Inside a function compiled with AVX-512F; `lines` holds lines `first..first + 8·chunks`.
#[inline(always)]
unsafe fn put_chunks(lines: &mut [Line], first: usize, chunks: usize, rows: usize, chunk: impl Fn(usize, usize) -> __m256i) {
    let lines = &mut lines[first..first + 8 * chunks];
    for k in 0..chunks {
        let mut q = [_mm256_setzero_si256(); LANES];
        for (i, q) in q.iter_mut().enumerate().take(rows) {
            *q = chunk(i, k);
        }
        for (v, quants) in transpose(&q).into_iter().enumerate() {
            _mm512_store_si512(lines[8 * k + v].0.as_mut_ptr().cast(), quants);
        }
    }
}

/// `isum[c] += Σ_j s_j · (Σ q·x)_j` over a K-quant group block at `p` (block `b` of the activation
/// rows `x`): `subs` sub-blocks of `per` quant vectors (four values each), the quants from vector
/// `quants` on, sub-block j's scales (i32 lanes) in vector `scales + j`. Called with constants, so
/// the loops unroll in the tile.
///
/// # Safety
/// Inside a tile compiled with AVX-512F/VNNI; `p` holds the vectors named; `x` RX rows of block b.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indexed loops keep the accumulators in registers
unsafe fn scaled_sums<const RX: usize>(
    p: *const u8,
    x: Rows,
    b: usize,
    (subs, per): (usize, usize),
    (quants, scales): (usize, usize),
    isum: &mut [__m512i; RX],
) {
    for j in 0..subs {
        let mut isub = [_mm512_setzero_si512(); RX];
        for v in 0..per {
            let wq = vector(p, quants + per * j + v);
            for c in 0..RX {
                let q = x.q.add(c * x.ldq + b * 256 + 4 * (per * j + v));
                isub[c] = _mm512_dpbusd_epi32(isub[c], wq, _mm512_set1_epi32(q.cast::<i32>().read_unaligned()));
            }
        }
        let sc = vector(p, scales + j);
        for c in 0..RX {
            isum[c] = _mm512_add_epi32(isum[c], _mm512_mullo_epi32(isub[c], sc));
        }
    }
}

thread_local! {
    /// Each thread's scratch, reused across products.
    static SCRATCH: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// The activations as a lane tile reads them, `m` rows of `kb` blocks: quants (one byte each, in
/// order), per block a few 32-bit words a type needs (sums of quants, packed) and the scale.
struct Activations {
    q: Vec<u8>,
    words: Vec<u32>,
    d: Vec<f32>,
}

/// Where one activation row begins in each part, and the parts' row strides.
#[derive(Clone, Copy)]
struct Rows {
    q: *const u8,
    ldq: usize,
    words: *const u32,
    ldw: usize,
    d: *const f32,
    ldd: usize,
}

impl Rows {
    /// The rows from `c` on.
    fn at(self, c: usize) -> Rows {
        // SAFETY (of the pointers' use, not this arithmetic): callers pass c within the rows.
        Rows { q: self.q.wrapping_add(c * self.ldq), words: self.words.wrapping_add(c * self.ldw), d: self.d.wrapping_add(c * self.ldd), ..self }
    }
}

/// A tile: sixteen weight rows (one scratch group of `kb` blocks) against its activation rows into
/// `out[c·ldo + i]` for the lanes i set in `lanes`.
type Tile = unsafe fn(kb: usize, group: *const u8, x: Rows, out: *mut f32, ldo: usize, lanes: u16);

/// One weight type's lane product.
pub(super) struct Kind {
    /// Bytes of a stored weight block, of a group's block in scratch (whole lines).
    w_block: usize,
    group_block: usize,
    /// Activation blocks' quants, words per block.
    values: usize,
    words: usize,
    /// Writes the group blocks of `rows` weight rows of `kb` blocks into `scratch` (room made); unsafe
    /// as the tiles are: some need AVX-512 VNNI.
    repack: unsafe fn(w: &[u8], rows: usize, kb: usize, scratch: &mut [Line]),
    /// Writes one stored activation block's quants, words and scale.
    activation: fn(block: &[u8], q: &mut [u8], words: &mut [u32]) -> f32,
    /// Activation rows of the tile; tiles of that many rows and of one.
    rx: usize,
    tile: Tile,
    tile1: Tile,
    /// Bytes of a stored activation block.
    x_block: usize,
}

/// The lane product for `dtype` where it serves an `m`-row product on this CPU: prompts (m ≥ 16)
/// with AVX512-VNNI.
pub(super) fn kind(dtype: candle_core::quantized::GgmlDType, m: usize, vnni: bool) -> Option<Kind> {
    use candle_core::quantized::GgmlDType;
    if !vnni || m < 16 {
        return None;
    }
    match dtype {
        GgmlDType::Q8_0 => Some(q8_0::KIND),
        GgmlDType::Q4K => Some(q4_k::KIND),
        GgmlDType::Q5K => Some(q4_k::KIND5),
        GgmlDType::Q6K => Some(q6_k::KIND),
        GgmlDType::Q4_0 => Some(q4_0::KIND4_0),
        GgmlDType::Q4_1 => Some(q4_0::KIND4_1),
        GgmlDType::Q5_0 => Some(q4_0::KIND5_0),
        GgmlDType::Q5_1 => Some(q4_0::KIND5_1),
        _ => None,
    }
}

/// `dst[m, n] = x[m] · w[n]ᵀ` by `kind`'s lane product (see [`kind`] for where one serves). `w`:
/// `n` rows of `kb` stored blocks; `x`: `m` rows of `kb` stored activation blocks (q8_0 or q8_K).
pub(super) fn product(kind: &Kind, w: &[u8], x: &[u8], m: usize, kb: usize, n: usize, dst: &mut [f32]) {
    let ldw = kb * kind.w_block;
    // The tiles read by pointer: every row they are given must be whole.
    assert!(w.len() == n * ldw && x.len() == m * kb * kind.x_block && dst.len() == m * n, "lane product: operand sizes disagree");
    let xa = activations(kind, x, m, kb);
    super::by_tasks(m, n, dst, |start, out| {
        let len = out.len;
        let rows = Rows { q: xa.q.as_ptr(), ldq: kb * kind.values, words: xa.words.as_ptr(), ldw: kb * kind.words, d: xa.d.as_ptr(), ldd: kb };
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            scratch.resize(len.div_ceil(LANES) * kb * kind.group_block / 64, Line([0; 64]));
            // SAFETY: the CPU has AVX-512 VNNI (`kind`); the scratch holds the group blocks (resized).
            unsafe { (kind.repack)(&w[start * ldw..(start + len) * ldw], len, kb, scratch) };
            for g in 0..len.div_ceil(LANES) {
                group(kind, kb, &scratch[g * kb * kind.group_block / 64..], rows, m, out, g * LANES, LANES.min(len - g * LANES));
            }
        });
    });
}

/// One group of `rows` weight rows (its scratch at `group`) against every activation row, into
/// `out`'s columns `col..col + rows`.
#[allow(clippy::too_many_arguments)] // the driver's loop body, named
fn group(kind: &Kind, kb: usize, group: &[Line], x: Rows, m: usize, out: &mut super::Columns, col: usize, rows: usize) {
    assert!(group.len() >= kb * kind.group_block / 64, "lane product: tile outside its scratch");
    let lanes = ((1u32 << rows) - 1) as u16;
    let whole = m / kind.rx * kind.rx;
    for c in 0..m {
        let tile = match c {
            c if c < whole && c % kind.rx == 0 => kind.tile,
            c if c >= whole => kind.tile1,
            _ => continue,
        };
        let (at, ldo) = out.tile_out(c, if c < whole { kind.rx } else { 1 }, col, rows);
        // SAFETY: the CPU has AVX-512 VNNI (`kind`); `group` holds kb group blocks (asserted); the
        // tile's activation rows c.. exist (c + rx ≤ whole ≤ m, or one row c < m); it stores `rows`
        // lanes of each of its rows into the output block (`tile_out` checked).
        unsafe { tile(kb, group.as_ptr().cast(), x.at(c), at, ldo, lanes) };
    }
}

/// The stored activation blocks `x` (`m` rows of `kb`) in the tiles' layout.
fn activations(kind: &Kind, x: &[u8], m: usize, kb: usize) -> Activations {
    let mut a = Activations { q: vec![0; m * kb * kind.values], words: vec![0; m * kb * kind.words], d: vec![0.0; m * kb] };
    let blocks = x.chunks_exact(kind.x_block);
    for (((block, q), words), d) in blocks.zip(a.q.chunks_exact_mut(kind.values)).zip(a.words.chunks_exact_mut(kind.words)).zip(a.d.iter_mut()) {
        *d = (kind.activation)(block, q, words);
    }
    a
}
