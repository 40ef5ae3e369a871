//! CPU tests: each kernel's CPU implementation against a composition of plain
//! candle ops, on fresh random inputs (seed printed; `EXPANSE_TEST_SEED=<u64>`
//! replays one).
//!
//! With `--features cuda`, the `gpu` module compares the CUDA kernels with the
//! CPU implementations. Those tests FAIL (not skip) when no CUDA device is
//! usable: a cuda build's tests are meant to run on a GPU machine
//! (scripts/gpu-check.sh).

use super::*;
use candle_core::{Device, IndexOp, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub(crate) fn rng(test: &str) -> StdRng {
    let seed = std::env::var("EXPANSE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
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

/// Asserts |a - b| <= atol + rtol * |b| elementwise.
#[track_caller]
pub(crate) fn assert_close(what: &str, a: &Tensor, b: &Tensor, atol: f32, rtol: f32) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let (va, vb) = (to_vec_f32(a), to_vec_f32(b));
    let mut worst = (0usize, 0f32);
    for (i, (&x, &y)) in va.iter().zip(&vb).enumerate() {
        assert!(x.is_finite(), "{what}: non-finite value {x} at {i}");
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(
        worst.1 <= 0.0,
        "{what}: mismatch at flat index {i}: got {} expected {} (atol {atol}, rtol {rtol})",
        va[i],
        vb[i]
    );
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

pub(crate) fn ref_silu_mul(gate: &Tensor, up: &Tensor) -> Tensor {
    let g = gate.to_dtype(DType::F32).unwrap();
    let u = up.to_dtype(DType::F32).unwrap();
    (g.silu().unwrap() * u).unwrap()
}

/// (sum in the input dtype, normed in f32 from that rounded sum)
pub(crate) fn ref_add_rms_norm(x: &Tensor, r: &Tensor, w: &Tensor, eps: f64) -> (Tensor, Tensor) {
    let sum = (x + r).unwrap();
    let s = sum.to_dtype(DType::F32).unwrap();
    let ms = s.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let inv = (ms + eps).unwrap().sqrt().unwrap().recip().unwrap();
    let normed = s.broadcast_mul(&inv).unwrap().broadcast_mul(&w.to_dtype(DType::F32).unwrap()).unwrap();
    (sum, normed)
}

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
pub(crate) fn ref_decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv_len: usize,
    window: Option<usize>,
    scale: f64,
) -> Tensor {
    let (k, v) = (window_kv(q, k, kv_len, window), window_kv(q, v, kv_len, window));
    let q = q.to_dtype(DType::F32).unwrap();
    let att = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
    att.matmul(&v).unwrap()
}

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

// ---------------------------------------------------------------------------

#[test]
fn silu_mul_cpu_matches_candle_ops() {
    let dev = Device::Cpu;
    let mut rng = rng("silu_mul_cpu_matches_candle_ops");
    for dtype in DTYPES {
        for shape in [&[1usize, 1, 14336][..], &[3, 37], &[1], &[2, 5, 70000]] {
            let g = rand_tensor(&mut rng, shape, 8.0, dtype, &dev);
            let u = rand_tensor(&mut rng, shape, 4.0, dtype, &dev);
            let out = silu_mul(&g, &u).unwrap();
            assert_eq!(out.dtype(), dtype);
            let (atol, rtol) = tol(dtype);
            assert_close(&format!("silu_mul {dtype:?} {shape:?}"), &out, &ref_silu_mul(&g, &u), atol, rtol);
            // Also within rounding of the unfused candle composition in the same dtype.
            let plain = (g.silu().unwrap() * &u).unwrap();
            assert_close(&format!("silu_mul vs plain {dtype:?}"), &out, &plain, 2.0 * atol, 2.0 * rtol);
        }
    }
}

#[test]
fn silu_mul_rejects_bad_inputs() {
    let dev = Device::Cpu;
    let a = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    let b = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
    assert!(silu_mul(&a, &b).is_err());
    assert!(silu_mul(&a, &b.t().unwrap()).is_err(), "non-contiguous must be rejected");
    assert!(silu_mul(&a, &a.to_dtype(DType::BF16).unwrap()).is_err());
    assert!(silu_mul(&a.to_dtype(DType::U32).unwrap(), &a.to_dtype(DType::U32).unwrap()).is_err());
}

#[test]
fn add_rms_norm_cpu_matches_candle_ops() {
    let dev = Device::Cpu;
    let mut rng = rng("add_rms_norm_cpu_matches_candle_ops");
    let eps = 1e-5;
    for dtype in DTYPES {
        for shape in [&[1usize, 1, 4096][..], &[1, 7, 64], &[3, 100], &[33]] {
            let x = rand_tensor(&mut rng, shape, 3.0, dtype, &dev);
            let r = rand_tensor(&mut rng, shape, 3.0, dtype, &dev);
            let w = rand_tensor(&mut rng, &shape[shape.len() - 1..], 2.0, dtype, &dev);
            let (sum, normed) = add_rms_norm(&x, &r, &w, eps).unwrap();
            let (rsum, rnormed) = ref_add_rms_norm(&x, &r, &w, eps);
            assert_eq!(sum.dims(), shape);
            assert_eq!(normed.dims(), shape);
            assert_eq!(normed.dtype(), dtype);
            assert!(sum.is_contiguous() && normed.is_contiguous());
            // The sum is one rounded add: bit-identical to candle's add.
            assert_eq!(to_vec_f32(&sum), to_vec_f32(&rsum), "sum {dtype:?} {shape:?}");
            let (atol, rtol) = tol(dtype);
            assert_close(&format!("add_rms_norm {dtype:?} {shape:?}"), &normed, &rnormed, atol, rtol);
            // And close to candle-nn's rms_norm on the rounded sum (f32 inputs).
            let nn = candle_nn::ops::rms_norm(
                &sum.to_dtype(DType::F32).unwrap(),
                &w.to_dtype(DType::F32).unwrap(),
                eps as f32,
            )
            .unwrap();
            assert_close(&format!("add_rms_norm vs candle-nn {dtype:?}"), &normed, &nn, atol, rtol);
        }
    }
}

#[test]
fn add_rms_norm_rejects_bad_inputs() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
    let w = Tensor::ones(8, DType::F32, &dev).unwrap();
    assert!(add_rms_norm(&x, &x, &Tensor::ones(7, DType::F32, &dev).unwrap(), 1e-5).is_err());
    assert!(add_rms_norm(&x, &Tensor::zeros((2, 4), DType::F32, &dev).unwrap(), &w, 1e-5).is_err());
    let xt = Tensor::zeros((8, 2), DType::F32, &dev).unwrap().t().unwrap();
    assert!(add_rms_norm(&xt, &x, &w, 1e-5).is_err(), "non-contiguous must be rejected");
}

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
];

pub(crate) fn attn_inputs(c: &AttnCase, rng: &mut StdRng, dtype: DType, dev: &Device) -> (Tensor, Tensor, Tensor) {
    let q = rand_tensor(rng, &[c.b, c.h, 1, c.d], 2.0, dtype, dev);
    let k = rand_tensor(rng, &[c.b, c.kvh, c.cap, c.d], 2.0, dtype, dev);
    let v = rand_tensor(rng, &[c.b, c.kvh, c.cap, c.d], 2.0, dtype, dev);
    (q, k, v)
}

#[test]
fn decode_attention_cpu_matches_candle_ops() {
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

#[test]
fn decode_attention_eager_rounding_matches_eager_reference() {
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
            assert_close(&what, &out, &want, atol, rtol);
            let a = out.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
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

#[cfg(feature = "cuda")]
mod gpu {
    //! CUDA kernels vs the CPU implementations. These need a CUDA device and
    //! fail without one.
    use super::*;

    fn cuda() -> Device {
        Device::new_cuda(0).expect(
            "built with --features cuda, but no usable CUDA device (run these tests on a GPU machine: scripts/gpu-check.sh)",
        )
    }

    /// GPU vs CPU: f32 to f32 noise; half types within one ulp of the storage type.
    fn gpu_tol(dtype: DType) -> (f32, f32) {
        match dtype {
            DType::F32 => (2e-6, 2e-5),
            DType::BF16 => (1e-3, BF16_RTOL),
            _ => (1e-4, F16_RTOL),
        }
    }

    #[test]
    fn cuda_device_is_available() {
        let dev = cuda();
        let t = Tensor::new(&[1f32, 2., 3.], &dev).unwrap();
        assert_eq!(t.sum_all().unwrap().to_scalar::<f32>().unwrap(), 6.0);
    }

    #[test]
    fn silu_mul_cuda_matches_cpu() {
        let gpu = cuda();
        let mut rng = rng("silu_mul_cuda_matches_cpu");
        for dtype in DTYPES {
            for shape in [&[1usize, 1, 14336][..], &[3, 37], &[1], &[4, 1_000_001]] {
                let g = rand_tensor(&mut rng, shape, 8.0, dtype, &Device::Cpu);
                let u = rand_tensor(&mut rng, shape, 4.0, dtype, &Device::Cpu);
                let want = silu_mul(&g, &u).unwrap();
                let got = silu_mul(&g.to_device(&gpu).unwrap(), &u.to_device(&gpu).unwrap()).unwrap();
                assert!(got.device().is_cuda());
                let (atol, rtol) = gpu_tol(dtype);
                assert_close(&format!("cuda silu_mul {dtype:?} {shape:?}"), &got, &want, atol, rtol);
            }
        }
    }

    #[test]
    fn add_rms_norm_cuda_matches_cpu() {
        let gpu = cuda();
        let mut rng = rng("add_rms_norm_cuda_matches_cpu");
        for dtype in DTYPES {
            for shape in [&[1usize, 1, 4096][..], &[1, 7, 64], &[3, 100], &[33], &[2, 3, 5120]] {
                let x = rand_tensor(&mut rng, shape, 3.0, dtype, &Device::Cpu);
                let r = rand_tensor(&mut rng, shape, 3.0, dtype, &Device::Cpu);
                let w = rand_tensor(&mut rng, &shape[shape.len() - 1..], 2.0, dtype, &Device::Cpu);
                let (sum, normed) = add_rms_norm(&x, &r, &w, 1e-5).unwrap();
                let (gs, gn) = add_rms_norm(
                    &x.to_device(&gpu).unwrap(),
                    &r.to_device(&gpu).unwrap(),
                    &w.to_device(&gpu).unwrap(),
                    1e-5,
                )
                .unwrap();
                assert_eq!(to_vec_f32(&gs), to_vec_f32(&sum), "cuda sum {dtype:?} {shape:?}");
                let (atol, rtol) = gpu_tol(dtype);
                assert_close(&format!("cuda add_rms_norm {dtype:?} {shape:?}"), &gn, &normed, atol, rtol);
            }
        }
    }

    #[test]
    fn decode_attention_cuda_matches_cpu() {
        let gpu = cuda();
        let mut rng = rng("decode_attention_cuda_matches_cpu");
        for dtype in DTYPES {
            for c in ATTN_CASES {
                let (q, k, v) = attn_inputs(c, &mut rng, dtype, &Device::Cpu);
                let scale = 1.0 / (c.d as f64).sqrt();
                let want = decode_attention(&q, &k, &v, c.kv_len, c.window, scale).unwrap();
                let (gq, gk, gv) = (q.to_device(&gpu).unwrap(), k.to_device(&gpu).unwrap(), v.to_device(&gpu).unwrap());
                let got = decode_attention(&gq, &gk, &gv, c.kv_len, c.window, scale).unwrap();
                let (atol, rtol) = gpu_tol(dtype);
                let what = format!("cuda decode_attention {dtype:?} b{} h{} kvh{} d{} kv{} w{:?}", c.b, c.h, c.kvh, c.d, c.kv_len, c.window);
                assert_close(&what, &got, &want, atol.max(2e-6), rtol);
                // Strided views of the cache on the GPU too.
                let got = decode_attention(&gq, &gk.narrow(2, 0, c.kv_len).unwrap(), &gv.narrow(2, 0, c.kv_len).unwrap(), c.kv_len, c.window, scale).unwrap();
                assert_close(&format!("{what} (narrowed)"), &got, &want, atol.max(2e-6), rtol);
            }
        }
    }

    #[test]
    fn decode_attention_cuda_transposed_cache() {
        let gpu = cuda();
        let mut rng = rng("decode_attention_cuda_transposed_cache");
        let (b, h, kvh, d, cap, kv_len) = (1, 32, 8, 128, 2048, 2000);
        let q = rand_tensor(&mut rng, &[b, h, 1, d], 2.0, DType::BF16, &Device::Cpu);
        let ks = rand_tensor(&mut rng, &[b, cap, kvh, d], 2.0, DType::BF16, &Device::Cpu);
        let vs = rand_tensor(&mut rng, &[b, cap, kvh, d], 2.0, DType::BF16, &Device::Cpu);
        let scale = 1.0 / (d as f64).sqrt();
        let want = decode_attention(&q, &ks.transpose(1, 2).unwrap(), &vs.transpose(1, 2).unwrap(), kv_len, Some(1024), scale).unwrap();
        let (gk, gv) = (ks.to_device(&gpu).unwrap(), vs.to_device(&gpu).unwrap());
        let got = decode_attention(&q.to_device(&gpu).unwrap(), &gk.transpose(1, 2).unwrap(), &gv.transpose(1, 2).unwrap(), kv_len, Some(1024), scale).unwrap();
        assert_close("cuda transposed cache", &got, &want, 1e-3, BF16_RTOL);
    }

    fn time_us(dev: &Device, iters: usize, mut f: impl FnMut()) -> f64 {
        for _ in 0..3 {
            f();
        }
        dev.synchronize().unwrap();
        let t0 = std::time::Instant::now();
        for _ in 0..iters {
            f();
        }
        dev.synchronize().unwrap();
        t0.elapsed().as_secs_f64() * 1e6 / iters as f64
    }

    /// Not a check: prints `PROBE ...` lines (device copy bandwidth, fused
    /// kernels vs the unfused candle ops) for scripts/gpu-check.sh.
    /// Run: `<lib test binary> --ignored --exact kernels::tests::gpu::bench_probe --nocapture`.
    #[test]
    #[ignore]
    fn bench_probe() {
        let gpu = cuda();
        let bf = DType::BF16;
        // Device-to-device copy: reads + writes 512 MiB each.
        let n = 256 << 20;
        let big = Tensor::zeros(n, bf, &gpu).unwrap();
        let us = time_us(&gpu, 20, || {
            let _ = big.copy().unwrap();
        });
        let gbps = 2.0 * (n * 2) as f64 / (us * 1e-6) / 1e9;
        println!("PROBE copy_bf16 {gbps:.0} GB/s ({us:.0} us per 512 MiB copy)");
        drop(big);

        let mut rng = rng("bench_probe");
        let g = rand_tensor(&mut rng, &[1, 1, 14336], 4.0, bf, &gpu);
        let u = rand_tensor(&mut rng, &[1, 1, 14336], 4.0, bf, &gpu);
        let fused = time_us(&gpu, 200, || {
            let _ = silu_mul(&g, &u).unwrap();
        });
        let plain = time_us(&gpu, 200, || {
            let _ = (g.silu().unwrap() * &u).unwrap();
        });
        println!("PROBE silu_mul_14336 fused {fused:.1} us, unfused {plain:.1} us");

        let x = rand_tensor(&mut rng, &[1, 1, 4096], 2.0, bf, &gpu);
        let r = rand_tensor(&mut rng, &[1, 1, 4096], 2.0, bf, &gpu);
        let w = rand_tensor(&mut rng, &[4096], 1.0, bf, &gpu);
        let fused = time_us(&gpu, 200, || {
            let _ = add_rms_norm(&x, &r, &w, 1e-5).unwrap();
        });
        let plain = time_us(&gpu, 200, || {
            let s = (&x + &r).unwrap();
            let _ = candle_nn::ops::rms_norm(&s, &w, 1e-5).unwrap();
        });
        println!("PROBE add_rms_norm_4096 fused {fused:.1} us, unfused {plain:.1} us");

        let (h, kvh, d, cap) = (32, 8, 128, 8192);
        let q = rand_tensor(&mut rng, &[1, h, 1, d], 2.0, bf, &gpu);
        let k = rand_tensor(&mut rng, &[1, kvh, cap, d], 2.0, bf, &gpu);
        let v = rand_tensor(&mut rng, &[1, kvh, cap, d], 2.0, bf, &gpu);
        let scale = 1.0 / (d as f64).sqrt();
        for kv_len in [512usize, 4096, 8192] {
            let fused = time_us(&gpu, 100, || {
                let _ = decode_attention(&q, &k, &v, kv_len, Some(4096), scale).unwrap();
            });
            let plain = time_us(&gpu, 100, || {
                let start = kv_len.saturating_sub(4096);
                let n = kv_len - start;
                let rep = |t: &Tensor| {
                    t.narrow(2, start, n).unwrap().unsqueeze(2).unwrap().expand((1, kvh, h / kvh, n, d)).unwrap().reshape((1, h, n, d)).unwrap()
                };
                let (kk, vv) = (rep(&k), rep(&v));
                let att = (q.matmul(&kk.t().unwrap()).unwrap() * scale).unwrap();
                let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
                let _ = att.matmul(&vv).unwrap();
            });
            let bytes = 2.0 * (kvh * kv_len.min(4096) * d * 2) as f64;
            let gbps = bytes / (fused * 1e-6) / 1e9;
            println!("PROBE decode_attention_kv{kv_len} fused {fused:.1} us ({gbps:.0} GB/s of KV), unfused {plain:.1} us");
        }
    }
}
