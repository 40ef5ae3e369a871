//! Choosing the next token: temperature, top-k, top-p, min-p and a repeat penalty over the last
//! position's logits, with the checkpoint's generation_config.json as the defaults.

use candle_core::{DType, Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::config::GenerationConfig;
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

    /// Greedy with nothing that reads the logits besides the argmax (no repeat penalty), so the choice
    /// can be made on the device.
    pub fn is_plain_greedy(&self) -> bool {
        self.params.temperature <= 0.0 && self.params.repeat_penalty == 1.0
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
