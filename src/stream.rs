//! Streaming detokenization: turns generated ids into printable text as they arrive, never printing
//! half a UTF-8 character and never holding back finished text (punctuation, emoji), and cutting the
//! answer at `--stop` strings without ever printing any part of one.
//!
//! The incremental decoding itself is `tokenizers`' `DecodeStream` (it decodes a window of the
//! previous chunk's ids plus the new ones, so SentencePiece's leading-space rules and byte-fallback
//! sequences come out right at a constant cost per token). What it lacks is kept here: stop strings,
//! and handing out at the end what never became whole characters.

use crate::error::Result;
use crate::tokenizer::{DecodeStream, Tokenizer};

/// Decodes a growing list of ids and holds back what could still turn into a stop string.
pub struct TextStream<'t> {
    tok: &'t Tokenizer,
    decoder: DecodeStream<'t>,
    /// Ids of the decoder's last chunk: the context `finish` decodes the leftover ids in.
    chunk: Vec<u32>,
    /// Ids since the last chunk (bytes of a character not yet complete).
    pending: Vec<u32>,
    /// Everything decoded so far, stop strings cut off.
    text: String,
    /// Bytes of `text` handed to the caller.
    emitted: usize,
    stops: Vec<String>,
    stopped: bool,
}

impl<'t> TextStream<'t> {
    pub fn new(tok: &'t Tokenizer, stops: Vec<String>) -> TextStream<'t> {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        TextStream { tok, decoder: tok.decode_stream(), chunk: Vec::new(), pending: Vec::new(), text: String::new(), emitted: 0, stops, stopped: false }
    }

    /// Adds `id`; returns the text that can be printed now (maybe empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.pending.push(id);
        if let Some(piece) = self.decoder.step(id)? {
            self.text.push_str(&piece);
            self.chunk = std::mem::take(&mut self.pending);
        }
        Ok(self.release(false))
    }

    /// Ends the stream: returns whatever is still held back (a character whose bytes never completed,
    /// decoded as U+FFFD; the start of a stop string that never completed).
    pub fn finish(&mut self) -> Result<String> {
        if !self.stopped && !self.pending.is_empty() {
            let before = self.tok.decode(&self.chunk, true)?;
            let mut window = std::mem::take(&mut self.chunk);
            window.append(&mut self.pending);
            let after = self.tok.decode(&window, true)?;
            // Decoders are prefix-stable in practice; should one rewrite the end of the window, the
            // text past the old length is still the best available answer.
            if let Some(new) = after.strip_prefix(before.as_str()).or_else(|| after.get(before.len()..)) {
                self.text.push_str(new);
            }
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
        pending.char_indices().map(|(i, _)| &pending[i..]).find(|tail| self.stops.iter().any(|s| s.starts_with(tail))).map_or(0, str::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLACEMENT: char = '\u{FFFD}';

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
        let mut s = TextStream::new(&tok, vec![]);
        let mut printed = String::new();
        let mut pieces = Vec::new();
        for k in 0..ids.len() {
            let piece = s.push(ids[k]).unwrap();
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
        printed.push_str(&s.finish().unwrap());
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
    fn an_unfinished_character_is_handed_out_at_the_end() {
        // The crate's decoder waits for the rest of a byte-fallback character forever; an answer
        // cut short there still ends with what the tokenizer makes of the bytes it got.
        let tok = tokenizer();
        let ids = tok.encode("Hi 𝔘𝔫𝔦", false).unwrap();
        let k = (1..ids.len()).find(|&k| tok.decode(&ids[..k], true).unwrap().ends_with(REPLACEMENT));
        let cut = &ids[..k.expect("the text must be spelled in byte-fallback tokens")];
        let mut s = TextStream::new(&tok, vec![]);
        let printed: String = cut.iter().map(|&id| s.push(id).unwrap()).collect();
        assert!(!printed.contains(REPLACEMENT), "{printed:?}");
        let rest = s.finish().unwrap();
        assert!(rest.starts_with(REPLACEMENT), "{rest:?}");
        assert_eq!(printed + &rest, tok.decode(cut, true).unwrap());
    }

    #[test]
    fn punctuation_right_after_a_word_is_not_held_back() {
        let tok = tokenizer();
        let text = "Hello, world! Really? Yes: (ok).";
        let ids = tok.encode(text, false).unwrap();
        let mut s = TextStream::new(&tok, vec![]);
        let mut printed = String::new();
        for &id in &ids {
            printed.push_str(&s.push(id).unwrap());
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
        let mut s = TextStream::new(&tok, vec!["User:".into()]);
        let mut printed = String::new();
        for &id in &ids {
            printed.push_str(&s.push(id).unwrap());
            assert!(!printed.contains("User"), "{printed:?}");
            if s.stopped() {
                break;
            }
        }
        assert!(s.stopped());
        printed.push_str(&s.finish().unwrap());
        assert_eq!(printed, "The answer is 42. ");
        assert_eq!(s.text(), printed);

        // A stop string's beginning that never completes is printed at the end.
        let mut s = TextStream::new(&tok, vec!["42!".into()]);
        let mut printed = String::new();
        for &id in &tok.encode("It is 42", false).unwrap() {
            printed.push_str(&s.push(id).unwrap());
        }
        assert_eq!(printed, "It is ");
        printed.push_str(&s.finish().unwrap());
        assert_eq!(printed, "It is 42");
    }
}
