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

/// K-quants whose quantizer gives llama-quantize's bytes (no importance matrix) block for block, on
/// heavy-tailed weights and on edge rows (a zero row, tiny values, outliers per sub-block, rounding
/// ties, constant and one-signed rows, sub-blocks of very different scales).
const K_QUANTS_MATCHING: [QuantType; 0] = [];

/// K-quants whose quantizer (candle 0.11.1's `k_quants.rs`) is not ggml-quants.c's current reference one,
/// which llama-quantize runs without an importance matrix (`quantize_q*_K` → `quantize_row_q*_K_ref`).
/// Q4_K and Q5_K fit each 32-value sub-block with `make_qkx1_quants` (llama.cpp's 2023 k_quants.c:
/// unweighted, up to 5 re-fits) where ggml uses `make_qkx2_quants` (weights `av_x + |x|`, 21 resp. 16
/// scale trials, weighted least squares); candle also tests `max == min` before clamping the min to 0,
/// so a constant positive sub-block gets scale and min 0 (reads back as 0). Q6_K fits its 16-value
/// sub-blocks with `make_qx_quants`' old refinement loops where ggml tries 18 scales `-(32 ± 0.1·is)/max`,
/// and for an all-zero super-block stores d = -0.0 (1/(-128/0)) where ggml stores +0.0. ggml's
/// `nearest_int` rounds ties to even, candle's `f32::round` away from zero. Their bytes are checked to
/// differ, so that when the quantizer is brought in line this fails and the type moves to [`K_QUANTS_MATCHING`].
const K_QUANTS_DIFFERING: [QuantType; 3] = [QuantType::Q4K, QuantType::Q5K, QuantType::Q6K];

#[test]
fn k_quant_bytes_against_llama_quantize() {
    for q in K_QUANTS_MATCHING {
        for (name, differ, blocks) in k_quant_differences(q) {
            assert!(differ.is_empty(), "{} {name}: {} of {blocks} blocks differ from llama-quantize's, first {}", q.name(), differ.len(), differ[0]);
        }
    }
    for q in K_QUANTS_DIFFERING {
        let found = k_quant_differences(q);
        for (name, differ, blocks) in &found {
            eprintln!(
                "{} {name}: {} of {blocks} blocks differ from llama-quantize's{}",
                q.name(),
                differ.len(),
                differ.first().map(|b| format!(", first {b}")).unwrap_or_default()
            );
        }
        assert!(found.iter().any(|(_, differ, _)| !differ.is_empty()), "{}: now byte for byte llama-quantize's: move it to K_QUANTS_MATCHING", q.name());
    }
}
