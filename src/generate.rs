//! The one generator shared by chat, generate and bench: prefill, then decode token by token through
//! the KV cache, sampling with temperature / top-k / top-p / min-p and a repeat penalty.

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::engine::ids_tensor;
use crate::config::GenerationConfig;
use crate::error::{Error, Result};
use crate::model::{Cache, Logits, Model};

/// How the next token is chosen. `temperature == 0` is greedy and reproducible.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_p: None, top_k: None, min_p: None, repeat_penalty: 1.0, repeat_last_n: 64, seed: 299792458 }
    }
}

impl SamplingParams {
    /// The checkpoint's sampling defaults (generation_config.json) over llama.cpp-like ones for what
    /// it leaves out; `do_sample: false` means greedy, as in transformers.
    pub fn from_generation_config(gc: &GenerationConfig) -> SamplingParams {
        let mut p = SamplingParams {
            temperature: gc.temperature.unwrap_or(0.8),
            top_p: Some(gc.top_p.unwrap_or(0.95)).filter(|&p| p < 1.0),
            top_k: Some(gc.top_k.unwrap_or(40)).filter(|&k| k > 0),
            min_p: Some(0.05),
            repeat_penalty: gc.repetition_penalty.unwrap_or(1.0),
            ..SamplingParams::default()
        };
        if gc.do_sample == Some(false) {
            p.temperature = 0.0;
        }
        p
    }

    /// Sets one parameter by name (`/set` and its flags), checking its range.
    pub fn set(&mut self, key: &str, value: &str) -> std::result::Result<(), String> {
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> std::result::Result<T, String> {
            v.parse().map_err(|_| format!("{key}: `{v}` is not a valid number"))
        }
        match key {
            "temperature" | "temp" => {
                let t: f64 = num(key, value)?;
                if !(t >= 0.0 && t.is_finite()) {
                    return Err(format!("temperature must be ≥ 0, got {value}"));
                }
                self.temperature = t;
            }
            "top_p" => {
                let p: f64 = num(key, value)?;
                if !(p > 0.0 && p <= 1.0) {
                    return Err(format!("top_p must be in (0, 1], got {value}"));
                }
                self.top_p = (p < 1.0).then_some(p);
            }
            "top_k" => {
                let k: usize = num(key, value)?;
                self.top_k = (k > 0).then_some(k);
            }
            "min_p" => {
                let p: f64 = num(key, value)?;
                if !(0.0..1.0).contains(&p) {
                    return Err(format!("min_p must be in [0, 1), got {value}"));
                }
                self.min_p = (p > 0.0).then_some(p);
            }
            "repeat_penalty" => {
                let r: f32 = num(key, value)?;
                if !(r > 0.0 && r.is_finite()) {
                    return Err(format!("repeat_penalty must be > 0, got {value}"));
                }
                self.repeat_penalty = r;
            }
            "repeat_last_n" => self.repeat_last_n = num(key, value)?,
            "seed" => self.seed = num(key, value)?,
            _ => {
                return Err(format!(
                    "unknown setting `{key}` (temperature, top_p, top_k, min_p, repeat_penalty, repeat_last_n, seed)"
                ))
            }
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    processor: LogitsProcessor,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let t = params.temperature;
        let sampling = if t <= 0.0 {
            Sampling::ArgMax
        } else {
            match (params.top_k, params.top_p) {
                (None, None) => Sampling::All { temperature: t },
                (Some(k), None) => Sampling::TopK { k, temperature: t },
                (None, Some(p)) => Sampling::TopP { p, temperature: t },
                (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature: t },
            }
        };
        let processor = LogitsProcessor::from_sampling(params.seed, sampling);
        Sampler { params, processor }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from last-position logits `[vocab]`, given the tokens so far.
    pub fn sample(&mut self, logits: &Tensor, history: &[u32]) -> Result<u32> {
        let mut logits = logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        if self.params.repeat_penalty != 1.0 {
            let start = history.len().saturating_sub(self.params.repeat_last_n);
            logits = candle_transformers::utils::apply_repeat_penalty(&logits, self.params.repeat_penalty, &history[start..])?;
        }
        if let Some(min_p) = self.params.min_p.filter(|&p| p > 0.0 && self.params.temperature > 0.0) {
            logits = apply_min_p(&logits, min_p, self.params.temperature)?;
        }
        Ok(self.processor.sample(&logits)?)
    }
}

/// Min-p: drop tokens whose probability is below `min_p` × the top token's probability.
fn apply_min_p(logits: &Tensor, min_p: f64, temperature: f64) -> Result<Tensor> {
    let mut v = logits.to_vec1::<f32>()?;
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // p_i / p_max = exp((l_i − l_max) / T) ≥ min_p  ⇔  l_i ≥ l_max + T·ln(min_p)
    let cut = max + (temperature * min_p.ln()) as f32;
    for x in v.iter_mut() {
        if *x < cut {
            *x = f32::NEG_INFINITY;
        }
    }
    Ok(Tensor::from_vec(v, logits.dims(), &Device::Cpu)?)
}

/// A model with its cache and the tokens the cache holds.
pub struct Generator<'m> {
    pub model: &'m Model,
    pub cache: Cache,
    pub tokens: Vec<u32>,
    /// Most tokens the cache may hold (`--ctx`); at most the model's max_position_embeddings.
    pub context: usize,
    /// Prompt tokens the last `feed_prompt` found already cached.
    pub prefix_reused: usize,
}

impl<'m> Generator<'m> {
    pub fn new(model: &'m Model) -> Generator<'m> {
        let context = model.config.max_position_embeddings;
        Generator { model, cache: Cache::new(model), tokens: Vec::new(), context, prefix_reused: 0 }
    }

    /// Runs `ids` after what the cache holds and returns the last position's logits `[vocab]`.
    pub fn feed(&mut self, ids: &[u32]) -> Result<Tensor> {
        let logits = self.model.forward(&ids_tensor(ids, &self.model.device)?, &mut self.cache, Logits::Last)?;
        self.tokens.extend_from_slice(ids);
        Ok(logits.squeeze(0)?)
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
