//! expanse's quantized formats against gguf-py, llama.cpp's own Python package
//! (`tests/fixtures/ref-quant.safetensors`, made by `tests/fixtures/make_quant_refs.py`): quantizing
//! gives llama-quantize's bytes, and blocks read back as ggml reads them.

use candle_core::{Device, Tensor};
use expanse::quant::{self, QuantType};

use crate::common::*;

fn refs() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("ref-quant.safetensors"), &Device::Cpu).unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.to_vec1::<u8>().unwrap()
}

/// Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 of real weights and of edge rows (a zero row, subnormal scales, an
/// outlier per block, exact halves): byte for byte what gguf-py (and so ggml-quants.c) writes.
#[test]
fn quantized_bytes_equal_llama_cpps() {
    let refs = refs();
    let types = [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1, QuantType::Q5_0, QuantType::Q5_1];
    let names = ["q_proj", "down_proj", "embed_rows", "edge"];
    for q in types {
        for name in names {
            let input = &refs[&format!("input/{name}")];
            let want = u8s(&refs[&format!("{}/{name}", q.name().to_uppercase())]);
            let got = quant::bytes(&quant::quantize(name, input, q).unwrap()).unwrap();
            assert_eq!(got.len(), want.len(), "{} {name}: size", q.name());
            let blocks = want.len() / q.block_bytes();
            let differ: Vec<usize> =
                (0..blocks).filter(|b| got[b * q.block_bytes()..][..q.block_bytes()] != want[b * q.block_bytes()..][..q.block_bytes()]).collect();
            assert!(differ.is_empty(), "{} {name}: {} of {blocks} blocks differ from gguf-py's, first {}", q.name(), differ.len(), differ[0]);
        }
    }
}

/// K-quant blocks (random bytes, finite scales) read back as gguf-py dequantizes them.
#[test]
fn k_quant_blocks_read_as_ggml_reads_them() {
    let refs = refs();
    for q in [QuantType::Q4K, QuantType::Q5K, QuantType::Q6K] {
        let tag = q.name().to_uppercase();
        let blocks = u8s(&refs[&format!("blocks/{tag}")]);
        let want = &refs[&format!("dequant/{tag}")];
        let t = quant::from_bytes(q.name(), &blocks, 1, want.elem_count(), q).unwrap();
        let got = t.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        assert!(value_identical(&got, want), "{}: max |Δ| {}", q.name(), max_abs_diff(&got, want));
    }
}

/// Quantizing then reading back stays within each type's step: half a quantum for the symmetric
/// types (Q8_0's quantum is amax/127 of its block), checked on the real weights.
#[test]
fn q8_0_round_trip_is_within_half_a_step() {
    let refs = refs();
    for name in ["q_proj", "down_proj", "embed_rows"] {
        let w = &refs[&format!("input/{name}")];
        let back = quant::quantize(name, w, QuantType::Q8_0).unwrap().dequantize(&Device::Cpu).unwrap();
        let (w, back) = (w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), back.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        for (b, (ws, bs)) in w.chunks(32).zip(back.chunks(32)).enumerate() {
            let amax = ws.iter().fold(0f32, |m, x| if x.abs() > m { x.abs() } else { m });
            // The scale is stored in f16: allow its rounding on top of half a step.
            let bound = amax / 127.0 * (0.5 + 127.0 * 1e-3) + 1e-12;
            for (x, y) in ws.iter().zip(bs) {
                assert!((x - y).abs() <= bound, "{name} block {b}: {x} read back as {y} (bound {bound})");
            }
        }
    }
}

/// The K-quants' rows of `tests/fixtures/ref-kquant.safetensors` (made by
/// `tests/fixtures/make_kquant_refs.py` with llama.cpp's `llama-quantize --pure`): for each type and
/// row set, the indices of the blocks whose bytes differ from llama-quantize's, and the block count.
fn k_quant_differences(q: QuantType) -> Vec<(&'static str, Vec<usize>, usize)> {
    let refs = candle_core::safetensors::load(fixtures().join("ref-kquant.safetensors"), &Device::Cpu).unwrap();
    let tag = q.name().to_uppercase();
    ["edge", "attn_q", "ffn_down", "tiny_mistral"]
        .into_iter()
        .map(|name| {
            let input = &refs[&format!("input/{name}")];
            let want = u8s(&refs[&format!("{tag}/{name}")]);
            let got = quant::bytes(&quant::quantize(name, input, q).unwrap()).unwrap();
            assert_eq!(got.len(), want.len(), "{} {name}: size", q.name());
            let n = q.block_bytes();
            let blocks = want.len() / n;
            (name, (0..blocks).filter(|b| got[b * n..][..n] != want[b * n..][..n]).collect(), blocks)
        })
        .collect()
}

/// K-quants whose quantizer (`src/quant/kquants.rs`, a port of ggml-quants.c's reference ones) gives
/// llama-quantize's bytes (no importance matrix) block for block, on heavy-tailed weights and on edge
/// rows (a zero row, tiny values, outliers per sub-block, rounding ties, constant and one-signed rows,
/// sub-blocks of very different scales).
const K_QUANTS_MATCHING: [QuantType; 3] = [QuantType::Q4K, QuantType::Q5K, QuantType::Q6K];

#[test]
fn k_quant_bytes_against_llama_quantize() {
    let mut failures = Vec::new();
    for q in K_QUANTS_MATCHING {
        for (name, differ, blocks) in k_quant_differences(q) {
            if let Some(first) = differ.first() {
                failures.push(format!("{} {name}: {} of {blocks} blocks differ from llama-quantize's, first {first}", q.name(), differ.len()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
