//! The GGUF reader against llama.cpp's own converter: `tests/fixtures/gguf/*.gguf` were written by
//! `convert_hf_to_gguf.py` from the tiny fixtures (`tests/fixtures/make_gguf_fixtures.py`), so the
//! config, the names, the Q/K row order and the Q8_0 bytes all come from llama.cpp's code.

use candle_core::{DType, Device};
use expanse::engine::Source;
use expanse::quant::gguf::{GgufFile, StoredType};
use expanse::quant::{QMatrix, QuantType};

use crate::common::*;

fn gguf(name: &str) -> GgufFile {
    GgufFile::open(&fixtures().join("gguf").join(name)).unwrap()
}

fn source(name: &str) -> Source {
    Source::open(fixtures().join(name).to_str().unwrap(), None).unwrap()
}

#[test]
fn the_config_from_gguf_metadata_is_the_config_json() {
    for (file, model) in [("tiny-mistral-bf16.gguf", "tiny-mistral-bf16"), ("tiny-mergekit-every4-q8_0.gguf", "tiny-mergekit-every4-bf16")] {
        let got = gguf(file).config().unwrap();
        let want = source(model).config;
        // The converter writes no `sliding_window` for a llama-architecture GGUF: that one difference
        // is llama.cpp's (it runs Mistral GGUFs with full attention), and is checked for itself.
        assert_eq!(got.sliding_window, None, "{file}");
        let fields = |c: &expanse::config::Config| {
            (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        };
        assert_eq!(fields(&got), fields(&want), "{file}");
        let more = |c: &expanse::config::Config| (c.max_position_embeddings, c.rope_theta, c.tie_word_embeddings, c.bos_token_id, c.eos_token_ids.clone());
        assert_eq!(more(&got), more(&want), "{file}");
        // Stored as f32, read back as the decimal it was written from.
        assert_eq!(got.rms_norm_eps, want.rms_norm_eps, "{file}");
    }
}

/// Every Hugging Face tensor of `model`'s checkpoint, by name, with its shape.
fn hf_tensors(src: &Source) -> Vec<(String, Vec<usize>)> {
    let mut names: Vec<(String, Vec<usize>)> =
        src.checkpoint.names().into_iter().map(|n| (n.to_string(), src.checkpoint.entry(n).unwrap().shape.clone())).collect();
    names.sort();
    names
}

#[test]
fn a_bf16_gguf_holds_the_checkpoints_tensors_bit_for_bit_with_q_and_k_unpermuted() {
    let src = source("tiny-mistral-bf16");
    let g = gguf("tiny-mistral-bf16.gguf");
    let names = hf_tensors(&src);
    assert!(names.len() >= 8 * 9 + 3, "{} tensors", names.len());
    for (name, shape) in &names {
        assert!(g.has(name), "{name}");
        let raw = g.tensor(name).unwrap();
        assert_eq!(&raw.shape, shape, "{name}");
        // The converter keeps bf16 weights bf16; norms are written F32 (as llama.cpp wants them).
        let got = raw.dense(&Device::Cpu).unwrap().unwrap_or_else(|| panic!("{name} is {:?}", raw.ty));
        let want = src.checkpoint.load_weight(name, shape, &Device::Cpu).unwrap();
        // Both in f32 (exact from bf16): the norms are F32 in the GGUF, bf16 in the checkpoint.
        let same = bit_identical(&got.to_dtype(DType::F32).unwrap(), &want.to_dtype(DType::F32).unwrap());
        assert!(same, "{name}: values differ");
    }
}

#[test]
fn a_q8_0_gguf_holds_the_blocks_expanse_quantizes_rows_in_hugging_face_order() {
    let src = source("tiny-mergekit-every4-bf16");
    let g = gguf("tiny-mergekit-every4-q8_0.gguf");
    let mut quantized = 0;
    for (name, shape) in hf_tensors(&src) {
        let raw = g.tensor(&name).unwrap();
        assert_eq!(raw.shape, shape, "{name}");
        let want = src.checkpoint.load_weight(&name, &shape, &Device::Cpu).unwrap();
        match raw.ty {
            StoredType::Quantized(QuantType::Q8_0) => {
                let ours = QMatrix::quantize(&name, &want, QuantType::Q8_0, &Device::Cpu).unwrap();
                assert!(ours.row_bytes().unwrap() == raw.bytes.as_ref(), "{name}: blocks differ from the converter's");
                quantized += 1;
            }
            StoredType::Dense(DType::F32) => {
                let got = raw.dense(&Device::Cpu).unwrap().unwrap();
                assert!(bit_identical(&got, &want.to_dtype(DType::F32).unwrap()), "{name}");
                assert_eq!(shape.len(), 1, "{name}: only norms stay F32");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    // q, k, v, o, gate, up, down in each of 10 layers, the embedding and lm_head.
    assert_eq!(quantized, 10 * 7 + 2);
}

#[test]
fn a_file_that_is_not_gguf_is_one_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.gguf");
    std::fs::write(&p, b"not a gguf file at all").unwrap();
    let e = GgufFile::open(&p).err().expect("refused").to_string();
    assert!(e.contains("model.gguf") && !e.contains('\n'), "{e}");
}

#[test]
fn inspect_finds_the_expansion_in_a_quantized_gguf_as_in_the_checkpoint() {
    let json = |model: &str| -> serde_json::Value {
        let out = expanse(&["inspect", "--model", model, "--json"]);
        assert!(out.status.success(), "{model}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let g = json(&fixtures().join("gguf/tiny-mergekit-every4-q8_0.gguf").to_string_lossy());
    let hf = json(&fixture("tiny-mergekit-every4-bf16"));
    assert_eq!(g["layer_reports"], hf["layer_reports"]);
    let transparent = hf["layer_reports"].as_array().unwrap().iter().filter(|l| !l["copy_of"].is_null() && l["zero"].as_array().unwrap().len() == 2).count();
    assert_eq!(transparent, 2, "the fixture's two inserted blocks: {}", hf["layer_reports"]);
    for key in ["layers", "parameters", "hidden_size", "heads", "kv_heads", "vocab_size", "tie_word_embeddings"] {
        assert_eq!(g[key], hf[key], "{key}");
    }
    assert_eq!(g["dtype"], "GGUF: float32 ×21, q8_0 ×72", "10 layers' 2 norms and the final norm stay F32");
    assert_eq!(g["tokenizer"], "sentencepiece, 32002 tokens, <s> added, chat template", "built from the metadata");
    assert!(hf.get("tokenizer").is_none(), "a checkpoint's tokenizer is its tokenizer.json");
}

#[test]
fn running_a_gguf_is_refused_in_one_line_that_points_to_inspect() {
    let model = fixtures().join("gguf/tiny-mistral-bf16.gguf");
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("logits.safetensors");
    let out = expanse(&["logits", "--model", &model.to_string_lossy(), "--ids", "1,2,3", "--out", &target.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.trim().lines().count() == 1 && err.contains("tiny-mistral-bf16.gguf") && err.contains("inspect"), "{err}");
    assert!(!target.exists(), "nothing written");
}
