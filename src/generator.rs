//! The one generator shared by chat, generate and bench: prefill, then decode token by token through
//! the KV cache, with the next token chosen by a `Sampler`.

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::Tensor;

use crate::engine::ids_tensor;
use crate::error::{Error, Result};
use crate::model::{Cache, Logits, Model};
use crate::sampling::Sampler;

/// A model with its cache and the tokens the cache holds.
pub struct Generator<'m> {
    pub model: &'m Model,
    pub cache: Cache,
    pub tokens: Vec<u32>,
    /// Most tokens the cache may hold (`--ctx`); at most the model's max_position_embeddings.
    context: usize,
    /// Prompt tokens the last `feed_prompt` found already cached.
    pub prefix_reused: usize,
}

impl<'m> Generator<'m> {
    /// A generator whose cache holds `context` tokens (at most max_position_embeddings).
    pub fn new(model: &'m Model, context: usize) -> Result<Generator<'m>> {
        Ok(Generator { model, cache: Cache::new(model, context)?, tokens: Vec::new(), context, prefix_reused: 0 })
    }

    /// Runs `ids` after what the cache holds and returns the last position's logits `[vocab]`.
    pub fn feed(&mut self, ids: &[u32]) -> Result<Tensor> {
        let logits = self.model.forward(&ids_tensor(ids, &self.model.device)?, &mut self.cache, Logits::Last)?;
        self.tokens.extend_from_slice(ids);
        Ok(logits.squeeze(0)?)
    }

    /// Most tokens the cache holds (`--ctx`).
    pub fn context(&self) -> usize {
        self.context
    }

    pub fn reset(&mut self) {
        self.cache.reset();
        self.tokens.clear();
    }

    /// Keeps the first `n` tokens of the cache, e.g. the common prefix with a new prompt.
    pub fn truncate(&mut self, n: usize) {
        self.cache.truncate(n);
        self.tokens.truncate(n);
    }

    /// Feeds only the part of `prompt` that the cache does not already hold (a multi-turn chat
    /// re-sends its whole history each turn). Returns the logits after the prompt.
    pub fn feed_prompt(&mut self, prompt: &[u32]) -> Result<Tensor> {
        let common = self.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        // At least one token must run to produce logits.
        let keep = common.min(prompt.len().saturating_sub(1));
        self.truncate(keep);
        self.prefix_reused = keep;
        self.feed(&prompt[keep..])
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    MaxTokens,
    StopString,
    Interrupted,
    ContextFull,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Prompt tokens actually run (the rest came from the cache).
    pub prefilled_tokens: usize,
    pub generated: Vec<u32>,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub time_to_first_token_secs: f64,
    pub stop: StopReason,
}

impl GenerationStats {
    pub fn prefill_tps(&self) -> f64 {
        self.prefilled_tokens as f64 / self.prefill_secs.max(1e-9)
    }

    /// Decode throughput, counting the tokens produced after the first.
    pub fn decode_tps(&self) -> f64 {
        self.generated.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Generates after `prompt` until a stop id, `max_tokens`, the context end, or `on_token` breaks.
/// `on_token` sees each token as soon as it is sampled; the stop token itself is not passed on.
pub fn generate(
    g: &mut Generator,
    prompt: &[u32],
    sampler: &mut Sampler,
    max_tokens: usize,
    stop_ids: &[u32],
    mut on_token: impl FnMut(u32) -> ControlFlow<StopReason>,
) -> Result<GenerationStats> {
    let device = g.model.device.clone();
    let max_ctx = g.context.min(g.model.config.max_position_embeddings);
    if prompt.len() > max_ctx {
        return Err(Error::ContextTooSmall { prompt: prompt.len(), context: max_ctx });
    }
    let start = Instant::now();
    let mut logits = g.feed_prompt(prompt)?;
    let prefilled = prompt.len() - g.prefix_reused;
    device.synchronize()?;
    let prefill_secs = start.elapsed().as_secs_f64();
    let mut generated = Vec::new();
    let mut ttft = 0.0;
    let decode_start = Instant::now();
    let mut stop = StopReason::MaxTokens;
    while generated.len() < max_tokens {
        let next = sampler.sample(&logits, &g.tokens)?;
        if generated.is_empty() {
            ttft = start.elapsed().as_secs_f64();
        }
        if stop_ids.contains(&next) {
            stop = StopReason::Eos;
            break;
        }
        generated.push(next);
        if let ControlFlow::Break(reason) = on_token(next) {
            stop = reason;
            break;
        }
        if generated.len() == max_tokens {
            break;
        }
        if g.tokens.len() + 1 > max_ctx {
            stop = StopReason::ContextFull;
            break;
        }
        logits = g.feed(&[next])?;
    }
    device.synchronize()?;
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        prefilled_tokens: prefilled,
        generated,
        prefill_secs,
        decode_secs: decode_start.elapsed().as_secs_f64(),
        time_to_first_token_secs: ttft,
        stop,
    })
}
