//! The fused decode step on the CPU against the reference forward pass: logits, expanded == base,
//! skip == base, and the launch budget counted by the step's one dispatch function.

use candle_core::{DType, Tensor};
use expanse::engine::ids_tensor;
use expanse::model::{Cache, Logits, Model};
use expanse::step::{DecodePath, DecodeStep, StepOptions, StepOut};

use crate::common::{bit_identical, load};

/// A prompt crossing the fixtures' sliding window (8), then ids decoded one at a time.
const PROMPT: [u32; 11] = [1, 415, 2936, 9060, 285, 1142, 28705, 28740, 28750, 28770, 13];
const DECODE: [u32; 14] = [1014, 2696, 6153, 754, 272, 17898, 3914, 28723, 2, 32000, 100, 200, 300, 31999];

/// `ids` folded into the model's vocabulary (the Llama fixture has 1,000 entries).
fn ids(model: &Model, ids: &[u32]) -> Vec<u32> {
    ids.iter().map(|&i| i % model.config.vocab_size as u32).collect()
}

fn prefilled(model: &Model) -> Cache {
    let mut cache = Cache::new(model, PROMPT.len() + DECODE.len()).unwrap();
    model.forward(&ids_tensor(&ids(model, &PROMPT), &model.device).unwrap(), &mut cache, Logits::Last).unwrap();
    cache
}

/// Logits `[vocab]` (f32) of each decoded id through the reference forward pass.
fn reference_decode(model: &Model) -> Vec<Tensor> {
    let mut cache = prefilled(model);
    ids(model, &DECODE)
        .into_iter()
        .map(|id| {
            let l = model.forward(&ids_tensor(&[id], &model.device).unwrap(), &mut cache, Logits::Last).unwrap();
            l.squeeze(0).unwrap().to_dtype(DType::F32).unwrap()
        })
        .collect()
}

/// Logits of each decoded id through the fused step, and the launches of the last token.
fn fused_decode(model: &Model, opts: &StepOptions) -> (Vec<Tensor>, usize) {
    let mut cache = prefilled(model);
    let mut step = DecodeStep::new(model, &cache, DecodePath::Fused, opts).unwrap();
    let logits = ids(model, &DECODE)
        .into_iter()
        .map(|id| match step.decode(&mut cache, id, true).unwrap() {
            StepOut::Logits(l) => l,
            StepOut::Token(_) => panic!("asked for logits"),
        })
        .collect();
    (logits, step.launches_per_token())
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / m.max(f32::MIN_POSITIVE)
}

#[test]
fn fused_step_is_the_reference_decode_on_the_cpu() {
    // Unsplit, the CPU step calls the same kernels with the same roundings as the reference decode,
    // so the logits are the same bits, in f32 and in bf16, expanded or not.
    for (fixture, dtype) in [("tiny-mistral-f32", "f32"), ("tiny-mistral-bf16", "bf16"), ("tiny-llama-f32", "f32")] {
        for expand in ["none", "every:4"] {
            let m = load(fixture, expand, dtype);
            let want = reference_decode(&m.model);
            let (got, _) = fused_decode(&m.model, &StepOptions::default());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(bit_identical(g, w), "{fixture} {expand} token {i}: max rel diff {}", rel_diff(g, w));
            }
        }
    }
}

#[test]
fn split_attention_matches_the_reference() {
    // Flash-decoding splits (what a GPU runs) with the combine pass: f32 within 1e-5 relative,
    // bf16 with the same top-1 wherever the reference's top-2 margin exceeds 2 bf16 ulps.
    let opts = StepOptions { splits: Some(3), ..Default::default() };
    for (dtype, tol) in [("f32", 1e-5f32), ("bf16", f32::INFINITY)] {
        let m = load(&format!("tiny-mistral-{dtype}"), "every:4", dtype);
        let want = reference_decode(&m.model);
        let (got, _) = fused_decode(&m.model, &opts);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(rel_diff(g, w) <= tol, "{dtype} token {i}: {}", rel_diff(g, w));
            if let Err(e) = crate::common::top1_agrees(g, w, 2.0) {
                panic!("{dtype} token {i}: {e}");
            }
        }
    }
}

#[test]
fn expanded_and_skip_equal_base_bit_for_bit_on_the_fused_path() {
    for dtype in ["f32", "bf16"] {
        let fixture = format!("tiny-mistral-{dtype}");
        let base = fused_decode(&load(&fixture, "none", dtype).model, &StepOptions::default()).0;
        let expanded = load(&fixture, "every:4", dtype);
        let mut skip = load(&fixture, "every:4", dtype);
        skip.model.skip_transparent().unwrap();
        for opts in [StepOptions::default(), StepOptions { splits: Some(2), ..Default::default() }] {
            let base = if opts.splits.is_some() { fused_decode(&load(&fixture, "none", dtype).model, &opts).0 } else { base.clone() };
            for (name, m) in [("expanded", &expanded.model), ("skip", &skip.model)] {
                let got = fused_decode(m, &opts).0;
                for (i, (g, b)) in got.iter().zip(&base).enumerate() {
                    assert!(bit_identical(g, b), "{dtype} {name} splits {:?} token {i}", opts.splits);
                }
            }
        }
    }
}

#[test]
fn launches_stay_within_nine_per_executed_layer() {
    for (expand, skip, splits) in [("none", false, 1), ("every:4", false, 1), ("every:4", false, 4), ("every:4", true, 4)] {
        let mut m = load("tiny-mistral-bf16", expand, "bf16");
        if skip {
            m.model.skip_transparent().unwrap();
        }
        let executed = m.model.blocks.iter().filter(|b| m.model.runs(b)).count();
        let (_, launches) = fused_decode(&m.model, &StepOptions { splits: Some(splits), ..Default::default() });
        // Counted by the dispatch function while the token ran, not taken from the plan.
        let per_layer = if splits > 1 { 9 } else { 8 };
        assert_eq!(launches, per_layer * executed + 3, "{expand} skip={skip} splits={splits}");
        assert!(launches <= 9 * executed + 4);
    }
}
