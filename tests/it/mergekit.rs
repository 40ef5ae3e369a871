//! The in-memory expansion against mergekit 0.1.5's output on disk, tensor for tensor and logit for logit.

use candle_core::Device;
use expanse::engine::{self, ids_tensor, LoadOptions};
use expanse::expand::{layer_tensor_name, LAYER_TENSORS};
use expanse::loader::Checkpoint;
use expanse::model::{Cache, Logits, Model};

use crate::common::*;

/// Every tensor of the in-memory expansion equals mergekit's bit for bit: the zero projections' −0.0s
/// (mergekit scales in the output dtype, 0.0 × a negative weight) included.
fn assert_same_tensors(model: &Model, merged_dir: &str) {
    let dir = fixtures().join(merged_dir);
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    let ck = Checkpoint::open(&files).unwrap();
    let dev = Device::Cpu;
    let get = |name: &str| {
        let shape = ck.entry(name).unwrap_or_else(|| panic!("mergekit output lacks {name}")).shape.clone();
        ck.load(name, &shape, &dev).unwrap()
    };
    assert!(bit_identical(&model.embed_tokens, &get("model.embed_tokens.weight")));
    assert!(bit_identical(&model.norm, &get("model.norm.weight")));
    assert!(bit_identical(model.lm_head.dense().unwrap(), &get("lm_head.weight")));
    for (i, b) in model.blocks.iter().enumerate() {
        let ours = b.tensors();
        for (suffix, t) in LAYER_TENSORS.iter().zip(ours) {
            let name = layer_tensor_name(i, suffix);
            assert!(bit_identical(t.dense().unwrap(), &get(&name)), "{merged_dir}: {name} differs from mergekit's");
        }
    }
}

fn logits(model: &Model, ids: &[u32]) -> candle_core::Tensor {
    let mut cache = Cache::new(model, ids.len()).unwrap();
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

#[test]
fn inspect_finds_copies_zero_projections_and_modified_copies() {
    let source = expanse::engine::Source::open(&fixture("tiny-mergekit-every4-bf16"), None).unwrap();
    let r = expanse::cmd::inspect::inspect(&source).unwrap();
    assert_eq!(r.layers, 10);
    let copies: Vec<(usize, Option<usize>)> = r.layer_reports.iter().map(|l| (l.layer, l.copy_of)).filter(|(_, c)| c.is_some()).collect();
    assert_eq!(copies, vec![(4, Some(3)), (9, Some(8))]);
    assert_eq!(r.layer_reports[4].zero, vec!["self_attn.o_proj", "mlp.down_proj"]);
    assert!(r.layer_reports[3].zero.is_empty());

    let ft = expanse::engine::Source::open(&fixture("tiny-finetuned-bf16"), None).unwrap();
    let r = expanse::cmd::inspect::inspect(&ft).unwrap();
    assert_eq!(r.layer_reports[4].copy_of, None);
    assert_eq!(r.layer_reports[4].modified_copy_of, Some(3));
    assert_eq!(r.layer_reports[4].differs, vec!["self_attn.o_proj"]);
    assert_eq!(r.layer_reports[9].copy_of, Some(8));
}

#[test]
fn plan_command_prints_the_40_layer_openchat_plan() {
    let out = expanse(&["plan", "--synthetic", "openchat-3.5-0106", "--expand", &fixture("openchat-3.5-0106-40layers.yml"), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["totals"]["layers"], 40);
    assert_eq!(v["totals"]["inserted"], 8);
    // 8 blocks × (o_proj 4096² + down_proj 4096·14336) × 2 bytes ≈ 1.21 GB of new zeros.
    assert_eq!(v["totals"]["new_bytes"], 8 * (4096 * 4096 + 4096 * 14336) * 2);
    let table = expanse(&["plan", "--synthetic", "openchat-3.5-0106"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("32 → 40 layers") && text.contains("o_proj×0, down_proj×0"), "{text}");
}
