//! Criterion benchmark of reading one weight from a mapped checkpoint: `Checkpoint::load_weight`
//! (one pass that copies and checks every value finite) against `Checkpoint::load` (candle's plain
//! copy, which is what weights went through before the check). The difference is what the finite
//! check costs on load. `cargo bench --bench load`.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use expanse::loader::{write_safetensors, Checkpoint};

fn weight_read(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("weight_read");
    // 64 MiB of bf16 and of f32: past every cache, like a real projection (4096 × 14336 bf16 is 112 MiB).
    for (dtype, rows) in [(DType::BF16, 8192usize), (DType::F32, 4096)] {
        let shape = [rows, 4096];
        let w = Tensor::randn(0f32, 1.0, &shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let path = dir.path().join(format!("{dtype:?}.safetensors"));
        write_safetensors(&path, &[("w", &w)], None).unwrap();
        let ck = Checkpoint::open(std::slice::from_ref(&path)).unwrap();
        g.throughput(Throughput::Bytes((w.elem_count() * dtype.size_in_bytes()) as u64));
        g.sample_size(20);
        let id = format!("{dtype:?}");
        g.bench_function(BenchmarkId::new("copy", &id), |b| b.iter(|| ck.load("w", &shape, &Device::Cpu).unwrap()));
        g.bench_function(BenchmarkId::new("copy_and_check_finite", &id), |b| b.iter(|| ck.load_weight("w", &shape, &Device::Cpu).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, weight_read);
criterion_main!(benches);
