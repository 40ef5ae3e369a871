//! CUDA kernels against their CPU implementations, each launched through its launcher on fresh
//! random inputs (run under compute-sanitizer by scripts/gpu-check.sh). They need a CUDA device and
//! fail without one.

use super::*;
use crate::kernels::cuda::{tensor_ptr, AttnLaunch, CudaKernels, DevPtr};

fn cuda() -> Device {
    crate::device::select("cuda").map(|c| c.device).expect("built with --features cuda, but no usable CUDA device (run these tests on a GPU machine: scripts/gpu-check.sh)")
}

fn kernels(dev: &Device, dtype: DType, head_dim: usize) -> CudaKernels {
    let Device::Cuda(c) = dev else { panic!("not a CUDA device") };
    CudaKernels::load(c, dtype, head_dim).unwrap()
}

fn p(t: &Tensor, k: &CudaKernels) -> DevPtr {
    tensor_ptr(t, k.stream()).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    to_vec_f32(&t.to_device(&Device::Cpu).unwrap())
}

/// GPU vs CPU where only the order of f32 sums differs: f32 noise, or one ulp of a half dtype.
fn gpu_tol(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (1e-5, 2e-5),
        DType::BF16 => (1e-2, BF16_RTOL),
        _ => (1e-3, F16_RTOL),
    }
}

#[test]
fn cuda_device_is_available() {
    let dev = cuda();
    let t = Tensor::new(&[1f32, 2., 3.], &dev).unwrap();
    assert_eq!(t.sum_all().unwrap().to_scalar::<f32>().unwrap(), 6.0);
}

/// `w · x` rounded to the dtype on the CPU (the reference for both GEMV kernels).
fn cpu_gemv(w: &Tensor, x: &Tensor) -> Vec<f32> {
    let (rows, _) = w.dims2().unwrap();
    let mut acc = vec![0f32; rows];
    cpu::gemv_rows(&to_vec_f32(x), &to_vec_f32(w), &mut acc);
    acc
}

#[test]
fn gemv_cuda_matches_cpu() {
    let gpu = cuda();
    let mut rng = rng("gemv_cuda_matches_cpu");
    for dtype in DTYPES {
        let k = kernels(&gpu, dtype, 128);
        // Shapes of OpenChat's projections and lm_head, a tied SmolLM head, and rows whose length
        // rules out 16-byte loads.
        for (rows, cols) in [(6144usize, 4096usize), (4096, 14336), (32002, 4096), (49152, 576), (37, 13), (1, 8), (3, 4100)] {
            let w = rand_tensor(&mut rng, &[rows, cols], 1.0, dtype, &Device::Cpu);
            let x = rand_tensor(&mut rng, &[cols], 1.0, dtype, &Device::Cpu);
            let want = Tensor::from_vec(cpu_gemv(&w, &x), rows, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let (gw, gx) = (w.to_device(&gpu).unwrap(), x.to_device(&gpu).unwrap());
            let gy = Tensor::zeros(rows, dtype, &gpu).unwrap();
            k.gemv(p(&gw, &k), p(&gx, &k), p(&gy, &k), rows, cols).unwrap();
            let (atol, rtol) = gpu_tol(dtype);
            assert_close(&format!("gemv {dtype:?} {rows}x{cols}"), &gy.to_device(&Device::Cpu).unwrap(), &want, atol, rtol);
        }
    }
}

#[test]
fn gemv_silu_mul_cuda_matches_cpu() {
    let gpu = cuda();
    let mut rng = rng("gemv_silu_mul_cuda_matches_cpu");
    for dtype in DTYPES {
        let k = kernels(&gpu, dtype, 128);
        for (n, cols) in [(14336usize, 4096usize), (1536, 576), (64, 32), (5, 12)] {
            let w = rand_tensor(&mut rng, &[2 * n, cols], 1.0, dtype, &Device::Cpu);
            let x = rand_tensor(&mut rng, &[cols], 1.0, dtype, &Device::Cpu);
            let want = match dtype {
                DType::F32 => silu_mul_of::<f32>(&cpu_gemv(&w, &x), n),
                DType::BF16 => silu_mul_of::<half::bf16>(&cpu_gemv(&w, &x), n),
                _ => silu_mul_of::<half::f16>(&cpu_gemv(&w, &x), n),
            };
            let (gw, gx) = (w.to_device(&gpu).unwrap(), x.to_device(&gpu).unwrap());
            let gy = Tensor::zeros(n, dtype, &gpu).unwrap();
            k.gemv_silu_mul(p(&gw, &k), p(&gx, &k), p(&gy, &k), n, cols).unwrap();
            let (atol, rtol) = gpu_tol(dtype);
            let want = Tensor::from_vec(want, n, &Device::Cpu).unwrap();
            assert_close(&format!("gemv_silu_mul {dtype:?} {n}x{cols}"), &gy.to_device(&Device::Cpu).unwrap(), &want, atol, 2.0 * rtol);
        }
    }
}

fn silu_mul_of<T: cpu::Elem>(products: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![T::from_f32(0.0); n];
    cpu::silu_mul(products, &mut out);
    out.iter().map(|v| v.to_f32()).collect()
}

#[test]
fn residual_norm_cuda_matches_cpu() {
    let gpu = cuda();
    let mut rng = rng("residual_norm_cuda_matches_cpu");
    for dtype in DTYPES {
        let k = kernels(&gpu, dtype, 128);
        for n in [4096usize, 576, 33, 1] {
            let (x, d, w) = (rand_tensor(&mut rng, &[n], 3.0, dtype, &Device::Cpu), rand_tensor(&mut rng, &[n], 3.0, dtype, &Device::Cpu), rand_tensor(&mut rng, &[n], 2.0, dtype, &Device::Cpu));
            let table = rand_tensor(&mut rng, &[5, n], 3.0, dtype, &Device::Cpu);
            let sum = (&x + &d).unwrap();
            let (gx, gd, gw, gt) = (x.to_device(&gpu).unwrap(), d.to_device(&gpu).unwrap(), w.to_device(&gpu).unwrap(), table.to_device(&gpu).unwrap());
            let gh = Tensor::zeros(n, dtype, &gpu).unwrap();
            let state = Tensor::new(&[3u32, 0, 0, 0], &gpu).unwrap();
            k.residual_norm(p(&gx, &k), p(&gd, &k), 0, p(&state, &k), p(&gw, &k), p(&gh, &k), n, 1e-5).unwrap();
            assert_eq!(host(&gx), to_vec_f32(&sum), "{dtype:?} n{n}: the residual add is one rounding, as on the CPU");
            let (atol, rtol) = gpu_tol(dtype);
            let want = reference_rms_norm(&sum.unsqueeze(0).unwrap(), &w, 1e-5).squeeze(0).unwrap();
            assert_close(&format!("residual_norm {dtype:?} n{n}"), &gh.to_device(&Device::Cpu).unwrap(), &want, atol, rtol);
            // Embedding mode: x = table[state.token].
            k.residual_norm(p(&gx, &k), 0, p(&gt, &k), p(&state, &k), p(&gw, &k), p(&gh, &k), n, 1e-5).unwrap();
            let row = table.narrow(0, 3, 1).unwrap();
            assert_eq!(host(&gx), to_vec_f32(&row), "{dtype:?} n{n}: embedding row");
            let want = reference_rms_norm(&row, &w, 1e-5).squeeze(0).unwrap();
            assert_close(&format!("embed norm {dtype:?} n{n}"), &gh.to_device(&Device::Cpu).unwrap(), &want, atol, rtol);
        }
    }
}

#[test]
fn rope_kv_cuda_matches_cpu_bit_for_bit() {
    let gpu = cuda();
    let mut rng = rng("rope_kv_cuda_matches_cpu_bit_for_bit");
    for dtype in DTYPES {
        for (nh, nkv, d, cap, pos) in [(32usize, 8usize, 128usize, 64usize, 37usize), (4, 2, 8, 16, 0), (9, 3, 64, 8, 7)] {
            let k = kernels(&gpu, dtype, d);
            let qkv = rand_tensor(&mut rng, &[(nh + 2 * nkv) * d], 3.0, dtype, &Device::Cpu);
            let (cos, sin) = rotary(cap, d, dtype);
            let cache = rand_tensor(&mut rng, &[nkv, cap, d], 1.0, dtype, &Device::Cpu);
            let dims = cpu::RopeDims { n_heads: nh, n_kv_heads: nkv, head_dim: d, capacity: cap };
            let args = (to_vec_f32(&qkv), &to_vec_f32(&cos)[pos * d / 2..], &to_vec_f32(&sin)[pos * d / 2..], to_vec_f32(&cache), pos, &dims);
            let [q, kc, vc] = match dtype {
                DType::F32 => cpu_rope_kv::<f32>(args),
                DType::BF16 => cpu_rope_kv::<half::bf16>(args),
                _ => cpu_rope_kv::<half::f16>(args),
            };
            let g = |t: &Tensor| t.to_device(&gpu).unwrap();
            let (gq, gcos, gsin, gk, gv) = (g(&qkv), g(&cos), g(&sin), g(&cache), g(&cache.copy().unwrap()));
            let state = Tensor::new(&[0u32, pos as u32, 0, 0], &gpu).unwrap();
            k.rope_kv(p(&gq, &k), p(&gcos, &k), p(&gsin, &k), p(&gk, &k), p(&gv, &k), p(&state, &k), &dims).unwrap();
            let what = format!("rope_kv {dtype:?} h{nh} kv{nkv} d{d} pos{pos}");
            assert_eq!(host(&gq), q, "{what}: q and k");
            assert_eq!(host(&gk), kc, "{what}: k cache");
            assert_eq!(host(&gv), vc, "{what}: v cache");
        }
    }
}

/// The CPU `rope_kv` in `T` on (qkv, cos row, sin row, cache, pos, dims); returns q/k/v, k cache and
/// v cache as f32.
fn cpu_rope_kv<T: cpu::Elem>((qkv, cos, sin, cache, pos, dims): (Vec<f32>, &[f32], &[f32], Vec<f32>, usize, &cpu::RopeDims)) -> [Vec<f32>; 3] {
    let c = |v: &[f32]| v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>();
    let (mut q, mut k, mut v) = (c(&qkv), c(&cache), c(&cache));
    cpu::rope_kv(&mut q, &c(cos), &c(sin), &mut k, &mut v, pos, dims);
    [q, k, v].map(|x| x.iter().map(|y| y.to_f32()).collect())
}

#[test]
fn argmax_cuda_matches_cpu_ties_included() {
    let gpu = cuda();
    let mut rng = rng("argmax_cuda_matches_cpu_ties_included");
    for dtype in DTYPES {
        let k = kernels(&gpu, dtype, 128);
        for n in [1usize, 31, 32002, 49152] {
            let v: Vec<f32> = (0..n).map(|_| (rng.random_range(-8.0f32..8.0) * 2.0).round() / 2.0).collect();
            let t = Tensor::from_vec(v, n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let want = cpu::argmax(&to_vec_f32(&t));
            let state = Tensor::zeros(4, DType::U32, &gpu).unwrap();
            k.argmax(p(&t.to_device(&gpu).unwrap(), &k), n, p(&state, &k)).unwrap();
            let got = state.to_device(&Device::Cpu).unwrap().to_vec1::<u32>().unwrap()[2];
            assert_eq!(got, want, "argmax {dtype:?} n{n}");
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
            assert_close(&what, &got.to_device(&Device::Cpu).unwrap(), &want, atol.max(2e-6), rtol);
        }
    }
}

#[test]
fn step_attention_reads_its_length_from_device_state() {
    // The decode step's launch: kv_len from state[pos] + 1 and a split count fixed in advance, so
    // that most splits are empty at short lengths (as in a graph captured for the whole context).
    let gpu = cuda();
    let mut rng = rng("step_attention_reads_its_length_from_device_state");
    for dtype in [DType::BF16, DType::F32] {
        let c = AttnCase { b: 1, h: 32, kvh: 8, d: 128, cap: 4096, kv_len: 0, window: Some(1000) };
        let k = kernels(&gpu, dtype, c.d);
        let (q, kc, vc) = attn_inputs(&AttnCase { kv_len: 1, ..c }, &mut rng, dtype, &Device::Cpu);
        let g = |t: &Tensor| t.to_device(&gpu).unwrap();
        let (gq, gk, gv) = (g(&q), g(&kc), g(&vc));
        let splits = crate::kernels::attention_splits(c.cap, c.h);
        let out = Tensor::zeros(c.h * c.d, dtype, &gpu).unwrap();
        let partial = Tensor::zeros(c.h * splits * (c.d + 2), DType::F32, &gpu).unwrap();
        for kv_len in [1usize, 7, 999, 1000, 1001, 4096] {
            let state = Tensor::new(&[0u32, kv_len as u32 - 1, 0, 0], &gpu).unwrap();
            let dims = DecodeAttention::new(kv_len, c.window, 1.0).unwrap().dims(q.layout(), kc.layout(), vc.layout()).unwrap();
            let launch = AttnLaunch {
                q: p(&gq, &k),
                k: p(&gk, &k),
                v: p(&gv, &k),
                out: p(&out, &k),
                partial: p(&partial, &k),
                state: p(&state, &k),
                kv_len: 0,
                window: 1000,
                splits,
                scale: 1.0 / (c.d as f32).sqrt(),
                dims,
            };
            k.attention(&launch).unwrap();
            k.attention_combine(p(&partial, &k), p(&out, &k), &dims, splits).unwrap();
            let want = decode_attention(&q, &kc, &vc, kv_len, c.window, 1.0 / (c.d as f64).sqrt()).unwrap();
            let (atol, rtol) = gpu_tol(dtype);
            let got = out.to_device(&Device::Cpu).unwrap().reshape((1, c.h, 1, c.d)).unwrap();
            assert_close(&format!("step attention {dtype:?} kv{kv_len} splits {splits}"), &got, &want, atol.max(2e-6), rtol);
        }
    }
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

/// Not a check: prints `PROBE ...` lines (the step's kernels on OpenChat's shapes, in GB/s of the
/// bytes they stream) for scripts/gpu-check.sh.
/// Run: `<lib test binary> --ignored --exact kernels::tests::gpu::bench_probe --nocapture`.
#[test]
#[ignore]
fn bench_probe() {
    let gpu = cuda();
    let bf = DType::BF16;
    let k = kernels(&gpu, bf, 128);
    let mut rng = rng("bench_probe");
    for (name, rows, cols) in [("qkv", 6144usize, 4096usize), ("o_proj", 4096, 4096), ("down", 4096, 14336), ("lm_head", 32002, 4096)] {
        let w = rand_tensor(&mut rng, &[rows, cols], 1.0, bf, &gpu);
        let x = rand_tensor(&mut rng, &[cols], 1.0, bf, &gpu);
        let y = Tensor::zeros(rows, bf, &gpu).unwrap();
        let us = time_us(&gpu, 50, || k.gemv(p(&w, &k), p(&x, &k), p(&y, &k), rows, cols).unwrap());
        let gbps = (rows * cols * 2) as f64 / (us * 1e-6) / 1e9;
        println!("PROBE gemv_{name} {us:.1} us ({gbps:.0} GB/s of weights)");
    }
    let w = rand_tensor(&mut rng, &[2 * 14336, 4096], 1.0, bf, &gpu);
    let x = rand_tensor(&mut rng, &[4096], 1.0, bf, &gpu);
    let y = Tensor::zeros(14336, bf, &gpu).unwrap();
    let us = time_us(&gpu, 50, || k.gemv_silu_mul(p(&w, &k), p(&x, &k), p(&y, &k), 14336, 4096).unwrap());
    println!("PROBE gemv_gate_up_silu {us:.1} us ({:.0} GB/s of weights)", (2 * 14336 * 4096 * 2) as f64 / (us * 1e-6) / 1e9);
}

#[test]
fn fill_normal_cuda_matches_cpu() {
    let gpu = cuda();
    for dtype in DTYPES {
        for n in [1usize, 1000, 3 << 20] {
            let (c, g) = (Tensor::zeros(n, dtype, &Device::Cpu).unwrap(), Tensor::zeros(n, dtype, &gpu).unwrap());
            fill_normal(&c, 42, 0.5, 0.02).unwrap();
            fill_normal(&g, 42, 0.5, 0.02).unwrap();
            // Only the last ulp of logf/cosf may differ, and then the rounding to the dtype.
            let (atol, rtol) = gpu_tol(dtype);
            assert_close(&format!("fill_normal {dtype:?} n{n}"), &g.to_device(&Device::Cpu).unwrap(), &c, atol.min(1e-5), rtol);
        }
    }
}
