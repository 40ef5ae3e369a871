//! The CUDA kernels on a CUDA device (run under compute-sanitizer by scripts/gpu-check.sh): the
//! cases of `cuda_kernels` at full size, and what only a device has (candle's storage, timing).
//! They need a CUDA device and fail without one.

use super::cuda_kernels::{self as cases, device_tol, Target};
use super::*;
use crate::kernels::cuda::{tensor_ptr, CudaKernels};
use crate::kernels::launch::{self, DevPtr, Launcher};

fn cuda() -> Device {
    crate::device::select("cuda").map(|c| c.device).expect("built with --features cuda, but no usable CUDA device (run these tests on a GPU machine: scripts/gpu-check.sh)")
}

struct Cuda(Device);

impl Target for Cuda {
    type K = CudaKernels;

    fn device(&self) -> Device {
        self.0.clone()
    }

    fn kernels(&self, dtype: DType, head_dim: usize) -> CudaKernels {
        let Device::Cuda(c) = &self.0 else { panic!("not a CUDA device") };
        CudaKernels::load(c, dtype, head_dim).unwrap()
    }

    fn ptr(&self, t: &Tensor) -> DevPtr {
        let Device::Cuda(c) = &self.0 else { panic!("not a CUDA device") };
        tensor_ptr(t, &c.cuda_stream()).unwrap()
    }

    fn upload(&self, t: &Tensor) -> Tensor {
        t.to_device(&self.0).unwrap()
    }

    fn full_size(&self) -> bool {
        true
    }
}

#[test]
fn cuda_device_is_available() {
    let dev = cuda();
    let t = Tensor::new(&[1f32, 2., 3.], &dev).unwrap();
    assert_eq!(t.sum_all().unwrap().to_scalar::<f32>().unwrap(), 6.0);
}

#[test]
fn gemv_cuda_matches_cpu() {
    cases::gemv(&Cuda(cuda()));
}

#[test]
fn gemv_silu_mul_cuda_matches_cpu() {
    cases::gemv_silu_mul(&Cuda(cuda()));
}

#[test]
fn residual_norm_cuda_matches_cpu() {
    cases::residual_norm(&Cuda(cuda()));
}

#[test]
fn rope_kv_cuda_matches_cpu_bit_for_bit() {
    cases::rope_kv_bit_for_bit(&Cuda(cuda()));
}

#[test]
fn argmax_cuda_matches_cpu_ties_included() {
    cases::argmax_ties_included(&Cuda(cuda()));
}

#[test]
fn decode_attention_launches_cuda_match_cpu() {
    cases::decode_attention_launches(&Cuda(cuda()));
}

#[test]
fn step_attention_reads_its_length_from_device_state() {
    cases::step_attention_reads_its_length_from_device_state(&Cuda(cuda()));
}

#[test]
fn random_normal_cuda_matches_cpu() {
    cases::random_normal(&Cuda(cuda()));
}

/// The candle op on CUDA storage (`kernels::decode_attention`), as the reference path calls it.
#[test]
fn decode_attention_op_cuda_matches_cpu() {
    let gpu = cuda();
    let mut rng = rng("decode_attention_op_cuda_matches_cpu");
    for dtype in DTYPES {
        for c in ATTN_CASES {
            let (q, k, v) = attn_inputs(c, &mut rng, dtype, &Device::Cpu);
            let scale = 1.0 / (c.d as f64).sqrt();
            let want = decode_attention(&q, &k, &v, c.kv_len, c.window, scale).unwrap();
            let (gq, gk, gv) = (q.to_device(&gpu).unwrap(), k.to_device(&gpu).unwrap(), v.to_device(&gpu).unwrap());
            let got = decode_attention(&gq, &gk, &gv, c.kv_len, c.window, scale).unwrap();
            let (atol, rtol) = device_tol(dtype);
            let what = format!("cuda decode_attention {dtype:?} b{} h{} kvh{} d{} kv{} w{:?}", c.b, c.h, c.kvh, c.d, c.kv_len, c.window);
            assert_close(&what, &got.to_device(&Device::Cpu).unwrap(), &want, atol.max(2e-6), rtol);
        }
    }
}

/// The candle op on CUDA storage (`kernels::fill_normal`), as synthetic weights are made.
#[test]
fn fill_normal_cuda_matches_cpu() {
    let gpu = cuda();
    for dtype in DTYPES {
        for n in [1usize, 1000, 3 << 20] {
            let (c, g) = (Tensor::zeros(n, dtype, &Device::Cpu).unwrap(), Tensor::zeros(n, dtype, &gpu).unwrap());
            fill_normal(&c, 42, 0.5, 0.02).unwrap();
            fill_normal(&g, 42, 0.5, 0.02).unwrap();
            let (atol, rtol) = device_tol(dtype);
            assert_close(&format!("fill_normal {dtype:?} n{n}"), &g.to_device(&Device::Cpu).unwrap(), &c, atol.min(1e-5), rtol);
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
    let t = Cuda(cuda());
    let (gpu, bf) = (t.device(), DType::BF16);
    let k = t.kernels(bf, 128);
    let mut rng = rng("bench_probe");
    for (name, rows, cols) in [("qkv", 6144usize, 4096usize), ("o_proj", 4096, 4096), ("down", 4096, 14336), ("lm_head", 32002, 4096)] {
        let w = rand_tensor(&mut rng, &[rows, cols], 1.0, bf, &gpu);
        let x = rand_tensor(&mut rng, &[cols], 1.0, bf, &gpu);
        let y = Tensor::zeros(rows, bf, &gpu).unwrap();
        let l = launch::gemv(t.ptr(&w), t.ptr(&x), t.ptr(&y), rows, cols).unwrap();
        let us = time_us(&gpu, 50, || k.launch(&l).unwrap());
        let gbps = (rows * cols * 2) as f64 / (us * 1e-6) / 1e9;
        println!("PROBE gemv_{name} {us:.1} us ({gbps:.0} GB/s of weights)");
    }
    let w = rand_tensor(&mut rng, &[2 * 14336, 4096], 1.0, bf, &gpu);
    let x = rand_tensor(&mut rng, &[4096], 1.0, bf, &gpu);
    let y = Tensor::zeros(14336, bf, &gpu).unwrap();
    let l = launch::gemv_silu_mul(t.ptr(&w), t.ptr(&x), t.ptr(&y), 14336, 4096).unwrap();
    let us = time_us(&gpu, 50, || k.launch(&l).unwrap());
    println!("PROBE gemv_gate_up_silu {us:.1} us ({:.0} GB/s of weights)", (2 * 14336 * 4096 * 2) as f64 / (us * 1e-6) / 1e9);
}
