//! `expanse bench` on the tiny fixture (report structure, the statistics of its samples, the parameters
//! and weight bytes of each variant against the config — no speed thresholds), and `--skip-transparent`
//! only ever skipping blocks verified zero at load time.

use expanse::cmd::bench::{self, BenchOptions, BenchTarget, Variant};
use expanse::engine::ids_tensor;
use expanse::model::{Cache, Logits, Model};

use crate::common::*;

fn small_opts() -> BenchOptions {
    BenchOptions { prefill: 16, decode: 8, depth: 4, repetitions: 2, warmup: 1, ..BenchOptions::default() }
}

/// Sizes from tiny-mistral-f32's config.json alone (not through expanse's config parser): parameters
/// of one decoder layer, of what lies outside the layers, of one layer's o_proj + down_proj, and of
/// what a token reads outside the layers (final norm, lm_head, one embedding row).
fn sizes_from_config() -> (usize, usize, usize, usize) {
    let text = std::fs::read_to_string(fixtures().join("tiny-mistral-f32/config.json")).unwrap();
    let c: serde_json::Value = serde_json::from_str(&text).unwrap();
    let n = |k: &str| c[k].as_u64().unwrap() as usize;
    let (v, h, i) = (n("vocab_size"), n("hidden_size"), n("intermediate_size"));
    let (q, kv) = (n("num_attention_heads") * n("head_dim"), n("num_key_value_heads") * n("head_dim"));
    let zeroed = q * h + h * i;
    let layer = 2 * h + (q + 2 * kv) * h + zeroed + 2 * h * i;
    let head = if c["tie_word_embeddings"].as_bool().unwrap() { 0 } else { v * h };
    (layer, v * h + h + head, zeroed, h + v * h + h)
}

/// Mean, sample standard deviation and median, the textbook way.
fn summary(xs: &[f64]) -> (f64, f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let sd = (xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)).sqrt();
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    let median = if s.len() % 2 == 1 { s[mid] } else { (s[mid - 1] + s[mid]) / 2.0 };
    (mean, sd, median)
}

#[test]
fn bench_report_has_every_variant_and_its_figures_add_up() {
    let m = load("tiny-mistral-f32", "every:4", "f32");
    let target = BenchTarget { name: "tiny".into(), plan: &m.plan, model: &m.model };
    let mut calls = 0;
    let report = bench::measure(&target, &small_opts(), |_, done, total| {
        calls += 1;
        assert!(done <= total);
    })
    .unwrap();
    assert_eq!(calls, 3 * 2 * 3, "one progress call per run, warmups included");
    assert_eq!(report.rows.len(), 6);
    let (layer, outside, zeroed, read_outside) = sizes_from_config();
    // Parameters executed per token, and bytes of distinct f32 weight storage held and read: the base's
    // 8 layers; the expanded stack runs 10, whose copies share their source's tensors except the two
    // zero projections each; skip runs the base's layers only.
    let expected = [
        (Variant::Base, 8, 8, outside + 8 * layer, 4 * (outside + 8 * layer)),
        (Variant::Expanded, 10, 10, outside + 10 * layer, 4 * (outside + 8 * layer + 2 * zeroed)),
        (Variant::Skip, 10, 8, outside + 8 * layer, 4 * (outside + 8 * layer)),
    ];
    let base_means: Vec<f64> = report.rows.iter().filter(|r| r.variant == Variant::Base).map(|r| r.mean_tps).collect();
    for (variant, layers, executed, params, bytes) in expected {
        let rows: Vec<_> = report.rows.iter().filter(|r| r.variant == variant).collect();
        assert_eq!(rows.iter().map(|r| r.test.as_str()).collect::<Vec<_>>(), ["pp16@d4", "tg8@d4"]);
        for (r, base_mean) in rows.into_iter().zip(&base_means) {
            assert_eq!((r.layers, r.executed_layers, r.params), (layers, executed, params), "{variant:?}");
            assert_eq!(r.samples.len(), 2);
            assert!(r.samples.iter().all(|&s| s > 0.0 && s.is_finite()), "{variant:?} {}: {:?}", r.test, r.samples);
            let (mean, sd, median) = summary(&r.samples);
            let near = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
            assert!(near(r.mean_tps, mean) && near(r.sd_tps, sd) && near(r.median_tps, median), "{variant:?} {}: {r:?}", r.test);
            assert!(r.ratio_to_base.is_some_and(|x| near(x, mean / base_mean)), "{variant:?}: {r:?}");
            check_op_profile(r, executed);
        }
        let m = report.memory.iter().find(|m| m.variant == variant).unwrap();
        assert_eq!(m.weights_held_bytes, bytes, "{variant:?}");
        // A token streams every executed block again, a copy's included, though copies share storage.
        assert_eq!(m.streamed_per_token_bytes, 4 * (executed * layer + read_outside), "{variant:?}");
    }
    assert_eq!(report.memory.len(), 3);
    for m in &report.memory {
        if cfg!(target_os = "linux") {
            // The weights alone are ~8 MB, so a resident set below that is not this process's.
            assert!(
                m.host_peak_bytes.is_some_and(|b| b as usize > m.weights_held_bytes) && m.host_rss_bytes.is_some_and(|b| b as usize > m.weights_held_bytes)
            );
        }
    }
    let table = report.to_string();
    assert!(table.contains("| model | plan | variant |") && table.contains("| skip |"), "{table}");
    assert!(table.contains("op profile, expanded tg8@d4 fused (context 12") && table.contains("gate_up_proj"), "{table}");
    let json: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 6);
    assert_eq!(json["rows"][0]["variant"], "base");
}

/// A decode row on the fused step carries every op kind of the step, timed, with the bytes the
/// config says it must move; a prefill row none.
fn check_op_profile(r: &bench::BenchRow, executed: usize) {
    let Some(ops) = &r.op_profile else {
        assert!(r.test.starts_with("pp"), "{} {:?}: a decode row on the fused step without its op profile", r.test, r.variant);
        return;
    };
    assert!(r.test.starts_with("tg"), "{}: a prefill row has no op profile", r.test);
    let names: Vec<&str> = ops.iter().map(|o| o.op).collect();
    let per_layer = ["input_layernorm", "qkv_proj", "rope_kv", "attention", "o_proj", "post_attention_layernorm", "gate_up_proj", "down_proj"];
    assert_eq!(names, [&per_layer[..], &["norm", "lm_head", "argmax"]].concat(), "{:?}", r.variant);
    assert_eq!(ops.iter().map(|o| o.launches).sum::<usize>(), r.launches_per_token.unwrap(), "the kinds' launches are the token's");
    for o in ops {
        assert_eq!(o.launches, if per_layer.contains(&o.op) { executed } else { 1 }, "{}", o.op);
        assert!(o.measured_us > 0.0 && o.measured_us.is_finite(), "{}: {}", o.op, o.measured_us);
        assert!(o.roofline_us.is_none(), "no copy bandwidth is measured on the CPU");
    }
    // The weights each projection streams (f32), from config.json alone: rows × cols + input + output.
    let text = std::fs::read_to_string(fixtures().join("tiny-mistral-f32/config.json")).unwrap();
    let c: serde_json::Value = serde_json::from_str(&text).unwrap();
    let n = |k: &str| c[k].as_u64().unwrap() as usize;
    let (h, i, v) = (n("hidden_size"), n("intermediate_size"), n("vocab_size"));
    let qkv = (n("num_attention_heads") + 2 * n("num_key_value_heads")) * n("head_dim");
    let gemv = |rows: usize, cols: usize| 4 * (rows * cols + rows + cols) as u64;
    let bytes = |op: &str| ops.iter().find(|o| o.op == op).unwrap().bytes;
    assert_eq!(bytes("qkv_proj"), executed as u64 * gemv(qkv, h));
    assert_eq!(bytes("down_proj"), executed as u64 * gemv(h, i));
    assert_eq!(bytes("lm_head"), gemv(v, h));
}

#[test]
fn bench_command_prints_table_and_json() {
    let model = fixture("tiny-mistral-bf16");
    let args = ["bench", "--model", &model, "--device", "cpu", "-p", "8", "-n", "4", "-r", "1", "--warmup", "0", "-t", "1"];
    let out = expanse(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("| pp8 |") && text.contains("| tg4 |"), "{text}");
    let mut json_args = args.to_vec();
    json_args.extend(["--json", "--variants", "expanded,skip"]);
    let out = expanse(&json_args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rows"].as_array().unwrap().len(), 4);
    assert_eq!(v["threads"], 1, "-t sets the thread count");
    assert!(v["rows"][0]["ratio_to_base"].is_null(), "no base row, no ratio");
    // Too long for the fixture's context: a usage error, not a crash.
    let out = expanse(&["bench", "--model", &model, "--device", "cpu", "-p", "100000"]);
    assert_eq!(out.status.code(), Some(2));
    let out = expanse(&["bench", "--model", &model, "--device", "cpu", "-t", "0"]);
    assert_eq!(out.status.code(), Some(2), "-t 0 is a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--threads"), "the error names the flag");
}

#[test]
fn bench_runs_synthetic_config() {
    let cfg = fixtures().join("tiny-mistral-f32/config.json").display().to_string();
    let out = expanse(&["bench", "--synthetic", &cfg, "--device", "cpu", "-p", "8", "-n", "2", "-r", "1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["model"].as_str().unwrap().starts_with("synthetic:"));
    // The rows it documents: every variant (default every:4 on the config's 8 layers), a prefill and a
    // decode test each, with positive finite speeds; the decode rows on the CPU's fused path.
    let rows = v["rows"].as_array().unwrap();
    let got: Vec<(&str, &str, u64, u64)> = rows
        .iter()
        .map(|r| (r["variant"].as_str().unwrap(), r["test"].as_str().unwrap(), r["layers"].as_u64().unwrap(), r["executed_layers"].as_u64().unwrap()))
        .collect();
    let want = [
        ("base", "pp8", 8, 8),
        ("base", "tg2", 8, 8),
        ("expanded", "pp8", 10, 10),
        ("expanded", "tg2", 10, 10),
        ("skip", "pp8", 10, 8),
        ("skip", "tg2", 10, 8),
    ];
    assert_eq!(got, want);
    for r in rows {
        let tps = r["mean_tps"].as_f64().unwrap();
        assert!(tps > 0.0 && tps.is_finite(), "{r}");
        let want_path = if r["test"].as_str().unwrap().starts_with("tg") { "fused" } else { "reference" };
        assert_eq!(r["path"], want_path, "{r}");
    }
    let memory: Vec<&str> = v["memory"].as_array().unwrap().iter().map(|m| m["variant"].as_str().unwrap()).collect();
    assert_eq!(memory, ["base", "expanded", "skip"]);
}

fn logits(model: &Model, ids: &[u32]) -> candle_core::Tensor {
    let mut cache = Cache::new(model, ids.len()).unwrap();
    model.forward(&ids_tensor(ids, &model.device).unwrap(), &mut cache, Logits::All).unwrap()
}

#[test]
fn skip_transparent_only_skips_verified_zero_blocks() {
    // A "fine-tuned" expanded checkpoint, loaded as is: its layer 4 was trained (non-zero o_proj) and
    // must run; layer 9 is still an exact identity and may be skipped.
    let m = load("tiny-finetuned-bf16", "none", "auto");
    assert!(!m.model.blocks[4].transparent, "layer 4 has a non-zero o_proj");
    assert!(m.model.blocks[9].transparent, "layer 9 is still transparent");
    assert_eq!(m.model.transparent_layers(), vec![9]);
    let (ids, _) = reference("ref-mistral-bf16.safetensors");
    let mut skip = m.model.clone();
    skip.skip_transparent().unwrap();
    assert!(bit_identical(&logits(&m.model, &ids), &logits(&skip, &ids)), "skipping layer 9 changes nothing");
    let mut trace = Vec::new();
    let mut cache = Cache::new(&skip, ids.len()).unwrap();
    skip.forward_traced(&ids_tensor(&ids, &skip.device).unwrap(), &mut cache, Logits::Last, Some(&mut trace)).unwrap();
    let skipped: Vec<usize> = trace.iter().filter(|t| t.skipped).map(|t| t.layer).collect();
    assert_eq!(skipped, vec![9], "layer 4 executes even with --skip-transparent");
    // Skipping layer 4 anyway (as a plan-trusting engine would) does change the output.
    let mut wrong = m.model.clone();
    wrong.blocks[4].transparent = true;
    wrong.skip_transparent().unwrap();
    assert!(!bit_identical(&logits(&m.model, &ids), &logits(&wrong, &ids)));
}

#[test]
fn bench_with_skip_transparent_runs_base_and_skip_only() {
    let cfg = fixtures().join("tiny-mistral-f32/config.json").display().to_string();
    let args = ["bench", "--synthetic", &cfg, "--device", "cpu", "--expand", "every:4", "--skip-transparent", "-p", "4", "-n", "2", "-r", "1", "--warmup", "0"];
    let mut json = args.to_vec();
    json.push("--json");
    let out = expanse(&json);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let variants: Vec<&str> = v["memory"].as_array().unwrap().iter().map(|m| m["variant"].as_str().unwrap()).collect();
    assert_eq!(variants, ["base", "skip"], "the expanded variant's zero projections were freed at load");
    // Asking for the expanded variant anyway is a usage error naming the flag.
    let mut expanded = args.to_vec();
    expanded.extend(["--variants", "base,expanded"]);
    let out = expanse(&expanded);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--skip-transparent") && !err.contains("panicked"), "{err}");
}

/// `-b 1,3`: one batched decode row per batch size and variant, after the single-sequence row, whose
/// t/s count every sequence's tokens (tokens = -n × N, samples from that count).
#[test]
fn batched_decode_rows_count_every_sequences_tokens() {
    let m = load("tiny-mistral-f32", "every:4", "f32");
    let target = BenchTarget { name: "tiny".into(), plan: &m.plan, model: &m.model };
    let opts = BenchOptions { prefill: 0, batch: vec![1, 3], variants: vec![Variant::Base], ..small_opts() };
    let report = bench::measure(&target, &opts, |_, _, _| {}).unwrap();
    let tests: Vec<(&str, usize, usize)> = report.rows.iter().map(|r| (r.test.as_str(), r.batch, r.tokens)).collect();
    assert_eq!(tests, [("tg8@d4", 1, 8), ("tg8@d4x1", 1, 8), ("tg8@d4x3", 3, 24)]);
    for r in &report.rows {
        assert_eq!(r.samples.len(), 2);
        assert!(r.samples.iter().all(|s| s.is_finite() && *s > 0.0), "{r:?}");
    }
    let bad = BenchOptions { batch: vec![2], decode: 0, ..opts };
    assert!(bench::measure(&target, &bad, |_, _, _| {}).is_err(), "-b with -n 0 decodes nothing");
}
