//! The GGUF reader against llama.cpp's own converter: `tests/fixtures/gguf/*.gguf` were written by
//! `convert_hf_to_gguf.py` from the tiny fixtures (`tests/fixtures/make_gguf_fixtures.py`), so the
//! config, the names, the Q/K row order and the Q8_0 bytes all come from llama.cpp's code; a GGUF
//! runs as the checkpoint it came from.

use candle_core::{DType, Device};
use expanse::engine::{Source, Weights};
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
    let mut names: Vec<(String, Vec<usize>)> = src
        .safetensors("test")
        .unwrap()
        .names()
        .into_iter()
        .map(|n| (n.to_string(), src.safetensors("test").unwrap().entry(n).unwrap().shape.clone()))
        .collect();
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
        let want = src.safetensors("test").unwrap().load_weight(name, shape, &Device::Cpu).unwrap();
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
        let want = src.safetensors("test").unwrap().load_weight(&name, &shape, &Device::Cpu).unwrap();
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

/// `model` (a folder) with its config's `sliding_window` dropped, as llama.cpp's converter drops it
/// for a llama-architecture GGUF (llama.cpp then attends over the whole context).
fn without_sliding_window(model: &str, dir: &std::path::Path) -> String {
    let src = fixtures().join(model);
    for entry in std::fs::read_dir(&src).unwrap() {
        let name = entry.unwrap().file_name();
        if name != "config.json" {
            std::os::unix::fs::symlink(src.join(&name), dir.join(&name)).unwrap();
        }
    }
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("sliding_window");
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir.to_string_lossy().into_owned()
}

/// The logits `expanse logits` writes for `model` over `ids` (extra flags after).
fn logits(model: &str, ids: &str, extra: &[&str]) -> candle_core::Tensor {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.safetensors");
    let mut args = vec!["logits", "--model", model, "--ids", ids, "--out", out.to_str().unwrap()];
    args.extend(extra);
    let run = expanse(&args);
    assert!(run.status.success(), "{model}: {}", String::from_utf8_lossy(&run.stderr));
    candle_core::safetensors::load(&out, &Device::Cpu).unwrap().remove("logits").unwrap()
}

/// 18 ids: the OpenChat prompt of "Hello there", past the fixture's 8-token sliding window.
const PROMPT_IDS: &str = "1,420,6316,28781,3198,3123,1247,28747,22557,736,32000,420,6316,28781,3198,3123,21631,28747";

/// A float GGUF runs as the checkpoint it was converted from: the same logits bit for bit, at every
/// position, expanded and not (its attention over the whole context, as llama.cpp runs it).
#[test]
fn a_float_gguf_gives_its_checkpoints_logits_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let hf = without_sliding_window("tiny-mistral-bf16", dir.path());
    let g = fixtures().join("gguf/tiny-mistral-bf16.gguf").to_string_lossy().into_owned();
    for expand in ["none", "every:4"] {
        let (a, b) = (logits(&g, PROMPT_IDS, &["--expand", expand]), logits(&hf, PROMPT_IDS, &["--expand", expand]));
        assert_eq!(a.dims(), [18, 32002]);
        assert!(bit_identical(&a, &b), "--expand {expand}");
    }
    // With the checkpoint's own 8-token window the two part after position 8: the check above is not vacuous.
    assert!(!bit_identical(&logits(&g, PROMPT_IDS, &[]), &logits(&fixture("tiny-mistral-bf16"), PROMPT_IDS, &[])));
}

/// Llama 3's `rope_freqs.weight` travels through `expand --out X.gguf` as it is: the expanded file
/// gives its base's logits bit for bit, and those move with the divisors (transformers' agreement on
/// the same fixture: tests/it/engine.rs `llama3_rope_scaling_matches_transformers`).
#[test]
fn an_expanded_gguf_keeps_the_rope_divisors() {
    let dir = tempfile::tempdir().unwrap();
    let g = fixtures().join("gguf/tiny-llama3-rope-f32.gguf").to_string_lossy().into_owned();
    let out = dir.path().join("x.gguf").to_string_lossy().into_owned();
    let run = expanse(&["expand", "--model", &g, "--expand", "every:2", "--out", &out]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let ids = "1,38,75,112,149,186,223,260,297,334,371,408,445,482,519,556,593,630";
    let base = logits(&g, ids, &["--expand", "none"]);
    assert!(bit_identical(&logits(&out, ids, &["--expand", "none"]), &base));
    let divisors = |p: &str| GgufFile::open(std::path::Path::new(p)).unwrap().config().unwrap().rope_scaling;
    assert_eq!(divisors(&out), divisors(&g));
    assert!(matches!(divisors(&g), Some(expanse::config::RopeScaling::Divisors(d)) if d.len() == 4 && d.iter().any(|&x| x != 1.0)));
}

/// A GGUF needs no other file: `generate` renders the chat template and tokenizes from its metadata,
/// to the same prompt ids and the same greedy text as the checkpoint's own files.
#[test]
fn a_gguf_prompts_with_its_own_tokenizer_and_template() {
    let dir = tempfile::tempdir().unwrap();
    let hf = without_sliding_window("tiny-mistral-bf16", dir.path());
    let g = fixtures().join("gguf/tiny-mistral-bf16.gguf").to_string_lossy().into_owned();
    let run = |model: &str| {
        let out = expanse(&["generate", "--model", model, "--prompt", "Hello there", "--max-tokens", "12", "--temperature", "0", "--show-prompt"]);
        assert!(out.status.success(), "{model}: {}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).lines().take(2).collect::<Vec<_>>().join("\n"))
    };
    let (text, prompt) = run(&g);
    assert_eq!((text.clone(), prompt.clone()), run(&hf));
    assert!(prompt.contains(&format!("[{}]", PROMPT_IDS.replace(',', ", "))), "{prompt}");
    assert!(!text.trim().is_empty());
}

/// A quantized GGUF's projections run on the file's own blocks (never requantized), its copies and
/// zero projections are found, and its expansion is bit-exact with its base (`verify`).
#[test]
fn a_quantized_gguf_runs_on_its_own_blocks() {
    let path = fixtures().join("gguf/tiny-mergekit-every4-q8_0.gguf");
    let loaded = expanse::engine::load(&expanse::engine::LoadOptions::new(path.to_str().unwrap()).expand("none")).unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(loaded.model.quant_type(), Some(QuantType::Q8_0));
    for (layer, block) in loaded.model.blocks.iter().enumerate() {
        for (part, linear) in [("self_attn.k_proj", &block.self_attn.k_proj), ("mlp.down_proj", &block.mlp.down_proj)] {
            let want = g.tensor(&format!("model.layers.{layer}.{part}.weight")).unwrap();
            assert_eq!(linear.quantized().unwrap().row_bytes().unwrap(), want.bytes.as_ref(), "layer {layer} {part}");
        }
    }
    let transparent: Vec<usize> = loaded.model.blocks.iter().enumerate().filter(|(_, b)| b.transparent).map(|(i, _)| i).collect();
    assert_eq!(transparent, [4, 9], "mergekit's inserted blocks, found on their zero blocks");
    let out = expanse(&["verify", "--model", path.to_str().unwrap(), "--steps", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("PASS: expanded"), "{}", String::from_utf8_lossy(&out.stdout));
}

/// A GGUF is expanded to a GGUF, not to a safetensors folder: refused in one line naming the file
/// and saying what to give instead, writing nothing.
#[test]
fn expanding_a_gguf_to_a_folder_is_refused_in_one_line() {
    let model = fixtures().join("gguf/tiny-mistral-bf16.gguf");
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out");
    let out = expanse(&["expand", "--model", &model.to_string_lossy(), "--out", &target.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.trim().lines().count() == 1 && err.contains("tiny-mistral-bf16.gguf") && err.contains("--out a FILE.gguf"), "{err}");
    assert!(!target.exists(), "nothing written");
}

fn ref_llama_cpp() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("gguf/ref-llama-cpp.json")).unwrap()).unwrap()
}

fn ids_arg(r: &serde_json::Value) -> String {
    r["ids"].as_array().unwrap().iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

fn sha256(path: &std::path::Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
}

/// `expand --out X.gguf` writes the file `tests/fixtures/make_llama_cpp_refs.sh` gave llama.cpp, byte
/// for byte (its sha256): there llama.cpp's logits on it equal its logits on the base GGUF bit for bit
/// (and a control expansion that keeps its copies' projections differs). Here: the file holds every
/// copy's blocks as the source layer stores them, zero blocks for the zeroed projections, and runs to
/// the base's logits bit for bit in expanse too.
#[test]
fn an_expanded_gguf_is_the_file_llama_cpp_found_transparent() {
    let r = ref_llama_cpp();
    let ids = ids_arg(&r);
    for file in ["tiny-mistral-q4_k_m.gguf", "tiny-mistral-bf16.gguf"] {
        let base = fixtures().join("gguf").join(file);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("expanded.gguf");
        let run = expanse(&["expand", "--model", base.to_str().unwrap(), "--expand", "every:4", "--out", out.to_str().unwrap()]);
        assert!(run.status.success(), "{file}: {}", String::from_utf8_lossy(&run.stderr));
        assert_eq!(sha256(&out), r["expanded_sha256"][file].as_str().unwrap(), "{file}: not the bytes llama.cpp checked");

        let (src, got) = (GgufFile::open(&base).unwrap(), GgufFile::open(&out).unwrap());
        assert_eq!(got.config().unwrap().num_hidden_layers, 10);
        for (layer, source, zeroed) in [(3, 3, false), (4, 3, true), (5, 4, false), (9, 7, true)] {
            for part in ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj", "input_layernorm"] {
                let (a, b) =
                    (got.tensor(&format!("model.layers.{layer}.{part}.weight")).unwrap(), src.tensor(&format!("model.layers.{source}.{part}.weight")).unwrap());
                assert_eq!(a.ty, b.ty, "{file} layer {layer} {part}");
                if zeroed && (part.ends_with("o_proj") || part.ends_with("down_proj")) {
                    assert!(a.is_zero().unwrap() && !b.is_zero().unwrap(), "{file} layer {layer} {part}: zero");
                    match a.ty {
                        // mergekit's arithmetic: 0.0 × a negative weight is −0.0, so the sign bit stays.
                        StoredType::Dense(DType::BF16) => assert!(a.bytes.chunks(2).zip(b.bytes.chunks(2)).all(|(x, y)| x[0] == 0 && x[1] == y[1] & 0x80)),
                        StoredType::Quantized(_) => assert!(a.bytes.iter().all(|&x| x == 0), "{file} layer {layer} {part}: zero blocks"),
                        other => panic!("{file}: {other:?}"),
                    }
                } else {
                    assert_eq!(a.bytes, b.bytes, "{file} layer {layer} {part}: the source layer's bytes");
                }
            }
        }
        let (o, b) = (out.to_string_lossy().into_owned(), base.to_string_lossy().into_owned());
        let expanded = logits(&o, &ids, &["--expand", "none"]);
        assert!(bit_identical(&expanded, &logits(&b, &ids, &["--expand", "none"])), "{file}: expanded on disk == base");
        assert!(bit_identical(&expanded, &logits(&b, &ids, &["--expand", "every:4"])), "{file}: on disk == in memory");
    }
}

/// Writing a GGUF refuses what it cannot honour, in one line naming the flag, writing nothing: a
/// safetensors source (its blocks would not be llama.cpp's), `--dtype`, `--shard-size`, and an
/// existing file without `--force`.
#[test]
fn writing_a_gguf_refuses_what_it_cannot_honour() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.gguf");
    let (o, g) = (out.to_string_lossy().into_owned(), fixtures().join("gguf/tiny-mistral-bf16.gguf").to_string_lossy().into_owned());
    let safetensors = fixture("tiny-mistral-bf16");
    let cases: [(Vec<&str>, &str); 3] = [
        (vec!["--model", &safetensors], "--out"),
        (vec!["--model", &g, "--dtype", "bf16"], "--dtype"),
        (vec!["--model", &g, "--shard-size", "1GB"], "--shard-size"),
    ];
    for (args, flag) in cases {
        let run = expanse(&[&["expand", "--out", &o][..], &args].concat());
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.trim().lines().count() == 1 && err.contains(flag), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?}: nothing written");
    }
    std::fs::write(&out, b"the user's file").unwrap();
    let run = expanse(&["expand", "--model", &g, "--out", &o]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.code() == Some(2) && err.contains("--force") && err.trim().lines().count() == 1, "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"the user's file");
    let run = expanse(&["expand", "--model", &g, "--out", &o, "--force"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(GgufFile::open(&out).is_ok());
    for force in [&[][..], &["--force"][..]] {
        let run = expanse(&[&["expand", "--model", &g, "--out", &g][..], force].concat());
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.code() == Some(2) && err.contains("which this run reads") && !err.contains("pass --force"), "the model is never the output: {err}");
    }
}

/// The quantized fixture against llama.cpp (`make_llama_cpp_refs.sh`: same file, same ids, its plain CPU
/// kernels). Both round the activations to 8-bit blocks by ggml's x86 rule and sum the same integer
/// products, so the logits are llama.cpp's bit for bit while the f32 arithmetic around the products
/// (norms, RoPE, attention: 1.4e-5 apart on the f32 model) only moves values inside a rounding step; at
/// the first position where such a last-bit difference carries an activation across a step, the two
/// part, and its K/V carry the difference on. Measured 2026-12-04: bit-identical through position 50 of
/// 87, then max |Δ| 0.31, argmax equal at 85 of 87 positions (the two others near-ties: gaps 0.096 and
/// 0.005). The bar is 99 %. KL to each engine's own f32 model: expanse's within 1.1× llama.cpp's
/// (measured 1.008×).
#[test]
fn a_q4_k_m_gguf_agrees_with_llama_cpp_and_loses_no_more_than_it() {
    let r = ref_llama_cpp();
    let q = &r["q4_k_m"];
    let ids = ids_arg(&r);
    let g = |f: &str| fixtures().join("gguf").join(f).to_string_lossy().into_owned();
    let got: Vec<Vec<f32>> = logits(&g("tiny-mistral-q4_k_m.gguf"), &ids, &["--expand", "none", "--dtype", "f32"]).to_vec2().unwrap();
    let f32_model: Vec<Vec<f32>> = logits(&g("tiny-mistral-bf16.gguf"), &ids, &["--expand", "none", "--dtype", "f32"]).to_vec2().unwrap();
    let argmax: Vec<usize> = serde_json::from_value(q["argmax"].clone()).unwrap();
    let agree = got
        .iter()
        .zip(&argmax)
        .filter(|(row, &want)| row.iter().enumerate().fold((0, f32::NEG_INFINITY), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0 == want)
        .count();
    assert!(agree * 100 >= got.len() * 97, "argmax equal to llama.cpp's at {agree} of {} positions", got.len());
    let mut same_until = 0;
    for (pos, top) in q["top"].as_array().unwrap().iter().enumerate() {
        let top: Vec<(usize, f32)> = serde_json::from_value(top.clone()).unwrap();
        let worst = top.iter().map(|&(id, want)| (got[pos][id] - want).abs()).fold(0f32, |m, d| if d.is_nan() || m.is_nan() { f32::NAN } else { m.max(d) });
        assert!(worst < 0.5, "position {pos}: top-32 logits {worst} from llama.cpp's");
        if worst < 1e-4 && same_until == pos {
            same_until = pos + 1;
        }
    }
    assert!(same_until >= 40, "llama.cpp's logits (to the JSON's 6 decimals) through position {same_until} only");
    let kl = mean_kl(&f32_model, &got);
    let anchor = q["mean_kl"].as_f64().unwrap();
    assert!(kl.is_finite() && kl > 0.0 && kl <= 1.1 * anchor, "expanse's mean KL {kl} against llama.cpp's {anchor}");
}

/// Mean over positions of KL(p ‖ q), p and q the softmax of each row (in f64).
fn mean_kl(p: &[Vec<f32>], q: &[Vec<f32>]) -> f64 {
    let log_softmax = |row: &[f32]| {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        row.iter().map(|&v| v as f64 - lse).collect::<Vec<f64>>()
    };
    let total: f64 = p.iter().zip(q).map(|(a, b)| log_softmax(a).iter().zip(log_softmax(b)).map(|(lp, lq)| lp.exp() * (lp - lq)).sum::<f64>()).sum();
    total / p.len() as f64
}

/// A Q4_K_M file (llama-quantize's mixture: a layer's q/k and v in different types) runs on its own
/// blocks, each type's rows multiplied as they are, against transformers' run of the same file
/// (its own GGUF reader and dequantizers, in f32: `tests/fixtures/make_gguf_refs.py`). expanse
/// quantizes the activations to 8 bits in each product, as llama.cpp does: measured, max |Δ| 0.30 and
/// mean 0.03 over all logits, where the weights' quantization itself moves them by 3.3 (mean 0.31).
#[test]
fn a_q4_k_m_gguf_runs_its_mixed_blocks_as_transformers_reads_them() {
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("gguf/ref-q4_k_m-logits.json")).unwrap()).unwrap();
    let path = fixtures().join("gguf/tiny-mistral-q4_k_m.gguf");
    let loaded = expanse::engine::load(&expanse::engine::LoadOptions::new(path.to_str().unwrap()).expand("none").dtype("f32")).unwrap();
    let qkv = loaded.model.blocks[0].self_attn.qkv_proj.quantized().unwrap().types();
    assert_eq!(qkv, [(QuantType::Q5_0, 48), (QuantType::Q8_0, 16)], "q/k and v keep their own types");
    let ids: Vec<u32> = serde_json::from_value(r["ids"].clone()).unwrap();
    let got = logits(path.to_str().unwrap(), &ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","), &["--expand", "none", "--dtype", "f32"]);
    let got: Vec<Vec<f32>> = got.to_vec2().unwrap();
    let (mut worst, mut sum, mut n) = (0f32, 0f32, 0);
    for (pos, top) in r["top"].as_array().unwrap().iter().enumerate() {
        let top: Vec<(usize, f32)> = serde_json::from_value(top.clone()).unwrap();
        let argmax = got[pos].iter().enumerate().fold((0, f32::NEG_INFINITY), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0;
        assert_eq!(argmax, top[0].0, "position {pos}: argmax");
        for (id, want) in top {
            let d = (got[pos][id] - want).abs();
            assert!(d.is_finite(), "position {pos} id {id}: {}", got[pos][id]);
            worst = worst.max(d);
            sum += d;
            n += 1;
        }
    }
    assert!(worst < 0.6 && sum / (n as f32) < 0.1, "max |Δ| {worst}, mean {} over the top-32 logits", sum / n as f32);
}

/// What the memory check counts for a GGUF is what the model holds: the file's blocks as stored
/// (copies shared, zero copies added), not the float size of its shapes.
#[test]
fn a_ggufs_weights_are_sized_as_stored() {
    for (file, expand) in [("tiny-mergekit-every4-q8_0.gguf", "none"), ("tiny-mistral-q4_k_m.gguf", "every:4"), ("tiny-mistral-bf16.gguf", "every:4")] {
        let path = fixtures().join("gguf").join(file);
        let loaded = expanse::engine::load(&expanse::engine::LoadOptions::new(path.to_str().unwrap()).expand(expand)).unwrap();
        let Weights::Gguf(g) = &loaded.source.weights else { panic!("{file}: not read as a GGUF") };
        let estimate = g.weight_bytes(&loaded.plan, loaded.model.dtype).unwrap() as f64;
        let held = loaded.model.weight_bytes as f64;
        assert!(estimate >= held && estimate <= 1.05 * held, "{file} --expand {expand}: estimate {estimate}, held {held}");
    }
}

/// The file's own chat template wins over a `chat_template.jinja` that happens to lie beside it, and
/// `--quant` is refused for a file that is quantized already.
#[test]
fn a_gguf_keeps_its_own_template_and_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("m.gguf");
    std::os::unix::fs::symlink(fixtures().join("gguf/tiny-mistral-bf16.gguf"), &g).unwrap();
    std::fs::write(dir.path().join("chat_template.jinja"), "ZZZ {{ messages[0]['content'] }}").unwrap();
    let out = expanse(&["generate", "--model", g.to_str().unwrap(), "--prompt", "hi", "--max-tokens", "1", "--temperature", "0", "--show-prompt"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.starts_with("<s>GPT4 Correct User: hi<|end_of_turn|>"), "{err}");
    let q = fixtures().join("gguf/tiny-mergekit-every4-q8_0.gguf");
    let out = expanse(&["generate", "--model", q.to_str().unwrap(), "--prompt", "hi", "--quant", "q4_0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.trim().lines().count() == 1 && err.contains("--quant") && err.contains("already quantized (q8_0)"), "{err}");
}

/// The bf16 fixture rewritten through expanse's GGUF writer into `path`, with `extra` metadata added,
/// `patch` applied to each tensor's bytes (by GGUF name) and tensor `drop` left out.
fn rewrite_fixture(path: &std::path::Path, extra: Vec<Vec<u8>>, drop: &str, patch: impl Fn(&str, &mut Vec<u8>)) {
    let mut metadata: Vec<Vec<u8>> = gguf("tiny-mistral-bf16.gguf").raw_metadata().unwrap().into_iter().map(|(_, raw)| raw.to_vec()).collect();
    metadata.extend(extra);
    write_fixture(path, metadata, drop, patch)
}

/// The bf16 fixture's tensors written through expanse's GGUF writer into `path` with `metadata` (whole
/// records), `patch` applied to each tensor's bytes and tensor `drop` left out.
fn write_fixture(path: &std::path::Path, metadata: Vec<Vec<u8>>, drop: &str, patch: impl Fn(&str, &mut Vec<u8>)) {
    use expanse::quant::gguf_write::{GgufWriter, TensorEntry};
    let src = gguf("tiny-mistral-bf16.gguf");
    let stored: Vec<_> = src.stored_tensors().unwrap().into_iter().filter(|t| t.name != drop).collect();
    let entries: Vec<TensorEntry> = stored.iter().map(|t| TensorEntry { name: t.name.into(), dims: t.dims.clone(), ty: t.ty }).collect();
    let mut w = GgufWriter::start(std::fs::File::create(path).unwrap(), path, &metadata, &entries, 32).unwrap();
    for t in &stored {
        let mut bytes = t.bytes.to_vec();
        patch(t.name, &mut bytes);
        w.tensor(t.name, &bytes).unwrap();
    }
    w.finish().unwrap();
}

/// Metadata with a value per layer cannot follow an expansion (which value would a copy get?), a NaN
/// weight would make every logit NaN, and a layer without one of its tensors would give a file
/// llama.cpp refuses: each refused naming the key or tensor, writing nothing. The
/// files are the bf16 fixture rewritten through expanse's GGUF writer, which otherwise runs as the
/// fixture does.
#[test]
fn per_layer_metadata_nan_weights_and_missing_tensors_are_refused_by_name() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let per_layer = dir.path().join("per-layer.gguf");
    let flags = expanse::quant::gguf_write::encode_kv("llama.attention.layer_flags", &Value::Array(vec![Value::Bool(true); 8])).unwrap();
    rewrite_fixture(&per_layer, vec![flags], "", |_, _| {});
    let nan = dir.path().join("nan.gguf");
    rewrite_fixture(&nan, vec![], "", |name, bytes| {
        if name == "blk.2.ffn_norm.weight" {
            bytes[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        }
    });
    let missing = dir.path().join("missing.gguf");
    rewrite_fixture(&missing, vec![], "blk.5.ffn_up.weight", |_, _| {});
    let ids = "1,420,6316";
    let original = fixtures().join("gguf/tiny-mistral-bf16.gguf").to_string_lossy().into_owned();
    assert!(bit_identical(&logits(per_layer.to_str().unwrap(), ids, &["--expand", "none"]), &logits(&original, ids, &["--expand", "none"])));
    for (model, named) in [(&per_layer, "llama.attention.layer_flags"), (&nan, "blk.2.ffn_norm.weight"), (&missing, "blk.5.ffn_up.weight")] {
        let out = dir.path().join("x.gguf");
        let run = expanse(&["expand", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.code() == Some(2) && err.contains(named) && err.trim().lines().count() == 1, "{err}");
        assert!(!out.exists());
    }
}

/// A quantized tensor can be copied or zeroed, not scaled by another factor (that would need new
/// blocks, not the source's): a YAML asking for it is refused naming the tensor.
#[test]
fn scaling_quantized_blocks_is_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("half.yml");
    let text = "slices:\n  - sources: [{model: m, layer_range: [0, 8]}]\n  - sources:\n      - model: m\n        layer_range: [7, 8]\n        parameters:\n          scale: [{filter: o_proj, value: 0.5}, {value: 1.0}]\nmerge_method: passthrough\n";
    std::fs::write(&yaml, text).unwrap();
    let model = fixtures().join("gguf/tiny-mistral-q4_k_m.gguf");
    let out = dir.path().join("x.gguf");
    let run = expanse(&["expand", "--model", model.to_str().unwrap(), "--expand", yaml.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.code() == Some(2) && err.contains("blk.7.attn_output.weight") && err.contains("0.5") && err.trim().lines().count() == 1, "{err}");
    assert!(!out.exists());
}

/// Metadata is copied record by record as the source stores it: a string that is not valid UTF-8, or
/// ends in NULs (which a parsed value would lose or alter), comes out byte for byte; only the block
/// count changes.
#[test]
fn metadata_records_are_copied_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("odd-strings.gguf");
    let mut odd = Vec::new();
    odd.extend_from_slice(&(9u64).to_le_bytes());
    odd.extend_from_slice(b"x.strange");
    odd.extend_from_slice(&8u32.to_le_bytes());
    odd.extend_from_slice(&(6u64).to_le_bytes());
    odd.extend_from_slice(b"a\xffb\0\0\0");
    rewrite_fixture(&src, vec![odd.clone()], "", |_, _| {});
    let out = dir.path().join("x.gguf");
    let run = expanse(&["expand", "--model", src.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let (a, b) = (GgufFile::open(&src).unwrap(), GgufFile::open(&out).unwrap());
    let (ra, rb) = (a.raw_metadata().unwrap(), b.raw_metadata().unwrap());
    assert_eq!(ra.len(), rb.len());
    for ((ka, va), (kb, vb)) in ra.iter().zip(&rb) {
        assert_eq!(ka, kb, "the source's order");
        if ka == "llama.block_count" {
            assert_ne!(va, vb);
        } else {
            assert_eq!(va, vb, "{ka}");
        }
    }
    assert!(rb.iter().any(|(k, v)| k == "x.strange" && *v == odd.as_slice()));
}

/// What llama.cpp's GGUF reader refuses (`gguf_init_from_file_impl`), expanse refuses before anything
/// reads the file, in one line naming the key or tensor: a `general.alignment` that is 0, not a power
/// of two or not a UINT32 (candle's reader divides by it, or reads another integer type as it), a key
/// or a tensor name twice (candle keeps the last), tensor bytes that do not follow each other at
/// aligned offsets (overlapping or misplaced bytes read as another tensor), a tensor past the file's
/// end (`inspect` reported such a file whole), a NaN float (read as "absent", so a default).
#[test]
fn a_header_llama_cpp_refuses_is_refused_naming_the_key_or_tensor() {
    use candle_core::quantized::gguf_file::Value;
    use expanse::quant::gguf_write::encode_kv;
    let dir = tempfile::tempdir().unwrap();
    let original = fixtures().join("gguf/tiny-mistral-bf16.gguf");
    let records: Vec<(String, Vec<u8>)> = gguf("tiny-mistral-bf16.gguf").raw_metadata().unwrap().into_iter().map(|(k, raw)| (k, raw.to_vec())).collect();
    // The fixture's records with `key` set to `value` (replaced where present, else added).
    let with = |key: &str, value: Value| -> Vec<Vec<u8>> {
        let mut m: Vec<Vec<u8>> = records.iter().filter(|(k, _)| k != key).map(|(_, r)| r.clone()).collect();
        m.push(encode_kv(key, &value).unwrap());
        m
    };
    assert!(records.iter().any(|(k, _)| k == "llama.rope.freq_base"), "the fixture states rope.freq_base");
    let mut cases: Vec<(std::path::PathBuf, &str)> = Vec::new();
    for (name, metadata, named) in [
        ("align0", with("general.alignment", Value::U32(0)), "general.alignment"),
        ("align48", with("general.alignment", Value::U32(48)), "general.alignment"),
        ("align-u64", with("general.alignment", Value::U64(32)), "general.alignment"),
        // candle drops a string's trailing NULs: this key is `general.alignment` to it.
        ("align0-nul", with("general.alignment\0", Value::U32(0)), "general.alignment"),
        ("theta-nan", with("llama.rope.freq_base", Value::F32(f32::NAN)), "llama.rope.freq_base"),
        ("twice", records.iter().map(|(_, r)| r.clone()).chain(with("llama.block_count", Value::U32(8)).into_iter().last()).collect(), "llama.block_count"),
    ] {
        let p = dir.path().join(format!("{name}.gguf"));
        write_fixture(&p, metadata, "", |_, _| {});
        cases.push((p, named));
    }
    // Header bytes patched in place: a tensor renamed to its neighbour's name (same length), one
    // offset moved by 32 (aligned, but not where the previous tensor ends), the last byte cut off.
    let bytes = std::fs::read(&original).unwrap();
    let at = |name: &str| bytes.windows(name.len()).position(|w| w == name.as_bytes()).unwrap();
    let mut twice = bytes.clone();
    let n = at("blk.1.attn_norm.weight");
    twice[n..n + 5].copy_from_slice(b"blk.0");
    let mut moved = bytes.clone();
    let n = at("blk.3.ffn_up.weight") + "blk.3.ffn_up.weight".len();
    let dims = u32::from_le_bytes(moved[n..n + 4].try_into().unwrap()) as usize;
    let off = n + 4 + 8 * dims + 4;
    let offset = u64::from_le_bytes(moved[off..off + 8].try_into().unwrap());
    moved[off..off + 8].copy_from_slice(&(offset + 32).to_le_bytes());
    for (name, b, named) in
        [("tensor-twice", twice, "blk.0.attn_norm.weight"), ("moved", moved, "blk.3.ffn_up.weight"), ("cut", bytes[..bytes.len() - 1].to_vec(), "past the end")]
    {
        let p = dir.path().join(format!("{name}.gguf"));
        std::fs::write(&p, b).unwrap();
        cases.push((p, named));
    }
    for (p, named) in &cases {
        let out = expanse(&["inspect", "--model", p.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(2) && err.contains(named) && err.trim().lines().count() == 1 && !err.contains("internal error"),
            "{}: {err}",
            p.display()
        );
    }
    // The writer's own layout, with the fixture's records, is what llama.cpp reads.
    let same = dir.path().join("same.gguf");
    write_fixture(&same, records.iter().map(|(_, r)| r.clone()).collect(), "", |_, _| {});
    let out = expanse(&["inspect", "--model", same.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
