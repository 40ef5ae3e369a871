//! Criterion micro-benchmarks of the hot path: the CPU GEMV and prompt GEMM against candle's matmul,
//! prompt attention and the fused MLP up-projection against the candle ops they replace, one decode
//! step and one prefill of the tiny fixture and of a mid-size random model (SmolLM2-135M shapes).
//! `cargo bench --bench forward [-- FILTER]`; set RAYON_NUM_THREADS to fix the thread count.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use expanse::engine::{ids_tensor, load_synthetic, LoadOptions};
use expanse::model::{Cache, Logits, Model};

fn manifest(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p).display().to_string()
}

fn gemv(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemv");
    for (out, inp) in [(192, 576), (960, 576), (3072, 576), (576, 1536), (49152, 576)] {
        for dtype in [DType::F32, DType::BF16] {
            let w = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu).and_then(|t| t.to_dtype(dtype)).unwrap();
            let x = Tensor::randn(0f32, 1.0, (1, inp), &Device::Cpu).and_then(|t| t.to_dtype(dtype)).unwrap();
            let id = format!("{dtype:?}/{out}x{inp}");
            g.bench_function(BenchmarkId::new("expanse", &id), |b| b.iter(|| expanse::kernels::gemv(&x, &w).unwrap().unwrap()));
            let wt = w.t().unwrap();
            g.bench_function(BenchmarkId::new("candle_matmul", &id), |b| b.iter(|| x.matmul(&wt).unwrap()));
        }
    }
    g.finish();
}

/// Decode batches `[m, in] · [out, in]ᵀ` of `serve --parallel` (m sequences, one row each; SmolLM2-135M's
/// projections and lm_head): the batch-invariant GEMV (each row the bits it gets alone) against the
/// prompt GEMM on the same rows (not batch-invariant: the ceiling it is measured against).
fn gemv_batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemv_batch");
    g.sample_size(10).measurement_time(std::time::Duration::from_secs(2));
    for m in [2, 4, 16] {
        for (out, inp) in [(960, 576), (3072, 576), (576, 1536), (32002, 576)] {
            for dtype in [DType::F32, DType::BF16] {
                let w = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu).and_then(|t| t.to_dtype(dtype)).unwrap();
                let x = Tensor::randn(0f32, 1.0, (m, inp), &Device::Cpu).and_then(|t| t.to_dtype(dtype)).unwrap();
                let id = format!("{dtype:?}/{m}x{out}x{inp}");
                g.bench_function(BenchmarkId::new("expanse", &id), |b| b.iter(|| expanse::kernels::gemv_batch(&x, &w).unwrap().unwrap()));
                g.bench_function(BenchmarkId::new("gemm", &id), |b| b.iter(|| expanse::kernels::gemm(&x, &w).unwrap().unwrap()));
            }
        }
    }
    g.finish();
}

/// Prompt-shaped products `[m, in] · [out, in]ᵀ` (SmolLM2-135M's projections at 128 and 512
/// tokens): expanse's blocked GEMM against candle's matmul (bf16: what `Linear` did before, widening
/// the view to f32 first).
fn gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm");
    g.sample_size(10).measurement_time(std::time::Duration::from_secs(3));
    for m in [128, 512] {
        for (out, inp) in [(192, 576), (576, 576), (960, 576), (1536, 576), (576, 1536)] {
            for dtype in [DType::F32, DType::BF16] {
                let w = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu).and_then(|t| t.to_dtype(dtype)).unwrap();
                let x = Tensor::randn(0f32, 1.0, (m, inp), &Device::Cpu).and_then(|t| t.to_dtype(dtype)).unwrap();
                let id = format!("{dtype:?}/{m}x{out}x{inp}");
                g.bench_function(BenchmarkId::new("expanse", &id), |b| b.iter(|| expanse::kernels::gemm(&x, &w).unwrap().unwrap()));
                g.bench_function(BenchmarkId::new("candle_matmul", &id), |b| {
                    b.iter(|| {
                        if dtype == DType::BF16 {
                            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                            f(&x).matmul(&f(&w).t().unwrap()).unwrap().to_dtype(DType::BF16).unwrap()
                        } else {
                            x.matmul(&w.t().unwrap()).unwrap()
                        }
                    })
                });
            }
        }
    }
    g.finish();
}

/// Prompt attention over 512 positions (SmolLM2-135M heads) and the fused MLP up-projection at 128
/// rows: expanse's kernels against the composed candle ops they replace (scores materialised with an
/// additive mask; two projections, SiLU and the product).
fn prompt(c: &mut Criterion) {
    let mut g = c.benchmark_group("prompt");
    g.sample_size(10).measurement_time(std::time::Duration::from_secs(3));
    let rand = |shape: &[usize], dtype| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).and_then(|t| t.to_dtype(dtype)).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let (q, k, v) = (rand(&[1, 9, 512, 64], dtype), rand(&[1, 3, 512, 64], dtype), rand(&[1, 3, 512, 64], dtype));
        g.bench_function(BenchmarkId::new("attention_512/expanse", format!("{dtype:?}")), |b| {
            b.iter(|| expanse::kernels::prompt_attention(&q, &k, &v, None, 0.125).unwrap())
        });
        let mask: Vec<f32> = (0..512 * 512).map(|i| if i % 512 <= i / 512 { 0.0 } else { f32::NEG_INFINITY }).collect();
        let mask = Tensor::from_vec(mask, (512, 512), &Device::Cpu).and_then(|m| m.to_dtype(dtype)).unwrap();
        g.bench_function(BenchmarkId::new("attention_512/candle_ops", format!("{dtype:?}")), |b| {
            b.iter(|| {
                let q = q.reshape((1, 3, 3 * 512, 64)).unwrap();
                let s = (q.matmul(&k.t().unwrap()).unwrap() * 0.125).unwrap().reshape((1, 9, 512, 512)).unwrap();
                let s = s.broadcast_add(&mask).unwrap().to_dtype(DType::F32).unwrap();
                let p = candle_nn::ops::softmax_last_dim(&s).unwrap().to_dtype(dtype).unwrap().reshape((1, 3, 3 * 512, 512)).unwrap();
                p.matmul(&v).unwrap()
            })
        });
        let (x, w) = (rand(&[128, 576], dtype), rand(&[3072, 576], dtype));
        g.bench_function(BenchmarkId::new("swiglu_128x1536x576/expanse", format!("{dtype:?}")), |b| {
            b.iter(|| expanse::kernels::swiglu(&x, &w).unwrap().unwrap())
        });
        let (wg, wu) = (w.narrow(0, 0, 1536).unwrap(), w.narrow(0, 1536, 1536).unwrap());
        g.bench_function(BenchmarkId::new("swiglu_128x1536x576/gemm_and_ops", format!("{dtype:?}")), |b| {
            b.iter(|| {
                let gate = expanse::kernels::gemm(&x, &wg).unwrap().unwrap();
                let up = expanse::kernels::gemm(&x, &wu).unwrap().unwrap();
                (gate.to_dtype(DType::F32).unwrap().silu().unwrap().to_dtype(dtype).unwrap() * up).unwrap()
            })
        });
    }
    g.finish();
}

fn model(spec: &str, dtype: &str) -> Model {
    let opts = LoadOptions::new(spec).expand("none").dtype(dtype);
    load_synthetic(spec, &opts, &Device::Cpu).unwrap().1
}

fn steps(c: &mut Criterion) {
    let mut g = c.benchmark_group("model");
    g.sample_size(10);
    for (name, spec) in
        [("tiny", manifest("tests/fixtures/tiny-mistral-f32/config.json")), ("smollm2-135m", manifest("benches/compare/smollm2-135m-mistral.json"))]
    {
        for dtype in ["f32", "bf16"] {
            let m = model(&spec, dtype);
            let id = format!("{name}/{dtype}");
            // One decode step after 64 tokens of context.
            let mut cache = Cache::new(&m, 65).unwrap();
            let ctx: Vec<u32> = (0..64).collect();
            m.forward(&ids_tensor(&ctx, &m.device).unwrap(), &mut cache, Logits::Last).unwrap();
            let one = ids_tensor(&[5], &m.device).unwrap();
            g.bench_function(BenchmarkId::new("decode_step", &id), |b| {
                b.iter(|| {
                    cache.truncate(64);
                    m.forward(&one, &mut cache, Logits::Last).unwrap()
                })
            });
            // The MLP block of one layer on one row (decode) — gate/up/down GEMVs and SiLU.
            let x = Tensor::randn(0f32, 1.0, (1, 1, m.config.hidden_size), &Device::Cpu).and_then(|t| t.to_dtype(m.dtype)).unwrap();
            g.bench_function(BenchmarkId::new("mlp_decode", &id), |b| b.iter(|| candle_core::Module::forward(&m.blocks[0].mlp, &x).unwrap()));
            // Decode attention over 512 cached positions (the fused CPU kernel the f32 path uses).
            let (nh, nkv, d) = (m.config.num_attention_heads, m.config.num_key_value_heads, m.config.head_dim);
            let q = Tensor::randn(0f32, 1.0, (1, nh, 1, d), &Device::Cpu).and_then(|t| t.to_dtype(m.dtype)).unwrap();
            let kv = Tensor::randn(0f32, 1.0, (1, nkv, 512, d), &Device::Cpu).and_then(|t| t.to_dtype(m.dtype)).unwrap();
            g.bench_function(BenchmarkId::new("attention_decode_512", &id), |b| {
                b.iter(|| expanse::kernels::decode_attention(&q, &kv, &kv, 512, None, 0.125).unwrap())
            });
            let prompt = ids_tensor(&(0..64).collect::<Vec<u32>>(), &m.device).unwrap();
            g.bench_function(BenchmarkId::new("prefill64", &id), |b| {
                b.iter(|| {
                    let mut cache = Cache::new(&m, 64).unwrap();
                    m.forward(&prompt, &mut cache, Logits::Last).unwrap()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, gemv, gemv_batch, gemm, prompt, steps);
criterion_main!(benches);
