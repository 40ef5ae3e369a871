//! A model loaded with `--quant`: its projections hold llama-quantize's bytes (gguf-py's, in
//! `ref-quant.safetensors`), copies share their source's blocks, the expansion stays bit-identical to
//! the base, and the logits stay near the dense model's.

use candle_core::{DType, Device, Tensor};
use expanse::engine::{self, LoadOptions};
use expanse::model::{Cache, Logits, Model};
use expanse::quant::QuantType;

use crate::common::*;

/// A Mistral shape whose rows are whole K-quant blocks (256 values), so Q4_K and Q6_K are used as such.
const WIDE: &str = r#"{"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 256,
 "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
 "num_hidden_layers": 8, "vocab_size": 512, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
 "rope_theta": 10000.0, "sliding_window": null, "tie_word_embeddings": false, "dtype": "float32"}"#;

fn wide_config() -> (tempfile::TempDir, String) {
    config_with(&[])
}

/// A config.json of `WIDE` with each (key, value) replaced, for `--synthetic`.
fn config_with(changes: &[(&str, &str)]) -> (tempfile::TempDir, String) {
    let mut json: serde_json::Value = serde_json::from_str(WIDE).unwrap();
    for (key, value) in changes {
        json[*key] = serde_json::from_str(value).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let spec = path.display().to_string();
    (dir, spec)
}

fn synthetic(spec: &str, expand: &str, dtype: &str, quant: Option<&str>) -> Model {
    let mut opts = LoadOptions::new(spec).expand(expand).dtype(dtype);
    if let Some(q) = quant {
        opts = opts.quant(q);
    }
    engine::load_synthetic(spec, &opts, &Device::Cpu).unwrap().1
}

fn fixture_model(name: &str, expand: &str, dtype: &str, quant: &str) -> engine::Loaded {
    engine::load(&LoadOptions::new(fixture(name)).expand(expand).dtype(dtype).quant(quant)).unwrap()
}

fn full(model: &Model, ids: &[u32]) -> Tensor {
    let mut cache = Cache::new(model, ids.len()).unwrap();
    model.forward(&engine::ids_tensor(ids, &model.device).unwrap(), &mut cache, Logits::All).unwrap().squeeze(0).unwrap()
}

fn ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// The projections of a model loaded with `--quant T` hold the bytes gguf-py (llama.cpp's quantizer)
/// writes for the same weights; a type whose blocks do not fit the row (Q4_K on 32 values) takes
/// llama-quantize's fallback (Q5_0).
#[test]
fn quantized_projections_hold_llama_quantizes_bytes() {
    let refs = candle_core::safetensors::load(fixtures().join("ref-quant.safetensors"), &Device::Cpu).unwrap();
    for (asked, held) in [("q8_0", QuantType::Q8_0), ("q4_0", QuantType::Q4_0), ("q5_1", QuantType::Q5_1), ("q4_k", QuantType::Q5_0)] {
        let m = fixture_model("tiny-mistral-f32", "every:4", "f32", asked);
        let tag = held.name().to_uppercase();
        for (layer, proj, name) in [(0, &m.model.blocks[0].self_attn.q_proj, "q_proj"), (1, &m.model.blocks[1].mlp.down_proj, "down_proj")] {
            let q = proj.quantized().unwrap_or_else(|| panic!("{asked}: layer {layer} {name} is not quantized"));
            assert_eq!(q.quant_type(), held, "{asked}: {name}");
            let want = refs[&format!("{tag}/{name}")].to_vec1::<u8>().unwrap();
            assert!(q.row_bytes().unwrap() == want, "{asked}: layer {layer} {name} differs from gguf-py's {tag} bytes");
        }
    }
}

/// Every inserted copy adds exactly zero on quantized weights too: expanded == base bit for bit, with
/// and without skipping, on the fixture (f32 and bf16) and on K-quant-wide synthetic weights.
#[test]
fn quantized_expansion_is_bit_identical_to_the_base() {
    for (model, dtype) in [("tiny-mistral-f32", "f32"), ("tiny-mistral-bf16", "bf16")] {
        for q in ["q8_0", "q4_k"] {
            let input = ids(12, 32000);
            let base = fixture_model(model, "none", dtype, q);
            let mut exp = fixture_model(model, "every:4", dtype, q);
            assert_eq!(exp.model.transparent_layers().len(), 2);
            let want = full(&base.model, &input);
            assert!(bit_identical(&want, &full(&exp.model, &input)), "{model} {q}: expanded");
            exp.model.skip_transparent().unwrap();
            assert!(bit_identical(&want, &full(&exp.model, &input)), "{model} {q}: skipping transparent blocks");
        }
    }
    let (_dir, spec) = wide_config();
    for q in ["q4_k", "q6_k", "q8_0"] {
        let input = ids(20, 512);
        let base = synthetic(&spec, "none", "bf16", Some(q));
        let exp = synthetic(&spec, "every:4", "bf16", Some(q));
        assert_eq!(exp.quant_type().map(|t| t.name()), Some(q));
        assert!(bit_identical(&full(&base, &input), &full(&exp, &input)), "synthetic {q}: expanded");
    }
}

/// Copies share their source's quantized blocks (only the zeroed projections are new), and the
/// bytes held are what `plan --quant` predicts, a fraction of the dense model's.
#[test]
fn quantized_copies_share_blocks_and_sizes_add_up() {
    let (_dir, spec) = wide_config();
    let dense = synthetic(&spec, "every:4", "bf16", None);
    let q4 = synthetic(&spec, "every:4", "bf16", Some("q4_k"));
    let (src, copy) = (&q4.blocks[3], &q4.blocks[4]);
    assert_eq!(copy.source, 3);
    let id = |l: &expanse::model::Linear| l.quantized().unwrap().storage_id();
    assert_eq!(id(&src.self_attn.qkv_proj), id(&copy.self_attn.qkv_proj));
    assert_eq!(id(&src.self_attn.q_proj), id(&src.self_attn.v_proj), "q and v are rows of one stacked matrix");
    assert_eq!(id(&src.mlp.gate_up_proj), id(&copy.mlp.gate_up_proj));
    assert_ne!(id(&src.self_attn.o_proj), id(&copy.self_attn.o_proj));
    assert!(copy.transparent && !src.transparent);
    let cfg = expanse::synthetic::config(&spec).unwrap();
    let plan = expanse::expand::Plan::from_spec("every:4", cfg.num_hidden_layers, &spec).unwrap();
    assert_eq!(q4.weight_bytes, plan.totals_as(&cfg, DType::BF16, Some(QuantType::Q4K)).allocated_bytes);
    assert_eq!(dense.weight_bytes, plan.totals(&cfg, DType::BF16).allocated_bytes);
    // Projections at 4.5 bits instead of 16; the embedding (512 × 256) stays bf16.
    let embed = 512 * 256 * 2;
    let ratio = (q4.weight_bytes - embed) as f64 / (dense.weight_bytes - embed) as f64;
    assert!((ratio - 4.5 / 16.0).abs() < 0.01, "quantized / dense bytes {ratio}");
}

/// ‖a − b‖ / ‖b‖ over all logits (NaN, and so failing every bound, when either holds a non-finite value).
fn relative_error(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (expanse::compare::f32_values(a).unwrap(), expanse::compare::f32_values(b).unwrap());
    let d: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let n: f32 = b.iter().map(|y| y * y).sum();
    if a.iter().chain(&b).all(|x| x.is_finite()) {
        (d / n).sqrt()
    } else {
        f32::NAN
    }
}

/// The quantized product is llama.cpp's: the weights' blocks times the activations quantized to 8 bits
/// per block (Q8_0 beside Q4_0/Q5_0/Q8_0, Q8_1 beside Q4_1/Q5_1, Q8_K beside the K-quants; by ggml's
/// x86 rounding rule, `quant::cpu_product`), summed in f32. Checked against that product written out
/// here from dequantized values, on fresh random inputs, and against the unquantized product (a few
/// tenths of a percent away).
#[test]
fn quantized_product_is_dequantized_weights_times_8_bit_activations() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use rand::Rng;
    let mut rng = test_rng("quantized_product_is_dequantized_weights_times_8_bit_activations");
    let (rows, cols, n) = (48, 512, 3);
    let normal = |rng: &mut rand::rngs::StdRng, len: usize| -> Vec<f32> { (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect() };
    let w = Tensor::from_vec(normal(&mut rng, rows * cols), (rows, cols), &Device::Cpu).unwrap();
    let x = Tensor::from_vec(normal(&mut rng, n * cols), (n, cols), &Device::Cpu).unwrap();
    for q in QuantType::ALL {
        let m = expanse::quant::QMatrix::quantize("w", &w, q, &Device::Cpu).unwrap();
        let got = m.forward(&x).unwrap();
        let x8 = expanse::quant::cpu_product::activations_as_multiplied(&x.flatten_all().unwrap().to_vec1().unwrap(), n, cols, q.ggml()).unwrap();
        let x8 = Tensor::from_vec(x8, (n, cols), &Device::Cpu).unwrap();
        let wq = m.dequantize().unwrap();
        let want = x8.matmul(&wq.t().unwrap()).unwrap();
        let exact = relative_error(&got, &want);
        // candle's own activation rounding (ggml's reference C rule) differs only where a value sits on
        // a rounding step: an independent check of the blocks' scale and layout.
        let activations = if matches!(q, QuantType::Q4K | QuantType::Q5K | QuantType::Q6K) { GgmlDType::Q8K } else { GgmlDType::Q8_0 };
        let x8c = QTensor::quantize(&x, activations).unwrap().dequantize(&Device::Cpu).unwrap();
        let near = relative_error(&got, &x8c.matmul(&wq.t().unwrap()).unwrap());
        assert!(near < 5e-3, "{}: {near} from the product with candle's rounding of the activations", q.name());
        // Q4_1 and Q5_1 pair with Q8_1, whose block sums (the offset's factor) are stored in f16.
        let bound = if matches!(q, QuantType::Q4_1 | QuantType::Q5_1) { 2e-3 } else { 1e-5 };
        assert!(exact < bound, "{}: {exact} from dequantized weights × 8-bit activations", q.name());
        let unquantized = relative_error(&got, &x.matmul(&w.t().unwrap()).unwrap());
        assert!(unquantized > exact && unquantized < 0.1, "{}: {unquantized} from the unquantized product", q.name());
        // A view of some rows (q of a stacked qkv) gives those rows' columns of the product.
        let view = m.rows(16, 8).unwrap().forward(&x).unwrap();
        assert!(bit_identical(&view, &got.narrow(1, 16, 8).unwrap()), "{}: row view", q.name());
    }
}

/// On the fixture against transformers' f32 logits: more bits, nearer. (The fixture's weights are a
/// random initialisation, its logits small and nearly flat, so relative errors run larger than on a
/// trained model; the product itself is checked exactly above.)
#[test]
fn quantized_logits_approach_transformers_as_bits_grow() {
    let (ids, want) = reference("ref-mistral-f32.safetensors");
    let mut errs = Vec::new();
    for q in ["q8_0", "q5_1", "q4_0"] {
        let m = fixture_model("tiny-mistral-f32", "every:4", "f32", q);
        let got = full(&m.model, &ids);
        let err = relative_error(&got, &want);
        eprintln!("{q}: ‖Δ‖/‖logits‖ against transformers {err:.5}");
        errs.push(err);
    }
    assert!(errs[0] < 0.1 && errs[0] < errs[1] && errs[1] < errs[2], "error should grow as bits fall: {errs:?}");
}

/// A quantized model decodes on the CPU's fused step (`auto`, after its self-check), with the same
/// greedy tokens as the reference path. A type that does not exist is refused naming --quant.
#[test]
fn quantized_models_run_the_fused_step_and_bad_types_are_refused() {
    let model = fixture("tiny-mistral-f32");
    let run = |path: &str| {
        let out = expanse(&[
            "generate",
            "--model",
            &model,
            "--quant",
            "q8_0",
            "--raw",
            "--prompt",
            "Hi",
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            "--decode-path",
            path,
        ]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{path}: {err}");
        (String::from_utf8_lossy(&out.stdout).to_string(), err)
    };
    let (auto, err) = run("auto");
    assert!(err.contains("decode path: fused"), "{err}");
    let (reference, err) = run("reference");
    assert!(err.contains("decode path: reference"), "{err}");
    assert_eq!(auto, reference, "greedy text on the fused step and the reference path");
    let out = expanse(&["plan", "--model", &model, "--quant", "q3_x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.lines().count() == 1 && err.contains("--quant") && err.contains("q4_k"), "{err}");
}

/// `verify --quant` proves the quantized expansion bit-exact with its quantized base, and `--against`
/// finds mergekit's merged checkpoint, quantized the same way, equal block for block (its −0.0 zeros
/// quantize to the same bytes as the in-memory +0.0).
#[test]
fn verify_proves_the_quantized_expansion_and_matches_mergekit() {
    let args = ["verify", "--model", &fixture("tiny-mistral-bf16"), "--quant", "q8_0", "--steps", "1", "--json"];
    let merged = fixture("tiny-mergekit-every4-bf16");
    for extra in [&[][..], &["--against", &merged][..]] {
        let out = expanse(&[&args[..], extra].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{extra:?}: {err}");
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["quant"], "q8_0");
        assert_eq!(r["expanded"]["overall"]["bit_exact"], true, "{extra:?}: {}", r["expanded"]["overall"]);
        if !extra.is_empty() {
            assert_eq!(r["against"]["differing_tensors"], serde_json::json!([]));
            assert_eq!(r["against"]["tensors_compared"].as_u64(), Some(3 + 10 * 9));
            assert_eq!(r["against"]["comparison"]["overall"]["bit_exact"], true);
        }
    }
}

/// A weight past f16's range cannot be quantized (every type stores its block scales in f16; a
/// scale past it would read back as NaN or zeros): refused naming the tensor and the flag.
#[test]
fn weights_beyond_f16_are_refused_naming_the_tensor() {
    let mut v = vec![0.5f32; 4 * 256];
    v[300] = 1e7;
    let w = Tensor::from_vec(v, (4, 256), &Device::Cpu).unwrap();
    for q in QuantType::ALL {
        let e = expanse::quant::quantize_to_bytes("model.layers.2.mlp.down_proj.weight", &w, q).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("--quant") && msg.contains("down_proj") && e.exit_code() == 2, "{}: {msg}", q.name());
    }
    let w = w.clamp(-65504f32, 65504f32).unwrap();
    assert!(expanse::quant::quantize_to_bytes("w", &w, QuantType::Q8_0).is_ok(), "f16's largest value is quantizable");
}

/// A NaN or ±Inf in a row of activations makes that row's outputs NaN, as a dense product would:
/// quantizing activations would otherwise turn it into zeros and hide it from every check.
#[test]
fn non_finite_activations_stay_visible_through_the_quantized_product() {
    let w = Tensor::from_vec((0..32 * 256).map(|i| ((i % 97) as f32 - 48.0) / 64.0).collect::<Vec<_>>(), (32, 256), &Device::Cpu).unwrap();
    let m = expanse::quant::QMatrix::quantize("w", &w, QuantType::Q8_0, &Device::Cpu).unwrap();
    for bad in [f32::NAN, f32::INFINITY] {
        let mut x = vec![0.25f32; 2 * 256];
        x[256 + 7] = bad;
        let y = m.forward(&Tensor::from_vec(x, (2, 256), &Device::Cpu).unwrap()).unwrap().to_vec2::<f32>().unwrap();
        assert!(y[0].iter().all(|v| v.is_finite()), "{bad}: the clean row stays finite");
        assert!(y[1].iter().all(|v| v.is_nan()), "{bad}: the row holding it is NaN");
    }
}

/// The model names the type asked for; projections that took llama-quantize's fallback are counted
/// in a note, and a model none of whose rows fit gets a warning and runs dense.
#[test]
fn fallbacks_and_unquantizable_shapes_are_reported() {
    let m = fixture_model("tiny-mistral-f32", "every:4", "f32", "q4_k");
    assert_eq!(m.model.quant_type(), Some(QuantType::Q4K));
    assert_eq!(m.model.projection_types(), vec![("q5_0", 4 * 10 + 1)]);
    assert!(m.notices.iter().any(|n| n.contains("--quant q4_k") && n.contains("41 q5_0")), "{:?}", m.notices);
    let (_dir, spec) = config_with(&[("hidden_size", "40"), ("intermediate_size", "72"), ("head_dim", "10")]);
    let opts = LoadOptions::new(&spec).dtype("f32").quant("q4_k");
    let (_, model) = engine::load_synthetic(&spec, &opts, &Device::Cpu).unwrap();
    assert_eq!(model.quant_type(), None);
    let notes = engine::quant_notices(&model, &opts).unwrap();
    assert!(notes.len() == 1 && notes[0].contains("no projection"), "{notes:?}");
}

/// `plan --quant` predicts the bytes the loader holds, for YAML plans that scale parts of a stacked
/// projection too (the whole stack is then new), and tied heads that cannot be quantized.
#[test]
fn plan_totals_are_what_the_loader_holds() {
    let yaml = fixture("mergekit-scaled.yml");
    for quant in [None, Some("q8_0"), Some("q4_k")] {
        let mut opts = LoadOptions::new(fixture("tiny-mistral-bf16")).expand(&yaml).dtype("bf16");
        if let Some(q) = quant {
            opts = opts.quant(q);
        }
        let m = engine::load(&opts).unwrap();
        let want = m.plan.totals_as(&m.source.config, DType::BF16, opts.quant_type().unwrap()).allocated_bytes;
        assert_eq!(m.model.weight_bytes, want, "{quant:?}");
    }
    let (_dir, spec) = config_with(&[("hidden_size", "40"), ("head_dim", "10"), ("tie_word_embeddings", "true")]);
    let cfg = expanse::synthetic::config(&spec).unwrap();
    let model = synthetic(&spec, "every:4", "f32", Some("q8_0"));
    let plan = expanse::expand::Plan::from_spec("every:4", cfg.num_hidden_layers, &spec).unwrap();
    assert_eq!(model.weight_bytes, plan.totals_as(&cfg, DType::F32, Some(QuantType::Q8_0)).allocated_bytes);
}
