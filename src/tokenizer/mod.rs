//! The checkpoint's tokenizer (tokenizer.json, or a GGUF's metadata) with errors that name the file.

pub mod gguf;
pub mod gguf_bpe;

use std::path::{Path, PathBuf};

use crate::engine::Source;
use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// A tokenizer.json, or the tokenizer a GGUF file's metadata describes.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        if crate::quant::gguf::is_gguf_path(path) {
            return Tokenizer::from_gguf(&crate::quant::gguf::GgufFile::open(path)?.vocab()?, path);
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer { path: path.into(), msg: e.to_string() })?;
        Ok(Tokenizer { inner, path: path.into() })
    }

    /// The tokenizer a GGUF's metadata describes (`gguf::build`); `path` is the GGUF.
    pub fn from_gguf(vocab: &crate::quant::gguf::GgufVocab, path: &Path) -> Result<Tokenizer> {
        Ok(Tokenizer { inner: gguf::build(vocab, path)?, path: path.into() })
    }

    /// The tokenizer.json beside the checkpoint, checked against the model: every id it can produce
    /// must have a row in the embedding, or the first such token fails deep inside the forward pass.
    pub fn for_model(source: &Source) -> Result<Tokenizer> {
        let tok = match &source.files.tokenizer {
            Some(p) => Tokenizer::from_file(p)?,
            None => {
                let path = source.files.dir.join("tokenizer.json");
                return Err(Error::Tokenizer { path, msg: "no tokenizer.json beside the checkpoint".into() });
            }
        };
        let vocab = source.config.vocab_size;
        if let Some((token, id)) = tok.inner.get_vocab(true).into_iter().max_by_key(|(_, id)| *id) {
            if id as usize >= vocab {
                let msg = format!("token `{token}` has id {id}, beyond the model's {vocab} embedding rows (vocab_size)");
                return Err(Error::Tokenizer { path: tok.path.clone(), msg });
            }
        }
        Ok(tok)
    }

    /// Bytes of the longest token's text: a prompt of `n` tokens is at most `n` times this long.
    pub fn longest_token_bytes(&self) -> usize {
        self.inner.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(1)
    }

    /// Token ids of `text`; `special` adds what the tokenizer's post-processor adds (BOS for Llama/Mistral).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, special).map_err(|e| Error::Tokenizer { path: self.path.clone(), msg: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::Tokenizer { path: self.path.clone(), msg: e.to_string() })
    }

    /// The id of a token string, e.g. `<|end_of_turn|>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The crate's streaming decoder over this tokenizer, special tokens skipped.
    pub fn decode_stream(&self) -> DecodeStream<'_> {
        DecodeStream { inner: self.inner.decode_stream(true), path: &self.path }
    }
}

type Stream<'t> = tokenizers::DecodeStream<
    't,
    tokenizers::ModelWrapper,
    tokenizers::NormalizerWrapper,
    tokenizers::PreTokenizerWrapper,
    tokenizers::PostProcessorWrapper,
    tokenizers::DecoderWrapper,
>;

/// `tokenizers`' `DecodeStream` with errors that name the tokenizer file.
pub struct DecodeStream<'t> {
    inner: Stream<'t>,
    path: &'t Path,
}

impl DecodeStream<'_> {
    /// The text `id` completes, if any (None while a character's bytes are still arriving).
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.inner.step(id).map_err(|e| Error::Tokenizer { path: self.path.into(), msg: e.to_string() })
    }
}
