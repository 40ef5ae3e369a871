//! The CUDA kernels on a CUDA device (run under compute-sanitizer by scripts/gpu-check.sh): the
//! cases of `cuda_kernels` at full size, and what only a device has (candle's storage, timing).
//! They need a CUDA device and fail without one.

use super::cuda_kernels::{self as cases, device_tol, Target};
use super::*;
use crate::kernels::cuda::{tensor_ptr, CudaKernels};
use crate::kernels::launch::{self, AttnLaunch, DevPtr, Launcher};

fn cuda() -> Device {
    crate::device::select("cuda")
        .map(|c| c.device)
        .expect("built with --features cuda, but no usable CUDA device (run these tests on a GPU machine: scripts/gpu-check.sh)")
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
fn gemv_quant_cuda_matches_cpu() {
    cases::gemv_quant(&Cuda(cuda()));
}

#[test]
fn gemv_silu_mul_quant_cuda_matches_cpu() {
    cases::gemv_silu_mul_quant(&Cuda(cuda()));
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

/// The batched step on the GPU, graph and fused: each row's logits are its sequence's bits alone.
#[test]
fn batched_step_rows_are_their_lone_bits() {
    cuda();
    for (fixture, dtype) in [("tiny-mistral-f32", "f32"), ("tiny-mistral-bf16", "bf16")] {
        let dir = format!("{}/tests/fixtures/{fixture}", env!("CARGO_MANIFEST_DIR"));
        let opts = crate::engine::LoadOptions::new(dir).expand("every:4").dtype(dtype).device("cuda");
        let m = crate::engine::load(&opts).unwrap().model;
        for path in [crate::step::DecodePath::Graph, crate::step::DecodePath::Fused] {
            let o = crate::step::StepOptions::default();
            crate::step::batch_check::rows_are_their_lone_bits(&m, path, &o, &o);
        }
    }
}

#[test]
fn step_attention_batches_rows_over_their_slots() {
    cases::step_attention_batches_rows_over_their_slots(&Cuda(cuda()));
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

/// Copies of a weight that a rotating probe cycles through: at least 256 MiB, over four times an
/// H200's 60 MB L2, so that each timed launch reads its weights from HBM, not from the L2 the
/// previous launches left them in.
fn rotation(bytes: usize) -> usize {
    (256usize << 20).div_ceil(bytes).max(2)
}

/// Not a check: prints `PROBE ...` lines (the step's kernels on OpenChat's shapes, in GB/s of the
/// bytes they must move, and as a share of the device-to-device copy bandwidth measured here, which
/// counts bytes read and written) for scripts/gpu-check.sh. Every launch reads weights (or a KV
/// cache) other than the previous launches', cycling through `rotation` copies.
/// Run: `<lib test binary> --ignored --exact kernels::tests::gpu::bench_probe --nocapture`.
#[test]
#[ignore]
fn bench_probe() {
    let t = Cuda(cuda());
    let (gpu, bf) = (t.device(), DType::BF16);
    let k = t.kernels(bf, 128);
    let copy = crate::device::copy_bandwidth(&gpu).unwrap().expect("a CUDA device measures its copy bandwidth");
    println!("PROBE copy_bandwidth {:.0} GB/s (read + write)", copy / 1e9);
    let mut rng = rng("bench_probe");
    let report = |name: &str, us: f64, bytes: usize, copies: usize| {
        let bps = bytes as f64 / (us * 1e-6);
        println!(
            "PROBE {name} {us:.1} us ({:.0} GB/s of {:.1} MB, {:.0}% of copy bandwidth; {copies} copies rotated)",
            bps / 1e9,
            bytes as f64 / 1e6,
            100.0 * bps / copy
        );
    };
    let weights = |rows: usize, cols: usize, copies: usize| -> Vec<Tensor> {
        (0..copies)
            .map(|c| {
                let w = Tensor::zeros((rows, cols), bf, &gpu).unwrap();
                fill_normal(&w, 7 + c as u64, 0.0, 0.02).unwrap();
                w
            })
            .collect()
    };
    for (name, rows, cols) in [("qkv", 6144usize, 4096usize), ("o_proj", 4096, 4096), ("down", 4096, 14336), ("lm_head", 32002, 4096)] {
        let copies = rotation(rows * cols * 2);
        let ws = weights(rows, cols, copies);
        let x = rand_tensor(&mut rng, &[cols], 1.0, bf, &gpu);
        let y = Tensor::zeros(rows, bf, &gpu).unwrap();
        let ls: Vec<_> = ws.iter().map(|w| launch::gemv(t.ptr(w), t.ptr(&x), t.ptr(&y), rows, cols, 1).unwrap()).collect();
        let mut i = 0;
        let us = time_us(&gpu, 50, || {
            k.launch(&ls[i % copies]).unwrap();
            i += 1;
        });
        report(&format!("gemv_{name}"), us, rows * cols * 2, copies);
    }
    let (n, cols) = (14336usize, 4096usize);
    let copies = rotation(2 * n * cols * 2);
    let ws = weights(2 * n, cols, copies);
    let x = rand_tensor(&mut rng, &[cols], 1.0, bf, &gpu);
    let y = Tensor::zeros(n, bf, &gpu).unwrap();
    let ls: Vec<_> = ws.iter().map(|w| launch::gemv_silu_mul(t.ptr(w), t.ptr(&x), t.ptr(&y), n, cols, 1).unwrap()).collect();
    let mut i = 0;
    let us = time_us(&gpu, 50, || {
        k.launch(&ls[i % copies]).unwrap();
        i += 1;
    });
    report("gemv_gate_up_silu", us, 2 * n * cols * 2, copies);

    // The Q4_K GEMVs (gemv_quant.cu) on the down and gate/up shapes, in GB/s of the blocks they read:
    // random weights quantized once on the CPU, uploaded as many times as the rotation needs.
    let q4k = |rows: usize, cols: usize| {
        let w = Tensor::randn(0f32, 0.02, (rows, cols), &Device::Cpu).unwrap();
        let bytes = crate::quant::QMatrix::quantize("probe", &w, crate::quant::QuantType::Q4K, &Device::Cpu).unwrap().row_bytes().unwrap();
        let n = bytes.len();
        let host = Tensor::from_vec(bytes, n, &Device::Cpu).unwrap();
        let copies = rotation(n);
        ((0..copies).map(|_| t.upload(&host)).collect::<Vec<_>>(), n)
    };
    let kq = crate::quant::QuantType::Q4K.kernel();
    let (ws, bytes) = q4k(4096, 14336);
    let (x, y) = (rand_tensor(&mut rng, &[14336], 1.0, bf, &gpu), Tensor::zeros(4096, bf, &gpu).unwrap());
    let ls: Vec<_> = ws.iter().map(|w| launch::gemv_quant(kq, t.ptr(w), t.ptr(&x), t.ptr(&y), 4096, 14336, 1, 4096).unwrap()).collect();
    let mut i = 0;
    let us = time_us(&gpu, 50, || {
        k.launch(&ls[i % ls.len()]).unwrap();
        i += 1;
    });
    report("gemv_q4_k_down", us, bytes, ls.len());
    let (ws, bytes) = q4k(2 * n, cols);
    let (x, y) = (rand_tensor(&mut rng, &[cols], 1.0, bf, &gpu), Tensor::zeros(n, bf, &gpu).unwrap());
    let ls: Vec<_> = ws.iter().map(|w| launch::gemv_silu_mul_quant(kq, t.ptr(w), t.ptr(&x), t.ptr(&y), n, cols, 1).unwrap()).collect();
    let mut i = 0;
    let us = time_us(&gpu, 50, || {
        k.launch(&ls[i % ls.len()]).unwrap();
        i += 1;
    });
    report("gemv_q4_k_gate_up_silu", us, bytes, ls.len());

    // Decode attention at 4,096 tokens as the step launches it (splits sized by the capacity), over
    // as many layers' caches as make 256 MiB.
    let (h, kvh, d, ctx) = (32usize, 8usize, 128usize, 4096usize);
    let kv_bytes = 2 * kvh * ctx * d * 2;
    let copies = rotation(kv_bytes);
    let caches: Vec<(Tensor, Tensor)> = (0..copies).map(|_| (weights(kvh * ctx, d, 1).remove(0), weights(kvh * ctx, d, 1).remove(0))).collect();
    let q = rand_tensor(&mut rng, &[h * d], 1.0, bf, &gpu);
    let out = Tensor::zeros(h * d, bf, &gpu).unwrap();
    let dims = AttnDims {
        b: 1,
        n_heads: h,
        n_kv_heads: kvh,
        head_dim: d,
        kv_start: 0,
        kv_end: ctx,
        q_sb: h * d,
        q_sh: d,
        k_sb: kvh * ctx * d,
        k_sh: ctx * d,
        k_ss: d,
        v_sb: kvh * ctx * d,
        v_sh: ctx * d,
        v_ss: d,
    };
    let splits = launch::attention_splits(ctx, launch::attention_blocks_per_split(1, h, kvh));
    let scratch = Tensor::zeros(launch::attention_scratch_words(&dims, splits), DType::F32, &gpu).unwrap();
    let ls: Vec<_> = caches
        .iter()
        .map(|(kc, vc)| {
            let a = AttnLaunch {
                q: t.ptr(&q),
                k: t.ptr(kc),
                v: t.ptr(vc),
                out: t.ptr(&out),
                partial: t.ptr(&scratch),
                state: 0,
                kv_len: ctx,
                window: 0,
                splits,
                scale: 1.0 / (d as f32).sqrt(),
                dims,
                scratch_batch: dims.b,
            };
            launch::attention(&a).unwrap()
        })
        .collect();
    let mut i = 0;
    let us = time_us(&gpu, 50, || {
        k.launch(&ls[i % copies]).unwrap();
        i += 1;
    });
    report(&format!("attention_ctx{ctx}_splits{splits}"), us, kv_bytes, copies);
}
