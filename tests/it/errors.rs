//! Bad input: one clear line naming the file, flag or tensor, exit code 2, never a panic.

use std::fs;
use std::path::Path;

use candle_core::Device;
use expanse::loader::{write_safetensors, Checkpoint};

use crate::common::*;

/// Runs expanse and checks the failure: exit 2, a single `error:` line containing every `needle`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let out = expanse(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "args {args:?}: stderr {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` missing from: {err}");
    }
    assert!(out.stdout.is_empty(), "no partial output on stdout");
}

/// A copy of the bf16 tiny model in a temp dir (real files, not symlinks).
fn copy_model(tmp: &Path) -> std::path::PathBuf {
    let src = fixtures().join("tiny-mistral-bf16");
    let dst = tmp.join("model");
    fs::create_dir_all(&dst).unwrap();
    for e in fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

/// Rewrites model.safetensors with `edit` applied to the list of (name, tensor).
fn rewrite(dir: &Path, edit: impl Fn(&mut Vec<(String, candle_core::Tensor)>)) {
    let file = dir.join("model.safetensors");
    let ck = Checkpoint::open(std::slice::from_ref(&file)).unwrap();
    let mut tensors: Vec<(String, candle_core::Tensor)> = ck
        .names()
        .into_iter()
        .map(|n| (n.to_string(), ck.load(n, &ck.entry(n).unwrap().shape.clone(), &Device::Cpu).unwrap()))
        .collect();
    drop(ck);
    edit(&mut tensors);
    let refs: Vec<(&str, &candle_core::Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_safetensors(&file, &refs, None).unwrap();
}

#[test]
fn missing_model_folder() {
    fails_with(&["inspect", "--model", "/nonexistent/model-dir"], &["/nonexistent/model-dir"]);
}

#[test]
fn missing_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    fs::remove_file(dir.join("config.json")).unwrap();
    fails_with(&["inspect", "--model", dir.to_str().unwrap()], &["config.json"]);
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    let f = dir.join("model.safetensors");
    let len = fs::metadata(&f).unwrap().len();
    fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
    fails_with(&["inspect", "--model", dir.to_str().unwrap()], &["model.safetensors", "truncated"]);
}

#[test]
fn missing_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    rewrite(&dir, |t| t.retain(|(n, _)| n != "model.layers.2.mlp.up_proj.weight"));
    fails_with(
        &["logits", "--model", dir.to_str().unwrap(), "--ids", "1,2", "--out", tmp.path().join("o.safetensors").to_str().unwrap()],
        &["model.layers.2.mlp.up_proj.weight", "missing"],
    );
    assert!(!tmp.path().join("o.safetensors").exists(), "no partial output file");
}

#[test]
fn wrong_tensor_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    rewrite(&dir, |t| {
        for (n, x) in t.iter_mut() {
            if n == "model.layers.1.self_attn.k_proj.weight" {
                *x = x.narrow(0, 0, 8).unwrap();
            }
        }
    });
    fails_with(
        &["logits", "--model", dir.to_str().unwrap(), "--ids", "1,2", "--out", tmp.path().join("o.safetensors").to_str().unwrap()],
        &["model.layers.1.self_attn.k_proj.weight", "[8, 32]", "[16, 32]"],
    );
}

#[test]
fn config_of_another_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    let cfg = fs::read_to_string(dir.join("config.json")).unwrap().replace("MistralForCausalLM", "Qwen2ForCausalLM");
    fs::write(dir.join("config.json"), cfg).unwrap();
    fails_with(&["plan", "--model", dir.to_str().unwrap()], &["config.json", "Qwen2ForCausalLM"]);
}

#[test]
fn every_zero() {
    fails_with(&["plan", "--model", &fixture("tiny-mistral-bf16"), "--expand", "every:0"], &["--expand every:0"]);
}

#[test]
fn yaml_with_unknown_merge_method() {
    let tmp = tempfile::tempdir().unwrap();
    let y = tmp.path().join("slerp.yml");
    let text = fs::read_to_string(fixtures().join("mergekit-every4.yml")).unwrap().replace("passthrough", "slerp");
    fs::write(&y, text).unwrap();
    fails_with(&["plan", "--model", &fixture("tiny-mistral-bf16"), "--expand", y.to_str().unwrap()], &["slerp.yml", "merge_method", "slerp"]);
}

#[test]
fn yaml_with_out_of_range_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let y = tmp.path().join("range.yml");
    let text = fs::read_to_string(fixtures().join("mergekit-every4.yml")).unwrap().replace("[4, 8]", "[4, 12]");
    assert!(text.contains("[4, 12]"));
    fs::write(&y, text).unwrap();
    fails_with(&["plan", "--model", &fixture("tiny-mistral-bf16"), "--expand", y.to_str().unwrap()], &["range.yml", "layer_range", "[4, 12]"]);
}

#[test]
fn unknown_hub_id_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let out = command(&["inspect", "--model", "nobody/no-such-model"])
        .env("HF_HOME", tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("nobody/no-such-model") && err.contains("HF_HUB_OFFLINE"), "{err}");
}
