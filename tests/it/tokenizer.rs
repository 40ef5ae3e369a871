//! Tokenizers against independent references: the OpenChat fixture against OpenChat's published
//! ids, raw-prompt BOS rules against transformers, a GGUF's tokenizer against the model's own
//! tokenizer.json.

use expanse::quant::gguf::GgufFile;
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

/// Text that exercises a sentencepiece BPE: words, runs of spaces and newlines (Mistral's `▁▁`
/// pieces), leading/trailing spaces, byte fallback (emoji, rare CJK), special tokens inside text
/// (the space prefix after them), a literal `</s>`, code, digits and an empty string.
const CORPUS: &[&str] = &[
    "",
    " ",
    "Hello",
    "The capital of France is Paris.",
    "  two leading spaces and  double  spaces   and    four",
    "trailing spaces   ",
    "line one\nline two\n\n\tindented\r\nwindows",
    "GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:",
    "<s>GPT4 Correct User: Hi<|end_of_turn|>GPT4 Correct Assistant: Hello!<|end_of_turn|>",
    "a literal </s> and <unk> and <|pad_0|> in text",
    "<|end_of_turn|><|end_of_turn|> back to back",
    "fn main() {\n    println!(\"{}\", 1 + 2);\n}",
    "Numbers: 3.14159, 2026-12-04, 1e-5, 0x1F, 1,234,567",
    "Ünïcödé àccents, straße, Ελληνικά, русский текст",
    "日本語のテキストと中文文本, 한국어",
    "emoji 🦀🚀 and 𝕏 and \u{200b}zero width",
    "ééé ééé",
    "__init__ self.x=[1,2,3]; // comment /* block */",
    "    indented code block\n        deeper",
    "Mixed CASE WORDS and camelCaseIdentifiers and snake_case_names",
];

fn gguf_tokenizer(name: &str) -> (Tokenizer, expanse::quant::gguf::GgufVocab) {
    let path = fixtures().join("gguf").join(name);
    let vocab = GgufFile::open(&path).unwrap().vocab().unwrap();
    (Tokenizer::from_gguf(&vocab, &path).unwrap(), vocab)
}

fn openchat_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("openchat-tokenizer/tokenizer.json")).unwrap()).unwrap()
}

/// The merges recovered from a GGUF of OpenChat (converted from its sentencepiece model, as released
/// GGUFs are) are the model's tokenizer.json merges: all of them, in order.
#[test]
fn gguf_merges_are_the_tokenizer_json_merges() {
    let (_, vocab) = gguf_tokenizer("openchat-vocab.gguf");
    let want: Vec<(String, String)> = serde_json::from_value(openchat_json()["model"]["merges"].clone()).unwrap();
    let got = expanse::tokenizer::gguf::merges(&vocab);
    assert_eq!(got.len(), want.len());
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "merge {first_diff:?}: {:?} vs {:?}", first_diff.map(|i| &got[i]), first_diff.map(|i| &want[i]));
}

/// A GGUF's tokenizer encodes and decodes every corpus text as the model's tokenizer.json does, with
/// and without BOS; from a file converted from tokenizer.json alone (every score -1000, `</s>`
/// marked normal) too, but for the literal `</s>` that file no longer treats as special.
#[test]
fn gguf_tokenizer_encodes_as_the_tokenizer_json() {
    let reference = Tokenizer::from_file(&fixtures().join("openchat-tokenizer/tokenizer.json")).unwrap();
    for file in ["openchat-vocab.gguf", "tiny-mistral-bf16.gguf"] {
        let (tok, _) = gguf_tokenizer(file);
        let mut checked = 0;
        for text in CORPUS {
            if file == "tiny-mistral-bf16.gguf" && text.contains("</s>") {
                continue;
            }
            for bos in [true, false] {
                let want = reference.encode(text, bos).unwrap();
                assert_eq!(tok.encode(text, bos).unwrap(), want, "{file}: {text:?} (bos {bos})");
                for skip in [true, false] {
                    assert_eq!(tok.decode(&want, skip).unwrap(), reference.decode(&want, skip).unwrap(), "{file}: decode {text:?}");
                }
                checked += 1;
            }
        }
        assert!(checked >= 2 * (CORPUS.len() - 1), "{file}: {checked} encodings checked");
    }
}

/// The prompt rules a GGUF carries: BOS/EOS tokens, add_bos_token and the chat template, as the
/// model's tokenizer_config.json states them.
#[test]
fn gguf_tokenizer_config_is_the_models() {
    let (_, vocab) = gguf_tokenizer("openchat-vocab.gguf");
    let got = expanse::tokenizer::gguf::tokenizer_config_json(&vocab);
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("openchat-tokenizer/tokenizer_config.json")).unwrap()).unwrap();
    for key in ["add_bos_token", "add_eos_token", "bos_token", "eos_token", "unk_token", "chat_template"] {
        assert_eq!(got[key], want[key], "{key}");
    }
    assert_eq!((vocab.tokens.len(), vocab.bos, vocab.eos), (32002, Some(1), Some(32000)));
}

/// Byte-level BPE GGUFs (`gpt2`: GPT-2, Llama 3, StarCoder, SmolLM2) tokenize as Hugging Face's
/// tokenizers did (llama.cpp's `ggml-vocab-*.gguf.out`) and as llama.cpp does (more text, special
/// tokens in text, BOS rules), on vocabularies cut to the texts' tokens
/// (`tests/fixtures/make_bpe_vocab_fixtures.py`); ids without BOS decode back to the text.
#[test]
fn byte_level_gguf_tokenizers_match_hugging_face_and_llama_cpp() {
    let dir = fixtures().join("gguf/bpe");
    let refs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("refs.json")).unwrap()).unwrap();
    let texts: Vec<String> = serde_json::from_value(refs["texts"].clone()).unwrap();
    let vocabs = refs["vocabs"].as_object().unwrap();
    assert_eq!(vocabs.keys().collect::<Vec<_>>(), ["gpt-2", "llama-bpe", "starcoder", "smollm2"].map(String::from).iter().collect::<Vec<_>>());
    for (name, v) in vocabs {
        let path = dir.join(format!("{name}.gguf"));
        let vocab = GgufFile::open(&path).unwrap().vocab().unwrap();
        let tok = Tokenizer::from_gguf(&vocab, &path).unwrap();
        let mut sources = std::collections::BTreeMap::<&str, usize>::new();
        for case in v["cases"].as_array().unwrap() {
            let text = &texts[case["text"].as_u64().unwrap() as usize];
            let bos = case["bos"].as_bool().unwrap();
            let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            let source = case["source"].as_str().unwrap();
            assert_eq!(tok.encode(text, bos).unwrap(), want, "{name} against {source}: {text:?} (bos {bos})");
            if !bos {
                assert_eq!(&tok.decode(&want, false).unwrap(), text, "{name}: decode");
            }
            *sources.entry(source).or_default() += 1;
        }
        let hf = if name == "smollm2" { 0 } else { 46 };
        assert_eq!((sources.get("hf").copied().unwrap_or(0), sources["llama.cpp"]), (hf, 18), "{name}: cases per source");
    }
}

/// BOS follows llama.cpp's rule where the file does not say: Llama 3's pre-tokenizer adds
/// `<|begin_of_text|>`, GPT-2's adds nothing, and SmolLM2's file says `add_bos_token = false`.
#[test]
fn byte_level_gguf_bos_rules() {
    for (name, bos) in [("llama-bpe", Some("<|begin_of_text|>")), ("gpt-2", None), ("smollm2", None)] {
        let path = fixtures().join("gguf/bpe").join(format!("{name}.gguf"));
        let vocab = GgufFile::open(&path).unwrap().vocab().unwrap();
        let tok = Tokenizer::from_gguf(&vocab, &path).unwrap();
        let with = tok.encode("Hello", true).unwrap();
        let without = tok.encode("Hello", false).unwrap();
        match bos {
            Some(b) => assert_eq!((with[0], &with[1..]), (tok.token_id(b).unwrap(), &without[..]), "{name}"),
            None => assert_eq!(with, without, "{name}"),
        }
        assert_eq!(vocab.add_bos, bos.is_some(), "{name}");
    }
}
