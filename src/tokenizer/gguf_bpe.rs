//! The tokenizer of a byte-level BPE GGUF (`tokenizer.ggml.model = gpt2`: Llama 3, SmolLM, GPT-2,
//! StarCoder), built as the tokenizer.json llama.cpp's converter read it from.
//!
//! Such a file stores what tokenizer.json's BPE model holds (tokens in byte-level form, merges best
//! first) but only names its pre-tokenizer (`tokenizer.ggml.pre`): the converter recognises a
//! tokenizer by hashing its ids on a test text, and llama.cpp hard-codes a splitting regex per name.
//! Each name here is mapped back to the pre-tokenizer the model's own tokenizer.json declares, and
//! only names whose tokenizers were checked against reference ids are accepted — Hugging Face's ids
//! (llama.cpp's `ggml-vocab-*.gguf.out`) and llama.cpp's own (tests/fixtures/make_bpe_vocab_fixtures.py,
//! tests/it/tokenizer.rs). Any other name fails with one line: tokenizing by a guessed regex would give
//! the model ids it was not trained on, without a sign.

use std::path::Path;

use serde_json::{json, Value};

use super::gguf::{added_tokens, post_processor, vocab_json};
use crate::error::{Error, Result};
use crate::quant::gguf::GgufVocab;

/// Llama 3's split (its tokenizer.json): contractions, letters with one leading non-letter, digits in
/// threes, punctuation runs, newlines, then spaces.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A pre-tokenizer name's tokenizer.json parts.
struct Pre {
    pre_tokenizer: Value,
    /// Llama 3 looks a whole split piece up before merging (tokenizer.json's `ignore_merges`).
    ignore_merges: bool,
}

/// GPT-2's byte-to-character map, with or without its own regex split.
fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The tokenizer.json pre-tokenizer behind `tokenizer.ggml.pre`, for the names tested here.
fn pre_tokenizer(pre: &str) -> Option<Pre> {
    let (pre_tokenizer, ignore_merges) = match pre {
        "gpt-2" => (byte_level(true), false),
        "llama3" | "llama-v3" | "llama-bpe" => {
            let split = json!({"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false});
            (json!({"type": "Sequence", "pretokenizers": [split, byte_level(false)]}), true)
        }
        // Every digit alone, then GPT-2's split (SmolLM's and StarCoder's tokenizer.json).
        "smollm" | "starcoder" => {
            let digits = json!({"type": "Digits", "individual_digits": true});
            (json!({"type": "Sequence", "pretokenizers": [digits, byte_level(true)]}), false)
        }
        _ => return None,
    };
    Some(Pre { pre_tokenizer, ignore_merges })
}

/// The pre-tokenizer names [`tokenizer_json`] accepts, for error messages.
pub const PRE_TOKENIZERS: &str = "gpt-2, llama-bpe (llama3, llama-v3), smollm, starcoder";

/// `"left right"` as a merge; llama.cpp cuts at the first space after the first byte (a byte
/// search: the first character may be several bytes, and a space byte is always a whole character).
fn merge(m: &str) -> Option<[&str; 2]> {
    let at = m.bytes().skip(1).position(|b| b == b' ')? + 1;
    Some([&m[..at], &m[at + 1..]])
}

/// The tokenizer.json of a byte-level BPE vocabulary; `path` (the GGUF) names the file in errors.
pub fn tokenizer_json(v: &GgufVocab, path: &Path) -> Result<Value> {
    let bad = |key: &str, what: String| Error::bad_file(path, format!("metadata key `{key}` {what}"));
    let name = v
        .pre
        .as_deref()
        .ok_or_else(|| bad("tokenizer.ggml.pre", format!("is missing: expanse needs it to split text as the model was trained ({PRE_TOKENIZERS})")))?;
    let pre = pre_tokenizer(name).ok_or_else(|| bad("tokenizer.ggml.pre", format!("is `{name}`: expanse knows {PRE_TOKENIZERS}")))?;
    if v.merges.is_empty() {
        return Err(bad("tokenizer.ggml.merges", "is missing or empty: a byte-level BPE vocabulary needs its merges".into()));
    }
    let vocab = vocab_json(v);
    let merges = v
        .merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let entry = |what: &str| bad("tokenizer.ggml.merges", format!("entry {i} ({m:?}) {what}"));
            let [l, r] = merge(m).ok_or_else(|| entry("is not two tokens split by a space"))?;
            // The tokenizers crate would refuse it too, but naming a line of the JSON built here.
            match [l, r, &format!("{l}{r}")].into_iter().find(|t| !vocab.contains_key(*t)) {
                Some(t) => Err(entry(&format!("names {t:?}, which is not a token"))),
                None => Ok(json!([l, r])),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(v),
        "normalizer": null,
        "pre_tokenizer": pre.pre_tokenizer,
        "post_processor": post_processor(v),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": pre.ignore_merges,
            "vocab": vocab, "merges": merges,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(pre: Option<&str>, merges: &[&str]) -> GgufVocab {
        GgufVocab {
            model: "gpt2".into(),
            tokens: ["a", "b", "ab", "Ġ", "Ġa", "<|end|>"].map(String::from).to_vec(),
            types: vec![1, 1, 1, 1, 1, 3],
            bos: None,
            eos: Some(5),
            unk: None,
            add_bos: false,
            add_eos: false,
            add_space_prefix: false,
            chat_template: None,
            pre: pre.map(String::from),
            merges: merges.iter().map(|m| m.to_string()).collect(),
        }
    }

    fn build(v: &GgufVocab) -> std::result::Result<tokenizers::Tokenizer, String> {
        super::super::gguf::build(v, Path::new("m.gguf")).map_err(|e| e.to_string())
    }

    #[test]
    fn merges_split_at_the_first_space_after_the_first_byte() {
        assert_eq!(merge("a b"), Some(["a", "b"]));
        assert_eq!(merge("Ġ Ġ"), Some(["Ġ", "Ġ"]), "a two-byte first character");
        assert_eq!(merge("Ġt he"), Some(["Ġt", "he"]));
        // A left token that is a space itself (not in byte-level vocabularies, but llama.cpp's rule).
        assert_eq!(merge("  x"), Some([" ", "x"]));
        assert_eq!(merge("ab"), None);
        assert_eq!(merge(""), None);
    }

    /// Bad metadata fails with one line naming the file and the key; a good one tokenizes by its merges.
    #[test]
    fn byte_level_vocabularies_are_built_or_refused_by_name() {
        let e = build(&vocab(None, &["a b"])).unwrap_err();
        assert!(e.contains("m.gguf") && e.contains("`tokenizer.ggml.pre` is missing"), "{e}");
        let e = build(&vocab(Some("qwen2"), &["a b"])).unwrap_err();
        assert!(e.contains("`tokenizer.ggml.pre` is `qwen2`") && e.contains("llama-bpe"), "{e}");
        let e = build(&vocab(Some("gpt-2"), &[])).unwrap_err();
        assert!(e.contains("`tokenizer.ggml.merges` is missing or empty"), "{e}");
        let e = build(&vocab(Some("gpt-2"), &["a b", "ab"])).unwrap_err();
        assert!(e.contains("entry 1 (\"ab\")"), "{e}");
        let e = build(&vocab(Some("gpt-2"), &["a c"])).unwrap_err();
        assert!(e.contains("m.gguf") && e.contains("entry 0 (\"a c\") names \"c\", which is not a token"), "{e}");
        let e = build(&vocab(Some("gpt-2"), &["a b", "b a"])).unwrap_err();
        assert!(e.contains("entry 1 (\"b a\") names \"ba\""), "the merged piece must be a token too: {e}");
        let e = build(&vocab(Some("gpt-2"), &["a "])).unwrap_err();
        assert!(e.contains("entry 0 (\"a \") names \"\""), "{e}");
        let t = build(&vocab(Some("gpt-2"), &["a b", "Ġ a"])).unwrap();
        assert_eq!(t.encode("ab a<|end|>", false).unwrap().get_ids(), [2, 4, 5]);
        assert_eq!(t.decode(&[2, 4, 5], true).unwrap(), "ab a");
    }
}
