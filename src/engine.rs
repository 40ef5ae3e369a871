//! What every command starts from: the resolved checkpoint, its config, the expansion plan and the
//! loaded model, with the notices a user should see once.

use std::collections::HashSet;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use crate::config::{Config, GenerationConfig};
use crate::error::{Error, Result};
use crate::expand::{layer_tensor_name, layer_tensor_shape, Plan, LAYER_TENSORS};
use crate::loader::{self, Checkpoint, ModelFiles};
use crate::model::{Linear, Model, WeightRef};
use crate::quant::gguf::{self, GgufFile};
use crate::quant::QuantType;

/// The flags shared by every subcommand, as plain data.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub model: String,
    pub revision: Option<String>,
    pub expand: String,
    pub device: String,
    pub dtype: String,
    /// `--quant`: the type projections are quantized to at load (None: dense).
    pub quant: Option<String>,
    pub skip_transparent: bool,
}

impl LoadOptions {
    pub fn new(model: impl Into<String>) -> Self {
        LoadOptions {
            model: model.into(),
            revision: None,
            expand: "every:4".into(),
            device: "cpu".into(),
            dtype: "auto".into(),
            quant: None,
            skip_transparent: false,
        }
    }

    pub fn quant(mut self, ty: &str) -> Self {
        self.quant = Some(ty.into());
        self
    }

    /// `--quant`, checked.
    pub fn quant_type(&self) -> Result<Option<QuantType>> {
        self.quant.as_deref().map(|q| QuantType::parse(q, "--quant")).transpose()
    }

    pub fn expand(mut self, spec: &str) -> Self {
        self.expand = spec.into();
        self
    }

    pub fn dtype(mut self, spec: &str) -> Self {
        self.dtype = spec.into();
        self
    }

    pub fn device(mut self, spec: &str) -> Self {
        self.device = spec.into();
        self
    }
}

/// Where a checkpoint's tensors are stored.
pub enum Weights {
    /// A Hugging Face checkpoint's safetensors files.
    Safetensors(Checkpoint),
    /// One GGUF file (llama.cpp's format), config and tokenizer in its metadata.
    Gguf(GgufFile),
}

/// A checkpoint found and opened, before any weights are read.
pub struct Source {
    pub files: ModelFiles,
    pub config: Config,
    pub weights: Weights,
    pub generation: GenerationConfig,
}

impl Source {
    pub fn open(model: &str, revision: Option<&str>) -> Result<Source> {
        let files = loader::resolve(model, revision)?;
        if gguf::is_gguf_path(&files.config) {
            let g = GgufFile::open(&files.config)?;
            let config = g.config()?;
            check_plan_fits(&config, &files.config.display().to_string())?;
            g.check_tensors(config.num_hidden_layers)?;
            return Ok(Source { files, config, weights: Weights::Gguf(g), generation: GenerationConfig::default() });
        }
        let config = Config::from_file(&files.config)?;
        let checkpoint = Checkpoint::open(&files.weights)?;
        let generation = match &files.generation_config {
            Some(p) => {
                let g = GenerationConfig::from_file(p)?;
                g.check_vocab(config.vocab_size, p)?;
                g
            }
            None => GenerationConfig::default(),
        };
        let source = Source { files, config, weights: Weights::Safetensors(checkpoint), generation };
        source.check_config_against_tensors()?;
        Ok(source)
    }

    /// The config's sizes must be the tensors' sizes: checked on the header alone (the embedding and
    /// the first and last layers), so a config claiming absurd sizes fails before anything is
    /// allocated by them, naming the key.
    fn check_config_against_tensors(&self) -> Result<()> {
        let (cfg, ck) = (&self.config, self.safetensors("loading")?);
        let last = cfg.num_hidden_layers - 1;
        let probe = layer_tensor_name(last, LAYER_TENSORS[0]);
        if !ck.contains(&probe) {
            return Err(Error::bad_file(
                &self.files.config,
                format!("`num_hidden_layers` {}, but {} has no `{probe}`", cfg.num_hidden_layers, ck.describe_location().display()),
            ));
        }
        ck.check_shape("model.embed_tokens.weight", &[cfg.vocab_size, cfg.hidden_size])?;
        for layer in [0, last] {
            for suffix in LAYER_TENSORS {
                ck.check_shape(&layer_tensor_name(layer, suffix), &layer_tensor_shape(cfg, suffix))?;
            }
        }
        self.check_every_tensor_is_read()
    }

    /// Every tensor of the checkpoint must be one the model reads. A layer past `num_hidden_layers`
    /// or a q/k/v bias (Mistral and Llama as configured here have none) would otherwise be left out
    /// without a word, and the model run would not be the checkpoint's: refused, by name.
    fn check_every_tensor_is_read(&self) -> Result<()> {
        let (cfg, ck) = (&self.config, self.safetensors("loading")?);
        let layers = cfg.num_hidden_layers;
        let names = ck.names();
        if let Some(name) = names.iter().find(|n| layer_of(n).is_some_and(|l| l >= layers)) {
            let msg = format!("`num_hidden_layers` {layers}, but {} holds `{name}`: more layers than the config says", ck.path_of(name).display());
            return Err(Error::bad_file(&self.files.config, msg));
        }
        match names.into_iter().find(|n| !is_read(n) && !n.ends_with(".self_attn.rotary_emb.inv_freq")) {
            // Old checkpoints saved RoPE's inverse frequencies, which transformers recomputes too.
            None => Ok(()),
            Some(name) => Err(Error::bad_file(
                ck.path_of(name),
                format!(
                    "tensor `{name}` has no place in a {} as {} describes it; it would be left out and change the model's output",
                    cfg.architecture.hf_name(),
                    self.files.config.display()
                ),
            )),
        }
    }

    /// The folder whose `chat_template.jinja` the chat template may come from: none for a GGUF, whose
    /// template is its own metadata's, whatever lies beside it.
    pub fn template_dir(&self) -> Option<&std::path::Path> {
        match self.weights {
            Weights::Safetensors(_) => Some(&self.files.dir),
            Weights::Gguf(_) => None,
        }
    }

    /// The safetensors checkpoint, or an error naming the GGUF file that `what` cannot use yet.
    pub fn safetensors(&self, what: &str) -> Result<&Checkpoint> {
        match &self.weights {
            Weights::Safetensors(ck) => Ok(ck),
            Weights::Gguf(g) => Err(Error::bad_file(g.path(), format!("a GGUF file: {what} needs a safetensors checkpoint folder for now"))),
        }
    }

    /// The checkpoint's stored dtype: the config's word, else the embedding's dtype (a GGUF's config
    /// states its embedding's dtype when that is a float type).
    pub fn stored_dtype(&self) -> Option<DType> {
        match &self.weights {
            Weights::Safetensors(ck) => self.config.dtype.or_else(|| ck.entry("model.embed_tokens.weight").map(|e| e.dtype)),
            Weights::Gguf(_) => self.config.dtype,
        }
    }

    /// The canonical paths of everything a run on this checkpoint with `--expand expand` reads: the
    /// model's folder and the files in it (a hub snapshot's files are symlinks into `blobs/`, which
    /// canonicalising follows), its weights and configs wherever they are, and the expansion YAML.
    /// No output may be one of them, hold one or lie inside one ([`crate::staging::Target::check`]).
    /// A GGUF is one file: its folder is not the model, and an output may sit beside it.
    pub fn input_paths(&self, expand: &str) -> Vec<PathBuf> {
        let f = &self.files;
        let yaml = (expand != "none" && !expand.starts_with("every:")).then(|| PathBuf::from(expand));
        let mut paths: Vec<PathBuf> = match self.weights {
            Weights::Gguf(_) => [f.config.clone()].into_iter().chain(yaml).filter_map(|p| p.canonicalize().ok()).collect(),
            Weights::Safetensors(_) => {
                let in_dir = std::fs::read_dir(&f.dir).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_file());
                let named = [Some(&f.config), f.tokenizer.as_ref(), f.tokenizer_config.as_ref(), f.generation_config.as_ref()];
                let named = named.into_iter().flatten().chain(&f.weights).cloned();
                std::iter::once(f.dir.clone()).chain(in_dir).chain(named).chain(yaml).filter_map(|p| p.canonicalize().ok()).collect()
            }
        };
        paths.sort();
        paths.dedup();
        paths
    }

    /// Eos ids: generation_config's, else config.json's.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        if self.generation.eos_token_ids.is_empty() {
            self.config.eos_token_ids.clone()
        } else {
            self.generation.eos_token_ids.clone()
        }
    }
}

/// The layer a tensor name belongs to (`model.layers.{i}.…`).
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// Whether the model reads a tensor of this name (its layer's range checked separately).
fn is_read(name: &str) -> bool {
    match name.strip_prefix("model.layers.").and_then(|rest| rest.split_once('.')) {
        Some((layer, suffix)) => layer.parse::<usize>().is_ok() && LAYER_TENSORS.contains(&suffix),
        None => matches!(name, "model.embed_tokens.weight" | "model.norm.weight" | "lm_head.weight"),
    }
}

/// A model with random weights in the shapes of `spec` (a preset or config.json), expanded by `opts.expand`.
pub fn load_synthetic(spec: &str, opts: &LoadOptions, device: &Device) -> Result<(Plan, Model)> {
    let cfg = crate::synthetic::config(spec)?;
    let (dtype, _) = crate::device::dtype(&opts.dtype, device, cfg.dtype)?;
    let quant = opts.quant_type()?;
    check_plan_fits(&cfg, spec)?;
    let plan = Plan::from_spec(&opts.expand, cfg.num_hidden_layers, spec)?;
    // The dense size in u128 first: a config may claim sizes no usize holds, and only sizes within
    // reach of a machine are worth adding up per tensor.
    let wide = cfg.params_wide(cfg.num_hidden_layers).saturating_mul(dtype.size_in_bytes() as u128);
    let weights = match quant {
        Some(_) if wide < usize::MAX as u128 / 4 => plan.totals_as(&cfg, dtype, quant).allocated_bytes as u128,
        _ => wide,
    };
    check_fits(&format!("--synthetic {spec}: the weights"), weights, device)?;
    check_rotary_fits(&cfg, spec, device)?;
    let mut src = crate::synthetic::Synthetic::new(dtype, 42);
    let model = Model::load(&cfg, &plan, &mut src, dtype, device, opts.skip_transparent, quant)?;
    Ok((plan, model))
}

/// A model ready to run, with what was done to get it.
pub struct Loaded {
    pub source: Source,
    pub plan: Plan,
    pub model: Model,
    /// Things to tell the user once (plan warnings, dtype fallbacks, pre-expanded checkpoints).
    pub notices: Vec<String>,
}

impl Loaded {
    /// `model: openchat (32 → 40 layers, every:4) · cpu · bf16 · 15.7 GB` (`bf16 + q4_k` quantized)
    pub fn summary(&self) -> String {
        let dtype = crate::config::dtype_hf_name(self.model.dtype);
        let held = match self.model.quant_type() {
            Some(q) => format!("{dtype} + {}", q.name()),
            None => dtype.to_string(),
        };
        format!(
            "model: {} ({} → {} layers, {}) · {} · {held} · weights {}",
            self.source.files.name,
            self.plan.source_layers,
            self.plan.layers.len(),
            self.plan.spec,
            crate::device::name(&self.model.device),
            crate::expand::human_bytes(self.model.weight_bytes)
        )
    }
}

pub fn load(opts: &LoadOptions) -> Result<Loaded> {
    let source = Source::open(&opts.model, opts.revision.as_deref())?;
    let choice = crate::device::select(&opts.device)?;
    let mut loaded = load_from(source, opts, &choice.device)?;
    loaded.notices.splice(0..0, choice.notice);
    Ok(loaded)
}

pub fn load_from(mut source: Source, opts: &LoadOptions, device: &Device) -> Result<Loaded> {
    let plan = Plan::from_spec(&opts.expand, source.config.num_hidden_layers, &opts.model)?;
    let (dtype, dtype_note) = crate::device::dtype(&opts.dtype, device, source.stored_dtype())?;
    let quant = opts.quant_type()?;
    let weights = match &source.weights {
        Weights::Safetensors(_) => plan.totals_as(&source.config, dtype, quant).allocated_bytes as u128,
        Weights::Gguf(g) => {
            if let (Some(q), Some(stored)) = (quant, g.quantized_type()) {
                let msg = format!("{}: the file is already quantized ({}); --quant quantizes float weights", q.name(), stored.name());
                return Err(Error::flag("--quant", msg));
            }
            g.weight_bytes(&plan, dtype)? as u128
        }
    };
    check_fits(&format!("{}: the weights", source.files.name), weights, device)?;
    check_rotary_fits(&source.config, &source.files.config.display().to_string(), device)?;
    let mut notices = plan.warnings.clone();
    notices.extend(dtype_note);
    let cfg = source.config.clone();
    let model = match &mut source.weights {
        Weights::Safetensors(ck) => {
            let bar = crate::progress::bytes_bar("loading", bytes_to_read(ck, &cfg, &plan));
            let mut reading = crate::progress::Reading { checkpoint: ck, bar: &bar };
            let model = Model::load(&cfg, &plan, &mut reading, dtype, device, opts.skip_transparent, quant);
            // Cleared on failure too, so an error line is not drawn beside a stale bar.
            bar.finish_and_clear();
            model?
        }
        // Mapped, and read at memory speed: no bar.
        Weights::Gguf(g) => Model::load(&cfg, &plan, g, dtype, device, opts.skip_transparent, quant)?,
    };
    notices.extend(quant_notices(&model, opts)?);
    let pre = preexisting_transparent(&model, &plan)?;
    if !pre.is_empty() {
        notices.push(format!(
            "WARNING: {} already contains {} transparent block(s) (layers {}: copies of the previous layer with zero o_proj and down_proj) — it looks pre-expanded{}",
            source.files.name,
            pre.len(),
            pre.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", "),
            if plan.is_identity() { "" } else { "; expanding it again stacks more copies (use --expand none)" }
        ));
    }
    Ok(Loaded { source, plan, model, notices })
}

/// What the user should hear about `--quant` on `model`: that no projection could take the type, or
/// how many took another (llama-quantize's fallback for rows that are not whole blocks, or dense).
pub fn quant_notices(model: &Model, opts: &LoadOptions) -> Result<Vec<String>> {
    let Some(asked) = opts.quant_type()? else { return Ok(Vec::new()) };
    let dtype = crate::config::dtype_hf_name(model.dtype);
    if model.quant_type().is_none() {
        return Ok(vec![format!(
            "warning: --quant {}: no projection's rows are whole blocks of it (or of its fallback); the model runs in {dtype}",
            asked.name()
        )]);
    }
    let types = model.projection_types();
    let total: usize = types.iter().map(|(_, n)| n).sum();
    let others: Vec<String> = types.iter().filter(|(t, _)| *t != asked.name()).map(|(t, n)| format!("{n} {}", t.replace("dense", dtype))).collect();
    if others.is_empty() {
        return Ok(Vec::new());
    }
    Ok(vec![format!(
        "note: --quant {}: of {total} projections, {} (rows not whole {}-value blocks: llama-quantize's fallback)",
        asked.name(),
        others.join(", "),
        asked.block_values()
    )])
}

/// Bytes `Model::load` reads from `checkpoint` for `plan`: each source tensor once, whatever the
/// number of copies.
fn bytes_to_read(checkpoint: &Checkpoint, cfg: &Config, plan: &Plan) -> u64 {
    let mut names: HashSet<String> = ["model.embed_tokens.weight", "model.norm.weight"].map(String::from).into();
    if !cfg.tie_word_embeddings {
        names.insert("lm_head.weight".into());
    }
    for layer in &plan.layers {
        names.extend(LAYER_TENSORS.iter().map(|suffix| layer_tensor_name(layer.source, suffix)));
    }
    names.iter().filter_map(|n| checkpoint.entry(n)).map(|e| e.byte_len() as u64).sum()
}

/// Checkpoint layers that arrived transparent (not made so by the plan) and copy the layer before.
fn preexisting_transparent(model: &Model, plan: &Plan) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for (i, b) in model.blocks.iter().enumerate() {
        let by_plan = plan.layer_scale(i, "self_attn.o_proj.weight") != 1.0;
        if !b.transparent || by_plan || b.source == 0 {
            continue;
        }
        let prev = model.blocks.iter().find(|p| p.source + 1 == b.source);
        if let Some(p) = prev {
            let same = |a: &Linear, b: &Linear| WeightRef::of(a).values_equal(WeightRef::of(b));
            let copies =
                same(&p.self_attn.q_proj, &b.self_attn.q_proj)? && same(&p.self_attn.k_proj, &b.self_attn.k_proj)? && same(&p.mlp.up_proj, &b.mlp.up_proj)?;
            if copies {
                out.push(b.source);
            }
        }
    }
    Ok(out)
}

/// Bytes of memory `device` has in all, where known: RAM plus swap for the CPU, the GPU's own memory.
/// Only requests larger than this are refused: what else is using memory changes by the minute.
pub fn device_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => host_memory(),
        _ => crate::device::gpu_memory_total(device),
    }
}

/// Whose memory `device_memory` counts, for messages.
fn memory_of(device: &Device) -> String {
    match device {
        Device::Cpu => "of this machine (RAM + swap)".into(),
        d => format!("on {}", crate::device::name(d)),
    }
}

/// Memory the host can give without swapping (`MemAvailable`), in bytes (Linux; None elsewhere).
pub fn available_host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> { text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok() };
    Some((kib("MemTotal:")? + kib("SwapTotal:").unwrap_or(0)) * 1024)
}

/// Refuses a request for `bytes` of memory that `device` does not have, before allocating it.
pub fn check_fits(what: &str, bytes: u128, device: &Device) -> Result<()> {
    let Some(available) = device_memory(device) else { return Ok(()) };
    if bytes <= available as u128 {
        return Ok(());
    }
    let human = |b: u128| crate::expand::human_bytes(usize::try_from(b).unwrap_or(usize::MAX));
    Err(Error::TooLarge { what: what.to_string(), needed: human(bytes), available: human(available as u128), device: memory_of(device) })
}

/// The rotary tables are built for every position up to max_position_embeddings (f32 angles, then
/// cos and sin): a config claiming an absurd context fails here, naming the key.
fn check_rotary_fits(cfg: &Config, file: &str, device: &Device) -> Result<()> {
    let bytes = cfg.max_position_embeddings as u128 * cfg.head_dim as u128 / 2 * 4 * 3;
    check_fits(&format!("{file}: `max_position_embeddings` {} (its rotary tables)", cfg.max_position_embeddings), bytes, &Device::Cpu)?;
    check_fits(&format!("{file}: `max_position_embeddings` {} (its rotary tables)", cfg.max_position_embeddings), bytes, device)
}

/// The plan holds a few hundred bytes per layer: a config of absurdly many layers fails here.
pub fn check_plan_fits(cfg: &Config, file: &str) -> Result<()> {
    // Every layer may be copied once (every:1); a LayerPlan with its scale rules is under 256 bytes.
    let bytes = cfg.num_hidden_layers as u128 * 2 * 256;
    check_fits(&format!("{file}: `num_hidden_layers` {} (the expansion plan)", cfg.num_hidden_layers), bytes, &Device::Cpu)
}

/// The KV cache of a `ctx`-token context must fit beside the weights on the model's device.
pub fn check_cache_fits(model: &Model, ctx: usize) -> Result<()> {
    let c = &model.config;
    let layers = model.blocks.iter().filter(|b| model.runs(b)).count() as u128;
    let bytes = [c.num_key_value_heads, c.head_dim, ctx, model.dtype.size_in_bytes()].iter().fold(2 * layers, |acc, &x| acc.saturating_mul(x as u128));
    let Some(total) = device_memory(&model.device) else { return Ok(()) };
    let free = (total as u128).saturating_sub(model.weight_bytes as u128);
    if bytes <= free {
        return Ok(());
    }
    let human = |b: u128| crate::expand::human_bytes(usize::try_from(b).unwrap_or(usize::MAX));
    Err(Error::flag(
        "--ctx",
        format!(
            "a context of {ctx} tokens (default: max_position_embeddings) needs {} of KV cache, and {} of the memory {} is left beside the weights; pass a smaller --ctx",
            human(bytes),
            human(free),
            memory_of(&model.device)
        ),
    ))
}

/// Token ids as a `[1, s]` tensor on `device`.
pub fn ids_tensor(ids: &[u32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::new(ids, device)?.unsqueeze(0)?)
}

/// Parses `--ids 1,2,3`.
pub fn parse_ids(text: &str) -> Result<Vec<u32>> {
    let bad = |msg: String| Error::flag("--ids", format!("`{text}`: {msg} (expected comma-separated token ids)"));
    if text.trim().is_empty() {
        return Err(bad("no ids".into()));
    }
    text.split(',')
        .enumerate()
        .map(|(i, s)| {
            let s = s.trim();
            match s.parse::<u32>() {
                Ok(id) => Ok(id),
                Err(_) if s.is_empty() => Err(bad(format!("id {} is empty", i + 1))),
                Err(_) if s.starts_with('-') && s[1..].bytes().all(|b| b.is_ascii_digit()) => Err(bad(format!("`{s}` is negative"))),
                Err(_) if s.bytes().all(|b| b.is_ascii_digit()) => Err(bad(format!("`{s}` is too large for a token id"))),
                Err(_) => Err(bad(format!("`{s}` is not a number"))),
            }
        })
        .collect()
}
