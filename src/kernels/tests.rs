//! Kernel tests: each CPU implementation against a composition of plain candle ops (mostly the very
//! ops of the reference forward pass, so the decode step's kernels must match them bit for bit), on
//! fresh random inputs (seed printed; `EXPANSE_TEST_SEED=<u64>` replays one).
//!
//! `cuda_kernels` compares every CUDA kernel with its CPU implementation: on every run through the
//! CPU emulator of the CUDA sources (`emulated`), and with `--features cuda` on a device (`gpu`;
//! those tests FAIL, not skip, when no CUDA device is usable: a cuda build's tests are meant to run
//! on a GPU machine, scripts/gpu-check.sh).

use super::*;
use candle_core::{Device, IndexOp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub(crate) fn rng(test: &str) -> StdRng {
    let seed = std::env::var("EXPANSE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        t.as_nanos() as u64 ^ (test.len() as u64).rotate_left(40)
    });
    eprintln!("{test}: EXPANSE_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

/// Uniform in [-amp, amp), as an f32 tensor of `shape` on `dev`, cast to `dtype`.
pub(crate) fn rand_tensor(rng: &mut StdRng, shape: &[usize], amp: f32, dtype: DType, dev: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-amp..amp)).collect();
    Tensor::from_vec(v, shape, dev).unwrap().to_dtype(dtype).unwrap()
}

pub(crate) fn to_vec_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Asserts |a - b| <= atol + rtol * |b| elementwise, both sides finite (`compare::close`).
#[track_caller]
pub(crate) fn assert_close(what: &str, a: &Tensor, b: &Tensor, atol: f32, rtol: f32) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    if let Err(e) = crate::compare::close(&to_vec_f32(a), &to_vec_f32(b), atol, rtol) {
        panic!("{what}: {e}");
    }
}

/// One bf16 ulp relative (2^-7 covers the rounding of both sides plus f32 noise).
const BF16_RTOL: f32 = 1.0 / 128.0;
const F16_RTOL: f32 = 1.0 / 1024.0;

fn tol(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (1e-6, 1e-5),
        DType::BF16 => (1e-3, BF16_RTOL),
        _ => (1e-4, F16_RTOL),
    }
}

// ---------------------------------------------------------------------------
// References built from plain candle ops (computed in f32).

/// The attended keys (or values) of a cache `[b, kvh, cap, d]` in f32, repeated per query head:
/// `[b, h, n, d]`.
fn window_kv(q: &Tensor, cache: &Tensor, kv_len: usize, window: Option<usize>) -> Tensor {
    let (b, h, _, d) = q.dims4().unwrap();
    let kvh = cache.dim(1).unwrap();
    let start = window.map_or(0, |w| kv_len.saturating_sub(w));
    let n = kv_len - start;
    let t = cache.narrow(2, start, n).unwrap().to_dtype(DType::F32).unwrap();
    t.unsqueeze(2).unwrap().expand((b, kvh, h / kvh, n, d)).unwrap().reshape((b, h, n, d)).unwrap()
}

/// Plain attention over the valid window of the cache, in f32.
pub(crate) fn ref_decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, kv_len: usize, window: Option<usize>, scale: f64) -> Tensor {
    let (k, v) = (window_kv(q, k, kv_len, window), window_kv(q, v, kv_len, window));
    let q = q.to_dtype(DType::F32).unwrap();
    let att = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
    att.matmul(&v).unwrap()
}

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

// ---------------------------------------------------------------------------

/// A preallocated cache `[b, kvh, cap, d]` with random contents everywhere
/// (the tail beyond kv_len is garbage that must not be read).
pub(crate) struct AttnCase {
    pub b: usize,
    pub h: usize,
    pub kvh: usize,
    pub d: usize,
    pub cap: usize,
    pub kv_len: usize,
    pub window: Option<usize>,
}

pub(crate) const ATTN_CASES: &[AttnCase] = &[
    // Mistral-7B geometry
    AttnCase { b: 1, h: 32, kvh: 8, d: 128, cap: 1024, kv_len: 700, window: None },
    AttnCase { b: 1, h: 32, kvh: 8, d: 128, cap: 4500, kv_len: 4500, window: Some(4096) },
    AttnCase { b: 1, h: 32, kvh: 8, d: 128, cap: 64, kv_len: 1, window: Some(4096) },
    // tiny test models, odd head dims, MHA, window inside the context, batch 2
    AttnCase { b: 1, h: 4, kvh: 2, d: 16, cap: 40, kv_len: 33, window: Some(8) },
    AttnCase { b: 1, h: 4, kvh: 4, d: 80, cap: 300, kv_len: 257, window: Some(1) },
    AttnCase { b: 2, h: 6, kvh: 2, d: 200, cap: 130, kv_len: 129, window: Some(100) },
    AttnCase { b: 1, h: 8, kvh: 1, d: 64, cap: 3000, kv_len: 2999, window: Some(2999) },
    // a head_dim of no whole 16-byte vectors (the GPU kernel's element loads), 4 heads on one KV head
    AttnCase { b: 1, h: 4, kvh: 1, d: 13, cap: 50, kv_len: 45, window: None },
];

pub(crate) fn attn_inputs(c: &AttnCase, rng: &mut StdRng, dtype: DType, dev: &Device) -> (Tensor, Tensor, Tensor) {
    let q = rand_tensor(rng, &[c.b, c.h, 1, c.d], 2.0, dtype, dev);
    let k = rand_tensor(rng, &[c.b, c.kvh, c.cap, c.d], 2.0, dtype, dev);
    let v = rand_tensor(rng, &[c.b, c.kvh, c.cap, c.d], 2.0, dtype, dev);
    (q, k, v)
}

#[test]
fn decode_attention_cpu_matches_candle_ops() {
    let _guard = crate::kernels::guard_buffers();
    let dev = Device::Cpu;
    let mut rng = rng("decode_attention_cpu_matches_candle_ops");
    for dtype in DTYPES {
        for c in ATTN_CASES {
            let (q, k, v) = attn_inputs(c, &mut rng, dtype, &dev);
            let scale = 1.0 / (c.d as f64).sqrt();
            let out = decode_attention(&q, &k, &v, c.kv_len, c.window, scale).unwrap();
            assert_eq!(out.dims(), &[c.b, c.h, 1, c.d]);
            assert_eq!(out.dtype(), dtype);
            let reference = ref_decode_attention(&q, &k, &v, c.kv_len, c.window, scale);
            let (atol, rtol) = tol(dtype);
            let what = format!("decode_attention {dtype:?} b{} h{} kvh{} d{} kv{} w{:?}", c.b, c.h, c.kvh, c.d, c.kv_len, c.window);
            assert_close(&what, &out, &reference, atol.max(1e-5), rtol);
        }
    }
}

/// transformers' eager attention in `dtype`: f32 products, rounded to `dtype` after q·kᵀ, after the
/// scaling and after the f32 softmax; the weighted sum in f32, rounded once.
fn eager_reference(q: &Tensor, k: &Tensor, v: &Tensor, kv_len: usize, window: Option<usize>, scale: f64) -> Tensor {
    let dtype = q.dtype();
    let round = |t: Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
    let (k, v) = (window_kv(q, k, kv_len, window), window_kv(q, v, kv_len, window));
    let scores = round(q.to_dtype(DType::F32).unwrap().matmul(&k.t().unwrap()).unwrap());
    let scores = round((scores * scale).unwrap());
    let probs = round(candle_nn::ops::softmax_last_dim(&scores).unwrap());
    probs.matmul(&v).unwrap().to_dtype(dtype).unwrap()
}

/// How far each output row (b, h) may move when the two sides round one score and one probability to
/// opposite neighbours (their f32 sums differ in order, so a value near a rounding midpoint can): a
/// score moved by one ulp (≤ eps·|s|) moves the softmax by ≤ p·eps·|s| towards its value, so the output
/// by ≤ p·eps·|s|·max|v_j − out|; a probability moved by one ulp (≤ eps·p; not renormalised) moves it by
/// ≤ eps·p·max|v_j|. Twice that for two such flips. Per row, from that row's own extremes: one bound
/// for the whole tensor would be tens of times looser than any row needs.
fn rounding_flip_atols(q: &Tensor, k: &Tensor, v: &Tensor, kv_len: usize, window: Option<usize>, scale: f64, want: &Tensor) -> Vec<f32> {
    let eps = if q.dtype() == DType::BF16 { 2f32.powi(-7) } else { 2f32.powi(-10) };
    let (kw, vw) = (window_kv(q, k, kv_len, window), window_kv(q, v, kv_len, window));
    let (_, _, n, d) = vw.dims4().unwrap();
    let scores = (q.to_dtype(DType::F32).unwrap().matmul(&kw.t().unwrap()).unwrap() * scale).unwrap();
    let probs = to_vec_f32(&candle_nn::ops::softmax_last_dim(&scores).unwrap());
    let (scores, vw, want) = (to_vec_f32(&scores), to_vec_f32(&vw), to_vec_f32(want));
    let max_abs = |xs: &[f32]| xs.iter().fold(0f32, |m, x| m.max(x.abs()));
    let mut atols = Vec::with_capacity(want.len());
    for (row, out) in want.chunks(d).enumerate() {
        let (s, p) = (max_abs(&scores[row * n..][..n]), max_abs(&probs[row * n..][..n]));
        let vs = &vw[row * n * d..][..n * d];
        let spread = vs.iter().enumerate().fold(0f32, |m, (i, x)| m.max((x - out[i % d]).abs()));
        let bound = 2.0 * (p * eps * s * spread + eps * p * max_abs(vs));
        atols.extend(std::iter::repeat_n(bound, d));
    }
    atols
}

#[test]
fn decode_attention_eager_rounding_matches_eager_reference() {
    let _guard = crate::kernels::guard_buffers();
    let dev = Device::Cpu;
    let mut rng = rng("decode_attention_eager_rounding_matches_eager_reference");
    for dtype in [DType::BF16, DType::F16] {
        let (mut exact, mut total) = (0usize, 0usize);
        for c in ATTN_CASES {
            let (q, k, v) = attn_inputs(c, &mut rng, dtype, &dev);
            let scale = 1.0 / (c.d as f64).sqrt();
            let out = decode_attention_eager_rounding(&q, &k, &v, c.kv_len, c.window, scale).unwrap();
            let what = format!("eager {dtype:?} b{} h{} kvh{} d{} kv{} w{:?}", c.b, c.h, c.kvh, c.d, c.kv_len, c.window);
            let want = eager_reference(&q, &k, &v, c.kv_len, c.window, scale);
            let (atol, rtol) = tol(dtype);
            let atols = rounding_flip_atols(&q, &k, &v, c.kv_len, c.window, scale, &want);
            assert_eq!(out.dims(), want.dims(), "{what}: shapes differ");
            let (a, b) = (to_vec_f32(&out), to_vec_f32(&want));
            for (i, ((x, y), row_atol)) in a.iter().zip(&b).zip(&atols).enumerate() {
                // Written so that a NaN on either side fails.
                let ok = (x - y).abs() <= atol.max(*row_atol) + rtol * y.abs();
                assert!(ok, "{what}: output {i}: {x} vs {y} (atol {})", atol.max(*row_atol));
            }
            exact += a.iter().zip(&b).filter(|(x, y)| x == y).count();
            total += a.len();
        }
        // Only the f32 summation order differs from the reference's matmul, so a score rarely
        // rounds the other way: nearly every output is bit-identical.
        let frac = exact as f64 / total as f64;
        eprintln!("{dtype:?}: {exact}/{total} outputs bit-identical to the eager reference");
        assert!(frac > 0.9, "{dtype:?}: only {exact}/{total} outputs bit-identical");
    }
}

#[test]
fn decode_attention_reads_cache_views_in_place() {
    let _guard = crate::kernels::guard_buffers();
    let dev = Device::Cpu;
    let mut rng = rng("decode_attention_reads_cache_views_in_place");
    let (b, h, kvh, d, cap, kv_len) = (1, 8, 2, 32, 50, 37);
    let scale = 0.2;
    let q = rand_tensor(&mut rng, &[b, h, 1, d], 2.0, DType::F32, &dev);
    // Cache stored as [b, cap, kvh, d] and viewed as [b, kvh, cap, d].
    let k_store = rand_tensor(&mut rng, &[b, cap, kvh, d], 2.0, DType::F32, &dev);
    let v_store = rand_tensor(&mut rng, &[b, cap, kvh, d], 2.0, DType::F32, &dev);
    let (k, v) = (k_store.transpose(1, 2).unwrap(), v_store.transpose(1, 2).unwrap());
    assert!(!k.is_contiguous());
    let (kc, vc) = (k.contiguous().unwrap(), v.contiguous().unwrap());
    for window in [None, Some(5)] {
        let want = decode_attention(&q, &kc, &vc, kv_len, window, scale).unwrap();
        let got = decode_attention(&q, &k, &v, kv_len, window, scale).unwrap();
        assert_close("transposed cache", &got, &want, 1e-6, 1e-5);
        // A narrowed view of exactly kv_len positions, and one with an offset.
        let got = decode_attention(&q, &kc.narrow(2, 0, kv_len).unwrap(), &vc.narrow(2, 0, kv_len).unwrap(), kv_len, window, scale).unwrap();
        assert_close("narrowed cache", &got, &want, 1e-6, 1e-5);
        let k2 = Tensor::cat(&[&kc.i((.., .., 0..3, ..)).unwrap(), &kc], 2).unwrap().narrow(2, 3, cap).unwrap();
        let v2 = Tensor::cat(&[&vc.i((.., .., 0..3, ..)).unwrap(), &vc], 2).unwrap().narrow(2, 3, cap).unwrap();
        let got = decode_attention(&q, &k2, &v2, kv_len, window, scale).unwrap();
        assert_close("offset cache", &got, &want, 1e-6, 1e-5);
    }
    // q as a transposed view of [b, 1, h, d] (what `q.transpose(1, 2)` gives).
    let q_store = q.transpose(1, 2).unwrap().contiguous().unwrap();
    let qt = q_store.transpose(1, 2).unwrap();
    let want = decode_attention(&q, &kc, &vc, kv_len, None, scale).unwrap();
    let got = decode_attention(&qt, &kc, &vc, kv_len, None, scale).unwrap();
    assert_close("transposed q", &got, &want, 0.0, 0.0);
}

#[test]
fn decode_attention_window_semantics() {
    let _guard = crate::kernels::guard_buffers();
    // With one-hot values, the output shows exactly which keys were attended.
    let dev = Device::Cpu;
    let (kv_len, cap, d) = (10usize, 12usize, 16usize);
    let q = Tensor::zeros((1, 1, 1, d), DType::F32, &dev).unwrap(); // uniform attention
    let k = Tensor::zeros((1, 1, cap, d), DType::F32, &dev).unwrap();
    let v = Tensor::eye(cap, DType::F32, &dev).unwrap().pad_with_zeros(1, 0, d - cap).unwrap().reshape((1, 1, cap, d)).unwrap();
    for (window, first) in [(None, 0usize), (Some(1), 9), (Some(3), 7), (Some(10), 0), (Some(50), 0)] {
        let out = to_vec_f32(&decode_attention(&q, &k, &v, kv_len, window, 1.0).unwrap());
        let n = (kv_len - first) as f32;
        for (j, &o) in out.iter().enumerate() {
            let want = if (first..kv_len).contains(&j) { 1.0 / n } else { 0.0 };
            assert!((o - want).abs() < 1e-6, "window {window:?}: out[{j}] = {o}, want {want}");
        }
    }
}

#[test]
fn decode_attention_rejects_bad_inputs() {
    let dev = Device::Cpu;
    let q = Tensor::zeros((1, 4, 1, 8), DType::F32, &dev).unwrap();
    let k = Tensor::zeros((1, 2, 10, 8), DType::F32, &dev).unwrap();
    assert!(decode_attention(&q, &k, &k, 0, None, 1.0).is_err(), "kv_len 0");
    assert!(decode_attention(&q, &k, &k, 11, None, 1.0).is_err(), "kv_len > cap");
    assert!(decode_attention(&q, &k, &k, 5, Some(0), 1.0).is_err(), "window 0");
    let k3 = Tensor::zeros((1, 3, 10, 8), DType::F32, &dev).unwrap();
    assert!(decode_attention(&q, &k3, &k3, 5, None, 1.0).is_err(), "heads not a multiple");
    let q2 = Tensor::zeros((1, 4, 2, 8), DType::F32, &dev).unwrap();
    assert!(decode_attention(&q2, &k, &k, 5, None, 1.0).is_err(), "seq_len 2");
    let kt = Tensor::zeros((1, 2, 8, 10), DType::F32, &dev).unwrap().transpose(2, 3).unwrap();
    assert!(decode_attention(&q, &kt, &kt, 5, None, 1.0).is_err(), "last dim not contiguous");
    assert!(decode_attention(&q, &k, &k.to_dtype(DType::BF16).unwrap(), 5, None, 1.0).is_err(), "dtype mismatch");
}

// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// The decode step's kernels (slices in, slices out), against the reference forward pass's ops.

fn values<T: cpu::Elem>(t: &Tensor) -> Vec<T> {
    to_vec_f32(t).into_iter().map(T::from_f32).collect()
}

/// The reference path's RMSNorm (src/model takes the CPU kernel for every float dtype). The kernel
/// itself is checked against transformers' formula in f64 in `cpu::norm`; here the step's slice
/// entry point must agree with the op the forward pass calls.
fn reference_rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Tensor {
    let x = x.to_device(&Device::Cpu).unwrap();
    crate::kernels::rms_norm(&x, &w.to_device(&Device::Cpu).unwrap(), eps).expect("CPU float dtypes take the kernel").unwrap()
}

fn residual_norm_case<T: cpu::Elem>(rng: &mut StdRng, dtype: DType, n: usize) {
    let dev = Device::Cpu;
    let (x, d, w) = (rand_tensor(rng, &[1, n], 3.0, dtype, &dev), rand_tensor(rng, &[1, n], 3.0, dtype, &dev), rand_tensor(rng, &[n], 2.0, dtype, &dev));
    let eps = 1e-5;
    let sum = (&x + &d).unwrap();
    let want_h = reference_rms_norm(&sum, &w, eps);
    let (mut xs, mut h) = (values::<T>(&x), vec![T::from_f32(0.0); n]);
    cpu::residual_rms_norm(&mut xs, Some(&values::<T>(&d)), &values::<T>(&w), eps, &mut h);
    let f = |v: &[T]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    assert_eq!(f(&xs), to_vec_f32(&sum), "{dtype:?} n{n}: residual");
    assert_eq!(f(&h), to_vec_f32(&want_h), "{dtype:?} n{n}: norm");
    // Without an addend (the embedding row): the norm of x as it is.
    let mut xs = values::<T>(&x);
    cpu::residual_rms_norm(&mut xs, None, &values::<T>(&w), eps, &mut h);
    assert_eq!(f(&h), to_vec_f32(&reference_rms_norm(&x, &w, eps)), "{dtype:?} n{n}: norm of x");
}

#[test]
fn residual_norm_is_the_reference_add_and_rms_norm_bit_for_bit() {
    let _guard = crate::kernels::guard_buffers();
    let mut rng = rng("residual_norm_is_the_reference_add_and_rms_norm_bit_for_bit");
    for n in [1usize, 33, 576, 4096] {
        residual_norm_case::<f32>(&mut rng, DType::F32, n);
        residual_norm_case::<half::bf16>(&mut rng, DType::BF16, n);
        residual_norm_case::<half::f16>(&mut rng, DType::F16, n);
    }
}

/// Rotary tables `[positions, d/2]` as the model builds them (f32 angles, then the dtype).
fn rotary(positions: usize, d: usize, dtype: DType) -> (Tensor, Tensor) {
    let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / d as f32)).collect();
    let angles: Vec<f32> = (0..positions).flat_map(|p| inv.iter().map(move |f| p as f32 * f)).collect();
    let a = Tensor::from_vec(angles, (positions, d / 2), &Device::Cpu).unwrap();
    (a.cos().unwrap().to_dtype(dtype).unwrap(), a.sin().unwrap().to_dtype(dtype).unwrap())
}

fn rope_kv_case<T: cpu::Elem>(rng: &mut StdRng, dtype: DType, (nh, nkv, d, cap, pos): (usize, usize, usize, usize, usize)) {
    let dev = Device::Cpu;
    let qkv = rand_tensor(rng, &[(nh + 2 * nkv) * d], 3.0, dtype, &dev);
    let (cos, sin) = rotary(cap, d, dtype);
    let (c, s) = (cos.narrow(0, pos, 1).unwrap(), sin.narrow(0, pos, 1).unwrap());
    let heads = |off: usize, n: usize| qkv.narrow(0, off * d, n * d).unwrap().reshape((1, n, 1, d)).unwrap();
    let want_q = candle_nn::rotary_emb::rope(&heads(0, nh), &c, &s).unwrap();
    let want_k = candle_nn::rotary_emb::rope(&heads(nh, nkv), &c, &s).unwrap();
    let old = rand_tensor(rng, &[nkv, cap, d], 1.0, dtype, &dev);
    let (mut q, mut kc, mut vc) = (values::<T>(&qkv), values::<T>(&old), values::<T>(&old));
    let dims = cpu::RopeDims { n_heads: nh, n_kv_heads: nkv, head_dim: d, capacity: cap };
    cpu::rope_kv(&mut q, &values::<T>(&cos)[pos * d / 2..], &values::<T>(&sin)[pos * d / 2..], &mut kc, &mut vc, pos, &dims);
    let f = |v: &[T]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    let what = format!("{dtype:?} h{nh} kv{nkv} d{d} pos{pos}");
    assert_eq!(f(&q[..nh * d]), to_vec_f32(&want_q), "{what}: q");
    assert_eq!(f(&q[nh * d..(nh + nkv) * d]), to_vec_f32(&want_k), "{what}: k");
    let old_v = to_vec_f32(&old);
    for h in 0..nkv {
        for p in 0..cap {
            let row = (h * cap + p) * d;
            let (k_row, v_row) = (&f(&kc)[row..row + d], &f(&vc)[row..row + d]);
            if p == pos {
                assert_eq!(k_row, &to_vec_f32(&want_k)[h * d..(h + 1) * d], "{what}: cached k of head {h}");
                assert_eq!(v_row, &to_vec_f32(&qkv)[(nh + nkv + h) * d..(nh + nkv + h + 1) * d], "{what}: cached v of head {h}");
            } else {
                assert_eq!(k_row, &old_v[row..row + d], "{what}: k row {p} of head {h} must not change");
            }
        }
    }
}

#[test]
fn rope_kv_is_candles_rope_and_a_cache_write_bit_for_bit() {
    let _guard = crate::kernels::guard_buffers();
    let mut rng = rng("rope_kv_is_candles_rope_and_a_cache_write_bit_for_bit");
    for case in [(4, 2, 8, 16, 0), (4, 2, 8, 16, 15), (32, 8, 128, 40, 37), (9, 3, 64, 8, 5)] {
        rope_kv_case::<f32>(&mut rng, DType::F32, case);
        rope_kv_case::<half::bf16>(&mut rng, DType::BF16, case);
        rope_kv_case::<half::f16>(&mut rng, DType::F16, case);
    }
}

/// `rope_heads` against the composition it replaces (q/k/v narrowed out of the stacked projection,
/// transposed to heads, q and k through candle's `rope`), bit for bit, at positions after a prefix.
#[test]
fn rope_heads_is_candles_split_and_rope_bit_for_bit() {
    let _guard = crate::kernels::guard_buffers();
    let mut rng = rng("rope_heads_is_candles_split_and_rope_bit_for_bit");
    // (batch, s, heads, kv heads, head_dim, positions already cached)
    for (b, s, nh, nkv, d, past) in [(1, 1, 4, 2, 8, 0), (1, 70, 9, 3, 64, 0), (2, 5, 4, 1, 16, 11), (1, 33, 32, 8, 128, 3)] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let qkv = rand_tensor(&mut rng, &[b, s, (nh + 2 * nkv) * d], 3.0, dtype, &Device::Cpu);
            let (cos, sin) = rotary(past + s + 4, d, dtype);
            let (cos, sin) = (cos.narrow(0, past, s).unwrap(), sin.narrow(0, past, s).unwrap());
            let heads =
                |at: usize, n: usize| qkv.narrow(2, at * d, n * d).unwrap().reshape((b, s, n, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
            let want_q = candle_nn::rotary_emb::rope(&heads(0, nh), &cos, &sin).unwrap();
            let want_k = candle_nn::rotary_emb::rope(&heads(nh, nkv), &cos, &sin).unwrap();
            let got = rope_heads(&qkv, &cos, &sin, d, nh + nkv).expect("the CPU takes it").unwrap();
            let what = format!("{dtype:?} b{b} s{s} h{nh} kv{nkv} d{d} past{past}");
            assert_eq!(got.dims(), [b, nh + 2 * nkv, s, d], "{what}");
            let bits =
                |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.narrow(1, 0, nh).unwrap()), bits(&want_q), "{what}: q");
            assert_eq!(bits(&got.narrow(1, nh, nkv).unwrap()), bits(&want_k), "{what}: k");
            assert_eq!(bits(&got.narrow(1, nh + nkv, nkv).unwrap()), bits(&heads(nh + nkv, nkv)), "{what}: v (not rotated)");
        }
    }
}

#[test]
fn rope_heads_declines_what_it_does_not_handle() {
    let (cos, sin) = rotary(4, 8, DType::F32);
    let qkv = Tensor::zeros((1, 4, 24), DType::F32, &Device::Cpu).unwrap();
    assert!(rope_heads(&qkv, &cos, &sin, 8, 2).is_some());
    assert!(rope_heads(&qkv, &cos, &sin, 16, 1).is_none(), "cos rows of another head_dim");
    assert!(rope_heads(&qkv, &cos, &sin, 8, 4).is_none(), "more rotated heads than heads");
    assert!(rope_heads(&qkv.narrow(1, 0, 3).unwrap(), &cos, &sin, 8, 2).is_none(), "a row per position");
    let (none, no_cos, no_sin) = (qkv.narrow(1, 0, 0).unwrap(), cos.narrow(0, 0, 0).unwrap(), sin.narrow(0, 0, 0).unwrap());
    assert!(rope_heads(&none, &no_cos, &no_sin, 8, 2).is_none(), "no positions: left to candle");
    assert!(rope_heads(&qkv.to_dtype(DType::BF16).unwrap(), &cos, &sin, 8, 2).is_none(), "mixed dtypes");
}

fn silu_mul_case<T: cpu::Elem>(rng: &mut StdRng, dtype: DType, n: usize) {
    let products = rand_tensor(rng, &[2 * n], 8.0, DType::F32, &Device::Cpu);
    // The reference: projections rounded to the dtype, SiLU in f32, the product in the dtype.
    let gate = products.narrow(0, 0, n).unwrap().to_dtype(dtype).unwrap();
    let up = products.narrow(0, n, n).unwrap().to_dtype(dtype).unwrap();
    let silu = gate.to_dtype(DType::F32).unwrap().silu().unwrap().to_dtype(dtype).unwrap();
    let want = (silu * up).unwrap();
    let mut out = vec![T::from_f32(0.0); n];
    cpu::silu_mul(&to_vec_f32(&products), &mut out);
    assert_eq!(out.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), to_vec_f32(&want), "{dtype:?} n{n}");
}

#[test]
fn silu_mul_is_the_reference_swiglu_bit_for_bit() {
    let _guard = crate::kernels::guard_buffers();
    let mut rng = rng("silu_mul_is_the_reference_swiglu_bit_for_bit");
    for n in [1usize, 64, 1536, 14336] {
        silu_mul_case::<f32>(&mut rng, DType::F32, n);
        silu_mul_case::<half::bf16>(&mut rng, DType::BF16, n);
        silu_mul_case::<half::f16>(&mut rng, DType::F16, n);
    }
}

#[test]
fn argmax_is_candles_argmax_ties_included() {
    let _guard = crate::kernels::guard_buffers();
    let mut rng = rng("argmax_is_candles_argmax_ties_included");
    for n in [1usize, 7, 32002] {
        // bf16 logits of a coarse grid, so ties for the maximum are common.
        let v: Vec<f32> = (0..n).map(|_| (rng.random_range(-8.0f32..8.0) * 2.0).round() / 2.0).collect();
        let t = Tensor::from_vec(v, n, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        let want = t.to_dtype(DType::F32).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(cpu::argmax(&values::<half::bf16>(&t)), want, "n{n}");
    }
    assert_eq!(cpu::argmax(&[f32::NEG_INFINITY; 4]), 0);
    assert_eq!(cpu::argmax(&[1.0f32, f32::NAN, 3.0, 3.0]), 2, "NaN never wins; the first maximum does");
}

/// Split-KV attention (the GPU's algorithm, on the CPU) against the f32 reference.
fn split_attention(q: &Tensor, k: &Tensor, v: &Tensor, c: &AttnCase, splits: usize) -> Tensor {
    let dims = DecodeAttention::new(c.kv_len, c.window, 1.0).unwrap().dims(q.layout(), k.layout(), v.layout()).unwrap();
    let (qv, kv, vv) = (to_vec_f32(q), to_vec_f32(k), to_vec_f32(v));
    let scale = 1.0 / (c.d as f32).sqrt();
    let mut partial = vec![0f32; c.b * c.h * splits * (c.d + 2)];
    let mut out = vec![0f32; c.b * c.h * c.d];
    cpu::attention_partial(&qv, &kv, &vv, &dims, scale, splits, &mut partial);
    cpu::attention_combine(&partial, c.d, splits, &mut out);
    Tensor::from_vec(out, (c.b, c.h, 1, c.d), &Device::Cpu).unwrap()
}

#[test]
fn split_attention_matches_the_reference() {
    let _guard = crate::kernels::guard_buffers();
    let mut rng = rng("split_attention_matches_the_reference");
    for c in ATTN_CASES {
        let (q, k, v) = attn_inputs(c, &mut rng, DType::F32, &Device::Cpu);
        let want = ref_decode_attention(&q, &k, &v, c.kv_len, c.window, 1.0 / (c.d as f64).sqrt());
        // More splits than keys leaves some empty (a fixed split count, as in a captured graph).
        for splits in [1, 2, 3, 16, c.kv_len + 5] {
            let got = split_attention(&q, &k, &v, c, splits);
            assert_close(&format!("split {splits} h{} d{} kv{} w{:?}", c.h, c.d, c.kv_len, c.window), &got, &want, 1e-5, 1e-4);
        }
    }
}

mod cuda_kernels;
mod emulated;
#[cfg(feature = "cuda")]
mod gpu;

#[test]
fn fill_normal_makes_standard_normal_numbers_that_depend_only_on_seed_and_index() {
    let n = 1 << 18;
    let t = Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
    fill_normal(&t, 7, 0.0, 1.0).unwrap();
    let v = to_vec_f32(&t);
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    // Standard errors at n = 2^18: mean 0.002, variance 0.003; these bounds are ~5 of them.
    assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.015, "mean {mean}, variance {var}");
    let within_1 = v.iter().filter(|x| x.abs() < 1.0).count() as f64 / n as f64;
    assert!((within_1 - 0.6827).abs() < 0.005, "P(|z| < 1) = {within_1}");
    // Element i is normal(seed, i) whatever the tensor's size or dtype; another seed differs.
    assert!(v.iter().enumerate().take(1000).all(|(i, &x)| x == cpu::normal(7, i as u64)));
    let b = Tensor::zeros(10, DType::BF16, &Device::Cpu).unwrap();
    fill_normal(&b, 7, 1.0, 0.5).unwrap();
    let want: Vec<f32> = v[..10].iter().map(|&z| half::bf16::from_f32(1.0 + 0.5 * z).to_f32()).collect();
    assert_eq!(to_vec_f32(&b), want);
    let other = Tensor::zeros(1000, DType::F32, &Device::Cpu).unwrap();
    fill_normal(&other, 8, 0.0, 1.0).unwrap();
    assert!(to_vec_f32(&other).iter().zip(&v).filter(|(a, b)| a == b).count() < 5);
}
