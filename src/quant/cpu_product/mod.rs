//! The CPU product of quantized weight blocks with f32 activations, computed as llama.cpp's x86 builds
//! compute it: each activation row quantized to 8-bit blocks by ggml's x86 rule, then candle's integer
//! block dots (ports of ggml's, summed in ggml's order).
//!
//! Why not candle's `matmul`: it quantizes the activations by ggml's reference C rule instead — q8_0
//! and q8_1 scale by 1/(amax/127) and round ties away from zero, q8_1's sum is taken in f16 arithmetic,
//! q8_K rounds ties away from zero — where every x86 build of llama.cpp scales by 127/amax and rounds
//! ties to even (`quantize_row_q8_0`/`_q8_1` in ggml-cpu/arch/x86/quants.c, `nearest_int` in
//! `quantize_row_q8_K_ref`). Almost always the same bytes; but where one value lands on the other side
//! of a rounding step, the logits part from llama.cpp's from there on (a sequence's K/V carry it).
//!
//! candle keeps its block types' fields crate-private, so the activation blocks are written through
//! their `#[repr(C)]` layout (sizes and alignment asserted at compile time; the test reads them back
//! through candle's own dequantizer).
//!
//! The block dots are exact integers either way; the f32 sums of their scaled results are ordered
//! differently by each path (candle's as ggml's vec_dot, the tiles lane-wise or per block), so the
//! logits agree with llama.cpp's to f32 rounding, not bit for bit (llama.cpp's own AVX2 and AVX-512
//! builds differ the same way).
//!
//! The products themselves: every type we load — Q8_0, Q4_K, Q5_K and Q6_K (what Q8_0, Q4_K_M and
//! Q5_K_M files hold), and Q4_0, Q4_1, Q5_0 and Q5_1 (older files, and llama-quantize's fallback for
//! rows not a multiple of 256) — on x86 with AVX2 run our tiles ([`q8_0`], [`q4_k`] for Q4_K and
//! Q5_K, [`q6_k`], [`q4_0`] for the 32-value types, in [`int8`]'s AVX2 or AVX512-VNNI steps;
//! prompts on VNNI CPUs in [`lanes`]), which keep several weight and activation rows' blocks in
//! registers: candle's dots take one activation row at a time, unpack each weight block again for
//! every row of a prompt, and convert every f16 scale through a call (a fifth of a Q8_0 prompt's
//! time, measured; its Q5_0 dot decoded SmolLM2-135M's Q4_K_M file 6× slower than our tile). Other
//! CPUs take candle's dots.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType};
use candle_core::quantized::{GgmlDType, QuantizedType};
use half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};

mod int8;
mod lanes;
mod q4_0;
mod q4_k;
mod q6_k;
mod q8_0;

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34 && std::mem::align_of::<BlockQ8_0>() == 2);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36 && std::mem::align_of::<BlockQ8_1>() == 2);
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292 && std::mem::align_of::<BlockQ8K>() == 4);

/// Weight rows one task multiplies (a multiple of 4, for candle's four-row dot): 64 rows of a 4096-wide
/// Q4_K matrix are 147 KB, which stay in L2 while every activation row passes them.
const TASK_ROWS: usize = 64;

/// Whether the rows of a product may be computed together in ways that change their bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// The fastest product for the row count (a prompt: lane products from 16 rows).
    Fastest,
    /// Each activation row's outputs are the bits it gets alone (decode rows of several sequences):
    /// the row tiles and candle's dots, whose sum for one (row, column) does not depend on the tile.
    Invariant,
}

/// `dst[m, n] = lhs[m, k] · wᵀ` for `blocks` holding `w` (`[n, k]`) in a quantized type.
pub(crate) fn matmul_t(blocks: &dyn QuantizedType, (m, k, n): (usize, usize, usize), lhs: &[f32], dst: &mut [f32], rows: Rows) -> Result<()> {
    let d = (m, k, n, rows);
    match blocks.dtype() {
        GgmlDType::Q4_0 => typed::<BlockQ4_0>(blocks, d, lhs, dst),
        GgmlDType::Q4_1 => typed::<BlockQ4_1>(blocks, d, lhs, dst),
        GgmlDType::Q5_0 => typed::<BlockQ5_0>(blocks, d, lhs, dst),
        GgmlDType::Q5_1 => typed::<BlockQ5_1>(blocks, d, lhs, dst),
        GgmlDType::Q8_0 => typed::<BlockQ8_0>(blocks, d, lhs, dst),
        GgmlDType::Q4K => typed::<BlockQ4K>(blocks, d, lhs, dst),
        GgmlDType::Q5K => typed::<BlockQ5K>(blocks, d, lhs, dst),
        GgmlDType::Q6K => typed::<BlockQ6K>(blocks, d, lhs, dst),
        other => Err(Error::Internal(format!("no quantized product for {other:?} blocks"))),
    }
}

fn typed<T: GgmlType + Sync>(blocks: &dyn QuantizedType, (m, k, n, rows): (usize, usize, usize, Rows), lhs: &[f32], dst: &mut [f32]) -> Result<()> {
    let kb = k / T::BLCK_SIZE;
    if k == 0 {
        dst.fill(0.0);
        return Ok(());
    }
    if !k.is_multiple_of(T::BLCK_SIZE) || blocks.storage_size_in_bytes() != n * kb * std::mem::size_of::<T>() || lhs.len() != m * k || dst.len() != m * n {
        return Err(Error::Internal(format!("quantized product of [{m}, {k}] by {:?} blocks of [{n}, {k}]: sizes disagree", T::DTYPE)));
    }
    // SAFETY: the storage is candle's `Vec<T>` of `n * kb` blocks (its dtype is T's, its size checked
    // above), alive and unchanged while `blocks` is borrowed.
    let w: &[T] = unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<T>(), n * kb) };
    let x = quantize_rows::<T::VecDotType>(lhs, m, k)?;
    #[cfg(target_arch = "x86_64")]
    if let Some(kernel) = Tiled::for_type(T::DTYPE, crate::kernels::cpu::tier::active(), crate::kernels::cpu::tier::cores()) {
        kernel.product(as_bytes(w), as_bytes(&x), (m, kb, n), dst, rows);
        return Ok(());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = rows; // the tiled kernels' split (x86 only)
                  // `o[j - start] = w[j] · xi` for the weight rows `start..start + o.len()`, four rows per dot.
    let dots = |xi: &[T::VecDotType], start: usize, o: &mut [f32]| {
        let row = |j: usize| &w[j * kb..(j + 1) * kb];
        let done = o.len() / 4 * 4;
        let mut quads = o.chunks_exact_mut(4);
        for (q, o) in (&mut quads).enumerate() {
            let j = start + 4 * q;
            let (a, b, c, d) = T::vec_dot_4(k, row(j), row(j + 1), row(j + 2), row(j + 3), xi);
            o.copy_from_slice(&[a, b, c, d]);
        }
        for (r, o) in quads.into_remainder().iter_mut().enumerate() {
            *o = T::vec_dot(k, row(start + done + r), xi);
        }
    };
    if m == 1 {
        // Decode: each task writes its rows' dots in place.
        dst.par_chunks_mut(TASK_ROWS).enumerate().for_each(|(t, o)| dots(&x, t * TASK_ROWS, o));
        return Ok(());
    }
    // A prompt: each task passes every activation row over its weight rows.
    by_tasks(m, n, dst, |start, out| {
        for (c, xi) in x.chunks(kb).enumerate() {
            dots(xi, start, out.row(c));
        }
    });
    Ok(())
}

/// `dst[m, n]` (`m` activation rows by `n` weight rows) by tasks of TASK_ROWS weight rows run in
/// parallel: `task(start, out)` writes weight rows `start..start + out.len` against every activation
/// row into its columns of `dst` (the task's weight rows stay in L2 while every activation row passes
/// them), in place: a prompt's outputs were once each task's own buffer, zeroed and copied into
/// `dst` after (a tenth of a SmolLM2 prompt's time).
fn by_tasks(m: usize, n: usize, dst: &mut [f32], task: impl Fn(usize, &mut Columns) + Sync) {
    assert_eq!(dst.len(), m * n, "quantized product: output size");
    let base = Base(dst.as_mut_ptr());
    (0..n.div_ceil(TASK_ROWS)).into_par_iter().for_each(|t| {
        let start = t * TASK_ROWS;
        // SAFETY: columns start..start + len of the m rows of dst, which `dst` holds (asserted); the
        // tasks' column ranges are disjoint, and dst stays borrowed until every task has returned.
        let mut out = unsafe { Columns::new(base.at(start), n, m, TASK_ROWS.min(n - start)) };
        task(start, &mut out);
    });
}

/// The start of a task's output, shared with the tasks (each writes only its own columns).
#[derive(Clone, Copy)]
struct Base(*mut f32);
// SAFETY: tasks write disjoint columns through it (`by_tasks`).
unsafe impl Sync for Base {}

impl Base {
    /// Column `c` of row 0 (a method, so closures capture the `Sync` wrapper, not its pointer).
    fn at(self, c: usize) -> *mut f32 {
        self.0.wrapping_add(c)
    }
}

/// `len` columns of a row-major output of `m` rows of `ld`: what one task writes, alone.
struct Columns {
    at: *mut f32,
    ld: usize,
    m: usize,
    len: usize,
}

impl Columns {
    /// # Safety
    /// `at` points at the first of `len` columns of `m` rows `ld` apart, all writable and written by
    /// no one else while this lives.
    unsafe fn new(at: *mut f32, ld: usize, m: usize, len: usize) -> Columns {
        Columns { at, ld, m, len }
    }

    /// Row `c`'s columns.
    fn row(&mut self, c: usize) -> &mut [f32] {
        assert!(c < self.m, "quantized product: output row {c} of {}", self.m);
        // SAFETY: row c's columns are this block's alone (`new`); the borrow of self keeps one slice at a time.
        unsafe { std::slice::from_raw_parts_mut(self.at.add(c * self.ld), self.len) }
    }

    /// Where a tile writes rows `c..c + rows` from column `col`: `out[i·ld + j]` for i < rows, j < cols.
    /// Checked here, so the tile's pointer stays inside the block.
    #[cfg(target_arch = "x86_64")]
    fn tile_out(&mut self, c: usize, rows: usize, col: usize, cols: usize) -> (*mut f32, usize) {
        assert!(c + rows <= self.m && col + cols <= self.len, "quantized product: tile outside its output block");
        (self.at.wrapping_add(c * self.ld + col), self.ld)
    }
}

/// A slice of blocks as the bytes a GGUF stores.
#[cfg(target_arch = "x86_64")]
fn as_bytes<B>(blocks: &[B]) -> &[u8] {
    // SAFETY: the block types are `#[repr(C)]` plain data without padding (sizes asserted above and in
    // candle), so every byte is initialised.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks)) }
}

/// One weight type's tiles on this CPU, and the largest tile the registers hold.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Tiled {
    dtype: GgmlDType,
    tiles: fn(bool, usize, usize) -> int8::Tile,
    vnni: bool,
    /// Weight rows and activation rows of the largest tile, and the weight rows of decode's tile (one
    /// activation row leaves registers for more weight rows: more independent sums in flight).
    rw: usize,
    rx: usize,
    rw1: usize,
    /// Weight rows shorter than this many bytes decode one at a time (0: never).
    alone_below: usize,
    /// Bytes of a weight block and of an activation block.
    w_block: usize,
    x_block: usize,
}

#[cfg(target_arch = "x86_64")]
impl Tiled {
    /// The tiles for `dtype` at `tier` on `cores`; None where candle's dots run instead. Tile sizes: 16
    /// vector registers under AVX2, 32 with AVX-512's VL (accumulators, unpacked weights and scales
    /// must fit). The tile shape never changes a (row, column)'s bits, only its speed.
    fn for_type(dtype: GgmlDType, tier: crate::kernels::cpu::tier::Tier, cores: crate::kernels::cpu::tier::Cores) -> Option<Tiled> {
        if !tier.int8() {
            return None;
        }
        let vnni = tier.int8_vnni();
        let q8k = q4_k::Q8K_BLOCK;
        // Decode's tiles (rw1) measured on the Xeon of BENCHMARKS.md (tg64, Q8_0 and Q4_K_M files):
        // with 4 rows instead of 2, AVX2's Q8_0 decodes 1.33× faster; Q4_K's 4 (VNNI) or 3 (AVX2)
        // rows and Q6_K's 3 gave 1.19× (VNNI) and 1.17× (AVX2) over 2 and 1.
        let (tiles, w_block, x_block, (rw, rx, rw1)): (fn(bool, usize, usize) -> int8::Tile, _, _, _) = match dtype {
            GgmlDType::Q8_0 => (q8_0::tiles, q8_0::BLOCK, q8_0::BLOCK, if vnni { (4, 4, 4) } else { (2, 2, 4) }),
            GgmlDType::Q4K => (q4_k::tiles, q4_k::BLOCK, q8k, if vnni { (2, 4, 4) } else { (1, 3, 3) }),
            GgmlDType::Q6K => (q6_k::tiles, q6_k::BLOCK, q8k, if vnni { (2, 4, 3) } else { (1, 3, 3) }),
            GgmlDType::Q5K => (q4_k::tiles5, q4_k::BLOCK5, q8k, if vnni { (2, 4, 4) } else { (1, 3, 3) }),
            // The 32-value types' shapes measured on the Zen 4 (SmolLM2-135M's Q4_K_M file, mostly
            // Q5_0, one thread): 2 × 4 for small prompts and batched decode (4 × 4 prompts 4 % faster
            // on VNNI but batches of 8 6 % slower; on AVX2 2 × 4 beat 2 × 3 by 10 %). Decode's 4 rows
            // off AMD are untried there.
            GgmlDType::Q4_0 => (q4_0::tiles4_0, q4_0::Q4_0_BLOCK, q4_0::Q8_0_BLOCK, (2, 4, 4)),
            GgmlDType::Q4_1 => (q4_0::tiles4_1, q4_0::Q4_1_BLOCK, q4_0::Q8_1_BLOCK, (2, 4, 4)),
            GgmlDType::Q5_0 => (q4_0::tiles5_0, q4_0::Q5_0_BLOCK, q4_0::Q8_0_BLOCK, (2, 4, 4)),
            GgmlDType::Q5_1 => (q4_0::tiles5_1, q4_0::Q5_1_BLOCK, q4_0::Q8_1_BLOCK, (2, 4, 4)),
            _ => return None,
        };
        // On AMD's cores decode takes every type but Q8_0 one weight row at a time: measured on a
        // Zen 4 (OpenChat-shaped Q4_K_M, one thread, either tier) 1 row decodes 2.1× faster than 3
        // or 4 (1.9× at two threads), and 2 rows slowest; with each row its own stream the
        // prefetchers see one stream, not several short ones (prefetching the next tile's rows
        // recovered only half the loss). The 32-value types alike (Q5_0, one thread): 1 row 1.7×
        // faster than 4 on SmolLM2-135M (576-wide rows), 2.3× at 1024, 1.8× at 2048, even at 4096.
        // Q8_0 keeps its rows on long rows (4096 wide: 4 rows 1.35× over 1, with its prefetch) but
        // not on short ones (576: 1 row 1.38× faster; 1024: 1.28×; 2048: even), so rows under 2 KB
        // decode alone.
        let amd = cores == crate::kernels::cpu::tier::Cores::Amd;
        let (rw1, alone_below) = match dtype {
            GgmlDType::Q8_0 if amd => (rw1, 2048),
            _ if amd => (1, 0),
            _ => (rw1, 0),
        };
        // The tiles take at most 4 rows (`tiles_for!` maps more to 4): a larger step would skip rows
        // (constants above; checked every run, a few compares per product).
        assert!(rw <= 4 && rw1 <= 4 && rx <= 4, "quantized tile of {rw}/{rw1} × {rx} rows");
        Some(Tiled { dtype, tiles, vnni, rw, rx, rw1, alone_below, w_block, x_block })
    }

    /// `dst[m, n] = x[m] · w[n]ᵀ` for `w` `n` rows and `x` `m` rows of `kb` blocks: tasks of
    /// TASK_ROWS weight rows (kept in L2 while every activation row passes), tiles inside them.
    fn product(self, w: &[u8], x: &[u8], (m, kb, n): (usize, usize, usize), dst: &mut [f32], order: Rows) {
        let (ldw, ldx) = (kb * self.w_block, kb * self.x_block);
        // The tiles read by pointer: every row they are given must be whole.
        assert!(w.len() == n * ldw && x.len() == m * ldx && dst.len() == m * n, "quantized tiles: operand sizes disagree");
        // Weight rows start..start + len against activation rows x0..x0 + rx into out[c·ldo + r].
        let rows = |start: usize, len: usize, x0: usize, rx: usize, out: *mut f32, ldo: usize| {
            let rw_max = match m {
                1 if ldw < self.alone_below => 1,
                1 => self.rw1,
                _ => self.rw,
            };
            for r0 in (0..len).step_by(rw_max) {
                let rw = rw_max.min(len - r0);
                let tile = (self.tiles)(self.vnni, rw, rx);
                // SAFETY: the tier has the tile's instructions (`for_type`); rows start + r0 .. + rw of
                // w and x0 .. x0 + rx of x are whole (sizes asserted above, callers keep within n and
                // m), and out[c·ldo + r] lies in the caller's buffer for c < rx, r < len (decode's
                // chunk, or the task's block by `Columns::tile_out`).
                unsafe { tile(kb, w.as_ptr().add((start + r0) * ldw), ldw, x.as_ptr().add(x0 * ldx), ldx, out.add(r0), ldo) };
            }
        };
        if let Some(kind) = lanes::kind(self.dtype, m, self.vnni).filter(|_| order == Rows::Fastest) {
            return lanes::product(&kind, w, x, m, kb, n, dst);
        }
        if m == 1 {
            dst.par_chunks_mut(TASK_ROWS).enumerate().for_each(|(t, o)| rows(t * TASK_ROWS, o.len(), 0, 1, o.as_mut_ptr(), 1));
            return;
        }
        by_tasks(m, n, dst, |start, out| {
            for x0 in (0..m).step_by(self.rx) {
                let rx = self.rx.min(m - x0);
                let (at, ldo) = out.tile_out(x0, rx, 0, out.len);
                rows(start, out.len, x0, rx, at, ldo);
            }
        });
    }
}

/// The activations `x` (`m` rows of `k`) as a product with `weights` blocks multiplies them: quantized
/// to that type's 8-bit blocks by ggml's x86 rule, read back through candle's dequantizer (for checks).
pub fn activations_as_multiplied(x: &[f32], m: usize, k: usize, weights: GgmlDType) -> Result<Vec<f32>> {
    fn back<V: GgmlType + Send>(x: &[f32], m: usize, k: usize) -> Result<Vec<f32>> {
        let blocks = quantize_rows::<V>(x, m, k)?;
        let mut out = vec![0f32; x.len()];
        V::to_float(&blocks, &mut out);
        Ok(out)
    }
    match weights {
        GgmlDType::Q4_1 | GgmlDType::Q5_1 => back::<BlockQ8_1>(x, m, k),
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => back::<BlockQ8K>(x, m, k),
        _ => back::<BlockQ8_0>(x, m, k),
    }
}

/// `m` rows of `k` activations as 8-bit blocks of type `V` (q8_0, q8_1 or q8_K) by ggml's x86 rule.
fn quantize_rows<V: GgmlType + Send>(lhs: &[f32], m: usize, k: usize) -> Result<Vec<V>> {
    if lhs.len() != m * k || !k.is_multiple_of(V::BLCK_SIZE) {
        return Err(Error::Internal(format!("{} activations as [{m}, {k}] in {}-value blocks", lhs.len(), V::BLCK_SIZE)));
    }
    let kb = k / V::BLCK_SIZE;
    let mut out: Vec<V> = (0..m * kb).map(|_| V::zeros()).collect();
    if !matches!(V::DTYPE, GgmlDType::Q8_0 | GgmlDType::Q8_1 | GgmlDType::Q8K) {
        return Err(Error::Internal(format!("no activation quantizer for {:?}", V::DTYPE)));
    }
    let row = |(blocks, x): (&mut [V], &[f32])| {
        // SAFETY: `blocks` are whole blocks of type V, one per V::BLCK_SIZE values of `x`; the
        // AVX2 twin runs only where the tier says the CPU has AVX2.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::cpu::tier::active().avx2() {
                return write_row_avx2(V::DTYPE, x, blocks.as_mut_ptr().cast::<u8>(), std::mem::size_of::<V>());
            }
            write_row(V::DTYPE, x, blocks.as_mut_ptr().cast::<u8>(), std::mem::size_of::<V>())
        }
    };
    if m == 1 {
        row((&mut out, lhs));
    } else {
        out.par_chunks_mut(kb.max(1)).zip(lhs.par_chunks(k.max(1))).for_each(row);
    }
    Ok(out)
}

/// One row of activations `x` as blocks of `kind` (q8_0, q8_1 or q8_K), `size` bytes each, at `out`.
/// # Safety
/// `out` must hold `x.len() / values per block` writable blocks of `kind`.
#[inline(always)]
unsafe fn write_row(kind: GgmlDType, x: &[f32], out: *mut u8, size: usize) {
    // Direct calls in plain loops, one per kind: each inlines into the AVX2 twin (a function pointer
    // or a closure would be a function of its own, compiled without AVX2).
    let values = if kind == GgmlDType::Q8K { 256 } else { 32 };
    for (i, xs) in x.chunks_exact(values).enumerate() {
        // SAFETY: block i of the row, within what the caller vouched for.
        unsafe {
            match kind {
                GgmlDType::Q8_0 => write_q8_0(xs, out.add(i * size)),
                GgmlDType::Q8_1 => write_q8_1(xs, out.add(i * size)),
                _ => write_q8_k(xs, out.add(i * size)),
            }
        }
    }
}

/// `write_row` compiled with AVX2 (SSE4.1's `roundss` included): the baseline build rounds each
/// value to even through a libm call, 5 % of a Q4_K prompt (measured).
/// # Safety
/// As `write_row`, and the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn write_row_avx2(kind: GgmlDType, x: &[f32], out: *mut u8, size: usize) {
    // SAFETY: as the caller's.
    unsafe { write_row(kind, x, out, size) }
}

/// ggml's x86 q8_0 and q8_1 rule for one block: (d, quants) with d = amax/127 and each value times
/// 127/amax rounded to even.
#[inline(always)]
fn q8_block<const N: usize>(xs: &[f32]) -> (f32, [i8; N]) {
    let amax = xs.iter().fold(0f32, |m, &v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut q = [0i8; N];
    for (q, &x) in q.iter_mut().zip(xs) {
        // `as` saturates, as ggml's packs do.
        *q = (x * id).round_ties_even() as i8;
    }
    (d, q)
}

/// One `BlockQ8_0` (`#[repr(C)] { d: f16, qs: [i8; 32] }`) at `out`.
/// # Safety
/// `out` must point at a whole, writable `BlockQ8_0`.
#[inline(always)]
unsafe fn write_q8_0(xs: &[f32], out: *mut u8) {
    let (d, q) = q8_block::<32>(xs);
    // SAFETY: `out` points at a whole BlockQ8_0 (layout asserted at the top of this file).
    unsafe {
        out.cast::<f16>().write_unaligned(f16::from_f32(d));
        out.add(2).cast::<[i8; 32]>().write_unaligned(q);
    }
}

/// One `BlockQ8_1` (`#[repr(C)] { d: f16, s: f16, qs: [i8; 32] }`): s = d · Σq, rounded once to f16.
/// # Safety
/// `out` must point at a whole, writable `BlockQ8_1`.
#[inline(always)]
unsafe fn write_q8_1(xs: &[f32], out: *mut u8) {
    let (d, q) = q8_block::<32>(xs);
    let sum: i32 = q.iter().map(|&v| v as i32).sum();
    // SAFETY: `out` points at a whole BlockQ8_1 (layout asserted at the top of this file).
    unsafe {
        out.cast::<f16>().write_unaligned(f16::from_f32(d));
        out.add(2).cast::<f16>().write_unaligned(f16::from_f32(d * sum as f32));
        out.add(4).cast::<[i8; 32]>().write_unaligned(q);
    }
}

/// One `BlockQ8K` (`#[repr(C)] { d: f32, qs: [i8; 256], bsums: [i16; 16] }`) by
/// `quantize_row_q8_K_ref`: scale −127/max (max the value of largest magnitude), rounded to even
/// (`nearest_int`), at most 127; d = 1/scale.
/// # Safety
/// `out` must point at a whole, writable `BlockQ8K`.
#[inline(always)]
unsafe fn write_q8_k(xs: &[f32], out: *mut u8) {
    let (mut max, mut amax) = (0f32, 0f32);
    for &x in xs {
        if amax < x.abs() {
            amax = x.abs();
            max = x;
        }
    }
    let mut q = [0i8; 256];
    let mut bsums = [0i16; 16];
    let mut d = 0f32;
    if amax != 0.0 {
        let iscale = -127.0 / max;
        for (q, &x) in q.iter_mut().zip(xs) {
            *q = (iscale * x).round_ties_even().min(127.0) as i8;
        }
        for (s, chunk) in bsums.iter_mut().zip(q.chunks(16)) {
            *s = chunk.iter().map(|&v| v as i16).sum();
        }
        d = 1.0 / iscale;
    }
    // SAFETY: `out` points at a whole BlockQ8K (layout asserted at the top of this file).
    unsafe {
        out.cast::<f32>().write_unaligned(d);
        out.add(4).cast::<[i8; 256]>().write_unaligned(q);
        out.add(260).cast::<[i16; 16]>().write_unaligned(bsums);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QStorage;
    use rand::Rng;

    /// The activation blocks as candle reads them back (its own dequantizer): d · q for every value, d
    /// and the quants by ggml's x86 rule. Ties round to even (2.5 → 2, where candle's own rounds to 3).
    #[test]
    fn activation_blocks_are_ggml_x86s_and_read_back_through_candle() {
        let mut rng = crate::kernels::tests::rng("activation_blocks");
        let mut xs: Vec<f32> = (0..512).map(|_| rng.random_range(-6.0..6.0)).collect();
        // A block whose largest value is 127 (scale exactly 1) holding ties: 2.5 and -3.5.
        xs[..32].iter_mut().enumerate().for_each(|(i, x)| *x = [127.0, 2.5, -3.5, 0.5][i % 4]);
        for (dtype, want_q) in [(GgmlDType::Q8_0, vec![127i32, 2, -4, 0]), (GgmlDType::Q8_1, vec![127, 2, -4, 0])] {
            let back = match dtype {
                GgmlDType::Q8_0 => dequantized::<BlockQ8_0>(&xs),
                _ => dequantized::<BlockQ8_1>(&xs),
            };
            for (block, (x, y)) in xs.chunks(32).zip(back.chunks(32)).enumerate() {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = f16::from_f32(amax / 127.0).to_f32();
                for (&xv, &yv) in x.iter().zip(y) {
                    let q = (xv * (127.0 / amax)).round_ties_even();
                    assert_eq!(yv, d * q, "{dtype:?} block {block}: {xv}");
                }
                if block == 0 {
                    let got: Vec<i32> = y[..4].iter().map(|v| (v / d) as i32).collect();
                    assert_eq!(got, want_q, "{dtype:?}: ties to even");
                }
            }
        }
        let back = dequantized::<BlockQ8K>(&xs);
        for (x, y) in xs.chunks(256).zip(back.chunks(256)) {
            let (mut max, mut amax) = (0f32, 0f32);
            x.iter().for_each(|&v| {
                if amax < v.abs() {
                    (amax, max) = (v.abs(), v)
                }
            });
            let iscale = -127.0 / max;
            for (&xv, &yv) in x.iter().zip(y) {
                assert_eq!(yv, (1.0 / iscale) * (iscale * xv).round_ties_even().min(127.0), "q8_K: {xv}");
            }
        }
    }

    /// The blocks' bytes as a GGUF or ggml stores them.
    fn block_bytes<V>(blocks: &[V]) -> &[u8] {
        // SAFETY: the block types are `#[repr(C)]` plain data without padding (sizes asserted above).
        unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks)) }
    }

    /// ggml's own bytes (its CPU backend's `from_float`, run by `tests/fixtures/make_llama_cpp_refs.sh`
    /// through `ggml_quantize.c` on random rows at five scales and two rows of exact ties): ours are
    /// the same, byte for byte, for q8_0, q8_1 and q8_K — and candle's own rounding gives other bytes
    /// somewhere in each, so the fixture tells the two rules apart.
    #[test]
    fn activation_blocks_are_ggmls_own_bytes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ggml-activations");
        let input: Vec<f32> = std::fs::read(dir.join("input.f32")).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        fn check<V: GgmlType + Send>(input: &[f32], want: &[u8], name: &str) {
            let ours = quantize_rows::<V>(input, 1, input.len()).unwrap();
            assert_eq!(block_bytes(&ours), want, "{name}: ggml's bytes");
            let mut candles: Vec<V> = (0..ours.len()).map(|_| V::zeros()).collect();
            V::from_float(input, &mut candles);
            assert_ne!(block_bytes(&candles), want, "{name}: candle's rule gives ggml's bytes too; the fixture does not tell them apart");
        }
        assert_eq!(input.len(), 8192);
        check::<BlockQ8_0>(&input, &std::fs::read(dir.join("ggml.q8_0")).unwrap(), "q8_0");
        check::<BlockQ8_1>(&input, &std::fs::read(dir.join("ggml.q8_1")).unwrap(), "q8_1");
        check::<BlockQ8K>(&input, &std::fs::read(dir.join("ggml.q8_K")).unwrap(), "q8_K");
    }

    fn dequantized<V: GgmlType + Send>(xs: &[f32]) -> Vec<f32> {
        let weights = match V::DTYPE {
            GgmlDType::Q8_1 => GgmlDType::Q4_1,
            GgmlDType::Q8K => GgmlDType::Q4K,
            _ => GgmlDType::Q8_0,
        };
        activations_as_multiplied(xs, 1, xs.len(), weights).unwrap()
    }

    /// Our tiles against candle's dots (ports of ggml's, summed another way) for every type they
    /// cover, on every x86 tier this CPU runs, with fresh random weights and activations: every tile
    /// shape and its edges (rows not a multiple of the tile's, m = 1 decodes), an odd number of
    /// blocks (the 512-bit Q8_0 tile's one-block tail), a single block, and prompts long enough for
    /// the Q8_0 lane product (groups of 16 weight rows, whole and padded; 64-row tasks). Both sum exact integer
    /// dots; only the f32 order differs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tiles_are_candles_dots_on_every_tier() {
        use crate::kernels::cpu::tier::{Cores, Tier};
        fn check<T: GgmlType + Sync>(ty: crate::quant::QuantType, rng: &mut impl Rng) -> usize {
            let mut checked = 0;
            for (tier, cores) in Tier::available().into_iter().flat_map(|t| [(t, Cores::Amd), (t, Cores::Other)]) {
                let Some(kernel) = Tiled::for_type(T::DTYPE, tier, cores) else { continue };
                // m ≥ 16: the Q8_0 lane product (whole and partial groups of 16 rows, RX and single rows).
                for (kb, m, n) in [(1, 1, 5), (3, 7, 9), (5, 1, 70), (16, 5, 133), (2, 9, 3), (3, 17, 37), (2, 24, 16), (1, 16, 5), (4, 19, 70)] {
                    let k = kb * T::BLCK_SIZE;
                    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0)).collect();
                    let wt = candle_core::Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu).unwrap();
                    let bytes = crate::quant::quantize_to_bytes("w", &wt, ty).unwrap();
                    let wb: Vec<T> = (0..n * kb).map(|i| unsafe { bytes.as_ptr().add(i * std::mem::size_of::<T>()).cast::<T>().read_unaligned() }).collect();
                    let xb = quantize_rows::<T::VecDotType>(&x, m, k).unwrap();
                    let mut dst = vec![f32::NAN; m * n];
                    kernel.product(as_bytes(&wb), as_bytes(&xb), (m, kb, n), &mut dst, Rows::Fastest);
                    // Rows::Invariant: each row the bits of its product alone (decode rows of a batch).
                    let mut batch = vec![f32::NAN; m * n];
                    kernel.product(as_bytes(&wb), as_bytes(&xb), (m, kb, n), &mut batch, Rows::Invariant);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    // Outputs start as NaN: a row no tile wrote must not pass the bit comparisons below.
                    assert!(batch.iter().all(|v| v.is_finite()), "{ty:?} on {} kb {kb} m {m} n {n}: an output left unwritten", tier.name());
                    for i in 0..m {
                        let mut alone = vec![f32::NAN; n];
                        kernel.product(as_bytes(&wb), as_bytes(&xb[i * kb..(i + 1) * kb]), (1, kb, n), &mut alone, Rows::Invariant);
                        assert!(bits(&batch[i * n..(i + 1) * n]) == bits(&alone), "{ty:?} on {} kb {kb} m {m} n {n}: row {i} in a batch", tier.name());
                    }
                    // Decode's tile shape follows the vendor; the bits must not (AMD's shape
                    // against the other's; the other's pass checks against candle only).
                    if cores == Cores::Amd {
                        let twin = Tiled::for_type(T::DTYPE, tier, Cores::Other).expect("the same tier has tiles for either vendor");
                        let mut other = vec![f32::NAN; m * n];
                        twin.product(as_bytes(&wb), as_bytes(&xb), (m, kb, n), &mut other, Rows::Invariant);
                        assert!(bits(&batch) == bits(&other), "{ty:?} on {} kb {kb} m {m} n {n}: AMD's tiles against the other's", tier.name());
                    }
                    // The tolerance scales with Σ|w·x| (the sums cancel): f32 rounding in both orders.
                    let (mut wd, mut xd) = (vec![0f32; n * k], vec![0f32; m * k]);
                    T::to_float(&wb, &mut wd);
                    <T::VecDotType as GgmlType>::to_float(&xb, &mut xd);
                    for i in 0..m {
                        for j in 0..n {
                            let want = T::vec_dot(k, &wb[j * kb..(j + 1) * kb], &xb[i * kb..(i + 1) * kb]);
                            let got = dst[i * n + j];
                            let scale: f32 = (0..k).map(|c| (wd[j * k + c] * xd[i * k + c]).abs()).sum();
                            assert!(
                                (got - want).abs() <= 1e-6 * scale.max(1.0),
                                "{ty:?} on {} (vnni {}) kb {kb} m {m} n {n} [{i}, {j}]: {got} vs {want}",
                                tier.name(),
                                kernel.vnni
                            );
                        }
                    }
                    checked += 1;
                }
            }
            checked
        }
        let mut rng = crate::kernels::tests::rng("tiles_are_candles_dots");
        let checked = check::<BlockQ8_0>(crate::quant::QuantType::Q8_0, &mut rng)
            + check::<BlockQ4K>(crate::quant::QuantType::Q4K, &mut rng)
            + check::<BlockQ6K>(crate::quant::QuantType::Q6K, &mut rng)
            + check::<BlockQ5K>(crate::quant::QuantType::Q5K, &mut rng)
            + check::<BlockQ4_0>(crate::quant::QuantType::Q4_0, &mut rng)
            + check::<BlockQ4_1>(crate::quant::QuantType::Q4_1, &mut rng)
            + check::<BlockQ5_0>(crate::quant::QuantType::Q5_0, &mut rng)
            + check::<BlockQ5_1>(crate::quant::QuantType::Q5_1, &mut rng);
        // An AVX2 machine checks its tier's tiles; none at all would mean this test checked nothing.
        assert!(checked > 0 || !Tier::Avx2.supported(), "no tiled kernel ran on this CPU");
    }

    /// The product against f64 on the dequantized weights and activations, for every weight type, with
    /// fresh random inputs, row counts that leave every kind of tail (m = 1 decodes, n not a multiple of 4
    /// or of the task size): the dots sum exact integers, so the f32 result is within a few ulps of the
    /// sum of the dequantized products (q4_1 and q5_1 less closely: their activation blocks carry d · Σq
    /// rounded to f16, as ggml's do, and the dot uses it for the weights' offsets).
    #[test]
    fn the_product_is_the_dequantized_product_for_every_type() {
        let mut rng = crate::kernels::tests::rng("the_product_is_the_dequantized_product");
        for ty in crate::quant::QuantType::ALL {
            let k = 512;
            for (m, n) in [(1, 70), (3, 133), (5, 4)] {
                let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let wt = candle_core::Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu).unwrap();
                let bytes = crate::quant::quantize_to_bytes("w", &wt, ty).unwrap();
                let QStorage::Cpu(blocks) = QStorage::from_data(std::borrow::Cow::Borrowed(&bytes), &candle_core::Device::Cpu, ty.ggml()).unwrap() else {
                    unreachable!()
                };
                let mut dst = vec![0f32; m * n];
                matmul_t(blocks.as_ref(), (m, k, n), &x, &mut dst, Rows::Fastest).unwrap();
                let candle_core::CpuStorage::F32(wd) = blocks.dequantize(n * k).unwrap() else { unreachable!() };
                let tol = if matches!(ty.ggml(), GgmlDType::Q4_1 | GgmlDType::Q5_1) { 2e-3 } else { 1e-5 };
                let vd = match ty.ggml() {
                    GgmlDType::Q4_1 | GgmlDType::Q5_1 => dequantized::<BlockQ8_1>(&x),
                    GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => dequantized::<BlockQ8K>(&x),
                    _ => dequantized::<BlockQ8_0>(&x),
                };
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|c| wd[j * k + c] as f64 * vd[i * k + c] as f64).sum();
                        let got = dst[i * n + j] as f64;
                        let scale: f64 = (0..k).map(|c| (wd[j * k + c] as f64 * vd[i * k + c] as f64).abs()).sum();
                        assert!((got - want).abs() <= tol * scale, "{ty:?} m {m} n {n} [{i}, {j}]: {got} vs {want}");
                    }
                }
            }
        }
    }
}
