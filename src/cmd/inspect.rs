//! `expanse inspect`: what a checkpoint is — architecture, size, and which layers are copies of
//! others or carry exactly-zero projections (the marks of a block expansion).

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::Path;

use candle_core::DType;
use clap::Args;

use crate::config::{dtype_hf_name, Config};
use crate::engine::Source;
use crate::error::Result;
use crate::expand::{human_bytes, human_params, layer_tensor_name, LAYER_TENSORS};
use crate::loader::Checkpoint;
use crate::quant::gguf::GgufFile;

use super::args::CheckpointArgs;
use super::{print_report, Failure};

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    checkpoint: CheckpointArgs,
    #[arg(long)]
    json: bool,
}

/// `expanse inspect`
pub fn run(args: InspectArgs) -> Result<(), Failure> {
    let InspectArgs { checkpoint, json } = args;
    let path = Path::new(&checkpoint.model);
    let report = if crate::quant::gguf::is_gguf_path(path) && path.is_file() {
        inspect_gguf(&GgufFile::open(path)?, &checkpoint.model)?
    } else {
        inspect(&checkpoint.open()?)?
    };
    print_report(&report, json)?;
    Ok(())
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerReport {
    pub layer: usize,
    /// The earliest layer whose every non-zero tensor this layer repeats byte for byte.
    pub copy_of: Option<usize>,
    /// A layer most of whose tensors this one repeats, with the ones that differ (a fine-tuned copy).
    pub modified_copy_of: Option<usize>,
    pub differs: Vec<String>,
    /// Projections whose every element is ±0.
    pub zero: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct InspectReport {
    pub model: String,
    pub architecture: String,
    pub layers: usize,
    pub dtype: String,
    pub parameters: usize,
    pub bytes: usize,
    pub hidden_size: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab_size: usize,
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    /// A GGUF's tokenizer, built from its metadata (a checkpoint's is its tokenizer.json: not shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    pub layer_reports: Vec<LayerReport>,
}

/// True when every element of a little-endian float buffer is +0.0 or −0.0.
pub fn bytes_all_zero(bytes: &[u8], dtype: DType) -> bool {
    match dtype.size_in_bytes() {
        2 => bytes.chunks_exact(2).all(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7fff == 0),
        4 => bytes.chunks_exact(4).all(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7fff_ffff == 0),
        _ => bytes.iter().all(|&b| b == 0),
    }
}

fn digest(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// What inspect reads of a checkpoint's tensors, whatever the file format.
trait Stored {
    /// The stored bytes of `name` (a GGUF's Q/K rows in Hugging Face's order), for copy detection, and,
    /// when `zero_check`, whether every value is ±0 (false when not asked).
    fn read(&self, name: &str, zero_check: bool) -> Result<(Cow<'_, [u8]>, bool)>;
}

impl Stored for Checkpoint {
    fn read(&self, name: &str, zero_check: bool) -> Result<(Cow<'_, [u8]>, bool)> {
        let b = self.bytes(name)?;
        let zero = zero_check && self.entry(name).is_some_and(|e| bytes_all_zero(b, e.dtype));
        Ok((Cow::Borrowed(b), zero))
    }
}

impl Stored for GgufFile {
    fn read(&self, name: &str, zero_check: bool) -> Result<(Cow<'_, [u8]>, bool)> {
        let t = self.tensor(name)?;
        let zero = zero_check && t.is_zero()?;
        Ok((t.bytes, zero))
    }
}

pub fn inspect(source: &Source) -> Result<InspectReport> {
    let ck: &Checkpoint = match &source.weights {
        crate::engine::Weights::Safetensors(ck) => ck,
        crate::engine::Weights::Gguf(g) => return inspect_gguf(g, &source.files.name),
    };
    let (mut parameters, mut bytes) = (0usize, 0usize);
    for name in ck.names() {
        if let Some(e) = ck.entry(name) {
            let n: usize = e.shape.iter().product();
            parameters += n;
            bytes += n * e.dtype.size_in_bytes();
        }
    }
    let dtype = source.stored_dtype().map(dtype_hf_name).unwrap_or("unknown").to_string();
    let layer_reports = layer_reports(&source.config, ck)?;
    Ok(report(source.files.name.clone(), &source.config, dtype, parameters, bytes, layer_reports))
}

/// `inspect` of a GGUF file: the config from its metadata, its types counted, its layers as for a
/// safetensors checkpoint (Q/K rows un-permuted, so a copy is found whatever the converter did).
pub fn inspect_gguf(g: &GgufFile, name: &str) -> Result<InspectReport> {
    let cfg = g.config()?;
    let (parameters, bytes, types) = g.summary()?;
    let dtype = types.iter().map(|(t, n)| format!("{t} ×{n}")).collect::<Vec<_>>().join(", ");
    let layer_reports = layer_reports(&cfg, g)?;
    let mut r = report(name.to_string(), &cfg, format!("GGUF: {dtype}"), parameters, bytes, layer_reports);
    // A file whose tokenizer cannot be built (none, or a kind not built yet) is still inspected.
    r.tokenizer = Some(gguf_tokenizer(g).unwrap_or_else(|e| format!("none built ({e})")));
    Ok(r)
}

/// `sentencepiece, 32002 tokens, <s> added, chat template` (or `byte-level BPE (`smollm`), …`): the
/// tokenizer built as commands will build it.
fn gguf_tokenizer(g: &GgufFile) -> Result<String> {
    let v = g.vocab()?;
    let tok = crate::tokenizer::Tokenizer::from_gguf(&v, g.path())?;
    let bos = match v.bos.and_then(|id| tok.id_to_token(id)) {
        Some(t) if v.add_bos => format!("{t} added"),
        _ => "no BOS added".into(),
    };
    let template = if v.chat_template.is_some() { "chat template" } else { "no chat template" };
    let kind = match (v.model.as_str(), &v.pre) {
        ("gpt2", Some(pre)) => format!("byte-level BPE (`{pre}`)"),
        _ => "sentencepiece".into(),
    };
    Ok(format!("{kind}, {} tokens, {bos}, {template}", tok.inner().get_vocab_size(true)))
}

fn report(model: String, cfg: &Config, dtype: String, parameters: usize, bytes: usize, layer_reports: Vec<LayerReport>) -> InspectReport {
    InspectReport {
        model,
        architecture: cfg.architecture.hf_name().to_string(),
        layers: cfg.num_hidden_layers,
        dtype,
        parameters,
        bytes,
        hidden_size: cfg.hidden_size,
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_key_value_heads,
        vocab_size: cfg.vocab_size,
        sliding_window: cfg.sliding_window,
        tie_word_embeddings: cfg.tie_word_embeddings,
        tokenizer: None,
        layer_reports,
    }
}

/// Per layer: which earlier layer it copies (wholly or but for some tensors) and which projections
/// are zero.
fn layer_reports(cfg: &Config, ck: &dyn Stored) -> Result<Vec<LayerReport>> {
    // Digests of each layer's tensors, to find exact copies cheaply before comparing bytes.
    let mut digests: Vec<Vec<Option<u64>>> = Vec::new();
    let mut layer_reports = Vec::new();
    for layer in 0..cfg.num_hidden_layers {
        let mut zero = Vec::new();
        let mut d = Vec::new();
        for suffix in LAYER_TENSORS {
            let name = layer_tensor_name(layer, suffix);
            let (b, zero_values) = ck.read(&name, suffix.contains("proj"))?;
            if zero_values {
                zero.push(suffix.trim_end_matches(".weight").to_string());
                d.push(None);
            } else {
                d.push(Some(digest(&b)));
            }
        }
        // The earlier layer sharing the most tensors byte for byte: a full copy when every
        // non-zero tensor matches, a modified copy (e.g. a fine-tuned inserted block) otherwise.
        let same = |j: usize, k: usize| {
            d[k].is_some()
                && d[k] == digests[j][k]
                && ck.read(&layer_tensor_name(layer, LAYER_TENSORS[k]), false).ok() == ck.read(&layer_tensor_name(j, LAYER_TENSORS[k]), false).ok()
        };
        let best = (0..layer)
            .map(|j| (j, (0..LAYER_TENSORS.len()).filter(|&k| same(j, k)).count()))
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(j, n)| (n, std::cmp::Reverse(j)));
        let nonzero = d.iter().filter(|x| x.is_some()).count();
        let (copy_of, modified_copy_of, differs) = match best {
            Some((j, n)) if n == nonzero => (Some(j), None, vec![]),
            Some((j, n)) if 2 * n > LAYER_TENSORS.len() => {
                let differs = (0..LAYER_TENSORS.len())
                    .filter(|&k| d[k].is_some() && !same(j, k))
                    .map(|k| LAYER_TENSORS[k].trim_end_matches(".weight").to_string())
                    .collect();
                (None, Some(j), differs)
            }
            _ => (None, None, vec![]),
        };
        digests.push(d);
        layer_reports.push(LayerReport { layer, copy_of, modified_copy_of, differs, zero });
    }
    Ok(layer_reports)
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model:        {}", self.model)?;
        writeln!(f, "architecture: {}", self.architecture)?;
        writeln!(f, "layers:       {}", self.layers)?;
        writeln!(f, "dtype:        {}", self.dtype)?;
        writeln!(f, "parameters:   {} ({})", human_params(self.parameters), human_bytes(self.bytes))?;
        writeln!(
            f,
            "shape:        hidden {}, heads {} (kv {}), vocab {}, sliding window {}, tied embeddings {}",
            self.hidden_size,
            self.heads,
            self.kv_heads,
            self.vocab_size,
            self.sliding_window.map_or("none".into(), |w| w.to_string()),
            self.tie_word_embeddings
        )?;
        if let Some(t) = &self.tokenizer {
            writeln!(f, "tokenizer:    {t}")?;
        }
        let marked: Vec<&LayerReport> =
            self.layer_reports.iter().filter(|l| l.copy_of.is_some() || l.modified_copy_of.is_some() || !l.zero.is_empty()).collect();
        if marked.is_empty() {
            return write!(f, "layers:       all distinct, no zero projections");
        }
        writeln!(f, "| layer | copy of | zero projections |")?;
        writeln!(f, "|------:|--------:|------------------|")?;
        for l in &marked {
            let copy = match (l.copy_of, l.modified_copy_of) {
                (Some(c), _) => c.to_string(),
                (None, Some(c)) => format!("{c} except {}", l.differs.join(", ")),
                _ => "-".to_string(),
            };
            let zero = if l.zero.is_empty() { "-".to_string() } else { l.zero.join(", ") };
            writeln!(f, "| {:>5} | {copy:>7} | {zero} |", l.layer)?;
        }
        let transparent = marked.iter().filter(|l| l.copy_of.is_some() && l.zero.len() >= 2).count();
        write!(f, "transparent copies (copy of an earlier layer, o_proj and down_proj zero): {transparent}")
    }
}
