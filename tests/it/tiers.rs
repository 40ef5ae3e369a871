//! The CPU kernel tiers (`EXPANSE_CPU`): every tier this CPU runs gives transformers' logits, and a
//! tier the CPU lacks or an unknown word is refused in one line naming the variable.

use expanse::kernels::tier::Tier;

use crate::common::*;

/// `expanse logits` on `model` for `ids` under `EXPANSE_CPU=tier`, read back.
fn logits_on(tier: &str, model: &str, ids: &[u32], dir: &std::path::Path) -> candle_core::Tensor {
    let out = dir.join(format!("{tier}-{model}.safetensors"));
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    let run = command(&["logits", "--model", &fixture(model), "--device", "cpu", "--ids", &ids.join(","), "--out", &out.display().to_string()])
        .env("EXPANSE_CPU", tier)
        .output()
        .unwrap();
    assert!(run.status.success(), "EXPANSE_CPU={tier}: {}", String::from_utf8_lossy(&run.stderr));
    expanse::cmd::logits::read(&out).unwrap().1
}

#[test]
fn every_tier_this_cpu_runs_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let tiers = Tier::available();
    assert!(tiers.contains(&Tier::Portable));
    let (ids32, want32) = reference("ref-mistral-f32.safetensors");
    let (ids16, want16) = reference("ref-mistral-bf16.safetensors");
    for tier in tiers {
        let got = logits_on(tier.name(), "tiny-mistral-f32", &ids32, dir.path());
        let d = max_abs_diff(&got, &want32);
        assert!(d < 1e-4, "{}: f32 max |Δ| {d} against transformers", tier.name());
        let got = logits_on(tier.name(), "tiny-mistral-bf16", &ids16, dir.path());
        assert_eq!(argmax(&got), argmax(&want16), "{}: bf16 argmax", tier.name());
        let d = max_abs_diff(&got, &want16);
        assert!(d < 0.25, "{}: bf16 max |Δ| {d} against transformers", tier.name());
    }
}

#[test]
fn expanse_cpu_refuses_what_it_cannot_run() {
    let model = fixture("tiny-mistral-f32");
    let mut cases = vec![("sse9", "expected one of portable, avx2, avx512, avx512bf16")];
    // Every tier this CPU lacks (on an AVX2-only machine: avx512 and avx512bf16).
    cases.extend(Tier::ALL.into_iter().filter(|t| !t.supported()).map(|t| (t.name(), "this CPU lacks it")));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("never.safetensors").display().to_string();
    for (value, why) in cases {
        let out = command(&["logits", "--model", &model, "--device", "cpu", "--ids", "1,2,3", "--out", &dest]).env("EXPANSE_CPU", value).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "EXPANSE_CPU={value}: {err}");
        assert!(err.contains("EXPANSE_CPU") && err.contains(why) && err.lines().count() == 1, "EXPANSE_CPU={value}: {err}");
        assert!(!std::path::Path::new(&dest).exists(), "EXPANSE_CPU={value}: refused, yet wrote its output");
    }
    let out = command(&["logits", "--model", &model, "--device", "cpu", "--ids", "1,2,3", "--out", &dest]).env("EXPANSE_CORES", "zen9").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "EXPANSE_CORES=zen9: {err}");
    assert!(err.contains("EXPANSE_CORES") && err.contains("expected amd or other") && err.lines().count() == 1, "EXPANSE_CORES=zen9: {err}");
    assert!(!std::path::Path::new(&dest).exists(), "EXPANSE_CORES=zen9: refused, yet wrote its output");
}

/// Greedy generation (the fused decode step) under each tier gives transformers' ids, and the
/// stats line and `bench` name the tier that ran.
#[test]
fn every_tier_generates_transformers_greedy_ids_and_names_itself() {
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("ref-greedy-f32.json")).unwrap()).unwrap();
    let model = fixture("tiny-mistral-f32");
    for tier in Tier::available() {
        let gen = ["generate", "--model", &model, "--device", "cpu", "--prompt", "Hello", "--temperature", "0", "--max-tokens", "20", "--decode-path", "fused"];
        let out = command(&gen).env("EXPANSE_CPU", tier.name()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {err}", tier.name());
        assert!(err.contains(&format!("decode path: fused · cpu kernels: {}", tier.name())), "{}: {err}", tier.name());
        let json = command(&[&gen[..], &["--json"]].concat()).env("EXPANSE_CPU", tier.name()).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(v["generated_ids"], r["generated_ids"], "{}: greedy ids against transformers", tier.name());
        let bench = ["bench", "--model", &model, "--device", "cpu", "-p", "8", "-n", "2", "-r", "1", "--warmup", "0", "--variants", "base", "--json"];
        let out = command(&bench).env("EXPANSE_CPU", tier.name()).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let cpu = v["cpu"].as_str().unwrap();
        assert!(cpu.starts_with(&format!("{} kernels · ", tier.name())), "{}: {cpu}", tier.name());
    }
}
