//! The CUDA kernels (`kernels/cuda/*.cu`) against their CPU implementations, written once over a
//! [`Target`]: a CUDA device (`gpu`, run by scripts/gpu-check.sh on a GPU) or the CPU emulator of
//! the same sources (`emulated`, every test run). Each case builds its launches with
//! `kernels::launch`, the code the decode step launches with, on fresh random inputs.

use super::*;
use crate::kernels::launch::{self, AttnLaunch, DevPtr, Launcher};
use crate::kernels::AttnDims;
use crate::quant::{QMatrix, QuantType};

/// Where the kernels run: buffers live on `device`, launches go to `kernels`.
pub(super) trait Target {
    type K: Launcher;
    fn device(&self) -> Device;
    fn kernels(&self, dtype: DType, head_dim: usize) -> Self::K;
    /// The device address of a contiguous tensor made by `upload` or on `device`.
    fn ptr(&self, t: &Tensor) -> DevPtr;
    /// A copy of a CPU tensor on `device` that kernels may write (never shared with `t`).
    fn upload(&self, t: &Tensor) -> Tensor;
    /// Whether full-size shapes (a 7B model's projections, 4k-token caches) are affordable.
    fn full_size(&self) -> bool;
}

fn host(t: &Tensor) -> Vec<f32> {
    to_vec_f32(&t.to_device(&Device::Cpu).unwrap())
}

fn on_cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap()
}

/// Device vs CPU where only the order of f32 sums differs: f32 noise, or one ulp of a half dtype.
pub(super) fn device_tol(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (1e-5, 2e-5),
        DType::BF16 => (1e-2, BF16_RTOL),
        _ => (1e-3, F16_RTOL),
    }
}

/// The emulator's budget: shapes up to this many weight elements (a GPU takes all).
const EMULATED_ELEMENTS: usize = 1 << 21;

/// Relative error of an f32 sum in any order, per unit of Σ|terms| (the bound the GEMM tests use).
const SUM_ERR: f32 = 1e-6;

/// Σ_j |w_ij · x_j| per row: the scale of the error a dot product's summation order makes (rows
/// whose sum cancels to near zero carry an error far above their value times any rtol).
fn magnitudes(w: &Tensor, x: &Tensor) -> Vec<f32> {
    let (w, x) = (to_vec_f32(w), to_vec_f32(x));
    w.chunks(x.len()).map(|r| r.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum()).collect()
}

/// Asserts |got - want| <= tol elementwise.
#[track_caller]
fn assert_within(what: &str, got: &[f32], want: &[f32], tol: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, ((&g, &w), &t)) in got.iter().zip(want).zip(tol).enumerate() {
        assert!(g.is_finite() && (g - w).abs() <= t, "{what}: mismatch at {i}: got {g} expected {w} (tolerance {t})");
    }
}

/// `w · x` in f32 on the CPU, not rounded (the reference for both GEMV kernels).
fn cpu_gemv(w: &Tensor, x: &Tensor) -> Vec<f32> {
    let (rows, _) = w.dims2().unwrap();
    let mut acc = vec![0f32; rows];
    cpu::gemv_rows(&to_vec_f32(x), &to_vec_f32(w), &mut acc);
    acc
}

/// Rows of x in the batched GEMV cases: a whole tile of the kernels' batch (4 rows in `gemv`, 2 in
/// `gemv_silu_mul`) and a remainder row.
const BATCH: usize = 5;

/// Rows of x a GEMV case with a weight of `elements` runs (the emulator's budget allowing).
fn batch_for(t: &impl Target, elements: usize) -> usize {
    if t.full_size() || BATCH * elements <= 2 * EMULATED_ELEMENTS {
        BATCH
    } else {
        1
    }
}

/// Batch invariance of a batched launch's output `got` (`[batch, width]`): rows 0 and batch - 1, each
/// launched alone by `alone(row)`, give the same bits.
#[track_caller]
fn assert_rows_alone(what: &str, got: &[f32], width: usize, batch: usize, alone: impl Fn(usize) -> Vec<f32>) {
    for j in [0, batch - 1] {
        let one = alone(j);
        let row = &got[j * width..(j + 1) * width];
        assert!(one.iter().zip(row).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: row {j} of {batch} differs from the row alone");
    }
}

/// The launch `make(x, y, batch)` builds on `x` `[batch, cols]` (uploaded) into a fresh `y`
/// `[batch, width]`, run by `k`: y on the host.
fn launch_rows<T: Target>(t: &T, k: &T::K, x: &Tensor, width: usize, make: impl Fn(DevPtr, DevPtr, usize) -> candle_core::Result<launch::Launch>) -> Vec<f32> {
    let batch = x.dim(0).unwrap();
    let gx = t.upload(x);
    let gy = Tensor::zeros(batch * width, x.dtype(), &t.device()).unwrap();
    k.launch(&make(t.ptr(&gx), t.ptr(&gy), batch).unwrap()).unwrap();
    host(&gy)
}

pub(super) fn gemv(t: &impl Target) {
    let mut rng = rng("gemv");
    // Shapes of OpenChat's projections and lm_head, a tied SmolLM head, SmolLM's MLP, and rows whose
    // length rules out 16-byte loads (4100 bf16, 13 anything).
    let shapes = [(6144usize, 4096usize), (4096, 14336), (32002, 4096), (49152, 576), (1536, 576), (37, 13), (1, 8), (3, 4100)];
    for dtype in DTYPES {
        let k = t.kernels(dtype, 128);
        for (rows, cols) in shapes.into_iter().filter(|&(r, c)| t.full_size() || r * c <= EMULATED_ELEMENTS) {
            let batch = batch_for(t, rows * cols);
            let w = rand_tensor(&mut rng, &[rows, cols], 1.0, dtype, &Device::Cpu);
            let x = rand_tensor(&mut rng, &[batch, cols], 1.0, dtype, &Device::Cpu);
            let gw = t.upload(&w);
            let run = |x: &Tensor| launch_rows(t, &k, x, rows, |gx, gy, b| launch::gemv(t.ptr(&gw), gx, gy, rows, cols, b));
            let got = run(&x);
            let what = format!("gemv {dtype:?} {rows}x{cols} batch {batch}");
            for j in 0..batch {
                let xj = x.get(j).unwrap();
                let want = Tensor::from_vec(cpu_gemv(&w, &xj), rows, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let rtol = device_tol(dtype).1;
                let tol: Vec<f32> = to_vec_f32(&want).iter().zip(magnitudes(&w, &xj)).map(|(y, m)| SUM_ERR * m + rtol * y.abs()).collect();
                assert_within(&format!("{what} row {j}"), &got[j * rows..(j + 1) * rows], &to_vec_f32(&want), &tol);
            }
            assert_rows_alone(&what, &got, rows, batch, |j| run(&x.narrow(0, j, 1).unwrap()));
        }
    }
}

pub(super) fn gemv_silu_mul(t: &impl Target) {
    let mut rng = rng("gemv_silu_mul");
    let shapes = [(14336usize, 4096usize), (1536, 576), (64, 32), (5, 12)];
    for dtype in DTYPES {
        let k = t.kernels(dtype, 128);
        for (n, cols) in shapes.into_iter().filter(|&(n, c)| t.full_size() || 2 * n * c <= EMULATED_ELEMENTS) {
            let batch = batch_for(t, 2 * n * cols);
            let w = rand_tensor(&mut rng, &[2 * n, cols], 1.0, dtype, &Device::Cpu);
            let x = rand_tensor(&mut rng, &[batch, cols], 1.0, dtype, &Device::Cpu);
            let gw = t.upload(&w);
            let run = |x: &Tensor| launch_rows(t, &k, x, n, |gx, gy, b| launch::gemv_silu_mul(t.ptr(&gw), gx, gy, n, cols, b));
            let got = run(&x);
            let what = format!("gemv_silu_mul {dtype:?} {n}x{cols} batch {batch}");
            for j in 0..batch {
                let xj = x.get(j).unwrap();
                let products = cpu_gemv(&w, &xj);
                let tol = silu_mul_tol(&products, &magnitudes(&w, &xj), n, dtype);
                assert_within(&format!("{what} row {j}"), &got[j * n..(j + 1) * n], &silu_mul_in(dtype, &products, n), &tol);
            }
            assert_rows_alone(&what, &got, n, batch, |j| run(&x.narrow(0, j, 1).unwrap()));
        }
    }
}

/// The blocks of `w` (f32 `[rows, cols]`) quantized to `q` as a byte tensor on the target, starting
/// `skew` bytes in (0: 16-byte aligned; 2: the blocks at an address only 2-aligned, as a GGUF
/// tensor may lie), and the weights they hold (f32, dequantized on the CPU by candle, ggml's
/// dequantizers ported).
fn quantized_on(t: &impl Target, w: &Tensor, q: QuantType, skew: usize) -> (Tensor, Tensor) {
    let m = QMatrix::quantize("w", w, q, &Device::Cpu).unwrap();
    let bytes = [vec![0u8; skew], m.row_bytes().unwrap()].concat();
    let n = bytes.len();
    (t.upload(&Tensor::from_vec(bytes, n, &Device::Cpu).unwrap()), m.dequantize().unwrap())
}

/// Shapes of the quantized cases: two super-blocks of 256 values (a K-quant row is whole ones); for
/// the 32-value types a row of nine blocks (its second super-block one block long); 20 super-blocks
/// (the 16-byte-load loop of Q4_K/Q5_K, 8 blocks an iteration: two whole iterations and a short
/// third, as 11008- or 5632-wide rows have). Each with the blocks aligned and 2 bytes off alignment
/// (Q4_K/Q5_K then take the byte loads).
fn quant_shapes(q: QuantType, rows: usize) -> [(usize, usize, usize); 5] {
    let short = if q.block_values() == 256 { 256 } else { 288 };
    [(rows, 512, 0), (rows, 512, 2), (3, short, 0), (5, 5120, 0), (5, 5120, 2)]
}

/// The quantized GEMV (`gemv_quant.cu`) of every block type against the f32 product of the weights
/// candle dequantizes from the same blocks: the kernel must read each weight as ggml defines it (a
/// misread nibble, scale or sign is off by far more than the summation order's error).
pub(super) fn gemv_quant(t: &impl Target) {
    let mut rng = rng("gemv_quant");
    for q in QuantType::ALL {
        let kq = q.kernel();
        for dtype in DTYPES {
            let k = t.kernels(dtype, 128);
            for (rows, cols, skew) in quant_shapes(q, 37) {
                let (gw, w) = quantized_on(t, &rand_tensor(&mut rng, &[rows, cols], 1.0, DType::F32, &Device::Cpu), q, skew);
                let x = rand_tensor(&mut rng, &[BATCH, cols], 1.0, dtype, &Device::Cpu);
                // Rows of y two wider than the weight (a run of a mixed stack): those columns stay 0.
                let stride = rows + 2;
                let run =
                    |x: &Tensor| launch_rows(t, &k, x, stride, |gx, gy, b| launch::gemv_quant(kq, t.ptr(&gw) + skew as DevPtr, gx, gy, rows, cols, b, stride));
                let got = run(&x);
                let what = format!("gemv {} {dtype:?} {rows}x{cols} at +{skew}", q.name());
                for j in 0..BATCH {
                    let xj = x.get(j).unwrap();
                    let want = Tensor::from_vec(cpu_gemv(&w, &xj), rows, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                    let rtol = device_tol(dtype).1;
                    let tol: Vec<f32> = to_vec_f32(&want).iter().zip(magnitudes(&w, &xj)).map(|(y, m)| SUM_ERR * m + rtol * y.abs()).collect();
                    let row = &got[j * stride..(j + 1) * stride];
                    assert_within(&format!("{what} row {j}"), &row[..rows], &to_vec_f32(&want), &tol);
                    assert!(row[rows..].iter().all(|&v| v.to_bits() == 0), "{what} row {j}: wrote past its {rows} columns");
                }
                assert_rows_alone(&what, &got, stride, BATCH, |j| run(&x.narrow(0, j, 1).unwrap()));
            }
        }
    }
}

/// The quantized SwiGLU GEMV against the f32 products of the dequantized gate/up stack.
pub(super) fn gemv_silu_mul_quant(t: &impl Target) {
    let mut rng = rng("gemv_silu_mul_quant");
    for q in QuantType::ALL {
        let kq = q.kernel();
        for dtype in DTYPES {
            let k = t.kernels(dtype, 128);
            for (n, cols, skew) in quant_shapes(q, 13) {
                let (gw, w) = quantized_on(t, &rand_tensor(&mut rng, &[2 * n, cols], 1.0, DType::F32, &Device::Cpu), q, skew);
                let x = rand_tensor(&mut rng, &[BATCH, cols], 1.0, dtype, &Device::Cpu);
                let run = |x: &Tensor| launch_rows(t, &k, x, n, |gx, gy, b| launch::gemv_silu_mul_quant(kq, t.ptr(&gw) + skew as DevPtr, gx, gy, n, cols, b));
                let got = run(&x);
                let what = format!("gemv_silu_mul {} {dtype:?} {n}x{cols} at +{skew}", q.name());
                for j in 0..BATCH {
                    let xj = x.get(j).unwrap();
                    let products = cpu_gemv(&w, &xj);
                    let tol = silu_mul_tol(&products, &magnitudes(&w, &xj), n, dtype);
                    assert_within(&format!("{what} row {j}"), &got[j * n..(j + 1) * n], &silu_mul_in(dtype, &products, n), &tol);
                }
                assert_rows_alone(&what, &got, n, BATCH, |j| run(&x.narrow(0, j, 1).unwrap()));
            }
        }
    }
}

/// silu(gate)·up of f32 `products` (`[gate; up]`, n each) with the kernels' roundings in `dtype`.
fn silu_mul_in(dtype: DType, products: &[f32], n: usize) -> Vec<f32> {
    match dtype {
        DType::F32 => silu_mul_of::<f32>(products, n),
        DType::BF16 => silu_mul_of::<half::bf16>(products, n),
        _ => silu_mul_of::<half::f16>(products, n),
    }
}

/// The SwiGLU GEMV's tolerance: the sums' f32 error (`mag`, Σ|terms| of each product) carried
/// through silu(g)·u, plus a rounding of each rounded value.
fn silu_mul_tol(products: &[f32], mag: &[f32], n: usize, dtype: DType) -> Vec<f32> {
    let rtol = device_tol(dtype).1;
    (0..n)
        .map(|i| {
            let (g, u) = (products[i], products[n + i]);
            let sig = 1.0 / (1.0 + (-g).exp());
            let (silu, dsilu) = (g * sig, sig * (1.0 + g * (1.0 - sig)));
            SUM_ERR * (dsilu.abs() * u.abs() * mag[i] + silu.abs() * mag[n + i]) + 2.0 * rtol * (silu * u).abs() + 3.0 * rtol * (dsilu * g * u).abs()
        })
        .collect()
}

fn silu_mul_of<T: cpu::Elem>(products: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![T::from_f32(0.0); n];
    cpu::silu_mul(products, &mut out);
    out.iter().map(|v| v.to_f32()).collect()
}

pub(super) fn residual_norm(t: &impl Target) {
    let mut rng = rng("residual_norm");
    // Three rows, each taking its own token's embedding row from its state.
    let (batch, tokens) = (3usize, [3u32, 0, 4]);
    for dtype in DTYPES {
        let k = t.kernels(dtype, 128);
        for n in [4096usize, 576, 33, 1] {
            let (x, d, w) = (
                rand_tensor(&mut rng, &[batch, n], 3.0, dtype, &Device::Cpu),
                rand_tensor(&mut rng, &[batch, n], 3.0, dtype, &Device::Cpu),
                rand_tensor(&mut rng, &[n], 2.0, dtype, &Device::Cpu),
            );
            let table = rand_tensor(&mut rng, &[5, n], 3.0, dtype, &Device::Cpu);
            let sum = (&x + &d).unwrap();
            let (gx, gd, gw, gt) = (t.upload(&x), t.upload(&d), t.upload(&w), t.upload(&table));
            let gh = Tensor::zeros(batch * n, dtype, &t.device()).unwrap();
            let words: Vec<u32> = tokens.iter().flat_map(|&tok| [tok, 0, 0, 0]).collect();
            let state = t.upload(&Tensor::new(words.as_slice(), &Device::Cpu).unwrap());
            let norm =
                |add: DevPtr, table: DevPtr| launch::residual_norm(t.ptr(&gx), add, table, t.ptr(&state), t.ptr(&gw), t.ptr(&gh), n, 1e-5, batch).unwrap();
            k.launch(&norm(t.ptr(&gd), 0)).unwrap();
            assert_eq!(host(&gx), to_vec_f32(&sum), "{dtype:?} n{n}: the residual add is one rounding, as on the CPU");
            // h = round(round(x·r)·w) with r from a sum in another order: the inner rounding may flip
            // one ulp of x·r, which ·w carries to up to |w|/|h| ≈ 1 ulp of h, and then h rounds: two
            // ulps of h in a half dtype (seen: bf16 −2.40625 against −2.4375).
            let (atol, rtol) = device_tol(dtype);
            let rtol = if dtype == DType::F32 { rtol } else { 2.0 * rtol };
            let want = reference_rms_norm(&sum, &w, 1e-5);
            assert_close(&format!("residual_norm {dtype:?} n{n}"), &on_cpu(&gh).reshape((batch, n)).unwrap(), &want, atol, rtol);
            // Embedding mode: x = table[state.token], each row its own.
            k.launch(&norm(0, t.ptr(&gt))).unwrap();
            let rows = Tensor::cat(&tokens.iter().map(|&tok| table.narrow(0, tok as usize, 1).unwrap()).collect::<Vec<_>>(), 0).unwrap();
            assert_eq!(host(&gx), to_vec_f32(&rows), "{dtype:?} n{n}: embedding rows");
            let want = reference_rms_norm(&rows, &w, 1e-5);
            assert_close(&format!("embed norm {dtype:?} n{n}"), &on_cpu(&gh).reshape((batch, n)).unwrap(), &want, atol, rtol);
        }
    }
}

pub(super) fn rope_kv_bit_for_bit(t: &impl Target) {
    let mut rng = rng("rope_kv_bit_for_bit");
    // Each case: two rows, (position, slot of a pool of 3 caches) each; the rows' slots differ.
    for dtype in DTYPES {
        for (nh, nkv, d, cap, rows) in
            [(32usize, 8usize, 128usize, 64usize, [(37usize, 2usize), (0, 0)]), (4, 2, 8, 16, [(0, 1), (15, 2)]), (9, 3, 64, 8, [(7, 0), (3, 1)])]
        {
            let (slots, batch) = (3usize, rows.len());
            let k = t.kernels(dtype, d);
            let width = (nh + 2 * nkv) * d;
            let qkv = rand_tensor(&mut rng, &[batch, width], 3.0, dtype, &Device::Cpu);
            let (cos, sin) = rotary(cap, d, dtype);
            let pool = rand_tensor(&mut rng, &[slots, nkv, cap, d], 1.0, dtype, &Device::Cpu);
            let dims = cpu::RopeDims { n_heads: nh, n_kv_heads: nkv, head_dim: d, capacity: cap };
            let (mut q_want, mut k_want, mut v_want) = (to_vec_f32(&qkv), to_vec_f32(&pool), to_vec_f32(&pool));
            let slot_len = nkv * cap * d;
            for (j, &(pos, slot)) in rows.iter().enumerate() {
                let cache = to_vec_f32(&pool.get(slot).unwrap());
                let args = (to_vec_f32(&qkv.get(j).unwrap()), &to_vec_f32(&cos)[pos * d / 2..], &to_vec_f32(&sin)[pos * d / 2..], cache, pos, &dims);
                let [q, kc, vc] = match dtype {
                    DType::F32 => cpu_rope_kv::<f32>(args),
                    DType::BF16 => cpu_rope_kv::<half::bf16>(args),
                    _ => cpu_rope_kv::<half::f16>(args),
                };
                q_want[j * width..(j + 1) * width].copy_from_slice(&q);
                k_want[slot * slot_len..(slot + 1) * slot_len].copy_from_slice(&kc);
                v_want[slot * slot_len..(slot + 1) * slot_len].copy_from_slice(&vc);
            }
            let (gq, gcos, gsin, gk, gv) = (t.upload(&qkv), t.upload(&cos), t.upload(&sin), t.upload(&pool), t.upload(&pool));
            let words: Vec<u32> = rows.iter().flat_map(|&(pos, slot)| [0, pos as u32, 0, slot as u32]).collect();
            let state = t.upload(&Tensor::new(words.as_slice(), &Device::Cpu).unwrap());
            let p = |x: &Tensor| t.ptr(x);
            k.launch(&launch::rope_kv(p(&gq), p(&gcos), p(&gsin), p(&gk), p(&gv), p(&state), &dims, batch).unwrap()).unwrap();
            let what = format!("rope_kv {dtype:?} h{nh} kv{nkv} d{d} rows {rows:?}");
            assert_eq!(host(&gq), q_want, "{what}: q and k");
            assert_eq!(host(&gk), k_want, "{what}: k caches (the other slots untouched)");
            assert_eq!(host(&gv), v_want, "{what}: v caches (the other slots untouched)");
        }
    }
}

/// (qkv, cos row, sin row, cache, pos, dims) of a rope_kv case.
type RopeCase<'a> = (Vec<f32>, &'a [f32], &'a [f32], Vec<f32>, usize, &'a cpu::RopeDims);

/// The CPU `rope_kv` in `T`; returns q/k/v, k cache and v cache as f32.
fn cpu_rope_kv<T: cpu::Elem>((qkv, cos, sin, cache, pos, dims): RopeCase) -> [Vec<f32>; 3] {
    let c = |v: &[f32]| v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>();
    let (mut q, mut k, mut v) = (c(&qkv), c(&cache), c(&cache));
    cpu::rope_kv(&mut q, &c(cos), &c(sin), &mut k, &mut v, pos, dims);
    [q, k, v].map(|x| x.iter().map(|y| y.to_f32()).collect())
}

pub(super) fn argmax_ties_included(t: &impl Target) {
    let mut rng = rng("argmax_ties_included");
    for dtype in DTYPES {
        let k = t.kernels(dtype, 128);
        for n in [1usize, 31, 1000, 32002, 49152] {
            // Values on a half-step grid: many ties, which the first index must win; three rows, each
            // with its own answer in its own state.
            let batch = 3;
            let v: Vec<f32> = (0..batch * n).map(|_| (rng.random_range(-8.0f32..8.0) * 2.0).round() / 2.0).collect();
            let x = Tensor::from_vec(v, batch * n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let xs = to_vec_f32(&x);
            let want: Vec<u32> = xs.chunks(n).map(cpu::argmax).collect();
            let (gx, state) = (t.upload(&x), Tensor::zeros(4 * batch, DType::U32, &t.device()).unwrap());
            k.launch(&launch::argmax(t.ptr(&gx), n, t.ptr(&state), batch).unwrap()).unwrap();
            let got: Vec<u32> = on_cpu(&state).to_vec1::<u32>().unwrap().chunks(4).map(|r| r[2]).collect();
            assert_eq!(got, want, "argmax {dtype:?} n{n}");
        }
    }
}

/// Decode attention as `kernels::decode_attention` launches it on a device (host kv_len, the split
/// count for the length), against the CPU implementation.
pub(super) fn decode_attention_launches(t: &impl Target) {
    let mut rng = rng("decode_attention_launches");
    for dtype in DTYPES {
        for c in ATTN_CASES.iter().filter(|c| t.full_size() || c.h * c.kv_len.min(c.window.unwrap_or(usize::MAX)) <= 25_000) {
            let (q, kc, vc) = attn_inputs(c, &mut rng, dtype, &Device::Cpu);
            let scale = 1.0 / (c.d as f64).sqrt();
            let want = decode_attention(&q, &kc, &vc, c.kv_len, c.window, scale).unwrap();
            let dims = DecodeAttention::new(c.kv_len, c.window, scale).unwrap().dims(q.layout(), kc.layout(), vc.layout()).unwrap();
            let splits = launch::attention_splits(dims.kv_end - dims.kv_start, launch::attention_blocks_per_split(c.b, c.h, c.kvh));
            let (gq, gk, gv) = (t.upload(&q), t.upload(&kc), t.upload(&vc));
            let out = Tensor::zeros((c.b, c.h, 1, c.d), dtype, &t.device()).unwrap();
            let partial = Tensor::zeros(launch::attention_scratch_words(&dims, splits), DType::F32, &t.device()).unwrap();
            let attn = AttnLaunch {
                q: t.ptr(&gq),
                k: t.ptr(&gk),
                v: t.ptr(&gv),
                out: t.ptr(&out),
                partial: t.ptr(&partial),
                state: 0,
                kv_len: c.kv_len,
                window: c.window.unwrap_or(0),
                splits,
                scale: scale as f32,
                dims,
                scratch_batch: dims.b,
            };
            let k = t.kernels(dtype, c.d);
            k.launch(&launch::attention(&attn).unwrap()).unwrap();
            let (atol, rtol) = device_tol(dtype);
            let what = format!("decode_attention {dtype:?} b{} h{} kvh{} d{} kv{} w{:?} splits {splits}", c.b, c.h, c.kvh, c.d, c.kv_len, c.window);
            assert_close(&what, &on_cpu(&out), &want, atol.max(2e-6), rtol);
        }
    }
}

/// The decode step's launch: kv_len from state[pos] + 1 and a split count fixed in advance, so that
/// most splits are empty at short lengths (as in a graph captured for the whole context), every
/// length launched on the same scratch (as a graph replays it: the head groups' counters must be
/// back at zero after each launch, or the next would merge too early).
pub(super) fn step_attention_reads_its_length_from_device_state(t: &impl Target) {
    let mut rng = rng("step_attention_reads_its_length_from_device_state");
    let (c, lens): (AttnCase, &[usize]) = if t.full_size() {
        (AttnCase { b: 1, h: 32, kvh: 8, d: 128, cap: 4096, kv_len: 0, window: Some(1000) }, &[1, 7, 999, 1000, 1001, 4096])
    } else {
        (AttnCase { b: 1, h: 8, kvh: 2, d: 128, cap: 640, kv_len: 0, window: Some(100) }, &[1, 7, 99, 100, 101, 640])
    };
    for dtype in [DType::BF16, DType::F32] {
        let k = t.kernels(dtype, c.d);
        let (q, kc, vc) = attn_inputs(&AttnCase { kv_len: 1, ..c }, &mut rng, dtype, &Device::Cpu);
        let (gq, gk, gv) = (t.upload(&q), t.upload(&kc), t.upload(&vc));
        let splits = launch::attention_splits(c.cap, launch::attention_blocks_per_split(1, c.h, c.kvh));
        assert!(splits > 1, "the case must split");
        let out = Tensor::zeros(c.h * c.d, dtype, &t.device()).unwrap();
        let full = DecodeAttention::new(c.cap, c.window, 1.0).unwrap().dims(q.layout(), kc.layout(), vc.layout()).unwrap();
        let partial = Tensor::zeros(launch::attention_scratch_words(&full, splits), DType::F32, &t.device()).unwrap();
        for &kv_len in lens {
            let state = t.upload(&Tensor::new(&[0u32, kv_len as u32 - 1, 0, 0], &Device::Cpu).unwrap());
            let dims = DecodeAttention::new(kv_len, c.window, 1.0).unwrap().dims(q.layout(), kc.layout(), vc.layout()).unwrap();
            let window = c.window.unwrap_or(0);
            let attn = AttnLaunch {
                q: t.ptr(&gq),
                k: t.ptr(&gk),
                v: t.ptr(&gv),
                out: t.ptr(&out),
                partial: t.ptr(&partial),
                state: t.ptr(&state),
                kv_len: 0,
                window,
                splits,
                scale: 1.0 / (c.d as f32).sqrt(),
                dims,
                scratch_batch: 1,
            };
            k.launch(&launch::attention(&attn).unwrap()).unwrap();
            let want = decode_attention(&q, &kc, &vc, kv_len, c.window, 1.0 / (c.d as f64).sqrt()).unwrap();
            let (atol, rtol) = device_tol(dtype);
            let got = on_cpu(&out).reshape((1, c.h, 1, c.d)).unwrap();
            assert_close(&format!("step attention {dtype:?} kv{kv_len} splits {splits}"), &got, &want, atol.max(2e-6), rtol);
        }
    }
}

/// The batched step's launch: rows whose q sits in a row of the qkv buffer, each attending the slot
/// of a cache pool its state names over its own length (one short, one past the window, so most of
/// one row's splits are empty while the other's are full), the scratch sized for the batch; each
/// row's output is the CPU's, and the same bits as the row launched alone on the same scratch.
pub(super) fn step_attention_batches_rows_over_their_slots(t: &impl Target) {
    let mut rng = rng("step_attention_batches_rows_over_their_slots");
    let c = AttnCase { b: 3, h: 8, kvh: 2, d: 64, cap: 320, kv_len: 0, window: Some(100) };
    let rows = [(2usize, 7usize), (0, 320)]; // (slot, kv_len)
    let width = (c.h + 2 * c.kvh) * c.d;
    for dtype in [DType::BF16, DType::F32] {
        let k = t.kernels(dtype, c.d);
        let (_, kc, vc) = attn_inputs(&c, &mut rng, dtype, &Device::Cpu);
        let qkv = rand_tensor(&mut rng, &[rows.len(), width], 2.0, dtype, &Device::Cpu);
        let (gk, gv) = (t.upload(&kc), t.upload(&vc));
        let splits = launch::attention_splits(c.cap, launch::attention_blocks_per_split(1, c.h, c.kvh));
        assert!(splits > 1, "the case must split");
        let dims = |b: usize| AttnDims {
            b,
            n_heads: c.h,
            n_kv_heads: c.kvh,
            head_dim: c.d,
            kv_start: 0,
            kv_end: 1,
            q_sb: width,
            q_sh: c.d,
            k_sb: c.kvh * c.cap * c.d,
            k_sh: c.cap * c.d,
            k_ss: c.d,
            v_sb: c.kvh * c.cap * c.d,
            v_sh: c.cap * c.d,
            v_ss: c.d,
        };
        let partial = Tensor::zeros(launch::attention_scratch_words(&dims(rows.len()), splits), DType::F32, &t.device()).unwrap();
        let run = |q: &Tensor, rows: &[(usize, usize)]| {
            let gq = t.upload(q);
            let out = Tensor::zeros(rows.len() * c.h * c.d, dtype, &t.device()).unwrap();
            let words: Vec<u32> = rows.iter().flat_map(|&(slot, len)| [0, len as u32 - 1, 0, slot as u32]).collect();
            let state = t.upload(&Tensor::new(words.as_slice(), &Device::Cpu).unwrap());
            let attn = AttnLaunch {
                q: t.ptr(&gq),
                k: t.ptr(&gk),
                v: t.ptr(&gv),
                out: t.ptr(&out),
                partial: t.ptr(&partial),
                state: t.ptr(&state),
                kv_len: 0,
                window: c.window.unwrap_or(0),
                splits,
                scale: 1.0 / (c.d as f32).sqrt(),
                dims: dims(rows.len()),
                scratch_batch: 2,
            };
            k.launch(&launch::attention(&attn).unwrap()).unwrap();
            host(&out)
        };
        let got = run(&qkv, &rows);
        let (atol, rtol) = device_tol(dtype);
        let hd = c.h * c.d;
        for (j, &(slot, len)) in rows.iter().enumerate() {
            let q = qkv.get(j).unwrap().narrow(0, 0, hd).unwrap().reshape((1, c.h, 1, c.d)).unwrap();
            let (ks, vs) = (kc.narrow(0, slot, 1).unwrap(), vc.narrow(0, slot, 1).unwrap());
            let want = decode_attention(&q, &ks, &vs, len, c.window, 1.0 / (c.d as f64).sqrt()).unwrap();
            let row = Tensor::from_slice(&got[j * hd..(j + 1) * hd], (1, c.h, 1, c.d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            assert_close(&format!("batched step attention {dtype:?} row {j} slot {slot} kv{len}"), &row, &want, atol.max(2e-6), rtol);
        }
        assert_rows_alone(&format!("batched step attention {dtype:?}"), &got, hd, rows.len(), |j| run(&qkv.narrow(0, j, 1).unwrap(), &rows[j..j + 1]));
    }
}

/// The counter-based normal numbers: the device makes the CPU's (up to the last ulp of logf/cosf,
/// then the rounding to the dtype).
pub(super) fn random_normal(t: &impl Target) {
    for dtype in DTYPES {
        let sizes: &[usize] = if t.full_size() { &[1, 1000, 3 << 20] } else { &[1, 1000, 5000] };
        for &n in sizes {
            let want = Tensor::zeros(n, dtype, &Device::Cpu).unwrap();
            fill_normal(&want, 42, 0.5, 0.02).unwrap();
            let got = Tensor::zeros(n, dtype, &t.device()).unwrap();
            t.kernels(dtype, 128).launch(&launch::random_normal(t.ptr(&got), n, 42, 0.5, 0.02)).unwrap();
            let (atol, rtol) = device_tol(dtype);
            assert_close(&format!("random_normal {dtype:?} n{n}"), &on_cpu(&got), &want, atol.min(1e-5), rtol);
        }
    }
}
