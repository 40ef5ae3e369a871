//! Choosing the next token: temperature, top-k, top-p, min-p and a repeat penalty over the last
//! position's logits, with the checkpoint's generation_config.json as the defaults. Each setting's
//! range is checked by one function here, whichever way the value came in (flag, `/set`, request
//! field or generation_config.json).

use candle_core::{DType, Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::config::GenerationConfig;
use crate::constraint::Constraint;
use crate::error::Result;

/// How the next token is chosen. `temperature == 0` is greedy and reproducible.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// OpenAI's penalties, with llama.cpp's window: over the last `repeat_last_n` tokens, each
    /// token's logit less `frequency_penalty` × its count and `presence_penalty` once if present.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// OpenAI's `logit_bias`: (token id, value in [−100, 100]) added to that token's logit before
    /// anything else reads the logits (−100 all but bans it, 100 all but forces it).
    #[serde(default)]
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: None,
            top_k: None,
            min_p: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 299792458,
        }
    }
}

/// The range of each setting: `Err` holds the rule the value broke (`must be ≥ 0`), for callers to
/// put beside the flag, key or field that carried it.
pub mod check {
    /// 0 is greedy; any finite positive value samples (a tiny one in the limit where it is greedy).
    pub fn temperature(t: f64) -> Result<f64, &'static str> {
        if t >= 0.0 && t.is_finite() {
            Ok(t)
        } else {
            Err("must be a finite number ≥ 0")
        }
    }

    /// In (0, 1]; 1 keeps every token (no nucleus).
    pub fn top_p(p: f64) -> Result<f64, &'static str> {
        if p > 0.0 && p <= 1.0 {
            Ok(p)
        } else {
            Err("must be in (0, 1]")
        }
    }

    /// In [0, 1); 0 keeps every token.
    pub fn min_p(p: f64) -> Result<f64, &'static str> {
        if (0.0..1.0).contains(&p) {
            Ok(p)
        } else {
            Err("must be in [0, 1)")
        }
    }

    /// In [−2, 2] (OpenAI's range for frequency and presence penalties); 0 disables.
    pub fn penalty(x: f64) -> Result<f32, &'static str> {
        if (-2.0..=2.0).contains(&x) {
            Ok(x as f32)
        } else {
            Err("must be in [-2, 2]")
        }
    }

    /// Finite and > 0 once in f32 (what the sampler computes with); 1 disables.
    pub fn repeat_penalty(r: f64) -> Result<f32, &'static str> {
        let r32 = r as f32;
        if r32 > 0.0 && r32.is_finite() {
            Ok(r32)
        } else {
            Err("must be a number > 0 (and within f32's range)")
        }
    }
}

impl SamplingParams {
    /// The checkpoint's sampling defaults (generation_config.json, checked when read) over
    /// llama.cpp-like ones for what it leaves out; `do_sample: false` means greedy, as in transformers.
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

    /// Sets one parameter by name (`/set`, its flags and request fields), checked by [`check`].
    pub fn set(&mut self, key: &str, value: &str) -> std::result::Result<(), String> {
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> std::result::Result<T, String> {
            v.parse().map_err(|_| format!("{key}: `{v}` is not a valid number"))
        }
        let broke = |rule: &str| format!("{key} {rule}, got {value}");
        match key {
            "temperature" | "temp" => self.temperature = check::temperature(num(key, value)?).map_err(broke)?,
            "top_p" => self.top_p = Some(check::top_p(num(key, value)?).map_err(broke)?).filter(|&p| p < 1.0),
            "top_k" => {
                let k: usize = num(key, value)?;
                self.top_k = (k > 0).then_some(k);
            }
            "min_p" => self.min_p = Some(check::min_p(num(key, value)?).map_err(broke)?).filter(|&p| p > 0.0),
            "repeat_penalty" => self.repeat_penalty = check::repeat_penalty(num(key, value)?).map_err(broke)?,
            "repeat_last_n" => self.repeat_last_n = num(key, value)?,
            "frequency_penalty" => self.frequency_penalty = check::penalty(num(key, value)?).map_err(broke)?,
            "presence_penalty" => self.presence_penalty = check::penalty(num(key, value)?).map_err(broke)?,
            "seed" => self.seed = num(key, value)?,
            _ => {
                return Err(format!(
                    "unknown setting `{key}` (temperature, top_p, top_k, min_p, repeat_penalty, repeat_last_n, frequency_penalty, presence_penalty, seed)"
                ))
            }
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    processor: LogitsProcessor,
    /// The grammar the answer must follow (`response_format`, a tool call): its mask is applied to
    /// the logits after every other adjustment, and each sampled token moves it on.
    constraint: Option<Constraint>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        // `sample` hands the processor logits already divided by the temperature.
        let sampling = if params.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            match (params.top_k, params.top_p) {
                (None, None) => Sampling::All { temperature: 1.0 },
                (Some(k), None) => Sampling::TopK { k, temperature: 1.0 },
                (None, Some(p)) => Sampling::TopP { p, temperature: 1.0 },
                (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature: 1.0 },
            }
        };
        let processor = LogitsProcessor::from_sampling(params.seed, sampling);
        Sampler { params, processor, constraint: None }
    }

    /// The sampler, keeping its answers inside `constraint`'s grammar.
    pub fn with_constraint(mut self, constraint: Option<Constraint>) -> Sampler {
        self.constraint = constraint;
        self
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Greedy with nothing that reads the logits besides the argmax (no repeat penalty), so the choice
    /// can be made on the device.
    pub fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        p.temperature <= 0.0
            && p.repeat_penalty == 1.0
            && p.frequency_penalty == 0.0
            && p.presence_penalty == 0.0
            && p.logit_bias.is_empty()
            && self.constraint.is_none()
    }

    /// Picks the next token from last-position logits `[vocab]`, given the tokens so far.
    pub fn sample(&mut self, logits: &Tensor, history: &[u32]) -> Result<u32> {
        let mut v: Vec<f64> = logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
        for &(id, bias) in &self.params.logit_bias {
            if let Some(l) = v.get_mut(id as usize) {
                *l += f64::from(bias);
            }
        }
        let window = &history[history.len().saturating_sub(self.params.repeat_last_n)..];
        if self.params.repeat_penalty != 1.0 {
            apply_repeat_penalty(&mut v, f64::from(self.params.repeat_penalty), window);
        }
        if self.params.frequency_penalty != 0.0 || self.params.presence_penalty != 0.0 {
            apply_count_penalties(&mut v, f64::from(self.params.frequency_penalty), f64::from(self.params.presence_penalty), window);
        }
        if let Some(c) = &mut self.constraint {
            c.mask(&mut v)?;
        }
        let mut scaled = scale_logits(&v, self.params.temperature);
        if let Some(min_p) = self.params.min_p.filter(|&p| p > 0.0 && self.params.temperature > 0.0) {
            apply_min_p(&mut scaled, min_p);
        }
        let n = scaled.len();
        let id = self.processor.sample(&Tensor::from_vec(scaled, n, &Device::Cpu)?)?;
        if let Some(c) = &mut self.constraint {
            c.accept(id)?;
        }
        Ok(id)
    }
}

/// candle's repeat penalty (a seen token's logit divided by the penalty when positive, multiplied
/// when negative), in f64: a tiny penalty's quotients (2 / 1e-40) would be infinite in f32.
fn apply_repeat_penalty(logits: &mut [f64], penalty: f64, seen: &[u32]) {
    let mut done = std::collections::HashSet::new();
    for &id in seen {
        if let Some(l) = logits.get_mut(id as usize).filter(|_| done.insert(id)) {
            *l = if *l >= 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// OpenAI's frequency and presence penalties (llama.cpp's `penalties` sampler): a token seen `c`
/// times in `seen` loses `c · frequency + presence`.
fn apply_count_penalties(logits: &mut [f64], frequency: f64, presence: f64, seen: &[u32]) {
    let mut counts = std::collections::HashMap::<u32, u32>::new();
    for &id in seen {
        *counts.entry(id).or_default() += 1;
    }
    for (id, c) in counts {
        if let Some(l) = logits.get_mut(id as usize) {
            *l -= f64::from(c) * frequency + presence;
        }
    }
}

/// `(l − max) / temperature` as f32 (just `l − max` when greedy): the same softmax as `l / T`, but
/// finite for any temperature > 0, where `l / T` overflows f32 for a tiny T (logits of 10 at 1e-40)
/// and the softmax turns NaN. The top token gets 0, the others ≤ 0 (−∞ when far below).
fn scale_logits(logits: &[f64], temperature: f64) -> Vec<f32> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    logits.iter().map(|&l| if l == max { 0.0 } else { ((l - max) / t) as f32 }).collect()
}

/// Min-p on logits already divided by the temperature, the top one at 0: drop tokens whose
/// probability is below `min_p` × the top token's (p_i / p_max = exp(l_i) ≥ min_p ⇔ l_i ≥ ln min_p).
fn apply_min_p(scaled: &mut [f32], min_p: f64) {
    let cut = min_p.ln() as f32;
    for x in scaled.iter_mut() {
        if *x < cut {
            *x = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Tensor {
        Tensor::new(&[1.0f32, 3.0, 2.0, -1.0], &Device::Cpu).unwrap()
    }

    #[test]
    fn tiny_positive_temperatures_sample_the_top_token() {
        // logit / temperature overflows f32 for all of these; the limit of sampling there is greedy.
        for temperature in [1e-40, 1e-300, f64::MIN_POSITIVE, 5e-324] {
            for (top_k, top_p) in [(None, None), (Some(2), None), (None, Some(0.5)), (Some(3), Some(0.9))] {
                let p = SamplingParams { temperature, top_k, top_p, min_p: Some(0.05), ..SamplingParams::default() };
                assert_eq!(Sampler::new(p).sample(&logits(), &[]).unwrap(), 1, "{temperature} {top_k:?} {top_p:?}");
            }
        }
    }

    #[test]
    fn frequency_and_presence_penalties_count_the_window() {
        // logits 1, 3, 2, −1; token 1 seen twice, token 2 once.
        let run = |frequency: f32, presence: f32, history: &[u32]| {
            let p = SamplingParams { frequency_penalty: frequency, presence_penalty: presence, repeat_last_n: 3, ..SamplingParams::default() };
            let mut s = Sampler::new(p);
            assert!(!s.is_plain_greedy() || (frequency == 0.0 && presence == 0.0));
            s.sample(&logits(), history).unwrap()
        };
        assert_eq!(run(0.0, 0.0, &[1, 1, 2]), 1);
        // frequency 0.6: token 1 → 3 − 1.2 = 1.8, token 2 → 1.4, token 0 (unseen) stays 1: still 1.
        assert_eq!(run(0.6, 0.0, &[1, 1, 2]), 1);
        // frequency 1.2: token 1 → 0.6, token 2 → 0.8, token 0 stays 1: token 0.
        assert_eq!(run(1.2, 0.0, &[1, 1, 2]), 0);
        // presence alone: 1 → 3 − 1.5 = 1.5, 2 → 0.5, 0 stays 1: token 1.
        assert_eq!(run(0.0, 1.5, &[1, 1, 2]), 1);
        // Outside the window (last 3) a token is not counted: [1, 1, 1, 2, 2, 2] leaves only 2s.
        assert_eq!(run(2.0, 0.0, &[1, 1, 1, 2, 2, 2]), 1);
        let mut p = SamplingParams::default();
        assert!(p.set("presence_penalty", "2.5").unwrap_err().contains("[-2, 2]"));
        p.set("frequency_penalty", "-0.5").unwrap();
        assert_eq!(p.frequency_penalty, -0.5);
    }

    #[test]
    fn logit_bias_moves_the_choice() {
        // logits 1, 3, 2, −1: +2.5 on token 3 makes it 1.5 (still below 3); −1.5 on token 1 makes it
        // 1.5 (below token 2's 2).
        let pick = |bias: Vec<(u32, f32)>| {
            let mut s = Sampler::new(SamplingParams { logit_bias: bias, ..SamplingParams::default() });
            assert!(!s.is_plain_greedy());
            s.sample(&logits(), &[]).unwrap()
        };
        assert_eq!(pick(vec![(3, 2.5)]), 1);
        assert_eq!(pick(vec![(1, -1.5)]), 2);
        assert_eq!(pick(vec![(3, 100.0)]), 3);
        assert_eq!(pick(vec![(1, -100.0), (2, -100.0)]), 0);
    }

    #[test]
    fn tiny_repeat_penalties_favour_repeated_tokens() {
        // 2.0 / 1e-40 overflows f32: the repeated token with a positive logit wins outright.
        for temperature in [0.0, 0.8] {
            let p = SamplingParams { temperature, repeat_penalty: 1e-40, ..SamplingParams::default() };
            assert_eq!(Sampler::new(p).sample(&logits(), &[2, 3]).unwrap(), 2, "{temperature}");
        }
    }
}
