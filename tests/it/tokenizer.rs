//! The OpenChat tokenizer fixture against OpenChat's published token ids.

use expanse::tokenizer::Tokenizer;

use crate::common::*;

#[test]
fn reproduces_openchat_published_ids() {
    let tok = Tokenizer::from_file(&fixtures().join("openchat-tokenizer/tokenizer.json")).unwrap();
    // From OpenChat's README (openchat/openchat-3.5-0106).
    let ids = tok.encode("GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:", true).unwrap();
    assert_eq!(ids, vec![1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 22557, 32000, 420, 6316, 28781, 3198, 3123, 21631, 28747]);
    assert_eq!(tok.token_id("<|end_of_turn|>"), Some(32000));
}

/// tiny-mistral-f32 with its tokenizer's post-processor removed (SmolLM2's rule: no BOS on raw text),
/// built as `tests/fixtures/make_raw_prompt_refs.py` builds its `no-bos` tokenizer.
fn no_bos_variant(dir: &std::path::Path) {
    let model = fixtures().join("tiny-mistral-f32");
    for entry in std::fs::read_dir(&model).unwrap() {
        let name = entry.unwrap().file_name();
        if !name.to_string_lossy().starts_with("tokenizer") {
            std::os::unix::fs::symlink(model.join(&name), dir.join(&name)).unwrap();
        }
    }
    let src = fixtures().join("openchat-tokenizer");
    let mut tok: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap()).unwrap();
    tok["post_processor"] = serde_json::Value::Null;
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap()).unwrap();
    cfg["add_bos_token"] = false.into();
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast".into();
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
}

/// A raw prompt (`generate --raw`, the completions endpoint) gets BOS only where the tokenizer's own
/// rules add one: its ids equal transformers' `tokenizer(text)` for a tokenizer that adds BOS
/// (OpenChat's) and one that does not (`tests/fixtures/ref-raw-prompts.json`).
#[test]
fn raw_prompts_tokenize_as_transformers_does() {
    let refs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("ref-raw-prompts.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    no_bos_variant(dir.path());
    let no_bos = dir.path().display().to_string();
    for (variant, model) in [("openchat", fixture("tiny-mistral-f32")), ("no-bos", no_bos)] {
        for (text, want) in refs[variant].as_object().unwrap() {
            let out = expanse(&["generate", "--model", &model, "--device", "cpu", "--raw", "--prompt", text, "--max-tokens", "1", "--json"]);
            assert!(out.status.success(), "{variant} {text:?}: {}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["prompt_ids"], *want, "{variant} {text:?}");
            assert_eq!(v["prompt"], text.as_str(), "{variant}: the raw prompt's text is the prompt itself");
        }
    }
}
