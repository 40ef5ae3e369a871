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
    let rows: Vec<Tensor> =
        ids.iter().map(|&id| model.forward(&ids_tensor(&[id], &model.device).unwrap(), &mut cache, Logits::Last).unwrap().squeeze(0).unwrap()).collect();
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
fn bf16_decode_path_matches_transformers() {
    // Token by token through the KV cache: the path every generated token takes (decode attention
    // and the bf16 GEMV), against transformers' bf16 eager forward, which make_fixtures.py checks to
    // equal its own token-by-token decode through its cache.
    let (ids, want) = reference("ref-mistral-bf16.safetensors");
    let (ids32, f32_ref) = reference("ref-mistral-f32.safetensors");
    assert_eq!(ids, ids32);
    let theirs = expanse::cmd::verify::logit_stats(&f32_ref, &want).unwrap();
    for expand in ["none", "every:4"] {
        let m = load("tiny-mistral-bf16", expand, "auto");
        assert_eq!(m.model.dtype, DType::BF16);
        let got = stepwise(&m.model, &ids).to_dtype(DType::F32).unwrap();
        let (g, w) = (got.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        let mut decided = 0;
        for (pos, (g, w)) in g.iter().zip(&w).enumerate() {
            // Where transformers' own top two are within 2 bf16 ulps, rounding alone may swap them.
            let top1 = expanse::compare::Top1::new(g, w);
            assert!(top1.agrees(2.0), "--expand {expand}: position {pos}: {top1}");
            decided += usize::from(top1.margin_ulps > 2.0);
        }
        assert!(decided >= ids.len() / 2, "only {decided} positions have a clear top-1");
        let ours = expanse::cmd::verify::logit_stats(&f32_ref, &got).unwrap();
        println!("--expand {expand}: {decided} positions decided; KL to f32 {:.3e} (transformers' bf16 {:.3e})", ours.kl_mean, theirs.kl_mean);
        assert!(ours.kl_mean <= 1.25 * theirs.kl_mean, "--expand {expand}: KL to f32 {:.3e}, transformers' bf16 {:.3e}", ours.kl_mean, theirs.kl_mean);
    }
}

#[test]
fn llama_with_tied_embeddings_matches_transformers() {
    let (ids, want) = reference("ref-llama-f32.safetensors");
    let m = load("tiny-llama-f32", "every:2", "auto");
    assert_eq!(m.model.blocks.len(), 6);
    let d = max_abs_diff(&full(&m.model, &ids), &want);
    assert!(d < 1e-4, "max |Δ| {d}");
}

/// Llama 3's RoPE scaling (rope_type llama3) against transformers: from the config.json, and from
/// the GGUF llama.cpp's converter wrote of the same checkpoint (its `rope_freqs.weight` divisors),
/// expanded and not, all at once and one token at a time (the decode path reads the same tables).
#[test]
fn llama3_rope_scaling_matches_transformers() {
    let (ids, want) = reference("ref-llama3-rope-f32.safetensors");
    let unscaled = full(&load("tiny-llama-f32", "none", "f32").model, &ids);
    assert!(max_abs_diff(&unscaled, &want) > 0.05, "the scaling must move these logits, or this test could not see it missing");
    for model in ["tiny-llama3-rope-f32", "gguf/tiny-llama3-rope-f32.gguf"] {
        for expand in ["none", "every:2"] {
            let m = load(model, expand, "f32");
            assert!(m.model.config.rope_scaling.is_some(), "{model}");
            let d = max_abs_diff(&full(&m.model, &ids), &want);
            assert!(d < 1e-4, "{model} --expand {expand}: max |Δ| {d}");
            let d = max_abs_diff(&stepwise(&m.model, &ids), &want);
            assert!(d < 1e-4, "{model} --expand {expand}, one token at a time: max |Δ| {d}");
        }
    }
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

/// Every position's logits, and the next token's after them (which reads every cached key and
/// value), with the prompt run in chunks ending at `cuts`.
fn in_chunks(model: &Model, ids: &[u32], cuts: &[usize]) -> (Tensor, Tensor) {
    let mut cache = Cache::new(model, ids.len() + 1).unwrap();
    let ends = cuts.iter().copied().chain([ids.len()]);
    let mut start = 0;
    let mut rows = vec![];
    for end in ends {
        rows.push(model.forward(&ids_tensor(&ids[start..end], &model.device).unwrap(), &mut cache, Logits::All).unwrap());
        start = end;
    }
    let next = model.forward(&ids_tensor(&[7], &model.device).unwrap(), &mut cache, Logits::Last).unwrap();
    (Tensor::cat(&rows, 1).unwrap(), next)
}

/// Where `Model::prompt_rows_invariant` says so (the CPU with dense f32/bf16 weights), a prompt's
/// logits and cached keys and values are the same bits however it is cut into chunks of two tokens
/// or more: what lets serve reuse a cached prompt to the token. Tiny fixtures (positions past the
/// sliding window) and a synthetic model whose products span several depth blocks of the GEMM; a
/// quantized model says it is not invariant.
#[test]
fn prompt_positions_are_the_same_bits_in_any_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(fixtures().join("tiny-mistral-f32/config.json")).unwrap();
    let wide = text.replace("\"hidden_size\": 32", "\"hidden_size\": 256").replace("\"intermediate_size\": 64", "\"intermediate_size\": 1152");
    let wide = wide.replace("\"head_dim\": 8", "\"head_dim\": 64").replace("\"num_hidden_layers\": 8", "\"num_hidden_layers\": 2");
    std::fs::write(&config, wide).unwrap();
    let synthetic = |dtype: &str| {
        let opts = expanse::engine::LoadOptions::new("synthetic").dtype(dtype).expand("none");
        expanse::engine::load_synthetic(config.to_str().unwrap(), &opts, &candle_core::Device::Cpu).unwrap().1
    };
    let ids: Vec<u32> = (0..40).map(|i| (i * 7919 % 31999 + 1) as u32).collect();
    let models = [
        ("tiny f32", load("tiny-mistral-f32", "every:4", "f32").model),
        ("tiny bf16", load("tiny-mistral-bf16", "every:4", "bf16").model),
        ("synthetic f32", synthetic("f32")),
        ("synthetic bf16", synthetic("bf16")),
    ];
    for (name, model) in &models {
        assert!(model.prompt_rows_invariant(), "{name}");
        let (all, next) = in_chunks(model, &ids, &[]);
        for cuts in [vec![2], vec![17], vec![3, 5, 9, 30], vec![38], (2..40).step_by(2).collect()] {
            let (got, got_next) = in_chunks(model, &ids, &cuts);
            assert!(bit_identical(&got, &all), "{name}: a prompt cut at {cuts:?} changed its logits");
            assert!(bit_identical(&got_next, &next), "{name}: a prompt cut at {cuts:?} changed its cache");
        }
    }
    let quantized = expanse::engine::load(&expanse::engine::LoadOptions::new(fixture("tiny-mistral-f32")).quant("q8_0")).unwrap();
    assert!(!quantized.model.prompt_rows_invariant(), "q8_0 weights");
}

#[test]
fn copies_share_their_source_storage() {
    let exp = load("tiny-mistral-f32", "every:4", "f32");
    let base = load("tiny-mistral-f32", "none", "f32");
    let (src, copy) = (&exp.model.blocks[3], &exp.model.blocks[4]);
    assert_eq!(copy.source, 3);
    let shared = |a: &candle_core::Tensor, b: &candle_core::Tensor| expanse::model::shares_storage(a, b);
    assert!(shared(src.self_attn.q_proj.dense().unwrap(), copy.self_attn.q_proj.dense().unwrap()));
    assert!(shared(src.self_attn.qkv_proj.dense().unwrap(), copy.self_attn.qkv_proj.dense().unwrap()));
    assert!(shared(src.mlp.up_proj.dense().unwrap(), copy.mlp.up_proj.dense().unwrap()));
    assert!(!shared(src.self_attn.o_proj.dense().unwrap(), copy.self_attn.o_proj.dense().unwrap()));
    assert!(!shared(src.mlp.down_proj.dense().unwrap(), copy.mlp.down_proj.dense().unwrap()));
    // Q/K/V are rows of one stacked weight, gate/up of another: no second copy of either.
    assert!(shared(src.self_attn.q_proj.dense().unwrap(), src.self_attn.v_proj.dense().unwrap()));
    assert!(shared(src.mlp.gate_proj.dense().unwrap(), src.mlp.up_proj.dense().unwrap()));
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
            let o = b.self_attn.o_proj.dense().unwrap();
            assert!(expanse::model::storage_bytes([o, b.mlp.down_proj.dense().unwrap()]) <= 2 * 4, "{dtype}: released");
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

#[test]
fn each_command_takes_only_the_flags_it_uses() {
    let m = fixture("tiny-mistral-bf16");
    let preset = "openchat-3.5-0106";
    let cases: [(&[&str], &str); 11] = [
        (&["inspect", "--model", &m, "--expand", "none"], "--expand"),
        (&["inspect", "--model", &m, "--device", "cpu"], "--device"),
        (&["inspect", "--model", &m, "--dtype", "f32"], "--dtype"),
        (&["inspect", "--model", &m, "--skip-transparent"], "--skip-transparent"),
        (&["plan", "--model", &m, "--skip-transparent"], "--skip-transparent"),
        (&["verify", "--model", &m, "--skip-transparent"], "--skip-transparent"),
        (&["plan", "--synthetic", preset, "--model", &m], "--model"),
        (&["bench", "--synthetic", preset, "--model", &m], "--model"),
        (&["verify", "--synthetic", preset, "--revision", "main"], "--revision"),
        (&["generate", "--model", &m, "--raw", "--system", "Be brief.", "--prompt", "Hi"], "--system"),
        (&["generate", "--model", &m, "--raw", "--chat-template", "openchat", "--prompt", "Hi"], "--chat-template"),
    ];
    for (args, flag) in cases {
        let out = expanse(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.lines().count() == 1 && err.starts_with("error: ") && err.contains(flag), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // The usage hints clap adds stay out of the line, its tips stay in; --help is still help.
    let out = expanse(&["generate", "--model", &m, "--promt", "Hi"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().count() == 1 && err.contains("--prompt") && !err.contains("Usage"), "{err}");
    let help = expanse(&["plan", "--help"]);
    assert!(help.status.success() && String::from_utf8_lossy(&help.stdout).contains("--synthetic"));
}

#[test]
fn byte_bars_draw_on_a_terminal_only() {
    let tmp = tempfile::tempdir().unwrap();
    let logits = tmp.path().join("l.safetensors").display().to_string();
    let out = tmp.path().join("out").display().to_string();
    let model = fixture("tiny-mistral-f32");
    let load = ["logits", "--model", &model, "--device", "cpu", "--ids", "1,2,3", "--out", &logits];
    let write = ["expand", "--model", &model, "--out", &out, "--force"];
    // Piped: no bar, only the result.
    for args in [&load[..], &write[..]] {
        let run = expanse(args);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{err}");
        assert!(!err.contains("eta") && !err.contains('\r'), "{args:?}: {err}");
    }
    // On a terminal: the bytes read (the f32 checkpoint) or written (its 10-layer expansion), rate, time left.
    for (args, bar) in [(&load[..], r"loading .+/8\.10 MiB .+/s eta"), (&write[..], r"writing .+/8\.17 MiB .+/s eta")] {
        let mut p = rexpect::session::spawn_command(command(args), Some(30_000)).unwrap();
        p.exp_regex(bar).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        p.exp_eof().unwrap();
    }
}
