//! The tokenizer a GGUF's metadata describes, built as the tokenizer.json (and tokenizer_config.json)
//! it stands for, so the `tokenizers` crate runs it exactly as it runs a checkpoint's own file:
//! sentencepiece vocabularies here, byte-level BPE (`gpt2`) in [`super::gguf_bpe`].
//!
//! llama.cpp stores a sentencepiece vocabulary (`tokenizer.ggml.model = llama`) as pieces, scores
//! and types, without merges. The merges are recovered from the vocabulary: every split of a piece
//! into two pieces, ranked by the merged piece's id, as transformers' slow-to-fast converter ranked
//! them. A sentencepiece BPE model numbers its pieces in merge order, so this gives Mistral's (and
//! OpenChat's) tokenizer.json merges exactly, all 58 980 in order (tests/it/tokenizer.rs).
//! Ranking by score instead (transformers' GGUF loader) moves Mistral's whitespace pieces (`▁▁`,
//! `▁▁▁▁`, score −10⁹) to the end, and runs of spaces then split unlike the model's tokenizer.json;
//! a file converted from tokenizer.json alone carries −1000 for every score, which ranks nothing.
//!
//! Text after a special token gets the space prefix again (a `Prepend` normalizer applies to each
//! piece of text between added tokens), as in llama.cpp and Llama/Mistral's own (legacy)
//! tokenizer.json; transformers' GGUF loader prefixes only the start of the text.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::quant::gguf::GgufVocab;

/// llama.cpp's token types that are matched whole in the text, never built from merges.
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The sentencepiece space.
const SPACE: &str = "\u{2581}";

/// Pieces that merges may build or be built from (the ones not matched whole).
fn merge_pieces(v: &GgufVocab) -> HashMap<&str, u32> {
    let mut ids = HashMap::with_capacity(v.tokens.len());
    for (id, (tok, ty)) in v.tokens.iter().zip(&v.types).enumerate() {
        if !matches!(*ty, UNKNOWN | CONTROL | USER_DEFINED | UNUSED) {
            ids.insert(tok.as_str(), id as u32);
        }
    }
    ids
}

/// The BPE merges `v`'s pieces imply, best first: each way to cut a piece into two pieces, ordered
/// by the piece's id, then by the left part's length in characters.
pub fn merges(v: &GgufVocab) -> Vec<(String, String)> {
    let ids = merge_pieces(v);
    let mut found: Vec<(u32, usize, &str, &str)> = Vec::new();
    for (&piece, &id) in &ids {
        for (n, (at, _)) in piece.char_indices().enumerate().skip(1) {
            let (l, r) = piece.split_at(at);
            if ids.contains_key(l) && ids.contains_key(r) {
                found.push((id, n, l, r));
            }
        }
    }
    // (id, left length) is unique: one piece per id, one cut per length.
    found.sort_unstable_by_key(|&(id, n, _, _)| (id, n));
    found.into_iter().map(|(_, _, l, r)| (l.to_string(), r.to_string())).collect()
}

pub(super) fn token(v: &GgufVocab, id: Option<u32>) -> Option<&str> {
    id.and_then(|i| v.tokens.get(i as usize)).map(String::as_str)
}

/// Token → id, every token of `v`.
pub(super) fn vocab_json(v: &GgufVocab) -> serde_json::Map<String, Value> {
    v.tokens.iter().enumerate().map(|(id, t)| (t.clone(), json!(id))).collect()
}

/// The tokens matched whole in text (unknown, control, user-defined), as tokenizer.json's added
/// tokens; control and unknown ones are special (skipped when decoding with `skip_special`).
pub(super) fn added_tokens(v: &GgufVocab) -> Vec<Value> {
    v.tokens
        .iter()
        .zip(&v.types)
        .enumerate()
        .filter(|(_, (_, ty))| matches!(**ty, UNKNOWN | CONTROL | USER_DEFINED))
        .map(|(id, (t, ty))| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": *ty != USER_DEFINED})
        })
        .collect()
}

/// The tokenizer.json of a sentencepiece (`llama`) vocabulary.
pub fn tokenizer_json(v: &GgufVocab) -> Value {
    let vocab = vocab_json(v);
    let added = added_tokens(v);
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE});
    let normalizer = if v.add_space_prefix { json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, replace]}) } else { replace };
    let mut decoders = vec![json!({"type": "Replace", "pattern": {"String": SPACE}, "content": " "}), json!({"type": "ByteFallback"}), json!({"type": "Fuse"})];
    if v.add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let merges: Vec<Value> = merges(v).into_iter().map(|(l, r)| json!([l, r])).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": post_processor(v),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": token(v, v.unk), "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    })
}

/// BOS before (and EOS after) each sequence, as `add_bos_token`/`add_eos_token` say; none when neither.
pub(super) fn post_processor(v: &GgufVocab) -> Value {
    let bos = token(v, v.bos).filter(|_| v.add_bos);
    let eos = token(v, v.eos).filter(|_| v.add_eos);
    if bos.is_none() && eos.is_none() {
        return Value::Null;
    }
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let wrap = |s: &str, type_id: u32| -> Vec<Value> {
        bos.map(|b| special(b, type_id)).into_iter().chain([seq(s, type_id)]).chain(eos.map(|e| special(e, type_id))).collect()
    };
    let mut specials = serde_json::Map::new();
    for (t, id) in [(bos, v.bos), (eos, v.eos)] {
        if let (Some(t), Some(id)) = (t, id) {
            specials.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
    }
    let pair = [wrap("A", 0), wrap("B", 1)].concat();
    json!({"type": "TemplateProcessing", "single": wrap("A", 0), "pair": pair, "special_tokens": specials})
}

/// The tokenizer_config.json keys a prompt needs: the special tokens, the BOS/EOS rules, the chat template.
pub fn tokenizer_config_json(v: &GgufVocab) -> Value {
    let mut c = json!({"add_bos_token": v.add_bos, "add_eos_token": v.add_eos});
    for (key, id) in [("bos_token", v.bos), ("eos_token", v.eos), ("unk_token", v.unk)] {
        if let Some(t) = token(v, id) {
            c[key] = t.into();
        }
    }
    if let Some(t) = &v.chat_template {
        c["chat_template"] = t.clone().into();
    }
    c
}

/// The tokenizer `v` describes; `path` (the GGUF) names the file in errors.
pub fn build(v: &GgufVocab, path: &Path) -> Result<tokenizers::Tokenizer> {
    let json = match v.model.as_str() {
        "llama" => tokenizer_json(v),
        "gpt2" => super::gguf_bpe::tokenizer_json(v, path)?,
        other => {
            let msg = format!("`tokenizer.ggml.model` is `{other}`: expanse builds sentencepiece (`llama`) and byte-level BPE (`gpt2`) tokenizers from a GGUF");
            return Err(Error::bad_file(path, msg));
        }
    };
    let text = json.to_string();
    text.parse().map_err(|e: tokenizers::Error| Error::Tokenizer { path: path.into(), msg: format!("the tokenizer built from the GGUF's metadata: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(model: &str, tokens: &[&str], types: &[i32]) -> GgufVocab {
        GgufVocab {
            model: model.into(),
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            types: types.to_vec(),
            bos: Some(1),
            eos: Some(2),
            unk: Some(0),
            add_bos: true,
            add_eos: false,
            add_space_prefix: true,
            chat_template: None,
            pre: None,
            merges: Vec::new(),
        }
    }

    /// Merges cut pieces into pieces at character (not byte) boundaries, best (lowest id) first;
    /// tokens matched whole (control, user-defined) never take part.
    #[test]
    fn merges_come_from_pieces_in_id_order() {
        let v = vocab("llama", &["<unk>", "<s>", "</s>", "é", "t", "ét", "<", "s>", "tét", "<t>"], &[2, 3, 3, 1, 1, 1, 1, 1, 1, 4]);
        let m = merges(&v);
        let want = [("é", "t"), ("t", "ét")];
        assert_eq!(m, want.map(|(l, r)| (l.to_string(), r.to_string())));
    }

    #[test]
    fn sentencepiece_vocabularies_are_built() {
        let e = build(&vocab("t5", &["<unk>", "<s>", "</s>"], &[2, 3, 3]), Path::new("m.gguf")).unwrap_err().to_string();
        assert!(e.contains("m.gguf") && e.contains("`tokenizer.ggml.model` is `t5`"), "{e}");
        let t = build(&vocab("llama", &["<unk>", "<s>", "</s>", "\u{2581}", "a", "\u{2581}a"], &[2, 3, 3, 1, 1, 1]), Path::new("m.gguf")).unwrap();
        assert_eq!(t.encode("a", true).unwrap().get_ids(), [1, 5], "BOS, then the space-prefixed piece");
        assert_eq!(t.encode("b", false).unwrap().get_ids(), [3, 0], "no byte pieces: unknown");
        // `<unk>` typed unknown (2) is matched whole in text, as the model's tokenizer.json and llama.cpp do.
        assert_eq!(t.encode("a<unk>", false).unwrap().get_ids(), [5, 0]);
    }
}
