//! The fused decode step on the CPU against the reference forward pass: logits, expanded == base,
//! skip == base, and the launch budget counted by the step's one dispatch function.

use candle_core::{DType, Tensor};
use expanse::engine::ids_tensor;
use expanse::model::{Cache, Logits, Model};
use expanse::step::{DecodePath, DecodeStep, StepOptions, StepOut};

use crate::common::bit_identical;

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

/// Logits of each decoded id through the fused step, and the launches of the last token. The cache
/// and the step's buffers lie between guard pages (`load` guards the weights), so the step's
/// raw-pointer loops cannot read or write out of bounds unseen; `reference_decode` stays unguarded
/// (its many small allocations would take a system call each).
fn fused_decode(model: &Model, opts: &StepOptions) -> (Vec<Tensor>, usize) {
    let _guard = expanse_cuda_emulator::guard::scope();
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

/// A fixture loaded with its weights between guard pages (`fused_decode`).
fn load(fixture: &str, expand: &str, dtype: &str) -> expanse::engine::Loaded {
    let _guard = expanse_cuda_emulator::guard::scope();
    crate::common::load(fixture, expand, dtype)
}

/// max |a − b| / max |b| through `expanse::compare` (NaN, failing every bound, on a non-finite value).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    expanse::compare::Diff::of_tensors(a, b).unwrap().rel()
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
fn fused_step_on_quantized_weights_is_the_reference_decode() {
    // The step multiplies a quantized projection through the reference's own product for one row,
    // and rounds around it where the reference rounds: the same bits, for the types `--quant` makes
    // of the fixtures (32 wide: the K-quants fall back to q5_0 as llama-quantize does), in f32, bf16
    // and f16, for a mixed-type GGUF from llama-quantize (q5_0 stacks beside q8_0), expanded or not.
    let quantized = |fixture: &str, expand: &str, dtype: &str, quant: &str| {
        let _guard = expanse_cuda_emulator::guard::scope();
        expanse::engine::load(&expanse::engine::LoadOptions::new(crate::common::fixture(fixture)).expand(expand).dtype(dtype).quant(quant)).unwrap()
    };
    let mut runs = Vec::new();
    for quant in ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"] {
        runs.push((format!("tiny-mistral-f32 {quant}"), quantized("tiny-mistral-f32", "every:4", "f32", quant)));
    }
    runs.push(("tiny-mistral-bf16 q8_0".into(), quantized("tiny-mistral-bf16", "every:4", "bf16", "q8_0")));
    runs.push(("tiny-mistral-f32 as f16, q4_1".into(), quantized("tiny-mistral-f32", "every:4", "f16", "q4_1")));
    for expand in ["none", "every:4"] {
        runs.push((format!("tiny-mistral-q4_k_m.gguf {expand}"), load("gguf/tiny-mistral-q4_k_m.gguf", expand, "f32")));
    }
    for (name, m) in &runs {
        assert!(m.model.quant_type().is_some(), "{name}: not quantized");
        assert_eq!(DecodePath::Auto.resolve(&m.model).unwrap(), DecodePath::Fused, "{name}: auto is the fused path on the CPU");
        let want = reference_decode(&m.model);
        let (got, _) = fused_decode(&m.model, &StepOptions::default());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(bit_identical(g, w), "{name} token {i}: max rel diff {}", rel_diff(g, w));
        }
    }
}

#[test]
fn split_attention_matches_the_reference() {
    // Flash-decoding splits (what a GPU runs) with the combine pass: f32 within 1e-5 relative,
    // bf16 within the self-check's bound and with the same top-1 wherever the reference's top-2
    // margin exceeds 2 bf16 ulps.
    let opts = StepOptions { splits: Some(3), ..Default::default() };
    let bf16_tol = expanse::step::check::Tolerance::for_dtype(DType::BF16).rel;
    for (dtype, tol) in [("f32", 1e-5f32), ("bf16", bf16_tol)] {
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
fn launches_stay_within_eight_per_executed_layer() {
    for (expand, skip, splits) in [("none", false, 1), ("every:4", false, 1), ("every:4", false, 4), ("every:4", true, 4)] {
        let mut m = load("tiny-mistral-bf16", expand, "bf16");
        if skip {
            m.model.skip_transparent().unwrap();
        }
        let executed = m.model.blocks.iter().filter(|b| m.model.runs(b)).count();
        let (_, launches) = fused_decode(&m.model, &StepOptions { splits: Some(splits), ..Default::default() });
        // Counted by the dispatch function while the token ran, not taken from the plan: 8 per
        // layer, split or not (the split attention merges its splits in its own launch), then the
        // final norm, lm_head and argmax.
        assert_eq!(launches, 8 * executed + 3, "{expand} skip={skip} splits={splits}");
    }
}

#[test]
fn generation_runs_on_the_fused_path_after_a_passing_self_check() {
    use expanse::generation::{generate, DecodeOptions, Generator};
    use expanse::sampling::{Sampler, SamplingParams};
    for dtype in ["f32", "bf16"] {
        let m = load(&format!("tiny-mistral-{dtype}"), "every:4", dtype);
        let prompt = ids(&m.model, &PROMPT);
        let mut fast = Generator::with_decode(&m.model, 64, &DecodeOptions::default()).unwrap();
        let reference = DecodeOptions { path: DecodePath::Reference, ..Default::default() };
        let mut slow = Generator::with_decode(&m.model, 64, &reference).unwrap();
        let run =
            |g: &mut Generator| generate(g, &prompt, &mut Sampler::new(SamplingParams::default()), 20, &[], |_| std::ops::ControlFlow::Continue(())).unwrap();
        let (a, b) = (run(&mut fast), run(&mut slow));
        assert_eq!(a.decode_path, DecodePath::Fused, "{dtype}: auto is the fused path on the CPU ({:?})", fast.fallback);
        assert_eq!(b.decode_path, DecodePath::Reference);
        assert_eq!(a.generated, b.generated, "{dtype}: greedy tokens of both paths");
        // The check itself, called here (the generator's verdict is cached per process, so which
        // test runs it first depends on test order): it passes on this step's configuration.
        let v = expanse::step::check::check_path(&m.model, DecodePath::Fused, &StepOptions::default(), &prompt, 64).unwrap();
        assert!(v.pass, "{dtype}: {}", v.warning());
        assert_eq!(v.tokens.len(), 3, "the last prompt position and two decoded tokens");
        // A second turn reuses the cache and stays on the fused path.
        let mut longer = prompt.clone();
        longer.extend(&a.generated);
        longer.push(13);
        let next = generate(&mut fast, &longer, &mut Sampler::new(SamplingParams::default()), 5, &[], |_| std::ops::ControlFlow::Continue(())).unwrap();
        assert!(fast.prefix_reused > prompt.len(), "{dtype}: the next turn reuses the cache");
        assert_eq!(next.decode_path, DecodePath::Fused, "{dtype}: {:?}", fast.fallback);
        // Building (and checking) the step is timed apart from the prompt, once.
        assert!(a.self_check_secs > 0.0, "{dtype}: the first prompt built the step");
        assert_eq!((next.self_check_secs, b.self_check_secs), (0.0, 0.0), "{dtype}: nothing to build on a later turn or the reference path");
    }
}

/// `expanse generate` on the tiny model with `args`: (stdout, stderr, exit code).
fn generate_cli(args: &[&str]) -> (String, String, i32) {
    let model = crate::common::fixture("tiny-mistral-bf16");
    let mut all =
        vec!["generate", "--model", &model, "--prompt", "The capital of France", "--max-tokens", "12", "--temperature", "0", "--chat-template", "none"];
    all.extend_from_slice(args);
    let out = crate::common::expanse(&all);
    (String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into(), out.status.code().unwrap_or(-1))
}

#[test]
fn an_injected_fault_is_named_and_generation_goes_on_on_the_reference_path() {
    let (want, _, code) = generate_cli(&["--decode-path", "reference"]);
    assert_eq!(code, 0);
    // The tiny fixture expanded has blocks 0..10; 4 and 9 are the inserted copies, whose zero down_proj
    // hides any fault in their MLP, so the faults go into source layers.
    for (fault, named) in [
        ("3:o_proj", "layer 3 o_proj"),
        ("0:qkv_proj", "layer 0 qkv_proj"),
        ("8:gate_up_proj", "layer 8 gate_up_proj"),
        ("5:rope_kv", "layer 5 rope_kv"),
        ("2:attention", "layer 2 attention"),
        ("6:post_attention_layernorm", "layer 6 post_attention_layernorm"),
        ("lm_head", "lm_head"),
        ("argmax", "argmax"),
        // One NaN in an op's output: the NaN-blind maximum the check used before missed these.
        ("3:o_proj:nan", "layer 3 o_proj"),
        ("0:qkv_proj:nan", "layer 0 qkv_proj"),
        ("8:gate_up_proj:nan", "layer 8 gate_up_proj"),
        ("6:post_attention_layernorm:nan", "layer 6 post_attention_layernorm"),
        ("2:attention:nan", "layer 2 attention"),
        ("lm_head:nan", "lm_head"),
    ] {
        let (out, err, code) = generate_cli(&["--inject-fault", fault]);
        assert_eq!(code, 0, "{fault}: {err}");
        let first = err.lines().next().unwrap_or("");
        assert!(first.starts_with("warning: the fast decode path disagrees"), "{fault}: {first}");
        assert!(first.contains(&format!("({named}:")), "{fault}: the warning names the op: {first}");
        assert!(first.contains("continuing on the reference path"), "{fault}: {first}");
        assert_eq!(out, want, "{fault}: the answer comes from the reference path");
    }
}

#[test]
fn decode_path_flags_are_checked() {
    let (_, err, code) = generate_cli(&["--decode-path", "graph"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.lines().next().unwrap_or("").contains("--decode-path"), "{err}");
    let (_, err, code) = generate_cli(&["--decode-path", "warp"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--decode-path"), "{err}");
    let (_, err, code) = generate_cli(&["--inject-fault", "3:nope"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--inject-fault"), "{err}");
    let (_, err, code) = generate_cli(&["--inject-fault", "argmax:nan"]);
    assert_eq!(code, 2, "the argmax writes an id, not values: {err}");
    assert!(err.contains("--inject-fault"), "{err}");
    let (_, err, code) = generate_cli(&["--inject-fault", "99:o_proj"]);
    assert_eq!(code, 2, "a fault in a layer the model does not have: {err}");
    assert!(err.contains("--inject-fault"), "{err}");
}

/// Not a check: measures how far the fused step lands from the reference on OpenChat's real shapes
/// (random weights, bf16, CPU) with split attention (f32 throughout, as on a GPU), per token and per
/// op — the figures behind `step::check::Tolerance` (BENCHMARKS.md, "decode self-check"). Run:
/// `cargo test --release --test it step::measure_openchat_shapes -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_openchat_shapes() {
    use expanse::compare::{max_or_nan, Diff, Top1};
    use expanse::step::check;
    let opts = expanse::engine::LoadOptions::new("synthetic").expand("none").dtype("bf16").device("cpu");
    let (_, model) = expanse::engine::load_synthetic("openchat-3.5-0106", &opts, &candle_core::Device::Cpu).unwrap();
    let prompt: Vec<u32> = (0..24u64).map(|i| (expanse::kernels::hash_u32(99, i) % 32000) as u32).collect();
    let n = prompt.len();
    let reference_cache = |model: &Model| {
        let mut c = Cache::new(model, n + 17).unwrap();
        model.forward(&ids_tensor(&prompt[..n - 1], &model.device).unwrap(), &mut c, Logits::Last).unwrap();
        c
    };
    let mut rc = reference_cache(&model);
    let mut fc = reference_cache(&model);
    let mut step = DecodeStep::new(&model, &fc, DecodePath::Fused, &StepOptions { splits: Some(8), ..Default::default() }).unwrap();
    let mut token = prompt[n - 1];
    let (mut worst, mut flips, mut near) = (0f32, 0, 0);
    for i in 0..17 {
        let r = model.forward(&ids_tensor(&[token], &model.device).unwrap(), &mut rc, Logits::Last).unwrap();
        let r = r.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        let StepOut::Logits(f) = step.decode(&mut fc, token, true).unwrap() else { panic!() };
        let f = f.to_vec1::<f32>().unwrap();
        let (d, top1) = (Diff::new(&f, &r), Top1::new(&f, &r));
        let (rel, margin) = (d.rel(), top1.margin_ulps);
        let equal = top1.got.is_some() && top1.got == top1.want;
        flips += usize::from(!equal);
        near += usize::from(margin <= 4.0);
        worst = max_or_nan([worst, rel]);
        println!(
            "MEASURE token {i}: rel {rel:.4e} (max |logit| {:.2}), top-1 {}, reference margin {margin:.1} ulps",
            d.max_want,
            if equal { "equal" } else { "DIFFERENT" }
        );
        token = top1.want.expect("the reference's logits are finite") as u32;
    }
    println!("MEASURE tokens: worst rel {worst:.4e}; top-1 flips {flips}/17; reference margins ≤ 4 ulps: {near}/17");
    let mut per_op: std::collections::BTreeMap<&'static str, f32> = Default::default();
    check::op_by_op(&model, &mut step, &mut fc, &prompt, &mut |op, d| {
        let e = per_op.entry(op.name.as_str()).or_default();
        *e = max_or_nan([*e, d.rel]);
        true
    })
    .unwrap();
    for (name, rel) in per_op {
        println!("MEASURE op {name}: worst rel {rel:.4e}");
    }
}
