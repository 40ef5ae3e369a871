//! The forward pass against Hugging Face transformers, and the expansion's bit-exact transparency.

use candle_core::{DType, Tensor};
use expanse::engine::ids_tensor;
use expanse::model::{Cache, Logits, Model};

use crate::common::*;

fn full(model: &Model, ids: &[u32]) -> Tensor {
    let mut cache = Cache::new(model, ids.len()).unwrap();
    model.forward(&ids_tensor(ids, &model.device).unwrap(), &mut cache, Logits::All).unwrap().squeeze(0).unwrap()
}

/// Logits of each position computed one token at a time through the KV cache.
fn stepwise(model: &Model, ids: &[u32]) -> Tensor {
    let mut cache = Cache::new(model, ids.len()).unwrap();
    let rows: Vec<Tensor> = ids
        .iter()
        .map(|&id| model.forward(&ids_tensor(&[id], &model.device).unwrap(), &mut cache, Logits::Last).unwrap().squeeze(0).unwrap())
        .collect();
    Tensor::stack(&rows, 0).unwrap()
}

#[test]
fn f32_logits_match_transformers() {
    let (ids, want) = reference("ref-mistral-f32.safetensors");
    assert!(ids.len() > 8, "the reference must be longer than the sliding window");
    for expand in ["none", "every:4"] {
        let m = load("tiny-mistral-f32", expand, "auto");
        assert_eq!(m.model.dtype, DType::F32);
        let got = full(&m.model, &ids);
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "--expand {expand}: max |Δ| {d} against transformers");
    }
}

#[test]
fn bf16_argmax_matches_transformers() {
    let (ids, want) = reference("ref-mistral-bf16.safetensors");
    let m = load("tiny-mistral-bf16", "every:4", "auto");
    assert_eq!(m.model.dtype, DType::BF16);
    let got = full(&m.model, &ids);
    assert_eq!(argmax(&got), argmax(&want));
    let d = max_abs_diff(&got, &want);
    // One bf16 ulp of a logit near 20 is 0.125; transformers' own bf16-vs-f32 gap here is ~0.48.
    assert!(d < 0.25, "max |Δ| {d}");
}

#[test]
fn llama_with_tied_embeddings_matches_transformers() {
    let (ids, want) = reference("ref-llama-f32.safetensors");
    let m = load("tiny-llama-f32", "every:2", "auto");
    assert_eq!(m.model.blocks.len(), 6);
    let d = max_abs_diff(&full(&m.model, &ids), &want);
    assert!(d < 1e-4, "max |Δ| {d}");
}

#[test]
fn expanded_is_bit_identical_to_base() {
    let (ids, _) = reference("ref-mistral-f32.safetensors");
    for (model, dtype) in [("tiny-mistral-f32", "f32"), ("tiny-mistral-bf16", "bf16")] {
        let base = load(model, "none", dtype);
        let exp = load(model, "every:4", dtype);
        assert_eq!(exp.model.blocks.len(), 10);
        assert_eq!(exp.model.transparent_layers(), vec![4, 9]);
        assert!(bit_identical(&full(&base.model, &ids), &full(&exp.model, &ids)), "{model}: full forward");
        assert!(bit_identical(&stepwise(&base.model, &ids), &stepwise(&exp.model, &ids)), "{model}: token by token");
        let mut skip = exp.model.clone();
        skip.skip_transparent().unwrap();
        assert!(bit_identical(&full(&base.model, &ids), &full(&skip, &ids)), "{model}: skipping transparent blocks");
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let (ids, _) = reference("ref-mistral-f32.safetensors");
    let m = load("tiny-mistral-f32", "every:4", "f32");
    let d = max_abs_diff(&full(&m.model, &ids), &stepwise(&m.model, &ids));
    assert!(d < 1e-4, "max |Δ| {d}");
    // Prefill in two chunks, then the rest step by step.
    let mut cache = Cache::new(&m.model, ids.len()).unwrap();
    let a = m.model.forward(&ids_tensor(&ids[..5], &m.model.device).unwrap(), &mut cache, Logits::All).unwrap();
    let b = m.model.forward(&ids_tensor(&ids[5..], &m.model.device).unwrap(), &mut cache, Logits::All).unwrap();
    let chunked = Tensor::cat(&[a, b], 1).unwrap().squeeze(0).unwrap();
    assert!(max_abs_diff(&chunked, &full(&m.model, &ids)) < 1e-4);
}

#[test]
fn copies_share_their_source_storage() {
    let exp = load("tiny-mistral-f32", "every:4", "f32");
    let base = load("tiny-mistral-f32", "none", "f32");
    let (src, copy) = (&exp.model.blocks[3], &exp.model.blocks[4]);
    assert_eq!(copy.source, 3);
    let shared = |a: &candle_core::Tensor, b: &candle_core::Tensor| expanse::model::shares_storage(a, b);
    assert!(shared(&src.self_attn.q_proj.weight, &copy.self_attn.q_proj.weight));
    assert!(shared(&src.self_attn.qkv_proj.weight, &copy.self_attn.qkv_proj.weight));
    assert!(shared(&src.mlp.up_proj.weight, &copy.mlp.up_proj.weight));
    assert!(!shared(&src.self_attn.o_proj.weight, &copy.self_attn.o_proj.weight));
    assert!(!shared(&src.mlp.down_proj.weight, &copy.mlp.down_proj.weight));
    // Q/K/V are rows of one stacked weight, gate/up of another: no second copy of either.
    assert!(shared(&src.self_attn.q_proj.weight, &src.self_attn.v_proj.weight));
    assert!(shared(&src.mlp.gate_proj.weight, &src.mlp.up_proj.weight));
    // Only the zeroed projections are new memory.
    let cfg = &base.source.config;
    let extra = exp.model.weight_bytes - base.model.weight_bytes;
    let o = cfg.hidden_size * cfg.num_attention_heads * cfg.head_dim * 4;
    let down = cfg.hidden_size * cfg.intermediate_size * 4;
    assert_eq!(extra, 2 * (o + down), "two inserted blocks, each with a new o_proj and down_proj");
    assert_eq!(exp.model.weight_bytes, exp.plan.totals(cfg, DType::F32).allocated_bytes, "stacking Q/K/V and gate/up adds nothing");
}

#[test]
fn skip_transparent_holds_no_zero_projections_and_changes_nothing() {
    let (ids, _) = reference("ref-mistral-f32.safetensors");
    for dtype in ["f32", "bf16"] {
        let base = load("tiny-mistral-f32", "none", dtype);
        let mut opts = expanse::engine::LoadOptions::new(fixture("tiny-mistral-f32")).expand("every:4").dtype(dtype);
        opts.skip_transparent = true;
        let skip = expanse::engine::load(&opts).unwrap();
        assert_eq!(skip.model.transparent_layers(), vec![4, 9]);
        assert!(skip.model.skips_transparent());
        // Not even the zero projections: the skipping model holds the base model's bytes plus one
        // zero element behind each of the 4 released projections (2 blocks × o_proj, down_proj).
        let el = skip.model.dtype.size_in_bytes();
        assert_eq!(skip.model.weight_bytes, base.model.weight_bytes + 4 * el, "{dtype}");
        for b in skip.model.blocks.iter().filter(|b| b.transparent) {
            let o = &b.self_attn.o_proj.weight;
            assert!(expanse::model::storage_bytes([o, &b.mlp.down_proj.weight]) <= 2 * 4, "{dtype}: released");
            assert!(expanse::model::values_equal(o, &o.zeros_like().unwrap()).unwrap(), "still reads as zeros");
        }
        assert!(bit_identical(&full(&base.model, &ids), &full(&skip.model, &ids)), "{dtype}: full forward");
        assert!(bit_identical(&stepwise(&base.model, &ids), &stepwise(&skip.model, &ids)), "{dtype}: token by token");
    }
}

#[test]
fn plan_of_the_public_40_layer_yaml_equals_every_4() {
    let yaml = fixtures().join("openchat-3.5-0106-40layers.yml");
    let from_yaml = expanse::expand::Plan::from_mergekit_file(&yaml, 32, "openchat/openchat-3.5-0106").unwrap();
    let every = expanse::expand::Plan::every(4, 32).unwrap();
    assert!(from_yaml.warnings.is_empty(), "{:?}", from_yaml.warnings);
    assert_eq!(from_yaml.layers, every.layers);
    for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] {
        assert_eq!(expanse::expand::scale_for(&from_yaml.embed_scale, name), 1.0);
        assert_eq!(expanse::expand::scale_for(&from_yaml.head_scale, name), 1.0);
    }
    assert_eq!(from_yaml.dtype, Some(DType::BF16));
}

#[test]
fn synthetic_weights_are_random_and_expansion_is_transparent() {
    let cfg = fixture("tiny-mistral-f32/config.json");
    let dev = candle_core::Device::Cpu;
    let opts = |e: &str| expanse::engine::LoadOptions::new("synthetic").expand(e).dtype("f32");
    let (_, base) = expanse::engine::load_synthetic(&cfg, &opts("none"), &dev).unwrap();
    let (plan, exp) = expanse::engine::load_synthetic(&cfg, &opts("every:4"), &dev).unwrap();
    assert_eq!(plan.layers.len(), 10);
    assert!(base.transparent_layers().is_empty(), "random weights are never zero");
    assert_eq!(exp.transparent_layers(), vec![4, 9]);
    let ids = [1u32, 20, 300, 4000, 5, 6, 7, 8, 9, 10, 11, 12];
    assert!(bit_identical(&full(&base, &ids), &full(&exp, &ids)));
    assert!(expanse::synthetic::config("no-such-preset").is_err());
    assert_eq!(expanse::synthetic::config("openchat-3.5-0106").unwrap().num_hidden_layers, 32);
}
