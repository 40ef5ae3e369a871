//! The engine's generation loop, shared by chat, generate and serve: prefill, then decode token by
//! token through the KV cache, with the next token chosen by a `Sampler`.

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::Tensor;

use crate::engine::ids_tensor;
use crate::error::{Error, Result};
use crate::model::{Cache, Logits, Model};
use crate::sampling::Sampler;
use crate::step::check::{self, Verdict};
use crate::step::{DecodePath, DecodeStep, StepOptions, StepOut};

/// How decode steps run (`--decode-path`, and the step's test options).
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    pub path: DecodePath,
    pub step: StepOptions,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions { path: DecodePath::Auto, step: StepOptions::default() }
    }
}

/// What runs a decode step: the reference forward pass, or the fused step (built, and checked when
/// the device has not been checked yet, with the first prompt).
enum Decoder<'m> {
    Reference,
    Pending(DecodePath, StepOptions),
    Fast(Box<DecodeStep<'m>>),
}

/// A model with its cache and the tokens the cache holds.
pub struct Generator<'m> {
    pub model: &'m Model,
    pub cache: Cache,
    pub tokens: Vec<u32>,
    /// Most tokens the cache may hold (`--ctx`); at most the model's max_position_embeddings.
    context: usize,
    /// Prompt tokens the last `feed_prompt` found already cached.
    pub prefix_reused: usize,
    decoder: Decoder<'m>,
    /// Why the fast path was given up, when it was.
    pub fallback: Option<String>,
    /// The self-check this generator ran, if it ran one.
    pub check: Option<Verdict>,
}

impl<'m> Generator<'m> {
    /// A generator whose cache holds `context` tokens (at most max_position_embeddings), decoding on
    /// the fastest path the device has.
    pub fn new(model: &'m Model, context: usize) -> Result<Generator<'m>> {
        Generator::with_decode(model, context, &DecodeOptions::default())
    }

    /// [`Generator::new`] on the decode path `opts` asks for (an error names `--decode-path` when the
    /// device cannot run it).
    pub fn with_decode(model: &'m Model, context: usize, opts: &DecodeOptions) -> Result<Generator<'m>> {
        Generator::on_cache(model, Cache::new(model, context)?, opts)
    }

    /// [`Generator::with_decode`] on `cache` (empty; a slot of a pool, say), its capacity the context.
    pub fn on_cache(model: &'m Model, cache: Cache, opts: &DecodeOptions) -> Result<Generator<'m>> {
        let decoder = match opts.path.resolve(model)? {
            DecodePath::Reference => Decoder::Reference,
            p => Decoder::Pending(p, opts.step.clone()),
        };
        let context = cache.capacity();
        Ok(Generator { model, cache, tokens: Vec::new(), context, prefix_reused: 0, decoder, fallback: None, check: None })
    }

    /// The decode path in use (or about to be): `reference` after a fallback.
    pub fn decode_path(&self) -> DecodePath {
        step_path(&self.decoder)
    }

    /// Kernel launches of the fast path's last token (None off the fast path).
    pub fn launches_per_token(&self) -> Option<usize> {
        match &self.decoder {
            Decoder::Fast(s) => Some(s.launches_per_token()),
            _ => None,
        }
    }

    /// Runs `ids` after what the cache holds and returns the last position's logits `[vocab]`.
    pub fn feed(&mut self, ids: &[u32]) -> Result<Tensor> {
        if let ([id], Decoder::Fast(step)) = (ids, &mut self.decoder) {
            match step.decode(&mut self.cache, *id, true) {
                Ok(StepOut::Logits(l)) => {
                    self.tokens.push(*id);
                    return Ok(l);
                }
                Ok(StepOut::Token(_)) => return Err(Error::internal("decode step: asked for logits, got a token")),
                Err(e) => self.give_up(step_path(&self.decoder), e)?,
            }
        }
        let logits = self.model.forward(&ids_tensor(ids, &self.model.device)?, &mut self.cache, Logits::Last)?;
        self.tokens.extend_from_slice(ids);
        Ok(logits.squeeze(0)?)
    }

    /// Feeds `token` and picks the one after it with `sampler`. On the fast path with a plain greedy
    /// sampler the argmax is taken on the device, so only the id comes back.
    pub fn decode_next(&mut self, token: u32, sampler: &mut Sampler) -> Result<u32> {
        if let (true, Decoder::Fast(step)) = (sampler.is_plain_greedy(), &mut self.decoder) {
            match step.decode(&mut self.cache, token, false) {
                Ok(StepOut::Token(next)) => {
                    self.tokens.push(token);
                    return Ok(next);
                }
                Ok(StepOut::Logits(_)) => return Err(Error::internal("decode step: asked for a token, got logits")),
                Err(e) => self.give_up(step_path(&self.decoder), e)?,
            }
        }
        let logits = self.feed(&[token])?;
        sampler.sample(&logits, &self.tokens)
    }

    /// Leaves the fast path `path` after `e` with one warning, unless `e` broke the device or is a bad
    /// flag (then it is the caller's error). A failed step never advanced the cache, so the reference
    /// path redoes the token.
    fn give_up(&mut self, path: DecodePath, e: Error) -> Result<()> {
        if matches!(e, Error::FastPathCrashed(_) | Error::Flag { .. }) {
            return Err(e);
        }
        let splits = match &self.decoder {
            Decoder::Fast(s) => s.plan().splits,
            _ => crate::step::splits_for(self.model, self.cache.capacity(), &StepOptions::default()),
        };
        check::remember(&check::key(self.model, path, splits), false);
        let msg = format!("the fast decode path ({}) failed: {e}; continuing on the reference path", path.as_str());
        eprintln!("warning: {msg}");
        self.fallback = Some(msg);
        self.decoder = Decoder::Reference;
        Ok(())
    }

    /// Builds the fast path requested at creation, and self-checks it on `prompt` unless this process
    /// already checked the device. Any failure leaves the generator on the reference path.
    /// [`generate`] calls it before its clock starts, so the one-time check is timed on its own.
    pub(crate) fn start_fast(&mut self, prompt: &[u32]) -> Result<()> {
        if !matches!(self.decoder, Decoder::Pending(..)) {
            return Ok(());
        }
        let Decoder::Pending(path, opts) = std::mem::replace(&mut self.decoder, Decoder::Reference) else { unreachable!("matched above") };
        let key = check::key(self.model, path, crate::step::splits_for(self.model, self.cache.capacity(), &opts));
        if check::known(&key) == Some(false) && opts.fault.is_none() {
            self.fallback = Some(format!("the fast decode path ({}) failed earlier in this process", path.as_str()));
            return Ok(());
        }
        let mut step = match DecodeStep::new(self.model, &self.cache, path, &opts) {
            Ok(s) => s,
            Err(e) => return self.give_up(path, e),
        };
        if check::known(&key).is_none() || opts.fault.is_some() {
            // The check runs this very step on this cache: what it passes is what decodes.
            let verdict = check::check_step(self.model, &mut step, &mut self.cache, &opts, prompt);
            self.reset();
            let verdict = match verdict {
                Ok(v) => v,
                Err(e) => return self.give_up(path, e),
            };
            // A deliberately faulted step says nothing of the device: its verdict is not kept.
            if opts.fault.is_none() {
                check::remember(&key, verdict.pass);
            }
            let pass = verdict.pass;
            if !pass {
                eprintln!("warning: {}", verdict.warning());
                self.fallback = Some(verdict.warning());
            }
            self.check = Some(verdict);
            if !pass {
                return Ok(());
            }
        }
        self.decoder = Decoder::Fast(Box::new(step));
        Ok(())
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
        if prompt.is_empty() {
            return Err(Error::flag("--prompt", "the prompt has no tokens"));
        }
        self.start_fast(prompt)?;
        let common = self.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        // At least one token must run to produce logits.
        let keep = common.min(prompt.len().saturating_sub(1));
        self.truncate(keep);
        self.prefix_reused = keep;
        self.feed(&prompt[keep..])
    }
}

/// The path a decoder runs (for messages).
fn step_path(d: &Decoder) -> DecodePath {
    match d {
        Decoder::Reference => DecodePath::Reference,
        Decoder::Pending(p, _) => *p,
        Decoder::Fast(s) => s.path(),
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
    /// Building and self-checking the fast path before the prompt (0 after the first prompt of a
    /// process); not part of prefill or the time to first token.
    pub self_check_secs: f64,
    pub stop: StopReason,
    /// The decode path the tokens came from (`reference` after a fallback).
    pub decode_path: DecodePath,
    /// Kernel launches per token on the fused path (None on the reference path).
    pub launches_per_token: Option<usize>,
    /// The CPU kernels' tier (`kernels::tier`) when the model runs on the CPU.
    pub cpu_kernels: Option<&'static str>,
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

/// One token's log-probability and the most likely tokens at its position: the log-softmax, in f32,
/// of the model's raw logits there — before `logit_bias`, penalties and temperature (vLLM's default).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub id: u32,
    pub logprob: f32,
    /// The most likely tokens, most likely first (equal values: the lower id first).
    pub top: Vec<(u32, f32)>,
}

/// log-softmax of `v`, summed in f64. A NaN, or no finite logit at all, is an error: no
/// log-probability is made up.
pub fn log_softmax(v: &[f32]) -> Result<Vec<f32>> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, |m, x| if x > m { x } else { m });
    if v.iter().any(|x| x.is_nan()) || !max.is_finite() {
        return Err(Error::internal("the logits hold a NaN or no finite value: no log-probabilities"));
    }
    Ok(crate::compare::log_softmax(v).into_iter().map(|x| x as f32).collect())
}

/// The log-probabilities of `id` and of the `top` most likely tokens under `logits` `[vocab]`.
pub fn token_logprobs(logits: &Tensor, id: u32, top: usize) -> Result<TokenLogprobs> {
    let v = logits.to_dtype(candle_core::DType::F32)?.to_device(&candle_core::Device::Cpu)?.to_vec1::<f32>()?;
    let lp = log_softmax(&v)?;
    let logprob = *lp.get(id as usize).ok_or_else(|| Error::internal(format!("token {id} is outside the logits ({})", lp.len())))?;
    let mut order: Vec<u32> = (0..lp.len() as u32).collect();
    let by_value = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
    let k = top.min(order.len());
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, by_value);
    }
    order.truncate(k);
    order.sort_unstable_by(by_value);
    Ok(TokenLogprobs { id, logprob, top: order.into_iter().map(|t| (t, lp[t as usize])).collect() })
}

/// Log-probabilities of each prompt token after the first (position i predicts token i + 1), with
/// the `top` most likely at each: one full-prompt forward pass on a cache of its own, so the
/// serving cache is left as it is.
pub fn prompt_logprobs(model: &Model, prompt: &[u32], top: usize) -> Result<Vec<TokenLogprobs>> {
    if prompt.len() < 2 {
        return Ok(Vec::new());
    }
    let mut cache = Cache::new(model, prompt.len())?;
    let logits = model.forward(&ids_tensor(prompt, &model.device)?, &mut cache, Logits::All)?.squeeze(0)?;
    (1..prompt.len()).map(|i| token_logprobs(&logits.get(i - 1)?, prompt[i], top)).collect()
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
    generate_scored(g, prompt, sampler, max_tokens, stop_ids, None, |id, _| on_token(id))
}

/// [`generate`], with each token's [`TokenLogprobs`] (and `logprobs` most likely tokens) when
/// `logprobs` is given. Those need every position's logits on the host, so the decode path then
/// returns logits even where a greedy choice could have been made on the device.
pub fn generate_scored(
    g: &mut Generator,
    prompt: &[u32],
    sampler: &mut Sampler,
    max_tokens: usize,
    stop_ids: &[u32],
    logprobs: Option<usize>,
    mut on_token: impl FnMut(u32, Option<TokenLogprobs>) -> ControlFlow<StopReason>,
) -> Result<GenerationStats> {
    let device = g.model.device.clone();
    let max_ctx = g.context.min(g.model.config.max_position_embeddings);
    if prompt.len() > max_ctx {
        return Err(Error::ContextTooSmall { prompt: prompt.len(), context: max_ctx });
    }
    // The first prompt of a process builds the fast path and self-checks it: a one-time cost, timed
    // apart so that prefill and time to first token measure the prompt.
    let self_check_secs = if matches!(g.decoder, Decoder::Pending(..)) {
        let check_start = Instant::now();
        g.start_fast(prompt)?;
        check_start.elapsed().as_secs_f64()
    } else {
        0.0
    };
    let start = Instant::now();
    let logits = g.feed_prompt(prompt)?;
    let prefilled = prompt.len() - g.prefix_reused;
    device.synchronize()?;
    let prefill_secs = start.elapsed().as_secs_f64();
    let mut generated = Vec::new();
    let decode_start = Instant::now();
    let mut stop = StopReason::MaxTokens;
    let score = |logits: &Tensor, id: u32| logprobs.map(|top| token_logprobs(logits, id, top)).transpose();
    let mut next = sampler.sample(&logits, &g.tokens)?;
    let mut scored = score(&logits, next)?;
    let ttft = start.elapsed().as_secs_f64();
    while generated.len() < max_tokens {
        if stop_ids.contains(&next) {
            stop = StopReason::Eos;
            break;
        }
        generated.push(next);
        if let ControlFlow::Break(reason) = on_token(next, scored.take()) {
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
        if logprobs.is_some() {
            let logits = g.feed(&[next])?;
            next = sampler.sample(&logits, &g.tokens)?;
            scored = score(&logits, next)?;
        } else {
            next = g.decode_next(next, sampler)?;
        }
    }
    device.synchronize()?;
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        prefilled_tokens: prefilled,
        generated,
        prefill_secs,
        decode_secs: decode_start.elapsed().as_secs_f64(),
        time_to_first_token_secs: ttft,
        self_check_secs,
        stop,
        decode_path: g.decode_path(),
        launches_per_token: g.launches_per_token(),
        cpu_kernels: device.is_cpu().then(|| crate::kernels::tier::active().name()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{self, LoadOptions};

    fn model() -> Model {
        let dir = format!("{}/tests/fixtures/tiny-mistral-bf16", env!("CARGO_MANIFEST_DIR"));
        engine::load(&LoadOptions::new(dir).expand("every:4").dtype("bf16")).unwrap().model
    }

    #[test]
    fn log_probabilities_are_a_log_softmax_and_nan_is_refused() {
        let lp = log_softmax(&[1.0, 3.0, 2.0, f32::NEG_INFINITY]).unwrap();
        let total: f64 = lp.iter().map(|&x| f64::from(x).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{lp:?}");
        assert!((lp[1] - lp[0] - 2.0).abs() < 1e-6 && lp[3] == f32::NEG_INFINITY);
        assert!(log_softmax(&[1.0, f32::NAN]).is_err(), "NaN makes no log-probability");
        assert!(log_softmax(&[f32::NEG_INFINITY; 3]).is_err());
        // Most likely first, equal values by id; the chosen token need not be among the top.
        let logits = Tensor::new(&[1.0f32, 3.0, 3.0, -1.0, 2.0], &candle_core::Device::Cpu).unwrap();
        let t = token_logprobs(&logits, 3, 3).unwrap();
        let ids: Vec<u32> = t.top.iter().map(|x| x.0).collect();
        assert_eq!(ids, [1, 2, 4]);
        let want = log_softmax(&[1.0, 3.0, 3.0, -1.0, 2.0]).unwrap();
        assert_eq!((t.id, t.logprob, t.top[2].1), (3, want[3], want[4]));
        assert_eq!(token_logprobs(&logits, 0, 0).unwrap().top, vec![]);
        assert_eq!(token_logprobs(&logits, 0, 20).unwrap().top.len(), 5);
        assert!(token_logprobs(&logits, 5, 1).is_err(), "an id past the logits");
    }

    #[test]
    fn the_self_check_runs_the_step_that_then_decodes() {
        let m = model();
        let opts = DecodeOptions { path: DecodePath::Fused, step: StepOptions { splits: Some(3), ..Default::default() } };
        let mut g = Generator::with_decode(&m, 64, &opts).unwrap();
        let prompt = [1u32, 415, 2936, 9060, 285, 1142];
        // Forget any verdict another test left, so this generator runs the check itself.
        let key = check::key(&m, DecodePath::Fused, 3);
        check::forget(&key);
        g.start_fast(&prompt).unwrap();
        let Decoder::Fast(step) = &g.decoder else { panic!("not on the fast path: {:?}", g.fallback) };
        // A step built after the check would not have run a token yet: this one ran the check's.
        assert!(step.launches_per_token() > 0, "the decoding step is not the one that was checked");
        assert_eq!(step.plan().splits, 3, "the configuration asked for");
        assert!(g.check.as_ref().is_some_and(|v| v.pass));
        // The check's tokens are gone: the cache and the token list start empty, in step.
        assert_eq!((g.cache.len(), g.tokens.len()), (0, 0));
        // Another split count is another configuration: not covered by this verdict.
        assert_eq!(check::known(&key), Some(true));
        assert_eq!(check::known(&check::key(&m, DecodePath::Fused, 2)), None);
    }
}
