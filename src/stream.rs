//! Streaming detokenization: turns generated ids into printable text as they arrive, never printing
//! half a UTF-8 character and never holding back finished text (punctuation, emoji) for the next word,
//! and cutting the answer at `--stop` strings without ever printing any part of one.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

const REPLACEMENT: char = '\u{FFFD}';

/// Decodes a growing list of ids. Each push decodes a short window ending at the newest id and emits
/// what it adds beyond the same window without that id: decoding a window (rather than single ids)
/// keeps SentencePiece's leading-space rules and byte-fallback sequences intact, and it keeps the cost
/// per token constant instead of re-decoding the whole answer.
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the decode window (ids before it are settled text).
    prefix_offset: usize,
    /// Ids up to here are in `text`.
    read_offset: usize,
    /// Everything decoded so far, stop strings cut off.
    text: String,
    /// Bytes of `text` handed to the caller.
    emitted: usize,
    stops: Vec<String>,
    stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> TextStream {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        TextStream { ids: Vec::new(), prefix_offset: 0, read_offset: 0, text: String::new(), emitted: 0, stops, stopped: false }
    }

    /// Adds `id`; returns the text that can be printed now (maybe empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        // An incomplete byte-fallback sequence decodes to U+FFFD; wait for the bytes that complete it.
        if full.len() > prefix.len() && !full.ends_with(REPLACEMENT) {
            if let Some(new) = suffix(&full, &prefix) {
                self.text.push_str(new);
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
            }
        }
        Ok(self.release(false))
    }

    /// Ends the stream: returns whatever is still held back (a dangling replacement character, the start
    /// of a stop string that never completed).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        if !self.stopped && self.read_offset < self.ids.len() {
            let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
            let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
            if let Some(new) = suffix(&full, &prefix) {
                self.text.push_str(new);
            }
            self.read_offset = self.ids.len();
        }
        Ok(self.release(true))
    }

    /// True once a stop string was generated (the text ends before it).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// All text so far (stop strings cut off), printed or not.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn release(&mut self, all: bool) -> String {
        let pending = &self.text[self.emitted..];
        // A match can only start in unprinted text: printed text never began a stop string.
        let hit = self.stops.iter().filter_map(|s| pending.find(s.as_str())).min();
        let end = if let Some(pos) = hit {
            self.stopped = true;
            self.text.truncate(self.emitted + pos);
            self.text.len()
        } else if all {
            self.text.len()
        } else {
            self.text.len() - self.partial_stop_len()
        };
        let end = end.max(self.emitted);
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }

    /// Length of the longest tail of the unprinted text that a stop string starts with.
    fn partial_stop_len(&self) -> usize {
        let pending = &self.text[self.emitted..];
        pending
            .char_indices()
            .map(|(i, _)| &pending[i..])
            .find(|tail| self.stops.iter().any(|s| s.starts_with(tail)))
            .map_or(0, str::len)
    }
}

/// What decoding one more id added. Decoders are prefix-stable in practice; should one rewrite the
/// end of the window, the text past the old length is still the best available answer.
fn suffix<'a>(full: &'a str, prefix: &str) -> Option<&'a str> {
    full.strip_prefix(prefix).or_else(|| full.get(prefix.len()..))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openchat-tokenizer/tokenizer.json");
        Tokenizer::from_file(&p).unwrap()
    }

    /// After every id, what was printed is a prefix of the final text with no broken character, and
    /// whenever the ids so far decode to whole characters, all of it was printed: nothing held back.
    fn check_streams(text: &str) -> Vec<String> {
        let tok = tokenizer();
        let ids = tok.encode(text, false).unwrap();
        let fin = tok.decode(&ids, true).unwrap();
        let mut s = TextStream::new(vec![]);
        let mut printed = String::new();
        let mut pieces = Vec::new();
        for k in 0..ids.len() {
            let piece = s.push(&tok, ids[k]).unwrap();
            let at = format!("after id {k} ({:?}) of {text:?}", tok.id_to_token(ids[k]));
            assert!(!piece.contains(REPLACEMENT), "printed a broken character {at}");
            printed.push_str(&piece);
            assert!(fin.starts_with(&printed), "{printed:?} {at}");
            let want = tok.decode(&ids[..=k], true).unwrap();
            if want.ends_with(REPLACEMENT) {
                // The tokenizer turns a whole run of byte tokens into U+FFFDs while its last character
                // is incomplete; the stream may already show the run's finished characters.
                let settled = want.trim_end_matches(REPLACEMENT);
                assert!(printed.starts_with(settled), "{printed:?} {at}");
            } else {
                assert_eq!(printed, want, "{at}");
            }
            pieces.push(piece);
        }
        printed.push_str(&s.finish(&tok).unwrap());
        assert_eq!(printed, tok.decode(&ids, true).unwrap());
        pieces
    }

    #[test]
    fn multibyte_characters_split_across_byte_fallback_tokens() {
        let tok = tokenizer();
        let text = "Olá 😀 done 🦀 and 𝔘𝔫𝔦";
        let ids = tok.encode(text, false).unwrap();
        let byte_tokens = ids.iter().filter(|&&i| tok.id_to_token(i).is_some_and(|t| t.starts_with("<0x"))).count();
        assert!(byte_tokens >= 4, "the test needs byte-fallback tokens, got {:?}", ids);
        let pieces = check_streams(text);
        // The emoji's bytes arrive over several ids; it must be printed whole, in one piece.
        assert!(pieces.iter().any(|p| p.contains('😀')));
    }

    #[test]
    fn punctuation_right_after_a_word_is_not_held_back() {
        let tok = tokenizer();
        let text = "Hello, world! Really? Yes: (ok).";
        let ids = tok.encode(text, false).unwrap();
        let mut s = TextStream::new(vec![]);
        let mut printed = String::new();
        for &id in &ids {
            printed.push_str(&s.push(&tok, id).unwrap());
            if tok.id_to_token(id).as_deref() == Some(",") {
                assert!(printed.ends_with("Hello,"), "{printed:?}");
            }
        }
        assert_eq!(printed, text);
        check_streams(text);
        check_streams("中文，标点。日本語「かな」！");
    }

    #[test]
    fn stop_strings_are_cut_and_never_partly_printed() {
        let tok = tokenizer();
        let ids = tok.encode("The answer is 42. User: next question", false).unwrap();
        let mut s = TextStream::new(vec!["User:".into()]);
        let mut printed = String::new();
        for &id in &ids {
            printed.push_str(&s.push(&tok, id).unwrap());
            assert!(!printed.contains("User"), "{printed:?}");
            if s.stopped() {
                break;
            }
        }
        assert!(s.stopped());
        printed.push_str(&s.finish(&tok).unwrap());
        assert_eq!(printed, "The answer is 42. ");
        assert_eq!(s.text(), printed);

        // A stop string's beginning that never completes is printed at the end.
        let mut s = TextStream::new(vec!["42!".into()]);
        let mut printed = String::new();
        for &id in &tok.encode("It is 42", false).unwrap() {
            printed.push_str(&s.push(&tok, id).unwrap());
        }
        assert_eq!(printed, "It is ");
        printed.push_str(&s.finish(&tok).unwrap());
        assert_eq!(printed, "It is 42");
    }
}
