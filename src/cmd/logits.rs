//! `expanse logits`: f32 logits for every position of a sequence, written as safetensors for
//! comparison with other implementations (`compare-logits` reads them back).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clap::Args;

use super::args::{ModelArgs, SkipArgs};
use super::{notices, Failure};
use crate::engine::{self, ids_tensor, Loaded};
use crate::error::{Error, Result};
use crate::model::{Cache, Logits};
use crate::staging::{OutKind, Target};
use crate::tokenizer::Tokenizer;

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub(super) model: ModelArgs,
    #[command(flatten)]
    skip: SkipArgs,
    /// Token ids, comma-separated
    #[arg(long, conflicts_with = "prompt", required_unless_present = "prompt")]
    ids: Option<String>,
    /// Text to tokenize (with the tokenizer's BOS, no chat template)
    #[arg(long)]
    prompt: Option<String>,
    /// Output .safetensors file (an existing file is replaced only when it is a logits file, or with --force)
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing --out file that is not a logits file
    #[arg(long)]
    force: bool,
}

/// An existing `out` is replaced unasked only when it is what this command writes (a rerun's
/// output): anything else of the user's needs `--force`.
fn refuse_other_file(out: &Path, force: bool) -> Result<()> {
    if force || !out.exists() {
        return Ok(());
    }
    let logits_file = crate::loader::Checkpoint::open(&[out.to_path_buf()]).is_ok_and(|ck| ck.names() == ["input_ids", "logits"]);
    if logits_file {
        return Ok(());
    }
    Err(Error::flag("--out", format!("{} exists and is not a logits file; pass --force to replace it", out.display())))
}

/// `expanse logits`
pub fn run(args: LogitsArgs) -> Result<(), Failure> {
    let LogitsArgs { model, skip, ids, prompt, out, force } = args;
    // Flags first: a bad --ids or --out fails before the model is opened (maybe downloaded) and loaded.
    let ids = ids.map(|t| engine::parse_ids(&t)).transpose()?;
    Target::check(&out, "--out", OutKind::File, true, &[])?;
    let inputs = model.source.checkpoint.open()?.input_paths(&model.source.expand);
    let target = Target::check(&out, "--out", OutKind::File, true, &inputs)?;
    refuse_other_file(&out, force)?;
    let loaded = engine::load(&model.options(skip.skip_transparent))?;
    notices(&loaded);
    let ids = token_ids(&loaded, ids, prompt)?;
    crate::staging::install_interrupt_cleanup();
    let logits = all_logits(&loaded, &ids)?;
    write(&target, &ids, &logits)?;
    eprintln!("wrote {} ({} positions × {} vocab, f32)", out.display(), ids.len(), loaded.model.config.vocab_size);
    Ok(())
}

/// `--ids` as given, or `--prompt` tokenized (with BOS); every id must be in the vocabulary.
fn token_ids(loaded: &Loaded, ids: Option<Vec<u32>>, prompt: Option<String>) -> Result<Vec<u32>> {
    let ids = match (ids, prompt) {
        (Some(ids), _) => ids,
        (None, Some(p)) => Tokenizer::for_model(&loaded.source)?.encode(&p, true)?,
        (None, None) => return Err(Error::flag("--ids", "give --ids or --prompt")),
    };
    let vocab = loaded.model.config.vocab_size as u32;
    if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
        return Err(Error::flag("--ids", format!("token id {bad} is out of range for vocab size {vocab}")));
    }
    Ok(ids)
}

/// Logits `[s, vocab]` in f32 for `ids`, one full-sequence forward from an empty cache.
pub fn all_logits(loaded: &Loaded, ids: &[u32]) -> Result<Tensor> {
    let model = &loaded.model;
    if ids.is_empty() {
        return Err(Error::flag("--prompt", "gives no tokens"));
    }
    let mut cache = Cache::new(model, ids.len())?;
    let out = model.forward(&ids_tensor(ids, &model.device)?, &mut cache, Logits::All)?;
    Ok(out.squeeze(0)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
}

/// Writes `logits` and `input_ids` to `out` (checked by the caller) atomically.
pub fn write(out: &Target, ids: &[u32], logits: &Tensor) -> Result<()> {
    let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?;
    crate::loader::write_safetensors_to(out, &[("logits", logits), ("input_ids", &ids)], None)
}

/// Reads a file written by `write` (or by the fixture scripts).
pub fn read(path: &Path) -> Result<(Vec<u32>, Tensor)> {
    let ck = crate::loader::Checkpoint::open(&[path.to_path_buf()])?;
    let need = |n: &str| ck.entry(n).map(|e| e.shape.clone()).ok_or_else(|| Error::MissingTensor { path: path.into(), name: n.into() });
    let lshape = need("logits")?;
    let ishape = need("input_ids")?;
    let logits = ck.load("logits", &lshape, &Device::Cpu)?.to_dtype(DType::F32)?;
    let ids = ck.load("input_ids", &ishape, &Device::Cpu)?.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    Ok((ids.into_iter().map(|i| i as u32).collect(), logits))
}
