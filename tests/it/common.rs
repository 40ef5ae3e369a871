//! Shared helpers: fixture paths, loading, running the binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use expanse::compare::Diff;
use expanse::engine::{self, LoadOptions, Loaded};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fresh random generator for `test`, its seed printed; `EXPANSE_TEST_SEED=<u64>` replays one
/// (as the library's kernel tests do).
pub fn test_rng(test: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed = std::env::var("EXPANSE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("{test}: EXPANSE_TEST_SEED={seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

pub fn fixture(name: &str) -> String {
    fixtures().join(name).display().to_string()
}

pub fn load(model: &str, expand: &str, dtype: &str) -> Loaded {
    engine::load(&LoadOptions::new(fixture(model)).expand(expand).dtype(dtype)).unwrap()
}

/// (input_ids, logits [s, vocab] f32) of a reference file.
pub fn reference(name: &str) -> (Vec<u32>, Tensor) {
    expanse::cmd::logits::read(&fixtures().join(name)).unwrap()
}

/// max |a − b| through `expanse::compare`: NaN when either side holds a non-finite value or the
/// shapes differ, so every `<` test on it fails.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    Diff::of_tensors(a, b).unwrap().max_abs
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
    a.dims() == b.dims() && a.to_dtype(DType::F32).unwrap().eq(&b.to_dtype(DType::F32).unwrap()).unwrap().min_all().unwrap().to_scalar::<u8>().unwrap() == 1
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

/// The first maximum of each row of `t` (last dimension); a row holding a NaN panics, so no test
/// compares an argmax of NaN.
pub fn argmax(t: &Tensor) -> Vec<u32> {
    let width = t.dims().last().copied().unwrap_or(1);
    let v = expanse::compare::f32_values(t).unwrap();
    v.chunks(width).enumerate().map(|(i, row)| expanse::compare::argmax(row).unwrap_or_else(|| panic!("row {i} holds a NaN")) as u32).collect()
}

/// Top-1 of `got` equals `want`'s wherever `want`'s top-2 margin exceeds `ulps` bf16 ulps of its top
/// logit (a nearer tie may go either way under any rounding), both finite; returns that margin in
/// ulps.
pub fn top1_agrees(got: &Tensor, want: &Tensor, ulps: f32) -> Result<f32, String> {
    let (g, w) = (expanse::compare::f32_values(got).unwrap(), expanse::compare::f32_values(want).unwrap());
    let top1 = expanse::compare::Top1::new(&g, &w);
    if !top1.agrees(ulps) {
        return Err(top1.to_string());
    }
    Ok(top1.margin_ulps)
}

/// Whether `v` validates against the JSON Schema `schema` (the `jsonschema` crate: an implementation
/// independent of the grammar engine that constrained the answer).
pub fn schema_valid(schema: &serde_json::Value, v: &serde_json::Value) -> bool {
    jsonschema::validator_for(schema).unwrap().is_valid(v)
}
