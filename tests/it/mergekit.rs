//! The in-memory expansion against mergekit 0.1.5's output on disk, tensor for tensor and logit for logit.

use candle_core::Device;
use expanse::engine::{self, ids_tensor, LoadOptions};
use expanse::expand::{layer_tensor_name, LAYER_TENSORS};
use expanse::loader::Checkpoint;
use expanse::model::{Cache, Logits, Model};

use crate::common::*;

/// Every tensor of the in-memory expansion equals mergekit's (−0.0 == 0.0).
fn assert_same_tensors(model: &Model, merged_dir: &str) {
    let dir = fixtures().join(merged_dir);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    let ck = Checkpoint::open(&files).unwrap();
    let dev = Device::Cpu;
    let get = |name: &str| {
        let shape = ck.entry(name).unwrap_or_else(|| panic!("mergekit output lacks {name}")).shape.clone();
        ck.load(name, &shape, &dev).unwrap()
    };
    assert!(value_identical(&model.embed_tokens, &get("model.embed_tokens.weight")));
    assert!(value_identical(&model.norm, &get("model.norm.weight")));
    assert!(value_identical(&model.lm_head.weight, &get("lm_head.weight")));
    for (i, b) in model.blocks.iter().enumerate() {
        let ours = [
            &b.input_layernorm,
            &b.self_attn.q_proj.weight,
            &b.self_attn.k_proj.weight,
            &b.self_attn.v_proj.weight,
            &b.self_attn.o_proj.weight,
            &b.post_attention_layernorm,
            &b.mlp.gate_proj.weight,
            &b.mlp.up_proj.weight,
            &b.mlp.down_proj.weight,
        ];
        for (suffix, t) in LAYER_TENSORS.iter().zip(ours) {
            let name = layer_tensor_name(i, suffix);
            assert!(value_identical(t, &get(&name)), "{merged_dir}: {name} differs from mergekit's");
        }
    }
}

fn logits(model: &Model, ids: &[u32]) -> candle_core::Tensor {
    let mut cache = Cache::new(model);
    model.forward(&ids_tensor(ids, &model.device).unwrap(), &mut cache, Logits::All).unwrap()
}

#[test]
fn every_4_equals_mergekit_output() {
    let (ids, _) = reference("ref-mistral-bf16.safetensors");
    let yaml = fixture("mergekit-every4.yml");
    for spec in ["every:4", yaml.as_str()] {
        let ours = load("tiny-mistral-bf16", spec, "bf16");
        assert_same_tensors(&ours.model, "tiny-mergekit-every4-bf16");
        let merged = load("tiny-mergekit-every4-bf16", "none", "bf16");
        assert!(bit_identical(&logits(&ours.model, &ids), &logits(&merged.model, &ids)), "--expand {spec}");
    }
}

#[test]
fn scaled_yaml_equals_mergekit_output() {
    let (ids, _) = reference("ref-mistral-bf16.safetensors");
    let opts = LoadOptions::new(fixture("tiny-mistral-bf16")).expand(&fixture("mergekit-scaled.yml")).dtype("bf16");
    let ours = engine::load(&opts).unwrap();
    assert_same_tensors(&ours.model, "tiny-mergekit-scaled-bf16");
    let merged = load("tiny-mergekit-scaled-bf16", "none", "bf16");
    assert!(bit_identical(&logits(&ours.model, &ids), &logits(&merged.model, &ids)));
}

#[test]
fn premerged_checkpoint_is_reported_transparent() {
    let merged = load("tiny-mergekit-every4-bf16", "none", "bf16");
    assert_eq!(merged.model.transparent_layers(), vec![4, 9]);
    assert!(merged.notices.iter().any(|n| n.contains("transparent") && n.contains("4, 9")), "{:?}", merged.notices);
    let base = load("tiny-mistral-bf16", "none", "bf16");
    assert!(base.notices.is_empty(), "{:?}", base.notices);
}
