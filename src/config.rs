//! Model and generation configuration, read from Hugging Face `config.json` / `generation_config.json`.

use std::path::Path;

use candle_core::DType;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The architecture of a checkpoint, as far as expanse runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Architecture {
    Mistral,
    Llama,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
        }
    }
}

/// A Mistral/Llama config with Hugging Face field names, both spellings of the keys that
/// transformers 5 renamed resolved into one value.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    /// Hugging Face semantics: a query attends to at most this many keys, itself included.
    pub sliding_window: Option<usize>,
    pub rope_theta: f64,
    /// RoPE frequencies stretched for long context (Llama 3.1/3.2), if at all.
    pub rope_scaling: Option<RopeScaling>,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// The checkpoint's own dtype (`dtype`, or the older `torch_dtype`).
    #[serde(skip)]
    pub dtype: Option<DType>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// How RoPE's frequencies depart from θ^(−2i/d): Llama 3's scaling, as a config.json states it or as a
/// GGUF stores it (per-frequency divisors, which llama.cpp's converter computes from the same keys).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    /// transformers' `rope_type: llama3`: wavelengths under original/high_freq_factor keep their
    /// frequency, those over original/low_freq_factor are divided by `factor`, those between blend.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
    /// A GGUF's `rope_freqs.weight`: frequency i divided by divisor i (llama.cpp's `freq_factors`).
    Divisors(Vec<f32>),
}

impl RopeScaling {
    /// The scaling a `rope_scaling` / `rope_parameters` object describes (`key` names it in errors):
    /// None for `default`, refused for a type expanse does not compute.
    fn from_json(v: &Value, key: &str) -> std::result::Result<Option<RopeScaling>, String> {
        let Some(obj) = v.as_object() else { return Err(format!("`{key}` is not an object")) };
        // The type under transformers 5's name or the older one; a null or a number is not a type.
        let named = ["rope_type", "type"].into_iter().find_map(|k| obj.get(k).filter(|t| !t.is_null()).map(|t| (k, t)));
        let (type_key, kind) = match named {
            Some((k, t)) => (k, t.as_str().ok_or_else(|| format!("`{key}.{k}` {t} is not a string"))?),
            // Per-layer-type parameters (`{"full_attention": {...}}`): transformers reads none of them
            // for a Llama, llama.cpp's converter does; refused rather than run one way of the two.
            None if obj.values().any(Value::is_object) => {
                return Err(format!("`{key}` holds parameters per layer type ({}): not supported", obj.keys().cloned().collect::<Vec<_>>().join(", ")))
            }
            None => ("rope_type", "default"),
        };
        match kind {
            "default" => Ok(None),
            "llama3" => {
                let num = |k: &str| v.get(k).and_then(Value::as_f64).ok_or_else(|| format!("`{key}.{k}` is missing or not a number (rope_type llama3)"));
                let s = RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                };
                s.check(key)?;
                Ok(Some(s))
            }
            other => Err(format!("`{key}.{type_key}` `{other}` is not supported (RoPE scaling: llama3 only)")),
        }
    }

    /// Values that would make a frequency zero, negative, infinite or NaN.
    pub fn check(&self, key: &str) -> std::result::Result<(), String> {
        let positive = |v: f64| v > 0.0 && v.is_finite();
        match self {
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                for (k, v) in [("factor", factor), ("low_freq_factor", low_freq_factor), ("original_max_position_embeddings", original_max_position_embeddings)]
                {
                    if !positive(*v) {
                        return Err(format!("`{key}.{k}` {v}: must be a finite number > 0"));
                    }
                }
                if !(high_freq_factor > low_freq_factor && high_freq_factor.is_finite()) {
                    return Err(format!("`{key}.high_freq_factor` {high_freq_factor}: must be finite and above low_freq_factor {low_freq_factor}"));
                }
            }
            RopeScaling::Divisors(d) => {
                if let Some((i, v)) = d.iter().enumerate().find(|(_, v)| !positive(f64::from(**v))) {
                    return Err(format!("`{key}` value {i} is {v}: every divisor must be a finite number > 0"));
                }
            }
        }
        Ok(())
    }

    /// Scales RoPE's inverse frequencies `inv_freq` (f32, as transformers and llama.cpp compute them).
    pub fn apply(&self, inv_freq: &mut [f32]) {
        match self {
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
                // transformers' _compute_llama3_parameters, in its order, in f32.
                let (factor, low, high, old) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32, *old as f32);
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - low) / (high - low);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            RopeScaling::Divisors(d) => inv_freq.iter_mut().zip(d).for_each(|(f, d)| *f /= d),
        }
    }
}

#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    sliding_window: Option<usize>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    dtype: Option<String>,
    torch_dtype: Option<String>,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

fn default_max_pos() -> usize {
    4096
}
fn default_eps() -> f64 {
    1e-6
}

/// `"bfloat16"` → BF16; the names transformers writes for dtypes.
pub fn parse_dtype(name: &str) -> Option<DType> {
    match name.trim_start_matches("torch.") {
        "bfloat16" | "bf16" => Some(DType::BF16),
        "float16" | "f16" | "half" => Some(DType::F16),
        "float32" | "f32" | "float" => Some(DType::F32),
        _ => None,
    }
}

pub fn dtype_hf_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F32 => "float32",
        DType::F64 => "float64",
        _ => "unknown",
    }
}

/// A token id field of a config (`key`, in `path`): an id, a list of ids or null (none), every id in
/// the vocabulary. An id out of range would be truncated, never match, or index past the embeddings.
fn config_ids(v: &Option<Value>, key: &str, vocab_size: usize, path: &Path) -> Result<Vec<u32>> {
    let Some(v) = v.as_ref().filter(|x| !x.is_null()) else { return Ok(Vec::new()) };
    let ids = token_ids_strict(v).map_err(|rule| Error::bad_file(path, format!("`{key}` {v}: {rule}")))?;
    in_vocab(&ids, key, vocab_size, path)?;
    Ok(ids)
}

/// Every id of `key` (in `path`) below `vocab_size`, else an error naming it.
fn in_vocab(ids: &[u32], key: &str, vocab_size: usize, path: &Path) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab_size) {
        Some(id) => Err(Error::bad_file(path, format!("`{key}` {id} is outside the model's vocabulary (`vocab_size` {vocab_size})"))),
        None => Ok(()),
    }
}

/// Values that parse but make the model meaningless (NaN logits, or nothing to attend to).
fn check_values(raw: &RawConfig, arch: Architecture, rope_theta: f64) -> std::result::Result<(), String> {
    if arch == Architecture::Mistral && raw.sliding_window == Some(0) {
        return Err("`sliding_window` 0: a query must attend to at least itself (use null for no window)".into());
    }
    if !(raw.rms_norm_eps > 0.0 && raw.rms_norm_eps.is_finite()) {
        return Err(format!("`rms_norm_eps` {}: must be a finite number > 0", raw.rms_norm_eps));
    }
    if !(rope_theta > 0.0 && rope_theta.is_finite()) {
        return Err(format!("`rope_theta` {rope_theta}: must be a finite number > 0"));
    }
    if raw.max_position_embeddings == 0 {
        return Err("`max_position_embeddings` 0: the model could not hold a single token".into());
    }
    Ok(())
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_text(path)?;
        Self::from_json(&text, path)
    }

    /// Parses `config.json` text; `path` only names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| Error::bad_file(path, format!("invalid config: {e}")))?;
        let bad = |msg: String| Error::bad_file(path, msg);

        let arch_name = match (&raw.architectures, &raw.model_type) {
            (Some(a), _) if !a.is_empty() => a[0].clone(),
            (_, Some(t)) => t.clone(),
            _ => return Err(bad("no `architectures` or `model_type`".into())),
        };
        let architecture = match arch_name.as_str() {
            "MistralForCausalLM" | "mistral" => Architecture::Mistral,
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            _ => return Err(Error::Architecture { path: path.into(), arch: arch_name }),
        };
        let scaling_json = raw.rope_scaling.as_ref().filter(|v| !v.is_null());
        let mut rope_scaling = match scaling_json {
            Some(v) => RopeScaling::from_json(v, "rope_scaling").map_err(bad)?,
            None => None,
        };
        let mut rope_theta = raw.rope_theta;
        // transformers 5 writes θ and the scaling together in `rope_parameters`.
        if let Some(params) = raw.rope_parameters.as_ref().filter(|v| !v.is_null()) {
            let from_params = RopeScaling::from_json(params, "rope_parameters").map_err(bad)?;
            // transformers takes `rope_scaling` when both are there; a file whose two say different
            // things is refused rather than read either way.
            if scaling_json.is_some() && from_params != rope_scaling {
                return Err(bad("`rope_scaling` and `rope_parameters` describe different RoPE scalings: keep one".into()));
            }
            rope_scaling = from_params;
            if let Some(t) = params.get("rope_theta").and_then(Value::as_f64) {
                rope_theta = Some(t);
            }
        }
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(bad(format!("`hidden_act` `{act}` is not supported (silu only)")));
            }
        }
        if raw.attention_bias || raw.mlp_bias {
            return Err(bad("`attention_bias`/`mlp_bias` are not supported".into()));
        }
        let req = |v: Option<usize>, key: &str| v.filter(|&n| n > 0).ok_or_else(|| bad(format!("`{key}` missing or zero")));
        let vocab_size = req(raw.vocab_size, "vocab_size")?;
        let hidden_size = req(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = req(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(bad(format!("`num_attention_heads` {num_attention_heads} is not a multiple of `num_key_value_heads` {num_key_value_heads}")));
        }
        let head_dim = raw.head_dim.unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(format!("`head_dim` {head_dim} must be even and non-zero")));
        }
        check_values(&raw, architecture, rope_theta.unwrap_or(10_000.0)).map_err(bad)?;
        let dtype_name = raw.dtype.or(raw.torch_dtype);
        let dtype = match dtype_name.as_deref() {
            None => None,
            Some(name) => Some(parse_dtype(name).ok_or_else(|| bad(format!("`dtype` `{name}` is not supported")))?),
        };
        Ok(Config {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: req(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: req(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            sliding_window: raw.sliding_window.filter(|_| architecture == Architecture::Mistral),
            rope_theta: rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rms_norm_eps: raw.rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings,
            dtype,
            bos_token_id: config_ids(&raw.bos_token_id, "bos_token_id", vocab_size, path)?.first().copied(),
            eos_token_ids: config_ids(&raw.eos_token_id, "eos_token_id", vocab_size, path)?,
        })
    }

    /// Parameters of an `n`-layer model of this shape, without overflow (the dimensions are the
    /// user's: a config can claim sizes no usize holds).
    pub fn params_wide(&self, n: usize) -> u128 {
        // Saturating: past u128 the answer is "more than any machine" all the same.
        let m = |xs: &[usize]| xs.iter().fold(1u128, |acc, &x| acc.saturating_mul(x as u128));
        let (h, d, i) = (self.hidden_size, self.head_dim, self.intermediate_size);
        let layer = m(&[2, h, self.num_attention_heads, d])
            .saturating_add(m(&[2, h, self.num_key_value_heads, d]))
            .saturating_add(m(&[3, h, i]))
            .saturating_add(m(&[2, h]));
        let embed = m(&[self.vocab_size, h]).saturating_mul(if self.tie_word_embeddings { 1 } else { 2 });
        embed.saturating_add(h as u128).saturating_add(m(&[n]).saturating_mul(layer))
    }

    /// Parameters of one decoder layer.
    pub fn layer_params(&self) -> usize {
        let (h, d, i) = (self.hidden_size, self.head_dim, self.intermediate_size);
        let q = h * self.num_attention_heads * d;
        let kv = 2 * h * self.num_key_value_heads * d;
        let o = self.num_attention_heads * d * h;
        q + kv + o + 3 * h * i + 2 * h
    }

    /// Parameters of an `n`-layer model of this shape.
    pub fn params_with_layers(&self, n: usize) -> usize {
        let embed = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.hidden_size + n * self.layer_params()
    }
}

/// What `generation_config.json` says about stopping and sampling.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub do_sample: Option<bool>,
}

/// A user's text file, refusing one too large to be a config before reading it whole.
pub fn read_text(path: &Path) -> Result<String> {
    const MAX: u64 = 64 << 20;
    let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    if len > MAX {
        return Err(Error::bad_file(path, format!("{len} bytes: too large for a JSON config (at most 64 MiB)")));
    }
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

impl GenerationConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_text(path)?;
        Self::from_json(&text, path)
    }

    /// Its token ids within the model's vocabulary (`path`: this file, named in the error).
    pub fn check_vocab(&self, vocab_size: usize, path: &Path) -> Result<()> {
        in_vocab(&self.eos_token_ids, "eos_token_id", vocab_size, path)?;
        in_vocab(self.bos_token_id.as_slice(), "bos_token_id", vocab_size, path)
    }

    /// Parses generation_config.json text, each sampling key checked as its flag is (`--temperature`
    /// and the rest refuse the same values); `path` only names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        use crate::sampling::check;
        let v: Value = serde_json::from_str(text).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| Error::bad_file(path, "expected a JSON object"))?;
        let number = |x: &Value| x.as_f64().ok_or("must be a number");
        let whole = |x: &Value| x.as_u64().and_then(|k| usize::try_from(k).ok()).ok_or("must be a whole number ≥ 0 (0 disables)");
        Ok(GenerationConfig {
            eos_token_ids: generation_key(obj, path, "eos_token_id", token_ids_strict)?.unwrap_or_default(),
            bos_token_id: generation_key(obj, path, "bos_token_id", token_ids_strict)?.and_then(|ids| ids.first().copied()),
            temperature: generation_key(obj, path, "temperature", |x| number(x).and_then(check::temperature))?,
            top_p: generation_key(obj, path, "top_p", |x| number(x).and_then(check::top_p))?,
            top_k: generation_key(obj, path, "top_k", whole)?,
            repetition_penalty: generation_key(obj, path, "repetition_penalty", |x| number(x).and_then(check::repeat_penalty))?,
            do_sample: generation_key(obj, path, "do_sample", |x| x.as_bool().ok_or("must be true or false"))?,
        })
    }
}

/// generation_config.json's `key` read by `read` (its flag's check); absent or null is None, as
/// transformers takes it. The error names the file, the key and the value.
fn generation_key<T>(
    obj: &serde_json::Map<String, Value>,
    path: &Path,
    key: &str,
    read: impl Fn(&Value) -> std::result::Result<T, &'static str>,
) -> Result<Option<T>> {
    match obj.get(key).filter(|x| !x.is_null()) {
        None => Ok(None),
        Some(x) => read(x).map(Some).map_err(|rule| Error::bad_file(path, format!("`{key}` {x}: {rule}"))),
    }
}

/// A token id field that must be a token id (a whole number below 2³²) or a list of them.
fn token_ids_strict(v: &Value) -> std::result::Result<Vec<u32>, &'static str> {
    const RULE: &str = "must be a token id (a whole number ≥ 0) or a list of them";
    let id = |x: &Value| x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or(RULE);
    match v {
        Value::Array(a) => a.iter().map(id).collect(),
        x => id(x).map(|n| vec![n]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: &str = r#"{"architectures":["MistralForCausalLM"],"vocab_size":100,"hidden_size":32,
        "intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"},"dtype":"bfloat16","sliding_window":8,
        "eos_token_id":[2,99]}"#;
    const OLD: &str = r#"{"architectures":["MistralForCausalLM"],"vocab_size":100,"hidden_size":32,
        "intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "rope_theta":1000000.0,"torch_dtype":"bfloat16","sliding_window":8,"eos_token_id":2}"#;

    #[test]
    fn both_spellings_of_renamed_keys() {
        let p = Path::new("config.json");
        let new = Config::from_json(NEW, p).unwrap();
        let old = Config::from_json(OLD, p).unwrap();
        assert_eq!(new.rope_theta, 1e6);
        assert_eq!(old.rope_theta, 1e6);
        assert_eq!(new.dtype, Some(DType::BF16));
        assert_eq!(old.dtype, Some(DType::BF16));
        assert_eq!(new.head_dim, 8);
        assert_eq!(new.eos_token_ids, vec![2, 99]);
        assert_eq!(old.eos_token_ids, vec![2]);
    }

    const LLAMA3: &str = r#""factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192"#;

    /// Llama 3's scaling reads from transformers 5's `rope_parameters` and the older `rope_scaling`
    /// (`rope_type`, or `type` before that) alike; other kinds and values that break the arithmetic
    /// are refused naming the key.
    #[test]
    fn reads_llama3_rope_scaling_and_refuses_the_rest() {
        let p = Path::new("config.json");
        let want = Some(RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192.0 });
        let new = NEW.replace(r#""rope_type":"default""#, &format!(r#""rope_type":"llama3",{LLAMA3}"#));
        let c = Config::from_json(&new, p).unwrap();
        assert_eq!((&c.rope_scaling, c.rope_theta), (&want, 1e6));
        for key in ["rope_type", "type"] {
            let old = OLD.replace(r#""rope_theta""#, &format!(r#""rope_scaling":{{"{key}":"llama3",{LLAMA3}}},"rope_theta""#));
            assert_eq!(Config::from_json(&old, p).unwrap().rope_scaling, want, "{key}");
        }
        let err = |text: String| Config::from_json(&text, p).unwrap_err().to_string();
        let e = err(NEW.replace(r#""rope_type":"default""#, r#""rope_type":"yarn","factor":4.0"#));
        assert!(e.contains("`rope_parameters.rope_type` `yarn`") && e.contains("config.json"), "{e}");
        let e = err(new.replace(r#""low_freq_factor":1.0"#, r#""low_freq_factor":null"#));
        assert!(e.contains("`rope_parameters.low_freq_factor` is missing"), "{e}");
        let e = err(new.replace(r#""high_freq_factor":4.0"#, r#""high_freq_factor":1.0"#));
        assert!(e.contains("`rope_parameters.high_freq_factor` 1"), "{e}");
        let e = err(new.replace(r#""factor":8.0"#, r#""factor":0.0"#));
        assert!(e.contains("`rope_parameters.factor` 0"), "{e}");
        let e = err(new.replace(r#""rope_type":"llama3""#, r#""rope_type":null,"type":"linear""#));
        assert!(e.contains("`rope_parameters.type` `linear`"), "a null rope_type falls to the older key: {e}");
        let e = err(new.replace(r#""rope_type":"llama3""#, r#""rope_type":3"#));
        assert!(e.contains("`rope_parameters.rope_type` 3 is not a string"), "{e}");
        let e = err(NEW.replace(r#"{"rope_theta":1000000.0,"rope_type":"default"}"#, &format!(r#"{{"full_attention":{{"rope_type":"llama3",{LLAMA3}}}}}"#)));
        assert!(e.contains("per layer type (full_attention)"), "{e}");
        // Both keys: refused where they differ, read where they agree.
        let both = new.replace(r#""rope_parameters""#, &format!(r#""rope_scaling":{{"rope_type":"llama3",{LLAMA3}}},"rope_parameters""#));
        assert_eq!(Config::from_json(&both, p).unwrap().rope_scaling, want);
        let e = err(both.replacen(r#""factor":8.0,"low"#, r#""factor":4.0,"low"#, 1));
        assert!(e.contains("`rope_scaling` and `rope_parameters` describe different"), "{e}");
    }

    /// Frequencies by wavelength: short ones kept, long ones divided by the factor, the band between
    /// blended (transformers' formula); a GGUF's divisors divide each frequency.
    #[test]
    fn llama3_scaling_moves_each_frequency_by_its_wavelength() {
        let s = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 128.0 };
        // Wavelengths 2π/f: 6.3 (< 32: kept), 62.8 (between 32 and 128: blended), 628 (> 128: ÷ 8).
        let mut f = [1.0f32, 0.1, 0.01];
        s.apply(&mut f);
        let smooth = (128.0 / (2.0 * std::f32::consts::PI / 0.1) - 1.0) / 3.0;
        assert_eq!(f, [1.0, (1.0 - smooth) * 0.1 / 8.0 + smooth * 0.1, 0.01 / 8.0]);
        assert!(f[1] < 0.1 && f[1] > 0.1 / 8.0);
        let mut g = [1.0f32, 0.5];
        RopeScaling::Divisors(vec![2.0, 0.25]).apply(&mut g);
        assert_eq!(g, [0.5, 2.0]);
        let e = RopeScaling::Divisors(vec![1.0, f32::NAN]).check("rope_freqs.weight").unwrap_err();
        assert!(e.contains("value 1 is NaN"), "{e}");
    }

    #[test]
    fn refuses_other_architectures() {
        let p = Path::new("config.json");
        let qwen = NEW.replace("MistralForCausalLM", "Qwen2ForCausalLM");
        let err = Config::from_json(&qwen, p).unwrap_err().to_string();
        assert!(err.contains("Qwen2ForCausalLM") && err.contains("config.json"), "{err}");
    }
}
