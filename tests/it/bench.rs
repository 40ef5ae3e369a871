//! `expanse bench` on the tiny fixture (report structure, every figure positive — no speed thresholds),
//! and `--skip-transparent` only ever skipping blocks verified zero at load time.

use expanse::bench::{self, BenchOptions, BenchTarget, Variant};
use expanse::engine::ids_tensor;
use expanse::model::{Cache, Logits, Model};

use crate::common::*;

fn small_opts() -> BenchOptions {
    BenchOptions { prefill: 16, decode: 8, depth: 4, repetitions: 2, warmup: 1, ..BenchOptions::default() }
}

#[test]
fn bench_report_has_every_variant_and_positive_figures() {
    let m = load("tiny-mistral-f32", "every:4", "f32");
    let target = BenchTarget { name: "tiny".into(), plan: &m.plan, model: &m.model };
    let mut calls = 0;
    let report = bench::run(&target, &small_opts(), |_, done, total| {
        calls += 1;
        assert!(done <= total);
    })
    .unwrap();
    assert_eq!(calls, 3 * 2 * 3, "one progress call per run, warmups included");
    assert_eq!(report.rows.len(), 6);
    for (variant, layers, executed) in [(Variant::Base, 8, 8), (Variant::Expanded, 10, 10), (Variant::Skip, 10, 8)] {
        let rows: Vec<_> = report.rows.iter().filter(|r| r.variant == variant).collect();
        assert_eq!(rows.iter().map(|r| r.test.as_str()).collect::<Vec<_>>(), ["pp16@d4", "tg8@d4"]);
        for r in rows {
            assert_eq!((r.layers, r.executed_layers), (layers, executed), "{variant:?}");
            assert_eq!(r.samples.len(), 2);
            assert!(r.samples.iter().all(|&s| s > 0.0 && s.is_finite()), "{variant:?} {}: {:?}", r.test, r.samples);
            assert!(r.mean_tps > 0.0 && r.median_tps > 0.0 && r.sd_tps >= 0.0);
            assert!(r.ratio_to_base.is_some_and(|x| x > 0.0));
            assert!(r.params > 0);
        }
    }
    let base_params = report.rows[0].params;
    assert!(report.rows[2].params > base_params, "the expanded variant executes the inserted blocks");
    assert_eq!(report.rows[4].params, base_params, "skip executes exactly the base's parameters");
    assert_eq!(report.memory.len(), 3);
    for m in &report.memory {
        assert!(m.weights_held_bytes > 0);
        if cfg!(target_os = "linux") {
            assert!(m.host_peak_bytes.is_some_and(|b| b > 0) && m.host_rss_bytes.is_some_and(|b| b > 0));
        }
    }
    let table = report.to_string();
    assert!(table.contains("| model | plan | variant |") && table.contains("| skip |"), "{table}");
    let json: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 6);
    assert_eq!(json["rows"][0]["variant"], "base");
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
}

#[test]
fn bench_runs_synthetic_config() {
    let cfg = fixtures().join("tiny-mistral-f32/config.json").display().to_string();
    let out = expanse(&["bench", "--synthetic", &cfg, "--device", "cpu", "-p", "8", "-n", "2", "-r", "1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["model"].as_str().unwrap().starts_with("synthetic:"));
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
