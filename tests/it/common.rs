//! Shared helpers: fixture paths, loading, running the binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use expanse::engine::{self, LoadOptions, Loaded};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn fixture(name: &str) -> String {
    fixtures().join(name).display().to_string()
}

pub fn load(model: &str, expand: &str, dtype: &str) -> Loaded {
    engine::load(&LoadOptions::new(fixture(model)).expand(expand).dtype(dtype)).unwrap()
}

/// (input_ids, logits [s, vocab] f32) of a reference file.
pub fn reference(name: &str) -> (Vec<u32>, Tensor) {
    expanse::logits::read(&fixtures().join(name)).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Bitwise equality of two tensors (as raw bytes), the strongest notion of "the same".
pub fn bit_identical(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims()
        && a.dtype() == b.dtype()
        && expanse::loader::tensor_bytes(&a.to_device(&Device::Cpu).unwrap()).unwrap()
            == expanse::loader::tensor_bytes(&b.to_device(&Device::Cpu).unwrap()).unwrap()
}

/// Equality that treats −0.0 and +0.0 as the same value (mergekit's zero scaling makes −0.0).
pub fn value_identical(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims()
        && a.to_dtype(DType::F32).unwrap().eq(&b.to_dtype(DType::F32).unwrap()).unwrap().min_all().unwrap().to_scalar::<u8>().unwrap()
            == 1
}

/// The binary under test. `EXPANSE_BIN` overrides Cargo's path: with a target directory shared between
/// checkouts, `target/release/expanse` can be another checkout's build by the time the tests run.
pub fn bin() -> String {
    std::env::var("EXPANSE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_expanse").to_string())
}

/// `expanse ARGS` without colour and without network access to the hub (tests may change the env).
pub fn command(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args).env("NO_COLOR", "1").env("HF_HUB_OFFLINE", "1");
    c
}

pub fn expanse(args: &[&str]) -> Output {
    command(args).output().unwrap()
}

pub fn argmax(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32).unwrap().argmax(candle_core::D::Minus1).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap()
}

/// One unit in the last place of `v` in bf16 (8 significant bits).
pub fn bf16_ulp(v: f32) -> f32 {
    2f32.powi(v.abs().max(f32::MIN_POSITIVE).log2().floor() as i32 - 7)
}

/// Top-1 of `got` equals `want`'s wherever `want`'s top-2 margin exceeds `ulps` bf16 ulps of its top
/// logit (a nearer tie may go either way under any rounding); returns that margin.
pub fn top1_agrees(got: &Tensor, want: &Tensor, ulps: f32) -> Result<f32, String> {
    let w = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut order: Vec<usize> = (0..w.len()).collect();
    order.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
    let margin = w[order[0]] - w[order[1]];
    let (g, r) = (argmax(got)[0], order[0] as u32);
    if margin > ulps * bf16_ulp(w[order[0]]) && g != r {
        return Err(format!("top-1 {g} vs reference {r} with a margin of {margin} ({} ulps)", margin / bf16_ulp(w[order[0]])));
    }
    Ok(margin)
}
