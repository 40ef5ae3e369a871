//! What every command starts from: the resolved checkpoint, its config, the expansion plan and the
//! loaded model, with the notices a user should see once.

use std::collections::HashSet;

use candle_core::{DType, Device, Tensor};

use crate::config::{Config, GenerationConfig};
use crate::error::{Error, Result};
use crate::expand::{layer_tensor_name, Plan, LAYER_TENSORS};
use crate::loader::{self, Checkpoint, ModelFiles};
use crate::model::Model;

/// The flags shared by every subcommand, as plain data.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub model: String,
    pub revision: Option<String>,
    pub expand: String,
    pub device: String,
    pub dtype: String,
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
            skip_transparent: false,
        }
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

/// A checkpoint found and opened, before any weights are read.
pub struct Source {
    pub files: ModelFiles,
    pub config: Config,
    pub checkpoint: Checkpoint,
    pub generation: GenerationConfig,
}

impl Source {
    pub fn open(model: &str, revision: Option<&str>) -> Result<Source> {
        let files = loader::resolve(model, revision)?;
        let config = Config::from_file(&files.config)?;
        let checkpoint = Checkpoint::open(&files.weights)?;
        let generation = match &files.generation_config {
            Some(p) => GenerationConfig::from_file(p)?,
            None => GenerationConfig::default(),
        };
        Ok(Source { files, config, checkpoint, generation })
    }

    /// The checkpoint's stored dtype: the config's word, else the embedding's dtype.
    pub fn stored_dtype(&self) -> Option<DType> {
        self.config.dtype.or_else(|| self.checkpoint.entry("model.embed_tokens.weight").map(|e| e.dtype))
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

/// A model with random weights in the shapes of `spec` (a preset or config.json), expanded by `opts.expand`.
pub fn load_synthetic(spec: &str, opts: &LoadOptions, device: &Device) -> Result<(Plan, Model)> {
    let cfg = crate::synthetic::config(spec)?;
    let plan = Plan::from_spec(&opts.expand, cfg.num_hidden_layers, spec)?;
    let (dtype, _) = crate::device::dtype(&opts.dtype, device, cfg.dtype)?;
    let mut src = crate::synthetic::Synthetic::new(dtype, 42);
    let model = Model::load(&cfg, &plan, &mut src, dtype, device, opts.skip_transparent)?;
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
    /// `model: openchat (32 → 40 layers, every:4) · cpu · bf16 · 15.7 GB`
    pub fn summary(&self) -> String {
        format!(
            "model: {} ({} → {} layers, {}) · {} · {} · weights {}",
            self.source.files.name,
            self.plan.source_layers,
            self.plan.layers.len(),
            self.plan.spec,
            crate::device::name(&self.model.device),
            crate::config::dtype_hf_name(self.model.dtype),
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
    let mut notices = plan.warnings.clone();
    notices.extend(dtype_note);
    let cfg = source.config.clone();
    let bar = crate::progress::bytes_bar("loading", bytes_to_read(&source.checkpoint, &cfg, &plan));
    let mut reading = crate::progress::Reading { checkpoint: &mut source.checkpoint, bar: &bar };
    let model = Model::load(&cfg, &plan, &mut reading, dtype, device, opts.skip_transparent);
    // Cleared on failure too, so an error line is not drawn beside a stale bar.
    bar.finish_and_clear();
    let model = model?;
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
            let copies = crate::model::values_equal(&p.self_attn.q_proj.weight, &b.self_attn.q_proj.weight)?
                && crate::model::values_equal(&p.self_attn.k_proj.weight, &b.self_attn.k_proj.weight)?
                && crate::model::values_equal(&p.mlp.up_proj.weight, &b.mlp.up_proj.weight)?;
            if copies {
                out.push(b.source);
            }
        }
    }
    Ok(out)
}

/// Token ids as a `[1, s]` tensor on `device`.
pub fn ids_tensor(ids: &[u32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::new(ids, device)?.unsqueeze(0)?)
}

/// Parses `--ids 1,2,3`.
pub fn parse_ids(text: &str) -> Result<Vec<u32>> {
    let ids: std::result::Result<Vec<u32>, _> = text.split(',').map(|s| s.trim().parse::<u32>()).collect();
    match ids {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(Error::flag("--ids", format!("`{text}`: expected comma-separated token ids"))),
    }
}
