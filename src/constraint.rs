//! Constrained decoding: a grammar (a JSON schema, any JSON object, a tool call) compiled by
//! llguidance against the model's tokenizer, and per token the mask of the tokens that keep the
//! answer inside it. The sampler applies the mask (`sampling::Sampler::with_constraint`), so every
//! sampling setting and every decode path keeps working; the answer always parses.
//!
//! llguidance is the grammar engine llama.cpp and vLLM use; its `toktrie_hf_tokenizers` companion
//! is built on another `tokenizers` release than ours, so the token bytes come from our tokenizer's
//! JSON through llguidance's own reader, and the tokenizer environment below is ours.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Whitespace a JSON answer may put between its tokens: none, one space, or a newline and up to 20
/// spaces or tabs of indent (llama.cpp's `space` rule). Bounded, so that a model cannot fill its whole
/// answer with whitespace and a schema with bounded values gives a bounded answer.
const JSON_WHITESPACE: &str = r"(?:\x20|\x0A[\x20\x09]{0,20})";

/// The model's tokens as llguidance sees them: their bytes in a trie, the stop tokens as its EOS.
/// Built once per tokenizer (tens of milliseconds for a 32k vocabulary) and shared by every answer.
pub struct Vocabulary {
    factory: ParserFactory,
}

struct Env {
    trie: TokTrie,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Bytes to tokens for grammar text that is forced (a schema's constant keys): the trie's longest
    /// matches, which always spell the same bytes; llguidance lets the model re-tokenize freely after.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }
}

impl Vocabulary {
    /// The vocabulary of `tok`, with `stop_ids` (the end of an answer) as the tokens a finished
    /// grammar allows.
    pub fn new(tok: &Tokenizer, stop_ids: &[u32]) -> Result<Vocabulary> {
        let bad = |e: String| Error::Grammar(format!("cannot read the tokenizer: {e}"));
        let text = tok.inner().to_string(false).map_err(|e| bad(e.to_string()))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| bad(e.to_string()))?;
        let size = words.len().max(tok.inner().get_vocab_size(true));
        words.resize(size, Vec::new());
        let Some(&eos) = stop_ids.first() else { return Err(bad("the model has no stop token".into())) };
        if let Some(id) = stop_ids.iter().find(|&&id| id as usize >= size) {
            return Err(bad(format!("stop token {id} is outside the vocabulary of {size}")));
        }
        let trie = TokTrie::from(&TokRxInfo::new(size as u32, eos), &words).with_eos_tokens(stop_ids);
        let env: TokEnv = Arc::new(Env { trie });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| bad(e.to_string()))?;
        factory.quiet();
        Ok(Vocabulary { factory })
    }

    fn size(&self) -> usize {
        self.factory.tok_env().tok_trie().vocab_size()
    }
}

/// What an answer must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// JSON valid against this schema (`{"type": "object"}`: any object).
    Json(Value),
}

impl Grammar {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    pub fn json_object() -> Grammar {
        Grammar::Json(json!({ "type": "object" }))
    }

    /// llguidance's form of the grammar: the schema with our whitespace rule, unless the schema sets
    /// its own options (`x-guidance`).
    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::Json(schema) => {
                let mut schema = schema.clone();
                if let Some(obj) = schema.as_object_mut() {
                    obj.entry("x-guidance").or_insert_with(|| json!({ "whitespace_pattern": JSON_WHITESPACE }));
                }
                TopLevelGrammar::from_json_schema(schema)
            }
        }
    }
}

/// One answer's grammar state: which tokens may come next.
pub struct Constraint {
    matcher: Matcher,
    size: usize,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Clone for Constraint {
    /// An independent copy at the same point (each of a request's `n` choices gets one).
    fn clone(&self) -> Constraint {
        Constraint { matcher: self.matcher.deep_clone(), size: self.size }
    }
}

impl Constraint {
    /// Compiles `grammar`; an error says what in it llguidance could not take (a request's 400).
    /// The first token's mask is computed here too, so a grammar too large for the parser's limits at
    /// its start fails now; one that outgrows them later (an `anyOf` of thousands of objects can, a
    /// token or two in) fails in `mask`/`accept` as `Error::Grammar`, a 400 all the same.
    pub fn new(vocab: &Vocabulary, grammar: &Grammar) -> Result<Constraint> {
        let parser = vocab.factory.create_parser(grammar.top_level()).map_err(|e| Error::Grammar(first_line(&e.to_string())))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::Grammar(first_line(&e)));
        }
        if let Err(e) = matcher.compute_mask_or_eos() {
            return Err(Error::Grammar(first_line(&matcher.get_error().unwrap_or_else(|| e.to_string()))));
        }
        Ok(Constraint { matcher, size: vocab.size() })
    }

    /// Rules out (−∞) every token of `logits` the grammar does not allow next; a finished grammar
    /// allows only the stop tokens. Ids past the tokenizer's vocabulary are never allowed.
    pub fn mask(&mut self, logits: &mut [f64]) -> Result<()> {
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| self.failed(e))?;
        let mut any = false;
        for (id, l) in logits.iter_mut().enumerate() {
            if id < self.size && mask.is_allowed(id as TokenId) {
                if l.is_nan() {
                    return Err(Error::internal(format!("constrained decoding: the logit of token {id} is NaN")));
                }
                any |= *l > f64::NEG_INFINITY;
            } else {
                *l = f64::NEG_INFINITY;
            }
        }
        if !any {
            // The grammar always allows a token; the model ruled every one out (−∞): not the request's fault.
            return Err(Error::internal("constrained decoding: no token the grammar allows has a finite logit"));
        }
        Ok(())
    }

    /// Moves past the sampled token (which `mask` allowed).
    pub fn accept(&mut self, id: u32) -> Result<()> {
        if self.matcher.is_stopped() {
            return Ok(());
        }
        self.matcher.consume_token(id).map_err(|e| self.failed(e))
    }

    /// A grammar that fails mid-answer (too large for the parser's limits at this token): the
    /// request's fault, as one line.
    fn failed(&self, e: impl std::fmt::Display) -> Error {
        Error::Grammar(first_line(&self.matcher.get_error().unwrap_or_else(|| e.to_string())))
    }
}

/// llguidance's message without what it appends (`<state>…`, a `<backtrace>` when RUST_BACKTRACE is
/// set: many lines of internals), on one line of at most 300 characters.
fn first_line(e: &str) -> String {
    let e = ["<state>", "<backtrace>", "stack backtrace:"].iter().fold(e, |e, cut| e.split(cut).next().unwrap_or(e));
    let line = crate::error::one_line(e);
    match line.char_indices().nth(300) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Vocabulary {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openchat-tokenizer/tokenizer.json");
        Vocabulary::new(&Tokenizer::from_file(&path).unwrap(), &[32000]).unwrap()
    }

    #[test]
    fn the_mask_walks_a_schema_to_its_stop_token() {
        let v = vocab();
        let schema = json!({ "type": "object", "properties": { "ok": { "type": "boolean" } }, "required": ["ok"], "additionalProperties": false });
        let mut c = Constraint::new(&v, &Grammar::Json(schema)).unwrap();
        let text = |id: u32| v.factory.tok_env().tok_trie().token(id).to_vec();
        // Always the allowed token with the longest text: the answer must still come out whole.
        let mut out = Vec::new();
        for _ in 0..40 {
            let mut logits = vec![0.0f64; 32002];
            c.mask(&mut logits).unwrap();
            let allowed: Vec<u32> = (0..32002u32).filter(|&i| logits[i as usize] == 0.0).collect();
            assert!(!allowed.is_empty());
            assert!(allowed.iter().all(|&i| (i as usize) < 32002));
            if allowed == [32000] {
                break;
            }
            let id = *allowed.iter().filter(|&&i| i != 32000).max_by_key(|&&i| (text(i).len(), i)).unwrap();
            c.accept(id).unwrap();
            out.extend(text(id));
        }
        let answer: Value = serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)));
        assert!(answer["ok"].is_boolean() && answer.as_object().unwrap().len() == 1, "{answer}");
        // Nothing but the stop token once the object closed.
        let mut logits = vec![1.0f64; 32002];
        c.mask(&mut logits).unwrap();
        assert_eq!((0..32002).filter(|&i| logits[i].is_finite()).collect::<Vec<_>>(), [32000]);
    }

    /// A GGUF's own vocabulary (no tokenizer.json beside it) gives the same token bytes.
    #[test]
    fn a_gguf_vocabulary_spells_the_same_tokens() {
        let from_json = vocab();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/openchat-vocab.gguf");
        let from_gguf = Vocabulary::new(&Tokenizer::from_file(&path).unwrap(), &[32000]).unwrap();
        let (a, b) = (from_json.factory.tok_env().tok_trie(), from_gguf.factory.tok_env().tok_trie());
        assert_eq!(a.vocab_size(), b.vocab_size());
        let differ: Vec<u32> = (0..a.vocab_size() as u32).filter(|&i| a.token(i) != b.token(i)).collect();
        assert!(
            differ.is_empty(),
            "{} tokens differ, e.g. {:?}",
            differ.len(),
            differ.iter().take(5).map(|&i| (i, a.token_dbg(i), b.token_dbg(i))).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_schema_llguidance_cannot_take_is_an_error() {
        let v = vocab();
        let e = Constraint::new(&v, &Grammar::Json(json!({ "type": "object", "properties": { "a": { "$ref": "#/nowhere" } }, "required": ["a"] })));
        assert!(e.is_err());
        let mut logits = vec![f64::NEG_INFINITY; 32002];
        let mut c = Constraint::new(&v, &Grammar::json_object()).unwrap();
        assert!(matches!(c.mask(&mut logits), Err(Error::Internal(_))), "nothing allowed is the model's fault, not a silent pick");
        let mut logits = vec![f64::NAN; 32002];
        assert!(matches!(c.mask(&mut logits), Err(Error::Internal(_))), "NaN is the model's fault");
        let long = format!("Parser Error: {}\n<state>\nTokens: …\n</state><backtrace>\n  0: f\n</backtrace>", "x".repeat(400));
        let line = first_line(&long);
        assert!(line.chars().count() == 301 && !line.contains("state") && !line.contains("backtrace"), "{line}");
    }
}
