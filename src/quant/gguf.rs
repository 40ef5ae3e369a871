//! Reading GGUF files (llama.cpp's format) as a Hugging Face checkpoint: the config from the GGUF's
//! metadata, its tensors under Hugging Face names, attn_q/attn_k rows back in Hugging Face's order.
//!
//! candle's `gguf_file` parses the header; the tensors' bytes are read here, raw, because the rows of
//! Q and K must be moved before anything else sees them, whatever their type: llama.cpp's converter
//! (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders them for adjacent-pair RoPE.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::gguf_write::DEFAULT_ALIGNMENT;
use super::QuantType;
use crate::config::{Config, RopeScaling};
use crate::error::{Error, Result};

/// A GGUF tensor's stored type: a float dtype, or a block type expanse runs quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredType {
    Dense(DType),
    Quantized(QuantType),
}

impl StoredType {
    pub fn of(t: GgmlDType) -> Option<StoredType> {
        Some(match t {
            GgmlDType::F32 => StoredType::Dense(DType::F32),
            GgmlDType::F16 => StoredType::Dense(DType::F16),
            GgmlDType::BF16 => StoredType::Dense(DType::BF16),
            _ => StoredType::Quantized(QuantType::ALL.into_iter().find(|q| q.ggml() == t)?),
        })
    }

    /// (values, bytes) of one block; a float is a block of one value.
    fn block(self) -> (usize, usize) {
        match self {
            StoredType::Dense(d) => (1, d.size_in_bytes()),
            StoredType::Quantized(q) => (q.block_values(), q.block_bytes()),
        }
    }
}

/// A weight as the GGUF holds it, rows in Hugging Face's order (borrowed from the file's map unless
/// its rows had to move).
pub struct RawTensor<'a> {
    pub ty: StoredType,
    /// Hugging Face's shape: `[rows, cols]` for a matrix, `[n]` for a norm.
    pub shape: Vec<usize>,
    pub bytes: Cow<'a, [u8]>,
}

impl RawTensor<'_> {
    /// A dense tensor on `device`; None for a quantized one.
    pub fn dense(&self, device: &Device) -> Result<Option<Tensor>> {
        let StoredType::Dense(dtype) = self.ty else { return Ok(None) };
        Ok(Some(Tensor::from_raw_buffer(&self.bytes, dtype, &self.shape, device)?))
    }

    /// Whether every value is ±0. All-zero bytes are zero in every block type (scales 0); otherwise the
    /// values decide (a zero row quantized to Q4_0 stores d = 0 with nibbles 8), the first row first so
    /// a trained weight costs one row's dequantization.
    pub fn is_zero(&self) -> Result<bool> {
        if self.bytes.iter().all(|&b| b == 0) {
            return Ok(true);
        }
        let zero = |t: &RawTensor| -> Result<bool> { Ok(t.to_f32()?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0) };
        if let [rows, cols] = self.shape[..] {
            let row = self.bytes.len() / rows;
            let first = RawTensor { ty: self.ty, shape: vec![1, cols], bytes: Cow::Borrowed(&self.bytes[..row]) };
            if !zero(&first)? {
                return Ok(false);
            }
        }
        zero(self)
    }

    /// The values in f32 on the CPU, whatever the type (for checks, not for running).
    pub fn to_f32(&self) -> Result<Tensor> {
        let t = match self.ty {
            StoredType::Dense(_) => self.dense(&Device::Cpu)?.ok_or_else(|| Error::Internal("a dense tensor without values".into()))?,
            StoredType::Quantized(q) => {
                let (rows, cols) = match self.shape[..] {
                    [r, c] => (r, c),
                    [c] => (1, c),
                    _ => return Err(Error::Internal(format!("a quantized tensor of shape {:?}", self.shape))),
                };
                super::QMatrix::from_bytes("gguf", &self.bytes, rows, cols, q, &Device::Cpu)?.dequantize()?.reshape(self.shape.as_slice())?
            }
        };
        Ok(t.to_dtype(DType::F32)?)
    }
}

/// A GGUF's tokenizer as its metadata states it (llama.cpp's keys). `types` are llama.cpp's token
/// types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `llama` for a sentencepiece vocabulary, `gpt2` for byte-level BPE.
    pub model: String,
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    pub chat_template: Option<String>,
    /// `tokenizer.ggml.pre`: how a byte-level BPE vocabulary splits text before merging (`llama-bpe`, `smollm`, …).
    pub pre: Option<String>,
    /// `tokenizer.ggml.merges` as stored (`"left right"`, best first); empty where the file has none.
    pub merges: Vec<String>,
}

/// Whether llama.cpp adds BOS to a prompt when `tokenizer.ggml.add_bos_token` is absent
/// (llama-vocab.cpp): always for a sentencepiece vocabulary, for byte-level BPE only with Llama 3's
/// pre-tokenizer names (their tokenizer.json's post-processor adds `<|begin_of_text|>`).
fn add_bos_by_default(model: &str, pre: Option<&str>) -> bool {
    model == "llama" || (model == "gpt2" && matches!(pre, Some("llama3" | "llama-v3" | "llama-bpe")))
}

/// A tensor as a GGUF stores it: its GGUF name, type, dimensions outermost first and bytes in the
/// file's order (attn_q/attn_k rows as llama.cpp's converter permuted them).
pub struct StoredTensor<'a> {
    pub name: &'a str,
    pub ty: GgmlDType,
    pub dims: Vec<usize>,
    pub bytes: &'a [u8],
    range: std::ops::Range<usize>,
}

/// An open GGUF file, mapped.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    content: Content,
    /// `general.alignment` (checked a power of two), else GGUF's default.
    alignment: usize,
}

/// Per-layer tensor names: (GGUF suffix after `blk.N.`, Hugging Face suffix after `model.layers.N.`),
/// as gguf-py's `TensorNameMap` maps the Llama architecture.
const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// Llama 3's RoPE frequency divisors: read into the config, not a weight (no Hugging Face name).
pub const ROPE_FREQS: &str = "rope_freqs.weight";

const GLOBAL_NAMES: [(&str, &str); 3] =
    [("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"), ("output.weight", "lm_head.weight")];

/// The GGUF name of Hugging Face tensor `hf`, if it has one.
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let (layer, suffix) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    LAYER_NAMES.iter().find(|(_, h)| *h == suffix).map(|(g, _)| format!("blk.{layer}.{g}"))
}

/// The Hugging Face name of GGUF tensor `g`, if it has one.
pub fn hf_name(g: &str) -> Option<String> {
    if let Some((_, h)) = GLOBAL_NAMES.iter().find(|(n, _)| *n == g) {
        return Some(h.to_string());
    }
    let (layer, suffix) = g.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer.to_string() != g["blk.".len()..].split('.').next()? {
        return None; // `blk.00.`, `blk.+1.`: llama.cpp would not read the tensor as layer 0 or 1
    }
    LAYER_NAMES.iter().find(|(n, _)| *n == suffix).map(|(_, h)| format!("model.layers.{layer}.{h}"))
}

/// For each Hugging Face row of a Q or K weight with `heads` heads, the GGUF row holding it. The
/// converter's permute reshapes each head's rows to (2, rows/2), swaps the axes, and flattens: GGUF
/// row `2i + j` of a head holds Hugging Face row `j · rows/2 + i`.
pub fn unpermuted_rows(rows: usize, heads: usize) -> std::result::Result<Vec<usize>, String> {
    if heads == 0 || rows == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(format!("{rows} rows do not split into {heads} heads of row pairs"));
    }
    let per_head = rows / heads;
    let half = per_head / 2;
    Ok((0..rows)
        .map(|r| {
            let (h, within) = (r / per_head, r % per_head);
            let (j, i) = (within / half, within % half);
            h * per_head + 2 * i + j
        })
        .collect())
}

/// `bytes` of a `rows`-row tensor, rows gathered in `order` (row `k` of the result is row `order[k]`).
fn gather_rows(bytes: &[u8], rows: usize, order: &[usize]) -> Vec<u8> {
    let row = bytes.len() / rows;
    order.iter().flat_map(|&r| &bytes[r * row..(r + 1) * row]).copied().collect()
}

/// A reader over a GGUF's header bytes; every step checked (None past the end or on overflow).
struct ByteCursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> ByteCursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n)
    }

    /// Steps over one value of GGUF type `ty` (`enum gguf_type`); arrays nest at most twice.
    fn skip_value(&mut self, ty: u32, depth: u32) -> Option<()> {
        match ty {
            8 => self.string().map(|_| ()),
            9 if depth < 2 => {
                let (elem, n) = (self.u32()?, self.u64()?);
                match fixed_width(elem) {
                    Some(w) => self.take(usize::try_from(n).ok()?.checked_mul(w)?).map(|_| ()),
                    None => (0..n).try_for_each(|_| self.skip_value(elem, depth + 1)),
                }
            }
            _ => self.take(fixed_width(ty)?).map(|_| ()),
        }
    }
}

/// Walks a GGUF header as llama.cpp checks it, before candle parses it: no key and no tensor name
/// twice, `general.alignment` (if present) a UINT32 power of two. Gives the tensor names in the
/// header's order and the alignment.
fn header_order(bytes: &[u8]) -> std::result::Result<(Vec<String>, usize), String> {
    let short = || "its header is cut short".to_string();
    let mut c = ByteCursor { bytes, at: 4 };
    if !matches!(c.u32(), Some(2 | 3)) {
        // candle's reader names the version (or the magic) itself.
        return Ok((Vec::new(), DEFAULT_ALIGNMENT));
    }
    let (tensors, keys) = (c.u64().ok_or_else(short)?, c.u64().ok_or_else(short)?);
    // Every key takes at least 13 bytes, every tensor 24: counts the file cannot hold are refused
    // before anything is read (or stored) for them.
    let room = (bytes.len() - c.at) as u64;
    if keys.saturating_mul(13).saturating_add(tensors.saturating_mul(24)) > room {
        return Err(format!("its header claims {keys} metadata keys and {tensors} tensors, more than its {room} bytes hold"));
    }
    let (mut seen, mut alignment) = (std::collections::HashSet::new(), DEFAULT_ALIGNMENT);
    for _ in 0..keys {
        let key = candle_string(c.string().ok_or_else(short)?);
        let ty = c.u32().ok_or_else(short)?;
        if key == "general.alignment" {
            // UINT32 (type 4) only: llama.cpp refuses any other type.
            let value = if ty == 4 { c.u32().ok_or_else(short)? } else { return Err(format!("metadata key `{key}` is stored as GGUF type {ty}, not UINT32")) };
            if !value.is_power_of_two() {
                return Err(format!("metadata key `{key}` is {value}, not a power of two"));
            }
            alignment = value as usize;
        } else {
            c.skip_value(ty, 0).ok_or_else(|| format!("metadata key `{key}` holds a value this reader cannot walk (type {ty}) or is cut short"))?;
        }
        if seen.contains(&key) {
            return Err(format!("metadata key `{key}` appears twice"));
        }
        seen.insert(key);
    }
    let mut order = Vec::new();
    for _ in 0..tensors {
        let name = candle_string(c.string().ok_or_else(short)?);
        let dims = c.u32().ok_or_else(short)?;
        // Dims, type, offset; candle checks their values.
        c.take(usize::try_from(dims).ok().and_then(|d| d.checked_mul(8)).and_then(|d| d.checked_add(12)).ok_or_else(short)?).ok_or_else(short)?;
        order.push(name);
    }
    let mut names = std::collections::HashSet::new();
    if let Some(twice) = order.iter().find(|n| !names.insert(n.as_str())) {
        return Err(format!("tensor `{twice}` appears twice"));
    }
    Ok((order, alignment))
}

/// A header string as candle's reader keeps it (trailing NULs dropped, invalid UTF-8 replaced), so
/// the checks above see the names candle's maps will hold.
fn candle_string(bytes: &[u8]) -> String {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Bytes of one value of a fixed-width GGUF type (None for strings, arrays and unknown types).
fn fixed_width(ty: u32) -> Option<usize> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// A stored type as `inspect` names it: a float type by its Hugging Face dtype name (`float32`), a
/// block type by llama.cpp's (`q4_k`), anything else by ggml's.
pub fn type_name(t: GgmlDType) -> String {
    match StoredType::of(t) {
        Some(StoredType::Dense(d)) => crate::config::dtype_hf_name(d).to_string(),
        Some(StoredType::Quantized(q)) => q.name().to_string(),
        None => format!("{t:?}").to_lowercase(),
    }
}

/// Values in a tensor of `dims`, None where the product overflows (the dims come from the file).
pub(super) fn element_count(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Bytes of `n` values stored in blocks of `values` values and `block_bytes` bytes (None on overflow).
pub(super) fn stored_bytes(n: usize, values: usize, block_bytes: usize) -> Option<usize> {
    (n / values).checked_mul(block_bytes)
}

/// Whether `path` names a GGUF file by its extension (what `--model` is taken to be).
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// An f32 from the metadata as the decimal it was written from (1e-5 stored as f32 reads back as
/// 9.99999974e-6: its shortest decimal is 1e-5 again).
fn decimal(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}

fn meta<'a>(content: &'a Content, key: &str) -> Option<&'a Value> {
    content.metadata.get(key)
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::bad_file(path, "is not a regular file, expected a GGUF file"));
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file rewritten underneath a running process is outside what
        // any inference engine can defend against (as for safetensors, loader.rs).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        // candle's reader divides by the alignment unchecked, reads any integer type as it, and keeps
        // the last of duplicated keys and tensors: what llama.cpp refuses is refused first.
        let (order, alignment) = header_order(&map).map_err(|e| Error::bad_file(path, e))?;
        let content = Content::read(&mut std::io::Cursor::new(&map[..]))
            .map_err(|e| Error::bad_file(path, format!("not a readable GGUF file ({})", crate::error::candle_message(&e))))?;
        let file = GgufFile { path: path.to_path_buf(), map, content, alignment };
        file.check_layout(&order)?;
        Ok(file)
    }

    /// The tensors' bytes as llama.cpp requires them (`gguf_init_from_file_impl`): in the header's
    /// order, each at the next aligned offset after the one before (no gaps, no overlaps), all in the
    /// file.
    fn check_layout(&self, order: &[String]) -> Result<()> {
        let alignment = self.alignment as u64;
        let mut expected = 0u64;
        for name in order {
            let bad = |msg: String| Error::bad_file(&self.path, format!("tensor `{name}`: {msg}"));
            let Some(info) = self.content.tensor_infos.get(name) else { return Err(bad("missing from the parsed header".into())) };
            if info.offset != expected {
                return Err(bad(format!(
                    "stored at offset {}, expected {expected} (tensors follow each other at aligned offsets, as llama.cpp requires)",
                    info.offset
                )));
            }
            let range = self.checked_range(name, info, info.ggml_dtype.block_size(), info.ggml_dtype.type_size())?;
            expected = (info.offset + range.len() as u64).div_ceil(alignment) * alignment;
        }
        Ok(())
    }

    /// The data section's alignment (`general.alignment`, else GGUF's default).
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn arch(&self) -> Result<String> {
        let arch = meta(&self.content, "general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| Error::bad_file(&self.path, "metadata key `general.architecture` is missing"))?;
        // llama.cpp's converter writes Mistral (7B) and Llama checkpoints alike as `llama`.
        match arch.as_str() {
            "llama" => Ok(arch.clone()),
            other => Err(Error::bad_file(&self.path, format!("`general.architecture` is `{other}`: expanse reads llama GGUFs (Llama and Mistral 7B)"))),
        }
    }

    fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        match meta(&self.content, key) {
            None => Ok(None),
            Some(v) => v.to_u32().map(Some).map_err(|_| Error::bad_file(&self.path, format!("metadata key `{key}` is not an unsigned integer"))),
        }
    }

    fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        match meta(&self.content, key) {
            None => Ok(None),
            // JSON has no NaN or infinity: the config below would read one as "absent" (a default).
            Some(v) => match v.to_f32() {
                Ok(f) if f.is_finite() => Ok(Some(f)),
                Ok(f) => Err(Error::bad_file(&self.path, format!("metadata key `{key}` is {f}, not a finite number"))),
                Err(_) => Err(Error::bad_file(&self.path, format!("metadata key `{key}` is not a float"))),
            },
        }
    }

    fn require_u32(&self, key: &str) -> Result<u32> {
        self.get_u32(key)?.ok_or_else(|| Error::bad_file(&self.path, format!("metadata key `{key}` is missing")))
    }

    /// (query heads, key/value heads): the second defaults to the first, as in a config.json.
    fn heads(&self) -> Result<(u32, u32)> {
        let a = self.arch()?;
        let q = self.require_u32(&format!("{a}.attention.head_count"))?;
        Ok((q, self.get_u32(&format!("{a}.attention.head_count_kv"))?.unwrap_or(q)))
    }

    /// The model's config, written as the config.json it stands for and read by the same parser (so
    /// every check on a config.json holds for a GGUF too; errors name the GGUF).
    pub fn config(&self) -> Result<Config> {
        let a = self.arch()?;
        let key = |k: &str| format!("{a}.{k}");
        self.refuse_unsupported(&a)?;
        let embd = self.shape_of("token_embd.weight")?;
        let (heads, kv_heads) = self.heads()?;
        let hidden = self.require_u32(&key("embedding_length"))?;
        let mut raw = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": embd.first().copied().unwrap_or(0),
            "hidden_size": hidden,
            "intermediate_size": self.require_u32(&key("feed_forward_length"))?,
            "num_hidden_layers": self.require_u32(&key("block_count"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": self.require_u32(&key("context_length"))?,
            "rms_norm_eps": self.get_f32(&key("attention.layer_norm_rms_epsilon"))?.map(decimal).unwrap_or(1e-5),
            "rope_theta": self.get_f32(&key("rope.freq_base"))?.map(decimal).unwrap_or(10000.0),
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
            "bos_token_id": self.get_u32("tokenizer.ggml.bos_token_id")?,
            "eos_token_id": self.get_u32("tokenizer.ggml.eos_token_id")?,
        });
        let embd_type = self.content.tensor_infos.get("token_embd.weight").and_then(|i| StoredType::of(i.ggml_dtype));
        if let Some(StoredType::Dense(d)) = embd_type {
            raw["dtype"] = crate::config::dtype_hf_name(d).into();
        }
        if let Some(d) = self.get_u32(&key("attention.key_length"))? {
            raw["head_dim"] = d.into();
        }
        if let Some(w) = self.get_u32(&key("attention.sliding_window"))? {
            raw["sliding_window"] = w.into();
        }
        let mut cfg = Config::from_json(&raw.to_string(), &self.path)?;
        cfg.rope_scaling = self.rope_divisors(cfg.head_dim)?;
        Ok(cfg)
    }

    /// What a GGUF can hold that this reader does not turn into a config: refused naming the key.
    fn refuse_unsupported(&self, a: &str) -> Result<()> {
        if self.get_u32("split.count")?.is_some_and(|n| n > 1) {
            return Err(Error::bad_file(&self.path, "one part of a split GGUF (`split.count` > 1): merge the parts with llama-gguf-split --merge first"));
        }
        if meta(&self.content, &format!("{a}.expert_count")).is_some() {
            return Err(Error::bad_file(&self.path, format!("`{a}.expert_count` is set: a mixture-of-experts model, which expanse does not run")));
        }
        let scaling = meta(&self.content, &format!("{a}.rope.scaling.type")).and_then(|v| v.to_string().ok()).filter(|t| t.as_str() != "none");
        if let Some(t) = scaling {
            return Err(Error::bad_file(
                &self.path,
                format!("`{a}.rope.scaling.type` is `{t}`: the only RoPE scaling expanse runs is Llama 3's (a `rope_freqs.weight` tensor)"),
            ));
        }
        for key in ["rope.scaling.factor", "rope.scale_linear"] {
            if let Some(v) = self.get_f32(&format!("{a}.{key}"))?.filter(|&f| f != 1.0) {
                return Err(Error::bad_file(&self.path, format!("`{a}.{key}` is {v}: RoPE scaling is not supported")));
            }
        }
        if let Some(d) = self.get_u32(&format!("{a}.rope.dimension_count"))? {
            let (heads, _) = self.heads()?;
            let head_dim = self.get_u32(&format!("{a}.attention.key_length"))?.unwrap_or(self.require_u32(&format!("{a}.embedding_length"))? / heads.max(1));
            if d != head_dim {
                return Err(Error::bad_file(
                    &self.path,
                    format!("`{a}.rope.dimension_count` is {d}, not the head size {head_dim}: partial RoPE is not supported"),
                ));
            }
        }
        Ok(())
    }

    /// `rope_freqs.weight` (Llama 3.1/3.2): one f32 divisor per RoPE frequency, which llama.cpp's
    /// converter computes from the config's llama3 scaling; None where the file has none.
    fn rope_divisors(&self, head_dim: usize) -> Result<Option<RopeScaling>> {
        let Some(info) = self.content.tensor_infos.get(ROPE_FREQS) else { return Ok(None) };
        let bad = |msg: String| Error::bad_file(&self.path, format!("tensor `{ROPE_FREQS}`: {msg}"));
        let dims = info.shape.dims();
        if info.ggml_dtype != GgmlDType::F32 || dims != [head_dim / 2] {
            return Err(bad(format!("{:?} of shape {dims:?}, expected F32 of [{}] (one divisor per frequency)", info.ggml_dtype, head_dim / 2)));
        }
        let range = self.checked_range(ROPE_FREQS, info, 1, 4)?;
        let values = self.map[range].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let s = RopeScaling::Divisors(values);
        s.check(ROPE_FREQS).map_err(|e| Error::bad_file(&self.path, e))?;
        Ok(Some(s))
    }

    /// Hugging Face's shape of GGUF tensor `name` (candle lists GGUF dimensions outermost first).
    fn shape_of(&self, name: &str) -> Result<Vec<usize>> {
        let info = self.content.tensor_infos.get(name).ok_or_else(|| Error::MissingTensor { path: self.path.clone(), name: name.into() })?;
        Ok(info.shape.dims().to_vec())
    }

    /// Whether the file holds Hugging Face tensor `hf`.
    pub fn has(&self, hf: &str) -> bool {
        gguf_name(hf).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }

    /// How Hugging Face tensor `hf` is stored, from the header alone (None: absent, or a type expanse
    /// does not read).
    fn stored_type(&self, hf: &str) -> Option<StoredType> {
        let info = self.content.tensor_infos.get(&gguf_name(hf)?)?;
        StoredType::of(info.ggml_dtype)
    }

    /// Hugging Face tensor `hf` as stored, Q and K rows un-permuted.
    pub fn tensor(&self, hf: &str) -> Result<RawTensor<'_>> {
        let name = gguf_name(hf).ok_or_else(|| Error::MissingTensor { path: self.path.clone(), name: hf.into() })?;
        let info = self.content.tensor_infos.get(&name).ok_or_else(|| Error::MissingTensor { path: self.path.clone(), name: format!("{name} ({hf})") })?;
        let ty = StoredType::of(info.ggml_dtype)
            .ok_or_else(|| Error::bad_file(&self.path, format!("tensor `{name}` is {:?}, a type expanse does not read", info.ggml_dtype)))?;
        let shape = info.shape.dims().to_vec();
        let bad = |msg: String| Error::bad_file(&self.path, format!("tensor `{name}`: {msg}"));
        let (values, block_bytes) = ty.block();
        if shape.contains(&0) {
            return Err(bad(format!("shape {shape:?} has no values")));
        }
        let mut bytes = Cow::Borrowed(&self.map[self.checked_range(&name, info, values, block_bytes)?]);
        let heads = match hf.rsplit('.').nth(1) {
            Some("q_proj") => Some(self.heads()?.0),
            Some("k_proj") => Some(self.heads()?.1),
            _ => None,
        };
        if let Some(heads) = heads {
            let [rows, _] = shape[..] else { return Err(bad(format!("a Q/K projection of shape {shape:?}, expected [rows, cols]"))) };
            let order = unpermuted_rows(rows, heads as usize).map_err(bad)?;
            bytes = Cow::Owned(gather_rows(&bytes, rows, &order));
        }
        Ok(RawTensor { ty, shape, bytes })
    }

    /// Every tensor must be one the model reads, in a layer `llama.block_count` counts: anything else
    /// would be left out without a word, and the model run would not be the file's.
    pub fn check_tensors(&self, layers: usize) -> Result<()> {
        if self.content.tensor_infos.is_empty() {
            return Err(Error::bad_file(&self.path, "holds no tensors (a vocab-only GGUF?): nothing to run"));
        }
        let last = format!("blk.{}.attn_norm.weight", layers.saturating_sub(1));
        if !self.content.tensor_infos.contains_key(&last) {
            return Err(Error::bad_file(&self.path, format!("`{}.block_count` is {layers}, but there is no tensor `{last}`", self.arch()?)));
        }
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for g in names {
            let layer = g.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<usize>().ok());
            if (hf_name(g).is_none() && g != ROPE_FREQS) || layer.is_some_and(|l| l >= layers) {
                let why = match layer {
                    Some(l) if l >= layers => format!("layer {l}, but `{}.block_count` is {layers}", self.arch()?),
                    _ => "no place in a Llama/Mistral model".into(),
                };
                return Err(Error::bad_file(&self.path, format!("tensor `{g}` has {why}; it would be left out and change the model's output")));
            }
        }
        Ok(())
    }

    /// The type of the first quantized projection, if any (the file is a quantized model).
    pub fn quantized_type(&self) -> Option<QuantType> {
        let mut names: Vec<&String> = self.content.tensor_infos.keys().filter(|n| n.starts_with("blk.")).collect();
        names.sort();
        names.into_iter().find_map(|n| match StoredType::of(self.content.tensor_infos[n].ggml_dtype) {
            Some(StoredType::Quantized(q)) => Some(q),
            _ => None,
        })
    }

    /// Bytes the model holds once `plan` is built from this file in `dtype`: each tensor the plan
    /// reads as stored (copies share it; a zero-scaled copy adds its zero blocks), a quantized
    /// embedding dequantized to `dtype` — and, without an `output.weight`, also as stored (the tied
    /// output multiplies its blocks).
    pub fn weight_bytes(&self, plan: &crate::expand::Plan, dtype: DType) -> Result<u64> {
        let mut seen = std::collections::HashSet::new();
        let mut total = 0u64;
        let tied = !self.content.tensor_infos.contains_key("output.weight");
        let mut add = |g: String, copy_scaled: bool| -> Result<()> {
            let Some(info) = self.content.tensor_infos.get(&g) else { return Ok(()) };
            let ty = StoredType::of(info.ggml_dtype)
                .ok_or_else(|| Error::bad_file(&self.path, format!("tensor `{g}` is {:?}, a type expanse does not read", info.ggml_dtype)))?;
            let n = element_count(info.shape.dims()).unwrap_or(usize::MAX);
            let stored = stored_bytes(n, ty.block().0, ty.block().1).unwrap_or(usize::MAX);
            let bytes = match (g.as_str(), ty) {
                ("token_embd.weight", StoredType::Quantized(_)) => n.saturating_mul(dtype.size_in_bytes()).saturating_add(if tied { stored } else { 0 }),
                _ => stored,
            };
            if copy_scaled || seen.insert(g) {
                total = total.saturating_add(bytes as u64);
            }
            Ok(())
        };
        for g in ["token_embd.weight", "output_norm.weight", "output.weight"] {
            add(g.to_string(), false)?;
        }
        for (out, layer) in plan.layers.iter().enumerate() {
            for (suffix, hf) in LAYER_NAMES {
                let scaled = plan.layer_scale(out, hf) != 1.0;
                add(format!("blk.{}.{suffix}", layer.source), scaled)?;
            }
        }
        Ok(total)
    }

    /// Where `info`'s bytes lie in the file, stored in blocks of `values` values and `block_bytes`
    /// bytes. Sizes and offsets come from the file: every sum and product is checked, so a hostile
    /// header gives None, never a wrapped number read as a smaller tensor.
    fn stored_range(&self, info: &TensorInfo, values: usize, block_bytes: usize) -> Option<std::ops::Range<usize>> {
        let len = element_count(info.shape.dims()).and_then(|n| stored_bytes(n, values, block_bytes))?;
        let at = usize::try_from(self.content.tensor_data_offset.checked_add(info.offset)?).ok()?;
        Some(at..at.checked_add(len)?)
    }

    /// [`GgufFile::stored_range`] of tensor `name`, as an error naming it where its rows are not whole
    /// blocks or its bytes do not lie in the file.
    fn checked_range(&self, name: &str, info: &TensorInfo, values: usize, block_bytes: usize) -> Result<std::ops::Range<usize>> {
        let bad = |msg: String| Error::bad_file(&self.path, format!("tensor `{name}`: {msg}"));
        let cols = info.shape.dims().last().copied().unwrap_or(1);
        if !cols.is_multiple_of(values) {
            return Err(bad(format!("rows of {cols} values are not whole {values}-value blocks")));
        }
        self.stored_range(info, values, block_bytes).filter(|r| r.end <= self.map.len()).ok_or_else(|| bad("runs past the end of the file".into()))
    }

    /// Hands the mapped pages of `hf`'s bytes back to the page cache once they have been copied out:
    /// file-backed pages count towards the process's memory while mapped, so a load would otherwise
    /// hold the whole file beside the model it built (as `Checkpoint::read_and_release` does for
    /// safetensors).
    fn release(&self, hf: &str) {
        let Some(info) = gguf_name(hf).and_then(|g| self.content.tensor_infos.get(&g)) else { return };
        let Some((values, block)) = StoredType::of(info.ggml_dtype).map(StoredType::block) else { return };
        if let Some(range) = self.stored_range(info, values, block) {
            self.drop_pages(range);
        }
    }

    /// Drops the mapped pages of `range` from the process (see [`GgufFile::release`]); the bytes
    /// read from them must have been copied out or written already.
    fn drop_pages(&self, range: std::ops::Range<usize>) {
        if range.end <= self.map.len() {
            let (at, len) = (range.start, range.len());
            // SAFETY: a read-only shared mapping of a file never written through; every tensor
            // read from it was copied before this call. MADV_DONTNEED drops page-table entries
            // only: a later read faults the same file contents back. A failure leaves the pages
            // resident, hence ignored.
            #[cfg(unix)]
            let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at, len) };
        }
    }

    /// The metadata as the file states it.
    pub fn metadata(&self) -> &std::collections::HashMap<String, Value> {
        &self.content.metadata
    }

    /// Every metadata record as the file stores it — (key, the record's bytes: key, type tag and
    /// value) — in the file's order. Copied as they are, records keep every byte; candle's parsed
    /// values would not (it decodes strings lossily as UTF-8 and strips their trailing NULs).
    pub fn raw_metadata(&self) -> Result<Vec<(String, &[u8])>> {
        let bad = |what: &str| Error::bad_file(&self.path, format!("its metadata {what}"));
        let mut c = ByteCursor { bytes: &self.map[..], at: 4 };
        match c.u32() {
            Some(2 | 3) => {}
            _ => return Err(bad("is not GGUF version 2 or 3 (an older file: convert it again)")),
        }
        let _tensors = c.u64();
        let n = c.u64().ok_or_else(|| bad("is cut short"))?;
        let mut out = Vec::new();
        for _ in 0..n {
            let start = c.at;
            let key = c.string().ok_or_else(|| bad("is cut short"))?;
            let key = String::from_utf8_lossy(key).into_owned();
            let ty = c.u32().ok_or_else(|| bad("is cut short"))?;
            c.skip_value(ty, 0).ok_or_else(|| bad(&format!("key `{key}` holds a value this reader cannot walk (type {ty})")))?;
            out.push((key, &self.map[start..c.at]));
        }
        Ok(out)
    }

    /// `general.architecture`, if it is one expanse reads.
    pub fn architecture(&self) -> Result<String> {
        self.arch()
    }

    /// Every tensor as the file stores it, in the file's order, each one's bytes checked to lie in
    /// the file. The bytes stay mapped: hand them back with [`GgufFile::release_stored`] once used.
    pub fn stored_tensors(&self) -> Result<Vec<StoredTensor<'_>>> {
        let mut infos: Vec<(&String, &TensorInfo)> = self.content.tensor_infos.iter().collect();
        infos.sort_by_key(|(name, info)| (info.offset, name.as_str()));
        infos
            .into_iter()
            .map(|(name, info)| {
                let range = self.checked_range(name, info, info.ggml_dtype.block_size(), info.ggml_dtype.type_size())?;
                Ok(StoredTensor { name, ty: info.ggml_dtype, dims: info.shape.dims().to_vec(), bytes: &self.map[range.clone()], range })
            })
            .collect()
    }

    /// Hands back the mapped pages of a tensor [`GgufFile::stored_tensors`] gave, once its bytes
    /// have been copied or written (as [`GgufFile::release`] does for the model builder).
    pub fn release_stored(&self, t: &StoredTensor<'_>) {
        self.drop_pages(t.range.clone());
    }

    /// Hugging Face tensor `hf` as stored, its shape checked against the one the config implies.
    fn shaped(&self, hf: &str, shape: &[usize]) -> Result<RawTensor<'_>> {
        let raw = self.tensor(hf)?;
        if raw.shape != shape {
            let g = gguf_name(hf).unwrap_or_default();
            return Err(Error::bad_file(&self.path, format!("tensor `{g}` ({hf}) has shape {:?}, the metadata implies {shape:?}", raw.shape)));
        }
        Ok(raw)
    }

    /// The tokenizer the metadata describes (`tokenizer.ggml.*`, `tokenizer.chat_template`), checked:
    /// every per-token array as long as the token list, every special id inside it.
    pub fn vocab(&self) -> Result<GgufVocab> {
        let bad = |key: &str, what: &str| Error::bad_file(&self.path, format!("metadata key `{key}` {what}"));
        let array = |key: &str| -> Result<&Vec<Value>> {
            meta(&self.content, key).ok_or_else(|| bad(key, "is missing"))?.to_vec().map_err(|_| bad(key, "is not an array"))
        };
        let string = |key: &str| -> Result<Option<String>> {
            meta(&self.content, key).map(|v| v.to_string().cloned().map_err(|_| bad(key, "is not a string"))).transpose()
        };
        let flag = |key: &str| -> Result<Option<bool>> { meta(&self.content, key).map(|v| v.to_bool().map_err(|_| bad(key, "is not a bool"))).transpose() };
        let strings = |key: &str| -> Result<Vec<String>> {
            array(key)?.iter().map(|v| v.to_string().cloned().map_err(|_| bad(key, "holds a value that is not a string"))).collect()
        };
        let model = string("tokenizer.ggml.model")?.ok_or_else(|| bad("tokenizer.ggml.model", "is missing: the file carries no tokenizer"))?;
        let tokens = strings("tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let types = match meta(&self.content, "tokenizer.ggml.token_type") {
            None => vec![1; n],
            Some(_) => array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| v.to_i32().map_err(|_| bad("tokenizer.ggml.token_type", "holds a value that is not an int32")))
                .collect::<Result<Vec<_>>>()?,
        };
        if types.len() != n {
            return Err(bad("tokenizer.ggml.token_type", &format!("has {} entries for {n} tokens", types.len())));
        }
        let pre = string("tokenizer.ggml.pre")?;
        let add_bos = flag("tokenizer.ggml.add_bos_token")?.unwrap_or(add_bos_by_default(&model, pre.as_deref()));
        let add_space_prefix = flag("tokenizer.ggml.add_space_prefix")?.unwrap_or(model == "llama");
        // A sentencepiece vocabulary's merges follow from its pieces (tokenizer::gguf); only BPE reads these.
        let merges_key = "tokenizer.ggml.merges";
        let merges = if model == "gpt2" && meta(&self.content, merges_key).is_some() { strings(merges_key)? } else { Vec::new() };
        let id = |key: &str| -> Result<Option<u32>> {
            match self.get_u32(key)? {
                Some(i) if i as usize >= n => Err(bad(key, &format!("is {i}, beyond the {n} tokens"))),
                other => Ok(other),
            }
        };
        Ok(GgufVocab {
            model,
            types,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            // llama.cpp's defaults when the keys are absent.
            add_bos,
            add_eos: flag("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
            add_space_prefix,
            chat_template: string("tokenizer.chat_template")?,
            merges,
            pre,
            tokens,
        })
    }

    /// (values, bytes, tensors per type name) over every tensor in the file, read from the header alone.
    pub fn summary(&self) -> Result<(usize, usize, std::collections::BTreeMap<String, usize>)> {
        let (mut values, mut bytes, mut types) = (0usize, 0usize, std::collections::BTreeMap::new());
        for (name, info) in &self.content.tensor_infos {
            let n = element_count(info.shape.dims());
            let b = n.and_then(|n| stored_bytes(n, info.ggml_dtype.block_size(), info.ggml_dtype.type_size()));
            let (Some(n), Some(b)) = (n, b) else { return Err(Error::bad_file(&self.path, format!("tensor `{name}`: its size overflows"))) };
            values = values.saturating_add(n);
            bytes = bytes.saturating_add(b);
            *types.entry(type_name(info.ggml_dtype)).or_default() += 1;
        }
        Ok((values, bytes, types))
    }
}

/// A GGUF as the model builder reads it: float tensors as tensors, quantized projections as their
/// blocks (never dequantized), quantized embeddings dequantized (as llama.cpp's row lookup does).
impl crate::model::WeightSource for GgufFile {
    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let raw = self.shaped(name, shape)?;
        let t = match raw.dense(device)? {
            Some(t) => t,
            None => raw.to_f32()?.to_device(device)?,
        };
        self.release(name);
        Ok(t)
    }

    fn blocks(&mut self, name: &str, shape: &[usize]) -> Result<Option<(QuantType, Vec<u8>)>> {
        // A float tensor is `get`'s to read: the header says so without reading (and, for Q/K,
        // gathering) the values only to drop them.
        if let Some(StoredType::Dense(_)) = self.stored_type(name) {
            return Ok(None);
        }
        let raw = self.shaped(name, shape)?;
        let StoredType::Quantized(q) = raw.ty else { return Ok(None) };
        let bytes = raw.bytes.into_owned();
        self.release(name);
        Ok(Some((q, bytes)))
    }

    fn has(&self, name: &str) -> bool {
        GgufFile::has(self, name)
    }

    fn location(&self, _name: &str) -> Option<PathBuf> {
        Some(self.path.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The converter's permute, written as it is in convert_hf_to_gguf.py: reshape to
    /// (heads, 2, rows/heads/2), swap the last two axes, flatten.
    fn permute(rows: &[u32], heads: usize) -> Vec<u32> {
        let half = rows.len() / heads / 2;
        let mut out = Vec::new();
        for h in 0..heads {
            for i in 0..half {
                for j in 0..2 {
                    out.push(rows[h * 2 * half + j * half + i]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermuting_undoes_the_converters_permute() {
        for (rows, heads) in [(8, 1), (32, 4), (16, 2), (4096, 32), (1024, 8)] {
            let hf: Vec<u32> = (0..rows as u32).map(|r| r.wrapping_mul(2654435761)).collect();
            let gguf = permute(&hf, heads);
            assert_ne!(gguf, hf, "{rows}/{heads}: the permute moves rows");
            let bytes: Vec<u8> = gguf.iter().flat_map(|v| v.to_le_bytes()).collect();
            let back = gather_rows(&bytes, rows, &unpermuted_rows(rows, heads).unwrap());
            let back: Vec<u32> = back.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            assert_eq!(back, hf, "{rows} rows, {heads} heads");
        }
        assert!(unpermuted_rows(10, 4).is_err());
        assert!(unpermuted_rows(8, 0).is_err());
        assert!(unpermuted_rows(0, 4).is_err());
    }

    /// A llama GGUF written by candle's writer: `meta` beside a 1-layer config, `tensors` in F32.
    fn write(dir: &Path, meta: &[(&str, Value)], tensors: &[(&str, Vec<usize>)]) -> PathBuf {
        use candle_core::quantized::{gguf_file, QTensor};
        let mut all: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.attention.head_count", Value::U32(2)),
            ("llama.embedding_length", Value::U32(8)),
            ("llama.feed_forward_length", Value::U32(16)),
            ("llama.block_count", Value::U32(1)),
            ("llama.context_length", Value::U32(32)),
        ];
        all.extend(meta.iter().cloned());
        let qt: Vec<(&str, QTensor)> = [("token_embd.weight", vec![4usize, 8])]
            .iter()
            .chain(tensors)
            .map(|(n, shape)| (*n, QTensor::quantize(&Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap()))
            .collect();
        let path = dir.join("m.gguf");
        let mut f = std::fs::File::create(&path).unwrap();
        let meta_refs: Vec<(&str, &Value)> = all.iter().map(|(k, v)| (*k, v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = qt.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
        path
    }

    /// A tied GGUF's output is its token_embd blocks, multiplied as stored (llama.cpp's output there),
    /// while the embedding lookup reads them dequantized.
    #[test]
    fn a_tied_gguf_multiplies_its_token_embd_blocks_as_the_output() {
        use candle_core::quantized::{gguf_file, QTensor};
        let dir = tempfile::tempdir().unwrap();
        let (vocab, h, ffn) = (8usize, 32usize, 64usize);
        let meta: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.attention.head_count", Value::U32(2)),
            ("llama.embedding_length", Value::U32(h as u32)),
            ("llama.feed_forward_length", Value::U32(ffn as u32)),
            ("llama.block_count", Value::U32(1)),
            ("llama.context_length", Value::U32(32)),
        ];
        let random = |shape: &[usize], seed: u64| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n as u64).map(|i| ((i * 2654435761 + seed * 97) % 1000) as f32 / 500.0 - 1.0).collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        let mut tensors = vec![("token_embd.weight".to_string(), QTensor::quantize(&random(&[vocab, h], 1), GgmlDType::Q8_0).unwrap())];
        let shapes = [
            ("output_norm.weight", vec![h]),
            ("blk.0.attn_norm.weight", vec![h]),
            ("blk.0.ffn_norm.weight", vec![h]),
            ("blk.0.attn_q.weight", vec![h, h]),
            ("blk.0.attn_k.weight", vec![h, h]),
            ("blk.0.attn_v.weight", vec![h, h]),
            ("blk.0.attn_output.weight", vec![h, h]),
            ("blk.0.ffn_gate.weight", vec![ffn, h]),
            ("blk.0.ffn_up.weight", vec![ffn, h]),
            ("blk.0.ffn_down.weight", vec![h, ffn]),
        ];
        for (i, (name, shape)) in shapes.iter().enumerate() {
            tensors.push((name.to_string(), QTensor::quantize(&random(shape, i as u64 + 2), GgmlDType::F32).unwrap()));
        }
        let path = dir.path().join("tied.gguf");
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &meta_refs, &tensor_refs).unwrap();
        let loaded = crate::engine::load(&crate::engine::LoadOptions::new(path.to_str().unwrap()).expand("none").dtype("f32").device("cpu")).unwrap();
        let m = &loaded.model;
        assert!(m.config.tie_word_embeddings);
        let head = m.lm_head.quantized().expect("the output runs on the stored blocks");
        assert_eq!((head.types(), head.dims()), (vec![(QuantType::Q8_0, vocab)], (vocab, h)));
        // The lookup reads the same blocks dequantized.
        let want = tensors[0].1.dequantize(&Device::Cpu).unwrap();
        assert_eq!(m.embed_tokens.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        // The memory check before loading counts both.
        let estimate = GgufFile::open(&path).unwrap().weight_bytes(&loaded.plan, DType::F32).unwrap();
        assert_eq!(estimate, m.weight_bytes as u64, "the pre-load estimate of a tied quantized embedding");
    }

    #[test]
    fn a_minimal_llama_gguf_gives_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let c = GgufFile::open(&write(dir.path(), &[], &[])).unwrap().config().unwrap();
        assert_eq!((c.vocab_size, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim), (4, 8, 2, 2, 4));
        assert!(c.tie_word_embeddings, "no output.weight: tied");
    }

    #[test]
    fn what_the_reader_cannot_honour_is_refused_naming_it() {
        type Case<'a> = (&'a [(&'a str, Value)], &'a [(&'a str, Vec<usize>)], &'a str);
        let cases: [Case; 7] = [
            (&[("llama.rope.scaling.type", Value::String("linear".into()))], &[], "rope.scaling.type"),
            (&[("llama.rope.scaling.factor", Value::F32(4.0))], &[], "rope.scaling.factor"),
            (&[("llama.rope.scale_linear", Value::F32(2.0))], &[], "rope.scale_linear"),
            (&[("llama.rope.dimension_count", Value::U32(2))], &[], "rope.dimension_count"),
            (&[("llama.expert_count", Value::U32(8))], &[], "expert_count"),
            (&[("split.count", Value::U32(2))], &[], "split"),
            (&[], &[("rope_freqs.weight", vec![3])], "tensor `rope_freqs.weight`: F32 of shape [3], expected F32 of [2]"),
        ];
        for (meta, tensors, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let e = GgufFile::open(&write(dir.path(), meta, tensors)).unwrap().config().expect_err("refused").to_string();
            assert!(e.contains(want) && e.contains("m.gguf") && !e.contains('\n'), "{e}");
        }
    }

    /// Llama 3's `rope_freqs.weight` becomes the config's RoPE divisors, and is not a stray tensor.
    #[test]
    fn rope_freqs_are_read_into_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let g = GgufFile::open(&write(dir.path(), &[], &[("rope_freqs.weight", vec![2])])).unwrap();
        assert_eq!(g.config().unwrap().rope_scaling, Some(RopeScaling::Divisors(vec![1.0, 1.0])));
        let e = g.check_tensors(1).unwrap_err().to_string();
        assert!(e.contains("blk.0.attn_norm.weight") && !e.contains("rope_freqs"), "only the missing layer: {e}");
    }

    /// Tensors the model would not read, and a layer count the tensors do not reach, are refused
    /// before anything is allocated by them.
    #[test]
    fn the_tensors_must_be_the_ones_the_metadata_describes() {
        let dir = tempfile::tempdir().unwrap();
        let check = |tensors: &[(&str, Vec<usize>)], layers: usize| {
            GgufFile::open(&write(dir.path(), &[], tensors)).unwrap().check_tensors(layers).map_err(|e| e.to_string())
        };
        let e = check(&[], 1).unwrap_err();
        assert!(e.contains("`llama.block_count` is 1") && e.contains("blk.0.attn_norm.weight"), "{e}");
        let e = check(&[("blk.0.attn_norm.weight", vec![8]), ("blk.1.attn_norm.weight", vec![8])], 1).unwrap_err();
        assert!(e.contains("blk.1.attn_norm.weight") && e.contains("layer 1"), "{e}");
        let e = check(&[("blk.0.attn_norm.weight", vec![8]), ("blk.00.attn_norm.weight", vec![8])], 1).unwrap_err();
        assert!(e.contains("blk.00.attn_norm.weight") && e.contains("no place"), "{e}");
        assert!(check(&[("blk.0.attn_norm.weight", vec![8])], 1).is_ok());
        assert_eq!(hf_name("blk.3.ffn_down.weight").as_deref(), Some("model.layers.3.mlp.down_proj.weight"));
        assert_eq!(hf_name("blk.03.ffn_down.weight"), None);
    }

    /// A file cut short is refused when opened (as llama.cpp's reader does), naming the tensor whose
    /// bytes it lost and the file: `inspect`, which reads no layer's bytes, once reported it whole.
    #[test]
    fn a_truncated_file_is_an_error_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &[], &[("blk.0.attn_norm.weight", vec![8])]);
        assert!(GgufFile::open(&path).is_ok(), "whole, it opens");
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 16).unwrap();
        let e = GgufFile::open(&path).err().expect("refused").to_string();
        assert!(e.contains("blk.0.attn_norm.weight") && e.contains("runs past the end of the file") && e.contains("m.gguf"), "{e}");
    }

    #[test]
    fn a_malformed_q_projection_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        // 1-D, and rows that do not split into the heads' pairs.
        let g = GgufFile::open(&write(dir.path(), &[], &[("blk.0.attn_q.weight", vec![64]), ("blk.0.attn_k.weight", vec![6, 8])])).unwrap();
        for (name, want) in [("model.layers.0.self_attn.q_proj.weight", "expected [rows, cols]"), ("model.layers.0.self_attn.k_proj.weight", "heads")] {
            let e = g.tensor(name).err().expect("refused").to_string();
            assert!(e.contains(want) && e.contains("attn_"), "{name}: {e}");
        }
    }

    #[test]
    fn metadata_floats_read_back_as_their_decimals() {
        assert_eq!(decimal(1e-5), 1e-5);
        assert_eq!(decimal(1e-6), 1e-6);
        assert_eq!(decimal(10000.0), 10000.0);
        assert_eq!(decimal(1_000_000.0), 1e6);
    }

    #[test]
    fn names_map_both_ways() {
        assert_eq!(gguf_name("model.layers.12.self_attn.k_proj.weight").as_deref(), Some("blk.12.attn_k.weight"));
        assert_eq!(gguf_name("lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_name("model.layers.1.self_attn.rotary_emb.inv_freq"), None);
    }

    /// The tokenizer metadata is checked where a wrong value would go unnoticed until encoding: a
    /// per-token array of another length, a special id past the tokens, a model this build refuses.
    #[test]
    fn vocab_metadata_is_checked_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let strings = |v: &[&str]| Value::Array(v.iter().map(|t| Value::String(t.to_string())).collect());
        let tokens = ("tokenizer.ggml.tokens", strings(&["<unk>", "<s>", "a", "b"]));
        let model = |m: &str| ("tokenizer.ggml.model", Value::String(m.into()));
        let err = |meta: &[(&str, Value)]| GgufFile::open(&write(dir.path(), meta, &[])).unwrap().vocab().unwrap_err().to_string();
        let ok = GgufFile::open(&write(dir.path(), &[model("llama"), tokens.clone()], &[])).unwrap().vocab().unwrap();
        assert_eq!((ok.types, ok.add_bos, ok.add_space_prefix, ok.bos), (vec![1; 4], true, true, None), "llama.cpp's defaults");
        let e = err(&[model("llama"), tokens.clone(), ("tokenizer.ggml.token_type", Value::Array(vec![Value::I32(1)]))]);
        assert!(e.contains("tokenizer.ggml.token_type") && e.contains("1 entries for 4 tokens"), "{e}");
        let e = err(&[model("llama"), tokens.clone(), ("tokenizer.ggml.bos_token_id", Value::U32(9))]);
        assert!(e.contains("tokenizer.ggml.bos_token_id") && e.contains("beyond the 4 tokens"), "{e}");
        let e = err(std::slice::from_ref(&tokens));
        assert!(e.contains("tokenizer.ggml.model") && e.contains("no tokenizer"), "{e}");
        let e = err(&[model("llama"), ("tokenizer.ggml.tokens", Value::U32(3))]);
        assert!(e.contains("tokenizer.ggml.tokens") && e.contains("not an array"), "{e}");
        let gpt2 = GgufFile::open(&write(dir.path(), &[model("gpt2"), tokens], &[])).unwrap().vocab().unwrap();
        assert_eq!(gpt2.model, "gpt2", "read as stated; the tokenizer builder refuses it");
    }
}
