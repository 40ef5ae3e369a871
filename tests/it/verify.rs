//! `expanse verify`: passes on exact expansions, fails naming the right block on a fine-tuned model and on
//! an altered merged checkpoint, and reproduces the statistics transformers computed (ref-finetuned.json).

use std::fs;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use expanse::cmd::verify::{self, Prompts, VerifyOptions, VerifyReport};
use expanse::engine::LoadOptions;
use expanse::loader::{write_safetensors, Checkpoint};
use serde_json::Value;

use crate::common::*;

fn ref_json(name: &str) -> Value {
    serde_json::from_str(&fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

/// Runs `expanse verify ARGS --json`; returns (exit code, report JSON, stderr).
fn verify_cli(args: &[&str]) -> (i32, Value, String) {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = expanse(&all);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}); stderr: {err}"));
    (out.status.code().unwrap(), json, err)
}

fn blocks(comparison: &Value) -> Vec<(u64, f64, bool)> {
    comparison["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["layer"].as_u64().unwrap(), b["relative_delta"].as_f64().unwrap(), b["identical"].as_bool().unwrap()))
        .collect()
}

/// Every inserted block reported exactly transparent and the logits bit-exact.
fn assert_transparent(c: &Value, what: &str) {
    let o = &c["overall"];
    assert_eq!(o["bit_exact"], true, "{what}: {c}");
    assert_eq!(o["max_abs_diff"].as_f64(), Some(0.0), "{what}");
    assert_eq!(o["kl_max"].as_f64(), Some(0.0), "{what}");
    assert_eq!(o["top1_agreement"].as_f64(), Some(1.0), "{what}");
    let b = blocks(c);
    assert_eq!(b.iter().map(|x| x.0).collect::<Vec<_>>(), vec![4, 9], "{what}");
    assert!(b.iter().all(|&(_, d, same)| d == 0.0 && same), "{what}: {b:?}");
}

#[test]
fn passes_on_tiny_fixtures_f32_and_bf16() {
    for (model, dtype) in [("tiny-mistral-f32", "float32"), ("tiny-mistral-bf16", "bfloat16")] {
        let (code, r, err) = verify_cli(&["--model", &fixture(model), "--steps", "3", "--device", "cpu"]);
        assert_eq!(code, 0, "{model}: {err}");
        assert_eq!(r["dtype"], dtype);
        assert_eq!(r["verdict"]["pass"], true);
        assert_eq!(r["inserted"], serde_json::json!([4, 9]));
        assert_eq!(r["rendering"], "chat template (tokenizer_config.json)", "the checkpoint's own template");
        assert_transparent(&r["expanded"], model);
        let prompts = r["expanded"]["prompts"].as_array().unwrap();
        assert_eq!(prompts.len(), 4, "short, multilingual, code, long");
        // Every prefill position and every step was compared.
        let want: u64 = prompts.iter().map(|p| p["prompt_tokens"].as_u64().unwrap() + 3).sum();
        assert_eq!(r["expanded"]["overall"]["positions"].as_u64(), Some(want));
        // The long prompt reaches past the fixture's sliding window of 8.
        let longest = prompts.iter().map(|p| p["prompt_tokens"].as_u64().unwrap()).max().unwrap();
        assert!(longest > 8 + 16, "longest prompt {longest}");
    }
}

#[test]
fn table_output_and_exit_code() {
    let out = expanse(&["verify", "--model", &fixture("tiny-mistral-f32"), "--steps", "1", "--prompt", "Hello"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("| inserted layer |") && text.contains("| 4 | 3 | 0 | 0 | yes |"), "{text}");
    assert!(text.trim_end().lines().last().unwrap().starts_with("PASS"), "{text}");
    // No progress bar leaks into a pipe.
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn passes_against_mergekit_output() {
    let merged = fixture("tiny-mergekit-every4-bf16");
    let (code, r, err) = verify_cli(&["--model", &fixture("tiny-mistral-bf16"), "--against", &merged, "--steps", "2"]);
    assert_eq!(code, 0, "{err}");
    let a = &r["against"];
    assert_eq!(a["differing_tensors"], serde_json::json!([]));
    assert_eq!(a["tensors_compared"].as_u64(), Some(3 + 10 * 9), "embeddings, norm, lm_head and 9 per layer");
    assert_transparent(&a["comparison"], "mergekit output");
    assert_transparent(&r["expanded"], "in-memory");
}

#[test]
fn fine_tuned_block_fails_and_is_named() {
    let ft = fixture("tiny-finetuned-bf16");
    let base = fixture("tiny-mistral-bf16");
    for extra in [&["--expand", "none"][..], &["--expand", "none", "--base", &base][..]] {
        let mut args = vec!["--model", ft.as_str(), "--steps", "2"];
        args.extend_from_slice(extra);
        let (code, r, err) = verify_cli(&args);
        assert_eq!(code, 1, "{extra:?}: {err}");
        assert_eq!(r["inserted"], serde_json::json!([4, 9]), "layer 4 (o_proj trained) and layer 9 are found");
        assert_eq!(r["verdict"]["pass"], false);
        assert_eq!(r["verdict"]["worst_block"].as_u64(), Some(4));
        assert!(err.lines().any(|l| l.starts_with("FAIL") && l.contains("layer 4")), "{err}");
        let b = blocks(&r["expanded"]);
        assert!(b[0].0 == 4 && b[0].1 > 0.0 && !b[0].2, "{b:?}");
        assert!(b[1].0 == 9 && b[1].1 == 0.0 && b[1].2, "{b:?}");
        assert_eq!(r["expanded"]["overall"]["bit_exact"], false);
    }
}

/// A copy of the mergekit output in a temp dir with one tensor replaced.
fn altered_merge(tmp: &Path, tensor: &str) {
    let src = fixtures().join("tiny-mergekit-every4-bf16");
    for e in fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        fs::copy(&p, tmp.join(p.file_name().unwrap())).unwrap();
    }
    let file = tmp.join("model.safetensors");
    let ck = Checkpoint::open(std::slice::from_ref(&file)).unwrap();
    let mut tensors: Vec<(String, Tensor)> =
        ck.names().into_iter().map(|n| (n.to_string(), ck.load(n, &ck.entry(n).unwrap().shape.clone(), &Device::Cpu).unwrap())).collect();
    drop(ck);
    let t = tensors.iter_mut().find(|(n, _)| n == tensor).unwrap();
    t.1 = (Tensor::randn(0f32, 0.02, t.1.dims(), &Device::Cpu).unwrap()).to_dtype(DType::BF16).unwrap();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_safetensors(&file, &refs, None).unwrap();
}

#[test]
fn altered_merged_checkpoint_fails_naming_the_block() {
    let tmp = tempfile::tempdir().unwrap();
    altered_merge(tmp.path(), "model.layers.9.mlp.down_proj.weight");
    let dir = tmp.path().display().to_string();
    let (code, r, err) = verify_cli(&["--model", &fixture("tiny-mistral-bf16"), "--against", &dir, "--steps", "2"]);
    assert_eq!(code, 1, "{err}");
    let a = &r["against"];
    let names: Vec<&str> = a["differing_tensors"].as_array().unwrap().iter().map(|d| d["tensor"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["model.layers.9.mlp.down_proj.weight"]);
    assert_eq!(a["differing_layers"], serde_json::json!([9]));
    assert_eq!(a["comparison"]["overall"]["bit_exact"], false);
    // The in-memory expansion is still exact; the altered block alone contributes.
    assert_transparent(&r["expanded"], "in-memory");
    let b = blocks(&a["comparison"]);
    assert!(b.iter().all(|&(l, d, same)| if l == 9 { d > 0.0 && !same } else { d == 0.0 && same }), "{b:?}");
    assert_eq!(r["verdict"]["worst_block"].as_u64(), Some(9));
    assert!(err.contains("FAIL") && err.contains("layer(s) 9"), "{err}");
}

#[test]
fn altered_original_layer_is_named_though_inserted_blocks_stay_transparent() {
    let tmp = tempfile::tempdir().unwrap();
    altered_merge(tmp.path(), "model.layers.2.self_attn.q_proj.weight");
    let dir = tmp.path().display().to_string();
    let (code, r, err) = verify_cli(&["--model", &fixture("tiny-mistral-bf16"), "--against", &dir, "--steps", "1"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(r["against"]["differing_layers"], serde_json::json!([2]));
    assert_eq!(r["against"]["comparison"]["overall"]["bit_exact"], false);
    let b = blocks(&r["against"]["comparison"]);
    assert!(b.iter().all(|&(_, d, same)| d == 0.0 && same), "zero projections still add nothing: {b:?}");
    assert_eq!(r["verdict"]["worst_block"].as_u64(), Some(2));
}

#[test]
fn prompts_file_one_per_line() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prompts.txt");
    fs::write(&file, "Hello\n\nfn main() {}\n").unwrap();
    let (code, r, err) = verify_cli(&["--model", &fixture("tiny-mistral-f32"), "--prompts", file.to_str().unwrap(), "--steps", "1", "--raw"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["rendering"], "raw");
    assert_eq!(r["expanded"]["prompts"].as_array().unwrap().len(), 2);
    assert_transparent(&r["expanded"], "prompts file");
}

fn fox() -> (Value, Vec<u32>) {
    let r = ref_json("ref-finetuned.json");
    let ids = r["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    (r, ids)
}

fn close(got: f64, want: f64, rel: f64, what: &str) {
    assert!((got - want).abs() <= rel * want.abs(), "{what}: got {got}, transformers {want}");
}

#[test]
fn statistics_match_transformers_on_its_own_logits() {
    // The metric code alone, on the logits transformers produced for base and fine-tuned model.
    let (r, _) = fox();
    let file = fixtures().join("ref-finetuned-logits.safetensors");
    let ck = Checkpoint::open(std::slice::from_ref(&file)).unwrap();
    let get = |n: &str| ck.load(n, &ck.entry(n).unwrap().shape.clone(), &Device::Cpu).unwrap();
    let s = verify::logit_stats(&get("logits_every4"), &get("logits")).unwrap();
    assert_eq!(s.positions, 12);
    assert_eq!(s.max_abs_diff as f64, r["max_abs_diff"].as_f64().unwrap());
    assert_eq!(s.top1_agreement as f32, r["top1_agreement"].as_f64().unwrap() as f32);
    // transformers summed the KL in f32 (relative rounding ~1e-4 on a sum of cancelling terms); ours is f64.
    close(s.kl_mean, r["kl_mean"].as_f64().unwrap(), 1e-3, "kl_mean");
    close(s.kl_max, r["kl_max"].as_f64().unwrap(), 1e-3, "kl_max");
    assert!(!s.bit_exact);
    // Equal values in different bits: +0.0 against −0.0 in one column (mergekit's zero scaling writes
    // −0.0) is still bit-exact, with no distance between the two.
    let a = get("logits");
    let (n, vocab) = a.dims2().unwrap();
    let zeros = Tensor::zeros((n, 1), DType::F32, &Device::Cpu).unwrap();
    let rest = a.narrow(1, 1, vocab - 1).unwrap();
    let plus = Tensor::cat(&[&zeros, &rest], 1).unwrap();
    let minus = Tensor::cat(&[&zeros.neg().unwrap(), &rest], 1).unwrap();
    assert!(!bit_identical(&plus, &minus), "the two must differ in their bits");
    let same = verify::logit_stats(&plus, &minus).unwrap();
    assert!(same.bit_exact && same.kl_max == 0.0 && same.max_abs_diff == 0.0 && same.top1_agreement == 1.0, "{same:?}");
    // A constant added to every logit leaves the distribution alone: KL ≈ 0, the same argmax, and a
    // max |Δ| equal to the shift.
    let shifted = verify::logit_stats(&a, &(&a + 0.5).unwrap()).unwrap();
    assert!(!shifted.bit_exact && shifted.top1_agreement == 1.0 && shifted.kl_max < 1e-9, "{shifted:?}");
    assert!((shifted.max_abs_diff - 0.5).abs() < 1e-5, "{shifted:?}");
}

fn fox_report(model: &str, base: Option<&str>) -> VerifyReport {
    let (_, ids) = fox();
    let mut o = VerifyOptions::new(LoadOptions::new(fixture(model)).expand("none").dtype("bf16").device("cpu"));
    o.prompts = Prompts::Ids(vec![ids]);
    o.raw = true;
    o.steps = 0;
    o.base = base.map(fixture);
    verify::verify(&o, None).unwrap()
}

#[test]
fn end_to_end_figures_match_transformers() {
    let (r, _) = fox();
    for base in [None, Some("tiny-mistral-bf16")] {
        let rep = fox_report("tiny-finetuned-bf16", base);
        assert!(!rep.verdict.pass);
        let s = &rep.expanded.overall;
        assert_eq!(s.positions, 12);
        let b4 = &rep.expanded.blocks[0];
        assert_eq!((b4.layer, rep.expanded.blocks[1].layer), (4, 9));
        // ‖Δh‖/‖h‖ is a hidden-state norm: robust to the last-bit differences between candle's and
        // PyTorch's bf16 kernels.
        close(b4.relative_delta, r["block_contribution"]["4"].as_f64().unwrap(), 0.01, "block 4");
        assert_eq!(rep.expanded.blocks[1].relative_delta, r["block_contribution"]["9"].as_f64().unwrap());
        // Logit-level figures move with those kernel differences (a bf16 ulp of a logit near 4 is 1/32,
        // and top-1 flips where the margin is below it): KL within 10%, max |Δ| within 2 ulp, top-1
        // within one of the 12 positions.
        close(s.kl_mean, r["kl_mean"].as_f64().unwrap(), 0.1, "kl_mean");
        close(s.kl_max, r["kl_max"].as_f64().unwrap(), 0.1, "kl_max");
        assert!((s.max_abs_diff as f64 - r["max_abs_diff"].as_f64().unwrap()).abs() <= 0.0625, "{}", s.max_abs_diff);
        assert!((s.top1_agreement - r["top1_agreement"].as_f64().unwrap()).abs() <= 1.0 / 12.0 + 1e-6, "{}", s.top1_agreement);
    }
    // transformers' transparent check: the unmodified merge is exactly its base.
    let t = &r["transparent_check"];
    let rep = fox_report(t["model"].as_str().unwrap(), None);
    let s = &rep.expanded.overall;
    assert!(rep.verdict.pass && s.bit_exact);
    assert_eq!(s.max_abs_diff as f64, t["max_abs_diff"].as_f64().unwrap());
    assert_eq!(s.kl_mean, t["kl_mean"].as_f64().unwrap());
    assert_eq!(s.kl_max, t["kl_max"].as_f64().unwrap());
    assert_eq!(s.top1_agreement, t["top1_agreement"].as_f64().unwrap());
    for b in &rep.expanded.blocks {
        assert_eq!(b.relative_delta, t["block_contribution"][b.layer.to_string()].as_f64().unwrap());
    }
}

#[test]
fn tolerance_decides_for_fine_tuned_models() {
    let (r, ids) = fox();
    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let ids = ids.join(",");
    let want = r["max_abs_diff"].as_f64().unwrap();
    let ft = fixture("tiny-finetuned-bf16");
    let run = |tol: f64| verify_cli(&["--model", &ft, "--expand", "none", "--ids", &ids, "--steps", "0", "--tolerance", &tol.to_string()]);
    let (code, rep, err) = run(2.0 * want);
    assert_eq!(code, 0, "{err}");
    assert_eq!(rep["verdict"]["pass"], true);
    let (code, _, _) = run(want / 4.0);
    assert_eq!(code, 1);
}

#[test]
fn synthetic_weights_pass() {
    let cfg = fixture("tiny-mistral-f32/config.json");
    for dtype in ["f32", "bf16"] {
        let (code, r, err) = verify_cli(&["--synthetic", &cfg, "--dtype", dtype, "--device", "cpu", "--steps", "2"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(r["rendering"], "random token ids");
        assert_transparent(&r["expanded"], dtype);
        assert_eq!(r["expanded"]["prompts"].as_array().unwrap().len(), 2);
    }
}

#[test]
fn chat_rendering_matches_the_openchat_template() {
    // transformers' apply_chat_template for [{"role": "user", "content": "Hello"}].
    let r = ref_json("ref-greedy-f32.json");
    let want: Vec<u32> = r["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let dir = fixtures().join("openchat-tokenizer");
    let tok = expanse::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let config = dir.join("tokenizer_config.json");
    // The checkpoint's own template (tokenizer_config.json) and the built-in one give OpenChat's ids.
    for spec in [None, Some("openchat")] {
        let t = expanse::template::ChatTemplate::resolve(spec, Some(&dir), Some(&config)).unwrap();
        assert_eq!(verify::encode_prompt(&tok, "Hello", Some(&t)).unwrap(), want, "{spec:?}");
    }
    let (_, fox_ids) = fox();
    assert_eq!(verify::encode_prompt(&tok, "The quick brown fox jumps over the lazy dog", None).unwrap(), fox_ids);
}

/// Bad input: exit 2 with one `error:` line naming the flag or file.
fn bad(args: &[&str], needle: &str) {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    let out = expanse(&all);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("WARNING")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "`{needle}` missing: {err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_input_exits_2() {
    let m = fixture("tiny-mistral-bf16");
    let cfg = fixture("tiny-mistral-f32/config.json");
    bad(&["--model", &m, "--expand", "none"], "--expand");
    bad(&["--model", &m, "--ids", "1,99999999"], "--ids");
    bad(&["--model", &m, "--ids", "1,x"], "--ids");
    bad(&["--model", &m, "--prompts", "/nonexistent/prompts.txt"], "/nonexistent/prompts.txt");
    bad(&["--model", &m, "--steps", "1000"], "--steps");
    bad(&["--model", &m, "--tolerance=-1"], "--tolerance");
    bad(&["--model", &fixture("tiny-finetuned-bf16"), "--expand", "none", "--base", &fixture("tiny-llama-f32")], "--base");
    bad(&["--synthetic", &cfg, "--prompt", "hi"], "--prompt");
    bad(&["--synthetic", &cfg, "--against", &fixture("tiny-mergekit-every4-bf16")], "--against");
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("prompts.txt");
    fs::write(&empty, "\n  \n").unwrap();
    bad(&["--model", &m, "--prompts", empty.to_str().unwrap()], "prompts.txt");
}
